"""Threads that never stall: the MMoE step and the README demo beside a competing busy process.

    python benchmarks/bench_threads.py [--quick] [--out FILE.md] [--skip-demo]

A busy process (``python -c "while True: pass"``) is started pinned to the last CPU of this
process's affinity mask, and is paused (SIGSTOP) or running (SIGCONT) during each timing block:

1. the MMoE training step of ``bench_train_step.py`` (8 experts Dense(256), 2 tasks, per-example
   DSelect-k, Adam) at batch 128 and 1024, timed at 1 thread and at 2 threads, each with the busy
   process paused ("quiet") and running ("one core busy"), in interleaved blocks (median of each);
2. the README demo (``dselectk demo``: two MMoE models trained for 12 epochs), its wall time in a
   fresh process with DSELECTK_NUM_THREADS=1 and with the default thread count, with the busy
   process paused and running, interleaved, median of --demo-runs.

The ratio of issue #15's table is "2 threads with one core busy / 1 thread quiet" (throughputs):
at least 0.9 means that a user whose machine has one core taken by something else loses at most
10% against a quiet single core. "Quiet" only means that our busy process is paused: whatever
else runs on the machine runs in both; the 1-minute load average is printed with every row.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np

import dselectk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_model, fmt_load, interleaved  # noqa: E402
from bench_train_step import make_step  # noqa: E402


class BusyCore:
    """A CPU-bound child process pinned to one CPU, paused until ``run(True)``. A context manager:
    the child is killed on exit (also on an exception)."""

    def __init__(self, cpu):
        self.cpu = cpu
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            os.sched_setaffinity(self.proc.pid, {cpu})
        except (AttributeError, OSError):  # not Linux: the child runs wherever the OS puts it
            pass
        self.running = True
        self.run(False)

    def run(self, on):
        if on != self.running:
            os.kill(self.proc.pid, signal.SIGCONT if on else signal.SIGSTOP)
            self.running = on

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def busy_cpu():
    """The CPU the busy process is pinned to: the last of this process's affinity mask."""
    try:
        return max(os.sched_getaffinity(0))
    except AttributeError:
        return (os.cpu_count() or 1) - 1


def step_rows(busy, batches, blocks, block_time, pause):
    from dselectk.gates import DSelectK
    from dselectk.models import MMoE

    rows = []
    for batch in batches:
        rng = np.random.default_rng(0)
        X = rng.standard_normal((batch, 128)).astype(np.float32)
        Y = [rng.standard_normal((batch, 1)).astype(np.float32), (rng.random((batch, 1)) < 0.5).astype(np.float32)]
        model = MMoE(128, n_tasks=2, n_experts=8, expert_units=(256,), tower_units=(256,), task_losses=["mse", "bce"],
                     gate=DSelectK(2, entropy_reg=0.1, per_example=True), seed=0)
        step = make_step(model, dselectk.optim.Adam(model.slab.data, model.slab.grad, lr=1e-4), X, Y)
        settings = {"1T quiet": (1, False), "2T quiet": (2, False), "1T busy": (1, True), "2T busy": (2, True)}

        def between(name):
            threads, on = settings[name]
            dselectk.set_num_threads(threads)
            busy.run(on)

        t = interleaved({name: step for name in settings}, blocks, block_time, pause, between=between)
        busy.run(False)
        rows.append((batch, {name: batch / s for name, s in t.items()}, fmt_load()))
    return rows


DEMO = ("import time, dselectk.demo as d; t = time.perf_counter(); d.run_mmoe(out=lambda *a: None); "
        "print(time.perf_counter() - t)")


def demo_seconds(threads):
    """Wall time of the README demo's training (dselectk.demo.run_mmoe) in a fresh process, with
    DSELECTK_NUM_THREADS=threads (None: the default thread count)."""
    env = dict(os.environ)
    env.pop("DSELECTK_NUM_THREADS", None)
    if threads is not None:
        env["DSELECTK_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", DEMO], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def demo_rows(busy, runs):
    settings = {"1T quiet": (1, False), "default quiet": (None, False), "1T busy": (1, True),
                "default busy": (None, True)}
    times = {name: [] for name in settings}
    for r in range(runs):
        for name in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
            threads, on = settings[name]
            busy.run(on)
            time.sleep(0.2)
            times[name].append(demo_seconds(threads))
    busy.run(False)
    return {name: float(np.median(v)) for name, v in times.items()}, fmt_load()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run: numbers are rough")
    ap.add_argument("--blocks", type=int, default=None, help="timing blocks per setting (default 9, --quick 3)")
    ap.add_argument("--block-time", type=float, default=None, help="seconds per block (default 0.5, --quick 0.05)")
    ap.add_argument("--demo-runs", type=int, default=None, help="demo runs per setting (default 5, --quick 1)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--out", help="also write the Markdown report to this file")
    args = ap.parse_args(argv)
    blocks = args.blocks or (3 if args.quick else 9)
    block_time = args.block_time or (0.05 if args.quick else 0.5)
    demo_runs = args.demo_runs or (1 if args.quick else 5)
    default_threads = dselectk.get_num_threads()
    lines = []

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    info = dselectk.build_info()
    cpu = busy_cpu()
    out("# Threads beside a busy core")
    out()
    out(f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs visible, {len(os.sched_getaffinity(0))} in this "
        f"process's affinity mask; Python {platform.python_version()}; dselectk {dselectk.__version__} "
        f"(BLAS {info['blas']}); default thread count {default_threads}")
    out(f"- busy process: `python -c \"while True: pass\"` pinned to CPU {cpu}, paused (quiet) or running (busy) "
        "during each block; load = the 1-minute load average after the row")
    out(f"- step: median of {blocks} interleaved blocks of ~{block_time:g} s per setting"
        f"{' (--quick: rough numbers)' if args.quick else ''}")
    out()
    with BusyCore(cpu) as busy:
        out("## MMoE training step (8 experts Dense(256), 2 tasks, per-example DSelect-k, Adam), examples/s")
        out()
        out("| batch | 1T quiet | 2T quiet | 1T busy | 2T busy | 2T busy / 1T quiet | 2T quiet / 1T quiet | load |")
        out("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for batch, r, load in step_rows(busy, (128, 1024), blocks, block_time, 0.2):
            out(f"| {batch} | {r['1T quiet']:,.0f} | {r['2T quiet']:,.0f} | {r['1T busy']:,.0f} | {r['2T busy']:,.0f} | "
                f"{r['2T busy'] / r['1T quiet']:.2f} | {r['2T quiet'] / r['1T quiet']:.2f} | {load} |")
        out()
        if not args.skip_demo:
            t, load = demo_rows(busy, demo_runs)
            out(f"## README demo (`dselectk demo`: two MMoE trainings), wall seconds, median of {demo_runs} runs")
            out()
            out(f"| 1T quiet | default ({default_threads}) quiet | 1T busy | default busy | 1T quiet / default busy "
                "| 1T busy / default busy | load |")
            out("|---:|---:|---:|---:|---:|---:|---:|")
            out(f"| {t['1T quiet']:.2f} | {t['default quiet']:.2f} | {t['1T busy']:.2f} | {t['default busy']:.2f} | "
                f"{t['1T quiet'] / t['default busy']:.2f} | {t['1T busy'] / t['default busy']:.2f} | {load} |")
            out()
            out("The ratios are throughputs (inverse times): `1T quiet / default busy` is issue #15's "
                "\"2 threads with one core busy / 1 thread quiet\" for the demo, `1T busy / default busy` >= 1 "
                "means the default is not slower than 1 thread on the loaded machine.")
            out()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
