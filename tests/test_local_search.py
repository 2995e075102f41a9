"""Permutation local search (dselectk.local_search): the spec, the slot permutations and their
gradients, whole-model finite differences in the soft phase, hardening (a permutation, recorded,
frozen), recovery of a planted permutation, save/load before and after hardening, conditional
computation after hardening."""
import itertools
import sys

import numpy as np
import pytest

import dselectk as dk
import reference as ref
from dselectk import functional as F
from dselectk import local_search as L
from dselectk import models as Mo
from dselectk import inputs as I
from fd import check_entries, spread_gates

pytest.importorskip("scipy")

# a soft phase with moderate temperatures, for finite differences (the authors' tau of 1e-3 to
# 1e-7 makes P nearly hard: its gradients are real but tiny)
SOFT = dict(tau_start=0.5, tau_end=0.5, iters_start=8, iters_end=8)


def _data(rng, N, p, n_tasks=2):
    X = rng.standard_normal((N, p))
    return X, [rng.standard_normal(N) for _ in range(n_tasks)]


# --------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------

def test_spec_validation_and_config_round_trip():
    spec = L.LocalSearch(steps=100, shared=True)
    assert L.LocalSearch.from_config(spec.to_config()) == spec
    assert L.LocalSearch.resolve(dict(epochs=2.5)).soft_steps(40) == 100
    assert L.LocalSearch.resolve(None) is None and L.LocalSearch.resolve(spec) is spec
    assert L.LocalSearch(epochs=0.001).soft_steps(10) == 1
    assert L.LocalSearch(epochs=3).soft_steps() is None
    for bad, exc, match in [
            (dict(), ValueError, "exactly one of steps"), (dict(steps=5, epochs=1), ValueError, "exactly one"),
            (dict(steps=0), ValueError, "steps"), (dict(steps=2.5), TypeError, "steps"),
            (dict(epochs=0), ValueError, "epochs"), (dict(epochs=-1.0), ValueError, "epochs"),
            (dict(steps=5, shared=1), TypeError, "shared"), (dict(steps=5, tau_start=0), ValueError, "tau_start"),
            (dict(steps=5, tau_end=float("nan")), ValueError, "tau_end"),
            (dict(steps=5, iters_start=0), ValueError, "iters_start"),
            (dict(steps=5, entropy_reg=-1e-4), ValueError, "entropy_reg")]:
        with pytest.raises(exc, match=match):
            L.LocalSearch(**bad)
    with pytest.raises(TypeError, match="unknown options.*'step'"):
        L.LocalSearch.resolve(dict(step=5))
    with pytest.raises(TypeError, match="local_search must be"):
        L.LocalSearch.resolve(5)


def test_schedule_is_the_authors():
    """tau = 10^(-3 - 4 t / T), iterations int(20 + 130 t / T)."""
    spec = L.LocalSearch(steps=200)
    for t in (0, 1, 57, 100, 199):
        tau, iters = spec.schedule(t, 200)
        assert tau == pytest.approx(10 ** (-3 - 4 * t / 200), rel=1e-12)
        assert iters == int(20 + 130 * t / 200)
    assert spec.schedule(10**6, 200) == spec.schedule(199, 200)  # clamped


# --------------------------------------------------------------------------------------------
# Hungarian rounding, and the permutation of slots
# --------------------------------------------------------------------------------------------

def test_hungarian_is_the_best_assignment():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 6):
        P = rng.random((3, n, n))
        perms = L.hungarian(P)
        assert perms.shape == (3, n) and perms.dtype == np.int64
        for k in range(3):
            assert sorted(perms[k]) == list(range(n))
            best = max(itertools.permutations(range(n)), key=lambda p: P[k][np.arange(n), list(p)].sum())
            assert P[k][np.arange(n), perms[k]].sum() == pytest.approx(P[k][np.arange(n), list(best)].sum())
    np.testing.assert_array_equal(L.hungarian(np.eye(4)[[2, 0, 3, 1]]), [2, 0, 3, 1])


def test_missing_scipy_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"dselectk\[search\]"):
        L.hungarian(np.eye(3))


SLOT_CASES = [(static, S, K) for static in (True, False) for S, K in ((1, 1), (3, 1), (3, 3))]


