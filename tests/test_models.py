"""Models and trainer: whole-model gradients by finite differences, training sanity, early
stopping, save/load, determinism, bad input."""
import decimal
import warnings

import numpy as np
import pytest

import dselectk as dk
from fd import check_entries
from dselectk import models as Mo
from dselectk import inputs as I
from dselectk import trainer as T

GATE_KINDS = [
    dict(gate="dselect_k", k=2, gamma=1.0, entropy_reg=0.3, xi=0.5),
    dict(gate="dselect_k", k=2, gamma=2.0, entropy_reg=0.1, per_example=True),
    dict(gate="top_k", k=2),
    dict(gate="top_k", k=2, per_example=True),
    dict(gate="softmax"),
    dict(gate="softmax", per_example=True),
    dict(gate="softmax_selector", k=2, entropy_reg=0.2, temperature=0.7),
    dict(gate="comet", k=2, gamma=1.0, entropy_reg=0.3),
    dict(gate="comet", k=2, gamma=2.0, entropy_reg=0.1, per_example=True),
]
COMET_KINDS = [kw for kw in GATE_KINDS if kw["gate"] == "comet"]


def _saturate(model, rng):
    """Every smooth-step node of the model's DSelect-k / COMET gates saturated (S(z) = 0 or 1), for
    most examples per example: each selector or tree then picks one expert."""
    for g in model.gates:
        name = type(g).__name__
        if name not in ("DSelectKGate", "CometGate"):
            continue
        if g.per_example:
            g.params["W"][...] *= 0.01
            g.params["b_W"][...] = np.where(rng.random(g.params["b_W"].shape) < 0.5, -1, 1) * g.gamma
        else:
            g.params["Z"][...] = np.where(rng.random(g.params["Z"].shape) < 0.5, -1, 1) * g.gamma


def _data(rng, N, p, losses, outputs):
    X = rng.standard_normal((N, p))
    Y = []
    for loss, out in zip(losses, outputs):
        if loss == "bce":
            Y.append((rng.random(N) < 0.5).astype(float))
        elif loss == "softmax_ce":
            Y.append(rng.integers(0, out, N))
        else:
            Y.append(rng.standard_normal((N, out)) if out > 1 else rng.standard_normal(N))
    return X, Y


def _fd_check(model, X, Y, rng, n_entries=60):
    """Gradient of the total objective (weighted task losses + regularizers) in the slab against
    central differences, on a random subset of entries."""
    Yc = I.check_Y(model, Y, X.shape[0])

    def objective():
        outs = model.forward(X, training=True)
        return model.loss(outs, Yc)[0]

    model.zero_grad()
    outs = model.forward(X, training=True)
    _, _, douts = model.loss(outs, Yc)
    model.backward(douts)
    grad = model.slab.grad.copy()
    data = model.slab.data
    idx = rng.choice(data.size, min(n_entries, data.size), replace=False)
    # always include every gate parameter: they are the point of this package
    names = {name: (shape, off) for name, shape, off in model.slab.index}
    gate_idx = [off + i for name, (shape, off) in names.items() if name.startswith("gate")
                for i in range(int(np.prod(shape)))]
    check_entries(objective, data, grad, np.unique(np.concatenate([idx, np.array(gate_idx, dtype=int)])),
                  context=model.slab.index)


def _spread_gates(model, rng):
    """Move gate parameters off their tiny initial values (and away from Top-k ties) so that
    every term of the gradient is exercised; DSelect-k's Z stays inside the fractional region."""
    for g in model.gates:
        for name, v in g.params.items():
            if name in ("Z",):
                v[...] = rng.uniform(-0.4, 0.4, v.shape) * g.gamma
            elif name in ("W", "b_W"):
                v[...] = rng.uniform(-0.05, 0.05, v.shape) * g.gamma
            else:
                v[...] = rng.standard_normal(v.shape)


