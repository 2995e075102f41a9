"""The paper's synthetic experiments (Appendix C.2, C.3.2 and D.4) as sweep trial functions.

* :func:`synthetic_trial` trains one static-gate MMoE on the multi-task data of Appendix C.2 and
  returns validation and test MSE, the Jaccard indices of the experts chosen by related and by
  unrelated task pairs, the number of selected experts and whether S(Z) became binary.
* :func:`gate_recovery_trial` trains the gate of an MoE whose 16 frozen experts include exact copies
  of the 4 that generated the data (Appendix C.3.2) and counts the true experts it selects.
* :func:`tune_and_repeat` is the paper's protocol around either: random grid search on the
  validation metric (discarding DSelect-k configurations whose S(Z) did not become binary), then
  repetitions of the best configuration with new seeds.

Methods (``config["method"]``), all static gates choosing k = 4 experts:

=====================  ===============================================================
``dselect_k``          DSelect-k, gamma and lambda (entropy regularizer) from the grid
``top_k``              Top-k (Shazeer et al.)
``ablation_annealing`` sum_i softmax(alpha)_i softmax(beta_i / T), T annealed from s to 1e-16
``ablation_entropy``   the same selectors at T = 1 with the entropy regularizer lambda
``comet``              COMET (Ibrahim et al., KDD 2023): k = 4 trees, gamma and lambda as DSelect-k's
=====================  ===============================================================

The selected experts of a gate are those with a nonzero weight, at most the k = 4 largest (a
DSelect-k gate whose S(Z) is still fractional gives small nonzero weights to many experts; once
S(Z) is binary, and for Top-k, the rule changes nothing). For the ablation gates, whose weights
are never exactly zero, they are the argmax of each softmax selector (the paper: "the softmax
output can be transformed to a one-hot vector using a heuristic (e.g., by taking an argmax)"). The MSE reported is the mean over tasks of each task's mean squared error.

The COMET experiments' options (local search ``ls_frac`` ..., the remedies ``warmup_frac`` and
``init``; :mod:`dselectk.experiments.local_search`) are read by both trial functions.

These functions are module-level so that the process pool and Dask workers of
:class:`dselectk.sweep.Sweep` can import them; each worker generates a data set once and keeps it.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import datasets
from ..gates import Comet, DSelectK, SoftmaxSelector, SoftmaxSelectorGate, TopK
from ..models import MMoE
from ..sweep import Sweep, SweepResult
from ..trainer import AnnealTemperature, fit, predict
from .local_search import local_search_from, training_extras

__all__ = ["METHODS", "PAPER_GRIDS", "RECOVERY_GRIDS", "synthetic_trial", "gate_recovery_trial",
           "selected_expert_sets", "tune_and_repeat", "binary_constraint"]

METHODS = ("dselect_k", "top_k", "ablation_annealing", "ablation_entropy", "comet")

# Appendix D.4: Adam, batch 256, and these ranges (one grid per method; "epochs" is tuned too).
_COMMON = {"lr": [1e-3, 1e-2, 1e-1], "epochs": [25, 50, 75, 100]}
PAPER_GRIDS = {
    "dselect_k": {**_COMMON, "gamma": [5.0, 10.0, 15.0], "lam": [0.001, 0.005, 0.01, 0.1]},
    "top_k": dict(_COMMON),
    "ablation_annealing": {**_COMMON, "temperature": [1e-6, 1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 5e-3,
                                                      1e-2]},
    "ablation_entropy": {**_COMMON, "lam": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 100.0]},
}
# Appendix C.3.2 says only "after tuning both models"; the learning rates of D.4's other
# experiments ({1e-1 .. 1e-5}) and C.2's gamma and lambda values.
RECOVERY_GRIDS = {
    "dselect_k": {"lr": [1e-1, 1e-2, 1e-3, 1e-4], "epochs": [25, 50, 100], "gamma": [1.0, 5.0, 10.0],
                  "lam": [0.0, 0.001, 0.01, 0.1]},
    "top_k": {"lr": [1e-1, 1e-2, 1e-3, 1e-4], "epochs": [25, 50, 100]},
}

K = 4
BATCH_SIZE = 256


def binary_constraint(metrics):
    """The paper's tuning rule: a DSelect-k configuration counts only if S(Z) became binary."""
    return metrics.get("binary", 1.0) == 1.0


