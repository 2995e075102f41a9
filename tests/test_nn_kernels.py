"""Dense layers, ReLU, dropout and losses (csrc/nn.c through dselectk.functional).

* every forward against a plain NumPy formula (1e-12 in float64, ~1e-5 in float32);
* every backward / loss gradient against float64 central finite differences, over many random
  shapes, with and without the optional arguments (bias, weights, accumulation into non-zero dW/db);
* dropout's mask re-derived in NumPy from the hash documented in csrc/nn.h, and its statistics;
* bad input: every function raises TypeError / ValueError naming the argument.
"""
from __future__ import annotations

import numpy as np
import pytest

import dselectk
import reference as ref
from dselectk import functional as F

F64, F32 = np.float64, np.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
NAN, INF = float("nan"), float("inf")


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)


def rand(rng, shape, dtype=F64, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def random_shapes(count, seed):
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(1, 7, size=3)) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1
GOLDEN, GOLDEN2 = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03


def _mix64_int(z):
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _mix64(z):  # uint64 arrays wrap modulo 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ref_dropout_mask(n, rate, seed, step):
    """keep mask of the N flat entries, from the hash spelled out at the end of csrc/nn.h"""
    key = _mix64_int(_mix64_int(seed + GOLDEN) + step * GOLDEN2)
    i = np.arange(n, dtype=np.uint64)
    u = (_mix64(np.uint64(key) + (i + np.uint64(1)) * np.uint64(GOLDEN)) >> np.uint64(11)).astype(F64) * 2.0**-53
    return u >= rate


def ref_dropout(x, rate, seed, step):
    keep = ref_dropout_mask(x.size, rate, seed, step).reshape(x.shape)
    return np.where(keep, x.astype(F64) * (1.0 / (1.0 - rate)), 0.0).astype(x.dtype)


def ref_bce(z, t, w=None):
    z, t = z.astype(F64).ravel(), t.astype(F64).ravel()
    l = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    w = np.ones_like(z) if w is None else w.astype(F64)
    return float(np.sum(w * l) / z.size)


def ref_mse(p, t, w=None):
    p2, t2 = p.astype(F64).reshape(p.shape[0], -1), t.astype(F64).reshape(p.shape[0], -1)
    l = np.sum((p2 - t2) ** 2, axis=1)
    w = np.ones(p.shape[0]) if w is None else w.astype(F64)
    return float(np.sum(w * l) / p.shape[0])


def ref_softmax_ce(z, labels, w=None):
    z = z.astype(F64)
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    l = lse - z[np.arange(z.shape[0]), labels]
    w = np.ones(z.shape[0]) if w is None else w.astype(F64)
    return float(np.sum(w * l) / z.shape[0])


# ---------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("shape", random_shapes(6, 1) + [(1, 1, 1), (17, 33, 9)])
def test_dense_forward_matches_numpy(shape, dtype):
    B, p, o = shape
    rng = np.random.default_rng(sum(shape))
    x, W, b = rand(rng, (B, p), dtype), rand(rng, (p, o), dtype), rand(rng, (o,), dtype)
    want = x.astype(F64) @ W.astype(F64)
    y = F.dense_forward(x, W)
    assert y.dtype == dtype and y.shape == (B, o)
    np.testing.assert_allclose(y, want, **tol(dtype))
    yb = F.dense_forward(x, W, b)
    np.testing.assert_allclose(yb, want + b, **tol(dtype))
    out = np.full((B, o), np.nan, dtype)
    assert F.dense_forward(x, W, b, out=out) is out
    np.testing.assert_allclose(out, want + b, **tol(dtype))


def test_dense_forward_uses_W_as_in_out():
    # (in, out) = (2, 3): y = x @ W, which differs from linear's x @ W.T
    x = np.array([[1.0, 2.0]])
    W = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]])
    np.testing.assert_array_equal(F.dense_forward(x, W), [[1.0, 2.0, 8.0]])


@DTYPES
@pytest.mark.parametrize("shape", random_shapes(5, 2) + [(40, 300, 270)])
def test_dense_backward_matches_numpy_and_accumulates(shape, dtype):
    B, p, o = shape
    rng = np.random.default_rng(7 + sum(shape))
    x, W, dy = rand(rng, (B, p), dtype), rand(rng, (p, o), dtype), rand(rng, (B, o), dtype)
    dW0, db0 = rand(rng, (p, o), dtype), rand(rng, (o,), dtype)
    dW, db = dW0.copy(), db0.copy()
    dx = F.dense_backward(dy, x, W, dW, db)
    x64, W64, dy64 = x.astype(F64), W.astype(F64), dy.astype(F64)
    t = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    assert dx.dtype == dtype and dx.shape == (B, p)
    np.testing.assert_allclose(dx, dy64 @ W64.T, **t)
    np.testing.assert_allclose(dW, dW0 + x64.T @ dy64, **t)
    np.testing.assert_allclose(db, db0 + dy64.sum(axis=0), **t)
    # a second call adds the same again
    assert F.dense_backward(dy, x, W, dW, db, need_dx=False) is None
    np.testing.assert_allclose(dW, dW0 + 2 * x64.T @ dy64, **t)
    np.testing.assert_allclose(db, db0 + 2 * dy64.sum(axis=0), **t)


def test_dense_backward_db_none_and_views_into_a_slab():
    rng = np.random.default_rng(3)
    B, p, o = 4, 3, 5
    x, W, dy = rand(rng, (B, p)), rand(rng, (p, o)), rand(rng, (B, o))
    slab = np.zeros(p * o + o + 2)
    dW, db = slab[:p * o].reshape(p, o), slab[p * o:p * o + o]
    F.dense_backward(dy, x, W, dW, None)
    np.testing.assert_allclose(slab[:p * o].reshape(p, o), x.T @ dy, rtol=1e-12, atol=1e-12)
    assert np.all(slab[p * o:] == 0), "db=None must leave the bias gradient alone"
    F.dense_backward(dy, x, W, dW, db)
    np.testing.assert_allclose(db, dy.sum(axis=0), rtol=1e-12, atol=1e-12)
    assert np.all(slab[-2:] == 0)


