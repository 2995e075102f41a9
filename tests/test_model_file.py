"""A model file is untrusted input (issue #16 item 1): ``dk.load`` validates the archive, the
metadata (dselectk/_model_file.py's schema) and the sizes against the parameters in the file before
it builds anything, and every failure is a ValueError naming the file and the field. Hypothesis
fuzzes the metadata JSON and the bytes of real saved files (tests/fuzzing.py's budget).
"""
from __future__ import annotations

import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import dselectk as dk
from dselectk import _model_file as MF
from dselectk import models as Mo
from fuzzing import fuzz_settings
from test_model_gate_config import _OLD, _TODAY, write_old_format

# small models of every kind the schema knows
MODELS = {
    "mmoe": lambda: dk.MMoE(4, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=(3,), seed=0),
    "mmoe_per_example_top_k": lambda: dk.MMoE(3, n_tasks=2, n_experts=4, expert_units=(5, 2), tower_units=(2,),
                                              gate=dk.gates.TopK(2, per_example=True), task_losses=["bce", "mse"],
                                              seed=1),
    "moe": lambda: dk.MoE(3, n_experts=2, expert_units=(3,), gate="softmax", output_dim=2, seed=2),
    "shared_bottom_embeddings": lambda: dk.SharedBottom(None, n_tasks=2, bottom_units=(4,), tower_units=(2,),
                                                        embeddings=dict(vocab_sizes=[5, 3], dims=[2, 3], n_dense=1),
                                                        seed=3),
    "mmoe_named_embeddings": lambda: dk.MMoE(None, n_tasks=1, n_experts=2, expert_units=(3,), tower_units=(2,),
                                             embeddings=dict(vocab_sizes=[5, 3], dims=[2, 2], n_dense=1,
                                                             columns=["user", "movie"], dense_columns=["age"],
                                                             categories={"movie": ["a", "b", "c"]}),
                                             task_names=["rating"], seed=6),
    "mmoe_cnn": lambda: dk.MMoE(expert="cnn", input_shape=(1, 12, 12), n_tasks=2, n_experts=2, expert_units=(3,),
                                expert_filters=(2, 3), expert_kernel=3, tower_units=(2,), task_losses="softmax_ce",
                                task_outputs=[3, 2], seed=4),
    "mmoe_no_towers_float64": lambda: dk.MMoE(3, n_tasks=2, n_experts=3, expert_units=(4,), tower_units=None,
                                              expert_output="sum", task_outputs=1, dtype="float64", seed=5),
}


def _save(model, path):
    dk.save(model, path)
    return path


def _parts(path):
    with np.load(path) as z:
        return json.loads(str(z["meta"][()])), {k: z[k] for k in z.files if k != "meta"}


def _write(path, meta, arrays):
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


def _edited(tmp_path, edit, model="mmoe"):
    """A copy of a saved model's file whose metadata ``edit(meta)`` changed."""
    meta, arrays = _parts(_save(MODELS[model](), tmp_path / "good.npz"))
    edit(meta)
    return _write(tmp_path / "bad.npz", meta, arrays)


def _rejects(path, *fields):
    """load raises ValueError naming the file and each of ``fields``."""
    with pytest.raises(ValueError) as info:
        dk.load(path)
    message = str(info.value)
    assert str(path) in message, message
    for field in fields:
        assert field in message, f"{field!r} not in {message!r}"
    return message


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_files_load(tmp_path, name):
    model = MODELS[name]()
    loaded = dk.load(_save(model, tmp_path / "m.npz"))
    assert type(loaded) is type(model) and loaded.config == model.config
    np.testing.assert_array_equal(loaded.slab.data, model.slab.data)


# ---------------------------------------------------------------------------------------------
# The cases of the issue
# ---------------------------------------------------------------------------------------------

def test_an_unknown_config_key(tmp_path):  # was TypeError from the constructor
    _rejects(_edited(tmp_path, lambda m: m["config"].update(lamda=0.1)), "unknown key", "lamda")


