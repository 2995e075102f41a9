"""What the COMET experiments add to the paper's trial functions (Ibrahim et al., KDD 2023; issue
#13): permutation local search, the two remedies for DSelect-k's selector collapse, and the
tuning-budget curve.

Config keys read by the trial functions of :mod:`~dselectk.experiments.synthetic`,
:mod:`~dselectk.experiments.movielens` and :mod:`~dselectk.experiments.multi_mnist` (all optional;
absent, a trial is exactly what it was before):

=================  ==================================================================================
``ls_frac``        local search for the first ``ls_frac`` of the training epochs (0: none); the authors
                   draw 0.01-0.1 of their 100 epochs
``ls_tau_start``   the temperature at the start of the soft phase (default the authors' 1e-3) ...
``ls_tau_end``     ... and at its end (default 1e-7)
``ls_shared``      one permutation for every task gate (default False: one per gate)
``warmup_frac``    DSelect-k / COMET: the entropy regularizer lambda is 0 for the first ``warmup_frac``
                   of the training steps, then the configured lambda (a remedy for the collapse)
``init``           "reference" (default: Z uniform in +-gamma/100) or "distinct": each selector's Z
                   starts at +-gamma/4, the bits of a different random expert (symmetry breaking)
=================  ==================================================================================
"""
from __future__ import annotations

import numpy as np

from ..local_search import LocalSearch

__all__ = ["local_search_from", "LambdaWarmup", "distinct_selector_init", "training_extras", "best_of_budget",
           "budget_ratio", "paired_recovery_trial"]


def local_search_from(config, epochs, steps_per_epoch=None):
    """The LocalSearch of ``config`` (None without ``ls_frac``), its soft phase ``ls_frac * epochs``
    epochs long."""
    frac = float(config.get("ls_frac", 0) or 0)
    if frac <= 0:
        return None
    return LocalSearch(epochs=frac * epochs, shared=bool(config.get("ls_shared", False)),
                       tau_start=float(config.get("ls_tau_start", 1e-3)), tau_end=float(config.get("ls_tau_end", 1e-7)))


def _inner(gate):
    return getattr(gate, "inner", gate)


class LambdaWarmup:
    """fit callback: every gate's entropy regularizer lambda is 0 for the first ``steps`` training
    steps, then back to its configured value."""

    def __init__(self, steps):
        self.steps = int(steps)

    def _set(self, model, on):
        for g in model.gates:
            inner = _inner(g)
            if hasattr(inner, "entropy_reg"):
                if not hasattr(inner, "_warmup_lambda"):
                    inner._warmup_lambda = inner.entropy_reg
                inner.entropy_reg = inner._warmup_lambda if on else 0.0

    def on_train_begin(self, model, total_steps):
        self._set(model, on=self.steps <= 0)

    def on_step_end(self, step, model):
        if step == self.steps:
            self._set(model, on=True)


def distinct_selector_init(model, seed, scale=0.25):
    """Symmetry-breaking start for static DSelect-k gates: selector i's Z row is +-scale * gamma by
    the bits of expert e_i, the e_i distinct (drawn from ``seed``), so that S(Z) starts at about
    0.84 / 0.16 toward k different experts instead of at 1/2 for all. COMET gates: each tree's
    node logits are set the same way toward a distinct leaf."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    for g in model.gates:
        inner = _inner(g)
        kind = type(inner).__name__
        if inner.per_example or kind not in ("DSelectKGate", "CometGate"):
            continue
        targets = rng.choice(inner.n_experts, size=inner.k, replace=False)
        Z = inner.params["Z"]
        if kind == "DSelectKGate":
            bits = (targets[:, None] >> np.arange(inner.m)[None, :]) & 1
            Z[...] = np.where(bits == 1, scale, -scale) * inner.gamma
        else:
            from .. import functional as F

            leaf = F.comet_leaf_nodes(inner.n_experts)
            Z[...] = 0
            for t, e in enumerate(targets):
                node = int(leaf[e])
                while node > 0:  # walk up: left children (odd) need s -> 1, right ones s -> 0
                    parent = (node - 1) // 2
                    Z[t, parent] = scale * inner.gamma if node % 2 == 1 else -scale * inner.gamma
                    node = parent


def training_extras(model, config, total_steps, seed):
    """Applies ``config``'s ``init`` to ``model`` and returns the fit callbacks of its
    ``warmup_frac`` (see the module docstring)."""
    init = config.get("init", "reference")
    if init == "distinct":
        distinct_selector_init(model, seed)
    elif init != "reference":
        raise ValueError(f"init must be 'reference' or 'distinct', got {init!r}")
    frac = float(config.get("warmup_frac", 0) or 0)
    return [LambdaWarmup(round(frac * total_steps))] if frac > 0 else []


def paired_recovery_trial(config, seed):
    """:func:`~dselectk.experiments.synthetic.gate_recovery_trial` with the seed (hence the data,
    the true experts' positions and the initialization) ``config["pair_seed"]`` rather than the
    sweep's: runs of two configurations with equal pair seeds are paired (the same problem)."""
    from .synthetic import gate_recovery_trial

    config = dict(config)
    return gate_recovery_trial(config, int(config.pop("pair_seed")))


# --- the tuning-budget claim ------------------------------------------------------------------

def best_of_budget(values, budgets, n_boot=2000, seed=0, larger_is_better=True):
    """Expected best of ``b`` random-search trials, for each b in ``budgets``, bootstrapped from the
    trials run: ``values`` (N,) one validation metric per trial; for each b, ``n_boot`` draws of b
    trials with replacement, the best of each. Returns (mean (len(budgets),), (lo, hi) the 5% and
    95% quantiles)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("best_of_budget needs at least one trial")
    rng = np.random.default_rng(seed)
    means, lo, hi = [], [], []
    for b in budgets:
        draws = values[rng.integers(0, values.size, size=(n_boot, int(b)))]
        best = draws.max(axis=1) if larger_is_better else draws.min(axis=1)
        means.append(best.mean())
        lo.append(np.quantile(best, 0.05))
        hi.append(np.quantile(best, 0.95))
    return np.array(means), (np.array(lo), np.array(hi))


def budget_ratio(budgets, curve_a, curve_b, larger_is_better=True):
    """The budget ratio at equal quality: for the best value curve_b reaches (method b), the
    smallest budget at which curve_a reaches it (log-interpolated between grid points) divided by
    the smallest budget at which b does. None when curve_a never reaches it. A ratio of 100 means
    method a needs 100 times more trials than method b for b's best quality."""
    budgets = np.asarray(budgets, dtype=np.float64)
    sign = 1.0 if larger_is_better else -1.0
    a, b = sign * np.asarray(curve_a), sign * np.asarray(curve_b)
    target = b.max()

    def first_reach(curve):
        hit = np.flatnonzero(curve >= target)
        if hit.size == 0:
            return None
        i = int(hit[0])
        if i == 0:
            return budgets[0]
        # log-linear interpolation between budgets[i - 1] and budgets[i]
        x0, x1, y0, y1 = np.log(budgets[i - 1]), np.log(budgets[i]), curve[i - 1], curve[i]
        return float(np.exp(x0 + (target - y0) / (y1 - y0) * (x1 - x0))) if y1 != y0 else budgets[i]

    ra, rb = first_reach(a), first_reach(b)
    return None if ra is None else ra / rb
