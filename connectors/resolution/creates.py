"""The successful creates of a counting, kept exactly but compactly, and the Merkle roots over new identifiers.

A day at a secondary node can hold hundreds of thousands of creates; as Python ``(datetime, str)`` tuples they cost
about 150 bytes each, here about 65 (UTC minute, offset, 64-bit hash, position, and the unescaped UTF-8 handle back
to back in one buffer). :meth:`CreateLog.first_creates` finds each handle's earliest create without building a
dict of strings: sorted by hash, with handles that share a hash compared byte for byte (never merged on a hash
alone); :meth:`CreateLog.root` computes a day's Merkle root from the buffer (in C when the scanner is built).

Beyond ``CreateLog.SPILL_AT`` creates (about 26 MB) the log moves them to a private temporary SQLite file, and
:meth:`CreateLog.new_by_day` then finds the first creates with SQLite's sort (bounded memory, on disk) and streams
each day's Merkle root, so that memory stays bounded whatever the number of registrations.
"""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from connectors.resolution import native
from protocol.merkle import EMPTY_ROOT, leaf_hash, node_hash
from protocol.sampling import h64


@dataclass(slots=True)
class FirstCreates:
    """Each distinct handle's earliest create: its UTC minute, offset and position in the :class:`CreateLog`."""

    utc_min: Any  # int64 array
    off_min: Any  # int64 array
    idx: Any  # int64 array: positions in the log


