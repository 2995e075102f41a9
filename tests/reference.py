"""Slow, plain NumPy reference implementations used as the test oracle for the C kernels.

Everything here is written straight from the equations of

    Hazimeh et al., "DSelect-k: Differentiable Selection in the Mixture of Experts with
    Applications to Multi-Task Learning", NeurIPS 2021

(Section 3.1, Section 3.2, Appendix B.2 and the "Ablation" part of Appendix C.2), plus the
Top-k gate of Shazeer et al. (2017) and the COMET gate of Ibrahim et al. (KDD 2023) as
shared/reference/comet-spec.md, Section 1, describes it. The code favours readability over speed: explicit loops
over experts, selectors and bits; no clever recursions.

Conventions (documented once here, relied on by the tests):

* Binary codes: expert i (1-based, i = 1..n) has code l = i - 1. Bit b (0-based) of l is read
  from s[..., b], so s[..., 0] is the LEAST significant bit (the paper's z_1, eq. (4)). The
  official TensorFlow code reads its bits most significant first; that is a relabelling of the
  encoding variables and gives the same family of gates.
* m = ceil(log2 n) encoding bits (Section 3.1 for n a power of two; for other n this is the
  smallest m with n <= 2^m, as in the official code). Codes n .. 2^m - 1 belong to no expert and
  are dropped, so for n not a power of two a selector's n entries can sum to less than 1
  (Appendix B.2).
* Regularisers (entropy, mass penalty) are summed over the k selectors and AVERAGED over any
  leading batch dimensions; coefficients (lambda, xi) are applied by callers.
* Dtypes: floating inputs keep their dtype (float32 in -> float32 out, float64 in -> float64
  out); non-floating inputs are treated as float64. Internally a computation may run in a wider
  type, and the result is cast back at the end.
"""

import math

import numpy as np

__all__ = [
    "smooth_step",
    "smooth_step_derivative",
    "n_bits",
    "selector",
    "softmax",
    "dselect_k",
    "dselect_k_per_example",
    "selector_entropy",
    "selector_mass_penalty",
    "dselect_k_objective_terms",
    "top_k",
    "noisy_logits",
    "softmax_selector",
    "softmax_selector_entropy",
    "comet_leaf_paths",
    "comet",
    "comet_per_example",
    "comet_reach",
    "comet_entropy",
    "mix_experts",
    "mix_experts_many",
    "mix_experts_many_backward",
    "embedding_lookup",
    "embedding_dense_gradient",
    "sparse_adagrad",
    "sparse_adam",
    "conv2d",
    "max_pool2d",
    "numerical_gradient",
]


# ----------------------------------------------------------------------------------------------
# small private helpers
# ----------------------------------------------------------------------------------------------


def _float_dtype(*arrays):
    """The floating dtype that the result of an operation on `arrays` should have."""
    dtype = np.result_type(*arrays)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    return dtype


def _as_float(x):
    """`x` as an ndarray with a floating dtype (its own if floating, float64 otherwise)."""
    x = np.asarray(x)
    return x.astype(_float_dtype(x), copy=False)


def _check_gamma(gamma):
    gamma = float(gamma)
    if not (gamma > 0.0) or math.isinf(gamma):
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    return gamma


def _batch_mean(per_example, dtype):
    """Mean over every entry of `per_example` (the leading batch dims); a scalar stays itself."""
    per_example = np.asarray(per_example, dtype=np.float64)
    flat = per_example.reshape(-1)
    if len(flat) == 0:
        raise ValueError("cannot average over an empty batch")
    total = 0.0
    for value in flat:
        total += float(value)
    return dtype.type(total / len(flat))


# ----------------------------------------------------------------------------------------------
# smooth-step (Section 3.1.3)
# ----------------------------------------------------------------------------------------------


