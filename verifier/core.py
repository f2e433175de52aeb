"""The pure verification of one report: bytes, trusted keys, chain states and a reference time in, a verified
report (or a recognised duplicate) out. No HTTP, no database, no clock.

``verify_report`` enforces, in this order, and fails closed with a typed error at the first rule broken:

1. size: the envelope is at most ``max_bytes`` (protocol ``TooLarge``);
2. signature before parsing: the DSSE envelope is well formed, canonical, of the report payload type, signed by
   exactly one key that is enrolled here, and the Ed25519 signature verifies (protocol ``EnvelopeMalformed``,
   ``EnvelopeNotCanonical``, ``PayloadTypeUnsupported``, ``KeyUnknown``, ``SignatureInvalid``);
3. schema: the authentic payload is a report v1 with no unknown field (protocol ``SchemaInvalid``);
4. binding: the payload's ``key_id`` is the signing key and its ``agent_id`` is the agent that key was enrolled
   for (``KeyAgentMismatch``); the agent is not revoked (``AgentRevoked``);
5. sequence: ``seq`` equal to the expected one is new; a lower ``seq`` whose envelope hash equals the one
   accepted for that ``seq`` is a harmless replay (``Duplicate``); a lower ``seq`` with other bytes is
   equivocation (``SeqConflict``); a higher ``seq`` skips reports (``SeqGap``, naming the expected ``seq``);
6. chain: ``prev_hash`` is the envelope hash of the agent's last accepted report (``ChainBroken``);
7. time: the period ends at most ``future_skew`` after ``now`` (``PeriodInFuture``) and does not start before the
   previous report's period ended (``PeriodOverlap``); a period that ended more than ``late_after`` before
   ``now`` is accepted and marked late.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.envelope import MAX_ENVELOPE_BYTES, OpenedEnvelope, open_envelope
from protocol.report import GENESIS_HASH, ReportV1, parse_report
from verifier.errors import (
    AgentRevoked,
    ChainBroken,
    KeyAgentMismatch,
    PeriodInFuture,
    PeriodOverlap,
    SeqConflict,
    SeqGap,
)

log = logging.getLogger(__name__)

DEFAULT_FUTURE_SKEW = timedelta(seconds=300)
DEFAULT_LATE_AFTER = timedelta(days=2)


def leaf_hash(envelope: bytes) -> str:
    """RFC 9162 leaf hash of a ledger entry: lowercase hex SHA-256(0x00 || envelope bytes)."""
    return hashlib.sha256(b"\x00" + envelope).hexdigest()


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """An enrolled public key and the agent (and applicant) it is bound to."""

    key_id: str
    public_key: Ed25519PublicKey
    agent_id: str
    applicant_id: str
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class ChainState:
    """What the verifier knows of one agent's chain.

    ``accepted_hashes`` maps each accepted ``seq`` to its envelope hash; it is consulted only for a ``seq`` below
    ``next_seq`` and may be a lazy mapping backed by storage.
    """

    agent_id: str
    next_seq: int = 1
    last_hash: str = GENESIS_HASH
    last_period_end: datetime | None = None
    accepted_hashes: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VerifiedReport:
    """A report that passed every rule: to be appended as the agent's next entry."""

    report: ReportV1
    envelope: bytes
    envelope_hash: str
    leaf_hash: str
    agent_id: str
    applicant_id: str
    key_id: str
    late: bool


@dataclass(frozen=True, slots=True)
class Duplicate:
    """An exact replay of a report already accepted: answer with the original receipt, store nothing."""

    agent_id: str
    seq: int
    envelope_hash: str


class _PublicKeys(Mapping[str, Ed25519PublicKey]):
    """The public keys of the trusted keys, looked up one at a time (the trusted keys may be a lazy mapping)."""

    def __init__(self, keys: Mapping[str, TrustedKey]) -> None:
        self._keys = keys

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._keys[kid].public_key

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True, slots=True)
class ReportHead:
    """What the stateful rules and the ledger need of an authentic report (compact: a worker process that verified
    the signature hands it back cheaply)."""

    agent_id: str
    key_id: str
    seq: int
    prev_hash: str
    period_start: datetime
    period_end: datetime

    @classmethod
    def of(cls, report: ReportV1) -> ReportHead:
        return cls(agent_id=report.agent_id, key_id=report.key_id, seq=report.seq, prev_hash=report.prev_hash,
                   period_start=report.period.start, period_end=report.period.end)


