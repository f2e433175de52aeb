"""The pure verification core, the facts derived from a report, and the store adapter on a real SQLite file.

Also holds the small helpers the other verifier test files import (signed report builders, a settable clock)."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import OperationalError

from protocol.canonical import canonical_json
from protocol.envelope import envelope_hash, sign_envelope
from protocol.errors import KeyUnknown, SchemaInvalid, SignatureInvalid
from protocol.keys import generate_private_key, key_id, public_key_b64
from protocol.report import GENESIS_HASH, ReportV1
from protocol.uscc import check_character
from verifier.core import ChainState, Duplicate, TrustedKey, VerifiedReport, leaf_hash, verify_report
from verifier.db import (
    agents,
    device_aliases,
    device_days,
    entries,
    equivocations,
    fingerprint_key,
    init_db,
    make_engine,
    resolution_days,
)
from verifier.enroll import add_applicant, add_enterprise, enroll_agent, issue_token
from verifier.errors import (
    AgentRevoked,
    ChainBroken,
    KeyAgentMismatch,
    PeriodInFuture,
    PeriodOverlap,
    SeqConflict,
    SeqGap,
)
from verifier.facts import applicant_verdict, derive_facts, fact_counts
from verifier.ingest import ingest_report
from verifier.ledger import ledger_head
from verifier.rules import load_policy

SH = ZoneInfo("Asia/Shanghai")
DAY0 = datetime(2025, 6, 1, 0, 0, tzinfo=SH)
NOW = datetime(2025, 6, 2, 12, 0, tzinfo=SH)


def uscc(n: int) -> str:
    body = f"91330400MA{n:07d}"
    return body + check_character(body)


def fp(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def device(name: str, *, enterprise: str | None, start: datetime, status: str = "active",
           protocols: Sequence[str] = ("opcua",), aliases: Sequence[str] = (),
           first_seen: datetime | None = None, last_seen: datetime | None = None) -> dict[str, Any]:
    return {"fp": fp(name), "aliases": [fp(a) for a in aliases], "enterprise": enterprise,
            "protocols": sorted(protocols), "status": status,
            "first_seen": (first_seen or start + timedelta(minutes=1)).isoformat(),
            "last_seen": (last_seen or start + timedelta(minutes=2)).isoformat()}


def bucket(minute: datetime, *, op: int = 1, resp: int = 1, count: int = 1) -> dict[str, Any]:
    return {"minute": minute.isoformat(), "op": op, "resp": resp, "transport": "TCP", "count": count}


def payload(*, agent_id: str, kid: str, seq: int, prev_hash: str, start: datetime, end: datetime,
            devices: Sequence[dict[str, Any]] = (), buckets: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A valid report payload (checked against ReportV1) as a JSON-ready dict."""
    body: dict[str, Any] = {
        "v": 1, "agent_id": agent_id, "key_id": kid, "seq": seq, "prev_hash": prev_hash,
        "period": {"start": start.isoformat(), "end": end.isoformat()}, "created_at": end.isoformat(),
        "devices": list(devices),
    }
    if buckets:
        body["resolution"] = {"lines_read": sum(b["count"] for b in buckets), "buckets": list(buckets)}
    return ReportV1.model_validate(body).model_dump(mode="json")


