"""Identifier-resolution traffic: the HANDLE.NET line parser, the tailing connector against logs the simulated
resolution node writes (rotation, truncation, restarts, partial lines), and offline counting."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import shutil
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from connectors.base import ConfigError, ResolutionBatch, ResolutionConnector
from connectors.registry import connector_class
from connectors.resolution import (
    DEFAULTS,
    CheckpointError,
    HandleLogCounter,
    MalformedLineError,
    ResolutionLogConnector,
    count_files,
    daily_totals,
    parse_line,
)
from connectors.resolution.handle_log import LineAssembler
from simulator.resolution_node import SHANGHAI, GroundTruth, ResolutionNode

SAMPLE = Path(__file__).resolve().parent.parent / "connectors" / "resolution" / "sample.toml"
CST = timezone(timedelta(hours=8))
START = datetime(2026, 11, 26, 9, 0, tzinfo=SHANGHAI)

LINE_RESOLVE = b'10.1.2.3 UDP:HDL(2.10) "2026-11-26 10:15:02.123+0800" 1 1 3ms  88.118.8/abc123'
LINE_CREATE = (
    b'10.1.2.9 HTTP:HDLApi "2026-11-26 10:15:03.001+0800" 100 1 12ms adm=300:88.118.8/admin 88.118.8/new%20item'
)


# --- helpers -----------------------------------------------------------------------------------------------


def counted(*lines: bytes) -> HandleLogCounter:
    counter = HandleLogCounter()
    counter.feed(b"".join(line + b"\n" for line in lines))
    return counter


def connector(log_dir: Path, **extra: Any) -> ResolutionLogConnector:
    return ResolutionLogConnector.from_config({"path": str(log_dir / "access.log"), **extra})


class Tally:
    """Everything a sequence of batches said, for comparison with the node's ground truth."""

    def __init__(self) -> None:
        self.buckets: Counter[tuple[datetime, int, int, str]] = Counter()
        self.created: list[str] = []
        self.lines = 0
        self.malformed = 0
        self.batches = 0

    def add(self, batch: ResolutionBatch) -> ResolutionBatch:
        self.batches += 1
        for b in batch.buckets:
            self.buckets[(b.minute, b.op_code, b.resp_code, b.transport)] += b.count
        self.created.extend(batch.created_handles)
        self.lines += batch.lines_read
        self.malformed += batch.malformed_lines
        return batch

    def assert_matches(self, truth: GroundTruth) -> None:
        assert dict(self.buckets) == truth.buckets
        assert self.lines == truth.lines
        assert self.malformed == len(truth.malformed)
        first_seen = list(dict.fromkeys(self.created))
        assert first_seen == truth.new_registrations
        assert len(self.created) == len(truth.new_registrations) + len(truth.recreated) + len(truth.overwritten)


# --- parser ------------------------------------------------------------------------------------------------


def test_parse_resolution_line_in_two_space_form() -> None:
    line = parse_line(LINE_RESOLVE)
    assert (line.ip, line.iface, line.transport) == ("10.1.2.3", "UDP:HDL(2.10)", "UDP")
    assert line.timestamp == datetime(2026, 11, 26, 10, 15, 2, 123000, tzinfo=CST)
    assert (line.op_code, line.resp_code, line.elapsed_ms) == (1, 1, 3)
    assert line.admin is None
    assert line.handle == line.raw_handle == "88.118.8/abc123"
    assert line.minute == datetime(2026, 11, 26, 10, 15, tzinfo=CST)


def test_parse_create_line_with_adm_and_escaped_handle() -> None:
    line = parse_line(LINE_CREATE)
    assert (line.transport, line.op_code, line.resp_code) == ("HTTP", 100, 1)
    assert line.admin == "300:88.118.8/admin"
    assert line.handle == "88.118.8/new item"
    assert line.raw_handle == "88.118.8/new%20item"
    counter = counted(LINE_CREATE)
    assert counter.created() == [(datetime(2026, 11, 26, 10, 15, tzinfo=CST), "88.118.8/new item")]


def test_parse_utf8_escaped_handle_and_crlf() -> None:
    raw = b'10.1.2.3 TCP:HDL(2.10) "2026-11-26 10:15:02.123-0130" 100 1 3ms  88.118.8/%E9%98%80%E9%97%A8-7\r'
    line = parse_line(raw)
    assert line.handle == "88.118.8/阀门-7"
    assert line.timestamp.utcoffset() == -timedelta(hours=1, minutes=30)
    counter = HandleLogCounter()
    counter.feed(raw + b"\n")
    assert counter.created_handles() == ["88.118.8/阀门-7"]
    assert counter.malformed == 0