def smooth_step(t, gamma):
    """Smooth-step S(t), Section 3.1.3 (the cubic piecewise polynomial before eq. (6)).

    S(t) = 0                                   if t <= -gamma/2
         = -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2  if -gamma/2 <= t <= gamma/2
         = 1                                   if t >= gamma/2
    Applied elementwise; returns an array of the same shape and dtype as `t`.
    """
    t = _as_float(t)
    gamma = _check_gamma(gamma)
    out = np.empty(t.shape, dtype=np.float64)
    flat_t = t.reshape(-1)
    flat_out = out.reshape(-1)
    for idx in range(flat_t.size):
        ti = float(flat_t[idx])
        if ti <= -gamma / 2.0:
            flat_out[idx] = 0.0
        elif ti >= gamma / 2.0:
            flat_out[idx] = 1.0
        else:
            flat_out[idx] = -2.0 / gamma**3 * ti**3 + 3.0 / (2.0 * gamma) * ti + 0.5
    return out.astype(t.dtype)


def smooth_step_derivative(t, gamma):
    """Derivative S'(t) of the smooth-step of Section 3.1.3.

    S'(t) = -6/gamma^3 t^2 + 3/(2 gamma)  for -gamma/2 < t < gamma/2, and 0 otherwise
    (the paper notes S'(-gamma/2) = S'(gamma/2) = 0, so S is continuously differentiable).
    Applied elementwise; same shape and dtype as `t`.
    """
    t = _as_float(t)
    gamma = _check_gamma(gamma)
    out = np.empty(t.shape, dtype=np.float64)
    flat_t = t.reshape(-1)
    flat_out = out.reshape(-1)
    for idx in range(flat_t.size):
        ti = float(flat_t[idx])
        if -gamma / 2.0 < ti < gamma / 2.0:
            flat_out[idx] = -6.0 / gamma**3 * ti**2 + 3.0 / (2.0 * gamma)
        else:
            flat_out[idx] = 0.0
    return out.astype(t.dtype)


# ----------------------------------------------------------------------------------------------
# single expert selector (Section 3.1.1, eq. (3)-(4); Appendix B.2)
# ----------------------------------------------------------------------------------------------


