"""Measure 2 evidence day by day, through the whole path: a node's access log with a scripted loop → the agent's
resolution connector → signed report → verifier → /v1/applicants/{id}/resolution-days flags it, count unchanged."""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.cli import main as agent_main
from agent.config import AgentConfig, load_config
from agent.enroll import enroll
from agent.outbox import OutboxItem
from agent.runtime import Agent
from simulator.resolution_node import ResolutionNode
from tests.test_verifier_api import Harness, running_verifier

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 11, 18)


def enrolled_node_agent(v: Harness, tmp_path: Path, connector_toml: str) -> AgentConfig:
    """An agent initialised with ``tianping-agent init``, given ``connector_toml`` and enrolled for node-1."""
    token = v.client.post("/v1/admin/tokens", json={"applicant_id": "node-1"}, headers=v.admin).json()["token"]
    cfg = tmp_path / "agent" / "agent.toml"
    assert agent_main(["init", "--config", str(cfg), "--verifier", v.base_url]) == 0
    cfg.write_text(cfg.read_text(encoding="utf-8") + connector_toml, encoding="utf-8")
    config = load_config(cfg)
    enroll(key_path=config.key_path, enrollment_path=config.enrollment_path, verifier_url=v.base_url,
           token=token, agent_name="node-agent")
    return config


async def report_one_day(config: AgentConfig, start: datetime) -> OutboxItem | None:
    """One round over the day from ``start``, its report signed and delivered; the report's outbox item."""
    async with Agent(config) as agent:
        agent.period_start = start
        await agent.collect_round(now=start + timedelta(hours=23))
        item = agent.close_period(end=start + timedelta(days=1))
        assert (await agent.deliver()).remaining == 0
    return item


async def test_a_flat_scripted_loop_is_flagged_beside_an_unchanged_count(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    node = ResolutionNode(tmp_path / "node", seed=23)
    start = datetime.combine(DAY, time(0), tzinfo=SHANGHAI)
    node.write_day(DAY, 3000)
    node.write_loop(40_000, start=start, spacing_s=86_400 / 40_000, clients=3, handles=20)
    truth = node.ground_truth().days[DAY.isoformat()]
    with running_verifier(tmp_path / "verifier") as v:
        v.clock.now = start + timedelta(days=2)
        config = enrolled_node_agent(v, tmp_path, f'\n[[connectors.resolution]]\npath = "{node.path}"\n'
                                                  f'checkpoint_path = "{tmp_path / "ckpt.json"}"\n')
        await report_one_day(config, start)
        got = v.client.get("/v1/applicants/node-1/resolution-days", params={"year": 2026}, headers=v.admin).json()
        verdict = v.client.get("/v1/applicants/node-1/eligibility", params={"year": 2026}, headers=v.admin).json()
        from verifier.cli import main as verifier_main

        check = ["--db", v.db_url, "check", "--year", "2026", "--applicant", "node-1", "--rules", str(v.rules_path)]
        capsys.readouterr()
        assert verifier_main([*check, "--json"]) == 0
        cli_json = json.loads(capsys.readouterr().out)
        assert verifier_main([*check, "--lang", "en"]) == 0
        cli_text = capsys.readouterr().out
    (day,) = [d for d in got["days"] if d["day"] == DAY.isoformat()]
    assert day["resolutions_ok"] == truth.resolutions_ok  # the loop is counted: flags never change a count
    assert verdict["beside"]["successful_resolutions"] == truth.resolutions_ok
    assert "flat_loop" in {f["code"] for f in day["flags"]}
    assert "samples_not_due" not in {f["code"] for f in day["flags"]}  # sampled under the salt it was issued
    assert verdict["flags_beside"]["days_flagged"] == got["days_flagged"]  # beside the verdict, never in it
    assert cli_json["flags_beside"] == verdict["flags_beside"]  # tianping-verifier check shows the same
    assert "Anomaly flags" in cli_text and "flat_loop=1" in cli_text
    (beside,) = [d for d in verdict["flags_beside"]["flagged_days"] if d["day"] == DAY.isoformat()]
    assert beside["agent_id"] == day["agent_id"] and "flat_loop" in beside["flags"]
    assert got["days_flagged"].get("flat_loop") == 1
    assert 0 < day["distinct_clients_estimate"] < 5000


async def test_a_node_that_samples_under_a_salt_of_its_own_is_flagged(tmp_path: Path) -> None:
    """Attack: the operator swaps the sampling salt the verifier issued (in the agent's enrollment file) for one of
    its own, so that it knows in advance which lines are sampled. Every sample is then not due under the issued
    salt, which the verifier recomputes: flagged, count unchanged."""
    import base64
    import json
    import os

    node = ResolutionNode(tmp_path / "node", seed=29)
    start = datetime.combine(DAY, time(0), tzinfo=SHANGHAI)
    node.write_day(DAY, 20_000)
    truth = node.ground_truth().days[DAY.isoformat()]
    with running_verifier(tmp_path / "verifier") as v:
        v.clock.now = start + timedelta(days=2)
        config = enrolled_node_agent(v, tmp_path, f'\n[[connectors.resolution]]\npath = "{node.path}"\n'
                                                  f'checkpoint_path = "{tmp_path / "ckpt.json"}"\n'
                                                  "resolution_sample_log2 = 8\n")  # ~80 samples: never none
        record = json.loads(config.enrollment_path.read_text(encoding="utf-8"))
        issued = base64.b64decode(record["resolution_salt"])
        record["resolution_salt"] = base64.b64encode(os.urandom(32)).decode()
        config.enrollment_path.write_text(json.dumps(record), encoding="utf-8")
        await report_one_day(config, start)
        got = v.client.get("/v1/applicants/node-1/resolution-days", params={"year": 2026}, headers=v.admin).json()
        # the days are kept in node_day_cache and reused while their entries stay the same ...
        from sqlalchemy import update

        from verifier.db import node_day_cache

        with v.engine.begin() as conn:
            conn.execute(update(node_day_cache).where(node_day_cache.c.day == DAY)
                         .values(body=json.dumps({**got["days"][0], "resolutions_ok": -1})))
        again = v.client.get("/v1/applicants/node-1/resolution-days", params={"year": 2026}, headers=v.admin).json()
        assert [d["resolutions_ok"] for d in again["days"] if d["day"] == DAY.isoformat()] == [-1]
        # ... and recomputed from the ledger once they change
        with v.engine.begin() as conn:
            conn.execute(update(node_day_cache).where(node_day_cache.c.day == DAY).values(last_index=-1))
        again = v.client.get("/v1/applicants/node-1/resolution-days", params={"year": 2026}, headers=v.admin).json()
        assert again == got
        # beside the verdict: the officials' report (JSON here; the same rows in PDF, XLSX, CSV and the console)
        report = v.client.get("/v1/applicants/node-1/reports/2026.json", headers=v.admin)
        assert report.status_code == 200, report.text
        (row,) = [a for a in report.json()["anomalies"] if a["flag"] == "samples_not_due"]
        assert row["count"] == 1 and DAY.isoformat() in row["detail"]["en"] and "节点自选样本" in row["detail"]["zh"]
    (day,) = [d for d in got["days"] if d["day"] == DAY.isoformat()]
    assert day["resolutions_ok"] == truth.resolutions_ok
    (flag,) = [f for f in day["flags"] if f["code"] == "samples_not_due"]
    assert flag["value"] > 0 and "not due under the salt the verifier issued" in flag["message"]
    from verifier.node_evidence import salt_digest

    assert salt_digest(issued) in flag["message"]
