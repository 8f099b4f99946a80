"""Hyperparameter search: trials as child jobs, and the choice of the best.

A search parent trains nothing: at create time it is expanded into one child
job per trial (GRID: every combination of the parameters' values, in order,
up to ``n_trials``; RANDOM: ``n_trials`` draws seeded by the training seed),
each a copy of the parent with the searched fields replaced and no target
model. The worker that ends the last trial ranks the trials by the objective
metric and registers the best one under the parent's target model.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from aimass.core.errors import InvalidArgument
from aimass.core.protodict import message_from_dict, message_to_dict
from aimass.training.trainer import metric_goal
from aimass.training.v1 import training_pb2 as tpb

MAX_TRIALS = 256
_SEARCHABLE_ROOTS = ("model", "training")


def _range_values(rng: tpb.ParameterRange, field: str) -> list[Any]:
    if rng.max < rng.min:
        raise InvalidArgument(f"{field}.range.max", f"{rng.max} is below min {rng.min}")
    if rng.log_scale and rng.min <= 0:
        raise InvalidArgument(f"{field}.range.min", "must be > 0 on a log scale")
    points = rng.grid_points or 5
    if points == 1:
        values = [rng.min]
    elif rng.log_scale:
        low, high = math.log(rng.min), math.log(rng.max)
        values = [math.exp(low + (high - low) * i / (points - 1)) for i in range(points)]
    else:
        values = [rng.min + (rng.max - rng.min) * i / (points - 1) for i in range(points)]
    if rng.integer:
        values = list(dict.fromkeys(round(v) for v in values))
    return values


def _draw(rng: tpb.ParameterRange, generator: random.Random) -> Any:
    if rng.log_scale:
        value = math.exp(generator.uniform(math.log(rng.min), math.log(rng.max)))
    else:
        value = generator.uniform(rng.min, rng.max)
    return round(value) if rng.integer else value


def _domain(parameter: tpb.SearchParameter, field: str) -> str:
    if not parameter.path:
        raise InvalidArgument(f"{field}.path", "is required")
    if parameter.path.split(".")[0] not in _SEARCHABLE_ROOTS:
        raise InvalidArgument(
            f"{field}.path", f"must start with 'model.' or 'training.', got {parameter.path!r}"
        )
    domain = parameter.WhichOneof("domain")
    if domain is None:
        raise InvalidArgument(field, "set values or range")
    if domain == "values" and not parameter.values.values:
        raise InvalidArgument(f"{field}.values", "must not be empty")
    return domain


def trial_parameters(search: tpb.HyperparameterSearch, seed: int) -> list[dict[str, Any]]:
    """The parameter values of each trial, keyed by path."""
    base = "training_job.hyperparameter_search"
    if not search.objective_metric:
        raise InvalidArgument(f"{base}.objective_metric", "is required")
    if not search.parameters:
        raise InvalidArgument(f"{base}.parameters", "list at least one parameter")
    if search.n_trials < 0 or search.n_trials > MAX_TRIALS:
        raise InvalidArgument(f"{base}.n_trials", f"must be in [0, {MAX_TRIALS}]")
    domains = [_domain(p, f"{base}.parameters[{i}]") for i, p in enumerate(search.parameters)]
    paths = [p.path for p in search.parameters]
    algorithm = search.algorithm or (
        tpb.SEARCH_ALGORITHM_GRID
        if all(d == "values" for d in domains)
        else tpb.SEARCH_ALGORITHM_RANDOM
    )
    if algorithm == tpb.SEARCH_ALGORITHM_GRID:
        axes = [
            json_format.MessageToDict(p.values)
            if d == "values"
            else _range_values(p.range, f"{base}.parameters[{i}]")
            for i, (p, d) in enumerate(zip(search.parameters, domains, strict=True))
        ]
        combos = list(itertools.product(*axes))
        if search.n_trials:
            combos = combos[: search.n_trials]
        if len(combos) > MAX_TRIALS:
            raise InvalidArgument(f"{base}.n_trials", f"the grid has {len(combos)} trials")
        return [dict(zip(paths, combo, strict=True)) for combo in combos]
    if not search.n_trials:
        raise InvalidArgument(f"{base}.n_trials", "is required for a random search")
    generator = random.Random(seed)
    trials = []
    for _ in range(search.n_trials):
        trial = {}
        for parameter, domain in zip(search.parameters, domains, strict=True):
            if domain == "values":
                trial[parameter.path] = generator.choice(
                    json_format.MessageToDict(parameter.values)
                )
            else:
                trial[parameter.path] = _draw(parameter.range, generator)
        trials.append(trial)
    return trials


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InvalidArgument("training_job.hyperparameter_search", f"bad path {path!r}")
    node[parts[-1]] = value


def trial_job(parent: tpb.TrainingJob, parameters: dict[str, Any]) -> tpb.TrainingJob:
    """A copy of the parent with the parameters applied, no search and no target model."""
    data = {
        "model": message_to_dict(parent.model),
        "training": message_to_dict(parent.training),
    }
    for path, value in parameters.items():
        if isinstance(value, float) and value.is_integer() and "learning_rate" not in path:
            value = int(value)
        _set_path(data, path, value)
    trial = tpb.TrainingJob()
    trial.CopyFrom(parent)
    trial.ClearField("hyperparameter_search")
    trial.target_model = ""
    trial.model.Clear()
    trial.training.Clear()
    message_from_dict(data["model"], trial.model, "model")
    message_from_dict(data["training"], trial.training, "training")
    return trial


def expand(parent: tpb.TrainingJob) -> list[tuple[tpb.TrainingJob, dict[str, Any]]]:
    """(trial job, its parameters) for every trial of the parent's search."""
    trials = trial_parameters(parent.hyperparameter_search, parent.training.seed)
    return [(trial_job(parent, params), params) for params in trials]


def best_trial(
    trials: Sequence[dict[str, Any]], search: tpb.HyperparameterSearch
) -> dict[str, Any] | None:
    """The succeeded trial with the best objective, or None when none succeeded with it."""
    objective = search.objective_metric
    goal = metric_goal(objective, search.goal)
    scored = [
        t for t in trials if t["state"] == "SUCCEEDED" and objective in (t.get("metrics") or {})
    ]
    if not scored:
        return None
    pick = min if goal == "min" else max
    return pick(scored, key=lambda t: t["metrics"][objective])
