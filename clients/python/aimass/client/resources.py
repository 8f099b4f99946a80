"""Resources of the SDK: datasets, models (registry), API keys, webhooks, and job handles.

Each resource takes short names ("digits") or full resource names
("datasets/digits") and returns the generated protobuf messages, so every
field the API has is there, typed by the .pyi stubs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from google.protobuf import field_mask_pb2, timestamp_pb2

from aimass.access.v1 import access_pb2, access_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc
from aimass.client.transport import Transport
from aimass.common.v1 import common_pb2
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc

TERMINAL_STATES = frozenset(
    {
        common_pb2.JOB_STATE_SUCCEEDED,
        common_pb2.JOB_STATE_FAILED,
        common_pb2.JOB_STATE_CANCELLED,
    }
)


def full_name(collection: str, name: str) -> str:
    """ "digits" -> "datasets/digits"; a full name is kept."""
    return name if name.startswith(f"{collection}/") else f"{collection}/{name}"


async def _all_pages(fetch: Callable[[str], Any], items: str, limit: int | None) -> list[Any]:
    found: list[Any] = []
    token = ""
    while True:
        page = await fetch(token)
        found.extend(getattr(page, items))
        token = page.next_page_token
        if not token or (limit is not None and len(found) >= limit):
            return found[:limit] if limit is not None else found


class Job:
    """A long-running job (ingest today; training, evaluation, compression use the same shape)."""

    def __init__(
        self,
        resource: Any,
        get: Callable[[str], Any],
        watch: Callable[[str], AsyncIterator[common_pb2.JobEvent]],
    ) -> None:
        self.resource = resource
        self._get = get
        self._watch = watch

    @property
    def name(self) -> str:
        return str(self.resource.name)

    @property
    def state(self) -> int:
        return int(self.resource.status.state)

    async def refresh(self) -> Any:
        self.resource = await self._get(self.name)
        return self.resource

    async def events(self) -> AsyncIterator[common_pb2.JobEvent]:
        """The job's events as they happen (progress, metrics, state changes)."""
        async for event in self._watch(self.name):
            yield event

    async def wait(self, on_event: Callable[[common_pb2.JobEvent], None] | None = None) -> Any:
        """Follows the job until it ends; returns its final resource."""
        if self.state not in TERMINAL_STATES:
            async for event in self._watch(self.name):
                if on_event is not None:
                    on_event(event)
                if event.status.state in TERMINAL_STATES:
                    break
        return await self.refresh()


class Datasets:
    """``client.datasets``: datasets, their versions, and ingest jobs."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = transport.stub("data", data_pb2_grpc.DataServiceStub)

    async def create(
        self,
        dataset_id: str,
        *,
        description: str = "",
        labels: dict[str, str] | None = None,
        project: str = "",
        **config: Any,
    ) -> data_pb2.Dataset:
        """``config`` holds DatasetConfig fields: data_path or s3_uri, format, label_column..."""
        dataset = data_pb2.Dataset(
            description=description,
            labels=labels or {},
            project=project,
            config=data_pb2.DatasetConfig(**config),
        )
        return await self._t.unary(
            self._stub.CreateDataset,
            data_pb2.CreateDatasetRequest(dataset=dataset, dataset_id=dataset_id),
        )

    async def get(self, name: str) -> data_pb2.Dataset:
        return await self._t.unary(
            self._stub.GetDataset, data_pb2.GetDatasetRequest(name=full_name("datasets", name))
        )

    async def list(self, *, filter: str = "", limit: int | None = None) -> list[data_pb2.Dataset]:
        async def fetch(token: str) -> Any:
            request = data_pb2.ListDatasetsRequest(filter=filter, page_token=token)
            return await self._t.unary(self._stub.ListDatasets, request)

        return await _all_pages(fetch, "datasets", limit)

    async def delete(self, name: str) -> None:
        await self._t.unary(
            self._stub.DeleteDataset,
            data_pb2.DeleteDatasetRequest(name=full_name("datasets", name)),
        )

    async def ingest(self, name: str, *, force: bool = False, request_id: str = "") -> Job:
        """Starts an ingest of the dataset's configured source; returns its job."""
        job = await self._t.unary(
            self._stub.IngestDataset,
            data_pb2.IngestDatasetRequest(
                name=full_name("datasets", name), force=force, request_id=request_id
            ),
        )
        return self._job(job)

    async def get_version(self, name: str, version: int | None = None) -> data_pb2.DatasetVersion:
        """``get_version("digits", 1)`` or ``get_version("datasets/digits/versions/1")``."""
        full = full_name("datasets", name)
        if version is not None:
            full = f"{full}/versions/{version}"
        return await self._t.unary(
            self._stub.GetDatasetVersion, data_pb2.GetDatasetVersionRequest(name=full)
        )

    def _job(self, job: data_pb2.IngestJob) -> Job:
        async def get(job_name: str) -> data_pb2.IngestJob:
            return await self._t.unary(
                self._stub.GetIngestJob, data_pb2.GetIngestJobRequest(name=job_name)
            )

        def watch(job_name: str) -> AsyncIterator[common_pb2.JobEvent]:
            return self._t.stream(
                self._stub.WatchIngestJob, data_pb2.WatchIngestJobRequest(name=job_name)
            )

        return Job(job, get, watch)


