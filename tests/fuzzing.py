"""The machinery of the fuzz suite (tests/test_fuzz_functional.py, tests/test_fuzz_models.py):
perturbations of arrays (dtypes, shapes, layouts, NaN / Inf, out-of-range indices), of aliasing and
of ``out=``; the property a perturbed call must have (ValueError / TypeError, or exactly the result
of the same call on plain copies, inputs unchanged); the out-of-range scalar values by kind; the
Hypothesis settings (``DSELECTK_FUZZ_EXAMPLES`` examples per test, default 25)."""
from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis.control import currently_in_test_context

from test_bad_input import assert_same  # exact equality of nested results (NaN == NaN)
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("DSELECTK_FUZZ_EXAMPLES", "25"))


def fuzz_settings(fraction=1.0):
    """Hypothesis settings for ``fraction`` of the example budget (slow calls such as fit get less)."""
    return settings(max_examples=max(1, int(EXAMPLES * fraction)), deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


ALLOWED = (ValueError, TypeError)


FLOAT_DTYPES = ("keep",) * 30 + ("float16", "float32", "float64", "int32", "int64", "bool", "object",
                                "complex128", "swapped", "longdouble")
INDEX_DTYPES = ("keep",) * 30 + ("int8", "int32", "uint64", "uint8", "float64", "bool", "object", "swapped")
LAYOUTS = ("C",) * 6 + ("F", "strided", "negative", "readonly", "misaligned", "broadcast")


def cast(a, kind):
    if kind == "keep":
        return a
    if kind == "swapped":
        return a.astype(a.dtype.newbyteorder())
    if kind == "object":
        return a.astype(object)
    if kind == "bool":
        return a > 0
    return a.astype(kind)


def relayout(a, kind):
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


def plain_copy(a):
    """A C-contiguous, aligned, native-order, writeable copy."""
    copy = np.array(a, dtype=a.dtype.newbyteorder("=") if a.dtype != object else object, order="C", copy=True)
    assert copy.flags.c_contiguous and copy.flags.writeable and copy.flags.aligned
    return copy


def perturb_array(draw, a, is_index=False):
    """(a perturbed copy of a, its layout): sometimes another shape, another dtype, a NaN / Inf (an
    out-of-range value for index arrays); then a layout (C, Fortran, strided, negative, ...)."""
    if draw(st.integers(0, 24)) == 0:  # another shape, random values
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=4)))
        a = np.random.default_rng(0).uniform(-1, 1, shape).astype(a.dtype)
    a = cast(a, draw(st.sampled_from(INDEX_DTYPES if is_index else FLOAT_DTYPES)))
    if a.size and draw(st.integers(0, 9)) == 0:
        a = a.copy()
        i = draw(st.integers(0, a.size - 1))
        if is_index and a.dtype.kind in "iu":
            info = np.iinfo(a.dtype)
            a.flat[i] = draw(st.sampled_from([v for v in (-1, 10**6, info.max, info.min) if info.min <= v <= info.max]))
        elif a.dtype.kind in "fc" or a.dtype == object:
            a.flat[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    layout = draw(st.sampled_from(LAYOUTS))
    return relayout(a, layout), layout


class Case:
    """A perturbed call of ``fn`` (what ``spec``, a fuzz_specs.Spec, says of its arguments): its
    kwargs, their plain copies, and whether a refusal may be due to a written array's layout."""

    def __init__(self, name, fn, spec, kwargs):
        self.name, self.fn, self.spec, self.kwargs = name, fn, spec, kwargs
        self.written = set(self.spec.inplace)  # names of the arrays the call writes
        self.layout_refusable = False  # a written array has a layout or an alias the kernels refuse

    def perturb(self, draw):
        spec, kw = self.spec, self.kwargs
        names = [n for n in spec.floats + spec.indices + spec.inplace if isinstance(kw.get(n), np.ndarray)]
        for n in names:
            kw[n], layout = perturb_array(draw, kw[n], n in spec.indices)
            if n in self.written and (layout != "C" or not kw[n].dtype.isnative):
                self.layout_refusable = True
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
            result = self.fn(**{k: copy_value(v) for k, v in self.kwargs.items()})
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
            out = relayout(cast(out, draw(st.sampled_from(FLOAT_DTYPES))), draw(st.sampled_from(LAYOUTS)))
        self.kwargs["out"] = out
        self.written.add("out")
        self.layout_refusable = True  # out is never copied: any layout but plain C may be refused; so may aliasing

    def plain(self):
        return {k: copy_value(v) for k, v in self.kwargs.items()}


def copy_value(v):
    if isinstance(v, np.ndarray):
        return plain_copy(v)
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v)(*(copy_value(x) for x in v))
    if isinstance(v, list):
        return [copy_value(x) for x in v]
    return v


def attempt(fn, kwargs):
    try:
        return fn(**kwargs), None
    except Exception as exc:  # noqa: BLE001 - the exception type is what the test checks
        return None, exc


