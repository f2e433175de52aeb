"""Facts to InfluxDB 2 over its real write protocol: a real VictoriaMetrics (Debian ``victoria-metrics``, which
accepts ``/api/v2/write``) on a free port with a temporary storage directory; the points are read back through
its export API. The writer never blocks ingestion and retries until the server is there."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine

from protocol.keys import generate_private_key, public_key_b64
from simulator.mosquitto import free_port
from tests.test_verifier_api import write_test_rules
from tests.test_verifier_core import DAY0, NOW, SH, AgentSim, Clock, bucket, device, uscc
from verifier.api import VerifierSettings, create_app, serve_in_thread
from verifier.db import init_db, make_engine
from verifier.enroll import add_applicant, add_enterprise, enroll_agent, issue_token
from verifier.influx import FactWriter, InfluxSettings

VM = shutil.which("victoria-metrics")
pytestmark = pytest.mark.skipif(VM is None, reason="Debian package victoria-metrics is not installed")


@dataclass
class VictoriaMetrics:
    url: str

    def flush(self) -> None:
        httpx.get(f"{self.url}/internal/force_flush", timeout=5).raise_for_status()

    def series(self, name: str) -> list[dict[str, Any]]:
        self.flush()
        r = httpx.get(f"{self.url}/api/v1/export", params={"match[]": f'{{__name__="{name}"}}'}, timeout=5)
        r.raise_for_status()
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]


@contextmanager
def victoria_metrics(tmp: Path, port: int) -> Iterator[VictoriaMetrics]:
    assert VM is not None
    proc = subprocess.Popen([VM, f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={tmp}",
                             "-retentionPeriod=100y", "-search.latencyOffset=0s", "-search.disableCache",
                             "-loggerLevel=ERROR"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).text.strip() == "OK":
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"victoria-metrics did not start: {proc.stderr.read() if proc.stderr else ''!r}")
            time.sleep(0.05)
        yield VictoriaMetrics(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def verifier_with_writer(tmp: Path, influx_url: str) -> Iterator[tuple[str, FactWriter, AgentSim, Engine]]:
    db_url = f"sqlite:///{tmp / 'influx.sqlite'}"
    engine = make_engine(db_url)
    init_db(engine)
    at = NOW - timedelta(days=10)
    add_applicant(engine, applicant_id="plat-1", name="示范平台", kind="platform", now=at)
    add_enterprise(engine, applicant_id="plat-1", uscc=uscc(1), name="企业1", now=at)
    key = generate_private_key()
    e = enroll_agent(engine, token=issue_token(engine, applicant_id="plat-1", now=at).token,
                     public_key_b64=public_key_b64(key.public_key()), agent_name="edge", now=at)
    app: FastAPI = create_app(VerifierSettings(db_url=db_url, rules_path=write_test_rules(tmp), clock=Clock(NOW)))
    writer = FactWriter(engine, InfluxSettings(url=influx_url, token="t", org="tianping", bucket="tianping",
                                               timeout_s=1, retry_base_s=0.1, retry_max_s=0.3))
    app.state.metrics.listeners.append(writer.notify)
    try:
        with serve_in_thread(app, port=free_port()) as base_url:
            yield base_url, writer, AgentSim(key=key, agent_id=e.agent_id), engine
    finally:
        writer.close()
        engine.dispose()


def _post(base_url: str, sim: AgentSim, **kwargs: Any) -> float:
    env = sim.next_envelope(**kwargs)
    started = time.monotonic()
    r = httpx.post(f"{base_url}/v1/reports", content=env, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 201, r.text
    sim.advance(env)
    return time.monotonic() - started


def _wait(predicate: Any, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _value_at(rows: list[dict[str, Any]], labels: dict[str, str], at: datetime) -> int | None:
    for row in rows:
        if all(row["metric"].get(k) == v for k, v in labels.items()):
            for ts, value in zip(row["timestamps"], row["values"], strict=True):
                if ts == int(at.timestamp() * 1000):
                    return int(value)
    return None


def test_ingested_facts_arrive_in_influx_protocol_and_read_back(tmp_path: Path) -> None:
    with victoria_metrics(tmp_path / "vm", free_port()) as vm, \
            verifier_with_writer(tmp_path, vm.url) as (base_url, writer, sim, _):
        devices = [device(f"d{i}", enterprise=uscc(1), start=DAY0, protocols=("opcua",) if i < 3 else ("modbus",))
                   for i in range(5)]
        _post(base_url, sim, devices=devices, buckets=[bucket(DAY0 + timedelta(minutes=5), count=42),
                                                       bucket(DAY0 + timedelta(minutes=6), op=100, count=7)])
        _post(base_url, sim, devices=devices[:2])
        _wait(lambda: writer.written_points >= 8, "two jobs' points written")
        active = vm.series("tianping_daily_active_devices")
        midnight = datetime(2025, 6, 1, tzinfo=SH)
        assert _value_at(active, {"applicant": "plat-1", "protocol": "all"}, midnight) == 5
        assert _value_at(active, {"applicant": "plat-1", "protocol": "opcua"}, midnight) == 3
        assert _value_at(active, {"applicant": "plat-1", "protocol": "modbus"}, midnight) == 2
        assert _value_at(vm.series("tianping_daily_served_enterprises"), {"protocol": "all"}, midnight) == 1
        assert _value_at(vm.series("tianping_daily_resolutions_ok"), {"protocol": "all"}, midnight) == 42
        assert _value_at(vm.series("tianping_daily_registrations"), {"protocol": "all"}, midnight) == 7
        assert writer.failed_writes == 0 and writer.dropped == 0


def test_a_down_server_never_blocks_ingestion_and_the_write_is_retried(tmp_path: Path) -> None:
    port = free_port()
    with verifier_with_writer(tmp_path, f"http://127.0.0.1:{port}") as (base_url, writer, sim, _):
        took = _post(base_url, sim, devices=[device("d0", enterprise=uscc(1), start=DAY0)])
        assert took < 2.0
        _wait(lambda: writer.failed_writes >= 2, "failed attempts against the absent server")
        with victoria_metrics(tmp_path / "vm", port) as vm:
            _wait(lambda: writer.written_points > 0, "the retried write")
            rows = vm.series("tianping_daily_active_devices")
            assert _value_at(rows, {"protocol": "all"}, datetime(2025, 6, 1, tzinfo=SH)) == 1


def test_settings_come_from_the_environment_and_are_checked() -> None:
    assert InfluxSettings.from_env({}) is None
    s = InfluxSettings.from_env({"TIANPING_INFLUX_URL": "http://influx:8086", "TIANPING_INFLUX_TOKEN": "tok"})
    assert s is not None and (s.org, s.bucket, s.token) == ("tianping", "tianping", "tok")
    with pytest.raises(ValueError, match="expected http:// or https://"):
        InfluxSettings(url="influx:8086", token="", org="o", bucket="b")
    with pytest.raises(ValueError, match="queue_max: expected 1 to 1,000,000"):
        InfluxSettings(url="http://x", token="", org="o", bucket="b", queue_max=0)
