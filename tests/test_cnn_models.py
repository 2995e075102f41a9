"""Image layers, the CNN expert and CNN models (MMoE / SharedBottom with expert="cnn" /
bottom="cnn"): whole-expert and whole-model gradients by float64 finite differences, training on a
tiny synthetic image problem, save/load, and input errors raised before any training."""
import numpy as np
import pytest

import dselectk as dk
from dselectk import layers as L
from dselectk import models as Mo
from dselectk import inputs as I
from dselectk import trainer as T
from fd import check_entries


def _fd_slab(objective, grad, data, rng, n_entries=80, tol=2e-6):
    check_entries(objective, data, grad, rng.choice(data.size, min(n_entries, data.size), replace=False), tol)


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------

def test_flatten_is_a_view_both_ways():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    flat = L.Flatten()
    y = flat.forward(x)
    assert y.shape == (2, 60) and np.shares_memory(y, x)
    dout = np.ones((2, 60), np.float32)
    dx = flat.backward(dout)
    assert dx.shape == x.shape and np.shares_memory(dx, dout)


def test_conv_and_pool_layers_live_in_the_slab():
    rng = np.random.default_rng(0)
    expert = L.CNNExpert((2, 11, 10), units=(5,), rng=rng, filters=(3, 4), kernel=3, dtype=np.float64)
    slab = L.ParameterSlab(expert.named_modules("expert0"), np.float64)
    names = [name for name, _, _ in slab.index]
    assert names[:4] == ["expert0.0.W", "expert0.0.b", "expert0.3.W", "expert0.3.b"]
    conv = expert.layers[0]
    assert isinstance(conv, L.Conv2D) and np.shares_memory(conv.params["W"], slab.data)
    assert np.shares_memory(conv.grads["W"], slab.grad)
    x = rng.standard_normal((3, 2, 11, 10))
    out = expert.forward(x)
    assert out.shape == (3, expert.out_dim) and expert.out_dim == 5
    assert expert.feature_shape == (4, 1, 1)  # 11x10 -> 9x8 -> 4x4 -> 2x2 -> 1x1
    expert.backward(np.ones_like(out), need_dx=False)
    assert np.any(slab.grad[:conv.params["W"].size] != 0)


