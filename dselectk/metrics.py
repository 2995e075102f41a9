"""Evaluation metrics for single- and multi-task models, in plain NumPy.

Functions:

* :func:`accuracy` -- classification accuracy from labels, class scores or binary scores;
* :func:`auc` -- exact, tie-aware ROC AUC (the normalised Mann-Whitney U statistic), optionally
  weighted, in O(B log B);
* :func:`log_loss` -- binary or multi-class cross-entropy of predicted probabilities;
* :func:`mse`, :func:`rmse`, :func:`mae` -- regression errors, optionally weighted per example;
* :func:`r2` -- the coefficient of determination R^2;
* :data:`METRICS` / :func:`get_metric` -- look a metric up by name;
* :func:`evaluate_tasks` -- several metrics on each task of a multi-task model.

Rules shared by every function:

* Inputs that are not arrays are converted with :func:`numpy.asarray`. A result that is not a
  real numeric array (bool, integer or float; e.g. strings, objects, complex numbers, ``None``)
  raises ``TypeError`` naming the argument; a ragged nested list raises ``ValueError``.
* A wrong number of dimensions, mismatched shapes, an empty input (zero examples or zero
  columns), NaN or Inf, and labels outside the expected range raise ``ValueError`` naming the
  argument. Inputs are never modified.
* Every metric returns a Python ``float``; the arithmetic is done in float64 whatever the input
  dtype.

``B`` is the number of examples, ``C`` the number of classes, ``D`` the number of regression
outputs.
"""
from __future__ import annotations

import numbers
from typing import Callable

import numpy as np

__all__ = [
    "accuracy",
    "auc",
    "log_loss",
    "mse",
    "rmse",
    "mae",
    "r2",
    "METRICS",
    "get_metric",
    "evaluate_tasks",
]


# ---------------------------------------------------------------------------------------------
# Input validation helpers
# ---------------------------------------------------------------------------------------------

def _to_array(x, name):
    """``np.asarray(x)`` checked to be a real numeric array (bool, integer or float)."""
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged nested sequences, most often
        raise ValueError(f"{name} could not be converted to a numeric array: {exc}") from exc
    if a.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must be a real numeric array (bool, integer or float), got dtype {a.dtype}"
        )
    return a


def _check_nonempty(a, name):
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); at least one example is needed")


def _check_finite(a, name):
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf")


def _labels(a, name):
    """Integer labels as int64: bool/integer arrays, or float arrays holding integral values."""
    if a.dtype.kind == "f":
        _check_finite(a, name)
        if not np.all(a == np.floor(a)):
            raise ValueError(f"{name} must hold integer class labels, got non-integral values")
        labels = a.astype(np.int64)
    else:
        labels = a.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must hold class labels >= 0, got {int(labels.min())}")
    return labels


def _column(a, name):
    """A (B,) or (B, 1) array as (B,); anything else raises."""
    if a.ndim == 2 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1), got shape {a.shape}")
    return a


def _binary_labels(a, name):
    """A {0, 1} label vector as float64 (bool, integer or float input)."""
    if a.dtype.kind == "f":
        _check_finite(a, name)
    if not np.all((a == 0) | (a == 1)):
        bad = a[(a != 0) & (a != 1)][0].item()
        raise ValueError(f"{name} must hold binary labels 0 or 1, got {bad!r}")
    return a.astype(np.float64)


def _sample_weight(sample_weight, n):
    """Validated per-example weights as float64 of shape (n,)."""
    w = _to_array(sample_weight, "sample_weight")
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"sample_weight must have shape ({n},) (one weight per example), "
                         f"got shape {w.shape}")
    _check_finite(w, "sample_weight")
    w = w.astype(np.float64)
    if np.any(w < 0):
        raise ValueError("sample_weight must be non-negative")
    if not w.sum() > 0:
        raise ValueError("sample_weight sums to zero; at least one example needs a positive weight")
    return w


def _check_threshold(threshold):
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return threshold


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

