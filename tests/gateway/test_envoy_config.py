"""gateway/envoy.yaml against the protos, as far as can be checked without Envoy: it parses,
its shape is Envoy's bootstrap, every route's cluster exists, every annotated service of the
descriptor set (built from protos/ with protoc) is transcoded and routed, limits and health
checks are set."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.api import annotations_pb2

from aimass.gateway.descriptors import Descriptors, build_descriptor_set

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / "gateway" / "envoy.yaml"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network"
    ".http_connection_manager.v3.HttpConnectionManager"
)
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(ENVOY.read_text())


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory) -> Descriptors:
    out = tmp_path_factory.mktemp("descriptors") / "aimass.pb"
    return Descriptors(build_descriptor_set(ROOT / "protos", out))


def _manager(config: dict) -> dict:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["typed_config"]["@type"] == HCM
    return network_filter["typed_config"]


def _http_filter(config: dict, name: str) -> dict:
    found = [f for f in _manager(config)["http_filters"] if f["name"] == name]
    assert len(found) == 1, name
    return found[0]["typed_config"]


def _routes(config: dict) -> list[dict]:
    (host,) = _manager(config)["route_config"]["virtual_hosts"]
    return host["routes"]


def _annotated_services(descriptors: Descriptors) -> set[str]:
    return {
        service.full_name
        for service in descriptors.services()
        if any(m.GetOptions().HasExtension(annotations_pb2.http) for m in service.methods)
    }


def test_the_bootstrap_has_envoys_shape(config):
    assert set(config) <= {"admin", "static_resources", "node", "layered_runtime"}
    assert set(config["static_resources"]) == {"listeners", "clusters"}
    filters = [f["name"] for f in _manager(config)["http_filters"]]
    assert filters[-1] == "envoy.filters.http.router", "the router must be the last filter"
    for typed in [_manager(config), *(f["typed_config"] for f in _manager(config)["http_filters"])]:
        assert typed["@type"].startswith("type.googleapis.com/envoy.extensions.")


def test_every_route_points_at_a_defined_cluster(config):
    clusters = {c["name"] for c in config["static_resources"]["clusters"]}
    routed = {route["route"]["cluster"] for route in _routes(config)}
    assert routed <= clusters
    assert clusters <= routed, "a cluster no route uses"


def test_every_annotated_service_is_transcoded_and_routed(config, descriptors):
    annotated = _annotated_services(descriptors)
    assert {"aimass.registry.v1.RegistryService", "aimass.access.v1.AccessService"} <= annotated
    transcoder = _http_filter(config, TRANSCODER)
    assert set(transcoder["services"]) == annotated
    prefixes = {route["match"]["prefix"] for route in _routes(config)}
    assert prefixes == {f"/{name}/" for name in annotated}
    assert transcoder["proto_descriptor"].endswith(".pb")
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["request_validation_options"]["reject_unknown_query_parameters"] is True


def test_clusters_speak_http2_with_health_checks_and_limits(config):
    for cluster in config["static_resources"]["clusters"]:
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert "http2_protocol_options" in options["explicit_http_config"], cluster["name"]
        (check,) = cluster["health_checks"]
        assert "grpc_health_check" in check
        assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] > 0
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"]["port_value"] > 0


def test_request_limits_and_path_escapes(config):
    manager = _manager(config)
    assert manager["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert manager["normalize_path"] is True
    buffer = _http_filter(config, "envoy.filters.http.buffer")
    assert buffer["max_request_bytes"] > 0
