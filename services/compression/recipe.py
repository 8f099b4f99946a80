"""Running a recipe: steps in order, each checked against the parent, the result chosen.

Pure computation over local files and in-memory data (no gRPC): the runner
fetches the parent and the splits, calls :func:`run_recipe` in a thread, then
registers what it chose.

Chain mode: each step starts from the model of the last step that ran
(APPLIED or OVER_BUDGET: "prune 50% -> fine-tune" must fine-tune the pruned
network even when pruning alone broke the budget); the result is the last
APPLIED step. Candidates mode: every step starts from the parent; the result is
the best APPLIED step by the selection. A step is

- SKIPPED when it does not apply (operator or architecture not supported, no
  PyTorch network to work on), with the reason naming what is missing;
- FAILED when it raised, or when a step meant to keep the function
  (quantization, FP16, graph optimization) moves the outputs beyond the
  tolerance;
- OVER_BUDGET when its metric drops more than the budget allows;
- APPLIED otherwise.

A quantization step chained after a graph optimization quantizes the graph the
optimization started from and applies the same optimization to the result: ORT's
offline-optimized graph holds fused contrib operators (``com.microsoft.FusedGemm``...)
whose outputs ONNX shape inference cannot type, so onnxruntime's quantizer stops
("Unable to find data type for weight_name=...") or leaves the fused layers in float.

Unlabelled models (sentence embeddings): with the metric ``cosine`` the check rows need no
label; the metric is the smallest per-row cosine similarity of the model's outputs to the
parent's (1.0 for the parent), and the budget bounds its drop.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aimass.compression import measure as ms
from aimass.compression import onnx_steps as ox
from aimass.compression import structural as sx
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core import nn as ann

log = logging.getLogger(__name__)

APPLIED, SKIPPED, OVER_BUDGET, FAILED = "APPLIED", "SKIPPED", "OVER_BUDGET", "FAILED"
DEFAULT_TOLERANCE = 0.1
# Steps that must compute the parent's function (up to rounding): held to the tolerance.
FUNCTION_PRESERVING = {"quantize_dynamic", "quantize_static", "fp16", "graph_optimize"}
TORCH_STEPS = {"prune_unstructured", "prune_structured", "low_rank", "fine_tune", "distill"}
LOWER_IS_BETTER = {"mse", "mae", "log_loss"}
# Label-free metric: agreement with the parent's outputs on the check rows.
COSINE = "cosine"
QUANTIZE_STEPS = {"quantize_dynamic", "quantize_static"}

_SCOPES = {pb.PRUNE_SCOPE_PER_LAYER: "per_layer"}
_DIMENSIONS = {pb.PRUNE_DIMENSION_NEURONS: "neurons", pb.PRUNE_DIMENSION_CHANNELS: "channels",
               pb.PRUNE_DIMENSION_HEADS: "heads"}  # fmt: skip
_CALIBRATORS = {pb.CALIBRATION_METHOD_ENTROPY: "entropy",
                pb.CALIBRATION_METHOD_PERCENTILE: "percentile"}  # fmt: skip
_LEVELS = {pb.GRAPH_OPTIMIZATION_LEVEL_BASIC: "basic", pb.GRAPH_OPTIMIZATION_LEVEL_ALL: "all"}


def _quant(value: int, default: str) -> str:
    return {pb.QUANT_TYPE_INT8: "int8", pb.QUANT_TYPE_UINT8: "uint8"}.get(value, default)


def method_of(step: pb.CompressionStep) -> str:
    return step.WhichOneof("method") or ""


def step_name(step: pb.CompressionStep) -> str:
    """The step's name, or one derived from its method ("int8-dynamic", "prune-structured-50")."""
    if step.name:
        return step.name
    method = method_of(step)
    if method == "quantize_dynamic":
        return "int8-dynamic"
    if method == "quantize_static":
        return "int8-static"
    if method in ("prune_unstructured", "prune_structured"):
        sparsity = getattr(step, method).sparsity
        return f"{method.replace('_', '-')}-{round(sparsity * 100)}"
    return method.replace("_", "-")


