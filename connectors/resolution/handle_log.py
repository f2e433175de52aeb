"""HANDLE.NET access-log lines: a strict reference parser, and a fast counter that gives the same answer.

One line of a HANDLE.NET server access log::

    <ip> <iface> "<yyyy-MM-dd HH:mm:ss.SSS±hhmm>" <opCode> <respCode> <N>ms [adm=<idx>:<adminHandle> ]<handle>

for example::

    10.1.2.3 UDP:HDL(2.10) "2026-11-26 10:15:02.123+0800" 1 1 3ms  88.118.8/abc123
    10.1.2.9 HTTP:HDLApi "2026-11-26 10:15:03.001+0800" 100 1 12ms adm=300:88.118.8/admin 88.118.8/new%20item

A line is well-formed when (:func:`parse_line` enforces exactly this, and says which rule a line broke):

- it is at most ``max_line_bytes`` long (the newline and one carriage return before it not counted);
- it has exactly 9 fields separated by single spaces: with no ``adm=`` part the 8th field is empty, which is why
  two spaces stand before the handle;
- the client address is not empty; the interface is ``TRANSPORT:rest`` with an ASCII letters-and-digits
  transport (``UDP``, ``TCP``, ``HTTP``) and a non-empty rest;
- the timestamp is a real date and time in exactly that shape, with a UTC offset of at most ±23:59;
- opCode and respCode are numbers of 1–6 digits without leading zeros; the elapsed time is digits followed by
  ``ms``;
- the 8th field is empty or starts with ``adm=``;
- the handle is printable ASCII (it is %-escaped), has a non-empty prefix before its first ``/``, every ``%``
  starts a ``%XX`` escape, and the unescaped bytes are UTF-8.

:class:`HandleLogCounter` counts whole chunks into exact 60-second buckets keyed by (minute start, opCode,
respCode, transport), and keeps each day's shape (:mod:`connectors.resolution.shape`). A chunk is scanned in one
pass by the C scanner (:mod:`connectors.resolution.native`, ``_scan.c``: no GIL, no per-line Python work for the
common line), or, when that extension is not built, vectorised with numpy (:mod:`connectors.resolution.fast`).
Any line the fast path does not take goes through :func:`parse_line`, so the counter's answer is by construction
the reference parser's answer: lines the reference accepts are counted, the others are counted as malformed with
the reason, and a few are kept as samples. Nothing is dropped silently. Successful creates are kept exactly but
compactly (:mod:`connectors.resolution.creates`, spilled to a temporary file when there are very many).
"""

from __future__ import annotations

import functools
import gzip
import logging
import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol
from urllib.parse import unquote_to_bytes
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from connectors.base import (
    OP_CREATE,
    OP_DELETE,
    OP_RESOLUTION,
    RC_SUCCESS,
    ConnectorError,
    ResolutionBucket,
)
from connectors.resolution import native
from connectors.resolution.creates import CreateLog
from connectors.resolution.fast import FastLines, parse_chunk
from connectors.resolution.hashing import (
    vh64_words,
    vrecord_hash,
    vstage1,
)
from connectors.resolution.native import as_u64
from connectors.resolution.shape import REPLAY_SLICE, TOP_KEEP, DayShape, merge_shapes
from protocol.merkle import identifiers_root
from protocol.sampling import STAGE1_RATE_LOG2, elapsed_key, h64, record_hash, sample_key, stage1, stage2

if TYPE_CHECKING:
    from connectors.resolution.api_log import ApiLogTranslator

log = logging.getLogger(__name__)

FORMAT_HANDLE_NET = "handle-net"
FORMAT_HANDLE_PROXY = "handle-proxy"  # the HTTP proxy's access log: the same layout, optionally + ' "<referrer>"'
FORMAT_COMBINED = "combined"  # HTTP API access logs, NCSA combined format: api_log.py
FORMAT_JSON = "json"  # HTTP API access logs, one JSON object per line ("json:field=key,..." too): api_log.py
FORMATS = (FORMAT_HANDLE_NET, FORMAT_HANDLE_PROXY, FORMAT_COMBINED, FORMAT_JSON)
_REFERRER = re.compile(rb' "[^"\n]*"$', re.MULTILINE)  # a handle has no space, so this is never part of it
DEFAULT_MAX_LINE_BYTES = 8192
MIN_MAX_LINE_BYTES = 1024  # the fast pattern needs room for its bounded fields
DEFAULT_READ_CHUNK_BYTES = 1 << 20
MAX_SAMPLES = 5
SAMPLE_CHARS = 200
ANCHOR_BYTES = 64

OP_NAMES: Mapping[int, str] = {
    1: "resolution",
    100: "create handle",
    101: "delete handle",
    102: "add value",
    103: "remove value",
    104: "modify value",
    105: "list handles",
}
RESP_NAMES: Mapping[int, str] = {
    1: "success",
    2: "error",
    3: "server too busy",
    100: "handle not found",
    101: "handle already exists",
    102: "invalid handle",
    402: "authentication needed",
}


class MalformedLineError(ConnectorError, ValueError):
    """A log line broke one of the rules of the format; ``reason`` says which."""

    code = "malformed_line"

    def __init__(self, reason: str, line: bytes) -> None:
        super().__init__(f"{reason}: {sample_text(line)}")
        self.reason = reason
        self.line = line


class UnknownFormatError(ConnectorError, ValueError):
    code = "unknown_format"


@dataclass(frozen=True, slots=True)
class LogLine:
    """One well-formed access-log line."""

    ip: str
    iface: str
    transport: str  # the part of iface before the colon: "UDP", "TCP", "HTTP"
    timestamp: datetime  # timezone-aware, millisecond precision
    op_code: int
    resp_code: int
    elapsed_ms: int
    admin: str | None  # "<idx>:<adminHandle>" when the line has an adm= part
    handle: str  # unescaped
    raw_handle: str  # as written, %-escaped

    @property
    def minute(self) -> datetime:
        return self.timestamp.replace(second=0, microsecond=0)


def sample_text(line: bytes) -> str:
    """A log line as text for error reports: at most SAMPLE_CHARS bytes, undecodable bytes escaped."""
    text = line[:SAMPLE_CHARS].decode("utf-8", "backslashreplace")
    return text + ("…" if len(line) > SAMPLE_CHARS else "")


def check_format(fmt: object) -> str:
    if isinstance(fmt, str) and fmt.startswith(FORMAT_JSON + ":"):  # api_log.py: JSON keys named per field
        from connectors.resolution.api_log import json_fields

        json_fields(fmt)
        return fmt
    if fmt not in FORMATS:
        raise UnknownFormatError(f"format: expected one of {list(FORMATS)}, got {fmt!r}")
    return str(fmt)


