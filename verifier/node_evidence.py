"""Measure 2 evidence from resolution-node reports: merged distinct counts, day shape, anomaly flags, sample checks.

Pure functions: report payloads (``protocol.report`` models) in, results out; no I/O, no clock. Flags inform the
officials beside the verdict; they never change a count.

- :func:`day_evidence` folds the ``resolution`` parts of one agent's reports into one :class:`DayEvidence` per
  calendar day: exact successful resolutions (from the buckets), the hourly profile, HyperLogLog sketches merged
  across periods (Apache DataSketches, lg_k 12), the heaviest clients and /24 networks, replay tracking, follow-up
  of new identifiers, evidence samples and gaps.
- :func:`anomaly_flags` reads one day's evidence and names what does not look like organic traffic:
  ``flat_loop`` (a few clients make most of the traffic, flat around the clock), ``replayed_lines`` (the same
  record again), ``bulk_unresolved`` (many new identifiers, almost none resolved), ``samples_inconsistent`` (fewer
  or more salted samples than the count implies).
- :func:`sample_selected` recomputes, from a sampled line and the salt the verifier issued, whether the line was
  due to be sampled (the two stages of ``protocol/sampling.py``, the same the agent applies).
- :func:`verify_new_identifier` checks an identifier an official drew against the period's Merkle root.
- With a registration source (the node's registry, ``connectors/resolution/registrations.py``), a day shows the
  access log's creates beside the registry's, and ``overwrites_as_creates`` flags a log that saw far more creates
  than the registry recorded (a REST ``PUT`` over a live handle logs as a create); the registry's samples are
  recomputed under the salt as well (:func:`registry_sample_selected`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from urllib.parse import unquote_to_bytes

from datasketches import hll_sketch, hll_union, tgt_hll_type

from protocol.merkle import identifiers_root, leaf_hash, verify_inclusion
from protocol.report import ReportV1
from protocol.sampling import elapsed_key, record_hash, sampled

LG_K = 12
OP_RESOLUTION, OP_CREATE, RC_SUCCESS = 1, 100, 1

# Flag thresholds (informative; the rule files may later carry them).
FLAT_TOP_CLIENTS = 3
FLAT_TOP_SHARE = 0.5
FLAT_HOURLY_CV = 0.2
FLAT_RESOLUTIONS_PER_ID = 1000.0
REPLAY_MIN_TRACKED = 100
REPLAY_RATE = 0.01
BULK_MIN_TRACKED = 100
BULK_RESOLVED_RATE = 0.05
SAMPLE_SIGMAS = 4.0
OVERWRITE_MIN_EXCESS = 20  # log creates beyond the registry's, at least this many ...
OVERWRITE_RATIO = 1.25  # ... and at least this many times the registry's
REGISTRY_SAMPLE_LABEL = b"tianping/registration-sample/v1\x00"


# --- sketches ----------------------------------------------------------------------------------------------


def merge_sketches(sketches_b64: Iterable[str]) -> str:
    """Union of DataSketches HLL images (base64); the empty union when there are none."""
    union = hll_union(LG_K)
    for text in sketches_b64:
        if text:
            union.update(hll_sketch.deserialize(base64.b64decode(text, validate=True)))
    return base64.b64encode(union.get_result(tgt_hll_type.HLL_8).serialize_compact()).decode("ascii")


def estimate(sketch_b64: str) -> float:
    if not sketch_b64:
        return 0.0
    return float(hll_sketch.deserialize(base64.b64decode(sketch_b64, validate=True)).get_estimate())


# --- one day from reports ----------------------------------------------------------------------------------


@dataclass(slots=True)
class DayEvidence:
    day: date
    resolutions_ok: int = 0
    resolutions_failed: int = 0
    hourly_ok: list[int] = field(default_factory=lambda: [0] * 24)
    identifiers_sketch: str = ""
    clients_sketch: str = ""
    lines: int = 0
    top_clients: dict[str, int] = field(default_factory=dict)
    top_networks: dict[str, int] = field(default_factory=dict)
    replay_tracked: int = 0
    replay_duplicates: int = 0
    new_tracked: int = 0
    new_resolved: int = 0
    resolution_sample_log2: int = 0
    registration_sample_log2: int = 0
    resolution_samples: list[str] = field(default_factory=list)
    registration_samples: list[str] = field(default_factory=list)
    gaps: list[tuple[datetime, datetime, str]] = field(default_factory=list)
    creates_log: int = 0  # successful creates (op 100, resp 1) in the access log's buckets
    creates_registry: int | None = None  # new registrations from the registry; None: no registration source
    registrations_source: str | None = None
    registry_sample_log2: int = 0
    registry_samples: list[str] = field(default_factory=list)
    registration_gaps: list[tuple[datetime, datetime, str]] = field(default_factory=list)

    @property
    def distinct_identifiers(self) -> float:
        return estimate(self.identifiers_sketch)

    @property
    def distinct_clients(self) -> float:
        return estimate(self.clients_sketch)

    def share_of_top(self, k: int, *, networks: bool = False) -> float:
        counts = sorted((self.top_networks if networks else self.top_clients).values(), reverse=True)
        return sum(counts[:k]) / self.lines if self.lines else 0.0


def day_evidence(reports: Sequence[ReportV1], zone: tzinfo) -> dict[date, DayEvidence]:
    """One agent's reports (any order) folded per calendar day in ``zone``."""
    days: dict[date, DayEvidence] = {}

    def get(d: date) -> DayEvidence:
        found = days.get(d)
        if found is None:
            found = days[d] = DayEvidence(day=d)
        return found

    for report in sorted(reports, key=lambda r: r.seq):
        res = report.resolution
        if res is None:
            continue
        touched: set[date] = set()
        for b in res.buckets:
            if b.op == OP_CREATE and b.resp == RC_SUCCESS:
                get(b.minute.astimezone(zone).date()).creates_log += b.count
            if b.op != OP_RESOLUTION:
                continue
            local = b.minute.astimezone(zone)
            touched.add(local.date())
            ev = get(local.date())
            if b.resp == RC_SUCCESS:
                ev.resolutions_ok += b.count
                ev.hourly_ok[local.hour] += b.count
            else:
                ev.resolutions_failed += b.count
        for shape in res.days:
            ev = get(shape.day)
            ev.identifiers_sketch = merge_sketches([ev.identifiers_sketch, shape.identifiers_sketch])
            ev.clients_sketch = merge_sketches([ev.clients_sketch, shape.clients_sketch])
            ev.lines += shape.lines
            for target, shares in ((ev.top_clients, shape.top_clients), (ev.top_networks, shape.top_networks)):
                for s in shares:
                    target[s.name] = target.get(s.name, 0) + s.count
            ev.replay_tracked += shape.replay_tracked
            ev.replay_duplicates += shape.replay_duplicates
            ev.new_tracked += shape.new_tracked
            ev.new_resolved += shape.new_resolved
            ev.resolution_sample_log2 = max(ev.resolution_sample_log2, shape.resolution_sample_log2)
            ev.registration_sample_log2 = max(ev.registration_sample_log2, shape.registration_sample_log2)
            ev.resolution_samples.extend(shape.resolution_samples)
            ev.registration_samples.extend(shape.registration_samples)
        for gap in res.gaps:
            get(gap.start.astimezone(zone).date()).gaps.append((gap.start, gap.end, gap.reason))
        if res.registrations_source is not None:
            touched |= {b.minute.astimezone(zone).date() for b in res.buckets} | {s.day for s in res.days}
            for reg in res.registrations:
                ev = get(reg.day)
                ev.creates_registry = (ev.creates_registry or 0) + reg.registrations
                ev.registry_sample_log2 = max(ev.registry_sample_log2, reg.sample_log2)
                ev.registry_samples.extend(reg.samples)
            for gap in res.registration_gaps:
                ev = get(gap.start.astimezone(zone).date())
                ev.registration_gaps.append((gap.start, gap.end, gap.reason))
                touched.add(ev.day)
            for d in touched | {r.day for r in res.registrations}:
                ev = get(d)
                ev.registrations_source = res.registrations_source
                if ev.creates_registry is None:
                    ev.creates_registry = 0  # the registry was read: none that day in this period
    return dict(sorted(days.items()))


