"""dselectk against the PyTorch versions of the same models (benchmarks/torch_models.py): with the
same parameters, forward outputs, losses and every gradient agree, and so does an Adam step.

Errors are measured per array as max |ours - torch| / max |torch| (so entries that cancel to
nearly 0 do not blow the ratio up). float64 agrees to ~1e-15. float32 agrees to ~1e-6 for almost
every array; a bias gradient that is a batch sum of terms cancelling one another (b_G with k = 2:
softmax-backward terms sum to 0 over the selectors) is off the float64 value by ~1e-5 on either
side, so in float32 each side is also compared with PyTorch in float64 on the same (float32-valued)
parameters, and ours vs PyTorch float32 gets twice that tolerance. Skipped when PyTorch is not
installed."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dselectk as dk  # noqa: E402
from dselectk import functional as F  # noqa: E402
from dselectk.models import MMoE  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_models.py"
_spec = importlib.util.spec_from_file_location("_dselectk_bench_torch_models", _PATH)
tm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tm)

TOL = {"float32": 2e-5, "float64": 1e-12}
B, P = 48, 10


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _grads(model):
    return {name: model.slab.grad[off:off + int(np.prod(shape))].reshape(shape) for name, shape, off in model.slab.index}


def _torch_gate_grads(gate, params, x, dw):
    """The PyTorch gate with ``params`` copied in: (w, {name: gradient}) of <dw, w> + its regularizer,
    the gradient of x under "x" (x None: a static gate)."""
    with torch.no_grad():
        for name, v in params.items():
            getattr(gate, name).copy_(_t(v))
    xt = None if x is None else _t(x).requires_grad_(True)
    wt = gate(xt)
    obj = (wt * _t(dw)).sum()
    if gate.reg is not None:
        obj = obj + gate.reg
    obj.backward()
    grads = {name: getattr(gate, name).grad.numpy() for name in params}
    if xt is not None:
        grads["x"] = xt.grad.numpy()
    return wt.detach().numpy(), grads


# --- building blocks ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_smooth_step_and_selector(dtype):
    rng = np.random.default_rng(0)
    t = rng.uniform(-1.5, 1.5, 1000).astype(dtype)
    t[:4] = [-0.5, 0.5, -0.25, 0.25]
    for gamma in (1.0, 0.5, 2.0):
        assert rel_err(F.smooth_step(t, gamma), tm.smooth_step(_t(t), gamma).numpy()) < TOL[dtype]
    for n in (2, 5, 8, 13):
        m = F.n_bits(n)
        s = rng.uniform(0, 1, (7, m)).astype(dtype)
        s[0] = (rng.random(m) < 0.5)  # binary: one-hot at the expert whose index is the binary number s
        assert rel_err(F.selector(s, n), tm.selector(_t(s), n).numpy()) < TOL[dtype]
        j = int(sum(int(b) << i for i, b in enumerate(s[0])))  # s[..., 0] is the least significant bit
        if j < n:
            assert tm.selector(_t(s[0]), n).numpy().argmax() == j


def test_top_k_ties_go_to_the_lower_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0], [0, 0, 0, 0, 0, 0]], np.float32)
    for k in (1, 2, 3, 4):
        ours = F.top_k(logits, k)
        theirs = tm.keep_top_k_softmax(_t(logits), k).numpy()
        np.testing.assert_array_equal(ours != 0, theirs != 0)
        assert rel_err(ours, theirs) < 1e-6


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n, lam, xi", [(8, 0.1, 0.0), (6, 0.1, 0.5), (13, 0.0, 1.0)])
def test_per_example_gate_forward_backward(dtype, n, lam, xi):
    """What bench_vs_torch.py times as 'gate only': forward, then the gradients of
    <dw, w> + lambda * Omega (+ xi * penalty) for x and every parameter."""
    rng = np.random.default_rng(n)
    k, gamma, m = 3, 1.0, F.n_bits(n)
    x = rng.standard_normal((B, P)).astype(dtype)
    G = rng.uniform(-0.3, 0.3, (k, P)).astype(dtype)
    b_G = rng.uniform(-0.3, 0.3, k).astype(dtype)
    W = rng.uniform(-0.4, 0.4, (k, m, P)).astype(dtype)
    b_W = rng.uniform(-0.5, 0.5, (k, m)).astype(dtype)
    dw = rng.standard_normal((B, n)).astype(dtype)
    w, cache = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n, gamma)
    xi_eff = 0.0 if (1 << m) == n else xi
    grads = F.dselect_k_per_example_backward(dw, cache, lam=lam, xi=xi_eff)
    sz = cache.gate.sz
    assert 0 < np.mean((sz == 0) | (sz == 1)) < 1  # both binary and fractional entries of S(Z)

    gate = tm.DSelectKGate(n, k, gamma, entropy_reg=lam, xi=xi, per_example=True, input_dim=P,
                           dtype=tm.TORCH_DTYPES[dtype])
    wt, tgrads = _torch_gate_grads(gate, dict(G=G, b_G=b_G, W=W, b_W=b_W), x, dw)
    assert rel_err(w, wt) < TOL[dtype]
    for name in ("x", "G", "b_G", "W", "b_W"):
        assert rel_err(grads[name], tgrads[name]) < TOL[dtype], name
    omega, penalty = F.dselect_k_regularization(cache.gate)
    reg = lam * omega + xi_eff * penalty
    assert abs(reg - (gate.reg.item() if gate.reg is not None else 0.0)) <= TOL[dtype] * max(abs(reg), 1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n, k, lam", [(2, 1, 0.0), (6, 2, 0.1), (16, 2, 0.1), (9, 4, 0.5)])
def test_comet_gate_forward_backward(dtype, n, k, lam):
    """What bench_vs_torch.py times as the COMET gate: per example (gradients for x and every map)
    and static, with some saturated nodes (reach exactly 0 below them)."""
    rng = np.random.default_rng(100 + n)
    gamma = 1.0
    x = rng.standard_normal((B, P)).astype(dtype)
    U, b_U = rng.standard_normal((k, n, P)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    W = rng.uniform(-0.1, 0.1, (k, n - 1, P)).astype(dtype)
    b_W = rng.uniform(-0.8, 0.8, (k, n - 1)).astype(dtype)
    dw = rng.standard_normal((B, n)).astype(dtype)
    w, cache = F.comet_per_example_forward(x, U, b_U, W, b_W, gamma)
    grads = F.comet_per_example_backward(dw, cache, lam=lam)
    sz = cache.gate.sz
    assert 0 < np.mean((sz == 0) | (sz == 1)) < 1  # saturated and fractional nodes
    gate = tm.CometGate(n, k, gamma, entropy_reg=lam, per_example=True, input_dim=P, dtype=tm.TORCH_DTYPES[dtype])
    wt, tgrads = _torch_gate_grads(gate, dict(U=U, b_U=b_U, W=W, b_W=b_W), x, dw)
    assert rel_err(w, wt) < TOL[dtype]
    for name in ("x", "U", "b_U", "W", "b_W"):
        assert rel_err(grads[name], tgrads[name]) < TOL[dtype], name
    if lam:
        reg = lam * F.comet_regularization(cache.gate)
        assert abs(reg - gate.reg.item()) <= TOL[dtype] * max(abs(reg), 1)
    # the static gate
    A, Z = rng.standard_normal((k, n)).astype(dtype), rng.uniform(-0.8, 0.8, (k, n - 1)).astype(dtype)
    ws, cs = F.comet_forward(A, Z, gamma)
    dA, dZ = F.comet_backward(dw[0], cs, lam=lam)
    static = tm.CometGate(n, k, gamma, entropy_reg=lam, dtype=tm.TORCH_DTYPES[dtype])
    wst, tgrads = _torch_gate_grads(static, dict(A=A, Z=Z), None, dw[0])
    assert rel_err(ws, wst) < TOL[dtype]
    assert rel_err(dA, tgrads["A"]) < TOL[dtype] and rel_err(dZ, tgrads["Z"]) < TOL[dtype]


# --- whole models ------------------------------------------------------------------------------

GATES = {
    "dselect_k_per_example": dict(gate="dselect_k", per_example=True, k=2, entropy_reg=0.1),
    "dselect_k_per_example_n6_xi": dict(gate="dselect_k", per_example=True, k=2, entropy_reg=0.1, xi=0.5,
                                        n_experts=6),
    "dselect_k_static": dict(gate="dselect_k", per_example=False, k=2, entropy_reg=0.1),
    "dselect_k_static_n6_xi": dict(gate="dselect_k", per_example=False, k=3, entropy_reg=0.2, xi=0.5, n_experts=6),
    "dselect_k_static_unused_experts": dict(gate="dselect_k", per_example=False, k=2, entropy_reg=0.1),
    "top_k_per_example": dict(gate="top_k", per_example=True, k=2),
    "top_k_static": dict(gate="top_k", per_example=False, k=3),
    "top_k_static_fresh_ties": dict(gate="top_k", per_example=False, k=2),
}


def _model_and_data(case, dtype, seed=0):
    cfg = dict(GATES[case])
    n = cfg.pop("n_experts", 8)
    model = MMoE(P, n_tasks=2, n_experts=n, expert_units=(16,), tower_units=(8,), task_losses=["mse", "bce"],
                 task_weights=[0.7, 0.4], seed=seed, dtype=dtype, **cfg)
    rng = np.random.default_rng(seed + 1)
    params = model.parameters()
    if case.startswith("dselect_k"):
        # spread Z over the smooth-step's fractional region and beyond it (binary entries)
        for name, v in params.items():
            if name.startswith("gate"):
                v[...] = rng.uniform(-1, 1, v.shape) * (0.4 if name.endswith(".W") else 1)
    if case == "dselect_k_static_unused_experts":
        for t in range(2):  # selector 0 picks expert 5 (0b101), selector 1 has bit 1 = 0: experts 2, 3, 6, 7 unused
            params[f"gate{t}.Z"][...] = [[2.0, -2.0, 2.0], [0.2, -3.0, 0.1 * (t + 1)]]
    if case in ("top_k_per_example", "top_k_static"):
        for name, v in params.items():
            if name.startswith("gate"):
                v[...] = rng.standard_normal(v.shape)
    X = rng.standard_normal((B, P)).astype(dtype)
    Y = [rng.standard_normal((B, 1)).astype(dtype), (rng.random(B) < 0.5).astype(dtype)]
    return model, X, Y


def _run_both(model, X, Y):
    tmodel = tm.from_dselectk(model)
    model.zero_grad()
    outs = model.forward(X, training=True)
    total, per_task, douts = model.loss(outs, Y)
    model.backward(douts)
    touts = tmodel(_t(X))
    ttotal, tper_task = tmodel.loss(touts, [_t(y) for y in Y])
    ttotal.backward()
    return tmodel, (outs, total, per_task), (touts, ttotal, tper_task)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(GATES))
def test_mmoe_outputs_losses_and_every_gradient(case, dtype):
    model, X, Y = _model_and_data(case, dtype)
    tmodel, (outs, total, per_task), (touts, ttotal, tper_task) = _run_both(model, X, Y)
    tol = TOL[dtype]
    if case.startswith("dselect_k"):
        fractions = [g.binary_fraction() for g in model.gates]
        assert all(0 < f < 1 for f in fractions), fractions  # the test sees both kinds of S(Z) entries
        assert model.regularization() > 0
    if case == "dselect_k_static_unused_experts":
        assert list(model._cache[2]) == [0, 1, 4, 5]  # the static fast path ran only the used experts
    if case == "top_k_static_fresh_ties":
        assert [list(g.selected_experts()) for g in model.gates] == [[0, 1], [0, 1]]
    for o, to in zip(outs, touts):
        assert rel_err(o, to.detach().numpy()) < tol
    for L, tL in zip(per_task, tper_task):
        assert abs(L - tL.item()) <= tol * abs(tL.item())
    assert abs(total - ttotal.item()) <= tol * abs(ttotal.item())
    grads = _grads(model)
    assert set(grads) == set(tmodel.dsk_params)
    refs = {"torch": tmodel}
    if dtype == "float32":  # PyTorch in float64 on the same parameters: what float32 should approach
        refs["torch float64"] = t64 = tm.from_dselectk(model, dtype="float64")
        t64.loss(t64(_t(X.astype(np.float64))), [_t(y.astype(np.float64)) for y in Y])[0].backward()
    for ref, tol_ref in ((refs["torch"], 2 * tol if dtype == "float32" else tol), (refs.get("torch float64"), tol)):
        if ref is None:
            continue
        errors = {}
        for name, g in grads.items():
            tg = ref.dsk_params[name].grad
            errors[name] = rel_err(g, np.zeros(g.shape) if tg is None else tg.numpy())
        worst = max(errors, key=errors.get)
        assert errors[worst] < tol_ref, (worst, errors[worst])


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("case", ["dselect_k_per_example", "dselect_k_static_n6_xi", "top_k_per_example"])
def test_one_adam_step_float64(case, fused):
    """Each side steps with its own gradients: the parameters after one Adam step agree."""
    model, X, Y = _model_and_data(case, "float64")
    tmodel, _, _ = _run_both(model, X, Y)
    opt = dk.optim.Adam(model.slab.data, model.slab.grad, lr=1e-2, weight_decay=1e-3)
    topt = tm.make_adam(tmodel, lr=1e-2, weight_decay=1e-3, fused=fused)
    before = model.slab.data.copy()
    opt.step()
    topt.step()
    assert np.abs(model.slab.data - before).max() > 1e-3  # the step moved the parameters
    for name, p in model.parameters().items():
        assert np.abs(p - tmodel.dsk_params[name].detach().numpy()).max() < 1e-12, name


@pytest.mark.parametrize("fused", [None, False])
def test_adam_steps_float32_same_gradients(fused):
    """Three Adam steps (weight decay on) fed the same gradients give the same parameters in float32."""
    model, X, Y = _model_and_data("dselect_k_per_example", "float32")
    tmodel = tm.from_dselectk(model)
    opt = dk.optim.Adam(model.slab.data, model.slab.grad, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-2)
    topt = tm.make_adam(tmodel, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-2, fused=fused)
    rng = np.random.default_rng(5)
    for _ in range(3):
        model.slab.grad[...] = rng.standard_normal(model.slab.grad.shape).astype(np.float32)
        for name, g in _grads(model).items():
            tmodel.dsk_params[name].grad = _t(g.copy())
        opt.step()
        topt.step()
    for name, p in model.parameters().items():
        assert np.abs(p - tmodel.dsk_params[name].detach().numpy()).max() < 1e-6, name
