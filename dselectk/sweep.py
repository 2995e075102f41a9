"""Hyperparameter sweeps: the paper's tuning protocol (random grid search with repetitions).

Hazimeh et al. tune every method the same way: sample a number of configurations at random from a
grid of hyperparameters, train each chosen configuration several times with different seeds, keep
the configuration with the best mean validation metric (discarding, for DSelect-k, the values of
lambda for which S(Z) did not become binary), and report the mean and standard error of the test
metrics over the repetitions. :class:`Sweep` runs that protocol for any trial function::

    from dselectk.sweep import Sweep, summarize

    def train_mmoe(config, seed):            # a module-level function, so worker processes can import it
        X, Y, Xv, Yv, Xt, Yt = load_data()
        model = dk.MMoE(X.shape[1], n_tasks=2, n_experts=8, gate="dselect_k", k=2, gamma=config["gamma"],
                        entropy_reg=config["lam"], seed=seed)
        history = dk.fit(model, X, Y, lr=config["lr"], validation_data=(Xv, Yv), seed=seed, verbose=0,
                         early_stopping_patience=3)
        return {"val_loss": min(history["val_loss"]),
                "binary": float(all(s is not None for s in history.binary_step)),
                "test_loss": dk.evaluate(model, Xt, Yt)["loss"]}

    sweep = Sweep(train_mmoe, {"lr": [1e-4, 1e-3, 1e-2], "lam": [0, 0.1, 1, 10], "gamma": [0.1, 1, 10]},
                  n_trials=20, repetitions=5, constraint=lambda m: m["binary"] == 1.0,
                  results_path="dselectk_sweep.jsonl", name="dselect_k")
    result = sweep.run()                    # executor="process": one process per core
    result.best_config                      # {'lr': 0.001, 'lam': 1, 'gamma': 1}
    print(result.to_markdown())             # one row per configuration: "0.123 ± 0.004"

* Every finished trial is appended to ``results_path`` as one JSON line (flushed and fsync'ed), and
  running the same sweep again with the same file skips the trials already recorded, so an
  interrupted sweep loses only the trials that were running.
* Executors: ``"serial"`` (in this process), ``"process"`` (a spawn-started process pool, with the
  threads of OpenMP, OpenBLAS and dselectk divided among the workers), or a Dask cluster
  (``dask.distributed.Client`` or a scheduler address; needs ``pip install "dselectk[sweep]"``).
* :func:`summarize` turns records (of one sweep or of several) into mean ± standard error tables,
  e.g. per method for the paper's final tables; :func:`load_records` reads a results file.
"""
from __future__ import annotations

import concurrent.futures as _cf
import contextlib
import csv
import hashlib
import json
import math
import multiprocessing
import numbers
import os
import pickle
import random
import socket
import sys
import time
import uuid
import warnings
from collections import deque

import numpy as np

__all__ = ["Sweep", "SweepResult", "SummaryTable", "TrialError", "summarize", "load_records"]

_DASK_INSTALL_HINT = 'pip install "dselectk[sweep]"  (or: pip install "dask[distributed]")'
# Set in every worker process of executor="process" before anything heavy is imported there.
_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "DSELECTK_NUM_THREADS")
_RECORD_FIELDS = ("sweep", "key", "config", "repetition", "seed", "metrics", "wall_time", "worker", "finished_at")

# The process pool's initializer. It is the builtin ``exec`` with this code rather than a function of
# this module on purpose: unpickling a function of dselectk.sweep in the freshly spawned worker would
# import dselectk, and with it NumPy, OpenBLAS and libgomp, whose thread pools read these variables
# once, when they load. ``exec`` unpickles without importing anything, so the variables are set first.
_WORKER_BOOTSTRAP = """
import os
os.environ.update(ENV)
import dselectk
dselectk.set_num_threads(THREADS)
"""


class TrialError(RuntimeError):
    """A trial raised (or its worker process kept dying). ``config``, ``repetition`` and ``seed``
    name the trial; the original exception is chained as ``__cause__``."""

    def __init__(self, message, config=None, repetition=None, seed=None):
        super().__init__(message)
        self.config, self.repetition, self.seed = config, repetition, seed


