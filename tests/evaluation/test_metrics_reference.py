"""Every metric against scikit-learn (or the documented formula) to 1e-9: random inputs,
ties in scores, one class present, all-zero predictions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from sklearn import metrics as sk

from aimass.core.errors import InvalidArgument
from aimass.evaluation import metrics as mt

TOL = 1e-9
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@hs.composite
def classification(draw, min_classes=2, max_classes=6):
    n_classes = draw(hs.integers(min_classes, max_classes))
    n = draw(hs.integers(1, 60))
    y = np.array(draw(hs.lists(hs.integers(0, n_classes - 1), min_size=n, max_size=n)))
    # Few distinct score levels make ties frequent.
    levels = draw(hs.sampled_from([3, 10, 1000]))
    raw = np.array(
        draw(hs.lists(hs.integers(0, levels), min_size=n * n_classes, max_size=n * n_classes)),
        dtype=np.float64,
    ).reshape(n, n_classes)
    raw += 1e-3  # never all zero in a row, so rows normalise
    probabilities = raw / raw.sum(axis=1, keepdims=True)
    return mt.Predictions(mt.CLASSIFICATION, y, probabilities, k=draw(hs.integers(1, 4)))


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


@FAST
@given(classification())
def test_label_metrics_match_sklearn(p):
    y_pred = mt.predicted_classes(p.scores)
    assert mt.METRICS["accuracy"].compute(p) == pytest.approx(
        sk.accuracy_score(p.y_true, y_pred), abs=TOL
    )
    for metric, function in (("precision", sk.precision_score), ("recall", sk.recall_score),
                             ("f1", sk.f1_score)):  # fmt: skip
        for average in ("macro", "micro", "weighted"):
            expected = _quiet(function, p.y_true, y_pred, average=average, zero_division=0)
            got = mt.METRICS[f"{metric}_{average}"].compute(p)
            assert got == pytest.approx(expected, abs=TOL), (metric, average)
    n = p.scores.shape[1]
    expected_cm = sk.confusion_matrix(p.y_true, y_pred, labels=list(range(n)))
    assert np.array_equal(mt.confusion_matrix(p.y_true, y_pred, n), expected_cm)


@FAST
@given(classification())
def test_per_class_figures_match_sklearn(p):
    y_pred = mt.predicted_classes(p.scores)
    labels = np.arange(p.scores.shape[1])
    figures = mt.class_figures(p.y_true, y_pred, labels)
    precision, recall, f1, support = _quiet(
        sk.precision_recall_fscore_support, p.y_true, y_pred, labels=labels, zero_division=0
    )
    np.testing.assert_allclose(figures.precision, precision, atol=TOL)
    np.testing.assert_allclose(figures.recall, recall, atol=TOL)
    np.testing.assert_allclose(figures.f1, f1, atol=TOL)
    np.testing.assert_array_equal(figures.support, support)


@FAST
@given(classification())
def test_probability_metrics_match_sklearn(p):
    n = p.scores.shape[1]
    labels = list(range(n))
    assert mt.log_loss(p) == pytest.approx(sk.log_loss(p.y_true, p.scores, labels=labels), abs=TOL)
    if n > 2:
        expected = sk.top_k_accuracy_score(p.y_true, p.scores, k=p.k, labels=labels)
        assert mt.top_k_accuracy(p) == pytest.approx(expected, abs=TOL)
    present = np.unique(p.y_true)
    if n == 2:
        if present.size == 2:
            assert mt.roc_auc(p) == pytest.approx(
                sk.roc_auc_score(p.y_true, p.scores[:, 1]), abs=TOL
            )
        else:
            assert np.isnan(mt.roc_auc(p))  # one class present: undefined, sklearn says nan too
            assert np.isnan(_quiet(sk.roc_auc_score, p.y_true, p.scores[:, 1]))
        expected_ap = _quiet(sk.average_precision_score, p.y_true, p.scores[:, 1])
        assert mt.pr_auc(p) == pytest.approx(expected_ap, abs=TOL)
    elif present.size == n:
        expected = sk.roc_auc_score(p.y_true, p.scores, multi_class="ovr", labels=labels)
        assert mt.roc_auc(p) == pytest.approx(expected, abs=TOL)
        onehot = np.eye(n)[p.y_true]
        expected_ap = sk.average_precision_score(onehot, p.scores, average="macro")
        assert mt.pr_auc(p) == pytest.approx(expected_ap, abs=TOL)


@FAST
@given(hs.lists(hs.integers(0, 1), min_size=2, max_size=80), hs.integers(0, 2**31 - 1))
def test_binary_curves_match_sklearn(truth, seed):
    y = np.array(truth)
    scores = np.random.default_rng(seed).integers(0, 5, size=y.size) / 4  # many ties
    if np.unique(y).size == 2:
        fpr, tpr, thresholds = mt.roc_curve(y, scores)
        e_fpr, e_tpr, e_thr = sk.roc_curve(y, scores)
        np.testing.assert_allclose(fpr, e_fpr, atol=TOL)
        np.testing.assert_allclose(tpr, e_tpr, atol=TOL)
        np.testing.assert_array_equal(thresholds, e_thr)
    if y.sum() > 0:
        precision, recall, thr = mt.precision_recall_curve(y, scores)
        e_p, e_r, e_t = sk.precision_recall_curve(y, scores)
        np.testing.assert_allclose(precision, e_p, atol=TOL)
        np.testing.assert_allclose(recall, e_r, atol=TOL)
        np.testing.assert_array_equal(thr, e_t)


def test_edge_cases_match_sklearn():
    y = np.array([1, 1, 1, 1])
    all_zero = mt.Predictions(mt.CLASSIFICATION, y, np.tile([1.0, 0.0], (4, 1)))
    y_pred = mt.predicted_classes(all_zero.scores)
    assert mt.METRICS["accuracy"].compute(all_zero) == sk.accuracy_score(y, y_pred) == 0.0
    assert mt.METRICS["f1_macro"].compute(all_zero) == pytest.approx(
        _quiet(sk.f1_score, y, y_pred, average="macro", zero_division=0), abs=TOL
    )
    assert mt.log_loss(all_zero) == pytest.approx(sk.log_loss(y, all_zero.scores, labels=[0, 1]))
    assert np.isnan(mt.roc_auc(all_zero))
    ties = mt.Predictions(mt.CLASSIFICATION, np.array([0, 1, 0, 1]), np.full((4, 2), 0.5))
    assert mt.roc_auc(ties) == sk.roc_auc_score(ties.y_true, ties.scores[:, 1]) == 0.5
    assert mt.pr_auc(ties) == pytest.approx(
        sk.average_precision_score(ties.y_true, ties.scores[:, 1])
    )


@FAST
@given(hs.lists(hs.floats(-1e3, 1e3), min_size=1, max_size=50), hs.integers(0, 2**31 - 1),
       hs.booleans())  # fmt: skip
def test_regression_metrics_match_sklearn(values, seed, exact):
    y = np.array(values)
    pred = y.copy() if exact else y + np.random.default_rng(seed).normal(size=y.size)
    p = mt.Predictions(mt.REGRESSION, y, pred)
    assert mt.mse(p) == pytest.approx(sk.mean_squared_error(y, pred), rel=1e-12, abs=TOL)
    assert mt.rmse(p) == pytest.approx(sk.root_mean_squared_error(y, pred), rel=1e-12, abs=TOL)
    assert mt.mae(p) == pytest.approx(sk.mean_absolute_error(y, pred), rel=1e-12, abs=TOL)
    if y.size > 1:
        assert mt.r2(p) == pytest.approx(sk.r2_score(y, pred), abs=TOL)


def test_r2_constant_truth_and_zero_predictions():
    y = np.full(5, 2.0)
    for pred in (np.full(5, 2.0), np.zeros(5)):
        assert mt.r2(mt.Predictions(mt.REGRESSION, y, pred)) == sk.r2_score(y, pred)


@hs.composite
def ranking(draw):
    queries = draw(hs.integers(1, 6))
    items = draw(hs.integers(2, 8))
    relevance = np.array(draw(hs.lists(hs.integers(0, 3), min_size=queries * items,
                                       max_size=queries * items)), dtype=np.float64)  # fmt: skip
    scores = np.array(draw(hs.lists(hs.integers(0, 4), min_size=queries * items,
                                    max_size=queries * items)), dtype=np.float64)  # fmt: skip
    groups = np.repeat(np.arange(queries), items)
    return mt.Predictions(mt.RANKING, relevance, scores, groups, k=draw(hs.integers(1, items + 1)))


def _reference_ap(relevance, scores, k):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if relevance[i] > 0:
            hits += 1
            total += hits / rank
    relevant = sum(1 for r in relevance if r > 0)
    return total / min(k, relevant) if relevant else 0.0


def _reference_hr(relevance, scores, k):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return float(any(relevance[i] > 0 for i in order))


@FAST
@given(ranking())
def test_ranking_metrics_match_sklearn_and_formulas(p):
    queries = p.groups.max() + 1
    relevance, scores = p.y_true.reshape(queries, -1), p.scores.reshape(queries, -1)
    assert mt.METRICS["ndcg"].compute(p) == pytest.approx(
        sk.ndcg_score(relevance, scores, k=p.k), abs=TOL
    )
    expected_map = np.mean(
        [_reference_ap(r, s, p.k) for r, s in zip(relevance, scores, strict=True)]
    )
    assert mt.METRICS["map"].compute(p) == pytest.approx(expected_map, abs=TOL)
    expected_hr = np.mean(
        [_reference_hr(r, s, p.k) for r, s in zip(relevance, scores, strict=True)]
    )
    assert mt.METRICS["hit_rate"].compute(p) == pytest.approx(expected_hr, abs=TOL)


def test_unknown_metric_and_metric_of_another_task_are_refused():
    with pytest.raises(InvalidArgument, match=r"metric_names\[1\]: unknown metric 'acuracy'"):
        mt.resolve_names(["accuracy", "acuracy"], mt.CLASSIFICATION, "metric_names")
    with pytest.raises(InvalidArgument, match="'rmse' is a regression metric"):
        mt.resolve_names(["rmse"], mt.CLASSIFICATION, "metric_names")
    assert mt.resolve_names([], mt.REGRESSION, "m") == ["mse", "rmse", "mae", "r2"]
