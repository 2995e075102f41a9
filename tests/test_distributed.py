"""Data-parallel fit over MPI (dselectk.distributed).

The MPI tests launch ``mpirun -n 2 python tests/mpi_worker.py ...`` (loopback: shared memory
only) and compare what the ranks wrote with single-process runs made here. They skip without
``mpirun`` or mpi4py, unless DSELECTK_REQUIRE_MPI=1 (CI sets it: there they must run).

* equivalence: 2 ranks with local batch B/2 end where 1 process with batch B ends, on the same
  global row order, after 50 steps: float32 to rounding, float64 to 1e-12 -- for static and
  per-example DSelect-k (regularizers, dropout, sample weights), embeddings (sparse gradients)
  and noisy per-example Top-k (conditional computation), a last batch of one row included; the
  History (losses, validation metrics, gate diagnostics) too. A batch of B/2 in one process is
  far off (the comparison can fail);
* shard="given": each rank's own rows = one process on the batches they form together;
* evaluate(comm=): the metrics of all rows (exact AUC), also from shards in another order;
* failures: a model that differs on one rank, an exception on one rank mid-training, a NaN in
  one rank's data, a rank whose parameters drift, a rank that dies (the job ends, no hang);
  ModelCheckpoint writes on rank 0 only and resuming from it continues the run.

Without MPI: the dropout kernel's ``rows`` (the documented hash at each row's place), rows
subsets under conditional computation (the same masks as the dense pass), the global-batch
noise draws, and fit's arguments.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import dselectk as dk
from dselectk import functional as F
from dselectk.layers import current_rows, global_rows, standard_normal, subset_rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpi_worker as W  # noqa: E402
from test_nn_kernels import ref_dropout_mask  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mpi_worker.py")
HAVE_MPI = shutil.which("mpirun") is not None and importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI and os.environ.get("DSELECTK_REQUIRE_MPI") != "1",
                               reason="needs mpirun (Open MPI) and mpi4py: pip install 'dselectk[mpi]'")
TOL = {"float32": 2e-5, "float64": 1e-12}  # of the largest |parameter|


def _mpirun(scenarios, out, timeout=300):
    """Runs the worker on 2 ranks; (return code, seconds, {scenario: [rank 0's result, rank 1's]})."""
    # the ranks import the dselectk this process imported (an installed one, or the in-place build)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(dk.__file__)))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", DSELECTK_NUM_THREADS="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=package_parent)
    cmd = ["mpirun", "-n", "2", "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,vader",
           sys.executable, WORKER, ",".join(scenarios), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    seconds = time.perf_counter() - t0
    results = {}
    for s in scenarios:
        ranks = []
        for r in range(2):
            path = os.path.join(out, f"{s}.rank{r}.json")
            ranks.append(json.load(open(path)) if os.path.exists(path) else None)
        results[s] = ranks
    return proc, seconds, results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The scenarios that end normally, in one launch."""
    out = tmp_path_factory.mktemp("mpi")
    proc, _, results = _mpirun(["equivalence", "given", "evaluate", "checkpoint"], out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, ranks in results.items():
        for r, res in enumerate(ranks):
            assert res is not None and res.get("ok"), f"{name} on rank {r}: {res}\n{proc.stderr}"
    return out, results


def _failing(tmp_path, scenario, error=None):
    """Runs a scenario whose fit raises; both ranks must end (no hang) with ``error`` (a type name)."""
    proc, seconds, results = _mpirun([scenario], tmp_path, timeout=120)
    ranks = results[scenario]
    if error is not None:
        assert proc.returncode == 0, proc.stderr  # both ranks got their exception and went on
        assert [r and r.get("error") for r in ranks] == [error, error], ranks
    return proc, seconds, ranks


# --- equivalence ---------------------------------------------------------------------------------

def _close(mine, ref, dtype, what):
    scale = max(np.max(np.abs(ref)), 1e-30)
    err = np.max(np.abs(mine.astype(np.float64) - ref)) / scale
    assert err <= TOL[dtype], f"{what}: max |difference| / max |value| = {err:.3g} > {TOL[dtype]:g}"
    return err


@needs_mpi
@pytest.mark.parametrize("case, dtype", [(case, dtype) for case, (_, fit_kwargs) in W.CASES.items()
                                         for dtype in fit_kwargs.get("dtypes", ("float32", "float64"))])
def test_two_ranks_train_the_single_process_run(runs, case, dtype):
    out, results = runs
    model = W.make_model(case, dtype)
    X, Y, args = W.fit_arguments(case, dtype)
    history = dk.fit(model, X, Y, **args)
    assert history.total_steps == 50
    saved = np.load(os.path.join(out, f"equivalence-{case}-{dtype}.npz"))
    for name, ref in W.parameters(model).items():
        _close(saved[name], ref, dtype, f"{case} {dtype} {name}")
    # the History every rank holds: global losses, validation metrics of all rows, gate diagnostics
    for rank_result in results["equivalence"]:
        got = rank_result[f"{case}-{dtype}"]
        assert got["binary_step"] == history.binary_step and got["gate_steps"] == history.gate_steps
        if case == "dselectk_binary":
            assert all(s is not None for s in history.binary_step)  # binary on both ranks' rows
        np.testing.assert_allclose(got["gate_weights"], history.gate_weights, atol=10 * TOL[dtype])
        np.testing.assert_allclose(got["selected"], history.selected_experts, atol=1e-12)
        for mine, ref in zip(got["epochs"], history.epochs):
            assert set(mine) == set(ref) | {"comm_time"}
            for key in ref:
                # executed expert FLOPs: each rank decides on its share whether to run experts on
                # their rows only (sparse_threshold), so they may differ from one process's
                if key == "expert_flops":
                    assert mine[key] <= mine["expert_flops_dense"]
                elif key != "time":
                    assert mine[key] == pytest.approx(ref[key], rel=50 * TOL[dtype], abs=50 * TOL[dtype]), key
    # the comparison has teeth: local batches of B/2 in one process end elsewhere
    half = W.make_model(case, dtype)
    dk.fit(half, X, Y, **dict(args, batch_size=W.BATCH // 2, epochs=W.EPOCHS // 2))
    scale = np.max(np.abs(model.slab.data))
    assert np.max(np.abs(half.slab.data - model.slab.data)) / scale > 100 * TOL[dtype]


@needs_mpi
def test_the_ranks_agree_on_the_history(runs):
    _, results = runs
    rank0, rank1 = results["equivalence"]
    assert rank0 == rank1  # the same floats: reduced once, or broadcast


@needs_mpi
def test_given_shards_train_the_batches_they_form_together(runs):
    """Rank r holds rows r::2; step i joins part i of each rank's rows (no shuffling)."""
    out, _ = runs
    case, dtype = "dselectk_per_example", "float64"
    X, Y, args = W.fit_arguments(case, dtype, validation_data=None)
    W_ = args.pop("sample_weights")
    steps = -(-W.N_ROWS // W.BATCH)
    shares = [np.array_split(np.arange(r, W.N_ROWS, 2), steps) for r in range(2)]
    batches = [np.concatenate([shares[0][i], shares[1][i]]) for i in range(steps)]

    class Batches:
        def __len__(self):
            return steps

        def __getitem__(self, i):
            idx = batches[i]
            return X[idx], [y[idx] for y in Y], [None if w is None else w[idx] for w in W_]

    model = W.make_model(case, dtype)
    dk.fit(model, Batches(), shuffle=False, **args)
    _close(np.load(os.path.join(out, "given.npz"))["slab"], model.slab.data, dtype, "given")


@needs_mpi
def test_evaluate_over_ranks_is_the_evaluation_of_all_rows(runs):
    _, results = runs
    case, dtype = "dselectk_per_example", "float64"
    model = W.make_model(case, dtype)
    Xv, Yv, _ = W.make_data(case, dtype, n=301, seed=1)
    ref = dk.evaluate(model, Xv, Yv)
    for rank_result in results["evaluate"]:
        for mode in ("rows", "given"):
            got = rank_result[mode]
            assert set(got) == set(ref)
            for key, value in ref.items():
                if key.endswith(("auc", "accuracy")):
                    assert got[key] == value, (mode, key)  # exact: computed once on all rows
                else:
                    assert got[key] == pytest.approx(value, rel=1e-12), (mode, key)


@needs_mpi
def test_checkpoints_on_rank_0_only_and_resume_continues_the_run(runs):
    _, results = runs
    for res in results["checkpoint"]:
        assert res["files"] == ["ckpt-rank0-1.npz", "ckpt-rank0-2.npz"]
        assert res["same"], res["max_diff"]


# --- failures ----------------------------------------------------------------------------------

@needs_mpi
def test_a_model_that_differs_on_one_rank_raises_on_every_rank(tmp_path):
    _, _, ranks = _failing(tmp_path, "mismatch", "ValueError")
    for res in ranks:
        assert "the ranks must train the same model" in res["message"] and "n_tasks" in res["message"], res


@needs_mpi
def test_an_exception_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    _, _, ranks = _failing(tmp_path, "raise_batch", "ValueError")
    assert ranks[1]["message"] == "boom on rank 1 at step 13"
    assert ranks[1]["notes"] and "rank 1 of 2" in ranks[1]["notes"][0]
    assert ranks[0]["message"] == "rank 1 of 2: boom on rank 1 at step 13"


@needs_mpi
def test_bad_data_on_one_rank_stops_every_rank_before_training(tmp_path):
    _, _, ranks = _failing(tmp_path, "raise_data", "ValueError")
    assert all("NaN" in res["message"] for res in ranks), ranks
    assert ranks[0]["message"].startswith("rank 1 of 2: ")


@needs_mpi
def test_parameters_that_drift_apart_raise_on_every_rank(tmp_path):
    _, _, ranks = _failing(tmp_path, "drift", "ParameterDriftError")
    for res in ranks:
        assert "after step 10" in res["message"] and "ranks [1]" in res["message"], res


@needs_mpi
def test_a_rank_that_dies_ends_the_job(tmp_path):
    proc, seconds, ranks = _failing(tmp_path, "die")
    assert proc.returncode != 0
    assert ranks[1] is None  # killed before it could write anything
    assert seconds < 100  # mpirun ended the job: nobody waits forever


# --- without MPI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_rows_hash_each_rows_place(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)).astype(dtype)
    rows = np.array([3, 0, 12, 7, 7, 1, 40])
    full = ref_dropout_mask(41 * 5, 0.4, 9, 2).reshape(41, 5)
    y = F.dropout_forward(x, 0.4, 9, 2, rows=rows)
    np.testing.assert_array_equal(y != 0, full[rows] & (x != 0))
    np.testing.assert_allclose(y[y != 0], (x / 0.6)[y != 0], rtol=1e-6)
    np.testing.assert_array_equal(F.dropout_backward(x, 0.4, 9, 2, rows=rows), y)
    # the identity rows give the plain masks
    np.testing.assert_array_equal(F.dropout_forward(x, 0.4, 9, 2, rows=np.arange(7)), F.dropout_forward(x, 0.4, 9, 2))


@pytest.mark.parametrize("rows, error, match", [
    (np.arange(6), ValueError, "one entry per row"),
    (np.array([0, 1, 2, 3, 4, -1, 6]), ValueError, "rows"),
    (np.arange(7.0), TypeError, "integer"),
    (np.full(7, 2**62), ValueError, "rows"),  # rows * 5 would pass 2**63
])
def test_dropout_rows_bad_input(rows, error, match):
    x = np.ones((7, 5), np.float32)
    with pytest.raises(error, match=match):
        F.dropout_forward(x, 0.4, 9, 2, rows=rows)


def test_dropout_rows_any_integer_array():
    x = np.random.default_rng(1).standard_normal((4, 6))
    rows = np.array([9, 0, 9, 2, 5, 3, 1, 8], np.int64)
    want = F.dropout_forward(x, 0.5, 3, 1, rows=np.ascontiguousarray(rows[::2]))
    for other in (rows[::2], rows[::2].astype(np.uint16), rows[::2].astype(">i4")):
        np.testing.assert_array_equal(F.dropout_forward(x, 0.5, 3, 1, rows=other), want)


def test_conditional_computation_keeps_the_dense_pass_dropout_masks():
    """Top-k (k=1 of 6): experts run on their own rows only; with masks by the rows' place in the
    batch the gradients are those of the dense pass (sparse_threshold=0)."""
    grads = []
    for threshold in (0.75, 0.0):
        model = W.make_model("topk", "float64")
        model.sparse_threshold = threshold
        X, Y, _ = W.make_data("topk", "float64", n=40)
        model.zero_grad()
        _, _, douts = model.loss(model.forward(X, training=True), Y)
        model.backward(douts)
        grads.append(model.slab.grad.copy())
        assert model.flops["experts_executed"] < model.flops["experts_dense"] or threshold == 0
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_global_rows_draw_the_whole_batchs_noise():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    whole = standard_normal(rng_a, (10, 3), np.float64)
    with global_rows(np.arange(6, 10), 10):
        assert current_rows(4)[1] == 10
        share = standard_normal(rng_b, (4, 3), np.float64)
        with subset_rows(np.array([1, 3])):
            np.testing.assert_array_equal(current_rows(2)[0], [7, 9])
    np.testing.assert_array_equal(share, whole[6:])
    assert current_rows(4) == (None, None)


def test_fit_without_comm_takes_no_mpi_arguments_wrongly():
    model = W.make_model("dselectk_static", "float32")
    X, Y, args = W.fit_arguments("dselectk_static", "float32", validation_data=None, epochs=1)
    if importlib.util.find_spec("mpi4py") is None:
        with pytest.raises(ImportError, match="dselectk\\[mpi\\]"):
            dk.fit(model, X, Y, comm=object(), **args)
        return
    with pytest.raises(TypeError, match="intracommunicator"):
        dk.fit(model, X, Y, comm=object(), **args)
    from mpi4py import MPI

    with pytest.raises(ValueError, match="shard"):
        dk.fit(model, X, Y, comm=MPI.COMM_SELF, shard="cols", **args)
    with pytest.raises(ValueError, match="checksum_every"):
        dk.fit(model, X, Y, comm=MPI.COMM_SELF, checksum_every=0, **args)


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py")
def test_one_rank_is_the_single_process_run():
    """comm=COMM_SELF runs the data-parallel path on one rank: the same run."""
    from mpi4py import MPI

    runs = []
    for comm in (None, MPI.COMM_SELF):
        model = W.make_model("embeddings", "float64")
        X, Y, args = W.fit_arguments("embeddings", "float64", epochs=2)
        history = dk.fit(model, X, Y, comm=comm, **args)
        runs.append((model, history))
    (a, ha), (b, hb) = runs
    np.testing.assert_array_equal(a.slab.data, b.slab.data)
    for ta, tb in zip(a.embedding_tables(), b.embedding_tables()):
        np.testing.assert_array_equal(ta, tb)
    assert [{k: v for k, v in e.items() if k != "time"} for e in ha.epochs] == \
        [{k: v for k, v in e.items() if k not in ("time", "comm_time")} for e in hb.epochs]
