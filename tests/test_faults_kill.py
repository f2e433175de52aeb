"""kill -9, for real (slow; loopback only): the verifier killed 20 times while 50 agents each produce 5 reports a
second, and an agent process killed 20 times mid-send. Nothing acknowledged is lost, nothing is counted twice, and
every checkpoint the verifier signed before a crash is consistent with the last one."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from agent.delivery import Deliverer
from agent.outbox import Outbox
from protocol import merkle
from protocol.keys import generate_private_key, public_key_b64, read_private_key, write_private_key
from protocol.note import Checkpoint, open_note
from simulator.mosquitto import free_port
from tests.test_faults import OutboxAgent, drain, tiny_filesystem
from tests.test_verifier_api import write_test_rules
from tests.test_verifier_core import NOW, uscc
from verifier.checkpoints import all_checkpoints, ensure_note_key
from verifier.db import entries, init_db, make_engine
from verifier.enroll import add_applicant, add_enterprise, enroll_agent, issue_token
from verifier.ledger import TreeReader, tree_size

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SERVER = """
import sys, uvicorn
from pathlib import Path
from verifier.api import VerifierSettings, create_app
app = create_app(VerifierSettings(db_url=sys.argv[1], rules_path=Path(sys.argv[2]), checkpoint_every_entries=100,
                                  checkpoint_every_s=1.0, agent_rate_per_s=1000.0, agent_burst=1000))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="error")
"""


@contextmanager
def verifier_process(db_url: str, rules: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    log_path = rules.with_name("verifier.log")
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, db_url, str(rules), str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"verifier: expected it running, it exited with {proc.returncode} (see its log)")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"verifier at {url}: expected it up within {timeout_s} s")


def prepare(tmp: Path, n_agents: int) -> tuple[str, Path, Engine, list[tuple[str, Path]]]:
    db_url = f"sqlite:///{tmp / 'verifier.sqlite'}"
    engine = make_engine(db_url)
    init_db(engine)
    ensure_note_key(engine)
    add_applicant(engine, applicant_id="app-1", name="示范平台", kind="platform", now=NOW)
    add_enterprise(engine, applicant_id="app-1", uscc=uscc(1), name="企业一", now=NOW)
    agents = []
    for i in range(n_agents):
        key = generate_private_key()
        path = tmp / f"agent-{i}.key"
        write_private_key(key, path)
        token = issue_token(engine, applicant_id="app-1", now=NOW).token
        agents.append((enroll_agent(engine, token=token, public_key_b64=public_key_b64(key.public_key()),
                                    agent_name=f"edge-{i}", now=NOW).agent_id, path))
    return db_url, write_test_rules(tmp), engine, agents


def check_ledger(engine: Engine, outboxes: dict[str, Outbox], held_notes: list[str]) -> dict[str, int]:
    """0 acknowledged lost, 0 duplicates, every report produced is in the ledger once, checkpoints consistent."""
    with engine.connect() as conn:
        rows = conn.execute(select(entries.c.agent_id, entries.c.seq, entries.c.entry_index,
                                   entries.c.envelope_hash)).all()
        by_key = {(r.agent_id, int(r.seq)): (int(r.entry_index), r.envelope_hash) for r in rows}
        assert len(by_key) == len(rows)  # no (agent, seq) twice
        assert int(conn.execute(select(func.count(func.distinct(entries.c.envelope_hash)))).scalar_one()) == len(rows)
        acknowledged = 0
        for agent_id, outbox in outboxes.items():
            produced = outbox.chain().next_seq - 1
            assert sorted(s for (a, s) in by_key if a == agent_id) == list(range(1, produced + 1)), agent_id
            for seq, receipt_text in outbox._db.execute("SELECT seq, receipt FROM receipts").fetchall():
                receipt = json.loads(receipt_text)
                assert by_key[(agent_id, int(seq))] == (receipt["index"], receipt["envelope_hash"])
                acknowledged += 1
        size = tree_size(conn)
        reader = TreeReader(conn)
        root = reader.root(size)
        signed = all_checkpoints(conn)
        from verifier.checkpoints import note_signer

        verifier = note_signer(conn).verifier()
        notes = [c.note for c in signed] + held_notes
        for note in notes:
            cp = Checkpoint.parse(open_note(note, verifier))
            if 0 < cp.size < size:
                merkle.verify_consistency(cp.size, size, reader.consistency(cp.size, size), cp.root, root)
            elif cp.size == size:
                assert cp.root == root
        for a, b in itertools.pairwise(signed):
            assert a.checkpoint.size <= b.checkpoint.size
    return {"entries": len(rows), "acknowledged": acknowledged, "checkpoints": len(signed),
            "held_checkpoints": len(held_notes), "tree_size": size}


async def test_verifier_killed_20_times_while_50_agents_send(tmp_path: Path) -> None:
    n_agents, rate_per_agent, kills = 50, 5.0, 20
    db_url, rules, engine, agents = prepare(tmp_path, n_agents)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(7)
    with ExitStack() as stack:
        box_dir = stack.enter_context(tiny_filesystem(384 * 1024))  # outbox fsyncs are not what is tested here
        outboxes = {aid: Outbox(box_dir / f"{aid}.sqlite") for aid, _ in agents}
        producers = [OutboxAgent(read_private_key(path), aid, outboxes[aid]) for aid, path in agents]
        stop = asyncio.Event()
        held: list[str] = []

        async def run_agent(agent: OutboxAgent) -> None:
            deliverer = Deliverer(url, timeout_s=2.0, max_backoff_s=0.3, rng=random.Random(agent.agent_id))
            next_at = time.monotonic() + rng.random() / rate_per_agent
            try:
                while not stop.is_set():
                    agent.produce()
                    await deliverer.deliver_pending(agent.outbox)
                    next_at += 1 / rate_per_agent
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            finally:
                await deliverer.aclose()

        async def official() -> None:  # fetches signed checkpoints while the verifier lives
            async with httpx.AsyncClient(timeout=1) as client:
                while not stop.is_set():
                    try:
                        r = await client.get(f"{url}/v1/ledger/checkpoint")
                        if r.status_code == 200:
                            held.append(r.json()["note"])
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.3)

        tasks = [asyncio.create_task(run_agent(a), name=f"agent-{a.agent_id}") for a in producers]
        tasks.append(asyncio.create_task(official(), name="official"))
        t0 = time.monotonic()
        for _ in range(kills):
            with verifier_process(db_url, rules, port) as proc:
                await asyncio.to_thread(wait_up, url, proc)
                await asyncio.sleep(0.3 + rng.random() * 0.6)
                os.kill(proc.pid, signal.SIGKILL)
        stop.set()
        await asyncio.gather(*tasks)
        load_s = time.monotonic() - t0
        with verifier_process(db_url, rules, port) as proc:  # the last life: drain every backlog
            await asyncio.to_thread(wait_up, url, proc)
            async with httpx.AsyncClient(timeout=10) as client:
                await asyncio.gather(*(drain(Deliverer(url, client=client), a.outbox, deadline_s=150)
                                       for a in producers))
                held.append((await client.get(f"{url}/v1/ledger/checkpoint")).json()["note"])
        figures = check_ledger(engine, outboxes, held)
        for outbox in outboxes.values():
            assert outbox.depth() == 0
            outbox.close()
        print(f"verifier kill -9 x{kills}, {n_agents} agents x {rate_per_agent}/s over {load_s:.1f} s: {figures}")
        assert figures["entries"] >= n_agents * 5 and figures["acknowledged"] == figures["entries"]
    engine.dispose()


AGENT_WORKER = """
import asyncio, json, random, sys
from pathlib import Path
from agent.delivery import Deliverer
from agent.outbox import Outbox
from protocol.keys import read_private_key
from tests.test_faults import OutboxAgent

