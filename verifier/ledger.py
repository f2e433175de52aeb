"""The append-only ledger of accepted report envelopes.

Each entry keeps the exact envelope bytes, its SHA-256 (what reports chain to) and its RFC 9162 leaf hash
SHA-256(0x00 || envelope), so that a Merkle tree and signed checkpoints can be built over the entries later.
This module only appends and reads: there is no UPDATE or DELETE path. Indexes run 0, 1, 2, … without holes
(the caller holds the write lock and the database serializes writers).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection, Engine

from verifier.core import VerifiedReport
from verifier.db import entries, equivocations


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the verifier answers once an entry is committed."""

    index: int
    agent_id: str
    seq: int
    envelope_hash: str
    leaf_hash: str
    received_at: datetime
    late: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "agent_id": self.agent_id,
            "seq": self.seq,
            "envelope_hash": self.envelope_hash,
            "leaf_hash": self.leaf_hash,
            "received_at": self.received_at.isoformat(),
            "late": self.late,
        }


_RECEIPT_COLUMNS = (entries.c.entry_index, entries.c.agent_id, entries.c.seq, entries.c.envelope_hash,
                    entries.c.leaf_hash, entries.c.received_at, entries.c.late)


def _receipt(row: Any) -> Receipt:
    return Receipt(index=int(row.entry_index), agent_id=row.agent_id, seq=int(row.seq),
                   envelope_hash=row.envelope_hash, leaf_hash=row.leaf_hash, received_at=row.received_at,
                   late=bool(row.late))


def append_entry(conn: Connection, verified: VerifiedReport, *, received_at: datetime) -> Receipt:
    """Append one verified report as the next entry (inside the caller's write transaction)."""
    received_at = received_at.astimezone(UTC)  # receipts always speak UTC, as stored
    index = int(conn.execute(select(func.coalesce(func.max(entries.c.entry_index) + 1, 0))).scalar_one())
    period = verified.report.period
    conn.execute(insert(entries).values(
        entry_index=index,
        agent_id=verified.agent_id,
        seq=verified.report.seq,
        envelope=verified.envelope,
        envelope_hash=verified.envelope_hash,
        leaf_hash=verified.leaf_hash,
        received_at=received_at,
        period_start=period.start,
        period_end=period.end,
        late=verified.late,
    ))
    return Receipt(index=index, agent_id=verified.agent_id, seq=verified.report.seq,
                   envelope_hash=verified.envelope_hash, leaf_hash=verified.leaf_hash, received_at=received_at,
                   late=verified.late)


def receipt_for(conn: Connection, agent_id: str, seq: int) -> Receipt | None:
    row = conn.execute(select(*_RECEIPT_COLUMNS).where(entries.c.agent_id == agent_id, entries.c.seq == seq)).first()
    return None if row is None else _receipt(row)


def record_equivocation(conn: Connection, *, agent_id: str, seq: int, envelope: bytes, envelope_hash: str,
                        accepted_envelope_hash: str, received_at: datetime) -> None:
    """Keep a conflicting envelope as evidence (the ledger itself is not touched)."""
    conn.execute(insert(equivocations).values(agent_id=agent_id, seq=seq, envelope=envelope,
                                              envelope_hash=envelope_hash,
                                              accepted_envelope_hash=accepted_envelope_hash,
                                              received_at=received_at))


@dataclass(frozen=True, slots=True)
class LedgerHead:
    size: int
    last_leaf_hash: str | None
    last_envelope_hash: str | None


def ledger_head(conn: Connection) -> LedgerHead:
    size = int(conn.execute(select(func.count()).select_from(entries)).scalar_one())
    row = conn.execute(select(entries.c.leaf_hash, entries.c.envelope_hash)
                       .order_by(entries.c.entry_index.desc()).limit(1)).first()
    return LedgerHead(size=size, last_leaf_hash=None if row is None else row.leaf_hash,
                      last_envelope_hash=None if row is None else row.envelope_hash)


def read_envelope(engine: Engine, index: int) -> bytes | None:
    with engine.connect() as conn:
        value = conn.execute(select(entries.c.envelope).where(entries.c.entry_index == index)).scalar_one_or_none()
    return None if value is None else bytes(value)


class StoredHashes(Mapping[int, str]):
    """The envelope hash accepted for each seq of one agent, read lazily from the ledger."""

    def __init__(self, conn: Connection, agent_id: str) -> None:
        self._conn = conn
        self._agent_id = agent_id

    def __getitem__(self, seq: int) -> str:
        value = self._conn.execute(select(entries.c.envelope_hash)
                                   .where(entries.c.agent_id == self._agent_id, entries.c.seq == seq)
                                   ).scalar_one_or_none()
        if value is None:
            raise KeyError(seq)
        return str(value)

    def __iter__(self) -> Iterator[int]:
        rows = self._conn.execute(select(entries.c.seq).where(entries.c.agent_id == self._agent_id)
                                  .order_by(entries.c.seq))
        return (int(r.seq) for r in rows)

    def __len__(self) -> int:
        return int(self._conn.execute(select(func.count()).select_from(entries)
                                      .where(entries.c.agent_id == self._agent_id)).scalar_one())