@pytest.mark.parametrize("shape", random_shapes(8, 3))
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_gradients_finite_differences(shape, with_bias):
    B, p, o = shape
    rng = np.random.default_rng(100 + sum(shape))
    x, W, b, G = rand(rng, (B, p)), rand(rng, (p, o)), rand(rng, (o,)), rand(rng, (B, o))

    def loss():
        return float(np.sum(G * F.dense_forward(x, W, b if with_bias else None)))

    dW0, db0 = rand(rng, (p, o)), rand(rng, (o,))
    dW, db = dW0.copy(), db0.copy()
    dx = F.dense_backward(G, x, W, dW, db if with_bias else None)
    np.testing.assert_allclose(dx, ref.numerical_gradient(loss, x), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(dW - dW0, ref.numerical_gradient(loss, W), rtol=1e-7, atol=1e-8)
    if with_bias:
        np.testing.assert_allclose(db - db0, ref.numerical_gradient(loss, b), rtol=1e-7, atol=1e-8)
    else:
        np.testing.assert_array_equal(db, db0)


def test_dense_two_layer_chain_finite_differences():
    # dense -> relu -> dense -> mse: the composition a model runs, through every backward here
    rng = np.random.default_rng(5)
    B, p, h, o = 5, 4, 6, 2
    x, W1, b1, W2, b2 = rand(rng, (B, p)), rand(rng, (p, h)), rand(rng, (h,)), rand(rng, (h, o)), rand(rng, (o,))
    t = rand(rng, (B, o))

    def forward():
        a = F.dense_forward(x, W1, b1)
        r = F.relu_forward(a)
        return F.dense_forward(r, W2, b2), r

    def loss():
        return F.mse(forward()[0], t)[0]

    y, r = forward()
    _, dy = F.mse(y, t)
    dW1, db1, dW2, db2 = (np.zeros_like(a) for a in (W1, b1, W2, b2))
    dr = F.dense_backward(dy, r, W2, dW2, db2)
    da = F.relu_backward(dr, r)
    dx = F.dense_backward(da, x, W1, dW1, db1)
    for grad, var in ((dx, x), (dW1, W1), (db1, b1), (dW2, W2), (db2, b2)):
        np.testing.assert_allclose(grad, ref.numerical_gradient(loss, var), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), (0,), (50000,)])
def test_relu_forward_backward_match_numpy(shape, dtype):
    rng = np.random.default_rng(len(shape))
    x, dy = rand(rng, shape, dtype), rand(rng, shape, dtype)
    y = F.relu_forward(x)
    assert y.shape == shape and y.dtype == dtype
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    dx = F.relu_backward(dy, y)
    np.testing.assert_array_equal(dx, np.where(y > 0, dy, 0))
    out = np.empty(shape, dtype)
    F.relu_forward(x, out=out)
    np.testing.assert_array_equal(out, np.maximum(x, 0))


def test_relu_backward_at_zero_passes_nothing():
    y = F.relu_forward(np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(F.relu_backward(np.array([5.0, 5.0, 5.0]), y), [0.0, 0.0, 5.0])


@pytest.mark.parametrize("seed", range(6))
def test_relu_finite_differences(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 6, size=rng.integers(1, 4)))
    x = rand(rng, shape)
    x[np.abs(x) < 0.05] = 0.5  # away from the kink
    G = rand(rng, shape)

    def loss():
        return float(np.sum(G * F.relu_forward(x)))

    dx = F.relu_backward(G, F.relu_forward(x))
    np.testing.assert_allclose(dx, ref.numerical_gradient(loss, x), rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(1000,), (13, 17), (3, 4, 5)])
def test_dropout_matches_the_documented_hash(shape, rate, dtype):
    rng = np.random.default_rng(11)
    x = rand(rng, shape, dtype)
    seed, step = 1234, 56
    y = F.dropout_forward(x, rate, seed, step)
    assert y.shape == shape and y.dtype == dtype
    np.testing.assert_array_equal(y, ref_dropout(x, rate, seed, step))
    dy = rand(rng, shape, dtype)
    np.testing.assert_array_equal(F.dropout_backward(dy, rate, seed, step), ref_dropout(dy, rate, seed, step))


def test_dropout_huge_seed_and_step():
    x = np.ones(64)
    seed, step = 2**64 - 1, 2**63 + 5
    np.testing.assert_array_equal(F.dropout_forward(x, 0.5, seed, step), ref_dropout(x, 0.5, seed, step))
    np.testing.assert_array_equal(F.dropout_forward(x, 0.5, np.uint64(seed), np.int64(7)),
                                  ref_dropout(x, 0.5, seed, 7))


def test_dropout_same_seed_step_same_mask_backward_uses_it():
    rng = np.random.default_rng(0)
    x = rand(rng, (64, 33)) + 2.0  # nonzero everywhere, so zeros mark dropped entries
    y1 = F.dropout_forward(x, 0.3, 9, 4)
    y2 = F.dropout_forward(x, 0.3, 9, 4)
    np.testing.assert_array_equal(y1, y2)
    kept = y1 != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(y1[kept], x[kept] / 0.7, rtol=1e-15)
    dx = F.dropout_backward(np.ones_like(x), 0.3, 9, 4)
    np.testing.assert_array_equal(dx != 0, kept)
    np.testing.assert_allclose(dx[kept], 1 / 0.7, rtol=1e-15)


def test_dropout_different_step_or_seed_different_mask():
    x = np.ones(20000)
    base = F.dropout_forward(x, 0.5, 3, 0) != 0
    for seed, step in ((3, 1), (4, 0), (0, 3), (3, 2**32)):
        other = F.dropout_forward(x, 0.5, seed, step) != 0
        assert not np.array_equal(base, other)
        # independent masks agree on about rate^2 + (1 - rate)^2 = half of the entries
        assert abs(np.mean(base == other) - 0.5) < 0.02


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.5, 0.8])
def test_dropout_kept_fraction_and_mean(rate):
    x = np.ones(1_000_000)
    y = F.dropout_forward(x, rate, 42, 7)
    assert abs(np.mean(y != 0) - (1 - rate)) < 5e-3
    assert abs(np.mean(y) - 1.0) < 1e-2  # inverted dropout keeps the expectation
    # per entry over many steps: E[y_i] = x_i
    rng = np.random.default_rng(1)
    v = rand(rng, (200,), lo=0.5, hi=2.0)
    avg = np.mean([F.dropout_forward(v, rate, 42, s) for s in range(2000)], axis=0)
    assert np.max(np.abs(avg / v - 1)) < 4.5 * np.sqrt(rate / (1 - rate) / 2000)


