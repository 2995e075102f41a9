"""Models configured by gate specifications: the spec and shorthand forms, their errors, the same
initial parameters as before the gate specs existed, config / repr, zero-width layers, a gate
registered from outside the package, and save / load of the new and the older file formats."""
import dataclasses
import hashlib
import json

import numpy as np
import pytest

import dselectk as dk
from dselectk import gates as G
from dselectk import models as Mo

# Fingerprints (sha256 of the slab, its index and the embedding tables) of models built by the code
# before gate specs (commit 4affc56, flat gate keyword arguments), with the shorthand below.
_GATES = [
    dict(gate="dselect_k", k=2, gamma=1.0, entropy_reg=0.3, xi=0.5),
    dict(gate="dselect_k", k=3, gamma=2.0, entropy_reg=0.1, per_example=True),
    dict(gate="top_k", k=2),
    dict(gate="top_k", k=3, per_example=True),
    dict(gate="top_k", k=2, per_example=True, noisy=True),
    dict(gate="softmax"),
    dict(gate="softmax", per_example=True),
    dict(gate="softmax_selector", k=2, entropy_reg=0.2, temperature=0.7),
]
_SPECS = [
    G.DSelectK(2, gamma=1.0, entropy_reg=0.3, xi=0.5),
    G.DSelectK(3, gamma=2.0, entropy_reg=0.1, per_example=True),
    G.TopK(2),
    G.TopK(3, per_example=True),
    G.TopK(2, per_example=True, noisy=True),
    G.Softmax(),
    G.Softmax(per_example=True),
    G.SoftmaxSelector(2, entropy_reg=0.2, temperature=0.7),
]
_FINGERPRINTS = {
    "mmoe-0-float32": "c7fb4e8e1ff6f98f8a23", "mmoe-0-float64": "5bb252cff8551e925a35", "moe-0": "04f7ddc44b266d32bc0d",
    "mmoe-1-float32": "c1a33cf77c9f911b17a1", "mmoe-1-float64": "79ab7c04d80f6d8f5008", "moe-1": "491c43434375895ce2d3",
    "mmoe-2-float32": "5fa31601628b274a6f92", "mmoe-2-float64": "397c734e0e8c10e8b881", "moe-2": "dace05528e19919244e9",
    "mmoe-3-float32": "5b47a0c6e11c3366588b", "mmoe-3-float64": "7e6bcb3a49f60bb1dd7d", "moe-3": "0cac416f3952a1e7ee59",
    "mmoe-4-float32": "88e20e19b4a2aa0fec98", "mmoe-4-float64": "09617ae3576f56b28efe", "moe-4": "28db4f5364daba699e1b",
    "mmoe-5-float32": "5fa31601628b274a6f92", "mmoe-5-float64": "397c734e0e8c10e8b881", "moe-5": "dace05528e19919244e9",
    "mmoe-6-float32": "5b47a0c6e11c3366588b", "mmoe-6-float64": "7e6bcb3a49f60bb1dd7d", "moe-6": "0cac416f3952a1e7ee59",
    "mmoe-7-float32": "bffd301b8f803ce028a4", "mmoe-7-float64": "e6e816591ff318317a8c", "moe-7": "39075d716dbb0c74f4a7",
    "mmoe-default": "444e44c8e5b992b94d2a", "mmoe-sum": "d43a78368a1dc75f8b76", "mmoe-cnn": "28af9cfd52a7b3236da1",
    "mmoe-emb": "8fa4a38a5899de562e87", "shared-bottom": "a5875125581166e9b21a",
}


