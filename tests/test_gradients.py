"""Every backward of ``dselectk.functional`` against float64 central finite differences of the
plain-NumPy reference (reference.numerical_gradient, h = 1e-6).

Tolerance: |analytic - numeric| <= 1e-6 * max(1, |analytic|), entry by entry. Smooth-step inputs are
drawn inside the fractional region with a margin (|Z| <= 0.45 gamma), so that Z +- h never crosses
+-gamma/2, where S'' jumps. For large arrays a random subset of entries is differenced (the others
are covered by the other cases) so the suite stays fast.
"""
import zlib

import numpy as np
import pytest

import reference as ref
from dselectk import functional as F

H = 1e-6
TOL = 1e-6
GAMMAS = [0.5, 1.0, 10.0]
NS = [2, 3, 4, 5, 7, 8, 16, 128]
NK = [(n, k) for n in NS for k in (1, 2, 4) if k <= n]
MAX_ENTRIES = 30  # per array, for the big ones


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def fractional(rng, shape, gamma, frac=0.45):
    """Values strictly inside the fractional region: |t| <= frac * gamma < gamma / 2 - margin."""
    return rng.uniform(-frac * gamma, frac * gamma, size=shape)


def fd_check(f, x, analytic, rng, name="", max_entries=MAX_ENTRIES, h=H, tol=TOL):
    """Compare `analytic` (the kernel's gradient w.r.t. x) with central differences of f() w.r.t. x,
    on all entries of x or on a random subset of max_entries of them. f() reads x in place."""
    assert analytic is not None, f"{name}: no gradient returned"
    analytic = np.asarray(analytic)
    assert analytic.shape == x.shape, f"{name}: gradient shape {analytic.shape}, expected {x.shape}"
    assert analytic.dtype == x.dtype, f"{name}: gradient dtype {analytic.dtype}, expected {x.dtype}"
    assert x.flags.c_contiguous
    if max_entries is None or x.size <= max_entries:
        idx = np.arange(x.size)
        numeric = ref.numerical_gradient(f, x, h).reshape(-1)
    else:
        idx = np.sort(rng.choice(x.size, size=max_entries, replace=False))
        flat = x.reshape(-1)  # a view: writing it writes x
        original = flat[idx].copy()
        sub = original.copy()

        def f_sub():
            flat[idx] = sub
            try:
                return f()
            finally:
                flat[idx] = original

        numeric = ref.numerical_gradient(f_sub, sub, h)
    got = analytic.reshape(-1)[idx].astype(np.float64)
    err = np.abs(got - numeric)
    bad = err > tol * np.maximum(1.0, np.abs(got))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = np.unravel_index(idx[i], x.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{len(idx)} checked entries differ from finite differences; "
            f"first at {where}: analytic {got[i]!r}, numeric {numeric[i]!r}"
        )
    return numeric, idx


