"""The COMET gate kernels (csrc/comet.h) against the plain-NumPy reference of tests/reference.py
(written from shared/reference/comet-spec.md: one softmax over the k n scores, reach products
along explicit root-to-leaf paths), float64 finite differences of every backward, and the
properties of the spec: weights on the simplex, at most k nonzeros once every node is saturated,
no gradient to saturated nodes, C^1 in Z.

Tolerances as tests/test_kernels_reference.py (forward: 1e-12 in float64, ~1e-5 in float32) and
tests/test_gradients.py (|analytic - numeric| <= 1e-6 max(1, |analytic|), h = 1e-6, Z inside the
fractional region with a margin or saturated with a margin, so that Z +- h crosses no +-gamma/2).
"""
import zlib

import numpy as np
import pytest

import reference as ref
from dselectk import functional as F
from test_gradients import fd_check

NS = [2, 3, 5, 6, 7, 8, 9, 16, 33]
NK = [(n, k) for n in NS for k in (1, 2, 4) if k <= n]
GAMMAS = [0.5, 1.0, 10.0]


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def draw_Z(rng, shape, gamma, saturated_frac=0.3):
    """Node logits: most inside the fractional region (|z| <= 0.45 gamma), a fraction saturated with a
    margin (0.55 gamma <= |z| <= 3 gamma)."""
    Z = rng.uniform(-0.45 * gamma, 0.45 * gamma, size=shape)
    sat = rng.uniform(size=shape) < saturated_frac
    Z[sat] = rng.choice([-1.0, 1.0], size=shape)[sat] * rng.uniform(0.55 * gamma, 3 * gamma, size=shape)[sat]
    return Z


def saturated_Z(rng, shape, gamma):
    """Every node saturated, some exactly on +-gamma/2."""
    mag = rng.uniform(0.5 * gamma, 3 * gamma, size=shape)
    mag[rng.uniform(size=shape) < 0.25] = gamma / 2
    return rng.choice([-1.0, 1.0], size=shape) * mag


def assert_close(got, want, dtype):
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), got.dtype
    assert got.shape == np.shape(want), (got.shape, np.shape(want))
    tol, atol = (1e-12, 1e-12) if dtype == np.float64 else (1e-5, 1e-6)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=atol)


# --------------------------------------------------------------------------------------------
# the tree
# --------------------------------------------------------------------------------------------


def test_leaf_order_is_left_first_depth_first():
    assert F.comet_leaf_nodes(3).tolist() == [3, 4, 2]  # the spec's example
    assert F.comet_leaf_nodes(2).tolist() == [1, 2]
    for n in list(range(2, 70)) + [127, 128, 129, 1000]:
        leaves, _ = ref.comet_leaf_paths(n)
        got = F.comet_leaf_nodes(n)
        assert got.dtype == np.int64
        assert got.tolist() == leaves, n
        assert sorted(leaves) == list(range(n - 1, 2 * n - 1))  # every leaf once


# --------------------------------------------------------------------------------------------
# forward against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
def test_forward_matches_reference(n, k, gamma, dtype):
    rng = rng_for("comet_fwd", n, k, gamma)
    B = 7
    A = rng.normal(0.0, 2.0, size=(B, k, n)).astype(dtype)
    Z = draw_Z(rng, (B, k, n - 1), gamma).astype(dtype)
    w_ref, g_ref = ref.comet(A.astype(np.float64), Z.astype(np.float64), gamma)
    w, cache = F.comet_forward(A, Z, gamma)
    assert_close(w, w_ref, dtype)
    assert_close(cache.g, g_ref, dtype)
    assert_close(cache.reach, ref.comet_reach(Z.astype(np.float64), gamma), dtype)
    assert_close(cache.sz, ref.smooth_step(Z.astype(np.float64), gamma), dtype)
    # the static gate is the same computation with B = 1
    ws, cs = F.comet_forward(A[2], Z[2], gamma)
    assert ws.shape == (n,) and cs.static
    assert_close(ws, w_ref[2], dtype)
    # and the regularizer's value
    omega = F.comet_regularization(cache)
    want = float(ref.comet_entropy(Z.astype(np.float64), gamma))
    assert abs(omega - want) <= (1e-12 if dtype == np.float64 else 1e-5) * max(1.0, abs(want))


