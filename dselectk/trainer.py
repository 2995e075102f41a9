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

from . import metrics as M
from .embedding import num_rows, take_rows
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
    * ``permutations``: local search (dselectk.local_search): one dict per permutation module
      that hardened, {"name", "step" (the training step it hardened at), "permutation" (K, n)
      int64 slot -> expert}.
    """

    def __init__(self, n_tasks):
        self.epochs = []
        self.gate_steps, self._gate_weights, self._selected = [], [], []
        self.binary_step = [None] * n_tasks
        self.total_steps = 0
        self.best_epoch = None
        self.permutations = []

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


# --- input checks ---------------------------------------------------------------------------

def _check_X(model, X, name="X"):
    """X as the model reads it: a C-contiguous (N, *model.input_shape) array of the model's dtype
    ((N, p) for MLP models, (N, C, H, W) for CNN ones), or for a model with an embedding input the
    normalized dict of dselectk.embedding.check_inputs."""
    if getattr(model, "input_layer", None) is not None:
        return model.input_layer.check(X, name)
    if not isinstance(X, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(X).__name__}")
    shape = tuple(getattr(model, "input_shape", None) or (model.input_dim,))
    if X.ndim != 1 + len(shape) or X.shape[1:] != shape:
        want = f"(N, {', '.join(str(d) for d in shape)})"
        hint = ""
        if len(shape) > 1 and X.ndim == 2 and X.shape[1] == model.input_dim:
            hint = f"; it looks flattened: reshape it with {name}.reshape(-1, {', '.join(str(d) for d in shape)})"
        elif len(shape) == 3:
            hint = " (NCHW images: channels, height, width)"
        raise ValueError(f"{name} must have shape {want}, got {X.shape}{hint}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=model.dtype)
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains NaN or Inf (first at row {int(np.argwhere(~np.isfinite(X))[0, 0])})")
    return X


def _check_Y(model, Y, N, name="Y"):
    if isinstance(Y, np.ndarray) and model.n_tasks == 1:
        Y = [Y]
    if not isinstance(Y, (list, tuple)):
        raise TypeError(f"{name} must be a list with one array per task ({model.n_tasks}), got {type(Y).__name__}")
    if len(Y) != model.n_tasks:
        raise ValueError(f"{name} has {len(Y)} tasks, the model has {model.n_tasks}")
    out = []
    for t, (y, loss, dim) in enumerate(zip(Y, model.task_losses, model.task_outputs)):
        y = np.asarray(y)
        if y.ndim == 0:
            raise ValueError(f"{name}[{t}] must be an array with one row per example of X ({N}), got a scalar")
        if y.shape[0] != N:
            raise ValueError(f"{name}[{t}] has {y.shape[0]} rows, X has {N}")
        if loss == "softmax_ce":
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"{name}[{t}] (softmax_ce) must be integer class labels of shape (N,), got "
                                 f"{y.dtype} {y.shape}")
            bad = np.flatnonzero((y < 0) | (y >= dim))
            if bad.size:
                raise ValueError(f"{name}[{t}] has label {y[bad[0]]} at row {bad[0]}; expected 0 <= label < {dim}")
            out.append(y.astype(np.int64))
            continue
        want = (N,) if dim == 1 else (N, dim)
        if y.shape != want and not (dim == 1 and y.shape == (N, 1)):
            raise ValueError(f"{name}[{t}] ({loss}) must have shape {want}, got {y.shape}")
        y = np.ascontiguousarray(y.reshape(N, dim), dtype=model.dtype)
        if not np.all(np.isfinite(y)):
            raise ValueError(f"{name}[{t}] contains NaN or Inf")
        if loss == "bce" and np.any((y < 0) | (y > 1)):
            raise ValueError(f"{name}[{t}] (bce) must hold targets in [0, 1]")
        out.append(y)
    return out


def _check_weights(model, sample_weights, N):
    if sample_weights is None:
        return None
    if not isinstance(sample_weights, (list, tuple)) or len(sample_weights) != model.n_tasks:
        raise ValueError(f"sample_weights must be a list with one entry (None or an (N,) array) per task "
                         f"({model.n_tasks})")
    out = []
    for t, w in enumerate(sample_weights):
        if w is None:
            out.append(None)
            continue
        w = np.ascontiguousarray(w, dtype=model.dtype)
        if w.shape != (N,) or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"sample_weights[{t}] must be finite, >= 0 and of shape ({N},)")
        out.append(w)
    return out


def _take(arrays, idx):
    return None if arrays is None else [None if a is None else a[idx] for a in arrays]


def _take_X(X, idx):
    """Rows idx of a checked X: an array, or the dict of an embedding input."""
    return take_rows(X, idx)


# --- evaluation -----------------------------------------------------------------------------

def predict(model, X, batch_size=1024, raw=False):
    """Predictions per task for X: probabilities for bce / softmax_ce tasks, values for mse tasks
    (``raw=True``: the logits). Runs in evaluation mode (no dropout, no gate noise)."""
    X = _check_X(model, X)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    chunks = [[] for _ in range(model.n_tasks)]
    for start in range(0, num_rows(X), batch_size):
        outs = model.forward(_take_X(X, slice(start, start + batch_size)), training=False)
        outs = outs if raw else model.transform_outputs(outs)
        for t, o in enumerate(outs):
            chunks[t].append(o)
    return [np.concatenate(c) for c in chunks]


def evaluate(model, X, Y, batch_size=1024, sample_weights=None, metrics=None):
    """{'loss': weighted sum of the task losses (no regularizers), 'task{t}_loss', and the metrics
    per task ('task0_auc', ...)}. ``metrics``: None for DEFAULT_METRICS by loss, or a list per task
    of metric names (see dselectk.metrics)."""
    X = _check_X(model, X)
    N = num_rows(X)
    Y = _check_Y(model, Y, N)
    W = _check_weights(model, sample_weights, N)
    sums = np.zeros(model.n_tasks)
    raw = [[] for _ in range(model.n_tasks)]
    for start in range(0, N, batch_size):
        sl = slice(start, start + batch_size)
        outs = model.forward(_take_X(X, sl), training=False)
        _, per_task, _ = model.loss(outs, [y[sl] for y in Y], _take(W, sl))
        B = min(batch_size, N - start)
        sums += np.array(per_task) * B  # losses are batch means
        for t, o in enumerate(outs):
            raw[t].append(o)
    task_losses = sums / N
    result = {"loss": float(np.dot(model.task_weights, task_losses))}
    preds = model.transform_outputs([np.concatenate(r) for r in raw])
    for t in range(model.n_tasks):
        result[f"task{t}_loss"] = float(task_losses[t])
        names = DEFAULT_METRICS[model.task_losses[t]] if metrics is None else metrics[t]
        y, p = Y[t], preds[t]
        if model.task_losses[t] != "softmax_ce":
            y = y.reshape(-1) if y.shape[1] == 1 else y
        for name in names:
            keep = slice(None) if W is None or W[t] is None else W[t] > 0
            try:
                result[f"task{t}_{name}"] = float(M.get_metric(name)(y[keep], p[keep]))
            except ValueError as exc:  # e.g. AUC on a batch with one class
                result[f"task{t}_{name}"] = float("nan")
                result.setdefault("warnings", []).append(f"task{t}_{name}: {exc}")
    return result


# --- training -------------------------------------------------------------------------------

def _where(epoch, b, steps_per_epoch, step):
    """Where training is, for error messages (b and step count the steps already finished)."""
    return f"epoch {epoch}, step {b + 1} of {steps_per_epoch} (global step {step + 1})"


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


def _local_search_step(model, history, step):
    for name, perm in model.local_search_step(step):
        history.permutations.append({"name": name, "step": step, "permutation": perm})


def fit(model, X, Y, *, epochs=10, batch_size=128, optimizer="adam", lr=None, optimizer_kwargs=None, shuffle=True,
        seed=0, validation_data=None, early_stopping_patience=None, restore_best_weights=True, sample_weights=None,
        metrics=None, record_gate_every=0, callbacks=(), verbose=1, out=None):
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
    X = _check_X(model, X)
    N = num_rows(X)
    Y = _check_Y(model, Y, N)
    W = _check_weights(model, sample_weights, N)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if early_stopping_patience is not None and (not isinstance(early_stopping_patience, int) or early_stopping_patience < 1):
        raise ValueError(f"early_stopping_patience must be None or a positive int, got {early_stopping_patience!r}")
    if early_stopping_patience is not None and validation_data is None:
        raise ValueError("early stopping needs validation_data")
    val = None
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise ValueError("validation_data must be (X_val, Y_val) or (X_val, Y_val, sample_weights_val)")
        Xv = _check_X(model, validation_data[0], "X_val")
        Yv = _check_Y(model, validation_data[1], num_rows(Xv), "Y_val")
        Wv = _check_weights(model, validation_data[2] if len(validation_data) == 3 else None, num_rows(Xv))
        val = (Xv, Yv, Wv)
    kwargs = dict(optimizer_kwargs or {})
    if lr is not None:
        kwargs["lr"] = lr
    opt = make_optimizer(optimizer, model.slab.data, model.slab.grad, **kwargs)
    tables = model.embedding_tables() if hasattr(model, "embedding_tables") else []
    sparse_opt = make_sparse_optimizer(optimizer, tables, **kwargs) if tables else None
    emit = out or (lambda line: print(line, file=sys.stderr, flush=True))

    rng = np.random.default_rng(seed)
    steps_per_epoch = (N + batch_size - 1) // batch_size
    history = History(model.n_tasks)
    if getattr(model, "permutations", ()):
        model.local_search_begin(steps_per_epoch)
    for cb in callbacks:
        if hasattr(cb, "on_train_begin"):
            cb.on_train_begin(model, epochs * steps_per_epoch)
    best_loss, best_params, best_tables, bad_epochs, step = np.inf, None, None, 0, 0
    if hasattr(model, "reset_flops"):
        model.reset_flops()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(N) if shuffle else np.arange(N)
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            if getattr(model, "permutations", ()):
                _local_search_step(model, history, step)
            try:
                model.zero_grad()
                outputs = model.forward(_take_X(X, idx), training=True)
                total, _, douts = model.loss(outputs, [y[idx] for y in Y], _take(W, idx))
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
            loss_sum += total * len(idx)
            _update_binary_steps(model, history, step)
            if record_gate_every and step % record_gate_every == 0:
                _record_gates(model, history, step)
            for cb in callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(step, model)
            if verbose >= 2 and (b + 1) % max(1, steps_per_epoch // 10) == 0:
                emit(f"  epoch {epoch} step {b + 1}/{steps_per_epoch} loss {total:.5f}")
        if not record_gate_every:
            _record_gates(model, history, step)
        logs = {"epoch": epoch, "loss": loss_sum / N}
        if hasattr(model, "flops"):  # cumulative since the start of fit
            logs["expert_flops"] = model.flops["experts_executed"]
            logs["expert_flops_dense"] = model.flops["experts_dense"]
        if val is not None:
            for key, value in evaluate(model, *val[:2], sample_weights=val[2], metrics=metrics).items():
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
