"""The training loop of one job process: build, train, evaluate, checkpoint, resume, export.

It runs in a worker's thread (one process) or in each of N spawned processes
(data parallel, :mod:`aimass.training.ddp`); everything it reports goes
through :class:`Hooks`, so it knows nothing of the database or NATS.

Determinism: weights come from ``torch.manual_seed(seed)``; the order of rows
in epoch ``e`` is a permutation drawn from its own generator seeded with
``(seed, e)``, so a resumed run needs only (epoch, batch) to continue with the
same batches; the global RNG states (torch, numpy, python) are saved in every
checkpoint and restored on resume, so dropout masks continue as well.

Data parallel: every step takes one *global* batch of ``batch_size * world``
rows of the epoch's permutation; rank ``r`` computes the summed loss of its
share, scaled by ``world / rows in the global batch``, so the gradient DDP
averages is exactly the gradient of the global batch's mean loss: N processes
follow the loss curve of one process with the same global batch (up to float
summation order; dropout masks and batch-norm statistics are per process).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from aimass.core import nn as ann
from aimass.core.errors import InvalidArgument
from aimass.training import warmstart
from aimass.training.v1 import training_pb2 as tpb

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5
STOP_CHECK_STEPS = 10
EPOCH_CHECKPOINT_MIN_S = 10.0


class TrainingFailed(Exception):
    """The run cannot continue (NaN loss, bad data); the message names the step or field."""


class Hooks(Protocol):
    """What the loop reports to whoever runs it (a worker writes it to the job's record)."""

    def metrics(self, step: int, epoch: int, values: dict[str, float]) -> None: ...

    def log(self, message: str) -> None: ...

    def checkpoint(self, step: int, epoch: int, path: Path, metrics: dict[str, float]) -> None:
        """Makes the file at ``path`` durable (artifact store) before returning."""
        ...

    def should_stop(self) -> bool: ...


class SplitSource(Protocol):
    def read(self, split: str) -> Any:
        """The rows of "train", "valid" or "test" as a pyarrow Table (may be empty)."""
        ...


@dataclass
class TrainPlan:
    """Everything one training process needs, picklable for spawned processes."""

    job: str
    spec: bytes  # serialized tpb.ModelSpec
    config: bytes  # serialized tpb.TrainingConfig
    data_signature: dict[str, Any]
    work_dir: str
    resume_from: str = ""  # local path of the checkpoint to resume from
    threads: int = 0
    export: bool = True
    # Warm start (:mod:`aimass.training.warmstart`): local paths of the initial state dict
    # and of the distillation teacher's ONNX file, empty when not used.
    init_state: str = ""
    keep_zero_weights: bool = False
    teacher_onnx: str = ""
    temperature: float = 4.0
    alpha: float = 0.5
    device: str = "cpu"  # "cpu", or "cuda": each process takes the GPU of its local rank

    @property
    def model_spec(self) -> tpb.ModelSpec:
        return tpb.ModelSpec.FromString(self.spec)

    @property
    def training(self) -> tpb.TrainingConfig:
        return tpb.TrainingConfig.FromString(self.config)


@dataclass
class TrainResult:
    """What a finished run leaves behind (rank 0)."""

    metrics: dict[str, float]
    losses: list[float]
    steps: int
    epochs: int
    signature: dict[str, Any]
    parameter_count: int
    samples_per_second: float
    stopped_early: bool = False
    cancelled: bool = False
    onnx_path: str = ""
    state_dict_path: str = ""
    onnx_max_abs_diff: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# -- configuration resolved with defaults --------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    optimizer: str
    learning_rate: float
    epochs: int
    max_steps: int
    batch_size: int
    checkpoint_interval: int
    early_metric: str
    early_goal: str
    patience: int
    bf16: bool


def metric_goal(metric: str, goal: int) -> str:
    """ "min" or "max" for a metric: explicit goal, else "loss"/errors go down."""
    if goal == tpb.METRIC_GOAL_MINIMIZE:
        return "min"
    if goal == tpb.METRIC_GOAL_MAXIMIZE:
        return "max"
    lowered = metric.lower()
    return "min" if any(k in lowered for k in ("loss", "error", "mse", "mae")) else "max"


def resolve(config: tpb.TrainingConfig) -> Resolved:
    opt = config.optimizer
    names = {
        tpb.OPTIMIZER_TYPE_UNSPECIFIED: "adam",
        tpb.OPTIMIZER_TYPE_ADAM: "adam",
        tpb.OPTIMIZER_TYPE_ADAMW: "adamw",
        tpb.OPTIMIZER_TYPE_SGD: "sgd",
    }
    early = config.early_stopping
    return Resolved(
        optimizer=names[opt.type],
        learning_rate=opt.learning_rate or 1e-3,
        epochs=config.epochs,
        max_steps=config.max_steps,
        batch_size=config.batch_size or 64,
        checkpoint_interval=config.checkpoint_interval_steps,
        early_metric=early.metric,
        early_goal=metric_goal(early.metric, early.goal),
        patience=early.patience or 5,
        bf16=config.precision == tpb.PRECISION_BF16_MIXED,
    )


def make_optimizer(
    params: Any, config: tpb.TrainingConfig, resolved: Resolved
) -> torch.optim.Optimizer:
    opt = config.optimizer
    if resolved.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=resolved.learning_rate,
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            weight_decay=opt.weight_decay,
        )
    betas = (opt.beta1 or 0.9, opt.beta2 or 0.999)
    cls = torch.optim.AdamW if resolved.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=resolved.learning_rate, betas=betas, weight_decay=opt.weight_decay)


