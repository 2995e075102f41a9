"""The hyperparameter sweep runner (dselectk.sweep): random grid sampling, seeds, best configuration
under a constraint, mean and standard error, resuming from the results file (after an exception, a
SIGKILL, a corrupted last line), the process executor (same results as serial, thread settings in
the workers, retry after a worker dies), Dask on a loopback LocalCluster (same results, retry after a
worker dies; skipped without dask), Markdown/CSV output, and bad arguments.

The trial functions are module-level functions of this module: the process pool (spawn) and Dask
workers import them as ``test_sweep.<name>`` (they inherit this process's sys.path, in which pytest
put the tests directory).
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager

import numpy as np
import pytest

import dselectk
from dselectk import sweep as S
from dselectk.sweep import Sweep, SweepResult, TrialError, load_records, summarize

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

GRID = {"x": [-1, 0, 1, 2, 3], "y": [-1.5, -0.5, 0.5]}  # minimum of the quadratic at x=1, y=-0.5


# ---------------------------------------------------------------------------------------------
# Trial functions (module level: picklable by reference for spawn and Dask)
# ---------------------------------------------------------------------------------------------


def _log_call(config, seed):
    """Side channel: one line per call in the file named by config["log"] (O_APPEND: atomic lines)."""
    path = config.get("log")
    if path:
        line = json.dumps({"config": {k: v for k, v in config.items() if k != "log"}, "seed": seed}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def quadratic(config, seed):
    """A noisy quadratic of the config values; the noise depends on the seed only."""
    _log_call(config, seed)
    noise = np.random.default_rng(seed).normal(0.0, 0.01, size=2)
    x, y = config["x"], config["y"]
    val = (x - 1.0) ** 2 + (y + 0.5) ** 2 + noise[0]
    return {"val_loss": val, "test_loss": val + 0.1 + noise[1], "neg_val": -val,
            "binary": 0.0 if (x == 1 and seed % 2 == 0) else 1.0}


def failing_quadratic(config, seed):
    """Raises on x == 2 while the file config["fail_marker"] exists."""
    if config["x"] == 2 and os.path.exists(config["fail_marker"]):
        _log_call(config, seed)
        raise RuntimeError("boom on x=2")
    return quadratic(config, seed)


def slow_quadratic(config, seed):
    time.sleep(0.05)
    return quadratic(config, seed)


def _first_time(marker):
    """True exactly once per marker file, across processes: the file is created exclusively."""
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def crash_once(config, seed):
    """Kills its own (worker) process the first time it runs on x == config["crash_x"]."""
    if config["x"] == config["crash_x"] and _first_time(config["marker"]):
        _log_call(config, seed)
        os._exit(3)
    return quadratic(config, seed)


def raise_once(config, seed):
    """Raises OSError the first time it runs on x == config["fail_x"] (a transient failure)."""
    if config["x"] == config["fail_x"] and _first_time(config["marker"]):
        _log_call(config, seed)
        raise OSError("transient failure")
    return quadratic(config, seed)


def crash_always(config, seed):
    os._exit(4)


def sleep_long(config, seed):
    """Records its pid in config["log"], then sleeps far longer than any test waits."""
    _log_call(dict(config, pid=os.getpid()), seed)
    time.sleep(120)
    return {"val_loss": 0.0}


def thread_probe(config, seed):
    """The thread settings seen inside the worker."""
    out = {"val_loss": 0.0, "pid": float(os.getpid()), "dk_threads": float(dselectk.get_num_threads())}
    for var in S._THREAD_ENV_VARS:
        out[var] = float(os.environ.get(var, "-1"))
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        out["pool_min"] = out["pool_max"] = -1.0
    else:
        counts = [info["num_threads"] for info in threadpool_info()]
        out["pool_min"], out["pool_max"] = float(min(counts)), float(max(counts))
    return out


def not_a_dict(config, seed):
    return [1.0]


def missing_metric(config, seed):
    return {"loss": 1.0}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def by_key(result):
    return {t["key"]: (t["config"], t["repetition"], t["seed"], t["metrics"]) for t in result.trials}


def count_calls(log):
    if not os.path.exists(log):
        return {}
    counts = {}
    with open(log) as f:
        for line in f:
            entry = json.loads(line)
            k = (json.dumps(entry["config"], sort_keys=True), entry["seed"])
            counts[k] = counts.get(k, 0) + 1
    return counts


def _python_child(code, cwd, stderr=subprocess.PIPE):
    """A child interpreter running ``code``, which imports dselectk from where this process did
    (site-packages after `pip install .`; the checkout only when it is built in place), never the
    unbuilt source tree, and this directory's modules (``import test_sweep as T``)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(dselectk.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, package_parent]))
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(cwd), stdout=subprocess.DEVNULL,
                            stderr=stderr)


