"""A registration source: the node's own registry, which knows a real create from an overwrite.

The access log cannot tell them apart (a REST ``PUT`` over a live handle logs as a create, opCode 100, respCode 1).
When the node's registry is reachable, :class:`SqlRegistrationSource` reads new registrations from it instead:

- a SQL query (SQLAlchemy URL; PostgreSQL and SQLite tested) returning ``(handle, created_at)`` rows created at or
  after a watermark, bound as ``:since`` (an aware UTC datetime), ``:since_epoch`` (float seconds since 1970-01-01
  UTC) or ``:since_iso`` (ISO 8601 text in UTC, ``2026-11-26 02:00:00.000000+00:00``): whichever the query names;
- polled once per collection round, inside a read-only transaction (PostgreSQL ``SET TRANSACTION READ ONLY``,
  SQLite ``PRAGMA query_only``);
- the **watermark** is the latest ``created_at`` seen; the handles seen at or after ``watermark - lookback_s`` are
  kept with it (at least the ties at the watermark instant), so the next query (``>= :since``) returns them again
  and they are dropped: a restart, a tie or a row returned twice never counts twice, and a row committed late at
  the watermark instant is not missed. Rows older than that window are already counted (or committed too late to
  tell): they are skipped and counted as ``registry_row_late``;
- the checkpoint (watermark + kept handles) is written atomically, only when the caller commits (the agent does so
  once the report carrying the registrations is in its outbox), so a crash in between reads them again;
- ``created_at`` values: aware datetimes, ISO 8601 text, or numbers (seconds since the epoch, UTC). A value
  without a zone is read in ``naive_timezone`` when that is configured, **refused** otherwise (the poll fails and
  the round becomes a registration gap; nothing is guessed);
- a registry that cannot be reached (or a query that fails) is a **gap** for registrations: no data, never zero.
  The watermark stays where it was, so the rows of the outage arrive with the next successful poll.

Samples: a new registration is sampled under the verifier-issued salt when the first 8 bytes (big-endian) of
``HMAC-SHA256(salt, "tianping/registration-sample/v1" || 0x00 || handle UTF-8)`` are below
``2**(64 - registration_sample_log2)``; the verifier recomputes the choice from the handle
(:func:`registry_sampled`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from connectors.base import ConfigError, ConnectorError, optional, refuse_unknown, require

log = logging.getLogger(__name__)

__all__ = [
    "REGISTRY_SAMPLE_LABEL",
    "RegistrationCheckpointError",
    "RegistrationConfig",
    "RegistrationDayBatch",
    "RegistrationRefused",
    "SqlRegistrationSource",
    "registry_sampled",
]

KINDS = ("sql",)
BIND_NAMES = ("since", "since_epoch", "since_iso")
REGISTRY_SAMPLE_LABEL = b"tianping/registration-sample/v1\x00"
CHECKPOINT_VERSION = 1
LOOKBACK_S_RANGE = (0, 7 * 86400)
MAX_ROWS_RANGE = (1, 10_000_000)
TIMEOUT_S_RANGE = (1, 600)
MAX_HANDLE_CHARS = 2000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULTS: Mapping[str, Any] = {"lookback_s": 0, "max_rows_per_poll": 200_000, "timeout_s": 30}


def registry_sampled(salt: bytes, handle: str, rate_log2: int) -> bool:
    """Is this new registration due to be sampled under ``salt`` at one in 2**rate_log2? (See the module doc.)"""
    if rate_log2 <= 0:
        return False
    digest = hmac.digest(salt, REGISTRY_SAMPLE_LABEL + handle.encode("utf-8"), "sha256")
    return int.from_bytes(digest[:8], "big") < 1 << (64 - rate_log2)


class RegistrationCheckpointError(ConnectorError):
    """The registration checkpoint cannot be trusted; the source refuses to guess where to continue."""

    code = "registration_checkpoint_invalid"


class RegistrationRefused(ValueError):
    """A row the registry returned that cannot be counted (a timestamp without zone, a missing handle, ...)."""


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    url: str
    query: str
    start_at: datetime  # the first watermark, when no checkpoint exists yet
    kind: str = "sql"
    checkpoint_path: Path | None = None
    naive_timezone: str | None = None  # None: refuse created_at values without a zone
    lookback_s: int = 0
    max_rows_per_poll: int = 200_000
    timeout_s: int = 30

    @classmethod
    def from_mapping(cls, cfg: Any, *, where: str) -> RegistrationConfig:
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(cfg).__name__}")
        refuse_unknown(cfg, {"kind", "url", "query", "start_at", "checkpoint_path", "naive_timezone", *DEFAULTS},
                       where=where)
        kind = require(cfg, "kind", str, where=where)
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind: expected one of {list(KINDS)}, got {kind!r}")
        url = require(cfg, "url", str, where=where)
        try:
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
        except ArgumentError:
            raise ConfigError(f"{where}.url: expected a SQLAlchemy URL such as "
                              f"'postgresql+psycopg://reader@db/handles' or 'sqlite:///registry.db', got {url!r}"
                              ) from None
        if parsed.get_backend_name() not in ("postgresql", "sqlite"):
            raise ConfigError(f"{where}.url: expected a postgresql or sqlite URL, got backend "
                              f"{parsed.get_backend_name()!r}")
        query = require(cfg, "query", str, where=where)
        if not any(_binds(query, n) for n in BIND_NAMES):
            raise ConfigError(f"{where}.query: expected a query that names the watermark as :since, :since_epoch or "  # noqa: S608
                              f":since_iso (e.g. SELECT handle, created_at FROM handles WHERE created_at >= :since "
                              f"ORDER BY created_at), got {query[:120]!r}")
        start = require(cfg, "start_at", (str, datetime), where=where)
        if isinstance(start, str):
            try:
                start = datetime.fromisoformat(start)
            except ValueError:
                raise ConfigError(f"{where}.start_at: expected an ISO 8601 date-time with a zone, got {start!r}"
                                  ) from None
        if start.tzinfo is None or start.utcoffset() is None:
            raise ConfigError(f"{where}.start_at: expected a date-time with a zone (e.g. 2026-11-26T00:00:00+08:00), "
                              f"got {start.isoformat()!r} without one")
        checkpoint = optional(cfg, "checkpoint_path", str, None, where=where)
        if checkpoint is not None and not checkpoint.strip():
            raise ConfigError(f"{where}.checkpoint_path: expected a file path, got an empty string")
        zone = optional(cfg, "naive_timezone", str, None, where=where)
        if zone is not None:
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError(f"{where}.naive_timezone: expected an IANA zone name such as 'Asia/Shanghai' or "
                                  f"'UTC', got {zone!r}") from None
        return cls(
            kind=kind,
            url=url,
            query=query,
            start_at=start.astimezone(UTC),
            checkpoint_path=Path(checkpoint) if checkpoint is not None else None,
            naive_timezone=zone,
            lookback_s=_bounded(cfg, "lookback_s", LOOKBACK_S_RANGE, where),
            max_rows_per_poll=_bounded(cfg, "max_rows_per_poll", MAX_ROWS_RANGE, where),
            timeout_s=_bounded(cfg, "timeout_s", TIMEOUT_S_RANGE, where),
        )

    @property
    def binds(self) -> list[str]:
        return [n for n in BIND_NAMES if _binds(self.query, n)]


def _binds(query: str, name: str) -> bool:
    """Does the query name the bind parameter ``:name`` (and not a longer name that starts with it)?"""
    at = query.find(":" + name)
    while at >= 0:
        end = at + 1 + len(name)
        if end >= len(query) or not (query[end].isalnum() or query[end] == "_"):
            return True
        at = query.find(":" + name, end)
    return False


def _bounded(cfg: Mapping[str, Any], key: str, bounds: tuple[int, int], where: str) -> int:
    value: int = optional(cfg, key, int, DEFAULTS[key], where=where)
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(f"{where}.{key}: expected an integer from {low} to {high}, got {value}")
    return value


@dataclass(slots=True)
class RegistrationDayBatch:
    """New registrations of one calendar day (the connector's zone) read in one or more polls."""

    handles: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _State:
    watermark: datetime  # the latest created_at seen (UTC)
    recent: Mapping[str, datetime]  # handles seen at or after watermark - lookback, with their created_at


class SqlRegistrationSource:
    """Polls the registry for new registrations (see the module docstring). Thread-safe: polls run in a worker
    thread of the connector's collection."""

    kind = "sql"
    MAX_SAMPLES_PER_DAY = 200

    def __init__(self, config: RegistrationConfig, *, zone: ZoneInfo, sample_log2: int) -> None:
        self.config = config
        self.zone = zone
        self.sample_log2 = sample_log2
        self.naive_zone = ZoneInfo(config.naive_timezone) if config.naive_timezone else None
        self._salt: bytes | None = None
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._state = self._load_checkpoint() or _State(config.start_at, {})
        self._saved = self._state
        self._delivered: _State | None = None
        self._pending: list[tuple[datetime, str]] = []  # read, not yet handed out
        self._gaps: list[tuple[datetime, datetime, str]] = []  # failed polls, not yet handed out
        self._failing_since: datetime | None = None
        self._last_ok: datetime | None = None  # the time of the last poll that answered
        self.errors: dict[str, int] = {}
        self.rows_total = 0
        self.new_total = 0

    @property
    def source(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.config.url).render_as_string(hide_password=True)

    @property
    def watermark(self) -> datetime:
        return self._state.watermark

    def bind_salt(self, salt: bytes | None) -> None:
        self._salt = salt

    def _count(self, code: str, n: int = 1) -> None:
        self.errors[code] = self.errors.get(code, 0) + n

    # --- polling ---------------------------------------------------------------------------------------------

    def poll(self, *, now: datetime | None = None) -> None:
        """Read the registrations after the watermark into the pending set; a failure becomes a gap."""
        with self._lock:
            at = now or datetime.now(UTC)
            try:
                rows = self._query()
                fresh, state, late, invalid = self._fold(rows)
            except (SQLAlchemyError, OSError, RegistrationRefused) as exc:
                # Registrations created after what is known (the watermark, or the last poll that answered) are
                # unknown until the registry answers again: a gap, never zero.
                start = max(self._state.watermark, self._last_ok or self._state.watermark)
                reason = f"registry unreachable or refused: {_one_line(exc)}"[:200]
                self._count("registry_refused" if isinstance(exc, RegistrationRefused) else "registry_unreachable")
                if self._failing_since is None:
                    self._failing_since = at
                    log.warning("registration source %s: %s; registrations from %s on are a gap until it answers",
                                self.source, reason, start.isoformat())
                self._gaps.append((start, max(start, at), reason))
                return
            self._last_ok = at
            if self._failing_since is not None:
                log.info("registration source %s is reachable again; catching up from %s", self.source,
                         self._state.watermark.isoformat())
            self._failing_since = None
            if late:
                self._count("registry_row_late", late)
            if invalid:
                self._count("registry_row_invalid", invalid)
                log.warning("registration source %s: %d rows without a usable handle (expected non-empty text of at "
                            "most %d characters) were not counted", self.source, invalid, MAX_HANDLE_CHARS)
            self.rows_total += len(rows)
            self.new_total += len(fresh)
            self._pending.extend(fresh)
            self._state = state

    def take(self) -> tuple[dict[str, RegistrationDayBatch], list[tuple[datetime, datetime, str]]]:
        """Hand out what was read since the last call: per-day registrations and the gaps; remember the state they
        reach for :meth:`commit`."""
        with self._lock:
            pending, self._pending = self._pending, []
            gaps, self._gaps = self._gaps, []
            self._delivered = self._state
        days: dict[str, RegistrationDayBatch] = {}
        for created, handle in pending:
            day = days.setdefault(created.astimezone(self.zone).date().isoformat(), RegistrationDayBatch())
            day.handles.append(handle)
            if (self._salt is not None and len(day.samples) < self.MAX_SAMPLES_PER_DAY
                    and registry_sampled(self._salt, handle, self.sample_log2)):
                day.samples.append(handle)
        return days, gaps

    def commit(self) -> None:
        """What :meth:`take` handed out is stored: checkpoint the watermark it reached."""
        with self._lock:
            if self._delivered is not None:
                self._write_checkpoint(self._delivered)

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _engine_for(self) -> Engine:
        if self._engine is None:
            args: dict[str, Any] = {}
            if self.config.url.startswith("postgresql"):
                args["connect_timeout"] = self.config.timeout_s
            elif self.config.url.startswith("sqlite"):
                args["timeout"] = self.config.timeout_s
            self._engine = create_engine(self.config.url, poolclass=NullPool, connect_args=args)
        return self._engine

    def _query(self) -> list[tuple[Any, Any]]:
        engine = self._engine_for()
        since = self._state.watermark - timedelta(seconds=self.config.lookback_s)
        values: dict[str, Any] = {
            "since": since,
            "since_epoch": (since - EPOCH).total_seconds(),
            "since_iso": since.isoformat(" ", timespec="microseconds"),
        }
        params = {n: values[n] for n in self.config.binds}
        limit = self.config.max_rows_per_poll
        rows: list[tuple[Any, Any]] = []
        seen = self._state.recent
        with engine.connect() as conn, conn.begin():
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA query_only = ON")
            else:
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(self.config.timeout_s * 1000)}")
            result = conn.execution_options(stream_results=True).execute(text(self.config.query), params)
            try:
                if len(result.keys()) < 2:
                    raise RegistrationRefused(f"the query returns {len(result.keys())} column(s); expected (handle, "
                                              "created_at)")
                last: datetime | None = None
                for row in result:
                    if isinstance(row[0], str) and row[0] in seen:
                        continue  # already counted (a tie at the watermark, the lookback): not against the limit
                    created = self._timestamp(row[1])
                    # Past the limit, finish the instant being read (its ties) and stop: the next poll starts there.
                    if len(rows) >= limit and last is not None and created != last:
                        break
                    rows.append((row[0], created))
                    last = created
            finally:
                result.close()
        return rows

    def _timestamp(self, value: Any) -> datetime:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value.strip())
            except ValueError:
                raise RegistrationRefused(f"created_at: expected an ISO 8601 date-time, got {value[:60]!r}") from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return EPOCH + timedelta(seconds=value)
        elif isinstance(value, date):
            raise RegistrationRefused(f"created_at: expected a date-time, got the date {value.isoformat()}")
        else:
            raise RegistrationRefused(f"created_at: expected a date-time, ISO 8601 text or epoch seconds, got "
                                      f"{type(value).__name__} {str(value)[:60]!r}")
        if moment.tzinfo is None or moment.utcoffset() is None:
            if self.naive_zone is None:
                raise RegistrationRefused(
                    f"created_at: expected a timestamp with a zone, got {moment.isoformat()!r} without one; set "
                    "naive_timezone (e.g. \"Asia/Shanghai\" or \"UTC\") to say which zone the registry writes in")
            moment = moment.replace(tzinfo=self.naive_zone)
        return moment.astimezone(UTC)

    def _fold(self, rows: Iterable[tuple[Any, datetime]]) -> tuple[list[tuple[datetime, str]], _State, int, int]:
        """The rows not seen before, the state after them, and how many rows were late or had no usable handle
        (pure but for reading the current state)."""
        state = self._state
        window = timedelta(seconds=self.config.lookback_s)
        floor = state.watermark - window
        recent = dict(state.recent)
        fresh: list[tuple[datetime, str]] = []
        late = invalid = 0
        watermark = state.watermark
        for handle, created in rows:
            if not isinstance(handle, str) or not handle or len(handle) > MAX_HANDLE_CHARS:
                invalid += 1  # counted (registry_row_invalid) and logged; one bad row must not stop the source
                watermark = max(watermark, created)
                continue
            if handle in recent:
                continue  # seen before (a tie, the lookback, a restart, or an update returned twice)
            if created < floor:
                late += 1  # before the window: counted earlier, or committed too late to tell
                continue
            recent[handle] = created
            fresh.append((created, handle))
            watermark = max(watermark, created)
        keep_from = watermark - window
        recent = {h: t for h, t in recent.items() if t >= keep_from}
        return sorted(fresh), _State(watermark, recent), late, invalid

    # --- checkpoint ------------------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        return hashlib.sha256(f"{self.config.kind}\n{self.config.query}".encode()).hexdigest()[:16]

    def _load_checkpoint(self) -> _State | None:
        target = self.config.checkpoint_path
        if target is None:
            return None
        try:
            raw = target.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistrationCheckpointError(f"registration checkpoint {target}: cannot be read ({exc})") from None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"expected version {CHECKPOINT_VERSION}")
            if doc.get("query") != self._fingerprint():
                raise RegistrationCheckpointError(
                    f"registration checkpoint {target}: written for another query (fingerprint {doc.get('query')!r}, "
                    f"expected {self._fingerprint()!r}); remove it and set start_at only if counting from there again "
                    "is intended")
            watermark = _aware(doc["watermark"])
            recent = {str(h): _aware(t) for h, t in dict(doc["recent"]).items()}
        except RegistrationCheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistrationCheckpointError(
                f"registration checkpoint {target}: expected JSON {{version, query, watermark, recent}}, got an "
                f"unusable file ({exc})") from None
        log.info("registration source: continuing after %s from the checkpoint", watermark.isoformat())
        return _State(watermark, recent)

    def _write_checkpoint(self, state: _State) -> None:
        target = self.config.checkpoint_path
        if target is None or state == self._saved:
            return
        doc = {
            "version": CHECKPOINT_VERSION,
            "query": self._fingerprint(),
            "watermark": state.watermark.isoformat(),
            "recent": {h: t.isoformat() for h, t in sorted(state.recent.items())},
        }
        tmp = target.with_name(target.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc, sort_keys=True, ensure_ascii=False).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        self._saved = state


def _aware(value: Any) -> datetime:
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError(f"expected a date-time with a zone, got {value!r}")
    return moment.astimezone(UTC)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__