@pytest.mark.parametrize("n,k", [(2, 1), (3, 2), (16, 2), (33, 4)])
def test_per_example_forward_matches_reference(n, k):
    rng = rng_for("comet_pe_fwd", n, k)
    B, p, gamma = 9, 5, 1.0
    x = rng.normal(size=(B, p))
    U, b_U = rng.normal(size=(k, n, p)), rng.normal(size=(k, n))
    W, b_W = rng.normal(0, 0.2, size=(k, n - 1, p)), rng.normal(0, 0.2, size=(k, n - 1))
    w_ref, _ = ref.comet_per_example(x, U, b_U, W, b_W, gamma)
    for dtype in (np.float64, np.float32):
        w, _ = F.comet_per_example_forward(*(a.astype(dtype) for a in (x, U, b_U, W, b_W)), gamma)
        assert_close(w, w_ref, dtype)


def test_out_argument():
    rng = rng_for("comet_out")
    A, Z = rng.normal(size=(3, 2, 6)), rng.normal(size=(3, 2, 5))
    out = np.full((3, 6), -1.0)
    w, _ = F.comet_forward(A, Z, 1.0, out=out)
    assert w is out
    np.testing.assert_allclose(out, ref.comet(A, Z, 1.0)[0], rtol=1e-12, atol=1e-12)
    out1 = np.empty(6)
    assert F.comet_forward(A[0], Z[0], 1.0, out=out1)[0] is out1


# --------------------------------------------------------------------------------------------
# finite differences of every backward (float64)
# --------------------------------------------------------------------------------------------


def _objective(dw, lam, gamma, eps=1e-6):
    """<dw, w> + lam * mean-over-batch entropy, on the reference."""
    def f(A, Z):
        w, _ = ref.comet(A, Z, gamma)
        value = 0.0 if dw is None else float(np.sum(dw * w))
        return value + lam * float(ref.comet_entropy(Z, gamma, eps))
    return f


@pytest.mark.parametrize("gamma", [0.5, 1.0, 10.0])
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("static", [True, False], ids=["static", "batched"])
def test_backward_finite_differences(static, n, k, gamma):
    rng = rng_for("comet_fd", n, k, gamma, static)
    lead = () if static else (4,)
    A = rng.normal(0.0, 1.5, size=lead + (k, n))
    Z = draw_Z(rng, lead + (k, n - 1), gamma)
    for lam in (0.0, 0.7):
        for dw in (rng.normal(size=lead + (n,)), None):
            if dw is None and lam == 0:
                continue
            _, cache = F.comet_forward(A, Z, gamma)
            dA, dZ = F.comet_backward(dw, cache, lam=lam)
            f = _objective(dw, lam, gamma)
            fd_check(lambda: f(A, Z), A, dA, rng, f"dA n={n} k={k} lam={lam}")
            fd_check(lambda: f(A, Z), Z, dZ, rng, f"dZ n={n} k={k} lam={lam}")


@pytest.mark.parametrize("n,k", [(2, 1), (3, 2), (6, 2), (9, 4), (16, 2)])
def test_per_example_backward_finite_differences(n, k):
    rng = rng_for("comet_pe_fd", n, k)
    B, p, gamma, lam = 6, 4, 1.0, 0.3
    x = rng.normal(size=(B, p))
    U, b_U = rng.normal(size=(k, n, p)), rng.normal(size=(k, n))
    # node maps small enough that z stays inside the fractional region, for a few saturated entries
    # (exactly 0 / 1, far from the boundary) one bias is large
    W, b_W = rng.uniform(-0.05, 0.05, size=(k, n - 1, p)), rng.uniform(-0.2, 0.2, size=(k, n - 1))
    b_W.reshape(-1)[0] = 2.0
    dw = rng.normal(size=(B, n))
    _, cache = F.comet_per_example_forward(x, U, b_U, W, b_W, gamma)
    g = F.comet_per_example_backward(dw, cache, lam=lam)

    def f():
        w, _ = ref.comet_per_example(x, U, b_U, W, b_W, gamma)
        Z = np.einsum("tvp,bp->btv", W, x) + b_W
        return float(np.sum(dw * w)) + lam * float(ref.comet_entropy(Z, gamma))

    for name, arr in (("x", x), ("U", U), ("b_U", b_U), ("W", W), ("b_W", b_W)):
        fd_check(f, arr, g[name], rng, name)
    assert F.comet_per_example_backward(dw, cache, lam=lam, need_dx=False)["x"] is None


def test_float32_backward_matches_float64():
    rng = rng_for("comet_f32_bwd")
    n, k, gamma = 9, 2, 1.0
    A, Z, dw = rng.normal(size=(5, k, n)), draw_Z(rng, (5, k, n - 1), gamma), rng.normal(size=(5, n))
    want = F.comet_backward(dw, F.comet_forward(A, Z, gamma)[1], lam=0.5)
    f32 = [a.astype(np.float32) for a in (A, Z, dw)]
    got = F.comet_backward(f32[2], F.comet_forward(f32[0], f32[1], gamma)[1], lam=0.5)
    for g32, g64 in zip(got, want):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,k", NK)