@DTYPES
def test_dropout_independent_of_thread_count(dtype):
    x = rand(np.random.default_rng(2), (300_000,), dtype)  # well above the OpenMP threshold
    before = dselectk.get_num_threads()
    try:
        dselectk.set_num_threads(1)
        one = F.dropout_forward(x, 0.4, 77, 3)
        dselectk.set_num_threads(2)
        two = F.dropout_forward(x, 0.4, 77, 3)
        two_b = F.dropout_backward(x, 0.4, 77, 3)
    finally:
        dselectk.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, two_b)
    np.testing.assert_array_equal(one, ref_dropout(x, 0.4, 77, 3))


@DTYPES
def test_dropout_identity_when_not_training_or_rate_zero(dtype):
    x = rand(np.random.default_rng(4), (5, 6), dtype)
    for y in (F.dropout_forward(x, 0.5, 1, 2, training=False), F.dropout_forward(x, 0.0, 1, 2),
              F.dropout_backward(x, 0.5, 1, 2, training=False), F.dropout_backward(x, 0.0, 1, 2)):
        np.testing.assert_array_equal(y, x)
        assert y.dtype == dtype and not np.shares_memory(y, x)


def test_dropout_non_contiguous_input_uses_c_order_flat_index():
    x = np.arange(1.0, 61.0).reshape(6, 10)
    xt = x.T  # (10, 6), Fortran-ordered view
    y = F.dropout_forward(xt, 0.5, 5, 5)
    np.testing.assert_array_equal(y, ref_dropout(np.ascontiguousarray(xt), 0.5, 5, 5))


@pytest.mark.parametrize("seed", range(4))
def test_dropout_finite_differences(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(2, 7, size=2))
    x, G = rand(rng, shape), rand(rng, shape)
    rate = [0.2, 0.5, 0.7, 0.35][seed]

    def loss():
        return float(np.sum(G * F.dropout_forward(x, rate, seed, 10 + seed)))

    dx = F.dropout_backward(G, rate, seed, 10 + seed)
    np.testing.assert_allclose(dx, ref.numerical_gradient(loss, x), rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def _weights(rng, B, kind):
    if kind == "none":
        return None
    w = rng.uniform(0, 2, size=B)
    if B > 1:
        w[0] = 0.0  # a zero weight drops an example
    return w


@DTYPES
@pytest.mark.parametrize("wkind", ["none", "weights"])
@pytest.mark.parametrize("shape", [(1,), (7,), (7, 1), (300,)])
def test_bce_matches_numpy(shape, wkind, dtype):
    rng = np.random.default_rng(shape[0])
    z, t = rand(rng, shape, dtype, -4, 4), rng.uniform(0, 1, size=shape).astype(dtype)
    t[::3] = np.round(t[::3])  # hard and soft labels
    w = _weights(rng, shape[0], wkind)
    w = None if w is None else w.astype(dtype)
    loss, dz = F.bce_with_logits(z, t, w)
    assert isinstance(loss, float) and dz.shape == shape and dz.dtype == dtype
    np.testing.assert_allclose(loss, ref_bce(z, t, w), **tol(dtype))
    z64, t64 = z.astype(F64).ravel(), t.astype(F64).ravel()
    w64 = np.ones(shape[0]) if w is None else w.astype(F64)
    want = w64 * (1 / (1 + np.exp(-z64)) - t64) / shape[0]
    np.testing.assert_allclose(dz.ravel(), want, **tol(dtype))


def test_bce_mixed_column_shapes_and_extreme_logits():
    z = np.array([[-1000.0], [1000.0], [0.0], [30.0]])
    t = np.array([0.0, 1.0, 0.5, 0.0])
    loss, dz = F.bce_with_logits(z, t)
    assert dz.shape == (4, 1) and np.isfinite(loss) and np.all(np.isfinite(dz))
    np.testing.assert_allclose(loss, (0 + 0 + np.log(2) + 30 + np.log1p(np.exp(-30))) / 4, rtol=1e-14)
    np.testing.assert_allclose(dz.ravel(), [0, 0, 0, 1 / (1 + np.exp(-30.0)) / 4], atol=1e-300, rtol=1e-14)


@pytest.mark.parametrize("wkind", ["none", "weights"])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_bce_finite_differences(B, wkind):
    rng = np.random.default_rng(B + 10 * (wkind == "weights"))
    z, t, w = rand(rng, (B,), lo=-3, hi=3), rng.uniform(0, 1, B), _weights(rng, B, wkind)
    loss_fn = lambda: F.bce_with_logits(z, t, w)[0]  # noqa: E731
    np.testing.assert_allclose(F.bce_with_logits(z, t, w)[1], ref.numerical_gradient(loss_fn, z),
                               rtol=1e-7, atol=1e-9)


@DTYPES
@pytest.mark.parametrize("wkind", ["none", "weights"])
@pytest.mark.parametrize("shape", [(1,), (6,), (6, 1), (5, 3), (200, 7)])
def test_mse_matches_numpy(shape, wkind, dtype):
    rng = np.random.default_rng(sum(shape))
    p, t = rand(rng, shape, dtype), rand(rng, shape, dtype)
    w = _weights(rng, shape[0], wkind)
    w = None if w is None else w.astype(dtype)
    loss, dp = F.mse(p, t, w)
    assert isinstance(loss, float) and dp.shape == shape and dp.dtype == dtype
    np.testing.assert_allclose(loss, ref_mse(p, t, w), **tol(dtype))
    w64 = np.ones(shape[0]) if w is None else w.astype(F64)
    want = 2 * w64.reshape((-1,) + (1,) * (len(shape) - 1)) * (p.astype(F64) - t.astype(F64)) / shape[0]
    np.testing.assert_allclose(dp, want, **tol(dtype))


def test_mse_is_summed_over_outputs_not_averaged():
    p, t = np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]])
    assert F.mse(p, t)[0] == 5.0
    assert F.mse(np.array([3.0, 1.0]), np.array([1.0, 1.0]))[0] == 2.0  # (4 + 0) / 2
    loss, dp = F.mse(np.array([[3.0], [1.0]]), np.array([1.0, 1.0]))  # (B, 1) against (B,)
    assert loss == 2.0 and dp.shape == (2, 1)