# --------------------------------------------------------------------------------------------
# smooth-step, selector
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("shape", [(1,), (23,), (4, 6), (2, 3, 5)])
def test_smooth_step_backward(shape, gamma):
    rng = rng_for("ssb", shape, gamma)
    t = fractional(rng, shape, gamma)
    # some entries well outside the fractional region, where S' = 0
    outside = rng.uniform(size=shape) < 0.3
    t[outside] = np.sign(t[outside] + 1e-300) * rng.uniform(0.55 * gamma, 3 * gamma, size=int(outside.sum()))
    dout = rng.normal(size=shape)
    dt = F.smooth_step_backward(dout, t, gamma)
    fd_check(lambda: np.sum(dout * ref.smooth_step(t, gamma)), t, dt, rng, "dt")
    # and the closed form S'(t) of the reference
    np.testing.assert_allclose(dt, dout * ref.smooth_step_derivative(t, gamma), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("lead", [(1,), (9,), (2, 3)])
def test_selector_backward(n, lead):
    rng = rng_for("selb", n, lead)
    m = ref.n_bits(n)
    s = rng.uniform(0.0, 1.0, size=lead + (m,))
    # exact 0 / 1 entries (r is a polynomial in s, so differences across them are fine)
    s[rng.uniform(size=s.shape) < 0.2] = 0.0
    s[rng.uniform(size=s.shape) < 0.2] = 1.0
    dr = rng.normal(size=lead + (n,))
    ds = F.selector_backward(dr, s, n)
    fd_check(lambda: np.sum(dr * ref.selector(s, n)), s, ds, rng, "ds")


# --------------------------------------------------------------------------------------------
# DSelect-k
# --------------------------------------------------------------------------------------------


class DSelectKObjective:
    """<dw, w> + lam * Omega + xi * penalty from the reference (batch means for a batch of logits).

    `logits()` returns the current (alpha, Z). The value at the unperturbed point is the batched
    reference's. A central difference perturbs one entry, which changes the logits of one example b
    at most (or of all, for shared parameters): then the objective is that value minus example b's
    unperturbed term plus its perturbed term, where the term of example b is
    <dw_b, w_b> + (lam * Omega_b + xi * penalty_b) / B. Only the changed examples are re-evaluated,
    which keeps central differences on a batch of 64 cheap; when most examples changed, the batched
    reference is called directly."""

    def __init__(self, logits, dw, n, gamma, lam, xi, eps=1e-6):
        self.logits, self.dw, self.n, self.gamma = logits, dw, n, gamma
        self.lam, self.xi, self.eps = lam, xi, eps
        alpha, Z = logits()
        self.static = alpha.ndim == 1
        if not self.static:
            self.B = alpha.shape[0]
            self.a0, self.Z0 = alpha.copy(), Z.copy()
            self.full0 = self._full(alpha, Z)
            self.term0 = {}

    def _full(self, alpha, Z):
        w, omega, penalty = ref.dselect_k_objective_terms(alpha, Z, self.n, self.gamma, self.eps)
        value = self.lam * float(omega) + self.xi * float(penalty)
        if self.dw is not None:
            value += float(np.sum(self.dw * w))
        return value

    def _term(self, alpha, Z, b):
        w, omega, penalty = ref.dselect_k_objective_terms(alpha[b], Z[b], self.n, self.gamma, self.eps)
        value = (self.lam * float(omega) + self.xi * float(penalty)) / self.B
        if self.dw is not None:
            value += float(np.dot(self.dw[b], w))
        return value

    def __call__(self):
        alpha, Z = self.logits()
        if self.static:
            return self._full(alpha, Z)
        changed = np.flatnonzero((alpha != self.a0).any(axis=1) | (Z != self.Z0).reshape(self.B, -1).any(axis=1))
        if len(changed) > max(2, self.B // 4):
            return self._full(alpha, Z)
        value = self.full0
        for b in changed:
            if b not in self.term0:
                self.term0[b] = self._term(self.a0, self.Z0, b)
            value += self._term(alpha, Z, b) - self.term0[b]
        return value


def entries_for(n):
    """Entries differenced per array: all of them up to MAX_ENTRIES, fewer for n = 128 (the reference
    costs milliseconds per evaluation there)."""
    return 5 if n >= 128 else MAX_ENTRIES


def draw_gate(rng, n, k, gamma, static):
    m = ref.n_bits(n)
    lead = () if static else (int(rng.integers(1, 65)),)
    alpha = rng.normal(0.0, 1.5, size=lead + (k,))
    Z = fractional(rng, lead + (k, m), gamma)
    return alpha, Z


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("static", [True, False], ids=["static", "per_example"])
def test_dselect_k_backward(static, n, k, gamma):
    rng = rng_for("dskb", n, k, gamma, static)
    alpha, Z = draw_gate(rng, n, k, gamma, static)
    lam, xi = rng.uniform(0.1, 1.0, size=2)
    w, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    dw = rng.normal(size=w.shape)
    dalpha, dZ = F.dselect_k_backward(dw, cache, lam=lam, xi=xi)
    obj = DSelectKObjective(lambda: (alpha, Z), dw, n, gamma, lam, xi)
    fd_check(obj, alpha, dalpha, rng, "dalpha", max_entries=entries_for(n))
    fd_check(obj, Z, dZ, rng, "dZ", max_entries=entries_for(n))


@pytest.mark.parametrize("n,k,gamma", [(n, k, GAMMAS[i % 3]) for i, (n, k) in enumerate(NK)] + [(16, 4, 10.0), (5, 2, 0.5)])
@pytest.mark.parametrize("static", [True, False], ids=["static", "per_example"])
def test_dselect_k_backward_regularizers_only(static, n, k, gamma):
    """dw=None: the gradient of lam * Omega + xi * penalty alone (dalpha is then 0)."""
    rng = rng_for("dskb_reg", n, k, gamma, static)
    alpha, Z = draw_gate(rng, n, k, gamma, static)
    lam, xi = rng.uniform(0.1, 2.0, size=2)
    _, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    dalpha, dZ = F.dselect_k_backward(None, cache, lam=lam, xi=xi)
    obj = DSelectKObjective(lambda: (alpha, Z), None, n, gamma, lam, xi)
    fd_check(obj, alpha, dalpha, rng, "dalpha", max_entries=entries_for(n))
    fd_check(obj, Z, dZ, rng, "dZ", max_entries=entries_for(n))
    assert np.any(dZ != 0)


@pytest.mark.parametrize("n,k,gamma", [(2, 2, 1.0), (3, 2, 0.5), (5, 4, 10.0), (8, 1, 1.0), (8, 4, 1.0), (16, 3, 0.5)])
@pytest.mark.parametrize("static", [True, False], ids=["static", "per_example"])
def test_dselect_k_backward_per_selector_dw(static, n, k, gamma):
    """dw (k, n) / (B, k, n), one upstream gradient per selector (what per-selector permutations
    of local search pass back): the gradient of sum_i <dw_i, softmax(alpha)_i r_i> + lam Omega +
    xi penalty. With every dw_i equal it is the ordinary backward."""
    rng = rng_for("dskb_sel", n, k, gamma, static)
    alpha, Z = draw_gate(rng, n, k, gamma, static)
    if not static:
        alpha, Z = alpha[:3].copy(), Z[:3].copy()
    lam, xi = rng.uniform(0.1, 1.0, size=2)
    _, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    dw = rng.normal(size=alpha.shape + (n,))
    dalpha, dZ = F.dselect_k_backward(dw, cache, lam=lam, xi=xi)

    def objective():
        r = ref.selector(ref.smooth_step(Z, gamma), n)  # (..., k, n)
        sigma = ref.softmax(alpha)
        reg = lam * ref.selector_entropy(r) + xi * ref.selector_mass_penalty(r)  # batch means
        return float(np.sum(dw * sigma[..., None] * r)) + float(reg)
    fd_check(objective, alpha, dalpha, rng, "dalpha")
    fd_check(objective, Z, dZ, rng, "dZ")
    same = np.broadcast_to(dw[..., :1, :], dw.shape).copy()
    got = F.dselect_k_backward(same, cache, lam=lam, xi=xi)
    want = F.dselect_k_backward(np.ascontiguousarray(same[..., 0, :]), cache, lam=lam, xi=xi)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("eps", [1e-3, 0.05])
@pytest.mark.parametrize("n,k,static", [(3, 2, True), (5, 4, False), (8, 2, False), (9, 4, True)])
def test_dselect_k_backward_eps(n, k, static, eps):
    """The eps of h(r) = -sum r log(r + eps) and of 1 / (eps + mass) is honoured."""
    rng = rng_for("dskb_eps", n, k, static, eps)
    gamma = 1.0
    alpha, Z = draw_gate(rng, n, k, gamma, static)
    _, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    dw = rng.normal(size=(n,) if static else (alpha.shape[0], n))
    dalpha, dZ = F.dselect_k_backward(dw, cache, lam=0.7, xi=0.4, eps=eps)
    obj = DSelectKObjective(lambda: (alpha, Z), dw, n, gamma, 0.7, 0.4, eps=eps)
    fd_check(obj, alpha, dalpha, rng, "dalpha")
    fd_check(obj, Z, dZ, rng, "dZ")


PER_EXAMPLE_CASES = [
    (2, 1, 1.0), (2, 2, 0.5), (3, 2, 10.0), (4, 4, 1.0), (5, 2, 0.5),
    (7, 4, 10.0), (8, 1, 1.0), (16, 4, 0.5), (128, 2, 1.0),
]


@pytest.mark.parametrize("with_dw", [True, False])
@pytest.mark.parametrize("n,k,gamma", PER_EXAMPLE_CASES)
def test_dselect_k_per_example_backward(n, k, gamma, with_dw):
    rng = rng_for("dskpe", n, k, gamma, with_dw)
    m = ref.n_bits(n)
    B = int(rng.integers(1, 65)) if n < 128 else int(rng.integers(1, 17))
    p = int(rng.integers(1, 6))
    x = rng.uniform(-1.0, 1.0, size=(B, p))
    G = rng.normal(size=(k, p))
    b_G = rng.normal(size=k)
    # |Z| <= 0.2 gamma + 0.2 gamma: inside the fractional region with a wide margin
    W = rng.uniform(-0.2 * gamma / p, 0.2 * gamma / p, size=(k, m, p))
    b_W = rng.uniform(-0.2 * gamma, 0.2 * gamma, size=(k, m))
    lam, xi = rng.uniform(0.1, 1.0, size=2)
    w, cache = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n, gamma)
    dw = rng.normal(size=w.shape) if with_dw else None
    grads = F.dselect_k_per_example_backward(dw, cache, lam=lam, xi=xi)
    grads_nodx = F.dselect_k_per_example_backward(dw, cache, lam=lam, xi=xi, need_dx=False)
    assert grads_nodx["x"] is None

    def logits():
        alpha = x @ G.T + b_G
        Z = np.einsum("kmp,bp->bkm", W, x) + b_W
        return alpha, Z

    assert np.abs(logits()[1]).max() < 0.45 * gamma
    obj = DSelectKObjective(logits, dw, n, gamma, lam, xi)
    for name, arr in (("x", x), ("G", G), ("b_G", b_G), ("W", W), ("b_W", b_W)):
        numeric, idx = fd_check(obj, arr, grads[name], rng, name, max_entries=min(12, entries_for(n)))
        if name != "x":
            got = np.asarray(grads_nodx[name]).reshape(-1)[idx]
            bad = np.abs(got - numeric) > TOL * np.maximum(1.0, np.abs(got))
            assert not bad.any(), f"{name} (need_dx=False) differs from finite differences"


# --------------------------------------------------------------------------------------------
# softmax, Top-k, noisy logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 16, 128])
@pytest.mark.parametrize("batched", [False, True])
def test_softmax_backward(n, batched):
    rng = rng_for("smb", n, batched)
    shape = (int(rng.integers(1, 65)), n) if batched else (n,)
    logits = rng.normal(0.0, 2.0, size=shape)
    dw = rng.normal(size=shape)
    dl = F.softmax_backward(dw, ref.softmax(logits))
    fd_check(lambda: np.sum(dw * ref.softmax(logits)), logits, dl, rng, "dlogits")


def distinct_logits(rng, shape):
    """Logits whose values in a row are at least 0.02 apart (no ties within +-h): a random
    permutation of an evenly spaced grid, jittered."""
    n = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=int))
    spacing = min(0.5, 6.0 / n)
    v = np.stack([rng.permutation(n) * spacing for _ in range(rows)])
    v = v + rng.uniform(0.0, spacing - 0.02, size=v.shape) - 0.5 * n * spacing
    return v.reshape(shape)