def n_bits(n):
    """Number of encoding bits m = ceil(log2 n) (Section 3.1.1: m = log2 n; Appendix B.2).

    Computed with integers: the smallest m >= 0 with 2^m >= n.
    n = 2 -> 1, 3 -> 2, 4 -> 2, 5 -> 3, 8 -> 3, 9 -> 4 (and the degenerate n = 1 -> 0).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"number of experts must be >= 1, got {n}")
    m = 0
    while 2**m < n:
        m += 1
    return m


def selector(s, n):
    """Single expert selector r(s), eq. (4) (eq. (3) for n = 4), for s of shape (..., m).

    r_i = prod_{b in B(i-1)} s_b * prod_{b not in B(i-1)} (1 - s_b),  i = 1..n,
    where B(l) is the set of set bits of l and s[..., 0] is the least significant bit.
    Only the first n of the 2^m codes are returned (Appendix B.2), so the entries sum to 1 when n
    is a power of two and to at most 1 otherwise. Returns shape (..., n), dtype of `s`.
    """
    s = _as_float(s)
    m = n_bits(n)
    if s.ndim < 1 or s.shape[-1] != m:
        raise ValueError(f"selector for n={n} needs s of shape (..., {m}), got {s.shape}")
    r = np.empty(s.shape[:-1] + (n,), dtype=s.dtype)
    for i in range(1, n + 1):
        code = i - 1
        entry = np.ones(s.shape[:-1], dtype=s.dtype)
        for b in range(m):
            bit_is_set = (code >> b) & 1
            if bit_is_set:
                entry = entry * s[..., b]
            else:
                entry = entry * (1 - s[..., b])
        r[..., i - 1] = entry
    return r


# ----------------------------------------------------------------------------------------------
# softmax and the DSelect-k gate (eq. (6); Section 3.2)
# ----------------------------------------------------------------------------------------------


def softmax(v, axis=-1):
    """Numerically stable softmax sigma(v) along `axis` (the sigma of Sections 2-3).

    sigma(v)_i = exp(v_i - max v) / sum_j exp(v_j - max v). Same shape and dtype as `v`.
    """
    v = _as_float(v)
    shifted = v - np.max(v, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(v.dtype, copy=False)


def dselect_k(alpha, Z, n, gamma):
    """DSelect-k gate, eq. (6): w = sum_{i=1..k} softmax(alpha)_i * r(S(z^(i))).

    alpha: (..., k) selector logits; Z: (..., k, m) encoding logits, m = n_bits(n).
    Leading batch dims broadcast: static gate alpha (k,), Z (k, m) -> w (n,);
    per-example gate alpha (B, k), Z (B, k, m) -> w (B, n).
    """
    alpha = _as_float(alpha)
    Z = _as_float(Z)
    dtype = _float_dtype(alpha, Z)
    alpha = alpha.astype(dtype, copy=False)
    Z = Z.astype(dtype, copy=False)
    m = n_bits(n)
    if alpha.ndim < 1 or Z.ndim < 2:
        raise ValueError(f"need alpha (..., k) and Z (..., k, m); got {alpha.shape}, {Z.shape}")
    k = alpha.shape[-1]
    if Z.shape[-2] != k or Z.shape[-1] != m:
        raise ValueError(f"Z must have shape (..., {k}, {m}) for n={n}, got {Z.shape}")

    selector_weights = softmax(alpha, axis=-1)  # (..., k)
    batch_shape = np.broadcast_shapes(alpha.shape[:-1], Z.shape[:-2])
    w = np.zeros(batch_shape + (n,), dtype=dtype)
    for i in range(k):
        r_i = selector(smooth_step(Z[..., i, :], gamma), n)  # (..., n)
        w = w + selector_weights[..., i, None] * r_i
    return w


def dselect_k_per_example(x, G, b_G, W, b_W, n, gamma):
    """Per-example DSelect-k, Section 3.2: v = sum_i softmax(G x + b_G)_i r(S(W^(i) x + b_W^(i))).

    x: (B, p); G: (k, p); b_G: (k,); W: (k, m, p); b_W: (k, m). (The paper omits the biases
    "to simplify the presentation"; the official layer has them.)
    alpha[b] = G x_b + b_G (B, k); Z[b, i, :] = W[i] x_b + b_W[i] (B, k, m); returns w (B, n).
    """
    x, G, b_G, W, b_W = (_as_float(a) for a in (x, G, b_G, W, b_W))
    dtype = _float_dtype(x, G, b_G, W, b_W)
    x, G, b_G, W, b_W = (a.astype(dtype, copy=False) for a in (x, G, b_G, W, b_W))
    if x.ndim != 2:
        raise ValueError(f"x must have shape (B, p), got {x.shape}")
    B, p = x.shape
    k = G.shape[0]
    m = n_bits(n)
    if G.shape != (k, p) or b_G.shape != (k,):
        raise ValueError(f"G must be ({k}, {p}) and b_G ({k},), got {G.shape}, {b_G.shape}")
    if W.shape != (k, m, p) or b_W.shape != (k, m):
        raise ValueError(
            f"W must be ({k}, {m}, {p}) and b_W ({k}, {m}), got {W.shape}, {b_W.shape}"
        )

    alpha = np.empty((B, k), dtype=dtype)
    Z = np.empty((B, k, m), dtype=dtype)
    for b in range(B):
        alpha[b] = G @ x[b] + b_G
        for i in range(k):
            Z[b, i, :] = W[i] @ x[b] + b_W[i]
    return dselect_k(alpha, Z, n, gamma)


# ----------------------------------------------------------------------------------------------
# regularisers (Section 3.1.3 / 3.2 entropy; Appendix B.2 mass penalty)
# ----------------------------------------------------------------------------------------------


def selector_entropy(r, eps=1e-6):
    """Entropy regulariser Omega = sum_{i=1..k} h(r_i), Sections 3.1.3 and 3.2.

    h(r) = -sum_j r_j log(r_j + eps) (natural log; eps as in the official code).
    r: (..., k, n) selector outputs. For r of shape (k, n) this is the plain sum over selectors;
    with leading batch dims it is the MEAN over the batch of that per-example sum.
    Returns a scalar of r's dtype.
    """
    r = _as_float(r)
    if r.ndim < 2:
        raise ValueError(f"r must have shape (..., k, n), got {r.shape}")
    k, n = r.shape[-2], r.shape[-1]
    omega = np.zeros(r.shape[:-2], dtype=np.float64)
    for i in range(k):
        h_i = np.zeros(r.shape[:-2], dtype=np.float64)
        for j in range(n):
            r_ij = r[..., i, j].astype(np.float64)
            h_i = h_i - r_ij * np.log(r_ij + eps)
        omega = omega + h_i
    return _batch_mean(omega, r.dtype)


def selector_mass_penalty(r, eps=1e-6):
    """Penalty for n not a power of two, Appendix B.2, without its coefficient xi.

    penalty = sum_{i=1..k} 1 / (eps + sum_{j<n} r_ij) for r of shape (..., k, n), averaged over
    leading batch dims like selector_entropy. (The paper has no eps; it is added to avoid
    division by zero, as in the COMET code.) Returns a scalar of r's dtype.
    """
    r = _as_float(r)
    if r.ndim < 2:
        raise ValueError(f"r must have shape (..., k, n), got {r.shape}")
    k, n = r.shape[-2], r.shape[-1]
    penalty = np.zeros(r.shape[:-2], dtype=np.float64)
    for i in range(k):
        mass_i = np.zeros(r.shape[:-2], dtype=np.float64)
        for j in range(n):
            mass_i = mass_i + r[..., i, j].astype(np.float64)
        penalty = penalty + 1.0 / (eps + mass_i)
    return _batch_mean(penalty, r.dtype)


def dselect_k_objective_terms(alpha, Z, n, gamma, eps=1e-6):
    """The gate's pieces of the regularised objective (Section 3.1.3, Appendix B.2).

    Returns (w, Omega, penalty): w = dselect_k(alpha, Z, n, gamma) (eq. (6)),
    Omega = selector_entropy(r, eps), penalty = selector_mass_penalty(r, eps), where
    r[..., i, :] = selector(smooth_step(Z[..., i, :], gamma), n) are the k selector outputs.
    """
    w = dselect_k(alpha, Z, n, gamma)
    r = selector(smooth_step(Z, gamma), n)  # (..., k, n): one selector per row of Z
    omega = selector_entropy(r, eps)
    penalty = selector_mass_penalty(r, eps)
    dtype = w.dtype
    return w, dtype.type(omega), dtype.type(penalty)


# ----------------------------------------------------------------------------------------------
# Top-k gate (Shazeer et al. 2017, Section 2 of the paper)
# ----------------------------------------------------------------------------------------------


def top_k(logits, k):
    """Top-k gate: softmax(KeepTopK(logits, k)) along the last axis (Shazeer et al. 2017).

    Keeps the k largest logits of each row (ties broken toward the LOWER index, via a stable
    sort of -logits), takes a softmax over the kept entries, and puts exact zeros elsewhere.
    logits: (..., n); returns the same shape and dtype.
    """
    logits = _as_float(logits)
    n = logits.shape[-1]
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    out = np.zeros(logits.shape, dtype=logits.dtype)
    rows_in = logits.reshape(-1, n)
    rows_out = out.reshape(-1, n)
    for row in range(rows_in.shape[0]):
        v = rows_in[row]
        order = np.argsort(-v, kind="stable")  # largest first; equal values keep index order
        kept = order[:k]
        rows_out[row, kept] = softmax(v[kept])
    return out


def noisy_logits(clean, raw_noise, normal):
    """Noisy Top-k logits (Shazeer et al. 2017): clean + normal * softplus(raw_noise).

    softplus(x) = log(1 + exp(x)) computed stably as np.logaddexp(0, x); `normal` holds the
    N(0, 1) draws. Shapes broadcast; result has the common floating dtype.
    """
    clean, raw_noise, normal = (_as_float(a) for a in (clean, raw_noise, normal))
    dtype = _float_dtype(clean, raw_noise, normal)
    softplus = np.logaddexp(0.0, raw_noise.astype(np.float64))
    result = clean.astype(np.float64) + normal.astype(np.float64) * softplus
    return result.astype(dtype)


# ----------------------------------------------------------------------------------------------
# ablation gate (Appendix C.2)
# ----------------------------------------------------------------------------------------------


def softmax_selector(alpha, beta, T):
    """Ablation gate of Appendix C.2: h(alpha, beta) = sum_i softmax(alpha)_i softmax(beta^(i)/T).

    alpha: (..., k); beta: (..., k, n); T > 0 is the softmax temperature (annealed by callers).
    Returns (w, P) with P[..., i, :] = softmax(beta[..., i, :] / T) over the n experts, shape
    (..., k, n), and w = sum_i softmax(alpha)_i P_i, shape (..., n).
    """
    alpha = _as_float(alpha)
    beta = _as_float(beta)
    dtype = _float_dtype(alpha, beta)
    alpha = alpha.astype(dtype, copy=False)
    beta = beta.astype(dtype, copy=False)
    T = float(T)
    if not T > 0.0:
        raise ValueError(f"temperature T must be positive, got {T}")
    k = alpha.shape[-1]
    if beta.ndim < 2 or beta.shape[-2] != k:
        raise ValueError(f"beta must have shape (..., {k}, n), got {beta.shape}")
    n = beta.shape[-1]

    P = softmax(beta / dtype.type(T), axis=-1)  # (..., k, n)
    selector_weights = softmax(alpha, axis=-1)  # (..., k)
    batch_shape = np.broadcast_shapes(alpha.shape[:-1], beta.shape[:-2])
    w = np.zeros(batch_shape + (n,), dtype=dtype)
    for i in range(k):
        w = w + selector_weights[..., i, None] * P[..., i, :]
    return w, P


def softmax_selector_entropy(P, eps=1e-6):
    """Entropy regulariser of the Appendix C.2 ablation gate: sum_i h(P_i), h as in Section 3.1.3.

    Same reduction rule as selector_entropy (sum over the k selectors, mean over leading batch
    dims), applied to the softmax selectors P of shape (..., k, n).
    """
    return selector_entropy(P, eps)


# ----------------------------------------------------------------------------------------------
# COMET (Ibrahim et al., KDD 2023; shared/reference/comet-spec.md, Section 1)
# ----------------------------------------------------------------------------------------------


def comet_leaf_paths(n):
    """The root-to-leaf paths of COMET's heap-indexed tree over n experts, one per expert, in
    left-first depth-first order (expert j = the j-th leaf visited).

    Node i (0-based) is internal when i < n - 1, with children 2i + 1 (left) and 2i + 2 (right);
    nodes n - 1 .. 2n - 2 are leaves. Each path is a list of (internal node, went_left) pairs from
    the root down; returns (leaf_nodes, paths). For n = 3 the leaves are 3, 4, 2."""
    n = int(n)
    if n < 2:
        raise ValueError(f"COMET needs n >= 2 experts, got {n}")
    leaves, paths = [], []

    def visit(node, path):
        if node >= n - 1:  # a leaf
            leaves.append(node)
            paths.append(list(path))
            return
        visit(2 * node + 1, path + [(node, True)])
        visit(2 * node + 2, path + [(node, False)])

    visit(0, [])
    return leaves, paths


def comet_reach(Z, gamma):
    """Leaf-reach probabilities p (..., k, n) of the k trees with node logits Z (..., k, n - 1): p of
    expert j's leaf is the product along its root-to-leaf path of s = S(z) where the path goes left
    and 1 - s where it goes right."""
    Z = _as_float(Z)
    n = Z.shape[-1] + 1
    s = smooth_step(Z, gamma).astype(np.float64)
    _, paths = comet_leaf_paths(n)
    p = np.ones(Z.shape[:-1] + (n,), dtype=np.float64)
    for j, path in enumerate(paths):
        for node, went_left in path:
            p[..., j] = p[..., j] * (s[..., node] if went_left else 1.0 - s[..., node])
    return p.astype(Z.dtype)


def comet(A, Z, gamma):
    """COMET gate: w_j = sum_t g_{t,j}, g = softmax over ALL k * n scores a_{t,j} + log p_{t,j}
    (one softmax, not one per tree), where p = comet_reach(Z, gamma). A leaf with p = 0 has score
    -inf and weight exactly 0. A: (..., k, n) leaf logits (expert order); Z: (..., k, n - 1) node
    logits (heap order). Returns (w (..., n), g (..., k, n))."""
    A, Z = _as_float(A), _as_float(Z)
    dtype = _float_dtype(A, Z)
    k, n = A.shape[-2], A.shape[-1]
    if Z.shape[-2:] != (k, n - 1):
        raise ValueError(f"Z must have shape (..., {k}, {n - 1}) for A of shape {A.shape}, got {Z.shape}")
    p = comet_reach(Z.astype(np.float64), gamma)
    with np.errstate(divide="ignore"):
        scores = A.astype(np.float64) + np.log(p)  # log 0 = -inf: those leaves drop out
    lead = scores.shape[:-2]
    flat = scores.reshape(lead + (k * n,))
    top = np.max(flat, axis=-1, keepdims=True)
    e = np.exp(flat - top)
    g = (e / np.sum(e, axis=-1, keepdims=True)).reshape(lead + (k, n))
    w = np.zeros(lead + (n,))
    for t in range(k):
        w = w + g[..., t, :]
    return w.astype(dtype), g.astype(dtype)


def comet_per_example(x, U, b_U, W, b_W, gamma):
    """Per-example COMET: a[b, t] = U[t] x_b + b_U[t] (B, k, n), z[b, t] = W[t] x_b + b_W[t]
    (B, k, n - 1), then comet(a, z, gamma). x (B, p); U (k, n, p); b_U (k, n); W (k, n - 1, p);
    b_W (k, n - 1). Returns (w (B, n), g (B, k, n))."""
    x, U, b_U, W, b_W = (_as_float(a) for a in (x, U, b_U, W, b_W))
    B = x.shape[0]
    k, n = U.shape[:2]
    A = np.empty((B, k, n))
    Z = np.empty((B, k, n - 1))
    for b in range(B):
        for t in range(k):
            A[b, t] = U[t] @ x[b] + b_U[t]
            Z[b, t] = W[t] @ x[b] + b_W[t]
    return comet(A, Z, gamma)


def comet_entropy(Z, gamma, eps=1e-6):
    """The COMET regularizer without lambda: sum over the k trees of h(p_t) = -sum_j p_tj log(p_tj +
    eps), the entropy of each tree's leaf-reach distribution, averaged over leading batch dims."""
    return selector_entropy(comet_reach(Z, gamma), eps)


