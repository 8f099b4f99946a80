"""The asyncio client: ``async with AsyncClient() as client: await client.models.get(...)``."""

from __future__ import annotations

from types import TracebackType

from aimass.client.config import ClientConfig
from aimass.client.resources import ApiKeys, Datasets, Models, Webhooks
from aimass.client.transport import Transport


class AsyncClient:
    """Resources over pooled grpc.aio channels; see the package docstring for settings."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        addresses: dict[str, str] | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        self.config = config or ClientConfig.resolve(
            api_key=api_key, addresses=addresses, timeout_s=timeout_s, retries=retries
        )
        self.transport = Transport(self.config)
        self.datasets = Datasets(self.transport)
        self.models = Models(self.transport)
        self.api_keys = ApiKeys(self.transport)
        self.webhooks = Webhooks(self.transport)
        # Extension point: training, evaluation, compression and deployments join here
        # as resources over self.transport when their services are served.

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
