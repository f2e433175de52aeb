"""Merging what the connectors saw into physical devices, and rolling rounds up into one report period.

One device seen through several protocols counts once: every observation contributes the identity keys it
knows (its own identity, plus manufacturer + model + serial number and ProductInstanceUri from its evidence),
keys that occur together are joined (union-find), and each joined group is one device. The fingerprint is taken
from manufacturer + model + serial number when known (the identity every protocol can carry, so two agents
seeing the same device through different protocols still collide), else from the strongest identity; the other
keys travel as aliases. Raw identities never leave this module: only keyed fingerprints do.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from connectors.base import (
    OP_CREATE,
    RC_SUCCESS,
    DeviceIdentity,
    DeviceObservation,
    DeviceStatus,
    ResolutionBatch,
)
from connectors.resolution.handle_log import new_identifiers_root
from connectors.resolution.shape import DayShape, merge_shapes
from protocol.fingerprint import device_fingerprint
from protocol.report import (
    ConnectorStatus,
    DeviceEntry,
    EvidenceSample,
    RegistrationDay,
    ResolutionCount,
    ResolutionDay,
    ResolutionGap,
    ResolutionShare,
    ResolutionSummary,
)
from protocol.uscc import UsccInvalid, validate_uscc

log = logging.getLogger(__name__)

# Evidence keys that carry raw identity: used for merging, never sent.
IDENTITY_EVIDENCE_KEYS = frozenset({"manufacturer", "model", "serial", "product_instance_uri"})
_RANK = {"msn": 3, "uri": 2, "local": 1}
MAX_RESOLUTION_DAYS = 3  # a report's resolution days (late lines of yesterday, today, a skewed tomorrow)
_STATUS_NAME = {
    DeviceStatus.REGISTERED: "registered",
    DeviceStatus.REACHABLE: "reachable",
    DeviceStatus.ACTIVE: "active",
}


def identity_keys(
    obs: DeviceObservation, declared: Mapping[tuple[str, str, str], str] | None = None
) -> list[DeviceIdentity]:
    """Every identity an observation carries, its own first.

    The last is always the source-local name (protocol, source, local id): it lets a device first seen without
    its identity (Sparkplug DDATA before the DBIRTH) join the same device once the identity arrives.
    """
    found = [obs.identity]
    ev = obs.evidence
    m, mo, s = (str(ev.get(k, "") or "") for k in ("manufacturer", "model", "serial"))
    if m.strip() and mo.strip() and s.strip():
        found.append(DeviceIdentity.manufacturer_model_serial(m, mo, s))
    uri = str(ev.get("product_instance_uri", "") or "")
    if uri.strip():
        found.append(DeviceIdentity.product_instance_uri(uri))
    found.append(DeviceIdentity.local(obs.protocol, obs.source, obs.local_id))
    name = (declared or {}).get((obs.protocol, obs.source, obs.local_id))
    if name is not None:  # the operator declared which entries are one physical device
        found.append(DeviceIdentity.local("declared", name))
    return found


def _primary(ids: Iterable[DeviceIdentity]) -> DeviceIdentity:
    """msn, else uri, else the operator's declared name, else a protocol-local name (deterministically)."""
    ordered = sorted(ids, key=lambda i: (i.scheme == "local" and i.parts[0] == "declared", i.key()))
    by_scheme = {i.scheme: i for i in ordered}
    for scheme in ("msn", "uri", "local"):
        if scheme in by_scheme:
            return by_scheme[scheme]
    raise ValueError("a device group without identities")  # unreachable: every observation has one


@dataclass(slots=True)
class MergedDevice:
    """One physical device in one round."""

    primary: DeviceIdentity
    aliases: tuple[DeviceIdentity, ...]
    observations: tuple[DeviceObservation, ...]

    @property
    def status(self) -> DeviceStatus:
        return max(o.status for o in self.observations)

    @property
    def protocols(self) -> tuple[str, ...]:
        return tuple(sorted({o.protocol for o in self.observations}))

    @property
    def enterprise(self) -> str | None:
        named = Counter(o.enterprise for o in self.observations if o.enterprise)
        return min(named, key=lambda e: (-named[e], e)) if named else None

    @property
    def enterprise_conflict(self) -> bool:
        return len({o.enterprise for o in self.observations if o.enterprise}) > 1