def sign_payload(body: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    return sign_envelope(canonical_json(body), key)


@dataclass
class AgentSim:
    """An agent as the verifier sees it: a key, an id, and its position in its chain."""

    key: Ed25519PrivateKey
    agent_id: str
    seq: int = 1
    prev_hash: str = GENESIS_HASH
    start: datetime = DAY0
    period: timedelta = timedelta(hours=1)
    accepted: list[bytes] = field(default_factory=list)

    @property
    def kid(self) -> str:
        return key_id(self.key.public_key())

    def next_envelope(self, *, devices: Sequence[dict[str, Any]] = (), buckets: Sequence[dict[str, Any]] = (),
                      **overrides: Any) -> bytes:
        fields: dict[str, Any] = {"agent_id": self.agent_id, "kid": self.kid, "seq": self.seq,
                                  "prev_hash": self.prev_hash, "start": self.start}
        fields.update(overrides)
        fields.setdefault("end", fields["start"] + self.period)
        return sign_payload(payload(devices=devices, buckets=buckets, **fields), self.key)

    def advance(self, envelope: bytes) -> None:
        """Record that ``envelope`` (built by next_envelope) was accepted."""
        self.accepted.append(envelope)
        self.seq += 1
        self.prev_hash = envelope_hash(envelope)
        self.start += self.period


class Clock:
    """A clock a test sets by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# ---- pure core ----------------------------------------------------------------------------------------------------

def _trust(sim: AgentSim, *, revoked: bool = False) -> dict[str, TrustedKey]:
    return {sim.kid: TrustedKey(sim.kid, sim.key.public_key(), sim.agent_id, "app-1", revoked)}


def _chain(sim: AgentSim, last_end: datetime | None = None) -> dict[str, ChainState]:
    hashes = {i + 1: envelope_hash(e) for i, e in enumerate(sim.accepted)}
    return {sim.agent_id: ChainState(sim.agent_id, sim.seq, sim.prev_hash, last_end, hashes)}


@pytest.fixture
def sim() -> AgentSim:
    return AgentSim(key=generate_private_key(), agent_id="agt-1")


def test_first_report_is_verified_with_rfc9162_leaf_hash(sim: AgentSim) -> None:
    env = sim.next_envelope(devices=[device("d1", enterprise=uscc(1), start=DAY0)])
    result = verify_report(env, keys=_trust(sim), chains=_chain(sim), now=NOW)
    assert isinstance(result, VerifiedReport)
    assert result.leaf_hash == hashlib.sha256(b"\x00" + env).hexdigest() == leaf_hash(env)
    assert result.envelope_hash == hashlib.sha256(env).hexdigest()
    assert (result.agent_id, result.applicant_id, result.late) == ("agt-1", "app-1", False)


def test_exact_replay_is_a_duplicate_and_other_bytes_are_a_conflict(sim: AgentSim) -> None:
    env = sim.next_envelope()
    sim.advance(env)
    again = verify_report(env, keys=_trust(sim), chains=_chain(sim), now=NOW)
    assert again == Duplicate(agent_id="agt-1", seq=1, envelope_hash=envelope_hash(env))
    other = sign_payload(payload(agent_id="agt-1", kid=sim.kid, seq=1, prev_hash=GENESIS_HASH, start=DAY0,
                                 end=DAY0 + timedelta(minutes=30)), sim.key)
    with pytest.raises(SeqConflict, match="seq 1: expected the envelope already accepted") as info:
        verify_report(other, keys=_trust(sim), chains=_chain(sim), now=NOW)
    assert info.value.accepted_envelope_hash == envelope_hash(env)
    assert info.value.detail == {"expected_seq": 2}


def test_sequence_chain_and_period_rules(sim: AgentSim) -> None:
    first = sim.next_envelope()
    sim.advance(first)
    chains = _chain(sim, last_end=DAY0 + timedelta(hours=1))
    with pytest.raises(SeqGap, match="seq: expected 2, got 3"):
        verify_report(sim.next_envelope(seq=3), keys=_trust(sim), chains=chains, now=NOW)
    with pytest.raises(ChainBroken, match="prev_hash: expected"):
        verify_report(sim.next_envelope(prev_hash="ab" * 32), keys=_trust(sim), chains=chains, now=NOW)
    with pytest.raises(PeriodOverlap, match=r"period\.start"):
        verify_report(sim.next_envelope(start=DAY0 + timedelta(minutes=30)), keys=_trust(sim), chains=chains,
                      now=NOW)
    edge = NOW + timedelta(seconds=300)
    ok = verify_report(sim.next_envelope(start=edge - timedelta(hours=1), end=edge), keys=_trust(sim),
                       chains=chains, now=NOW)
    assert isinstance(ok, VerifiedReport)
    with pytest.raises(PeriodInFuture, match=r"period\.end"):
        verify_report(sim.next_envelope(start=edge - timedelta(hours=1), end=edge + timedelta(seconds=1)),
                      keys=_trust(sim), chains=chains, now=NOW)


def test_old_period_is_accepted_and_marked_late(sim: AgentSim) -> None:
    env = sim.next_envelope()  # the period ends at DAY0 + 1 h
    on_time = verify_report(env, keys=_trust(sim), chains=_chain(sim), now=DAY0 + timedelta(days=2, hours=1))
    assert isinstance(on_time, VerifiedReport) and on_time.late is False
    late = verify_report(env, keys=_trust(sim), chains=_chain(sim), now=DAY0 + timedelta(days=2, hours=1, seconds=1))
    assert isinstance(late, VerifiedReport) and late.late is True


def test_signature_is_checked_before_the_payload_is_parsed(sim: AgentSim) -> None:
    garbage = sign_envelope(b"not json at all", sim.key)
    with pytest.raises(KeyUnknown):
        verify_report(garbage, keys={}, chains={}, now=NOW)
    with pytest.raises(SchemaInvalid, match="report payload v1"):
        verify_report(garbage, keys=_trust(sim), chains=_chain(sim), now=NOW)
    other = generate_private_key()
    forged = sign_envelope(b"not json at all", other).replace(key_id(other.public_key()).encode(), sim.kid.encode())
    with pytest.raises(SignatureInvalid, match="does not verify"):
        verify_report(forged, keys=_trust(sim), chains=_chain(sim), now=NOW)


def test_binding_and_revocation(sim: AgentSim) -> None:
    with pytest.raises(KeyAgentMismatch, match="agent_id: key"):
        verify_report(sim.next_envelope(agent_id="agt-other"), keys=_trust(sim), chains=_chain(sim), now=NOW)
    with pytest.raises(KeyAgentMismatch, match="key_id: expected the signing key"):
        verify_report(sim.next_envelope(kid="cd" * 32), keys=_trust(sim), chains=_chain(sim), now=NOW)
    with pytest.raises(AgentRevoked):
        verify_report(sim.next_envelope(), keys=_trust(sim, revoked=True), chains=_chain(sim), now=NOW)


# ---- facts ----------------------------------------------------------------------------------------------------------

def test_facts_use_shanghai_days_and_split_a_period_across_midnight(sim: AgentSim) -> None:
    start = datetime(2025, 6, 1, 23, 30, tzinfo=SH)
    env = sim.next_envelope(
        start=start, end=start + timedelta(hours=1),
        devices=[
            device("early", enterprise=uscc(1), start=start, first_seen=start, last_seen=start + timedelta(minutes=5)),
            device("both", enterprise=None, start=start, first_seen=start, last_seen=start + timedelta(minutes=50),
                   aliases=["both-modbus"]),
        ],
        buckets=[bucket(start, count=7), bucket(start + timedelta(minutes=40), count=5),
                 bucket(start, op=1, resp=2, count=3), bucket(start, op=100, count=2),
                 bucket(start + timedelta(minutes=45), op=101, count=1), bucket(start, op=100, resp=3, count=9)],
    )
    result = verify_report(env, keys=_trust(sim), chains=_chain(sim), now=NOW)
    assert isinstance(result, VerifiedReport)
    facts = derive_facts(result.report, "app-1")
    by_fp = {(f.fp, f.day) for f in facts.device_days}
    assert by_fp == {(fp("early"), date(2025, 6, 1)), (fp("both"), date(2025, 6, 1)), (fp("both"), date(2025, 6, 2))}
    res = {(r.day, r.resolutions_ok, r.resolutions_failed, r.creates_ok, r.deletes_ok) for r in facts.resolution_days}
    assert res == {(date(2025, 6, 1), 7, 3, 2, 0), (date(2025, 6, 2), 5, 0, 0, 1)}
    assert [(a.fp, a.alias) for a in facts.aliases] == [(fp("both"), fp("both-modbus"))]


# ---- store adapter on a real SQLite file ----------------------------------------------------------------------------

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextmanager
def _postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server (skips when none answers), dropped afterwards."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"tianping_verifier_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"no PostgreSQL server at 127.0.0.1:5432 ({exc.orig})")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The verifier's schema on a real SQLite file, and on a real PostgreSQL database."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'verifier.sqlite'}"
        else:
            url = stack.enter_context(_postgres_database())
        eng = make_engine(url)
        stack.callback(eng.dispose)
        init_db(eng)
        add_applicant(eng, applicant_id="app-1", name="示范平台", kind="platform", now=NOW)
        add_enterprise(eng, applicant_id="app-1", uscc=uscc(1), name="企业一", now=NOW)
        yield eng


def _enrolled(engine: Engine) -> AgentSim:
    key = generate_private_key()
    token = issue_token(engine, applicant_id="app-1", enterprise=uscc(1), now=NOW).token
    enrollment = enroll_agent(engine, token=token, public_key_b64=public_key_b64(key.public_key()),
                              agent_name="edge-1", now=NOW)
    return AgentSim(key=key, agent_id=enrollment.agent_id)


def test_init_is_idempotent_and_keeps_the_fingerprint_key(engine: Engine) -> None:
    with engine.connect() as conn:
        before = fingerprint_key(conn)
    assert init_db(engine) is False
    with engine.connect() as conn:
        assert fingerprint_key(conn) == before and len(before) == 32


def test_ingest_appends_writes_facts_and_advances_chain_in_one_go(engine: Engine) -> None:
    a = _enrolled(engine)
    for hour, status in enumerate(("reachable", "active", "registered")):
        env = a.next_envelope(devices=[device("d1", enterprise=uscc(1), start=a.start, status=status,
                                              protocols=["modbus"] if hour else ["opcua"])],
                              buckets=[bucket(a.start, count=10)])
        result = ingest_report(engine, env, now=NOW)
        assert result.created and result.receipt.index == hour and result.receipt.seq == hour + 1
        a.advance(env)
    with engine.connect() as conn:
        row = conn.execute(select(device_days)).one()
        assert (row.status_rank, row.protocols, row.enterprise) == (3, 1 | 2, uscc(1))
        assert conn.execute(select(resolution_days.c.resolutions_ok)).scalar_one() == 30
        chain = conn.execute(select(agents.c.next_seq, agents.c.last_hash)).one()
        assert (chain.next_seq, chain.last_hash) == (4, a.prev_hash)
        assert ledger_head(conn).size == 3
    replay = ingest_report(engine, a.accepted[1], now=NOW + timedelta(hours=1))
    assert not replay.created and replay.receipt.index == 1 and replay.receipt.received_at == NOW


def test_refused_report_changes_nothing_but_equivocation_is_kept(engine: Engine) -> None:
    a = _enrolled(engine)
    env = a.next_envelope(devices=[device("d1", enterprise=uscc(1), start=a.start)])
    ingest_report(engine, env, now=NOW)
    with engine.connect() as conn:
        before = (ledger_head(conn), fact_counts(conn))
    conflicting = sign_payload(payload(agent_id=a.agent_id, kid=a.kid, seq=1, prev_hash=GENESIS_HASH,
                                       start=DAY0, end=DAY0 + timedelta(minutes=10),
                                       devices=[device("d2", enterprise=uscc(1), start=DAY0)]), a.key)
    with pytest.raises(SeqConflict):
        ingest_report(engine, conflicting, now=NOW)
    with engine.connect() as conn:
        assert (ledger_head(conn), fact_counts(conn)) == before
        assert conn.execute(select(equivocations.c.envelope)).scalar_one() == conflicting
        assert conn.execute(select(func.count()).select_from(device_aliases)).scalar_one() == 0


def test_index_has_no_holes_and_facts_feed_the_verdict(engine: Engine) -> None:
    sims = [_enrolled(engine) for _ in range(3)]
    for day in range(2):
        for i, a in enumerate(sims):
            a.period = timedelta(days=1)
            env = a.next_envelope(devices=[device(f"shared-{day % 2}", enterprise=uscc(1), start=a.start),
                                           device(f"own-{i}", enterprise=uscc(1), start=a.start)],
                                  buckets=[bucket(a.start + timedelta(hours=1), op=100, count=4)])
            ingest_report(engine, env, now=NOW + timedelta(days=1))
            a.advance(env)
    with engine.connect() as conn:
        indexes = [r[0] for r in conn.execute(select(entries.c.entry_index).order_by(entries.c.entry_index))]
    assert indexes == list(range(6))
    base = load_policy()
    policy = dataclasses.replace(base, definitions=dataclasses.replace(
        base.definitions, connected_device_min_active_days=2))
    verdict = applicant_verdict(engine, policy, "app-1", 2025, as_of=date(2025, 6, 2)).to_json()
    values = {c["id"]: c["value"] for c in verdict["criteria"]}
    # own-0..2 are active on 2 days; shared-0 and shared-1 on one day each; one enterprise
    assert values["m5-devices-5000"] == 3 and values["m5-served-150"] == 1
    assert verdict["beside"]["active_device_days"] == 8 and verdict["beside"]["registered_devices"] == 5
