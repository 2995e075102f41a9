"""Callbacks for ``dselectk.fit``, in the Keras style.

Subclass :class:`Callback` and override any of its hooks; ``fit`` sets ``self.model`` and
``self.params`` (epochs, steps per epoch or None, verbose) before training::

    class PrintGateWeights(dk.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            print(epoch, logs["val_loss"], self.model.gate_weights())

    dk.fit(model, X, Y, callbacks=[PrintGateWeights(), dk.callbacks.EarlyStopping(patience=3)])

Epochs are counted from 1 (as in the progress lines and ``History.best_epoch``; Keras counts from
0). ``logs`` at an epoch's end holds the epoch's training ``loss`` (weighted task losses, without
the gates' regularizers), ``reg_loss`` (the regularizers), ``<task>_loss``, the validation
entries ``val_loss``, ``val_<task>_<metric>``, ``lr`` and ``time``; at a batch's end ``loss``,
``reg_loss``, ``size`` and ``step`` (the global step, counted from 1). A callback stops training
by setting ``self.model.stop_training = True``. ``fit`` also keeps ``model.train_state`` (the
epoch and step counters) and ``model.history`` up to date for callbacks to read.

Provided: :class:`EarlyStopping`, :class:`ModelCheckpoint`, :class:`LearningRateScheduler`,
:class:`ReduceLROnPlateau`, :class:`AnnealTemperature` (the Appendix C.2 ablation gate's
annealed temperature) and :class:`ProgressBar` (what ``verbose`` turns on).

Callbacks with state that a resumed run needs (EarlyStopping's best value and patience count,
ReduceLROnPlateau's, ModelCheckpoint's best) keep it in ``state_dict()`` / ``load_state_dict``:
``dk.save`` writes it and ``fit(..., resume_from=path)`` gives it back, to callbacks of the same
class in the same order.

The earlier protocol -- plain objects with ``on_train_begin(model, total_steps)``,
``on_step_end(step, model)``, ``on_epoch_end(epoch, logs, model)`` returning True to stop -- still
works (:func:`prepare` wraps such objects). A callback whose hooks cannot be called this way (a
Keras callback, hooks fit never calls such as ``on_train_batch_end``, other signatures) is a
TypeError before training, saying what fit calls.
"""
from __future__ import annotations

import inspect
import math
import sys
import time

import numpy as np

from .inputs import warn_user

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "LearningRateScheduler", "ReduceLROnPlateau",
           "AnnealTemperature", "ProgressBar", "get_lr", "set_lr"]

HOOKS = {"on_train_begin": ("logs",), "on_train_end": ("logs",), "on_epoch_begin": ("epoch", "logs"),
         "on_epoch_end": ("epoch", "logs"), "on_batch_begin": ("batch", "logs"), "on_batch_end": ("batch", "logs")}
_STEP_PROTOCOL = {"on_train_begin": 2, "on_step_end": 2, "on_epoch_end": 3}
_KERAS_ONLY = {"on_train_batch_begin": "on_batch_begin", "on_train_batch_end": "on_batch_end",
               "on_test_begin": None, "on_test_end": None, "on_test_batch_begin": None, "on_test_batch_end": None,
               "on_predict_begin": None, "on_predict_end": None, "on_predict_batch_begin": None,
               "on_predict_batch_end": None}