@dataclass
class EvalData:
    """Rows the metric and the outputs are checked on, already as the model's feeds."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray
    task: str
    metric: str
    batch: int = 256
    # The parent's outputs on ``feeds`` (set by run_recipe): what ``cosine`` compares with.
    reference: np.ndarray | None = None

    def batches(self) -> list[dict[str, np.ndarray]]:
        rows = self.labels.shape[0]
        return [{k: v[i : i + self.batch] for k, v in self.feeds.items()}
                for i in range(0, rows, self.batch)]  # fmt: skip

    def sample(self, rows: int) -> dict[str, np.ndarray]:
        """The first ``rows`` rows, repeated when the split is smaller."""
        count = self.labels.shape[0]
        index = np.arange(rows) % max(count, 1)
        return {k: np.ascontiguousarray(v[index]) for k, v in self.feeds.items()}


def smallest_cosine(outputs: np.ndarray, reference: np.ndarray) -> float:
    """The smallest per-row cosine similarity of ``outputs`` to ``reference`` (rows flattened)."""
    a = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
    b = reference.reshape(reference.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # Two zero rows agree; one zero row against a non-zero one does not.
    both_zero = norms == 0
    cosine = np.where(both_zero, 1.0, (a * b).sum(axis=1) / np.where(both_zero, 1.0, norms))
    agree = np.all(a == b, axis=1)
    cosine = np.where(both_zero & ~agree, 0.0, cosine)
    return float(cosine.min()) if cosine.size else float("nan")


def metric_value(outputs: np.ndarray, data: EvalData) -> float:
    if data.metric == COSINE:
        assert data.reference is not None, "cosine needs the parent's outputs"
        return smallest_cosine(outputs, data.reference)
    if data.metric == "accuracy":
        if outputs.shape[1] == 1:
            predicted = (outputs.reshape(-1) > 0).astype(np.int64)
        else:
            predicted = outputs.argmax(axis=1)
        return float((predicted == data.labels.reshape(-1)).mean())
    error = outputs.reshape(-1) - data.labels.reshape(-1).astype(np.float64)
    return float(np.abs(error).mean()) if data.metric == "mae" else float((error**2).mean())


def drop(parent: float, value: float, metric: str) -> float:
    """How much worse ``value`` is than ``parent`` (positive = worse)."""
    return value - parent if metric in LOWER_IS_BETTER else parent - value


@dataclass
class TrainRequest:
    """A fine-tuning or distillation run, handed to the training service by the runner."""

    kind: str  # "fine_tune" (continue ``model``) or "distill" (train the student ``model``)
    step_index: int
    model: sx.TorchModel
    epochs: int
    learning_rate: float
    batch_size: int
    dataset_version: str = ""  # empty: the parent's
    # distill: the teacher is the chain's current ONNX file (or the registered parent).
    teacher_onnx: Path | None = None
    teacher_version: str = ""
    teacher_parameters: int = 0
    temperature: float = 4.0
    alpha: float = 0.5


@dataclass
class Trained:
    model: sx.TorchModel
    job: str  # the training job that trained it, "trainingJobs/{job}"


Train = Callable[[TrainRequest, Callable[[], bool]], Trained]


@dataclass
class Inputs:
    """What a recipe runs on."""

    parent_onnx: Path
    torch_model: sx.TorchModel | None
    no_torch_reason: str
    evaluation: EvalData
    # Calibration batches by (split, rows). Filled by the runner.
    calibration: Callable[[pb.QuantizeStatic], list[dict[str, np.ndarray]]]
    # Runs a fine_tune / distill step as a training job and waits for it (the runner's).
    train: Train
    parent_learning_rate: float = 1e-3
    parent_batch_size: int = 64
    parent_version: str = ""


@dataclass
class Outcome:
    """What one step did."""

    name: str
    method: str
    status: str = APPLIED
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    onnx_path: Path | None = None
    torch_model: sx.TorchModel | None = None
    metric_before: float = float("nan")
    metric_after: float = float("nan")
    max_output_difference: float = float("nan")
    # The PyTorch network the ONNX file computes (before quantization for ONNX steps); None
    # when the chain went through ONNX only.
    network: sx.TorchModel | None = None


@dataclass
class RecipeResult:
    parent_metric: float
    parent_outputs: np.ndarray
    outcomes: list[Outcome]
    chosen: Outcome | None


@dataclass
class _State:
    onnx_path: Path
    torch_model: sx.TorchModel | None
    no_torch_reason: str
    metric: float
    network: sx.TorchModel | None = None
    outputs: np.ndarray | None = None
    # Set after a graph_optimize step: (the file it started from, its level). A quantization
    # step quantizes that file and optimizes the result again (see the module docstring).
    before_optimization: tuple[Path, str] | None = None


def _export(model: sx.TorchModel, path: Path, sample: dict[str, np.ndarray]) -> Path:
    tensors = tuple(torch.from_numpy(sample[s.name][:8]) for s in model.signature.inputs)
    ann.export_onnx(model.module, model.signature, path, sample=tensors, atol=1e-3, rtol=1e-2)
    return path


def _run_step(
    step: pb.CompressionStep, state: _State, inputs: Inputs, target: Path, outcome: Outcome,
    cancelled: Callable[[], bool], index: int,
) -> None:  # fmt: skip
    """Produces ``outcome.onnx_path`` (and ``torch_model`` for PyTorch steps)."""
    method = outcome.method
    sample = inputs.evaluation.sample(8)
    if method in TORCH_STEPS and state.torch_model is None:
        raise ox.StepSkipped(f"{method} needs the network in PyTorch: {state.no_torch_reason}")
    model = state.torch_model
    source, reoptimize, quantized = state.onnx_path, "", target
    if method in QUANTIZE_STEPS and state.before_optimization is not None:
        source, reoptimize = state.before_optimization
        quantized = target.with_name(f"{target.stem}-before-optimization.onnx")
    if method == "quantize_dynamic":
        s = step.quantize_dynamic
        per_channel, op_types = ox.int8_defaults(
            source, s.per_channel if s.HasField("per_channel") else None, s.op_types_to_quantize,
        )  # fmt: skip
        outcome.params = {"per_channel": per_channel, "reduce_range": s.reduce_range,
                          "weight_type": _quant(s.weight_type, "int8"),
                          "op_types_to_quantize": op_types}  # fmt: skip
        ox.quantize_dynamic(source, quantized, **outcome.params)
    elif method == "quantize_static":
        s = step.quantize_static
        calibration = inputs.calibration(s)
        per_channel, op_types = ox.int8_defaults(
            source, s.per_channel if s.HasField("per_channel") else None, s.op_types_to_quantize,
        )  # fmt: skip
        outcome.params = {
            "method": _CALIBRATORS.get(s.calibrator, "minmax"),
            "percentile": s.percentile or 99.999, "per_channel": per_channel,
            "op_types_to_quantize": op_types,
            "nodes_to_exclude": list(s.nodes_to_exclude),
            "op_types_to_exclude": list(s.op_types_to_exclude),
            "quant_format": "qoperator" if s.quant_format == pb.QUANT_FORMAT_QOPERATOR else "qdq",
            "activation_type": _quant(s.activation_type, "uint8"),
            "weight_type": _quant(s.weight_type, "int8"),
        }  # fmt: skip
        ox.quantize_static(source, quantized, calibration, **outcome.params)
        outcome.params["calibration_rows"] = sum(
            next(iter(b.values())).shape[0] for b in calibration
        )
    elif method == "fp16":
        s = step.fp16
        outcome.params = {"keep_io_types": True, "op_block_list": list(s.op_block_list)}
        ox.convert_fp16(state.onnx_path, target, **outcome.params)
    elif method == "graph_optimize":
        outcome.params = {"level": _LEVELS.get(step.graph_optimize.level, "extended")}
        ox.optimize_graph(state.onnx_path, target, **outcome.params)
    elif method == "prune_unstructured":
        s = step.prune_unstructured
        scope = _SCOPES.get(s.scope, "global")
        outcome.params = {"sparsity": s.sparsity, "scope": scope}
        outcome.torch_model = sx.prune_unstructured(model, s.sparsity, scope)  # type: ignore[arg-type]
        outcome.params["achieved_sparsity"] = sx.sparsity_of(outcome.torch_model.module)
    elif method == "prune_structured":
        s = step.prune_structured
        dimension = _DIMENSIONS.get(s.dimension, "")
        outcome.params = {"sparsity": s.sparsity, "dimension": dimension or "auto"}
        outcome.torch_model = sx.prune_structured(model, s.sparsity, dimension)  # type: ignore[arg-type]
    elif method == "low_rank":
        outcome.params = {"rank_ratio": step.low_rank.rank_ratio}
        outcome.torch_model, replaced = sx.low_rank(model, step.low_rank.rank_ratio)  # type: ignore[arg-type]
        outcome.params["layers_factorized"] = replaced
    elif method == "fine_tune":
        s = step.fine_tune
        outcome.params = {
            "epochs": s.epochs or 3,
            "learning_rate": s.learning_rate or inputs.parent_learning_rate / 10,
            "batch_size": s.batch_size or inputs.parent_batch_size,
        }
        assert model is not None
        request = TrainRequest("fine_tune", index, model, dataset_version=s.dataset_version,
                               **outcome.params)  # fmt: skip
        trained = inputs.train(request, cancelled)
        outcome.torch_model = trained.model
        outcome.params["training_job"] = trained.job
    elif method == "distill":
        s = step.distill
        assert model is not None
        spec = (
            s.student_spec if s.WhichOneof("student") == "student_spec"
            else sx.scaled_spec(model.spec, s.scale_factor or 0.5)  # type: ignore[arg-type]
        )  # fmt: skip
        student = sx.build_student(spec, model.data)
        outcome.params = {
            "student": ann.spec_to_dict(spec), "temperature": s.temperature or 4.0,
            "alpha": s.alpha or 0.5, "epochs": s.epochs or 10,
            "learning_rate": s.learning_rate or 1e-3, "batch_size": inputs.parent_batch_size,
            "teacher_parameters": model.parameter_count,
            "student_parameters": student.parameter_count,
        }  # fmt: skip
        from_parent = state.onnx_path == inputs.parent_onnx
        request = TrainRequest(
            "distill", index, student, outcome.params["epochs"], outcome.params["learning_rate"],
            outcome.params["batch_size"], s.dataset_version, teacher_onnx=state.onnx_path,
            teacher_version=inputs.parent_version if from_parent else "",
            teacher_parameters=model.parameter_count, temperature=outcome.params["temperature"],
            alpha=outcome.params["alpha"],
        )  # fmt: skip
        trained = inputs.train(request, cancelled)
        outcome.torch_model = trained.model
        outcome.params["training_job"] = trained.job
    else:
        raise ox.StepSkipped(f"unknown method {method!r}")
    if reoptimize:  # quantized before the chain's graph optimization: apply it again
        ox.optimize_graph(quantized, target, level=reoptimize)
        outcome.params["graph_optimize_after"] = reoptimize
    if outcome.torch_model is not None:
        outcome.params["parameters"] = outcome.torch_model.parameter_count
        _export(outcome.torch_model, target, sample)
    outcome.network = outcome.torch_model or state.network
    outcome.onnx_path = target


def _judge(
    outcome: Outcome, inputs: Inputs, reference: np.ndarray, parent_metric: float,
    budget: pb.AccuracyBudget | None, tolerance: float,
) -> np.ndarray:  # fmt: skip
    """Sets the outcome's status; ``reference`` is the output of the model the step started from."""
    assert outcome.onnx_path is not None
    problem = ms.load_problem(outcome.onnx_path)
    if problem:
        outcome.status, outcome.reason = FAILED, problem
        outcome.onnx_path = None
        return reference
    outputs = ms.outputs_of(outcome.onnx_path, inputs.evaluation.batches())
    outcome.max_output_difference = ms.max_difference(outputs, reference)
    outcome.metric_after = metric_value(outputs, inputs.evaluation)
    if not np.all(np.isfinite(outputs)):
        outcome.status, outcome.reason = FAILED, "the model's outputs are not all finite"
        return outputs
    scale = max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)
    relative = outcome.max_output_difference / scale
    if outcome.method in FUNCTION_PRESERVING and relative > tolerance:
        outcome.status = FAILED
        outcome.reason = (
            f"outputs differ from the parent's by {outcome.max_output_difference:.4g} "
            f"({relative:.3g} of the largest output), over the tolerance {tolerance:g}"
        )
        return outputs
    if budget is not None:
        lost = drop(parent_metric, outcome.metric_after, inputs.evaluation.metric)
        if lost > budget.max_drop + 1e-12:
            outcome.status = OVER_BUDGET
            outcome.reason = (
                f"{inputs.evaluation.metric} {outcome.metric_after:.4f} vs the parent's "
                f"{parent_metric:.4f}: a drop of {lost:.4f}, over the budget {budget.max_drop:g}"
            )
    return outputs