@pytest.mark.parametrize("static,S,K", SLOT_CASES)
def test_permute_slots_finite_differences(static, S, K):
    rng = np.random.default_rng(S * 10 + K + static)
    n = 5
    c = rng.random((S, n) if static else (4, S, n))
    c[..., 1] = 0  # an unused slot
    P = F.sinkhorn(rng.standard_normal((K, n, n)), 0.7, 6)
    dw = rng.standard_normal(c.shape[:-2] + (n,))
    w, cache = L.permute_slots(c, P)
    assert w.shape == dw.shape
    # the total weight of each example is the slots' total
    np.testing.assert_allclose(w.sum(axis=-1), c.sum(axis=(-2, -1)), rtol=1e-12)
    dc, dP = L.permute_slots_backward(dw, cache)
    assert dc.shape == c.shape and dP.shape == P.shape
    obj = lambda: float(np.sum(dw * L.permute_slots(c, P)[0]))  # noqa: E731
    np.testing.assert_allclose(dc, ref.numerical_gradient(obj, c), atol=1e-8)
    np.testing.assert_allclose(dP, ref.numerical_gradient(obj, P), atol=1e-8)


@pytest.mark.parametrize("static,S,K", SLOT_CASES)
def test_remap_is_the_soft_permutation_by_a_permutation_matrix(static, S, K):
    rng = np.random.default_rng(7 + S + K)
    n = 6
    c = rng.random((S, n) if static else (4, S, n))
    perm = np.stack([rng.permutation(n) for _ in range(K)])
    P = np.zeros((K, n, n))
    for k in range(K):
        P[k, np.arange(n), perm[k]] = 1
    w_hard, hcache = L.remap_slots(c, perm)
    w_soft, scache = L.permute_slots(c, P)
    np.testing.assert_allclose(w_hard, w_soft, rtol=1e-14)
    dw = rng.standard_normal(w_hard.shape)
    np.testing.assert_allclose(L.remap_slots_backward(dw, hcache), L.permute_slots_backward(dw, scache)[0],
                               rtol=1e-12, atol=1e-14)
    # one slot per permutation: the weights are moved, never mixed
    if S == 1:
        np.testing.assert_array_equal(np.sort(w_hard, axis=-1), np.sort(c[..., 0, :], axis=-1))


# --------------------------------------------------------------------------------------------
# models: whole-model finite differences in the soft phase
# --------------------------------------------------------------------------------------------

MODEL_GATES = [
    dict(gate="dselect_k", k=2, gamma=1.0, entropy_reg=0.3),
    dict(gate="dselect_k", k=3, gamma=2.0, entropy_reg=0.1, xi=0.5, per_example=True),
    dict(gate="top_k", k=2),
    dict(gate="top_k", k=2, per_example=True),
    dict(gate="comet", k=2, gamma=1.0, entropy_reg=0.2),
    dict(gate="comet", k=3, gamma=1.0, entropy_reg=0.1, per_example=True),
]


def _spread(model, rng):
    spread_gates(model, rng)
    for p in model.permutations:
        p.params["log_alpha"][...] = rng.standard_normal(p.params["log_alpha"].shape)


@pytest.mark.parametrize("shared", [False, True], ids=["per_gate", "shared"])
@pytest.mark.parametrize("gate_kwargs", MODEL_GATES,
                         ids=lambda kw: kw["gate"] + ("_pe" if kw.get("per_example") else ""))
def test_whole_model_gradient_in_the_soft_phase(gate_kwargs, shared):
    """The gradient of the whole objective (losses, the gates' regularizers and local search's
    entropy term, with entropy_reg large enough to matter) against central differences, on every
    gate and permutation parameter and a sample of the others."""
    rng = np.random.default_rng(3)
    model = Mo.MMoE(4, n_tasks=2, n_experts=6, expert_units=(5,), tower_units=(3,), task_losses=["mse", "bce"],
                    dtype="float64", seed=2, local_search=dict(steps=50, shared=shared, entropy_reg=0.05, **SOFT),
                    **gate_kwargs)
    _spread(model, rng)
    X = rng.standard_normal((9, 4))
    Y = I.check_Y(model, [rng.standard_normal(9), (rng.random(9) < 0.5).astype(float)], 9)
    model.local_search_step(3)

    def objective():
        return model.loss(model.forward(X, training=True), Y)[0]

    model.zero_grad()
    _, _, douts = model.loss(model.forward(X, training=True), Y)
    model.backward(douts)
    assert model.regularization() > 0 and all(not p.is_hard for p in model.permutations)
    grad = model.slab.grad.copy()
    names = [(name, off, int(np.prod(shape))) for name, shape, off in model.slab.index]
    must = [off + i for name, off, size in names if name.startswith(("gate", "perm")) for i in range(size)]
    assert any(name.endswith("log_alpha") for name, _, _ in names)
    idx = np.unique(np.concatenate([rng.choice(len(model.slab), 40, replace=False), must]))
    check_entries(objective, model.slab.data, grad, idx, context=model.slab.index)