@pytest.mark.parametrize("config", [[1, 2], "MMoE", None, 3])
def test_a_config_that_is_not_a_dict(tmp_path, config):  # was TypeError
    _rejects(_edited(tmp_path, lambda m: m.update(config=config)), "config must be a dict")


@pytest.mark.parametrize("key", ["index", "config", "cls", "version"])
def test_a_missing_meta_key(tmp_path, key):  # no index was KeyError
    _rejects(_edited(tmp_path, lambda m: m.pop(key)), "lacks", key)


def test_huge_layers_in_a_small_file_are_refused_before_allocating(tmp_path):
    """expert_units=[10**6, 10**6] in a 1 kB file made load allocate ~7 TiB (MemoryError)."""
    path = _edited(tmp_path, lambda m: m["config"].update(expert_units=[10**6, 10**6]))
    assert path.stat().st_size < 10_000
    peak = _peak_bytes(lambda: _rejects(path, "expert_units", "at least"))
    assert peak < 2_000_000, f"load allocated {peak} bytes to refuse a {path.stat().st_size}-byte file"


def _peak_bytes(fn):
    """The peak of the memory traced (NumPy's arrays included) while fn() runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(n_experts=10**6), "n_experts"),
    (lambda c: c.update(n_tasks=10**7), "n_tasks"),
    (lambda c: c.update(input_dim=10**9), "input width"),
    (lambda c: c.update(tower_units=[10**5, 10**5]), "tower_units"),
    (lambda c: c.update(task_outputs=[10**8, 1]), "task_outputs"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_other_sizes_beyond_the_file(tmp_path, edit, field):
    _rejects(_edited(tmp_path, lambda m: edit(m["config"])), field, "at least")


def test_huge_cnn_input_in_a_small_file(tmp_path):
    path = _edited(tmp_path, lambda m: m["config"].update(input_shape=[1, 10**5, 10**5]), model="mmoe_cnn")
    _rejects(path, "input_shape", "at least")


def test_a_npy_file(tmp_path):  # was "'numpy.ndarray' object does not support the context manager protocol"
    np.save(tmp_path / "x.npy", np.zeros(3))
    _rejects(tmp_path / "x.npy", "not a readable dselectk model file", "single NumPy array (.npy)")


@pytest.mark.parametrize("content, what", [
    (b"", "empty"),
    (b"hello, world\n", "not a zip archive"),
    (b"PK\x03\x04" + b"\x00" * 40, "truncated or corrupted"),
])
def test_files_that_are_not_archives(tmp_path, content, what):
    (tmp_path / "f.npz").write_bytes(content)
    _rejects(tmp_path / "f.npz", "not a readable dselectk model file", what)


def test_other_archives(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    _rejects(tmp_path / "other.npz", "unexpected array 'a'")
    with zipfile.ZipFile(tmp_path / "text.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    _rejects(tmp_path / "text.zip", "unexpected member 'readme.txt'")
    np.savez(tmp_path / "no_params.npz", meta=np.array("{}"))
    _rejects(tmp_path / "no_params.npz", "no 'params'")


def _npy_bytes(header_shape, data=b"", dtype="<f4"):
    """An .npy member whose header claims ``header_shape`` over ``data``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": header_shape})
    return buf.getvalue() + data


def test_a_forged_array_header_is_refused_before_allocating(tmp_path):
    """params whose .npy header claims 2**40 floats in a member of a few bytes: numpy would
    allocate the claimed size before reading."""
    meta, _ = _parts(_save(MODELS["mmoe"](), tmp_path / "good.npz"))
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as zf:
        text = json.dumps(meta)
        zf.writestr("meta.npy", _npy_bytes((), text.encode("utf-32-le"), dtype=f"<U{len(text)}"))
        zf.writestr("params.npy", _npy_bytes((2**40,), b"\0" * 16))
    assert _peak_bytes(lambda: _rejects(path, "params", "truncated or corrupted")) < 2_000_000


