"""Gate specifications (dselectk.gates.DSelectK, TopK, Softmax, SoftmaxSelector): validation,
config round trips, the registry, building gates; the gates' default dtype and their diagnostics
before a first forward."""
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

import dselectk as dk
from dselectk import gates as G

SPECS = [
    G.DSelectK(3, gamma=2.0, entropy_reg=0.1, xi=0.5, per_example=True),
    G.DSelectK(),
    G.TopK(2, per_example=True, noisy=True),
    G.TopK(1),
    G.Softmax(per_example=True),
    G.Softmax(),
    G.SoftmaxSelector(4, temperature=0.3, entropy_reg=0.2),
    G.Comet(3, gamma=0.5, entropy_reg=0.2, per_example=True),
    G.Comet(),
    G.Hash(hash_feature=1),
]


def test_kinds_and_exports():
    assert G.kinds()[:4] == ("dselect_k", "top_k", "softmax", "softmax_selector")
    for kind, cls in zip(G.kinds(), (G.DSelectK, G.TopK, G.Softmax, G.SoftmaxSelector)):
        assert G.spec_class(kind) is cls and cls.kind == kind
    # the gate classes where they always were
    from dselectk.gates import DSelectKGate, SoftmaxGate, SoftmaxSelectorGate, StaticDSelectKBank, TopKGate
    assert dk.DSelectKGate is DSelectKGate and dk.TopKGate is TopKGate and dk.SoftmaxGate is SoftmaxGate
    assert dk.SoftmaxSelectorGate is SoftmaxSelectorGate and StaticDSelectKBank.__module__ == "dselectk.gates.dselect_k"
    assert dk.gates.DSelectK is G.DSelectK


def test_defaults_are_the_models_defaults():
    """The shorthand's defaults, hence MMoE(gate=...) without options, are today's model defaults."""
    assert G.DSelectK().to_config() == dict(kind="dselect_k", k=2, gamma=1.0, entropy_reg=0.0, xi=1.0,
                                            per_example=False)
    assert G.TopK().to_config() == dict(kind="top_k", k=2, per_example=False, noisy=False)
    assert G.Softmax().to_config() == dict(kind="softmax", per_example=False)
    assert G.SoftmaxSelector().to_config() == dict(kind="softmax_selector", k=2, temperature=1.0, entropy_reg=0.0)
    assert G.SoftmaxSelector().per_example is False
    assert G.Comet().to_config() == dict(kind="comet", k=2, gamma=1.0, entropy_reg=0.0, per_example=False)
    assert G.Hash().to_config() == dict(kind="hash", k=1, hash_feature=0)
    assert G.Hash().per_example is True


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_config_round_trip_repr_frozen(spec):
    config = spec.to_config()
    assert config["kind"] == spec.kind and set(config) == {"kind", *spec.options()}
    again = json.loads(json.dumps(config))  # JSON-able, and unchanged by the trip
    assert again == config
    assert G.GateSpec.from_config(again) == spec and type(spec).from_config(again) == spec
    assert eval(repr(spec), vars(G)) == spec  # the repr is the constructor call
    assert repr(spec).startswith(type(spec).__name__ + "(")
    assert hash(spec) == hash(G.GateSpec.from_config(again))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.k = 3
    field = spec.options()[-1]
    changed = spec.replace(**{field: getattr(spec, field)})
    assert changed == spec and changed is not spec


def test_values_are_normalised():
    spec = G.DSelectK(np.int64(3), gamma=2, entropy_reg=np.float32(0.5), per_example=np.bool_(True))
    assert type(spec.k) is int and type(spec.gamma) is float and type(spec.entropy_reg) is float
    assert type(spec.per_example) is bool
    json.dumps(spec.to_config())


