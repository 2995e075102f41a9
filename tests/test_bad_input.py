"""Input zoo for every public function of ``dselectk.functional`` and every raw ``dselectk._C``
binding, in the style of pydata/bottleneck's input-checking tests.

Documented rules (``dselectk/functional.py``, ``dselectk/_binding/common.h``) under test:

* arrays must be ``numpy.ndarray`` of float32 or float64, else ``TypeError`` naming the argument;
  all arrays of one call share one dtype (``TypeError`` on a mismatch, nothing cast silently);
* a wrong ndim / size raises ``ValueError`` naming the argument and the expected shape; so do
  NaN/Inf, k < 1 or k > n, n < 2 (and n > 2**30), gamma <= 0 (NaN/inf too), T <= 0, negative
  lam/xi and an empty batch;
* non-contiguous, byte-swapped, misaligned, read-only inputs are accepted (copied) and give exactly
  the result of a C-contiguous native copy;
* ``out=`` must have the exact dtype (``TypeError``) and shape, be C-contiguous, aligned, writeable
  and share no memory with an input (``ValueError``);
* inputs are never modified -- checked after every call of this file, failing calls included;
* arrays a function updates in place (dense_backward's dW/db, the optimizer slabs) are never
  copied: a layout that would need a copy is refused, so is one sharing memory with another
  argument, and a refused call changes nothing.
* optimizer state is input too: NaN / Inf in a velocity, m, v or accum slab (in the rows a sparse
  step reads) is refused like NaN in the gradients.

Raw ``_C`` functions may be called by users too: wrong types or shapes must raise, never crash.

To keep the suite fast, a test covers one argument of one function and runs its zoo (dtypes,
layouts, ...) as sub-cases, reporting every failing sub-case by name; failures are reported as
messages (``short_failures``) because rendering full tracebacks of this module is slow.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from dselectk import _C
from dselectk import functional as F

F64, F32 = np.float64, np.float32
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------
# Helpers: snapshots of every array argument, the checked call, deep comparison of results
# ---------------------------------------------------------------------------------------------

def _arrays_in(value):
    """Every ndarray inside value (arrays, tuples / named tuples, lists, dicts)."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays_in(v)


def _snapshot(kwargs, skip=()):
    return [(a, a.copy(order="K"), a.flags.writeable)
            for key, v in kwargs.items() if key != "out" and key not in skip for a in _arrays_in(v)]


def _assert_unchanged(snaps):
    __tracebackhide__ = True
    for orig, copy, writeable in snaps:
        assert orig.shape == copy.shape and orig.dtype == copy.dtype
        assert orig.flags.writeable == writeable, "an input's writeable flag was changed"
        # byte-wise: catches changed NaN payloads and signed zeros too
        if orig.tobytes() != copy.tobytes():
            raise AssertionError("an input array was modified by the call")


def checked_call(fn, kwargs, raises=None, match=None, mutable=()):
    """Call fn(**kwargs); with raises, assert that exception type and message regex. Either way,
    assert afterwards that no input array was modified -- not even the arrays a successful call
    updates in place (``mutable``) when the call raises."""
    __tracebackhide__ = True  # failures are reported at the test's line, without array reprs
    snaps = _snapshot(kwargs, skip=mutable if raises is None else ())
    try:
        if raises is None:
            return fn(**kwargs)
        with pytest.raises(raises, match=match) as info:
            fn(**kwargs)
        return info
    finally:
        _assert_unchanged(snaps)


def _native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def assert_same(a, b, path="result"):
    """Exact (bitwise for floats, NaN == NaN) equality of nested results."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert _native(a.dtype) == _native(b.dtype), f"{path}: dtype {a.dtype} != {b.dtype}"
        assert np.array_equal(a, b, equal_nan=True), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and (a == b or (a != a and b != b)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _describe(e):
    lines = str(e).strip().splitlines() or [""]
    text = f"{type(e).__name__}: {' | '.join(l.strip() for l in lines[:3])[:400]}"
    if isinstance(e.__context__, (AssertionError, pytest.fail.Exception)):  # an earlier failure
        text += f"  (while handling {_describe(e.__context__)})"
    return text


def short_failures(test):
    """Report a failure as its message only: the full traceback of this long module costs pytest
    ~0.1 s per failure to render (it re-parses the source), which adds up over many cases."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        __tracebackhide__ = True
        try:
            return test(*args, **kwargs)
        except pytest.skip.Exception:
            raise
        except pytest.fail.Exception as e:
            if not e.pytrace:
                raise
            message = _describe(e)
        except Exception as e:
            message = _describe(e)
        pytest.fail(message, pytrace=False)  # outside the except: no chained tracebacks
    return wrapper


def run_subcases(cases):
    """Run (label, thunk) pairs and report every failing label at once (one test per argument
    keeps the suite fast; no failing sub-case hides another)."""
    __tracebackhide__ = True
    failures = []
    for label, thunk in cases:
        try:
            thunk()
        except pytest.skip.Exception:
            continue
        except (Exception, pytest.fail.Exception) as e:  # pytest.raises' failures are not Exceptions
            failures.append(f"[{label}] {_describe(e)}")
    if failures:
        pytest.fail(f"{len(failures)} of {len(cases)} sub-cases failed:\n" + "\n".join(failures), pytrace=False)


def _name_re(name):
    return re.escape(f"'{name}'")


# ---------------------------------------------------------------------------------------------
# Valid calls: every function, with the arguments that are user-supplied arrays
# ---------------------------------------------------------------------------------------------

class Mutating:
    """A function that updates some of its array arguments in place (accumulated gradients,
    optimizer slabs): returns (result, copies of those arrays after the call)."""

    def __init__(self, fn, names):
        self.raw, self.names, self.__name__ = fn, names, fn.__name__

    def __call__(self, *args, **kwargs):
        result = self.raw(*args, **kwargs)
        return (result,) + tuple(np.array(kwargs[n]) if isinstance(kwargs.get(n), np.ndarray) else kwargs.get(n)
                                 for n in self.names)


@dataclass
class Spec:
    fn: Callable
    build: Callable  # (dtype) -> kwargs of a valid call
    arrays: tuple  # user-supplied array arguments, in the order the call checks them
    finite: tuple | None = None  # arrays whose NaN/Inf must be rejected (default: all)
    optional: tuple = ()  # array arguments that may be None
    out: bool = False  # has an out= argument
    out_of: Callable = field(default=lambda r: r)  # the result that out= receives
    mutable: tuple = ()  # arrays updated in place: never copied, so layouts are refused
    float64: tuple = ()  # arrays that are float64 whatever the call's dtype (Sinkhorn's cache)
    float64_results: bool = False  # returns such a float64 cache beside its results

    def finite_arrays(self):
        return self.arrays if self.finite is None else self.finite

    def inputs(self):
        return tuple(a for a in self.arrays if a not in self.mutable)


def call_spec(spec, kwargs, raises=None, match=None):
    __tracebackhide__ = True
    return checked_call(spec.fn, kwargs, raises, match, mutable=spec.mutable)


def _rng():
    return np.random.default_rng(20240611)


def _u(rng, shape, dtype, lo=-1.5, hi=1.5):
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def _static_w(rng, dtype, n=6):
    w = _u(rng, (n,), dtype, 0.1, 1.0)
    w[2] = 0  # an exactly-zero expert, which skip_zero skips
    return w


def _many_w(rng, dtype, T=3, B=4, n=6):
    """w (T, B, n) of the multi-task mixing: expert 2 used by no task (skip_zero skips it), expert 4
    not used by task 0 only."""
    w = _u(rng, (T, B, n), dtype, 0.1, 1.0)
    w[:, :, 2] = 0
    w[0, :, 4] = 0
    return w


def _many_args(dtype, backward=False):
    rng = _rng()
    kwargs = dict(f=_u(rng, (6, 4, 5), dtype), w=_many_w(rng, dtype), skip_zero=True)
    if backward:
        kwargs = dict(dy=_u(rng, (3, 4, 5), dtype), **kwargs)
    return kwargs


def _dsk_cache(dtype, static=False):
    rng = _rng()
    if static:
        return F.dselect_k_forward(_u(rng, (3,), dtype), _u(rng, (3, 3), dtype), 8, 1.0)[1]
    return F.dselect_k_forward(_u(rng, (4, 3), dtype), _u(rng, (4, 3, 3), dtype), 8, 1.0)[1]


def _pe_args(dtype):
    rng = _rng()
    return dict(x=_u(rng, (6, 5), dtype), G=_u(rng, (3, 5), dtype), b_G=_u(rng, (3,), dtype),
                W=_u(rng, (3, 3, 5), dtype), b_W=_u(rng, (3, 3), dtype), n=8, gamma=1.0)


def _ss_cache(dtype, static=False):
    rng = _rng()
    if static:
        return F.softmax_selector_forward(_u(rng, (3,), dtype), _u(rng, (3, 6), dtype), 0.7)[1]
    return F.softmax_selector_forward(_u(rng, (4, 3), dtype), _u(rng, (4, 3, 6), dtype), 0.7)[1]


def _c_dsk_cache(dtype):
    rng = _rng()
    Z = _u(rng, (4, 3, 3), dtype)
    _, sigma, sz, r = _C.dselect_k_forward(_u(rng, (4, 3), dtype), Z, 8, 1.0)
    return dict(sigma=sigma, sz=sz, r=r, Z=Z)


def _c_ss_cache(dtype):
    rng = _rng()
    _, sigma, P = _C.softmax_selector_forward(_u(rng, (4, 3), dtype), _u(rng, (4, 3, 6), dtype), 0.7)
    return dict(sigma=sigma, P=P)


SPECS = {
    # --- dselectk.functional ---
    "F.smooth_step": Spec(
        F.smooth_step, lambda dt: dict(t=_u(_rng(), (3, 4), dt), gamma=1.0), ("t",), out=True),
    "F.smooth_step_backward": Spec(
        F.smooth_step_backward,
        lambda dt: dict(dout=_u(_rng(), (3, 4), dt), t=_u(_rng(), (3, 4), dt)[::-1].copy(), gamma=1.0),
        ("dout", "t")),
    "F.selector": Spec(
        F.selector, lambda dt: dict(s=_u(_rng(), (5, 3), dt, 0, 1), n=8), ("s",), out=True),
    "F.selector[n=6,lead]": Spec(
        F.selector, lambda dt: dict(s=_u(_rng(), (2, 3, 3), dt, 0, 1), n=6), ("s",), out=True),
    "F.selector_backward": Spec(
        F.selector_backward,
        lambda dt: dict(dr=_u(_rng(), (5, 8), dt), s=_u(_rng(), (5, 3), dt, 0, 1), n=8), ("dr", "s")),
    "F.dselect_k[static]": Spec(
        F.dselect_k, lambda dt: dict(alpha=_u(_rng(), (3,), dt), Z=_u(_rng(), (3, 3), dt), n=8, gamma=1.0),
        ("alpha", "Z")),
    "F.dselect_k_forward[static]": Spec(
        F.dselect_k_forward,
        lambda dt: dict(alpha=_u(_rng(), (3,), dt), Z=_u(_rng(), (3, 3), dt), n=8, gamma=1.0), ("alpha", "Z")),
    "F.dselect_k_forward[batched]": Spec(
        F.dselect_k_forward,
        lambda dt: dict(alpha=_u(_rng(), (4, 3), dt), Z=_u(_rng(), (4, 3, 3), dt), n=8, gamma=1.0),
        ("alpha", "Z")),
    "F.dselect_k_backward[batched]": Spec(
        F.dselect_k_backward,
        lambda dt: dict(dw=_u(_rng(), (4, 8), dt), cache=_dsk_cache(dt), lam=0.1, xi=0.1, eps=1e-6),
        ("dw",), optional=("dw",)),
    "F.dselect_k_backward[static]": Spec(
        F.dselect_k_backward,
        lambda dt: dict(dw=_u(_rng(), (8,), dt), cache=_dsk_cache(dt, static=True), lam=0.1, xi=0.1),
        ("dw",), optional=("dw",)),
    "F.dselect_k_regularization": Spec(
        F.dselect_k_regularization, lambda dt: dict(cache=_dsk_cache(dt), eps=1e-6), ()),
    "F.dselect_k_per_example_forward": Spec(
        F.dselect_k_per_example_forward, _pe_args, ("x", "G", "b_G", "W", "b_W")),
    "F.dselect_k_per_example_backward": Spec(
        F.dselect_k_per_example_backward,
        lambda dt: dict(dw=_u(_rng(), (6, 8), dt), cache=F.dselect_k_per_example_forward(**_pe_args(dt))[1],
                        lam=0.1, xi=0.1, eps=1e-6, need_dx=True),
        ("dw",), optional=("dw",)),
    "F.softmax[batched]": Spec(F.softmax, lambda dt: dict(logits=_u(_rng(), (4, 6), dt)), ("logits",), out=True),
    "F.softmax[static]": Spec(F.softmax, lambda dt: dict(logits=_u(_rng(), (6,), dt)), ("logits",), out=True),
    "F.softmax_backward": Spec(
        F.softmax_backward,
        lambda dt: dict(dw=_u(_rng(), (4, 6), dt), w=F.softmax(_u(_rng(), (4, 6), dt)[::-1].copy())),
        ("dw", "w")),
    "F.top_k[batched]": Spec(F.top_k, lambda dt: dict(logits=_u(_rng(), (4, 6), dt), k=2), ("logits",), out=True),
    "F.top_k[static]": Spec(F.top_k, lambda dt: dict(logits=_u(_rng(), (6,), dt), k=3), ("logits",), out=True),
    "F.top_k_backward": Spec(
        F.top_k_backward,
        lambda dt: dict(dw=_u(_rng(), (4, 6), dt), w=F.top_k(_u(_rng(), (4, 6), dt)[::-1].copy(), 2)),
        ("dw", "w")),
    "F.noisy_logits": Spec(
        F.noisy_logits,
        lambda dt: dict(clean=_u(_rng(), (4, 6), dt), raw_noise=_u(_rng(), (4, 6), dt)[::-1].copy(),
                        normal=_u(_rng(), (4, 6), dt)[:, ::-1].copy()),
        ("clean", "raw_noise", "normal")),
    "F.noisy_logits_backward": Spec(
        F.noisy_logits_backward,
        lambda dt: dict(dh=_u(_rng(), (4, 6), dt), raw_noise=_u(_rng(), (4, 6), dt)[::-1].copy(),
                        normal=_u(_rng(), (4, 6), dt)[:, ::-1].copy()),
        ("dh", "raw_noise", "normal")),
    "F.softmax_selector_forward[batched]": Spec(
        F.softmax_selector_forward,
        lambda dt: dict(alpha=_u(_rng(), (4, 3), dt), beta=_u(_rng(), (4, 3, 6), dt), T=0.7), ("alpha", "beta")),
    "F.softmax_selector_forward[static]": Spec(
        F.softmax_selector_forward,
        lambda dt: dict(alpha=_u(_rng(), (3,), dt), beta=_u(_rng(), (3, 6), dt), T=0.7), ("alpha", "beta")),
    "F.softmax_selector_backward[batched]": Spec(
        F.softmax_selector_backward,
        lambda dt: dict(dw=_u(_rng(), (4, 6), dt), cache=_ss_cache(dt), lam=0.1, eps=1e-6), ("dw",),
        optional=("dw",)),
    "F.softmax_selector_backward[static]": Spec(
        F.softmax_selector_backward,
        lambda dt: dict(dw=_u(_rng(), (6,), dt), cache=_ss_cache(dt, static=True), lam=0.1), ("dw",),
        optional=("dw",)),
    "F.softmax_selector_entropy": Spec(
        F.softmax_selector_entropy, lambda dt: dict(cache=_ss_cache(dt), eps=1e-6), ()),
    "F.mix_experts[nbd,static]": Spec(
        F.mix_experts,
        lambda dt: dict(f=_u(_rng(), (6, 4, 5), dt), w=_static_w(_rng(), dt), layout="nbd", skip_zero=True),
        ("f", "w"), out=True),
    "F.mix_experts[bnd,per_example]": Spec(
        F.mix_experts,
        lambda dt: dict(f=_u(_rng(), (4, 6, 5), dt), w=_u(_rng(), (4, 6), dt), layout="bnd", skip_zero=False),
        ("f", "w"), out=True),
    "F.mix_experts_backward[nbd,static]": Spec(
        F.mix_experts_backward,
        lambda dt: dict(dy=_u(_rng(), (4, 5), dt), f=_u(_rng(), (6, 4, 5), dt), w=_static_w(_rng(), dt),
                        layout="nbd", skip_zero=True),
        ("dy", "f", "w")),
    "F.mix_experts_backward[bnd,per_example]": Spec(
        F.mix_experts_backward,
        lambda dt: dict(dy=_u(_rng(), (4, 5), dt), f=_u(_rng(), (4, 6, 5), dt), w=_u(_rng(), (4, 6), dt),
                        layout="bnd", skip_zero=True),
        ("dy", "f", "w")),
    "F.mix_experts_many": Spec(F.mix_experts_many, _many_args, ("f", "w"), out=True),
    "F.mix_experts_many_backward": Spec(
        F.mix_experts_many_backward, lambda dt: _many_args(dt, backward=True), ("dy", "f", "w")),
    "F.linear": Spec(
        F.linear,
        lambda dt: dict(x=_u(_rng(), (4, 5), dt), W=_u(_rng(), (3, 5), dt), b=_u(_rng(), (3,), dt)),
        ("x", "W", "b"), optional=("b",), out=True),
    "F.linear_backward": Spec(
        F.linear_backward,
        lambda dt: dict(dy=_u(_rng(), (4, 3), dt), x=_u(_rng(), (4, 5), dt), W=_u(_rng(), (3, 5), dt)),
        ("dy", "x", "W")),
    # --- dselectk._C (raw bindings) ---
    "C.smooth_step_forward": Spec(
        _C.smooth_step_forward, lambda dt: dict(t=_u(_rng(), (7,), dt), gamma=1.0), ("t",), out=True),
    "C.smooth_step_backward": Spec(
        _C.smooth_step_backward,
        lambda dt: dict(dout=_u(_rng(), (7,), dt), t=_u(_rng(), (7,), dt)[::-1].copy(), gamma=1.0),
        ("dout", "t")),
    "C.selector_forward": Spec(
        _C.selector_forward, lambda dt: dict(s=_u(_rng(), (5, 3), dt, 0, 1), n=8), ("s",), out=True),
    "C.selector_backward": Spec(
        _C.selector_backward,
        lambda dt: dict(dr=_u(_rng(), (5, 8), dt), s=_u(_rng(), (5, 3), dt, 0, 1), n=8), ("dr", "s")),
    "C.dselect_k_forward": Spec(
        _C.dselect_k_forward,
        lambda dt: dict(alpha=_u(_rng(), (4, 3), dt), Z=_u(_rng(), (4, 3, 3), dt), n=8, gamma=1.0),
        ("alpha", "Z"), out=True, out_of=lambda r: r[0]),
    "C.dselect_k_backward": Spec(
        _C.dselect_k_backward,
        lambda dt: dict(dw=_u(_rng(), (4, 8), dt), **_c_dsk_cache(dt), gamma=1.0, lam=0.1, xi=0.1, eps=1e-6),
        ("r", "dw", "sigma", "sz", "Z"), finite=("dw", "Z"), optional=("dw",)),
    "C.selector_entropy": Spec(
        _C.selector_entropy, lambda dt: dict(r=_u(_rng(), (5, 8), dt, 0, 1), eps=1e-6), ("r",)),
    "C.selector_mass_penalty": Spec(
        _C.selector_mass_penalty, lambda dt: dict(r=_u(_rng(), (5, 8), dt, 0, 1), eps=1e-6), ("r",)),
    "C.softmax_forward": Spec(
        _C.softmax_forward, lambda dt: dict(logits=_u(_rng(), (4, 6), dt)), ("logits",), out=True),
    "C.softmax_backward": Spec(
        _C.softmax_backward,
        lambda dt: dict(dw=_u(_rng(), (4, 6), dt), w=_C.softmax_forward(_u(_rng(), (4, 6), dt)[::-1].copy())),
        ("dw", "w")),
    "C.topk_forward": Spec(
        _C.topk_forward, lambda dt: dict(logits=_u(_rng(), (4, 6), dt), k=2), ("logits",), out=True),
    "C.noisy_logits_forward": Spec(
        _C.noisy_logits_forward,
        lambda dt: dict(clean=_u(_rng(), (7,), dt), raw_noise=_u(_rng(), (7,), dt)[::-1].copy(),
                        normal=_u(_rng(), (7,), dt)[::-1] * 2),
        ("clean", "raw_noise", "normal")),
    "C.noisy_logits_backward": Spec(
        _C.noisy_logits_backward,
        lambda dt: dict(dh=_u(_rng(), (7,), dt), raw_noise=_u(_rng(), (7,), dt)[::-1].copy(),
                        normal=_u(_rng(), (7,), dt)[::-1] * 2),
        ("dh", "raw_noise", "normal")),
    "C.softmax_selector_forward": Spec(
        _C.softmax_selector_forward,
        lambda dt: dict(alpha=_u(_rng(), (4, 3), dt), beta=_u(_rng(), (4, 3, 6), dt), T=0.7), ("alpha", "beta")),
    "C.softmax_selector_backward": Spec(
        _C.softmax_selector_backward,
        lambda dt: dict(dw=_u(_rng(), (4, 6), dt), **_c_ss_cache(dt), T=0.7, lam=0.1, eps=1e-6),
        ("P", "dw", "sigma"), finite=("dw",), optional=("dw",)),
    "C.mix_experts_forward": Spec(
        _C.mix_experts_forward,
        lambda dt: dict(f=_u(_rng(), (6, 4, 5), dt), w=_static_w(_rng(), dt), layout="nbd", skip_zero=True),
        ("f", "w"), out=True),
    "C.mix_experts_backward": Spec(
        _C.mix_experts_backward,
        lambda dt: dict(dy=_u(_rng(), (4, 5), dt), f=_u(_rng(), (4, 6, 5), dt), w=_u(_rng(), (4, 6), dt),
                        layout="bnd", skip_zero=True),
        ("f", "w", "dy")),
    "C.mix_experts_many_forward": Spec(_C.mix_experts_many_forward, _many_args, ("f", "w"), out=True),
    "C.mix_experts_many_backward": Spec(
        _C.mix_experts_many_backward, lambda dt: _many_args(dt, backward=True), ("f", "w", "dy")),
    "C.linear_forward": Spec(
        _C.linear_forward,
        lambda dt: dict(x=_u(_rng(), (4, 5), dt), W=_u(_rng(), (3, 5), dt), b=_u(_rng(), (3,), dt)),
        ("x", "W", "b"), optional=("b",), out=True),
    "C.linear_backward": Spec(
        _C.linear_backward,
        lambda dt: dict(dy=_u(_rng(), (4, 3), dt), x=_u(_rng(), (4, 5), dt), W=_u(_rng(), (3, 5), dt),
                        need_dx=True, need_db=True),
        ("x", "W", "dy")),
}