def accuracy(y_true, y_pred, threshold=0.5):
    """Fraction of examples whose predicted class equals the true class.

    Parameters
    ----------
    y_true : array_like, shape (B,)
        True class labels, integers >= 0 (bool arrays, and float arrays holding integral values,
        are accepted as labels).
    y_pred : array_like
        One of

        * shape (B,) of integer (or bool) dtype: predicted class labels, >= 0;
        * shape (B, C) with C >= 2: per-class scores, logits or probabilities; the prediction is
          the argmax over classes, ties going to the lower class index. ``y_true`` must then lie
          in ``[0, C)``;
        * shape (B,) of float dtype, or shape (B, 1): scores of the positive class of a binary
          task; the prediction is 1 where ``y_pred > threshold``, else 0 (a score equal to the
          threshold is predicted 0). ``y_true`` must then be 0 or 1.
    threshold : float, default 0.5
        Decision threshold for the binary score forms. The default suits probabilities; pass
        ``0.0`` for logits. Ignored for the label and (B, C) forms (but still checked to be a
        finite real number).

    Returns
    -------
    float
        Accuracy in [0, 1].

    Raises
    ------
    TypeError
        Non-numeric ``y_true`` / ``y_pred``, or a non-real ``threshold``.
    ValueError
        Wrong shapes, mismatched ``B``, empty inputs, NaN/Inf, negative or non-integral labels,
        labels out of range for the form of ``y_pred``, non-finite ``threshold``.
    """
    threshold = _check_threshold(threshold)
    yt = _to_array(y_true, "y_true")
    yp = _to_array(y_pred, "y_pred")
    if yt.ndim != 1:
        raise ValueError(f"y_true must have shape (B,), got shape {yt.shape}")
    _check_nonempty(yt, "y_true")
    if yp.ndim not in (1, 2):
        raise ValueError(f"y_pred must have shape (B,), (B, 1) or (B, C), got shape {yp.shape}")
    if yp.shape[0] != yt.shape[0]:
        raise ValueError(f"y_true and y_pred disagree on the number of examples: "
                         f"{yt.shape[0]} vs {yp.shape[0]} (shapes {yt.shape} and {yp.shape})")
    _check_nonempty(yp, "y_pred")
    labels = _labels(yt, "y_true")

    if yp.ndim == 2 and yp.shape[1] >= 2:  # class scores
        _check_finite(yp, "y_pred")
        n_classes = yp.shape[1]
        if labels.max() >= n_classes:
            raise ValueError(f"y_true holds label {int(labels.max())} but y_pred has scores for "
                             f"only {n_classes} classes (labels must lie in [0, {n_classes}))")
        pred = np.argmax(yp, axis=1)  # first maximum: ties to the lower index
    elif yp.ndim == 1 and yp.dtype.kind in "biu":  # predicted labels
        pred = _labels(yp, "y_pred")
    else:  # binary scores, (B,) float or (B, 1)
        scores = yp.reshape(-1)
        _check_finite(scores, "y_pred")
        if labels.max() > 1:
            raise ValueError(
                f"y_pred of shape {yp.shape} and dtype {yp.dtype} is read as binary scores, so "
                f"y_true must hold labels 0 or 1, got {int(labels.max())}; pass integer labels "
                "or (B, C) class scores for a multi-class task"
            )
        pred = (scores > threshold).astype(np.int64)
    return float(np.mean(pred == labels))


