"""Optimizers over a flat parameter slab: SGD, Adam and Adagrad.

A model keeps all its parameters in one 1-D array (``params``) and their gradients in another of
the same dtype and length (``grads``); layers work on views into them. An optimizer holds its
state in slabs of the same shape and updates everything with one C call per :meth:`step`
(``dselectk.functional.sgd_step`` / ``adam_step`` / ``adagrad_step``)::

    opt = make_optimizer("adam", params, grads, lr=1e-3)
    for batch in data:
        grads[:] = 0          # or opt.zero_grad()
        ...                   # forward, backward: accumulate into views of grads
        opt.step()            # params updated in place

Embedding tables are not in the slab: their gradients are sparse (the rows a batch looked up and
their summed gradients), and :class:`SparseAdagrad` / :class:`SparseAdam` update them lazily, only
those rows and their state (``make_sparse_optimizer``; ``trainer.fit`` pairs it with the dense
optimizer of the same name).

The update rules are torch.optim's (see each class). ``state_dict()`` returns plain arrays and
scalars (copies), fit for ``numpy.savez``; ``load_state_dict`` accepts that dict back, also after
a round trip through ``numpy.load`` (0-d arrays for the scalars).
"""
from __future__ import annotations

import numpy as np

from . import functional as F

__all__ = ["Optimizer", "SGD", "Adam", "Adagrad", "make_optimizer", "OPTIMIZERS", "SparseAdagrad", "SparseAdam",
           "make_sparse_optimizer", "SPARSE_OPTIMIZERS"]


def _slabs(params, grads):
    for a, name in ((params, "params"), (grads, "grads")):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"argument '{name}' must be a 1-D numpy.ndarray of float32 or float64, got {type(a).__name__}")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"argument '{name}' must have dtype float32 or float64, got {a.dtype}")
        if a.ndim != 1:
            raise ValueError(f"argument '{name}' must be a 1-D slab of shape (N,), got shape {a.shape}")
    if grads.dtype != params.dtype:
        raise TypeError(f"argument 'grads' has dtype {grads.dtype}, expected {params.dtype} like params")
    if grads.shape != params.shape:
        raise ValueError(f"argument 'grads' must have the shape of params {params.shape}, got {grads.shape}")
    if not (params.flags.c_contiguous and params.flags.aligned and params.flags.writeable):
        raise ValueError("argument 'params' must be a C-contiguous, aligned, writeable array (it is updated in place)")
    return params, grads


def _positive(v, name):
    return F._number(v, name, strict=True)


def _nonneg(v, name):
    return F._number(v, name)


def _unit(v, name):
    v = F._number(v, name)
    if v >= 1:
        raise ValueError(f"{name} must be a finite number in [0, 1), got {v}")
    return v


