"""dselectk.inputs: what X, Y and sample weights may be -- DataFrames and named columns, named
tasks, batch sources (Sequence, generators, iterables), memory maps, and the casts to the
model's dtype (#14 "Inputs and tasks", #16 item 6)."""
import sys
import warnings

import numpy as np
import pytest

import dselectk as dk
from dselectk import inputs as I
from dselectk import trainer as T

pd = pytest.importorskip("pandas")


def _two_task(rng, N=120, p=4):
    X = rng.standard_normal((N, p)).astype(np.float32)
    y0 = (X[:, 0] + 0.3 * rng.standard_normal(N) > 0).astype(np.float32)
    y1 = (X[:, 1] - X[:, 2]).astype(np.float32)
    return X, [y0, y1]


def _model(named=True, **kw):
    args = dict(n_tasks=2, n_experts=3, expert_units=(6,), tower_units=(4,), task_losses=["bce", "mse"], seed=0)
    if named:
        args["task_names"] = ["watch", "rating"]
    args.update(kw)
    return dk.MMoE(4, **args)


def _same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# --- named tasks and the forms of Y ------------------------------------------------------------

def test_named_tasks_name_the_metrics_and_every_form_of_Y_reads_the_same():
    rng = np.random.default_rng(0)
    X, Y = _two_task(rng)
    model = _model()
    assert model.task_names == ["watch", "rating"] and model.config["task_names"] == ["watch", "rating"]
    ref = T.evaluate(model, X, Y)
    assert set(ref) >= {"loss", "watch_loss", "watch_auc", "watch_accuracy", "rating_loss", "rating_mse"}
    frame = pd.DataFrame({"rating": Y[1], "watch": Y[0]})  # columns by name, in any order
    for form in ({"watch": Y[0], "rating": Y[1]}, frame, np.stack(Y, 1), (Y[0], pd.Series(Y[1]))):
        assert T.evaluate(model, X, form) == ref
    hist = T.fit(model, X, {"watch": Y[0], "rating": Y[1]}, epochs=2, batch_size=32, verbose=0,
                 validation_data=(X, frame))
    assert "val_watch_auc" in hist.epochs[-1] and "val_rating_mse" in hist.epochs[-1]
    assert not any("task0" in k for k in hist.epochs[-1])


def test_unnamed_tasks_keep_task0_and_accept_dicts_by_those_names():
    rng = np.random.default_rng(1)
    X, Y = _two_task(rng)
    model = _model(named=False)
    assert model.task_names == ["task0", "task1"] and "task_names" not in model.config
    r = T.evaluate(model, X, {"task0": Y[0], "task1": Y[1]})
    assert r == T.evaluate(model, X, Y) and "task0_auc" in r
    with pytest.raises(ValueError, match=r"missing \['task1'\], unknown \['rating'\].*task_names="):
        T.evaluate(model, X, {"task0": Y[0], "rating": Y[1]})


@pytest.mark.parametrize("names,exc,match", [
    (["a"], ValueError, "one per task"), (["a", "a"], ValueError, "distinct"), (["a", 3], TypeError, "strings"),
    (["reg", "b"], ValueError, "not allowed"), (["val_x", "b"], ValueError, "not allowed"),
    (["", "b"], ValueError, "not allowed")])
def test_task_names_are_checked(names, exc, match):
    with pytest.raises(exc, match=match):
        _model(named=False, task_names=names)


def test_task_names_survive_save_and_load(tmp_path):
    model = dk.MoE(4, n_experts=3, task_names="price")
    assert model.task_names == ["price"]
    dk.save(model, tmp_path / "m.npz")
    assert dk.load(tmp_path / "m.npz").task_names == ["price"]
    sb = dk.SharedBottom(4, n_tasks=2, task_names=["a", "b"])
    dk.save(sb, tmp_path / "sb.npz")
    assert dk.load(tmp_path / "sb.npz").task_names == ["a", "b"]


