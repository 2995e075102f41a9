"""Property-based fuzzing of every public function of ``dselectk.functional`` (Hypothesis), driven
by the table in ``tests/fuzz_specs.py``.

Each example builds a valid call of random sizes (0 included), then perturbs it: dtypes (float16,
float32, float64, ints, bool, object, byte-swapped), shapes, layouts (Fortran order, non-unit and
negative strides, read-only, misaligned), NaN / Inf entries, out-of-range indices, aliasing between
arguments, and ``out=`` (fresh, aliasing an input, read-only, non-contiguous, wrong dtype). The
property: the call raises ValueError or TypeError, or it returns exactly what the same call returns
on C-contiguous, aligned, native, writeable copies of its arrays (in-place arguments and ``out``
included); arrays it does not update are never modified, and a call that raises modifies nothing.
A call that the copies accept may be refused only because of the layout or aliasing of an array
that is written to (``out``, in-place arguments), which are never copied.

Scalars: every scalar argument gets every out-of-range value of its kind (negative, 0, NaN, Inf,
10**400 as a Python int, 2**64, bool, None, str) in a deterministic test, and every cache argument
every hand edit, in another. Both must raise ValueError / TypeError (before issue #16 item 4, 10**400
raised OverflowError and edited caches IndexError / AttributeError).

Budget: ``DSELECTK_FUZZ_EXAMPLES`` examples per function (default 25; e.g. 2000 for a long run).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dselectk import functional as F
from fuzz_specs import SPECS, Gen
from fuzzing import (ALLOWED, BAD_SCALARS, HUGE, Case, check_call, copy_value, describe, fuzz_settings,
                     relayout)


def _fn(name):
    return SPECS[name].call or getattr(F, name)


def _case(name, kwargs):
    return Case(name, _fn(name), SPECS[name], kwargs)


# ---------------------------------------------------------------------------------------------
# The table covers the API
# ---------------------------------------------------------------------------------------------

def test_every_public_function_has_a_spec():
    """A function added to functional.__all__ (a new gate kernel, say) must get a fuzz spec."""
    missing = sorted(set(F.__all__) - set(SPECS))
    assert not missing, f"no entry in tests/fuzz_specs.py SPECS for: {missing}"
    assert not set(SPECS) - set(F.__all__), "SPECS names a function that functional no longer exports"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_builds_valid_calls(name):
    """The builders make calls the function accepts (else the fuzzing would test only refusals)."""
    spec, ok = SPECS[name], 0
    for seed in range(20):
        rnd = random.Random(seed)
        kwargs = spec.make(Gen(rnd.randint, rnd.choice([np.float32, np.float64])))
        try:
            _fn(name)(**kwargs)
            ok += 1
        except ValueError as e:  # an empty batch is refused, by design
            assert "empty" in str(e), f"{name}: a valid call was refused: {e}"
    assert ok >= 5, f"{name}: only {ok} of 20 built calls succeeded"


# ---------------------------------------------------------------------------------------------
# The fuzz test: every function, random sizes, dtypes, layouts, values and out=
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
@fuzz_settings()
@given(data=st.data())
def test_fuzz(name, data):
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    kwargs = SPECS[name].make(Gen(lambda lo, hi: data.draw(st.integers(lo, hi)), dtype))
    case = _case(name, kwargs)
    case.perturb(data.draw)
    data.draw(st.just(sorted((k, describe(v)) for k, v in case.kwargs.items())), label="call")
    check_call(case)


# ---------------------------------------------------------------------------------------------
# Out-of-range scalars: every scalar argument, every bad value of its kind (deterministic)
# ---------------------------------------------------------------------------------------------

def _base_kwargs(name, dtype=np.float64):
    """A valid call of ``name`` with a non-empty batch (the first seed whose call succeeds)."""
    for seed in range(100):
        rnd = random.Random(seed)
        kwargs = SPECS[name].make(Gen(rnd.randint, dtype))
        try:
            _fn(name)(**{k: copy_value(v) for k, v in kwargs.items()})
        except ALLOWED:
            continue
        return kwargs
    raise AssertionError(f"no valid call of {name} in 100 seeds")


def _scalar_cases():
    for name, spec in sorted(SPECS.items()):
        for arg, kind in spec.scalars.items():
            for label in BAD_SCALARS[kind]:
                yield pytest.param(name, arg, label, id=f"{name}-{arg}={label}")


@pytest.mark.parametrize("name, arg, label", list(_scalar_cases()))
def test_out_of_range_scalar(name, arg, label):
    kwargs = _base_kwargs(name)
    kwargs[arg] = BAD_SCALARS[SPECS[name].scalars[arg]][label]
    check_call(_case(name, kwargs))


# ---------------------------------------------------------------------------------------------
# Hand-edited caches: every field of every cache argument, every edit (deterministic)
# ---------------------------------------------------------------------------------------------

def _array_edits(a):
    other = np.float32 if a.dtype == np.float64 else np.float64
    nan = a.copy()
    if nan.size:
        nan.flat[0] = np.nan
    return {"None": None, "list": a.tolist(), "drop_axis": a[..., 0] if a.ndim and a.shape[-1] else a.reshape(-1),
            "extra_axis": a[None], "shrink": a[..., :-1] if a.ndim else a.reshape(1)[:0],
            "grow": np.concatenate([a, a], axis=-1) if a.ndim else a.reshape(1),
            "other_dtype": a.astype(other), "int64": a.astype(np.int64), "nan": nan, "strided": relayout(a, "strided")}


SCALAR_EDITS = {"nan": float("nan"), "-1": -1.0, "0": 0.0, "inf": float("inf"), "10**400": HUGE, "str": "x",
                "None": None}
BOOL_EDITS = {"flip": "flip", "None": None, "str": "x"}


def _cache_edits(cache, prefix=""):
    """(label, edited cache) for every field of a (possibly nested) cache."""
    for i, (field, value) in enumerate(zip(cache._fields, cache)):
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            for label, inner in _cache_edits(value, f"{prefix}{field}."):
                yield label, cache._replace(**{field: inner})
            continue
        if isinstance(value, np.ndarray):
            edits = _array_edits(value)
        elif isinstance(value, bool):
            edits = {k: (not value if v == "flip" else v) for k, v in BOOL_EDITS.items()}
        else:
            edits = SCALAR_EDITS
        for label, edited in edits.items():
            yield f"{prefix}{field}={label}", cache._replace(**{field: edited})


def _whole_cache_edits(cache):
    return {"None": None, "tuple": tuple(cache), "dict": cache._asdict(), "int": 3}


def _cache_cases():
    for name, spec in sorted(SPECS.items()):
        for arg in spec.caches:
            cache = _base_kwargs(name)[arg]
            labels = [label for label, _ in _cache_edits(cache)] + [f"cache={k}" for k in _whole_cache_edits(cache)]
            for label in labels:
                yield pytest.param(name, arg, label, id=f"{name}-{label}")


@pytest.mark.parametrize("name, arg, label", list(_cache_cases()))
def test_edited_cache(name, arg, label):
    kwargs = _base_kwargs(name)
    cache = kwargs[arg]
    edits = dict(_cache_edits(cache))
    edits.update({f"cache={k}": v for k, v in _whole_cache_edits(cache).items()})
    kwargs[arg] = edits[label]
    check_call(_case(name, kwargs))
