"""Per-example DSelect-k and COMET forward + backward: dselectk's C kernels against vectorised NumPy.

    python benchmarks/bench_gates.py [--gates dselect_k comet] [--batch 4096] [--p 64] [--k 4]
        [--n 8 32 128] [--comet-k 2] [--comet-n 8 16 64] [--repeat 7]

Both sides compute the same thing. DSelect-k: alpha = x G^T + b_G, z^(i) = W^(i) x + b_W^(i), w (B, n),
then the gradients of <dw, w> + lambda * Omega with respect to x, G, b_G, W, b_W. COMET: leaf
logits a_t = U_t x + b_U,t, node logits z_t = W_t x + b_W,t, w (B, n), then the gradients of
<dw, w> + lambda * (the leaf-reach entropy) with respect to x, U, b_U, W, b_W; the NumPy side runs
down and up the heap one level at a time (O(log n) array operations). They are checked to agree
before anything is timed. Times are the median of --repeat rounds that interleave the sides, in one
process (the machine is shared and noisy: compare the ratios, not the absolute times).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import dselectk
from dselectk import functional as F


def numpy_dselect_k_per_example(x, G, b_G, W, b_W, n, gamma, dw, lam, eps=1e-6):
    """Vectorised NumPy forward + backward of the per-example gate (float64 or float32)."""
    B = x.shape[0]
    k, m, p = W.shape
    bits = ((np.arange(n)[:, None] >> np.arange(m)[None, :]) & 1).astype(bool)  # (n, m)
    alpha = x @ G.T + b_G
    Z = (x @ W.reshape(k * m, p).T + b_W.reshape(-1)).reshape(B, k, m)
    half = gamma / 2
    inside = np.abs(Z) < half
    S = np.where(Z <= -half, 0.0, np.where(Z >= half, 1.0, -2 / gamma**3 * Z**3 + 3 / (2 * gamma) * Z + 0.5))
    S = S.astype(x.dtype)
    dS = np.where(inside, -6 / gamma**3 * Z**2 + 3 / (2 * gamma), 0.0).astype(x.dtype)
    a = alpha - alpha.max(axis=1, keepdims=True)
    sig = np.exp(a)
    sig /= sig.sum(axis=1, keepdims=True)
    factors = np.where(bits[None, None], S[:, :, None, :], 1 - S[:, :, None, :])  # (B, k, n, m)
    r = factors.prod(axis=-1)  # (B, k, n)
    w = np.einsum("bk,bkn->bn", sig, r)
    # backward
    dsig = np.einsum("bn,bkn->bk", dw, r)
    dalpha = sig * (dsig - (sig * dsig).sum(axis=1, keepdims=True))
    dr = sig[:, :, None] * dw[:, None, :] - (lam / B) * (np.log(r + eps) + r / (r + eps))
    ones = np.ones_like(factors[..., :1])
    prefix = np.cumprod(np.concatenate([ones, factors[..., :-1]], axis=-1), axis=-1)
    suffix = np.cumprod(np.concatenate([ones, factors[..., :0:-1]], axis=-1), axis=-1)[..., ::-1]
    sign = np.where(bits, 1.0, -1.0).astype(x.dtype)
    dS_total = np.einsum("bkn,bknm,nm->bkm", dr, prefix * suffix, sign)
    dZ = dS_total * dS
    dZ2 = dZ.reshape(B, k * m)
    grads = {
        "x": dalpha @ G + dZ2 @ W.reshape(k * m, p),
        "G": dalpha.T @ x,
        "b_G": dalpha.sum(axis=0),
        "W": (dZ2.T @ x).reshape(k, m, p),
        "b_W": dZ2.sum(axis=0).reshape(k, m),
    }
    return w, grads


def numpy_smooth_step(Z, gamma):
    """(S(Z), S'(Z)) as the kernels evaluate them: v^2 (3 - 2v) at both ends, saturated to exactly
    0 / 1 with slope 0 where min(S, 1 - S) <= half the spacing of the numbers below 1."""
    v = np.clip((gamma / 2 - np.abs(Z)) / gamma, 0, None)  # distance to the nearer end, units of gamma
    q = v * v * (3 - 2 * v)
    saturated = q <= np.finfo(Z.dtype).eps / 4
    S = np.where(saturated, (Z >= 0).astype(Z.dtype), np.where(Z < 0, q, 1 - q))
    dS = np.where(saturated, 0, 6 * v * (1 - v) / gamma)
    return S.astype(Z.dtype), dS.astype(Z.dtype)


def comet_levels(n):
    """Per level of the heap tree over n experts that has internal nodes: (start, width, n_int) --
    the heap index of its first node, its node count, and how many of them (a prefix) are internal.
    Their children are, in heap order, the first 2 n_int nodes of the next level."""
    levels, start, width = [], 0, 1
    while start < n - 1:
        n_int = min(n - 1 - start, width)
        levels.append((start, width, n_int))
        start, width = start + width, 2 * n_int
    return levels


def comet_paths(n):
    """Expert j's root-to-leaf path in the heap tree over n experts (j-th leaf in left-first depth-
    first order), padded to the deepest path D: nodes (n, D) (internal node at each step), left
    (n, D) (the step goes left), valid (n, D) (the step exists)."""
    paths = []

    def visit(node, path):
        if node >= n - 1:
            paths.append(path)
        else:
            visit(2 * node + 1, path + [(node, True)])
            visit(2 * node + 2, path + [(node, False)])
    visit(0, [])
    D = max(len(pth) for pth in paths)
    nodes, left, valid = np.zeros((n, D), np.int64), np.zeros((n, D), bool), np.zeros((n, D), bool)
    for j, pth in enumerate(paths):
        for d, (node, goes_left) in enumerate(pth):
            nodes[j, d], left[j, d], valid[j, d] = node, goes_left, True
    return nodes, left, valid


def _comet_logits(x, U, b_U, W, b_W):
    B = x.shape[0]
    k, n, p = U.shape
    A = (x @ U.reshape(k * n, p).T + b_U.reshape(-1)).reshape(B, k, n)
    Z = (x @ W.reshape(k * (n - 1), p).T + b_W.reshape(-1)).reshape(B, k, n - 1)
    return A, Z


def _comet_softmax(A, reach, dw, lam, eps):
    """w, dA and the gradient d/d reach of the leaves (0 where reach is 0) of the COMET softmax
    over the k n scores a + log p, plus lambda times the batch-mean leaf-reach entropy."""
    B = A.shape[0]
    reached = reach > 0
    amax = np.where(reached, A, -np.inf).max(axis=(1, 2), keepdims=True)
    c = np.where(reached, np.exp(np.where(reached, A - amax, 0)), 0)  # exp(a - amax) on reached leaves
    e = reach * c
    dsum = e.sum(axis=(1, 2), keepdims=True)
    g = e / dsum
    w = g.sum(axis=1)
    wdw = np.einsum("bn,bn->b", w, dw)[:, None, None]
    dA = g * (dw[:, None, :] - wdw)
    dreach = c / dsum * (dw[:, None, :] - wdw) - (lam / B) * (np.log(reach + eps) + reach / (reach + eps))
    return w, dA, np.where(reached, dreach, 0)


def _comet_grads(x, U, W, dA, dZ):
    B = x.shape[0]
    k, n, p = U.shape
    dA2, dZ2 = dA.reshape(B, k * n), dZ.reshape(B, k * (n - 1))
    return {
        "x": dA2 @ U.reshape(k * n, p) + dZ2 @ W.reshape(k * (n - 1), p),
        "U": (dA2.T @ x).reshape(k, n, p),
        "b_U": dA2.sum(axis=0).reshape(k, n),
        "W": (dZ2.T @ x).reshape(k, n - 1, p),
        "b_W": dZ2.sum(axis=0).reshape(k, n - 1),
    }


def numpy_comet_paths_per_example(x, U, b_U, W, b_W, gamma, dw, lam, eps=1e-6):
    """Vectorised NumPy forward + backward of the per-example COMET gate written as the spec states
    it, like the DSelect-k twin above: each leaf's reach the product of the factors s / 1 - s along
    its root-to-leaf path ((B, k, n, D) factors, D the depth), the backward through prefix and
    suffix products of those factors (no division)."""
    k, n, p = U.shape
    A, Z = _comet_logits(x, U, b_U, W, b_W)
    S, dS = numpy_smooth_step(Z, gamma)
    nodes, left, valid = comet_paths(n)
    Sp = S[..., nodes]  # (B, k, n, D)
    factors = np.where(valid, np.where(left, Sp, 1 - Sp), 1).astype(x.dtype)
    reach = factors.prod(axis=-1)
    w, dA, dreach = _comet_softmax(A, reach, dw, lam, eps)
    ones = np.ones_like(factors[..., :1])
    prefix = np.cumprod(np.concatenate([ones, factors[..., :-1]], axis=-1), axis=-1)
    suffix = np.cumprod(np.concatenate([ones, factors[..., :0:-1]], axis=-1), axis=-1)[..., ::-1]
    sign = np.where(valid, np.where(left, 1, -1), 0).astype(x.dtype)  # d factor / d s
    onehot = (nodes[:, :, None] == np.arange(n - 1)).astype(x.dtype)  # (n, D, n - 1)
    dS_total = np.einsum("bkj,bkjd,jd,jdv->bkv", dreach, prefix * suffix, sign, onehot, optimize=True)
    return w, _comet_grads(x, U, W, dA, dS_total * dS)


def numpy_comet_per_example(x, U, b_U, W, b_W, gamma, dw, lam, eps=1e-6):
    """Vectorised NumPy forward + backward of the per-example COMET gate, walking the heap a level at
    a time (O(log n) array operations, O(k n) work per example: the kernels' algorithm)."""
    B = x.shape[0]
    k, n, p = U.shape
    A, Z = _comet_logits(x, U, b_U, W, b_W)
    S, dS = numpy_smooth_step(Z, gamma)
    leaf = F.comet_leaf_nodes(n)
    levels = comet_levels(n)
    # down: the reach of every node (heap order), a level at a time
    P = np.empty((B, k, 2 * n - 1), x.dtype)
    P[..., 0] = 1
    for start, width, n_int in levels:
        p_int, s = P[..., start:start + n_int], S[..., start:start + n_int]
        nxt = start + width
        P[..., nxt:nxt + 2 * n_int:2] = p_int * s
        P[..., nxt + 1:nxt + 2 * n_int:2] = p_int * (1 - s)
    reach = P[..., leaf]  # (B, k, n) expert order
    w, dA, dreach = _comet_softmax(A, reach, dw, lam, eps)
    # backward: up the heap a level at a time
    dP = np.zeros_like(P)
    dP[..., leaf] = dreach
    dZ = np.zeros_like(Z)
    for start, width, n_int in reversed(levels):
        nxt = start + width
        left, right = dP[..., nxt:nxt + 2 * n_int:2], dP[..., nxt + 1:nxt + 2 * n_int:2]
        p_int, s = P[..., start:start + n_int], S[..., start:start + n_int]
        dZ[..., start:start + n_int] = p_int * (left - right) * dS[..., start:start + n_int]
        dP[..., start:start + n_int] = s * left + (1 - s) * right
    return w, _comet_grads(x, U, W, dA, dZ)


def dselectk_comet_per_example(x, U, b_U, W, b_W, gamma, dw, lam):
    w, cache = F.comet_per_example_forward(x, U, b_U, W, b_W, gamma)
    return w, F.comet_per_example_backward(dw, cache, lam=lam)


def dselectk_per_example(x, G, b_G, W, b_W, n, gamma, dw, lam):
    w, cache = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n, gamma)
    return w, F.dselect_k_per_example_backward(dw, cache, lam=lam)


