"""Serving: :func:`export_onnx` writes a model's inference forward as a standard ONNX graph.

``dk.predict`` stays NumPy-only; this module is the way out of Python (onnxruntime, or any ONNX
runtime, in C++, Java, C#, JavaScript, ...). It needs the ``onnx`` package, an optional extra
(``pip install "dselectk[onnx]"``), imported only when :func:`export_onnx` is called.

The graph
---------
* Opset 17 of the default ONNX domain (ONNX >= 1.12, onnxruntime >= 1.12), IR version 8, so
  that runtimes of the last few years load it. Only standard operators are used: Gemm, MatMul,
  Add, Mul, Sub, Relu, Conv, MaxPool, Flatten, Reshape, Transpose, Concat, Gather, Softmax,
  Sigmoid, TopK, ScatterElements, Clip, ReduceSum, ReduceProd, ConstantOfShape, Shape, Identity.
* Inputs, batch size dynamic (dimension ``"batch"``): ``X`` (batch, *input_shape) of the model's
  dtype, or for a model with an embedding input ``ids`` (batch, F) int64 (column j the ids of
  table j) and, when it has dense features, ``dense`` (batch, n_dense): the keys of the dict X
  that ``dk.predict`` takes, so ``session.run(None, {"ids": ids.astype(np.int64), "dense":
  dense})`` works. An embedding input with named columns (``columns=``, ``dense_columns=``) has
  one (batch,) input per column instead, named as the column: int64 ids for an id column (for a
  categorical column, the value's index in the input's ``categories``, which the exported
  metadata holds: the graph does not map values), the model's dtype for a dense one.
  :func:`input_names` lists them.
* Outputs, one per task, named ``task0``, ``task1``, ... (or ``output_names``): what
  ``dk.predict`` returns: probabilities for bce (batch,) and softmax_ce (batch, C) tasks, values
  for mse tasks ((batch,) with one output, else (batch, d)).
* Float32 and float64 models export in their own dtype. (onnxruntime's CPU provider has no
  float64 Conv kernel, so a float64 CNN model's graph, valid ONNX, does not run there.)

What is exported is the evaluation-mode forward: no dropout, no gate noise.

Experts run side by side: the first Dense layer of all experts is one Gemm over the concatenated
weights (B, p) x (p, a u); later Dense layers are one batched MatMul over the stacked experts
(a, B, u) x (a, u, u'); CNN experts are one Conv over the concatenated filters, then grouped Convs
(``group`` = a). Static gates (weights that do not depend on x) are evaluated at export time and
folded in as constants, and the experts whose weight is exactly zero in every task are left out of
the graph: a static DSelect-k gate whose S(Z) is binary exports at most k experts per task, the
conditional computation of the paper's Section 2. Per-example gates are built as graph operators
from x and every expert runs on the whole batch.

Gates export themselves
-----------------------
Each gate class has ``onnx_weights(graph, x)``, written in the gate's own file
(``dselectk/gates/<kind>.py``); the exporter only calls it. A static gate inherits the base
class's version, which returns its weights as an (n,) NumPy array. A per-example gate builds its
(B, n) weights from ``x``, the name of its (B, p) input in the graph, with the methods of
:class:`OnnxGraph` (``graph.op("Softmax", ..., axis=-1)``, ``graph.const(array)``,
``graph.linear(x, A, b)``, ``graph.zeros_like(x)``), and returns the name of the result; no gate file imports onnx.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

from .layers import CNNExpert, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, SumUnits

if TYPE_CHECKING:
    import onnx

    from .models import _Model

__all__ = ["export_onnx", "input_names", "OnnxGraph", "OPSET", "IR_VERSION"]

#: The ONNX opset (default domain) of exported graphs.
OPSET = 17
#: The ONNX IR version of exported files (that of ONNX 1.12, the release that brought opset 17).
IR_VERSION = 8

BATCH = "batch"  # the symbolic batch dimension of every input and output

PathLike = Union[str, "os.PathLike[str]"]


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError('export_onnx needs the onnx package, an optional dependency: pip install "dselectk[onnx]" '
                          "(or: pip install onnx)") from exc
    return onnx


class OnnxGraph:
    """An ONNX graph under construction, in one float dtype (the model's).

    Values are named by strings. :meth:`op` appends a node and returns the name(s) of its
    output(s); :meth:`const` adds an initializer (float arrays in the graph's dtype, integer arrays
    as int64); :meth:`linear` is x A^T + b (one Gemm). Names are made unique from the ``hint``s, so
    callers never collide."""

    def __init__(self, dtype: Any) -> None:
        self.onnx = _require_onnx()
        self.dtype = np.dtype(dtype)
        self.elem_type = self.onnx.helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list = []
        self.initializers: list = []
        self._used: set[str] = set()
        # the graph values of the model's integer id columns, (B,) int64 each (models with an
        # embedding input), for the gates that route on ids (hash routing)
        self.id_columns: list[str] | None = None

    def reserve(self, *names: str) -> None:
        """Keep ``names`` (the graph's inputs and outputs) from being given to other values."""
        self._used.update(names)

    def name(self, hint: str) -> str:
        """A fresh value name starting with ``hint``."""
        name, i = hint, 0
        while name in self._used:
            i += 1
            name = f"{hint}_{i}"
        self._used.add(name)
        return name

    def const(self, value: Any, hint: str = "const") -> str:
        """An initializer holding ``value``: floats in the graph's dtype, integers as int64."""
        array = np.asarray(value)
        array = array.astype(self.dtype if array.dtype.kind == "f" else np.int64)
        name = self.name(hint)
        # a copy, not ascontiguousarray, which makes a 0-d array 1-d
        self.initializers.append(self.onnx.numpy_helper.from_array(array.copy(order="C"), name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, outputs: int = 1, out: str | None = None,
           **attributes: Any) -> Any:
        """Appends an ``op_type`` node on ``inputs`` (value names; "" for an omitted optional input)
        and returns its output's name (a tuple of names when ``outputs`` > 1). ``out`` names the
        (single) output exactly, for graph outputs."""
        if out is not None:
            self.reserve(out)
            names = [out]
        else:
            names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), names, **attributes))
        return names[0] if outputs == 1 else tuple(names)

    def linear(self, x: str, A: np.ndarray, b: np.ndarray | None = None, hint: str = "linear") -> str:
        """x A^T + b for x (B, p), A (q, p), b (q,): the gates' a = A x + b, one Gemm."""
        inputs = [x, self.const(A, hint + "_A")] + ([self.const(b, hint + "_b")] if b is not None else [])
        return self.op("Gemm", *inputs, hint=hint, transB=1)

    def reshape(self, x: str, shape: Sequence[int], hint: str = "reshape") -> str:
        """Reshape to ``shape`` (0 keeps that dimension, -1 infers one)."""
        return self.op("Reshape", x, self.const(np.array(shape, np.int64), hint + "_shape"), hint=hint)

    def zeros_like(self, x: str, hint: str = "zeros") -> str:
        """Zeros of the shape of x (a value of the graph's dtype), the batch dimension included."""
        value = self.onnx.numpy_helper.from_array(np.zeros(1, self.dtype))
        return self.op("ConstantOfShape", self.op("Shape", x, hint=hint + "_shape"), hint=hint, value=value)

    def value_info(self, name: str, shape: Sequence[Any], elem_type: int | None = None) -> Any:
        return self.onnx.helper.make_tensor_value_info(name, self.elem_type if elem_type is None else elem_type,
                                                       list(shape))


