"""The C scanner of HANDLE.NET access-log chunks (``_scan.c``, built by ``setup.py``), seen from Python.

:func:`scan` runs one chunk of complete lines through the C pass, which holds no GIL, so that threads scan chunks
on every core of one process. Lines in the strict common shape (the same shape :mod:`connectors.resolution.fast`
takes, sufficient for :func:`connectors.resolution.handle_log.parse_line` to accept them with the same fields)
come back aggregated per chunk: bucket counts, each day's distinct resolved identifiers and clients (so that only
those reach the HyperLogLog sketches, which are idempotent: the sketches are the same), the creates (hash, minute
and unescaped handle), the records in the replay slice and the lines sampled under the verifier's salt (both
stages of ``protocol.sampling``; stage 2's HMAC-SHA256 by OpenSSL's libcrypto). Every other line comes
back by index for the reference parser. A line whose UTC minute falls outside the chunk's day window (about a week
around the chunk's first line) also goes to the reference parser, which gives the same answer, only slower.

When the extension is not built, :data:`AVAILABLE` is False and the counter uses the numpy path (it logs a
warning once).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.sampling import STAGE1_RATE_LOG2, sample_key

log = logging.getLogger(__name__)

try:
    _scan: Any = importlib.import_module("connectors.resolution._scan")
    IMPORT_ERROR = ""
except ImportError as exc:  # not built (no compiler when installed): the numpy path counts instead
    _scan = None
    IMPORT_ERROR = str(exc)

AVAILABLE = _scan is not None
_warned = False


def warn_unavailable() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "resolution logs: the C scanner connectors/resolution/_scan.c is not built (%s); counting with the "
            "slower numpy path. Build it with: .venv/bin/pip install -e '.[dev]' (needs gcc and Python headers)",
            IMPORT_ERROR,
        )


@dataclass(frozen=True, slots=True)
class DayWindow:
    """Calendar days (in the counter's zone) as UTC minutes: day ``names[k]`` is ``[bounds[k], bounds[k+1])``."""

    bounds: Any  # int64, ascending, len(names) + 1
    names: tuple[str, ...]

    def holds(self, utc_min: int, margin: int = 1) -> bool:
        """Whether ``utc_min`` lies at least ``margin`` whole days inside the window."""
        b = self.bounds
        return len(b) > 2 * margin + 1 and int(b[margin]) <= utc_min < int(b[-1 - margin])


@dataclass(slots=True)
class Scanned:
    """What the C pass found in one chunk (``int64`` row arrays; hashes are ``uint64`` views)."""

    window: DayWindow
    n_lines: int
    out_of_window: int
    slow: Any  # (n, 3): line number, start, end (the newline) of each line for the reference parser
    buckets: Any  # (n, 6): UTC minute, offset minutes, opCode, respCode, transport index, count; first-seen order
    transports: list[str]
    ids: Any  # (n, 2): day index, handle hash of successful resolutions, distinct per day
    clients: Any  # (n, 7): day, ip hash, lines, start of the first line, ip length, /24 length, /24 hash
    records: Any  # (n, 2): day, record hash (those in the replay slice), in line order
    cands: Any  # (n, 4): day, start, end, opCode of the lines sampled (resolutions, creates), in line order
    creates: Any  # (n, 7): line number, UTC minute, offset, handle hash, day, offset and length in ``handles``
    handles: bytes  # the creates' unescaped handles (UTF-8), back to back
    day_lines: Any  # (days,): lines of each day taken here


def _rows(raw: bytes, width: int) -> Any:
    return np.frombuffer(raw, dtype=np.int64).reshape(-1, width)


def scan(
    data: bytes,
    max_line_bytes: int,
    *,
    salt: bytes | None,
    sample_log2: tuple[int, int],
    window: DayWindow,
    replay_below: int,
) -> Scanned:
    """Scan complete lines (``data`` ends with a newline, no carriage returns before newlines). Thread-safe: it
    reads only its arguments. With a ``salt``, lines are sampled at 1 in 2**``sample_log2`` (resolutions,
    registrations) by both stages of ``protocol.sampling``."""
    if _scan is None:
        raise RuntimeError(f"the C scanner is not built: {IMPORT_ERROR}")
    bounds = np.ascontiguousarray(window.bounds, dtype=np.int64).tobytes()
    k1 = sample_key(salt) if salt is not None else 0
    shifts = [rate - STAGE1_RATE_LOG2 for rate in sample_log2]
    out = _scan.scan(data, max_line_bytes, k1, salt is not None, salt or b"", *shifts, bounds, replay_below)
    n_lines, out_of_window, slow, buckets, transports, ids, clients, records, cands, creates, handles, days = out
    return Scanned(
        window=window,
        n_lines=n_lines,
        out_of_window=out_of_window,
        slow=_rows(slow, 3),
        buckets=_rows(buckets, 6),
        transports=transports,
        ids=_rows(ids, 2),
        clients=_rows(clients, 7),
        records=_rows(records, 2),
        cands=_rows(cands, 4),
        creates=_rows(creates, 7),
        handles=handles,
        day_lines=np.frombuffer(days, dtype=np.int64),
    )


def h64(data: bytes) -> int:
    """``protocol.sampling.h64`` in C (tests hold the two equal)."""
    if _scan is None:
        raise RuntimeError(f"the C scanner is not built: {IMPORT_ERROR}")
    value: int = _scan.h64(data)
    return value


def as_u64(column: Any) -> Any:
    """A column of int64 rows as uint64 values (the same bits)."""
    return np.ascontiguousarray(column).view(np.uint64)


class SeenSet:
    """The 64-bit values already fed to an idempotent sketch (HyperLogLog), so that each is fed once: the sketch
    is the same, the feeding cheaper. Exact (an open-addressing table in C, never a filter that could drop a new
    value); it stops growing at ``max_slots`` slots (8 bytes each) and holds at most 3/4 of them, after which
    values it could not hold are simply fed again."""

    __slots__ = ("count", "max_slots", "table")

    def __init__(self, *, max_slots: int = 1 << 20) -> None:
        self.table = np.zeros(min(1 << 12, max_slots), dtype=np.uint64)
        self.count = 0
        self.max_slots = max_slots

    def fresh(self, values: Any) -> Any:
        """The values (uint64 array) not seen before, in their order; they are seen from now on."""
        if _scan is None:
            raise RuntimeError(f"the C scanner is not built: {IMPORT_ERROR}")
        need = self.count + len(values)
        if 4 * need > 3 * len(self.table) and len(self.table) < self.max_slots:  # at most 3/4 full
            size = len(self.table)
            while size < 2 * need and size < self.max_slots:
                size *= 2
            old = self.table[self.table != 0]
            self.table = np.zeros(size, dtype=np.uint64)
            _, self.count = _scan.seen_add(self.table, old.tobytes(), 0)
        out, added = _scan.seen_add(self.table, np.ascontiguousarray(values, dtype=np.uint64).tobytes(), self.count)
        self.count += added
        return np.frombuffer(out, dtype=np.uint64)


def merkle_root(blob: Any, starts: Any, lengths: Any, idx: Any) -> bytes:
    """RFC 9162 root over the entries ``blob[starts[i] : starts[i] + lengths[i]]`` for ``i`` in ``idx``, sorted
    bytewise and distinct (int64 buffers), as ``protocol.merkle.identifiers_root`` of their text."""
    if _scan is None:
        raise RuntimeError(f"the C scanner is not built: {IMPORT_ERROR}")
    root: bytes = _scan.merkle_root(blob, starts, lengths, idx)
    return root
