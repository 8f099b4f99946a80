"""Structural compression in PyTorch: pruning, low-rank factorization, fine-tuning, distillation.

Works on networks of the catalogue (:mod:`aimass.core.nn`), rebuilt from a
model version's config and state dict. A :class:`TorchModel` carries the
module, its ModelSpec and DataSignature, so a pruned network is a new spec
(smaller hidden sizes, fewer channels) that :func:`aimass.core.nn.rebuild_model`
gives back anywhere from the registered config, with the surviving weights
copied in.

- :func:`prune_unstructured`: zero the smallest weights (global or per layer),
  the masks kept so fine-tuning does not revive them.
- :func:`prune_structured`: remove whole neurons (MLP and head layers,
  transformer feed-forward) or channels (convolutions) ranked by the L2 norm
  of their weights; the network gets genuinely smaller.
- :func:`low_rank`: Linear(in, out) -> Linear(in, r) @ Linear(r, out) by
  truncated SVD where it saves parameters.
- :func:`fine_tune`: a plain training loop (Adam, labels) for benchmarks and tests;
  the fine_tune and distill steps of a job run as training jobs
  (:mod:`aimass.compression.training_jobs`).

Anything a technique cannot handle raises :class:`StepSkipped` naming the
layer or architecture.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aimass.compression.onnx_steps import StepSkipped
from aimass.core import nn as ann
from aimass.core.errors import InvalidArgument
from aimass.core.nn import networks

Masks = dict[str, torch.Tensor]


@dataclass
class TorchModel:
    """A network with what rebuilds it: spec + data signature (None spec: not rebuildable)."""

    module: nn.Module
    signature: ann.ModelSignature
    data: ann.DataSignature
    spec: ann.ModelSpec | None
    masks: Masks = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return ann.architecture_of(self.spec) if self.spec is not None else "modified"

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def copy(self) -> TorchModel:
        return TorchModel(
            copy.deepcopy(self.module), self.signature, self.data,
            _copy_spec(self.spec), {k: v.clone() for k, v in self.masks.items()},
        )  # fmt: skip


def _copy_spec(spec: ann.ModelSpec | None) -> ann.ModelSpec | None:
    if spec is None:
        return None
    clone = ann.ModelSpec()
    clone.CopyFrom(spec)
    return clone


def load_torch_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> TorchModel:
    built = ann.rebuild_model(config)
    built.module.load_state_dict(state_dict)
    built.module.eval()
    spec = ann.spec_from_dict(config["model"])
    data = ann.DataSignature.from_dict(config["data_signature"])
    return TorchModel(built.module, built.signature, data, spec)


def _rebuild(spec: ann.ModelSpec, data: ann.DataSignature) -> nn.Module:
    torch.manual_seed(0)
    return ann.build_model(spec, data).module


# ------------------------------------------------------------------ unstructured


def _prunable(module: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of Linear and convolution layers (and attention projections), by name."""
    found = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear | nn.Conv1d | nn.Conv2d):
            found[f"{name}.weight"] = child.weight
        elif (
            isinstance(child, nn.MultiheadAttention | networks.HeadAttention)
            and child.in_proj_weight is not None
        ):
            found[f"{name}.in_proj_weight"] = child.in_proj_weight
    return found


def prune_unstructured(model: TorchModel, sparsity: float, scope: str = "global") -> TorchModel:
    """A copy with the smallest ``sparsity`` of the prunable weights set to zero."""
    result = model.copy()
    weights = _prunable(result.module)
    if not weights:
        raise StepSkipped(f"the {model.architecture} network has no Linear or Conv weights")
    with torch.no_grad():
        if scope == "global":
            magnitudes = torch.cat([w.detach().abs().flatten() for w in weights.values()])
            k = int(sparsity * magnitudes.numel())
            threshold = torch.kthvalue(magnitudes, max(k, 1)).values if k else -1.0
            masks = {n: (w.abs() > threshold) for n, w in weights.items()}
        else:
            masks = {}
            for name, weight in weights.items():
                k = int(sparsity * weight.numel())
                if k == 0:
                    masks[name] = torch.ones_like(weight, dtype=torch.bool)
                    continue
                threshold = torch.kthvalue(weight.detach().abs().flatten(), k).values
                masks[name] = weight.abs() > threshold
        for name, weight in weights.items():
            previous = result.masks.get(name)
            mask = masks[name] if previous is None else masks[name] & previous
            weight.mul_(mask)
            result.masks[name] = mask
    return result


