"""Training without autograd: ``fit``, ``evaluate`` and ``predict`` for the models of dselectk.models.

One training step (:func:`train_step`), top to bottom::

    model.zero_grad()
    outputs = model.forward(X_batch, training=True)
    total, per_task, d_outputs = model.loss(outputs, Y_batch)   # weighted task losses + gate regularizers
    model.backward(d_outputs)                                    # every gradient, into one slab
    # <- here the batch's gradients are complete (model.slab.grad, model.embedding_grads())
    model.optimizer.step()                                       # one C call for all parameters

Models with an embedding input keep their tables outside the slab: after the dense step, the lazy
sparse step of the same optimizer (``model.sparse_optimizer``, dselectk.optim.SparseAdagrad /
SparseAdam) updates only the rows the batch looked up. What X and Y may be (arrays, DataFrames,
named tasks, batch sources, memory maps) is dselectk.inputs' business.

``fit`` reads top to bottom: check the arguments and the data, set up (or continue) the
optimizer, then per epoch :func:`train_epoch` (the steps, with the callbacks' batch hooks) and
:func:`validate` (the metrics), the History, the callbacks' epoch hooks. Everything else is
bookkeeping: shuffling with a seed, early stopping with best-weights restore, progress, the
restore of the last finite weights when training diverges, and the gate diagnostics of the paper
(expert weights per task over training, Figures C.5-C.7; the number of selected experts; the
step at which S(Z) became binary, Table C.4).
"""
from __future__ import annotations

import json
import time

import numpy as np

from . import callbacks as C
from . import inputs as I
from . import metrics as M
from .callbacks import AnnealTemperature
from .checkpoint import check_finite_parameters
from .distributed import LOCAL, make_sync
from .optim import make_optimizer, make_sparse_optimizer

__all__ = ["fit", "evaluate", "predict", "train_step", "train_epoch", "validate", "History", "TrainState",
           "AnnealTemperature", "DEFAULT_METRICS"]

DEFAULT_METRICS = {"bce": ("auc", "accuracy"), "softmax_ce": ("accuracy",), "mse": ("mse", "rmse")}


class History:
    """What ``fit`` recorded (also ``model.history`` after fit).

    * ``epochs``: one dict per epoch: ``loss`` (the training loss: weighted task losses, without
      the gates' regularizers), ``reg_loss`` (the regularizers), ``<task>_loss``, ``val_loss`` and
      the validation metrics per task (``val_task0_auc``, or ``val_watch_auc`` for a named task),
      ``lr``, ``time``; for MMoE/MoE models also ``expert_flops`` and ``expert_flops_dense``, the
      expert FLOPs of the training steps so far, executed and for the dense model (their ratio is
      what conditional computation saved); in a data-parallel fit (``comm=``) also ``comm_time``,
      the seconds rank 0 spent in the steps' gradient sums (waiting for slower ranks included).
    * ``history``: the same as {key: [value per epoch]}, as Keras' History.history;
      ``history["val_loss"]`` (indexing the object) gives one list.
    * ``gate_steps`` and ``gate_weights``: the steps at which expert weights were recorded and the
      weights, an array (records, T, n) (per-example gates: averaged over the batch).
    * ``selected_experts``: (records, T), the number of experts with nonzero weight per task
      (per-example gates: averaged over the examples of the batch).
    * ``binary_step``: per task, the first training step after which the DSelect-k gate's S(Z) was
      binary (None: never, or not a DSelect-k gate); ``total_steps``; ``epoch_steps``, the global
      step at the end of each epoch.
    * ``best_epoch``: the epoch whose weights early stopping tracked as best (or None).
    """

    def __init__(self, n_tasks):
        self.epochs = []
        self.gate_steps, self._gate_weights, self._selected = [], [], []
        self.binary_step = [None] * n_tasks
        self.total_steps = 0
        self.epoch_steps = []
        self.best_epoch = None

    @property
    def gate_weights(self):
        return np.array(self._gate_weights)

    @property
    def selected_experts(self):
        return np.array(self._selected)

    @property
    def history(self):
        """{key: [value per epoch]} (None where an epoch lacks the key), as keras History.history."""
        keys = list(dict.fromkeys(k for e in self.epochs for k in e))
        return {k: self[k] for k in keys}

    def __getitem__(self, key):
        """history["val_loss"] -> the per-epoch list of that entry."""
        return [e.get(key) for e in self.epochs]

    def __len__(self):
        return len(self.epochs)

    def __repr__(self):
        if not self.epochs:
            return "History(no epochs)"
        last = self.epochs[-1]
        shown = "  ".join(f"{k} {last[k]:.4g}" for k in ("loss", "reg_loss", "val_loss") if k in last)
        best = "" if self.best_epoch is None else f", best_epoch={self.best_epoch}"
        keys = [k for k in last if k != "epoch"]
        return (f"History({len(self.epochs)} epochs, {self.total_steps} steps{best}; last: {shown}; "
                f"keys: {', '.join(keys)})")


