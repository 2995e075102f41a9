"""F.trusted_inputs (the kernels skip their NaN/Inf scans, nothing else) and F.check_finite, and
how the models use them: the input is still checked once, and NaN made inside a model is still
caught by the loss in the same step."""
import re
import threading

import numpy as np
import pytest

import dselectk as dk
from dselectk import functional as F


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("size", [1, 7, 4095, 4096, 4097, 20_000])
def test_check_finite_finds_the_first_bad_entry(dtype, bad, size):
    rng = np.random.default_rng(size)
    x = rng.standard_normal(size).astype(dtype)
    F.check_finite(x, "x")  # finite: passes
    where = int(rng.integers(size))
    x[where] = bad
    if where + 1 < size:
        x[size - 1] = np.nan  # a later bad entry does not change the index reported
    with pytest.raises(ValueError, match=rf"argument 'feat' contains NaN or Inf \(first at flat index {where}\)"):
        F.check_finite(x, "feat")


def test_check_finite_other_inputs():
    F.check_finite(np.arange(5), "ids")  # integers cannot be NaN
    F.check_finite(np.zeros((0, 3), np.float32))
    x = np.ones((4, 6))
    x[1, 4] = np.nan
    with pytest.raises(ValueError, match="flat index 9"):  # x[1, 4] is [2, 1] of the (3, 4) view
        F.check_finite(x[:, ::2].T)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        F.check_finite([1.0, float("nan")], "x")


# every float and complex dtype NumPy has, in both byte orders: NaN / Inf found at its flat index
INEXACT = [np.dtype(c).newbyteorder(order) for c in np.typecodes["AllFloat"] for order in "<>"]
# these cannot hold NaN / Inf: they pass
EXACT = [np.dtype(c) for c in "?" + np.typecodes["AllInteger"]]
# these hold no numbers to check: TypeError naming the dtype (object arrays even when they hold NaN)
NOT_NUMBERS = [np.dtype(object), np.dtype("U3"), np.dtype("S3"), np.dtype("datetime64[s]"),
               np.dtype("timedelta64[s]"), np.dtype([("a", np.float64), ("b", np.int32)]), np.dtype("V8")]


BAD_VALUES = [np.nan, np.inf, -np.inf]
BAD_COMPLEX = [complex(1, np.nan), complex(np.inf, 0)]  # one part not finite


@pytest.mark.parametrize("dtype, bad", [(dt, bad) for dt in INEXACT
                                        for bad in BAD_VALUES + (BAD_COMPLEX if dt.kind == "c" else [])], ids=str)
def test_check_finite_scans_every_float_and_complex_dtype(dtype, bad):
    x = np.linspace(-3, 3, 4 * 7).reshape(4, 7).astype(dtype)
    F.check_finite(x, "x")
    F.check_finite(x[:, ::3].T, "x")
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"argument 'feat' contains NaN or Inf \(first at flat index 19\)"):
        F.check_finite(x, "feat")
    with pytest.raises(ValueError, match=r"first at flat index 22"):  # x[2, 5] is [5, 2] of the (7, 4) view
        F.check_finite(x.T, "feat")


@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_check_finite_passes_bool_and_integer_dtypes(dtype):
    F.check_finite(np.ones((3, 4), dtype), "ids")
    F.check_finite(np.zeros(0, dtype), "ids")


@pytest.mark.parametrize("dtype", NOT_NUMBERS, ids=str)
def test_check_finite_refuses_dtypes_without_numbers(dtype):
    x = np.zeros(3, dtype)
    with pytest.raises(TypeError, match=rf"argument 'feat' has dtype {re.escape(str(dtype))}; check_finite takes "
                                        "numeric arrays"):
        F.check_finite(x, "feat")


def test_check_finite_refuses_an_object_array_holding_nan():
    with pytest.raises(TypeError, match="dtype object"):
        F.check_finite(np.array([1.0, float("nan")], dtype=object), "x")


def test_binding_scan_refuses_what_it_does_not_scan():
    """The C scan behind check_finite never passes a dtype it does not read."""
    from dselectk import _C
    _C.check_finite(np.arange(3), "ids")
    for dtype in (np.float16, np.longdouble, np.complex128, object):
        with pytest.raises(TypeError, match="has dtype .*; this scan takes float32, float64, bool and integer"):
            _C.check_finite(np.full(3, np.nan, dtype), "x")


