"""One MMoE training step (forward, backward, Adam update), at 1 and 2 threads.

    python benchmarks/bench_train_step.py [--batch 128] [--steps 200] [--threads 1 2]

The model of issue #3: 8 experts of Dense(256) + ReLU on 128 inputs, 2 tasks with Dense(256) + ReLU
towers and one output each (MSE and BCE), per-example DSelect-k gates (k = 2). Reports steps per
second and the fraction of the step spent in the functions that call GEMM (dense and linear
forward/backward, timed by wrapping them), measured in one process run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import dselectk
from dselectk import functional as F
from dselectk.gates import DSelectK, Softmax, TopK
from dselectk.models import MMoE

GEMM_FUNCTIONS = ("dense_forward", "dense_backward", "linear", "linear_backward")


class GemmTimer:
    """Wraps the GEMM-calling functions of dselectk.functional (which the layers look up at call
    time) and adds up the time spent inside them."""

    def __init__(self):
        self.total = 0.0
        self.originals = {name: getattr(F, name) for name in GEMM_FUNCTIONS}

    def __enter__(self):
        for name, fn in self.originals.items():
            def timed(*args, _fn=fn, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.total += time.perf_counter() - t0
            setattr(F, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(F, name, fn)


def make_step(model, opt, X, Y):
    def step():
        model.zero_grad()
        outs = model.forward(X, training=True)
        _, _, douts = model.loss(outs, Y)
        model.backward(douts)
        opt.step()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gate", default="dselect_k", choices=["dselect_k", "top_k", "softmax"])
    ap.add_argument("--static", action="store_true", help="static gates instead of per-example")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch, 128)).astype(np.float32)
    Y = [rng.standard_normal((args.batch, 1)).astype(np.float32), (rng.random((args.batch, 1)) < 0.5).astype(np.float32)]
    info = dselectk.build_info()
    print(f"MMoE step: 8 experts Dense(256), 2 tasks Dense(256) towers, input 128, batch {args.batch}, "
          f"{args.gate} {'static' if args.static else 'per-example'} gates (k=2), Adam, float32; "
          f"openmp={info['openmp']}, BLAS={info['blas']}")
    print(f"{'threads':>7} {'steps/s':>9} {'ms/step':>8} {'GEMM share':>11}")
    per_example = not args.static
    gate = {"dselect_k": DSelectK(2, entropy_reg=0.1, per_example=per_example),
            "top_k": TopK(2, per_example=per_example), "softmax": Softmax(per_example=per_example)}[args.gate]
    rows = []
    for threads in args.threads:
        dselectk.set_num_threads(threads)
        model = MMoE(128, n_tasks=2, n_experts=8, expert_units=(256,), tower_units=(256,), task_losses=["mse", "bce"],
                     gate=gate, seed=0)
        opt = dselectk.optim.Adam(model.slab.data, model.slab.grad, lr=1e-4)
        step = make_step(model, opt, X, Y)
        time.sleep(0.5)  # let the idle threads of the previous setting go to sleep
        for _ in range(10):
            step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        with GemmTimer() as gt:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            wall = time.perf_counter() - t0
        med = statistics.median(times)
        rows.append((threads, 1 / med, med * 1e3, gt.total / wall))
        print(f"{threads:>7} {1 / med:>9.1f} {med * 1e3:>8.2f} {gt.total / wall:>10.0%}")
    return rows


if __name__ == "__main__":
    main()