@pytest.mark.parametrize("wkind", ["none", "weights"])
@pytest.mark.parametrize("shape", [(1,), (4,), (3, 2), (5, 4)])
def test_mse_finite_differences(shape, wkind):
    rng = np.random.default_rng(sum(shape))
    p, t, w = rand(rng, shape), rand(rng, shape), _weights(rng, shape[0], wkind)
    loss_fn = lambda: F.mse(p, t, w)[0]  # noqa: E731
    np.testing.assert_allclose(F.mse(p, t, w)[1], ref.numerical_gradient(loss_fn, p), rtol=1e-7, atol=1e-9)


@DTYPES
@pytest.mark.parametrize("wkind", ["none", "weights"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (6, 3), (9, 10), (300, 40)])
def test_softmax_cross_entropy_matches_numpy(shape, wkind, dtype):
    B, C = shape
    rng = np.random.default_rng(B * C)
    z, labels = rand(rng, shape, dtype, -3, 3), rng.integers(0, C, size=B)
    w = _weights(rng, B, wkind)
    w = None if w is None else w.astype(dtype)
    loss, dz = F.softmax_cross_entropy(z, labels, w)
    assert isinstance(loss, float) and dz.shape == shape and dz.dtype == dtype
    np.testing.assert_allclose(loss, ref_softmax_ce(z, labels, w), **tol(dtype))
    z64 = z.astype(F64)
    prob = np.exp(z64 - z64.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    onehot = np.eye(C)[labels]
    w64 = np.ones(B) if w is None else w.astype(F64)
    np.testing.assert_allclose(dz, w64[:, None] * (prob - onehot) / B, **tol(dtype))


@pytest.mark.parametrize("ltype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.uint64, np.intp])
def test_softmax_cross_entropy_any_integer_labels(ltype):
    rng = np.random.default_rng(0)
    z, labels = rand(rng, (6, 5)), np.array([0, 4, 2, 1, 3, 4])
    want = F.softmax_cross_entropy(z, labels)
    got = F.softmax_cross_entropy(z, labels.astype(ltype))
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    got_nc = F.softmax_cross_entropy(z, np.repeat(labels.astype(ltype), 2)[::2])  # non-contiguous
    assert got_nc[0] == want[0]


def test_softmax_cross_entropy_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [-800.0, 800.0, 0.0]])
    loss, dz = F.softmax_cross_entropy(z, np.array([0, 0]))
    np.testing.assert_allclose(loss, (0.0 + 1600.0) / 2, rtol=1e-14)
    np.testing.assert_allclose(dz, [[0, 0, 0], [-0.5, 0.5, 0]], atol=1e-300)


@pytest.mark.parametrize("wkind", ["none", "weights"])
@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (5, 3), (2, 7)])
def test_softmax_cross_entropy_finite_differences(shape, wkind):
    B, C = shape
    rng = np.random.default_rng(B * 10 + C)
    z, labels, w = rand(rng, shape, lo=-2, hi=2), rng.integers(0, C, size=B), _weights(rng, B, wkind)
    loss_fn = lambda: F.softmax_cross_entropy(z, labels, w)[0]  # noqa: E731
    np.testing.assert_allclose(F.softmax_cross_entropy(z, labels, w)[1], ref.numerical_gradient(loss_fn, z),
                               rtol=1e-7, atol=1e-9)


