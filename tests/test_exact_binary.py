"""One exact notion of "binary" for the smooth-step gates, DSelect-k and COMET (issue #12).

S(t) is evaluated as v^2 (3 - 2v) and its mirror (csrc/smooth_step_impl.h): accurate relative to
min(S, 1 - S) at both ends, and saturated to exactly 0 or 1 (slope exactly 0) once min(S, 1 - S)
rounds to at most half the spacing of the reals below 1 (2^-25 in float32, 2^-54 in float64), so
that S == 0 exactly when 1 - S rounds to 1. Checked on constructed t against exact rational
arithmetic, and over long float32 training runs: a static gate that became binary under Adagrad
stays binary (its Z gets exactly no gradient) with at most k experts, and no S ever lies in
(0, 2^-25] or in [1 - 2^-25, 1), where S and 1 - S would disagree.
"""
from fractions import Fraction

import numpy as np
import pytest

import dselectk as dk
from dselectk import functional as F
from dselectk import trainer as T

SATURATION = {np.float32: 2.0**-25, np.float64: 2.0**-54}
GAMMAS = [0.5, 1.0, 10.0]


def exact_tail(t, gamma):
    """min(S(t), 1 - S(t)) in exact rational arithmetic, for the float t and gamma given."""
    t, g = Fraction(float(t)), Fraction(float(gamma))
    v = (g / 2 - abs(t)) / g
    if v <= 0:
        return Fraction(0)
    return v * v * (3 - 2 * v)


def near_ends(gamma, dtype, rng):
    """t at distances d = gamma * 10^-e (e = 1..15) and random d from both ends, inside and out."""
    d = np.concatenate([gamma * 10.0 ** -np.arange(1, 16), gamma * 10.0 ** rng.uniform(-15, -0.5, 200)])
    t = np.concatenate([-gamma / 2 + d, gamma / 2 - d, -gamma / 2 - d, gamma / 2 + d, [0.0, -gamma / 2, gamma / 2]])
    return t.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_smooth_step_is_accurate_and_saturates_at_both_ends(gamma, dtype):
    rng = np.random.default_rng(12)
    t = near_ends(gamma, dtype, rng)
    s = F.smooth_step(t, gamma)
    slope = F.smooth_step_backward(np.ones_like(t), t, gamma)
    eps, tol = np.finfo(dtype).eps, SATURATION[dtype]
    for ti, si, di in zip(t, s, slope):
        q = exact_tail(ti, dtype(gamma))
        exact = q if ti < 0 else 1 - q  # S(t)
        if q <= Fraction(tol) * (1 - Fraction(1, 10**6)):
            assert si == (0 if ti < 0 else 1) and di == 0, (ti, si, di, float(q))
        elif q > Fraction(tol) * (1 + Fraction(1, 10**6)):
            assert 0 < si < 1 and di > 0, (ti, si, di, float(q))
            # relative to S also near 0, where the former form's error was one rounding of 1
            rel = abs(Fraction(float(si)) - exact) / exact
            assert rel <= 2 * eps, (ti, si, float(q), float(rel))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_s_and_one_minus_s_agree(gamma, dtype):
    """S == 0 iff 1 - S rounds to 1; S == 1 iff 1 - S == 0; a saturated S has slope exactly 0."""
    rng = np.random.default_rng(5)
    t = np.concatenate([near_ends(gamma, dtype, rng), rng.uniform(-gamma, gamma, 20000).astype(dtype)])
    s = F.smooth_step(t, gamma)
    one = dtype(1)
    off = one - s  # in the working precision, as the selectors compute it
    assert np.array_equal(s == 0, off == 1)
    assert np.array_equal(s == 1, off == 0)
    slope = F.smooth_step_backward(np.ones_like(t), t, gamma)
    assert np.all(slope[(s == 0) | (s == 1)] == 0)
    assert np.all(slope[(s > 0) & (s < 1)] > 0)
    # symmetric: S(-t) = 1 - S(t) to one rounding
    np.testing.assert_allclose(F.smooth_step(-t, gamma).astype(np.float64), 1 - s.astype(np.float64),
                               rtol=0, atol=float(np.finfo(dtype).eps))


def _consistent(sz, dtype):
    """No entry of S(Z) where S and 1 - S disagree: none in (0, 2^-25] nor in [1 - 2^-25, 1)."""
    tol = SATURATION[dtype]
    return not np.any(((sz > 0) & (sz <= tol)) | ((sz < 1) & (sz >= 1 - tol)))


class _Watch:
    """Callback: after every training step, the gates' S(Z) of that step's forward."""

    def __init__(self, k):
        self.k, self.binary_since, self.steps, self.after_binary = k, {}, 0, 0

    def on_step_end(self, step, model):
        self.steps += 1
        for t, g in enumerate(model.gates):
            sz = g._gate_cache().sz
            assert _consistent(sz, np.float32), (step, t)
            w = g._last_w.reshape(-1, g.n_experts)
            if type(g).__name__ == "CometGate":  # each tree reaches one leaf
                reach = g._gate_cache().reach
                binary_rows = np.all((reach == 0) | (reach == 1), axis=(1, 2))
            else:  # S(Z) binary, per example (one row if static)
                binary_rows = np.all((sz == 0) | (sz == 1), axis=(1, 2))
            assert np.array_equal(binary_rows, [g.is_binary()]) or g.per_example
            assert np.all(np.count_nonzero(w[binary_rows], axis=1) <= self.k), (step, t)
            if g.per_example:
                continue
            if g.is_binary():
                self.binary_since.setdefault(t, step)
            if t in self.binary_since:  # Adagrad has no momentum and Z no gradient: it stays binary
                assert g.is_binary(), f"task {t}: binary at step {self.binary_since[t]}, not at step {step}"
                assert g.num_selected() <= self.k
                assert np.all(g.grads["Z"] == 0)
                self.after_binary += 1


@pytest.mark.parametrize("gate", ["dselect_k", "comet"])
@pytest.mark.parametrize("per_example", [False, True], ids=["static", "per_example"])
def test_long_float32_training_keeps_binary_gates_binary(per_example, gate):
    """MMoE in float32, Adagrad (as the MovieLens runs), strong entropy regularization: thousands of
    steps, each checked. With the former cubic, Z crept toward -gamma/2 with S flickering between 0
    and 2^-25 and a binary DSelect-k gate turned non-binary again (more than k experts selected).
    COMET's trees use the same smooth-step."""
    rng = np.random.default_rng(0)
    N, p, n, k = 2048, 8, 8, 2
    X = rng.standard_normal((N, p)).astype(np.float32)
    v1, v2 = rng.standard_normal(p), rng.standard_normal(p)
    Y = [np.tanh(X @ v1).astype(np.float32), (np.sin(X @ v2) > 0).astype(np.float32)]
    model = dk.MMoE(p, n_tasks=2, n_experts=n, expert_units=(8,), tower_units=(4,), task_losses=["mse", "bce"],
                    gate=gate, k=k, gamma=1.0, entropy_reg=1.0, per_example=per_example, seed=3,
                    dtype="float32")
    watch = _Watch(k)
    hist = T.fit(model, X, Y, epochs=40 if not per_example else 25, batch_size=32, optimizer="adagrad", lr=0.05,
                 verbose=0, seed=1, callbacks=[watch])
    assert watch.steps >= 1600
    if not per_example:
        assert all(s is not None for s in hist.binary_step), hist.binary_step
        assert watch.after_binary > 1000  # most of the run is checked after the gates became binary
