"""Bootstrap intervals and paired tests: repeatable by seed, McNemar equal to scipy's
exact binomial test, queries resampled whole for ranking."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sp

from aimass.evaluation import metrics as mt
from aimass.evaluation import stats


@pytest.mark.parametrize(("b", "c"), [(0, 0), (3, 9), (10, 10), (0, 7), (25, 40)])
def test_mcnemar_equals_exact_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else sp.binomtest(b, b + c, 0.5).pvalue
    assert stats.mcnemar_exact_p(b, c) == pytest.approx(expected, abs=1e-12)


def _classifier(seed, n=200):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    scores = rng.random((n, 3))
    scores[np.arange(n), y] += 0.6
    return mt.Predictions(mt.CLASSIFICATION, y, scores / scores.sum(axis=1, keepdims=True))


def test_bootstrap_is_repeatable_and_brackets_the_value():
    p = _classifier(0)
    names = ["accuracy", "f1_macro", "roc_auc"]
    first = stats.bootstrap_intervals(p, names, 200, 0.9, seed=5)
    assert first == stats.bootstrap_intervals(p, names, 200, 0.9, seed=5)
    assert first != stats.bootstrap_intervals(p, names, 200, 0.9, seed=6)
    values = mt.compute(p, names)
    for name in names:
        low, high = first[name]
        assert low < values[name] < high


def test_ranking_resamples_whole_queries():
    groups = np.repeat(np.arange(5), 4)
    p = mt.Predictions(mt.RANKING, np.tile([1.0, 0, 0, 0], 5), np.arange(20.0), groups, k=2)
    index = stats.resample_indices(p, np.random.default_rng(0))
    assert len(index) == 20
    assert all(len(set(groups[index[i : i + 4]])) == 1 for i in range(0, 20, 4))


def test_compare_of_a_better_model_is_significant():
    a, b = _classifier(1), _classifier(1)
    worse = mt.Predictions(a.task, a.y_true, np.roll(a.scores, 1, axis=1))
    result = {c.metric: c for c in stats.compare(worse, b, ["accuracy", "log_loss"], 300, 0.95, 0)}
    assert result["accuracy"].difference > 0
    assert result["accuracy"].lower > 0
    assert result["accuracy"].p_value < 0.001
    assert result["log_loss"].difference < 0
    assert result["log_loss"].p_value < 0.01