@pytest.mark.parametrize("loss,labels,match", [
    ("bce", np.array(["yes", "no"] * 60), r"Y\['watch'\] \(bce\) must hold numbers in \[0, 1\].*strings"),
    ("softmax_ce", np.array(["a", "b", "c"] * 40, dtype=object),
     r"Y\['watch'\] \(softmax_ce\) must hold integer class labels.*strings.*Categorical"),
    ("mse", np.array([None] * 120), r"Y\['watch'\] \(mse\) must hold real numbers"),
    ("mse", pd.Series(["1.5"] * 120), r"Y\['watch'\] \(mse\) must hold real numbers, got strings"),
])
def test_string_and_non_numeric_labels_name_the_task(loss, labels, match):
    rng = np.random.default_rng(2)
    X, Y = _two_task(rng)
    model = _model(task_losses=[loss, "mse"], task_outputs=[3 if loss == "softmax_ce" else 1, 1])
    with pytest.raises(TypeError, match=match):
        T.fit(model, X, {"watch": labels, "rating": Y[1]}, epochs=1, verbose=0)
    with pytest.raises(TypeError, match=r"Y\[0\] \(task 'watch'\)"):  # a list: index and name
        T.fit(model, X, [labels, Y[1]], epochs=1, verbose=0)


def test_sample_weights_by_task_name_or_one_array_for_all():
    rng = np.random.default_rng(3)
    X, Y = _two_task(rng)
    model = _model()
    w = rng.random(len(X)).astype(np.float32)
    by_list = T.evaluate(model, X, Y, sample_weights=[w, w])
    assert T.evaluate(model, X, Y, sample_weights={"watch": w, "rating": w}) == by_list
    assert T.evaluate(model, X, Y, sample_weights=w) == by_list
    with pytest.raises(ValueError, match=r"sample_weights\['rating'\] must be >= 0"):
        T.evaluate(model, X, Y, sample_weights={"watch": w, "rating": -w})


# --- DataFrames ------------------------------------------------------------------------------

