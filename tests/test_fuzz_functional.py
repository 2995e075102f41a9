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
every hand edit, in another. Both must raise ValueError / TypeError; the known failures of issue #16
item 4 (OverflowError, IndexError, AttributeError, ZeroDivisionError today) are strict xfails, so
that each fix shows up as an XPASS to remove.

Budget: ``DSELECTK_FUZZ_EXAMPLES`` examples per function (default 25; e.g. 2000 for a long run).
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dselectk
from dselectk import functional as F
from fuzz_specs import SPECS, Gen

EXAMPLES = int(os.environ.get("DSELECTK_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
ALLOWED = (ValueError, TypeError)


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
# Perturbations
# ---------------------------------------------------------------------------------------------

FLOAT_DTYPES = ("keep",) * 8 + ("float16", "float32", "float64", "int32", "int64", "bool", "object",
                                "complex128", "swapped", "longdouble")
INDEX_DTYPES = ("keep",) * 8 + ("int8", "int32", "uint64", "uint8", "float64", "bool", "object", "swapped")
LAYOUTS = ("C",) * 6 + ("F", "strided", "negative", "readonly", "misaligned", "broadcast")


def _cast(a, kind):
    if kind == "keep":
        return a
    if kind == "swapped":
        return a.astype(a.dtype.newbyteorder())
    if kind == "object":
        return a.astype(object)
    if kind == "bool":
        return a > 0
    return a.astype(kind)


def _relayout(a, kind):
    """The same values in another memory layout."""
    if kind == "C" or a.ndim == 0 or a.dtype == object and kind == "misaligned":
        return a
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.zeros(tuple(2 * s for s in a.shape), a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if kind == "negative":
        return np.flip(np.flip(a).copy())
    if kind == "readonly":
        a = a.copy()
        a.flags.writeable = False
        return a
    if kind == "misaligned":
        raw = np.zeros(a.nbytes + 1, np.uint8)[1:]
        view = raw.view(a.dtype).reshape(a.shape) if a.nbytes else np.zeros(a.shape, a.dtype)
        view[...] = a
        return view
    if kind == "broadcast":  # stride 0 along a new leading axis of length 1, then dropped: same values
        if a.ndim == 0 or a.shape[0] != 1:
            return a
        return np.broadcast_to(a[:1], a.shape)
    raise AssertionError(kind)


def _plain(a):
    """A C-contiguous, aligned, native-order, writeable copy."""
    copy = np.array(a, dtype=a.dtype.newbyteorder("=") if a.dtype != object else object, order="C", copy=True)
    assert copy.flags.c_contiguous and copy.flags.writeable and copy.flags.aligned
    return copy


class Case:
    """A perturbed call: its kwargs, the plain copies, and what may legitimately be refused."""

    def __init__(self, name, kwargs):
        self.name, self.kwargs = name, kwargs
        self.spec = SPECS[name]
        self.written = set(self.spec.inplace)  # names of the arrays the call writes
        self.layout_refusable = False  # a written array has a layout or an alias the kernels refuse

    def perturb(self, draw):
        spec, kw = self.spec, self.kwargs
        names = [n for n in spec.floats + spec.indices + spec.inplace if isinstance(kw.get(n), np.ndarray)]
        for n in names:
            a = kw[n]
            is_index = n in spec.indices
            if draw(st.integers(0, 24)) == 0:  # another shape, random values
                shape = tuple(draw(st.lists(st.integers(0, 3), max_size=4)))
                a = np.random.default_rng(0).uniform(-1, 1, shape).astype(a.dtype)
            a = _cast(a, draw(st.sampled_from(INDEX_DTYPES if is_index else FLOAT_DTYPES)))
            if a.size and draw(st.integers(0, 9)) == 0:
                a = a.copy()
                i = draw(st.integers(0, a.size - 1))
                if is_index and a.dtype.kind in "iu":
                    info = np.iinfo(a.dtype)
                    a.flat[i] = draw(st.sampled_from([v for v in (-1, 10**6, info.max, info.min)
                                                      if info.min <= v <= info.max]))
                elif a.dtype.kind in "fc" or a.dtype == object:
                    a.flat[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            layout = draw(st.sampled_from(LAYOUTS))
            a = _relayout(a, layout)
            if n in self.written and (layout != "C" or not a.dtype.isnative):
                self.layout_refusable = True
            kw[n] = a
        if spec.out:
            self._perturb_out(draw)
        # aliasing: one array argument replaced by another of the same shape and dtype
        names = [n for n in names if isinstance(kw.get(n), np.ndarray)] + (["out"] if kw.get("out") is not None else [])
        if len(names) >= 2 and draw(st.integers(0, 7)) == 0:
            src, dst = draw(st.permutations(names))[:2]
            if kw[src].shape == kw[dst].shape and kw[src].dtype == kw[dst].dtype:
                kw[dst] = kw[src]
                if {src, dst} & self.written:
                    self.layout_refusable = True

    def _perturb_out(self, draw):
        kind = draw(st.sampled_from(["none", "none", "fresh", "fresh", "alias", "other"]))
        if kind == "none":
            return
        try:
            result = _fn(self.name)(**{k: _copy(v) for k, v in self.kwargs.items()})
        except ALLOWED:
            result = None
        if not isinstance(result, np.ndarray):  # the perturbed call fails: any array will do
            result = np.zeros(draw(st.sampled_from([(2,), (3, 2), (0,)])), np.float64)
        if kind == "alias":
            same = [v for k, v in self.kwargs.items() if isinstance(v, np.ndarray) and v.shape == result.shape
                    and v.dtype == result.dtype]
            out = draw(st.sampled_from(same)) if same else np.full_like(result, 7.0)
        else:
            out = np.full(result.shape, 7.0, result.dtype)
        if kind == "other":
            out = _relayout(_cast(out, draw(st.sampled_from(FLOAT_DTYPES))), draw(st.sampled_from(LAYOUTS)))
        self.kwargs["out"] = out
        self.written.add("out")
        self.layout_refusable = True  # out is never copied: any layout but plain C may be refused; so may aliasing

    def plain(self):
        return {k: _copy(v) for k, v in self.kwargs.items()}


def _copy(v):
    if isinstance(v, np.ndarray):
        return _plain(v)
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v)(*(_copy(x) for x in v))
    return v


def _fn(name):
    return SPECS[name].call or getattr(F, name)


def _attempt(fn, kwargs):
    try:
        return fn(**kwargs), None
    except Exception as exc:  # noqa: BLE001 - the exception type is what the test checks
        return None, exc


def _arrays(kwargs):
    seen = {}
    for k, v in kwargs.items():
        for i, a in enumerate(v if isinstance(v, tuple) else (v,)):
            if isinstance(a, np.ndarray) and id(a) not in seen:
                seen[id(a)] = (f"{k}[{i}]" if isinstance(v, tuple) else k, a)
    return list(seen.values())


def _state(a):
    """What a call must not change: the bytes, or for object arrays the identity of each element."""
    return a.tobytes() if a.dtype != object else tuple(map(id, a.flat))


def _snapshot(kwargs):
    return [(label, a, _state(a)) for label, a in _arrays(kwargs)]


def _changed(snapshot):
    return [label for label, a, before in snapshot if _state(a) != before]


def assert_same(a, b, path="result"):
    """Exact equality of nested results (NaN == NaN)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), f"{path}: {type(a)} vs {type(b)}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("="), f"{path}: dtype {a.dtype} != {b.dtype}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {type(a)} vs {type(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and (a == b or (a != a and b != b)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def check_call(case):
    """The fuzz property for one perturbed call (see the module docstring)."""
    fn, kwargs, ref_kwargs = _fn(case.name), case.kwargs, case.plain()
    written = {id(kwargs[n]) for n in case.written if isinstance(kwargs.get(n), np.ndarray)}
    snapshot = _snapshot(kwargs)
    ref, ref_exc = _attempt(fn, ref_kwargs)
    got, exc = _attempt(fn, kwargs)
    for e in (exc, ref_exc):
        if e is not None and not isinstance(e, ALLOWED):
            raise AssertionError(f"{case.name} raised {type(e).__name__} (expected ValueError or TypeError): {e}") from e
        if e is not None:
            assert str(e), f"{case.name} raised {type(e).__name__} without a message"
    if exc is not None:
        assert not _changed(snapshot), f"{case.name} raised ({exc}) but modified {_changed(snapshot)}"
        if ref_exc is None:
            assert case.layout_refusable, (
                f"{case.name} refused arrays whose C-contiguous copies it accepts: {type(exc).__name__}: {exc}")
        return
    assert ref_exc is None, f"{case.name} accepted arrays whose C-contiguous copies it refuses ({ref_exc})"
    assert_same(got, ref)
    for n in case.written:
        if isinstance(kwargs.get(n), np.ndarray):
            assert_same(kwargs[n], ref_kwargs[n], f"{n} (updated in place)")
    changed = [label for label, a, _ in snapshot if id(a) not in written and label in _changed(snapshot)]
    assert not changed, f"{case.name} modified its input(s) {changed}"


# ---------------------------------------------------------------------------------------------
# The fuzz test: every function, random sizes, dtypes, layouts, values and out=
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
@FUZZ
@given(data=st.data())
def test_fuzz(name, data):
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    kwargs = SPECS[name].make(Gen(lambda lo, hi: data.draw(st.integers(lo, hi)), dtype))
    case = Case(name, kwargs)
    case.perturb(data.draw)
    data.draw(st.just(sorted((k, _describe(v)) for k, v in case.kwargs.items())), label="call")
    check_call(case)


def _describe(v):
    if isinstance(v, np.ndarray):
        return f"array{v.shape} {v.dtype} strides={v.strides} C={v.flags.c_contiguous} w={v.flags.writeable}"
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v).__name__
    return repr(v)


# ---------------------------------------------------------------------------------------------
# Out-of-range scalars: every scalar argument, every bad value of its kind (deterministic)
# ---------------------------------------------------------------------------------------------

_HUGE = 10**400  # a Python int no C type holds (float() of it raises OverflowError)
BAD_SCALARS = {
    "positive": {"0": 0.0, "-1": -1.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                 "10**400": _HUGE, "-10**400": -_HUGE, "True": True, "None": None, "str": "1.0",
                 "np.nan": np.float64("nan"), "1e308": 1e308, "subnormal": 5e-324},
    "nonneg": {"-1": -1.0, "-1e-300": -1e-300, "nan": float("nan"), "inf": float("inf"), "10**400": _HUGE,
               "True": True, "None": None, "str": "0"},
    "unit": {"-0.1": -0.1, "1": 1.0, "1.5": 1.5, "nan": float("nan"), "inf": float("inf"), "10**400": _HUGE,
             "True": True, "None": None},
    "size": {"-1": -1, "0": 0, "2**31": 2**31, "2**63": 2**63, "2**64": 2**64, "10**400": _HUGE,
             "-10**400": -_HUGE, "True": True, "1.5": 1.5, "nan": float("nan"), "None": None, "str": "3",
             "np.int64(-1)": np.int64(-1), "np.uint64(max)": np.uint64(2**64 - 1)},
    "count": {"0": 0, "-1": -1, "2**63": 2**63, "2**64": 2**64, "10**400": _HUGE, "True": True, "1.5": 1.5,
              "None": None, "str": "1", "np.int8(-1)": np.int8(-1)},
    "u64": {"-1": -1, "2**64": 2**64, "10**400": _HUGE, "True": True, "1.5": 1.5, "nan": float("nan"),
            "None": None},
    "bool": {"None": None, "str": "yes", "2": 2, "nan": float("nan"), "np.True_": np.True_, "list": []},
    "layout": {"bad": "bad", "None": None, "3": 3, "bytes": b"nbd", "upper": "NBD"},
    "pair": {"0": 0, "-1": -1, "(1,)": (1,), "(1, 2, 3)": (1, 2, 3), "(0, 1)": (0, 1), "(-1, 1)": (-1, 1),
             "10**400": _HUGE, "(10**400, 1)": (_HUGE, 1), "2**63": 2**63, "1.5": 1.5, "None": None, "str": "2",
             "(True, 1)": (True, 1), "True": True},
    "padding": {"bad": "bad", "-1": -1, "(1, -1)": (1, -1), "(1, 2, 3)": (1, 2, 3), "10**400": _HUGE,
                "None": None, "1.5": 1.5, "(True, 0)": (True, 0), "(10**400, 0)": (_HUGE, 0)},
}


def _base_kwargs(name, dtype=np.float64):
    """A valid call of ``name`` with a non-empty batch (the first seed whose call succeeds)."""
    for seed in range(100):
        rnd = random.Random(seed)
        kwargs = SPECS[name].make(Gen(rnd.randint, dtype))
        try:
            _fn(name)(**{k: _copy(v) for k, v in kwargs.items()})
        except ALLOWED:
            continue
        return kwargs
    raise AssertionError(f"no valid call of {name} in 100 seeds")


def _scalar_cases():
    for name, spec in sorted(SPECS.items()):
        for arg, kind in spec.scalars.items():
            for label in BAD_SCALARS[kind]:
                yield pytest.param(name, arg, label, id=f"{name}-{arg}={label}",
                                   marks=_known_scalar_failure(name, arg, kind, label))


def _known_scalar_failure(name, arg, kind, label):
    return ()


@pytest.mark.parametrize("name, arg, label", list(_scalar_cases()))
def test_out_of_range_scalar(name, arg, label):
    kwargs = _base_kwargs(name)
    kwargs[arg] = BAD_SCALARS[SPECS[name].scalars[arg]][label]
    check_call(Case(name, kwargs))
