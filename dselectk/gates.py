"""Gate objects: parameters and their gradients as NumPy arrays, named with the paper's symbols.

Every gate has the same small interface, used by the trainer:

* ``forward(x=None) -> w``: expert weights, (n,) for a static gate, (B, n) per example (x is the
  gate's input, (B, p); static gates ignore it, or broadcast to (B, n) with ``batch_size``).
* ``backward(dw, need_dx=True) -> dx``: accumulates into ``grads`` the gradient of <dw, w> plus
  the gate's own regularizer, and returns the gradient with respect to x (None for static gates,
  and when ``need_dx`` is False: a model whose gates read its own input skips that product).
* ``regularization() -> float``: the regularizer's value at the last forward (already scaled).
* ``params`` / ``grads``: dicts of arrays (same keys); ``zero_grad()``.
* diagnostics: ``selected_experts()`` (indices with nonzero weight) and, for DSelect-k,
  ``is_binary()`` (S(Z) all 0/1, after which at most k experts are selected).

Initialization follows the reference TensorFlow implementation: Z (and the per-example Z-map's
weights and biases) uniform in (-gamma/100, gamma/100), so 0 < S(Z) < 1 and every Z_ij has a
nonzero gradient at the start; the alpha map uniform in (-0.05, 0.05).
"""
from __future__ import annotations

import numpy as np

from . import functional as F
from ._memory import check_gate

__all__ = ["DSelectKGate", "TopKGate", "SoftmaxGate", "SoftmaxSelectorGate", "StaticDSelectKBank"]

_DTYPES = (np.float32, np.float64)


def _check_common(n_experts, k, per_example, input_dim, dtype):
    n = F._int(n_experts, "n_experts", 2)
    if k is not None:
        k = F._int(k, "k", 1)
        if k > n:
            raise ValueError(f"k must satisfy 1 <= k <= n_experts = {n}, got k = {k}")
    if per_example:
        if input_dim is None:
            raise ValueError("a per-example gate needs input_dim (the size p of its input x)")
        input_dim = F._int(input_dim, "input_dim", 1)
    dtype = np.dtype(dtype)
    if dtype.type not in _DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    check_gate(n, dtype)  # refuse sizes that cannot fit before allocating
    return n, k, input_dim, dtype


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _logits_params(rng, n, per_example, input_dim, dtype):
    """Parameters of the logits a = A x + b (per example: A uniform in (-0.05, 0.05), b zeros) or of
    static logits (zeros), as the Top-k and softmax gates use them."""
    if per_example:
        return {"A": rng.uniform(-0.05, 0.05, (n, input_dim)).astype(dtype), "b": np.zeros(n, dtype)}
    return {"logits": np.zeros(n, dtype)}


class _Gate:
    """Shared plumbing: parameters, gradients, input checks."""

    per_example: bool
    n_experts: int

    def zero_grad(self):
        for g in self.grads.values():
            g.fill(0)

    def _accumulate(self, name, value):
        self.grads[name] += value

    def _input(self, x):
        if not self.per_example:
            return None
        if x is None:
            raise ValueError(f"{type(self).__name__}(per_example=True) needs its input x of shape (B, {self.input_dim})")
        if not isinstance(x, np.ndarray) or x.dtype != self.dtype:
            raise TypeError(f"x must be a numpy.ndarray of dtype {self.dtype}, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x must have shape (B, {self.input_dim}), got {x.shape}")
        return x

    def _need_forward(self):
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")

    def selected_experts(self, tol=0.0):
        """Indices of the experts with weight > tol at the last forward: for a per-example gate,
        those used by at least one example of the last batch."""
        self._need_forward()
        w = self._last_w
        return np.flatnonzero((w > tol) if w.ndim == 1 else (w > tol).any(axis=0))

    def num_selected(self, tol=0.0):
        """Number of experts with weight > tol, averaged over the examples of the last batch."""
        self._need_forward()
        w = self._last_w
        return float((w > tol).sum()) if w.ndim == 1 else float((w > tol).sum(axis=1).mean())

    def __repr__(self):
        extra = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({extra})"


