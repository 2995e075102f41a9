"""Property-based fuzzing of the gate objects, gate specs and models (Hypothesis), at a smaller
budget than the kernels (tests/test_fuzz_functional.py; machinery in tests/fuzzing.py).

* gates: a random valid gate; forward(x) then backward(dw) with x and dw perturbed (dtypes, shapes,
  layouts, NaN / Inf): ValueError / TypeError, or exactly the weights, dx and gradients that a copy
  of the gate gives on plain copies;
* gate and spec options: every option of every gate class and spec, every out-of-range value of
  its kind (deterministic): ValueError / TypeError, or a gate;
* models: a random small MMoE / MoE / SharedBottom and one of forward, predict, evaluate and fit
  (one epoch) with X, Y and sample weights perturbed: ValueError / TypeError, or exactly what a copy
  of the model gives on plain copies (fit: the same history and parameters).

Model files (``load``) are fuzzed in tests/test_model_file.py.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dselectk as dk
from fuzz_specs import Gen, Spec
from fuzzing import BAD_SCALARS, Case, check_call, fuzz_settings, perturb_array

GATES = {"dselect_k": dk.DSelectKGate, "top_k": dk.TopKGate, "softmax": dk.SoftmaxGate,
         "softmax_selector": dk.SoftmaxSelectorGate}


def _draw_gen(data, dtype):
    return Gen(lambda lo, hi: data.draw(st.integers(lo, hi)), dtype)


# ---------------------------------------------------------------------------------------------
# Gates: forward and backward
# ---------------------------------------------------------------------------------------------

def _gate(g, kind):
    n = g.size(2, 6)
    k = g.size(1, min(3, n))
    per_example = kind != "softmax_selector" and g.flag()
    shape = dict(per_example=per_example, input_dim=g.size(1, 4) if per_example else None)
    if kind == "dselect_k":
        options = dict(k=k, gamma=g.pick(0.5, 1.0), entropy_reg=g.pick(0.0, 0.1), **shape)
    elif kind == "top_k":
        options = dict(k=k, noisy=per_example and g.flag(), **shape)
    elif kind == "softmax":
        options = shape
    else:
        options = dict(k=k, temperature=g.pick(0.5, 1.0), entropy_reg=g.pick(0.0, 0.1))
    return GATES[kind](n, **options, seed=g.size(0, 9), dtype=g.dtype)


@pytest.mark.parametrize("kind", sorted(GATES))
@fuzz_settings(0.4)
@given(data=st.data())
def test_fuzz_gate(kind, data):
    g = _draw_gen(data, data.draw(st.sampled_from([np.float32, np.float64])))
    gate = _gate(g, kind)
    B = g.size(0, 3)
    x = g.arr(B, gate.input_dim) if gate.per_example else None
    dw = g.arr(B, gate.n_experts) if gate.per_example else g.arr(gate.n_experts)
    need_dx = g.flag()

    def forward_backward(x, dw):
        twin = copy.deepcopy(gate)  # every call on a fresh copy of the same gate
        w = twin.forward(x)
        dx = twin.backward(dw, need_dx=need_dx)
        return w, dx, {name: grad.copy() for name, grad in twin.grads.items()}

    case = Case(f"{kind} gate", forward_backward, Spec(make=None, floats=("x", "dw")), dict(x=x, dw=dw))
    case.perturb(data.draw)
    check_call(case)


@pytest.mark.parametrize("kind", ["dselect_k", "top_k", "softmax"])
def test_per_example_gate_takes_a_byte_swapped_input(kind):
    """Found by test_fuzz_gate: a big-endian float32 x was refused ("dtype float32, got >f4"),
    while the kernels take (and copy) byte-swapped arrays."""
    options = {} if kind == "softmax" else dict(k=2)
    gate = GATES[kind](4, **options, per_example=True, input_dim=3, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    expected = copy.deepcopy(gate).forward(x)
    np.testing.assert_array_equal(gate.forward(x.astype(">f4")), expected)


# ---------------------------------------------------------------------------------------------
# Gate and spec options (deterministic)
# ---------------------------------------------------------------------------------------------

DTYPE_VALUES = {"float16": "float16", "int64": np.int64, "bogus": "bogus", "None": None, "object": object}
OPTIONS = {  # option -> kind of BAD_SCALARS ("dtype": DTYPE_VALUES)
    "n_experts": "size", "k": "count", "gamma": "positive", "entropy_reg": "nonneg", "xi": "nonneg",
    "eps": "positive", "temperature": "positive", "per_example": "bool", "input_dim": "size", "noisy": "bool",
    "seed": "size", "dtype": "dtype",
}
VALID = {"dselect_k": dict(n_experts=4, k=2), "top_k": dict(n_experts=4, k=2), "softmax": dict(n_experts=4),
         "softmax_selector": dict(n_experts=4, k=2)}
SPECS = {"dselect_k": dk.gates.DSelectK, "top_k": dk.gates.TopK, "softmax": dk.gates.Softmax,
         "softmax_selector": dk.gates.SoftmaxSelector}


def _option_names(cls):
    return [p for p in inspect.signature(cls).parameters if p in OPTIONS]


def _option_cases():
    for kind in sorted(GATES):
        for target, cls in (("gate", GATES[kind]), ("spec", SPECS[kind])):
            for option in _option_names(cls):
                values = DTYPE_VALUES if OPTIONS[option] == "dtype" else BAD_SCALARS[OPTIONS[option]]
                for label in values:
                    yield pytest.param(kind, target, option, label, id=f"{target}-{kind}-{option}={label}")


@pytest.mark.parametrize("kind, target, option, label", list(_option_cases()))
def test_gate_option(kind, target, option, label):
    values = DTYPE_VALUES if OPTIONS[option] == "dtype" else BAD_SCALARS[OPTIONS[option]]
    kwargs = dict(VALID[kind])
    if option in ("input_dim",) or kwargs.get("per_example"):
        kwargs["per_example"] = True
    kwargs[option] = values[label]
    if target == "spec":
        kwargs.pop("n_experts", None)
        make = SPECS[kind]
    else:
        make = GATES[kind]
    try:
        made = make(**kwargs)
        if target == "spec":  # a spec that validates builds a gate (or says why not, for float32)
            made = made.build(n_experts=4, input_dim=3 if getattr(made, "per_example", False) else None, rng=0,
                              dtype="float32")
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    bad = [name for name, p in made.params.items() if not np.all(np.isfinite(p))]
    assert not bad, f"accepted {option}={label} and made non-finite parameters {bad}"


# ---------------------------------------------------------------------------------------------
# Models: forward, predict, evaluate, fit
# ---------------------------------------------------------------------------------------------

def _model(g):
    p, T = g.size(1, 4), g.size(1, 2)
    losses = [g.pick("mse", "bce") for _ in range(T)]
    common = dict(seed=g.size(0, 9), dtype=g.dtype)
    kind = g.pick("MMoE", "MoE", "SharedBottom")
    if kind == "SharedBottom":
        return dk.SharedBottom(p, n_tasks=T, bottom_units=(g.size(1, 3),), tower_units=(2,), task_losses=losses,
                               **common)
    n = g.size(2, 4)
    gate = g.pick("dselect_k", "top_k", "softmax")
    options = dict(k=g.size(1, min(2, n))) if gate != "softmax" else {}
    if kind == "MoE":
        return dk.MoE(p, n_experts=n, expert_units=(g.size(1, 3),), loss=losses[0], gate=gate, **options, **common)
    return dk.MMoE(p, n_tasks=T, n_experts=n, expert_units=(g.size(1, 3),), tower_units=(2,), task_losses=losses,
                   gate=gate, **options, **common)


def _targets(g, model, N):
    losses = model.config.get("task_losses") or [model.config.get("loss")]
    losses = losses if isinstance(losses, (list, tuple)) else [losses] * model.n_tasks
    return [g.rng.integers(0, 2, N).astype(g.dtype) if loss == "bce" else g.arr(N) for loss in losses]


def _history(h):
    return [{k: v for k, v in epoch.items() if k != "time"} for epoch in h.epochs]


@fuzz_settings(0.4)
@given(data=st.data())
def test_fuzz_model(data):
    g = _draw_gen(data, data.draw(st.sampled_from([np.float32, np.float64])))
    model = _model(g)
    N = g.size(1, 6)
    X = g.arr(N, model.config["input_dim"])
    Y = _targets(g, model, N)
    weights = g.arr(N, lo=0, hi=2) if g.flag() else None
    what = data.draw(st.sampled_from(["forward", "predict", "evaluate", "fit"]), label="call")
    batch_size = g.size(1, N)

    def call(X, Y, sample_weights):
        twin = copy.deepcopy(model)
        if what == "forward":
            return twin.forward(X)
        if what == "predict":
            return dk.predict(twin, X, batch_size=batch_size)
        if what == "evaluate":
            return dk.evaluate(twin, X, Y, batch_size=batch_size, sample_weights=sample_weights)
        history = dk.fit(twin, X, Y, epochs=1, batch_size=batch_size, sample_weights=sample_weights, verbose=0)
        return _history(history), {name: p.copy() for name, p in twin.parameters().items()}

    kwargs = dict(X=X, Y=Y, sample_weights=weights)
    case = Case(f"{type(model).__name__}.{what}", call, Spec(make=None, floats=("X", "sample_weights")), kwargs)
    case.perturb(data.draw)
    for t in range(len(Y)):  # the targets too, one at a time
        if data.draw(st.integers(0, 3)) == 0:
            Y[t], _ = perturb_array(data.draw, Y[t])
    check_call(case)


@pytest.mark.parametrize("make", [lambda: dk.MMoE(3, n_tasks=1, n_experts=2, expert_units=(2,), tower_units=(2,)),
                                  lambda: dk.MoE(3, n_experts=2, expert_units=(2,)),
                                  lambda: dk.SharedBottom(3, n_tasks=1, bottom_units=(2,), tower_units=(2,))],
                         ids=["MMoE", "MoE", "SharedBottom"])
def test_forward_of_a_0d_array_is_a_value_error(make):
    """Found by test_fuzz_model: model.forward of a 0-d X raised IndexError (X.shape[0])."""
    with pytest.raises(ValueError, match="0-d"):
        make().forward(np.zeros((), np.float32))
