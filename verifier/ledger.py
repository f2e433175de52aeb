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

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from protocol import merkle
from protocol.canonical import canonical_json
from verifier.core import ReportHead, VerifiedReport
from verifier.db import bulk_insert, entries, equivocations, ledger_leaves, ledger_nodes, ledger_state


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


def entry_row(head: ReportHead, *, index: int, envelope: bytes, envelope_hash: str, leaf_hash: str,
              received_at: datetime, late: bool) -> dict[str, Any]:
    """The ``entries`` row of one verified report stored as entry ``index``."""
    return {"entry_index": index, "agent_id": head.agent_id, "seq": head.seq, "envelope": envelope,
            "envelope_hash": envelope_hash, "leaf_hash": leaf_hash, "received_at": received_at,
            "period_start": head.period_start, "period_end": head.period_end, "late": late}


def append_entry(conn: Connection, verified: VerifiedReport, *, received_at: datetime) -> Receipt:
    """Append one verified report as the next entry (inside the caller's write transaction)."""
    received_at = received_at.astimezone(UTC)  # receipts always speak UTC, as stored
    index = int(conn.execute(select(func.coalesce(func.max(entries.c.entry_index) + 1, 0))).scalar_one())
    conn.execute(insert(entries).values(entry_row(
        ReportHead.of(verified.report), index=index, envelope=verified.envelope, envelope_hash=verified.envelope_hash,
        leaf_hash=verified.leaf_hash, received_at=received_at, late=verified.late)))
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


# ---- the Merkle tree over the ledger (issue 5) ------------------------------------------------------------------
# The tree's leaves are ``ledger_leaves`` (reports and key events, in commit order). Every complete aligned subtree
# above the leaves is stored once in ``ledger_nodes`` when its last leaf arrives (amortized one row per leaf), so
# any root or proof for any size costs O(log² n) indexed reads, whatever the size of the ledger.

LEAF_REPORT = "report"
LEAF_KEY_EVENT = "key_event"


