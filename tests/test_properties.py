"""Properties of the gates stated in the paper (Hazimeh et al. 2021, Sections 2-3, Appendix B.2, C.2)
and in the package's documented contract, checked directly on the kernels' outputs."""
import zlib

import numpy as np
import pytest

import reference as ref
from dselectk import functional as F

GAMMAS = [0.5, 1.0, 10.0]
NS = [2, 3, 4, 5, 7, 8, 9, 16, 128]
POW2 = [2, 4, 8, 16, 128]
NOT_POW2 = [3, 5, 7, 9, 100]
NK = [(n, k) for n in NS for k in (1, 2, 4) if k <= n]


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def draw_Z(rng, shape, gamma, where):
    if where == "fractional":
        return rng.uniform(-0.5 * gamma, 0.5 * gamma, size=shape)
    if where == "wide":  # inside and outside the fractional region
        return rng.normal(0.0, gamma, size=shape)
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.5 * gamma, 1e3 * gamma, size=shape)  # "far"


# --------------------------------------------------------------------------------------------
# (a) the DSelect-k weights are on the simplex (n a power of two); sum <= 1 otherwise
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["fractional", "wide", "far"])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", [(n, k) for n in POW2 for k in (1, 2, 4) if k <= n])
def test_dselect_k_on_simplex(n, k, gamma, where):
    rng = rng_for("simplex", n, k, gamma, where)
    m = ref.n_bits(n)
    B = 32
    alpha = rng.normal(0.0, 10.0, size=(B, k))
    Z = draw_Z(rng, (B, k, m), gamma, where)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-6)):
        a, z = alpha.astype(dtype), Z.astype(dtype)
        w = F.dselect_k(a, z, n, gamma)
        assert w.shape == (B, n)
        assert np.all(w >= 0), w.min()
        np.testing.assert_allclose(w.astype(np.float64).sum(axis=1), 1.0, rtol=0, atol=tol)
        ws = F.dselect_k(a[0], z[0], n, gamma)  # static gate
        assert np.all(ws >= 0)
        assert abs(float(ws.astype(np.float64).sum()) - 1.0) <= tol


@pytest.mark.parametrize("where", ["fractional", "wide", "far"])
@pytest.mark.parametrize("n,k", [(n, k) for n in NOT_POW2 for k in (1, 2, 4) if k <= n])
def test_dselect_k_mass_at_most_one(n, k, where):
    rng = rng_for("mass", n, k, where)
    m = ref.n_bits(n)
    alpha = rng.normal(0.0, 5.0, size=(32, k))
    Z = draw_Z(rng, (32, k, m), 1.0, where)
    w = F.dselect_k(alpha, Z, n, 1.0)
    assert np.all(w >= 0)
    assert np.all(w.sum(axis=1) <= 1.0 + 1e-12)
    # and some mass really is lost to the codes n .. 2^m - 1 (Appendix B.2)
    assert w.sum(axis=1).min() < 1.0 - 1e-3


# --------------------------------------------------------------------------------------------
# (b) binary S(Z): at most k nonzeros, exactly at the experts encoded by the rows of S(Z)
# --------------------------------------------------------------------------------------------


def binary_Z(rng, codes, m, gamma):
    """Z whose row i encodes codes[..., i] (LSB first) with |Z| >= gamma/2 (some exactly gamma/2)."""
    bits = (codes[..., None] >> np.arange(m)) & 1
    mag = gamma / 2 + rng.uniform(0.0, 3.0 * gamma, size=bits.shape)
    mag[rng.uniform(size=bits.shape) < 0.25] = gamma / 2  # exactly on the boundary
    return np.where(bits == 1, mag, -mag)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
