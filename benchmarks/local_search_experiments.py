"""The COMET experiments of issue #13: permutation local search (and COMET) beside the gates we have.

    python benchmarks/local_search_experiments.py recovery  [--trials 24] [--tune-reps 3] [--reps 20] [--workers 2]
    python benchmarks/local_search_experiments.py paired    [--workers 2]   # after recovery
    python benchmarks/local_search_experiments.py common    [--workers 2]   # after recovery
    python benchmarks/local_search_experiments.py multitask [--tasks 16 32 64 128] [--trials 6] [--reps 10] [--epochs 10]
    python benchmarks/local_search_experiments.py movielens [--trials 24] [--tune-trials 12] [--reps 10] [--workers 2]
    python benchmarks/local_search_experiments.py tables    # rewrite every table and figure from the trials run

* ``recovery``: Appendix C.3.2 (gate recovery) with every gate, with and without local search, and
  the two remedies for DSelect-k's selector collapse (a warm-up with lambda = 0; a symmetry-breaking
  start of the selectors), on the data, seeds and tuning budget of
  ``benchmarks/results/gate_recovery/`` (24 random configurations x 3 seeds, then 20 new seeds).
  Output: ``benchmarks/results/local_search_recovery/``.
* ``multitask``: Appendix C.2 in the binary regime (``--task-mean``, where DSelect-k collapsed), with
  COMET and local search added. Output: ``benchmarks/results/local_search_multitask/``.
* ``movielens``: the two tasks of Table 1 on our dslabs ratings (``sh benchmarks/get_movielens.sh``)
  with per-example gates: Hash (user id), Top-k, DSelect-k, COMET, each without and with local
  search (one permutation shared by both task gates, as the authors' MovieLens configs). Hash and
  Top-k (+- LS) run ``--trials`` random-search trials each, which are also the data of the
  tuning-budget curves; DSelect-k and COMET (+- LS) ``--tune-trials``; then ``--reps`` runs of each
  best configuration. Output: ``benchmarks/results/local_search_movielens/``.

Every trial is appended to ``<out>/trials.jsonl``; rerunning a command resumes where it stopped
(finished trials are not rerun). Progress goes to stderr.
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

# label -> (method, extra grid entries). Every variant is tuned like the gate-recovery baselines of
# benchmarks/results/gate_recovery: their grid (S.RECOVERY_GRIDS; COMET takes DSelect-k's) plus the
# extra entries, --trials random configurations x --tune-reps seeds, then --reps new seeds.
LS_FRACS = [0.01, 0.03, 0.1]  # the authors' 0.01-0.1 of the epochs
WARMUP_FRACS = [0.1, 0.25, 0.5]
RECOVERY_VARIANTS = {
    "DSelect-k": ("dselect_k", {}),
    "DSelect-k + LS": ("dselect_k", {"ls_frac": LS_FRACS}),
    "Top-k": ("top_k", {}),
    "Top-k + LS": ("top_k", {"ls_frac": LS_FRACS}),
    "COMET": ("comet", {}),
    "COMET + LS (COMET+)": ("comet", {"ls_frac": LS_FRACS}),
    "DSelect-k + LS (tau from 1)": ("dselect_k", {"ls_frac": LS_FRACS, "ls_tau_start": [1.0], "ls_tau_end": [1e-3]}),
    "DSelect-k + warm-up lambda = 0": ("dselect_k", {"warmup_frac": WARMUP_FRACS}),
    "DSelect-k + distinct init": ("dselect_k", {"init": ["distinct"]}),
    "DSelect-k + LS + warm-up": ("dselect_k", {"ls_frac": LS_FRACS, "warmup_frac": WARMUP_FRACS}),
}
RECOVERY_METRICS = ["recovered", "selected", "binary", "val_accuracy", "val_loss"]

# one permutation set shared by every task gate (128 gates with their own would cost 128 Sinkhorn
# passes a step)
MULTITASK_VARIANTS = {
    "DSelect-k": ("dselect_k", {}),
    "DSelect-k + LS": ("dselect_k", {"ls_frac": LS_FRACS, "ls_shared": [True]}),
    "DSelect-k + warm-up lambda = 0": ("dselect_k", {"warmup_frac": WARMUP_FRACS}),
    "Top-k": ("top_k", {}),
    "Top-k + LS": ("top_k", {"ls_frac": LS_FRACS, "ls_shared": [True]}),
    "COMET": ("comet", {}),
    "COMET + LS (COMET+)": ("comet", {"ls_frac": LS_FRACS, "ls_shared": [True]}),
}
# --binary-regime: the smooth-step gates at the learning rate and lambda under which S(Z) became
# binary in ../synthetic_task_mean (there 1 of 6 random configurations was; gamma stays tuned), so
# that the comparison is the one the question is about: the gates once binary
BINARY_REGIME = {"lr": [0.1], "lam": [0.1]}
MULTITASK_METRICS = ["test_mse", "jaccard_related", "jaccard_unrelated", "selected", "binary", "val_mse"]


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _slug(label):
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


def _base_grid(method, grids):
    return dict(grids["dselect_k" if method == "comet" else method])


# --- gate recovery ----------------------------------------------------------------------------

def run_recovery(args):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trials.jsonl")
    chosen = _read_json(os.path.join(args.out, "chosen_configs.json")).get("chosen", {})
    for label in args.variants:
        method, extra = RECOVERY_VARIANTS[label]
        grid = {"method": [method], "variant": [label], **_base_grid(method, S.RECOVERY_GRIDS), **extra}
        _log(f"gate recovery, {label}: tuning {args.trials} configurations x {args.tune_reps} seeds, then {args.reps} "
             "seeds")
        _, final = S.tune_and_repeat(S.gate_recovery_trial, grid, n_trials=args.trials, repetitions=args.reps,
                                     tune_repetitions=args.tune_reps, metric="val_loss",
                                     results_path=path, name=f"recovery/{_slug(label)}", seed=args.seed,
                                     max_workers=args.workers, progress=not args.quiet)
        chosen[label] = {"config": final.trials[0]["config"], "binary_constraint_met": final.constraint_met}
        _write_json(os.path.join(args.out, "chosen_configs.json"), {"chosen": chosen})
        write_recovery_tables(args.out)


def write_recovery_tables(out):
    records = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].endswith("/final")]
    if not records:
        return None
    table = summarize(records, group_by=("variant",), metrics=RECOVERY_METRICS)
    table.to_csv(os.path.join(out, "recovery.csv"))
    table.to_markdown(os.path.join(out, "recovery.md"), digits=3)
    counts = {}
    for r in records:
        counts.setdefault(r["config"]["variant"], []).append(int(r["metrics"]["recovered"]))
    state = _read_json(os.path.join(out, "chosen_configs.json"))
    state["recovered_per_seed"] = counts
    _write_json(os.path.join(out, "chosen_configs.json"), state)
    try:
        plot_recovery(out, counts)
    except ImportError as exc:  # matplotlib missing
        _log(f"no figure: {exc}")
    _log(f"wrote {out}/recovery.md")
    return table


def plot_recovery(out, counts, name="recovered.png", seeds_note="seeds"):
    """Histogram per variant of the recovered true experts (0..4) over the final seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [v for v in RECOVERY_VARIANTS if v in counts]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.4))
    left = np.zeros(len(labels))
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, 5))
    for r in range(5):
        share = np.array([np.mean(np.array(counts[v]) == r) for v in labels])
        ax.barh(labels, share, left=left, color=colors[r], label=f"{r} of 4")
        left += share
    for i, v in enumerate(labels):
        ax.text(1.01, i, f"mean {np.mean(counts[v]):.2f} ({len(counts[v])} {seeds_note})", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of seeds recovering r of the 4 true experts")
    ax.legend(ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    _log(f"wrote {path}")


# --- common: every variant's chosen configuration on one set of problems -------------------------

def run_common(args):
    """Each variant's chosen configuration on the 20 problems PAIR_SEEDS (the same data, true
    experts' positions and start for every variant), so that any two rows are paired."""
    from dselectk.experiments.local_search import paired_recovery_trial
    from dselectk.sweep import Sweep

    path = os.path.join(args.out, "trials.jsonl")
    chosen = _read_json(os.path.join(args.out, "chosen_configs.json")).get("chosen", {})
    for label in [v for v in RECOVERY_VARIANTS if v in chosen]:
        config = {k: v for k, v in chosen[label]["config"].items() if k != "variant"}
        grid = {**{k: [v] for k, v in config.items()}, "common": [label], "pair_seed": PAIR_SEEDS}
        _log(f"common problems, {label}: {len(PAIR_SEEDS)} seeds")
        Sweep(paired_recovery_trial, grid, n_trials=len(PAIR_SEEDS), seed=args.seed, results_path=path,
              name=f"common/{_slug(label)}").run(max_workers=args.workers, progress=not args.quiet)
    write_common_table(args.out)


def write_common_table(out, baseline="DSelect-k"):
    records = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].startswith("common/")]
    runs = {}
    for r in records:
        runs.setdefault(r["config"]["common"], {})[r["config"]["pair_seed"]] = r["metrics"]
    if not runs:
        return
    lines = [f"| variant (its chosen configuration) | problems | recovered | paired difference vs {baseline} | "
             "better / equal / worse | selected | binary | val loss |", "|---|---:|---:|---:|---|---:|---:|---:|"]

    def ms(v):
        return f"{np.mean(v):.2f} ± {np.std(v, ddof=1) / np.sqrt(len(v)):.2f}"
    counts = {}
    for label in [v for v in RECOVERY_VARIANTS if v in runs]:
        seeds = sorted(runs[label])
        col = {key: np.array([runs[label][s][key] for s in seeds]) for key in RECOVERY_METRICS if key != "val_accuracy"}
        counts[label] = [int(c) for c in col["recovered"]]
        diff, tally = "–", "–"
        if label != baseline and baseline in runs and set(seeds) <= set(runs[baseline]):
            d = col["recovered"] - np.array([runs[baseline][s]["recovered"] for s in seeds])
            diff = f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f}"
            tally = f"{int((d > 0).sum())} / {int((d == 0).sum())} / {int((d < 0).sum())}"
        lines.append(f"| {label} | {len(seeds)} | {ms(col['recovered'])} | {diff} | {tally} | {ms(col['selected'])} | "
                     f"{ms(col['binary'])} | {ms(col['val_loss'])} |")
    with open(os.path.join(out, "common.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        plot_recovery(out, counts, name="recovered_common.png", seeds_note="common problems")
    except ImportError as exc:
        _log(f"no figure: {exc}")
    _log(f"wrote {out}/common.md")


# --- paired: local search on and off at one configuration, on the same problems -----------------

# (label, the variant whose chosen configuration is run, the option switched off and on, its value
# when on: None for the variant's own)
PAIRS = [("Top-k, the config of Top-k + LS", "Top-k + LS", "ls_frac", None),
         ("DSelect-k, the config of DSelect-k + LS", "DSelect-k + LS", "ls_frac", None),
         ("DSelect-k, the config of DSelect-k, + LS 0.1", "DSelect-k", "ls_frac", 0.1),
         ("COMET, the config of COMET+", "COMET + LS (COMET+)", "ls_frac", None),
         ("DSelect-k, the config of the warm-up variant", "DSelect-k + warm-up lambda = 0", "warmup_frac", None),
         ("DSelect-k, the config of the distinct-init variant", "DSelect-k + distinct init", "init", None)]
PAIR_SEEDS = list(range(1000, 1020))


def _pair_flag(option):
    """(config key marking the run with the option on, sweep suffixes off / on). The local search
    pairs keep the names they were first run under, so that their finished trials are not rerun."""
    return ("local_search", ("no_ls", "ls")) if option == "ls_frac" else ("option_on", ("off", "on"))


def run_paired(args):
    from dselectk.experiments.local_search import paired_recovery_trial
    from dselectk.sweep import Sweep

    path = os.path.join(args.out, "trials.jsonl")
    chosen = _read_json(os.path.join(args.out, "chosen_configs.json")).get("chosen", {})
    for label, source, option, value in PAIRS:
        if source not in chosen:
            _log(f"paired {label}: {source} has not run yet, skipped")
            continue
        config = {k: v for k, v in chosen[source]["config"].items() if k not in ("variant", option)}
        switched_on = dict(config, **{option: value if value is not None else chosen[source]["config"][option]})
        flag, suffixes = _pair_flag(option)
        for on, cfg in ((False, config), (True, switched_on)):
            grid = {**{k: [v] for k, v in cfg.items()}, "pair": [label], flag: [on], "pair_seed": PAIR_SEEDS}
            _log(f"paired {label}, {option} {'on' if on else 'off'}: {len(PAIR_SEEDS)} seeds")
            Sweep(paired_recovery_trial, grid, n_trials=len(PAIR_SEEDS), seed=args.seed, results_path=path,
                  name=f"paired/{_slug(label)}/{suffixes[on]}").run(max_workers=args.workers, progress=not args.quiet)
    write_paired_table(args.out)


def write_paired_table(out):
    records = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].startswith("paired/")]
    lines = ["| configuration | option | recovered, off | recovered, on | paired difference | on better / equal / worse | "
             "selected, off | selected, on | val loss, off | val loss, on |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for label, _, option, _ in PAIRS:
        flag = _pair_flag(option)[0]
        runs = {on: {r["config"]["pair_seed"]: r["metrics"] for r in records
                     if r["config"].get("pair") == label and r["config"].get(flag) == on} for on in (False, True)}
        seeds = sorted(set(runs[False]) & set(runs[True]))
        if not seeds:
            continue
        off = np.array([runs[False][s]["recovered"] for s in seeds])
        on = np.array([runs[True][s]["recovered"] for s in seeds])
        d = on - off

        def ms(key, flag):
            v = np.array([runs[flag][s][key] for s in seeds])
            return f"{v.mean():.2f} ± {v.std(ddof=1) / np.sqrt(len(v)):.2f}"
        lines.append(f"| {label} ({len(seeds)} seeds) | {option} | {ms('recovered', False)} | {ms('recovered', True)} | "
                     f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f} | {int((d > 0).sum())} / "
                     f"{int((d == 0).sum())} / {int((d < 0).sum())} | {ms('selected', False)} | {ms('selected', True)} | "
                     f"{ms('val_loss', False)} | {ms('val_loss', True)} |")
    with open(os.path.join(out, "paired.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _log(f"wrote {out}/paired.md")


# --- Appendix C.2 in the binary regime ----------------------------------------------------------

def run_multitask(args):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trials.jsonl")
    chosen = _read_json(os.path.join(args.out, "chosen_configs.json"))
    for T in args.tasks:
        for label in args.variants:
            method, extra = MULTITASK_VARIANTS[label]
            grid = {"method": [method], "variant": [label], "n_tasks": [T], "task_mean": [True],
                    **_base_grid(method, S.PAPER_GRIDS), **extra, "epochs": [args.epochs]}
            if args.binary_regime and method in ("dselect_k", "comet"):
                grid.update(BINARY_REGIME)
            _log(f"C.2 (task mean), {T} tasks, {label}: tuning {args.trials} configurations, then {args.reps} runs")
            _, final = S.tune_and_repeat(S.synthetic_trial, grid, n_trials=args.trials, repetitions=args.reps,
                                         metric="val_mse", results_path=path, name=f"multitask/{_slug(label)}/{T}",
                                         seed=args.seed, max_workers=args.workers, progress=not args.quiet)
            chosen[f"{label}/{T}"] = {"config": final.trials[0]["config"], "binary_constraint_met": final.constraint_met}
            _write_json(os.path.join(args.out, "chosen_configs.json"), chosen)
            write_multitask_tables(args.out)


def write_multitask_tables(out):
    records = [r for r in load_records(os.path.join(out, "trials.jsonl")) if r["sweep"].endswith("/final")]
    if not records:
        return None
    table = summarize(records, group_by=("n_tasks", "variant"), metrics=MULTITASK_METRICS)
    table.to_csv(os.path.join(out, "multitask.csv"))
    table.to_markdown(os.path.join(out, "multitask.md"), digits=4)
    try:
        plot_multitask(out, records)
    except ImportError as exc:
        _log(f"no figure: {exc}")
    _log(f"wrote {out}/multitask.md")
    return table


def plot_multitask(out, records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "test_mse", "test MSE"), (axes[1], "jaccard_related", "Jaccard, related tasks")):
        for label in MULTITASK_VARIANTS:
            rows = [r for r in records if r["config"]["variant"] == label]
            Ts = sorted({r["config"]["n_tasks"] for r in rows})
            if not Ts:
                continue
            means = [np.mean([r["metrics"][metric] for r in rows if r["config"]["n_tasks"] == T]) for T in Ts]
            sems = [np.std([r["metrics"][metric] for r in rows if r["config"]["n_tasks"] == T], ddof=1) /
                    np.sqrt(max(1, sum(r["config"]["n_tasks"] == T for r in rows))) for T in Ts]
            ax.errorbar(Ts, means, yerr=sems, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tasks")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "multitask.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    _log(f"wrote {path}")


# --- MovieLens (Table 1's tasks, the COMET paper's gates) and the tuning-budget curves ---------------

ML_ALPHA = 0.9  # the loss 0.9 BCE(watch) + 0.1 MSE(rating): the watch task's ROC AUC is the COMET metric
# Adagrad learning rates, 12 log-spaced in [0.003, 0.1]: a fine grid stands in for the authors'
# log-uniform draws, so that random search over it has as many distinct choices as trials
ML_LRS = [float(f"{v:.3g}") for v in np.geomspace(0.003, 0.1, 12)]
ML_COMMON = {"alpha": [ML_ALPHA], "epochs": [3], "early_stopping_patience": [1], "lr": ML_LRS}
ML_SMOOTH = {"k": [2, 4], "entropy_reg": [0.1, 1.0, 10.0], "gamma": [1.0, 10.0]}
ML_VARIANTS = {  # label -> (movielens method, grid, budget curve?)
    "Hash": ("hash", {"k": [1]}, True),
    "Hash + LS": ("hash", {"k": [1], "ls_frac": LS_FRACS}, True),
    "Top-k": ("top_k_per_example", {"k": [1, 2, 4]}, True),
    "Top-k + LS": ("top_k_per_example", {"k": [1, 2, 4], "ls_frac": LS_FRACS}, True),
    "DSelect-k": ("dselect_k_per_example", dict(ML_SMOOTH), False),
    "DSelect-k + LS": ("dselect_k_per_example", {**ML_SMOOTH, "ls_frac": LS_FRACS}, False),
    "COMET": ("comet_per_example", dict(ML_SMOOTH), False),
    "COMET + LS (COMET+)": ("comet_per_example", {**ML_SMOOTH, "ls_frac": LS_FRACS}, False),
}
ML_METRICS = ["test_auc", "test_rmse", "test_loss_x1e4", "mean_selected", "binary", "val_auc", "epochs"]
BUDGETS = [1, 2, 4, 8, 16, 32]  # beyond the 12-36 trials run a bootstrap only says "the best one seen"


def _ml_budget(args):
    """The grid entries of the reduced budget options (absent: the model of Appendix D.1, 3 epochs)."""
    out = {"epochs": [args.epochs]} if args.epochs is not None else {}
    if args.embedding_dim is not None:
        out["embedding_dim"] = [args.embedding_dim]
    if args.units is not None:
        out["units"] = [args.units]
    return out


def run_movielens(args):
    from dselectk.experiments import movielens as ML

    if not os.path.exists(args.data):
        sys.exit(f"{args.data} not found: run `sh benchmarks/get_movielens.sh` first (or pass --data)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trials.jsonl")
    chosen = _read_json(os.path.join(args.out, "chosen_configs.json"))
    for label in args.variants:
        method, extra, budget = ML_VARIANTS[label]
        grid = {"path": [os.path.abspath(args.data)], "method": [method], "variant": [label], **ML_COMMON, **extra,
                **_ml_budget(args)}
        trials = args.trials if budget else args.tune_trials
        _log(f"MovieLens, {label}: {trials} random-search trials, then {args.reps} repetitions")
        _, final = S.tune_and_repeat(ML.movielens_trial, grid, n_trials=trials, repetitions=args.reps,
                                     metric="val_loss", results_path=path, name=f"movielens/{_slug(label)}",
                                     seed=args.seed, max_workers=args.workers, progress=not args.quiet)
        chosen[label] = {"config": final.trials[0]["config"], "binary_constraint_met": final.constraint_met}
        _write_json(os.path.join(args.out, "chosen_configs.json"), chosen)
        write_movielens_tables(args.out)


def write_movielens_tables(out):
    records = load_records(os.path.join(out, "trials.jsonl"))
    finals = [r for r in records if r["sweep"].endswith("/final")]
    if not finals:
        return None
    for r in finals:
        r["metrics"]["test_loss_x1e4"] = r["metrics"]["test_loss"] * 1e4
    table = summarize(finals, group_by=("variant",), metrics=ML_METRICS)
    table.to_csv(os.path.join(out, "movielens.csv"))
    table.to_markdown(os.path.join(out, "movielens.md"), digits=4)
    tuning = [r for r in records if r["sweep"].endswith("/tune")]
    lines = write_budget_curves(out, tuning)
    with open(os.path.join(out, "budget.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _log(f"wrote {out}/movielens.md, budget.md")
    return table


def write_budget_curves(out, tuning, metric="val_auc"):
    """The expected best validation AUC of b random-search trials (bootstrapped over the trials run),
    per budget variant, as a table and a figure; and the budget ratios at equal quality."""
    from dselectk.experiments.local_search import best_of_budget, budget_ratio

    curves, lines = {}, [f"Expected best {metric} of b random-search trials (bootstrap of the trials run, 2000 draws; "
                         "[5%, 95%] quantiles):", "", "| variant | trials run | " +
                         " | ".join(f"b = {b}" for b in BUDGETS) + " |", "|---|---:|" + "---:|" * len(BUDGETS)]
    for label, (_, _, budget) in ML_VARIANTS.items():
        values = [r["metrics"][metric] for r in tuning if r["config"].get("variant") == label and budget
                  and r["metrics"].get(metric) == r["metrics"].get(metric)]
        if not values:
            continue
        mean, (lo, hi) = best_of_budget(values, BUDGETS)
        curves[label] = (mean, lo, hi, len(values))
        lines.append(f"| {label} | {len(values)} | " + " | ".join(f"{m:.4f} [{a:.4f}, {b:.4f}]"
                                                                for m, a, b in zip(mean, lo, hi)) + " |")
    lines += ["", "Budget ratio at equal quality: the trials method A needs to reach the best expected value that "
              f"method B reaches within b = {BUDGETS[-1]}, divided by the trials B needs for it (log-interpolated; "
              "'not reached': A never gets there within the budgets above).", ""]
    for base in ("Hash", "Top-k"):
        if base in curves and f"{base} + LS" in curves:
            for a, b in ((base, f"{base} + LS"), (f"{base} + LS", base)):
                ratio = budget_ratio(BUDGETS, curves[a][0], curves[b][0])
                lines.append(f"* A = {a}, B = {b}: {'not reached' if ratio is None else f'{ratio:.2f}x'}")
    try:
        plot_budget_curves(out, curves, metric)
    except ImportError as exc:
        _log(f"no figure: {exc}")
    return lines


def plot_budget_curves(out, curves, metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, (mean, lo, hi, n) in curves.items():
        line, = ax.plot(BUDGETS, mean, marker="o", label=f"{label} ({n} trials)")
        ax.fill_between(BUDGETS, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("random-search trials (budget)")
    ax.set_ylabel(f"expected best {metric}")
    ax.set_title("MovieLens: tuning budget (bootstrap over the trials run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "budget.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    _log(f"wrote {path}")


# --- helpers -------------------------------------------------------------------------------------

def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    faulthandler.enable()  # a crash in a kernel prints where it happened (as the other experiment scripts)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rc = sub.add_parser("recovery", help="Appendix C.3.2 with every gate, +- local search, and the remedies")
    rc.add_argument("--variants", nargs="+", default=list(RECOVERY_VARIANTS), choices=list(RECOVERY_VARIANTS))
    rc.add_argument("--trials", type=int, default=24)
    rc.add_argument("--tune-reps", type=int, default=3)
    rc.add_argument("--reps", type=int, default=20)
    rc.add_argument("--out", default="benchmarks/results/local_search_recovery")
    pr = sub.add_parser("paired", help="gate recovery: local search on and off at one configuration, same seeds")
    pr.add_argument("--out", default="benchmarks/results/local_search_recovery")
    cm = sub.add_parser("common", help="gate recovery: every variant's chosen configuration on the same 20 problems")
    cm.add_argument("--out", default="benchmarks/results/local_search_recovery")
    mt = sub.add_parser("multitask", help="Appendix C.2 with the task-mean loss, + COMET and local search")
    mt.add_argument("--variants", nargs="+", default=list(MULTITASK_VARIANTS), choices=list(MULTITASK_VARIANTS))
    mt.add_argument("--tasks", type=int, nargs="+", default=[16, 32, 64, 128])
    mt.add_argument("--trials", type=int, default=6)
    mt.add_argument("--reps", type=int, default=10)
    mt.add_argument("--epochs", type=int, default=10)
    mt.add_argument("--binary-regime", action="store_true",
                    help="DSelect-k / COMET at lr 0.1 and lambda 0.1, where their S(Z) becomes binary")
    mt.add_argument("--out", default="benchmarks/results/local_search_multitask")
    ml = sub.add_parser("movielens", help="MovieLens, per-example gates +- local search, and the tuning budget")
    ml.add_argument("--data", default="benchmarks/data/movielens.csv")
    ml.add_argument("--variants", nargs="+", default=list(ML_VARIANTS), choices=list(ML_VARIANTS))
    ml.add_argument("--trials", type=int, default=24, help="random-search trials of Hash / Top-k (+- LS)")
    ml.add_argument("--tune-trials", type=int, default=12, help="random-search trials of DSelect-k / COMET (+- LS)")
    ml.add_argument("--reps", type=int, default=10)
    ml.add_argument("--epochs", type=int, default=None, help="training epochs (default 3)")
    ml.add_argument("--embedding-dim", type=int, default=None, help="user / movie embedding width (default 128)")
    ml.add_argument("--units", type=int, default=None, help="expert and tower width (default 256)")
    ml.add_argument("--out", default="benchmarks/results/local_search_movielens")
    tb = sub.add_parser("tables", help="rewrite the tables and figures from the trials run")
    tb.add_argument("--recovery-out", default="benchmarks/results/local_search_recovery")
    tb.add_argument("--multitask-out", default="benchmarks/results/local_search_multitask")
    tb.add_argument("--movielens-out", default="benchmarks/results/local_search_movielens")
    for p in (rc, pr, cm, mt, ml):
        p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.time()
    if args.cmd == "recovery":
        run_recovery(args)
    elif args.cmd == "paired":
        run_paired(args)
    elif args.cmd == "common":
        run_common(args)
    elif args.cmd == "multitask":
        run_multitask(args)
    elif args.cmd == "movielens":
        run_movielens(args)
    else:
        if os.path.exists(os.path.join(args.recovery_out, "trials.jsonl")):
            write_recovery_tables(args.recovery_out)
            write_paired_table(args.recovery_out)
            write_common_table(args.recovery_out)
        if os.path.exists(os.path.join(args.multitask_out, "trials.jsonl")):
            write_multitask_tables(args.multitask_out)
        if os.path.exists(os.path.join(args.movielens_out, "trials.jsonl")):
            write_movielens_tables(args.movielens_out)
    _log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
