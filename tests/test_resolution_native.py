"""The C scanner of HANDLE.NET access logs (connectors/resolution/_scan.c) against the references it must equal:
the reference parser line for line, protocol/sampling.py's hashes and sample choice, protocol/merkle.py's roots,
and the numpy path it replaces (same counts, sketches, samples, roots on simulated days)."""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from connectors.resolution import native
from connectors.resolution.creates import CreateLog, merkle_root_sorted
from connectors.resolution.handle_log import HandleLogCounter, count_files, parse_line
from protocol.merkle import identifiers_root
from protocol.sampling import h64
from simulator.resolution_node import SHANGHAI, ResolutionNode
from tests.test_resolution import reference

# Where the project's set-up runs (CI), the scanner must have been built: a silent fallback to numpy would pass every
# test and lose the speed. Elsewhere (a machine without a compiler) these tests are skipped and say why.
BUILT_OR_SKIP = pytest.mark.skipif(not native.AVAILABLE and os.environ.get("CI") != "true",
                                   reason=f"C scanner not built: {native.IMPORT_ERROR}")
pytestmark = BUILT_OR_SKIP


def test_the_c_scanner_is_built() -> None:
    assert native.AVAILABLE, f"the C scanner of access logs was not built: {native.IMPORT_ERROR}"

SALT = b"salt issued by the verifier"
START = datetime(2026, 11, 26, 9, 0, tzinfo=SHANGHAI)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def counted(lines: list[bytes]) -> HandleLogCounter:
    counter = HandleLogCounter()
    counter.feed(b"".join(text + b"\n" for text in lines))
    return counter


def test_c_hash_equals_the_specification() -> None:
    rng = random.Random(1)
    for n in [*range(0, 40), 63, 64, 65, 127, 128, 1000]:
        data = rng.randbytes(n)
        assert native.h64(data) == h64(data), n


def test_each_line_is_judged_as_the_reference_parser_judges_it() -> None:
    """Lines one or two bytes away from well-formed, and lines well-formed in unusual ways (escapes decoding to
    UTF-8 or not, dates before 1970 and around leap days, offsets, 6-digit codes, long elapsed times)."""
    rng = random.Random(5)
    base = [
        b'10.1.2.3 UDP:HDL(2.10) "2026-11-26 10:15:02.123+0800" 1 1 3ms  88.118.8/abc123',
        b'10.1.2.9 HTTP:HDLApi "2026-11-26 10:15:03.001+0800" 100 1 12ms adm=300:88.118.8/admin 88.118.8/new%20item',
        b'10.1.2.3 TCP:HDL(2.10) "2024-02-29 23:59:59.999-0530" 999999 0 123456789ms  88.1/%E9%98%80',
        b'::1 udp:x "1969-12-31 23:59:00.000+0000" 1 1 0ms  a/b',
        b'10.0.0.1 UDP:HDL(2.10) "2026-11-26 10:15:02.123+2359" 1 1 3ms  88.1/%ED%A0%80',  # a surrogate: not UTF-8
        b'10.0.0.1 UDP:HDL(2.10) "2026-11-26 10:15:02.123+0800" 1 1 3ms  88.1/%F4%90%80%80',  # beyond U+10FFFF
        b'10.0.0.1 UDP:HDL(2.10) "2026-11-26 10:15:02.123+0800" 100 1 3ms  88.1/%C3%A9%2F%25',
    ]
    alphabet = b' 0123456789:-."%/adms+\x00\xff\rAE\xe9'
    lines = list(base)
    for _ in range(6000):
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
        lines.append(bytes(raw).replace(b"\n", b"").replace(b"\r", b""))
    expected, created, malformed = reference(lines)
    counter = counted(lines)
    assert {(b.minute, b.op_code, b.resp_code, b.transport): b.count for b in counter.buckets()} == expected
    assert counter.created_handles() == created
    assert counter.malformed == malformed
    assert 500 < malformed < 5500  # both kinds occur


def test_lines_days_away_from_the_rest_are_counted_through_the_reference_parser() -> None:
    lines = [
        b'10.1.2.3 UDP:HDL(2.10) "2026-11-26 10:15:02.123+0800" 1 1 3ms  88.1/a',
        b'10.1.2.3 UDP:HDL(2.10) "2026-12-31 23:59:59.123+0800" 1 1 3ms  88.1/b',  # beyond the week window
        b'10.1.2.3 UDP:HDL(2.10) "1971-01-01 00:00:00.000+0000" 100 1 3ms  88.1/c',
        b'10.1.2.3 UDP:HDL(2.10) "2026-11-27 00:00:00.000+0800" 100 1 3ms  88.1/d',  # the next Shanghai day
        b'10.1.2.3 UDP:HDL(2.10) "2026-11-25 18:15:02.123-0800" 1 1 3ms  88.1/a',  # the same, in another offset
    ]
    expected, created, _ = reference(lines)
    counter = counted(lines)
    assert {(b.minute, b.op_code, b.resp_code, b.transport): b.count for b in counter.buckets()} == expected
    assert len(expected) == 4  # the first and the last line share a bucket
    assert counter.created_handles() == created == ["88.1/c", "88.1/d"]
    assert set(counter.shapes) == {"2026-11-26", "2026-11-27", "2026-12-31", "1971-01-01"}
    assert counter.shapes["2026-11-26"].top_clients.total == 2
    assert counter.shapes["2026-11-27"].top_clients.total == 1


