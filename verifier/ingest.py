"""The store adapter around the pure core: verify one envelope against what is stored, then, in ONE transaction,
append it to the ledger, write its facts and advance the agent's chain state. A refusal changes nothing stored,
except that an equivocating envelope (``SeqConflict``) is kept as evidence in its own table.

The caller serializes calls (the HTTP app holds an ``asyncio.Lock``; SQLite's ``BEGIN IMMEDIATE`` and the
``UNIQUE(agent_id, seq)`` and primary-key constraints guard the rest), so ledger indexes have no holes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from protocol.envelope import MAX_ENVELOPE_BYTES, claimed_key_id
from protocol.errors import KeyUnknown, ProtocolError
from verifier.core import (
    DEFAULT_FUTURE_SKEW,
    DEFAULT_LATE_AFTER,
    ChainState,
    Duplicate,
    ReportHead,
    TrustedKey,
    check_report,
    verify_report,
)
from verifier.db import agent_keys, agents, bulk_insert, entries
from verifier.errors import ChainBroken, SeqConflict, VerifierError
from verifier.facts import FactBatch, derive_facts, write_facts
from verifier.ledger import (
    LEAF_REPORT,
    Frontier,
    Receipt,
    StoredHashes,
    append_entry,
    append_leaf,
    entry_row,
    lock_ledger,
    receipt_for,
    record_equivocation,
)
from verifier.pool import Opened, VerifyPool, open_envelopes

log = logging.getLogger(__name__)


class StoredKeys(Mapping[str, TrustedKey]):
    """Enrolled keys by key id, read lazily: every key an agent held (``agent_keys``) while valid at ``now`` — a
    rotated key until the end of its overlap window — and, for agents enrolled before keys were tracked, the
    agents table."""

    def __init__(self, conn: Connection, now: datetime | None = None, *, prefetch: Iterable[str] = ()) -> None:
        self._conn = conn
        self._now = now
        self._cache: dict[str, TrustedKey] = {}  # one report looks its key up twice; a batch, many times
        wanted = sorted(set(prefetch))
        if wanted:
            self._prefetch(wanted)

    def cached(self) -> list[TrustedKey]:
        return list(self._cache.values())

    def __getitem__(self, kid: str) -> TrustedKey:
        cached = self._cache.get(kid)
        if cached is None:
            cached = self._cache[kid] = self._lookup(kid)
        return cached

    def _prefetch(self, kids: list[str]) -> None:
        """Read the keys in one query (what it misses, a lookup finds or refuses later); a key rotated away whose
        overlap is over is left out: as unknown as a key never enrolled."""
        rows = self._conn.execute(
            select(agent_keys.c.key_id, agent_keys.c.public_key, agent_keys.c.valid_until, agents.c.agent_id,
                   agents.c.applicant_id, agents.c.revoked_at)
            .select_from(agent_keys.join(agents, agents.c.agent_id == agent_keys.c.agent_id))
            .where(agent_keys.c.key_id.in_(kids)))
        for row in rows:
            expired = row.valid_until is not None and self._now is not None and row.valid_until <= self._now
            if not expired or row.revoked_at is not None:
                self._cache[row.key_id] = self._trusted(row.key_id, row)

    @staticmethod
    def _trusted(kid: str, row: Any) -> TrustedKey:
        return TrustedKey(key_id=kid, public_key=Ed25519PublicKey.from_public_bytes(bytes(row.public_key)),
                          agent_id=row.agent_id, applicant_id=row.applicant_id, revoked=row.revoked_at is not None)

    def _lookup(self, kid: str) -> TrustedKey:
        self._prefetch([kid])
        found = self._cache.get(kid)
        if found is not None:
            return found
        # agents enrolled before keys were tracked (a current key is never past its overlap)
        row = self._conn.execute(select(agents.c.agent_id, agents.c.applicant_id, agents.c.public_key,
                                        agents.c.revoked_at).where(agents.c.key_id == kid)).first()
        if row is None:
            raise KeyError(kid)
        return self._trusted(kid, row)

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


Outcome = IngestResult | VerifierError | ProtocolError  # what each envelope of a batch gets


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
            _keep_equivocation(conn, exc, envelope, now)
        raise


def ingest_batch(
    engine: Engine,
    envelopes: Sequence[bytes],
    *,
    now: datetime,
    max_bytes: int = MAX_ENVELOPE_BYTES,
    future_skew: timedelta = DEFAULT_FUTURE_SKEW,
    late_after: timedelta = DEFAULT_LATE_AFTER,
    pool: VerifyPool | None = None,
) -> list[Outcome]:
    """Group commit: verify and store several envelopes in ONE transaction (one fsync); return, in order, each
    one's result or refusal (the same as :func:`ingest_report` would give each, one after the other). Nothing is
    acknowledged before the commit returns; if the commit fails, the caller answers every request with the failure.

    Two stages: :func:`open_batch` checks what needs no state (signatures, canonical bytes, schema; in ``pool``'s
    worker processes when given), then :func:`write_batch` applies the stateful rules and writes."""
    opened = open_batch(engine, envelopes, max_bytes=max_bytes, pool=pool)
    return write_batch(engine, envelopes, opened, now=now, max_bytes=max_bytes, future_skew=future_skew,
                       late_after=late_after)


def open_batch(engine: Engine, envelopes: Sequence[bytes], *, max_bytes: int = MAX_ENVELOPE_BYTES,
               pool: VerifyPool | None = None) -> list[Opened | ProtocolError]:
    """The stateless stage: the public keys the envelopes name (one query, whether or not still valid: the
    write stage judges that), then rules 1-3 for each envelope."""
    kids = sorted({kid for env in envelopes if (kid := claimed_key_id(env[:max_bytes])) is not None})
    raw: dict[str, bytes] = {}
    if kids:
        with engine.connect() as conn:
            for table in (agents, agent_keys):  # agents: enrolled before keys were tracked
                raw.update((r.key_id, bytes(r.public_key)) for r in conn.execute(
                    select(table.c.key_id, table.c.public_key).where(table.c.key_id.in_(kids))))
    return (pool or _INLINE).open(envelopes, raw, max_bytes)


_INLINE = VerifyPool(0)


def write_batch(engine: Engine, envelopes: Sequence[bytes], opened: Sequence[Opened | ProtocolError], *,
                now: datetime, max_bytes: int = MAX_ENVELOPE_BYTES, future_skew: timedelta = DEFAULT_FUTURE_SKEW,
                late_after: timedelta = DEFAULT_LATE_AFTER) -> list[Outcome]:
    """The stateful stage, in one transaction: keys and chain states read once per batch, each accepted report
    advancing its agent's chain for the next one in the same batch, then one multi-row statement per table
    (:class:`_BatchWriter`). A refused report writes nothing (an equivocating one is kept as evidence). Should the
    batched write fail, the transaction rolls back and the batch is ingested again one report at a time, each in its
    own savepoint, so one bad row cannot sink the others."""
    try:
        with engine.begin() as conn:
            return _BatchWriter(conn, now=now).write(envelopes, opened, max_bytes=max_bytes,
                                                     future_skew=future_skew, late_after=late_after)
    except (IntegrityError, ChainBroken):
        log.warning("batched write of %d reports refused by the database; ingesting them one by one",
                    len(envelopes), exc_info=True)
    return _ingest_one_by_one(engine, envelopes, now=now, max_bytes=max_bytes, future_skew=future_skew,
                              late_after=late_after)


def _ingest_one_by_one(engine: Engine, envelopes: Sequence[bytes], *, now: datetime, max_bytes: int,
                       future_skew: timedelta, late_after: timedelta
                       ) -> list[Outcome]:
    out: list[Outcome] = []
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
                    _keep_equivocation(conn, exc, envelope, now)
                out.append(exc)
                continue
            savepoint.commit()
            size += 1 if result.created else 0
            out.append(result)
    return out


def _keep_equivocation(conn: Connection, exc: SeqConflict, envelope: bytes, now: datetime) -> None:
    record_equivocation(conn, agent_id=exc.agent_id, seq=exc.seq, envelope=envelope, envelope_hash=exc.envelope_hash,
                        accepted_envelope_hash=exc.accepted_envelope_hash, received_at=now)
    log.warning("equivocation by agent %r at seq %d kept as evidence", exc.agent_id, exc.seq)


class _BatchHashes(Mapping[int, str]):
    """One agent's accepted envelope hashes: those accepted earlier in this batch, then the stored ones."""

    def __init__(self, stored: Mapping[int, str]) -> None:
        self.batch: dict[int, str] = {}
        self._stored = stored

    def __getitem__(self, seq: int) -> str:
        found = self.batch.get(seq)
        return found if found is not None else self._stored[seq]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*self._stored, *self.batch}))

    def __len__(self) -> int:
        return len(self._stored) + len(self.batch)


