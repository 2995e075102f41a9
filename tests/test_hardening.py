"""Hardening (issue #16): optimizer state is input, numbers out of range, hand-edited caches and
model sizes that cannot fit. Each case must raise ValueError / TypeError saying what was wrong,
never crash, never change an argument when it raises, never OverflowError / IndexError /
AttributeError / ZeroDivisionError.

The cases reuse the input zoo of ``test_bad_input.py`` (its valid calls, ``SPECS``, and its
checked call, which asserts that a refused call changed no array), so every function there is
covered here too.
"""
from __future__ import annotations

import numpy as np
import pytest
from test_bad_input import F32, F64, INF, NAN, SPECS, _name_re, call_spec, run_subcases, short_failures

import dselectk as dk
from dselectk import functional as F
from dselectk import optim

# ---------------------------------------------------------------------------------------------
# Optimizer state is input too (issue #16, item 2). NaN / Inf in every state slab is in the NaN
# zoo of test_bad_input.py; here: the sign of the slabs of squared gradients, what trusted_inputs
# skips, and the optimizer classes.
# ---------------------------------------------------------------------------------------------

# (spec, slab of squared gradients: v = a mean of g**2, accum = a sum of g**2)
SQUARED_STATE = [(f"{p}.{name}", arg) for p in ("F", "C")
                 for name, arg in (("adam_step", "v"), ("adagrad_step", "accum"), ("sparse_adam_step", "v"),
                                   ("sparse_adagrad_step", "accum"))]