# ---------------------------------------------------------------------------------------------
# Hashing and argument checks
# ---------------------------------------------------------------------------------------------


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def _json_value(value, where):
    """A grid value as the JSON-compatible value that is hashed, recorded and given to trial_fn."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: grid values must be finite, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys in grid values must be str, got {k!r}")
        return {k: _json_value(v, where) for k, v in value.items()}
    raise TypeError(
        f"{where}: grid values must be JSON-like (None, bool, int, float, str, or lists/dicts of them) so "
        f"that configurations can be hashed and recorded, got {type(value).__name__} {value!r}"
    )


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_grid(grid):
    if not isinstance(grid, dict):
        raise TypeError(f"grid must be a dict of name -> list of values, got {type(grid).__name__}")
    if not grid:
        raise ValueError("grid must name at least one hyperparameter, got an empty dict")
    names, values = [], []
    for name, options in grid.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"grid keys must be non-empty str, got {name!r}")
        if isinstance(options, np.ndarray):
            options = options.tolist()
        if isinstance(options, (str, bytes, dict)) or not isinstance(options, (list, tuple, range)):
            raise TypeError(f"grid[{name!r}] must be a list of values, got {type(options).__name__} {options!r}")
        if len(options) == 0:
            raise ValueError(f"grid[{name!r}] is empty: give at least one value")
        normalized = [_json_value(v, f"grid[{name!r}]") for v in options]
        seen = set()
        for v in normalized:
            c = _canonical(v)
            if c in seen:
                raise ValueError(f"grid[{name!r}] lists the value {v!r} more than once")
            seen.add(c)
        names.append(name)
        values.append(normalized)
    return names, values


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


# ---------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------


def _parse_records(data, path):
    """Records from the bytes of a results file, and the offset of a corrupted last line (or None)."""
    records, lines, offset = [], [], 0
    for raw in data.splitlines(keepends=True):
        lines.append((offset, raw))
        offset += len(raw)
    nonblank = [(i, off, raw) for i, (off, raw) in enumerate(lines) if raw.strip()]
    corrupt_at = None
    for j, (i, off, raw) in enumerate(nonblank):
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or not {"key", "config", "metrics"} <= record.keys():
                raise ValueError("not a trial record (a JSON object with key, config and metrics)")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if j == len(nonblank) - 1:
                warnings.warn(
                    f"{path}: ignoring its corrupted last line (an interrupted write?): "
                    f"{raw[:80].decode('utf-8', 'replace')!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                corrupt_at = off
                break
            raise ValueError(
                f"{path}, line {i + 1}: not a valid trial record ({exc}); fix or delete that line"
            ) from None
        records.append(record)
    return records, corrupt_at


def load_records(path, name=None):
    """The trial records in the results file ``path`` (one JSON object a line, as written by
    :meth:`Sweep.run`), optionally only those of the sweep called ``name``. A corrupted last line
    (a write cut short) is skipped with a RuntimeWarning; a corrupted line elsewhere raises
    ValueError naming the line."""
    with open(path, "rb") as f:
        records, _ = _parse_records(f.read(), path)
    if name is not None:
        records = [r for r in records if r.get("sweep") == name]
    return records


class _ResultsFile:
    """Append-only results file, locked against a second concurrent run."""

    def __init__(self, path):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._f = open(path, "a+b")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._f.close()
                raise RuntimeError(
                    f"{path} is being written by another running sweep; wait for it, or use another results_path"
                ) from None
        try:
            self._f.seek(0)
            data = self._f.read()
            self.records, corrupt_at = _parse_records(data, path)
            if corrupt_at is not None:  # drop the partial line, so that the next record starts a line
                self._f.truncate(corrupt_at)
                data = data[:corrupt_at]
            self._needs_newline = bool(data) and not data.endswith(b"\n")
        except BaseException:
            self._f.close()
            raise

    def append(self, record):
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
            self._needs_newline = False
        self._f.write(line.encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        self._f.close()  # also releases the lock


# ---------------------------------------------------------------------------------------------
# Statistics and tables
# ---------------------------------------------------------------------------------------------


def _mean_sem(values):
    """Mean and standard error (sample standard deviation, ddof=1, over sqrt(n)); the standard
    error is NaN for fewer than 2 values."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    mean = float(a.mean())
    sem = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan
    return mean, sem