def test_paper_expert_shapes():
    expert = L.CNNExpert((1, 36, 36), units=(50, 50, 50), rng=np.random.default_rng(0))
    assert expert.feature_shape == (20, 6, 6) and expert.out_dim == 50
    kinds = [type(layer).__name__ for layer in expert.layers]
    assert kinds == ["Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "MaxPool2D", "Flatten"] + ["Dense", "ReLU"] * 3
    y = expert.forward(np.zeros((2, 1, 36, 36), np.float32))
    assert y.shape == (2, 50) and y.dtype == np.float32


@pytest.mark.parametrize("kwargs", [dict(filters=(3, 4), kernel=3), dict(filters=(2,), kernel=(3, 2), pool=(2, 3)),
                                    dict(filters=(3, 2), kernel=2, pool=1)], ids=["paper_like", "one_conv", "pool1"])
def test_cnn_expert_gradient(kwargs):
    """Every parameter and the input of the whole CNN expert (conv, ReLU, pool, flatten, dense)
    against central differences, float64."""
    rng = np.random.default_rng(1)
    expert = L.CNNExpert((2, 11, 12), units=(6, 4), rng=rng, dtype=np.float64, **kwargs)
    slab = L.ParameterSlab(expert.named_modules("e"), np.float64)
    slab.data[...] += 0.1 * rng.standard_normal(slab.data.size)  # nonzero biases too
    x = rng.standard_normal((3, 2, 11, 12))
    dout = rng.standard_normal((3, expert.out_dim))

    def objective():
        return float(np.sum(dout * expert.forward(x)))

    slab.zero_grad()
    expert.forward(x)
    dx = expert.backward(dout, need_dx=True)
    _fd_slab(objective, slab.grad.copy(), slab.data, rng, n_entries=120)
    _fd_slab(objective, dx.reshape(-1), x.reshape(-1), rng, n_entries=60)


def test_cnn_expert_rejects_inputs_too_small():
    with pytest.raises(ValueError, match="too small"):
        L.CNNExpert((1, 12, 12), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        L.CNNExpert((36, 36), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="stride"):
        L.Conv2D(1, 2, 3, stride=0)
    with pytest.raises(ValueError, match="same.*stride"):
        L.Conv2D(1, 2, 3, stride=2, padding="same")
    with pytest.raises(TypeError, match="kernel"):
        L.MaxPool2D(kernel=2.0)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

SHAPE = (1, 10, 10)
CNN = dict(expert="cnn", input_shape=SHAPE, expert_filters=(4, 6), expert_kernel=3, expert_units=(16,))


def _images(rng, N):
    """Task 0: the quadrant of a bright 3x3 square (4 classes); task 1: whether it is bright (1.0)
    or dim (0.45) (2 classes); uniform noise in [0, 0.2) elsewhere."""
    X = (0.2 * rng.random((N, *SHAPE))).astype(np.float32)
    quadrant = rng.integers(0, 4, N)
    bright = rng.integers(0, 2, N)
    for n in range(N):
        r = int(rng.integers(0, 3)) + 5 * (quadrant[n] // 2)
        c = int(rng.integers(0, 3)) + 5 * (quadrant[n] % 2)
        X[n, 0, r:r + 3, c:c + 3] = 1.0 if bright[n] else 0.45
    return X, [quadrant, bright]


@pytest.mark.parametrize("gate_kwargs", [dict(gate="dselect_k", k=2, entropy_reg=0.3),
                                         dict(gate="top_k", k=2, per_example=True),
                                         dict(gate="softmax", per_example=True)],
                         ids=["dselect_k_static", "top_k_per_example", "softmax_per_example"])
def test_cnn_mmoe_whole_model_gradient(gate_kwargs):
    rng = np.random.default_rng(2)
    model = Mo.MMoE(n_tasks=2, n_experts=3, tower_units=(5,), task_losses=["softmax_ce", "bce"], task_outputs=[4, 1],
                    dtype="float64", seed=4, **CNN, **gate_kwargs)
    for g in model.gates:  # off the tiny initial values and away from Top-k ties
        for name, v in g.params.items():
            v[...] = rng.uniform(-0.4, 0.4, v.shape) if name == "Z" else rng.standard_normal(v.shape) * 0.05
    X = rng.standard_normal((6, *SHAPE))
    Y = I.check_Y(model, [rng.integers(0, 4, 6), (rng.random(6) < 0.5).astype(float)], 6)

    def objective():
        return model.loss(model.forward(X, training=True), Y)[0]

    model.zero_grad()
    model.backward(model.loss(model.forward(X, training=True), Y)[2])
    _fd_slab(objective, model.slab.grad.copy(), model.slab.data, rng, n_entries=150)


def test_cnn_shared_bottom_whole_model_gradient():
    rng = np.random.default_rng(3)
    model = Mo.SharedBottom(n_tasks=2, bottom="cnn", input_shape=SHAPE, bottom_filters=(3, 4), bottom_kernel=3,
                            bottom_units=(8,), tower_units=(4,), task_losses=["softmax_ce", "mse"],
                            task_outputs=[3, 1], dtype="float64", seed=5)
    X = rng.standard_normal((5, *SHAPE))
    Y = I.check_Y(model, [rng.integers(0, 3, 5), rng.standard_normal(5)], 5)

    def objective():
        return model.loss(model.forward(X, training=True), Y)[0]

    model.zero_grad()
    model.backward(model.loss(model.forward(X, training=True), Y)[2])
    _fd_slab(objective, model.slab.grad.copy(), model.slab.data, rng, n_entries=150)


def test_cnn_mmoe_learns_a_tiny_image_problem():
    rng = np.random.default_rng(4)
    X, Y = _images(rng, 640)
    Xt, Yt = _images(rng, 320)
    model = Mo.MMoE(n_tasks=2, n_experts=4, tower_units=(16,), task_losses="softmax_ce", task_outputs=[4, 2],
                    gate="dselect_k", k=2, entropy_reg=0.5, seed=0, **CNN)
    hist = T.fit(model, X, Y, epochs=10, batch_size=32, lr=5e-3, verbose=0, seed=0)
    losses = hist["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    result = T.evaluate(model, Xt, Yt)
    assert result["task0_accuracy"] > 0.8 and result["task1_accuracy"] > 0.8, result
    assert hist.selected_experts[-1].max() <= 2


@pytest.mark.parametrize("cls,kwargs", [
    (Mo.MMoE, dict(CNN, gate="dselect_k", per_example=True, task_losses=["softmax_ce", "bce"], task_outputs=[3, 1])),
    (Mo.MMoE, dict(CNN, gate="top_k", k=1, task_losses="softmax_ce", task_outputs=3, dtype="float64")),
    (Mo.SharedBottom, dict(bottom="cnn", input_shape=SHAPE, bottom_filters=(2, 3), bottom_kernel=(3, 2),
                           bottom_pool=(2, 1), bottom_units=(6, 5), task_losses=["softmax_ce", "bce"],
                           task_outputs=[3, 1])),
    (Mo.MMoE, dict(input_shape=SHAPE, expert_units=(8,), task_losses="softmax_ce", task_outputs=3)),  # MLP on images
])
def test_save_load_roundtrip(tmp_path, cls, kwargs):
    rng = np.random.default_rng(5)
    model = cls(n_tasks=2, seed=3, **kwargs)
    model.slab.data[...] += rng.standard_normal(model.slab.data.size).astype(model.dtype) * 0.01
    X = rng.random((12, *SHAPE)).astype(np.float32)
    dk.save(model, tmp_path / "m.npz")
    loaded = dk.load(tmp_path / "m.npz")
    assert type(loaded) is cls and loaded.config == model.config
    assert loaded.input_shape == SHAPE
    for a, b in zip(T.predict(model, X), T.predict(loaded, X)):
        np.testing.assert_array_equal(a, b)


def test_gates_see_the_flattened_input_as_a_view():
    model = Mo.MMoE(n_tasks=1, n_experts=2, gate="softmax", per_example=True, task_losses="softmax_ce",
                    task_outputs=2, seed=0, **CNN)
    X = np.random.default_rng(6).random((4, *SHAPE)).astype(np.float32)
    seen = []
    forward = model.gates[0].forward
    model.gates[0].forward = lambda x=None: seen.append(x) or forward(x)
    model.forward(X)
    assert seen[0].shape == (4, 100) and np.shares_memory(seen[0], X)
    assert model.gates[0].input_dim == 100 and model.input_dim == 100


def _cnn_model():
    return Mo.MMoE(n_tasks=2, n_experts=3, tower_units=(4,), task_losses="softmax_ce", task_outputs=[4, 2], seed=0,
                   **CNN)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda X, Y: (X.reshape(len(X), -1), Y), ValueError, r"X must have shape \(N, 1, 10, 10\).*flattened"),
    (lambda X, Y: (X[:, :, :9], Y), ValueError, r"X must have shape \(N, 1, 10, 10\), got \(20, 1, 9, 10\)"),
    (lambda X, Y: (np.concatenate([X, X], 1), Y), ValueError, r"\(N, 1, 10, 10\).*NCHW"),
    (lambda X, Y: (X[None], Y), ValueError, r"\(N, 1, 10, 10\)"),
    (lambda X, Y: (X.astype(complex), Y), TypeError, "real numbers"),
    (lambda X, Y: (X.astype(str), Y), TypeError, "real numbers"),
    (lambda X, Y: (X.tolist(), Y), TypeError, "numpy.ndarray"),
    (lambda X, Y: (X[:0], [Y[0][:0], Y[1][:0]]), ValueError, "empty"),
    (lambda X, Y: (np.where(np.arange(20)[:, None, None, None] == 5, np.inf, X), Y), ValueError, "NaN or Inf .*row 5"),
    (lambda X, Y: (X, Y[:1]), ValueError, "1 tasks, the model has 2"),
    (lambda X, Y: (X, Y + [Y[0]]), ValueError, "3 tasks, the model has 2"),
    (lambda X, Y: (X, np.stack(Y, 0)), ValueError, r"or an \(N, 2\) array"),  # (N, T) arrays are read, (T, N) not
    (lambda X, Y: (X, [Y[0], np.where(np.arange(20) == 7, 2, Y[1])]), ValueError, "label 2 at row 7"),
    (lambda X, Y: (X, [np.where(np.arange(20) == 3, -1, Y[0]), Y[1]]), ValueError, "label -1 at row 3"),
    (lambda X, Y: (X, [Y[0].astype(float), Y[1]]), ValueError, "integer class labels"),
    (lambda X, Y: (X, [Y[0][:, None], Y[1]]), ValueError, r"integer class labels of shape \(N,\)"),
    (lambda X, Y: (X, [Y[0][:5], Y[1]]), ValueError, r"Y\[0\] has 5 rows"),
    (lambda X, Y: (X, [np.int64(1), Y[1]]), ValueError, r"Y\[0\].*scalar"),
])
def test_fit_rejects_bad_input_before_training(mutate, exc, match):
    X, Y = _images(np.random.default_rng(7), 20)
    model = _cnn_model()
    before = model.slab.data.copy()
    Xb, Yb = mutate(X, Y)
    with pytest.raises(exc, match=match):
        T.fit(model, Xb, Yb, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.slab.data, before)
    with pytest.raises(exc, match=match):
        T.evaluate(model, Xb, Yb)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(expert="cnn"), ValueError, r"input_shape=\(C, H, W\)"),
    (dict(expert="cnn", input_shape=(10, 10)), ValueError, r"input_shape=\(C, H, W\)"),
    (dict(expert="cnn", input_shape=(1, 6, 6)), ValueError, "too small"),
    (dict(expert="cnn", input_shape=(1, 10, 10), input_dim=99), ValueError, "does not match"),
    (dict(expert="cnn", input_shape=(1, 0, 10)), ValueError, "input_shape"),
    (dict(expert="cnn", input_shape=36), TypeError, "input_shape"),
    (dict(expert="rnn", input_shape=(1, 10, 10)), ValueError, "expert must be one of"),
    (dict(expert="cnn", input_shape=(1, 10, 10), expert_output="sum"), ValueError, "MLP experts only"),
    (dict(), ValueError, "input_dim"),
])
def test_bad_model_arguments(kwargs, exc, match):
    base = dict(expert_filters=(2, 3), expert_kernel=3)
    with pytest.raises(exc, match=match):
        Mo.MMoE(n_tasks=2, **{**base, **kwargs})


def test_bad_shared_bottom_arguments():
    with pytest.raises(ValueError, match=r"bottom='cnn' needs input_shape"):
        Mo.SharedBottom(bottom="cnn")
    with pytest.raises(ValueError, match="bottom must be one of"):
        Mo.SharedBottom(4, bottom="transformer")
    with pytest.raises(ValueError, match="too small"):
        Mo.SharedBottom(bottom="cnn", input_shape=(1, 8, 8))
