"""Tests of dselectk.datasets: the synthetic data of Appendices C.2 and C.3.2 and the
expert-selection metrics. Targets and labels are recomputed here from the returned parameters with
explicit loops, independently of the module's vectorised code."""
import itertools
import math

import numpy as np
import pytest

from dselectk import datasets as D

SMALL = dict(n_samples=300, split=(200, 60, 40))


def _small(n_tasks=16, **kw):
    args = dict(SMALL)
    args.update(kw)
    return D.synthetic_multitask(n_tasks, **args)


def _fields(d):
    return {"X_train": d.X_train, "X_val": d.X_val, "X_test": d.X_test, "alphas": d.alphas,
            "expert_weights": d.expert_weights, "Y_train": np.stack(d.Y_train), "Y_val": np.stack(d.Y_val),
            "Y_test": np.stack(d.Y_test), "groups": d.groups, "true_experts": d.true_experts}


# ------------------------------------------------------------------------ synthetic_multitask

def test_multitask_paper_sizes():
    d = D.synthetic_multitask(16)            # the paper's 140,000 x 10, 100k / 20k / 20k
    assert d.X_train.shape == (100_000, 10) and d.X_val.shape == (20_000, 10) and d.X_test.shape == (20_000, 10)
    assert len(d.Y_train) == len(d.Y_val) == len(d.Y_test) == 16
    assert d.Y_train[3].shape == (100_000,) and d.Y_val[3].shape == (20_000,) and d.Y_test[3].shape == (20_000,)
    assert d.n_tasks == 16 and d.n_groups == 1 and d.n_experts == 4
    assert d.noise == 0.0


