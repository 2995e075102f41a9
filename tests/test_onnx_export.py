"""dselectk.export_onnx: the exported graph, run in onnxruntime, gives what dk.predict gives (every
model kind, every gate, MLP and CNN experts, embedding inputs, float32 and float64), passes the
ONNX checker, has a dynamic batch size, leaves out the experts a static gate does not use, and bad
calls raise clear errors. Skips cleanly without onnx / onnxruntime (the `test` extra has them)."""
import json
import sys

import numpy as np
import pytest

import dselectk as dk
from dselectk import export
from dselectk.gates import _base

try:
    import onnx
    import onnxruntime as ort
except ImportError:
    onnx = ort = None
needs_onnx = pytest.mark.skipif(ort is None, reason="needs onnx and onnxruntime (the test extra)")

GATES = {
    "dselect_k": dk.gates.DSelectK(k=2),
    "dselect_k_per_example": dk.gates.DSelectK(k=3, per_example=True, gamma=1.5),
    "top_k": dk.gates.TopK(k=2),
    "top_k_per_example": dk.gates.TopK(k=2, per_example=True),
    "top_k_noisy": dk.gates.TopK(k=1, per_example=True, noisy=True),
    "softmax": dk.gates.Softmax(),
    "softmax_per_example": dk.gates.Softmax(per_example=True),
    "softmax_selector": dk.gates.SoftmaxSelector(k=2, temperature=0.5),
    "comet": dk.gates.Comet(k=2),
    "comet_per_example": dk.gates.Comet(k=2, per_example=True, gamma=1.5),
}
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _randomize(model, seed):
    """Parameters away from their initialization: gate parameters uniform in (-1.5, 1.5) (so that
    S(Z) is partly binary, partly fractional, and Top-k picks differ between examples), biases and
    embedding tables random, weights as initialized (Glorot, so the outputs stay O(1))."""
    rng = np.random.default_rng(seed)
    for name, p in model.parameters().items():
        if name.startswith("gate"):
            p[...] = rng.uniform(-1.5, 1.5, p.shape)
        elif name.endswith(".b"):
            p[...] = rng.normal(0, 0.2, p.shape)
    for table in model.named_embeddings().values():
        table[...] = rng.uniform(-0.5, 0.5, table.shape)
    return model


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _matches(model, X, feed, tmp_path, run=True):
    """Exports model, checks the graph, runs it on the whole batch and on a batch of 1 and compares
    with dk.predict; returns the ModelProto."""
    proto = dk.export_onnx(model, tmp_path / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert onnx.load(str(tmp_path / "model.onnx")) == proto
    if not run:
        return proto
    session = _session(proto)
    want = dk.predict(model, X)
    got = session.run(None, feed)
    tol = TOL[model.dtype.type]
    assert [o.name for o in session.get_outputs()] == [f"task{t}" for t in range(model.n_tasks)]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    one = session.run(None, {name: value[:1] for name, value in feed.items()})  # dynamic batch size
    for g, w in zip(one, want):
        np.testing.assert_allclose(g, w[:1], rtol=tol, atol=tol)
    return proto


def _mlp_data(dtype, n=203, p=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, p)).astype(dtype)


@needs_onnx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gate", list(GATES))
def test_mmoe_every_gate(gate, dtype, tmp_path):
    # three tasks, one per kind of output; n = 5 experts (not a power of two) for DSelect-k's padding
    model = dk.MMoE(6, n_tasks=3, n_experts=5, expert_units=(8, 4), tower_units=(3,), gate=GATES[gate],
                    task_losses=["bce", "mse", "softmax_ce"], task_outputs=[1, 2, 4], dtype=dtype, dropout=0.25)
    _randomize(model, 1)
    X = _mlp_data(dtype)
    _matches(model, X, {"X": X}, tmp_path)
    if gate.startswith(("dselect_k", "comet")):  # the smooth-step is tested on both of its pieces
        assert 0.2 < model.gates[0].binary_fraction() < 0.9
    if gate.startswith("top_k_per"):  # and Top-k on a selection that varies with x
        assert len(model.gates[0].selected_experts()) > model.gates[0].k