def run_recipe(
    recipe: pb.Recipe,
    inputs: Inputs,
    workdir: Path,
    *,
    progress: Callable[[int, Outcome], None] = lambda index, outcome: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> RecipeResult:
    """Runs every step; returns the outcomes in order and the chosen one (or None)."""
    parent_outputs = ms.outputs_of(inputs.parent_onnx, inputs.evaluation.batches())
    inputs.evaluation.reference = parent_outputs
    parent_metric = metric_value(parent_outputs, inputs.evaluation)
    budget = recipe.accuracy_budget if recipe.HasField("accuracy_budget") else None
    tolerance = recipe.output_tolerance or DEFAULT_TOLERANCE
    chain = recipe.mode != pb.RECIPE_MODE_CANDIDATES
    start = _State(
        inputs.parent_onnx, inputs.torch_model, inputs.no_torch_reason, parent_metric,
        inputs.torch_model, parent_outputs,
    )  # fmt: skip
    state = start
    outcomes: list[Outcome] = []
    for index, step in enumerate(recipe.steps):
        if cancelled():
            break
        outputs = None
        outcome = Outcome(step_name(step), method_of(step), metric_before=state.metric)
        target = workdir / f"step-{index}.onnx"
        try:
            with torch.no_grad() if outcome.method in FUNCTION_PRESERVING else _nullcontext():
                _run_step(step, state, inputs, target, outcome, cancelled, index)
            reference = state.outputs if state.outputs is not None else parent_outputs
            outputs = _judge(outcome, inputs, reference, parent_metric, budget, tolerance)
        except ox.StepSkipped as skipped:
            outcome.status, outcome.reason = SKIPPED, str(skipped)
        except Exception as err:  # a step that breaks is reported, the recipe goes on
            log.warning("step %s failed", outcome.name, exc_info=True)
            outcome.status, outcome.reason = FAILED, f"{type(err).__name__}: {err}"
        outcomes.append(outcome)
        progress(index, outcome)
        if chain and outcome.status in (APPLIED, OVER_BUDGET):
            state = _next_state(outcome, state, outputs)
    chosen = _choose(outcomes, chain, recipe.selection, inputs.evaluation.metric)
    return RecipeResult(parent_metric, parent_outputs, outcomes, chosen)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def _next_state(outcome: Outcome, state: _State, outputs: np.ndarray | None) -> _State:
    assert outcome.onnx_path is not None
    if outcome.torch_model is not None:
        return _State(
            outcome.onnx_path, outcome.torch_model, "", outcome.metric_after,
            outcome.torch_model, outputs,
        )  # fmt: skip
    reason = f"step {outcome.name!r} left an ONNX-only model ({outcome.method})"
    before = None
    if outcome.method == "graph_optimize":  # optimize -> optimize: back to the first input
        first = state.before_optimization[0] if state.before_optimization else state.onnx_path
        before = (first, str(outcome.params["level"]))
    return _State(
        outcome.onnx_path, None, reason, outcome.metric_after, state.network, outputs, before
    )


def _choose(
    outcomes: Sequence[Outcome], chain: bool, selection: int, metric: str
) -> Outcome | None:
    applied = [o for o in outcomes if o.status == APPLIED]
    if not applied:
        return None
    if chain:
        return applied[-1]
    if selection == pb.SELECTION_SMALLEST:
        return min(applied, key=lambda o: o.onnx_path.stat().st_size)  # type: ignore[union-attr]
    if selection == pb.SELECTION_MOST_ACCURATE:
        sign = 1 if metric in LOWER_IS_BETTER else -1
        return min(applied, key=lambda o: sign * o.metric_after)
    return None  # FASTEST / LOWEST_LATENCY: decided by the runner after measuring


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="aimass-compression-")
