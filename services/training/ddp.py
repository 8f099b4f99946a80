"""Data-parallel jobs: N processes on this host, rendezvous through torch.distributed.

The worker thread that runs a job with ``resources.processes = N > 1`` spawns
N processes (``multiprocessing`` spawn context), rank 0 first. They meet at
``tcp://127.0.0.1:{free port}`` (gloo on CPU, nccl when every rank has a GPU)
and run :class:`~aimass.training.trainer.Trainer` under
DistributedDataParallel. Ranks report through a queue to this thread, which
forwards to the job's hooks (only rank 0 reports metrics and checkpoints) and
relays cancellation through an event. A rank that fails or dies ends the run
with the failure of the first rank that reported one.

Across several hosts (``resources.hosts``), each host's worker runs its share of
the ranks here with ``first_rank`` and the rendezvous address host 0 published
through the training service (see :mod:`aimass.training.worker`).
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import queue as queue_module
import socket
import traceback
from pathlib import Path
from typing import Any

from aimass.training.trainer import (
    Hooks,
    SplitSource,
    TrainingFailed,
    TrainPlan,
    TrainResult,
    process_group_backend,
)

POLL_S = 0.2
# A rank that waits longer than this on a collective (a peer host gone) fails the run.
COLLECTIVE_TIMEOUT_S = 300


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _QueueHooks:
    """The hooks of a spawned rank: messages to the parent, waits for checkpoint acks."""

    def __init__(self, rank: int, out: Any, acks: Any, stop: Any) -> None:
        self.rank, self.out, self.acks, self.stop = rank, out, acks, stop

    def metrics(self, step: int, epoch: int, values: dict[str, float]) -> None:
        self.out.put(("metrics", self.rank, (step, epoch, values)))

    def log(self, message: str) -> None:
        self.out.put(("log", self.rank, message))

    def checkpoint(self, step: int, epoch: int, path: Path, metrics: dict[str, float]) -> None:
        self.out.put(("checkpoint", self.rank, (step, epoch, str(path), metrics)))
        ok, error = self.acks.get()
        if not ok:
            raise TrainingFailed(f"checkpoint of step {step} not stored: {error}")

    def should_stop(self) -> bool:
        return self.stop.is_set()


def _rank_main(
    rank: int,
    world: int,
    address: str,
    plan: TrainPlan,
    source: SplitSource,
    out: Any,
    acks: Any,
    stop: Any,
    reporting_rank: int = 0,
    backend: str = "gloo",
) -> None:
    import torch.distributed as dist

    from aimass.training.trainer import Trainer

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, plan.threads)))
    try:
        dist.init_process_group(
            backend,
            init_method=address,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            hooks = _QueueHooks(rank, out, acks, stop)
            local_rank = rank - reporting_rank
            result = Trainer(plan, source, hooks, rank, world, local_rank).run()
        finally:
            dist.destroy_process_group()
        if rank == reporting_rank:
            out.put(("result", rank, result))
    except BaseException as err:
        detail = str(err) if isinstance(err, TrainingFailed) else repr(err)
        out.put(("error", rank, (detail, traceback.format_exc(), type(err).__name__)))
        raise SystemExit(1) from None


def run_distributed(
    plan: TrainPlan,
    source: SplitSource,
    hooks: Hooks,
    world: int,
    *,
    local: int = 0,
    first_rank: int = 0,
    address: str = "",
) -> TrainResult:
    """Runs ranks of the plan here and returns the first one's result; TrainingFailed on failure.

    One host: ``world`` ranks, all here, meeting on a free loopback port. Several hosts:
    ``local`` ranks here (``first_rank``, ...) of ``world`` in all, meeting at ``address``
    (host 0's rank 0); only global rank 0 reports metrics and checkpoints.
    """
    ctx = mp.get_context("spawn")
    out, acks, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    local = local or world
    address = address or f"tcp://127.0.0.1:{free_port()}"
    per_rank = TrainPlan(**{**plan.__dict__, "threads": max(1, plan.threads // local or 1)})
    backend = process_group_backend(plan.device, local)
    hooks.log(f"process group: {world} ranks over {backend}")
    processes = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world, address, per_rank, source, out, acks, stop, first_rank, backend),
            name=f"{plan.job}-rank{rank}",
            daemon=True,
        )
        for rank in range(first_rank, first_rank + local)
    ]
    for process in processes:
        process.start()
    try:
        return _follow(processes, out, acks, stop, hooks)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)


def _follow(processes: list[Any], out: Any, acks: Any, stop: Any, hooks: Hooks) -> TrainResult:
    result: TrainResult | None = None
    while True:
        if hooks.should_stop():
            stop.set()
        try:
            kind, rank, payload = out.get(timeout=POLL_S)
        except queue_module.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise TrainingFailed(
                    f"process {dead[0].name} exited with code {dead[0].exitcode}"
                ) from None
            if result is not None or all(p.exitcode == 0 for p in processes):
                if result is None:
                    raise TrainingFailed("rank 0 ended without a result") from None
                return result
            continue
        if kind == "metrics":
            hooks.metrics(*payload)
        elif kind == "log":
            hooks.log(f"[rank {rank}] {payload}")
        elif kind == "checkpoint":
            step, epoch, path, metrics = payload
            try:
                hooks.checkpoint(step, epoch, Path(path), metrics)
                acks.put((True, ""))
            except Exception as err:
                acks.put((False, str(err)))
                raise
        elif kind == "error":
            detail, trace, _ = payload
            hooks.log(f"[rank {rank}] {trace}")
            raise TrainingFailed(detail)
        elif kind == "result":
            result = payload
            with contextlib.suppress(Exception):
                for process in processes:
                    process.join(timeout=30)
            return result
