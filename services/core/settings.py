"""Settings of every aimass process: AIMASS_* environment variables over an optional YAML file.

Precedence, highest first: keyword arguments, environment variables
(``AIMASS_DATABASE_URL``, nested with a double underscore:
``AIMASS_PORTS__REGISTRY=7005``), the YAML file named by ``AIMASS_CONFIG``
(else ``$AIMASS_HOME/config.yaml`` when it exists), then the defaults below.
Settings are read once, when a process starts, never at import time.
Invalid values raise :class:`SettingsError` naming the variable and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "AIMASS_"
SERVICE_NAMES = ("data", "training", "evaluation", "compression", "registry", "routing")


class SettingsError(ValueError):
    """Settings that cannot be used; the message names each bad key and why."""


class Ports(BaseModel):
    """TCP port of each process of the stack. 0 picks a free port (tests).

    Defaults stay below 32768, outside Linux's ephemeral range, so an outgoing
    connection never holds a service's port when the stack starts.
    """

    model_config = {"extra": "forbid"}

    data: int = Field(default=7101, ge=0, le=65535)
    training: int = Field(default=7102, ge=0, le=65535)
    evaluation: int = Field(default=7103, ge=0, le=65535)
    compression: int = Field(default=7104, ge=0, le=65535)
    registry: int = Field(default=7105, ge=0, le=65535)
    routing: int = Field(default=7106, ge=0, le=65535)
    pipeline: int = Field(default=7107, ge=0, le=65535)
    gateway: int = Field(default=8080, ge=0, le=65535)
    # Not 4222: a system NATS often listens there already.
    nats: int = Field(default=4232, ge=0, le=65535)
    nats_monitor: int = Field(default=8232, ge=0, le=65535)
    triton_grpc: int = Field(default=8101, ge=0, le=65535)
    triton_http: int = Field(default=8100, ge=0, le=65535)
    metrics: int = Field(default=9464, ge=0, le=65535)

    def of(self, service: str) -> int:
        """The port of a named service; raises KeyError for an unknown name."""
        if service not in type(self).model_fields:
            raise KeyError(f"no port is configured for {service!r}")
        return int(getattr(self, service))


class S3Settings(BaseModel):
    """How to reach an S3-compatible store for s3:// URIs (MinIO, moto, AWS)."""

    model_config = {"extra": "forbid"}

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    # Multipart part size: the memory one upload holds at a time.
    part_size_mb: int = Field(default=16, ge=5, le=512)


