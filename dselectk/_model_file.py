"""A model file is untrusted input: what :func:`dselectk.save` writes, as a schema, and the checks
that :func:`dselectk.load` runs on a file before it builds anything from it.

The file is an ``.npz`` (a zip archive of ``.npy`` members, never pickles) holding

* ``meta``: a 0-d str array, a JSON object: ``format`` ("dselectk-model"), ``version`` (an int the
  reader knows), ``cls`` (a model class name), ``config`` (the class's constructor arguments),
  ``index`` (``[[name, shape, offset], ...]``: the parameters' place in ``params``), ``tables``
  (``[[name, [V, d]], ...]``, format version 2 on) and ``training`` (a saved training state: a
  dict, checked by the code that restores it);
* ``params``: the parameter slab, 1-D, of the config's dtype; ``table_<name>``: the embedding
  tables; ``train_*``: the arrays of a saved training state; ``buffer_gate<t>.<name>``: the
  gates' non-trainable state (hash routing's id -> expert assignment), listed in meta ``buffers``
  (``[[name, shape], ...]``, format version 4), integer arrays whose values the gate checks when
  it takes them back.

What is checked, in this order, each failure a ValueError naming the file and the field:

1. the archive: a zip file (a ``.npy`` or any other file is named as what it is); only the members
   above; each member a plain ``.npy`` (no object dtype) whose header's shape and dtype account
   exactly for the member's bytes, and whose bytes the archive's own size bounds (stored: at most
   the compressed size, deflated: at most 1032 times it, deflate's ratio limit). So nothing is
   allocated beyond what the file holds before a byte of data is read;
2. the metadata: the keys and types above (known keys only); ``config``: only keys that are
   parameters of ``cls`` and of the type each takes (:data:`CONFIG_TYPES`); ``index``: names
   unique, shapes of ints >= 0, offsets contiguous from 0, covering ``params`` exactly;
   ``tables``: the ``table_<name>`` members, with the shapes listed and the config's embeddings;
   ``buffers``: the ``buffer_<name>`` members, integer arrays of the shapes listed;
3. sizes against the file: the parameters that the config's layer widths, experts and tasks need
   at the least (:func:`parameter_floor`) must fit in ``params``, so that a config edited to
   ``expert_units=[10**6, 10**6]`` is refused before the model is built (it would allocate TiBs).

What the config's values mean (k <= n_experts, a known loss, ...) is checked by the constructors,
whose ValueError / TypeError ``load`` reports as a ValueError naming the file.
"""
from __future__ import annotations

import inspect
import json
import math
import numbers
import struct
import tokenize
import zipfile
import zlib

import numpy as np

from ._memory import mlp_parameters

__all__ = ["ModelFile", "read", "validate", "parameter_floor", "CONFIG_TYPES"]

# Deflate cannot expand data more than about 1032:1; a member claiming more is corrupted.
_DEFLATE_MAX_RATIO = 1032
_META_KEYS = {"format": True, "version": True, "cls": True, "config": True, "index": True, "tables": False,
              "training": False, "buffers": False}  # key -> required
_NPY_HEADER_MAX = 10_000  # numpy's own limit; it writes headers of a few hundred bytes


class ModelFile:
    """The parts of a model file, read and checked by :func:`read`: ``meta`` (the parsed JSON),
    ``params``, ``tables`` ({name: array}), ``extra`` ({member: array}, the ``train_*`` arrays) and
    ``buffers`` ({name: array}, the gates' ``buffer_*`` arrays)."""

    def __init__(self, path, meta, params, tables, extra, buffers=None):
        self.path, self.meta, self.params, self.tables, self.extra = path, meta, params, tables, extra
        self.buffers = buffers or {}


def _fail(path, what):
    raise ValueError(f"{path}: {what}")


# --- 1. the archive ------------------------------------------------------------------------------