# --- flags -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flag:
    code: str
    message: str
    value: float
    threshold: float


def hourly_cv(hourly: Sequence[int]) -> float:
    """Coefficient of variation of the hourly counts (organic traffic has a strong daily rhythm)."""
    n = len(hourly)
    mean = sum(hourly) / n if n else 0.0
    if mean == 0:
        return 0.0
    return math.sqrt(sum((h - mean) ** 2 for h in hourly) / n) / mean


def anomaly_flags(ev: DayEvidence, salt: bytes | None = None) -> list[Flag]:
    """The day's flags; with the agent's sampling ``salt``, also whether every sample was due under it."""
    flags: list[Flag] = []
    top = ev.share_of_top(FLAT_TOP_CLIENTS)
    cv = hourly_cv(ev.hourly_ok)
    distinct = ev.distinct_identifiers
    per_id = ev.resolutions_ok / distinct if distinct else 0.0
    if top >= FLAT_TOP_SHARE and (cv < FLAT_HOURLY_CV or per_id >= FLAT_RESOLUTIONS_PER_ID):
        flags.append(Flag(
            "flat_loop",
            f"{top:.0%} of the day's lines come from its top {FLAT_TOP_CLIENTS} clients, with an hourly variation "
            f"of {cv:.2f} and {per_id:.0f} resolutions per distinct identifier: not the shape of organic traffic",
            top, FLAT_TOP_SHARE,
        ))
    if ev.replay_tracked >= REPLAY_MIN_TRACKED:
        rate = ev.replay_duplicates / ev.replay_tracked
        if rate >= REPLAY_RATE:
            flags.append(Flag(
                "replayed_lines",
                f"{rate:.1%} of the tracked records ({ev.replay_duplicates} of {ev.replay_tracked}) repeat an "
                "earlier record exactly (same client, identifier, millisecond, codes and elapsed time)",
                rate, REPLAY_RATE,
            ))
    if ev.new_tracked >= BULK_MIN_TRACKED:
        rate = ev.new_resolved / ev.new_tracked
        if rate < BULK_RESOLVED_RATE:
            flags.append(Flag(
                "bulk_unresolved",
                f"only {rate:.1%} of the followed new identifiers ({ev.new_resolved} of {ev.new_tracked}) were "
                "resolved the day they were registered",
                rate, BULK_RESOLVED_RATE,
            ))
    if ev.creates_registry is not None and not ev.registration_gaps:
        excess = ev.creates_log - ev.creates_registry
        if excess >= OVERWRITE_MIN_EXCESS and ev.creates_log >= OVERWRITE_RATIO * ev.creates_registry:
            flags.append(Flag(
                "overwrites_as_creates",
                f"the access log saw {ev.creates_log} successful creates where the registry recorded "
                f"{ev.creates_registry} new registrations: {excess} creates overwrote existing identifiers (a REST "
                "PUT logs as a create); new registrations count from the registry",
                float(ev.creates_log), OVERWRITE_RATIO * ev.creates_registry,
            ))
    if ev.resolution_sample_log2:
        expected = ev.resolutions_ok / (1 << ev.resolution_sample_log2)  # samples are drawn from op 1 lines
        got = len(ev.resolution_samples)
        # resolution samples come from all resolution lines (ok and failed)
        expected = (ev.resolutions_ok + ev.resolutions_failed) / (1 << ev.resolution_sample_log2)
        spread = SAMPLE_SIGMAS * math.sqrt(max(expected, 1.0))
        if abs(got - expected) > spread and got < 200:
            flags.append(Flag(
                "samples_inconsistent",
                f"{got} salted resolution samples where about {expected:.1f} ± {spread:.1f} were due",
                float(got), expected,
            ))
    if salt is not None:
        refused = refused_samples(salt, ev)
        if refused:
            total = len(ev.resolution_samples) + len(ev.registration_samples) + len(ev.registry_samples)
            flags.append(Flag(
                "samples_not_due",
                f"{len(refused)} of the day's {total} samples were not due under the salt the verifier issued to "
                f"this agent (salt {salt_digest(salt)}): the node chose them, e.g. {refused[0][:120]!r}",
                float(len(refused)), 0.0,
            ))
    return flags


