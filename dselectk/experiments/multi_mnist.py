"""Multi-MNIST / Multi-Fashion-MNIST: the paper's image multi-task experiment (Section 4.2,
Appendix D.2 of Hazimeh et al., DSelect-k, NeurIPS 2021).

Two classification tasks per image (the classes of the top-left and of the bottom-right item of
:func:`dselectk.images.multi_mnist`), the loss their unweighted sum. Models (``MODELS``):

* ``"dselect_k"``, ``"top_k"``, ``"softmax"``, ``"comet"`` (COMET, Ibrahim et al., KDD 2023): MMoE
  with ``n_experts`` (8) CNN experts (conv 5x5, 10 filters -> ReLU -> maxpool 2 -> conv 5x5, 20
  filters -> ReLU -> maxpool 2 -> flatten -> ``expert_layers`` (1, 3 or 5 in the paper) Dense-ReLU
  layers of ``units`` (50)), a STATIC gate per task (DSelect-k with k selectors, Top-k with k,
  COMET with k trees, or the dense softmax gate), and a tower per task (``tower_units`` Dense-ReLU
  layers, then the 10-class output);
* ``"shared_bottom"``: the same CNN as one shared bottom, then the towers.

Training: Adam, batch size 256, the sum of the two cross-entropies (plus the gates'
regularizers), early stopping on the validation loss with the best weights restored. Reported:
per-task test accuracy and, for the gated models, the number of experts each task's gate selects
(nonzero weight) at the end.

Choices the paper leaves to tuning, with the defaults used here: k = 2, gamma = 1, entropy
regularization 0.1 for DSelect-k, learning rate 1e-3, at most 100 epochs with a patience of 10.
The towers are Appendix D.2's: Dense(50) ReLU -> Dense(50) ReLU -> 10 units with a softmax.

:func:`multi_mnist_trial` is one run as a trial of :class:`dselectk.sweep.Sweep` (the tuning and
repetitions of ``benchmarks/multi_fashion_mnist_experiment.py``).
"""
from __future__ import annotations

import functools
import time

import numpy as np

from .. import images
from ..gates import Comet, DSelectK, Softmax, TopK
from ..models import MMoE, SharedBottom
from ..trainer import evaluate, fit
from .local_search import local_search_from

__all__ = ["MODELS", "build_model", "run", "multi_mnist_trial"]

MODELS = ("dselect_k", "top_k", "softmax", "shared_bottom", "comet")


def build_model(name, input_shape, n_classes=(10, 10), n_experts=8, k=2, expert_layers=1, units=50,
                tower_units=(50, 50), filters=(10, 20), kernel=5, pool=2, gamma=1.0, entropy_reg=0.1, seed=0,
                dtype="float32", local_search=None):
    """One model of ``MODELS`` for images of ``input_shape`` (C, H, W) and two softmax tasks;
    ``local_search``: None or a :class:`~dselectk.local_search.LocalSearch` for the gates."""
    common = dict(input_shape=tuple(input_shape), n_tasks=2, tower_units=tuple(tower_units),
                  task_losses="softmax_ce", task_outputs=list(n_classes), seed=seed, dtype=dtype)
    dense = (units,) * expert_layers
    if name == "shared_bottom":
        return SharedBottom(bottom="cnn", bottom_units=dense, bottom_filters=filters, bottom_kernel=kernel,
                            bottom_pool=pool, **common)
    gates = {"dselect_k": lambda: DSelectK(k, gamma=gamma, entropy_reg=entropy_reg), "top_k": lambda: TopK(k),
             "softmax": Softmax, "comet": lambda: Comet(k, gamma=gamma, entropy_reg=entropy_reg)}
    if name not in gates:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    return MMoE(expert="cnn", n_experts=n_experts, expert_units=dense, expert_filters=filters, expert_kernel=kernel,
                expert_pool=pool, gate=gates[name](), local_search=local_search, **common)


def run(data=None, *, dataset="mnist", path=None, n_train=100_000, n_val=20_000, n_test=20_000, models=MODELS,
        epochs=100, batch_size=256, lr=1e-3, early_stopping_patience=10, seed=0, data_seed=0, verbose=0,
        **model_kwargs):
    """Train every model of ``models`` on one Multi-MNIST-style data set and test it.

    data : a :class:`dselectk.images.MultiMNIST`; if None it is built with ``dataset`` "mnist"
        (from ``path``, a directory of MNIST IDX files) or "fashion_mnist" (``path`` or the
        Debian package's directory), of sizes n_train / n_val / n_test and seed ``data_seed``.
    model_kwargs : passed to :func:`build_model` (n_experts, k, expert_layers, units,
        tower_units, filters, kernel, pool, gamma, entropy_reg, dtype).

    Returns {model name: {"test_accuracy": [task 0, task 1], "selected_experts": [per task] or
    None, "best_epoch", "epochs", "seconds", "num_parameters"}}."""
    if data is None:
        if dataset == "mnist":
            if path is None:
                raise ValueError("dataset='mnist' needs path=, a directory with the MNIST IDX files")
            data = images.multi_mnist(path, n_train, n_val, n_test, seed=data_seed)
        elif dataset == "fashion_mnist":
            data = images.multi_fashion_mnist(path, n_train, n_val, n_test, seed=data_seed)
        else:
            raise ValueError(f"dataset must be 'mnist' or 'fashion_mnist', got {dataset!r}")
    return {name: train_and_test(data, name, epochs=epochs, batch_size=batch_size, lr=lr,
                                 early_stopping_patience=early_stopping_patience, seed=seed, verbose=verbose,
                                 **model_kwargs) for name in models}