class TracingSettings(BaseModel):
    """Where OpenTelemetry spans go."""

    model_config = {"extra": "forbid"}

    exporter: Literal["none", "console", "file", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    # For exporter "file": JSON lines, one span each.
    file: Path | None = None
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


class AuthSettings(BaseModel):
    """Access control (aimass.core.auth): off by default; AIMASS_AUTH__ENABLED=true turns it on."""

    model_config = {"extra": "forbid"}

    enabled: bool = False
    # JWTs must carry this issuer (and this audience when set) and an exp.
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # RS256 public keys (a JWKS JSON document).
    jwks_file: Path | None = None
    hs256_secret: str | None = None
    # Shared by the processes of one stack: lets a service call another on behalf of
    # nobody (background work). `aimass up` generates it; never give it to users.
    internal_token: str | None = None
    # Token bucket per key in each service process; a key's own rate overrides it. 0: none.
    rate_limit_per_s: float = Field(default=200.0, ge=0.0)
    # Burst, in seconds of the rate.
    rate_limit_burst_s: float = Field(default=2.0, gt=0.0)
    # Seconds a service trusts a key lookup (how long a revoked key may still work there).
    key_cache_s: float = Field(default=5.0, ge=0.0, le=300.0)

    @field_validator("jwks_file")
    @classmethod
    def _jwks_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("hs256_secret")
    @classmethod
    def _long_secret(cls, value: str | None) -> str | None:
        # RFC 7518 3.2: an HS256 key must be at least as long as the hash (32 bytes).
        if value is not None and len(value.encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return value


class TrainingSettings(BaseModel):
    """Admission of training jobs (aimass.training.scheduling)."""

    model_config = {"extra": "forbid"}

    # Concurrent jobs (released to a worker or running) per project, e.g. {"vision": 2};
    # a project not listed gets default_quota. 0: no limit. Jobs over it wait QUEUED.
    quotas: dict[str, int] = Field(default_factory=dict)
    default_quota: int = Field(default=0, ge=0)
    # A worker not heard from for this long is given no new job.
    worker_stale_s: float = Field(default=30.0, gt=0.0)

    @field_validator("quotas")
    @classmethod
    def _quotas_not_negative(cls, value: dict[str, int]) -> dict[str, int]:
        negative = sorted(project for project, limit in value.items() if limit < 0)
        if negative:
            raise ValueError(f"must be >= 0 (0: no limit); negative for {', '.join(negative)}")
        return value


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML settings file; its keys mirror the field names."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SettingsError(f"{self.path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise SettingsError(
                f"{self.path}: must hold a mapping of settings, not {type(data).__name__}"
            )
        return data


class Settings(BaseSettings):
    """Every setting of an aimass process. Construct with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    # Data folder of the embedded stack: database, artifacts, logs, pid files.
    home: Path = Path(".aimass")
    host: str = "127.0.0.1"
    # SQLAlchemy URL; default: a SQLite file under home.
    database_url: str = ""
    # Root URI of the artifact store (file:// or s3://); default: home/artifacts.
    artifact_root: str = ""
    # Default: the embedded stack's own NATS on ports.nats.
    nats_url: str = ""
    ports: Ports = Field(default_factory=Ports)
    s3: S3Settings = Field(default_factory=S3Settings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    # Seconds a stopping server waits for in-flight calls before cancelling them.
    shutdown_grace_s: float = Field(default=10.0, ge=0.0, le=600.0)
    # Largest gRPC message, both ways.
    max_message_mb: int = Field(default=64, ge=1, le=2048)
    # Folders ingest may read local files from; default: home/data and the cwd.
    data_roots: list[Path] = Field(default_factory=list)
    # Host of each service where it is not `host` (compose, Kubernetes: one host per
    # service), e.g. AIMASS_SERVICE_HOSTS__REGISTRY=registry. Servers still bind `host`.
    service_hosts: dict[str, str] = Field(default_factory=dict)
    # The service whose process also serves the REST gateway on ports.gateway, calling its
    # own unary methods in process (the embedded stack: routing); "" means none does.
    co_located_gateway: str = ""

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:// or postgresql:// SQLAlchemy URL")
        return value

    @field_validator("service_hosts")
    @classmethod
    def _known_services(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(Ports.model_fields))
        if unknown:
            raise ValueError(
                f"unknown service {', '.join(unknown)}; known: {', '.join(Ports.model_fields)}"
            )
        return value

    @field_validator("co_located_gateway")
    @classmethod
    def _known_gateway_host(cls, value: str) -> str:
        if value and value not in (*SERVICE_NAMES, "pipeline"):
            raise ValueError(f"unknown service; known: {', '.join((*SERVICE_NAMES, 'pipeline'))}")
        return value

    @field_validator("artifact_root")
    @classmethod
    def _known_artifact_scheme(cls, value: str) -> str:
        if value and not value.startswith(("file://", "s3://")):
            raise ValueError("must be a file:// or s3:// URI")
        return value

    @field_validator("nats_url")
    @classmethod
    def _nats_scheme(cls, value: str) -> str:
        if value and not all(u.strip().startswith(("nats://", "tls://")) for u in value.split(",")):
            raise ValueError("must be nats://host:port (comma-separated for a cluster)")
        return value

    @model_validator(mode="after")
    def _fill_defaults_under_home(self) -> Settings:
        home = self.home.expanduser().absolute()
        self.home = home
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'aimass.db'}"
        if not self.artifact_root:
            self.artifact_root = (home / "artifacts").as_uri()
        if not self.nats_url:
            self.nats_url = f"nats://{self.host}:{self.ports.nats}"
        if not self.data_roots:
            self.data_roots = [home / "data", Path.cwd()]
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, _config_file()))

    def service_address(self, service: str) -> str:
        """host:port where a service of the stack listens."""
        return f"{self.service_hosts.get(service, self.host)}:{self.ports.of(service)}"


def _config_file() -> Path | None:
    explicit = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise SettingsError(f"{ENV_PREFIX}CONFIG: {path} does not exist")
        return path
    home = Path(os.environ.get(f"{ENV_PREFIX}HOME", ".aimass"))
    return home / "config.yaml"


def _env_name(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def load_settings(**overrides: Any) -> Settings:
    """Reads the settings; raises SettingsError listing every bad key."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        problems = [
            f"{_env_name(e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()
        ]
        raise SettingsError("invalid settings: " + "; ".join(problems)) from err