@pytest.mark.parametrize("n,k", [(n, k) for n in (2, 3, 5, 8, 16, 128) for k in (1, 2, 4) if k <= n])
@pytest.mark.parametrize("batched", [False, True])
def test_top_k_backward(n, k, batched):
    rng = rng_for("tkb", n, k, batched)
    shape = (int(rng.integers(1, 17)), n) if batched else (n,)
    logits = distinct_logits(rng, shape)
    dw = rng.normal(size=shape)
    w = ref.top_k(logits, k)
    dl = F.top_k_backward(dw, w)
    fd_check(lambda: np.sum(dw * ref.top_k(logits, k)), logits, dl, rng, "dlogits")


@pytest.mark.parametrize("shape", [(1,), (31,), (6, 9), (2, 3, 4)])
def test_noisy_logits_backward(shape):
    rng = rng_for("nlb", shape)
    clean = rng.normal(size=shape)
    raw = rng.normal(0.0, 2.0, size=shape)
    normal = rng.normal(size=shape)
    dh = rng.normal(size=shape)
    dclean, draw = F.noisy_logits_backward(dh, raw, normal)

    def f():
        return np.sum(dh * ref.noisy_logits(clean, raw, normal))

    fd_check(f, clean, dclean, rng, "dclean")
    fd_check(f, raw, draw, rng, "draw_noise")


