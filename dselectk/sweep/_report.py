"""Reporting: mean ± standard error, the summary tables (Markdown, CSV), :class:`SweepResult` (the
best configuration under a constraint) and the progress line."""
from __future__ import annotations

import csv
import json
import math
import sys
import time

import numpy as np

from ._space import _canonical, _check_int

__all__ = ["SweepResult", "SummaryTable", "summarize"]


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
