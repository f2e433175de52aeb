"""Access logs of a resolution node's HTTP APIs (``combined`` and ``json`` formats), counted as HANDLE.NET lines.

A node answers resolutions and registrations over HTTP as well: the HANDLE.NET REST API
(``GET|PUT|DELETE /api/handles/{handle}``) and the registration API of the identity platform
(``POST /identityv2/data``, ``POST /identityv2/data/batchCreate``, ``PUT|DELETE /identityv2/data``). Their web
server or gateway writes an access log in one of two formats:

``combined`` — NCSA combined log format (nginx and Apache ``combined``), optionally followed by nginx's
``$request_time`` in seconds; the common log format (no referrer and user agent) is taken too::

    10.1.2.3 - - [26/Nov/2026:10:00:00 +0800] "GET /api/handles/88.100.1/abc HTTP/1.1" 200 512 "-" "curl/8.5.0"
    10.1.2.3 - - [26/Nov/2026:10:00:01 +0800] "POST /identityv2/data HTTP/1.1" 200 88 "-" "sdk/2.1" 0.012

``json`` — one JSON object per line, as nginx ``log_format ... escape=json`` or an API gateway writes it::

    {"time": "2026-11-26T10:00:00.123+08:00", "remote_addr": "10.1.2.3", "method": "GET",
     "uri": "/api/handles/88.100.1/abc?type=URL", "status": 200, "request_time": 0.003, "scheme": "https"}

(on one line). Each field is looked up under the first key present of a list (:class:`JsonFields`, defaults below);
``json:field=key,field=key`` names the key for a field instead (a dotted key such as ``request.uri`` walks into
nested objects), e.g. ``format = "json:time=started_at,client=client_ip,path=request.uri,status=response.status"``.

============  =====================================================  ==========================================
field         default keys (first present wins)                      value
============  =====================================================  ==========================================
time          time, time_iso8601, timestamp, @timestamp, ts, msec    ISO 8601 with a UTC offset (or ``Z``);
                                                                     ``dd/Mon/yyyy:HH:mm:ss ±hhmm``; or epoch
                                                                     seconds (a number, or digits; at least
                                                                     1e11 means epoch milliseconds) — required
client        remote_addr, client, client_ip, clientip, remote_ip    the client address — required
method        method, request_method, http_method                    required (or ``request``)
path          uri, request_uri, path, url                            path and query, or an absolute URL —
                                                                     required (or ``request``)
request       request                                                ``"METHOD target HTTP/x.y"`` (nginx
                                                                     ``$request``), used when method or path
                                                                     is absent
status        status, status_code, response_code                     HTTP status, number or digits — required
request_time  request_time                                           seconds (nginx) — optional, else 0 ms
request_ms    request_time_ms, duration_ms, latency_ms               milliseconds — optional
scheme        scheme                                                 ``http``/``https`` — optional
iface         iface                                                  ``TRANSPORT:protocol`` — optional
handle        handle                                                 the identifier a call concerned — optional
handles       handles                                                identifiers a batch created — optional
count         count                                                  how many a batch created — optional
============  =====================================================  ==========================================

Every line becomes one or more HANDLE.NET access-log lines (:func:`canonical_lines`), which go through the
reference parser (:func:`~connectors.resolution.handle_log.parse_line`) and the same counter, shapes and salted
samples as the server's own log (a sample is the HANDLE.NET rendering of the record, so the verifier checks it
as it checks any other). The mapping:

- ``GET /api/handles/{handle}`` → opCode 1 (resolution); the handle is the rest of the path, percent-decoded,
  the query string ignored. ``PUT /api/handles/{handle}`` → opCode 100 (create): HANDLE.NET logs a REST ``PUT``
  as a create whether it creates or overwrites, and so does this (a handle counts as a new registration only on
  its first successful create in the files, as for the server log). ``DELETE /api/handles/{handle}`` → 101.
- ``POST /identityv2/data`` → one create (100). ``POST /identityv2/data/batchCreate`` → one create per entry of
  the line's ``handles`` list, else ``count`` creates, else — when the line says neither, as a combined line never
  does — **one create for the call**: the log does not say how many identifiers the call registered.
  ``PUT /identityv2/data`` → 104 (modify value: it changes an existing identifier's data),
  ``DELETE /identityv2/data`` → 101.
- The identifier of an ``/identityv2/data`` call is the line's ``handle`` (or ``handles``) field, or the ``handle``
  query parameter. When the line does not name it, the record carries a stand-in ``~unnamed/<24 hex digits of
  SHA-256 of the line>.<i>``: such a create counts as a new registration (byte-identical lines count once, as a
  retried create of one handle does), and its stand-in enters the day's Merkle root of new identifiers, where it
  is plainly not an identifier that can be re-resolved. Configure the ``handle``/``handles`` fields (or the
  registration source) for registrations that can be spot-checked.
- HTTP status → respCode: 2xx → 1 (success), 400 → 102 (invalid handle), 401 and 403 → 402 (authentication
  needed), 404 → 100 (not found), 409 → 101 (already exists), 429 and 503 → 3 (too busy), other 4xx and 5xx → 2
  (error). 1xx and 3xx have no respCode: malformed.
- Transport: the ``iface`` field if present, else ``<SCHEME>:HDLApi`` from the ``scheme`` field or an absolute
  URL's scheme (``HTTPS:HDLApi`` → transport ``HTTPS``), else ``HTTP:HDLApi``.
- Elapsed time: the request time rounded to whole milliseconds (0 when the line has none). Timestamps keep
  their UTC offset; epoch times are written in the counter's time zone. Sub-millisecond digits are dropped.

Anything else — another path or method (``GET /healthz``, ``HEAD``, ``POST /api/handles/...``), a line that is
not the format, a field of the wrong type, a handle that is not ``<prefix>/<suffix>`` — is a malformed line:
counted, its reason tallied, a few sampled into the error report with what was expected and what arrived.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote_to_bytes, urlsplit
from zoneinfo import ZoneInfo

from connectors.resolution.handle_log import (
    DEFAULT_MAX_LINE_BYTES,
    FORMAT_COMBINED,
    FORMAT_JSON,
    LogLine,
    MalformedLineError,
    UnknownFormatError,
    parse_line,
)

if TYPE_CHECKING:
    from connectors.resolution.handle_log import HandleLogCounter

__all__ = [
    "API_PROTOCOL",
    "UNNAMED_PREFIX",
    "ApiLogTranslator",
    "ApiRequest",
    "JsonFields",
    "canonical_lines",
    "json_fields",
    "parse_api_line",
    "parse_combined",
    "parse_json",
]

API_PROTOCOL = "HDLApi"  # the interface's protocol part: HTTP:HDLApi
UNNAMED_PREFIX = "~unnamed"
MAX_RECORDS_PER_LINE = 10_000  # a batchCreate naming more than this is refused as malformed
HANDLES_PATH = "/api/handles/"
DATA_PATH = "/identityv2/data"
BATCH_PATH = "/identityv2/data/batchCreate"
OP_RESOLVE, OP_CREATE, OP_DELETE, OP_MODIFY_VALUE = 1, 100, 101, 104
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_MS_FROM = Decimal(10) ** 11  # epoch numbers at least this large are milliseconds
_FIRST_DAY, _LAST_DAY = _EPOCH, datetime(9999, 1, 1, tzinfo=UTC)  # days outside cannot be rolled up
_NUMBER_LIMIT = Decimal(10) ** 15  # larger times and durations are refused before any arithmetic on them
_ESCAPE_SAFE = "/.-_~:!*'(),;@=+$"
_PRINTABLE = re.compile(r"[!-~]+")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_METHOD = re.compile(r"[A-Z]{1,16}")
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_CLF_TIME = re.compile(r"(\d\d)/([A-Z][a-z]{2})/(\d{4}):(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")
_QUOTED = rb'"((?:[^"\\]|\\.)*)"'
_COMBINED = re.compile(
    rb"(\S+) (\S+) (\S+) \[([^\]]*)\] " + _QUOTED + rb" (\d{3}) (\d+|-)"
    rb"(?: " + _QUOTED + rb" " + _QUOTED + rb")?(?: (\d+(?:\.\d+)?))?"
)
COMBINED_SHAPE = (
    'ip ident user [dd/Mon/yyyy:HH:mm:ss ±hhmm] "METHOD target HTTP/x.y" status bytes ["referrer" "user-agent"] '
    "[request_time]"
)


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One API access-log line, before it is mapped to HANDLE.NET records."""

    client: str
    timestamp: datetime  # timezone-aware
    method: str
    target: str  # path and query as logged (or an absolute URL)
    status: int
    elapsed_ms: int
    iface: str  # TRANSPORT:protocol
    handles: tuple[str, ...] | None = None  # named by the line (json handle/handles fields)
    count: int | None = None  # json count field