class CreateLog:
    """Successful creates in the order found: (UTC minute, offset minutes, unescaped handle as UTF-8)."""

    SPILL_AT: ClassVar[int] = 400_000  # creates held in memory (about 26 MB) before they move to a temporary file

    __slots__ = ("_blob", "_db", "_hash", "_len", "_off", "_spilled", "_start", "_utc")

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None
        self._spilled = 0
        self._clear()

    def _clear(self) -> None:
        self._utc = array("q")
        self._off = array("q")
        self._hash = array("Q")
        self._start = array("q")
        self._len = array("q")
        self._blob = bytearray()

    def __len__(self) -> int:
        return self._spilled + len(self._utc)

    @property
    def spilled(self) -> int:
        """How many creates moved to the temporary file."""
        return self._spilled

    def append(self, utc_min: int, off_min: int, handle: bytes) -> None:
        self._utc.append(utc_min)
        self._off.append(off_min)
        self._hash.append(h64(handle))
        self._start.append(len(self._blob))
        self._len.append(len(handle))
        self._blob += handle
        if len(self._utc) >= self.SPILL_AT:
            self.spill()

    def spill(self) -> None:
        """Move the creates held in memory to the temporary file (created on first use, removed on close)."""
        n = len(self._utc)
        if n == 0:
            return
        if self._db is None:
            # "": a private temporary database on disk, deleted when closed; one thread at a time uses it, not
            # always the one that made it (a log unpickled in multiprocessing's result thread)
            self._db = sqlite3.connect("", check_same_thread=False)
            self._db.execute("CREATE TABLE creates (seq INTEGER PRIMARY KEY, utc INTEGER, off INTEGER, handle BLOB)")
        seqs = range(self._spilled, self._spilled + n)
        rows = zip(seqs, self._utc, self._off, map(self.handle, range(n)), strict=True)
        with self._db:
            self._db.executemany("INSERT INTO creates VALUES (?, ?, ?, ?)", rows)
        self._spilled += n
        self._clear()

    def _spilled_rows(self) -> Iterator[tuple[int, int, bytes]]:
        if self._db is not None:
            yield from self._db.execute("SELECT utc, off, handle FROM creates ORDER BY seq")

    def __getstate__(self) -> dict[str, Any]:  # pickled between processes (numpy fallback): all in memory
        rows = list(self.items())
        return {"rows": rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._db = None
        self._spilled = 0
        self._clear()
        for utc, off, handle in state["rows"]:
            self.append(utc, off, handle)

    def new_by_day(self, day_of: Callable[[int], str]) -> dict[str, tuple[int, bytes]]:
        """Per calendar day (``day_of`` a UTC minute): how many handles were first created on it, and the Merkle
        root over them (``protocol.merkle.identifiers_root``)."""
        out: dict[str, tuple[int, bytes]] = {}
        if self._db is None:
            first = self.first_creates()
            if not len(first.idx):
                return out
            minutes, inv = np.unique(first.utc_min, return_inverse=True)
            names = [day_of(m) for m in minutes.tolist()]
            days = sorted(set(names))
            day_index = np.array([days.index(n) for n in names], dtype=np.int64)[inv.reshape(-1)]
            for k, day in enumerate(days):
                idx = first.idx[day_index == k]
                out[day] = (len(idx), self.root(idx))
            return out
        self.spill()
        streams: dict[str, MerkleStream] = {}
        previous = None
        for handle, utc in self._db.execute("SELECT handle, utc FROM creates ORDER BY handle, utc, seq"):
            if handle == previous:  # not the earliest create of this handle
                continue
            previous = handle
            day = day_of(utc)
            stream = streams.get(day)
            if stream is None:
                stream = streams[day] = MerkleStream()
            stream.add(handle)
        return {day: (stream.count, stream.root()) for day, stream in sorted(streams.items())}

    def extend_rows(self, utc_min: Any, off_min: Any, hashes: Any, blob: bytes, starts: Any, lengths: Any) -> None:
        """Many creates at once (numpy arrays; ``hashes`` are h64 of the handles; ``starts`` index ``blob``)."""
        base = len(self._blob)
        self._utc.frombytes(np.ascontiguousarray(utc_min, dtype=np.int64).tobytes())
        self._off.frombytes(np.ascontiguousarray(off_min, dtype=np.int64).tobytes())
        self._hash.frombytes(np.ascontiguousarray(hashes, dtype=np.uint64).tobytes())
        self._start.frombytes((np.asarray(starts, dtype=np.int64) + base).tobytes())
        self._len.frombytes(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
        self._blob += blob
        if len(self._utc) >= self.SPILL_AT:
            self.spill()

    def extend(self, other: CreateLog) -> None:
        if other._db is not None:  # rare: keep the order, one create at a time
            for utc, off, handle in other.items():
                self.append(utc, off, handle)
            return
        base = len(self._blob)
        self._utc.extend(other._utc)
        self._off.extend(other._off)
        self._hash.extend(other._hash)
        self._start.frombytes((np.frombuffer(other._start, dtype=np.int64) + base).tobytes())
        self._len.extend(other._len)
        self._blob += other._blob
        if len(self._utc) >= self.SPILL_AT:
            self.spill()

    def handle(self, i: int) -> bytes:
        s = self._start[i]
        return bytes(self._blob[s : s + self._len[i]])

    def items(self) -> Iterator[tuple[int, int, bytes]]:
        yield from self._spilled_rows()
        for i in range(len(self._utc)):
            yield self._utc[i], self._off[i], self.handle(i)

    def first_creates(self) -> FirstCreates:
        """Each handle's earliest create (by instant; the first in file order among equal minutes), of a log held
        in memory (:meth:`new_by_day` also reads a spilled one)."""
        if self._db is not None:
            raise RuntimeError("first_creates: the log is spilled to disk; use new_by_day")
        n = len(self._utc)
        utc = np.frombuffer(self._utc, dtype=np.int64) if n else np.zeros(0, dtype=np.int64)
        off = np.frombuffer(self._off, dtype=np.int64) if n else np.zeros(0, dtype=np.int64)
        if n == 0:
            return FirstCreates(utc, off, np.zeros(0, dtype=np.int64))
        hashes = np.frombuffer(self._hash, dtype=np.uint64)
        order = np.lexsort((np.arange(n), utc, hashes))  # by hash, then minute, then file order
        sh = hashes[order]
        starts_group = np.ones(n, dtype=bool)
        starts_group[1:] = sh[1:] != sh[:-1]
        group_first = np.flatnonzero(starts_group)
        sizes = np.diff(np.append(group_first, n))
        picked = [order[group_first[sizes == 1]]]
        extra: list[int] = []
        for g in np.flatnonzero(sizes > 1).tolist():  # one handle created several times (or a hash collision)
            members = order[group_first[g] : group_first[g] + sizes[g]].tolist()  # minute, then file order
            seen: set[bytes] = set()
            for i in members:
                h = self.handle(i)
                if h not in seen:
                    seen.add(h)
                    extra.append(i)
        idx = np.sort(np.concatenate([*picked, np.array(extra, dtype=np.int64)]))
        return FirstCreates(utc_min=utc[idx], off_min=off[idx], idx=idx)

    def root(self, idx: Any) -> bytes:
        """RFC 9162 Merkle root over the handles at positions ``idx`` (``protocol.merkle.identifiers_root``)."""
        positions = np.ascontiguousarray(idx, dtype=np.int64)
        if native.AVAILABLE:
            return native.merkle_root(self._blob, self._start, self._len, positions)
        return merkle_root_sorted(sorted({self.handle(i) for i in positions.tolist()}))


class MerkleStream:
    """RFC 9162 Merkle root over entries added already sorted and distinct (``protocol.merkle.identifiers_root`` of
    their text), streaming: memory grows with the log of the count, not the count."""

    __slots__ = ("count", "stack")

    def __init__(self) -> None:
        self.stack: list[tuple[int, bytes]] = []  # perfect subtrees: (height, hash), heights strictly decreasing
        self.count = 0

    def add(self, entry: bytes) -> None:
        stack = self.stack
        height, h = 0, leaf_hash(entry)
        while stack and stack[-1][0] == height:
            h = node_hash(stack.pop()[1], h)
            height += 1
        stack.append((height, h))
        self.count += 1

    def root(self) -> bytes:
        if not self.stack:
            return EMPTY_ROOT
        root = self.stack[-1][1]
        for _, h in reversed(self.stack[:-1]):
            root = node_hash(h, root)
        return root


def merkle_root_sorted(leaves: Iterable[bytes]) -> bytes:
    """RFC 9162 Merkle root over entries already sorted and distinct (see :class:`MerkleStream`)."""
    stream = MerkleStream()
    for entry in leaves:
        stream.add(entry)
    return stream.root()


__all__ = ["CreateLog", "FirstCreates", "MerkleStream", "merkle_root_sorted"]
