"""The paper's Multi-Fashion MNIST experiment (Table 2, Appendix D.2) with the sweep runner.

    apt-get install -y dataset-fashion-mnist     # the IDX files under /usr/share/datasets/fashion-mnist
    python benchmarks/multi_fashion_mnist_experiment.py [--models dselect_k top_k softmax shared_bottom comet comet+]
        [--trials 3] [--tune-train 5000] [--tune-val 5000] [--tune-epochs 2] [--reps 3] [--epochs 3]
        [--patience 2] [--workers 2]
        [--out benchmarks/results/multi_fashion_mnist]

Per model: a light random search over Appendix D.2's grid (learning rate in {0.01, 0.001}; k in
{2, 4} for DSelect-k and Top-k; gamma in {0.1, 1, 10} for DSelect-k; 1, 3 or 5 dense layers in the
CNN experts), each configuration trained once on a small data set (``--tune-train`` training and
``--tune-val`` validation images) for ``--tune-epochs`` epochs and scored by the mean validation
accuracy of the two tasks (the paper's tuning metric);
DSelect-k configurations count only if S(Z) became binary. Then ``--reps`` runs of the best
configuration, with new seeds, on the full data (100,000 / 20,000 / 20,000 images by default) for
``--epochs`` epochs, keeping the epoch with the lowest validation loss. Every run is appended to
``<out>/trials.jsonl`` (a rerun resumes). Writes ``<out>/table2.md`` / ``.csv``: test accuracy of
each task (mean +- standard error), selected experts, % of steps until S(Z) was binary, and the
expert FLOPs executed relative to the dense model and to Top-k.

COMET (Ibrahim et al., KDD 2023; issue #13) is tuned on DSelect-k's grid, as in the other COMET
experiments. ``comet+`` (COMET + local search, COMET+) is a row of its own: COMET's chosen
configuration (``comet`` must have been run first, in this or an earlier call) plus the permutation
local search for the first ``ls_frac`` of the epochs, ``ls_frac`` tuned over the authors' 0.01-0.1
({0.01, 0.03, 0.1}, as in benchmarks/local_search_experiments.py) with the same tuning runs; the
other local-search options at their defaults (one permutation per tree of each task gate, tau 1e-3 -> 1e-7). So the
row differs from ``comet`` only by the local search, which a light random search over the whole
grid would not guarantee.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

import numpy as np

from dselectk.experiments import multi_mnist as M
from dselectk.experiments.synthetic import binary_constraint
from dselectk.sweep import Sweep, SweepResult, load_records, summarize

GRIDS = {
    "dselect_k": {"lr": [0.01, 0.001], "k": [2, 4], "gamma": [0.1, 1.0, 10.0], "expert_layers": [1, 3, 5]},
    "top_k": {"lr": [0.01, 0.001], "k": [2, 4], "expert_layers": [1, 3, 5]},
    "softmax": {"lr": [0.01, 0.001], "expert_layers": [1, 3, 5]},
    "shared_bottom": {"lr": [0.01, 0.001], "expert_layers": [1, 3, 5]},
}
GRIDS["comet"] = GRIDS["dselect_k"]  # COMET takes DSelect-k's grid (lr, k, gamma, expert layers)
# rows with local search: row -> (the model whose chosen configuration they start from, the local-search
# grid tuned on top of it)
LOCAL_SEARCH_ROWS = {"comet+": ("comet", {"ls_frac": [0.01, 0.03, 0.1]})}
SMOOTH_STEP = ("dselect_k", "comet", "comet+")  # the gates whose S(Z) becomes binary
PAPER = {  # Table 2, Multi-Fashion MNIST: accuracy of task 1, task 2, experts
    "dselect_k": ("83.78 ± 0.05", "83.34 ± 0.05", "1.8"), "top_k": ("83.44 ± 0.07", "82.66 ± 0.08", "4"),
    "softmax": ("83.48 ± 0.04", "82.81 ± 0.04", "8"), "shared_bottom": ("82.05 ± 0.05", "81.37 ± 0.06", "-"),
}


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _chosen(out):
    path = os.path.join(out, "chosen_configs.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def row_of(config):
    """The table row of a trial's config: its model, with "+" where it ran local search."""
    return config["model"] + ("+" if config.get("ls_frac") else "")


