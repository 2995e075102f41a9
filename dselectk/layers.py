"""Layers in the cs231n style, with the C kernels of dselectk.functional doing the work.

Every layer holds ``params`` and ``grads`` (dicts of arrays with the same keys; empty for
parameter-free layers). ``forward(x, training)`` caches what the backward needs;
``backward(dout, need_dx)`` accumulates the parameter gradients into ``grads`` and returns the
input gradient (or None when ``need_dx`` is false and the layer can skip it). Models later move
all ``params`` / ``grads`` into two contiguous slabs (:class:`ParameterSlab`) so that one
optimizer call updates everything.

Image layers (:class:`Conv2D`, :class:`MaxPool2D`, :class:`Flatten`) take NCHW batches
(B, C, H, W); :class:`CNNExpert` stacks them into the expert of the Multi-MNIST experiments.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys

import numpy as np

from . import functional as F
from ._memory import check_mlp

__all__ = ["Dense", "ReLU", "Dropout", "dropout_rate", "SumUnits", "MLP", "Conv2D", "MaxPool2D", "Flatten", "CNNExpert",
           "ParameterSlab", "glorot_uniform", "global_rows", "subset_rows", "current_rows", "standard_normal"]


def reusable(holder, name, shape, dtype):
    """``holder.<name>`` when it is an array of ``shape`` and ``dtype`` that nothing else refers
    to (no caller kept it, no view of it is alive), else a new uninitialized array, stored there.

    Layers keep their outputs and input gradients in such arrays and reuse them from one training
    step to the next: a fresh large array costs page faults and the kernel clearing its pages (a
    fifth of a CNN step, several percent of an MMoE step). Reuse is only safe when the previous
    step's array is dead, which the reference count says exactly: the layers drop their caches in
    their backward, and an array a caller still holds (a returned output, say) is never
    overwritten: the layer allocates a new one instead."""
    a = getattr(holder, name)
    # three references: the attribute, `a`, and getrefcount's own argument
    if a is not None and a.shape == shape and a.dtype == dtype and sys.getrefcount(a) == 3:
        return a
    a = np.empty(shape, dtype)
    setattr(holder, name, a)
    return a


def glorot_uniform(rng, fan_in, fan_out, dtype):
    """Glorot/Xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (the Keras default, as in
    the paper's TensorFlow models)."""
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, (fan_in, fan_out)).astype(dtype)


class Dense:
    """y = x W + b, W (in_dim, out_dim) Glorot-uniform, b zeros."""

    def __init__(self, in_dim, out_dim, rng, dtype=np.float32):
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.forward_flops = 2 * self.in_dim * self.out_dim  # per row
        self.params = {"W": glorot_uniform(rng, self.in_dim, self.out_dim, dtype), "b": np.zeros(self.out_dim, dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x = self._y_buf = self._dx_buf = None

    def forward(self, x, training=False, out=None, relu=False, dropout=None):
        """``relu``: return max(y, 0); ``dropout``: (rate, seed, step, rows) of a Dropout after the
        ReLU: both fused into the product (see :func:`run_layers`). Without ``out`` the result is
        this layer's reusable array (see :func:`reusable`)."""
        self._x = x
        if out is None:
            out = reusable(self, "_y_buf", (x.shape[0], self.out_dim), self.params["W"].dtype)
        return F.dense_forward(x, self.params["W"], self.params["b"], out=out, relu=relu, dropout=dropout)

    def backward(self, dout, need_dx=True, input_relu=False, input_dropout=0.0):
        """``input_relu``: x is a ReLU's output (then a dropout's of rate ``input_dropout``), and the
        input gradient is returned at that ReLU's input (their backwards fused: see
        :func:`backward_layers`). Drops the forward's cache."""
        x, self._x = self._x, None
        out = reusable(self, "_dx_buf", x.shape, x.dtype) if need_dx else None
        return F.dense_backward(dout, x, self.params["W"], self.grads["W"], self.grads["b"], need_dx=need_dx,
                                input_relu=input_relu, input_dropout=input_dropout, out=out)


class ReLU:
    def __init__(self):
        self.params, self.grads, self._y = {}, {}, None

    def forward(self, x, training=False, out=None):
        self._y = F.relu_forward(x, out=out)
        return self._y

    def backward(self, dout, need_dx=True):
        y, self._y = self._y, None
        return F.relu_backward(dout, y)


def dropout_rate(rate, name="dropout"):
    """``rate`` as a float in [0, 1): TypeError for a non-number (bools included), ValueError for a
    rate outside [0, 1) or NaN (1 would drop every unit, a negative rate has no meaning)."""
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(rate).__name__}")
    if not 0.0 <= float(rate) < 1.0:  # False for NaN too
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of units dropped), got {rate!r}")
    return float(rate)


