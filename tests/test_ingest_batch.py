"""The batched write path (verify the whole batch in memory, then one multi-row statement per table) must store
exactly what ingesting the same envelopes one at a time stores, answer each envelope as the one-at-a-time path
does, and write nothing for a refused one — including the cases that only arise inside a batch: an agent's next
report in the same batch, a replay or an equivocation of a report accepted earlier in the batch."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from protocol.envelope import envelope_hash
from protocol.keys import generate_private_key
from protocol.report import GENESIS_HASH
from tests.test_verifier_core import NOW, AgentSim, bucket, device, uscc
from verifier.checkpoints import ensure_note_key
from verifier.db import (
    agents,
    checkpoints,
    device_aliases,
    device_days,
    entries,
    equivocations,
    init_db,
    ledger_leaves,
    ledger_nodes,
    ledger_state,
    make_engine,
    resolution_days,
)
from verifier.enroll import add_applicant, add_enterprise, enroll_agent, issue_token
from verifier.ingest import IngestResult, ingest_batch, ingest_report
from verifier.ledger import TreeReader
from verifier.pool import VerifyPool

TABLES = (entries, ledger_leaves, ledger_nodes, ledger_state, device_days, resolution_days, device_aliases,
          equivocations, agents)


def _verifier(path: Path, keys: list[Any]) -> tuple[Engine, list[AgentSim]]:
    """A verifier with one applicant and the given agent keys enrolled (same ids in every database)."""
    from protocol.keys import public_key_b64

    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    ensure_note_key(engine)
    add_applicant(engine, applicant_id="app-1", name="示范平台", kind="platform", now=NOW - timedelta(days=30))
    add_enterprise(engine, applicant_id="app-1", uscc=uscc(1), name="企业一", now=NOW - timedelta(days=30))
    sims = []
    for i, key in enumerate(keys):
        token = issue_token(engine, applicant_id="app-1", enterprise=uscc(1), now=NOW - timedelta(days=30)).token
        e = enroll_agent(engine, token=token, public_key_b64=public_key_b64(key.public_key()), agent_name=f"a{i}",
                         now=NOW - timedelta(days=30))
        sims.append(AgentSim(key=key, agent_id=e.agent_id))
    return engine, sims


def _dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with engine.connect() as conn:
        for table in TABLES:
            rows = conn.execute(select(table)).all()
            out[table.name] = sorted(tuple(str(v) for k, v in r._mapping.items() if k not in ("id", "enrolled_at"))
                                     for r in rows)
    return out


def _stream(sims: list[AgentSim], rng: random.Random, n: int) -> list[bytes]:
    """Reports from several agents, interleaved, with replays, equivocations, gaps and a broken signature."""
    out: list[bytes] = []
    for _ in range(n):
        a = rng.choice(sims)
        roll = rng.random()
        if roll < 0.08 and a.accepted:  # a replay of an accepted report, maybe from this very batch
            out.append(rng.choice(a.accepted))
            continue
        if roll < 0.12 and a.accepted:  # equivocation: other bytes for an accepted seq
            prev = GENESIS_HASH if a.seq == 2 else envelope_hash(a.accepted[-2])
            out.append(a.next_envelope(seq=a.seq - 1, prev_hash=prev,
                                       devices=[device("x", enterprise=None, start=a.start)]))
            continue
        if roll < 0.15 and a.accepted:  # a gap
            out.append(a.next_envelope(seq=a.seq + 2))
            continue
        if roll < 0.17:  # one byte of the signature changed
            env = bytearray(a.next_envelope())
            env[-6] = ord("A") if env[-6] != ord("A") else ord("B")
            out.append(bytes(env))
            continue
        shared = rng.randrange(3)  # devices shared across agents and reports: upserts meet in one batch
        env = a.next_envelope(
            devices=[device(f"shared-{shared}", enterprise=uscc(1) if rng.random() < 0.5 else None, start=a.start,
                            status=rng.choice(["registered", "reachable", "active"]),
                            protocols=[rng.choice(["opcua", "modbus", "mqtt"])],
                            aliases=[f"alias-{shared}"] if rng.random() < 0.3 else []),
                     device(f"own-{a.agent_id}-{a.seq % 4}", enterprise=uscc(1), start=a.start)],
            buckets=[bucket(a.start + timedelta(minutes=5), count=rng.randrange(1, 9)),
                     bucket(a.start + timedelta(minutes=6), op=100, count=2)])
        out.append(env)
        a.advance(env)
    return out


@pytest.mark.parametrize(("batch", "workers"), [(1, 0), (7, 0), (64, 0), (64, 2)])
def test_batched_ingest_stores_exactly_what_one_by_one_ingest_stores(tmp_path: Path, batch: int,
                                                                     workers: int) -> None:
    """With ``workers``, signatures are checked in that many real worker processes (spawned)."""
    keys = [generate_private_key() for _ in range(4)]
    one, sims_one = _verifier(tmp_path / "one.sqlite", keys)
    many, sims_many = _verifier(tmp_path / "many.sqlite", keys)
    assert [s.agent_id for s in sims_one] == [s.agent_id for s in sims_many]  # ids derive from the keys
    stream = _stream(sims_one, random.Random(7), 150)

    expected: list[str] = []
    for env in stream:
        try:
            r = ingest_report(one, env, now=NOW)
            expected.append(f"{'created' if r.created else 'replay'} {r.receipt.index}")
        except Exception as exc:
            expected.append(type(exc).__name__)
    got: list[str] = []
    pool = VerifyPool(workers, min_batch=2)
    try:
        outcomes = [r for i in range(0, len(stream), batch)
                    for r in ingest_batch(many, stream[i:i + batch], now=NOW, pool=pool)]
    finally:
        pool.close()
    for r in outcomes:
        got.append(f"{'created' if r.created else 'replay'} {r.receipt.index}" if isinstance(r, IngestResult)
                   else type(r).__name__)
    assert got == expected
    kinds = set(expected)
    assert {"SeqConflict", "SeqGap", "SignatureInvalid"} <= {k for k in kinds if not k[0].islower()}
    assert any(k.startswith("replay") for k in kinds) and sum(k.startswith("created") for k in expected) > 60
    assert _dump(many) == _dump(one)
    with one.connect() as a, many.connect() as b:
        size = a.execute(select(ledger_state.c.size)).scalar_one()
        assert TreeReader(b).root(size) == TreeReader(a).root(size)


def test_refused_reports_in_a_batch_change_nothing(tmp_path: Path) -> None:
    """Attack: a batch of nothing but forged, gapped and equivocating reports. Nothing stored may change but the
    equivocation evidence."""
    engine, (a,) = _verifier(tmp_path / "v.sqlite", [generate_private_key()])
    first = a.next_envelope(devices=[device("d1", enterprise=uscc(1), start=a.start)])
    assert isinstance(ingest_batch(engine, [first], now=NOW)[0], IngestResult)
    a.advance(first)
    before = _dump(engine)
    forged = bytearray(a.next_envelope())
    forged[-6] = ord("A") if forged[-6] != ord("A") else ord("B")
    conflicting = a.next_envelope(seq=1, prev_hash=GENESIS_HASH,
                                  devices=[device("d9", enterprise=uscc(1), start=a.start)])
    results = ingest_batch(engine, [bytes(forged), a.next_envelope(seq=5), conflicting, b"{}"], now=NOW)
    assert [type(r).__name__ for r in results] == ["SignatureInvalid", "SeqGap", "SeqConflict", "EnvelopeMalformed"]
    after = _dump(engine)
    assert len(after.pop("equivocations")) == 1
    before.pop("equivocations")
    assert after == before


def test_envelope_bytes_must_be_canonical(tmp_path: Path) -> None:
    """Attack: the same signed envelope re-encoded (JSON-equal, other bytes) to get a second envelope hash — a
    second chain position for one report. Every re-encoding is refused and nothing stored changes."""
    import json

    from protocol.canonical import canonical_json
    from protocol.envelope import _canonical_envelope
    from protocol.errors import EnvelopeNotCanonical

    engine, (a,) = _verifier(tmp_path / "v.sqlite", [generate_private_key()])
    env = a.next_envelope(devices=[device("d1", enterprise=uscc(1), start=a.start)])
    obj = json.loads(env)
    first = env[len(b'{"payload":"'):][:1]
    variants = [
        json.dumps(obj).encode(),  # spaces after the separators
        json.dumps({"signatures": obj["signatures"], "payloadType": obj["payloadType"], "payload": obj["payload"]},
                   separators=(",", ":")).encode(),  # keys in another order
        env.replace(b'"payload":"' + first, b'"payload":"\\u00' + first.hex().encode(), 1),  # a letter escaped
        env + b"\n",
    ]
    before = _dump(engine)
    for variant in variants:
        assert variant != env and json.loads(variant) == obj
        result = ingest_batch(engine, [variant], now=NOW)[0]
        assert isinstance(result, EnvelopeNotCanonical), variant[:80]
    assert _dump(engine) == before
    assert isinstance(ingest_batch(engine, [env], now=NOW)[0], IngestResult)
    # the direct writer equals the general canonicalizer, also for strings it leaves to the general one
    for strings in (("cGF5", "application/x", "ab12", "c2ln"), ("é\"\\\n", "t\u2028", "k<>&", "\x7f\x01")):
        payload, ptype, kid, sig = strings
        assert _canonical_envelope(payload, ptype, kid, sig) == canonical_json(
            {"payload": payload, "payloadType": ptype, "signatures": [{"keyid": kid, "sig": sig}]})


def _post_batch(v: Any, lines: list[bytes], content_type: str = "application/x-ndjson") -> Any:
    return v.client.post("/v1/reports/batch", content=b"\n".join(lines) + b"\n",
                         headers={"Content-Type": content_type})


def test_batch_endpoint_answers_each_line_as_if_posted_alone(tmp_path: Path) -> None:
    from tests.test_verifier_api import running_verifier

    with running_verifier(tmp_path, verify_workers=2) as v:
        a = v.enroll()
        envs = []
        for _ in range(34):  # more than the pool's threshold: the signatures are checked in worker processes
            env = a.next_envelope(devices=[device("d1", enterprise=uscc(1), start=a.start)])
            envs.append(env)
            a.advance(env)
        gap = a.next_envelope(seq=a.seq + 3)
        r = _post_batch(v, [*envs[:2], envs[0], gap, *envs[2:]])
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results[:5]] == [201, 201, 200, 409, 201]
        assert results[3]["error"]["code"] == "seq_gap" and "expected 3, got" in results[3]["error"]["message"]
        assert results[2]["receipt"] == results[0]["receipt"]  # the replay gets the first receipt
        assert [x["receipt"]["seq"] for x in results if x["status"] == 201] == list(range(1, 35))
        assert v.stored()[0].size == 34
        assert v.client.get(f"/v1/agents/{a.agent_id}", headers=v.admin).json()["next_seq"] == 35


def test_batch_endpoint_refusals(tmp_path: Path) -> None:
    """Attacks and mistakes: wrong media type, empty or oversized batches, a batch of nothing but forgeries,
    a flood past the per-agent rate. Each is refused with what was expected; nothing stored changes."""
    from tests.test_verifier_api import running_verifier

    with running_verifier(tmp_path, max_batch_reports=5, agent_burst=3, agent_rate_per_s=0.001) as v:
        a = v.enroll()
        before = v.stored()
        env = a.next_envelope()
        r = _post_batch(v, [env], content_type="application/json")
        assert r.status_code == 415 and "expected application/x-ndjson" in r.json()["error"]["message"]
        r = v.client.post("/v1/reports/batch", content=b"", headers={"Content-Type": "application/x-ndjson"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "batch_invalid"
        r = _post_batch(v, [env] * 6)
        assert r.status_code == 422 and "expected 1 to 5 envelopes, one per line, got 6" in r.json()["error"]["message"]
        forged = bytearray(env)
        forged[-6] = ord("A") if forged[-6] != ord("A") else ord("B")
        r = _post_batch(v, [bytes(forged), b"not json"])
        assert r.status_code == 403, r.text  # nothing accepted: the first refusal's status, not a success
        assert [x["error"]["code"] for x in r.json()["results"]] == ["signature_invalid", "envelope_malformed"]
        assert v.stored() == before
        envs = []
        for _ in range(5):
            e = a.next_envelope()
            envs.append(e)
            a.advance(e)
        r = _post_batch(v, envs)  # 3 tokens in the bucket (two spent above), then 429 per line
        statuses = [x["status"] for x in r.json()["results"]]
        assert r.status_code == 200 and statuses.count(429) >= 2 and statuses[0] == 201, statuses
        limited = next(x for x in r.json()["results"] if x["status"] == 429)
        assert limited["error"]["code"] == "rate_limited" and limited["error"]["retry_after_s"] >= 1


def test_the_last_reports_before_a_quiet_spell_get_a_signed_checkpoint(tmp_path: Path) -> None:
    """Checkpoints are due every N entries or every N seconds: with no report after the last ones, the timer
    signs a checkpoint that covers them (and the next one stays consistent with it)."""
    import time

    from tests.test_verifier_api import running_verifier

    with running_verifier(tmp_path, checkpoint_every_s=0.2, checkpoint_every_entries=1000) as v:
        a = v.enroll()
        for _ in range(3):
            v.deliver(a)
        size = v.client.get("/healthz").json()["ledger_size"]
        v.clock.now = v.clock.now + timedelta(seconds=1)  # the app's clock: the schedule's seconds have passed
        deadline = time.monotonic() + 10
        signed = 0
        while time.monotonic() < deadline and signed < 4:  # read the store: asking the API would sign on demand
            time.sleep(0.1)
            with v.engine.connect() as conn:
                signed = conn.execute(select(func.max(checkpoints.c.size))).scalar() or 0
        assert size == 3 and signed == 4  # 3 reports and the enrollment's key event: all covered
