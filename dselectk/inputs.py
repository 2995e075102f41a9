"""What a model reads, in one place: the accepted forms of X, Y and sample weights, their checks,
casts, column names, batching and row-taking. ``dselectk.trainer`` (fit, evaluate, predict) and
the models' embedding input use it; nothing else decides what an input may be.

X, the features
    * A NumPy array (N, *model.input_shape) of real numbers: (N, p) for MLP models, (N, C, H, W)
      for CNN ones. It is cast to the model's dtype (see "Casts" below).
    * A memory map (``numpy.memmap``, ``numpy.load(path, mmap_mode="r")``): as an array, but never
      loaded whole. The checks scan it in chunks of rows, and when its dtype is not the model's,
      the rows of each batch are cast as they are read. Shuffling reads rows in random order,
      which on a disk is slow: ``shuffle=False`` reads it front to back.
    * A pandas DataFrame, or a dict {column name: 1-D array}: for a model without an embedding
      input, its columns are the p features in order (all numeric). ``fit`` records the names
      (``model.input_columns``); later frames are matched by name (reordered if needed, an error
      when a column is missing or unknown).
    * For a model with an embedding input (``embeddings=``, dselectk.embedding): the dict
      {"ids": (N, F) integers, "dense": (N, n_dense) floats} (or the ids alone when n_dense = 0),
      or, when the embedding input names its columns (``embeddings=dict(columns={"user": 64,
      "movie": 64}, vocab_sizes={...})`` or ``EmbeddingInput.from_frame``), a DataFrame / dict of
      columns: each id column feeds its table by name (integer ids, or categorical / string values
      mapped through the categories the input was built with), the ``dense_columns`` the dense
      features (default: the remaining columns, in order).

Y, the targets: a list with one entry per task (T), a dict {task name: targets}, a DataFrame
    whose columns are task names, an (N, T) array when every task has one target column, or, for
    one task, its array. Task names are the model's ``task_names`` (``task0``, ``task1``, ... when
    unnamed); a dict or DataFrame must give every task. Per task: bce, numbers in [0, 1] (N,) or
    (N, 1); mse, real numbers (N,) or (N, d); softmax_ce, integer labels in [0, C). Strings and
    other non-numbers are refused with the task's name and what its loss expects.

sample_weights: None, one (N,) array for every task, a list per task, or a dict by task name
    (entries None or (N,) non-negative weights).

Data larger than memory: ``fit`` (and evaluate / predict) also take batches from a *batch
    source*: an object with ``len`` and ``__getitem__`` (a Keras ``Sequence``: item i is batch i,
    a tuple (X_b, Y_b) or (X_b, Y_b, sample_weights_b)), an iterable that is not an iterator (a
    fresh ``iter()`` per epoch), or an iterator / generator (one epoch until it is exhausted, or
    ``steps_per_epoch`` batches per epoch). Every batch gets the checks of a whole X / Y, with the
    batch number in the message. A Sequence's batch order is shuffled with the seed when
    ``shuffle`` is on; its ``on_epoch_end()`` is called after each epoch.

Casts: X, Y and weights are cast to the model's dtype. Widening (float16 -> float32, float32 ->
    float64, bool) and float64 -> float32 (NumPy's default type to the model's training precision)
    are silent. A value outside the target's range is an error naming the value and its position
    (not "NaN or Inf" after an overflowing cast). Casts that lose information otherwise warn
    (:class:`LossyCastWarning`, naming both dtypes): long double (float128) to a narrower float,
    and integers too large to be exact in the target (|v| > 2**24 for float32, 2**53 for float64).

pandas is optional: it is imported only when a DataFrame / Series is passed (or by
``EmbeddingInput.from_frame``); ``pip install dselectk[pandas]``.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

__all__ = ["check_X", "check_Y", "check_weights", "check_embedding_X", "num_rows", "take_rows", "task_names",
           "check_task_names", "input_columns", "embedding_spec", "LossyCastWarning", "Batch", "ArrayData",
           "BatchStream", "make_data", "is_batch_source"]

# task names whose metric keys would collide with fit's own ("reg_loss", "val_loss", "val_x_auc")
_RESERVED_TASK_NAMES = ("reg", "val", "loss", "lr", "time", "epoch")
_CHUNK_ELEMENTS = 1 << 22  # value scans go through arrays (and memory maps) this many entries at a time


class LossyCastWarning(UserWarning):
    """An input was cast to the model's dtype with a loss of information (see dselectk.inputs)."""


