"""Before/after metrics from the evaluation service, with the job's own figure as fallback.

After a compressed version is registered, the evaluation service evaluates
the parent and the child on the evaluation split (CreateEvaluation, then
WatchEvaluation to the end, then GetEvaluation) and the job reports its
headline metric. When the service cannot be reached, or an evaluation fails or
takes too long, the report keeps the figure the job measured itself with
onnxruntime on its check rows, labelled as such with the reason.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from aimass.common.v1 import common_pb2
from aimass.core.clients import ServiceChannels
from aimass.evaluation.v1 import evaluation_pb2 as epb
from aimass.evaluation.v1 import evaluation_pb2_grpc

SERVICE = "evaluation service"
FALLBACK = "compression job (onnxruntime on the check rows)"
# How long one evaluation may take before the job falls back to its own figure.
TIMEOUT_S = 600.0
# A first call to a service that is not running fails fast; one that runs answers in ms.
CONNECT_TIMEOUT_S = 5.0


class EvaluationUnavailable(Exception):
    """Why the evaluation service's figure is missing."""


@dataclass
class BeforeAfter:
    metric: str
    before: float
    after: float
    source: str
    evaluations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"metric": self.metric, "before": self.before, "after": self.after,
                "source": self.source, "evaluations": self.evaluations}  # fmt: skip


class Evaluations:
    """Asks the evaluation service for one metric of a model version."""

    def __init__(self, channels: ServiceChannels, timeout_s: float = TIMEOUT_S) -> None:
        self.stub = evaluation_pb2_grpc.EvaluationServiceStub(channels.get("evaluation"))
        self.timeout_s = timeout_s

    async def before_after(
        self, parent: str, child: str, dataset_version: str, split: int, metric: str,
        job_id: str, fallback: tuple[float, float],
    ) -> BeforeAfter:  # fmt: skip
        """The service's figures for parent and child, or ``fallback`` labelled with why."""
        try:
            before, first = await self.metric(parent, dataset_version, split, metric,
                                              f"compression-{job_id}-parent")  # fmt: skip
            after, second = await self.metric(child, dataset_version, split, metric,
                                              f"compression-{job_id}-child")  # fmt: skip
        except EvaluationUnavailable as why:
            return BeforeAfter(metric, *fallback, f"{FALLBACK}: {why}")
        return BeforeAfter(metric, before, after, SERVICE, [first, second])

    async def metric(
        self, version: str, dataset_version: str, split: int, metric: str, request_id: str
    ) -> tuple[float, str]:
        """(value, evaluation name) of ``metric`` for ``version``."""
        evaluation = epb.Evaluation(
            model_version=version, dataset_version=dataset_version, split=split,
            labels={"requested_by": "compression"},
        )  # fmt: skip
        try:
            created = await self.stub.CreateEvaluation(
                epb.CreateEvaluationRequest(evaluation=evaluation, request_id=request_id[:64]),
                timeout=CONNECT_TIMEOUT_S,
            )
            done = await asyncio.wait_for(self._wait(created.name), self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise EvaluationUnavailable(f"{err.code().name}: {err.details()}") from err
        except TimeoutError as err:
            raise EvaluationUnavailable(
                f"{version} not evaluated within {self.timeout_s:.0f} s"
            ) from err
        if done.status.state != common_pb2.JOB_STATE_SUCCEEDED:
            raise EvaluationUnavailable(f"{done.name} ended {done.status.reason or 'unfinished'}")
        value = next((m.value for m in done.metrics if m.name == metric), None)
        if value is None:
            names = ", ".join(sorted({m.name for m in done.metrics})) or "none"
            raise EvaluationUnavailable(f"{done.name} has no {metric} (it has {names})")
        return value, done.name

    async def _wait(self, name: str) -> epb.Evaluation:
        async for _ in self.stub.WatchEvaluation(epb.WatchEvaluationRequest(name=name)):
            pass
        return await self.stub.GetEvaluation(epb.GetEvaluationRequest(name=name))