def _metric_names(records):
    names = {}
    for r in records:
        for m in r["metrics"]:
            names.setdefault(m, None)
    return list(names)


def _cell(value):
    if isinstance(value, str):
        text = value
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _format_mean_sem(mean, sem, digits):
    if math.isnan(mean):
        return "nan"
    if math.isnan(sem):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sem:.{digits}f}"


class SummaryTable(list):
    """A list of summary rows (dicts), with :meth:`to_markdown` and :meth:`to_csv`.

    Each row has the grouping values under ``key_field`` (``"config"`` for :meth:`SweepResult.summary`,
    ``"group"`` for :func:`summarize`), ``"n"`` (the number of runs), ``"mean"`` and ``"sem"``
    (dicts metric -> mean, and -> standard error = sample std (ddof=1) / sqrt(n), NaN when n < 2);
    sweep summaries also have ``"eligible"`` (every run passed the constraint and the mean of the
    sweep's metric is not NaN)."""

    def __init__(self, rows=(), key_field="config", keys=(), metrics=(), best_index=None, best_metric=None,
                 show_eligible=False):
        super().__init__(rows)
        self.key_field, self.keys, self.metrics = key_field, list(keys), list(metrics)
        self.best_index, self.best_metric, self.show_eligible = best_index, best_metric, show_eligible

    def _header(self):
        return [*self.keys, "n", *(["eligible"] if self.show_eligible else [])]

    def to_markdown(self, path=None, digits=3, metrics=None):
        """The table in the format of the paper's tables: one column per grouping key, the number of
        runs, and one "mean ± standard error" column per metric (``digits`` decimals; the ± part is
        left out when there is a single run). The best configuration's value of the sweep's metric is
        in bold. Written to ``path`` too when given; returns the text."""
        _check_int(digits, "digits", 0)
        metrics = self.metrics if metrics is None else list(metrics)
        header = self._header() + metrics
        lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for index, row in enumerate(self):
            cells = [_cell(row[self.key_field].get(k, "")) for k in self.keys] + [str(row["n"])]
            if self.show_eligible:
                cells.append("yes" if row["eligible"] else "no")
            for m in metrics:
                text = _format_mean_sem(row["mean"].get(m, math.nan), row["sem"].get(m, math.nan), digits)
                if index == self.best_index and m == self.best_metric:
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines) + "\n"
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def to_csv(self, path):
        """Writes the table as CSV: the grouping keys, ``n`` (and ``eligible``), then ``<metric>_mean``
        and ``<metric>_sem`` for every metric (full precision; empty for a missing value, ``nan``
        for an undefined one). Lists and dicts in configurations are written as JSON."""
        header = self._header() + [f"{m}_{s}" for m in self.metrics for s in ("mean", "sem")]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row in self:
                values = []
                for k in self.keys:
                    v = row[self.key_field].get(k, "")
                    values.append(json.dumps(v) if isinstance(v, (list, dict)) else v)
                values.append(row["n"])
                if self.show_eligible:
                    values.append(row["eligible"])
                for m in self.metrics:
                    values += [repr(row["mean"].get(m, math.nan)), repr(row["sem"].get(m, math.nan))]
                writer.writerow(values)


