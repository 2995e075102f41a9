"""The convolution and max-pooling kernels (NCHW) against the plain-NumPy twins of reference.py.

* forward values: float64 to 1e-12 relative, float32 to float32 rounding, over random geometries
  (strides, explicit / 'same' / 'valid' paddings, non-square kernels, batches across the
  256-example GEMM groups);
* gradients: float64 central finite differences of the reference (h = 1e-6, tolerance 1e-6, a
  random subset of entries for the larger arrays), for dx, dW and db; the accumulation into dW/db;
* layouts: non-contiguous, Fortran-ordered, byte-swapped inputs give bit-identical results;
* pooling: overlapping windows route dy to every window's argmax (adding up), ties go to the first
  maximum, results do not depend on the thread count (the convolution's only through the BLAS).
"""
import zlib

import numpy as np
import pytest

import dselectk
import reference as ref
from fd import check_entries
from dselectk import functional as F

H_FD = 1e-6
TOL = 1e-6


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def fd_check(f, x, analytic, rng, name, max_entries=40):
    """analytic (the kernel's gradient w.r.t. x) against central differences of f() (reads x in
    place), on all entries of x or on max_entries random ones."""
    assert analytic.shape == x.shape and analytic.dtype == x.dtype, name
    flat, got = x.reshape(-1), analytic.reshape(-1)
    idx = np.arange(x.size) if x.size <= max_entries else rng.choice(x.size, max_entries, replace=False)
    check_entries(f, flat, got, idx, tol=TOL, h=H_FD, context=name)


def random_geometry(rng, max_hw=9):
    """(x shape, W shape, stride, padding for the functional API, padding as 4-tuple)."""
    while True:
        B, C, F_ = (int(v) for v in rng.integers(1, 4, 3))
        H, W = (int(v) for v in rng.integers(1, max_hw + 1, 2))
        KH, KW = (int(v) for v in rng.integers(1, 6, 2))
        kind = rng.integers(4)
        if kind == 0:
            stride, padding = (1, 1), "same"
        else:
            stride = tuple(int(v) for v in rng.integers(1, 4, 2))
            padding = "valid" if kind == 1 else (
                (int(rng.integers(KH)), int(rng.integers(KW))) if kind == 2
                else tuple(int(rng.integers(k)) for k in (KH, KH, KW, KW)))
        pads = F.conv2d_padding(padding, (KH, KW), stride)
        if KH <= H + pads[0] + pads[1] and KW <= W + pads[2] + pads[3]:
            return (B, C, H, W), (F_, C, KH, KW), stride, padding, pads


GEOMETRIES = list(range(40))