class _BatchChains(Mapping[str, ChainState]):
    """Chain states for one batch: read once per agent (all agents the batch names in one query), then advanced in
    memory as the batch's reports are accepted."""

    def __init__(self, conn: Connection, agent_ids: Iterable[str]) -> None:
        self._conn = conn
        self.states: dict[str, ChainState] = {}
        self.start: dict[str, ChainState] = {}  # as stored, for the guarded update at the end
        wanted = sorted(set(agent_ids))
        if wanted:
            self._load(wanted)

    def _load(self, agent_ids: list[str]) -> None:
        rows = self._conn.execute(select(agents.c.agent_id, agents.c.next_seq, agents.c.last_hash,
                                         agents.c.last_period_end).where(agents.c.agent_id.in_(agent_ids)))
        for row in rows:
            state = ChainState(agent_id=row.agent_id, next_seq=int(row.next_seq), last_hash=row.last_hash,
                               last_period_end=row.last_period_end,
                               accepted_hashes=_BatchHashes(StoredHashes(self._conn, row.agent_id)))
            self.states[row.agent_id] = self.start[row.agent_id] = state

    def __getitem__(self, agent_id: str) -> ChainState:
        if agent_id not in self.states:
            self._load([agent_id])
        return self.states[agent_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def accept(self, head: ReportHead, envelope_hash: str) -> None:
        state = self.states[head.agent_id]
        hashes = state.accepted_hashes
        assert isinstance(hashes, _BatchHashes)
        hashes.batch[head.seq] = envelope_hash
        self.states[head.agent_id] = ChainState(agent_id=head.agent_id, next_seq=head.seq + 1,
                                                last_hash=envelope_hash, last_period_end=head.period_end,
                                                accepted_hashes=hashes)


class _RawStoredKeys(Mapping[str, bytes]):
    """Raw public keys of the stored keys, looked up one at a time (as the one-at-a-time path does)."""

    def __init__(self, keys: StoredKeys) -> None:
        self._keys = keys

    def __getitem__(self, kid: str) -> bytes:
        return self._keys[kid].public_key.public_bytes_raw()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _BatchWriter:
    """Applies the stateful rules to a batch in memory inside the caller's transaction, then writes it with one
    statement per table."""

    def __init__(self, conn: Connection, *, now: datetime) -> None:
        self._conn, self._now = conn, now

    def write(self, envelopes: Sequence[bytes], opened: Sequence[Opened | ProtocolError], *, max_bytes: int,
              future_skew: timedelta, late_after: timedelta) -> list[Outcome]:
        conn, now = self._conn, self._now
        size = lock_ledger(conn)  # first: writers in other processes wait here (PostgreSQL)
        keys = StoredKeys(conn, now, prefetch={o.key_id for o in opened if isinstance(o, Opened)})
        chains = _BatchChains(conn, (k.agent_id for k in keys.cached()))
        received_at = now.astimezone(UTC)
        next_index = int(conn.execute(select(func.coalesce(func.max(entries.c.entry_index) + 1, 0))).scalar_one())
        tree = Frontier(conn, size)
        accepted: dict[tuple[str, int], Receipt] = {}
        out: list[Outcome] = []
        entry_rows: list[dict[str, Any]] = []
        facts = FactBatch()
        for envelope, o in zip(envelopes, opened, strict=True):
            try:
                if isinstance(o, KeyUnknown):  # the key id the stateless stage looked for was not the one signed
                    o = open_envelopes([envelope], _RawStoredKeys(keys), max_bytes)[0]
                if isinstance(o, ProtocolError):
                    raise o
                trusted = keys.get(o.key_id)
                if trusted is None:  # rotated away or revoked since the stateless stage
                    raise KeyUnknown(f"signatures[0].keyid: expected a key enrolled with this verifier, "
                                     f"got {o.key_id[:64]!r}")
                head = o.head
                duplicate = check_report(head, signing_key=o.key_id, envelope_hash=o.envelope_hash,
                                         trusted=trusted, chains=chains, now=now, future_skew=future_skew)
            except SeqConflict as exc:
                _keep_equivocation(conn, exc, envelope, now)
                out.append(exc)
                continue
            except (VerifierError, ProtocolError) as exc:
                out.append(exc)
                continue
            if duplicate is not None:
                original = accepted.get((duplicate.agent_id, duplicate.seq)) or receipt_for(
                    conn, duplicate.agent_id, duplicate.seq)
                assert original is not None  # the rules saw its hash in this batch or in the ledger
                log.info("replay of agent %r seq %d answered with the original receipt", duplicate.agent_id,
                         duplicate.seq)
                out.append(IngestResult(receipt=original, created=False))
                continue
            late = head.period_end < now - late_after
            receipt = Receipt(index=next_index, agent_id=trusted.agent_id, seq=head.seq,
                              envelope_hash=o.envelope_hash, leaf_hash=o.leaf_hash, received_at=received_at,
                              late=late)
            entry_rows.append(entry_row(head, index=next_index, envelope=envelope, envelope_hash=o.envelope_hash,
                                        leaf_hash=o.leaf_hash, received_at=received_at, late=late))
            tree.append(bytes.fromhex(o.leaf_hash), entry_index=next_index)
            facts.add_compact(trusted.applicant_id, o.facts)
            chains.accept(head, o.envelope_hash)
            accepted[(trusted.agent_id, head.seq)] = receipt
            out.append(IngestResult(receipt=receipt, created=True))
            next_index += 1
        if entry_rows:
            bulk_insert(conn, entries, entry_rows)
            tree.write()
            facts.write(conn)
            self._advance(chains)
        return out

    def _advance(self, chains: _BatchChains) -> None:
        """Advance each agent's stored chain state, guarded by the state it was read in (a writer that bypassed the
        ledger lock makes the guard miss; the transaction then rolls back)."""
        rows = [{"b_agent": agent_id, "b_seq": chains.start[agent_id].next_seq,
                 "b_hash": chains.start[agent_id].last_hash, "next_seq": state.next_seq, "last_hash": state.last_hash,
                 "last_period_end": state.last_period_end, "last_report_at": self._now}
                for agent_id, state in chains.states.items() if state is not chains.start[agent_id]]
        stmt = (update(agents)
                .where(agents.c.agent_id == bindparam("b_agent"), agents.c.next_seq == bindparam("b_seq"),
                       agents.c.last_hash == bindparam("b_hash"))
                .values(next_seq=bindparam("next_seq"), last_hash=bindparam("last_hash"),
                        last_period_end=bindparam("last_period_end"), last_report_at=bindparam("last_report_at")))
        result = self._conn.execute(stmt, rows)
        if self._conn.dialect.supports_sane_multi_rowcount and result.rowcount != len(rows):
            raise ChainBroken(f"agents' chain states: expected {len(rows)} to advance, {result.rowcount} did; "
                              "another writer moved them while this batch was verified")


@dataclass
class _Pending:
    envelopes: Sequence[bytes]
    future: asyncio.Future[list[Outcome]]


class GroupCommitWriter:
    """The HTTP app's single writer: requests queue their envelopes; everything queued (up to about ``max_batch``
    envelopes) becomes one batch, whose stateless stage (:func:`open_batch`, in ``pool``'s processes for large
    batches) runs while the previous batch is written; the write stage (:func:`write_batch`, one commit) runs under
    ``lock``, then each request is answered. ``after_commit`` runs after each batch (checkpoint schedule)."""

    def __init__(self, engine: Engine, *, lock: asyncio.Lock, clock: Callable[[], datetime],
                 after_commit: Callable[[], object] | None = None, max_batch: int = 1000,
                 max_bytes: int = MAX_ENVELOPE_BYTES, future_skew: timedelta = DEFAULT_FUTURE_SKEW,
                 late_after: timedelta = DEFAULT_LATE_AFTER, pool: VerifyPool | None = None,
                 tick_s: float | None = None) -> None:
        self._engine, self._lock, self._clock, self._after = engine, lock, clock, after_commit
        self._tick_s = tick_s
        self._max_batch, self._max_bytes, self._pool = max_batch, max_bytes, pool
        self._future_skew, self._late_after = future_skew, late_after
        self._queue: asyncio.Queue[_Pending] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.reports = 0

    async def submit(self, envelope: bytes) -> IngestResult:
        """Ingest one envelope; its refusal is raised."""
        (outcome,) = await self.submit_many([envelope])
        if isinstance(outcome, IngestResult):
            return outcome
        raise outcome

    async def submit_many(self, envelopes: Sequence[bytes]) -> list[Outcome]:
        """Ingest several envelopes in order (in one commit, or in the same commits as other requests'); return each
        one's result or refusal. A failure of the commit itself is raised."""
        if self._queue is None or not self._tasks or any(t.done() for t in self._tasks):
            for task in self._tasks:
                task.cancel()
            self._queue = asyncio.Queue()
            opened: asyncio.Queue[_Opening] = asyncio.Queue(maxsize=1)
            self._tasks = [asyncio.create_task(self._open_loop(self._queue, opened), name="group-commit-open"),
                           asyncio.create_task(self._write_loop(opened), name="group-commit-write")]
            if self._after is not None and self._tick_s is not None:
                self._tasks.append(asyncio.create_task(self._tick(self._after, self._tick_s), name="checkpoint-tick"))
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(envelopes, future))
        return await future

    async def _tick(self, step: Callable[[], object], every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                async with self._lock:
                    await asyncio.to_thread(step)
            except Exception:
                log.critical("the timed checkpoint step failed", exc_info=True)

    async def _open_loop(self, queue: asyncio.Queue[_Pending], opened: asyncio.Queue[_Opening]) -> None:
        while True:
            batch = [await queue.get()]
            total = len(batch[0].envelopes)
            while total < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
                total += len(batch[-1].envelopes)
            envelopes = [e for p in batch for e in p.envelopes]
            stage = asyncio.ensure_future(asyncio.to_thread(open_batch, self._engine, envelopes,
                                                            max_bytes=self._max_bytes, pool=self._pool))
            await opened.put(_Opening(batch, envelopes, stage))

    async def _write_loop(self, opened: asyncio.Queue[_Opening]) -> None:
        while True:
            item = await opened.get()
            batch, envelopes = item.batch, item.envelopes
            try:
                checked = await item.stage
                async with self._lock:
                    results = await asyncio.to_thread(
                        write_batch, self._engine, envelopes, checked, now=self._clock(), max_bytes=self._max_bytes,
                        future_skew=self._future_skew, late_after=self._late_after)
                    if self._after is not None:
                        try:
                            await asyncio.to_thread(self._after)
                        except Exception:  # the batch is committed: answer it; the failure is loud
                            log.critical("after the commit of %d reports: the checkpoint step failed",
                                         len(envelopes), exc_info=True)
            except Exception as exc:
                log.exception("group commit of %d reports failed", len(envelopes))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches += 1
            self.reports += len(envelopes)
            at = 0
            for p in batch:
                mine, at = results[at:at + len(p.envelopes)], at + len(p.envelopes)
                if not p.future.done():  # else the client went away: its results stay committed
                    p.future.set_result(mine)


@dataclass
class _Opening:
    batch: list[_Pending]
    envelopes: list[bytes]
    stage: asyncio.Future[list[Opened | ProtocolError]]
