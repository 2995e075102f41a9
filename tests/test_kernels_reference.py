"""Every forward of ``dselectk.functional`` matched against the plain-NumPy reference (tests/reference.py).

float64: to 1e-12 (absolute and relative). float32: the float32 inputs are cast to float64 and fed to
the float64 reference; the kernel must agree to ~1e-5 relative (with a small absolute floor, or an
absolute floor scaled by the sum of the magnitudes of the summed terms where a kernel sums many terms).
"""
import zlib

import numpy as np
import pytest

import reference as ref
from dselectk import functional as F

NS = [2, 3, 4, 5, 7, 8, 9, 16, 128]
KS = [1, 2, 4]
GAMMAS = [0.5, 1.0, 10.0]
DTYPES = [np.float64, np.float32]
NK = [(n, k) for n in NS for k in KS if k <= n]


def rng_for(*key):
    """A seeded Generator that depends only on the test's parameters (stable across runs)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def f64(a):
    return np.asarray(a, dtype=np.float64)


def assert_close(got, want, dtype, atol32=1e-6, scale=None):
    """got (kernel, dtype) against want (float64 reference of the same input values)."""
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), f"dtype {got.dtype}, expected {np.dtype(dtype)}"
    assert got.shape == np.shape(want), f"shape {got.shape}, expected {np.shape(want)}"
    tol = 1e-12 if dtype == np.float64 else 1e-5
    if scale is None:
        atol = 1e-12 if dtype == np.float64 else atol32
        np.testing.assert_allclose(f64(got), want, rtol=tol, atol=atol)
    else:  # absolute error relative to the magnitude of the summed terms
        err = np.abs(f64(got) - want)
        bad = err > tol * (np.abs(want) + scale)
        assert not bad.any(), (
            f"{int(bad.sum())} of {bad.size} entries differ; worst error {err.max():.3e}; "
            f"first bad: got {f64(got)[bad][0]!r}, want {np.asarray(want)[bad][0]!r}"
        )


def assert_scalar_close(got, want, dtype):
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want))), (got, want)


# --------------------------------------------------------------------------------------------
# n_bits, smooth-step, selector
# --------------------------------------------------------------------------------------------


def test_n_bits_matches_reference():
    for n in range(2, 1100):
        assert F.n_bits(n) == ref.n_bits(n), n
    for n in (2**20, 2**20 + 1, 2**30):
        assert F.n_bits(n) == ref.n_bits(n), n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("shape", [(), (1,), (37,), (4, 9), (2, 3, 5)])
def test_smooth_step(shape, gamma, dtype):
    rng = rng_for("smooth_step", shape, gamma)
    t = rng.uniform(-gamma, gamma, size=shape).astype(dtype)
    if t.size >= 9:  # the boundaries, the centre, and far outside
        flat = t.reshape(-1)
        flat[:9] = [-gamma / 2, gamma / 2, 0.0, -1e6, 1e6, -gamma / 2 * 1.0001, gamma / 2 * 0.9999, -gamma, gamma]
    s = F.smooth_step(t, gamma)
    assert_close(s, ref.smooth_step(f64(t), gamma), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_smooth_step_out_and_noncontiguous(gamma, dtype):
    rng = rng_for("smooth_step_out", gamma)
    big = rng.uniform(-gamma, gamma, size=(6, 10)).astype(dtype)
    t = big[:, ::3].T  # non-contiguous view
    out = np.full(t.shape, -7.0, dtype=dtype)
    res = F.smooth_step(t, gamma, out=out)
    want = ref.smooth_step(f64(t), gamma)
    assert_close(out, want, dtype)
    assert_close(res, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("lead", [(), (1,), (13,), (3, 4)])
def test_selector(n, lead, dtype):
    rng = rng_for("selector", n, lead)
    m = ref.n_bits(n)
    s = rng.uniform(0.0, 1.0, size=lead + (m,))
    s.reshape(-1, m)[0] = rng.integers(0, 2, size=m)  # one binary row
    if n == 128 and lead == ():
        s[:] = 1.0  # code 127, the last expert
    s = s.astype(dtype)
    r = F.selector(s, n)
    assert_close(r, ref.selector(f64(s), n), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 8, 128])
def test_selector_out(n, dtype):
    rng = rng_for("selector_out", n)
    m = ref.n_bits(n)
    s = rng.uniform(0.0, 1.0, size=(5, m)).astype(dtype)
    out = np.zeros((5, n), dtype=dtype)
    F.selector(s, n, out=out)
    assert_close(out, ref.selector(f64(s), n), dtype)


# --------------------------------------------------------------------------------------------
# DSelect-k
# --------------------------------------------------------------------------------------------


def draw_alpha_Z(rng, lead, k, m, gamma):
    """Logits with Z spread over the fractional region and outside it. Values with 0.4 < |Z|/gamma < 0.5
    (S within 3% of 0 or 1, where 1 - S or S is ill-conditioned in float32 and the mass penalty
    1 / (eps + mass) amplifies that) are moved to exactly +-gamma/2 or beyond."""
    alpha = rng.normal(0.0, 2.0, size=lead + (k,))
    Z = rng.normal(0.0, 0.6 * gamma, size=lead + (k, m))
    near = (np.abs(Z) > 0.4 * gamma) & (np.abs(Z) < 0.5 * gamma)
    Z[near] = np.sign(Z[near]) * gamma * rng.choice([0.5, 0.75], size=int(near.sum()))
    return alpha, Z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
def test_dselect_k_static(n, k, gamma, dtype):
    rng = rng_for("dsk_static", n, k, gamma)
    m = ref.n_bits(n)
    alpha, Z = draw_alpha_Z(rng, (), k, m, gamma)
    alpha, Z = alpha.astype(dtype), Z.astype(dtype)
    w, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    assert w.shape == (n,)
    assert_close(w, ref.dselect_k(f64(alpha), f64(Z), n, gamma), dtype)
    assert_close(F.dselect_k(alpha, Z, n, gamma), ref.dselect_k(f64(alpha), f64(Z), n, gamma), dtype)
    # the cache: softmax(alpha), S(Z), r(S(Z)) (batch of one)
    sz_ref = ref.smooth_step(f64(Z), gamma)
    assert_close(cache.sigma, ref.softmax(f64(alpha))[None], dtype)
    assert_close(cache.sz, sz_ref[None], dtype)
    assert_close(cache.r, ref.selector(sz_ref, n)[None], dtype)
    assert cache.static


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
def test_dselect_k_per_example(n, k, gamma, dtype):
    rng = rng_for("dsk_batch", n, k, gamma)
    m = ref.n_bits(n)
    B = int(rng.integers(1, 65))
    alpha, Z = draw_alpha_Z(rng, (B,), k, m, gamma)
    alpha, Z = alpha.astype(dtype), Z.astype(dtype)
    w, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    want = ref.dselect_k(f64(alpha), f64(Z), n, gamma)
    assert w.shape == (B, n)
    assert_close(w, want, dtype)
    sz_ref = ref.smooth_step(f64(Z), gamma)
    assert_close(cache.sigma, ref.softmax(f64(alpha)), dtype)
    assert_close(cache.sz, sz_ref, dtype)
    assert_close(cache.r, ref.selector(sz_ref, n), dtype)
    assert not cache.static


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(2, 1), (5, 2), (16, 4), (128, 4)])
def test_dselect_k_noncontiguous(n, k, dtype):
    rng = rng_for("dsk_nc", n, k)
    m = ref.n_bits(n)
    B = 7
    alpha = rng.normal(size=(k, 2 * B)).astype(dtype)[:, ::2].T  # (B, k), not contiguous
    Z = np.asfortranarray(rng.normal(0, 0.4, size=(B, k, m)).astype(dtype))
    w = F.dselect_k(alpha, Z, n, 1.0)
    assert_close(w, ref.dselect_k(f64(alpha), f64(Z), n, 1.0), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
def test_dselect_k_regularization(n, k, gamma, static, dtype):
    rng = rng_for("dsk_reg", n, k, gamma, static)
    m = ref.n_bits(n)
    lead = () if static else (int(rng.integers(1, 65)),)
    alpha, Z = draw_alpha_Z(rng, lead, k, m, gamma)
    alpha, Z = alpha.astype(dtype), Z.astype(dtype)
    _, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    r_ref = ref.selector(ref.smooth_step(f64(Z), gamma), n)  # (..., k, n)
    for eps in (1e-6, 1e-3):
        omega, penalty = F.dselect_k_regularization(cache, eps=eps)
        assert_scalar_close(omega, ref.selector_entropy(r_ref, eps), dtype)
        assert_scalar_close(penalty, ref.selector_mass_penalty(r_ref, eps), dtype)
    # the default eps, through the reference's objective terms
    omega, penalty = F.dselect_k_regularization(cache)
    w_ref, om_ref, pen_ref = ref.dselect_k_objective_terms(f64(alpha), f64(Z), n, gamma)
    assert_scalar_close(omega, om_ref, dtype)
    assert_scalar_close(penalty, pen_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
def test_dselect_k_per_example_forward(n, k, gamma, dtype):
    rng = rng_for("dsk_pe", n, k, gamma)
    m = ref.n_bits(n)
    B, p = int(rng.integers(1, 65)), int(rng.integers(1, 9))
    x = rng.normal(size=(B, p))
    G = rng.normal(size=(k, p))
    b_G = rng.normal(size=k)
    W = rng.normal(0, 0.5 * gamma / np.sqrt(p), size=(k, m, p))
    b_W = rng.normal(0, 0.3 * gamma, size=(k, m))
    x, G, b_G, W, b_W = (a.astype(dtype) for a in (x, G, b_G, W, b_W))
    w, cache = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n, gamma)
    want = ref.dselect_k_per_example(*(f64(a) for a in (x, G, b_G, W, b_W)), n, gamma)
    assert_close(w, want, dtype)
    # the cached logits are the affine maps of Section 3.2
    alpha_ref = f64(x) @ f64(G).T + f64(b_G)
    Z_ref = np.einsum("kmp,bp->bkm", f64(W), f64(x)) + f64(b_W)
    assert_close(cache.gate.Z, Z_ref, dtype, atol32=1e-5)
    assert_close(cache.gate.sigma, ref.softmax(alpha_ref), dtype)


# --------------------------------------------------------------------------------------------
# softmax, Top-k, noisy logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1] + NS)
@pytest.mark.parametrize("batched", [False, True])
def test_softmax(n, batched, dtype):
    rng = rng_for("softmax", n, batched)
    shape = (int(rng.integers(1, 65)), n) if batched else (n,)
    logits = rng.normal(0.0, 3.0, size=shape) + rng.choice([0.0, 500.0, -800.0])
    logits = logits.astype(dtype)
    assert_close(F.softmax(logits), ref.softmax(f64(logits)), dtype)
    out = np.empty(shape, dtype=dtype)
    F.softmax(logits, out=out)
    assert_close(out, ref.softmax(f64(logits)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("n,k", NK)
def test_top_k(n, k, batched, ties, dtype):
    rng = rng_for("topk", n, k, batched, ties)
    shape = (int(rng.integers(1, 65)), n) if batched else (n,)
    if ties:  # few distinct values: many ties, broken toward the lower index
        logits = rng.integers(-2, 2, size=shape).astype(np.float64) * 0.75
    else:
        logits = rng.normal(0.0, 2.0, size=shape)
    logits = logits.astype(dtype)
    w = F.top_k(logits, k)
    want = ref.top_k(f64(logits), k)
    assert_close(w, want, dtype)
    # same support exactly
    np.testing.assert_array_equal(w != 0, want != 0)
    out = np.empty(shape, dtype=dtype)
    F.top_k(logits, k, out=out)
    assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (50,), (7, 16), (3, 4, 5)])
def test_noisy_logits(shape, dtype):
    rng = rng_for("noisy", shape)
    clean = rng.normal(size=shape)
    raw = rng.normal(0.0, 3.0, size=shape)
    raw.reshape(-1)[:1] = 60.0  # softplus must not overflow / lose the large branch
    if raw.size > 2:
        raw.reshape(-1)[1:3] = [-60.0, 0.0]
    normal = rng.normal(size=shape)
    clean, raw, normal = clean.astype(dtype), raw.astype(dtype), normal.astype(dtype)
    got = F.noisy_logits(clean, raw, normal)
    assert_close(got, ref.noisy_logits(f64(clean), f64(raw), f64(normal)), dtype)


# --------------------------------------------------------------------------------------------
# Ablation gate (Appendix C.2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("n,k", NK)
def test_softmax_selector(n, k, static, T):
    rng = rng_for("softsel", n, k, static, T)
    lead = () if static else (int(rng.integers(1, 65)),)
    alpha64 = rng.normal(0.0, 2.0, size=lead + (k,))
    beta64 = rng.normal(0.0, 1.0, size=lead + (k, n))
    for dtype in DTYPES:
        alpha, beta = alpha64.astype(dtype), beta64.astype(dtype)
        w, cache = F.softmax_selector_forward(alpha, beta, T)
        w_ref, P_ref = ref.softmax_selector(f64(alpha), f64(beta), T)
        assert_close(w, w_ref, dtype)
        assert_close(cache.P.reshape(P_ref.shape), P_ref, dtype)
        for eps in (1e-6, 1e-2):
            assert_scalar_close(
                F.softmax_selector_entropy(cache, eps=eps), ref.softmax_selector_entropy(P_ref, eps), dtype
            )


# --------------------------------------------------------------------------------------------
# mixing the experts, linear maps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skip_zero", [True, False])
@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("layout", ["nbd", "bnd"])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 128])
def test_mix_experts(n, layout, per_example, skip_zero, dtype):
    rng = rng_for("mix", n, layout, per_example, skip_zero)
    B, d = int(rng.integers(1, 65)), int(rng.integers(1, 9))
    f = rng.normal(size=(n, B, d) if layout == "nbd" else (B, n, d))
    w = rng.uniform(0.0, 1.0, size=(B, n) if per_example else (n,))
    # some exact zeros: a whole expert column, and (per example) scattered entries
    w[..., n // 2] = 0.0
    if per_example:
        w[rng.uniform(size=w.shape) < 0.3] = 0.0
    w /= max(1.0, float(np.abs(w).sum(-1).max()))
    f, w = f.astype(dtype), w.astype(dtype)
    y = F.mix_experts(f, w, layout=layout, skip_zero=skip_zero)
    want = ref.mix_experts(f64(f), f64(w), layout)
    # scale: sum of |w_j f_j| (the sum has up to n terms, accumulated in the kernel's dtype)
    scale = ref.mix_experts(np.abs(f64(f)), np.abs(f64(w)), layout) + 1e-3
    assert_close(y, want, dtype, scale=scale)
    out = np.empty((B, d), dtype=dtype)
    F.mix_experts(f, w, layout=layout, skip_zero=skip_zero, out=out)
    assert_close(out, want, dtype, scale=scale)


def draw_mix_many(rng, T, n, B, d):
    """f (n, B, d), w (T, B, n) with exact zeros: scattered entries, an expert no task uses (when
    n > 2) and, for T > 1, an expert that task 0 does not use but the others do."""
    f = rng.normal(size=(n, B, d))
    w = rng.uniform(0.0, 1.0, size=(T, B, n))
    w[rng.uniform(size=w.shape) < 0.3] = 0.0
    if n > 2:
        w[:, :, n // 2] = 0.0
    if T > 1:
        w[0, :, n - 1] = 0.0
    w /= max(1.0, float(w.sum(-1).max()))
    return f, w


# (T, n, B, d): random shapes; d >= 8 runs the unrolled dot product, its tail d % 8 too; the last
# ones exceed the 32768 units of work above which the OpenMP loops run in parallel
MANY_SHAPES = [(1, 1, 1, 1), (1, 5, 3, 8), (2, 2, 17, 9), (2, 16, 5, 3), (3, 5, 64, 17), (5, 7, 2, 40),
               (8, 8, 9, 1), (4, 3, 33, 0), (2, 16, 300, 8), (3, 8, 128, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skip_zero", [True, False])
@pytest.mark.parametrize("T,n,B,d", MANY_SHAPES)
def test_mix_experts_many(T, n, B, d, skip_zero, dtype):
    rng = rng_for("mixmany", T, n, B, d, skip_zero)
    f, w = draw_mix_many(rng, T, n, B, d)
    f, w = f.astype(dtype), w.astype(dtype)
    y = F.mix_experts_many(f, w, skip_zero=skip_zero)
    want = ref.mix_experts_many(f64(f), f64(w))
    scale = ref.mix_experts_many(np.abs(f64(f)), np.abs(f64(w))) + 1e-3
    assert_close(y, want, dtype, scale=scale)
    out = np.full((T, B, d), np.nan, dtype=dtype)
    assert F.mix_experts_many(f, w, skip_zero=skip_zero, out=out) is out
    assert_close(out, want, dtype, scale=scale)

    # the backward against the reference's full gradient (float32 here; float64 finite
    # differences in test_gradients.py): with skip_zero, an expert no task uses gets dw = 0
    dy = rng.normal(size=(T, B, d)).astype(dtype)
    dw, df = F.mix_experts_many_backward(dy, f, w, skip_zero=skip_zero)
    dw_ref, df_ref = ref.mix_experts_many_backward(f64(dy), f64(f), f64(w))
    dw_scale, df_scale = ref.mix_experts_many_backward(np.abs(f64(dy)), np.abs(f64(f)), np.abs(f64(w)))
    if skip_zero:
        unused = ~np.any(w != 0, axis=(0, 1))
        dw_ref[:, :, unused] = 0.0
    assert_close(dw, dw_ref, dtype, scale=dw_scale + 1e-3)
    assert_close(df, df_ref, dtype, scale=df_scale + 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,p,o", [(1, 1, 1), (1, 5, 3), (17, 4, 8), (64, 9, 28), (33, 31, 7)])
def test_linear(B, p, o, bias, dtype):
    rng = rng_for("linear", B, p, o, bias)
    x = rng.normal(size=(B, p)).astype(dtype)
    W = rng.normal(size=(o, p)).astype(dtype)
    b = rng.normal(size=o).astype(dtype) if bias else None
    want = np.zeros((B, o))
    scale = np.zeros((B, o))
    for i in range(B):  # explicit y_i = W x_i + b
        for j in range(o):
            terms = f64(W[j]) * f64(x[i])
            want[i, j] = terms.sum() + (float(b[j]) if bias else 0.0)
            scale[i, j] = np.abs(terms).sum() + (abs(float(b[j])) if bias else 0.0)
    assert_close(F.linear(x, W, b), want, dtype, scale=scale + 1.0)
    out = np.empty((B, o), dtype=dtype)
    F.linear(x, W, b, out=out)
    assert_close(out, want, dtype, scale=scale + 1.0)


# --------------------------------------------------------------------------------------------
# large inputs: the kernels' OpenMP loops only run in parallel above 32768 units of work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_inputs_parallel_path(dtype):
    rng = rng_for("large")
    n, k, m, gamma = 128, 4, 7, 1.0
    B = 300  # B k n = 153600
    alpha, Z = draw_alpha_Z(rng, (B,), k, m, gamma)
    alpha, Z = alpha.astype(dtype), Z.astype(dtype)
    w, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    assert_close(w, ref.dselect_k(f64(alpha), f64(Z), n, gamma), dtype)
    r_ref = ref.selector(ref.smooth_step(f64(Z), gamma), n)
    assert_close(cache.r, r_ref, dtype)
    omega, penalty = F.dselect_k_regularization(cache)
    assert_scalar_close(omega, ref.selector_entropy(r_ref), dtype)
    assert_scalar_close(penalty, ref.selector_mass_penalty(r_ref), dtype)

    t = rng.uniform(-1.0, 1.0, size=40000).astype(dtype)
    assert_close(F.smooth_step(t, gamma), ref.smooth_step(f64(t), gamma), dtype)
    s = rng.uniform(size=(300, m)).astype(dtype)
    assert_close(F.selector(s, n), ref.selector(f64(s), n), dtype)

    logits = rng.normal(0.0, 2.0, size=(300, n)).astype(dtype)
    assert_close(F.softmax(logits), ref.softmax(f64(logits)), dtype)
    assert_close(F.top_k(logits, 4), ref.top_k(f64(logits), 4), dtype)
    raw, normal = rng.normal(size=(2, 300, n)).astype(dtype)
    assert_close(F.noisy_logits(logits, raw, normal), ref.noisy_logits(f64(logits), f64(raw), f64(normal)), dtype)

    beta = rng.normal(size=(100, k, n)).astype(dtype)
    ws, cache_s = F.softmax_selector_forward(alpha[:100], beta, 0.5)
    ws_ref, P_ref = ref.softmax_selector(f64(alpha[:100]), f64(beta), 0.5)
    assert_close(ws, ws_ref, dtype)
    assert_scalar_close(F.softmax_selector_entropy(cache_s), ref.softmax_selector_entropy(P_ref), dtype)

    for layout in ("nbd", "bnd"):
        f = rng.normal(size=(16, 300, 8) if layout == "nbd" else (300, 16, 8)).astype(dtype)
        for wm in (w[:, :16].copy(), w[0, :16].copy()):
            scale = ref.mix_experts(np.abs(f64(f)), np.abs(f64(wm)), layout) + 1e-3
            assert_close(F.mix_experts(f, wm, layout=layout), ref.mix_experts(f64(f), f64(wm), layout), dtype, scale=scale)
