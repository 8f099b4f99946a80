"""deploy/kubernetes: every manifest valid against the Kubernetes schemas (offline,
kubernetes-validate's bundled ones), and its names, ports, probes, labels,
ConfigMap and Secret keys line up."""

from __future__ import annotations

import importlib.util
from collections import Counter
from typing import Any

import kubernetes_validate
import pytest
import yaml

from aimass.core.settings import SERVICE_NAMES, Ports, load_settings
from tests.deploy.deploy_files import (
    AIMASS_MODULES,
    KUBERNETES,
    WORKER_MODULE,
    load_kubernetes,
    pod_spec,
    python_module,
)

# The oldest Kubernetes these manifests claim (grpc probes are GA since 1.27).
KUBERNETES_VERSION = "1.30.0"
PORTS = Ports()
DOCS = load_kubernetes()


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if pod_spec(doc) is not None]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.mark.parametrize(
    ("file", "doc"), DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS]
)
def test_manifest_matches_the_kubernetes_schema(file, doc):
    # strict: unknown fields fail too, as `kubectl apply --validate=strict` would.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_once():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert Counter(kustomization["resources"]) == Counter(sorted(files))
    assert kustomization["namespace"] == by_kind("Namespace").popitem()[0]


def test_names_are_unique_per_kind():
    names = Counter((doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS)
    assert [key for key, count in names.items() if count > 1] == []


def test_selectors_match_their_pod_labels():
    for doc in workloads():
        if doc["kind"] == "Job":
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        for key, value in doc["spec"]["selector"]["matchLabels"].items():
            assert labels.get(key) == value, doc["metadata"]["name"]


def _pods_selected_by(selector: dict[str, str]) -> list[dict[str, Any]]:
    return [
        doc
        for doc in workloads()
        if doc["kind"] != "Job"
        and all(
            doc["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()
        )
    ]


def _container_ports(doc: dict[str, Any]) -> set[Any]:
    ports: set[Any] = set()
    for container in containers(doc):
        for port in container.get("ports", []):
            ports.add(port["containerPort"])
            if "name" in port:
                ports.add(port["name"])
    return ports


def test_every_service_selects_pods_that_declare_its_target_ports():
    for name, service in by_kind("Service").items():
        selected = _pods_selected_by(service["spec"]["selector"])
        assert selected, f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in selected:
                assert target in _container_ports(pod), f"Service {name}: no port {target}"


def test_every_probe_points_to_a_declared_container_port():
    for doc in workloads():
        for container in containers(doc):
            declared = {p["containerPort"] for p in container.get("ports", [])} | {
                p.get("name") for p in container.get("ports", [])
            }
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None or "exec" in probe:
                    continue
                handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
                assert handler["port"] in declared, f"{doc['metadata']['name']} {kind}"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_aimass_service_probes_its_grpc_health_on_the_settings_port(name):
    deployment = by_kind("Deployment")[name]
    (container,) = containers(deployment)
    assert python_module(container["command"]) == AIMASS_MODULES[name]
    port = PORTS.of(name)
    assert {"name": "grpc", "containerPort": port} in container["ports"]
    assert {"name": "metrics", "containerPort": PORTS.metrics} in container["ports"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["grpc"] == {"port": port}, kind
    service_ports = {p["name"]: p for p in by_kind("Service")[name]["spec"]["ports"]}
    assert (service_ports["grpc"]["port"], service_ports["grpc"]["targetPort"]) == (port, "grpc")


def test_every_python_module_named_exists():
    modules = {
        python_module(container.get("command", []))
        for doc in workloads()
        for container in containers(doc)
    } - {None}
    assert modules >= {*AIMASS_MODULES.values(), WORKER_MODULE, "aimass.core.db.migrate"}
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"the manifests run modules that do not exist: {missing}"


def _refs(doc: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(kind, name, key) of every ConfigMap, Secret and PVC a workload uses."""
    refs: list[tuple[str, str, str | None]] = []
    spec = pod_spec(doc)
    for container in containers(doc):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                refs.append(("ConfigMap", source["configMapRef"]["name"], None))
            if "secretRef" in source:
                refs.append(("Secret", source["secretRef"]["name"], None))
        for env in container.get("env", []):
            value_from = env.get("valueFrom", {})
            if "configMapKeyRef" in value_from:
                ref = value_from["configMapKeyRef"]
                refs.append(("ConfigMap", ref["name"], ref["key"]))
            if "secretKeyRef" in value_from:
                ref = value_from["secretKeyRef"]
                refs.append(("Secret", ref["name"], ref["key"]))
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            items = volume["configMap"].get("items") or [{"key": None}]
            refs += [("ConfigMap", volume["configMap"]["name"], i["key"]) for i in items]
        if "persistentVolumeClaim" in volume:
            refs.append(
                ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None)
            )
    return refs


def test_referenced_configmaps_secrets_claims_and_keys_exist():
    for doc in workloads():
        for kind, name, key in _refs(doc):
            objects = by_kind(kind)
            assert name in objects, f"{doc['metadata']['name']} uses missing {kind} {name}"
            if key is not None:
                data = {**objects[name].get("data", {}), **objects[name].get("stringData", {})}
                assert key in data, f"{doc['metadata']['name']}: {kind} {name} has no key {key}"


def _aimass_environment(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(by_kind("ConfigMap")[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            env[item["name"]] = by_kind("Secret")[ref["name"]]["stringData"][ref["key"]]
        elif "value" in item:
            env[item["name"]] = item["value"]
    return {k: v for k, v in env.items() if k.startswith("AIMASS_")}


def test_every_aimass_variable_is_a_valid_setting(monkeypatch):
    checked = 0
    for doc in workloads():
        for container in containers(doc):
            env = _aimass_environment(container)
            if not env:
                continue
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            settings = load_settings()
            checked += 1
            assert len(settings.nats_url.split(",")) == 3
            for key in env:
                monkeypatch.delenv(key)
    assert checked >= len(SERVICE_NAMES) + 3


def test_services_reach_each_other_through_their_kubernetes_services(monkeypatch):
    for key, value in by_kind("ConfigMap")["aimass-config"]["data"].items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    services = by_kind("Service")
    for name in [*SERVICE_NAMES, "gateway"]:
        host, port = settings.service_address(name).rsplit(":", 1)
        assert host in services, f"{name}: no Service {host}"
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, name


def test_nats_is_a_jetstream_cluster_of_three_with_routes_to_each_member():
    nats = by_kind("StatefulSet")["nats"]
    replicas = nats["spec"]["replicas"]
    assert replicas == 3
    headless = by_kind("Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    config = by_kind("ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "jetstream" in config
    for index in range(replicas):
        assert f"nats://nats-{index}.{headless['metadata']['name']}:6222" in config
    urls = by_kind("ConfigMap")["aimass-config"]["data"]["AIMASS_NATS_URL"].split(",")
    assert urls == [f"nats://nats-{i}.nats-headless:4222" for i in range(replicas)]


def test_triton_is_a_statefulset_with_a_gpu_and_the_shared_model_repository():
    triton = by_kind("StatefulSet")["triton"]
    (container,) = containers(triton)
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "--model-control-mode=explicit" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    claim = by_kind("PersistentVolumeClaim")["model-repository"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (routing,) = containers(by_kind("Deployment")["routing"])
    assert {"name": "model-repository", "mountPath": "/models"} in routing["volumeMounts"]
    (register,) = containers(by_kind("Job")["register-triton"])
    assert (
        f"--grpc-address=triton-{{i}}.{triton['spec']['serviceName']}:8001" in register["command"]
    )


def test_training_workers_are_a_scalable_deployment_that_starts_after_migrations():
    worker = by_kind("Deployment")["training-worker"]
    (container,) = containers(worker)
    assert python_module(container["command"]) == WORKER_MODULE
    assert worker["spec"]["replicas"] >= 2
    (migrate,) = containers(by_kind("Job")["aimass-migrate"])
    assert migrate["command"] == ["python", "-m", "aimass.core.db.migrate", "upgrade"]