_UNREADABLE = "not a readable dselectk model file"
# what zipfile raises for a damaged archive: a flipped bit can mark a member encrypted
# (RuntimeError), its name UTF-8 (UnicodeDecodeError), or break its deflated data (zlib.error)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, UnicodeDecodeError,
               EOFError, OSError, zlib.error, struct.error)


def _describe_non_zip(path):
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        what = "it is a single NumPy array (.npy)"
    elif head.startswith(b"PK"):
        what = "a zip archive without its directory (truncated or corrupted)"
    elif not head:
        what = "the file is empty"
    else:
        what = f"it is not a zip archive (it starts with {head!r})"
    return f"{_UNREADABLE}: {what}; dselectk.save writes an .npz archive"


def _member_header(path, zf, info):
    """(shape, dtype) from a member's .npy header, after checking that they account exactly for
    the member's bytes and that the archive's size bounds those bytes."""
    name = info.filename
    if info.flag_bits & 0x1:
        _fail(path, f"member {name!r} is encrypted; dselectk.save writes plain members")
    if info.compress_type == zipfile.ZIP_STORED:
        bound = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        bound = _DEFLATE_MAX_RATIO * info.compress_size + 1024
    else:
        _fail(path, f"member {name!r} uses zip compression method {info.compress_type}; dselectk.save writes "
                    "stored (or deflated) members")
    if info.file_size > bound:
        _fail(path, f"member {name!r} claims {info.file_size} bytes from {info.compress_size} in the archive: "
                    "corrupted")
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if reader is None:
                _fail(path, f"member {name!r} has .npy format version {version}, expected 1.0 or 2.0")
            shape, _, dtype = reader(f, max_header_size=_NPY_HEADER_MAX)  # (shape, fortran order, dtype)
            header_size = f.tell()
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, SyntaxError, TypeError, RecursionError,
            tokenize.TokenError) as exc:  # numpy parses a damaged header with ast, then tokenize
        _fail(path, f"member {name!r} is not a readable .npy array ({type(exc).__name__}: {exc})")
    if dtype.hasobject:
        _fail(path, f"member {name!r} holds Python objects (dtype {dtype}); a model file holds numbers only")
    nbytes = math.prod(shape) * dtype.itemsize
    if header_size + nbytes != info.file_size:
        _fail(path, f"member {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) but holds "
                    f"{info.file_size - header_size} bytes: truncated or corrupted")
    return shape, dtype


def read(path):
    """The parts of the model file ``path`` (a :class:`ModelFile`), after the archive checks (1.
    in the module docstring); ValueError for anything that is not a well-formed dselectk .npz."""
    try:
        if not zipfile.is_zipfile(path):
            _fail(path, _describe_non_zip(path))
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                _fail(path, "the archive lists a member twice: corrupted")
            arrays = {}
            for info in infos:
                if not info.filename.endswith(".npy"):
                    _fail(path, f"{_UNREADABLE}: unexpected member {info.filename!r} (it holds .npy arrays only)")
                key = info.filename[:-4]
                if key not in ("meta", "params") and not key.startswith(("table_", "train_", "buffer_")):
                    _fail(path, f"{_UNREADABLE}: unexpected array {key!r} (it holds meta, params, table_<name>, "
                                "train_<name> and buffer_<name>)")
                arrays[key] = _member_header(path, zf, info)
    except _ZIP_ERRORS as exc:
        _fail(path, f"{_UNREADABLE} ({type(exc).__name__}: {exc})")
    for required in ("meta", "params"):
        if required not in arrays:
            _fail(path, f"{_UNREADABLE}: no {required!r} array (it has {sorted(arrays)})")
    meta_shape, meta_dtype = arrays["meta"]
    if meta_shape != () or meta_dtype.kind != "U":
        _fail(path, f"'meta' must be a 0-d str array (JSON), got shape {meta_shape} of {meta_dtype}")
    params_shape, params_dtype = arrays["params"]
    if len(params_shape) != 1 or params_dtype.newbyteorder("=") not in (np.float32, np.float64):
        _fail(path, f"'params' must be a 1-D float32 or float64 array, got shape {params_shape} of {params_dtype}")
    try:
        with np.load(path, allow_pickle=False) as z:
            loaded = {key: z[key] for key in arrays}
    except (ValueError, *_ZIP_ERRORS) as exc:  # e.g. a CRC error in the data
        _fail(path, f"{_UNREADABLE} ({type(exc).__name__}: {exc})")
    try:
        meta = json.loads(str(loaded["meta"][()]))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        _fail(path, f"'meta' is not valid JSON ({type(exc).__name__}: {exc})")
    if not isinstance(meta, dict):
        _fail(path, f"'meta' must be a JSON object, got {type(meta).__name__}")
    tables = {k[len("table_"):]: v for k, v in loaded.items() if k.startswith("table_")}
    extra = {k: v for k, v in loaded.items() if k.startswith("train_")}
    buffers = {k[len("buffer_"):]: v for k, v in loaded.items() if k.startswith("buffer_")}
    return ModelFile(path, meta, loaded["params"], tables, extra, buffers)


