"""threadpoolctl and dselectk's vendored OpenBLAS.

dselectk runs every kernel on its own thread pool (csrc/threads.c), products included: they are cut
into tiles, each a single-threaded call of the vendored OpenBLAS, so that no product waits on a
descheduled BLAS thread. The BLAS's own thread count therefore stays 1 whatever
``dselectk.set_num_threads`` says.

What threadpoolctl sees: after ``import dselectk``, ``threadpoolctl.threadpool_info()`` lists the
vendored ``dselectk/_lib/libscipy_openblas*.so`` (user_api "blas", internal_api "openblas") with
one thread. ``threadpool_limits`` does not reach dselectk's pool (``dselectk.set_num_threads`` or
$DSELECTK_NUM_THREADS is the knob), and a limit that raises the vendored BLAS's thread count is
undone by dselectk's next product (which must not start BLAS threads inside its tasks)."""
import os

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

import dselectk  # noqa: E402
from dselectk import functional as F  # noqa: E402

LIB_DIR = os.path.realpath(os.path.join(os.path.dirname(dselectk.__file__), "_lib"))


def _ours():
    found = [info for info in threadpoolctl.threadpool_info()
             if os.path.dirname(os.path.realpath(info["filepath"])) == LIB_DIR]
    assert len(found) == 1, f"vendored OpenBLAS in {LIB_DIR} not listed: {threadpoolctl.threadpool_info()}"
    return found[0]


@pytest.fixture
def two_threads():
    before = dselectk.get_num_threads()
    dselectk.set_num_threads(2)
    yield
    dselectk.set_num_threads(before)


def _product():
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((256, 64)), rng.standard_normal((64, 128))
    np.testing.assert_allclose(F.dense_forward(x, W), x @ W, rtol=1e-12, atol=1e-12)


def test_threadpool_info_lists_the_vendored_openblas_at_one_thread(two_threads):
    info = _ours()
    assert info["user_api"] == "blas" and info["internal_api"] == "openblas"
    assert os.path.basename(info["filepath"]).startswith("libscipy_openblas")
    assert info["num_threads"] == 1 == dselectk.build_info()["blas_num_threads"]
    assert dselectk.get_num_threads() == 2


@pytest.mark.parametrize("kwargs", [dict(limits=1), dict(limits=1, user_api="blas"), dict(limits={"libscipy_openblas": 1})])
def test_threadpool_limits_leave_dselectk_alone(two_threads, kwargs):
    with threadpoolctl.threadpool_limits(**kwargs):
        assert _ours()["num_threads"] == 1
        assert dselectk.get_num_threads() == 2
        _product()
    assert _ours()["num_threads"] == 1
    assert dselectk.get_num_threads() == 2


def test_a_raised_blas_thread_count_is_undone_by_the_next_product(two_threads):
    with threadpoolctl.threadpool_limits(limits={"libscipy_openblas": 3}):
        _product()
        assert _ours()["num_threads"] == 1
    _product()
    assert _ours()["num_threads"] == 1


def test_threadpool_limits_does_not_reach_the_pool(two_threads):
    """The pool's thread count is dselectk's own setting, not libgomp's: threadpoolctl leaves it."""
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert dselectk.get_num_threads() == 2
        assert dselectk.build_info()["num_threads"] == 2
