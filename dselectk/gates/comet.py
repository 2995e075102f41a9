"""The COMET gate (Ibrahim et al., KDD 2023): k soft binary trees over the experts."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .. import functional as F
from ._base import GateSpec, Seed, _check_common, _flag, _Gate, _in_dtype, _number, _rng, register

__all__ = ["Comet", "CometGate"]


class CometGate(_Gate):
    """COMET: k heap-indexed soft trees over the n experts (``dselectk.functional.comet_forward``).

    Internal node v of tree t sends s = S(z_{t,v}; gamma) of its reach to its left child and
    1 - s to its right; expert j is the j-th leaf in left-first depth-first order, reached with
    p_{t,j} (the product along its path). One softmax over all k n scores a_{t,j} + log p_{t,j}
    gives g, and w_j = sum_t g_{t,j}. A leaf with p = 0 has weight exactly 0, so once every node is
    saturated (S = 0 or 1) each tree reaches one leaf and at most k experts are selected; that is
    what the models' conditional computation skips.

    Parameters
    ----------
    n_experts : int, n >= 2 (any n: for n not a power of two the tree is unbalanced, no padding).
    k : int, 1 <= k <= n: the number of trees.
    gamma : float > 0, smooth-step width.
    entropy_reg : float >= 0, lambda of the regularizer sum_t h(p_t), h(p) = -sum_j p_j log(p_j +
        eps), the entropy of each tree's leaf-reach distribution, averaged over the batch: it
        pushes each tree toward one leaf.
    per_example : False for the static gate (leaf logits A (k, n) and node logits Z (k, n - 1) are
        parameters), True for a = U x + b_U and z = W x + b_W (U (k, n, p), W (k, n - 1, p)).
    input_dim : p, the size of x (per-example gates only).
    eps : float > 0, the epsilon inside the entropy's log.
    seed : int or numpy Generator for the initialization, the authors': node maps (Z, or W and b_W)
        uniform in (-gamma/100, gamma/100), so that every s starts near 1/2 and has a gradient,
        leaf maps (A, or U and b_U) uniform in (-0.05, 0.05).
    dtype : float32 (the default, as for models) or float64.
    """

    def __init__(self, n_experts: int, k: int, gamma: float = 1.0, entropy_reg: float = 0.0, per_example: bool = False,
                 input_dim: int | None = None, eps: float = 1e-6, seed: Seed = None,
                 dtype: DTypeLike = np.float32) -> None:
        n, k, input_dim, dtype = _check_common(n_experts, k, per_example, input_dim, dtype)
        self.gamma = _number(gamma, "gamma", strict=True)
        self.entropy_reg = _number(entropy_reg, "entropy_reg")
        self.eps = _number(eps, "eps", strict=True)
        _in_dtype(self.gamma, "gamma", dtype)
        self.n_experts, self.k = n, k
        self.per_example, self.input_dim, self.dtype = bool(per_example), input_dim, dtype
        rng = _rng(seed)
        zr = self.gamma / 100
        if self.per_example:
            p = input_dim
            self.params = {
                "U": rng.uniform(-0.05, 0.05, (k, n, p)).astype(dtype),
                "b_U": rng.uniform(-0.05, 0.05, (k, n)).astype(dtype),
                "W": rng.uniform(-zr, zr, (k, n - 1, p)).astype(dtype),
                "b_W": rng.uniform(-zr, zr, (k, n - 1)).astype(dtype),
            }
        else:
            self.params = {
                "A": rng.uniform(-0.05, 0.05, (k, n)).astype(dtype),
                "Z": rng.uniform(-zr, zr, (k, n - 1)).astype(dtype),
            }
        self.grads = {name: np.zeros_like(v) for name, v in self.params.items()}
        self._cache = None
        self._last_w = None

    def _config(self):
        return dict(n_experts=self.n_experts, k=self.k, gamma=self.gamma, entropy_reg=self.entropy_reg,
                    per_example=self.per_example, input_dim=self.input_dim)

    def forward(self, x=None):
        p = self.params
        if self.per_example:
            w, self._cache = F.comet_per_example_forward(self._input(x), p["U"], p["b_U"], p["W"], p["b_W"],
                                                         self.gamma)
        else:
            w, self._cache = F.comet_forward(p["A"], p["Z"], self.gamma)
        self._last_w = w
        return w

    def backward(self, dw, need_dx=True):
        """Accumulates the gradients of <dw, w> + lambda * (the leaf-reach entropy); returns dx
        (None for a static gate or without ``need_dx``)."""
        self._need_forward()
        if self.per_example:
            g = F.comet_per_example_backward(dw, self._cache, self.entropy_reg, self.eps, need_dx=need_dx)
            for name in ("U", "b_U", "W", "b_W"):
                self._accumulate(name, g[name])
            return g["x"]
        dA, dZ = F.comet_backward(dw, self._cache, self.entropy_reg, self.eps)
        self._accumulate("A", dA)
        self._accumulate("Z", dZ)
        return None

    def onnx_weights(self, graph: Any, x: str) -> Any:
        """Static: the weights as constants (the base class). Per example, as ONNX operators on x
        (B, p): a = x U^T + b_U and z = x W^T + b_W (two Gemms); s = v^2 (3 - 2v) with
        v = clip(z / gamma + 1/2, 0, 1); each leaf's reach the product along its path of one
        Gather from [s | 1 - s | 1] (the 1s pad the shorter paths); then the one softmax over the
        k n scores as p exp(a - max) / sum (exp(-inf) = 0 where p = 0) and w = its sum over trees."""
        if not self.per_example:
            return super().onnx_weights(graph, x)
        p, k, n = self.params, self.k, self.n_experts
        a = graph.reshape(graph.linear(x, p["U"].reshape(k * n, -1), p["b_U"].reshape(-1), "comet_a"), [-1, k, n])
        z = graph.linear(x, p["W"].reshape(k * (n - 1), -1), p["b_W"].reshape(-1), "comet_z")  # (B, k (n - 1))
        v = graph.op("Add", graph.op("Mul", z, graph.const(1 / self.gamma, "inv_gamma")), graph.const(0.5, "half"))
        v = graph.op("Clip", v, graph.const(0.0, "zero"), graph.const(1.0, "one"))
        s = graph.op("Mul", graph.op("Mul", v, v), graph.op("Sub", graph.const(3.0, "three"), graph.op("Add", v, v)))
        s = graph.reshape(s, [-1, k, n - 1], "comet_s")  # (B, k, n - 1)
        ones = graph.op("Add", graph.zeros_like(s), graph.const(1.0, "one"))
        factors = graph.op("Concat", s, graph.op("Sub", graph.const(1.0, "one"), s), ones, axis=2)  # (B, k, 3 (n - 1))
        # leaf j's path: node v going left reads column v (s), going right column n - 1 + v (1 - s)
        _, paths = _leaf_paths(n)
        depth = max(len(path) for path in paths)
        index = np.full((n, depth), 2 * (n - 1), np.int64)  # padding: a column of ones
        for j, path in enumerate(paths):
            for d, (node, left) in enumerate(path):
                index[j, d] = node if left else n - 1 + node
        reach = graph.op("ReduceProd", graph.op("Gather", factors, graph.const(index, "comet_paths"), axis=2),
                         axes=[3], keepdims=0, hint="comet_reach")  # (B, k, n)
        reached = graph.op("Greater", reach, graph.const(0.0, "zero"))
        minus_inf = graph.const(-np.inf, "minus_inf")
        shift = graph.op("ReduceMax", graph.op("Where", reached, a, minus_inf), axes=[1, 2], keepdims=1)
        e = graph.op("Mul", reach, graph.op("Exp", graph.op("Where", reached, graph.op("Sub", a, shift), minus_inf)))
        axes = graph.const(np.array([1, 2], np.int64), "comet_axes")
        g = graph.op("Div", e, graph.op("ReduceSum", e, axes, keepdims=1))
        return graph.op("ReduceSum", g, graph.const(np.array([1], np.int64), "tree_axis"), keepdims=0,
                        hint="comet_w")  # (B, n)

    def _gate_cache(self):
        cache = self._last_forward()[1]
        return cache.gate if self.per_example else cache

    def regularization(self):
        """lambda * sum_t h(p_t) at the last forward (a batch mean)."""
        return self.entropy_reg * F.comet_regularization(self._gate_cache(), self.eps)

    def leaf_reach(self):
        """p of the last forward, each tree's reach of each expert's leaf: (k, n) static, (B, k, n)
        per example. Rows sum to 1; a saturated tree's row is one-hot."""
        reach = self._gate_cache().reach
        return reach if self.per_example else reach[0]

    def is_binary(self):
        """True when, at the last forward, every tree reaches exactly one leaf (per example: for
        every example of the last batch): every node with a nonzero reach has S(z) exactly 0 or 1,
        so the leaf reaches are 0 or 1, at most k experts are selected and the node logits get no
        gradient. The nodes below a reach of 0 need not be saturated, and never become so: no
        gradient reaches them (the ~0.5 of a fresh gate stays there), which is why this is not
        "every S(z) is 0 or 1" as for DSelect-k."""
        reach = self._gate_cache().reach
        return bool(np.all((reach == 0) | (reach == 1)))

    def binary_fraction(self):
        """Fraction of the nodes with a nonzero reach whose S(z) is exactly 0 or 1 at the last forward
        (1.0 exactly when :meth:`is_binary`)."""
        cache = self._gate_cache()
        reached = cache.reach_int > 0
        saturated = (cache.sz == 0) | (cache.sz == 1)
        return float(np.count_nonzero(saturated & reached) / np.count_nonzero(reached))


