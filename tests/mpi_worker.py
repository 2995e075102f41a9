"""The ranks' side of the data-parallel tests (tests/test_distributed.py launches it with
``mpirun -n 2 python tests/mpi_worker.py SCENARIO[,SCENARIO...] OUT``; it is also imported there, for the models
and data that the single-process references train on).

Each rank writes OUT/SCENARIO.rank<r>.json: {"ok": true, ...} or {"error": type name, "message"}.
Scenarios:

* ``equivalence``: every case of CASES in float32 and float64, shard="rows": the final parameters
  (rank 0's, in OUT/equivalence-<case>-<dtype>.npz) and History, and whether the ranks agree.
* ``given``: shard="given", each rank its own rows; ``evaluate``: evaluate(comm=) on the ranks'
  blocks of one validation set.
* ``mismatch``, ``raise_batch``, ``raise_data``, ``drift``, ``die``, ``checkpoint``: the failures
  and the rank-0-only checkpoint (see the tests).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

import dselectk as dk  # the one the launching test imported (it sets PYTHONPATH)

STEPS_PER_EPOCH, EPOCHS, BATCH = 10, 5, 64
N_ROWS = (STEPS_PER_EPOCH - 1) * BATCH + 1  # the last batch has one row: on 2 ranks, one share is empty
EMB = dict(vocab_sizes=[50, 30], dims=[4, 3], n_dense=3)

# name: (model arguments, fit arguments); 50 steps each
CASES = {
    # static DSelect-k with the entropy regularizer: a gradient every rank holds (counted once)
    "dselectk_static": (dict(gate=dk.gates.DSelectK(k=2, entropy_reg=0.1)), dict(optimizer="adam", lr=0.01)),
    # per-example DSelect-k (its regularizer a batch mean), dropout, sample weights
    "dselectk_per_example": (dict(gate=dk.gates.DSelectK(k=2, entropy_reg=0.05, per_example=True), dropout=0.2),
                             dict(optimizer="adam", lr=0.01, weights=True)),
    # S(Z) becomes binary for every row of both ranks after 20-30 steps (float64 only: in float32 the
    # step at which an entry of S(Z) clamps to 0 or 1 can move by one under rounding, and the runs
    # then differ by more than rounding)
    "dselectk_binary": (dict(gate=dk.gates.DSelectK(k=2, gamma=0.1, entropy_reg=0.5, per_example=True)),
                        dict(optimizer="adam", lr=0.01, dtypes=("float64",))),
    # embeddings: sparse gradients, lazy Adam; per-example gate on the embedded rows
    "embeddings": (dict(gate=dk.gates.DSelectK(k=2, per_example=True), embeddings=EMB),
                   dict(optimizer="adam", lr=0.01)),
    # noisy per-example Top-k (k=1 of 6): conditional computation (experts on their rows only)
    # with dropout, and the gate's noise
    "topk": (dict(gate=dk.gates.TopK(k=1, per_example=True, noisy=True), n_experts=6, dropout=0.2),
             dict(optimizer="adagrad", lr=0.05)),
}


def make_model(case, dtype, **overrides):
    kwargs, _ = CASES[case]
    args = dict(input_dim=None if "embeddings" in kwargs else 10, n_tasks=2, n_experts=4, expert_units=(16,),
                tower_units=(8,), task_losses="bce", seed=3, dtype=dtype)
    args.update(kwargs)
    args.update(overrides)
    return dk.MMoE(**args)


def make_data(case, dtype, n=N_ROWS, seed=0):
    """(X, Y, sample_weights or None) for ``case``; the targets depend on X, so training learns."""
    rng = np.random.default_rng(seed)
    kwargs, fit_kwargs = CASES[case]
    if "embeddings" in kwargs:
        ids = np.stack([rng.integers(0, v, n) for v in EMB["vocab_sizes"]], axis=1)
        dense = rng.standard_normal((n, EMB["n_dense"])).astype(dtype)
        X = {"ids": ids, "dense": dense}
        signal = dense[:, 0] + (ids[:, 0] % 3 == 0)
    else:
        X = rng.standard_normal((n, 10)).astype(dtype)
        signal = X[:, 0] - X[:, 1]
    Y = [(signal > 0).astype(dtype), (rng.random(n) < 0.3 + 0.4 * (signal > 0.5)).astype(dtype)]
    W = None
    if fit_kwargs.get("weights"):
        W = [rng.uniform(0.5, 2.0, n).astype(dtype), None]
    return X, Y, W


def fit_arguments(case, dtype, **overrides):
    """The fit keyword arguments of ``case`` (without comm), validation data included."""
    _, fit_kwargs = CASES[case]
    Xv, Yv, _ = make_data(case, dtype, n=150, seed=1)
    X, Y, W = make_data(case, dtype)
    args = dict(epochs=EPOCHS, batch_size=BATCH, optimizer=fit_kwargs["optimizer"], lr=fit_kwargs["lr"], seed=7,
                validation_data=(Xv, Yv), sample_weights=W, verbose=0, record_gate_every=5)
    args.update(overrides)
    return X, Y, args


def history_json(history):
    return dict(epochs=history.epochs, binary_step=history.binary_step, gate_steps=history.gate_steps,
                gate_weights=history.gate_weights.tolist(), selected=history.selected_experts.tolist(),
                total_steps=history.total_steps)


def parameters(model):
    return {"slab": model.slab.data, **{f"table{j}": t for j, t in enumerate(model.embedding_tables())}}


# --- scenarios ---------------------------------------------------------------------------------

def equivalence(comm, out):
    result = {}
    for case in CASES:
        for dtype in CASES[case][1].get("dtypes", ("float32", "float64")):
            model = make_model(case, dtype)
            X, Y, args = fit_arguments(case, dtype)
            history = dk.fit(model, X, Y, comm=comm, checksum_every=10, **args)
            if comm.rank == 0:
                np.savez(os.path.join(out, f"equivalence-{case}-{dtype}.npz"), **parameters(model))
            result[f"{case}-{dtype}"] = history_json(history)
    return result


def given(comm, out):
    """Each rank holds its own rows (rank r: rows r::2 of the common data), no shuffling."""
    case, dtype = "dselectk_per_example", "float64"
    model = make_model(case, dtype)
    X, Y, args = fit_arguments(case, dtype, validation_data=None)
    rows = np.arange(comm.rank, N_ROWS, comm.size)
    W = [None if w is None else w[rows] for w in args.pop("sample_weights")]
    dk.fit(model, X[rows], [y[rows] for y in Y], comm=comm, shard="given", shuffle=False, sample_weights=W, **args)
    if comm.rank == 0:
        np.savez(os.path.join(out, "given.npz"), **parameters(model))
    return {}


def evaluate(comm, out):
    case, dtype = "dselectk_per_example", "float64"
    model = make_model(case, dtype)
    Xv, Yv, _ = make_data(case, dtype, n=301, seed=1)
    rows = dk.evaluate(model, Xv, Yv, comm=comm)
    mine = np.array_split(np.arange(301), comm.size)[comm.rank][::-1]  # "given": any rows, any order
    given_rows = dk.evaluate(model, Xv[mine], [y[mine] for y in Yv], comm=comm, shard="given", batch_size=50)
    return dict(rows=rows, given=given_rows)


def mismatch(comm, out):
    """Rank 1 builds a model with three tasks."""
    case, dtype = "dselectk_static", "float32"
    n_tasks = 2 if comm.rank == 0 else 3
    model = make_model(case, dtype, n_tasks=n_tasks)
    X, Y, args = fit_arguments(case, dtype, validation_data=None)
    Y = Y + [Y[0]] * (n_tasks - 2)
    dk.fit(model, X, Y, comm=comm, **args)
    return {}


class _RaiseOnRank1(dk.callbacks.Callback):
    def on_batch_begin(self, batch, logs=None):
        if self.params["rank"] == 1 and self.model.train_state.step == 12:
            raise ValueError("boom on rank 1 at step 13")


def raise_batch(comm, out):
    case, dtype = "embeddings", "float32"
    model = make_model(case, dtype)
    X, Y, args = fit_arguments(case, dtype)
    dk.fit(model, X, Y, comm=comm, callbacks=[_RaiseOnRank1()], **args)
    return {}


def raise_data(comm, out):
    """Rank 1's own shard holds a NaN."""
    case, dtype = "dselectk_static", "float32"
    model = make_model(case, dtype)
    X, Y, args = fit_arguments(case, dtype, validation_data=None)
    if comm.rank == 1:
        X = X.copy()
        X[5, 2] = np.nan
    dk.fit(model, X, Y, comm=comm, shard="given", **args)
    return {}


