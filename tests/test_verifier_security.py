"""Attacks on the verifier, over real sockets (uvicorn + httpx + a SQLite file). Each test is named after the
attack, asserts the specific error code, and asserts that the ledger (size, last hash), the facts and the
evidence tables are unchanged after the refusal (except the equivocation evidence, which is the point)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from protocol.canonical import canonical_json
from protocol.envelope import envelope_hash, sign_envelope
from protocol.keys import generate_private_key, public_key_b64
from protocol.report import GENESIS_HASH
from tests.test_verifier_api import Harness, running_verifier
from tests.test_verifier_core import DAY0, NOW, AgentSim, device, payload, sign_payload, uscc
from verifier.db import agents, enrollment_tokens, equivocations


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_verifier(tmp_path_factory.mktemp("verifier-security")) as h:
        yield h


@pytest.fixture(autouse=True)
def _reset_clock(verifier: Harness) -> None:
    verifier.clock.now = NOW


def _refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = dict(r.json()["error"])
    assert err["code"] == code, err
    return err


def _agents_and_tokens(h: Harness) -> tuple[int, int]:
    with h.engine.connect() as conn:
        n_agents = int(conn.execute(select(func.count()).select_from(agents)).scalar_one())
        used = int(conn.execute(select(func.count()).select_from(enrollment_tokens)
                                .where(enrollment_tokens.c.used_at.is_not(None))).scalar_one())
    return n_agents, used


def _flip_one_payload_byte(envelope: bytes) -> bytes:
    """Change one byte inside the base64 payload to another base64 character (still valid base64)."""
    start = envelope.index(b'"payload":"') + len(b'"payload":"') + 40
    old = envelope[start:start + 1]
    new = b"B" if old != b"B" else b"C"
    return envelope[:start] + new + envelope[start + 1:]


def test_report_with_one_byte_changed_is_refused(verifier: Harness) -> None:
    a = verifier.enroll()
    verifier.deliver(a, devices=[device("sec-d1", enterprise=uscc(1), start=a.start)])
    env = a.next_envelope(devices=[device("sec-d2", enterprise=uscc(1), start=a.start)])
    tampered = _flip_one_payload_byte(env)
    assert tampered != env and len(tampered) == len(env)
    before = verifier.stored()
    _refused(verifier.post(tampered), 403, "signature_invalid")
    assert verifier.stored() == before
    assert verifier.client.get(f"/v1/agents/{a.agent_id}", headers=verifier.admin).json()["next_seq"] == 2
    assert verifier.post(env).status_code == 201  # the untouched report still goes in


def test_replayed_report_returns_original_receipt_and_adds_nothing(verifier: Harness) -> None:
    a = verifier.enroll()
    env = a.next_envelope(devices=[device("sec-replay", enterprise=uscc(1), start=a.start)])
    first = verifier.post(env)
    assert first.status_code == 201
    a.advance(env)
    verifier.deliver(a)
    before = verifier.stored()
    verifier.clock.now = NOW + timedelta(minutes=5)
    again = verifier.post(env)
    assert again.status_code == 200
    assert again.json() == first.json()  # the ORIGINAL receipt, received_at included
    assert verifier.stored() == before


def test_report_signed_by_unenrolled_key_is_refused(verifier: Harness) -> None:
    stranger = AgentSim(key=generate_private_key(), agent_id="agt-stranger")
    before = verifier.stored()
    err = _refused(verifier.post(stranger.next_envelope()), 403, "key_unknown")
    assert stranger.kid[:16] in err["message"]
    assert verifier.stored() == before


def test_reused_token_is_refused(verifier: Harness) -> None:
    token = verifier.token()
    k1, k2 = generate_private_key(), generate_private_key()
    ok = verifier.client.post("/v1/enroll", json={"token": token, "public_key": public_key_b64(k1.public_key()),
                                                  "agent_name": "first"})
    assert ok.status_code == 201
    before = (verifier.stored(), _agents_and_tokens(verifier))
    _refused(verifier.client.post("/v1/enroll", json={"token": token, "public_key": public_key_b64(k2.public_key()),
                                                      "agent_name": "second"}), 403, "token_used")
    assert (verifier.stored(), _agents_and_tokens(verifier)) == before
    _refused(verifier.client.post("/v1/enroll", json={"token": "A" * 43, "public_key": public_key_b64(
        k2.public_key()), "agent_name": "guess"}), 403, "token_unknown")
    assert (verifier.stored(), _agents_and_tokens(verifier)) == before


def test_expired_token_is_refused(verifier: Harness) -> None:
    token = verifier.token(ttl_s=60)
    key = generate_private_key()
    before = (verifier.stored(), _agents_and_tokens(verifier))
    verifier.clock.now = NOW + timedelta(seconds=60)
    _refused(verifier.client.post("/v1/enroll", json={"token": token, "public_key": public_key_b64(key.public_key()),
                                                      "agent_name": "late"}), 403, "token_expired")
    assert (verifier.stored(), _agents_and_tokens(verifier)) == before
    verifier.clock.now = NOW + timedelta(seconds=59)  # the refusal did not spend it
    ok = verifier.client.post("/v1/enroll", json={"token": token, "public_key": public_key_b64(key.public_key()),
                                                  "agent_name": "in time"})
    assert ok.status_code == 201


def test_report_with_unknown_field_is_refused(verifier: Harness) -> None:
    a = verifier.enroll()
    body = payload(agent_id=a.agent_id, kid=a.kid, seq=1, prev_hash=GENESIS_HASH, start=DAY0,
                   end=DAY0 + timedelta(hours=1), devices=[device("sec-extra", enterprise=uscc(1), start=DAY0)])
    body["bonus_devices"] = 10_000
    before = verifier.stored()
    err = _refused(verifier.post(sign_payload(body, a.key)), 422, "schema_invalid")
    assert "bonus_devices: unknown field" in err["message"]
    assert verifier.stored() == before
    assert verifier.client.get(f"/v1/agents/{a.agent_id}", headers=verifier.admin).json()["next_seq"] == 1


def test_equivocation_keeps_evidence(verifier: Harness) -> None:
    a = verifier.enroll()
    env = a.next_envelope(devices=[device("sec-eq", enterprise=uscc(1), start=a.start)])
    verifier.deliver(a, devices=[device("sec-eq", enterprise=uscc(1), start=a.start)])
    other = sign_payload(payload(agent_id=a.agent_id, kid=a.kid, seq=1, prev_hash=GENESIS_HASH, start=DAY0,
                                 end=DAY0 + timedelta(hours=1),
                                 devices=[device(f"sec-eq-{i}", enterprise=uscc(2), start=DAY0) for i in range(5)]),
                         a.key)
    assert other != env
    ledger, facts, evidence = verifier.stored()
    err = _refused(verifier.post(other), 409, "seq_conflict")
    assert err["expected_seq"] == 2
    assert verifier.stored() == (ledger, facts, evidence + 1)
    with verifier.engine.connect() as conn:
        row = conn.execute(select(equivocations).where(equivocations.c.agent_id == a.agent_id)).one()
    assert (bytes(row.envelope), row.seq, row.envelope_hash) == (other, 1, envelope_hash(other))
    assert row.accepted_envelope_hash == envelope_hash(env)
    verifier.deliver(a)  # the honest chain goes on


def test_seq_gap_names_expected(verifier: Harness) -> None:
    a = verifier.enroll()
    verifier.deliver(a)
    before = verifier.stored()
    skipping = a.next_envelope(seq=a.seq + 2)
    err = _refused(verifier.post(skipping), 409, "seq_gap")
    assert err["expected_seq"] == 2 and "expected 2, got 4" in err["message"]
    assert verifier.stored() == before


def test_other_agents_key_cannot_sign_for_agent(verifier: Harness) -> None:
    victim, attacker = verifier.enroll(), verifier.enroll("node-1")
    verifier.deliver(victim)
    before = verifier.stored()
    # the attacker's own key id, the victim's agent id
    as_victim = attacker.next_envelope(agent_id=victim.agent_id, seq=victim.seq, prev_hash=victim.prev_hash,
                                       start=victim.start)
    err = _refused(verifier.post(as_victim), 403, "key_agent_mismatch")
    assert victim.agent_id in err["message"]
    # the victim's key id written in the payload, signed by the attacker's key
    claimed = payload(agent_id=victim.agent_id, kid=victim.kid, seq=victim.seq, prev_hash=victim.prev_hash,
                      start=victim.start, end=victim.start + timedelta(hours=1))
    _refused(verifier.post(sign_envelope(canonical_json(claimed), attacker.key)), 403, "key_agent_mismatch")
    # the victim's key id in the envelope, the attacker's signature
    forged = sign_envelope(canonical_json(claimed), attacker.key).replace(attacker.kid.encode(), victim.kid.encode())
    _refused(verifier.post(forged), 403, "signature_invalid")
    assert verifier.stored() == before
    assert verifier.client.get(f"/v1/agents/{victim.agent_id}", headers=verifier.admin).json()["next_seq"] == 2


def test_enrollment_with_malformed_public_key_is_refused(verifier: Harness) -> None:
    before = (verifier.stored(), _agents_and_tokens(verifier))
    token = verifier.token()
    bad = base64.b64encode(b"\x01" * 31).decode()
    _refused(verifier.client.post("/v1/enroll", json={"token": token, "public_key": bad, "agent_name": "x"}),
             422, "key_format_invalid")
    assert (verifier.stored(), _agents_and_tokens(verifier)) == before


def test_forged_admin_call_is_refused(verifier: Harness, tmp_path: Path) -> None:
    before = _agents_and_tokens(verifier)
    r = verifier.client.post("/v1/admin/tokens", json={"applicant_id": "plat-1"},
                             headers={"Authorization": "Bearer test-admin-token-0123456788"})
    _refused(r, 401, "admin_unauthorized")
    assert _agents_and_tokens(verifier) == before
