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
    (lambda: dk.MMoE(4, gate="hash"), ValueError, "unknown gate 'hash'; expected one of"),
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