# ----------------------------------------------------------------------------------------------
# mixing expert outputs (eq. (2a) / (7): y = sum_j f_j(x) w_j)
# ----------------------------------------------------------------------------------------------


def mix_experts(f, w, layout):
    """Mixture output y = sum_{j=1..n} w_j f_j(x), as in eq. (2a) / (7).

    f: stacked expert outputs, shape (n, B, d) if layout == "nbd" or (B, n, d) if "bnd".
    w: (n,) static weights (the same for every example) or (B, n) per-example weights.
    Returns y of shape (B, d) with y[b] = sum_j w[b, j] f_j[b]; an explicit loop over experts.
    """
    f = _as_float(f)
    w = _as_float(w)
    dtype = _float_dtype(f, w)
    if f.ndim != 3:
        raise ValueError(f"f must be 3-D, got {f.shape}")
    if layout == "nbd":
        n, B, d = f.shape
    elif layout == "bnd":
        B, n, d = f.shape
    else:
        raise ValueError(f"layout must be 'nbd' or 'bnd', got {layout!r}")
    if w.shape not in ((n,), (B, n)):
        raise ValueError(f"w must have shape ({n},) or ({B}, {n}), got {w.shape}")

    y = np.zeros((B, d), dtype=np.float64)
    for j in range(n):
        if layout == "nbd":
            f_j = f[j, :, :].astype(np.float64)  # (B, d)
        else:
            f_j = f[:, j, :].astype(np.float64)  # (B, d)
        if w.ndim == 1:
            weight_j = float(w[j])  # one scalar for every example
        else:
            weight_j = w[:, j].astype(np.float64)[:, None]  # (B, 1)
        y = y + weight_j * f_j
    return y.astype(dtype)


