"""Data-parallel fit over MPI: examples/s at 1 and 2 ranks (1 thread each), the gradient sums'
time per step, the scaling efficiency; and the ring-allreduce cost model for 8, 64, 512 ranks.

    python benchmarks/bench_distributed.py [--batch 1024] [--steps 30] [--repeats 3] [--out FILE]

It launches ``mpirun -n R python benchmarks/bench_distributed.py --worker ...`` for R = 1 and 2
(alternating, ``--repeats`` times; medians reported), each rank with one thread, on one machine
(shared memory). Models:

* ``mmoe``: the MMoE of bench_train_step (issue #3): 8 experts Dense(256) + ReLU on 128 inputs, 2
  tasks with Dense(256) towers, per-example DSelect-k (k = 2); Gaussian X.
* ``movielens``: the MovieLens model of Appendix D.1 (dselectk.experiments.movielens.build_model:
  user and movie embeddings of 128 for 6040 users and 3706 movies, 8 experts Dense(256), dropout
  0.5, static DSelect-k, a bce and an mse task) on SYNTHETIC ids (uniform users and movies, random
  targets: the speed does not depend on the ratings).

Per configuration: examples/s (global rows / wall time of a fit over ``--steps`` steps, after a
warm-up fit), the seconds per step that rank 0 spent in the gradient sums (History's comm_time:
the slab's Allreduce, the sparse gradients' Allgathers, waiting for the other rank included), an
isolated Allreduce of the slab (median of 50, after a barrier), and the compute time per step
(wall time per step minus the gradient sums). Scaling efficiency = examples/s at 2 ranks / (2 x
examples/s at 1 rank). ``--model`` prints only the cost-model table (from a results file).

The cost model, per step at N ranks, weak scaling (each rank keeps the measured local batch):
t_ring(N) = 2 (N - 1) / N * S / BW + 2 (N - 1) * alpha for a slab of S bytes on links of
bandwidth BW with a per-message latency alpha, and efficiency = t_c / (t_c + t_ring(N)) with t_c
the measured compute time per step (fit does not overlap the sum with the backward). Embedding
tables add each rank's receiving the other ranks' sparse rows, (N - 1) * U * (8 + 4 d) bytes for
U distinct ids per rank and step (the allgather of dselectk.distributed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODELS = ("mmoe", "movielens")
LINKS = {"10 Gbit/s": (10e9 / 8, 10e-6), "100 Gbit/s": (100e9 / 8, 2e-6)}  # bytes/s, alpha (s)
RANKS = (8, 64, 512)


def build(name, batch, steps, seed=0):
    """(model, X, Y) with ``batch * steps`` rows."""
    import dselectk as dk

    rng = np.random.default_rng(seed)
    n = batch * steps
    if name == "mmoe":
        model = dk.MMoE(128, n_tasks=2, n_experts=8, expert_units=(256,), tower_units=(256,),
                        task_losses=["mse", "bce"], gate=dk.gates.DSelectK(k=2, per_example=True), seed=seed)
        X = rng.standard_normal((n, 128)).astype(np.float32)
        Y = [rng.standard_normal(n).astype(np.float32), (rng.random(n) < 0.5).astype(np.float32)]
        return model, X, Y
    from dselectk.experiments.movielens import build_model

    model = build_model([6040, 3706], seed=seed)
    X = np.stack([rng.integers(0, 6040, n), rng.integers(0, 3706, n)], axis=1)
    Y = [(rng.random(n) < 0.5).astype(np.float32), rng.uniform(1, 5, n).astype(np.float32)]
    return model, X, Y


def worker(name, batch, steps):
    """One configuration on the ranks of COMM_WORLD; rank 0 prints a JSON line."""
    from mpi4py import MPI

    import dselectk as dk

    comm = MPI.COMM_WORLD
    dk.set_num_threads(1)
    model, X, Y = build(name, batch, steps)
    warm = dict(epochs=1, batch_size=batch, verbose=0, optimizer="adam", comm=comm, checksum_every=None)
    dk.fit(model, X[:batch * 3], [y[:batch * 3] for y in Y], **warm)
    comm.Barrier()
    t0 = time.perf_counter()
    history = dk.fit(model, X, Y, **warm)
    seconds = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    comm_step = history.epochs[-1]["comm_time"] / steps
    grad = model.slab.grad
    times = []
    for _ in range(50):  # the median shows the machine's load (a descheduled peer), the minimum the copy
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
        times.append(time.perf_counter() - t)
    distinct = int(np.mean([np.unique(X[i * batch:(i + 1) * batch][:, j]).size
                            for i in range(steps) for j in range(X.shape[1])]) * X.shape[1]) if X.dtype.kind == "i" \
        else 0
    if comm.rank == 0:
        print(json.dumps(dict(model=name, ranks=comm.size, batch=batch, steps=steps, seconds=seconds,
                              examples_per_s=batch * steps / seconds, step_s=seconds / steps, comm_step_s=comm_step,
                              compute_step_s=seconds / steps - comm_step, allreduce_s=statistics.median(times),
                              allreduce_min_s=min(times),
                              slab_bytes=grad.nbytes, tables=[list(t.shape) for t in model.embedding_tables()],
                              distinct_ids_per_batch=distinct)), flush=True)


def launch(name, ranks, batch, steps):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", DSELECTK_NUM_THREADS="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,vader",
           sys.executable, os.path.abspath(__file__), "--worker", name, "--batch", str(batch), "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def paper_slabs():
    """{model: (slab bytes, [(rows, dim) of the tables])} of the paper's models as dselectk builds them."""
    import dselectk as dk
    from dselectk.experiments.movielens import build_model as movielens
    from dselectk.experiments.multi_mnist import build_model as multi_mnist

    synthetic = dk.MMoE(10, n_tasks=128, n_experts=32, expert_units=(4,), expert_output="sum", tower_units=None,
                        task_losses="mse", gate=dk.gates.DSelectK(k=4))
    models = {"synthetic MMoE, T = 128 (Sec. 5.1)": synthetic,
              "MovieLens MMoE (App. D.1)": movielens([6040, 3706]),
              "Multi-MNIST CNN MMoE (App. D.2)": multi_mnist("dselect_k", (1, 36, 36))}
    return {name: (m.slab.data.nbytes, [t.shape for t in m.embedding_tables()]) for name, m in models.items()}