def open_report(envelope: bytes, keys: Mapping[str, Ed25519PublicKey], *,
                max_bytes: int = MAX_ENVELOPE_BYTES) -> tuple[OpenedEnvelope, ReportV1]:
    """Rules 1-3, which need no state but the public keys: size, signature before parsing, schema."""
    opened = open_envelope(envelope, keys, max_bytes=max_bytes)
    return opened, parse_report(opened.payload)


def check_report(head: ReportHead, *, signing_key: str, envelope_hash: str, trusted: TrustedKey,
                 chains: Mapping[str, ChainState], now: datetime, future_skew: timedelta = DEFAULT_FUTURE_SKEW,
                 ) -> Duplicate | None:
    """Rules 4-7 for an authentic report signed by ``trusted``: a Duplicate for a harmless replay, None when the
    report is the agent's next one, else the typed error of the first rule broken."""
    if head.key_id != signing_key:
        raise KeyAgentMismatch(f"key_id: expected the signing key {signing_key[:16]}…, got {head.key_id[:16]}…")
    if head.agent_id != trusted.agent_id:
        raise KeyAgentMismatch(f"agent_id: key {signing_key[:16]}… is enrolled for agent {trusted.agent_id!r}, "
                               f"got a report for {head.agent_id[:64]!r}")
    if trusted.revoked:
        raise AgentRevoked(f"agent {trusted.agent_id!r}: expected an active agent, got a revoked one")
    chain = chains.get(trusted.agent_id) or ChainState(agent_id=trusted.agent_id)

    if head.seq < chain.next_seq:
        stored = chain.accepted_hashes.get(head.seq)
        if stored == envelope_hash:
            return Duplicate(agent_id=trusted.agent_id, seq=head.seq, envelope_hash=envelope_hash)
        raise SeqConflict(
            f"seq {head.seq}: expected the envelope already accepted ({(stored or '?')[:16]}…), got a different one "
            f"({envelope_hash[:16]}…); the next expected seq is {chain.next_seq}",
            agent_id=trusted.agent_id,
            seq=head.seq,
            envelope_hash=envelope_hash,
            accepted_envelope_hash=stored or "",
            expected_seq=chain.next_seq,
        )
    if head.seq > chain.next_seq:
        raise SeqGap(f"seq: expected {chain.next_seq}, got {head.seq}", expected_seq=chain.next_seq)
    if head.prev_hash != chain.last_hash:
        raise ChainBroken(f"prev_hash: expected {chain.last_hash}, got {head.prev_hash}")
    if head.period_end > now + future_skew:
        raise PeriodInFuture(f"period.end: expected no later than {(now + future_skew).isoformat()}, "
                             f"got {head.period_end.isoformat()}")
    if chain.last_period_end is not None and head.period_start < chain.last_period_end:
        raise PeriodOverlap(f"period.start: expected no earlier than the previous period's end "
                            f"{chain.last_period_end.isoformat()}, got {head.period_start.isoformat()}")
    return None


def verify_report(
    envelope: bytes,
    *,
    keys: Mapping[str, TrustedKey],
    chains: Mapping[str, ChainState],
    now: datetime,
    max_bytes: int = MAX_ENVELOPE_BYTES,
    future_skew: timedelta = DEFAULT_FUTURE_SKEW,
    late_after: timedelta = DEFAULT_LATE_AFTER,
) -> VerifiedReport | Duplicate:
    """Verify one report envelope against the trusted keys and the agents' chain states (see the module doc)."""
    if now.tzinfo is None:
        raise ValueError("now: expected an aware datetime, got a naive one")
    opened, report = open_report(envelope, _PublicKeys(keys), max_bytes=max_bytes)
    trusted = keys[opened.key_id]
    duplicate = check_report(ReportHead.of(report), signing_key=opened.key_id, envelope_hash=opened.envelope_hash,
                             trusted=trusted, chains=chains, now=now, future_skew=future_skew)
    if duplicate is not None:
        return duplicate
    return VerifiedReport(
        report=report,
        envelope=envelope,
        envelope_hash=opened.envelope_hash,
        leaf_hash=leaf_hash(envelope),
        agent_id=trusted.agent_id,
        applicant_id=trusted.applicant_id,
        key_id=opened.key_id,
        late=report.period.end < now - late_after,
    )
