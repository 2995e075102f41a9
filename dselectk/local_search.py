"""Permutation-based local search for sparse gates (Ibrahim et al., "COMET", KDD 2023, Section 4;
``shared/reference/comet-spec.md``, Section 2).

A gate routes to n *slots*; a learned permutation maps slots to experts. During the first T
training steps (the soft phase) the permutation is a doubly stochastic matrix
P = Sinkhorn(log_alpha / tau) (:func:`dselectk.functional.sinkhorn_forward`), learned with the rest
of the model, with tau annealed from 1e-3 to 1e-7 (log-linearly) and the number of Sinkhorn
iterations from 20 to 150 (linearly), plus the entropy regularizer 1e-4 * [H(P) + H(row-normalised
P)]. At step T it is hardened with the Hungarian algorithm on -P
(``scipy.optimize.linear_sum_assignment``) and frozen; from then on it is an index remap of the
gate's weights: slot i's weight goes to expert ``permutation[i]``, which keeps the gate exactly as
sparse as before, so conditional computation skips the same number of experts.

How each gate is permuted (row vectors, P[i, j] = weight of slot i sent to expert j):

* DSelect-k: each selector's output is permuted by its own P_i (``per_selector=True``, the
  authors' ``learn_k_permutations``): w = sum_i softmax(alpha)_i r_i P_i; the entropy
  regularizer of the gate still sees the unpermuted r_i.
* COMET: each tree's slice of the softmax is permuted by its own P_t and the slices summed.
* Top-k, Hash and the other gates: w' = w P (one permutation: the authors average their K
  matrices here, and the mean of K different permutations is no permutation, so it would break the
  sparsity bound and the index remap once hard; with one matrix it is the permutation itself).
* In the soft phase the result is rescaled to the gate's own total weight (1 for gates on the
  simplex, so "renormalised onto the simplex"; DSelect-k with n not a power of two keeps its
  mass deficit, which its penalty xi acts on). A hard permutation preserves the total exactly.

With ``shared=True`` one set of permutations serves every task gate of a multi-task model (the
authors' MovieLens configs), else each gate has its own. Between hardening and evaluation: a
forward with ``training=False`` in the soft phase uses the Hungarian rounding of the last soft P,
as the authors' inference does (of P at the current parameters and step).

Use: ``MMoE(..., local_search=dict(steps=2000))`` (or ``epochs=2.5``, converted with the steps per
epoch of :func:`dselectk.fit`), or a :class:`LocalSearch` in the same place. ``fit`` drives the
schedule and hardens at step T, recording ``history.permutations``; ``gate.permutation`` is then the
slot -> expert index array. A loop of your own calls ``model.local_search_step(step)`` before each
training step (and ``model.local_search_begin(steps_per_epoch)`` once, for ``epochs=``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import functional as F
from .gates._base import _flag, _Gate, _number

__all__ = ["LocalSearch", "Permutation", "PermutedGate", "hungarian", "permute_slots", "permute_slots_backward",
           "remap_slots", "remap_slots_backward"]


def hungarian(P: np.ndarray) -> np.ndarray:
    """The permutation maximising sum_i P[i, perm[i]] for each matrix of P (n, n) or (K, n, n):
    ``scipy.optimize.linear_sum_assignment`` on -P. Returns int64 (n,) or (K, n), slot -> expert."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("local search hardens its permutations with scipy.optimize.linear_sum_assignment (the "
                          "Hungarian algorithm); install SciPy: pip install 'dselectk[search]'") from exc
    P = np.asarray(P, dtype=np.float64)
    P3 = P if P.ndim == 3 else P[None]
    perms = np.empty(P3.shape[:2], np.int64)
    for k, M in enumerate(P3):
        rows, cols = linear_sum_assignment(M, maximize=True)
        perms[k, rows] = cols
    return perms if P.ndim == 3 else perms[0]


