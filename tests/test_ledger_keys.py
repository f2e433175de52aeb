"""Agent identity over real HTTP: enrollment tokens, key rotation signed by the old key with an overlap window,
revocation, and the admin rebinding — each a key event in the ledger's Merkle tree."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from agent.enroll import ROTATION_PAYLOAD_TYPE, enroll, rotate_key
from agent.errors import EnrollmentRefused
from protocol.canonical import canonical_json
from protocol.envelope import sign_envelope
from protocol.keys import generate_private_key, key_id, public_key_b64, read_private_key, write_private_key
from tests.test_verifier_api import Harness, running_verifier
from tests.test_verifier_core import AgentSim, device, uscc
from verifier import enroll as verifier_enroll
from verifier.db import enrollment_tokens
from verifier.ledger import LEAF_KEY_EVENT, read_leaves


def _enrolled_agent(v: Harness, tmp: Path) -> tuple[AgentSim, Path, Path]:
    key_path, enrollment_path = tmp / "agent.key", tmp / "enrollment.json"
    write_private_key(generate_private_key(), key_path)
    e = enroll(key_path=key_path, enrollment_path=enrollment_path, verifier_url=v.base_url, token=v.token(),
               agent_name="edge")
    return AgentSim(key=read_private_key(key_path), agent_id=e.agent_id), key_path, enrollment_path


def _key_events(v: Harness) -> list[dict[str, object]]:
    with v.engine.connect() as conn:
        return [json.loads(leaf.data) for leaf in read_leaves(conn, 0, 1000) if leaf.kind == LEAF_KEY_EVENT]


def test_rotation_signed_by_the_old_key_keeps_queued_reports_valid_for_the_overlap(tmp_path: Path) -> None:
    assert ROTATION_PAYLOAD_TYPE == verifier_enroll.ROTATION_PAYLOAD_TYPE
    with running_verifier(tmp_path) as v:
        sim, key_path, enrollment_path = _enrolled_agent(v, tmp_path)
        v.deliver(sim)
        queued = sim.next_envelope()  # signed with the old key before the rotation, delivered after it
        old_kid = sim.kid
        rotated = rotate_key(key_path=key_path, enrollment_path=enrollment_path, now=v.clock())
        new_key = read_private_key(key_path)
        assert rotated.key_id == key_id(new_key.public_key()) != old_kid
        assert read_private_key(key_path.with_name("agent.key.old")).public_key() == sim.key.public_key()
        assert v.post(queued).status_code == 201  # inside the overlap window
        sim.advance(queued)
        sim.key = new_key
        v.deliver(sim)
        v.clock.now += verifier_enroll.DEFAULT_ROTATION_OVERLAP + timedelta(seconds=1)
        late_old = AgentSim(key=read_private_key(key_path.with_name("agent.key.old")), agent_id=sim.agent_id,
                            seq=sim.seq, prev_hash=sim.prev_hash, start=sim.start)
        r = v.post(late_old.next_envelope())
        assert r.status_code == 403 and r.json()["error"]["code"] == "key_unknown"
        events = _key_events(v)
        assert [e["event"] for e in events] == ["enroll", "rotate"]
        assert events[1]["key_id"] == rotated.key_id and events[1]["detail"]["old_key_id"] == old_kid  # type: ignore[index]


def test_rotation_signed_by_another_key_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    with running_verifier(tmp_path) as v:
        sim, _, _ = _enrolled_agent(v, tmp_path)
        thief = generate_private_key()
        body = canonical_json({"agent_id": sim.agent_id, "old_key_id": sim.kid,
                               "new_public_key": public_key_b64(thief.public_key()), "created_at": "2025-06-01"})
        r = v.client.post(f"/v1/agents/{sim.agent_id}/rotate", headers={"Content-Type": "application/json"},
                          content=sign_envelope(body, thief, payload_type=ROTATION_PAYLOAD_TYPE))
        assert r.status_code == 403 and r.json()["error"]["code"] == "key_unknown"
        other = generate_private_key()  # signed by the right key for another agent's id
        body = canonical_json({"agent_id": "agt-someone-else", "old_key_id": sim.kid,
                               "new_public_key": public_key_b64(other.public_key()), "created_at": "2025-06-01"})
        r = v.client.post(f"/v1/agents/{sim.agent_id}/rotate", headers={"Content-Type": "application/json"},
                          content=sign_envelope(body, sim.key, payload_type=ROTATION_PAYLOAD_TYPE))
        assert r.status_code == 403 and r.json()["error"]["code"] == "key_agent_mismatch"
        assert v.client.get(f"/v1/agents/{sim.agent_id}", headers=v.admin).json()["key_id"] == sim.kid
        assert [e["event"] for e in _key_events(v)] == ["enroll"]
        v.deliver(sim)  # the old key still works


def test_revocation_refuses_later_reports_and_marks_earlier_ones(tmp_path: Path) -> None:
    with running_verifier(tmp_path) as v:
        sim, _, _ = _enrolled_agent(v, tmp_path)
        for _ in range(3):
            v.deliver(sim, devices=[device("rv", enterprise=uscc(1), start=sim.start)])
        r = v.client.post(f"/v1/admin/agents/{sim.agent_id}/revoke", json={"reason": "stolen"}, headers=v.admin)
        assert r.status_code == 200
        r = v.post(sim.next_envelope())
        assert r.status_code == 403 and r.json()["error"]["code"] == "agent_revoked"
        revoke = _key_events(v)[-1]
        assert revoke["event"] == "revoke"
        assert revoke["detail"] == {"reason": "stolen", "reports_before_revocation": 3}


def test_rebinding_needs_the_admin_and_is_logged_in_the_ledger(tmp_path: Path) -> None:
    with running_verifier(tmp_path) as v:
        sim, _, enrollment_path = _enrolled_agent(v, tmp_path)
        fresh = generate_private_key()
        body = {"public_key": public_key_b64(fresh.public_key()), "reason": "hardware replaced"}
        assert v.client.post(f"/v1/admin/agents/{sim.agent_id}/rebind", json=body).status_code in (401, 403)
        with pytest.raises(EnrollmentRefused, match="a new binding needs an admin action"):
            enroll(key_path=tmp_path / "agent.key", enrollment_path=enrollment_path, verifier_url=v.base_url,
                   token=v.token(), agent_name="edge")
        r = v.client.post(f"/v1/admin/agents/{sim.agent_id}/rebind", json=body, headers=v.admin)
        assert r.status_code == 200, r.text
        r = v.post(sim.next_envelope())  # the old key stops at once
        assert r.status_code == 403 and r.json()["error"]["code"] == "key_unknown"
        sim.key = fresh
        v.deliver(sim)
        event = _key_events(v)[-1]
        assert event["event"] == "rebind" and event["detail"] == {  # type: ignore[comparison-overlap]
            "old_key_id": key_id(read_private_key(tmp_path / "agent.key").public_key()), "admin": "admin-token",
            "reason": "hardware replaced"}


def test_enrollment_tokens_are_256_bit_hashed_single_use_and_bound(tmp_path: Path) -> None:
    with running_verifier(tmp_path) as v:
        token = v.token(applicant="node-1")
        assert token.startswith("tpe_") and len(base64.urlsafe_b64decode(token.removeprefix("tpe_") + "=")) == 32
        with v.engine.connect() as conn:
            stored = conn.execute(select(enrollment_tokens.c.token_sha256, enrollment_tokens.c.applicant_id)).all()
        assert token not in {row[0] for row in stored} and ("node-1" in {row[1] for row in stored})
        key = generate_private_key()
        body = {"token": token, "public_key": public_key_b64(key.public_key()), "agent_name": "edge"}
        first = v.client.post("/v1/enroll", json=body)
        assert first.status_code == 201 and first.json()["applicant_id"] == "node-1"
        body["public_key"] = public_key_b64(generate_private_key().public_key())
        again = v.client.post("/v1/enroll", json=body)
        assert again.status_code == 403 and again.json()["error"]["code"] == "token_used"
        expiring = v.token(ttl_s=60)
        v.clock.now += timedelta(seconds=61)
        body["token"] = expiring
        late = v.client.post("/v1/enroll", json=body)
        assert late.status_code == 403 and late.json()["error"]["code"] == "token_expired"
