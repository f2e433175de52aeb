"""The Merkle ledger (RFC 9162 tree over the entries), signed checkpoints and key events, on a real SQLite file and
on a private PostgreSQL started for this session (initdb + pg_ctl on a free loopback port).

Also holds the PostgreSQL helpers the other issue-5 test files import."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, delete, select, text, update

from protocol import merkle
from protocol.canonical import canonical_json
from protocol.keys import public_key_b64
from protocol.note import Checkpoint, open_note, parse_verifier_key
from simulator.mosquitto import free_port
from tests.test_verifier_api import running_verifier
from tests.test_verifier_core import NOW, AgentSim, _enrolled, device, uscc
from verifier.checkpoints import CheckpointInconsistent, CheckpointSchedule, ensure_note_key, sign_checkpoint
from verifier.db import entries, init_db, ledger_leaves, ledger_nodes, ledger_state, make_engine
from verifier.enroll import add_applicant, add_enterprise, revoke_agent
from verifier.ingest import ingest_report
from verifier.ledger import LEAF_KEY_EVENT, LEAF_REPORT, TreeReader, append_leaf, lock_ledger, read_leaves

PG_BIN_DIRS = ("/usr/local/bin", *sorted(str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")))


def _pg_bin(name: str) -> str | None:
    for d in PG_BIN_DIRS:
        if os.access(Path(d) / name, os.X_OK):
            return str(Path(d) / name)
    return shutil.which(name)


@contextmanager
def private_postgres() -> Iterator[str]:
    """initdb + pg_ctl start on a free 127.0.0.1 port (as the 'postgres' user when run as root); yields an admin
    URL; stops the server (immediate) and removes its files afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) in /usr/local/bin, /usr/lib/postgresql/*/bin or PATH")
    base = Path(tempfile.mkdtemp(prefix="tianping-pg-"))
    data = base / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "tianping", "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=60)
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "-t", "30",
                    "start"], check=True, capture_output=True, timeout=60)
    try:
        yield f"postgresql+psycopg://tianping@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with private_postgres() as url:
        yield url


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"t_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An initialized verifier database with applicant app-1, on SQLite and on the private PostgreSQL."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'verifier.sqlite'}"
        else:
            url = stack.enter_context(fresh_database(request.getfixturevalue("pg_server")))
        eng = make_engine(url)
        stack.callback(eng.dispose)
        init_db(eng)
        ensure_note_key(eng)
        add_applicant(eng, applicant_id="app-1", name="示范平台", kind="platform", now=NOW)
        add_enterprise(eng, applicant_id="app-1", uscc=uscc(1), name="企业一", now=NOW)
        yield eng


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(f"leaf {i}".encode()) for i in range(n)]


def _fill(engine: Engine, leaves: list[bytes]) -> None:
    with engine.begin() as conn:
        size = lock_ledger(conn)
        for leaf in leaves:
            size = append_leaf(conn, size=size, kind=LEAF_KEY_EVENT, leaf=leaf, body=b"{}") + 1


def test_stored_tree_gives_the_rfc9162_roots_and_proofs_of_protocol_merkle(ledger_engine: Engine) -> None:
    leaves = _leaves(37)
    _fill(ledger_engine, leaves)
    with ledger_engine.connect() as conn:
        reader = TreeReader(conn)
        for n in range(1, 38):
            root = reader.root(n)
            assert root == merkle.root_from_leaf_hashes(leaves[:n])
            for i in range(n):
                proof = reader.inclusion(i, n)
                assert proof == merkle.inclusion_proof(leaves[:n], i)
                merkle.verify_inclusion(leaves[i], i, n, proof, root)
            for m in range(1, n + 1):
                proof = reader.consistency(m, n)
                assert proof == merkle.consistency_proof(leaves[:n], m)
                merkle.verify_consistency(m, n, proof, reader.root(m), root)
        assert reader.root(0) == merkle.EMPTY_ROOT
        with pytest.raises(merkle.ProofInvalid, match=r"expected 0 <= index < 37, got 37"):
            reader.inclusion(37, 37)
        # amortized one stored node per leaf: 37 leaves -> 37 - popcount(37) interior nodes
        assert len(conn.execute(select(ledger_nodes.c.idx)).all()) == 37 - bin(37).count("1")


def test_reports_and_key_events_are_leaves_in_commit_order(ledger_engine: Engine) -> None:
    a = _enrolled(ledger_engine)
    env = a.next_envelope(devices=[device("d1", enterprise=uscc(1), start=a.start)])
    receipt = ingest_report(ledger_engine, env, now=NOW).receipt
    a.advance(env)
    revoke_agent(ledger_engine, agent_id=a.agent_id, now=NOW + timedelta(hours=1), reason="stolen")
    with ledger_engine.connect() as conn:
        leaves = read_leaves(conn, 0, 10)
        size = int(conn.execute(select(ledger_state.c.size)).scalar_one())
    assert [leaf.kind for leaf in leaves] == [LEAF_KEY_EVENT, LEAF_REPORT, LEAF_KEY_EVENT] and size == 3
    enroll, report, revoke = leaves
    assert report.data == env and report.entry_index == receipt.index
    assert report.leaf_hash.hex() == receipt.leaf_hash == hashlib.sha256(b"\x00" + env).hexdigest()
    body = canonical_json({"kind": "key_event", "event": "enroll", "agent_id": a.agent_id, "applicant_id": "app-1",
                           "key_id": a.kid, "public_key": public_key_b64(a.key.public_key()),
                           "at": NOW.astimezone(UTC).isoformat(),
                           "detail": {"enterprise": uscc(1)}})
    assert enroll.data == body and enroll.leaf_hash == merkle.leaf_hash(body)
    assert b'"event":"revoke"' in revoke.data and b'"reason":"stolen"' in revoke.data


def test_checkpoint_is_signed_after_a_consistency_proof_and_reproduced_by_the_note_key(ledger_engine: Engine
                                                                                       ) -> None:
    vkey = ensure_note_key(ledger_engine)
    _fill(ledger_engine, _leaves(5))
    first = sign_checkpoint(ledger_engine, now=NOW)
    assert sign_checkpoint(ledger_engine, now=NOW) == first  # nothing new: the same checkpoint
    _fill(ledger_engine, _leaves(12)[5:])
    second = sign_checkpoint(ledger_engine, now=NOW)
    cp = Checkpoint.parse(open_note(second.note, parse_verifier_key(vkey.encode())))
    assert (cp.size, cp.root) == (12, merkle.root_from_leaf_hashes(_leaves(12)))
    assert cp.origin == vkey.name and first.checkpoint.size == 5


def test_rolled_back_database_is_refused_a_new_checkpoint(ledger_engine: Engine) -> None:
    _fill(ledger_engine, _leaves(9))
    sign_checkpoint(ledger_engine, now=NOW)
    with ledger_engine.begin() as conn:  # an older snapshot: the last 3 leaves are gone
        conn.execute(delete(ledger_nodes).where(ledger_nodes.c.level == 1, ledger_nodes.c.idx >= 3))
        conn.execute(delete(ledger_leaves).where(ledger_leaves.c.tree_index >= 6))
        conn.execute(update(ledger_state).values(size=6))
    with pytest.raises(CheckpointInconsistent, match=r"expected at least 9 .* got 6: the database is older"):
        sign_checkpoint(ledger_engine, now=NOW)


def test_rewritten_history_is_refused_a_new_checkpoint(ledger_engine: Engine) -> None:
    _fill(ledger_engine, _leaves(6))
    sign_checkpoint(ledger_engine, now=NOW)
    with ledger_engine.begin() as conn:  # someone rewrites leaf 2 and the nodes above it
        conn.execute(delete(ledger_nodes))
        conn.execute(delete(ledger_leaves))
        conn.execute(update(ledger_state).values(size=0))
    forged = _leaves(6)
    forged[2] = merkle.leaf_hash(b"forged")
    _fill(ledger_engine, [*forged, *_leaves(8)[6:]])
    with pytest.raises(CheckpointInconsistent, match="expected it to extend the checkpoint of size 6"):
        sign_checkpoint(ledger_engine, now=NOW)


def test_schedule_signs_every_m_entries_or_every_n_seconds() -> None:
    s = CheckpointSchedule(every_s=60, every_entries=100)
    assert s.due(0, NOW)  # the first check always looks
    s._last_size, s._last_at = 10, NOW
    assert not s.due(10, NOW + timedelta(hours=1))  # nothing new
    assert not s.due(50, NOW + timedelta(seconds=59))
    assert s.due(50, NOW + timedelta(seconds=60))
    assert s.due(110, NOW + timedelta(seconds=1))
    with pytest.raises(ValueError, match="every_entries >= 1"):
        CheckpointSchedule(every_s=1, every_entries=0)


def test_ledger_api_serves_key_checkpoint_and_proofs(tmp_path: Path) -> None:
    with running_verifier(tmp_path, checkpoint_every_entries=1) as v:
        sims = [v.enroll() for _ in range(2)]
        for _ in range(3):
            for s in sims:
                v.deliver(s, devices=[device(f"api-{s.agent_id}", enterprise=uscc(1), start=s.start)])
        vkey = parse_verifier_key(v.client.get("/v1/ledger/key").json()["verifier_key"])
        cp_json = v.client.get("/v1/ledger/checkpoint").json()
        cp = Checkpoint.parse(open_note(cp_json["note"], vkey))
        assert cp.size == 8  # 2 enrollments + 6 reports
        receipt = v.deliver(sims[0])
        r = v.client.get("/v1/ledger/proof/inclusion", params={"entry": receipt["index"], "size": 9})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["leaf_hash"] == receipt["leaf_hash"] and got["index"] == 8
        merkle.verify_inclusion(bytes.fromhex(got["leaf_hash"]), 8, 9, [bytes.fromhex(p) for p in got["proof"]],
                                bytes.fromhex(got["root"]))
        c = v.client.get("/v1/ledger/proof/consistency", params={"from": cp.size, "to": 9}).json()
        merkle.verify_consistency(cp.size, 9, [bytes.fromhex(p) for p in c["proof"]], cp.root,
                                  bytes.fromhex(c["root2"]))
        assert v.client.get("/v1/ledger/proof/inclusion", params={"index": 0, "size": 99}).status_code == 404
        assert v.client.get("/v1/ledger/proof/inclusion", params={"size": 3}).status_code == 422
        assert v.client.get("/v1/ledger/proof/consistency", params={"from": 5, "to": 3}).status_code == 422
        assert v.client.get("/v1/ledger/entries", params={"start": 0, "end": 3}).status_code in (401, 403)
        page = v.client.get("/v1/ledger/entries", params={"start": 0, "end": 3}, headers=v.admin).json()
        assert [e["kind"] for e in page["entries"]] == ["key_event", "key_event", "report"]


@pytest.mark.postgres
def test_two_writers_on_postgresql_keep_the_tree_sequence(pg_server: str) -> None:
    """Two engines (two connection pools, as two verifier processes would have) ingest concurrently."""
    import threading

    with fresh_database(pg_server) as url:
        engines = [make_engine(url) for _ in range(2)]
        init_db(engines[0])
        ensure_note_key(engines[0])
        add_applicant(engines[0], applicant_id="app-1", name="示范平台", kind="platform", now=NOW)
        add_enterprise(engines[0], applicant_id="app-1", uscc=uscc(1), name="企业一", now=NOW)
        sims: list[AgentSim] = [_enrolled(engines[i % 2]) for i in range(4)]
        errors: list[BaseException] = []

        def run(sim: AgentSim, eng: Engine) -> None:
            try:
                for _ in range(10):
                    env = sim.next_envelope()
                    ingest_report(eng, env, now=NOW)
                    sim.advance(env)
                    sign_checkpoint(eng, now=NOW)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s, engines[i % 2])) for i, s in enumerate(sims)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        with engines[0].connect() as conn:
            idx = [int(r[0]) for r in conn.execute(select(ledger_leaves.c.tree_index)
                                                   .order_by(ledger_leaves.c.tree_index))]
            assert idx == list(range(44))
            assert [int(r[0]) for r in conn.execute(select(entries.c.entry_index).order_by(entries.c.entry_index))
                    ] == list(range(40))
            leaves = [bytes(r[0]) for r in conn.execute(select(ledger_leaves.c.leaf_hash)
                                                        .order_by(ledger_leaves.c.tree_index))]
            assert TreeReader(conn).root(44) == merkle.root_from_leaf_hashes(leaves)
        for e in engines:
            e.dispose()


async def test_group_commit_answers_each_report_after_one_commit(tmp_path: Path) -> None:
    import asyncio

    from verifier.errors import SeqGap
    from verifier.ingest import GroupCommitWriter, IngestResult

    engine = make_engine(f"sqlite:///{tmp_path / 'v.sqlite'}")
    init_db(engine)
    ensure_note_key(engine)
    add_applicant(engine, applicant_id="app-1", name="示范平台", kind="platform", now=NOW)
    add_enterprise(engine, applicant_id="app-1", uscc=uscc(1), name="企业一", now=NOW)
    sims = [_enrolled(engine) for _ in range(3)]
    envs = []
    for s in sims:
        env = s.next_envelope()
        s.advance(env)
        envs.append(env)
    gap = sims[0].next_envelope(seq=5)

    def failing_step() -> None:
        raise CheckpointInconsistent("simulated")

    writer = GroupCommitWriter(engine, lock=asyncio.Lock(), clock=lambda: NOW, after_commit=failing_step)
    results = await asyncio.gather(*(writer.submit(e) for e in [*envs, gap, envs[1]]), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["IngestResult"] * 3 + ["SeqGap", "IngestResult"]
    assert isinstance(results[3], SeqGap) and "expected 2, got 5" in str(results[3])
    replay = results[4]
    assert isinstance(replay, IngestResult) and not replay.created  # the same bytes again: the first receipt
    assert writer.batches < 5 and writer.reports == 5  # grouped: fewer commits than reports
    with engine.connect() as conn:
        assert [r.kind for r in read_leaves(conn, 0, 10)] == [LEAF_KEY_EVENT] * 3 + [LEAF_REPORT] * 3
    engine.dispose()
