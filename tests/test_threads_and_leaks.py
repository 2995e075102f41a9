"""Thread safety, thread settings, reference counts, memory leaks and GIL release of dselectk.

* Many Python threads calling the kernels at once (each on its own inputs, so that any shared
  scratch state would mix results up) get exactly the single-threaded results, whatever
  ``dselectk.set_num_threads`` says.
* ``set_num_threads`` / ``get_num_threads`` / ``build_info`` agree with each other.
* bottleneck-style leak checks: ~200 calls (successful and raising) leave the inputs' reference
  counts unchanged; 1000 calls do not grow the memory tracemalloc sees (NumPy reports its array
  data to tracemalloc, so a leaked output or a leaked converted copy of an input shows up), nor the
  process RSS.
* The C kernels release the GIL: another Python thread keeps running during a long call.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import dselectk
from dselectk import _C
from dselectk import functional as F

F64, F32 = np.float64, np.float32


def assert_same(a, b, path="result"):
    """Bitwise equality of nested results (arrays, tuples, dicts, floats)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert a.shape == b.shape and a.dtype == b.dtype, path
        assert np.array_equal(a, b, equal_nan=True), f"{path}: values differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture
def restore_threads():
    old = dselectk.get_num_threads()
    yield
    dselectk.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# Workloads: each is make(seed) -> (inputs, run) with run() a deterministic function of inputs
# ---------------------------------------------------------------------------------------------

def _per_example(seed, B=512, p=32, n=32, k=4, dtype=F64):
    rng = np.random.default_rng(seed)
    m = F.n_bits(n)
    x = rng.standard_normal((B, p)).astype(dtype)
    G = (0.3 * rng.standard_normal((k, p))).astype(dtype)
    b_G = rng.standard_normal(k).astype(dtype)
    W = (0.3 * rng.standard_normal((k, m, p))).astype(dtype)
    b_W = (0.5 * rng.standard_normal((k, m))).astype(dtype)
    dw = rng.standard_normal((B, n)).astype(dtype)
    inputs = [x, G, b_G, W, b_W, dw]

    def run():
        w, cache = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n, 1.0)
        grads = F.dselect_k_per_example_backward(dw, cache, lam=0.05, xi=0.05)
        return w, cache.gate.r, grads
    return inputs, run


def _top_k(seed, B=512, n=64, k=8, dtype=F64):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, n)).astype(dtype)
    dw = rng.standard_normal((B, n)).astype(dtype)
    inputs = [logits, dw]

    def run():
        w = F.top_k(logits, k)
        out = np.empty((B, n), dtype)  # private to the call: top_k uses out= as scratch
        F.top_k(logits, k, out=out)
        return w, out.copy(), F.top_k_backward(dw, w)
    return inputs, run


def _mix(seed, B=256, n=16, d=32, dtype=F64):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, B, d)).astype(dtype)
    w = F.top_k(rng.standard_normal((B, n)).astype(dtype), 4)
    w_static = rng.random(n).astype(dtype)
    w_static[::3] = 0
    dy = rng.standard_normal((B, d)).astype(dtype)
    f_bnd = np.ascontiguousarray(f.transpose(1, 0, 2))
    inputs = [f, w, w_static, dy, f_bnd]

    def run():
        return (F.mix_experts(f, w), F.mix_experts_backward(dy, f, w),
                F.mix_experts(f, w_static), F.mix_experts_backward(dy, f, w_static),
                F.mix_experts(f_bnd, w, layout="bnd"), F.mix_experts_backward(dy, f_bnd, w, layout="bnd"))
    return inputs, run


def _softmax_selector(seed, B=256, k=4, n=64, dtype=F64):
    rng = np.random.default_rng(seed)
    alpha = rng.standard_normal((B, k)).astype(dtype)
    beta = rng.standard_normal((B, k, n)).astype(dtype)
    dw = rng.standard_normal((B, n)).astype(dtype)
    inputs = [alpha, beta, dw]

    def run():
        w, cache = F.softmax_selector_forward(alpha, beta, 0.5)
        return w, F.softmax_selector_backward(dw, cache, lam=0.1), F.softmax_selector_entropy(cache)
    return inputs, run


