"""dselectk against PyTorch (CPU) on the same models, at 1 and 2 threads.

    python benchmarks/bench_vs_torch.py [--quick] [--out results.md] [--threads 1 2]

Workloads (float32):

1. gate only: per-example DSelect-k forward + backward (gradients of <dw, w> + lambda * Omega for
   x and every parameter), B = 4096, p = 64, k = 4, n in {8, 32, 128}, lambda = 0.1 (PyTorch
   also evaluates Omega itself, which its autograd needs; dselectk's backward needs only its
   gradient); ``comet``: the same for the per-example COMET gate, k = 2 trees, n in {8, 16, 64}
   (PyTorch: torch_models.CometGate, the heap walked a level at a time);
2. one MMoE training step (forward, task losses, backward, Adam): 8 experts Dense(256) + ReLU on
   128 inputs, 2 tasks with Dense(256) + ReLU towers and one output (MSE and BCE), batch 128 and
   1024, with per-example DSelect-k (k = 2, lambda = 0.1), per-example Top-k (k = 2) and static
   DSelect-k (k = 2, lambda = 0.1) gates;
3. the GEMM-only lower bound of that step: its necessary matrix products alone (every Dense
   forward and backward, the gates' linear maps, the static gates' mixing GEMM; no gate input
   gradient, which the step does not need), timed through dselectk.functional.dense_forward /
   dense_backward, so through the same vendored OpenBLAS. Reported as our step time / GEMM time,
   and as GFLOP/s beside the sgemm peak (a large square product, same BLAS and threads);
4. (``--workloads cnn``) one training step of the Multi-Fashion MNIST models (issue 6, Appendix
   D.2): the MMoE of 8 CNN experts with static softmax gates (the softmax MoE of Table 2: every
   expert computed) and the shared-bottom CNN, 36 x 36 images, towers 50 -> 50 -> 10, the sum of
   two softmax cross-entropies, Adam, batch 256; reported also as the time of an epoch of the
   paper's 100,000 training images (391 steps), with its GEMM-only bound as in 3 (convolutions as
   im2col GEMMs, see cnn_gemm_plan).

The PyTorch side is benchmarks/torch_models.py (the same models: tests/test_torch_parity.py checks
that outputs and gradients agree) with torch.optim.Adam (the fused CPU kernel where available).
Both libraries get the same thread count (dselectk.set_num_threads and torch.set_num_threads;
torch.set_num_interop_threads(1) once at start). dselectk is imported first: both then share the
libgomp that dselectk loads with its short spin-wait setting (see dselectk/__init__.py).

Timing: for each row the sides' timing blocks are interleaved (ABBA order) in one process; a block
runs the workload for about --block-time seconds, a short pause before each block lets the other
side's idle threads go to sleep, and the reported time is the median over --blocks blocks. The
ratios compare numbers measured in the same process run; absolute numbers depend on the machine
and its load. Without PyTorch installed the PyTorch columns say so and the rest still runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

import dselectk  # before torch: see the module docstring
from dselectk import functional as F
from dselectk.gates import DSelectK, TopK
from dselectk.models import MMoE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PEAK_N, cpu_model, fmt_load, gflops, interleaved, sgemm_peak  # noqa: E402
from bench_train_step import make_step  # noqa: E402

try:
    import torch
except ImportError:  # the PyTorch rows are skipped
    torch = None

if torch is not None:
    import torch_models as tm

P_GATE, K_GATE, B_GATE, LAM = 64, 4, 4096, 0.1
K_COMET, N_COMET = 2, (8, 16, 64)
STEP_GATES = {  # label: the MMoE's gate
    "DSelect-k per-example": DSelectK(2, entropy_reg=0.1, per_example=True),
    "Top-k per-example": TopK(2, per_example=True),
    "DSelect-k static": DSelectK(2, entropy_reg=0.1, per_example=False),
}
INPUT, N_EXPERTS, UNITS, TOWER, N_TASKS = 128, 8, 256, 256, 2


# --- timing (interleaved blocks: see _common.py) -------------------------------------------------

def set_threads(n):
    dselectk.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


# --- workload 1: the gate alone -----------------------------------------------------------------

def _torch_gate_side(gate, params, x, dw, ours, what):
    """theirs: the PyTorch gate's forward + backward of <dw, w> + its regularizer, with ``params``
    ({name: array}) copied in; checked against ours() (forward, every parameter gradient, dx)
    before anything is timed."""
    with torch.no_grad():
        for name, v in params.items():
            getattr(gate, name).copy_(torch.from_numpy(v))
    xt, dwt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dw)

    def theirs():
        xt.grad = None
        gate.zero_grad(set_to_none=True)
        w = gate(xt)
        ((w * dwt).sum() + gate.reg).backward()
        return w

    w_ours, g_ours = ours()
    w_theirs = theirs()
    _check_close(w_ours, w_theirs.detach().numpy(), f"{what} forward")
    for name in params:
        _check_close(g_ours[name], getattr(gate, name).grad.numpy(), f"{what} d{name}")
    _check_close(g_ours["x"], xt.grad.numpy(), f"{what} dx")
    return theirs


def gate_workload(n, rng):
    """(ours, theirs or None) callables for the per-example DSelect-k forward + backward."""
    m, p, k, B = F.n_bits(n), P_GATE, K_GATE, B_GATE
    x = rng.standard_normal((B, p)).astype(np.float32)
    params = dict(G=rng.uniform(-0.05, 0.05, (k, p)), b_G=rng.uniform(-0.05, 0.05, k),
                  W=rng.uniform(-1 / 8, 1 / 8, (k, m, p)),  # z spread over the fractional region and beyond
                  b_W=rng.uniform(-1 / 4, 1 / 4, (k, m)))
    params = {name: v.astype(np.float32) for name, v in params.items()}
    dw = rng.standard_normal((B, n)).astype(np.float32)

    def ours():
        w, cache = F.dselect_k_per_example_forward(x, *params.values(), n, 1.0)
        return w, F.dselect_k_per_example_backward(dw, cache, lam=LAM)

    if torch is None:
        return ours, None
    gate = tm.DSelectKGate(n, k, 1.0, entropy_reg=LAM, per_example=True, input_dim=p)
    return ours, _torch_gate_side(gate, params, x, dw, ours, "gate")


def comet_gate_workload(n, rng):
    """(ours, theirs or None) callables for the per-example COMET forward + backward (k trees)."""
    p, k, B = P_GATE, K_COMET, B_GATE
    x = rng.standard_normal((B, p)).astype(np.float32)
    params = dict(U=rng.uniform(-0.05, 0.05, (k, n, p)), b_U=rng.uniform(-0.05, 0.05, (k, n)),
                  W=rng.uniform(-1 / 8, 1 / 8, (k, n - 1, p)),  # z over the fractional region and beyond
                  b_W=rng.uniform(-1 / 4, 1 / 4, (k, n - 1)))
    params = {name: v.astype(np.float32) for name, v in params.items()}
    dw = rng.standard_normal((B, n)).astype(np.float32)

    def ours():
        w, cache = F.comet_per_example_forward(x, *params.values(), 1.0)
        return w, F.comet_per_example_backward(dw, cache, lam=LAM)

    if torch is None:
        return ours, None
    gate = tm.CometGate(n, k, 1.0, entropy_reg=LAM, per_example=True, input_dim=p)
    return ours, _torch_gate_side(gate, params, x, dw, ours, "COMET")


def _check_close(a, b, what, tol=1e-4):
    err = float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))
    if err > tol:
        raise AssertionError(f"{what}: dselectk and PyTorch differ (relative error {err:.2e}); not timing")


# --- workload 2: the MMoE training step ---------------------------------------------------------

def our_training_step(model, X, Y, lr=1e-4):
    """A callable: one training step of the dselectk model (forward, task losses, backward, Adam)."""
    return make_step(model, dselectk.optim.Adam(model.slab.data, model.slab.grad, lr=lr), X, Y)


def step_data(batch, rng):
    X = rng.standard_normal((batch, INPUT)).astype(np.float32)
    Y = [rng.standard_normal((batch, 1)).astype(np.float32), (rng.random((batch, 1)) < 0.5).astype(np.float32)]
    return X, Y


def step_workload(gate, X, Y):
    """(ours, theirs or None, adam variant) callables for one training step of an MMoE with ``gate``."""
    model = MMoE(INPUT, n_tasks=N_TASKS, n_experts=N_EXPERTS, expert_units=(UNITS,), tower_units=(TOWER,),
                 task_losses=["mse", "bce"], seed=0, gate=gate)
    tmodel = tm.from_dselectk(model) if torch is not None else None
    if tmodel is not None:  # same outputs before anything is timed
        outs = model.forward(X, training=True)
        with torch.no_grad():
            touts = tmodel(torch.from_numpy(X))
        for o, to in zip(outs, touts):
            _check_close(o, to.numpy(), "MMoE forward")
    ours = our_training_step(model, X, Y)
    if tmodel is None:
        return ours, None, None
    topt = tm.make_adam(tmodel, lr=1e-4)
    Xt, Yt = torch.from_numpy(X), [torch.from_numpy(y) for y in Y]

    def theirs():
        topt.zero_grad(set_to_none=True)
        total, _ = tmodel.loss(tmodel(Xt), Yt)
        total.backward()
        topt.step()

    return ours, theirs, topt.variant


# --- workload 4: the Multi-Fashion MNIST CNN models -------------------------------------------

CNN_BATCH, CNN_EPOCH_STEPS = 256, -(-100_000 // 256)


def cnn_workload(name, rng):
    """(ours, theirs or None, our model) training steps of multi_mnist.build_model(name) and its torch twin."""
    from dselectk.experiments.multi_mnist import build_model

    model = build_model(name, (1, 36, 36), seed=0)
    X = rng.random((CNN_BATCH, 1, 36, 36), dtype=np.float32)
    labels = [rng.integers(0, 10, CNN_BATCH) for _ in range(2)]
    ours = our_training_step(model, X, labels)
    if torch is None:
        return ours, None, model
    tmodel = tm.cnn_from_dselectk(model)
    Xt, Yt = torch.from_numpy(X), [torch.from_numpy(y) for y in labels]
    with torch.no_grad():
        for o, to in zip(model.forward(X), tmodel(Xt)):
            _check_close(o, to.numpy(), f"{name} CNN forward")
    topt = tm.make_adam(tmodel, lr=1e-4)

    def theirs():
        topt.zero_grad(set_to_none=True)
        tmodel.loss(tmodel(Xt), Yt).backward()
        topt.step()

    return ours, theirs, model


# --- workload 3: the step's GEMMs alone ---------------------------------------------------------

def gemm_plan(batch, gate):
    """The step's necessary matrix products as Dense calls (rows, in, out, need_dx, bias):
    forward y = x W (+ b) and backward dW += x^T dy (+ db), dx = dy W^T when need_dx."""
    B, plan = batch, []
    plan += [(B, INPUT, UNITS, False, True)] * N_EXPERTS  # experts: input gradient not needed
    plan += [(B, UNITS, TOWER, True, True), (B, TOWER, 1, True, True)] * N_TASKS  # towers
    if gate.per_example:
        if gate.kind == "dselect_k":  # alpha = x G^T + b_G and Z = x W^T + b_W, per task
            k, m = gate.k, F.n_bits(N_EXPERTS)
            plan += [(B, INPUT, k, False, True), (B, INPUT, k * m, False, True)] * N_TASKS
        else:  # Top-k logits x A^T + b
            plan += [(B, INPUT, N_EXPERTS, False, True)] * N_TASKS
    else:  # the (T, n) x (n, B * d) mixing GEMM; its backward gives the gates' dW and the experts' df
        plan += [(N_TASKS, N_EXPERTS, B * UNITS, True, False)]
    return plan


def plan_flops(plan):
    """FLOPs of a Dense plan's products: 2 rows in out for the forward, as much for dW, and for dx."""
    return sum(2.0 * rows * i * o * (3 if need_dx else 2) for rows, i, o, need_dx, _ in plan)


