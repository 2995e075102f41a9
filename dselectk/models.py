"""Models: plain compositions of layers and gates, no autograd.

* :class:`MMoE`: the multi-gate Mixture of Experts of Figure 1(b): n shared experts, one gate per
  task choosing among them, one tower per task. The task losses are combined with user weights,
  e.g. the paper's alpha * L_1 + (1 - alpha) * L_2, plus every gate's regularizer.
* :class:`MoE`: one gate mixing n experts whose outputs are the prediction (Figure 1(a)).
* :class:`SharedBottom`: one shared Dense stack, then task towers (the paper's baseline).

The experts of MMoE and the bottom of SharedBottom are MLPs by default (X (N, p)), or with
``expert="cnn"`` / ``bottom="cnn"`` the CNN of the Multi-MNIST experiments
(:class:`~dselectk.layers.CNNExpert`) on images X (N, C, H, W) given by ``input_shape`` (NCHW).
Gates that read the input (per-example gates) and MLP experts see it flattened to
(N, C H W), a view.

Each model has ``forward(X, training) -> [output per task]``, ``loss(outputs, Y) ->
(total, per-task losses, output gradients)``, ``backward(output gradients)``, and keeps all
parameters and gradients in one :class:`~dselectk.layers.ParameterSlab` (``model.slab``).
``dselectk.save`` / ``dselectk.load`` store a model in one ``.npz``.

Embedding inputs: with ``embeddings=dict(vocab_sizes=[...], dims=[...], n_dense=0)`` (or an
:class:`~dselectk.embedding.EmbeddingInput`) MMoE, MoE and SharedBottom read X = {"ids": (N, F)
integers, "dense": (N, n_dense) floats} (or the ids array alone when n_dense = 0) through an
embedding front: the experts, the per-example gates (or the shared bottom) see the concatenated
row [embeddings | dense] of width sum(dims) + n_dense, and their input gradients flow back into the
tables as sparse gradients. The tables live outside the dense slab (``model.embedding_tables()``);
``trainer.fit`` updates them with lazy sparse steps (see dselectk.embedding).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence, Union

import numpy as np
from numpy.typing import DTypeLike

from . import _model_file
from . import checkpoint as _checkpoint
from . import functional as F
from ._memory import check_experts
from .embedding import EmbeddingInput, _split
from .gates import GateSpec, StaticDSelectKBank, spec_class
from .gates._base import resolve as _resolve_gate
from .inputs import check_task_names
from .layers import MLP, CNNExpert, ParameterSlab, ReLU, dropout_rate, subset_rows

__all__ = ["MMoE", "MoE", "SharedBottom", "save", "load", "LOSSES"]

# the types of the public constructors' arguments
GateArg = Union[GateSpec, dict, str]  # a spec, its config dict, or a kind string (with **gate_options)
Embeddings = Union[EmbeddingInput, dict, None]
Pair = Union[int, Sequence[int]]
TaskNames = Union[str, Sequence[str], None]
PathLike = Union[str, "os.PathLike[str]"]

LOSSES = ("mse", "bce", "softmax_ce")
ARCHITECTURES = ("mlp", "cnn")
FORMAT, FORMAT_VERSION = "dselectk-model", 4
# version 1: the parameter slab only; version 2 adds the embedding tables; version 3 writes a model's
# gate as its spec's config dict (config["gate"] = {"kind": ..., options}) where versions 1 and 2
# had the kind string with every gate's flat keys beside it (k, gamma, ...); version 4 adds the
# gates' buffers (non-trainable state such as hash routing's assignment: ``buffer_<gate>.<name>``
# arrays, listed in meta["buffers"]). A file gets the oldest version that holds it (a SharedBottom
# without embeddings is still version 1), so that older readers load what they can; load reads all.
READ_VERSIONS = (1, 2, 3, 4)
# the gate keys of a version 1 or 2 config, each read by the gates that have that option
_FLAT_GATE_KEYS = ("k", "gamma", "entropy_reg", "xi", "per_example", "noisy", "temperature")


def _loss_fn(name):
    return {"mse": F.mse, "bce": F.bce_with_logits, "softmax_ce": F.softmax_cross_entropy}[name]


def _per_task(value, n_tasks, name):
    if isinstance(value, (list, tuple)):
        if len(value) != n_tasks:
            raise ValueError(f"{name} has {len(value)} entries, expected one per task ({n_tasks})")
        return list(value)
    return [value] * n_tasks


def _input_spec(input_dim, input_shape, kind, what):
    """(input_dim, input_shape) from the constructor arguments: an MLP takes input_dim p (X (N, p))
    or any input_shape (X (N, *input_shape), flattened for it); a CNN needs input_shape (C, H, W),
    and input_dim, if given, must be C H W."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"{what} must be one of {ARCHITECTURES}, got {kind!r}")
    if input_shape is None:
        if kind == "cnn":
            raise ValueError(f"{what}='cnn' needs input_shape=(C, H, W), the shape of one image (X is (N, C, H, W))")
        p = F._int(input_dim, "input_dim", 1) if input_dim is not None else None
        if p is None:
            raise ValueError("input_dim (the number of features p of X (N, p)) or input_shape is required")
        return p, (p,)
    if isinstance(input_shape, (int, np.integer)) or not isinstance(input_shape, (tuple, list)) or not input_shape:
        raise TypeError(f"input_shape must be a tuple of ints, the shape of one example, got {input_shape!r}")
    shape = tuple(F._int(v, "input_shape entry", 1) for v in input_shape)
    if kind == "cnn" and len(shape) != 3:
        raise ValueError(f"{what}='cnn' needs input_shape=(C, H, W) (NCHW images), got {shape}")
    p = int(np.prod(shape))
    if input_dim is not None and F._int(input_dim, "input_dim", 1) != p:
        raise ValueError(f"input_dim {input_dim} does not match input_shape {shape} (prod = {p}); pass one of them")
    return p, shape


