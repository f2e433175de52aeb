"""Prometheus metrics of the verifier and of the agent, scraped over real HTTP; the values move with the work."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from agent.cli import main as agent_main
from agent.config import AgentConfig, load_config, parse_config
from agent.enroll import enroll
from agent.errors import AgentConfigError
from agent.metrics import AgentMetrics
from agent.runtime import Agent, utc_now
from simulator.mosquitto import free_port
from tests.test_verifier_api import write_test_rules
from verifier.api import VerifierSettings, create_app, serve_in_thread
from verifier.db import init_db, make_engine
from verifier.enroll import add_applicant, issue_token


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` → value of a Prometheus text exposition."""
    r = httpx.get(url, timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values: dict[str, float] = {}
    for line in r.text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+0-9.eE]+|NaN)$", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    return values


async def _agent_in_process(config: AgentConfig) -> None:
    """One round, one signed report, one delivery, with the agent's /metrics scraped in between."""
    async with Agent(config) as agent:
        metrics = AgentMetrics(agent, config.outbox_path)
        port = metrics.serve(0)
        agent_url = f"http://127.0.0.1:{port}/metrics"
        try:
            first = scrape(agent_url)
            assert first["tianping_agent_rounds_total"] == 0
            assert first["tianping_agent_reports_sent_total"] == 0
            assert first["tianping_agent_outbox_depth"] == 0

            await agent.collect_round()
            metrics.note_round()
            agent.connectors[0].count_error("log_unreadable")
            agent.close_period(end=utc_now() + timedelta(seconds=1))
            waiting = scrape(agent_url)
            assert waiting["tianping_agent_rounds_total"] == 1
            assert waiting["tianping_agent_reports_signed_total"] == 1
            assert waiting["tianping_agent_outbox_depth"] == 1
            errors = [k for k in waiting if k.startswith("tianping_agent_connector_errors_total{")]
            assert errors and 'code="log_unreadable"' in errors[0] and waiting[errors[0]] == 1

            result = await agent.deliver()
            assert result.delivered == 1
            sent = scrape(agent_url)
            assert sent["tianping_agent_reports_sent_total"] == 1
            assert sent["tianping_agent_outbox_depth"] == 0
        finally:
            metrics.close()


def test_verifier_and_agent_metrics_move_with_the_work(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'v.sqlite'}"
    engine = make_engine(db_url)
    init_db(engine)
    now = utc_now()
    add_applicant(engine, applicant_id="plat-1", name="示范平台", kind="platform", now=now - timedelta(days=1))
    token = issue_token(engine, applicant_id="plat-1", now=now).token
    app = create_app(VerifierSettings(db_url=db_url, rules_path=write_test_rules(tmp_path)))
    with serve_in_thread(app, port=free_port()) as base_url:
        before = scrape(f"{base_url}/metrics")
        assert before["tianping_verifier_ledger_entries"] == 0
        assert before.get('tianping_verifier_reports_total{result="accepted"}', 0) == 0

        log = tmp_path / "access.log"
        log.write_text("", encoding="utf-8")
        cfg = tmp_path / "agent" / "agent.toml"
        assert agent_main(["init", "--config", str(cfg), "--verifier", base_url]) == 0
        cfg.write_text(cfg.read_text(encoding="utf-8") + f'\n[[connectors.resolution]]\npath = "{log}"\n',
                       encoding="utf-8")
        config = load_config(cfg)
        enroll(key_path=config.key_path, enrollment_path=config.enrollment_path, verifier_url=base_url,
               token=token, agent_name="edge")
        asyncio.run(_agent_in_process(config))

        # the same agent under `tianping-agent run --metrics-port`: the endpoint is up while it runs
        port = free_port()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "tianping-agent"), "--log-level", "WARNING",
                                 "run", "--config", str(cfg), "--duration-s", "2.5", "--metrics-port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 15
            seen: dict[str, float] = {}
            while time.monotonic() < deadline and seen.get("tianping_agent_rounds_total", 0) < 1:
                try:
                    seen = scrape(f"http://127.0.0.1:{port}/metrics")
                except httpx.TransportError:
                    time.sleep(0.1)
            assert seen.get("tianping_agent_rounds_total", 0) >= 1
        finally:
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err

        bad = httpx.post(f"{base_url}/v1/reports", content=b'{"payload": "x"}',
                         headers={"Content-Type": "application/json"}, timeout=5)
        assert bad.status_code >= 400
        code = bad.json()["error"]["code"]
        after = scrape(f"{base_url}/metrics")
        assert after['tianping_verifier_reports_total{result="accepted"}'] >= 2  # in process, then `run`
        assert after['tianping_verifier_reports_total{result="refused"}'] == 1
        assert after[f'tianping_verifier_rejections_total{{code="{code}"}}'] == 1
        accepted = after['tianping_verifier_reports_total{result="accepted"}']
        assert after["tianping_verifier_ledger_entries"] == accepted
        assert after["tianping_verifier_ingest_seconds_count"] == accepted + 1
    engine.dispose()


def test_metrics_port_is_checked_in_the_configuration() -> None:
    base = '[agent]\nname = "a"\nverifier_url = "http://127.0.0.1:8700"\n'
    assert parse_config(base + "metrics_port = 9464\n", path=Path("/x/agent.toml")).agent.metrics_port == 9464
    assert parse_config(base, path=Path("/x/agent.toml")).agent.metrics_port is None
    with pytest.raises(AgentConfigError, match="metrics_port: expected an integer from 1 to 65535, got '9464'"):
        parse_config(base + 'metrics_port = "9464"\n', path=Path("/x/agent.toml"))
