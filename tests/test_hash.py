"""Hash routing (dselectk.gates.Hash / HashGate): a balanced, seeded id -> expert assignment, one-hot
weights, conditional computation in a model, save/load of the assignment, and clear errors."""
import json

import numpy as np
import pytest

import dselectk as dk
from dselectk import gates as G
from dselectk import models as Mo
from dselectk import inputs as I
from dselectk import trainer as T
from dselectk.gates.hash import balanced_assignment

EMB = dict(vocab_sizes=[23, 9], dims=[3, 2])


def _model(seed=0, **kw):
    kw = dict(dict(n_tasks=2, n_experts=4, expert_units=(6,), tower_units=(3,), task_losses=["bce", "mse"],
                   gate="hash", embeddings=EMB, seed=seed), **kw)
    return Mo.MMoE(None, **kw)


def _ids(rng, N=40):
    return np.stack([rng.integers(0, 23, N), rng.integers(0, 9, N)], axis=1)


@pytest.mark.parametrize("V,n", [(1, 2), (7, 2), (23, 4), (100, 7), (8, 8), (5, 16)])
def test_assignment_is_balanced_and_seeded(V, n):
    a = balanced_assignment(V, n, np.random.default_rng(3))
    assert a.shape == (V,) and a.dtype == np.int64 and a.min() >= 0 and a.max() < n
    counts = np.bincount(a, minlength=n)
    assert counts.max() - counts.min() <= 1 and counts.sum() == V
    assert np.array_equal(a, balanced_assignment(V, n, np.random.default_rng(3)))
    if V >= 2 * n:  # another seed, another map (for these sizes)
        assert not np.array_equal(a, balanced_assignment(V, n, np.random.default_rng(4)))


def test_weights_are_one_hot_at_the_assigned_expert():
    gate = G.HashGate(5, 11, hash_feature=1, seed=0, dtype=np.float64)
    assert gate.k == 1 and gate.params == {} and gate.per_example and gate.regularization() == 0.0
    ids = np.stack([np.arange(11), np.arange(11)[::-1]], axis=1)
    w = gate.forward(ids)
    assert w.shape == (11, 5) and w.dtype == np.float64
    np.testing.assert_array_equal(w.sum(axis=1), 1.0)
    np.testing.assert_array_equal(w.argmax(axis=1), gate.assignment[ids[:, 1]])
    np.testing.assert_array_equal(gate.forward(ids[:, 1]), w)  # the column alone
    assert gate.num_selected() == 1.0
    np.testing.assert_array_equal(gate.selected_experts(), np.unique(gate.assignment))
    assert gate.backward(np.ones_like(w)) is None


def test_model_assignment_comes_from_the_model_seed():
    a, b, c = _model(seed=5), _model(seed=5), _model(seed=6)
    for t in range(2):
        assert np.array_equal(a.gates[t].assignment, b.gates[t].assignment)
        assert a.gates[t].vocab_size == 23 and np.bincount(a.gates[t].assignment).max() <= 6
    assert not np.array_equal(a.gates[0].assignment, a.gates[1].assignment)  # one draw per task gate
    assert not np.array_equal(a.gates[0].assignment, c.gates[0].assignment)
    assert _model(gate=G.Hash(hash_feature=1)).gates[0].vocab_size == 9


def test_each_expert_runs_on_its_ids_only():
    """Per-example one-hot weights: the gather path, each expert on the rows whose id maps to it (in
    some task), with the dense path's outputs and gradients."""
    rng = np.random.default_rng(1)
    sparse, dense = _model(dtype="float64", n_experts=8), _model(dtype="float64", n_experts=8)
    dense.sparse_threshold = 0.0
    ids = _ids(rng)
    Y = [(rng.random(40) < 0.5).astype(float), rng.standard_normal(40)]
    results = []
    for model in (sparse, dense):
        model.zero_grad()
        model.reset_flops()
        outs = model.forward(ids, training=True)
        _, _, douts = model.loss(outs, I.check_Y(model, Y, 40))
        model.backward(douts)
        results.append((outs, model.slab.grad.copy(), model.flops["experts_executed"],
                        [e.dense_grad() for e in model.input_layer.tables]))
    (o1, g1, f1, t1), (o2, g2, f2, t2) = results
    for a, b in zip(o1, o2):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-13)
    for a, b in zip(t1, t2):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    rows = sparse._cache[2]
    assert rows is not None
    routed = [set(np.flatnonzero(np.isin(ids[:, 0], np.flatnonzero(g.assignment == j)))) for g in sparse.gates
              for j in range(8)]
    for j in range(8):
        assert set(rows[j]) == routed[j] | routed[8 + j]
    per_row = sparse.experts[0].flops_per_row()
    assert f1 == sum(len(r) for r in rows) * per_row < f2