@pytest.mark.parametrize("gate_kwargs", GATE_KINDS, ids=lambda kw: kw["gate"] + ("_pe" if kw.get("per_example") else ""))
def test_mmoe_whole_model_gradient(gate_kwargs):
    rng = np.random.default_rng(0)
    losses, outputs = ["bce", "mse", "softmax_ce"], [1, 2, 3]
    model = Mo.MMoE(4, n_tasks=3, n_experts=5, expert_units=(6,), tower_units=(3,), task_losses=losses,
                    task_outputs=outputs, task_weights=[0.3, 0.5, 0.2], dtype="float64", seed=1, **gate_kwargs)
    _spread_gates(model, rng)
    X, Y = _data(rng, 9, 4, losses, outputs)
    _fd_check(model, X, Y, rng)


@pytest.mark.parametrize("gate_kwargs", GATE_KINDS[:3] + COMET_KINDS,
                         ids=["dselect_k", "dselect_k_pe", "top_k", "comet", "comet_pe"])
def test_moe_whole_model_gradient(gate_kwargs):
    rng = np.random.default_rng(1)
    model = Mo.MoE(3, n_experts=6, expert_units=(5, 4), loss="mse", output_dim=2, dtype="float64", seed=2,
                   **gate_kwargs)
    _spread_gates(model, rng)
    for name, shape, off in model.slab.index:  # biases off 0: a dead ReLU row then gives no exact-0
        if name.startswith("expert") and name.endswith(".b"):  # pre-activation, a kink for differences
            model.slab.data[off:off + shape[0]] += rng.uniform(-0.1, 0.1, shape[0])
    X, Y = _data(rng, 7, 3, ["mse"], [2])
    _fd_check(model, X, Y, rng)


def test_shared_bottom_whole_model_gradient():
    rng = np.random.default_rng(2)
    model = Mo.SharedBottom(5, n_tasks=2, bottom_units=(7, 6), tower_units=(4,), task_losses=["bce", "mse"],
                            task_weights=[0.9, 0.1], dtype="float64", seed=3)
    X, Y = _data(rng, 8, 5, ["bce", "mse"], [1, 1])
    _fd_check(model, X, Y, rng, n_entries=200)


def _synthetic_two_task(rng, N=3000, p=8):
    X = rng.standard_normal((N, p)).astype(np.float32)
    v1, v2 = rng.standard_normal(p), rng.standard_normal(p)
    y1 = np.tanh(X @ v1) + 0.5 * np.maximum(X @ v2, 0)
    y2 = (np.sin(X @ v2) + 0.1 * rng.standard_normal(N) > 0).astype(np.float32)
    return X, [y1.astype(np.float32), y2]


def test_mmoe_fits_a_small_problem_and_dselect_k_becomes_binary():
    rng = np.random.default_rng(3)
    X, Y = _synthetic_two_task(rng)
    model = Mo.MMoE(8, n_tasks=2, n_experts=4, expert_units=(32,), tower_units=(16,), task_losses=["mse", "bce"],
                    gate="dselect_k", k=2, gamma=1.0, entropy_reg=0.5, seed=0)
    before = T.evaluate(model, X, Y)
    hist = T.fit(model, X, Y, epochs=15, batch_size=64, lr=3e-3, verbose=0, seed=0)
    after = T.evaluate(model, X, Y)
    # the targets have variance ~0.6 (task 0); a fitted model explains most of it
    assert after["task0_mse"] < 0.25 * before["task0_mse"], (before, after)
    assert after["task1_auc"] > 0.9, after
    assert all(s is not None for s in hist.binary_step), hist.binary_step
    assert all(model.gates[t].is_binary() for t in range(2))
    assert hist.selected_experts[-1].max() <= 2


