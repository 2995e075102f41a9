"""Run the paper's synthetic experiments (Appendix C.2 and C.3.2) and write tables and figures.

    python benchmarks/synthetic_experiments.py multitask [--tasks 16 32 64 128] [--trials 6] [--reps 20]
        [--epochs 10] [--workers 2] [--out benchmarks/results/synthetic]
    python benchmarks/synthetic_experiments.py recovery [--trials 24] [--reps 20] [--workers 2]
    python benchmarks/synthetic_experiments.py plots      # figures from the results already written

Each (method, number of tasks) is tuned by random grid search over the paper's grid (Appendix D.4,
epochs fixed by --epochs unless --paper-epochs), keeping DSelect-k configurations whose S(Z) became
binary, then its best configuration is trained --reps times with new seeds. Every finished trial is
appended to ``<out>/trials.jsonl``; rerunning the same command resumes. Tables: ``<out>/*.md`` and
``.csv``; figures (matplotlib): Figure C.4 and Figures C.6/C.7.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

import numpy as np

from dselectk.experiments import synthetic as S
from dselectk.sweep import load_records, summarize

MULTITASK_METRICS = ["test_mse", "jaccard_related", "jaccard_unrelated", "selected", "binary", "val_mse"]
RECOVERY_METRICS = ["recovered", "selected", "binary", "val_accuracy", "val_loss"]


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_multitask(args):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trials.jsonl")
    chosen = {}
    for T in args.tasks:
        for method in args.methods:
            grid = dict(S.PAPER_GRIDS[method])
            if not args.paper_epochs:
                grid["epochs"] = [args.epochs]
            grid = {"method": [method], "n_tasks": [T], **grid}
            if args.task_mean:
                grid["task_mean"] = [True]
            _log(f"{method}, {T} tasks: tuning {args.trials} of {np.prod([len(v) for v in grid.values()])} "
                 f"configurations, then {args.reps} repetitions")
            tuned, final = S.tune_and_repeat(
                S.synthetic_trial, grid, n_trials=args.trials, repetitions=args.reps, metric="val_mse",
                results_path=path, name=f"multitask/{method}/{T}", seed=args.seed, max_workers=args.workers,
                progress=not args.quiet)
            chosen[f"{method}/{T}"] = {"config": final.trials[0]["config"], "binary_constraint_met": final.constraint_met}
    write_multitask_tables(args.out, chosen)


def write_multitask_tables(out, chosen=None):
    records = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].endswith("/final")]
    table = summarize(records, group_by=("method", "n_tasks"), metrics=MULTITASK_METRICS)
    table.to_csv(os.path.join(out, "multitask.csv"))
    table.to_markdown(os.path.join(out, "multitask.md"), digits=4)
    if chosen is not None:
        with open(os.path.join(out, "chosen_configs.json"), "w") as f:
            json.dump(chosen, f, indent=1)
    tuning = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].endswith("/tune")]
    summarize(tuning, group_by=("method", "n_tasks"), metrics=["binary", "val_mse", "selected"]).to_markdown(
        os.path.join(out, "tuning_summary.md"), digits=4)
    _log(f"wrote {out}/multitask.md, multitask.csv")
    return table


def run_recovery(args):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trials.jsonl")
    chosen = {}
    for method in ("dselect_k", "top_k"):
        grid = {"method": [method], **S.RECOVERY_GRIDS[method]}
        _log(f"gate recovery, {method}: tuning {args.trials} configurations x {args.tune_reps} seeds, "
             f"then {args.reps} seeds")
        tuned, final = S.tune_and_repeat(
            S.gate_recovery_trial, grid, n_trials=args.trials, repetitions=args.reps,
            tune_repetitions=args.tune_reps, metric="val_loss", results_path=path, name=f"recovery/{method}",
            seed=args.seed, max_workers=args.workers, progress=not args.quiet)
        chosen[method] = {"config": final.trials[0]["config"], "binary_constraint_met": final.constraint_met}
    records = [r for r in load_records(path) if r["sweep"].endswith("/final")]
    table = summarize(records, group_by=("method",), metrics=RECOVERY_METRICS)
    table.to_csv(os.path.join(args.out, "recovery.csv"))
    table.to_markdown(os.path.join(args.out, "recovery.md"), digits=3)
    counts = {}
    for r in records:
        counts.setdefault(r["config"]["method"], []).append(int(r["metrics"]["recovered"]))
    with open(os.path.join(args.out, "chosen_configs.json"), "w") as f:
        json.dump({"chosen": chosen, "recovered_per_seed": counts}, f, indent=1)
    _log(f"wrote {args.out}/recovery.md")
    if not args.no_plots:
        plot_recovery_traces(args.out, chosen)


def plot_multitask(out):
    from dselectk.plots import plot_metric_vs_tasks

    records = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].endswith("/final")]
    path = os.path.join(out, "figure_c4.png")
    plot_metric_vs_tasks(records, path)
    _log(f"wrote {path}")


def plot_recovery_traces(out, chosen):
    """Figures C.6 / C.7: expert weights during training, one seed, the tuned configurations."""
    from dselectk.plots import plot_expert_weights

    for method, fig in (("top_k", "c6"), ("dselect_k", "c7")):
        config = dict(chosen[method]["config"], record_every=5)
        _, model, history, true_positions = S.gate_recovery_trial(config, seed=0, return_model=True)
        path = os.path.join(out, f"figure_{fig}_{method}.png")
        plot_expert_weights(history, path, task=0, highlight=true_positions,
                            title=f"{method}: expert weights during training (true experts bold)")
        _log(f"wrote {path}")


def main(argv=None):
    faulthandler.enable()  # a crash (once seen while plotting) prints where it happened
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    mt = sub.add_parser("multitask", help="Appendix C.2: 16-128 tasks, four gates")
    mt.add_argument("--tasks", type=int, nargs="+", default=[16, 32, 64, 128])
    mt.add_argument("--methods", nargs="+", default=list(S.METHODS), choices=S.METHODS)
    mt.add_argument("--trials", type=int, default=6, help="configurations tried per method and task count")
    mt.add_argument("--reps", type=int, default=20, help="repetitions of the best configuration")
    mt.add_argument("--epochs", type=int, default=10)
    mt.add_argument("--paper-epochs", action="store_true", help="tune epochs over the paper's {25, 50, 75, 100}")
    mt.add_argument("--task-mean", action="store_true",
                    help="train on the MSE averaged over tasks (see synthetic_trial's task_mean)")
    mt.add_argument("--out", default="benchmarks/results/synthetic")
    rc = sub.add_parser("recovery", help="Appendix C.3.2: gate recovery")
    rc.add_argument("--trials", type=int, default=24)
    rc.add_argument("--tune-reps", type=int, default=3)
    rc.add_argument("--reps", type=int, default=20)
    rc.add_argument("--out", default="benchmarks/results/gate_recovery")
    rc.add_argument("--no-plots", action="store_true")
    pl = sub.add_parser("plots", help="Figure C.4 from benchmarks/results/synthetic")
    pl.add_argument("--out", default="benchmarks/results/synthetic")
    for p in (mt, rc):
        p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.time()
    if args.cmd == "multitask":
        run_multitask(args)
        plot_multitask(args.out)
    elif args.cmd == "recovery":
        run_recovery(args)
    else:
        write_multitask_tables(args.out)
        plot_multitask(args.out)
    _log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