def gemm_workload(plan, rng):
    """(callable, flops): the Dense plan's products, forward then backward, on random arrays."""
    arrays = []
    for rows, i, o, need_dx, bias in plan:
        arrays.append(dict(x=rng.standard_normal((rows, i)).astype(np.float32),
                           W=rng.standard_normal((i, o)).astype(np.float32) * 0.05,
                           b=np.zeros(o, np.float32) if bias else None,
                           dy=rng.standard_normal((rows, o)).astype(np.float32),
                           dW=np.zeros((i, o), np.float32), db=np.zeros(o, np.float32) if bias else None,
                           need_dx=need_dx))

    def gemms():  # without the NaN/Inf scans of the inputs, as inside the models' forward and backward
        with F.trusted_inputs():
            for a in arrays:
                F.dense_forward(a["x"], a["W"], a["b"])
            for a in reversed(arrays):
                F.dense_backward(a["dy"], a["x"], a["W"], a["dW"], a["db"], need_dx=a["need_dx"])

    return gemms, plan_flops(plan)


CONV_COL_ELEMS = 64 * 1024  # csrc/conv.h's DSK_CONV_COL_ELEMS: the convolution's workspace per group


def cnn_gemm_plan(model, batch, col_elems=CONV_COL_ELEMS):
    """The matrix products of one training step of a CNN model (MMoE with CNN experts, or the
    shared-bottom CNN), convolutions as im2col GEMMs: (kind, M, N, K, count) entries, C (M, N) =
    op(A) (M, K) op(B) (K, N), kind "nn", "nt" (B transposed) or "tn" (A transposed), computed
    ``count`` times. A convolution of F filters with patches of K = C KH KW entries over P output
    positions is, per group of G examples as csrc/conv.c forms them (the most that fit col_elems
    entries of workspace, (K + F) G P, at least 1), the forward (F, K) x (K, G P) (nn), the weight
    gradient (F, G P) x (G P, K) (nt) and, except for a first layer (no input gradient), the patch
    gradient (K, F) x (F, G P) (tn). A Dense layer (B, in) -> out is (B, out, in) forward (nn),
    (in, out, B) for dW (tn) and (B, in, out) for dx (nt), once each."""
    from dselectk.layers import CNNExpert, Conv2D, Dense, Flatten, MaxPool2D

    def module_plan(module, shape, first):
        plan = []
        for i, layer in enumerate(module.layers):
            need_dx = not (first and i == 0)
            if isinstance(layer, Conv2D):
                out = layer.output_shape(shape)
                K, P, Fn = layer.in_channels * layer.kernel[0] * layer.kernel[1], out[1] * out[2], layer.filters
                G = max(1, min(batch, col_elems // ((K + Fn) * P)))
                chunks, rest = divmod(batch, G)
                for g, count in ((G, chunks), (rest, 1 if rest else 0)):
                    if count:
                        plan += [("nn", Fn, g * P, K, count), ("nt", Fn, K, g * P, count)]
                        plan += [("tn", K, g * P, Fn, count)] if need_dx else []
                shape = out
            elif isinstance(layer, MaxPool2D):
                shape = layer.output_shape(shape)
            elif isinstance(layer, Dense):
                plan += [("nn", batch, layer.out_dim, layer.in_dim, 1), ("tn", layer.in_dim, layer.out_dim, batch, 1)]
                plan += [("nt", batch, layer.in_dim, layer.out_dim, 1)] if need_dx else []
                shape = (layer.out_dim,)
            elif isinstance(layer, Flatten):
                shape = (int(np.prod(shape)),)
        return plan, shape

    bodies = model.experts if hasattr(model, "experts") else [model.bottom]
    plan = []
    for body in bodies:
        assert isinstance(body, CNNExpert)
        plan += module_plan(body, body.input_shape, True)[0]
    for tower in model.towers:
        plan += module_plan(tower, (body.out_dim,), False)[0]
    return plan


def products_workload(plan, rng):
    """(callable, flops) of (kind, M, N, K, count) products: nn through functional.dense_forward
    (A B), nt through functional.linear (A B^T), tn through functional.dense_backward's weight
    gradient (A^T B, accumulated as in the step's backward)."""
    arrays = []
    for kind, M, N, K, count in plan:
        a = rng.standard_normal((M, K) if kind != "tn" else (K, M)).astype(np.float32)
        b = rng.standard_normal((K, N) if kind != "nt" else (N, K)).astype(np.float32)
        arrays.append((kind, a, b, np.zeros((M, N), np.float32), np.zeros((M, N), np.float32), count))

    def gemms():
        with F.trusted_inputs():
            for kind, a, b, c, w, count in arrays:
                for _ in range(count):
                    if kind == "nn":
                        F.dense_forward(a, b, out=c)
                    elif kind == "nt":
                        F.linear(a, b, out=c)
                    else:
                        F.dense_backward(b, a, w, c, need_dx=False)  # c += a^T b (w: its shape only)

    return gemms, sum(2.0 * M * N * K * count for _, M, N, K, count in plan)


# --- report ---------------------------------------------------------------------------------------

def _fmt_rate(x):
    return "n/a" if x is None else f"{x:,.0f}"


def _fmt_ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (few, short blocks): numbers are rough")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--blocks", type=int, default=None, help="timing blocks per side (default 7, --quick 3)")
    ap.add_argument("--block-time", type=float, default=None,
                    help="seconds per timing block (default 0.3, --quick 0.02)")
    ap.add_argument("--workloads", nargs="+", choices=["gate", "comet", "step", "cnn"],
                    default=["gate", "comet", "step"],
                    help="cnn (the Multi-Fashion MNIST models) is not in the default set: its steps take seconds")
    ap.add_argument("--out", help="also write the Markdown report to this file")
    args = ap.parse_args(argv)
    blocks = args.blocks or (3 if args.quick else 7)
    block_time = args.block_time or (0.02 if args.quick else 0.3)
    pause = 0.05 if args.quick else 0.2
    if torch is not None:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or inter-op work already started
            pass

    lines = []

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    info = dselectk.build_info()
    out("# dselectk vs PyTorch (CPU)")
    out()
    out(f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs visible; Python {platform.python_version()}")
    out(f"- dselectk {dselectk.__version__}: openmp={info['openmp']}, BLAS={info['blas']}")
    if torch is None:
        out("- PyTorch: not installed, PyTorch columns skipped (pip install torch to fill them)")
    else:
        out(f"- PyTorch {torch.__version__}, interop threads {torch.get_num_interop_threads()}")
    out(f"- float32; median of {blocks} interleaved blocks of ~{block_time:g} s per side"
        f"{' (--quick: rough numbers)' if args.quick else ''}; threads pinned to the same count on both sides")
    out("- ours/PyTorch = dselectk examples/s divided by PyTorch examples/s, in this process run (> 1: dselectk faster)")
    out("- load = the 1-minute load average after the row (processes running or waiting for a CPU; the machine's "
        "CPU count is above)")
    out()
    rng = np.random.default_rng(0)
    results = {"gate": [], "comet": [], "step": [], "cnn": []}

    gate_sections = (("gate", f"Per-example DSelect-k gate, forward + backward (B={B_GATE}, p={P_GATE}, k={K_GATE}, "
                               f"lambda={LAM})", (8, 32, 128), gate_workload),
                     ("comet", f"Per-example COMET gate, forward + backward (B={B_GATE}, p={P_GATE}, k={K_COMET} trees, "
                               f"lambda={LAM})", N_COMET, comet_gate_workload))
    for key, title, ns, workload in gate_sections:
        if key not in args.workloads:
            continue
        out(f"## {title}")
        out()
        out("| n | threads | dselectk ex/s | PyTorch ex/s | ours/PyTorch | load |")
        out("|---:|---:|---:|---:|---:|---:|")
        for n in ns:
            ours, theirs = workload(n, rng)
            for threads in args.threads:
                set_threads(threads)
                fns = {"ours": ours} if theirs is None else {"ours": ours, "theirs": theirs}
                t = interleaved(fns, blocks, block_time, pause)
                r_ours = B_GATE / t["ours"]
                r_theirs = B_GATE / t["theirs"] if "theirs" in t else None
                results[key].append(dict(n=n, threads=threads, ours=r_ours, theirs=r_theirs))
                out(f"| {n} | {threads} | {_fmt_rate(r_ours)} | {_fmt_rate(r_theirs)} | {_fmt_ratio(r_ours, r_theirs)} | "
                    f"{fmt_load()} |")
        out()

    peak, peak_flops = sgemm_peak()
    if "step" in args.workloads:
        variant = None
        out(f"## MMoE training step ({N_EXPERTS} experts Dense({UNITS}), {N_TASKS} tasks, input {INPUT}, "
            f"towers Dense({TOWER}) -> 1, MSE + BCE, Adam)")
        out()
        out("step/GEMM = our step time / the time of its matrix products alone (same shapes, same BLAS). "
            "GEMM bound = PyTorch's step time / that GEMM time: the largest ours/PyTorch any implementation "
            "of the step on this BLAS could reach (all non-GEMM work free). GFLOP/s: the FLOPs of those "
            "products (the dense model's: a step that skips experts by conditional computation does fewer) per "
            "second of our step and of the products alone, beside the sgemm peak: a "
            f"{PEAK_N} x {PEAK_N} x {PEAK_N} float32 product through the same BLAS at the same thread count, "
            "timed in the same interleaved blocks.")
        out()
        out("| gate | batch | threads | dselectk ex/s | PyTorch ex/s | ours/PyTorch | our step ms | GEMM ms "
            "| step/GEMM | GEMM bound | step GFLOP/s | GEMM GFLOP/s | sgemm peak GFLOP/s | load |")
        out("|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for batch in (128, 1024):
            X, Y = step_data(batch, rng)
            for label, gate in STEP_GATES.items():
                ours, theirs, variant = step_workload(gate, X, Y)
                gemms, flops = gemm_workload(gemm_plan(batch, gate), rng)
                for threads in args.threads:
                    set_threads(threads)
                    fns = {"ours": ours, "gemm": gemms, "peak": peak}
                    if theirs is not None:
                        fns["theirs"] = theirs
                    t = interleaved(fns, blocks, block_time, pause)
                    r_ours = batch / t["ours"]
                    r_theirs = batch / t["theirs"] if "theirs" in t else None
                    results["step"].append(dict(gate=label, batch=batch, threads=threads, ours=r_ours,
                                                theirs=r_theirs, step_s=t["ours"], gemm_s=t["gemm"],
                                                theirs_s=t.get("theirs"), peak_s=t["peak"], flops=flops))
                    out(f"| {label} | {batch} | {threads} | {_fmt_rate(r_ours)} | {_fmt_rate(r_theirs)} | "
                        f"{_fmt_ratio(r_ours, r_theirs)} | {t['ours'] * 1e3:.2f} | {t['gemm'] * 1e3:.2f} | "
                        f"{t['ours'] / t['gemm']:.2f} | "
                        f"{'n/a' if 'theirs' not in t else format(t['theirs'] / t['gemm'], '.2f')} | "
                        f"{gflops(flops, t['ours']):.1f} | {gflops(flops, t['gemm']):.1f} | "
                        f"{gflops(peak_flops, t['peak']):.1f} | {fmt_load()} |")
        out()
        if variant is not None:
            out(f"PyTorch optimizer: torch.optim.Adam ({variant}).")
            out()

    if "cnn" in args.workloads:
        out(f"## Multi-Fashion MNIST models, training step (batch {CNN_BATCH}, 36 x 36 images, Adam)")
        out()
        out(f"epoch = {CNN_EPOCH_STEPS} steps (100,000 images), from the median step time. GEMM ms: the step's "
            "matrix products alone, convolutions as the im2col GEMMs of dselectk's kernel (groups of examples "
            "that fit its workspace; cnn_gemm_plan), through the same BLAS; step/GEMM and GFLOP/s as in the MMoE "
            "table.")
        out()
        out("| model | threads | our step ms | PyTorch step ms | ours/PyTorch | GEMM ms | step/GEMM | GEMM bound "
            "| step GFLOP/s | GEMM GFLOP/s | sgemm peak GFLOP/s | our epoch s | PyTorch epoch s | load |")
        out("|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, name in (("MMoE, 8 CNN experts, softmax gates", "softmax"), ("shared-bottom CNN", "shared_bottom")):
            ours, theirs, model = cnn_workload(name, rng)
            gemms, flops = products_workload(cnn_gemm_plan(model, CNN_BATCH), rng)
            for threads in args.threads:
                set_threads(threads)
                fns = {"ours": ours, "gemm": gemms, "peak": peak}
                if theirs is not None:
                    fns["theirs"] = theirs
                t = interleaved(fns, blocks, block_time, pause)
                mine, tt, tg = t["ours"], t.get("theirs"), t["gemm"]
                results["cnn"].append(dict(model=name, threads=threads, ours_s=mine, theirs_s=tt, gemm_s=tg,
                                           peak_s=t["peak"], flops=flops))
                theirs_ms, theirs_epoch, ratio, bound = (("n/a",) * 4 if tt is None else
                                                         (f"{tt * 1e3:.0f}", f"{tt * CNN_EPOCH_STEPS:.0f}",
                                                          f"{tt / mine:.2f}", f"{tt / tg:.2f}"))
                out(f"| {label} | {threads} | {mine * 1e3:.0f} | {theirs_ms} | {ratio} | {tg * 1e3:.0f} | "
                    f"{mine / tg:.2f} | {bound} | {gflops(flops, mine):.1f} | {gflops(flops, tg):.1f} | "
                    f"{gflops(peak_flops, t['peak']):.1f} | {mine * CNN_EPOCH_STEPS:.0f} | {theirs_epoch} | "
                    f"{fmt_load()} |")
        out()

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