@pytest.mark.parametrize("op", [1, 100, 101, 102, 103, 104, 105])
@pytest.mark.parametrize("resp", [1, 2, 3, 100, 101, 102, 402])
def test_each_op_and_resp_code_lands_in_its_bucket(op: int, resp: int) -> None:
    adm = b"adm=300:88.1.2/admin" if op != 1 else b""
    raw = b'10.0.0.7 TCP:HDL(2.10) "2026-11-26 23:59:59.999+0800" %d %d 41ms %s 88.1.2/h' % (op, resp, adm)
    assert (parse_line(raw).op_code, parse_line(raw).resp_code) == (op, resp)
    counter = counted(raw)
    [bucket] = counter.buckets()
    assert (bucket.minute, bucket.op_code, bucket.resp_code, bucket.transport, bucket.count) == (
        datetime(2026, 11, 26, 23, 59, tzinfo=CST),
        op,
        resp,
        "TCP",
        1,
    )
    assert counter.created_handles() == (["88.1.2/h"] if (op, resp) == (100, 1) else [])


GOOD = LINE_RESOLVE.decode()
MALFORMED = [
    ("", "empty line"),
    (GOOD.replace("3ms  ", "3ms "), "expected 9 space-separated fields .* got 8"),
    (GOOD.replace("3ms  ", "3ms   "), "expected 9 space-separated fields .* got 10"),
    (GOOD.replace("UDP:HDL(2.10)", "UDPHDL"), "interface 'UDPHDL' is not TRANSPORT:protocol"),
    (GOOD.replace("2026-11-26", "2026/11/26"), 'timestamp .* is not "yyyy-MM-dd HH:mm:ss.SSS±hhmm"'),
    (GOOD.replace(".123", ""), 'timestamp .* is not "yyyy-MM-dd'),
    (GOOD.replace("2026-11-26", "2026-02-30"), "timestamp .*2026-02-30.* is not a valid date and time"),
    (GOOD.replace("2026-11-26", "2026-13-01"), "is not a valid date and time"),
    (GOOD.replace("10:15:02", "24:15:02"), "is not a valid date and time"),
    (GOOD.replace("10:15:02", "10:15:61"), "is not a valid date and time"),
    (GOOD.replace("+0800", "+2400"), "has a UTC offset beyond ±23:59"),
    (GOOD.replace("+0800", "+0875"), "has a UTC offset beyond ±23:59"),
    (GOOD.replace('" 1 1 ', '" x 1 '), "opCode 'x' is not a number"),
    (GOOD.replace('" 1 1 ', '" 01 1 '), "opCode '01' is not a number of 1-6 digits without leading zeros"),
    (GOOD.replace('" 1 1 ', '" 1 1234567 '), "respCode '1234567' is not a number"),
    (GOOD.replace("3ms", "3s"), "elapsed time '3s' is not <N>ms"),
    (GOOD.replace("3ms  ", "3ms user=x "), "field 'user=x' before the handle is neither empty nor adm="),
    (GOOD.replace("88.118.8/abc123", "abc123"), "handle 'abc123' is not <prefix>/<suffix>"),
    (GOOD.replace("88.118.8/abc123", "/abc123"), "is not <prefix>/<suffix>"),
    (GOOD.replace("abc123", "a%zz"), "has a '%' that does not start a %XX escape"),
    (GOOD.replace("abc123", "a%FF"), "is not UTF-8 after unescaping"),
    (GOOD.replace("abc123", "阀门"), "is empty or not printable ASCII"),
    (GOOD.replace("abc123", "a" * 9000), "line is 9\\d{3} bytes, longer than max_line_bytes 8192"),
]


@pytest.mark.parametrize(("text", "reason"), MALFORMED, ids=[r[:40] for _, r in MALFORMED])
def test_malformed_line_is_refused_with_its_reason_and_counted(text: str, reason: str) -> None:
    raw = text.encode()
    with pytest.raises(MalformedLineError, match=reason):
        parse_line(raw)
    counter = counted(raw, LINE_RESOLVE)  # the fast counter agrees with the reference parser
    assert (counter.lines, counter.malformed) == (2, 1)
    assert [b.count for b in counter.buckets()] == [1]
    assert len(counter.malformed_samples) == 1
    assert re.search(reason, counter.malformed_samples[0])