def test_fit_trains_a_hash_routed_model():
    rng = np.random.default_rng(2)
    ids = _ids(rng, 400)
    Y = [(ids[:, 0] % 2).astype(np.float32), (ids[:, 1] / 9).astype(np.float32)]
    model = _model()
    before = T.evaluate(model, ids, Y)
    hist = T.fit(model, ids, Y, epochs=8, batch_size=32, optimizer="adagrad", lr=0.05, verbose=0)
    after = T.evaluate(model, ids, Y)
    assert after["task0_auc"] > max(0.8, before["task0_auc"]), (before, after)
    assert hist.binary_step == [None, None]  # no smooth-step
    np.testing.assert_array_equal(hist.selected_experts, 1.0)


def test_save_load_keeps_the_assignment(tmp_path):
    rng = np.random.default_rng(3)
    model = _model(seed=9)
    model.gates[1].assignment = np.roll(model.gates[1].assignment, 1)  # not the seed's: loaded from the file
    ids = _ids(rng)
    dk.save(model, tmp_path / "h.npz")
    loaded = dk.load(tmp_path / "h.npz")
    assert loaded.gate_spec == G.Hash() and loaded.config == model.config
    for a, b in zip(model.gates, loaded.gates):
        np.testing.assert_array_equal(a.assignment, b.assignment)
    for a, b in zip(T.predict(model, ids), T.predict(loaded, ids)):
        np.testing.assert_array_equal(a, b)
    with np.load(tmp_path / "h.npz") as z:
        meta = json.loads(str(z["meta"][()]))
        arrays = {k: z[k] for k in z.files}
    assert meta["version"] == 4 and meta["buffers"] == [["gate0.assignment", [23]], ["gate1.assignment", [23]]]
    assert sorted(k for k in arrays if k.startswith("buffer_")) == ["buffer_gate0.assignment", "buffer_gate1.assignment"]
    for change, match in (
            (lambda a: a.update({"buffer_gate0.assignment": a["buffer_gate0.assignment"] + 4}), "experts 0 .. 3"),
            (lambda a: a.update({"buffer_gate1.assignment": a["buffer_gate1.assignment"][:-1]}), "buffer"),
            (lambda a: a.update({"buffer_gate0.assignment": a["buffer_gate0.assignment"].astype(float)}), "integer"),
            (lambda a: a.pop("buffer_gate1.assignment"), "'buffers' lists")):
        bad = dict(arrays)
        change(bad)
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ValueError, match=match):
            dk.load(tmp_path / "bad.npz")
    # models without buffers keep the older format versions
    dk.save(Mo.MMoE(4), tmp_path / "plain.npz")
    with np.load(tmp_path / "plain.npz") as z:
        assert json.loads(str(z["meta"][()]))["version"] == 3 and not any(k.startswith("buffer_") for k in z.files)


def test_clear_errors():
    with pytest.raises(ValueError, match="hash routing needs an id input"):
        Mo.MMoE(5, gate="hash")
    with pytest.raises(ValueError, match="k must be 1, got k = 2"):
        _model(k=2)
    with pytest.raises(ValueError, match="hash_feature = 2, but the embedding input has 2 id column"):
        _model(gate=G.Hash(hash_feature=2))
    gate = G.HashGate(3, 10, seed=0)
    with pytest.raises(ValueError, match=r"id 10 of example 1 \(column 0\) is outside \[0, 10\)"):
        gate.forward(np.array([3, 10, 2]))
    with pytest.raises(ValueError, match="id -1"):
        gate.forward(np.array([[-1, 0]]))
    with pytest.raises(TypeError, match="integer ids"):
        gate.forward(np.zeros(3))
    with pytest.raises(ValueError, match="empty batch"):
        gate.forward(np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="hash_feature = 1 names id column 1"):
        G.HashGate(3, 10, hash_feature=1).forward(np.zeros((4, 1), np.int64))
    model = _model()
    with pytest.raises(ValueError, match=r"ids.*\[0, 23\)"):  # the model's input check, before the gate
        T.predict(model, np.array([[23, 0]]))