# --- where the rows being computed sit in the whole batch --------------------------------------
#
# The random draws of training (dropout masks, the noisy Top-k gate's noise) are functions of a
# row's place in the batch, so that computing only some rows -- an expert's rows under conditional
# computation, a rank's share of a data-parallel batch -- gives each row the draws it has in the
# whole batch. By default the rows of an array are rows 0..B-1 of a batch of B.

_GLOBAL_ROWS = contextvars.ContextVar("dselectk_global_rows", default=None)


@contextlib.contextmanager
def global_rows(rows, batch_size):
    """Within the block, the arrays being computed hold rows ``rows`` (an int64 array) of a batch
    of ``batch_size`` rows (dselectk.distributed sets it for a rank's share)."""
    token = _GLOBAL_ROWS.set((np.asarray(rows, np.int64), int(batch_size)))
    try:
        yield
    finally:
        _GLOBAL_ROWS.reset(token)


@contextlib.contextmanager
def subset_rows(idx):
    """Within the block, the arrays being computed hold the rows ``idx`` of those outside it
    (e.g. ``X[idx]`` for an expert that runs on some rows only)."""
    current = _GLOBAL_ROWS.get()
    rows = np.asarray(idx, np.int64) if current is None else current[0][idx]
    token = _GLOBAL_ROWS.set((rows, None if current is None else current[1]))
    try:
        yield
    finally:
        _GLOBAL_ROWS.reset(token)


def current_rows(B):
    """(rows, batch_size) of the B rows being computed: their places in the whole batch (None:
    0..B-1) and its size (None: B)."""
    current = _GLOBAL_ROWS.get()
    if current is None:
        return None, None
    rows, size = current
    if rows.shape[0] != B:
        raise RuntimeError(f"a layer computes {B} rows, but the rows set for it are {rows.shape[0]}")
    return rows, size


def standard_normal(rng, shape, dtype):
    """N(0, 1) draws of ``shape`` (B, ...) from ``rng`` for the B rows being computed: the draws of
    their places in the whole batch (all of its rows are drawn, these are kept), so that the
    stream does not depend on how the batch was split."""
    rows, size = current_rows(shape[0])
    if size is None:
        return rng.standard_normal(shape).astype(dtype)
    return rng.standard_normal((size, *shape[1:]))[rows].astype(dtype)


class Dropout:
    """Inverted dropout: at training time each entry is kept with probability 1 - rate and scaled
    by 1 / (1 - rate); the identity at evaluation. The mask is a counter-based hash of
    (seed, step, index), recomputed in the backward rather than stored, so runs are reproducible
    and independent of the thread count. The index is the entry's place in the whole batch
    (see :func:`global_rows`), so a row keeps its mask when only some rows are computed."""

    def __init__(self, rate, seed):
        self.rate, self.seed, self.step = dropout_rate(rate, "the dropout rate"), int(seed), 0
        self.params, self.grads, self._training, self._rows = {}, {}, False, None

    def forward(self, x, training=False):
        if not self.start(x.shape[0], training):
            return x
        return F.dropout_forward(x, self.rate, self.seed, self.step, rows=self._rows)

    def start(self, B, training):
        """The bookkeeping of a forward of B rows (the step counter, the rows' places): True when
        this forward drops anything. A Dense layer that applies this dropout in its own epilogue
        calls it, then passes :meth:`args`."""
        self._training = bool(training) and self.rate > 0
        if self._training:
            self.step += 1
            self._rows = current_rows(B)[0]
        return self._training

    def args(self):
        """(rate, seed, step, rows) of the current forward, for ``Dense.forward(dropout=...)``."""
        return (self.rate, self.seed, self.step, self._rows)

    @property
    def active_rate(self):
        """The rate of the last forward's mask: 0.0 when it was the identity (evaluation)."""
        return self.rate if self._training else 0.0

    def backward(self, dout, need_dx=True):
        if not self._training:
            return dout
        return F.dropout_backward(dout, self.rate, self.seed, self.step, rows=self._rows)


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