@pytest.mark.parametrize("make,exc,match", [
    (lambda: G.DSelectK(0), ValueError, "k must be in"),
    (lambda: G.DSelectK(2.0), TypeError, "k must be an integer"),
    (lambda: G.DSelectK(True), TypeError, "k must be an integer"),
    (lambda: G.DSelectK(gamma=0), ValueError, "gamma must be a finite number > 0"),
    (lambda: G.DSelectK(gamma=float("inf")), ValueError, "gamma"),
    (lambda: G.DSelectK(gamma=10 ** 400), ValueError, r"gamma must be a finite number > 0, got 1000.*\.\.\."),
    (lambda: G.DSelectK(gamma="1"), TypeError, "gamma must be a real number, got str"),
    (lambda: G.DSelectK(entropy_reg=-1e-3), ValueError, "entropy_reg must be a finite number >= 0"),
    (lambda: G.DSelectK(xi=float("nan")), ValueError, "xi"),
    (lambda: G.DSelectK(per_example=1), TypeError, "per_example must be True or False"),
    (lambda: G.DSelectK(2, 1.0), TypeError, "positional"),  # options after k are keyword-only
    (lambda: G.DSelectK(temperature=1.0), TypeError, "temperature"),
    (lambda: G.TopK(k=-1), ValueError, "k must be in"),
    (lambda: G.TopK(noisy=True), ValueError, "noisy=True needs per_example=True"),
    (lambda: G.TopK(noisy="yes", per_example=True), TypeError, "noisy must be True or False"),
    (lambda: G.Softmax(per_example=None), TypeError, "per_example"),
    (lambda: G.Softmax(True), TypeError, "positional"),
    (lambda: G.SoftmaxSelector(temperature=0), ValueError, "temperature must be a finite number > 0"),
    (lambda: G.SoftmaxSelector(entropy_reg=-1), ValueError, "entropy_reg"),
    (lambda: G.SoftmaxSelector(per_example=True), TypeError, "per_example"),
    (lambda: G.DSelectK().replace(noisy=True), TypeError, r"the 'dselect_k' gate has no option 'noisy'; its "
                                                          r"options are k, gamma, entropy_reg, xi, per_example"),
    (lambda: G.DSelectK().replace(gamma=-1), ValueError, "gamma"),
    (lambda: G.Comet(0), ValueError, "k must be in"),
    (lambda: G.Comet(gamma=-1.0), ValueError, "gamma must be a finite number > 0"),
    (lambda: G.Comet(entropy_reg=float("nan")), ValueError, "entropy_reg"),
    (lambda: G.Comet(xi=1.0), TypeError, "xi"),
    (lambda: G.Comet(per_example="no"), TypeError, "per_example must be True or False"),
    (lambda: G.Hash(2), ValueError, "hash routing sends each id to exactly one expert: k must be 1, got k = 2"),
    (lambda: G.Hash(hash_feature=-1), ValueError, "hash_feature must be in"),
    (lambda: G.Hash(hash_feature=1.0), TypeError, "hash_feature must be an integer"),
    (lambda: G.Hash(per_example=False), TypeError, "per_example"),
])
def test_spec_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("config,match", [
    ({"k": 2}, "needs a 'kind' key"),
    ({"kind": "hashed"}, r"unknown gate 'hashed'; expected one of \('dselect_k'"),
    ({"kind": ["dselect_k"]}, "unknown gate"),
    ({"kind": "top_k", "gamma": 1.0}, r"the 'top_k' gate config has unknown keys \['gamma'\]; its options are k, "
                                      "per_example, noisy"),
    ({"kind": "dselect_k", "k": "2"}, "invalid: k must be an integer"),
    ({"kind": "dselect_k", "k": 0}, "k must be in"),
    ({"kind": "top_k", "noisy": True}, "needs per_example"),
])
def test_from_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        G.GateSpec.from_config(config)


def test_from_config_of_a_subclass_checks_the_kind():
    with pytest.raises(ValueError, match="DSelectK.from_config.. got a config of kind 'top_k'"):
        G.DSelectK.from_config(G.TopK().to_config())
    with pytest.raises(TypeError, match="must be a dict"):
        G.GateSpec.from_config("dselect_k")
    assert G.TopK.from_config({"kind": "top_k", "k": 3}) == G.TopK(3)  # options left out: defaults


def test_as_spec_shorthand():
    assert G.as_spec("top_k", k=3, per_example=True, noisy=True) == G.TopK(3, per_example=True, noisy=True)
    assert G.as_spec("softmax") == G.Softmax()
    assert G.as_spec(G.DSelectK(4)) == G.DSelectK(4)
    assert G.as_spec({"kind": "softmax", "per_example": True}) == G.Softmax(per_example=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'gamma': it is not an option of the 'top_k' "
                                        r"gate, whose options are k, per_example, noisy"):
        G.as_spec("top_k", gamma=1.0)
    with pytest.raises(TypeError, match="a gate spec and loose gate options 'k' beside it"):
        G.as_spec(G.DSelectK(), k=3)
    with pytest.raises(ValueError, match="unknown gate 'lookup'"):
        G.as_spec("lookup")
    with pytest.raises(TypeError, match="gate must be a gate spec"):
        G.as_spec(3)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_build_gives_the_gate_of_its_options(spec, dtype):
    if spec.kind == "hash":
        pytest.skip("hash routing is built from a model's id input: test_hash_spec_builds_from_the_id_input")
    p = 5
    gate = spec.build(7, p if spec.per_example else None, np.random.default_rng(3), dtype)
    twin_cls = {"dselect_k": G.DSelectKGate, "top_k": G.TopKGate, "softmax": G.SoftmaxGate,
                "softmax_selector": G.SoftmaxSelectorGate, "comet": G.CometGate}[spec.kind]
    opts = {name: getattr(spec, name) for name in spec.options()}
    if "per_example" in opts and opts["per_example"]:
        opts["input_dim"] = p
    k = opts.pop("k", None)
    twin = twin_cls(7, *([k] if k is not None else []), seed=np.random.default_rng(3), dtype=dtype, **opts)
    assert type(gate) is twin_cls and gate.per_example == spec.per_example
    assert sorted(gate.params) == sorted(twin.params)
    for name in gate.params:
        assert gate.params[name].dtype == dtype and np.array_equal(gate.params[name], twin.params[name]), name
    assert spec.build(7, p).params[next(iter(gate.params))].dtype == np.float32  # the default dtype
    with pytest.raises(ValueError, match="k must satisfy|n_experts"):
        spec.build(1, p)


