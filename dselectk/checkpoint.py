"""Checkpoints: what ``dk.save`` stores beyond the parameters so that ``fit(resume_from=path)``
continues a run exactly, the atomic write, and the finite-parameter checks of save / predict.

A saved training state (``meta["training"]`` and arrays named ``train_*`` in the model's .npz;
readers that do not know them load the model without it):

* the optimizer (``model.optimizer``: name, hyperparameters, step count, state slabs) and the lazy
  optimizer of the embedding tables (its state per table);
* ``model.train_state``: the epoch and step counters, the shuffling generator's state, the fit
  settings of the run (epochs, batch_size, shuffle, seed);
* the random state inside the model: every dropout layer's step counter (its masks hash (seed,
  step, index)) and every NumPy Generator a layer or gate draws from (the noisy Top-k gate's);
* the expert FLOP counters, ``model.history`` and ``model.input_columns``;
* the callbacks' ``state_dict()`` (EarlyStopping's best value, patience count and best weights,
  ReduceLROnPlateau's, ModelCheckpoint's best), by class, in order.

The file is untrusted input like the rest of it: every field is checked, and what does not fit
the model is a ValueError naming it.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from . import functional as F

__all__ = ["atomic_savez", "training_state", "restore_training", "resume", "load_callback_states",
           "check_finite_parameters", "SPARSE_STATE"]

# the lazy optimizers' scalars and per-table state lists (dselectk.optim.SparseAdam / SparseAdagrad)
SPARSE_STATE = {"adam": (("lr", "beta1", "beta2", "eps", "step_count"), ("m", "v")),
                "adagrad": (("lr", "eps", "initial_accumulator_value"), ("accum",))}


# --- writing --------------------------------------------------------------------------------------

def atomic_savez(path, arrays):
    """np.savez ``arrays`` to exactly ``path`` (no extension added), atomically: written to a
    temporary file in the same directory, flushed and fsynced, then renamed over ``path``. A crash
    or kill at any moment leaves either the old file or the new one, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # the rename itself, durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def check_finite_parameters(model, what, tables=True):
    """ValueError naming the first parameter (or embedding table) holding NaN or Inf."""
    try:
        F.check_finite(model.slab.data, "params")
    except ValueError:
        for name, value in model.parameters().items():
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{what}: the model's parameter {name!r} holds NaN or Inf (training diverged?); "
                                 "load a checkpoint or train again with a lower learning rate") from None
    if tables:
        for name, t in model.named_embeddings().items():
            if not np.all(np.isfinite(t)):
                raise ValueError(f"{what}: the model's embedding table {name!r} holds NaN or Inf")


# attributes that hold no random state of the model's own (and are set at other times)
_NOT_WALKED = {"optimizer", "sparse_optimizer", "history", "train_state", "slab", "_cache", "_callbacks",
               "_saved_callback_states"}


def _random_state(model):
    """[(path, object)] of the dropout layers and NumPy Generators inside the model, in a fixed
    order (attribute order, depth first; a shared Generator once, at its first path)."""
    from .layers import Dropout

    found, seen = [], set()

    def walk(obj, path):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, np.random.Generator):
            found.append((path, obj))
        elif isinstance(obj, Dropout):
            found.append((path, obj))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(k, str):
                    walk(v, f"{path}[{k!r}]")
        elif type(obj).__module__.startswith("dselectk") and hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                if k not in _NOT_WALKED:
                    walk(v, f"{path}.{k}")

    walk(model, "model")
    return found


def _history_json(h):
    return dict(epochs=h.epochs, gate_steps=h.gate_steps, binary_step=h.binary_step, total_steps=h.total_steps,
                epoch_steps=h.epoch_steps, best_epoch=h.best_epoch)


def training_state(model, include_optimizer=True):
    """(meta, arrays) of the model's training state for dk.save; (None, {}) when it has none."""
    if model.train_state is None and model.optimizer is None:
        return None, {}
    meta, arrays = {}, {}
    if include_optimizer and model.optimizer is not None:
        state = model.optimizer.state_dict()
        meta["optimizer"] = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
        arrays.update({f"train_opt_{k}": v for k, v in state.items() if isinstance(v, np.ndarray)})
        sparse = model.sparse_optimizer
        if sparse is not None:
            scalars, lists = SPARSE_STATE[sparse.name]
            meta["sparse_optimizer"] = dict(name=sparse.name, **{k: getattr(sparse, k) for k in scalars})
            for k in lists:
                arrays.update({f"train_sparse_{k}_{j}": a for j, a in enumerate(getattr(sparse, k))})
    s = model.train_state
    if s is not None:
        meta["state"] = dict(epoch=s.epoch, step=s.step, rng=s.rng.bit_generator.state, settings=s.settings)
    meta["random"] = [[path, obj.bit_generator.state if isinstance(obj, np.random.Generator) else obj.step]
                      for path, obj in _random_state(model)]
    if hasattr(model, "flops"):
        meta["flops"] = dict(model.flops)
    if model.history is not None:
        meta["history"] = _history_json(model.history)
        arrays["train_gate_weights"] = model.history.gate_weights
        arrays["train_selected"] = model.history.selected_experts
    if model.input_columns is not None:
        meta["input_columns"] = list(model.input_columns)
    callbacks = getattr(model, "_callbacks", None) or []
    meta["callbacks"] = []
    for i, cb in enumerate(callbacks):
        state = cb.state_dict()
        if not state:
            continue
        meta["callbacks"].append([type(cb).__name__, {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}])
        arrays.update({f"train_cb{len(meta['callbacks']) - 1}_{k}": v for k, v in state.items()
                       if isinstance(v, np.ndarray)})
    return meta, arrays


