"""dselectk: DSelect-k and other Mixture-of-Experts gates as C kernels on NumPy arrays.

    import dselectk as dk
    gate = dk.DSelectKGate(n_experts=16, k=4, gamma=1.0, entropy_reg=0.1)
    w = gate.forward()          # expert weights, on the simplex, <= k nonzeros once S(Z) is binary

The kernels live in ``dselectk.functional``; gate objects with parameters and gradients, and the
gate specifications models take (``dk.gates.DSelectK(k=2, ...)``), in ``dselectk.gates``. See the
README for the math in the paper's notation.
"""
import os as _os

import numpy as _np  # loaded first, so the settings below do not reach NumPy's own BLAS

# The kernels run on dselectk's own thread pool (csrc/threads.c; its idle workers spin for
# $DSELECTK_SPIN_US, 50 us by default, then sleep), and the vendored OpenBLAS stays at one thread.
# Should another thread pool still start in this process (OpenBLAS's, raised by threadpoolctl; the
# libgomp that the extension links and that PyTorch may share), its idle threads would spin for
# ~2^28 cycles (OpenBLAS) or 300k spins (libgomp) by default and steal the cores the pool computes
# on; short spins before sleeping prevent that. The variables are read once, when the libraries
# load, so they are set only around loading the extension, and a value the user has set is left
# alone.
_SPIN_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "10000"}
_set_here = [k for k in _SPIN_DEFAULTS if k not in _os.environ]
_os.environ.update({k: _SPIN_DEFAULTS[k] for k in _set_here})
try:
    from . import _C
except ImportError as _exc:  # the source tree without a build, most often
    raise ImportError(
        f"dselectk's C extension could not be loaded from {_os.path.dirname(__file__)} ({_exc}). "
        "If that is the source checkout, install the package (`pip install .`) and run from another "
        "directory, or build it in place with `pip install -e .`."
    ) from _exc
finally:
    for _k in _set_here:
        _os.environ.pop(_k, None)
from . import callbacks, functional, gates, inputs, metrics, optim
from .embedding import Embedding, EmbeddingInput
from .export import export_onnx
from .gates import CometGate, DSelectKGate, HashGate, SoftmaxGate, SoftmaxSelectorGate, TopKGate
from .local_search import LocalSearch
from .models import MMoE, MoE, SharedBottom, load, save
from .trainer import AnnealTemperature, History, evaluate, fit, predict

__version__ = "0.1.0"
__all__ = [
    "DSelectKGate",
    "TopKGate",
    "SoftmaxGate",
    "SoftmaxSelectorGate",
    "CometGate",
    "HashGate",
    "MMoE",
    "MoE",
    "SharedBottom",
    "LocalSearch",
    "Embedding",
    "EmbeddingInput",
    "fit",
    "evaluate",
    "predict",
    "History",
    "AnnealTemperature",
    "save",
    "load",
    "export_onnx",
    "functional",
    "callbacks",
    "gates",
    "inputs",
    "metrics",
    "optim",
    "build_info",
    "set_num_threads",
    "get_num_threads",
]


def set_num_threads(n):
    """Threads of dselectk's pool, which runs the C kernels' parallel loops and matrix products
    (the vendored OpenBLAS itself stays at one thread; see the README's Threads section). Default:
    $DSELECTK_NUM_THREADS, else the number of CPUs this process may run on."""
    if isinstance(n, (bool, _np.bool_)) or not isinstance(n, (int, _np.integer)):
        raise TypeError(f"the number of threads must be an int, got {type(n).__name__}")
    _C.set_num_threads(int(n))  # ValueError outside [1, 4096], however large


def get_num_threads():
    """The thread count set by :func:`set_num_threads`."""
    return _C.get_num_threads()


def build_info():
    """How the extension was built and runs: {'openmp': bool (compiled with OpenMP; the kernels
    run on dselectk's own pool either way), 'blas': str, 'num_threads': int (the pool's, see
    set_num_threads), 'blas_num_threads': int (the vendored BLAS's own, kept at 1: the pool splits
    the products), 'pool_workers': int (worker threads started so far), 'parallel_min_work': int
    (the work of a loop's chunk, below which it runs in the calling thread; 0 in the sanitizer
    build, which threads everything)}."""
    return _C.build_info()


def _default_threads():
    env = _os.environ.get("DSELECTK_NUM_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"DSELECTK_NUM_THREADS must be a positive integer, got {env!r}") from None
        if value < 1:
            raise ValueError(f"DSELECTK_NUM_THREADS must be a positive integer, got {env!r}")
        return value
    try:
        return len(_os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return _os.cpu_count() or 1


set_num_threads(_default_threads())