def test_fast_counter_equals_reference_parser_line_by_line(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=11, malformed_every=37, create_ratio=0.2, delete_ratio=0.05)
    node.write_lines(4000, start=START, spacing_s=7.3)
    data = (tmp_path / "access.log").read_bytes()
    expected, created, malformed = reference(data.split(b"\n")[:-1])
    counter = HandleLogCounter()
    counter.feed(data)
    assert {(b.minute, b.op_code, b.resp_code, b.transport): b.count for b in counter.buckets()} == expected
    assert counter.created_handles() == created
    assert counter.malformed == malformed == len(node.ground_truth().malformed)
    assert sum(counter.malformed_reasons.values()) == malformed


def test_same_instant_in_two_offsets_shares_a_bucket() -> None:
    utc = LINE_RESOLVE.replace(b"2026-11-26 10:15:02.123+0800", b"2026-11-26 02:15:40.000+0000")
    [bucket] = counted(LINE_RESOLVE, utc).buckets()
    assert bucket.count == 2
    assert bucket.minute == datetime(2026, 11, 26, 10, 15, tzinfo=CST)


def test_line_assembler_holds_partial_lines_and_bounds_long_ones() -> None:
    counter = HandleLogCounter()
    asm = LineAssembler(max_line_bytes=1024)
    asm.push(LINE_RESOLVE[:30], counter)
    assert (counter.lines, asm.consumed, asm.pending_len) == (0, 0, 30)
    asm.push(LINE_RESOLVE[30:] + b"\n" + b"x" * 5000, counter)
    assert (counter.lines, counter.malformed, asm.consumed) == (1, 0, len(LINE_RESOLVE) + 1)
    asm.push(b"y" * 5000, counter)
    assert len(asm.pending) == 1025  # bounded
    asm.push(b"\n", counter)
    assert (counter.lines, counter.malformed, asm.pending_len) == (2, 1, 0)
    assert counter.malformed_samples[0].startswith("line is 10000 bytes, longer than max_line_bytes 1024")
    stream = LINE_RESOLVE + b"\n" + b"x" * 5000 + b"y" * 5000 + b"\n"
    assert asm.anchor and stream.endswith(asm.anchor)  # exactly the bytes before the position
    assert asm.consumed == len(stream)


# --- the connector against the simulated node --------------------------------------------------------------


def test_connector_fulfils_the_contract_and_is_registered() -> None:
    assert connector_class("resolution") is ResolutionLogConnector
    assert isinstance(ResolutionLogConnector.from_config({"path": "/nonexistent/access.log"}), ResolutionConnector)


async def test_tail_counts_exactly_what_was_appended(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=2, malformed_every=250)
    tally = Tally()
    async with connector(tmp_path) as conn:
        node.write_lines(3000, start=START, spacing_s=2.0)
        first = tally.add(await conn.collect())
        node.write_lines(2000, start=START + timedelta(hours=2), spacing_s=2.0)
        tally.add(await conn.collect())
        empty = tally.add(await conn.collect())
        health = conn.health()
    assert first.lines_read == 3000 + 3000 // 250
    assert first.source == str(tmp_path / "access.log")
    assert (empty.lines_read, tuple(empty.buckets)) == (0, ())
    tally.assert_matches(node.ground_truth())
    assert health.errors == {"malformed_line": len(node.ground_truth().malformed)}
    assert health.extra["lines_total"] == node.ground_truth().lines


async def test_rename_rotation_finishes_the_old_file_then_reads_the_new(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=3)
    tally = Tally()
    async with connector(tmp_path) as conn:
        node.write_lines(1500, start=START, spacing_s=1.0)
        tally.add(await conn.collect())
        node.write_lines(700, start=START + timedelta(hours=1), spacing_s=1.0)  # not read before the rotation
        node.rotate()
        node.write_lines(900, start=START + timedelta(hours=2), spacing_s=1.0)
        tally.add(await conn.collect())
        node.write_lines(100, start=START + timedelta(hours=3), spacing_s=1.0)
        tally.add(await conn.collect())
        assert conn.health().extra["rotations"] == 1
    tally.assert_matches(node.ground_truth())