def ring_seconds(N, slab_bytes, bandwidth, alpha):
    return 2 * (N - 1) / N * slab_bytes / bandwidth + 2 * (N - 1) * alpha


def cost_model(results):
    """Markdown: expected efficiency at RANKS for the measured models; the allreduce time per step
    of the paper's models' slabs."""
    lines = ["| model | slab | t_c per step (measured, 1 rank, local batch) | link | " +
             " | ".join(f"N = {n}" for n in RANKS) + " |", "|---|---|---|---|" + "---|" * len(RANKS)]
    for name in MODELS:  # t_c: one rank computing the local batch of the 2-rank runs
        local = [r for r in results if r["model"] == name and r.get("local_batch_run")]
        if not local:
            continue
        r = local[0]
        dim = 128 if r["tables"] else 0
        for link, (bw, alpha) in LINKS.items():
            effs = []
            for N in RANKS:
                t = ring_seconds(N, r["slab_bytes"], bw, alpha)
                t += (N - 1) * r["distinct_ids_per_batch"] * (8 + 4 * dim) / bw  # the tables' rows, allgathered
                effs.append(f"{r['compute_step_s'] / (r['compute_step_s'] + t):.0%}")
            lines.append(f"| {name} | {r['slab_bytes'] / 2**20:.2f} MiB | {r['compute_step_s'] * 1e3:.1f} ms "
                         f"({r['batch']} rows) | {link} | " + " | ".join(effs) + " |")
    lines += ["", "Ring allreduce of the slab per step, t_ring(N) in ms (the paper's models as dselectk builds "
              "them; embedding tables not included):", "",
              "| model | slab | link | " + " | ".join(f"N = {n}" for n in RANKS) + " |",
              "|---|---|---|" + "---|" * len(RANKS)]
    for pname, (slab, tables) in paper_slabs().items():
        for link, (bw, alpha) in LINKS.items():
            lines.append(f"| {pname} | {slab / 2**20:.3f} MiB | {link} | " +
                         " | ".join(f"{ring_seconds(N, slab, bw, alpha) * 1e3:.2f}" for N in RANKS) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--out", help="write the raw results (JSON) here")
    ap.add_argument("--model", metavar="RESULTS", help="print the cost model from a results file and stop")
    ap.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.batch, args.steps)
    if args.model:
        print(cost_model(json.load(open(args.model))))
        return
    runs = {}
    for _ in range(args.repeats):
        for name in args.models:
            for ranks in (1, 2):
                runs.setdefault((name, ranks), []).append(launch(name, ranks, args.batch, args.steps))
            runs.setdefault((name, "local"), []).append(launch(name, 1, args.batch // 2, args.steps))
    results = []
    print(f"global batch {args.batch}, {args.steps} steps, 1 thread per rank, medians of {args.repeats} runs\n")
    print("| model | ranks | batch per rank | examples/s | step (ms) | compute per step (ms) | gradient sums per "
          "step (ms) | isolated slab Allreduce, median / min (ms) | slab | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = ("examples_per_s", "step_s", "comm_step_s", "compute_step_s", "allreduce_s", "allreduce_min_s")
    for name in args.models:
        base = None
        for ranks in (1, 2, "local"):
            rs = runs[(name, ranks)]
            med = {k: statistics.median(r[k] for r in rs) for k in keys}
            res = dict(rs[0], **med, local_batch_run=ranks == "local")
            results.append(res)
            base = base or med["examples_per_s"]
            eff = f"{med['examples_per_s'] / (ranks * base):.0%}" if ranks != "local" else "(t_c of the model)"
            print(f"| {name} | {res['ranks']} | {res['batch'] // res['ranks']} | {med['examples_per_s']:.0f} | "
                  f"{med['step_s'] * 1e3:.1f} | {med['compute_step_s'] * 1e3:.1f} | {med['comm_step_s'] * 1e3:.2f} | "
                  f"{med['allreduce_s'] * 1e3:.3f} / {med['allreduce_min_s'] * 1e3:.3f} | "
                  f"{res['slab_bytes'] / 2**20:.2f} MiB | {eff} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("\nExpected efficiency (ring allreduce model, weak scaling at the 2-rank local batch):\n")
    print(cost_model(results))


if __name__ == "__main__":
    main()
