"""Demos: ``dselectk demo`` trains multi-task MoE models (run_mmoe); ``dselectk demo --gates``
runs the gate-only experiment (run).

Gate-only demo: can a gate find which experts generated the data?

Sixteen fixed random experts f_j(x) = tanh(x V_j) map x in R^10 to R^4. The targets are
y = sum_j w*_j f_j(x) + noise with w* nonzero on k = 2 experts only. A static gate is trained by
Adam on the squared error to recover w*: DSelect-k (with its entropy regularizer) and Top-k, the
gate it is compared with in the paper. Everything runs through the C kernels of this package:
the gate forward/backward and the mixing of the experts (dselectk.functional.mix_experts).
"""
from __future__ import annotations

import time

import numpy as np

from . import functional as F
from .gates import DSelectK, DSelectKGate, TopK, TopKGate


class _Adam:
    """Textbook Adam (Kingma and Ba) over a dict of parameters; the trainer's C optimizers
    replace this in the MoE models."""

    def __init__(self, params, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, beta1, beta2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads):
        self.t += 1
        for k, p in self.params.items():
            g = grads[k]
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            mhat = self.m[k] / (1 - self.b1 ** self.t)
            vhat = self.v[k] / (1 - self.b2 ** self.t)
            p -= self.lr * mhat / (np.sqrt(vhat) + self.eps)


def make_problem(n=16, true_experts=(3, 11), true_weights=(0.6, 0.4), p=10, d=4, N=2048, noise=0.01, seed=0):
    """Expert outputs f (n, N, d) and targets y (N, d) from the fixed mixture w*."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, p))
    V = rng.standard_normal((n, p, d)) / np.sqrt(p)
    f = np.tanh(np.einsum("np,jpd->jnd", x, V))  # (n, N, d)
    w_true = np.zeros(n)
    w_true[list(true_experts)] = true_weights
    y = F.mix_experts(f, w_true) + noise * rng.standard_normal((N, d))
    return f, y, w_true


def train_gate(gate, f, y, steps=800, lr=0.02, log_every=0, out=print):
    """Adam on 0.5 * mean squared error of y - sum_j w_j f_j, plus the gate's regularizer."""
    opt = _Adam(gate.params, lr=lr)
    N = y.shape[0]
    binary_step = None
    for step in range(1, steps + 1):
        gate.zero_grad()
        w = gate.forward()
        resid = F.mix_experts(f, w) - y  # (N, d)
        loss = 0.5 * float(np.mean(np.sum(resid * resid, axis=1)))
        dw, _ = F.mix_experts_backward(resid / N, f, w)
        gate.backward(dw)
        opt.step(gate.grads)
        if binary_step is None and getattr(gate, "is_binary", lambda: False)():
            binary_step = step
        if log_every and (step % log_every == 0 or step == 1):
            out(f"  step {step:4d}  loss {loss:.5f}  selected {gate.selected_experts().tolist()}")
    return loss, binary_step


def run(steps=800, lr=0.02, seed=0, out=print):
    f, y, w_true = make_problem(seed=seed)
    truth = np.flatnonzero(w_true).tolist()
    out(f"16 experts, the data mixes experts {truth} with weights {w_true[truth].tolist()}")
    results = {}
    for name, gate in (
        ("DSelect-k", DSelectKGate(16, k=2, gamma=1.0, entropy_reg=0.02, seed=seed, dtype=np.float64)),
        ("Top-k", TopKGate(16, k=2, seed=seed, dtype=np.float64)),
    ):
        out(f"\n{name} (static, k = 2):")
        t0 = time.perf_counter()
        loss, binary_step = train_gate(gate, f, y, steps=steps, lr=lr, log_every=steps // 4, out=out)
        w = gate.forward()
        sel = gate.selected_experts().tolist()
        out(f"  final loss {loss:.5f}; selected experts {sel} with weights {np.round(w[sel], 3).tolist()}; "
            f"{len(set(sel) & set(truth))}/{len(truth)} true experts found; {time.perf_counter() - t0:.2f} s")
        if binary_step is not None:
            out(f"  S(Z) became binary at step {binary_step}: from then on exactly sparse")
        results[name] = dict(loss=loss, selected=sel, binary_step=binary_step)
    return results


def make_multitask_problem(n_tasks=4, p=12, N=12000, noise=0.05, seed=0):
    """Tasks in two groups of two, in the spirit of the paper's Appendix C.2: each group has its own
    4 random ReLU experts (each the sum of 4 ReLU units with N(0, 1) weights), task t outputs
    sum_i softmax(alpha_t)_i f_i(x) with alpha_t correlated (0.8) within the group. Returns X (N, p)
    and a list of (N,) targets, standardized per task."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, p)).astype(np.float32)
    Y = []
    for group in range(n_tasks // 2):
        units = rng.standard_normal((4, p, 4))  # 4 experts of 4 ReLU units
        f = np.maximum(np.einsum("np,eph->enh", X, units), 0).sum(axis=2)  # (4 experts, N)
        cov = np.full((2, 2), 0.8) + 0.2 * np.eye(2)
        alphas = rng.multivariate_normal(np.zeros(2), cov, size=4).T  # (2 tasks, 4)
        for a in alphas:
            w = np.exp(a) / np.exp(a).sum()
            y = w @ f + noise * rng.standard_normal(N)
            Y.append(((y - y.mean()) / y.std()).astype(np.float32))
    return X, Y


def run_mmoe(epochs=12, seed=0, out=print):
    """Train an MMoE with static DSelect-k gates and one with static Top-k gates on 4 related-in-pairs
    tasks; print per-task test MSE, the experts each task selected, and the wall time."""
    from .models import MMoE
    from .trainer import evaluate, fit

    X, Y = make_multitask_problem(seed=seed)
    n_train, n_val = 8000, 2000
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    T = len(Y)
    out(f"{T} regression tasks (tasks 0-1 share one group of generating experts, 2-3 another); "
        f"{n_train} train / {n_val} validation / {X.shape[0] - n_train - n_val} test examples")
    results = {}
    for name, gate in (("DSelect-k", DSelectK(2, gamma=1.0, entropy_reg=0.1)), ("Top-k", TopK(2))):
        model = MMoE(X.shape[1], n_tasks=T, n_experts=8, expert_units=(32,), tower_units=(16,), task_losses="mse",
                     gate=gate, seed=seed)
        t0 = time.perf_counter()
        hist = fit(model, X[tr], [y[tr] for y in Y], epochs=epochs, batch_size=128, lr=3e-3,
                   validation_data=(X[va], [y[va] for y in Y]), early_stopping_patience=4, verbose=0, seed=seed)
        wall = time.perf_counter() - t0
        test = evaluate(model, X[te], [y[te] for y in Y])
        model.forward(X[te][:1])
        selected = [np.flatnonzero(w > 0).tolist() for w in model.gate_weights()]
        out(f"\n{name} MMoE (8 experts, static gates, k = 2): {len(hist.epochs)} epochs in {wall:.1f} s")
        out("  test MSE per task: " + ", ".join(f"{test[f'task{t}_mse']:.4f}" for t in range(T)))
        out("  experts selected per task: " + "; ".join(f"task {t}: {s}" for t, s in enumerate(selected)))
        if gate.kind == "dselect_k":
            out(f"  S(Z) binary after step (per task): {hist.binary_step} of {hist.total_steps}")
        results[name] = dict(test=test, selected=selected, wall=wall, binary_step=hist.binary_step)
    return results