def _cases():
    """{name: (class name, constructor kwargs in the old shorthand, the same with a spec or None)}."""
    cases = {}
    for i, (flat, spec) in enumerate(zip(_GATES, _SPECS)):
        for dt in ("float32", "float64"):
            common = dict(input_dim=5, n_tasks=3, n_experts=6, expert_units=(7,), tower_units=(3,), seed=11, dtype=dt)
            cases[f"mmoe-{i}-{dt}"] = ("MMoE", {**common, **flat}, {**common, "gate": spec})
        common = dict(input_dim=4, n_experts=5, expert_units=(6, 3), output_dim=2, seed=2)
        cases[f"moe-{i}"] = ("MoE", {**common, **flat}, {**common, "gate": spec})
    cases["mmoe-default"] = ("MMoE", dict(input_dim=4), dict(input_dim=4, gate=G.DSelectK()))
    common = dict(input_dim=5, n_tasks=2, n_experts=8, expert_units=(4,), expert_output="sum", tower_units=None, seed=3)
    cases["mmoe-sum"] = ("MMoE", dict(common, k=4), dict(common, gate=G.DSelectK(4)))
    common = dict(expert="cnn", input_shape=(1, 12, 12), n_tasks=2, n_experts=3, expert_units=(5,),
                  expert_filters=(2, 3), expert_kernel=3, tower_units=(4,), task_losses="softmax_ce",
                  task_outputs=[3, 4], seed=4)
    cases["mmoe-cnn"] = ("MMoE", common, dict(common, gate="dselect_k"))
    common = dict(input_dim=None, n_tasks=2, n_experts=4, expert_units=(5,), tower_units=(3,),
                  task_losses=["bce", "mse"], embeddings=dict(vocab_sizes=[6, 5], dims=[3, 2], n_dense=2), seed=5)
    cases["mmoe-emb"] = ("MMoE", dict(common, per_example=True), dict(common, gate=G.DSelectK(per_example=True)))
    cases["shared-bottom"] = ("SharedBottom", dict(input_dim=5, bottom_units=(6, 4), tower_units=(3,), seed=6), None)
    return cases


CASES = _cases()


def fingerprint(model):
    h = hashlib.sha256(model.slab.data.tobytes())
    h.update(json.dumps([[n, list(s), o] for n, s, o in model.slab.index]).encode())
    for name, t in model.named_embeddings().items():
        h.update(name.encode())
        h.update(t.tobytes())
    return h.hexdigest()[:20]