def test_losses_independent_of_thread_count():
    rng = np.random.default_rng(9)
    B = 100_000
    z, t, w = rand(rng, (B,)), rng.uniform(0, 1, B), rng.uniform(0, 1, B)
    Z, labels = rand(rng, (B // 10, 10)), rng.integers(0, 10, size=B // 10)
    before = dselectk.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            dselectk.set_num_threads(n)
            results.append((F.bce_with_logits(z, t, w), F.mse(z, t, w), F.softmax_cross_entropy(Z, labels)))
    finally:
        dselectk.set_num_threads(before)
    for a, b in zip(results[0], results[1]):
        assert a[0] == b[0]  # bit for bit: fixed chunks of partial sums
        np.testing.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# Bad input: the right exception, naming the argument
# ---------------------------------------------------------------------------------------------

def _ok_args():
    rng = np.random.default_rng(0)
    return {
        "dense_forward": (F.dense_forward, dict(x=rand(rng, (4, 3)), W=rand(rng, (3, 2)), b=rand(rng, (2,)))),
        # (keyword order = the binding's validation order: the first array sets the call's dtype)
        "dense_backward": (F.dense_backward, dict(x=rand(rng, (4, 3)), W=rand(rng, (3, 2)), dy=rand(rng, (4, 2)),
                                                  dW=np.zeros((3, 2)), db=np.zeros(2))),
        "relu_forward": (F.relu_forward, dict(x=rand(rng, (4, 3)))),
        "relu_backward": (F.relu_backward, dict(dy=rand(rng, (4, 3)), y=rand(rng, (4, 3)))),
        "dropout_forward": (F.dropout_forward, dict(x=rand(rng, (4, 3)), rate=0.5, seed=1, step=2)),
        "dropout_backward": (F.dropout_backward, dict(dy=rand(rng, (4, 3)), rate=0.5, seed=1, step=2)),
        "bce_with_logits": (F.bce_with_logits, dict(logits=rand(rng, (4,)), targets=rng.uniform(0, 1, 4),
                                                    weights=np.ones(4))),
        "mse": (F.mse, dict(pred=rand(rng, (4, 2)), target=rand(rng, (4, 2)), weights=np.ones(4))),
        "softmax_cross_entropy": (F.softmax_cross_entropy, dict(logits=rand(rng, (4, 3)),
                                                                labels=np.array([0, 2, 1, 0]),
                                                                weights=np.ones(4))),
    }


FLOAT_ARGS = [(name, arg) for name, (fn, kw) in _ok_args().items()
              for arg, v in kw.items() if isinstance(v, np.ndarray) and v.dtype == F64]


def _call(name, **changes):
    fn, kw = _ok_args()[name]
    kw.update(changes)
    return fn(**kw)


@pytest.mark.parametrize("name", list(_ok_args()))
def test_valid_calls_in_both_dtypes(name):
    fn, kw = _ok_args()[name]
    fn(**kw)
    kw32 = {k: v.astype(F32) if isinstance(v, np.ndarray) and v.dtype == F64 else v for k, v in kw.items()}
    result = fn(**kw32)
    arrays = [r for r in (result if isinstance(result, tuple) else (result,)) if isinstance(r, np.ndarray)]
    assert arrays and all(a.dtype == F32 for a in arrays)


@pytest.mark.parametrize("name,arg", FLOAT_ARGS, ids=[f"{n}-{a}" for n, a in FLOAT_ARGS])
def test_wrong_dtype_names_the_argument(name, arg):
    fn, kw = _ok_args()[name]
    with pytest.raises(TypeError, match=f"'{arg}'"):
        _call(name, **{arg: kw[arg].astype(np.int64)})
    with pytest.raises(TypeError, match=f"'{arg}'"):
        _call(name, **{arg: kw[arg].tolist()})


MIXED_ARGS = [(n, a) for n, a in FLOAT_ARGS if sum(m == n for m, _ in FLOAT_ARGS) > 1]
NAN_ARGS = [(n, a) for n, a in FLOAT_ARGS if a not in ("dW", "db")]  # dW, db are accumulated into


@pytest.mark.parametrize("name,arg", MIXED_ARGS, ids=[f"{n}-{a}" for n, a in MIXED_ARGS])
def test_mixed_dtypes_name_the_argument(name, arg):
    fn, kw = _ok_args()[name]
    first = [a for n, a in FLOAT_ARGS if n == name][0]
    if arg == first:  # the first array sets the dtype; the next one is then named
        changes = {a: kw[a].astype(F32) for n, a in FLOAT_ARGS if n == name and a != arg}
        with pytest.raises(TypeError, match="'[A-Za-z]+'.* has dtype float32, expected float64"):
            _call(name, **changes)
        with pytest.raises(TypeError, match="dtype float64, expected float32"):
            _call(name, **{arg: kw[arg].astype(F32)})
    else:
        with pytest.raises(TypeError, match=f"'{arg}'.*float32.*float64"):
            _call(name, **{arg: kw[arg].astype(F32)})


@pytest.mark.parametrize("name,arg", NAN_ARGS, ids=[f"{n}-{a}" for n, a in NAN_ARGS])
def test_nan_and_inf_name_the_argument(name, arg):
    fn, kw = _ok_args()[name]
    for bad in (NAN, INF, -INF):
        a = kw[arg].copy()
        a.flat[a.size // 2] = bad
        with pytest.raises(ValueError, match=f"'{arg}'.*NaN or Inf"):
            _call(name, **{arg: a})


WRONG_SHAPES = {
    ("dense_forward", "x"): np.zeros((4,)),
    ("dense_forward", "W"): np.zeros((2, 3)),
    ("dense_forward", "b"): np.zeros(3),
    ("dense_backward", "dy"): np.zeros((4, 3)),
    ("dense_backward", "x"): np.zeros((4,)),
    ("dense_backward", "W"): np.zeros((2, 2)),
    ("dense_backward", "dW"): np.zeros((2, 3)),
    ("dense_backward", "db"): np.zeros(3),
    ("relu_backward", "dy"): np.zeros((3, 4)),
    ("bce_with_logits", "logits"): np.zeros((4, 2)),
    ("bce_with_logits", "targets"): np.zeros(5),
    ("bce_with_logits", "weights"): np.ones(3),
    ("mse", "pred"): np.zeros((4, 2, 1)),
    ("mse", "target"): np.zeros((4, 3)),
    ("mse", "weights"): np.ones((4, 1)),
    ("softmax_cross_entropy", "logits"): np.zeros(4),
    ("softmax_cross_entropy", "labels"): np.array([0, 1]),
    ("softmax_cross_entropy", "weights"): np.ones(5),
}


@pytest.mark.parametrize("key", list(WRONG_SHAPES), ids=[f"{n}-{a}" for n, a in WRONG_SHAPES])
def test_wrong_shape_names_the_argument(key):
    name, arg = key
    with pytest.raises(ValueError, match=f"'{arg}'"):
        _call(name, **{arg: WRONG_SHAPES[key]})


def test_empty_batches_rejected():
    with pytest.raises(ValueError, match="'x'.*empty batch"):
        F.dense_forward(np.zeros((0, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="'logits'.*empty batch"):
        F.bce_with_logits(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="'pred'.*empty batch"):
        F.mse(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="'logits'.*empty batch"):
        F.softmax_cross_entropy(np.zeros((0, 2)), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="'logits'.*at least one class"):
        F.softmax_cross_entropy(np.zeros((2, 0)), np.zeros(2, np.int64))


@pytest.mark.parametrize("arg", ["dW", "db"])
def test_dense_backward_accumulators_must_be_writeable_contiguous_and_exact(arg):
    fn, kw = _ok_args()["dense_backward"]
    shape = kw[arg].shape
    ro = np.zeros(shape)
    ro.flags.writeable = False
    noncontig = np.zeros(shape + (2,))[..., 0]
    with pytest.raises(ValueError, match=f"'{arg}'.*writeable"):
        _call("dense_backward", **{arg: ro})
    with pytest.raises(ValueError, match=f"'{arg}'.*C-contiguous"):
        _call("dense_backward", **{arg: noncontig})
    if len(shape) == 2:
        with pytest.raises(ValueError, match=f"'{arg}'.*C-contiguous"):
            _call("dense_backward", **{arg: np.asfortranarray(np.zeros(shape))})
    with pytest.raises(TypeError, match=f"'{arg}'"):
        _call("dense_backward", **{arg: np.zeros(shape, F32)})
    with pytest.raises(TypeError, match=f"'{arg}'"):
        _call("dense_backward", **{arg: np.zeros(shape).tolist()})
    with pytest.raises(TypeError, match=f"'{arg}'.*byte order"):
        _call("dense_backward", **{arg: np.zeros(shape, ">f8")})


def test_dense_backward_accumulators_must_not_overlap_inputs():
    rng = np.random.default_rng(0)
    x, W, dy = rand(rng, (4, 3)), rand(rng, (3, 2)), rand(rng, (4, 2))
    with pytest.raises(ValueError, match="'dW'.*shares memory"):
        F.dense_backward(dy, x, W, W)
    slab = np.zeros(8)
    with pytest.raises(ValueError, match="'db'.*shares memory"):
        F.dense_backward(dy, x, W, slab[:6].reshape(3, 2), slab[5:7])
    W_before = W.copy()
    with pytest.raises(ValueError):
        F.dense_backward(dy, x, W, np.zeros((3, 2)), W[0])
    np.testing.assert_array_equal(W, W_before)
    with pytest.raises(TypeError, match="'dW'"):
        F.dense_backward(dy, x, W, None)


def test_dense_backward_failed_call_leaves_dW_untouched():
    rng = np.random.default_rng(0)
    dW = np.ones((3, 2))
    with pytest.raises(ValueError, match="'db'"):
        F.dense_backward(rand(rng, (4, 2)), rand(rng, (4, 3)), rand(rng, (3, 2)), dW, np.zeros(5))
    np.testing.assert_array_equal(dW, 1.0)


@pytest.mark.parametrize("fn", [F.dropout_forward, F.dropout_backward])
def test_dropout_bad_scalars(fn):
    x = np.ones(5)
    for rate in (-0.1, 1.0, 1.5, NAN, INF):
        with pytest.raises(ValueError, match="rate"):
            fn(x, rate, 1, 2)
    with pytest.raises(ValueError, match="seed"):
        fn(x, 0.5, -1, 2)
    with pytest.raises(ValueError, match="step"):
        fn(x, 0.5, 1, -3)
    with pytest.raises(ValueError, match="seed"):
        fn(x, 0.5, 2**64, 2)
    with pytest.raises(TypeError, match="seed"):
        fn(x, 0.5, 1.0, 2)
    with pytest.raises(TypeError, match="step"):
        fn(x, 0.5, 1, True)
    with pytest.raises(TypeError, match="step"):
        fn(x, 0.5, 1, "3")
    with pytest.raises(TypeError):
        fn(x, "0.5", 1, 2)


def test_bce_targets_outside_unit_interval():
    z = np.zeros(4)
    for bad in (-0.01, 1.01):
        t = np.array([0.0, 1.0, bad, 0.5])
        with pytest.raises(ValueError, match=r"'targets'.*\[0, 1\].*targets\[2\]"):
            F.bce_with_logits(z, t)
    with pytest.raises(TypeError, match="'targets'"):
        F.bce_with_logits(z, np.array([0, 1, 1, 0]))  # integer targets: no silent cast


@pytest.mark.parametrize("name", ["bce_with_logits", "mse", "softmax_cross_entropy"])
def test_negative_or_nonfinite_weights(name):
    w = np.ones(4)
    w[1] = -0.5
    with pytest.raises(ValueError, match=r"'weights'.*>= 0.*weights\[1\]"):
        _call(name, weights=w)
    w[1] = NAN
    with pytest.raises(ValueError, match="'weights'.*NaN"):
        _call(name, weights=w)
    with pytest.raises(TypeError, match="'weights'"):
        _call(name, weights=np.ones(4, F32))
    with pytest.raises(TypeError, match="'weights'"):
        _call(name, weights=[1.0, 1.0, 1.0, 1.0])


def test_labels_out_of_range_name_first_bad_label_and_index():
    z = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"'labels'.*\[0, 3\).*labels\[2\] = 3"):
        F.softmax_cross_entropy(z, np.array([0, 2, 3, 7, 1]))
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        F.softmax_cross_entropy(z, np.array([0, -1, 5, 0, 0], np.int8))
    with pytest.raises(ValueError, match=r"labels\[4\] = 18446744073709551615"):
        F.softmax_cross_entropy(z, np.array([0, 1, 2, 0, 2**64 - 1], np.uint64))
    with pytest.raises(TypeError, match="'labels'.*integer"):
        F.softmax_cross_entropy(z, np.zeros(5))
    with pytest.raises(TypeError, match="'labels'.*integer"):
        F.softmax_cross_entropy(z, np.zeros(5, bool))
    with pytest.raises(TypeError, match="'labels'"):
        F.softmax_cross_entropy(z, [0, 1, 2, 0, 1])


def test_out_argument_checked():
    x, W = np.ones((2, 3)), np.ones((3, 4))
    with pytest.raises(ValueError, match="'out'"):
        F.dense_forward(x, W, out=np.zeros((2, 3)))
    with pytest.raises(TypeError, match="'out'"):
        F.dense_forward(x, W, out=np.zeros((2, 4), F32))
    with pytest.raises(ValueError, match="'out'"):
        F.relu_forward(x, out=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="'out'"):
        F.relu_forward(x, out=x)  # shares memory with the input


def test_inputs_never_modified():
    for name, (fn, kw) in _ok_args().items():
        snap = {k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray) and k not in ("dW", "db")}
        fn(**kw)
        for k, v in snap.items():
            np.testing.assert_array_equal(kw[k], v, err_msg=f"{name} modified '{k}'")


# ---------------------------------------------------------------------------------------------
# relu=True: the ReLU fused into the Dense / Conv2D forward, and the layers' use of it
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (64, 33, 17), (300, 128, 256)])
def test_dense_forward_relu_is_relu_of_dense_exactly(shape, dtype):
    B, p, o = shape
    rng = np.random.default_rng(B * p + o)
    x, W, b = (rng.standard_normal(s).astype(dtype) for s in [(B, p), (p, o), (o,)])
    expected = F.relu_forward(F.dense_forward(x, W, b))
    np.testing.assert_array_equal(F.dense_forward(x, W, b, relu=True), expected)
    out = np.full((B, o), np.nan, dtype)
    assert F.dense_forward(x, W, None, out=out, relu=True) is out
    np.testing.assert_array_equal(out, F.relu_forward(F.dense_forward(x, W)))
    assert (expected >= 0).all() and (expected == 0).any() == (F.dense_forward(x, W, b) <= 0).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_conv2d_forward_relu_is_relu_of_conv_exactly(padding, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 9, 8)).astype(dtype)
    W, b = rng.standard_normal((5, 3, 3, 3)).astype(dtype), rng.standard_normal(5).astype(dtype)
    np.testing.assert_array_equal(F.conv2d_forward(x, W, b, padding=padding, relu=True),
                                  F.relu_forward(F.conv2d_forward(x, W, b, padding=padding)))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_run_layers_fusion_matches_the_layers_one_by_one(kind):
    from dselectk.layers import MLP, CNNExpert, Conv2D, ReLU, backward_layers, run_layers

    rng = np.random.default_rng(0)
    if kind == "mlp":
        net = MLP(12, (16, 8), np.random.default_rng(1), output_dim=3, dtype=np.float64)
        x = rng.standard_normal((10, 12))
    else:
        net = CNNExpert((1, 12, 12), units=(6,), rng=np.random.default_rng(1), filters=(3, 4), kernel=3,
                        dtype=np.float64)
        x = rng.standard_normal((5, 1, 12, 12))
    assert any(isinstance(layer, ReLU) for layer in net.layers)
    y = x
    for layer in net.layers:  # unfused reference: every layer on its own
        y = layer.forward(y, True)
    dout = rng.standard_normal(y.shape)
    dx_ref = backward_layers(net.layers, dout)
    grads_ref = [{k: v.copy() for k, v in layer.grads.items()} for layer in net.layers]
    for layer in net.layers:
        for g in layer.grads.values():
            g[...] = 0
    fused = run_layers(net.layers, x, True)
    np.testing.assert_array_equal(fused, y)
    np.testing.assert_array_equal(backward_layers(net.layers, dout), dx_ref)
    for layer, ref_grads in zip(net.layers, grads_ref):
        for key, value in ref_grads.items():
            if key == "b" and isinstance(layer, Conv2D):  # the fused block's db: the same terms, in window order
                np.testing.assert_allclose(layer.grads[key], value, rtol=1e-14, atol=1e-15)
            else:
                np.testing.assert_array_equal(layer.grads[key], value)
    if kind == "mlp":  # and into a caller's buffer, as the models' expert outputs
        net2 = MLP(12, (16, 8), np.random.default_rng(1), dtype=np.float64)
        d0, d1 = net2.layers[0].params, net2.layers[2].params
        want = F.relu_forward(F.dense_forward(F.relu_forward(F.dense_forward(x, d0["W"], d0["b"])), d1["W"], d1["b"]))
        out = np.full((10, 8), np.nan)
        assert run_layers(net2.layers, x, True, out=out) is out
        np.testing.assert_array_equal(out, want)
        assert net2.layers[3]._y is out  # the last ReLU's backward reads the fused output