@dataclass(frozen=True, slots=True)
class JsonFields:
    """Which JSON keys hold each field: the first key present wins (module docstring for the defaults)."""

    time: tuple[str, ...] = ("time", "time_iso8601", "timestamp", "@timestamp", "ts", "msec")
    client: tuple[str, ...] = ("remote_addr", "client", "client_ip", "clientip", "remote_ip")
    method: tuple[str, ...] = ("method", "request_method", "http_method")
    path: tuple[str, ...] = ("uri", "request_uri", "path", "url")
    request: tuple[str, ...] = ("request",)
    status: tuple[str, ...] = ("status", "status_code", "response_code")
    request_time: tuple[str, ...] = ("request_time",)
    request_ms: tuple[str, ...] = ("request_time_ms", "duration_ms", "latency_ms")
    scheme: tuple[str, ...] = ("scheme",)
    iface: tuple[str, ...] = ("iface",)
    handle: tuple[str, ...] = ("handle",)
    handles: tuple[str, ...] = ("handles",)
    count: tuple[str, ...] = ("count",)


DEFAULT_JSON_FIELDS = JsonFields()
_FIELD_NAMES = tuple(f.name for f in fields(JsonFields))


def json_fields(fmt: str) -> JsonFields:
    """The fields of a ``json`` or ``json:field=key,...`` format; raises :class:`UnknownFormatError`."""
    if fmt == FORMAT_JSON:
        return DEFAULT_JSON_FIELDS
    head, colon, spec = fmt.partition(":")
    if head != FORMAT_JSON or not colon:
        raise UnknownFormatError(f"format: expected 'json' or 'json:field=key,...', got {fmt!r}")
    chosen: dict[str, tuple[str, ...]] = {}
    for part in spec.split(","):
        name, eq, key = part.partition("=")
        name, key = name.strip(), key.strip()
        if not eq or name not in _FIELD_NAMES or not key:
            raise UnknownFormatError(
                f"format: expected json:field=key,... with fields from {list(_FIELD_NAMES)} and non-empty keys, "
                f"got {part!r} in {fmt!r}"
            )
        if name in chosen:
            raise UnknownFormatError(f"format: field {name!r} named twice in {fmt!r}")
        chosen[name] = (key,)
    return replace(DEFAULT_JSON_FIELDS, **chosen)


