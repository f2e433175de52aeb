"""Benchmark: signed reports verified, committed durably (SQLite WAL, synchronous=FULL) and acknowledged over HTTP by
the verifier (one uvicorn worker in its own process), driven from this separate load process.

Measured in the same run:

- baseline: the raw single-core Ed25519 verification rate with ``cryptography``;
- value: reports/s acknowledged at saturation on an empty ledger (many agents, each sending its chain in order);
- p99_ms: the 99th percentile acknowledgement latency at an offered 500 reports/s (open loop);
- ratio_full_vs_empty: the saturated rate with 1,000,000 entries already in the ledger (bulk-inserted synthetic
  entries, with their Merkle nodes) divided by the rate on the empty ledger.

    .venv/bin/python bench/verifier_ingest.py [--reports 4000] [--agents 100] [--prefill 1000000]

The last line is one JSON object (metric, value, unit, baseline, ratio, p99_ms, ratio_full_vs_empty, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from sqlalchemy import func, insert, select, update  # noqa: E402

from protocol import merkle  # noqa: E402
from protocol.canonical import canonical_json  # noqa: E402
from protocol.envelope import envelope_hash, sign_envelope  # noqa: E402
from protocol.keys import key_id, public_key_b64  # noqa: E402
from protocol.report import GENESIS_HASH  # noqa: E402
from simulator.mosquitto import free_port  # noqa: E402
from verifier.checkpoints import ensure_note_key  # noqa: E402
from verifier.db import agents, entries, init_db, ledger_leaves, ledger_nodes, ledger_state, make_engine  # noqa: E402
from verifier.enroll import add_applicant, add_enterprise, enroll_agent, issue_token  # noqa: E402

SERVER = """
import sys, uvicorn
from pathlib import Path
from verifier.api import VerifierSettings, create_app
app = create_app(VerifierSettings(db_url=sys.argv[1], agent_rate_per_s=1e6, agent_burst=1000000,
                                  checkpoint_every_entries=1000, checkpoint_every_s=10.0))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="error", access_log=False,
            timeout_keep_alive=300)