def test_register_rejects_a_second_class_for_a_kind():
    @dataclasses.dataclass(frozen=True)
    class Impostor(G.GateSpec):
        kind = "dselect_k"

    with pytest.raises(ValueError, match="'dselect_k' is already registered by dselectk.gates.dselect_k.DSelectK"):
        G.register(Impostor)
    with pytest.raises(TypeError, match="GateSpec subclass"):
        G.register(dict)

    @dataclasses.dataclass(frozen=True)
    class Nameless(G.GateSpec):
        pass

    with pytest.raises(ValueError, match="kind must be a non-empty string"):
        G.register(Nameless)
    assert G.spec_class("dselect_k") is G.DSelectK


# -- the gates themselves: default dtype, diagnostics before any forward -----------------------------

def test_gates_default_to_float32_like_the_models():
    for gate in (G.DSelectKGate(8, 2), G.DSelectKGate(8, 2, per_example=True, input_dim=3), G.TopKGate(8, 2),
                 G.SoftmaxGate(8), G.SoftmaxSelectorGate(8, 2)):
        assert gate.dtype == np.float32 and all(v.dtype == np.float32 for v in gate.params.values())
    assert dk.MMoE(3).dtype == np.float32
    # float32 draws are the float64 draws rounded: the default changed the dtype, not the values
    a, b = G.DSelectKGate(9, 3, seed=4), G.DSelectKGate(9, 3, seed=4, dtype=np.float64)
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name].astype(np.float32))


def _readme_block(heading):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_gate_snippet_runs_as_written():
    namespace = {}
    exec(compile(_readme_block("Gate objects"), "README.md", "exec"), namespace)
    gate, pe = namespace["gate"], namespace["pe"]
    assert gate.grads["Z"].any() and pe.grads["W"].any()


@pytest.mark.parametrize("gate", [G.DSelectKGate(8, 2, seed=1), G.TopKGate(8, 3), G.SoftmaxGate(8),
                                  G.SoftmaxSelectorGate(8, 2, entropy_reg=0.1, seed=1),
                                  G.CometGate(8, 2, entropy_reg=0.1, seed=1)], ids=lambda g: type(g).__name__)
def test_static_gate_diagnostics_before_the_first_forward(gate):
    """As right after load: the weights of a static gate follow from its parameters alone."""
    w = gate.expert_weights()
    assert w.shape == (8,) and w.sum() == pytest.approx(1.0, rel=1e-6)
    assert np.array_equal(gate.selected_experts(), np.flatnonzero(w > 0))
    assert gate.num_selected() == float(np.count_nonzero(w))
    reg = gate.regularization()
    if hasattr(gate, "is_binary"):
        assert gate.is_binary() is False and gate.binary_fraction() == 0.0
    with pytest.raises(RuntimeError, match="before forward"):  # nothing was kept for a backward
        gate.backward(np.zeros(8, gate.dtype))
    assert np.array_equal(gate.forward(), w) and gate.regularization() == reg


def test_per_example_gate_diagnostics_before_forward_say_what_to_do():
    gate = G.DSelectKGate(8, 2, per_example=True, input_dim=3)
    with pytest.raises(RuntimeError, match=r"has not run forward\(x\) yet.*depend on the input"):
        gate.selected_experts()
    x = np.ones((4, 3), np.float32)
    gate.forward(x)
    assert gate.expert_weights().shape == (4, 8) and gate.selected_experts().size > 0


def test_hash_spec_builds_from_the_id_input():
    front = dk.EmbeddingInput([30, 7], [2, 2])
    gate = G.Hash(hash_feature=1).build(4, front.out_dim, np.random.default_rng(2), np.float64, id_input=front)
    assert type(gate) is G.HashGate and gate.vocab_size == 7 and gate.hash_feature == 1 and gate.params == {}
    twin = G.HashGate(4, 7, hash_feature=1, seed=np.random.default_rng(2), dtype=np.float64)
    assert np.array_equal(gate.assignment, twin.assignment)
    with pytest.raises(ValueError, match="hash routing needs an id input"):
        G.Hash().build(4, 5, None)
    with pytest.raises(ValueError, match="hash_feature = 2, but the embedding input has 2 id column"):
        G.Hash(hash_feature=2).build(4, front.out_dim, None, id_input=front)