def train_and_test(data, name, *, epochs=100, batch_size=256, lr=1e-3, early_stopping_patience=10, seed=0, verbose=0,
                   return_model=False, ls_frac=0.0, ls_shared=False, ls_tau_start=1e-3, ls_tau_end=1e-7,
                   **model_kwargs):
    """Train one model of ``MODELS`` on ``data`` (a :class:`dselectk.images.MultiMNIST`) and test
    it: the dict of :func:`run` for one model, plus ``val_accuracy`` (per task, of the restored
    weights), ``binary_step`` (DSelect-k: per task, the training step after which S(Z) was binary,
    or None), ``total_steps``, ``epoch_seconds`` (mean wall time of an epoch, validation included)
    and ``expert_flops`` / ``expert_flops_dense`` (expert FLOPs of the whole training, executed
    and for the dense model); with ``return_model`` also the model and the History. ``ls_frac``,
    ``ls_shared``, ``ls_tau_start``, ``ls_tau_end``: permutation local search for the first
    ``ls_frac * epochs`` epochs (0: none), see dselectk.experiments.local_search."""
    local_search = local_search_from(dict(ls_frac=ls_frac, ls_shared=ls_shared, ls_tau_start=ls_tau_start,
                                          ls_tau_end=ls_tau_end), epochs)
    model = build_model(name, data.input_shape, seed=seed, local_search=local_search,
                        **model_kwargs)  # 10 classes per task
    start = time.perf_counter()
    validation = (data.X_val, data.Y_val) if len(data.X_val) else None
    history = fit(model, data.X_train, data.Y_train, epochs=epochs, batch_size=batch_size, lr=lr,
                  validation_data=validation, early_stopping_patience=early_stopping_patience if validation else None,
                  seed=seed, verbose=verbose)
    seconds = time.perf_counter() - start
    test = evaluate(model, data.X_test, data.Y_test, batch_size=1024)
    val = evaluate(model, data.X_val, data.Y_val, batch_size=1024) if validation else None
    selected = None
    if model.gates:
        model.forward(data.X_test[:batch_size])  # static gates: the weights do not depend on the batch
        selected = [int(g.num_selected()) for g in model.gates]
    last = history.epochs[-1] if history.epochs else {}
    out = dict(test_accuracy=[test["task0_accuracy"], test["task1_accuracy"]],
               val_accuracy=None if val is None else [val["task0_accuracy"], val["task1_accuracy"]],
               selected_experts=selected, best_epoch=history.best_epoch, epochs=len(history.epochs),
               seconds=seconds, epoch_seconds=float(np.mean([e["time"] for e in history.epochs])),
               num_parameters=model.num_parameters(), binary_step=list(history.binary_step),
               total_steps=history.total_steps, expert_flops=last.get("expert_flops"),
               expert_flops_dense=last.get("expert_flops_dense"))
    if return_model:
        out.update(model=model, history=history)
    return out


@functools.lru_cache(maxsize=2)
def _cached_data(dataset, path, n_train, n_val, n_test, data_seed):
    if dataset == "fashion_mnist":
        return images.multi_fashion_mnist(path, n_train, n_val, n_test, seed=data_seed)
    return images.multi_mnist(path, n_train, n_val, n_test, seed=data_seed)


def multi_mnist_trial(config, seed):
    """One run of :func:`train_and_test` as a :class:`dselectk.sweep.Sweep` trial. ``config`` holds
    ``model`` (one of MODELS), optionally ``dataset`` ("fashion_mnist", the default, or "mnist"),
    ``path``, ``n_train`` / ``n_val`` / ``n_test`` and ``data_seed`` (the data set is built once per
    worker process), and any keyword of train_and_test / :func:`build_model` (lr, epochs,
    early_stopping_patience, k, gamma, expert_layers, ...). Returns flat metrics: ``val_error``
    (1 - the mean validation accuracy of the two tasks, the paper's tuning metric turned into a loss),
    ``val_acc1/2``, ``test_acc1/2``, ``experts`` (selected, mean over the tasks; NaN for the shared
    bottom), ``binary`` (1 when every task's S(Z) became binary, or for gates without S(Z)),
    ``binary_pct`` (percentage of the training steps until then, mean over the tasks; NaN where it
    never did), ``expert_flops``, ``expert_flops_dense``, ``epochs``, ``epoch_seconds``, ``seconds``."""
    config = dict(config)
    data = _cached_data(config.pop("dataset", "fashion_mnist"), config.pop("path", None),
                        int(config.pop("n_train", 100_000)), int(config.pop("n_val", 20_000)),
                        int(config.pop("n_test", 20_000)), int(config.pop("data_seed", 0)))
    name = config.pop("model")
    out = train_and_test(data, name, seed=seed, **config)
    steps = out["binary_step"]
    dselect = name in ("dselect_k", "comet")  # the smooth-step gates, which become binary
    binary = all(s is not None for s in steps) if dselect else True
    nan = float("nan")
    return {
        "val_error": 1.0 - float(np.mean(out["val_accuracy"])),
        "val_acc1": out["val_accuracy"][0], "val_acc2": out["val_accuracy"][1],
        "test_acc1": out["test_accuracy"][0], "test_acc2": out["test_accuracy"][1],
        "experts": nan if out["selected_experts"] is None else float(np.mean(out["selected_experts"])),
        "binary": float(binary),
        "binary_pct": 100 * float(np.mean(steps)) / out["total_steps"] if dselect and binary else nan,
        "expert_flops": float(out["expert_flops"] or 0), "expert_flops_dense": float(out["expert_flops_dense"] or 0),
        "epochs": out["epochs"], "epoch_seconds": out["epoch_seconds"], "seconds": out["seconds"],
    }
