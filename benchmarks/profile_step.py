"""The MMoE training step of bench_vs_torch.py in a loop, for a profiler.

    perf record -e cpu-clock -D 3000 -o step.data -- python benchmarks/profile_step.py --gate per_example_dselect_k --batch 128
    perf report -i step.data --stdio --sort dso,sym | head -40
    python benchmarks/profile_step.py --gate static_dselect_k --batch 1024 --cprofile   # Python-level calls

The model: 8 experts Dense(256) + ReLU on 128 inputs, 2 tasks with Dense(256) + ReLU towers (MSE and
BCE), Adam. ``perf``'s ``-D`` skips the start-up (imports, model building and 20 warm-up steps take
well under 3 s); ``cpu-clock`` works where the hardware counters are not exposed (VMs). Prints the
mean step time at the end.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import numpy as np

import dselectk
from dselectk.gates import DSelectK, TopK
from dselectk.models import MMoE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import make_step  # noqa: E402

GATES = {"per_example_dselect_k": DSelectK(2, entropy_reg=0.1, per_example=True),
         "per_example_top_k": TopK(2, per_example=True),
         "static_dselect_k": DSelectK(2, entropy_reg=0.1, per_example=False)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gate", choices=list(GATES), default="per_example_dselect_k")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--cprofile", action="store_true", help="print cProfile's 25 costliest functions of 200 steps")
    args = ap.parse_args(argv)
    dselectk.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch, 128)).astype(np.float32)
    Y = [rng.standard_normal((args.batch, 1)).astype(np.float32),
         (rng.random((args.batch, 1)) < 0.5).astype(np.float32)]
    model = MMoE(128, n_tasks=2, n_experts=8, expert_units=(256,), tower_units=(256,), task_losses=["mse", "bce"],
                 seed=0, gate=GATES[args.gate])
    opt = dselectk.optim.Adam(model.slab.data, model.slab.grad, lr=1e-4)

    step = make_step(model, opt, X, Y)
    for _ in range(20):
        step()
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        step()
        n += 1
    print(f"{args.gate}, batch {args.batch}, {args.threads} thread(s): {(time.perf_counter() - t0) / n * 1e3:.2f} "
          f"ms/step over {n} steps")


if __name__ == "__main__":
    main()