def lr_factor(config: tpb.TrainingConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after ``step`` optimizer steps."""
    schedule = config.schedule
    peak = config.optimizer.learning_rate or 1e-3
    warmup = schedule.warmup_steps
    gamma = schedule.gamma or 0.1
    floor = schedule.min_learning_rate / peak if peak else 0.0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        after = step - warmup
        if schedule.type == tpb.SCHEDULE_TYPE_STEP and schedule.step_size:
            return gamma ** (after // schedule.step_size)
        if schedule.type == tpb.SCHEDULE_TYPE_COSINE:
            span = max(1, total_steps - warmup)
            progress = min(1.0, after / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


# -- the loop -------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    # Dropout on a GPU draws from the CUDA generator: saved too, so a resumed GPU run
    # continues the same masks.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """The device of one process: ``cuda:<local rank mod GPUs>`` for a GPU plan, else the CPU.

    Raises TrainingFailed when the plan asks for a GPU and this host has none, rather than
    training silently on the CPU at a fraction of the speed the job was sized for.
    """
    if requested != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingFailed(
            "training_job.resources.gpus: the job asks for GPUs but this worker has no CUDA device"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def process_group_backend(device: str, local_processes: int) -> str:
    """nccl when every local process has a GPU of its own, else gloo (nccl refuses two ranks
    on one GPU; gloo also reduces CUDA tensors, through host memory)."""
    if device != "cuda" or not torch.cuda.is_available():
        return "gloo"
    if not torch.distributed.is_nccl_available():
        return "gloo"
    return "nccl" if local_processes <= torch.cuda.device_count() else "gloo"


def epoch_order(seed: int, epoch: int, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(rows, generator=generator)


class _Distributed:
    """The few collectives the loop needs; no-ops in a single process."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world = rank, world
        # nccl reduces only tensors on the GPU; gloo takes CPU tensors.
        on_gpu = world > 1 and torch.distributed.get_backend() == "nccl"
        self.device = device if on_gpu else torch.device("cpu")

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    losses: list[float] = field(default_factory=list)
    best_value: float | None = None
    best_state: dict[str, Any] | None = None
    bad_evals: int = 0
    valid_metrics: dict[str, float] = field(default_factory=dict)
    epoch_loss_sum: float = 0.0
    epoch_rows: int = 0
    last_train_loss: float = float("nan")


class Trainer:
    """One process's share of a job. Call :meth:`run`."""

    def __init__(
        self,
        plan: TrainPlan,
        source: SplitSource,
        hooks: Hooks,
        rank: int = 0,
        world: int = 1,
        local_rank: int = 0,
    ) -> None:
        self.plan, self.source, self.hooks = plan, source, hooks
        self.device = pick_device(plan.device, local_rank)
        self.dist = _Distributed(rank, world, self.device)
        self.config = plan.training
        self.resolved = resolve(self.config)
        self.work_dir = Path(plan.work_dir)

    # -- setup --
    def _load_data(self) -> None:
        data = ann.DataSignature.from_dict(self.plan.data_signature)
        torch.manual_seed(self.config.seed)
        np.random.seed(self.config.seed % 2**32)
        random.seed(self.config.seed)
        self.built = ann.build_model(self.plan.model_spec, data)
        self.masks = self._initial_state()
        train = self.source.read("train")
        if train.num_rows == 0:
            raise TrainingFailed("dataset_version: the train split is empty")
        # The splits move to the device once: a step then only gathers rows there.
        self.train_x, self.train_y = self._on_device(
            ann.table_to_tensors(train, self.built.signature)
        )
        valid = self.source.read("valid")
        self.valid_x, self.valid_y = (
            self._on_device(ann.table_to_tensors(valid, self.built.signature))
            if valid.num_rows
            else ((), None)
        )
        self.loss_sum = ann.loss_function(self.built.signature, reduction="sum")
        self.teacher = self._teacher_targets()

    def _on_device(self, tensors: tuple[Any, Any]) -> tuple[tuple[torch.Tensor, ...], Any]:
        inputs, labels = tensors
        return tuple(t.to(self.device) for t in inputs), labels.to(self.device)

    def _setup_model(self) -> None:
        module = self.built.module.to(self.device)
        self.model: torch.nn.Module = module
        if self.device.type == "cuda" and self.dist.rank == 0:
            name = torch.cuda.get_device_name(self.device)
            self.hooks.log(f"training on {self.device} ({name})")
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.optimizer = make_optimizer(module.parameters(), self.config, self.resolved)
        rows = int(self.train_x[0].shape[0])
        global_batch = self.resolved.batch_size * self.dist.world
        self.batches_per_epoch = math.ceil(rows / global_batch)
        by_epochs = self.resolved.epochs * self.batches_per_epoch if self.resolved.epochs else 0
        limits = [s for s in (by_epochs, self.resolved.max_steps) if s > 0]
        self.total_steps = min(limits)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.config, self.total_steps)
        )
        self.state = _State()
        if self.plan.resume_from:
            self._resume(Path(self.plan.resume_from))

    def _resume(self, path: Path) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        self.built.module.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"][min(self.dist.rank, len(saved["rng"]) - 1)])
        self.state = saved["state"]
        self.hooks.log(
            f"resumed from the checkpoint of step {self.state.step} (epoch {self.state.epoch + 1})"
        )

    def _initial_state(self) -> warmstart.Masks:
        if not self.plan.init_state:
            return {}
        try:
            masks = warmstart.load_initial_state(
                self.built.module, Path(self.plan.init_state), self.plan.keep_zero_weights
            )
        except warmstart.WarmStartFailed as err:
            raise TrainingFailed(str(err)) from err
        self.hooks.log("started from the initial state of training_job.init_from")
        return masks

    def _teacher_targets(self) -> torch.Tensor | None:
        """The teacher's outputs for every train row, on the device (None: no distillation)."""
        if not self.plan.teacher_onnx:
            return None
        path = Path(self.plan.teacher_onnx)
        teacher_parameters = warmstart.onnx_parameter_count(path)
        if self.built.parameter_count >= teacher_parameters:
            raise TrainingFailed(
                f"training_job.model: the student has {self.built.parameter_count} parameters, "
                f"not fewer than the teacher's {teacher_parameters}"
            )
        module = self.built.module.eval()
        with torch.no_grad():  # the student's output width, on one CPU row
            outputs = int(module(*(t[:1].cpu() for t in self.train_x)).reshape(1, -1).shape[1])
        module.train()
        try:
            targets = warmstart.soft_targets(path, self.train_x, outputs)
        except warmstart.WarmStartFailed as err:
            raise TrainingFailed(str(err)) from err
        return targets.to(self.train_y.device)

    # -- checkpoints --
    def _checkpoint(self) -> None:
        # Every rank's RNG state goes into the file, gathered through rank 0's view: the
        # ranks share seeds, so rank 0's state is used for all (dropout differs per rank).
        if self.dist.rank != 0:
            return
        payload = {
            "model": self.built.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": [_rng_state()],
            "state": self.state,
        }
        path = self.work_dir / f"checkpoint-{self.state.step}.pt"
        torch.save(payload, path)
        self.last_checkpoint = time.perf_counter()
        try:
            self.hooks.checkpoint(
                self.state.step, self.state.epoch, path, dict(self.state.valid_metrics)
            )
        finally:
            path.unlink(missing_ok=True)

    def _epoch_due(self) -> bool:
        """Whether the end of this epoch gets a checkpoint (checkpoint_interval_steps = 0).

        Every epoch, but not more often than every EPOCH_CHECKPOINT_MIN_S: a digits epoch
        takes 30 ms and a checkpoint 10 ms, so checkpointing each of them would cost a third
        of the run for nothing (a resume replays at most that many seconds).
        """
        return time.perf_counter() - self.last_checkpoint >= EPOCH_CHECKPOINT_MIN_S

    # -- steps --
    def _rows_of_batch(self, order: torch.Tensor, index: int) -> torch.Tensor:
        global_batch = self.resolved.batch_size * self.dist.world
        rows = order[index * global_batch : (index + 1) * global_batch]
        if self.dist.world == 1:
            return rows
        return torch.tensor_split(rows, self.dist.world)[self.dist.rank]

    def _step(self, rows: torch.Tensor, global_rows: int) -> float:
        rows = rows.to(self.device, non_blocking=True)
        inputs = tuple(t[rows] for t in self.train_x)
        labels = self.train_y[rows]
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.resolved.bf16):
            outputs = self.model(*inputs)
        loss_sum = self.loss_sum(outputs.float(), labels)
        if self.teacher is not None:
            loss_sum = warmstart.distillation_loss_sum(
                outputs.float(), self.teacher[rows], loss_sum, self.built.signature,
                self.plan.temperature, self.plan.alpha,
            )  # fmt: skip
        # Scaled so DDP's average over ranks is the global batch's mean loss gradient.
        (loss_sum * (self.dist.world / global_rows)).backward()
        if self.config.gradient_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                self.built.module.parameters(), self.config.gradient_clip_norm
            )
        self.optimizer.step()
        warmstart.apply_masks(self.built.module, self.masks)
        self.scheduler.step()
        return self.dist.sum(float(loss_sum.detach())) / global_rows

    def _evaluate(self) -> dict[str, float]:
        if self.valid_y is None:
            return {}
        module = self.built.module
        module.eval()
        signature = self.built.signature
        with torch.no_grad():
            outputs = module(*self.valid_x).float()
            metrics = {"valid_loss": float(self.loss_sum(outputs, self.valid_y)) / len(outputs)}
            if signature.task == ann.CLASSIFICATION:
                predicted = ann.predictions(outputs, signature)
                truth = self.valid_y.reshape(-1).long()
                metrics["valid_accuracy"] = float((predicted == truth).float().mean())
            else:
                error = outputs - self.valid_y
                metrics["valid_mse"] = float((error**2).mean())
                metrics["valid_mae"] = float(error.abs().mean())
        module.train()
        return metrics

    def _early_stop(self, metrics: dict[str, float]) -> bool:
        name = self.resolved.early_metric
        if not name:
            return False
        if name not in metrics:
            raise TrainingFailed(
                f"training.early_stopping.metric: {name!r} is not measured; "
                f"available: {sorted(metrics)}"
            )
        value = metrics[name]
        best = self.state.best_value
        delta = self.config.early_stopping.min_delta
        better = best is None or (
            value < best - delta if self.resolved.early_goal == "min" else value > best + delta
        )
        if better:
            self.state.best_value, self.state.bad_evals = value, 0
            if self.config.early_stopping.restore_best:
                self.state.best_state = {
                    k: v.detach().clone() for k, v in self.built.module.state_dict().items()
                }
            return False
        self.state.bad_evals += 1
        return self.state.bad_evals >= self.resolved.patience

    # -- run --
    def run(self) -> TrainResult:
        if self.plan.threads:
            torch.set_num_threads(max(1, self.plan.threads))
        self._load_data()
        self._setup_model()
        self.model.train()
        rows = int(self.train_x[0].shape[0])
        state = self.state
        started = time.perf_counter()
        self.last_checkpoint = started
        samples = 0
        last_report = started
        stopped_early = cancelled = False
        while state.step < self.total_steps and not stopped_early and not cancelled:
            order = epoch_order(self.config.seed, state.epoch, rows)
            while state.batch < self.batches_per_epoch and state.step < self.total_steps:
                if state.step % STOP_CHECK_STEPS == 0 and self.dist.any(self.hooks.should_stop()):
                    cancelled = True
                    break
                global_batch = self.resolved.batch_size * self.dist.world
                index = state.batch
                global_rows = len(order[index * global_batch : (index + 1) * global_batch])
                loss = self._step(self._rows_of_batch(order, index), global_rows)
                state.step += 1
                state.batch += 1
                if not math.isfinite(loss):
                    raise TrainingFailed(
                        f"loss is {loss} at step {state.step} (epoch {state.epoch + 1})"
                    )
                state.losses.append(loss)
                state.epoch_loss_sum += loss * global_rows
                state.epoch_rows += global_rows
                samples += global_rows
                now = time.perf_counter()
                if self.dist.rank == 0 and now - last_report >= REPORT_INTERVAL_S:
                    last_report = now
                    self.hooks.metrics(
                        state.step,
                        state.epoch + 1,
                        {
                            "loss": loss,
                            "learning_rate": self.scheduler.get_last_lr()[0],
                            "samples_per_second": samples / (now - started),
                        },
                    )
                interval = self.resolved.checkpoint_interval
                if interval and state.step % interval == 0 and state.step < self.total_steps:
                    self._checkpoint()
            if cancelled:
                break
            epoch_done = state.batch >= self.batches_per_epoch
            if epoch_done or state.step >= self.total_steps:
                state.last_train_loss = state.epoch_loss_sum / max(1, state.epoch_rows)
                state.valid_metrics = self._evaluate()
                stopped_early = self._early_stop(state.valid_metrics)
                if self.dist.rank == 0:
                    self.hooks.metrics(
                        state.step,
                        state.epoch + 1,
                        {"train_loss": state.last_train_loss, **state.valid_metrics},
                    )
                state.epoch += 1
                state.batch = 0
                state.epoch_loss_sum, state.epoch_rows = 0.0, 0
                done = stopped_early or state.step >= self.total_steps
                if not self.resolved.checkpoint_interval and not done and self._epoch_due():
                    self._checkpoint()
        elapsed = time.perf_counter() - started
        return self._finish(cancelled, stopped_early, samples / elapsed if elapsed else 0.0)

    def _finish(self, cancelled: bool, stopped_early: bool, rate: float) -> TrainResult:
        state = self.state
        if stopped_early and state.best_state is not None:
            self.built.module.load_state_dict(state.best_state)
            state.valid_metrics = self._evaluate()
            self.hooks.log("early stopping: restored the weights of the best evaluation")
        metrics = {"train_loss": state.last_train_loss, **state.valid_metrics}
        result = TrainResult(
            metrics=metrics,
            losses=list(state.losses),
            steps=state.step,
            epochs=state.epoch,
            signature=self.built.signature.to_dict(),
            parameter_count=self.built.parameter_count,
            samples_per_second=rate,
            stopped_early=stopped_early,
            cancelled=cancelled,
        )
        if self.dist.rank == 0 and not cancelled and self.plan.export:
            self._export(result)
        return result

    def _export(self, result: TrainResult) -> None:
        # Exported from the CPU: the files must load on hosts without a GPU.
        module = self.built.module.to("cpu")
        state_path = self.work_dir / "model.pt"
        torch.save(module.state_dict(), state_path)
        source = self.valid_x if self.valid_y is not None else self.train_x
        sample = tuple(t[:16].cpu() for t in source)
        exported = ann.export_onnx(
            module, self.built.signature, self.work_dir / "model.onnx", sample=sample
        )
        result.onnx_path = str(exported.path)
        result.state_dict_path = str(state_path)
        result.onnx_max_abs_diff = exported.max_abs_diff


def check_plan(plan: TrainPlan) -> None:
    """Cheap checks before spending a process on the plan."""
    resolved = resolve(plan.training)
    if resolved.epochs <= 0 and resolved.max_steps <= 0:
        raise InvalidArgument("training.epochs", "set epochs or max_steps")
