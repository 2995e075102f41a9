"""A small gate demo: can a gate find which experts generated the data?

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
from .gates import DSelectKGate, TopKGate


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
        ("DSelect-k", DSelectKGate(16, k=2, gamma=1.0, entropy_reg=0.02, seed=seed)),
        ("Top-k", TopKGate(16, k=2, seed=seed)),
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