class Callback:
    """Base class of fit's callbacks: every hook does nothing; override those you need.

    ``self.model``: the model being trained; ``self.params``: {"epochs", "steps" (per epoch, None
    when a generator's length is unknown), "verbose"}."""

    model = None
    params: dict = {}
    runs_last = False  # ModelCheckpoint: after the others of the epoch, so that it saves their decisions
    # In a data-parallel fit (dselectk.distributed) every rank runs the callbacks, on the same
    # reduced logs and identical parameters, except those with root_only: rank 0 alone runs them
    # (ModelCheckpoint, the progress bar: what writes files or prints). self.params["rank"] and
    # ["ranks"] say where a callback runs.
    root_only = False

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_begin(self, logs=None):
        """Before the first epoch."""

    def on_train_end(self, logs=None):
        """After the last epoch (also after an early stop)."""

    def on_epoch_begin(self, epoch, logs=None):
        """Before epoch ``epoch`` (from 1)."""

    def on_epoch_end(self, epoch, logs=None):
        """After epoch ``epoch`` and its validation; ``logs`` as in the module docstring."""

    def on_batch_begin(self, batch, logs=None):
        """Before batch ``batch`` (from 0 in each epoch)."""

    def on_batch_end(self, batch, logs=None):
        """After the optimizer step of batch ``batch``."""

    def state_dict(self):
        """What a resumed run needs of this callback: a dict of JSON-able values and NumPy arrays."""
        return {}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned."""


# --- learning rate ------------------------------------------------------------------------------

def get_lr(model):
    """The learning rate of the model's optimizer (None before its first fit)."""
    opt = getattr(model, "optimizer", None)
    return None if opt is None else opt.lr


def set_lr(model, lr):
    """Set the learning rate of the model's dense and (embedding tables) sparse optimizer."""
    for opt in (getattr(model, "optimizer", None), getattr(model, "sparse_optimizer", None)):
        if opt is not None:
            opt.lr = lr


# --- monitoring a logged value -------------------------------------------------------------------

def _mode(monitor, mode):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "max" if monitor.endswith(("auc", "accuracy", "r2")) else "min"
    return mode