@functools.lru_cache(maxsize=4)
def _multitask_data(n_tasks, n_samples, data_seed):
    split = (n_samples * 5 // 7, n_samples // 7, n_samples - n_samples * 5 // 7 - n_samples // 7)
    return datasets.synthetic_multitask(n_tasks, n_samples=n_samples, split=split, seed=data_seed)


def _gate_spec(method, config):
    """The static gate of ``method``, choosing k = K experts."""
    if method == "dselect_k":
        return DSelectK(K, gamma=config["gamma"], entropy_reg=config["lam"])
    if method == "top_k":
        return TopK(K)
    if method == "ablation_annealing":
        return SoftmaxSelector(K, temperature=config["temperature"], entropy_reg=0.0)
    if method == "ablation_entropy":
        return SoftmaxSelector(K, temperature=1.0, entropy_reg=config["lam"])
    if method == "comet":  # k = K trees, gamma and lambda (the leaf-reach entropy) from DSelect-k's grid
        return Comet(K, gamma=config["gamma"], entropy_reg=config["lam"])
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def selected_expert_sets(model):
    """The set of experts each task's gate selects after training (see the module docstring)."""
    sets = []
    weights = model.gate_weights()  # (T, n) at the last forward
    for g, w in zip(model.gates, weights):
        if isinstance(g, SoftmaxSelectorGate):
            sigma_alpha = np.exp(g.params["alpha"] - g.params["alpha"].max())
            keep = sigma_alpha > 0  # selectors whose weight did not underflow to 0
            sets.append(set(np.argmax(g.params["beta"], axis=1)[keep].tolist()))
        else:
            nonzero = np.flatnonzero(w)
            sets.append(set(nonzero[np.argsort(-w[nonzero], kind="stable")[:K]].tolist()))
    return sets


def _mse_per_task(model, X, Y):
    preds = predict(model, X, batch_size=4096)
    return [float(np.mean((p.astype(np.float64) - y) ** 2)) for p, y in zip(preds, Y)]


def synthetic_trial(config, seed):
    """One training run of Appendix C.2. ``config``: ``method``, ``n_tasks`` (16, 32, 64 or 128),
    ``lr``, ``epochs`` and the method's own settings (``gamma``/``lam`` for DSelect-k, ``temperature``
    for the annealing ablation, ``lam`` for the entropy ablation); optional ``n_samples`` (default
    the paper's 140,000, split 5:1:1) and ``data_seed`` (default 0: every run sees the same data, as
    in the paper, and only the model's initialization and shuffling change with ``seed``);
    optional ``task_mean`` (default False): train on the MSE averaged over the T tasks instead of
    summed (task weights 1/T). With Adam that leaves Top-k and the annealed ablation unchanged (a
    constant loss scale) but makes the regularizers T times stronger relative to the loss: the
    reading of "squared error loss" under which the paper's lambda range makes S(Z) binary here.

    Model: MMoE with T/4 trainable experts of the generating form (4 ReLU units, summed), one static
    gate per task choosing k = 4, no towers, squared error, Adam, batch 256.
    """
    method = config["method"]
    T = int(config["n_tasks"])
    data = _multitask_data(T, int(config.get("n_samples", 140_000)), int(config.get("data_seed", 0)))
    epochs = int(config["epochs"])
    model = MMoE(data.X_train.shape[1], n_tasks=T, n_experts=T // 4, expert_units=(4,), expert_output="sum",
                 tower_units=None, task_losses="mse", gate=_gate_spec(method, config), seed=seed,
                 task_weights=[1.0 / T] * T if config.get("task_mean", False) else None,
                 local_search=local_search_from(config, epochs))
    callbacks = [AnnealTemperature(config["temperature"])] if method == "ablation_annealing" else []
    steps = epochs * -(-data.X_train.shape[0] // BATCH_SIZE)
    callbacks += training_extras(model, config, steps, seed)
    history = fit(model, data.X_train, data.Y_train, epochs=epochs, batch_size=BATCH_SIZE,
                  lr=config["lr"], seed=seed, callbacks=callbacks, verbose=0)
    model.forward(data.X_val[:1])  # the gates' final weights (static: independent of the input)
    sets = selected_expert_sets(model)
    related, unrelated = (datasets.task_pair_jaccard(sets, data.groups) if T > 1 else (np.nan, np.nan))
    binary = [g.is_binary() for g in model.gates if hasattr(g, "is_binary")]
    steps = history.binary_step
    return {
        "val_mse": float(np.mean(_mse_per_task(model, data.X_val, data.Y_val))),
        "test_mse": float(np.mean(_mse_per_task(model, data.X_test, data.Y_test))),
        "jaccard_related": related,
        "jaccard_unrelated": unrelated,
        "selected": float(np.mean([len(s) for s in sets])),
        "binary": float(all(binary)) if binary else 1.0,
        # fraction of the training steps until the last task's S(Z) became binary (Table C.4)
        "binary_step_frac": (float(max(steps) + 1) / history.total_steps
                             if binary and all(s is not None for s in steps) else float("nan")),
    }


@functools.lru_cache(maxsize=4)
def _recovery_data(data_seed):
    return datasets.gate_recovery(seed=data_seed)


def gate_recovery_trial(config, seed, return_model=False):
    """One run of Appendix C.3.2. ``config``: ``method`` ("dselect_k" or "top_k"), ``lr``,
    ``epochs``, and for DSelect-k ``gamma`` and ``lam``; optional ``data_seed`` (default: ``seed``,
    so each repetition draws a new generating MoE as well as a new initialization) and
    ``record_every`` (steps between recorded gate weights, 0 = once per epoch).

    Model: 16 experts, each a Dense(4) ReLU layer, frozen; 4 of them exact copies of the generating
    experts at positions drawn from ``seed`` (not 0..3: a fresh static Top-k gate picks the lowest
    indices on ties), the other 12 drawn N(0, 1) like the generating ones; a static gate choosing 4
    of 16; a trainable logistic unit; BCE, Adam, batch 256.

    Returns {"val_loss", "val_accuracy", "recovered" (true experts selected, 0..4), "selected",
    "binary"}; with ``return_model`` also the model, its History and the true positions.
    """
    method = config["method"]
    data = _recovery_data(int(config.get("data_seed", seed)))
    rng = np.random.default_rng(seed)
    epochs = int(config["epochs"])
    model = MMoE(data.X_train.shape[1], n_tasks=1, n_experts=16, expert_units=(4,), tower_units=(),
                 task_losses="bce", gate=_gate_spec(method, config), seed=seed,
                 local_search=local_search_from(config, epochs))
    true_positions = np.sort(rng.choice(16, size=4, replace=False))
    for j, expert in enumerate(model.experts):
        dense = expert.layers[0]
        dense.params["b"][...] = 0
        dense.params["W"][...] = rng.standard_normal(dense.params["W"].shape)
    for i, j in enumerate(true_positions):
        model.experts[j].layers[0].params["W"][...] = data.expert_weights[i]
    model.freeze("expert")
    callbacks = training_extras(model, config, epochs * -(-data.X_train.shape[0] // BATCH_SIZE), seed)
    history = fit(model, data.X_train, [data.y_train], epochs=epochs, batch_size=BATCH_SIZE,
                  lr=config["lr"], seed=seed, verbose=0, record_gate_every=int(config.get("record_every", 0)),
                  callbacks=callbacks)
    model.forward(data.X_val[:1])
    chosen = selected_expert_sets(model)[0]
    p = predict(model, data.X_val, batch_size=4096)[0].astype(np.float64)
    y = data.y_val
    eps = 1e-12
    metrics = {
        "val_loss": float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))),
        "val_accuracy": float(np.mean((p > 0.5) == (y > 0.5))),
        "recovered": float(len(chosen & set(true_positions.tolist()))),
        "selected": float(len(chosen)),
        "binary": float(model.gates[0].is_binary()) if hasattr(model.gates[0], "is_binary") else 1.0,
    }
    if return_model:
        return metrics, model, history, true_positions
    return metrics


def tune_and_repeat(trial_fn, grid, *, n_trials, repetitions, tune_repetitions=1, metric="val_mse",
                    constraint=binary_constraint, results_path=None, name="experiment", seed=0,
                    executor="process", max_workers=None, progress=True):
    """The paper's protocol: a random grid search of ``n_trials`` configurations of ``grid`` (each
    run ``tune_repetitions`` times), the best by mean validation ``metric`` among those passing
    ``constraint``, then ``repetitions`` runs of it with fresh seeds. Both sweeps append to
    ``results_path`` and resume from it. Returns (tuning SweepResult, final SweepResult); when no
    configuration passes the constraint the best one regardless is repeated, and the final
    result's ``constraint_met`` attribute is False."""
    tuning = Sweep(trial_fn, grid, n_trials=n_trials, repetitions=tune_repetitions, seed=seed, metric=metric,
                   constraint=constraint, results_path=results_path, name=f"{name}/tune")
    tuned = tuning.run(executor=executor, max_workers=max_workers, progress=progress)
    best, met = tuned.best_config, True
    if best is None:
        best, met = SweepResult(tuned.trials, metric=metric).best_config, False
    final = Sweep(trial_fn, {key: [value] for key, value in best.items()}, n_trials=1, repetitions=repetitions,
                  seed=seed + 1, metric=metric, results_path=results_path, name=f"{name}/final")
    result = final.run(executor=executor, max_workers=max_workers, progress=progress)
    result.constraint_met = met
    return tuned, result
