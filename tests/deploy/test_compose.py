"""deploy/docker-compose.yml: valid for docker-compose, and its ports, settings,
health checks and dependencies agree with the code (aimass.core.settings)."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
import yaml

from aimass.core.settings import SERVICE_NAMES, Ports, load_settings
from tests.deploy.deploy_files import (
    AIMASS_MODULES,
    COMPOSE_FILE,
    DEPLOY,
    GPU_COMPOSE_FILE,
    PROMETHEUS,
    WORKER_MODULE,
    compose_command,
    compose_environment,
    load_compose,
    python_module,
    require_tool,
)

PORTS = Ports()
# Long-running services without a health check, and why. Every other one has one.
NO_HEALTHCHECK = {
    "training-worker": "no port: a crash restarts it, a hang loses its job to another worker",
    "nats-exporter": "scratch image without a shell; Prometheus' up{} watches it",
    "otel-collector": "scratch image without a shell; its health_check extension is on 13133",
    "jaeger": "image without a shell or HTTP client; only a trace UI",
}
ONE_SHOT = {"migrate", "create-bucket", "register-triton"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.mark.parametrize("files", [[COMPOSE_FILE], [COMPOSE_FILE, GPU_COMPOSE_FILE]])
def test_docker_compose_accepts_the_file(files):
    binary = require_tool("docker-compose", "apt-get install -y docker-compose")
    args = [binary]
    for path in files:
        args += ["-f", str(path)]
    result = subprocess.run(
        [*args, "config"], capture_output=True, text=True, timeout=60, cwd=DEPLOY
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == set(load_compose()["services"])
    assert resolved["services"]["training-worker"]["deploy"]["replicas"] >= 1


def test_every_aimass_service_runs_from_the_image(services):
    for name, module in AIMASS_MODULES.items():
        assert name in services, f"{name} is missing from the compose stack"
        assert python_module(compose_command(services[name])) == module, name
    assert python_module(compose_command(services["training-worker"])) == WORKER_MODULE


def test_every_python_module_named_exists(services):
    modules = {python_module(compose_command(s)) for s in services.values()} - {None}
    assert modules >= {*AIMASS_MODULES.values(), WORKER_MODULE}
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"compose runs modules that do not exist: {missing}"


def test_every_aimass_variable_is_a_valid_setting(services, monkeypatch):
    aimass_services = [s for s in services.values() if "AIMASS_HOST" in compose_environment(s)]
    assert len(aimass_services) >= len(SERVICE_NAMES) + 3  # + worker, migrate, register
    for service in aimass_services:
        env = compose_environment(service)
        for key, value in env.items():
            assert key.startswith("AIMASS_"), key
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.database_url.startswith("postgresql")
        assert settings.artifact_root.startswith("s3://")
        assert settings.s3.endpoint_url
        for key in env:
            monkeypatch.delenv(key)


def test_services_reach_each_other_by_compose_name_and_default_port(services, monkeypatch):
    for key, value in compose_environment(services["data"]).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    nats_host = settings.nats_url.removeprefix("nats://").split(":")[0]
    assert nats_host in services
    for name in SERVICE_NAMES:
        host, port = settings.service_address(name).rsplit(":", 1)
        assert host == name
        assert host in services
        assert int(port) == PORTS.of(name)
    assert settings.service_address("gateway") == f"envoy:{PORTS.gateway}"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_service_health_check_and_ports_match_the_settings(services, name):
    service = services[name]
    port = PORTS.of(name)
    assert service["healthcheck"]["test"] == ["CMD", "aimass-healthcheck", str(port)]
    assert set(service["expose"]) == {str(port), str(PORTS.metrics)}
    assert service["restart"] == "unless-stopped"


def test_every_long_running_service_has_a_health_check(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "on-failure", name
            continue
        assert service.get("restart") == "unless-stopped", name
        if name in NO_HEALTHCHECK:
            assert "healthcheck" not in service, f"{name} now has one: drop the exemption"
        else:
            assert service["healthcheck"]["test"][0] == "CMD", name


def test_dependencies_exist_and_wait_for_the_right_state(services):
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name}: {target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target in ONE_SHOT, f"{name}: {target} is not a one-shot service"


def test_aimass_processes_start_after_migrations(services):
    for name in [*SERVICE_NAMES, "training-worker"]:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["nats"]["condition"] == "service_healthy", name
    assert services["migrate"]["command"][:4] == [
        "python",
        "-m",
        "aimass.core.db.migrate",
        "upgrade",
    ]


def test_workers_scale(services):
    worker = services["training-worker"]
    assert "replicas" in worker["deploy"]
    assert "ports" not in worker, "published ports would stop a second replica"


def test_triton_shares_the_model_repository_with_routing(services):
    triton = services["triton"]
    assert triton["image"].startswith("${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:")
    assert "--model-control-mode=explicit" in triton["command"]
    assert "--model-repository=/models" in triton["command"]
    assert "model-repository:/models" in triton["volumes"]
    assert "model-repository:/models" in services["routing"]["volumes"]
    register = compose_command(services["register-triton"])
    assert "--grpc-address=triton:8001" in register
    assert f"--routing=routing:{PORTS.routing}" in register


def test_envoy_listens_on_the_gateway_port(services):
    envoy = services["envoy"]
    assert f"{PORTS.gateway}:{PORTS.gateway}" in envoy["ports"]
    assert "../gateway/envoy.yaml:/etc/envoy/envoy.yaml:ro" in envoy["volumes"]
    assert {*SERVICE_NAMES} <= set(envoy["depends_on"])


def test_named_volumes_are_declared_and_mounted_files_exist(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith((".", "/", "$")):
                if source.startswith("./") and "${" not in volume:
                    assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_prometheus_scrapes_every_service_on_its_metrics_port(services):
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    for name in SERVICE_NAMES:
        assert f"{name}:{PORTS.metrics}" in targets, name
    for target in targets:
        host = target.split(":")[0]
        assert host in services or host == "127.0.0.1", f"scrape target {target} is no service"
    worker_jobs = [j for j in config["scrape_configs"] if j["job_name"] == "aimass-training-worker"]
    assert worker_jobs[0]["dns_sd_configs"][0]["names"] == ["training-worker"]
    mounted = services["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounted
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
