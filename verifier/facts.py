"""Facts derived from each accepted report, per applicant, at ingest: device-days, resolution-days and device
aliases. Days are calendar days in Asia/Shanghai.

``derive_facts`` is pure; ``write_facts`` upserts inside the ingest transaction (a device-day keeps the best
status seen, the union of protocols and the first known enterprise; resolution-days add up). The upserts use
``INSERT … ON CONFLICT`` of the connection's dialect (SQLite or PostgreSQL).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Date, case, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from protocol.report import STATUS_RANK, ReportV1
from verifier.db import device_aliases, device_days, resolution_days
from verifier.eligibility import ACTIVE_RANK, ApplicantFacts, DeviceYear, ResolutionDay, Verdict, evaluate
from verifier.enroll import get_applicant
from verifier.rules import Policy

log = logging.getLogger(__name__)

SHANGHAI = ZoneInfo("Asia/Shanghai")
PROTOCOL_BITS: dict[str, int] = {"opcua": 1, "modbus": 2, "mqtt": 4}
OP_RESOLVE = 1
OP_CREATE = 100
OP_DELETE = 101
RESP_OK = 1


def shanghai_day(moment: datetime) -> date:
    return moment.astimezone(SHANGHAI).date()


def protocol_names(bits: int) -> list[str]:
    return [name for name, bit in PROTOCOL_BITS.items() if bits & bit]


@dataclass(frozen=True, slots=True)
class DeviceDayFact:
    applicant_id: str
    day: date
    fp: str
    enterprise: str | None
    protocols: int
    status_rank: int


@dataclass(frozen=True, slots=True)
class ResolutionDayFact:
    applicant_id: str
    day: date
    resolutions_ok: int = 0
    resolutions_failed: int = 0
    creates_ok: int = 0
    deletes_ok: int = 0


@dataclass(frozen=True, slots=True)
class AliasFact:
    applicant_id: str
    fp: str
    alias: str
    first_day: date


@dataclass(frozen=True, slots=True)
class ReportFacts:
    device_days: tuple[DeviceDayFact, ...]
    resolution_days: tuple[ResolutionDayFact, ...]
    aliases: tuple[AliasFact, ...]


def _device_days_of(report: ReportV1, first_seen: datetime, last_seen: datetime) -> list[date]:
    """The day(s) a device entry counts for: the period's day, or, for a period that crosses midnight in
    Asia/Shanghai, the days of first_seen and last_seen."""
    start_day = shanghai_day(report.period.start)
    end_day = shanghai_day(report.period.end - timedelta(microseconds=1))
    if start_day == end_day:
        return [start_day]
    return sorted({shanghai_day(first_seen), shanghai_day(last_seen)})


def derive_facts(report: ReportV1, applicant_id: str) -> ReportFacts:
    """The facts one report contributes to its applicant (pure)."""
    days: dict[tuple[date, str], DeviceDayFact] = {}
    aliases: list[AliasFact] = []
    for dev in report.devices:
        bits = 0
        for proto in dev.protocols:
            bits |= PROTOCOL_BITS[proto]
        dev_days = _device_days_of(report, dev.first_seen, dev.last_seen)
        for day in dev_days:
            days[(day, dev.fp)] = DeviceDayFact(applicant_id, day, dev.fp, dev.enterprise, bits,
                                                STATUS_RANK[dev.status])
        aliases.extend(AliasFact(applicant_id, dev.fp, alias, dev_days[0]) for alias in dev.aliases if alias != dev.fp)
    sums: dict[date, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    if report.resolution is not None:
        for bucket in report.resolution.buckets:
            row = sums[shanghai_day(bucket.minute)]  # a day with only uncounted traffic still appears
            if bucket.op == OP_RESOLVE:
                row[0 if bucket.resp == RESP_OK else 1] += bucket.count
            elif bucket.op == OP_CREATE and bucket.resp == RESP_OK:
                row[2] += bucket.count
            elif bucket.op == OP_DELETE and bucket.resp == RESP_OK:
                row[3] += bucket.count
    resolution = tuple(ResolutionDayFact(applicant_id, day, *values) for day, values in sorted(sums.items()))
    return ReportFacts(device_days=tuple(days.values()), resolution_days=resolution, aliases=tuple(aliases))


def _insert_for(conn: Connection, table: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"database dialect: expected sqlite or postgresql, got {conn.dialect.name!r}")


def _chunks(rows: Sequence[dict[str, Any]], size: int = 2000) -> Iterable[Sequence[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def write_facts(conn: Connection, facts: ReportFacts) -> None:
    """Upsert one report's facts (inside the caller's ingest transaction)."""
    if facts.device_days:
        stmt = _insert_for(conn, device_days)
        stmt = stmt.on_conflict_do_update(
            index_elements=[device_days.c.applicant_id, device_days.c.day, device_days.c.fp],
            set_={
                "status_rank": case((stmt.excluded.status_rank > device_days.c.status_rank,
                                     stmt.excluded.status_rank), else_=device_days.c.status_rank),
                "protocols": device_days.c.protocols.op("|")(stmt.excluded.protocols),
                "enterprise": func.coalesce(device_days.c.enterprise, stmt.excluded.enterprise),
            },
        )
        rows = [{"applicant_id": f.applicant_id, "day": f.day, "fp": f.fp, "enterprise": f.enterprise,
                 "protocols": f.protocols, "status_rank": f.status_rank} for f in facts.device_days]
        for chunk in _chunks(rows):
            conn.execute(stmt, list(chunk))
    if facts.resolution_days:
        stmt = _insert_for(conn, resolution_days)
        stmt = stmt.on_conflict_do_update(
            index_elements=[resolution_days.c.applicant_id, resolution_days.c.day],
            set_={name: getattr(resolution_days.c, name) + getattr(stmt.excluded, name)
                  for name in ("resolutions_ok", "resolutions_failed", "creates_ok", "deletes_ok")},
        )
        conn.execute(stmt, [{"applicant_id": f.applicant_id, "day": f.day, "resolutions_ok": f.resolutions_ok,
                             "resolutions_failed": f.resolutions_failed, "creates_ok": f.creates_ok,
                             "deletes_ok": f.deletes_ok} for f in facts.resolution_days])
    if facts.aliases:
        stmt = _insert_for(conn, device_aliases).on_conflict_do_nothing(
            index_elements=[device_aliases.c.applicant_id, device_aliases.c.fp, device_aliases.c.alias])
        rows = [{"applicant_id": a.applicant_id, "fp": a.fp, "alias": a.alias, "first_day": a.first_day}
                for a in facts.aliases]
        for chunk in _chunks(rows):
            conn.execute(stmt, list(chunk))


def load_applicant_facts(conn: Connection, applicant_id: str, name: str, kind: str, year: int) -> ApplicantFacts:
    """Read what ``verifier.eligibility.evaluate`` needs for one applicant: per-device yearly summaries for the
    assessment year and every earlier year with facts, and the year's resolution-days."""
    first_day = conn.execute(select(func.min(device_days.c.day))
                             .where(device_days.c.applicant_id == applicant_id)).scalar_one_or_none()
    first_year = min(first_day.year, year) if isinstance(first_day, date) else year
    active = device_days.c.status_rank == ACTIVE_RANK
    devices: list[DeviceYear] = []
    for y in range(first_year, year + 1):
        rows = conn.execute(
            select(
                device_days.c.fp,
                func.sum(case((active, 1), else_=0)).label("active_days"),
                func.max(case((active, device_days.c.day), else_=None), type_=Date).label("last_active_day"),
                func.max(device_days.c.status_rank).label("best_status_rank"),
                func.max(device_days.c.enterprise).label("enterprise"),
            )
            .where(device_days.c.applicant_id == applicant_id,
                   device_days.c.day >= date(y, 1, 1), device_days.c.day <= date(y, 12, 31))
            .group_by(device_days.c.fp)
        )
        devices.extend(DeviceYear(fp=r.fp, year=y, active_days=int(r.active_days or 0),
                                  last_active_day=r.last_active_day, best_status_rank=int(r.best_status_rank),
                                  enterprise=r.enterprise) for r in rows)
    res_rows = conn.execute(
        select(resolution_days).where(resolution_days.c.applicant_id == applicant_id,
                                      resolution_days.c.day >= date(year, 1, 1),
                                      resolution_days.c.day <= date(year, 12, 31))
        .order_by(resolution_days.c.day)
    )
    resolution = [ResolutionDay(day=r.day, resolutions_ok=int(r.resolutions_ok),
                                resolutions_failed=int(r.resolutions_failed), creates_ok=int(r.creates_ok),
                                deletes_ok=int(r.deletes_ok)) for r in res_rows]
    return ApplicantFacts(applicant_id=applicant_id, name=name, kind=kind, devices=devices,
                          resolution_days=resolution)


@dataclass(frozen=True, slots=True)
class FactCounts:
    """A summary of everything derived so far (tests use it to show that a refusal changed nothing)."""

    device_days: int
    device_aliases: int
    resolution_days: int
    resolutions_ok: int


def fact_counts(conn: Connection) -> FactCounts:
    return FactCounts(
        device_days=int(conn.execute(select(func.count()).select_from(device_days)).scalar_one()),
        device_aliases=int(conn.execute(select(func.count()).select_from(device_aliases)).scalar_one()),
        resolution_days=int(conn.execute(select(func.count()).select_from(resolution_days)).scalar_one()),
        resolutions_ok=int(conn.execute(select(func.coalesce(func.sum(resolution_days.c.resolutions_ok), 0)))
                           .scalar_one()),
    )


def applicant_verdict(engine: Engine, policy: Policy, applicant_id: str, year: int, *, as_of: date) -> Verdict:
    """Query one applicant's facts and evaluate them (the pure ``evaluate``) for a calendar year."""
    with engine.connect() as conn:
        applicant = get_applicant(conn, applicant_id)
        facts = load_applicant_facts(conn, applicant.id, applicant.name, applicant.kind, year)
    return evaluate(policy, facts, year, as_of=as_of)