class _Nudge(dk.callbacks.Callback):
    def on_batch_end(self, batch, logs=None):
        if self.params["rank"] == 1 and logs["step"] == 7:
            self.model.slab.data[0] += 1e-3


def drift(comm, out):
    case, dtype = "dselectk_static", "float32"
    model = make_model(case, dtype)
    X, Y, args = fit_arguments(case, dtype, validation_data=None)
    dk.fit(model, X, Y, comm=comm, callbacks=[_Nudge()], checksum_every=5, **args)
    return {}


class _Die(dk.callbacks.Callback):
    def on_batch_end(self, batch, logs=None):
        if self.params["rank"] == 1 and logs["step"] == 3:
            os.kill(os.getpid(), 9)


def die(comm, out):
    case, dtype = "dselectk_static", "float32"
    model = make_model(case, dtype)
    X, Y, args = fit_arguments(case, dtype, validation_data=None)
    dk.fit(model, X, Y, comm=comm, callbacks=[_Die()], **args)
    return {}


def checkpoint(comm, out):
    """ModelCheckpoint writes on rank 0 only; a run resumed from it after epoch 2 ends where the
    uninterrupted run ends."""
    case, dtype = "dselectk_per_example", "float64"
    X, Y, args = fit_arguments(case, dtype, validation_data=None)
    path = os.path.join(out, f"ckpt-rank{comm.rank}-{{epoch}}.npz")
    full = make_model(case, dtype)
    dk.fit(full, X, Y, comm=comm, **args)
    first = make_model(case, dtype)
    dk.fit(first, X, Y, comm=comm, callbacks=[dk.callbacks.ModelCheckpoint(path)], **dict(args, epochs=2))
    comm.Barrier()
    resumed = make_model(case, dtype)
    dk.fit(resumed, X, Y, comm=comm, resume_from=os.path.join(out, "ckpt-rank0-2.npz"), **args)
    files = sorted(f for f in os.listdir(out) if f.startswith("ckpt-"))
    return dict(files=files, same=bool(np.array_equal(full.slab.data, resumed.slab.data)),
                max_diff=float(np.max(np.abs(full.slab.data - resumed.slab.data))))


SCENARIOS = {f.__name__: f for f in (equivalence, given, evaluate, mismatch, raise_batch, raise_data, drift, die,
                                     checkpoint)}


def main():
    from mpi4py import MPI

    scenarios, out = sys.argv[1].split(","), sys.argv[2]
    comm = MPI.COMM_WORLD
    for scenario in scenarios:  # one launch for several (the slow part is starting the job)
        path = os.path.join(out, f"{scenario}.rank{comm.rank}.json")
        try:
            result = dict(ok=True, **SCENARIOS[scenario](comm, out))
        except Exception as exc:  # what the test checks: the same stop on every rank
            result = dict(error=type(exc).__name__, message=str(exc), notes=getattr(exc, "__notes__", []))
        with open(path, "w") as f:
            json.dump(result, f, default=float)


if __name__ == "__main__":
    main()
