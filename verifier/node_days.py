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
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from protocol.report import parse_report
from verifier.db import agents, entries, node_day_cache
from verifier.enroll import get_applicant, sampling_salt
from verifier.node_evidence import DayEvidence, anomaly_flags, day_evidence

SHANGHAI = ZoneInfo("Asia/Shanghai")


def _days_of(period_start: datetime, period_end: datetime, zone: ZoneInfo) -> list[date]:
    """The calendar days a report's evidence can fall on: its period's days and one either side (late flushes)."""
    first = period_start.astimezone(zone).date() - timedelta(days=1)
    last = (period_end - timedelta(microseconds=1)).astimezone(zone).date() + timedelta(days=1)
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _day_body(agent_id: str, ev: DayEvidence, salt: bytes) -> dict[str, Any]:
    flags = anomaly_flags(ev, salt)
    return {
        "agent_id": agent_id,
        "day": ev.day.isoformat(),
        "resolutions_ok": ev.resolutions_ok,
        "resolutions_failed": ev.resolutions_failed,
        "distinct_identifiers_estimate": round(ev.distinct_identifiers),
        "distinct_clients_estimate": round(ev.distinct_clients),
        "gaps": [{"start": a.isoformat(), "end": b.isoformat(), "reason": r} for a, b, r in ev.gaps],
        # new registrations: what the access log saw (op 100, resp 1; overwrites included) and, with a
        # registration source, what the node's registry recorded (null without one); facts count the registry's
        "creates_log": ev.creates_log,
        "creates_registry": ev.creates_registry,
        "registrations_source": ev.registrations_source,
        "registration_gaps": [{"start": a.isoformat(), "end": b.isoformat(), "reason": r}
                              for a, b, r in ev.registration_gaps],
        "flags": [{"code": f.code, "message": f.message, "value": f.value, "threshold": f.threshold} for f in flags],
    }


def node_days(engine: Engine, applicant_id: str, year: int, *, zone: ZoneInfo = SHANGHAI) -> dict[str, Any]:
    """Per agent and calendar day of ``year``: resolutions, distinct identifiers and clients, gaps and flags.

    Each (agent, day) is computed from the agent's reports that can hold evidence of that day and kept in
    ``node_day_cache`` with the number and last index of those entries; a later call recomputes only the days
    whose entries changed (a node sends ~100 reports a day; parsing a year of them on every call would take
    minutes)."""
    start = datetime.combine(date(year, 1, 1), time(0), tzinfo=zone)
    end = datetime.combine(date(year + 1, 1, 1), time(0), tzinfo=zone)
    with engine.connect() as conn:
        applicant = get_applicant(conn, applicant_id)
        meta = conn.execute(
            select(entries.c.agent_id, entries.c.entry_index, entries.c.period_start, entries.c.period_end)
            .join(agents, agents.c.agent_id == entries.c.agent_id)
            .where(agents.c.applicant_id == applicant.id,
                   entries.c.period_end > start - timedelta(days=1), entries.c.period_start < end + timedelta(days=1))
        ).all()
        by_day: dict[tuple[str, date], list[int]] = defaultdict(list)
        for agent_id, index, p_start, p_end in meta:
            for day in _days_of(p_start, p_end, zone):
                if day.year == year:
                    by_day[(str(agent_id), day)].append(int(index))
        cached = {(r.agent_id, r.day): r for r in conn.execute(
            select(node_day_cache).where(node_day_cache.c.applicant_id == applicant.id,
                                         node_day_cache.c.day >= start.date(), node_day_cache.c.day < end.date()))}
        stale = {key: idx for key, idx in by_day.items()
                 if (c := cached.get(key)) is None or (c.entries, c.last_index) != (len(idx), max(idx))
                 or (c.body != "null" and '"creates_log"' not in c.body)}  # cached before the registration fields
        fresh: dict[tuple[str, date], dict[str, Any] | None] = {}
        if stale:
            wanted = sorted({i for idx in stale.values() for i in idx})
            envelopes: dict[int, tuple[str, bytes]] = {}
            for chunk in range(0, len(wanted), 5000):
                envelopes.update((int(r.entry_index), (str(r.agent_id), bytes(r.envelope))) for r in conn.execute(
                    select(entries.c.entry_index, entries.c.agent_id, entries.c.envelope)
                    .where(entries.c.entry_index.in_(wanted[chunk:chunk + 5000]))))
            parsed = {i: parse_report(base64.b64decode(json.loads(env)["payload"]))
                      for i, (_, env) in envelopes.items()}
            salts = {agent_id: sampling_salt(conn, agent_id) for agent_id, _ in stale}
            for (agent_id, day), idx in stale.items():
                ev = day_evidence([parsed[i] for i in idx], zone).get(day)
                fresh[(agent_id, day)] = None if ev is None else _day_body(agent_id, ev, salts[agent_id])
    if fresh:
        _store(engine, applicant.id, {key: (len(by_day[key]), max(by_day[key]), body) for key, body in fresh.items()})
    days: list[dict[str, Any]] = []
    flagged: dict[str, int] = defaultdict(int)
    for key in sorted(by_day):
        body = fresh[key] if key in fresh else json.loads(cached[key].body)
        if body is None:
            continue
        days.append(body)
        for f in body["flags"]:
            flagged[f["code"]] += 1
    return {"applicant_id": applicant.id, "year": year, "days": days, "days_flagged": dict(sorted(flagged.items())),
            "note": "Anomaly flags inform officials; they never change a count. / 异常提示仅供参考，不改变计数。"}


def _store(engine: Engine, applicant_id: str, rows: dict[tuple[str, date], tuple[int, int, Any]]) -> None:
    """Keep freshly computed days (a cache: a concurrent writer of the same day wins as well)."""
    values = [{"agent_id": a, "day": d, "applicant_id": applicant_id, "entries": n, "last_index": last,
               "body": json.dumps(body, ensure_ascii=False)} for (a, d), (n, last, body) in rows.items()]
    with engine.begin() as conn:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = insert(node_day_cache)
        stmt = stmt.on_conflict_do_update(
            index_elements=[node_day_cache.c.agent_id, node_day_cache.c.day],
            set_={"entries": stmt.excluded.entries, "last_index": stmt.excluded.last_index,
                  "body": stmt.excluded.body})
        for i in range(0, len(values), 1000):
            conn.execute(stmt, values[i:i + 1000])


def flags_beside(engine: Engine, applicant_id: str, year: int) -> dict[str, Any]:
    """What a node's verdict shows beside it (never in it): how many agent-days raised each flag, and which."""
    days = node_days(engine, applicant_id, year)
    return {
        "days_flagged": days["days_flagged"],
        "flagged_days": [{"day": d["day"], "agent_id": d["agent_id"], "flags": [f["code"] for f in d["flags"]]}
                         for d in days["days"] if d["flags"]][:100],
        "detail": f"/v1/applicants/{applicant_id}/resolution-days?year={year}",
        "note": days["note"],
    }