def test_every_case_has_a_recorded_fingerprint():
    assert sorted(CASES) == sorted(_FINGERPRINTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_initial_parameters_are_those_of_the_code_before_gate_specs(name):
    cls_name, flat, with_spec = CASES[name]
    cls = getattr(dk, cls_name)
    model = cls(**flat)
    assert fingerprint(model) == _FINGERPRINTS[name]
    if with_spec is not None:
        twin = cls(**with_spec)
        assert fingerprint(twin) == _FINGERPRINTS[name]
        assert twin.config == model.config and twin.gate_spec == model.gate_spec


def test_the_three_forms_of_gate_agree():
    spec = G.TopK(3, per_example=True, noisy=True)
    forms = [dk.MMoE(4, gate=spec), dk.MMoE(4, gate="top_k", k=3, per_example=True, noisy=True),
             dk.MMoE(4, gate=spec.to_config())]
    for model in forms:
        assert model.gate_spec == spec and model.config["gate"] == spec.to_config()
        assert all(type(g) is G.TopKGate and g.noisy and g.k == 3 for g in model.gates)
        np.testing.assert_array_equal(model.slab.data, forms[0].slab.data)


def test_config_and_repr_show_the_spec():
    model = dk.MMoE(4, n_tasks=2, gate=G.DSelectK(3, gamma=0.5, entropy_reg=0.1))
    assert model.config["gate"] == dict(kind="dselect_k", k=3, gamma=0.5, entropy_reg=0.1, xi=1.0, per_example=False)
    for flat_key in ("k", "gamma", "entropy_reg", "xi", "per_example", "noisy", "temperature"):
        assert flat_key not in model.config
    json.dumps(model.config)
    text = repr(model)
    assert "gate=DSelectK(k=3, gamma=0.5, entropy_reg=0.1, xi=1.0, per_example=False)" in text
    assert repr(dk.MoE(3, gate="softmax")).count("gate=Softmax(per_example=False)") == 1


@pytest.mark.parametrize("make,exc,match", [
    (lambda: dk.MMoE(4, gate="top_k", gamma=1.0), TypeError,
     r"MMoE\(\) got unexpected keyword argument 'gamma': it is neither an MMoE argument nor an option of the 'top_k' "
     r"gate, whose options are k, per_example, noisy"),
    (lambda: dk.MMoE(4, gate="softmax", k=2, entropy_reg=0.1), TypeError,
     r"unexpected keyword arguments 'k', 'entropy_reg': they are neither MMoE arguments nor options of the 'softmax' "
     r"gate, whose options are per_example"),
    (lambda: dk.MMoE(4, tower_unit=(3,)), TypeError, "'tower_unit': it is neither an MMoE argument"),
    (lambda: dk.MoE(4, gate="softmax_selector", per_example=True), TypeError,
     r"MoE\(\) got unexpected keyword argument 'per_example'.*options are k, temperature, entropy_reg"),
    (lambda: dk.MMoE(4, gate=G.DSelectK(), k=3), TypeError, "a gate spec and loose gate options 'k' beside it"),
    (lambda: dk.MMoE(4, gate={"kind": "dselect_k"}, gamma=2.0), TypeError, "loose gate options 'gamma'"),
    (lambda: dk.MMoE(4, gate="lookup"), ValueError, "unknown gate 'lookup'; expected one of"),
    (lambda: dk.MMoE(4, gate="hash"), ValueError, "hash routing needs an id input"),
    (lambda: dk.MMoE(4, gate="hash", k=2), ValueError, "k must be 1"),
    (lambda: dk.MMoE(4, gate="comet", k=9), ValueError, "k must satisfy 1 <= k <= n_experts = 8"),
    (lambda: dk.MMoE(4, gate="comet", xi=1.0), TypeError, "options are k, gamma, entropy_reg, per_example"),
    (lambda: dk.MMoE(4, gate=G.DSelectKGate(8, 2)), TypeError, "gate must be a gate spec"),
    (lambda: dk.MMoE(4, gate="dselect_k", k=0), ValueError, "k must be in"),
    (lambda: dk.MMoE(4, gate="dselect_k", k=9), ValueError, "k must satisfy 1 <= k <= n_experts = 8"),
    (lambda: dk.MMoE(4, gate="top_k", noisy=True), ValueError, "noisy=True needs per_example=True"),
    (lambda: dk.MMoE(4, 2, 8, (64,), (32,), "mse", 1, None, "dselect_k", 2), TypeError, "positional"),
    (lambda: dk.MoE(4, 8, (64,), "mse", 1, "dselect_k", 2), TypeError, "positional"),
])
def test_gate_argument_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("make,match", [
    (lambda: dk.MMoE(5, expert_units=(0, 0)), r"expert_units must list layer widths >= 1, got \(0, 0\)"),
    (lambda: dk.MMoE(5, expert_units=(0,)), "expert_units"),
    (lambda: dk.MMoE(5, expert_units=(4, -1)), "expert_units"),
    (lambda: dk.MMoE(5, tower_units=(0,)), r"tower_units must list layer widths >= 1, got \(0,\)"),
    (lambda: dk.MoE(5, expert_units=(0,)), "expert_units"),
    (lambda: dk.SharedBottom(5, bottom_units=(0, 0)), r"bottom_units must list layer widths >= 1, got \(0, 0\)"),
    (lambda: dk.SharedBottom(5, tower_units=(3, 0)), "tower_units"),
    (lambda: dk.MMoE(expert="cnn", input_shape=(1, 12, 12), expert_units=(0,)), "expert_units"),
    (lambda: dk.SharedBottom(bottom="cnn", input_shape=(1, 12, 12), bottom_units=(0,)), "bottom_units"),
])
def test_zero_width_layers_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_layer_widths_must_be_integers():
    with pytest.raises(TypeError, match="expert_units must list integer layer widths"):
        dk.MMoE(5, expert_units=(4.0,))
    with pytest.raises(TypeError, match="tower_units must be a tuple of layer widths"):
        dk.MMoE(5, tower_units=8)
    assert dk.MMoE(5, expert_units=[np.int64(3)]).config["expert_units"] == [3]
    assert dk.MoE(5, expert_units=()).experts[0].out_dim == 1  # linear experts stay allowed in MoE
    assert dk.MMoE(5, tower_units=()).towers[0].out_dim == 1  # towers with no hidden layer too


# -- a gate registered from outside the package plugs in with no other change ------------------------

@dataclasses.dataclass(frozen=True)
class FixedSoftmax(G.GateSpec):
    """A test gate: the softmax gate with its logits set to ``bias`` * (0, 1, ..., n-1)."""

    kind = "test_fixed_softmax"
    _: dataclasses.KW_ONLY
    bias: float = 0.5

    def _check(self):
        return dict(bias=G._base._number(self.bias, "bias"))

    def build(self, n_experts, input_dim=None, rng=None, dtype=np.float32):
        gate = G.SoftmaxGate(n_experts, seed=rng, dtype=dtype)
        gate.params["logits"][...] = self.bias * np.arange(n_experts)
        return gate


@pytest.fixture
def fixed_softmax():
    G.register(FixedSoftmax)
    yield FixedSoftmax
    del G._base._REGISTRY[FixedSoftmax.kind]


def test_a_gate_registered_elsewhere_trains_saves_and_loads(fixed_softmax, tmp_path):
    assert "test_fixed_softmax" in G.kinds()
    model = dk.MMoE(4, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=(2,), gate="test_fixed_softmax",
                    bias=0.25)
    assert model.gate_spec == FixedSoftmax(bias=0.25) and "gate=FixedSoftmax(bias=0.25)" in repr(model)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4)).astype(np.float32)
    dk.fit(model, X, [X[:, 0], X[:, 1]], epochs=1, batch_size=16, verbose=0)
    dk.save(model, tmp_path / "m.npz")
    loaded = dk.load(tmp_path / "m.npz")
    assert loaded.gate_spec == model.gate_spec
    np.testing.assert_array_equal(loaded.slab.data, model.slab.data)
    with pytest.raises(TypeError, match="options are bias"):
        dk.MMoE(4, gate="test_fixed_softmax", k=2)