class DSelectKGate(_Gate):
    """DSelect-k (Hazimeh et al. 2021): w = sum_{i<=k} softmax(alpha)_i r(S(z^(i))) (eq. 6).

    Parameters
    ----------
    n_experts : int, n >= 2. When n is not a power of two, the selectors' codes n..2^m-1 are
        dropped and the penalty xi * sum_i 1 / (eps + sum_{j<n} r_ij) keeps their mass on real
        experts (Appendix B.2).
    k : int, 1 <= k <= n: number of selectors, hence at most k experts once S(Z) is binary.
    gamma : float > 0, smooth-step width (the official default 1.0).
    entropy_reg : float >= 0, lambda of the entropy regularizer sum_i h(r(S(z^(i)))), averaged
        over the batch for per-example gates. Larger values make S(Z) binary sooner.
    xi : float >= 0, coefficient of the Appendix B.2 penalty (ignored when n is a power of two).
    per_example : False for the static gate (alpha (k,), Z (k, m) are parameters), True for
        alpha = G x + b_G, z^(i) = W^(i) x + b_W^(i) (Section 3.2).
    input_dim : p, the size of x (per-example gates only).
    eps : float, the epsilon inside the entropy's log and the penalty's denominator.
    seed : int or numpy Generator for the initialization.
    """

    def __init__(self, n_experts, k, gamma=1.0, entropy_reg=0.0, xi=1.0, per_example=False,
                 input_dim=None, eps=1e-6, seed=None, dtype=np.float64):
        n, k, input_dim, dtype = _check_common(n_experts, k, per_example, input_dim, dtype)
        for name, value, strict in (("gamma", gamma, True), ("entropy_reg", entropy_reg, False),
                                    ("xi", xi, False), ("eps", eps, True)):
            if not np.isfinite(value) or (value <= 0 if strict else value < 0):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {value}")
        self.n_experts, self.k, self.gamma = n, k, float(gamma)
        self.entropy_reg, self.xi, self.eps = float(entropy_reg), float(xi), float(eps)
        self.per_example, self.input_dim, self.dtype = bool(per_example), input_dim, dtype
        self.m = F.n_bits(n)
        self.power_of_two = (1 << self.m) == n
        rng = _rng(seed)
        zr = self.gamma / 100
        if self.per_example:
            p = input_dim
            self.params = {
                "G": rng.uniform(-0.05, 0.05, (k, p)).astype(dtype),
                "b_G": rng.uniform(-0.05, 0.05, (k,)).astype(dtype),
                "W": rng.uniform(-zr, zr, (k, self.m, p)).astype(dtype),
                "b_W": rng.uniform(-zr, zr, (k, self.m)).astype(dtype),
            }
        else:
            self.params = {
                "alpha": rng.uniform(-0.05, 0.05, (k,)).astype(dtype),
                "Z": rng.uniform(-zr, zr, (k, self.m)).astype(dtype),
            }
        self.grads = {name: np.zeros_like(v) for name, v in self.params.items()}
        self._cache = None
        self._last_w = None

    def _config(self):
        return dict(n_experts=self.n_experts, k=self.k, gamma=self.gamma, entropy_reg=self.entropy_reg,
                    xi=self.xi, per_example=self.per_example, input_dim=self.input_dim)

    @property
    def _xi_effective(self):
        return 0.0 if self.power_of_two else self.xi

    def forward(self, x=None):
        p = self.params
        if self.per_example:
            w, self._cache = F.dselect_k_per_example_forward(self._input(x), p["G"], p["b_G"], p["W"], p["b_W"],
                                                             self.n_experts, self.gamma)
        else:
            w, self._cache = F.dselect_k_forward(p["alpha"], p["Z"], self.n_experts, self.gamma)
        self._last_w = w
        return w

    def backward(self, dw, need_dx=True):
        """Accumulates the gradients of <dw, w> + lambda * Omega + xi * penalty; returns dx (None
        for a static gate or without ``need_dx``)."""
        self._need_forward()
        lam, xi = self.entropy_reg, self._xi_effective
        if self.per_example:
            g = F.dselect_k_per_example_backward(dw, self._cache, lam, xi, self.eps, need_dx=need_dx)
            for name in ("G", "b_G", "W", "b_W"):
                self._accumulate(name, g[name])
            return g["x"]
        dalpha, dZ = F.dselect_k_backward(dw, self._cache, lam, xi, self.eps)
        self._accumulate("alpha", dalpha)
        self._accumulate("Z", dZ)
        return None

    def _gate_cache(self):
        self._need_forward()
        return self._cache.gate if self.per_example else self._cache

    def regularization(self):
        """lambda * Omega + xi * penalty at the last forward (batch means)."""
        omega, penalty = F.dselect_k_regularization(self._gate_cache(), self.eps)
        return self.entropy_reg * omega + self._xi_effective * penalty

    def selector_outputs(self):
        """r(S(z^(i))) of the last forward: (k, n) static, (B, k, n) per example."""
        r = self._gate_cache().r
        return r[0] if not self.per_example else r

    def is_binary(self):
        """True when every entry of S(Z) at the last forward is exactly 0 or 1 (for a per-example
        gate: for every example of the last batch). From then on at most k experts are selected
        and Z receives no gradient."""
        sz = self._gate_cache().sz
        return bool(np.all((sz == 0) | (sz == 1)))

    def binary_fraction(self):
        """Fraction of the entries of S(Z) that are exactly 0 or 1 at the last forward."""
        sz = self._gate_cache().sz
        return float(np.mean((sz == 0) | (sz == 1)))