def _listed(v):
    """Tuples as lists, so that a config survives its JSON round trip unchanged."""
    return list(v) if isinstance(v, (tuple, list)) else v


def _widths(units, name):
    """Layer widths as a list of ints >= 1 (a zero-width layer would divide by zero in the
    initialiser or train a constant)."""
    if isinstance(units, (str, bytes, dict)) or not hasattr(units, "__iter__"):
        raise TypeError(f"{name} must be a tuple of layer widths, got {units!r}")
    widths = list(units)
    for u in widths:
        if isinstance(u, (bool, np.bool_)) or not isinstance(u, (int, np.integer)):
            raise TypeError(f"{name} must list integer layer widths, got {tuple(widths)!r}")
        if u < 1:
            raise ValueError(f"{name} must list layer widths >= 1, got {tuple(widths)!r}")
    return [int(u) for u in widths]


def _check_dropout(dropout, tower_dropout):
    """Rates in [0, 1), checked before any layer is built (ValueError / TypeError naming the argument)."""
    dropout_rate(dropout, "dropout")
    if tower_dropout is not None:
        dropout_rate(tower_dropout, "tower_dropout")


def _trusted_forward(forward):
    """Checks the model input for NaN/Inf once, then runs ``forward`` inside
    F.trusted_inputs(): the kernels skip re-scanning the intermediate activations (the loss and
    the optimizer, called outside, still check the outputs and the gradients)."""
    @functools.wraps(forward)
    def checked(self, X, training=False):
        if isinstance(X, dict):
            for name, value in X.items():
                if isinstance(value, np.ndarray):
                    F.check_finite(value, f"X[{name!r}]")
        elif isinstance(X, np.ndarray):
            if X.ndim == 0:
                raise ValueError("X must be a batch (B, ...) of examples, got a 0-d array")
            F.check_finite(X, "X")
        with F.trusted_inputs():
            return forward(self, X, training)
    return checked


def _trusted_backward(backward):
    """Runs ``backward`` inside F.trusted_inputs() (see _trusted_forward)."""
    @functools.wraps(backward)
    def unscanned(self, douts):
        with F.trusted_inputs():
            return backward(self, douts)
    return unscanned