# --- reading --------------------------------------------------------------------------------------

def _int(v, name, minimum=0):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _dict(v, name):
    if not isinstance(v, dict):
        raise ValueError(f"{name} must be an object, got {type(v).__name__}")
    return v


def restore_training(model, meta, arrays):
    """Put a training state read from a file (``meta["training"]``, the ``train_*`` arrays) onto a
    freshly built model. ValueError naming the field for anything that does not fit."""
    if meta is None:
        return
    from .optim import make_optimizer, make_sparse_optimizer
    from .trainer import History, TrainState

    meta = _dict(meta, "training")
    known = {"optimizer", "sparse_optimizer", "state", "random", "flops", "history", "input_columns", "callbacks"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise ValueError(f"training has unknown fields {unknown}")
    if "optimizer" in meta:
        opt_meta = _dict(meta["optimizer"], "training.optimizer")
        name = opt_meta.get("name")
        if not isinstance(name, str):
            raise ValueError("training.optimizer.name must be a string")
        opt = make_optimizer(name, model.slab.data, model.slab.grad)
        opt.load_state_dict({**opt_meta, **{k[len("train_opt_"):]: v for k, v in arrays.items()
                                            if k.startswith("train_opt_")}})
        model.optimizer = opt
        if "sparse_optimizer" in meta:
            sp_meta = _dict(meta["sparse_optimizer"], "training.sparse_optimizer")
            if sp_meta.get("name") not in SPARSE_STATE or not model.embedding_tables():
                raise ValueError("training.sparse_optimizer does not fit the model")
            sparse = make_sparse_optimizer(sp_meta["name"], model.embedding_tables())
            scalars, lists = SPARSE_STATE[sp_meta["name"]]
            for k in scalars:
                v = sp_meta.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                    raise ValueError(f"training.sparse_optimizer.{k} must be a finite number >= 0, got {v!r}")
                setattr(sparse, k, int(v) if k == "step_count" else float(v))
            for k in lists:
                for j, (dest, table) in enumerate(zip(getattr(sparse, k), model.embedding_tables())):
                    src = arrays.get(f"train_sparse_{k}_{j}")
                    if src is None or src.shape != table.shape or src.dtype.kind != "f" or not np.all(np.isfinite(src)):
                        raise ValueError(f"train_sparse_{k}_{j} must be a finite float array of the shape of table "
                                         f"{j}, {table.shape}")
                    dest[...] = src
            model.sparse_optimizer = sparse
    if "state" in meta:
        st = _dict(meta["state"], "training.state")
        settings = _dict(st.get("settings"), "training.state.settings")
        state = TrainState(0, settings, _int(st.get("epoch"), "training.state.epoch"),
                           _int(st.get("step"), "training.state.step"))
        state.rng.bit_generator.state = _dict(st.get("rng"), "training.state.rng")
        model.train_state = state
    _restore_random(model, meta.get("random", []))
    if "flops" in meta and hasattr(model, "flops"):
        flops = _dict(meta["flops"], "training.flops")
        model.flops = {k: _int(flops.get(k), f"training.flops.{k}") for k in model.flops}
    if "history" in meta:
        model.history = _history(model, _dict(meta["history"], "training.history"), arrays)
    if "input_columns" in meta:
        cols = meta["input_columns"]
        if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
            raise ValueError("training.input_columns must be a list of strings")
        model.input_columns = cols
    entries = meta.get("callbacks", [])
    if not isinstance(entries, list):
        raise ValueError("training.callbacks must be a list")
    model._saved_callback_states = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"training.callbacks[{i}] must be [class name, state]")
        state = dict(_dict(entry[1], f"training.callbacks[{i}]"))
        state.update({k[len(f"train_cb{i}_"):]: v for k, v in arrays.items() if k.startswith(f"train_cb{i}_")})
        model._saved_callback_states.append((entry[0], state))


def _restore_random(model, entries):
    if not isinstance(entries, list):
        raise ValueError("training.random must be a list")
    here = _random_state(model)
    if [p for p, _ in here] != [e[0] if isinstance(e, list) and e else None for e in entries]:
        raise ValueError("training.random does not list the dropout layers and generators of this model")
    for (path, obj), (_, value) in zip(here, entries):
        if isinstance(obj, np.random.Generator):
            obj.bit_generator.state = _dict(value, f"training.random {path}")
        else:
            obj.step = _int(value, f"training.random {path}")