@needs_onnx
@pytest.mark.parametrize("gate", list(GATES))
def test_moe_every_gate(gate, tmp_path):
    model = _randomize(dk.MoE(6, n_experts=4, expert_units=(5,), loss="mse", output_dim=1, gate=GATES[gate]), 2)
    X = _mlp_data(np.float32)
    _matches(model, X, {"X": X}, tmp_path)


@needs_onnx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shared_bottom(dtype, tmp_path):
    model = _randomize(dk.SharedBottom(6, n_tasks=2, bottom_units=(7, 5), tower_units=(4,), task_losses=["bce", "mse"],
                                       dtype=dtype), 3)
    X = _mlp_data(dtype)
    _matches(model, X, {"X": X}, tmp_path)


@needs_onnx
def test_paper_synthetic_experts_and_flattened_input(tmp_path):
    # experts summing their units (d = 1), no towers, X (N, 2, 3) seen flattened
    model = dk.MMoE(input_shape=(2, 3), n_tasks=2, n_experts=4, expert_units=(5,), expert_output="sum",
                    tower_units=None, gate="dselect_k", k=2, per_example=True)
    _randomize(model, 4)
    X = _mlp_data(np.float32).reshape(-1, 2, 3)
    _matches(model, X, {"X": X}, tmp_path)


CNN = dict(expert="cnn", input_shape=(2, 11, 10), n_tasks=2, n_experts=3, expert_units=(6,), tower_units=(4,),
           task_losses=["softmax_ce", "bce"], task_outputs=[3, 1], expert_filters=(3, 4), expert_kernel=(3, 2),
           expert_pool=(2, 1))


@needs_onnx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gate", ["dselect_k", "top_k_per_example", "softmax_per_example"])
def test_cnn_experts(gate, dtype, tmp_path):
    model = _randomize(dk.MMoE(gate=GATES[gate], dtype=dtype, **CNN), 5)
    X = np.random.default_rng(6).random((41, 2, 11, 10)).astype(dtype)
    # onnxruntime's CPU provider has no float64 Conv: the graph is checked, not run
    proto = _matches(model, X, {"X": X}, tmp_path, run=dtype == np.float32)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert [a.i for n in convs for a in n.attribute if a.name == "group"] == [1, 3]  # the experts side by side


@needs_onnx
def test_cnn_shared_bottom(tmp_path):
    model = _randomize(dk.SharedBottom(bottom="cnn", input_shape=(1, 12, 12), bottom_units=(5,), bottom_filters=(2,),
                                       bottom_kernel=3, bottom_pool=2, task_losses="mse"), 7)
    X = np.random.default_rng(8).random((30, 1, 12, 12)).astype(np.float32)
    _matches(model, X, {"X": X}, tmp_path)


@needs_onnx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gate", ["dselect_k", "dselect_k_per_example", "top_k_per_example", "comet_per_example",
                                  "hash"])
def test_embedding_inputs(gate, dtype, tmp_path):
    rng = np.random.default_rng(9)
    spec = dk.gates.Hash(hash_feature=2) if gate == "hash" else GATES[gate]  # hash routing on id column 2
    model = _randomize(dk.MMoE(None, n_tasks=2, n_experts=4, expert_units=(6,), tower_units=(3,), gate=spec,
                               task_losses=["bce", "mse"], dtype=dtype,
                               embeddings=dict(vocab_sizes=[7, 5, 9], dims=[4, 3, 2], n_dense=3)), 10)
    ids = np.stack([rng.integers(0, V, 150) for V in (7, 5, 9)], axis=1).astype(np.int32)
    dense = rng.standard_normal((150, 3)).astype(dtype)
    proto = _matches(model, {"ids": ids, "dense": dense}, {"ids": ids.astype(np.int64), "dense": dense}, tmp_path)
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    assert sorted(inputs) == ["dense", "ids"] and inputs["ids"].elem_type == onnx.TensorProto.INT64
    assert inputs["ids"].shape.dim[0].dim_param == "batch"


