"""The dense softmax gate (Jordan and Jacobs)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .. import functional as F
from ._base import GateSpec, Seed, _check_common, _flag, _Gate, _logits_params, _rng, register

__all__ = ["Softmax", "SoftmaxGate"]


class SoftmaxGate(_Gate):
    """Dense softmax gate (Jordan and Jacobs): w = softmax(a), a = logits (static) or A x + b (per
    example). All experts get nonzero weight. Initialization: A uniform in (-0.05, 0.05), b and the
    static logits 0 (uniform weights)."""

    def __init__(self, n_experts: int, per_example: bool = False, input_dim: int | None = None, seed: Seed = None,
                 dtype: DTypeLike = np.float32) -> None:
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

    def onnx_weights(self, graph: Any, x: str) -> Any:
        """Static: the weights as constants (the base class). Per example: softmax(x A^T + b)."""
        if not self.per_example:
            return super().onnx_weights(graph, x)
        return graph.op("Softmax", graph.linear(x, self.params["A"], self.params["b"], "softmax_logits"), axis=-1,
                        hint="softmax_w")


@register
@dataclasses.dataclass(frozen=True)
class Softmax(GateSpec):
    """Spec of :class:`SoftmaxGate`: ``gate=Softmax(per_example=True)`` in a model (dense: every
    expert gets a nonzero weight)."""

    kind = "softmax"
    _: dataclasses.KW_ONLY
    per_example: bool = False

    def _check(self):
        return dict(per_example=_flag(self.per_example, "per_example"))

    def build(self, n_experts: int, input_dim: int | None = None, rng: Seed = None,
              dtype: DTypeLike = np.float32) -> SoftmaxGate:
        return SoftmaxGate(n_experts, per_example=self.per_example, input_dim=input_dim, seed=rng, dtype=dtype)