def _linear(seed, B=512, p=96, o=48, dtype=F64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, p)).astype(dtype)
    W = rng.standard_normal((o, p)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    dy = rng.standard_normal((B, o)).astype(dtype)
    inputs = [x, W, b, dy]

    def run():
        return F.linear(x, W, b), F.linear_backward(dy, x, W)
    return inputs, run


def _elementwise(seed, N=40000, dtype=F32):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(N).astype(dtype)
    raw = rng.standard_normal(N).astype(dtype)
    s = rng.random((N // 8, 3)).astype(dtype)
    dr = rng.standard_normal((N // 8, 8)).astype(dtype)
    inputs = [t, raw, s, dr]

    def run():
        return (F.smooth_step(t, 0.7), F.smooth_step_backward(raw, t, 0.7), F.noisy_logits(t, raw, t),
                F.noisy_logits_backward(t, raw, raw), F.selector(s, 8), F.selector_backward(dr, s, 8),
                F.softmax(dr), F.softmax_backward(dr, F.softmax(dr)))
    return inputs, run


def _nn(seed, B=256, p=48, o=24, dtype=F64, gemm=True):
    """Layers, dropout, losses and optimizer steps (state private to each call). Without the
    GEMMs (gemm=False) nothing in it may depend on the thread count: the losses add fixed chunks
    in order and the dropout mask is a hash of the flat index."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, p)).astype(dtype)
    W = (0.2 * rng.standard_normal((p, o))).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    targets = rng.random(B).astype(dtype)
    labels = rng.integers(0, o, B)
    weights = rng.random(B).astype(dtype)
    params0 = rng.standard_normal(4096).astype(dtype)
    grads = rng.standard_normal(4096).astype(dtype)
    inputs = [x, W, b, targets, labels, weights, params0, grads]

    def run():
        h = F.dense_forward(x, W, b) if gemm else x[:, :o] + b
        a = F.relu_forward(h)
        d = F.dropout_forward(a, 0.25, seed, 3)
        loss1, dz1 = F.bce_with_logits(d[:, 0], targets, weights)
        loss2, dz2 = F.mse(d, a, weights)
        loss3, dz3 = F.softmax_cross_entropy(d, labels, weights)
        dd = F.dropout_backward(dz2 + dz3, 0.25, seed, 3)
        dh = F.relu_backward(dd, a)
        dW, db = np.zeros_like(W), np.zeros_like(b)
        dx = F.dense_backward(dh, x, W, dW, db) if gemm else None
        slabs = []
        for step in ("sgd", "adam", "adagrad"):
            params = params0.copy()
            if step == "sgd":
                v = np.zeros_like(params)
                for _ in range(3):
                    F.sgd_step(params, grads, v, 0.1, momentum=0.9, nesterov=True)
            elif step == "adam":
                m, v = np.zeros_like(params), np.zeros_like(params)
                for t in range(1, 4):
                    F.adam_step(params, grads, m, v, t, lr=0.01, weight_decay=0.01)
            else:
                acc = np.zeros_like(params)
                for _ in range(3):
                    F.adagrad_step(params, grads, acc, lr=0.05)
            slabs.append(params)
        return (h, d, loss1, dz1, loss2, dz2, loss3, dz3, dx, dW, db, *slabs)
    return inputs, run


def _sinkhorn(seed, K=4, n=24, iters=60, dtype=F64):
    """Sinkhorn forward (with and without its cache), backward with the regularizer, its value."""
    rng = np.random.default_rng(seed)
    log_alpha = rng.standard_normal((K, n, n)).astype(dtype)
    dP = rng.standard_normal((K, n, n)).astype(dtype)
    inputs = [log_alpha, dP]

    def run():
        P, cache = F.sinkhorn_forward(log_alpha, 0.05, iters)
        return (P, cache.logs, F.sinkhorn(log_alpha, 0.05, iters), F.sinkhorn_backward(dP, cache, lam=1e-2),
                F.sinkhorn_regularization(P))
    return inputs, run


def _dense_fused(seed, B=1024, p=128, o=256, dtype=F32):
    """The fused Dense layers (ReLU and dropout in the epilogue, their backward in dx's), large
    enough that the pool cuts every product into tiles."""
    rng = np.random.default_rng(seed)
    x = F.relu_forward(rng.standard_normal((B, p)).astype(dtype))
    W = (0.1 * rng.standard_normal((p, o))).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    dy = rng.standard_normal((B, o)).astype(dtype)
    inputs = [x, W, b, dy]

    def run():
        y = F.dense_forward(x, W, b, relu=True, dropout=(0.2, seed, 1))
        dW, db = np.zeros_like(W), np.zeros_like(b)
        dx = F.dense_backward(dy * (y > 0), x, W, dW, db, input_relu=True)
        return y, dx, dW, db
    return inputs, run


def _conv(seed, B=48, dtype=F32):
    """Convolution (a task per example forward, per slice backward), ReLU and max pooling."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 2, 14, 14)).astype(dtype)
    W = (0.2 * rng.standard_normal((6, 2, 3, 3))).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    inputs = [x, W, b]

    def run():
        a = F.conv2d_forward(x, W, b, relu=True)
        y, idx = F.max_pool2d_forward(a, 2)
        da = F.max_pool2d_backward(np.cos(y), idx, a.shape[2:], relu_y=y)
        dW, db = np.zeros_like(W), np.zeros_like(b)
        dx = F.conv2d_backward(da, x, W, dW, db)
        return a, y, dx, dW, db
    return inputs, run


def _comet(seed, B=512, p=24, n=16, k=2, dtype=F64):
    """Per-example COMET; its batched kernels on 4 B rows are large enough to run on several threads."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, p)).astype(dtype)
    U, b_U = rng.standard_normal((k, n, p)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    W = (0.2 * rng.standard_normal((k, n - 1, p))).astype(dtype)
    b_W = (0.5 * rng.standard_normal((k, n - 1))).astype(dtype)
    dw = rng.standard_normal((B, n)).astype(dtype)
    A, Z = rng.standard_normal((4 * B, k, n)).astype(dtype), rng.standard_normal((4 * B, k, n - 1)).astype(dtype)
    inputs = [x, U, b_U, W, b_W, dw, A, Z]

    def run():
        w, cache = F.comet_per_example_forward(x, U, b_U, W, b_W, 1.0)
        grads = F.comet_per_example_backward(dw, cache, lam=0.05)
        wb, cb = F.comet_forward(A, Z, 0.5)  # no BLAS: bitwise independent of the thread count
        return w, cache.gate.reach, grads, wb, F.comet_backward(None, cb, lam=0.3), F.comet_regularization(cb)
    return inputs, run


def _comet_kernels(seed, dtype=F32):
    """The batched COMET kernels alone (no BLAS)."""
    rng = np.random.default_rng(seed)
    B, k, n = 2048, 4, 9
    A, Z = rng.standard_normal((B, k, n)).astype(dtype), rng.standard_normal((B, k, n - 1)).astype(dtype)
    dw = rng.standard_normal((B, n)).astype(dtype)

    def kernels():
        w, cache = F.comet_forward(A, Z, 1.0)
        return w, cache, F.comet_backward(dw, cache, lam=0.2)
    return [A, Z, dw], kernels


WORKLOADS = {
    "comet_per_example": _comet,
    "comet_kernels_float32": _comet_kernels,
    "dselect_k_per_example": _per_example,
    "dselect_k_per_example_float32": lambda seed: _per_example(seed, dtype=F32),
    "top_k": _top_k,
    "mix_experts": _mix,
    "softmax_selector": _softmax_selector,
    "linear": _linear,
    "sinkhorn": _sinkhorn,
    "sinkhorn_float32": lambda seed: _sinkhorn(seed, dtype=F32),
    "elementwise_float32": _elementwise,
    "layers_losses_optimizers": _nn,
    # large enough for the loops of the losses, dropout and ReLU to run on several threads
    "losses_dropout_optimizers": lambda seed: _nn(seed, B=16384, gemm=False),
    "dense_fused": _dense_fused,
    "conv": _conv,
}


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_concurrent_calls_match_single_threaded(workload, num_threads, restore_threads):
    dselectk.set_num_threads(num_threads)
    cases = [WORKLOADS[workload](seed) for seed in range(8)]
    snapshots = [[a.copy() for a in inputs] for inputs, _ in cases]
    expected = [run() for _, run in cases]
    # every case twice, from 8 Python threads at once: 16 jobs = two waves of 8 released together
    jobs = [i for _ in range(2) for i in range(len(cases))]
    barrier = threading.Barrier(8)

    def job(i):
        try:
            barrier.wait(timeout=5)  # start together
        except threading.BrokenBarrierError:  # only a matter of timing, never of results
            pass
        return i, cases[i][1]()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(job, jobs))
    for i, got in results:
        assert_same(got, expected[i], f"{workload}[case {i}]")
    for (inputs, _), snap in zip(cases, snapshots):
        for a, s in zip(inputs, snap):
            assert np.array_equal(a, s), "an input was modified"


def test_concurrent_mixed_workloads_and_out(restore_threads):
    """Different kernels at once, including out= arrays private to each thread."""
    dselectk.set_num_threads(2)
    cases = [make(seed) for seed in range(3) for make in WORKLOADS.values()]
    expected = [run() for _, run in cases]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: cases[i][1](), list(range(len(cases))) * 2))
    for i, got in enumerate(results):
        assert_same(got, expected[i % len(cases)])


@pytest.mark.parametrize("workload", ["top_k", "mix_experts", "softmax_selector", "elementwise_float32",
                                      "losses_dropout_optimizers", "conv", "comet_kernels_float32", "sinkhorn"])
def test_results_do_not_depend_on_num_threads(workload, restore_threads):
    """Kernels without BLAS split work by rows (or experts), and the convolution's tasks (groups,
    fixed slices of the batch) and their single-threaded products depend on the geometry only:
    the thread count cannot change a bit."""
    _, run = WORKLOADS[workload](7)
    results = []
    for nt in (1, 2, 3):
        dselectk.set_num_threads(nt)
        results.append(run())
    assert_same(results[1], results[0])
    assert_same(results[2], results[0])


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_tiled_products_close_across_num_threads(threads, restore_threads):
    """The pool cuts products into tiles without splitting the inner dimension: every entry is
    the same dot product whatever the thread count (to the BLAS's rounding of a sub-block)."""
    _, run = WORKLOADS["dense_fused"](5)
    dselectk.set_num_threads(1)
    one = run()
    dselectk.set_num_threads(threads)
    for got, want in zip(run(), one):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _run_fresh_interpreter(code):
    """``python -c code`` importing the dselectk these tests import: from the directory above it (an
    installed package's site-packages, or a checkout built in place), never from the current
    directory, where a source checkout's unbuilt dselectk/ would shadow an installed one (CI)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(dselectk.__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                          env=dict(os.environ, PYTHONPATH=root))


def test_pool_survives_fork(restore_threads):
    """A child forked while the parent's pool has workers starts without them and creates its own."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    dselectk.set_num_threads(2)
    _, run = WORKLOADS["dense_fused"](1)
    want = run()
    assert dselectk.build_info()["pool_workers"] >= 1
    code = textwrap.dedent("""
        import os, sys, numpy as np, dselectk
        from dselectk import functional as F
        dselectk.set_num_threads(2)
        x = np.ones((2048, 256), np.float32); W = np.full((256, 256), 0.01, np.float32)
        F.dense_forward(x, W)  # workers in the parent
        pid = os.fork()
        if pid == 0:
            y = F.dense_forward(x, W)
            os._exit(0 if np.allclose(y, 2.56) else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    res = _run_fresh_interpreter(code)
    assert res.returncode == 0, res.stderr
    for got, w in zip(run(), want):  # and the parent's pool still works
        np.testing.assert_allclose(got, w, rtol=1e-6)


def test_small_work_starts_no_thread():
    """Work below two chunks runs in the calling thread: a small model trains at 2 threads without
    the pool starting a worker (which on a loaded machine could only cost time)."""
    if dselectk.build_info()["parallel_min_work"] == 0:
        pytest.skip("the sanitizer build threads every loop, however small")
    code = textwrap.dedent("""
        import numpy as np, dselectk
        dselectk.set_num_threads(2)
        rng = np.random.default_rng(0)
        X = rng.standard_normal((256, 12)).astype(np.float32)
        Y = [rng.standard_normal(256).astype(np.float32)]
        model = dselectk.MMoE(12, n_tasks=1, n_experts=4, expert_units=(16,), tower_units=(8,))
        dselectk.fit(model, X, Y, epochs=2, batch_size=64, verbose=0)
        print(dselectk.build_info()["pool_workers"])
    """)
    res = _run_fresh_interpreter(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "0"


def test_blas_results_close_across_num_threads(restore_threads):
    _, run = WORKLOADS["dselect_k_per_example"](3)
    dselectk.set_num_threads(1)
    one = run()
    dselectk.set_num_threads(2)
    two = run()
    np.testing.assert_allclose(two[0], one[0], rtol=1e-12, atol=1e-14)
    for key in one[2]:
        np.testing.assert_allclose(two[2][key], one[2][key], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Thread settings
# ---------------------------------------------------------------------------------------------

def test_build_info_keys_and_types():
    info = dselectk.build_info()
    assert set(info) == {"openmp", "blas", "num_threads", "blas_num_threads", "pool_workers", "parallel_min_work"}
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["blas"], str) and info["blas"]
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    assert isinstance(info["blas_num_threads"], int) and info["blas_num_threads"] >= 1
    assert isinstance(info["pool_workers"], int) and info["pool_workers"] >= 0
    assert info["num_threads"] == dselectk.get_num_threads()


@pytest.mark.parametrize("n", [1, 2, 3, 1])
def test_set_num_threads_roundtrip(n, restore_threads):
    dselectk.set_num_threads(n)
    assert dselectk.get_num_threads() == n
    info = dselectk.build_info()
    assert info["num_threads"] == n
    assert info["blas_num_threads"] == 1, "the pool splits the products; the BLAS itself stays at one thread"


def test_set_num_threads_rejects_bad_values(restore_threads):
    dselectk.set_num_threads(2)
    for bad, exc in ((0, ValueError), (-3, ValueError), (10**6, ValueError), (1.0, TypeError),
                     (True, TypeError), ("2", TypeError), (None, TypeError)):
        with pytest.raises(exc):
            dselectk.set_num_threads(bad)
        assert dselectk.get_num_threads() == 2, "a refused value changed the setting"


def test_default_num_threads_is_the_affinity_count():
    """Checked in a fresh interpreter: importing sets the default (DSELECTK_NUM_THREADS, else the
    CPUs this process may run on), and a bad DSELECTK_NUM_THREADS is an error."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(dselectk.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DSELECTK_NUM_THREADS", None)
    code = "import os, dselectk; print(dselectk.get_num_threads(), len(os.sched_getaffinity(0)))"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    got, cpus = map(int, res.stdout.split())
    assert got == cpus
    res = subprocess.run([sys.executable, "-c", code], env=dict(env, DSELECTK_NUM_THREADS="3"), cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[0]) == 3
    for bad in ("0", "abc"):
        res = subprocess.run([sys.executable, "-c", code], env=dict(env, DSELECTK_NUM_THREADS=bad), cwd=root,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "DSELECTK_NUM_THREADS" in res.stderr, (bad, res.stderr)


# ---------------------------------------------------------------------------------------------
# Leak checks: calls, successful and raising, built on non-contiguous inputs so that every call
# makes converted copies (the arrays most likely to leak on an error path)
# ---------------------------------------------------------------------------------------------

def _nc(a):
    """A non-contiguous (strided) view with a's values."""
    buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    v = buf[..., ::2]
    v[...] = a
    return v


def _leak_cases():
    """id -> (inputs, call, exception or None). Built fresh for every test."""
    rng = np.random.default_rng(11)

    def u(*shape, lo=-1.5, hi=1.5):
        return rng.uniform(lo, hi, size=shape)

    B, p, n, k, m, d = 16, 24, 8, 3, 3, 32
    x, G, b_G, W, b_W = _nc(u(B, p)), _nc(u(k, p)), u(k), _nc(u(k, m, p)), u(k, m)
    dw = _nc(u(B, n))
    alpha, Z = _nc(u(B, k)), _nc(u(B, k, m))
    w_pe, cache_pe = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n)
    _, sigma, sz, r = _C.dselect_k_forward(np.ascontiguousarray(alpha), np.ascontiguousarray(Z), n, 1.0)
    sigma_nc, sz_nc, r_nc = _nc(sigma), _nc(sz), _nc(r)
    logits = _nc(u(B, 64))
    f = _nc(u(n, B, d))
    w_static = u(n, lo=0, hi=1)
    w_static[::2] = 0
    w_pe_nc = _nc(F.top_k(u(B, n), 2))
    dy = _nc(u(B, d))
    w_many = _nc(np.stack([F.top_k(u(B, n), 2) for _ in range(3)]))  # T = 3 tasks
    dy_many = _nc(u(3, B, d))
    nan_dy_many = dy_many.copy()
    nan_dy_many[-1, -1, 0] = np.nan
    out_many = np.empty((3, B, d))
    beta = _nc(u(B, k, 64))
    ss_w, ss_cache = F.softmax_selector_forward(np.ascontiguousarray(alpha), np.ascontiguousarray(beta), 0.5)
    dw64 = _nc(u(B, 64))
    t = _nc(u(B, 64))
    s01 = _nc(u(B * 4, m, lo=0, hi=1))
    dr = _nc(u(B * 4, n))
    nan_Z = Z.copy()
    nan_Z[-1, -1, -1] = np.nan
    nan_dy = dy.copy()
    nan_dy[-1, 0] = np.inf
    out_bad = np.empty((B, n + 1))
    out_w = np.empty((B, n))
    out_ro = np.empty((B, 64))
    out_ro.flags.writeable = False
    f32 = _nc(u(B, p).astype(F32))
    log_alpha = _nc(u(3, n, n))
    P_sk, logs_sk = _C.sinkhorn_forward(np.ascontiguousarray(log_alpha), 0.3, 5)
    logs_nc, P_nc, dP_sk = _nc(logs_sk), _nc(P_sk), _nc(u(3, n, n))
    nan_log_alpha = log_alpha.copy()
    nan_log_alpha[-1, -1, -1] = np.nan

    # layers, losses, optimizer steps
    Wd, bd = _nc(u(p, d)), u(d)
    dWd, dbd = np.zeros((p, d)), np.zeros(d)
    dyd = _nc(u(B, d))
    z1, t01, wts = _nc(u(B, 1))[:, 0], _nc(u(B, 1, lo=0, hi=1))[:, 0], u(B, lo=0, hi=1)
    labels = np.arange(B) % 64
    labels_bad = labels.copy()
    labels_bad[-1] = 64
    N = 512
    params, grads, vel = u(N), _nc(u(N)), np.zeros(N)
    m1, v1, acc = np.zeros(N), np.zeros(N), np.zeros(N)
    grads_nan = grads.copy()
    grads_nan[-1] = np.nan

    # COMET: k = 3 trees over n = 8 experts
    cA, cZ = _nc(u(B, k, n)), _nc(u(B, k, n - 1, lo=-0.4, hi=0.4))
    cU, cW = _nc(u(k, n, p)), _nc(u(k, n - 1, p, lo=-0.05, hi=0.05))
    cb_U, cb_W = u(k, n), u(k, n - 1, lo=-0.1, hi=0.1)
    _, c_sz, c_ri, c_reach, c_g, c_norm = _C.comet_forward(np.ascontiguousarray(cA), np.ascontiguousarray(cZ), 1.0)
    c_cache = [_nc(a) for a in (c_sz, c_ri, c_reach, c_g, c_norm)]
    nan_cZ = cZ.copy()
    nan_cZ[0, 0, 0] = np.nan

    C = {
        "comet_forward_backward_regularization": (
            [cA, cZ, dw],
            lambda: (lambda wc: (F.comet_backward(dw, wc[1], 0.1), F.comet_regularization(wc[1])))(
                F.comet_forward(cA, cZ, 1.0)), None),
        "comet_static_out": ([cA, cZ, out_w], lambda: F.comet_forward(cA[0], cZ[0], 1.0, out=out_w[0]), None),
        "comet_per_example": (
            [x, cU, cb_U, cW, cb_W, dw],
            lambda: F.comet_per_example_backward(dw, F.comet_per_example_forward(x, cU, cb_U, cW, cb_W, 1.0)[1],
                                                 lam=0.1), None),
        "C.comet_backward": ([dw, cA, cZ, *c_cache], lambda: _C.comet_backward(dw, cA, cZ, *c_cache, 1.0, 0.1), None),
        "C.comet_backward_dw_None": ([cA, cZ, *c_cache], lambda: _C.comet_backward(None, cA, cZ, *c_cache, 1.0, 0.1),
                                     None),
        "comet_forward_nan_Z": ([cA, nan_cZ], lambda: F.comet_forward(cA, nan_cZ, 1.0), ValueError),
        "C.comet_forward_bad_out": ([cA, cZ, out_bad], lambda: _C.comet_forward(cA, cZ, 1.0, out_bad), ValueError),
        "C.comet_backward_bad_norm": (
            [dw, cA, cZ, *c_cache], lambda: _C.comet_backward(dw, cA, cZ, *c_cache[:4], c_cache[4][:, :1], 1.0),
            ValueError),
        "C.comet_backward_dtype": (
            [dw, cA, cZ], lambda: _C.comet_backward(dw, cA, cZ.astype(F32), *c_cache, 1.0), TypeError),
        "comet_k_too_large": ([x], lambda: F.comet_forward(np.ones((9, n)), np.ones((9, n - 1)), 1.0), ValueError),
        "dense_relu_dropout": (
            [x, Wd, bd], lambda: F.dropout_backward(F.relu_forward(F.dropout_forward(F.dense_forward(x, Wd, bd), 0.5, 1, 2)),
                                                    0.5, 1, 2), None),
        "dense_backward_accumulate": ([dyd, x, Wd, dWd, dbd], lambda: F.dense_backward(dyd, x, Wd, dWd, dbd), None),
        "losses": (
            [z1, t01, wts, logits, labels, dy],
            lambda: (F.bce_with_logits(z1, t01, wts), F.softmax_cross_entropy(logits, labels, wts),
                     F.mse(dy, dy[::-1], wts)), None),
        "optimizer_steps": (
            [params, grads, vel, m1, v1, acc],
            lambda: (F.sgd_step(params, grads, vel, 1e-4, momentum=0.9), F.adam_step(params, grads, m1, v1, 5),
                     F.adagrad_step(params, grads, acc)), None),
        "dense_backward_strided_dW": ([dyd, x, Wd], lambda: F.dense_backward(dyd, x, Wd, _nc(dWd)), ValueError),
        "dense_backward_bad_db": ([dyd, x, Wd, dWd], lambda: F.dense_backward(dyd, x, Wd, dWd, dbd[:3]), ValueError),
        "softmax_cross_entropy_bad_label": ([logits, labels_bad], lambda: F.softmax_cross_entropy(logits, labels_bad),
                                            ValueError),
        "softmax_cross_entropy_uint_label": (
            [logits], lambda: F.softmax_cross_entropy(logits, labels_bad.astype(np.uint16)), ValueError),
        "bce_bad_targets": ([z1], lambda: F.bce_with_logits(z1, z1 + 5), ValueError),
        "mse_negative_weights": ([dy], lambda: F.mse(dy, dy, -wts), ValueError),
        "sgd_nan_grads": ([params, vel], lambda: F.sgd_step(params, grads_nan, vel, 0.1, momentum=0.9), ValueError),
        "adam_bad_v": ([params, grads, m1], lambda: F.adam_step(params, grads, m1, v1[:7], 2), ValueError),
        "dropout_bad_seed": ([t], lambda: F.dropout_forward(t, 0.5, -1, 0), ValueError),
        # successful calls
        "per_example_forward_backward": (
            [x, G, b_G, W, b_W, dw],
            lambda: F.dselect_k_per_example_backward(dw, F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n)[1],
                                                     lam=0.1, xi=0.1), None),
        "dselect_k_forward_backward_regularization": (
            [alpha, Z, dw],
            lambda: (lambda wc: (F.dselect_k_backward(dw, wc[1], 0.1, 0.1), F.dselect_k_regularization(wc[1])))(
                F.dselect_k_forward(alpha, Z, n)), None),
        "C.dselect_k_backward": (
            [dw, sigma_nc, sz_nc, r_nc, Z], lambda: _C.dselect_k_backward(dw, sigma_nc, sz_nc, r_nc, Z, 1.0, 0.1, 0.1),
            None),
        "C.dselect_k_backward_dw_None": (
            [sigma_nc, sz_nc, r_nc, Z], lambda: _C.dselect_k_backward(None, sigma_nc, sz_nc, r_nc, Z, 1.0, 0.1), None),
        "C.dselect_k_forward_out": (
            [alpha, Z, out_w], lambda: _C.dselect_k_forward(alpha, Z, n, 1.0, out=out_w), None),
        "top_k_softmax_and_backwards": (
            [logits, dw64],
            lambda: (F.top_k_backward(dw64, F.top_k(logits, 5)), F.softmax_backward(dw64, F.softmax(logits))), None),
        "top_k_out": ([logits], lambda: F.top_k(logits, 5, out=np.empty((B, 64))), None),
        "mix_experts_static_skip_zero": (
            [f, w_static, dy], lambda: (F.mix_experts(f, w_static), F.mix_experts_backward(dy, f, w_static)), None),
        "mix_experts_per_example": (
            [f, w_pe_nc, dy],
            lambda: (F.mix_experts(f, w_pe_nc, skip_zero=False), F.mix_experts_backward(dy, f, w_pe_nc)), None),
        "mix_experts_many": (
            [f, w_many, dy_many, out_many],
            lambda: (F.mix_experts_many(f, w_many), F.mix_experts_many(f, w_many, skip_zero=False, out=out_many),
                     F.mix_experts_many_backward(dy_many, f, w_many)), None),
        "softmax_selector": (
            [alpha, beta, dw64],
            lambda: (lambda wc: (F.softmax_selector_backward(dw64, wc[1], 0.1), F.softmax_selector_entropy(wc[1])))(
                F.softmax_selector_forward(alpha, beta, 0.5)), None),
        "elementwise": (
            [t, dw64, s01, dr],
            lambda: (F.smooth_step(t), F.smooth_step_backward(dw64, t), F.noisy_logits(t, dw64, t),
                     F.noisy_logits_backward(t, dw64, t), F.selector(s01, n), F.selector_backward(dr, s01, n),
                     _C.selector_entropy(_nc(r.reshape(-1, n))), _C.selector_mass_penalty(_nc(r.reshape(-1, n)))),
            None),
        "linear": ([x, G, b_G, dw], lambda: (F.linear(x, G, b_G), F.linear_backward(F.linear(x, G), x, G)), None),
        "sinkhorn_forward_backward_regularization": (
            [log_alpha, dP_sk],
            lambda: (lambda pc: (F.sinkhorn_backward(dP_sk, pc[1], lam=0.1), F.sinkhorn_backward(None, pc[1], lam=0.1),
                                 F.sinkhorn_regularization(pc[0])))(F.sinkhorn_forward(log_alpha, 0.3, 5)), None),
        "sinkhorn_out": ([log_alpha], lambda: F.sinkhorn(log_alpha, 0.3, 5, out=np.empty((3, n, n))), None),
        "C.sinkhorn_backward": ([dP_sk, P_nc, logs_nc], lambda: _C.sinkhorn_backward(dP_sk, P_nc, logs_nc, 0.3, 0.1),
                                None),
        # calls that raise after inputs were converted (and outputs allocated)
        "sinkhorn_nan": ([nan_log_alpha], lambda: F.sinkhorn_forward(nan_log_alpha, 0.3, 5), ValueError),
        "sinkhorn_bad_out": ([log_alpha], lambda: F.sinkhorn(log_alpha, 0.3, 5, out=np.empty((3, n, n), F32)),
                             TypeError),
        "C.sinkhorn_backward_bad_P": ([dP_sk, logs_nc], lambda: _C.sinkhorn_backward(dP_sk, P_nc[:2], logs_nc, 0.3),
                                      ValueError),
        "C.sinkhorn_backward_dtype": ([logs_nc, P_nc], lambda: _C.sinkhorn_backward(dP_sk.astype(F32), P_nc, logs_nc,
                                                                                  0.3), TypeError),
        "sinkhorn_overflow": ([log_alpha], lambda: F.sinkhorn(log_alpha, 1e-300, 5), ValueError),
        "dselect_k_forward_nan_Z": ([alpha, nan_Z], lambda: F.dselect_k_forward(alpha, nan_Z, n), ValueError),
        "C.dselect_k_forward_bad_out": ([alpha, Z, out_bad], lambda: _C.dselect_k_forward(alpha, Z, n, 1.0, out_bad),
                                        ValueError),
        "C.dselect_k_backward_bad_Z": (
            [dw, sigma_nc, sz_nc, r_nc, Z], lambda: _C.dselect_k_backward(dw, sigma_nc, sz_nc, r_nc, Z[:, :2], 1.0),
            ValueError),
        "C.dselect_k_backward_dtype": (
            [dw, sigma_nc, sz_nc, r_nc, Z],
            lambda: _C.dselect_k_backward(dw, sigma_nc, sz_nc, r_nc, Z.astype(F32), 1.0), TypeError),
        "per_example_bad_b_W": ([x, G, b_G, W], lambda: F.dselect_k_per_example_forward(x, G, b_G, W, b_W[:, :2], n),
                                ValueError),
        "per_example_k_too_large": ([x], lambda: F.dselect_k_per_example_forward(
            x, _nc(np.ones((9, p))), np.ones(9), np.ones((9, m, p)), np.ones((9, m)), n), ValueError),
        "top_k_k_too_large": ([logits], lambda: F.top_k(logits, 65), ValueError),
        "top_k_readonly_out": ([logits, out_ro], lambda: F.top_k(logits, 5, out=out_ro), ValueError),
        "softmax_backward_mismatch": ([dw64, logits], lambda: _C.softmax_backward(dw64, logits.astype(F32)),
                                      TypeError),
        "mix_experts_bad_out": ([f, w_static], lambda: _C.mix_experts_forward(f, w_static, "nbd", True, out_bad),
                                ValueError),
        "mix_experts_backward_bad_dy": ([f, w_static, dy], lambda: F.mix_experts_backward(dy[:, :5], f, w_static),
                                        ValueError),
        "mix_experts_backward_nan_dy": ([f, w_pe_nc, nan_dy], lambda: F.mix_experts_backward(nan_dy, f, w_pe_nc),
                                        ValueError),
        "mix_experts_many_bad_out": ([f, w_many], lambda: _C.mix_experts_many_forward(f, w_many, True, out_bad),
                                     ValueError),
        "mix_experts_many_backward_bad_dy": (
            [f, w_many, dy_many], lambda: F.mix_experts_many_backward(dy_many[:, :, :5], f, w_many), ValueError),
        "mix_experts_many_backward_nan_dy": (
            [f, w_many, nan_dy_many], lambda: F.mix_experts_many_backward(nan_dy_many, f, w_many), ValueError),
        "mix_experts_many_no_tasks": ([f, w_many], lambda: F.mix_experts_many(f, w_many[:0]), ValueError),
        "mix_experts_bad_layout": ([f, w_static], lambda: F.mix_experts(f, w_static, layout="xyz"), ValueError),
        "softmax_selector_backward_bad_sigma": (
            [dw64], lambda: _C.softmax_selector_backward(dw64, _nc(ss_cache.sigma[:, :2]), _nc(ss_cache.P), 0.5),
            ValueError),
        "softmax_selector_T": ([alpha, beta], lambda: F.softmax_selector_forward(alpha, beta, 0.0), ValueError),
        "linear_bad_b": ([x, G], lambda: F.linear(x, G, b_G[:2]), ValueError),
        "linear_backward_nan": ([x, G, nan_dy], lambda: _C.linear_backward(nan_dy[:, :k], x, G), ValueError),
        "linear_dtype_mismatch": ([x, f32], lambda: F.linear(x, f32), TypeError),
        "not_an_array": ([x], lambda: F.linear(x, [[1.0] * p]), TypeError),
        "selector_entropy_bad_eps": ([dr], lambda: _C.selector_entropy(dr, -1.0), ValueError),
        "noisy_logits_shape": ([t], lambda: _C.noisy_logits_forward(t[0], t[1], t[2, :5]), ValueError),
    }
    return C


LEAK_CASE_IDS = list(_leak_cases())


def _run(call, exc):
    if exc is None:
        return call()
    try:
        call()
    except exc:
        return None
    raise AssertionError(f"expected {exc.__name__}")


@pytest.mark.parametrize("case", LEAK_CASE_IDS)
def test_refcounts_of_inputs_unchanged(case):
    inputs, call, exc = _leak_cases()[case]
    _run(call, exc)  # warm-up
    gc.collect()
    before = [sys.getrefcount(a) for a in inputs]
    for _ in range(200):
        result = _run(call, exc)
        del result
    gc.collect()
    after = [sys.getrefcount(a) for a in inputs]
    assert after == before, f"refcounts of the inputs changed: {before} -> {after}"


RAW_OUTPUT_CASES = {
    "smooth_step_forward": lambda a: _C.smooth_step_forward(a["t"], 1.0),
    "smooth_step_forward_out": lambda a: _C.smooth_step_forward(a["t"], 1.0, a["out_t"]),
    "selector_forward": lambda a: _C.selector_forward(a["s"], 8),
    "dselect_k_forward": lambda a: _C.dselect_k_forward(a["alpha"], a["Z"], 8, 1.0),
    "dselect_k_backward": lambda a: _C.dselect_k_backward(a["dw"], *a["cache"], a["Z"], 1.0, 0.1, 0.1),
    "softmax_forward": lambda a: _C.softmax_forward(a["logits"]),
    "topk_forward": lambda a: _C.topk_forward(a["logits"], 3),
    "softmax_selector_forward": lambda a: _C.softmax_selector_forward(a["alpha"], a["beta"], 1.0),
    "mix_experts_backward": lambda a: _C.mix_experts_backward(a["dy"], a["f"], a["w"]),
    "mix_experts_many_forward": lambda a: _C.mix_experts_many_forward(a["f"], a["w3"]),
    "mix_experts_many_backward": lambda a: _C.mix_experts_many_backward(a["dy3"], a["f"], a["w3"]),
    "linear_backward": lambda a: _C.linear_backward(a["dy"], a["x"], a["Wl"]),
    "linear_backward_no_dx_db": lambda a: _C.linear_backward(a["dy"], a["x"], a["Wl"], False, False),
    "dense_backward": lambda a: _C.dense_backward(a["dy"], a["x"], a["Wl"].T.copy(), a["dW"]),
    "bce_with_logits": lambda a: _C.bce_with_logits(a["t"], a["t01"]),
    "softmax_cross_entropy": lambda a: _C.softmax_cross_entropy(a["logits"], a["labels"], a["w6"][:4]),
    "dropout_forward": lambda a: _C.dropout_forward(a["t"], 0.5, 3, 4),
    "sinkhorn_forward": lambda a: _C.sinkhorn_forward(a["beta"][:, :3, :3].copy(), 0.5, 3),
    "sinkhorn_backward": lambda a: _C.sinkhorn_backward(None, *_C.sinkhorn_forward(a["beta"][:, :3, :3].copy(), 0.5, 3),
                                                        0.5, 0.1),
    "comet_forward": lambda a: _C.comet_forward(a["cA"], a["cZ"], 1.0),
    "comet_backward": lambda a: _C.comet_backward(a["dw6"], a["cA"], a["cZ"], *a["ccache"], 1.0, 0.1),
    "comet_leaf_nodes": lambda a: _C.comet_leaf_nodes(6),
}


def _raw_inputs():
    rng = np.random.default_rng(5)
    alpha, Z = rng.standard_normal((4, 3)), rng.standard_normal((4, 3, 3))
    _, sigma, sz, r = _C.dselect_k_forward(alpha, Z, 8, 1.0)
    cA, cZ = rng.standard_normal((4, 2, 6)), 0.3 * rng.standard_normal((4, 2, 5))
    ccache = _C.comet_forward(cA, cZ, 1.0)[1:]
    return dict(cA=cA, cZ=cZ, ccache=ccache, dw6=rng.standard_normal((4, 6)),t=_nc(rng.standard_normal(10)), out_t=np.empty(10), s=rng.random((5, 3)), alpha=alpha, Z=Z,
                dw=rng.standard_normal((4, 8)), cache=(sigma, sz, r), logits=rng.standard_normal((4, 6)),
                beta=rng.standard_normal((4, 3, 6)), dy=rng.standard_normal((4, 5)),
                f=rng.standard_normal((6, 4, 5)), w=rng.random(6), x=rng.standard_normal((4, 7)),
                Wl=rng.standard_normal((5, 7)), dW=np.zeros((7, 5)), t01=rng.random(10), labels=np.array([0, 5, 2, 1]),
                w6=rng.random(6), w3=rng.random((2, 4, 6)), dy3=rng.standard_normal((2, 4, 5)))


@pytest.mark.parametrize("case", list(RAW_OUTPUT_CASES))
def test_raw_outputs_are_owned_only_by_the_caller(case):
    """An output array of a _C function has no reference but the caller's (else it would leak)."""
    args = _raw_inputs()
    result = RAW_OUTPUT_CASES[case](args)
    # counted outside assert statements: pytest's assertion rewriting keeps extra references
    count = sys.getrefcount(result)
    if isinstance(result, tuple):
        counts = [sys.getrefcount(result[i]) for i in range(len(result)) if result[i] is not None]
        assert count == 2
        assert counts == [2] * len(counts), "an output array has an extra reference"
        for a in result:
            assert not isinstance(a, np.ndarray) or (a.base is None and a.flags.owndata)
    elif isinstance(result, np.ndarray):
        if case.endswith("_out"):
            assert result is args["out_t"]
            assert count == 3  # result + args dict + argument
        else:
            assert count == 2, "the output has an extra reference"
            assert result.base is None and result.flags.owndata
    del result
    refs = {k: sys.getrefcount(v) for k, v in args.items() if isinstance(v, np.ndarray)}
    for _ in range(50):
        RAW_OUTPUT_CASES[case](args)
    assert {k: sys.getrefcount(v) for k, v in args.items() if isinstance(v, np.ndarray)} == refs


def test_refcount_of_out_and_dtype_objects_unchanged():
    x = np.ones((8, 4))
    W = np.ones((3, 4))
    out = np.empty((8, 3))
    bad = np.empty((8, 2))
    dtype_refs = (sys.getrefcount(np.dtype(F64)), sys.getrefcount(np.dtype(F32)))
    before = (sys.getrefcount(out), sys.getrefcount(bad))
    for _ in range(300):
        assert F.linear(x, W, out=out) is out
        with pytest.raises(ValueError):
            F.linear(x, W, out=bad)
        with pytest.raises(TypeError):
            F.linear(x, W.astype(F32))
    assert (sys.getrefcount(out), sys.getrefcount(bad)) == before
    after = (sys.getrefcount(np.dtype(F64)), sys.getrefcount(np.dtype(F32)))
    assert abs(after[0] - dtype_refs[0]) < 50 and abs(after[1] - dtype_refs[1]) < 50, (dtype_refs, after)


@pytest.mark.parametrize("case", LEAK_CASE_IDS)
def test_no_memory_growth_tracemalloc(case):
    inputs, call, exc = _leak_cases()[case]
    tracemalloc.start()
    try:
        for _ in range(50):  # warm-up: caches, free lists
            _run(call, exc)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            _run(call, exc)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # one leaked copy or output per call would be >= 1000 * 200 bytes = 200 kB; allow 32 kB noise
    assert grown < 32 * 1024, f"{grown} bytes more traced after 1000 calls"


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_no_rss_growth_over_many_calls(restore_threads):
    """RSS sees allocations tracemalloc does not (kernel or BLAS mallocs)."""
    dselectk.set_num_threads(1)
    rng = np.random.default_rng(2)
    B, p, n, k = 128, 32, 16, 4
    m = F.n_bits(n)
    x, G, b_G = _nc(rng.standard_normal((B, p))), rng.standard_normal((k, p)), rng.standard_normal(k)
    W, b_W = rng.standard_normal((k, m, p)), rng.standard_normal((k, m))
    dw = rng.standard_normal((B, n))
    f = _nc(rng.standard_normal((n, B, 16)))
    logits = _nc(rng.standard_normal((B, 64)))
    bad_Z = np.full((B, k, m), np.nan)

    def step():
        w, cache = F.dselect_k_per_example_forward(x, G, b_G, W, b_W, n)
        F.dselect_k_per_example_backward(dw, cache, lam=0.1, xi=0.1)
        y = F.mix_experts(f, w)
        F.mix_experts_backward(y, f, w)
        F.top_k(logits, 4)
        with pytest.raises(ValueError):
            F.dselect_k_forward(cache.gate.sigma, bad_Z, n)
        with pytest.raises(ValueError):
            F.mix_experts_backward(y[:, :3], f, w)

    for _ in range(100):
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(1000):
        step()
    gc.collect()
    grown = _rss_bytes() - before
    # a leaked output per step would be >= 1000 * 16 kB = 16 MB
    assert grown < 6 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB over 1000 steps"


# ---------------------------------------------------------------------------------------------
# The GIL is released during the kernels
# ---------------------------------------------------------------------------------------------

def _big_call(kind):
    rng = np.random.default_rng(0)
    if kind == "linear_forward(BLAS)":
        x, W = rng.standard_normal((1024, 1536)), rng.standard_normal((1536, 1536))
        return lambda: _C.linear_forward(x, W)
    if kind == "topk_forward":
        logits = rng.standard_normal((1536, 1024))
        return lambda: _C.topk_forward(logits, 48)
    if kind == "sinkhorn_forward":
        log_alpha = rng.standard_normal((8, 64, 64))
        return lambda: _C.sinkhorn_forward(log_alpha, 1e-3, 1000, False)
    if kind == "comet_backward":
        A, Z = rng.standard_normal((2048, 4, 512)), 0.3 * rng.standard_normal((2048, 4, 511))
        cache = _C.comet_forward(A, Z, 1.0)[1:]
        dw = rng.standard_normal((2048, 512))
        return lambda: _C.comet_backward(dw, A, Z, *cache, 1.0, 0.1)
    if kind == "dselect_k_backward":
        alpha, Z = rng.standard_normal((40, 8)), rng.standard_normal((40, 8, 12))
        _, sigma, sz, r = _C.dselect_k_forward(alpha, Z, 4096, 1.0)
        dw = rng.standard_normal((40, 4096))
        return lambda: _C.dselect_k_backward(dw, sigma, sz, r, Z, 1.0, 0.1, 0.1)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["linear_forward(BLAS)", "topk_forward", "dselect_k_backward", "comet_backward",
                                  "sinkhorn_forward"])
def test_gil_released_during_long_call(kind, restore_threads):
    """While a worker thread is inside one long C call, the main thread keeps executing Python.
    If the call held the GIL, the main thread could not run at all during it, so the longest gap
    between its consecutive time stamps would be the whole call. This needs neither two idle cores
    nor quiet timing: a held GIL gives a gap >= the call, a released one gaps of a few ms."""
    dselectk.set_num_threads(1)
    call = _big_call(kind)
    call()  # warm-up (page faults of the first allocation)
    span = {}
    started = threading.Event()

    def worker():
        started.set()
        time.sleep(0.02)  # let the main thread enter its loop
        span["start"] = time.perf_counter()
        call()
        span["end"] = time.perf_counter()

    th = threading.Thread(target=worker)
    stamps = []
    th.start()
    started.wait()
    while th.is_alive():
        stamps.append(time.perf_counter())
        # keep the list short: one stamp per ~0.2 ms of pure-Python work
        for _ in range(200):
            pass
    th.join()
    start, end = span["start"], span["end"]
    duration = end - start
    if duration < 0.06:
        pytest.skip(f"the call took only {duration * 1e3:.0f} ms, too short to tell")
    inside = [start] + [s for s in stamps if start < s < end] + [end]
    max_gap = max(b - a for a, b in zip(inside, inside[1:]))
    assert max_gap < 0.5 * duration, (
        f"the main thread was stalled {max_gap * 1e3:.0f} ms of a {duration * 1e3:.0f} ms call: GIL held?")
