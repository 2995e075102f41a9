"""Shared gate plumbing: argument checks, initialisation helpers and the :class:`_Gate` base."""
from __future__ import annotations

import numpy as np

from .. import functional as F

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
