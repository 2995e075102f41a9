"""Gate objects: gradients of forward + regularizer by finite differences, diagnostics,
initialization, constructor errors, and the demo's claim."""
import numpy as np
import pytest

import dselectk as dk
from dselectk import functional as F
import reference as ref


def _objective(gate, x, dw):
    """<dw, w> + the gate's regularizer: the scalar whose gradient backward() accumulates."""
    w = gate.forward(x)
    return float(np.sum(w * dw)) + gate.regularization()


def _check_gate_gradients(gate, x, rng, max_entries=30):
    dw = rng.standard_normal(gate.forward(x).shape)
    gate.zero_grad()
    gate.forward(x)
    dx = gate.backward(dw)
    for name, param in gate.params.items():
        num = ref.numerical_gradient(lambda: _objective(gate, x, dw), param, h=1e-6) if param.size <= max_entries \
            else None
        if num is None:  # spot-check a random subset of a large parameter
            flat = param.reshape(-1)
            idx = rng.choice(flat.size, max_entries, replace=False)
            for i in idx:
                old = flat[i]
                flat[i] = old + 1e-6
                fp = _objective(gate, x, dw)
                flat[i] = old - 1e-6
                fm = _objective(gate, x, dw)
                flat[i] = old
                g = (fp - fm) / 2e-6
                assert abs(gate.grads[name].reshape(-1)[i] - g) <= 1e-6 * max(1, abs(g)), name
        else:
            np.testing.assert_allclose(gate.grads[name], num, rtol=1e-6, atol=1e-6, err_msg=name)
    if x is not None:
        num = ref.numerical_gradient(lambda: _objective(gate, x, dw), x, h=1e-6)
        np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-6, err_msg="x")
    else:
        assert dx is None


def _spread_Z(gate, rng):
    """Move the DSelect-k logits well into the fractional region (the init is tiny), so the
    finite differences see every term; stay a margin away from +-gamma/2."""
    g = gate.gamma
    if gate.per_example:
        gate.params["W"][:] = rng.uniform(-g / 8, g / 8, gate.params["W"].shape)
        gate.params["b_W"][:] = rng.uniform(-g / 8, g / 8, gate.params["b_W"].shape)
        gate.params["G"][:] = rng.standard_normal(gate.params["G"].shape)
    else:
        gate.params["Z"][:] = rng.uniform(-0.45 * g, 0.45 * g, gate.params["Z"].shape)
        gate.params["alpha"][:] = rng.standard_normal(gate.params["alpha"].shape)


@pytest.mark.parametrize("n,k", [(2, 1), (3, 2), (5, 2), (7, 4), (8, 4), (16, 2)])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 10.0])
def test_dselect_k_static_gate_gradients(n, k, gamma):
    rng = np.random.default_rng(n * 100 + k)
    gate = dk.DSelectKGate(n, k, gamma=gamma, entropy_reg=0.3, xi=0.7, seed=1, dtype=np.float64)
    _spread_Z(gate, rng)
    _check_gate_gradients(gate, None, rng)


@pytest.mark.parametrize("n,k,B", [(3, 2, 1), (4, 1, 7), (5, 4, 16), (8, 2, 33)])
def test_dselect_k_per_example_gate_gradients(n, k, B):
    rng = np.random.default_rng(B)
    gate = dk.DSelectKGate(n, k, gamma=2.0, entropy_reg=0.2, xi=0.5, per_example=True, input_dim=3, seed=2,
                           dtype=np.float64)
    _spread_Z(gate, rng)
    x = rng.standard_normal((B, 3))
    _check_gate_gradients(gate, x, rng)


@pytest.mark.parametrize("per_example,noisy", [(False, False), (True, False), (True, True)])
def test_topk_gate_gradients(per_example, noisy):
    rng = np.random.default_rng(3)
    gate = dk.TopKGate(8, 3, per_example=per_example, input_dim=4 if per_example else None, noisy=noisy, seed=5,
                     dtype=np.float64)
    for v in gate.params.values():
        v[:] = rng.standard_normal(v.shape)  # distinct logits, far from ties
    x = rng.standard_normal((6, 4)) if per_example else None
    if noisy:  # the noise must be the same draw in every evaluation of the objective
        state = gate._rng.bit_generator.state
        orig_forward = gate.forward

        def forward(x=None):
            gate._rng.bit_generator.state = state
            return orig_forward(x)
        gate.forward = forward
    _check_gate_gradients(gate, x, rng)