def warn_user(message, category=UserWarning):
    """warnings.warn attributed to the first caller outside this package (the user's line)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


# --- pandas, optional -----------------------------------------------------------------------

def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("this needs pandas, which is not installed: pip install 'dselectk[pandas]' "
                          "(or pass NumPy arrays)") from None
    return pandas


def _is_frame(x) -> bool:
    # pandas is imported by whoever made a DataFrame, so it is in sys.modules if x can be one
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(x, pd.DataFrame)


def _is_series(x) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(x, pd.Series)


def _is_categorical(col) -> bool:
    return _is_series(col) and isinstance(col.dtype, _pandas().CategoricalDtype)


def _describe_kind(a) -> str:
    kind = a.dtype.kind
    if kind in "USO" or str(a.dtype) in ("str", "string"):
        sample = next((v for v in a.reshape(-1)[:1000].tolist() if v is not None), None)
        return "strings" if kind in "US" or isinstance(sample, str) else f"Python objects ({type(sample).__name__})"
    if kind in "mM":
        return "dates or times"
    if kind == "c":
        return "complex numbers"
    return f"values of dtype {a.dtype}"


def _column_array(col, label):
    """A 1-D NumPy array from a pandas Series (nullable dtypes without missing values included)
    or anything array-like; missing values of a nullable column are an error naming the row."""
    if _is_series(col):
        dt = col.dtype
        if hasattr(dt, "numpy_dtype") and not isinstance(dt, np.dtype):  # nullable Int64, boolean, Float64
            missing = np.flatnonzero(col.isna().to_numpy())
            if missing.size:
                raise ValueError(f"{label} has missing values (first at row {missing[0]}); fill or drop them")
            return col.to_numpy(dtype=dt.numpy_dtype)
        return col.to_numpy()
    a = np.asarray(col)
    if a.ndim != 1:
        raise ValueError(f"{label} must be one column, a 1-D array, got shape {a.shape}")
    return a


def _numeric_column(col, label):
    if _is_categorical(col):
        raise TypeError(f"{label} is categorical; this input reads numbers only (one-hot encode it, or feed it to "
                        "an embedding table: embeddings=dict(columns={...}))")
    a = _column_array(col, label)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{label} holds {_describe_kind(a)}; expected numbers")
    return a


# --- casts ----------------------------------------------------------------------------------

def _at(name, shape, flat):
    """'row r: name[r, c]' (or 'row r' for 1-D arrays) for the entry at flat index ``flat`` of an
    array of ``shape``."""
    idx = np.unravel_index(int(flat), shape)
    if len(shape) == 1:
        return f"row {idx[0]}"
    where = ", ".join(str(int(i)) for i in idx)
    return f"row {idx[0]}: {name}[{where}]" if " " not in name else f"row {idx[0]} (index [{where}])"


def _entry(a, flat):
    return a[np.unravel_index(int(flat), a.shape)].item()


def _scan(a, dtype, name):
    """Checks the values of the real array ``a`` against a cast to ``dtype`` chunk by chunk of rows
    (so a memory map is never read whole into memory): NaN / Inf and values outside the target's
    range raise ValueError with their position; integers that are not exact in the target come
    back as (count, the first one, its position) for the caller's warning, else None."""
    if a.size == 0:
        return None
    rows = max(1, _CHUNK_ELEMENTS // max(1, a.size // a.shape[0]))
    narrowing = a.dtype.kind == "f" and np.finfo(a.dtype).max > np.finfo(dtype).max
    fmax = np.finfo(dtype).max
    inexact, limit = None, 2 ** (np.finfo(dtype).nmant + 1)
    for start in range(0, a.shape[0], rows):
        c = np.asarray(a[start:start + rows])
        if c.dtype.kind == "f":
            bad = ~np.isfinite(c)
            if bad.any():
                flat = start * (c.size // c.shape[0]) + int(np.argmax(bad.reshape(-1)))
                where = _at(name, a.shape, flat)
                raise ValueError(f"{name} contains NaN or Inf (first at {where} = {_entry(a, flat)!r})")
            if narrowing:
                over = np.abs(c) > fmax
                if over.any():
                    flat = start * (c.size // c.shape[0]) + int(np.argmax(over.reshape(-1)))
                    value = _entry(a, flat)
                    raise ValueError(f"{name} has {value!r} at {_at(name, a.shape, flat)}, outside the range of "
                                     f"{np.dtype(dtype)}, the model's dtype (|x| <= {fmax:.8g}); scale the feature, "
                                     "or build the model with dtype='float64'")
        elif c.dtype.kind in "iu" and inexact is None:
            big = (c > limit) | (c < -limit) if c.dtype.kind == "i" else c > limit
            if big.any():
                flat = start * (c.size // c.shape[0]) + int(np.argmax(big.reshape(-1)))
                inexact = (_entry(a, flat), _at(name, a.shape, flat), limit)
    return inexact


class _CastOnRead:
    """A memory map whose rows are cast to ``dtype`` as they are read (its values were checked)."""

    def __init__(self, array, dtype):
        self.array, self.dtype = array, np.dtype(dtype)
        self.shape, self.ndim = array.shape, array.ndim

    def __getitem__(self, idx):
        return np.ascontiguousarray(self.array[idx], dtype=self.dtype)

    def __len__(self):
        return self.shape[0]


def to_dtype(a, dtype, name, lazy=False):
    """The real array ``a`` as a C-contiguous array of ``dtype`` (with ``lazy``, a memory map of
    another dtype: a view that casts the rows it reads), after the value checks of :func:`_scan`. TypeError for
    non-numbers, ValueError for NaN / Inf / out-of-range values, LossyCastWarning for lossy casts
    (see the module docstring)."""
    dtype = np.dtype(dtype)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got {_describe_kind(a)} (dtype {a.dtype})")
    inexact = _scan(a, dtype, name)
    if inexact is not None:
        value, where, limit = inexact
        warn_user(f"{name} has dtype {a.dtype} and is cast to {dtype}, the model's dtype, which rounds integers "
                  f"beyond {limit}: {value} at {where} is one", LossyCastWarning)
    if a.dtype.kind == "f" and np.finfo(a.dtype).nmant > max(np.finfo(dtype).nmant, np.finfo(np.float64).nmant):
        warn_user(f"{name} has dtype {a.dtype} and is cast to {dtype}, the model's dtype, which rounds away its "
                  "extra precision", LossyCastWarning)
    if lazy and isinstance(a, np.memmap) and a.dtype != dtype:
        return _CastOnRead(a, dtype)
    return np.ascontiguousarray(a, dtype=dtype)


# --- X --------------------------------------------------------------------------------------

def input_columns(X):
    """The column names of a DataFrame or dict-of-columns X (else None)."""
    if _is_frame(X):
        return [str(c) for c in X.columns]
    if isinstance(X, Mapping):
        return [str(c) for c in X]
    return None


def _columns_of(X, name):
    """[(column name, column)] of a DataFrame or a dict of columns, and their common length N."""
    if _is_frame(X):
        cols = [(str(c), X[c]) for c in X.columns]
        if len(set(c for c, _ in cols)) != len(cols):
            raise ValueError(f"{name} has repeated column names")
    else:
        cols = [(str(k), v) for k, v in X.items()]
    lengths = {c: len(v) if hasattr(v, "__len__") else None for c, v in cols}
    if not cols:
        raise ValueError(f"{name} has no columns")
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise ValueError(f"{name}'s columns must all have one row per example; got lengths {lengths}")
    return dict(cols), next(iter(lengths.values()))


def _array_from_columns(model, X, name):
    """A plain model's (N, p) features from the columns of a DataFrame / dict, in the order of
    ``model.input_columns`` when fit recorded them."""
    shape = tuple(getattr(model, "input_shape", None) or (model.input_dim,))
    if len(shape) != 1:
        raise TypeError(f"{name}: a model with input_shape {shape} reads arrays (N, {', '.join(map(str, shape))}), "
                        "not columns")
    cols, N = _columns_of(X, name)
    names = list(cols)
    want = getattr(model, "input_columns", None)
    if want is not None:
        missing, unknown = [c for c in want if c not in cols], [c for c in names if c not in want]
        if missing or unknown:
            raise ValueError(f"{name} must have the columns the model was fit on, {want}; missing {missing}, "
                             f"unknown {unknown}")
        names = list(want)
    if len(names) != shape[0]:
        raise ValueError(f"{name} has {len(names)} columns, the model reads p = {shape[0]} features")
    if N == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    arrays = [_numeric_column(cols[c], f"{name}[{c!r}]") for c in names]
    dtype = np.result_type(*arrays)
    out = np.empty((N, len(names)), dtype)
    for j, a in enumerate(arrays):
        out[:, j] = a
    return to_dtype(out, model.dtype, name)


def check_X(model, X, name="X"):
    """X as the model reads it, checked: a C-contiguous (N, *model.input_shape) array of the model's
    dtype (memory maps of another dtype: cast as rows are read), or for a model with an embedding
    input the dict {"ids", "dense"} of :func:`check_embedding_X`. See the module docstring for the
    accepted forms; TypeError / ValueError say what was wrong and what was expected."""
    if getattr(model, "input_layer", None) is not None:
        return check_embedding_X(model.input_layer, X, name)
    if _is_frame(X) or isinstance(X, Mapping):
        return _array_from_columns(model, X, name)
    if not isinstance(X, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (or a pandas DataFrame, or a batch source: see "
                        f"dselectk.inputs), got {type(X).__name__}")
    shape = tuple(getattr(model, "input_shape", None) or (model.input_dim,))
    if X.ndim != 1 + len(shape) or X.shape[1:] != shape:
        want = f"(N, {', '.join(str(d) for d in shape)})"
        hint = ""
        if len(shape) > 1 and X.ndim == 2 and X.shape[1] == model.input_dim:
            hint = f"; it looks flattened: reshape it with {name}.reshape(-1, {', '.join(str(d) for d in shape)})"
        elif len(shape) == 3:
            hint = " (NCHW images: channels, height, width)"
        raise ValueError(f"{name} must have shape {want}, got {X.shape}{hint}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    return to_dtype(X, model.dtype, name, lazy=True)


def _embedding_format(front):
    F_ = front.n_ids
    if front.n_dense:
        return f"{{'ids': (N, {F_}) integer array, 'dense': (N, {front.n_dense}) float array}}"
    return f"{{'ids': (N, {F_}) integer array}} or the (N, {F_}) integer ids array itself"


def check_embedding_X(front, X, name="X"):
    """X for the embedding input ``front`` (a dselectk.embedding.EmbeddingInput), validated and
    normalized to ``{"ids": C-contiguous int32 / int64 (N, F), "dense": (N, n_dense) of the
    front's dtype or None}``.

    Raises TypeError for a wrong container or dtype (float ids, say) and ValueError for wrong
    shapes, an empty X, NaN / Inf dense features and ids outside [0, vocab_sizes[j]) -- naming the
    column, the value and the row -- so that bad input is refused before any training."""
    if _is_frame(X) or (isinstance(X, Mapping) and "ids" not in X):
        return _embedding_from_columns(front, X, name)
    fmt = _embedding_format(front)
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
    unknown = sorted(map(str, set(X) - {"ids", "dense"}))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; expected {fmt}")
    ids = X["ids"]
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name}['ids'] must be a numpy.ndarray of integers, got {type(ids).__name__}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name}['ids'] must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] != front.n_ids:
        raise ValueError(f"{name}['ids'] must have shape (N, {front.n_ids}) (one column per embedding table), got "
                         f"{ids.shape}")
    N = ids.shape[0]
    if N == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    ids = _checked_ids(front, ids, [f"{name}['ids'][:, {j}]" for j in range(front.n_ids)])
    dense = X.get("dense")
    if front.n_dense == 0:
        if dense is not None and not (isinstance(dense, np.ndarray) and dense.shape == (N, 0)):
            raise ValueError(f"{name}['dense'] must be None or absent: the model has no dense features (n_dense = 0)")
        return {"ids": ids, "dense": None}
    if dense is None:
        raise ValueError(f"{name} lacks 'dense': the model has n_dense = {front.n_dense} dense features")
    if not isinstance(dense, np.ndarray):
        raise TypeError(f"{name}['dense'] must be a numpy.ndarray, got {type(dense).__name__}")
    if dense.shape != (N, front.n_dense):
        raise ValueError(f"{name}['dense'] must have shape (N, n_dense) = ({N}, {front.n_dense}), got {dense.shape}")
    return {"ids": ids, "dense": to_dtype(dense, front.dtype, f"{name}['dense']", lazy=True)}


def _checked_ids(front, ids, labels):
    for j, V in enumerate(front.vocab_sizes):
        col = ids[:, j]
        bad = np.flatnonzero((col < 0) | (col >= V))
        if bad.size:
            what = f"embedding {j}" if front.columns is None else f"the embedding of column {front.columns[j]!r}"
            raise ValueError(f"{labels[j]} must hold ids in [0, {V}) (the vocabulary size of {what}), got "
                             f"{col[bad[0]]} at row {bad[0]}")
    keep32 = ids.dtype.kind == "i" and ids.dtype.itemsize == 4
    return np.ascontiguousarray(ids, dtype=np.int32 if keep32 else np.int64)


def _embedding_from_columns(front, X, name):
    if front.columns is None:
        raise TypeError(f"{name} is a DataFrame / dict of columns, but this embedding input has no column names; "
                        "build the model with embeddings=dict(columns={'user': 64, ...}, vocab_sizes={...}) (or "
                        f"EmbeddingInput.from_frame), or pass {_embedding_format(front)}")
    cols, N = _columns_of(X, name)
    dense_names = front.dense_columns
    if dense_names is None:
        dense_names = [c for c in cols if c not in front.columns]
    missing = [c for c in front.columns + list(dense_names) if c not in cols]
    if missing:
        raise ValueError(f"{name} lacks the columns {missing}; the model reads the id columns {front.columns}"
                         + (f" and the dense columns {list(front.dense_columns)}" if front.dense_columns else ""))
    if len(dense_names) != front.n_dense:
        raise ValueError(f"{name} has {len(dense_names)} columns besides the id columns {front.columns} "
                         f"({dense_names}); the model has n_dense = {front.n_dense} dense features")
    if N == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    ids = np.empty((N, front.n_ids), np.int64)
    labels = [f"{name}[{c!r}]" for c in front.columns]
    for j, c in enumerate(front.columns):
        ids[:, j] = _ids_of_column(front, j, cols[c], labels[j])
    ids = _checked_ids(front, ids, labels)
    if not front.n_dense:
        return {"ids": ids, "dense": None}
    arrays = [_numeric_column(cols[c], f"{name}[{c!r}]") for c in dense_names]
    dense = np.empty((N, len(arrays)), np.result_type(*arrays))
    for j, a in enumerate(arrays):
        dense[:, j] = a
    return {"ids": ids, "dense": to_dtype(dense, front.dtype, f"{name}[{list(dense_names)}]")}


def _ids_of_column(front, j, col, label):
    """Integer ids of one id column: its values through the input's categories when it has them
    (a categorical column whose categories are the input's own: its codes), else integers."""
    categories = (front.categories or {}).get(front.columns[j])
    if categories is None:
        if _is_categorical(col):
            raise TypeError(f"{label} is categorical, but the embedding input has no categories for it, so its "
                            "codes would depend on this frame's categories; build the input with "
                            "EmbeddingInput.from_frame (it keeps the categories) or pass integer ids")
        a = _column_array(col, label)
        if a.dtype.kind not in "iu":
            hint = (" (a pandas integer column with missing values becomes float: fill or drop them)"
                    if a.dtype.kind == "f" else "; map the values to ids, or build the input with "
                    "EmbeddingInput.from_frame, which keeps the categories")
            raise TypeError(f"{label} feeds an embedding table and must hold integer ids, got "
                            f"{_describe_kind(a)}{hint}")
        return a
    if _is_categorical(col) and col.cat.categories.tolist() == categories:
        codes = col.cat.codes.to_numpy().astype(np.int64)
        values = None
    else:
        values = np.asarray(col.astype(object) if _is_categorical(col) else _column_array(col, label), dtype=object)
        lookup = {v: i for i, v in enumerate(categories)}
        codes = np.fromiter((lookup.get(v, -1) for v in values.tolist()), np.int64, len(values))
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        value = col.iloc[bad[0]] if _is_series(col) else values[bad[0]]
        raise ValueError(f"{label} has {value!r} at row {bad[0]}, which is not among the {len(categories)} categories "
                         "the embedding input was built with")
    return codes


def embedding_spec(frame, columns, dense_columns=None, vocab_sizes=None):
    """The arguments of an :class:`~dselectk.embedding.EmbeddingInput` for the DataFrame (or dict
    of columns) ``frame``: ``columns`` {id column: table width}; ``dense_columns`` the numeric
    columns appended as dense features (default: every other column); ``vocab_sizes`` {column: V}
    for columns whose vocabulary is larger than what ``frame`` shows. A categorical column keeps
    its categories (vocabulary = their number), a string / object column its sorted distinct
    values; an integer column's vocabulary is max + 1 (ids must be >= 0)."""
    if not isinstance(columns, Mapping) or not columns:
        raise TypeError("columns must be a dict {id column name: table width}, e.g. {'user': 64, 'movie': 64}")
    cols, _ = _columns_of(frame, "frame")
    names = [str(c) for c in columns]
    missing = [c for c in names if c not in cols]
    if missing:
        raise ValueError(f"frame lacks the columns {missing}; it has {list(cols)}")
    given = dict(vocab_sizes or {})
    vocab, categories = [], {}
    for c in names:
        col = cols[c]
        if _is_categorical(col):
            cats = col.cat.categories.tolist()
        else:
            a = _column_array(col, f"frame[{c!r}]")
            if a.dtype.kind in "iu":
                if a.size and a.min() < 0:
                    raise ValueError(f"frame[{c!r}] holds negative ids ({a.min()}); ids must be >= 0")
                cats = None
                vocab.append(int(given.pop(c, int(a.max()) + 1 if a.size else 1)))
                continue
            if a.dtype.kind == "f":
                raise TypeError(f"frame[{c!r}] holds floats; an id column holds integers, strings or categories")
            cats = sorted(set(a.tolist()), key=lambda v: (type(v).__name__, v))
        for v in cats:
            if not isinstance(v, (str, int, float, bool)) or isinstance(v, float) and not np.isfinite(v):
                raise TypeError(f"frame[{c!r}] has the category {v!r}; categories must be strings or numbers (they "
                                "are saved with the model as JSON)")
        categories[c] = [v.item() if isinstance(v, np.generic) else v for v in cats]
        vocab.append(int(given.pop(c, len(cats))))
    if given:
        raise ValueError(f"vocab_sizes names columns that are not id columns: {sorted(given)}")
    if dense_columns is None:
        dense_columns = [c for c in cols if c not in names]
    dense_columns = [str(c) for c in dense_columns]
    for c in dense_columns:
        if c not in cols:
            raise ValueError(f"frame lacks the dense column {c!r}")
        _numeric_column(cols[c], f"frame[{c!r}]")
    return dict(vocab_sizes=vocab, dims=[columns[c] for c in columns], n_dense=len(dense_columns), columns=names,
                dense_columns=dense_columns, categories=categories or None)


def num_rows(X):
    """N of a checked model input: an array's first dimension, or that of X['ids']."""
    return X["ids"].shape[0] if isinstance(X, Mapping) else X.shape[0]


def take_rows(X, idx):
    """The rows ``idx`` (an index array or a slice) of a checked model input, an array or a dict of
    arrays."""
    if isinstance(X, Mapping):
        return {k: None if v is None else v[idx] for k, v in X.items()}
    return X[idx]


# --- tasks: Y and sample weights ------------------------------------------------------------

def check_task_names(names, n_tasks):
    """``task_names`` of a model: one distinct, non-empty string per task (a str for one task),
    none of them colliding with fit's own log keys."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"task_names must be a list of strings, one per task, got {names!r}")
    if len(names) != n_tasks:
        raise ValueError(f"task_names has {len(names)} entries, expected one per task ({n_tasks})")
    for n in names:
        if not n or n.strip() != n or n in _RESERVED_TASK_NAMES or n.startswith("val_"):
            raise ValueError(f"task name {n!r} is not allowed: names must be non-empty, without surrounding spaces, "
                             f"not start with 'val_' and not be one of {_RESERVED_TASK_NAMES}")
    if len(set(names)) != len(names):
        raise ValueError(f"task_names must be distinct, got {list(names)}")
    return list(names)


def task_names(model):
    """The model's task names: ``model.task_names`` or task0, task1, ..."""
    names = getattr(model, "task_names", None)
    return list(names) if names else [f"task{t}" for t in range(model.n_tasks)]


def _named(model):
    names = getattr(model, "task_names", None)
    return names is not None and names != [f"task{t}" for t in range(model.n_tasks)]


def _label(model, name, t, by_name):
    """How a task's entry is called in messages: Y[0], Y['watch'], or Y[0] (task 'watch')."""
    task = task_names(model)[t]
    if by_name:
        return f"{name}[{task!r}]"
    return f"{name}[{t}]" + (f" (task {task!r})" if _named(model) else "")


def _per_task(model, value, name, what):
    """value (a list / tuple per task, a dict by task name or a DataFrame of task columns) as
    [(label, entry)] in task order."""
    T, names = model.n_tasks, task_names(model)
    if _is_frame(value) or isinstance(value, Mapping):
        keys = [str(k) for k in (value.columns if _is_frame(value) else value)]
        missing, unknown = [n for n in names if n not in keys], [k for k in keys if k not in names]
        if missing or unknown:
            hint = "" if _named(model) else "; name the model's tasks with task_names=[...]"
            raise ValueError(f"{name} must give one entry per task {names}; missing {missing}, unknown {unknown}{hint}")
        lookup = {str(k): k for k in (value.columns if _is_frame(value) else value)}
        return [(_label(model, name, t, True), value[lookup[n]]) for t, n in enumerate(names)]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if len(value) != T:
        raise ValueError(f"{name} has {len(value)} tasks, the model has {T}")
    return [(_label(model, name, t, False), v) for t, v in enumerate(value)]


_EXPECTED = {"bce": "numbers in [0, 1] (0/1 labels or probabilities)", "mse": "real numbers",
             "softmax_ce": "integer class labels"}


def _targets(label, y, loss, dim, N, dtype):
    y = _column_array(y, label) if _is_series(y) else np.asarray(y)
    if y.ndim == 0:
        raise ValueError(f"{label} must be an array with one row per example of X ({N}), got a scalar")
    if y.shape[0] != N:
        raise ValueError(f"{label} has {y.shape[0]} rows, X has {N}")
    if y.dtype.kind not in "biuf":
        hint = " (encode them first, e.g. with pandas.Categorical(y).codes)" if loss != "mse" else ""
        raise TypeError(f"{label} ({loss}) must hold {_EXPECTED[loss]}, got {_describe_kind(y)} (dtype "
                        f"{y.dtype}){hint}")
    if loss == "softmax_ce":
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{label} (softmax_ce) must be integer class labels of shape (N,), got "
                             f"{y.dtype} {y.shape}")
        bad = np.flatnonzero((y < 0) | (y >= dim))
        if bad.size:
            raise ValueError(f"{label} has label {y[bad[0]]} at row {bad[0]}; expected 0 <= label < {dim}")
        return y.astype(np.int64)
    want = (N,) if dim == 1 else (N, dim)
    if y.shape != want and not (dim == 1 and y.shape == (N, 1)):
        raise ValueError(f"{label} ({loss}) must have shape {want}, got {y.shape}")
    y = to_dtype(y, dtype, label).reshape(N, dim)
    if loss == "bce":
        bad = np.flatnonzero(((y < 0) | (y > 1)).reshape(-1))
        if bad.size:
            raise ValueError(f"{label} (bce) must hold targets in [0, 1], got {y.reshape(-1)[bad[0]]} at row {bad[0]}")
    return y


def check_Y(model, Y, N, name="Y"):
    """The targets, checked per task against its loss and output size, as a list in task order
    (float targets (N, d) of the model's dtype; int64 labels (N,) for softmax_ce). See the module
    docstring for the accepted forms."""
    T = model.n_tasks
    if _is_series(Y) and T == 1:
        Y = [Y]
    elif isinstance(Y, np.ndarray):
        if T == 1:
            Y = [Y]
        elif Y.ndim == 2 and Y.shape[1] == T and all(d == 1 or loss == "softmax_ce"
                                                      for d, loss in zip(model.task_outputs, model.task_losses)):
            Y = [Y[:, t] for t in range(T)]
        else:
            raise ValueError(f"{name} for {T} tasks must be a list, a dict by task name or a DataFrame, or an (N, {T}) "
                             f"array when every task has one target column; got an array of shape {Y.shape}")
    entries = _per_task(model, Y, name, f"a list with one array per task ({T}), a dict by task name or a DataFrame")
    return [_targets(label, y, loss, dim, N, model.dtype)
            for (label, y), loss, dim in zip(entries, model.task_losses, model.task_outputs)]


def check_weights(model, sample_weights, N, name="sample_weights"):
    """None, or per task None or (N,) finite weights >= 0 of the model's dtype."""
    if sample_weights is None:
        return None
    if isinstance(sample_weights, np.ndarray) or _is_series(sample_weights):
        sample_weights = [sample_weights] * model.n_tasks
    entries = _per_task(model, sample_weights, name,
                        "None, an (N,) array for every task, a list per task or a dict by task name")
    out = []
    for label, w in entries:
        if w is None:
            out.append(None)
            continue
        w = _column_array(w, label) if _is_series(w) else np.asarray(w)
        if w.shape != (N,):
            raise ValueError(f"{label} must have shape ({N},) (one weight per example), got {w.shape}")
        w = to_dtype(w, model.dtype, label)
        if np.any(w < 0):
            raise ValueError(f"{label} must be >= 0, got {w[np.argmax(w < 0)]} at row {int(np.argmax(w < 0))}")
        out.append(w)
    return out


# --- batches ----------------------------------------------------------------------------------

class Batch(NamedTuple):
    """One checked batch: X (array or {"ids", "dense"}), Y (list per task), W (None or list per
    task), size (rows).

    In a data-parallel fit (dselectk.distributed) a rank's batch is its share of a global batch:
    rows [offset, offset + size) of ``global_size`` (None: the batch is the whole of it). A share
    of size 0 holds one stand-in row (the rank runs its layers, whose random counters must stay
    in step with the other ranks', and its gradients count with weight 0)."""
    X: Any
    Y: list
    W: list | None
    size: int
    offset: int = 0
    global_size: int | None = None

    @property
    def rows_in_step(self):
        """The rows of the whole (global) batch this step trains on."""
        return self.size if self.global_size is None else self.global_size


def _take(arrays, idx):
    return None if arrays is None else [None if a is None else a[idx] for a in arrays]


class ArrayData:
    """X, Y, sample weights held as (checked) arrays: batches are rows taken from them."""

    def __init__(self, model, X, Y=None, sample_weights=None, name="X", need_targets=True):
        self.X = check_X(model, X, name)
        self.n_examples = num_rows(self.X)
        suffix = name[1:]  # "X_val" -> "_val"
        self.Y = check_Y(model, Y, self.n_examples, "Y" + suffix) if need_targets or Y is not None else None
        self.W = check_weights(model, sample_weights, self.n_examples, "sample_weights" + suffix)
        self.columns = input_columns(X) if getattr(model, "input_layer", None) is None else None

    def steps(self, batch_size):
        return (self.n_examples + batch_size - 1) // batch_size

    def batches(self, batch_size, rng=None):
        """The batches of one pass, in order, or shuffled by ``rng.permutation(N)`` when given."""
        order = None if rng is None else rng.permutation(self.n_examples)
        for start in range(0, self.n_examples, batch_size):
            idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            yield self.take(idx)

    def take(self, idx, offset=0, global_size=None):
        """The :class:`Batch` of rows ``idx`` (a slice or an index array)."""
        Xb = take_rows(self.X, idx)
        return Batch(Xb, _take(self.Y, idx), _take(self.W, idx), num_rows(Xb), offset, global_size)


def is_batch_source(obj) -> bool:
    """True for what :class:`BatchStream` reads: a Sequence-like object (len + getitem), an
    iterable or an iterator that is not an array, a DataFrame, a dict, a list or a tuple."""
    if isinstance(obj, (np.ndarray, Mapping, list, tuple, str, bytes)) or _is_frame(obj) or _is_series(obj):
        return False
    return (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")) or isinstance(obj, (Iterable, Iterator))


class BatchStream:
    """Batches from a batch source (see the module docstring), each checked as it arrives.

    ``steps_per_epoch``: for an iterator, the batches drawn per epoch (default: until it is
    exhausted, which allows one epoch only); for a Sequence, the first that many batches of it."""

    def __init__(self, model, source, name="X", steps_per_epoch=None, need_targets=True):
        self.model, self.source, self.name, self.need_targets = model, source, name, need_targets
        self.is_sequence = hasattr(source, "__len__") and hasattr(source, "__getitem__")
        self.is_iterator = isinstance(source, Iterator)
        if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
                                            or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be None or a positive int, got {steps_per_epoch!r}")
        self.steps_per_epoch = steps_per_epoch
        if self.is_sequence:
            if len(source) == 0:
                raise ValueError(f"{name}: the batch source is empty (len 0)")
            self.steps_per_epoch = min(len(source), steps_per_epoch or len(source))
        self.n_examples = None
        self.columns = None
        self._exhausted = False

    def steps(self, batch_size=None):
        return self.steps_per_epoch

    def _items(self, rng):
        if self.is_sequence:
            order = np.arange(self.steps_per_epoch) if rng is None else rng.permutation(self.steps_per_epoch)
            for i in order:
                yield int(i), self.source[int(i)]
            return
        if self.is_iterator and self._exhausted:
            raise ValueError(f"{self.name}: the iterator was exhausted in the previous epoch; pass a Sequence (len and "
                             "getitem), an iterable that restarts (iter() per epoch), or steps_per_epoch")
        it = self.source if self.is_iterator else iter(self.source)
        for i in range(self.steps_per_epoch or sys.maxsize):
            try:
                item = next(it)
            except StopIteration:
                if self.is_iterator:
                    self._exhausted = True
                if i == 0:
                    raise ValueError(f"{self.name}: the batch source gave no batches") from None
                return
            yield i, item

    def batches(self, batch_size=None, rng=None):
        """The batches of one epoch (a Sequence's shuffled by ``rng`` when given), checked."""
        for i, item in self._items(rng):
            yield self._check(i, item)
        if hasattr(self.source, "on_epoch_end"):
            self.source.on_epoch_end()

    def _check(self, i, item):
        where = f"{self.name} batch {i}"
        if isinstance(item, tuple) and 2 <= len(item) <= 3:
            Xb, Yb, Wb = item if len(item) == 3 else (*item, None)
        elif not self.need_targets:
            Xb, Yb, Wb = item[0] if isinstance(item, tuple) and len(item) == 1 else item, None, None
        else:
            raise TypeError(f"{where} must be a tuple (X, Y) or (X, Y, sample_weights), got {type(item).__name__}")
        Xb = check_X(self.model, Xb, f"{where}: X")
        N = num_rows(Xb)
        Yc = check_Y(self.model, Yb, N, f"{where}: Y") if Yb is not None or self.need_targets else None
        return Batch(Xb, Yc, check_weights(self.model, Wb, N, f"{where}: sample_weights"), N)


def make_data(model, X, Y=None, sample_weights=None, name="X", steps_per_epoch=None, need_targets=True):
    """:class:`ArrayData` for arrays / DataFrames (checked now, whole), :class:`BatchStream` for a
    batch source (then Y and sample_weights must be None: they come with each batch)."""
    if is_batch_source(X):
        if Y is not None or sample_weights is not None:
            raise ValueError(f"{name} is a batch source, which yields (X, Y[, sample_weights]) batches: pass Y=None "
                             "and no sample_weights")
        return BatchStream(model, X, name, steps_per_epoch, need_targets)
    if steps_per_epoch is not None:
        raise ValueError("steps_per_epoch is for batch sources (generators, Sequences); arrays are split by "
                         "batch_size")
    if need_targets and Y is None:
        raise TypeError(f"Y is required with {name} as an array or DataFrame (only a batch source yields its own)")
    return ArrayData(model, X, Y, sample_weights, name, need_targets)