# --- layers ---------------------------------------------------------------------------------

def _networks(g: OnnxGraph, nets: Sequence[Any], x: str, hint: str) -> str:
    """x through ``nets``, networks of one structure (MLPs or CNNExperts: lists of layers) side by side:
    (B, d) for one network, the stacked (a, B, d) for several. x is their common input, (B, p) or
    an NCHW image batch."""
    a = len(nets)
    shared = True  # x is still the common input (after that: per network)
    stacked = False  # for a > 1 per-network values are (B, a u) column blocks until stacked to (a, B, u)
    width = None  # u of the column blocks
    for i, group in enumerate(zip(*[net.layers for net in nets])):
        layer, name = group[0], f"{hint}_{i}"
        if isinstance(layer, Dropout):
            continue  # the identity at evaluation
        if isinstance(layer, ReLU):
            x = g.op("Relu", x, hint=name + "_relu")
        elif isinstance(layer, Dense):
            W = [lay.params["W"] for lay in group]  # (in, out) each
            b = [lay.params["b"] for lay in group]
            if shared or a == 1:  # one Gemm: (B, p) x (p, a u)
                x = g.op("Gemm", x, g.const(np.concatenate(W, axis=1), name + "_W"),
                         g.const(np.concatenate(b), name + "_b"), hint=name + "_dense")
                width, stacked = layer.out_dim, False
            else:  # one batched MatMul: (a, B, u) x (a, u, u')
                x = x if stacked else _stack(g, x, a, width, name)
                x = g.op("MatMul", x, g.const(np.stack(W), name + "_W"), hint=name + "_matmul")
                x = g.op("Add", x, g.const(np.stack(b)[:, None, :], name + "_b"), hint=name + "_dense")
                stacked = True
            shared = False
        elif isinstance(layer, SumUnits):
            if a > 1 and not stacked:
                x, stacked = _stack(g, x, a, width, name), True
            x = g.op("ReduceSum", x, g.const(np.array([-1], np.int64), name + "_axes"), hint=name + "_sum", keepdims=1)
        elif isinstance(layer, Conv2D):
            top, bottom, left, right = layer.pads
            Wc = np.concatenate([lay.params["W"] for lay in group])  # (a F, C or F_prev, KH, KW)
            bc = np.concatenate([lay.params["b"] for lay in group])
            x = g.op("Conv", x, g.const(Wc, name + "_W"), g.const(bc, name + "_b"), hint=name + "_conv",
                     kernel_shape=list(layer.kernel), strides=list(layer.stride), pads=[top, left, bottom, right],
                     group=1 if shared else a)
            shared = False
        elif isinstance(layer, MaxPool2D):
            x = g.op("MaxPool", x, hint=name + "_maxpool", kernel_shape=list(layer.kernel), strides=list(layer.stride))
        elif isinstance(layer, Flatten):
            if a == 1:
                x = g.op("Flatten", x, hint=name + "_flatten", axis=1)
            else:  # (B, a F, H, W) -> (B, a, F H W) -> (a, B, F H W), each network's C-order flatten
                x = g.op("Transpose", g.reshape(x, [0, a, -1], name + "_split"), hint=name + "_flatten",
                         perm=[1, 0, 2])
                stacked = True
        else:
            raise TypeError(f"export_onnx cannot export the layer {type(layer).__name__} of {type(nets[0]).__name__}")
    if a > 1 and shared:
        raise TypeError("export_onnx: networks side by side must start with a Dense or Conv2D layer")
    if a > 1 and not stacked:
        x = _stack(g, x, a, width, hint + "_out")
    return x


