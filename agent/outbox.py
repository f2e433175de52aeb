"""The durable outbox: signed reports wait here until the verifier acknowledges them.

A report is signed and written (with the chain state that follows it) in one SQLite transaction with
``synchronous=FULL``, so once :meth:`Outbox.append` returns the report survives a crash, and the next report
chains to it. A report leaves the outbox only in :meth:`Outbox.acknowledge`, after the verifier's receipt. A full
disk raises :class:`OutboxFull`: collection stops and nothing older is dropped.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.errors import OutboxFull
from protocol.envelope import envelope_hash
from protocol.report import GENESIS_HASH

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chain (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_seq INTEGER NOT NULL,
    last_hash TEXT NOT NULL,
    last_period_end TEXT
);
INSERT OR IGNORE INTO chain (id, next_seq, last_hash, last_period_end) VALUES (1, 1, '{genesis}', NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    envelope BLOB NOT NULL,
    envelope_hash TEXT NOT NULL,
    period_end TEXT NOT NULL,
    created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS receipts (
    seq INTEGER PRIMARY KEY,
    receipt TEXT NOT NULL
);
""".replace("{genesis}", GENESIS_HASH)


@dataclass(frozen=True, slots=True)
class ChainState:
    next_seq: int
    last_hash: str
    last_period_end: datetime | None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    seq: int
    envelope: bytes
    envelope_hash: str
    attempts: int


class Outbox:
    def __init__(self, path: Path, *, max_bytes: int = 1 << 30) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise OutboxFull(
                    f"outbox {self.path}: the disk is full ({exc}); collection stops, nothing is dropped"
                ) from exc
            raise

    def chain(self) -> ChainState:
        seq, last, end = self._db.execute("SELECT next_seq, last_hash, last_period_end FROM chain").fetchone()
        return ChainState(int(seq), str(last), datetime.fromisoformat(end) if end else None)

    def append(self, build: Callable[[int, str], tuple[bytes, datetime]]) -> OutboxItem:
        """Sign and store the next report. ``build(seq, prev_hash)`` returns (envelope bytes, period end)."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if size > self.max_bytes:
            raise OutboxFull(f"outbox {self.path}: expected at most {self.max_bytes} bytes, holds {size}")
        with self._tx() as db:
            seq, last = db.execute("SELECT next_seq, last_hash FROM chain").fetchone()
            envelope, period_end = build(int(seq), str(last))
            h = envelope_hash(envelope)
            db.execute(
                "INSERT INTO outbox (seq, envelope, envelope_hash, period_end, created_at) VALUES (?, ?, ?, ?, ?)",
                (seq, envelope, h, period_end.isoformat(), datetime.now().astimezone().isoformat()),
            )
            db.execute(
                "UPDATE chain SET next_seq = ?, last_hash = ?, last_period_end = ?",
                (seq + 1, h, period_end.isoformat()),
            )
        return OutboxItem(int(seq), envelope, h, 0)

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        rows = self._db.execute(
            "SELECT seq, envelope, envelope_hash, attempts FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxItem(int(s), bytes(e), str(h), int(a)) for s, e, h, a in rows]

    def depth(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def note_failure(self, seq: int, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?", (error[:500], seq))

    def acknowledge(self, seq: int, receipt: dict[str, Any]) -> None:
        """The verifier committed report ``seq``: keep its receipt, then (same transaction) drop the report."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO receipts (seq, receipt) VALUES (?, ?)", (seq, json.dumps(receipt)))
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def last_receipt(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT receipt FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None

    def last_error(self) -> str | None:
        row = self._db.execute(
            "SELECT last_error FROM outbox WHERE last_error IS NOT NULL ORDER BY seq LIMIT 1"
        ).fetchone()
        return str(row[0]) if row else None