class Models:
    """``client.models``: registered models, versions and aliases."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = transport.stub("registry", registry_pb2_grpc.RegistryServiceStub)

    async def create(
        self,
        model_id: str,
        *,
        description: str = "",
        tags: dict[str, str] | None = None,
        owner: str = "",
        project: str = "",
    ) -> registry_pb2.RegisteredModel:
        model = registry_pb2.RegisteredModel(
            description=description, tags=tags or {}, owner=owner, project=project
        )
        return await self._t.unary(
            self._stub.CreateRegisteredModel,
            registry_pb2.CreateRegisteredModelRequest(
                registered_model=model, registered_model_id=model_id
            ),
        )

    async def get(self, name: str) -> registry_pb2.RegisteredModel:
        return await self._t.unary(
            self._stub.GetRegisteredModel,
            registry_pb2.GetRegisteredModelRequest(name=full_name("models", name)),
        )

    async def list(
        self, *, filter: str = "", order_by: str = "", limit: int | None = None
    ) -> list[registry_pb2.RegisteredModel]:
        async def fetch(token: str) -> Any:
            request = registry_pb2.ListRegisteredModelsRequest(
                filter=filter, order_by=order_by, page_token=token
            )
            return await self._t.unary(self._stub.ListRegisteredModels, request)

        return await _all_pages(fetch, "registered_models", limit)

    async def update(
        self, name: str, *, etag: str = "", **fields: Any
    ) -> registry_pb2.RegisteredModel:
        """Changes the named fields only (description, tags, owner)."""
        model = registry_pb2.RegisteredModel(name=full_name("models", name), etag=etag, **fields)
        return await self._t.unary(
            self._stub.UpdateRegisteredModel,
            registry_pb2.UpdateRegisteredModelRequest(
                registered_model=model, update_mask=field_mask_pb2.FieldMask(paths=list(fields))
            ),
        )

    async def delete(self, name: str) -> None:
        await self._t.unary(
            self._stub.DeleteRegisteredModel,
            registry_pb2.DeleteRegisteredModelRequest(name=full_name("models", name)),
        )

    async def get_version(self, name: str, version: int | None = None) -> registry_pb2.ModelVersion:
        """``get_version("digits", 3)`` or ``get_version("models/digits/versions/3")``."""
        full = full_name("models", name)
        if version is not None:
            full = f"{full}/versions/{version}"
        return await self._t.unary(
            self._stub.GetModelVersion, registry_pb2.GetModelVersionRequest(name=full)
        )

    async def list_versions(
        self, name: str, *, filter: str = "", order_by: str = "", limit: int | None = None
    ) -> list[registry_pb2.ModelVersion]:
        async def fetch(token: str) -> Any:
            request = registry_pb2.ListModelVersionsRequest(
                parent=full_name("models", name),
                filter=filter,
                order_by=order_by,
                page_token=token,
            )
            return await self._t.unary(self._stub.ListModelVersions, request)

        return await _all_pages(fetch, "model_versions", limit)

    async def set_alias(self, name: str, alias: str, version: int) -> registry_pb2.Alias:
        model = full_name("models", name)
        return await self._t.unary(
            self._stub.SetAlias,
            registry_pb2.SetAliasRequest(name=f"{model}/aliases/{alias}", version=version),
        )

    async def get_alias(self, name: str, alias: str) -> registry_pb2.Alias:
        model = full_name("models", name)
        return await self._t.unary(
            self._stub.GetAlias, registry_pb2.GetAliasRequest(name=f"{model}/aliases/{alias}")
        )


_ROLES = {
    "admin": access_pb2.ROLE_ADMIN,
    "developer": access_pb2.ROLE_DEVELOPER,
    "predictor": access_pb2.ROLE_PREDICTOR,
    "viewer": access_pb2.ROLE_VIEWER,
}


class ApiKeys:
    """``client.api_keys``: create (the secret is in the answer, once), list, revoke."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = transport.stub("access", access_pb2_grpc.AccessServiceStub)

    async def create(
        self,
        key_id: str,
        role: str,
        *,
        description: str = "",
        project: str = "",
        expire_time: datetime | None = None,
        rate_limit_per_s: float = 0.0,
    ) -> access_pb2.ApiKey:
        if role not in _ROLES:
            raise ValueError(f"role must be one of {', '.join(_ROLES)}; got {role!r}")
        key = access_pb2.ApiKey(
            role=_ROLES[role],
            description=description,
            project=project,
            rate_limit_per_s=rate_limit_per_s,
        )
        if expire_time is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(expire_time)
            key.expire_time.CopyFrom(stamp)
        return await self._t.unary(
            self._stub.CreateApiKey,
            access_pb2.CreateApiKeyRequest(api_key=key, api_key_id=key_id),
        )

    async def list(self, *, show_revoked: bool = False) -> list[access_pb2.ApiKey]:
        async def fetch(token: str) -> Any:
            request = access_pb2.ListApiKeysRequest(show_revoked=show_revoked, page_token=token)
            return await self._t.unary(self._stub.ListApiKeys, request)

        return await _all_pages(fetch, "api_keys", None)

    async def revoke(self, name: str) -> access_pb2.ApiKey:
        return await self._t.unary(
            self._stub.RevokeApiKey,
            access_pb2.RevokeApiKeyRequest(name=full_name("apiKeys", name)),
        )

    async def whoami(self) -> access_pb2.CallerIdentity:
        return await self._t.unary(
            self._stub.LookupCallerIdentity, access_pb2.LookupCallerIdentityRequest()
        )


