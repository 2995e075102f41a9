"""The MovieLens experiment of the DSelect-k paper (Hazimeh et al., NeurIPS 2021, Section 5 and
Appendix D.1), as one function: :func:`run`.

The problem: the two tasks of :func:`dselectk.movielens.movielens_multitask` -- task 1, did the
user rate the movie (binary, negatives sampled 1:1 from the movies the user did not rate), task
2, the rating (regression, on the positives only) -- with the loss
alpha * BCE + (1 - alpha) * MSE.

The model (Appendix D.1): user and movie ids -> embeddings, concatenated; an MMoE with 8 experts,
each a ReLU-activated Dense(256) followed by dropout 0.5; per task a gate and a tower Dense(256)
ReLU -> 1 unit (a logit for task 1, the rating for task 2). Trained with Adagrad, batch size 128.
The gates compared: DSelect-k and Top-k, static and per-example, the softmax gate (MMoE), and the
shared-bottom baseline (``gate="shared_bottom"``: a Dense(256) ReLU + dropout bottom on the
embeddings, then the same towers).

What the paper leaves open is a parameter here, with the default we chose: the embedding width
(``embedding_dim``), the learning rate, the number of epochs and the early stopping on the
validation loss, DSelect-k's gamma and entropy coefficient, k, and alpha. The towers have no
dropout (``tower_dropout=0``); the experts (and the shared bottom) have ``dropout``.
"""
from __future__ import annotations

import functools

import numpy as np

from ..gates import Comet, DSelectK, Hash, Softmax, TopK
from ..models import MMoE, SharedBottom
from ..movielens import MovieLensMultitask, movielens_multitask
from ..trainer import evaluate, fit
from .local_search import local_search_from

__all__ = ["run", "mean_selected_experts", "movielens_trial", "GATES", "METHODS"]

GATES = ("dselect_k", "top_k", "softmax", "shared_bottom", "comet", "hash")
# The methods of the paper's Table 1: name -> (gate, per_example)
METHODS = {"dselect_k_static": ("dselect_k", False), "dselect_k_per_example": ("dselect_k", True),
           "top_k_static": ("top_k", False), "top_k_per_example": ("top_k", True),
           "softmax_moe": ("softmax", True), "shared_bottom": ("shared_bottom", False),
           # the COMET paper's gates (Ibrahim et al., KDD 2023): COMET, and hash routing on the user id
           "comet_static": ("comet", False), "comet_per_example": ("comet", True), "hash": ("hash", True)}


def mean_selected_experts(model, X, batch_size=1024):
    """The number of experts with nonzero weight, averaged over the tasks and (per-example gates)
    over the examples of X, in evaluation mode; None for a model without gates."""
    if not model.gates:
        return None
    from ..inputs import num_rows, take_rows

    X = model.input_layer.check(X) if model.input_layer is not None else X
    N, total = num_rows(X), 0.0
    for start in range(0, N, batch_size):
        batch = take_rows(X, slice(start, start + batch_size))
        model.forward(batch, training=False)
        total += np.mean([g.num_selected() for g in model.gates]) * num_rows(batch)
    return float(total / N)


def build_model(vocab_sizes, gate="dselect_k", per_example=False, *, alpha=0.5, k=2, n_experts=8, embedding_dim=128,
                units=256, dropout=0.5, gamma=1.0, entropy_reg=0.1, seed=0, dtype="float32", local_search=None):
    """The model of Appendix D.1 for the vocabulary sizes [n_users, n_movies] (see :func:`run`);
    ``local_search``: None or a :class:`~dselectk.local_search.LocalSearch` for the gates."""
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
    common = dict(n_tasks=2, tower_units=(units,), task_losses=["bce", "mse"], task_weights=[alpha, 1 - alpha],
                  dropout=dropout, tower_dropout=0.0, seed=seed, dtype=dtype,
                  embeddings=dict(vocab_sizes=list(vocab_sizes), dims=embedding_dim))
    if gate == "shared_bottom":
        return SharedBottom(None, bottom_units=(units,), **common)
    spec = {"dselect_k": lambda: DSelectK(k, gamma=gamma, entropy_reg=entropy_reg, per_example=per_example),
            "top_k": lambda: TopK(k, per_example=per_example), "softmax": lambda: Softmax(per_example=per_example),
            "comet": lambda: Comet(k, gamma=gamma, entropy_reg=entropy_reg, per_example=per_example),
            "hash": lambda: Hash(hash_feature=0)}  # the user id (k is 1)
    return MMoE(None, n_experts=n_experts, expert_units=(units,), gate=spec[gate](), local_search=local_search,
                **common)


