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

:class:`HandleLogCounter` counts whole chunks with one compiled pattern over the chunk (no per-line Python
work for the common line) into exact 60-second buckets keyed by (minute start, opCode, respCode, transport).
Any line the pattern does not take goes through :func:`parse_line`, so the counter's answer is by construction
the reference parser's answer: lines the reference accepts are counted, the others are counted as malformed with
the reason, and a few are kept as samples. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote_to_bytes
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connectors.base import (
    OP_CREATE,
    OP_DELETE,
    OP_RESOLUTION,
    RC_SUCCESS,
    ConnectorError,
    ResolutionBucket,
)

log = logging.getLogger(__name__)

FORMAT_HANDLE_NET = "handle-net"
FORMATS = (FORMAT_HANDLE_NET,)
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

# Fixed widths of everything but the handle in the fast pattern; the two handle parts get what is left of
# max_line_bytes, so a line the pattern takes is never longer than max_line_bytes.
_IP_MAX, _TRANSPORT_MAX, _IFACE_REST_MAX, _ADM_MAX = 64, 16, 64, 256
_FIXED_MAX = _IP_MAX + 1 + _TRANSPORT_MAX + 1 + _IFACE_REST_MAX + 1 + 30 + 1 + 6 + 1 + 6 + 1 + 11 + 1 + 4 + _ADM_MAX + 1