class Webhooks:
    """``client.webhooks``: event receivers over HTTP and their delivery logs (admin only)."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._stub = transport.stub("access", webhooks_pb2_grpc.WebhookServiceStub)

    async def create(
        self, webhook_id: str, url: str, event_types: list[str], *, secret: str = ""
    ) -> webhooks_pb2.Webhook:
        """Registers a receiver; the answer holds the signing secret (once)."""
        webhook = webhooks_pb2.Webhook(url=url, event_types=event_types, secret=secret)
        return await self._t.unary(
            self._stub.CreateWebhook,
            webhooks_pb2.CreateWebhookRequest(webhook=webhook, webhook_id=webhook_id),
        )

    async def list(self) -> list[webhooks_pb2.Webhook]:
        async def fetch(token: str) -> Any:
            request = webhooks_pb2.ListWebhooksRequest(page_token=token)
            return await self._t.unary(self._stub.ListWebhooks, request)

        return await _all_pages(fetch, "webhooks", None)

    async def deliveries(
        self, name: str, *, limit: int | None = None
    ) -> list[webhooks_pb2.WebhookDelivery]:
        async def fetch(token: str) -> Any:
            request = webhooks_pb2.ListWebhookDeliveriesRequest(
                parent=full_name("webhooks", name), page_token=token
            )
            return await self._t.unary(self._stub.ListWebhookDeliveries, request)

        return await _all_pages(fetch, "webhook_deliveries", limit)

    async def delete(self, name: str) -> None:
        await self._t.unary(
            self._stub.DeleteWebhook,
            webhooks_pb2.DeleteWebhookRequest(name=full_name("webhooks", name)),
        )