def merge_observations(
    observations: Sequence[DeviceObservation], declared: Mapping[tuple[str, str, str], str] | None = None
) -> list[MergedDevice]:
    """Join observations that share any identity key (or that the operator declared the same device); each
    group is one physical device."""
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    keys_of: list[list[DeviceIdentity]] = []
    for obs in observations:
        ids = identity_keys(obs, declared)
        keys_of.append(ids)
        root = find(ids[0].key())
        for other in ids[1:]:
            r = find(other.key())
            if r != root:
                parent[r] = root
    groups: dict[str, tuple[list[DeviceObservation], dict[str, DeviceIdentity]]] = {}
    for obs, ids in zip(observations, keys_of, strict=True):
        bucket = groups.setdefault(find(ids[0].key()), ([], {}))
        bucket[0].append(obs)
        for i in ids:
            bucket[1][i.key()] = i
    merged = []
    for obs_list, idents in groups.values():
        primary = _primary(idents.values())
        aliases = tuple(i for k, i in sorted(idents.items()) if k != primary.key())
        merged.append(MergedDevice(primary=primary, aliases=aliases, observations=tuple(obs_list)))
    merged.sort(key=lambda d: d.primary.key())
    return merged


@dataclass(frozen=True, slots=True)
class TierCounts:
    registered: int = 0
    reachable: int = 0
    active: int = 0


def tier_counts(statuses: Iterable[DeviceStatus]) -> TierCounts:
    """Counts per tier, each tier including the higher ones (an active device is also reachable and registered)."""
    c = Counter(statuses)
    active = c[DeviceStatus.ACTIVE]
    reachable = active + c[DeviceStatus.REACHABLE]
    return TierCounts(registered=reachable + c[DeviceStatus.REGISTERED], reachable=reachable, active=active)


@dataclass(frozen=True, slots=True)
class ScanSummary:
    per_protocol: Mapping[str, TierCounts]
    union: TierCounts
    merged_across_protocols: int  # physical devices seen through more than one protocol
    unmatched: int  # devices known only by a protocol-local identity (no identity another protocol could match)
    enterprises_active: int


def summarize(observations: Sequence[DeviceObservation], merged: Sequence[MergedDevice]) -> ScanSummary:
    per: dict[str, list[DeviceStatus]] = {}
    for o in observations:
        per.setdefault(o.protocol, []).append(o.status)
    return ScanSummary(
        per_protocol={p: tier_counts(s) for p, s in sorted(per.items())},
        union=tier_counts(d.status for d in merged),
        merged_across_protocols=sum(1 for d in merged if len(d.protocols) > 1),
        unmatched=sum(1 for d in merged if d.primary.scheme == "local" and d.primary.parts[0] != "declared"),
        enterprises_active=len({d.enterprise for d in merged if d.status == DeviceStatus.ACTIVE and d.enterprise}),
    )


@dataclass(slots=True)
class _DeviceAcc:
    rank: int  # strength of the primary identity's scheme (msn 3, uri 2, local 1)
    aliases: set[str]
    enterprise: str | None
    protocols: set[str]
    status: DeviceStatus
    first_seen: datetime
    last_seen: datetime
    evidence: tuple[str, Mapping[str, object]] | None


