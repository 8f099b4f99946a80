"""User code for the state-dict imports: factories named as ``tests.byom.factories:<name>``."""

from __future__ import annotations

import torch


def make_mlp(in_features: int, hidden: int, out_features: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out_features)
    )


def broken(**kwargs: object) -> torch.nn.Module:
    raise RuntimeError("this factory always fails")