# --------------------------------------------------------------------------------------------
# Ablation gate (Appendix C.2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("with_dw", [True, False])
@pytest.mark.parametrize("static", [True, False], ids=["static", "per_example"])
@pytest.mark.parametrize("n,k", [(2, 1), (2, 2), (3, 2), (5, 4), (8, 2), (16, 4), (128, 2)])
def test_softmax_selector_backward(n, k, static, with_dw, T):
    rng = rng_for("ssel", n, k, static, with_dw, T)
    lead = () if static else (int(rng.integers(1, 33)),)
    alpha = rng.normal(0.0, 1.5, size=lead + (k,))
    beta = rng.normal(0.0, 1.0, size=lead + (k, n))
    lam = float(rng.uniform(0.1, 1.0))
    w, cache = F.softmax_selector_forward(alpha, beta, T)
    dw = rng.normal(size=w.shape) if with_dw else None
    dalpha, dbeta = F.softmax_selector_backward(dw, cache, lam=lam)

    def f():
        w_ref, P_ref = ref.softmax_selector(alpha, beta, T)
        value = lam * float(ref.softmax_selector_entropy(P_ref))
        if dw is not None:
            value += float(np.sum(dw * w_ref))
        return value

    fd_check(f, alpha, dalpha, rng, "dalpha", max_entries=entries_for(n))
    fd_check(f, beta, dbeta, rng, "dbeta", max_entries=entries_for(n))


