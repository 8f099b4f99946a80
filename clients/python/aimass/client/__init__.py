"""The aimass Python SDK: typed sync and asyncio clients over the generated gRPC stubs.

    from aimass.client import Client

    with Client() as client:                       # the configured stack, AIMASS_API_KEY
        client.datasets.create("digits", data_path="/data/digits.csv", label_column="label")
        job = client.datasets.ingest("digits")     # a Job handle
        job.wait()                                 # follows WatchIngestJob
        model = client.models.get("digits-mlp")
        version = client.models.get_version("digits-mlp", 3)

    async with AsyncClient() as client:            # the same API, awaited
        datasets = await client.datasets.list()

Credentials, first found: ``api_key=``, AIMASS_API_KEY, the ``api_key`` of the
client config file (AIMASS_CLIENT_CONFIG, else ~/.config/aimass/client.yaml),
then the admin key ``aimass up`` wrote under AIMASS_HOME. Addresses come from
the aimass settings (AIMASS_HOST, AIMASS_PORTS__*) unless ``addresses=`` says
otherwise. Unary calls have a deadline (``timeout_s``) and are retried on
UNAVAILABLE with exponential backoff; errors are :class:`ClientError` with the
gRPC code and the server's message.

Extension point: a resource is a class over :class:`Transport`; services
being built (training, evaluation, routing) add theirs in
``aimass.client.resources`` and one attribute of :class:`AsyncClient`.
"""

from __future__ import annotations

from aimass.client.aio import AsyncClient
from aimass.client.config import ClientConfig
from aimass.client.sync import Client
from aimass.client.transport import ClientError, Transport

__all__ = ["AsyncClient", "Client", "ClientConfig", "ClientError", "Transport"]