def _stack(g: OnnxGraph, x: str, a: int, width: int | None, hint: str) -> str:
    """(B, a u) column blocks -> (a, B, u)."""
    return g.op("Transpose", g.reshape(x, [-1, a, int(width or 0)], hint + "_blocks"), hint=hint + "_stack",
                perm=[1, 0, 2])


# --- model inputs and outputs ---------------------------------------------------------------

def input_names(model: _Model) -> list[str]:
    """The names of the graph inputs of ``model``'s export: X; or ids (or one per named id column)
    and, with dense features, dense (or one per named dense column)."""
    front = model.input_layer
    if front is None:
        return ["X"]
    names = ["ids"] if front.columns is None else list(front.columns)
    if front.n_dense:
        names += ["dense"] if front.dense_columns is None else list(front.dense_columns)
    return names


def _inputs(g: OnnxGraph, model: Any) -> tuple[list, str, str]:
    """(graph inputs, the model input name, the flattened (B, p) feature row's name). The input
    names are reserved already (see input_names)."""
    front = model.input_layer
    if front is None:
        shape = tuple(model.input_shape)
        inputs = [g.value_info("X", [BATCH, *shape])]
        flat = "X" if len(shape) == 1 else g.op("Flatten", "X", hint="X_flat", axis=1)
        return inputs, "X", flat
    int64 = g.onnx.TensorProto.INT64
    inputs, parts = [], []
    if front.columns is None:  # ids (B, F): table_j[ids[:, j]]
        inputs.append(g.value_info("ids", [BATCH, front.n_ids], int64))
        columns = [g.op("Gather", "ids", g.const(np.array(j, np.int64), f"ids_col{j}"), hint=f"ids{j}", axis=1)
                   for j in range(front.n_ids)]
    else:  # one (B,) input per named id column
        inputs += [g.value_info(name, [BATCH], int64) for name in front.columns]
        columns = list(front.columns)
    g.id_columns = columns
    for j, (table, column) in enumerate(zip(front.tables, columns)):
        parts.append(g.op("Gather", g.const(table.table, f"embedding{j}"), column, hint=f"embedded{j}", axis=0))
    if front.n_dense and front.dense_columns is None:
        inputs.append(g.value_info("dense", [BATCH, front.n_dense]))
        parts.append("dense")
    elif front.n_dense:  # one (B,) input per named dense column, each a column of the row
        inputs += [g.value_info(name, [BATCH]) for name in front.dense_columns]
        parts += [g.reshape(name, [-1, 1], f"{name}_column") for name in front.dense_columns]
    row = parts[0] if len(parts) == 1 else g.op("Concat", *parts, hint="features", axis=1)
    return inputs, row, row


