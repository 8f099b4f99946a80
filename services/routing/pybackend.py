"""The python-backend batching logic, moved to :mod:`aimass.core.triton.pybackend`."""

from __future__ import annotations

from aimass.core.triton.pybackend import Feed, OnnxBatchRunner, Result, split_outputs

__all__ = ["Feed", "OnnxBatchRunner", "Result", "split_outputs"]