def arrays_in(kwargs):
    seen = {}
    for k, v in kwargs.items():
        for i, a in enumerate(v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(a, np.ndarray) and id(a) not in seen:
                seen[id(a)] = (f"{k}[{i}]" if isinstance(v, (tuple, list)) else k, a)
    return list(seen.values())


def state(a):
    """What a call must not change: the bytes, or for object arrays the identity of each element."""
    return a.tobytes() if a.dtype != object else tuple(map(id, a.flat))


def snapshot(kwargs):
    return [(label, a, state(a)) for label, a in arrays_in(kwargs)]


def changed(snap):
    return [label for label, a, before in snap if state(a) != before]


def check_call(case):
    """The fuzz property for one perturbed call (see the module docstring): ValueError / TypeError,
    or the result of the plain copies; unwritten arrays unchanged; nothing changed by a refusal."""
    fn, kwargs, ref_kwargs = case.fn, case.kwargs, case.plain()
    written = {id(kwargs[n]) for n in case.written if isinstance(kwargs.get(n), np.ndarray)}
    before = snapshot(kwargs)
    ref, ref_exc = attempt(fn, ref_kwargs)
    got, exc = attempt(fn, kwargs)
    if currently_in_test_context():  # --hypothesis-show-statistics: how many calls returned, how many raised
        event(f"{case.name}: {'returned' if exc is None else 'raised ' + type(exc).__name__}")
    for e in (exc, ref_exc):
        if e is not None and not isinstance(e, ALLOWED):  # raised as is, for xfail(raises=...) to match
            if hasattr(e, "add_note"):
                e.add_note(f"fuzz: {case.name} must raise ValueError or TypeError, not {type(e).__name__}")
            raise e
        if e is not None:
            assert str(e), f"{case.name} raised {type(e).__name__} without a message"
    if exc is not None:
        assert not changed(before), f"{case.name} raised ({exc}) but modified {changed(before)}"
        if ref_exc is None:
            assert case.layout_refusable, (
                f"{case.name} refused arrays whose C-contiguous copies it accepts: {type(exc).__name__}: {exc}")
        return
    assert ref_exc is None, f"{case.name} accepted arrays whose C-contiguous copies it refuses ({ref_exc})"
    assert_same(got, ref)
    for n in case.written:
        if isinstance(kwargs.get(n), np.ndarray):
            assert_same(kwargs[n], ref_kwargs[n], f"{n} (updated in place)")
    modified = [label for label, a, _ in before if id(a) not in written and label in changed(before)]
    assert not modified, f"{case.name} modified its input(s) {modified}"


def describe(v):
    if isinstance(v, np.ndarray):
        return f"array{v.shape} {v.dtype} strides={v.strides} C={v.flags.c_contiguous} w={v.flags.writeable}"
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v).__name__
    return repr(v)


HUGE = 10**400  # a Python int no C type holds (float() of it raises OverflowError)
BAD_SCALARS = {
    "positive": {"0": 0.0, "-1": -1.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                 "10**400": HUGE, "-10**400": -HUGE, "True": True, "None": None, "str": "1.0",
                 "np.nan": np.float64("nan"), "1e308": 1e308, "subnormal": 5e-324},
    "nonneg": {"-1": -1.0, "-1e-300": -1e-300, "nan": float("nan"), "inf": float("inf"), "10**400": HUGE,
               "True": True, "None": None, "str": "0"},
    "unit": {"-0.1": -0.1, "1": 1.0, "1.5": 1.5, "nan": float("nan"), "inf": float("inf"), "10**400": HUGE,
             "True": True, "None": None},
    "prob": {"-0.1": -0.1, "1": 1.0, "1.5": 1.5, "nan": float("nan"), "inf": float("inf"), "10**400": HUGE,
             "True": True, "None": None, "str": "0.5"},
    "size": {"-1": -1, "0": 0, "2**31": 2**31, "2**63": 2**63, "2**64": 2**64, "10**400": HUGE,
             "-10**400": -HUGE, "True": True, "1.5": 1.5, "nan": float("nan"), "None": None, "str": "3",
             "np.int64(-1)": np.int64(-1), "np.uint64(max)": np.uint64(2**64 - 1)},
    "count": {"0": 0, "-1": -1, "2**63": 2**63, "2**64": 2**64, "10**400": HUGE, "True": True, "1.5": 1.5,
              "None": None, "str": "1", "np.int8(-1)": np.int8(-1)},
    "u64": {"-1": -1, "2**64": 2**64, "10**400": HUGE, "True": True, "1.5": 1.5, "nan": float("nan"),
            "None": None},
    "bool": {"None": None, "str": "yes", "2": 2, "nan": float("nan"), "np.True_": np.True_, "list": []},
    "layout": {"bad": "bad", "None": None, "3": 3, "bytes": b"nbd", "upper": "NBD"},
    "pair": {"0": 0, "-1": -1, "(1,)": (1,), "(1, 2, 3)": (1, 2, 3), "(0, 1)": (0, 1), "(-1, 1)": (-1, 1),
             "10**400": HUGE, "(10**400, 1)": (HUGE, 1), "2**63": 2**63, "1.5": 1.5, "None": None, "str": "2",
             "(True, 1)": (True, 1), "True": True},
    "padding": {"bad": "bad", "-1": -1, "(1, -1)": (1, -1), "(1, 2, 3)": (1, 2, 3), "10**400": HUGE,
                "None": None, "1.5": 1.5, "(True, 0)": (True, 0), "(10**400, 0)": (HUGE, 0)},
}