# --- samples -----------------------------------------------------------------------------------------------

class SampleLineInvalid(ValueError):
    """A sampled line that is not a HANDLE.NET access-log line."""


def _record(line: bytes) -> tuple[int, int]:
    """(record hash, opCode) of a well-formed line."""
    fields = line.split(b" ")
    if len(fields) != 9:
        raise SampleLineInvalid(f"expected 9 space-separated fields, got {len(fields)}")
    ip, _, day, clock, op_b, resp_b, elapsed_b, _, handle_b = fields
    try:
        stamp = datetime.strptime((day + b" " + clock).decode("ascii"), '"%Y-%m-%d %H:%M:%S.%f%z"')
        op, resp = int(op_b), int(resp_b)
        digits = elapsed_b.removesuffix(b"ms")
        elapsed = elapsed_key(digits)
        handle = unquote_to_bytes(handle_b).decode("utf-8").encode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleLineInvalid(f"expected a HANDLE.NET access-log line, got one that fails to parse ({exc})") from None
    utc_ms = (stamp.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    return record_hash(ip, handle, utc_ms, op, resp, elapsed), op


def sample_selected(salt: bytes, line: str | bytes, rate_log2: int) -> bool:
    """Was this line due to be sampled under ``salt`` at one line in 2**rate_log2? (Both stages recomputed.)"""
    raw = line.encode("utf-8") if isinstance(line, str) else line
    rec, _ = _record(raw)
    return sampled(salt, rec, raw, rate_log2)


def refused_samples(salt: bytes, ev: DayEvidence) -> list[str]:
    """The day's samples that were not due under ``salt`` (a node that picks its own samples shows up here)."""
    refused = []
    for lines, rate in ((ev.resolution_samples, ev.resolution_sample_log2),
                        (ev.registration_samples, ev.registration_sample_log2)):
        for line in lines:
            try:
                ok = rate > 0 and sample_selected(salt, line, rate)
            except SampleLineInvalid:
                ok = False
            if not ok:
                refused.append(line)
    for handle in ev.registry_samples:
        if not registry_sample_selected(salt, handle, ev.registry_sample_log2):
            refused.append(handle)
    return refused


def registry_sample_selected(salt: bytes, handle: str, rate_log2: int) -> bool:
    """Was this new registration (from the node's registry) due to be sampled under ``salt`` at one in
    2**rate_log2? The first 8 bytes, big-endian, of HMAC-SHA256(salt, "tianping/registration-sample/v1" 0x00
    handle) below 2**(64 - rate_log2) — the agent's rule (connectors/resolution/registrations.py), recomputed."""
    if rate_log2 <= 0:
        return False
    digest = hmac.digest(salt, REGISTRY_SAMPLE_LABEL + handle.encode("utf-8"), "sha256")
    return int.from_bytes(digest[:8], "big") < 1 << (64 - rate_log2)


# --- new identifiers ---------------------------------------------------------------------------------------


def new_identifiers_root(handles: Iterable[str]) -> str:
    """The root a report carries over its new identifiers (sorted, distinct, UTF-8 leaves, RFC 9162)."""
    return identifiers_root(handles).hex()


def verify_new_identifier(handle: str, index: int, size: int, proof: Sequence[bytes], root_hex: str) -> None:
    """An identifier an official drew is under the reported root (raises ``ProofInvalid`` otherwise)."""
    verify_inclusion(leaf_hash(handle.encode("utf-8")), index, size, proof, bytes.fromhex(root_hex))


def salt_digest(salt: bytes) -> str:
    """A short public name for a salt (to say which salt a check used without revealing it)."""
    return hashlib.sha256(b"tianping salt " + salt).hexdigest()[:16]


__all__ = [
    "DayEvidence",
    "Flag",
    "SampleLineInvalid",
    "anomaly_flags",
    "day_evidence",
    "estimate",
    "hourly_cv",
    "merge_sketches",
    "new_identifiers_root",
    "refused_samples",
    "registry_sample_selected",
    "salt_digest",
    "sample_selected",
    "timezone",
    "verify_new_identifier",
]