class StaticDSelectKBank:
    """T static DSelect-k gates of one configuration (an MMoE's task gates) evaluated together.

    ``forward()`` stacks every gate's alpha (k,) and Z (k, m) into alpha (T, k), Z (T, k, m) and runs
    the batched kernel once, giving the (T, n) weights; ``backward(dw)`` takes dw (T, n) and
    accumulates into each gate's ``grads`` exactly what ``gate.backward(dw[t])`` would. Each gate's
    cache and last weights are set as views, so its diagnostics (``is_binary``,
    ``selected_experts``, ``regularization``) work as after its own forward. One kernel call
    instead of T keeps a 128-task model from being bound by per-gate Python overhead.

    The kernel averages the regularizers over its batch dimension, here the T gates; lambda and xi
    are therefore passed multiplied by T, so each gate's gradient gets its own full regularizer.
    """

    def __init__(self, gates):
        gates = list(gates)
        if not gates:
            raise ValueError("StaticDSelectKBank needs at least one gate")
        first = gates[0]
        for g in gates:
            if not isinstance(g, DSelectKGate) or g.per_example:
                raise TypeError(f"StaticDSelectKBank takes static DSelectKGate objects, got {g!r}")
            if (g._config(), g.eps, g.dtype) != (first._config(), first.eps, first.dtype):
                raise ValueError(f"the gates of a StaticDSelectKBank must share one configuration: {g!r} vs {first!r}")
        self.gates = gates
        self._cache = None

    @classmethod
    def applies_to(cls, gates):
        """True when ``gates`` are static DSelect-k gates of one configuration."""
        gates = list(gates)
        return bool(gates) and all(isinstance(g, DSelectKGate) and not g.per_example and
                                   (g._config(), g.eps, g.dtype) == (gates[0]._config(), gates[0].eps, gates[0].dtype)
                                   for g in gates)

    def forward(self):
        first = self.gates[0]
        alpha = np.stack([g.params["alpha"] for g in self.gates])  # (T, k)
        Z = np.stack([g.params["Z"] for g in self.gates])  # (T, k, m)
        w, cache = F.dselect_k_forward(alpha, Z, first.n_experts, first.gamma)  # w (T, n)
        for t, g in enumerate(self.gates):
            g._cache = F.DSelectKCache(cache.sigma[t:t + 1], cache.sz[t:t + 1], cache.r[t:t + 1], cache.Z[t:t + 1],
                                       cache.gamma, True)
            g._last_w = w[t]
        self._cache = cache
        return w

    def backward(self, dw):
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")
        first, T = self.gates[0], len(self.gates)
        dalpha, dZ = F.dselect_k_backward(dw, self._cache, first.entropy_reg * T, first._xi_effective * T,
                                          first.eps)
        for t, g in enumerate(self.gates):
            g.grads["alpha"] += dalpha[t]
            g.grads["Z"] += dZ[t]

    def regularization(self):
        """Sum over the gates of lambda * Omega + xi * penalty at the last forward."""
        if self._cache is None:
            raise RuntimeError("regularization() called before forward()")
        first, T = self.gates[0], len(self.gates)
        omega, penalty = F.dselect_k_regularization(self._cache, first.eps)  # means over the T gates
        return T * (first.entropy_reg * omega + first._xi_effective * penalty)