def test_early_stopping_restores_the_best_weights():
    rng = np.random.default_rng(4)
    X, Y = _synthetic_two_task(rng, N=400)
    Xv, Yv = _synthetic_two_task(rng, N=200)
    model = Mo.MMoE(8, n_tasks=2, n_experts=4, expert_units=(64,), tower_units=(64,), task_losses=["mse", "bce"],
                    gate="top_k", k=2, seed=0)
    snapshots = {}

    class Snap:
        def on_epoch_end(self, epoch, logs, m):
            snapshots[epoch] = (logs["val_loss"], m.slab.data.copy())

    # a large learning rate on little data overfits / oscillates, so the best epoch is not the last
    hist = T.fit(model, X, Y, epochs=25, batch_size=32, lr=0.02, validation_data=(Xv, Yv),
                 early_stopping_patience=3, callbacks=[Snap()], verbose=0)
    best = min(snapshots, key=lambda e: snapshots[e][0])
    assert hist.best_epoch == best
    assert len(hist.epochs) < 25 or best != 25
    np.testing.assert_array_equal(model.slab.data, snapshots[best][1])
    assert T.evaluate(model, Xv, Yv)["loss"] == pytest.approx(snapshots[best][0], rel=1e-5)


def test_training_is_deterministic():
    rng = np.random.default_rng(5)
    X, Y = _synthetic_two_task(rng, N=500)
    runs = []
    for _ in range(2):
        model = Mo.MMoE(8, n_tasks=2, n_experts=4, expert_units=(16,), tower_units=(8,), task_losses=["mse", "bce"],
                        gate="dselect_k", k=2, per_example=True, dropout=0.3, seed=7)
        T.fit(model, X, Y, epochs=2, batch_size=50, verbose=0, seed=11)
        runs.append(model.slab.data.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("cls,kwargs", [
    (Mo.MMoE, dict(n_tasks=2, n_experts=4, gate="dselect_k", per_example=True, task_losses=["mse", "softmax_ce"],
                   task_outputs=[1, 3])),
    (Mo.MoE, dict(n_experts=4, gate="top_k")),
    (Mo.SharedBottom, dict(n_tasks=2, task_losses=["bce", "mse"])),
    (Mo.MMoE, dict(n_tasks=2, n_experts=5, gate="comet", k=2, gamma=0.5, entropy_reg=0.1)),
    (Mo.MMoE, dict(n_tasks=3, n_experts=6, gate=dk.gates.Comet(3, per_example=True), task_losses="bce")),
    (Mo.MoE, dict(n_experts=7, gate=dk.gates.Comet(2, entropy_reg=1.0))),
])
def test_save_load_roundtrip(tmp_path, cls, kwargs):
    rng = np.random.default_rng(6)
    model = cls(5, seed=3, **kwargs)
    model.slab.data[...] += rng.standard_normal(model.slab.data.size).astype(np.float32) * 0.01
    X = rng.standard_normal((20, 5)).astype(np.float32)
    path = tmp_path / "m.npz"
    dk.save(model, path)
    loaded = dk.load(path)
    assert type(loaded) is cls
    for a, b in zip(T.predict(model, X), T.predict(loaded, X)):
        np.testing.assert_array_equal(a, b)


def test_load_rejects_bad_files(tmp_path):
    model = Mo.MoE(3, n_experts=2, k=1, seed=0)
    good = tmp_path / "good.npz"
    dk.save(model, good)
    raw = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable dselectk model"):
        dk.load(tmp_path / "trunc.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a readable dselectk model"):
        dk.load(tmp_path / "other.npz")
    import json
    with np.load(good) as z:
        meta = json.loads(str(z["meta"][()]))
        params = z["params"]
    meta["version"] = 999
    np.savez(tmp_path / "future.npz", params=params, meta=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match="format version 999"):
        dk.load(tmp_path / "future.npz")
    meta["version"] = 1
    np.savez(tmp_path / "short.npz", params=params[:-1], meta=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match="do not match"):
        dk.load(tmp_path / "short.npz")


def _small_model(**kw):
    return Mo.MMoE(4, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=(3,), task_losses=["bce", "softmax_ce"],
                   task_outputs=[1, 3], seed=0, **kw)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda X, Y: (X[:, :3], Y), ValueError, r"X must have shape \(N, 4\)"),
    (lambda X, Y: (X.tolist(), Y), TypeError, "numpy.ndarray"),
    (lambda X, Y: (X, Y[:1]), ValueError, "1 tasks, the model has 2"),
    (lambda X, Y: (X, [Y[0][:5], Y[1]]), ValueError, r"Y\[0\] has 5 rows"),
    (lambda X, Y: (np.where(np.arange(40)[:, None] == 3, np.nan, X), Y), ValueError, "NaN or Inf .*row 3"),
    (lambda X, Y: (X, [np.where(np.arange(40) == 2, np.inf, Y[0]), Y[1]]), ValueError, r"Y\[0\] contains NaN"),
    (lambda X, Y: (X, [Y[0], np.where(np.arange(40) == 7, 3, Y[1])]), ValueError, "label 3 at row 7"),
    (lambda X, Y: (X, [Y[0], Y[1].astype(float)]), ValueError, "integer class labels"),
    (lambda X, Y: (X, [Y[0] * 2, Y[1]]), ValueError, r"targets in \[0, 1\]"),
    (lambda X, Y: (X[:0], Y), ValueError, "empty"),
])
def test_fit_rejects_bad_input_before_training(mutate, exc, match):
    rng = np.random.default_rng(7)
    X, Y = _data(rng, 40, 4, ["bce", "softmax_ce"], [1, 3])
    model = _small_model()
    before = model.slab.data.copy()
    Xb, Yb = mutate(X, Y)
    with pytest.raises(exc, match=match):
        T.fit(model, Xb, Yb, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.slab.data, before)


