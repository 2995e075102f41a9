"""Conditional computation: what exact zeros in the gates save, in wall time and in FLOPs.

    python benchmarks/bench_conditional.py [--batch 1024] [--threads 1] [--repeats 7] [--quick] [--out FILE.md]

1. Wall time of one training step (forward, backward, Adam) of an MMoE with 8 x Dense(256) experts
   on 128 inputs, 2 tasks with Dense(64) towers (so that the experts hold most of the FLOPs: 8 x
   128 x 256 against 2 x 256 x 64 multiply-adds per example), gates choosing k = 2, once S(Z) is
   binary (the two tasks' gates pointing at the same 2 experts, or at 3 experts between them), with
   the conditional path (experts no example uses are skipped; per-example: gather -> dense ->
   scatter) against the dense path of the same model (``static_fast_path = False`` and
   ``sparse_threshold = 0``), for static and per-example DSelect-k; and, per example, the same
   ratio before S(Z) is binary (the path chooser must not cost more than a few percent).
2. Expert FLOPs over a training run (``History["expert_flops"]``): DSelect-k relative to Top-k,
   the FLOPS(DSelect-k)/FLOPS(Top-k) row of the paper's Table C.4, on a two-task problem.

Ratios are measured in one process run, blocks interleaved, medians of ``--repeats`` blocks; the
1-minute load average is printed beside each row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import dselectk as dk
from dselectk.gates import DSelectK, TopK
from dselectk.models import MMoE
from dselectk.optim import make_optimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_load  # noqa: E402
from bench_train_step import make_step  # noqa: E402


def _model(per_example, binary, shared=False, seed=0):
    model = MMoE(128, n_tasks=2, n_experts=8, expert_units=(256,), tower_units=(64,), task_losses=["mse", "bce"],
                 gate=DSelectK(2, gamma=1.0, per_example=per_example), seed=seed)
    if binary:  # S(Z) saturated: each selector points at one expert, (k = 2) experts per task
        rng = np.random.default_rng(seed)
        for t, g in enumerate(model.gates):
            codes = np.array([[0, 0, 1], [0, 1, 0]]) if t == 0 or shared else np.array([[0, 0, 1], [1, 0, 0]])
            target = np.where(codes == 1, 1.0, -1.0) * g.gamma  # S(+-gamma) = 1 / 0
            if per_example:
                g.params["W"][...] = rng.uniform(-1e-3, 1e-3, g.params["W"].shape)
                g.params["b_W"][...] = target
            else:
                g.params["Z"][...] = target
    return model


def _step_fn(model, X, Y):
    return make_step(model, make_optimizer("adam", model.slab.data, model.slab.grad, lr=1e-4), X, Y)


def _time_pair(fast, slow, repeats, steps):
    tf, ts = [], []
    for _ in range(repeats):
        for fn, acc in ((fast, tf), (slow, ts)):
            fn()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            acc.append((time.perf_counter() - t0) / steps)
    return statistics.median(tf), statistics.median(ts)


def wall_time_rows(batch, repeats, steps):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, 128)).astype(np.float32)
    Y = [rng.standard_normal(batch).astype(np.float32), (rng.random(batch) < 0.5).astype(np.float32)]
    rows = []
    for per_example, binary, shared in ((False, True, True), (False, True, False), (True, True, False),
                                        (True, False, False)):
        fast, slow = _model(per_example, binary, shared), _model(per_example, binary, shared)
        slow.static_fast_path, slow.sparse_threshold = False, 0.0
        fast.forward(X)
        used = (np.stack([np.broadcast_to(w, (batch, 8)) for w in fast._cache[1]]) != 0).any(axis=0).mean() \
            if len(fast._cache) == 3 else len(fast._cache[2]) / 8
        t_fast, t_slow = _time_pair(_step_fn(fast, X, Y), _step_fn(slow, X, Y), repeats, steps)
        rows.append((("per-example" if per_example else "static") + (", S(Z) binary" if binary else ", S(Z) fractional"),
                     used, t_slow * 1e3, t_fast * 1e3, t_slow / t_fast, fmt_load()))
    return rows


def flops_rows(epochs, seed=0):
    rng = np.random.default_rng(seed)
    N, p = 8192, 32
    X = rng.standard_normal((N, p)).astype(np.float32)
    v1, v2 = rng.standard_normal(p), rng.standard_normal(p)
    Y = [np.tanh(X @ v1).astype(np.float32), (np.sin(X @ v2) > 0).astype(np.float32)]
    out = {}
    for name, spec in (("dselect_k", DSelectK(2, gamma=1.0, entropy_reg=0.5)), ("top_k", TopK(2))):
        for per_example in (False, True):
            model = MMoE(p, n_tasks=2, n_experts=8, expert_units=(64,), tower_units=(32,), task_losses=["mse", "bce"],
                         gate=spec.replace(per_example=per_example), seed=seed)
            h = dk.fit(model, X, Y, epochs=epochs, batch_size=128, lr=1e-2, verbose=0)
            steps = None if name != "dselect_k" or any(s is None for s in h.binary_step) else max(h.binary_step)
            out[name, per_example] = (h["expert_flops"][-1], h["expert_flops_dense"][-1], steps, h.total_steps)
    rows = []
    for per_example in (False, True):
        d, t = out["dselect_k", per_example], out["top_k", per_example]
        rows.append(("per-example" if per_example else "static", d[0] / d[1], t[0] / t[1], d[0] / t[0],
                     "never" if d[2] is None else f"{100 * d[2] / d[3]:.1f}%"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a smoke run (3 blocks of 2 steps, 1 epoch): rough numbers")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.epochs = 3, 2, 1
    dk.set_num_threads(args.threads)
    lines = [f"Batch {args.batch}, {args.threads} thread(s); median of {args.repeats} blocks of {args.steps} steps.",
             "", "| gates (k = 2 of 8) | (example, expert) pairs used | dense path ms/step | conditional ms/step | speedup "
             "| load |",
             "|---|---|---|---|---|---|"]
    for name, used, slow, fast, ratio, load in wall_time_rows(args.batch, args.repeats, args.steps):
        lines.append(f"| {name} | {used:.0%} | {slow:.2f} | {fast:.2f} | {ratio:.2f}x | {load} |")
    lines += ["", f"Expert FLOPs over {args.epochs} epochs (8,192 examples, batch 128, lr 1e-2; Table C.4's row):", "",
              "| gates | DSelect-k executed / dense | Top-k executed / dense | FLOPS(DSelect-k) / FLOPS(Top-k) | steps until S(Z) binary |",
              "|---|---|---|---|---|"]
    for name, d, t, ratio, steps in flops_rows(args.epochs):
        lines.append(f"| {name} | {d:.3f} | {t:.3f} | {ratio:.3f} | {steps} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