class _Monitor:
    """The best value of ``logs[monitor]`` so far, improvements by more than ``min_delta``."""

    def __init__(self, monitor, mode, min_delta):
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be the name of a logged value (e.g. 'val_loss'), got {monitor!r}")
        self.monitor, self.mode = monitor, _mode(monitor, mode)
        self.min_delta = abs(float(min_delta))
        self.best = math.inf if self.mode == "min" else -math.inf

    def value(self, logs, who):
        if self.monitor not in (logs or {}):
            raise ValueError(f"{who} monitors {self.monitor!r}, which is not in the logs; they have "
                           f"{sorted(k for k in logs if k != 'epoch')} (validation entries need validation_data)")
        return float(logs[self.monitor])

    def improved(self, value):
        if math.isnan(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


def _note(callback, line):
    """A callback's own message (its ``verbose``), to stderr, from rank 0 only in a data-parallel fit."""
    if callback.params.get("rank", 0) == 0:
        print(line, file=sys.stderr)


def _weights(model):
    return [model.slab.data.copy()] + [t.copy() for t in model.embedding_tables()]


def _put_weights(model, weights):
    model.slab.data[...] = weights[0]
    for t, w in zip(model.embedding_tables(), weights[1:]):
        t[...] = w


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs
    (``patience=0``: at the first epoch without improvement), as keras.callbacks.EarlyStopping.

    mode : "min", "max" or "auto" (max for names ending in auc, accuracy, r2; else min).
    restore_best_weights : at the end of training, put back the parameters (and embedding
        tables) of the best epoch (``History.best_epoch``). If a DSelect-k gate's S(Z) became
        binary only after that epoch, the restored gate is not sparse: a warning says so.
    baseline : stop if the monitored value does not beat it within ``patience`` epochs.
    ``fit(early_stopping_patience=p)`` is EarlyStopping(patience=p, restore_best_weights=fit's
    ``restore_best_weights``) on val_loss."""

    def __init__(self, monitor="val_loss", mode="auto", min_delta=0.0, patience=0, restore_best_weights=False,
                 baseline=None, verbose=1):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        self.tracker = _Monitor(monitor, mode, min_delta)
        self.monitor, self.patience, self.restore_best_weights = monitor, patience, bool(restore_best_weights)
        self.baseline, self.verbose = baseline, verbose
        self._reset()

    def _reset(self):
        self.tracker.best = self.tracker.best if self.baseline is None else float(self.baseline)
        self.wait, self.best_epoch, self.best_step, self.best_weights, self.stopped_epoch = 0, None, None, None, None

    def on_train_begin(self, logs=None):
        self.tracker = _Monitor(self.monitor, self.tracker.mode, self.tracker.min_delta)
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        value = self.tracker.value(logs, "EarlyStopping")
        if self.tracker.improved(value):
            self.tracker.best, self.wait, self.best_epoch = value, 0, epoch
            self.best_step = self.model.train_state.step
            if self.restore_best_weights:
                self.best_weights = _weights(self.model)
            return
        self.wait += 1
        if self.wait >= max(self.patience, 1):
            self.stopped_epoch = epoch
            self.model.stop_training = True
            self._say(f"early stopping after epoch {epoch}: no better {self.monitor} for {self.wait} epochs")

    def on_train_end(self, logs=None):
        if self.best_epoch is not None:
            self.model.history.best_epoch = self.best_epoch
        if self.restore_best_weights and self.best_weights is not None:
            self.restore()

    def restore(self):
        """Put the best epoch's weights back (``fit`` also calls this when training diverges)."""
        _put_weights(self.model, self.best_weights)
        self.model.history.best_epoch = self.best_epoch
        self._say(f"restored the weights of epoch {self.best_epoch} ({self.monitor} {self.tracker.best:.5f})")
        late = [t for t, s in enumerate(self.model.history.binary_step) if s is not None and s > self.best_step]
        if late:
            names = getattr(self.model, "task_names", None) or [f"task{t}" for t in range(self.model.n_tasks)]
            warn_user(f"EarlyStopping restored the weights of epoch {self.best_epoch} (step {self.best_step}), from "
                      f"before S(Z) became binary for {', '.join(names[t] for t in late)} (at step "
                      f"{', '.join(str(self.model.history.binary_step[t]) for t in late)}): the restored gate is not "
                      "sparse; consider restore_best_weights=False or a larger patience")

    def _say(self, line):
        if self.verbose and self.params.get("verbose"):
            self.params.get("emit", printer())(line)

    def state_dict(self):
        state = dict(best=self.tracker.best, wait=self.wait, best_epoch=self.best_epoch, best_step=self.best_step)
        if self.best_weights is not None:
            state.update({f"weights{i}": w for i, w in enumerate(self.best_weights)})
        return state

    def load_state_dict(self, state):
        self.tracker.best, self.wait = float(state["best"]), int(state["wait"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        n = len([k for k in state if k.startswith("weights")])
        weights = [np.array(state[f"weights{i}"]) for i in range(n)] or None
        if weights is not None:
            mine = _weights(self.model)
            if [(w.shape, w.dtype) for w in weights] != [(w.shape, w.dtype) for w in mine] or \
                    not all(np.all(np.isfinite(w)) for w in weights):
                raise ValueError("the saved best weights do not fit the model (shapes, dtypes) or are not finite")
        self.best_weights = weights


class LearningRateScheduler(Callback):
    """Before each epoch, ``lr = schedule(epoch, lr)`` (epoch from 1) on the model's optimizer
    (the embedding tables' too)."""

    def __init__(self, schedule, verbose=0):
        if not callable(schedule):
            raise TypeError(f"schedule must be a function (epoch, lr) -> lr, got {type(schedule).__name__}")
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        lr = self.schedule(epoch, get_lr(self.model))
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"the schedule returned lr = {lr!r} for epoch {epoch}; expected a finite number > 0")
        set_lr(self.model, float(lr))
        if self.verbose:
            _note(self, f"epoch {epoch}: learning rate {float(lr):.6g}")


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` epochs, then wait ``cooldown`` epochs; never below ``min_lr``
    (keras.callbacks.ReduceLROnPlateau)."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, mode="auto", min_delta=1e-4, cooldown=0,
                 min_lr=0.0, verbose=0):
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        self.tracker = _Monitor(monitor, mode, min_delta)
        self.factor, self.patience, self.cooldown, self.min_lr = float(factor), int(patience), int(cooldown), min_lr
        self.verbose, self.wait, self.cooldown_left = verbose, 0, 0

    def on_train_begin(self, logs=None):
        self.wait, self.cooldown_left = 0, 0
        self.tracker.best = math.inf if self.tracker.mode == "min" else -math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = self.tracker.value(logs, "ReduceLROnPlateau")
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if self.tracker.improved(value):
            self.tracker.best, self.wait = value, 0
        elif self.cooldown_left == 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = get_lr(self.model)
                new = max(old * self.factor, self.min_lr)
                if new < old:
                    set_lr(self.model, new)
                    if self.verbose:
                        _note(self, f"epoch {epoch}: ReduceLROnPlateau lr {old:.6g} -> {new:.6g}")
                self.cooldown_left, self.wait = self.cooldown, 0

    def state_dict(self):
        return dict(best=self.tracker.best, wait=self.wait, cooldown_left=self.cooldown_left)

    def load_state_dict(self, state):
        self.tracker.best, self.wait, self.cooldown_left = float(state["best"]), int(state["wait"]), \
            int(state["cooldown_left"])


class ModelCheckpoint(Callback):
    """Save the model with :func:`dselectk.save` (parameters, optimizer, counters, RNG states,
    History: what ``fit(resume_from=path)`` needs) after every ``every``-th epoch, or with
    ``save_best_only`` only when ``monitor`` improved. Writes are atomic (a temporary file in the
    same directory, fsync, rename): a kill mid-save leaves the previous file intact.

    filepath : may hold ``{epoch}`` and logged values, formatted as str.format
        (``"ckpt-{epoch:03d}-{val_loss:.3f}.npz"``); written exactly as named.
    Runs after the other callbacks of the epoch, so the saved EarlyStopping / ReduceLROnPlateau
    state includes that epoch. In a data-parallel fit only rank 0 saves (``root_only``)."""

    runs_last = True
    root_only = True

    def __init__(self, filepath, monitor="val_loss", mode="auto", save_best_only=False, every=1, min_delta=0.0,
                 include_optimizer=True, verbose=0):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (save every that many epochs), got {every!r}")
        self.filepath, self.save_best_only, self.every = str(filepath), bool(save_best_only), every
        self.tracker = _Monitor(monitor, mode, min_delta)
        self.include_optimizer, self.verbose = include_optimizer, verbose
        self.saved = []  # the paths written, in order

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every:
            return
        if self.save_best_only:
            value = self.tracker.value(logs, "ModelCheckpoint")
            if not self.tracker.improved(value):
                return
            self.tracker.best = value
        from .models import save

        path = self.filepath.format(epoch=epoch, **{k: v for k, v in (logs or {}).items() if k != "epoch"})
        save(self.model, path, include_optimizer=self.include_optimizer)
        self.saved.append(path)
        if self.verbose:
            print(f"epoch {epoch}: saved {path}", file=sys.stderr)

    def state_dict(self):
        return dict(best=self.tracker.best) if self.save_best_only else {}

    def load_state_dict(self, state):
        self.tracker.best = float(state["best"])


class AnnealTemperature(Callback):
    """For the Appendix C.2 ablation gate: the softmax temperature goes from ``start`` to ``end``
    evenly on a log scale over the whole training run (the paper anneals to 1e-16); it is set
    from the global step, so a resumed run continues the schedule."""

    def __init__(self, start, end=1e-16):
        self.start, self.end = float(start), float(end)

    def on_train_begin(self, logs=None):
        if self.params.get("total_steps") is None:
            raise ValueError("AnnealTemperature needs the number of training steps: with a generator, pass "
                             "steps_per_epoch")
        self.total_steps = self.params["total_steps"]
        self._set(self.model.train_state.step)

    def on_batch_end(self, batch, logs=None):
        self._set(logs["step"])

    def _set(self, step):
        from .gates import SoftmaxSelectorGate

        T = SoftmaxSelectorGate.annealed_temperature(step, self.total_steps, self.start, self.end)
        for g in self.model.gates:
            if isinstance(g, SoftmaxSelectorGate):
                g.set_temperature(T)


# --- progress -----------------------------------------------------------------------------------

def _format_logs(logs):
    skip = ("epoch", "loss", "time", "expert_flops", "expert_flops_dense", "lr")
    return "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k not in skip and isinstance(v, (int, float)))


def printer(out=None):
    """``out`` (a callable taking a line), or a print to stderr."""
    return out or (lambda line: print(line, file=sys.stderr, flush=True))


def _in_notebook():
    return "ipykernel" in sys.modules


class ProgressBar(Callback):
    """What ``verbose`` shows, as Keras: 1, a progress bar with ETA per epoch (tqdm when installed,
    its notebook widget in Jupyter; else a plain line rewritten in place on a terminal or in a
    notebook) ending in the epoch's summary; 2, the summary line only. With ``out`` (a callable
    taking a line), the summary lines go there and no bar is drawn. Rank 0 only."""

    root_only = True

    def __init__(self, verbose=1, out=None, stream=None):
        self.verbose, self.out, self.stream = verbose, out, stream
        self._tqdm, self._plain = None, False

    def _stream(self):
        return self.stream or sys.stderr

    def _emit(self, line):
        printer(self.out or (lambda s: print(s, file=self._stream(), flush=True)))(line)

    def _live(self):
        """A bar is drawn with verbose 1, no ``out``, and a terminal or notebook to draw it in."""
        stream = self._stream()
        return self.verbose == 1 and self.out is None and (_in_notebook() or getattr(stream, "isatty", lambda: False)())

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._t0, self._last_draw, self._done = epoch, time.perf_counter(), 0.0, 0
        self._tqdm, self._plain = None, False
        if not self._live():
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._plain = True
            return
        self._tqdm = tqdm(total=self.params.get("steps"), desc=f"epoch {epoch}/{self.params['epochs']}",
                          file=self._stream(), leave=True, dynamic_ncols=True)

    def on_batch_end(self, batch, logs=None):
        self._done = batch + 1
        if self._tqdm is not None:
            self._tqdm.update(1)
            self._tqdm.set_postfix_str(f"loss {logs['loss']:.4f}", refresh=False)
        elif self._plain:
            self._draw(logs)

    def _draw(self, logs):
        now = time.perf_counter()
        steps = self.params.get("steps")
        if now - self._last_draw < 0.1 and self._done != steps:
            return
        self._last_draw = now
        elapsed = now - self._t0
        if steps:
            eta, width = elapsed / self._done * (steps - self._done), 24
            filled = int(width * self._done / steps)
            bar = f"{self._done}/{steps} [{'=' * filled}{'.' * (width - filled)}] ETA {eta:.0f} s"
        else:
            bar = f"{self._done} steps, {elapsed:.0f} s"
        print(f"\repoch {self._epoch}/{self.params['epochs']}  {bar}  loss {logs['loss']:.4f}   ",
              end="", file=self._stream(), flush=True)

    def on_epoch_end(self, epoch, logs=None):
        line = (f"epoch {epoch}/{self.params['epochs']}  loss {logs['loss']:.5f}  {_format_logs(logs)}  "
                f"({logs['time']:.2f} s)")
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(line.split("  ", 1)[1], refresh=True)
            self._tqdm.close()
        elif self._plain:
            print("\r" + line, file=self._stream(), flush=True)
        elif self.verbose:
            self._emit(line)
        self._tqdm, self._plain = None, False


# --- preparing what fit was given -----------------------------------------------------------------

class _StepProtocol(Callback):
    """The earlier protocol: on_train_begin(model, total_steps), on_step_end(step, model),
    on_epoch_end(epoch, logs, model) -> True to stop."""

    def __init__(self, inner):
        self.inner = inner

    def on_train_begin(self, logs=None):
        if hasattr(self.inner, "on_train_begin"):
            self.inner.on_train_begin(self.model, self.params.get("total_steps"))

    def on_batch_end(self, batch, logs=None):
        if hasattr(self.inner, "on_step_end"):
            self.inner.on_step_end(logs["step"], self.model)

    def on_epoch_end(self, epoch, logs=None):
        if hasattr(self.inner, "on_epoch_end") and self.inner.on_epoch_end(epoch, logs, self.model):
            self.model.stop_training = True


def _binds(fn, n):
    try:
        inspect.signature(fn).bind(*range(n))
        return True
    except (TypeError, ValueError):
        return False


_WHAT_FIT_CALLS = ("fit calls dselectk.callbacks.Callback hooks: " +
                   ", ".join(f"{h}({', '.join(a)})" for h, a in HOOKS.items()) +
                   " (the model is self.model); or the step protocol on_train_begin(model, total_steps), "
                   "on_step_end(step, model), on_epoch_end(epoch, logs, model)")


def prepare(callbacks):
    """fit's callbacks as a list of Callback instances (objects of the step protocol wrapped), in
    the order given except that those with ``runs_last`` (ModelCheckpoint) go last. TypeError,
    before any training, for what fit could not call."""
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list, got {type(callbacks).__name__}")
    out = []
    for cb in callbacks:
        who = type(cb).__name__
        if any(c.__module__.split(".")[0] in ("keras", "tensorflow", "tf_keras") for c in type(cb).__mro__):
            raise TypeError(f"{who} is a Keras callback; {_WHAT_FIT_CALLS}. dselectk.callbacks has EarlyStopping, "
                            "ModelCheckpoint, LearningRateScheduler and ReduceLROnPlateau")
        keras_only = [name for name in _KERAS_ONLY if callable(getattr(cb, name, None))]
        if keras_only:
            use = {n: _KERAS_ONLY[n] for n in keras_only}
            raise TypeError(f"{who} defines {keras_only}, which fit never calls (use instead: "
                            f"{ {k: v for k, v in use.items()} }); {_WHAT_FIT_CALLS}")
        if isinstance(cb, Callback):
            for hook, args in HOOKS.items():
                if not _binds(getattr(cb, hook), len(args)):
                    raise TypeError(f"{who}.{hook}{inspect.signature(getattr(cb, hook))} cannot be called as "
                                    f"{hook}({', '.join(args)}); {_WHAT_FIT_CALLS}")
            out.append(cb)
            continue
        hooks = {h: getattr(cb, h) for h in set(_STEP_PROTOCOL) | set(HOOKS) if callable(getattr(cb, h, None))}
        if not hooks:
            raise TypeError(f"{who} has no callback hooks; {_WHAT_FIT_CALLS}")
        if all(h in _STEP_PROTOCOL and _binds(fn, _STEP_PROTOCOL[h]) for h, fn in hooks.items()):
            out.append(_StepProtocol(cb))
            continue
        raise TypeError(f"{who} is neither a dselectk.callbacks.Callback nor of the step protocol (its hooks: "
                        f"{', '.join(f'{h}{inspect.signature(fn)}' for h, fn in sorted(hooks.items()))}); "
                        f"{_WHAT_FIT_CALLS}")
    return [cb for cb in out if not cb.runs_last] + [cb for cb in out if cb.runs_last]


class CallbackList:
    """Calls each hook of every callback in order (on a rank other than 0 of a data-parallel fit,
    of every callback but those with ``root_only``)."""

    def __init__(self, callbacks, model, params, rank=0):
        self.callbacks = [cb for cb in callbacks if rank == 0 or not cb.root_only]
        for cb in callbacks:
            cb.set_model(model)
            cb.set_params(params)

    def __getattr__(self, hook):
        if hook not in HOOKS:
            raise AttributeError(hook)

        def call(*args):
            for cb in self.callbacks:
                getattr(cb, hook)(*args)
        return call