@pytest.mark.parametrize("per_example", [False, True])
def test_softmax_gate_gradients(per_example):
    rng = np.random.default_rng(4)
    gate = dk.SoftmaxGate(6, per_example=per_example, input_dim=3 if per_example else None, seed=0, dtype=np.float64)
    for v in gate.params.values():
        v[:] = rng.standard_normal(v.shape)
    _check_gate_gradients(gate, rng.standard_normal((5, 3)) if per_example else None, rng)


@pytest.mark.parametrize("T", [0.3, 1.0, 5.0])
def test_softmax_selector_gate_gradients(T):
    rng = np.random.default_rng(5)
    gate = dk.SoftmaxSelectorGate(8, 3, temperature=T, entropy_reg=0.4, seed=0, dtype=np.float64)
    for v in gate.params.values():
        v[:] = rng.standard_normal(v.shape)
    _check_gate_gradients(gate, None, rng)


def test_gate_forward_matches_reference():
    rng = np.random.default_rng(6)
    gate = dk.DSelectKGate(16, 4, gamma=1.0, per_example=True, input_dim=5, seed=3, dtype=np.float64)
    _spread_Z(gate, rng)
    x = rng.standard_normal((9, 5))
    p = gate.params
    np.testing.assert_allclose(gate.forward(x), ref.dselect_k_per_example(x, p["G"], p["b_G"], p["W"], p["b_W"], 16, 1.0),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1025, 2048])
def test_large_n_backward_uses_prefix_path_correctly(n):
    """m > 10 takes the prefix/suffix form of the selector backward instead of the tree."""
    rng = np.random.default_rng(n)
    m = F.n_bits(n)
    alpha, Z = rng.standard_normal(2), rng.uniform(-0.4, 0.4, (2, m))
    dw = rng.standard_normal(n)
    w, cache = F.dselect_k_forward(alpha, Z, n, 1.0)
    _, dZ = F.dselect_k_backward(dw, cache, lam=0.2, xi=0.3)

    def objective():
        w, omega, pen = ref.dselect_k_objective_terms(alpha, Z, n, 1.0)
        return float(np.sum(w * dw)) + 0.2 * omega + 0.3 * pen
    np.testing.assert_allclose(dZ, ref.numerical_gradient(objective, Z), rtol=1e-6, atol=1e-6)


def test_initialization_ranges():
    for gamma in (0.5, 1.0, 10.0):
        gate = dk.DSelectKGate(32, 4, gamma=gamma, seed=0)
        assert np.all(np.abs(gate.params["Z"]) < gamma / 100)
        assert np.all(np.abs(gate.params["alpha"]) < 0.05)
        gate.forward()
        sz = gate._gate_cache().sz
        assert np.all((sz > 0) & (sz < 1)), "0 < S(Z) < 1 at the start, so every Z_ij is trainable"
        pe = dk.DSelectKGate(8, 2, gamma=gamma, per_example=True, input_dim=7, seed=0)
        assert np.all(np.abs(pe.params["W"]) < gamma / 100) and np.all(np.abs(pe.params["b_W"]) < gamma / 100)
        assert np.all(np.abs(pe.params["G"]) < 0.05) and np.all(np.abs(pe.params["b_G"]) < 0.05)
    a = dk.DSelectKGate(8, 2, seed=7).params["Z"]
    assert np.array_equal(a, dk.DSelectKGate(8, 2, seed=7).params["Z"]), "seeded init is reproducible"
    assert dk.DSelectKGate(8, 2, dtype=np.float64).forward().dtype == np.float64