"""
USCC = "91330400MA0000001Y"
DAY0 = datetime(2025, 1, 1, tzinfo=UTC)


def ed25519_baseline(n: int = 20000) -> float:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    msg = os.urandom(500)
    sig = key.sign(msg)
    t = time.perf_counter()
    for _ in range(n):
        pub.verify(sig, msg)
    return n / (time.perf_counter() - t)


class Agent:
    def __init__(self, key: Ed25519PrivateKey, agent_id: str) -> None:
        self.key, self.agent_id, self.kid = key, agent_id, key_id(key.public_key())
        self.seq, self.prev, self.start = 1, GENESIS_HASH, DAY0

    def next(self) -> bytes:
        end = self.start + timedelta(minutes=15)
        body = {"v": 1, "agent_id": self.agent_id, "key_id": self.kid, "seq": self.seq, "prev_hash": self.prev,
                "period": {"start": self.start.isoformat(), "end": end.isoformat()}, "created_at": end.isoformat(),
                "devices": [{"fp": hashlib.sha256(f"{self.agent_id}-{i}".encode()).hexdigest(), "aliases": [],
                             "enterprise": USCC, "protocols": ["opcua"], "status": "active",
                             "first_seen": self.start.isoformat(), "last_seen": end.isoformat()} for i in range(2)]}
        env = sign_envelope(canonical_json(body), self.key)
        self.seq, self.prev, self.start = self.seq + 1, envelope_hash(env), end
        return env


def enroll_agents(db_url: str, n: int) -> list[Agent]:
    engine = make_engine(db_url)
    out = []
    for i in range(n):
        key = Ed25519PrivateKey.generate()
        token = issue_token(engine, applicant_id="bench", enterprise=USCC, now=datetime.now(UTC)).token
        e = enroll_agent(engine, token=token, public_key_b64=public_key_b64(key.public_key()), agent_name=f"a{i}",
                         now=datetime.now(UTC))
        out.append(Agent(key, e.agent_id))
    engine.dispose()
    return out


def prefill(db_url: str, n: int) -> float:
    """Bulk-insert ``n`` synthetic report entries (one synthetic agent) with their leaves and Merkle nodes."""
    t0 = time.perf_counter()
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        start = int(conn.execute(ledger_state.select()).first().size)  # type: ignore[union-attr]
        first_entry = int(conn.execute(select(func.coalesce(func.max(entries.c.entry_index) + 1, 0))).scalar_one())
        conn.execute(insert(agents).values(agent_id="agt-bulk", applicant_id="bench", enterprise_uscc=USCC,
                                           name="bulk", key_id="bulk" * 16, public_key=b"\x00" * 32,
                                           enrolled_at=now, next_seq=n + 1, last_hash=GENESIS_HASH))
        # the frontier of complete subtrees at the current size, to extend the tree as append_leaf would
        from verifier.ledger import TreeReader

        reader = TreeReader(conn)
        stack: list[tuple[int, bytes]] = []  # (level, hash) of the right-most complete subtrees
        pos = 0
        for level in range(start.bit_length(), -1, -1):
            if start & (1 << level):
                stack.append((level, reader._node(level, pos >> level)))
                pos += 1 << level
        chunk = 20000
        for base in range(0, n, chunk):
            e_rows, l_rows, n_rows = [], [], []
            for i in range(base, min(n, base + chunk)):
                env = b'{"synthetic":%d}' % i
                leaf = merkle.leaf_hash(env)
                idx = start + i
                e_rows.append({"entry_index": first_entry + i, "agent_id": "agt-bulk", "seq": i + 1,
                               "envelope": env, "envelope_hash": hashlib.sha256(env).hexdigest(),
                               "leaf_hash": leaf.hex(), "received_at": now, "period_start": DAY0,
                               "period_end": DAY0, "late": True})
                l_rows.append({"tree_index": idx, "kind": "report", "entry_index": first_entry + i, "body": None,
                               "leaf_hash": leaf})
                h, level, j = leaf, 0, idx
                while j & 1:
                    _, left = stack.pop()
                    h = merkle.node_hash(left, h)
                    level, j = level + 1, j >> 1
                    n_rows.append({"level": level, "idx": j, "hash": h})
                stack.append((level, h))
            conn.execute(insert(entries), e_rows)
            conn.execute(insert(ledger_leaves), l_rows)
            if n_rows:
                conn.execute(insert(ledger_nodes), n_rows)
        conn.execute(update(ledger_state).values(size=start + n))
    engine.dispose()
    return time.perf_counter() - t0


def start_server(db_url: str, port: int) -> subprocess.Popen[bytes]:
    log_path = Path(db_url.removeprefix("sqlite:///")).with_suffix(".log")
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, db_url, str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("verifier did not start")


class Connection:
    """One keep-alive HTTP/1.1 connection of the load process, on asyncio streams. The load generator must cost far
    less CPU than the server it measures (both share the machine's two cores): httpx's AsyncClient spent about 6 ms
    of CPU per request here, more than the verifier, and capped the measured rate at ~120/s."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        """POST ``body``; a dropped connection is retried with the same bytes (answered by the first receipt)."""
        for _ in range(5):
            try:
                if self._streams is None:
                    self._streams = await asyncio.open_connection("127.0.0.1", self._port)
                reader, writer = self._streams
                writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                             b"\r\n%s" % (path.encode(), content_type.encode(), len(body), body))
                status = int((await reader.readuntil(b"\r\n")).split(b" ", 2)[1])
                length = 0
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                return status, await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                await self.close()
        raise RuntimeError(f"POST {path}: five transport errors in a row")

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def post(conn: Connection, env: bytes) -> None:
    status, body = await conn.post("/v1/reports", env)
    if status not in (200, 201):
        raise RuntimeError(f"{status} {body[:200]!r}")


async def post_batch(conn: Connection, envs: list[bytes]) -> None:
    status, body = await conn.post("/v1/reports/batch", b"\n".join(envs), "application/x-ndjson")
    if status != 200:
        raise RuntimeError(f"{status} {body[:200]!r}")
    bad = [r for r in json.loads(body)["results"] if r["status"] not in (200, 201)]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(envs)} refused, first: {bad[0]}")


async def saturate(port: int, agents_: list[Agent], per_agent: int, batch: int = 1) -> tuple[float, int]:
    """Every agent sends its next report (or its next ``batch`` reports in one request, as an agent draining its
    outbox does) as soon as the previous one is acknowledged, on its own connection."""
    envs = {a.agent_id: [a.next() for _ in range(per_agent)] for a in agents_}  # signed before timing

    async def run(agent_id: str) -> int:
        conn = Connection(port)
        mine = envs[agent_id]
        for i in range(0, len(mine), batch):
            if batch == 1:
                await post(conn, mine[i])
            else:
                await post_batch(conn, mine[i:i + batch])
        await conn.close()
        return len(mine)

    t = time.perf_counter()
    done = sum(await asyncio.gather(*(run(a.agent_id) for a in agents_)))
    return done / (time.perf_counter() - t), done


async def latency_at(port: int, agents_: list[Agent], rate: float, seconds: float) -> tuple[float, float, int]:
    """Open loop: report k is due at k / rate, from agent k mod n; an agent sends its reports in order (each after
    the previous one's acknowledgement). Latency = acknowledgement time - due time (queueing included)."""
    n_total = max(1, int(rate * seconds))
    plans: dict[str, list[tuple[float, bytes]]] = {a.agent_id: [] for a in agents_}
    for k in range(n_total):
        a = agents_[k % len(agents_)]
        plans[a.agent_id].append((k / rate, a.next()))
    lat: list[float] = []
    t0 = time.perf_counter()

    async def run(plan: list[tuple[float, bytes]]) -> None:
        conn = Connection(port)
        for at, env in plan:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            await post(conn, env)
            lat.append(time.perf_counter() - (t0 + at))
        await conn.close()

    await asyncio.gather(*(run(plan) for plan in plans.values()))
    achieved = n_total / (time.perf_counter() - t0)
    lat.sort()
    return lat[int(0.99 * (len(lat) - 1))] * 1000, achieved, n_total


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(proc: subprocess.Popen[bytes], what: str, run: Any) -> tuple[float, float]:
    """Run a saturation; return its rate and the verifier's CPU microseconds per report."""
    before = cpu_s(proc.pid)
    rate, n = asyncio.run(run)
    us = (cpu_s(proc.pid) - before) / n * 1e6
    print(f"{what}: {n} reports at {rate:,.0f}/s, verifier CPU {us:.0f} µs/report", flush=True)
    return rate, us


def new_verifier(tmp: Path, name: str, agents: int) -> tuple[str, list[Agent]]:
    db_url = f"sqlite:///{tmp / name}"
    engine = make_engine(db_url)
    init_db(engine)
    ensure_note_key(engine)
    add_applicant(engine, applicant_id="bench", name="bench", kind="platform", now=datetime.now(UTC))
    add_enterprise(engine, applicant_id="bench", uscc=USCC, name="bench", now=datetime.now(UTC))
    engine.dispose()
    return db_url, enroll_agents(db_url, agents)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=int, default=20000, help="reports per batched saturation run")
    p.add_argument("--single-reports", type=int, default=4000, help="reports per one-per-request saturation run")
    p.add_argument("--batch", type=int, default=100, help="reports per request when an agent drains its outbox")
    p.add_argument("--agents", type=int, default=50)
    p.add_argument("--prefill", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3, help="alternating empty/full saturation rounds (medians)")
    p.add_argument("--p99-rate", type=float, default=500.0)
    p.add_argument("--p99-seconds", type=float, default=10.0)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tianping-bench-"))
    empty_url, empty_agents = new_verifier(tmp, "empty.sqlite", args.agents)
    full_url, full_agents = new_verifier(tmp, "full.sqlite", args.agents)
    prefill_s = prefill(full_url, args.prefill)
    print(f"prefilled {args.prefill:,} entries in {prefill_s:.1f} s", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    per_batched, per_single = args.reports // args.agents, args.single_reports // args.agents
    # The machine is shared and its speed drifts over minutes: the empty and the full ledger are measured in
    # alternating rounds, each round next to a fresh Ed25519 baseline, and the medians compared.
    baselines: list[float] = []
    rates: dict[str, list[float]] = {"empty": [], "full": []}
    cpu_us: dict[str, list[float]] = {"empty": [], "full": []}
    for r in range(args.rounds):
        baselines.append(ed25519_baseline())
        print(f"round {r + 1}: Ed25519 verify (cryptography, one core): {baselines[-1]:,.0f}/s", flush=True)
        for which, db_url, agents_ in (("empty", empty_url, empty_agents), ("full", full_url, full_agents)):
            proc = start_server(db_url, port)
            try:
                measured(proc, f"  {which} ledger warm-up (starts the verify workers)",
                         saturate(port, agents_, 2 * args.batch // args.agents + 1, args.batch))
                rate, us = measured(proc, f"  {which} ledger, {args.batch} per request",
                                    saturate(port, agents_, per_batched, args.batch))
                rates[which].append(rate)
                cpu_us[which].append(us)
            finally:
                proc.kill()
                proc.wait()
    figures: dict[str, Any] = {}
    proc = start_server(empty_url, port)
    try:
        single_rate, single_us = measured(proc, "empty ledger, one per request",
                                          saturate(port, empty_agents, per_single))
        p99, achieved, n = asyncio.run(latency_at(port, empty_agents, args.p99_rate, args.p99_seconds))
        print(f"offered {args.p99_rate:.0f}/s one per request: achieved {achieved:,.0f}/s, p99 {p99:.1f} ms over {n}",
              flush=True)
    finally:
        proc.kill()
        proc.wait()
    proc = start_server(full_url, port)
    try:
        t = time.perf_counter()
        size = httpx.get(f"{url}/v1/ledger/checkpoint", timeout=60).json()["size"]
        proof = httpx.get(f"{url}/v1/ledger/proof/inclusion", params={"index": min(12345, size - 1), "size": size},
                          timeout=60)
        proof_ms = (time.perf_counter() - t) * 1000
        assert proof.status_code == 200, proof.text
    finally:
        proc.kill()
        proc.wait()
    baselines.append(ed25519_baseline())
    baseline = max(baselines)  # the fastest the machine verified in this run: the strictest baseline
    empty_rate, full_rate = median(rates["empty"]), median(rates["full"])
    figures.update({
        "metric": "verifier_ingest_reports_per_s", "value": round(empty_rate, 1), "unit": "reports/s",
        "baseline": round(baseline, 1), "ratio": round(empty_rate / baseline, 3), "goal_ratio_min": 0.5,
        "batch": args.batch, "p99_ms": round(p99, 1), "p99_offered_per_s": args.p99_rate,
        "p99_achieved_per_s": round(achieved, 1), "goal_p99_ms_max": 250, "full_rate": round(full_rate, 1),
        "prefill_entries": args.prefill, "ratio_full_vs_empty": round(full_rate / empty_rate, 3),
        "goal_full_vs_empty_min": 0.8,
        "rounds": {"baselines": [round(b) for b in baselines], "empty": [round(x) for x in rates["empty"]],
                   "full": [round(x) for x in rates["full"]]},
        "verifier_cpu_us_per_report": {k: round(median(v)) for k, v in cpu_us.items()},
        "single_rate": round(single_rate, 1), "single_ratio": round(single_rate / baseline, 3),
        "single_cpu_us_per_report": round(single_us), "checkpoint_and_proof_ms_at_full": round(proof_ms, 1),
        "agents": args.agents, "durability": "sqlite WAL synchronous=FULL, group commit",
        "load_avg_1m": round(os.getloadavg()[0], 2),
    })
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
