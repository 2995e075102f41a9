"""Regenerate every timing results file of issue #15 with one command:

    python benchmarks/run_all.py [--quick] [--only vs_torch conditional threads]

from the repository root, with dselectk built (``pip install -e .``, or ``python setup.py
build_ext --inplace`` and ``PYTHONPATH=.``). Each benchmark runs in its own process, one after the
other, and writes its Markdown table into benchmarks/results/:

    bench_vs_torch.py --workloads gate comet step cnn --threads 1 2   -> results/bench_vs_torch.md
    bench_conditional.py --threads 1                             -> results/bench_conditional.md
    bench_threads.py                                             -> results/bench_threads.md

About 20 minutes on 2 cores. Run it on a machine that is otherwise quiet (the 1-minute load
average, printed before each benchmark and beside every row, should be well below the CPU count);
``--quick`` is a smoke run whose numbers are rough.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
BENCHMARKS = {
    "vs_torch": ("bench_vs_torch.py", ["--workloads", "gate", "comet", "step", "cnn", "--threads", "1", "2"],
                 "bench_vs_torch.md"),
    "conditional": ("bench_conditional.py", ["--threads", "1"], "bench_conditional.md"),
    "threads": ("bench_threads.py", [], "bench_threads.md"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: short blocks, rough numbers")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    ap.add_argument("--results", default=RESULTS, help="directory for the .md files (default benchmarks/results)")
    args = ap.parse_args(argv)
    os.makedirs(args.results, exist_ok=True)
    for name in args.only:
        script, extra, out = BENCHMARKS[name]
        cmd = [sys.executable, os.path.join(HERE, script), *extra, "--out", os.path.join(args.results, out)]
        if args.quick:
            cmd.append("--quick")
        print(f"== {' '.join(cmd[1:])}  (load average {os.getloadavg()[0]:.1f})", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
