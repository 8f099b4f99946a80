"""Metrics of classification, regression and ranking, in numpy, agreeing with scikit-learn.

Every function here is checked against scikit-learn to 1e-9 in
tests/evaluation/test_metrics_reference.py (random inputs, ties, one class
present, all-zero predictions). Where scikit-learn has no such metric the
formula is written in the function's docstring and in docs/evaluation.md.

Inputs are a :class:`Predictions`: true labels and model scores of one task.
- classification: ``y_true`` class indices [n], ``scores`` probabilities [n, C]
  (rows sum to 1; a binary model's one output becomes [1 - p, p]);
- regression: ``y_true`` and ``scores`` real values [n];
- ranking: ``y_true`` graded relevance (>= 0) [n], ``scores`` [n] and
  ``groups`` the query index of each row [n].

A metric that is undefined on its input (ROC-AUC with one class present) is NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aimass.core.errors import InvalidArgument

CLASSIFICATION = "classification"
REGRESSION = "regression"
RANKING = "ranking"


@dataclass(frozen=True)
class Predictions:
    """What a model predicted for the rows of a split, with the truth."""

    task: str
    y_true: np.ndarray
    scores: np.ndarray
    # Query index of each row (ranking only).
    groups: np.ndarray | None = None
    # Cut-off of ranking metrics and of top-k accuracy.
    k: int = 10
    # Class names in column order of ``scores`` (classification only).
    classes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.y_true.shape[0])

    def take(self, index: np.ndarray) -> Predictions:
        """The rows at ``index`` (repeats allowed), for bootstrap resamples."""
        groups = None if self.groups is None else self.groups[index]
        return Predictions(
            self.task, self.y_true[index], self.scores[index], groups, self.k, self.classes
        )


# ------------------------------------------------------------------ classification


def predicted_classes(probabilities: np.ndarray) -> np.ndarray:
    """Arg-max class of each row; ties go to the lowest class index (as np.argmax)."""
    return np.argmax(probabilities, axis=1)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [C, C]: rows true class, columns predicted class (sklearn.metrics.confusion_matrix
    with ``labels=range(C)``)."""
    flat = y_true.astype(np.int64) * n_classes + y_pred.astype(np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of rows whose predicted class is the true one (sklearn accuracy_score)."""
    return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with 0 where the denominator is 0 (zero_division=0)."""
    out = np.zeros(np.shape(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


@dataclass(frozen=True)
class ClassFigures:
    """Precision, recall, F1 and support of each class of ``labels``."""

    labels: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    true_positives: np.ndarray
    predicted: np.ndarray


def class_figures(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> ClassFigures:
    """One-vs-rest figures per label (sklearn precision_recall_fscore_support, zero_division=0)."""
    tp = np.array([np.sum((y_true == c) & (y_pred == c)) for c in labels], dtype=np.float64)
    predicted = np.array([np.sum(y_pred == c) for c in labels], dtype=np.float64)
    support = np.array([np.sum(y_true == c) for c in labels], dtype=np.float64)
    precision = _divide(tp, predicted)
    recall = _divide(tp, support)
    # F1 as sklearn computes it since 1.3: 2 tp / (2 tp + fp + fn).
    f1 = _divide(2 * tp, predicted + support)
    return ClassFigures(labels, precision, recall, f1, support, tp, predicted)


def averaged(figures: ClassFigures, metric: str, average: str) -> float:
    """Macro, micro or weighted average of precision, recall or F1 over ``figures.labels``."""
    if average == "micro":
        tp, predicted, support = (
            figures.true_positives.sum(),
            figures.predicted.sum(),
            figures.support.sum(),
        )
        values = {
            "precision": _divide(np.array(tp), np.array(predicted)),
            "recall": _divide(np.array(tp), np.array(support)),
            "f1": _divide(np.array(2 * tp), np.array(predicted + support)),
        }
        return float(values[metric])
    per_class = getattr(figures, metric)
    if average == "macro":
        return float(np.mean(per_class)) if per_class.size else 0.0
    total = figures.support.sum()
    return float(np.sum(per_class * figures.support) / total) if total else 0.0


def present_labels(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Labels seen in the truth or the predictions: what sklearn averages over by default."""
    return np.unique(np.concatenate([y_true, y_pred]))


def binary_clf_curve(
    y_true: np.ndarray, y_score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives at each distinct threshold, highest first (as sklearn)."""
    order = np.argsort(y_score, kind="mergesort")[::-1]
    score = y_score[order]
    truth = (y_true[order] == 1).astype(np.float64)
    distinct = np.where(np.diff(score))[0]
    threshold_index = np.r_[distinct, truth.size - 1]
    tps = np.cumsum(truth, dtype=np.float64)[threshold_index]
    fps = 1 + threshold_index - tps
    return fps, tps, score[threshold_index]


def roc_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with collinear points dropped (sklearn roc_curve)."""
    fps, tps, thresholds = binary_clf_curve(y_true, y_score)
    if len(fps) > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def binary_roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of a 0/1 truth; NaN unless both classes are present."""
    if np.unique(y_true).size != 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(y_true, y_score)
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def precision_recall_curve(
    y_true: np.ndarray, y_score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), recall decreasing, ending at (1, 0) (as sklearn)."""
    fps, tps, thresholds = binary_clf_curve(y_true, y_score)
    precision = _divide(tps, tps + fps)
    recall = tps / tps[-1] if tps[-1] > 0 else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def binary_average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the precision-recall step curve (sklearn average_precision_score)."""
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _one_vs_rest(p: Predictions, binary: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """A binary score of the positive class (2 classes) or the macro mean over classes
    with at least one positive row (C > 2): sklearn's multi_class="ovr", average="macro"."""
    if p.scores.shape[1] == 2:
        return binary((p.y_true == 1).astype(np.int64), p.scores[:, 1])
    values = [
        binary((p.y_true == c).astype(np.int64), p.scores[:, c])
        for c in range(p.scores.shape[1])
        if np.any(p.y_true == c)
    ]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def roc_auc(p: Predictions) -> float:
    """ROC-AUC: binary on the positive class, one-vs-rest macro for more classes."""
    return _one_vs_rest(p, binary_roc_auc)


def pr_auc(p: Predictions) -> float:
    """Average precision: binary on the positive class, one-vs-rest macro for more classes."""
    return _one_vs_rest(p, binary_average_precision)


def log_loss(p: Predictions) -> float:
    """Mean of -log(probability of the true class), probabilities clipped to [eps, 1 - eps]
    (sklearn log_loss with ``labels=range(C)``)."""
    eps = np.finfo(np.float64).eps
    clipped = np.clip(p.scores.astype(np.float64), eps, 1 - eps)
    return float(np.mean(-np.log(clipped[np.arange(p.rows), p.y_true.astype(np.int64)])))


def top_k_accuracy(p: Predictions) -> float:
    """Share of rows whose true class is among the k highest scores (sklearn
    top_k_accuracy_score: on ties the higher class index ranks first)."""
    k = min(p.k, p.scores.shape[1])
    order = np.argsort(p.scores, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float(np.mean(np.any(order == p.y_true[:, None], axis=1)))


def _class_metric(metric: str, average: str) -> Callable[[Predictions], float]:
    def compute(p: Predictions) -> float:
        y_pred = predicted_classes(p.scores)
        figures = class_figures(p.y_true, y_pred, present_labels(p.y_true, y_pred))
        return averaged(figures, metric, average)

    compute.__doc__ = f"{metric} averaged {average} over the labels present (sklearn default)."
    return compute


# ---------------------------------------------------------------------- regression


def mse(p: Predictions) -> float:
    """Mean squared error."""
    return float(np.mean((p.y_true - p.scores) ** 2))


def rmse(p: Predictions) -> float:
    """Root of the mean squared error (sklearn root_mean_squared_error)."""
    return float(np.sqrt(mse(p)))


def mae(p: Predictions) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(p.y_true - p.scores)))


def r2(p: Predictions) -> float:
    """Coefficient of determination; a constant truth gives 1.0 if predicted exactly, else 0.0
    (sklearn r2_score with force_finite=True)."""
    numerator = float(np.sum((p.y_true - p.scores) ** 2))
    denominator = float(np.sum((p.y_true - np.mean(p.y_true)) ** 2))
    if denominator == 0:
        return 1.0 if numerator == 0 else 0.0
    return 1.0 - numerator / denominator


# ------------------------------------------------------------------------- ranking


def query_slices(groups: np.ndarray) -> list[np.ndarray]:
    """Row indices of each query, queries in order of first appearance."""
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    return [np.flatnonzero(inverse == g) for g in order]


def _discount_cumsum(length: int, k: int) -> np.ndarray:
    discount = 1 / (np.log(np.arange(length) + 2) / np.log(2))
    discount[k:] = 0
    return np.cumsum(discount)


def _tie_averaged_dcg(relevance: np.ndarray, score: np.ndarray, cumsum: np.ndarray) -> float:
    """DCG where tied scores share the average gain of their group (sklearn ndcg_score)."""
    _, inverse, counts = np.unique(-score, return_inverse=True, return_counts=True)
    ranked = np.zeros(len(counts))
    np.add.at(ranked, inverse, relevance)
    ranked /= counts
    ends = np.cumsum(counts) - 1
    sums = np.empty(len(counts))
    sums[0] = cumsum[ends[0]]
    sums[1:] = np.diff(cumsum[ends])
    return float((ranked * sums).sum())


def ndcg_of_query(relevance: np.ndarray, score: np.ndarray, k: int) -> float:
    """NDCG@k of one query, ties averaged; 0 when no item is relevant."""
    cumsum = _discount_cumsum(len(relevance), k)
    ideal_discount = np.diff(np.r_[0.0, cumsum])
    ideal = float(np.sort(relevance)[::-1] @ ideal_discount)
    if ideal == 0:
        return 0.0
    return _tie_averaged_dcg(relevance, score, cumsum) / ideal


def _ranked_relevant(relevance: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Whether each of the top-k items (score descending, ties in row order) is relevant."""
    order = np.argsort(-score, kind="stable")[:k]
    return relevance[order] > 0


def hit_rate_of_query(relevance: np.ndarray, score: np.ndarray, k: int) -> float:
    """HR@k: 1 if a relevant item (relevance > 0) is among the top k, else 0."""
    return float(np.any(_ranked_relevant(relevance, score, k)))


def average_precision_of_query(relevance: np.ndarray, score: np.ndarray, k: int) -> float:
    """AP@k = sum over i <= k of P@i * rel_i / min(k, relevant items); 0 without relevant."""
    relevant_total = int(np.sum(relevance > 0))
    if relevant_total == 0:
        return 0.0
    hits = _ranked_relevant(relevance, score, k)
    precision_at = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(np.sum(precision_at * hits) / min(k, relevant_total))


def _per_query(
    one: Callable[[np.ndarray, np.ndarray, int], float],
) -> Callable[[Predictions], float]:
    def compute(p: Predictions) -> float:
        assert p.groups is not None
        values = [one(p.y_true[rows], p.scores[rows], p.k) for rows in query_slices(p.groups)]
        return float(np.mean(values)) if values else float("nan")

    compute.__doc__ = f"Mean over queries of {one.__name__}."
    return compute


# ------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class MetricSpec:
    """A metric by name: its task, how it is computed, and which way is better."""

    name: str
    task: str
    compute: Callable[[Predictions], float]
    higher_is_better: bool = True


def _accuracy(p: Predictions) -> float:
    return accuracy(p.y_true, predicted_classes(p.scores))


def _specs() -> dict[str, MetricSpec]:
    specs = [
        MetricSpec("accuracy", CLASSIFICATION, _accuracy),
        MetricSpec("roc_auc", CLASSIFICATION, roc_auc),
        MetricSpec("pr_auc", CLASSIFICATION, pr_auc),
        MetricSpec("log_loss", CLASSIFICATION, log_loss, higher_is_better=False),
        MetricSpec("top_k_accuracy", CLASSIFICATION, top_k_accuracy),
        MetricSpec("mse", REGRESSION, mse, higher_is_better=False),
        MetricSpec("rmse", REGRESSION, rmse, higher_is_better=False),
        MetricSpec("mae", REGRESSION, mae, higher_is_better=False),
        MetricSpec("r2", REGRESSION, r2),
        MetricSpec("ndcg", RANKING, _per_query(ndcg_of_query)),
        MetricSpec("hit_rate", RANKING, _per_query(hit_rate_of_query)),
        MetricSpec("map", RANKING, _per_query(average_precision_of_query)),
    ]  # fmt: skip
    for metric in ("precision", "recall", "f1"):
        for average in ("macro", "micro", "weighted"):
            name = f"{metric}_{average}"
            specs.append(MetricSpec(name, CLASSIFICATION, _class_metric(metric, average)))
    return {spec.name: spec for spec in specs}


METRICS: dict[str, MetricSpec] = _specs()

DEFAULTS: dict[str, tuple[str, ...]] = {
    CLASSIFICATION: (
        "accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_micro",
        "f1_weighted", "roc_auc", "pr_auc", "log_loss",
    ),
    REGRESSION: ("mse", "rmse", "mae", "r2"),
    RANKING: ("ndcg", "hit_rate", "map"),
}  # fmt: skip

# The metric bootstrap intervals and comparisons lead with.
HEADLINE = {CLASSIFICATION: "accuracy", REGRESSION: "rmse", RANKING: "ndcg"}


def resolve_names(names: list[str], task: str | None, field: str) -> list[str]:
    """The metric names to compute: ``names`` checked (unknown or of another task:
    InvalidArgument naming it), or the task's defaults when empty."""
    for index, name in enumerate(names):
        spec = METRICS.get(name)
        if spec is None:
            known = ", ".join(sorted(METRICS))
            raise InvalidArgument(f"{field}[{index}]", f"unknown metric {name!r}; known: {known}")
        if task is not None and spec.task != task:
            raise InvalidArgument(
                f"{field}[{index}]", f"{name!r} is a {spec.task} metric, the task is {task}"
            )
    if names:
        return list(dict.fromkeys(names))
    if task is None:
        return []
    return list(DEFAULTS[task])


def compute(p: Predictions, names: list[str]) -> dict[str, float]:
    """Every metric of ``names`` on ``p``, in order."""
    return {name: METRICS[name].compute(p) for name in names}