def test_a_dataframe_feeds_a_plain_model_by_column_name():
    rng = np.random.default_rng(4)
    X, Y = _two_task(rng)
    names = ["a", "b", "c", "d"]
    frame = pd.DataFrame(X, columns=names)
    frame["b"] = frame["b"].astype("float64")
    frame["d"] = (X[:, 3] > 0)  # bool column: a number
    X = X.copy()
    X[:, 3] = X[:, 3] > 0
    m1, m2 = _model(), _model()
    T.fit(m1, frame, Y, epochs=2, batch_size=32, verbose=0)
    T.fit(m2, X, Y, epochs=2, batch_size=32, verbose=0)
    np.testing.assert_array_equal(m1.slab.data, m2.slab.data)
    assert m1.input_columns == names
    _same(T.predict(m1, frame[["d", "c", "b", "a"]]), T.predict(m1, X))  # reordered by name
    _same(T.predict(m1, {n: frame[n].to_numpy() for n in names}), T.predict(m1, X))  # a dict of columns
    with pytest.raises(ValueError, match=r"missing \['d'\], unknown \['e'\]"):
        T.predict(m1, frame.rename(columns={"d": "e"}))
    bad = frame.assign(c=["x"] * len(frame))
    with pytest.raises(TypeError, match=r"X\['c'\] holds strings; expected numbers"):
        T.predict(m1, bad)
    with pytest.raises(TypeError, match=r"X\['c'\] is categorical"):
        T.predict(m1, frame.assign(c=pd.Categorical(["u", "v"] * (len(frame) // 2))))
    nullable = frame.assign(a=pd.array([1, None] + [2] * (len(frame) - 2), dtype="Int64"))
    with pytest.raises(ValueError, match=r"X\['a'\] has missing values \(first at row 1\)"):
        T.predict(m1, nullable)
    T.predict(m1, frame.assign(a=pd.array([1] * len(frame), dtype="Int64")))  # nullable without NA: numbers
    with pytest.raises(ValueError, match="has 3 columns, the model reads p = 4"):
        T.predict(_model(), frame[["a", "b", "c"]])


def _ratings(rng, N=200, users=7, movies=5):
    user = rng.integers(0, users, N)
    movie = rng.integers(0, movies, N)
    age = rng.standard_normal(N).astype(np.float32)
    watch = ((user + movie) % 2).astype(np.float32)
    rating = (user - movie + age).astype(np.float32)
    return pd.DataFrame({"user": user, "movie": movie, "age": age}), {"watch": watch, "rating": rating}


def _emb_model(embeddings):
    return dk.MMoE(None, n_tasks=2, n_experts=3, expert_units=(6,), tower_units=(4,), task_losses=["bce", "mse"],
                   task_names=["watch", "rating"], embeddings=embeddings, seed=1)


def test_dataframe_columns_feed_the_embedding_tables_by_name():
    rng = np.random.default_rng(5)
    frame, Y = _ratings(rng)
    named = _emb_model(dict(columns={"user": 3, "movie": 2}, vocab_sizes={"user": 7, "movie": 5},
                            dense_columns=["age"]))
    plain = _emb_model(dict(vocab_sizes=[7, 5], dims=[3, 2], n_dense=1))
    assert named.config["embeddings"] == dict(vocab_sizes=[7, 5], dims=[3, 2], n_dense=1, columns=["user", "movie"],
                                              dense_columns=["age"])
    as_dict = {"ids": frame[["user", "movie"]].to_numpy(), "dense": frame[["age"]].to_numpy()}
    T.fit(named, frame.assign(extra=1.0), Y, epochs=2, batch_size=32, verbose=0)  # extra columns are not read
    T.fit(plain, as_dict, Y, epochs=2, batch_size=32, verbose=0)
    np.testing.assert_array_equal(named.slab.data, plain.slab.data)
    _same(named.embedding_tables(), plain.embedding_tables())
    _same(T.predict(named, frame[["age", "movie", "user"]]), T.predict(plain, as_dict))
    with pytest.raises(ValueError, match=r"X\['movie'\] must hold ids in \[0, 5\) \(the vocabulary size of the "
                                         r"embedding of column 'movie'\), got 9 at row 3"):
        T.predict(named, frame.assign(movie=np.where(np.arange(len(frame)) == 3, 9, frame["movie"])))
    with pytest.raises(ValueError, match=r"lacks the columns \['age'\]"):
        T.predict(named, frame[["user", "movie"]])
    with pytest.raises(TypeError, match=r"X\['user'\] feeds an embedding table and must hold integer ids, got "
                                        r"values of dtype float64.*missing values"):
        T.predict(named, frame.assign(user=frame["user"].astype(float)))
    with pytest.raises(TypeError, match="no column names"):
        T.predict(plain, frame)
    with pytest.raises(ValueError, match=r"vocab_sizes is missing for the columns \['movie'\]"):
        _emb_model(dict(columns={"user": 3, "movie": 2}, vocab_sizes={"user": 7}))


def test_from_frame_keeps_categories_so_other_frames_read_the_same_ids(tmp_path):
    rng = np.random.default_rng(6)
    frame, Y = _ratings(rng)
    names = np.array(["ann", "bob", "cy", "dee", "eve", "flo", "gus"])
    frame["user"] = pd.Categorical(names[frame["user"]])
    frame["movie"] = np.array(["m0", "m1", "m2", "m3", "m4"])[frame["movie"]]  # plain strings
    front = dk.EmbeddingInput.from_frame(frame, {"user": 3, "movie": 2})
    assert front.vocab_sizes == [7, 5] and front.dense_columns == ["age"]
    assert front.categories == {"user": list(names), "movie": ["m0", "m1", "m2", "m3", "m4"]}
    model = _emb_model(front)
    T.fit(model, frame, Y, epochs=2, batch_size=32, verbose=0)
    ref = T.predict(model, frame)
    # another frame: the user categories in another order, and only some of them present
    other = frame.assign(user=pd.Categorical(frame["user"].astype(str), categories=list(names[::-1])))
    _same(T.predict(model, other), ref)
    _same(T.predict(model, frame.assign(user=frame["user"].astype(str))), ref)  # strings: the same ids
    dk.save(model, tmp_path / "m.npz")
    loaded = dk.load(tmp_path / "m.npz")
    assert loaded.input_layer.categories == front.categories
    _same(T.predict(loaded, other), ref)
    with pytest.raises(ValueError, match=r"X\['movie'\] has 'm9' at row 2, which is not among the 5 categories"):
        T.predict(model, frame.assign(movie=np.where(np.arange(len(frame)) == 2, "m9", frame["movie"])))
    spec = I.embedding_spec(frame, {"user": 3}, dense_columns=["age"], vocab_sizes={"user": 10})
    assert spec["vocab_sizes"] == [10] and spec["categories"]["user"] == list(names)
    ints = I.embedding_spec(pd.DataFrame({"u": [0, 4, 2]}), {"u": 2})
    assert ints["vocab_sizes"] == [5] and ints["categories"] is None


def test_pandas_stays_optional(monkeypatch):
    """Without pandas, arrays work and what needs pandas says how to get it."""
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'dselectk\[pandas\]'"):
        I._pandas()
    rng = np.random.default_rng(7)
    X, Y = _two_task(rng)
    T.fit(_model(), X, Y, epochs=1, verbose=0)
    T.predict(_model(), {"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "d": X[:, 3]})  # columns as a dict: no pandas


def test_pandas_is_not_imported_for_arrays(tmp_path):
    import os
    import subprocess
    code = ("import numpy as np, sys, dselectk as dk\n"
            "m = dk.MoE(3, n_experts=2)\n"
            "dk.fit(m, np.ones((8, 3), np.float32), np.ones(8, np.float32), epochs=1, verbose=0)\n"
            "dk.predict(m, np.ones((2, 3)))\n"
            "print('pandas' in sys.modules)\n")
    # the child imports the dselectk the tests do, from a cwd of its own (a checkout's unbuilt
    # dselectk/ in the cwd would shadow an installed package)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(dk.__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=env)
    assert out.stdout.strip() == "False"


# --- batch sources ---------------------------------------------------------------------------

class Batches:
    """A Keras-style Sequence: len and getitem, batch i of (X, Y) or (X, Y, W)."""

    def __init__(self, X, Y, batch_size, W=None):
        self.X, self.Y, self.W, self.bs, self.epochs_seen, self.read = X, Y, W, batch_size, 0, []

    def __len__(self):
        return (len(self.X) + self.bs - 1) // self.bs

    def __getitem__(self, i):
        self.read.append(i)
        sl = slice(i * self.bs, (i + 1) * self.bs)
        item = (self.X[sl], [y[sl] for y in self.Y])
        return item if self.W is None else item + ([None if w is None else w[sl] for w in self.W],)

    def on_epoch_end(self):
        self.epochs_seen += 1


def test_a_sequence_trains_as_the_arrays_it_holds():
    rng = np.random.default_rng(8)
    X, Y = _two_task(rng)
    W = [rng.random(len(X)).astype(np.float32), None]
    m1, m2 = _model(), _model()
    h1 = T.fit(m1, X, Y, sample_weights=W, epochs=3, batch_size=25, shuffle=False, verbose=0,
               validation_data=(X, Y))
    seq = Batches(X, Y, 25, W)
    h2 = T.fit(m2, seq, None, epochs=3, shuffle=False, verbose=0, validation_data=Batches(X, Y, 50))
    np.testing.assert_array_equal(m1.slab.data, m2.slab.data)
    assert seq.epochs_seen == 3 and h2.total_steps == 3 * 5
    assert h1["val_loss"] == pytest.approx(h2["val_loss"], rel=1e-6)
    _same(T.predict(m1, X), T.predict(m2, Batches(X, Y, 7)))  # predict reads X from (X, Y) batches
    assert T.evaluate(m2, Batches(X, Y, 40))["loss"] == pytest.approx(T.evaluate(m2, X, Y)["loss"], rel=1e-6)
    assert seq.read == list(range(5)) * 3
    shuffled = Batches(X, Y, 25)
    T.fit(_model(), shuffled, epochs=2, shuffle=True, seed=3, verbose=0)
    order = list(np.random.default_rng(3).permutation(5)) + list(np.random.default_rng(3).permutation(5))
    assert shuffled.read[:5] == order[:5] and sorted(shuffled.read[5:]) == list(range(5))


def test_generators_iterables_and_their_errors():
    rng = np.random.default_rng(9)
    X, Y = _two_task(rng)

    def gen():
        while True:
            for i in range(0, len(X), 30):
                yield X[i:i + 30], {"watch": Y[0][i:i + 30], "rating": Y[1][i:i + 30]}

    m1, m2 = _model(), _model()
    h = T.fit(m1, gen(), epochs=2, steps_per_epoch=4, verbose=0)
    assert h.total_steps == 8

    class Restarting:  # an iterable: a fresh iterator per epoch
        def __iter__(self):
            return (b for _, b in zip(range(4), gen()))

    T.fit(m2, Restarting(), epochs=2, verbose=0)
    np.testing.assert_array_equal(m1.slab.data, m2.slab.data)
    once = (b for _, b in zip(range(4), gen()))
    with pytest.raises(ValueError, match="exhausted in the previous epoch"):
        T.fit(_model(), once, epochs=2, verbose=0)

    def bad():
        yield X[:30], [Y[0][:30], Y[1][:30]]
        yield X[:30], [Y[0][:30], np.full(30, np.nan, np.float32)]

    with pytest.raises(ValueError, match=r"X batch 1: Y\[1\] \(task 'rating'\) contains NaN or Inf"):
        T.fit(_model(), bad(), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="pass Y=None"):
        T.fit(_model(), Batches(X, Y, 25), Y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="steps_per_epoch is for batch sources"):
        T.fit(_model(), X, Y, epochs=1, steps_per_epoch=3, verbose=0)
    with pytest.raises(TypeError, match=r"must be a tuple \(X, Y\)"):
        T.fit(_model(), iter([X[:10]]), epochs=1, verbose=0)


def test_memory_maps_are_read_in_batches_not_loaded(tmp_path):
    """A float64 .npy opened as a memory map trains as the array, and its rows are cast as they
    are read (check_X never makes a float32 copy of the whole file)."""
    rng = np.random.default_rng(10)
    X, Y = _two_task(rng)
    path = tmp_path / "X.npy"
    np.save(path, X.astype(np.float64))
    mm = np.load(path, mmap_mode="r")
    model = _model()
    checked = I.check_X(model, mm)
    assert isinstance(checked, I._CastOnRead) and checked.array is mm
    assert checked[np.array([3, 1])].dtype == np.float32
    same_dtype = np.lib.format.open_memmap(tmp_path / "X32.npy", mode="w+", dtype=np.float32, shape=X.shape)
    same_dtype[...] = X
    assert np.shares_memory(I.check_X(model, same_dtype), same_dtype)  # no copy either
    m1, m2 = _model(), _model()
    T.fit(m1, mm, Y, epochs=2, batch_size=32, verbose=0, seed=4)
    T.fit(m2, X, Y, epochs=2, batch_size=32, verbose=0, seed=4)
    np.testing.assert_array_equal(m1.slab.data, m2.slab.data)
    _same(T.predict(m1, mm), T.predict(m2, X))
    bad = np.lib.format.open_memmap(tmp_path / "bad.npy", mode="w+", dtype=np.float64, shape=X.shape)
    bad[...] = X
    bad[97, 2] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at row 97: X\[97, 2\] = inf\)"):
        T.fit(_model(), bad, Y, epochs=1, verbose=0)


def test_scans_go_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(I, "_CHUNK_ELEMENTS", 8)  # 2 rows of 4 at a time: positions still exact
    X = np.ones((11, 4))
    X[9, 1] = 1e39
    with pytest.raises(ValueError, match=r"1e\+39 at row 9: X\[9, 1\], outside the range of float32"):
        I.check_X(_model(), X)


# --- casts (#16 item 6) ----------------------------------------------------------------------

def _no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", I.LossyCastWarning)
        return fn()


def test_widening_and_float64_casts_are_silent_and_exact():
    rng = np.random.default_rng(11)
    X, Y = _two_task(rng)
    model = _model()
    ref = T.predict(model, X)
    half = X.astype(np.float16)
    _same(_no_warnings(lambda: T.predict(model, half)), T.predict(model, half.astype(np.float32)))
    _same(_no_warnings(lambda: T.predict(model, X.astype(np.float64))), ref)
    small_ints = np.round(X * 100).astype(np.int64)
    _same(_no_warnings(lambda: T.predict(model, small_ints)), T.predict(model, small_ints.astype(np.float32)))
    _no_warnings(lambda: T.fit(model, X, [Y[0].astype(bool), Y[1].astype(np.float64)], epochs=1, verbose=0))


@pytest.mark.skipif(np.finfo(np.longdouble).nmant <= 52, reason="long double is float64 on this platform")
def test_long_double_warns_naming_both_dtypes():
    rng = np.random.default_rng(12)
    X, Y = _two_task(rng)
    with pytest.warns(I.LossyCastWarning, match=r"X has dtype float128 and is cast to float32"):
        T.predict(_model(), X.astype(np.longdouble))
    with pytest.warns(I.LossyCastWarning, match=r"Y\['rating'\] has dtype float128") as record:
        T.evaluate(_model(), X, {"watch": Y[0], "rating": Y[1].astype(np.longdouble)})
    assert record[0].filename == __file__  # attributed to the caller's line


def test_large_integers_warn_with_the_first_inexact_value():
    X = np.zeros((5, 4), np.int64)
    X[3, 2] = 2**24 + 1
    with pytest.warns(I.LossyCastWarning, match=r"X has dtype int64 and is cast to float32.*beyond 16777216: "
                                                r"16777217 at row 3: X\[3, 2\]"):
        T.predict(_model(), X)
    _no_warnings(lambda: T.predict(_model(dtype="float64"), X))  # exact in float64


@pytest.mark.parametrize("call", ["fit", "predict", "evaluate"])
def test_float64_overflow_names_the_value_and_its_position(call):
    rng = np.random.default_rng(13)
    X, Y = _two_task(rng)
    X = X.astype(np.float64)
    X[17, 1] = -3.5e38
    model = _model()
    before = model.slab.data.copy()
    run = {"fit": lambda: T.fit(model, X, Y, epochs=1, verbose=0), "predict": lambda: T.predict(model, X),
           "evaluate": lambda: T.evaluate(model, X, Y)}[call]
    with pytest.raises(ValueError, match=r"X has -3.5e\+38 at row 17: X\[17, 1\], outside the range of float32, "
                                         r"the model's dtype"):
        run()
    np.testing.assert_array_equal(model.slab.data, before)
    T.predict(_model(dtype="float64"), X)  # fits a float64 model


def test_overflowing_targets_and_weights_are_reported_too():
    rng = np.random.default_rng(14)
    X, Y = _two_task(rng)
    y = Y[1].astype(np.float64)
    y[5] = 1e300
    with pytest.raises(ValueError, match=r"Y\['rating'\] has 1e\+300 at row 5"):
        T.evaluate(_model(), X, {"watch": Y[0], "rating": y})
    with pytest.raises(ValueError, match=r"sample_weights\['watch'\] has 1e\+300 at row 5"):
        T.evaluate(_model(), X, Y, sample_weights={"watch": y, "rating": None})
