"""Uncertainty of metrics: bootstrap confidence intervals and paired comparisons.

- :func:`bootstrap_intervals`: percentile intervals from resamples of the rows
  (of the queries, for ranking, so a query's items stay together).
- :func:`compare`: two versions scored on the same rows; each resample takes
  the same rows for both, so the interval of the difference B - A accounts for
  the pairing. Its p-value is the share of centred resampled differences at
  least as far from 0 as the observed one (two-sided paired bootstrap); for
  accuracy it is McNemar's exact test on the rows where exactly one version is
  right.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aimass.evaluation import metrics as mt

Progress = Callable[[int], None]


def resample_indices(p: mt.Predictions, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one bootstrap resample: rows, or whole queries for ranking."""
    if p.groups is None:
        return rng.integers(0, p.rows, size=p.rows)
    queries = mt.query_slices(p.groups)
    chosen = rng.integers(0, len(queries), size=len(queries))
    return np.concatenate([queries[q] for q in chosen])


def _take(p: mt.Predictions, index: np.ndarray, rng_groups: bool) -> mt.Predictions:
    taken = p.take(index)
    if rng_groups and p.groups is not None:
        # A query drawn twice must count as two queries: renumber by position.
        taken = mt.Predictions(
            p.task, taken.y_true, taken.scores, _renumbered(p, index), p.k, p.classes
        )
    return taken


def _renumbered(p: mt.Predictions, index: np.ndarray) -> np.ndarray:
    assert p.groups is not None
    starts = np.r_[True, p.groups[index][1:] != p.groups[index][:-1]]
    return np.cumsum(starts)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """(lower, upper) percentile interval of the finite values; NaN when there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_intervals(
    p: mt.Predictions,
    names: list[str],
    samples: int,
    confidence: float,
    seed: int,
    progress: Progress | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence interval of each metric over ``samples`` resamples."""
    rng = np.random.default_rng(seed)
    values = np.full((samples, len(names)), np.nan)
    for s in range(samples):
        resample = _take(p, resample_indices(p, rng), rng_groups=True)
        for j, name in enumerate(names):
            values[s, j] = mt.METRICS[name].compute(resample)
        if progress is not None:
            progress(s + 1)
    return {name: percentile_interval(values[:, j], confidence) for j, name in enumerate(names)}


def mcnemar_exact_p(only_a_right: int, only_b_right: int) -> float:
    """Two-sided exact McNemar p-value: binomial(n = discordant, 1/2) tail, doubled, capped at 1."""
    n = only_a_right + only_b_right
    if n == 0:
        return 1.0
    smaller = min(only_a_right, only_b_right)
    log_half_n = n * math.log(0.5)
    tail = sum(
        math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
        for i in range(smaller + 1)
    )
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Comparison:
    """One metric of two versions on the same rows."""

    metric: str
    value_a: float
    value_b: float
    lower: float
    upper: float
    p_value: float
    test: str

    @property
    def difference(self) -> float:
        return self.value_b - self.value_a


def compare(
    a: mt.Predictions,
    b: mt.Predictions,
    names: list[str],
    samples: int,
    confidence: float,
    seed: int,
) -> list[Comparison]:
    """Per metric: values, paired-bootstrap interval of B - A, p-value and the test used."""
    rng = np.random.default_rng(seed)
    point_a, point_b = mt.compute(a, names), mt.compute(b, names)
    differences = np.full((samples, len(names)), np.nan)
    for s in range(samples):
        index = resample_indices(a, rng)
        ra, rb = _take(a, index, rng_groups=True), _take(b, index, rng_groups=True)
        for j, name in enumerate(names):
            spec = mt.METRICS[name]
            differences[s, j] = spec.compute(rb) - spec.compute(ra)
    results = []
    for j, name in enumerate(names):
        observed = point_b[name] - point_a[name]
        lower, upper = percentile_interval(differences[:, j], confidence)
        if name == "accuracy":
            p_value, test = _mcnemar(a, b), "mcnemar"
        else:
            p_value, test = _bootstrap_p(differences[:, j], observed), "paired_bootstrap"
        results.append(Comparison(name, point_a[name], point_b[name], lower, upper, p_value, test))
    return results


def _mcnemar(a: mt.Predictions, b: mt.Predictions) -> float:
    right_a = mt.predicted_classes(a.scores) == a.y_true
    right_b = mt.predicted_classes(b.scores) == b.y_true
    return mcnemar_exact_p(int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a)))


def _bootstrap_p(differences: np.ndarray, observed: float) -> float:
    """Share of resampled differences, centred on 0, at least as extreme as the observed one."""
    finite = differences[np.isfinite(differences)]
    if finite.size == 0 or not math.isfinite(observed):
        return float("nan")
    centred = finite - np.mean(finite)
    extreme = np.sum(np.abs(centred) >= abs(observed) - 1e-12)
    return float((extreme + 1) / (finite.size + 1))
