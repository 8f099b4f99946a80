"""Which training job goes to which worker, and when: resource classes, priorities, quotas.

Workers declare what they offer (``Resources``: processes, cpus, gpus and their type,
memory, labels) and the *resource class* they pull from: a name given with
``--resource-class`` or, by default, a key derived from the offer, so workers with equal
offers share one class. Each class has its own work-queue subject,
``aimassjobs.training.<class>``, and its own durable consumer: a worker only ever receives
jobs published on its class.

Jobs are not published when they are created. They wait QUEUED in the database, and the
training service's admission scheduler (:class:`Scheduler`) releases them, highest
priority first and oldest first within a priority, only when a live idle worker that fits
them is free and the job's project is under its quota of concurrent jobs. A released job
goes on the subject of the class of the worker it was matched with (one message per host
for a job across several hosts), so a worker that dies mid-job loses the job to another
worker of the same class. Because only as many jobs are released as there are free
workers, a high-priority job created while every worker is busy still starts before
normal ones created earlier.

A job that no registered worker could ever run is refused at create time (see
:func:`check_satisfiable`); when no worker with an offer has registered at all, the job is
accepted and waits, so jobs may be created before the workers start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aimass.core.errors import FailedPrecondition, InvalidArgument
from aimass.core.events.envelope import validate_name
from aimass.core.protodict import message_from_dict, message_to_dict
from aimass.training.v1 import training_pb2 as tpb

if TYPE_CHECKING:
    from aimass.training.store import TrainingStore

log = logging.getLogger(__name__)

RESOURCES = "training_job.resources"
# How often the scheduler looks again without being woken (stale workers, missed wakes).
TICK_S = 1.0
GIB = 1 << 30


# -- offers ------------------------------------------------------------------------------------


def detect_offer(
    *, processes: int = 0, cpus: float = 0, gpus: int | None = None, gpu_type: str = ""
) -> tpb.Resources:
    """What this machine offers: its cores, memory and CUDA devices (given values win)."""
    offer = tpb.Resources(processes=processes, cpus=cpus or float(os.cpu_count() or 1))
    with contextlib.suppress(ValueError, OSError, AttributeError):
        offer.memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if gpus is None:
        gpus, detected_type = _cuda_devices()
        gpu_type = gpu_type or detected_type
    offer.gpus = gpus
    offer.gpu_type = gpu_type if gpus else ""
    return offer


def _cuda_devices() -> tuple[int, str]:
    """(CUDA devices, the first one's model without the vendor, e.g. "H200")."""
    import torch

    if not torch.cuda.is_available():
        return 0, ""
    name = torch.cuda.get_device_name(0).removeprefix("NVIDIA ").strip()
    return torch.cuda.device_count(), name


def resource_class(offer: tpb.Resources, name: str = "") -> str:
    """The class a worker pulls from: ``name`` when given, else a key of the offer itself.

    The derived key is stable (the same offer on another host gives the same class), so
    identical workers share one queue and take over each other's jobs when one dies.
    """
    if name:
        return validate_name(name, "resource_class")
    canonical = json.dumps(message_to_dict(offer), sort_keys=True)
    return "auto-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def check_declared(capabilities: Mapping[str, Any]) -> None:
    """Refuses a registration whose class is no subject token or whose offer is no Resources."""
    klass = capabilities.get("resource_class")
    if klass:
        validate_name(str(klass), "capabilities.resource_class")
    try:
        message_from_dict(capabilities.get("resources") or {}, tpb.Resources())
    except InvalidArgument as err:
        problem = err.violations[0]
        raise InvalidArgument(
            f"capabilities.resources.{problem.field}", problem.description
        ) from err


def declared_offer(capabilities: Mapping[str, Any]) -> tuple[str, tpb.Resources] | None:
    """(resource class, offer) a worker registered with; None for a worker that declared
    none (an older worker, a test's registration) or declared something unusable."""
    klass = capabilities.get("resource_class")
    if not klass:
        return None
    try:
        validate_name(str(klass), "resource_class")
        offer = message_from_dict(capabilities.get("resources") or {}, tpb.Resources())
    except InvalidArgument as err:
        log.warning("a worker's offer is ignored: %s", err)
        return None
    return str(klass), offer


def class_topic(base: str, resource_class: str) -> str:
    """The work-queue subject of one class, ``aimassjobs.training.<class>``."""
    return f"{base}.{validate_name(resource_class, 'resource_class')}"


# -- fitting -----------------------------------------------------------------------------------


def _gpu_matches(wanted: str, offered: str) -> bool:
    # "H100" matches a worker reporting "H100" or "H100 80GB HBM3"; case does not matter.
    wanted, offered = wanted.strip().lower(), offered.strip().lower()
    return wanted == offered or wanted in offered.split()


def misfit(request: tpb.Resources, offer: tpb.Resources) -> str | None:
    """The first field of ``request`` (per host) that ``offer`` cannot meet; None when it fits."""
    if request.gpus > offer.gpus:
        return "gpus"
    if request.gpu_type and not _gpu_matches(request.gpu_type, offer.gpu_type):
        return "gpu_type"
    if request.cpus > offer.cpus:
        return "cpus"
    if request.memory_bytes > offer.memory_bytes:
        return "memory_bytes"
    if offer.processes and max(1, request.processes) > offer.processes:
        return "processes"
    for key, value in sorted(request.labels.items()):
        if offer.labels.get(key) != value:
            return f"labels.{key}"
    return None


def _largest(field_name: str, offers: Sequence[tuple[str, tpb.Resources]]) -> str:
    """What the registered workers offer for one field, for the refusal message."""
    if field_name == "gpu_type":
        types = sorted({o.gpu_type for _, o in offers if o.gpu_type})
        return f"registered workers offer {', '.join(types) if types else 'no GPU'}"
    if field_name.startswith("labels."):
        key = field_name.removeprefix("labels.")
        values = sorted({o.labels[key] for _, o in offers if key in o.labels})
        return f"registered workers carry {key} = {', '.join(values) if values else 'nothing'}"
    name, offer = max(offers, key=lambda item: getattr(item[1], field_name))
    value = getattr(offer, field_name)
    shown = f"{value / GIB:.1f} GiB" if field_name == "memory_bytes" else f"{value:g}"
    return f"the largest offer is {shown} ({name})"


def check_satisfiable(request: tpb.Resources, offers: Sequence[tuple[str, tpb.Resources]]) -> None:
    """Refuses a request no registered worker (nor ``hosts`` of them together) can ever meet.

    ``offers`` are the (name, offer) of the registered workers that have not left. With
    none, nothing is refused: the job waits for workers that may still start.
    """
    if not offers:
        return
    _check_request_fields(request)
    hosts = max(1, request.hosts)
    fitting = [name for name, offer in offers if misfit(request, offer) is None]
    if len(fitting) >= hosts:
        return
    if fitting:
        raise FailedPrecondition(
            f"{RESOURCES}.hosts: asks for {hosts} hosts but only {len(fitting)} registered "
            f"worker(s) fit ({', '.join(fitting)})"
        )
    for field_name in ("gpus", "gpu_type", "cpus", "memory_bytes", "processes"):
        if all(misfit(_only(request, field_name), offer) for _, offer in offers):
            raise FailedPrecondition(
                f"{RESOURCES}.{field_name}: asks for {_wanted(request, field_name)} per host, "
                f"no registered worker can meet it; {_largest(field_name, offers)}"
            )
    for key in sorted(request.labels):
        probe = tpb.Resources(labels={key: request.labels[key]})
        if all(misfit(probe, offer) for _, offer in offers):
            raise FailedPrecondition(
                f"{RESOURCES}.labels.{key}: no registered worker carries "
                f"{key} = {request.labels[key]!r}; {_largest('labels.' + key, offers)}"
            )
    lacking = "; ".join(f"{name} lacks {misfit(request, offer)}" for name, offer in offers)
    raise FailedPrecondition(
        f"{RESOURCES}: no single registered worker offers all of it ({lacking})"
    )


def _wanted(request: tpb.Resources, field_name: str) -> str:
    """A requested amount in words: "4 GPUs", "16 CPU cores", "32.0 GiB", "GPU 'A10G'"."""
    if field_name == "gpus":
        return f"{request.gpus} GPU(s)"
    if field_name == "gpu_type":
        return f"GPU {request.gpu_type!r}"
    if field_name == "cpus":
        return f"{request.cpus:g} CPU core(s)"
    if field_name == "memory_bytes":
        return f"{request.memory_bytes / GIB:.1f} GiB of memory"
    return f"{max(1, request.processes)} process(es)"


def _only(request: tpb.Resources, field_name: str) -> tpb.Resources:
    """The request reduced to one field, to tell which field no worker meets."""
    probe = tpb.Resources()
    setattr(probe, field_name, getattr(request, field_name))
    return probe


def _check_request_fields(request: tpb.Resources) -> None:
    for field_name in ("cpus", "gpus", "memory_bytes"):
        if getattr(request, field_name) < 0:
            raise InvalidArgument(f"{RESOURCES}.{field_name}", "must be >= 0")


# -- the admission plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class FreeWorker:
    """A live idle worker that may be given a job."""

    name: str
    resource_class: str
    offer: tpb.Resources

    def size(self) -> tuple[float, ...]:
        # Smallest fitting worker first, so large (GPU) workers stay free for large jobs.
        o = self.offer
        return (o.gpus, o.cpus, o.memory_bytes, len(o.labels))


@dataclass
class Candidate:
    """A QUEUED job not released yet, in the order it should start."""

    key: int
    project: str
    request: tpb.Resources
    parent: int | None = None
    max_parallel: int = 0


@dataclass
class Admitted:
    """Jobs released or running now, counted against quotas and search parallelism."""

    by_project: Counter[str] = field(default_factory=Counter)
    by_parent: Counter[int] = field(default_factory=Counter)


@dataclass
class Decision:
    """The outcome of one scheduling pass."""

    releases: list[tuple[Candidate, list[FreeWorker]]] = field(default_factory=list)
    # Why each job that stays QUEUED waits, by job key.
    waiting: dict[int, str] = field(default_factory=dict)


def quota_of(project: str, quotas: Mapping[str, int], default_quota: int) -> int:
    """Concurrent jobs ``project`` may have; 0 means no limit."""
    return int(quotas.get(project, default_quota))


def take_reserved(free: list[FreeWorker], classes: Iterable[str]) -> list[FreeWorker]:
    """``free`` without one worker per class entry: those are promised to released jobs."""
    left = list(free)
    for wanted in classes:
        for index, worker in enumerate(left):
            if worker.resource_class == wanted:
                del left[index]
                break
    return left


def plan(
    candidates: Sequence[Candidate],
    free: Sequence[FreeWorker],
    admitted: Admitted,
    quotas: Mapping[str, int],
    default_quota: int = 0,
) -> Decision:
    """Matches candidates (already in priority order) to free workers.

    A job over its project's quota, or beyond its search's ``max_parallel_trials``, is
    skipped; one that no free worker fits waits, and lower-priority jobs that fit other
    free workers may go ahead of it (they cannot take a worker it fits: it chose first).
    """
    decision = Decision()
    pool = sorted(free, key=lambda w: (w.size(), w.name))
    by_project, by_parent = Counter(admitted.by_project), Counter(admitted.by_parent)
    for job in candidates:
        limit = quota_of(job.project, quotas, default_quota)
        if limit and by_project[job.project] >= limit:
            decision.waiting[job.key] = (
                f"waiting: project {job.project!r} runs {by_project[job.project]} of its "
                f"{limit} concurrent jobs"
            )
            continue
        if (
            job.parent is not None
            and job.max_parallel
            and by_parent[job.parent] >= job.max_parallel
        ):
            decision.waiting[job.key] = (
                f"waiting: {job.max_parallel} trials of the search already run"
            )
            continue
        chosen: list[FreeWorker] = []
        for worker in pool:
            if len(chosen) == max(1, job.request.hosts):
                break
            if misfit(job.request, worker.offer) is None:
                chosen.append(worker)
        if len(chosen) < max(1, job.request.hosts):
            decision.waiting[job.key] = "waiting for a free worker that fits"
            continue
        pool = [w for w in pool if w not in chosen]
        by_project[job.project] += 1
        if job.parent is not None:
            by_parent[job.parent] += 1
        decision.releases.append((job, chosen))
    return decision


# -- the loop in the training service ------------------------------------------------------------


@dataclass(frozen=True)
class SchedulingConfig:
    """``training`` settings the scheduler reads."""

    quotas: Mapping[str, int] = field(default_factory=dict)
    default_quota: int = 0
    worker_stale_s: float = 30.0


class Scheduler:
    """Releases queued jobs to free workers whenever woken (any job or worker change)."""

    def __init__(
        self,
        store: TrainingStore,
        config: SchedulingConfig,
        notify_outbox: Callable[[], None],
        tick_s: float = TICK_S,
    ) -> None:
        self.store, self.config, self.notify_outbox, self.tick_s = (
            store,
            config,
            notify_outbox,
            tick_s,
        )
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Asks for a pass soon; safe from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def check_fits(self, request: tpb.Resources) -> None:
        """Refuses at create time a request no registered worker can ever meet."""
        offers = await asyncio.to_thread(self.store.worker_offers, self.config.worker_stale_s)
        check_satisfiable(request, offers)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="training-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run_once(self) -> int:
        """One pass; returns the jobs released."""
        released = await asyncio.to_thread(self.store.schedule, self.config)
        if released:
            self.notify_outbox()
        return released

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()
            try:
                await self.run_once()
            except Exception:  # a database hiccup: the next tick tries again
                log.exception("training scheduler pass failed")


__all__ = [
    "Admitted",
    "Candidate",
    "Decision",
    "FreeWorker",
    "Scheduler",
    "SchedulingConfig",
    "check_satisfiable",
    "class_topic",
    "detect_offer",
    "misfit",
    "plan",
    "resource_class",
    "take_reserved",
]
