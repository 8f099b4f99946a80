"""PSI and KS agree with scipy and with the textbook formulas written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from aimass.evaluation import drift


def reference_psi(expected: np.ndarray, actual: np.ndarray, bins: int) -> float:
    """PSI written out: decile edges of the reference, shares floored at 1e-4."""
    cuts = np.quantile(expected, np.linspace(0, 1, bins + 1))
    cuts[0], cuts[-1] = -np.inf, np.inf
    e = np.histogram(expected, cuts)[0] / len(expected)
    a = np.histogram(actual, cuts)[0] / len(actual)
    e, a = np.maximum(e, 1e-4), np.maximum(a, 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


@pytest.mark.parametrize("shift", [0.0, 0.2, 1.0])
def test_psi_matches_the_formula(shift):
    rng = np.random.default_rng(1)
    expected = rng.normal(size=5000)
    actual = rng.normal(shift, 1.0, size=3000)
    assert drift.psi(expected, actual, 10) == pytest.approx(
        reference_psi(expected, actual, 10), rel=1e-3, abs=1e-4
    )


def test_psi_grows_with_the_shift_and_is_near_zero_for_the_same_distribution():
    rng = np.random.default_rng(2)
    expected = rng.normal(size=5000)
    same = drift.psi(expected, rng.normal(size=5000))
    small = drift.psi(expected, rng.normal(0.25, 1, size=5000))
    large = drift.psi(expected, rng.normal(1.0, 1, size=5000))
    assert same < 0.02 < small < 0.25 < large


def test_psi_of_a_categorical_feature_has_one_bin_per_value():
    expected = np.array([0] * 50 + [1] * 30 + [2] * 20, dtype=float)
    actual = np.array([0] * 20 + [1] * 30 + [2] * 50, dtype=float)
    r, a = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    want = float(np.sum((a - r) * np.log(a / r)))
    assert drift.psi(expected, actual, 10) == pytest.approx(want)
    assert drift.categorical_psi(expected, actual) == pytest.approx(want)


@pytest.mark.parametrize(("n", "m", "shift"), [(400, 300, 0.0), (2000, 700, 0.3), (50, 80, 1.0)])
def test_ks_statistic_matches_scipy(n, m, shift):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=n), rng.normal(shift, 1.2, size=m)
    statistic, p_value = drift.ks_test(a, b)
    assert statistic == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    # The p-value is the Kolmogorov limit distribution at sqrt(nm/(n+m)) D.
    want = stats.kstwobign.sf(math.sqrt(n * m / (n + m)) * statistic)
    assert p_value == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_ks_with_ties_matches_scipy():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 5, 300).astype(float), rng.integers(0, 6, 200).astype(float)
    assert drift.ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic)


def test_kolmogorov_survival_function_matches_scipy():
    for x in (0.1, 0.3, 0.5, 0.8, 1.0, 1.36, 2.0, 3.0):
        assert drift.kolmogorov_sf(x) == pytest.approx(stats.kstwobign.sf(x), abs=1e-12)


def test_empty_or_non_finite_samples_give_nan():
    assert math.isnan(drift.psi(np.array([]), np.array([1.0])))
    assert math.isnan(drift.ks_statistic(np.array([np.nan]), np.array([1.0])))
