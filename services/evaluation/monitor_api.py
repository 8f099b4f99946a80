"""The Monitor and Alert methods of EvaluationService (mixed into its servicer).

Create and Update check the whole monitor before anything is written (ids,
deployment name, durations, bins, every rule: name, metric, threshold,
min_rows), naming the bad field. RunMonitor runs at once and returns the
report; the schedule runs the same code.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import empty_pb2

from aimass.core.errors import FailedPrecondition, InvalidArgument
from aimass.core.interceptors import current_principal
from aimass.evaluation.monitor_store import MUTABLE, MonitorStore, check_id, parse_monitor
from aimass.evaluation.monitors import MonitorRunner
from aimass.evaluation.v1 import evaluation_pb2 as pb

Context = grpc.aio.ServicerContext


def _principal() -> str:
    try:
        return current_principal().subject
    except Exception:  # no auth interceptor in this deployment
        return ""


class MonitorMethods:
    """CreateMonitor ... ListAlerts; ``monitor_store``/``monitor_runner`` set by the service."""

    monitor_store: MonitorStore | None = None
    monitor_runner: MonitorRunner | None = None

    def _monitors(self) -> tuple[MonitorStore, MonitorRunner]:
        if self.monitor_store is None or self.monitor_runner is None:
            raise FailedPrecondition("monitoring is not enabled in this evaluation service")
        return self.monitor_store, self.monitor_runner

    async def CreateMonitor(self, request: pb.CreateMonitorRequest, context: Context) -> pb.Monitor:
        store, _ = self._monitors()
        check_id(request.monitor_id, "monitor_id")
        return await asyncio.to_thread(
            store.create, request.monitor_id, request.monitor, _principal()
        )

    async def GetMonitor(self, request: pb.GetMonitorRequest, context: Context) -> pb.Monitor:
        store, _ = self._monitors()
        return await asyncio.to_thread(store.get, parse_monitor(request.name))

    async def ListMonitors(
        self, request: pb.ListMonitorsRequest, context: Context
    ) -> pb.ListMonitorsResponse:
        store, _ = self._monitors()
        monitors, token = await asyncio.to_thread(
            store.list, request.page_size, request.page_token, request.filter
        )
        return pb.ListMonitorsResponse(monitors=monitors, next_page_token=token)

    async def UpdateMonitor(self, request: pb.UpdateMonitorRequest, context: Context) -> pb.Monitor:
        store, _ = self._monitors()
        parse_monitor(request.monitor.name, "monitor.name")
        paths = list(request.update_mask.paths)
        if not paths:
            paths = [f.name for f, _ in request.monitor.ListFields() if f.name in MUTABLE]
        for path in paths:
            if path not in MUTABLE:
                raise InvalidArgument(
                    "update_mask", f"{path!r} cannot be changed; changeable: {', '.join(MUTABLE)}"
                )
        return await asyncio.to_thread(store.update, request.monitor, paths)

    async def DeleteMonitor(
        self, request: pb.DeleteMonitorRequest, context: Context
    ) -> empty_pb2.Empty:
        store, runner = self._monitors()
        monitor_id = parse_monitor(request.name)
        await asyncio.to_thread(store.delete, monitor_id, request.etag)
        runner.forget(monitor_id)
        return empty_pb2.Empty()

    async def RunMonitor(self, request: pb.RunMonitorRequest, context: Context) -> pb.MonitorReport:
        store, runner = self._monitors()
        monitor_id = parse_monitor(request.name)
        await asyncio.to_thread(store.get, monitor_id)  # NotFound for another project's
        return await runner.run(monitor_id)

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: Context
    ) -> pb.ListAlertsResponse:
        store, _ = self._monitors()
        alerts, token = await asyncio.to_thread(
            store.list_alerts, request.parent, request.page_size, request.page_token
        )
        return pb.ListAlertsResponse(alerts=alerts, next_page_token=token)
