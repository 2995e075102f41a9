"""The paper's MovieLens experiment (Table 1, Appendix D.1) on a ratings file, with the sweep runner.

    sh benchmarks/get_movielens.sh            # writes benchmarks/data/movielens.csv (R's dslabs data)
    python benchmarks/movielens_experiment.py [--data benchmarks/data/movielens.csv] [--alphas 0.1 0.5 0.9]
        [--methods ...] [--trials 3] [--reps 5] [--epochs 3] [--patience P] [--workers 2] [--out benchmarks/results/movielens]

For each alpha and method: a light random search over the paper's grid (learning rate; k in {2, 4},
lambda in {0.1, 1, 10} and gamma in {1, 10} for DSelect-k; k for Top-k), keeping DSelect-k
configurations whose S(Z) became binary, on the validation loss; then --reps runs of the best
configuration with new seeds. Every trial is appended to ``<out>/trials.jsonl`` (a rerun resumes).
Writes ``<out>/table1.md`` / ``.csv`` (test loss x 10^4, task-1 AUC, task-2 RMSE, selected experts,
% of steps until S(Z) binary, expert FLOPs relative to Top-k of the same kind) and the Figure C.3
heatmap of one trained DSelect-k model (``figure_c3.png``, needs matplotlib).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

import numpy as np

from dselectk.inputs import take_rows
from dselectk.experiments import movielens as M
from dselectk.experiments.synthetic import binary_constraint, tune_and_repeat
from dselectk.sweep import load_records, summarize

GRIDS = {
    "dselect_k_static": {"lr": [0.01, 0.05], "k": [2, 4], "entropy_reg": [0.1, 1.0, 10.0], "gamma": [1.0, 10.0]},
    "dselect_k_per_example": {"lr": [0.01, 0.05], "k": [2, 4], "entropy_reg": [0.1, 1.0, 10.0], "gamma": [1.0, 10.0]},
    "top_k_static": {"lr": [0.01, 0.05], "k": [2, 4]},
    "top_k_per_example": {"lr": [0.01, 0.05], "k": [2, 4]},
    "softmax_moe": {"lr": [0.01, 0.05]},
    "shared_bottom": {"lr": [0.01, 0.05]},
}
FLOPS_BASELINE = {"dselect_k_static": "top_k_static", "dselect_k_per_example": "top_k_per_example"}


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_table(out):
    records = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].endswith("/final")]
    binary_runs = {}
    for r in records:
        m = r["metrics"]
        m["test_loss_x1e4"] = m["test_loss"] * 1e4
        if r["config"]["method"].startswith("dselect_k"):
            binary_runs.setdefault((r["config"]["alpha"], r["config"]["method"]), []).append(m["binary"])
        if m.get("binary_pct") != m.get("binary_pct"):  # NaN: never binary; counts in no mean
            del m["binary_pct"]
    table = summarize(records, group_by=("alpha", "method"),
                      metrics=["test_loss_x1e4", "test_auc", "test_rmse", "mean_selected", "binary_pct", "epochs"])
    flops = {}
    for r in records:
        flops.setdefault((r["config"]["alpha"], r["config"]["method"]), []).append(r["metrics"]["expert_flops"])
    lines = [table.to_markdown(digits=4), "", "binary_pct: % of the training steps until S(Z) was binary (mean over "
             "the tasks), over the runs where it became binary for both tasks: "
             + ", ".join(f"alpha {a} {m}: {int(sum(v))} of {len(v)} runs" for (a, m), v in sorted(binary_runs.items()))
             + ".", "", "Expert FLOPs during training, DSelect-k relative to Top-k of the same "
             "kind (Table C.4's FLOPS(DSelect-k)/FLOPS(Top-k)), mean over repetitions:", "",
             "| alpha | gates | FLOPS(DSelect-k) / FLOPS(Top-k) |", "|---|---|---|"]
    for (alpha, method), values in sorted(flops.items()):
        base = FLOPS_BASELINE.get(method)
        if base and (alpha, base) in flops:
            lines.append(f"| {alpha} | {method} | {np.mean(values) / np.mean(flops[alpha, base]):.3f} |")
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    table.to_csv(os.path.join(out, "table1.csv"))
    _log(f"wrote {out}/table1.md")


def heatmap(out, config):
    from dselectk.plots import plot_task_expert_heatmap

    config = dict(config)
    data = M._cached_data(config.pop("path"), 1, 0)
    gate, per_example = M.METHODS[config.pop("method")]
    result = M.run(data, gate, per_example, seed=0, return_model=True, **config)
    model = result["model"]
    model.forward(take_rows(data.test.X, slice(0, 4096)))  # per-example gates: averaged over these
    path = os.path.join(out, "figure_c3.png")
    plot_task_expert_heatmap(model.gate_weights(), path, task_names=["task 1 (watch)", "task 2 (rating)"],
                             title=f"DSelect-k ({'per-example, averaged' if per_example else 'static'}) expert weights")
    _log(f"wrote {path}")


def main(argv=None):
    faulthandler.enable()  # a crash (once seen while plotting) prints where it happened
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="benchmarks/data/movielens.csv")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--methods", nargs="+", default=list(M.METHODS), choices=list(M.METHODS))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patience", type=int, default=None,
                    help="early stopping on the validation loss after this many epochs without improvement "
                         "(the best epoch's weights are kept); default: none")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/movielens")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the table from <out>/trials.jsonl")
    args = ap.parse_args(argv)
    if args.table_only:
        return write_table(args.out)
    if not os.path.exists(args.data):
        sys.exit(f"{args.data} not found: run `sh benchmarks/get_movielens.sh` first (or pass --data)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trials.jsonl")
    t0, chosen = time.time(), {}
    for alpha in args.alphas:
        for method in args.methods:
            grid = {"path": [os.path.abspath(args.data)], "method": [method], "alpha": [alpha],
                    "epochs": [args.epochs], "early_stopping_patience": [args.patience], **GRIDS[method]}
            _log(f"alpha {alpha}, {method}: tuning {args.trials} configurations, then {args.reps} repetitions")
            _, final = tune_and_repeat(M.movielens_trial, grid, n_trials=args.trials, repetitions=args.reps,
                                       metric="val_loss", constraint=binary_constraint, results_path=path,
                                       name=f"movielens/{alpha}/{method}", seed=args.seed,
                                       max_workers=args.workers, progress=not args.quiet)
            chosen[f"{alpha}/{method}"] = {"config": final.trials[0]["config"],
                                          "binary_constraint_met": final.constraint_met}
    with open(os.path.join(args.out, "chosen_configs.json"), "w") as f:
        json.dump(chosen, f, indent=1)
    write_table(args.out)
    if "dselect_k_static" in args.methods:
        try:
            heatmap(args.out, chosen[f"{args.alphas[len(args.alphas) // 2]}/dselect_k_static"]["config"])
        except ImportError as exc:
            _log(f"no heatmap: {exc}")
    _log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