# ---------------------------------------------------------------------------------------------
# Epilogue fusions: dropout in the Dense forward, the ReLU / dropout backward in the Dense
# backward's input gradient, the ReLU backward in the max-pooling backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (64, 33, 17), (700, 128, 256)])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_dense_forward_dropout_is_dropout_of_relu_of_dense_exactly(shape, rate, dtype):
    B, p, o = shape
    rng = np.random.default_rng(B + p + o)
    x, W, b = (rng.standard_normal(s).astype(dtype) for s in [(B, p), (p, o), (o,)])
    want = F.dropout_forward(F.relu_forward(F.dense_forward(x, W, b)), rate, 11, 5)
    np.testing.assert_array_equal(F.dense_forward(x, W, b, relu=True, dropout=(rate, 11, 5)), want)
    want_linear = F.dropout_forward(F.dense_forward(x, W, b), rate, 11, 5)  # dropout without a ReLU
    np.testing.assert_array_equal(F.dense_forward(x, W, b, dropout=(rate, 11, 5)), want_linear)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (6, 5, 4), (90, 64, 33), (700, 256, 128)])
@pytest.mark.parametrize("rate", [0.0, 0.4])
def test_dense_backward_input_mask_is_relu_and_dropout_backward_exactly(shape, rate, dtype):
    """x is the output of ReLU -> dropout: dx = relu_backward(dropout_backward(dy W^T), relu output)."""
    B, p, o = shape
    rng = np.random.default_rng(B * o + p)
    pre = rng.standard_normal((B, p)).astype(dtype)
    a = F.relu_forward(pre)
    x = F.dropout_forward(a, rate, 3, 9)
    W, dy = rng.standard_normal((p, o)).astype(dtype), rng.standard_normal((B, o)).astype(dtype)
    dW0, dW1 = np.zeros((p, o), dtype), np.zeros((p, o), dtype)
    db0, db1 = np.zeros(o, dtype), np.zeros(o, dtype)
    want = F.relu_backward(F.dropout_backward(F.dense_backward(dy, x, W, dW0, db0), rate, 3, 9), a)
    got = F.dense_backward(dy, x, W, dW1, db1, input_relu=True, input_dropout=rate)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dW1, dW0)
    np.testing.assert_array_equal(db1, db0)