async def test_copytruncate_rotation_finishes_the_rotated_copy(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=4)
    tally = Tally()
    async with connector(tmp_path) as conn:
        node.write_lines(1500, start=START, spacing_s=1.0)
        tally.add(await conn.collect())
        node.write_lines(600, start=START + timedelta(hours=1), spacing_s=1.0, hold_back=25)
        tally.add(await conn.collect())  # reads up to a partial line
        node.rotate(copytruncate=True)  # completes the line, copies, truncates
        node.write_lines(3000, start=START + timedelta(hours=2), spacing_s=1.0)  # grows past the old size
        tally.add(await conn.collect())
        health = conn.health()
    assert health.extra["truncations"] == 1
    assert "truncated_unread" not in health.errors
    tally.assert_matches(node.ground_truth())


async def test_truncation_without_a_copy_is_counted_as_a_loss(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=5)
    tally = Tally()
    async with connector(tmp_path) as conn:
        node.write_lines(500, start=START, spacing_s=1.0)
        tally.add(await conn.collect())
        os.truncate(tmp_path / "access.log", 0)
        node.write_lines(200, start=START + timedelta(hours=1), spacing_s=1.0)
        batch = tally.add(await conn.collect())
        assert conn.health().errors == {"truncated_unread": 1}
    assert batch.lines_read == 200
    tally.assert_matches(node.ground_truth())


async def test_partial_last_line_is_counted_once_when_completed(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=6)
    tally = Tally()
    async with connector(tmp_path, max_line_bytes=1024) as conn:
        node.write_lines(800, start=START, spacing_s=1.0, hold_back=40)
        first = tally.add(await conn.collect())
        assert first.lines_read == 799
        assert first.malformed_lines == 0
        node.flush()
        second = tally.add(await conn.collect())
        assert second.lines_read == 1
    tally.assert_matches(node.ground_truth())


async def test_a_cancelled_collect_loses_nothing(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=14)
    node.write_lines(20_000, start=START, spacing_s=0.5)
    tally = Tally()
    async with connector(tmp_path) as conn:
        task = asyncio.create_task(conn.collect())
        await asyncio.sleep(0)  # the worker thread is reading
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        node.write_lines(100, start=START + timedelta(hours=3), spacing_s=0.5)
        tally.add(await conn.collect())
    tally.assert_matches(node.ground_truth())
    assert tally.batches == 1


async def test_restart_mid_file_continues_from_the_checkpoint(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=7, malformed_every=97)
    checkpoint = tmp_path / "state" / "resolution.json"
    checkpoint.parent.mkdir()
    tally = Tally()
    node.write_lines(1200, start=START, spacing_s=1.0, hold_back=33)  # stop in the middle of a line
    async with connector(tmp_path, checkpoint_path=str(checkpoint)) as first:
        tally.add(await first.collect())
    saved = json.loads(checkpoint.read_text())
    data = (tmp_path / "access.log").read_bytes()
    assert saved["offset"] == data.rfind(b"\n") + 1 < len(data)  # the partial line is read again, not skipped
    assert bytes.fromhex(saved["anchor"]) == data[: saved["offset"]][-64:]
    assert saved["ino"] == (tmp_path / "access.log").stat().st_ino
    node.flush()
    node.write_lines(900, start=START + timedelta(hours=1), spacing_s=1.0)
    async with connector(tmp_path, checkpoint_path=str(checkpoint)) as second:
        tally.add(await second.collect())
    tally.assert_matches(node.ground_truth())
    assert json.loads(checkpoint.read_text())["offset"] == (tmp_path / "access.log").stat().st_size
    assert not list(checkpoint.parent.glob("*.tmp"))


async def test_restart_after_a_rename_rotation_while_stopped(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=8)
    checkpoint = tmp_path / "resolution.json"
    tally = Tally()
    node.write_lines(1000, start=START, spacing_s=1.0)
    async with connector(tmp_path, checkpoint_path=str(checkpoint)) as first:
        tally.add(await first.collect())
    node.write_lines(400, start=START + timedelta(hours=1), spacing_s=1.0)
    node.rotate()
    node.write_lines(300, start=START + timedelta(hours=2), spacing_s=1.0)
    async with connector(tmp_path, checkpoint_path=str(checkpoint)) as second:
        tally.add(await second.collect())
        assert second.health().errors == {}
    tally.assert_matches(node.ground_truth())


