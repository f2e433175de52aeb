"""Delivery that loses nothing: the agent's outbox on a really full disk, retries through a fault-injecting HTTP
proxy on loopback (5xx, 429, timeouts), no retry on other 4xx, and a 24-hour outage replayed at compressed time.

Also holds the proxy and the outbox-backed agent the slow fault tests (test_faults_kill.py) import."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request, Response
from sqlalchemy import select

from agent.delivery import Deliverer, backoff_s
from agent.errors import DeliveryRefused, OutboxFull
from agent.outbox import Outbox
from protocol.keys import key_id
from simulator.mosquitto import free_port
from tests.test_verifier_api import Harness, running_verifier
from tests.test_verifier_core import DAY0, payload, sign_payload
from verifier.api import serve_in_thread
from verifier.db import entries


@dataclass
class FaultPlan:
    """What the proxy does to each request: fail with 5xx or 429, or stall past the client's timeout."""

    p_5xx: float = 0.0
    p_429: float = 0.0
    p_timeout: float = 0.0
    p_lost_reply: float = 0.0  # forwarded and committed, but the answer never reaches the client
    stall_s: float = 1.0
    down: bool = False  # answer 503 to everything (an outage)
    no_batch: bool = False  # answer 404 to POST /v1/reports/batch (a verifier from before batches)
    seed: int = 5
    counts: dict[str, int] = field(default_factory=dict)

    def pick(self, rng: random.Random) -> str:
        if self.down:
            return "down"
        x = rng.random()
        for name, p in (("5xx", self.p_5xx), ("429", self.p_429), ("timeout", self.p_timeout),
                        ("lost_reply", self.p_lost_reply)):
            if x < p:
                return name
            x -= p
        return "pass"


def fault_proxy(upstream: str, plan: FaultPlan) -> FastAPI:
    """An HTTP proxy app: forwards to ``upstream`` unless the plan injects a fault for this request."""
    app = FastAPI()
    rng = random.Random(plan.seed)
    client = httpx.AsyncClient(base_url=upstream, timeout=30)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        fault = "no_batch" if plan.no_batch and path == "v1/reports/batch" else plan.pick(rng)
        plan.counts[fault] = plan.counts.get(fault, 0) + 1
        body = await request.body()
        if fault == "no_batch":
            return Response(status_code=404, content=b'{"detail":"Not Found"}', media_type="application/json")
        if fault in ("5xx", "down"):
            return Response(status_code=rng.choice((500, 502, 503, 504)), content=b"injected")
        if fault == "429":
            return Response(status_code=429, headers={"Retry-After": "0"}, content=b"injected")
        if fault == "timeout":
            await asyncio.sleep(plan.stall_s)  # the client gave up already; the request is never forwarded
            return Response(status_code=504)
        resp = await client.request(request.method, "/" + path, content=body,
                                    headers={"Content-Type": request.headers.get("content-type", "")})
        if fault == "lost_reply":
            await asyncio.sleep(plan.stall_s)
            return Response(status_code=504)
        return Response(status_code=resp.status_code, content=resp.content,
                        headers={k: v for k, v in resp.headers.items() if k.lower() in ("content-type",
                                                                                          "retry-after")})

    return app


@contextmanager
def running_proxy(upstream: str, plan: FaultPlan) -> Iterator[str]:
    with serve_in_thread(fault_proxy(upstream, plan), port=free_port()) as url:  # type: ignore[arg-type]
        yield url


class OutboxAgent:
    """An agent as the verifier sees it, with the real durable outbox: reports are signed into the outbox."""

    def __init__(self, key: Ed25519PrivateKey, agent_id: str, outbox: Outbox, *,
                 period: timedelta = timedelta(minutes=15), start: datetime = DAY0) -> None:
        self.key, self.agent_id, self.outbox, self.period = key, agent_id, outbox, period
        chain = outbox.chain()
        self.start = chain.last_period_end or start

    def produce(self) -> int:
        start = self.start

        def build(seq: int, prev: str) -> tuple[bytes, datetime]:
            end = start + self.period
            env = sign_payload(payload(agent_id=self.agent_id, kid=key_id(self.key.public_key()), seq=seq,
                                       prev_hash=prev, start=start, end=end), self.key)
            return env, end

        item = self.outbox.append(build)
        self.start = start + self.period
        return item.seq


async def drain(deliverer: Deliverer, outbox: Outbox, *, deadline_s: float, sleep_cap_s: float = 0.05) -> int:
    """Deliver until the outbox is empty, sleeping what the deliverer asks (capped: compressed time)."""
    delivered = 0
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = await deliverer.deliver_pending(outbox)
        delivered += result.delivered
        if result.remaining == 0:
            return delivered
        await asyncio.sleep(min(result.retry_after_s or 0.0, sleep_cap_s))
    raise AssertionError(f"outbox: expected it drained within {deadline_s} s, {outbox.depth()} reports left")


def ledger_seqs(v: Harness, agent_id: str) -> list[int]:
    with v.engine.connect() as conn:
        return [int(r[0]) for r in conn.execute(select(entries.c.seq).where(entries.c.agent_id == agent_id)
                                                .order_by(entries.c.entry_index))]


# ---- the outbox on a full disk ----------------------------------------------------------------------------------

