"""The event envelope, topics and the names of the JetStream streams.

Every event is an ``aimass.events.v1.Envelope`` whose payload is packed in an
``Any``. Events ride the stream AIMASS_EVENTS on subjects ``aimass.<service>.
<resource>.<verb>``; jobs ride the work-queue stream AIMASS_JOBS on subjects
``aimassjobs.<kind>``. The two prefixes differ in their first token, so the
streams' subjects never overlap.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from aimass.core.errors import InvalidArgument
from aimass.events.v1 import events_pb2

Envelope = events_pb2.Envelope
M = TypeVar("M", bound=Message)

EVENTS_STREAM = "AIMASS_EVENTS"
EVENTS_PREFIX = "aimass"
JOBS_STREAM = "AIMASS_JOBS"
JOBS_PREFIX = "aimassjobs"

# JetStream's de-duplication header: the stream drops a second message with the same id.
MSG_ID_HEADER = "Nats-Msg-Id"

# A subject token: no wildcard, no separator, no whitespace.
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
# Durable consumer and job kind names: one subject token, kept short.
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class UndecodableEvent(ValueError):
    """A message that is not an Envelope (or lacks an id): it can never be handled."""


def validate_topic(topic: str, *, prefix: str = EVENTS_PREFIX, field: str = "topic") -> str:
    """Returns ``topic`` when it is a concrete subject under ``prefix``; raises InvalidArgument."""
    tokens = topic.split(".") if topic else []
    if len(tokens) < 2 or tokens[0] != prefix:
        raise InvalidArgument(field, f"must be a subject under '{prefix}.', got {topic!r}")
    bad = [t for t in tokens[1:] if not _TOKEN.match(t)]
    if bad:
        raise InvalidArgument(
            field, f"token {bad[0]!r} of {topic!r} is empty or holds a wildcard, dot or space"
        )
    return topic


def validate_topic_filter(topic: str, *, field: str = "topics") -> str:
    """Like :func:`validate_topic` but allows the ``*`` and trailing ``>`` wildcards."""
    tokens = topic.split(".") if topic else []
    if len(tokens) < 2 or tokens[0] != EVENTS_PREFIX:
        raise InvalidArgument(field, f"must be a subject under '{EVENTS_PREFIX}.', got {topic!r}")
    for index, token in enumerate(tokens[1:], start=1):
        last = index == len(tokens) - 1
        if token == "*" or (token == ">" and last) or _TOKEN.match(token):
            continue
        raise InvalidArgument(field, f"token {token!r} of {topic!r} is not a valid subject token")
    return topic


def validate_name(name: str, field: str) -> str:
    """Returns ``name`` when it can be a consumer name or subject token; raises InvalidArgument."""
    if not _NAME.match(name or ""):
        raise InvalidArgument(field, f"must be 1-64 letters, digits, '_' or '-', got {name!r}")
    return name


def build_envelope(topic: str, payload: Message, *, subject: str, source: str) -> Envelope:
    """A new envelope (fresh uuid4 id, current time) carrying ``payload``."""
    if not isinstance(payload, Message):
        kind = type(payload).__name__
        raise InvalidArgument("payload", f"must be a protobuf message, got {kind}")
    envelope = Envelope(
        id=str(uuid.uuid4()),
        type=payload.DESCRIPTOR.full_name,
        source=source,
        subject=subject,
        topic=topic,
    )
    envelope.time.CopyFrom(_now())
    envelope.payload.Pack(payload)
    return envelope


def decode_envelope(data: bytes) -> Envelope:
    """Parses a message body; raises UndecodableEvent when it is not a usable envelope."""
    try:
        envelope = Envelope.FromString(data)
    except DecodeError as err:
        raise UndecodableEvent(f"not an aimass.events.v1.Envelope: {err}") from err
    if not envelope.id:
        raise UndecodableEvent("envelope has no id")
    return envelope


def unpack(envelope: Envelope, message_type: type[M]) -> M:
    """The envelope's payload as ``message_type``; raises InvalidArgument on a type mismatch."""
    message = message_type()
    if not envelope.payload.Unpack(message):
        raise InvalidArgument(
            "payload",
            f"holds {envelope.payload.TypeName()!r}, not {message.DESCRIPTOR.full_name!r}",
        )
    return message


def pack_any(message: Message) -> any_pb2.Any:
    """``message`` packed in an Any (helper for callers building envelopes by hand)."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def encode_headers(headers: Mapping[str, str]) -> str:
    """Headers as "k=v" lines, the form the outbox table stores trace context in."""
    return "".join(f"{key}={value}\n" for key, value in headers.items())


def decode_headers(text: str) -> dict[str, str]:
    """Inverse of :func:`encode_headers`."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp
