"""Tests of ``dselectk.metrics``.

* ROC AUC against a brute-force O(B^2) pair count written here (a tie counts 1/2, every
  (positive i, negative j) pair weighted w_i * w_j), on random data with many ties, weighted and
  unweighted, plus hand-computed small cases;
* accuracy for every documented form of ``y_pred`` (labels, (B, C) scores with ties, binary
  (B,) / (B, 1) probabilities and logits with ``threshold``);
* mse / rmse / mae against their direct formulas, weighted and unweighted;
* the registry, ``evaluate_tasks`` and every documented error case.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from dselectk import metrics as M
from dselectk.metrics import METRICS, accuracy, auc, evaluate_tasks, get_metric, log_loss, mae, mse, r2, rmse


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def auc_bruteforce(y, s, w=None):
    """O(B^2) pair count: sum over (pos i, neg j) of w_i w_j ([s_i > s_j] + [s_i == s_j] / 2)."""
    y = np.asarray(y).ravel()
    s = np.asarray(s).ravel()
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    num = 0.0
    den = 0.0
    for i in range(len(y)):
        if y[i] != 1:
            continue
        for j in range(len(y)):
            if y[j] != 0:
                continue
            pair = w[i] * w[j]
            den += pair
            if s[i] > s[j]:
                num += pair
            elif s[i] == s[j]:
                num += 0.5 * pair
    return num / den


def _random_binary(rng, B):
    """Labels with both classes present and scores rounded to one decimal (many ties)."""
    y = rng.integers(0, 2, B)
    y[0], y[1] = 0, 1
    rng.shuffle(y)
    s = np.round(rng.random(B), 1)
    return y, s


# ---------------------------------------------------------------------------------------------
# AUC
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("B", [2, 7, 60, 250])
def test_auc_matches_bruteforce_unweighted(seed, B):
    rng = np.random.default_rng(1000 * B + seed)
    y, s = _random_binary(rng, B)
    assert auc(y, s) == pytest.approx(auc_bruteforce(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("B", [2, 7, 60, 250])
def test_auc_matches_bruteforce_weighted(seed, B):
    rng = np.random.default_rng(7 + 1000 * B + seed)
    y, s = _random_binary(rng, B)
    w = rng.random(B) * 3.0
    w[rng.random(B) < 0.2] = 0.0  # some zero weights
    w[np.flatnonzero(y == 1)[0]] = 1.0  # keep both classes with positive weight
    w[np.flatnonzero(y == 0)[0]] = 1.0
    assert auc(y, s, sample_weight=w) == pytest.approx(auc_bruteforce(y, s, w), abs=1e-12)


def test_auc_weighted_differs_from_unweighted():
    # The weights must actually be used: here they change the answer.
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.6, 0.5, 0.9])
    w = np.array([1.0, 5.0, 1.0, 1.0])
    assert auc(y, s) == pytest.approx(0.75)
    assert auc(y, s, sample_weight=w) == pytest.approx(auc_bruteforce(y, s, w))
    assert auc(y, s, sample_weight=w) == pytest.approx((1 + 0 + 1 + 5) / (6 * 2))


def test_auc_integer_weights_equal_repeated_examples():
    rng = np.random.default_rng(3)
    y, s = _random_binary(rng, 40)
    w = rng.integers(1, 4, 40)
    assert auc(y, s, sample_weight=w) == pytest.approx(
        auc(np.repeat(y, w), np.repeat(s, w)), abs=1e-12)


def test_auc_perfect_inverted_all_tied():
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.8, 0.3, 0.9, 0.7, 0.2])
    assert auc(y, s) == 1.0
    assert auc(y, -s) == 0.0
    assert auc(y, np.full(6, 0.42)) == 0.5
    assert auc(y, np.full(6, 0.42), sample_weight=np.arange(1.0, 7.0)) == 0.5


def test_auc_hand_computed_with_ties():
    # pos scores 0.5, 0.9; neg scores 0.1, 0.5: pairs 1 + 1/2 + 1 + 1 = 3.5 of 4.
    assert auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    # Ties across a long run: 2 pos and 3 neg all at 0.3, one neg lower, one pos higher.
    y = [1, 1, 0, 0, 0, 0, 1]
    s = [0.3, 0.3, 0.3, 0.3, 0.3, 0.0, 1.0]
    # pairs: 3 pos x 4 neg = 12; top pos beats all 4; tied pos beat 0.0 (2) and tie 3 each (3).
    assert auc(y, s) == pytest.approx((4 + 2 + 3) / 12)


def test_auc_invariant_to_order_and_monotone_transform():
    rng = np.random.default_rng(11)
    y, s = _random_binary(rng, 80)
    perm = rng.permutation(80)
    ref = auc(y, s)
    assert auc(y[perm], s[perm]) == pytest.approx(ref, abs=1e-15)
    assert auc(y, np.exp(3 * s) - 7) == pytest.approx(ref, abs=1e-15)


def test_auc_accepts_column_vectors_lists_bool_and_float_labels():
    y = [0, 1, 1, 0, 1]
    s = [0.2, 0.4, 0.4, 0.9, 0.1]
    ref = auc_bruteforce(y, s)
    assert auc(y, s) == pytest.approx(ref)
    assert auc(np.array(y)[:, None], np.array(s)[:, None]) == pytest.approx(ref)
    assert auc(np.array(y, dtype=bool), s) == pytest.approx(ref)
    assert auc(np.array(y, dtype=np.float32), np.array(s, dtype=np.float32)) == pytest.approx(ref)
    assert isinstance(auc(y, s), float)


def test_auc_integer_scores_are_compared_exactly():
    # 2**53 and 2**53 + 1 are equal once cast to float64; the AUC must still see them differ.
    s = np.array([2**53, 2**53 + 1], dtype=np.int64)
    assert auc([0, 1], s) == 1.0
    assert auc([1, 0], s) == 0.0


def test_auc_negative_zero_ties_with_zero():
    assert auc([0, 1], np.array([0.0, -0.0])) == 0.5


def test_auc_large_input_is_fast_enough_and_exact():
    # O(B log B): 200k examples must run well inside the test budget; checked on grouped counts.
    rng = np.random.default_rng(5)
    B = 200_000
    y = rng.integers(0, 2, B)
    s = rng.integers(0, 10, B)  # 10 distinct scores
    pos = np.bincount(s[y == 1], minlength=10).astype(float)
    neg = np.bincount(s[y == 0], minlength=10).astype(float)
    expect = sum(pos[a] * (neg[:a].sum() + 0.5 * neg[a]) for a in range(10)) / (pos.sum() * neg.sum())
    assert auc(y, s) == pytest.approx(expect, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------

def test_accuracy_labels():
    assert accuracy([0, 1, 2, 2], [0, 2, 2, 1]) == 0.5
    assert accuracy(np.array([3, 3, 0]), np.array([3, 3, 0])) == 1.0
    assert accuracy([1, 0], np.array([True, True])) == 0.5  # bool predictions are labels
    assert accuracy(np.array([0.0, 2.0, 1.0]), np.array([0, 2, 2])) == pytest.approx(2 / 3)
    assert isinstance(accuracy([0, 1], [0, 1]), float)


def test_accuracy_class_scores_argmax():
    y = np.array([0, 1, 2, 1])
    logits = np.array([[2.0, 1.0, 0.0],
                       [0.0, 3.0, -1.0],
                       [0.5, 0.1, 0.2],   # predicts 0, wrong
                       [-1.0, 0.0, 5.0]])  # predicts 2, wrong
    assert accuracy(y, logits) == 0.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert accuracy(y, probs.astype(np.float32)) == 0.5


def test_accuracy_class_score_ties_go_to_lower_index():
    scores = np.array([[0.4, 0.4, 0.2],
                       [0.1, 0.45, 0.45],
                       [1.0, 1.0, 1.0]])
    assert accuracy([0, 1, 0], scores) == 1.0
    assert accuracy([1, 2, 2], scores) == 0.0


def test_accuracy_binary_probabilities_1d_and_column():
    y = np.array([1, 0, 1, 0, 1])
    p = np.array([0.9, 0.2, 0.4, 0.6, 0.51])  # predictions 1 0 0 1 1
    assert accuracy(y, p) == pytest.approx(3 / 5)
    assert accuracy(y, p[:, None]) == pytest.approx(3 / 5)
    assert accuracy(y, p, threshold=0.3) == pytest.approx(4 / 5)  # 1 0 1 1 1


def test_accuracy_binary_logits_with_threshold_zero():
    y = np.array([1, 0, 1, 0])
    logits = np.array([2.0, -1.0, -0.5, 0.3])  # predictions 1 0 0 1
    assert accuracy(y, logits, threshold=0.0) == 0.5
    assert accuracy(y, logits[:, None], threshold=0.0) == 0.5
    # With the default (probability) threshold the same logits give 1 0 0 0.
    assert accuracy(y, logits) == 0.75


def test_accuracy_score_equal_to_threshold_predicts_zero():
    assert accuracy([0, 1], [0.5, 0.5]) == 0.5
    assert accuracy([0, 0], [0.0, 0.0], threshold=0.0) == 1.0


def test_accuracy_threshold_ignored_for_labels_and_class_scores():
    assert accuracy([0, 1], [0, 1], threshold=0.9) == 1.0
    assert accuracy([0, 1], [[0.6, 0.4], [0.3, 0.7]], threshold=0.9) == 1.0


# ---------------------------------------------------------------------------------------------
# Regression metrics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(13,), (13, 1), (13, 4)])
def test_regression_metrics_match_formulas(shape):
    rng = np.random.default_rng(sum(shape))
    t = rng.normal(size=shape)
    p = rng.normal(size=shape)
    d = t - p
    assert mse(t, p) == pytest.approx(np.sum(d**2) / d.size, rel=1e-13)
    assert rmse(t, p) == pytest.approx(math.sqrt(np.sum(d**2) / d.size), rel=1e-13)
    assert mae(t, p) == pytest.approx(np.sum(np.abs(d)) / d.size, rel=1e-13)


@pytest.mark.parametrize("shape", [(9,), (9, 3)])
def test_regression_metrics_weighted_match_formulas(shape):
    rng = np.random.default_rng(42 + len(shape))
    t = rng.normal(size=shape)
    p = rng.normal(size=shape)
    w = rng.random(shape[0])
    w[2] = 0.0
    d = (t - p).reshape(shape[0], -1)
    per_sq = (d**2).mean(axis=1)
    per_abs = np.abs(d).mean(axis=1)
    assert mse(t, p, sample_weight=w) == pytest.approx((w * per_sq).sum() / w.sum(), rel=1e-13)
    assert rmse(t, p, sample_weight=w) == pytest.approx(
        math.sqrt((w * per_sq).sum() / w.sum()), rel=1e-13)
    assert mae(t, p, sample_weight=w) == pytest.approx((w * per_abs).sum() / w.sum(), rel=1e-13)
    # Weights must matter.
    assert mse(t, p, sample_weight=w) != pytest.approx(mse(t, p), rel=1e-6)


def test_regression_metrics_small_known_values_and_types():
    assert mse([1, 2, 3], [1, 2, 5]) == pytest.approx(4 / 3)
    assert rmse([0.0, 0.0], [3.0, 4.0]) == pytest.approx(math.sqrt(12.5))
    assert mae([[1, 2], [3, 4]], [[0, 2], [3, 7]]) == pytest.approx(1.0)
    assert mse([1.0], [1.0]) == 0.0
    # float32 inputs are accumulated in float64
    t = np.full(10, 0.1, dtype=np.float32)
    assert mse(t, np.zeros(10, np.float32)) == pytest.approx(float(np.float32(0.1)) ** 2, rel=1e-12)
    for f in (mse, rmse, mae):
        assert isinstance(f([1, 2], [2, 2]), float)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(9)
    y, s = _random_binary(rng, 30)
    w = rng.random(30)
    copies = [a.copy() for a in (y, s, w)]
    auc(y, s, sample_weight=w)
    accuracy(y, s)
    mse(s, w, sample_weight=w)
    mae(s, w)
    for a, c in zip((y, s, w), copies):
        np.testing.assert_array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# Registry and multi-task evaluation
# ---------------------------------------------------------------------------------------------

def test_metrics_registry_and_get_metric():
    assert METRICS == {"accuracy": accuracy, "auc": auc, "mse": mse, "rmse": rmse, "mae": mae, "log_loss": log_loss,
                       "r2": r2}
    for name, fn in METRICS.items():
        assert get_metric(name) is fn

    def custom(y_true, y_pred):
        return 0.0

    assert get_metric(custom) is custom


def test_get_metric_unknown_name_lists_names():
    with pytest.raises(ValueError, match="'f1'") as info:
        get_metric("f1")
    for name in METRICS:
        assert name in str(info.value)


@pytest.mark.parametrize("bad", [None, 3, ["auc"]])
def test_get_metric_bad_type(bad):
    with pytest.raises(TypeError, match="metric"):
        get_metric(bad)


def test_evaluate_tasks_values():
    y_cls = np.array([0, 1, 1, 0])
    p_cls = np.array([0.2, 0.7, 0.4, 0.1])
    y_reg = np.array([[1.0, 2.0], [3.0, 4.0]])
    p_reg = np.array([[1.0, 1.0], [3.0, 6.0]])

    def max_err(y_true, y_pred):
        return float(np.max(np.abs(np.asarray(y_true) - np.asarray(y_pred))))

    out = evaluate_tasks([y_cls, y_reg], (p_cls, p_reg),
                         [["auc", "accuracy"], ["mse", "rmse", "mae", max_err]])
    assert isinstance(out, list) and len(out) == 2
    assert list(out[0]) == ["auc", "accuracy"]
    assert out[0]["auc"] == pytest.approx(auc(y_cls, p_cls))
    assert out[0]["accuracy"] == pytest.approx(0.75)
    assert list(out[1]) == ["mse", "rmse", "mae", "max_err"]
    assert out[1]["mse"] == pytest.approx(5 / 4)
    assert out[1]["rmse"] == pytest.approx(math.sqrt(5 / 4))
    assert out[1]["mae"] == pytest.approx(3 / 4)
    assert out[1]["max_err"] == 2.0


def test_evaluate_tasks_empty_metric_list_gives_empty_dict():
    assert evaluate_tasks([[0, 1]], [[0, 1]], [[]]) == [{}]


@pytest.mark.parametrize("lists", [
    ([[0, 1], [0, 1]], [[0, 1]], [["accuracy"], ["accuracy"]]),
    ([[0, 1]], [[0, 1], [0, 1]], [["accuracy"]]),
    ([[0, 1]], [[0, 1]], [["accuracy"], ["mse"]]),
])
def test_evaluate_tasks_length_mismatch(lists):
    with pytest.raises(ValueError, match="lengths"):
        evaluate_tasks(*lists)


def test_evaluate_tasks_errors():
    with pytest.raises(ValueError, match="no tasks"):
        evaluate_tasks([], [], [])
    with pytest.raises(TypeError, match="y_true_list"):
        evaluate_tasks(np.array([[0, 1]]), [[0, 1]], [["accuracy"]])
    with pytest.raises(TypeError, match="y_pred_list"):
        evaluate_tasks([[0, 1]], None, [["accuracy"]])
    with pytest.raises(TypeError, match="metrics_per_task"):
        evaluate_tasks([[0, 1]], [[0, 1]], "accuracy")
    with pytest.raises(TypeError, match=r"metrics_per_task\[0\]"):
        evaluate_tasks([[0, 1]], [[0, 1]], ["accuracy"])
    with pytest.raises(ValueError, match=r"metrics_per_task\[1\].*'aucc'"):
        evaluate_tasks([[0, 1], [0, 1]], [[0, 1], [0.2, 0.8]], [["accuracy"], ["aucc"]])
    with pytest.raises(ValueError, match="twice"):
        evaluate_tasks([[0, 1]], [[0, 1]], [["mse", "mse"]])
    # An error inside a metric keeps its type and says which task and metric.
    with pytest.raises(ValueError, match=r"task 1, metric 'auc'.*only class 1"):
        evaluate_tasks([[0, 1], [1, 1]], [[0, 1], [0.2, 0.8]], [["accuracy"], ["auc"]])
    with pytest.raises(TypeError, match=r"task 0, metric 'mse'.*y_pred"):
        evaluate_tasks([[0.0, 1.0]], [["a", "b"]], [["mse"]])


# ---------------------------------------------------------------------------------------------
# Error cases of the metric functions
# ---------------------------------------------------------------------------------------------

Y2 = np.array([0, 1])
S2 = np.array([0.3, 0.7])

ERROR_CASES = [
    # ---- accuracy
    ("acc non-numeric y_true", accuracy, (["a", "b"], [0, 1]), {}, TypeError, "y_true"),
    ("acc None y_pred", accuracy, ([0, 1], None), {}, TypeError, "y_pred"),
    ("acc complex y_pred", accuracy, ([0, 1], np.array([1j, 0])), {}, TypeError, "y_pred"),
    ("acc ragged y_pred", accuracy, ([0, 1], [[0.1, 0.9], [0.5]]), {}, ValueError, "y_pred"),
    ("acc y_true 2-D", accuracy, ([[0], [1]], [0, 1]), {}, ValueError, "y_true"),
    ("acc y_true scalar", accuracy, (1, [1]), {}, ValueError, "y_true"),
    ("acc y_pred 3-D", accuracy, (Y2, np.zeros((2, 2, 2))), {}, ValueError, "y_pred"),
    ("acc length mismatch", accuracy, ([0, 1, 1], [0, 1]), {}, ValueError, "number of examples"),
    ("acc scores length mismatch", accuracy, ([0, 1, 1], np.zeros((2, 3))), {}, ValueError,
     "number of examples"),
    ("acc empty", accuracy, (np.array([], int), np.array([], int)), {}, ValueError, "empty"),
    ("acc zero classes", accuracy, (Y2, np.zeros((2, 0))), {}, ValueError, "y_pred.*empty"),
    ("acc NaN scores", accuracy, (Y2, [[0.1, np.nan], [0.2, 0.3]]), {}, ValueError, "y_pred.*NaN"),
    ("acc Inf binary scores", accuracy, (Y2, [0.1, np.inf]), {}, ValueError, "y_pred.*NaN or Inf"),
    ("acc NaN y_true", accuracy, ([0.0, np.nan], [0, 1]), {}, ValueError, "y_true.*NaN"),
    ("acc negative y_true", accuracy, ([0, -1], [0, 1]), {}, ValueError, "y_true.*>= 0"),
    ("acc non-integral y_true", accuracy, ([0.5, 1.0], [0, 1]), {}, ValueError, "y_true.*integ"),
    ("acc negative y_pred labels", accuracy, ([0, 1], [0, -2]), {}, ValueError, "y_pred.*>= 0"),
    ("acc label >= C", accuracy, ([0, 3], np.zeros((2, 3))), {}, ValueError, "y_true.*label 3"),
    ("acc multiclass label, binary scores", accuracy, ([0, 2], [0.1, 0.9]), {}, ValueError,
     "y_true.*0 or 1"),
    ("acc multiclass label, column scores", accuracy, ([0, 2], [[0.1], [0.9]]), {}, ValueError,
     "y_true.*0 or 1"),
    ("acc threshold str", accuracy, (Y2, S2), {"threshold": "0.5"}, TypeError, "threshold"),
    ("acc threshold bool", accuracy, (Y2, S2), {"threshold": True}, TypeError, "threshold"),
    ("acc threshold NaN", accuracy, (Y2, S2), {"threshold": float("nan")}, ValueError,
     "threshold"),
    # ---- auc
    ("auc non-numeric y_true", auc, (["0", "1"], S2), {}, TypeError, "y_true"),
    ("auc non-numeric y_score", auc, (Y2, ["a", "b"]), {}, TypeError, "y_score"),
    ("auc y_true 2-D wide", auc, (np.zeros((2, 2)), S2), {}, ValueError, "y_true"),
    ("auc y_score 2-D wide", auc, (Y2, np.zeros((2, 2))), {}, ValueError, "y_score"),
    ("auc length mismatch", auc, ([0, 1, 1], S2), {}, ValueError, "number of examples"),
    ("auc empty", auc, ([], []), {}, ValueError, "empty"),
    ("auc only positives", auc, ([1, 1, 1], [0.1, 0.2, 0.3]), {}, ValueError,
     "y_true.*only class 1"),
    ("auc only negatives", auc, ([0, 0], S2), {}, ValueError, "y_true.*only class 0"),
    ("auc label 2", auc, ([0, 2], S2), {}, ValueError, "y_true.*0 or 1"),
    ("auc label -1", auc, ([0, -1, 1], [0.1, 0.2, 0.3]), {}, ValueError, "y_true.*0 or 1"),
    ("auc label 0.5", auc, ([0, 0.5, 1], [0.1, 0.2, 0.3]), {}, ValueError, "y_true.*0 or 1"),
    ("auc NaN y_true", auc, ([0.0, np.nan, 1.0], [0.1, 0.2, 0.3]), {}, ValueError,
     "y_true.*NaN"),
    ("auc NaN score", auc, (Y2, [0.1, np.nan]), {}, ValueError, "y_score.*NaN"),
    ("auc -Inf score", auc, (Y2, [-np.inf, 0.1]), {}, ValueError, "y_score.*Inf"),
    ("auc weight shape", auc, (Y2, S2), {"sample_weight": [1.0, 1.0, 1.0]}, ValueError,
     "sample_weight.*shape"),
    ("auc weight 2-D", auc, (Y2, S2), {"sample_weight": [[1.0], [1.0]]}, ValueError,
     "sample_weight.*shape"),
    ("auc weight negative", auc, (Y2, S2), {"sample_weight": [1.0, -0.1]}, ValueError,
     "sample_weight.*non-negative"),
    ("auc weight NaN", auc, (Y2, S2), {"sample_weight": [1.0, np.nan]}, ValueError,
     "sample_weight.*NaN"),
    ("auc weight str", auc, (Y2, S2), {"sample_weight": ["1", "1"]}, TypeError, "sample_weight"),
    ("auc weights all zero", auc, (Y2, S2), {"sample_weight": [0.0, 0.0]}, ValueError,
     "sample_weight.*zero"),
    ("auc zero weight on positives", auc, ([0, 1, 0], [0.1, 0.2, 0.3]),
     {"sample_weight": [1.0, 0.0, 1.0]}, ValueError, "sample_weight.*class 1"),
    ("auc zero weight on negatives", auc, ([0, 1, 1], [0.1, 0.2, 0.3]),
     {"sample_weight": [0.0, 1.0, 1.0]}, ValueError, "sample_weight.*class 0"),
]

for _f in (mse, rmse, mae):
    _n = _f.__name__
    ERROR_CASES += [
        (f"{_n} non-numeric y_true", _f, (["a"], [1.0]), {}, TypeError, "y_true"),
        (f"{_n} None y_pred", _f, ([1.0], None), {}, TypeError, "y_pred"),
        (f"{_n} ragged y_true", _f, ([[1.0], [1.0, 2.0]], [[1.0], [2.0]]), {}, ValueError,
         "y_true"),
        (f"{_n} shape mismatch", _f, ([1.0, 2.0], [1.0, 2.0, 3.0]), {}, ValueError,
         "same shape"),
        (f"{_n} no broadcasting", _f, ([1.0, 2.0], [[1.0], [2.0]]), {}, ValueError, "same shape"),
        (f"{_n} 3-D", _f, (np.zeros((2, 2, 2)), np.zeros((2, 2, 2))), {}, ValueError, "y_true"),
        (f"{_n} scalar y_pred", _f, ([1.0], 1.0), {}, ValueError, "y_pred"),
        (f"{_n} empty", _f, ([], []), {}, ValueError, "y_true.*empty"),
        (f"{_n} empty columns", _f, (np.zeros((3, 0)), np.zeros((3, 0))), {}, ValueError,
         "empty"),
        (f"{_n} NaN y_true", _f, ([np.nan], [1.0]), {}, ValueError, "y_true.*NaN"),
        (f"{_n} Inf y_pred", _f, ([1.0], [np.inf]), {}, ValueError, "y_pred.*Inf"),
        (f"{_n} weight shape", _f, ([1.0, 2.0], [1.0, 2.0]), {"sample_weight": [1.0]},
         ValueError, "sample_weight.*shape"),
        (f"{_n} weight negative", _f, ([1.0, 2.0], [1.0, 2.0]), {"sample_weight": [1.0, -1.0]},
         ValueError, "sample_weight.*non-negative"),
        (f"{_n} weight Inf", _f, ([1.0, 2.0], [1.0, 2.0]), {"sample_weight": [1.0, np.inf]},
         ValueError, "sample_weight.*Inf"),
        (f"{_n} weights zero", _f, ([1.0, 2.0], [1.0, 2.0]), {"sample_weight": [0.0, 0.0]},
         ValueError, "sample_weight.*zero"),
        (f"{_n} weight object", _f, ([1.0, 2.0], [1.0, 2.0]), {"sample_weight": [None, 1.0]},
         TypeError, "sample_weight"),
    ]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(case):
    _, fn, args, kwargs, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


def test_module_is_documented():
    assert M.__doc__ and "AUC" in M.__doc__
    for name in M.__all__:
        obj = getattr(M, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


# ---------------------------------------------------------------------------------------------
# log loss and R^2 against loops written from their definitions
# ---------------------------------------------------------------------------------------------

def log_loss_loop(y, p, w=None, eps=np.finfo(np.float64).eps):
    """-sum_i w_i log(q_i) / sum_i w_i, q_i the (clipped) probability of i's true class, one
    example at a time."""
    num = den = 0.0
    for i in range(len(y)):
        wi = 1.0 if w is None else float(w[i])
        if np.ndim(p) == 2 and np.shape(p)[1] > 1:
            q = min(max(float(p[i][int(y[i])]), eps), 1 - eps)
        else:
            p1 = min(max(float(np.ravel(p)[i]), eps), 1 - eps)
            q = p1 if y[i] == 1 else 1.0 - p1
        num += -wi * math.log(q)
        den += wi
    return num / den


def r2_loop(y, yhat, w=None):
    """Per output column d: 1 - sum_i w_i (y_id - yhat_id)^2 / sum_i w_i (y_id - ybar_d)^2, averaged."""
    y, yhat = np.asarray(y, float).reshape(len(y), -1), np.asarray(yhat, float).reshape(len(y), -1)
    w = np.ones(len(y)) if w is None else np.asarray(w, float)
    scores = []
    for d in range(y.shape[1]):
        ybar = sum(w[i] * y[i, d] for i in range(len(y))) / sum(w)
        res = sum(w[i] * (y[i, d] - yhat[i, d]) ** 2 for i in range(len(y)))
        tot = sum(w[i] * (y[i, d] - ybar) ** 2 for i in range(len(y)))
        scores.append(1 - res / tot)
    return sum(scores) / len(scores)


@pytest.mark.parametrize("seed", range(6))
def test_log_loss_matches_the_loop(seed):
    rng = np.random.default_rng(seed)
    B = int(rng.integers(2, 40))
    y = rng.integers(0, 2, B)
    p = rng.random(B)
    p[0] = 0.0 if y[0] == 1 else p[0]  # a confident mistake: clipped, not infinite
    w = rng.random(B)
    for weights in (None, w):
        assert log_loss(y, p, sample_weight=weights) == pytest.approx(log_loss_loop(y, p, weights), rel=1e-12)
    assert log_loss(y, p.reshape(-1, 1)) == log_loss(y, p)
    C = int(rng.integers(2, 6))
    probs = rng.random((B, C))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, C, B)
    for weights in (None, w):
        assert log_loss(labels, probs, weights) == pytest.approx(log_loss_loop(labels, probs, weights), rel=1e-12)


def test_log_loss_hand_values_and_errors():
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert log_loss([0, 2], [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]) == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2)
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(np.finfo(float).eps))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        log_loss([1, 0], [1.5, 0.2])
    with pytest.raises(ValueError, match="sum to 1"):
        log_loss([1, 0], [[0.5, 0.6], [0.5, 0.5]])
    with pytest.raises(ValueError, match="3 classes|label 3"):
        log_loss([3, 0], [[0.2, 0.3, 0.5]] * 2)
    with pytest.raises(ValueError, match="binary labels"):
        log_loss([2, 0], [0.5, 0.5])
    with pytest.raises(TypeError, match="real numeric"):
        log_loss(["a", "b"], [0.5, 0.5])


@pytest.mark.parametrize("seed", range(6))
def test_r2_matches_the_loop(seed):
    rng = np.random.default_rng(seed)
    B, D = int(rng.integers(3, 30)), int(rng.integers(1, 4))
    y = rng.standard_normal((B, D))
    yhat = y + 0.5 * rng.standard_normal((B, D))
    w = rng.random(B)
    for weights in (None, w):
        assert r2(y, yhat, weights) == pytest.approx(r2_loop(y, yhat, weights), rel=1e-12)
    assert r2(y[:, 0], yhat[:, 0]) == pytest.approx(r2_loop(y[:, :1], yhat[:, :1]), rel=1e-12)


def test_r2_hand_values_and_errors():
    y = np.array([1.0, 2.0, 3.0])
    assert r2(y, y) == 1.0
    assert r2(y, np.full(3, 2.0)) == 0.0
    assert r2(y, [3.0, 2.0, 1.0]) == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="constant"):
        r2([1.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same shape"):
        r2([1.0, 2.0], [1.0])
