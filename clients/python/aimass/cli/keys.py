"""``aimass keys``: API keys from a terminal (admin only), over the SDK.

    aimass keys create ci-bot --role developer [--project vision] [--rate 50]
    aimass keys list [--all]
    aimass keys revoke ci-bot

The secret is printed once, by ``create``. Credentials as the SDK finds them
(AIMASS_API_KEY, the client config file, the admin key of the local stack).
Exit codes: 0 done, 1 the service refused (the message says why), 2 bad usage.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, NoReturn

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from aimass.client import Client, ClientError

EXIT_FAILED = 1
EXIT_USAGE = 2
ROLES = ("admin", "developer", "predictor", "viewer")

keys_app = typer.Typer(help="API keys: create, list, revoke (admin only).", no_args_is_help=True)
console = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _run(action: Any) -> Any:
    try:
        with Client() as client:
            return action(client)
    except ClientError as err:
        _fail(f"{err.code.name}: {err.message}")
    except ValueError as err:
        _fail(str(err), EXIT_USAGE)


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@keys_app.command("create")
def create(
    key_id: Annotated[str, typer.Argument(help="The key's id: apiKeys/<id>.")],
    role: Annotated[str, typer.Option("--role", help=f"One of {', '.join(ROLES)}.")],
    project: Annotated[str, typer.Option("--project", help="Scope to one project.")] = "",
    description: Annotated[str, typer.Option("--description")] = "",
    rate: Annotated[float, typer.Option("--rate", min=0.0, help="Requests/s; 0: default.")] = 0.0,
    as_json: JsonOption = False,
) -> None:
    """Create a key; its secret is printed once and never again."""
    if role not in ROLES:
        _fail(f"--role must be one of {', '.join(ROLES)}; got {role!r}", EXIT_USAGE)
    key = _run(
        lambda c: c.api_keys.create(
            key_id, role, project=project, description=description, rate_limit_per_s=rate
        )
    )
    if as_json:
        typer.echo(json.dumps(_as_dict(key), indent=2))
        return
    console.print(f"created {key.name} ({role}); the key, shown only now:")
    typer.echo(key.secret)


@keys_app.command("list")
def list_keys(
    show_all: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List keys (never their secrets)."""
    keys = _run(lambda c: c.api_keys.list(show_revoked=show_all))
    if as_json:
        typer.echo(json.dumps([_as_dict(k) for k in keys], indent=2))
        return
    table = Table(title="API keys")
    for column in ("name", "role", "project", "created", "revoked", "description"):
        table.add_column(column)
    for key in keys:
        table.add_row(
            key.name,
            _as_dict(key).get("role", "").removeprefix("ROLE_").lower(),
            key.project,
            key.create_time.ToDatetime().isoformat(timespec="seconds"),
            "yes" if key.HasField("revoke_time") else "",
            key.description,
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="apiKeys/<id> or <id>.")]) -> None:
    """Revoke a key: every service refuses it within seconds."""
    key = _run(lambda c: c.api_keys.revoke(key_id))
    console.print(f"revoked {key.name}")