def is_api_format(fmt: object) -> bool:
    return isinstance(fmt, str) and (fmt in (FORMAT_COMBINED, FORMAT_JSON) or fmt.startswith(FORMAT_JSON + ":"))


# --- parsing -----------------------------------------------------------------------------------------------


def parse_combined(line: bytes) -> ApiRequest:
    """One NCSA combined (or common) log line; raises :class:`MalformedLineError` saying what did not fit."""
    m = _COMBINED.fullmatch(line)
    if m is None:
        raise MalformedLineError(f"expected NCSA combined log format ({COMBINED_SHAPE})", line)
    client_b, _, _, stamp_b, request_b, status_b, _, _, _, rt_b = m.groups()
    stamp = _ascii(stamp_b, "timestamp", line)
    timestamp = _clf_time(stamp, line)
    method, target = _request_line(_ascii(request_b, "request", line), line)
    elapsed = _seconds_to_ms(Decimal(rt_b.decode("ascii")), line) if rt_b is not None else 0
    return ApiRequest(
        client=_client(client_b.decode("utf-8", "backslashreplace"), line),
        timestamp=timestamp,
        method=method,
        target=target,
        status=int(status_b),
        elapsed_ms=elapsed,
        iface=_iface(None, _url_scheme(target), line),
    )