def test_weights_on_the_simplex(n, k, dtype):
    rng = rng_for("comet_simplex", n, k)
    B, gamma = 64, 1.0
    A = rng.normal(0.0, 10.0, size=(B, k, n)).astype(dtype)
    Z = rng.normal(0.0, gamma, size=(B, k, n - 1)).astype(dtype)
    w, cache = F.comet_forward(A, Z, gamma)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.astype(np.float64).sum(axis=1), 1.0, rtol=0, atol=tol)
    # each tree's reach is a distribution over its leaves
    np.testing.assert_allclose(cache.reach.astype(np.float64).sum(axis=2), 1.0, rtol=0, atol=tol)
    # leaves that are not reached have weight exactly 0
    assert np.all(cache.g[cache.reach == 0] == 0)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", NK)
def test_saturated_trees_select_at_most_k_experts(n, k, gamma):
    rng = rng_for("comet_sat", n, k, gamma)
    B = 16
    Z = saturated_Z(rng, (B, k, n - 1), gamma)
    A = rng.normal(0.0, 2.0, size=(B, k, n))
    leaves, paths = ref.comet_leaf_paths(n)
    for dtype in (np.float64, np.float32):
        w, cache = F.comet_forward(A.astype(dtype), Z.astype(dtype), gamma)
        assert set(np.unique(cache.sz)) <= {0.0, 1.0}
        for b in range(B):
            assert np.count_nonzero(w[b]) <= k
            # tree t reaches the one leaf its 0/1 decisions lead to, with reach exactly 1
            chosen = []
            for t in range(k):
                node = 0
                while node < n - 1:
                    node = 2 * node + 1 if Z[b, t, node] >= gamma / 2 else 2 * node + 2
                j = leaves.index(node)
                chosen.append(j)
                assert cache.reach[b, t, j] == 1 and np.count_nonzero(cache.reach[b, t]) == 1
            # the weights: a softmax over the k reached leaves' logits, summed per expert
            e = np.exp(A[b, np.arange(k), chosen] - A[b, np.arange(k), chosen].max())
            want = np.zeros(n)
            np.add.at(want, chosen, e / e.sum())
            np.testing.assert_allclose(w[b], want, rtol=1e-12 if dtype == np.float64 else 1e-5, atol=0)
            assert set(np.flatnonzero(w[b])) == set(chosen)


@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("static", [True, False], ids=["static", "batched"])
def test_zero_gradient_to_saturated_nodes(static, n, k):
    rng = rng_for("comet_sat_grad", n, k, static)
    gamma = 1.0
    lead = () if static else (8,)
    Z = rng.uniform(-0.45, 0.45, size=lead + (k, n - 1))
    sat = rng.uniform(size=Z.shape) < 0.5
    sat.reshape(-1)[0] = True
    mag = rng.uniform(0.5, 2.0, size=Z.shape)
    mag[rng.uniform(size=Z.shape) < 0.3] = 0.5
    Z[sat] = (rng.choice([-1.0, 1.0], size=Z.shape) * mag)[sat]
    A = rng.normal(size=lead + (k, n))
    for dtype in (np.float64, np.float32):
        w, cache = F.comet_forward(A.astype(dtype), Z.astype(dtype), gamma)
        sz = cache.sz.reshape(Z.shape)
        assert np.all((sz[sat] == 0) | (sz[sat] == 1))
        for dw in (rng.normal(size=w.shape).astype(dtype), None):
            dA, dZ = F.comet_backward(dw, cache, lam=0.9)
            assert np.all(np.isfinite(dA)) and np.all(np.isfinite(dZ))
            assert np.all(dZ[sat] == 0), dZ[sat]
            # a node below a zero reach gets nothing either; the others do
            reached = cache.reach_int.reshape(Z.shape) > 0
            assert np.all(dZ[~reached] == 0)
            if np.any(~sat & reached):
                assert np.any(dZ[~sat & reached] != 0)
            # leaves that are not reached: no gradient to their logits
            assert np.all(dA[cache.reach.reshape(A.shape) == 0] == 0)


