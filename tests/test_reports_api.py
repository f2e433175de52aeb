"""Issue 6 over real HTTP and the CLI: gates recorded by an official, on-demand evaluation under another city's
rules, the annual run and its signed evaluation, and reports whose numbers equal the API's."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from openpyxl import load_workbook

from protocol.envelope import open_envelope
from protocol.keys import key_id
from simulator.mosquitto import free_port
from tests.test_annual import load_facts, uscc
from verifier.annual import EVALUATION_PAYLOAD_TYPE, signing_key
from verifier.api import VerifierSettings, create_app, serve_in_thread
from verifier.cli import main
from verifier.db import init_db, make_engine
from verifier.enroll import add_applicant, add_enterprise

ADMIN = {"Authorization": "Bearer issue6-admin-token-0123456789"}
NOW = datetime(2026, 1, 6, 1, 0, tzinfo=UTC)


@dataclass
class Api:
    client: httpx.Client
    db_url: str


def num(value: object) -> int:
    return int(str(value))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('api6') / 'v.sqlite'}"
    engine = make_engine(db_url)
    init_db(engine)
    add_applicant(engine, applicant_id="plat", name="示范平台", kind="platform", now=NOW)
    add_applicant(engine, applicant_id="node", name="示范节点", kind="node", now=NOW)
    add_enterprise(engine, applicant_id="plat", uscc=uscc(0), name="企业零", now=NOW)
    load_facts(engine, platform="plat", node="node", years=(2025,), devices=6)
    app = create_app(VerifierSettings(db_url=db_url, admin_token=ADMIN["Authorization"][7:], clock=lambda: NOW))
    with serve_in_thread(app, port=free_port()) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield Api(client, db_url)


def test_gate_is_recorded_by_an_official_and_shown_in_the_verdict(api: Api) -> None:
    body = {"metric": "connected_to_top_level_node", "value": True, "recorded_by": "王科长",
            "document_ref": "嘉经信〔2026〕1号"}
    assert api.client.post("/v1/applicants/node/gates", json=body).status_code in (401, 403)
    r = api.client.post("/v1/applicants/node/gates", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["recorded_by"] == "王科长" and r.json()["recorded_at"] == NOW.isoformat()
    bad = api.client.post("/v1/applicants/node/gates", headers=ADMIN,
                          json={**body, "metric": "investment_yuan", "value": "1e6"})
    assert bad.status_code == 422 and "expected a decimal such as" in bad.json()["error"]["message"]
    gates = api.client.get("/v1/applicants/node/gates", headers=ADMIN).json()
    assert gates["records"][0]["document_ref"] == "嘉经信〔2026〕1号"
    verdict = api.client.get("/v1/applicants/node/eligibility", params={"year": 2025}, headers=ADMIN).json()
    gate = next(c for c in verdict["criteria"] if c["kind"] == "gate")
    assert gate["passed"] is True
    assert verdict["criteria_detail"][gate["id"]]["recorded"][0]["recorded_by"] == "王科长"


def test_on_demand_under_another_citys_rules(api: Api) -> None:
    r = api.client.get("/v1/applicants/node/evaluate", params={"year": 2025, "policy": "wuhan-2023"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["policy"]["id"] == "wuhan-2023"
    assert next(c for c in v["criteria"] if c["id"] == "wh-node-daily-resolutions-600k")["passed"] is True
    assert v["evidence"]["ledger_size"] == 0
    r2 = api.client.get("/v1/applicants/node/evaluate", params={"year": 2025, "policy": "paris-2030"}, headers=ADMIN)
    assert r2.status_code == 422 and "expected one of" in r2.json()["error"]["message"]


def test_annual_run_stores_a_signed_evaluation(api: Api) -> None:
    assert api.client.get("/v1/applicants/plat/evaluations/2025", headers=ADMIN).status_code == 404
    r = api.client.post("/v1/admin/annual/run", params={"year": 2025}, headers=ADMIN)
    assert r.status_code == 200 and sorted(r.json()["created"]) == ["node", "plat"]
    again = api.client.post("/v1/admin/annual/run", params={"year": 2025}, headers=ADMIN).json()
    assert again["created"] == [] and sorted(again["existing"]) == ["node", "plat"]
    stored = api.client.get("/v1/applicants/plat/evaluations/2025", headers=ADMIN).json()
    public = signing_key(make_engine(api.db_url)).public_key()
    opened = open_envelope(base64.b64decode(stored["envelope"]), {key_id(public): public},
                           payload_type=EVALUATION_PAYLOAD_TYPE)
    assert json.loads(opened.payload) == stored["verdict"]


def test_reports_in_every_format_equal_the_api(api: Api) -> None:
    verdict = api.client.get("/v1/applicants/plat/eligibility", params={"year": 2025}, headers=ADMIN).json()
    rep = api.client.get("/v1/applicants/plat/reports/2025.json", headers=ADMIN).json()
    assert [(s["id"], s["value"]) for s in rep["summary"]] == [(c["id"], c["value"]) for c in verdict["criteria"]]
    assert rep["beside"] == verdict["beside"] and rep["total_payable_yuan"] == verdict["total_payable_yuan"]
    x = api.client.get("/v1/applicants/plat/reports/2025.xlsx", headers=ADMIN)
    assert x.headers["content-type"].startswith("application/vnd.openxmlformats")
    wb = load_workbook(io.BytesIO(x.content))
    devices = list(wb["设备清单"].iter_rows(min_row=2, values_only=True))
    assert sum(num(r[6]) for r in devices) == verdict["beside"]["active_device_days"]
    c = api.client.get("/v1/applicants/plat/reports/2025.csv", params={"table": "enterprises"}, headers=ADMIN)
    rows = list(csv.DictReader(io.StringIO(c.content.decode("utf-8-sig"))))
    assert rows[0] == {"uscc": uscc(0), "name": "企业零", "devices": "2", "connected_devices": "2",
                       "active_device_days": "90"} and len(rows) == 3
    p = api.client.get("/v1/applicants/plat/reports/2025.pdf", params={"lang": "en"}, headers=ADMIN)
    assert p.status_code == 200 and p.content.startswith(b"%PDF")
    bad = api.client.get("/v1/applicants/plat/reports/2025.docx", headers=ADMIN)
    assert bad.status_code == 422 and "expected YEAR.{json,csv,xlsx,pdf}" in bad.json()["error"]["message"]


def test_cli_gate_evaluate_annual_and_report(api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", api.db_url]
    assert main([*db, "gate", "record", "--applicant", "plat", "--metric", "investment_yuan", "--value", "250000.50",
                 "--by", "李处长", "--document", "审计〔2026〕9号", "--period", "2025", "--item", "机房"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == "250000.50"
    assert main([*db, "gate", "list", "--applicant", "plat"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["item"] == "机房"
    assert main([*db, "evaluate", "--applicant", "plat", "--year", "2025", "--as-of", "2025-12-31"]) == 0
    assert json.loads(capsys.readouterr().out)["beside"]["active_device_days"] == 6 * 45
    assert main([*db, "annual", "run", "--year", "2024"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["created"]) == ["node", "plat"]
    out = tmp_path / "r.pdf"
    assert main([*db, "report", "--applicant", "node", "--year", "2025", "--format", "pdf", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"%PDF")
    assert main([*db, "gate", "record", "--applicant", "plat", "--metric", "investment_yuan", "--value", "-1",
                 "--by", "x", "--document", "y"]) == 2
    assert "expected a decimal such as" in capsys.readouterr().err