class TopKGate(_Gate):
    """Top-k gate (Shazeer et al. 2017): w = softmax(KeepTopK(a, k)), with a = logits (a parameter
    vector of n entries, static) or a = A x + b (per example). Gradients flow through the k kept
    entries only. ``noisy=True`` adds, at training time only, N(0, 1) * softplus(A_noise x + b_noise)
    to the per-example logits (seeded by ``seed``); call ``train(False)`` for evaluation.
    Initialization: A uniform in (-0.05, 0.05), b and the static logits 0 (ties are broken toward
    the lower index, so a fresh static gate picks experts 0..k-1), A_noise and b_noise 0."""

    def __init__(self, n_experts, k, per_example=False, input_dim=None, noisy=False, seed=None,
                 dtype=np.float64):
        n, k, input_dim, dtype = _check_common(n_experts, k, per_example, input_dim, dtype)
        if noisy and not per_example:
            raise ValueError("noisy=True needs per_example=True (the noise scale is a function of x)")
        self.n_experts, self.k, self.per_example, self.input_dim, self.dtype = n, k, bool(per_example), input_dim, dtype
        self.noisy, self.training = bool(noisy), True
        self._rng = _rng(seed)
        self.params = _logits_params(self._rng, n, self.per_example, input_dim, dtype)
        if self.noisy:
            self.params["A_noise"] = np.zeros((n, input_dim), dtype)
            self.params["b_noise"] = np.zeros(n, dtype)
        self.grads = {name: np.zeros_like(v) for name, v in self.params.items()}
        self._cache = None
        self._last_w = None

    def _config(self):
        return dict(n_experts=self.n_experts, k=self.k, per_example=self.per_example, input_dim=self.input_dim,
                    noisy=self.noisy)

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def forward(self, x=None):
        p = self.params
        if not self.per_example:
            w = F.top_k(p["logits"], self.k)
            self._cache = (w,)
        else:
            x = self._input(x)
            logits = F.linear(x, p["A"], p["b"])
            noise = None
            if self.noisy and self.training:
                raw = F.linear(x, p["A_noise"], p["b_noise"])
                normal = self._rng.standard_normal(raw.shape).astype(self.dtype)
                logits = F.noisy_logits(logits, raw, normal)
                noise = (raw, normal)
            w = F.top_k(logits, self.k)
            self._cache = (w, x, noise)
        self._last_w = w
        return w

    def backward(self, dw, need_dx=True):
        self._need_forward()
        w = self._cache[0]
        dlogits = F.top_k_backward(dw, w)
        if not self.per_example:
            self._accumulate("logits", dlogits)
            return None
        _, x, noise = self._cache
        p = self.params
        dx, dA, db = F.linear_backward(dlogits, x, p["A"], need_dx=need_dx)
        self._accumulate("A", dA)
        self._accumulate("b", db)
        if noise is not None:
            raw, normal = noise
            _, draw = F.noisy_logits_backward(dlogits, raw, normal)
            dxn, dAn, dbn = F.linear_backward(draw, x, p["A_noise"], need_dx=need_dx)
            self._accumulate("A_noise", dAn)
            self._accumulate("b_noise", dbn)
            dx = dx + dxn if need_dx else None
        return dx

    def regularization(self):
        return 0.0


