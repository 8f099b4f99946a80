"""Hypothesis strategies for any protobuf message, built from its descriptor.

``messages(descriptor, names=...)`` draws a message of that type with random and boundary
values in every kind of field: empty, huge, unicode and path-like strings (``..``, ``%2F``,
NUL, very long names), negative and huge integers at every width, NaN and infinities,
known and unknown enum numbers, nested messages down to a depth, repeated fields, maps,
at most one member of each oneof, random bytes. ``names`` are real resource names (seeded
rows): strings are drawn from them and from mutations of them often, so requests reach
real rows and the code behind the name parsers.

A field mask gets paths from the field names of its sibling messages (plus junk), and
fields named ``filter`` / ``order_by`` get strings built from filter-like tokens, so the
parsers behind them see near-valid input as well as noise.

``examples`` are valid messages (the requests that seeded the stack), by type name: half
of the messages of such a type are one of them with one or two fields, at any depth,
redrawn or cleared. Random messages rarely get past the first required field of a deep
request; a valid one with a single bad field reaches the checks behind it.

No maintained package does this (hypothesis-protobuf and hypothesis-pb date from 2015 and
2019), so it is a small generator over the descriptor API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from google.api import field_behavior_pb2, resource_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

BOUNDARY_STRINGS = (
    "",
    " ",
    ".",
    "..",
    "../..",
    "../../../etc/passwd",
    "/etc/passwd",
    "/",
    "//",
    "%2F",
    "a%2Fb",
    "%2e%2e%2f",
    "\x00",
    "a\x00b",
    "\n",
    "\r\n",
    "\t",
    "*",
    "-",
    "_",
    "0",
    "-1",
    "99999999999999999999999",
    "NaN",
    "inf",
    "null",
    "true",
    "{}",
    "[]",
    '"',
    "'",
    "\\",
    "%s%n",
    "ä",
    "名前",
    "💥",
    "\u202e",
    "\ufeff",
    "a" * 64,
    "a" * 65,
    "b" * 256,
    "x" * 10_000,
    "é" * 300,
    "file:///etc/passwd",
    "s3://bucket/key",
    "C:\\Windows",
    "~/.ssh/id_rsa",
)

# Pieces of filter and ordering expressions (AIP-160 style), joined at random.
FILTER_TOKENS = (
    "name",
    "labels.a",
    "tags.x",
    "metrics.accuracy",
    "state",
    "create_time",
    "version",
    "framework",
    "=",
    "!=",
    "<",
    ">=",
    ":",
    "AND",
    "OR",
    "NOT",
    "(",
    ")",
    '"x"',
    '"',
    "0.5",
    "-1e400",
    "NaN",
    "*",
    "1",
    "desc",
    "asc",
    ",",
    "",
)

MUTATION_SUFFIXES = ("/", "/..", "/../x", "\x00", "%2F", "/versions", "/versions/0", "/-", " ")


def _mutations(name: str) -> list[str]:
    """Near-misses of a real name: truncated, extended, renumbered, re-cased."""
    head, _, last = name.rpartition("/")
    out = [name + suffix for suffix in MUTATION_SUFFIXES]
    out += [name.upper(), head, "/" + name, name.replace("/", "//")]
    if head:
        out += [f"{head}/{value}" for value in ("0", "-1", "2", "999999999999", "", "..", "*")]
        out.append(f"{head}/{last}{last}")
    return out


def strings(names: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Real names, their mutations, boundary strings and arbitrary unicode text."""
    choices: list[st.SearchStrategy[str]] = [
        st.sampled_from(BOUNDARY_STRINGS),
        st.text(max_size=40),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_./", max_size=30),
    ]
    if names:
        mutated = sorted({m for name in names for m in _mutations(name)})
        choices = [st.sampled_from(list(names)), st.sampled_from(mutated), *choices]
    return st.one_of(*choices)