# -- save / load --------------------------------------------------------------------------------------

# Configs exactly as the code before gate specs wrote them (format versions 1 and 2; copied from files
# it saved): the gate's kind string with every gate's flat keys beside it.
_OLD = {
    "top_k_per_example": (1, "MMoE", {
        "input_dim": 5, "n_tasks": 2, "n_experts": 4, "expert_units": [6], "expert_output": None, "tower_units": [3],
        "task_losses": "mse", "task_outputs": 1, "task_weights": None, "gate": "top_k", "k": 3, "gamma": 1.0,
        "entropy_reg": 0.0, "xi": 1.0, "per_example": True, "noisy": False, "temperature": 1.0, "dropout": 0.0,
        "seed": 1, "dtype": "float32"}),
    "moe_ablation": (1, "MoE", {
        "input_dim": 3, "n_experts": 4, "expert_units": [5], "loss": "mse", "output_dim": 1,
        "gate": "softmax_selector", "k": 2, "gamma": 1.0, "entropy_reg": 0.1, "xi": 1.0, "per_example": False,
        "noisy": False, "temperature": 0.5, "dropout": 0.0, "seed": 2, "dtype": "float32"}),
    "dselect_k_embeddings": (2, "MMoE", {
        "input_dim": None, "n_tasks": 2, "n_experts": 4, "expert_units": [5], "expert_output": None,
        "tower_units": [3], "task_losses": ["bce", "mse"], "task_outputs": 1, "task_weights": None,
        "gate": "dselect_k", "k": 2, "gamma": 2.0, "entropy_reg": 0.2, "xi": 0.5, "per_example": False,
        "noisy": False, "temperature": 1.0, "dropout": 0.0, "seed": 3, "dtype": "float32",
        "embeddings": {"vocab_sizes": [6, 5], "dims": [3, 2], "n_dense": 0}}),
    "softmax": (1, "MMoE", {
        "input_dim": 4, "n_tasks": 2, "n_experts": 3, "expert_units": [4], "expert_output": None, "tower_units": [2],
        "task_losses": "mse", "task_outputs": 1, "task_weights": None, "gate": "softmax", "k": 2, "gamma": 1.0,
        "entropy_reg": 0.0, "xi": 1.0, "per_example": False, "noisy": False, "temperature": 1.0, "dropout": 0.0,
        "seed": 4, "dtype": "float32"}),
    "cnn": (1, "MMoE", {
        "input_dim": None, "n_tasks": 2, "n_experts": 3, "expert_units": [5], "expert_output": None,
        "tower_units": [4], "task_losses": "softmax_ce", "task_outputs": [3, 4], "task_weights": None,
        "gate": "dselect_k", "k": 1, "gamma": 1.0, "entropy_reg": 0.0, "xi": 1.0, "per_example": False,
        "noisy": False, "temperature": 1.0, "dropout": 0.25, "seed": 5, "dtype": "float32", "input_shape": [1, 12, 12],
        "expert": "cnn", "expert_filters": [2, 3], "expert_kernel": 3, "expert_pool": 2, "tower_dropout": 0.0}),
}
# the same models in today's form, and the spec each old config means
_TODAY = {
    "top_k_per_example": (dict(input_dim=5, n_tasks=2, n_experts=4, expert_units=(6,), tower_units=(3,),
                               gate=G.TopK(3, per_example=True), seed=1), G.TopK(3, per_example=True)),
    "moe_ablation": (dict(input_dim=3, n_experts=4, expert_units=(5,), gate="softmax_selector", k=2,
                          temperature=0.5, entropy_reg=0.1, seed=2),
                     G.SoftmaxSelector(2, temperature=0.5, entropy_reg=0.1)),
    "dselect_k_embeddings": (dict(input_dim=None, n_tasks=2, n_experts=4, expert_units=(5,), tower_units=(3,),
                                  task_losses=["bce", "mse"], embeddings=dict(vocab_sizes=[6, 5], dims=[3, 2]),
                                  gate=G.DSelectK(gamma=2.0, entropy_reg=0.2, xi=0.5), seed=3),
                             G.DSelectK(2, gamma=2.0, entropy_reg=0.2, xi=0.5)),
    "softmax": (dict(input_dim=4, n_experts=3, expert_units=(4,), tower_units=(2,), gate="softmax", seed=4),
                G.Softmax()),
    "cnn": (dict(expert="cnn", input_shape=(1, 12, 12), n_tasks=2, n_experts=3, expert_units=(5,),
                 expert_filters=(2, 3), expert_kernel=3, tower_units=(4,), task_losses="softmax_ce",
                 task_outputs=[3, 4], tower_dropout=0.0, dropout=0.25, gate=G.DSelectK(1), seed=5), G.DSelectK(1)),
}