@needs_onnx
def test_embedding_ids_only(tmp_path):
    rng = np.random.default_rng(11)
    for model in (dk.MoE(None, n_experts=3, expert_units=(4,), gate="softmax", embeddings=dict(vocab_sizes=[6],
                                                                                                 dims=5)),
                  dk.SharedBottom(None, n_tasks=2, embeddings=dict(vocab_sizes=[6, 4], dims=3), task_losses="bce")):
        ids = np.stack([rng.integers(0, V, 40) for V in model.input_layer.vocab_sizes], axis=1)
        _matches(_randomize(model, 12), ids, {"ids": ids}, tmp_path)


@needs_onnx
@pytest.mark.parametrize("gate", ["dselect_k", "top_k_per_example", "hash"])
def test_named_columns_and_tasks(gate, tmp_path):
    # an embedding input with named id and dense columns: one graph input per column, named as it;
    # named tasks: one output per task, named as it
    rng = np.random.default_rng(15)
    spec = dk.gates.Hash(hash_feature=1) if gate == "hash" else GATES[gate]  # hash routing on "movie"
    model = _randomize(dk.MMoE(None, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=(2,), gate=spec,
                               task_names=["watch", "rating"], task_losses=["bce", "mse"],
                               embeddings=dict(columns={"user": 4, "movie": 3}, vocab_sizes={"user": 7, "movie": 5},
                                               dense_columns=["age", "hour"])), 16)
    X = {"user": rng.integers(0, 7, 60), "movie": rng.integers(0, 5, 60),
         "age": rng.random(60).astype(np.float32), "hour": rng.random(60).astype(np.float32)}
    assert export.input_names(model) == ["user", "movie", "age", "hour"]
    proto = dk.export_onnx(model, tmp_path / "m.onnx")
    onnx.checker.check_model(proto, full_check=True)
    session = _session(proto)
    assert [i.name for i in session.get_inputs()] == ["user", "movie", "age", "hour"]
    assert [o.name for o in session.get_outputs()] == ["watch", "rating"]
    for batch in (slice(None), slice(0, 1)):
        got = session.run(None, {k: v[batch] for k, v in X.items()})
        for g, w in zip(got, dk.predict(model, {k: v[batch] for k, v in X.items()})):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="differ from the input names user, movie, age, hour"):
        dk.export_onnx(model, tmp_path / "m.onnx", output_names=["age", "b"])


@needs_onnx
def test_static_binary_gate_exports_only_the_experts_in_use(tmp_path):
    # S(Z) binary: each of the 2 tasks' gates selects at most k = 2 of the 8 experts
    model = dk.MMoE(6, n_tasks=2, n_experts=8, expert_units=(5,), tower_units=(3,), gate="dselect_k", k=2)
    codes = {0: [3, 3], 1: [3, 6]}  # task 0 puts both selectors on expert 3, task 1 on experts 3 and 6
    for t, experts in codes.items():
        Z = model.gates[t].params["Z"]
        for i, j in enumerate(experts):
            Z[i] = [1.0 if (j >> b) & 1 else -1.0 for b in range(3)]  # |Z| >= gamma / 2: S(Z) binary
    assert all(g.is_binary() for g in model.gates)
    used = sorted(set(model.gates[0].selected_experts()) | set(model.gates[1].selected_experts()))
    assert used == [3, 6]
    X = _mlp_data(np.float32)
    proto = _matches(model, X, {"X": X}, tmp_path)
    weights = {i.name: i for i in proto.graph.initializer}
    assert list(weights["expert_0_W"].dims) == [6, 2 * 5]  # the first Dense of the 2 experts in use, not of 8
    assert not any(name.startswith("dselect_k") for name in weights)  # the gates are constants
    # the dense model has all 8 experts
    model.gates[0].params["Z"][...] = 0.1
    assert list({i.name: i for i in dk.export_onnx(model, tmp_path / "m.onnx").graph.initializer}
                ["expert_0_W"].dims) == [6, 8 * 5]