def filter_strings(names: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Expressions made of filter tokens and values, near-valid more often than not."""
    tokens = st.one_of(st.sampled_from(FILTER_TOKENS), strings(names))
    return st.one_of(
        st.lists(tokens, max_size=7).map(" ".join),
        st.lists(tokens, max_size=7).map("".join),
        strings(names),
    )


def floats(width: int) -> st.SearchStrategy[float]:
    boundary = st.sampled_from([0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf")])
    return st.one_of(boundary, st.floats(width=width))


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (low, high, 0, 1, -1, low + 1, high - 1) if low <= v <= high})
    return st.one_of(
        st.sampled_from(edges), st.integers(low, min(high, 1000)), st.integers(low, high)
    )


def enums(descriptor: EnumDescriptor) -> st.SearchStrategy[int]:
    """Known numbers most of the time, unknown ones (open proto3 enums) sometimes."""
    known = [value.number for value in descriptor.values]
    return st.one_of(st.sampled_from(known), st.sampled_from(known), integers(-(2**31), 2**31 - 1))


class MessageStrategies:
    """Strategies for the messages of one schema, sharing one pool of real names."""

    def __init__(
        self,
        names: Sequence[str] = (),
        depth: int = 3,
        max_items: int = 3,
        files: Sequence[FileDescriptor] = (),
        examples: Mapping[str, Sequence[Message]] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.examples = examples or {}
        self.depth = depth
        self.max_items = max_items
        self._strings = strings(self.names)
        self._filters = filter_strings(self.names)
        self._patterns: dict[str, list[re.Pattern[str]]] = {}
        self._by_type: dict[str, st.SearchStrategy[str]] = {}
        for file in files:  # resource types of other files, referenced only by type name
            self._patterns.update(resource_patterns(file))

    def messages(self, descriptor: Descriptor, depth: int | None = None) -> st.SearchStrategy[Any]:
        """Messages of type ``descriptor`` with random fields set, nested ``depth`` deep."""
        depth = self.depth if depth is None else depth
        cls = message_factory.GetMessageClass(descriptor)
        if descriptor.full_name == "google.protobuf.FieldMask":
            return st.builds(cls)  # filled by the parent, which knows the sibling fields
        if depth < 0:
            return st.just(cls())
        for file in _files(descriptor.file):
            for kind, patterns in resource_patterns(file).items():
                self._patterns.setdefault(kind, patterns)
        drawn = st.composite(lambda draw: self._draw_message(draw, descriptor, cls, depth))()
        examples = self.examples.get(descriptor.full_name, ())
        if not examples:
            return drawn
        mutated = st.composite(lambda draw: self._mutate(draw, draw(st.sampled_from(examples))))
        return st.one_of(drawn, mutated())

    def _mutate(self, draw: st.DrawFn, example: Message) -> Message:
        """A copy of ``example`` with one or two fields (anywhere in it) redrawn or cleared."""
        message = type(example)()
        message.CopyFrom(example)
        for _ in range(draw(st.integers(1, 2))):
            self._mutate_field(draw, message, self.depth)
        return message

    def _mutate_field(self, draw: st.DrawFn, message: Message, depth: int) -> None:
        descriptor = message.DESCRIPTOR
        if not descriptor.fields:
            return
        field = draw(st.sampled_from(list(descriptor.fields)))
        if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field) and depth > 0:
            # Into a set message (or one element of a repeated one) half of the time.
            if field.is_repeated:
                elements = getattr(message, field.name)
                if len(elements) and draw(st.booleans()):
                    index = draw(st.integers(0, len(elements) - 1))
                    self._mutate_field(draw, elements[index], depth - 1)
                    return
            elif message.HasField(field.name) and draw(st.booleans()):
                self._mutate_field(draw, getattr(message, field.name), depth - 1)
                return
        message.ClearField(field.name)
        if draw(st.integers(0, 3)) > 0:  # else left cleared: a missing value
            self._set(draw, message, descriptor, field, depth)

    def _draw_message(self, draw: st.DrawFn, descriptor: Descriptor, cls: Any, depth: int) -> Any:
        message = cls()
        chosen_oneof_members = {
            oneof.name: draw(st.sampled_from([None, *[f.name for f in oneof.fields]]))
            for oneof in descriptor.oneofs
            if not _is_synthetic(oneof)
        }
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and not _is_synthetic(oneof):
                if chosen_oneof_members[oneof.name] != field.name:
                    continue
            elif draw(st.integers(0, 9)) >= (9 if _required(field) else 5):
                continue
            self._set(draw, message, descriptor, field, depth)
        return message

    def _set(
        self,
        draw: st.DrawFn,
        message: Message,
        parent: Descriptor,
        field: FieldDescriptor,
        depth: int,
    ) -> None:
        if _is_map(field):
            entry = field.message_type
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            items = draw(
                st.dictionaries(
                    self.values(key_field, parent, depth),
                    self.values(value_field, parent, depth - 1),
                    max_size=self.max_items,
                )
            )
            target = getattr(message, field.name)
            for key, value in items.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
            return
        if field.is_repeated:
            values = draw(st.lists(self.values(field, parent, depth - 1), max_size=self.max_items))
            getattr(message, field.name).extend(values)
            return
        value = draw(self.values(field, parent, depth - 1))
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(value)
            if field.message_type.full_name == "google.protobuf.FieldMask":
                paths = draw(st.lists(self._mask_paths(parent), max_size=self.max_items))
                getattr(message, field.name).paths.extend(paths)
            else:
                getattr(message, field.name).SetInParent()
        else:
            setattr(message, field.name, value)

    def values(
        self, field: FieldDescriptor, parent: Descriptor, depth: int
    ) -> st.SearchStrategy[Any]:
        """One value of ``field`` (an element, for a repeated field)."""
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            return self.messages(field.message_type, depth)
        if kind == FieldDescriptor.TYPE_ENUM:
            return enums(field.enum_type)
        if kind == FieldDescriptor.TYPE_STRING:
            if field.name in ("filter", "order_by"):
                return self._filters
            references = self._references(field, parent)
            return self._strings if references is None else references
        if kind == FieldDescriptor.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00" * 1024]))
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return floats(64)
        if kind == FieldDescriptor.TYPE_FLOAT:
            return floats(32)
        low, high = INT_RANGES[kind]
        return integers(low, high)

    def _references(
        self, field: FieldDescriptor, parent: Descriptor
    ) -> st.SearchStrategy[str] | None:
        """Real names of the resource type ``field`` refers to, or None if there are none."""
        options = field.GetOptions()
        kind = ""
        if options.HasExtension(resource_pb2.resource_reference):
            reference = options.Extensions[resource_pb2.resource_reference]
            kind = reference.type or reference.child_type
        elif field.name == "name" and parent.GetOptions().HasExtension(resource_pb2.resource):
            kind = parent.GetOptions().Extensions[resource_pb2.resource].type
        if not kind:
            return None
        if kind not in self._by_type:
            matching = [
                name
                for name in self.names
                if any(p.fullmatch(name) for p in self._patterns.get(kind, []))
            ]
            self._by_type[kind] = st.sampled_from(matching) if matching else st.nothing()
        if self._by_type[kind].is_empty:
            return None
        return st.one_of(self._by_type[kind], self._strings)

    def _mask_paths(self, parent: Descriptor) -> st.SearchStrategy[str]:
        """Field names of the message(s) the mask sits beside, "*", and junk."""
        known = sorted(
            sub.name
            for field in parent.fields
            if field.type == FieldDescriptor.TYPE_MESSAGE
            and field.message_type.full_name != "google.protobuf.FieldMask"
            for sub in field.message_type.fields
        )
        return st.one_of(st.sampled_from(known or ["name"]), st.just("*"), self._strings)


def _required(field: FieldDescriptor) -> bool:
    behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    return field_behavior_pb2.REQUIRED in behaviors


def _files(file: FileDescriptor) -> Iterator[FileDescriptor]:
    yield file
    for dependency in file.dependencies:
        yield from _files(dependency)


def resource_patterns(file: FileDescriptor) -> dict[str, list[re.Pattern[str]]]:
    """Resource type -> its name patterns as regexes, from the messages of ``file``."""
    found: dict[str, list[re.Pattern[str]]] = {}

    def visit(message: Descriptor) -> None:
        options = message.GetOptions()
        if options.HasExtension(resource_pb2.resource):
            resource = options.Extensions[resource_pb2.resource]
            found[resource.type] = [
                re.compile(re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(p)))
                for p in resource.pattern
            ]
        for nested in message.nested_types:
            visit(nested)

    for message in file.message_types_by_name.values():
        visit(message)
    return found


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
        and field.is_repeated
    )


def _is_synthetic(oneof: Any) -> bool:
    """The hidden oneof of a proto3 ``optional`` field (one member, named _<field>)."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def messages(
    descriptor: Descriptor, names: Sequence[str] = (), depth: int = 3
) -> st.SearchStrategy[Any]:
    """Random messages of type ``descriptor`` (see the module docstring)."""
    return MessageStrategies(names, depth).messages(descriptor)
