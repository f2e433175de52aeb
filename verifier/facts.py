"""Facts derived from each accepted report, per applicant, at ingest: device-days, resolution-days and device
aliases. Days are calendar days in Asia/Shanghai.

``derive_facts`` is pure; ``write_facts`` upserts inside the ingest transaction (a device-day keeps the best
status seen, the union of protocols and the first known enterprise; resolution-days add up). The upserts use
``INSERT … ON CONFLICT`` of the connection's dialect (SQLite or PostgreSQL).
"""

from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Date, case, func, inspect, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from protocol.report import STATUS_RANK, ReportV1
from verifier.db import device_aliases, device_days, device_days_by_fp, evaluations, resolution_days
from verifier.eligibility import (
    ACTIVE_RANK,
    ApplicantFacts,
    DeviceYear,
    ResolutionDay,
    Verdict,
    evaluate,
    window_bounds,
)
from verifier.enroll import get_applicant
from verifier.gates import gates_for_facts
from verifier.rules import Policy

log = logging.getLogger(__name__)

SHANGHAI = ZoneInfo("Asia/Shanghai")
PROTOCOL_BITS: dict[str, int] = {"opcua": 1, "modbus": 2, "mqtt": 4}
LONG_WINDOW_DAYS = 180  # windows this long read device-days through the covering index (see _device_rows)
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


def _device_days_of(period_days: tuple[date, date], first_seen: datetime, last_seen: datetime) -> list[date]:
    """The day(s) a device entry counts for: the period's day, or, for a period that crosses midnight in
    Asia/Shanghai, the days of first_seen and last_seen."""
    start_day, end_day = period_days
    if start_day == end_day:
        return [start_day]
    return sorted({shanghai_day(first_seen), shanghai_day(last_seen)})