class TrainState:
    """Where a training run is (``model.train_state``): ``epoch`` and ``step``, the epochs and
    global steps finished; ``rng``, the shuffling generator; ``settings``, the arguments of fit a
    resumed run must repeat to continue the same run. ``dk.save`` stores it with the model."""

    def __init__(self, seed, settings, epoch=0, step=0):
        self.epoch, self.step = epoch, step
        self.rng = np.random.default_rng(seed)
        self.settings = dict(settings)

    def __repr__(self):
        return f"TrainState(epoch={self.epoch}, step={self.step}, settings={self.settings})"


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


def _data(model, X, Y=None, sample_weights=None, name="X", need_targets=True):
    """X (and Y, sample_weights) as checked data to batch: dselectk.inputs.ArrayData or BatchStream."""
    if isinstance(X, (I.ArrayData, I.BatchStream)):
        return X
    return I.make_data(model, X, Y, sample_weights, name, need_targets=need_targets)


def _check_rows_used(model, X):
    """The embedding rows a batch looks up are finite (the only table entries a prediction reads;
    scanning whole tables per call would cost more than a small prediction)."""
    for j, table in enumerate(model.embedding_tables()):
        rows = table[X["ids"][:, j]]
        if not np.all(np.isfinite(rows)):
            raise ValueError(f"predict: the model's embedding table {j} holds NaN or Inf in rows this batch reads "
                             "(training diverged?)")


def predict(model, X, batch_size=1024, raw=False):
    """Predictions per task for X: probabilities for bce / softmax_ce tasks, values for mse tasks
    (``raw=True``: the logits). X: an array, a DataFrame, or a batch source of X batches (see
    dselectk.inputs). Runs in evaluation mode (no dropout, no gate noise). Refuses (ValueError)
    a model whose parameters hold NaN or Inf."""
    _positive_int(batch_size, "batch_size")
    data = _data(model, X, name="X", need_targets=False)
    check_finite_parameters(model, "predict", tables=False)
    chunks = [[] for _ in range(model.n_tasks)]
    for batch in data.batches(batch_size):
        _check_rows_used(model, batch.X)
        outs = model.forward(batch.X, training=False)
        outs = outs if raw else model.transform_outputs(outs)
        for t, o in enumerate(outs):
            chunks[t].append(o)
    return [np.concatenate(c) for c in chunks]