def apply_masks(module: nn.Module, masks: Masks) -> None:
    if not masks:
        return
    weights = _prunable(module)
    with torch.no_grad():
        for name, mask in masks.items():
            if name in weights and weights[name].shape == mask.shape:
                weights[name].mul_(mask)


def sparsity_of(module: nn.Module) -> float:
    weights = list(_prunable(module).values())
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


# -------------------------------------------------------------------- structured


def _kept(count: int, sparsity: float) -> int:
    return max(1, round(count * (1.0 - sparsity)))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, keep).indices).values


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1).norm(dim=1)


class _Slicer:
    """Builds the state dict of the smaller network from the parent's, layer by layer."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.out: dict[str, torch.Tensor] = {}

    def linear_or_conv(
        self, prefix: str, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None
    ) -> None:
        weight = self.state[f"{prefix}.weight"]
        if keep_in is not None:
            weight = weight[:, keep_in]
        if keep_out is not None:
            weight = weight[keep_out]
        self.out[f"{prefix}.weight"] = weight.clone()
        if f"{prefix}.bias" in self.state:
            bias = self.state[f"{prefix}.bias"]
            self.out[f"{prefix}.bias"] = (bias[keep_out] if keep_out is not None else bias).clone()

    def norm(self, prefix: str, keep: torch.Tensor | None) -> None:
        for key, value in self.state.items():
            if key.startswith(f"{prefix}."):
                sliced = value[keep] if keep is not None and value.dim() == 1 else value
                self.out[key] = sliced.clone()

    def copy_rest(self) -> None:
        for key, value in self.state.items():
            self.out.setdefault(key, value.clone())


def _sequential_prune(
    slicer: _Slicer,
    prefix: str,
    sequence: nn.Sequential,
    sparsity: float,
    keep_in: torch.Tensor | None,
    prune_last: bool,
) -> tuple[list[int], torch.Tensor | None]:
    """Prunes the outputs of every Linear/Conv of ``sequence`` (the last one only if asked)."""
    layers = [i for i, m in enumerate(sequence) if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    sizes = []
    for index, child in enumerate(sequence):
        name = f"{prefix}.{index}"
        if isinstance(child, nn.Linear | nn.Conv1d | nn.Conv2d):
            last = index == layers[-1]
            weight = slicer.state[f"{name}.weight"]
            if keep_in is not None:
                weight = weight[:, keep_in]
            keep_out = None
            if prune_last or not last:
                keep_out = _top(_row_norms(weight), _kept(weight.shape[0], sparsity))
                sizes.append(int(keep_out.numel()))
            slicer.linear_or_conv(name, keep_in, keep_out)
            keep_in = keep_out
        elif isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d):
            slicer.norm(name, keep_in)
    return sizes, keep_in


def _flat_columns(keep_channels: torch.Tensor, per_channel: int) -> torch.Tensor:
    offsets = torch.arange(per_channel)
    return (keep_channels.unsqueeze(1) * per_channel + offsets).reshape(-1)


def prune_structured(model: TorchModel, sparsity: float, dimension: str = "") -> TorchModel:
    """A smaller network with ``sparsity`` of the neurons or channels of each layer removed."""
    if model.spec is None:
        raise StepSkipped("structured pruning needs a catalogue network; this one was modified")
    architecture = model.architecture
    default = {"cnn1d": "channels", "cnn2d": "channels", "transformer": "heads+neurons"}
    dimension = dimension or default.get(architecture, "neurons")
    state = {k: v.detach() for k, v in model.module.state_dict().items()}
    slicer = _Slicer(state)
    spec = _copy_spec(model.spec)
    assert spec is not None
    module = model.module
    if architecture == "mlp" and dimension == "neurons":
        sizes, _ = _sequential_prune(slicer, "layers", module.layers, sparsity, None, False)
        del spec.mlp.hidden_sizes[:]
        spec.mlp.hidden_sizes.extend(sizes)
    elif architecture in ("cnn1d", "cnn2d"):
        sub = spec.cnn2d if architecture == "cnn2d" else spec.cnn1d
        conv_sparsity = sparsity if dimension == "channels" else 0.0
        sizes, keep = _sequential_prune(
            slicer, "features", module.features, conv_sparsity, None, True
        )
        if conv_sparsity:
            del sub.channels[:]
            sub.channels.extend(sizes)
        first_head = module.head[0]
        per_channel = (
            first_head.in_features // module.features[_last_conv(module.features)].out_channels
        )
        keep_in = _flat_columns(keep, per_channel) if keep is not None else None
        head_sizes, _ = _sequential_prune(slicer, "head", module.head, sparsity, keep_in, False)
        del sub.hidden_sizes[:]
        sub.hidden_sizes.extend(head_sizes)
    elif architecture == "transformer" and dimension in ("neurons", "heads", "heads+neurons"):
        if "neurons" in dimension:
            spec.transformer.feedforward_dim = _prune_feedforward(slicer, module, sparsity)
        if "heads" in dimension:
            _prune_heads(slicer, module, spec.transformer, sparsity)
    else:
        raise StepSkipped(
            f"structured pruning of {dimension} is not supported for the {architecture} "
            f"architecture (supported: mlp neurons, cnn1d/cnn2d channels and neurons, "
            f"transformer attention heads and feed-forward neurons)"
        )
    slicer.copy_rest()
    smaller = _rebuild(spec, model.data)
    smaller.load_state_dict(slicer.out)
    smaller.eval()
    return TorchModel(smaller, model.signature, model.data, spec)


def _prune_feedforward(slicer: _Slicer, module: nn.Module, sparsity: float) -> int:
    """Removes feed-forward neurons of every encoder layer; the new feedforward_dim."""
    feedforward = 0
    for index, layer in enumerate(module.encoder.layers):
        prefix = f"encoder.layers.{index}"
        keep = _top(_row_norms(layer.linear1.weight), _kept(layer.linear1.out_features, sparsity))
        slicer.linear_or_conv(f"{prefix}.linear1", None, keep)
        slicer.linear_or_conv(f"{prefix}.linear2", keep, None)
        feedforward = int(keep.numel())
    return feedforward


def _prune_heads(slicer: _Slicer, module: nn.Module, spec: Any, sparsity: float) -> None:
    """Removes the same number of attention heads from every layer, the weakest of each.

    A head's score is the L2 norm of its q, k, v rows and its out_proj columns; the kept
    heads keep their width, so the network gets ``head_dim`` = d_model / num_heads of the
    parent and ``num_heads`` = the heads kept (:class:`aimass.core.nn.networks.HeadAttention`).
    """
    heads = spec.num_heads
    head_dim = spec.head_dim or spec.d_model // heads
    kept = _kept(heads, sparsity)
    if kept == heads:
        raise StepSkipped(f"sparsity {sparsity} of {heads} heads removes none")
    for index in range(len(module.encoder.layers)):
        prefix = f"encoder.layers.{index}.self_attn"
        in_weight = slicer.state[f"{prefix}.in_proj_weight"]  # [3 * heads * head_dim, d_model]
        inner = heads * head_dim
        per_head = in_weight.reshape(3, heads, head_dim, -1).permute(1, 0, 2, 3)
        out_weight = slicer.state[f"{prefix}.out_proj.weight"]  # [d_model, inner]
        out_per_head = out_weight.reshape(out_weight.shape[0], heads, head_dim).permute(1, 0, 2)
        scores = (
            per_head.reshape(heads, -1).norm(dim=1) ** 2
            + out_per_head.reshape(heads, -1).norm(dim=1) ** 2
        ).sqrt()
        keep = _top(scores, kept)
        columns = _flat_columns(keep, head_dim)  # positions within one of q, k, v
        rows = torch.cat([columns + block * inner for block in range(3)])
        slicer.out[f"{prefix}.in_proj_weight"] = in_weight[rows].clone()
        slicer.out[f"{prefix}.in_proj_bias"] = slicer.state[f"{prefix}.in_proj_bias"][rows].clone()
        slicer.out[f"{prefix}.out_proj.weight"] = out_weight[:, columns].clone()
    spec.num_heads = kept
    spec.head_dim = head_dim


def _last_conv(sequence: nn.Sequential) -> int:
    return max(i for i, m in enumerate(sequence) if isinstance(m, nn.Conv1d | nn.Conv2d))


# ---------------------------------------------------------------------- low rank


class LowRankLinear(nn.Sequential):
    """Linear(in, r, bias=False) then Linear(r, out): a rank-r product."""


def low_rank(model: TorchModel, rank_ratio: float) -> tuple[TorchModel, int]:
    """A copy whose Linear layers are rank-``rank_ratio`` products where that saves parameters.

    Layers inside attention blocks are left alone: torch's fused attention reads
    their weights directly. Returns the model and the number of layers replaced.
    """
    result = model.copy()
    replaced = 0
    skip_inside = (
        nn.MultiheadAttention, nn.TransformerEncoderLayer, networks.HeadAttention,
        networks.HeadEncoderLayer,
    )  # fmt: skip
    for _parent_name, parent in list(result.module.named_modules()):
        if isinstance(parent, skip_inside):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            out_features, in_features = child.weight.shape
            rank = max(1, int(rank_ratio * min(in_features, out_features)))
            if rank * (in_features + out_features) >= in_features * out_features:
                continue
            u, s, vh = torch.linalg.svd(child.weight.detach(), full_matrices=False)
            root = s[:rank].sqrt()
            first = nn.Linear(in_features, rank, bias=False)
            second = nn.Linear(rank, out_features, bias=child.bias is not None)
            with torch.no_grad():
                first.weight.copy_(root.unsqueeze(1) * vh[:rank])
                second.weight.copy_(u[:, :rank] * root.unsqueeze(0))
                if child.bias is not None:
                    second.bias.copy_(child.bias)
            setattr(parent, child_name, LowRankLinear(first, second))
            replaced += 1
    if not replaced:
        raise StepSkipped(
            f"no Linear layer of the {model.architecture} network saves parameters at rank "
            f"ratio {rank_ratio} (attention projections are never factorized)"
        )
    result.spec = None  # no catalogue spec describes the factorized network
    result.masks = {}
    return result, replaced


# ---------------------------------------------------------------------- training


@dataclass
class TrainData:
    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor


def _batches(data: TrainData, batch_size: int, generator: torch.Generator) -> Any:
    rows = data.labels.shape[0]
    order = torch.randperm(rows, generator=generator)
    for start in range(0, rows, batch_size):
        index = order[start : start + batch_size]
        yield tuple(t[index] for t in data.inputs), data.labels[index]


def fine_tune(
    model: TorchModel,
    data: TrainData,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    cancelled: Callable[[], bool] = lambda: False,
) -> TorchModel:
    """A copy trained further on the labels; pruning masks stay applied."""
    result = model.copy()
    module = result.module
    loss_fn = ann.loss_function(result.signature)
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(0)
    module.train()
    for _ in range(epochs):
        for inputs, labels in _batches(data, batch_size, generator):
            if cancelled():
                break
            optimizer.zero_grad()
            loss_fn(module(*inputs), labels).backward()
            optimizer.step()
            apply_masks(module, result.masks)
    module.eval()
    return result


def scaled_spec(spec: ann.ModelSpec, factor: float) -> ann.ModelSpec:
    """The teacher's spec with every width multiplied by ``factor`` (at least 1)."""
    scaled = _copy_spec(spec)
    assert scaled is not None

    def scale(values: Any) -> list[int]:
        return [max(1, round(v * factor)) for v in values]

    architecture = ann.architecture_of(spec)
    if architecture == "mlp":
        sizes = scale(spec.mlp.hidden_sizes)
        del scaled.mlp.hidden_sizes[:]
        scaled.mlp.hidden_sizes.extend(sizes)
    elif architecture in ("cnn1d", "cnn2d"):
        src, dst = getattr(spec, architecture), getattr(scaled, architecture)
        channels, hidden = scale(src.channels or [32]), scale(src.hidden_sizes)
        del dst.channels[:], dst.hidden_sizes[:]
        dst.channels.extend(channels)
        dst.hidden_sizes.extend(hidden)
    elif architecture == "transformer":
        scaled.transformer.head_dim = 0  # d_model / num_heads again
        heads = spec.transformer.num_heads
        d_model = max(heads, round(spec.transformer.d_model * factor / heads) * heads)
        scaled.transformer.d_model = d_model
        feedforward = spec.transformer.feedforward_dim or 4 * spec.transformer.d_model
        scaled.transformer.feedforward_dim = max(1, round(feedforward * factor))
    elif architecture == "rnn":
        scaled.rnn.hidden_size = max(1, round(spec.rnn.hidden_size * factor))
    else:
        raise InvalidArgument(
            "distill.scale_factor",
            f"cannot scale the {architecture} architecture down; give a student_spec",
        )
    return scaled


def build_student(spec: ann.ModelSpec, data: ann.DataSignature) -> TorchModel:
    torch.manual_seed(0)
    built = ann.build_model(spec, data)
    return TorchModel(built.module, built.signature, data, spec)


def check_fraction(value: float, field_path: str, *, closed: bool = False) -> float:
    """``value`` in (0, 1) (or [0, 1] when ``closed``); InvalidArgument naming the field."""
    bad = math.isnan(value) or (not 0 <= value <= 1 if closed else not 0 < value < 1)
    if bad:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise InvalidArgument(field_path, f"must be in {interval}, got {value}")
    return value