class _LearningRate:
    @property
    def lr(self):
        """The learning rate (finite, > 0); may be changed between steps (schedules)."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _positive(value, "lr")


class Optimizer(_LearningRate):
    """Base class: ``params`` and ``grads`` are the model's two 1-D slabs (kept by reference, not
    copied), ``lr`` a settable attribute (checked: finite, > 0)."""

    name = ""
    _hyper: tuple[str, ...] = ("lr",)  # scalar hyperparameters saved by state_dict
    _states: tuple[str, ...] = ()  # names of the state slabs
    _optional_states: tuple[str, ...] = ()  # state slabs that may be absent (None)
    _nonneg_states: tuple[str, ...] = ()  # state slabs of squared gradients, >= 0 (their square roots are taken)

    def __init__(self, params, grads, lr):
        self.params, self.grads = _slabs(params, grads)
        self.lr = lr

    def step(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def zero_grad(self):
        """grads[:] = 0."""
        self.grads.fill(0)

    def state_dict(self):
        """{'name', the hyperparameters (and the step counter where there is one), a copy of each
        state slab}: plain scalars and arrays. A state slab that does not exist (SGD's velocity
        when momentum == 0) is left out."""
        d = {"name": self.name}
        for k in self._hyper:
            d[k] = getattr(self, k)
        for k in self._states:
            a = getattr(self, k)
            if a is not None:
                d[k] = a.copy()
        return d

    def load_state_dict(self, d):
        """Restore what :meth:`state_dict` returned (also after numpy.savez / numpy.load): the
        hyperparameters, and the state slabs, copied into this optimizer's own (same length;
        values cast to the params' dtype). Everything is checked before anything changes."""
        name = str(np.asarray(d.get("name", self.name)))
        if name != self.name:
            raise ValueError(f"state_dict is for optimizer '{name}', not '{self.name}'")
        missing = [k for k in self._hyper + self._states if k not in d and k not in self._optional_states]
        if missing:
            raise ValueError(f"state_dict lacks the entries {missing}")
        new = {}
        for k in self._states:
            if k not in d:
                continue
            src = np.asarray(d[k])
            if src.shape != self.params.shape or src.dtype.kind not in "fiu":
                raise ValueError(f"state_dict['{k}'] must be a real array of the shape of params "
                                 f"{self.params.shape}, got {src.dtype} {src.shape}")
            if not np.all(np.isfinite(src)):
                raise ValueError(f"state_dict['{k}'] contains NaN or Inf")
            if k in self._nonneg_states and np.any(src < 0):
                raise ValueError(f"state_dict['{k}'] holds negative values; it accumulates squared gradients")
            new[k] = src
        self._set_hyper({k: np.asarray(d[k]).item() for k in self._hyper})
        for k in self._states:
            if k not in new:
                if getattr(self, k) is not None:
                    getattr(self, k).fill(0)
                continue
            dest = getattr(self, k)
            if dest is None:
                setattr(self, k, new[k].astype(self.params.dtype, copy=True))
            else:
                dest[...] = new[k]

    def _set_hyper(self, values):
        for k, v in values.items():
            setattr(self, k, v)

    def __repr__(self):
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper)
        return f"{type(self).__name__}(N={self.params.size}, dtype={self.params.dtype}, {hyper})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay,
    torch.optim.SGD's update rule (dampening 0):

        g = grads + weight_decay * params
        v = momentum * v + g                       (v starts at 0, so the first v is g)
        params -= lr * (g + momentum * v if nesterov else v)       (lr * g when momentum == 0)

    Defaults: lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False. momentum, weight_decay and
    nesterov match torch.optim.SGD's defaults; torch.optim.SGD's lr defaults to 1e-3 (since
    PyTorch 2.2; before, it had none), this class's to 0.01. nesterov=True needs momentum > 0, as
    in PyTorch. The velocity slab exists only when momentum > 0."""

    name = "sgd"
    _hyper = ("lr", "momentum", "weight_decay", "nesterov")
    _states = ("velocity",)
    _optional_states = ("velocity",)

    def __init__(self, params, grads, lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, grads, lr)
        self.velocity = None
        self._set_hyper({"momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov})

    def _set_hyper(self, values):
        lr = values.get("lr", self.lr)
        momentum = _nonneg(values["momentum"], "momentum")
        weight_decay = _nonneg(values["weight_decay"], "weight_decay")
        nesterov = bool(values["nesterov"])
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0 (as torch.optim.SGD)")
        self.lr, self.momentum, self.weight_decay, self.nesterov = lr, momentum, weight_decay, nesterov
        if momentum > 0 and self.velocity is None:
            self.velocity = np.zeros_like(self.params)

    def step(self):
        """One update of params in place (one C call)."""
        if self.momentum > 0 and self.velocity is None:  # momentum switched on after construction
            self.velocity = np.zeros_like(self.params)
        F.sgd_step(self.params, self.grads, self.velocity if self.momentum > 0 else None, self.lr,
                   self.momentum, self.weight_decay, self.nesterov)


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction and L2 weight decay, torch.optim.Adam's
    update rule (not AdamW, no amsgrad):

        t += 1;  g = grads + weight_decay * params
        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        params -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Defaults: lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0 -- torch.optim.Adam's
    defaults. ``step_count`` is the number of steps taken (t)."""

    name = "adam"
    _hyper = ("lr", "beta1", "beta2", "eps", "weight_decay", "step_count")
    _states = ("m", "v")
    _nonneg_states = ("v",)

    def __init__(self, params, grads, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, grads, lr)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        self._set_hyper({"beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
                         "step_count": 0})
        self.m = np.zeros_like(self.params)
        self.v = np.zeros_like(self.params)

    @property
    def betas(self):
        return (self.beta1, self.beta2)

    def _set_hyper(self, values):
        lr = values.get("lr", self.lr)
        beta1, beta2 = _unit(values["beta1"], "beta1"), _unit(values["beta2"], "beta2")
        eps = _positive(values["eps"], "eps")
        weight_decay = _nonneg(values["weight_decay"], "weight_decay")
        step_count = values["step_count"]
        if isinstance(step_count, (bool, np.bool_)) or not isinstance(step_count, (int, np.integer)) \
                or step_count < 0:
            raise ValueError(f"step_count must be an integer >= 0, got {step_count!r}")
        self.lr, self.beta1, self.beta2, self.eps, self.weight_decay = lr, beta1, beta2, eps, weight_decay
        self.step_count = int(step_count)

    def step(self):
        """One update of params, m and v in place (one C call)."""
        F.adam_step(self.params, self.grads, self.m, self.v, self.step_count + 1, self.lr, self.beta1,
                    self.beta2, self.eps, self.weight_decay)
        self.step_count += 1  # only once the C call has accepted the arguments


