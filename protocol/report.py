"""Report payload v1: what an agent saw in one period, as frozen models that refuse unknown fields.

Reports chain: ``seq`` rises by exactly one per agent and ``prev_hash`` is the envelope hash of the agent's
previous report (64 zeros for the first). Server-side fields (ledger index, received time, applicant) are not
part of a report; the verifier derives them.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from protocol.canonical import canonical_json
from protocol.errors import SchemaInvalid
from protocol.uscc import UsccInvalid, validate_uscc

GENESIS_HASH = "0" * 64
MAX_PERIOD = timedelta(days=1)
MAX_DEVICES_PER_REPORT = 200_000
MAX_BUCKETS_PER_REPORT = 500_000

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Protocol = Literal["opcua", "modbus", "mqtt"]
Status = Literal["registered", "reachable", "active"]
STATUS_RANK: dict[str, int] = {"registered": 1, "reachable": 2, "active": 3}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


class Period(_Frozen):
    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> Period:
        if not self.start < self.end:
            raise ValueError(f"period: expected start < end, got start={self.start} end={self.end}")
        if self.end - self.start > MAX_PERIOD:
            raise ValueError(f"period: expected at most {MAX_PERIOD}, got {self.end - self.start}")
        return self


class DeviceEntry(_Frozen):
    """One physical device as the agent saw it in the period (already merged across protocols)."""

    fp: Hex64  # keyed fingerprint of the strongest identity
    aliases: tuple[Hex64, ...] = ()  # fingerprints of the weaker identities the agent merged into it
    enterprise: str | None = None  # unified social credit code of the owner
    protocols: tuple[Protocol, ...]
    status: Status  # best status in the period
    first_seen: AwareDatetime
    last_seen: AwareDatetime

    @model_validator(mode="after")
    def _check(self) -> DeviceEntry:
        if self.enterprise is not None:
            try:
                validate_uscc(self.enterprise)
            except UsccInvalid as exc:
                raise ValueError(exc.message) from None
        if not self.protocols or list(self.protocols) != sorted(set(self.protocols)):
            raise ValueError(f"protocols: expected a non-empty sorted list without repeats, got {list(self.protocols)}")
        if self.last_seen < self.first_seen:
            raise ValueError("last_seen: expected no earlier than first_seen")
        return self


class ResolutionCount(_Frozen):
    """Exact count of resolution-log lines in one 60-second bucket."""

    minute: AwareDatetime
    op: Annotated[int, Field(ge=0, le=65535)]
    resp: Annotated[int, Field(ge=0, le=65535)]
    transport: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2,8}$")]
    count: Annotated[int, Field(gt=0)]

    @model_validator(mode="after")
    def _aligned(self) -> ResolutionCount:
        if self.minute.second or self.minute.microsecond:
            raise ValueError(f"minute: expected the start of a minute, got {self.minute.isoformat()}")
        return self


class ResolutionShare(_Frozen):
    """One heavy client or /24 network and how many of the day's lines it made."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    count: Annotated[int, Field(ge=0)]


class ResolutionGap(_Frozen):
    """A stretch with no log data at all (the log was silent or missing): no data, never zero traffic."""

    start: AwareDatetime
    end: AwareDatetime
    reason: Annotated[str, StringConstraints(min_length=1, max_length=200)]


Base64Sketch = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=16000)]
LogLineText = Annotated[str, StringConstraints(max_length=2000)]


class ResolutionDay(_Frozen):
    """Shape and evidence of one calendar day (agent's zone) of the period's resolution traffic (issue 4).

    Sketches are Apache DataSketches HLL (lg_k 12) images, base64, over the stable 64-bit hashes of
    identifiers (successful resolutions) and clients; the verifier merges them across periods. Samples are the
    lines selected under the verifier-issued salt (protocol/sampling.py; recomputable)."""

    day: date
    distinct_identifiers: Annotated[int, Field(ge=0)] = 0
    distinct_clients: Annotated[int, Field(ge=0)] = 0
    identifiers_sketch: Base64Sketch = ""
    clients_sketch: Base64Sketch = ""
    lines: Annotated[int, Field(ge=0)] = 0  # well-formed lines behind the shares
    top_clients: Annotated[tuple[ResolutionShare, ...], Field(max_length=20)] = ()
    top_networks: Annotated[tuple[ResolutionShare, ...], Field(max_length=20)] = ()
    replay_tracked: Annotated[int, Field(ge=0)] = 0
    replay_duplicates: Annotated[int, Field(ge=0)] = 0
    new_tracked: Annotated[int, Field(ge=0)] = 0  # new identifiers in the tracked hash slice
    new_resolved: Annotated[int, Field(ge=0)] = 0  # of those, resolved the same day
    resolution_sample_log2: Annotated[int, Field(ge=0, le=62)] = 0  # 0: no salt, no samples
    registration_sample_log2: Annotated[int, Field(ge=0, le=62)] = 0
    resolution_samples: Annotated[tuple[LogLineText, ...], Field(max_length=500)] = ()
    registration_samples: Annotated[tuple[LogLineText, ...], Field(max_length=500)] = ()


HandleText = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
RegistrationsSource = Literal["sql"]


