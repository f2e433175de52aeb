"""Vectorised parsing of a chunk of HANDLE.NET access-log lines (numpy over the byte buffer).

:func:`parse_chunk` takes the common line, in a strict shape that is sufficient for the reference parser
(:func:`connectors.resolution.handle_log.parse_line`) to accept it with the same fields, and returns its fields
as arrays. Every other line (a byte outside printable ASCII, a ``%`` outside the handle, a long field, a code of
4 digits or more, a leading zero, a date before 1970, …) is returned by index for the reference parser to judge,
so the answer is the reference parser's answer line for line, only faster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

import numpy as np

from connectors.resolution.hashing import _BYTE_MASKS, vh64_words
from protocol.sampling import h64

IP_WIDTH = 40  # bytes; longer client fields go to the reference parser
HANDLE_WIDTH = 64
MAX_FAST_CODE = 1023  # op and resp codes above go to the reference parser (valid, but rare)

I64 = np.int64


@dataclass(slots=True)
class FastLines:
    """Fields of the lines the vectorised path took (arrays of equal length ``n``), and the others by index."""

    n_lines: int  # every complete line of the chunk
    starts: Any  # line start offsets (all lines)
    ends: Any  # line end offsets (the newline), all lines
    index: Any  # line numbers (in the chunk) of the lines taken
    utc_min: Any  # minute since the epoch, UTC
    off_min: Any  # the line's UTC offset in minutes
    utc_ms: Any
    op: Any
    resp: Any
    transport: Any  # index into ``transports``
    transports: list[str]
    combo: Any  # index of the line's (iface, op, resp) among the chunk's distinct ones
    combo_op: Any
    combo_resp: Any
    combo_t: Any
    run: Any  # index of the line's minute run
    run_utc: Any  # per run: UTC minute
    run_off: Any  # per run: UTC offset in minutes
    elapsed: Any
    ip_hash: Any
    ip_words: Any  # the client field as little-endian words (n x IP_WIDTH/8)
    ip_start: Any
    ip_len: Any
    net_len: Any
    handle_hash: Any
    handle_start: Any
    handle_len: Any
    escaped: Any  # the handle has %XX escapes
    slow: Any  # line numbers left to the reference parser


def _gather(padded: Any, pos: Any, width: int) -> Any:
    """Rows of ``width`` bytes starting at ``pos`` (``padded`` has at least ``width`` bytes after the data)."""
    return np.lib.stride_tricks.sliding_window_view(padded, width)[pos]


def _words(padded: Any, pos: Any, width: int, lengths: Any) -> Any:
    """Rows of ``width`` bytes from ``pos`` as little-endian words, bytes beyond each length zeroed."""
    words = np.ascontiguousarray(_gather(padded, pos, width)).view("<u8")
    valid = np.clip(lengths[:, None] - 8 * np.arange(width // 8), 0, 8)
    return words & _BYTE_MASKS[valid]


def _distinct_rows(rows: Any) -> tuple[Any, Any, Any]:
    """For rows of words: each row's index among the distinct rows, the distinct rows, and an ok mask per distinct
    row. Rows are told apart by a 64-bit mix, then checked word for word (a collision is never merged)."""
    n, k = rows.shape
    if n == 0:
        return np.zeros(0, dtype=I64), np.zeros((0, k), dtype=np.uint64), np.zeros(0, dtype=bool)
    with np.errstate(over="ignore"):
        h = rows[:, 0].copy()
        for j in range(1, k):
            h = (h * np.uint64(0x9E3779B97F4A7C15)) ^ rows[:, j] ^ (h >> np.uint64(29))
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    reps = rows[first]
    ok = np.ones(len(first), dtype=bool)
    clash = np.flatnonzero(np.any(rows != reps[inv], axis=1))
    if len(clash):
        ok[inv[clash]] = False  # vanishingly rare: leave those keys to the reference parser
    return inv.reshape(-1), reps, ok


def _judge_combo(words: list[int]) -> tuple[str, int, int] | None:
    """(transport, op, resp) of an interface field and an "op resp" pair, or None if the fast rules do not hold."""
    iface = b"".join(w.to_bytes(8, "little") for w in words[:2]).rstrip(b"\0")
    codes = words[2].to_bytes(8, "little").rstrip(b"\0")
    transport, colon, rest = iface.partition(b":")
    if not colon or not rest or not transport.isalnum() or not transport.isascii() or b"\0" in iface:
        return None
    op_b, _, resp_b = codes.partition(b" ")
    values = []
    for code in (op_b, resp_b):
        if not code.isdigit() or not code.isascii() or (len(code) > 1 and code[0] == 48) or len(code) > 4:
            return None
        values.append(int(code))
    if max(values) > MAX_FAST_CODE:
        return None
    return transport.decode("ascii"), values[0], values[1]


_MINUTE_CACHE: dict[bytes, tuple[int, int] | None] = {}


def _judge_minute(ts: bytes) -> tuple[int, int] | None:
    """(UTC minute since the epoch, offset minutes) of '"yyyy-MM-dd HH:mm' + '±hhmm"' in a 32-byte row."""
    key = ts[:17] + ts[24:30]
    if key in _MINUTE_CACHE:
        return _MINUTE_CACHE[key]
    found = None
    m = _MINUTE_SHAPE.fullmatch(key)
    if m is not None:
        year, month, day, hour, minute, off_h, off_m = (int(g) for g in m.group(1, 2, 3, 4, 5, 7, 8))
        if year >= 1970 and off_h <= 23 and off_m <= 59 and hour <= 23 and minute <= 59:
            try:
                local = datetime(year, month, day, hour, minute, tzinfo=UTC)
            except ValueError:
                local = None
            if local is not None:
                off = (off_h * 60 + off_m) * (-1 if m.group(6) == b"-" else 1)
                found = (int(local.timestamp()) // 60 - off, off)
    if len(_MINUTE_CACHE) > 200_000:
        _MINUTE_CACHE.clear()
    _MINUTE_CACHE[key] = found
    return found


_MINUTE_SHAPE = re.compile(rb'"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d)([+-])(\d\d)(\d\d)"')


def parse_chunk(data: bytes, max_line_bytes: int) -> FastLines:
    """``data`` is complete lines (ends with a newline, no carriage return before a newline)."""
    a = np.frombuffer(data, dtype=np.uint8)
    pad = np.concatenate([a, np.zeros(HANDLE_WIDTH, dtype=np.uint8)])
    ends = np.flatnonzero(a == 10)
    n_lines = len(ends)
    starts = np.empty(n_lines, dtype=I64)
    if n_lines:
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
    sp = np.flatnonzero(a == 32)
    first_sp = np.searchsorted(sp, starts)
    nsp = np.searchsorted(sp, ends) - first_sp
    ok = (nsp == 8) & (ends - starts <= max_line_bytes)
    odd = np.flatnonzero(((a < 33) | (a > 126)) & (a != 10) & (a != 32))  # not printable ASCII
    if len(odd):
        ok[np.searchsorted(ends, odd)] = False
    pct = np.flatnonzero(a == 37)  # '%': allowed in the handle only, as %XX
    ix = np.flatnonzero(ok)
    st = starts[ix]
    en = ends[ix]
    s = sp[first_sp[ix][:, None] + np.arange(8)] if len(ix) else np.zeros((0, 8), dtype=I64)
    s0, s1, s2, s3, _, s5, s6, s7 = (s[:, k] for k in range(8))
    good = s0 > st
    ip_len = s0 - st
    good &= ip_len <= IP_WIDTH
    # interface, opCode and respCode: one key per distinct (iface, "op resp"), judged once in Python
    if_len = s1 - s0 - 1
    codes_len = s5 - s3 - 1
    good &= (if_len >= 3) & (if_len <= 16) & (codes_len >= 3) & (codes_len <= 8)
    if_w = _words(pad, s0 + 1, 16, if_len)
    codes_w = _words(pad, s3 + 1, 8, codes_len)
    combo, reps, combo_ok = _distinct_rows(np.concatenate([if_w, codes_w], axis=1))
    combo_op = np.zeros(len(reps), dtype=I64)
    combo_resp = np.zeros(len(reps), dtype=I64)
    combo_t = np.zeros(len(reps), dtype=I64)
    transports: list[str] = []
    for i, row in enumerate(reps.tolist()):
        judged = _judge_combo(row)
        if judged is None:
            combo_ok[i] = False
            continue
        name, combo_op[i], combo_resp[i] = judged
        if name not in transports:
            transports.append(name)
        combo_t[i] = transports.index(name)
    good &= combo_ok[combo]
    op = combo_op[combo]
    resp = combo_resp[combo]
    # timestamp '"yyyy-MM-dd HH:mm' + '±hhmm"': one key per minute run (lines are mostly in time order)
    good &= (s2 - s1 == 12) & (s3 - s2 == 19)
    ts = _gather(pad, s1 + 1, 32)
    tw = np.ascontiguousarray(ts).view("<u8")
    tail = (tw[:, 2] & np.uint64(0xFF)) | ((tw[:, 3] & np.uint64(0xFFFFFFFFFFFF)) << np.uint64(8))
    mkey = np.stack([tw[:, 0], tw[:, 1], tail], axis=1)
    if len(mkey):
        change = np.empty(len(mkey), dtype=bool)
        change[0] = True
        change[1:] = np.any(mkey[1:] != mkey[:-1], axis=1)
        run_start = np.flatnonzero(change)
        run = np.cumsum(change) - 1
    else:
        run_start = np.zeros(0, dtype=I64)
        run = np.zeros(0, dtype=I64)
    run_utc = np.zeros(len(run_start), dtype=I64)
    run_off = np.zeros(len(run_start), dtype=I64)
    run_ok = np.ones(len(run_start), dtype=bool)
    for i, r in enumerate(run_start.tolist()):
        minute_of = _judge_minute(ts[r].tobytes())
        if minute_of is None:
            run_ok[i] = False
        else:
            run_utc[i], run_off[i] = minute_of
    good &= run_ok[run]
    # ':ss.SSS' must be digits with seconds up to 59
    sec = ts[:, 17:24]
    d = sec - np.uint8(48)
    good &= (sec[:, 0] == 58) & (sec[:, 3] == 46)
    good &= (d[:, 1] <= 5) & (d[:, 2] <= 9) & (d[:, 4] <= 9) & (d[:, 5] <= 9) & (d[:, 6] <= 9)
    utc_min = run_utc[run]
    off_min = run_off[run]
    d64 = d.astype(I64)
    utc_ms = utc_min * 60000 + (d64[:, 1] * 10 + d64[:, 2]) * 1000 + d64[:, 4] * 100 + d64[:, 5] * 10 + d64[:, 6]
    # elapsed: <1-6 digits>ms, kept as its digits (a little-endian word)
    el_len = s6 - s5 - 1
    good &= (el_len >= 3) & (el_len <= 8)
    el_m = _gather(pad, s5 + 1, 8)
    rows = np.arange(len(ix))
    n_dig = np.clip(el_len - 2, 1, 6)
    good &= (el_m[rows, n_dig] == ord("m")) & (el_m[rows, np.minimum(n_dig + 1, 7)] == ord("s"))
    inside = np.arange(8) < n_dig[:, None]
    good &= np.all(((el_m - np.uint8(48)) <= 9) | ~inside, axis=1)
    elapsed = np.ascontiguousarray(el_m).view("<u8")[:, 0] & _BYTE_MASKS[n_dig]
    # adm= or empty
    adm_len = s7 - s6 - 1
    adm_m = _gather(pad, s6 + 1, 4)
    is_adm = np.all(adm_m == np.frombuffer(b"adm=", dtype=np.uint8), axis=1) & (adm_len >= 4)
    good &= (adm_len == 0) | is_adm
    # handle: <prefix>/<suffix>, printable (checked above), at most HANDLE_WIDTH bytes
    h_start = s7 + 1
    h_len = en - h_start
    good &= (h_len >= 2) & (h_len <= HANDLE_WIDTH)
    slashes = np.flatnonzero(a == 47)
    if len(slashes):
        fs = slashes[np.minimum(np.searchsorted(slashes, h_start), len(slashes) - 1)]
        good &= (fs > h_start) & (fs < en)
    else:
        good &= False
    escaped = np.zeros(len(ix), dtype=bool)
    if len(pct):
        row_of_line = np.full(n_lines, -1, dtype=I64)
        row_of_line[ix] = np.arange(len(ix))
        rows_p = row_of_line[np.searchsorted(ends, pct)]
        pct, rows_p = pct[rows_p >= 0], rows_p[rows_p >= 0]
        hexd = pad[np.stack([pct + 1, pct + 2])]
        is_hex = np.all(((hexd >= 48) & (hexd <= 57)) | ((hexd | 32) >= 97) & ((hexd | 32) <= 102), axis=0)
        bad_rows = rows_p[(pct < h_start[rows_p]) | ~is_hex]
        good[bad_rows] = False
        escaped[rows_p] = True
    # the /24 network: the client field up to its last dot (the whole field when it has none)
    dots = np.flatnonzero(a == 46)
    if len(dots):
        ld = dots[np.maximum(np.searchsorted(dots, s0) - 1, 0)]
        net_len = np.where((ld >= st) & (ld < s0), ld - st, ip_len)
    else:
        net_len = ip_len
    handle_hash = np.zeros(len(ix), dtype=np.uint64)
    for r in np.flatnonzero(escaped & good).tolist():  # unescape in Python: a few lines per chunk
        raw = data[h_start[r] : en[r]]
        try:
            handle_hash[r] = h64(unquote_to_bytes(raw).decode("utf-8").encode("utf-8"))
        except UnicodeDecodeError:
            good[r] = False
    g = np.flatnonzero(good)
    slow = np.sort(np.concatenate([np.flatnonzero(~ok), ix[~good]]))
    ip_start = st[g]
    ipl = ip_len[g]
    hs = h_start[g]
    hl = h_len[g]
    ip_words = np.ascontiguousarray(_gather(pad, ip_start, IP_WIDTH)).view("<u8")
    handle_words = np.ascontiguousarray(_gather(pad, hs, HANDLE_WIDTH)).view("<u8")
    return FastLines(
        n_lines=n_lines,
        starts=starts,
        ends=ends,
        index=ix[g],
        utc_min=utc_min[g],
        off_min=off_min[g],
        utc_ms=utc_ms[g],
        op=op[g],
        resp=resp[g],
        transport=combo_t[combo[g]],
        combo=combo[g],
        combo_op=combo_op,
        combo_resp=combo_resp,
        combo_t=combo_t,
        run=run[g],
        run_utc=run_utc,
        run_off=run_off,
        transports=transports,
        elapsed=elapsed[g],
        ip_hash=vh64_words(ip_words, ipl),
        ip_words=ip_words,
        ip_start=ip_start,
        ip_len=ipl,
        net_len=net_len[g],
        handle_hash=np.where(escaped[g], handle_hash[g], vh64_words(handle_words, hl)),
        escaped=escaped[g],
        handle_start=hs,
        handle_len=hl,
        slow=slow,
    )