def test_binary_S_selects_encoded_experts(n, k, gamma):
    rng = rng_for("binary", n, k, gamma)
    m = ref.n_bits(n)
    B = 16
    codes = rng.integers(0, n, size=(B, k))  # valid codes (< n); repeats allowed
    Z = binary_Z(rng, codes, m, gamma)
    alpha = rng.normal(0.0, 2.0, size=(B, k))
    for static in (False, True):
        a, z = (alpha[0], Z[0]) if static else (alpha, Z)
        w, cache = F.dselect_k_forward(a, z, n, gamma)
        w2 = w.reshape(-1, n)
        assert set(np.unique(cache.sz)) <= {0.0, 1.0}
        for b in range(w2.shape[0]):
            c = codes[b]
            sigma = np.exp(alpha[b] - alpha[b].max())
            sigma /= sigma.sum()
            assert np.count_nonzero(w2[b]) <= k
            assert set(np.flatnonzero(w2[b])) == set(c.tolist())
            want = np.zeros(n)
            np.add.at(want, c, sigma)
            np.testing.assert_allclose(w2[b], want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n,k", [(3, 2), (5, 4), (7, 2), (9, 4), (100, 4)])
def test_binary_S_with_unused_codes(n, k):
    """n not a power of two: a selector whose binary code is >= n selects no expert (its weight is
    lost, Appendix B.2); the others select the experts they encode."""
    rng = rng_for("unused", n, k)
    m = ref.n_bits(n)
    gamma = 1.0
    codes = rng.integers(0, n, size=k)
    codes[0] = rng.integers(n, 2**m)  # an unused code
    Z = binary_Z(rng, codes, m, gamma)
    alpha = rng.normal(size=k)
    w = F.dselect_k(alpha, Z, n, gamma)
    sigma = np.exp(alpha - alpha.max())
    sigma /= sigma.sum()
    valid = codes < n
    assert set(np.flatnonzero(w)) == set(codes[valid].tolist())
    np.testing.assert_allclose(w.sum(), sigma[valid].sum(), rtol=1e-12)
    assert w.sum() < 1.0


# --------------------------------------------------------------------------------------------
# (c) the smooth-step is C^1 at +-gamma/2 and monotone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_smooth_step_boundary_values(gamma, dtype):
    t = np.array([-2 * gamma, -gamma / 2, 0.0, gamma / 2, 2 * gamma], dtype=dtype)
    s = F.smooth_step(t, gamma)
    assert s.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    ds = F.smooth_step_backward(np.ones_like(t), t, gamma)
    assert ds[[0, 1, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(ds[2], 3.0 / (2.0 * gamma), rtol=1e-6)  # S'(0) = 3 / (2 gamma)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_smooth_step_one_sided_slopes_vanish(gamma):
    half = gamma / 2
    s_hi, s_lo = F.smooth_step(np.array([half, -half]), gamma)
    prev = np.inf
    for delta in (1e-2 * gamma, 1e-3 * gamma, 1e-4 * gamma, 1e-5 * gamma):
        inside = F.smooth_step(np.array([half - delta, -half + delta]), gamma)
        outside = F.smooth_step(np.array([half + delta, -half - delta]), gamma)
        left_slope = (s_hi - inside[0]) / delta  # at +gamma/2, from inside
        right_slope = (inside[1] - s_lo) / delta  # at -gamma/2, from inside
        # mean of S' over [gamma/2 - delta, gamma/2] is 3 delta / gamma^2 - 2 delta^2 / gamma^3
        bound = 3.0 * delta / gamma**2 * 1.001 + 1e-9
        for slope in (left_slope, right_slope):
            assert 0.0 <= slope <= bound, (delta, slope, bound)
        assert max(left_slope, right_slope) < prev
        prev = max(left_slope, right_slope)
        # outside: S is constant, both one-sided slopes are exactly 0
        assert (outside[0] - s_hi) == 0.0 and (s_lo - outside[1]) == 0.0


@pytest.mark.parametrize("gamma", GAMMAS)
def test_smooth_step_derivative_continuous(gamma):
    half = gamma / 2
    for delta in (1e-2 * gamma, 1e-4 * gamma, 1e-6 * gamma):
        t = np.array([half - delta, half, half + delta, -half - delta, -half, -half + delta])
        d = F.smooth_step_backward(np.ones_like(t), t, gamma)
        # S'(gamma/2 - delta) = 6 delta / gamma^2 - 6 delta^2 / gamma^3 -> 0, S' = 0 outside
        expect_inside = 6 * delta / gamma**2 - 6 * delta**2 / gamma**3
        np.testing.assert_allclose(d[[0, 5]], expect_inside, rtol=1e-6)
        assert d[[1, 2, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert abs(d[0] - d[2]) <= 6.001 * delta / gamma**2
        assert abs(d[5] - d[3]) <= 6.001 * delta / gamma**2


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_smooth_step_monotone_and_bounded(gamma, dtype):
    t = np.linspace(-gamma, gamma, 40001).astype(dtype)
    s = F.smooth_step(t, gamma)
    assert np.all(np.diff(s) >= 0)
    assert s.min() == 0.0 and s.max() == 1.0
    assert np.all((s >= 0) & (s <= 1))
    # strictly increasing inside the fractional region
    inner = s[np.abs(t) < 0.45 * gamma]
    assert np.all(np.diff(inner.astype(np.float64)) >= 0) and inner[-1] > inner[0]
    # symmetry S(-t) = 1 - S(t)
    t64 = np.linspace(-gamma, gamma, 1001)
    np.testing.assert_allclose(F.smooth_step(-t64, gamma), 1.0 - F.smooth_step(t64, gamma), atol=1e-15)


# --------------------------------------------------------------------------------------------
# (d) no gradient reaches a binary entry of S(Z) (Section 3.1.3, "Initialization")
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("static", [True, False], ids=["static", "per_example"])
def test_zero_gradient_at_binary_entries(static, n, k, gamma):
    rng = rng_for("binary_grad", n, k, gamma, static)
    m = ref.n_bits(n)
    lead = () if static else (int(rng.integers(1, 33)),)
    shape = lead + (k, m)
    Z = rng.uniform(-0.45 * gamma, 0.45 * gamma, size=shape)
    binary = rng.uniform(size=shape) < 0.5
    binary.reshape(-1)[0] = True
    if Z.size > 1:
        binary.reshape(-1)[-1] = False
    mag = gamma / 2 + rng.uniform(0.0, 2.0 * gamma, size=shape)
    mag[rng.uniform(size=shape) < 0.3] = gamma / 2
    Z[binary] = (rng.choice([-1.0, 1.0], size=shape) * mag)[binary]
    alpha = rng.normal(size=lead + (k,))
    for dtype in (np.float64, np.float32):
        w, cache = F.dselect_k_forward(alpha.astype(dtype), Z.astype(dtype), n, gamma)
        assert np.all((cache.sz[binary.reshape(cache.sz.shape)] == 0) | (cache.sz[binary.reshape(cache.sz.shape)] == 1))
        dw = rng.normal(size=w.shape).astype(dtype)
        for dw_arg in (dw, None):
            dalpha, dZ = F.dselect_k_backward(dw_arg, cache, lam=0.8, xi=0.6)
            assert np.all(np.isfinite(dZ)) and np.all(np.isfinite(dalpha))
            assert np.all(dZ[binary] == 0.0), dZ[binary]
            if Z.size > 1:
                assert np.any(dZ[~binary] != 0.0)


@pytest.mark.parametrize("n,k", [(2, 2), (5, 4), (8, 4), (128, 4)])
def test_all_binary_gate_is_frozen_in_Z(n, k):
    """Once S(Z) is binary, Z gets no gradient at all (while alpha still does)."""
    rng = rng_for("frozen", n, k)
    m = ref.n_bits(n)
    codes = rng.permutation(n)[:k]
    Z = binary_Z(rng, codes, m, 1.0)
    alpha = rng.normal(size=k)
    w, cache = F.dselect_k_forward(alpha, Z, n, 1.0)
    dalpha, dZ = F.dselect_k_backward(rng.normal(size=n), cache, lam=1.0, xi=1.0)
    assert np.all(dZ == 0.0)
    assert np.any(dalpha != 0.0)


# --------------------------------------------------------------------------------------------
# (e) Top-k
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(n, k) for n in (1, 2, 3, 5, 8, 16, 128) for k in (1, 2, 4) if k <= n])
def test_top_k_properties(n, k):
    rng = rng_for("topk_prop", n, k)
    B = 40
    logits = rng.normal(0.0, 2.0, size=(B, n))
    w = F.top_k(logits, k)
    assert np.all(np.count_nonzero(w, axis=1) == k)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    for b in range(B):
        largest = set(np.argsort(-logits[b])[:k].tolist())
        assert set(np.flatnonzero(w[b]).tolist()) == largest
    dw = rng.normal(size=(B, n))
    dl = F.top_k_backward(dw, w)
    assert np.all(dl[w == 0] == 0.0)
    if k > 1:
        assert np.any(dl[w != 0] != 0.0)
    # static form
    ws = F.top_k(logits[0], k)
    assert np.count_nonzero(ws) == k and abs(ws.sum() - 1.0) <= 1e-12


@pytest.mark.parametrize("n,k", [(4, 1), (4, 2), (8, 4), (16, 4)])
def test_top_k_ties_go_to_lower_index(n, k):
    w = F.top_k(np.zeros(n), k)
    np.testing.assert_array_equal(np.flatnonzero(w), np.arange(k))
    np.testing.assert_allclose(w[:k], 1.0 / k, rtol=1e-15)
    logits = np.array([1.0, 3.0, 3.0, 2.0] + [3.0] * (n - 4))
    w = F.top_k(logits, k)
    want = ([1, 2] + list(range(4, n)))[:k]
    np.testing.assert_array_equal(np.flatnonzero(w), sorted(want))


# --------------------------------------------------------------------------------------------
# (f) the Appendix C.2 ablation gate is on the simplex
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1e-16, 1e-6, 0.1, 1.0, 50.0])
@pytest.mark.parametrize("n,k", [(2, 1), (3, 2), (16, 4), (128, 4)])
def test_softmax_selector_on_simplex(n, k, T):
    rng = rng_for("softsel_prop", n, k, T)
    B = 8
    alpha = rng.normal(0.0, 5.0, size=(B, k))
    beta = rng.normal(0.0, 20.0, size=(B, k, n))
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-6)):
        w, cache = F.softmax_selector_forward(alpha.astype(dtype), beta.astype(dtype), T)
        assert np.all(np.isfinite(w)) and np.all(w >= 0)
        np.testing.assert_allclose(w.astype(np.float64).sum(axis=1), 1.0, rtol=0, atol=tol)
        if T <= 1e-6:  # the annealing limit: each selector is one-hot at the argmax of beta^(i)
            P = cache.P.reshape(B, k, n)
            np.testing.assert_array_equal(np.argmax(P, axis=-1), np.argmax(beta.astype(dtype), axis=-1))
            assert np.all(P.max(axis=-1) == 1.0)
        ws, _ = F.softmax_selector_forward(alpha[0].astype(dtype), beta[0].astype(dtype), T)
        assert np.all(ws >= 0) and abs(float(ws.astype(np.float64).sum()) - 1.0) <= tol


