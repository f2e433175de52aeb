"""The store adapter around the pure core: verify one envelope against what is stored, then, in ONE transaction,
append it to the ledger, write its facts and advance the agent's chain state. A refusal changes nothing stored,
except that an equivocating envelope (``SeqConflict``) is kept as evidence in its own table.

The caller serializes calls (the HTTP app holds an ``asyncio.Lock``; SQLite's ``BEGIN IMMEDIATE`` and the
``UNIQUE(agent_id, seq)`` and primary-key constraints guard the rest), so ledger indexes have no holes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection, Engine

from protocol.envelope import MAX_ENVELOPE_BYTES
from verifier.core import (
    DEFAULT_FUTURE_SKEW,
    DEFAULT_LATE_AFTER,
    ChainState,
    Duplicate,
    TrustedKey,
    verify_report,
)
from verifier.db import agents
from verifier.errors import ChainBroken, SeqConflict
from verifier.facts import derive_facts, write_facts
from verifier.ledger import Receipt, StoredHashes, append_entry, receipt_for, record_equivocation

log = logging.getLogger(__name__)


class StoredKeys(Mapping[str, TrustedKey]):
    """Enrolled keys by key id, read lazily from the agents table."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __getitem__(self, kid: str) -> TrustedKey:
        row = self._conn.execute(select(agents.c.agent_id, agents.c.applicant_id, agents.c.public_key,
                                        agents.c.revoked_at).where(agents.c.key_id == kid)).first()
        if row is None:
            raise KeyError(kid)
        return TrustedKey(key_id=kid, public_key=Ed25519PublicKey.from_public_bytes(bytes(row.public_key)),
                          agent_id=row.agent_id, applicant_id=row.applicant_id, revoked=row.revoked_at is not None)

    def __iter__(self) -> Iterator[str]:
        return (str(r.key_id) for r in self._conn.execute(select(agents.c.key_id)))

    def __len__(self) -> int:
        return int(self._conn.execute(select(func.count()).select_from(agents)).scalar_one())


class StoredChains(Mapping[str, ChainState]):
    """Agents' chain states by agent id, read lazily from the agents table."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __getitem__(self, agent_id: str) -> ChainState:
        row = self._conn.execute(select(agents.c.next_seq, agents.c.last_hash, agents.c.last_period_end)
                                 .where(agents.c.agent_id == agent_id)).first()
        if row is None:
            raise KeyError(agent_id)
        return ChainState(agent_id=agent_id, next_seq=int(row.next_seq), last_hash=row.last_hash,
                          last_period_end=row.last_period_end, accepted_hashes=StoredHashes(self._conn, agent_id))

    def __iter__(self) -> Iterator[str]:
        return (str(r.agent_id) for r in self._conn.execute(select(agents.c.agent_id)))

    def __len__(self) -> int:
        return int(self._conn.execute(select(func.count()).select_from(agents)).scalar_one())


@dataclass(frozen=True, slots=True)
class IngestResult:
    receipt: Receipt
    created: bool  # False for an exact replay answered with the original receipt


def ingest_report(
    engine: Engine,
    envelope: bytes,
    *,
    now: datetime,
    max_bytes: int = MAX_ENVELOPE_BYTES,
    future_skew: timedelta = DEFAULT_FUTURE_SKEW,
    late_after: timedelta = DEFAULT_LATE_AFTER,
) -> IngestResult:
    """Verify and store one report envelope; return its receipt once committed. Raises the core's typed errors."""
    try:
        with engine.begin() as conn:
            result = verify_report(envelope, keys=StoredKeys(conn), chains=StoredChains(conn), now=now,
                                   max_bytes=max_bytes, future_skew=future_skew, late_after=late_after)
            if isinstance(result, Duplicate):
                original = receipt_for(conn, result.agent_id, result.seq)
                assert original is not None  # the core saw its hash in the ledger
                log.info("replay of agent %r seq %d answered with the original receipt", result.agent_id, result.seq)
                return IngestResult(receipt=original, created=False)
            report = result.report
            receipt = append_entry(conn, result, received_at=now)
            write_facts(conn, derive_facts(report, result.applicant_id))
            advanced = conn.execute(
                update(agents)
                .where(agents.c.agent_id == result.agent_id, agents.c.next_seq == report.seq,
                       agents.c.last_hash == report.prev_hash)
                .values(next_seq=report.seq + 1, last_hash=result.envelope_hash,
                        last_period_end=report.period.end, last_report_at=now)
            )
            if advanced.rowcount != 1:  # only if a writer bypassed the lock; the transaction rolls back
                raise ChainBroken(f"agent {result.agent_id!r}: expected chain state at seq {report.seq}, "
                                  "got one that moved while this report was verified")
    except SeqConflict as exc:
        with engine.begin() as conn:
            record_equivocation(conn, agent_id=exc.agent_id, seq=exc.seq, envelope=envelope,
                                envelope_hash=exc.envelope_hash, accepted_envelope_hash=exc.accepted_envelope_hash,
                                received_at=now)
        log.warning("equivocation by agent %r at seq %d kept as evidence", exc.agent_id, exc.seq)
        raise
    log.info("accepted agent %r seq %d as entry %d%s", receipt.agent_id, receipt.seq, receipt.index,
             " (late)" if receipt.late else "")
    return IngestResult(receipt=receipt, created=True)
