"""The results file: one JSON trial record a line, appended (flushed and fsync'ed) as trials finish,
read back to resume; a corrupted last line (a write cut short) is dropped with a warning."""
from __future__ import annotations

import json
import os
import warnings

__all__ = ["load_records"]

_RECORD_FIELDS = ("sweep", "key", "config", "repetition", "seed", "metrics", "wall_time", "worker", "finished_at")


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
