"""Training without autograd: ``fit``, ``evaluate`` and ``predict`` for the models of dselectk.models.

One training step, top to bottom::

    model.zero_grad()
    outputs = model.forward(X_batch, training=True)
    total, per_task, d_outputs = model.loss(outputs, Y_batch)   # weighted task losses + gate regularizers
    model.backward(d_outputs)                                    # every gradient, into one slab
    optimizer.step()                                             # one C call for all parameters

Models with an embedding input (``embeddings=`` in dselectk.models) take X as a dict
{"ids": (N, F) integers, "dense": (N, n_dense) floats} (or the ids array alone when n_dense = 0),
checked up front (ids in range per table, dtypes, shapes) and batched row-wise. Their tables are
not in the slab: after the dense step, the lazy sparse step of the same optimizer
(dselectk.optim.SparseAdagrad / SparseAdam) updates only the rows the batch looked up.

Everything else here is bookkeeping: input checks before any training, shuffling with a seed,
validation and early stopping with best-weights restore, history, progress lines, callbacks, and
the gate diagnostics of the paper (expert weights per task over training, Figures C.5-C.7; the
number of selected experts; the step at which S(Z) became binary, Table C.4).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from . import inputs as I
from . import metrics as M
from .optim import make_optimizer, make_sparse_optimizer

__all__ = ["fit", "evaluate", "predict", "History", "AnnealTemperature", "DEFAULT_METRICS"]

DEFAULT_METRICS = {"bce": ("auc", "accuracy"), "softmax_ce": ("accuracy",), "mse": ("mse", "rmse")}


class History:
    """What ``fit`` recorded.

    * ``epochs``: one dict per epoch: loss (training, with regularizers), val_loss, per-task
      validation metrics (``val_task0_auc``, ...), time; for MMoE/MoE models also
      ``expert_flops`` and ``expert_flops_dense``, the expert FLOPs of the training steps so far,
      executed and for the dense model (their ratio is what conditional computation saved).
    * ``gate_steps`` and ``gate_weights``: the steps at which expert weights were recorded and the
      weights, an array (records, T, n) (per-example gates: averaged over the batch).
    * ``selected_experts``: (records, T), the number of experts with nonzero weight per task
      (per-example gates: averaged over the examples of the batch).
    * ``binary_step``: per task, the first training step after which the DSelect-k gate's S(Z) was
      binary (None: never, or not a DSelect-k gate); ``total_steps``.
    * ``best_epoch``: the epoch whose weights were restored by early stopping (or None).
    """

    def __init__(self, n_tasks):
        self.epochs = []
        self.gate_steps, self._gate_weights, self._selected = [], [], []
        self.binary_step = [None] * n_tasks
        self.total_steps = 0
        self.best_epoch = None

    @property
    def gate_weights(self):
        return np.array(self._gate_weights)

    @property
    def selected_experts(self):
        return np.array(self._selected)

    def __getitem__(self, key):
        """history["val_loss"] -> the per-epoch list of that entry."""
        return [e.get(key) for e in self.epochs]


class AnnealTemperature:
    """Callback for the Appendix C.2 ablation gate: the softmax temperature goes from ``start`` to
    ``end`` evenly on a log scale over the whole training run (the paper anneals to 1e-16)."""

    def __init__(self, start, end=1e-16):
        self.start, self.end = float(start), float(end)

    def on_train_begin(self, model, total_steps):
        self.total_steps = total_steps
        self.on_step_end(0, model)

    def on_step_end(self, step, model):
        from .gates import SoftmaxSelectorGate

        T = SoftmaxSelectorGate.annealed_temperature(step, self.total_steps, self.start, self.end)
        for g in model.gates:
            if isinstance(g, SoftmaxSelectorGate):
                g.set_temperature(T)


# --- evaluation -----------------------------------------------------------------------------

def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _resolve_metrics(model, metrics):
    """{task index: [(name, function)]} for ``metrics`` (None: DEFAULT_METRICS by loss; a list per
    task; a dict by task name), every name looked up now, so that a typo fails before any work."""
    names = I.task_names(model)
    if metrics is None:
        per_task = [DEFAULT_METRICS[loss] for loss in model.task_losses]
    elif isinstance(metrics, dict):
        unknown = sorted(set(metrics) - set(names))
        if unknown:
            raise ValueError(f"metrics names unknown tasks {unknown}; the tasks are {names}")
        per_task = [metrics.get(n, DEFAULT_METRICS[loss]) for n, loss in zip(names, model.task_losses)]
    elif isinstance(metrics, (list, tuple)) and len(metrics) == model.n_tasks:
        per_task = list(metrics)
    else:
        raise ValueError(f"metrics must be None, a list with one list of metric names per task ({model.n_tasks}) or a "
                         f"dict by task name, got {metrics!r}")
    resolved = []
    for t, task_metrics in enumerate(per_task):
        if isinstance(task_metrics, str) or not isinstance(task_metrics, (list, tuple)):
            raise TypeError(f"the metrics of task {names[t]!r} must be a list of names, got {task_metrics!r}")
        resolved.append([(M._metric_key(m), M.get_metric(m)) for m in task_metrics])
    return resolved


def _data(model, X, Y=None, sample_weights=None, name="X", batch_size=None, need_targets=True):
    """X (and Y, sample_weights) as checked data to batch: dselectk.inputs.ArrayData or BatchStream."""
    if isinstance(X, (I.ArrayData, I.BatchStream)):
        return X
    return I.make_data(model, X, Y, sample_weights, name, need_targets=need_targets)


def predict(model, X, batch_size=1024, raw=False):
    """Predictions per task for X: probabilities for bce / softmax_ce tasks, values for mse tasks
    (``raw=True``: the logits). X: an array, a DataFrame, or a batch source of X batches (see
    dselectk.inputs). Runs in evaluation mode (no dropout, no gate noise)."""
    _positive_int(batch_size, "batch_size")
    data = _data(model, X, name="X", need_targets=False)
    chunks = [[] for _ in range(model.n_tasks)]
    for batch in data.batches(batch_size):
        outs = model.forward(batch.X, training=False)
        outs = outs if raw else model.transform_outputs(outs)
        for t, o in enumerate(outs):
            chunks[t].append(o)
    return [np.concatenate(c) for c in chunks]


def evaluate(model, X, Y=None, batch_size=1024, sample_weights=None, metrics=None, _name="X"):
    """{'loss': the weighted sum of the task losses (no regularizers), '<task>_loss' per task, and
    the metrics per task ('task0_auc', or 'watch_auc' for a task named watch)}. ``metrics``: None
    for DEFAULT_METRICS by loss, a list per task of metric names (see dselectk.metrics) or a dict
    by task name; an unknown name raises ValueError. X, Y: arrays, DataFrames, dicts, or a batch
    source of (X, Y[, sample_weights]) batches with Y=None (see dselectk.inputs)."""
    _positive_int(batch_size, "batch_size")
    resolved = _resolve_metrics(model, metrics)
    data = _data(model, X, Y, sample_weights, _name)
    sums, N = np.zeros(model.n_tasks), 0
    raw, ys, ws = [[] for _ in range(model.n_tasks)], [[] for _ in range(model.n_tasks)], []
    for batch in data.batches(batch_size):
        outs = model.forward(batch.X, training=False)
        _, per_task, _ = model.loss(outs, batch.Y, batch.W)
        sums += np.array(per_task) * batch.size  # losses are batch means
        N += batch.size
        for t, o in enumerate(outs):
            raw[t].append(o)
            ys[t].append(batch.Y[t])
        ws.append(batch.W)
    task_losses = sums / N
    result = {"loss": float(np.dot(model.task_weights, task_losses))}
    preds = model.transform_outputs([np.concatenate(r) for r in raw])
    for t, task in enumerate(I.task_names(model)):
        result[f"{task}_loss"] = float(task_losses[t])
        y, p = np.concatenate(ys[t]), preds[t]
        if model.task_losses[t] != "softmax_ce":
            y = y.reshape(-1) if y.shape[1] == 1 else y
        keep = slice(None)
        if any(w is not None and w[t] is not None for w in ws):
            keep = np.concatenate([np.ones(len(b), bool) if w is None or w[t] is None else w[t] > 0
                                   for w, b in zip(ws, ys[t])])
        for key, fn in resolved[t]:
            try:
                result[f"{task}_{key}"] = float(fn(y[keep], p[keep]))
            except ValueError as exc:  # e.g. AUC on a batch with one class
                result[f"{task}_{key}"] = float("nan")
                result.setdefault("warnings", []).append(f"{task}_{key}: {exc}")
    return result


# --- training -------------------------------------------------------------------------------

def _where(epoch, b, steps_per_epoch, step):
    """Where training is, for error messages (b and step count the steps already finished)."""
    return f"epoch {epoch}, step {b + 1} of {steps_per_epoch or '?'} (global step {step + 1})"


def _record_gates(model, history, step):
    if not model.gates:
        return
    history.gate_steps.append(step)
    history._gate_weights.append(model.gate_weights())
    history._selected.append([g.num_selected() for g in model.gates])


def _update_binary_steps(model, history, step):
    for t, g in enumerate(model.gates):
        if history.binary_step[t] is None and hasattr(g, "is_binary") and g.is_binary():
            history.binary_step[t] = step


def fit(model, X, Y=None, *, epochs=10, batch_size=128, optimizer="adam", lr=None, optimizer_kwargs=None, shuffle=True,
        seed=0, validation_data=None, early_stopping_patience=None, restore_best_weights=True, sample_weights=None,
        metrics=None, record_gate_every=0, callbacks=(), verbose=1, out=None, steps_per_epoch=None):
    """Train ``model`` on X (N, p) -- (N, C, H, W) for CNN models, see ``model.input_shape`` -- and
    Y (a list with one (N,) / (N, d) array per task).

    optimizer : "adam" (default lr 1e-3), "adagrad" (1e-2) or "sgd" (1e-2); ``optimizer_kwargs``
        go to the optimizer class (dselectk.optim). A model with embedding tables needs "adam" or
        "adagrad": the tables take the lazy step of dselectk.optim.SparseAdam / SparseAdagrad with
        the same lr, eps, betas (weight_decay applies to the dense parameters only), the dense
        parameters the usual step; Adam's bias correction uses one global step count for both.
        ``freeze`` and ``frozen_mask`` cover the dense parameters only.
    validation_data : (X_val, Y_val) or (X_val, Y_val, sample_weights_val); evaluated after each
        epoch. early_stopping_patience : stop after that many epochs without a lower validation
        loss; with ``restore_best_weights`` the best epoch's parameters are put back.
    record_gate_every : record the expert weights per task every that many steps (0: once per
        epoch); the step S(Z) became binary is checked every step.
    callbacks : objects with any of on_train_begin(model, total_steps), on_step_end(step, model),
        on_epoch_end(epoch, logs, model) (returning True stops training).
    verbose : 0 silent, 1 one line per epoch, 2 also progress within each epoch. ``out``: a
        callable receiving each line (default: print to stderr).
    Raises ValueError / TypeError on bad input before any training, and FloatingPointError naming
    the epoch and step if the loss becomes NaN or Inf. Returns a :class:`History`.
    """
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        _positive_int(v, name)
    if early_stopping_patience is not None and (not isinstance(early_stopping_patience, int) or early_stopping_patience < 1):
        raise ValueError(f"early_stopping_patience must be None or a positive int, got {early_stopping_patience!r}")
    if early_stopping_patience is not None and validation_data is None:
        raise ValueError("early stopping needs validation_data")
    _resolve_metrics(model, metrics)
    train = I.make_data(model, X, Y, sample_weights, "X", steps_per_epoch)
    if train.columns is not None and getattr(model, "input_columns", None) is None:
        model.input_columns = train.columns  # later DataFrames are matched by these names
    val = None
    if validation_data is not None:
        if I.is_batch_source(validation_data):
            val = I.BatchStream(model, validation_data, "X_val")
        elif not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise ValueError("validation_data must be (X_val, Y_val), (X_val, Y_val, sample_weights_val) or a batch "
                             "source of (X, Y[, sample_weights]) batches")
        else:
            val = I.make_data(model, validation_data[0], validation_data[1],
                              validation_data[2] if len(validation_data) == 3 else None, "X_val")
    kwargs = dict(optimizer_kwargs or {})
    if lr is not None:
        kwargs["lr"] = lr
    opt = make_optimizer(optimizer, model.slab.data, model.slab.grad, **kwargs)
    tables = model.embedding_tables() if hasattr(model, "embedding_tables") else []
    sparse_opt = make_sparse_optimizer(optimizer, tables, **kwargs) if tables else None
    emit = out or (lambda line: print(line, file=sys.stderr, flush=True))

    rng = np.random.default_rng(seed)
    steps_per_epoch = train.steps(batch_size)
    history = History(model.n_tasks)
    for cb in callbacks:
        if hasattr(cb, "on_train_begin"):
            cb.on_train_begin(model, None if steps_per_epoch is None else epochs * steps_per_epoch)
    best_loss, best_params, best_tables, bad_epochs, step = np.inf, None, None, 0, 0
    if hasattr(model, "reset_flops"):
        model.reset_flops()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for b, batch in enumerate(train.batches(batch_size, rng if shuffle else None)):
            try:
                model.zero_grad()
                outputs = model.forward(batch.X, training=True)
                total, _, douts = model.loss(outputs, batch.Y, batch.W)
                if not np.isfinite(total):
                    raise FloatingPointError(f"the training loss became {total} at "
                                             f"{_where(epoch, b, steps_per_epoch, step)}; try a lower learning rate")
                model.backward(douts)
                if model.frozen_mask is not None:
                    model.slab.grad[model.frozen_mask] = 0
                    frozen_values = model.slab.data[model.frozen_mask]
                opt.step()
                if sparse_opt is not None:
                    sparse_opt.step(model.embedding_grads())
                if model.frozen_mask is not None:  # also against weight decay moving them
                    model.slab.data[model.frozen_mask] = frozen_values
            except ValueError as exc:  # the kernels reject NaN/Inf that training produced
                if "NaN or Inf" not in str(exc):
                    raise
                raise FloatingPointError(f"training diverged at {_where(epoch, b, steps_per_epoch, step)}: {exc}; "
                                         "try a lower learning rate") from exc
            step += 1
            loss_sum += total * batch.size
            seen += batch.size
            _update_binary_steps(model, history, step)
            if record_gate_every and step % record_gate_every == 0:
                _record_gates(model, history, step)
            for cb in callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(step, model)
            if verbose >= 2 and (b + 1) % max(1, (steps_per_epoch or 10) // 10) == 0:
                emit(f"  epoch {epoch} step {b + 1}/{steps_per_epoch or '?'} loss {total:.5f}")
        if not record_gate_every:
            _record_gates(model, history, step)
        logs = {"epoch": epoch, "loss": loss_sum / seen}
        if hasattr(model, "flops"):  # cumulative since the start of fit
            logs["expert_flops"] = model.flops["experts_executed"]
            logs["expert_flops_dense"] = model.flops["experts_dense"]
        if val is not None:
            for key, value in evaluate(model, val, metrics=metrics).items():
                if key != "warnings":
                    logs[f"val_{key}"] = value
        logs["time"] = time.perf_counter() - t0
        history.epochs.append(logs)
        if verbose >= 1:
            extra = "  ".join(f"{k} {v:.4f}" for k, v in logs.items()
                              if k not in ("epoch", "loss", "time", "expert_flops", "expert_flops_dense"))
            emit(f"epoch {epoch}/{epochs}  loss {logs['loss']:.5f}  {extra}  ({logs['time']:.2f} s)")
        stop = any(bool(cb.on_epoch_end(epoch, logs, model)) for cb in callbacks if hasattr(cb, "on_epoch_end"))
        if val is not None and early_stopping_patience is not None:
            if logs["val_loss"] < best_loss:
                best_loss, best_params, bad_epochs, history.best_epoch = logs["val_loss"], model.slab.data.copy(), 0, epoch
                best_tables = [t.copy() for t in tables]
            else:
                bad_epochs += 1
                if bad_epochs >= early_stopping_patience:
                    if verbose >= 1:
                        emit(f"early stopping after epoch {epoch}: no better val_loss for {bad_epochs} epochs")
                    stop = True
        if stop:
            break
    if best_params is not None and restore_best_weights:
        model.slab.data[...] = best_params
        for t, best in zip(tables, best_tables):
            t[...] = best
        if verbose >= 1:
            emit(f"restored the weights of epoch {history.best_epoch} (val_loss {best_loss:.5f})")
    history.total_steps = step
    return history