def run(data, gate="dselect_k", per_example=False, *, alpha=0.5, k=2, n_experts=8, embedding_dim=128, units=256,
        dropout=0.5, gamma=1.0, entropy_reg=0.1, epochs=100, batch_size=128, lr=0.01, early_stopping_patience=5,
        neg_ratio=1, data_seed=0, seed=0, dtype="float32", verbose=0, return_model=False, ls_frac=0.0,
        ls_shared=True, ls_tau_start=1e-3, ls_tau_end=1e-7):
    """Train and test one model of the paper's MovieLens experiment.

    data : a ratings file (``benchmarks/get_movielens.sh`` writes one), a
        :class:`~dselectk.movielens.Ratings`, or a ready :class:`~dselectk.movielens.MovieLensMultitask`
        (then ``neg_ratio`` and ``data_seed`` are not used).
    gate : "dselect_k", "top_k", "softmax" (MMoE) or "shared_bottom"; ``per_example`` for the
        per-example (input-dependent) gates.
    alpha : the loss is alpha * BCE(task 1) + (1 - alpha) * MSE(task 2).
    k, gamma, entropy_reg : DSelect-k's (and Top-k's k); entropy_reg applies to DSelect-k only.
    embedding_dim, units, dropout, n_experts : the architecture (see the module docstring).
    epochs, batch_size, lr, early_stopping_patience : Adagrad training with early stopping on the
        validation loss (the best epoch's weights are restored; None: no early stopping).
    seed : initialization, dropout and shuffling; data_seed : negatives and split.
    ls_frac, ls_shared, ls_tau_start, ls_tau_end : permutation local search for the first
        ``ls_frac * epochs`` epochs (0: none), one permutation shared by both task gates (the COMET
        authors' MovieLens configs) or one per gate; see dselectk.experiments.local_search.

    Returns a dict: ``test_loss`` (alpha-weighted task losses on the test set, no regularizer),
    ``test_auc`` (task 1), ``test_rmse`` (task 2, on the positives only), ``mean_selected``
    (experts with nonzero weight, averaged over tasks and test examples; None for the shared
    bottom), ``binary_fraction`` (per task, the fraction of the training steps after which the
    DSelect-k gate's S(Z) was binary, History.binary_step / total steps; None where it never was or
    for other gates), ``epochs`` (trained), ``total_steps``, ``val_loss`` (best), ``val_auc`` (task 1,
    of the restored weights), the settings, and
    with ``return_model`` the model and the History."""
    if not isinstance(data, MovieLensMultitask):
        data = movielens_multitask(data, neg_ratio=neg_ratio, seed=data_seed)
    local_search = local_search_from(dict(ls_frac=ls_frac, ls_shared=ls_shared, ls_tau_start=ls_tau_start,
                                          ls_tau_end=ls_tau_end), epochs)
    model = build_model(data.vocab_sizes, gate, per_example, alpha=alpha, k=k, n_experts=n_experts,
                        embedding_dim=embedding_dim, units=units, dropout=dropout, gamma=gamma, entropy_reg=entropy_reg,
                        seed=seed, dtype=dtype, local_search=local_search)
    tr, va, te = data.train, data.val, data.test
    validation = (va.X, va.Y, va.sample_weights) if len(va) else None
    history = fit(model, tr.X, tr.Y, sample_weights=tr.sample_weights, epochs=epochs, batch_size=batch_size,
                  optimizer="adagrad", lr=lr, validation_data=validation,
                  early_stopping_patience=early_stopping_patience if validation else None, seed=seed,
                  verbose=verbose)
    result = evaluate(model, te.X, te.Y, sample_weights=te.sample_weights)
    val_result = evaluate(model, va.X, va.Y, sample_weights=va.sample_weights) if validation else None
    steps = history.total_steps
    out = dict(
        test_loss=result["loss"],
        test_auc=result["task0_auc"],
        test_rmse=result["task1_rmse"],
        mean_selected=mean_selected_experts(model, te.X, batch_size=1024),
        binary_fraction=[None if s is None else s / steps for s in history.binary_step] if model.gates else
        [None, None],
        epochs=len(history.epochs),
        total_steps=steps,
        expert_flops=history.epochs[-1].get("expert_flops") if history.epochs else None,
        expert_flops_dense=history.epochs[-1].get("expert_flops_dense") if history.epochs else None,
        val_loss=min(history["val_loss"]) if validation else None,
        val_auc=val_result["task0_auc"] if validation else None,
        settings=dict(gate=gate, per_example=per_example, alpha=alpha, k=k, n_experts=n_experts,
                      embedding_dim=embedding_dim, units=units, dropout=dropout, gamma=gamma, entropy_reg=entropy_reg,
                      batch_size=batch_size, lr=lr, seed=seed, data_seed=data.seed, neg_ratio=data.neg_ratio),
    )
    if return_model:
        out.update(model=model, history=history)
    return out


@functools.lru_cache(maxsize=2)
def _cached_data(path, neg_ratio, data_seed):
    return movielens_multitask(path, neg_ratio=neg_ratio, seed=data_seed)


def movielens_trial(config, seed):
    """One run of :func:`run` as a :class:`dselectk.sweep.Sweep` trial: ``config`` holds ``path``
    (the ratings file), ``method`` (a key of :data:`METHODS`), ``alpha`` and any of run()'s
    keyword arguments (lr, epochs, k, gamma, entropy_reg, ...). The data set is built once per
    worker process. Returns flat metrics: val_loss, test_loss, test_auc, test_rmse,
    mean_selected, binary_pct (percentage of training steps until S(Z) became binary, mean over
    the tasks; NaN where it never did or for other gates), binary (1 when every task's S(Z) became
    binary, or for gates without S(Z)), expert_flops and expert_flops_dense."""
    config = dict(config)
    config.pop("variant", None)  # a results label (benchmarks/local_search_experiments.py), not an option
    data = _cached_data(config.pop("path"), int(config.pop("neg_ratio", 1)), int(config.pop("data_seed", 0)))
    gate, per_example = METHODS[config.pop("method")]
    out = run(data, gate, per_example, seed=seed, **config)
    fractions = out["binary_fraction"]
    dselect = gate in ("dselect_k", "comet")  # the smooth-step gates, which become binary
    return {
        "val_loss": out["val_loss"], "val_auc": out["val_auc"], "test_loss": out["test_loss"],
        "test_auc": out["test_auc"],
        "test_rmse": out["test_rmse"],
        "mean_selected": float("nan") if out["mean_selected"] is None else out["mean_selected"],
        "binary_pct": (100 * float(np.mean(fractions)) if dselect and all(f is not None for f in fractions)
                       else float("nan")),
        "binary": float(all(f is not None for f in fractions)) if dselect else 1.0,
        "expert_flops": float(out["expert_flops"] or 0), "expert_flops_dense": float(out["expert_flops_dense"] or 0),
        "epochs": out["epochs"],
    }