def test_all_saturated_gate_is_frozen_in_Z():
    rng = rng_for("comet_frozen")
    n, k = 16, 2
    Z = saturated_Z(rng, (k, n - 1), 1.0)
    A = rng.normal(size=(k, n))
    _, cache = F.comet_forward(A, Z, 1.0)
    dA, dZ = F.comet_backward(rng.normal(size=n), cache, lam=1.0)
    assert np.all(dZ == 0)
    assert np.any(dA != 0)
    # the regularizer is 0 (each tree reaches one leaf) and has no gradient
    assert F.comet_regularization(cache) == pytest.approx(-k * np.log(1 + 1e-6), abs=1e-12)
    dA0, dZ0 = F.comet_backward(None, cache, lam=1.0)
    assert np.all(dA0 == 0) and np.all(dZ0 == 0)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("n,k", [(2, 1), (5, 2), (8, 4)])
def test_c1_in_Z(n, k, gamma):
    """w and its gradient in each z_v are continuous across +-gamma/2: approaching the boundary from
    inside by a distance delta gamma, w - w(+-gamma/2) shrinks like delta^2 and dw/dz_v like delta
    (S - S(+-gamma/2) = O(delta^2), S' = 6 delta (1 - delta) / gamma); on and beyond the boundary
    the gradient is exactly 0."""
    rng = rng_for("comet_c1", n, k, gamma)
    A = rng.normal(size=(k, n))
    Z0 = rng.uniform(-0.3 * gamma, 0.3 * gamma, size=(k, n - 1))
    dw = rng.normal(size=n)
    half = gamma / 2
    for t in range(k):
        for v in range(n - 1):
            for sign in (1.0, -1.0):
                Z = Z0.copy()
                Z[t, v] = sign * half
                w_edge, cache = F.comet_forward(A, Z, gamma)
                assert F.comet_backward(dw, cache)[1][t, v] == 0
                prev_w = prev_g = None
                for delta in (1e-2, 1e-3, 1e-4, 1e-5):
                    Z[t, v] = sign * (half + delta * gamma)  # beyond: constant, no gradient
                    w, cache = F.comet_forward(A, Z, gamma)
                    assert np.array_equal(w, w_edge) and F.comet_backward(dw, cache)[1][t, v] == 0
                    Z[t, v] = sign * (half - delta * gamma)  # inside
                    w, cache = F.comet_forward(A, Z, gamma)
                    dev, grad = np.abs(w - w_edge).max(), abs(F.comet_backward(dw, cache)[1][t, v])
                    if prev_w is not None:  # delta / 10: quadratic and linear decay
                        assert dev <= 0.05 * prev_w + 1e-14, (delta, dev, prev_w)
                        assert grad <= 0.2 * prev_g + 1e-13, (delta, grad, prev_g)
                    prev_w, prev_g = dev, grad


# --------------------------------------------------------------------------------------------
# the gate object (dselectk.gates.CometGate)
# --------------------------------------------------------------------------------------------


def test_gate_initialisation_follows_the_spec():
    from dselectk.gates import CometGate
    for gamma in (0.5, 4.0):
        g = CometGate(9, 3, gamma=gamma, seed=0, dtype=np.float64)
        assert g.params["A"].shape == (3, 9) and g.params["Z"].shape == (3, 8)
        assert np.abs(g.params["Z"]).max() <= gamma / 100 and np.abs(g.params["Z"]).min() > 0
        assert np.abs(g.params["A"]).max() <= 0.05
        pe = CometGate(9, 3, gamma=gamma, per_example=True, input_dim=4, seed=0, dtype=np.float64)
        for name, shape, bound in (("U", (3, 9, 4), 0.05), ("b_U", (3, 9), 0.05), ("W", (3, 8, 4), gamma / 100),
                                   ("b_W", (3, 8), gamma / 100)):
            assert pe.params[name].shape == shape and np.abs(pe.params[name]).max() <= bound, name
        s = F.smooth_step(pe.params["b_W"], gamma)
        assert np.all((s > 0.48) & (s < 0.52))  # every node starts near 1/2 (S' = 3 / (2 gamma) there)
    with pytest.raises(ValueError, match="k must satisfy"):
        CometGate(4, 5)
    with pytest.raises(ValueError, match="input_dim"):
        CometGate(4, 2, per_example=True)