# --------------------------------------------------------------------------------------------
# (g) mix_experts with skip_zero never depends on a skipped expert
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("per_example", [False, True], ids=["static_w", "per_example_w"])
@pytest.mark.parametrize("layout", ["nbd", "bnd"])
@pytest.mark.parametrize("n", [2, 5, 16])
def test_mix_experts_skip_zero(n, layout, per_example, dtype):
    rng = rng_for("skip", n, layout, per_example)
    B, d = 6, 3
    f = rng.normal(size=(n, B, d) if layout == "nbd" else (B, n, d)).astype(dtype)
    w = rng.uniform(0.1, 1.0, size=(B, n) if per_example else (n,)).astype(dtype)
    skipped = sorted(rng.choice(n, size=max(1, n // 3), replace=False).tolist())
    w[..., skipped] = 0.0
    if per_example:
        w[0, [j for j in range(n) if j not in skipped][0]] = 0.0  # a zero in an active column
    dy = rng.normal(size=(B, d)).astype(dtype)

    def sl(j):
        return (j,) if layout == "nbd" else (slice(None), j)

    y_skip = F.mix_experts(f, w, layout=layout, skip_zero=True)
    y_full = F.mix_experts(f, w, layout=layout, skip_zero=False)
    np.testing.assert_allclose(y_skip, y_full, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=0)
    dw_skip, df_skip = F.mix_experts_backward(dy, f, w, layout=layout, skip_zero=True)
    dw_full, df_full = F.mix_experts_backward(dy, f, w, layout=layout, skip_zero=False)
    active = [j for j in range(n) if j not in skipped]
    for j in active:
        np.testing.assert_array_equal(df_skip[sl(j)], df_full[sl(j)])
        np.testing.assert_array_equal(dw_skip[..., j], dw_full[..., j])
    # the true gradient dw_j = <dy, f_j> of a skipped expert is nonzero: skip_zero reports 0 there
    for j in skipped:
        assert np.all(df_skip[sl(j)] == 0.0) and np.all(dw_skip[..., j] == 0.0)
        assert np.any(dw_full[..., j] != 0.0)

    # change the skipped experts' outputs arbitrarily: nothing changes
    f2 = f.copy()
    for j in skipped:
        huge = 1e300 if dtype == np.float64 else 1e38  # finite (the binding rejects NaN / Inf)
        f2[sl(j)] = (rng.uniform(-1.0, 1.0, size=f2[sl(j)].shape) * huge).astype(dtype)
    np.testing.assert_array_equal(F.mix_experts(f2, w, layout=layout, skip_zero=True), y_skip)
    dw2, df2 = F.mix_experts_backward(dy, f2, w, layout=layout, skip_zero=True)
    np.testing.assert_array_equal(dw2, dw_skip)
    np.testing.assert_array_equal(df2, df_skip)


# --------------------------------------------------------------------------------------------
# (h) inputs are never modified
# --------------------------------------------------------------------------------------------


def _snapshot(objs):
    return [np.array(o, copy=True) for o in objs]


def _unchanged(objs, copies):
    for o, c in zip(objs, copies):
        assert o.dtype == c.dtype and o.shape == c.shape
        np.testing.assert_array_equal(o, c)


def _calls(rng, dtype, noncontig):
    """(name, function, args, kwargs) for every public function, on fresh random inputs."""

    def arr(*shape, lo=None, hi=None, scale=1.0):
        a = rng.uniform(lo, hi, size=shape) if lo is not None else rng.normal(0.0, scale, size=shape)
        a = a.astype(dtype)
        if noncontig and a.ndim >= 1:
            big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=dtype)
            big[..., ::2] = a
            a = big[..., ::2]
            assert not a.flags.c_contiguous or a.size <= 1
        return a

    n, k, m, B, p, d = 5, 2, 3, 4, 3, 2
    gamma = 1.0
    alpha, Z = arr(B, k), arr(B, k, m, scale=0.4)
    w_dsk, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    ws_dsk, cache_s = F.dselect_k_forward(arr(k), arr(k, m, scale=0.4), n, gamma)
    x, G, b_G, W, b_W = arr(B, p), arr(k, p), arr(k), arr(k, m, p, scale=0.2), arr(k, m, scale=0.2)
    _, cache_pe = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n, gamma)
    beta = arr(B, k, n)
    _, cache_sel = F.softmax_selector_forward(alpha, beta, 0.5)
    logits = arr(B, n)
    f_nbd, f_bnd, w_mix = arr(n, B, d), arr(B, n, d), arr(B, n, lo=0.0, hi=1.0)
    w_mix[:, 1] = 0.0
    return [
        ("smooth_step", F.smooth_step, (arr(3, 4),), {"gamma": gamma}),
        ("smooth_step_backward", F.smooth_step_backward, (arr(3, 4), arr(3, 4, scale=0.3)), {"gamma": gamma}),
        ("selector", F.selector, (arr(B, m, lo=0.0, hi=1.0), n), {}),
        ("selector_backward", F.selector_backward, (arr(B, n), arr(B, m, lo=0.0, hi=1.0), n), {}),
        ("dselect_k", F.dselect_k, (alpha, Z, n, gamma), {}),
        ("dselect_k_forward", F.dselect_k_forward, (arr(k), arr(k, m), n, gamma), {}),
        ("dselect_k_backward", F.dselect_k_backward, (arr(B, n), cache), {"lam": 0.5, "xi": 0.5}),
        ("dselect_k_backward_static", F.dselect_k_backward, (arr(n), cache_s), {"lam": 0.5, "xi": 0.5}),
        ("dselect_k_regularization", F.dselect_k_regularization, (cache,), {}),
        ("dselect_k_per_example_forward", F.dselect_k_per_example_forward, (x, G, b_G, W, b_W, n, gamma), {}),
        ("dselect_k_per_example_backward", F.dselect_k_per_example_backward, (arr(B, n), cache_pe),
         {"lam": 0.5, "xi": 0.5}),
        ("softmax", F.softmax, (logits,), {}),
        ("softmax_backward", F.softmax_backward, (arr(B, n), F.softmax(logits)), {}),
        ("top_k", F.top_k, (logits, 2), {}),
        ("top_k_backward", F.top_k_backward, (arr(B, n), F.top_k(logits, 2)), {}),
        ("noisy_logits", F.noisy_logits, (arr(B, n), arr(B, n), arr(B, n)), {}),
        ("noisy_logits_backward", F.noisy_logits_backward, (arr(B, n), arr(B, n), arr(B, n)), {}),
        ("softmax_selector_forward", F.softmax_selector_forward, (alpha, beta, 0.5), {}),
        ("softmax_selector_backward", F.softmax_selector_backward, (arr(B, n), cache_sel), {"lam": 0.3}),
        ("softmax_selector_entropy", F.softmax_selector_entropy, (cache_sel,), {}),
        ("mix_experts_nbd", F.mix_experts, (f_nbd, w_mix), {"layout": "nbd"}),
        ("mix_experts_bnd", F.mix_experts, (f_bnd, w_mix[0]), {"layout": "bnd"}),
        ("mix_experts_backward", F.mix_experts_backward, (arr(B, d), f_nbd, w_mix), {"layout": "nbd"}),
        ("mix_experts_backward_full", F.mix_experts_backward, (arr(B, d), f_bnd, w_mix[0]),
         {"layout": "bnd", "skip_zero": False}),
        ("linear", F.linear, (x, G, b_G), {}),
        ("linear_backward", F.linear_backward, (arr(B, k), x, G), {}),
    ]


GATE_FUNCTIONS = {
    "smooth_step", "smooth_step_backward", "selector", "selector_backward", "dselect_k",
    "dselect_k_forward", "dselect_k_backward", "dselect_k_regularization",
    "dselect_k_per_example_forward", "dselect_k_per_example_backward", "softmax", "softmax_backward",
    "top_k", "top_k_backward", "noisy_logits", "noisy_logits_backward", "softmax_selector_forward",
    "softmax_selector_backward", "softmax_selector_entropy", "mix_experts", "mix_experts_backward",
    "linear", "linear_backward",
}


def _arrays_in(args):
    """Every ndarray among the arguments, including the fields of cache named tuples."""
    out = []
    for a in args:
        if isinstance(a, np.ndarray):
            out.append(a)
        elif isinstance(a, tuple):
            out.extend(_arrays_in(a))
    return out


@pytest.mark.parametrize("noncontig", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inputs_never_modified(dtype, noncontig):
    rng = rng_for("inputs", np.dtype(dtype).name, noncontig)
    calls = _calls(rng, dtype, noncontig)
    covered = {c[0].split("_nbd")[0].split("_bnd")[0].split("_static")[0].split("_full")[0] for c in calls}
    assert covered >= GATE_FUNCTIONS, GATE_FUNCTIONS - covered
    for name, fn, args, kwargs in calls:
        arrays = _arrays_in(args)
        copies = _snapshot(arrays)
        fn(*args, **kwargs)
        try:
            _unchanged(arrays, copies)
        except AssertionError as e:
            raise AssertionError(f"{name} modified an input: {e}") from None


def test_out_argument_is_the_only_thing_written():
    rng = rng_for("out")
    t = rng.normal(size=(3, 5))
    t0 = t.copy()
    out = np.empty_like(t)
    res = F.smooth_step(t, 1.0, out=out)
    np.testing.assert_array_equal(t, t0)
    np.testing.assert_allclose(out, ref.smooth_step(t, 1.0), rtol=1e-14, atol=1e-15)
    assert res is out or np.shares_memory(res, out)


# --------------------------------------------------------------------------------------------
# the kernels release the GIL: concurrent calls from several threads give the right results
# --------------------------------------------------------------------------------------------


def test_concurrent_calls_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    rng = rng_for("threads")
    n, k, gamma = 16, 4, 1.0
    jobs = []
    for _ in range(8):
        B = int(rng.integers(50, 200))
        jobs.append((rng.normal(size=(B, k)), rng.normal(0.0, 0.4, size=(B, k, ref.n_bits(n)))))
    want = [ref.dselect_k(a, Z, n, gamma) for a, Z in jobs]

    def run(job):
        a, Z = job
        return [F.dselect_k(a, Z, n, gamma) for _ in range(5)]

    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(run, jobs))
    for got_list, w in zip(results, want):
        for got in got_list:
            np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-12)