def test_models_scan_float16_and_long_double_inputs():
    model = dk.MMoE(3, n_tasks=1, n_experts=2, k=1)
    for dtype in (np.float16, np.longdouble):
        X = np.ones((4, 3), dtype)
        X[1, 2] = np.nan
        with pytest.raises(ValueError, match=r"argument 'X' contains NaN or Inf \(first at flat index 5\)"):
            model.forward(X)


def _nan_input():
    x = np.ones((3, 4), np.float32)
    x[2, 1] = np.nan
    return x, np.ones((4, 2), np.float32)


def test_trusted_inputs_skips_only_the_nan_scan():
    x, W = _nan_input()
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.dense_forward(x, W)
    with F.trusted_inputs():
        y = F.dense_forward(x, W)  # NaN propagates instead
        assert np.isnan(y[2]).all() and np.isfinite(y[:2]).all()
        with pytest.raises(ValueError, match="shape"):  # shape, dtype and bounds checks stay
            F.dense_forward(x, np.ones((5, 2), np.float32))
        with pytest.raises(TypeError, match="dtype"):
            F.dense_forward(x, W.astype(np.float64))
        with pytest.raises(ValueError, match="class indices in"):
            F.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN or Inf"):  # restored on exit
        F.dense_forward(x, W)


def test_trusted_inputs_restores_after_an_exception_and_nests():
    x, W = _nan_input()
    with pytest.raises(KeyError):
        with F.trusted_inputs():
            raise KeyError("boom")
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.dense_forward(x, W)
    with F.trusted_inputs():
        with F.trusted_inputs():
            pass
        F.dense_forward(x, W)  # the inner exit restores the outer state, not "checked"


def test_trusted_inputs_is_per_thread():
    x, W = _nan_input()
    errors, inside, release = [], threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        try:
            F.dense_forward(x, W)
        except ValueError as exc:
            errors.append(exc)
        release.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with F.trusted_inputs():
        inside.set()
        release.wait(10)
        F.dense_forward(x, W)
    t.join()
    assert len(errors) == 1 and "NaN or Inf" in str(errors[0])


@pytest.mark.parametrize("kind", ["mmoe_pe", "mmoe_static", "shared_bottom", "embeddings"])
def test_models_still_reject_nan_input_and_catch_nan_inside(kind):
    rng = np.random.default_rng(0)
    common = dict(n_tasks=2, tower_units=(4,), seed=0)
    if kind == "embeddings":
        model = dk.MMoE(None, n_experts=4, expert_units=(8,), gate="dselect_k", k=2, per_example=True,
                        embeddings=dict(vocab_sizes=[5, 6], dims=3, n_dense=2), **common)
        X = {"ids": rng.integers(0, 5, (6, 2)), "dense": rng.standard_normal((6, 2)).astype(np.float32)}
        X["ids"][:, 1] = rng.integers(0, 6, 6)
        bad = {"ids": X["ids"], "dense": X["dense"].copy()}
        bad["dense"][3, 1] = np.inf
        name = "X['dense']"
    else:
        if kind == "shared_bottom":
            model = dk.SharedBottom(6, bottom_units=(8,), **common)
        else:
            model = dk.MMoE(6, n_experts=4, expert_units=(8,), gate="dselect_k", k=2,
                            per_example=kind == "mmoe_pe", **common)
        X = rng.standard_normal((6, 6)).astype(np.float32)
        bad = X.copy()
        bad[4, 2] = np.nan
        name = "X"
    with pytest.raises(ValueError, match=re.escape(f"argument '{name}' contains NaN or Inf")):
        model.forward(bad)
    outs = model.forward(X, training=True)
    assert all(np.isfinite(o).all() for o in outs)
    # NaN parameters: caught in the forward (the per-example gates check their weights) or, the
    # forward running unscanned, by the loss, which rejects the outputs
    model.slab.data[:] = np.nan
    Y = [rng.standard_normal((6, 1)).astype(np.float32) for _ in range(2)]
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.loss(model.forward(X, training=True), Y)
    with pytest.raises(ValueError, match="NaN or Inf"):  # the checks are back on after the model's calls
        F.dense_forward(*_nan_input())


def test_fit_reports_divergence_from_inside_the_model():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 5)).astype(np.float32)
    Y = [rng.standard_normal((64, 1)).astype(np.float32)]
    model = dk.MMoE(5, n_tasks=1, n_experts=4, expert_units=(8,), gate="softmax", seed=0, tower_units=(4,))
    with pytest.raises(FloatingPointError, match="diverged"):  # the weights overflow to Inf, the outputs to NaN
        dk.fit(model, X, Y, epochs=20, batch_size=16, optimizer="sgd", lr=1e12, verbose=0)
