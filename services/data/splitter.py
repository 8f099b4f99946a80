"""Deterministic train/valid/test assignment of rows.

Rule for exact ratios (largest remainder): each split first gets ``floor(n * p / 100)``
rows; the rows left over go one each to the splits with the largest fractional parts,
ties broken in train, valid, test order. With ``stratify`` the rule is applied within
each label value (classes in sorted order), so each split keeps the label distribution;
the split sizes then add up per class.

Which rows go where is decided by a permutation from ``numpy.random.default_rng(seed)``
(shuffle) or by source order (no shuffle: train is the head, test the tail). Within a
split, rows keep their source order, so splits are written in one streaming pass and the
same input, config and seed always give byte-identical files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from aimass.core.errors import InvalidArgument

TRAIN, VALID, TEST = 0, 1, 2
NAMES = ("train", "valid", "test")


def split_counts(n: int, percents: Sequence[float]) -> list[int]:
    """Rows per split for ``n`` rows, by the largest-remainder rule."""
    exact = [n * p / 100.0 for p in percents]
    counts = [math.floor(x) for x in exact]
    left = n - sum(counts)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def assign(
    n: int,
    percents: Sequence[float],
    *,
    seed: int,
    shuffle: bool = True,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """An int8 array giving each row's split (0 train, 1 valid, 2 test).

    Refuses (InvalidArgument naming the split) a split with a positive percentage that
    would get no rows.
    """
    out = np.empty(n, dtype=np.int8)
    rng = np.random.default_rng(seed)
    groups = _groups(n, labels)
    totals = [0, 0, 0]
    for rows in groups:
        counts = split_counts(len(rows), percents)
        order = rng.permutation(rows) if shuffle else rows
        start = 0
        for split, count in enumerate(counts):
            out[order[start : start + count]] = split
            start += count
            totals[split] += count
    for split, (total, percent) in enumerate(zip(totals, percents, strict=True)):
        if percent > 0 and total == 0:
            raise InvalidArgument(
                f"splitting.{NAMES[split]}",
                f"{percent:g}% of {n} rows leaves the {NAMES[split]} split empty",
            )
    return out


def _groups(n: int, labels: np.ndarray | None) -> list[np.ndarray]:
    if labels is None:
        return [np.arange(n)]
    values, inverse = np.unique(labels, return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(len(values))]
