"""The resource commands send the caller's API key: with auth on, a good key lists models,
a wrong one is refused with UNAUTHENTICATED and exit code 1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aimass.cli.models import models_app
from aimass.core.auth.bootstrap import ensure_admin_key, read_admin_key
from aimass.core.db.migrate import upgrade
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc
from tests.fixtures.stack import serve_stack, stack_settings


@pytest.mark.parametrize(
    ("use_admin_key", "exit_code", "shown"),
    [(True, 0, "digits"), (False, 1, "UNAUTHENTICATED")],
)
async def test_models_list_sends_the_api_key(
    tmp_path: Path,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
    use_admin_key: bool,
    exit_code: int,
    shown: str,
) -> None:
    home = tmp_path / "stack"
    db_url = f"sqlite:///{tmp_path / 'aimass.db'}"
    upgrade(db_url)
    ensure_admin_key(home, db_url)
    admin_key = read_admin_key(home)
    assert admin_key
    settings = stack_settings(home, db_url, nats_url, auth={"enabled": True})
    # The CLI's own home holds no key file: the key can only come from the environment.
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("AIMASS_API_KEY", admin_key if use_admin_key else "aimass_nope_secret")
    async with serve_stack(settings, ["registry"]) as stack:
        registry = registry_pb2_grpc.RegistryServiceStub(stack.channel("registry"))
        await registry.CreateRegisteredModel(
            pb.CreateRegisteredModelRequest(registered_model_id="digits"),
            metadata=(("x-api-key", admin_key),),
        )
        listing = ["list", "--address", stack.address("registry")]
        result = await asyncio.to_thread(CliRunner().invoke, models_app, listing)

    assert result.exit_code == exit_code, result.output
    assert shown in result.output