# --------------------------------------------------------------------------------------------
# hardening
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate_kwargs", MODEL_GATES,
                         ids=lambda kw: kw["gate"] + ("_pe" if kw.get("per_example") else ""))
def test_hardening_gives_permutations_recorded_and_frozen(gate_kwargs):
    rng = np.random.default_rng(4)
    X, Y = _data(rng, 256, 5)
    X = X.astype(np.float32)
    model = Mo.MMoE(5, n_tasks=2, n_experts=8, expert_units=(4,), tower_units=(3,), seed=1,
                    local_search=dict(steps=10), **gate_kwargs)
    assert all(g.permutation is None for g in model.gates)
    history = dk.fit(model, X, Y, epochs=2, batch_size=32, verbose=0)  # 16 steps
    assert [r["step"] for r in history.permutations] == [10, 10]
    assert [r["name"] for r in history.permutations] == ["gate0.perm", "gate1.perm"]
    K = gate_kwargs["k"] if gate_kwargs["gate"] in ("dselect_k", "comet") else 1
    for g, record in zip(model.gates, history.permutations):
        perm = g.permutation
        assert perm.shape == ((K, 8) if K > 1 else (8,)) and perm.dtype == np.int64
        for row in np.atleast_2d(perm):
            assert sorted(row.tolist()) == list(range(8))
        np.testing.assert_array_equal(np.atleast_2d(perm), record["permutation"])
    # frozen from then on: more training leaves log_alpha and the permutations alone
    log_alpha = [p.params["log_alpha"].copy() for p in model.permutations]
    dk.fit(model, X, Y, epochs=1, batch_size=32, verbose=0)
    for p, before in zip(model.permutations, log_alpha):
        np.testing.assert_array_equal(p.params["log_alpha"], before)
    # the hard weights are the gate's own weights moved by the permutation
    model.forward(X[:8])
    for g in model.gates:
        c = g.inner.forward_slots(X[:8] if g.per_example else None)
        want = L.remap_slots(c, np.atleast_2d(g.permutation))[0]
        np.testing.assert_array_equal(g.expert_weights(), want)


def test_shared_permutation_serves_every_gate():
    rng = np.random.default_rng(5)
    X, Y = _data(rng, 128, 5, n_tasks=3)
    model = Mo.MMoE(5, n_tasks=3, n_experts=4, expert_units=(3,), gate="top_k", k=1, seed=0,
                    local_search=dict(steps=3, shared=True))
    assert len(model.permutations) == 1 and [n for n, _, _ in model.slab.index if "perm" in n] == ["perm.log_alpha"]
    history = dk.fit(model, X, Y, epochs=1, batch_size=32, verbose=0)
    assert len(history.permutations) == 1 and history.permutations[0]["name"] == "perm"
    perms = [g.permutation for g in model.gates]
    assert all(np.array_equal(p, perms[0]) for p in perms)


def test_epochs_are_converted_with_the_steps_per_epoch():
    rng = np.random.default_rng(6)
    X, Y = _data(rng, 100, 5)
    model = Mo.MMoE(5, n_tasks=2, n_experts=4, expert_units=(3,), gate="top_k", k=1, local_search=dict(epochs=1.5))
    with pytest.raises(RuntimeError, match="steps per epoch"):
        model.forward(X, training=True)
    history = dk.fit(model, X, Y, epochs=3, batch_size=20, verbose=0)  # 5 steps per epoch
    assert {r["step"] for r in history.permutations} == {8}  # round(1.5 * 5) = 8 (banker's rounding of 7.5)