def _history(model, h, arrays):
    from .trainer import History

    history = History(model.n_tasks)
    epochs = h.get("epochs", [])
    if not isinstance(epochs, list) or not all(isinstance(e, dict) and all(
            isinstance(k, str) and (v is None or isinstance(v, (int, float)) and not isinstance(v, bool))
            for k, v in e.items()) for e in epochs):
        raise ValueError("training.history.epochs must be a list of objects of numbers")
    history.epochs = epochs
    history.gate_steps = [_int(s, "training.history.gate_steps") for s in h.get("gate_steps", [])]
    binary = h.get("binary_step", [None] * model.n_tasks)
    if not isinstance(binary, list) or len(binary) != model.n_tasks:
        raise ValueError("training.history.binary_step must have one entry per task")
    history.binary_step = [None if s is None else _int(s, "training.history.binary_step") for s in binary]
    history.total_steps = _int(h.get("total_steps", 0), "training.history.total_steps")
    history.epoch_steps = [_int(s, "training.history.epoch_steps") for s in h.get("epoch_steps", [])]
    best = h.get("best_epoch")
    history.best_epoch = None if best is None else _int(best, "training.history.best_epoch", 1)
    weights, selected = arrays.get("train_gate_weights"), arrays.get("train_selected")
    if weights is not None and weights.size:
        if weights.ndim != 3 or weights.shape[0] != len(history.gate_steps):
            raise ValueError("train_gate_weights does not match training.history.gate_steps")
        history._gate_weights = list(weights)
    if selected is not None and selected.size:
        history._selected = [list(r) for r in selected]
    return history


# --- resuming a run -------------------------------------------------------------------------------

def resume(model, path, settings):
    """Load the checkpoint at ``path`` into ``model`` (same architecture) for fit(resume_from=...):
    parameters, tables, optimizer state, counters, random state, History, callback states."""
    import warnings

    from .models import load
    from .optim import make_optimizer, make_sparse_optimizer

    saved = load(path)
    if type(saved) is not type(model) or saved.config != model.config:
        raise ValueError(f"{path}: the checkpoint is of another model ({type(saved).__name__} {saved.config}); resume "
                         f"needs the architecture it was saved from")
    if saved.train_state is None or saved.optimizer is None:
        raise ValueError(f"{path}: the file holds no training state (saved outside fit, or with "
                         "include_optimizer=False); it cannot be resumed")
    state = saved.train_state
    if settings["epochs"] <= state.epoch:
        raise ValueError(f"{path} was saved after epoch {state.epoch}; epochs={settings['epochs']} leaves nothing to "
                         f"train (pass epochs > {state.epoch})")
    differ = {k: (state.settings.get(k), v) for k, v in settings.items() if k != "epochs" and state.settings.get(k) != v}
    if differ:
        warnings.warn(f"resuming {path} with other settings than the saved run ({differ}, saved first): the run "
                      "will not be the one it would have been", UserWarning, stacklevel=3)
    model.slab.data[...] = saved.slab.data
    for dest, src in zip(model.embedding_tables(), saved.embedding_tables()):
        dest[...] = src
    model.optimizer = make_optimizer(saved.optimizer.name, model.slab.data, model.slab.grad)
    model.optimizer.load_state_dict(saved.optimizer.state_dict())
    model.sparse_optimizer = None
    if saved.sparse_optimizer is not None:
        sparse = make_sparse_optimizer(saved.sparse_optimizer.name, model.embedding_tables())
        scalars, lists = SPARSE_STATE[sparse.name]
        for k in scalars:
            setattr(sparse, k, getattr(saved.sparse_optimizer, k))
        for k in lists:
            for dest, src in zip(getattr(sparse, k), getattr(saved.sparse_optimizer, k)):
                dest[...] = src
        model.sparse_optimizer = sparse
    for (_, mine), (_, theirs) in zip(_random_state(model), _random_state(saved)):
        if isinstance(mine, np.random.Generator):
            mine.bit_generator.state = theirs.bit_generator.state
        else:
            mine.step = theirs.step
    if hasattr(model, "flops"):
        model.flops = dict(saved.flops)
    state.settings = dict(settings)
    model.train_state, model.history, model.input_columns = state, saved.history, saved.input_columns
    model._saved_callback_states = saved._saved_callback_states


def load_callback_states(model, callbacks):
    """Give each callback of this fit the state saved for the callback of the same class at the
    same position among those of its class (called after on_train_begin)."""
    import warnings

    seen = {}
    for name, state in getattr(model, "_saved_callback_states", []):
        matches = [cb for cb in callbacks if type(cb).__name__ == name]
        i = seen.get(name, 0)
        seen[name] = i + 1
        if i < len(matches):
            try:
                matches[i].load_state_dict(state)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"the checkpoint's state for {name} does not fit it ({exc})") from exc
        else:
            warnings.warn(f"the checkpoint holds the state of a {name} callback, which this fit does not have",
                          UserWarning, stacklevel=3)
