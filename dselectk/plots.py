"""Plots of the paper's figures from results this package produced. Needs matplotlib (an optional
extra: ``pip install "dselectk[plot]"``), imported only when a plot function is called.

* :func:`plot_metric_vs_tasks` -- Figure C.4: test MSE and the related / unrelated Jaccard indices
  against the number of tasks, one line per gate (mean ± standard error over repetitions), with
  the expected Jaccard index of a gate choosing 4 experts at random.
* :func:`plot_expert_weights` -- Figures C.6 / C.7: one task's expert weights during training.
* :func:`plot_task_expert_heatmap` -- Figure C.3: the expert weights of every task as a heatmap.

Each function writes a PNG and returns a ``matplotlib.figure.Figure`` made with the
object-oriented API, without pyplot: nothing here selects a backend or touches pyplot's global
state, so a Jupyter session keeps its inline backend (and shows the returned figure), a script
keeps whatever backend it chose, and a machine without a display needs none (``savefig`` renders
through Agg by itself). The figures are not registered with pyplot, so none are left open.
"""
from __future__ import annotations

import numpy as np

__all__ = ["plot_metric_vs_tasks", "plot_expert_weights", "plot_task_expert_heatmap"]

METHOD_LABELS = {"dselect_k": "DSelect-k", "top_k": "Top-k", "ablation_annealing": "Ablation (Annealing)",
                 "ablation_entropy": "Ablation (Entropy)"}


def _figure(**kwargs):
    """A new ``matplotlib.figure.Figure`` (not a pyplot figure: no backend is selected)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError('plotting needs matplotlib, an optional dependency: pip install "dselectk[plot]" '
                          "(or: pip install matplotlib)") from exc
    return Figure(**kwargs)


def _mean_sem(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return np.nan, np.nan
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def plot_metric_vs_tasks(records, path, k=4, tasks_per_expert=4):
    """Figure C.4 from trial records (dicts with ``config`` holding ``method`` and ``n_tasks``, and
    ``metrics`` holding ``test_mse``, ``jaccard_related``, ``jaccard_unrelated``), e.g. the final
    repetitions of :func:`dselectk.experiments.synthetic.tune_and_repeat`. Writes a PNG to ``path``
    and returns the matplotlib Figure."""
    from .datasets import expected_random_jaccard

    fig = _figure(figsize=(14, 4))
    by = {}
    for r in records:
        by.setdefault(r["config"]["method"], {}).setdefault(int(r["config"]["n_tasks"]), []).append(r["metrics"])
    panels = [("test_mse", "Test MSE"), ("jaccard_related", "Jaccard index, related tasks"),
              ("jaccard_unrelated", "Jaccard index, unrelated tasks")]
    axes = fig.subplots(1, 3)
    all_T = sorted({T for d in by.values() for T in d})
    for ax, (metric, label) in zip(axes, panels):
        for method, per_T in by.items():
            Ts = sorted(per_T)
            stats = [_mean_sem([m.get(metric) for m in per_T[T]]) for T in Ts]
            ax.errorbar(Ts, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                        label=METHOD_LABELS.get(method, method))
        if metric != "test_mse" and all_T:
            ax.plot(all_T, [expected_random_jaccard(T // tasks_per_expert, k) for T in all_T], "k--",
                    label="Random gate (expected)")
        if metric == "test_mse":
            ax.set_yscale("log")  # the methods differ by orders of magnitude
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_T, [str(T) for T in all_T])
        ax.set_xlabel("Number of tasks")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_expert_weights(history, path, task=0, highlight=(), title=None):
    """Figures C.6 / C.7: the expert weights of ``task`` at the steps ``fit`` recorded them
    (``record_gate_every``), one line per expert; experts in ``highlight`` (e.g. the true experts
    of the gate-recovery data) drawn solid and thick, the others thin and dashed."""
    W = history.gate_weights  # (records, T, n)
    if W.size == 0:
        raise ValueError("the history recorded no gate weights (fit a model with gates)")
    steps = np.asarray(history.gate_steps)
    highlight = set(int(j) for j in highlight)
    n = W.shape[2]
    fig = _figure(figsize=(7 + 1.2 * (1 + n // 20), 4))
    ax = fig.subplots()
    for j in range(n):
        true = j in highlight
        ax.plot(steps, W[:, task, j], lw=2.2 if true else 0.8, ls="-" if true else "--",
                label=f"expert {j}" + (" (true)" if true else ""))
    ax.set_xlabel("Training step")
    ax.set_ylabel("Expert weight")
    ax.set_ylim(-0.02, 1.02)
    if title:
        ax.set_title(title, fontsize=10)
    # every expert in the legend, beside the axes so that it hides no line
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + n // 20, borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_task_expert_heatmap(weights, path, task_names=None, title=None):
    """Figure C.3: ``weights`` (T, n), the expert weights of each task (e.g.
    ``model.gate_weights()``), as a heatmap with the values written in the cells."""
    W = np.asarray(weights, float)
    if W.ndim != 2:
        raise ValueError(f"weights must be (T, n), got shape {W.shape}")
    fig = _figure(figsize=(1 + 0.6 * W.shape[1], 1 + 0.5 * W.shape[0]))
    ax = fig.subplots()
    im = ax.imshow(W, cmap="viridis", vmin=0, vmax=max(1e-12, W.max()))
    for (t, j), v in np.ndenumerate(W):
        ax.text(j, t, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 * W.max() else "k")
    ax.set_xticks(range(W.shape[1]), [str(j) for j in range(W.shape[1])])
    ax.set_yticks(range(W.shape[0]), task_names or [f"task {t}" for t in range(W.shape[0])])
    ax.set_xlabel("Expert")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