def auc(y_true, y_score, sample_weight=None):
    """Area under the ROC curve, exact and tie-aware.

    Equals the probability that a random positive example scores higher than a random negative
    one, a tie counting 1/2 -- the Mann-Whitney U statistic divided by (#positives x #negatives),
    i.e. the average-rank formula. With ``sample_weight`` every (positive i, negative j) pair
    counts ``w_i * w_j``:

        AUC = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + [s_i == s_j] / 2)
              / (sum_{i pos} w_i * sum_{j neg} w_j)

    which is also the trapezoidal area under the weighted ROC curve. Computed by one sort,
    O(B log B) time and O(B) memory.

    Parameters
    ----------
    y_true : array_like, shape (B,) or (B, 1)
        Binary labels, 0 or 1 (bool, integer or float). Both classes must be present.
    y_score : array_like, shape (B,) or (B, 1)
        Scores of the positive class (probabilities, logits, any monotone score); finite. Ties are
        decided on the values as given (integer scores are not rounded through float).
    sample_weight : array_like, shape (B,), optional
        Non-negative, finite per-example weights; each class needs a positive total weight.

    Returns
    -------
    float
        AUC in [0, 1]: 1 for a perfect ranking, 0 for an inverted one, 0.5 when all scores tie.

    Raises
    ------
    TypeError
        Non-numeric inputs.
    ValueError
        Wrong or mismatched shapes, empty inputs, NaN/Inf, labels other than 0/1, only one class
        present in ``y_true`` (or a class whose total weight is zero), negative weights.
    """
    yt = _column(_to_array(y_true, "y_true"), "y_true")
    ys = _column(_to_array(y_score, "y_score"), "y_score")
    _check_nonempty(yt, "y_true")
    if ys.shape[0] != yt.shape[0]:
        raise ValueError(f"y_true and y_score disagree on the number of examples: "
                         f"{yt.shape[0]} vs {ys.shape[0]}")
    y = _binary_labels(yt, "y_true")
    _check_finite(ys, "y_score")
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.shape[0]:
        present = 1 if n_pos else 0
        raise ValueError(f"y_true contains only class {present}; ROC AUC needs both positive (1) "
                         "and negative (0) examples")
    if ys.dtype.kind == "b":
        ys = ys.astype(np.int8)
    w = np.ones(y.shape[0]) if sample_weight is None else _sample_weight(sample_weight, y.shape[0])

    order = np.argsort(ys, kind="stable")
    s_sorted = ys[order]
    y_sorted = y[order]
    w_sorted = w[order]
    # Start of each run of equal scores (-0.0 == 0.0, so those tie too).
    starts = np.flatnonzero(np.concatenate(([True], s_sorted[1:] != s_sorted[:-1])))
    pos_w = np.add.reduceat(w_sorted * y_sorted, starts)          # positive weight per score
    neg_w = np.add.reduceat(w_sorted * (1.0 - y_sorted), starts)  # negative weight per score
    total_pos = pos_w.sum()
    total_neg = neg_w.sum()
    if not (total_pos > 0 and total_neg > 0):
        which = 1 if not total_pos > 0 else 0
        raise ValueError(f"sample_weight gives class {which} of y_true a total weight of zero; "
                         "ROC AUC needs positive weight on both classes")
    neg_below = np.cumsum(neg_w) - neg_w  # negative weight at strictly lower scores
    area = np.dot(pos_w, neg_below + 0.5 * neg_w) / (total_pos * total_neg)
    return float(min(max(area, 0.0), 1.0))


def log_loss(y_true, y_pred, sample_weight=None, eps=None):
    """Mean cross-entropy of predicted probabilities, ``-mean_i log p_i(y_i)``.

    Binary: ``y_pred`` (B,) or (B, 1) the probability of class 1, ``y_true`` 0 or 1:
    ``-mean(y log p + (1 - y) log(1 - p))``. Multi-class: ``y_pred`` (B, C) probabilities (rows
    summing to 1, within 1e-6 relative), ``y_true`` integer labels in [0, C). Probabilities are
    clipped to [eps, 1 - eps] before the log (default eps: the machine epsilon of float64, as
    scikit-learn), so a confident mistake costs about 36, not infinity. With ``sample_weight`` the
    mean over examples is weighted.

    Raises
    ------
    TypeError
        Non-numeric inputs.
    ValueError
        Wrong or mismatched shapes, empty inputs, NaN/Inf, probabilities outside [0, 1], rows of
        class probabilities that do not sum to 1, labels out of range, bad weights.
    """
    eps = np.finfo(np.float64).eps if eps is None else float(eps)
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    yt = _to_array(y_true, "y_true")
    yp = _to_array(y_pred, "y_pred")
    if yt.ndim not in (1, 2) or (yt.ndim == 2 and yt.shape[1] != 1):
        raise ValueError(f"y_true must have shape (B,) or (B, 1), got shape {yt.shape}")
    yt = yt.reshape(-1)
    _check_nonempty(yt, "y_true")
    if yp.ndim not in (1, 2) or yp.shape[0] != yt.shape[0]:
        raise ValueError(f"y_pred must have shape (B,), (B, 1) or (B, C) with B = {yt.shape[0]} (that of y_true), "
                         f"got shape {yp.shape}")
    _check_finite(yp, "y_pred")
    p = yp.astype(np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("y_pred must hold probabilities in [0, 1]")
    w = None if sample_weight is None else _sample_weight(sample_weight, yt.shape[0])
    if p.ndim == 2 and p.shape[1] >= 2:
        labels = _labels(yt, "y_true")
        if labels.max() >= p.shape[1]:
            raise ValueError(f"y_true holds label {int(labels.max())} but y_pred has {p.shape[1]} classes")
        if not np.allclose(p.sum(axis=1), 1, rtol=1e-6, atol=1e-6):
            raise ValueError("the rows of y_pred (class probabilities) must sum to 1")
        per_example = -np.log(np.clip(p[np.arange(p.shape[0]), labels], eps, 1 - eps))
    else:
        y = _binary_labels(yt, "y_true")
        q = np.clip(p.reshape(-1), eps, 1 - eps)
        per_example = -(y * np.log(q) + (1 - y) * np.log1p(-q))
    return _mean_over_examples(per_example, w)


# ---------------------------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------------------------

def _regression_inputs(y_true, y_pred, sample_weight):
    """Validated (y_true, y_pred, weights or None) as float64 arrays of shape (B, D)."""
    yt = _to_array(y_true, "y_true")
    yp = _to_array(y_pred, "y_pred")
    if yt.ndim not in (1, 2):
        raise ValueError(f"y_true must have shape (B,) or (B, D), got shape {yt.shape}")
    if yp.ndim not in (1, 2):
        raise ValueError(f"y_pred must have shape (B,) or (B, D), got shape {yp.shape}")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred must have the same shape, got {yt.shape} and "
                         f"{yp.shape} (no broadcasting)")
    _check_nonempty(yt, "y_true")
    _check_finite(yt, "y_true")
    _check_finite(yp, "y_pred")
    yt = yt.astype(np.float64).reshape(yt.shape[0], -1)
    yp = yp.astype(np.float64).reshape(yp.shape[0], -1)
    w = None if sample_weight is None else _sample_weight(sample_weight, yt.shape[0])
    return yt, yp, w