def test_a_member_claiming_more_than_deflate_can_expand(tmp_path):
    good = _save(MODELS["mmoe"](), tmp_path / "good.npz")
    meta, arrays = _parts(good)
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    dk.load(path)  # a compressed file is still a model file
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("params.npy")
    # its central directory entry (the last "params.npy" in the file; the name follows a 46-byte
    # header), whose uncompressed size (offset 24) becomes 2**31: past deflate's ratio
    entry = raw.rindex(b"params.npy") - 46
    assert raw[entry:entry + 4] == b"PK\x01\x02"
    assert int.from_bytes(raw[entry + 24:entry + 28], "little") == info.file_size
    raw[entry + 24:entry + 28] = (2**31).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    _rejects(path, "params.npy", "claims")


@pytest.mark.parametrize("flip, what", [
    (lambda raw, entry: raw.__setitem__(entry + 8, raw[entry + 8] | 0x01), "encrypted"),  # the encryption flag
    (lambda raw, entry: (raw.__setitem__(entry + 9, raw[entry + 9] | 0x08),  # "the name is UTF-8" ...
                         raw.__setitem__(entry + 46, 0xFF)), "UnicodeDecodeError"),  # ... and it is not
])
def test_damaged_zip_directory_entries(tmp_path, flip, what):
    """Bits of params.npy's central directory entry that made zipfile raise RuntimeError and
    UnicodeDecodeError (without the file's name) from dk.load."""
    raw = bytearray(_save(MODELS["mmoe"](), tmp_path / "good.npz").read_bytes())
    entry = raw.rindex(b"params.npy") - 46
    assert raw[entry:entry + 4] == b"PK\x01\x02"
    flip(raw, entry)
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    _rejects(tmp_path / "bad.npz", what)


def test_an_object_array_is_refused(tmp_path):
    meta, arrays = _parts(_save(MODELS["mmoe"](), tmp_path / "good.npz"))
    path = tmp_path / "obj.npz"
    np.savez(path, meta=np.array(json.dumps(meta)), params=arrays["params"],
             table_x=np.array([{"a": 1}], dtype=object))
    _rejects(path, "table_x", "Python objects")


def test_meta_that_is_not_json(tmp_path):
    meta, arrays = _parts(_save(MODELS["mmoe"](), tmp_path / "good.npz"))
    np.savez(tmp_path / "a.npz", meta=np.array("{not json"), **arrays)
    _rejects(tmp_path / "a.npz", "'meta' is not valid JSON")
    np.savez(tmp_path / "b.npz", meta=np.array("[" * 100_000 + "]" * 100_000), **arrays)  # nesting: RecursionError
    _rejects(tmp_path / "b.npz", "'meta' is not valid JSON")
    np.savez(tmp_path / "c.npz", meta=np.array("[1, 2]"), **arrays)
    _rejects(tmp_path / "c.npz", "'meta' must be a JSON object")
    np.savez(tmp_path / "d.npz", meta=np.zeros(2), **arrays)
    _rejects(tmp_path / "d.npz", "'meta' must be a 0-d str array")


