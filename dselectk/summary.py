"""``model.summary()``: the blocks of a model (input, experts, gates, towers or the shared bottom)
with their layers, output shapes (B: the batch) and parameter counts, embedding tables included,
as Keras' ``Model.summary()``."""
from __future__ import annotations

import numpy as np

__all__ = ["summary"]


def _layer(layer):
    name = type(layer).__name__
    if name == "Dense":
        return f"Dense({layer.in_dim}->{layer.out_dim})"
    if name == "Dropout":
        return f"Dropout({layer.rate:g})"
    if name == "Conv2D":
        return f"Conv2D({layer.filters}, {layer.kernel[0]}x{layer.kernel[1]})"
    if name == "MaxPool2D":
        return f"MaxPool2D({layer.kernel[0]}x{layer.kernel[1]})"
    return name


def _layers(stack):
    return " -> ".join(_layer(l) for l in stack.layers) or "identity"


def _count(model, prefix):
    return sum(int(np.prod(shape, dtype=np.int64)) for name, shape, _ in model.slab.index
               if name.startswith(prefix + "."))


def _rows(model):
    """(name, what, output shape, parameters) per block."""
    rows = []
    front = model.input_layer
    if front is not None:
        names = front.columns or [f"ids[:, {j}]" for j in range(front.n_ids)]
        for j, (table, col) in enumerate(zip(front.tables, names)):
            rows.append((f"embedding{j}", f"Embedding({table.num_embeddings}x{table.dim}) of {col}",
                         f"(B, {table.dim})", table.table.size))
        if front.n_dense:
            rows.append(("dense features", ", ".join(front.dense_columns or []) or f"{front.n_dense} floats",
                         f"(B, {front.n_dense})", 0))
    else:
        rows.append(("input", "", f"(B, {', '.join(map(str, model.input_shape))})", 0))
    if hasattr(model, "experts"):
        for j, e in enumerate(model.experts):
            rows.append((f"expert{j}", _layers(e), f"(B, {e.out_dim})", _count(model, f"expert{j}")))
        tasks = model.task_names
        for t, g in enumerate(model.gates):
            shape = f"(B, {model.n_experts})" if g.per_example else f"({model.n_experts},)"
            rows.append((f"gate{t}", f"{type(g).__name__} for {tasks[t]}", shape, _count(model, f"gate{t}")))
    else:
        rows.append(("bottom", _layers(model.bottom), f"(B, {model.bottom.out_dim})", _count(model, "bottom")))
    for t, (tw, task) in enumerate(zip(model.towers, model.task_names)):
        out = model.task_outputs[t]
        rows.append((f"tower{t}", f"{_layers(tw)} ({task}: {model.task_losses[t]})", f"(B, {out})",
                     _count(model, f"tower{t}")))
    return rows


def summary(model):
    """The text of ``model.summary()``."""
    rows = _rows(model)
    header = ("block", "layers", "output shape", "parameters")
    cells = [header] + [(n, w, s, f"{p:,}") for n, w, s, p in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    tables = sum(t.size for t in model.embedding_tables())
    frozen = 0 if model.frozen_mask is None else int(model.frozen_mask.sum())
    tasks = ", ".join(f"{n} ({l})" for n, l in zip(model.task_names, model.task_losses))
    out = [f"{type(model).__name__}: {model.n_tasks} task(s): {tasks}; dtype {model.dtype}", line, fmt(header), line]
    out += [fmt(r) for r in cells[1:]]
    out += [line, f"Total parameters: {model.num_parameters():,} (dense slab {len(model.slab):,}, embedding tables "
                  f"{tables:,}); frozen: {frozen:,}"]
    return "\n".join(out)