def _insert_ignore(conn: Connection, table: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def lock_ledger(conn: Connection) -> int:
    """Lock the tree's head row for this transaction (``SELECT … FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` already
    serializes writers) and return the tree size. Every writer calls this first, so that several verifier processes
    on one PostgreSQL database extend the tree one at a time."""
    size = conn.execute(select(ledger_state.c.size).where(ledger_state.c.id == 1).with_for_update()).scalar()
    if size is None:
        conn.execute(_insert_ignore(conn, ledger_state).values(id=1, size=0))
        size = conn.execute(select(ledger_state.c.size).where(ledger_state.c.id == 1).with_for_update()).scalar_one()
    return int(size)


def tree_size(conn: Connection) -> int:
    size = conn.execute(select(ledger_state.c.size).where(ledger_state.c.id == 1)).scalar()
    return 0 if size is None else int(size)


def append_leaf(conn: Connection, *, size: int, kind: str, leaf: bytes, entry_index: int | None = None,
                body: bytes | None = None) -> int:
    """Append one leaf at ``size`` (the size returned by :func:`lock_ledger`, in the same transaction) and store the
    subtrees it completes. Returns the leaf's tree index; the caller passes ``size + 1`` to the next call."""
    tree = Frontier(conn, size)
    tree.append(leaf, kind=kind, entry_index=entry_index, body=body)
    tree.write()
    return size


class Frontier:
    """Appends leaves to the tree in memory — each leaf completes the subtrees whose left halves are already known
    (read from the store the first time, then from this batch) — and writes them all with one statement per table
    and one update of the size. Used inside the transaction that called :func:`lock_ledger`."""

    def __init__(self, conn: Connection, size: int) -> None:
        self._conn, self._start, self.size = conn, size, size
        self._known: dict[tuple[int, int], bytes] = {}
        self._leaves: list[dict[str, Any]] = []
        self._nodes: list[dict[str, Any]] = []

    def append(self, leaf: bytes, *, kind: str = LEAF_REPORT, entry_index: int | None = None,
               body: bytes | None = None) -> int:
        index = self.size
        self._leaves.append({"tree_index": index, "kind": kind, "entry_index": entry_index, "body": body,
                             "leaf_hash": leaf})
        self._known[(0, index)] = leaf
        h, level, idx = leaf, 0, index
        while idx & 1:
            left = self._known.get((level, idx - 1))
            h = merkle.node_hash(left if left is not None else _perfect(self._conn, level, idx - 1), h)
            level, idx = level + 1, idx >> 1
            self._known[(level, idx)] = h
            self._nodes.append({"level": level, "idx": idx, "hash": h})
        self.size += 1
        return index

    def write(self) -> None:
        if not self._leaves:
            return
        bulk_insert(self._conn, ledger_leaves, self._leaves)
        bulk_insert(self._conn, ledger_nodes, self._nodes)
        self._conn.execute(update(ledger_state).where(ledger_state.c.id == 1).values(size=self.size))
        self._leaves, self._nodes = [], []


def _perfect(conn: Connection, level: int, idx: int) -> bytes:
    if level == 0:
        value = conn.execute(select(ledger_leaves.c.leaf_hash).where(ledger_leaves.c.tree_index == idx)).scalar()
    else:
        value = conn.execute(select(ledger_nodes.c.hash).where(ledger_nodes.c.level == level,
                                                                ledger_nodes.c.idx == idx)).scalar()
    if value is None:
        raise LedgerCorrupt(f"ledger tree: expected the stored subtree (level {level}, index {idx}), got none")
    return bytes(value)


class LedgerCorrupt(RuntimeError):
    """The stored tree lacks a node it must have: the database was altered outside the verifier."""


class TreeReader:
    """Roots and RFC 9162 proofs for any tree size up to the current one, from the stored subtrees.

    The proofs equal those of ``protocol.merkle.inclusion_proof`` / ``consistency_proof`` over the full leaf list
    (the tests check it); they are computed over index ranges here so that nothing reads all leaves.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._cache: dict[tuple[int, int], bytes] = {}

    def _node(self, level: int, idx: int) -> bytes:
        key = (level, idx)
        if key not in self._cache:
            self._cache[key] = _perfect(self._conn, level, idx)
        return self._cache[key]

    def subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a subtree of the RFC tree (``start`` a multiple of its largest part)."""
        if end <= start:
            return merkle.EMPTY_ROOT
        parts: list[bytes] = []
        pos = start
        while pos < end:
            level = (end - pos).bit_length() - 1
            if pos % (1 << level):
                raise ValueError(f"subtree [{start}, {end}): expected an aligned range, got one at {pos}")
            parts.append(self._node(level, pos >> level))
            pos += 1 << level
        h = parts[-1]
        for left in reversed(parts[:-1]):
            h = merkle.node_hash(left, h)
        return h

    def root(self, size: int) -> bytes:
        return self.subtree(0, size)

    def leaf(self, index: int) -> bytes:
        return self._node(0, index)

    def inclusion(self, index: int, size: int) -> list[bytes]:
        if not 0 <= index < size:
            raise merkle.ProofInvalid(f"inclusion proof: expected 0 <= index < {size}, got {index}")

        def path(m: int, start: int, end: int) -> list[bytes]:
            n = end - start
            if n == 1:
                return []
            k = 1 << ((n - 1).bit_length() - 1)
            if m < k:
                return [*path(m, start, start + k), self.subtree(start + k, end)]
            return [*path(m - k, start + k, end), self.subtree(start, start + k)]

        return path(index, 0, size)

    def consistency(self, size1: int, size2: int) -> list[bytes]:
        if not 0 < size1 <= size2:
            raise merkle.ProofInvalid(f"consistency proof: expected 0 < size1 <= {size2}, got {size1}")

        def sub(m: int, start: int, end: int, b: bool) -> list[bytes]:
            n = end - start
            if m == n:
                return [] if b else [self.subtree(start, end)]
            k = 1 << ((n - 1).bit_length() - 1)
            if m <= k:
                return [*sub(m, start, start + k, b), self.subtree(start + k, end)]
            return [*sub(m - k, start + k, end, False), self.subtree(start, start + k)]

        return sub(size1, 0, size2, True)


@dataclass(frozen=True, slots=True)
class LeafRecord:
    tree_index: int
    kind: str
    entry_index: int | None
    data: bytes  # the envelope of a report, the canonical JSON of a key event
    leaf_hash: bytes


def read_leaves(conn: Connection, start: int, end: int) -> list[LeafRecord]:
    rows = conn.execute(
        select(ledger_leaves.c.tree_index, ledger_leaves.c.kind, ledger_leaves.c.entry_index, ledger_leaves.c.body,
               ledger_leaves.c.leaf_hash, entries.c.envelope)
        .select_from(ledger_leaves.outerjoin(entries, entries.c.entry_index == ledger_leaves.c.entry_index))
        .where(ledger_leaves.c.tree_index >= start, ledger_leaves.c.tree_index < end)
        .order_by(ledger_leaves.c.tree_index))
    return [LeafRecord(int(r.tree_index), r.kind, None if r.entry_index is None else int(r.entry_index),
                       bytes(r.envelope if r.kind == LEAF_REPORT else r.body), bytes(r.leaf_hash)) for r in rows]


def tree_index_of_entry(conn: Connection, entry_index: int) -> int | None:
    value = conn.execute(select(ledger_leaves.c.tree_index)
                         .where(ledger_leaves.c.entry_index == entry_index)).scalar()
    return None if value is None else int(value)


def append_key_event(conn: Connection, *, event: Mapping[str, Any]) -> int:
    """Append a key event (enrollment, rotation, revocation) to the tree as the canonical JSON of ``event``."""
    body = canonical_json({"kind": LEAF_KEY_EVENT, **event})
    size = lock_ledger(conn)
    return append_leaf(conn, size=size, kind=LEAF_KEY_EVENT, leaf=merkle.leaf_hash(body), body=body)
