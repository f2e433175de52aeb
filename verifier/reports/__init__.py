"""Reports officials can file, per applicant and year: the summary sheet per measure, the awards, the device list,
the enterprise list, the node's monthly table, anomaly flags and an integrity section; as JSON, CSV, XLSX and PDF
(Simplified Chinese, English available).

Every figure comes from one verdict — the stored, signed annual evaluation when there is one, else the on-demand
evaluation the API gives (``GET /v1/applicants/{id}/eligibility``) — and from the same facts tables, so the
numbers in every format equal the API's. :func:`build_report` makes the JSON; the other formats render it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Date, case, func, select
from sqlalchemy.engine import Connection, Engine

from verifier.annual import get_evaluation, on_demand
from verifier.db import agents, device_days, enterprises, entries, equivocations, resolution_days
from verifier.eligibility import ACTIVE_RANK, connected_devices, days_in_year
from verifier.enroll import get_applicant
from verifier.facts import PROTOCOL_BITS, fp_ordered, protocol_names
from verifier.i18n import Lang
from verifier.rules import Policy

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("json", "csv", "xlsx", "pdf")
CSV_TABLES: tuple[str, ...] = ("summary", "awards", "devices", "enterprises", "monthly", "anomalies")
MEDIA_TYPES: dict[str, str] = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "pdf": "application/pdf",
}


@dataclass(frozen=True, slots=True)
class Report:
    data: dict[str, Any]

    @property
    def year(self) -> int:
        return int(self.data["year"])


def _devices(conn: Connection, applicant_id: str, year: int) -> list[dict[str, Any]]:
    active = device_days.c.status_rank == ACTIVE_RANK
    bits = [func.max(device_days.c.protocols.op("&")(bit)).label(f"p{bit}") for bit in PROTOCOL_BITS.values()]
    day, hint = fp_ordered(conn, True)
    rows = conn.execute(hint(
        select(device_days.c.fp, func.max(device_days.c.enterprise).label("enterprise"),
               func.min(device_days.c.day).label("first_seen"), func.max(device_days.c.day).label("last_seen"),
               func.sum(case((active, 1), else_=0)).label("active_days"),
               func.max(case((active, device_days.c.day), else_=None), type_=Date).label("last_active_day"),
               func.max(device_days.c.status_rank).label("best_status_rank"), *bits)
        .where(device_days.c.applicant_id == applicant_id, day >= date(year, 1, 1), day <= date(year, 12, 31))
        .group_by(device_days.c.fp).order_by(device_days.c.fp)))
    out = []
    for r in rows:
        mask = sum(int(getattr(r, f"p{bit}") or 0) for bit in PROTOCOL_BITS.values())
        out.append({"fp": r.fp, "enterprise": r.enterprise, "protocols": protocol_names(mask),
                    "first_seen": r.first_seen.isoformat(), "last_seen": r.last_seen.isoformat(),
                    "active_days": int(r.active_days or 0),
                    "last_active_day": r.last_active_day.isoformat() if r.last_active_day else None,
                    "best_status_rank": int(r.best_status_rank)})
    return out


def _monthly(conn: Connection, applicant_id: str, year: int) -> list[dict[str, Any]]:
    before = conn.execute(select(func.coalesce(func.sum(resolution_days.c.creates_ok), 0)).where(
        resolution_days.c.applicant_id == applicant_id, resolution_days.c.day < date(year, 1, 1))).scalar_one()
    months = {m: [0, 0, 0] for m in range(1, 13)}
    for r in conn.execute(select(resolution_days).where(
            resolution_days.c.applicant_id == applicant_id, resolution_days.c.day >= date(year, 1, 1),
            resolution_days.c.day <= date(year, 12, 31))):
        row = months[r.day.month]
        row[0] += int(r.creates_ok)
        row[1] += int(r.resolutions_ok)
        row[2] += int(r.resolutions_failed)
    cumulative = int(before)
    out = []
    for m, (creates, ok, failed) in months.items():
        cumulative += creates
        n = ((date(year + (m == 12), m % 12 + 1, 1)) - date(year, m, 1)).days
        avg = Decimal(ok) / Decimal(n)
        out.append({"month": f"{year}-{m:02d}", "days": n, "new_registrations": creates,
                    "cumulative_registrations": cumulative, "resolutions": ok, "failed_resolutions": failed,
                    "daily_average_resolutions": float(round(avg, 2))})
    return out


def _flag(flag: str, count: int, zh: str, en: str) -> dict[str, Any]:
    return {"flag": flag, "count": count, "detail": {"zh": zh, "en": en}}


def _anomalies(conn: Connection, applicant_id: str, year: int, devices: list[dict[str, Any]],
               monthly: list[dict[str, Any]]) -> list[dict[str, Any]]:
    flags: list[dict[str, Any]] = []
    agent_ids = select(agents.c.agent_id).where(agents.c.applicant_id == applicant_id).scalar_subquery()
    start = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    late = conn.execute(select(func.count()).select_from(entries).where(
        entries.c.agent_id.in_(agent_ids), entries.c.late.is_(True), entries.c.period_start >= start,
        entries.c.period_start < end)).scalar_one()
    if late:
        flags.append({"flag": "late_reports", "count": int(late),
                      "detail": {"zh": "迟到的报告（周期结束后很久才提交）", "en": "reports delivered late"}})
    equivocated = conn.execute(select(func.count()).select_from(equivocations).where(
        equivocations.c.agent_id.in_(agent_ids))).scalar_one()
    if equivocated:
        flags.append(_flag("equivocations", int(equivocated), "同一序号提交了不同的报告",
                           "different reports sent for one sequence number"))
    never_active = sum(1 for d in devices if d["active_days"] == 0)
    if never_active:
        flags.append(_flag("devices_never_active", never_active, "只登记或可达、从未活跃的设备",
                           "devices registered or reachable, never active"))
    no_enterprise = sum(1 for d in devices if not d["enterprise"])
    if no_enterprise:
        flags.append(_flag("devices_without_enterprise", no_enterprise, "无统一社会信用代码的设备",
                           "devices without a unified social credit code"))
    failing = [m["month"] for m in monthly if m["failed_resolutions"] > m["resolutions"] > 0]
    if failing:
        flags.append({"flag": "failed_resolutions_exceed_successful", "count": len(failing),
                      "detail": {"zh": "失败解析多于成功解析的月份：" + "、".join(failing),
                                 "en": "months with more failed than successful resolutions: " + ", ".join(failing)}})
    return flags


NODE_FLAG_TEXT = {  # issue 4: the node evidence's flags (verifier.node_evidence), counted in days
    "flat_loop": ("流量集中于少数客户端且缺乏日内节律的天数（脚本循环特征）",
                  "days whose traffic comes from a few clients without a daily rhythm (a scripted loop)"),
    "replayed_lines": ("大量记录与更早的记录完全相同的天数（重放）",
                       "days with many exact repeats of earlier records (replay)"),
    "bulk_unresolved": ("新注册标识当天几乎无人解析的天数（批量注册）",
                        "days whose new identifiers were hardly ever resolved (bulk registration)"),
    "samples_inconsistent": ("加盐抽样数量与计数不符的天数", "days whose salted sample count does not fit the count"),
    "samples_not_due": ("抽样记录并非按核验方下发的盐选中的天数（节点自选样本）",
                        "days with samples not due under the salt the verifier issued (samples chosen by the node)"),
    "overwrites_as_creates": ("访问日志中的注册远多于注册库新增的天数（覆盖写入被记为注册）",
                              "days whose access log shows far more creates than the registry's new identifiers "
                              "(overwrites logged as creates)"),
}


def _node_day_flags(engine: Engine, applicant_id: str, year: int) -> list[dict[str, Any]]:
    """The node evidence's anomaly flags (``GET /v1/applicants/{id}/resolution-days``), one row per kind: how many
    agent-days raised it, and which (the first five). They inform; the counts stand."""
    from verifier.node_days import node_days

    got = node_days(engine, applicant_id, year)
    out = []
    for code, count in got["days_flagged"].items():
        days = [f"{d['day']} ({d['agent_id']})" for d in got["days"] if code in {f["code"] for f in d["flags"]}]
        more = "" if len(days) <= 5 else f" … +{len(days) - 5}"
        zh, en = NODE_FLAG_TEXT.get(code, (f"提示 {code} 的天数", f"days flagged {code}"))
        out.append({"flag": code, "count": count,
                    "detail": {"zh": f"{zh}：{'、'.join(days[:5])}{more}", "en": f"{en}: {', '.join(days[:5])}{more}"}})
    return out


def build_report(engine: Engine, policy: Policy, applicant_id: str, year: int, *, now: datetime,
                 as_of: date | None = None) -> Report:
    """The report's data (the JSON format): the stored annual evaluation of the year when there is one, else an
    on-demand evaluation with windows ending at ``as_of`` (default: the year's end)."""
    with engine.connect() as conn:
        applicant = get_applicant(conn, applicant_id)
        stored = get_evaluation(conn, applicant_id, year, policy.id)
    if stored is not None:
        verdict = dict(stored.verdict)
        basis: dict[str, Any] = {"kind": "stored_annual_evaluation", "key_id": stored.key_id,
                                 "envelope_sha256": hashlib.sha256(stored.envelope).hexdigest(),
                                 "evaluated_at": verdict.get("evaluated_at")}
    else:
        end = as_of or date(year, 12, 31)
        verdict = on_demand(engine, policy, applicant_id, year, as_of=end).to_json()
        basis = {"kind": "on_demand", "as_of": end.isoformat()}
    with engine.connect() as conn:
        devices = _devices(conn, applicant_id, year)
        names = {r.uscc: r.name for r in conn.execute(select(enterprises).where(
            enterprises.c.applicant_id == applicant_id))}
        monthly = _monthly(conn, applicant_id, year) if applicant.kind == "node" else []
        anomalies = _anomalies(conn, applicant_id, year, devices, monthly)
    if applicant.kind == "node":
        anomalies.extend(_node_day_flags(engine, applicant_id, year))
    defs = policy.definitions
    window_end = date.fromisoformat(verdict["beside"]["window_end"])
    counted = connected_devices(
        [_device_year(d, year) for d in devices], year, min_active_days=defs.connected_device_min_active_days,
        recent_days=defs.connected_device_recent_days, window_end=window_end)
    ent: dict[str, dict[str, Any]] = {}
    for d in devices:
        d["enterprise_name"] = names.get(d["enterprise"] or "", "")
        d["counted"] = d["fp"] in counted
        if d["enterprise"]:
            e = ent.setdefault(d["enterprise"], {"uscc": d["enterprise"], "name": d["enterprise_name"],
                                                 "devices": 0, "connected_devices": 0, "active_device_days": 0})
            e["devices"] += 1
            e["connected_devices"] += int(d["counted"])
            e["active_device_days"] += d["active_days"]
    evidence = verdict.get("evidence") or {}
    summary = []
    for c in verdict["criteria"]:
        detail = verdict["criteria_detail"][c["id"]]
        summary.append({**c, "window_dates": detail["window_dates"], "aggregation": detail["aggregation"],
                        "params": detail["params"], "source": detail["source"],
                        "evidence": _evidence_ref(detail, evidence)})
    totals = {
        "devices": len(devices), "connected_devices": len(counted),
        "active_device_days": sum(d["active_days"] for d in devices),
        "enterprises": len(ent), "served_enterprises": sum(1 for e in ent.values() if e["connected_devices"]),
        "new_registrations": sum(m["new_registrations"] for m in monthly),
        "resolutions": sum(m["resolutions"] for m in monthly),
        "total_payable_yuan": verdict["total_payable_yuan"],
    }
    data = {
        "report": "tianping.verdict-report.v1",
        "applicant": verdict["applicant"], "year": year, "policy": verdict["policy"],
        "summary": summary, "awards": verdict["awards"], "total_payable_yuan": verdict["total_payable_yuan"],
        "beside": verdict["beside"], "devices": devices, "enterprises": sorted(ent.values(), key=lambda e: e["uscc"]),
        "monthly": monthly, "anomalies": anomalies, "totals": totals,
        "integrity": {"basis": basis, "ledger_size": evidence.get("ledger_size"),
                      "last_leaf_hash": evidence.get("last_leaf_hash"), "checkpoint": evidence.get("checkpoint"),
                      "bundle_sha256": evidence.get("bundle_sha256"), "policy_sha256": verdict["policy"]["sha256"],
                      "generated_at": now.astimezone(UTC).isoformat()},
        "days_in_year": days_in_year(year),
    }
    return Report(data)


def _device_year(d: dict[str, Any], year: int) -> Any:
    from verifier.eligibility import DeviceYear

    last = date.fromisoformat(d["last_active_day"]) if d["last_active_day"] else None
    return DeviceYear(d["fp"], year, d["active_days"], last, d["best_status_rank"], d["enterprise"])


def _evidence_ref(detail: dict[str, Any], evidence: dict[str, Any]) -> str:
    if detail["source"] == "official":
        recs = detail["recorded"]
        if not recs:
            return "not recorded / 未记录"
        return "; ".join(f"{r['document_ref']} ({r['recorded_by']}, {r['recorded_at']})" for r in recs)
    ref = f"ledger entries [0, {evidence.get('ledger_size', '?')})"
    cp = evidence.get("checkpoint")
    if cp:
        ref += f"; checkpoint size {cp['size']} root {cp['root'][:16]}…"
    return ref


def to_json(report: Report) -> bytes:
    return json.dumps(report.data, ensure_ascii=False, indent=2).encode("utf-8")


def _cell(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, list):
        return ";".join(str(v) if not isinstance(v, dict) else json.dumps(v, ensure_ascii=False) for v in value)
    return "" if value is None else value


SUMMARY_COLUMNS = ("measure", "id", "label_zh", "label_en", "metric", "window", "window_start", "window_end",
                   "aggregation", "operator", "threshold", "value", "unit", "passed", "source", "definition_zh",
                   "definition_en", "params", "evidence")
AWARD_COLUMNS = ("measure", "id", "label_zh", "label_en", "kind", "eligible", "computed_yuan", "caps_applied",
                 "amount_yuan", "payable_yuan", "year_index", "superseded_by", "reason", "steps")
DEVICE_COLUMNS = ("fp", "enterprise", "enterprise_name", "protocols", "first_seen", "last_seen", "active_days",
                  "last_active_day", "counted")
ENTERPRISE_COLUMNS = ("uscc", "name", "devices", "connected_devices", "active_device_days")
MONTHLY_COLUMNS = ("month", "days", "new_registrations", "cumulative_registrations", "resolutions",
                   "failed_resolutions", "daily_average_resolutions")
ANOMALY_COLUMNS = ("flag", "count", "detail_zh", "detail_en")


def rows(report: Report, table: str) -> tuple[tuple[str, ...], list[list[Any]]]:
    """One table of the report as columns and rows of plain values (CSV, XLSX and PDF share them)."""
    d = report.data
    if table == "summary":
        return SUMMARY_COLUMNS, [[
            c["measure"], c["id"], c["label"]["zh"], c["label"]["en"], c["metric"], c["window"],
            (c["window_dates"] or {}).get("start"), (c["window_dates"] or {}).get("end"), c["aggregation"],
            c["operator"], c["threshold"], c["value"], c["unit"], c["passed"], c["source"], c["definition"]["zh"],
            c["definition"]["en"], c["params"], c["evidence"]] for c in d["summary"]]
    if table == "awards":
        return AWARD_COLUMNS, [[
            a["measure"], a["id"], a["label"]["zh"], a["label"]["en"], a["kind"], a["eligible"], a["computed_yuan"],
            a["caps_applied"], a["amount_yuan"], a["payable_yuan"], a["year_index"], a["superseded_by"],
            a["reason"], a["steps"]] for a in d["awards"]]
    if table == "devices":
        return DEVICE_COLUMNS, [[x[k] for k in DEVICE_COLUMNS] for x in d["devices"]]
    if table == "enterprises":
        return ENTERPRISE_COLUMNS, [[x[k] for k in ENTERPRISE_COLUMNS] for x in d["enterprises"]]
    if table == "monthly":
        return MONTHLY_COLUMNS, [[x[k] for k in MONTHLY_COLUMNS] for x in d["monthly"]]
    if table == "anomalies":
        return ANOMALY_COLUMNS, [[x["flag"], x["count"], x["detail"]["zh"], x["detail"]["en"]] for x in d["anomalies"]]
    raise ValueError(f"table: expected one of {list(CSV_TABLES)}, got {table!r}")


def to_csv(report: Report, table: str = "summary") -> bytes:
    """One table as CSV (UTF-8 with a byte-order mark, so that spreadsheet programs read the Chinese right)."""
    columns, body = rows(report, table)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in body:
        writer.writerow([_cell(v) for v in row])
    return ("\ufeff" + buf.getvalue()).encode("utf-8")


def render(report: Report, fmt: str, *, lang: Lang = "zh", table: str = "summary") -> bytes:
    if fmt == "json":
        return to_json(report)
    if fmt == "csv":
        return to_csv(report, table)
    if fmt == "xlsx":
        from verifier.reports.xlsx import to_xlsx

        return to_xlsx(report, lang=lang)
    if fmt == "pdf":
        from verifier.reports.pdf import to_pdf

        return to_pdf(report, lang=lang)
    raise ValueError(f"format: expected one of {list(FORMATS)}, got {fmt!r}")
