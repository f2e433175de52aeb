"""The deployment files, validated as far as this machine allows (no container engine, no cluster, no systemd as
PID 1): the compose file, Dockerfiles, proxy configuration, Kubernetes manifests, Grafana provisioning, the
agent's compose configuration and the systemd unit (``systemd-analyze verify``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import parse_config
from agent.runtime import build_connectors

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return docs


def test_compose_has_every_service_and_two_verifiers_on_postgres() -> None:
    services = compose()["services"]
    assert {"mosquitto", "influxdb", "grafana", "postgres", "verifier-1", "verifier-2", "proxy", "agent",
            "plant", "verifier-init"} <= set(services)
    for name in ("verifier-1", "verifier-2", "verifier-init"):
        env = services[name]["environment"]
        assert env["TIANPING_DB"].startswith("postgresql+psycopg://") and "@postgres:5432/" in env["TIANPING_DB"]
        assert services[name]["build"]["dockerfile"] == "deploy/docker/verifier.Dockerfile"
    assert services["verifier-1"]["depends_on"]["verifier-init"]["condition"] == "service_completed_successfully"
    assert services["agent"]["network_mode"] == "service:plant"
    assert services["agent"]["environment"]["SSL_CERT_FILE"] == "/etc/tianping/tls/ca.pem"
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.startswith("./tls/out"):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
        if "build" in svc:
            assert (ROOT / svc["build"]["dockerfile"]).exists()
        assert "image" in svc, f"{name}: expected an image name"


def test_proxy_balances_both_verifier_replicas_over_tls() -> None:
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text(encoding="utf-8")
    upstream = re.search(r"upstream verifier \{(.*?)\}", conf, re.S)
    assert upstream is not None
    servers = re.findall(r"server ([\w-]+):8700", upstream.group(1))
    assert servers == ["verifier-1", "verifier-2"] and set(servers) <= set(compose()["services"])
    assert "listen 8443 ssl;" in conf and "ssl_certificate_key /etc/nginx/tls/server.key;" in conf
    assert conf.count("{") == conf.count("}")


def test_docker_compose_config_when_the_client_can() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        timeout=20).returncode != 0:
        pytest.skip("the docker client here has no compose plugin (`docker compose` is unavailable)")
    env = {"POSTGRES_PASSWORD": "x", "TIANPING_ADMIN_TOKEN": "x" * 16, "INFLUX_TOKEN": "x", "GRAFANA_PASSWORD": "x"}
    done = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["verifier", "agent", "simulator"])
def test_dockerfiles_copy_files_that_exist_and_install_known_extras(name: str) -> None:
    text = (DEPLOY / "docker" / f"{name}.Dockerfile").read_text(encoding="utf-8")
    assert text.startswith("#") and "\nFROM python:3.11" in text and "\nUSER " in text
    copies = re.findall(r"^COPY (\S+) ", text, re.M)
    assert copies
    for source in copies:
        assert (ROOT / source).exists(), f"{name}.Dockerfile copies {source}, which does not exist"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for extra in re.findall(r"pip install '\.\[(\w+)\]'", text):
        assert extra in project["optional-dependencies"]
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry[0] in project["scripts"]


def test_kubernetes_manifests_are_consistent() -> None:
    docs = manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Namespace", "tianping"), ("Deployment", "verifier"), ("Service", "verifier"),
            ("StatefulSet", "postgres"), ("Service", "postgres"), ("Secret", "tianping-secrets"),
            ("Ingress", "verifier")} <= kinds
    secret = next(d for d in docs if d["kind"] == "Secret")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for d in docs:
        assert isinstance(d["apiVersion"], str) and d["apiVersion"]
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "tianping", d["metadata"]["name"]
        if d["kind"] in ("Deployment", "StatefulSet"):
            template = d["spec"]["template"]
            labels = template["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
            containers = template["spec"]["containers"] + template["spec"].get("initContainers", [])
            for c in containers:
                assert c["image"] and ":" in c["image"]
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == "tianping-secrets" and ref["key"] in secret["stringData"], ref
            port_names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            service = services[d["metadata"]["name"]]
            assert service["spec"]["selector"].items() <= labels.items()
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["template"]["spec"]["initContainers"][0]["args"] == ["init"]
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    assert backend in services and ingress["spec"]["tls"]
    images = {s.get("image") for s in compose()["services"].values()}
    assert "tianping/verifier:0.1.0" in images


def test_grafana_provisions_the_influx_source_and_a_dashboard_of_the_written_fields() -> None:
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/influxdb.yaml").read_text(encoding="utf-8"))
    ds = source["datasources"][0]
    assert ds["type"] == "influxdb" and ds["jsonData"]["version"] == "Flux" and ds["uid"] == "tianping-influx"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tianping.yaml").read_text(encoding="utf-8"))
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/tianping.json").read_text(encoding="utf-8"))
    writer = (ROOT / "verifier" / "influx.py").read_text(encoding="utf-8")
    fields = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "tianping-influx"
        query = panel["targets"][0]["query"]
        assert 'r._measurement == "tianping_daily"' in query
        fields.update(re.findall(r'r\._field == "(\w+)"', query))
    assert fields == {"active_devices", "served_enterprises", "resolutions_ok", "registrations"}
    assert all(f'"{f}"' in writer for f in fields)
    thresholds = {p["id"]: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]]
                  for p in dashboard["panels"]}
    assert thresholds[1] == [5000, 10000] and thresholds[2] == [150, 300] and thresholds[3] == [5000000]


def test_the_compose_agent_configuration_is_accepted_by_the_agent() -> None:
    path = DEPLOY / "agent" / "agent.toml"
    config = parse_config(path.read_text(encoding="utf-8"), path=path)
    assert config.agent.metrics_port == 9464 and config.agent.verifier_url.startswith("https://")
    assert {c.kind for c in build_connectors(config)} == {"opcua", "mqtt"}


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = (DEPLOY / "systemd" / "tianping-agent.service").read_text(encoding="utf-8")
    exe = "/opt/tianping/venv/bin/tianping-agent"
    assert f"ExecStart={exe} run --config /etc/tianping/agent.toml" in unit
    stub = tmp_path / "tianping-agent"  # the venv of the install guide does not exist here: a stand-in executable
    stub.write_text("#!/bin/sh\n", encoding="utf-8")
    stub.chmod(0o755)
    copy = tmp_path / "tianping-agent.service"
    copy.write_text(unit.replace(exe, str(stub)), encoding="utf-8")
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    if "Failed to connect to bus" in done.stderr or "System has not been booted with systemd" in done.stderr:
        pytest.skip(f"systemd-analyze cannot run in this container: {done.stderr.strip()[:200]}")
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(copy.read_text(encoding="utf-8").replace("Restart=", "Restrat="), encoding="utf-8")
    warned = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'Restrat'" in warned.stderr  # the check can fail