def test_dense_backward_input_mask_finite_differences():
    """The fused mask is the gradient at the ReLU's input of loss(dropout(relu(pre)) W)."""
    rng = np.random.default_rng(4)
    B, p, o, rate = 5, 6, 3, 0.3
    pre, W, dy = rng.standard_normal((B, p)), rng.standard_normal((p, o)), rng.standard_normal((B, o))
    pre[np.abs(pre) < 0.05] = 0.3  # keep the finite differences away from the kink

    def loss(z):
        return float(np.sum(dy * (F.dropout_forward(np.maximum(z, 0), rate, 1, 2) @ W)))

    x = F.dropout_forward(F.relu_forward(pre), rate, 1, 2)
    got = F.dense_backward(dy, x, W, np.zeros((p, o)), None, input_relu=True, input_dropout=rate)
    num = np.zeros_like(pre)
    for i in np.ndindex(pre.shape):
        e = np.zeros_like(pre)
        e[i] = 1e-6
        num[i] = (loss(pre + e) - loss(pre - e)) / 2e-6
    np.testing.assert_allclose(got, num, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_backward_relu_mask_is_relu_backward_exactly(dtype):
    rng = np.random.default_rng(2)
    pre = rng.standard_normal((3, 4, 8, 6)).astype(dtype)
    a = F.relu_forward(pre)
    y, idx = F.max_pool2d_forward(a, 2)
    dy = rng.standard_normal(y.shape).astype(dtype)
    want = F.relu_backward(F.max_pool2d_backward(dy, idx, (8, 6)), a)
    np.testing.assert_array_equal(F.max_pool2d_backward(dy, idx, (8, 6), relu_y=y), want)
    with pytest.raises(ValueError, match="relu_y"):
        F.max_pool2d_backward(dy, idx, (8, 6), relu_y=y[:, :2])


def test_fused_arguments_are_checked():
    x, W = np.ones((2, 3)), np.ones((3, 4))
    for bad in (1.0, -0.1, np.nan):
        with pytest.raises(ValueError, match="dropout_rate"):
            F.dense_forward(x, W, relu=True, dropout=(bad, 0, 0))
        with pytest.raises(ValueError, match="input_dropout"):
            F.dense_backward(np.ones((2, 4)), x, W, np.zeros((3, 4)), input_relu=True, input_dropout=bad)
    with pytest.raises(ValueError, match="dropout_seed"):
        F.dense_forward(x, W, dropout=(0.5, -1, 0))
    with pytest.raises(TypeError):
        F.dense_forward(x, W, dropout=(0.5, 1.5, 0))


# ---------------------------------------------------------------------------------------------
# Layers: Dense -> ReLU -> Dropout fused, and arrays reused across steps only when nothing else
# refers to them
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("training", [True, False])
def test_mlp_fused_forward_backward_match_the_layers_one_by_one(dropout, training):
    from dselectk.layers import MLP, backward_layers, run_layers

    rng = np.random.default_rng(3)
    x, dout = rng.standard_normal((33, 12)), rng.standard_normal((33, 5))
    ref, net = (MLP(12, (16, 9), np.random.default_rng(7), dropout=dropout, output_dim=5, dtype=np.float64)
                for _ in range(2))
    y = x
    for layer in ref.layers:  # every layer on its own: dropout_forward, relu_backward, dropout_backward
        y = layer.forward(y, training)
    dx_ref = x.copy()
    for layer in reversed(ref.layers):
        dx_ref = layer.backward(dx_ref if layer is not ref.layers[-1] else dout)
    fused = run_layers(net.layers, x, training)
    np.testing.assert_array_equal(fused, y)
    np.testing.assert_array_equal(backward_layers(net.layers, dout), dx_ref)
    for a, b in zip(ref.layers, net.layers):
        for key in a.grads:
            np.testing.assert_array_equal(b.grads[key], a.grads[key])


def test_dense_reuses_its_arrays_only_when_nothing_refers_to_them():
    from dselectk.layers import Dense

    rng = np.random.default_rng(0)
    layer = Dense(6, 4, rng)
    x1, x2 = (rng.standard_normal((8, 6)).astype(np.float32) for _ in range(2))
    y1 = layer.forward(x1)
    kept = y1.copy()
    y2 = layer.forward(x2)  # y1 is still held here: a new array
    assert y2 is not y1
    np.testing.assert_array_equal(y1, kept)
    view = y2[2:5]
    layer.backward(np.ones_like(y2))
    y3 = layer.forward(x1)  # a view of y2 is alive: not reused either
    assert y3 is not y2
    np.testing.assert_array_equal(view, y2[2:5])
    del view, y2
    layer.backward(np.ones_like(y3))
    buffer_id = id(y3)
    del y3
    y4 = layer.forward(x2)  # nothing refers to the last output any more: its array is reused
    assert id(y4) == buffer_id
    np.testing.assert_array_equal(y4, F.dense_forward(x2, layer.params["W"], layer.params["b"]))


def test_model_outputs_a_caller_keeps_survive_the_next_steps():
    """Predictions handed to the caller are never the arrays the next step writes."""
    import dselectk as dk

    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 10)).astype(np.float32)
    Y = [rng.standard_normal(64).astype(np.float32), (rng.random(64) < 0.5).astype(np.float32)]
    model = dk.MMoE(10, n_tasks=2, n_experts=4, expert_units=(16,), tower_units=(8,), task_losses=["mse", "bce"],
                    gate=dk.gates.DSelectK(2, per_example=True), dropout=0.2)
    opt = dk.optim.Adam(model.slab.data, model.slab.grad, lr=1e-2)
    kept = []
    for step in range(4):
        model.zero_grad()
        outs = model.forward(X[step * 16:(step + 1) * 16], training=True)
        kept.append([(o, o.copy()) for o in outs])
        _, _, douts = model.loss(outs, [y[step * 16:(step + 1) * 16] for y in Y])
        model.backward(douts)
        opt.step()
    for outs in kept:
        for o, snapshot in outs:
            np.testing.assert_array_equal(o, snapshot)
    preds = dk.predict(model, X, batch_size=16)  # batches of 16 against one batch of 64
    whole = dk.predict(model, X, batch_size=64)
    for a, b in zip(preds, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