# --- layers, dropout, losses and optimizer steps ---

def _dense_backward_args(dt):
    rng = _rng()
    return dict(dy=_u(rng, (4, 3), dt), x=_u(rng, (4, 5), dt), W=_u(rng, (5, 3), dt), dW=_u(rng, (5, 3), dt),
                db=_u(rng, (3,), dt), need_dx=True)


def _loss_args(kind):
    def build(dt):
        rng = _rng()
        if kind == "bce":
            return dict(logits=_u(rng, (6,), dt, -3, 3), targets=_u(rng, (6,), dt, 0, 1),
                        weights=_u(rng, (6,), dt, 0, 2))
        if kind == "mse":
            return dict(pred=_u(rng, (6, 3), dt), target=_u(rng, (6, 3), dt), weights=_u(rng, (6,), dt, 0, 2))
        return dict(logits=_u(rng, (6, 4), dt, -3, 3), labels=np.array([0, 3, 1, 2, 3, 0]),
                    weights=_u(rng, (6,), dt, 0, 2))
    return build


def _optim_args(kind):
    def build(dt):
        rng = _rng()
        a = dict(params=_u(rng, (10,), dt), grads=_u(rng, (10,), dt))
        if kind == "sgd":
            a.update(velocity=_u(rng, (10,), dt), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
        elif kind == "adam":
            a.update(m=_u(rng, (10,), dt), v=_u(rng, (10,), dt, 0, 1), step=3, lr=0.01, weight_decay=0.01)
        else:
            a.update(accum=_u(rng, (10,), dt, 0, 1), lr=0.05, weight_decay=0.01)
        return a
    return build


for _prefix, _mod in (("F", F), ("C", _C)):
    _elementwise_shape = (3, 4) if _prefix == "F" else (12,)
    SPECS.update({
        f"{_prefix}.dense_forward": Spec(
            _mod.dense_forward,
            lambda dt: dict(x=_u(_rng(), (4, 5), dt), W=_u(_rng(), (5, 3), dt), b=_u(_rng(), (3,), dt)),
            ("x", "W", "b"), optional=("b",), out=True),
        f"{_prefix}.dense_backward": Spec(
            Mutating(_mod.dense_backward, ("dW", "db")), _dense_backward_args, ("x", "W", "dy", "dW", "db"),
            finite=("x", "W", "dy"), optional=("db",), mutable=("dW", "db")),
        f"{_prefix}.relu_forward": Spec(
            _mod.relu_forward, lambda dt, sh=_elementwise_shape: dict(x=_u(_rng(), sh, dt)), ("x",), out=True),
        f"{_prefix}.relu_backward": Spec(
            _mod.relu_backward,
            lambda dt, sh=_elementwise_shape: dict(dy=_u(_rng(), sh, dt), y=np.maximum(_u(_rng(), sh, dt)[::-1], 0)),
            ("dy", "y")),
        f"{_prefix}.dropout_forward": Spec(
            _mod.dropout_forward,
            lambda dt, sh=_elementwise_shape: dict(x=_u(_rng(), sh, dt), rate=0.3, seed=7, step=2, training=True),
            ("x",)),
        f"{_prefix}.dropout_backward": Spec(
            _mod.dropout_backward,
            lambda dt, sh=_elementwise_shape: dict(dy=_u(_rng(), sh, dt), rate=0.3, seed=7, step=2), ("dy",)),
        f"{_prefix}.bce_with_logits": Spec(
            _mod.bce_with_logits, _loss_args("bce"), ("logits", "targets", "weights"), optional=("weights",)),
        f"{_prefix}.mse": Spec(_mod.mse, _loss_args("mse"), ("pred", "target", "weights"), optional=("weights",)),
        f"{_prefix}.softmax_cross_entropy": Spec(
            _mod.softmax_cross_entropy, _loss_args("sce"), ("logits", "weights"), optional=("weights",)),
        f"{_prefix}.sgd_step": Spec(
            Mutating(_mod.sgd_step, ("params", "velocity")), _optim_args("sgd"), ("params", "grads", "velocity"),
            mutable=("params", "velocity"), optional=("velocity",)),
        f"{_prefix}.adam_step": Spec(
            Mutating(_mod.adam_step, ("params", "m", "v")), _optim_args("adam"), ("params", "grads", "m", "v"),
            mutable=("params", "m", "v")),
        f"{_prefix}.adagrad_step": Spec(
            Mutating(_mod.adagrad_step, ("params", "accum")), _optim_args("adagrad"), ("params", "grads", "accum"),
            mutable=("params", "accum")),
    })
SPECS["F.bce_with_logits[(B,1)]"] = Spec(
    F.bce_with_logits,
    lambda dt: dict(logits=_u(_rng(), (6, 1), dt, -3, 3), targets=_u(_rng(), (6,), dt, 0, 1), weights=None),
    ("logits", "targets"))
SPECS["F.mse[(B,)]"] = Spec(
    F.mse, lambda dt: dict(pred=_u(_rng(), (6,), dt), target=_u(_rng(), (6, 1), dt)), ("pred", "target"))


# --- embedding tables. Ids and rows are integer arrays, not float ones: they are not in the
# arrays of the specs (whose zoo is about float dtypes) and have their own cases below. ---

def _emb_ids():
    """B = 4, F = 2 ids into a table of V = 5 rows, every row looked up (so a NaN anywhere in the
    table is read), row 1 three times."""
    return np.array([[1, 0], [4, 1], [2, 3], [1, 1]])


def _emb_forward_args(dt):
    return dict(table=_u(_rng(), (5, 3), dt), ids=_emb_ids())


def _emb_backward_args(with_dim):
    def build(dt):
        a = dict(dout=_u(_rng(), (4, 6), dt), ids=_emb_ids(), num_embeddings=5)
        if with_dim:
            a["dim"] = 3
        return a
    return build


def _sparse_args(kind):
    """Rows 5, 0, 3, 1 of a (6, 3) table: the NaN zoo's positions (flat 0, 9, 17) are in listed
    rows; rows 2 and 4 are not listed."""
    def build(dt):
        rng = _rng()
        a = dict(table=_u(rng, (6, 3), dt), rows=np.array([5, 0, 3, 1]), grad_rows=_u(rng, (4, 3), dt))
        if kind == "adagrad":
            a.update(accum=_u(rng, (6, 3), dt, 0, 1), lr=0.05, eps=1e-10)
        else:
            a.update(m=_u(rng, (6, 3), dt), v=_u(rng, (6, 3), dt, 0, 1), step=3, lr=0.01)
        return a
    return build


for _prefix, _mod in (("F", F), ("C", _C)):
    SPECS.update({
        f"{_prefix}.embedding_forward": Spec(_mod.embedding_forward, _emb_forward_args, ("table",), out=True),
        f"{_prefix}.embedding_backward": Spec(
            _mod.embedding_backward, _emb_backward_args(_prefix == "C"), ("dout",)),
        f"{_prefix}.sparse_adagrad_step": Spec(
            Mutating(_mod.sparse_adagrad_step, ("table", "accum")), _sparse_args("adagrad"),
            ("grad_rows", "table", "accum"), mutable=("table", "accum")),
        f"{_prefix}.sparse_adam_step": Spec(
            Mutating(_mod.sparse_adam_step, ("table", "m", "v")), _sparse_args("adam"),
            ("grad_rows", "table", "m", "v"), mutable=("table", "m", "v")),
    })
# --- convolution and max pooling (NCHW) ---

def _conv_args(padding):
    def build(dt):
        rng = _rng()
        stride = (2, 1) if padding != "same" else 1
        return dict(x=_u(rng, (2, 2, 6, 5), dt), W=_u(rng, (3, 2, 3, 2), dt), b=_u(rng, (3,), dt), stride=stride,
                    padding=padding)
    return build


def _conv_backward_args(padding):
    def build(dt):
        a = _conv_args(padding)(dt)
        rng = _rng()
        y = F.conv2d_forward(a["x"], a["W"], a["b"], a["stride"], a["padding"])
        return dict(dy=_u(rng, y.shape, dt), x=a["x"], W=a["W"], dW=_u(rng, (3, 2, 3, 2), dt), db=_u(rng, (3,), dt),
                    stride=a["stride"], padding=a["padding"], need_dx=True)
    return build


def _pool_args(dt):
    return dict(x=_u(_rng(), (2, 3, 7, 6), dt), kernel=(3, 2), stride=(2, 1))


def _pool_backward_args(dt):
    rng = _rng()
    _, idx = F.max_pool2d_forward(**_pool_args(dt))
    return dict(dy=_u(rng, idx.shape, dt), indices=idx, input_size=(7, 6))


def _conv_pool_args(dt):
    rng = _rng()
    return dict(x=_u(rng, (2, 2, 7, 6), dt), W=_u(rng, (3, 2, 3, 2), dt), b=_u(rng, (3,), dt), stride=1,
                padding=(1, 0), pool=2, pool_stride=None)


def _conv_pool_backward_args(dt):
    a = _conv_pool_args(dt)
    y, code = F.conv2d_relu_pool_forward(**a)
    rng = _rng()
    return dict(dy=_u(rng, y.shape, dt), code=code, y=y, x=a["x"], W=a["W"], dW=_u(rng, (3, 2, 3, 2), dt),
                db=_u(rng, (3,), dt), stride=1, padding=(1, 0), pool=2, pool_stride=None, need_dx=True)


SPECS.update({
    "F.conv2d_relu_pool_forward": Spec(F.conv2d_relu_pool_forward, _conv_pool_args, ("x", "W", "b"), optional=("b",)),
    "F.conv2d_relu_pool_backward": Spec(
        Mutating(F.conv2d_relu_pool_backward, ("dW", "db")), _conv_pool_backward_args,
        ("x", "W", "dy", "y", "dW", "db"), finite=("x", "W", "dy", "y"), optional=("db",), mutable=("dW", "db")),
    "C.conv2d_relu_pool_forward": Spec(_C.conv2d_relu_pool_forward, _conv_pool_args, ("x", "W", "b"),
                                       optional=("b",)),
    "C.conv2d_relu_pool_backward": Spec(
        Mutating(_C.conv2d_relu_pool_backward, ("dW", "db")), _conv_pool_backward_args,
        ("x", "W", "dy", "y", "dW", "db"), finite=("x", "W", "dy", "y"), optional=("db",), mutable=("dW", "db")),
    "F.conv2d_forward": Spec(F.conv2d_forward, _conv_args((1, 0)), ("x", "W", "b"), optional=("b",), out=True),
    "F.conv2d_forward[same]": Spec(F.conv2d_forward, _conv_args("same"), ("x", "W", "b"), optional=("b",), out=True),
    "F.conv2d_backward": Spec(
        Mutating(F.conv2d_backward, ("dW", "db")), _conv_backward_args((1, 0)), ("x", "W", "dy", "dW", "db"),
        finite=("x", "W", "dy"), optional=("db",), mutable=("dW", "db")),
    "F.conv2d_backward[same]": Spec(
        Mutating(F.conv2d_backward, ("dW", "db")), _conv_backward_args("same"), ("x", "W", "dy", "dW", "db"),
        finite=("x", "W", "dy"), optional=("db",), mutable=("dW", "db")),
    "F.max_pool2d_forward": Spec(F.max_pool2d_forward, _pool_args, ("x",)),
    "F.max_pool2d_backward": Spec(F.max_pool2d_backward, _pool_backward_args, ("dy",)),
    "C.conv2d_forward": Spec(_C.conv2d_forward, _conv_args((1, 0, 0, 1)), ("x", "W", "b"), optional=("b",),
                             out=True),
    "C.conv2d_backward": Spec(
        Mutating(_C.conv2d_backward, ("dW", "db")), _conv_backward_args((1, 0, 0, 1)), ("x", "W", "dy", "dW", "db"),
        finite=("x", "W", "dy"), optional=("db",), mutable=("dW", "db")),
    "C.max_pool2d_forward": Spec(_C.max_pool2d_forward, _pool_args, ("x",)),
    "C.max_pool2d_backward": Spec(_C.max_pool2d_backward, _pool_backward_args, ("dy",)),
})


# --- Sinkhorn normalisation (permutation local search): its cache is float64 whatever the dtype ---

def _sk_args(dt, batched=True):
    return dict(log_alpha=_u(_rng(), (3, 5, 5) if batched else (5, 5), dt), tau=0.5, iters=4)


def _sk_P(dt):
    return F.sinkhorn(**_sk_args(dt))


def _c_sk_cache(dt):
    P, logs = _C.sinkhorn_forward(**_sk_args(dt))
    return dict(P=P, logs=logs)


SPECS.update({
    "F.sinkhorn_forward[batched]": Spec(F.sinkhorn_forward, _sk_args, ("log_alpha",), out=True,
                                        out_of=lambda r: r[0], float64_results=True),
    "F.sinkhorn_forward[single]": Spec(F.sinkhorn_forward, lambda dt: _sk_args(dt, batched=False), ("log_alpha",),
                                       out=True, out_of=lambda r: r[0], float64_results=True),
    "F.sinkhorn": Spec(F.sinkhorn, _sk_args, ("log_alpha",), out=True),
    "F.sinkhorn_backward": Spec(
        F.sinkhorn_backward,
        lambda dt: dict(dP=_u(_rng(), (3, 5, 5), dt), cache=F.sinkhorn_forward(**_sk_args(dt))[1], lam=0.1, eps=1e-6),
        ("dP",), optional=("dP",)),
    "F.sinkhorn_backward[single]": Spec(
        F.sinkhorn_backward,
        lambda dt: dict(dP=_u(_rng(), (5, 5), dt), cache=F.sinkhorn_forward(**_sk_args(dt, batched=False))[1]),
        ("dP",), optional=("dP",)),
    "F.sinkhorn_regularization": Spec(F.sinkhorn_regularization, lambda dt: dict(P=_sk_P(dt), eps=1e-6), ("P",)),
    "C.sinkhorn_forward": Spec(_C.sinkhorn_forward, lambda dt: dict(_sk_args(dt), keep=True), ("log_alpha",),
                               out=True, out_of=lambda r: r[0], float64_results=True),
    "C.sinkhorn_backward": Spec(
        _C.sinkhorn_backward,
        lambda dt: dict(dP=_u(_rng(), (3, 5, 5), dt), **_c_sk_cache(dt), tau=0.5, lam=0.1, eps=1e-6),
        ("logs", "P", "dP"), finite=("dP",), optional=("dP",), float64=("logs",)),
    "C.sinkhorn_entropy": Spec(_C.sinkhorn_entropy, lambda dt: dict(P=_sk_P(dt), eps=1e-6), ("P",)),
})

# --- the COMET gate: k = 2 trees over n = 6 experts; A (B, k, n), Z (B, k, n - 1) ---

def _comet_args(dt, static=False):
    rng = _rng()
    lead = () if static else (4,)
    return dict(A=_u(rng, lead + (2, 6), dt, -2, 2), Z=_u(rng, lead + (2, 5), dt, -0.4, 0.4), gamma=1.0)


def _comet_cache(dt, static=False):
    return F.comet_forward(**_comet_args(dt, static))[1]


def _comet_pe_args(dt):
    rng = _rng()
    return dict(x=_u(rng, (6, 5), dt), U=_u(rng, (2, 6, 5), dt), b_U=_u(rng, (2, 6), dt),
                W=_u(rng, (2, 5, 5), dt, -0.05, 0.05), b_W=_u(rng, (2, 5), dt, -0.1, 0.1), gamma=1.0)


def _c_comet_cache(dt):
    a = _comet_args(dt)
    _, sz, reach_int, reach, g, norm = _C.comet_forward(a["A"], a["Z"], 1.0)
    return dict(A=a["A"], Z=a["Z"], sz=sz, reach_int=reach_int, reach=reach, g=g, norm=norm)


SPECS.update({
    "F.comet[static]": Spec(F.comet, lambda dt: _comet_args(dt, static=True), ("A", "Z")),
    "F.comet_forward[static]": Spec(
        F.comet_forward, lambda dt: _comet_args(dt, static=True), ("A", "Z"), out=True, out_of=lambda r: r[0]),
    "F.comet_forward[batched]": Spec(F.comet_forward, _comet_args, ("A", "Z"), out=True, out_of=lambda r: r[0]),
    "F.comet_backward[batched]": Spec(
        F.comet_backward, lambda dt: dict(dw=_u(_rng(), (4, 6), dt), cache=_comet_cache(dt), lam=0.1, eps=1e-6),
        ("dw",), optional=("dw",)),
    "F.comet_backward[static]": Spec(
        F.comet_backward, lambda dt: dict(dw=_u(_rng(), (6,), dt), cache=_comet_cache(dt, static=True), lam=0.1),
        ("dw",), optional=("dw",)),
    "F.comet_regularization": Spec(F.comet_regularization, lambda dt: dict(cache=_comet_cache(dt), eps=1e-6), ()),
    "F.comet_per_example_forward": Spec(F.comet_per_example_forward, _comet_pe_args, ("x", "U", "b_U", "W", "b_W")),
    "F.comet_per_example_backward": Spec(
        F.comet_per_example_backward,
        lambda dt: dict(dw=_u(_rng(), (6, 6), dt), cache=F.comet_per_example_forward(**_comet_pe_args(dt))[1],
                        lam=0.1, eps=1e-6, need_dx=True),
        ("dw",), optional=("dw",)),
    "C.comet_forward": Spec(_C.comet_forward, _comet_args, ("A", "Z"), out=True, out_of=lambda r: r[0]),
    "C.comet_backward": Spec(
        _C.comet_backward, lambda dt: dict(dw=_u(_rng(), (4, 6), dt), **_c_comet_cache(dt), gamma=1.0, lam=0.1,
                                           eps=1e-6),
        ("A", "dw", "Z", "sz", "reach_int", "reach", "g", "norm"), finite=("A", "dw", "Z"), optional=("dw",)),
})

ARRAY_ARGS = [(sid, a) for sid, s in SPECS.items() for a in s.arrays]
FINITE_ARGS = [(sid, a) for sid, s in SPECS.items() for a in s.finite_arrays()]
UNCHECKED_FINITE_ARGS = [(sid, a) for sid, s in SPECS.items() for a in s.inputs() if a not in s.finite_arrays()]
INPUT_ARGS = [(sid, a) for sid, s in SPECS.items() for a in s.inputs()]
MUTABLE_ARGS = [(sid, a) for sid, s in SPECS.items() for a in s.mutable]
OUT_SPECS = [sid for sid, s in SPECS.items() if s.out]


def _ids(pairs):
    return [f"{sid}-{arg}" for sid, arg in pairs]


# ---------------------------------------------------------------------------------------------
# Sanity: every valid call works in both dtypes, keeps the dtype and leaves its inputs alone
# ---------------------------------------------------------------------------------------------

@short_failures
def test_every_public_function_is_covered():
    covered = {getattr(s.fn, "raw", s.fn) for s in SPECS.values()} | {F.n_bits, F.conv2d_padding}  # no arrays
    covered |= {F.trusted_inputs, F.check_finite}  # tests/test_trusted_inputs.py
    covered |= {F.comet_leaf_nodes}  # an int, no arrays: test_comet_leaf_nodes_bad_n
    missing = [name for name in F.__all__ if getattr(F, name) not in covered]
    assert not missing, f"functions without an input zoo: {missing}"
    c_funcs = {name for name in dir(_C) if callable(getattr(_C, name)) and not name.startswith("_")}
    c_missing = sorted(c_funcs - {"set_num_threads", "get_num_threads", "build_info", "set_finite_checks", "check_finite",
                                  "comet_leaf_nodes"}
                       - {getattr(s.fn, "raw", s.fn).__name__ for s in SPECS.values()})
    assert not c_missing, f"_C functions without an input zoo: {c_missing}"


@pytest.mark.parametrize("sid", list(SPECS))
@short_failures
def test_valid_call(sid):
    spec = SPECS[sid]
    for dtype in (F32, F64):
        result = call_spec(spec, spec.build(dtype))
        for a in _arrays_in(result):
            # int64: embedding_backward's row indices, max pooling's argmax indices; uint8: the fused
            # pooling's window positions; float64: the Sinkhorn cache, whatever the call's dtype
            assert a.dtype == dtype or (a.dtype in (np.int64, np.uint8) and ("pool" in sid or "embedding" in sid)) or (
                a.dtype == F64 and spec.float64_results), a.dtype
            assert np.all(np.isfinite(a))
        # and a second call gives bit-identical results
        assert_same(result, call_spec(spec, spec.build(dtype)))


# ---------------------------------------------------------------------------------------------
# Wrong Python types: lists, scalars, None, strings -> TypeError naming the argument
# ---------------------------------------------------------------------------------------------

NOT_ARRAYS = {
    "list": lambda a: a.tolist(),
    "python_float": lambda a: 0.5,
    "numpy_scalar": lambda a: a.dtype.type(0.5),
    "None": lambda a: None,
}


@pytest.mark.parametrize("sid,arg", ARRAY_ARGS, ids=_ids(ARRAY_ARGS))
@short_failures
def test_not_an_ndarray(sid, arg):
    """A list, a Python float, a NumPy scalar, None (unless optional) -> TypeError naming arg."""
    spec = SPECS[sid]

    def case(kind):
        kwargs = spec.build(F64)
        kwargs[arg] = NOT_ARRAYS[kind](kwargs[arg])
        call_spec(spec, kwargs, TypeError, _name_re(arg))
    run_subcases([(kind, lambda kind=kind: case(kind)) for kind in NOT_ARRAYS
                  if not (kind == "None" and arg in spec.optional)])


# ---------------------------------------------------------------------------------------------
# Wrong dtypes -> TypeError naming the argument; mismatched float dtypes -> TypeError
# ---------------------------------------------------------------------------------------------

BAD_DTYPES = ["int64", "float16", "complex128", "object"]


def _as_bad_dtype(a, dtype):
    return a.astype(dtype)


@pytest.mark.parametrize("sid,arg", ARRAY_ARGS, ids=_ids(ARRAY_ARGS))
@short_failures
def test_bad_dtype(sid, arg):
    """int64, float16, complex128, object (the raw bindings: int64, object) -> TypeError."""
    spec = SPECS[sid]

    def case(bad):
        kwargs = spec.build(F64)
        kwargs[arg] = _as_bad_dtype(kwargs[arg], bad)
        call_spec(spec, kwargs, TypeError, _name_re(arg) + ".*dtype")
    run_subcases([(bad, lambda bad=bad: case(bad)) for bad in BAD_DTYPES
                  if sid.startswith("F.") or bad in ("int64", "object")])


MISMATCH = [(sid, a) for sid, s in SPECS.items() if len(s.arrays) > 1 for a in s.arrays if a not in s.float64]


@pytest.mark.parametrize("sid,arg", MISMATCH, ids=_ids(MISMATCH))
@short_failures
def test_mismatched_dtypes(sid, arg):
    """arg float32 among float64 arrays, and float64 among float32 -> TypeError naming an argument."""
    spec = SPECS[sid]

    def case(odd, rest):
        kwargs = spec.build(rest)
        kwargs[arg] = kwargs[arg].astype(odd)
        info = call_spec(spec, kwargs, TypeError, "dtype")
        message = str(info.value)
        assert any(f"'{a}'" in message for a in spec.arrays), (
            f"the message names none of the call's array arguments {spec.arrays}: {message}")
    run_subcases([("float32_among_float64", lambda: case(F32, F64)),
                  ("float64_among_float32", lambda: case(F64, F32))])


@short_failures
def test_mismatch_with_cache_dtype():
    """A float32 dw for a float64 cache is a mismatch too: TypeError, never a silent cast."""
    cache = _dsk_cache(F64)
    checked_call(F.dselect_k_backward, dict(dw=_u(_rng(), (4, 8), F32), cache=cache), TypeError, "dtype")
    cache = _ss_cache(F32)
    checked_call(F.softmax_selector_backward, dict(dw=_u(_rng(), (4, 6), F64), cache=cache), TypeError, "dtype")


# ---------------------------------------------------------------------------------------------
# NaN / Inf -> ValueError naming the argument
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sid,arg", FINITE_ARGS, ids=_ids(FINITE_ARGS))
@short_failures
def test_nonfinite_input(sid, arg):
    """NaN (float32 and float64), +Inf, -Inf in the argument -> ValueError naming it."""
    spec = SPECS[sid]

    def case(value, dtype, where):
        kwargs = spec.build(dtype)
        a = kwargs[arg].copy()
        a.reshape(-1)[where(a.size)] = value
        kwargs[arg] = a
        call_spec(spec, kwargs, ValueError, _name_re(arg) + ".*(NaN|Inf|finite)")
    run_subcases([
        ("nan-float32-middle", lambda: case(NAN, F32, lambda n: n // 2)),
        ("nan-float64-last", lambda: case(NAN, F64, lambda n: n - 1)),
        ("inf-float64-first", lambda: case(INF, F64, lambda n: 0)),
        ("-inf-float32-last", lambda: case(-INF, F32, lambda n: n - 1)),
    ])


@pytest.mark.parametrize("sid,arg", UNCHECKED_FINITE_ARGS, ids=_ids(UNCHECKED_FINITE_ARGS))
@short_failures
def test_nonfinite_cache_arrays_of_raw_bindings_do_not_crash(sid, arg):
    """The forward caches (sigma, sz, r, P) that _C backward functions take are not scanned for
    NaN; a NaN there may raise ValueError or propagate, but must not crash or write the input."""
    spec = SPECS[sid]
    kwargs = spec.build(F64)
    a = kwargs[arg].copy()
    a.reshape(-1)[0] = NAN
    kwargs[arg] = a
    try:
        call_spec(spec, kwargs)
    except ValueError as e:
        assert f"'{arg}'" in str(e)


# ---------------------------------------------------------------------------------------------
# Non-contiguous / byte-swapped / misaligned / read-only / broadcast inputs: same result as a
# C-contiguous native copy
# ---------------------------------------------------------------------------------------------

def _strided(a):
    buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype) if a.ndim else np.zeros(3, a.dtype)
    if a.ndim == 0:
        return a.copy()
    v = buf[..., 1::2]
    v[...] = a
    return v


def _misaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    v = buf[1:].view(a.dtype).reshape(a.shape)
    v[...] = a
    assert not v.flags.aligned
    return v


def _readonly(a):
    v = a.copy()
    v.flags.writeable = False
    return v


LAYOUTS = {
    "strided": (1, _strided),
    "reversed": (1, lambda a: a[::-1].copy()[::-1]),
    "fortran": (2, np.asfortranarray),
    "byteswapped": (1, lambda a: a.astype(a.dtype.newbyteorder())),
    "misaligned": (1, _misaligned),
    "readonly": (1, _readonly),
    "broadcast": (1, lambda a: np.broadcast_to(a[:1], a.shape)),
}
# the raw bindings: the layouts that make the binding copy; the functional layer: the layouts its
# reshapes and the binding treat differently
C_LAYOUTS = ("strided", "reversed", "byteswapped", "misaligned")
F_LAYOUTS = ("strided", "fortran", "byteswapped", "readonly", "broadcast")


@pytest.mark.parametrize("sid,arg", INPUT_ARGS, ids=_ids(INPUT_ARGS))
@short_failures
def test_layout_gives_the_contiguous_result(sid, arg):
    """The argument strided / Fortran-ordered / byte-swapped / read-only / broadcast (functional
    layer) or strided / reversed / byte-swapped / misaligned (raw bindings), in float32 and
    float64: bit-identical results to a C-contiguous native copy, input untouched."""
    layouts = F_LAYOUTS if sid.startswith("F.") else C_LAYOUTS
    run_subcases([(f"{lay}-{np.dtype(dt).name}", lambda lay=lay, dt=dt: _check_layout(sid, arg, lay, dt))
                  for lay in layouts for dt in (F32, F64)])


def _check_layout(sid, arg, layout, dtype):
    spec = SPECS[sid]
    min_ndim, make = LAYOUTS[layout]
    kwargs = spec.build(dtype)
    a = kwargs[arg]
    if a.ndim < min_ndim or (layout == "broadcast" and a.shape[0] < 2):
        pytest.skip(f"{layout} needs a {min_ndim}-D argument")
    view = make(a)
    np.testing.assert_array_equal(view, a) if layout != "broadcast" else None
    if layout not in ("readonly", "broadcast") and view.flags.c_contiguous and view.flags.aligned \
            and view.dtype.isnative:
        pytest.skip(f"{layout} leaves a {a.shape} array contiguous")
    contiguous = np.array(view, dtype=_native(view.dtype), order="C")
    kwargs[arg] = contiguous
    expected = call_spec(spec, kwargs)
    kwargs = spec.build(dtype)
    kwargs[arg] = view
    got = call_spec(spec, kwargs)
    assert_same(got, expected)


@short_failures
def test_all_arguments_non_contiguous_at_once():
    """Every array argument of the per-example gate (forward and backward) non-contiguous."""
    kwargs = _pe_args(F64)
    expected_w, expected_cache = F.dselect_k_per_example_forward(**kwargs)
    odd = dict(kwargs, x=np.asfortranarray(kwargs["x"]), G=_strided(kwargs["G"]),
               b_G=kwargs["b_G"].astype(">f8"), W=kwargs["W"][::-1].copy()[::-1], b_W=_readonly(kwargs["b_W"]))
    w, cache = checked_call(F.dselect_k_per_example_forward, odd)
    assert_same(w, expected_w)
    dw = _u(_rng(), (6, 8), F64)
    expected = F.dselect_k_per_example_backward(dw, expected_cache, 0.1, 0.1)
    got = checked_call(F.dselect_k_per_example_backward, dict(dw=_strided(dw), cache=cache, lam=0.1, xi=0.1))
    assert_same(got, expected)


# ---------------------------------------------------------------------------------------------
# Wrong shapes -> ValueError naming the argument (and the expected shape)
# ---------------------------------------------------------------------------------------------

def _set(**changes):
    return changes


SHAPE_CASES = [
    # (id, spec, changes {arg: callable(valid) or value}, exception, regex)
    ("dout_shape", "F.smooth_step_backward", _set(dout=lambda a: a[:, :3]), ValueError, "'dout'.*\\(3, 4\\)"),
    ("dout_flat", "F.smooth_step_backward", _set(dout=lambda a: a.ravel()), ValueError, "'dout'"),
    ("s_m_too_small", "F.selector", _set(s=lambda a: a[:, :2]), ValueError, "'s'.*3"),
    ("s_m_too_large", "F.selector", _set(s=lambda a: np.concatenate([a, a[:, :1]], 1)), ValueError, "'s'"),
    ("s_0d", "F.selector", _set(s=lambda a: a.reshape(-1)[:1].reshape(())), ValueError, "'s'"),
    ("dr_n", "F.selector_backward", _set(dr=lambda a: a[:, :7]), ValueError, "'dr'.*8"),
    ("s_m", "F.selector_backward", _set(s=lambda a: a[:, :2]), ValueError, "'s'"),
    ("rows_differ", "F.selector_backward", _set(dr=lambda a: a[:4]), ValueError, "'(dr|s)'"),
    ("leading_shapes_differ", "F.selector_backward",
     _set(dr=lambda a: np.concatenate([a, a[:1]]).reshape(2, 3, 8),
          s=lambda a: np.concatenate([a, a[:1]]).reshape(3, 2, 3)),
     ValueError, "'(dr|s)'"),
    ("Z_wrong_m", "F.dselect_k[static]", _set(Z=lambda a: np.concatenate([a, a[:, :1]], 1)), ValueError,
     "'Z'"),
    ("Z_wrong_k", "F.dselect_k[static]", _set(Z=lambda a: a[:2]), ValueError, "'Z'"),
    ("Z_3d_for_static_alpha", "F.dselect_k[static]", _set(Z=lambda a: a[None]), ValueError, "'Z'"),
    ("alpha_0d", "F.dselect_k[static]", _set(alpha=lambda a: a.reshape(-1)[:1].reshape(())), ValueError, "'alpha'"),
    ("alpha_3d", "F.dselect_k[static]", _set(alpha=lambda a: a[None, None]), ValueError, "'alpha'"),
    ("Z_2d_for_batched_alpha", "F.dselect_k_forward[batched]", _set(Z=lambda a: a[0]), ValueError, "'Z'"),
    ("Z_wrong_B", "F.dselect_k_forward[batched]", _set(Z=lambda a: a[:3]), ValueError, "'Z'.*\\(B, k, m\\)"),
    ("Z_wrong_m", "F.dselect_k_forward[batched]", _set(Z=lambda a: a[:, :, :2]), ValueError, "'Z'.*\\(4, 3, 3\\)"),
    ("Z_wrong_k", "F.dselect_k_forward[batched]", _set(Z=lambda a: a[:, :2]), ValueError, "'Z'"),
    ("dw_n", "F.dselect_k_backward[batched]", _set(dw=lambda a: a[:, :7]), ValueError, "'dw'.*\\(4, 8\\)"),
    ("dw_B", "F.dselect_k_backward[batched]", _set(dw=lambda a: a[:3]), ValueError, "'dw'"),
    ("dw_1d", "F.dselect_k_backward[batched]", _set(dw=lambda a: a[0]), ValueError, "'dw'"),
    ("dw_2d", "F.dselect_k_backward[static]", _set(dw=lambda a: a[None]), ValueError, "'dw'.*\\(8,\\)"),
    ("dw_per_selector_wrong_k", "F.dselect_k_backward[batched]", _set(dw=lambda a: np.stack([a, a], 1)), ValueError,
     "'dw'.*\\(4, 3, 8\\)"),
    ("x_1d", "F.dselect_k_per_example_forward", _set(x=lambda a: a[0]), ValueError, "'x'"),
    ("x_3d", "F.dselect_k_per_example_forward", _set(x=lambda a: a[None]), ValueError, "'x'"),
    ("x_p_differs_from_G", "F.dselect_k_per_example_forward", _set(x=lambda a: a[:, :4]), ValueError,
     "'(x|G)'"),
    ("G_wrong_p", "F.dselect_k_per_example_forward", _set(G=lambda a: a[:, :4]), ValueError, "'G'"),
    ("G_1d", "F.dselect_k_per_example_forward", _set(G=lambda a: a[0]), ValueError, "'G'"),
    ("G_3d", "F.dselect_k_per_example_forward", _set(G=lambda a: a[None]), ValueError, "'G'"),
    ("b_G_wrong_k", "F.dselect_k_per_example_forward", _set(b_G=lambda a: a[:2]), ValueError, "'b_G'"),
    ("b_G_2d", "F.dselect_k_per_example_forward", _set(b_G=lambda a: a[None]), ValueError, "'b_G'"),
    ("W_wrong_m", "F.dselect_k_per_example_forward", _set(W=lambda a: a[:, :2]), ValueError, "'W'"),
    ("W_wrong_k", "F.dselect_k_per_example_forward", _set(W=lambda a: a[:2]), ValueError, "'W'"),
    ("W_wrong_p", "F.dselect_k_per_example_forward", _set(W=lambda a: a[:, :, :4]), ValueError, "'W'"),
    ("W_2d", "F.dselect_k_per_example_forward", _set(W=lambda a: a[0]), ValueError, "'W'"),
    ("b_W_wrong_m", "F.dselect_k_per_example_forward", _set(b_W=lambda a: a[:, :2]), ValueError, "'b_W'"),
    ("b_W_1d", "F.dselect_k_per_example_forward", _set(b_W=lambda a: a[0]), ValueError, "'b_W'"),
    ("dw_n", "F.dselect_k_per_example_backward", _set(dw=lambda a: a[:, :7]), ValueError, "'dw'"),
    ("logits_3d", "F.softmax[batched]", _set(logits=lambda a: a[None]), ValueError, "'logits'"),
    ("logits_0d", "F.softmax[batched]", _set(logits=lambda a: a.reshape(-1)[:1].reshape(())), ValueError, "'logits'"),
    ("logits_no_column", "F.softmax[batched]", _set(logits=lambda a: a[:, :0]), ValueError, "'logits'"),
    ("dw_n", "F.softmax_backward", _set(dw=lambda a: a[:, :5]), ValueError, "'dw'.*\\(4, 6\\)"),
    ("dw_1d", "F.softmax_backward", _set(dw=lambda a: a[0]), ValueError, "'dw'"),
    ("w_3d", "F.softmax_backward", _set(dw=lambda a: a[None], w=lambda a: a[None]), ValueError, "'w'"),
    ("logits_3d", "F.top_k[batched]", _set(logits=lambda a: a[None]), ValueError, "'logits'"),
    ("dw_n", "F.top_k_backward", _set(dw=lambda a: a[:, :5]), ValueError, "'dw'"),
    ("w_3d", "F.top_k_backward", _set(dw=lambda a: a[None], w=lambda a: a[None]), ValueError, "'w'"),
    ("raw_noise_shape", "F.noisy_logits", _set(raw_noise=lambda a: a[:, :5]), ValueError, "'raw_noise'.*\\(4, 6\\)"),
    ("normal_flat", "F.noisy_logits", _set(normal=lambda a: a.ravel()), ValueError, "'normal'"),
    ("raw_noise_shape", "F.noisy_logits_backward", _set(raw_noise=lambda a: a[:3]), ValueError, "'raw_noise'"),
    ("normal_shape", "F.noisy_logits_backward", _set(normal=lambda a: a.T), ValueError, "'normal'"),
    ("beta_2d", "F.softmax_selector_forward[batched]", _set(beta=lambda a: a[0]), ValueError, "'beta'"),
    ("beta_wrong_k", "F.softmax_selector_forward[batched]", _set(beta=lambda a: a[:, :2]), ValueError,
     "'beta'.*\\(B, k, n\\)"),
    ("beta_wrong_B", "F.softmax_selector_forward[batched]", _set(beta=lambda a: a[:3]), ValueError, "'beta'"),
    ("alpha_3d", "F.softmax_selector_forward[batched]", _set(alpha=lambda a: a[None]), ValueError, "'alpha'"),
    ("beta_3d_for_static", "F.softmax_selector_forward[static]", _set(beta=lambda a: a[None, None]), ValueError,
     "'beta'"),
    ("dw_n", "F.softmax_selector_backward[batched]", _set(dw=lambda a: a[:, :5]), ValueError, "'dw'"),
    ("dw_1d", "F.softmax_selector_backward[batched]", _set(dw=lambda a: a[0]), ValueError, "'dw'"),
    ("dw_2d", "F.softmax_selector_backward[static]", _set(dw=lambda a: a[None]), ValueError, "'dw'"),
    ("f_2d", "F.mix_experts[nbd,static]", _set(f=lambda a: a[0]), ValueError, "'f'.*\\(n, B, d\\)"),
    ("f_4d", "F.mix_experts[nbd,static]", _set(f=lambda a: a[None]), ValueError, "'f'"),
    ("w_wrong_n", "F.mix_experts[nbd,static]", _set(w=lambda a: a[:5]), ValueError, "'w'.*\\(6,\\)"),
    ("w_0d", "F.mix_experts[nbd,static]", _set(w=lambda a: a.reshape(-1)[:1].reshape(())), ValueError, "'w'"),
    ("w_3d", "F.mix_experts[nbd,static]", _set(w=lambda a: a[None, None]), ValueError, "'w'"),
    ("w_for_other_layout", "F.mix_experts[nbd,static]", _set(layout="bnd"), ValueError, "'w'"),
    ("w_wrong_B", "F.mix_experts[bnd,per_example]", _set(w=lambda a: a[:3]), ValueError, "'w'.*\\(B, n\\)"),
    ("w_wrong_n", "F.mix_experts[bnd,per_example]", _set(w=lambda a: a[:, :5]), ValueError, "'w'"),
    ("dy_wrong_d", "F.mix_experts_backward[nbd,static]", _set(dy=lambda a: a[:, :4]), ValueError, "'dy'.*\\(4, 5\\)"),
    ("dy_wrong_B", "F.mix_experts_backward[nbd,static]", _set(dy=lambda a: a[:3]), ValueError, "'dy'"),
    ("dy_1d", "F.mix_experts_backward[bnd,per_example]", _set(dy=lambda a: a[0]), ValueError, "'dy'"),
    ("x_1d", "F.linear", _set(x=lambda a: a[0]), ValueError, "'x'.*\\(B, p\\)"),
    ("W_wrong_p", "F.linear", _set(W=lambda a: a[:, :4]), ValueError, "'W'.*\\(3, 5\\)"),
    ("W_3d", "F.linear", _set(W=lambda a: a[None]), ValueError, "'W'"),
    ("b_wrong_o", "F.linear", _set(b=lambda a: a[:2]), ValueError, "'b'.*\\(3,\\)"),
    ("b_2d", "F.linear", _set(b=lambda a: a[None]), ValueError, "'b'"),
    ("dy_wrong_o", "F.linear_backward", _set(dy=lambda a: a[:, :2]), ValueError, "'dy'.*\\(4, 3\\)"),
    ("dy_wrong_B", "F.linear_backward", _set(dy=lambda a: a[:3]), ValueError, "'dy'"),
    ("W_wrong_p", "F.linear_backward", _set(W=lambda a: a[:, :4]), ValueError, "'W'"),
    # raw bindings
    ("t_2d", "C.smooth_step_forward", _set(t=lambda a: a[None]), ValueError, "'t'.*\\(N,\\)"),
    ("t_0d", "C.smooth_step_forward", _set(t=lambda a: a.reshape(-1)[:1].reshape(())), ValueError, "'t'"),
    ("t_len", "C.smooth_step_backward", _set(t=lambda a: a[:6]), ValueError, "'t'.*\\(7,\\)"),
    ("dout_2d", "C.smooth_step_backward", _set(dout=lambda a: a[None]), ValueError, "'dout'"),
    ("s_m", "C.selector_forward", _set(s=lambda a: a[:, :2]), ValueError, "'s'.*\\(5, 3\\)"),
    ("s_1d", "C.selector_forward", _set(s=lambda a: a[0]), ValueError, "'s'"),
    ("s_3d", "C.selector_forward", _set(s=lambda a: a[None]), ValueError, "'s'"),
    ("dr_n", "C.selector_backward", _set(dr=lambda a: a[:, :7]), ValueError, "'dr'"),
    ("s_rows", "C.selector_backward", _set(s=lambda a: a[:4]), ValueError, "'s'"),
    ("s_m", "C.selector_backward", _set(s=lambda a: a[:, :2]), ValueError, "'s'"),
    ("alpha_1d", "C.dselect_k_forward", _set(alpha=lambda a: a[0]), ValueError, "'alpha'.*\\(B, k\\)"),
    ("Z_m", "C.dselect_k_forward", _set(Z=lambda a: a[:, :, :2]), ValueError, "'Z'"),
    ("Z_B", "C.dselect_k_forward", _set(Z=lambda a: a[:3]), ValueError, "'Z'"),
    ("Z_2d", "C.dselect_k_forward", _set(Z=lambda a: a[0]), ValueError, "'Z'"),
    ("dw_n", "C.dselect_k_backward", _set(dw=lambda a: a[:, :7]), ValueError, "'dw'"),
    ("dw_per_selector_wrong_k", "C.dselect_k_backward", _set(dw=lambda a: np.stack([a, a], 1)), ValueError,
     "'dw'.*\\(B, k, n\\)"),
    ("sigma_k", "C.dselect_k_backward", _set(sigma=lambda a: a[:, :2]), ValueError, "'sigma'"),
    ("sz_m", "C.dselect_k_backward", _set(sz=lambda a: a[:, :, :2]), ValueError, "'sz'"),
    ("Z_m", "C.dselect_k_backward", _set(Z=lambda a: a[:, :, :2]), ValueError, "'Z'"),
    ("r_2d", "C.dselect_k_backward", _set(r=lambda a: a[0]), ValueError, "'r'"),
    ("r_1d", "C.selector_entropy", _set(r=lambda a: a[0]), ValueError, "'r'"),
    ("r_3d", "C.selector_mass_penalty", _set(r=lambda a: a[None]), ValueError, "'r'"),
    ("logits_1d", "C.softmax_forward", _set(logits=lambda a: a[0]), ValueError, "'logits'"),
    ("logits_no_column", "C.softmax_forward", _set(logits=lambda a: a[:, :0]), ValueError, "'logits'"),
    ("w_n", "C.softmax_backward", _set(w=lambda a: a[:, :5]), ValueError, "'w'"),
    ("dw_1d", "C.softmax_backward", _set(dw=lambda a: a[0]), ValueError, "'dw'"),
    ("logits_3d", "C.topk_forward", _set(logits=lambda a: a[None]), ValueError, "'logits'"),
    ("raw_noise_len", "C.noisy_logits_forward", _set(raw_noise=lambda a: a[:6]), ValueError, "'raw_noise'"),
    ("clean_2d", "C.noisy_logits_forward", _set(clean=lambda a: a[None]), ValueError, "'clean'"),
    ("normal_len", "C.noisy_logits_forward", _set(normal=lambda a: a[:5]), ValueError, "'normal'"),
    ("dh_2d", "C.noisy_logits_backward", _set(dh=lambda a: a[None]), ValueError, "'dh'"),
    ("beta_k", "C.softmax_selector_forward", _set(beta=lambda a: a[:, :2]), ValueError, "'beta'"),
    ("alpha_1d", "C.softmax_selector_forward", _set(alpha=lambda a: a[0]), ValueError, "'alpha'"),
    ("dw_n", "C.softmax_selector_backward", _set(dw=lambda a: a[:, :5]), ValueError, "'dw'"),
    ("sigma_k", "C.softmax_selector_backward", _set(sigma=lambda a: a[:, :2]), ValueError, "'sigma'"),
    ("P_2d", "C.softmax_selector_backward", _set(P=lambda a: a[0]), ValueError, "'P'"),
    ("w_n", "C.mix_experts_forward", _set(w=lambda a: a[:5]), ValueError, "'w'"),
    ("f_2d", "C.mix_experts_forward", _set(f=lambda a: a[0]), ValueError, "'f'"),
    ("w_per_example_B", "C.mix_experts_forward", _set(w=lambda a: np.ones((3, 6), a.dtype)), ValueError, "'w'"),
    ("dy_d", "C.mix_experts_backward", _set(dy=lambda a: a[:, :4]), ValueError, "'dy'"),
    ("w_n", "C.mix_experts_backward", _set(w=lambda a: a[:, :5]), ValueError, "'w'"),
    ("W_p", "C.linear_forward", _set(W=lambda a: a[:, :4]), ValueError, "'W'"),
    ("b_o", "C.linear_forward", _set(b=lambda a: a[:2]), ValueError, "'b'"),
    ("x_1d", "C.linear_forward", _set(x=lambda a: a[0]), ValueError, "'x'"),
    ("dy_o", "C.linear_backward", _set(dy=lambda a: a[:, :2]), ValueError, "'dy'"),
    ("W_p", "C.linear_backward", _set(W=lambda a: a[:, :4]), ValueError, "'W'"),
    ("x_3d", "C.linear_backward", _set(x=lambda a: a[None]), ValueError, "'x'"),
]
for _p in ("F", "C"):
    SHAPE_CASES += [
        ("W_wrong_p", f"{_p}.dense_forward", _set(W=lambda a: a[:4]), ValueError, "'W'.*\\(5, 3\\)"),
        ("b_wrong_o", f"{_p}.dense_forward", _set(b=lambda a: a[:2]), ValueError, "'b'"),
        ("x_1d", f"{_p}.dense_forward", _set(x=lambda a: a[0]), ValueError, "'x'"),
        ("dy_wrong_o", f"{_p}.dense_backward", _set(dy=lambda a: a[:, :2]), ValueError, "'dy'"),
        ("dW_wrong_o", f"{_p}.dense_backward", _set(dW=lambda a: a[:, :2].copy()), ValueError, "'dW'.*\\(5, 3\\)"),
        ("dW_1d", f"{_p}.dense_backward", _set(dW=lambda a: a.ravel()), ValueError, "'dW'"),
        ("db_wrong_o", f"{_p}.dense_backward", _set(db=lambda a: a[:2].copy()), ValueError, "'db'"),
        ("W_wrong_p", f"{_p}.dense_backward", _set(W=lambda a: a[:4]), ValueError, "'W'"),
        ("grads_len", f"{_p}.sgd_step", _set(grads=lambda a: a[:9]), ValueError, "'grads'.*\\(10,\\)"),
        ("velocity_len", f"{_p}.sgd_step", _set(velocity=lambda a: a[:9].copy()), ValueError, "'velocity'"),
        ("params_2d", f"{_p}.sgd_step", _set(params=lambda a: a.reshape(2, 5)), ValueError, "'params'"),
        ("m_len", f"{_p}.adam_step", _set(m=lambda a: a[:9].copy()), ValueError, "'m'"),
        ("v_2d", f"{_p}.adam_step", _set(v=lambda a: a.reshape(5, 2)), ValueError, "'v'"),
        ("grads_2d", f"{_p}.adam_step", _set(grads=lambda a: a.reshape(5, 2)), ValueError, "'grads'"),
        ("accum_len", f"{_p}.adagrad_step", _set(accum=lambda a: a[:9].copy()), ValueError, "'accum'"),
        ("weights_len", f"{_p}.bce_with_logits", _set(weights=lambda a: a[:5]), ValueError, "'weights'"),
        ("targets_len", f"{_p}.bce_with_logits", _set(targets=lambda a: a[:5]), ValueError, "'targets'"),
        ("logits_2_columns", f"{_p}.bce_with_logits", _set(logits=lambda a: np.stack([a, a], 1)), ValueError,
         "'logits'"),
        ("target_d", f"{_p}.mse", _set(target=lambda a: a[:, :2]), ValueError, "'target'"),
        ("pred_3d", f"{_p}.mse", _set(pred=lambda a: a[None], target=lambda a: a[None]), ValueError, "'pred'"),
        ("weights_2d", f"{_p}.mse", _set(weights=lambda a: a[:, None]), ValueError, "'weights'"),
        ("logits_1d", f"{_p}.softmax_cross_entropy", _set(logits=lambda a: a[0]), ValueError, "'logits'"),
        ("no_class", f"{_p}.softmax_cross_entropy", _set(logits=lambda a: a[:, :0]), ValueError, "'logits'"),
        ("weights_len", f"{_p}.softmax_cross_entropy", _set(weights=lambda a: a[:5]), ValueError, "'weights'"),
    ]
for _p in ("F", "C"):
    SHAPE_CASES += [
        ("x_3d", f"{_p}.conv2d_forward", _set(x=lambda a: a[0]), ValueError, "'x'.*\\(B, C, H, W\\)"),
        ("W_3d", f"{_p}.conv2d_forward", _set(W=lambda a: a[0]), ValueError, "'W'.*\\(F, C, KH, KW\\)"),
        ("W_wrong_C", f"{_p}.conv2d_forward", _set(W=lambda a: a[:, :1]), ValueError, "'W'.*\\(3, 2, 3, 2\\)"),
        ("b_wrong_F", f"{_p}.conv2d_forward", _set(b=lambda a: a[:2]), ValueError, "'b'.*\\(3,\\)"),
        ("b_2d", f"{_p}.conv2d_forward", _set(b=lambda a: a[None]), ValueError, "'b'"),
        ("kernel_larger_than_input", f"{_p}.conv2d_forward", _set(x=lambda a: a[:, :, :1, :1]), ValueError,
         "kernel.*larger.*'x'"),
        ("no_channels", f"{_p}.conv2d_forward", _set(x=lambda a: a[:, :0], W=lambda a: a[:, :0]), ValueError, "'x'"),
        ("no_filters", f"{_p}.conv2d_forward", _set(W=lambda a: a[:0], b=lambda a: a[:0]), ValueError, "'W'"),
        ("dy_wrong_OH", f"{_p}.conv2d_backward", _set(dy=lambda a: a[:, :, :1]), ValueError,
         "'dy'.*\\(B, F, OH, OW\\)"),
        ("dy_wrong_F", f"{_p}.conv2d_backward", _set(dy=lambda a: a[:, :2]), ValueError, "'dy'"),
        ("dy_3d", f"{_p}.conv2d_backward", _set(dy=lambda a: a[0]), ValueError, "'dy'"),
        ("dW_wrong_shape", f"{_p}.conv2d_backward", _set(dW=lambda a: a[:, :, :2].copy()), ValueError,
         "'dW'.*\\(3, 2, 3, 2\\)"),
        ("dW_flat", f"{_p}.conv2d_backward", _set(dW=lambda a: a.ravel()), ValueError, "'dW'"),
        ("db_wrong_F", f"{_p}.conv2d_backward", _set(db=lambda a: a[:2].copy()), ValueError, "'db'"),
        ("x_wrong_C", f"{_p}.conv2d_backward", _set(x=lambda a: a[:, :1]), ValueError, "'W'"),
        ("x_3d", f"{_p}.max_pool2d_forward", _set(x=lambda a: a[0]), ValueError, "'x'.*\\(B, C, H, W\\)"),
        ("x_5d", f"{_p}.max_pool2d_forward", _set(x=lambda a: a[None]), ValueError, "'x'"),
        ("kernel_larger_than_input", f"{_p}.max_pool2d_forward", _set(x=lambda a: a[:, :, :2]), ValueError,
         "kernel.*larger.*'x'"),
        ("no_channels", f"{_p}.max_pool2d_forward", _set(x=lambda a: a[:, :0]), ValueError, "'x'"),
        ("dy_3d", f"{_p}.max_pool2d_backward", _set(dy=lambda a: a[0], indices=lambda a: a[0]), ValueError, "'dy'"),
        ("indices_wrong_shape", f"{_p}.max_pool2d_backward", _set(indices=lambda a: a[:, :, :1]), ValueError,
         "'indices'.*\\(2, 3, 3, 5\\)"),
        ("indices_3d", f"{_p}.max_pool2d_backward", _set(indices=lambda a: a[0]), ValueError, "'indices'"),
        ("input_size_smaller_than_dy", f"{_p}.max_pool2d_backward", _set(input_size=(2, 6)), ValueError,
         "'dy'.*input_size"),
    ]
for _p, _fwd, _bwd in (("F", "F.mix_experts_many", "F.mix_experts_many_backward"),
                       ("C", "C.mix_experts_many_forward", "C.mix_experts_many_backward")):
    for _sid in (_fwd, _bwd):
        SHAPE_CASES += [
            ("f_2d", _sid, _set(f=lambda a: a[0]), ValueError, "'f'.*\\(n, B, d\\)"),
            ("f_4d", _sid, _set(f=lambda a: a[None]), ValueError, "'f'"),
            ("w_2d", _sid, _set(w=lambda a: a[0]), ValueError, "'w'.*\\(T, B, n\\)"),
            ("w_wrong_n", _sid, _set(w=lambda a: a[:, :, :5]), ValueError, "'w'.*\\(T, B, n\\) = \\(3, 4, 6\\)"),
            ("w_wrong_B", _sid, _set(w=lambda a: a[:, :3]), ValueError, "'w'.*\\(3, 4, 6\\)"),
            ("w_static", _sid, _set(w=lambda a: a[0, 0]), ValueError, "'w'"),
        ]
    SHAPE_CASES += [
        ("dy_wrong_T", _bwd, _set(dy=lambda a: a[:2]), ValueError, "'dy'.*\\(T, B, d\\) = \\(3, 4, 5\\)"),
        ("dy_wrong_B", _bwd, _set(dy=lambda a: a[:, :3]), ValueError, "'dy'.*\\(3, 4, 5\\)"),
        ("dy_wrong_d", _bwd, _set(dy=lambda a: a[..., :4]), ValueError, "'dy'.*\\(3, 4, 5\\)"),
        ("dy_2d", _bwd, _set(dy=lambda a: a[0]), ValueError, "'dy'"),
    ]
SHAPE_CASES += [
    ("y_shape", "F.relu_backward", _set(y=lambda a: a[:, :3]), ValueError, "'(dy|y)'"),
    ("y_len", "C.relu_backward", _set(y=lambda a: a[:11]), ValueError, "'y'"),
    ("x_2d", "C.dropout_forward", _set(x=lambda a: a[None]), ValueError, "'x'"),
    ("x_2d", "C.relu_forward", _set(x=lambda a: a[None]), ValueError, "'x'"),
    ("dy_2d", "C.dropout_backward", _set(dy=lambda a: a[None]), ValueError, "'dy'"),
]
for _p in ("F", "C"):
    SHAPE_CASES += [
        ("table_1d", f"{_p}.embedding_forward", _set(table=lambda a: a[0]), ValueError, "'table'.*\\(V, d\\)"),
        ("table_3d", f"{_p}.embedding_forward", _set(table=lambda a: a[None]), ValueError, "'table'"),
        ("ids_1d", f"{_p}.embedding_forward", _set(ids=lambda a: a[:, 0]), ValueError, "'ids'.*\\(B, F\\)"),
        ("ids_3d", f"{_p}.embedding_forward", _set(ids=lambda a: a[None]), ValueError, "'ids'"),
        ("dout_1d", f"{_p}.embedding_backward", _set(dout=lambda a: a[0]), ValueError, "'dout'"),
        ("ids_rows", f"{_p}.embedding_backward", _set(ids=lambda a: a[:3]), ValueError, "'ids'.*\\(B, F\\)"),
        ("ids_1d", f"{_p}.embedding_backward", _set(ids=lambda a: a[:, 0]), ValueError, "'ids'"),
        ("table_d", f"{_p}.sparse_adagrad_step", _set(table=lambda a: a[:, :2].copy()), ValueError,
         "'table'.*\\(V, d\\)"),
        ("accum_rows", f"{_p}.sparse_adagrad_step", _set(accum=lambda a: a[:5].copy()), ValueError,
         "'accum'.*\\(6, 3\\)"),
        ("rows_len", f"{_p}.sparse_adagrad_step", _set(rows=lambda a: a[:3]), ValueError, "'rows'.*\\(U,\\)"),
        ("rows_2d", f"{_p}.sparse_adagrad_step", _set(rows=lambda a: a[None]), ValueError, "'rows'"),
        ("grad_rows_1d", f"{_p}.sparse_adagrad_step", _set(grad_rows=lambda a: a[0]), ValueError, "'grad_rows'"),
        ("m_d", f"{_p}.sparse_adam_step", _set(m=lambda a: a[:, :2].copy()), ValueError, "'m'"),
        ("v_rows", f"{_p}.sparse_adam_step", _set(v=lambda a: a[:5].copy()), ValueError, "'v'"),
        ("rows_len", f"{_p}.sparse_adam_step", _set(rows=lambda a: a[:3]), ValueError, "'rows'"),
    ]
SHAPE_CASES += [
    ("dout_too_narrow", "C.embedding_backward", _set(dout=lambda a: a[:, :5]), ValueError, "'dout'.*\\(4, 5\\)"),
    ("dout_block_past_the_end", "C.embedding_backward", _set(offset=1), ValueError, "'dout'.*1 \\+ 2 \\* 3"),
    ("dim_not_a_divisor", "F.embedding_backward", _set(dout=lambda a: a[:, :5]), ValueError, "dim.*\\(4, 5\\)"),
]


SHAPE_CASES += [
    ("log_alpha_not_square", "F.sinkhorn_forward[batched]", _set(log_alpha=lambda a: a[:, :, :4]), ValueError,
     "'log_alpha'.*\\(K, n, n\\)"),
    ("log_alpha_1d", "F.sinkhorn_forward[batched]", _set(log_alpha=lambda a: a[0, 0]), ValueError, "'log_alpha'"),
    ("log_alpha_4d", "F.sinkhorn_forward[batched]", _set(log_alpha=lambda a: a[None]), ValueError, "'log_alpha'"),
    ("log_alpha_not_square", "F.sinkhorn_forward[single]", _set(log_alpha=lambda a: a[:4]), ValueError,
     "'log_alpha'"),
    ("log_alpha_not_square", "F.sinkhorn", _set(log_alpha=lambda a: a[:, :4]), ValueError, "'log_alpha'"),
    ("dP_shape", "F.sinkhorn_backward", _set(dP=lambda a: a[:, :4]), ValueError, "'dP'.*\\(3, 5, 5\\)"),
    ("dP_2d", "F.sinkhorn_backward", _set(dP=lambda a: a[0]), ValueError, "'dP'"),
    ("dP_3d", "F.sinkhorn_backward[single]", _set(dP=lambda a: a[None]), ValueError, "'dP'.*\\(5, 5\\)"),
    ("P_not_square", "F.sinkhorn_regularization", _set(P=lambda a: a[:, :, :4]), ValueError, "'P'.*\\(K, n, n\\)"),
    ("P_1d", "F.sinkhorn_regularization", _set(P=lambda a: a[0, 0]), ValueError, "'P'"),
    ("log_alpha_not_square", "C.sinkhorn_forward", _set(log_alpha=lambda a: a[:, :4]), ValueError,
     "'log_alpha'.*\\(K, n, n\\)"),
    ("log_alpha_2d", "C.sinkhorn_forward", _set(log_alpha=lambda a: a[0]), ValueError, "'log_alpha'"),
    ("logs_odd_slots", "C.sinkhorn_backward", _set(logs=lambda a: a[:, :3]), ValueError, "'logs'.*\\(K, 2 iters"),
    ("logs_not_square", "C.sinkhorn_backward", _set(logs=lambda a: a[..., :4]), ValueError, "'logs'"),
    ("logs_3d", "C.sinkhorn_backward", _set(logs=lambda a: a[0]), ValueError, "'logs'"),
    ("P_wrong_n", "C.sinkhorn_backward", _set(P=lambda a: a[:, :4]), ValueError, "'P'.*\\(3, 5, 5\\)"),
    ("P_wrong_K", "C.sinkhorn_backward", _set(P=lambda a: a[:2]), ValueError, "'P'"),
    ("dP_wrong_K", "C.sinkhorn_backward", _set(dP=lambda a: a[:2]), ValueError, "'dP'"),
    ("P_not_square", "C.sinkhorn_entropy", _set(P=lambda a: a[:, :4]), ValueError, "'P'.*\\(K, n, n\\)"),
    ("Z_wrong_nodes", "F.comet[static]", _set(Z=lambda a: a[:, :4]), ValueError, "'Z'.*\\(k, n - 1\\)"),
    ("Z_wrong_k", "F.comet[static]", _set(Z=lambda a: a[:1]), ValueError, "'Z'"),
    ("Z_3d_for_static_A", "F.comet[static]", _set(Z=lambda a: a[None]), ValueError, "'Z'"),
    ("A_1d", "F.comet[static]", _set(A=lambda a: a[0]), ValueError, "'A'"),
    ("A_4d", "F.comet_forward[batched]", _set(A=lambda a: a[None]), ValueError, "'A'"),
    ("Z_2d_for_batched_A", "F.comet_forward[batched]", _set(Z=lambda a: a[0]), ValueError, "'Z'"),
    ("Z_wrong_B", "F.comet_forward[batched]", _set(Z=lambda a: a[:3]), ValueError, "'Z'.*\\(4, 2, 5\\)"),
    ("Z_n_nodes", "F.comet_forward[batched]", _set(Z=lambda a: np.concatenate([a, a[..., :1]], -1)), ValueError,
     "'Z'.*\\(B, k, n - 1\\)"),
    ("dw_n", "F.comet_backward[batched]", _set(dw=lambda a: a[:, :5]), ValueError, "'dw'.*\\(4, 6\\)"),
    ("dw_1d", "F.comet_backward[batched]", _set(dw=lambda a: a[0]), ValueError, "'dw'"),
    ("dw_2d", "F.comet_backward[static]", _set(dw=lambda a: a[None]), ValueError, "'dw'.*\\(6,\\)"),
    ("dw_per_tree_wrong_k", "F.comet_backward[batched]", _set(dw=lambda a: np.stack([a, a, a], 1)), ValueError,
     "'dw'.*\\(4, 2, 6\\)"),
    ("dw_per_tree_wrong_k", "F.comet_backward[static]", _set(dw=lambda a: np.stack([a, a, a])), ValueError,
     "'dw'.*\\(2, 6\\)"),
    ("x_1d", "F.comet_per_example_forward", _set(x=lambda a: a[0]), ValueError, "'x'"),
    ("x_p_differs", "F.comet_per_example_forward", _set(x=lambda a: a[:, :4]), ValueError, "'(x|U)'"),
    ("U_2d", "F.comet_per_example_forward", _set(U=lambda a: a[0]), ValueError, "'U'"),
    ("U_one_expert", "F.comet_per_example_forward", _set(U=lambda a: a[:, :1]), ValueError, "'U'.*n >= 2"),
    ("b_U_wrong_n", "F.comet_per_example_forward", _set(b_U=lambda a: a[:, :5]), ValueError, "'b_U'.*\\(k, n\\)"),
    ("W_wrong_nodes", "F.comet_per_example_forward", _set(W=lambda a: a[:, :4]), ValueError,
     "'W'.*\\(k, n - 1, p\\)"),
    ("W_wrong_k", "F.comet_per_example_forward", _set(W=lambda a: a[:1]), ValueError, "'W'"),
    ("b_W_wrong_nodes", "F.comet_per_example_forward", _set(b_W=lambda a: a[:, :4]), ValueError, "'b_W'"),
    ("dw_n", "F.comet_per_example_backward", _set(dw=lambda a: a[:, :5]), ValueError, "'dw'"),
    ("A_2d", "C.comet_forward", _set(A=lambda a: a[0]), ValueError, "'A'.*\\(B, k, n\\)"),
    ("Z_nodes", "C.comet_forward", _set(Z=lambda a: a[..., :4]), ValueError, "'Z'.*\\(B, k, n - 1\\)"),
    ("Z_B", "C.comet_forward", _set(Z=lambda a: a[:3]), ValueError, "'Z'"),
    ("dw_n", "C.comet_backward", _set(dw=lambda a: a[:, :5]), ValueError, "'dw'"),
    ("dw_per_tree_wrong_k", "C.comet_backward", _set(dw=lambda a: np.stack([a, a, a], 1)), ValueError,
     "'dw'.*\\(B, k, n\\)"),
    ("Z_nodes", "C.comet_backward", _set(Z=lambda a: a[..., :4]), ValueError, "'Z'"),
    ("sz_nodes", "C.comet_backward", _set(sz=lambda a: a[..., :4]), ValueError, "'sz'"),
    ("reach_int_B", "C.comet_backward", _set(reach_int=lambda a: a[:3]), ValueError, "'reach_int'"),
    ("reach_n", "C.comet_backward", _set(reach=lambda a: a[..., :5]), ValueError, "'reach'"),
    ("g_k", "C.comet_backward", _set(g=lambda a: a[:, :1]), ValueError, "'g'"),
    ("norm_1d", "C.comet_backward", _set(norm=lambda a: a[:, 0]), ValueError, "'norm'.*\\(B, 2\\)"),
]


def _apply(kwargs, changes):
    for arg, change in changes.items():
        kwargs[arg] = change(kwargs[arg]) if callable(change) else change
    return kwargs


@pytest.mark.parametrize("dtype", [F64], ids=["float64"])
@pytest.mark.parametrize("sid,changes,exc,match", [c[1:] for c in SHAPE_CASES],
                         ids=[f"{c[1]}-{c[0]}" for c in SHAPE_CASES])
@short_failures
def test_wrong_shape(sid, changes, exc, match, dtype):
    spec = SPECS[sid]
    kwargs = _apply(spec.build(dtype), changes)
    info = call_spec(spec, kwargs, exc, match)
    assert re.search(r"\(.*\)", str(info.value)), f"no shape in the message: {info.value}"


# ---------------------------------------------------------------------------------------------
# Scalar arguments: k, n, gamma, T, lam, xi, eps, layout, empty batches
# ---------------------------------------------------------------------------------------------

def _pe_with_k(k):
    def change(kwargs):
        rng = _rng()
        kwargs.update(G=_u(rng, (k, 5), F64), b_G=_u(rng, (k,), F64), W=_u(rng, (k, 3, 5), F64),
                      b_W=_u(rng, (k, 3), F64))
        return kwargs
    return change


def _pe_with_n(n):
    m = max((n - 1).bit_length(), 0)

    def change(kwargs):
        rng = _rng()
        kwargs.update(n=n, W=_u(rng, (3, m, 5), F64), b_W=_u(rng, (3, m), F64))
        return kwargs
    return change


def _with(**kw):
    """A change of scalar arguments, or of arrays built fresh (callables of rng)."""
    def change(kwargs):
        rng = _rng()
        for k, v in kw.items():
            kwargs[k] = v(rng) if callable(v) else v
        return kwargs
    return change


def _s_for_n(n):
    return _with(n=n, s=lambda rng: _u(rng, (5, max((n - 1).bit_length(), 0)), F64, 0, 1))


def _dsk_static_for_n(n):
    return _with(n=n, Z=lambda rng: _u(rng, (3, max((n - 1).bit_length(), 0)), F64))


def _c_dsk_for_n(n):
    return _with(n=n, Z=lambda rng: _u(rng, (4, 3, max((n - 1).bit_length(), 0)), F64))


HUGE_N = [2**30 + 1, 2**31, 2**40, 2**63 - 1, 2**64, 2**70]
BAD_N = [1, 0, -1, -(2**40)]
BAD_POSITIVE = [0.0, -1.0, NAN, INF]
BAD_NONNEG = [-1.0, NAN, INF]

SCALAR_CASES = []


def _add(sid, ident, change, exc, match):
    SCALAR_CASES.append((f"{sid}-{ident}", sid, change, exc, match))


N_RE = "n \\(the number of experts\\)"
for _n in BAD_N:
    _add("F.selector", f"n={_n}", _with(n=_n), ValueError, N_RE)
    _add("F.selector_backward", f"n={_n}", _with(n=_n), ValueError, N_RE)
    _add("F.dselect_k[static]", f"n={_n}", _with(n=_n), ValueError, N_RE)
    _add("F.dselect_k_forward[batched]", f"n={_n}", _with(n=_n), ValueError, N_RE)
    _add("F.dselect_k_per_example_forward", f"n={_n}", _with(n=_n), ValueError, N_RE)
    _add("C.selector_forward", f"n={_n}", _with(n=_n), ValueError, N_RE)
    _add("C.selector_backward", f"n={_n}", _with(n=_n), ValueError, N_RE)
    _add("C.dselect_k_forward", f"n={_n}", _with(n=_n), ValueError, N_RE)
for _n in HUGE_N:
    # documented: n > 2**30 (m > 30) is rejected with a ValueError, however large the int
    _add("F.selector", f"n={_n}", _s_for_n(_n), ValueError, N_RE)
    _add("F.dselect_k[static]", f"n={_n}", _dsk_static_for_n(_n), ValueError, N_RE)
    _add("F.dselect_k_per_example_forward", f"n={_n}", _pe_with_n(_n), ValueError, N_RE)
    # the raw bindings may answer an int beyond Py_ssize_t with OverflowError, but must raise
    _add("C.selector_forward", f"n={_n}", _s_for_n(_n),
         ValueError if _n < 2**63 else (ValueError, OverflowError), N_RE if _n < 2**63 else None)
    _add("C.dselect_k_forward", f"n={_n}", _c_dsk_for_n(_n),
         ValueError if _n < 2**63 else (ValueError, OverflowError), N_RE if _n < 2**63 else None)
for _sid in ("F.selector", "F.dselect_k[static]", "F.dselect_k_per_example_forward"):
    for _v in (8.0, "8", None, True, np.float64(8)):
        _add(_sid, f"n={_v!r}", _with(n=_v), TypeError, "n")
for _sid in ("C.selector_forward", "C.dselect_k_forward"):
    for _v in (8.0, "8", None):
        _add(_sid, f"n={_v!r}", _with(n=_v), TypeError, None)
# n from an array's shape
_add("F.softmax_selector_forward[batched]", "n=1",
     _with(alpha=lambda rng: _u(rng, (4, 1), F64), beta=lambda rng: _u(rng, (4, 1, 1), F64)), ValueError, N_RE)
_add("F.softmax_selector_forward[batched]", "n=0", _with(beta=lambda rng: _u(rng, (4, 3, 0), F64)),
     ValueError, "n")
_add("C.dselect_k_backward", "n=1",
     _with(r=lambda rng: _u(rng, (4, 1, 1), F64, 0, 1), sigma=lambda rng: _u(rng, (4, 1), F64),
           sz=lambda rng: _u(rng, (4, 1, 0), F64), Z=lambda rng: _u(rng, (4, 1, 0), F64),
           dw=lambda rng: _u(rng, (4, 1), F64)), ValueError, N_RE)
_add("F.mix_experts[nbd,static]", "n=0", _with(f=lambda rng: _u(rng, (0, 4, 5), F64), w=np.zeros(0)),
     ValueError, "'f'")
_add("C.mix_experts_forward", "n=0", _with(f=lambda rng: _u(rng, (0, 4, 5), F64), w=np.zeros(0)),
     ValueError, "'f'")

# k
K_RE = "k"
for _k in (0, -1, -(2**40)):
    _add("F.top_k[batched]", f"k={_k}", _with(k=_k), ValueError, K_RE)
    _add("C.topk_forward", f"k={_k}", _with(k=_k), ValueError, K_RE)
for _k in (7, 100, 2**31, 2**40, 2**63 - 1, 2**64, 2**100):
    _add("F.top_k[batched]", f"k={_k}", _with(k=_k), ValueError, "k.*n = 6")
    _add("F.top_k[static]", f"k={_k}", _with(k=_k), ValueError, "k.*n = 6")
    _add("C.topk_forward", f"k={_k}", _with(k=_k),
         ValueError if _k < 2**63 else (ValueError, OverflowError), "k.*n = 6" if _k < 2**63 else None)
for _v in (2.0, "2", None, True, np.float32(2)):
    _add("F.top_k[batched]", f"k={_v!r}", _with(k=_v), TypeError, "k")
for _v in (2.0, "2", None):
    _add("C.topk_forward", f"k={_v!r}", _with(k=_v), TypeError, None)
_add("F.dselect_k[static]", "k=0", _with(alpha=np.zeros(0), Z=np.zeros((0, 3))), ValueError, "k")
_add("F.dselect_k[static]", "k=9>n", _with(alpha=lambda rng: _u(rng, (9,), F64),
                                            Z=lambda rng: _u(rng, (9, 3), F64)), ValueError, "k.*n = 8")
_add("F.dselect_k_forward[batched]", "k=0", _with(alpha=np.zeros((4, 0)), Z=np.zeros((4, 0, 3))), ValueError, "k")
_add("F.dselect_k_forward[batched]", "k=9>n", _with(alpha=lambda rng: _u(rng, (4, 9), F64),
                                                     Z=lambda rng: _u(rng, (4, 9, 3), F64)), ValueError, "k.*n = 8")
_add("F.dselect_k_per_example_forward", "k=0", _pe_with_k(0), ValueError, "\\bk\\b")
_add("F.dselect_k_per_example_forward", "k=9>n", _pe_with_k(9), ValueError, "k.*n = 8")
_add("F.softmax_selector_forward[batched]", "k=0",
     _with(alpha=np.zeros((4, 0)), beta=np.zeros((4, 0, 6))), ValueError, "k")
_add("F.softmax_selector_forward[static]", "k=7>n",
     _with(alpha=lambda rng: _u(rng, (7,), F64), beta=lambda rng: _u(rng, (7, 6), F64)), ValueError, "k.*n = 6")
_add("C.dselect_k_forward", "k=0", _with(alpha=np.zeros((4, 0)), Z=np.zeros((4, 0, 3))), ValueError, "k")
_add("C.dselect_k_forward", "k=9>n", _with(alpha=lambda rng: _u(rng, (4, 9), F64),
                                            Z=lambda rng: _u(rng, (4, 9, 3), F64)), ValueError, "k.*n = 8")
_add("C.dselect_k_backward", "k=3>n=2",
     _with(r=lambda rng: _u(rng, (4, 3, 2), F64, 0, 1), dw=lambda rng: _u(rng, (4, 2), F64),
           sz=lambda rng: _u(rng, (4, 3, 1), F64), Z=lambda rng: _u(rng, (4, 3, 1), F64)), ValueError, "k")
_add("C.softmax_selector_forward", "k=0", _with(alpha=np.zeros((4, 0)), beta=np.zeros((4, 0, 6))), ValueError, "k")
_add("C.softmax_selector_backward", "k=7>n",
     _with(P=lambda rng: _u(rng, (4, 7, 6), F64, 0, 1), sigma=lambda rng: _u(rng, (4, 7), F64)), ValueError, "k")

# gamma and T
for _g in BAD_POSITIVE:
    for _sid in ("F.smooth_step", "F.smooth_step_backward", "F.dselect_k[static]", "F.dselect_k_forward[batched]",
                 "F.dselect_k_per_example_forward", "C.smooth_step_forward", "C.smooth_step_backward",
                 "C.dselect_k_forward", "C.dselect_k_backward"):
        _add(_sid, f"gamma={_g}", _with(gamma=_g), ValueError, "gamma")
    for _sid in ("F.softmax_selector_forward[batched]", "F.softmax_selector_forward[static]",
                 "C.softmax_selector_forward", "C.softmax_selector_backward"):
        _add(_sid, f"T={_g}", _with(T=_g), ValueError, "T")
for _v in ("1", None, [1.0], np.ones(2)):
    for _sid in ("F.smooth_step", "F.dselect_k[static]", "C.dselect_k_forward"):
        _add(_sid, f"gamma={type(_v).__name__}", _with(gamma=_v), TypeError, None)
    _add("F.softmax_selector_forward[batched]", f"T={type(_v).__name__}", _with(T=_v), TypeError, None)

# lam, xi, eps
for _v in BAD_NONNEG:
    for _sid in ("F.dselect_k_backward[batched]", "F.dselect_k_backward[static]", "F.dselect_k_per_example_backward",
                 "F.softmax_selector_backward[batched]", "C.dselect_k_backward", "C.softmax_selector_backward"):
        _add(_sid, f"lam={_v}", _with(lam=_v), ValueError, "lam")
    for _sid in ("F.dselect_k_backward[batched]", "F.dselect_k_per_example_backward", "C.dselect_k_backward"):
        _add(_sid, f"xi={_v}", _with(xi=_v), ValueError, "xi")
for _v in BAD_POSITIVE:
    for _sid in ("F.dselect_k_backward[batched]", "F.dselect_k_regularization", "F.softmax_selector_backward[batched]",
                 "F.softmax_selector_entropy", "C.dselect_k_backward", "C.selector_entropy",
                 "C.selector_mass_penalty", "C.softmax_selector_backward"):
        _add(_sid, f"eps={_v}", _with(eps=_v), ValueError, "eps")
_add("F.dselect_k_backward[batched]", "lam=str", _with(lam="0.1"), TypeError, None)
_add("C.linear_forward", "out=int", _with(out=3), TypeError, "'out'")

# layout
for _sid in ("F.mix_experts[nbd,static]", "F.mix_experts_backward[nbd,static]", "C.mix_experts_forward",
             "C.mix_experts_backward"):
    _add(_sid, "layout=xyz", _with(layout="xyz"), ValueError, "layout")
    _add(_sid, "layout=NBD", _with(layout="NBD"), ValueError, "layout")
    _add(_sid, "layout=None", _with(layout=None), TypeError, None)
    _add(_sid, "layout=int", _with(layout=1), TypeError, None)

# empty batch (B = 0)
EMPTY_RE = "(empty batch|B = 0)"
_add("F.dselect_k_forward[batched]", "B=0", _with(alpha=np.zeros((0, 3)), Z=np.zeros((0, 3, 3))), ValueError,
     "'alpha'.*" + EMPTY_RE)
_add("F.dselect_k_per_example_forward", "B=0", _with(x=np.zeros((0, 5))), ValueError, "'x'.*" + EMPTY_RE)
_add("F.softmax[batched]", "B=0", _with(logits=np.zeros((0, 6))), ValueError, "'logits'.*" + EMPTY_RE)
_add("F.softmax_backward", "B=0", _with(dw=np.zeros((0, 6)), w=np.zeros((0, 6))), ValueError, EMPTY_RE)
_add("F.top_k[batched]", "B=0", _with(logits=np.zeros((0, 6))), ValueError, "'logits'.*" + EMPTY_RE)
_add("F.top_k_backward", "B=0", _with(dw=np.zeros((0, 6)), w=np.zeros((0, 6))), ValueError, EMPTY_RE)
_add("F.softmax_selector_forward[batched]", "B=0", _with(alpha=np.zeros((0, 3)), beta=np.zeros((0, 3, 6))),
     ValueError, "'alpha'.*" + EMPTY_RE)
_add("F.mix_experts[nbd,static]", "B=0", _with(f=np.zeros((6, 0, 5))), ValueError, "'f'.*" + EMPTY_RE)
_add("F.mix_experts[bnd,per_example]", "B=0", _with(f=np.zeros((0, 6, 5)), w=np.zeros((0, 6))), ValueError,
     "'f'.*" + EMPTY_RE)
_add("F.mix_experts_backward[nbd,static]", "B=0", _with(f=np.zeros((6, 0, 5)), dy=np.zeros((0, 5))), ValueError,
     EMPTY_RE)
_add("F.linear", "B=0", _with(x=np.zeros((0, 5))), ValueError, "'x'.*" + EMPTY_RE)
_add("F.linear_backward", "B=0", _with(x=np.zeros((0, 5)), dy=np.zeros((0, 3))), ValueError, EMPTY_RE)
_add("C.dselect_k_forward", "B=0", _with(alpha=np.zeros((0, 3)), Z=np.zeros((0, 3, 3))), ValueError, EMPTY_RE)
_add("C.dselect_k_backward", "B=0",
     _with(r=np.zeros((0, 3, 8)), dw=np.zeros((0, 8)), sigma=np.zeros((0, 3)), sz=np.zeros((0, 3, 3)),
           Z=np.zeros((0, 3, 3))), ValueError, "'r'.*" + EMPTY_RE)
_add("C.softmax_forward", "B=0", _with(logits=np.zeros((0, 6))), ValueError, EMPTY_RE)
_add("C.softmax_backward", "B=0", _with(dw=np.zeros((0, 6)), w=np.zeros((0, 6))), ValueError, EMPTY_RE)
_add("C.topk_forward", "B=0", _with(logits=np.zeros((0, 6))), ValueError, EMPTY_RE)
_add("C.softmax_selector_forward", "B=0", _with(alpha=np.zeros((0, 3)), beta=np.zeros((0, 3, 6))), ValueError,
     EMPTY_RE)
_add("C.softmax_selector_backward", "B=0",
     _with(P=np.zeros((0, 3, 6)), sigma=np.zeros((0, 3)), dw=np.zeros((0, 6))), ValueError, "'P'.*" + EMPTY_RE)
_add("C.mix_experts_forward", "B=0", _with(f=np.zeros((6, 0, 5))), ValueError, EMPTY_RE)
_add("C.mix_experts_backward", "B=0", _with(f=np.zeros((0, 6, 5)), w=np.zeros((0, 6)), dy=np.zeros((0, 5))),
     ValueError, EMPTY_RE)
_add("C.linear_forward", "B=0", _with(x=np.zeros((0, 5))), ValueError, EMPTY_RE)
for _sid in ("F.mix_experts_many", "F.mix_experts_many_backward", "C.mix_experts_many_forward",
             "C.mix_experts_many_backward"):
    _bwd = "backward" in _sid
    _add(_sid, "B=0",
         _with(f=np.zeros((6, 0, 5)), w=np.zeros((3, 0, 6)), **({"dy": np.zeros((3, 0, 5))} if _bwd else {})),
         ValueError, "'f'.*" + EMPTY_RE)
    _add(_sid, "n=0", _with(f=np.zeros((0, 4, 5)), w=np.zeros((3, 4, 0))), ValueError, "'f'.*no experts.*n = 0")
    _add(_sid, "T=0", _with(w=np.zeros((0, 4, 6)), **({"dy": np.zeros((0, 4, 5))} if _bwd else {})), ValueError,
         "'w'.*no tasks.*T = 0")
_add("C.linear_backward", "B=0", _with(x=np.zeros((0, 5)), dy=np.zeros((0, 3))), ValueError, EMPTY_RE)


for _p in ("F", "C"):
    for _sid in (f"{_p}.dropout_forward", f"{_p}.dropout_backward"):
        for _v in (-0.1, 1.0, 1.5, NAN, INF):
            _add(_sid, f"rate={_v}", _with(rate=_v), ValueError, "rate")
        _add(_sid, "rate=str", _with(rate="0.3"), TypeError, None)
        for _name in ("seed", "step"):
            for _v in (-1, 2**64, 2**100):
                _add(_sid, f"{_name}={_v}", _with(**{_name: _v}), ValueError, _name)
            for _v in (1.5, True, None, "1", np.float64(2)):
                _add(_sid, f"{_name}={_v!r}", _with(**{_name: _v}), TypeError, _name)
    _add(f"{_p}.bce_with_logits", "targets<0", _with(targets=lambda rng: _u(rng, (6,), F64, -0.5, -0.1)), ValueError,
         "'targets'")
    _add(f"{_p}.bce_with_logits", "targets>1", _with(targets=lambda rng: _u(rng, (6,), F64, 1.01, 2)), ValueError,
         "'targets'")
    for _sid in (f"{_p}.bce_with_logits", f"{_p}.mse", f"{_p}.softmax_cross_entropy"):
        _add(_sid, "weights<0", _with(weights=lambda rng: -_u(rng, (6,), F64, 0.1, 1)), ValueError, "'weights'")
    _add(f"{_p}.bce_with_logits", "B=0", _with(logits=np.zeros(0), targets=np.zeros(0), weights=np.zeros(0)),
         ValueError, "'logits'.*" + "(empty batch|B = 0)")
    _add(f"{_p}.mse", "B=0", _with(pred=np.zeros((0, 3)), target=np.zeros((0, 3)), weights=np.zeros(0)),
         ValueError, "'pred'.*" + "(empty batch|B = 0)")
    _add(f"{_p}.softmax_cross_entropy", "B=0",
         _with(logits=np.zeros((0, 4)), labels=np.zeros(0, np.int64), weights=np.zeros(0)),
         ValueError, "'logits'.*" + "(empty batch|B = 0)")
    _add(f"{_p}.dense_forward", "B=0", _with(x=np.zeros((0, 5))), ValueError, "'x'.*(empty batch|B = 0)")
    _add(f"{_p}.dense_backward", "B=0", _with(x=np.zeros((0, 5)), dy=np.zeros((0, 3))), ValueError,
         "'x'.*(empty batch|B = 0)")
    # labels of softmax_cross_entropy: an integer ndarray (B,) of class indices in [0, C)
    for _ident, _labels, _exc, _match in (
            ("float", np.array([0.0, 3, 1, 2, 3, 0]), TypeError, "'labels'"),
            ("bool", np.array([0, 1, 1, 0, 1, 0], bool), TypeError, "'labels'"),
            ("list", [0, 3, 1, 2, 3, 0], TypeError, "'labels'"),
            ("None", None, TypeError, "'labels'"),
            ("negative", np.array([0, 3, -1, 2, 3, 0]), ValueError, "'labels'.*labels\\[2\\] = -1"),
            ("equal_to_C", np.array([0, 3, 1, 4, 3, 0]), ValueError, "'labels'.*labels\\[3\\] = 4"),
            ("huge_uint64", np.array([0, 3, 1, 2**63 + 5, 3, 0], np.uint64), ValueError, "'labels'"),
            ("uint8_255", np.array([0, 3, 1, 255, 3, 0], np.uint8), ValueError, "'labels'"),
            ("too_short", np.array([0, 3, 1, 2, 3]), ValueError, "'labels'.*\\(6,\\)"),
            ("2d", np.array([[0], [3], [1], [2], [3], [0]]), ValueError, "'labels'")):
        _add(f"{_p}.softmax_cross_entropy", f"labels={_ident}", _with(labels=_labels), _exc, _match)
    for _sid in (f"{_p}.sgd_step", f"{_p}.adam_step", f"{_p}.adagrad_step"):
        for _v in (0.0, -1.0, NAN, INF):
            _add(_sid, f"lr={_v}", _with(lr=_v), ValueError, "lr")
        for _v in (-1.0, NAN):
            _add(_sid, f"weight_decay={_v}", _with(weight_decay=_v), ValueError, "weight_decay")
        _add(_sid, "lr=str", _with(lr="0.1"), TypeError, None)
    for _v in (-0.5, NAN, INF):
        _add(f"{_p}.sgd_step", f"momentum={_v}", _with(momentum=_v), ValueError, "momentum")
    _add(f"{_p}.sgd_step", "nesterov_without_momentum", _with(momentum=0.0, nesterov=True), ValueError, "nesterov")
    _add(f"{_p}.sgd_step", "velocity=None_with_momentum", _with(velocity=None), ValueError, "'velocity'")
    for _v in (0, -1, 2**64):
        _add(f"{_p}.adam_step", f"step={_v}", _with(step=_v), ValueError, "step")
    for _v in (1.5, True, None):
        _add(f"{_p}.adam_step", f"step={_v!r}", _with(step=_v), TypeError, "step")
    for _name in ("beta1", "beta2"):
        for _v in (1.0, -0.1, NAN):
            _add(f"{_p}.adam_step", f"{_name}={_v}", _with(**{_name: _v}), ValueError, _name)
    for _sid in (f"{_p}.adam_step", f"{_p}.adagrad_step"):
        for _v in (0.0, -1e-8, NAN):
            _add(_sid, f"eps={_v}", _with(eps=_v), ValueError, "eps")


# embedding ids and sparse-step rows: integer arrays of row indices in [0, V)
for _p in ("F", "C"):
    for _sid in (f"{_p}.embedding_forward", f"{_p}.embedding_backward"):
        for _ident, _bad_ids, _exc, _match in (
                ("negative", np.array([[1, 0], [-1, 1], [2, 3], [1, 1]]), ValueError,
                 "'ids'.*\\[0, 5\\).*ids\\[1, 0\\] = -1"),
                ("equal_to_V", np.array([[1, 0], [4, 1], [2, 5], [1, 1]]), ValueError, "'ids'.*ids\\[2, 1\\] = 5"),
                ("huge_int64", np.array([[1, 0], [4, 1], [2, 3], [2**62, 1]]), ValueError, "'ids'.*ids\\[3, 0\\]"),
                ("int32_negative", np.array([[1, 0], [4, 1], [2, 3], [1, -7]], np.int32), ValueError,
                 "'ids'.*ids\\[3, 1\\] = -7"),
                ("huge_uint64", np.array([[1, 0], [4, 1], [2, 3], [1, 2**64 - 1]], np.uint64), ValueError,
                 "'ids'.*18446744073709551615"),
                ("uint8_255", np.array([[1, 0], [4, 1], [2, 3], [1, 255]], np.uint8), ValueError, "'ids'.*255"),
                ("float", np.array([[1.0, 0], [4, 1], [2, 3], [1, 1]]), TypeError, "'ids'.*integer"),
                ("bool", np.ones((4, 2), bool), TypeError, "'ids'.*integer"),
                ("list", [[1, 0], [4, 1], [2, 3], [1, 1]], TypeError, "'ids'"),
                ("None", None, TypeError, "'ids'")):
            _add(_sid, f"ids={_ident}", _with(ids=_bad_ids), _exc, _match)
    _add(f"{_p}.embedding_forward", "B=0", _with(ids=np.zeros((0, 2), np.int64)), ValueError, "'ids'.*" + EMPTY_RE)
    _add(f"{_p}.embedding_forward", "offset_without_out", _with(offset=2), ValueError, "offset.*out")
    _add(f"{_p}.embedding_forward", "offset=-1", _with(offset=-1, out=np.zeros((4, 9))), ValueError, "offset")
    _add(f"{_p}.embedding_forward", "offset=float", _with(offset=1.0, out=np.zeros((4, 9))), TypeError, "offset")
    _add(f"{_p}.embedding_forward", "out_too_narrow_for_offset", _with(offset=4, out=np.zeros((4, 9))), ValueError,
         "'out'.*D >= offset \\+ F \\* d = 10")
    _add(f"{_p}.embedding_forward", "out_column_slice_too_narrow",
         _with(offset=0, out=np.zeros((4, 9))[:, 4:]), ValueError, "'out'")
    _add(f"{_p}.embedding_backward", "B=0", _with(dout=np.zeros((0, 6)), ids=np.zeros((0, 2), np.int64)),
         ValueError, "'dout'.*" + EMPTY_RE)
    for _v in (0, -1):
        _add(f"{_p}.embedding_backward", f"num_embeddings={_v}", _with(num_embeddings=_v), ValueError,
             "num_embeddings")
        _add(f"{_p}.embedding_backward", f"dim={_v}", _with(dim=_v), ValueError, "dim")
    _add(f"{_p}.embedding_backward", "num_embeddings_below_an_id", _with(num_embeddings=4), ValueError,
         "'ids'.*\\[0, 4\\).*ids\\[1, 0\\] = 4")
    _add(f"{_p}.embedding_backward", "num_embeddings=float", _with(num_embeddings=5.0), TypeError, "num_embeddings")
    _add(f"{_p}.embedding_backward", "offset=-1", _with(offset=-1, dim=3), ValueError, "offset")
    for _sid in (f"{_p}.sparse_adagrad_step", f"{_p}.sparse_adam_step"):
        for _ident, _rows, _exc, _match in (
                ("repeated", np.array([5, 0, 5, 1]), ValueError, "'rows'.*distinct.*rows\\[0\\] = rows\\[2\\] = 5"),
                ("repeated_adjacent", np.array([0, 1, 1, 3]), ValueError, "'rows'.*rows\\[1\\] = rows\\[2\\] = 1"),
                ("negative", np.array([5, 0, -2, 1]), ValueError, "'rows'.*\\[0, 6\\).*rows\\[2\\] = -2"),
                ("equal_to_V", np.array([5, 0, 6, 1]), ValueError, "'rows'.*rows\\[2\\] = 6"),
                ("huge_uint64", np.array([5, 0, 2**64 - 1, 1], np.uint64), ValueError, "'rows'"),
                ("float", np.array([5.0, 0, 3, 1]), TypeError, "'rows'.*integer"),
                ("list", [5, 0, 3, 1], TypeError, "'rows'"),
                ("None", None, TypeError, "'rows'")):
            _add(_sid, f"rows={_ident}", _with(rows=_rows), _exc, _match)
        for _v in (0.0, -1.0, NAN, INF):
            _add(_sid, f"lr={_v}", _with(lr=_v), ValueError, "lr")
        for _v in (0.0, -1e-8, NAN):
            _add(_sid, f"eps={_v}", _with(eps=_v), ValueError, "eps")
        _add(_sid, "lr=str", _with(lr="0.1"), TypeError, None)
    for _v in (0, -1, 2**64):
        _add(f"{_p}.sparse_adam_step", f"step={_v}", _with(step=_v), ValueError, "step")
    for _v in (1.5, True, None):
        _add(f"{_p}.sparse_adam_step", f"step={_v!r}", _with(step=_v), TypeError, "step")
    for _name in ("beta1", "beta2"):
        for _v in (1.0, -0.1, NAN):
            _add(f"{_p}.sparse_adam_step", f"{_name}={_v}", _with(**{_name: _v}), ValueError, _name)
# convolution and pooling: strides, paddings, kernels, empty batches, argmax indices
for _p in ("F", "C"):
    for _sid in (f"{_p}.conv2d_forward", f"{_p}.conv2d_backward"):
        for _v in (0, -1, (1, 0), (0, 2), (-3, 1)):
            _add(_sid, f"stride={_v}", _with(stride=_v), ValueError, "stride")
        for _v in ((1, 1, 1), ()):
            _add(_sid, f"stride={_v}", _with(stride=_v), ValueError, "stride")
        for _v in (1.5, "1", None, True, (1, 1.0), np.float64(1)):
            _add(_sid, f"stride={_v!r}", _with(stride=_v), TypeError, "stride")
        for _v in (-1, (0, -1), (1, 0, 0, -2), (3, 0), (0, 2), (0, 0, 0, 2), 2**40):
            _add(_sid, f"padding={_v}", _with(padding=_v), ValueError, "padding")
        _add(_sid, "padding=3-tuple", _with(padding=(0, 0, 0)), ValueError, "padding")
        for _v in (1.5, None, True, (1, "1")):
            _add(_sid, f"padding={_v!r}", _with(padding=_v), TypeError, "padding")
    _add(f"{_p}.conv2d_forward", "B=0", _with(x=np.zeros((0, 2, 6, 5))), ValueError, "'x'.*(empty batch|B = 0)")
    _add(f"{_p}.conv2d_backward", "B=0", _with(x=np.zeros((0, 2, 6, 5)), dy=np.zeros((0, 3, 3, 4))), ValueError,
         "'x'.*(empty batch|B = 0)")
    for _name in ("kernel", "stride"):
        for _v in (0, -2, (2, 0), (1, 2, 3)):
            _add(f"{_p}.max_pool2d_forward", f"{_name}={_v}", _with(**{_name: _v}), ValueError, _name)
        for _v in (2.0, "2", True, (2, None)):
            _add(f"{_p}.max_pool2d_forward", f"{_name}={_v!r}", _with(**{_name: _v}), TypeError, _name)
    _add(f"{_p}.max_pool2d_forward", "kernel=None", _with(kernel=None), TypeError, "kernel")
    _add(f"{_p}.max_pool2d_forward", "B=0", _with(x=np.zeros((0, 3, 7, 6))), ValueError, "'x'.*(empty batch|B = 0)")
    _add(f"{_p}.max_pool2d_backward", "B=0", _with(dy=np.zeros((0, 3, 3, 5)), indices=np.zeros((0, 3, 3, 5), np.int64)),
         ValueError, "'dy'.*(empty batch|B = 0)")
    for _v in (0, -1, (7, 0), (1, 2, 3), None, 2.0):
        _add(f"{_p}.max_pool2d_backward", f"input_size={_v!r}", _with(input_size=_v),
             TypeError if _v is None or isinstance(_v, float) else ValueError, "input_size")

    def _bad_index(value, dtype=np.int64):
        def make(rng):
            idx = F.max_pool2d_forward(**_pool_args(F64))[1].astype(dtype)
            idx[1, 2, 0, 3] = value
            return idx
        return make
    for _ident, _make, _exc, _match in (
            ("negative", _bad_index(-1), ValueError, "'indices'.*\\[0, 42\\) \\(V = H W\\).*indices\\[78\\] = -1"),
            ("equal_to_HW", _bad_index(42), ValueError, "'indices'.*42"),
            ("huge_uint64", _bad_index(2**63 + 5, np.uint64), ValueError, "'indices'"),
            ("uint8_255", _bad_index(255, np.uint8), ValueError, "'indices'"),
            ("float", lambda rng: np.zeros((2, 3, 3, 5)), TypeError, "'indices'"),
            ("bool", lambda rng: np.zeros((2, 3, 3, 5), bool), TypeError, "'indices'"),
            ("list", lambda rng: np.zeros((2, 3, 3, 5), np.int64).tolist(), TypeError, "'indices'"),
            ("None", None, TypeError, "'indices'")):
        _add(f"{_p}.max_pool2d_backward", f"indices={_ident}", _with(indices=_make), _exc, _match)
_add("F.conv2d_forward", "padding=same_with_stride_2", _with(padding="same", stride=2), ValueError, "same.*stride")
_add("F.conv2d_backward", "padding=same_with_stride_(1,2)", _with(padding="same", stride=(1, 2)), ValueError,
     "same.*stride")
_add("F.conv2d_forward", "padding=full", _with(padding="full"), ValueError, "padding")
_add("F.conv2d_forward[same]", "W_even_kernel_wrong_C", _with(W=lambda rng: _u(rng, (3, 1, 2, 2), F64)), ValueError,
     "'W'")
_add("F.max_pool2d_backward", "input_size_other_batch", _with(input_size=(3, 3, 7, 6)), ValueError, "input_size")

# Sinkhorn: tau, iters, lam, eps, empty and degenerate sizes, overflow of log_alpha / tau
_SK_FWD = ("F.sinkhorn_forward[batched]", "F.sinkhorn_forward[single]", "F.sinkhorn", "C.sinkhorn_forward")
for _sid in _SK_FWD + ("C.sinkhorn_backward",):
    for _v in BAD_POSITIVE:
        _add(_sid, f"tau={_v}", _with(tau=_v), ValueError, "tau")
    _add(_sid, "tau=str", _with(tau="0.5"), TypeError, None)
for _sid in _SK_FWD:
    for _v in (0, -1, 100001, 2**64):
        _add(_sid, f"iters={_v}", _with(iters=_v), ValueError, "iters")
    for _v in (1.5, True, None, "3", np.float64(3)):
        _add(_sid, f"iters={_v!r}", _with(iters=_v), TypeError, "iters")
    _add(_sid, "log_alpha/tau_overflows", _with(tau=1e-300), ValueError, "log_alpha.*tau")
    _add(_sid, "n=0", _with(log_alpha=np.zeros((3, 0, 0)) if "single" not in _sid else np.zeros((0, 0))),
         ValueError, "'log_alpha'")
for _sid in ("F.sinkhorn_forward[batched]", "F.sinkhorn", "C.sinkhorn_forward"):
    _add(_sid, "K=0", _with(log_alpha=np.zeros((0, 5, 5))), ValueError, "'log_alpha'.*" + EMPTY_RE)
for _v in BAD_NONNEG:
    for _sid in ("F.sinkhorn_backward", "C.sinkhorn_backward"):
        _add(_sid, f"lam={_v}", _with(lam=_v), ValueError, "lam")
for _v in BAD_POSITIVE:
    for _sid in ("F.sinkhorn_backward", "F.sinkhorn_regularization", "C.sinkhorn_backward", "C.sinkhorn_entropy"):
        _add(_sid, f"eps={_v}", _with(eps=_v), ValueError, "eps")
for _sid in ("F.sinkhorn_regularization", "C.sinkhorn_entropy"):
    _add(_sid, "P<0", _with(P=lambda rng: -_u(rng, (3, 5, 5), F64, 0.1, 1)), ValueError, "'P'.*>= 0")
_add("F.sinkhorn_regularization", "K=0", _with(P=np.zeros((0, 5, 5))), ValueError, "'P'.*K = 0")
_add("C.sinkhorn_backward", "K=0", _with(logs=np.zeros((0, 8, 5, 5)), P=np.zeros((0, 5, 5)), dP=np.zeros((0, 5, 5))),
     ValueError, "'logs'.*" + EMPTY_RE)
for _v in ("float32", "int64", "float16"):
    _add("C.sinkhorn_backward", f"logs_{_v}", _with(logs=lambda rng, _v=_v: _c_sk_cache(F64)["logs"].astype(_v)),
         TypeError, "'logs'.*float64")



# COMET: k and n from A's shape, gamma, lam, eps, empty batches
_add("F.comet[static]", "n=1", _with(A=lambda rng: _u(rng, (1, 1), F64), Z=np.zeros((1, 0))), ValueError, N_RE)
_add("F.comet_forward[batched]", "n=1", _with(A=lambda rng: _u(rng, (4, 1, 1), F64), Z=np.zeros((4, 1, 0))),
     ValueError, N_RE)
_add("C.comet_forward", "n=0", _with(A=np.zeros((4, 2, 0)), Z=np.zeros((4, 2, 0))), ValueError, N_RE)
_add("F.comet[static]", "k=0", _with(A=np.zeros((0, 6)), Z=np.zeros((0, 5))), ValueError, "k")
_add("F.comet[static]", "k=7>n", _with(A=lambda rng: _u(rng, (7, 6), F64), Z=lambda rng: _u(rng, (7, 5), F64)),
     ValueError, "k.*n = 6")
_add("F.comet_forward[batched]", "k=7>n",
     _with(A=lambda rng: _u(rng, (4, 7, 6), F64), Z=lambda rng: _u(rng, (4, 7, 5), F64)), ValueError, "k.*n = 6")
_add("F.comet_per_example_forward", "k=7>n",
     _with(U=lambda rng: _u(rng, (7, 6, 5), F64), b_U=lambda rng: _u(rng, (7, 6), F64),
           W=lambda rng: _u(rng, (7, 5, 5), F64), b_W=lambda rng: _u(rng, (7, 5), F64)), ValueError, "k.*n = 6")
_add("C.comet_forward", "k=0", _with(A=np.zeros((4, 0, 6)), Z=np.zeros((4, 0, 5))), ValueError, "k")
_add("C.comet_backward", "k=3>n=2",
     _with(A=lambda rng: _u(rng, (4, 3, 2), F64), dw=lambda rng: _u(rng, (4, 2), F64)), ValueError, "k")
for _g in BAD_POSITIVE:
    for _sid in ("F.comet[static]", "F.comet_forward[batched]", "F.comet_per_example_forward", "C.comet_forward",
                 "C.comet_backward"):
        _add(_sid, f"gamma={_g}", _with(gamma=_g), ValueError, "gamma")
    for _sid in ("F.comet_backward[batched]", "F.comet_regularization", "F.comet_per_example_backward",
                 "C.comet_backward"):
        _add(_sid, f"eps={_g}", _with(eps=_g), ValueError, "eps")
for _v in BAD_NONNEG:
    for _sid in ("F.comet_backward[batched]", "F.comet_backward[static]", "F.comet_per_example_backward",
                 "C.comet_backward"):
        _add(_sid, f"lam={_v}", _with(lam=_v), ValueError, "lam")
for _v in ("1", None, [1.0]):
    _add("F.comet[static]", f"gamma={type(_v).__name__}", _with(gamma=_v), TypeError, None)
    _add("C.comet_forward", f"gamma={type(_v).__name__}", _with(gamma=_v), TypeError, None)
_add("F.comet_forward[batched]", "B=0", _with(A=np.zeros((0, 2, 6)), Z=np.zeros((0, 2, 5))), ValueError,
     "'A'.*" + EMPTY_RE)
_add("F.comet_per_example_forward", "B=0", _with(x=np.zeros((0, 5))), ValueError, EMPTY_RE)
_add("C.comet_forward", "B=0", _with(A=np.zeros((0, 2, 6)), Z=np.zeros((0, 2, 5))), ValueError, "'A'.*" + EMPTY_RE)
_add("C.comet_backward", "B=0",
     _with(A=np.zeros((0, 2, 6)), dw=np.zeros((0, 6)), Z=np.zeros((0, 2, 5)), sz=np.zeros((0, 2, 5)),
           reach_int=np.zeros((0, 2, 5)), reach=np.zeros((0, 2, 6)), g=np.zeros((0, 2, 6)), norm=np.zeros((0, 2))),
     ValueError, "'A'.*" + EMPTY_RE)


@pytest.mark.parametrize("sid,change,exc,match", [c[1:] for c in SCALAR_CASES], ids=[c[0] for c in SCALAR_CASES])
@short_failures
def test_bad_scalar_or_size(sid, change, exc, match):
    spec = SPECS[sid]
    kwargs = change(spec.build(F64))
    call_spec(spec, kwargs, exc, match)


@pytest.mark.parametrize("n", [1, 0, -1, -(2**40)])
@short_failures
def test_n_bits_bad_n(n):
    with pytest.raises(ValueError, match=N_RE):
        F.n_bits(n)


@pytest.mark.parametrize("n", [2.0, "2", None, True, [2]], ids=repr)
@short_failures
def test_n_bits_not_an_int(n):
    with pytest.raises(TypeError, match="n"):
        F.n_bits(n)


@pytest.mark.parametrize("n,m", [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (2**30, 30), (np.int64(16), 4)])
@short_failures
def test_n_bits_valid(n, m):
    assert F.n_bits(n) == m


@pytest.mark.parametrize("padding,kernel,stride,expected", [
    ("valid", (5, 5), 1, (0, 0, 0, 0)), ("valid", 3, (2, 3), (0, 0, 0, 0)), ("same", (5, 5), 1, (2, 2, 2, 2)),
    ("same", (4, 1), (1, 1), (1, 2, 0, 0)), ("same", 2, [1, 1], (0, 1, 0, 1)), (2, (5, 5), 2, (2, 2, 2, 2)),
    ((1, 2), (5, 5), 1, (1, 1, 2, 2)), ((1, 2, 3, 4), (5, 5), 1, (1, 2, 3, 4))], ids=repr)
@short_failures
def test_conv2d_padding_valid(padding, kernel, stride, expected):
    assert tuple(F.conv2d_padding(padding, kernel, stride)) == expected


@pytest.mark.parametrize("padding,stride,match", [
    ("same", 2, "same.*stride"), ("same", (1, 2), "same.*stride"), ("full", 1, "padding"), ("SAME", 1, "padding"),
    ("", 1, "padding")], ids=repr)
@short_failures
def test_conv2d_padding_bad(padding, stride, match):
    with pytest.raises(ValueError, match=match):
        F.conv2d_padding(padding, (3, 3), stride)


VALID_EDGE_CASES = [
    ("F.sinkhorn_forward[batched]", "n=1", _with(log_alpha=lambda rng: _u(rng, (3, 1, 1), F64))),
    ("F.sinkhorn_forward[batched]", "iters=1", _with(iters=1)),
    ("F.sinkhorn_forward[batched]", "iters=np.int64", _with(iters=np.int64(3))),
    ("F.sinkhorn_forward[batched]", "tau=huge", _with(tau=1e300)),
    ("F.sinkhorn_forward[batched]", "tau=int", _with(tau=2)),
    ("F.sinkhorn", "tau=tiny_but_finite_iterates", _with(tau=1e-140)),
    ("F.sinkhorn_backward", "dP=None", _with(dP=None)),
    ("F.sinkhorn_backward", "lam=0", _with(lam=0.0)),
    ("C.sinkhorn_forward", "keep=False", _with(keep=False)),
    ("F.sinkhorn_regularization", "zero_rows", _with(P=np.zeros((2, 3, 3)))),
    ("F.top_k[batched]", "k=n", _with(k=6)),
    ("F.top_k[batched]", "k=1", _with(k=1)),
    ("F.top_k[batched]", "k=np.int64", _with(k=np.int64(2))),
    ("F.top_k[batched]", "n=1,k=1", _with(k=1, logits=lambda rng: _u(rng, (4, 1), F64))),
    ("F.softmax[batched]", "n=1", _with(logits=lambda rng: _u(rng, (4, 1), F64))),
    ("F.dselect_k[static]", "k=n=8", _with(alpha=lambda rng: _u(rng, (8,), F64), Z=lambda rng: _u(rng, (8, 3), F64))),
    ("F.dselect_k[static]", "n=2", _with(n=2, alpha=lambda rng: _u(rng, (2,), F64), Z=lambda rng: _u(rng, (2, 1), F64))),
    ("F.dselect_k[static]", "n=np.int64", _with(n=np.int64(8))),
    ("F.dselect_k[static]", "gamma=tiny", _with(gamma=1e-300)),
    ("F.dselect_k[static]", "gamma=int", _with(gamma=2)),
    ("F.dselect_k_backward[batched]", "dw=None", _with(dw=None)),
    ("F.dselect_k_backward[batched]", "dw_per_selector", _with(dw=lambda rng: _u(rng, (4, 3, 8), F64))),
    ("F.dselect_k_backward[static]", "dw_per_selector", _with(dw=lambda rng: _u(rng, (3, 8), F64))),
    ("C.dselect_k_backward", "dw_per_selector", _with(dw=lambda rng: _u(rng, (4, 3, 8), F64))),
    ("F.comet_backward[batched]", "dw_per_tree", _with(dw=lambda rng: _u(rng, (4, 2, 6), F64))),
    ("F.comet_backward[static]", "dw_per_tree", _with(dw=lambda rng: _u(rng, (2, 6), F64))),
    ("C.comet_backward", "dw_per_tree", _with(dw=lambda rng: _u(rng, (4, 2, 6), F64))),
    ("F.dselect_k_backward[batched]", "lam=xi=0", _with(lam=0.0, xi=0.0)),
    ("F.softmax_selector_backward[batched]", "dw=None", _with(dw=None)),
    ("F.dselect_k_per_example_backward", "need_dx=False", _with(need_dx=False)),
    ("F.linear", "b=None", _with(b=None)),
    ("F.linear", "o=0", _with(W=np.zeros((0, 5)), b=np.zeros(0))),
    ("F.linear", "p=0", _with(x=np.zeros((4, 0)), W=np.zeros((3, 0)))),
    ("F.linear_backward", "p=0", _with(x=np.zeros((4, 0)), W=np.zeros((3, 0)))),
    ("F.mix_experts[nbd,static]", "n=1", _with(f=lambda rng: _u(rng, (1, 4, 5), F64), w=np.ones(1))),
    ("F.mix_experts[nbd,static]", "all_zero_w", _with(w=np.zeros(6))),
    ("F.mix_experts[nbd,static]", "d=0", _with(f=np.zeros((6, 4, 0)))),
    ("F.mix_experts_many", "n=1", _with(f=lambda rng: _u(rng, (1, 4, 5), F64), w=np.ones((3, 4, 1)))),
    ("F.mix_experts_many", "T=1", _with(w=lambda rng: _many_w(rng, F64, T=1))),
    ("F.mix_experts_many", "all_zero_w", _with(w=np.zeros((3, 4, 6)))),
    ("F.mix_experts_many", "d=0", _with(f=np.zeros((6, 4, 0)))),
    ("F.mix_experts_many", "skip_zero=False", _with(skip_zero=False)),
    ("F.mix_experts_many_backward", "n=1", _with(f=lambda rng: _u(rng, (1, 4, 5), F64), w=np.ones((3, 4, 1)))),
    ("F.mix_experts_many_backward", "all_zero_w", _with(w=np.zeros((3, 4, 6)))),
    ("F.mix_experts_many_backward", "d=0", _with(f=np.zeros((6, 4, 0)), dy=np.zeros((3, 4, 0)))),
    ("C.mix_experts_many_backward", "skip_zero=False", _with(skip_zero=False)),
    ("C.linear_backward", "no_dx_no_db", _with(need_dx=False, need_db=False)),
    ("F.dropout_forward", "seed=2**64-1", _with(seed=2**64 - 1, step=2**64 - 1)),
    ("F.dropout_forward", "numpy_ints", _with(seed=np.uint64(5), step=np.int8(3))),
    ("F.dropout_forward", "rate=0", _with(rate=0.0)),
    ("F.dropout_forward", "not_training", _with(training=False)),
    ("F.softmax_cross_entropy", "labels_uint8", _with(labels=np.array([0, 3, 1, 2, 3, 0], np.uint8))),
    ("F.softmax_cross_entropy", "labels_int32_strided", _with(labels=np.array([0, 0, 3, 0, 1, 0, 2, 0, 3, 0, 0, 0],
                                                                          np.int32)[::2])),
    ("F.softmax_cross_entropy", "labels_byteswapped", _with(labels=np.array([0, 3, 1, 2, 3, 0], ">i8"))),
    ("F.softmax_cross_entropy", "C=1", _with(logits=lambda rng: _u(rng, (6, 1), F64), labels=np.zeros(6, np.int64))),
    ("F.sgd_step", "no_momentum_no_velocity", _with(momentum=0.0, nesterov=False, velocity=None)),
    ("F.sgd_step", "plain", _with(momentum=0.0, nesterov=False, weight_decay=0.0)),
    ("F.adam_step", "step=1", _with(step=1)),
    ("F.adam_step", "beta=0", _with(beta1=0.0, beta2=0.0)),
    ("F.dense_backward", "db=None,no_dx", _with(db=None, need_dx=False)),
    ("F.bce_with_logits", "weights=None", _with(weights=None)),
    ("F.mse", "weights_zero", _with(weights=np.zeros(6))),
    ("F.embedding_forward", "ids_int32", _with(ids=_emb_ids().astype(np.int32))),
    ("F.embedding_forward", "ids_uint8", _with(ids=_emb_ids().astype(np.uint8))),
    ("F.embedding_forward", "ids_int16_strided", _with(ids=np.repeat(_emb_ids(), 2, axis=1)[:, ::2].astype(np.int16))),
    ("F.embedding_forward", "ids_byteswapped", _with(ids=_emb_ids().astype(">i8"))),
    ("F.embedding_forward", "ids_fortran_int32", _with(ids=np.asfortranarray(_emb_ids(), np.int32))),
    ("F.embedding_forward", "F=0", _with(ids=np.zeros((4, 0), np.int64))),
    ("F.embedding_forward", "V=1", _with(table=lambda rng: _u(rng, (1, 3), F64), ids=np.zeros((4, 2), np.int64))),
    ("F.embedding_forward", "into_a_wider_out", _with(out=np.zeros((4, 10)), offset=3)),
    ("F.embedding_forward", "into_a_column_slice", _with(out=np.zeros((4, 10))[:, 2:8])),
    ("C.embedding_forward", "B=1_out_with_odd_row_stride", _with(ids=_emb_ids()[:1], out=np.zeros((3, 10))[:1, 1:])),
    ("F.embedding_backward", "ids_int32", _with(ids=_emb_ids().astype(np.int32))),
    ("C.embedding_backward", "block_of_a_wider_dout", _with(dout=lambda rng: _u(rng, (4, 11), F64), offset=4)),
    ("C.embedding_backward", "F=0", _with(ids=np.zeros((4, 0), np.int64))),
    ("F.embedding_backward", "huge_V", _with(num_embeddings=2**62, ids=_emb_ids() * 2**58)),
    ("F.sparse_adagrad_step", "no_rows", _with(rows=np.zeros(0, np.int64), grad_rows=np.zeros((0, 3)))),
    ("F.sparse_adagrad_step", "rows_int32", _with(rows=np.array([5, 0, 3, 1], np.int32))),
    ("F.sparse_adam_step", "rows_uint16_sorted", _with(rows=np.array([0, 1, 3, 5], np.uint16))),
    ("F.sparse_adam_step", "step=1", _with(step=1)),
    ("F.conv2d_forward", "b=None", _with(b=None)),
    ("F.conv2d_forward", "padding=valid", _with(padding="valid", stride=np.int64(1))),
    ("F.conv2d_forward", "kernel=input", _with(x=lambda rng: _u(rng, (2, 2, 3, 2), F64), padding=0)),
    ("F.conv2d_forward[same]", "even_kernel_1x1_input", _with(x=lambda rng: _u(rng, (2, 2, 1, 1), F64))),
    ("F.conv2d_backward", "db=None,no_dx", _with(db=None, need_dx=False)),
    ("C.conv2d_forward", "defaults", lambda kw: dict(x=kw["x"], W=kw["W"])),
    ("F.max_pool2d_forward", "defaults", lambda kw: dict(x=kw["x"])),
    ("F.max_pool2d_forward", "kernel=plane", _with(kernel=(7, 6), stride=None)),
    ("F.max_pool2d_forward", "numpy_ints", _with(kernel=np.int32(2), stride=[np.int64(1), 3])),
    ("F.max_pool2d_backward", "indices_int32", _with(indices=lambda rng: F.max_pool2d_forward(
        **_pool_args(F64))[1].astype(np.int32))),
    ("F.max_pool2d_backward", "indices_uint16_strided", _with(indices=lambda rng: np.repeat(F.max_pool2d_forward(
        **_pool_args(F64))[1].astype(np.uint16), 2, axis=3)[..., ::2])),
    ("F.max_pool2d_backward", "input_size_full_shape", _with(input_size=(2, 3, 7, 6))),
]


VALID_EDGE_CASES += [
    ("F.comet[static]", "n=2,k=1", _with(A=lambda rng: _u(rng, (1, 2), F64), Z=lambda rng: _u(rng, (1, 1), F64))),
    ("F.comet[static]", "k=n=6", _with(A=lambda rng: _u(rng, (6, 6), F64), Z=lambda rng: _u(rng, (6, 5), F64))),
    ("F.comet[static]", "gamma=tiny", _with(gamma=1e-300)),
    ("F.comet[static]", "gamma=int", _with(gamma=2)),
    ("F.comet[static]", "all_saturated", _with(Z=lambda rng: np.sign(_u(rng, (2, 5), F64)) * 3)),
    ("F.comet[static]", "huge_logits", _with(A=lambda rng: _u(rng, (2, 6), F64) * 1e300)),
    ("F.comet_backward[batched]", "dw=None", _with(dw=None)),
    ("F.comet_backward[batched]", "lam=0", _with(lam=0.0)),
    ("F.comet_per_example_backward", "need_dx=False", _with(need_dx=False)),
]


@pytest.mark.parametrize("sid,change", [c[::2] for c in VALID_EDGE_CASES], ids=[f"{c[0]}-{c[1]}" for c in VALID_EDGE_CASES])
@short_failures
def test_valid_edge_cases(sid, change):
    spec = SPECS[sid]
    result = call_spec(spec, change(spec.build(F64)))
    for a in _arrays_in(result):
        assert np.all(np.isfinite(a))


@short_failures
def test_linear_degenerate_sizes_values():
    x, W, b = np.zeros((4, 0)), np.zeros((3, 0)), np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(F.linear(x, W, b), np.tile(b, (4, 1)))
    dx, dW, db = F.linear_backward(np.ones((4, 3)), x, W)
    assert dx.shape == (4, 0) and dW.shape == (3, 0)
    np.testing.assert_array_equal(db, [4.0, 4.0, 4.0])


EMPTY_ELEMENTWISE = [
    ("C.sinkhorn_entropy", _with(P=np.zeros((0, 4, 4))), None),
    ("F.smooth_step", _with(t=np.zeros((0, 4))), (0, 4)),
    ("F.smooth_step_backward", _with(t=np.zeros(0), dout=np.zeros(0)), (0,)),
    ("F.noisy_logits", _with(clean=np.zeros(0), raw_noise=np.zeros(0), normal=np.zeros(0)), (0,)),
    ("F.selector", _with(s=np.zeros((0, 3))), (0, 8)),
    ("F.selector_backward", _with(s=np.zeros((0, 3)), dr=np.zeros((0, 8))), (0, 3)),
    ("C.selector_entropy", _with(r=np.zeros((0, 8))), None),
    ("C.selector_mass_penalty", _with(r=np.zeros((0, 8))), None),
]


@pytest.mark.parametrize("sid,change,shape", EMPTY_ELEMENTWISE, ids=[c[0] for c in EMPTY_ELEMENTWISE])
@short_failures
def test_empty_elementwise_input_does_not_crash(sid, change, shape):
    """Functions without a batch dimension take any shape: an empty one must either give an empty
    result of the right shape or raise ValueError, never crash."""
    spec = SPECS[sid]
    try:
        result = call_spec(spec, change(spec.build(F64)))
    except ValueError:
        return
    if shape is None:
        assert result == 0.0
    else:
        assert result.shape == shape


@pytest.mark.parametrize("n", [2**30 + 1, 2**31])
@short_failures
def test_huge_n_is_rejected_before_allocating(n):
    """A huge n must be refused from the scalar alone (no multi-GB allocation attempted)."""
    with pytest.raises(ValueError, match=N_RE):
        _C.selector_backward(np.zeros((1, 4)), np.zeros((1, 31)), n)


# ---------------------------------------------------------------------------------------------
# Arrays updated in place (accumulated gradients, optimizer slabs): never copied, so every layout
# that would need a copy is refused, and nothing is half-updated by a refused call
# ---------------------------------------------------------------------------------------------

INPLACE_BAD = {
    "strided": (_strided, ValueError),
    "reversed": (lambda a: a[::-1].copy()[::-1], ValueError),
    "fortran": (lambda a: np.asfortranarray(a) if a.ndim == 2 and min(a.shape) > 1 else None, ValueError),
    "readonly": (_readonly, ValueError),
    "misaligned": (_misaligned, ValueError),
    "byteswapped": (lambda a: a.astype(a.dtype.newbyteorder()), TypeError),
    "broadcast": (lambda a: np.broadcast_to(a[:1], a.shape), ValueError),
}


@pytest.mark.parametrize("sid,arg", MUTABLE_ARGS, ids=_ids(MUTABLE_ARGS))
@short_failures
def test_inplace_argument_layouts_are_refused(sid, arg):
    spec = SPECS[sid]

    def case(kind):
        make, exc = INPLACE_BAD[kind]
        kwargs = spec.build(F64)
        view = make(kwargs[arg])
        if view is None:
            pytest.skip("not applicable")
        kwargs[arg] = view
        call_spec(spec, kwargs, exc, _name_re(arg))
    run_subcases([(kind, lambda kind=kind: case(kind)) for kind in INPLACE_BAD])


@pytest.mark.parametrize("sid,arg", MUTABLE_ARGS, ids=_ids(MUTABLE_ARGS))
@short_failures
def test_inplace_argument_sharing_memory_is_refused(sid, arg):
    """An array updated in place may share no memory with another array argument -- whether or
    not that other argument is contiguous (a strided input is copied by the binding, but the
    caller's array must still not change through the in-place update)."""
    spec = SPECS[sid]

    def case(other, how):
        kwargs = spec.build(F64)
        m, o = kwargs[arg], kwargs[other]
        step = 2 if how == "strided" else 1
        buf = np.zeros(2 * max(m.size, o.size) + 8, F64)
        m_view = buf[:m.size].reshape(m.shape)
        m_view[...] = m
        o_view = buf[:step * o.size:step].reshape(o.shape)
        o_view[...] = o
        assert np.shares_memory(m_view, o_view)
        kwargs[arg], kwargs[other] = m_view, o_view
        call_spec(spec, kwargs, ValueError, "shares memory|share|overlap")
    others = [a for a in spec.arrays if a != arg]
    run_subcases([(f"{other}-{how}", lambda other=other, how=how: case(other, how)) for other in others
                  for how in ("contiguous", "strided") if how == "contiguous" or other not in spec.mutable])


@pytest.mark.parametrize("sid", sorted({sid for sid, _ in MUTABLE_ARGS}))
@short_failures
def test_inplace_update_is_the_update_of_contiguous_copies(sid):
    """The in-place result does not depend on the layout of the read-only inputs."""
    spec = SPECS[sid]
    expected = call_spec(spec, spec.build(F64))
    kwargs = spec.build(F64)
    for name in spec.inputs():
        kwargs[name] = _strided(kwargs[name])
    assert_same(call_spec(spec, kwargs), expected)


# ---------------------------------------------------------------------------------------------
# out=
# ---------------------------------------------------------------------------------------------

def _expected_out(spec, dtype):
    return spec.out_of(spec.fn(**spec.build(dtype)))


def _out_2d_noncontig(ref):
    if ref.ndim >= 2 and ref.shape[0] > 1 and ref.shape[-1] > 1:
        return np.asfortranarray(np.empty_like(ref))
    return None


BAD_OUTS = {
    # name: (make(ref) -> out or None to skip, exception, regex)
    "float32_for_float64": (lambda r: np.empty(r.shape, F32), TypeError, "'out'.*dtype"),
    "int64": (lambda r: np.empty(r.shape, np.int64), TypeError, "'out'"),
    "object": (lambda r: np.empty(r.shape, object), TypeError, "'out'"),
    "byteswapped": (lambda r: np.empty(r.shape, r.dtype.newbyteorder()), TypeError, "'out'"),
    "extra_row": (lambda r: np.empty((r.shape[0] + 1,) + r.shape[1:], r.dtype), ValueError, "'out'"),
    "too_few_dims": (lambda r: np.empty(r.shape[1:], r.dtype) if r.ndim > 1 else np.empty((), r.dtype),
                     ValueError, "'out'"),
    "transposed_shape": (lambda r: np.empty(r.shape[::-1], r.dtype) if r.ndim == 2 and r.shape[0] != r.shape[1]
                         else None, ValueError, "'out'"),
    "strided": (lambda r: _strided(np.empty_like(r)), ValueError, "'out'"),
    "fortran": (_out_2d_noncontig, ValueError, "'out'"),
    "readonly": (lambda r: _readonly(np.empty_like(r)), ValueError, "'out'"),
    "misaligned": (lambda r: _misaligned(np.zeros_like(r)), ValueError, "'out'"),
    "list": (lambda r: r.tolist(), TypeError, "'out'"),
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("sid", OUT_SPECS)
@short_failures
def test_out_valid(sid, dtype):
    spec = SPECS[sid]
    ref = _expected_out(spec, dtype)
    out = np.full_like(ref, -7.0)
    kwargs = dict(spec.build(dtype), out=out)
    result = call_spec(spec, kwargs)
    got = spec.out_of(result)
    assert np.shares_memory(got, out), "the result is not written into out="
    if sid.startswith("C."):
        assert got is out
    np.testing.assert_array_equal(out, ref)
    assert_same(result, spec.fn(**spec.build(dtype)))


@pytest.mark.parametrize("sid", OUT_SPECS)
@short_failures
def test_out_bad(sid):
    """Every bad out= of BAD_OUTS raises its exception, naming 'out'."""
    spec = SPECS[sid]
    ref = _expected_out(spec, F64)

    def case(bad):
        make, exc, match = BAD_OUTS[bad]
        out = make(ref)
        if out is None:
            pytest.skip("not applicable to this output shape")
        call_spec(spec, dict(spec.build(F64), out=out), exc, match)
    run_subcases([(bad, lambda bad=bad: case(bad)) for bad in BAD_OUTS])


@short_failures
def test_out_float64_for_float32_inputs():
    x = _u(_rng(), (4, 5), F32)
    W = _u(_rng(), (3, 5), F32)
    checked_call(F.linear, dict(x=x, W=W, out=np.empty((4, 3))), TypeError, "'out'")
    checked_call(F.top_k, dict(logits=x, k=2, out=np.empty((4, 5))), TypeError, "'out'")


OVERLAP_CASES = [(sid, arg, how) for sid in OUT_SPECS for i, arg in enumerate(SPECS[sid].arrays)
                 for how in ("contiguous", "strided", "byteswapped") if how != "byteswapped" or i == 0]


@pytest.mark.parametrize("sid,arg,how", OVERLAP_CASES, ids=[f"{s}-{a}-{h}" for s, a, h in OVERLAP_CASES])
@short_failures
def test_out_overlapping_an_input(sid, arg, how):
    """out= sharing memory with an input is refused, whether or not that input is contiguous
    (a non-contiguous or byte-swapped input is copied first, but the caller's array must still
    not be overwritten)."""
    spec = SPECS[sid]
    ref = _expected_out(spec, F64)
    kwargs = spec.build(F64)
    a = kwargs[arg]
    step = 1 if how != "strided" else 2
    buf = np.zeros(step * max(a.size, ref.size) + 8, F64)
    if how == "byteswapped":
        view = buf[:a.size].view(buf.dtype.newbyteorder()).reshape(a.shape)
    else:
        view = buf[:step * a.size:step].reshape(a.shape)
    view[...] = a
    out = buf[:ref.size].reshape(ref.shape)
    assert np.shares_memory(out, view) and out.flags.c_contiguous
    kwargs[arg] = view
    kwargs["out"] = out
    call_spec(spec, kwargs, ValueError, "'out'.*(share|overlap)")


@short_failures
def test_out_is_the_input_itself():
    t = _u(_rng(), (7,), F64)
    checked_call(_C.smooth_step_forward, dict(t=t, gamma=1.0, out=t), ValueError, "'out'")
    checked_call(F.smooth_step, dict(t=t, out=t), ValueError, "'out'")
    logits = _u(_rng(), (4, 6), F64)
    checked_call(F.softmax, dict(logits=logits, out=logits), ValueError, "'out'")
    checked_call(F.top_k, dict(logits=logits, k=2, out=logits), ValueError, "'out'")


# ---------------------------------------------------------------------------------------------
# Raw bindings: wrong call signatures raise TypeError
# ---------------------------------------------------------------------------------------------

C_SPECS = [sid for sid in SPECS if sid.startswith("C.")]


@pytest.mark.parametrize("sid", C_SPECS)
@short_failures
def test_raw_binding_bad_signatures(sid):
    spec = SPECS[sid]
    kwargs = spec.build(F64)
    with pytest.raises(TypeError):
        spec.fn()
    with pytest.raises(TypeError):
        spec.fn(**kwargs, bogus=1)
    with pytest.raises(TypeError):
        spec.fn(*kwargs.values(), *([None] * 10))
    with pytest.raises(TypeError):
        spec.fn(*kwargs.values(), **{next(iter(kwargs)): next(iter(kwargs.values()))})


@pytest.mark.parametrize("sid", C_SPECS)
@short_failures
def test_raw_binding_ndarray_subclass_and_huge_ndim(sid):
    """ndarray subclasses are arrays (accepted or refused cleanly); a 40-D array is refused with a
    ValueError whose shape message does not overflow its buffer."""
    spec = SPECS[sid]
    kwargs = spec.build(F64)
    arg = spec.arrays[0]
    a = kwargs[arg]
    kwargs[arg] = np.ones((1,) * 40, F64) * 0.5
    info = call_spec(spec, kwargs, ValueError, _name_re(arg))
    assert len(str(info.value)) < 1000
    kwargs = spec.build(F64)
    kwargs[arg] = a.view(np.ma.MaskedArray)
    try:
        result = call_spec(spec, kwargs)
    except (TypeError, ValueError):
        return
    expected = spec.fn(**spec.build(F64))
    assert_same(result if not isinstance(result, np.ndarray) else np.asarray(result), expected)


@short_failures
def test_set_num_threads_bad_values():
    import dselectk
    for bad, exc in ((0, ValueError), (-1, ValueError), (5000, ValueError), (2.0, TypeError), ("2", TypeError),
                     (None, TypeError), (True, TypeError)):
        with pytest.raises(exc):
            dselectk.set_num_threads(bad)
    for bad, exc in ((0, ValueError), (-1, ValueError), (5000, ValueError), (2.0, TypeError), ("2", TypeError)):
        with pytest.raises(exc):
            _C.set_num_threads(bad)
    with pytest.raises((OverflowError, ValueError)):
        _C.set_num_threads(2**70)


# ---------------------------------------------------------------------------------------------
# COMET: the leaf order (an int argument), cache dtypes, every argument non-contiguous at once
# ---------------------------------------------------------------------------------------------

@short_failures
def test_comet_leaf_nodes_bad_n():
    for fn in (F.comet_leaf_nodes, _C.comet_leaf_nodes):
        for bad in (1, 0, -1, 2**30 + 1):
            with pytest.raises(ValueError, match=N_RE):
                fn(bad)
        for bad in (2.0, "2", None):
            with pytest.raises(TypeError):
                fn(bad)
    with pytest.raises(TypeError):
        F.comet_leaf_nodes(True)
    assert F.comet_leaf_nodes(np.int64(3)).tolist() == [3, 4, 2]


@short_failures
def test_comet_mismatch_with_cache_dtype():
    checked_call(F.comet_backward, dict(dw=_u(_rng(), (4, 6), F32), cache=_comet_cache(F64)), TypeError, "dtype")
    checked_call(F.comet_backward, dict(dw=_u(_rng(), (6,), F64), cache=_comet_cache(F32, static=True)), TypeError,
                 "dtype")


@short_failures
def test_comet_all_arguments_non_contiguous_at_once():
    kwargs = _comet_pe_args(F64)
    expected_w, expected_cache = F.comet_per_example_forward(**kwargs)
    odd = dict(kwargs, x=np.asfortranarray(kwargs["x"]), U=_strided(kwargs["U"]), b_U=kwargs["b_U"].astype(">f8"),
               W=kwargs["W"][::-1].copy()[::-1], b_W=_readonly(kwargs["b_W"]))
    w, cache = checked_call(F.comet_per_example_forward, odd)
    assert_same(w, expected_w)
    dw = _u(_rng(), (6, 6), F64)
    expected = F.comet_per_example_backward(dw, expected_cache, 0.1)
    got = checked_call(F.comet_per_example_backward, dict(dw=_strided(dw), cache=cache, lam=0.1))
    assert_same(got, expected)
    a = _comet_args(F64)
    w, cache = F.comet_forward(np.asfortranarray(a["A"]), _strided(a["Z"]), 1.0)
    assert_same(w, F.comet_forward(a["A"], a["Z"], 1.0)[0])


@short_failures
def test_comet_out_is_an_input():
    a = _comet_args(F64)
    out = a["A"][:, 0, :]  # (4, 6), a view into A
    checked_call(F.comet_forward, dict(A=a["A"], Z=a["Z"], out=np.ascontiguousarray(out)))  # a copy: fine
    buf = a["A"].reshape(-1)[:24].reshape(4, 6)
    checked_call(F.comet_forward, dict(A=a["A"], Z=a["Z"], out=buf), ValueError, "'out'")
