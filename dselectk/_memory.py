"""Model sizes that cannot fit are refused before anything is allocated.

The constructors call these checks with the sizes they are given: the bytes a model part would
need (a lower bound: its parameters and their gradients, and for a gate the arrays of one forward
pass) are computed from the shapes alone and compared with the machine's physical memory, so
``MMoE(10, n_experts=2**31 - 1)`` raises a ValueError stating the memory it would need at once,
instead of building experts for 20 s and then failing with MemoryError.
"""
from __future__ import annotations

import os

import numpy as np


def physical_memory():
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or the names are unknown
        return None


def format_bytes(n):
    """1536 -> '1.5 KiB'."""
    value, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"):
        if value < 1024:
            break
        value /= 1024
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def require(what, nbytes, detail):
    """ValueError when ``what`` would need more than the physical memory (``detail`` says what the
    bytes are made of)."""
    limit = physical_memory()
    if limit is not None and nbytes > limit:
        raise ValueError(f"{what} would need at least {format_bytes(nbytes)} ({detail}), more than the "
                         f"{format_bytes(limit)} of physical memory of this machine")


def _count(v):
    """v as an int >= 0, or None when it is not one (the constructor then reports it)."""
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 else None


def mlp_parameters(in_dim, units, output_dim=None):
    """Weights and biases of Dense layers in_dim -> units[0] -> ... (-> output_dim, when it is an
    int: "sum" adds none); 0 when a size is not a non-negative int."""
    out = [_count(output_dim)] if _count(output_dim) else []
    sizes = [_count(in_dim)] + [_count(u) for u in (units or ())] + out
    if any(s is None for s in sizes):
        return 0
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def check_mlp(in_dim, units, output_dim, dtype):
    """An MLP's parameters and gradients."""
    values = 2 * mlp_parameters(in_dim, units, output_dim)
    require(f"an MLP {in_dim} -> {list(units or ())}" + (f" -> {output_dim}" if output_dim is not None else ""),
            values * np.dtype(dtype).itemsize, f"its parameters and their gradients, {np.dtype(dtype)}")


def check_gate(n_experts, k, dtype):
    """A gate over n experts, with k selectors or kept experts (None for the softmax gate). Each
    gate holds at least 3 arrays of n values, or k + 1 when k + 1 < 3: its weights w (n,) and its
    logits and their gradients (softmax, Top-k), or the k selector outputs r (k, n) of one example
    (DSelect-k; the softmax-selector gate has more)."""
    per_expert = 3 if k is None else min(k + 1, 3)
    require(f"a gate over n_experts = {n_experts}", per_expert * n_experts * np.dtype(dtype).itemsize,
            f"{per_expert} values per expert for its weights, logits or selector outputs and their "
            f"gradients, {np.dtype(dtype)}")


def check_experts(model, expert_units, dtype):
    """The n experts of a mixture model (model.n_experts, model.input_dim, model.n_tasks set) and
    its gates, before any is built. A CNN expert's convolutions are not counted (a lower bound)."""
    n = model.n_experts
    in_dim = model.input_dim if getattr(model, "expert_kind", "mlp") == "mlp" else None
    per_expert = mlp_parameters(in_dim, expert_units) if in_dim else mlp_parameters(1, expert_units)
    itemsize = np.dtype(dtype).itemsize
    values = 2 * n * per_expert + getattr(model, "n_tasks", 1) * 2 * n  # gates: >= 2 values per expert
    require(f"{type(model).__name__} with n_experts = {n}", values * itemsize,
            f"{n} experts of {per_expert} parameters, their gradients and the gates, {np.dtype(dtype)}")