# --- 2. the metadata -----------------------------------------------------------------------------

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _size(v):
    return _is_int(v) and v >= 1


def _list_of(check, min_len=0, max_len=None):
    def ok(v):
        return (isinstance(v, list) and len(v) >= min_len and (max_len is None or len(v) <= max_len)
                and all(check(x) for x in v))
    return ok


def _one_of(*checks):
    return lambda v: any(c(v) for c in checks)


def _none(v):
    return v is None


def _str(v):
    return isinstance(v, str)


def _bool(v):
    return isinstance(v, bool)


def _json_scalar(v):
    return v is None or isinstance(v, (str, bool, int)) or _is_number(v)


# An embedding input's config as EmbeddingInput.config stores it (vocab_sizes and dims as lists),
# key -> check; tests/test_model_file.py asserts these are the keys EmbeddingInput takes.
EMBEDDINGS_TYPES = {
    "vocab_sizes": _list_of(_size, 1),
    "dims": _one_of(_size, _list_of(_size, 1)),
    "n_dense": lambda v: _is_int(v) and v >= 0,
    "columns": _list_of(_str, 1),
    "dense_columns": _list_of(_str),
    "categories": lambda v: isinstance(v, dict) and all(_list_of(_json_scalar)(c) for c in v.values()),
}


def _embeddings(v):
    return (isinstance(v, dict) and set(v) <= set(EMBEDDINGS_TYPES) and {"vocab_sizes", "dims"} <= set(v)
            and all(EMBEDDINGS_TYPES[key](value) for key, value in v.items()))


