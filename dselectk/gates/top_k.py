"""The Top-k gate (Shazeer et al. 2017), static, per-example and noisy."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .. import functional as F
from ..layers import standard_normal
from ._base import GateSpec, Seed, _check_common, _flag, _Gate, _logits_params, _rng, register

__all__ = ["TopK", "TopKGate"]


class TopKGate(_Gate):
    """Top-k gate (Shazeer et al. 2017): w = softmax(KeepTopK(a, k)), with a = logits (a parameter
    vector of n entries, static) or a = A x + b (per example). Gradients flow through the k kept
    entries only. ``noisy=True`` adds, at training time only, N(0, 1) * softplus(A_noise x + b_noise)
    to the per-example logits (seeded by ``seed``); call ``train(False)`` for evaluation.
    Initialization: A uniform in (-0.05, 0.05), b and the static logits 0 (ties are broken toward
    the lower index, so a fresh static gate picks experts 0..k-1), A_noise and b_noise 0."""

    def __init__(self, n_experts: int, k: int, per_example: bool = False, input_dim: int | None = None,
                 noisy: bool = False, seed: Seed = None, dtype: DTypeLike = np.float32) -> None:
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
                normal = standard_normal(self._rng, raw.shape, self.dtype)  # by the rows' place in the batch
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

    def onnx_weights(self, graph: Any, x: str) -> Any:
        """Static: the weights as constants (the base class). Per example: a = x A^T + b (one
        Gemm), TopK, softmax of the k kept logits, scattered into zeros (B, n). The noise is a
        training-time term and is not exported; ties are broken toward the lower index, as here."""
        if not self.per_example:
            return super().onnx_weights(graph, x)
        logits = graph.linear(x, self.params["A"], self.params["b"], "top_k_logits")  # (B, n)
        kept, index = graph.op("TopK", logits, graph.const(np.array([self.k], np.int64), "k"), outputs=2, axis=-1)
        return graph.op("ScatterElements", graph.zeros_like(logits), index, graph.op("Softmax", kept, axis=-1),
                        axis=1, hint="top_k_w")


@register
@dataclasses.dataclass(frozen=True)
class TopK(GateSpec):
    """Spec of :class:`TopKGate`: ``gate=TopK(k=2, per_example=True, noisy=True)`` in a model.

    k : experts kept; per_example : logits A x + b instead of a parameter vector; noisy : the
    trainable Gaussian noise on the per-example logits at training time (needs per_example)."""

    kind = "top_k"
    k: int = 2
    _: dataclasses.KW_ONLY
    per_example: bool = False
    noisy: bool = False

    def _check(self):
        checked = dict(k=F._int(self.k, "k", 1), per_example=_flag(self.per_example, "per_example"),
                       noisy=_flag(self.noisy, "noisy"))
        if checked["noisy"] and not checked["per_example"]:
            raise ValueError("noisy=True needs per_example=True (the noise scale is a function of x)")
        return checked

    def build(self, n_experts: int, input_dim: int | None = None, rng: Seed = None,
              dtype: DTypeLike = np.float32) -> TopKGate:
        return TopKGate(n_experts, self.k, per_example=self.per_example, input_dim=input_dim, noisy=self.noisy,
                        seed=rng, dtype=dtype)