def evaluate(model, X, Y=None, batch_size=1024, sample_weights=None, metrics=None, comm=None, shard="rows"):
    """{'loss': the weighted sum of the task losses (no regularizers), '<task>_loss' per task, and
    the metrics per task ('task0_auc', or 'watch_auc' for a task named watch)}. ``metrics``: None
    for DEFAULT_METRICS by loss, a list per task of metric names (see dselectk.metrics) or a dict
    by task name; an unknown name raises ValueError. X, Y: arrays, DataFrames, dicts, or a batch
    source of (X, Y[, sample_weights]) batches with Y=None (see dselectk.inputs).

    ``comm`` (an mpi4py communicator, see dselectk.distributed): every rank evaluates its rows
    (``shard="rows"``: a block of the common X; ``"given"``: its own X), and the result is that of
    all the rows together -- the exact AUC of all of them -- on every rank."""
    sync = make_sync(comm, shard)
    with sync.all_ranks("evaluate"):
        _positive_int(batch_size, "batch_size")
        resolved = _resolve_metrics(model, metrics)
        data = _data(model, X, Y, sample_weights)
        check_finite_parameters(model, "evaluate", tables=False)
    return _evaluate(model, data, batch_size, resolved, sync)


def _evaluate(model, data, batch_size, resolved, sync):
    with sync.all_ranks("evaluate"):
        part = _evaluation_part(model, sync.eval_batches(data, batch_size))
    return sync.combine_evaluation(part, lambda p: _evaluation(model, p, resolved))


def _evaluation_part(model, batches):
    """What the evaluation needs of some rows: the losses' sums, their number, the raw outputs,
    targets and sample weights by batch."""
    sums, N = np.zeros(model.n_tasks), 0
    raw, ys, ws = [[] for _ in range(model.n_tasks)], [[] for _ in range(model.n_tasks)], []
    for batch in batches:
        outs = model.forward(batch.X, training=False)
        _, per_task, _ = model.loss(outs, batch.Y, batch.W)
        sums += np.array(per_task) * batch.size  # losses are batch means
        N += batch.size
        for t, o in enumerate(outs):
            raw[t].append(o)
            ys[t].append(batch.Y[t])
        ws.append(batch.W)
    return dict(sums=sums, N=N, raw=raw, ys=ys, ws=ws)


def _evaluation(model, part, resolved):
    task_losses = part["sums"] / part["N"]
    raw, ys, ws = part["raw"], part["ys"], part["ws"]
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


def _record_gates(model, history, step, sync):
    if not model.gates:
        return
    weights, selected = model.gate_weights(), [g.num_selected() for g in model.gates]
    if any(g.per_example for g in model.gates):  # means over the batch: over the global batch
        weights, selected = sync.batch_mean(weights, selected)
    history.gate_steps.append(step)
    history._gate_weights.append(weights)
    history._selected.append(list(selected))


def _update_binary_steps(history, binary, step):
    for t, is_binary in enumerate(binary):
        if history.binary_step[t] is None and is_binary:
            history.binary_step[t] = step


def _optimizer_step(model):
    """The dense step of the slab and the lazy step of the embedding tables; frozen parameters
    keep their values (also against weight decay)."""
    frozen = model.frozen_mask
    if frozen is not None:
        model.slab.grad[frozen] = 0
        frozen_values = model.slab.data[frozen]
    model.optimizer.step()
    if model.sparse_optimizer is not None:
        model.sparse_optimizer.step(model.embedding_grads())
    if frozen is not None:
        model.slab.data[frozen] = frozen_values


class _Diverges:
    """Turns the kernels' rejection of NaN/Inf that training produced into FloatingPointError."""

    def __init__(self, where):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, ValueError) and "NaN or Inf" in str(exc):
            raise FloatingPointError(f"training diverged at {self.where}: {exc}; try a lower learning rate") from exc
        return False


def _local_gradients(model, batch, where):
    """forward, loss, backward on ``batch``: (total loss, per-task losses), the gradients in
    model.slab.grad and model.embedding_grads()."""
    with _Diverges(where):
        model.zero_grad()
        outputs = model.forward(batch.X, training=True)
        total, per_task, douts = model.loss(outputs, batch.Y, batch.W)
        if not np.isfinite(total):
            raise FloatingPointError(f"the training loss became {total} at {where}; try a lower learning rate")
        model.backward(douts)
        return total, per_task


