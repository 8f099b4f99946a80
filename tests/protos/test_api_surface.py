"""The API surface of every aimass service, read from the generated Python descriptors.

Each rule of the house API style (DESIGN.md, "Protos") is a check that returns the list of
problems it found, so a failing test names every offending method, message and field at once.
The checks read FileDescriptorProtos (with their google.api options), which lets the tests at
the bottom remove one annotation from a copy and prove that the check then fails.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.api import annotations_pb2, field_behavior_pb2, http_pb2, resource_pb2
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"

EXPECTED_SERVICES = {
    "aimass.registry.v1.RegistryService",
    "aimass.data.v1.DataService",
    "aimass.training.v1.TrainingService",
    "aimass.evaluation.v1.EvaluationService",
    "aimass.compression.v1.CompressionService",
    "aimass.routing.v1.RoutingService",
    "aimass.routing.v1.PredictionService",
}

FDP = descriptor_pb2.FieldDescriptorProto
IDENTIFIER = field_behavior_pb2.FieldBehavior.IDENTIFIER
# `{name=datasets/*}` or `{dataset.name=datasets/*}` or `{name}`.
PATH_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")
STANDARD_VERBS = ("Get", "Create", "Update")


@dataclass(frozen=True)
class Method:
    """One RPC with the full names of its service and message types."""

    service: str
    proto: descriptor_pb2.MethodDescriptorProto

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.proto.name}"

    @property
    def request(self) -> str:
        return self.proto.input_type.lstrip(".")

    @property
    def response(self) -> str:
        return self.proto.output_type.lstrip(".")


class Api:
    """An index over a set of proto files: their messages by full name, and their methods."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self.files = list(files)
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.methods: list[Method] = []
        self.services: set[str] = set()
        for file in self.files:
            for message in file.message_type:
                self._index_message(f"{file.package}.{message.name}", message)
            for service in file.service:
                name = f"{file.package}.{service.name}"
                self.services.add(name)
                self.methods.extend(Method(name, method) for method in service.method)

    def _index_message(self, full_name: str, message: descriptor_pb2.DescriptorProto) -> None:
        self.messages[full_name] = message
        for nested in message.nested_type:
            self._index_message(f"{full_name}.{nested.name}", nested)

    def field(self, message_name: str, field_name: str) -> FDP | None:
        """The field of that name in the message, or None (also for unknown messages)."""
        message = self.messages.get(message_name)
        if message is None:
            return None
        return next((f for f in message.field if f.name == field_name), None)

    def resolve_path(self, message_name: str, dotted: str) -> FDP | None:
        """Follows `a.b.c` through nested message fields; None when a step is missing."""
        field: FDP | None = None
        current = message_name
        for part in dotted.split("."):
            field = self.field(current, part)
            if field is None:
                return None
            current = field.type_name.lstrip(".")
        return field


def load_aimass_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """Imports the generated *_pb2 module of every .proto under protos/aimass and copies its
    descriptor (an import error here means `make protos` was not run after adding a file)."""
    files = []
    for proto in sorted(PROTO_ROOT.glob("aimass/*/v1/*.proto")):
        module_name = ".".join(proto.relative_to(PROTO_ROOT).with_suffix("").parts) + "_pb2"
        module = importlib.import_module(module_name)
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        files.append(file)
    return files


def http_rule(method: Method) -> http_pb2.HttpRule | None:
    options = method.proto.options
    if not options.HasExtension(annotations_pb2.http):
        return None
    return options.Extensions[annotations_pb2.http]