def run_layers(layers, x, training=False, out=None):
    """x through ``layers``; with ``out`` (an array of the result's shape) the last layer writes
    into it when it can (Dense, ReLU), else the result is copied there. Models pass a
    slice of their (n, B, d) expert-output buffer, which saves stacking the experts' outputs.

    A Dense or Conv2D layer followed by a ReLU runs as one call (``relu=True``: the ReLU applied
    in place after the product, saving a pass over memory and an array); the ReLU layer keeps
    that output for its backward, exactly as if it had computed it. Dense -> ReLU -> Dropout runs
    as one call too (the dropout in the same epilogue). Conv2D -> ReLU -> MaxPool2D
    runs as one kernel (:func:`~dselectk.functional.conv2d_relu_pool_forward`) that never writes
    the convolution's output; :func:`backward_layers` runs its fused backward. The results are the
    same bits as the layers one by one."""
    last, i = len(layers) - 1, 0
    while i <= last:
        layer = layers[i]
        if (i + 2 <= last and isinstance(layer, Conv2D) and type(layers[i + 1]) is ReLU
                and isinstance(layers[i + 2], MaxPool2D) and not (out is not None and i + 2 == last)):
            x = layer.forward_relu_pool(x, layers[i + 2])
            layers[i + 1]._y = None  # not materialized: the fused backward needs only the pooling's output
            i += 3
            continue
        fused = i < last and isinstance(layer, (Dense, Conv2D)) and type(layers[i + 1]) is ReLU
        if (fused and isinstance(layer, Dense) and i + 2 <= last and type(layers[i + 2]) is Dropout
                and not (out is not None and i + 2 == last)):
            # Dense -> ReLU -> Dropout: the dropout in the product's epilogue too
            drop = layers[i + 2]
            args = drop.args() if drop.start(x.shape[0], training) else None
            # the ReLU keeps the dropout's output: positive exactly where the ReLU passed and the
            # dropout kept, so its backward after the dropout's gives the same values
            x = layers[i + 1]._y = layer.forward(x, training, relu=True, dropout=args)
            i += 3
            continue
        # only Dense and ReLU write into out: it is (B, d), a Conv2D's output is 4-D
        target = out if out is not None and i + fused == last and isinstance(layer, (Dense, ReLU)) else None
        if fused:
            x = layers[i + 1]._y = layer.forward(x, training, out=target, relu=True)
        elif target is not None:
            x = layer.forward(x, training, out=target)
        else:
            x = layer.forward(x, training)
        if target is not None:
            return x
        i += 1 + fused
    if out is not None:
        np.copyto(out, x.reshape(out.shape))
        return out
    return x


def backward_layers(layers, dout, need_dx=True, skip_last=False):
    """dout back through ``layers`` (all but the last with ``skip_last``); the first layer
    computes its input gradient only if ``need_dx``. A Conv2D -> ReLU -> MaxPool2D that the
    forward fused runs its fused backward. A Dense layer whose input is a ReLU's output (directly,
    or through a Dropout) returns the gradient at that ReLU's input (``input_relu``: its own input
    is the mask), and the ReLU and Dropout are skipped: the same values as their backwards."""
    i = len(layers) - 1 - bool(skip_last)
    while i >= 0:
        layer = layers[i]
        if isinstance(layer, MaxPool2D) and layer._fused and i >= 2:
            dout = layers[i - 2].backward_relu_pool(dout, layer, need_dx=need_dx or i > 2)
            i -= 3
            continue
        if isinstance(layer, Dense) and i >= 1:
            below = 2 if type(layers[i - 1]) is Dropout and i >= 2 and type(layers[i - 2]) is ReLU else \
                1 if type(layers[i - 1]) is ReLU else 0
            if below:
                rate = layers[i - 1].active_rate if below == 2 else 0.0
                dout = layer.backward(dout, need_dx=True, input_relu=True, input_dropout=rate)
                layers[i - below]._y = None  # the ReLU's cached output: not needed
                i -= 1 + below
                continue
        dout = layer.backward(dout, need_dx=need_dx or i > 0)
        i -= 1
    return dout


def flops_per_row(layers, training=True, need_dx=False):
    """Floating-point operations of ``layers``' matrix products for one input row: each Dense or
    Conv2D layer costs F = 2 * (multiply-adds of its forward) in the forward; a training step adds F
    for the weight gradient and, except for the first layer unless ``need_dx``, F for the input
    gradient. Element-wise work (ReLU, pooling, biases) is not counted."""
    sizes = [layer.forward_flops for layer in layers if hasattr(layer, "forward_flops")]
    if not training:
        return sum(sizes)
    return sum(3 * f for f in sizes) - (0 if need_dx or not sizes else sizes[0])


