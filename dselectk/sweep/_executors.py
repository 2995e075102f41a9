"""Where trials run: in this process (:func:`_execute` called directly), in a spawn-started process
pool (threads divided among the workers) or on a Dask cluster. The two backends offer the runner the
same small interface (window, broken, submit, wait, outcome, restart, cancel, abort, close)."""
from __future__ import annotations

import concurrent.futures as _cf
import contextlib
import multiprocessing
import numbers
import os
import socket
import sys
import time
import uuid

import numpy as np

_DASK_INSTALL_HINT = 'pip install "dselectk[sweep]"  (or: pip install "dask[distributed]")'
# Set in every worker process of executor="process" before anything heavy is imported there.
_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "DSELECTK_NUM_THREADS")

# The process pool's initializer. It is the builtin ``exec`` with this code rather than a function of
# this module on purpose: unpickling a function of dselectk.sweep in the freshly spawned worker would
# import dselectk, and with it NumPy, OpenBLAS and libgomp, whose thread pools read these variables
# once, when they load. ``exec`` unpickles without importing anything, so the variables are set first.
#
# It also makes the worker die with its parent (PARENT, the pid of the process running the sweep).
# A parent that is SIGKILLed cannot shut the pool down, and the workers would wait for work forever
# (each holds the write end of its own call queue, so it never sees EOF), keeping multiprocessing's
# resource tracker alive too (it exits when the last holder of its pipe does). On Linux the kernel
# sends the worker SIGKILL when the thread that started it exits (prctl PR_SET_PDEATHSIG: immediate,
# nothing runs in the worker; that thread is the one in Sweep.run, which outlives the pool). Where
# prctl is missing or refused, a daemon thread polls os.getppid(), which changes to the reaper's pid
# when the parent dies (POSIX). The getppid check after arming covers a parent that died before.
_WORKER_BOOTSTRAP = """
import os, sys
os.environ.update(ENV)
armed = False
if sys.platform.startswith("linux"):
    import ctypes, signal
    try:
        armed = ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
if not armed:
    import threading, time
    def watch_parent():
        while os.getppid() == PARENT:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch_parent, name="dselectk-sweep-parent-watch", daemon=True).start()
if os.getppid() != PARENT:
    os._exit(1)
import dselectk
dselectk.set_num_threads(THREADS)
"""


def _available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker_id():
    if "distributed" in sys.modules:
        try:
            return sys.modules["distributed"].get_worker().address
        except Exception:  # not inside a Dask worker
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


def _check_metrics(metrics):
    if not isinstance(metrics, dict):
        raise TypeError(f"trial_fn must return a dict of metric name -> float, got {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metric names must be str, got {name!r}")
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise TypeError(f"metric {name!r} must be a real number, got {type(value).__name__} {value!r}")
        out[name] = float(value)
    return out


_dask_threads_set = False


def _execute(trial_fn, config, seed, threads=None):
    """Runs one trial where it was sent (this process, a pool worker or a Dask worker).

    ``threads``: an int sets dselectk's threads first; ``"auto"`` (Dask) sets them once per worker
    process from $OMP_NUM_THREADS (which Dask's nanny sets to 1 by default) unless
    $DSELECTK_NUM_THREADS is set (dselectk already read it when it was imported)."""
    global _dask_threads_set
    if threads == "auto":
        if not _dask_threads_set:
            _dask_threads_set = True
            omp = os.environ.get("OMP_NUM_THREADS", "")
            if "DSELECTK_NUM_THREADS" not in os.environ and omp.isdigit() and int(omp) > 0:
                import dselectk

                dselectk.set_num_threads(int(omp))
    elif threads is not None:
        import dselectk

        dselectk.set_num_threads(threads)
    t0 = time.perf_counter()
    metrics = trial_fn(dict(config), seed)
    wall = time.perf_counter() - t0
    return {"metrics": _check_metrics(metrics), "wall_time": wall, "worker": _worker_id()}


