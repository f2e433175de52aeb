"""The verifier's HTTP API over real sockets: a real uvicorn on a free 127.0.0.1 port, httpx as the client, a real
SQLite file. Also the CLI, in process, against the same database."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select

from protocol.keys import generate_private_key, public_key_b64
from simulator.mosquitto import free_port
from tests.test_verifier_core import DAY0, NOW, AgentSim, Clock, device, uscc
from verifier.api import VerifierSettings, create_app, serve_in_thread
from verifier.cli import main
from verifier.db import entries, equivocations, init_db, make_engine
from verifier.errors import ERRORS
from verifier.facts import FactCounts, fact_counts
from verifier.ledger import LedgerHead, ledger_head
from verifier.rules import DEFAULT_RULES_PATH

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class Harness:
    base_url: str
    client: httpx.Client
    engine: Engine
    clock: Clock
    db_url: str
    rules_path: Path

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def token(self, applicant: str = "plat-1", enterprise: str | None = None, ttl_s: int | None = None) -> str:
        body: dict[str, Any] = {"applicant_id": applicant, "enterprise": enterprise}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        r = self.client.post("/v1/admin/tokens", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def enroll(self, applicant: str = "plat-1", enterprise: str | None = None) -> AgentSim:
        key = generate_private_key()
        r = self.client.post("/v1/enroll", json={"token": self.token(applicant, enterprise),
                                                 "public_key": public_key_b64(key.public_key()),
                                                 "agent_name": "edge"})
        assert r.status_code == 201, r.text
        return AgentSim(key=key, agent_id=r.json()["agent_id"])

    def post(self, envelope: bytes) -> httpx.Response:
        return self.client.post("/v1/reports", content=envelope, headers={"Content-Type": "application/json"})

    def deliver(self, sim: AgentSim, **kwargs: Any) -> dict[str, Any]:
        env = sim.next_envelope(**kwargs)
        r = self.post(env)
        assert r.status_code == 201, r.text
        sim.advance(env)
        return dict(r.json()["receipt"])

    def stored(self) -> tuple[LedgerHead, FactCounts, int]:
        """Everything a refusal must leave alone: ledger size and last hash, facts, equivocation evidence."""
        with self.engine.connect() as conn:
            return (ledger_head(conn), fact_counts(conn),
                    int(conn.execute(select(func.count()).select_from(equivocations)).scalar_one()))


def write_test_rules(tmp: Path) -> Path:
    """The shipped rule file with a connected device needing 2 active days instead of 30 (small test data)."""
    text = DEFAULT_RULES_PATH.read_text(encoding="utf-8")
    assert "connected_device_min_active_days = 30" in text
    path = tmp / "rules-test.toml"
    path.write_text(text.replace("connected_device_min_active_days = 30", "connected_device_min_active_days = 2"),
                    encoding="utf-8")
    return path


@contextmanager
def running_verifier(tmp: Path, **settings: Any) -> Iterator[Harness]:
    """A verifier on a fresh SQLite file under a real uvicorn, with two applicants registered over the API."""
    db_url = f"sqlite:///{tmp / 'verifier.sqlite'}"
    engine = make_engine(db_url)
    init_db(engine)
    clock = Clock(NOW)
    rules = write_test_rules(tmp)
    app = create_app(VerifierSettings(db_url=db_url, rules_path=rules, admin_token=ADMIN_TOKEN, clock=clock,
                                      **settings))
    with serve_in_thread(app, port=free_port()) as base_url, httpx.Client(base_url=base_url, timeout=10) as client:
        h = Harness(base_url, client, engine, clock, db_url, rules)
        for body in ({"id": "plat-1", "name": "示范平台", "kind": "platform"},
                     {"id": "node-1", "name": "示范二级节点", "kind": "node"}):
            assert client.post("/v1/admin/applicants", json=body, headers=h.admin).status_code == 201
        for n in (1, 2):
            r = client.post("/v1/admin/applicants/plat-1/enterprises", json={"uscc": uscc(n), "name": f"企业{n}"},
                            headers=h.admin)
            assert r.status_code == 201, r.text
        yield h
    engine.dispose()


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_verifier(tmp_path_factory.mktemp("verifier-api"), max_report_bytes=64 * 1024) as h:
        yield h


@pytest.fixture(autouse=True)
def _reset_clock(verifier: Harness) -> None:
    verifier.clock.now = NOW


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = dict(r.json()["error"])
    assert err["code"] == code
    assert err["message"].startswith(ERRORS[code].en) and err["message_zh"].startswith(ERRORS[code].zh)
    return err


def test_enroll_answers_agent_binding_and_fingerprint_key(verifier: Harness) -> None:
    key = generate_private_key()
    token = verifier.token("plat-1", uscc(1))
    r = verifier.client.post("/v1/enroll", json={"token": token, "public_key": public_key_b64(key.public_key()),
                                                 "agent_name": "edge-a"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"agent_id", "key_id", "applicant_id", "enterprise", "fingerprint_key", "resolution_salt",
                         "next_seq"}
    assert body["applicant_id"] == "plat-1" and body["next_seq"] == 1
    assert body["enterprise"] == {"uscc": uscc(1), "name": "企业1"}
    assert len(base64.b64decode(body["fingerprint_key"])) == 32
    salt = base64.b64decode(body["resolution_salt"])  # the agent's own sampling salt, not the deployment's key
    assert len(salt) == 32 and salt != base64.b64decode(body["fingerprint_key"])
    agent = verifier.client.get(f"/v1/agents/{body['agent_id']}", headers=verifier.admin).json()
    assert agent == {"agent_id": body["agent_id"], "applicant_id": "plat-1", "key_id": body["key_id"],
                     "next_seq": 1, "last_hash": "0" * 64, "last_report_at": None, "revoked": False}


def test_key_already_enrolled_is_refused(verifier: Harness) -> None:
    key = generate_private_key()
    first = {"token": verifier.token(), "public_key": public_key_b64(key.public_key()), "agent_name": "a"}
    assert verifier.client.post("/v1/enroll", json=first).status_code == 201
    again = {**first, "token": verifier.token()}
    _error(verifier.client.post("/v1/enroll", json=again), 409, "key_already_enrolled")


def test_reports_get_receipts_and_advance_the_agent(verifier: Harness) -> None:
    a = verifier.enroll()
    before = verifier.stored()[0].size
    receipt = verifier.deliver(a, devices=[device("api-d1", enterprise=uscc(1), start=a.start)])
    assert set(receipt) == {"index", "agent_id", "seq", "envelope_hash", "leaf_hash", "received_at", "late"}
    assert (receipt["index"], receipt["seq"], receipt["late"]) == (before, 1, False)
    second = verifier.deliver(a)
    assert second["index"] == before + 1 and second["seq"] == 2
    agent = verifier.client.get(f"/v1/agents/{a.agent_id}", headers=verifier.admin).json()
    assert (agent["next_seq"], agent["last_hash"]) == (3, a.prev_hash)
    assert datetime.fromisoformat(agent["last_report_at"]) == NOW
    health = verifier.client.get("/healthz").json()
    assert health["status"] == "ok" and health["ledger_size"] == before + 2


def test_revoked_agent_is_refused(verifier: Harness) -> None:
    a = verifier.enroll()
    r = verifier.client.post(f"/v1/admin/agents/{a.agent_id}/revoke", json={"reason": "stolen"},
                             headers=verifier.admin)
    assert r.status_code == 200 and r.json()["revoked"] is True
    before = verifier.stored()
    _error(verifier.post(a.next_envelope()), 403, "agent_revoked")
    assert verifier.stored() == before
    assert verifier.client.get(f"/v1/agents/{a.agent_id}", headers=verifier.admin).json()["revoked"] is True


def test_transport_refusals(verifier: Harness) -> None:
    a = verifier.enroll()
    before = verifier.stored()
    env = a.next_envelope()
    r = verifier.client.post("/v1/reports", content=env, headers={"Content-Type": "text/plain"})
    _error(r, 415, "content_type_unsupported")
    big = a.next_envelope(devices=[device(f"big-{i}", enterprise=uscc(1), start=a.start) for i in range(250)])
    assert len(big) > 64 * 1024
    _error(verifier.post(big), 413, "too_large")
    _error(verifier.post(b"{\"payload\": 1"), 400, "envelope_malformed")
    _error(verifier.client.get("/v1/nowhere"), 404, "not_found")
    _error(verifier.client.post("/v1/enroll", json={"token": "x"}), 422, "request_invalid")
    assert verifier.stored() == before


def test_admin_token_is_required(verifier: Harness, tmp_path: Path) -> None:
    body = {"id": "x", "name": "x", "kind": "node"}
    _error(verifier.client.post("/v1/admin/applicants", json=body), 401, "admin_unauthorized")
    _error(verifier.client.post("/v1/admin/applicants", json=body, headers={"Authorization": "Bearer wrong"}),
           401, "admin_unauthorized")
    db_url = f"sqlite:///{tmp_path / 'other.sqlite'}"
    init_db(make_engine(db_url))
    app = create_app(VerifierSettings(db_url=db_url, admin_token=None))
    with serve_in_thread(app, port=free_port()) as url, httpx.Client(base_url=url, timeout=10) as client:
        err = _error(client.post("/v1/admin/applicants", json=body, headers={"Authorization": "Bearer x"}),
                     403, "admin_disabled")
        assert "TIANPING_ADMIN_TOKEN" in err["message"] and "TIANPING_ADMIN_TOKEN" in err["message_zh"]


def test_openapi_is_published(verifier: Harness) -> None:
    spec = verifier.client.get("/openapi.json").json()
    assert {"/v1/enroll", "/v1/reports", "/v1/agents/{agent_id}", "/v1/applicants/{applicant_id}/eligibility",
            "/healthz"} <= set(spec["paths"])


def test_eligibility_from_ingested_facts_and_cli_prints_the_same(verifier: Harness, capsys:
                                                                  pytest.CaptureFixture[str]) -> None:
    a = verifier.enroll("plat-1", uscc(2))
    a.start = DAY0 - timedelta(days=3)  # its own time line, before the other tests' agents
    a.period = timedelta(days=1)
    devs = [("e1", uscc(1)), ("e2", uscc(1)), ("e3", uscc(2))]
    for day in range(2):
        start = a.start
        verifier.deliver(a, devices=[device(n, enterprise=e, start=start) for n, e in devs]
                         + [device("once", enterprise=uscc(2), start=start, status="active" if day else "reachable")])
    r = verifier.client.get("/v1/applicants/plat-1/eligibility", params={"year": 2025}, headers=verifier.admin)
    assert r.status_code == 200, r.text
    verdict = r.json()
    assert verdict["applicant"] == {"id": "plat-1", "name": "示范平台", "kind": "platform"}
    assert verdict["policy"]["id"] == "jiaxing-2021"
    assert verdict["policy"]["sha256"] == hashlib.sha256(verifier.rules_path.read_bytes()).hexdigest()
    values = {c["id"]: (c["value"], c["passed"]) for c in verdict["criteria"]}
    assert values["m5-devices-10000"] == (3, False) and values["m5-served-300"] == (2, False)
    assert values["m5-new-devices-3000"] == (3, False) and values["m5-new-users-100"] == (2, False)
    assert {c["measure"] for c in verdict["criteria"]} == {5}
    crit = verdict["criteria"][0]
    assert set(crit) == {"measure", "id", "label", "metric", "value", "operator", "threshold", "unit", "window",
                         "definition", "passed", "kind"}
    assert [aw["amount_yuan"] for aw in verdict["awards"]] == ["3000000", "1500000", "1000000"]
    assert verdict["beside"]["registered_devices"] >= 4 and verdict["beside"]["active_device_days"] >= 7

    node = verifier.client.get("/v1/applicants/node-1/eligibility", params={"year": 2025},
                               headers=verifier.admin).json()
    gate = next(c for c in node["criteria"] if c["kind"] == "gate")
    assert (gate["value"], gate["passed"], gate["measure"]) == (None, None, 2)
    _error(verifier.client.get("/v1/applicants/ghost/eligibility", params={"year": 2025}, headers=verifier.admin),
           404, "applicant_unknown")

    code = main(["--db", verifier.db_url, "check", "--year", "2025", "--applicant", "plat-1", "--json",
                 "--rules", str(verifier.rules_path), "--as-of", NOW.date().isoformat()])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == verdict
    assert main(["--db", verifier.db_url, "check", "--year", "2025", "--applicant", "plat-1", "--lang", "both",
                 "--rules", str(verifier.rules_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("连接设备数超 1 万台") < out.index("Connects more than 10,000 devices")
    assert "未通过" in out and "> 10,000" in out


def test_cli_administers_the_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", f"sqlite:///{tmp_path / 'cli.sqlite'}"]
    assert main([*db, "init"]) == 0 and main([*db, "init"]) == 0
    assert main([*db, "applicant", "add", "--id", "p9", "--name", "平台九", "--kind", "platform"]) == 0
    assert main([*db, "enterprise", "add", "--applicant", "p9", "--uscc", uscc(9), "--name", "企业九"]) == 0
    capsys.readouterr()
    assert main([*db, "token", "issue", "--applicant", "p9", "--enterprise", uscc(9), "--ttl-s", "60"]) == 0
    token = capsys.readouterr().out
    assert token.endswith("\n") and len(token.strip()) == 47 and token.startswith("tpe_") and "\n" not in token.strip()
    assert main([*db, "enterprise", "add", "--applicant", "p9", "--uscc", uscc(9)[:-1] + "X", "--name", "x"]) == 2
    assert "uscc_invalid" in capsys.readouterr().err
    assert main([*db, "check", "--year", "2025", "--lang", "en"]) == 0
    assert "Serves more than 300 enterprises" in capsys.readouterr().out


async def test_concurrent_agents_get_an_index_without_holes(verifier: Harness) -> None:
    sims = [verifier.enroll() for _ in range(4)]
    for a in sims:
        a.start = DAY0 + timedelta(hours=6)  # after the other tests' reports of these agents' own chains
    before = verifier.stored()[0].size

    async def run(client: httpx.AsyncClient, a: AgentSim) -> list[int]:
        got = []
        for _ in range(5):
            env = a.next_envelope(devices=[device(f"conc-{a.agent_id}", enterprise=uscc(1), start=a.start)])
            r = await client.post("/v1/reports", content=env, headers={"Content-Type": "application/json"})
            assert r.status_code == 201, r.text
            a.advance(env)
            got.append(int(r.json()["receipt"]["index"]))
        return got

    async with httpx.AsyncClient(base_url=verifier.base_url, timeout=10) as client:
        results = await asyncio.gather(*(run(client, a) for a in sims))
    indexes = sorted(i for got in results for i in got)
    assert indexes == list(range(before, before + 20))
    with verifier.engine.connect() as conn:
        stored = [r[0] for r in conn.execute(select(entries.c.entry_index).order_by(entries.c.entry_index))]
    assert stored == list(range(before + 20))