class Sequential:
    """Layers applied in order (``self.layers``); the base of :class:`MLP` and :class:`CNNExpert`."""

    layers: list

    def forward(self, x, training=False, out=None):
        return run_layers(self.layers, x, training, out)

    def backward(self, dout, need_dx=True, skip_last=False):
        """``skip_last``: dout is already the gradient at the last layer's input (a model fused
        that layer's backward, the final ReLU, into its own kernel)."""
        return backward_layers(self.layers, dout, need_dx, skip_last)

    def named_modules(self, prefix):
        return [(f"{prefix}.{i}", layer) for i, layer in enumerate(self.layers) if layer.params]

    def flops_per_row(self, training=True, need_dx=False):
        """See :func:`flops_per_row` (convolutions: 2 * C * KH * KW per output element)."""
        return flops_per_row(self.layers, training, need_dx)


class MLP(Sequential):
    """A stack of Dense -> ReLU (-> Dropout) blocks, then an optional output: a linear layer of
    ``output_dim`` units, or with ``output_dim="sum"`` the sum of the last hidden layer's units.

    ``units`` lists the hidden widths. With no units and no output layer the MLP is the identity."""

    def __init__(self, in_dim, units, rng, dropout=0.0, output_dim=None, dtype=np.float32):
        dropout = dropout_rate(dropout)
        check_mlp(in_dim, units, output_dim, dtype)  # refuse sizes that cannot fit before allocating
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



def _pair(value, name):
    """(a, b) from an int or a pair of ints >= 1."""
    pair = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(pair[0]), int(pair[1])