def train_step(model, batch, where, sync=LOCAL):
    """One step on ``batch`` (a dselectk.inputs.Batch): forward, loss, backward, optimizer step.
    Returns (loss, reg_loss, per-task losses): the weighted task losses and the regularizers
    apart. FloatingPointError (naming ``where``) if the loss or a gradient is NaN or Inf.

    ``sync`` (dselectk.distributed; fit passes it): in a data-parallel fit the batch is this
    rank's share, and the gradients are summed across the ranks before the step."""
    with sync.global_rows(batch, model):  # dropout masks and gate noise by the rows' place in the global batch
        local = sync.local(_local_gradients, model, batch, where)  # data-parallel: an error is held, not raised
    total, per_task = sync.sum_gradients(model, batch, local)  # ... and raised here on every rank
    # The batch's gradients are complete here (model.slab.grad, model.embedding_grads()), summed
    # over the ranks in a data-parallel fit: every rank takes the same step.
    with _Diverges(where):
        _optimizer_step(model)
    data = 0.0
    for w, value in zip(model.task_weights, per_task):  # as model.loss sums them, so reg is exact
        data += w * value
    return data, total - data, per_task


def train_epoch(model, data, epoch, callbacks, batch_size, shuffle, record_gate_every, sync=LOCAL):
    """The steps of one epoch over ``data``; returns the epoch's logs: loss, reg_loss and the
    per-task losses, means over its examples (in a data-parallel fit: over all ranks' rows)."""
    state, history, names = model.train_state, model.history, I.task_names(model)
    steps = sync.steps(data, batch_size)
    sums, seen = np.zeros(2 + model.n_tasks), 0
    for b, batch in enumerate(sync.batches(data, batch_size, state.rng if shuffle else None)):
        rows = batch.rows_in_step
        sync.call(callbacks.on_batch_begin, b, {"size": rows})
        loss, reg, per_task = train_step(model, batch, _where(epoch, b, steps, state.step), sync)
        state.step += 1
        sums += np.array([loss, reg, *per_task]) * rows
        seen += rows
        _update_binary_steps(history, sync.binary(model), state.step)
        if record_gate_every and state.step % record_gate_every == 0:
            _record_gates(model, history, state.step, sync)
        sync.call(callbacks.on_batch_end, b, {"loss": loss, "reg_loss": reg, "size": rows, "step": state.step})
        sync.check_parameters(model, state.step)
        if sync.stop_after_batch(model.stop_training):
            model.stop_training = True
            break
    if not record_gate_every:
        _record_gates(model, history, state.step, sync)
    means = sums / max(seen, 1)
    logs = {"epoch": epoch, "loss": float(means[0]), "reg_loss": float(means[1])}
    logs.update({f"{task}_loss": float(v) for task, v in zip(names, means[2:])})
    return logs


def validate(model, val, metrics, sync=LOCAL):
    """{'val_loss', 'val_<task>_loss', 'val_<task>_<metric>'} on the validation data."""
    result = _evaluate(model, val, 1024, _resolve_metrics(model, metrics), sync)
    return {f"val_{k}": v for k, v in result.items() if k != "warnings"}