_PAIR = _one_of(_size, _list_of(_size, 2, 2))
# The type of every config key any model class takes: (check, what it must be). A key that a class
# does not take is refused; a constructor parameter without an entry here fails
# tests/test_model_file.py::test_every_constructor_parameter_has_a_type, so that the schema keeps up.
CONFIG_TYPES = {
    "input_dim": (_one_of(_none, _size), "None or an int >= 1"),
    "n_tasks": (_size, "an int >= 1"),
    "n_experts": (_size, "an int >= 1"),
    "expert_units": (_list_of(_size), "a list of ints >= 1"),
    "tower_units": (_one_of(_none, _list_of(_size)), "None or a list of ints >= 1"),
    "bottom_units": (_list_of(_size), "a list of ints >= 1"),
    "task_losses": (_one_of(_str, _list_of(_str, 1)), "a loss name or a list of them"),
    "task_outputs": (_one_of(_size, _list_of(_size, 1)), "an int >= 1 or a list of them"),
    "task_weights": (_one_of(_none, _is_number, _list_of(_is_number, 1)), "None, a number or a list of numbers"),
    "task_names": (_one_of(_none, _str, _list_of(_str, 1)), "None, a name or a list of names"),
    "gate": (lambda v: True, "checked by models._gate_spec_of: a gate config dict (or a kind string)"),
    "dropout": (_is_number, "a finite number"),
    "tower_dropout": (_one_of(_none, _is_number), "None or a finite number"),
    "seed": (_one_of(_none, _is_int), "None or an int"),
    "dtype": (lambda v: v in ("float32", "float64"), "'float32' or 'float64'"),
    "expert_output": (lambda v: v in (None, "sum"), "None or 'sum'"),
    "embeddings": (_one_of(_none, _embeddings),
                   "None or {'vocab_sizes': [ints >= 1], 'dims': int(s) >= 1, 'n_dense': int >= 0, and optionally "
                   "'columns', 'dense_columns': [names], 'categories': {name: [values]}}"),
    "expert": (_str, "an expert kind ('mlp' or 'cnn')"),
    "bottom": (_str, "a bottom kind ('mlp' or 'cnn')"),
    "input_shape": (_one_of(_none, _list_of(_size, 3, 3)), "None or [C, H, W] of ints >= 1"),
    "expert_filters": (_list_of(_size, 1), "a list of ints >= 1"),
    "bottom_filters": (_list_of(_size, 1), "a list of ints >= 1"),
    "expert_kernel": (_PAIR, "an int >= 1 or [KH, KW]"),
    "bottom_kernel": (_PAIR, "an int >= 1 or [KH, KW]"),
    "expert_pool": (_PAIR, "an int >= 1 or [PH, PW]"),
    "bottom_pool": (_PAIR, "an int >= 1 or [PH, PW]"),
    "loss": (_str, "a loss name"),
    "output_dim": (_size, "an int >= 1"),
}
# The gate's options were flat config keys in format versions 1 and 2 (gate: a kind string).
FLAT_GATE_TYPES = {
    "k": (_size, "an int >= 1"), "gamma": (_is_number, "a finite number"),
    "entropy_reg": (_is_number, "a finite number"), "xi": (_is_number, "a finite number"),
    "per_example": (_bool, "true or false"), "noisy": (_bool, "true or false"),
    "temperature": (_is_number, "a finite number"),
}