def rule_verb_and_path(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    return (kind or "").upper(), getattr(rule, kind) if kind else ""


def resource_of(message: descriptor_pb2.DescriptorProto) -> resource_pb2.ResourceDescriptor | None:
    if not message.options.HasExtension(resource_pb2.resource):
        return None
    return message.options.Extensions[resource_pb2.resource]


def pattern_to_template(pattern: str) -> str:
    """`datasets/{dataset}/versions/{version}` -> `datasets/*/versions/*`."""
    return re.sub(r"\{[^}]+\}", "*", pattern)


# --------------------------------------------------------------------------------------------
# The checks. Each returns the problems it found; an empty list means the rule holds.


def check_services_exist(api: Api) -> list[str]:
    return [f"service {name} is missing" for name in sorted(EXPECTED_SERVICES - api.services)]


def check_http_rules(api: Api) -> list[str]:
    """Every RPC has a google.api.http rule whose path variables are fields of the request
    and whose body is empty, "*" or a top-level request field."""
    problems = []
    for method in api.methods:
        rule = http_rule(method)
        if rule is None:
            problems.append(f"{method.full_name}: no google.api.http annotation")
            continue
        verb, path = rule_verb_and_path(rule)
        if not path.startswith("/v1/"):
            problems.append(f"{method.full_name}: path {path!r} does not start with /v1/")
        for variable, _ in PATH_VARIABLE.findall(path):
            field = api.resolve_path(method.request, variable)
            if field is None:
                problems.append(
                    f"{method.full_name}: path variable {variable!r} is not a field of "
                    f"{method.request}"
                )
            elif field.type != FDP.TYPE_STRING or field.label == FDP.LABEL_REPEATED:
                problems.append(f"{method.full_name}: path variable {variable!r} is not a string")
        problems.extend(_body_problems(api, method, verb, rule.body))
    return problems


def _body_problems(api: Api, method: Method, verb: str, body: str) -> list[str]:
    if verb in ("GET", "DELETE") and body:
        return [f"{method.full_name}: {verb} must not have a body"]
    if verb in ("POST", "PUT", "PATCH") and not body:
        return [f"{method.full_name}: {verb} needs a body ('*' or a request field)"]
    if body and body != "*" and api.field(method.request, body) is None:
        return [f"{method.full_name}: body {body!r} is not a field of {method.request}"]
    return []


def check_http_routes_unique(api: Api) -> list[str]:
    """No two RPCs share a verb and path template: the transcoder could not tell them apart."""
    seen: dict[tuple[str, str], str] = {}
    problems = []
    for method in api.methods:
        rule = http_rule(method)
        if rule is None:
            continue
        verb, path = rule_verb_and_path(rule)
        template = PATH_VARIABLE.sub(lambda m: "{" + (m.group(2) or "*") + "}", path)
        other = seen.setdefault((verb, template), method.full_name)
        if other != method.full_name:
            problems.append(f"{method.full_name} and {other} both map to {verb} {template}")
    return problems


def has_custom_verb(method: Method) -> bool:
    """Whether the REST path ends in a custom verb (`...}:lineage`): AIP custom methods may
    return anything, standard ones return their resource."""
    rule = http_rule(method)
    if rule is None:
        return False
    _, path = rule_verb_and_path(rule)
    return re.search(r":[A-Za-z]+$", PATH_VARIABLE.sub("", path)) is not None


def is_standard_method(method: Method) -> bool:
    """Get/Create/Update of a resource: `GetDataset` returning `Dataset`, unary, no custom
    verb in its path."""
    verb = next((v for v in STANDARD_VERBS if method.proto.name.startswith(v)), None)
    return (
        verb is not None
        and not method.proto.server_streaming
        and not has_custom_verb(method)
        and method.response.rsplit(".", 1)[-1] == method.proto.name[len(verb) :]
    )


def standard_resource_messages(api: Api) -> dict[str, str]:
    """Messages that are resources by the way the API uses them, with the reason: returned by a
    standard Get/Create/Update, listed by a List, or carrying a `name` marked IDENTIFIER."""
    found: dict[str, str] = {}
    for method in api.methods:
        if is_standard_method(method):
            found.setdefault(method.response, f"returned by {method.full_name}")
        if method.proto.name.startswith("List"):
            for field in api.messages[method.response].field:
                if field.label == FDP.LABEL_REPEATED and field.type == FDP.TYPE_MESSAGE:
                    element = field.type_name.lstrip(".")
                    if api.field(element, "name") is not None:
                        found.setdefault(element, f"listed by {method.full_name}")
    for full_name, message in api.messages.items():
        name = next((f for f in message.field if f.name == "name"), None)
        if (
            name is not None
            and IDENTIFIER in name.options.Extensions[field_behavior_pb2.field_behavior]
        ):
            found.setdefault(full_name, "its name is an IDENTIFIER")
    return found


def check_resources_annotated(api: Api) -> list[str]:
    """Every resource message carries google.api.resource with a type and a pattern, and a
    string `name` field marked IDENTIFIER."""
    problems = []
    for full_name, why in sorted(standard_resource_messages(api).items()):
        message = api.messages[full_name]
        resource = resource_of(message)
        if resource is None or not resource.type or not resource.pattern:
            problems.append(f"{full_name} ({why}): no google.api.resource with type and pattern")
        name = api.field(full_name, "name")
        if name is None or name.type != FDP.TYPE_STRING:
            problems.append(f"{full_name} ({why}): no string `name` field")
        elif IDENTIFIER not in name.options.Extensions[field_behavior_pb2.field_behavior]:
            problems.append(f"{full_name} ({why}): `name` is not marked IDENTIFIER")
    return problems


def check_get_paths_match_patterns(api: Api) -> list[str]:
    """A Get's REST path is its resource's name pattern, so REST URLs are resource names."""
    problems = []
    for method in api.methods:
        if not method.proto.name.startswith("Get") or has_custom_verb(method):
            continue
        rule = http_rule(method)
        response = api.messages.get(method.response)
        resource = resource_of(response) if response is not None else None
        if rule is None or resource is None:
            continue
        _, path = rule_verb_and_path(rule)
        templates = dict(PATH_VARIABLE.findall(path))
        expected = {pattern_to_template(p) for p in resource.pattern}
        if templates.get("name") not in expected:
            problems.append(
                f"{method.full_name}: path {path!r} does not match the patterns "
                f"{sorted(resource.pattern)} of {method.response}"
            )
    return problems


def check_resource_references(api: Api) -> list[str]:
    """Every resource_reference names a resource type some aimass proto defines, and no type
    is defined twice."""
    defined: dict[str, str] = {}
    problems = []
    for full_name, message in api.messages.items():
        resource = resource_of(message)
        if resource is not None:
            other = defined.setdefault(resource.type, full_name)
            if other != full_name:
                problems.append(f"{resource.type} is defined by both {other} and {full_name}")
    for full_name, message in api.messages.items():
        for field in message.field:
            if not field.options.HasExtension(resource_pb2.resource_reference):
                continue
            reference = field.options.Extensions[resource_pb2.resource_reference]
            for kind in filter(None, (reference.type, reference.child_type)):
                if kind != "*" and kind not in defined:
                    problems.append(f"{full_name}.{field.name}: unknown resource type {kind}")
    return problems


def check_list_pagination(api: Api) -> list[str]:
    """Every List* request has page_size and page_token, and its response next_page_token."""
    problems = []
    expected_request = {"page_size": FDP.TYPE_INT32, "page_token": FDP.TYPE_STRING}
    for method in api.methods:
        if not method.proto.name.startswith("List"):
            continue
        for field_name, field_type in expected_request.items():
            field = api.field(method.request, field_name)
            if field is None or field.type != field_type:
                problems.append(f"{method.full_name}: request has no {field_name}")
        token = api.field(method.response, "next_page_token")
        if token is None or token.type != FDP.TYPE_STRING:
            problems.append(f"{method.full_name}: response has no next_page_token")
    return problems


def check_watch_streaming(api: Api) -> list[str]:
    """Every Watch* method streams from the server, and only from the server."""
    return [
        f"{method.full_name}: Watch methods must be server-streaming only"
        for method in api.methods
        if method.proto.name.startswith("Watch")
        and (not method.proto.server_streaming or method.proto.client_streaming)
    ]


ALL_CHECKS = [
    check_services_exist,
    check_http_rules,
    check_http_routes_unique,
    check_resources_annotated,
    check_get_paths_match_patterns,
    check_resource_references,
    check_list_pagination,
    check_watch_streaming,
]


# --------------------------------------------------------------------------------------------
# The rules hold for the real API.


@pytest.fixture(scope="module")
def files() -> list[descriptor_pb2.FileDescriptorProto]:
    return load_aimass_files()


@pytest.fixture(scope="module")
def api(files: list[descriptor_pb2.FileDescriptorProto]) -> Api:
    return Api(files)


def test_every_proto_file_is_generated_and_indexed(api: Api) -> None:
    names = {file.name for file in api.files}
    on_disk = {str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("aimass/*/v1/*.proto")}
    assert names == on_disk
    with_methods = {method.service for method in api.methods}
    assert with_methods >= EXPECTED_SERVICES


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_api_rule_holds(api: Api, check) -> None:
    problems = check(api)
    assert problems == [], "\n".join(problems)


def test_known_methods_have_the_expected_shape(api: Api) -> None:
    """A few anchors, so a check that silently matched nothing would show here."""
    by_name = {method.full_name: method for method in api.methods}
    predict = by_name["aimass.routing.v1.PredictionService.Predict"]
    assert rule_verb_and_path(http_rule(predict)) == (
        "POST",
        "/v1/{deployment=deployments/*}:predict",
    )
    watch = by_name["aimass.data.v1.DataService.WatchIngestJob"]
    assert watch.proto.server_streaming
    assert watch.response == "aimass.common.v1.JobEvent"
    upload = by_name["aimass.data.v1.DataService.UploadData"]
    assert upload.proto.client_streaming
    assert not upload.proto.server_streaming
    resources = standard_resource_messages(api)
    for expected in (
        "aimass.data.v1.Dataset",
        "aimass.data.v1.DatasetVersion",
        "aimass.data.v1.IngestJob",
        "aimass.training.v1.TrainingJob",
        "aimass.training.v1.Worker",
        "aimass.evaluation.v1.Evaluation",
        "aimass.evaluation.v1.Benchmark",
        "aimass.compression.v1.CompressionJob",
        "aimass.compression.v1.CompressionPolicy",
        "aimass.routing.v1.InferenceServer",
        "aimass.routing.v1.Deployment",
        "aimass.routing.v1.RouteTable",
    ):
        assert expected in resources


def test_predict_messages_are_wire_compatible_with_triton(api: Api) -> None:
    """The router forwards Triton's bytes unparsed: field numbers and types must line up with
    inference.ModelInferRequest / ModelInferResponse (grpc_service.proto)."""
    triton_request = {
        "model_name": (1, FDP.TYPE_STRING),
        "model_version": (2, FDP.TYPE_STRING),
        "id": (3, FDP.TYPE_STRING),
        "parameters": (4, FDP.TYPE_MESSAGE),
        "inputs": (5, FDP.TYPE_MESSAGE),
        "outputs": (6, FDP.TYPE_MESSAGE),
        "raw_input_contents": (7, FDP.TYPE_BYTES),
    }
    triton_response = {
        "model_name": (1, FDP.TYPE_STRING),
        "model_version": (2, FDP.TYPE_STRING),
        "id": (3, FDP.TYPE_STRING),
        "parameters": (4, FDP.TYPE_MESSAGE),
        "outputs": (5, FDP.TYPE_MESSAGE),
        "raw_output_contents": (6, FDP.TYPE_BYTES),
    }
    for ours, theirs in (
        ("aimass.routing.v1.PredictRequest", triton_request),
        ("aimass.routing.v1.PredictResponse", triton_response),
    ):
        by_number = {f.number: f.type for f in api.messages[ours].field}
        for name, (number, kind) in theirs.items():
            assert by_number.get(number) == kind, f"{ours} field {number} ({name})"


# --------------------------------------------------------------------------------------------
# The checks can fail: remove one annotation from a copy of the real files and the matching
# check reports it.


def _mutated(
    files: list[descriptor_pb2.FileDescriptorProto], proto_name: str
) -> tuple[list[descriptor_pb2.FileDescriptorProto], descriptor_pb2.FileDescriptorProto]:
    copies = []
    for file in files:
        copy = descriptor_pb2.FileDescriptorProto()
        copy.CopyFrom(file)
        copies.append(copy)
    target = next(f for f in copies if f.name == proto_name)
    return copies, target


def _method(file: descriptor_pb2.FileDescriptorProto, name: str):
    return next(m for s in file.service for m in s.method if m.name == name)


def _message(file: descriptor_pb2.FileDescriptorProto, name: str):
    return next(m for m in file.message_type if m.name == name)


def test_missing_http_rule_is_caught(files) -> None:
    copies, data = _mutated(files, "aimass/data/v1/data.proto")
    _method(data, "ReadSplit").options.ClearExtension(annotations_pb2.http)
    assert check_http_rules(Api(copies)) == [
        "aimass.data.v1.DataService.ReadSplit: no google.api.http annotation"
    ]


def test_path_variable_that_is_not_a_field_is_caught(files) -> None:
    copies, routing = _mutated(files, "aimass/routing/v1/routing.proto")
    rule = _method(routing, "Predict").options.Extensions[annotations_pb2.http]
    rule.post = "/v1/{deployment_name=deployments/*}:predict"
    problems = check_http_rules(Api(copies))
    assert len(problems) == 1
    assert "'deployment_name' is not a field" in problems[0]


def test_missing_resource_annotation_is_caught(files) -> None:
    copies, compression = _mutated(files, "aimass/compression/v1/compression.proto")
    _message(compression, "CompressionPolicy").options.ClearExtension(resource_pb2.resource)
    problems = check_resources_annotated(Api(copies))
    assert len(problems) == 1
    assert problems[0].startswith("aimass.compression.v1.CompressionPolicy")
    # The references to its type now dangle too.
    assert any("aimass.io/CompressionPolicy" in p for p in check_resource_references(Api(copies)))


def test_missing_identifier_is_caught(files) -> None:
    copies, training = _mutated(files, "aimass/training/v1/training.proto")
    name = next(f for f in _message(training, "Worker").field if f.name == "name")
    name.options.ClearExtension(field_behavior_pb2.field_behavior)
    assert check_resources_annotated(Api(copies)) == [
        "aimass.training.v1.Worker (listed by aimass.training.v1.TrainingService.ListWorkers): "
        "`name` is not marked IDENTIFIER"
    ]


def test_missing_pagination_field_is_caught(files) -> None:
    copies, evaluation = _mutated(files, "aimass/evaluation/v1/evaluation.proto")
    response = _message(evaluation, "ListBenchmarksResponse")
    del response.field[1]  # next_page_token
    assert check_list_pagination(Api(copies)) == [
        "aimass.evaluation.v1.EvaluationService.ListBenchmarks: response has no next_page_token"
    ]


def test_unary_watch_is_caught(files) -> None:
    copies, training = _mutated(files, "aimass/training/v1/training.proto")
    _method(training, "WatchTrainingJob").server_streaming = False
    assert check_watch_streaming(Api(copies)) == [
        "aimass.training.v1.TrainingService.WatchTrainingJob: "
        "Watch methods must be server-streaming only"
    ]


def test_missing_service_is_caught(files) -> None:
    copies, routing = _mutated(files, "aimass/routing/v1/routing.proto")
    del routing.service[1]  # PredictionService
    assert check_services_exist(Api(copies)) == [
        "service aimass.routing.v1.PredictionService is missing"
    ]


def test_duplicate_route_and_mismatched_get_path_are_caught(files) -> None:
    copies, data = _mutated(files, "aimass/data/v1/data.proto")
    rule = _method(data, "GetDatasetVersion").options.Extensions[annotations_pb2.http]
    rule.get = "/v1/{name=datasets/*}"
    api = Api(copies)
    assert check_http_routes_unique(api) == [
        "aimass.data.v1.DataService.GetDatasetVersion and aimass.data.v1.DataService.GetDataset "
        "both map to GET /v1/{datasets/*}"
    ]
    assert len(check_get_paths_match_patterns(api)) == 1