# --------------------------------------------------------------------------------------------
# mixing the experts, linear maps
# --------------------------------------------------------------------------------------------


def draw_mix(rng, n, layout, per_example):
    B, d = int(rng.integers(1, 65)), int(rng.integers(1, 6))
    f = rng.normal(size=(n, B, d) if layout == "nbd" else (B, n, d))
    w = rng.uniform(0.0, 1.0, size=(B, n) if per_example else (n,))
    dy = rng.normal(size=(B, d))
    return f, w, dy


def expert_slice(layout, j):
    return (j,) if layout == "nbd" else (slice(None), j)


@pytest.mark.parametrize("per_example", [False, True], ids=["static_w", "per_example_w"])
@pytest.mark.parametrize("layout", ["nbd", "bnd"])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 128])
def test_mix_experts_backward(n, layout, per_example):
    rng = rng_for("mixb", n, layout, per_example)
    f, w, dy = draw_mix(rng, n, layout, per_example)
    if per_example:
        w[rng.uniform(size=w.shape) < 0.2] = 0.0  # scattered zeros still get their gradient
    dw, df = F.mix_experts_backward(dy, f, w, layout=layout, skip_zero=False)

    def obj():
        return np.sum(dy * ref.mix_experts(f, w, layout))

    fd_check(obj, f, df, rng, "df")
    fd_check(obj, w, dw, rng, "dw")


@pytest.mark.parametrize("per_example", [False, True], ids=["static_w", "per_example_w"])
@pytest.mark.parametrize("layout", ["nbd", "bnd"])
@pytest.mark.parametrize("n", [2, 5, 16, 128])
def test_mix_experts_backward_skip_zero(n, layout, per_example):
    """skip_zero=True with an all-zero column j0 of w: df_j0 = 0 and dw_j0 = 0 (documented), every
    other entry is the true gradient."""
    rng = rng_for("mixbz", n, layout, per_example)
    f, w, dy = draw_mix(rng, n, layout, per_example)
    j0 = int(rng.integers(0, n))
    w[..., j0] = 0.0
    dw, df = F.mix_experts_backward(dy, f, w, layout=layout, skip_zero=True)
    assert np.all(df[expert_slice(layout, j0)] == 0.0)
    assert np.all(dw[..., j0] == 0.0)

    def obj():
        return np.sum(dy * ref.mix_experts(f, w, layout))

    mask_f = np.ones(f.shape, dtype=bool)
    mask_f[expert_slice(layout, j0)] = False
    mask_w = np.ones(w.shape, dtype=bool)
    mask_w[..., j0] = False
    # differences on all entries of the other experts (f) / of the other columns (w)
    for name, arr, grad, mask in (("df", f, df, mask_f), ("dw", w, dw, mask_w)):
        keep = np.flatnonzero(mask.reshape(-1))
        if len(keep) > MAX_ENTRIES:
            keep = np.sort(rng.choice(keep, size=MAX_ENTRIES, replace=False))
        flat = arr.reshape(-1)
        original = flat[keep].copy()
        sub = original.copy()

        def f_sub():
            flat[keep] = sub
            try:
                return obj()
            finally:
                flat[keep] = original

        numeric = ref.numerical_gradient(f_sub, sub, H)
        got = grad.reshape(-1)[keep]
        bad = np.abs(got - numeric) > TOL * np.maximum(1.0, np.abs(got))
        assert not bad.any(), f"{name}: {int(bad.sum())} entries differ from finite differences"


def draw_mix_many(rng, min_T=1, min_n=1):
    """A random multi-task mixing problem: f (n, B, d), w (T, B, n) with scattered exact zeros,
    dy (T, B, d)."""
    T, n = int(rng.integers(min_T, 9)), int(rng.integers(min_n, 21))
    B, d = int(rng.integers(1, 41)), int(rng.integers(1, 41))
    f = rng.normal(size=(n, B, d))
    w = rng.uniform(0.0, 1.0, size=(T, B, n))
    w[rng.uniform(size=w.shape) < 0.2] = 0.0
    dy = rng.normal(size=(T, B, d))
    return f, w, dy