def _mean_over_examples(per_example, w):
    """Mean of a (B,) array, weighted by w when given."""
    if w is None:
        return float(np.mean(per_example))
    return float(np.dot(w, per_example) / w.sum())


def mse(y_true, y_pred, sample_weight=None):
    """Mean squared error, averaged over examples and (for 2-D inputs) over output dimensions.

    ``mean_i mean_d (y_true[i, d] - y_pred[i, d])**2``; with ``sample_weight`` the mean over
    examples is weighted: ``sum_i w_i mean_d (...)**2 / sum_i w_i``.

    Parameters
    ----------
    y_true, y_pred : array_like, shape (B,) or (B, D)
        Targets and predictions; the shapes must be equal (nothing is broadcast). Finite.
    sample_weight : array_like, shape (B,), optional
        Non-negative, finite per-example weights with a positive sum.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        Non-numeric inputs.
    ValueError
        Wrong ndim, unequal shapes, empty inputs, NaN/Inf, bad weights.
    """
    yt, yp, w = _regression_inputs(y_true, y_pred, sample_weight)
    return _mean_over_examples(np.mean((yt - yp) ** 2, axis=1), w)


def rmse(y_true, y_pred, sample_weight=None):
    """Root mean squared error: ``sqrt(mse(y_true, y_pred, sample_weight))``.

    The square root is taken of the (weighted) mean over all examples and output dimensions, not
    averaged per dimension. Parameters, validation and errors are those of :func:`mse`.
    """
    return float(np.sqrt(mse(y_true, y_pred, sample_weight)))


def mae(y_true, y_pred, sample_weight=None):
    """Mean absolute error, averaged over examples and (for 2-D inputs) over output dimensions.

    ``mean_i mean_d |y_true[i, d] - y_pred[i, d]|``; with ``sample_weight`` the mean over examples
    is weighted: ``sum_i w_i mean_d |...| / sum_i w_i``. Parameters, validation and errors are
    those of :func:`mse`.
    """
    yt, yp, w = _regression_inputs(y_true, y_pred, sample_weight)
    return _mean_over_examples(np.mean(np.abs(yt - yp), axis=1), w)


