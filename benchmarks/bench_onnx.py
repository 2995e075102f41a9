"""Inference throughput: the exported ONNX graph in onnxruntime against ``dk.predict``.

    python benchmarks/bench_onnx.py [--batches 1 128 1024] [--threads 1] [--repeats 7] [--out FILE.md]

Models (float32, random inputs):

* MMoE, 128 inputs, 8 experts Dense(256) -> ReLU, 2 tasks with Dense(64) towers (bce, mse), with
  a static DSelect-k gate (k = 2) whose S(Z) is binary (the two tasks on 3 experts between them,
  so the graph holds 3 experts), a per-example DSelect-k gate (k = 2) and a per-example Top-k
  gate (k = 2);
* the Multi-MNIST CNN MMoE of the paper's Appendix D.2 (8 CNN experts on 1 x 36 x 36 images,
  Dense(50), towers Dense(50, 50), 2 softmax_ce tasks of 10 classes), static DSelect-k, binary.

Each row times ``dk.predict(model, X, batch_size=B)`` and ``session.run(None, {"X": X})`` on the
same X of B rows, in interleaved blocks (ABBA order) of about 0.2 s, and reports the median block's
examples per second; ``onnxruntime / dk.predict`` is their ratio, measured side by side (the
machine is shared: compare ratios, not absolute numbers). onnxruntime runs with
``intra_op_num_threads`` and dselectk with ``set_num_threads`` both at ``--threads``, inter-op 1,
all graph optimizations on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import dselectk as dk
from dselectk.gates import DSelectK, TopK


def _binary(model, codes):
    """S(Z) binary: selector i of task t on expert codes[t][i]."""
    for gate, experts in zip(model.gates, codes):
        m = gate.params["Z"].shape[1]
        for i, j in enumerate(experts):
            gate.params["Z"][i] = [gate.gamma if (j >> b) & 1 else -gate.gamma for b in range(m)]
    return model


def models():
    mlp = dict(input_dim=128, n_tasks=2, n_experts=8, expert_units=(256,), tower_units=(64,),
               task_losses=["bce", "mse"])
    yield "MMoE MLP, static DSelect-k, binary (3 of 8 experts)", \
        _binary(dk.MMoE(gate=DSelectK(k=2), **mlp), [[0, 1], [1, 2]]), (128,)
    yield "MMoE MLP, per-example DSelect-k", dk.MMoE(gate=DSelectK(k=2, per_example=True), **mlp), (128,)
    yield "MMoE MLP, per-example Top-k", dk.MMoE(gate=TopK(k=2, per_example=True), **mlp), (128,)
    cnn = dk.MMoE(expert="cnn", input_shape=(1, 36, 36), n_tasks=2, n_experts=8, expert_units=(50,),
                  tower_units=(50, 50), task_losses="softmax_ce", task_outputs=10, gate=DSelectK(k=2))
    yield "MMoE CNN (Multi-MNIST), static DSelect-k, binary (3 of 8)", _binary(cnn, [[0, 1], [1, 2]]), (1, 36, 36)


def _calls_per_block(fn, target=0.2):
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < target / 4:
        fn()
        n += 1
    return max(1, int(n * target / (time.perf_counter() - t0)))


def _time_pair(a, b, repeats):
    """Median seconds per call of a and b, timed in interleaved blocks (ABBA)."""
    na, nb = _calls_per_block(a), _calls_per_block(b)
    ta, tb = [], []
    for r in range(repeats):
        order = ((a, na, ta), (b, nb, tb)) if r % 2 == 0 else ((b, nb, tb), (a, na, ta))
        for fn, n, acc in order:
            time.sleep(0.02)  # the other side's idle threads stop spinning
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            acc.append((time.perf_counter() - t0) / n)
    return statistics.median(ta), statistics.median(tb)


def rows(batches, threads, repeats, workdir):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    rng = np.random.default_rng(0)
    for name, model, shape in models():
        path = os.path.join(workdir, "model.onnx")
        dk.export_onnx(model, path)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for B in batches:
            X = rng.standard_normal((B, *shape)).astype(np.float32)
            got, want = session.run(None, {"X": X}), dk.predict(model, X, batch_size=B)
            err = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
            t_ours, t_ort = _time_pair(lambda: dk.predict(model, X, batch_size=B),
                                       lambda: session.run(None, {"X": X}), repeats)
            yield name, B, B / t_ours, B / t_ort, t_ours / t_ort, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128, 1024])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        sys.exit("bench_onnx.py needs onnxruntime (and onnx): pip install onnx onnxruntime")
    dk.set_num_threads(args.threads)
    command = "python benchmarks/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command.strip()}` (from the repository root, dselectk built).", "",
             f"onnxruntime {ort.__version__}, dselectk {dk.__version__}; {args.threads} thread(s) each; float32; "
             f"median of {args.repeats} interleaved blocks of ~0.2 s.", "",
             "| model | batch | dk.predict examples/s | onnxruntime examples/s | onnxruntime / dk.predict "
             "| max abs diff |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as workdir:
        for name, B, ours, theirs, ratio, err in rows(args.batches, args.threads, args.repeats, workdir):
            lines.append(f"| {name} | {B} | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f}x | {err:.1e} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    print("\n" + report)


if __name__ == "__main__":
    main()