def mix_experts_many(f, w):
    """The T mixtures of a multi-task model with one per-example gate per task: y (T, B, d) with
    y[t] = mix_experts(f, w[t], "nbd"), for f (n, B, d) and w (T, B, n). A loop over tasks of
    the single-task reference."""
    f = _as_float(f)
    w = _as_float(w)
    if w.ndim != 3:
        raise ValueError(f"w must be 3-D (T, B, n), got {w.shape}")
    return np.stack([mix_experts(f, w[t], "nbd") for t in range(w.shape[0])])


def mix_experts_many_backward(dy, f, w):
    """(dw, df) of sum_t <dy[t], y[t]> for y = mix_experts_many(f, w), the full gradient (no
    expert skipped), by explicit loops over tasks and experts:
    dw[t, b, j] = <dy[t, b], f[j, b]> (T, B, n), df[j] = sum_t w[t, :, j, None] dy[t] (n, B, d)."""
    dy, f, w = _as_float(dy), _as_float(f), _as_float(w)
    dtype = _float_dtype(dy, f, w)
    T, B, n = w.shape
    dw = np.zeros((T, B, n))
    df = np.zeros(f.shape)
    for t in range(T):
        dy_t = dy[t].astype(np.float64)  # (B, d)
        for j in range(n):
            f_j = f[j].astype(np.float64)  # (B, d)
            dw[t, :, j] = np.sum(dy_t * f_j, axis=1)
            df[j] = df[j] + w[t, :, j].astype(np.float64)[:, None] * dy_t
    return dw.astype(dtype), df.astype(dtype)