class Adagrad(Optimizer):
    """Adagrad (Duchi et al., 2011) with L2 weight decay, torch.optim.Adagrad's update rule
    (lr_decay 0):

        g = grads + weight_decay * params;  accum += g^2
        params -= lr * g / (sqrt(accum) + eps)

    accum starts at initial_accumulator_value. Defaults: lr=0.01, eps=1e-10, weight_decay=0.0,
    initial_accumulator_value=0.0 -- torch.optim.Adagrad's defaults."""

    name = "adagrad"
    _hyper = ("lr", "eps", "weight_decay", "initial_accumulator_value")
    _states = ("accum",)
    _nonneg_states = ("accum",)

    def __init__(self, params, grads, lr=0.01, eps=1e-10, weight_decay=0.0, initial_accumulator_value=0.0):
        super().__init__(params, grads, lr)
        self._set_hyper({"eps": eps, "weight_decay": weight_decay,
                         "initial_accumulator_value": initial_accumulator_value})
        self.accum = np.full_like(self.params, self.initial_accumulator_value)

    def _set_hyper(self, values):
        lr = values.get("lr", self.lr)
        eps = _positive(values["eps"], "eps")
        weight_decay = _nonneg(values["weight_decay"], "weight_decay")
        init = _nonneg(values["initial_accumulator_value"], "initial_accumulator_value")
        self.lr, self.eps, self.weight_decay, self.initial_accumulator_value = lr, eps, weight_decay, init

    def step(self):
        """One update of params and accum in place (one C call)."""
        F.adagrad_step(self.params, self.grads, self.accum, self.lr, self.eps, self.weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adagrad": Adagrad}


def make_optimizer(name, params, grads, **kwargs):
    """The optimizer called ``name`` ('sgd', 'adam' or 'adagrad', case-insensitive) over the slabs
    params and grads; kwargs go to its constructor (their defaults are torch.optim's, see each
    class)."""
    key = name.lower() if isinstance(name, str) else None
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key](params, grads, **kwargs)


# --- lazy steps on embedding tables -----------------------------------------------------------

class SparseOptimizer(_LearningRate):
    """Base class of the lazy optimizers of embedding tables (a list of (V_j, d_j) arrays, updated
    in place and kept by reference). ``step(grads)`` takes one entry per table: None (the table was
    not used) or the sparse gradient ``(rows, grad_rows)`` of
    :func:`dselectk.functional.embedding_backward`; only those rows and their optimizer state
    change. There is no weight decay (as torch.optim's sparse optimizers): in ``fit`` a
    weight_decay applies to the dense slab only."""

    name = ""

    def __init__(self, tables, lr):
        if not isinstance(tables, (list, tuple)):
            raise TypeError(f"tables must be a list of 2-D arrays, got {type(tables).__name__}")
        for j, t in enumerate(tables):
            if not isinstance(t, np.ndarray) or t.dtype not in (np.float32, np.float64) or t.ndim != 2:
                raise TypeError(f"tables[{j}] must be a 2-D float32 or float64 numpy.ndarray")
        self.tables = list(tables)
        self.lr = lr

    def _grads(self, grads):
        if not isinstance(grads, (list, tuple)) or len(grads) != len(self.tables):
            raise ValueError(f"grads must be a list with one entry (None or (rows, grad_rows)) per table "
                             f"({len(self.tables)})")
        return grads

    def __repr__(self):
        return f"{type(self).__name__}(tables={[t.shape for t in self.tables]}, lr={self.lr!r})"


