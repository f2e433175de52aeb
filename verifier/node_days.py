"""Measure 2's day-by-day evidence for officials: what each node agent's signed reports say about the shape of
the traffic (distinct identifiers and clients from merged HyperLogLog sketches, gaps in the log) and the anomaly
flags computed from it (``verifier.node_evidence``). Flags inform; they never change a count.

Reads only what the ledger holds: the stored envelopes were verified at ingest, so their payloads are parsed here
without checking the signature again.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.engine import Engine

from protocol.report import ReportV1, parse_report
from verifier.db import agents, entries
from verifier.enroll import get_applicant, sampling_salt
from verifier.node_evidence import anomaly_flags, day_evidence

SHANGHAI = ZoneInfo("Asia/Shanghai")


def node_days(engine: Engine, applicant_id: str, year: int, *, zone: ZoneInfo = SHANGHAI) -> dict[str, Any]:
    """Per agent and calendar day of ``year``: resolutions, distinct identifiers and clients, gaps and flags."""
    start = datetime.combine(date(year, 1, 1), time(0), tzinfo=zone)
    end = datetime.combine(date(year + 1, 1, 1), time(0), tzinfo=zone)
    with engine.connect() as conn:
        applicant = get_applicant(conn, applicant_id)
        rows = conn.execute(
            select(entries.c.agent_id, entries.c.envelope)
            .join(agents, agents.c.agent_id == entries.c.agent_id)
            .where(agents.c.applicant_id == applicant.id,
                   entries.c.period_end > start - timedelta(days=1), entries.c.period_start < end + timedelta(days=1))
            .order_by(entries.c.entry_index)
        ).all()
        reports: dict[str, list[ReportV1]] = defaultdict(list)
        for agent_id, envelope in rows:
            report = parse_report(base64.b64decode(json.loads(envelope)["payload"]))
            if report.resolution is not None:
                reports[str(agent_id)].append(report)
        salts = {agent_id: sampling_salt(conn, agent_id) for agent_id in reports}
    days: list[dict[str, Any]] = []
    flagged: dict[str, int] = defaultdict(int)
    for agent_id, agent_reports in sorted(reports.items()):
        for day, ev in day_evidence(agent_reports, zone).items():
            if day.year != year:
                continue
            flags = anomaly_flags(ev, salts[agent_id])
            for f in flags:
                flagged[f.code] += 1
            days.append({
                "agent_id": agent_id,
                "day": day.isoformat(),
                "resolutions_ok": ev.resolutions_ok,
                "resolutions_failed": ev.resolutions_failed,
                "distinct_identifiers_estimate": round(ev.distinct_identifiers),
                "distinct_clients_estimate": round(ev.distinct_clients),
                "gaps": [{"start": a.isoformat(), "end": b.isoformat(), "reason": r} for a, b, r in ev.gaps],
                "flags": [{"code": f.code, "message": f.message, "value": f.value, "threshold": f.threshold}
                          for f in flags],
            })
    return {"applicant_id": applicant.id, "year": year, "days": days, "days_flagged": dict(sorted(flagged.items())),
            "note": "Anomaly flags inform officials; they never change a count. / 异常提示仅供参考，不改变计数。"}
