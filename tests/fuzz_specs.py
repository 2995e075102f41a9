"""The table that drives the fuzz suite (tests/test_fuzz_functional.py): one entry per public
function of ``dselectk.functional``, saying how to build a valid call of random sizes and which of
its arguments are what. A name in ``functional.__all__`` without an entry fails
``test_every_public_function_has_a_spec``, so a new kernel cannot skip the fuzzing.

Each ``make(g)`` returns the keyword arguments of a valid call, drawing its sizes (0 included where
a size may be 0) and flags from ``g`` (a :class:`Gen`) and its values from ``g.rng``; ``g.dtype``
is the call's float dtype (float32 or float64). The fuzzer then perturbs them (dtypes, shapes,
layouts, NaN / Inf, aliasing, ``out=``) and checks the result against the same call on
contiguous copies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dselectk import functional as F


class Gen:
    """Sizes, flags and choices from a source of integers (a Hypothesis draw, or random.Random
    for the deterministic tests), values from ``rng``."""

    def __init__(self, integer, dtype):
        self._integer, self.dtype = integer, np.dtype(dtype)
        self.rng = np.random.default_rng(integer(0, 2**32 - 1))

    def size(self, lo=0, hi=3):
        return self._integer(lo, hi)

    def flag(self):
        return bool(self._integer(0, 1))

    def pick(self, *options):
        return options[self._integer(0, len(options) - 1)]

    def shape(self, max_ndim=3, lo=0, hi=3):
        return tuple(self.size(lo, hi) for _ in range(self.size(0, max_ndim)))

    def arr(self, *shape, lo=-2.0, hi=2.0):
        return self.rng.uniform(lo, hi, size=shape).astype(self.dtype)

    def sparse(self, *shape, lo=-2.0, hi=2.0):
        """Like arr, with some exact zeros (which skip_zero and ReLU treat specially)."""
        a = self.arr(*shape, lo=lo, hi=hi)
        a[self.rng.random(shape) < 0.3] = 0
        return a

    def ids(self, hi, *shape):
        return self.rng.integers(0, max(hi, 1), size=shape)


@dataclass(frozen=True)
class Spec:
    """How to call one function. Array arguments: ``floats`` share the call's float dtype;
    ``indices`` are integer arrays (ids, labels, rows, pooling indices); ``inplace`` are float
    arrays the call updates (their final values are part of its result; they are never copied, so
    layouts other than C-contiguous, aligned, writeable and native may be refused); ``out``: the
    function has ``out=`` (fuzzed like an in-place argument). ``scalars``: each scalar argument and
    its kind (see ``BAD_SCALARS`` in the test module). ``caches``: arguments that are a forward's
    cache. ``call``: what to call (default ``functional.<name>``)."""

    make: Callable[[Gen], dict]
    floats: tuple = ()
    indices: tuple = ()
    inplace: tuple = ()
    out: bool = False
    scalars: dict = field(default_factory=dict)
    caches: tuple = ()
    call: Callable | None = None


def _m(n):
    return F.n_bits(n)


# --- builders shared by forward / backward pairs ------------------------------------------------

def _gate_logits(g, last, n):
    """alpha (k,) and a second array (k, last) for a static gate, or (B, k) and (B, k, last) per
    example; 1 <= k <= min(3, n)."""
    k = g.size(1, min(3, n))
    if g.flag():
        return g.arr(k), g.arr(k, last)
    B = g.size(1, 3)
    return g.arr(B, k), g.arr(B, k, last)


def _dselect_k(g):
    n = g.size(2, 9)
    alpha, Z = _gate_logits(g, _m(n), n)
    return dict(alpha=alpha, Z=Z, n=n, gamma=g.pick(0.5, 1.0, 4.0))


def _dselect_k_backward(g):
    a = _dselect_k(g)
    w, cache = F.dselect_k_forward(**a)
    dw = None if g.size(0, 4) == 0 else g.arr(*w.shape)
    return dict(dw=dw, cache=cache, lam=g.pick(0.0, 0.1, 2.0), xi=g.pick(0.0, 0.5), eps=g.pick(1e-6, 1e-3))


def _per_example(g):
    n, B, p = g.size(2, 9), g.size(1, 3), g.size(1, 4)
    k = g.size(1, min(3, n))
    m = _m(n)
    return dict(x=g.arr(B, p), G=g.arr(k, p), b_G=g.arr(k), W=g.arr(k, m, p), b_W=g.arr(k, m), n=n,
                gamma=g.pick(0.5, 1.0))


def _per_example_backward(g):
    w, cache = F.dselect_k_per_example_forward(**_per_example(g))
    return dict(dw=g.arr(*w.shape), cache=cache, lam=g.pick(0.0, 0.3), xi=g.pick(0.0, 0.3), eps=1e-6,
                need_dx=g.flag())


def _comet(g):
    """A (k, n), Z (k, n - 1) static, or (B, k, n), (B, k, n - 1); 2 <= n <= 9, 1 <= k <= min(3, n)."""
    n = g.size(2, 9)
    k = g.size(1, min(3, n))
    lead = () if g.flag() else (g.size(1, 3),)
    return dict(A=g.arr(*lead, k, n), Z=g.arr(*lead, k, n - 1), gamma=g.pick(0.5, 1.0, 4.0))


def _comet_backward(g):
    w, cache = F.comet_forward(**_comet(g))
    dw = None if g.size(0, 4) == 0 else g.arr(*w.shape)
    return dict(dw=dw, cache=cache, lam=g.pick(0.0, 0.1, 2.0), eps=g.pick(1e-6, 1e-3))


def _comet_per_example(g):
    n, B, p = g.size(2, 9), g.size(1, 3), g.size(1, 4)
    k = g.size(1, min(3, n))
    return dict(x=g.arr(B, p), U=g.arr(k, n, p), b_U=g.arr(k, n), W=g.arr(k, n - 1, p), b_W=g.arr(k, n - 1),
                gamma=g.pick(0.5, 1.0))


def _comet_per_example_backward(g):
    w, cache = F.comet_per_example_forward(**_comet_per_example(g))
    return dict(dw=g.arr(*w.shape), cache=cache, lam=g.pick(0.0, 0.3), eps=1e-6, need_dx=g.flag())


def _logits(g):
    n = g.size(1, 5)
    return g.arr(n) if g.flag() else g.arr(g.size(1, 3), n)


def _softmax_selector(g):
    n = g.size(2, 5)
    alpha, beta = _gate_logits(g, n, n)
    return dict(alpha=alpha, beta=beta, T=g.pick(0.3, 1.0, 5.0))


def _softmax_selector_backward(g):
    w, cache = F.softmax_selector_forward(**_softmax_selector(g))
    dw = None if g.size(0, 4) == 0 else g.arr(*w.shape)
    return dict(dw=dw, cache=cache, lam=g.pick(0.0, 0.5), eps=1e-6)


def _sinkhorn(g):
    n = g.size(1, 5)
    log_alpha = g.arr(n, n) if g.flag() else g.arr(g.size(1, 3), n, n)
    return dict(log_alpha=log_alpha, tau=g.pick(1e-3, 0.3, 2.0), iters=g.size(1, 6))


def _sinkhorn_backward(g):
    P, cache = F.sinkhorn_forward(**_sinkhorn(g))
    dP = None if g.size(0, 4) == 0 else g.arr(*P.shape)
    return dict(dP=dP, cache=cache, lam=g.pick(0.0, 1e-4, 0.5), eps=g.pick(1e-6, 1e-3))


def _mix(g, backward=False):
    n, B, d = g.size(1, 4), g.size(0, 3), g.size(0, 3)
    layout = g.pick("nbd", "bnd")
    f = g.arr(n, B, d) if layout == "nbd" else g.arr(B, n, d)
    w = g.sparse(n, lo=0, hi=1) if g.flag() else g.sparse(B, n, lo=0, hi=1)
    a = dict(f=f, w=w, layout=layout, skip_zero=g.flag())
    return dict(dy=g.arr(B, d), **a) if backward else a


def _mix_many(g, backward=False):
    n, B, d, T = g.size(1, 4), g.size(0, 3), g.size(0, 3), g.size(1, 3)
    a = dict(f=g.sparse(n, B, d, lo=0, hi=2), w=g.sparse(T, B, n, lo=0, hi=1), skip_zero=g.flag())
    if backward:
        a = dict(dy=g.arr(T, B, d), **a, relu_mask=g.flag())
    return a


def _linear(g):
    B, p, o = g.size(0, 3), g.size(0, 4), g.size(0, 3)
    return dict(x=g.arr(B, p), W=g.arr(o, p), b=g.arr(o) if g.flag() else None)


def _dense(g, backward=False):
    B, p, o = g.size(0, 3), g.size(0, 4), g.size(0, 3)
    a = dict(x=g.arr(B, p), W=g.arr(p, o))
    if backward:
        return dict(dy=g.arr(B, o), **a, dW=g.arr(p, o), db=g.arr(o) if g.flag() else None, need_dx=g.flag(),
                    input_relu=g.flag(), input_dropout=g.pick(0.0, 0.3))
    return dict(**a, b=g.arr(o) if g.flag() else None, relu=g.flag())


def _dropout(g, backward=False):
    return {("dy" if backward else "x"): g.arr(*g.shape()), "rate": g.pick(0.0, 0.3, 0.9),
            "seed": g.pick(0, 7, 2**64 - 1), "step": g.size(0, 5), "training": g.flag()}


def _column(g, B, lo=-2.0, hi=2.0):
    return g.arr(B, lo=lo, hi=hi) if g.flag() else g.arr(B, 1, lo=lo, hi=hi)


def _weights(g, B):
    return g.arr(B, lo=0, hi=2) if g.flag() else None


def _conv(g, backward=False):
    B, C, H, W_, Fo = g.size(1 if backward else 0, 2), g.size(1, 2), g.size(1, 5), g.size(1, 5), g.size(1, 3)
    KH, KW = g.size(1, H), g.size(1, W_)
    stride = g.pick(1, 2, (1, 2))
    padding = g.pick("valid", "same", 0, 1, (0, 1), (1, 0, 0, 1)) if stride == 1 else g.pick("valid", 0, (1, 0, 0, 1))
    padding = padding if not isinstance(padding, int) or padding < min(KH, KW) else 0
    if isinstance(padding, tuple) and (max(padding[:2]) >= KH or max(padding[-2:]) >= KW):
        padding = "valid"
    a = dict(x=g.arr(B, C, H, W_), W=g.arr(Fo, C, KH, KW), stride=stride, padding=padding)
    if not backward:
        return dict(**a, b=g.arr(Fo) if g.flag() else None, relu=g.flag())
    y = F.conv2d_forward(**a)
    return dict(dy=g.arr(*y.shape), **a, dW=g.arr(Fo, C, KH, KW), db=g.arr(Fo) if g.flag() else None,
                need_dx=g.flag())


def _conv_pool(g, backward=False):
    """A convolution whose output plane fits the pooling that follows it (conv2d_relu_pool_*)."""
    a = _conv(g, backward=True)
    y = F.conv2d_forward(a["x"], a["W"], stride=a["stride"], padding=a["padding"])
    OH, OW = y.shape[2:]
    pool = g.pick(1, 2, (g.size(1, OH), g.size(1, OW)))
    if isinstance(pool, int) and pool > min(OH, OW):
        pool = 1
    kw = dict(x=a["x"], W=a["W"], stride=a["stride"], padding=a["padding"], pool=pool,
              pool_stride=g.pick(None, 1, 2, (2, 1)))
    if not backward:
        return dict(**kw, b=g.arr(a["W"].shape[0]) if g.flag() else None)
    out, code = F.conv2d_relu_pool_forward(**kw)
    return dict(dy=g.arr(*out.shape), code=code, y=out, **kw, dW=a["dW"], db=a["db"], need_dx=g.flag())


def _pool(g, min_batch=0):
    B, C, H, W_ = g.size(min_batch, 2), g.size(1, 2), g.size(1, 5), g.size(1, 5)
    kernel = g.pick(1, 2, (g.size(1, H), g.size(1, W_)))
    kernel = kernel if isinstance(kernel, tuple) or kernel <= min(H, W_) else 1
    return dict(x=g.arr(B, C, H, W_), kernel=kernel, stride=g.pick(None, 1, 2, (2, 1)))


def _pool_backward(g):
    a = _pool(g, min_batch=1)
    y, indices = F.max_pool2d_forward(**a)
    H, W_ = a["x"].shape[2:]
    return dict(dy=g.arr(*y.shape), indices=indices, input_size=g.pick((H, W_), a["x"].shape),
                relu_y=np.maximum(y, 0) if g.flag() else None)


def _optim(g, kind):
    N = g.size(0, 6)
    a = dict(params=g.arr(N), grads=g.arr(N))
    if kind == "sgd":
        momentum = g.pick(0.0, 0.9)
        return dict(**a, velocity=g.arr(N), lr=g.pick(0.1, 1.0), momentum=momentum,
                    weight_decay=g.pick(0.0, 0.01), nesterov=momentum > 0 and g.flag())
    if kind == "adam":
        return dict(**a, m=g.arr(N), v=g.arr(N, lo=0, hi=1), step=g.size(1, 5), lr=g.pick(1e-3, 0.1),
                    beta1=g.pick(0.0, 0.9), beta2=g.pick(0.0, 0.999), eps=g.pick(1e-8, 1e-3),
                    weight_decay=g.pick(0.0, 0.01))
    return dict(**a, accum=g.arr(N, lo=0, hi=1), lr=g.pick(0.01, 0.5), eps=g.pick(1e-10, 1e-3),
                weight_decay=g.pick(0.0, 0.01))


def _embedding(g):
    V, d, B, Fe = g.size(1, 5), g.size(1, 3), g.size(0, 3), g.size(0, 2)
    a = dict(table=g.arr(V, d), ids=g.ids(V, B, Fe))
    if g.flag():
        offset = g.size(0, 2)
        return dict(**a, out=g.arr(B, offset + Fe * d + g.size(0, 1)), offset=offset)
    return a


def _embedding_backward(g):
    V, d, B, Fe, offset = g.size(1, 5), g.size(1, 3), g.size(0, 3), g.size(1, 2), g.size(0, 2)
    return dict(dout=g.arr(B, offset + Fe * d), ids=g.ids(V, B, Fe), num_embeddings=V,
                dim=g.pick(d, None), offset=offset)


def _sparse_rows(g, V):
    U = g.size(0, V)
    return g.rng.permutation(V)[:U]


def _sparse_optim(g, kind):
    V, d = g.size(1, 5), g.size(1, 3)
    rows = _sparse_rows(g, V)
    if kind == "adagrad":
        return dict(table=g.arr(V, d), accum=g.arr(V, d, lo=0, hi=1), rows=rows, grad_rows=g.arr(len(rows), d),
                    lr=g.pick(0.01, 0.5), eps=g.pick(1e-10, 1e-3))
    return dict(table=g.arr(V, d), m=g.arr(V, d), v=g.arr(V, d, lo=0, hi=1), rows=rows,
                grad_rows=g.arr(len(rows), d), step=g.size(1, 4), lr=g.pick(1e-3, 0.1), beta1=g.pick(0.0, 0.9),
                beta2=g.pick(0.0, 0.999), eps=1e-8)


def _trusted_relu(x):
    """trusted_inputs as used: a kernel inside the context skips its NaN scan, and the scan is
    back on after it (the same call outside raises for a NaN)."""
    with F.trusted_inputs():
        inside = F.relu_forward(x)
    return inside, F.relu_forward(x)


POSITIVE, NONNEG, UNIT, PROB, SIZE, COUNT, U64, BOOL, LAYOUT = (
    "positive", "nonneg", "unit", "prob", "size", "count", "u64", "bool", "layout")

SPECS = {
    "trusted_inputs": Spec(lambda g: dict(x=g.arr(*g.shape())), floats=("x",), call=_trusted_relu),
    "check_finite": Spec(lambda g: dict(x=g.arr(*g.shape()), name=g.pick("x", "weights")), floats=("x",)),
    "n_bits": Spec(lambda g: dict(n=g.pick(2, 3, 8, 9, 2**30)), scalars={"n": SIZE}),
    "smooth_step": Spec(lambda g: dict(t=g.arr(*g.shape()), gamma=g.pick(0.1, 1.0, 3.0)), floats=("t",), out=True,
                        scalars={"gamma": POSITIVE}),
    "smooth_step_backward": Spec(
        lambda g: (lambda s: dict(dout=g.arr(*s), t=g.arr(*s), gamma=g.pick(0.1, 1.0)))(g.shape()),
        floats=("dout", "t"), scalars={"gamma": POSITIVE}),
    "selector": Spec(
        lambda g: (lambda n: dict(s=g.arr(*g.shape(2), _m(n), lo=0, hi=1), n=n))(g.size(2, 9)),
        floats=("s",), out=True, scalars={"n": SIZE}),
    "selector_backward": Spec(
        lambda g: (lambda n, lead: dict(dr=g.arr(*lead, n), s=g.arr(*lead, _m(n), lo=0, hi=1), n=n))(
            g.size(2, 9), g.shape(2)),
        floats=("dr", "s"), scalars={"n": SIZE}),
    "dselect_k": Spec(_dselect_k, floats=("alpha", "Z"), scalars={"n": SIZE, "gamma": POSITIVE}),
    "dselect_k_forward": Spec(_dselect_k, floats=("alpha", "Z"), scalars={"n": SIZE, "gamma": POSITIVE}),
    "dselect_k_backward": Spec(_dselect_k_backward, floats=("dw",), caches=("cache",),
                               scalars={"lam": NONNEG, "xi": NONNEG, "eps": POSITIVE}),
    "dselect_k_regularization": Spec(
        lambda g: dict(cache=F.dselect_k_forward(**_dselect_k(g))[1], eps=g.pick(1e-6, 0.1)),
        caches=("cache",), scalars={"eps": POSITIVE}),
    "dselect_k_per_example_forward": Spec(_per_example, floats=("x", "G", "b_G", "W", "b_W"),
                                          scalars={"n": SIZE, "gamma": POSITIVE}),
    "dselect_k_per_example_backward": Spec(_per_example_backward, floats=("dw",), caches=("cache",),
                                           scalars={"lam": NONNEG, "xi": NONNEG, "eps": POSITIVE,
                                                    "need_dx": BOOL}),
    "comet_leaf_nodes": Spec(lambda g: dict(n=g.pick(2, 3, 5, 8, 33)), scalars={"n": SIZE}),
    "comet": Spec(_comet, floats=("A", "Z"), scalars={"gamma": POSITIVE}),
    "comet_forward": Spec(_comet, floats=("A", "Z"), out=True, scalars={"gamma": POSITIVE}),
    "comet_backward": Spec(_comet_backward, floats=("dw",), caches=("cache",),
                           scalars={"lam": NONNEG, "eps": POSITIVE}),
    "comet_regularization": Spec(
        lambda g: dict(cache=F.comet_forward(**_comet(g))[1], eps=g.pick(1e-6, 0.1)),
        caches=("cache",), scalars={"eps": POSITIVE}),
    "comet_per_example_forward": Spec(_comet_per_example, floats=("x", "U", "b_U", "W", "b_W"),
                                      scalars={"gamma": POSITIVE}),
    "comet_per_example_backward": Spec(_comet_per_example_backward, floats=("dw",), caches=("cache",),
                                       scalars={"lam": NONNEG, "eps": POSITIVE, "need_dx": BOOL}),
    "softmax": Spec(lambda g: dict(logits=_logits(g)), floats=("logits",), out=True),
    "softmax_backward": Spec(
        lambda g: (lambda w: dict(dw=g.arr(*w.shape), w=w))(F.softmax(_logits(g))), floats=("dw", "w")),
    "top_k": Spec(
        lambda g: (lambda lg: dict(logits=lg, k=g.size(1, lg.shape[-1])))(_logits(g)),
        floats=("logits",), out=True, scalars={"k": COUNT}),
    "top_k_backward": Spec(
        lambda g: (lambda lg: (lambda w: dict(dw=g.arr(*w.shape), w=w))(F.top_k(lg, g.size(1, lg.shape[-1]))))(
            _logits(g)),
        floats=("dw", "w")),
    "noisy_logits": Spec(
        lambda g: (lambda s: dict(clean=g.arr(*s), raw_noise=g.arr(*s), normal=g.arr(*s)))(g.shape()),
        floats=("clean", "raw_noise", "normal")),
    "noisy_logits_backward": Spec(
        lambda g: (lambda s: dict(dh=g.arr(*s), raw_noise=g.arr(*s), normal=g.arr(*s)))(g.shape()),
        floats=("dh", "raw_noise", "normal")),
    "softmax_selector_forward": Spec(_softmax_selector, floats=("alpha", "beta"), scalars={"T": POSITIVE}),
    "softmax_selector_backward": Spec(_softmax_selector_backward, floats=("dw",), caches=("cache",),
                                      scalars={"lam": NONNEG, "eps": POSITIVE}),
    "softmax_selector_entropy": Spec(
        lambda g: dict(cache=F.softmax_selector_forward(**_softmax_selector(g))[1], eps=g.pick(1e-6, 0.1)),
        caches=("cache",), scalars={"eps": POSITIVE}),
    "sinkhorn": Spec(_sinkhorn, floats=("log_alpha",), out=True, scalars={"tau": POSITIVE, "iters": COUNT}),
    "sinkhorn_forward": Spec(_sinkhorn, floats=("log_alpha",), out=True, scalars={"tau": POSITIVE, "iters": COUNT}),
    "sinkhorn_backward": Spec(_sinkhorn_backward, floats=("dP",), caches=("cache",),
                              scalars={"lam": NONNEG, "eps": POSITIVE}),
    "sinkhorn_regularization": Spec(
        lambda g: dict(P=F.sinkhorn(**_sinkhorn(g)), eps=g.pick(1e-6, 0.1)), floats=("P",), scalars={"eps": POSITIVE}),
    "mix_experts": Spec(_mix, floats=("f", "w"), out=True, scalars={"layout": LAYOUT, "skip_zero": BOOL}),
    "mix_experts_backward": Spec(lambda g: _mix(g, backward=True), floats=("dy", "f", "w"),
                                 scalars={"layout": LAYOUT, "skip_zero": BOOL}),
    "mix_experts_many": Spec(_mix_many, floats=("f", "w"), out=True, scalars={"skip_zero": BOOL}),
    "mix_experts_many_backward": Spec(lambda g: _mix_many(g, backward=True), floats=("dy", "f", "w"),
                                      scalars={"skip_zero": BOOL, "relu_mask": BOOL}),
    "linear": Spec(_linear, floats=("x", "W", "b"), out=True),
    "linear_backward": Spec(
        lambda g: (lambda a: dict(dy=g.arr(a["x"].shape[0], a["W"].shape[0]), x=a["x"], W=a["W"],
                                  need_dx=g.flag(), need_db=g.flag()))(_linear(g)),
        floats=("dy", "x", "W"), scalars={"need_dx": BOOL, "need_db": BOOL}),
    "dense_forward": Spec(_dense, floats=("x", "W", "b"), out=True, scalars={"relu": BOOL}),
    "dense_backward": Spec(lambda g: _dense(g, backward=True), floats=("dy", "x", "W"), inplace=("dW", "db"),
                           scalars={"need_dx": BOOL, "input_relu": BOOL, "input_dropout": PROB}),
    "relu_forward": Spec(lambda g: dict(x=g.sparse(*g.shape())), floats=("x",), out=True),
    "relu_backward": Spec(
        lambda g: (lambda s: dict(dy=g.arr(*s), y=np.asarray(np.maximum(g.sparse(*s), 0))))(g.shape()),
        floats=("dy", "y")),
    "dropout_forward": Spec(_dropout, floats=("x",),
                            scalars={"rate": PROB, "seed": U64, "step": U64, "training": BOOL}),
    "dropout_backward": Spec(lambda g: _dropout(g, backward=True), floats=("dy",),
                             scalars={"rate": PROB, "seed": U64, "step": U64, "training": BOOL}),
    "bce_with_logits": Spec(
        lambda g: (lambda B: dict(logits=_column(g, B), targets=_column(g, B, 0, 1), weights=_weights(g, B)))(
            g.size(0, 4)),
        floats=("logits", "targets", "weights")),
    "mse": Spec(
        lambda g: (lambda s: dict(pred=g.arr(*s), target=g.arr(*s), weights=_weights(g, s[0])))(
            g.pick((g.size(0, 4),), (g.size(0, 4), g.size(0, 3)))),
        floats=("pred", "target", "weights")),
    "softmax_cross_entropy": Spec(
        lambda g: (lambda B, C: dict(logits=g.arr(B, C), labels=g.ids(C, B), weights=_weights(g, B)))(
            g.size(0, 4), g.size(1, 4)),
        floats=("logits", "weights"), indices=("labels",)),
    "conv2d_padding": Spec(
        lambda g: dict(padding=g.pick("valid", "same", 0, 1, (1, 0), (0, 1, 1, 0)), kernel=g.pick(3, (2, 3)),
                       stride=g.pick(1, (1, 1))),
        scalars={"padding": "padding", "kernel": "pair", "stride": "pair"}),
    "conv2d_forward": Spec(_conv, floats=("x", "W", "b"), out=True,
                           scalars={"stride": "pair", "padding": "padding", "relu": BOOL}),
    "conv2d_backward": Spec(lambda g: _conv(g, backward=True), floats=("dy", "x", "W"), inplace=("dW", "db"),
                            scalars={"stride": "pair", "padding": "padding", "need_dx": BOOL}),
    "max_pool2d_forward": Spec(_pool, floats=("x",), scalars={"kernel": "pair", "stride": "pair"}),
    "max_pool2d_backward": Spec(_pool_backward, floats=("dy", "relu_y"), indices=("indices",),
                                scalars={"input_size": "pair"}),
    "conv2d_relu_pool_forward": Spec(_conv_pool, floats=("x", "W", "b"),
                                     scalars={"stride": "pair", "padding": "padding", "pool": "pair",
                                              "pool_stride": "pair"}),
    "conv2d_relu_pool_backward": Spec(lambda g: _conv_pool(g, backward=True), floats=("dy", "y", "x", "W"),
                                      indices=("code",), inplace=("dW", "db"),
                                      scalars={"stride": "pair", "padding": "padding", "pool": "pair",
                                               "pool_stride": "pair", "need_dx": BOOL}),
    "sgd_step": Spec(lambda g: _optim(g, "sgd"), floats=("grads",), inplace=("params", "velocity"),
                     scalars={"lr": POSITIVE, "momentum": NONNEG, "weight_decay": NONNEG, "nesterov": BOOL}),
    "adam_step": Spec(lambda g: _optim(g, "adam"), floats=("grads",), inplace=("params", "m", "v"),
                      scalars={"step": COUNT, "lr": POSITIVE, "beta1": UNIT, "beta2": UNIT, "eps": POSITIVE,
                               "weight_decay": NONNEG}),
    "adagrad_step": Spec(lambda g: _optim(g, "adagrad"), floats=("grads",), inplace=("params", "accum"),
                         scalars={"lr": POSITIVE, "eps": POSITIVE, "weight_decay": NONNEG}),
    "embedding_forward": Spec(_embedding, floats=("table",), indices=("ids",), inplace=("out",),
                              scalars={"offset": SIZE}),
    "embedding_backward": Spec(_embedding_backward, floats=("dout",), indices=("ids",),
                               scalars={"num_embeddings": SIZE, "dim": SIZE, "offset": SIZE}),
    "sparse_adagrad_step": Spec(lambda g: _sparse_optim(g, "adagrad"), floats=("grad_rows",), indices=("rows",),
                                inplace=("table", "accum"), scalars={"lr": POSITIVE, "eps": POSITIVE}),
    "sparse_adam_step": Spec(lambda g: _sparse_optim(g, "adam"), floats=("grad_rows",), indices=("rows",),
                             inplace=("table", "m", "v"),
                             scalars={"step": COUNT, "lr": POSITIVE, "beta1": UNIT, "beta2": UNIT,
                                      "eps": POSITIVE}),
}