def derive_facts(report: ReportV1, applicant_id: str) -> ReportFacts:
    """The facts one report contributes to its applicant (pure)."""
    days: dict[tuple[date, str], DeviceDayFact] = {}
    aliases: list[AliasFact] = []
    period_days = (shanghai_day(report.period.start), shanghai_day(report.period.end - timedelta(microseconds=1)))
    for dev in report.devices:
        bits = 0
        for proto in dev.protocols:
            bits |= PROTOCOL_BITS[proto]
        dev_days = _device_days_of(period_days, dev.first_seen, dev.last_seen)
        for day in dev_days:
            days[(day, dev.fp)] = DeviceDayFact(applicant_id, day, dev.fp, dev.enterprise, bits,
                                                STATUS_RANK[dev.status])
        aliases.extend(AliasFact(applicant_id, dev.fp, alias, dev_days[0]) for alias in dev.aliases if alias != dev.fp)
    sums: dict[date, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    if report.resolution is not None:
        # With a registration source, new registrations come from the node's registry (a real create, never an
        # overwrite); the op-100 buckets are then only what the access log saw (shown beside, not counted).
        registry = report.resolution.registrations_source is not None
        for bucket in report.resolution.buckets:
            row = sums[shanghai_day(bucket.minute)]  # a day with only uncounted traffic still appears
            if bucket.op == OP_RESOLVE:
                row[0 if bucket.resp == RESP_OK else 1] += bucket.count
            elif bucket.op == OP_CREATE and bucket.resp == RESP_OK:
                if not registry:
                    row[2] += bucket.count
            elif bucket.op == OP_DELETE and bucket.resp == RESP_OK:
                row[3] += bucket.count
        for reg in report.resolution.registrations:
            sums[reg.day][2] += reg.registrations
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


CompactFacts = tuple[tuple[tuple[int, str, str | None, int, int], ...], tuple[tuple[int, int, int, int, int], ...],
                     tuple[tuple[str, str, int], ...]]


def compact_facts(facts: ReportFacts) -> CompactFacts:
    """One report's facts as plain tuples, days as ordinals, no applicant: cheap to pickle between processes."""
    return (tuple((f.day.toordinal(), f.fp, f.enterprise, f.protocols, f.status_rank) for f in facts.device_days),
            tuple((r.day.toordinal(), r.resolutions_ok, r.resolutions_failed, r.creates_ok, r.deletes_ok)
                  for r in facts.resolution_days),
            tuple((a.fp, a.alias, a.first_day.toordinal()) for a in facts.aliases))


@functools.lru_cache(maxsize=4096)
def _ordinal_day(ordinal: int) -> date:
    return date.fromordinal(ordinal)


class FactBatch:
    """The facts of several reports, combined as their upserts would combine them one after the other (a device-day's
    highest status, the union of its protocols, its first known enterprise; resolution counts summed; an alias's
    first day), so that one multi-row upsert per table writes them: a multi-row upsert may not touch a row twice."""

    def __init__(self) -> None:
        self._devices: dict[tuple[str, date, str], list[Any]] = {}
        self._resolution: dict[tuple[str, date], list[int]] = {}
        self._aliases: dict[tuple[str, str, str], date] = {}

    def add_compact(self, applicant_id: str, compact: CompactFacts) -> None:
        """Add one report's facts in the compact form :func:`compact_facts` gives (what worker processes return)."""
        devices, resolution, aliases = compact
        day = _ordinal_day
        self._add(((applicant_id, day(d), fp, e, p, r) for d, fp, e, p, r in devices),
                  ((applicant_id, day(r[0]), r[1], r[2], r[3], r[4]) for r in resolution),
                  ((applicant_id, fp, alias, day(d)) for fp, alias, d in aliases))

    def add(self, facts: ReportFacts, applicant_id: str | None = None) -> None:
        """Add one report's facts, for ``applicant_id`` when given (else the applicant the facts name)."""
        self._add(((applicant_id or f.applicant_id, f.day, f.fp, f.enterprise, f.protocols, f.status_rank)
                   for f in facts.device_days),
                  ((applicant_id or r.applicant_id, r.day, r.resolutions_ok, r.resolutions_failed, r.creates_ok,
                    r.deletes_ok) for r in facts.resolution_days),
                  ((applicant_id or a.applicant_id, a.fp, a.alias, a.first_day) for a in facts.aliases))

    def _add(self, devices: Iterable[tuple[str, date, str, str | None, int, int]],
             resolution: Iterable[tuple[str, date, int, int, int, int]],
             aliases: Iterable[tuple[str, str, str, date]]) -> None:
        for applicant, day, fp, enterprise, protocols, rank in devices:
            row = self._devices.get((applicant, day, fp))
            if row is None:
                self._devices[(applicant, day, fp)] = [enterprise, protocols, rank]
            else:
                row[0] = row[0] if row[0] is not None else enterprise
                row[1] |= protocols
                row[2] = max(row[2], rank)
        for applicant, day, ok, failed, creates, deletes in resolution:
            sums = self._resolution.setdefault((applicant, day), [0, 0, 0, 0])
            sums[0] += ok
            sums[1] += failed
            sums[2] += creates
            sums[3] += deletes
        for applicant, fp, alias, day in aliases:
            self._aliases.setdefault((applicant, fp, alias), day)

    def write(self, conn: Connection) -> None:
        """Upsert the combined facts (inside the caller's ingest transaction)."""
        if self._devices:
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
            rows = [{"applicant_id": a, "day": d, "fp": fp, "enterprise": e, "protocols": p, "status_rank": r}
                    for (a, d, fp), (e, p, r) in self._devices.items()]
            for chunk in _chunks(rows):
                conn.execute(stmt, list(chunk))
        if self._resolution:
            stmt = _insert_for(conn, resolution_days)
            stmt = stmt.on_conflict_do_update(
                index_elements=[resolution_days.c.applicant_id, resolution_days.c.day],
                set_={name: getattr(resolution_days.c, name) + getattr(stmt.excluded, name)
                      for name in ("resolutions_ok", "resolutions_failed", "creates_ok", "deletes_ok")},
            )
            conn.execute(stmt, [{"applicant_id": a, "day": d, "resolutions_ok": ok, "resolutions_failed": failed,
                                 "creates_ok": creates, "deletes_ok": deletes}
                                for (a, d), (ok, failed, creates, deletes) in self._resolution.items()])
        if self._aliases:
            stmt = _insert_for(conn, device_aliases).on_conflict_do_nothing(
                index_elements=[device_aliases.c.applicant_id, device_aliases.c.fp, device_aliases.c.alias])
            rows = [{"applicant_id": a, "fp": fp, "alias": alias, "first_day": day}
                    for (a, fp, alias), day in self._aliases.items()]
            for chunk in _chunks(rows):
                conn.execute(stmt, list(chunk))


def write_facts(conn: Connection, facts: ReportFacts) -> None:
    """Upsert one report's facts (inside the caller's ingest transaction)."""
    batch = FactBatch()
    batch.add(facts)
    batch.write(conn)


def fp_ordered(conn: Connection, long_window: bool) -> tuple[Any, Any]:
    """The day column to filter on and a function that adds the index hint, for a per-device GROUP BY.

    On SQLite, a long window reads device-days through the covering index ``ix_device_days_by_fp`` in fp order: no
    sort of millions of rows. SQLite's planner would rather take the primary key's day range and sort (or, with
    statistics, skip-scan the index and still sort), so the query names the index and keeps the day terms off it
    (``+day``: filtered per row). PostgreSQL plans a hash aggregate on its own. A database created before the index
    existed keeps the default plan."""
    if not long_window or conn.dialect.name != "sqlite" or device_days_by_fp.name not in {
            ix["name"] for ix in inspect(conn).get_indexes(device_days.name)}:
        return device_days.c.day, lambda q: q
    day = literal_column(f"+{device_days.name}.day", type_=Date)
    return day, lambda q: q.with_hint(device_days, f"INDEXED BY {device_days_by_fp.name}", dialect_name="sqlite")


def _device_rows(conn: Connection, applicant_id: str, start: date, end: date, year: int) -> list[DeviceYear]:
    """Per-device summaries of one applicant over [start, end] (one GROUP BY)."""
    active = device_days.c.status_rank == ACTIVE_RANK
    day, hint = fp_ordered(conn, (end - start).days >= LONG_WINDOW_DAYS)
    query = hint(
        select(
            device_days.c.fp,
            func.sum(case((active, 1), else_=0)).label("active_days"),
            func.max(case((active, device_days.c.day), else_=None), type_=Date).label("last_active_day"),
            func.max(device_days.c.status_rank).label("best_status_rank"),
            func.max(device_days.c.enterprise).label("enterprise"),
        )
        .where(device_days.c.applicant_id == applicant_id, day >= start, day <= end)
        .group_by(device_days.c.fp)
    )
    rows = conn.execute(query)
    return [DeviceYear(fp=r.fp, year=year, active_days=int(r.active_days or 0), last_active_day=r.last_active_day,
                       best_status_rank=int(r.best_status_rank), enterprise=r.enterprise) for r in rows]


def _needs_earlier_years(policy: Policy | None, kind: str) -> bool:
    if policy is None:
        return True
    measures = set(policy.measures_for(kind))
    return any(c.metric in ("new_devices", "new_users") for c in policy.criteria if c.measure in measures)


def load_applicant_facts(conn: Connection, applicant_id: str, name: str, kind: str, year: int, *,
                         policy: Policy | None = None, as_of: date | None = None,
                         evidence: dict[str, Any] | None = None) -> ApplicantFacts:
    """Read what ``verifier.eligibility.evaluate`` needs for one applicant: per-device yearly summaries for the
    assessment year (and every earlier year with facts when the policy counts "new" devices or users), per-device
    summaries for every other window the policy's criteria name, the resolution-days those windows cover, what
    officials recorded, and the awards paid in earlier years' stored evaluations."""
    first_day = conn.execute(select(func.min(device_days.c.day))
                             .where(device_days.c.applicant_id == applicant_id)).scalar_one_or_none()
    first_res = conn.execute(select(func.min(resolution_days.c.day))
                             .where(resolution_days.c.applicant_id == applicant_id)).scalar_one_or_none()
    firsts = [d for d in (first_day, first_res) if isinstance(d, date)]
    first = min(firsts) if firsts else None
    first_year = min(first_day.year, year) if isinstance(first_day, date) and _needs_earlier_years(policy, kind) \
        else year
    devices: list[DeviceYear] = []
    loaded = set(range(first_year, year + 1))
    for y in range(first_year, year + 1):
        devices.extend(_device_rows(conn, applicant_id, date(y, 1, 1), date(y, 12, 31), y))
    gates, go_live = gates_for_facts(conn, applicant_id)
    windows: dict[tuple[date, date], list[DeviceYear]] = {}
    res_from, res_to = date(year, 1, 1), date(year, 12, 31)
    if policy is not None:
        measures = set(policy.measures_for(kind))
        for c in policy.criteria:
            if c.measure not in measures or c.kind != "measured":
                continue
            w = window_bounds(c.window, year, as_of=as_of, first_day=first, go_live=go_live)
            res_from, res_to = min(res_from, w.start), max(res_to, w.end)
            calendar = w.start == date(w.start.year, 1, 1) and w.end.year == w.start.year
            if calendar and w.start.year not in loaded:
                loaded.add(w.start.year)
                devices.extend(_device_rows(conn, applicant_id, w.start, date(w.start.year, 12, 31), w.start.year))
            elif not calendar and (w.start, w.end) not in windows:
                windows[(w.start, w.end)] = _device_rows(conn, applicant_id, w.start, w.end, w.end.year)
    res_rows = conn.execute(
        select(resolution_days).where(resolution_days.c.applicant_id == applicant_id,
                                      resolution_days.c.day >= res_from, resolution_days.c.day <= res_to)
        .order_by(resolution_days.c.day)
    )
    resolution = [ResolutionDay(day=r.day, resolutions_ok=int(r.resolutions_ok),
                                resolutions_failed=int(r.resolutions_failed), creates_ok=int(r.creates_ok),
                                deletes_ok=int(r.deletes_ok)) for r in res_rows]
    awarded: dict[str, list[int]] = {}
    awarded_total = Decimal(0)
    if policy is not None:
        for row in conn.execute(select(evaluations.c.year, evaluations.c.verdict).where(
                evaluations.c.applicant_id == applicant_id, evaluations.c.policy_id == policy.id,
                evaluations.c.year < year)):
            for a in json.loads(row.verdict).get("awards", []):
                paid = Decimal(a.get("payable_yuan") or "0")
                if paid > 0:
                    awarded.setdefault(a["id"], []).append(int(row.year))
                    awarded_total += paid
    return ApplicantFacts(applicant_id=applicant_id, name=name, kind=kind, devices=devices,
                          resolution_days=resolution, gates=gates, window_devices=windows, first_day=first,
                          go_live=go_live, awarded_before={k: tuple(sorted(v)) for k, v in awarded.items()},
                          awarded_total_before_yuan=awarded_total, evidence=evidence or {})


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


def applicant_verdict(engine: Engine, policy: Policy, applicant_id: str, year: int, *, as_of: date,
                      snapshot: Callable[[Connection], dict[str, Any]] | None = None) -> Verdict:
    """Query one applicant's facts and evaluate them (the pure ``evaluate``) for a calendar year. ``snapshot`` names
    the evidence (ledger size, checkpoint) read in the same transaction as the facts."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":  # one snapshot for the evidence and every fact (SQLite: one transaction)
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        applicant = get_applicant(conn, applicant_id)
        evidence = snapshot(conn) if snapshot is not None else None
        facts = load_applicant_facts(conn, applicant.id, applicant.name, applicant.kind, year, policy=policy,
                                     as_of=as_of, evidence=evidence)
    return evaluate(policy, facts, year, as_of=as_of)