@pytest.mark.parametrize("n_tasks,n_groups", [(16, 1), (32, 2), (64, 4), (128, 8)])
def test_multitask_shapes_dtypes_groups(n_tasks, n_groups):
    d = _small(n_tasks)
    assert d.X_train.shape == (200, 10) and d.X_val.shape == (60, 10) and d.X_test.shape == (40, 10)
    for X in (d.X_train, d.X_val, d.X_test):
        assert X.dtype == np.float32 and X.flags.c_contiguous
    for Ys, n in ((d.Y_train, 200), (d.Y_val, 60), (d.Y_test, 40)):
        assert isinstance(Ys, list) and len(Ys) == n_tasks
        assert all(y.dtype == np.float32 and y.shape == (n,) and np.all(np.isfinite(y)) for y in Ys)
    assert d.n_groups == n_groups and d.n_experts == n_tasks // 4      # T/4 generating experts
    np.testing.assert_array_equal(d.groups, np.arange(n_tasks) // 16)
    assert d.alphas.shape == (n_tasks, 4) and d.mixture_weights.shape == (n_tasks, 4)
    np.testing.assert_allclose(d.mixture_weights.sum(axis=1), 1.0, rtol=1e-12)
    assert d.expert_weights.shape == (n_groups, 4, 10, 4) and d.expert_weights.dtype == np.float32
    assert d.true_experts.shape == (n_tasks, 4)
    for t in range(n_tasks):
        g = t // 16
        assert list(d.true_experts[t]) == [4 * g, 4 * g + 1, 4 * g + 2, 4 * g + 3]
    # the three splits are disjoint rows of one matrix (no row repeated)
    allX = np.concatenate([d.X_train, d.X_val, d.X_test])
    assert np.unique(allX, axis=0).shape[0] == 300


def test_multitask_other_group_sizes():
    d = _small(12, tasks_per_group=3, experts_per_group=2, units_per_expert=5, p=7)
    assert d.n_groups == 4 and d.X_train.shape == (200, 7) and d.expert_weights.shape == (4, 2, 7, 5)
    np.testing.assert_array_equal(d.groups, np.repeat(np.arange(4), 3))
    np.testing.assert_array_equal(d.true_experts[7], [4, 5])


def test_multitask_deterministic_per_seed():
    a, b = _fields(_small(32, seed=5, noise=0.3)), _fields(_small(32, seed=5, noise=0.3))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_multitask_seeds_differ():
    a, b = _fields(_small(32, seed=0)), _fields(_small(32, seed=1))
    for k in ("X_train", "X_test", "alphas", "expert_weights", "Y_train", "Y_test"):
        assert not np.allclose(a[k], b[k]), k


def test_multitask_groups_differ_within_one_problem():
    d = _small(32)
    assert not np.allclose(d.expert_weights[0], d.expert_weights[1])
    assert not np.allclose(d.alphas[:16], d.alphas[16:])


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_multitask_nesting(noise):
    small, big = _small(16, seed=3, noise=noise), _small(64, seed=3, noise=noise)
    for part in ("X_train", "X_val", "X_test"):
        np.testing.assert_array_equal(getattr(small, part), getattr(big, part))
    for part in ("Y_train", "Y_val", "Y_test"):
        for t in range(16):
            np.testing.assert_array_equal(getattr(small, part)[t], getattr(big, part)[t])
    np.testing.assert_array_equal(small.alphas, big.alphas[:16])
    np.testing.assert_array_equal(small.expert_weights, big.expert_weights[:1])
    np.testing.assert_array_equal(small.true_experts, big.true_experts[:16])
    # and the 32-task problem is the first half of the 64-task one
    mid = _small(32, seed=3, noise=noise)
    np.testing.assert_array_equal(np.stack(mid.Y_test), np.stack(big.Y_test)[:32])


def test_alpha_correlation_within_and_across_groups():
    G, T = 300, 16
    d = D.synthetic_multitask(G * T, n_samples=3, split=(1, 1, 1))
    A = d.alphas.reshape(G, T, 4)                              # alpha[g, t, i]
    S = A.transpose(0, 2, 1).reshape(G * 4, T)                 # samples over (group, coordinate)
    C = np.cov(S, rowvar=False)
    np.testing.assert_allclose(np.diag(C), 1.0, atol=0.15)     # unit variances
    R = np.corrcoef(S, rowvar=False)
    off = R[~np.eye(T, dtype=bool)]
    assert abs(off.mean() - 0.8) < 0.03 and off.min() > 0.7 and off.max() < 0.9
    assert abs(S.mean()) < 0.1                                  # zero mean
    # the coordinates are independent of each other (within a task)
    Rc = np.corrcoef(A.reshape(G * T, 4), rowvar=False)
    assert np.abs(Rc[~np.eye(4, dtype=bool)]).max() < 0.1
    # across groups: task t of group g against task s of group g + 1
    across = [np.corrcoef(A[:-1, t, :].ravel(), A[1:, s, :].ravel())[0, 1] for t, s in [(0, 0), (3, 9), (15, 2)]]
    assert np.abs(across).max() < 0.1


def test_alpha_correlation_follows_argument():
    G, T = 300, 8
    d = D.synthetic_multitask(G * T, n_samples=3, split=(1, 1, 1), tasks_per_group=T, task_correlation=0.3)
    S = d.alphas.reshape(G, T, 4).transpose(0, 2, 1).reshape(G * 4, T)
    R = np.corrcoef(S, rowvar=False)
    assert abs(R[~np.eye(T, dtype=bool)].mean() - 0.3) < 0.05
    d1 = D.synthetic_multitask(8, n_samples=3, split=(1, 1, 1), tasks_per_group=8, task_correlation=1.0)
    np.testing.assert_allclose(d1.alphas, np.broadcast_to(d1.alphas[0], d1.alphas.shape))   # identical tasks


def _explicit_targets(X, d):
    """y_t(x) = sum_i softmax(alpha_t)_i sum_u relu(x . w_{g,i,u}), with loops."""
    X = X.astype(np.float64)
    out = []
    for t in range(d.n_tasks):
        g = int(d.groups[t])
        a = d.alphas[t]
        w = np.exp(a - a.max())
        w /= w.sum()
        y = np.zeros(X.shape[0])
        for i in range(d.expert_weights.shape[1]):
            f = np.zeros(X.shape[0])
            for u in range(d.expert_weights.shape[3]):
                f += np.maximum(X @ d.expert_weights[g, i, :, u].astype(np.float64), 0.0)
            y += w[i] * f
        out.append(y)
    return out


def test_multitask_targets_match_formula():
    d = _small(32, seed=7)
    for part, X in (("Y_train", d.X_train), ("Y_test", d.X_test)):
        for y, ref in zip(getattr(d, part), _explicit_targets(X, d)):
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # the experts are nonlinear (some units inactive) and the targets are not trivial
    assert 0.5 < np.std(d.Y_train[0]) and np.any(d.X_train @ d.expert_weights[0, 0] < 0)


def test_multitask_noise():
    clean = D.synthetic_multitask(16, n_samples=4000, split=(2000, 1000, 1000), seed=2)
    noisy = D.synthetic_multitask(16, n_samples=4000, split=(2000, 1000, 1000), seed=2, noise=0.5)
    np.testing.assert_array_equal(clean.X_train, noisy.X_train)
    r = np.stack(noisy.Y_train) - np.stack(clean.Y_train)
    assert abs(r.std() - 0.5) < 0.02 and abs(r.mean()) < 0.02
    assert abs(np.corrcoef(r[0], r[1])[0, 1]) < 0.1                  # independent across tasks


# ------------------------------------------------------------------------ gate_recovery

def _explicit_labels(X, r):
    X = X.astype(np.float64)
    h = np.zeros((X.shape[0], r.logistic_weights.shape[0]))
    for W, b in zip(r.expert_weights, r.expert_biases):
        h += np.maximum(X @ W.astype(np.float64) + b, 0.0)
    h /= len(r.expert_weights)
    z = h @ r.logistic_weights.astype(np.float64) + r.logistic_bias
    return (z > 0).astype(np.float32), z


def test_gate_recovery_shapes_and_labels():
    r = D.gate_recovery()
    assert r.X_train.shape == (10_000, 10) and r.X_val.shape == (10_000, 10)
    assert r.y_train.shape == (10_000,) and r.y_val.shape == (10_000,)
    for a in (r.X_train, r.X_val, r.y_train, r.y_val):
        assert a.dtype == np.float32
    assert set(np.unique(np.concatenate([r.y_train, r.y_val]))) == {0.0, 1.0}
    assert len(r.expert_weights) == 4 and all(W.shape == (10, 4) and W.dtype == np.float32 for W in r.expert_weights)
    assert len(r.expert_biases) == 4 and all(b.shape == (4,) and not b.any() for b in r.expert_biases)
    assert r.logistic_weights.shape == (4,) and r.logistic_bias == 0.0 and r.n_draws >= 1
    for X, y in ((r.X_train, r.y_train), (r.X_val, r.y_val)):
        ref, z = _explicit_labels(X, r)
        clear = np.abs(z) > 1e-4                     # away from the decision boundary
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(y[clear], ref[clear])
    # the experts are distinct and each one matters: averaging without it changes some labels
    X = r.X_train.astype(np.float64)
    for j in range(4):
        assert not any(np.array_equal(r.expert_weights[j], r.expert_weights[i]) for i in range(4) if i != j)
        h = sum(np.maximum(X @ W.astype(np.float64), 0.0) for i, W in enumerate(r.expert_weights) if i != j) / 3
        assert np.mean((h @ r.logistic_weights > 0) != (r.y_train > 0)) > 0.001


def test_gate_recovery_other_sizes():
    r = D.gate_recovery(n_samples=500, p=6, n_true_experts=3, units=5, split=(300, 200), seed=4)
    assert r.X_train.shape == (300, 6) and r.X_val.shape == (200, 6)
    assert len(r.expert_weights) == 3 and r.expert_weights[0].shape == (6, 5) and r.logistic_weights.shape == (5,)
    ref, _ = _explicit_labels(r.X_val, r)
    assert (ref == r.y_val).mean() > 0.99


def test_gate_recovery_balance_and_redraw():
    redrawn = []
    for seed in range(20):
        r = D.gate_recovery(n_samples=2000, split=(1000, 1000), seed=seed)
        frac = np.concatenate([r.y_train, r.y_val]).mean()
        assert 0.1 <= frac <= 0.9, (seed, frac)
        if r.n_draws > 1:
            redrawn.append(seed)
        else:   # a first draw that passed is what min_class_fraction=0 returns
            r0 = D.gate_recovery(n_samples=2000, split=(1000, 1000), seed=seed, min_class_fraction=0)
            np.testing.assert_array_equal(r0.y_train, r.y_train)
    assert redrawn, "the class-balance redraw never triggered in 20 seeds"
    r0 = D.gate_recovery(n_samples=2000, split=(1000, 1000), seed=redrawn[0], min_class_fraction=0)
    assert r0.n_draws == 1
    frac0 = np.concatenate([r0.y_train, r0.y_val]).mean()
    assert min(frac0, 1 - frac0) < 0.1                # the rejected first draw was unbalanced


def test_gate_recovery_deterministic_and_seeds_differ():
    a, b, c = (D.gate_recovery(n_samples=400, split=(200, 200), seed=s) for s in (3, 3, 8))
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    np.testing.assert_array_equal(a.logistic_weights, b.logistic_weights)
    for Wa, Wb in zip(a.expert_weights, b.expert_weights):
        np.testing.assert_array_equal(Wa, Wb)
    assert not np.allclose(a.X_train, c.X_train)
    assert not np.allclose(a.expert_weights[0], c.expert_weights[0])


def test_gate_recovery_x_is_standard_normal():
    r = D.gate_recovery()
    X = np.concatenate([r.X_train, r.X_val]).astype(np.float64)
    assert np.abs(X.mean(axis=0)).max() < 0.05 and np.abs(X.std(axis=0) - 1).max() < 0.05
    assert np.abs(np.corrcoef(X, rowvar=False) - np.eye(10)).max() < 0.05


# ------------------------------------------------------------------------ metrics

def test_jaccard_hand_cases():
    assert D.jaccard({0, 1, 2, 3}, {0, 1, 2, 3}) == 1.0
    assert D.jaccard({0, 1, 2, 3}, {4, 5, 6, 7}) == 0.0
    assert D.jaccard([0, 1, 2, 3], np.array([2, 3, 4, 5])) == pytest.approx(2 / 6)
    assert D.jaccard((1,), {1, 2, 3}) == pytest.approx(1 / 3)
    assert D.jaccard([1, 1, 2], [2]) == pytest.approx(1 / 2)       # duplicates ignored
    assert D.jaccard(set(), set()) == 1.0
    assert D.jaccard(set(), {3}) == 0.0
    assert D.jaccard(np.array([], dtype=np.int64), []) == 1.0


def test_task_pair_jaccard_hand_cases():
    selected = [{0, 1}, {0, 2}, {4, 5}, {4, 5}]
    groups = [0, 0, 1, 1]
    rel, unrel = D.task_pair_jaccard(selected, groups)
    # related pairs: (0,1): 1/3, (2,3): 1 ; unrelated: (0,2),(0,3),(1,2),(1,3) all 0
    assert rel == pytest.approx((1 / 3 + 1) / 2) and unrel == 0.0
    selected2 = [[0, 1], [1, 2], [2, 3]]
    rel, unrel = D.task_pair_jaccard(np.array(selected2), np.array([0, 1, 1]))
    # related: (1,2): 1/3 ; unrelated: (0,1): 1/3, (0,2): 0
    assert rel == pytest.approx(1 / 3) and unrel == pytest.approx(1 / 6)
    rel, unrel = D.task_pair_jaccard([{0}, {0}, {1}], [0, 0, 0])     # one group
    assert rel == pytest.approx(1 / 3) and math.isnan(unrel)
    rel, unrel = D.task_pair_jaccard([{0}, {0, 1}], [0, 1])          # no related pair
    assert math.isnan(rel) and unrel == 0.5


def test_task_pair_jaccard_on_true_experts():
    d = _small(32, n_samples=3, split=(1, 1, 1))
    rel, unrel = D.task_pair_jaccard(list(d.true_experts), d.groups)
    assert rel == 1.0 and unrel == 0.0       # the generating architecture: perfect recovery


def test_recovered_experts():
    assert D.recovered_experts({0, 1, 2, 3}, [0, 1, 2, 3]) == 4
    assert D.recovered_experts([3, 7, 9, 12], {0, 1, 2, 3}) == 1
    assert D.recovered_experts(np.array([4, 5, 6, 7]), np.arange(4)) == 0
    assert D.recovered_experts([], [1]) == 0
    assert isinstance(D.recovered_experts([1], [1]), int)


def test_expected_random_jaccard_small_cases():
    for n in (1, 4, 16, 128):
        assert D.expected_random_jaccard(n, n) == 1.0
        assert D.expected_random_jaccard(n, 1) == pytest.approx(1 / n, rel=1e-15)
    # n = 4, k = 2: P(i=2) = 1/6, P(i=1) = 4/6, P(i=0) = 1/6 -> 1/6 + 4/6 * 1/3 = 7/18
    assert D.expected_random_jaccard(4, 2) == pytest.approx(7 / 18, rel=1e-15)


@pytest.mark.parametrize("n,k", [(6, 3), (7, 2), (8, 4)])
def test_expected_random_jaccard_enumeration(n, k):
    subsets = list(itertools.combinations(range(n), k))
    exact = np.mean([D.jaccard(a, b) for a in subsets for b in subsets])
    assert D.expected_random_jaccard(n, k) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n", [16, 32])
def test_expected_random_jaccard_monte_carlo(n):
    rng = np.random.default_rng(0)
    M, k = 20_000, 4
    a = np.argsort(rng.random((M, n)), axis=1)[:, :k]
    b = np.argsort(rng.random((M, n)), axis=1)[:, :k]
    inter = (a[:, :, None] == b[:, None, :]).sum(axis=(1, 2))
    mc = inter / (2 * k - inter)
    se = mc.std() / np.sqrt(M)
    assert abs(D.expected_random_jaccard(n, k) - mc.mean()) < 4 * se


# ------------------------------------------------------------------------ bad arguments

BAD_MULTITASK = [
    (dict(n_tasks=24), ValueError),                      # not a multiple of 16
    (dict(n_tasks=0), ValueError),
    (dict(n_tasks=16.0), TypeError),
    (dict(n_tasks=True), TypeError),
    (dict(n_tasks="16"), TypeError),
    (dict(n_samples=0, split=(0, 0, 0)), ValueError),
    (dict(n_samples=300.5), TypeError),
    (dict(p=0), ValueError),
    (dict(p=None), TypeError),
    (dict(split=(200, 60)), ValueError),
    (dict(split=(200, 60, 41)), ValueError),             # does not sum to n_samples
    (dict(split=(0, 150, 150)), ValueError),             # empty training set
    (dict(split=(310, -10, 0)), ValueError),
    (dict(split=(200.0, 60, 40)), TypeError),
    (dict(split="200,60,40"), TypeError),
    (dict(split=300), TypeError),
    (dict(tasks_per_group=0), ValueError),
    (dict(experts_per_group=0), ValueError),
    (dict(units_per_expert=-1), ValueError),
    (dict(units_per_expert=2.5), TypeError),
    (dict(task_correlation=1.2), ValueError),
    (dict(task_correlation=-0.1), ValueError),
    (dict(task_correlation=float("nan")), ValueError),
    (dict(task_correlation="0.8"), TypeError),
    (dict(noise=-1.0), ValueError),
    (dict(noise=float("inf")), ValueError),
    (dict(noise=None), TypeError),
    (dict(seed=-1), ValueError),
    (dict(seed=1.5), TypeError),
    (dict(seed=None), TypeError),
]


@pytest.mark.parametrize("kw,exc", BAD_MULTITASK)
def test_multitask_bad_arguments(kw, exc):
    args = dict(n_tasks=16, **SMALL)
    args.update(kw)
    with pytest.raises(exc):
        D.synthetic_multitask(**args)


BAD_RECOVERY = [
    (dict(n_samples=1, split=(1, 0)), ValueError),
    (dict(n_samples=400.0), TypeError),
    (dict(p=0), ValueError),
    (dict(n_true_experts=0), ValueError),
    (dict(n_true_experts="4"), TypeError),
    (dict(units=0), ValueError),
    (dict(split=(200, 201)), ValueError),
    (dict(split=(200, 100, 100)), ValueError),
    (dict(split=(0, 400)), ValueError),
    (dict(split=None), TypeError),
    (dict(seed=-3), ValueError),
    (dict(seed="0"), TypeError),
    (dict(min_class_fraction=0.5), ValueError),
    (dict(min_class_fraction=-0.1), ValueError),
    (dict(min_class_fraction="0.1"), TypeError),
]


@pytest.mark.parametrize("kw,exc", BAD_RECOVERY)
def test_gate_recovery_bad_arguments(kw, exc):
    args = dict(n_samples=400, split=(200, 200))
    args.update(kw)
    with pytest.raises(exc):
        D.gate_recovery(**args)


@pytest.mark.parametrize("call,exc", [
    (lambda: D.jaccard("ab", {1}), TypeError),
    (lambda: D.jaccard({1}, 3), TypeError),
    (lambda: D.jaccard({1.5}, {1}), TypeError),
    (lambda: D.jaccard({-1}, {1}), ValueError),
    (lambda: D.jaccard(np.array([[1, 2]]), {1}), ValueError),
    (lambda: D.jaccard(np.array([1.0, 2.0]), {1}), TypeError),
    (lambda: D.task_pair_jaccard([{0}, {1}], [0]), ValueError),
    (lambda: D.task_pair_jaccard([{0}], [0]), ValueError),
    (lambda: D.task_pair_jaccard({0, 1}, [0, 1]), TypeError),
    (lambda: D.task_pair_jaccard([{0}, {1}], [0.0, 1.0]), TypeError),
    (lambda: D.task_pair_jaccard([{0}, {1}], np.array([[0, 1]])), ValueError),
    (lambda: D.task_pair_jaccard([{0}, "x"], [0, 1]), TypeError),
    (lambda: D.task_pair_jaccard(np.array([1, 2]), [0, 1]), ValueError),
    (lambda: D.task_pair_jaccard([{0}, {1}], "01"), TypeError),
    (lambda: D.expected_random_jaccard(4, 5), ValueError),
    (lambda: D.expected_random_jaccard(4, 0), ValueError),
    (lambda: D.expected_random_jaccard(0, 0), ValueError),
    (lambda: D.expected_random_jaccard(4.0, 2), TypeError),
    (lambda: D.expected_random_jaccard(4, True), TypeError),
    (lambda: D.recovered_experts({1}, None), TypeError),
    (lambda: D.recovered_experts([-2], [1]), ValueError),
])
def test_metric_bad_arguments(call, exc):
    with pytest.raises(exc):
        call()


def test_dataset_reprs_show_shapes_not_values(tmp_path):
    """The data-set dataclasses print their arrays as shapes and dtypes, not as (huge) values."""
    from dselectk import movielens

    synthetic = D.synthetic_multitask(4, n_samples=700, split=(500, 100, 100), tasks_per_group=2, seed=0)
    recovery = D.gate_recovery(n_samples=400, split=(300, 100), seed=0)
    ratings = movielens.ratings_from_arrays(np.repeat(np.arange(6), 5), np.tile(np.arange(5), 6),
                                            np.full(30, 4.0), np.arange(30))
    multitask = movielens.movielens_multitask(ratings, seed=0)
    for obj, shape in [(synthetic, "shape=(500, 10), dtype=float32"), (recovery, "shape=(300,"),
                       (multitask, "MultitaskSplit(X=ndarray(shape=("), (multitask.train, "dtype=int64")]:
        text = repr(obj)
        assert text.startswith(type(obj).__name__ + "(") and shape in text, text
        assert len(text) < 3000 and "array([" not in text and "..." not in text, text