def _sigmoid(z):
    """1 / (1 + exp(-z)) in z's dtype, without overflow: exp is taken of -|z| only, and for
    z < 0 the form e^z / (1 + e^z), which keeps its relative accuracy far into the tail."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _flat(X):
    """X (B, ...) as (B, p): a view of a C-contiguous batch."""
    return X if X.ndim == 2 else X.reshape(X.shape[0], -1)


class _Model:
    """Shared machinery: tasks, losses, the parameter slab, prediction transforms."""

    config: dict  # the constructor's arguments, JSON-able: what save writes and load rebuilds from
    gates: list  # one gate per task (none for SharedBottom)

    def _setup_tasks(self, n_tasks, task_losses, task_outputs, task_weights):
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
        self.n_tasks = n_tasks
        self.task_losses = _per_task(task_losses, n_tasks, "task_losses")
        for loss in self.task_losses:
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        self.task_outputs = [int(o) for o in _per_task(task_outputs, n_tasks, "task_outputs")]
        for loss, out in zip(self.task_losses, self.task_outputs):
            if out < 1 or (loss == "bce" and out != 1) or (loss == "softmax_ce" and out < 2):
                raise ValueError(f"task output size {out} does not fit loss {loss!r} (bce: 1, softmax_ce: the "
                                 "number of classes >= 2, mse: >= 1)")
        weights = [1.0] * n_tasks if task_weights is None else _per_task(task_weights, n_tasks, "task_weights")
        if any(not np.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"task_weights must be finite and >= 0, got {weights}")
        self.task_weights = [float(w) for w in weights]

    @property
    def task_names(self):
        """The tasks' names (``task_names=`` of the constructor; task0, task1, ... when unnamed):
        the keys of a dict Y and of the metrics (``val_watch_auc``)."""
        names = self.config.get("task_names")
        return list(names) if names else [f"task{t}" for t in range(self.n_tasks)]

    def _name_tasks(self, task_names):
        if task_names is not None:  # in the config only when given: older readers load the others
            self.config["task_names"] = check_task_names(task_names, self.n_tasks)

    frozen_mask = None  # boolean mask over the slab, see freeze()
    # what fit leaves on the model (dselectk.trainer): the optimizers it continues, the History and
    # counters of the last run, the DataFrame columns it read, and the callbacks' stop flag
    optimizer = sparse_optimizer = history = train_state = input_columns = None
    stop_training = False
    input_layer = None  # the EmbeddingInput front, or None: X goes straight to the experts

    def _setup_input(self, input_dim, embeddings, seed, dtype, input_shape=None, kind="mlp", what="expert"):
        """input_dim and input_shape (see _input_spec), and self.input_layer from ``embeddings``
        (None, a dict of EmbeddingInput's arguments or an EmbeddingInput); returns the embeddings'
        config for self.config."""
        if embeddings is None:
            self.input_layer = None
            self.input_dim, self.input_shape = _input_spec(input_dim, input_shape, kind, what)
            return None
        if kind != "mlp" or input_shape is not None:
            raise ValueError(f"embeddings feed feature rows to MLP {what}s; they do not combine with {what}={kind!r} "
                             f"or input_shape")
        if isinstance(embeddings, EmbeddingInput):
            if embeddings.dtype != np.dtype(dtype):
                raise ValueError(f"the EmbeddingInput has dtype {embeddings.dtype}, the model {np.dtype(dtype)}")
            front = embeddings
        elif isinstance(embeddings, dict):
            # the tables draw from their own stream, so the other parameters are initialized as
            # they would be for a model without embeddings
            front_seed = seed if isinstance(seed, np.random.Generator) else np.random.SeedSequence(seed, spawn_key=(1,))
            front = EmbeddingInput.from_config(embeddings, seed=np.random.default_rng(front_seed), dtype=dtype)
        else:
            raise TypeError(f"embeddings must be None, a dict or an EmbeddingInput, got {type(embeddings).__name__}")
        if input_dim is not None and input_dim != front.out_dim:
            raise ValueError(f"input_dim = {input_dim} does not match the embedding input's width sum(dims) + n_dense "
                             f"= {front.out_dim}; pass input_dim=None")
        self.input_layer = front
        self.input_dim = front.out_dim
        self.input_shape = (self.input_dim,)
        return dict(front.config)

    def _finish(self, dtype):
        self.dtype = np.dtype(dtype)
        self.slab = ParameterSlab(self.named_modules(), self.dtype)

    # -- parameters --------------------------------------------------------------------------
    def zero_grad(self):
        self.slab.zero_grad()
        if self.input_layer is not None:
            self.input_layer.zero_grad()

    # -- embedding tables (outside the slab) -------------------------------------------------
    def named_embeddings(self):
        """{name: table (V, d)} of the embedding input (empty without one); the arrays themselves."""
        if self.input_layer is None:
            return {}
        return {name: e.table for name, e in self.input_layer.named_tables()}

    def embedding_tables(self):
        return list(self.named_embeddings().values())

    def embedding_grads(self):
        """Per table, its sparse gradient (rows, grad_rows) from the last backward, or None."""
        return [] if self.input_layer is None else [e.grad for e in self.input_layer.tables]

    def _input_forward(self, X, training):
        return X if self.input_layer is None else self.input_layer.forward(X, training)

    def parameters(self):
        """{name: array view} of every parameter (views into ``self.slab.data``)."""
        return self.slab.named()

    def num_parameters(self):
        """Every trainable number: the dense slab and the embedding tables."""
        return len(self.slab) + sum(t.size for t in self.embedding_tables())

    def summary(self, print_fn=print):
        """Layers, output shapes and parameter counts (embedding tables included), as Keras'
        model.summary(); ``print_fn=None`` returns the text instead of printing it."""
        from .summary import summary

        text = summary(self)
        return text if print_fn is None else print_fn(text)

    def freeze(self, *prefixes):
        """Freeze every parameter whose name starts with one of ``prefixes`` (e.g. "expert" or
        "expert3."; names as in ``parameters()``): ``fit`` zeroes their gradients and keeps their
        values through optimizer steps. Used by the gate-recovery experiment (frozen experts)."""
        mask = np.zeros(len(self.slab), bool)
        found = False
        for name, shape, offset in self.slab.index:
            if name.startswith(prefixes):
                mask[offset:offset + int(np.prod(shape, dtype=np.int64))] = True
                found = True
        if not found:
            raise ValueError(f"no parameter name starts with {prefixes}; names look like "
                             f"{[n for n, _, _ in self.slab.index[:3]]}")
        self.frozen_mask = mask if self.frozen_mask is None else (self.frozen_mask | mask)

    def unfreeze(self):
        self.frozen_mask = None

    # -- losses ------------------------------------------------------------------------------
    def loss(self, outputs, targets, sample_weights=None):
        """(total, [loss per task], [d total / d output per task]) for one batch.

        total = sum_t task_weight_t * L_t + sum over gates of their regularizers (call after
        forward). ``sample_weights``: None or a list with, per task, None or (B,) non-negative
        weights (an example with weight 0 does not count for that task)."""
        per_task, douts, total = [], [], 0.0
        sw = sample_weights or [None] * self.n_tasks
        for t, (out, y) in enumerate(zip(outputs, targets)):
            name = self.task_losses[t]
            if name == "mse" and y.ndim == 1:
                y = y.reshape(out.shape)
            value, dout = _loss_fn(name)(out, y, sw[t])
            per_task.append(value)
            douts.append(dout * self.task_weights[t] if self.task_weights[t] != 1.0 else dout)
            total += self.task_weights[t] * value
        total += self.regularization()
        return total, per_task, douts

    def regularization(self):
        bank = getattr(self, "_bank", None)
        if bank is not None and len(self._cache) == 4:  # the bank ran the last forward
            return float(bank.regularization())
        return float(sum(g.regularization() for g in self.gates))

    def transform_outputs(self, outputs):
        """Raw outputs -> predictions: probabilities for bce (B,) and softmax_ce (B, C), values
        for mse ((B,) when the task has one output)."""
        preds = []
        for name, out in zip(self.task_losses, outputs):
            if name == "bce":
                preds.append(_sigmoid(out.reshape(-1)))
            elif name == "softmax_ce":
                preds.append(F.softmax(out))
            else:
                preds.append(out.reshape(-1) if out.shape[1] == 1 else out)
        return preds

    def train_mode(self, training):
        for g in self.gates:
            if hasattr(g, "train"):
                g.train(training)

    def __repr__(self):
        shown = dict(self.config)
        if "gate" in shown:  # the spec itself, e.g. gate=DSelectK(k=2, gamma=1.0, ...)
            shown["gate"] = self.gate_spec
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


class MMoE(_Model):
    """Multi-gate Mixture of Experts (Figure 1(b)).

    Parameters
    ----------
    input_dim : p, features of X (N, p) (or None with ``input_shape``).
    n_tasks : number of tasks T (one gate and one tower each).
    n_experts : n; every expert is Dense(u) -> ReLU (-> Dropout) for u in ``expert_units``
        (``expert="mlp"``), or the CNN of :class:`~dselectk.layers.CNNExpert` followed by those
        Dense layers (``expert="cnn"``).
    expert_units : hidden widths of each expert's Dense layers; the last is the width d of the mixed
        output.
    expert : "mlp" (default) or "cnn".
    input_shape : the shape of one example: (C, H, W) for ``expert="cnn"`` (X is (N, C, H, W),
        NCHW); optional for MLP experts, which see X flattened.
    expert_filters, expert_kernel, expert_pool : the CNN experts' convolutions (filters of each
        conv layer, kernel size, pooling size); the paper's (10, 20), 5 and 2 by default.
    expert_output : None (the experts output their last ReLU layer), or "sum" (each expert outputs
        the sum of its last layer's units, d = 1: the experts of the paper's synthetic data).
    tower_units : hidden widths of each task tower, followed by the task's output layer; None for
        no tower at all (the mixed expert output is the task's output, as in Appendix C.2; the
        experts' output width must then equal the task's output size).
    task_losses : "mse", "bce" (logits) or "softmax_ce" (logits, integer labels), or a list per task.
    task_outputs : output size per task (bce: 1; softmax_ce: the number of classes).
    task_weights : the loss weights (e.g. [alpha, 1 - alpha]); default all 1.
    gate : the task gates' specification (one gate per task is built from it): a spec from
        :mod:`dselectk.gates`, ``DSelectK(k=2, gamma=1.0, entropy_reg=0.0, xi=1.0,
        per_example=False)``, ``TopK(k=2, per_example=False, noisy=False)``,
        ``Softmax(per_example=False)`` or ``SoftmaxSelector(k=2, temperature=1.0, entropy_reg=0.0)``
        (the Appendix C.2 ablation); or its ``to_config()`` dict; or, as shorthand, the kind string
        ("dselect_k", "top_k", "softmax", "softmax_selector") with that gate's options as further
        keyword arguments (``gate="top_k", k=2, noisy=True, per_example=True``). An option the gate
        does not have, or options beside a spec, raise TypeError. ``model.gate_spec`` is the spec;
        ``config["gate"]`` its config dict.
    dropout : dropout rate after each expert and tower hidden layer.
    tower_dropout : the towers' dropout rate when it differs from ``dropout`` (None: ``dropout``).
    seed : initialization (and dropout) seed.
    embeddings : None, or dict(vocab_sizes=[V_0, ...], dims=[d_0, ...] (or one int), n_dense=0) (or
        an :class:`~dselectk.embedding.EmbeddingInput`): an embedding input front; X is then
        {"ids": (N, F) ints, "dense": (N, n_dense) floats} (or the ids alone), and input_dim may be
        None (it is sum(dims) + n_dense). With ``columns=`` names (see dselectk.embedding) X may be
        a pandas DataFrame or a dict of columns.
    task_names : None, or one name per task (e.g. ["watch", "rating"]): the keys of a dict or
        DataFrame Y and of the metrics (``val_watch_auc``); unnamed tasks are task0, task1, ...

    With static gates (``per_example=False``) the forward pass computes only the experts that some
    task's weights use (an exact nonzero) and mixes them for all tasks in one GEMM; static DSelect-k
    gates run as one batched kernel call (:class:`~dselectk.gates.StaticDSelectKBank`). Setting
    ``model.static_fast_path = False`` gives the plain per-task path (same results to rounding).
    With per-example gates, when fewer than ``sparse_threshold`` (0.75) of the batch's (example,
    expert) pairs have a nonzero weight in some task, each expert runs only on the examples that use
    it (gather -> dense -> scatter, forward and backward); ``sparse_threshold = 0`` turns this off.
    Results are the same to rounding (dropout masks hash each row's place in the batch, so the
    computed rows get the masks they have in the dense pass). ``model.flops`` counts the expert FLOPs
    executed in training steps and those of the dense model (``reset_flops()``; ``fit`` records
    them per epoch as ``expert_flops`` and ``expert_flops_dense``).
    """

    static_fast_path = True
    # Per-example gates: below this fraction of (example, expert) pairs in use, experts run on
    # their own examples only; at or above it, on the whole batch (gathering would cost more).
    sparse_threshold = 0.75

    def __init__(self, input_dim: int | None = None, n_tasks: int = 2, n_experts: int = 8,
                 expert_units: Sequence[int] = (64,), tower_units: Sequence[int] | None = (32,),
                 task_losses: str | Sequence[str] = "mse", task_outputs: int | Sequence[int] = 1,
                 task_weights: Sequence[float] | None = None, gate: GateArg = "dselect_k", *, dropout: float = 0.0,
                 seed: int = 0, dtype: DTypeLike = "float32", expert_output: str | None = None,
                 embeddings: Embeddings = None, tower_dropout: float | None = None, expert: str = "mlp",
                 input_shape: Sequence[int] | None = None, expert_filters: Sequence[int] = (10, 20),
                 expert_kernel: Pair = 5, expert_pool: Pair = 2, task_names: TaskNames = None,
                 **gate_options: Any) -> None:
        self.gate_spec = _resolve_gate(gate, gate_options, type(self).__name__)
        expert_units = _widths(expert_units, "expert_units")
        tower_units = None if tower_units is None else _widths(tower_units, "tower_units")
        self.config = dict(input_dim=input_dim, n_tasks=n_tasks, n_experts=n_experts, expert_units=expert_units,
                           expert_output=expert_output,
                           tower_units=tower_units, task_losses=task_losses, task_outputs=task_outputs,
                           task_weights=task_weights, gate=self.gate_spec.to_config(), dropout=dropout, seed=seed,
                           dtype=str(np.dtype(dtype)))
        if input_shape is not None:
            self.config["input_shape"] = _listed(input_shape)
        if expert != "mlp":  # only what differs from an MLP model, so that older configs read the same
            self.config.update(expert=expert, expert_filters=_listed(expert_filters),
                               expert_kernel=_listed(expert_kernel), expert_pool=_listed(expert_pool))
        if expert_output not in (None, "sum"):
            raise ValueError(f"expert_output must be None or 'sum', got {expert_output!r}")
        if expert == "cnn" and expert_output is not None:
            raise ValueError("expert_output='sum' is for MLP experts only")
        if tower_dropout is not None:  # in the config only when set: older readers load the others
            self.config["tower_dropout"] = tower_dropout
        self._build(input_dim=input_dim, n_tasks=n_tasks, n_experts=n_experts, expert_units=expert_units,
                    tower_units=tower_units, task_losses=task_losses, task_outputs=task_outputs,
                    task_weights=task_weights, dropout=dropout, seed=seed, dtype=dtype, towers=True,
                    expert_output=expert_output, embeddings=embeddings, tower_dropout=tower_dropout, expert=expert,
                    input_shape=input_shape, cnn=dict(filters=expert_filters, kernel=expert_kernel, pool=expert_pool))
        self._name_tasks(task_names)

    def _build(self, *, input_dim, n_tasks, n_experts, expert_units, tower_units, task_losses, task_outputs,
               task_weights, dropout, seed, dtype, towers, expert_output=None, embeddings=None, tower_dropout=None,
               expert="mlp", input_shape=None, cnn=None):
        """The layers, with the gates built from ``self.gate_spec`` (one per task, drawn from the
        model's generator after the experts and before the towers)."""
        self._setup_tasks(n_tasks, task_losses, task_outputs, task_weights)
        _check_dropout(dropout, tower_dropout)
        emb_config = self._setup_input(input_dim, embeddings, seed, dtype, input_shape, expert, "expert")
        if emb_config is not None:
            self.config.update(input_dim=None, embeddings=emb_config)
        self.expert_kind = expert
        self.n_experts = F._int(n_experts, "n_experts", 2)
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        check_experts(self, expert_units, dtype)  # before building any: refuse what cannot fit
        if towers:
            if not expert_units:
                raise ValueError("expert_units must list at least one hidden width")
            if expert == "cnn":
                self.experts = [CNNExpert(self.input_shape, expert_units, rng, dropout=dropout, dtype=dtype, **cnn)
                                for _ in range(self.n_experts)]
            else:
                self.experts = [MLP(self.input_dim, expert_units, rng, dropout, expert_output, dtype)
                                for _ in range(self.n_experts)]
        else:  # MoE: the experts' outputs are the prediction
            if self.n_tasks != 1:
                raise ValueError("MoE has one task; use MMoE for several")
            self.experts = [MLP(self.input_dim, expert_units, rng, dropout, self.task_outputs[0], dtype)
                            for _ in range(self.n_experts)]
        d = self.experts[0].out_dim
        # a gate that routes on ids (hash routing) is built with the embedding input they come from
        id_input = dict(id_input=self.input_layer) if getattr(self.gate_spec, "reads_ids", False) else {}
        self.gates = [self.gate_spec.build(self.n_experts, self.input_dim, rng, dtype, **id_input)
                      for _ in range(self.n_tasks)]
        if towers and tower_units is None:  # no towers: the mixture is the output
            bad = [out for out in self.task_outputs if out != d]
            if bad:
                raise ValueError(f"tower_units=None needs every task output size to equal the experts' output width "
                                 f"{d}, got task_outputs {self.task_outputs}")
        tower_dropout = dropout if tower_dropout is None else tower_dropout
        self.towers = [MLP(d, tower_units, rng, tower_dropout, out, dtype) if towers and tower_units is not None
                       else MLP(d, (), rng) for out in self.task_outputs]
        self._finish(dtype)
        self._cache = None
        self._bank = StaticDSelectKBank(self.gates) if StaticDSelectKBank.applies_to(self.gates) else None
        self.reset_flops()

    def named_modules(self):
        mods = []
        for j, e in enumerate(self.experts):
            mods += e.named_modules(f"expert{j}")
        mods += [(f"gate{t}", g) for t, g in enumerate(self.gates)]
        for t, tw in enumerate(self.towers):
            mods += tw.named_modules(f"tower{t}")
        return mods

    @_trusted_forward
    def forward(self, X, training=False):
        """[raw output per task] for X (B, *input_shape) (or the embedding input's dict): logits for
        bce/softmax_ce tasks."""
        self.train_mode(training)
        ids = _split(X)[0] if self.input_layer is not None else None  # what id-routed gates read
        X = self._input_forward(X, training)  # embedding lookups, else X itself
        flat = _flat(X)  # (B, input_dim) view: what the gates (and MLP experts) read
        X = X if self.expert_kind == "cnn" else flat
        if self.static_fast_path and all(not g.per_example for g in self.gates):
            return self._forward_static(X, training)
        ws = [gate.forward(ids if getattr(gate, "reads_ids", False) else flat) if gate.per_example else gate.forward()
              for gate in self.gates]
        B, n = flat.shape[0], self.n_experts
        used = np.zeros((B, n), bool)  # (example, expert) pairs with a nonzero weight in some task
        for w in ws:
            used |= w != 0
        if used.mean() < self.sparse_threshold:
            # Conditional computation: expert j runs only on the examples that use it (gather ->
            # dense -> scatter). The other rows of f stay 0 and are never read: their weights are 0.
            rows = [np.flatnonzero(used[:, j]) for j in range(n)]
            f = np.zeros((n, B, self.experts[0].out_dim), self.dtype)
            for j, e in enumerate(self.experts):
                if rows[j].size:
                    with subset_rows(rows[j]):  # dropout masks by the rows' place in the batch
                        f[j, rows[j]] = e.forward(X[rows[j]], training)
            self._count_flops(sum(r.size for r in rows), B, training)
        else:
            rows = None
            f = np.empty((n, B, self.experts[0].out_dim), self.dtype)
            for j, e in enumerate(self.experts):
                e.forward(X, training, out=f[j])  # the expert's last layer writes into f[j]
            self._count_flops(n * B, B, training)
        if all(w.ndim == 2 for w in ws):  # per-example gates: all T mixtures in one pass over f
            mixed = F.mix_experts_many(f, np.stack(ws))  # (T, B, d)
        else:
            mixed = [F.mix_experts(f, w) for w in ws]
        outs = [tower.forward(mixed[t], training) for t, tower in enumerate(self.towers)]
        self._cache = (f, ws, rows)
        return outs

    def _count_flops(self, expert_rows, B, training):
        """Adds one step's expert FLOPs, executed and for the dense model, to ``self.flops``."""
        if training:
            per_row = self.experts[0].flops_per_row(training=True)
            self.flops["experts_executed"] += expert_rows * per_row
            self.flops["experts_dense"] += self.n_experts * B * per_row

    def reset_flops(self):
        """Zeroes ``self.flops`` (``fit`` does so when it starts)."""
        self.flops = {"experts_executed": 0, "experts_dense": 0}

    def _forward_static(self, X, training):
        """Every gate static: the weights of all T tasks form one (T, n) matrix W. Experts whose
        column of W is exactly zero (no task uses them: conditional computation, Section 2) are not
        run. The T mixtures of the a active experts are one GEMM, (T, a) x (a, B*d), when the
        experts' output is narrow relative to T (e.g. the d = 1 experts of Appendix C.2), else one
        pass of mix_experts_many over f (which also fuses the experts' last ReLU into the
        backward: for wide experts and few tasks the GEMM would be memory-bound and slower)."""
        if self._bank is not None:
            W = self._bank.forward()  # (T, n), one kernel call for all gates
        else:
            W = np.stack([g.forward() for g in self.gates])
        active = np.flatnonzero(W.any(axis=0))
        if active.size == 0:  # possible only for DSelect-k with n not a power of two: all mass on padding codes
            active = np.arange(1)
        a, B, d = active.size, X.shape[0], self.experts[0].out_dim
        f = np.empty((a, B, d), self.dtype)
        for i, j in enumerate(active):
            self.experts[j].forward(X, training, out=f[i])
        W_active = np.ascontiguousarray(W[:, active])  # (T, a)
        if d >= 4 * self.n_tasks:  # the same weights for every example: (T, B, a)
            W_active = np.ascontiguousarray(np.broadcast_to(W_active[:, None, :], (self.n_tasks, B, a)))
            mixed = F.mix_experts_many(f, W_active)
        else:
            mixed = F.dense_forward(W_active, f.reshape(a, B * d)).reshape(self.n_tasks, B, d)
        outs = [tower.forward(mixed[t], training) for t, tower in enumerate(self.towers)]
        self._count_flops(a * B, B, training)
        self._cache = (f, list(W), active, W_active)
        return outs

    @_trusted_backward
    def backward(self, douts):
        """Accumulates every parameter's gradient (gate regularizers included) for the output
        gradients ``douts`` of the last forward."""
        if len(self._cache) == 4:
            return self._backward_static(douts)
        f, ws, rows = self._cache
        need_dx = self.input_layer is not None
        dX = np.zeros((f.shape[1], self.input_dim), f.dtype) if need_dx else None
        dys = [tower.backward(dout) for tower, dout in zip(self.towers, douts)]
        fuse_relu = False
        if all(w.ndim == 2 for w in ws):  # one pass over f for all tasks
            # when every expert ends in a ReLU, its backward is fused into this pass
            fuse_relu = all(e.layers and isinstance(e.layers[-1], ReLU) for e in self.experts)
            dws, df_total = F.mix_experts_many_backward(np.stack(dys), f, np.stack(ws), relu_mask=fuse_relu)
        else:
            df_total, dws = np.zeros_like(f), []
            for dy, w in zip(dys, ws):
                dw, df = F.mix_experts_backward(dy, f, w)
                df_total += df
                dws.append(dw)
        for gate, dw in zip(self.gates, dws):
            dx = gate.backward(dw, need_dx=need_dx)  # None for a static gate or without need_dx
            if dx is not None:
                dX += dx
        for j, e in enumerate(self.experts):
            if rows is None:
                dx = e.backward(df_total[j], need_dx=need_dx, skip_last=fuse_relu)
                if need_dx:
                    dX += dx
            elif rows[j].size:
                dx = e.backward(df_total[j, rows[j]], need_dx=need_dx, skip_last=fuse_relu)
                if need_dx:
                    dX[rows[j]] += dx  # scatter: each row appears once in rows[j]
        if need_dx:
            self.input_layer.backward(dX)

    def _backward_static(self, douts):
        f, ws, active, W_active = self._cache
        a, B, d = f.shape
        dmixed = np.stack([tower.backward(dout) for tower, dout in zip(self.towers, douts)])  # (T, B, d)
        fuse_relu = False
        if W_active.ndim == 3:  # mixed by mix_experts_many: dW sums the per-example gradients
            fuse_relu = all(self.experts[j].layers and isinstance(self.experts[j].layers[-1], ReLU) for j in active)
            dws, df = F.mix_experts_many_backward(dmixed, f, W_active, relu_mask=fuse_relu)
            W_active, dW_active = W_active[:, 0, :], dws.sum(axis=1)
        else:
            df = np.zeros((a, B * d), f.dtype)
            dW_active = F.dense_backward(dmixed.reshape(self.n_tasks, B * d), W_active, f.reshape(a, B * d), df)
        # A weight that is exactly zero passes no gradient to its gate (as mix_experts_backward's
        # skip_zero): the gates' derivatives vanish there anyway, this only removes rounding noise.
        dW_active[W_active == 0] = 0
        dW = np.zeros((self.n_tasks, self.n_experts), f.dtype)
        dW[:, active] = dW_active
        if self._bank is not None:
            self._bank.backward(dW)
        else:
            for gate, dw in zip(self.gates, dW):
                gate.backward(dw)
        df = df.reshape(a, B, d)
        need_dx = self.input_layer is not None
        dX = np.zeros((B, self.input_dim), f.dtype) if need_dx else None
        for i, j in enumerate(active):
            dx = self.experts[j].backward(df[i], need_dx=need_dx, skip_last=fuse_relu)
            if need_dx:
                dX += dx
        if need_dx:
            self.input_layer.backward(dX)

    def gate_weights(self):
        """Expert weights per task at the last forward, (T, n): per-example gates averaged over the
        batch. Static gates answer before any forward too (e.g. after ``load``): their weights
        depend on their parameters only."""
        ws = [g.expert_weights() for g in self.gates]
        return np.stack([w if w.ndim == 1 else w.mean(axis=0) for w in ws])


class MoE(MMoE):
    """Mixture of Experts (Figure 1(a)): one gate mixes n experts whose outputs are the prediction.
    Each expert is an MLP with hidden widths ``expert_units`` and a linear output of ``output_dim``.
    ``gate`` and its options, and the other parameters, as :class:`MMoE` (``task_names``: one
    name, or a list of one)."""

    def __init__(self, input_dim: int | None, n_experts: int = 8, expert_units: Sequence[int] = (64,),
                 loss: str = "mse", output_dim: int = 1, gate: GateArg = "dselect_k", *, dropout: float = 0.0,
                 seed: int = 0, dtype: DTypeLike = "float32", embeddings: Embeddings = None,
                 task_names: TaskNames = None, **gate_options: Any) -> None:
        self.gate_spec = _resolve_gate(gate, gate_options, type(self).__name__)
        expert_units = _widths(expert_units, "expert_units")
        self.config = dict(input_dim=input_dim, n_experts=n_experts, expert_units=expert_units, loss=loss,
                           output_dim=output_dim, gate=self.gate_spec.to_config(), dropout=dropout, seed=seed,
                           dtype=str(np.dtype(dtype)))
        self._build(input_dim=input_dim, n_tasks=1, n_experts=n_experts, expert_units=expert_units, tower_units=[],
                    task_losses=loss, task_outputs=output_dim, task_weights=None, dropout=dropout, seed=seed,
                    dtype=dtype, towers=False, embeddings=embeddings)
        self._name_tasks(task_names)


class SharedBottom(_Model):
    """The shared-bottom baseline: one Dense -> ReLU stack (``bottom_units``) shared by all tasks,
    then a tower per task (``tower_units`` and the task's output layer). No gates. ``embeddings``,
    ``tower_dropout`` and ``task_names`` as in :class:`MMoE`.

    With ``bottom="cnn"`` the shared bottom is the CNN of :class:`~dselectk.layers.CNNExpert`
    (``bottom_filters``, ``bottom_kernel``, ``bottom_pool``) followed by the ``bottom_units`` Dense
    layers, on images X (N, C, H, W) of ``input_shape`` (C, H, W)."""

    def __init__(self, input_dim: int | None = None, n_tasks: int = 2, bottom_units: Sequence[int] = (64,),
                 tower_units: Sequence[int] = (32,), task_losses: str | Sequence[str] = "mse",
                 task_outputs: int | Sequence[int] = 1, task_weights: Sequence[float] | None = None,
                 dropout: float = 0.0, seed: int = 0, dtype: DTypeLike = "float32", embeddings: Embeddings = None,
                 tower_dropout: float | None = None, bottom: str = "mlp", input_shape: Sequence[int] | None = None,
                 bottom_filters: Sequence[int] = (10, 20), bottom_kernel: Pair = 5, bottom_pool: Pair = 2,
                 task_names: TaskNames = None) -> None:
        bottom_units, tower_units = _widths(bottom_units, "bottom_units"), _widths(tower_units, "tower_units")
        self.config = dict(input_dim=input_dim, n_tasks=n_tasks, bottom_units=bottom_units,
                           tower_units=tower_units, task_losses=task_losses, task_outputs=task_outputs,
                           task_weights=task_weights, dropout=dropout, seed=seed, dtype=str(np.dtype(dtype)))
        if tower_dropout is not None:
            self.config["tower_dropout"] = tower_dropout
        if input_shape is not None:
            self.config["input_shape"] = _listed(input_shape)
        if bottom != "mlp":
            self.config.update(bottom=bottom, bottom_filters=_listed(bottom_filters),
                               bottom_kernel=_listed(bottom_kernel), bottom_pool=_listed(bottom_pool))
        self._setup_tasks(n_tasks, task_losses, task_outputs, task_weights)
        _check_dropout(dropout, tower_dropout)
        emb_config = self._setup_input(input_dim, embeddings, seed, dtype, input_shape, bottom, "bottom")
        if emb_config is not None:
            self.config.update(input_dim=None, embeddings=emb_config)
        self.bottom_kind = bottom
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        self.bottom: MLP | CNNExpert
        if bottom == "cnn":
            if not bottom_units:
                raise ValueError("bottom_units must list at least one Dense width after the CNN")
            self.bottom = CNNExpert(self.input_shape, list(bottom_units), rng, filters=bottom_filters,
                                    kernel=bottom_kernel, pool=bottom_pool, dropout=dropout, dtype=dtype)
        else:
            self.bottom = MLP(self.input_dim, list(bottom_units), rng, dropout, None, dtype)
        tower_dropout = dropout if tower_dropout is None else tower_dropout
        self.towers = [MLP(self.bottom.out_dim, list(tower_units), rng, tower_dropout, out, dtype)
                       for out in self.task_outputs]
        self.gates = []
        self._finish(dtype)
        self._cache = None
        self._name_tasks(task_names)

    def named_modules(self):
        mods = self.bottom.named_modules("bottom")
        for t, tw in enumerate(self.towers):
            mods += tw.named_modules(f"tower{t}")
        return mods

    @_trusted_forward
    def forward(self, X, training=False):
        X = self._input_forward(X, training)
        h = self.bottom.forward(X if self.bottom_kind == "cnn" else _flat(X), training)
        return [tw.forward(h, training) for tw in self.towers]

    @_trusted_backward
    def backward(self, douts):
        dh = None
        for tw, dout in zip(self.towers, douts):
            d = tw.backward(dout)
            dh = d if dh is None else dh + d
        need_dx = self.input_layer is not None
        dX = self.bottom.backward(dh, need_dx=need_dx)
        if need_dx:
            self.input_layer.backward(dX)


_CLASSES = {"MMoE": MMoE, "MoE": MoE, "SharedBottom": SharedBottom}


def _gate_spec_of(config, path):
    """The gate spec of a saved model config: config["gate"] a spec's config dict (version 3), or
    the kind string of versions 1 and 2 with the flat keys k, gamma, ... beside it, of which that
    kind's gate read only its own options (the others were ignored then, so they are now)."""
    gate = config["gate"]
    try:
        if isinstance(gate, str):
            cls = spec_class(gate)
            return cls(**{key: config[key] for key in _FLAT_GATE_KEYS if key in config and key in cls.options()})
        if isinstance(gate, dict):
            return GateSpec.from_config(gate)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the stored gate config is invalid: {exc}") from None
    raise ValueError(f"{path}: the stored gate config must be a dict (or a kind string), got {type(gate).__name__}")


def save(model: _Model, path: PathLike, include_optimizer: bool = True) -> None:
    """Write ``model`` to one ``.npz`` at exactly ``path``: the parameter slab, the embedding tables
    (``table_<name>``) and JSON metadata (class, constructor arguments with the gate as its spec's
    config dict, parameter index, table shapes, format version); after ``fit`` also its training
    state (optimizer -- unless ``include_optimizer=False`` --, counters, RNG states, History: see
    dselectk.checkpoint), which ``fit(resume_from=path)`` continues. The write is atomic (a
    temporary file, fsync, rename). Loadable with ``allow_pickle=False``. Refuses (ValueError)
    parameters holding NaN or Inf."""
    _checkpoint.check_finite_parameters(model, f"save({os.fspath(path)!r})")
    tables = model.named_embeddings()
    buffers = _named_buffers(model)
    # the oldest version that holds it
    version = 4 if buffers else 3 if "gate" in model.config else 2 if tables else 1
    meta = dict(format=FORMAT, version=version, cls=type(model).__name__,
                config=model.config, index=[[name, list(shape), offset] for name, shape, offset in model.slab.index])
    if tables:
        meta["tables"] = [[name, list(t.shape)] for name, t in tables.items()]
    if buffers:
        meta["buffers"] = [[name, list(b.shape)] for name, b in buffers.items()]
    training, training_arrays = _checkpoint.training_state(model, include_optimizer)
    if training is not None:
        meta["training"] = training
    _checkpoint.atomic_savez(path, dict(params=model.slab.data, meta=np.array(json.dumps(meta)),
                                        **{f"table_{name}": t for name, t in tables.items()},
                                        **{f"buffer_{name}": b for name, b in buffers.items()}, **training_arrays))


def _named_buffers(model):
    """{"gate<t>.<name>": array} of every gate's buffers (non-trainable state saved with the model)."""
    return {f"gate{t}.{name}": b for t, g in enumerate(getattr(model, "gates", []))
            for name, b in (g.buffers() if hasattr(g, "buffers") else {}).items()}


def load(path: PathLike) -> _Model:
    """Rebuild a model saved by :func:`save` (with its training state, when saved), by this
    version or an older one (format versions 1 and 2 stored the gate as a kind string with flat
    keys k, gamma, ...; they are read as the gate's spec). Raises FileNotFoundError for a missing
    file (``path`` or, as older versions wrote, ``path.npz``) and ValueError for a file that is
    not a dselectk model, was written by a newer format version, or is corrupted: the file is
    untrusted input, whose archive, metadata and sizes dselectk/_model_file.py checks before
    anything is built."""
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".npz"):
        path += ".npz"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    f = _model_file.read(path)
    cls = _model_file.validate(f, _CLASSES, READ_VERSIONS, FORMAT)
    meta, params, tables, training_arrays, config = f.meta, f.params, f.tables, f.extra, f.meta["config"]
    buffers = f.buffers
    if "gate" in config:
        spec = _gate_spec_of(config, path)
        if isinstance(config["gate"], str):  # versions 1 and 2: the flat keys were the gate's
            config = {key: value for key, value in config.items() if key not in _FLAT_GATE_KEYS}
        config = dict(config, gate=spec)
    try:
        model = cls(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the stored config is invalid: {exc}") from None
    index = [[name, list(shape), offset] for name, shape, offset in model.slab.index]
    if index != meta["index"] or params.shape != model.slab.data.shape or params.dtype != model.slab.data.dtype:
        raise ValueError(f"{path}: the stored parameters do not match the architecture in its metadata")
    if not np.all(np.isfinite(params)):
        raise ValueError(f"{path}: the stored parameters contain NaN or Inf")
    want = model.named_embeddings()
    if sorted(tables) != sorted(want) or [[n, list(t.shape)] for n, t in want.items()] != meta.get("tables", []):
        raise ValueError(f"{path}: the stored embedding tables {sorted(tables)} do not match the architecture in its "
                         f"metadata ({sorted(want)})")
    for name, t in want.items():
        if tables[name].shape != t.shape or tables[name].dtype != t.dtype or not np.all(np.isfinite(tables[name])):
            raise ValueError(f"{path}: the stored embedding table {name!r} does not match its metadata or holds NaN "
                             "or Inf")
    want_buffers = _named_buffers(model)
    if sorted(buffers) != sorted(want_buffers) or \
            [[n, list(b.shape)] for n, b in want_buffers.items()] != meta.get("buffers", []):
        raise ValueError(f"{path}: the stored gate buffers {sorted(buffers)} do not match the architecture in its "
                         f"metadata ({sorted(want_buffers)})")
    for name, value in buffers.items():
        t, key = name.split(".", 1)
        try:
            model.gates[int(t[len("gate"):])].set_buffer(key, value)
        except ValueError as exc:
            raise ValueError(f"{path}: the stored gate buffer {name!r} is invalid: {exc}") from None
    model.slab.data[...] = params
    for name, t in want.items():
        t[...] = tables[name]
    try:
        _checkpoint.restore_training(model, meta.get("training"), training_arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the stored training state is corrupted or does not fit the model ({exc})") from exc
    return model