class SparseAdagrad(SparseOptimizer):
    """Lazy Adagrad (:func:`dselectk.functional.sparse_adagrad_step`): for every looked-up row r
    with gradient g, ``accum[r] += g**2; table[r] -= lr * g / (sqrt(accum[r]) + eps)``; other rows
    and accumulators do not change. Adagrad's per-entry accumulators make this exactly the dense
    Adagrad restricted to the rows with a nonzero gradient (a row with a zero gradient would not
    move in the dense step either). Defaults as :class:`Adagrad` (torch.optim.Adagrad's)."""

    name = "adagrad"

    def __init__(self, tables, lr=0.01, eps=1e-10, initial_accumulator_value=0.0):
        super().__init__(tables, lr)
        self.eps = _positive(eps, "eps")
        self.initial_accumulator_value = _nonneg(initial_accumulator_value, "initial_accumulator_value")
        self.accum = [np.full_like(t, self.initial_accumulator_value) for t in self.tables]

    def step(self, grads):
        for table, accum, g in zip(self.tables, self.accum, self._grads(grads)):
            if g is not None:
                F.sparse_adagrad_step(table, accum, g[0], g[1], self.lr, self.eps)


class SparseAdam(SparseOptimizer):
    """Lazy Adam (:func:`dselectk.functional.sparse_adam_step`): only the looked-up rows and their
    moments m, v are updated; the bias correction uses the global step count ``step_count`` (the
    number of :meth:`step` calls, incremented also when a table has no gradient), the rule of
    PyTorch's torch.optim.SparseAdam and TensorFlow Addons' LazyAdam. Unlike dense Adam, the
    moments of rows that are not looked up do not decay, and such rows do not move. Defaults as
    :class:`Adam`."""

    name = "adam"

    def __init__(self, tables, lr=0.001, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(tables, lr)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        self.beta1, self.beta2 = _unit(beta1, "beta1"), _unit(beta2, "beta2")
        self.eps = _positive(eps, "eps")
        self.step_count = 0
        self.m = [np.zeros_like(t) for t in self.tables]
        self.v = [np.zeros_like(t) for t in self.tables]

    def step(self, grads):
        grads = self._grads(grads)
        step = self.step_count + 1
        for table, m, v, g in zip(self.tables, self.m, self.v, grads):
            if g is not None:
                F.sparse_adam_step(table, m, v, g[0], g[1], step, self.lr, self.beta1, self.beta2, self.eps)
        self.step_count = step


SPARSE_OPTIMIZERS = {"adam": SparseAdam, "adagrad": SparseAdagrad}


def make_sparse_optimizer(name, tables, **kwargs):
    """The lazy optimizer of embedding ``tables`` that goes with the dense optimizer ``name``
    ('adagrad' or 'adam'), with the dense optimizer's keyword arguments: lr, eps, betas and
    initial_accumulator_value are shared; weight_decay is not applied to the tables (it acts on the
    dense slab only, as with torch.optim's sparse optimizers). 'sgd' has no lazy counterpart here:
    ValueError."""
    key = name.lower() if isinstance(name, str) else None
    if key not in SPARSE_OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} has no lazy (sparse) step for embedding tables; models with "
                         f"embeddings train with one of {sorted(SPARSE_OPTIMIZERS)}")
    kwargs = {k: v for k, v in kwargs.items() if k != "weight_decay"}
    return SPARSE_OPTIMIZERS[key](tables, **kwargs)
