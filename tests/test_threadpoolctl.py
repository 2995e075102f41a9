"""threadpoolctl and dselectk's vendored OpenBLAS.

What works: after ``import dselectk``, ``threadpoolctl.threadpool_info()`` lists the vendored
``dselectk/_lib/libscipy_openblas*.so`` (user_api "blas", internal_api "openblas"), and
``threadpool_limits`` changes its thread count and restores it on exit.

What it does not reach: the C kernels' own OpenMP loops. They pass ``num_threads`` explicitly
(``dselectk.set_num_threads``), so the libgomp limit that threadpoolctl sets (omp_set_num_threads)
does not change them, and ``dselectk.get_num_threads()`` keeps its value inside the block. Use
``dselectk.set_num_threads`` (or $DSELECTK_NUM_THREADS) for dselectk; threadpoolctl is the tool for
limiting the BLAS alone, e.g. in a process that also runs NumPy's or PyTorch's BLAS."""
import os

import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

import dselectk  # noqa: E402

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


def test_threadpool_info_lists_the_vendored_openblas(two_threads):
    info = _ours()
    assert info["user_api"] == "blas" and info["internal_api"] == "openblas"
    assert os.path.basename(info["filepath"]).startswith("libscipy_openblas")
    assert info["num_threads"] == 2 == dselectk.build_info()["blas_num_threads"]
    dselectk.set_num_threads(1)
    assert _ours()["num_threads"] == 1


@pytest.mark.parametrize("kwargs", [dict(limits=1), dict(limits=1, user_api="blas"), dict(limits={"libscipy_openblas": 1})])
def test_threadpool_limits_sets_and_restores_our_blas(two_threads, kwargs):
    with threadpoolctl.threadpool_limits(**kwargs):
        assert _ours()["num_threads"] == 1
        assert dselectk.build_info()["blas_num_threads"] == 1
    assert _ours()["num_threads"] == 2
    assert dselectk.build_info()["blas_num_threads"] == 2


def test_threadpool_limits_does_not_reach_the_kernels_openmp_loops(two_threads):
    """The OpenMP thread count of the C kernels is dselectk's own setting (passed explicitly as
    num_threads), not libgomp's: threadpoolctl leaves it alone."""
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert dselectk.get_num_threads() == 2
        assert dselectk.build_info()["num_threads"] == 2
    with threadpoolctl.threadpool_limits(limits=1):
        assert dselectk.get_num_threads() == 2  # BLAS at 1 (above), the kernels' loops still at 2
