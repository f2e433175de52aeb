"""Read-only queries behind the console's pages: daily series for the charts, agents and their health, and the
hash-selected spot-check sample. They read the facts, ledger and agents tables; they never write."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, distinct, func, select
from sqlalchemy.engine import Connection

from verifier.db import agents, device_days, enterprises, entries, key_events, resolution_days
from verifier.eligibility import ACTIVE_RANK
from verifier.facts import SHANGHAI, protocol_names
from verifier.ledger import ledger_head

log = logging.getLogger(__name__)

SPOT_CHECK_SIZE = 20


@dataclass(frozen=True, slots=True)
class Series:
    """Values by calendar day (Asia/Shanghai); days without a row are zero."""

    points: dict[date, int]

    def on(self, day: date) -> int:
        return self.points.get(day, 0)


@dataclass(frozen=True, slots=True)
class YearSeries:
    active_devices: Series
    served_enterprises: Series
    resolutions: Series
    new_devices_cumulative: Series
    new_users_cumulative: Series


def _year_bounds(year: int) -> tuple[date, date]:
    return date(year, 1, 1), date(year, 12, 31)


def year_series(conn: Connection, applicant_id: str, year: int) -> YearSeries:
    """The daily figures the applicant page charts."""
    first, last = _year_bounds(year)
    in_year = and_(device_days.c.applicant_id == applicant_id, device_days.c.day >= first,
                   device_days.c.day <= last, device_days.c.status_rank == ACTIVE_RANK)
    active = {r.day: int(r.n) for r in conn.execute(
        select(device_days.c.day, func.count().label("n")).where(in_year).group_by(device_days.c.day))}
    served = {r.day: int(r.n) for r in conn.execute(
        select(device_days.c.day, func.count(distinct(device_days.c.enterprise)).label("n"))
        .where(in_year, device_days.c.enterprise.is_not(None)).group_by(device_days.c.day))}
    resolved = {r.day: int(r.resolutions_ok) for r in conn.execute(
        select(resolution_days.c.day, resolution_days.c.resolutions_ok)
        .where(resolution_days.c.applicant_id == applicant_id, resolution_days.c.day >= first,
               resolution_days.c.day <= last))}
    before = and_(device_days.c.applicant_id == applicant_id, device_days.c.day < first,
                  device_days.c.status_rank == ACTIVE_RANK)
    old_fps = {r.fp for r in conn.execute(select(device_days.c.fp).where(before).distinct())}
    old_ents = {r.enterprise for r in conn.execute(select(device_days.c.enterprise).where(before).distinct())}
    firsts = conn.execute(select(device_days.c.fp, func.min(device_days.c.day).label("d"),
                                 func.max(device_days.c.enterprise).label("e")).where(in_year)
                          .group_by(device_days.c.fp)).all()
    new_devices: dict[date, int] = {}
    first_of_enterprise: dict[str, date] = {}
    for r in firsts:
        if r.fp not in old_fps:
            new_devices[r.d] = new_devices.get(r.d, 0) + 1
        if r.e and r.e not in old_ents and (r.e not in first_of_enterprise or r.d < first_of_enterprise[r.e]):
            first_of_enterprise[r.e] = r.d
    new_users: dict[date, int] = {}
    for d in first_of_enterprise.values():
        new_users[d] = new_users.get(d, 0) + 1
    return YearSeries(Series(active), Series(served), Series(resolved), Series(_cumulative(new_devices)),
                      Series(_cumulative(new_users)))


def _cumulative(by_day: dict[date, int]) -> dict[date, int]:
    out: dict[date, int] = {}
    total = 0
    for day in sorted(by_day):
        total += by_day[day]
        out[day] = total
    return out


def fill_cumulative(series: Series, first: date, last: date) -> list[int]:
    """A cumulative series as one value per day from ``first`` to ``last`` (carrying the last value forward)."""
    values: list[int] = []
    current = 0
    day = first
    while day <= last:
        current = series.points.get(day, current)
        values.append(current)
        day += timedelta(days=1)
    return values


@dataclass(frozen=True, slots=True)
class SpotCheckDevice:
    fp: str
    enterprise: str | None
    enterprise_name: str | None
    last_active_day: date | None
    protocols: list[str]
    active_days: int


@dataclass(frozen=True, slots=True)
class SpotCheck:
    salt: str
    devices: list[SpotCheckDevice]
    population: int


def spot_check(conn: Connection, applicant_id: str, year: int, *, size: int = SPOT_CHECK_SIZE) -> SpotCheck:
    """A hash-selected sample of the year's active devices to re-probe on site.

    The ranking key is SHA-256(salt | fp) with the salt taken from the ledger's head (its last leaf hash), so the
    operator cannot know in advance which devices an inspector will ask for, and anyone holding the same ledger
    can re-derive the same list."""
    head = ledger_head(conn)
    salt = f"{head.last_leaf_hash or 'empty-ledger'}:{applicant_id}:{year}"
    first, last = _year_bounds(year)
    rows = conn.execute(
        select(device_days.c.fp, func.max(device_days.c.enterprise).label("enterprise"),
               func.max(device_days.c.day).label("last_day"), func.count().label("days"),
               func.max(device_days.c.protocols).label("protocols"))
        .where(device_days.c.applicant_id == applicant_id, device_days.c.day >= first, device_days.c.day <= last,
               device_days.c.status_rank == ACTIVE_RANK)
        .group_by(device_days.c.fp)).all()
    names = {r.uscc: r.name for r in conn.execute(select(enterprises.c.uscc, enterprises.c.name)
                                                   .where(enterprises.c.applicant_id == applicant_id))}

    def rank(fp: str) -> str:
        return hashlib.sha256(f"{salt}|{fp}".encode()).hexdigest()

    chosen = sorted(rows, key=lambda r: rank(r.fp))[:size]
    devices = [SpotCheckDevice(fp=r.fp, enterprise=r.enterprise, enterprise_name=names.get(r.enterprise or ""),
                               last_active_day=r.last_day, protocols=protocol_names(int(r.protocols or 0)),
                               active_days=int(r.days)) for r in chosen]
    return SpotCheck(salt=salt, devices=devices, population=len(rows))


@dataclass(frozen=True, slots=True)
class ConnectorHealth:
    kind: str
    source: str
    errors: dict[str, int]


@dataclass(frozen=True, slots=True)
class AgentView:
    agent_id: str
    name: str
    applicant_id: str
    enterprise: str | None
    key_id: str
    enrolled_at: datetime
    revoked_at: datetime | None
    last_report_at: datetime | None
    reports: int
    stale: bool
    outbox_depth: int | None
    connectors: list[ConnectorHealth] = field(default_factory=list)
    last_key_event: str | None = None

    @property
    def error_total(self) -> int:
        return sum(sum(c.errors.values()) for c in self.connectors)


def _payload_of(envelope: bytes) -> dict[str, Any] | None:
    """The payload of a stored (already verified) envelope; None if it cannot be read."""
    try:
        outer = json.loads(envelope)
        payload = json.loads(base64.b64decode(outer["payload"]))
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return payload if isinstance(payload, dict) else None


def agent_views(conn: Connection, applicant_id: str, *, now: datetime, stale_after: timedelta) -> list[AgentView]:
    """The applicant's agents with their last report, connector errors (from that report) and key status.

    An agent is stale when it is not revoked and sent nothing for ``stale_after`` (or never sent anything)."""
    views: list[AgentView] = []
    for row in conn.execute(select(agents).where(agents.c.applicant_id == applicant_id)
                            .order_by(agents.c.name, agents.c.agent_id)):
        last = conn.execute(select(entries.c.envelope).where(entries.c.agent_id == row.agent_id)
                            .order_by(entries.c.seq.desc()).limit(1)).scalar_one_or_none()
        payload = _payload_of(bytes(last)) if last is not None else None
        connectors: list[ConnectorHealth] = []
        outbox_depth: int | None = None
        if payload is not None:
            for c in payload.get("connectors", ()):
                if isinstance(c, dict):
                    errors = {str(k): int(v) for k, v in dict(c.get("errors", {})).items()}
                    connectors.append(ConnectorHealth(str(c.get("kind", "?")), str(c.get("source", "?")), errors))
            depth = payload.get("outbox_depth")  # reported only by agents whose report carries it
            outbox_depth = depth if isinstance(depth, int) else None
        event = conn.execute(select(key_events.c.event, key_events.c.at).where(key_events.c.agent_id == row.agent_id)
                             .order_by(key_events.c.id.desc()).limit(1)).first()
        stale = row.revoked_at is None and (row.last_report_at is None or now - row.last_report_at > stale_after)
        views.append(AgentView(
            agent_id=row.agent_id, name=row.name, applicant_id=row.applicant_id, enterprise=row.enterprise_uscc,
            key_id=row.key_id, enrolled_at=row.enrolled_at, revoked_at=row.revoked_at,
            last_report_at=row.last_report_at, reports=int(row.next_seq) - 1, stale=stale,
            outbox_depth=outbox_depth, connectors=connectors, last_key_event=event.event if event else None))
    return views


def ledger_entries_of(conn: Connection, applicant_id: str, year: int) -> tuple[int, int]:
    """How many ledger entries the applicant's agents contributed in ``year`` (by period start), and how many of
    them were late."""
    start = datetime(year, 1, 1, tzinfo=SHANGHAI)
    end = datetime(year + 1, 1, 1, tzinfo=SHANGHAI)
    row = conn.execute(
        select(func.count().label("n"), func.coalesce(func.sum(case((entries.c.late, 1), else_=0)), 0).label("late"))
        .select_from(entries.join(agents, entries.c.agent_id == agents.c.agent_id))
        .where(agents.c.applicant_id == applicant_id, entries.c.period_start >= start,
               entries.c.period_start < end)).one()
    return int(row.n), int(row.late)


def enterprises_of(conn: Connection, applicant_id: str) -> Sequence[Any]:
    return conn.execute(select(enterprises.c.uscc, enterprises.c.name)
                        .where(enterprises.c.applicant_id == applicant_id).order_by(enterprises.c.uscc)).all()
