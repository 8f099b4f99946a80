"""Drift statistics: population stability index and the two-sample Kolmogorov-Smirnov test.

PSI of a current sample against a reference, over bins cut at the
reference's quantiles (so each holds about 1/bins of the reference):

    PSI = sum_i (c_i - r_i) * ln(c_i / r_i)

with ``r_i``/``c_i`` the shares of the reference and the current sample in bin
``i``, floored at ``EPS`` so an empty bin costs a finite amount. Rules of
thumb: below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 a large one. A
feature with fewer distinct reference values than bins gets one bin per value
(categorical features, small integer codes).

KS: the largest distance between the two empirical distribution functions,
with the asymptotic p-value ``Q_KS(sqrt(n m / (n + m)) * D)`` (the method
``scipy.stats.ks_2samp(..., method="asymp")`` uses).
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-4


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges: the reference's quantiles, duplicates merged."""
    values = np.unique(reference)
    if len(values) <= bins:
        # One bin per distinct value: edges halfway between neighbours.
        return (values[:-1] + values[1:]) / 2.0
    quantiles = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(quantiles)


def shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin of ``edges`` (len(edges) + 1 bins, right-closed)."""
    index = np.searchsorted(edges, values, side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(np.float64)
    return counts / max(len(values), 1)


def psi_from_shares(reference: np.ndarray, current: np.ndarray) -> float:
    r = np.maximum(reference, EPS)
    c = np.maximum(current, EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI of ``current`` against ``reference`` (1-d arrays) over reference-quantile bins."""
    reference = _finite(reference)
    current = _finite(current)
    if not len(reference) or not len(current):
        return math.nan
    edges = quantile_edges(reference, bins)
    return psi_from_shares(shares(reference, edges), shares(current, edges))


def categorical_psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI over the categories (class indices, labels) seen in either sample."""
    categories = np.union1d(np.unique(reference), np.unique(current))
    ref = np.array([(reference == c).mean() for c in categories]) if len(reference) else None
    cur = np.array([(current == c).mean() for c in categories]) if len(current) else None
    if ref is None or cur is None:
        return math.nan
    return psi_from_shares(ref, cur)


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    """sup |F_ref(x) - F_cur(x)| over every observed x."""
    a = np.sort(_finite(reference))
    b = np.sort(_finite(current))
    if not len(a) or not len(b):
        return math.nan
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) of the Kolmogorov distribution: 2 sum_j (-1)^(j-1) exp(-2 j^2 x^2)."""
    if x <= 0:
        return 1.0
    if x < 0.2:
        # The alternating series converges slowly here and the value is 1 to 1e-20.
        return 1.0
    j = np.arange(1, 101, dtype=np.float64)
    terms = (-1.0) ** (j - 1) * np.exp(-2.0 * j * j * x * x)
    return float(min(max(2.0 * terms.sum(), 0.0), 1.0))


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """(KS statistic, asymptotic two-sided p-value)."""
    statistic = ks_statistic(reference, current)
    if math.isnan(statistic):
        return statistic, math.nan
    n, m = len(_finite(reference)), len(_finite(current))
    effective = n * m / (n + m)
    return statistic, kolmogorov_sf(math.sqrt(effective) * statistic)


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return values[np.isfinite(values)]