@pytest.mark.parametrize("case", GEOMETRIES)
def test_conv2d_forward_matches_reference(case):
    rng = rng_for("conv-fwd", case)
    xs, ws, stride, padding, pads = random_geometry(rng)
    x, W, b = rng.normal(size=xs), rng.normal(size=ws), rng.normal(size=ws[0])
    y = F.conv2d_forward(x, W, b, stride, padding)
    expected = ref.conv2d(x, W, b, stride, pads)
    assert y.shape == expected.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    if padding == "same":
        assert y.shape[2:] == x.shape[2:]
    y32 = F.conv2d_forward(x.astype(np.float32), W.astype(np.float32), b.astype(np.float32), stride, padding)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, expected, rtol=1e-5, atol=1e-5 * np.sqrt(np.prod(ws[1:])))
    np.testing.assert_allclose(F.conv2d_forward(x, W, None, stride, padding), ref.conv2d(x, W, None, stride, pads),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", GEOMETRIES)
def test_conv2d_backward_finite_differences(case):
    rng = rng_for("conv-bwd", case)
    xs, ws, stride, padding, pads = random_geometry(rng)
    x, W, b = rng.normal(size=xs), rng.normal(size=ws), rng.normal(size=ws[0])
    dy = rng.normal(size=ref.conv2d(x, W, b, stride, pads).shape)
    dW0, db0 = rng.normal(size=ws), rng.normal(size=ws[0])  # accumulated into, not overwritten
    dW, db = dW0.copy(), db0.copy()
    dx = F.conv2d_backward(dy, x, W, dW, db, stride, padding)

    def objective():
        return float(np.sum(dy * ref.conv2d(x, W, b, stride, pads)))

    fd_check(objective, x, dx, rng, "dx")
    fd_check(objective, W, dW - dW0, rng, "dW")
    fd_check(objective, b, db - db0, rng, "db")
    np.testing.assert_allclose(db - db0, dy.sum(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    # need_dx=False and db=None skip those, and the rest is unchanged
    dW2 = np.zeros_like(W)
    assert F.conv2d_backward(dy, x, W, dW2, None, stride, padding, need_dx=False) is None
    np.testing.assert_allclose(dW2, dW - dW0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", range(8))
def test_conv2d_backward_float32(case):
    rng = rng_for("conv-bwd32", case)
    xs, ws, stride, padding, pads = random_geometry(rng)
    x, W = rng.normal(size=xs), rng.normal(size=ws)
    dy = rng.normal(size=ref.conv2d(x, W, None, stride, pads).shape)
    dW64, db64 = np.zeros(ws), np.zeros(ws[0])
    dx64 = F.conv2d_backward(dy, x, W, dW64, db64, stride, padding)
    dW32, db32 = np.zeros(ws, np.float32), np.zeros(ws[0], np.float32)
    f32 = [a.astype(np.float32) for a in (dy, x, W)]
    dx32 = F.conv2d_backward(*f32, dW32, db32, stride, padding)
    for got, want in ((dx32, dx64), (dW32, dW64), (db32, db64)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_conv2d_batch_across_gemm_groups():
    """B = 600 spans three GEMM groups of 256 examples: every example matches the reference, and
    dW / db sum over all groups."""
    rng = rng_for("groups")
    x, W, b = rng.normal(size=(600, 2, 5, 4)), rng.normal(size=(3, 2, 2, 3)), rng.normal(size=3)
    y = F.conv2d_forward(x, W, b, (1, 1), (1, 0))
    expected = ref.conv2d(x, W, b, (1, 1), (1, 1, 0, 0))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    dy = rng.normal(size=y.shape)
    dW, db = np.zeros_like(W), np.zeros_like(b)
    dx = F.conv2d_backward(dy, x, W, dW, db, 1, (1, 0))
    parts = [(np.zeros_like(W), np.zeros_like(b)) for _ in range(3)]
    dxs = [F.conv2d_backward(dy[s:s + 200], x[s:s + 200], W, *parts[i], 1, (1, 0)) for i, s in enumerate((0, 200, 400))]
    np.testing.assert_allclose(dx, np.concatenate(dxs), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dW, sum(p[0] for p in parts), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, sum(p[1] for p in parts), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_non_contiguous_inputs(dtype):
    rng = rng_for("layout", np.dtype(dtype).name)
    x = rng.normal(size=(3, 2, 7, 6)).astype(dtype)
    W = rng.normal(size=(4, 2, 3, 2)).astype(dtype)
    b = rng.normal(size=4).astype(dtype)
    y = F.conv2d_forward(x, W, b, (2, 1), "valid")
    dy = rng.normal(size=y.shape).astype(dtype)
    dW, db = np.zeros_like(W), np.zeros_like(b)
    dx = F.conv2d_backward(dy, x, W, dW, db, (2, 1), "valid")
    odd_x = np.asfortranarray(x)
    odd_W = np.zeros((4, 2, 3, 4), dtype)[..., ::2]
    odd_W[...] = W
    odd_b = b.astype(b.dtype.newbyteorder())
    odd_dy = dy.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)
    assert not (odd_x.flags.c_contiguous or odd_W.flags.c_contiguous or odd_dy.flags.c_contiguous)
    np.testing.assert_array_equal(F.conv2d_forward(odd_x, odd_W, odd_b, (2, 1), "valid"), y)
    dW2, db2 = np.zeros_like(W), np.zeros_like(b)
    np.testing.assert_array_equal(F.conv2d_backward(odd_dy, odd_x, odd_W, dW2, db2, (2, 1), "valid"), dx)
    np.testing.assert_array_equal(dW2, dW)
    np.testing.assert_array_equal(db2, db)


# ---------------------------------------------------------------------------------------------
# max pooling
# ---------------------------------------------------------------------------------------------

def random_pool(rng):
    B, C = (int(v) for v in rng.integers(1, 4, 2))
    H, W = (int(v) for v in rng.integers(1, 10, 2))
    kernel = (int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1)))
    stride = None if rng.integers(3) == 0 else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    return (B, C, H, W), kernel, stride


@pytest.mark.parametrize("case", range(40))
def test_max_pool2d_matches_reference(case):
    rng = rng_for("pool", case)
    shape, kernel, stride = random_pool(rng)
    x = rng.integers(0, 5, size=shape).astype(np.float64)  # many ties
    for dtype in (np.float64, np.float32):
        y, idx = F.max_pool2d_forward(x.astype(dtype), kernel, stride)
        y_ref, idx_ref = ref.max_pool2d(x.astype(dtype), kernel, stride)
        assert y.dtype == dtype and idx.dtype == np.int64
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(idx, idx_ref)
        dy = rng.normal(size=y.shape).astype(dtype)
        dx = F.max_pool2d_backward(dy, idx, shape[2:])
        expected = np.zeros(shape)
        for b, c, oh, ow in np.ndindex(y.shape):
            expected[b, c].flat[idx_ref[b, c, oh, ow]] += dy[b, c, oh, ow]
        assert dx.dtype == dtype
        np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", range(10))
def test_max_pool2d_backward_finite_differences(case):
    """Distinct values far apart: no argmax changes under the +-h perturbation."""
    rng = rng_for("pool-fd", case)
    shape, kernel, stride = random_pool(rng)
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64) * 0.01
    y, idx = F.max_pool2d_forward(x, kernel, stride)
    dy = rng.normal(size=y.shape)
    dx = F.max_pool2d_backward(dy, idx, shape)
    fd_check(lambda: float(np.sum(dy * ref.max_pool2d(x, kernel, stride)[0])), x, dx, rng, "dx")


def test_max_pool2d_overlapping_windows_add_up():
    """3x3 windows at stride 1 over a plane with one large entry: every window containing it
    routes its gradient there."""
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 9.0
    x[0, 0, 0, 0] = 1.0
    y, idx = F.max_pool2d_forward(x, 3, 1)
    assert np.all(y == 9.0) and np.all(idx == 2 * 5 + 2)
    dx = F.max_pool2d_backward(np.ones_like(y), idx, (5, 5))
    assert dx[0, 0, 2, 2] == 9.0 and dx.sum() == 9.0


def test_max_pool2d_ties_go_to_the_first_maximum_and_drop_the_remainder():
    x = np.array([[[[1.0, 3.0, 3.0, 0.0, 7.0],
                    [3.0, 2.0, 3.0, 3.0, 7.0],
                    [7.0, 7.0, 7.0, 7.0, 7.0]]]])  # the last row and column fill no 2x2 window
    y, idx = F.max_pool2d_forward(x, 2)
    np.testing.assert_array_equal(y, [[[[3.0, 3.0]]]])
    np.testing.assert_array_equal(idx, [[[[1, 2]]]])  # row-major first maximum
    y, idx = F.max_pool2d_forward(x, (2, 2), (1, 1))
    np.testing.assert_array_equal(idx[0, 0, 0], [1, 1, 2, 4])


@pytest.fixture
def restore_threads():
    old = dselectk.get_num_threads()
    yield
    dselectk.set_num_threads(old)


def test_thread_count(restore_threads):
    """Pooling and the im2col / col2im copies are split by examples: pooling results are identical
    for any thread count; the convolution's GEMMs are the BLAS's, whose rounding may depend on its
    thread count (as for the dense layers), so those are compared to float64 rounding."""
    rng = rng_for("threads")
    x = rng.normal(size=(300, 3, 12, 11))
    W = rng.normal(size=(5, 3, 3, 4))
    b = rng.normal(size=5)
    results = []
    for threads in (1, 2, 3):
        dselectk.set_num_threads(threads)
        y = F.conv2d_forward(x, W, b, 1, "same")
        dy = np.cos(y)
        dW, db = np.zeros_like(W), np.zeros_like(b)
        dx = F.conv2d_backward(dy, x, W, dW, db, 1, "same")
        p, idx = F.max_pool2d_forward(x, (3, 2), (2, 1))
        dp = F.max_pool2d_backward(np.sin(p), idx, x.shape[2:])
        results.append(((y, dx, dW, db), (p, idx, dp)))
    for conv, pool in results[1:]:
        for a, b_ in zip(results[0][0], conv):
            np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-10)
        for a, b_ in zip(results[0][1], pool):
            np.testing.assert_array_equal(a, b_)


# ---------------------------------------------------------------------------------------------
# Conv2D -> ReLU -> MaxPool2D in one kernel (the CNN experts' blocks)
# ---------------------------------------------------------------------------------------------

def _fused_case(case, dtype):
    """A random convolution whose output plane fits a random pooling, and its arrays."""
    rng = rng_for("fused", case)
    while True:
        xs, ws, stride, padding, pads = random_geometry(rng, max_hw=12)
        OH = (xs[2] + pads[0] + pads[1] - ws[2]) // stride[0] + 1
        OW = (xs[3] + pads[2] + pads[3] - ws[3]) // stride[1] + 1
        pool = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        pool_stride = None if rng.random() < 0.5 else (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        if pool[0] <= OH and pool[1] <= OW:
            break
    x, W = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    return rng, x, W, b, dict(stride=stride, padding=padding), dict(pool=pool, pool_stride=pool_stride)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(30))
def test_conv2d_relu_pool_is_the_three_kernels_exactly(case, dtype):
    rng, x, W, b, conv, pool = _fused_case(case, dtype)
    a = F.conv2d_forward(x, W, b, relu=True, **conv)
    y0, idx = F.max_pool2d_forward(a, pool["pool"], pool["pool_stride"])
    y, code = F.conv2d_relu_pool_forward(x, W, b, **conv, **pool)
    np.testing.assert_array_equal(y, y0)
    assert code.dtype == np.uint8 and code.shape == y.shape
    dy = rng.standard_normal(y.shape).astype(dtype)
    dW0, db0, dW1, db1 = np.zeros_like(W), np.zeros_like(b), np.zeros_like(W), np.zeros_like(b)
    dx0 = F.conv2d_backward(F.relu_backward(F.max_pool2d_backward(dy, idx, a.shape[2:]), a), x, W, dW0, db0, **conv)
    dx1 = F.conv2d_relu_pool_backward(dy, code, y, x, W, dW1, db1, **conv, **pool)
    np.testing.assert_array_equal(dx1, dx0)
    np.testing.assert_array_equal(dW1, dW0)
    # the bias gradient adds the same terms in window order (see csrc/conv_impl.h)
    np.testing.assert_allclose(db1, db0, rtol=1e-12 if dtype == np.float64 else 1e-6, atol=1e-12)
    assert F.conv2d_relu_pool_backward(dy, code, y, x, W, dW1, None, **conv, **pool, need_dx=False) is None


@pytest.mark.parametrize("case", range(8))
def test_conv2d_relu_pool_backward_finite_differences(case):
    rng, x, W, b, conv, pool = _fused_case(case, np.float64)
    y, code = F.conv2d_relu_pool_forward(x, W, b, **conv, **pool)
    dy = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(dy * F.conv2d_relu_pool_forward(x, W, b, **conv, **pool)[0]))

    dW, db = np.zeros_like(W), np.zeros_like(b)
    dx = F.conv2d_relu_pool_backward(dy, code, y, x, W, dW, db, **conv, **pool)
    for arr, grad, name in ((x, dx, "dx"), (W, dW, "dW"), (b, db, "db")):
        fd_check(loss, arr, grad, rng, name)


