"""User code referenced by the jobs of test_bad_jobs (importable by in-process workers)."""

from __future__ import annotations


def broken(**kwargs):
    raise ValueError("user factory exploded on purpose")