def fd_check_where(obj, arr, grad, mask, rng, name):
    """fd_check restricted to the entries where mask is True (a random subset of them)."""
    keep = np.flatnonzero(mask.reshape(-1))
    if len(keep) > MAX_ENTRIES:
        keep = np.sort(rng.choice(keep, size=MAX_ENTRIES, replace=False))
    flat = arr.reshape(-1)
    original = flat[keep].copy()
    sub = original.copy()

    def f_sub():
        flat[keep] = sub
        try:
            return obj()
        finally:
            flat[keep] = original

    numeric = ref.numerical_gradient(f_sub, sub, H)
    got = grad.reshape(-1)[keep]
    bad = np.abs(got - numeric) > TOL * np.maximum(1.0, np.abs(got))
    assert not bad.any(), f"{name}: {int(bad.sum())} entries differ from finite differences"


@pytest.mark.parametrize("case", range(16))
def test_mix_experts_many_backward(case):
    """Full gradient (skip_zero=False) of sum_t <dy_t, y_t> on random shapes, scattered zero
    weights included."""
    rng = rng_for("mixmanyb", case)
    f, w, dy = draw_mix_many(rng)
    dw, df = F.mix_experts_many_backward(dy, f, w, skip_zero=False)

    def obj():
        return np.sum(dy * ref.mix_experts_many(f, w))

    fd_check(obj, f, df, rng, "df")
    fd_check(obj, w, dw, rng, "dw")


@pytest.mark.parametrize("case", range(8))
def test_mix_experts_many_backward_skip_zero(case):
    """skip_zero=True with an expert j0 that no task uses and an expert j1 that only task 0 does
    not use: df_j0 = 0 and dw[:, :, j0] = 0 (documented); every other entry is the true gradient,
    dw[0, :, j1] included (j1 is active for the call as a whole)."""
    rng = rng_for("mixmanybz", case)
    f, w, dy = draw_mix_many(rng, min_T=2, min_n=2)
    T, B, n = w.shape
    j0, j1 = rng.choice(n, size=2, replace=False)
    w[:, :, j0] = 0.0
    w[0, :, j1] = 0.0
    w[1:, 0, j1] = 0.5
    dw, df = F.mix_experts_many_backward(dy, f, w, skip_zero=True)
    unused = ~np.any(w != 0, axis=(0, 1))  # j0, and any expert the scattered zeros left unused
    assert unused[j0] and not unused[j1]
    assert np.all(df[unused] == 0.0) and np.all(dw[:, :, unused] == 0.0)
    np.testing.assert_allclose(dw[0, :, j1], np.sum(dy[0] * f[j1], axis=1), rtol=1e-12, atol=1e-12)

    def obj():
        return np.sum(dy * ref.mix_experts_many(f, w))

    mask_f = np.ones(f.shape, dtype=bool)
    mask_f[unused] = False
    mask_w = np.ones(w.shape, dtype=bool)
    mask_w[:, :, unused] = False
    fd_check_where(obj, f, df, mask_f, rng, "df")
    fd_check_where(obj, w, dw, mask_w, rng, "dw")
    mask_j1 = np.broadcast_to(np.arange(n) == j1, w.shape)
    fd_check_where(obj, w, dw, mask_j1, rng, "dw of the expert that task 0 does not use")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(6))
def test_mix_experts_many_backward_equals_per_task_calls(case, dtype):
    """With no expert that is all-zero for one task but not for all: dw is the per-task dw of
    mix_experts_backward stacked, df their df summed (in task order: the same additions, so the
    same bits); an expert that no task uses is skipped by both. An expert that only task 0 does
    not use differs as documented: the per-task call gives it dw = 0 for task 0, the multi-task
    call its true gradient <dy_0, f_j>."""
    rng = rng_for("mixmanyeq", case)
    f, w, dy = draw_mix_many(rng)
    T, B, n = w.shape
    w[:, 0, :] = rng.uniform(0.1, 1.0, size=(T, n))  # every expert used by every task ...
    if n > 1:
        w[:, :, n - 1] = 0.0  # ... but the last one, which no task uses
    f, w, dy = f.astype(dtype), w.astype(dtype), dy.astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-6)

    def per_task(w):
        dws, df_total = [], np.zeros_like(f)
        for t in range(T):
            dw_t, df_t = F.mix_experts_backward(dy[t], f, w[t])
            dws.append(dw_t)
            df_total += df_t
        return np.stack(dws), df_total

    dw, df = F.mix_experts_many_backward(dy, f, w)
    dw_want, df_want = per_task(w)
    assert dw.dtype == df.dtype == dtype
    np.testing.assert_array_equal(df, df_want)
    np.testing.assert_allclose(dw, dw_want, **tol)  # the dot products are summed in another order

    if T > 1 and n > 2:
        w[0, :, 0] = 0.0  # expert 0: unused by task 0 only
        dw, df = F.mix_experts_many_backward(dy, f, w)
        dw_want, df_want = per_task(w)
        np.testing.assert_array_equal(df, df_want)
        assert np.all(dw_want[0, :, 0] == 0.0)
        np.testing.assert_allclose(dw[0, :, 0], np.sum(dy[0].astype(np.float64) * f[0], axis=1), **tol)
        np.testing.assert_allclose(dw[1:], dw_want[1:], **tol)
        np.testing.assert_allclose(dw[0, :, 1:], dw_want[0, :, 1:], **tol)