def test_evaluation_in_the_soft_phase_uses_the_hungarian_rounding():
    """As the authors' inference: a forward with training=False before hardening remaps the
    gate's weights by the Hungarian rounding of the soft P, so a binary gate keeps k nonzeros."""
    rng = np.random.default_rng(7)
    model = Mo.MMoE(5, n_tasks=1, n_experts=8, expert_units=(3,), gate="dselect_k", k=2,
                    local_search=dict(steps=100), seed=3)
    model.gates[0].params["Z"][...] = np.array([[0.6, -0.6, 0.6], [-0.6, -0.6, 0.6]])  # binary S(Z)
    X = rng.standard_normal((4, 5)).astype(np.float32)
    model.local_search_step(5)
    model.forward(X, training=True)
    P = model.permutations[0]._P
    assert np.count_nonzero(model.gate_weights()[0]) > 2  # the soft P spreads the weights
    model.forward(X, training=False)
    w = model.gate_weights()[0]
    assert np.count_nonzero(w) <= 2
    np.testing.assert_array_equal(model.permutations[0]._eval_perm, L.hungarian(P))  # no update in between


def test_local_search_needs_a_sparse_gate():
    with pytest.raises(ValueError, match="softmax_selector"):
        Mo.MMoE(5, gate="softmax_selector", k=2, local_search=dict(steps=5))
    with pytest.raises(TypeError, match="local_search"):
        Mo.MMoE(5, local_search=3)


# --------------------------------------------------------------------------------------------
# recovering a planted permutation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_recovers_the_permutation_that_generated_the_data(seed):
    """Targets made by the model itself with its experts permuted by pi: everything but the
    permutation frozen (a per-example Top-1 gate routing inputs to slots, the experts), local
    search (here with tau from 1 to 1e-3: the authors' 1e-3 to 1e-7 starts nearly hard, and from a
    random start then only swaps near-tied slots) learns pi: gate.permutation == pi."""
    n, p, N = 6, 5, 2000
    rng = np.random.default_rng(seed)
    pi = rng.permutation(n)
    model = Mo.MoE(p, n_experts=n, expert_units=(8,), gate="top_k", k=1, per_example=True, seed=seed,
                   dtype="float64", local_search=dict(steps=1000, tau_start=1.0, tau_end=1e-3))
    gate = model.gates[0]
    gate.params["A"][...] = 3 * rng.standard_normal(gate.params["A"].shape)
    X = rng.standard_normal((N, p))
    slot_weights = F.top_k(F.linear(X, gate.params["A"], gate.params["b"]), 1)
    teacher = np.zeros_like(slot_weights)
    teacher[:, pi] = slot_weights  # slot i's weight on expert pi[i]
    f = np.stack([e.forward(X) for e in model.experts])
    y = np.einsum("bn,nbd->b", teacher, f)
    model.freeze("expert", "gate0.A", "gate0.b")
    dk.fit(model, X, [y], epochs=60, batch_size=100, lr=0.05, verbose=0)
    np.testing.assert_array_equal(model.gates[0].permutation, pi)
    np.testing.assert_allclose(model.forward(X)[0][:, 0], y, atol=1e-9)


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate_kwargs", [MODEL_GATES[0], MODEL_GATES[3]], ids=["dselect_k", "top_k_pe"])
def test_save_load_before_and_after_hardening(tmp_path, gate_kwargs):
    rng = np.random.default_rng(8)
    X, Y = _data(rng, 96, 5)
    X = X.astype(np.float32)
    model = Mo.MMoE(5, n_tasks=2, n_experts=8, expert_units=(4,), tower_units=(3,), seed=1,
                    local_search=dict(steps=5), **gate_kwargs)
    dk.fit(model, X, Y, epochs=1, batch_size=32, verbose=0)  # 3 steps: soft
    path = tmp_path / "soft.npz"
    dk.save(model, path)
    loaded = dk.load(path)
    assert loaded.config == model.config and loaded.config["local_search"]["steps"] == 5
    assert [p.state() for p in loaded.permutations] == [p.state() for p in model.permutations]
    assert all(not p.is_hard for p in loaded.permutations)
    for a, b in zip(dk.predict(loaded, X), dk.predict(model, X)):
        np.testing.assert_array_equal(a, b)
    # both harden at step 5 to the same permutations when trained on
    for m in (model, loaded):
        m.local_search_step(5)
    for a, b in zip(model.gates, loaded.gates):
        np.testing.assert_array_equal(a.permutation, b.permutation)
    path = tmp_path / "hard.npz"
    dk.save(model, path)
    loaded = dk.load(path)
    for a, b in zip(model.gates, loaded.gates):
        np.testing.assert_array_equal(a.permutation, b.permutation)
    for a, b in zip(dk.predict(loaded, X), dk.predict(model, X)):
        np.testing.assert_array_equal(a, b)
    assert loaded.frozen_mask is not None and all(
        loaded.frozen_mask[off:off + int(np.prod(shape))].all() for name, shape, off in loaded.slab.index
        if name.endswith("log_alpha"))


