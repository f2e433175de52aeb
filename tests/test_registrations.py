"""The registration source (connectors/resolution/registrations.py): new registrations from the node's registry,
which knows a real create from an overwrite, against a real SQLite file and a real private PostgreSQL — overwrites,
restarts mid-stream (watermark), ties, zone-less timestamps, an unreachable registry (a gap, never zero) — and the
whole path: agent report → verifier → facts (creates_ok) and /v1/applicants/{id}/resolution-days."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, text

from connectors.base import ConfigError
from connectors.resolution.connector import ResolutionBatchWithRegistrations, ResolutionLogConnector
from connectors.resolution.registrations import RegistrationCheckpointError, registry_sampled
from protocol.errors import SchemaInvalid
from protocol.report import Period, RegistrationDay, ReportV1, ResolutionSummary, parse_report
from simulator.mosquitto import free_port
from simulator.resolution_node import ResolutionNode
from tests.test_ledger import fresh_database, pg_server  # noqa: F401 (the session fixture)
from tests.test_node_days import enrolled_node_agent, report_one_day
from tests.test_verifier_api import running_verifier
from verifier.facts import derive_facts
from verifier.node_evidence import DayEvidence, anomaly_flags, registry_sample_selected

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 11, 18)
START = datetime.combine(DAY, time(0), tzinfo=SHANGHAI)
SALT = b"issued-by-the-verifier-0123456789"
SQLITE_QUERY = ("SELECT handle, created_at FROM handles WHERE julianday(created_at) >= julianday(:since_iso) "
                "ORDER BY julianday(created_at)")
PG_QUERY = "SELECT handle, created_at FROM handles WHERE created_at >= :since ORDER BY created_at"


def _connector(tmp_path: Path, log: Path, url: str, query: str = SQLITE_QUERY, **extra: Any) -> ResolutionLogConnector:
    reg = {"kind": "sql", "url": url, "query": query, "start_at": START.isoformat(),
           "checkpoint_path": str(tmp_path / "registrations.json"), **extra}
    conn = ResolutionLogConnector.from_config({"path": str(log), "checkpoint_path": str(tmp_path / "log.json"),
                                                "registrations": reg})
    conn.bind_agent(salt=SALT, explicit_commit=True)
    return conn


async def _collect(conn: ResolutionLogConnector) -> ResolutionBatchWithRegistrations:
    batch = await conn.collect()
    assert isinstance(batch, ResolutionBatchWithRegistrations) and batch.registrations is not None
    return batch


def _handles(batch: ResolutionBatchWithRegistrations) -> list[str]:
    assert batch.registrations is not None
    return [h for day in batch.registrations.days.values() for h in day.handles]


def _log_creates(batch: ResolutionBatchWithRegistrations) -> int:
    return sum(b.count for b in batch.buckets if b.op_code == 100 and b.resp_code == 1)


def _node(tmp_path: Path, *, seed: int = 7, lines: int = 20_000, overwrite_ratio: float = 0.3) -> ResolutionNode:
    node = ResolutionNode(tmp_path / "node", seed=seed, overwrite_ratio=overwrite_ratio)
    node.write_day(DAY, lines)
    node.flush()
    return node


def _middle(node: ResolutionNode) -> datetime:
    """The time of the middle registration (registrations come in bursts: the first half is before it)."""
    times = sorted(t for _, t in node.registrations())
    assert len(times) > 10, "the scenario needs registrations"
    return times[len(times) // 2]


def _insert(db: Path, rows: Sequence[tuple[str, str]]) -> None:
    with sqlite3.connect(db) as con:
        con.executemany("INSERT INTO handles (handle, created_at) VALUES (?, ?)", rows)


# --- SQLite registry ---------------------------------------------------------------------------------------------


async def test_the_registry_counts_real_creates_where_the_log_counts_overwrites_too(tmp_path: Path) -> None:
    node = _node(tmp_path)
    db = tmp_path / "registry.sqlite"
    assert node.write_registry(db) == len(node.registrations())
    truth = node.ground_truth()
    assert truth.overwritten, "the scenario needs overwrites"
    conn = _connector(tmp_path, node.path, f"sqlite:///file:{db}?mode=ro&uri=true")
    try:
        batch = await _collect(conn)
    finally:
        await conn.aclose()
    got = _handles(batch)
    assert sorted(got) == sorted(truth.new_registrations)  # exactly the registry's rows, each once
    assert batch.registrations is not None and set(batch.registrations.days) == {DAY.isoformat()}
    assert len(got) == truth.days[DAY.isoformat()].creates_ok
    # the log's creates include every overwrite (and re-creation after a delete): more than the registry's
    assert _log_creates(batch) == len(got) + len(truth.overwritten) + len(truth.recreated)
    # salted samples, due under the salt by the agent's rule and the verifier's recomputation alike
    assert batch.registrations is not None
    samples = batch.registrations.days[DAY.isoformat()].samples
    due = [h for h in got if registry_sampled(SALT, h, 10)]
    assert samples == due[:200] and samples
    assert all(registry_sample_selected(SALT, h, 10) for h in samples)
    assert [h for h in got if registry_sample_selected(SALT, h, 10)] == due  # the verifier's rule is the agent's


async def test_an_update_of_an_existing_handle_counts_once(tmp_path: Path) -> None:
    """The same handle updated (the log says create, the registry says it existed): the registry's row keeps its
    created_at; a query that returns updated rows again (by updated_at) still counts each handle once."""
    node = _node(tmp_path, lines=6000)
    db = tmp_path / "registry.sqlite"
    node.write_registry(db, until=_middle(node))
    query = ("SELECT handle, created_at FROM handles WHERE julianday(coalesce(updated_at, created_at)) >= "
             "julianday(:since_iso) ORDER BY julianday(coalesce(updated_at, created_at))")
    conn = _connector(tmp_path, node.path, f"sqlite:///{db}", query=query)
    try:
        first = _handles(await _collect(conn))
        conn.commit()
        node.write_registry(db)  # the rest of the day, and every earlier row "updated" now
        with sqlite3.connect(db) as con:
            con.execute("UPDATE handles SET updated_at = ? WHERE handle IN (SELECT handle FROM handles "
                        "ORDER BY julianday(created_at) LIMIT 5)",
                        ((START + timedelta(hours=23)).isoformat(" "),))
        second = _handles(await _collect(conn))
    finally:
        await conn.aclose()
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(h for h, _ in node.registrations())
    assert conn.registrations is not None and conn.registrations.errors.get("registry_row_late", 0) >= 5


async def test_a_restart_mid_stream_neither_misses_nor_repeats_and_ties_are_kept(tmp_path: Path) -> None:
    node = _node(tmp_path, lines=8000)
    db = tmp_path / "registry.sqlite"
    middle = _middle(node)
    assert node.write_registry(db, until=middle) > 0
    tie = middle.isoformat(" ", timespec="milliseconds")  # the next registration was created at this instant too
    _insert(db, [("88.1000.1/tie-a", tie), ("88.1000.1/tie-b", tie)])
    url = f"sqlite:///{db}"
    seen: list[str] = []
    conn = _connector(tmp_path, node.path, url)
    try:
        seen += _handles(await _collect(conn))
        conn.commit()
    finally:
        await conn.aclose()
    assert {"88.1000.1/tie-a", "88.1000.1/tie-b"} <= set(seen)
    state = json.loads((tmp_path / "registrations.json").read_text(encoding="utf-8"))
    assert sorted(state["recent"]) == ["88.1000.1/tie-a", "88.1000.1/tie-b"]  # the handles at the watermark instant
    # committed late at the watermark instant, and the rest of the day: a restarted source reads them once
    _insert(db, [("88.1000.1/tie-c", tie)])
    node.write_registry(db)
    conn = _connector(tmp_path, node.path, url)
    try:
        batch = await _collect(conn)
        delivered = _handles(batch)  # then a crash before the report was stored: no commit
    finally:
        await conn.aclose()
    assert "88.1000.1/tie-c" in delivered
    conn = _connector(tmp_path, node.path, url)
    try:
        again = _handles(await _collect(conn))
        conn.commit()
    finally:
        await conn.aclose()
    assert sorted(again) == sorted(delivered)
    seen += again
    expected = [h for h, _ in node.registrations()] + ["88.1000.1/tie-a", "88.1000.1/tie-b", "88.1000.1/tie-c"]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    conn = _connector(tmp_path, node.path, url)
    try:
        assert _handles(await _collect(conn)) == []  # nothing new: nothing counted twice
    finally:
        await conn.aclose()


async def test_the_row_limit_finishes_the_instant_it_stops_in(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite"
    log = tmp_path / "access.log"
    log.write_text("")
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE handles (handle TEXT PRIMARY KEY, created_at TEXT, updated_at TEXT)")
    stamps = [START + timedelta(minutes=i // 3) for i in range(30)]  # three at each instant
    _insert(db, [(f"88.2000.1/h{i}", t.isoformat(" ")) for i, t in enumerate(stamps)])
    conn = _connector(tmp_path, log, f"sqlite:///{db}", max_rows_per_poll=4)
    try:
        rounds = [_handles(await _collect(conn)) for _ in range(10)]
    finally:
        await conn.aclose()
    assert [len(r) for r in rounds[:5]] == [6, 6, 6, 6, 6] and not any(rounds[5:])
    assert sorted(h for r in rounds for h in r) == sorted(f"88.2000.1/h{i}" for i in range(30))


async def test_a_row_without_a_handle_is_counted_as_invalid_not_dropped_silently(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite"
    log = tmp_path / "access.log"
    log.write_text("")
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE handles (handle TEXT, created_at TEXT, updated_at TEXT)")
    at = (START + timedelta(hours=1)).isoformat(" ")
    _insert(db, [("88.2000.1/a", at), ("", at), ("88.2000.1/b", at)])
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO handles (handle, created_at) VALUES (NULL, ?)", (at,))
    conn = _connector(tmp_path, log, f"sqlite:///{db}")
    try:
        got = _handles(await _collect(conn))
        again = _handles(await _collect(conn))
    finally:
        await conn.aclose()
    assert sorted(got) == ["88.2000.1/a", "88.2000.1/b"] and again == []
    assert conn.health().errors.get("registry_row_invalid", 0) >= 2


async def test_timestamps_without_a_zone_are_refused_unless_a_zone_is_configured(tmp_path: Path) -> None:
    node = _node(tmp_path, lines=4000)
    db = tmp_path / "registry.sqlite"
    node.write_registry(db, naive=True)
    query = ("SELECT handle, created_at FROM handles WHERE julianday(created_at, '-8 hours') >= "
             "julianday(:since_iso) ORDER BY created_at")
    conn = _connector(tmp_path, node.path, f"sqlite:///{db}", query=query)
    try:
        batch = await _collect(conn)
    finally:
        await conn.aclose()
    assert batch.registrations is not None and not batch.registrations.days
    (gap,) = batch.registrations.gaps
    assert "expected a timestamp with a zone" in gap[2] and "naive_timezone" in gap[2]
    assert conn.health().errors.get("registry_refused") == 1
    conn = _connector(tmp_path, node.path, f"sqlite:///{db}", query=query, naive_timezone="Asia/Shanghai")
    try:
        batch = await _collect(conn)
    finally:
        await conn.aclose()
    assert sorted(_handles(batch)) == sorted(h for h, _ in node.registrations())


async def test_an_unreachable_registry_is_a_gap_never_zero_and_catches_up(tmp_path: Path) -> None:
    node = _node(tmp_path, lines=4000)
    db = tmp_path / "registry.sqlite"  # not there yet: read-only open fails
    conn = _connector(tmp_path, node.path, f"sqlite:///file:{db}?mode=ro&uri=true")
    try:
        first = await _collect(conn)
        assert first.registrations is not None and not first.registrations.days
        assert first.registrations.gaps and "unable to open database file" in first.registrations.gaps[0][2]
        assert conn.health().errors["registry_unreachable"] == 1
        assert first.lines_read > 0  # the log is still counted
        node.write_registry(db)
        later = await _collect(conn)
    finally:
        await conn.aclose()
    assert later.registrations is not None and not later.registrations.gaps
    assert sorted(_handles(later)) == sorted(h for h, _ in node.registrations())


async def test_postgres_on_a_closed_port_is_a_gap(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    conn = _connector(tmp_path, log, f"postgresql+psycopg://reader@127.0.0.1:{free_port()}/handles", query=PG_QUERY,
                      timeout_s=2)
    try:
        batch = await _collect(conn)
    finally:
        await conn.aclose()
    assert batch.registrations is not None and not batch.registrations.days
    (gap,) = batch.registrations.gaps
    assert gap[2].startswith("registry unreachable or refused") and gap[0] <= gap[1]


def test_the_source_is_read_only(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE handles (handle TEXT PRIMARY KEY, created_at TEXT, updated_at TEXT)")
    log = tmp_path / "access.log"
    log.write_text("")
    conn = _connector(tmp_path, log, f"sqlite:///{db}",
                      query="DELETE FROM handles WHERE julianday(created_at) >= julianday(:since_iso) RETURNING *")
    assert conn.registrations is not None
    conn.registrations.poll()
    _, gaps = conn.registrations.take()
    assert gaps and "readonly" in gaps[0][2].replace("-", "").lower()


def test_a_checkpoint_of_another_query_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    db = tmp_path / "r.sqlite"
    sqlite3.connect(db).close()
    (tmp_path / "registrations.json").write_text(json.dumps(
        {"version": 1, "query": "0" * 16, "watermark": START.isoformat(), "recent": {}}))
    with pytest.raises(RegistrationCheckpointError, match="written for another query"):
        _connector(tmp_path, log, f"sqlite:///{db}")


BAD = [
    ({"kind": "csv"}, r"registrations.kind: expected one of \['sql'\], got 'csv'"),
    ({"url": "mysql://x/y"}, "registrations.url: expected a postgresql or sqlite URL"),
    ({"url": "not a url"}, "registrations.url: expected a SQLAlchemy URL"),
    ({"query": "SELECT handle, created_at FROM handles"}, "registrations.query: expected a query that names"),
    ({"query": "SELECT 1 WHERE x > :sinceday"}, "registrations.query: expected a query that names"),
    ({"start_at": "2026-11-18T00:00:00"}, "registrations.start_at: expected a date-time with a zone"),
    ({"start_at": "yesterday"}, "registrations.start_at: expected an ISO 8601 date-time"),
    ({"naive_timezone": "Mars/Olympus"}, "registrations.naive_timezone: expected an IANA zone name"),
    ({"lookback_s": -1}, "registrations.lookback_s: expected an integer from 0"),
    ({"colour": "red"}, r"registrations: unknown keys \['colour'\]"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_registration_configuration_says_what_was_expected(change: dict[str, Any], message: str) -> None:
    reg = {"kind": "sql", "url": "sqlite:///r.db", "query": SQLITE_QUERY, "start_at": START.isoformat(), **change}
    with pytest.raises(ConfigError, match=message):
        ResolutionLogConnector.from_config({"path": "a.log", "registrations": reg})


def test_the_readme_example_parses() -> None:
    import tomllib

    readme = (Path(__file__).resolve().parents[1] / "connectors" / "resolution" / "README.md").read_text("utf-8")
    block = readme.split("## Registration source", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    table = tomllib.loads(block)["connectors"]["resolution"][0]
    conn = ResolutionLogConnector.from_config(table)
    assert conn.config.registrations is not None and conn.config.registrations.binds == ["since"]
    sample = (Path(__file__).resolve().parents[1] / "connectors" / "resolution" / "sample.toml").read_text("utf-8")
    lines = [line.strip() for line in sample.splitlines()]
    commented = "\n".join(line.removeprefix("# ") for line in lines
                          if line.startswith("# [connectors.resolution.registrations]")
                          or (line.startswith("# ") and " = " in line and "registrations" in sample))
    commented = commented.split("[connectors.resolution.registrations]", 1)[1]
    commented = "[connectors.resolution.registrations]" + commented
    reg = tomllib.loads(commented)["connectors"]["resolution"]["registrations"]
    assert ResolutionLogConnector.from_config({"path": "a.log", "registrations": reg}).config.registrations


# --- PostgreSQL registry -----------------------------------------------------------------------------------------


@pytest.fixture
def pg_registry(pg_server: str) -> Iterator[str]:  # noqa: F811
    with fresh_database(pg_server) as url:
        engine = create_engine(url)
        with engine.begin() as c:
            c.execute(text("CREATE TABLE handles (handle text PRIMARY KEY, created_at timestamptz NOT NULL, "
                           "updated_at timestamptz)"))
        engine.dispose()
        yield url


def _pg_insert(url: str, rows: Sequence[tuple[str, datetime]]) -> None:
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("INSERT INTO handles (handle, created_at) VALUES (:h, :t) ON CONFLICT (handle) DO UPDATE "
                       "SET updated_at = now()"), [{"h": h, "t": t} for h, t in rows])
    engine.dispose()


@pytest.mark.postgres
async def test_postgres_registry_overwrites_restart_ties(pg_registry: str, tmp_path: Path) -> None:
    node = _node(tmp_path, lines=8000)
    regs = node.registrations()
    tie = _middle(node)
    half = [r for r in regs if r[1] < tie]
    _pg_insert(pg_registry, half)
    _pg_insert(pg_registry, [("88.3000.1/tie-a", tie), ("88.3000.1/tie-b", tie)])
    seen: list[str] = []
    conn = _connector(tmp_path, node.path, pg_registry, query=PG_QUERY)
    try:
        batch = await _collect(conn)
        seen += _handles(batch)
        conn.commit()
    finally:
        await conn.aclose()
    # overwrites: the log's creates exceed the registry's; the registry holds each handle once
    truth = node.ground_truth()
    assert _log_creates(batch) == len(truth.new_registrations) + len(truth.overwritten) + len(truth.recreated)
    _pg_insert(pg_registry, [("88.3000.1/tie-c", tie), *regs, *half[:10]])  # late tie, the rest, 10 updates
    conn = _connector(tmp_path, node.path, pg_registry, query=PG_QUERY)
    try:
        seen += _handles(await _collect(conn))
        conn.commit()
        assert _handles(await _collect(conn)) == []
    finally:
        await conn.aclose()
    expected = [h for h, _ in regs] + ["88.3000.1/tie-a", "88.3000.1/tie-b", "88.3000.1/tie-c"]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))


@pytest.mark.postgres
async def test_postgres_session_is_read_only(pg_registry: str, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    engine = create_engine(pg_registry)
    with engine.begin() as c:
        c.execute(text("CREATE SEQUENCE polls"))
    engine.dispose()
    _pg_insert(pg_registry, [("88.3000.1/x", START + timedelta(hours=1))])
    conn = _connector(tmp_path, log, pg_registry,  # a query that would write (a data-modifying statement)
                      query="SELECT handle, created_at, nextval('polls') FROM handles WHERE created_at >= :since")
    assert conn.registrations is not None
    conn.registrations.poll()
    _, gaps = conn.registrations.take()
    assert gaps and "read-only transaction" in gaps[0][2]


# --- report, facts, evidence -------------------------------------------------------------------------------------


def _report(resolution: ResolutionSummary) -> ReportV1:
    return ReportV1(agent_id="a", key_id="0" * 64, seq=1, prev_hash="0" * 64,
                    period=Period(start=START, end=START + timedelta(days=1)),
                    created_at=START + timedelta(days=1), resolution=resolution)


def _bucket(op: int, resp: int, n: int, minute: int = 600) -> dict[str, Any]:
    return {"minute": (START + timedelta(minutes=minute)).astimezone(UTC), "op": op, "resp": resp,
            "transport": "TCP", "count": n}


def test_report_fields_are_optional_and_refused_without_a_source() -> None:
    plain = _report(ResolutionSummary.model_validate({"buckets": [_bucket(100, 1, 5)]}))
    payload = plain.to_bytes()
    assert b"registrations" not in payload  # a report without a registry is byte for byte what it was
    assert parse_report(payload) == plain
    reg = RegistrationDay(day=DAY, registrations=3, registrations_root="a" * 64)
    with_source = _report(ResolutionSummary(registrations_source="sql", registrations=(reg,)))
    assert parse_report(with_source.to_bytes()) == with_source
    doc = json.loads(with_source.to_bytes())
    doc["resolution"]["registrations_source"] = None
    with pytest.raises(SchemaInvalid, match="expected registrations_source"):
        parse_report(json.dumps(doc).encode())
    doc["resolution"]["registrations_source"] = "sql"
    doc["resolution"]["registrations"][0]["colour"] = "red"
    with pytest.raises(SchemaInvalid, match="unknown field"):
        parse_report(json.dumps(doc).encode())


def test_creates_ok_comes_from_the_registry_when_the_report_carries_it() -> None:
    buckets = [_bucket(100, 1, 50), _bucket(1, 1, 7), _bucket(100, 1, 3, minute=60 * 30)]
    plain = derive_facts(_report(ResolutionSummary.model_validate({"buckets": buckets})), "app")
    assert [(r.day, r.creates_ok) for r in plain.resolution_days] == [(DAY, 50), (DAY + timedelta(days=1), 3)]
    regs = (RegistrationDay(day=DAY - timedelta(days=1), registrations=4, registrations_root="b" * 64),
            RegistrationDay(day=DAY, registrations=20, registrations_root="a" * 64))
    sourced = derive_facts(_report(ResolutionSummary.model_validate(
        {"buckets": buckets, "registrations_source": "sql", "registrations": regs})), "app")
    assert [(r.day, r.creates_ok, r.resolutions_ok) for r in sourced.resolution_days] == [
        (DAY - timedelta(days=1), 4, 0), (DAY, 20, 7), (DAY + timedelta(days=1), 0, 0)]


def test_overwrites_flag_needs_a_wide_margin_and_no_registry_gap() -> None:
    def codes(log: int, registry: int | None, gaps: bool = False) -> set[str]:
        ev = DayEvidence(day=DAY, creates_log=log, creates_registry=registry)
        if gaps:
            ev.registration_gaps.append((START, START + timedelta(hours=1), "registry unreachable"))
        return {f.code for f in anomaly_flags(ev)}

    assert "overwrites_as_creates" in codes(300, 100)
    assert "overwrites_as_creates" not in codes(110, 100)  # within the margin
    assert "overwrites_as_creates" not in codes(15, 0)  # too few to say
    assert "overwrites_as_creates" not in codes(300, None)  # no registry: nothing to compare
    assert "overwrites_as_creates" not in codes(300, 100, gaps=True)  # the registry was partly unread


# --- the whole path ----------------------------------------------------------------------------------------------


async def test_whole_path_registry_counts_and_the_log_is_shown_beside(tmp_path: Path) -> None:
    node = _node(tmp_path, seed=31, lines=20_000, overwrite_ratio=0.5)
    db = tmp_path / "registry.sqlite"
    node.write_registry(db)
    truth = node.ground_truth()
    day_truth = truth.days[DAY.isoformat()]
    with running_verifier(tmp_path / "verifier") as v:
        v.clock.now = START + timedelta(days=2)
        config = enrolled_node_agent(
            v, tmp_path,
            f'\n[[connectors.resolution]]\npath = "{node.path}"\ncheckpoint_path = "{tmp_path / "ckpt.json"}"\n'
            + "[connectors.resolution.registrations]\nkind = \"sql\"\n"
            + f'url = "sqlite:///file:{db}?mode=ro&uri=true"\nquery = "{SQLITE_QUERY}"\n'
            + f'start_at = {START.isoformat()}\ncheckpoint_path = "{tmp_path / "reg.json"}"\n')
        item = await report_one_day(config, START)
        assert item is not None
        report = parse_report(base64.b64decode(json.loads(item.envelope)["payload"]))
        assert report.resolution is not None and report.resolution.registrations_source == "sql"
        (reg,) = report.resolution.registrations
        assert reg.registrations == day_truth.creates_ok and reg.sample_log2 == 10
        issued = base64.b64decode(json.loads(config.enrollment_path.read_text("utf-8"))["resolution_salt"])
        due = sorted(h for h, _ in node.registrations() if registry_sample_selected(issued, h, 10))
        assert sorted(reg.samples) == due  # exactly the registrations due under the issued salt (maybe none)
        from verifier.node_evidence import new_identifiers_root

        assert reg.registrations_root == new_identifiers_root(h for h, _ in node.registrations())
        assert json.loads((tmp_path / "reg.json").read_text())["watermark"]  # committed with the stored report
        days = v.client.get("/v1/applicants/node-1/resolution-days", params={"year": 2026}, headers=v.admin).json()
        from sqlalchemy import select

        from verifier.db import resolution_days

        with v.engine.connect() as c:
            facts = {r.day: r for r in c.execute(select(resolution_days))}
    log_creates = sum(n for (m, op, rc, _), n in truth.buckets.items()
                      if op == 100 and rc == 1 and m.astimezone(SHANGHAI).date() == DAY)
    assert facts[DAY].creates_ok == day_truth.creates_ok < log_creates  # counted from the registry
    assert facts[DAY].resolutions_ok == day_truth.resolutions_ok
    (day,) = [d for d in days["days"] if d["day"] == DAY.isoformat()]
    assert (day["creates_log"], day["creates_registry"]) == (log_creates, day_truth.creates_ok)
    assert day["registrations_source"] == "sql" and day["registration_gaps"] == []
    codes = Counter(f["code"] for f in day["flags"])
    assert codes["overwrites_as_creates"] == 1 and "samples_not_due" not in codes


async def test_whole_path_an_unreachable_registry_is_shown_as_a_gap(tmp_path: Path) -> None:
    node = _node(tmp_path, seed=37, lines=6000)
    db = tmp_path / "missing" / "registry.sqlite"
    with running_verifier(tmp_path / "verifier") as v:
        v.clock.now = START + timedelta(days=2)
        config = enrolled_node_agent(
            v, tmp_path,
            f'\n[[connectors.resolution]]\npath = "{node.path}"\n'
            + "[connectors.resolution.registrations]\nkind = \"sql\"\n"
            + f'url = "sqlite:///file:{db}?mode=ro&uri=true"\nquery = "{SQLITE_QUERY}"\n'
            + f"start_at = {START.isoformat()}\n")
        item = await report_one_day(config, START)
        assert item is not None
        report = parse_report(base64.b64decode(json.loads(item.envelope)["payload"]))
        assert report.resolution is not None and report.resolution.registration_gaps
        assert {c.kind: c.errors for c in report.connectors}["resolution"]["registry_unreachable"] == 1
        days = v.client.get("/v1/applicants/node-1/resolution-days", params={"year": 2026}, headers=v.admin).json()
    gap_days = [d for d in days["days"] if d["registration_gaps"]]
    assert gap_days and all(d["registrations_source"] == "sql" for d in gap_days)
    assert "unable to open database file" in gap_days[0]["registration_gaps"][0]["reason"]
    (day,) = [d for d in days["days"] if d["day"] == DAY.isoformat()]
    assert day["creates_log"] > 0 and "overwrites_as_creates" not in {f["code"] for f in day["flags"]}