def test_diagnostics_follow_binary_Z():
    gate = dk.DSelectKGate(8, 2, gamma=1.0, seed=0)
    gate.forward()
    assert not gate.is_binary() and gate.binary_fraction() == 0.0
    assert gate.selected_experts().tolist() == list(range(8))
    gate.params["Z"][:] = [[1, -1, 1], [-1, 1, 1]]  # codes 0b101 = 5 and 0b110 = 6
    gate.forward()
    assert gate.is_binary() and gate.binary_fraction() == 1.0
    assert gate.selected_experts().tolist() == [5, 6]
    assert gate.num_selected() == 2.0
    r = gate.selector_outputs()
    assert r.shape == (2, 8) and r[0, 5] == 1 and r[1, 6] == 1


def test_per_example_selected_experts_and_counts():
    gate = dk.DSelectKGate(4, 1, gamma=1.0, per_example=True, input_dim=1, seed=0, dtype=np.float64)
    gate.params["W"][:] = 0
    gate.params["b_W"][:] = 0
    gate.params["W"][0, 0, 0] = 10.0  # bit 0 follows the sign of x
    gate.params["b_W"][0, 1] = -10.0  # bit 1 always off
    w = gate.forward(np.array([[1.0], [-1.0], [2.0]]))
    assert np.array_equal(w, np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], float))
    assert gate.is_binary() and gate.selected_experts().tolist() == [0, 1] and gate.num_selected() == 1.0


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(n_experts=1, k=1), ValueError, "n_experts"),
    (dict(n_experts=4, k=0), ValueError, "k"),
    (dict(n_experts=4, k=5), ValueError, "k must satisfy"),
    (dict(n_experts=4, k=2, gamma=0), ValueError, "gamma"),
    (dict(n_experts=4, k=2, gamma=-1), ValueError, "gamma"),
    (dict(n_experts=4, k=2, entropy_reg=-0.1), ValueError, "entropy_reg"),
    (dict(n_experts=4, k=2, xi=float("nan")), ValueError, "xi"),
    (dict(n_experts=4, k=2, per_example=True), ValueError, "input_dim"),
    (dict(n_experts=4, k=2, dtype=np.int32), TypeError, "dtype"),
    (dict(n_experts=4.0, k=2), TypeError, "n_experts"),
])
def test_dselect_k_gate_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dk.DSelectKGate(**kwargs)


def test_gate_call_errors():
    gate = dk.DSelectKGate(4, 2, per_example=True, input_dim=3, dtype=np.float64)
    with pytest.raises(RuntimeError, match="before forward"):
        gate.backward(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="needs its input x"):
        gate.forward()
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        gate.forward(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="float64"):
        gate.forward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        gate.forward(np.zeros((0, 3)))
    gate.forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="dw"):
        gate.backward(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="noisy"):
        dk.TopKGate(4, 2, noisy=True)
    with pytest.raises(ValueError, match="temperature"):
        dk.SoftmaxSelectorGate(4, 2, temperature=0)


def test_annealed_temperature_schedule():
    T = [dk.SoftmaxSelectorGate.annealed_temperature(s, 5, 1e-2, 1e-16) for s in range(5)]
    assert T[0] == pytest.approx(1e-2) and T[-1] == pytest.approx(1e-16)
    np.testing.assert_allclose(np.diff(np.log10(T)), -3.5)


def test_threads_knob_and_build_info():
    info = dk.build_info()
    assert set(info) >= {"openmp", "blas", "num_threads", "blas_num_threads"}
    assert "openblas" in info["blas"]
    old = dk.get_num_threads()
    try:
        dk.set_num_threads(1)
        assert dk.get_num_threads() == 1 and dk.build_info()["blas_num_threads"] == 1
    finally:
        dk.set_num_threads(old)
    with pytest.raises(ValueError):
        dk.set_num_threads(0)
    with pytest.raises(TypeError):
        dk.set_num_threads(1.5)


def test_demo_recovers_the_true_experts():
    from dselectk.demo import run

    lines = []
    results = run(out=lines.append)
    for name in ("DSelect-k", "Top-k"):
        assert results[name]["selected"] == [3, 11], (name, lines)
    assert results["DSelect-k"]["binary_step"] is not None, "S(Z) should become binary within the demo"
    assert results["DSelect-k"]["loss"] < 1e-3
