"""The ablation gate of the DSelect-k paper's Appendix C.2: binary-encoded selectors replaced by softmaxes."""
from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import DTypeLike

from .. import functional as F
from ._base import GateSpec, Seed, _check_common, _Gate, _in_dtype, _number, _rng, register

__all__ = ["SoftmaxSelector", "SoftmaxSelectorGate"]


class SoftmaxSelectorGate(_Gate):
    """The ablation gate of Appendix C.2 (static): w = sum_{i<=k} softmax(alpha)_i softmax(beta^(i) / T),
    each binary-encoded selector replaced by a softmax over the n experts.

    Two ways to push each softmax toward one-hot, as in the paper: ``entropy_reg`` (lambda times
    the summed entropy of the k softmaxes: Ablation (Entropy)) or temperature annealing
    (``set_temperature`` from a schedule, e.g. :meth:`annealed_temperature`: Ablation (Annealing)).
    Initialization: alpha uniform in (-0.05, 0.05), beta uniform in (-0.05, 0.05) * T so that
    the softmaxes start near uniform but not tied."""

    def __init__(self, n_experts: int, k: int, temperature: float = 1.0, entropy_reg: float = 0.0, eps: float = 1e-6,
                 seed: Seed = None, dtype: DTypeLike = np.float32) -> None:
        n, k, _, dtype = _check_common(n_experts, k, False, None, dtype)
        self.n_experts, self.k, self.per_example, self.dtype = n, k, False, dtype
        self.set_temperature(temperature)
        _number(entropy_reg, "entropy_reg")
        self.entropy_reg, self.eps = float(entropy_reg), _number(eps, "eps", strict=True)
        rng = _rng(seed)
        self.params = {"alpha": rng.uniform(-0.05, 0.05, (k,)).astype(dtype),
                       "beta": (rng.uniform(-0.05, 0.05, (k, n)) * self.temperature).astype(dtype)}
        self.grads = {name: np.zeros_like(v) for name, v in self.params.items()}
        self._cache = None
        self._last_w = None

    def _config(self):
        return dict(n_experts=self.n_experts, k=self.k, temperature=self.temperature, entropy_reg=self.entropy_reg)

    def set_temperature(self, T):
        _number(T, "temperature", strict=True)
        _in_dtype(T, "temperature", self.dtype)
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
        return self.entropy_reg * F.softmax_selector_entropy(self._last_forward()[1], self.eps)


@register
@dataclasses.dataclass(frozen=True)
class SoftmaxSelector(GateSpec):
    """Spec of :class:`SoftmaxSelectorGate` (static only): ``gate=SoftmaxSelector(k=4,
    temperature=1.0, entropy_reg=0.1)`` in a model.

    k : selectors; temperature : T of softmax(beta / T) at the start (annealed by
    :class:`~dselectk.trainer.AnnealTemperature`); entropy_reg : lambda of the selectors' entropy."""

    kind = "softmax_selector"
    k: int = 2
    _: dataclasses.KW_ONLY
    temperature: float = 1.0
    entropy_reg: float = 0.0

    def _check(self):
        return dict(k=F._int(self.k, "k", 1), temperature=_number(self.temperature, "temperature", strict=True),
                    entropy_reg=_number(self.entropy_reg, "entropy_reg"))

    def build(self, n_experts: int, input_dim: int | None = None, rng: Seed = None,
              dtype: DTypeLike = np.float32) -> SoftmaxSelectorGate:
        return SoftmaxSelectorGate(n_experts, self.k, temperature=self.temperature, entropy_reg=self.entropy_reg,
                                   seed=rng, dtype=dtype)