@dataclass(slots=True)
class PeriodRollup:
    """Everything observed since the last report: devices (by fingerprint) and resolution buckets."""

    fingerprint_key: bytes
    devices: dict[str, _DeviceAcc] = field(default_factory=dict)
    buckets: Counter[tuple[datetime, int, int, str]] = field(default_factory=Counter)
    lines_read: int = 0
    malformed_lines: int = 0
    new_identifiers: int = 0
    errors: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)

    invalid_enterprises: Counter[str] = field(default_factory=Counter)
    _owner: dict[str, str] = field(default_factory=dict)  # any fingerprint or alias -> the device's fingerprint
    # Issue 4: per-day shape of resolution traffic, the period's created handles, gaps in the log.
    resolution_days: dict[str, DayShape] = field(default_factory=dict)
    created_handles: set[str] = field(default_factory=set)
    resolution_gaps: list[tuple[datetime, datetime, str]] = field(default_factory=list)
    # Registration source (connectors/resolution/registrations.py), when one is configured: its kind, the
    # period's new registrations per day (distinct), their samples, and the stretches it could not be read.
    registrations_source: str | None = None
    registrations: dict[str, set[str]] = field(default_factory=dict)
    registration_samples: dict[str, list[str]] = field(default_factory=dict)
    registration_sample_log2: int = 0
    registration_gaps: list[tuple[datetime, datetime, str]] = field(default_factory=list)

    def _valid_enterprise(self, code: str | None) -> str | None:
        """A source that names a malformed USCC does not break the report: the device goes unattributed."""
        if code is None:
            return None
        try:
            return validate_uscc(code)
        except UsccInvalid as exc:
            if not self.invalid_enterprises[code]:
                log.warning("device attributed to an invalid enterprise code: %s", exc)
            self.invalid_enterprises[code] += 1
            return None

    def add_devices(self, merged: Sequence[MergedDevice], *, now: datetime) -> None:
        """Fold one round in. A device that shares any fingerprint or alias with one seen earlier in the period
        is the same device: the two are joined under the stronger identity."""
        for dev in merged:
            enterprise = self._valid_enterprise(dev.enterprise)
            fp = device_fingerprint(self.fingerprint_key, dev.primary.key())
            aliases = {device_fingerprint(self.fingerprint_key, a.key()) for a in dev.aliases}
            sample = next(((o.protocol, o.evidence) for o in dev.observations if o.evidence), None)
            rank = _RANK[dev.primary.scheme]
            acc = _DeviceAcc(rank, aliases, enterprise, set(dev.protocols), dev.status, now, now, sample)
            for earlier_fp in sorted({self._owner[k] for k in {fp, *aliases} if k in self._owner}):
                earlier = self.devices.pop(earlier_fp)
                if earlier.rank > acc.rank or (earlier.rank == acc.rank and earlier_fp != fp and earlier_fp < fp):
                    fp, acc, earlier, earlier_fp = earlier_fp, earlier, acc, fp
                acc.aliases |= earlier.aliases | {earlier_fp}
                acc.enterprise = acc.enterprise or earlier.enterprise
                acc.protocols |= earlier.protocols
                acc.status = max(acc.status, earlier.status)
                acc.first_seen = min(acc.first_seen, earlier.first_seen)
                acc.last_seen = max(acc.last_seen, earlier.last_seen)
                acc.evidence = acc.evidence or earlier.evidence
            acc.aliases.discard(fp)
            self.devices[fp] = acc
            for k in {fp, *acc.aliases}:
                self._owner[k] = fp

    def add_resolution(self, batch: ResolutionBatch) -> None:
        for b in batch.buckets:
            self.buckets[(b.minute, b.op_code, b.resp_code, b.transport)] += b.count
            if b.op_code == OP_CREATE and b.resp_code == RC_SUCCESS:
                self.new_identifiers += b.count
        self.lines_read += batch.lines_read
        self.malformed_lines += batch.malformed_lines
        merge_shapes(self.resolution_days, batch.day_shapes.items())
        self.created_handles.update(batch.created_handles)
        self.resolution_gaps.extend(batch.gaps)
        regs = getattr(batch, "registrations", None)  # ResolutionBatchWithRegistrations (connector.py)
        if regs is not None:
            self.registrations_source = regs.source
            self.registration_sample_log2 = max(self.registration_sample_log2, regs.sample_log2)
            for day, got in regs.days.items():
                self.registrations.setdefault(day, set()).update(got.handles)
                samples = self.registration_samples.setdefault(day, [])
                samples.extend(h for h in got.samples if h not in samples)
            self.registration_gaps.extend(regs.gaps)

    def note_health(self, kind: str, source: str, errors: Mapping[str, int]) -> None:
        self.errors[(kind, source)] = dict(errors)

    def device_entries(self) -> tuple[DeviceEntry, ...]:
        return tuple(
            DeviceEntry(
                fp=fp,
                aliases=tuple(sorted(a.aliases - {fp})),
                enterprise=a.enterprise,
                protocols=tuple(sorted(a.protocols)),  # type: ignore[arg-type]
                status=_STATUS_NAME[a.status],  # type: ignore[arg-type]
                first_seen=a.first_seen,
                last_seen=a.last_seen,
            )
            for fp, a in sorted(self.devices.items())
        )

    def resolution_summary(self, *, has_source: bool) -> ResolutionSummary | None:
        if not has_source:
            return None
        days = sorted(self.resolution_days.items())[-MAX_RESOLUTION_DAYS:]
        return ResolutionSummary(
            lines_read=self.lines_read,
            malformed_lines=self.malformed_lines,
            new_identifiers=self.new_identifiers,
            buckets=tuple(
                ResolutionCount(minute=m, op=op, resp=rc, transport=t, count=n)
                for (m, op, rc, t), n in sorted(self.buckets.items())
            ),
            days=tuple(_resolution_day(day, shape) for day, shape in days),
            new_identifiers_root=new_identifiers_root(self.created_handles).hex() if self.created_handles else None,
            new_identifiers_count=len(self.created_handles),
            gaps=tuple(ResolutionGap(start=a, end=b, reason=r[:200]) for a, b, r in self.resolution_gaps[:1000]),
            **self._registration_fields(),
        )

    def _registration_fields(self) -> dict[str, Any]:
        if self.registrations_source is None:
            return {}
        return {
            "registrations_source": self.registrations_source,
            "registrations": tuple(
                RegistrationDay(day=date.fromisoformat(day), registrations=len(handles),
                                registrations_root=new_identifiers_root(handles).hex(),
                                sample_log2=self.registration_sample_log2,
                                samples=tuple(self.registration_samples.get(day, ())[:500]))
                for day, handles in sorted(self.registrations.items()) if handles
            ),
            "registration_gaps": tuple(ResolutionGap(start=a, end=b, reason=r[:200])
                                       for a, b, r in _merged_gaps(self.registration_gaps)[:1000]),
        }

    def connector_statuses(self) -> tuple[ConnectorStatus, ...]:
        statuses = tuple(
            ConnectorStatus(kind=k, source=s[:200], errors={c[:200]: n for c, n in e.items()})
            for (k, s), e in sorted(self.errors.items())
        )
        if self.invalid_enterprises:
            bad = {"enterprise_invalid": sum(self.invalid_enterprises.values())}
            statuses += (ConnectorStatus(kind="agent", source="rollup", errors=bad),)
        return statuses

    def evidence_samples(self, size: int) -> tuple[EvidenceSample, ...]:
        """A deterministic sample: the devices whose fingerprints hash lowest (the node cannot pick them)."""
        ranked = sorted(self.devices, key=lambda fp: hashlib.sha256(bytes.fromhex(fp)).digest())
        out: list[EvidenceSample] = []
        for fp in ranked:
            acc = self.devices[fp]
            if acc.evidence is None or len(out) >= size:
                continue
            proto, ev = acc.evidence
            data = {k[:200]: str(v)[:2000] for k, v in sorted(ev.items()) if k not in IDENTITY_EVIDENCE_KEYS}
            if data:
                out.append(EvidenceSample(fp=fp, protocol=proto, data=data))  # type: ignore[arg-type]
        return tuple(out)