def result_without_timing(result: dict[str, Any]) -> str:
    return json.dumps(result, sort_keys=True)


def test_native_and_numpy_paths_give_the_same_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts, new registrations and their roots, sketches (byte for byte), heavy hitters, replays and salted
    samples: the C scanner changes how fast, never what."""
    node = ResolutionNode(tmp_path, seed=41, malformed_every=211, prefixes=80, overwrite_ratio=0.05)
    node.write_day(date(2026, 11, 23), 8000)  # three days: the scanner forgets what it fed the first one's
    node.write_day(date(2026, 11, 25), 12_000)  # sketches once the log is two days on (late lines re-fed)
    node.write_lines(500, start=START, spacing_s=3.0)
    with node.path.open("ab") as fh:  # a late line of the first day, after the others
        fh.write(b'10.9.9.9 UDP:HDL(2.10) "2026-11-23 12:00:00.000+0800" 1 1 3ms  88.1/late\n')
    kwargs: dict[str, Any] = {"workers": 2, "salt": SALT, "read_chunk_bytes": 64 << 10}
    fast = count_files([node.path], **kwargs)
    monkeypatch.setattr(native, "AVAILABLE", False)
    slow = count_files([node.path], **{**kwargs, "workers": 1})
    assert result_without_timing(fast) == result_without_timing(slow)
    assert fast["lines"] == node.ground_truth().lines + 1
    assert fast["days"]["2026-11-23"]["resolutions_ok"] == node.ground_truth().as_count_dict()["days"][
        "2026-11-23"]["resolutions_ok"] + 1


def test_samples_under_a_long_salt_and_high_rates_match_the_reference(tmp_path: Path) -> None:
    """HMAC keys longer than a SHA-256 block are hashed first (RFC 2104); every sampled line is due under the
    reference choice, in file order."""
    node = ResolutionNode(tmp_path, seed=42)
    node.write_lines(6000, start=START, spacing_s=1.0)
    data = node.path.read_bytes()
    salt = bytes(range(100))
    got = HandleLogCounter(salt=salt, resolution_sample_log2=8, registration_sample_log2=6)
    got.feed(data)
    from protocol.sampling import record_hash, sampled

    due: dict[str, list[str]] = {"resolution": [], "registration": []}
    for raw in data.split(b"\n")[:-1]:
        line = parse_line(raw)
        if line.op_code not in (1, 100):
            continue
        ip = raw.split(b" ", 1)[0]
        utc_ms = (line.timestamp - EPOCH) // timedelta(milliseconds=1)
        elapsed = int.from_bytes(raw.split(b" ")[6][:-2], "little")
        rec = record_hash(ip, line.handle.encode(), utc_ms, line.op_code, line.resp_code, elapsed)
        kind = "registration" if line.op_code == 100 else "resolution"
        if sampled(salt, rec, raw, 8 if kind == "resolution" else 6):
            due[kind].append(raw.decode())
    [shape] = got.shapes.values()
    assert shape.resolution_samples == due["resolution"][:200] and due["resolution"]
    assert shape.registration_samples == due["registration"][:200] and due["registration"]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 1000])
def test_c_merkle_root_equals_the_protocol_root(n: int) -> None:
    rng = random.Random(n)
    handles = [f"88.{rng.randrange(100)}/{rng.choice(['x', '阀门', 'ü', ''])}{rng.randrange(50)}" for _ in range(n)]
    log = CreateLog()
    for h in handles:
        log.append(0, 0, h.encode())
    expected = identifiers_root(handles)
    assert log.root(np.arange(n)) == expected
    assert merkle_root_sorted(sorted({h.encode() for h in handles})) == expected


def test_first_creates_never_merges_two_handles_on_a_hash() -> None:
    """Each handle's earliest create by instant (file order among equal minutes), handles told apart byte for
    byte even when their 64-bit hashes collide (forged here)."""
    log = CreateLog()
    rows = [  # (utc minute, offset, hash, handle)
        (100, 480, 7, b"88.1/a"),
        (90, 0, 7, b"88.1/b"),  # same hash as 88.1/a, another handle
        (80, 480, 7, b"88.1/a"),  # earlier: this is 88.1/a's first create
        (80, 0, 7, b"88.1/a"),  # same minute, later in the file
        (50, 0, 9, b"88.1/c"),
    ]
    blob = b"".join(r[3] for r in rows)
    starts = np.cumsum([0] + [len(r[3]) for r in rows[:-1]])
    log.extend_rows(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                    np.array([r[2] for r in rows], dtype=np.uint64), blob, starts, [len(r[3]) for r in rows])
    first = log.first_creates()
    got = {log.handle(i): (u, o) for i, u, o in zip(first.idx.tolist(), first.utc_min.tolist(),
                                                    first.off_min.tolist(), strict=True)}
    assert got == {b"88.1/a": (80, 480), b"88.1/b": (90, 0), b"88.1/c": (50, 0)}


def test_seen_set_returns_every_new_value_and_each_once_while_it_has_room() -> None:
    rng = np.random.default_rng(3)
    seen = native.SeenSet()
    values = rng.integers(1, 5000, size=20_000, dtype=np.uint64)  # with repeats, across growing tables
    got = np.concatenate([seen.fresh(values[i : i + 1000]) for i in range(0, len(values), 1000)])
    assert sorted(got.tolist()) == sorted(set(values.tolist()))
    assert seen.fresh(np.array([0, 0], dtype=np.uint64)).tolist() == [0, 0]  # 0 is never stored
    full = native.SeenSet(max_slots=64)  # full: values it cannot hold are returned again, never dropped
    first = full.fresh(np.arange(1, 200, dtype=np.uint64))
    again = full.fresh(np.arange(1, 200, dtype=np.uint64))
    assert first.tolist() == list(range(1, 200))
    assert 0 < len(again) < 199 and set(again.tolist()) <= set(range(1, 200))


def test_a_day_that_starts_at_one_in_the_morning_is_counted_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """America/Sao_Paulo skipped 00:00-01:00 on 2018-11-04 (summer time): the scanner's day window follows the
    zone minute by minute, and the report equals the numpy path's."""
    node = ResolutionNode(tmp_path, seed=43)
    node.write_lines(3000, start=datetime(2018, 11, 4, 7, 0, tzinfo=SHANGHAI), spacing_s=20.0)
    got = count_files([node.path], tz="America/Sao_Paulo", workers=2)
    monkeypatch.setattr(native, "AVAILABLE", False)
    expected = count_files([node.path], tz="America/Sao_Paulo", workers=1)
    assert result_without_timing(got) == result_without_timing(expected)
    assert len(got["days"]) >= 2