def _task_output(g: OnnxGraph, model: Any, t: int, raw: str, out: str) -> Any:
    """The prediction of task t from its raw output (B, o), as ``transform_outputs``."""
    loss, o = model.task_losses[t], model.task_outputs[t]
    if loss == "bce":
        g.op("Reshape", g.op("Sigmoid", raw, hint=f"{out}_sigmoid"), g.const(np.array([-1], np.int64)), out=out)
        return [BATCH]
    if loss == "softmax_ce":
        g.op("Softmax", raw, out=out, axis=-1)
        return [BATCH, o]
    if o == 1:
        g.op("Reshape", raw, g.const(np.array([-1], np.int64)), out=out)
        return [BATCH]
    g.op("Identity", raw, out=out)
    return [BATCH, o]


# --- models ---------------------------------------------------------------------------------

def _mixtures(g: OnnxGraph, model: Any, x: str, flat: str) -> list[str]:
    """The T mixed expert outputs (B, d) of an MMoE / MoE."""
    ws = [gate.onnx_weights(g, flat) for gate in model.gates]
    T, d = model.n_tasks, model.experts[0].out_dim
    if all(isinstance(w, np.ndarray) for w in ws):  # static: constants, experts in use only
        W = np.stack([np.asarray(w, model.dtype).reshape(-1) for w in ws])  # (T, n)
        active = np.flatnonzero(W.any(axis=0))
        if active.size == 0:  # every weight zero (DSelect-k, n not a power of two): outputs are 0 * f
            active = np.arange(1)
        f = _networks(g, [model.experts[j] for j in active], x, "expert")
        if active.size == 1:
            return [f if W[t, active[0]] == 1 else g.op("Mul", f, g.const(W[t, active[0]], f"w{t}"), hint=f"mixed{t}")
                    for t in range(T)]
        # (T, a) x (a, B d) -> (T, B, d): one MatMul for all tasks
        mixed = g.op("MatMul", g.const(W[:, active], "W_active"), g.reshape(f, [active.size, -1], "expert_rows"),
                     hint="mixed_rows")
        mixed = g.reshape(mixed, [T, -1, d], "mixed")
        return [g.op("Gather", mixed, g.const(np.array(t, np.int64), f"task{t}_index"), hint=f"mixed{t}", axis=0)
                for t in range(T)]
    f = g.op("Transpose", _networks(g, model.experts, x, "expert"), hint="experts_by_row", perm=[1, 0, 2])  # (B, n, d)
    mixed = []
    for t, w in enumerate(ws):
        if isinstance(w, np.ndarray):  # (n,) x (B, n, d) -> (B, d)
            mixed.append(g.op("MatMul", g.const(np.asarray(w).reshape(-1), f"w{t}"), f, hint=f"mixed{t}"))
        else:  # (B, 1, n) x (B, n, d) -> (B, 1, d) -> (B, d)
            row = g.reshape(w, [-1, 1, model.n_experts], f"w{t}_row")
            mixed.append(g.reshape(g.op("MatMul", row, f, hint=f"mixed{t}_row"), [-1, d], f"mixed{t}"))
    return mixed


