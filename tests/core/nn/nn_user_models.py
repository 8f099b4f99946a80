"""User code referenced by the catalogue tests as ``nn_user_models:factory``."""

from __future__ import annotations

import torch


def tiny(input_size: int, num_outputs: int, hidden: int = 8) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(input_size, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_outputs)
    )


def broken(**kwargs) -> torch.nn.Module:
    raise RuntimeError("the user's factory is broken on purpose")


def wrong_width(input_size: int, num_outputs: int) -> torch.nn.Module:
    return torch.nn.Linear(input_size + 1, num_outputs)


def not_a_module() -> str:
    return "nope"
