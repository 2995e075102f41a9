"""Embedding tables and the embedding input front of a model.

* :class:`Embedding`: one table (V, d); ``forward(ids)`` gathers rows, ``backward(dout)`` stores
  the table's SPARSE gradient ``grad = (rows, grad_rows)`` (the distinct ids of the batch and their
  summed gradients) instead of a dense (V, d) array.
* :class:`EmbeddingInput`: maps a model input X = {"ids": (N, F) integers, "dense": (N, n_dense)
  floats} to the feature row [table_0[ids[:, 0]] | ... | table_{F-1}[ids[:, F-1]] | dense] of
  width D = sum(dims) + n_dense that the experts and gates of a model read.

The forward allocates the (B, D) row once and every table writes its block in place
(``functional.embedding_forward(..., out=row, offset=...)``); the backward reads each table's block
of the (B, D) input gradient the same way, so the concatenation costs no copies either way.

Tables are not in the model's dense :class:`~dselectk.layers.ParameterSlab`: their gradients are
sparse, and ``trainer.fit`` updates them with the lazy steps of
:class:`dselectk.optim.SparseAdagrad` / :class:`~dselectk.optim.SparseAdam` (only the rows a
batch looked up, and only their optimizer state, change), while the slab takes the dense step.

The input format. For a model with an embedding input, X is a dict::

    {"ids": (N, F) integer array, column j the ids of table j, each in [0, vocab_sizes[j]),
     "dense": (N, n_dense) float array}          # "dense" may be left out when n_dense == 0

or, when the model has no dense features, the (N, F) integer ids array itself. ``fit``,
``evaluate`` and ``predict`` batch and shuffle it row-wise.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import functional as F

__all__ = ["Embedding", "EmbeddingInput", "check_inputs", "num_rows", "take_rows"]


def _positive_ints(value, name, n=None):
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if values is None:
        if n is None:
            raise TypeError(f"{name} must be a list of positive integers, got {type(value).__name__}")
        values = [value] * n
    if n is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, expected one per id column ({n})")
    return [F._int(v, f"{name}[{i}]", 1, maximum=2**62) for i, v in enumerate(values)]


class Embedding:
    """A table (num_embeddings, dim), initialized uniform in (-0.05, 0.05) (the Keras default).

    ``forward(ids, out=None, offset=0)`` returns ``table[ids]`` flattened per example, (B, F*dim),
    or writes it into columns [offset, offset + F*dim) of ``out``. ``backward(dout, offset=0)``
    sets ``grad = (rows, grad_rows)``, the sparse gradient (accumulated if called again before
    :meth:`zero_grad`); it returns None, ids have no gradient."""

    def __init__(self, num_embeddings, dim, rng, dtype=np.float32):
        self.num_embeddings = F._int(num_embeddings, "num_embeddings", 1, maximum=2**62)
        self.dim = F._int(dim, "dim", 1)
        self.table = rng.uniform(-0.05, 0.05, (self.num_embeddings, self.dim)).astype(dtype)
        self.grad = None
        self._ids = None

    def forward(self, ids, out=None, offset=0):
        self._ids = ids
        return F.embedding_forward(self.table, ids, out, offset)

    def backward(self, dout, offset=0):
        if self._ids is None:
            raise RuntimeError("backward() called before forward()")
        rows, grad = F.embedding_backward(dout, self._ids, self.num_embeddings, self.dim, offset)
        if self.grad is not None:  # a second backward before the step: merge the two
            rows, inverse = np.unique(np.concatenate([self.grad[0], rows]), return_inverse=True)
            merged = np.zeros((rows.size, self.dim), grad.dtype)
            np.add.at(merged, inverse, np.concatenate([self.grad[1], grad]))
            grad = merged
        self.grad = (rows, grad)

    def zero_grad(self):
        self.grad = None

    def dense_grad(self):
        """The gradient as a dense (V, dim) array (zeros where no id was looked up): for tests."""
        g = np.zeros_like(self.table)
        if self.grad is not None:
            g[self.grad[0]] = self.grad[1]
        return g

    def __repr__(self):
        return f"Embedding({self.num_embeddings}, {self.dim}, dtype={self.table.dtype})"


class EmbeddingInput:
    """The input front of a model: X -> [table_0[ids[:, 0]] | ... | dense], (B, D).

    Parameters
    ----------
    vocab_sizes : the number of rows of each table, one table per id column of X["ids"].
    dims : the width of each table's rows (an int: the same for all).
    n_dense : the number of dense float features appended after the embeddings.
    seed : an int or a numpy Generator, for the tables' initialization.

    ``out_dim`` = sum(dims) + n_dense is the input width of the model behind it; ``offsets[j]`` is
    the first column of table j in the feature row, ``dense_offset`` that of the dense features.
    ``config`` is the JSON-able dict of the constructor arguments (without seed and dtype) that
    models store for save / load."""

    def __init__(self, vocab_sizes, dims, n_dense=0, seed=0, dtype=np.float32):
        self.vocab_sizes = _positive_ints(vocab_sizes, "vocab_sizes")
        if not self.vocab_sizes:
            raise ValueError("vocab_sizes must list at least one table")
        self.dims = _positive_ints(dims, "dims", len(self.vocab_sizes))
        self.n_dense = F._int(n_dense, "n_dense", 0)
        self.dtype = np.dtype(dtype)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.tables = [Embedding(V, d, rng, self.dtype) for V, d in zip(self.vocab_sizes, self.dims)]
        self.offsets = [int(o) for o in np.cumsum([0] + self.dims[:-1])]
        self.dense_offset = sum(self.dims)
        self.out_dim = self.dense_offset + self.n_dense
        self.config = dict(vocab_sizes=self.vocab_sizes, dims=self.dims, n_dense=self.n_dense)
        self._B = None

    @property
    def n_ids(self):
        """F, the number of id columns (one per table)."""
        return len(self.tables)

    def forward(self, X, training=False):
        """The (B, D) feature row of X (a dict or ids array, see the module docstring; use
        :func:`check_inputs` first for full checks and clear messages)."""
        ids, dense = _split(X)
        B = ids.shape[0]
        out = np.empty((B, self.out_dim), self.dtype)
        for j, (table, offset) in enumerate(zip(self.tables, self.offsets)):
            table.forward(ids[:, j:j + 1], out=out, offset=offset)
        if self.n_dense:
            out[:, self.dense_offset:] = dense
        self._B = B
        return out

    def backward(self, dout):
        """Stores each table's sparse gradient from the (B, D) input gradient ``dout``; returns None
        (the dense features' gradient is not needed)."""
        dout = np.ascontiguousarray(dout)
        for table, offset in zip(self.tables, self.offsets):
            table.backward(dout, offset)

    def zero_grad(self):
        for t in self.tables:
            t.zero_grad()

    def named_tables(self, prefix="embedding"):
        """[(name, Embedding)]: embedding0, embedding1, ..."""
        return [(f"{prefix}{j}", t) for j, t in enumerate(self.tables)]

    def check(self, X, name="X"):
        """X validated and normalized (see :func:`check_inputs`)."""
        return check_inputs(self, X, name)

    def __repr__(self):
        return f"EmbeddingInput(vocab_sizes={self.vocab_sizes}, dims={self.dims}, n_dense={self.n_dense})"


def _split(X):
    if isinstance(X, Mapping):
        return X["ids"], X.get("dense")
    return X, None


def check_inputs(front, X, name="X"):
    """Validate X for the embedding input ``front`` and normalize it to
    ``{"ids": C-contiguous int32 / int64 (N, F), "dense": C-contiguous float (N, n_dense) or None}``.

    Raises TypeError for a wrong container or dtype (float ids, say) and ValueError for wrong
    shapes, an empty X, NaN / Inf dense features and ids outside [0, vocab_sizes[j]) -- naming the
    column, the value and the row -- so that bad input is refused before any training."""
    F_ = front.n_ids
    fmt = (f"{{'ids': (N, {F_}) integer array, 'dense': (N, {front.n_dense}) float array}}" if front.n_dense
           else f"{{'ids': (N, {F_}) integer array}} or the (N, {F_}) integer ids array itself")
    if isinstance(X, np.ndarray):
        if front.n_dense:
            raise TypeError(f"{name} must be a dict {fmt}: the model has n_dense = {front.n_dense} dense features, "
                            f"got a {X.dtype} array")
        if not np.issubdtype(X.dtype, np.integer):
            raise TypeError(f"{name} for a model with an embedding input must be {fmt}; got a {X.dtype} array "
                            "(ids must have an integer dtype)")
        X = {"ids": X}
    if not isinstance(X, Mapping):
        raise TypeError(f"{name} for a model with an embedding input must be {fmt}, got {type(X).__name__}")
    unknown = sorted(set(X) - {"ids", "dense"})
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; expected {fmt}")
    if "ids" not in X:
        raise ValueError(f"{name} lacks 'ids'; expected {fmt}")
    ids = X["ids"]
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name}['ids'] must be a numpy.ndarray of integers, got {type(ids).__name__}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name}['ids'] must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] != F_:
        raise ValueError(f"{name}['ids'] must have shape (N, {F_}) (one column per embedding table), got {ids.shape}")
    N = ids.shape[0]
    if N == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    for j, V in enumerate(front.vocab_sizes):
        col = ids[:, j]
        bad = np.flatnonzero((col < 0) | (col >= V))
        if bad.size:
            raise ValueError(f"{name}['ids'][:, {j}] must hold ids in [0, {V}) (the vocabulary size of embedding "
                             f"{j}), got {col[bad[0]]} at row {bad[0]}")
    keep32 = ids.dtype.kind == "i" and ids.dtype.itemsize == 4
    ids = np.ascontiguousarray(ids, dtype=np.int32 if keep32 else np.int64)
    dense = X.get("dense")
    if front.n_dense == 0:
        if dense is not None and not (isinstance(dense, np.ndarray) and dense.shape == (N, 0)):
            raise ValueError(f"{name}['dense'] must be None or absent: the model has no dense features (n_dense = 0)")
        return {"ids": ids, "dense": None}
    if dense is None:
        raise ValueError(f"{name} lacks 'dense': the model has n_dense = {front.n_dense} dense features")
    if not isinstance(dense, np.ndarray):
        raise TypeError(f"{name}['dense'] must be a numpy.ndarray, got {type(dense).__name__}")
    if not np.issubdtype(dense.dtype, np.number) or np.issubdtype(dense.dtype, np.complexfloating):
        raise TypeError(f"{name}['dense'] must hold real numbers, got dtype {dense.dtype}")
    if dense.shape != (N, front.n_dense):
        raise ValueError(f"{name}['dense'] must have shape (N, n_dense) = ({N}, {front.n_dense}), got {dense.shape}")
    dense = np.ascontiguousarray(dense, dtype=front.dtype)
    if not np.all(np.isfinite(dense)):
        raise ValueError(f"{name}['dense'] contains NaN or Inf (first at row "
                         f"{int(np.argwhere(~np.isfinite(dense))[0, 0])})")
    return {"ids": ids, "dense": dense}


def num_rows(X):
    """N of a model input: an array's first dimension, or that of X['ids']."""
    return X["ids"].shape[0] if isinstance(X, Mapping) else X.shape[0]


def take_rows(X, idx):
    """The rows ``idx`` (an index array or a slice) of a model input, an array or a dict of arrays."""
    if isinstance(X, Mapping):
        return {k: None if v is None else v[idx] for k, v in X.items()}
    return X[idx]
