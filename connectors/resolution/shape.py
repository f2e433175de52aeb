"""Per-day shape of resolution traffic, mergeable across collection rounds, workers and files.

One :class:`DayShape` per calendar day (in the counter's zone) holds:

- HyperLogLog sketches (Apache DataSketches, lg_k 12) of the distinct identifiers successfully resolved and of
  the distinct clients (over the stable 64-bit hashes of :mod:`connectors.resolution.hashing`, so sketches from
  any agent merge);
- the heaviest clients and /24 networks (a bounded summary: counts are exact for every key that was never evicted,
  which the heavy ones are not);
- replays: of the records whose hash falls in a fixed 1/64 slice, how many were seen before (a replayed line is
  the same record again; organic traffic has almost none);
- salted evidence samples of resolution and registration lines (see ``hashing``), at most ``MAX_SAMPLES_PER_KIND``
  a day each.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasketches import hll_sketch, hll_union, tgt_hll_type

from connectors.resolution.hashing import U64, to_signed

LG_K = 12
TOP_KEEP = 256  # keys kept in the heavy-hitter summaries
TOP_REPORT = 10
REPLAY_SLICE = np.uint64(1 << 58)  # records with hash below this are tracked for replays (1/64)
MAX_REPLAY_TRACKED = 100_000
MAX_SAMPLES_PER_KIND = 200
NEW_SLICE = np.uint64(1 << 62)  # new identifiers with hash below this are followed for same-day resolutions (1/4)
MAX_NEW_TRACKED = 200_000


@dataclass(slots=True)
class TopSummary:
    """Bounded heavy-hitter counts: key hash -> [count, name]."""

    counts: dict[int, list[Any]] = field(default_factory=dict)
    total: int = 0

    def add_many(
        self,
        hashes: list[int],
        counts: list[int],
        names: list[str] | Callable[[int], str],
        *,
        total: int | None = None,
    ) -> None:
        """Add counts by key hash; ``names``: the keys' names, or a function of the position giving them (called
        only for keys not yet held)."""
        name_of = names.__getitem__ if isinstance(names, list) else names
        for i, (h, n) in enumerate(zip(hashes, counts, strict=True)):
            got = self.counts.get(h)
            if got is None:
                self.counts[h] = [n, name_of(i)]
            else:
                got[0] += n
        self.total += sum(counts) if total is None else total
        self._prune()

    def merge(self, other: TopSummary) -> None:
        for h, (n, name) in other.counts.items():
            got = self.counts.get(h)
            if got is None:
                self.counts[h] = [n, name]
            else:
                got[0] += n
        self.total += other.total
        self._prune()

    def _prune(self) -> None:
        if len(self.counts) > 4 * TOP_KEEP:
            keep = sorted(self.counts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:TOP_KEEP]
            self.counts = dict(keep)

    def top(self, k: int = TOP_REPORT) -> list[tuple[str, int]]:
        return [(v[1], int(v[0])) for _, v in sorted(self.counts.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:k]]


def _sorted_member(known: Any, values: Any) -> Any:
    """For each value: is it in the sorted array ``known``?"""
    if len(known) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(known, values), len(known) - 1)
    return known[at] == values


def new_hll() -> hll_sketch:
    return hll_sketch(LG_K, tgt_hll_type.HLL_8)


def merge_hll(a: hll_sketch, b: hll_sketch) -> hll_sketch:
    union = hll_union(LG_K)
    union.update(a)
    union.update(b)
    return union.get_result(tgt_hll_type.HLL_8)


def hll_b64(sketch: hll_sketch) -> str:
    return base64.b64encode(sketch.serialize_compact()).decode("ascii")


def hll_from_b64(text: str) -> hll_sketch:
    return hll_sketch.deserialize(base64.b64decode(text, validate=True))


@dataclass(slots=True)
class DayShape:
    ids: hll_sketch = field(default_factory=new_hll)
    clients: hll_sketch = field(default_factory=new_hll)
    top_clients: TopSummary = field(default_factory=TopSummary)
    top_networks: TopSummary = field(default_factory=TopSummary)
    replay_seen: set[int] = field(default_factory=set)
    replay_slice: int = int(REPLAY_SLICE)
    replay_tracked: int = 0
    replay_duplicates: int = 0
    resolution_samples: list[str] = field(default_factory=list)
    registration_samples: list[str] = field(default_factory=list)
    new_seen: set[int] = field(default_factory=set)
    new_resolved: set[int] = field(default_factory=set)
    sample_log2: tuple[int, int] = (0, 0)  # (resolution, registration); (0, 0): no salt, no samples
    _new_array: Any = None  # new_seen as an array, rebuilt when it grows

    def add_new(self, hashes: Any) -> None:
        """Identifiers newly created (by hash); a quarter of them is followed."""
        picked = hashes[hashes < NEW_SLICE]
        if len(picked) and len(self.new_seen) < MAX_NEW_TRACKED:
            self.new_seen.update(picked.tolist())
            known = self._new_array
            if known is not None:  # kept sorted: membership is a binary search
                fresh = np.unique(picked)
                fresh = fresh[~_sorted_member(known, fresh)]
                self._new_array = np.insert(known, np.searchsorted(known, fresh), fresh)

    def add_resolved(self, hashes: Any) -> None:
        """Identifiers successfully resolved (by hash): which followed new ones were resolved."""
        if not self.new_seen:
            return
        cand = hashes[hashes < NEW_SLICE]
        known = self._new_array
        if known is None:
            known = self._new_array = np.sort(np.fromiter(self.new_seen, dtype=U64, count=len(self.new_seen)))
        self.new_resolved.update(cand[_sorted_member(known, cand)].tolist())

    def add_ids(self, hashes: Any) -> None:
        for h in to_signed(np.unique(hashes)):
            self.ids.update(h)

    def add_distinct_ids(self, hashes: Any) -> None:
        """Identifiers (by hash) already distinct: the sketch is the same as from :meth:`add_ids`."""
        for h in to_signed(hashes):
            self.ids.update(h)

    def add_clients(self, hashes: Any) -> None:
        self.add_distinct_clients(np.unique(hashes))

    def add_distinct_clients(self, hashes: Any) -> None:
        for h in to_signed(hashes):
            self.clients.update(h)

    def add_records(self, records: Any) -> None:
        tracked = records[records < U64(self.replay_slice)]
        seen = self.replay_seen
        for r in tracked.tolist():
            self.replay_tracked += 1
            if r in seen:
                self.replay_duplicates += 1
            else:
                seen.add(r)
        if len(seen) > MAX_REPLAY_TRACKED:
            self.replay_slice //= 2
            self.replay_seen = {r for r in seen if r < self.replay_slice}

    def add_sample(self, kind: str, line: str) -> None:
        target = self.registration_samples if kind == "registration" else self.resolution_samples
        if len(target) < MAX_SAMPLES_PER_KIND:
            target.append(line)

    def merge(self, other: DayShape) -> None:
        self.ids = merge_hll(self.ids, other.ids)
        self.clients = merge_hll(self.clients, other.clients)
        self.top_clients.merge(other.top_clients)
        self.top_networks.merge(other.top_networks)
        self.replay_slice = min(self.replay_slice, other.replay_slice)
        cross = 0
        for r in other.replay_seen:
            if r >= self.replay_slice:
                continue
            if r in self.replay_seen:
                cross += 1
            else:
                self.replay_seen.add(r)
        self.replay_seen = {r for r in self.replay_seen if r < self.replay_slice}
        self.replay_tracked += other.replay_tracked
        self.replay_duplicates += other.replay_duplicates + cross
        self.sample_log2 = max(self.sample_log2, other.sample_log2)
        self.new_seen |= other.new_seen
        self._new_array = None
        self.new_resolved |= other.new_resolved
        for line in other.resolution_samples:
            self.add_sample("resolution", line)
        for line in other.registration_samples:
            self.add_sample("registration", line)

    # pickling (multiprocessing workers): sketches as bytes
    def __getstate__(self) -> dict[str, Any]:
        return {
            "ids": self.ids.serialize_compact(),
            "clients": self.clients.serialize_compact(),
            "top_clients": (self.top_clients.counts, self.top_clients.total),
            "top_networks": (self.top_networks.counts, self.top_networks.total),
            "replay": (self.replay_seen, self.replay_slice, self.replay_tracked, self.replay_duplicates),
            "samples": (self.resolution_samples, self.registration_samples),
            "new": (self.new_seen, self.new_resolved),
            "sample_log2": self.sample_log2,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.ids = hll_sketch.deserialize(state["ids"])
        self.clients = hll_sketch.deserialize(state["clients"])
        self.top_clients = TopSummary(*state["top_clients"])
        self.top_networks = TopSummary(*state["top_networks"])
        self.replay_seen, self.replay_slice, self.replay_tracked, self.replay_duplicates = state["replay"]
        self.resolution_samples, self.registration_samples = state["samples"]
        self.new_seen, self.new_resolved = state["new"]
        self.sample_log2 = state["sample_log2"]
        self._new_array = None

    def summary(self) -> dict[str, Any]:
        """Plain values for reports and count-logs."""
        return {
            "distinct_identifiers": round(self.ids.get_estimate()),
            "distinct_clients": round(self.clients.get_estimate()),
            "identifiers_sketch": hll_b64(self.ids),
            "clients_sketch": hll_b64(self.clients),
            "top_clients": self.top_clients.top(),
            "top_networks": self.top_networks.top(),
            "lines_in_summaries": self.top_clients.total,
            "replay_tracked": self.replay_tracked,
            "replay_duplicates": self.replay_duplicates,
            "new_tracked": len(self.new_seen),
            "new_resolved": len(self.new_resolved),
            "resolution_sample_log2": self.sample_log2[0],
            "registration_sample_log2": self.sample_log2[1],
            "resolution_samples": list(self.resolution_samples),
            "registration_samples": list(self.registration_samples),
        }


def merge_shapes(into: dict[str, DayShape], other: Iterable[tuple[str, DayShape]]) -> None:
    for day, shape in other:
        if day in into:
            into[day].merge(shape)
        else:
            into[day] = shape