def median_times(fns, repeat):
    """Median wall time of each of ``fns`` over ``repeat`` rounds, after one warm-up call each. The
    functions are interleaved (each round runs every one once, in an order that rotates), so that
    a change in the machine's load hits all sides alike: compare the ratios. Each call is preceded
    by a short sleep: the other side's idle BLAS threads keep spinning for a while after its last
    call (NumPy's OpenBLAS for ~2^28 cycles) and would steal the cores this side is timed on."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(repeat):
        order = list(range(len(fns)))
        order = order[r % len(fns):] + order[:r % len(fns)]
        for i in order:
            time.sleep(0.2)
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _check_agree(w_np, g_np, w_c, g_c, dtype):
    tol = 1e-3 if dtype == np.float32 else 1e-9
    assert np.allclose(w_c, w_np, rtol=tol, atol=tol), "forward outputs differ"
    for name in g_np:
        scale = max(1.0, float(np.abs(g_np[name]).max()))
        assert np.allclose(g_c[name], g_np[name], rtol=tol, atol=tol * scale), f"gradient {name} differs"


def bench_comet(args, dtype):
    """The per-example COMET rows: [(n, numpy paths s, numpy levels s, dselectk s)]."""
    info = dselectk.build_info()
    print(f"per-example COMET forward+backward, B={args.batch}, p={args.p}, k={args.comet_k}, gamma={args.gamma}, "
          f"lambda={args.lam}, {dtype}; dselectk threads={info['num_threads']}, openmp={info['openmp']}, "
          f"BLAS={info['blas']}; NumPy {np.__version__}")
    print("numpy paths: products along root-to-leaf paths (the spec's form, like the DSelect-k twin); "
          "numpy levels: the heap a level at a time")
    print(f"{'n':>5} {'paths ms':>9} {'levels ms':>10} {'dselectk ms':>12} {'vs paths':>9} {'vs levels':>10}")
    rows = []
    for n in args.comet_n:
        rng = np.random.default_rng(1000 + n)
        B, p, k, g = args.batch, args.p, args.comet_k, args.gamma
        x = rng.standard_normal((B, p)).astype(dtype)
        U = rng.uniform(-0.05, 0.05, (k, n, p)).astype(dtype)
        b_U = rng.uniform(-0.05, 0.05, (k, n)).astype(dtype)
        # node maps large enough that z spreads over the fractional region and beyond (reach 0 below
        # saturated nodes)
        W = rng.uniform(-g / 8, g / 8, (k, n - 1, p)).astype(dtype)
        b_W = rng.uniform(-g / 4, g / 4, (k, n - 1)).astype(dtype)
        dw = rng.standard_normal((B, n)).astype(dtype)
        args_ = (x, U, b_U, W, b_W, g, dw, args.lam)
        ours = dselectk_comet_per_example(*args_)
        _check_agree(*numpy_comet_paths_per_example(*args_), *ours, dtype)
        _check_agree(*numpy_comet_per_example(*args_), *ours, dtype)
        t_paths, t_levels, t_c = median_times([lambda: numpy_comet_paths_per_example(*args_),
                                               lambda: numpy_comet_per_example(*args_),
                                               lambda: dselectk_comet_per_example(*args_)], args.repeat)
        rows.append((n, t_paths, t_levels, t_c))
        print(f"{n:>5} {t_paths * 1e3:>9.2f} {t_levels * 1e3:>10.2f} {t_c * 1e3:>12.2f} {t_paths / t_c:>8.1f}x "
              f"{t_levels / t_c:>9.1f}x")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gates", nargs="+", choices=["dselect_k", "comet"], default=["dselect_k", "comet"])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--p", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="DSelect-k selectors")
    ap.add_argument("--n", type=int, nargs="+", default=[8, 32, 128], help="DSelect-k experts")
    ap.add_argument("--comet-k", type=int, default=2, help="COMET trees")
    ap.add_argument("--comet-n", type=int, nargs="+", default=[8, 16, 64], help="COMET experts")
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="dselectk threads (default: all CPUs)")
    args = ap.parse_args(argv)
    if args.threads:
        dselectk.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
    rows = {}
    if "dselect_k" in args.gates:
        rows["dselect_k"] = bench_dselect_k(args, dtype)
    if "comet" in args.gates:
        rows["comet"] = bench_comet(args, dtype)
    return rows


def bench_dselect_k(args, dtype):
    """The per-example DSelect-k rows: [(n, numpy s, dselectk s)]."""
    info = dselectk.build_info()
    print(f"per-example DSelect-k forward+backward, B={args.batch}, p={args.p}, k={args.k}, gamma={args.gamma}, "
          f"lambda={args.lam}, {dtype}; dselectk threads={info['num_threads']}, openmp={info['openmp']}, "
          f"BLAS={info['blas']}; NumPy {np.__version__}")
    print(f"{'n':>5} {'numpy ms':>10} {'dselectk ms':>12} {'speedup':>8}")
    rows = []
    for n in args.n:
        rng = np.random.default_rng(n)
        m = F.n_bits(n)
        B, p, k, g = args.batch, args.p, args.k, args.gamma
        x = rng.standard_normal((B, p)).astype(dtype)
        G = rng.uniform(-0.05, 0.05, (k, p)).astype(dtype)
        b_G = rng.uniform(-0.05, 0.05, k).astype(dtype)
        # weights large enough that z spreads over the fractional region and beyond it
        W = rng.uniform(-g / 8, g / 8, (k, m, p)).astype(dtype)
        b_W = rng.uniform(-g / 4, g / 4, (k, m)).astype(dtype)
        dw = rng.standard_normal((B, n)).astype(dtype)
        args_ = (x, G, b_G, W, b_W, n, g, dw, args.lam)
        _check_agree(*numpy_dselect_k_per_example(*args_), *dselectk_per_example(*args_), dtype)
        t_np, t_c = median_times([lambda: numpy_dselect_k_per_example(*args_), lambda: dselectk_per_example(*args_)],
                                 args.repeat)
        rows.append((n, t_np, t_c))
        print(f"{n:>5} {t_np * 1e3:>10.2f} {t_c * 1e3:>12.2f} {t_np / t_c:>7.1f}x")
    return rows


if __name__ == "__main__":
    main()