def _merged_gaps(gaps: Sequence[tuple[datetime, datetime, str]]) -> list[tuple[datetime, datetime, str]]:
    """Consecutive failed polls as one stretch (the reason of the first)."""
    out: list[tuple[datetime, datetime, str]] = []
    for a, b, r in sorted(gaps):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b), out[-1][2])
        else:
            out.append((a, b, r))
    return out


def _resolution_day(day: str, shape: DayShape) -> ResolutionDay:
    got = shape.summary()

    def shares(items: list[tuple[str, int]]) -> tuple[ResolutionShare, ...]:
        return tuple(ResolutionShare(name=(name or "?")[:100], count=n) for name, n in items)

    return ResolutionDay(
        day=date.fromisoformat(day),
        distinct_identifiers=got["distinct_identifiers"],
        distinct_clients=got["distinct_clients"],
        identifiers_sketch=got["identifiers_sketch"],
        clients_sketch=got["clients_sketch"],
        lines=got["lines_in_summaries"],
        top_clients=shares(got["top_clients"]),
        top_networks=shares(got["top_networks"]),
        replay_tracked=got["replay_tracked"],
        replay_duplicates=got["replay_duplicates"],
        new_tracked=got["new_tracked"],
        new_resolved=got["new_resolved"],
        resolution_sample_log2=got["resolution_sample_log2"],
        registration_sample_log2=got["registration_sample_log2"],
        resolution_samples=tuple(line[:2000] for line in got["resolution_samples"]),
        registration_samples=tuple(line[:2000] for line in got["registration_samples"]),
    )