@functools.lru_cache(maxsize=8)
def _line_pattern(max_line_bytes: int) -> re.Pattern[bytes]:
    """One pattern for a whole chunk. Each line gives a tuple of five groups:

    - ``'UDP:HDL(2.10) "2026-11-26 10:15'``: interface and minute (one group: fewer, larger groups are faster);
    - ``'+0800" 1 1'``: UTC offset, opCode, respCode;
    - the handle of a successful create (opCode 100, respCode 1), else empty;
    - the handle of another line when it has %-escapes, else empty;
    - the whole line when the fast rules do not cover it (it then goes to the reference parser), else empty.
    """
    part = (max_line_bytes - _FIXED_MAX - 1) // 2
    plain = rb"[!-$&-.0-~]{1,%d}/[!-$&-~]{0,%d}" % (part, part)  # printable ASCII, no space and no '%'
    escaped = (  # at most `part` bytes a side: an escape is 3 bytes
        rb"(?:[!-$&-.0-~]|%%[0-9A-Fa-f]{2}){1,%d}/(?:[!-$&-~]|%%[0-9A-Fa-f]{2}){0,%d}" % (part // 3, part // 3)
    )
    tail = rb" \d{1,9}ms (?:adm=[^ \n]{0,%d})? " % _ADM_MAX
    head = rb"[^ \n]{1,%d} ([A-Za-z0-9]{1,%d}:[^ \n]{1,%d} " % (_IP_MAX, _TRANSPORT_MAX, _IFACE_REST_MAX)
    stamp_codes = rb'"\d{4}-\d\d-\d\d \d\d:\d\d):[0-5]\d\.\d{3}([+-]\d{4}" \d{1,6} \d{1,6})'
    create = rb'(?<=" 100 1)%s(%s|%s)' % (tail, plain, escaped)
    other = rb"%s(?:%s|(%s))" % (tail, plain, escaped)
    line = head + stamp_codes + rb"(?:" + create + rb"|" + other + rb")"
    return re.compile(rb"^(?:" + line + rb"$|(.*)$)", re.MULTILINE)


def _leading_zero(code: bytes) -> bool:
    return len(code) > 1 and code[0] == 48  # b"0"


def _unescaped(raw: bytes) -> str | None:
    """A handle whose escapes the pattern checked: unescaped, or None when that is not UTF-8."""
    if b"%" not in raw:
        return raw.decode("ascii")
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


BucketKey = tuple[datetime, int, int, str]


class HandleLogCounter:
    """Exact counts of HANDLE.NET access-log lines in 60-second buckets, from whole chunks of complete lines.

    ``feed`` as many chunks as there are; then read ``buckets()``, ``created()``, ``lines``, ``malformed`` and
    ``malformed_samples``. A minute keeps the UTC offset its first line was written in; the same instant written
    with another offset lands in the same bucket.
    """

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, max_samples: int = MAX_SAMPLES) -> None:
        if max_line_bytes < MIN_MAX_LINE_BYTES:
            raise ValueError(f"max_line_bytes: expected at least {MIN_MAX_LINE_BYTES}, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        self.max_samples = max_samples
        self._pattern = _line_pattern(max_line_bytes)
        self._counts: dict[BucketKey, int] = {}
        self._created: list[tuple[datetime, str]] = []
        self._minutes: dict[tuple[bytes, bytes], datetime | None] = {}
        self.lines = 0  # every complete line seen, well-formed or not
        self.malformed = 0
        self.malformed_samples: list[str] = []
        self.malformed_reasons: Counter[str] = Counter()

    def feed(self, data: bytes) -> None:
        """Count complete lines; ``data`` is empty or ends with a newline."""
        if not data:
            return
        if not data.endswith(b"\n"):
            raise ValueError("feed() takes complete lines: data must end with a newline")
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        counts = self._counts
        found = Counter(self._pattern.findall(data, 0, len(data) - 1))
        doubtful: set[tuple[bytes, ...]] = set()
        for fields, n in found.items():
            iface_minute, offset_codes, created, escaped, bad = fields
            self.lines += n
            if bad or not iface_minute:
                for _ in range(n):
                    self._count_slow(bad)
                continue
            when = self._minute(iface_minute[-16:], offset_codes[:5])
            handle = _unescaped(escaped or created) if escaped or created else ""
            op_b, _, resp_b = offset_codes[7:].partition(b" ")
            if when is None or handle is None or _leading_zero(op_b) or _leading_zero(resp_b):
                doubtful.add(fields)  # let the reference parser judge these lines
                continue
            if created:
                self._created.extend([(when, handle)] * n)
            key = (when, int(op_b), int(resp_b), iface_minute[: iface_minute.index(b":")].decode("ascii"))
            counts[key] = counts.get(key, 0) + n
        if doubtful:
            for match in self._pattern.finditer(data, 0, len(data) - 1):
                if match.groups(b"") in doubtful:
                    self._count_slow(match.group(0))

    def count_line(self, line: bytes) -> None:
        """Count one line (without its newline) through the reference parser."""
        self.lines += 1
        self._count_slow(line)

    def count_malformed(self, reason: str, line: bytes) -> None:
        """Count one line that the caller found malformed (e.g. longer than it could hold)."""
        self.lines += 1
        self._count_malformed(reason, line)

    def buckets(self) -> list[ResolutionBucket]:
        return [
            ResolutionBucket(minute=m, op_code=op, resp_code=rc, transport=t, count=n)
            for (m, op, rc, t), n in sorted(self._counts.items(), key=lambda kv: (kv[0][0], *kv[0][1:]))
        ]

    def created(self) -> list[tuple[datetime, str]]:
        """(minute, unescaped handle) of every successful create, in the order found."""
        return list(self._created)

    def created_handles(self) -> list[str]:
        return [handle for _, handle in self._created]

    def _minute(self, minute: bytes, offset: bytes) -> datetime | None:
        """The minute start, or None when the fields do not make a valid date, time and offset."""
        key = (minute, offset)
        try:
            return self._minutes[key]
        except KeyError:
            pass
        when = None
        off_h, off_m = int(offset[1:3]), int(offset[3:5])
        if off_h <= 23 and off_m <= 59:
            with contextlib.suppress(ValueError):
                when = datetime(
                    int(minute[0:4]),
                    int(minute[5:7]),
                    int(minute[8:10]),
                    int(minute[11:13]),
                    int(minute[14:16]),
                    tzinfo=_offset(offset[:1], off_h, off_m),
                )
        self._minutes[key] = when
        return when

    def _count_slow(self, line: bytes) -> None:
        try:
            parsed = parse_line(line, max_line_bytes=self.max_line_bytes)
        except MalformedLineError as exc:
            self._count_malformed(exc.reason, exc.line)
            return
        when = parsed.minute
        key = (when, parsed.op_code, parsed.resp_code, parsed.transport)
        self._counts[key] = self._counts.get(key, 0) + 1
        if parsed.op_code == OP_CREATE and parsed.resp_code == RC_SUCCESS:
            self._created.append((when, parsed.handle))

    def _count_malformed(self, reason: str, line: bytes, *, n: int = 1) -> None:
        self.malformed += n
        self.malformed_reasons[reason] += n
        sample = f"{reason}: {sample_text(line)}"
        if len(self.malformed_samples) < self.max_samples and sample not in self.malformed_samples:
            self.malformed_samples.append(sample)


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

    def push(self, chunk: bytes, counter: HandleLogCounter) -> None:
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

    def finish(self, counter: HandleLogCounter) -> None:
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

    def drop_pending(self, counter: HandleLogCounter, reason: str) -> None:
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
    buckets: Iterable[ResolutionBucket], created: Iterable[tuple[datetime, str]], zone: ZoneInfo
) -> dict[str, dict[str, int]]:
    """Roll buckets up to calendar days in ``zone``. A handle is a new registration on the day of its earliest
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
    first: dict[str, datetime] = {}
    for when, handle in created:
        seen = first.get(handle)
        if seen is None or when < seen:
            first[handle] = when
    for when in first.values():
        day_of(when)["creates_ok"] += 1
    return dict(sorted(days.items()))


def count_files(
    paths: Sequence[Path],
    *,
    fmt: str = FORMAT_HANDLE_NET,
    tz: str = "Asia/Shanghai",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    read_chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
) -> dict[str, Any]:
    """Count whole access-log files (plain or gzip, told apart by their first bytes) offline.

    Returns daily totals per calendar day in ``tz``::

        {"days": {"2026-11-26": {"resolutions_ok": n, "resolutions_failed": n, "creates_ok": n,
                                 "deletes_ok": n, "lines": n}},
         "lines": n, "malformed": n, "malformed_samples": [...]}

    ``creates_ok`` counts new registrations: handles whose earliest successful create in these files falls on
    that day. A day's ``lines`` are its well-formed lines; the top-level ``lines`` counts every line. A last line
    without a newline is counted as a line of its own.
    """
    check_format(fmt)
    zone = load_zone(tz)
    counter = HandleLogCounter(max_line_bytes=max_line_bytes)
    for path in paths:
        assembler = LineAssembler(max_line_bytes=max_line_bytes)
        with _open_log(Path(path)) as fh:
            while chunk := fh.read(read_chunk_bytes):
                assembler.push(chunk, counter)
        assembler.finish(counter)
        log.debug("counted %s: %d lines so far, %d malformed", path, counter.lines, counter.malformed)
    return {
        "days": daily_totals(counter.buckets(), counter.created(), zone),
        "lines": counter.lines,
        "malformed": counter.malformed,
        "malformed_samples": list(counter.malformed_samples),
    }


def _open_log(path: Path) -> Any:
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return path.open("rb")
