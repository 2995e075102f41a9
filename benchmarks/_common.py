"""What the benchmark scripts share: interleaved timing, the machine's description and load, and
the sgemm peak that every table's GFLOP/s are compared with.

Timing rule (all scripts): the callables of one table row are timed in blocks interleaved in ABBA
order, a short pause before each block (so that idle threads of the previous block stop spinning),
and each reports the median block; ratios of numbers taken this way, in one process run, are what
the tables compare. The machine these scripts run on is often shared: the 1-minute load average is
printed beside every row.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

from dselectk import functional as F

PEAK_N = 1536  # the square sgemm of the peak: 2 * 1536^3 = 7.2 GFLOP, ~80 ms on one core at 90 GFLOP/s


def load_average():
    """The 1-minute load average (processes running or waiting for a CPU), or None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def fmt_load(load=None):
    load = load_average() if load is None else load
    return "n/a" if load is None else f"{load:.1f}"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _iterations(fn, block_time):
    """Calls per block so that a block lasts about block_time (at least 1)."""
    fn()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, int(round(block_time / max(dt, 1e-9))))


def interleaved(fns, blocks, block_time, pause, between=None):
    """{name: median seconds per call}: blocks of each fn, interleaved (ABBA...), median over
    blocks. ``between(name)``, if given, runs before each block's pause (e.g. to start or stop a
    competing process)."""
    names = list(fns)
    iters = {}
    for name in names:
        if between is not None:
            between(name)
        iters[name] = _iterations(fns[name], block_time)
    times = {name: [] for name in names}
    for b in range(blocks):
        for name in (names if b % 2 == 0 else names[::-1]):
            fn, n = fns[name], iters[name]
            if between is not None:
                between(name)
            time.sleep(pause)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(v) for name, v in times.items()}


def sgemm_peak(n=PEAK_N, seed=0):
    """(callable, flops): one square float32 product (n, n) x (n, n) through dselectk's own GEMM
    path (functional.dense_forward: the vendored OpenBLAS at dselectk's thread count), the
    machine's practical sgemm peak to put beside each step's GFLOP/s."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    out = np.empty((n, n), np.float32)

    def gemm():
        with F.trusted_inputs():
            F.dense_forward(a, b, out=out)

    return gemm, 2.0 * n ** 3


def gflops(flops, seconds):
    return flops / seconds / 1e9