class SoftmaxGate(_Gate):
    """Dense softmax gate (Jordan and Jacobs): w = softmax(a), a = logits (static) or A x + b (per
    example). All experts get nonzero weight. Initialization: A uniform in (-0.05, 0.05), b and the
    static logits 0 (uniform weights)."""

    def __init__(self, n_experts, per_example=False, input_dim=None, seed=None, dtype=np.float64):
        n, _, input_dim, dtype = _check_common(n_experts, None, per_example, input_dim, dtype)
        self.n_experts, self.per_example, self.input_dim, self.dtype = n, bool(per_example), input_dim, dtype
        self.params = _logits_params(_rng(seed), n, self.per_example, input_dim, dtype)
        self.grads = {name: np.zeros_like(v) for name, v in self.params.items()}
        self._cache = None
        self._last_w = None

    def _config(self):
        return dict(n_experts=self.n_experts, per_example=self.per_example, input_dim=self.input_dim)

    def forward(self, x=None):
        p = self.params
        if not self.per_example:
            w = F.softmax(p["logits"])
            self._cache = (w,)
        else:
            x = self._input(x)
            w = F.softmax(F.linear(x, p["A"], p["b"]))
            self._cache = (w, x)
        self._last_w = w
        return w

    def backward(self, dw, need_dx=True):
        self._need_forward()
        dlogits = F.softmax_backward(dw, self._cache[0])
        if not self.per_example:
            self._accumulate("logits", dlogits)
            return None
        dx, dA, db = F.linear_backward(dlogits, self._cache[1], self.params["A"], need_dx=need_dx)
        self._accumulate("A", dA)
        self._accumulate("b", db)
        return dx

    def regularization(self):
        return 0.0


class SoftmaxSelectorGate(_Gate):
    """The ablation gate of Appendix C.2 (static): w = sum_{i<=k} softmax(alpha)_i softmax(beta^(i) / T),
    each binary-encoded selector replaced by a softmax over the n experts.

    Two ways to push each softmax toward one-hot, as in the paper: ``entropy_reg`` (lambda times
    the summed entropy of the k softmaxes: Ablation (Entropy)) or temperature annealing
    (``set_temperature`` from a schedule, e.g. :meth:`annealed_temperature`: Ablation (Annealing)).
    Initialization: alpha uniform in (-0.05, 0.05), beta uniform in (-0.05, 0.05) * T so that
    the softmaxes start near uniform but not tied."""

    def __init__(self, n_experts, k, temperature=1.0, entropy_reg=0.0, eps=1e-6, seed=None, dtype=np.float64):
        n, k, _, dtype = _check_common(n_experts, k, False, None, dtype)
        self.n_experts, self.k, self.per_example, self.dtype = n, k, False, dtype
        self.set_temperature(temperature)
        if not np.isfinite(entropy_reg) or entropy_reg < 0:
            raise ValueError(f"entropy_reg must be a finite number >= 0, got {entropy_reg}")
        self.entropy_reg, self.eps = float(entropy_reg), float(eps)
        rng = _rng(seed)
        self.params = {"alpha": rng.uniform(-0.05, 0.05, (k,)).astype(dtype),
                       "beta": (rng.uniform(-0.05, 0.05, (k, n)) * self.temperature).astype(dtype)}
        self.grads = {name: np.zeros_like(v) for name, v in self.params.items()}
        self._cache = None
        self._last_w = None

    def _config(self):
        return dict(n_experts=self.n_experts, k=self.k, temperature=self.temperature, entropy_reg=self.entropy_reg)

    def set_temperature(self, T):
        if not np.isfinite(T) or T <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {T}")
        self.temperature = float(T)

    @staticmethod
    def annealed_temperature(step, total_steps, start, end=1e-16):
        """The paper's schedule: temperatures evenly spaced on a log scale from start to end."""
        frac = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
        return float(np.exp(np.log(start) + frac * (np.log(end) - np.log(start))))

    def forward(self, x=None):
        w, self._cache = F.softmax_selector_forward(self.params["alpha"], self.params["beta"], self.temperature)
        self._last_w = w
        return w

    def backward(self, dw, need_dx=True):
        self._need_forward()
        dalpha, dbeta = F.softmax_selector_backward(dw, self._cache, self.entropy_reg, self.eps)
        self._accumulate("alpha", dalpha)
        self._accumulate("beta", dbeta)
        return None

    def regularization(self):
        self._need_forward()
        return self.entropy_reg * F.softmax_selector_entropy(self._cache, self.eps)
