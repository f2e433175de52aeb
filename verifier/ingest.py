"""The store adapter around the pure core: verify one envelope against what is stored, then, in ONE transaction,
append it to the ledger, write its facts and advance the agent's chain state. A refusal changes nothing stored,
except that an equivocating envelope (``SeqConflict``) is kept as evidence in its own table.

The caller serializes calls (the HTTP app holds an ``asyncio.Lock``; SQLite's ``BEGIN IMMEDIATE`` and the
``UNIQUE(agent_id, seq)`` and primary-key constraints guard the rest), so ledger indexes have no holes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection, Engine

from protocol.envelope import MAX_ENVELOPE_BYTES
from protocol.errors import ProtocolError
from verifier.core import (
    DEFAULT_FUTURE_SKEW,
    DEFAULT_LATE_AFTER,
    ChainState,
    Duplicate,
    TrustedKey,
    verify_report,
)
from verifier.db import agent_keys, agents
from verifier.errors import ChainBroken, SeqConflict, VerifierError
from verifier.facts import derive_facts, write_facts
from verifier.ledger import (
    LEAF_REPORT,
    Receipt,
    StoredHashes,
    append_entry,
    append_leaf,
    lock_ledger,
    receipt_for,
    record_equivocation,
)

log = logging.getLogger(__name__)


class StoredKeys(Mapping[str, TrustedKey]):
    """Enrolled keys by key id, read lazily: every key an agent held (``agent_keys``) while valid at ``now`` — a
    rotated key until the end of its overlap window — and, for agents enrolled before keys were tracked, the
    agents table."""

    def __init__(self, conn: Connection, now: datetime | None = None) -> None:
        self._conn = conn
        self._now = now
        self._cache: dict[str, TrustedKey] = {}  # one report looks its key up twice

    def __getitem__(self, kid: str) -> TrustedKey:
        cached = self._cache.get(kid)
        if cached is None:
            cached = self._cache[kid] = self._lookup(kid)
        return cached

    def _lookup(self, kid: str) -> TrustedKey:
        key_row = self._conn.execute(select(agent_keys.c.agent_id, agent_keys.c.public_key, agent_keys.c.valid_until)
                                     .where(agent_keys.c.key_id == kid)).first()
        if key_row is not None:
            owner = self._conn.execute(select(agents.c.agent_id, agents.c.applicant_id, agents.c.revoked_at)
                                       .where(agents.c.agent_id == key_row.agent_id)).first()
            assert owner is not None  # foreign key
            expired = key_row.valid_until is not None and self._now is not None and key_row.valid_until <= self._now
            if expired and owner.revoked_at is None:
                raise KeyError(kid)  # rotated away, overlap over: as unknown as a key never enrolled
            return TrustedKey(key_id=kid, public_key=Ed25519PublicKey.from_public_bytes(bytes(key_row.public_key)),
                              agent_id=owner.agent_id, applicant_id=owner.applicant_id,
                              revoked=owner.revoked_at is not None)
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


def _ingest_in(conn: Connection, envelope: bytes, *, size: int, now: datetime, max_bytes: int,
               future_skew: timedelta, late_after: timedelta) -> IngestResult:
    """Verify one envelope and append it at tree ``size`` inside the caller's transaction (ledger locked)."""
    result = verify_report(envelope, keys=StoredKeys(conn, now), chains=StoredChains(conn), now=now,
                           max_bytes=max_bytes, future_skew=future_skew, late_after=late_after)
    if isinstance(result, Duplicate):
        original = receipt_for(conn, result.agent_id, result.seq)
        assert original is not None  # the core saw its hash in the ledger
        log.info("replay of agent %r seq %d answered with the original receipt", result.agent_id, result.seq)
        return IngestResult(receipt=original, created=False)
    report = result.report
    receipt = append_entry(conn, result, received_at=now)
    append_leaf(conn, size=size, kind=LEAF_REPORT, leaf=bytes.fromhex(result.leaf_hash), entry_index=receipt.index)
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
    log.debug("accepted agent %r seq %d as entry %d%s", receipt.agent_id, receipt.seq, receipt.index,
              " (late)" if receipt.late else "")
    return IngestResult(receipt=receipt, created=True)


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
            size = lock_ledger(conn)  # first: writers in other processes wait here (PostgreSQL)
            return _ingest_in(conn, envelope, size=size, now=now, max_bytes=max_bytes, future_skew=future_skew,
                              late_after=late_after)
    except SeqConflict as exc:
        with engine.begin() as conn:
            record_equivocation(conn, agent_id=exc.agent_id, seq=exc.seq, envelope=envelope,
                                envelope_hash=exc.envelope_hash, accepted_envelope_hash=exc.accepted_envelope_hash,
                                received_at=now)
        log.warning("equivocation by agent %r at seq %d kept as evidence", exc.agent_id, exc.seq)
        raise


