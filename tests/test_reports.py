"""Reports per applicant and year: JSON, CSV, XLSX (opened with openpyxl, totals equal to the JSON) and a PDF in
Simplified Chinese (pdftotext round trip of the Chinese strings; rendered to PNG with pdftoppm)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from openpyxl import load_workbook
from sqlalchemy.engine import Engine

from tests.test_annual import load_facts, uscc
from verifier.annual import on_demand
from verifier.checkpoints import ensure_note_key
from verifier.db import init_db, make_engine
from verifier.enroll import add_applicant, add_enterprise
from verifier.gates import record_gate
from verifier.reports import Report, build_report, render, to_csv
from verifier.rules import Policy, load_policy

NOW = datetime(2026, 1, 6, 1, 0, tzinfo=UTC)


def num(value: object) -> int:
    return int(str(value))


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    eng = make_engine(f"sqlite:///{tmp_path_factory.mktemp('reports') / 'v.sqlite'}")
    init_db(eng)
    ensure_note_key(eng)
    add_applicant(eng, applicant_id="plat", name="嘉兴示范工业互联网平台", kind="platform", now=NOW)
    add_applicant(eng, applicant_id="node", name="嘉兴标识解析二级节点", kind="node", now=NOW)
    for i in range(3):
        add_enterprise(eng, applicant_id="plat", uscc=uscc(i), name=f"嘉兴纺织机械有限公司{i}", now=NOW)
    load_facts(eng, platform="plat", node="node", years=(2024, 2025), devices=12)
    record_gate(eng, applicant_id="node", metric="connected_to_top_level_node", value=True, recorded_by="王科长",
                document_ref="嘉经信〔2025〕12号", now=NOW)
    return eng


@pytest.fixture(scope="module")
def platform_report(engine: Engine, policy: Policy) -> Report:
    return build_report(engine, policy, "plat", 2025, now=NOW)


@pytest.fixture(scope="module")
def node_report(engine: Engine, policy: Policy) -> Report:
    return build_report(engine, policy, "node", 2025, now=NOW)


def test_json_numbers_equal_the_verdict(engine: Engine, policy: Policy, platform_report: Report,
                                        node_report: Report) -> None:
    d = platform_report.data
    verdict = on_demand(engine, policy, "plat", 2025, as_of=datetime(2025, 12, 31).date()).to_json()
    assert [(c["id"], c["value"], c["passed"]) for c in d["summary"]] == \
        [(c["id"], c["value"], c["passed"]) for c in verdict["criteria"]]
    assert d["awards"] == verdict["awards"] and d["beside"] == verdict["beside"]
    assert d["totals"]["devices"] == len(d["devices"]) == 12
    assert d["totals"]["active_device_days"] == verdict["beside"]["active_device_days"] == 12 * 45
    assert d["totals"]["connected_devices"] == verdict["beside"]["connected_devices"] == 12
    assert {e["uscc"] for e in d["enterprises"]} == {uscc(i) for i in range(3)}
    assert d["devices"][0]["protocols"] == ["opcua"] and d["devices"][0]["first_seen"] == "2025-01-01"
    assert d["devices"][0]["enterprise_name"] == "嘉兴纺织机械有限公司0"
    summary = d["summary"][0]
    assert summary["window_dates"]["start"] == "2025-01-01" and "ledger entries [0, 0)" in summary["evidence"]
    n = node_report.data
    assert len(n["monthly"]) == 12 and n["monthly"][1]["days"] == 28
    assert n["monthly"][-1]["cumulative_registrations"] == 60_000 * (366 + 365)
    assert sum(m["resolutions"] for m in n["monthly"]) == \
        on_demand(engine, policy, "node", 2025, as_of=datetime(2025, 12, 31).date()).beside["successful_resolutions"]
    gate = next(s for s in n["summary"] if s["kind"] == "gate")
    assert gate["passed"] is True and "嘉经信〔2025〕12号 (王科长" in gate["evidence"]
    assert n["integrity"]["basis"]["kind"] == "on_demand" and n["integrity"]["ledger_size"] == 0
    assert json.loads(render(node_report, "json"))["totals"] == n["totals"]


def test_csv_tables(platform_report: Report) -> None:
    text = to_csv(platform_report, "devices").decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 12 and sum(int(r["active_days"]) for r in rows) == 12 * 45
    summary = list(csv.DictReader(io.StringIO(to_csv(platform_report).decode("utf-8-sig"))))
    assert summary[0]["label_zh"] == "服务企业数超 300 家" and summary[0]["operator"] == ">"
    with pytest.raises(ValueError, match="table: expected one of"):
        to_csv(platform_report, "everything")


def test_xlsx_opens_and_totals_equal_the_json(platform_report: Report, node_report: Report) -> None:
    wb = load_workbook(io.BytesIO(render(platform_report, "xlsx")))
    assert wb.sheetnames[:3] == ["汇总表", "奖励计算", "设备清单"]
    devices = list(wb["设备清单"].iter_rows(min_row=2, values_only=True))
    assert len(devices) == platform_report.data["totals"]["devices"]
    assert sum(num(r[6]) for r in devices) == platform_report.data["totals"]["active_device_days"]
    awards = list(wb["奖励计算"].iter_rows(min_row=2, values_only=True))
    payable = sum((Decimal(str(r[9])) for r in awards), Decimal(0))
    assert payable == Decimal(platform_report.data["total_payable_yuan"])
    enterprises = list(wb["企业清单"].iter_rows(min_row=2, values_only=True))
    assert sum(num(r[3]) for r in enterprises) == platform_report.data["totals"]["connected_devices"]
    nwb = load_workbook(io.BytesIO(render(node_report, "xlsx", lang="en")))
    monthly = list(nwb["Node monthly table"].iter_rows(min_row=2, values_only=True))
    assert sum(num(r[4]) for r in monthly) == node_report.data["totals"]["resolutions"]


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="needs poppler-utils")
def test_pdf_in_chinese_round_trips_and_renders(platform_report: Report, node_report: Report, tmp_path: Path) -> None:
    pdf = tmp_path / "node.pdf"
    pdf.write_bytes(render(node_report, "pdf"))
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, check=True, timeout=30,
                          text=True).stdout
    for s in ("嘉兴标识解析二级节点", "年度核验报告", "完成与国家顶级节点对接", "新增注册量达到 2000 万",
              "节点月度数据", "嘉经信〔2025〕12号", "通过", "完整性"):
        assert s in text, s
    assert "2025-12" in text and "6,000,000" in text and "186,000,000" in text  # daily average; January
    plat = tmp_path / "plat.pdf"
    plat.write_bytes(render(platform_report, "pdf"))
    ptext = subprocess.run(["pdftotext", str(plat), "-"], capture_output=True, check=True, timeout=30,
                           text=True).stdout
    assert "嘉兴纺织机械有限公司0" in ptext and "连接设备数超 1 万台" in ptext
    en = tmp_path / "en.pdf"
    en.write_bytes(render(node_report, "pdf", lang="en"))
    etext = subprocess.run(["pdftotext", str(en), "-"], capture_output=True, check=True, timeout=30,
                           text=True).stdout
    assert "verification report for 2025" in etext and "嘉兴标识解析二级节点" in etext
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "page")],
                   check=True, timeout=60)
    png = tmp_path / "page-1.png"
    assert png.stat().st_size > 10_000
    keep = Path("/tmp/t6")
    if keep.is_dir():  # for a human look at the glyphs
        shutil.copy(png, keep / "node-page-1.png")
        shutil.copy(plat, keep / "plat.pdf")
