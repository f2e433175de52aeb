"""The annual check: an APScheduler job with an injected clock, caught up after the verifier was down, idempotent
(exactly one signed evaluation per applicant and year), against a named snapshot, with a webhook told over real
HTTP; and on-demand evaluations."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from connectors.base import ConfigError
from protocol.uscc import check_character
from verifier.annual import (
    AnnualScheduler,
    AnnualSettings,
    count_evaluations,
    get_evaluation,
    on_demand,
    run_annual,
    signing_key,
    verify_evaluation,
)
from verifier.checkpoints import ensure_note_key
from verifier.db import device_days, init_db, make_engine, resolution_days
from verifier.enroll import add_applicant
from verifier.gates import record_gate
from verifier.rules import Policy, load_policy

SH = ZoneInfo("Asia/Shanghai")


def uscc(n: int) -> str:
    body = f"91330400MA{n:07d}"
    return body + check_character(body)


def load_facts(engine: Engine, *, platform: str, node: str, years: tuple[int, ...], devices: int) -> None:
    """Bulk-load device-days (every device active on the first 40 days and the last 5 of each year) and a node's
    daily totals."""
    rows: list[dict[str, Any]] = []
    res: list[dict[str, Any]] = []
    for y in years:
        days = [date(y, 1, 1) + timedelta(days=i) for i in range(40)] + \
            [date(y, 12, 31) - timedelta(days=i) for i in range(5)]
        for d in days:
            rows.extend({"applicant_id": platform, "day": d, "fp": f"fp{i:05d}", "enterprise": uscc(i % 3),
                         "protocols": 1 << (i % 3), "status_rank": 3} for i in range(devices))
        first = date(y, 1, 1)
        res.extend({"applicant_id": node, "day": first + timedelta(days=i), "resolutions_ok": 6_000_000,
                    "resolutions_failed": 1, "creates_ok": 60_000, "deletes_ok": 0}
                   for i in range((date(y + 1, 1, 1) - first).days))
    with engine.begin() as conn:
        conn.execute(insert(device_days), rows)
        conn.execute(insert(resolution_days), res)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = make_engine(f"sqlite:///{tmp_path / 'v.sqlite'}")
    init_db(eng)
    ensure_note_key(eng)
    now = datetime(2024, 1, 1, tzinfo=UTC)
    add_applicant(eng, applicant_id="plat", name="示范平台", kind="platform", now=now)
    add_applicant(eng, applicant_id="node", name="示范节点", kind="node", now=now)
    load_facts(eng, platform="plat", node="node", years=(2024, 2025, 2026), devices=12)
    return eng


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy()


class Hooks:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""


@pytest.fixture
def webhook() -> Iterator[Hooks]:
    hooks = Hooks()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            hooks.bodies.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    hooks.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hooks
    finally:
        server.shutdown()
        server.server_close()


def test_scheduled_run_stop_restart_gives_exactly_one_evaluation_per_applicant_and_year(
        engine: Engine, policy: Policy, webhook: Hooks) -> None:
    now = [datetime(2026, 1, 4, 12, 0, tzinfo=SH)]
    settings = AnnualSettings(webhook_url=webhook.url, webhook_timeout_s=5)
    first = AnnualScheduler(engine, policy, settings, clock=lambda: now[0])
    try:
        caught = first.start()  # the last due run (5 January 2025) evaluated 2024
        assert caught is not None and caught.year == 2024 and sorted(caught.created) == ["node", "plat"]
        nxt = first.next_run_time()
        assert nxt is not None and (nxt.month, nxt.day, nxt.hour) == (1, 5, 2) and nxt.utcoffset() == \
            timedelta(hours=8)
        now[0] = datetime(2026, 1, 5, 2, 0, 1, tzinfo=SH)  # the scheduled run fires: the job APScheduler calls
        run = first.run_due()
        assert run is not None and run.year == 2025 and sorted(run.created) == ["node", "plat"]
        assert run.webhook_status == 204
    finally:
        first.stop()  # the verifier goes down before the 5 January 2027 run
    now[0] = datetime(2027, 2, 1, 9, 0, tzinfo=SH)
    second = AnnualScheduler(engine, policy, settings, clock=lambda: now[0])
    try:
        caught = second.start()  # restarted after it: the missed run is caught up
        assert caught is not None and caught.year == 2026 and sorted(caught.created) == ["node", "plat"]
        again = second.run_due()  # a re-run stores nothing new and tells no one
        assert again is not None and again.created == [] and sorted(again.existing) == ["node", "plat"]
    finally:
        second.stop()
    with engine.connect() as conn:
        counts = count_evaluations(conn)
    assert counts == {(a, y): 1 for a in ("node", "plat") for y in (2024, 2025, 2026)}
    assert [b["year"] for b in webhook.bodies] == [2024, 2025, 2026]
    assert webhook.bodies[1]["event"] == "evaluations_ready"
    assert {e["applicant_id"] for e in webhook.bodies[1]["evaluations"]} == {"node", "plat"}


def test_evaluation_is_signed_names_its_snapshot_and_a_rerun_gives_the_same(engine: Engine, policy: Policy) -> None:
    now = datetime(2026, 1, 5, 3, 0, tzinfo=SH)
    record_gate(engine, applicant_id="node", metric="connected_to_top_level_node", value=True,
                recorded_by="王科长", document_ref="嘉经信〔2025〕12号", now=now)
    run_annual(engine, policy, 2025, now=now)
    with engine.connect() as conn:
        stored = get_evaluation(conn, "node", 2025, policy.id)
    assert stored is not None
    key = signing_key(engine)
    signed = verify_evaluation(stored, key.public_key())
    assert signed["evidence"]["ledger_size"] == stored.ledger_size == 0
    assert set(signed["evidence"]) >= {"ledger_size", "last_leaf_hash", "checkpoint"}
    gate = next(c for c in signed["criteria"] if c["id"] == "m2-top-level-node")
    assert gate["passed"] is True
    assert signed["criteria_detail"]["m2-top-level-node"]["recorded"][0]["recorded_by"] == "王科长"
    rerun = run_annual(engine, policy, 2025, now=now + timedelta(days=30))
    assert rerun.created == []
    with engine.connect() as conn:
        again = get_evaluation(conn, "node", 2025, policy.id)
    assert again is not None and again.envelope == stored.envelope
    fresh = on_demand(engine, policy, "node", 2025, as_of=date(2025, 12, 31)).to_json()
    assert fresh == {k: v for k, v in stored.verdict.items() if k != "evaluated_at"}
    tampered = type(stored)(**{**{f: getattr(stored, f) for f in stored.__dataclass_fields__},
                               "verdict": {**stored.verdict, "total_payable_yuan": "999"}})
    with pytest.raises(ValueError, match="expected the envelope to sign the stored verdict"):
        verify_evaluation(tampered, key.public_key())


def test_on_demand_any_window_and_settings_are_checked(engine: Engine, policy: Policy) -> None:
    v = on_demand(engine, policy, "plat", 2025, as_of=date(2025, 12, 31)).to_json()
    assert v["beside"]["connected_devices"] == 12 and v["beside"]["active_device_days"] == 12 * 45
    running = on_demand(engine, policy, "plat", 2026, as_of=date(2026, 3, 1)).to_json()
    assert running["beside"]["connected_devices"] == 12 and running["beside"]["window_end"] == "2026-03-01"
    assert AnnualSettings.from_config({}).cron == "0 2 5 1 *"
    with pytest.raises(ConfigError, match=r"verifier\.annual: unknown keys \['when'\]"):
        AnnualSettings.from_config({"when": "january"})
    with pytest.raises(ConfigError, match=r"expected a 5-field crontab and an IANA zone, got '61 \* \* \* \*'"):
        AnnualSettings.from_config({"cron": "61 * * * *"})


@pytest.mark.postgres
def test_annual_run_and_report_on_postgresql(policy: Policy) -> None:
    from tests.test_verifier_core import _postgres_database
    from verifier.reports import build_report

    with _postgres_database() as url:
        eng = make_engine(url)
        try:
            init_db(eng)
            now = datetime(2026, 1, 5, tzinfo=UTC)
            add_applicant(eng, applicant_id="plat", name="示范平台", kind="platform", now=now)
            add_applicant(eng, applicant_id="node", name="示范节点", kind="node", now=now)
            load_facts(eng, platform="plat", node="node", years=(2025,), devices=5)
            record_gate(eng, applicant_id="node", metric="connected_to_top_level_node", value="true",
                        recorded_by="王科长", document_ref="嘉经信〔2025〕12号", now=now)
            assert sorted(run_annual(eng, policy, 2025, now=now).created) == ["node", "plat"]
            assert run_annual(eng, policy, 2025, now=now).created == []
            with eng.connect() as conn:
                assert count_evaluations(conn) == {("node", 2025): 1, ("plat", 2025): 1}
            rep = build_report(eng, policy, "plat", 2025, now=now).data
            assert rep["totals"]["active_device_days"] == 5 * 45 and rep["devices"][0]["protocols"] == ["opcua"]
            assert rep["integrity"]["basis"]["kind"] == "stored_annual_evaluation"
        finally:
            eng.dispose()
