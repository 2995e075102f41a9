"""Readable reprs for the data-set dataclasses: arrays shown by shape and dtype, never by value
(the default dataclass repr printed whole training sets)."""
from __future__ import annotations

import dataclasses

import numpy as np


def _short(value):
    if isinstance(value, np.ndarray):
        return f"ndarray(shape={value.shape}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)) and any(isinstance(v, np.ndarray) for v in value):
        inner = ", ".join(_short(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def summary_repr(obj):
    """``Name(field=..., ...)`` of a dataclass instance, arrays (also inside lists) as their shape
    and dtype; nested dataclasses use their own repr."""
    fields = ", ".join(f"{f.name}={_short(getattr(obj, f.name))}" for f in dataclasses.fields(obj) if f.repr)
    return f"{type(obj).__name__}({fields})"