def _setup_optimizer(model, optimizer, lr, optimizer_kwargs):
    """model.optimizer (and model.sparse_optimizer for the tables): the model's own from an
    earlier fit, continued (its state kept; ``lr`` applied), unless ``optimizer`` names another one
    or ``optimizer_kwargs`` change a hyperparameter: then a new one, with a warning that the state
    starts over."""
    kwargs = dict(optimizer_kwargs or {})
    if lr is not None:
        kwargs["lr"] = lr
    old = model.optimizer
    name = optimizer if optimizer is not None else (old.name if old is not None else "adam")
    if not isinstance(name, str):
        raise TypeError(f"optimizer must be a name ('adam', 'adagrad' or 'sgd'), got {type(name).__name__}")
    if old is not None and old.params is model.slab.data and old.name == name.lower() and _same_settings(old, kwargs):
        if lr is not None:
            C.set_lr(model, lr)
        return
    tables = model.embedding_tables()
    sparse = make_sparse_optimizer(name, tables, **kwargs) if tables else None  # refuses sgd before any change
    dense = make_optimizer(name, model.slab.data, model.slab.grad, **kwargs)
    if old is not None:
        I.warn_user(f"fit: a new {dense!r} replaces the model's {old!r} (another optimizer or other settings); its "
                    "state (moments, step count) starts over. Without optimizer= and optimizer_kwargs=, fit continues "
                    "the model's optimizer")
    model.optimizer, model.sparse_optimizer = dense, sparse


def _same_settings(opt, kwargs):
    for k, v in kwargs.items():
        if k == "lr":
            continue
        if k == "betas":
            if tuple(map(float, v)) != (opt.beta1, opt.beta2):
                return False
        elif not hasattr(opt, k) or getattr(opt, k) != v:
            return False
    return True


class _Snapshot:
    """The parameters at an epoch's start: what fit restores when the epoch diverges."""

    def __init__(self, model, epoch):
        self.epoch, self.weights = epoch, C._weights(model)

    def restore(self, model):
        C._put_weights(model, self.weights)


def _after_divergence(model, snapshot, callbacks, exc):
    """Put back the best weights early stopping tracked, else the last finite ones (the start of the
    epoch that diverged); the optimizer, whose moments diverged too, is dropped. Returns what was
    done, for the error message."""
    best = [cb for cb in callbacks if isinstance(cb, C.EarlyStopping) and cb.best_weights is not None]
    if best:
        best[0].restore()
        what = f"the model was restored to the best weights early stopping kept (epoch {best[0].best_epoch})"
    else:
        snapshot.restore(model)
        what = (f"the model was restored to its last finite weights, those at the start of epoch {snapshot.epoch}"
                + (" (before this fit)" if snapshot.epoch == 1 else ""))
    model.optimizer = model.sparse_optimizer = None
    return f"{exc}; {what}, and its optimizer state was dropped (the next fit starts a new one)"