def ingest_batch(
    engine: Engine,
    envelopes: Sequence[bytes],
    *,
    now: datetime,
    max_bytes: int = MAX_ENVELOPE_BYTES,
    future_skew: timedelta = DEFAULT_FUTURE_SKEW,
    late_after: timedelta = DEFAULT_LATE_AFTER,
) -> list[IngestResult | VerifierError | ProtocolError]:
    """Group commit: verify and store several envelopes in ONE transaction (one fsync), each in its own savepoint so
    that a refused one changes nothing; return, in order, each one's result or refusal. Nothing is acknowledged
    before the commit returns; if the commit fails, the caller answers every request with the failure."""
    out: list[IngestResult | VerifierError | ProtocolError] = []
    with engine.begin() as conn:
        size = lock_ledger(conn)
        for envelope in envelopes:
            savepoint = conn.begin_nested()
            try:
                result = _ingest_in(conn, envelope, size=size, now=now, max_bytes=max_bytes,
                                    future_skew=future_skew, late_after=late_after)
            except (VerifierError, ProtocolError) as exc:
                savepoint.rollback()
                if isinstance(exc, SeqConflict):
                    record_equivocation(conn, agent_id=exc.agent_id, seq=exc.seq, envelope=envelope,
                                        envelope_hash=exc.envelope_hash,
                                        accepted_envelope_hash=exc.accepted_envelope_hash, received_at=now)
                    log.warning("equivocation by agent %r at seq %d kept as evidence", exc.agent_id, exc.seq)
                out.append(exc)
                continue
            savepoint.commit()
            size += 1 if result.created else 0
            out.append(result)
    return out


@dataclass
class _Pending:
    envelope: bytes
    future: asyncio.Future[IngestResult]


class GroupCommitWriter:
    """The HTTP app's single writer: requests queue their envelope; the writer takes everything queued (up to
    ``max_batch``), ingests it with :func:`ingest_batch` (one commit) under ``lock``, then answers each request.
    ``after_commit`` runs after each batch (checkpoint schedule)."""

    def __init__(self, engine: Engine, *, lock: asyncio.Lock, clock: Callable[[], datetime],
                 after_commit: Callable[[], object] | None = None, max_batch: int = 256,
                 max_bytes: int = MAX_ENVELOPE_BYTES, future_skew: timedelta = DEFAULT_FUTURE_SKEW,
                 late_after: timedelta = DEFAULT_LATE_AFTER) -> None:
        self._engine, self._lock, self._clock, self._after = engine, lock, clock, after_commit
        self._max_batch, self._max_bytes = max_batch, max_bytes
        self._future_skew, self._late_after = future_skew, late_after
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.reports = 0

    async def submit(self, envelope: bytes) -> IngestResult:
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run(self._queue), name="group-commit-writer")
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(envelope, future))
        return await future

    async def _run(self, queue: asyncio.Queue[_Pending]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            envelopes = [p.envelope for p in batch]
            try:
                async with self._lock:
                    results = await asyncio.to_thread(
                        ingest_batch, self._engine, envelopes, now=self._clock(), max_bytes=self._max_bytes,
                        future_skew=self._future_skew, late_after=self._late_after)
                    if self._after is not None:
                        try:
                            await asyncio.to_thread(self._after)
                        except Exception:  # the batch is committed: answer it; the failure is loud
                            log.critical("after the commit of %d reports: the checkpoint step failed",
                                         len(batch), exc_info=True)
            except Exception as exc:
                log.exception("group commit of %d reports failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches += 1
            self.reports += len(batch)
            for p, r in zip(batch, results, strict=True):
                if p.future.done():  # the client went away: the result stays committed
                    continue
                if isinstance(r, IngestResult):
                    p.future.set_result(r)
                else:
                    p.future.set_exception(r)
