"""Per-example DSelect-k forward + backward: dselectk's C kernels against vectorised NumPy.

    python benchmarks/bench_gates.py [--batch 4096] [--p 64] [--k 4] [--n 8 32 128] [--repeat 7]

Both sides compute the same thing: alpha = x G^T + b_G, z^(i) = W^(i) x + b_W^(i), w (B, n), then
the gradients of <dw, w> + lambda * Omega with respect to x, G, b_G, W, b_W. They are checked to
agree before anything is timed. Times are the median of --repeat runs, measured in one process
(the machine is shared and noisy: compare the ratio, not the absolute times).
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


def dselectk_per_example(x, G, b_G, W, b_W, n, gamma, dw, lam):
    w, cache = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n, gamma)
    return w, F.dselect_k_per_example_backward(dw, cache, lam=lam)


def median_time(fn, repeat):
    """Median wall time of fn over `repeat` runs, after one warm-up run. Sleeps first: the other
    side's idle BLAS threads keep spinning for a while after its last call (NumPy's OpenBLAS for
    ~2^28 cycles) and would steal the cores this side is timed on."""
    time.sleep(0.5)
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--p", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="dselectk threads (default: all CPUs)")
    args = ap.parse_args(argv)
    if args.threads:
        dselectk.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
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
        w_np, g_np = numpy_dselect_k_per_example(*args_)
        w_c, g_c = dselectk_per_example(*args_)
        tol = 1e-3 if dtype == np.float32 else 1e-9
        assert np.allclose(w_c, w_np, rtol=tol, atol=tol), "forward outputs differ"
        for name in g_np:
            scale = max(1.0, float(np.abs(g_np[name]).max()))
            assert np.allclose(g_c[name], g_np[name], rtol=tol, atol=tol * scale), f"gradient {name} differs"
        t_np = median_time(lambda: numpy_dselect_k_per_example(*args_), args.repeat)
        t_c = median_time(lambda: dselectk_per_example(*args_), args.repeat)
        rows.append((n, t_np, t_c))
        print(f"{n:>5} {t_np * 1e3:>10.2f} {t_c * 1e3:>12.2f} {t_np / t_c:>7.1f}x")
    return rows


if __name__ == "__main__":
    main()