class Conv2D:
    """2-D convolution of NCHW images: x (B, in_channels, H, W) -> (B, filters, OH, OW).

    ``kernel``, ``stride``: an int or a pair; ``padding``: "valid", "same" (stride 1) or explicit
    (see :func:`dselectk.functional.conv2d_padding`). W (filters, in_channels, KH, KW) is
    Glorot-uniform with the Keras fans (fan_in = in_channels KH KW, fan_out = filters KH KW);
    b zeros. The backward accumulates into ``grads`` like :class:`Dense`."""

    def __init__(self, in_channels, filters, kernel, stride=1, padding="valid", rng=None, dtype=np.float32):
        self.in_channels, self.filters = F._int(in_channels, "in_channels", 1), F._int(filters, "filters", 1)
        self.kernel, self.stride = _pair(kernel, "kernel"), _pair(stride, "stride")
        self.padding = padding
        self.pads = tuple(int(p) for p in F.conv2d_padding(padding, self.kernel, self.stride))
        rng = np.random.default_rng() if rng is None else rng
        kh, kw = self.kernel
        a = np.sqrt(6.0 / ((self.in_channels + self.filters) * kh * kw))
        self.params = {"W": rng.uniform(-a, a, (self.filters, self.in_channels, kh, kw)).astype(dtype),
                       "b": np.zeros(self.filters, dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x = None

    def output_shape(self, input_shape):
        """(filters, OH, OW) for an input of shape (in_channels, H, W); ValueError if it does not fit."""
        c, h, w = input_shape
        top, bottom, left, right = self.pads
        hp, wp = h + top + bottom, w + left + right
        if c != self.in_channels or hp < self.kernel[0] or wp < self.kernel[1]:
            raise ValueError(f"Conv2D({self.in_channels} -> {self.filters}, kernel {self.kernel}, padding "
                             f"{self.padding!r}) does not fit an input of shape (C, H, W) = {tuple(input_shape)}")
        return (self.filters, (hp - self.kernel[0]) // self.stride[0] + 1, (wp - self.kernel[1]) // self.stride[1] + 1)

    def forward(self, x, training=False, out=None, relu=False):
        """``relu``: return max(y, 0), fused (see :func:`run_layers`)."""
        self._x = x
        return F.conv2d_forward(x, self.params["W"], self.params["b"], self.stride, self.pads, out=out, relu=relu)

    def backward(self, dout, need_dx=True):
        return F.conv2d_backward(dout, self._x, self.params["W"], self.grads["W"], self.grads["b"], self.stride,
                                 self.pads, need_dx=need_dx)

    def forward_relu_pool(self, x, pool):
        """max pooling (the MaxPool2D layer ``pool``) of ReLU of this convolution, in one kernel
        (see :func:`run_layers`); the pooling keeps what the backward needs."""
        self._x = x
        pool._y, pool._idx = F.conv2d_relu_pool_forward(x, self.params["W"], self.params["b"], self.stride,
                                                         self.pads, pool.kernel, pool.stride)
        pool._fused = True
        return pool._y

    def backward_relu_pool(self, dout, pool, need_dx=True):
        """Backward of :meth:`forward_relu_pool` through the pooling, the ReLU and this convolution."""
        return F.conv2d_relu_pool_backward(dout, pool._idx, pool._y, self._x, self.params["W"], self.grads["W"],
                                           self.grads["b"], self.stride, self.pads, pool.kernel, pool.stride,
                                           need_dx=need_dx)


class MaxPool2D:
    """Max pooling of NCHW images over valid ``kernel`` windows (int or pair) at ``stride`` (default:
    the kernel). The backward routes the gradient to each window's maximum."""

    def __init__(self, kernel=2, stride=None):
        self.kernel = _pair(kernel, "kernel")
        self.stride = self.kernel if stride is None else _pair(stride, "stride")
        self.params, self.grads, self._idx, self._size = {}, {}, None, None
        self._y, self._fused = None, False  # set by Conv2D.forward_relu_pool

    def output_shape(self, input_shape):
        c, h, w = input_shape
        if h < self.kernel[0] or w < self.kernel[1]:
            raise ValueError(f"MaxPool2D(kernel {self.kernel}) does not fit an input of shape (C, H, W) = "
                             f"{tuple(input_shape)}")
        return (c, (h - self.kernel[0]) // self.stride[0] + 1, (w - self.kernel[1]) // self.stride[1] + 1)

    def forward(self, x, training=False):
        y, self._idx = F.max_pool2d_forward(x, self.kernel, self.stride)
        self._size, self._y, self._fused = x.shape[2:], None, False
        return y

    def backward(self, dout, need_dx=True):
        if self._fused:
            raise RuntimeError("this MaxPool2D ran fused with the Conv2D and ReLU before it (run_layers): its "
                               "backward is theirs, through backward_layers or Conv2D.backward_relu_pool")
        return F.max_pool2d_backward(dout, self._idx, self._size)


class Flatten:
    """(B, ...) -> (B, prod(...)): a reshaped VIEW of a C-contiguous input (no copy), and the
    backward a view of dout with the input's shape."""

    def __init__(self):
        self.params, self.grads, self._shape = {}, {}, None

    def forward(self, x, training=False):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout, need_dx=True):
        return dout.reshape(self._shape)


class CNNExpert(Sequential):
    """The CNN expert of the Multi-MNIST experiments (Appendix D.2 of the paper):

        conv KxK (filters[0]) -> ReLU -> maxpool -> conv KxK (filters[1]) -> ReLU -> maxpool
        -> flatten -> Dense(u) -> ReLU (-> Dropout) for u in ``units``

    with the paper's filters (10, 20), kernel 5, pooling 2 and 1, 3 or 5 dense layers of 50 units
    by default. ``input_shape`` is (C, H, W) (NCHW input); convolutions are "valid" (36 x 36 ->
    32 -> 16 -> 12 -> 6). ``out_dim`` is the width of the output, as for :class:`MLP`."""

    def __init__(self, input_shape, units=(50,), rng=None, filters=(10, 20), kernel=5, pool=2, dropout=0.0,
                 dtype=np.float32):
        if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
        self.input_shape = tuple(F._int(v, "input_shape entry", 1) for v in input_shape)
        filters = [F._int(f, "filters entry", 1) for f in filters]
        if not filters:
            raise ValueError("filters must list at least one convolution")
        rng = np.random.default_rng() if rng is None else rng
        self.layers, shape = [], self.input_shape
        for f in filters:
            conv, pool_layer = Conv2D(shape[0], f, kernel, rng=rng, dtype=dtype), MaxPool2D(pool)
            try:
                conv_out = conv.output_shape(shape)
                shape = pool_layer.output_shape(conv_out)
                conv.forward_flops = 2 * conv.in_channels * conv.kernel[0] * conv.kernel[1] * int(np.prod(conv_out))
            except ValueError as exc:
                raise ValueError(f"input_shape {self.input_shape} is too small for the CNN expert (filters "
                                 f"{tuple(filters)}, kernel {kernel}, pool {pool}): {exc}") from None
            self.layers += [conv, ReLU(), pool_layer]
        self.layers.append(Flatten())
        self.feature_shape = shape  # (C, H, W) of the last pooling's output
        dense = MLP(int(np.prod(shape)), units, rng, dropout, None, dtype)
        self.layers += dense.layers
        self.out_dim = dense.out_dim



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
