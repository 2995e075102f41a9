"""Functional API: every gate kernel as a NumPy function (forward and backward).

Symbols are the paper's (Hazimeh et al., "DSelect-k", NeurIPS 2021): n experts, k selectors,
m = ceil(log2 n) bits per selector, gamma the smooth-step width, alpha the selector logits, Z the
binary-encoding logits, lambda (``lam``) the entropy coefficient, xi the coefficient of the penalty
for n not a power of two (Appendix B.2). The COMET gate (Ibrahim et al., KDD 2023) has k trees with
leaf logits A (k, n) and node logits Z (k, n - 1) (see its section below).

Rules shared by every function:

* Arrays are ``numpy.ndarray`` of float32 or float64, and all arrays of one call share one dtype
  (a mismatch raises ``TypeError``; nothing is cast silently). Outputs have the inputs' dtype.
* Shapes are checked: a wrong ndim or size raises ``ValueError`` naming the argument, the shape
  it got and the shape expected in the paper's symbols. So do NaN/Inf in any input (except
  inside :func:`trusted_inputs`), k < 1 or k > n, n < 2, gamma <= 0, T <= 0, negative
  lambda/xi and an empty batch.
* Non-contiguous (or byte-swapped) inputs are accepted and copied once to a C-contiguous array;
  inputs are never modified. ``out=`` must be a C-contiguous, writeable array of the exact
  dtype and shape that shares no memory with an input.
* Forward functions that a backward needs return ``(output, cache)``; the cache is a small
  named tuple of arrays. It refers to (does not copy) the caller's inputs, as the layers' caches
  do: modify them between forward and backward and the gradients follow the modified values. A
  backward checks the cache's structure (its type, each field's type, dtype and shape, their
  consistency, the scalars) and raises TypeError / ValueError naming the field, e.g.
  ``cache.gate.r``; the values in its arrays are the forward's and are not re-scanned. The C
  kernels release the GIL, so calls from several threads run in parallel.
* Numbers out of range raise ValueError naming the argument, also when they do not fit a float64
  or a 64-bit integer at all (``gamma=10**400``), never OverflowError.
* Optimizer steps check their state slabs like their gradients (see :func:`sgd_step`).
* Bit convention: ``s[..., 0]`` (the paper's z_1) is the least significant bit: expert j
  (0-based) is selected when the binary number s[m-1]...s[0] equals j (eq. 4). The official
  TensorFlow code reads the bits the other way round; it is a relabelling of the experts.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, NamedTuple, Sequence, Union

import numpy as np

from . import _C

Pair = Union[int, Sequence[int]]  # an int or a pair (kernel sizes, strides)
Padding = Union[str, int, Sequence[int]]  # see conv2d_padding

__all__ = [
    "trusted_inputs",
    "check_finite",
    "n_bits",
    "smooth_step",
    "smooth_step_backward",
    "selector",
    "selector_backward",
    "dselect_k",
    "dselect_k_forward",
    "dselect_k_backward",
    "dselect_k_regularization",
    "dselect_k_per_example_forward",
    "dselect_k_per_example_backward",
    "comet_leaf_nodes",
    "comet",
    "comet_forward",
    "comet_backward",
    "comet_regularization",
    "comet_per_example_forward",
    "comet_per_example_backward",
    "softmax",
    "softmax_backward",
    "top_k",
    "top_k_backward",
    "noisy_logits",
    "noisy_logits_backward",
    "softmax_selector_forward",
    "softmax_selector_backward",
    "softmax_selector_entropy",
    "sinkhorn",
    "sinkhorn_forward",
    "sinkhorn_backward",
    "sinkhorn_regularization",
    "mix_experts",
    "mix_experts_backward",
    "mix_experts_many",
    "mix_experts_many_backward",
    "linear",
    "linear_backward",
    "dense_forward",
    "dense_backward",
    "relu_forward",
    "relu_backward",
    "dropout_forward",
    "dropout_backward",
    "bce_with_logits",
    "mse",
    "softmax_cross_entropy",
    "conv2d_padding",
    "conv2d_forward",
    "conv2d_backward",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "conv2d_relu_pool_forward",
    "conv2d_relu_pool_backward",
    "sgd_step",
    "adam_step",
    "adagrad_step",
    "embedding_forward",
    "embedding_backward",
    "sparse_adagrad_step",
    "sparse_adam_step",
]


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Within this context (in this thread) the kernels skip the NaN/Inf scan of their float
    inputs; every other check (dtype, shape, overlap, index bounds) still runs, so nothing can be
    read or written out of bounds. The models use it between their checked input and their
    checked loss: the scan of each intermediate activation and gradient is a full extra read of
    it, about a tenth of a training step, and a NaN produced inside the model still reaches the
    (checked) loss or optimizer in the same step. Calls outside the context are unaffected.

    The dense optimizer steps' value scans are skipped too: of params and grads, and of their
    state slabs (velocity, m, v, accum: NaN / Inf, and v, accum < 0), all O(N) reads of the
    whole slab. ``fit`` steps its optimizer outside this context, so a corrupted state is
    refused there. The sparse steps' row checks (the O(rows * d) rows they read: finite, and
    >= 0 for accum and v) and the embedding tables' row checks always run."""
    previous = _C.set_finite_checks(False)
    try:
        yield
    finally:
        _C.set_finite_checks(previous)


def check_finite(x: np.ndarray, name: str = "x") -> None:
    """ValueError naming ``name`` (and the first flat index, in C order) if ``x`` holds NaN or Inf:
    float arrays of any precision (float16 to long double) and complex ones (either part); bool
    and integer arrays pass, as they cannot hold either. Any other dtype (object, strings, bytes,
    dates, structured) is a TypeError naming it: its entries are not numbers to check. The scan
    the kernels run on their (float32 / float64) inputs."""
    if isinstance(x, np.ndarray) and x.dtype.type not in (np.float32, np.float64):
        kind = x.dtype.kind
        if kind in "fc":  # float16, long double, complex: NumPy's isfinite, which reads them all
            bad = ~np.isfinite(x)
            if bad.any():
                raise ValueError(f"argument '{name}' contains NaN or Inf (first at flat index "
                                 f"{int(np.argmax(bad.reshape(-1)))}); expected finite values")
            return
        if kind not in "biu":
            raise TypeError(f"argument '{name}' has dtype {x.dtype}; check_finite takes numeric arrays (bool, "
                            "integer, float or complex)")
    _C.check_finite(x, name)  # float32 / float64 (one pass in C), integers and bool


def _array(x: Any, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"argument '{name}' must be a numpy.ndarray of float32 or float64, got {type(x).__name__}")
    return x


# The most experts n the DSelect-k, COMET and softmax-selector kernels take: 2**30, so that a
# selector's binary code has at most 30 bits (csrc/dsk.h, DSK_MAX_BITS). The kernels' other sizes,
# and every matrix dimension of the 32-bit BLAS, go up to MAX_DIM.
MAX_EXPERTS: int = _C.MAX_EXPERTS
MAX_DIM: int = 2**31 - 1


def _int(v: Any, name: str, minimum: int, maximum: float = MAX_DIM) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if v < minimum or v > maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {v}")
    return int(v)


