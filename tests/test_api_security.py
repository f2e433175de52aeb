"""Attacks on the report API over real HTTP (issue 5): oversized bodies, floods, client-supplied server fields,
reads of the ledger without credentials, and the delivery rules seen from the wire. Plus schemathesis against the
published OpenAPI (bounded), when schemathesis is installed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest

from protocol.canonical import canonical_json
from tests.test_verifier_api import Harness, running_verifier
from tests.test_verifier_core import NOW, device, payload, sign_payload, uscc
from verifier.ledger import ledger_head
from verifier.ratelimit import AgentRateLimiter


@pytest.fixture
def verifier(tmp_path: Path) -> Iterator[Harness]:
    with running_verifier(tmp_path, max_report_bytes=4096, agent_rate_per_s=1.0, agent_burst=3) as h:
        yield h


def _size(v: Harness) -> int:
    with v.engine.connect() as conn:
        return ledger_head(conn).size


def test_body_over_the_limit_is_refused_with_413(verifier: Harness) -> None:
    sim = verifier.enroll()
    big = sim.next_envelope(devices=[device(f"big-{i}", enterprise=uscc(1), start=sim.start) for i in range(20)])
    assert len(big) > 4096
    r = verifier.post(big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert _size(verifier) == 0


def test_agent_flood_gets_429_with_retry_after_and_nothing_stored(verifier: Harness) -> None:
    sim = verifier.enroll()
    for _ in range(3):
        verifier.deliver(sim)  # the burst
    r = verifier.post(sim.next_envelope())
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    assert _size(verifier) == 3


def test_rate_limiter_refills_with_its_clock() -> None:
    limiter = AgentRateLimiter(rate_per_s=2.0, burst=2)
    assert [limiter.retry_after_s("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert limiter.retry_after_s("other", now=0.0) == 0.0  # per agent
    assert limiter.retry_after_s("k", now=0.5) == 0.0
    with pytest.raises(ValueError, match="rate_per_s > 0"):
        AgentRateLimiter(rate_per_s=0, burst=1)


@pytest.mark.parametrize("field", ["index", "received_at", "applicant_id", "late"])
def test_client_supplied_server_fields_are_refused(verifier: Harness, field: str) -> None:
    sim = verifier.enroll()
    body = payload(agent_id=sim.agent_id, kid=sim.kid, seq=1, prev_hash=sim.prev_hash, start=sim.start,
                   end=sim.start + timedelta(hours=1))
    body[field] = "plat-2" if field == "applicant_id" else 0
    r = verifier.post(sign_payload(body, sim.key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "schema_invalid"
    env = json.loads(sim.next_envelope())
    env[field] = 7  # beside the signed payload, outside the signature
    r = verifier.post(canonical_json(env))
    assert r.status_code == 400 and r.json()["error"]["code"] == "envelope_malformed"
    assert _size(verifier) == 0
    receipt = verifier.deliver(sim)
    assert receipt["received_at"] == NOW.astimezone(UTC).isoformat()  # the server's clock


def test_delivery_rules_seen_from_the_wire(tmp_path: Path) -> None:
    with running_verifier(tmp_path) as v:
        sim = v.enroll()
        v.deliver(sim)
        r = v.post(sim.next_envelope(seq=3))
        assert r.status_code == 409 and r.json()["error"]["expected_seq"] == 2
        r = v.post(sim.next_envelope(start=sim.start - timedelta(minutes=30)))
        assert r.status_code == 422 and r.json()["error"]["code"] == "period_overlap"
        future = v.clock() + timedelta(hours=1)
        r = v.post(sim.next_envelope(start=future, end=future + timedelta(hours=1)))
        assert r.status_code == 422 and r.json()["error"]["code"] == "period_in_future"
        v.clock.now += timedelta(days=30)
        assert v.deliver(sim)["late"] is True


def test_ledger_leaves_need_the_admin_but_proofs_are_public(verifier: Harness) -> None:
    sim = verifier.enroll()
    verifier.deliver(sim)
    r = verifier.client.get("/v1/ledger/entries", params={"start": 0, "end": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "admin_unauthorized"
    r = verifier.client.get("/v1/ledger/entries", params={"start": 0, "end": 2},
                            headers={"Authorization": "Bearer not-the-admin-token-at-all"})
    assert r.status_code == 401
    got = verifier.client.get("/v1/ledger/proof/inclusion", params={"index": 1, "size": 2}).json()
    assert set(got) == {"index", "size", "leaf_hash", "root", "proof"}
    assert "payload" not in json.dumps(got)


def test_an_agent_of_one_applicant_cannot_write_for_another(tmp_path: Path) -> None:
    with running_verifier(tmp_path) as v:
        mine, theirs = v.enroll("plat-1"), v.enroll("node-1")
        forged = payload(agent_id=theirs.agent_id, kid=mine.kid, seq=1, prev_hash=theirs.prev_hash,
                         start=theirs.start, end=theirs.start + timedelta(hours=1))
        r = v.post(sign_payload(forged, mine.key))
        assert r.status_code == 403 and r.json()["error"]["code"] == "key_agent_mismatch"
        assert v.client.get(f"/v1/agents/{theirs.agent_id}", headers=v.admin).json()["next_seq"] == 1


def _fuzz(operation: Any, mode: Any, base_url: str, calls: dict[str, int], failures: list[str]) -> None:
    import hypothesis

    @hypothesis.settings(max_examples=6, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, timeout=10)
        calls[mode.value] += 1
        where = f"{case.method} {case.formatted_path} ({mode.value})"
        if response.status_code >= 500:
            failures.append(f"{where}: HTTP {response.status_code} {response.text[:120]}")
        if mode.value == "negative" and 200 <= response.status_code < 300 and case.method != "GET":
            failures.append(f"{where}: accepted invalid input with HTTP {response.status_code}")

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        assert mode.value == "negative"  # an operation without inputs has no invalid input to send


def test_openapi_fuzzing_finds_no_5xx_and_accepts_no_invalid_input(tmp_path: Path) -> None:
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

    @schemathesis.serializer("application/x-ndjson")
    def ndjson(ctx: Any, value: Any) -> bytes:  # the batch endpoint: lines of (generated) text
        return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else json.dumps(value).encode()

    with running_verifier(tmp_path) as v:
        schema = schemathesis.openapi.from_url(f"{v.base_url}/openapi.json")
        failures: list[str] = []
        calls = {"positive": 0, "negative": 0}
        for result in schema.get_all_operations():
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                _fuzz(result.ok(), mode, v.base_url, calls, failures)
        assert failures == [], failures[:5]
        assert calls["positive"] > 20 and calls["negative"] > 10