def _task_names(model: Any, output_names: Sequence[str] | None) -> list[str]:
    T = model.n_tasks
    if output_names is None:
        names = getattr(model, "task_names", None) or [f"task{t}" for t in range(T)]
    else:
        if isinstance(output_names, str) or not all(isinstance(n, str) and n for n in output_names):
            raise TypeError(f"output_names must be a list of non-empty strings, one per task, got {output_names!r}")
        names = list(output_names)
    if len(names) != T:
        raise ValueError(f"output_names has {len(names)} names, the model has {T} tasks")
    inputs = input_names(model)
    if len(set(names)) != len(names) or set(inputs) & set(names):
        raise ValueError(f"output names must be distinct and differ from the input names {', '.join(inputs)}; got "
                         f"{names} (pass output_names=)")
    return [str(n) for n in names]


def export_onnx(model: _Model, path: PathLike, *, output_names: Sequence[str] | None = None) -> onnx.ModelProto:
    """Write the inference forward of ``model`` (MMoE, MoE or SharedBottom, any gate, MLP or CNN
    experts, with or without an embedding input) to ``path`` as an ONNX graph (opset 17), and
    return the ``onnx.ModelProto``. The graph's outputs are what :func:`dselectk.predict` returns,
    one per task, named ``output_names`` (default ``task0``, ``task1``, ...); its inputs are ``X``,
    or ``ids`` (int64) and ``dense`` for embedding models; the batch size is dynamic. See the
    module docstring for the graph. Needs the ``onnx`` package (``pip install "dselectk[onnx]"``).

    Static gates are folded in as constants, and experts with weight exactly zero in every task
    are left out. Raises TypeError for an object that is not a dselectk model or a gate without an
    ONNX export, ValueError for non-finite parameters or bad ``output_names``."""
    from .models import MMoE, SharedBottom

    if not isinstance(model, (MMoE, SharedBottom)):
        raise TypeError(f"export_onnx takes a dselectk model (MMoE, MoE or SharedBottom), got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    names = _task_names(model, output_names)
    if not np.all(np.isfinite(model.slab.data)) or not all(np.all(np.isfinite(t))
                                                           for t in model.named_embeddings().values()):
        raise ValueError("the model's parameters contain NaN or Inf; export a model with finite weights")
    g = OnnxGraph(model.dtype)
    g.reserve(*names, *input_names(model))  # before any other value is named
    inputs, x, flat = _inputs(g, model)
    if isinstance(model, SharedBottom):
        h = _networks(g, [model.bottom], x if model.bottom_kind == "cnn" else flat, "bottom")
        mixed = [h] * model.n_tasks
    else:
        mixed = _mixtures(g, model, x if model.expert_kind == "cnn" else flat, flat)
    outputs = []
    for t, tower in enumerate(model.towers):
        raw = _networks(g, [tower], mixed[t], f"tower{t}")
        outputs.append(g.value_info(names[t], _task_output(g, model, t, raw, names[t])))
    onnx = g.onnx
    graph = onnx.helper.make_graph(g.nodes, f"dselectk_{type(model).__name__}", inputs, outputs,
                                   initializer=g.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="dselectk", producer_version=_version(),
                                   doc_string=repr(model))
    proto.ir_version = IR_VERSION
    # what a server needs to know besides the graph: the class and its constructor arguments
    onnx.helper.set_model_props(proto, {"dselectk_class": type(model).__name__,
                                        "dselectk_config": json.dumps(model.config)})
    onnx.checker.check_model(proto)
    onnx.save_model(proto, os.fspath(path))
    return proto


def _version() -> str:
    from . import __version__

    return __version__
