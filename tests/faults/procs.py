"""Real aimass service processes for the fault-injection tests.

Each service runs as ``python -m aimass.<service>`` with its settings passed
through ``AIMASS_*`` environment variables (exactly what ``aimass up``, compose
and Kubernetes do), so a SIGKILL is a real crash: no finally blocks, no
outbox drain, no nak. :class:`Recovery` measures how long the system took to
serve again after the fault; tests print it (no timing assertions: the figure
depends on the machine's load).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import nats
import nats.js.errors
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from aimass.core.events.envelope import EVENTS_STREAM, decode_envelope
from aimass.core.settings import Settings
from aimass.events.v1.events_pb2 import Envelope

REPO = Path(__file__).resolve().parents[2]
START_DEADLINE_S = 90.0


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a service process reads ``settings`` from (plus ``extra`` variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    env.update(
        {
            "AIMASS_HOME": str(settings.home),
            "AIMASS_DATABASE_URL": settings.database_url,
            "AIMASS_ARTIFACT_ROOT": settings.artifact_root,
            "AIMASS_NATS_URL": settings.nats_url,
            "AIMASS_LOG_FORMAT": "console",
            "AIMASS_SHUTDOWN_GRACE_S": "1",
            "AIMASS_MAX_MESSAGE_MB": str(settings.max_message_mb),
            "AIMASS_DATA_ROOTS": json.dumps([str(p) for p in settings.data_roots]),
            "OMP_NUM_THREADS": "1",
        }
    )
    for name in type(settings.ports).model_fields:
        env[f"AIMASS_PORTS__{name.upper()}"] = str(settings.ports.of(name))
    env.update(extra)
    return env


def serving(address: str) -> bool:
    """Whether the gRPC server at ``address`` reports SERVING (overall health)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class ServiceProcess:
    """One ``python -m <module>`` process with its log under the settings' home."""

    def __init__(
        self,
        module: str,
        settings: Settings,
        *,
        address: str | None = None,
        args: tuple[str, ...] = (),
        log_name: str | None = None,
        **extra_env: str,
    ) -> None:
        self.module = module
        self.settings = settings
        self.address = address
        self.args = args
        self.env = settings_env(settings, **extra_env)
        self.log = Path(settings.home) / f"{log_name or module.rsplit('.', 1)[-1]}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def service(cls, name: str, settings: Settings, **extra_env: str) -> ServiceProcess:
        """``python -m aimass.<name>`` serving on its configured port."""
        return cls(f"aimass.{name}", settings, address=settings.service_address(name), **extra_env)

    def start(self, *, wait: bool = True) -> ServiceProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if wait and self.address is not None:
            try:
                self.wait_serving()
            except BaseException:
                self.kill()  # never leak a process the caller has not taken yet
                raise
        return self

    def wait_serving(self, deadline_s: float = START_DEADLINE_S) -> None:
        assert self.address is not None
        wait_until(f"{self.module} serving on {self.address}", self.is_serving, deadline_s, self)

    def is_serving(self) -> bool:
        assert self.address is not None
        return serving(self.address)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash under test (no cleanup runs in the process)."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit: the end of a test."""
        if not self.alive():
            return
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def wait_until(
    what: str,
    done: Callable[[], bool],
    deadline_s: float = START_DEADLINE_S,
    proc: ServiceProcess | None = None,
    interval_s: float = 0.05,
) -> float:
    """Polls ``done`` until true; returns the seconds it took. Fails naming ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if proc is not None and proc.process is not None and proc.process.poll() is not None:
            raise AssertionError(
                f"{proc.module} exited with {proc.process.returncode} while waiting for "
                f"{what}:\n{proc.log_tail()}"
            )
        if done():
            return time.monotonic() - start
        time.sleep(interval_s)
    tail = f"\n{proc.log_tail()}" if proc is not None else ""
    raise AssertionError(f"{what}: not within {deadline_s}s{tail}")


@contextmanager
def running(*procs: ServiceProcess) -> Iterator[tuple[ServiceProcess, ...]]:
    """Stops every process on the way out (the test may have killed some already)."""
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def report(case: str, **figures: float | int | str) -> None:
    """Prints the measured figures of a fault case on one line (``pytest -s`` shows it)."""
    parts = [f"{k}={v:.3f}s" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()]
    print(f"\n[fault] {case}: {' '.join(parts)}", flush=True)


async def stored_events(nats_url: str, topic_prefix: str = "aimass.") -> list[Envelope]:
    """Every event the AIMASS_EVENTS stream holds whose topic starts with ``topic_prefix``.

    Read message by message with the stream's direct get: what the stream stored, with no
    consumer in between (no redelivery, no dedupe), so a duplicate publish would show.
    """
    client = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = client.jetstream(timeout=10)
        state = (await js.stream_info(EVENTS_STREAM)).state
        found: list[Envelope] = []
        for seq in range(max(state.first_seq, 1), state.last_seq + 1):
            try:
                message = await js.get_msg(EVENTS_STREAM, seq)
            except nats.js.errors.NotFoundError:
                continue  # deleted or purged
            if message.subject and message.subject.startswith(topic_prefix):
                found.append(decode_envelope(message.data or b""))
        return found
    finally:
        await client.close()


def terminate_backends(db_url: str) -> int:
    """Kills every PostgreSQL server process connected to the database of ``db_url`` (the
    connections of every service on it); returns how many."""
    url = make_url(db_url)
    engine = create_engine(url.set(query={}), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            query = text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            )
            return int(connection.execute(query, {"name": url.database}).scalar_one())
    finally:
        engine.dispose()