def test_fit_argument_errors():
    rng = np.random.default_rng(8)
    X, Y = _data(rng, 40, 4, ["bce", "softmax_ce"], [1, 3])
    model = _small_model()
    for kwargs, match in [(dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
                          (dict(early_stopping_patience=2), "validation_data"), (dict(optimizer="lbfgs"), "lbfgs")]:
        with pytest.raises(ValueError, match=match):
            T.fit(model, X, Y, verbose=0, **kwargs)
    with pytest.raises(ValueError, match="one per task"):
        Mo.MMoE(4, n_tasks=2, task_losses=["mse"])
    with pytest.raises(ValueError, match="unknown gate"):
        Mo.MMoE(4, gate="hashing")
    with pytest.raises(ValueError, match="hash routing needs an id input"):
        Mo.MMoE(4, gate="hash")
    with pytest.raises(ValueError, match="does not fit loss"):
        Mo.MMoE(4, task_losses="bce", task_outputs=2)


def test_nan_loss_stops_with_epoch_and_step():
    rng = np.random.default_rng(9)
    X, Y = _data(rng, 64, 4, ["bce", "softmax_ce"], [1, 3])
    model = _small_model()

    class Poison:
        def on_step_end(self, step, m):
            if step == 5:
                m.slab.data[0] = np.inf

    with pytest.raises(FloatingPointError, match=r"epoch 2, step 2 of 4 \(global step 6\)"):
        T.fit(model, X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[Poison()])


def test_history_records_gate_weights_and_progress_lines():
    rng = np.random.default_rng(10)
    X, Y = _data(rng, 64, 4, ["bce", "softmax_ce"], [1, 3])
    model = _small_model(gate="dselect_k", k=2)
    lines = []
    hist = T.fit(model, X, Y, epochs=2, batch_size=16, verbose=1, record_gate_every=2, out=lines.append,
                 validation_data=(X, Y))
    assert hist.gate_weights.shape == (4, 2, 3) and hist.gate_steps == [2, 4, 6, 8]
    # n = 3 is not a power of two: the selectors' mass on the unused code is lost (Appendix B.2)
    sums = hist.gate_weights.sum(axis=2)
    assert np.all((sums > 0.5) & (sums <= 1 + 1e-6)), sums
    assert np.all(np.diff(sums[:, 0]) > 0), "the xi penalty moves mass back to real experts"
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2") and "val_task0_auc" in lines[0]
    quiet = []
    T.fit(model, X, Y, epochs=1, verbose=0, out=quiet.append)
    assert quiet == []


def test_predict_transforms():
    model = _small_model()
    X = np.random.default_rng(11).standard_normal((10, 4)).astype(np.float32)
    p_bce, p_ce = T.predict(model, X)
    assert p_bce.shape == (10,) and np.all((p_bce > 0) & (p_bce < 1))
    assert p_ce.shape == (10, 3)
    np.testing.assert_allclose(p_ce.sum(axis=1), 1, rtol=1e-6)
    raw = T.predict(model, X, raw=True)
    np.testing.assert_allclose(1 / (1 + np.exp(-raw[0].reshape(-1))), p_bce, rtol=1e-6)


@pytest.mark.parametrize("gate", [dk.gates.DSelectK(2, entropy_reg=0.1), dk.gates.TopK(2),
                                  dk.gates.SoftmaxSelector(2, entropy_reg=0.1)], ids=lambda spec: spec.kind)
def test_sum_experts_without_towers_gradient(gate):
    """The Appendix C.2 architecture: experts that sum their ReLU units, the mixture is the output."""
    rng = np.random.default_rng(12)
    model = Mo.MMoE(5, n_tasks=3, n_experts=4, expert_units=(4,), expert_output="sum", tower_units=None,
                    task_losses="mse", gate=gate, dtype="float64", seed=4)
    assert all(len(t.layers) == 0 for t in model.towers)
    _spread_gates(model, rng)
    X, Y = _data(rng, 11, 5, ["mse"] * 3, [1] * 3)
    _fd_check(model, X, Y, rng, n_entries=100)
    # y_t = sum_j w_tj * sum_u relu(x W_j + b_j)_u, written out
    out = model.forward(X)
    w = model.gate_weights()
    f = np.stack([np.maximum(X @ e.layers[0].params["W"] + e.layers[0].params["b"], 0).sum(axis=1)
                  for e in model.experts])
    np.testing.assert_allclose(np.stack([o[:, 0] for o in out]), w @ f, rtol=1e-12)


def test_tower_less_mmoe_needs_matching_output_width():
    with pytest.raises(ValueError, match="tower_units=None"):
        Mo.MMoE(5, n_tasks=1, expert_units=(4,), tower_units=None, task_losses="mse")
    with pytest.raises(ValueError, match="expert_output"):
        Mo.MMoE(5, expert_output="max")


def test_frozen_parameters_do_not_move(tmp_path):
    rng = np.random.default_rng(13)
    X, Y = _data(rng, 200, 6, ["bce"], [1])
    model = Mo.MMoE(6, n_tasks=1, n_experts=8, expert_units=(4,), tower_units=(), task_losses="bce", gate="dselect_k",
                    k=4, seed=1)
    model.freeze("expert")
    names = model.parameters()
    before = {n: v.copy() for n, v in names.items()}
    T.fit(model, X, Y, epochs=3, batch_size=32, lr=0.01, verbose=0, optimizer_kwargs=dict(weight_decay=0.01))
    after = model.parameters()
    for n in names:
        if n.startswith("expert"):
            np.testing.assert_array_equal(after[n], before[n], err_msg=n)
        else:
            assert not np.array_equal(after[n], before[n]), f"{n} should train"
    with pytest.raises(ValueError, match="no parameter name starts with"):
        model.freeze("nothing")
    model.unfreeze()
    T.fit(model, X, Y, epochs=1, verbose=0)
    assert not np.array_equal(model.parameters()["expert0.0.W"], before["expert0.0.W"])


STATIC_KINDS = [kw for kw in GATE_KINDS if not kw.get("per_example")]


@pytest.mark.parametrize("width", [5, 20], ids=["gemm_mixing", "many_mixing"])  # d < 4T: GEMM; d >= 4T: one pass
@pytest.mark.parametrize("binary", [False, True], ids=["fractional", "binary"])
@pytest.mark.parametrize("gate_kwargs", STATIC_KINDS, ids=lambda kw: kw["gate"])
def test_static_fast_path_matches_the_per_task_path(gate_kwargs, binary, width):
    """Static gates: mixing the active experts for all tasks at once (one GEMM, or one
    mix_experts_many pass with the ReLU backward fused), and one batched call for DSelect-k, gives
    the outputs, loss and every gradient of the plain per-task mixing, and skips unused experts."""
    rng = np.random.default_rng(21)
    losses, outputs = ["bce", "mse", "softmax_ce", "mse"], [1, 2, 3, 1]
    fast = Mo.MMoE(4, n_tasks=4, n_experts=6, expert_units=(width,), tower_units=(3,), task_losses=losses,
                   task_outputs=outputs, dtype="float64", seed=3, **gate_kwargs)
    _spread_gates(fast, rng)
    if binary and gate_kwargs["gate"] == "dselect_k":
        for g in fast.gates:  # S(Z) saturated: each task uses at most k = 2 of the 6 experts
            g.params["Z"][...] = np.where(rng.random(g.params["Z"].shape) < 0.5, -1, 1) * g.gamma
            g.params["Z"][:, 0] = -g.gamma  # codes < 4: experts 4 and 5 are never selected
    if binary and gate_kwargs["gate"] == "comet":
        _saturate(fast, rng)  # each tree reaches one leaf: each task uses at most k = 2 experts
        for g in fast.gates:
            g.params["Z"][:, 0] = g.gamma  # every tree goes left at the root: experts 4, 5 (n = 6) unused
    slow = Mo.MMoE(4, n_tasks=4, n_experts=6, expert_units=(width,), tower_units=(3,), task_losses=losses,
                   task_outputs=outputs, dtype="float64", seed=3, **gate_kwargs)
    slow.slab.data[...] = fast.slab.data
    slow.static_fast_path = False
    X, Y = _data(rng, 10, 4, losses, outputs)
    Yc = I.check_Y(fast, Y, 10)
    calls = []
    for j, e in enumerate(fast.experts):
        e.forward = (lambda orig, j: lambda x, training=False, **kw: (calls.append(j), orig(x, training, **kw))[1])(
            e.forward, j)
    results = []
    for model in (fast, slow):
        model.zero_grad()
        outs = model.forward(X, training=True)
        total, per_task, douts = model.loss(outs, Yc)
        model.backward(douts)
        results.append((outs, total, model.slab.grad.copy(), model.gate_weights()))
    (o1, t1, g1, w1), (o2, t2, g2, w2) = results
    for a, b in zip(o1, o2):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert t1 == pytest.approx(t2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(w1, w2)
    used = np.flatnonzero(w1.any(axis=0))
    assert sorted(calls) == list(used)
    if binary and gate_kwargs["gate"] in ("dselect_k", "comet"):
        assert fast.gates[0].is_binary() and len(used) <= 4
        assert fast.regularization() == pytest.approx(slow.regularization(), rel=1e-12)


def test_static_dselect_k_bank_equals_separate_gates():
    from dselectk.gates import DSelectKGate, StaticDSelectKBank
    rng = np.random.default_rng(5)
    gates = [DSelectKGate(6, 3, gamma=2.0, entropy_reg=0.4, xi=0.7, seed=i, dtype=np.float64) for i in range(5)]
    for g in gates:
        g.params["Z"][...] = rng.uniform(-0.8, 0.8, g.params["Z"].shape)
        g.params["alpha"][...] = rng.standard_normal(3)
    twins = [DSelectKGate(6, 3, gamma=2.0, entropy_reg=0.4, xi=0.7, seed=i, dtype=np.float64) for i in range(5)]
    for g, h in zip(gates, twins):
        for name in g.params:
            h.params[name][...] = g.params[name]
    bank = StaticDSelectKBank(gates)
    W = bank.forward()
    dW = rng.standard_normal(W.shape)
    bank.backward(dW)
    for t, h in enumerate(twins):
        np.testing.assert_allclose(W[t], h.forward(), rtol=1e-14)
        h.backward(dW[t])
        for name in h.grads:
            np.testing.assert_allclose(gates[t].grads[name], h.grads[name], rtol=1e-12, atol=1e-15)
        assert gates[t].regularization() == pytest.approx(h.regularization(), rel=1e-12)
    assert bank.regularization() == pytest.approx(sum(h.regularization() for h in twins), rel=1e-12)
    with pytest.raises(ValueError, match="one configuration"):
        StaticDSelectKBank([DSelectKGate(6, 3), DSelectKGate(6, 2)])
    with pytest.raises(TypeError, match="static DSelectKGate"):
        StaticDSelectKBank([DSelectKGate(6, 3, per_example=True, input_dim=2)])


PER_EXAMPLE_KINDS = [kw for kw in GATE_KINDS if kw.get("per_example") and kw["gate"] != "softmax"]  # exact zeros


@pytest.mark.parametrize("gate_kwargs", PER_EXAMPLE_KINDS, ids=lambda kw: kw["gate"])
def test_per_example_sparse_path_matches_the_dense_path(gate_kwargs):
    """Per-example gates with exact zeros: experts run on their examples only (gather -> dense ->
    scatter) with the outputs, loss and gradients of the dense path, and fewer FLOPs."""
    rng = np.random.default_rng(8)
    losses, outputs = ["bce", "mse"], [1, 2]
    kw = dict(n_tasks=2, n_experts=8, expert_units=(5, 4), tower_units=(3,), task_losses=losses,
              task_outputs=outputs, dtype="float64", seed=5, **gate_kwargs)
    sparse, dense = Mo.MMoE(4, **kw), Mo.MMoE(4, **kw)
    _spread_gates(sparse, rng)
    _saturate(sparse, rng)  # DSelect-k, COMET: S(Z) binary for most examples: <= 2 experts each
    dense.slab.data[...] = sparse.slab.data
    dense.sparse_threshold = 0.0
    X, Y = _data(rng, 40, 4, losses, outputs)
    Yc = I.check_Y(sparse, Y, 40)
    results = []
    for model in (sparse, dense):
        model.zero_grad()
        model.reset_flops()
        outs = model.forward(X, training=True)
        total, _, douts = model.loss(outs, Yc)
        model.backward(douts)
        results.append((outs, total, model.slab.grad.copy(), dict(model.flops)))
    (o1, t1, g1, fl1), (o2, t2, g2, fl2) = results
    for a, b in zip(o1, o2):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert t1 == pytest.approx(t2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-13)
    assert sparse._cache[2] is not None and dense._cache[2] is None  # the paths really differed
    used = np.zeros((40, 8), bool)
    for w in sparse._cache[1]:
        used |= w != 0
    per_row = sparse.experts[0].flops_per_row()
    softmax = Mo.MMoE(4, **{**{key: v for key, v in kw.items() if key not in gate_kwargs}, "gate": "softmax",
                            "per_example": True})
    softmax.forward(X, training=True)
    assert softmax._cache[2] is None  # no zero weights: the dense path
    assert fl1["experts_executed"] == used.sum() * per_row < fl2["experts_executed"] == fl2["experts_dense"]
    assert per_row == 3 * 2 * (4 * 5 + 5 * 4) - 2 * 4 * 5


def test_fit_records_expert_flops_and_binary_static_gates_save_them():
    rng = np.random.default_rng(3)
    X, Y = _synthetic_two_task(rng, N=512)
    model = Mo.MoE(8, n_experts=8, expert_units=(16,), loss="mse", gate="dselect_k", k=2, gamma=0.5,
                   entropy_reg=1.0, seed=0)
    history = T.fit(model, X, [Y[0]], epochs=6, batch_size=64, lr=0.05, verbose=0)
    flops = history["expert_flops"]
    dense = history["expert_flops_dense"]
    assert dense[-1] == 6 * 512 * 8 * model.experts[0].flops_per_row()
    assert model.gates[0].is_binary() and len(model.gates[0].selected_experts()) <= 2
    assert flops[-1] - flops[-2] <= (dense[-1] - dense[-2]) * 2 / 8  # last epoch: at most 2 of 8 experts ran


def test_tower_dropout_differs_from_the_experts_dropout(tmp_path):
    from dselectk.layers import Dropout
    model = Mo.MMoE(4, n_tasks=2, n_experts=2, expert_units=(3,), tower_units=(3,), dropout=0.5, tower_dropout=0.0)
    assert any(isinstance(l, Dropout) for l in model.experts[0].layers)
    assert not any(isinstance(l, Dropout) for tw in model.towers for l in tw.layers)
    sb = Mo.SharedBottom(4, bottom_units=(3,), tower_units=(3,), dropout=0.3, tower_dropout=0.1)
    assert [l.rate for l in sb.towers[0].layers if isinstance(l, Dropout)] == [0.1]
    assert "tower_dropout" not in Mo.MMoE(4).config  # only when set, so that older readers load the others
    dk.save(model, tmp_path / "m.npz")
    assert dk.load(tmp_path / "m.npz").config["tower_dropout"] == 0.0


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_dropout_outside_0_1_is_refused(rate):
    for make in (lambda: dk.MMoE(4, dropout=rate), lambda: dk.MoE(4, dropout=rate),
                 lambda: dk.SharedBottom(4, dropout=rate), lambda: dk.MMoE(4, tower_dropout=rate),
                 lambda: dk.SharedBottom(4, tower_dropout=rate),
                 lambda: dk.MMoE(expert="cnn", input_shape=(1, 12, 12), expert_units=(3,), dropout=rate)):
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
            make()
    from dselectk import layers
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        layers.MLP(3, (2,), np.random.default_rng(0), dropout=rate)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        layers.Dropout(rate, seed=0)
    with pytest.raises(TypeError, match="dropout must be a number"):
        dk.MMoE(4, dropout="0.1")
    with pytest.raises(TypeError, match="dropout must be a number"):
        dk.MMoE(4, dropout=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_predict_sigmoid_is_stable(dtype):
    # bce logits far in both tails: probabilities without overflow warnings, exact in the tails'
    # relative terms, equal to 1 / (1 + exp(-z)) where that is computable
    model = dk.MMoE(3, n_tasks=1, n_experts=2, expert_units=(2,), tower_units=(), task_losses="bce", dtype=dtype)
    z = np.array([-1e4, -745.0, -100.0, -30.0, -1.0, 0.0, 1e-3, 2.5, 40.0, 1e4], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = model.transform_outputs([z[:, None]])[0]
    assert p.dtype == dtype and np.all((p >= 0) & (p <= 1))
    with decimal.localcontext() as ctx:  # the reference in 60 digits
        ctx.prec = 60
        exact = np.array([float(1 / (1 + (-decimal.Decimal(float(v))).exp())) for v in z])
    representable = exact >= np.finfo(dtype).tiny  # relative accuracy down to the smallest normal number
    np.testing.assert_allclose(p[representable], exact[representable], rtol=4 * np.finfo(dtype).eps)
    assert p[-1] == 1 and p[0] == 0
    # and through dk.predict: a tower bias pushes the logits to +-1e4
    model.parameters()["tower0.0.b"][...] = -1e4
    X = np.random.default_rng(0).standard_normal((8, 3)).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(dk.predict(model, X)[0] == 0)