@pytest.mark.parametrize("per_example", [False, True])
def test_gate_matches_the_functional_api(per_example):
    from dselectk.gates import CometGate
    rng = rng_for("comet_gate", per_example)
    g = CometGate(7, 2, gamma=1.0, entropy_reg=0.4, per_example=per_example, input_dim=3 if per_example else None,
                  seed=1, dtype=np.float64)
    for v in g.params.values():
        v[...] = rng.uniform(-0.4, 0.4, v.shape)
    x = rng.normal(size=(5, 3)) if per_example else None
    w = g.forward(x)
    dw = rng.normal(size=w.shape)
    dx = g.backward(dw)
    if per_example:
        w_ref, cache = F.comet_per_example_forward(x, *(g.params[k] for k in ("U", "b_U", "W", "b_W")), 1.0)
        want = F.comet_per_example_backward(dw, cache, lam=0.4)
        np.testing.assert_array_equal(dx, want["x"])
        for name in ("U", "b_U", "W", "b_W"):
            np.testing.assert_array_equal(g.grads[name], want[name])
        assert g.leaf_reach().shape == (5, 2, 7)
    else:
        w_ref, cache = F.comet_forward(g.params["A"], g.params["Z"], 1.0)
        dA, dZ = F.comet_backward(dw, cache, lam=0.4)
        assert dx is None
        np.testing.assert_array_equal(g.grads["A"], dA)
        np.testing.assert_array_equal(g.grads["Z"], dZ)
        assert g.leaf_reach().shape == (2, 7)
    np.testing.assert_array_equal(w, w_ref)
    assert g.regularization() == pytest.approx(0.4 * F.comet_regularization(cache if not per_example else cache.gate))
    g.backward(dw)  # accumulates
    if not per_example:
        np.testing.assert_array_equal(g.grads["A"], 2 * dA)


def test_gate_is_binary_once_every_tree_reaches_one_leaf():
    """The path of each tree saturated, the nodes off it (reach 0) left fractional as training leaves
    them: binary, at most k experts, no gradient to Z."""
    from dselectk.gates import CometGate
    g = CometGate(8, 2, seed=0, dtype=np.float64)
    assert not g.is_binary() and g.binary_fraction() == 0.0
    Z = g.params["Z"]
    Z[0, [0, 1, 4]] = [1.0, -1.0, 1.0]  # tree 0: left, right, left (nodes 0, 1, 4): leaf node 9, expert 2
    Z[1, [0, 2, 6]] = [-1.0, -1.0, -1.0]  # tree 1: right, right, right (nodes 0, 2, 6): leaf 14, expert 7
    w = g.forward()
    assert g.is_binary() and g.binary_fraction() == 1.0
    assert set(np.flatnonzero(w)) == {2, 7} and g.num_selected() == 2
    np.testing.assert_array_equal(g.leaf_reach()[0], np.eye(8)[2])
    g.backward(np.arange(8.0))
    assert np.all(g.grads["Z"] == 0) and np.any(g.grads["A"] != 0)
    Z[1, 6] = 0.1  # a reached node back in the fractional region
    g.forward()
    assert not g.is_binary() and g.binary_fraction() == pytest.approx(5 / 6)


def test_float32_softmax_when_the_largest_logit_has_a_tiny_reach():
    """The leaf with the largest logit has a reach of ~1e-23 (three nodes just above saturation on its
    path): shifted by that logit alone, every other term would underflow in float32. The kernel
    shifts once more by log of the sum; all weights, the tiny ones too, and the gradients match
    float64."""
    n, gamma = 8, 1.0
    Z = np.zeros((1, n - 1))
    Z[0, [0, 1, 3]] = -0.5 + 1.2e-4  # expert 0's path: left three times with s ~ 4e-8 each
    A = np.zeros((1, n))
    A[0, 0] = 100.0
    Z = Z.astype(np.float32).astype(np.float64)  # float64 on the float32 inputs' values
    w64, c64 = F.comet_forward(A, Z, gamma)
    w32, c32 = F.comet_forward(A.astype(np.float32), Z.astype(np.float32), gamma)
    assert 1e-25 < c64.reach[0, 0, 0] < 1e-20 and 0 < w64[1:].max() < 1e-15  # the regime meant
    np.testing.assert_allclose(w32, w64, rtol=1e-4, atol=0)
    # the reference's cubic cancels near -gamma/2 (absolute error ~1e-16 on s ~ 4e-8): relative 1e-8
    np.testing.assert_allclose(w64, ref.comet(A, Z, gamma)[0], rtol=1e-8, atol=0)
    dw = np.linspace(-1, 1, n)
    for g32, g64 in zip(F.comet_backward(dw.astype(np.float32), c32, lam=0.2), F.comet_backward(dw, c64, lam=0.2)):
        np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6 * np.abs(g64).max())


def test_the_onnx_export_walks_the_same_paths():
    from dselectk.gates.comet import _leaf_paths
    for n in list(range(2, 40)) + [64, 100]:
        leaves, paths = _leaf_paths(n)
        assert leaves == F.comet_leaf_nodes(n).tolist()
        assert paths == ref.comet_leaf_paths(n)[1]