@pytest.mark.parametrize("B,p,o", [(1, 1, 1), (1, 4, 3), (9, 3, 5), (64, 6, 2), (20, 1, 9)])
def test_linear_backward(B, p, o):
    rng = rng_for("linb", B, p, o)
    x = rng.normal(size=(B, p))
    W = rng.normal(size=(o, p))
    b = rng.normal(size=o)
    dy = rng.normal(size=(B, o))
    dx, dW, db = F.linear_backward(dy, x, W)

    def obj():
        return np.sum(dy * (x @ W.T + b))

    fd_check(obj, x, dx, rng, "dx")
    fd_check(obj, W, dW, rng, "dW")
    fd_check(obj, b, db, rng, "db")
    dx2, dW2, db2 = F.linear_backward(dy, x, W, need_dx=False, need_db=False)
    assert dx2 is None and db2 is None
    fd_check(obj, W, dW2, rng, "dW (need_dx=False, need_db=False)")


# --------------------------------------------------------------------------------------------
# float32 backwards against float64 finite differences of the same values
# --------------------------------------------------------------------------------------------

TOL32 = 1e-4


@pytest.mark.parametrize("static", [True, False], ids=["static", "per_example"])
@pytest.mark.parametrize("n,k,gamma", [(2, 1, 1.0), (5, 2, 0.5), (16, 4, 10.0), (128, 2, 1.0)])
def test_dselect_k_backward_float32(n, k, gamma, static):
    rng = rng_for("dskb32", n, k, gamma, static)
    alpha, Z = draw_gate(rng, n, k, gamma, static)
    alpha, Z = alpha.astype(np.float32), Z.astype(np.float32)
    w, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    dw = rng.normal(size=w.shape).astype(np.float32)
    dalpha, dZ = F.dselect_k_backward(dw, cache, lam=0.5, xi=0.3)
    assert dalpha.dtype == np.float32 and dZ.dtype == np.float32
    a64, Z64, dw64 = (v.astype(np.float64) for v in (alpha, Z, dw))
    obj = DSelectKObjective(lambda: (a64, Z64), dw64, n, gamma, 0.5, 0.3)
    fd_check(obj, a64, dalpha.astype(np.float64), rng, "dalpha", tol=TOL32, max_entries=entries_for(n))
    fd_check(obj, Z64, dZ.astype(np.float64), rng, "dZ", tol=TOL32, max_entries=entries_for(n))


@pytest.mark.parametrize("n", [2, 7, 128])
def test_small_backwards_float32(n):
    rng = rng_for("b32", n)
    m = ref.n_bits(n)
    # selector
    s = rng.uniform(size=(5, m)).astype(np.float32)
    dr = rng.normal(size=(5, n)).astype(np.float32)
    ds = F.selector_backward(dr, s, n)
    s64, dr64 = s.astype(np.float64), dr.astype(np.float64)
    fd_check(lambda: np.sum(dr64 * ref.selector(s64, n)), s64, ds.astype(np.float64), rng, "ds", tol=TOL32)
    # softmax / Top-k
    logits = distinct_logits(rng, (4, n)).astype(np.float32)
    dw = rng.normal(size=(4, n)).astype(np.float32)
    l64, dw64 = logits.astype(np.float64), dw.astype(np.float64)
    dl = F.softmax_backward(dw, F.softmax(logits))
    fd_check(lambda: np.sum(dw64 * ref.softmax(l64)), l64, dl.astype(np.float64), rng, "softmax", tol=TOL32)
    kk = min(2, n)
    dl = F.top_k_backward(dw, F.top_k(logits, kk))
    fd_check(lambda: np.sum(dw64 * ref.top_k(l64, kk)), l64, dl.astype(np.float64), rng, "top_k", tol=TOL32)
    # softmax selector
    alpha = rng.normal(size=(3, 2)).astype(np.float32)
    beta = rng.normal(size=(3, 2, n)).astype(np.float32)
    w, cache = F.softmax_selector_forward(alpha, beta, 0.7)
    dws = rng.normal(size=w.shape).astype(np.float32)
    da, db = F.softmax_selector_backward(dws, cache, lam=0.4)
    a64, b64, dws64 = (v.astype(np.float64) for v in (alpha, beta, dws))

    def fsel():
        w_ref, P_ref = ref.softmax_selector(a64, b64, 0.7)
        return float(np.sum(dws64 * w_ref)) + 0.4 * float(ref.softmax_selector_entropy(P_ref))

    fd_check(fsel, a64, da.astype(np.float64), rng, "dalpha", tol=TOL32)
    fd_check(fsel, b64, db.astype(np.float64), rng, "dbeta", tol=TOL32)