def r2(y_true, y_pred, sample_weight=None):
    """Coefficient of determination, ``1 - sum (y - yhat)^2 / sum (y - mean y)^2``, per output
    dimension and averaged over them (uniformly, as scikit-learn's default); with
    ``sample_weight`` both sums and the mean are weighted. 1 is a perfect fit, 0 predicting the
    mean, negative worse than that. Parameters and errors as :func:`mse`, and ValueError when
    y_true is constant in a dimension (R^2 is undefined there)."""
    yt, yp, w = _regression_inputs(y_true, y_pred, sample_weight)
    w = np.ones(yt.shape[0]) if w is None else w
    mean = (w[:, None] * yt).sum(axis=0) / w.sum()
    total = (w[:, None] * (yt - mean) ** 2).sum(axis=0)
    residual = (w[:, None] * (yt - yp) ** 2).sum(axis=0)
    if np.any(total == 0):
        raise ValueError("y_true is constant (in some output dimension): R^2 is undefined")
    return float(np.mean(1 - residual / total))


# ---------------------------------------------------------------------------------------------
# Registry and multi-task evaluation
# ---------------------------------------------------------------------------------------------

METRICS: dict[str, Callable] = {
    "accuracy": accuracy,
    "auc": auc,
    "log_loss": log_loss,
    "mse": mse,
    "rmse": rmse,
    "mae": mae,
    "r2": r2,
}
"""Metric functions by name, as used by :func:`get_metric` and :func:`evaluate_tasks`."""


def get_metric(name_or_callable):
    """The metric function for a name in :data:`METRICS`; a callable is returned unchanged.

    Names are matched exactly (case-sensitive).

    Raises
    ------
    ValueError
        An unknown name; the message lists the known names.
    TypeError
        Neither a string nor a callable.
    """
    if isinstance(name_or_callable, str):
        try:
            return METRICS[name_or_callable]
        except KeyError:
            raise ValueError(f"unknown metric {name_or_callable!r}; known metrics: "
                             f"{', '.join(sorted(METRICS))}") from None
    if callable(name_or_callable):
        return name_or_callable
    raise TypeError(f"a metric must be a name (str) or a callable, got "
                    f"{type(name_or_callable).__name__}")


def _metric_key(m):
    return m if isinstance(m, str) else getattr(m, "__name__", repr(m))


def evaluate_tasks(y_true_list, y_pred_list, metrics_per_task):
    """Evaluate several metrics on each task of a multi-task model.

    Parameters
    ----------
    y_true_list : list or tuple of array_like
        Targets of each task, ``y_true_list[t]`` for task t.
    y_pred_list : list or tuple of array_like
        Predictions (or scores) of each task, in the same order.
    metrics_per_task : list or tuple of lists/tuples
        ``metrics_per_task[t]`` lists the metrics of task t: names from :data:`METRICS` (or
        callables ``f(y_true, y_pred) -> float``, keyed by their ``__name__``).

    Returns
    -------
    list of dict
        One ``{metric name: value}`` dict per task, in the order the metrics were listed.

    Raises
    ------
    TypeError
        An argument that is not a list or tuple, or a task's metrics given as a bare string.
    ValueError
        The three lists differ in length or are empty, an unknown or repeated metric name within
        a task. Errors raised by a metric keep their type, with the task index and metric name
        prepended to the message.
    """
    args = {"y_true_list": y_true_list, "y_pred_list": y_pred_list,
            "metrics_per_task": metrics_per_task}
    for arg_name, value in args.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{arg_name} must be a list or tuple (one entry per task), "
                            f"got {type(value).__name__}")
    lengths = {arg_name: len(value) for arg_name, value in args.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError("y_true_list, y_pred_list and metrics_per_task must have one entry per "
                         f"task each, got lengths {lengths}")
    if lengths["y_true_list"] == 0:
        raise ValueError("y_true_list, y_pred_list and metrics_per_task are empty (no tasks)")

    # Resolve every metric before computing any, so a typo fails fast.
    resolved = []
    for t, names in enumerate(metrics_per_task):
        if not isinstance(names, (list, tuple)):
            raise TypeError(f"metrics_per_task[{t}] must be a list or tuple of metric names, "
                            f"got {type(names).__name__}")
        funcs = {}
        for m in names:
            key = _metric_key(m)
            if key in funcs:
                raise ValueError(f"metrics_per_task[{t}] lists metric {key!r} twice")
            try:
                funcs[key] = get_metric(m)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"metrics_per_task[{t}]: {exc}") from exc
        resolved.append(funcs)

    results = []
    for t, funcs in enumerate(resolved):
        values = {}
        for key, fn in funcs.items():
            try:
                values[key] = fn(y_true_list[t], y_pred_list[t])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"task {t}, metric {key!r}: {exc}") from exc
        results.append(values)
    return results