class RegistrationDay(_Frozen):
    """New registrations of one calendar day (agent's zone) as the node's registry records them, read in this
    period (issue 4): a real create, never an overwrite. ``registrations_root`` is the RFC 9162 root over these
    identifiers (sorted, distinct, UTF-8 leaves); ``samples`` are the identifiers due under the verifier-issued salt
    at one in 2**sample_log2 (connectors/resolution/registrations.py: HMAC-SHA256(salt,
    "tianping/registration-sample/v1" 0x00 handle), first 8 bytes big-endian, below 2**(64 - sample_log2))."""

    day: date
    registrations: Annotated[int, Field(gt=0)]
    registrations_root: Hex64
    sample_log2: Annotated[int, Field(ge=0, le=62)] = 0  # 0: no salt, no samples
    samples: Annotated[tuple[HandleText, ...], Field(max_length=500)] = ()


class ResolutionSummary(_Frozen):
    lines_read: Annotated[int, Field(ge=0)] = 0
    malformed_lines: Annotated[int, Field(ge=0)] = 0
    buckets: tuple[ResolutionCount, ...] = ()
    new_identifiers: Annotated[int, Field(ge=0)] = 0  # successful creates read in this period
    # Issue 4 (optional; reports without them still parse):
    days: Annotated[tuple[ResolutionDay, ...], Field(max_length=3)] = ()
    new_identifiers_root: Hex64 | None = None  # RFC 9162 root over the period's new identifiers (sorted UTF-8)
    new_identifiers_count: Annotated[int, Field(ge=0)] = 0  # leaves under that root
    gaps: Annotated[tuple[ResolutionGap, ...], Field(max_length=1000)] = ()
    # Issue 4, registration source (optional): when set, the period's new registrations come from the node's
    # registry (``registrations``, one entry per day with any; a day without one had none), and the op-100 buckets
    # above stay what the access log saw. ``registration_gaps``: stretches in which the registry could not be read
    # (no data, never zero; the registrations of such a stretch arrive in a later report).
    registrations_source: RegistrationsSource | None = None
    registrations: Annotated[tuple[RegistrationDay, ...], Field(max_length=400)] = ()
    registration_gaps: Annotated[tuple[ResolutionGap, ...], Field(max_length=1000)] = ()

    @model_validator(mode="after")
    def _registrations(self) -> ResolutionSummary:
        if self.registrations_source is None and (self.registrations or self.registration_gaps):
            raise ValueError("registrations: expected registrations_source naming where they come from, got none")
        days = [r.day for r in self.registrations]
        if days != sorted(set(days)):
            raise ValueError("registrations: expected one entry per day, in day order")
        return self


_REGISTRATION_KEYS = ("registrations_source", "registrations", "registration_gaps")


class ConnectorStatus(_Frozen):
    kind: Name
    source: Name
    errors: dict[Name, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)


class EvidenceSample(_Frozen):
    """Raw protocol evidence for one sampled device (strings only: ADU hex, DataValue, topic + payload hash)."""

    fp: Hex64
    protocol: Protocol
    data: dict[Name, Annotated[str, StringConstraints(max_length=2000)]]


class ReportV1(_Frozen):
    v: Literal[1] = 1
    agent_id: Name
    key_id: Hex64
    seq: Annotated[int, Field(ge=1)]
    prev_hash: Hex64
    period: Period
    created_at: AwareDatetime
    devices: Annotated[tuple[DeviceEntry, ...], Field(max_length=MAX_DEVICES_PER_REPORT)] = ()
    resolution: ResolutionSummary | None = None
    connectors: tuple[ConnectorStatus, ...] = ()
    evidence: tuple[EvidenceSample, ...] = ()
    # The agent's own health when it signed: reports waiting in its outbox (this one not counted).
    outbox_depth: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> ReportV1:
        if (self.seq == 1) != (self.prev_hash == GENESIS_HASH):
            raise ValueError(f"prev_hash: expected {GENESIS_HASH[:8]}… exactly for seq 1, got seq={self.seq} "
                             f"prev_hash={self.prev_hash[:8]}…")
        fps = [d.fp for d in self.devices]
        if len(fps) != len(set(fps)):
            raise ValueError("devices: expected each fingerprint once per report, got repeats")
        if self.resolution and len(self.resolution.buckets) > MAX_BUCKETS_PER_REPORT:
            raise ValueError(f"resolution.buckets: expected at most {MAX_BUCKETS_PER_REPORT}")
        return self

    def to_bytes(self) -> bytes:
        """Canonical payload bytes (RFC 8785)."""
        doc = self.model_dump(mode="json")
        res = doc.get("resolution")
        if res is not None and res.get("registrations_source") is None:
            # without a registration source, the payload is byte for byte what it was before those fields existed
            for key in _REGISTRATION_KEYS:
                res.pop(key, None)
        return canonical_json(doc)


def parse_report(payload: bytes) -> ReportV1:
    """Parse authentic payload bytes into a ReportV1, or raise SchemaInvalid naming the first problems."""
    try:
        return ReportV1.model_validate_json(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: "
            + ("unknown field, expected only the fields of report v1" if err["type"] == "extra_forbidden"
               else f"{err['msg']} (got {str(err.get('input'))[:60]!r})")
            for err in exc.errors()[:5]
        )
        raise SchemaInvalid(f"report payload v1: {problems}") from None


def period_days(start: datetime, end: datetime) -> int:
    return (end - start).days