def _float_array(a: Any, name: str, dtype: np.dtype, shape: Sequence[int], shape_doc: str) -> np.ndarray:
    """a as validated for the C kernels, but checked here where the kernel would name its own
    (internal) argument: same float dtype as the call, the expected shape, finite values."""
    a = _array(a, name)
    if a.dtype.type is not dtype.type:  # byte order aside: the kernels copy swapped arrays
        raise TypeError(f"argument '{name}' has dtype {a.dtype}, expected {dtype} like 'x' "
                        "(all arrays must share one dtype: float32 or float64)")
    if a.shape != tuple(shape):
        raise ValueError(f"argument '{name}' must have shape {shape_doc} = {tuple(shape)}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"argument '{name}' contains NaN or Inf; expected finite values")
    return a


def _out_view(out: np.ndarray | None, shape: Sequence[int], flat_shape: Any) -> np.ndarray | None:
    """A reshaped view of the caller's out= (never a copy, which would drop the result)."""
    if out is None:
        return None
    out = _array(out, "out")
    if out.shape != tuple(shape):
        raise ValueError(f"argument 'out' must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("argument 'out' must be a C-contiguous, aligned, writeable array")
    return out.reshape(flat_shape)


def _number(value, name, minimum=0.0, strict=False):
    """value as a float, finite and >= minimum (> with ``strict``); TypeError for a non-number
    (bools and strings included), ValueError for an out-of-range one (10**400 included), each
    naming it. The one check of scalar hyperparameters: the gates and the optimizers use it too."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        f = float(value)
    except OverflowError:  # an int beyond float's range
        f = float("inf")
    if not math.isfinite(f) or (f <= minimum if strict else f < minimum):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {shown}")
    return f


def _flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _cache_of(cache, cls, name="cache"):
    """cache, if it is a ``cls`` (a forward's named tuple): else TypeError saying which forward
    makes the cache expected, and which made the one given."""
    if isinstance(cache, cls):
        return cache
    got = type(cache).__name__
    if type(cache) in _CACHE_SOURCE:
        got += f" (from {_CACHE_SOURCE[type(cache)]})"
    raise TypeError(f"argument '{name}' must be the {cls.__name__} that {_CACHE_SOURCE[cls]} returns, got {got}")


def _cache_arrays(cache, prefix, fields):
    """The arrays of a cache, checked: fields is ((name, symbols), ...), symbols such as
    ("B", "k", "n") naming the axes the shapes must agree on; every array is an ndarray of one
    float dtype with that many dimensions, and a symbol has one value across the fields. Returns
    {symbol: size}. (Runs on every backward of a gate: string work only on the error paths.)"""
    sizes, dtype = {}, None
    for field, symbols in fields:
        a = getattr(cache, field)
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{prefix}.{field} must be a numpy.ndarray ({', '.join(symbols)}), got {type(a).__name__}")
        if dtype is None:
            if a.dtype.type not in (np.float32, np.float64):
                raise TypeError(f"{prefix}.{field} must have dtype float32 or float64, got {a.dtype}")
            dtype, first = a.dtype, field
        elif a.dtype != dtype:
            raise TypeError(f"{prefix}.{field} has dtype {a.dtype}, expected {dtype} like {prefix}.{first}")
        if a.ndim != len(symbols):
            raise ValueError(f"{prefix}.{field} must be {len(symbols)}-D with shape ({', '.join(symbols)}), got shape "
                             f"{a.shape}")
        for sym, size in zip(symbols, a.shape):
            if sizes.setdefault(sym, size) != size:
                raise ValueError(f"{prefix}.{field} has {sym} = {size} (shape {a.shape}), but the cache's other arrays "
                                 f"have {sym} = {sizes[sym]}")
    if sizes.get("B", 1) < 1:
        raise ValueError(f"{prefix} holds an empty batch (B = 0)")
    return sizes


_DSELECT_K_FIELDS = (("r", ("B", "k", "n")), ("sigma", ("B", "k")), ("sz", ("B", "k", "m")), ("Z", ("B", "k", "m")))


def _dselect_k_cache(cache, prefix="cache"):
    """A DSelectKCache, structurally checked (see the module's rules)."""
    sizes = _cache_arrays(cache, prefix, _DSELECT_K_FIELDS)
    n, m = sizes["n"], sizes["m"]
    if n < 2 or sizes["k"] < 1 or m != (n - 1).bit_length():
        raise ValueError(f"{prefix}.r (B, k, n) and {prefix}.sz (B, k, m) must have n >= 2 experts, k >= 1 selectors "
                         f"and m = ceil(log2 n) bits, got n = {n}, k = {sizes['k']}, m = {m}")
    _number(cache.gamma, f"{prefix}.gamma", strict=True)
    if _flag(cache.static, f"{prefix}.static") and sizes["B"] != 1:
        raise ValueError(f"{prefix}.static is True (alpha was (k,)), so its arrays must have B = 1, got B = "
                         f"{sizes['B']}")
    return cache


def _softmax_selector_cache(cache):
    sizes = _cache_arrays(cache, "cache", (("P", ("B", "k", "n")), ("sigma", ("B", "k"))))
    if sizes["n"] < 2 or sizes["k"] < 1:
        raise ValueError(f"cache.P (B, k, n) must have n >= 2 experts and k >= 1 selectors, got n = {sizes['n']}, "
                         f"k = {sizes['k']}")
    _number(cache.T, "cache.T", strict=True)
    if _flag(cache.static, "cache.static") and sizes["B"] != 1:
        raise ValueError(f"cache.static is True (alpha was (k,)), so its arrays must have B = 1, got B = {sizes['B']}")
    return cache


def n_bits(n: int) -> int:
    """m = ceil(log2 n), the number of bits of each selector's binary code, for n >= 2 experts."""
    n = _int(n, "n (the number of experts)", 2)
    return (n - 1).bit_length()


# --- smooth-step -----------------------------------------------------------------------------

def smooth_step(t: np.ndarray, gamma: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """S(t; gamma), elementwise (Section 3.1.3): 0 for t <= -gamma/2, 1 for t >= gamma/2, and
    -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 in between. Any shape; returns an array like t.

    Evaluated as v^2 (3 - 2v) (t < 0) and 1 - v^2 (3 - 2v) (t >= 0), v = (gamma/2 - |t|) / gamma,
    which is accurate relative to S near both ends, and saturated: where min(S, 1 - S) rounds to
    at most half the spacing of the numbers just below 1 (2^-25 in float32, 2^-54 in float64), S
    is exactly 0 or 1 and its slope exactly 0. So S == 0 exactly when 1 - S rounds to 1 in the
    working precision, and an entry of S(Z) that the selectors treat as binary is binary."""
    t = _array(t, "t")
    return _C.smooth_step_forward(t.reshape(-1), gamma, _out_view(out, t.shape, -1)).reshape(t.shape)


def smooth_step_backward(dout: np.ndarray, t: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """dt = dout * S'(t; gamma): the backward of :func:`smooth_step`. S' is 0 outside
    (-gamma/2, gamma/2), and 0 where S(t) is saturated (see :func:`smooth_step`), so an entry
    whose S(t) is exactly 0 or 1 receives no gradient."""
    t, dout = _array(t, "t"), _array(dout, "dout")
    if dout.shape != t.shape:
        raise ValueError(f"argument 'dout' must have the shape of t {t.shape}, got {dout.shape}")
    return _C.smooth_step_backward(dout.reshape(-1), t.reshape(-1), gamma).reshape(t.shape)


# --- single-expert selector ------------------------------------------------------------------

def _rows(a: Any, name: str, last: int) -> tuple[np.ndarray, tuple[int, ...]]:
    a = _array(a, name)
    if a.ndim < 1 or a.shape[-1] != last:
        raise ValueError(f"argument '{name}' must have shape (..., {last}), got {a.shape}")
    return a.reshape(-1, last), a.shape[:-1]


def selector(s: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """Single-expert selector r(s) of eq. (4): s (..., m) with m = ceil(log2 n) -> r (..., n),
    r_j = prod_b (s_b if bit b of j is set else 1 - s_b). For a binary s, r is the one-hot code of
    the expert whose index is the binary number s; for n not a power of two the codes n..2^m-1 are
    dropped (Appendix B.2), so r can sum to less than 1. O(2^m) per row."""
    s2, lead = _rows(s, "s", n_bits(n))
    return _C.selector_forward(s2, n, _out_view(out, lead + (n,), (-1, n))).reshape(lead + (n,))


def selector_backward(dr: np.ndarray, s: np.ndarray, n: int) -> np.ndarray:
    """Gradient ds (..., m) of <dr, r(s)>; dr (..., n). Exact where s is 0 or 1 (no division)."""
    s2, lead = _rows(s, "s", n_bits(n))
    dr2, dr_lead = _rows(dr, "dr", n)
    if dr_lead != lead:
        raise ValueError(f"argument 'dr' must have shape {lead + (n,)} to match s {s.shape}, got {dr.shape}")
    return _C.selector_backward(dr2, s2, n).reshape(lead + (n_bits(n),))


# --- DSelect-k -------------------------------------------------------------------------------

class DSelectKCache(NamedTuple):
    """What :func:`dselect_k_backward` needs from the forward pass (batch-first, B = 1 when static)."""
    sigma: np.ndarray  # softmax(alpha), (B, k)
    sz: np.ndarray  # S(Z), (B, k, m)
    r: np.ndarray  # selector outputs r(S(z^(i))), (B, k, n)
    Z: np.ndarray  # the logits Z, (B, k, m)
    gamma: float
    static: bool  # alpha was (k,) and Z (k, m)


def _batched_alpha_Z(alpha: Any, Z: Any, name: str = "Z", last: str = "m") -> tuple[np.ndarray, np.ndarray, bool]:
    """(alpha (B, k), second (B, k, last), static) from the static or batched forms."""
    alpha, Z = _array(alpha, "alpha"), _array(Z, name)
    if alpha.ndim == 1:
        if Z.ndim != 2:
            raise ValueError(f"argument '{name}' must be (k, {last}) for a static alpha of shape (k,), got {Z.shape}")
        return alpha[None], Z[None], True
    if alpha.ndim == 2:
        if Z.ndim != 3:
            raise ValueError(f"argument '{name}' must be (B, k, {last}) for alpha of shape (B, k), got {Z.shape}")
        return alpha, Z, False
    raise ValueError(f"argument 'alpha' must be (k,) (static gate) or (B, k) (per example), got {alpha.shape}")


def _batched_dw(dw: Any, B: int, n: int, static: bool, rows: int | None = None) -> np.ndarray | None:
    """dw (n,) for a static cache or (B, n) as (B, n); None passes (the regularizers alone). With
    ``rows`` (DSelect-k's selectors, COMET's trees), dw may also hold one row each, (rows, n)
    static or (B, rows, n), returned as (B, rows, n)."""
    if dw is None:
        return None
    dw = _array(dw, "dw")
    want = (n,) if static else (B, n)
    if dw.shape == want:
        return dw.reshape(B, n)
    per_row = None if rows is None else ((rows, n) if static else (B, rows, n))
    if dw.shape != per_row:
        also = "" if per_row is None else f" (or {per_row}, one row per selector / tree)"
        raise ValueError(f"argument 'dw' must have the shape of w {want}{also}, got {dw.shape}")
    return dw.reshape(B, rows, n)


def dselect_k_forward(alpha: np.ndarray, Z: np.ndarray, n: int, gamma: float = 1.0) -> tuple[np.ndarray, DSelectKCache]:
    """DSelect-k, eq. (6): w = sum_i softmax(alpha)_i r(S(z^(i))).

    alpha (k,) and Z (k, m) give the static gate's weights w (n,); alpha (B, k) and Z (B, k, m)
    (per-example logits) give w (B, n). Returns ``(w, cache)`` for :func:`dselect_k_backward`.
    w is on the probability simplex when n is a power of two, and has at most k nonzeros once S(Z)
    is binary."""
    n = _int(n, "n (the number of experts)", 2)
    a2, Z3, static = _batched_alpha_Z(alpha, Z)
    w, sigma, sz, r = _C.dselect_k_forward(a2, Z3, n, gamma)
    cache = DSelectKCache(sigma, sz, r, np.ascontiguousarray(Z3), float(gamma), static)
    return (w[0] if static else w), cache


def dselect_k(alpha: np.ndarray, Z: np.ndarray, n: int, gamma: float = 1.0) -> np.ndarray:
    """Expert weights of DSelect-k (see :func:`dselect_k_forward`), without the cache."""
    return dselect_k_forward(alpha, Z, n, gamma)[0]


def dselect_k_backward(dw: np.ndarray | None, cache: DSelectKCache, lam: float = 0.0, xi: float = 0.0,
                       eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Gradients (dalpha, dZ) of  <dw, w> + lam * Omega + xi * penalty  where, averaged over the
    batch, Omega = sum_i h(r(S(z^(i)))) with h(r) = -sum_j r_j log(r_j + eps) (the entropy
    regularizer of Section 3.1.3) and penalty = sum_i 1 / (eps + sum_{j<n} r(S(z^(i)))_j)
    (Appendix B.2; useful only when n is not a power of two). ``dw`` like w, or None for the
    regularizers alone. Shapes of dalpha/dZ follow alpha/Z.

    ``dw`` may also hold one upstream gradient per selector, (k, n) static or (B, k, n): the
    first term is then sum_i <dw_i, softmax(alpha)_i r(S(z^(i)))>, the gradient that a
    permutation of each selector's output (permutation local search) passes back."""
    _dselect_k_cache(_cache_of(cache, DSelectKCache))
    B, k, n = cache.r.shape
    dw = _batched_dw(dw, B, n, cache.static, rows=k)
    dalpha, dZ = _C.dselect_k_backward(dw, cache.sigma, cache.sz, cache.r, cache.Z, cache.gamma, lam, xi, eps)
    return (dalpha[0], dZ[0]) if cache.static else (dalpha, dZ)


def dselect_k_regularization(cache: DSelectKCache, eps: float = 1e-6) -> tuple[float, float]:
    """(Omega, penalty): the entropy regularizer sum_i h(r_i) and the Appendix B.2 mass penalty
    sum_i 1 / (eps + sum_j r_ij), each averaged over the batch (coefficients not applied)."""
    _dselect_k_cache(_cache_of(cache, DSelectKCache))
    B, k, n = cache.r.shape
    r2 = cache.r.reshape(B * k, n)
    return _C.selector_entropy(r2, eps) / B, _C.selector_mass_penalty(r2, eps) / B


class DSelectKPerExampleCache(NamedTuple):
    x: np.ndarray  # (B, p)
    G: np.ndarray  # (k, p)
    W2: np.ndarray  # W reshaped to (k*m, p)
    gate: DSelectKCache


def _dselect_k_per_example_cache(cache):
    gate = _dselect_k_cache(_cache_of(cache.gate, DSelectKCache, "cache.gate"), "cache.gate")
    if gate.static:
        raise ValueError("cache.gate.static must be False in a per-example cache")
    B, k, _ = gate.r.shape
    m = gate.sz.shape[2]
    sizes = _cache_arrays(cache, "cache", (("x", ("B", "p")), ("G", ("k", "p")), ("W2", ("km", "p"))))
    if (sizes["B"], sizes["k"], sizes["km"]) != (B, k, k * m):
        raise ValueError(f"cache.x (B, p), cache.G (k, p) and cache.W2 (k*m, p) must match cache.gate's B = {B}, k = "
                         f"{k}, m = {m}, got shapes {cache.x.shape}, {cache.G.shape}, {cache.W2.shape}")
    if cache.x.dtype != gate.r.dtype:
        raise TypeError(f"cache.x has dtype {cache.x.dtype}, expected {gate.r.dtype} like cache.gate.r")
    return cache


def dselect_k_per_example_forward(x: np.ndarray, G: np.ndarray, b_G: np.ndarray, W: np.ndarray, b_W: np.ndarray, n: int,
                                  gamma: float = 1.0) -> tuple[np.ndarray, DSelectKPerExampleCache]:
    """Per-example DSelect-k (Section 3.2): alpha = x G^T + b_G (B, k) and
    z^(i) = W^(i) x + b_W^(i) (B, k, m), then eq. (6) per example.

    x (B, p), G (k, p), b_G (k,), W (k, m, p), b_W (k, m). Returns ``(w, cache)`` with w (B, n)."""
    n = _int(n, "n (the number of experts)", 2)
    x, G = _array(x, "x"), _array(G, "G")
    m = n_bits(n)
    if x.dtype.type not in (np.float32, np.float64):
        raise TypeError(f"argument 'x' must have dtype float32 or float64, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"argument 'x' must be 2-D with shape (B, p), got shape {x.shape}")
    B, p = x.shape
    if G.ndim != 2 or G.shape[0] < 1:
        raise ValueError(f"argument 'G' must be (k, p) with k >= 1 selectors, got {G.shape}")
    k = G.shape[0]
    G = _float_array(G, "G", x.dtype, (k, p), "(k, p)")
    b_G = _float_array(b_G, "b_G", x.dtype, (k,), "(k,)")
    W = _float_array(W, "W", x.dtype, (k, m, p), "(k, m, p), m = ceil(log2 n)")
    b_W = _float_array(b_W, "b_W", x.dtype, (k, m), "(k, m)")
    alpha = linear(x, G, b_G)
    W2 = W.reshape(k * m, -1)
    Z = linear(x, W2, b_W.reshape(-1)).reshape(-1, k, m)
    w, sigma, sz, r = _C.dselect_k_forward(alpha, Z, n, gamma)
    return w, DSelectKPerExampleCache(x, G, W2, DSelectKCache(sigma, sz, r, Z, float(gamma), False))


def dselect_k_per_example_backward(dw: np.ndarray | None, cache: DSelectKPerExampleCache, lam: float = 0.0,
                                   xi: float = 0.0, eps: float = 1e-6,
                                   need_dx: bool = True) -> dict[str, np.ndarray | None]:
    """Gradients of <dw, w> + lam * Omega + xi * penalty (batch means) for the per-example gate.
    Returns a dict with keys 'x' (None unless need_dx), 'G', 'b_G', 'W', 'b_W'."""
    _dselect_k_per_example_cache(_cache_of(cache, DSelectKPerExampleCache))
    dalpha, dZ = dselect_k_backward(dw, cache.gate, lam, xi, eps)
    B, k, m = dZ.shape
    dZ2 = dZ.reshape(B, k * m)
    dx_a, dG, db_G = linear_backward(dalpha, cache.x, cache.G, need_dx)
    dx_z, dW2, db_W = linear_backward(dZ2, cache.x, cache.W2, need_dx)
    assert db_W is not None  # need_db defaults to True
    return {
        "x": dx_a + dx_z if dx_a is not None and dx_z is not None else None,  # None unless need_dx
        "G": dG,
        "b_G": db_G,
        "W": dW2.reshape(k, m, -1),
        "b_W": db_W.reshape(k, m),
    }


# --- COMET (Ibrahim et al., KDD 2023) ----------------------------------------------------------
#
# k soft binary trees over the n experts (csrc/comet.h). Tree t has n - 1 internal nodes in heap
# order (children of node v: 2v + 1 left, 2v + 2 right; unbalanced when n is not a power of two)
# with logits Z[t] (n - 1) and n leaves with logits A[t] (n) in expert order, expert j being the
# j-th leaf in left-first depth-first order (:func:`comet_leaf_nodes`). Node v sends
# s_v = S(z_v; gamma) of its reach left and 1 - s_v right; p_{t,j} is the reach of expert j's leaf
# in tree t; g = softmax over all k n scores a_{t,j} + log p_{t,j} (one softmax, not one per tree);
# w_j = sum_t g_{t,j}. Leaves with p = 0 get weight exactly 0.

class CometCache(NamedTuple):
    """What :func:`comet_backward` needs from the forward pass (batch-first, B = 1 when static)."""
    A: np.ndarray  # leaf logits, (B, k, n), expert order
    Z: np.ndarray  # node logits, (B, k, n - 1), heap order
    sz: np.ndarray  # S(Z), (B, k, n - 1)
    reach_int: np.ndarray  # reach of the internal nodes, (B, k, n - 1)
    reach: np.ndarray  # reach p of the leaves, (B, k, n), expert order
    g: np.ndarray  # the softmax over the k n leaf scores, (B, k, n)
    norm: np.ndarray  # (shift, Dsum) of each example's softmax, (B, 2)
    gamma: float
    static: bool  # A was (k, n) and Z (k, n - 1)


_COMET_FIELDS = (("A", ("B", "k", "n")), ("Z", ("B", "k", "v")), ("sz", ("B", "k", "v")),
                 ("reach_int", ("B", "k", "v")), ("reach", ("B", "k", "n")), ("g", ("B", "k", "n")),
                 ("norm", ("B", "two")))


def _comet_cache(cache: Any, prefix: str = "cache") -> CometCache:
    """A CometCache, structurally checked (see the module's rules)."""
    sizes = _cache_arrays(cache, prefix, _COMET_FIELDS)
    n, k = sizes["n"], sizes["k"]
    if n < 2 or not 1 <= k <= n or sizes["v"] != n - 1 or sizes["two"] != 2:
        raise ValueError(f"{prefix}.A (B, k, n), {prefix}.Z (B, k, n - 1) and {prefix}.norm (B, 2) must have n >= 2 "
                         f"experts and 1 <= k <= n trees, got shapes {cache.A.shape}, {cache.Z.shape}, "
                         f"{cache.norm.shape}")
    _number(cache.gamma, f"{prefix}.gamma", strict=True)
    if _flag(cache.static, f"{prefix}.static") and sizes["B"] != 1:
        raise ValueError(f"{prefix}.static is True (A was (k, n)), so its arrays must have B = 1, got B = {sizes['B']}")
    return cache


def comet_leaf_nodes(n: int) -> np.ndarray:
    """leaf (n,) int64: the heap index of expert j's leaf in a COMET tree over n experts. Expert j
    is the j-th leaf in left-first depth-first order: for n = 3 the leaves 3, 4, 2."""
    return _C.comet_leaf_nodes(_int(n, "n (the number of experts)", 2))


def _batched_A_Z(A: Any, Z: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """(A (B, k, n), Z (B, k, n - 1), static) from the static or batched forms."""
    A, Z = _array(A, "A"), _array(Z, "Z")
    if A.ndim == 2:
        want = (A.shape[0], A.shape[1] - 1)
        if Z.ndim != 2 or (A.shape[1] >= 2 and Z.shape != want):
            raise ValueError(f"argument 'Z' must have shape (k, n - 1) = {want} for a static A of shape (k, n) = "
                             f"{A.shape}, got {Z.shape}")
        return A[None], Z[None], True
    if A.ndim == 3:
        if Z.ndim != 3:
            raise ValueError(f"argument 'Z' must be (B, k, n - 1) for A of shape (B, k, n) = {A.shape}, got {Z.shape}")
        return A, Z, False
    raise ValueError(f"argument 'A' must be (k, n) (static gate) or (B, k, n) (per example), got {A.shape}")


def comet_forward(A: np.ndarray, Z: np.ndarray, gamma: float = 1.0,
                  out: np.ndarray | None = None) -> tuple[np.ndarray, CometCache]:
    """The COMET gate: w_j = sum_t softmax_{t,j}(a_{t,j} + log p_{t,j}) (see the section comment).

    A (k, n) leaf logits and Z (k, n - 1) node logits of k trees give the static gate's weights
    w (n,); A (B, k, n) and Z (B, k, n - 1) (per-example logits) give w (B, n). 1 <= k <= n,
    gamma > 0. Returns ``(w, cache)`` for :func:`comet_backward`. w is on the probability simplex,
    and has at most k nonzeros once every S(z) is 0 or 1 (each tree then reaches one leaf)."""
    A3, Z3, static = _batched_A_Z(A, Z)
    B, n = A3.shape[0], A3.shape[2]
    out2 = None if out is None else _out_view(out, (n,) if static else (B, n), (-1, n))
    w, sz, reach_int, reach, g, norm = _C.comet_forward(A3, Z3, gamma, out2)
    cache = CometCache(np.ascontiguousarray(A3), np.ascontiguousarray(Z3), sz, reach_int, reach, g, norm,
                       float(gamma), static)
    return (out if out is not None else w[0] if static else w), cache


def comet(A: np.ndarray, Z: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """Expert weights of the COMET gate (see :func:`comet_forward`), without the cache."""
    return comet_forward(A, Z, gamma)[0]


def comet_backward(dw: np.ndarray | None, cache: CometCache, lam: float = 0.0,
                   eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Gradients (dA, dZ) of  <dw, w> + lam * Omega  where Omega, averaged over the batch, is
    sum_t h(p_t), h(p) = -sum_j p_j log(p_j + eps): the entropy of each tree's leaf-reach
    distribution (the COMET regularizer). ``dw`` like w, or None for the regularizer alone, or one
    row per tree ((k, n) static, (B, k, n)): the first term is then sum_t <dw_t, g_t> with g_t tree
    t's slice of the softmax (what local search's per-tree permutations pass back). Shapes of
    dA / dZ follow A / Z. A node whose S(z) is 0 or 1 gets dZ = 0 exactly, and so does every node
    below a reach of 0."""
    _comet_cache(_cache_of(cache, CometCache))
    B, k, n = cache.A.shape
    dw = _batched_dw(dw, B, n, cache.static, rows=k)
    dA, dZ = _C.comet_backward(dw, cache.A, cache.Z, cache.sz, cache.reach_int, cache.reach, cache.g, cache.norm,
                               cache.gamma, lam, eps)
    return (dA[0], dZ[0]) if cache.static else (dA, dZ)


def comet_regularization(cache: CometCache, eps: float = 1e-6) -> float:
    """Omega = sum_t h(p_t), h(p) = -sum_j p_j log(p_j + eps), averaged over the batch (the
    coefficient lambda not applied)."""
    _comet_cache(_cache_of(cache, CometCache))
    B, k, n = cache.reach.shape
    return _C.selector_entropy(cache.reach.reshape(B * k, n), eps) / B


class CometPerExampleCache(NamedTuple):
    x: np.ndarray  # (B, p)
    U2: np.ndarray  # U reshaped to (k*n, p)
    W2: np.ndarray  # W reshaped to (k*(n-1), p)
    gate: CometCache


def _comet_per_example_cache(cache: Any) -> CometPerExampleCache:
    gate = _comet_cache(_cache_of(cache.gate, CometCache, "cache.gate"), "cache.gate")
    if gate.static:
        raise ValueError("cache.gate.static must be False in a per-example cache")
    B, k, n = gate.A.shape
    sizes = _cache_arrays(cache, "cache", (("x", ("B", "p")), ("U2", ("kn", "p")), ("W2", ("kv", "p"))))
    if (sizes["B"], sizes["kn"], sizes["kv"]) != (B, k * n, k * (n - 1)):
        raise ValueError(f"cache.x (B, p), cache.U2 (k*n, p) and cache.W2 (k*(n-1), p) must match cache.gate's B = "
                         f"{B}, k = {k}, n = {n}, got shapes {cache.x.shape}, {cache.U2.shape}, {cache.W2.shape}")
    if cache.x.dtype != gate.A.dtype:
        raise TypeError(f"cache.x has dtype {cache.x.dtype}, expected {gate.A.dtype} like cache.gate.A")
    return cache


def comet_per_example_forward(x: np.ndarray, U: np.ndarray, b_U: np.ndarray, W: np.ndarray, b_W: np.ndarray,
                              gamma: float = 1.0) -> tuple[np.ndarray, CometPerExampleCache]:
    """Per-example COMET: leaf logits a_t = U_t x + b_U,t (B, k, n) and node logits
    z_t = W_t x + b_W,t (B, k, n - 1), then :func:`comet_forward` per example.

    x (B, p), U (k, n, p), b_U (k, n), W (k, n - 1, p), b_W (k, n - 1). Returns ``(w, cache)``
    with w (B, n)."""
    x, U = _array(x, "x"), _array(U, "U")
    if x.dtype.type not in (np.float32, np.float64):
        raise TypeError(f"argument 'x' must have dtype float32 or float64, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"argument 'x' must be 2-D with shape (B, p), got shape {x.shape}")
    p = x.shape[1]
    if U.ndim != 3 or U.shape[1] < 2:
        raise ValueError(f"argument 'U' must be (k, n, p) with n >= 2 experts, got {U.shape}")
    k, n = U.shape[:2]
    U = _float_array(U, "U", x.dtype, (k, n, p), "(k, n, p)")
    b_U = _float_array(b_U, "b_U", x.dtype, (k, n), "(k, n)")
    W = _float_array(W, "W", x.dtype, (k, n - 1, p), "(k, n - 1, p)")
    b_W = _float_array(b_W, "b_W", x.dtype, (k, n - 1), "(k, n - 1)")
    U2, W2 = U.reshape(k * n, p), W.reshape(k * (n - 1), p)
    A = linear(x, U2, b_U.reshape(-1)).reshape(-1, k, n)
    Z = linear(x, W2, b_W.reshape(-1)).reshape(-1, k, n - 1)
    w, gate = comet_forward(A, Z, gamma)
    return w, CometPerExampleCache(x, U2, W2, gate)


def comet_per_example_backward(dw: np.ndarray | None, cache: CometPerExampleCache, lam: float = 0.0,
                               eps: float = 1e-6, need_dx: bool = True) -> dict[str, np.ndarray | None]:
    """Gradients of <dw, w> + lam * Omega (batch mean) for the per-example gate. Returns a dict
    with keys 'x' (None unless need_dx), 'U', 'b_U', 'W', 'b_W'."""
    _comet_per_example_cache(_cache_of(cache, CometPerExampleCache))
    dA, dZ = comet_backward(dw, cache.gate, lam, eps)
    B, k, n = dA.shape
    dx, dU2, db_U = linear_backward(dA.reshape(B, k * n), cache.x, cache.U2, need_dx)
    dx_z, dW2, db_W = linear_backward(dZ.reshape(B, k * (n - 1)), cache.x, cache.W2, need_dx)
    assert db_U is not None and db_W is not None  # need_db defaults to True
    if dx is not None and dx_z is not None:
        dx += dx_z
    return {
        "x": dx,  # None unless need_dx
        "U": dU2.reshape(k, n, -1),
        "b_U": db_U.reshape(k, n),
        "W": dW2.reshape(k, n - 1, -1),
        "b_W": db_W.reshape(k, n - 1),
    }


# --- softmax and Top-k -----------------------------------------------------------------------

def _logits_rows(logits: Any, name: str = "logits") -> tuple[np.ndarray, bool]:
    logits = _array(logits, name)
    if logits.ndim == 1:
        return logits[None], True
    if logits.ndim == 2:
        return logits, False
    raise ValueError(f"argument '{name}' must be (n,) (static) or (B, n) (per example), got {logits.shape}")


def softmax(logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The dense softmax gate sigma(logits) (Section 2), over the last axis of (n,) or (B, n)."""
    l2, static = _logits_rows(logits)
    w = _C.softmax_forward(l2, _out_view(out, logits.shape, l2.shape))
    return w[0] if static else w


def softmax_backward(dw: np.ndarray, w: np.ndarray) -> np.ndarray:
    """dlogits = w * (dw - <w, dw>): backward of :func:`softmax` (and of :func:`top_k`)."""
    w2, static = _logits_rows(w, "w")
    dw = _array(dw, "dw")
    if dw.shape != w.shape:
        raise ValueError(f"argument 'dw' must have the shape of w {w.shape}, got {dw.shape}")
    d = _C.softmax_backward(dw.reshape(w2.shape), w2)
    return d[0] if static else d


def top_k(logits: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """Top-k gate (Shazeer et al.): softmax(KeepTopK(logits, k)) over the last axis of (n,) or
    (B, n); k nonzeros per row (fewer only where a kept logit is so far below the largest that its
    exp underflows: ~100 in float32, ~745 in float64), ties broken toward the lower index."""
    l2, static = _logits_rows(logits)
    k = _int(k, "k", 1, maximum=float("inf"))
    if k > l2.shape[1]:
        raise ValueError(f"k must satisfy 1 <= k <= n = {l2.shape[1]}, got k = {k}")
    w = _C.topk_forward(l2, k, _out_view(out, logits.shape, l2.shape))
    return w[0] if static else w


def top_k_backward(dw: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Backward of :func:`top_k`: the gradient flows through the k kept entries only (the others
    have w = 0), which is the softmax backward applied to w."""
    return softmax_backward(dw, w)


def noisy_logits(clean: np.ndarray, raw_noise: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Noisy Top-k logits: clean + normal * softplus(raw_noise) (Shazeer et al.), where raw_noise
    is the second linear map of the input and normal is N(0, 1) noise drawn by the caller. Any
    shape, all three alike. Use it at training time only."""
    clean, raw_noise, normal = _array(clean, "clean"), _array(raw_noise, "raw_noise"), _array(normal, "normal")
    for a, nm in ((raw_noise, "raw_noise"), (normal, "normal")):
        if a.shape != clean.shape:
            raise ValueError(f"argument '{nm}' must have the shape of clean {clean.shape}, got {a.shape}")
    return _C.noisy_logits_forward(clean.reshape(-1), raw_noise.reshape(-1), normal.reshape(-1)).reshape(clean.shape)


def noisy_logits_backward(dh: np.ndarray, raw_noise: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dclean, draw_noise) for :func:`noisy_logits`: dclean = dh, draw = dh * normal * sigmoid(raw)."""
    dh, raw_noise, normal = _array(dh, "dh"), _array(raw_noise, "raw_noise"), _array(normal, "normal")
    for a, nm in ((raw_noise, "raw_noise"), (normal, "normal")):
        if a.shape != dh.shape:
            raise ValueError(f"argument '{nm}' must have the shape of dh {dh.shape}, got {a.shape}")
    draw = _C.noisy_logits_backward(dh.reshape(-1), raw_noise.reshape(-1), normal.reshape(-1))
    return dh.copy(), draw.reshape(dh.shape)


# --- softmax-selector ablation gate (Appendix C.2) -------------------------------------------

class SoftmaxSelectorCache(NamedTuple):
    sigma: np.ndarray  # softmax(alpha), (B, k)
    P: np.ndarray  # softmax(beta^(i) / T), (B, k, n)
    T: float
    static: bool


# the forward that makes each cache, for messages
_CACHE_SOURCE = {DSelectKCache: "dselect_k_forward", DSelectKPerExampleCache: "dselect_k_per_example_forward",
                 SoftmaxSelectorCache: "softmax_selector_forward", CometCache: "comet_forward",
                 CometPerExampleCache: "comet_per_example_forward"}


def softmax_selector_forward(alpha: np.ndarray, beta: np.ndarray,
                             T: float = 1.0) -> tuple[np.ndarray, SoftmaxSelectorCache]:
    """The ablation gate of Appendix C.2: w = sum_i softmax(alpha)_i softmax(beta^(i) / T), each
    binary-encoded selector replaced by a softmax over the n experts with temperature T.
    alpha (k,), beta (k, n) -> w (n,), or batched (B, k), (B, k, n) -> (B, n). Returns (w, cache)."""
    a2, b3, static = _batched_alpha_Z(alpha, beta, "beta", "n")
    w, sigma, P = _C.softmax_selector_forward(a2, b3, T)
    return (w[0] if static else w), SoftmaxSelectorCache(sigma, P, float(T), static)


def softmax_selector_backward(dw: np.ndarray | None, cache: SoftmaxSelectorCache, lam: float = 0.0,
                              eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(dalpha, dbeta) of <dw, w> + lam * sum_i h(softmax(beta^(i) / T)) (batch mean)."""
    _softmax_selector_cache(_cache_of(cache, SoftmaxSelectorCache))
    B, k, n = cache.P.shape
    dw = _batched_dw(dw, B, n, cache.static)
    da, db = _C.softmax_selector_backward(dw, cache.sigma, cache.P, cache.T, lam, eps)
    return (da[0], db[0]) if cache.static else (da, db)


def softmax_selector_entropy(cache: SoftmaxSelectorCache, eps: float = 1e-6) -> float:
    """sum_i h(softmax(beta^(i) / T)), averaged over the batch (the Ablation (Entropy) regularizer)."""
    _softmax_selector_cache(_cache_of(cache, SoftmaxSelectorCache))
    B, k, n = cache.P.shape
    return _C.selector_entropy(cache.P.reshape(B * k, n), eps) / B


# --- Sinkhorn normalisation (permutation local search, COMET paper) -------------------------

class SinkhornCache(NamedTuple):
    """What :func:`sinkhorn_backward` needs from the forward pass."""
    P: np.ndarray  # the forward's output, (K, n, n)
    logs: np.ndarray  # float64 (K, 2 iters, n, n): every half-step's normalised log-matrix
    tau: float
    batched: bool  # log_alpha was (K, n, n), not (n, n)


_CACHE_SOURCE[SinkhornCache] = "sinkhorn_forward"


def _sinkhorn_input(log_alpha):
    log_alpha = _array(log_alpha, "log_alpha")
    if log_alpha.ndim == 2:
        return log_alpha[None], False
    if log_alpha.ndim == 3:
        return log_alpha, True
    raise ValueError(f"argument 'log_alpha' must be (n, n) or (K, n, n), got {log_alpha.shape}")


def sinkhorn_forward(log_alpha: np.ndarray, tau: float, iters: int,
                     out: np.ndarray | None = None) -> tuple[np.ndarray, SinkhornCache]:
    """P = Sinkhorn(log_alpha / tau): ``iters`` iterations, each a row log-sum-exp normalisation
    followed by a column one (the order of the COMET authors' code), exponentiated at the end.
    So every column of P sums to 1 (to rounding) and the rows approximately, converging to 1;
    as tau -> 0 (with enough iterations) P tends to the permutation matrix maximising
    sum_ij log_alpha_ij P_ij.

    log_alpha (n, n), or (K, n, n) for K matrices at once (one per selector or tree); tau > 0;
    1 <= iters <= 100000. Returns ``(P, cache)``, P like log_alpha. The cache keeps every
    half-step in float64 (also for float32 input: the iterates are computed in float64 and P is
    rounded once), 16 iters K n^2 bytes: 9.8 MB for n = 64, iters = 150, K = 1 -- meant for
    n <= 64. Use :func:`sinkhorn` when no backward follows."""
    a3, batched = _sinkhorn_input(log_alpha)
    iters = _int(iters, "iters (the number of Sinkhorn iterations)", 1, 100000)
    P, logs = _C.sinkhorn_forward(a3, tau, iters, True, _out_view(out, log_alpha.shape, a3.shape))
    return (P if batched else P[0]), SinkhornCache(P, logs, float(tau), batched)


def sinkhorn(log_alpha: np.ndarray, tau: float, iters: int, out: np.ndarray | None = None) -> np.ndarray:
    """P of :func:`sinkhorn_forward` without the cache (one n x n float64 workspace per matrix)."""
    a3, batched = _sinkhorn_input(log_alpha)
    iters = _int(iters, "iters (the number of Sinkhorn iterations)", 1, 100000)
    P, _ = _C.sinkhorn_forward(a3, tau, iters, False, _out_view(out, log_alpha.shape, a3.shape))
    return P if batched else P[0]


def _sinkhorn_cache(cache):
    """A SinkhornCache, structurally checked: P (K, n, n) float, logs (K, 2 iters, n, n) float64,
    tau > 0, batched a bool."""
    cache = _cache_of(cache, SinkhornCache)
    sizes = _cache_arrays(cache, "cache", (("P", ("K", "n", "n")),))
    K, n = sizes["K"], sizes["n"]
    logs = cache.logs
    if not isinstance(logs, np.ndarray) or logs.dtype != np.float64:
        raise TypeError(f"cache.logs must be the float64 array (K, 2 iters, n, n) of sinkhorn_forward, got "
                        f"{getattr(logs, 'dtype', type(logs).__name__)}")
    if logs.ndim != 4 or logs.shape[0] != K or logs.shape[2:] != (n, n) or logs.shape[1] < 2 or logs.shape[1] % 2:
        raise ValueError(f"cache.logs must have shape (K, 2 iters, n, n) with K = {K} and n = {n} of cache.P, got "
                         f"{logs.shape}")
    if K < 1 or n < 1:
        raise ValueError(f"cache.P holds no matrix (shape {cache.P.shape}); expected K >= 1 matrices of n >= 1")
    _number(cache.tau, "cache.tau", strict=True)
    if not _flag(cache.batched, "cache.batched") and K != 1:
        raise ValueError(f"cache.batched is False (log_alpha was (n, n)), so cache.P must have K = 1, got "
                         f"{cache.P.shape}")
    return cache


def sinkhorn_backward(dP: np.ndarray | None, cache: SinkhornCache, lam: float = 0.0, eps: float = 1e-6) -> np.ndarray:
    """dlog_alpha, the gradient of  <dP, P> + lam * Omega(P)  with respect to log_alpha, in
    reverse mode through every iteration of the forward (exact for the finite iteration count;
    no implicit-function shortcut). Omega is :func:`sinkhorn_regularization`. ``dP`` like P, or
    None for the regularizer alone; the result has log_alpha's shape and dtype."""
    cache = _sinkhorn_cache(cache)
    K, n, _ = cache.P.shape
    if dP is not None:
        dP = _array(dP, "dP")
        want = (K, n, n) if cache.batched else (n, n)
        if dP.shape != want:
            raise ValueError(f"argument 'dP' must have the shape of P {want}, got {dP.shape}")
        if dP.dtype.type is not cache.P.dtype.type:
            raise TypeError(f"argument 'dP' has dtype {dP.dtype}, expected {cache.P.dtype} like cache.P (all arrays "
                            "must share one dtype: float32 or float64)")
        dP = dP.reshape(K, n, n)
    d = _C.sinkhorn_backward(dP, cache.P, cache.logs, cache.tau, lam, eps)
    return d if cache.batched else d[0]


def sinkhorn_regularization(P: np.ndarray, eps: float = 1e-6) -> float:
    """Omega(P) = mean over the K matrices of  H(P) + H(row-normalised P),  H(A) = -sum_ij A_ij
    log(A_ij + eps): the entropy regularizer of the permutation local search (the COMET authors
    weight it 1e-4). P (n, n) or (K, n, n), entries >= 0."""
    P = _array(P, "P")
    if P.ndim not in (2, 3):
        raise ValueError(f"argument 'P' must be (n, n) or (K, n, n), got {P.shape}")
    P3 = P if P.ndim == 3 else P[None]
    if P3.shape[0] == 0:
        raise ValueError(f"argument 'P' has no matrix (K = 0), got shape {P.shape}")
    return _C.sinkhorn_entropy(P3, eps) / P3.shape[0]


# --- mixing the experts ----------------------------------------------------------------------

def mix_experts(f: np.ndarray, w: np.ndarray, layout: str = "nbd", skip_zero: bool = True,
                out: np.ndarray | None = None) -> np.ndarray:
    """y = sum_j w_j f_j (eq. 1): f (n, B, d) for layout 'nbd' or (B, n, d) for 'bnd'; w (n,) for a
    static gate or (B, n) per example; y (B, d). With ``skip_zero`` an expert whose weight is
    exactly 0 for the whole batch is never read, which is where a sparse gate saves work."""
    return _C.mix_experts_forward(_array(f, "f"), _array(w, "w"), layout, skip_zero, out)


def mix_experts_backward(dy: np.ndarray, f: np.ndarray, w: np.ndarray, layout: str = "nbd",
                         skip_zero: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(dw, df) for :func:`mix_experts`. An expert skipped by ``skip_zero`` gets dw_j = 0 and
    df_j = 0: none of this package's gates passes gradient through an exact zero weight (Top-k's
    dropped entries and DSelect-k's zero weights, which need a binary entry of S(Z), both have zero
    derivative), so the skipped products would be multiplied by zero anyway. Pass
    ``skip_zero=False`` for the full gradient with respect to arbitrary w."""
    return _C.mix_experts_backward(_array(dy, "dy"), _array(f, "f"), _array(w, "w"), layout, skip_zero)


def mix_experts_many(f: np.ndarray, w: np.ndarray, skip_zero: bool = True,
                     out: np.ndarray | None = None) -> np.ndarray:
    """The T mixtures of a multi-task model with one per-example gate per task (MMoE, eq. 1 per
    task) in one call: y_t = sum_j w_tj f_j, with f (n, B, d), w (T, B, n) and y (T, B, d), i.e.
    ``y[t] == mix_experts(f, w[t])``. Each expert output f_j(x) is read once for all T tasks, not
    T times. Terms whose weight is exactly 0 are skipped; with ``skip_zero`` an expert whose
    weight is exactly 0 for every task and example is never read."""
    return _C.mix_experts_many_forward(_array(f, "f"), _array(w, "w"), skip_zero, out)


def mix_experts_many_backward(dy: np.ndarray, f: np.ndarray, w: np.ndarray, skip_zero: bool = True,
                              relu_mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(dw, df) for :func:`mix_experts_many`, the gradients of sum_t <dy_t, y_t> with dy (T, B, d):
    dw (T, B, n), dw[t, b, j] = <dy_t[b], f_j[b]>, and df (n, B, d), df_j = sum_t w_tj dy_t (the
    expert gradient summed over the tasks). One pass over f replaces T calls of
    :func:`mix_experts_backward` and the sum of their df.

    ``skip_zero`` skips an expert only when its weight is exactly 0 for *every* task and example:
    it gets dw = 0 for all tasks and df_j = 0, as :func:`mix_experts_backward` would give it. An
    expert that some task uses gets its dw for every task, also for a task whose weights for it
    are all 0 (where a per-task ``mix_experts_backward`` would have returned dw = 0). For the
    gates of this package that makes no difference to their gradients: the derivative of a
    weight that is exactly 0 with respect to the gate's parameters is 0 (see
    :func:`mix_experts_backward`). Pass ``skip_zero=False`` for the full gradient everywhere.

    ``relu_mask=True``: f is the output of the experts' last ReLU, and df is returned at that
    ReLU's input, ``relu_backward(df, f)`` fused into the same pass (0 where f <= 0)."""
    return _C.mix_experts_many_backward(_array(dy, "dy"), _array(f, "f"), _array(w, "w"), skip_zero, relu_mask)


# --- affine maps -----------------------------------------------------------------------------

def linear(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """y = x W^T + b with x (B, p), W (o, p), b (o,) or None: one GEMM of the vendored OpenBLAS."""
    return _C.linear_forward(_array(x, "x"), _array(W, "W"), b, out)


def linear_backward(dy: np.ndarray, x: np.ndarray, W: np.ndarray, need_dx: bool = True,
                    need_db: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(dx, dW, db) of <dy, x W^T + b>; dx / db are None when not asked for."""
    return _C.linear_backward(_array(dy, "dy"), _array(x, "x"), _array(W, "W"), need_dx, need_db)


# --- layers, dropout, losses and optimizer steps (experts, task towers, training) -------------
#
# The layer backwards ACCUMULATE parameter gradients into caller-owned arrays (views into a
# model's gradient slab), so a parameter used twice just receives two calls. Losses return
# ``(loss, dlogits)``: the loss is a Python float, the MEAN over the batch; with per-example
# weights w (B,) (finite, >= 0) it is sum_b w_b l_b / B (divided by B, not by sum_b w_b, so that a
# weight of 0 removes an example without rescaling the others); dlogits is the gradient of that
# mean with respect to the first argument. The optimizer steps update a flat parameter slab and
# its state slabs in place, one C call for all parameters, and follow torch.optim's rules.

def dense_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None, out: np.ndarray | None = None,
                  relu: bool = False, dropout: tuple | None = None) -> np.ndarray:
    """y (B, o) = x (B, p) @ W (p, o) + b (o,) (b may be None): one GEMM. Note that W is
    (in, out) here, unlike :func:`linear` whose W is (out, in). ``relu=True`` returns
    max(y, 0) instead, and ``dropout=(rate, seed, step)`` or ``(rate, seed, step, rows)`` then
    applies ``dropout_forward(., rate, seed, step, rows=rows)``: both in the GEMM's epilogue, tile
    by tile while the tile is in cache, exactly ``dropout_forward(relu_forward(dense_forward(x, W,
    b)), ...)`` without the passes over memory and the arrays between them."""
    if dropout is None:
        return _C.dense_forward(_array(x, "x"), _array(W, "W"), b, out, relu)
    rate, seed, step, *rest = dropout
    rows = rest[0] if rest else None
    _check_rows(rows, x)
    return _C.dense_forward(_array(x, "x"), _array(W, "W"), b, out, relu, rate, seed, step, rows)


def dense_backward(dy: np.ndarray, x: np.ndarray, W: np.ndarray, dW: np.ndarray, db: np.ndarray | None = None,
                   need_dx: bool = True, input_relu: bool = False, input_dropout: float = 0.0,
                   out: np.ndarray | None = None) -> np.ndarray | None:
    """Backward of :func:`dense_forward` for the upstream gradient dy (B, o).

    ACCUMULATES in place: ``dW (p, o) += x^T dy`` (a GEMM with beta = 1) and
    ``db (o,) += dy.sum(axis=0)`` (skipped when db is None). dW and db are never copied: they
    must be C-contiguous, aligned, writeable arrays of the call's dtype and exact shape (e.g.
    views into a gradient slab) sharing no memory with dy, x or W. Returns dx = dy W^T (B, p),
    or None when ``need_dx`` is false (the first layer).

    ``input_relu=True``: x is the output of a ReLU (followed by a dropout of rate
    ``input_dropout`` when > 0), and dx is returned at that ReLU's input:
    ``relu_backward(dropout_backward(dy W^T, input_dropout, ...), x)``, in the product's epilogue
    (a kept entry of x is > 0 exactly where the ReLU passed and the dropout kept, so x itself is
    the mask). ``out``: an array (B, p) for dx (C-contiguous, writeable, sharing no memory with the
    other arguments), as :func:`dense_forward`'s."""
    return _C.dense_backward(_array(dy, "dy"), _array(x, "x"), _array(W, "W"), dW, db, need_dx, input_relu,
                             input_dropout, out)


def relu_forward(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = max(x, 0), elementwise, any shape."""
    x = _array(x, "x")
    return _C.relu_forward(x.reshape(-1), _out_view(out, x.shape, -1)).reshape(x.shape)


def relu_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dx = dy where y > 0, else 0; y is the output of :func:`relu_forward` (so the subgradient
    at 0 is taken as 0)."""
    dy, y = _array(dy, "dy"), _array(y, "y")
    if dy.shape != y.shape:
        raise ValueError(f"argument 'dy' must have the shape of y {y.shape}, got {dy.shape}")
    return _C.relu_backward(dy.reshape(-1), y.reshape(-1)).reshape(y.shape)


def dropout_forward(x: np.ndarray, rate: float, seed: int, step: int, training: bool = True,
                    rows: np.ndarray | None = None) -> np.ndarray:
    """Inverted dropout: each entry of x (any shape) is kept with probability 1 - rate and
    scaled by 1 / (1 - rate), so the expectation is x; the others are 0.

    The mask is not stored: entry i (its flat index in C order) is kept when a counter-based
    hash (splitmix64, csrc/nn.h) of (seed, step, i) mapped to [0, 1) is >= rate. So it is
    deterministic, :func:`dropout_backward` recomputes the same mask from the same arguments, and
    it does not depend on the thread count. Pass a new ``step`` (e.g. the training step or a
    per-layer counter) for a new mask. 0 <= rate < 1; seed and step are integers in
    [0, 2**64 - 1]. ``training=False`` or rate == 0 returns a copy of x.

    ``rows``: None, or an integer array (B,) with x (B, ...): the place of each row of x in a
    larger batch (>= 0). Entry j of row b (R entries a row) then hashes i = rows[b] * R + j, so
    that a row gets the mask it has at that place in the whole batch: the rows an expert
    computes under conditional computation, a rank's share of a data-parallel batch."""
    x = _array(x, "x")
    _check_rows(rows, x)
    return _C.dropout_forward(x.reshape(-1), rate, seed, step, training, rows).reshape(x.shape)


def _check_rows(rows, x):
    if isinstance(rows, np.ndarray) and rows.ndim == 1 and x.ndim >= 1 and rows.shape[0] != x.shape[0]:
        raise ValueError(f"argument 'rows' must have one entry per row of x {x.shape}, got shape {rows.shape}")


def dropout_backward(dy: np.ndarray, rate: float, seed: int, step: int, training: bool = True,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """dx = dy * mask / (1 - rate) with the mask of ``dropout_forward(x, rate, seed, step,
    training, rows)`` (dy has x's shape); a copy of dy when training is false or rate == 0."""
    dy = _array(dy, "dy")
    _check_rows(rows, dy)
    return _C.dropout_backward(dy.reshape(-1), rate, seed, step, training, rows).reshape(dy.shape)


def _column(a: Any, name: str) -> np.ndarray:
    """(B,) or (B, 1) -> (B,)"""
    a = _array(a, name)
    if a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1):
        return a.reshape(-1)
    raise ValueError(f"argument '{name}' must have shape (B,) or (B, 1), got {a.shape}")


def bce_with_logits(logits: np.ndarray, targets: np.ndarray,
                    weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Binary cross-entropy on logits: returns ``(loss, dlogits)``.

    logits and targets are (B,) or (B, 1) (either, independently); targets in [0, 1] (soft labels
    allowed); weights (B,) or None. Per example l = max(z, 0) - z t + log(1 + exp(-|z|)) (stable
    for any z), loss = sum_b w_b l_b / B, dlogits = w (sigmoid(z) - t) / B with logits' shape."""
    z = _column(logits, "logits")
    loss, dz = _C.bce_with_logits(z, _column(targets, "targets"), weights)
    return loss, dz.reshape(logits.shape)


def mse(pred: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Squared error: returns ``(loss, dpred)``.

    pred and target (B,) or (B, d), of one shape ((B,) and (B, 1) count as the same). Per example
    l_b = sum over the d outputs of (pred - target)^2 -- the plain squared error when d = 1, and
    NOT divided by d -- and loss = sum_b w_b l_b / B with weights (B,) or None (all 1).
    dpred = 2 w (pred - target) / B with pred's shape."""
    pred, target = _array(pred, "pred"), _array(target, "target")
    for a, nm in ((pred, "pred"), (target, "target")):
        if a.ndim not in (1, 2):
            raise ValueError(f"argument '{nm}' must have shape (B,) or (B, d), got {a.shape}")
    p2 = pred if pred.ndim == 2 else pred.reshape(-1, 1)
    t2 = target if target.ndim == 2 else target.reshape(-1, 1)
    if t2.shape != p2.shape:
        raise ValueError(f"argument 'target' must have the shape of pred {pred.shape}, got {target.shape}")
    loss, dp = _C.mse(p2, t2, weights)
    return loss, dp.reshape(pred.shape)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray,
                          weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy: returns ``(loss, dlogits)``.

    logits (B, C); labels (B,) an integer ndarray of any integer dtype (converted to int64), each
    in [0, C) (ValueError naming the first bad label and its index); weights (B,) or None.
    l_b = logsumexp(logits_b) - logits_b[labels_b] (stable), loss = sum_b w_b l_b / B,
    dlogits = w (softmax(logits) - onehot(labels)) / B."""
    return _C.softmax_cross_entropy(_array(logits, "logits"), labels, weights)


# --- convolution and max pooling (the CNN experts of the Multi-MNIST experiments) ----------------
#
# Layout NCHW: images are (B, C, H, W) arrays, C-contiguous (others are copied once), the
# convolution weights (F, C, KH, KW). The convolution is the cross-correlation of deep-learning
# libraries (no kernel flip). Its backward ACCUMULATES dW and db in place, as dense_backward does.

def _stride_pair(stride: Any) -> tuple[int, int] | None:
    if isinstance(stride, (int, np.integer)) and not isinstance(stride, (bool, np.bool_)):
        return int(stride), int(stride)
    if isinstance(stride, (tuple, list)) and len(stride) == 2:
        return tuple(stride)
    return None  # left to the binding, which names what is wrong


def conv2d_padding(padding: Padding, kernel: Pair, stride: Pair = 1) -> Any:
    """(top, bottom, left, right) zero padding for ``padding``:

    * ``"valid"``: no padding (only windows inside the input), OH = (H - KH) // sh + 1;
    * ``"same"`` (stride 1 only): the output has the input's size; the KH - 1 padding rows are
      split as top = (KH - 1) // 2 and bottom = KH // 2 (one more below for an even kernel, as in
      TensorFlow), columns likewise;
    * an int p, a pair (ph, pw), or a 4-tuple (top, bottom, left, right) of ints >= 0, each
      smaller than the kernel on its side.

    ``kernel`` is (KH, KW) (or an int); ``stride`` an int or (sh, sw)."""
    if isinstance(padding, str):
        kh, kw = (kernel, kernel) if isinstance(kernel, (int, np.integer)) else tuple(kernel)
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if _stride_pair(stride) != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {stride!r}; pass explicit padding "
                                 "for a strided convolution")
            return ((kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2)
        raise ValueError(f"padding must be 'valid', 'same', an int, (ph, pw) or (top, bottom, left, right), "
                         f"got {padding!r}")
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, (bool, np.bool_)):
        p = int(padding)
        return (p, p, p, p)
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        return (padding[0], padding[0], padding[1], padding[1])
    return padding  # a 4-tuple, or something the binding rejects with a message naming it


def _conv_padding(padding: Padding, W: np.ndarray, stride: Pair) -> Any:
    kernel = W.shape[2:] if W.ndim == 4 else (1, 1)  # a W of the wrong ndim is reported by the binding
    return conv2d_padding(padding, kernel, stride)


def conv2d_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None, stride: Pair = 1,
                   padding: Padding = "valid", out: np.ndarray | None = None, relu: bool = False) -> np.ndarray:
    """2-D convolution, NCHW: x (B, C, H, W), W (F, C, KH, KW), b (F,) or None -> y (B, F, OH, OW),

        y[b, f, oh, ow] = b[f] + sum_{c, i, j} W[f, c, i, j] x[b, c, oh sh - top + i, ow sw - left + j]

    with zeros outside x (the padding, see :func:`conv2d_padding`; default ``"valid"``).
    ``stride``: int or (sh, sw) >= 1. OH = (H + top + bottom - KH) // sh + 1, OW likewise; a kernel
    larger than the padded input raises ValueError. im2col and one GEMM of the vendored BLAS per
    group of examples (csrc/conv.h). ``relu=True`` returns max(y, 0) instead (as
    :func:`dense_forward`)."""
    x, W = _array(x, "x"), _array(W, "W")
    return _C.conv2d_forward(x, W, b, stride, _conv_padding(padding, W, stride), out, relu)


def conv2d_backward(dy: np.ndarray, x: np.ndarray, W: np.ndarray, dW: np.ndarray, db: np.ndarray | None = None,
                    stride: Pair = 1, padding: Padding = "valid", need_dx: bool = True) -> np.ndarray | None:
    """Backward of :func:`conv2d_forward` (same x, W, stride, padding) for dy (B, F, OH, OW).

    ACCUMULATES in place, as :func:`dense_backward`: ``dW (F, C, KH, KW) += d<dy, y>/dW`` and
    ``db (F,) += dy.sum(axis=(0, 2, 3))`` (skipped when db is None). dW and db are never copied:
    C-contiguous, aligned, writeable arrays of the call's dtype and exact shape sharing no memory
    with dy, x or W. Returns dx (B, C, H, W), or None when ``need_dx`` is false."""
    dy, x, W = _array(dy, "dy"), _array(x, "x"), _array(W, "W")
    return _C.conv2d_backward(dy, x, W, dW, db, stride, _conv_padding(padding, W, stride), need_dx)


def conv2d_relu_pool_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None, stride: Pair = 1,
                             padding: Padding = "valid", pool: Pair = 2,
                             pool_stride: Pair | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Conv2D -> ReLU -> max pooling in one pass: returns ``(y, code)`` with
    ``y == max_pool2d_forward(relu_forward(conv2d_forward(x, W, b, stride, padding)), pool,
    pool_stride)[0]`` exactly, and ``code`` (B, F, POH, POW) uint8, the position i * PW + j of each
    output's maximum in its window (the first in row-major order), for
    :func:`conv2d_relu_pool_backward`. The convolution's output (B, F, OH, OW) is pooled a group of
    examples at a time while it is in cache and never written to memory. ``pool``: int or (PH, PW),
    windows of at most 256 entries; ``pool_stride`` defaults to the window."""
    x, W = _array(x, "x"), _array(W, "W")
    return _C.conv2d_relu_pool_forward(x, W, b, stride, _conv_padding(padding, W, stride), pool, pool_stride)


def conv2d_relu_pool_backward(dy: np.ndarray, code: np.ndarray, y: np.ndarray, x: np.ndarray, W: np.ndarray,
                              dW: np.ndarray, db: np.ndarray | None = None, stride: Pair = 1,
                              padding: Padding = "valid", pool: Pair = 2, pool_stride: Pair | None = None,
                              need_dx: bool = True) -> np.ndarray | None:
    """Backward of :func:`conv2d_relu_pool_forward` for dy (B, F, POH, POW), with its outputs y and
    code and its inputs x, W (same stride, padding, pool, pool_stride): ACCUMULATES dW (F, C, KH, KW)
    and db (F,) (skipped when None) as :func:`conv2d_backward` and returns dx (B, C, H, W) (None
    unless ``need_dx``); exactly conv2d_backward of relu_backward(max_pool2d_backward(dy, ...)),
    with the gradient at the convolution's output built a group of examples at a time in cache."""
    dy, y, x, W = _array(dy, "dy"), _array(y, "y"), _array(x, "x"), _array(W, "W")
    return _C.conv2d_relu_pool_backward(dy, code, y, x, W, dW, db, stride, _conv_padding(padding, W, stride), pool,
                                        pool_stride, need_dx)


def max_pool2d_forward(x: np.ndarray, kernel: Pair = 2, stride: Pair | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Max pooling of x (B, C, H, W) over the valid windows: returns ``(y, indices)``.

    ``kernel``: int or (KH, KW), at most the input plane; ``stride``: int or (sh, sw) >= 1, default
    the kernel (non-overlapping windows). y (B, C, OH, OW) with OH = (H - KH) // sh + 1 (trailing
    rows / columns that fill no window are dropped), OW likewise; ``indices`` (B, C, OH, OW) int64,
    the flat index h * W + w in its plane of the entry each y came from. Ties go to the first
    maximum in row-major window order. NaN: the inputs are checked to be finite (ValueError); the
    kernel itself propagates NaN deterministically (the first NaN of a window is its maximum)."""
    return _C.max_pool2d_forward(_array(x, "x"), kernel, stride)


def max_pool2d_backward(dy: np.ndarray, indices: np.ndarray, input_size: Sequence[int],
                        relu_y: np.ndarray | None = None) -> np.ndarray:
    """Backward of :func:`max_pool2d_forward`: dx (B, C, H, W) is 0 except that each dy[b, c, oh, ow]
    is added at the input entry ``indices[b, c, oh, ow]`` (a flat index in the plane); overlapping
    windows (stride < kernel) that picked the same entry add up. ``input_size`` is (H, W) (or the
    input's full shape (B, C, H, W)); indices may have any integer dtype, each in [0, H W).

    ``relu_y``: the pooling's output y (B, C, OH, OW) when its input was a ReLU's output; dx is then
    the gradient at that ReLU's input, ``relu_backward(max_pool2d_backward(dy, ...), x)`` in one
    pass (an entry a window picked is > 0 exactly where its y is)."""
    dy = _array(dy, "dy")
    if isinstance(input_size, (tuple, list)) and len(input_size) == 4:
        if tuple(input_size[:2]) != dy.shape[:2]:
            raise ValueError(f"input_size {tuple(input_size)} does not match dy's (B, C) = {dy.shape[:2]}")
        input_size = tuple(input_size[2:])
    return _C.max_pool2d_backward(dy, indices, input_size, relu_y)


def sgd_step(params: np.ndarray, grads: np.ndarray, velocity: np.ndarray | None, lr: float, momentum: float = 0.0,
             weight_decay: float = 0.0, nesterov: bool = False) -> None:
    """One SGD step, torch.optim.SGD's rule (dampening 0), in place on 1-D slabs of one dtype and
    length: g = grads + weight_decay * params; if momentum > 0: velocity = momentum * velocity + g
    and params -= lr * (g + momentum * velocity if nesterov else velocity); else params -= lr * g
    (velocity may then be None, and is not touched). lr > 0, momentum >= 0, weight_decay >= 0;
    nesterov needs momentum > 0 (as in PyTorch). grads is not modified. NaN/Inf in params, grads
    or (when momentum > 0, which reads it) velocity raise ValueError naming the slab, before anything
    changes; the optimizer state is input too. :func:`trusted_inputs` skips these scans."""
    _C.sgd_step(params, grads, velocity, lr, momentum, weight_decay, nesterov)


def adam_step(params: np.ndarray, grads: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float = 0.001,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One Adam step (Kingma & Ba, with bias correction; torch.optim.Adam's rule and defaults) in
    place on the 1-D slabs params, m, v; ``step`` >= 1 is the 1-based number of this update:
    g = grads + weight_decay * params (L2, not AdamW); m = beta1 m + (1 - beta1) g;
    v = beta2 v + (1 - beta2) g^2; params -= lr / (1 - beta1**step) * m /
    (sqrt(v) / sqrt(1 - beta2**step) + eps). lr > 0, betas in [0, 1), eps > 0, weight_decay >= 0.
    NaN/Inf in params, grads, m or v, and a negative v (a mean of squares, whose square root is
    taken) raise ValueError naming the slab, before anything changes (skipped inside
    :func:`trusted_inputs`)."""
    _C.adam_step(params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay)


def adagrad_step(params: np.ndarray, grads: np.ndarray, accum: np.ndarray, lr: float = 0.01, eps: float = 1e-10,
                 weight_decay: float = 0.0) -> None:
    """One Adagrad step (torch.optim.Adagrad's rule and defaults, lr_decay 0) in place on the 1-D
    slabs params and accum: g = grads + weight_decay * params; accum += g^2;
    params -= lr * g / (sqrt(accum) + eps). PyTorch's initial_accumulator_value is the initial
    fill of accum (see :class:`dselectk.optim.Adagrad`). lr > 0, eps > 0, weight_decay >= 0.
    NaN/Inf in params, grads or accum, and a negative accum, raise ValueError naming the slab,
    before anything changes (skipped inside :func:`trusted_inputs`)."""
    _C.adagrad_step(params, grads, accum, lr, eps, weight_decay)


# --- embedding tables: row gather, sparse gradients, lazy optimizer steps ---------------------
#
# A table (V, d) maps integer ids to rows. Ids are an integer ndarray of any integer dtype (int32
# and int64 are read without a copy), each in [0, V): a negative or too large id raises ValueError
# naming the argument, the value and its position, and nothing is read out of bounds. Only the
# rows a call reads are checked for NaN / Inf (scanning the whole table per batch would cost
# O(V d)). The gradient of a table is sparse -- (rows, grad_rows): the distinct ids of the batch and
# their summed gradients -- and the optimizer steps update only those rows (lazy steps).

def embedding_forward(table: np.ndarray, ids: np.ndarray, out: np.ndarray | None = None, offset: int = 0) -> np.ndarray:
    """Row gather: ``out[b, offset + f*d : offset + (f+1)*d] = table[ids[b, f]]``.

    table (V, d) float32 / float64; ids (B, F) integer, each in [0, V). Returns a new (B, F*d)
    array, or, with ``out``, writes into columns [offset, offset + F*d) of out (B, D) and returns
    it; the other columns are left untouched. out must have the table's dtype and columns adjacent
    in memory: a C-contiguous array or a column slice of one (``X[:, 3:]``).

    This is how several tables and dense features are concatenated into one model input without
    copies: allocate X = np.empty((B, D)), call embedding_forward(table_i, ids_i, out=X,
    offset=offset_i) per table, and write the dense features into their columns; the backward
    reads each table's block of dX with the same offset (:func:`embedding_backward`)."""
    return _C.embedding_forward(_array(table, "table"), ids, out, offset)


def embedding_backward(dout: np.ndarray, ids: np.ndarray, num_embeddings: int, dim: int | None = None,
                       offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse gradient of a table (num_embeddings, dim) for the upstream gradient ``dout``.

    dout (B, D): the gradient of the forward's output; the table's block is columns
    [offset, offset + F*dim) (the whole of dout for the forward's own (B, F*dim) output). ids
    (B, F) as in the forward. dim defaults to (D - offset) / F, the rest of the row.

    Returns ``(rows, grad_rows)``: rows (U,) int64, the distinct ids of the batch in ascending
    order, and grad_rows (U, dim), for each the sum of the gradient over every position that
    looked it up (an id repeated in a batch receives the sum). The sums are added in ascending
    position order, in double, so the result does not depend on the thread count. The dense
    gradient is ``g = zeros((V, dim)); g[rows] = grad_rows``."""
    dout = _array(dout, "dout")
    if dim is None:
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or dout.ndim != 2:
            dim = 1  # let the binding name the argument with the wrong shape
        else:
            cols = dout.shape[1] - _int(offset, "offset", 0, maximum=2**63 - 1)
            if ids.shape[1] == 0 or cols <= 0 or cols % ids.shape[1]:
                raise ValueError(f"dim=None needs the D - offset = {cols} columns of dout {dout.shape} to split "
                                 f"into F = {ids.shape[1]} blocks of dim >= 1 columns; pass dim")
            dim = cols // ids.shape[1]
    return _C.embedding_backward(dout, ids, num_embeddings, dim, offset)


def sparse_adagrad_step(table: np.ndarray, accum: np.ndarray, rows: np.ndarray, grad_rows: np.ndarray,
                        lr: float = 0.01, eps: float = 1e-10) -> None:
    """Lazy Adagrad on the rows ``rows`` (U,) of table (V, d) and its accumulator accum (V, d),
    both updated in place, with grad_rows (U, d) their gradients (as returned by
    :func:`embedding_backward`): for r = rows[u], g = grad_rows[u],
    ``accum[r] += g**2; table[r] -= lr * g / (sqrt(accum[r]) + eps)``.

    Rows not listed keep their values and accumulators. rows: integer dtype, DISTINCT (ValueError
    naming a repeated value; the rows are updated in parallel), each in [0, V). The arithmetic is
    :func:`adagrad_step`'s, so with every row listed it equals the dense step (weight decay 0;
    these sparse steps have none, as torch.optim's sparse Adagrad). lr > 0, eps > 0. The listed
    rows of table and accum must be finite, those of accum >= 0 (ValueError naming the row)."""
    _C.sparse_adagrad_step(table, accum, rows, grad_rows, lr, eps)


def sparse_adam_step(table: np.ndarray, m: np.ndarray, v: np.ndarray, rows: np.ndarray, grad_rows: np.ndarray,
                     step: int, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """Lazy Adam on the rows ``rows`` (U,) of table, m, v (V, d) (updated in place), with grad_rows
    (U, d) their gradients: for r = rows[u], g = grad_rows[u],
    ``m[r] = beta1 m[r] + (1 - beta1) g; v[r] = beta2 v[r] + (1 - beta2) g**2;
    table[r] -= lr / (1 - beta1**step) * m[r] / (sqrt(v[r]) / sqrt(1 - beta2**step) + eps)``.

    LAZY: rows not listed keep their values AND their moments (a dense Adam would decay the moments
    of every row each step and move rows with a zero gradient). ``step`` >= 1 is the GLOBAL step
    count, the number of this update of the model, also for a row last touched long ago: the same
    rule as PyTorch's torch.optim.SparseAdam and TensorFlow Addons' LazyAdam. rows: integer dtype,
    distinct, in [0, V). With every row listed it equals :func:`adam_step` (weight decay 0).
    lr > 0, betas in [0, 1), eps > 0. The listed rows of table, m and v must be finite, those of
    v >= 0 (ValueError naming the row)."""
    _C.sparse_adam_step(table, m, v, rows, grad_rows, step, lr, beta1, beta2, eps)