@contextlib.contextmanager
def _environ(env):
    """Sets environment variables for the duration (for the spawned processes to inherit)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(f"running a sweep on Dask needs dask.distributed: {_DASK_INSTALL_HINT}") from exc
    return distributed


class _ProcessBackend:
    """concurrent.futures.ProcessPoolExecutor, spawn-started, threads divided among the workers."""

    crash_restarts_pool = True

    def __init__(self, trial_fn, workers, threads):
        self.trial_fn, self.workers, self.threads = trial_fn, workers, threads
        self.window = workers  # no queued work beyond the running trials: an interrupt loses only those
        self.env = {k: str(threads) for k in _THREAD_ENV_VARS}
        self.context = multiprocessing.get_context("spawn")
        self.broken = False
        self._start()

    def _start(self):
        self.pool = _cf.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self.context, initializer=exec,
            initargs=(_WORKER_BOOTSTRAP, {"ENV": self.env, "THREADS": self.threads, "PARENT": os.getpid()}))
        self.broken = False

    def submit(self, trial):
        # The workers are spawned on submit; they inherit these variables too, which also covers a
        # main module that imports NumPy at its top (spawn re-imports it before the initializer runs).
        with _environ(self.env):
            return self.pool.submit(_execute, self.trial_fn, trial["config"], trial["seed"])

    @staticmethod
    def wait(futures):
        return _cf.wait(list(futures), return_when=_cf.FIRST_COMPLETED).done

    def outcome(self, future):
        if future.cancelled():
            return "cancelled", None
        exc = future.exception()
        if exc is None:
            return "ok", future.result()
        if isinstance(exc, _cf.process.BrokenProcessPool):
            self.broken = True
            return "crash", exc
        return "error", exc

    def restart(self):
        self.pool.shutdown(wait=True)
        self._start()

    def cancel(self, futures):
        """Cancels the futures not yet started; returns those cancelled."""
        return [f for f in futures if f.cancel()]

    def abort(self, futures):
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # the trials in flight are lost anyway; do not wait for them
            with contextlib.suppress(Exception):
                p.terminate()

    def close(self):
        self.pool.shutdown(wait=True)


class _DaskBackend:
    crash_restarts_pool = False

    def __init__(self, trial_fn, executor, window, retries, threads):
        distributed = _import_distributed()
        self.distributed = distributed
        self.trial_fn, self.retries, self.threads = trial_fn, retries, threads
        self.owned = isinstance(executor, str)
        self.client = distributed.Client(executor, set_as_default=False) if self.owned else executor
        self.completed = distributed.as_completed(loop=self.client.loop)
        self.window = window
        self.broken = False
        killed = getattr(distributed, "KilledWorker", None)
        if killed is None:
            from distributed.scheduler import KilledWorker as killed
        self.killed_worker = killed

    def submit(self, trial):
        # retries: Dask reruns a trial that raised (a worker that dies mid-trial makes the scheduler
        # reschedule the trial by itself, up to distributed.scheduler.allowed-failures times; past
        # that, the KilledWorker error is resubmitted by Sweep.run, up to `retries` times).
        future = self.client.submit(
            _execute, self.trial_fn, trial["config"], trial["seed"], self.threads,
            key=f"dselectk-trial-{trial['key']}-{uuid.uuid4().hex[:8]}", pure=False, retries=self.retries)
        self.completed.add(future)
        return future

    def wait(self, futures):
        # as_completed, bound to this client's loop (distributed.wait would use the default client).
        # It may also yield futures cancelled earlier, which Sweep.run no longer tracks and skips.
        first = next(self.completed)
        return {first, *self.completed.next_batch(block=False)}

    def outcome(self, future):
        status = future.status
        if status == "finished":
            return "ok", future.result()
        if status == "cancelled":
            return "cancelled", None
        if status != "error":  # "lost": its data went with a worker
            return "crash", RuntimeError(f"the trial's future is {status!r}")
        exc = future.exception()
        if isinstance(exc, self.killed_worker):
            return "crash", exc
        with contextlib.suppress(Exception):
            exc = exc.with_traceback(future.traceback())
        return "error", exc

    def restart(self):  # pragma: no cover - never broken
        self.broken = False

    def cancel(self, futures):
        futures = list(futures)
        if futures:
            self.client.cancel(futures)
        return futures

    def abort(self, futures):
        with contextlib.suppress(Exception):
            self.cancel(futures)

    def close(self):
        if self.owned:
            self.client.close()


def _is_dask_client(executor):
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(executor, distributed.Client)
