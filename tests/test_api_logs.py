"""HTTP API access logs of a resolution node (``combined`` and ``json`` formats): the mapping to HANDLE.NET records,
malformed lines, and exact counts against the simulator's ground truth through ``tianping-agent count-logs`` and
through the tailing connector."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from connectors.base import ConfigError
from connectors.resolution import HandleLogCounter, MalformedLineError, ResolutionLogConnector, count_files
from connectors.resolution.api_log import UNNAMED_PREFIX, parse_api_line
from connectors.resolution.handle_log import UnknownFormatError, check_format
from simulator.resolution_node import SHANGHAI, ApiLogWriter, GroundTruth, ResolutionNode

AGENT = str(Path(sys.executable).parent / "tianping-agent")
CST = timezone(timedelta(hours=8))
START = datetime(2026, 11, 26, 9, 0, tzinfo=SHANGHAI)
CLF = "[26/Nov/2026:10:00:00 +0800]"


def combined(request: str, status: int = 200, tail: str = ' "-" "curl/8.5.0"') -> bytes:
    return f'10.1.2.3 - - {CLF} "{request}" {status} 512{tail}'.encode()


def jline(**fields: Any) -> bytes:
    doc = {"time": "2026-11-26T10:00:00.123+08:00", "remote_addr": "10.1.2.3", "method": "GET",
           "uri": "/api/handles/88.100.1/abc", "status": 200, "request_time": 0.003}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None}, ensure_ascii=False).encode()


def records(line: bytes, fmt: str = "combined") -> list[tuple[int, int, str, str]]:
    """(opCode, respCode, transport, handle) of each record a line stands for."""
    return [(r.op_code, r.resp_code, r.transport, r.handle) for r in parse_api_line(line, fmt)]


# --- the mapping -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_resolution_is_get_api_handles_with_the_handle_percent_decoded_and_the_query_ignored(fmt: str) -> None:
    target = "/api/handles/88.100.1/%E9%98%80%E9%97%A8%20a%2Bb?type=URL&index=1"
    line = combined(f"GET {target} HTTP/1.1") if fmt == "combined" else jline(uri=target)
    [parsed] = parse_api_line(line, fmt)
    assert (parsed.op_code, parsed.resp_code, parsed.handle) == (1, 1, "88.100.1/阀门 a+b")
    assert parsed.ip == "10.1.2.3" and parsed.iface == "HTTP:HDLApi" and parsed.transport == "HTTP"


STATUS_TO_RESP = [(200, 1), (201, 1), (204, 1), (400, 102), (401, 402), (403, 402), (404, 100), (409, 101),
                  (429, 3), (503, 3), (500, 2), (502, 2), (504, 2), (418, 2)]


@pytest.mark.parametrize(("status", "resp"), STATUS_TO_RESP)
def test_http_status_maps_to_the_handle_net_response_code(status: int, resp: int) -> None:
    assert records(combined("GET /api/handles/88.100.1/x HTTP/1.1", status))[0][:2] == (1, resp)
    assert records(jline(status=status), "json")[0][:2] == (1, resp)
    assert records(jline(status=str(status)), "json")[0][:2] == (1, resp)


def test_registration_calls_map_to_creates() -> None:
    [(op, resp, _, handle)] = records(combined("POST /identityv2/data HTTP/1.1", 200))
    assert (op, resp) == (100, 1) and handle.startswith(UNNAMED_PREFIX + "/")  # a combined line names no handle
    assert records(jline(method="POST", uri="/identityv2/data", handle="88.100.1/new"), "json") == [
        (100, 1, "HTTP", "88.100.1/new")
    ]
    # batchCreate: the handles list, else the count, else one create for the call
    batch = dict(method="POST", uri="/identityv2/data/batchCreate")
    assert [r[3] for r in records(jline(**batch, handles=["88.1/a", "88.1/b", "88.1/c"]), "json")] == [
        "88.1/a", "88.1/b", "88.1/c"
    ]
    counted = records(jline(**batch, count=4), "json")
    assert [r[:2] for r in counted] == [(100, 1)] * 4 and len({r[3] for r in counted}) == 4
    assert len(records(jline(**batch), "json")) == 1
    assert len(records(combined("POST /identityv2/data/batchCreate HTTP/1.1"))) == 1
    # the stand-in is the same for the same line, so a recount gives the same answer
    assert records(jline(**batch, count=2), "json") == records(jline(**batch, count=2), "json")


def test_put_and_delete_map_as_handle_net_logs_them() -> None:
    assert records(combined("PUT /api/handles/88.100.1/x HTTP/1.1", 201)) == [(100, 1, "HTTP", "88.100.1/x")]
    assert records(combined("DELETE /api/handles/88.100.1/x HTTP/1.1", 204)) == [(101, 1, "HTTP", "88.100.1/x")]
    assert records(combined("DELETE /api/handles/88.100.1/gone HTTP/1.1", 404)) == [
        (101, 100, "HTTP", "88.100.1/gone")
    ]
    assert records(combined("DELETE /identityv2/data?handle=88.100.1%2Fy HTTP/1.1")) == [
        (101, 1, "HTTP", "88.100.1/y")
    ]
    assert records(combined("PUT /identityv2/data?handle=88.100.1%2Fy HTTP/1.1")) == [(104, 1, "HTTP", "88.100.1/y")]
    assert records(jline(method="PUT", uri="/identityv2/data", handle="88.1/z", status=403), "json") == [
        (104, 402, "HTTP", "88.1/z")
    ]


def test_transport_comes_from_iface_scheme_or_url() -> None:
    assert records(jline(scheme="https"), "json")[0][2] == "HTTPS"
    assert records(jline(iface="TCP:HDL(2.10)", scheme="https"), "json")[0][2] == "TCP"
    assert records(jline(uri="https://node.example/api/handles/88.1/a"), "json")[0][2:] == ("HTTPS", "88.1/a")
    assert records(combined("GET https://node.example/api/handles/88.1/a HTTP/1.1"))[0][2] == "HTTPS"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-26T10:00:00.123+08:00", datetime(2026, 11, 26, 10, 0, 0, 123000, tzinfo=CST)),
        ("2026-11-26T02:00:00.123456Z", datetime(2026, 11, 26, 2, 0, 0, 123000, tzinfo=UTC)),
        ("2026-11-26T10:00:00+08:00", datetime(2026, 11, 26, 10, 0, tzinfo=CST)),  # nginx $time_iso8601
        ("26/Nov/2026:10:00:00 +0800", datetime(2026, 11, 26, 10, 0, tzinfo=CST)),  # nginx $time_local
        (1795658400.25, datetime(2026, 11, 26, 10, 0, 0, 250000, tzinfo=CST)),  # epoch seconds
        ("1795658400.250", datetime(2026, 11, 26, 10, 0, 0, 250000, tzinfo=CST)),  # nginx $msec
        (1795658400250, datetime(2026, 11, 26, 10, 0, 0, 250000, tzinfo=CST)),  # epoch milliseconds
    ],
)
def test_json_time_in_iso_8601_or_epoch(value: object, expected: datetime) -> None:
    [parsed] = parse_api_line(jline(time=value), "json")
    assert parsed.timestamp == expected
    if not isinstance(value, str) or value[0] == "1":  # epoch times are written in the counter's zone
        assert parsed.timestamp.utcoffset() == timedelta(hours=8)


def test_request_time_becomes_elapsed_milliseconds() -> None:
    assert parse_api_line(jline(request_time=0.0125), "json")[0].elapsed_ms == 13
    assert parse_api_line(jline(request_time=None, duration_ms=41), "json")[0].elapsed_ms == 41
    assert parse_api_line(jline(request_time=None), "json")[0].elapsed_ms == 0
    assert parse_api_line(combined("GET /api/handles/88.1/a HTTP/1.1", tail=' "-" "x" 0.012'))[0].elapsed_ms == 12
    assert parse_api_line(combined("GET /api/handles/88.1/a HTTP/1.1", tail=""))[0].elapsed_ms == 0  # common format


def test_json_keys_can_be_named_in_the_format_and_nested() -> None:
    fmt = "json:time=started_at,client=client_ip,method=request.method,path=request.uri,status=response.status"
    line = json.dumps({"started_at": 1795658400000, "client_ip": "192.0.2.7",
                       "request": {"method": "DELETE", "uri": "/api/handles/88.1/old"}, "response": {"status": 200}})
    [parsed] = parse_api_line(line.encode(), fmt)
    assert (parsed.ip, parsed.op_code, parsed.resp_code, parsed.handle) == ("192.0.2.7", 101, 1, "88.1/old")
    assert check_format(fmt) == fmt
    request_line = jline(method=None, uri=None, request="GET /api/handles/88.1/r HTTP/2.0")
    assert records(request_line, "json") == [(1, 1, "HTTP", "88.1/r")]  # nginx $request when method/uri are absent


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("xml", r"format: expected one of \['handle-net', 'handle-proxy', 'combined', 'json'\], got 'xml'"),
        ("json:", r"format: expected json:field=key,\.\.\. with fields from \[.*got '' in 'json:'"),
        ("json:when=ts", r"format: expected json:field=key,\.\.\. with fields from \['time', .*got 'when=ts'"),
        ("json:time=", r"format: expected json:field=key.* non-empty keys, got 'time='"),
        ("json:time=a,time=b", r"format: field 'time' named twice"),
    ],
)
def test_unknown_formats_are_refused_everywhere(tmp_path: Path, fmt: str, message: str) -> None:
    with pytest.raises(UnknownFormatError, match=message):
        check_format(fmt)
    with pytest.raises(UnknownFormatError, match=message):
        count_files([tmp_path / "none.log"], fmt=fmt)
    with pytest.raises(ConfigError, match=r"connectors\.resolution\." + message):
        ResolutionLogConnector.from_config({"path": str(tmp_path / "a.log"), "format": fmt})


def test_connector_takes_the_api_formats() -> None:
    for fmt in ("combined", "json", "json:time=ts"):
        assert ResolutionLogConnector.from_config({"path": "a.log", "format": fmt}).config.format == fmt


# --- malformed lines ---------------------------------------------------------------------------------------

MALFORMED: Sequence[tuple[str, bytes, str]] = [
    ("combined", b"", "empty line"),
    ("combined", b"not an access log", "expected NCSA combined log format (ip ident user [dd/Mon/yyyy"),
    ("combined", combined("GET /healthz HTTP/1.1"), "expected GET|PUT|DELETE /api/handles/{handle}, POST "
     "/identityv2/data/batchCreate or POST|PUT|DELETE /identityv2/data, got GET '/healthz'"),
    ("combined", combined("POST /api/handles/88.1/a HTTP/1.1"),
     "expected GET, PUT or DELETE on /api/handles/{handle}, got POST '/api/handles/88.1/a'"),
    ("combined", combined("GET /api/handles/nohandle HTTP/1.1", 400), "handle: expected <prefix>/<suffix>, got "
     "'nohandle'"),
    ("combined", combined("GET /api/handles/ HTTP/1.1"), "handle: expected <prefix>/<suffix>, got ''"),
    ("combined", combined("GET /api/handles/88.1/a%zz HTTP/1.1"), "expected %XX escapes, got a '%'"),
    ("combined", combined("GET /api/handles/88.1/a%FF HTTP/1.1"), "expected UTF-8 after percent-decoding"),
    ("combined", combined("GET /api/handles/88.1/a HTTP/1.1", 302), "status: expected 2xx, 4xx or 5xx"),
    ("combined", combined("GET /api/handles/88.1/a", 200), 'request: expected "METHOD target HTTP/x.y", got'),
    ("combined", combined("GET /api/handles/88.1/a HTTP/1.1").replace(b"26/Nov", b"31/Nov"),
     "timestamp: expected a real date and time, got [31/Nov/2026:10:00:00 +0800]"),
    ("combined", combined("GET /api/handles/88.1/a HTTP/1.1").replace(b"Nov", b"Nox"),
     "timestamp: expected [dd/Mon/yyyy:HH:mm:ss ±hhmm], got [26/Nox/2026"),
    ("json", b"{not json", "expected one JSON object per line, got text that is not JSON"),
    ("json", b'["a"]', "expected one JSON object per line, got a JSON list"),
    ("json", jline(status=None), "status: expected a key from [status, status_code, response_code], got none"),
    ("json", jline(status="OK"), "status [status, status_code, response_code]: expected an HTTP status from 100 "
     "to 599, got str \"OK\""),
    ("json", jline(status=True), "expected an HTTP status from 100 to 599, got bool true"),
    ("json", jline(time="2026-11-26T10:00:00"), "time: expected a UTC offset or Z (the time zone is not guessed)"),
    ("json", jline(time="yesterday"), "time: expected ISO 8601 with a UTC offset"),
    ("json", jline(time=-5), "time [time, time_iso8601, timestamp, @timestamp, ts, msec]: expected a non-negative"),
    ("json", jline(remote_addr=None), "client: expected a key from [remote_addr, client"),
    ("json", jline(remote_addr="10.0.0.1 10.0.0.2"), "client: expected an address of printable ASCII without spaces"),
    ("json", jline(method="HEAD"), "expected GET, PUT or DELETE on /api/handles/{handle}, got HEAD"),
    ("json", jline(method=None), "method: expected a key from [method, request_method, http_method] (or the request"),
    ("json", jline(uri=7), "path: expected the request path as a string, got int 7"),
    ("json", jline(request_time="fast"), "request_time [request_time]: expected a non-negative number"),
    ("json", jline(scheme="h t"), "scheme [scheme]: expected e.g. 'http' or 'https'"),
    ("json", jline(iface="HDLApi"), "iface: expected TRANSPORT:protocol such as 'HTTP:HDLApi', got 'HDLApi'"),
    ("json", jline(method="POST", uri="/identityv2/data/batchCreate", handles="88.1/a"),
     "handles [handles]: expected a list of strings, got str"),
    ("json", jline(method="POST", uri="/identityv2/data/batchCreate", handles=["88.1/a"], count=2),
     "count: expected it to equal the number of handles (1), got 2"),
    ("json", jline(method="POST", uri="/identityv2/data/batchCreate", count=0), "count [count]: expected an integer "
     "from 1 to 10000, got int 0"),
    ("json", jline(method="POST", uri="/identityv2/data/batchCreate", handles=["bad"]),
     "handle: expected <prefix>/<suffix>, got 'bad'"),
    ("json", jline(method="POST", uri="/identityv2/data", handles=["88.1/a", "88.1/b"]),
     "POST /identityv2/data: expected one handle, got 2"),
    ("json", jline(uri="/api/handles/88.1/" + "y" * 9000), "longer than max_line_bytes 8192"),
    ("json", b"[" * 4000 + b"]" * 4000, "expected one JSON object per line, got text that is not JSON (maximum rec"),
    ("json", jline(request_time=None).replace(b"}", b', "request_time": 1e999999999}'),
     "request_time [request_time]: expected a non-negative number below 1e15, got Decimal 1E+999999999"),
    ("json", jline(request_time=None).replace(b"}", b', "request_time": NaN}'), "expected a non-negative number, "
     "got float NaN"),
    ("json", jline(time="0001-01-01T00:00:00+01:00"), "time: expected a time from 1970 to 9998, got 0001-01-01"),
    ("json", jline(time="9999-12-31T23:59:59-01:00"), "time: expected a time from 1970 to 9998, got 9999-12-31"),
    ("json", jline(uri="http://[bad/api/handles/88.1/x"), "path: expected a request target, got 'http://[bad"),
    ("json", jline(method="POST", uri="/identityv2/data", handle="88.1/x").replace(b"88.1/x", b"88.1/\\ud800"),
     "handle: expected Unicode text, got '88.1/\\ud800' (a lone surrogate)"),
    ("combined", combined("DELETE /identityv2/data?handle=88.1%2F%FF HTTP/1.1"),
     "handle: expected UTF-8 after percent-decoding, got 'handle=88.1%2F%FF'"),
]


@pytest.mark.parametrize(("fmt", "line", "message"), MALFORMED, ids=[f"{f}-{m[:40]}" for f, _, m in MALFORMED])
def test_a_line_that_does_not_fit_is_counted_as_malformed_saying_what_was_expected(
    fmt: str, line: bytes, message: str
) -> None:
    with pytest.raises(MalformedLineError) as caught:
        parse_api_line(line, fmt)
    assert message in caught.value.reason
    good = combined("GET /api/handles/88.1/ok HTTP/1.1") if fmt == "combined" else jline()
    counter = HandleLogCounter(fmt=fmt)
    counter.feed(good + b"\n" + line + b"\r\n" + good + b"\n")
    assert (counter.lines, counter.malformed) == (3, 1)
    assert counter.malformed_reasons == Counter({caught.value.reason: 1})
    [sample] = counter.malformed_samples
    assert sample.startswith(caught.value.reason + ": ") and line[:40].decode("utf-8", "replace") in sample
    assert sum(b.count for b in counter.buckets()) == 2


def test_a_batch_line_counts_as_one_line_and_as_many_records() -> None:
    counter = HandleLogCounter(fmt="json")
    batch = jline(method="POST", uri="/identityv2/data/batchCreate", handles=[f"88.1/n{i}" for i in range(7)])
    counter.feed(batch + b"\n" + jline() + b"\n")
    counter.count_line(jline(method="POST", uri="/identityv2/data/batchCreate", count=3))  # a last line, no newline
    assert (counter.lines, counter.malformed) == (3, 0)
    assert {(b.op_code, b.count) for b in counter.buckets()} == {(100, 10), (1, 1)}
    assert len(counter.created_handles()) == 10


# --- exact counts against the simulator --------------------------------------------------------------------


def simulated(tmp_path: Path, fmt: str, *, seed: int, time_style: str = "iso") -> tuple[Path, GroundTruth]:
    """Two simulated days (registration bursts, overwrites, deletes, re-creates) written again as an API log."""
    node = ResolutionNode(tmp_path / "node", seed=seed, create_ratio=0.04, delete_ratio=0.01, overwrite_ratio=0.05)
    writer = ApiLogWriter(tmp_path / "api" / "access.log", fmt=fmt, seed=seed, malformed_every=97,
                          time_style=time_style)
    node.write_day(date(2026, 11, 26), 3000)
    node.write_day(date(2026, 11, 27), 2000)
    writer.add_from(node)
    return writer.path, writer.ground_truth()


async def count_logs(*argv: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        AGENT, "count-logs", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.parametrize(("fmt", "time_style"), [("combined", "iso"), ("json", "iso"), ("json", "epoch")])
async def test_count_logs_equals_the_simulators_ground_truth(tmp_path: Path, fmt: str, time_style: str) -> None:
    path, truth = simulated(tmp_path, fmt, seed=41, time_style=time_style)
    expected = truth.as_count_dict()
    assert sum(d["creates_ok"] for d in expected["days"].values()) > (10 if fmt == "combined" else 100)
    assert 20 < expected["malformed"] < expected["lines"] // 50
    counted = await count_logs(str(path), "--format", fmt)
    assert counted["days"] == expected["days"]
    assert (counted["lines"], counted["malformed"]) == (expected["lines"], expected["malformed"])
    assert counted["malformed_samples"] and all(": " in s for s in counted["malformed_samples"])
    assert sum(s["new_identifiers"] for s in counted["shapes"].values()) == len(truth.new_registrations)
    # the wrong format counts every line as malformed, with the reason
    wrong = await count_logs(str(path), "--format", "json" if fmt == "combined" else "combined")
    assert wrong["malformed"] == wrong["lines"] == expected["lines"] and wrong["days"] == {}


async def test_count_logs_refuses_an_unknown_format_clearly(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"")
    proc = await asyncio.create_subprocess_exec(
        AGENT, "count-logs", str(tmp_path / "a.log"), "--format", "jsonl",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode != 0 and "expected one of" in err.decode() and "'jsonl'" in err.decode()


@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_connector_tailing_an_api_log_counts_exactly(tmp_path: Path, fmt: str) -> None:
    node = ResolutionNode(tmp_path / "node", seed=43, create_ratio=0.05, delete_ratio=0.01, overwrite_ratio=0.1)
    writer = ApiLogWriter(tmp_path / "api" / "access.log", fmt=fmt, seed=43, malformed_every=113)
    buckets: Counter[tuple[datetime, int, int, str]] = Counter()
    created: list[str] = []
    lines = malformed = 0
    conn = ResolutionLogConnector.from_config({"path": str(writer.path), "format": fmt})
    async with conn:
        for round_no in range(3):
            node.write_lines(1500, start=START + timedelta(hours=3 * round_no), spacing_s=2.0)
            writer.add_from(node)
            if round_no == 1:  # a line cut in the middle: counted once, when its newline arrives
                with writer.path.open("ab") as fh:
                    fh.write(combined("GET /api/handles/88.1/cut HTTP/1.1")[:30] if fmt == "combined"
                             else jline(uri="/api/handles/88.1/cut")[:30])
            batch = await conn.collect()
            if round_no == 1:
                with writer.path.open("ab") as fh:
                    whole = combined("GET /api/handles/88.1/cut HTTP/1.1") if fmt == "combined" else (
                        jline(uri="/api/handles/88.1/cut"))
                    fh.write(whole[30:] + b"\n")
            for b in batch.buckets:
                buckets[(b.minute, b.op_code, b.resp_code, b.transport)] += b.count
            created.extend(batch.created_handles)
            lines += batch.lines_read
            malformed += batch.malformed_lines
        health = conn.health()
    truth = writer.ground_truth()
    cut = datetime(2026, 11, 26, 10, 0, tzinfo=CST)
    expected = Counter(truth.buckets)
    expected[(cut, 1, 1, "HTTP")] += 1  # the cut line, completed before the third collection
    assert buckets == expected
    assert (lines, malformed) == (truth.lines + 1, len(truth.malformed))
    assert list(dict.fromkeys(created)) == truth.new_registrations
    assert health.errors == {"malformed_line": len(truth.malformed)}


def test_api_log_writer_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    texts = []
    for run in ("a", "b"):
        node = ResolutionNode(tmp_path / run / "node", seed=5)
        writer = ApiLogWriter(tmp_path / run / "api.log", fmt="json", seed=5, malformed_every=50)
        node.write_lines(500, start=START, spacing_s=1.0)
        written = writer.add_from(node)
        assert written == len(writer.path.read_bytes().splitlines()) > 400
        texts.append(writer.path.read_bytes())
    assert texts[0] == texts[1]
    with pytest.raises(ValueError, match="fmt: expected one of"):
        ApiLogWriter(tmp_path / "x.log", fmt="xml")


def test_samples_from_an_api_log_pass_the_verifiers_check_and_gzip_counts_the_same(tmp_path: Path) -> None:
    from verifier.node_evidence import sample_selected

    path, truth = simulated(tmp_path, "json", seed=47)
    salt = bytes(range(16))
    counter = HandleLogCounter(fmt="json", salt=salt, resolution_sample_log2=6, registration_sample_log2=6)
    counter.feed(path.read_bytes())
    shapes = list(counter.shapes.values())
    resolution = [s for shape in shapes for s in shape.resolution_samples]
    registration = [s for shape in shapes for s in shape.registration_samples]
    assert len(resolution) > 10 and registration  # about 1 in 64 of each
    assert all(sample_selected(salt, s, 6) for s in resolution + registration)
    assert any(s.split(" ")[1] in ("HTTP:HDLApi", "HTTPS:HDLApi") for s in resolution)
    packed = tmp_path / "access.log.1.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    counted = count_files([packed], fmt="json")
    assert counted["days"] == truth.as_count_dict()["days"] and counted["malformed"] == len(truth.malformed)