def write_table(out):
    """The table of the final runs; where <out>/chosen_configs.json names a model's configuration
    (a rerun with more tuning trials may have chosen another one), only that configuration's runs."""
    chosen = _chosen(out)
    records = [{**r, "config": {**r["config"], "model": row_of(r["config"])}}  # grouped by row
               for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].endswith("/final")
               and (row_of(r["config"]) not in chosen or r["config"] == chosen[row_of(r["config"])]["config"])]
    if not records:
        _log("no final runs recorded yet")
        return
    for r in records:
        m = r["metrics"]
        m["test_acc1_pct"], m["test_acc2_pct"] = 100 * m["test_acc1"], 100 * m["test_acc2"]
        if m["expert_flops_dense"]:
            m["flops_vs_dense"] = m["expert_flops"] / m["expert_flops_dense"]
        if r["config"]["model"] in SMOOTH_STEP:
            m["binary_runs"] = m["binary"]  # summed below: runs whose S(Z) became binary
        if m.get("binary_pct") != m.get("binary_pct"):  # NaN: never binary; counts in no mean
            del m["binary_pct"]
    table = summarize(records, group_by=("model",), metrics=["test_acc1_pct", "test_acc2_pct", "experts", "binary_pct",
                                                             "flops_vs_dense", "epochs", "epoch_seconds"])
    binary_runs = {}
    for r in records:
        if "binary_runs" in r["metrics"]:
            binary_runs.setdefault(r["config"]["model"], []).append(r["metrics"]["binary_runs"])
    flops = {}
    for r in records:
        flops.setdefault(r["config"]["model"], []).append(r["metrics"]["expert_flops"])
    lines = [table.to_markdown(digits=4), "", "binary_pct: % of the training steps until S(Z) was binary, over the runs "
             "where it became binary (" + ", ".join(f"{m}: {int(sum(v))} of {len(v)} runs" for m, v in binary_runs.items())
             + "); flops_vs_dense: expert FLOPs executed / those of the dense model.",
             "", "The paper's Table 2 (Multi-Fashion MNIST, static gates, 100 repetitions):",
             "", "| model | accuracy 1 | accuracy 2 | experts |", "|---|---|---|---|"]
    lines += [f"| {name} | {a} | {b} | {e} |" for name, (a, b, e) in PAPER.items()]
    if "top_k" in flops:
        ratios = [f"{name} {np.mean(flops[name]) / np.mean(flops['top_k']):.3f}" for name in SMOOTH_STEP if name in flops]
        if ratios:
            lines += ["", "Expert FLOPs of a whole training run, relative to Top-k (Table C.4's FLOPS(DSelect-k)/"
                      f"FLOPS(Top-k)), mean over repetitions: {', '.join(ratios)}"]
    with open(os.path.join(out, "table2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    table.to_csv(os.path.join(out, "table2.csv"))
    _log(f"wrote {out}/table2.md")


def _tuning_grid(name, args):
    """The tuning sweep's grid of a row: its model's grid at the tuning sizes; for a local-search row
    the configuration chosen for its base model, at the tuning sizes, plus the local-search grid."""
    sizes = {"n_train": [args.tune_train], "n_val": [args.tune_val], "n_test": [1_000], "epochs": [args.tune_epochs],
             "early_stopping_patience": [None]}
    if name not in LOCAL_SEARCH_ROWS:
        return {"dataset": ["fashion_mnist"], "path": [args.path], "model": [name], **sizes, **GRIDS[name]}
    base, search = LOCAL_SEARCH_ROWS[name]
    chosen = _chosen(args.out)
    if base not in chosen:
        raise SystemExit(f"{name} starts from the configuration chosen for {base}, and {args.out}/chosen_configs.json "
                         f"has none: run --models {base} {name}")
    config = {**chosen[base]["config"], "path": args.path}
    config.update({key: value[0] for key, value in sizes.items()})
    return {**{key: [value] for key, value in config.items()}, **search}


def main(argv=None):
    faulthandler.enable()  # a crash (once seen while plotting) prints where it happened
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=None, help="directory of the Fashion-MNIST IDX files (default: the Debian "
                    "package's)")
    ap.add_argument("--models", nargs="+", default=["shared_bottom", "dselect_k", "top_k", "softmax"],
                    choices=list(GRIDS) + list(LOCAL_SEARCH_ROWS),
                    help="rows to run; comet+ starts from comet's chosen configuration (run comet first)")
    ap.add_argument("--trials", type=int, default=3, help="configurations tried per model")
    ap.add_argument("--tune-train", type=int, default=5_000, help="training images of a tuning run")
    ap.add_argument("--tune-val", type=int, default=5_000, help="validation images of a tuning run")
    ap.add_argument("--tune-epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="final runs per model")
    ap.add_argument("--n-train", type=int, default=100_000, help="training images of a final run (the paper's)")
    ap.add_argument("--n-val", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of a final run")
    ap.add_argument("--patience", type=int, default=2, help="early stopping patience (epochs) of a final run; the "
                    "weights of the epoch with the lowest validation loss are restored")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/multi_fashion_mnist")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the table from <out>/trials.jsonl")
    args = ap.parse_args(argv)
    if args.table_only:
        return write_table(args.out)
    os.makedirs(args.out, exist_ok=True)
    path, t0 = os.path.join(args.out, "trials.jsonl"), time.time()
    for name in args.models:
        grid, n_trials = _tuning_grid(name, args), args.trials
        if name in LOCAL_SEARCH_ROWS:
            n_trials = len(LOCAL_SEARCH_ROWS[name][1]["ls_frac"])  # every local-search length once
        _log(f"{name}: tuning {n_trials} configurations on {args.tune_train} images")
        tuned = Sweep(M.multi_mnist_trial, grid, n_trials=n_trials, seed=args.seed, metric="val_error",
                      constraint=binary_constraint, results_path=path, name=f"multi_fashion/{name}/tune").run(
            max_workers=args.workers, progress=not args.quiet)
        best, met = tuned.best_config, True
        if best is None:  # no DSelect-k configuration became binary: take the best one anyway
            best, met = SweepResult(tuned.trials, metric="val_error").best_config, False
        final_config = {**best, "n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test,
                        "epochs": args.epochs, "early_stopping_patience": args.patience}
        _log(f"{name}: {args.reps} repetitions of {final_config}")
        Sweep(M.multi_mnist_trial, {key: [value] for key, value in final_config.items()}, n_trials=1,
              repetitions=args.reps, seed=args.seed + 1, metric="val_error", results_path=path,
              name=f"multi_fashion/{name}/final").run(max_workers=args.workers, progress=not args.quiet)
        chosen = {**_chosen(args.out), name: {"config": final_config, "binary_constraint_met": met}}
        with open(os.path.join(args.out, "chosen_configs.json"), "w") as f:
            json.dump(chosen, f, indent=1)
        write_table(args.out)
    _log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
