"""Layers in the cs231n style, with the C kernels of dselectk.functional doing the work.

Every layer holds ``params`` and ``grads`` (dicts of arrays with the same keys; empty for
parameter-free layers). ``forward(x, training)`` caches what the backward needs;
``backward(dout)`` accumulates the parameter gradients into ``grads`` and returns the input
gradient. Models later move all ``params`` / ``grads`` into two contiguous slabs
(:class:`ParameterSlab`) so that one optimizer call updates everything.
"""
from __future__ import annotations

import numpy as np

from . import functional as F

__all__ = ["Dense", "ReLU", "Dropout", "SumUnits", "MLP", "ParameterSlab", "glorot_uniform"]


def glorot_uniform(rng, fan_in, fan_out, dtype):
    """Glorot/Xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (the Keras default, as in
    the paper's TensorFlow models)."""
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, (fan_in, fan_out)).astype(dtype)


class Dense:
    """y = x W + b, W (in_dim, out_dim) Glorot-uniform, b zeros."""

    def __init__(self, in_dim, out_dim, rng, dtype=np.float32):
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.params = {"W": glorot_uniform(rng, self.in_dim, self.out_dim, dtype), "b": np.zeros(self.out_dim, dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x = None

    def forward(self, x, training=False):
        self._x = x
        return F.dense_forward(x, self.params["W"], self.params["b"])

    def backward(self, dout, need_dx=True):
        return F.dense_backward(dout, self._x, self.params["W"], self.grads["W"], self.grads["b"], need_dx=need_dx)


class ReLU:
    def __init__(self):
        self.params, self.grads, self._y = {}, {}, None

    def forward(self, x, training=False):
        self._y = F.relu_forward(x)
        return self._y

    def backward(self, dout, need_dx=True):
        return F.relu_backward(dout, self._y)


class Dropout:
    """Inverted dropout: at training time each entry is kept with probability 1 - rate and scaled
    by 1 / (1 - rate); the identity at evaluation. The mask is a counter-based hash of
    (seed, step, index), recomputed in the backward rather than stored, so runs are reproducible
    and independent of the thread count."""

    def __init__(self, rate, seed):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate, self.seed, self.step = float(rate), int(seed), 0
        self.params, self.grads, self._training = {}, {}, False

    def forward(self, x, training=False):
        self._training = bool(training) and self.rate > 0
        if not self._training:
            return x
        self.step += 1
        return F.dropout_forward(x, self.rate, self.seed, self.step)

    def backward(self, dout, need_dx=True):
        if not self._training:
            return dout
        return F.dropout_backward(dout, self.rate, self.seed, self.step)


class SumUnits:
    """y (B, 1) = sum of the units of x (B, u): the experts of the paper's synthetic data
    (Appendix C.2) output the sum of their ReLU units."""

    def __init__(self):
        self.params, self.grads, self._shape = {}, {}, None

    def forward(self, x, training=False):
        self._shape = x.shape
        return x.sum(axis=1, keepdims=True)

    def backward(self, dout, need_dx=True):
        return np.ascontiguousarray(np.broadcast_to(dout, self._shape))


class MLP:
    """A stack of Dense -> ReLU (-> Dropout) blocks, then an optional output: a linear layer of
    ``output_dim`` units, or with ``output_dim="sum"`` the sum of the last hidden layer's units.

    ``units`` lists the hidden widths. With no units and no output layer the MLP is the identity."""

    def __init__(self, in_dim, units, rng, dropout=0.0, output_dim=None, dtype=np.float32):
        self.layers = []
        d = int(in_dim)
        for u in units:
            self.layers += [Dense(d, u, rng, dtype), ReLU()]
            if dropout > 0:
                self.layers.append(Dropout(dropout, seed=int(rng.integers(2**62))))
            d = int(u)
        if output_dim == "sum":
            self.layers.append(SumUnits())
            d = 1
        elif output_dim is not None:
            self.layers.append(Dense(d, output_dim, rng, dtype))
            d = int(output_dim)
        self.out_dim = d

    def forward(self, x, training=False):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dout, need_dx=True):
        for i in range(len(self.layers) - 1, -1, -1):
            dout = self.layers[i].backward(dout, need_dx=need_dx or i > 0)
        return dout

    def named_modules(self, prefix):
        return [(f"{prefix}.{i}", layer) for i, layer in enumerate(self.layers) if layer.params]

    def flops_per_row(self, training=True, need_dx=False):
        """Floating-point operations of the dense layers for one input row: 2 * in * out per
        layer forward; a training step adds 2 * in * out for dW and, except for the first layer
        unless ``need_dx``, 2 * in * out for the input gradient. Element-wise work is not counted."""
        sizes = [2 * l.in_dim * l.out_dim for l in self.layers if isinstance(l, Dense)]
        if not training:
            return sum(sizes)
        return sum(3 * f for f in sizes) - (0 if need_dx or not sizes else sizes[0])


class ParameterSlab:
    """All parameters of a model in one contiguous array (and all gradients in a second one of the
    same layout), with every module's ``params[name]`` / ``grads[name]`` rebound to a view.

    This is what lets one optimizer call update the whole model and one ``zero_grad`` clear it."""

    def __init__(self, named_modules, dtype):
        self.index = []  # (full name, shape, offset)
        total = 0
        for prefix, module in named_modules:
            for name, value in module.params.items():
                self.index.append((f"{prefix}.{name}", tuple(value.shape), total))
                total += value.size
        self.data = np.zeros(total, dtype)
        self.grad = np.zeros(total, dtype)
        i = 0
        for prefix, module in named_modules:
            for name in list(module.params):
                full, shape, offset = self.index[i]
                size = int(np.prod(shape, dtype=np.int64))
                view = self.data[offset:offset + size].reshape(shape)
                view[...] = module.params[name]
                module.params[name] = view
                module.grads[name] = self.grad[offset:offset + size].reshape(shape)
                i += 1
        self.modules = dict(named_modules)

    def zero_grad(self):
        self.grad.fill(0)

    def named(self):
        """{full name: parameter view}."""
        out = {}
        for full, shape, offset in self.index:
            size = int(np.prod(shape, dtype=np.int64))
            out[full] = self.data[offset:offset + size].reshape(shape)
        return out

    def __len__(self):
        return self.data.size