def parse_json(line: bytes, fields: JsonFields = DEFAULT_JSON_FIELDS, *, zone: ZoneInfo | None = None) -> ApiRequest:
    """One JSON-object log line; raises :class:`MalformedLineError` saying which field did not fit."""
    try:
        doc = json.loads(line, parse_float=Decimal)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise MalformedLineError(f"expected one JSON object per line, got text that is not JSON ({exc})",
                                 line) from None
    if not isinstance(doc, dict):
        raise MalformedLineError(f"expected one JSON object per line, got a JSON {type(doc).__name__}", line)
    time_v = _need(doc, fields.time, "time", line)
    if isinstance(time_v, str) and not _is_number_text(time_v):
        timestamp = _text_time(time_v, line)
    else:
        timestamp = _epoch_time(time_v, zone or ZoneInfo("Asia/Shanghai"), fields.time, line)
    client = _need(doc, fields.client, "client", line)
    if not isinstance(client, str):
        raise MalformedLineError(f"client {_keys(fields.client)}: expected a string, got {_show(client)}", line)
    method = _get(doc, fields.method)
    target = _get(doc, fields.path)
    if method is None or target is None:
        request = _get(doc, fields.request)
        if request is None:
            missing = "method" if method is None else "path"
            raise MalformedLineError(
                f"{missing}: expected a key from {_keys(getattr(fields, missing))} (or the request line in "
                f"{_keys(fields.request)}), got none of them",
                line,
            )
        if not isinstance(request, str):
            raise MalformedLineError(f"request: expected \"METHOD target HTTP/x.y\", got {_show(request)}", line)
        req_method, req_target = _request_line(request, line)
        method = req_method if method is None else method
        target = req_target if target is None else target
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        raise MalformedLineError(f"method: expected an HTTP method such as 'GET', got {_show(method)}", line)
    if not isinstance(target, str) or not target:
        raise MalformedLineError(f"path: expected the request path as a string, got {_show(target)}", line)
    status = _status(_need(doc, fields.status, "status", line), fields.status, line)
    elapsed = 0
    rt = _get(doc, fields.request_time)
    rt_ms = _get(doc, fields.request_ms)
    if rt is not None:
        elapsed = _seconds_to_ms(_number(rt, "request_time", fields.request_time, line), line)
    elif rt_ms is not None:
        elapsed = _seconds_to_ms(_number(rt_ms, "request_ms", fields.request_ms, line) / 1000, line)
    scheme = _get(doc, fields.scheme)
    if scheme is not None and (not isinstance(scheme, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", scheme)):
        raise MalformedLineError(f"scheme {_keys(fields.scheme)}: expected e.g. 'http' or 'https', got {_show(scheme)}",
                                 line)
    iface = _get(doc, fields.iface)
    if iface is not None and not isinstance(iface, str):
        raise MalformedLineError(f"iface {_keys(fields.iface)}: expected TRANSPORT:protocol, got {_show(iface)}", line)
    return ApiRequest(
        client=_client(client, line),
        timestamp=timestamp,
        method=method,
        target=target,
        status=status,
        elapsed_ms=elapsed,
        iface=_iface(iface, scheme or _url_scheme(target), line),
        handles=_named_handles(doc, fields, line),
        count=_count(doc, fields, line),
    )


def canonical_lines(req: ApiRequest, line: bytes) -> list[bytes]:
    """The HANDLE.NET access-log lines that stand for one API request (module docstring for the mapping)."""
    if req.target.startswith("/"):
        path, _, query = req.target.partition("#")[0].partition("?")
    else:
        try:
            split = urlsplit(req.target)
        except ValueError as exc:
            raise MalformedLineError(f"path: expected a request target, got {_cut(req.target)} ({exc})",
                                     line) from None
        path, query = split.path, split.query
    if not _FIRST_DAY <= req.timestamp < _LAST_DAY:
        raise MalformedLineError(f"time: expected a time from 1970 to 9998, got {req.timestamp.isoformat()}", line)
    resp = _resp_code(req.status, line)
    records: list[tuple[int, str]]
    if path.startswith(HANDLES_PATH):
        op = {"GET": OP_RESOLVE, "PUT": OP_CREATE, "DELETE": OP_DELETE}.get(req.method)
        if op is None:
            raise MalformedLineError(
                f"expected GET, PUT or DELETE on {HANDLES_PATH}{{handle}}, got {req.method} {_cut(req.target)}", line
            )
        records = [(op, _path_handle(path[len(HANDLES_PATH):], line))]
    elif path == BATCH_PATH and req.method == "POST":
        records = [(OP_CREATE, h) for h in _batch_handles(req, line)]
    elif path == DATA_PATH and req.method in ("POST", "PUT", "DELETE"):
        op = {"POST": OP_CREATE, "PUT": OP_MODIFY_VALUE, "DELETE": OP_DELETE}[req.method]
        named = req.handles
        if named is None:
            try:
                from_query = parse_qs(query, errors="strict").get("handle")
            except UnicodeDecodeError:
                raise MalformedLineError(f"handle: expected UTF-8 after percent-decoding, got {query[:80]!r}",
                                         line) from None
            named = tuple(from_query[:1]) if from_query else None
        if named is not None and len(named) != 1:
            raise MalformedLineError(
                f"{req.method} {DATA_PATH}: expected one handle, got {len(named)} in the line's handles", line
            )
        records = [(op, _check_handle(named[0], line) if named else _unnamed(line, 0))]
    else:
        raise MalformedLineError(
            f"expected GET|PUT|DELETE {HANDLES_PATH}{{handle}}, POST {BATCH_PATH} or POST|PUT|DELETE {DATA_PATH}, "
            f"got {req.method} {_cut(req.target)}",
            line,
        )
    head = f'{req.client} {req.iface} "{_stamp(req.timestamp)}"'.encode()
    return [
        head + f" {op} {resp} {req.elapsed_ms}ms  {quote(handle, safe=_ESCAPE_SAFE)}".encode()
        for op, handle in records
    ]


def parse_api_line(
    line: bytes,
    fmt: str = FORMAT_COMBINED,
    *,
    zone: ZoneInfo | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[LogLine]:
    """The records one API log line stands for, exactly as the counter sees them; raises
    :class:`MalformedLineError` saying what was expected and what arrived."""
    return [parse_line(c, max_line_bytes=max_line_bytes) for c in ApiLogTranslator(fmt, zone=zone).canonical(line)]


class ApiLogTranslator:
    """Rewrites chunks of API log lines as HANDLE.NET lines for :class:`HandleLogCounter` (which owns one per API
    format), counting the lines that do not fit as malformed on the counter."""

    def __init__(self, fmt: str, *, zone: ZoneInfo | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if fmt == FORMAT_COMBINED:
            self.fields: JsonFields | None = None
        else:
            self.fields = json_fields(fmt)
        self.fmt = fmt
        self.zone = zone or ZoneInfo("Asia/Shanghai")
        self.max_line_bytes = max_line_bytes

    def canonical(self, line: bytes) -> list[bytes]:
        """HANDLE.NET lines for one API line (without its newline), each checked by the reference parser."""
        line = line.removesuffix(b"\r")
        if not line.strip():
            raise MalformedLineError("empty line", line)
        if len(line) > self.max_line_bytes:
            raise MalformedLineError(
                f"line is {len(line)} bytes, longer than max_line_bytes {self.max_line_bytes}", line)
        req = parse_combined(line) if self.fields is None else parse_json(line, self.fields, zone=self.zone)
        out = canonical_lines(req, line)
        for c in out:
            try:
                parse_line(c, max_line_bytes=self.max_line_bytes)
            except MalformedLineError as exc:
                raise MalformedLineError(f"as a HANDLE.NET record: {exc.reason}", line) from None
        return out

    def translate(self, data: bytes, counter: HandleLogCounter) -> bytes:
        """``data``: complete lines (``\\n``-terminated). Returns the HANDLE.NET lines for the well-formed ones;
        malformed ones are counted on ``counter``. ``counter.lines`` is corrected so that, once the counter has
        counted the returned lines, it counts each API line once however many records it stood for."""
        out: list[bytes] = []
        for line in data.split(b"\n")[:-1]:
            try:
                records = self.canonical(line)
            except MalformedLineError as exc:
                counter.count_malformed(exc.reason, exc.line)
                continue
            out.extend(records)
            counter.lines -= len(records) - 1
        return b"".join(r + b"\n" for r in out)


# --- helpers -----------------------------------------------------------------------------------------------


def _get(doc: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in doc:
            return doc[key]
        if "." in key:
            node: Any = doc
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return node
    return None


def _need(doc: Mapping[str, Any], keys: Sequence[str], name: str, line: bytes) -> Any:
    value = _get(doc, keys)
    if value is None:
        raise MalformedLineError(f"{name}: expected a key from {_keys(keys)}, got none of them", line)
    return value


def _keys(keys: Sequence[str]) -> str:
    return "[" + ", ".join(keys) + "]"


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, Decimal) else str(value)
    return f"{type(value).__name__} {text[:80]}"


def _cut(text: str) -> str:
    return repr(text[:120])


def _ascii(raw: bytes, name: str, line: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedLineError(f"{name}: expected ASCII, got {raw[:80]!r}", line) from None


def _client(client: str, line: bytes) -> str:
    if not _PRINTABLE.fullmatch(client):
        raise MalformedLineError(
            f"client: expected an address of printable ASCII without spaces, got {client[:80]!r}", line
        )
    return client


def _iface(iface: str | None, scheme: str | None, line: bytes) -> str:
    if iface is not None:
        transport, colon, rest = iface.partition(":")
        if not colon or not rest or not re.fullmatch(r"[A-Za-z0-9]+", transport) or not _PRINTABLE.fullmatch(iface):
            raise MalformedLineError(f"iface: expected TRANSPORT:protocol such as 'HTTP:HDLApi', got {iface[:80]!r}",
                                     line)
        return iface
    return f"{(scheme or 'http').upper()}:{API_PROTOCOL}"


def _url_scheme(target: str) -> str | None:
    if target.startswith(("http://", "https://")):
        return target.partition(":")[0]
    return None


def _request_line(request: str, line: bytes) -> tuple[str, str]:
    parts = request.split(" ")
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]) or not parts[1] or not parts[2].startswith("HTTP/"):
        raise MalformedLineError(f'request: expected "METHOD target HTTP/x.y", got {request[:120]!r}', line)
    return parts[0], parts[1]


def _clf_time(stamp: str, line: bytes) -> datetime:
    found = _clf_parse(stamp)
    if isinstance(found, str):
        raise MalformedLineError(found, line)
    return found


@functools.lru_cache(maxsize=4096)  # a busy log repeats each second many times
def _clf_parse(stamp: str) -> datetime | str:
    """The time of ``dd/Mon/yyyy:HH:mm:ss ±hhmm``, or what is wrong with it."""
    m = _CLF_TIME.fullmatch(stamp)
    month = _MONTHS.get(m.group(2)) if m else None
    if m is None or month is None:
        return f"timestamp: expected [dd/Mon/yyyy:HH:mm:ss ±hhmm], got [{stamp[:60]}]"
    day, year, hour, minute, second, off_h, off_m = (int(m.group(i)) for i in (1, 3, 4, 5, 6, 8, 9))
    if off_h > 23 or off_m > 59:
        return f"timestamp: expected a UTC offset within ±23:59, got [{stamp[:60]}]"
    offset = timedelta(hours=off_h, minutes=off_m)
    try:
        return datetime(year, month, day, hour, minute, second,
                        tzinfo=timezone(-offset if m.group(7) == "-" else offset))
    except ValueError:
        return f"timestamp: expected a real date and time, got [{stamp[:60]}]"


def _text_time(text: str, line: bytes) -> datetime:
    if _CLF_TIME.fullmatch(text):
        return _clf_time(text, line)
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedLineError(
            f"time: expected ISO 8601 with a UTC offset (e.g. 2026-11-26T10:00:00.123+08:00), "
            f"dd/Mon/yyyy:HH:mm:ss ±hhmm or epoch seconds, got {text[:60]!r}",
            line,
        ) from None
    offset = ts.utcoffset()
    if offset is None:
        raise MalformedLineError(f"time: expected a UTC offset or Z (the time zone is not guessed), got {text[:60]!r}",
                                 line)
    if offset % timedelta(minutes=1) or abs(offset) >= timedelta(hours=24):
        raise MalformedLineError(f"time: expected a UTC offset in whole minutes within ±23:59, got {text[:60]!r}", line)
    return ts


def _is_number_text(text: str) -> bool:
    return re.fullmatch(r"\d+(?:\.\d+)?", text) is not None


def _epoch_time(value: object, zone: ZoneInfo, keys: Sequence[str], line: bytes) -> datetime:
    seconds = _number(value, "time", keys, line)
    ms = int(seconds) if seconds >= _EPOCH_MS_FROM else int(seconds * 1000)
    if ms >= 253402300800000:  # year 10000
        raise MalformedLineError(f"time: expected epoch seconds or milliseconds before year 10000, got {seconds}", line)
    return (_EPOCH + timedelta(milliseconds=ms)).astimezone(zone)


def _number(value: object, name: str, keys: Sequence[str], line: bytes) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise MalformedLineError(f"{name} {_keys(keys)}: expected a non-negative number, got {_show(value)}", line)
    if isinstance(value, str) and not _is_number_text(value):
        raise MalformedLineError(f"{name} {_keys(keys)}: expected a non-negative number, got {_show(value)}", line)
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise MalformedLineError(f"{name} {_keys(keys)}: expected a non-negative number, got {_show(value)}",
                                 line) from None
    if not number.is_finite() or number < 0 or number >= _NUMBER_LIMIT:
        raise MalformedLineError(
            f"{name} {_keys(keys)}: expected a non-negative number below 1e15, got {_show(value)}", line
        )
    return number


def _seconds_to_ms(seconds: Decimal, line: bytes) -> int:
    ms = int((seconds * 1000).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    if ms > 10**12:
        raise MalformedLineError(f"request time: expected at most 1e9 seconds, got {seconds}", line)
    return ms


def _status(value: object, keys: Sequence[str], line: bytes) -> int:
    if isinstance(value, str) and re.fullmatch(r"\d{3}", value):
        return int(value)
    if type(value) is int and 100 <= value <= 599:
        return value
    raise MalformedLineError(f"status {_keys(keys)}: expected an HTTP status from 100 to 599, got {_show(value)}", line)


def _resp_code(status: int, line: bytes) -> int:
    if not 100 <= status <= 599:
        raise MalformedLineError(f"status: expected an HTTP status from 100 to 599, got {status}", line)
    if 200 <= status < 300:
        return 1
    special = {400: 102, 401: 402, 403: 402, 404: 100, 409: 101, 429: 3, 503: 3}
    if status in special:
        return special[status]
    if status >= 400:
        return 2
    raise MalformedLineError(
        f"status: expected 2xx, 4xx or 5xx (1xx and 3xx have no HANDLE.NET response code), got {status}", line
    )


def _named_handles(doc: Mapping[str, Any], fields: JsonFields, line: bytes) -> tuple[str, ...] | None:
    many = _get(doc, fields.handles)
    if many is not None:
        if not isinstance(many, list) or not all(isinstance(h, str) for h in many):
            raise MalformedLineError(f"handles {_keys(fields.handles)}: expected a list of strings, got {_show(many)}",
                                     line)
        return tuple(many)
    one = _get(doc, fields.handle)
    if one is not None:
        if not isinstance(one, str):
            raise MalformedLineError(f"handle {_keys(fields.handle)}: expected a string, got {_show(one)}", line)
        return (one,)
    return None


def _count(doc: Mapping[str, Any], fields: JsonFields, line: bytes) -> int | None:
    count = _get(doc, fields.count)
    if count is None:
        return None
    if type(count) is not int or not 1 <= count <= MAX_RECORDS_PER_LINE:
        raise MalformedLineError(
            f"count {_keys(fields.count)}: expected an integer from 1 to {MAX_RECORDS_PER_LINE}, got {_show(count)}",
            line,
        )
    return count


def _batch_handles(req: ApiRequest, line: bytes) -> list[str]:
    if req.handles is not None:
        if not 1 <= len(req.handles) <= MAX_RECORDS_PER_LINE:
            raise MalformedLineError(
                f"handles: expected 1 to {MAX_RECORDS_PER_LINE} identifiers for {BATCH_PATH}, got {len(req.handles)}",
                line,
            )
        if req.count is not None and req.count != len(req.handles):
            raise MalformedLineError(
                f"count: expected it to equal the number of handles ({len(req.handles)}), got {req.count}", line
            )
        return [_check_handle(h, line) for h in req.handles]
    return [_unnamed(line, i) for i in range(req.count or 1)]


def _path_handle(raw: str, line: bytes) -> str:
    raw_b = raw.encode("utf-8")
    if _BAD_ESCAPE.search(raw_b):
        raise MalformedLineError(f"handle {raw[:80]!r}: expected %XX escapes, got a '%' that does not start one", line)
    try:
        handle = unquote_to_bytes(raw_b).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedLineError(f"handle {raw[:80]!r}: expected UTF-8 after percent-decoding", line) from None
    return _check_handle(handle, line)


def _check_handle(handle: str, line: bytes) -> str:
    prefix, slash, _ = handle.partition("/")
    if not prefix or not slash:
        raise MalformedLineError(f"handle: expected <prefix>/<suffix>, got {handle[:80]!r}", line)
    try:
        handle.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedLineError(f"handle: expected Unicode text, got {handle[:80]!r} (a lone surrogate)",
                                 line) from None
    return handle


def _unnamed(line: bytes, i: int) -> str:
    return f"{UNNAMED_PREFIX}/{hashlib.sha256(line).hexdigest()[:24]}.{i}"


@functools.lru_cache(maxsize=4096)
def _stamp(ts: datetime) -> str:
    offset = ts.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return (
        f"{ts.year:04d}-{ts.month:02d}-{ts.day:02d} {ts.hour:02d}:{ts.minute:02d}:{ts.second:02d}."
        f"{ts.microsecond // 1000:03d}{sign}{hours:02d}{minutes:02d}"
    )
