"""Two verifier processes serving one private PostgreSQL database at once: the tree keeps one sequence (indexes
without holes, the root of the stored tree equals the RFC 9162 root of the leaves, every checkpoint consistent)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from agent.delivery import Deliverer
from agent.outbox import Outbox
from protocol import merkle
from protocol.keys import generate_private_key, public_key_b64
from simulator.mosquitto import free_port
from tests.test_faults import OutboxAgent, drain
from tests.test_faults_kill import check_ledger, verifier_process, wait_up
from tests.test_ledger import fresh_database, pg_server  # noqa: F401 (the session fixture)
from tests.test_verifier_api import write_test_rules
from tests.test_verifier_core import NOW, uscc
from verifier.checkpoints import ensure_note_key
from verifier.db import init_db, ledger_leaves, make_engine
from verifier.enroll import add_applicant, add_enterprise, enroll_agent, issue_token
from verifier.ledger import TreeReader, tree_size

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


async def test_two_verifier_processes_share_one_tree(pg_server: str, tmp_path: Path) -> None:  # noqa: F811
    with fresh_database(pg_server) as url:
        engine = make_engine(url)
        init_db(engine)
        ensure_note_key(engine)
        add_applicant(engine, applicant_id="app-1", name="示范平台", kind="platform", now=NOW)
        add_enterprise(engine, applicant_id="app-1", uscc=uscc(1), name="企业一", now=NOW)
        agents = []
        for i in range(6):
            key = generate_private_key()
            token = issue_token(engine, applicant_id="app-1", now=NOW).token
            aid = enroll_agent(engine, token=token, public_key_b64=public_key_b64(key.public_key()),
                               agent_name=f"edge-{i}", now=NOW).agent_id
            agents.append(OutboxAgent(key, aid, Outbox(tmp_path / f"{aid}.sqlite")))
        rules = write_test_rules(tmp_path)
        ports = [free_port(), free_port()]
        with verifier_process(url, rules, ports[0]) as first, verifier_process(url, rules, ports[1]) as second:
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            await asyncio.gather(asyncio.to_thread(wait_up, urls[0], first),
                                 asyncio.to_thread(wait_up, urls[1], second))
            rng = random.Random(2)
            async with httpx.AsyncClient(timeout=30) as client:
                for _ in range(8):  # each round, every agent sends through one of the two, at random
                    for a in agents:
                        a.produce()
                    await asyncio.gather(*(drain(Deliverer(rng.choice(urls), client=client), a.outbox,
                                                 deadline_s=60) for a in agents))
                held = [(await client.get(f"{u}/v1/ledger/checkpoint")).json()["note"] for u in urls]
        figures = check_ledger(engine, {a.agent_id: a.outbox for a in agents}, held)
        with engine.connect() as conn:
            size = tree_size(conn)
            indexes = [int(r[0]) for r in conn.execute(select(ledger_leaves.c.tree_index)
                                                       .order_by(ledger_leaves.c.tree_index))]
            leaves = [bytes(r[0]) for r in conn.execute(select(ledger_leaves.c.leaf_hash)
                                                        .order_by(ledger_leaves.c.tree_index))]
            assert TreeReader(conn).root(size) == merkle.root_from_leaf_hashes(leaves)
        assert indexes == list(range(size)) and size == 6 + 6 * 8
        assert figures["entries"] == 48
        for a in agents:
            a.outbox.close()
        engine.dispose()