spec = json.loads(sys.argv[1])
async def main():
    agents = [OutboxAgent(read_private_key(Path(p)), aid, Outbox(Path(b))) for aid, p, b in spec["agents"]]
    deliverers = [Deliverer(spec["url"], timeout_s=2.0, max_backoff_s=0.2) for _ in agents]
    print("ready", flush=True)
    while True:
        for a, d in zip(agents, deliverers):
            a.produce()
            await d.deliver_pending(a.outbox)
        await asyncio.sleep(0.02)
asyncio.run(main())
"""


async def test_agents_killed_20_times_mid_send_leave_every_report_once(tmp_path: Path) -> None:
    db_url, rules, engine, agents = prepare(tmp_path, 5)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = {"url": url, "agents": [(aid, str(p), str(tmp_path / f"{aid}.outbox")) for aid, p in agents]}
    rng = random.Random(11)
    with verifier_process(db_url, rules, port) as server:
        await asyncio.to_thread(wait_up, url, server)
        for _ in range(20):
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-c", AGENT_WORKER, json.dumps(spec), cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL)
            assert worker.stdout is not None
            # once its imports are done (seconds on a busy machine), long enough to produce and be mid-send
            assert await asyncio.wait_for(worker.stdout.readline(), timeout=60) == b"ready\n"
            await asyncio.sleep(0.3 + rng.random() * 0.6)
            worker.kill()
            await worker.wait()
        outboxes = {aid: Outbox(Path(b)) for aid, _, b in spec["agents"]}
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(*(drain(Deliverer(url, client=client), outbox, deadline_s=60)
                                   for outbox in outboxes.values()))
    figures = check_ledger(engine, outboxes, [])
    print(f"agent kill -9 x20: {figures}")
    assert figures["entries"] > 20  # the workers did get reports through between kills
    for outbox in outboxes.values():
        outbox.close()
    engine.dispose()