# ----------------------------------------------------------------------------------------------
# embedding tables: lookup, its gradient, lazy optimizer steps
# ----------------------------------------------------------------------------------------------


def embedding_lookup(table, ids):
    """out (B, F * d): the rows table[ids[b, f]] of a table (V, d) side by side, f = 0..F-1."""
    table = np.asarray(table)
    ids = np.asarray(ids)
    B, F = ids.shape
    d = table.shape[1]
    out = np.zeros((B, F * d), dtype=table.dtype)
    for b in range(B):
        for f in range(F):
            out[b, f * d:(f + 1) * d] = table[int(ids[b, f])]
    return out


def embedding_dense_gradient(dout, ids, V):
    """The gradient (V, d) of <dout, embedding_lookup(table, ids)> with respect to the table:
    row v is the sum of the blocks dout[b, f*d:(f+1)*d] over every (b, f) with ids[b, f] == v,
    added in the order b = 0.., f = 0.. in float64 (cast to dout's dtype at the end)."""
    dout = np.asarray(dout)
    ids = np.asarray(ids)
    B, F = ids.shape
    d = dout.shape[1] // F
    grad = np.zeros((V, d), dtype=np.float64)
    for b in range(B):
        for f in range(F):
            grad[int(ids[b, f])] += dout[b, f * d:(f + 1) * d].astype(np.float64)
    return grad.astype(dout.dtype)