def summarize(records, group_by=("method",), metrics=None):
    """Mean ± standard error of metrics per group of records, for the final "per method" tables.

    * ``records``: trial records (dicts with ``"metrics"`` and usually ``"config"``, as in
      :attr:`SweepResult.trials` or :func:`load_records`), or a :class:`SweepResult`.
    * ``group_by``: a name or a sequence of names; each is looked up in the record's ``config``
      first, then among the record's own fields (e.g. ``"sweep"``, the sweep's name). ``()`` makes
      one group of all records.
    * ``metrics``: the metrics to summarize (default: every metric seen, in order of appearance).
      A record without a metric does not count towards that metric's mean and standard error.

    Returns a :class:`SummaryTable` (a list of rows ``{"group": {...}, "n", "mean": {...},
    "sem": {...}}``, groups in order of first appearance) with ``to_markdown`` and ``to_csv``.
    """
    if isinstance(records, SweepResult):
        records = records.trials
    if isinstance(records, (dict, str, bytes)) or not hasattr(records, "__iter__"):
        raise TypeError(f"records must be a list of trial records, got {type(records).__name__}")
    records = list(records)
    if isinstance(group_by, str):
        group_by = (group_by,)
    group_by = tuple(group_by)
    for g in group_by:
        if not isinstance(g, str):
            raise TypeError(f"group_by must be str names, got {g!r}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("metrics"), dict):
            raise TypeError(f"records[{i}] is not a trial record (a dict with a 'metrics' dict): {r!r}")
    if metrics is None:
        metrics = _metric_names(records)
    else:
        if isinstance(metrics, str):
            metrics = (metrics,)
        metrics = list(metrics)
        if not all(isinstance(m, str) for m in metrics):
            raise TypeError(f"metrics must be str names, got {metrics!r}")
    groups = {}
    for i, r in enumerate(records):
        config = r.get("config") if isinstance(r.get("config"), dict) else {}
        values = {}
        for g in group_by:
            if g in config:
                values[g] = config[g]
            elif g in r:
                values[g] = r[g]
            else:
                raise ValueError(f"records[{i}] has no {g!r} in its config nor among its fields")
        groups.setdefault(_canonical(values), (values, []))[1].append(r)
    rows = []
    for values, members in groups.values():
        row = {"group": values, "n": len(members), "mean": {}, "sem": {}}
        for m in metrics:
            row["mean"][m], row["sem"][m] = _mean_sem([r["metrics"][m] for r in members if m in r["metrics"]])
        rows.append(row)
    return SummaryTable(rows, key_field="group", keys=group_by, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


class SweepResult:
    """The trials of a sweep and the configuration they pick.

    * ``trials``: the records, in the sweep's order (configuration, then repetition); each a dict
      with ``sweep`` (the name), ``key``, ``config``, ``repetition``, ``seed``, ``metrics``,
      ``wall_time`` (s), ``worker`` and ``finished_at`` (UTC, ISO 8601).
    * ``best_config``: the eligible configuration with the best (``mode``) mean of ``metric`` over its
      repetitions; eligible = every run passed the constraint and the mean is not NaN. None when no
      configuration is eligible. ``best``: its summary row.
    * ``n_new`` / ``n_resumed``: trials computed by this run / found in the results file.
    """

    def __init__(self, trials, *, metric="val_loss", mode="min", constraint=None, name=None, grid_keys=None,
                 n_new=0, n_resumed=0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.trials = list(trials)
        self.metric, self.mode, self.constraint, self.name = metric, mode, constraint, name
        self.n_new, self.n_resumed = n_new, n_resumed
        if grid_keys is None:
            grid_keys = {}
            for r in self.trials:
                for k in r["config"]:
                    grid_keys.setdefault(k, None)
        self._grid_keys = list(grid_keys)
        self._summary = None

    def __repr__(self):
        return (f"SweepResult(name={self.name!r}, trials={len(self.trials)}, metric={self.metric!r}, "
                f"mode={self.mode!r}, best_config={self.best_config!r})")

    def _passes(self, record):
        return _passes(self.constraint, record)

    def summary(self, sort=False):
        """One row per configuration (in the sweep's order, or best first with ``sort=True``):
        ``{"config", "n", "mean": {metric: ...}, "sem": {metric: ...}, "eligible"}``, as a
        :class:`SummaryTable` (``to_markdown``, ``to_csv``)."""
        if self._summary is None:
            groups = {}
            for r in self.trials:
                groups.setdefault(_canonical(r["config"]), (r["config"], []))[1].append(r)
            metrics = _metric_names(self.trials)
            rows = []
            for config, members in groups.values():
                row = {"config": config, "n": len(members), "mean": {}, "sem": {}}
                for m in metrics:
                    row["mean"][m], row["sem"][m] = _mean_sem(
                        [r["metrics"][m] for r in members if m in r["metrics"]])
                row["eligible"] = (all(self._passes(r) for r in members)
                                   and not math.isnan(row["mean"].get(self.metric, math.nan)))
                rows.append(row)
            self._summary = rows
        rows = list(self._summary)
        best = _best_index(rows, self.metric, self.mode)
        if sort:
            sign = 1.0 if self.mode == "min" else -1.0
            order = sorted(range(len(rows)), key=lambda i: (
                not rows[i]["eligible"], math.isnan(rows[i]["mean"].get(self.metric, math.nan)),
                sign * rows[i]["mean"].get(self.metric, math.nan) if rows[i]["eligible"] else 0.0, i))
            rows = [rows[i] for i in order]
            best = None if best is None else order.index(best)
        return SummaryTable(rows, key_field="config", keys=self._grid_keys, metrics=_metric_names(self.trials),
                            best_index=best, best_metric=self.metric, show_eligible=self.constraint is not None)

    @property
    def best(self):
        """The summary row of the best eligible configuration, or None."""
        table = self.summary()
        return None if table.best_index is None else table[table.best_index]

    @property
    def best_config(self):
        """The best eligible configuration (a dict), or None when none is eligible."""
        best = self.best
        return None if best is None else dict(best["config"])

    def to_csv(self, path):
        """Writes :meth:`summary` as CSV (see :meth:`SummaryTable.to_csv`)."""
        self.summary().to_csv(path)

    def to_markdown(self, path=None, digits=3):
        """:meth:`summary` as a Markdown table with "0.123 ± 0.004" cells (see
        :meth:`SummaryTable.to_markdown`); also written to ``path`` when given."""
        return self.summary().to_markdown(path=path, digits=digits)


def _passes(constraint, record):
    if constraint is None:
        return True
    try:
        return bool(constraint(dict(record["metrics"])))
    except Exception as exc:
        raise ValueError(
            f"the constraint raised {type(exc).__name__}: {exc} on the metrics {record['metrics']} "
            f"of config {record['config']}"
        ) from exc


def _best_index(rows, metric, mode):
    best, best_value = None, None
    for i, row in enumerate(rows):
        if not row["eligible"]:
            continue
        value = row["mean"][metric]
        if best is None or (value < best_value if mode == "min" else value > best_value):
            best, best_value = i, value
    return best


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


def _hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    def __init__(self, enabled, label, total, done, metric, stream=None):
        self.enabled, self.label, self.total, self.metric = enabled, label, total, metric
        self.start_done, self.t0 = done, time.perf_counter()
        self.stream = sys.stderr if stream is None else stream
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._width = 0

    def update(self, done, best):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        new = done - self.start_done
        eta = _hms(elapsed / new * (self.total - done)) if new > 0 else "?"
        best_text = "-" if best is None else f"{best:.6g}"
        line = (f"[{self.label}] {done}/{self.total} trials | best {self.metric} {best_text} | "
                f"elapsed {_hms(elapsed)} | ETA {eta}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------------------------


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
            initargs=(_WORKER_BOOTSTRAP, {"ENV": self.env, "THREADS": self.threads}))
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


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


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
        self.configs = [self._config(i) for i in self._sample_indices()]
        self.trials = [self._trial(c, r) for c in self.configs for r in range(self.repetitions)]

    def __repr__(self):
        return (f"Sweep(name={self.name!r}, configs={len(self.configs)} of {self.grid_size}, "
                f"repetitions={self.repetitions}, seed={self.seed}, metric={self.metric!r}, mode={self.mode!r})")

    def _sample_indices(self):
        if self.n_trials >= self.grid_size:
            return range(self.grid_size)
        rng = random.Random(f"dselectk.sweep:{self.seed}")  # a str seed: deterministic, negative seeds distinct
        chosen, seen = [], set()
        while len(chosen) < self.n_trials:  # one at a time, so that the sample is a prefix of larger ones
            i = rng.randrange(self.grid_size)
            if i not in seen:
                seen.add(i)
                chosen.append(i)
        return chosen

    def _config(self, index):
        config = {}
        for name, values in zip(reversed(self.grid_keys), reversed(self._grid_values)):
            index, j = divmod(index, len(values))
            config[name] = values[j]
        return {name: config[name] for name in self.grid_keys}  # the last key varies fastest

    def _trial(self, config, repetition):
        digest = hashlib.sha256(_canonical({"sweep_seed": self.seed, "config": config,
                                            "repetition": repetition}).encode()).digest()
        seed = int.from_bytes(digest[:8], "big") % 2**31
        key = hashlib.sha256(_canonical({"config": config, "repetition": repetition,
                                         "seed": seed}).encode()).hexdigest()[:24]
        return {"config": config, "repetition": repetition, "seed": seed, "key": key}

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