# --------------------------------------------------------------------------------------------
# large inputs: the OpenMP loops of the backwards run in parallel above 32768 units of work
# --------------------------------------------------------------------------------------------


def test_large_backwards_parallel_path():
    rng = rng_for("large_b")
    n, k, gamma = 128, 4, 1.0
    m = ref.n_bits(n)
    B = 100  # B k n m = 358400
    alpha, Z = rng.normal(size=(B, k)), fractional(rng, (B, k, m), gamma)
    w, cache = F.dselect_k_forward(alpha, Z, n, gamma)
    dw = rng.normal(size=w.shape)
    dalpha, dZ = F.dselect_k_backward(dw, cache, lam=0.4, xi=0.2)
    obj = DSelectKObjective(lambda: (alpha, Z), dw, n, gamma, 0.4, 0.2)
    fd_check(obj, alpha, dalpha, rng, "dalpha", max_entries=6)
    fd_check(obj, Z, dZ, rng, "dZ", max_entries=6)

    s = rng.uniform(size=(64, m))
    dr = rng.normal(size=(64, n))
    fd_check(lambda: np.sum(dr * ref.selector(s, n)), s, F.selector_backward(dr, s, n), rng, "ds", max_entries=10)

    logits = rng.normal(size=(300, n))
    dl_in = rng.normal(size=(300, n))
    fd_check(lambda: np.sum(dl_in * ref.softmax(logits)), logits, F.softmax_backward(dl_in, ref.softmax(logits)),
             rng, "softmax", max_entries=10)

    beta = rng.normal(size=(B, k, n))
    ws, cache_s = F.softmax_selector_forward(alpha, beta, 0.7)
    dws = rng.normal(size=ws.shape)
    da, db = F.softmax_selector_backward(dws, cache_s, lam=0.3)

    def fsel():
        w_ref, P_ref = ref.softmax_selector(alpha, beta, 0.7)
        return float(np.sum(dws * w_ref)) + 0.3 * float(ref.softmax_selector_entropy(P_ref))

    fd_check(fsel, alpha, da, rng, "dalpha (softmax selector)", max_entries=4)
    fd_check(fsel, beta, db, rng, "dbeta (softmax selector)", max_entries=6)

    for layout in ("nbd", "bnd"):
        f = rng.normal(size=(16, 300, 8) if layout == "nbd" else (300, 16, 8))
        dy = rng.normal(size=(300, 8))
        for wm in (rng.uniform(size=16), rng.uniform(size=(300, 16))):
            dwm, df = F.mix_experts_backward(dy, f, wm, layout=layout, skip_zero=False)

            def fmix():
                return np.sum(dy * ref.mix_experts(f, wm, layout))

            fd_check(fmix, f, df, rng, "df", max_entries=10)
            fd_check(fmix, wm, dwm, rng, "dw", max_entries=10)


@pytest.mark.parametrize("case", range(8))
def test_mix_experts_many_backward_relu_mask(case):
    """relu_mask=True: f = relu(h), and df is the gradient at h, i.e. relu_backward(df, f) fused:
    checked by finite differences through h (away from the kink) and against the two-step form."""
    rng = rng_for("mixmanyrelu", case)
    f, w, dy = draw_mix_many(rng)
    h = f - 0.5 * np.abs(f).mean()  # some negatives, so that the mask matters
    h[np.abs(h) < 1e-3] = 1e-2  # no entry near the kink
    relu_h = np.maximum(h, 0)
    dw, dh = F.mix_experts_many_backward(dy, relu_h, w, skip_zero=False, relu_mask=True)
    dw2, df2 = F.mix_experts_many_backward(dy, relu_h, w, skip_zero=False)
    np.testing.assert_array_equal(dw, dw2)
    np.testing.assert_array_equal(dh, F.relu_backward(df2, relu_h))

    def obj():
        return np.sum(dy * ref.mix_experts_many(np.maximum(h, 0), w))

    fd_check(obj, h, dh, rng, "dh")