def sparse_adagrad(table, accum, rows, grad_rows, lr, eps):
    """New (table, accum) after one lazy Adagrad step on the rows listed (copies; the inputs are
    not modified): accum[r] += g^2, table[r] -= lr g / (sqrt(accum[r]) + eps), in float64."""
    table, accum = table.copy(), accum.copy()
    for u, r in enumerate(rows):
        g = grad_rows[u].astype(np.float64)
        a = accum[r].astype(np.float64) + g * g
        accum[r] = a
        table[r] = table[r].astype(np.float64) - lr * g / (np.sqrt(a) + eps)
    return table, accum


def sparse_adam(table, m, v, rows, grad_rows, step, lr, beta1, beta2, eps):
    """New (table, m, v) after one lazy Adam step (Kingma & Ba with bias correction by the global
    step count) on the rows listed; other rows and their moments unchanged. float64 inside."""
    table, m, v = table.copy(), m.copy(), v.copy()
    for u, r in enumerate(rows):
        g = grad_rows[u].astype(np.float64)
        mr = beta1 * m[r].astype(np.float64) + (1 - beta1) * g
        vr = beta2 * v[r].astype(np.float64) + (1 - beta2) * g * g
        m[r], v[r] = mr, vr
        m_hat = mr / (1 - beta1**step)
        v_hat = vr / (1 - beta2**step)
        table[r] = table[r].astype(np.float64) - lr * m_hat / (np.sqrt(v_hat) + eps)
    return table, m, v
