"""Facts to InfluxDB 2 (for Grafana dashboards), off the ingest path.

When configured, each accepted report's receipt puts its (agent, seq) on a bounded queue (never blocking: a full
queue drops the job, counts it and logs it); one background thread reads the report's period from the ledger,
recomputes that applicant's figures for the days the period touches from the facts tables, and writes them with
``influxdb-client``. A failed write is retried with capped exponential backoff until it succeeds or the writer is
closed. The figures are recomputed absolute values at a day's midnight (Asia/Shanghai), so a repeated write
overwrites the same point: retries and replays never double-count.

Points (measurement ``tianping_daily``, one per applicant and day, timestamp = that day's midnight in Shanghai):

- tags ``applicant``, ``protocol`` (``all``, ``opcua``, ``modbus``, ``mqtt``);
- fields ``active_devices`` (every protocol tag), and on ``protocol=all`` also ``served_enterprises``,
  ``resolutions_ok``, ``resolutions_failed``, ``registrations`` (successful creates).

Configuration (environment, or ``InfluxSettings`` directly): ``TIANPING_INFLUX_URL``, ``TIANPING_INFLUX_TOKEN``,
``TIANPING_INFLUX_ORG``, ``TIANPING_INFLUX_BUCKET``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from sqlalchemy import and_, distinct, func, select
from sqlalchemy.engine import Connection, Engine

from verifier.db import agents, device_days, entries, resolution_days
from verifier.eligibility import ACTIVE_RANK
from verifier.facts import PROTOCOL_BITS, SHANGHAI, shanghai_day

log = logging.getLogger(__name__)

MEASUREMENT = "tianping_daily"


@dataclass(frozen=True, slots=True)
class InfluxSettings:
    url: str
    token: str
    org: str
    bucket: str
    timeout_s: float = 5.0
    queue_max: int = 10_000
    retry_base_s: float = 0.5
    retry_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"influx url: expected http:// or https://, got {self.url!r}")
        if not self.org or not self.bucket:
            raise ValueError(f"influx org and bucket: expected both set, got {self.org!r} and {self.bucket!r}")
        if not 0.1 <= self.timeout_s <= 120:
            raise ValueError(f"influx timeout_s: expected 0.1 to 120, got {self.timeout_s}")
        if not 1 <= self.queue_max <= 1_000_000:
            raise ValueError(f"influx queue_max: expected 1 to 1,000,000, got {self.queue_max}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InfluxSettings | None:
        env = os.environ if environ is None else environ
        url = env.get("TIANPING_INFLUX_URL")
        if not url:
            return None
        return cls(url=url, token=env.get("TIANPING_INFLUX_TOKEN", ""), org=env.get("TIANPING_INFLUX_ORG", "tianping"),
                   bucket=env.get("TIANPING_INFLUX_BUCKET", "tianping"))


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=SHANGHAI)


def _escape_tag(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _line(applicant_id: str, protocol: str, fields: Mapping[str, int], at: datetime) -> str:
    body = ",".join(f"{k}={v}i" for k, v in fields.items())
    return (f"{MEASUREMENT},applicant={_escape_tag(applicant_id)},protocol={protocol} {body} "
            f"{int(at.timestamp())}")


def daily_points(conn: Connection, applicant_id: str, days: list[date]) -> list[str]:
    """The applicant's figures for ``days`` as InfluxDB line protocol (second precision; absolute values,
    recomputed from the facts)."""
    if not days:
        return []
    in_days = and_(device_days.c.applicant_id == applicant_id, device_days.c.day.in_(days),
                   device_days.c.status_rank == ACTIVE_RANK)
    per_day: dict[date, dict[str, Any]] = {d: {"active": 0, "served": 0, "proto": dict.fromkeys(PROTOCOL_BITS, 0),
                                               "res_ok": 0, "res_failed": 0, "creates": 0} for d in days}
    for r in conn.execute(select(device_days.c.day, func.count().label("n"),
                                 func.count(distinct(device_days.c.enterprise)).label("e"))
                          .where(in_days).group_by(device_days.c.day)):
        per_day[r.day]["active"] = int(r.n)
        per_day[r.day]["served"] = int(r.e)
    for name, bit in PROTOCOL_BITS.items():
        for r in conn.execute(select(device_days.c.day, func.count().label("n"))
                              .where(in_days, device_days.c.protocols.op("&")(bit) != 0)
                              .group_by(device_days.c.day)):
            per_day[r.day]["proto"][name] = int(r.n)
    for r in conn.execute(select(resolution_days).where(resolution_days.c.applicant_id == applicant_id,
                                                        resolution_days.c.day.in_(days))):
        per_day[r.day].update(res_ok=int(r.resolutions_ok), res_failed=int(r.resolutions_failed),
                              creates=int(r.creates_ok))
    points: list[str] = []
    for day, v in sorted(per_day.items()):
        at = _midnight(day)
        points.append(_line(applicant_id, "all", {
            "active_devices": v["active"], "served_enterprises": v["served"], "resolutions_ok": v["res_ok"],
            "resolutions_failed": v["res_failed"], "registrations": v["creates"]}, at))
        points.extend(_line(applicant_id, name, {"active_devices": n}, at) for name, n in v["proto"].items())
    return points


def days_of_entry(conn: Connection, agent_id: str, seq: int) -> tuple[str, list[date]] | None:
    """The applicant and the Shanghai days that the ledger entry (agent, seq) covers."""
    row = conn.execute(select(agents.c.applicant_id, entries.c.period_start, entries.c.period_end)
                       .select_from(entries.join(agents, entries.c.agent_id == agents.c.agent_id))
                       .where(entries.c.agent_id == agent_id, entries.c.seq == seq)).first()
    if row is None:
        return None
    first = shanghai_day(row.period_start)
    last = shanghai_day(row.period_end - timedelta(microseconds=1))
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    return row.applicant_id, days[-400:]


class FactWriter:
    """The background writer. ``notify(receipt)`` never blocks; ``close()`` stops the thread."""

    def __init__(self, engine: Engine, settings: InfluxSettings, *,
                 client_factory: Callable[[InfluxSettings], InfluxDBClient] | None = None) -> None:
        self._engine = engine
        self.settings = settings
        self._factory = client_factory or (lambda s: InfluxDBClient(url=s.url, token=s.token, org=s.org,
                                                                    timeout=int(s.timeout_s * 1000)))
        self._queue: queue.Queue[tuple[str, int] | None] = queue.Queue(maxsize=settings.queue_max)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="influx-writer", daemon=True)
        self.written_points = 0
        self.failed_writes = 0
        self.dropped = 0
        self._thread.start()

    def notify(self, receipt: Mapping[str, Any]) -> None:
        """Queue the figures of one accepted receipt for writing (drops, counts and logs when the queue is full)."""
        try:
            self._queue.put_nowait((str(receipt["agent_id"]), int(receipt["seq"])))
        except queue.Full:
            self.dropped += 1
            log.warning("influx queue full (%d jobs): dropped the figures of %r seq %s", self.settings.queue_max,
                        receipt.get("agent_id"), receipt.get("seq"))
        except (KeyError, TypeError, ValueError):
            log.warning("influx: receipt without agent_id and seq: %r", dict(receipt))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        client = self._factory(self.settings)
        write_api = client.write_api(write_options=SYNCHRONOUS)
        try:
            while not self._stop.is_set():
                job = self._queue.get()
                if job is None:
                    break
                self._write_job(write_api, *job)
        finally:
            client.close()  # type: ignore[no-untyped-call]

    def _write_job(self, write_api: Any, agent_id: str, seq: int) -> None:
        try:
            with self._engine.connect() as conn:
                found = days_of_entry(conn, agent_id, seq)
                if found is None:
                    log.warning("influx: no ledger entry for %r seq %d", agent_id, seq)
                    return
                points = daily_points(conn, *found)
        except Exception:  # a database hiccup must not kill the writer thread; the next report refreshes the day
            log.exception("influx: reading the facts of %r seq %d failed", agent_id, seq)
            return
        attempt = 0
        while not self._stop.is_set():
            try:
                write_api.write(bucket=self.settings.bucket, org=self.settings.org, record=points,
                                write_precision="s")
                self.written_points += len(points)
                return
            except Exception as exc:  # any transport or HTTP error is retried; it never reaches ingestion
                self.failed_writes += 1
                wait = min(self.settings.retry_max_s, self.settings.retry_base_s * 2 ** min(attempt, 20))
                log.warning("influx write of %d points failed (%s: %s); retrying in %.1f s", len(points),
                            type(exc).__name__, str(exc)[:200], wait)
                attempt += 1
                self._stop.wait(wait)