def load_zone(name: object) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise ValueError(f"timezone: expected an IANA zone name such as 'Asia/Shanghai', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone: expected an IANA zone name such as 'Asia/Shanghai', got {name!r}") from None


# --- the reference parser ----------------------------------------------------------------------------------

_TS_SHAPE = re.compile(rb'"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{3})([+-])(\d\d)(\d\d)"')
_TRANSPORT = re.compile(rb"[A-Za-z0-9]+")
_CODE = re.compile(rb"0|[1-9]\d{0,5}")
_ELAPSED = re.compile(rb"(\d+)ms")
_PRINTABLE = re.compile(rb"[!-~]+")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


@functools.lru_cache(maxsize=64)
def _offset(sign: bytes, hours: int, minutes: int) -> timezone:
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if sign == b"-" else delta)


def parse_line(line: bytes, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> LogLine:
    """Parse one line (without its newline) or raise :class:`MalformedLineError` naming the rule it broke."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line:
        raise MalformedLineError("empty line", line)
    if len(line) > max_line_bytes:
        raise MalformedLineError(f"line is {len(line)} bytes, longer than max_line_bytes {max_line_bytes}", line)
    if b"\n" in line:
        raise MalformedLineError("line contains a newline", line)
    fields = line.split(b" ")
    if len(fields) != 9:
        raise MalformedLineError(
            f"expected 9 space-separated fields (ip iface \"date time\" opCode respCode <N>ms adm=…|'' handle; "
            f"two spaces before the handle when there is no adm= part), got {len(fields)}",
            line,
        )
    ip, iface, day, time, op_b, resp_b, elapsed_b, adm_b, handle_b = fields
    if not ip:
        raise MalformedLineError("empty client address", line)
    transport, colon, rest = iface.partition(b":")
    if not colon or not rest or not _TRANSPORT.fullmatch(transport):
        raise MalformedLineError(f"interface {_show(iface)} is not TRANSPORT:protocol (e.g. UDP:HDL(2.10))", line)
    stamp = day + b" " + time
    m = _TS_SHAPE.fullmatch(stamp)
    if m is None:
        raise MalformedLineError(f'timestamp {_show(stamp)} is not "yyyy-MM-dd HH:mm:ss.SSS±hhmm"', line)
    year, month, mday, hour, minute, second, milli = (int(g) for g in m.groups()[:7])
    off_h, off_m = int(m.group(9)), int(m.group(10))
    if off_h > 23 or off_m > 59:
        raise MalformedLineError(f"timestamp {_show(stamp)} has a UTC offset beyond ±23:59", line)
    try:
        timestamp = datetime(
            year, month, mday, hour, minute, second, milli * 1000, tzinfo=_offset(m.group(8), off_h, off_m)
        )
    except ValueError:
        raise MalformedLineError(f"timestamp {_show(stamp)} is not a valid date and time", line) from None
    if not _CODE.fullmatch(op_b):
        raise MalformedLineError(f"opCode {_show(op_b)} is not a number of 1-6 digits without leading zeros", line)
    if not _CODE.fullmatch(resp_b):
        raise MalformedLineError(f"respCode {_show(resp_b)} is not a number of 1-6 digits without leading zeros", line)
    elapsed = _ELAPSED.fullmatch(elapsed_b)
    if elapsed is None:
        raise MalformedLineError(f"elapsed time {_show(elapsed_b)} is not <N>ms", line)
    if adm_b and not adm_b.startswith(b"adm="):
        raise MalformedLineError(f"field {_show(adm_b)} before the handle is neither empty nor adm=…", line)
    handle = _unescape_handle(handle_b, line)
    return LogLine(
        ip=ip.decode("utf-8", "backslashreplace"),
        iface=iface.decode("utf-8", "backslashreplace"),
        transport=transport.decode("ascii"),
        timestamp=timestamp,
        op_code=int(op_b),
        resp_code=int(resp_b),
        elapsed_ms=int(elapsed.group(1)),
        admin=adm_b[4:].decode("utf-8", "backslashreplace") if adm_b else None,
        handle=handle,
        raw_handle=handle_b.decode("ascii"),
    )


def _unescape_handle(raw: bytes, line: bytes) -> str:
    if not _PRINTABLE.fullmatch(raw):
        raise MalformedLineError(f"handle {_show(raw)} is empty or not printable ASCII (it must be %-escaped)", line)
    prefix, slash, _ = raw.partition(b"/")
    if not slash or not prefix:
        raise MalformedLineError(f"handle {_show(raw)} is not <prefix>/<suffix>", line)
    if b"%" not in raw:
        return raw.decode("ascii")
    if _BAD_ESCAPE.search(raw):
        raise MalformedLineError(f"handle {_show(raw)} has a '%' that does not start a %XX escape", line)
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedLineError(f"handle {_show(raw)} is not UTF-8 after unescaping", line) from None


def _show(field: bytes) -> str:
    return repr(field[:80].decode("utf-8", "backslashreplace"))


# --- the fast counter --------------------------------------------------------------------------------------

BucketKey = tuple[datetime, int, int, str]
SHANGHAI = "Asia/Shanghai"
DEFAULT_RESOLUTION_SAMPLE_LOG2 = 16  # one resolution line in 65,536 (about 76 of 5 million a day)
DEFAULT_REGISTRATION_SAMPLE_LOG2 = 10  # one registration line in 1,024
_KEY_T, _KEY_CODE = 256, 1024


class HandleLogCounter:
    """Exact counts of HANDLE.NET access-log lines in 60-second buckets, from whole chunks of complete lines,
    and the per-day shape of the traffic (:class:`~connectors.resolution.shape.DayShape`).

    ``feed`` as many chunks as there are; then read ``buckets()``, ``created()``, ``lines``, ``malformed``,
    ``malformed_samples`` and ``shapes`` (per calendar day in ``zone``). Chunks are parsed vectorised
    (:func:`connectors.resolution.fast.parse_chunk`); every line that path does not take goes through
    :func:`parse_line`, so the answer is the reference parser's answer line for line. A minute keeps the UTC offset
    of the first line that made its bucket; the same instant written with another offset lands in the same bucket.

    With a ``salt`` (issued by the verifier), lines are sampled as evidence (``hashing`` module docstring).
    """

    def __init__(
        self,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_samples: int = MAX_SAMPLES,
        zone: ZoneInfo | None = None,
        salt: bytes | None = None,
        resolution_sample_log2: int = DEFAULT_RESOLUTION_SAMPLE_LOG2,
        registration_sample_log2: int = DEFAULT_REGISTRATION_SAMPLE_LOG2,
        fmt: str = FORMAT_HANDLE_NET,
    ) -> None:
        check_format(fmt)
        if max_line_bytes < MIN_MAX_LINE_BYTES:
            raise ValueError(f"max_line_bytes: expected at least {MIN_MAX_LINE_BYTES}, got {max_line_bytes}")
        for name, rate in (("resolution_sample_log2", resolution_sample_log2),
                           ("registration_sample_log2", registration_sample_log2)):
            if not STAGE1_RATE_LOG2 <= rate <= 62:
                raise ValueError(f"{name}: expected an integer from {STAGE1_RATE_LOG2} to 62, got {rate}")
        self.max_line_bytes = max_line_bytes
        self.max_samples = max_samples
        self.fmt = fmt
        self.zone = zone or ZoneInfo(SHANGHAI)
        self._api = _api_translator(fmt, self.zone, max_line_bytes)  # None but for the API formats (api_log.py)
        self.salt = salt
        self.sample_log2 = {"resolution": resolution_sample_log2, "registration": registration_sample_log2}
        self._k1 = sample_key(salt) if salt is not None else 0
        self._counts: dict[BucketKey, int] = {}
        self._creates = CreateLog()
        self._window: native.DayWindow | None = None
        self._refused: tuple[int, int] | None = None  # minutes around a window this zone could not have
        self._fed: dict[tuple[str, str], native.SeenSet] = {}  # (day, "ids" | "clients"): what the sketch has
        self._whens: dict[tuple[int, int], datetime] = {}
        self._days: dict[int, str] = {}
        self.shapes: dict[str, DayShape] = {}
        self.lines = 0  # every complete line seen, well-formed or not
        self.malformed = 0
        self.malformed_samples: list[str] = []
        self.malformed_reasons: Counter[str] = Counter()

    def feed(self, data: bytes) -> None:
        """Count complete lines; ``data`` is empty or ends with a newline."""
        data = self.prepare(data)
        if not data:
            return
        window = self.window_for(data)
        if window is None:
            self._feed_numpy(data)
        else:
            self.absorb(data, self.scan(data, window))

    def prepare(self, data: bytes) -> bytes:
        """``data`` checked and in the form the scanners take (carriage returns and proxy referrers removed, API
        log lines translated); empty when nothing is left to scan."""
        if not data:
            return data
        if not data.endswith(b"\n"):
            raise ValueError("feed() takes complete lines: data must end with a newline")
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        if self._api is not None and not (data := self._api.translate(data, self)):
            return b""
        if self.fmt == FORMAT_HANDLE_PROXY and b'"\n' in data:
            data = _REFERRER.sub(b"", data)
        return data

    def window_for(self, data: bytes) -> native.DayWindow | None:
        """The days (UTC minute ranges) the C scanner sorts a prepared chunk's lines into: a week around the
        chunk's first well-formed line. None: count this chunk with the numpy path (no C scanner, or a zone
        whose days do not start on a whole UTC minute)."""
        if not native.AVAILABLE:
            native.warn_unavailable()
            return None
        probe = _first_minute(data, self.max_line_bytes)
        if probe is not None and self._fed:  # days behind the log's time are done: forget what they were fed
            done = self._day(probe - 1440)  # (a late line for one is fed again, harmlessly: HLL is idempotent)
            self._fed = {k: v for k, v in self._fed.items() if k[0] >= done}
        window = self._window
        if window is not None and (probe is None or window.holds(probe)):
            return window
        if probe is None:  # nothing well-formed at the start: the reference parser judges what the scan cannot
            return native.DayWindow(np.zeros(0, dtype=np.int64), ())
        if self._refused is not None and self._refused[0] <= probe < self._refused[1]:
            return None
        self._window = self._make_window(probe)
        self._refused = None if self._window is not None else (probe - 1440, probe + 1440)
        return self._window

    def _make_window(self, utc_min: int) -> native.DayWindow | None:
        center = datetime.fromtimestamp(utc_min * 60, self.zone).date()
        days = [center + timedelta(days=k) for k in range(-3, 5)]
        bounds = [-(-int(datetime(d.year, d.month, d.day, tzinfo=self.zone).timestamp()) // 60) for d in days]
        # Every minute of the window, checked: a zone whose clocks go back across midnight (or whose day does
        # not start on a whole minute) is refused, and such chunks are counted by the numpy path.
        for k, day in enumerate(days[:-1]):
            for m in range(bounds[k], bounds[k + 1]):
                if datetime.fromtimestamp(m * 60, self.zone).date() != day:
                    return None
        return native.DayWindow(np.array(bounds, dtype=np.int64), tuple(d.isoformat() for d in days[:-1]))

    def scan(self, data: bytes, window: native.DayWindow) -> native.Scanned:
        """The C pass over a prepared chunk (thread-safe: reads only the counter's settings)."""
        return native.scan(
            data,
            self.max_line_bytes,
            salt=self.salt,
            sample_log2=(self.sample_log2["resolution"], self.sample_log2["registration"]),
            window=window,
            replay_below=int(REPLAY_SLICE),
        )

    def absorb(self, data: bytes, sc: native.Scanned) -> None:
        """Count what :meth:`scan` found in ``data``, then the lines it left to the reference parser."""
        self.lines += sc.n_lines
        counts = self._counts
        names = sc.transports
        for utc, off, op, resp, t, c in sc.buckets.tolist():
            bk = (self._when(utc, off), op, resp, names[t])
            counts[bk] = counts.get(bk, 0) + c
        if len(sc.buckets):
            self._shape_native(data, sc)
        creates: list[tuple[int, datetime, str]] = []
        pending: list[tuple[bytes, LogLine]] = []
        for i, start, end in sc.slow.tolist():
            self._count_slow(data[start:end], line_no=i, creates=creates, pending=pending)
        if pending:
            self._shape_slow(pending)
        rows = sc.creates
        if not creates:
            if len(rows):
                self._creates.extend_rows(
                    rows[:, 1], rows[:, 2], as_u64(rows[:, 3]), sc.handles, rows[:, 5], rows[:, 6]
                )
            return
        merged: list[tuple[int, int, int, bytes]] = [
            (i, utc, off, sc.handles[s : s + n]) for i, utc, off, _, _, s, n in rows.tolist()
        ]
        merged.extend((i, *_minute_key(when), handle.encode("utf-8")) for i, when, handle in creates)
        merged.sort(key=lambda c: c[0])  # file order across both paths
        for _, utc, off, handle_b in merged:
            self._creates.append(utc, off, handle_b)

    def _fresh(self, day: str, kind: str, hashes: Any) -> Any:
        seen = self._fed.get((day, kind))
        if seen is None:
            seen = self._fed[(day, kind)] = native.SeenSet()
        return np.sort(seen.fresh(hashes))  # sorted, as np.unique gives them: the same sketch as the numpy path

    def _feed_numpy(self, data: bytes) -> None:
        fl = parse_chunk(data, self.max_line_bytes)
        self.lines += fl.n_lines
        creates: list[tuple[int, datetime, str]] = []
        if len(fl.index):
            self._count_fast(data, fl, creates)
        n_fast = len(creates)
        pending: list[tuple[bytes, LogLine]] = []
        for i in fl.slow.tolist():
            self._count_slow(data[fl.starts[i] : fl.ends[i]], line_no=i, creates=creates, pending=pending)
        if pending:
            self._shape_slow(pending)
        if creates:
            if len(creates) > n_fast:  # file order across both paths
                creates.sort(key=lambda c: c[0])
            self._add_creates(creates)

    def _add_creates(self, creates: list[tuple[int, datetime, str]]) -> None:
        if not creates:
            return
        keys = np.array([_minute_key(when) for _, when, _ in creates], dtype=np.int64).reshape(-1, 2)
        handles = [handle.encode("utf-8") for _, _, handle in creates]
        lengths = np.array([len(h) for h in handles], dtype=np.int64)
        width = max(8, -(-int(lengths.max()) // 8) * 8)
        if width <= 256:  # h64 of all at once, as rows of little-endian words
            words = np.frombuffer(b"".join(h.ljust(width, b"\0") for h in handles), dtype="<u8").reshape(-1, width // 8)
            hashes = vh64_words(words, lengths)
        else:
            hashes = np.array([h64(h) for h in handles], dtype=np.uint64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._creates.extend_rows(keys[:, 0], keys[:, 1], hashes, b"".join(handles), starts, lengths)

    def _shape_native(self, data: bytes, sc: native.Scanned) -> None:
        present = np.flatnonzero(sc.day_lines).tolist()
        for d in present:
            day = sc.window.names[d]
            shape = self.shapes.get(day)
            if shape is None:
                shape = self.shapes[day] = self._new_shape()

            def pick(rows: Any, col: int = 0, d: int = d) -> Any:
                return rows if len(present) == 1 else rows[rows[:, col] == d]

            shape.add_new(as_u64(pick(sc.creates, 4)[:, 3]))
            ids = as_u64(pick(sc.ids)[:, 1])
            shape.add_resolved(ids)
            shape.add_distinct_ids(self._fresh(day, "ids", ids))
            clients = pick(sc.clients)
            clients = clients[np.argsort(as_u64(clients[:, 1]))]  # by hash, as np.unique: the same top-k picks
            uh, cnt = as_u64(clients[:, 1]), clients[:, 2]
            shape.add_distinct_clients(self._fresh(day, "clients", uh))
            ip_start, ip_len, net_len = clients[:, 3], clients[:, 4], clients[:, 5]
            un, n_first, n_inv = np.unique(as_u64(clients[:, 6]), return_index=True, return_inverse=True)
            n_cnt = np.bincount(n_inv.reshape(-1), weights=cnt).astype(np.int64)
            total = int(sc.day_lines[d])
            for summary, hashes, counts, starts, lens in (
                (shape.top_clients, uh, cnt, ip_start, ip_len),
                (shape.top_networks, un, n_cnt, ip_start[n_first], net_len[n_first]),
            ):
                if len(hashes) > 2 * TOP_KEEP:
                    best = np.argpartition(-counts, 2 * TOP_KEEP)[: 2 * TOP_KEEP]
                    hashes, counts, starts, lens = hashes[best], counts[best], starts[best], lens[best]
                summary.add_many(hashes.tolist(), counts.tolist(), _name_at(data, starts.tolist(), lens.tolist()),
                                 total=total)
            shape.add_records(as_u64(pick(sc.records)[:, 1]))
            for _, start, end, op in pick(sc.cands).tolist():  # both stages done in C
                shape.add_sample("registration" if op == OP_CREATE else "resolution", data[start:end].decode("ascii"))

    def _count_fast(self, data: bytes, fl: FastLines, creates: list[tuple[int, datetime, str]]) -> None:
        counts = self._counts
        n_combo = len(fl.combo_op)
        run_whens = [self._when(u, o) for u, o in zip(fl.run_utc.tolist(), fl.run_off.tolist(), strict=True)]
        key = fl.run * n_combo + fl.combo
        if len(run_whens) * n_combo <= 4 * len(key) + 4096:
            tally = np.bincount(key, minlength=len(run_whens) * n_combo)
            found = np.flatnonzero(tally)
            pairs = zip(found.tolist(), tally[found].tolist(), strict=True)
        else:
            uniq, n = np.unique(key, return_counts=True)
            pairs = zip(uniq.tolist(), n.tolist(), strict=True)
        ops, resps, ts = fl.combo_op.tolist(), fl.combo_resp.tolist(), fl.combo_t.tolist()
        for k, c in pairs:
            r, j = divmod(k, n_combo)
            bk = (run_whens[r], ops[j], resps[j], fl.transports[ts[j]])
            counts[bk] = counts.get(bk, 0) + c
        is_create = (fl.op == OP_CREATE) & (fl.resp == RC_SUCCESS)
        idx = np.flatnonzero(is_create)
        if len(idx):
            escaped = fl.escaped[idx].tolist()
            for i, s, ln, r, esc in zip(idx.tolist(), fl.handle_start[idx].tolist(), fl.handle_len[idx].tolist(),
                                        fl.run[idx].tolist(), escaped, strict=True):
                raw = data[s : s + ln]
                handle = unquote_to_bytes(raw).decode("utf-8") if esc else raw.decode("ascii")
                creates.append((int(fl.index[i]), run_whens[r], handle))
        # per-day shape
        lo, hi = int(fl.run_utc.min()), int(fl.run_utc.max())
        day_lo, day_hi = self._day(lo), self._day(hi)
        if day_lo == day_hi:
            self._shape_fast(data, fl, None, day_lo)
        else:
            uniq_min, inv = np.unique(fl.utc_min, return_inverse=True)
            names = [self._day(m) for m in uniq_min.tolist()]
            day_of = np.array([sorted(set(names)).index(d) for d in names])[inv]
            for j, day in enumerate(sorted(set(names))):
                self._shape_fast(data, fl, day_of == j, day)

    def _shape_fast(self, data: bytes, fl: FastLines, mask: Any, day: str) -> None:
        shape = self.shapes.get(day)
        if shape is None:
            shape = self.shapes[day] = self._new_shape()

        def pick(arr: Any) -> Any:
            return arr if mask is None else arr[mask]

        op, resp, ip_h = pick(fl.op), pick(fl.resp), pick(fl.ip_hash)
        handle_h = pick(fl.handle_hash)
        resolved = handle_h[(op == OP_RESOLUTION) & (resp == RC_SUCCESS)]
        shape.add_new(handle_h[(op == OP_CREATE) & (resp == RC_SUCCESS)])
        shape.add_resolved(resolved)
        shape.add_ids(resolved)
        # clients, then their /24 networks from the distinct clients only
        uh, first, cnt = np.unique(ip_h, return_index=True, return_counts=True)
        shape.add_distinct_clients(uh)
        ip_start, ip_len, net_len = pick(fl.ip_start)[first], pick(fl.ip_len)[first], pick(fl.net_len)[first]
        net_h = vh64_words(pick(fl.ip_words)[first], net_len)
        un, n_first, n_inv = np.unique(net_h, return_index=True, return_inverse=True)
        n_cnt = np.bincount(n_inv.reshape(-1), weights=cnt).astype(np.int64)
        for summary, hashes, counts, rows, lengths in ((shape.top_clients, uh, cnt, None, ip_len),
                                                       (shape.top_networks, un, n_cnt, n_first, net_len)):
            starts = ip_start if rows is None else ip_start[rows]
            lens = lengths if rows is None else lengths[rows]
            if len(hashes) > 2 * TOP_KEEP:
                best = np.argpartition(-counts, 2 * TOP_KEEP)[: 2 * TOP_KEEP]
                hashes, counts, starts, lens = hashes[best], counts[best], starts[best], lens[best]
            names = [data[s : s + ln].decode("utf-8", "backslashreplace")
                     for s, ln in zip(starts.tolist(), lens.tolist(), strict=True)]
            summary.add_many(hashes.tolist(), counts.tolist(), names, total=len(ip_h))
        rec = vrecord_hash(ip_h, handle_h, pick(fl.utc_ms), op, resp, pick(fl.elapsed))
        shape.add_records(rec)
        if self.salt is not None:
            cand = np.flatnonzero(vstage1(rec, self._k1) & ((op == OP_RESOLUTION) | (op == OP_CREATE)))
            if len(cand):
                index = pick(fl.index)
                for c in cand.tolist():
                    i = int(index[c])
                    line = data[fl.starts[i] : fl.ends[i]]
                    self._maybe_sample(shape, int(op[c]), line)

    def _new_shape(self) -> DayShape:
        shape = DayShape()
        if self.salt is not None:
            shape.sample_log2 = (self.sample_log2["resolution"], self.sample_log2["registration"])
        return shape

    def _maybe_sample(self, shape: DayShape, op: int, line: bytes) -> None:
        kind = "registration" if op == OP_CREATE else "resolution"
        assert self.salt is not None
        if stage2(self.salt, line, self.sample_log2[kind]):
            shape.add_sample(kind, line.decode("ascii", "backslashreplace"))

    def count_line(self, line: bytes) -> None:
        """Count one line (without its newline) through the reference parser."""
        if self._api is not None:
            self.feed(line + b"\n")
            return
        self.lines += 1
        if self.fmt == FORMAT_HANDLE_PROXY:
            line = _REFERRER.sub(b"", line.removesuffix(b"\r"))
        creates: list[tuple[int, datetime, str]] = []
        pending: list[tuple[bytes, LogLine]] = []
        self._count_slow(line, line_no=0, creates=creates, pending=pending)
        self._shape_slow(pending)
        self._add_creates(creates)

    def count_malformed(self, reason: str, line: bytes) -> None:
        """Count one line that the caller found malformed (e.g. longer than it could hold)."""
        self.lines += 1
        self._count_malformed(reason, line)

    def merge(self, other: HandleLogCounter) -> None:
        """Add what ``other`` counted after what this counter counted (file order is kept for creates)."""
        for k, n in other._counts.items():
            self._counts[k] = self._counts.get(k, 0) + n
        self._creates.extend(other._creates)
        self.lines += other.lines
        self.malformed += other.malformed
        self.malformed_reasons.update(other.malformed_reasons)
        for sample in other.malformed_samples:
            if len(self.malformed_samples) < self.max_samples and sample not in self.malformed_samples:
                self.malformed_samples.append(sample)
        merge_shapes(self.shapes, other.shapes.items())

    def buckets(self) -> list[ResolutionBucket]:
        return [
            ResolutionBucket(minute=m, op_code=op, resp_code=rc, transport=t, count=n)
            for (m, op, rc, t), n in sorted(self._counts.items(), key=lambda kv: (kv[0][0], *kv[0][1:]))
        ]

    def created(self) -> list[tuple[datetime, str]]:
        """(minute, unescaped handle) of every successful create, in the order found."""
        return [(self._when(utc, off), handle.decode("utf-8")) for utc, off, handle in self._creates.items()]

    def created_handles(self) -> list[str]:
        return [handle.decode("utf-8") for _, _, handle in self._creates.items()]

    def drop_created(self) -> None:
        """Forget the creates (after their first creates were taken), to free memory."""
        self._creates = CreateLog()

    def _when(self, utc_min: int, off_min: int) -> datetime:
        key = (utc_min, off_min)
        found = self._whens.get(key)
        if found is None:
            tz = _offset(b"-" if off_min < 0 else b"+", abs(off_min) // 60, abs(off_min) % 60)
            found = self._whens[key] = datetime.fromtimestamp(utc_min * 60, tz)
        return found

    def _day(self, utc_min: int) -> str:
        found = self._days.get(utc_min)
        if found is None:
            found = datetime.fromtimestamp(utc_min * 60, self.zone).date().isoformat()
            if len(self._days) > 100_000:
                self._days.clear()
            self._days[utc_min] = found
        return found

    def _count_slow(
        self,
        line: bytes,
        *,
        line_no: int,
        creates: list[tuple[int, datetime, str]],
        pending: list[tuple[bytes, LogLine]],
    ) -> None:
        try:
            parsed = parse_line(line, max_line_bytes=self.max_line_bytes)
        except MalformedLineError as exc:
            self._count_malformed(exc.reason, exc.line)
            return
        when = parsed.minute
        key = (when, parsed.op_code, parsed.resp_code, parsed.transport)
        self._counts[key] = self._counts.get(key, 0) + 1
        if parsed.op_code == OP_CREATE and parsed.resp_code == RC_SUCCESS:
            creates.append((line_no, when, parsed.handle))
        pending.append((line[:-1] if line.endswith(b"\r") else line, parsed))

    def _shape_slow(self, pending: list[tuple[bytes, LogLine]]) -> None:
        """The shape of the lines the reference parser took (a few per chunk), a day at a time."""
        by_day: dict[str, list[tuple[bytes, LogLine, int]]] = {}
        for line, parsed in pending:
            utc_ms = (parsed.timestamp - _EPOCH) // timedelta(milliseconds=1)
            by_day.setdefault(self._day(utc_ms // 60000), []).append((line, parsed, utc_ms))
        for day, items in by_day.items():
            shape = self.shapes.get(day)
            if shape is None:
                shape = self.shapes[day] = self._new_shape()
            ids: list[int] = []
            new: list[int] = []
            clients: Counter[bytes] = Counter()
            nets: Counter[bytes] = Counter()
            records: list[int] = []
            for line, parsed, utc_ms in items:
                ip = line.split(b" ", 1)[0]
                dot = ip.rfind(b".")
                clients[ip] += 1
                nets[ip[:dot] if dot >= 0 else ip] += 1
                handle = parsed.handle.encode("utf-8")
                if parsed.op_code == OP_RESOLUTION and parsed.resp_code == RC_SUCCESS:
                    ids.append(h64(handle))
                elif parsed.op_code == OP_CREATE and parsed.resp_code == RC_SUCCESS:
                    new.append(h64(handle))
                elapsed = elapsed_key(line.split(b" ")[6][:-2])
                rec = record_hash(ip, handle, utc_ms, parsed.op_code, parsed.resp_code, elapsed)
                records.append(rec)
                if self.salt is not None and parsed.op_code in (OP_RESOLUTION, OP_CREATE) and stage1(rec, self._k1):
                    self._maybe_sample(shape, parsed.op_code, line)
            shape.add_new(np.array(new, dtype=np.uint64))
            shape.add_resolved(np.array(ids, dtype=np.uint64))
            shape.add_ids(np.array(ids, dtype=np.uint64))
            for summary, counts in ((shape.top_clients, clients), (shape.top_networks, nets)):
                keys = list(counts)
                hashes = [h64(k) for k in keys]
                names = [k.decode("utf-8", "backslashreplace") for k in keys]
                summary.add_many(hashes, [counts[k] for k in keys], names)
                if summary is shape.top_clients:
                    shape.add_clients(np.array(hashes, dtype=np.uint64))
            shape.add_records(np.array(records, dtype=np.uint64))

    def _count_malformed(self, reason: str, line: bytes, *, n: int = 1) -> None:
        self.malformed += n
        self.malformed_reasons[reason] += n
        sample = f"{reason}: {sample_text(line)}"
        if len(self.malformed_samples) < self.max_samples and sample not in self.malformed_samples:
            self.malformed_samples.append(sample)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _api_translator(fmt: str, zone: ZoneInfo, max_line_bytes: int) -> ApiLogTranslator | None:
    if fmt != FORMAT_COMBINED and fmt != FORMAT_JSON and not fmt.startswith(FORMAT_JSON + ":"):
        return None
    from connectors.resolution.api_log import ApiLogTranslator  # it imports this module

    return ApiLogTranslator(fmt, zone=zone, max_line_bytes=max_line_bytes)


class LineSink(Protocol):
    """Where a :class:`LineAssembler` hands complete lines: a counter, or the threaded counting pipeline."""

    def feed(self, data: bytes) -> None: ...

    def count_line(self, line: bytes) -> None: ...

    def count_malformed(self, reason: str, line: bytes) -> None: ...


class LineAssembler:
    """Cuts a byte stream into complete lines for a counter, holding the partial last line until its newline
    arrives. Memory is bounded: of a partial line longer than ``max_line_bytes`` only the start is kept, and the
    line is counted as malformed when it ends.

    ``consumed`` is how many bytes of complete lines have been passed on; ``anchor`` is the last (up to
    ANCHOR_BYTES) of them, and ``pending`` the start of the partial line, so that a tailer can check that the
    file under it still holds the bytes it read (``anchor + pending`` sit in the file at
    ``consumed - len(anchor)``).
    """

    ANCHOR: ClassVar[int] = ANCHOR_BYTES

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, consumed: int = 0, anchor: bytes = b"") -> None:
        self.max_line_bytes = max_line_bytes
        self.consumed = consumed
        self.anchor = anchor[-self.ANCHOR :]
        self.pending = b""  # the start of the partial line, at most max_line_bytes + 1 bytes
        self.pending_len = 0  # its true length so far

    @property
    def position(self) -> int:
        """Where the next byte of the stream belongs."""
        return self.consumed + self.pending_len

    def push(self, chunk: bytes, counter: LineSink) -> None:
        if not chunk:
            return
        last = chunk.rfind(b"\n")
        if last < 0:
            self._hold(chunk)
            return
        start = 0
        complete_before = b""
        if self.pending_len:
            first = chunk.find(b"\n")
            if self.pending_len == len(self.pending):  # held whole: the counter judges the line
                counter.feed(self.pending + chunk[: first + 1])
                complete_before = self.anchor + self.pending
            else:
                counter.count_malformed(self._too_long(self.pending_len + first), self.pending)
            start = first + 1
        else:
            complete_before = self.anchor
        if last >= start:
            counter.feed(chunk[start : last + 1])
        if last + 1 >= self.ANCHOR:
            self.anchor = chunk[last + 1 - self.ANCHOR : last + 1]
        else:
            self.anchor = (complete_before + chunk[: last + 1])[-self.ANCHOR :]
        self.consumed += self.pending_len + last + 1
        self.pending = b""
        self.pending_len = 0
        self._hold(chunk[last + 1 :])

    def finish(self, counter: LineSink) -> None:
        """End of stream: a partial last line is counted as a line of its own (it will not be completed)."""
        if not self.pending_len:
            return
        if self.pending_len == len(self.pending):
            counter.count_line(self.pending)
        else:
            counter.count_malformed(self._too_long(self.pending_len), self.pending)
        self._settle()

    def _too_long(self, length: int) -> str:
        return f"line is {length} bytes, longer than max_line_bytes {self.max_line_bytes}"

    def drop_pending(self, counter: LineSink, reason: str) -> None:
        """The rest of the partial line is lost (e.g. truncated away): count what there is as malformed."""
        if self.pending_len:
            counter.count_malformed(reason, self.pending)
            self._settle()

    def _settle(self) -> None:
        if self.pending_len == len(self.pending):
            self.anchor = (self.anchor + self.pending)[-self.ANCHOR :]
        else:
            self.anchor = b""
        self.consumed += self.pending_len
        self.pending = b""
        self.pending_len = 0

    def _hold(self, part: bytes) -> None:
        if not part:
            return
        room = self.max_line_bytes + 1 - len(self.pending)
        if room > 0:
            self.pending += part[:room]
        self.pending_len += len(part)


# --- offline counting and day roll-ups ---------------------------------------------------------------------

DAY_FIELDS = ("resolutions_ok", "resolutions_failed", "creates_ok", "deletes_ok", "lines")


def daily_totals(
    buckets: Iterable[ResolutionBucket],
    created: Iterable[tuple[datetime, str]],
    zone: ZoneInfo,
    *,
    first: Mapping[str, datetime] | None = None,
) -> dict[str, dict[str, int]]:
    """Roll buckets up to calendar days in ``zone`` (``first``: each handle's earliest create, when already known
    from :func:`first_creates`; then ``created`` is not read). A handle is a new registration on the day of its earliest
    successful create in ``created``; later creates of the same handle (re-created after a delete) are not."""
    days: dict[str, dict[str, int]] = {}
    minute_days: dict[datetime, dict[str, int]] = {}

    def day_of(when: datetime) -> dict[str, int]:
        found = minute_days.get(when)
        if found is None:
            name = when.astimezone(zone).date().isoformat()
            found = days.get(name)
            if found is None:
                found = days[name] = dict.fromkeys(DAY_FIELDS, 0)
            minute_days[when] = found
        return found

    for b in buckets:
        day = day_of(b.minute)
        day["lines"] += b.count
        if b.op_code == OP_RESOLUTION:
            day["resolutions_ok" if b.resp_code == RC_SUCCESS else "resolutions_failed"] += b.count
        elif b.op_code == OP_DELETE and b.resp_code == RC_SUCCESS:
            day["deletes_ok"] += b.count
    for when in (first if first is not None else first_creates(created)).values():
        day_of(when)["creates_ok"] += 1
    return dict(sorted(days.items()))


def first_creates(created: Iterable[tuple[datetime, str]]) -> dict[str, datetime]:
    """Each handle's earliest successful create (the minute of its registration)."""
    first: dict[str, datetime] = {}
    for when, handle in created:
        seen = first.get(handle)
        if seen is None or when < seen:
            first[handle] = when
    return first


COUNT_CHUNK_BYTES = 2 << 20  # small enough that the chunks in flight stay a few MB
MIN_RANGE_BYTES = 16 << 20  # smaller files are not worth another process


def count_files(
    paths: Sequence[Path],
    *,
    fmt: str = FORMAT_HANDLE_NET,
    tz: str = "Asia/Shanghai",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    read_chunk_bytes: int = COUNT_CHUNK_BYTES,
    workers: int | None = None,
    salt: bytes | None = None,
) -> dict[str, Any]:
    """Count whole access-log files (plain or gzip, told apart by their first bytes) offline.

    Returns daily totals per calendar day in ``tz``::

        {"days": {"2026-11-26": {"resolutions_ok": n, "resolutions_failed": n, "creates_ok": n,
                                 "deletes_ok": n, "lines": n}},
         "lines": n, "malformed": n, "malformed_samples": [...],
         "shapes": {"2026-11-26": {distinct identifiers and clients, their sketches, top clients and
                                   networks, replays, samples (with a salt), new_identifiers_root}}}

    ``creates_ok`` counts new registrations: handles whose earliest successful create in these files falls on
    that day. A day's ``lines`` are its well-formed lines; the top-level ``lines`` counts every line. A last line
    without a newline is counted as a line of its own. With the C scanner, each file is read in order by one
    process whose ``workers`` threads (default: one per CPU) scan its chunks; without it (numpy fallback), plain
    files are cut at line boundaries into byte ranges counted by ``workers`` processes and merged in file order,
    gzip files read whole.
    """
    check_format(fmt)
    zone = load_zone(tz)
    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    params = (zone.key, max_line_bytes, read_chunk_bytes, salt, fmt)
    counter = _new_counter(params)
    if native.AVAILABLE:  # one process: ``n_workers`` threads scan chunks in C without the GIL
        for path in paths:
            _count_threaded(Path(path), counter, n_workers, read_chunk_bytes)
    else:
        native.warn_unavailable()
        jobs: list[tuple[str, int, int | None]] = []
        for path in paths:
            jobs.extend(_ranges(Path(path), n_workers))
        if n_workers > 1 and len(jobs) > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            with ctx.Pool(min(n_workers, len(jobs))) as pool:
                for part in pool.imap(_count_job, [(job, params) for job in jobs]):  # in file order
                    counter.merge(part)
        else:
            for job in jobs:
                counter.merge(_count_range(job, params))
    new = _new_identifiers(counter)
    counter.drop_created()  # the new identifiers' counts and roots are all that is needed from here on
    buckets = counter.buckets()
    days = daily_totals(buckets, (), zone, first={})
    for day, (n_new, _) in new.items():
        days.setdefault(day, dict.fromkeys(DAY_FIELDS, 0))["creates_ok"] += n_new
    return {
        "days": dict(sorted(days.items())),
        "lines": counter.lines,
        "malformed": counter.malformed,
        "malformed_samples": list(counter.malformed_samples),
        "shapes": day_shapes(counter, zone, new_identifiers=new, buckets=buckets),
    }


def _new_identifiers(counter: HandleLogCounter) -> dict[str, tuple[int, bytes]]:
    """Per calendar day: how many handles were first created on it, and the Merkle root over them."""
    return counter._creates.new_by_day(counter._day)


def day_shapes(
    counter: HandleLogCounter,
    zone: ZoneInfo,
    *,
    first: dict[str, datetime] | None = None,
    new_identifiers: Mapping[str, tuple[int, bytes]] | None = None,
    buckets: Sequence[ResolutionBucket] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each day's shape summary, with the Merkle root over the day's new identifiers and the hourly profile.
    ``new_identifiers``: per day, how many and their root (else from ``first``, else from the counter's creates);
    ``buckets``: ``counter.buckets()`` when already at hand."""
    if new_identifiers is None:
        by_text: dict[str, list[str]] = {}
        if first is None:
            first = first_creates(counter.created())
        for handle, when in first.items():
            by_text.setdefault(when.astimezone(zone).date().isoformat(), []).append(handle)
        new_identifiers = {day: (len(hs), new_identifiers_root(hs)) for day, hs in by_text.items()}
    hourly: dict[str, list[int]] = {}
    for b in counter.buckets() if buckets is None else buckets:
        if b.op_code == OP_RESOLUTION and b.resp_code == RC_SUCCESS:
            local = b.minute.astimezone(zone)
            hourly.setdefault(local.date().isoformat(), [0] * 24)[local.hour] += b.count
    out: dict[str, dict[str, Any]] = {}
    for day in sorted(set(counter.shapes) | set(new_identifiers)):
        shape = counter.shapes.get(day) or DayShape()
        summary = shape.summary()
        n_new, root = new_identifiers.get(day, (0, new_identifiers_root(())))
        summary["hourly_resolutions_ok"] = hourly.get(day, [0] * 24)
        summary["new_identifiers_root"] = root.hex()
        summary["new_identifiers"] = n_new
        out[day] = summary
    return out


def new_identifiers_root(handles: Iterable[str]) -> bytes:
    """RFC 9162 Merkle root over a day's new identifiers: leaves are the UTF-8 handles, sorted and distinct."""
    return identifiers_root(handles)


_Params = tuple[str, int, int, bytes | None, str]


def _new_counter(params: _Params) -> HandleLogCounter:
    zone, max_line_bytes, _, salt, fmt = params
    return HandleLogCounter(max_line_bytes=max_line_bytes, zone=ZoneInfo(zone), salt=salt, fmt=fmt)


def _ranges(path: Path, n: int) -> list[tuple[str, int, int | None]]:
    """Byte ranges of a plain file cut just after a newline (None: to the end); a gzip file is one job."""
    with path.open("rb") as fh:
        magic = fh.read(2)
        size = os.fstat(fh.fileno()).st_size
        if magic == b"\x1f\x8b" or n == 1 or size < 2 * MIN_RANGE_BYTES:
            return [(str(path), 0, None)]
        parts = min(n * 2, size // MIN_RANGE_BYTES)
        cuts = [0]
        for k in range(1, parts):
            fh.seek(max(cuts[-1], size * k // parts))
            rest = fh.readline()
            cut = fh.tell() if rest.endswith(b"\n") else size
            if cut < size and cut > cuts[-1]:
                cuts.append(cut)
    ends: list[int | None] = [*cuts[1:], None]
    return [(str(path), start, end) for start, end in zip(cuts, ends, strict=True)]


def _count_job(args: tuple[tuple[str, int, int | None], _Params]) -> HandleLogCounter:
    return _count_range(*args)


def _count_range(job: tuple[str, int, int | None], params: _Params) -> HandleLogCounter:
    path, start, end = job
    counter = _new_counter(params)
    chunk = params[2]
    assembler = LineAssembler(max_line_bytes=counter.max_line_bytes)
    with _open_log(Path(path)) as fh:
        if start:
            fh.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            data = fh.read(chunk if left is None else min(chunk, left))
            if not data:
                break
            if left is not None:
                left -= len(data)
            assembler.push(data, counter)
    assembler.finish(counter)
    log.debug("counted %s [%d, %s): %d lines, %d malformed", path, start, end, counter.lines, counter.malformed)
    return counter


def _count_threaded(path: Path, counter: HandleLogCounter, threads: int, chunk: int) -> None:
    """Count a file (plain or gzip) into ``counter``: chunks are scanned by ``threads`` threads in C (the GIL
    released) while this thread reads and counts what they found, in file order."""
    assembler = LineAssembler(max_line_bytes=counter.max_line_bytes)
    with _open_log(path) as fh, ThreadPoolExecutor(threads, thread_name_prefix="scan") as pool:
        sink = _ScanPipeline(counter, pool, depth=threads)
        while data := fh.read(chunk):
            assembler.push(data, sink)
        assembler.finish(sink)
        sink.drain(0)
    log.debug("counted %s: %d lines so far, %d malformed", path, counter.lines, counter.malformed)


class _ScanPipeline:
    """What a :class:`LineAssembler` hands on, queued in order: chunks go to the scanning threads at once and
    are counted when their turn comes; at most ``depth`` wait."""

    def __init__(self, counter: HandleLogCounter, pool: ThreadPoolExecutor, *, depth: int) -> None:
        self.counter = counter
        self.pool = pool
        self.depth = depth
        self.queue: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()

    def feed(self, data: bytes) -> None:
        counter = self.counter
        data = counter.prepare(data)
        if not data:
            return
        window = counter.window_for(data)
        if window is None:
            self.queue.append((counter._feed_numpy, (data,)))
        else:
            self.queue.append((self._absorb, (data, self.pool.submit(counter.scan, data, window))))
        self.drain(self.depth)

    def _absorb(self, data: bytes, scanned: Future[native.Scanned]) -> None:
        self.counter.absorb(data, scanned.result())

    def count_line(self, line: bytes) -> None:
        self.queue.append((self.counter.count_line, (line,)))

    def count_malformed(self, reason: str, line: bytes) -> None:
        self.queue.append((self.counter.count_malformed, (reason, line)))

    def drain(self, keep: int) -> None:
        while len(self.queue) > keep:
            fn, args = self.queue.popleft()
            fn(*args)


def _name_at(data: bytes, starts: list[int], lengths: list[int]) -> Callable[[int], str]:
    """The i-th name of a summary's keys, decoded from ``data`` when asked."""

    def name(i: int) -> str:
        return data[starts[i] : starts[i] + lengths[i]].decode("utf-8", "backslashreplace")

    return name


def _first_minute(data: bytes, max_line_bytes: int) -> int | None:
    """The UTC minute of the first well-formed line among the first few of ``data``."""
    start = 0
    for _ in range(8):
        end = data.find(b"\n", start)
        if end < 0:
            return None
        try:
            parsed = parse_line(data[start:end], max_line_bytes=max_line_bytes)
        except MalformedLineError:
            start = end + 1
            continue
        return _minute_key(parsed.minute)[0]
    return None


def _minute_key(when: datetime) -> tuple[int, int]:
    """(UTC minute since the epoch, UTC offset in minutes) of a minute's datetime."""
    off = when.utcoffset()
    return int(when.timestamp()) // 60, (int(off.total_seconds()) // 60 if off is not None else 0)


def _open_log(path: Path) -> Any:
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return path.open("rb")