@pytest.mark.parametrize("edit, fields", [
    (lambda m: m.update(extra=1), ("unknown key", "extra")),
    (lambda m: m.update(format="something-else"), ("not a dselectk model file", "format")),
    (lambda m: m.update(version=True), ("format version true",)),
    (lambda m: m.update(version=999), ("format version 999",)),
    (lambda m: m.update(cls="Transformer"), ("unknown model class", "Transformer")),
    (lambda m: m.update(cls=["MMoE"]), ("unknown model class",)),
    (lambda m: m.update(index={"a": 1}), ("'index' must be a list",)),
    (lambda m: m["index"].__setitem__(0, ["expert0.W", [4, -4], 0]), ("index[0]",)),
    (lambda m: m["index"].__setitem__(0, ["expert0.W", [True, 4], 0]), ("index[0]",)),
    (lambda m: m["index"].__setitem__(1, m["index"][0]), ("index[1]", "listed twice")),
    (lambda m: m["index"][1].__setitem__(2, m["index"][1][2] + 1), ("index[1]", "starts at")),
    (lambda m: m["index"].pop(), ("do not match 'index'",)),
    (lambda m: m["config"].update(dtype="float64"), ("'params' has dtype float32", "float64")),
    (lambda m: m["config"].update(dtype="int8"), ("config['dtype']",)),
    (lambda m: m.update(tables=[["embedding0", [5, 2]]]), ("'tables' lists", "embedding0")),
], ids=lambda v: "-".join(v) if isinstance(v, tuple) else "")
def test_bad_metadata_names_the_field(tmp_path, edit, fields):
    _rejects(_edited(tmp_path, edit), *fields)


BAD_CONFIG_VALUES = [None, True, -1, 0, 1.5, float("nan"), "x", [], [True], {"a": 1}, [[1]], 10**30]


def _type_cases():
    for name in sorted(MODELS):
        model = MODELS[name]()
        for key in model.config:
            if key == "gate":  # the gate config's own schema: tests/test_model_gate_config.py
                continue
            for value in BAD_CONFIG_VALUES:
                yield pytest.param(name, key, value, id=f"{name}-{key}={value!r}")


@pytest.mark.parametrize("name, key, value", list(_type_cases()))
def test_every_config_value_of_a_wrong_type(tmp_path, name, key, value):
    """Every stored config key with values of other types: a model (when the value is valid for
    that key) or a ValueError naming the key; never another exception."""
    path = _edited(tmp_path, lambda m: m["config"].update({key: value}), model=name)
    try:
        dk.load(path)
    except ValueError as exc:
        assert str(path) in str(exc)


def _old_flat_file(tmp_path, edit=lambda config: None):
    """A format version 1 file (gate as a kind string, its options flat in the config)."""
    version, cls_name, config = _OLD["dselect_k_embeddings"]
    config = json.loads(json.dumps(config))
    edit(config)
    model = getattr(dk, cls_name)(**_TODAY["dselect_k_embeddings"][0])
    write_old_format(tmp_path / "old.npz", model, version, cls_name, config)
    return tmp_path / "old.npz"


def test_old_flat_format_still_loads_and_is_checked(tmp_path):
    assert isinstance(dk.load(_old_flat_file(tmp_path)), dk.MMoE)
    _rejects(_old_flat_file(tmp_path, lambda c: c.update(k="2")), "config['k']", "an int >= 1")
    _rejects(_old_flat_file(tmp_path, lambda c: c.update(noisy=1)), "config['noisy']", "true or false")
    _rejects(_old_flat_file(tmp_path, lambda c: c.update(lamda=0.1)), "unknown key", "lamda")
    _rejects(_old_flat_file(tmp_path, lambda c: c.update(expert_units=[10**6, 10**6])), "expert_units", "at least")


def test_flat_gate_keys_only_beside_a_kind_string(tmp_path):
    """The flat gate keys belong to versions 1-2 (gate a kind string); beside a gate config dict
    they are unknown keys, as the constructors would say."""
    _rejects(_edited(tmp_path, lambda m: m["config"].update(k=2)), "unknown key", "'k'")


def test_the_embeddings_keys_are_the_inputs():
    from dselectk import embedding
    assert set(MF.EMBEDDINGS_TYPES) == set(embedding._CONFIG_KEYS)


def test_the_flat_gate_keys_are_the_readers():
    assert set(MF.FLAT_GATE_TYPES) == set(Mo._FLAT_GATE_KEYS)


