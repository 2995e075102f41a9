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

or, when the model has no dense features, the (N, F) integer ids array itself. An input that
names its columns (``columns=``; ``EmbeddingInput.from_frame`` infers the rest from a DataFrame)
also reads a pandas DataFrame or a dict of columns by name::

    dk.MMoE(None, ..., embeddings=dict(columns={"user": 64, "movie": 64},
                                       vocab_sizes={"user": 6040, "movie": 3706},
                                       dense_columns=["age", "hour"]))
    dk.MMoE(None, ..., embeddings=dk.EmbeddingInput.from_frame(train_df, {"user": 64, "movie": 64},
                                                               dense_columns=["age", "hour"]))

Categorical and string id columns are mapped through the categories the input keeps (saved with
the model), so a test frame with other categories, or in another order, reads the same ids. All
of the input checks live in :mod:`dselectk.inputs`; ``fit``, ``evaluate`` and ``predict`` batch
and shuffle X row-wise.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import functional as F
from .inputs import check_embedding_X as check_inputs
from .inputs import embedding_spec, num_rows, take_rows

__all__ = ["Embedding", "EmbeddingInput", "check_inputs", "num_rows", "take_rows"]
_CONFIG_KEYS = ("vocab_sizes", "dims", "n_dense", "columns", "dense_columns", "categories")


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
    vocab_sizes : the number of rows of each table, one table per id column of X["ids"] (a dict by
        column name with ``columns``; may be left out for columns with ``categories``).
    dims : the width of each table's rows (an int: the same for all; left out when ``columns`` is a
        dict {name: width}).
    n_dense : the number of dense float features appended after the embeddings (default: the
        number of ``dense_columns``, else 0).
    seed : an int or a numpy Generator, for the tables' initialization.
    columns : None, or the names of the id columns (a list, or a dict {name: width}): X may then be
        a DataFrame or a dict of columns (see dselectk.inputs).
    dense_columns : the names of the dense feature columns, in order (None: the columns of X other
        than the id columns).
    categories : {id column: [values]}: the vocabulary of a categorical / string column, value i
        is id i (``from_frame`` fills it in).

    ``out_dim`` = sum(dims) + n_dense is the input width of the model behind it; ``offsets[j]`` is
    the first column of table j in the feature row, ``dense_offset`` that of the dense features.
    ``config`` is the JSON-able dict of the constructor arguments (without seed and dtype) that
    models store for save / load."""

    def __init__(self, vocab_sizes=None, dims=None, n_dense=None, seed=0, dtype=np.float32, columns=None,
                 dense_columns=None, categories=None):
        self.columns, self.dense_columns, self.categories = _names(columns, dense_columns, categories)
        if isinstance(columns, Mapping):
            if dims is not None:
                raise ValueError("give the table widths once: columns={name: width} or dims=, not both")
            dims = list(columns.values())
        vocab_sizes = _by_column(vocab_sizes, self.columns, self.categories)
        self.vocab_sizes = _positive_ints(vocab_sizes, "vocab_sizes")
        if not self.vocab_sizes:
            raise ValueError("vocab_sizes must list at least one table")
        if self.columns is not None and len(self.columns) != len(self.vocab_sizes):
            raise ValueError(f"columns names {len(self.columns)} id columns, vocab_sizes gives {len(self.vocab_sizes)}")
        for c, cats in (self.categories or {}).items():
            V = self.vocab_sizes[self.columns.index(c)]
            if len(cats) > V:
                raise ValueError(f"column {c!r} has {len(cats)} categories but a vocabulary of only {V}")
        if dims is None:
            raise ValueError("dims (the width of each table) is required, or columns={name: width}")
        self.dims = _positive_ints(dims, "dims", len(self.vocab_sizes))
        if n_dense is None:
            n_dense = 0 if self.dense_columns is None else len(self.dense_columns)
        self.n_dense = F._int(n_dense, "n_dense", 0)
        if self.dense_columns is not None and len(self.dense_columns) != self.n_dense:
            raise ValueError(f"n_dense = {self.n_dense} but dense_columns names {len(self.dense_columns)} columns")
        self.dtype = np.dtype(dtype)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.tables = [Embedding(V, d, rng, self.dtype) for V, d in zip(self.vocab_sizes, self.dims)]
        self.offsets = [int(o) for o in np.cumsum([0] + self.dims[:-1])]
        self.dense_offset = sum(self.dims)
        self.out_dim = self.dense_offset + self.n_dense
        self.config = dict(vocab_sizes=self.vocab_sizes, dims=self.dims, n_dense=self.n_dense)
        if self.columns is not None:  # only when named: older configs read the same
            self.config["columns"] = list(self.columns)
        if self.dense_columns is not None:
            self.config["dense_columns"] = list(self.dense_columns)
        if self.categories:
            self.config["categories"] = {c: list(v) for c, v in self.categories.items()}
        self._B = None

    @classmethod
    def from_config(cls, config, seed=0, dtype=np.float32):
        """An input from the dict a model's ``embeddings=`` takes (and its config stores): the
        constructor's keyword arguments other than seed and dtype."""
        if not isinstance(config, Mapping):
            raise TypeError(f"embeddings must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown or not ("vocab_sizes" in config or "categories" in config or "columns" in config):
            raise ValueError(f"embeddings must be a dict with keys among {list(_CONFIG_KEYS)} (vocab_sizes and dims, "
                             f"or columns={{name: width}} and vocab_sizes by name), got keys {sorted(config)}")
        return cls(**config, seed=seed, dtype=dtype)

    @classmethod
    def from_frame(cls, frame, columns, dense_columns=None, vocab_sizes=None, seed=0, dtype=np.float32):
        """The input for the DataFrame (or dict of columns) ``frame``: ``columns`` {id column:
        table width}; the vocabularies are inferred (a categorical column: its categories; a string
        column: its sorted distinct values; an integer column: max + 1) unless ``vocab_sizes``
        {column: V} gives them; ``dense_columns`` default to every other column. See
        :func:`dselectk.inputs.embedding_spec`."""
        return cls(**embedding_spec(frame, columns, dense_columns, vocab_sizes), seed=seed, dtype=dtype)

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
        """X validated and normalized (see :func:`dselectk.inputs.check_embedding_X`)."""
        return check_inputs(self, X, name)

    def __repr__(self):
        named = "" if self.columns is None else f", columns={self.columns}"
        return f"EmbeddingInput(vocab_sizes={self.vocab_sizes}, dims={self.dims}, n_dense={self.n_dense}{named})"


def _names(columns, dense_columns, categories):
    """columns and dense_columns as lists of distinct strings (or None), categories as {column:
    list of JSON-able values} for id columns only (or None)."""
    if columns is not None:
        if isinstance(columns, str) or not isinstance(columns, (list, tuple, Mapping)):
            raise TypeError(f"columns must be a list of column names or a dict {{name: width}}, got {columns!r}")
        columns = [str(c) for c in columns]
    if dense_columns is not None:
        if isinstance(dense_columns, str) or not isinstance(dense_columns, (list, tuple)):
            raise TypeError(f"dense_columns must be a list of column names, got {dense_columns!r}")
        dense_columns = [str(c) for c in dense_columns]
    names = (columns or []) + (dense_columns or [])
    if len(set(names)) != len(names):
        raise ValueError(f"columns and dense_columns must name distinct columns, got {names}")
    if categories:
        if columns is None or not isinstance(categories, Mapping):
            raise ValueError("categories must be a dict {id column: [values]} and needs columns=")
        unknown = sorted(set(map(str, categories)) - set(columns))
        if unknown:
            raise ValueError(f"categories names columns that are not id columns: {unknown}")
        out = {}
        for c, values in categories.items():
            values = list(values)
            if len(set(values)) != len(values) or not all(isinstance(v, (str, int, float)) for v in values):
                raise ValueError(f"categories[{c!r}] must list distinct strings or numbers")
            out[str(c)] = values
        categories = out
    return columns, dense_columns, categories or None


def _by_column(vocab_sizes, columns, categories):
    """vocab_sizes as a list in column order: given as a list, as a dict by column name, or left
    out for the columns that have categories (their number)."""
    if isinstance(vocab_sizes, Mapping) or vocab_sizes is None:
        if columns is None:
            raise ValueError("vocab_sizes (the number of rows of each table) is required")
        given = {str(k): v for k, v in (vocab_sizes or {}).items()}
        unknown = sorted(set(given) - set(columns))
        if unknown:
            raise ValueError(f"vocab_sizes names columns that are not id columns: {unknown}")
        cats = categories or {}
        missing = [c for c in columns if c not in given and c not in cats]
        if missing:
            raise ValueError(f"vocab_sizes is missing for the columns {missing}: give them (vocab_sizes={{'{missing[0]}': "
                             "V, ...}) or build the input from data with EmbeddingInput.from_frame")
        return [given[c] if c in given else len(cats[c]) for c in columns]
    return vocab_sizes


def _split(X):
    if isinstance(X, Mapping):
        return X["ids"], X.get("dense")
    return X, None