@pytest.mark.parametrize("sid,arg", SQUARED_STATE, ids=[f"{s}-{a}" for s, a in SQUARED_STATE])
@short_failures
def test_negative_squared_state_is_refused(sid, arg):
    """A negative entry of v / accum (whose square root the step takes) -> ValueError naming it,
    and nothing changes; -0.0 is a valid zero."""
    spec = SPECS[sid]

    def case(value, dtype, where, match=">= 0"):
        kwargs = spec.build(dtype)
        a = kwargs[arg]
        a.reshape(-1)[where(a.size)] = value  # the sparse specs list the rows of flat 0, n // 2, n - 1
        call_spec(spec, kwargs, ValueError, _name_re(arg) + ".*" + match)

    def signed_zero(dtype):
        kwargs = spec.build(dtype)
        kwargs[arg].reshape(-1)[0] = -0.0
        call_spec(spec, kwargs)
    run_subcases([
        ("-0.5-float32-first", lambda: case(-0.5, F32, lambda n: 0)),
        ("-1e-30-float64-middle", lambda: case(-1e-30, F64, lambda n: n // 2)),
        ("-tiny-float32-last", lambda: case(-np.finfo(F32).tiny, F32, lambda n: n - 1)),
        ("-subnormal-float64-first", lambda: case(-5e-324, F64, lambda n: 0)),
        ("-subnormal-float32-middle", lambda: case(-1e-45, F32, lambda n: n // 2)),
        ("-max-float64-last", lambda: case(-np.finfo(F64).max, F64, lambda n: n - 1)),
        ("-inf-float64-last", lambda: case(-INF, F64, lambda n: n - 1, "NaN or Inf")),
        ("-0.0-valid-float32", lambda: signed_zero(F32)),
        ("-0.0-valid-float64", lambda: signed_zero(F64)),
    ])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("size", [1, 3, 4095, 4096, 4097, 20_000])
def test_fused_slab_check_finds_every_bad_entry(dtype, size):
    """The dense steps check params, grads and the state in one fused pass: a bad entry anywhere in
    any slab, of any size, is found and named with its first index; the first slab (in argument
    order) with a bad entry is the one named."""
    rng = np.random.default_rng(size)
    names = ("params", "grads", "m", "v")
    for slab, bad in [(j, b) for j in range(4) for b in (NAN, INF, -INF)] + [(3, -1.0)]:
        a = {n: rng.uniform(0.1, 1, size).astype(dtype) for n in names}
        where = int(rng.integers(size))
        a[names[slab]][where] = bad
        if where + 1 < size:
            a[names[slab]][size - 1] = NAN  # a later bad entry does not change the index reported
        if slab < 3:
            a["v"][0] = -2.0  # a later slab's bad entry does not change the slab reported
        kind = ">= 0" if bad == -1.0 else "NaN or Inf"
        with pytest.raises(ValueError, match=rf"'{names[slab]}' .*{kind}.*{where}"):
            F.adam_step(a["params"], a["grads"], a["m"], a["v"], 1)


def test_negative_state_message_names_the_entry():
    p, g, m, v = np.ones(5), np.ones(5), np.zeros(5), np.zeros(5)
    v[3] = -0.25
    with pytest.raises(ValueError, match=r"argument 'v' must hold values >= 0 .*v\[3\] = -0\.25"):
        F.adam_step(p, g, m, v, 1)
    table, accum = np.ones((4, 2)), np.zeros((4, 2))
    accum[2, 1] = -1.0
    with pytest.raises(ValueError, match=r"'accum' must hold values >= 0 .*accum\[2, 1\] = -1 .*rows\[1\]"):
        F.sparse_adagrad_step(table, accum, np.array([0, 2]), np.ones((2, 2)))


def test_sgd_velocity_is_checked_only_when_read():
    """velocity is not read (nor written) when momentum == 0: a NaN there is not an error then."""
    p, g, v = np.ones(4), np.ones(4), np.full(4, NAN)
    F.sgd_step(p, g, v, 0.1)
    assert np.array_equal(p, np.full(4, 0.9)) and np.isnan(v).all()
    with pytest.raises(ValueError, match="'velocity' contains NaN or Inf"):
        F.sgd_step(p, g, v, 0.1, momentum=0.9)


def _dense_state_calls():
    """(name, call, the state slab it corrupts) per dense step: the corrupted slab is the state's."""
    def sgd(state):
        F.sgd_step(np.ones(6), np.ones(6), state, 0.1, momentum=0.9)

    def adam(state):
        F.adam_step(np.ones(6), np.ones(6), state, np.ones(6), 2)

    def adagrad(state):
        F.adagrad_step(np.ones(6), np.ones(6), state)
    return [("sgd", sgd), ("adam", adam), ("adagrad", adagrad)]


@pytest.mark.parametrize("name,step", _dense_state_calls(), ids=[c[0] for c in _dense_state_calls()])
def test_trusted_inputs_skips_the_dense_state_scan(name, step):
    """The documented decision: inside trusted_inputs the O(N) value scans of a dense step's slabs
    are skipped, its state's included (the NaN then propagates); outside they run."""
    state = np.ones(6)
    state[4] = NAN
    with pytest.raises(ValueError, match="NaN or Inf"):
        step(state.copy())
    with F.trusted_inputs():
        step(state.copy())  # no error: the scan is skipped, the NaN propagates
    with pytest.raises(ValueError, match="NaN or Inf"):  # and checked again after the context
        step(state.copy())


def test_trusted_inputs_keeps_the_sparse_row_checks():
    """The sparse steps' row checks (cheap: the rows read) run inside trusted_inputs too."""
    table, accum, rows, g = np.ones((5, 2)), np.zeros((5, 2)), np.array([1, 3]), np.ones((2, 2))
    accum[3, 0] = NAN
    with F.trusted_inputs():
        with pytest.raises(ValueError, match="'accum' contains NaN or Inf in row 3"):
            F.sparse_adagrad_step(table, accum, rows, g)
        m, v = np.zeros((5, 2)), np.zeros((5, 2))
        v[1, 1] = -2.0
        with pytest.raises(ValueError, match="'v' must hold values >= 0"):
            F.sparse_adam_step(table, m, v, rows, g, 1)
    assert np.array_equal(table, np.ones((5, 2)))


def _optimizer(kind):
    params, grads = np.linspace(-1, 1, 8), np.linspace(0.5, -0.5, 8)
    if kind == "sgd":
        return optim.SGD(params, grads, momentum=0.9), "velocity"
    if kind == "adam":
        return optim.Adam(params, grads), "v"
    return optim.Adagrad(params, grads), "accum"


@pytest.mark.parametrize("kind", ["sgd", "adam", "adagrad"])
@pytest.mark.parametrize("bad", [NAN, INF, -1.0], ids=["nan", "inf", "negative"])
def test_optimizer_step_with_corrupted_state_changes_nothing(kind, bad):
    """opt.step() with a NaN / Inf (or, for v and accum, negative) state entry -> ValueError naming
    the slab; params, state and the step count are as before."""
    opt, slab = _optimizer(kind)
    opt.step()
    state = getattr(opt, slab)
    state[5] = bad
    if bad == -1.0 and kind == "sgd":  # a velocity may be negative
        opt.step()
        return
    before = (opt.params.copy(), state.copy(), getattr(opt, "step_count", None))
    with pytest.raises(ValueError, match=f"'{slab}'"):
        opt.step()
    assert np.array_equal(opt.params, before[0]) and np.array_equal(state, before[1], equal_nan=True)
    assert getattr(opt, "step_count", None) == before[2]


@pytest.mark.parametrize("kind", ["adam", "adagrad"])
def test_sparse_optimizer_with_corrupted_state_changes_nothing(kind):
    table = np.ones((6, 3))
    opt = optim.SparseAdam([table]) if kind == "adam" else optim.SparseAdagrad([table])
    state = opt.v[0] if kind == "adam" else opt.accum[0]
    state[4, 2] = -1.0
    grads = [(np.array([1, 4]), np.ones((2, 3)))]
    with pytest.raises(ValueError, match="must hold values >= 0"):
        opt.step(grads)
    assert np.array_equal(table, np.ones((6, 3))) and getattr(opt, "step_count", 0) == 0


@pytest.mark.parametrize("kind", ["adam", "adagrad"])
def test_load_state_dict_refuses_negative_squared_state(kind):
    opt, slab = _optimizer(kind)
    d = opt.state_dict()
    d[slab][2] = -0.5
    with pytest.raises(ValueError, match=f"state_dict\\['{slab}'\\] holds negative values"):
        opt.load_state_dict(d)
    assert not np.any(getattr(opt, slab) < 0)