def test_format_versions_of_local_search_files(tmp_path):
    """Local search writes format version 5 (with or without hash routing's buffers); a version 4
    file holding a local search state (what this branch wrote before version 4 also meant the
    buffers) still loads, and a version 3 file claiming one is refused, naming the version."""
    import json
    model = Mo.MMoE(None, n_tasks=2, n_experts=4, expert_units=(3,), tower_units=(2,), gate="hash",
                    embeddings=dict(vocab_sizes=[30, 20], dims=3), local_search=dict(steps=5), seed=2)
    model.local_search_step(5)
    ids = np.stack([np.arange(30) % 30, np.arange(30) % 20], axis=1)
    dk.save(model, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        files = {k: z[k] for k in z.files}
    meta = json.loads(str(files["meta"][()]))
    assert meta["version"] == 5 and "buffers" in meta and "local_search" in meta
    for version, ok in ((4, True), (3, False)):
        files["meta"] = np.array(json.dumps(dict(meta, version=version)))
        np.savez(tmp_path / "v.npz", **files)
        if ok:
            loaded = dk.load(tmp_path / "v.npz")
            for a, b in zip(dk.predict(loaded, ids), dk.predict(model, ids)):
                np.testing.assert_array_equal(a, b)
        else:
            with pytest.raises(ValueError, match="format version 3 does not have"):
                dk.load(tmp_path / "v.npz")
    plain = Mo.MMoE(5, n_tasks=1, n_experts=4, expert_units=(3,), gate="top_k", k=1, local_search=dict(steps=5))
    dk.save(plain, tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as z:
        assert json.loads(str(z["meta"][()]))["version"] == 5


def test_load_rejects_a_crafted_local_search_state(tmp_path):
    import json
    model = Mo.MMoE(5, n_tasks=1, n_experts=4, expert_units=(3,), gate="top_k", k=1, local_search=dict(steps=5))
    model.local_search_step(5)
    path = tmp_path / "m.npz"
    dk.save(model, path)
    with np.load(path) as z:
        files = {k: z[k] for k in z.files}
    meta = json.loads(str(files["meta"][()]))
    for bad in ([[0, 0, 1, 2]], [[0, 1, 2]], "x", [[0, 1, 2, 9]]):
        meta["local_search"]["gate0.perm"]["hard"] = bad
        files["meta"] = np.array(json.dumps(meta))
        np.savez(tmp_path / "bad.npz", **files)
        with pytest.raises(ValueError, match="local search state"):
            dk.load(tmp_path / "bad.npz")
    meta["local_search"] = {}
    files["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "bad.npz", **files)
    with pytest.raises(ValueError, match="local search state"):
        dk.load(tmp_path / "bad.npz")


# --------------------------------------------------------------------------------------------
# conditional computation after hardening
# --------------------------------------------------------------------------------------------

def _count_expert_calls(model):
    calls = [0] * len(model.experts)
    for j, e in enumerate(model.experts):
        original = e.forward

        def counted(*args, _j=j, _f=original, **kwargs):
            calls[_j] += 1
            return _f(*args, **kwargs)
        e.forward = counted
    return calls


def test_static_gates_skip_unused_experts_after_hardening():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((64, 5)).astype(np.float32)
    model = Mo.MMoE(5, n_tasks=2, n_experts=8, expert_units=(4,), gate="dselect_k", k=2, seed=0,
                    local_search=dict(steps=1))
    for g in model.gates:  # binary S(Z): each gate uses at most 2 experts
        g.params["Z"][...] = np.where(rng.random(g.params["Z"].shape) < 0.5, 0.6, -0.6)
    model.forward(X, training=True)  # soft phase: P is dense, every expert runs
    assert np.count_nonzero(model.gate_weights().any(axis=0)) == 8
    model.local_search_step(1)
    calls = _count_expert_calls(model)
    outs = model.forward(X, training=True)
    used = model.gate_weights().any(axis=0)
    assert used.sum() <= 4 and calls == used.astype(int).tolist()
    model.backward([np.ones_like(o) for o in outs])  # and the backward runs through the remap
    model.reset_flops()
    model.forward(X, training=True)
    assert model.flops["experts_executed"] == used.sum() / 8 * model.flops["experts_dense"]


def test_per_example_gates_gather_their_rows_after_hardening():
    rng = np.random.default_rng(10)
    X = rng.standard_normal((256, 5)).astype(np.float32)
    model = Mo.MMoE(5, n_tasks=2, n_experts=8, expert_units=(4,), gate="top_k", k=1, per_example=True, seed=0,
                    local_search=dict(steps=1))
    for g in model.gates:
        g.params["A"][...] = 3 * rng.standard_normal(g.params["A"].shape)
    model.local_search_step(1)
    model.reset_flops()
    outs = model.forward(X, training=True)
    rows = model._cache[2]
    assert rows is not None, "the gather/scatter path was not taken"
    ws = np.stack([g.expert_weights() for g in model.gates])
    for j in range(8):
        np.testing.assert_array_equal(rows[j], np.flatnonzero((ws[:, :, j] != 0).any(axis=0)))
    assert model.flops["experts_executed"] < model.flops["experts_dense"]
    model.backward([np.ones_like(o) for o in outs])


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_shared_permutation_of_static_dselect_k_gates_runs_as_one_bank(hard):
    """Static DSelect-k gates with one shared permutation: the batched kernel for all T gates and
    one permutation call, the same values and gradients as the per-gate path."""
    rng = np.random.default_rng(11)
    X = rng.standard_normal((16, 4))
    Y = [rng.standard_normal(16) for _ in range(3)]
    results = []
    for fast in (True, False):
        model = Mo.MMoE(4, n_tasks=3, n_experts=8, expert_units=(3,), tower_units=(2,), dtype="float64", seed=4,
                        gate="dselect_k", k=2, entropy_reg=0.2,
                        local_search=dict(steps=4, shared=True, entropy_reg=0.05, **SOFT))
        assert model._bank is not None
        model.static_fast_path = fast
        model.local_search_step(4 if hard else 1)
        model.zero_grad()
        outs = model.forward(X, training=True)
        total, _, douts = model.loss(outs, Y)
        model.backward(douts)
        results.append((total, [o.copy() for o in outs], model.slab.grad.copy(), model.gate_weights()))
    (t1, o1, g1, w1), (t2, o2, g2, w2) = results
    assert t1 == pytest.approx(t2, rel=1e-12)
    np.testing.assert_allclose(w1, w2, rtol=1e-12, atol=1e-15)
    for a, b in zip(o1, o2):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# the trainer: resume across the hardening, early stopping before it
# --------------------------------------------------------------------------------------------

def _ls_model(**ls):
    return Mo.MMoE(5, n_tasks=2, n_experts=8, expert_units=(4,), tower_units=(3,), gate="dselect_k", k=2,
                   entropy_reg=0.1, seed=3, local_search=dict(steps=10, **ls))


def test_resume_across_the_hardening_is_the_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(12)
    X, Y = _data(rng, 96, 5)
    X = X.astype(np.float32)
    full = _ls_model()
    h_full = dk.fit(full, X, Y, epochs=5, batch_size=16, verbose=0)  # 6 steps per epoch: hardens in epoch 2
    first = _ls_model()
    dk.fit(first, X, Y, epochs=1, batch_size=16, verbose=0, callbacks=[dk.callbacks.ModelCheckpoint(tmp_path / "c.npz")])
    resumed = _ls_model()
    h_resumed = dk.fit(resumed, X, Y, epochs=5, batch_size=16, verbose=0, resume_from=tmp_path / "c.npz")
    np.testing.assert_array_equal(resumed.slab.data, full.slab.data)
    assert [(r["name"], r["step"]) for r in h_resumed.permutations] == [(r["name"], r["step"])
                                                                       for r in h_full.permutations]
    for a, b in zip(h_resumed.permutations, h_full.permutations):
        np.testing.assert_array_equal(a["permutation"], b["permutation"])
    # and a checkpoint written after the hardening carries the records and the frozen permutations
    late = _ls_model()
    dk.fit(late, X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[dk.callbacks.ModelCheckpoint(tmp_path / "d.npz")])
    again = _ls_model()
    h_again = dk.fit(again, X, Y, epochs=5, batch_size=16, verbose=0, resume_from=tmp_path / "d.npz")
    np.testing.assert_array_equal(again.slab.data, full.slab.data)
    assert [r["step"] for r in h_again.permutations] == [10, 10]


def test_early_stopping_restores_the_permutations_of_the_best_epoch():
    """Best weights from before the hardening: the permutations go back to their soft state of that
    epoch (and log_alpha becomes trainable again), so the model is the one that was validated."""
    rng = np.random.default_rng(13)
    X, Y = _data(rng, 96, 5)
    X = X.astype(np.float32)
    model = _ls_model()
    states = []

    class Record(dk.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            states.append(self.model.local_search_state())

    # mode="max" makes the worst validation loss the best: the first epoch, before the hardening
    stop = dk.callbacks.EarlyStopping(monitor="val_loss", mode="max", patience=10, restore_best_weights=True)
    dk.fit(model, X, Y, epochs=4, batch_size=16, verbose=0, validation_data=(X, Y), callbacks=[Record(), stop])
    assert stop.best_epoch == 1 and states[-1]["gate0.perm"]["hard"] is not None
    assert model.local_search_state() == states[0] and all(p.hard is None for p in model.permutations)
    for name, shape, off in model.slab.index:
        if name.endswith("log_alpha"):
            assert not model.frozen_mask[off:off + int(np.prod(shape))].any()
    dk.evaluate(model, X, Y)  # the Hungarian rounding of the restored soft permutations


@pytest.mark.parametrize("gate_kwargs", [MODEL_GATES[0], MODEL_GATES[2], MODEL_GATES[3]],
                         ids=["dselect_k", "top_k", "top_k_pe"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_onnx_export_of_permuted_gates_matches_predict(tmp_path, gate_kwargs, hard):
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(14)
    model = Mo.MMoE(5, n_tasks=2, n_experts=8, expert_units=(4,), tower_units=(3,), seed=2,
                    local_search=dict(steps=3, per_selector=False), **gate_kwargs)
    _spread(model, rng)
    model.local_search_step(3 if hard else 1)
    X = rng.standard_normal((17, 5)).astype(np.float32)
    proto = dk.export_onnx(model, tmp_path / "m.onnx")
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": X})
    for g, w in zip(got, dk.predict(model, X)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_hash_routing_with_local_search_remaps_its_buckets():
    """Hash routing has nothing to learn but the permutation: after hardening each id goes to
    expert permutation[assignment[id]], and the weights stay one-hot."""
    rng = np.random.default_rng(15)
    ids = np.stack([rng.integers(0, 30, 200), rng.integers(0, 20, 200)], axis=1)
    Y = [rng.standard_normal(200)]
    model = Mo.MMoE(None, n_tasks=1, n_experts=4, expert_units=(3,), tower_units=(2,), gate="hash",
                    embeddings=dict(vocab_sizes=[30, 20], dims=3), local_search=dict(steps=5))
    history = dk.fit(model, ids, Y, epochs=2, batch_size=50, verbose=0)
    assert [r["step"] for r in history.permutations] == [5]
    perm = model.gates[0].permutation
    assert perm.shape == (4,) and sorted(perm) == [0, 1, 2, 3]
    model.forward(ids[:16])
    w = model.gates[0].expert_weights()
    np.testing.assert_array_equal(np.argmax(w, axis=1), perm[model.gates[0].assignment[ids[:16, 0]]])
    assert np.all(np.count_nonzero(w, axis=1) == 1)
