"""HTTP routes from the google.api.http rules: path templates compiled to regexes.

A template such as ``/v1/{name=models/*/versions/*}:logMetrics`` becomes a
regex whose named groups are the bound fields; ``*`` matches one segment,
``**`` any number, ``{field}`` means ``{field=*}``. A segment never matches
'/', '.' or '..', so a path variable cannot leave its resource; the app also
refuses raw paths with encoded slashes before matching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor

_VERBS = ("get", "put", "post", "delete", "patch")
_SEGMENT = r"(?!\.\.?(?:/|$|:))[^/:]+"
_ANY_SEGMENTS = rf"{_SEGMENT}(?:/{_SEGMENT})*"
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str
    template: str
    body: str
    response_body: str
    # "/aimass.registry.v1.RegistryService/GetModelVersion".
    grpc_method: str
    service: descriptor.ServiceDescriptor
    method: descriptor.MethodDescriptor
    regex: re.Pattern[str]
    # Regex group name -> field path ("registered_model.name").
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def package(self) -> str:
        """The proto package's short name: "registry" for aimass.registry.v1."""
        return self.service.full_name.split(".")[1]

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)


def _pattern_regex(pattern: str) -> str:
    parts = []
    for segment in pattern.split("/"):
        if segment == "**":
            parts.append(_ANY_SEGMENTS)
        elif segment == "*":
            parts.append(_SEGMENT)
        else:
            parts.append(re.escape(segment))
    return "/".join(parts)


def compile_template(template: str) -> tuple[re.Pattern[str], dict[str, str]]:
    """(regex matching the whole path, group name -> field path)."""
    path, verb = template, ""
    last_slash = template.rfind("/")
    colon = template.find(":", last_slash)
    if colon > 0 and "}" not in template[colon:]:
        path, verb = template[:colon], template[colon:]
    regex, variables, position = ["^"], {}, 0
    for index, match in enumerate(_VARIABLE.finditer(path)):
        regex.append(_pattern_regex(path[position : match.start()]))
        group = f"v{index}"
        variables[group] = match.group(1)
        regex.append(f"(?P<{group}>{_pattern_regex(match.group(2) or '*')})")
        position = match.end()
    regex.append(_pattern_regex(path[position:]))
    regex.append(re.escape(verb) + "$")
    return re.compile("".join(regex)), variables


def _second_segment(template: str) -> str | None:
    """The template's second segment when it is a literal ("models" of
    /v1/{name=models/*}, "models:search" of /v1/models:search), else None."""
    expanded = _VARIABLE.sub(lambda m: m.group(2) or "*", template)
    parts = expanded.split("/")
    if len(parts) < 3 or "*" in parts[2]:
        return None
    return parts[2]


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def routes_of(services: list[descriptor.ServiceDescriptor]) -> list[Route]:
    """Every binding of every annotated method of ``services``."""
    found = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            for rule in _bindings(options.Extensions[annotations_pb2.http]):
                verb = rule.WhichOneof("pattern")
                if verb not in _VERBS:
                    continue
                template = getattr(rule, verb)
                regex, variables = compile_template(template)
                found.append(
                    Route(
                        http_method=verb.upper(),
                        template=template,
                        body=rule.body,
                        response_body=rule.response_body,
                        grpc_method=f"/{service.full_name}/{method.name}",
                        service=service,
                        method=method,
                        regex=regex,
                        variables=variables,
                    )
                )
    return found


class Router:
    """Finds the route of (HTTP method, path); literal-heavy templates are tried first."""

    def __init__(self, routes: list[Route]) -> None:
        # More literal characters first, so /v1/models:search beats /v1/{name=models/*}.
        self.routes = sorted(routes, key=lambda r: -len(_VARIABLE.sub("", r.template)))
        # (HTTP method, second path segment) -> the routes that can match, in the order
        # above: a route whose second segment is a literal ("models" of /v1/models/*)
        # only in its own bucket, a route with a variable there in every bucket. Saves
        # trying each of the ~100 regexes per request.
        literals = {(r.http_method, _second_segment(r.template)) for r in self.routes}
        self._candidates: dict[tuple[str, str | None], list[Route]] = {
            (method, segment): [
                r
                for r in self.routes
                if r.http_method == method and _second_segment(r.template) in (segment, None)
            ]
            for method, segment in literals | {(r.http_method, None) for r in self.routes}
        }

    def match(self, http_method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The route and its bound fields, or None."""
        parts = path.split("/", 3)
        segment = parts[2] if len(parts) > 2 else ""
        candidates = self._candidates.get((http_method, segment))
        if candidates is None:
            candidates = self._candidates.get((http_method, None), [])
        for route in candidates:
            found = route.regex.match(path)
            if found:
                return route, {route.variables[g]: v for g, v in found.groupdict().items()}
        return None

    def allowed_methods(self, path: str) -> list[str]:
        """HTTP methods some route accepts on this path (for 405)."""
        return sorted({r.http_method for r in self.routes if r.regex.match(path)})
