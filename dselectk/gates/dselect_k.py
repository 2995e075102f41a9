"""The DSelect-k gate (static and per-example) and the batched bank of static DSelect-k gates."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np
from numpy.typing import DTypeLike

from .. import functional as F
from ._base import GateSpec, Seed, _check_common, _flag, _Gate, _in_dtype, _number, _rng, register

__all__ = ["DSelectK", "DSelectKGate", "StaticDSelectKBank"]


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
    dtype : float32 (the default, as for models) or float64.
    """

    def __init__(self, n_experts: int, k: int, gamma: float = 1.0, entropy_reg: float = 0.0, xi: float = 1.0,
                 per_example: bool = False, input_dim: int | None = None, eps: float = 1e-6, seed: Seed = None,
                 dtype: DTypeLike = np.float32) -> None:
        n, k, input_dim, dtype = _check_common(n_experts, k, per_example, input_dim, dtype)
        for name, value, strict in (("gamma", gamma, True), ("entropy_reg", entropy_reg, False),
                                    ("xi", xi, False), ("eps", eps, True)):
            _number(value, name, strict=strict)  # TypeError / ValueError naming it, 10**400 included
        _in_dtype(gamma, "gamma", dtype)
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

    def onnx_weights(self, graph: Any, x: str) -> Any:
        """Static: the weights as constants (the base class). Per example, eq. (6) as ONNX
        operators on x (B, p): alpha = x G^T + b_G and Z = x W^T + b_W (two Gemms), S(Z) =
        v^2 (3 - 2 v) with v = clip(Z / gamma + 1/2, 0, 1) (the smooth-step, exactly 0 and 1 outside
        (-gamma/2, gamma/2)), r(S) as the products over the bits of one Gather from [1 - S | S], and
        w = softmax(alpha) r, one batched MatMul."""
        if not self.per_example:
            return super().onnx_weights(graph, x)
        p, k, m, n = self.params, self.k, self.m, self.n_experts
        alpha = graph.linear(x, p["G"], p["b_G"], "dselect_k_alpha")  # (B, k)
        sigma = graph.reshape(graph.op("Softmax", alpha, axis=-1), [-1, 1, k], "dselect_k_sigma")  # (B, 1, k)
        z = graph.linear(x, p["W"].reshape(k * m, -1), p["b_W"].reshape(-1), "dselect_k_z")  # (B, k m)
        v = graph.op("Add", graph.op("Mul", z, graph.const(1 / self.gamma, "inv_gamma")), graph.const(0.5, "half"))
        v = graph.op("Clip", v, graph.const(0.0, "zero"), graph.const(1.0, "one"))
        s = graph.op("Mul", graph.op("Mul", v, v), graph.op("Sub", graph.const(3.0, "three"),
                                                             graph.op("Add", v, v)), hint="dselect_k_sz")
        s = graph.reshape(s, [-1, k, m], "dselect_k_s")  # (B, k, m)
        both = graph.op("Concat", graph.op("Sub", graph.const(1.0, "one"), s), s, axis=2)  # (B, k, 2m): [1 - s | s]
        # r_j = prod_b (s_b if bit b of j is set else 1 - s_b): column b + m * bit_b(j) of [1 - s | s]
        bits = (np.arange(n)[:, None] >> np.arange(m)[None, :]) & 1  # (n, m)
        picked = graph.op("Gather", both, graph.const(np.arange(m)[None, :] + m * bits, "selector_index"), axis=2)
        r = graph.op("ReduceProd", picked, axes=[3], keepdims=0, hint="dselect_k_r")  # (B, k, n)
        return graph.reshape(graph.op("MatMul", sigma, r), [-1, n], "dselect_k_w")

    def _gate_cache(self):
        cache = self._last_forward()[1]
        return cache.gate if self.per_example else cache

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

    def __init__(self, gates: Iterable[DSelectKGate]) -> None:
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


@register
@dataclasses.dataclass(frozen=True)
class DSelectK(GateSpec):
    """Spec of :class:`DSelectKGate`: ``gate=DSelectK(k=2, gamma=1.0, entropy_reg=0.1)`` in a model.

    k : selectors (at most k experts once S(Z) is binary); gamma : smooth-step width; entropy_reg :
    lambda of the entropy regularizer; xi : the Appendix B.2 penalty's coefficient (n not a power
    of two); per_example : alpha and Z functions of the input (Section 3.2)."""

    kind = "dselect_k"
    k: int = 2
    _: dataclasses.KW_ONLY
    gamma: float = 1.0
    entropy_reg: float = 0.0
    xi: float = 1.0
    per_example: bool = False

    def _check(self):
        return dict(k=F._int(self.k, "k", 1), gamma=_number(self.gamma, "gamma", strict=True),
                    entropy_reg=_number(self.entropy_reg, "entropy_reg"), xi=_number(self.xi, "xi"),
                    per_example=_flag(self.per_example, "per_example"))

    def build(self, n_experts: int, input_dim: int | None = None, rng: Seed = None,
              dtype: DTypeLike = np.float32) -> DSelectKGate:
        return DSelectKGate(n_experts, self.k, gamma=self.gamma, entropy_reg=self.entropy_reg, xi=self.xi,
                            per_example=self.per_example, input_dim=input_dim, seed=rng, dtype=dtype)