def test_conv2d_relu_pool_rejects_bad_codes_and_pools():
    rng = rng_for("fused-bad")
    x, W = rng.standard_normal((2, 1, 6, 6)), rng.standard_normal((3, 1, 3, 3))
    y, code = F.conv2d_relu_pool_forward(x, W, pool=2)
    dW = np.zeros_like(W)
    bad = code.copy()
    bad[1, 2, 0, 1] = 4  # a 2 x 2 window has positions 0..3
    with pytest.raises(ValueError, match=r"code.flat\[\d+\] = 4"):
        F.conv2d_relu_pool_backward(np.ones_like(y), bad, y, x, W, dW, pool=2)
    with pytest.raises(TypeError, match="uint8"):
        F.conv2d_relu_pool_backward(np.ones_like(y), code.astype(np.int64), y, x, W, dW, pool=2)
    with pytest.raises(ValueError, match="shape"):
        F.conv2d_relu_pool_backward(np.ones_like(y), code[:1], y, x, W, dW, pool=2)
    with pytest.raises(ValueError, match="larger than the convolution's output"):
        F.conv2d_relu_pool_forward(x, W, pool=5)
    with pytest.raises(ValueError, match="256"):
        F.conv2d_relu_pool_forward(rng.standard_normal((1, 1, 40, 40)), W, pool=17)
    np.testing.assert_array_equal(dW, 0)  # nothing accumulated by the refused calls


def test_a_fused_pooling_layer_refuses_its_own_backward():
    from dselectk.layers import CNNExpert, MaxPool2D, run_layers

    net = CNNExpert((1, 12, 12), units=(4,), rng=np.random.default_rng(0), filters=(2, 3), kernel=3)
    run_layers(net.layers, np.ones((2, 1, 12, 12), np.float32), True)
    pool = next(layer for layer in net.layers if isinstance(layer, MaxPool2D))
    with pytest.raises(RuntimeError, match="fused"):
        pool.backward(np.ones((2, 2, 5, 5), np.float32))
