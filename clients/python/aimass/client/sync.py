"""The synchronous client: the asyncio client driven by a private event loop thread.

One implementation serves both APIs: each sync call submits the async
method's coroutine to the client's own loop and waits for it, so retries,
deadlines and channels behave the same. Objects the async API returns that
have async methods (job handles) come back wrapped the same way.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aimass.client.aio import AsyncClient
from aimass.client.config import ClientConfig
from aimass.client.resources import Job


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="aimass-client", daemon=True
        )
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class SyncProxy:
    """Calls the async object's coroutine methods and returns their results."""

    def __init__(self, target: Any, loop: _Loop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if inspect.iscoroutinefunction(value):
            return self._blocking(value)
        if inspect.isasyncgenfunction(value):
            return self._collecting(value)
        return value

    def _blocking(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._wrap(self._loop.run(function(*args, **kwargs)))

        return call

    def _collecting(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> list[Any]:
            async def collect() -> list[Any]:
                return [item async for item in function(*args, **kwargs)]

            return self._loop.run(collect())

        return call

    def _wrap(self, value: Any) -> Any:
        return SyncProxy(value, self._loop) if isinstance(value, Job) else value


class Client:
    """``with Client() as client: client.models.get("digits")``; same arguments as AsyncClient."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        addresses: dict[str, str] | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        self._loop = _Loop()

        async def build() -> AsyncClient:
            return AsyncClient(
                api_key=api_key,
                addresses=addresses,
                timeout_s=timeout_s,
                retries=retries,
                config=config,
            )

        self._async = self._loop.run(build())
        self.config = self._async.config
        self.datasets = SyncProxy(self._async.datasets, self._loop)
        self.models = SyncProxy(self._async.models, self._loop)
        self.api_keys = SyncProxy(self._async.api_keys, self._loop)
        self.webhooks = SyncProxy(self._async.webhooks, self._loop)

    def close(self) -> None:
        self._loop.run(self._async.close())
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
