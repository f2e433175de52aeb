"""The verifier's schema (SQLAlchemy Core) and its engine factory.

SQLite is the default (WAL, synchronous=FULL, foreign keys on, every transaction ``BEGIN IMMEDIATE`` so that
writers are serialized by the database too); the same models are portable to PostgreSQL: no SQLite-only SQL.
Times are stored in UTC and read back as aware UTC datetimes.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeDecorator

from protocol.fingerprint import FINGERPRINT_KEY_BYTES
from verifier.errors import NotInitialized

log = logging.getLogger(__name__)

DEFAULT_DB_URL = "sqlite:///var/verifier.sqlite"
DB_ENV = "TIANPING_DB"
FINGERPRINT_KEY_SETTING = "fingerprint_key"


class UtcDateTime(TypeDecorator[datetime]):
    """An aware datetime stored as UTC (naive UTC on SQLite, timestamptz on PostgreSQL)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"expected an aware datetime, got naive {value!r}")
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

settings_table = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

applicants = Table(
    "applicants",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("kind", String(16), nullable=False),  # "platform" | "node"
    Column("created_at", UtcDateTime, nullable=False),
)

enterprises = Table(
    "enterprises",
    metadata,
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("uscc", String(18), nullable=False),
    Column("name", String(200), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("applicant_id", "uscc"),
)

enrollment_tokens = Table(
    "enrollment_tokens",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("enterprise_uscc", String(18), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("used_at", UtcDateTime, nullable=True),
    Column("used_by_agent", String(64), nullable=True),
    ForeignKeyConstraint(["applicant_id", "enterprise_uscc"], ["enterprises.applicant_id", "enterprises.uscc"]),
)

agents = Table(
    "agents",
    metadata,
    Column("agent_id", String(64), primary_key=True),
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("enterprise_uscc", String(18), nullable=True),
    Column("name", String(200), nullable=False),
    Column("key_id", String(64), nullable=False, unique=True),
    Column("public_key", LargeBinary(32), nullable=False, unique=True),
    Column("enrolled_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
    # chain state, advanced in the same transaction as the ledger append
    Column("next_seq", BigInteger, nullable=False),
    Column("last_hash", String(64), nullable=False),
    Column("last_period_end", UtcDateTime, nullable=True),
    Column("last_report_at", UtcDateTime, nullable=True),
)

agent_salts = Table(  # the salt each agent samples resolution records under (issue 4), issued at enrollment
    "agent_salts",
    metadata,
    Column("agent_id", String(64), ForeignKey("agents.agent_id"), primary_key=True),
    Column("salt", LargeBinary(32), nullable=False),
    Column("issued_at", UtcDateTime, nullable=False),
)

node_day_cache = Table(  # issue 4: a node agent's evidence and flags for one day, recomputed when its entries change
    "node_day_cache",
    metadata,
    Column("agent_id", String(64), ForeignKey("agents.agent_id"), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("entries", Integer, nullable=False),  # the entries it was computed from: how many, and the last index
    Column("last_index", BigInteger, nullable=False),
    Column("body", Text, nullable=False),  # JSON: the day's evidence and flags, or null (no resolution data)
)

key_events = Table(
    "key_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("agent_id", String(64), ForeignKey("agents.agent_id"), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("event", String(16), nullable=False),  # "enroll" | "rotate" | "revoke"
    Column("at", UtcDateTime, nullable=False),
    Column("detail", Text, nullable=False, default=""),
)

entries = Table(
    "entries",
    metadata,
    Column("entry_index", BigInteger, primary_key=True, autoincrement=False),  # 0, 1, 2, … without holes
    Column("agent_id", String(64), ForeignKey("agents.agent_id"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    Column("envelope_hash", String(64), nullable=False, unique=True),
    Column("leaf_hash", String(64), nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("period_start", UtcDateTime, nullable=False),
    Column("period_end", UtcDateTime, nullable=False),
    Column("late", Boolean, nullable=False),
    UniqueConstraint("agent_id", "seq"),
)

equivocations = Table(
    "equivocations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("agent_id", String(64), ForeignKey("agents.agent_id"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    Column("envelope_hash", String(64), nullable=False),
    Column("accepted_envelope_hash", String(64), nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
)

device_days = Table(
    "device_days",
    metadata,
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("day", Date, nullable=False),  # calendar day in Asia/Shanghai
    Column("fp", String(64), nullable=False),
    Column("enterprise", String(18), nullable=True),
    Column("protocols", SmallInteger, nullable=False),  # bit set, see facts.PROTOCOL_BITS
    Column("status_rank", SmallInteger, nullable=False),  # protocol.report.STATUS_RANK: 1 registered … 3 active
    PrimaryKeyConstraint("applicant_id", "day", "fp"),
)

device_aliases = Table(
    "device_aliases",
    metadata,
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("fp", String(64), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("first_day", Date, nullable=False),
    PrimaryKeyConstraint("applicant_id", "fp", "alias"),
)

resolution_days = Table(
    "resolution_days",
    metadata,
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("day", Date, nullable=False),
    Column("resolutions_ok", BigInteger, nullable=False),
    Column("resolutions_failed", BigInteger, nullable=False),
    Column("creates_ok", BigInteger, nullable=False),
    Column("deletes_ok", BigInteger, nullable=False),
    PrimaryKeyConstraint("applicant_id", "day"),
)


def _sqlite_value(column: Column[Any]) -> Any:
    """How SQLAlchemy's type for ``column`` would hand a value to sqlite3 (None for: as it is)."""
    if isinstance(column.type, UtcDateTime):
        return lambda v: None if v is None else v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(column.type, Boolean):
        return lambda v: None if v is None else int(v)
    if isinstance(column.type, Date) and not isinstance(column.type, DateTime):
        return lambda v: None if v is None else v.isoformat()
    return None


def bulk_insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert many rows of the same keys. On SQLite straight through the driver, with the values converted here as
    the column types would convert them (aware datetimes as naive-UTC text, booleans as 0/1, dates as ISO text):
    per-value type processing was a third of the batched ingest's write time. Elsewhere, the typed executemany."""
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(table.insert(), rows)
        return
    names = list(rows[0])
    convert = [(i, f) for i, name in enumerate(names) if (f := _sqlite_value(table.c[name])) is not None]
    values = []
    for row in rows:
        v = [row[name] for name in names]
        for i, f in convert:
            v[i] = f(v[i])
        values.append(tuple(v))
    quoted = ", ".join(f'"{table.c[name].name}"' for name in names)  # the table's own column names, checked above
    sql = f'INSERT INTO "{table.name}" ({quoted}) VALUES ({", ".join("?" * len(names))})'  # noqa: S608
    conn.exec_driver_sql(sql, values)


def _sqlite_file(url: str) -> Path | None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != prefix and ":memory:" not in url:
        return Path(url[len(prefix):])
    return None


def make_engine(url: str) -> Engine:
    """An engine for the URL; for SQLite: WAL, synchronous=FULL, foreign keys, ``BEGIN IMMEDIATE`` transactions."""
    if url.startswith("sqlite"):
        path = _sqlite_file(url)
        if path is not None and path.parent != Path():
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # 64 MiB of page cache (the default is 2 MiB): with a million entries the random-keyed unique index on
            # envelope hashes no longer fits the default, and every insert would read index pages back
            cur.execute("PRAGMA cache_size=-65536")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def init_db(engine: Engine) -> bool:
    """Create the schema and the per-deployment fingerprint key if missing. Idempotent.

    Returns True when the fingerprint key was created now, False when it already existed.
    """
    metadata.create_all(engine)
    with engine.begin() as conn:
        existing = conn.execute(
            select(settings_table.c.value).where(settings_table.c.name == FINGERPRINT_KEY_SETTING)
        ).scalar_one_or_none()
        if existing is not None:
            return False
        conn.execute(settings_table.insert().values(name=FINGERPRINT_KEY_SETTING,
                                                    value=secrets.token_bytes(FINGERPRINT_KEY_BYTES)))
    log.info("created the per-deployment fingerprint key")
    return True


def fingerprint_key(conn: Connection) -> bytes:
    value = conn.execute(
        select(settings_table.c.value).where(settings_table.c.name == FINGERPRINT_KEY_SETTING)
    ).scalar_one_or_none()
    if value is None:
        raise NotInitialized("settings.fingerprint_key: expected the key created by `init`, got none")
    return bytes(value)


def db_url_from_env(explicit: str | None = None) -> str:
    return explicit or os.environ.get(DB_ENV) or DEFAULT_DB_URL


# ---- issue 7: the officials' web console (users and their roles) ------------------------------------------------
web_users = Table(
    "web_users",
    metadata,
    Column("username", String(64), primary_key=True),
    Column("password_hash", String(200), nullable=False),  # verifier.auth: scrypt$n$r$p$salt$hash
    Column("role", String(16), nullable=False),  # "admin" | "official" | "operator"
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=True),  # an operator's own applicant
    Column("created_at", UtcDateTime, nullable=False),
    Column("disabled_at", UtcDateTime, nullable=True),
)


# ---- issue 5: the Merkle tree over the ledger, signed checkpoints, agent keys ----------------------------------
ledger_state = Table(  # one row (id = 1): the tree size; locked (FOR UPDATE) by every writer of the tree
    "ledger_state",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("size", BigInteger, nullable=False),
)

ledger_leaves = Table(  # the tree's leaves in order: report entries and key events
    "ledger_leaves",
    metadata,
    Column("tree_index", BigInteger, primary_key=True, autoincrement=False),  # 0, 1, 2, … without holes
    Column("kind", String(16), nullable=False),  # "report" | "key_event"
    Column("entry_index", BigInteger, nullable=True, unique=True),  # entries.entry_index for a report
    Column("body", LargeBinary, nullable=True),  # the canonical JSON of a key event
    Column("leaf_hash", LargeBinary, nullable=False),  # SHA-256(0x00 || envelope or body)
)

ledger_nodes = Table(  # every complete (perfect, aligned) subtree above the leaves: level >= 1
    "ledger_nodes",
    metadata,
    Column("level", SmallInteger, nullable=False),
    Column("idx", BigInteger, nullable=False),  # covers leaves [idx << level, (idx + 1) << level)
    Column("hash", LargeBinary, nullable=False),
    PrimaryKeyConstraint("level", "idx"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("size", BigInteger, nullable=False),
    Column("root", LargeBinary, nullable=False),
    Column("note", Text, nullable=False),  # the whole C2SP signed note
    Column("signed_at", UtcDateTime, nullable=False),
)

agent_keys = Table(  # every key an agent has held; agents.key_id is the current one
    "agent_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("agent_id", String(64), ForeignKey("agents.agent_id"), nullable=False),
    Column("public_key", LargeBinary(32), nullable=False, unique=True),
    Column("valid_from", UtcDateTime, nullable=False),
    Column("valid_until", UtcDateTime, nullable=True),  # end of the overlap window after a rotation
)


# ---- issue 6: what officials recorded (gates and figures no agent can measure), signed evaluations ---------------
official_records = Table(  # append-only: a correction is a newer record; the latest per (metric, period, item) counts
    "official_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("metric", String(64), nullable=False),  # verifier.rules.METRICS of kind gate/figure, or go_live_date
    Column("period", Integer, nullable=True),  # the calendar year it is for; NULL: not tied to a year
    Column("item", String(200), nullable=False),  # "" or the item of a figure given in items
    Column("value", String(64), nullable=False),  # "true" / "false", a decimal string, or an ISO date
    Column("recorded_by", String(200), nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
    Column("document_ref", String(500), nullable=False),
    Column("note", Text, nullable=False),
)

evaluations = Table(  # exactly one per (applicant, year, policy): the annual check's signed verdict
    "evaluations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=False),
    Column("year", Integer, nullable=False),
    Column("policy_id", String(64), nullable=False),
    Column("policy_sha256", String(64), nullable=False),
    Column("ledger_size", BigInteger, nullable=False),  # facts from ledger entries [0, ledger_size) only
    Column("verdict", Text, nullable=False),  # canonical JSON of the verdict (with its evidence)
    Column("envelope", LargeBinary, nullable=False),  # DSSE envelope of the verdict, signed by the verifier
    Column("key_id", String(64), nullable=False),
    Column("payable_yuan", String(32), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("applicant_id", "year", "policy_id"),
)

# The annual check's per-device GROUP BY over a year of device-days reads this covering index in fp order (no sort
# of millions of rows): 4.4 million device-days in about 2 s on SQLite instead of about 6.5 s.
device_days_by_fp = Index("ix_device_days_by_fp", device_days.c.applicant_id, device_days.c.fp, device_days.c.day,
                          device_days.c.status_rank, device_days.c.enterprise, device_days.c.protocols)


# ---- issue 5: read credentials (bearer tokens for the JSON API's read routes; verifier.credentials) -------------
api_credentials = Table(
    "api_credentials",
    metadata,
    Column("id", String(32), primary_key=True),  # public id: shown in lists, named to revoke
    Column("token_sha256", String(64), nullable=False, unique=True),  # the token itself is shown once, never stored
    Column("role", String(16), nullable=False),  # "applicant" | "official"
    Column("applicant_id", String(64), ForeignKey("applicants.id"), nullable=True),  # set iff role = applicant
    Column("name", String(200), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=True),  # NULL: until revoked
    Column("revoked_at", UtcDateTime, nullable=True),
)