async def test_restart_refuses_a_corrupt_or_foreign_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "resolution.json"
    checkpoint.write_text("{not json")
    with pytest.raises(CheckpointError, match="expected JSON"):
        connector(tmp_path, checkpoint_path=str(checkpoint))
    checkpoint.write_text(
        json.dumps({"version": 1, "path": "/other/access.log", "dev": 1, "ino": 2, "offset": 0, "anchor": ""})
    )
    with pytest.raises(CheckpointError, match=r"belongs to '/other/access\.log'"):
        connector(tmp_path, checkpoint_path=str(checkpoint))


async def test_missing_log_is_counted_then_followed_once_it_appears(tmp_path: Path) -> None:
    async with connector(tmp_path) as conn:
        batch = await conn.collect()
        assert (batch.lines_read, conn.health().errors) == (0, {"log_missing": 1})
        node = ResolutionNode(tmp_path, seed=9)
        node.write_lines(300, start=START, spacing_s=1.0)
        tally = Tally()
        tally.add(await conn.collect())
    tally.assert_matches(node.ground_truth())


# --- offline counting --------------------------------------------------------------------------------------


def test_count_files_plain_and_gzip_equal_ground_truth_per_shanghai_day(tmp_path: Path) -> None:
    node = ResolutionNode(
        tmp_path, seed=10, malformed_every=400, create_ratio=0.1, delete_ratio=0.03, overwrite_ratio=0.05
    )
    # Written in UTC across two Shanghai midnights, so the day roll-up has to convert.
    node.write_lines(6000, start=datetime(2026, 11, 25, 12, 0, tzinfo=UTC), spacing_s=35.0)
    rotated = node.rotate()
    with rotated.open("rb") as src, gzip.open(tmp_path / "access.log.1.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    rotated.unlink()
    node.write_lines(2000, start=datetime(2026, 11, 28, 0, 0, tzinfo=SHANGHAI), spacing_s=20.0)
    truth = node.ground_truth()
    result = count_files([tmp_path / "access.log.1.gz", tmp_path / "access.log"])
    samples = result.pop("malformed_samples")
    shapes = result.pop("shapes")
    assert result == truth.as_count_dict()
    assert len(result["days"]) >= 4
    assert set(shapes) == set(result["days"])
    assert sum(d["creates_ok"] for d in result["days"].values()) == len(truth.new_registrations)
    assert truth.recreated, "the simulation should re-create some deleted handles"
    assert 0 < len(samples) <= 5


def test_count_files_counts_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(LINE_RESOLVE + b"\n" + LINE_CREATE)
    result = count_files([path])
    assert result["days"] == {
        "2026-11-26": {"resolutions_ok": 1, "resolutions_failed": 0, "creates_ok": 1, "deletes_ok": 0, "lines": 2}
    }
    assert (result["lines"], result["malformed"]) == (2, 0)


def test_count_files_refuses_unknown_format_and_zone(tmp_path: Path) -> None:
    formats = r"\['handle-net', 'handle-proxy', 'combined', 'json'\]"
    with pytest.raises(ValueError, match=rf"format: expected one of {formats}, got 'xml'"):
        count_files([tmp_path / "access.log"], fmt="xml")
    with pytest.raises(ValueError, match="timezone: expected an IANA zone name"):
        count_files([tmp_path / "access.log"], tz="Mars/Olympus")


def test_daily_totals_counts_a_handle_once_on_its_first_create() -> None:
    later = LINE_CREATE.replace(b"2026-11-26 10:15", b"2026-11-27 10:15")
    counter = counted(later, LINE_CREATE)  # file order is not time order
    days = daily_totals(counter.buckets(), counter.created(), ZoneInfo("Asia/Shanghai"))
    assert days["2026-11-26"]["creates_ok"] == 1
    assert days["2026-11-27"]["creates_ok"] == 0


def test_counting_throughput_is_within_reach_of_a_plain_split(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=12)
    node.write_lines(30_000, start=START, spacing_s=0.05)
    data = (tmp_path / "access.log").read_bytes()

    def plain_split() -> None:  # BASELINES.md "bytes.split per line + dict counts", no validation at all
        counts: dict[tuple[bytes, ...], int] = {}
        for line in data.split(b"\n"):
            f = line.split(b" ")
            if len(f) > 5:
                key = (f[2], f[3][:5], f[4], f[5], f[1])
                counts[key] = counts.get(key, 0) + 1

    def best_of(fn: Any) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    ratio = best_of(plain_split) / best_of(lambda: HandleLogCounter().feed(data))
    assert ratio > 0.25, f"validated counting at {ratio:.2f}× the speed of an unvalidated split"


# --- simulator ---------------------------------------------------------------------------------------------


def test_node_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    nodes = [ResolutionNode(tmp_path / name, seed=42, malformed_every=50) for name in ("a", "b")]
    for node in nodes:
        node.write_lines(500, start=START, spacing_s=1.0)
    assert (tmp_path / "a" / "access.log").read_bytes() == (tmp_path / "b" / "access.log").read_bytes()
    assert nodes[0].ground_truth() == nodes[1].ground_truth()
    assert len(nodes[0].prefixes) == 20
    assert all(re.fullmatch(r"88\.\d{3,4}\.\d{1,4}", p) for p in nodes[0].prefixes)
    assert all(h.partition("/")[0] in nodes[0].prefixes for h in nodes[0].ground_truth().new_registrations)
    other = ResolutionNode(tmp_path / "c", seed=43)
    other.write_lines(500, start=START, spacing_s=1.0)
    assert (tmp_path / "c" / "access.log").read_bytes() != (tmp_path / "a" / "access.log").read_bytes()


async def test_node_runs_in_real_time_until_cancelled(tmp_path: Path) -> None:
    fixed = datetime(2026, 11, 26, 12, 0, tzinfo=SHANGHAI)
    node = ResolutionNode(tmp_path, seed=13, rate_per_s=400.0, clock=lambda: fixed)
    with pytest.raises(TimeoutError):  # runs until cancelled
        await asyncio.wait_for(node.run(), timeout=0.5)
    truth = node.ground_truth()
    assert truth.lines >= 40
    assert count_files([tmp_path / "access.log"])["lines"] == truth.lines
    assert list(truth.days) == ["2026-11-26"]


def test_node_refuses_naive_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ResolutionNode(tmp_path).write_lines(1, start=datetime(2026, 11, 26), spacing_s=1.0)


# --- configuration -----------------------------------------------------------------------------------------


def test_sample_toml_is_exactly_the_defaults_plus_required_keys() -> None:
    doc = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    [table] = doc["connectors"]["resolution"]
    assert {k: v for k, v in table.items() if k != "path"} == dict(DEFAULTS)
    conn = ResolutionLogConnector.from_config(table)
    assert conn.config.path == Path(table["path"])
    assert conn.config.checkpoint_path is None


BAD_CONFIGS: Sequence[tuple[dict[str, Any], str]] = [
    ({}, "missing required key 'path'"),
    ({"path": ""}, "path: expected the access log's path, got an empty string"),
    ({"path": 7}, "path: expected str, got int 7"),
    ({"path": "a.log", "pth": "x"}, r"unknown keys \['pth'\]"),
    ({"path": "a.log", "format": "xml"},
     r"format: expected one of \['handle-net', 'handle-proxy', 'combined', 'json'\], got 'xml'"),
    ({"path": "a.log", "max_line_bytes": "8k"}, "max_line_bytes: expected int, got str '8k'"),
    ({"path": "a.log", "max_line_bytes": True}, "max_line_bytes: expected int, got bool True"),
    ({"path": "a.log", "max_line_bytes": 100}, "max_line_bytes: expected an integer from 1024 to 1048576, got 100"),
    ({"path": "a.log", "read_chunk_bytes": 0}, "read_chunk_bytes: expected an integer from 4096"),
    ({"path": "a.log", "timezone": "Mars/Olympus"}, "timezone: expected an IANA zone name"),
    ({"path": "a.log", "checkpoint_path": "a.log"}, "checkpoint_path: expected a file other than the log"),
    ({"path": "a.log", "checkpoint_path": 3}, "checkpoint_path: expected str, got int 3"),
]


@pytest.mark.parametrize(("cfg", "message"), BAD_CONFIGS, ids=[m[:30] for _, m in BAD_CONFIGS])
def test_bad_configuration_is_refused_at_construction(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ResolutionLogConnector.from_config(cfg)


# --- issue 4: explicit commit, gaps, clock skew, rotation styles over a simulated day ----------------------


async def test_explicit_commit_checkpoints_only_what_the_agent_stored(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=31)
    checkpoint = tmp_path / "resolution.json"
    node.write_lines(1000, start=START, spacing_s=1.0)
    tally = Tally()
    async with connector(tmp_path, checkpoint_path=str(checkpoint)) as first:
        first.bind_agent(salt=b"s" * 32, explicit_commit=True)
        tally.add(await first.collect())
        first.commit()  # the report with these 1000 lines is in the outbox
        stored = json.loads(checkpoint.read_text())["offset"]
        node.write_lines(500, start=START + timedelta(hours=1), spacing_s=1.0)
        lost = await first.collect()  # read, but the agent dies before storing its report
        assert lost.lines_read == 500
    assert json.loads(checkpoint.read_text())["offset"] == stored  # closing does not commit either
    async with connector(tmp_path, checkpoint_path=str(checkpoint)) as second:
        second.bind_agent(salt=None)
        again = tally.add(await second.collect())
        second.commit()
    assert again.lines_read == 500  # read again, not lost
    tally.assert_matches(node.ground_truth())
    assert json.loads(checkpoint.read_text())["offset"] == node.path.stat().st_size


async def test_silence_is_reported_as_a_gap_never_as_zero_traffic(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=32)
    async with connector(tmp_path, gap_after_s=600) as conn:
        node.write_lines(600, start=START, spacing_s=1.0)  # 09:00-09:10
        first = await conn.collect()
        node.write_lines(300, start=START + timedelta(hours=2), spacing_s=1.0)  # silent from 09:10 to 11:00
        second = await conn.collect()
    assert first.gaps == ()
    [(gap_start, gap_end, reason)] = second.gaps
    assert gap_start == START + timedelta(minutes=10)
    assert gap_end == START + timedelta(hours=2)
    assert reason == "no log lines"
    assert all(not gap_start <= b.minute < gap_end for b in second.buckets)


async def test_clock_skew_and_late_flushes_keep_counts_exact_and_make_no_gap(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=33)
    tally = Tally()
    async with connector(tmp_path) as conn:
        node.write_lines(1200, start=START, spacing_s=0.5)
        tally.add(await conn.collect())
        # a server whose clock runs 7 minutes behind, flushing its 60-second buffer late, in UTC
        behind = (START - timedelta(minutes=7)).astimezone(UTC)
        node.write_lines(800, start=behind, spacing_s=0.075)
        node.write_lines(500, start=START + timedelta(minutes=11), spacing_s=0.1)
        batch = tally.add(await conn.collect())
    assert batch.gaps == ()
    tally.assert_matches(node.ground_truth())


@pytest.mark.parametrize("style", ["daily", "monthly", "copytruncate"])
def test_every_rotation_style_counts_a_simulated_day_exactly(tmp_path: Path, style: str) -> None:
    node = ResolutionNode(tmp_path, seed=34, malformed_every=997, prefixes=50, overwrite_ratio=0.05)
    node.write_day(datetime(2026, 11, 24).date(), 8000)
    rotated = node.rotate(copytruncate=style == "copytruncate")
    if style == "monthly":
        rotated = rotated.rename(tmp_path / "access.log-202611")
    with rotated.open("rb") as src, gzip.open(tmp_path / f"{rotated.name}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)  # compressed once rotated
    rotated.unlink()
    node.write_day(datetime(2026, 11, 25).date(), 6000, flush_s=30.0)
    node.write_lines(50, start=START, spacing_s=1.0, hold_back=17)  # the last line cut in the middle
    result = count_files([tmp_path / f"{rotated.name}.gz", tmp_path / "access.log"], workers=2)
    truth = node.ground_truth()
    assert truth.overwritten, "the simulation should overwrite some handles (logged as creates, not new)"
    assert result["lines"] == truth.lines  # the cut line counts as a (malformed) line of its own
    assert result["malformed"] == len(truth.malformed) + 1
    node.flush()  # the rest of the line arrives
    result = count_files([tmp_path / f"{rotated.name}.gz", tmp_path / "access.log"], workers=2)
    samples = result.pop("malformed_samples")
    shapes = result.pop("shapes")
    assert result == truth.as_count_dict()
    assert set(shapes) == set(result["days"])
    assert 0 < len(samples) <= 5


def test_count_files_over_byte_ranges_equals_one_pass(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=35, malformed_every=501)
    node.write_day(datetime(2026, 11, 24).date(), 30_000)
    one = count_files([node.path], workers=1)
    import connectors.resolution.handle_log as handle_log

    small = handle_log.MIN_RANGE_BYTES
    handle_log.MIN_RANGE_BYTES = 64 << 10  # cut this small file into many ranges
    try:
        many = count_files([node.path], workers=2)
    finally:
        handle_log.MIN_RANGE_BYTES = small
    for result in (one, many):
        result.pop("malformed_samples")
    assert many["days"] == one["days"] == node.ground_truth().as_count_dict()["days"]
    assert many["lines"] == one["lines"]
    day = "2026-11-24"
    assert many["shapes"][day]["new_identifiers_root"] == one["shapes"][day]["new_identifiers_root"]
    assert many["shapes"][day]["distinct_identifiers"] == pytest.approx(
        one["shapes"][day]["distinct_identifiers"], rel=0.03
    )  # a union of sketches estimates within the sketch's error of the single sketch


def reference(lines: list[bytes]) -> tuple[Counter[tuple[datetime, int, int, str]], list[str], int]:
    """What the reference parser makes of ``lines``: buckets, successful creates in order, malformed lines."""
    expected: Counter[tuple[datetime, int, int, str]] = Counter()
    created: list[str] = []
    malformed = 0
    for text in lines:
        try:
            line = parse_line(text)
        except MalformedLineError:
            malformed += 1
            continue
        expected[(line.minute, line.op_code, line.resp_code, line.transport)] += 1
        if (line.op_code, line.resp_code) == (100, 1):
            created.append(line.handle)
    return expected, created, malformed


def test_fast_path_agrees_with_the_reference_on_mutated_lines() -> None:
    """Lines one byte away from well-formed (in every field) are judged exactly as parse_line judges them."""
    import random

    rng = random.Random(7)
    base = [LINE_RESOLVE, LINE_CREATE, LINE_RESOLVE.replace(b"abc123", b"a%2Fb%E9%98%80")]
    alphabet = b' 0123456789:-."%/adms+\x00\xff\rA'
    lines = []
    for _ in range(3000):
        raw = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(raw))
            op = rng.random()
            if op < 0.4:
                raw[i] = rng.choice(alphabet)
            elif op < 0.7:
                del raw[i]
            else:
                raw.insert(i, rng.choice(alphabet))
        lines.append(bytes(raw).replace(b"\n", b""))
    expected, created, malformed = reference(lines)
    counter = HandleLogCounter()
    counter.feed(b"".join(text + b"\n" for text in lines))
    assert {(b.minute, b.op_code, b.resp_code, b.transport): b.count for b in counter.buckets()} == expected
    assert counter.created_handles() == created
    assert counter.malformed == malformed
    assert 300 < malformed < 2900  # both kinds occur


def test_sampling_salt_comes_from_enrollment_or_falls_back_to_the_fingerprint_key() -> None:
    import base64
    from types import SimpleNamespace

    from connectors.resolution.connector import salt_from_enrollment

    issued = SimpleNamespace(resolution_salt=base64.b64encode(b"issued salt").decode(), fingerprint_key_bytes=b"fp")
    assert salt_from_enrollment(issued) == b"issued salt"
    older = SimpleNamespace(fingerprint_key_bytes=b"fingerprint key")  # enrolled before salts were issued
    assert salt_from_enrollment(older) == b"fingerprint key"


async def test_connector_batches_carry_day_shapes_and_salted_samples(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=36)
    node.write_lines(5000, start=START, spacing_s=1.0)
    async with connector(tmp_path, resolution_sample_log2=8, registration_sample_log2=6) as conn:
        conn.bind_agent(salt=b"issued salt", explicit_commit=False)
        batch = await conn.collect()
    [(day, shape)] = batch.day_shapes.items()
    assert day == "2026-11-26"
    assert shape.sample_log2 == (8, 6)
    assert 0 < len(shape.resolution_samples) < 60 and shape.registration_samples
    assert shape.ids.get_estimate() > 100 and shape.top_clients.total == batch.lines_read
    assert [h for _, h in batch.created] == list(batch.created_handles)


def test_proxy_format_takes_an_optional_quoted_referrer(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=37, malformed_every=101)
    node.write_lines(3000, start=START, spacing_s=2.0)
    plain = node.path.read_bytes().splitlines(keepends=True)
    proxied = tmp_path / "proxy.log"
    proxied.write_bytes(b"".join(
        line[:-1] + (b' "https://portal.example/x?a=1"' if i % 3 == 0 else b' ""' if i % 3 == 1 else b"") + b"\n"
        for i, line in enumerate(plain)
    ))
    expected = count_files([node.path], workers=1)
    got = count_files([proxied], fmt="handle-proxy", workers=1)
    assert got["days"] == expected["days"] == node.ground_truth().as_count_dict()["days"]
    assert got["malformed"] == expected["malformed"]
    refused = count_files([proxied], workers=1)  # the server format does not take a referrer
    assert refused["malformed"] > 1000