@dataclasses.dataclass(frozen=True)
class LocalSearch:
    """Configuration of the permutation local search (see the module docstring).

    steps / epochs : the length T of the soft phase, in training steps or in epochs (one of them;
        epochs may be fractional and are converted with fit's steps per epoch). The authors draw
        1 to 10 epochs of 100.
    shared : one set of permutations for every task gate (True) or one per gate (False).
    per_selector : DSelect-k and COMET: one permutation per selector / tree (the authors'
        learn_k_permutations), else one for all of them.
    entropy_reg : the coefficient of H(P) + H(row-normalised P) (mean over the matrices).
    tau_start, tau_end : the temperature, annealed log-linearly over the soft phase.
    iters_start, iters_end : Sinkhorn iterations, int(iters_start + (iters_end - iters_start) t / T).
    init_scale : log_alpha starts uniform in (-init_scale, init_scale).
    """

    steps: int | None = None
    epochs: float | None = None
    _: dataclasses.KW_ONLY
    shared: bool = False
    per_selector: bool = True
    entropy_reg: float = 1e-4
    tau_start: float = 1e-3
    tau_end: float = 1e-7
    iters_start: int = 20
    iters_end: int = 150
    init_scale: float = 0.05

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"LocalSearch needs exactly one of steps= (training steps) or epochs= (epochs, converted "
                             f"with the steps per epoch) for the length of its soft phase, got steps={self.steps!r}, "
                             f"epochs={self.epochs!r}")
        checked = dict(shared=_flag(self.shared, "shared"), per_selector=_flag(self.per_selector, "per_selector"),
                       entropy_reg=_number(self.entropy_reg, "entropy_reg"),
                       tau_start=_number(self.tau_start, "tau_start", strict=True),
                       tau_end=_number(self.tau_end, "tau_end", strict=True),
                       iters_start=F._int(self.iters_start, "iters_start", 1, 100000),
                       iters_end=F._int(self.iters_end, "iters_end", 1, 100000),
                       init_scale=_number(self.init_scale, "init_scale"))
        if self.steps is not None:
            checked["steps"] = F._int(self.steps, "steps", 1, 2**62)
        else:
            checked["epochs"] = _number(self.epochs, "epochs", strict=True)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def to_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> LocalSearch:
        if not isinstance(config, dict):
            raise TypeError(f"local_search must be None, a dict of LocalSearch's options or a LocalSearch, got "
                            f"{type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"_"}
        unknown = sorted(set(config) - names)
        if unknown:
            raise TypeError(f"local_search got unknown options {unknown}; its options are {sorted(names)}")
        return cls(**config)

    @classmethod
    def resolve(cls, value: LocalSearch | dict | None) -> LocalSearch | None:
        """None, a LocalSearch or a dict of its options -> None or a LocalSearch."""
        if value is None or isinstance(value, cls):
            return value
        return cls.from_config(value)  # type: ignore[arg-type]  # (any other type: its TypeError)

    def soft_steps(self, steps_per_epoch: int | None = None) -> int | None:
        """T in steps; for ``epochs=`` the steps per epoch are needed (None: not known yet)."""
        if self.steps is not None:
            return self.steps
        if steps_per_epoch is None or self.epochs is None:
            return None
        return max(1, int(round(self.epochs * steps_per_epoch)))

    def schedule(self, step: int, T: int) -> tuple[float, int]:
        """(tau, iterations) of soft step ``step`` of T (clamped to [0, T - 1])."""
        frac = min(max(step, 0), T - 1) / T
        log_tau = math.log10(self.tau_start) + (math.log10(self.tau_end) - math.log10(self.tau_start)) * frac
        iters = int(self.iters_start + (self.iters_end - self.iters_start) * frac)
        return 10.0 ** log_tau, max(1, iters)


# --- applying permutations to a gate's slots --------------------------------------------------
#
# c (B, S, n): the gate's weights split into S slots (w = sum_s c_s); P (K, n, n) with K = S (one
# matrix per slot) or K = 1 (one matrix for the sum). Static gates pass c (S, n), i.e. B = 1.

def _batched(c):
    return (c[None], True) if c.ndim == 2 else (c, False)


def permute_slots(c: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Soft phase: w = m * v / sum(v) with v = sum_s c_s P_s and m = sum(c), the gate's own total
    weight (so a gate on the simplex stays on it). Returns (w, cache)."""
    c3, static = _batched(c)
    K = P.shape[0]
    if K == 1:
        v = c3.sum(axis=1) @ P[0]
    else:
        v = np.einsum("bkn,knm->bm", c3, P, optimize=True)
    mass, total = c3.sum(axis=(1, 2)), v.sum(axis=1)
    factor = np.divide(mass, total, out=np.zeros_like(total), where=total != 0)
    w = v * factor[:, None]
    return (w[0] if static else w), (c3, P, v, total, factor, static)


def permute_slots_backward(dw: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(dc, dP) of <dw, w> for :func:`permute_slots`; dc like c, dP like P (summed over the batch)."""
    c3, P, v, total, factor, static = cache
    dw = dw[None] if static else dw
    dm = np.divide((dw * v).sum(axis=1), total, out=np.zeros_like(total), where=total != 0)  # <dw, v> / s
    dv = factor[:, None] * (dw - dm[:, None])
    K = P.shape[0]
    if K == 1:
        dsum = dv @ P[0].T + dm[:, None]
        dc = np.broadcast_to(dsum[:, None, :], c3.shape).astype(c3.dtype)
        dP = (c3.sum(axis=1).T @ dv)[None]
    else:
        dc = np.einsum("bm,knm->bkn", dv, P, optimize=True) + dm[:, None, None]
        dP = np.einsum("bkn,bm->knm", c3, dv, optimize=True)
    return (dc[0] if static else dc), dP


def remap_slots(c: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Hard phase: w[..., perm_s[i]] += c[..., s, i], perm (K, n) slot -> expert, K = S or 1. An
    index remap: w has as many nonzeros as the slots' sum (per-selector permutations may map two
    selectors' slots onto one expert, as two selectors may pick one expert without them)."""
    c3, static = _batched(c)
    B, S, n = c3.shape
    if perm.shape[0] == 1:
        w = np.empty((B, n), c3.dtype)
        w[:, perm[0]] = c3[:, 0] if S == 1 else c3.sum(axis=1)
    else:
        w = np.zeros((B, n), c3.dtype)
        for s in range(S):
            w[:, perm[s]] += c3[:, s]
    return (w[0] if static else w), (perm, c3.shape, static)


def remap_slots_backward(dw: np.ndarray, cache: tuple) -> np.ndarray:
    """dc of <dw, w> for :func:`remap_slots`."""
    perm, shape, static = cache
    dw = dw[None] if static else dw
    if perm.shape[0] == 1:
        dc = np.broadcast_to(dw[:, perm[0]][:, None, :], shape)
    else:
        dc = np.stack([dw[:, perm[s]] for s in range(shape[1])], axis=1)
    dc = np.ascontiguousarray(dc)
    return dc[0] if static else dc


class Permutation:
    """K learned permutations of n slots: the parameter log_alpha (K, n, n) (a module of the
    model's parameter slab) and the local-search state: the step, the soft-phase length T, and once
    hardened the permutations ``hard`` (K, n) (slot -> expert) and the step they hardened.

    The model calls ``forward(training)`` once per forward pass, before its gates; each gate then
    calls ``apply(c)`` / ``apply_backward(dw, cache)`` (the soft-phase dP of all gates sharing
    this module are summed), and the model calls ``backward()`` once after its gates, which runs
    the Sinkhorn backward (with the entropy regularizer) into ``grads["log_alpha"]``."""

    def __init__(self, n, K, spec, rng, dtype):
        self.n, self.K, self.spec = int(n), int(K), spec
        s = spec.init_scale
        self.params = {"log_alpha": rng.uniform(-s, s, (self.K, self.n, self.n)).astype(dtype)}
        self.grads = {"log_alpha": np.zeros_like(self.params["log_alpha"])}
        self.step = 0
        self.soft_steps = spec.soft_steps()
        self.hard = None
        self.hardened_step = None
        self._clear()

    def _clear(self):
        self._P = self._sk_cache = self._dP = self._eval_perm = None
        self._mode = None

    # -- schedule and hardening ----------------------------------------------------------------
    def begin(self, steps_per_epoch):
        """Resolves T for ``epochs=`` (fit calls it when training starts)."""
        if self.soft_steps is None:
            self.soft_steps = self.spec.soft_steps(steps_per_epoch)

    def _T(self):
        if self.soft_steps is None:
            raise RuntimeError(f"LocalSearch(epochs={self.spec.epochs}) needs the number of steps per epoch: train "
                               "with dselectk.fit, or call model.local_search_begin(steps_per_epoch) first")
        return self.soft_steps

    @property
    def is_hard(self):
        return self.hard is not None

    def set_step(self, step):
        """The current training step (0-based, the optimizer steps done so far); hardens when it
        reaches T. Returns True if it hardened now."""
        if int(step) != self.step:
            self._eval_perm = None
        self.step = int(step)
        if self.hard is None and self.step >= self._T():
            self.harden()
            return True
        return False

    def schedule(self):
        """(tau, iterations) at the current step."""
        return self.spec.schedule(self.step, self._T())

    def soft_matrix(self):
        """P at the current step's schedule (float64 iterates, the parameters' dtype)."""
        tau, iters = self.schedule()
        return F.sinkhorn(self.params["log_alpha"], tau, iters)

    def harden(self):
        """Hungarian rounding of P = Sinkhorn(log_alpha / tau) at the last soft step's tau and
        iterations (a function of the parameters alone, so a saved and reloaded model hardens to
        the same permutations); then frozen: log_alpha receives no more gradient."""
        self.hard = hungarian(self.soft_matrix())
        self.hardened_step = self.step
        self._clear()

    # -- forward / backward --------------------------------------------------------------------
    def forward(self, training):
        """Once per model forward. Soft phase in training: P from Sinkhorn at this step's tau and
        iterations; in evaluation: the Hungarian rounding of that P (computed once per training
        step); hard: nothing."""
        if self.hard is not None:
            self._mode = "hard"
        elif training:
            tau, iters = self.schedule()
            self._P, self._sk_cache = F.sinkhorn_forward(self.params["log_alpha"], tau, iters)
            self._dP = np.zeros_like(self._P)
            self._eval_perm = None
            self._mode = "soft"
        else:
            if self._eval_perm is None:
                self._eval_perm = hungarian(self.soft_matrix())
            self._mode = "eval"

    def _perm(self):
        return self.hard if self._mode == "hard" else self._eval_perm

    def apply(self, c):
        """(w, cache) for the slots c (S, n) or (B, S, n) of one gate."""
        if self._mode is None:
            raise RuntimeError("Permutation.apply() before forward(): the model runs forward(training) first")
        if self._mode == "soft":
            w, cache = permute_slots(c, self._P)
        else:
            w, cache = remap_slots(c, self._perm())
        return w, (self._mode, cache)

    def apply_backward(self, dw, cache):
        mode, inner = cache
        if mode == "soft":
            dc, dP = permute_slots_backward(dw, inner)
            self._dP += dP
            return dc
        return remap_slots_backward(dw, inner)

    def backward(self):
        """The Sinkhorn backward of the summed dP (and of the regularizer), once per step."""
        if self._mode == "soft" and self._sk_cache is not None:
            self.grads["log_alpha"] += F.sinkhorn_backward(self._dP.astype(self._P.dtype, copy=False),
                                                           self._sk_cache, lam=self.spec.entropy_reg)

    def regularization(self):
        """entropy_reg * Omega(P) in the soft phase of training, else 0."""
        if self._mode != "soft" or self.spec.entropy_reg == 0:
            return 0.0
        return self.spec.entropy_reg * F.sinkhorn_regularization(self._P)

    def zero_grad(self):
        self.grads["log_alpha"].fill(0)

    # -- state (saved with the model) ----------------------------------------------------------
    def state(self):
        return dict(step=self.step, soft_steps=self.soft_steps, hardened_step=self.hardened_step,
                    hard=None if self.hard is None else self.hard.tolist())

    def load_state(self, state, where="local search state"):
        """Restore :meth:`state`; ValueError for a state that does not fit (a crafted file)."""
        if not isinstance(state, dict) or set(state) != {"step", "soft_steps", "hardened_step", "hard"}:
            raise ValueError(f"{where}: expected a dict with keys step, soft_steps, hardened_step, hard")
        step, T, hs, hard = state["step"], state["soft_steps"], state["hardened_step"], state["hard"]
        for name, v in (("step", step), ("soft_steps", T), ("hardened_step", hs)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{where}: {name} must be an int >= 0 or null, got {v!r}")
        if step is None:
            raise ValueError(f"{where}: step must be an int >= 0")
        if hard is not None:
            arr = np.asarray(hard)
            if arr.shape != (self.K, self.n) or arr.dtype.kind not in "iu" or any(
                    sorted(row) != list(range(self.n)) for row in arr.tolist()):
                raise ValueError(f"{where}: hard must be {self.K} permutations of range({self.n})")
            if hs is None:
                raise ValueError(f"{where}: a hard permutation needs its hardened_step")
            hard = arr.astype(np.int64)
        self.step, self.soft_steps, self.hardened_step, self.hard = step, T, hs, hard
        self._clear()


class PermutedGate(_Gate):
    """A gate whose slots are mapped to experts by a :class:`Permutation` (shared or its own).
    Everything the models and the trainer use (forward/backward, diagnostics) goes through the
    permuted weights; other attributes (``is_binary``, ``k``, ``gamma``, ...) are the inner gate's.
    The parameters are the inner gate's (same names in the model); the permutation's log_alpha is
    its own module."""

    def __init__(self, gate, permutation):
        self.inner, self.local_search = gate, permutation
        self.params, self.grads = gate.params, gate.grads
        self._cache = None
        self._last_w = None

    def __getattr__(self, name):  # only for what this class does not define
        if name in ("inner", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def forward(self, x=None):
        c = self.inner.forward_slots(x)
        w, self._cache = self.local_search.apply(c)
        self._last_w = w
        return w

    def backward(self, dw, need_dx=True):
        self._need_forward()
        dc = self.local_search.apply_backward(dw, self._cache)
        return self.inner.backward_slots(dc, need_dx=need_dx)

    def regularization(self):
        return self.inner.regularization()

    def _last_forward(self):
        if self._cache is not None:
            return self._last_w, self._cache
        if self.per_example:
            return super()._last_forward()  # raises: needs an input
        perm = self.local_search
        if perm._mode is None:
            perm.forward(training=False)
        return super()._last_forward()

    def onnx_weights(self, graph, x):
        """The ONNX form (dselectk.export_onnx) of the evaluation weights: the hard permutations (in
        the soft phase their Hungarian rounding, as in evaluation). Static gates: constants; a
        per-example gate with one permutation: its own graph's weights, columns gathered by the
        inverse permutation."""
        perm = self.local_search
        if perm._mode in (None, "soft"):
            perm.forward(training=False)
        if not self.per_example:
            return super().onnx_weights(graph, x)
        hard = perm._perm()
        if hard.shape[0] != 1:
            raise TypeError("ONNX export of a per-example gate with one permutation per selector / tree is not "
                            "supported; use LocalSearch(per_selector=False) or a static gate")
        w = self.inner.onnx_weights(graph, x)
        inverse = np.argsort(hard[0]).astype(np.int64)  # w'[:, perm[i]] = w[:, i]
        return graph.op("Gather", w, graph.const(inverse, "permutation_inverse"), hint="permuted_weights", axis=1)

    @property
    def permutation(self):
        """slot -> expert once hardened: (n,) int64 for one permutation, (k, n) with one per
        selector / tree; None in the soft phase."""
        hard = self.local_search.hard
        if hard is None:
            return None
        return hard[0].copy() if hard.shape[0] == 1 else hard.copy()

    def _config(self):
        return self.inner._config()

    def __repr__(self):
        return f"PermutedGate({self.inner!r})"