def test_every_constructor_parameter_has_a_type():
    """A parameter added to a model class must get its type in _model_file.CONFIG_TYPES."""
    for cls in Mo._CLASSES.values():
        missing = sorted(set(MF.config_keys(cls)) - set(MF.CONFIG_TYPES))
        assert not missing, f"{cls.__name__}: no entry in dselectk/_model_file.py CONFIG_TYPES for {missing}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_floor_is_a_lower_bound_of_real_models(name):
    model = MODELS[name]()
    floor, _ = MF.parameter_floor(type(model).__name__, json.loads(json.dumps(model.config)))
    assert 0 < floor <= model.num_parameters()
    assert floor >= 0.5 * model.num_parameters(), "the floor misses most of the model: it protects little"


def test_files_with_a_training_state_load(tmp_path):
    """A file saved after fit holds meta['training'] and train_* arrays (dselectk.checkpoint
    validates and restores them); the schema lets them through, and a 'training' that is not a
    dict is refused."""
    model = MODELS["mmoe"]()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 4)).astype(np.float32)
    dk.fit(model, X, [rng.standard_normal(16).astype(np.float32)] * 2, epochs=1, batch_size=8, verbose=0)
    meta, arrays = _parts(_save(model, tmp_path / "fitted.npz"))
    assert "training" in meta and any(k.startswith("train_") for k in arrays)
    loaded = dk.load(tmp_path / "fitted.npz")
    np.testing.assert_array_equal(loaded.slab.data, model.slab.data)
    _rejects(_write(tmp_path / "bad.npz", dict(meta, training=[1]), arrays), "'training' must be a dict")


# ---------------------------------------------------------------------------------------------
# Fuzzing: the metadata JSON and the bytes of real files
# ---------------------------------------------------------------------------------------------

_FILES = {}


def _real_file(tmp_path_factory, name):
    """(bytes, meta, arrays) of a saved model (``old_flat``: a format version 1 file)."""
    if name not in _FILES:
        folder = tmp_path_factory.mktemp("models")
        path = _old_flat_file(folder) if name == "old_flat" else _save(MODELS[name](), folder / f"{name}.npz")
        _FILES[name] = (path.read_bytes(), *_parts(path))
    return _FILES[name]


FUZZED_FILES = sorted(MODELS) + ["old_flat"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([10**30, -1, 0, 1, 2**31, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _loads_or_refuses(path):
    try:
        model = dk.load(path)
    except ValueError as exc:
        assert str(path) in str(exc), exc
        event("refused")
        return None
    event("loaded")
    return model


@fuzz_settings(0.6)
@given(data=st.data())
def test_fuzz_metadata(tmp_path_factory, data):
    """A node of the metadata replaced by a random JSON value (or deleted, or a key added)."""
    name = data.draw(st.sampled_from(FUZZED_FILES))
    _, meta, arrays = _real_file(tmp_path_factory, name)
    meta = json.loads(json.dumps(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(meta))))
        value = data.draw(json_values)
        if not path:
            meta = value if data.draw(st.booleans()) else {**meta, data.draw(st.text(max_size=6)): value}
            if not isinstance(meta, dict):
                break
            continue
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.integers(0, 3)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    file = tmp_path_factory.mktemp("fuzz") / "m.npz"
    np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
    _loads_or_refuses(file)


@fuzz_settings(0.6)
@given(data=st.data())
def test_fuzz_file_bytes(tmp_path_factory, data):
    """A real file truncated, or with bits flipped anywhere (headers, directory, data)."""
    name = data.draw(st.sampled_from(FUZZED_FILES))
    raw = bytearray(_real_file(tmp_path_factory, name)[0])
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        directory = raw.rindex(b"PK\x01\x02", 0, raw.index(b"PK\x05\x06"))  # the last directory entry
        for _ in range(data.draw(st.integers(1, 8))):
            # anywhere, or in the zip's directory (names, flags, sizes), where parsing is
            i = data.draw(st.integers(0, len(raw) - 1) | st.integers(directory - 200, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    file = tmp_path_factory.mktemp("fuzz") / "m.npz"
    file.write_bytes(bytes(raw))
    _loads_or_refuses(file)