@needs_onnx
def test_top_k_static_moe_exports_k_experts(tmp_path):
    model = _randomize(dk.MoE(6, n_experts=6, expert_units=(4,), gate="top_k", k=2), 13)
    X = _mlp_data(np.float32)
    proto = _matches(model, X, {"X": X}, tmp_path)
    assert list({i.name: i for i in proto.graph.initializer}["expert_0_W"].dims) == [6, 2 * 4]


@needs_onnx
def test_trained_model_and_gate_state_untouched(tmp_path):
    # after fit the static gates' last forward is one optimizer step old: the export uses the
    # weights now (as predict does), and leaves the gates' caches as they were
    rng = np.random.default_rng(14)
    X = rng.standard_normal((64, 6)).astype(np.float32)
    model = dk.MMoE(6, n_tasks=2, n_experts=4, expert_units=(4,), tower_units=(3,), gate="dselect_k", k=2,
                    entropy_reg=0.1)
    dk.fit(model, X, [X[:, 0], X[:, 1]], epochs=2, batch_size=16, lr=0.05, verbose=0)
    caches = [g._cache for g in model.gates]
    proto = dk.export_onnx(model, tmp_path / "m.onnx")
    assert [g._cache for g in model.gates] == caches
    got = _session(proto).run(None, {"X": X})
    for g, w in zip(got, dk.predict(model, X)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@needs_onnx
def test_output_names_and_file(tmp_path):
    model = dk.MMoE(6, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=(2,), task_losses=["bce", "mse"])
    path = tmp_path / "named.onnx"
    proto = dk.export_onnx(model, str(path), output_names=["click", "rating"])
    assert [o.name for o in proto.graph.output] == ["click", "rating"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["dselectk_class"] == "MMoE" and json.loads(props["dselectk_config"]) == model.config
    # an output name that the exporter would also give an inner value
    proto = dk.export_onnx(model, path, output_names=["expert_0_dense", "tower1_0_dense"])
    onnx.checker.check_model(proto, full_check=True)
    got = _session(proto).run(None, {"X": np.ones((2, 6), np.float32)})
    for g, w in zip(got, dk.predict(model, np.ones((2, 6), np.float32))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert proto.opset_import[0].version == export.OPSET == 17 and proto.ir_version == export.IR_VERSION
    assert ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape == ["batch", 6]
    with pytest.raises(ValueError, match="3 names, the model has 2 tasks"):
        dk.export_onnx(model, path, output_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="distinct"):
        dk.export_onnx(model, path, output_names=["a", "a"])
    with pytest.raises(ValueError, match="input names X"):
        dk.export_onnx(model, path, output_names=["X", "b"])
    with pytest.raises(TypeError, match="list of non-empty strings"):
        dk.export_onnx(model, path, output_names="ab")


@needs_onnx
def test_bad_calls(tmp_path, monkeypatch):
    model = dk.MMoE(6, n_tasks=1, n_experts=3, expert_units=(4,), tower_units=(2,), gate="softmax", per_example=True)
    with pytest.raises(TypeError, match="takes a dselectk model"):
        dk.export_onnx(model.gates[0], tmp_path / "g.onnx")
    with pytest.raises(TypeError, match="path must be a str"):
        dk.export_onnx(model, 3)
    # a per-example gate whose file defines no export
    monkeypatch.setattr(type(model.gates[0]), "onnx_weights", _base._Gate.onnx_weights)
    with pytest.raises(TypeError, match=r"SoftmaxGate\(per_example=True\) has no ONNX export"):
        dk.export_onnx(model, tmp_path / "m.onnx")
    monkeypatch.undo()
    model.parameters()["expert0.0.W"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        dk.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    model = dk.MoE(3, n_experts=2, expert_units=(2,))
    with pytest.raises(ImportError, match=r"pip install \"dselectk\[onnx\]\""):
        dk.export_onnx(model, tmp_path / "m.onnx")