def test_chunks_without_a_day_window_go_to_the_numpy_path_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zone whose local date would go back within a day gets no window: those chunks are counted by the numpy
    path, in their place in the file."""
    node = ResolutionNode(tmp_path, seed=45, malformed_every=301)
    node.write_lines(4000, start=START, spacing_s=5.0)
    expected = count_files([node.path], workers=1, salt=SALT, read_chunk_bytes=32 << 10)
    calls = []

    def refuse(self: HandleLogCounter, utc_min: int) -> None:
        calls.append(utc_min)

    monkeypatch.setattr(HandleLogCounter, "_make_window", refuse)
    got = count_files([node.path], workers=2, salt=SALT, read_chunk_bytes=32 << 10)
    assert 0 < len(calls) < 10  # the window was asked for, refused, and not asked for again for each chunk
    assert result_without_timing(got) == result_without_timing(expected)


def test_creates_spilled_to_disk_give_the_same_registrations_and_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past CreateLog.SPILL_AT the creates move to a temporary SQLite file: the new registrations per day and
    their Merkle roots stay exactly those counted in memory (and the simulator's)."""
    node = ResolutionNode(tmp_path, seed=44, overwrite_ratio=0.05, prefixes=30)
    node.write_day(date(2026, 11, 24), 6000)
    node.write_day(date(2026, 11, 25), 6000)
    in_memory = count_files([node.path], workers=2)
    monkeypatch.setattr(CreateLog, "SPILL_AT", 97)
    spilled = count_files([node.path], workers=2)
    assert result_without_timing(spilled) == result_without_timing(in_memory)
    assert spilled["days"] == node.ground_truth().as_count_dict()["days"]
    assert sum(d["creates_ok"] for d in spilled["days"].values()) > 97 * 3
    counter = HandleLogCounter()
    counter.feed(node.path.read_bytes())
    assert counter._creates.spilled > 0
    assert counter.created_handles() == [h for _, h in counter.created()]
    assert len(counter.created()) == len(counter._creates)
    import connectors.resolution.handle_log as handle_log

    monkeypatch.setattr(native, "AVAILABLE", False)  # the numpy fallback: forked workers send their logs back
    monkeypatch.setattr(handle_log, "MIN_RANGE_BYTES", 64 << 10)
    forked = count_files([node.path], workers=2)
    assert forked["days"] == in_memory["days"]
    assert {d: s["new_identifiers_root"] for d, s in forked["shapes"].items()} == {
        d: s["new_identifiers_root"] for d, s in in_memory["shapes"].items()
    }


def test_creates_from_the_reference_and_numpy_paths_carry_the_specified_hashes() -> None:
    when = datetime(2026, 11, 26, 10, 15, tzinfo=SHANGHAI)
    handles = ["88.1/阀门-7", "88.1/" + "a" * 300, "88.1/x", "88.1/" + "b" * 250]
    for batch in (handles[:1], handles[2:3], handles):  # short ones only (vectorised), and one too long for it
        counter = HandleLogCounter()
        counter._add_creates([(i, when, h) for i, h in enumerate(batch)])
        assert list(counter._creates._hash) == [h64(h.encode()) for h in batch]
        assert counter.created() == [(when, h) for h in batch]
