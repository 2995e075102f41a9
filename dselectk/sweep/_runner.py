"""The sweep itself: :class:`Sweep` plans the trials from the search space, skips those already in
the results file, runs the others on an executor (retrying those whose worker died) and returns a
:class:`SweepResult`."""
from __future__ import annotations

import concurrent.futures as _cf
import contextlib
import math
import numbers
import os
import pickle
import sys
import time
from collections import deque

from ._executors import _DaskBackend, _ProcessBackend, _available_cpus, _execute, _import_distributed, _is_dask_client
from ._report import SweepResult, _passes, _Progress
from ._space import _canonical, _check_grid, _check_int, config_at, plan_trial, sample_indices
from ._store import _ResultsFile, load_records

__all__ = ["Sweep", "TrialError"]


class TrialError(RuntimeError):
    """A trial raised (or its worker process kept dying). ``config``, ``repetition`` and ``seed``
    name the trial; the original exception is chained as ``__cause__``."""

    def __init__(self, message, config=None, repetition=None, seed=None):
        super().__init__(message)
        self.config, self.repetition, self.seed = config, repetition, seed


class Sweep:
    """Random grid search with repetitions, generic over a trial function.

    Parameters
    ----------
    trial_fn : callable(config: dict, seed: int) -> dict of str -> float
        Trains and evaluates one configuration with one seed and returns its metrics. For
        ``executor="process"`` it must be picklable by reference: a function defined at the top
        level of an importable module (or of the main script, whose run is then guarded by
        ``if __name__ == "__main__":``), not a lambda or a nested function. Dask pickles it with
        cloudpickle; dselectk must be importable on the Dask workers.
    grid : dict name -> list of values
        The hyperparameter grid; values must be JSON-like (None, bool, int, float, str, or
        lists/dicts of them; tuples reach ``trial_fn`` as lists) and distinct within a list.
    n_trials : int >= 1
        How many distinct configurations to sample from the Cartesian product, without
        replacement; every configuration (in grid order) if ``n_trials`` >= the grid size. The
        sample depends only on ``seed`` and the grid's shape, and the first k of n_trials=n are the
        sample for n_trials=k, so a sweep can be extended by raising ``n_trials``.
    repetitions : int >= 1
        Runs per configuration, each with its own seed, derived from (seed, config, repetition)
        by SHA-256 (an int in [0, 2**31)).
    seed : int
        Seeds the sample of configurations and the trials' seeds.
    metric, mode : str, "min" | "max"
        The metric that picks the best configuration (by its mean over the repetitions).
    constraint : callable(metrics dict) -> bool, optional
        A configuration is eligible as best only if every one of its runs passes (e.g. the paper
        discards values of lambda for which S(Z) did not become binary). Evaluated in this process.
    results_path : str or path-like, optional
        A JSON-lines file to which every finished trial is appended at once (flushed and fsync'ed),
        and from which a rerun resumes: trials whose key (SHA-256 of config, repetition and seed)
        is recorded for this sweep's ``name`` are not run again. Several sweeps may share a file.
    name : str, optional
        Names the sweep in its records (default: ``trial_fn.__qualname__``).

    Attributes: ``configs`` (the sampled configurations, in order), ``grid_size``, ``trials``
    (the planned trials: dicts with ``config``, ``repetition``, ``seed``, ``key``).
    """

    def __init__(self, trial_fn, grid, n_trials, repetitions=1, seed=0, metric="val_loss", mode="min",
                 constraint=None, results_path=None, name=None):
        if not callable(trial_fn):
            raise TypeError(f"trial_fn must be callable(config, seed) -> dict, got {type(trial_fn).__name__}")
        self.trial_fn = trial_fn
        self.grid_keys, self._grid_values = _check_grid(grid)
        self.grid = dict(zip(self.grid_keys, self._grid_values))
        self.n_trials = _check_int(n_trials, "n_trials", 1)
        self.repetitions = _check_int(repetitions, "repetitions", 1)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.seed = int(seed)
        if not isinstance(metric, str) or not metric:
            raise TypeError(f"metric must be a non-empty str, got {metric!r}")
        self.metric = metric
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        if constraint is not None and not callable(constraint):
            raise TypeError(f"constraint must be None or callable(metrics) -> bool, got {type(constraint).__name__}")
        self.constraint = constraint
        if results_path is not None:
            if not isinstance(results_path, (str, os.PathLike)):
                raise TypeError(f"results_path must be None, a str or a path, got {type(results_path).__name__}")
            results_path = os.fspath(results_path)
            if os.path.isdir(results_path):
                raise ValueError(f"results_path {results_path!r} is a directory; give a file name")
        self.results_path = results_path
        if name is None:
            name = getattr(trial_fn, "__qualname__", None) or type(trial_fn).__name__
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be None or a non-empty str, got {name!r}")
        self.name = name
        self.grid_size = math.prod(len(v) for v in self._grid_values)
        self.configs = [config_at(i, self.grid_keys, self._grid_values)
                        for i in sample_indices(self.grid_size, self.n_trials, self.seed)]
        self.trials = [plan_trial(c, r, self.seed) for c in self.configs for r in range(self.repetitions)]

    def __repr__(self):
        return (f"Sweep(name={self.name!r}, configs={len(self.configs)} of {self.grid_size}, "
                f"repetitions={self.repetitions}, seed={self.seed}, metric={self.metric!r}, mode={self.mode!r})")

    # -- results ---------------------------------------------------------------------------------

    def _result(self, done, n_new=0, n_resumed=0):
        trials = [done[t["key"]] for t in self.trials if t["key"] in done]
        return SweepResult(trials, metric=self.metric, mode=self.mode, constraint=self.constraint, name=self.name,
                           grid_keys=self.grid_keys, n_new=n_new, n_resumed=n_resumed)

    def _recorded(self, records):
        planned = {t["key"] for t in self.trials}
        done = {}
        for r in records:
            if r.get("sweep") == self.name and r.get("key") in planned and r["key"] not in done:
                done[r["key"]] = r
        return done

    def result(self):
        """The results recorded so far in ``results_path`` for this sweep (no trial is run): a
        :class:`SweepResult` of the planned trials that have finished."""
        if self.results_path is None:
            raise ValueError("result() reads results_path, and this sweep has none")
        if not os.path.exists(self.results_path):
            return self._result({})
        done = self._recorded(load_records(self.results_path))
        return self._result(done, n_resumed=len(done))

    def _best_so_far(self, records):
        """The best eligible mean of the metric over the configurations of ``records`` (the progress
        line's "best so far"): a closure to feed records one at a time, returning the best so far."""
        groups = {}  # canonical config -> [sum, count, eligible]

        def add(record):
            g = groups.setdefault(_canonical(record["config"]), [0.0, 0, True])
            g[0] += record["metrics"].get(self.metric, math.nan)
            g[1] += 1
            g[2] = g[2] and _passes(self.constraint, record)
            best = None
            for total, count, eligible in groups.values():
                mean = total / count
                if eligible and not math.isnan(mean) and (
                        best is None or (mean < best if self.mode == "min" else mean > best)):
                    best = mean
            return best

        best = None
        for r in records:
            best = add(r)
        return add, best

    # -- running ---------------------------------------------------------------------------------

    def run(self, executor="process", max_workers=None, progress=True, *, retries=2, threads_per_worker=None):
        """Runs the trials not yet recorded and returns a :class:`SweepResult` of all planned trials.

        * ``executor``: ``"process"`` (default: a ProcessPoolExecutor started with "spawn"),
          ``"serial"`` (one after the other in this process), a ``dask.distributed.Client``, or a
          Dask scheduler address such as ``"tcp://10.0.0.1:8786"`` (a Client is opened and closed).
          The process pool's workers exit when this process dies, even by SIGKILL (the trials they
          were running are lost; a rerun with the same results file runs them again).
        * ``max_workers``: ``"process"``: worker processes (default: the CPUs this process may use,
          at most the number of trials to run); Dask: the most trials submitted at a time (default:
          all). Ignored by ``"serial"``.
        * ``threads_per_worker``: ``"process"``: OpenMP/OpenBLAS/dselectk threads in each worker
          (default: CPUs // workers, at least 1, so that workers x threads <= cores); they are set
          through $OMP_NUM_THREADS, $OPENBLAS_NUM_THREADS, $MKL_NUM_THREADS and
          $DSELECTK_NUM_THREADS before the worker imports anything, and
          ``dselectk.set_num_threads``. Dask: calls ``dselectk.set_num_threads`` in the workers
          (default: $OMP_NUM_THREADS of the worker, which Dask's nanny sets to 1, unless
          $DSELECTK_NUM_THREADS is set there).
        * ``retries``: how many more times a trial is run when its worker process dies under it
          (``"process"``: the pool is restarted and the trials that were running are resubmitted;
          Dask: past the scheduler's own rescheduling). It is also Dask's ``submit(retries=)``, so
          Dask reruns a trial that raised. ``"serial"`` never retries.
        * ``progress``: a line on stderr as trials finish (done / total, best mean ``metric`` so far,
          elapsed time, ETA).

        A trial that raises stops the sweep: nothing new is started, trials already running finish
        and are recorded, and :class:`TrialError` is raised (from the trial's exception). Records are
        written as trials finish, so rerunning the sweep resumes where it stopped.
        """
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        retries = _check_int(retries, "retries", 0)
        if max_workers is not None:
            max_workers = _check_int(max_workers, "max_workers", 1)
        if threads_per_worker is not None:
            threads_per_worker = _check_int(threads_per_worker, "threads_per_worker", 1)
        if isinstance(executor, str) and executor in ("process", "serial"):
            kind = executor
        elif isinstance(executor, str):
            if "://" not in executor and ":" not in executor:
                raise ValueError(
                    f"executor must be 'process', 'serial', a dask.distributed.Client or a Dask scheduler "
                    f"address such as 'tcp://127.0.0.1:8786', got {executor!r}")
            kind = "dask"
        elif _is_dask_client(executor):
            kind = "dask"
        else:
            raise TypeError(
                f"executor must be 'process', 'serial', a dask.distributed.Client or a Dask scheduler address, "
                f"got {type(executor).__name__}")
        if kind == "process":
            self._check_spawnable()
        if kind == "dask":
            _import_distributed()

        results_file = _ResultsFile(self.results_path) if self.results_path is not None else None
        done = self._recorded(results_file.records) if results_file is not None else {}
        n_resumed = len(done)
        pending = [t for t in self.trials if t["key"] not in done]
        bar = _Progress(progress, self.name, len(self.trials), len(done), self.metric)
        state = {"new": 0}
        add_to_best, best = self._best_so_far(done.values())

        def finish(trial, out):
            metrics = out["metrics"]
            if self.metric not in metrics:
                raise ValueError(f"trial_fn returned no {self.metric!r} metric (the sweep's metric) for config "
                                 f"{trial['config']}; it returned {sorted(metrics)}")
            record = {"sweep": self.name, "key": trial["key"], "config": trial["config"],
                      "repetition": trial["repetition"], "seed": trial["seed"], "metrics": metrics,
                      "wall_time": out["wall_time"], "worker": out["worker"],
                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if results_file is not None:
                results_file.append(record)
            done[trial["key"]] = record
            state["new"] += 1
            bar.update(len(done), add_to_best(record))

        try:
            if pending:
                bar.update(len(done), best)
                if kind == "serial":
                    for trial in pending:
                        try:
                            out = _execute(self.trial_fn, trial["config"], trial["seed"])
                        except Exception as exc:
                            raise self._trial_error(trial, exc) from exc
                        finish(trial, out)
                else:
                    if kind == "process":
                        workers = min(max_workers or _available_cpus(), len(pending))
                        threads = threads_per_worker or max(1, _available_cpus() // workers)
                        backend = _ProcessBackend(self.trial_fn, workers, threads)
                    else:
                        backend = _DaskBackend(self.trial_fn, executor, max_workers or len(pending), retries,
                                               threads_per_worker or "auto")
                    self._run_backend(backend, pending, retries, finish)
        finally:
            bar.close()
            if results_file is not None:
                results_file.close()
        return self._result(done, n_new=state["new"], n_resumed=n_resumed)

    def _check_spawnable(self):
        fn = self.trial_fn
        try:
            pickle.dumps(fn)
        except Exception as exc:
            raise TypeError(
                f"executor='process' needs a trial_fn that pickles by reference (a function defined at the top "
                f"level of a module), got {fn!r} ({type(exc).__name__}: {exc}); use executor='serial', or Dask, "
                f"which pickles it by value") from None
        main = sys.modules.get("__main__")
        if getattr(fn, "__module__", None) == "__main__" and getattr(main, "__file__", None) is None:
            raise TypeError(
                f"executor='process' starts workers with 'spawn', which cannot import {fn!r}: it was defined in "
                f"an interactive session. Move it to a module, or use executor='serial' or Dask")

    def _trial_error(self, trial, exc, crashed=False):
        what = (f"its worker process died {crashed} time(s) ({type(exc).__name__}: {exc})" if crashed
                else f"{type(exc).__name__}: {exc}")
        return TrialError(f"trial {trial['config']} (repetition {trial['repetition']}, seed {trial['seed']}) "
                          f"of sweep {self.name!r} failed: {what}",
                          config=trial["config"], repetition=trial["repetition"], seed=trial["seed"])

    def _run_backend(self, backend, pending, retries, finish):
        queue = deque(pending)
        in_flight = {}  # future -> trial
        crashes = {}
        error = None
        try:
            while queue or in_flight:
                if backend.broken and not in_flight:
                    backend.restart()
                while error is None and not backend.broken and queue and len(in_flight) < backend.window:
                    trial = queue.popleft()
                    try:
                        future = backend.submit(trial)
                    except _cf.process.BrokenProcessPool:
                        # a worker died after the last wait returned (another trial's normal end
                        # was seen first): the pool refuses new work at once, while the dead
                        # trial's future reports the crash below; retry this one after the restart
                        queue.appendleft(trial)
                        backend.broken = True
                        break
                    in_flight[future] = trial
                if not in_flight:
                    continue
                for future in backend.wait(in_flight):
                    trial = in_flight.pop(future, None)
                    if trial is None:  # cancelled below while this loop ran
                        continue
                    status, value = backend.outcome(future)
                    if status == "ok" and error is None:
                        try:
                            finish(trial, value)
                        except ValueError as exc:
                            error = exc
                    elif status == "ok":  # a trial running when another failed: keep its result
                        with contextlib.suppress(ValueError):
                            finish(trial, value)
                    elif status == "crash":
                        crashes[trial["key"]] = crashes.get(trial["key"], 0) + 1
                        if crashes[trial["key"]] > retries:
                            if error is None:
                                error = self._trial_error(trial, value, crashed=crashes[trial["key"]])
                                error.__cause__ = value
                        elif error is None:
                            queue.appendleft(trial)
                    elif status == "error" and error is None:
                        error = self._trial_error(trial, value)
                        error.__cause__ = value
                    if error is not None and (queue or in_flight):
                        queue.clear()
                        for f in backend.cancel(in_flight):
                            in_flight.pop(f, None)
            if error is not None:
                raise error
        except BaseException:
            if in_flight:
                backend.abort(in_flight)
            raise
        finally:
            with contextlib.suppress(Exception):
                backend.close()
