"""Benchmark: the annual check of one year in full on SQLite — a platform with 12,000 devices (4.38 million
device-days) and a node with 365 daily totals — then the same with twice the device-days, in the same run.

One "check" = ``verifier.annual.run_annual`` for the year on a database holding no evaluation yet: for each
applicant, read its facts and the ledger size in one transaction (per-device GROUP BY over the year's
device-days), evaluate the Jiaxing 2021 rules, sign the verdict (Ed25519) and store it. The synthetic facts are
bulk-loaded straight into ``device_days`` / ``resolution_days`` (no reports, no ledger): the loading time is
reported beside, not measured. Each device is active on most days of the year (a deterministic pattern), with
one of 400 enterprises and one to three protocols.

The last line printed is one JSON object:

    {"metric": "annual_check_s", "value": <1x s>, "unit": "s", "baseline": <1x s>, "ratio": <2x / 1x>,
     "scaling_2x": <2x s / 1x s>, ...}

Usage: ``python bench/annual_check.py [--devices 12000] [--repeat 5] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import delete
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.schema import CreateIndex

from protocol.uscc import check_character
from verifier.annual import run_annual
from verifier.checkpoints import ensure_note_key
from verifier.db import device_days_by_fp, evaluations, init_db, make_engine
from verifier.enroll import add_applicant
from verifier.rules import load_policy

YEAR = 2025
NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


def uscc(n: int) -> str:
    body = f"91330400MA{n:07d}"
    return body + check_character(body)


def build(path: Path, devices: int) -> tuple[float, int]:
    """A fresh verifier database with a platform of ``devices`` devices and a node; returns (load s, device-days)."""
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    init_db(engine)
    ensure_note_key(engine)
    add_applicant(engine, applicant_id="plat", name="基准平台", kind="platform", now=NOW)
    add_applicant(engine, applicant_id="node", name="基准节点", kind="node", now=NOW)
    engine.dispose()
    started = time.perf_counter()
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    db.execute(f"DROP INDEX {device_days_by_fp.name}")  # built once after the load (a sort), not row by row
    days = [date(YEAR, 1, 1) + timedelta(days=i) for i in range(365)]
    enterprises = [uscc(i) for i in range(400)]

    def rows() -> Any:
        for d_index, day in enumerate(days):
            iso = day.isoformat()
            for i in range(devices):
                # mostly active; every 7th device idles one day in 5 (reachable only)
                rank = 2 if i % 7 == 0 and (d_index + i) % 5 == 0 else 3
                yield ("plat", iso, f"{i:064x}", enterprises[i % 400], 1 << (i % 3) | (i % 2), rank)

    db.execute("BEGIN")
    db.executemany("INSERT INTO device_days (applicant_id, day, fp, enterprise, protocols, status_rank) "
                   "VALUES (?, ?, ?, ?, ?, ?)", rows())
    db.executemany("INSERT INTO resolution_days (applicant_id, day, resolutions_ok, resolutions_failed, creates_ok, "
                   "deletes_ok) VALUES ('node', ?, ?, ?, ?, 0)",
                   [(d.isoformat(), 5_000_000 + i * 1000, i, 60_000) for i, d in enumerate(days)])
    db.execute("COMMIT")
    db.execute(str(CreateIndex(device_days_by_fp).compile(dialect=sqlite_dialect.dialect())))
    db.execute("ANALYZE")
    db.close()
    return time.perf_counter() - started, devices * 365


def check(path: Path) -> float:
    """One annual check on a database holding no evaluation yet (the stored ones are dropped first); seconds."""
    engine = make_engine(f"sqlite:///{path}")
    policy = load_policy()
    with engine.begin() as conn:
        conn.execute(delete(evaluations))
    started = time.perf_counter()
    run = run_annual(engine, policy, YEAR, now=NOW)
    elapsed = time.perf_counter() - started
    assert sorted(run.created) == ["node", "plat"], run
    engine.dispose()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=12_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="keep the databases in this directory")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tianping-annual-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    paths = {scale: workdir / f"annual-{scale}x.sqlite" for scale in (1, 2)}
    for scale, path in paths.items():
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        load_s, device_days = build(path, args.devices * scale)
        results[f"{scale}x"] = {"device_days": device_days, "load_s": round(load_s, 1), "runs": [],
                                "db_mb": round(path.stat().st_size / 1e6, 1)}
        print(f"{scale}x: {device_days:,} device-days loaded in {load_s:.1f} s", flush=True)
    for _ in range(args.repeat):  # interleaved, so that both sizes see the same load on a shared machine
        for scale, path in paths.items():
            results[f"{scale}x"]["runs"].append(check(path))
    for scale, path in paths.items():
        r = results[f"{scale}x"]
        r["best_s"] = min(r["runs"])
        r["runs_s"] = [round(t, 3) for t in r["runs"]]
        print(f"{scale}x: annual check best {r['best_s']:.3f} s of {r['runs_s']}", flush=True)
        if args.keep is None:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
    paired = sorted(b / a for a, b in zip(results["1x"]["runs"], results["2x"]["runs"], strict=True))
    one, two = results["1x"]["best_s"], results["2x"]["best_s"]
    print(json.dumps({"metric": "annual_check_s", "value": round(one, 3), "unit": "s", "baseline": round(one, 3),
                      "ratio": round(two / one, 3), "scaling_2x": round(two / one, 3),
                      "scaling_2x_paired_median": round(paired[len(paired) // 2], 3), "goal_s": 5.0,
                      "goal_scaling_2x": 2.2, "devices": args.devices, "device_days_1x": results["1x"]["device_days"],
                      "device_days_2x": results["2x"]["device_days"], "node_days": 365,
                      "runs_1x_s": results["1x"]["runs_s"], "runs_2x_s": results["2x"]["runs_s"],
                      "load_1x_s": results["1x"]["load_s"], "load_2x_s": results["2x"]["load_s"],
                      "db_mb_1x": results["1x"]["db_mb"], "db_mb_2x": results["2x"]["db_mb"],
                      "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