def call_key(trial):
    return (json.dumps({k: v for k, v in trial["config"].items() if k != "log"}, sort_keys=True), trial["seed"])


# ---------------------------------------------------------------------------------------------
# Sampling and seeds
# ---------------------------------------------------------------------------------------------


def test_grid_sampling_is_seeded_distinct_and_capped():
    product = [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    a = Sweep(quadratic, GRID, n_trials=7, seed=3).configs
    assert len(a) == 7
    assert len({json.dumps(c) for c in a}) == 7  # distinct
    assert all(c in product for c in a)
    assert a == Sweep(quadratic, GRID, n_trials=7, seed=3).configs  # seeded
    assert a != Sweep(quadratic, GRID, n_trials=7, seed=4).configs
    assert a != product[:7]  # random, not the grid order
    # a smaller sample is a prefix of a larger one, so that raising n_trials reuses finished trials
    assert Sweep(quadratic, GRID, n_trials=4, seed=3).configs == a[:4]
    # capped at the grid size: every configuration, once, in grid order
    assert Sweep(quadratic, GRID, n_trials=15, seed=3).configs == product
    assert Sweep(quadratic, GRID, n_trials=1000, seed=3).configs == product
    # every configuration is reachable: the union over seeds covers the grid
    seen = {json.dumps(c) for s in range(40) for c in Sweep(quadratic, GRID, n_trials=3, seed=s).configs}
    assert len(seen) == 15


def test_trial_seeds_are_derived_from_seed_config_and_repetition():
    sw = Sweep(quadratic, GRID, n_trials=5, repetitions=3, seed=11)
    assert len(sw.trials) == 15
    assert [t["repetition"] for t in sw.trials[:3]] == [0, 1, 2]
    seeds = [t["seed"] for t in sw.trials]
    assert len(set(seeds)) == 15 and all(0 <= s < 2**31 for s in seeds)
    assert len({t["key"] for t in sw.trials}) == 15
    again = Sweep(quadratic, GRID, n_trials=5, repetitions=3, seed=11)
    assert [t["seed"] for t in again.trials] == seeds and [t["key"] for t in again.trials] == [t["key"] for t in sw.trials]
    # the seed of a (config, repetition) does not depend on the sample's order or size
    bigger = {(json.dumps(t["config"]), t["repetition"]): t["seed"] for t in Sweep(quadratic, GRID, 15, 3, seed=11).trials}
    assert all(bigger[(json.dumps(t["config"]), t["repetition"])] == t["seed"] for t in sw.trials)
    other = Sweep(quadratic, GRID, n_trials=15, repetitions=3, seed=12)
    assert all(bigger[(json.dumps(t["config"]), t["repetition"])] != t["seed"] for t in other.trials)
    # the trial function receives exactly these seeds
    result = sw.run("serial", progress=False)
    assert [t["seed"] for t in result.trials] == seeds
    assert [t["metrics"]["val_loss"] for t in result.trials] == [
        quadratic(t["config"], t["seed"])["val_loss"] for t in sw.trials]


# ---------------------------------------------------------------------------------------------
# Best configuration, constraint, statistics
# ---------------------------------------------------------------------------------------------


def test_best_config_and_mean_standard_error_match_numpy():
    result = Sweep(quadratic, GRID, n_trials=100, repetitions=4, seed=0).run("serial", progress=False)
    assert len(result.trials) == 60 and result.n_new == 60 and result.n_resumed == 0
    assert result.best_config == {"x": 1, "y": -0.5}
    rows = result.summary()
    assert len(rows) == 15 and all(r["n"] == 4 for r in rows)
    for row in rows:
        runs = [t for t in result.trials if t["config"] == row["config"]]
        for m in ("val_loss", "test_loss"):
            v = np.array([t["metrics"][m] for t in runs])
            assert row["mean"][m] == pytest.approx(v.mean(), rel=1e-12, abs=1e-15)
            assert row["sem"][m] == pytest.approx(v.std(ddof=1) / np.sqrt(4), rel=1e-12)
    assert result.best["mean"]["val_loss"] == min(r["mean"]["val_loss"] for r in rows)
    # mode="max" on the negated metric picks the same configuration
    result_max = Sweep(quadratic, GRID, 100, 4, seed=0, metric="neg_val", mode="max").run("serial", progress=False)
    assert result_max.best_config == {"x": 1, "y": -0.5}
    # sorted summary: best first
    ordered = result.summary(sort=True)
    assert ordered[0]["config"] == {"x": 1, "y": -0.5} and ordered.best_index == 0
    means = [r["mean"]["val_loss"] for r in ordered]
    assert means == sorted(means)
    # one run: the standard error is undefined
    single = Sweep(quadratic, GRID, 3, 1, seed=0).run("serial", progress=False)
    assert all(r["n"] == 1 and math.isnan(r["sem"]["val_loss"]) for r in single.summary())


def test_constraint_excludes_configs():
    # binary == 0 for x == 1 on even seeds: the true optimum (1, -0.5) fails the constraint in some runs
    sw = Sweep(quadratic, GRID, n_trials=100, repetitions=4, seed=0, constraint=lambda m: m["binary"] == 1.0)
    runs = [t for t in sw.trials if t["config"]["x"] == 1 and t["config"]["y"] == -0.5]
    parities = {t["seed"] % 2 for t in runs}
    assert parities == {0, 1}, "precondition: the optimum must fail in some runs and pass in others"
    result = sw.run("serial", progress=False)
    assert result.best_config is not None and result.best_config["x"] != 1
    assert result.best_config["y"] == -0.5  # the best of the eligible ones (x = 0 or 2)
    rows = {json.dumps(r["config"]): r for r in result.summary()}
    for y in GRID["y"]:
        cfg = {"x": 1, "y": y}
        seeds = [t["seed"] for t in sw.trials if t["config"] == cfg]
        assert rows[json.dumps(cfg)]["eligible"] == all(s % 2 for s in seeds)
    assert rows[json.dumps({"x": 0, "y": -0.5})]["eligible"]
    assert "| eligible |" in result.to_markdown() and "| no |" in result.to_markdown()
    # without the constraint the optimum wins; with an impossible constraint nothing is eligible
    assert Sweep(quadratic, GRID, 100, 4, seed=0).run("serial", progress=False).best_config == {"x": 1, "y": -0.5}
    none = Sweep(quadratic, GRID, 3, 1, seed=0, constraint=lambda m: False).run("serial", progress=False)
    assert none.best_config is None and none.best is None
    assert "**" not in none.to_markdown()


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------


def test_resume_after_a_failing_trial(tmp_path):
    log, marker = str(tmp_path / "calls.log"), str(tmp_path / "fail")
    open(marker, "w").close()
    grid = {"x": [0, 1, 2, 3], "y": [-0.5, 0.5], "log": [log], "fail_marker": [marker]}
    path = tmp_path / "results.jsonl"
    sw = Sweep(failing_quadratic, grid, n_trials=8, repetitions=2, seed=5, results_path=path, name="quad")
    first_fail = next(i for i, t in enumerate(sw.trials) if t["config"]["x"] == 2)
    assert 0 < first_fail < len(sw.trials) - 1, "precondition: the failure must come partway"
    with pytest.raises(TrialError, match="boom on x=2") as info:
        sw.run("serial", progress=False)
    assert info.value.config == sw.trials[first_fail]["config"]
    assert isinstance(info.value.__cause__, RuntimeError)
    recorded = load_records(path)
    assert [r["key"] for r in recorded] == [t["key"] for t in sw.trials[:first_fail]]
    assert sum(count_calls(log).values()) == first_fail + 1
    assert sw.result().n_resumed == first_fail and len(sw.result().trials) == first_fail

    os.remove(marker)
    result = sw.run("serial", progress=False)
    assert result.n_resumed == first_fail and result.n_new == len(sw.trials) - first_fail
    calls = count_calls(log)
    for i, t in enumerate(sw.trials):  # every trial computed once; the failed one twice (fail + redo)
        assert calls[call_key(t)] == (2 if i == first_fail else 1), (i, t)
    assert len(load_records(path)) == len(sw.trials)
    # the same results as a sweep that never failed
    fresh = Sweep(failing_quadratic, grid, 8, 2, seed=5, results_path=tmp_path / "fresh.jsonl", name="quad")
    assert by_key(fresh.run("serial", progress=False)) == by_key(result)
    # a third run computes nothing
    before = sum(count_calls(log).values())
    again = sw.run("serial", progress=False)
    assert again.n_new == 0 and sum(count_calls(log).values()) == before
    assert by_key(again) == by_key(result)
    # raising n_trials reuses what is recorded (a sample is a prefix of a larger one)
    grid2 = dict(grid, x=[0, 1, 2, 3, 4, 5])
    bigger = Sweep(failing_quadratic, grid2, n_trials=3, repetitions=2, seed=5, results_path=path, name="quad")
    r3 = bigger.run("serial", progress=False)
    bigger6 = Sweep(failing_quadratic, grid2, n_trials=6, repetitions=2, seed=5, results_path=path, name="quad")
    r6 = bigger6.run("serial", progress=False)
    assert r6.n_resumed >= r3.n_resumed + r3.n_new == 6


def test_resume_after_sigkill(tmp_path):
    """A sweep killed with SIGKILL mid-run keeps every trial it finished; the rerun computes only
    the others, and the results equal a sweep that was never interrupted."""
    log = str(tmp_path / "calls.log")
    path = str(tmp_path / "results.jsonl")
    grid = {"x": [0, 1, 2, 3, 4], "y": [-0.5, 0.5], "log": [log]}
    args = dict(n_trials=10, repetitions=2, seed=1, name="slowquad")
    code = (
        "import sys; from dselectk.sweep import Sweep; import test_sweep as T\n"
        f"Sweep(T.slow_quadratic, {grid!r}, results_path={path!r}, **{args!r}).run('serial', progress=False)\n"
    )
    proc = _python_child(code, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(log) and open(log, "rb").read().count(b"\n") >= 3:  # 3 trials computed
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the sweep ended before it was killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    with _maybe_warns():  # a line cut by the kill is allowed
        done_before = load_records(path)
    total = 20
    # killed once 3 trials had computed (side channel, written as a trial returns): every finished trial
    # is on disk, only the one in flight (at most the 3rd, between returning and being recorded) is lost
    calls_before = count_calls(log)
    n_called = sum(calls_before.values())
    assert 3 <= n_called < total
    assert n_called - 1 <= len(done_before) <= n_called
    sw = Sweep(slow_quadratic, grid, results_path=path, **args)
    with _maybe_warns():
        result = sw.run("serial", progress=False)
    assert result.n_resumed == len(done_before) and result.n_new == total - len(done_before)
    calls = count_calls(log)
    recorded = {r["key"] for r in done_before}
    for t in sw.trials:  # finished trials were not run again; the one in flight at the kill was
        extra = calls.get(call_key(t), 0) - calls_before.get(call_key(t), 0)
        assert extra == (0 if t["key"] in recorded else 1), t
    ref = Sweep(quadratic, grid, results_path=tmp_path / "ref.jsonl", **args)  # same metrics, no sleep
    assert by_key(ref.run("serial", progress=False)) == by_key(result)


@contextmanager
def _maybe_warns():
    """Allows (does not require) the corrupted-last-line RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*corrupted last line", category=RuntimeWarning)
        yield


def test_corrupted_last_line_is_ignored_with_a_warning(tmp_path):
    log = str(tmp_path / "calls.log")
    path = tmp_path / "results.jsonl"
    grid = {"x": [0, 1, 2], "y": [-0.5, 0.5], "log": [log]}
    sw = Sweep(quadratic, grid, n_trials=6, seed=2, results_path=path, name="q")
    full = sw.run("serial", progress=False)
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6 and all(json.loads(line)["key"] for line in lines)
    # a write cut short: the 5th record half written, no newline, the 6th lost
    path.write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    with pytest.warns(RuntimeWarning, match="corrupted last line"):
        assert len(load_records(path)) == 4
    n_calls = sum(count_calls(log).values())
    with pytest.warns(RuntimeWarning, match="corrupted last line"):
        result = sw.run("serial", progress=False)
    assert result.n_resumed == 4 and result.n_new == 2
    assert sum(count_calls(log).values()) == n_calls + 2
    assert by_key(result) == by_key(full)
    # the partial line was dropped: the file is clean again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["key"] for r in load_records(path)] == [t["key"] for t in sw.trials]
    # a corrupted line that is not the last is an error naming the line
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], "{not json", *text[1:]]) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        sw.run("serial", progress=False)
    # a last record written without its newline is kept, and the next record starts a new line
    path.write_text("\n".join(text[:3]))
    result = sw.run("serial", progress=False)
    assert result.n_resumed == 3 and len(load_records(path)) == 6


def test_results_records_and_sharing_a_file(tmp_path):
    path = tmp_path / "shared.jsonl"
    a = Sweep(quadratic, GRID, 3, 2, seed=0, results_path=path, name="a").run("serial", progress=False)
    b = Sweep(quadratic, GRID, 3, 2, seed=0, results_path=path, name="b").run("serial", progress=False)
    assert b.n_new == 6 and b.n_resumed == 0  # another sweep's records are not reused
    records = load_records(path)
    assert len(records) == 12 and len(load_records(path, name="a")) == 6
    for r in records:
        assert set(S._RECORD_FIELDS) <= r.keys()
        assert r["worker"].endswith(f":{os.getpid()}") and r["wall_time"] >= 0
    assert [r["metrics"] for r in load_records(path, name="a")] == [t["metrics"] for t in a.trials]
    # a second run on a file in use is refused
    held = S._ResultsFile(str(path))
    try:
        with pytest.raises(RuntimeError, match="another running sweep"):
            Sweep(quadratic, GRID, 3, 2, seed=0, results_path=path, name="a").run("serial", progress=False)
    finally:
        held.close()


# ---------------------------------------------------------------------------------------------
# Process executor
# ---------------------------------------------------------------------------------------------


def test_process_executor_matches_serial(tmp_path):
    grid = {"x": [0, 1, 2], "y": [-0.5, 0.5]}
    serial = Sweep(quadratic, grid, 6, 2, seed=9, results_path=tmp_path / "s.jsonl", name="q").run(
        "serial", progress=False)
    proc = Sweep(quadratic, grid, 6, 2, seed=9, results_path=tmp_path / "p.jsonl", name="q").run(
        "process", max_workers=2, progress=False)
    assert by_key(proc) == by_key(serial)
    assert proc.best_config == serial.best_config
    workers = {t["worker"] for t in proc.trials}
    assert 1 <= len(workers) <= 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)
    assert len(load_records(tmp_path / "p.jsonl")) == 12


def test_process_workers_thread_settings():
    parent_env = {k: os.environ.get(k) for k in S._THREAD_ENV_VARS}
    cpus = S._available_cpus()
    threads = max(1, cpus // 2)
    result = Sweep(thread_probe, {"x": [0, 1, 2, 3]}, 4, seed=0).run("process", max_workers=2, progress=False)
    for t in result.trials:
        m = t["metrics"]
        for var in S._THREAD_ENV_VARS:
            assert m[var] == threads, (var, m)
        assert m["dk_threads"] == threads
        if m["pool_min"] >= 0:  # threadpoolctl: NumPy's OpenBLAS, dselectk's OpenBLAS, libgomp
            assert m["pool_min"] == m["pool_max"] == threads, m
    # an explicit thread count
    result = Sweep(thread_probe, {"x": [0]}, 1, seed=0).run("process", max_workers=1, threads_per_worker=1,
                                                             progress=False)
    assert result.trials[0]["metrics"]["dk_threads"] == 1 and result.trials[0]["metrics"]["OMP_NUM_THREADS"] == 1
    assert {k: os.environ.get(k) for k in S._THREAD_ENV_VARS} == parent_env  # this process: untouched
    assert dselectk.get_num_threads() == dselectk._default_threads()


def test_process_executor_retries_a_trial_whose_worker_died(tmp_path):
    log, marker = str(tmp_path / "calls.log"), str(tmp_path / "crashed")
    grid = {"x": [0, 1, 2, 3], "crash_x": [2], "marker": [marker], "log": [log], "y": [0.5]}
    sw = Sweep(crash_once, grid, 4, 1, seed=0, results_path=tmp_path / "r.jsonl", name="crash")
    result = sw.run("process", max_workers=2, progress=False)
    assert os.path.exists(marker)  # the worker did die
    assert len(result.trials) == 4 and {t["config"]["x"] for t in result.trials} == {0, 1, 2, 3}
    crashed = next(t for t in sw.trials if t["config"]["x"] == 2)
    assert count_calls(log)[call_key(crashed)] == 2  # the crash, then the retry
    expected = quadratic(crashed["config"], crashed["seed"])
    assert next(t for t in result.trials if t["key"] == crashed["key"])["metrics"] == expected
    # no retries left: a clear error
    sw = Sweep(crash_always, {"x": [0]}, 1, seed=0)
    with pytest.raises(TrialError, match="worker process died 1 time"):
        sw.run("process", max_workers=1, retries=0, progress=False)


def _children_of(pid):
    """{child pid: its command line} for the live (not zombie) processes whose parent is ``pid``."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = _proc_state(int(entry))
            if state is not None and state[1] == pid:
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        children[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
    return children


def _proc_state(pid):
    """(state letter, parent pid) of a live process, None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # the name, in parentheses, may hold spaces
    return None if state in "ZX" else (state, int(ppid))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_process_workers_exit_when_the_parent_is_killed(tmp_path):
    """SIGKILL of a process running Sweep.run(executor="process") cannot shut its pool down: the
    spawn workers (here in the middle of long trials) and multiprocessing's resource tracker must
    go too, within seconds, instead of living on as orphans."""
    log = str(tmp_path / "calls.log")
    code = (
        "from dselectk.sweep import Sweep; import test_sweep as T\n"
        f"Sweep(T.sleep_long, {{'x': [0, 1], 'log': [{log!r}]}}, 2).run('process', max_workers=2, progress=False)\n"
    )
    proc = _python_child(code, tmp_path)
    children = {}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and sum(count_calls(log).values()) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, f"the sweep ended before it was killed: {proc.stderr.read().decode()}"
        assert sum(count_calls(log).values()) == 2, "the two trials did not start within 90 s"
        children = _children_of(proc.pid)
        workers = {json.loads(line)["config"]["pid"] for line in open(log)}
        assert workers <= children.keys(), (workers, children)
        trackers = [p for p, cmd in children.items() if "resource_tracker" in cmd]
        assert len(trackers) == 1, children  # the test sees what it must see die
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_proc_state(p) is not None for p in children):
            time.sleep(0.05)
        alive = {p: cmd for p, cmd in children.items() if _proc_state(p) is not None}
        assert not alive, f"still running 5 s after their parent was killed: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        for p in children:  # what this test started and left behind
            if _proc_state(p) is not None:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
@pytest.mark.parametrize("mechanism", ["pdeathsig", "poll"])
def test_worker_bootstrap_exits_with_its_parent(tmp_path, mechanism):
    """Both ways the workers' bootstrap follows its parent: Linux's parent-death signal, and the
    portable thread polling os.getppid() (forced here by hiding that this is Linux)."""
    if mechanism == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    ready = str(tmp_path / "ready")
    worker = (
        "import os, sys, time; from dselectk.sweep import _executors as E\n"
        f"sys.platform = {'linux' if mechanism == 'pdeathsig' else 'elsewhere'!r}\n"
        "exec(E._WORKER_BOOTSTRAP, {'ENV': {}, 'THREADS': 1, 'PARENT': os.getppid()})\n"
        "threads = [t.name for t in __import__('threading').enumerate()]\n"
        f"open({ready!r}, 'w').write(repr(threads)); time.sleep(120)\n"
    )
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(120)"
    proc = _python_child(parent, tmp_path, stderr=None)
    children = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (os.path.exists(ready) and os.path.getsize(ready)):
            time.sleep(0.05)
        children = _children_of(proc.pid)
        assert len(children) == 1, children
        watching = "dselectk-sweep-parent-watch" in open(ready).read()
        assert watching == (mechanism == "poll")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_proc_state(p) is not None for p in children):
            time.sleep(0.05)
        assert not any(_proc_state(p) is not None for p in children), "the worker outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in children:
            if _proc_state(p) is not None:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    # allowed_failures=0: the scheduler gives up on a task at the first death of its worker (KilledWorker)
    # instead of rescheduling it itself, so that the retry below is Sweep.run's own.
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None, scheduler_kwargs={"allowed_failures": 0})
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield cluster, client
    finally:
        client.close()
        cluster.close()


def test_dask_matches_local_executor(dask_cluster, tmp_path):
    cluster, client = dask_cluster
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    grid = {"x": [0, 1, 2], "y": [-0.5, 0.5]}
    local = Sweep(quadratic, grid, 6, 2, seed=4, name="q").run("process", max_workers=2, progress=False)
    on_client = Sweep(quadratic, grid, 6, 2, seed=4, results_path=tmp_path / "d.jsonl", name="q").run(
        client, progress=False)
    assert by_key(on_client) == by_key(local)
    assert len(load_records(tmp_path / "d.jsonl")) == 12
    workers = {t["worker"] for t in on_client.trials}
    assert workers <= set(client.scheduler_info()["workers"]) and all(w.startswith("tcp://127.0.0.1:") for w in workers)
    # by address (a client of its own), at most 3 trials in flight
    by_address = Sweep(quadratic, grid, 6, 2, seed=4, name="q").run(cluster.scheduler_address, max_workers=3,
                                                                     progress=False)
    assert by_key(by_address) == by_key(local)


def test_dask_retries_a_trial_whose_worker_died(dask_cluster, tmp_path):
    cluster, client = dask_cluster
    log, marker = str(tmp_path / "calls.log"), str(tmp_path / "crashed")
    grid = {"x": [0, 1, 2, 3], "crash_x": [1], "marker": [marker], "log": [log], "y": [0.5]}
    sw = Sweep(crash_once, grid, 4, 1, seed=0, results_path=tmp_path / "r.jsonl", name="crash")
    try:
        result = sw.run(client, progress=False)
        assert os.path.exists(marker)  # a worker did die
        crashed = next(t for t in sw.trials if t["config"]["x"] == 1)
        assert count_calls(log)[call_key(crashed)] == 2  # the crash, then the retry
        assert next(t for t in result.trials if t["key"] == crashed["key"])["metrics"] == quadratic(
            crashed["config"], crashed["seed"])
        assert sorted(r["key"] for r in load_records(tmp_path / "r.jsonl")) == sorted(t["key"] for t in sw.trials)
        # no retries left: a clear error
        with pytest.raises(TrialError, match="worker process died 1 time"):
            Sweep(crash_always, {"x": [0]}, 1, seed=0).run(client, retries=0, progress=False)
    finally:
        client.wait_for_workers(2, timeout=60)  # leave the cluster whole for the other tests


def test_dask_retries_a_trial_that_raised(dask_cluster, tmp_path):
    """submit(retries=): Dask reruns a trial that raised; the serial executor does not."""
    cluster, client = dask_cluster
    log, marker = str(tmp_path / "calls.log"), str(tmp_path / "raised")
    grid = {"x": [0, 1, 2], "y": [0.5], "fail_x": [2], "marker": [marker], "log": [log]}
    result = Sweep(raise_once, grid, 3, 1, seed=0, metric="test_loss", name="r").run(
        client, retries=1, progress=False)
    assert os.path.exists(marker) and len(result.trials) == 3
    assert sum(count_calls(log).values()) == 4  # 3 trials, one of them twice
    os.remove(marker)
    with pytest.raises(TrialError, match="OSError: transient failure"):
        Sweep(raise_once, grid, 3, 1, seed=0, metric="test_loss", name="r").run(client, retries=0, progress=False)
    os.remove(marker)
    with pytest.raises(TrialError, match="transient failure"):
        Sweep(raise_once, grid, 3, 1, seed=0, metric="test_loss", name="r").run("serial", progress=False)


def test_dask_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    sw = Sweep(quadratic, GRID, 2, seed=0)
    with pytest.raises(ImportError, match=r'pip install "dselectk\[sweep\]"') as info:
        sw.run("tcp://127.0.0.1:8786", progress=False)
    assert 'pip install "dask[distributed]"' in str(info.value)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _record(config, rep, metrics):
    return {"sweep": "s", "key": f"{json.dumps(config)}-{rep}", "config": config, "repetition": rep, "seed": rep,
            "metrics": metrics, "wall_time": 0.0, "worker": "w", "finished_at": "t"}


def test_markdown_and_csv_format(tmp_path):
    records = [
        _record({"lr": 0.1, "gate": "top_k"}, 0, {"val_loss": 0.1, "test_loss": 0.25}),
        _record({"lr": 0.1, "gate": "top_k"}, 1, {"val_loss": 0.3, "test_loss": 0.25}),
        _record({"lr": 0.001, "gate": "a|b"}, 0, {"val_loss": 0.5, "test_loss": 1.0}),
        _record({"lr": 0.001, "gate": "a|b"}, 1, {"val_loss": 0.5, "test_loss": 2.0}),
        _record({"lr": 1e-05, "gate": "dselect_k"}, 0, {"val_loss": 0.05, "test_loss": 0.125}),
    ]
    result = SweepResult(records, metric="val_loss", mode="min")
    assert result.best_config == {"lr": 1e-05, "gate": "dselect_k"}
    md_path = tmp_path / "t.md"
    text = result.to_markdown(md_path)
    assert text == (
        "| lr | gate | n | val_loss | test_loss |\n"
        "|---|---|---|---|---|\n"
        "| 0.1 | top_k | 2 | 0.200 ± 0.100 | 0.250 ± 0.000 |\n"
        "| 0.001 | a\\|b | 2 | 0.500 ± 0.000 | 1.500 ± 0.500 |\n"
        "| 1e-05 | dselect_k | 1 | **0.050** | 0.125 |\n"
    )
    assert md_path.read_text(encoding="utf-8") == text
    assert result.to_markdown(digits=1).splitlines()[2] == "| 0.1 | top_k | 2 | 0.2 ± 0.1 | 0.2 ± 0.0 |"
    csv_path = tmp_path / "t.csv"
    result.to_csv(csv_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["lr", "gate", "n", "val_loss_mean", "val_loss_sem", "test_loss_mean", "test_loss_sem"]
    assert rows[1][:3] == ["0.1", "top_k", "2"]
    assert float(rows[1][3]) == pytest.approx(0.2) and float(rows[1][4]) == pytest.approx(0.1)
    assert rows[3][2] == "1" and rows[3][4] == "nan"
    assert len(rows) == 4


def test_summarize_per_method():
    rng = np.random.default_rng(0)
    records, values = [], {}
    for method in ("dselect_k", "top_k", "softmax"):
        for rep in range(5):
            m = {"test_loss": float(rng.normal(1.0, 0.1)), "auc": float(rng.uniform())}
            values.setdefault(method, []).append(m)
            records.append(_record({"method": method, "lr": 0.01 * (rep % 2 + 1)}, rep, m))
    table = summarize(records, group_by=("method",), metrics=("test_loss", "auc"))
    assert [r["group"] for r in table] == [{"method": m} for m in ("dselect_k", "top_k", "softmax")]
    for row in table:
        for metric in ("test_loss", "auc"):
            v = np.array([m[metric] for m in values[row["group"]["method"]]])
            assert row["n"] == 5
            assert row["mean"][metric] == pytest.approx(v.mean(), rel=1e-12)
            assert row["sem"][metric] == pytest.approx(v.std(ddof=1) / np.sqrt(5), rel=1e-12)
    text = table.to_markdown()
    lines = text.splitlines()
    assert lines[0] == "| method | n | test_loss | auc |"
    first = table[0]
    assert lines[2] == (f"| dselect_k | 5 | {first['mean']['test_loss']:.3f} ± {first['sem']['test_loss']:.3f} | "
                        f"{first['mean']['auc']:.3f} ± {first['sem']['auc']:.3f} |")
    # two keys, a record field ("sweep"), a string group_by, all metrics by default
    assert len(summarize(records, group_by=("method", "lr"))) == 6
    assert len(summarize(records, group_by="sweep")) == 1 and summarize(records, "sweep")[0]["n"] == 15
    assert summarize(records, group_by=())[0]["mean"].keys() == {"test_loss", "auc"}
    with pytest.raises(ValueError, match="'gate'"):
        summarize(records, group_by=("gate",))
    with pytest.raises(TypeError, match="records"):
        summarize({"metrics": {}})


def test_progress_line(capsys):
    Sweep(quadratic, GRID, 3, seed=0).run("serial", progress=True)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "3/3 trials" in last and "best val_loss" in last and "ETA" in last
    best = Sweep(quadratic, GRID, 3, seed=0).run("serial", progress=False).best["mean"]["val_loss"]
    assert f"{best:.6g}" in last
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(trial_fn=None), TypeError, "trial_fn must be callable"),
    (dict(grid=[1, 2]), TypeError, "grid must be a dict"),
    (dict(grid={}), ValueError, "empty dict"),
    (dict(grid={"x": []}), ValueError, r"grid\['x'\] is empty"),
    (dict(grid={"x": 3}), TypeError, r"grid\['x'\] must be a list"),
    (dict(grid={"x": "abc"}), TypeError, r"grid\['x'\] must be a list"),
    (dict(grid={"x": [1, 1]}), ValueError, "more than once"),
    (dict(grid={"x": [float("nan")]}), ValueError, "finite"),
    (dict(grid={"x": [object()]}), TypeError, "JSON-like"),
    (dict(grid={1: [1]}), TypeError, "grid keys"),
    (dict(n_trials=0), ValueError, "n_trials must be >= 1"),
    (dict(n_trials=2.5), TypeError, "n_trials must be an int"),
    (dict(n_trials=True), TypeError, "n_trials must be an int"),
    (dict(repetitions=0), ValueError, "repetitions must be >= 1"),
    (dict(seed="0"), TypeError, "seed must be an int"),
    (dict(metric=""), TypeError, "metric"),
    (dict(mode="minimize"), ValueError, "mode must be 'min' or 'max'"),
    (dict(constraint=3), TypeError, "constraint"),
    (dict(results_path=3), TypeError, "results_path"),
    (dict(name=""), TypeError, "name"),
])
def test_bad_sweep_arguments(kwargs, exc, match):
    args = dict(trial_fn=quadratic, grid=GRID, n_trials=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        Sweep(**args)


def test_bad_run_arguments_and_bad_trials(tmp_path):
    sw = Sweep(quadratic, GRID, 2, seed=0)
    with pytest.raises(ValueError, match="executor must be"):
        sw.run("proces")
    with pytest.raises(TypeError, match="executor must be"):
        sw.run(42)
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        sw.run("process", max_workers=0)
    with pytest.raises(ValueError, match="retries must be >= 0"):
        sw.run("serial", retries=-1)
    with pytest.raises(TypeError, match="progress"):
        sw.run("serial", progress="yes")
    with pytest.raises(ValueError, match="is a directory"):
        Sweep(quadratic, GRID, 2, results_path=tmp_path)
    with pytest.raises(TypeError, match="pickles by reference"):
        Sweep(lambda c, s: {"val_loss": 0.0}, GRID, 2).run("process")
    with pytest.raises(TrialError, match="must return a dict") as info:
        Sweep(not_a_dict, GRID, 2).run("serial", progress=False)
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(ValueError, match="no 'val_loss' metric"):
        Sweep(missing_metric, GRID, 2).run("serial", progress=False)
    with pytest.raises(ValueError, match="result\\(\\) reads results_path"):
        sw.result()
    # a constraint that raises names the metrics, in run() and in the result
    with pytest.raises(ValueError, match="constraint raised KeyError"):
        Sweep(quadratic, GRID, 2, constraint=lambda m: m["nope"]).run("serial", progress=False)
    records = Sweep(quadratic, GRID, 2).run("serial", progress=False).trials
    with pytest.raises(ValueError, match="constraint raised KeyError"):
        SweepResult(records, constraint=lambda m: m["nope"]).best_config
    # the serial executor runs lambdas and nested functions
    assert Sweep(lambda c, s: {"val_loss": float(c["x"])}, GRID, 15).run("serial", progress=False).best_config["x"] == -1