@contextmanager
def tiny_filesystem(size_kib: int) -> Iterator[Path]:
    """A real small filesystem (tmpfs) so that the disk really fills; needs root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mnt = Path(tempfile.mkdtemp(prefix="tianping-full-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                          capture_output=True, timeout=10)
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)
        mnt.rmdir()


def test_full_disk_stops_collection_and_drops_nothing() -> None:
    key = Ed25519PrivateKey.generate()
    with tiny_filesystem(512) as mnt:
        outbox = Outbox(mnt / "outbox.sqlite")
        agent = OutboxAgent(key, "agt-full", outbox)
        written = []
        with pytest.raises(OutboxFull, match="the disk is full"):
            for _ in range(10_000):
                written.append(agent.produce())
        assert len(written) > 10  # it did write before the disk filled
        pending = [i.seq for i in outbox.pending(100_000)]
        assert pending == written == list(range(1, len(written) + 1))  # the oldest are all still there
        assert outbox.chain().next_seq == len(written) + 1  # the failed report did not advance the chain
        outbox.close()


def test_outbox_over_its_byte_budget_refuses_new_reports_and_keeps_old(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", max_bytes=64 * 1024)
    agent = OutboxAgent(Ed25519PrivateKey.generate(), "agt-budget", outbox)
    with pytest.raises(OutboxFull, match="expected at most 65536 bytes"):
        for _ in range(10_000):
            agent.produce()
    assert [i.seq for i in outbox.pending(100_000)] == list(range(1, outbox.chain().next_seq))


# ---- retries -------------------------------------------------------------------------------------------------------

def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    waits = [backoff_s(a, base_s=0.5, cap_s=10.0, rng=rng) for a in range(40)]
    assert all(0 <= w <= 10.0 for w in waits)
    assert max(waits[10:]) > 5.0 and len({round(w, 6) for w in waits}) == 40  # capped, and spread


async def _enrolled_outbox(v: Harness, tmp: Path, name: str) -> tuple[OutboxAgent, Outbox]:
    sim = v.enroll()
    outbox = Outbox(tmp / f"{name}.sqlite")
    return OutboxAgent(sim.key, sim.agent_id, outbox), outbox


async def test_injected_5xx_429_and_timeouts_lose_nothing_then_a_24h_outage_drains_fast(tmp_path: Path) -> None:
    with running_verifier(tmp_path, agent_rate_per_s=10_000.0, agent_burst=10_000) as v:
        plan = FaultPlan(p_5xx=0.2, p_429=0.1, p_timeout=0.05, p_lost_reply=0.05, stall_s=0.6)
        with running_proxy(v.base_url, plan) as proxy:
            agent, outbox = await _enrolled_outbox(v, tmp_path, "faulty")
            deliverer = Deliverer(proxy, timeout_s=0.3, max_backoff_s=0.05, rng=random.Random(2))
            for _ in range(40):  # as the agent runs: a report, then a delivery round (a backlog goes in batches)
                agent.produce()
                await deliverer.deliver_pending(outbox)
            await drain(deliverer, outbox, deadline_s=40)
            assert ledger_seqs(v, agent.agent_id) == list(range(1, 41))
            assert plan.counts.get("5xx", 0) > 0 and plan.counts.get("429", 0) > 0
            assert plan.counts.get("timeout", 0) > 0 and deliverer.failures.get("ReadTimeout", 0) > 0
            assert plan.counts.get("lost_reply", 0) > 0  # committed, unanswered, resent: answered by the receipt
            # a 24-hour outage at 15-minute reports: 96 reports queue up, then the verifier is back
            plan.down, plan.p_5xx, plan.p_429, plan.p_timeout, plan.p_lost_reply = True, 0.0, 0.0, 0.0, 0.0
            for _ in range(96):
                agent.produce()
                result = await deliverer.deliver_pending(outbox)
                assert result.delivered == 0 and result.retry_after_s is not None
            assert outbox.depth() == 96
            plan.down = False
            passed = plan.counts.get("pass", 0)
            t0 = time.monotonic()
            await drain(deliverer, outbox, deadline_s=30)
            drain_s = time.monotonic() - t0
            assert ledger_seqs(v, agent.agent_id) == list(range(1, 137))
            # the backlog of 96 goes in batches of up to 100 (a few more requests when a batch outlasts the client's
            # 0.3 s timeout, e.g. while the verifier starts its worker processes: resent, answered by the receipts)
            assert plan.counts["pass"] - passed < 20
            assert drain_s < 24 * 3600 / 10  # at least ten times faster than produced (in fact ~10^4 times)
            await deliverer.aclose()
            outbox.close()


async def test_a_verifier_without_the_batch_endpoint_gets_one_report_per_request(tmp_path: Path) -> None:
    with running_verifier(tmp_path) as v:
        plan = FaultPlan(no_batch=True)
        with running_proxy(v.base_url, plan) as proxy:
            agent, outbox = await _enrolled_outbox(v, tmp_path, "old-verifier")
            for _ in range(5):
                agent.produce()
            deliverer = Deliverer(proxy, timeout_s=5)
            result = await deliverer.deliver_pending(outbox)
            assert (result.delivered, result.remaining) == (5, 0)
            assert plan.counts == {"no_batch": 1, "pass": 5}  # asked once, then one per request
            assert ledger_seqs(v, agent.agent_id) == [1, 2, 3, 4, 5]
            await deliverer.aclose()
            outbox.close()


async def test_other_4xx_is_not_retried_and_the_report_stays(tmp_path: Path) -> None:
    with running_verifier(tmp_path) as v:
        agent, outbox = await _enrolled_outbox(v, tmp_path, "refused")
        agent.key = Ed25519PrivateKey.generate()  # reports signed by a key the verifier never saw: 403
        agent.produce()
        deliverer = Deliverer(v.base_url, timeout_s=5)
        with pytest.raises(DeliveryRefused, match="refused it with HTTP 403"):
            await deliverer.deliver_pending(outbox)
        assert deliverer.failures == {"http_403": 1}
        assert [(i.seq, i.attempts) for i in outbox.pending()] == [(1, 1)]
        await deliverer.aclose()
        outbox.close()