def _trained_like(model, seed=0):
    """``model`` with its parameters (and tables) moved off their initial values."""
    rng = np.random.default_rng(seed)
    model.slab.data[...] += rng.standard_normal(model.slab.data.size).astype(model.dtype) * 0.1
    for t in model.embedding_tables():
        t += rng.standard_normal(t.shape).astype(t.dtype)
    return model


def write_old_format(path, model, version, cls_name, config):
    """A model file as the code before gate specs wrote it: ``config`` in its flat form, the
    parameters and tables of ``model`` (which has that architecture)."""
    tables = model.named_embeddings()
    meta = dict(format="dselectk-model", version=version, cls=cls_name, config=config,
                index=[[name, list(shape), offset] for name, shape, offset in model.slab.index])
    if tables:
        meta["tables"] = [[name, list(t.shape)] for name, t in tables.items()]
    np.savez(path, params=model.slab.data, meta=np.array(json.dumps(meta)),
             **{f"table_{name}": t for name, t in tables.items()})


def _inputs(model, rng, n=7):
    if model.input_layer is not None:
        return {"ids": np.stack([rng.integers(0, v, n) for v in model.input_layer.vocab_sizes], axis=1)}
    return rng.standard_normal((n, *model.input_shape)).astype(model.dtype)


@pytest.mark.parametrize("name", sorted(_OLD))
def test_load_reads_files_written_before_gate_specs(tmp_path, name):
    version, cls_name, old_config = _OLD[name]
    kwargs, spec = _TODAY[name]
    today = _trained_like(getattr(dk, cls_name)(**kwargs))
    path = tmp_path / "old.npz"
    write_old_format(path, today, version, cls_name, old_config)
    loaded = dk.load(path)
    assert type(loaded).__name__ == cls_name and loaded.gate_spec == spec
    assert loaded.config == today.config and loaded.config["gate"] == spec.to_config()
    np.testing.assert_array_equal(loaded.slab.data, today.slab.data)
    for a, b in zip(loaded.embedding_tables(), today.embedding_tables()):
        np.testing.assert_array_equal(a, b)
    X = _inputs(today, np.random.default_rng(1))
    for a, b in zip(dk.predict(loaded, X), dk.predict(today, X)):
        np.testing.assert_array_equal(a, b)
    # written again, it is a version 3 file with the same meaning
    dk.save(loaded, tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz") as z:
        meta = json.loads(str(z["meta"][()]))
    assert meta["version"] == 3 and meta["config"]["gate"] == spec.to_config()
    assert not set(meta["config"]) & {"k", "gamma", "entropy_reg", "xi", "per_example", "noisy", "temperature"}
    again = dk.load(tmp_path / "new.npz")
    assert again.config == loaded.config
    np.testing.assert_array_equal(again.slab.data, loaded.slab.data)


def test_versions_written(tmp_path):
    def version(model):
        dk.save(model, tmp_path / "m.npz")
        with np.load(tmp_path / "m.npz") as z:
            return json.loads(str(z["meta"][()]))["version"]
    assert version(dk.MMoE(4)) == 3 and version(dk.MoE(4, gate="softmax")) == 3
    assert version(dk.SharedBottom(4)) == 1  # no gate: older readers still load it
    assert version(dk.SharedBottom(None, embeddings=dict(vocab_sizes=[4], dims=[2]))) == 2


def _saved_with_edited_meta(tmp_path, model, edit):
    """The path of a copy of ``model``'s file whose metadata ``edit`` (a function of the meta dict)
    has changed."""
    dk.save(model, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        meta, params = json.loads(str(z["meta"][()])), z["params"]
    edit(meta)
    np.savez(tmp_path / "bad.npz", params=params, meta=np.array(json.dumps(meta)))
    return tmp_path / "bad.npz"


@pytest.mark.parametrize("gate,match", [
    ({"kind": "dselect_k", "k": 2, "lamda": 0.1},
     r"gate config is invalid: the 'dselect_k' gate config has unknown keys \['lamda'\]"),
    ({"kind": "comet_v9"}, r"gate config is invalid: unknown gate 'comet_v9'"),
    ({"k": 2}, "gate config is invalid: a gate config needs a 'kind' key"),
    ({"kind": "dselect_k", "gamma": -1.0}, "gate config is invalid: gamma must be a finite number > 0"),
    ({"kind": "dselect_k", "per_example": "yes"}, "gate config is invalid: .*per_example must be True or False"),
    ([1, 2], "the stored gate config must be a dict"),
    ("lookup", "gate config is invalid: unknown gate 'lookup'"),
])
def test_load_rejects_a_bad_gate_config(tmp_path, gate, match):
    path = _saved_with_edited_meta(tmp_path, dk.MMoE(4, n_experts=4), lambda meta: meta["config"].update(gate=gate))
    with pytest.raises(ValueError, match=f"bad.npz: .*{match}"):
        dk.load(path)


def test_load_rejects_a_config_that_is_not_a_dict(tmp_path):
    path = _saved_with_edited_meta(tmp_path, dk.MMoE(4), lambda meta: meta.update(config=[1, 2]))
    with pytest.raises(ValueError, match="the model config must be a dict, got list"):
        dk.load(path)


@pytest.mark.parametrize("gate", [G.DSelectK(2), G.TopK(2), G.Softmax(), G.SoftmaxSelector(2)], ids=repr)
def test_gate_weights_and_selected_experts_right_after_load(tmp_path, gate):
    model = _trained_like(dk.MMoE(4, n_tasks=2, n_experts=5, expert_units=(3,), tower_units=(2,), gate=gate))
    X = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    dk.save(model, tmp_path / "m.npz")
    loaded = dk.load(tmp_path / "m.npz")
    W = loaded.gate_weights()  # before any forward
    assert W.shape == (2, 5)
    selected = [g.selected_experts() for g in loaded.gates]
    model.forward(X)
    np.testing.assert_array_equal(W, model.gate_weights())
    for s, g in zip(selected, model.gates):
        np.testing.assert_array_equal(s, g.selected_experts())
    loaded.forward(X)
    np.testing.assert_array_equal(loaded.gate_weights(), W)


def test_per_example_gate_weights_after_load_say_to_run_a_forward(tmp_path):
    model = dk.MMoE(4, n_tasks=2, n_experts=5, gate=G.DSelectK(2, per_example=True))
    dk.save(model, tmp_path / "m.npz")
    loaded = dk.load(tmp_path / "m.npz")
    with pytest.raises(RuntimeError, match=r"depend on the input x: run a forward first \(for a model: "
                                           r"model.forward\(X\)\)"):
        loaded.gate_weights()
    loaded.forward(np.ones((3, 4), np.float32))
    assert loaded.gate_weights().shape == (2, 5) and loaded.gates[0].selected_experts().size >= 1