def _leaf_paths(n):
    """(leaf nodes, paths): expert j's leaf (left-first depth-first order) and its root-to-leaf path
    as [(internal node, goes left)], in the heap tree over n experts."""
    leaves, paths, stack = [], [], [(0, [])]
    while stack:
        node, path = stack.pop()
        if node >= n - 1:
            leaves.append(node)
            paths.append(path)
        else:  # right pushed first: the left subtree is visited first
            stack.append((2 * node + 2, path + [(node, False)]))
            stack.append((2 * node + 1, path + [(node, True)]))
    return leaves, paths


@register
@dataclasses.dataclass(frozen=True)
class Comet(GateSpec):
    """Spec of :class:`CometGate`: ``gate=Comet(k=2, gamma=1.0, entropy_reg=0.1)`` in a model.

    k : trees (at most k experts once every node is saturated); gamma : smooth-step width;
    entropy_reg : lambda of the leaf-reach entropy; per_example : node and leaf logits linear
    functions of the input."""

    kind = "comet"
    k: int = 2
    _: dataclasses.KW_ONLY
    gamma: float = 1.0
    entropy_reg: float = 0.0
    per_example: bool = False

    def _check(self):
        return dict(k=F._int(self.k, "k", 1), gamma=_number(self.gamma, "gamma", strict=True),
                    entropy_reg=_number(self.entropy_reg, "entropy_reg"),
                    per_example=_flag(self.per_example, "per_example"))

    def build(self, n_experts: int, input_dim: int | None = None, rng: Seed = None,
              dtype: DTypeLike = np.float32) -> CometGate:
        return CometGate(n_experts, self.k, gamma=self.gamma, entropy_reg=self.entropy_reg,
                         per_example=self.per_example, input_dim=input_dim, seed=rng, dtype=dtype)