# convolution and max pooling of the CNN experts (NCHW)
# ----------------------------------------------------------------------------------------------


def conv2d(x, W, b=None, stride=(1, 1), padding=(0, 0, 0, 0)):
    """Cross-correlation of x (B, C, H, W) with W (F, C, KH, KW) plus b (F,) or None, NCHW.

    padding = (top, bottom, left, right) zero rows / columns around x; stride = (sh, sw).
    y[b, f, oh, ow] = b[f] + sum_{c, i, j} W[f, c, i, j] xp[b, c, oh*sh + i, ow*sw + j], with xp the
    zero-padded x, for OH = (H + top + bottom - KH) // sh + 1 (OW likewise). One einsum per kernel
    offset (i, j), accumulated in float64; the result is cast to the inputs' dtype."""
    x, W = _as_float(x), _as_float(W)
    dtype = _float_dtype(x, W)
    top, bottom, left, right = padding
    sh, sw = stride
    B, C, H, Wd = x.shape
    F, C2, KH, KW = W.shape
    if C2 != C:
        raise ValueError(f"W has {C2} input channels, x has {C}")
    xp = np.zeros((B, C, H + top + bottom, Wd + left + right))
    xp[:, :, top:top + H, left:left + Wd] = x
    OH = (xp.shape[2] - KH) // sh + 1
    OW = (xp.shape[3] - KW) // sw + 1
    y = np.zeros((B, F, OH, OW))
    for i in range(KH):
        for j in range(KW):
            patch = xp[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw]  # (B, C, OH, OW)
            y += np.einsum("bchw,fc->bfhw", patch, W[:, :, i, j].astype(np.float64))
    if b is not None:
        y += np.asarray(b, dtype=np.float64)[None, :, None, None]
    return y.astype(dtype)


def max_pool2d(x, kernel, stride=None):
    """Max pooling of x (B, C, H, W) over the valid windows: returns (y, idx), both (B, C, OH, OW);
    idx is the flat index h * W + w in the input plane of the maximum, the first one in row-major
    window order on ties. An explicit loop over windows."""
    x = np.asarray(x)
    KH, KW = kernel
    sh, sw = stride if stride is not None else kernel
    B, C, H, W = x.shape
    OH, OW = (H - KH) // sh + 1, (W - KW) // sw + 1
    y = np.empty((B, C, OH, OW), dtype=x.dtype)
    idx = np.empty((B, C, OH, OW), dtype=np.int64)
    for b in range(B):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    window = x[b, c, oh * sh:oh * sh + KH, ow * sw:ow * sw + KW]
                    i, j = np.unravel_index(int(np.argmax(window)), window.shape)  # argmax: the first maximum
                    y[b, c, oh, ow] = window[i, j]
                    idx[b, c, oh, ow] = (oh * sh + i) * W + ow * sw + j
    return y, idx


# ----------------------------------------------------------------------------------------------
# finite differences (helper for gradient tests)
# ----------------------------------------------------------------------------------------------


def numerical_gradient(f, x, h=1e-6):
    """Central finite differences: grad[idx] = (f(x + h e_idx) - f(x - h e_idx)) / (2h).

    `f` takes no arguments and reads the array `x` in place; each x[idx] is perturbed by +h and
    -h, f() is evaluated, and x[idx] is restored exactly (also if f raises). The denominator is
    the difference actually stored in x (equal to 2h up to rounding of x's dtype; with float32
    x use a larger h). Returns an array with x's shape and dtype.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError("x must be a NumPy array that f() reads in place")
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        original = x[idx].copy()
        try:
            x[idx] = original + h
            x_plus = float(x[idx])
            f_plus = float(f())
            x[idx] = original - h
            x_minus = float(x[idx])
            f_minus = float(f())
        finally:
            x[idx] = original
        grad[idx] = (f_plus - f_minus) / (x_plus - x_minus)
    return grad