def fit(model, X, Y=None, *, epochs=10, batch_size=128, optimizer=None, lr=None, optimizer_kwargs=None, shuffle=True,
        seed=0, validation_data=None, early_stopping_patience=None, restore_best_weights=True, sample_weights=None,
        metrics=None, record_gate_every=0, callbacks=(), verbose=1, out=None, steps_per_epoch=None, resume_from=None,
        comm=None, shard="rows", checksum_every=100):
    """Train ``model`` on X and Y (see dselectk.inputs for their forms: arrays (N, p) or (N, C, H,
    W), DataFrames, dicts by task name, memory maps, or a batch source with Y=None).

    optimizer : "adam" (default lr 1e-3), "adagrad" (1e-2) or "sgd" (1e-2); ``optimizer_kwargs``
        go to the optimizer class (dselectk.optim). After fit the model keeps it
        (``model.optimizer``; its tables' lazy step ``model.sparse_optimizer``), and a later fit
        continues it -- moments and step count -- unless ``optimizer`` / ``optimizer_kwargs`` ask
        for another one (then a warning says the state starts over; ``model.optimizer = None``
        starts over quietly). ``lr`` sets the learning rate. A model with embedding tables needs
        "adam" or "adagrad": the tables take the lazy step of SparseAdam / SparseAdagrad with the
        same lr, eps, betas (weight_decay applies to the dense parameters only); Adam's bias
        correction uses one global step count for both. ``freeze`` covers the dense parameters.
    validation_data : (X_val, Y_val), (X_val, Y_val, sample_weights_val) or a batch source;
        evaluated after each epoch. early_stopping_patience : shorthand for
        ``callbacks.EarlyStopping(monitor="val_loss", patience=p, restore_best_weights=
        restore_best_weights)``.
    metrics : per task (a list of lists, or a dict by task name) the validation metrics
        (dselectk.metrics names); default DEFAULT_METRICS by loss. Unknown names raise now.
    record_gate_every : record the expert weights per task every that many steps (0: once per
        epoch); the step S(Z) became binary is checked every step.
    callbacks : dselectk.callbacks.Callback instances (or objects of the earlier step protocol,
        see dselectk.callbacks).
    verbose : 0 silent; 1 (default) a progress bar with ETA per epoch (tqdm when installed) and
        the epoch's summary; 2 one summary line per epoch (as Keras). ``out``: a callable
        receiving the summary lines (then no bar).
    steps_per_epoch : for a generator X: the batches per epoch.
    resume_from : a file ``dk.save`` (or ModelCheckpoint) wrote during an earlier run of this fit:
        its parameters, optimizer, counters, RNG states, History and callback states are loaded
        into ``model`` and training continues with epochs e+1..epochs, as the uninterrupted run
        would have (bit for bit at the same thread count).

    comm : an mpi4py communicator (e.g. ``MPI.COMM_WORLD``; ``pip install 'dselectk[mpi]'``):
        synchronous data-parallel training, one process per rank, each computing its share of
        every global batch of ``batch_size`` rows; the ranks' gradients are summed before each
        step, so the parameters stay identical and the result does not depend on the number of
        ranks. ``shard="rows"``: every rank passes the same X, Y, and fit splits each batch's rows;
        ``"given"``: each rank passes its own shard. ``checksum_every``: the ranks compare their
        parameters every that many steps (and at the end). Only rank 0 prints and runs
        ModelCheckpoint. See dselectk.distributed for the semantics and the failure behaviour.

    Raises ValueError / TypeError on bad input before any training, and FloatingPointError naming
    the epoch and step if the loss becomes NaN or Inf; the model is then restored to its last
    finite weights (or the best ones early stopping kept), as the message says. Returns a
    :class:`History` (also ``model.history``).
    """
    sync = make_sync(comm, shard, checksum_every)
    with sync.all_ranks("fit's setup"):  # data-parallel: an error on any rank stops every rank here
        for name, v in (("epochs", epochs), ("batch_size", batch_size)):
            _positive_int(v, name)
        if early_stopping_patience is not None and (isinstance(early_stopping_patience, bool) or
                                                    not isinstance(early_stopping_patience, int) or
                                                    early_stopping_patience < 1):
            raise ValueError(f"early_stopping_patience must be None or a positive int, got {early_stopping_patience!r}")
        if early_stopping_patience is not None and validation_data is None:
            raise ValueError("early stopping needs validation_data")
        if verbose not in (0, 1, 2, "auto"):
            raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")
        verbose = (1 if verbose == "auto" else verbose) if sync.is_root else 0  # only rank 0 prints
        _resolve_metrics(model, metrics)
        given = list(C.prepare(callbacks))
        if early_stopping_patience is not None:
            given.append(C.EarlyStopping(patience=early_stopping_patience, restore_best_weights=restore_best_weights))
        cbs = C.prepare(given + ([C.ProgressBar(verbose, out)] if verbose else []))

        train = I.make_data(model, X, Y, sample_weights, "X", steps_per_epoch)
        if train.columns is not None and model.input_columns is None:
            model.input_columns = train.columns  # later DataFrames are matched by these names
        val = _validation(model, validation_data)

        settings = dict(epochs=epochs, batch_size=batch_size, shuffle=bool(shuffle), seed=seed)
        if resume_from is not None:
            from .checkpoint import resume
            resume(model, resume_from, settings)  # parameters, optimizer, counters, RNGs, history
        else:
            model.train_state, model.history = TrainState(seed, settings), History(model.n_tasks)
        _setup_optimizer(model, optimizer, lr, optimizer_kwargs)
        if hasattr(model, "flops") and resume_from is None:
            model.reset_flops()
        model.stop_training, model._callbacks = False, cbs  # dk.save stores the callbacks' states
    signature = dict(model=_describe_model(model), settings=dict(settings, shard=shard, optimizer=model.optimizer.name,
                     optimizer_kwargs=repr(optimizer_kwargs), lr=model.optimizer.lr, metrics=repr(metrics),
                     record_gate_every=record_gate_every, early_stopping=early_stopping_patience,
                     checksum_every=checksum_every, resumed=resume_from is not None,
                     callbacks=[type(cb).__name__ for cb in cbs if not cb.root_only]))
    sync.start(model, train, val, signature)  # the same model, settings and data shapes; rank 0's parameters
    state, history = model.train_state, model.history
    steps = sync.steps(train, batch_size)
    params = dict(epochs=epochs, steps=steps, total_steps=None if steps is None else epochs * steps, verbose=verbose,
                  emit=C.printer(out), rank=sync.rank, ranks=sync.size)
    callback_list = C.CallbackList(cbs, model, params, rank=sync.rank)

    with sync.all_ranks("on_train_begin"):
        callback_list.on_train_begin()
        if resume_from is not None:
            from .checkpoint import load_callback_states
            load_callback_states(model, cbs)
    snapshot = None
    try:
        for epoch in range(state.epoch + 1, epochs + 1):
            snapshot = _Snapshot(model, epoch)
            with sync.all_ranks(f"on_epoch_begin of epoch {epoch}"):
                callback_list.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            logs = train_epoch(model, train, epoch, callback_list, batch_size, shuffle, record_gate_every, sync)
            if hasattr(model, "flops"):  # cumulative since the start of the run
                sync.sum_counters(model)
                logs["expert_flops"] = model.flops["experts_executed"]
                logs["expert_flops_dense"] = model.flops["experts_dense"]
            if val is not None:
                logs.update(validate(model, val, metrics, sync))
            logs["lr"] = model.optimizer.lr
            logs["time"] = sync.root_decides(time.perf_counter() - t0)
            logs.update(sync.epoch_logs())  # data-parallel: comm_time, the seconds in gradient sums
            history.epochs.append(logs)
            history.epoch_steps.append(state.step)
            history.total_steps = state.step
            state.epoch = epoch
            with sync.all_ranks(f"on_epoch_end of epoch {epoch}"):
                callback_list.on_epoch_end(epoch, logs)
            model.stop_training = sync.root_decides(model.stop_training)  # early stopping: rank 0 decides
            if model.stop_training:
                break
    except FloatingPointError as exc:
        raise FloatingPointError(_after_divergence(model, snapshot, cbs, exc)) from exc
    history.total_steps = state.step
    with sync.all_ranks("on_train_end"):
        callback_list.on_train_end()
    sync.check_parameters(model, state.step, final=True)
    return history


def _describe_model(model):
    """What the ranks of a data-parallel fit must agree on about the model."""
    frozen = None if model.frozen_mask is None else int(np.flatnonzero(model.frozen_mask).sum())
    return dict(cls=type(model).__name__, config=json.dumps(model.config, sort_keys=True, default=repr),
                slab=[len(model.slab), str(model.slab.data.dtype)], tables=[t.shape for t in model.embedding_tables()],
                frozen=frozen)


def _validation(model, validation_data):
    if validation_data is None:
        return None
    if I.is_batch_source(validation_data):
        return I.BatchStream(model, validation_data, "X_val")
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
        raise ValueError("validation_data must be (X_val, Y_val), (X_val, Y_val, sample_weights_val) or a batch "
                         "source of (X, Y[, sample_weights]) batches")
    return I.make_data(model, validation_data[0], validation_data[1],
                       validation_data[2] if len(validation_data) == 3 else None, "X_val")
