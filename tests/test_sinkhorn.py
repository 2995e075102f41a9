"""Sinkhorn normalisation of the permutation local search (csrc/sinkhorn.h, F.sinkhorn_forward /
F.sinkhorn_backward / F.sinkhorn_regularization): against the NumPy reference (tests/reference.py),
float64 finite differences through every iteration, and the properties the method relies on.
Input zoo and leak checks: tests/test_bad_input.py, tests/test_threads_and_leaks.py."""
import itertools
import zlib

import numpy as np
import pytest

import reference as ref
from dselectk import functional as F

NS = [1, 2, 3, 5, 8, 16, 33, 64]
TAUS = [1e-3, 0.1, 1.0, 10.0]
ITERS = [1, 2, 7, 30]


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def log_alpha_for(*key_then_shape, scale=1.0):
    """standard normal logits of the shape given last, seeded by the other arguments"""
    *key, shape = key_then_shape
    return scale * rng_for(*key).standard_normal(shape)


# --------------------------------------------------------------------------------------------
# forward against the reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("tau", TAUS)
def test_forward_matches_reference_float64(n, tau):
    for iters in ITERS:
        for K in (1, 3):
            a = log_alpha_for("fwd", n, tau, iters, K, (K, n, n))
            P, cache = F.sinkhorn_forward(a, tau, iters)
            want = ref.sinkhorn(a, tau, iters)
            assert P.dtype == np.float64 and P.shape == (K, n, n)
            np.testing.assert_allclose(P, want, rtol=1e-10, atol=1e-13, err_msg=f"iters={iters} K={K}")
            np.testing.assert_array_equal(cache.P, P)
            assert cache.logs.shape == (K, 2 * iters, n, n) and cache.logs.dtype == np.float64
            # the cache holds the half-steps: its last slot is log P, its first the row-normalised input
            np.testing.assert_allclose(np.exp(cache.logs[:, -1]), P, rtol=1e-15, atol=0)
            X = a / tau
            np.testing.assert_allclose(cache.logs[:, 0], X - ref._logsumexp(X, -1), rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("tau", TAUS)
def test_forward_float32_is_the_float64_computation_rounded(n, tau):
    """The iterates are float64 for float32 input too: P32 is the float64 result on the float32
    values, rounded once."""
    for iters in (1, 7, 30):
        a = log_alpha_for("f32", n, tau, iters, (2, n, n)).astype(np.float32)
        P32 = F.sinkhorn(a, tau, iters)
        assert P32.dtype == np.float32
        want = ref.sinkhorn(a.astype(np.float64), tau, iters)
        np.testing.assert_allclose(P32.astype(np.float64), want, rtol=2e-7, atol=1e-30)


def test_unbatched_batched_and_cacheless_forms_agree_bitwise():
    a = log_alpha_for("forms", (4, 6, 6))
    P, cache = F.sinkhorn_forward(a, 0.3, 11)
    np.testing.assert_array_equal(F.sinkhorn(a, 0.3, 11), P)
    for k in range(4):
        Pk, ck = F.sinkhorn_forward(a[k], 0.3, 11)
        assert Pk.shape == (6, 6) and not ck.batched
        np.testing.assert_array_equal(Pk, P[k])
    out = np.empty((6, 6))
    assert F.sinkhorn(a[1], 0.3, 11, out=out) is not None
    np.testing.assert_array_equal(out, P[1])
    out3 = np.empty((4, 6, 6))
    F.sinkhorn_forward(a, 0.3, 11, out=out3)
    np.testing.assert_array_equal(out3, P)


# --------------------------------------------------------------------------------------------
# backward: float64 finite differences through every iteration
# --------------------------------------------------------------------------------------------

def _objective(a, G, tau, iters, lam):
    P = F.sinkhorn(a, tau, iters)
    value = 0.0 if G is None else float(np.sum(G * P))
    return value + lam * F.sinkhorn_regularization(P)


FD_CASES = [(n, tau, iters, lam) for n in (1, 2, 3, 4, 7, 12) for tau in (0.05, 0.3, 1.0, 4.0)
            for iters in (1, 3, 20) for lam in (0.0, 0.5)]


@pytest.mark.parametrize("n,tau,iters,lam", FD_CASES)
def test_backward_finite_differences(n, tau, iters, lam):
    K = 2
    a = log_alpha_for("fd", n, tau, iters, lam, (K, n, n))
    G = rng_for("fdG", n, tau, iters).standard_normal((K, n, n))
    P, cache = F.sinkhorn_forward(a, tau, iters)
    grad = F.sinkhorn_backward(G, cache, lam=lam)
    h = 1e-5 * tau  # the function depends on a / tau
    rng = rng_for("fd-entries", n, tau, iters)
    entries = [tuple(i) for i in np.ndindex(a.shape)]
    if len(entries) > 40:
        entries = [entries[i] for i in rng.choice(len(entries), 40, replace=False)]
    scale = max(1.0, float(np.abs(grad).max()))
    for idx in entries:
        ap, am = a.copy(), a.copy()
        ap[idx] += h
        am[idx] -= h
        num = (_objective(ap, G, tau, iters, lam) - _objective(am, G, tau, iters, lam)) / (2 * h)
        assert abs(grad[idx] - num) <= 1e-6 * scale, (idx, grad[idx], num)


@pytest.mark.parametrize("tau,iters", [(0.2, 5), (1.0, 40)])
def test_backward_of_the_regularizer_alone(tau, iters):
    """dP = None: the gradient of lam * Omega(P) only (what the soft phase adds to the gate's dP)."""
    a = log_alpha_for("reg", tau, (3, 5, 5))
    P, cache = F.sinkhorn_forward(a, tau, iters)
    grad = F.sinkhorn_backward(None, cache, lam=0.7)
    num = ref.numerical_gradient(lambda: 0.7 * F.sinkhorn_regularization(F.sinkhorn(a, tau, iters)), a,
                                 h=1e-6 * tau)
    np.testing.assert_allclose(grad, num, atol=1e-6 * max(1.0, np.abs(num).max()), rtol=0)
    G = rng_for("regG").standard_normal(a.shape)
    np.testing.assert_allclose(F.sinkhorn_backward(G, cache, lam=0.7),
                               F.sinkhorn_backward(G, cache) + grad, rtol=1e-12, atol=1e-12)


def test_backward_unbatched_form_and_independent_matrices():
    a = log_alpha_for("unb", (3, 4, 4))
    G = rng_for("unbG").standard_normal(a.shape)
    P, cache = F.sinkhorn_forward(a, 0.5, 9)
    grad = F.sinkhorn_backward(G, cache, lam=0.2)
    for k in range(3):
        _, ck = F.sinkhorn_forward(a[k], 0.5, 9)
        # the regularizer is a mean over the K matrices: one matrix alone carries K times its weight
        np.testing.assert_allclose(F.sinkhorn_backward(G[k], ck, lam=0.2 / 3), grad[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tau", [1e-3, 0.1, 1.0])
def test_backward_float32_matches_float64(tau):
    a = log_alpha_for("b32", tau, (2, 8, 8)).astype(np.float32)
    G = rng_for("b32G", tau).standard_normal(a.shape).astype(np.float32)
    _, c32 = F.sinkhorn_forward(a, tau, 25)
    _, c64 = F.sinkhorn_forward(a.astype(np.float64), tau, 25)
    g32 = F.sinkhorn_backward(G, c32, lam=0.1)
    g64 = F.sinkhorn_backward(G.astype(np.float64), c64, lam=0.1)
    assert g32.dtype == np.float32
    np.testing.assert_allclose(g32, g64, rtol=1e-5, atol=1e-5 * np.abs(g64).max())


# --------------------------------------------------------------------------------------------
# the regularizer's value
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_regularization_matches_reference(dtype):
    for n in (1, 2, 5, 16):
        P = F.sinkhorn(log_alpha_for("regv", n, (3, n, n)).astype(dtype), 0.4, 6)
        tol = 1e-12 if dtype == np.float64 else 1e-5
        assert abs(F.sinkhorn_regularization(P) - ref.sinkhorn_entropy(P)) <= tol * max(1, ref.sinkhorn_entropy(P))
        assert abs(F.sinkhorn_regularization(P[0]) - ref.sinkhorn_entropy(P[0])) <= tol * 10
    # a zero row: it has no row-normalised entropy
    Q = np.array([[[0.5, 0.5], [0.0, 0.0]]])
    assert abs(F.sinkhorn_regularization(Q) - ref.sinkhorn_entropy(Q)) < 1e-15
    assert ref.sinkhorn_entropy(Q) == pytest.approx(2 * (-np.log(0.5 + 1e-6)), rel=1e-6)


def test_regularization_is_smallest_at_a_permutation():
    eye = np.eye(6)[None]
    soft = F.sinkhorn(log_alpha_for("soft", (1, 6, 6)), 1.0, 50)
    assert F.sinkhorn_regularization(eye) < 1e-4 < F.sinkhorn_regularization(soft)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_columns_sum_to_one_after_the_column_last_normalisation(dtype):
    tol = 1e-12 if dtype == np.float64 else 3e-6
    for n, tau, iters in itertools.product((2, 5, 16, 64), (1e-3, 0.1, 1.0, 10.0), (1, 4, 30)):
        P = F.sinkhorn(log_alpha_for("cols", n, tau, iters, (2, n, n)).astype(dtype), tau, iters)
        assert np.all(P >= 0) and np.all(P <= 1 + tol)
        np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=tol * n, rtol=0)


def test_rows_converge_to_one():
    a = log_alpha_for("rows", (3, 10, 10))
    errors = [np.abs(F.sinkhorn(a, 1.0, iters).sum(axis=2) - 1).max() for iters in (1, 3, 5, 10, 15)]
    assert errors[-1] < 1e-10
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


def test_row_constants_do_not_change_P():
    a = log_alpha_for("rowc", (2, 7, 7))
    shifted = a + log_alpha_for("rowc-shift", (2, 7, 1), scale=5.0)
    np.testing.assert_allclose(F.sinkhorn(shifted, 0.5, 13), F.sinkhorn(a, 0.5, 13), rtol=1e-12, atol=1e-14)


def test_permuting_rows_and_columns_permutes_P():
    rng = rng_for("equiv")
    a = log_alpha_for("equiv-a", (9, 9))
    r, c = rng.permutation(9), rng.permutation(9)
    P = F.sinkhorn(a, 0.2, 17)
    np.testing.assert_allclose(F.sinkhorn(a[r][:, c], 0.2, 17), P[r][:, c], rtol=1e-12, atol=1e-14)


def _best_assignment_and_gap(a):
    n = len(a)
    scores = sorted((a[np.arange(n), list(p)].sum(), p) for p in itertools.permutations(range(n)))
    return np.array(scores[-1][1]), scores[-1][0] - (scores[-2][0] if len(scores) > 1 else -np.inf)


def test_tau_to_zero_gives_the_optimal_permutation_matrix():
    """For a generic log_alpha (its best assignment ahead of the second best by a gap >= 0.05),
    Sinkhorn(log_alpha / tau) tends to the permutation matrix maximising sum log_alpha * P as
    tau -> 0: the distance falls with tau, and at tau = gap / 30 every entry is within 1e-3."""
    checked = 0
    for seed in range(60):
        n = 2 + seed % 5
        a = log_alpha_for("limit", seed, (n, n))
        best, gap = _best_assignment_and_gap(a)
        if gap < 0.05:
            continue
        H = np.zeros((n, n))
        H[np.arange(n), best] = 1
        distances = [np.abs(F.sinkhorn(a, tau, 5000) - H).max() for tau in (1.0, gap / 3, gap / 30)]
        assert distances[-1] < 1e-3, (seed, n, gap, distances)
        assert distances[0] > distances[-1]
        # the rounding a hardening step does (argmax per row) recovers the permutation
        np.testing.assert_array_equal(F.sinkhorn(a, gap / 30, 5000).argmax(axis=1), best)
        checked += 1
    assert checked >= 40