def config_keys(cls):
    """The config keys ``cls`` takes: its constructor's named parameters."""
    return [name for name, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_config(path, cls, config):
    flat_gate = isinstance(config.get("gate"), str)
    known = set(config_keys(cls)) | (set(FLAT_GATE_TYPES) if flat_gate else set())
    unknown = sorted(set(config) - known)
    if unknown:
        _fail(path, f"config has unknown key(s) {unknown} for {cls.__name__} (known: {sorted(known)})")
    for key, value in config.items():
        check, expected = CONFIG_TYPES.get(key) or FLAT_GATE_TYPES.get(key) or (None, None)
        if check is None:
            _fail(path, f"config[{key!r}]: this dselectk has no type for that key (tests/test_model_file.py "
                        "asserts every constructor parameter has one)")
        if not check(value):
            _fail(path, f"config[{key!r}] must be {expected}, got {_short(value)}")


def _short(value, limit=120):
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_index(path, index, n_params):
    if not isinstance(index, list):
        _fail(path, f"'index' must be a list of [name, shape, offset], got {type(index).__name__}")
    names, offset = set(), 0
    for i, entry in enumerate(index):
        if not (isinstance(entry, list) and len(entry) == 3 and _str(entry[0])
                and _list_of(lambda d: _is_int(d) and d >= 0)(entry[1]) and _is_int(entry[2])):
            _fail(path, f"index[{i}] must be [name, [dims >= 0], offset], got {_short(entry)}")
        name, shape, start = entry
        if name in names:
            _fail(path, f"index[{i}]: the parameter {name!r} is listed twice")
        if start != offset:
            _fail(path, f"index[{i}] ({name!r}) starts at {start}, expected {offset} (parameters are contiguous)")
        names.add(name)
        offset += math.prod(shape)
        if offset > n_params:
            _fail(path, f"the stored parameters do not match 'index': index[{i}] ({name!r}) ends at {offset}, past "
                        f"the {n_params} values of 'params'")
    if offset != n_params:
        _fail(path, f"the stored parameters do not match 'index': it covers {offset} values, 'params' holds "
                    f"{n_params}")


def _check_tables(path, meta, tables, dtype):
    listed = meta.get("tables", [])
    if not _list_of(lambda e: isinstance(e, list) and len(e) == 2 and _str(e[0]) and _list_of(_size, 2, 2)(e[1]))(
            listed):
        _fail(path, f"'tables' must be a list of [name, [V, d]], got {_short(listed)}")
    names = [name for name, _ in listed]
    if len(set(names)) != len(names) or set(names) != set(tables):
        _fail(path, f"'tables' lists {names} but the file holds the tables {sorted(tables)}")
    for name, shape in listed:
        t = tables[name]
        if list(t.shape) != shape or t.dtype.newbyteorder("=") != dtype:
            _fail(path, f"the embedding table {name!r} is {t.shape} of {t.dtype}, 'tables' and the config say "
                        f"{tuple(shape)} of {dtype}")
    emb = meta["config"].get("embeddings")
    if emb is not None:
        dims = emb["dims"] if isinstance(emb["dims"], list) else [emb["dims"]] * len(emb["vocab_sizes"])
        if [list(pair) for pair in zip(emb["vocab_sizes"], dims)] != [shape for _, shape in listed]:
            _fail(path, f"config['embeddings'] (vocab_sizes {emb['vocab_sizes']}, dims {emb['dims']}) does not "
                        f"match the stored tables {[shape for _, shape in listed]}")
    elif listed:
        _fail(path, f"the file holds embedding tables {names} but config['embeddings'] is None")


def _check_buffers(path, meta, buffers):
    listed = meta.get("buffers", [])
    if not _list_of(lambda e: isinstance(e, list) and len(e) == 2 and _str(e[0]) and _list_of(_size)(e[1]))(listed):
        _fail(path, f"'buffers' must be a list of [name, shape], got {_short(listed)}")
    names = [name for name, _ in listed]
    if len(set(names)) != len(names) or set(names) != set(buffers):
        _fail(path, f"'buffers' lists {names} but the file holds the buffers {sorted(buffers)}")
    for name, shape in listed:
        b = buffers[name]
        if list(b.shape) != shape or b.dtype.kind not in "iu":
            _fail(path, f"the gate buffer {name!r} is {b.shape} of {b.dtype}, 'buffers' says {tuple(shape)} of "
                        "integers")


def validate(f, classes, read_versions, format_name):
    """Checks 2. and 3. of the module docstring on ``f`` (a :class:`ModelFile`); returns the model
    class to build. ``classes``: {name: class}; ``read_versions``: the format versions this
    reader knows; ``format_name``: the ``format`` string."""
    path, meta = f.path, f.meta
    unknown = sorted(set(meta) - set(_META_KEYS))
    if unknown:
        _fail(path, f"'meta' has unknown key(s) {unknown} (known: {sorted(_META_KEYS)})")
    missing = [k for k, required in _META_KEYS.items() if required and k not in meta]
    if meta.get("format") != format_name:
        _fail(path, f"not a dselectk model file (meta 'format' is {_short(meta.get('format'))}, expected "
                    f"{format_name!r})")
    if missing:
        _fail(path, f"'meta' lacks the key(s) {missing}")
    version = meta["version"]
    if not _is_int(version) or version not in read_versions:
        _fail(path, f"written by model format version {_short(version)}; this dselectk reads versions "
                    f"{', '.join(map(str, read_versions))}")
    cls = classes.get(meta["cls"]) if _str(meta["cls"]) else None
    if cls is None:
        _fail(path, f"unknown model class {_short(meta['cls'])} (known: {sorted(classes)})")
    config = meta["config"]
    if not isinstance(config, dict):
        _fail(path, f"the model config must be a dict, got {type(config).__name__}")
    if "training" in meta and not isinstance(meta["training"], dict):
        _fail(path, f"'training' must be a dict, got {type(meta['training']).__name__}")
    _check_config(path, cls, config)
    dtype = np.dtype(config.get("dtype", "float32"))
    if f.params.dtype.newbyteorder("=") != dtype:
        _fail(path, f"'params' has dtype {f.params.dtype}, config['dtype'] is {dtype}")
    _check_index(path, meta["index"], f.params.size)
    _check_tables(path, meta, f.tables, dtype)
    _check_buffers(path, meta, f.buffers)
    floor, why = parameter_floor(cls.__name__, config)
    if floor > f.params.size:
        _fail(path, f"the config needs at least {floor} parameters ({why}), but 'params' holds {f.params.size}")
    return cls


# --- 3. sizes against the file -------------------------------------------------------------------

def _pair(v):
    return (v, v) if _is_int(v) else tuple(v)


def _cnn_floor(input_shape, filters, kernel, pool, units):
    """(parameters, output width) of a CNN stack (layers.CNNExpert: valid convolutions, max pooling
    with stride = kernel, then Dense layers); parameters 0 when the input is too small (the
    constructor refuses it)."""
    (kh, kw), (ph, pw) = _pair(kernel), _pair(pool)
    c, h, w = input_shape
    total = 0
    for f in filters:
        total += f * c * kh * kw + f
        h, w = h - kh + 1, w - kw + 1
        if h < ph or w < pw:
            return 0, units[-1] if units else c
        h, w, c = (h - ph) // ph + 1, (w - pw) // pw + 1, f
    return total + mlp_parameters(c * h * w, units), units[-1] if units else c * h * w


def parameter_floor(cls_name, config):
    """(n, what) with n a lower bound of the number of parameters a model of class ``cls_name``
    with ``config`` (type-checked) has: its experts (or shared bottom) and towers, gates not
    counted (pluggable; theirs grow with the experts' input anyway). ``what`` names the sizes that
    n comes from. A lower bound, so that a layer added to an architecture never makes a valid file
    fail this check; tests/test_model_file.py checks it against real models."""
    g = config.get
    T = g("n_tasks", 1)
    outputs = g("task_outputs", g("output_dim", 1))  # an int for all tasks, or a list (T may be huge)
    emb = g("embeddings")
    if emb is not None:
        dims = emb["dims"] if isinstance(emb["dims"], list) else [emb["dims"]] * len(emb["vocab_sizes"])
        p = sum(dims) + emb.get("n_dense", 0)
    else:
        p = g("input_dim") or 0
    kind = g("expert", g("bottom", "mlp"))
    prefix = "bottom" if cls_name == "SharedBottom" else "expert"
    units = g(f"{prefix}_units", [])
    if kind == "cnn" and g("input_shape") is not None:
        block, d = _cnn_floor(g("input_shape"), g(f"{prefix}_filters", [10, 20]), g(f"{prefix}_kernel", 5),
                              g(f"{prefix}_pool", 2), units)
        why = f"input_shape={g('input_shape')}, {prefix}_filters, {prefix}_units={_short(units)}"
    else:
        out = g("output_dim", 1) if cls_name == "MoE" else g("expert_output")  # "sum": no parameters
        block = mlp_parameters(p, units, out)
        d = 1 if out == "sum" else out if out is not None else units[-1] if units else p
        why = f"input width {p}, {prefix}_units={_short(units)}"
    n = 1 if cls_name == "SharedBottom" else g("n_experts", 1)
    total = n * block
    if cls_name != "SharedBottom":
        why += f", n_experts={n}"
    towers = g("tower_units", [])
    if cls_name != "MoE" and towers is not None:
        total += (sum(mlp_parameters(d, towers, out) for out in outputs[:T]) if isinstance(outputs, list)
                  else T * mlp_parameters(d, towers, outputs))
        why += f", n_tasks={T}, tower_units={_short(towers)}, task_outputs={_short(g('task_outputs'))}"
    return max(total, T if cls_name != "MoE" else 0), why
