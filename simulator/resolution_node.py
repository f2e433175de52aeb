"""A simulated identifier-resolution secondary node that writes HANDLE.NET-style access logs.

It plays the outside world for the resolution-log connector, the demo and the tests, so it imports nothing
from the project. Every line it writes is generated from a seeded random stream, and :meth:`ResolutionNode.ground_truth`
says exactly what a correct counter must find in what it wrote:

    <ip> <iface> "<yyyy-MM-dd HH:mm:ss.SSS±hhmm>" <opCode> <respCode> <N>ms [adm=<idx>:<adminHandle> ]<handle>

(two spaces before the handle when there is no ``adm=`` part; the handle is %-escaped).

Ground-truth definitions (DESIGN.md): days are calendar days in Asia/Shanghai (UTC+8, no daylight saving since
1991); a *new registration* is a successful create (opCode 100, respCode 1) of a handle that was never created
before in this log — a handle re-created after a delete is not new; a *failed resolution* is opCode 1 with any
respCode other than 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

log = logging.getLogger(__name__)

SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")
LOG_NAME = "access.log"

OP_RESOLVE = 1
OP_CREATE = 100
OP_DELETE = 101
OP_VALUE_CHANGES = (102, 103, 104)
OP_LIST = 105
RC_SUCCESS = 1
RC_ERROR = 2
RC_TOO_BUSY = 3
RC_NOT_FOUND = 100
RC_ALREADY_EXISTS = 101
RC_INVALID_HANDLE = 102
RC_AUTHENTICATION_NEEDED = 402

RESOLVE_IFACES = ("UDP:HDL(2.10)", "UDP:HDL(2.10)", "UDP:HDL(2.10)", "TCP:HDL(2.10)", "HTTP:HDL(2.10)", "HTTP:HDLApi")
ADMIN_IFACES = ("TCP:HDL(2.10)", "HTTP:HDLApi", "HTTP:HDL(2.10)")
_WORDS = ("dev", "part", "lot", "batch", "pump", "valve", "motor", "order", "pallet", "mould")
# Suffixes that need %-escaping (space, percent, non-ASCII): a few of every hundred new handles.
_ODD_SUFFIXES = ("new item ", "100%-", "阀门-", "a+b=", "q?x#")
_INITIAL_HANDLES_PER_PREFIX = 40
_OTHER_OPS_RATIO = 0.01  # value changes and lists
# Relative traffic per local hour: quiet at night, peaks mid-morning and mid-afternoon.
_DIURNAL = (0.15, 0.1, 0.08, 0.07, 0.08, 0.12, 0.3, 0.6, 1.0, 1.3, 1.4, 1.2,
            0.9, 1.1, 1.35, 1.4, 1.25, 1.0, 0.7, 0.55, 0.45, 0.35, 0.25, 0.2)


@dataclass
class DayTruth:
    """Exact counts for one Asia/Shanghai calendar day."""

    resolutions_ok: int = 0
    resolutions_failed: int = 0
    creates_ok: int = 0  # new registrations only
    deletes_ok: int = 0
    lines: int = 0  # well-formed lines

    def as_dict(self) -> dict[str, int]:
        return {
            "resolutions_ok": self.resolutions_ok,
            "resolutions_failed": self.resolutions_failed,
            "creates_ok": self.creates_ok,
            "deletes_ok": self.deletes_ok,
            "lines": self.lines,
        }


@dataclass
class GroundTruth:
    """Exactly what the node wrote (a snapshot; later writes do not change it)."""

    days: dict[str, DayTruth]
    lines: int  # every line written, well-formed or not
    malformed: list[str]  # the malformed lines written on purpose, without their newline
    # (minute start, opCode, respCode, transport) -> lines; the minute keeps the offset the log was written in
    buckets: dict[tuple[datetime, int, int, str], int]
    new_registrations: list[str]  # handles (unescaped) in the order they were first created
    recreated: list[str]  # handles successfully created again after a delete (not new registrations)
    overwritten: list[str] = field(default_factory=list)  # successful creates of live handles (REST PUT)
    replayed: int = 0  # lines written again verbatim (adversarial mode)
    never_resolved: list[str] = field(default_factory=list)  # bulk registrations kept out of resolution

    def as_count_dict(self) -> dict[str, Any]:
        """The same shape as ``connectors.resolution.count_files`` returns, without the samples."""
        return {
            "days": {day: truth.as_dict() for day, truth in sorted(self.days.items())},
            "lines": self.lines,
            "malformed": len(self.malformed),
        }


@dataclass
class _State:
    live: list[str] = field(default_factory=list)  # handles that currently exist
    live_set: set[str] = field(default_factory=set)
    logged_live: list[str] = field(default_factory=list)  # created in this log (may since be deleted)
    ever_created: set[str] = field(default_factory=set)  # pre-existing or created in this log
    recreatable: list[str] = field(default_factory=list)  # created in this log, then deleted
    logged_creates: set[str] = field(default_factory=set)


class ResolutionNode:
    """Writes a HANDLE.NET access log at ``log_dir / "access.log"``, reproducibly from ``seed``.

    ``write_lines`` writes history in compressed time (tests, demo back-fill); ``run`` writes in real time until
    cancelled. ``hold_back`` lets a test leave the last bytes of a batch unwritten (a line cut in the middle, as a
    writer that flushes mid-line leaves it); they are written first by the next write, ``flush`` or ``rotate``.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        seed: int = 1,
        prefixes: int = 20,
        rate_per_s: float = 50.0,
        success_ratio: float = 0.97,
        create_ratio: float = 0.05,
        delete_ratio: float = 0.005,
        malformed_every: int = 0,
        clients: int = 3000,
        overwrite_ratio: float = 0.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if prefixes < 1:
            raise ValueError(f"prefixes: expected at least 1, got {prefixes}")
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s: expected a positive rate, got {rate_per_s}")
        for name, ratio in (
            ("success_ratio", success_ratio),
            ("create_ratio", create_ratio),
            ("delete_ratio", delete_ratio),
            ("overwrite_ratio", overwrite_ratio),
        ):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{name}: expected a ratio in [0, 1], got {ratio}")
        if create_ratio + delete_ratio + _OTHER_OPS_RATIO > 1.0:
            raise ValueError(f"create_ratio + delete_ratio: expected at most 0.99, got {create_ratio + delete_ratio}")
        if clients < 1:
            raise ValueError(f"clients: expected at least 1, got {clients}")
        if malformed_every < 0:
            raise ValueError(f"malformed_every: expected 0 (off) or a positive interval, got {malformed_every}")
        self.log_dir = Path(log_dir)
        self.path = self.log_dir / LOG_NAME
        self.rate_per_s = rate_per_s
        self.success_ratio = success_ratio
        self.create_ratio = create_ratio
        self.delete_ratio = delete_ratio
        self.malformed_every = malformed_every
        self.overwrite_ratio = overwrite_ratio  # creates that overwrite a live handle (a REST PUT logs as a create)
        self._clock = clock or (lambda: datetime.now(SHANGHAI))
        self._rng = random.Random(seed)
        self.prefixes = self._make_prefixes(prefixes)
        self.clients = self._make_clients(clients)
        self._state = _State()
        self._serial = 0
        for prefix in self.prefixes:
            for _ in range(_INITIAL_HANDLES_PER_PREFIX):
                self._add_live(self._fresh_handle(prefix, odd=False))
        self._days: dict[date, DayTruth] = {}
        self._buckets: Counter[tuple[datetime, int, int, str]] = Counter()
        self._lines = 0
        self._good_since_malformed = 0
        self._malformed: list[str] = []
        self._new: list[str] = []
        self._new_at: list[datetime] = []  # when each of self._new was created (as written, to the millisecond)
        self._recreated: list[str] = []
        self._overwritten: list[str] = []
        self._replayed = 0
        self._never_resolved: list[str] = []
        self._recent: list[tuple[str, datetime, int, int, str]] = []  # resolution lines, for replays
        self._held = b""
        self._last_ts: datetime | None = None
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # --- public API ------------------------------------------------------------------------------------------

    def write_lines(self, n: int, *, start: datetime, spacing_s: float, hold_back: int = 0) -> None:
        """Append ``n`` well-formed lines (plus malformed ones every ``malformed_every``), the i-th stamped
        ``start + i * spacing_s``. ``start`` must be timezone-aware; lines carry its UTC offset."""
        if start.tzinfo is None or start.utcoffset() is None:
            raise ValueError(f"start: expected a timezone-aware datetime, got {start!r}")
        if n < 0 or spacing_s < 0:
            raise ValueError(f"n and spacing_s: expected non-negative values, got {n} and {spacing_s}")
        out = [self._next_lines(start + timedelta(seconds=i * spacing_s)) for i in range(n)]
        self._append("".join(out).encode(), hold_back=hold_back)

    def flush(self) -> None:
        """Write the bytes held back by the last ``write_lines(..., hold_back=...)``."""
        self._append(b"")

    def rotate(self, *, copytruncate: bool = False, keep: int = 5) -> Path:
        """Rotate like logrotate: shift ``access.log.N`` up by one, then either rename ``access.log`` to
        ``access.log.1`` and start a new, empty file (the default), or copy it to ``access.log.1`` and truncate it
        in place (``copytruncate``). Held-back bytes are written first. Returns the rotated file's path."""
        self.flush()
        for i in range(keep - 1, 0, -1):
            older = self.path.with_name(f"{LOG_NAME}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{LOG_NAME}.{i + 1}"))
        rotated = self.path.with_name(f"{LOG_NAME}.1")
        if copytruncate:
            shutil.copyfile(self.path, rotated)
            with self.path.open("r+b") as fh:
                fh.truncate(0)
        else:
            self.path.replace(rotated)
            self.path.touch()
        log.debug("rotated %s to %s (copytruncate=%s)", self.path, rotated, copytruncate)
        return rotated

    def write_day(self, day: date, lines: int, *, tz: tzinfo = SHANGHAI, flush_s: float = 60.0) -> None:
        """Append about ``lines`` lines for one calendar day with a diurnal and weekly rhythm (quiet at night,
        peaks mid-morning and mid-afternoon, weekends at 40 %), registrations arriving in bursts of 100-2,000
        (with retries that fail as already existing), written in ``flush_s`` flush bursts as HANDLE.NET does."""
        if lines < 0 or flush_s <= 0:
            raise ValueError(f"lines and flush_s: expected lines >= 0 and flush_s > 0, got {lines} and {flush_s}")
        rng = self._rng
        weekly = 0.4 if day.weekday() >= 5 else 1.0
        weights = [weekly * _DIURNAL[m // 60] * (0.9 + 0.2 * rng.random()) for m in range(1440)]
        total = sum(weights)
        start = datetime.combine(day, time(0), tzinfo=tz)
        create_ratio, self.create_ratio = self.create_ratio, 0.0
        bursts = []
        budget = int(lines * create_ratio)
        while budget > 0:
            size = min(budget, rng.randint(100, 2000))
            bursts.append((rng.randrange(1440), size))
            budget -= size
        try:
            out: list[str] = []
            flushed_until = 0.0
            for minute, w in enumerate(weights):
                n = int(lines * w / total + rng.random())
                base = start + timedelta(minutes=minute)
                stamps = sorted(rng.random() * 60.0 for _ in range(n))
                for sec in stamps:
                    out.append(self._next_lines(base + timedelta(seconds=sec)))
                for at, size in bursts:
                    if at == minute:
                        out.extend(self._burst(base + timedelta(seconds=30), size))
                if (minute + 1) * 60.0 - flushed_until >= flush_s:
                    self._append("".join(out).encode())
                    out.clear()
                    flushed_until = (minute + 1) * 60.0
            self._append("".join(out).encode())
        finally:
            self.create_ratio = create_ratio

    def _burst(self, ts: datetime, size: int) -> list[str]:
        """A registration burst: ``size`` successful creates under one prefix, 1 in 50 retried (already exists)."""
        rng = self._rng
        prefix = rng.choice(self.prefixes)
        iface = rng.choice(ADMIN_IFACES)
        out = []
        st = self._state
        for i in range(size):
            when = ts + timedelta(milliseconds=20 * i)
            if self.overwrite_ratio and st.logged_live and rng.random() < self.overwrite_ratio:
                handle = rng.choice(st.logged_live)
                if handle in st.live_set:  # a REST PUT over a live handle: logs as a create, is not new
                    self._overwritten.append(handle)
                    self._record(when, OP_CREATE, RC_SUCCESS, iface.partition(":")[0], new=False)
                    out.append(self._admin_line(when, iface, OP_CREATE, RC_SUCCESS, prefix, handle))
                    continue
            handle = self._fresh_handle(prefix, odd=rng.random() < 0.01)
            self._add_live(handle)
            self._state.logged_creates.add(handle)
            self._state.logged_live.append(handle)
            self._new.append(handle)
            self._record(when, OP_CREATE, RC_SUCCESS, iface.partition(":")[0], new=True)
            out.append(self._admin_line(when, iface, OP_CREATE, RC_SUCCESS, prefix, handle))
            if rng.random() < 0.02:
                self._record(when, OP_CREATE, RC_ALREADY_EXISTS, iface.partition(":")[0], new=False)
                out.append(self._admin_line(when, iface, OP_CREATE, RC_ALREADY_EXISTS, prefix, handle))
        return out

    def _admin_line(self, ts: datetime, iface: str, op: int, resp: int, prefix: str, handle: str) -> str:
        elapsed = self._rng.randrange(5, 90)
        adm = f"adm=300:{prefix}/admin"
        return f'{self.clients[0]} {iface} "{_stamp(ts)}" {op} {resp} {elapsed}ms {adm} {_escape(handle)}\n'

    # --- adversarial modes -----------------------------------------------------------------------------------

    def write_replay(self, n: int) -> None:
        """Append ``n`` resolution lines written before, verbatim (a replay to inflate the count). They are
        well-formed, so they are counted; the replay flag is what tells them apart."""
        if not self._recent:
            raise ValueError("write_replay: no resolution lines written yet to replay")
        out = []
        for _ in range(n):
            text, ts, op, resp, transport = self._rng.choice(self._recent)
            self._record(ts, op, resp, transport, new=False)
            self._replayed += 1
            out.append(text)
        self._append("".join(out).encode())

    def write_loop(self, n: int, *, start: datetime, spacing_s: float, clients: int = 3, handles: int = 50) -> None:
        """A flat scripted loop: ``clients`` clients resolve the same ``handles`` handles round-robin at a constant
        rate, all successful, around the clock."""
        rng = self._rng
        ips = [f"203.0.113.{10 + i}" for i in range(clients)]
        targets = [rng.choice(self._state.live) for _ in range(handles)]
        out = []
        for i in range(n):
            ts = start + timedelta(seconds=i * spacing_s)
            self._record(ts, OP_RESOLVE, RC_SUCCESS, "UDP", new=False)
            out.append(f'{ips[i % clients]} UDP:HDL(2.10) "{_stamp(ts)}" 1 1 2ms  {_escape(targets[i % handles])}\n')
        self._append("".join(out).encode())

    def write_bulk_unresolved(self, n: int, *, start: datetime, spacing_s: float) -> None:
        """Bulk registrations of ``n`` new handles that nothing ever resolves (kept out of the live pool)."""
        prefix = self._rng.choice(self.prefixes)
        out = []
        for i in range(n):
            ts = start + timedelta(seconds=i * spacing_s)
            handle = self._fresh_handle(prefix, odd=False)
            self._state.ever_created.add(handle)
            self._new.append(handle)
            self._never_resolved.append(handle)
            self._record(ts, OP_CREATE, RC_SUCCESS, "HTTP", new=True)
            out.append(self._admin_line(ts, "HTTP:HDLApi", OP_CREATE, RC_SUCCESS, prefix, handle))
        self._append("".join(out).encode())

    def registrations(self) -> list[tuple[str, datetime]]:
        """The new registrations so far as the node's registry records them: (handle, created_at), in order. An
        overwrite (a REST PUT over a live handle) adds nothing here; the access log logs it as a create."""
        return list(zip(self._new, self._new_at, strict=True))

    def write_registry(self, path: Path, *, table: str = "handles", until: datetime | None = None,
                       naive: bool = False) -> int:
        """Write the registry into SQLite ``path`` (created if missing): table ``table (handle TEXT PRIMARY KEY,
        created_at TEXT, updated_at TEXT)``, one row per new registration created before ``until`` (all when
        None). ``created_at`` is ISO 8601 text in UTC+8 with its offset (``naive``: without it). Rows already in
        the table are left as they are (``updated_at`` is set to the time of the write: an update, not a create).
        Returns the number of rows added."""
        import sqlite3

        if not table.isidentifier():
            raise ValueError(f"table: expected an SQL identifier, got {table!r}")
        rows = [(h, _registry_time(t, naive=naive)) for h, t in self.registrations() if until is None or t < until]
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(f"CREATE TABLE IF NOT EXISTS {table} (handle TEXT PRIMARY KEY, created_at TEXT NOT NULL, "
                       "updated_at TEXT)")
            before = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 (identifier checked)
            db.executemany(f"INSERT INTO {table} (handle, created_at) VALUES (?, ?) ON CONFLICT (handle) "  # noqa: S608
                           "DO UPDATE SET updated_at = excluded.created_at", rows)
            after = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
        return int(after - before)

    def ground_truth(self) -> GroundTruth:
        return GroundTruth(
            days={d.isoformat(): DayTruth(**t.as_dict()) for d, t in sorted(self._days.items())},
            lines=self._lines,
            malformed=list(self._malformed),
            buckets=dict(self._buckets),
            new_registrations=list(self._new),
            recreated=list(self._recreated),
            overwritten=list(self._overwritten),
            replayed=self._replayed,
            never_resolved=list(self._never_resolved),
        )

    async def run(self) -> None:
        """Append lines in real time at ``rate_per_s`` until cancelled, in bursts of about 0.2 s (timestamps
        from the clock, spread over the burst)."""
        loop = asyncio.get_running_loop()
        burst_s = min(1.0, max(0.05, 10.0 / self.rate_per_s))
        t0 = loop.time()
        written = 0
        log.info("resolution node writing %s at %.1f lines/s", self.path, self.rate_per_s)
        try:
            while True:
                await asyncio.sleep(burst_s)
                due = int((loop.time() - t0) * self.rate_per_s) - written
                if due <= 0:
                    continue
                now = self._clock()
                step = 1.0 / self.rate_per_s
                first = now - timedelta(seconds=step * (due - 1))
                if self._last_ts is not None and first < self._last_ts:
                    first = self._last_ts
                    step = max(0.0, (now - first).total_seconds() / max(1, due - 1))
                self.write_lines(due, start=first, spacing_s=step)
                written += due
        finally:
            self.flush()

    # --- generation ------------------------------------------------------------------------------------------

    def _make_prefixes(self, n: int) -> list[str]:
        seen: set[str] = set()
        out: list[str] = []
        while len(out) < n:
            prefix = f"88.{self._rng.randint(100, 9999)}.{self._rng.randint(1, 9999)}"
            if prefix not in seen:
                seen.add(prefix)
                out.append(prefix)
        return out

    def _fresh_handle(self, prefix: str, *, odd: bool) -> str:
        self._serial += 1
        stem = self._rng.choice(_ODD_SUFFIXES) if odd else self._rng.choice(_WORDS)
        return f"{prefix}/{stem}{self._serial:x}"

    def _missing_handle(self) -> str:
        # "x-" never begins a created suffix, so this handle does not exist.
        return f"{self._rng.choice(self.prefixes)}/x-{self._rng.randrange(10**9)}"

    def _add_live(self, handle: str) -> None:
        st = self._state
        st.live.append(handle)
        if len(st.live) > 1:  # a new handle takes a random popularity rank
            i = self._rng.randrange(len(st.live))
            st.live[i], st.live[-1] = st.live[-1], st.live[i]
        st.live_set.add(handle)
        st.ever_created.add(handle)

    def _remove_random_live(self) -> str:
        st = self._state
        i = self._rng.randrange(len(st.live))
        handle = st.live[i]
        st.live[i] = st.live[-1]
        st.live.pop()
        st.live_set.discard(handle)
        return handle

    def _next_lines(self, ts: datetime) -> str:
        text = self._good_line(ts)
        if self.malformed_every:
            self._good_since_malformed += 1
            if self._good_since_malformed >= self.malformed_every:
                self._good_since_malformed = 0
                bad = self._malformed_line(ts)
                self._malformed.append(bad)
                self._lines += 1
                text += bad + "\n"
        return text

    def _good_line(self, ts: datetime) -> str:
        rng = self._rng
        st = self._state
        ok = rng.random() < self.success_ratio
        r = rng.random()
        admin: str | None = None
        new = False
        if r < self.create_ratio:
            op = OP_CREATE
            prefix = rng.choice(self.prefixes)
            admin = f"300:{prefix}/admin"
            iface = rng.choice(ADMIN_IFACES)
            if ok and st.recreatable and rng.random() < 0.1:
                handle = st.recreatable.pop(rng.randrange(len(st.recreatable)))
                self._add_live(handle)
                self._recreated.append(handle)
                resp = RC_SUCCESS
            elif ok and st.logged_live and self.overwrite_ratio and rng.random() < self.overwrite_ratio:
                handle = rng.choice(st.logged_live)
                if handle not in st.live_set:
                    st.logged_live.remove(handle)
                    handle = self._fresh_handle(prefix, odd=False)
                    self._add_live(handle)
                    st.logged_creates.add(handle)
                    st.logged_live.append(handle)
                    self._new.append(handle)
                    new = True
                else:
                    self._overwritten.append(handle)
                resp = RC_SUCCESS
            elif ok:
                handle = self._fresh_handle(prefix, odd=rng.random() < 0.03)
                st.logged_live.append(handle)
                self._add_live(handle)
                st.logged_creates.add(handle)
                self._new.append(handle)
                new = True
                resp = RC_SUCCESS
            else:
                resp = rng.choice((RC_ALREADY_EXISTS, RC_ALREADY_EXISTS, RC_AUTHENTICATION_NEEDED, RC_ERROR))
                handle = rng.choice(st.live) if resp == RC_ALREADY_EXISTS else self._fresh_handle(prefix, odd=False)
        elif r < self.create_ratio + self.delete_ratio:
            op = OP_DELETE
            iface = rng.choice(ADMIN_IFACES)
            if ok and st.live:
                handle = self._remove_random_live()
                if handle in st.logged_creates:
                    st.recreatable.append(handle)
                resp = RC_SUCCESS
            else:
                resp = rng.choice((RC_NOT_FOUND, RC_AUTHENTICATION_NEEDED))
                handle = self._missing_handle() if resp == RC_NOT_FOUND else rng.choice(st.live)
            admin = f"300:{handle.partition('/')[0]}/admin"
        elif r < self.create_ratio + self.delete_ratio + _OTHER_OPS_RATIO:
            op = rng.choice((*OP_VALUE_CHANGES, OP_LIST))
            iface = rng.choice(ADMIN_IFACES)
            handle = rng.choice(st.live) if op != OP_LIST else rng.choice(self.prefixes) + "/"
            admin = f"300:{handle.partition('/')[0]}/admin"
            resp = RC_SUCCESS if ok else rng.choice((RC_AUTHENTICATION_NEEDED, RC_ERROR))
        else:
            op = OP_RESOLVE
            iface = rng.choice(RESOLVE_IFACES)
            if ok:
                handle, resp = self._popular(), RC_SUCCESS
            else:
                resp = rng.choice((RC_NOT_FOUND,) * 6 + (RC_ERROR, RC_TOO_BUSY, RC_INVALID_HANDLE))
                handle = rng.choice(st.live) if resp in (RC_ERROR, RC_TOO_BUSY) else self._missing_handle()
        self._record(ts, op, resp, iface.partition(":")[0], new=new)
        adm = f"adm={admin} " if admin else " "
        text = f'{self._ip()} {iface} "{_stamp(ts)}" {op} {resp} {rng.randrange(1, 60)}ms {adm}{_escape(handle)}\n'
        if op == OP_RESOLVE:
            recent = self._recent
            if len(recent) < 20_000:
                recent.append((text, ts, op, resp, iface.partition(":")[0]))
            else:
                recent[rng.randrange(len(recent))] = (text, ts, op, resp, iface.partition(":")[0])
        return text

    def _ip(self) -> str:
        """A client: mostly the node's enterprise systems (a heavy-tailed few make most requests), some strays."""
        r = self._rng.random()
        if r < 0.02:
            return f"2001:db8::{self._rng.randrange(1, 0xFFFF):x}"
        if r < 0.05:
            return f"10.{self._rng.randrange(256)}.{self._rng.randrange(256)}.{self._rng.randrange(1, 255)}"
        return self.clients[int(len(self.clients) * self._rng.random() ** 2)]

    def _make_clients(self, n: int) -> list[str]:
        nets = [f"{self._rng.choice((10, 172, 58, 113, 220))}.{self._rng.randrange(256)}.{self._rng.randrange(256)}"
                for _ in range(max(1, n // 8))]
        return [f"{self._rng.choice(nets)}.{self._rng.randrange(1, 255)}" for _ in range(n)]

    def _popular(self) -> str:
        """A live handle by Zipf-like popularity: the handle at rank r is drawn about r**-0.75 as often."""
        live = self._state.live
        return live[int(len(live) * self._rng.random() ** 4)]

    def _record(self, ts: datetime, op: int, resp: int, transport: str, *, new: bool) -> None:
        # Ground truth is kept from the millisecond-truncated timestamp that is written.
        ts = ts.replace(microsecond=ts.microsecond // 1000 * 1000)
        self._lines += 1
        day = self._days.setdefault(ts.astimezone(SHANGHAI).date(), DayTruth())
        day.lines += 1
        if op == OP_RESOLVE:
            if resp == RC_SUCCESS:
                day.resolutions_ok += 1
            else:
                day.resolutions_failed += 1
        elif new:
            day.creates_ok += 1
            self._new_at.append(ts)
        elif op == OP_DELETE and resp == RC_SUCCESS:
            day.deletes_ok += 1
        self._buckets[(ts.replace(second=0, microsecond=0), op, resp, transport)] += 1
        self._last_ts = ts

    def _malformed_line(self, ts: datetime) -> str:
        kinds = (
            lambda: "this is not a handle access log line",
            lambda: "",
            lambda: f'10.0.0.1 UDP:HDL(2.10) "{_stamp(ts)}" x 1 3ms  88.100.1/bad-op',
            lambda: f'10.0.0.1 UDP:HDL(2.10) "{_stamp(ts).replace("-", "/", 1)}" 1 1 3ms  88.100.1/bad-ts',
            lambda: f'10.0.0.1 UDP:HDL(2.10) "{ts.year}-13-01 10:00:00.000+0800" 1 1 3ms  88.100.1/month13',
            lambda: f'10.0.0.1 UDP:HDL(2.10) "{_stamp(ts)}" 1 1 3ms 88.100.1/one-space',
            lambda: f'10.0.0.1 UDP:HDL(2.10) "{_stamp(ts)}" 1 1 3s  88.100.1/bad-elapsed',
            lambda: f'10.0.0.1 UDP:HDL(2.10) "{_stamp(ts)}" 1 1 3ms  88.100.1/bad%zzescape',
            lambda: f'10.0.0.1 UDP:HDL(2.10) "{_stamp(ts)}" 1 1 3ms  ' + "88.100.1/" + "y" * 9000,
            lambda: f'10.0.0.1 UDP:HDL(2.10) "{_stamp(ts)}" 100 1 3ms adm=300:88.100.1/admin',
        )
        return self._rng.choice(kinds)()

    # --- file ------------------------------------------------------------------------------------------------

    def _append(self, data: bytes, *, hold_back: int = 0) -> None:
        data = self._held + data
        if hold_back > 0:
            cut = max(0, len(data) - hold_back)
            data, self._held = data[:cut], data[cut:]
        else:
            self._held = b""
        if not data:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def _stamp(ts: datetime) -> str:
    """``yyyy-MM-dd HH:mm:ss.SSS±hhmm`` as HANDLE.NET writes it."""
    offset = ts.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return (
        f"{ts.year:04d}-{ts.month:02d}-{ts.day:02d} {ts.hour:02d}:{ts.minute:02d}:{ts.second:02d}."
        f"{ts.microsecond // 1000:03d}{sign}{hours:02d}{minutes:02d}"
    )


def _registry_time(ts: datetime, *, naive: bool) -> str:
    local = ts.astimezone(SHANGHAI)
    if naive:
        return local.replace(tzinfo=None).isoformat(" ", timespec="milliseconds")
    return local.isoformat(" ", timespec="milliseconds")


def _escape(handle: str) -> str:
    return quote(handle, safe="/.-_~:!*'(),;@=+$")


async def run_resolution_node(log_dir: Path, seed: int = 1, rate_per_s: float = 50.0) -> None:
    """Run a simulated resolution node writing ``log_dir/access.log`` until cancelled."""
    await ResolutionNode(Path(log_dir), seed=seed, rate_per_s=rate_per_s).run()


# --- the same traffic as an HTTP API access log (combined or JSON) ------------------------------------------

API_FORMATS = ("combined", "json")
API_UNNAMED_PREFIX = "~unnamed"  # stand-in identifiers for registrations a line does not name (api_log.py)
_API_STATUS = {  # HANDLE.NET respCode -> the HTTP statuses that stand for it
    RC_SUCCESS: (200,),
    RC_ERROR: (500, 502),
    RC_TOO_BUSY: (429, 503),
    RC_NOT_FOUND: (404,),
    RC_ALREADY_EXISTS: (409,),
    RC_INVALID_HANDLE: (400,),
    RC_AUTHENTICATION_NEEDED: (401, 403),
}
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MAX_BATCH = 50


class ApiLogWriter:
    """Writes the traffic of a :class:`ResolutionNode`'s access log again, as its HTTP APIs would log it, at
    ``path`` in ``fmt`` (``"combined"`` or ``"json"``), reproducibly from ``seed``, with ground truth.

    Each call of :meth:`add_from` takes the complete lines the node appended since the last call and writes:

    - resolutions (opCode 1) as ``GET /api/handles/{handle}`` (a query string now and then), the respCode as an
      HTTP status (``_API_STATUS``);
    - a run of successful creates from one client in one minute as ``POST /identityv2/data/batchCreate`` (up to
      50): in JSON with a ``handles`` list, or only a ``count``; a combined line says neither, so it stands for
      one create (the call). Other creates as ``POST /identityv2/data`` (JSON: with ``handle``; combined: unnamed)
      or ``PUT /api/handles/{handle}``; deletes as ``DELETE /api/handles/{handle}``; value changes (102-104) as
      ``PUT /identityv2/data`` (opCode 104 in the truth); list operations (105) have no API call and are left out;
    - JSON lines carry ``iface`` (the node's interface, so transports stay as they were) or a ``scheme``
      (``HTTP``/``HTTPS`` transports), and ``time`` as ISO 8601 (``time_style="iso"``) or ``msec`` epoch seconds
      (``"epoch"``); combined lines end with the request time in seconds and are ``HTTP``;
    - with ``malformed_every``, one line that fits no rule after every that many lines.

    A create that a line does not name counts, as documented in ``connectors/resolution/api_log.py``, under the
    stand-in ``~unnamed/<24 hex digits of SHA-256 of the line>.<i>``; :meth:`ground_truth` counts exactly so.
    The node's own malformed lines are not API traffic and are skipped.
    """

    def __init__(self, path: Path, *, fmt: str, seed: int = 1, malformed_every: int = 0,
                 time_style: str = "iso") -> None:
        if fmt not in API_FORMATS:
            raise ValueError(f"fmt: expected one of {list(API_FORMATS)}, got {fmt!r}")
        if time_style not in ("iso", "epoch"):
            raise ValueError(f"time_style: expected 'iso' or 'epoch', got {time_style!r}")
        if malformed_every < 0:
            raise ValueError(f"malformed_every: expected 0 (off) or a positive interval, got {malformed_every}")
        self.path = Path(path)
        self.fmt = fmt
        self.time_style = time_style
        self.malformed_every = malformed_every
        self._rng = random.Random(seed)
        self._offset = 0  # how much of the node's log has been taken
        self._serial = 0
        self._since_malformed = 0
        self._days: dict[date, DayTruth] = {}
        self._buckets: Counter[tuple[datetime, int, int, str]] = Counter()
        self._lines = 0
        self._malformed: list[str] = []
        self._created: set[str] = set()
        self._new: list[str] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add_from(self, node: ResolutionNode) -> int:
        """Write the node's complete lines appended since the last call; returns how many API lines were written."""
        with node.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        records = [r for r in (_handle_record(raw) for raw in data[:end].decode("utf-8").splitlines()) if r]
        out: list[str] = []
        i = 0
        while i < len(records):
            rec = records[i]
            run = 1
            if rec.op == OP_CREATE and rec.resp == RC_SUCCESS:
                while (i + run < len(records) and run < _MAX_BATCH and records[i + run].op == OP_CREATE
                       and records[i + run].resp == RC_SUCCESS and records[i + run].ip == rec.ip
                       and _minute(records[i + run].ts) == _minute(rec.ts)
                       and records[i + run].handle not in {r.handle for r in records[i : i + run]}):
                    run += 1
            out.append(self._api_line(records[i : i + run]))
            i += run
        text = "".join(out)
        if text:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(text.encode())
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        return text.count("\n")

    def ground_truth(self) -> GroundTruth:
        """What a counter of this API log must find (``buckets`` count records: a batch of n named creates is n)."""
        return GroundTruth(
            days={d.isoformat(): DayTruth(**t.as_dict()) for d, t in sorted(self._days.items())},
            lines=self._lines,
            malformed=list(self._malformed),
            buckets=dict(self._buckets),
            new_registrations=list(self._new),
            recreated=[],
        )

    # --- one API line ---------------------------------------------------------------------------------------

    def _api_line(self, run: list[_HandleRecord]) -> str:
        rng = self._rng
        first = run[0]
        self._serial += 1
        scheme = rng.choice(("http", "http", "https"))
        use_iface = self.fmt == "json" and rng.random() < 0.4
        transport = first.iface.partition(":")[0] if use_iface else (scheme.upper() if self.fmt == "json" else "HTTP")
        status = rng.choice(_API_STATUS[first.resp])
        named: list[str] | None = None  # the handles the line names (None: it names none)
        count = 1
        query = ""
        op = first.op
        if len(run) > 1:
            method, path = "POST", "/identityv2/data/batchCreate"
            if self.fmt == "json" and rng.random() < 0.6:
                named = [r.handle for r in run]
                count = len(run)
            elif self.fmt == "json":
                count = len(run)
        elif op == OP_RESOLVE:
            method, path = "GET", "/api/handles/" + _escape(first.handle)
            query = rng.choice(("", "", "", "?type=URL", "?index=1&auth=false"))
            named = [first.handle]
        elif op == OP_CREATE and rng.random() < 0.4:
            method, path = "PUT", "/api/handles/" + _escape(first.handle)
            named = [first.handle]
        elif op == OP_CREATE:
            method, path = "POST", "/identityv2/data"
            named = [first.handle] if self.fmt == "json" else None
        elif op == OP_DELETE:
            method, path = "DELETE", "/api/handles/" + _escape(first.handle)
            named = [first.handle]
            status = 204 if status == 200 and rng.random() < 0.5 else status
        elif op in OP_VALUE_CHANGES:
            op = 104
            method, path = "PUT", "/identityv2/data"
            named = [first.handle]
            if self.fmt == "combined":
                query = "?handle=" + quote(first.handle, safe="")
        else:
            raise AssertionError(f"opCode {op} has no API call")  # list operations are filtered out before
        elapsed = f"{first.elapsed_ms / 1000:.3f}"
        if self.fmt == "combined":
            ts = first.ts.replace(microsecond=0)
            stamp = (f"{ts.day:02d}/{_MONTH_NAMES[ts.month - 1]}/{ts.year:04d}:{ts.hour:02d}:{ts.minute:02d}:"
                     f"{ts.second:02d} {_stamp(ts)[-5:]}")
            size = rng.randrange(60, 4000)
            line = (f'{first.ip} - - [{stamp}] "{method} {path}{query} HTTP/1.1" {status} {size} "-" '
                    f'"idis-sdk/2.{self._serial % 7}" {elapsed}')
        else:
            doc: dict[str, Any] = {}
            if self.time_style == "iso":
                doc["time"] = first.ts.isoformat(timespec="milliseconds")
            else:
                utc_ms = (first.ts - datetime(1970, 1, 1, tzinfo=timezone(timedelta(0)))) // timedelta(milliseconds=1)
                doc["msec"] = "@MSEC@"
                msec = f"{utc_ms // 1000}.{utc_ms % 1000:03d}"
            doc.update(remote_addr=first.ip, method=method, uri=path + query, status=status,
                       request_time="@RT@", request_id=f"{self._serial:08x}")
            if use_iface:
                doc["iface"] = first.iface
            else:
                doc["scheme"] = scheme
            if named is not None and path == "/identityv2/data/batchCreate":
                doc["handles"] = named
            elif named is not None and not path.startswith("/api/handles/"):
                doc["handle"] = named[0]
            if len(run) > 1 and named is None:
                doc["count"] = count
            line = json.dumps(doc, ensure_ascii=False).replace('"@RT@"', elapsed)
            if self.time_style == "epoch":
                line = line.replace('"@MSEC@"', msec)
        if named is None:
            names = [f"{API_UNNAMED_PREFIX}/{hashlib.sha256(line.encode()).hexdigest()[:24]}.{i}" for i in range(count)]
        else:
            names = named
        for name in names:
            self._record(first.ts, op, first.resp, transport, name)
        self._lines += 1
        text = line + "\n"
        if self.malformed_every:
            self._since_malformed += 1
            if self._since_malformed >= self.malformed_every:
                self._since_malformed = 0
                bad = self._malformed_line(first)
                self._malformed.append(bad)
                self._lines += 1
                text += bad + "\n"
        return text

    def _record(self, ts: datetime, op: int, resp: int, transport: str, handle: str) -> None:
        ts = ts.replace(microsecond=ts.microsecond // 1000 * 1000)
        if self.fmt == "combined":
            ts = ts.replace(microsecond=0)
        day = self._days.setdefault(ts.astimezone(SHANGHAI).date(), DayTruth())
        day.lines += 1
        if op == OP_RESOLVE:
            if resp == RC_SUCCESS:
                day.resolutions_ok += 1
            else:
                day.resolutions_failed += 1
        elif op == OP_CREATE and resp == RC_SUCCESS and handle not in self._created:
            self._created.add(handle)
            self._new.append(handle)
            day.creates_ok += 1
        elif op == OP_DELETE and resp == RC_SUCCESS:
            day.deletes_ok += 1
        self._buckets[(ts.replace(second=0, microsecond=0), op, resp, transport)] += 1

    def _malformed_line(self, rec: _HandleRecord) -> str:
        ts = rec.ts.replace(microsecond=0)
        stamp = (f"{ts.day:02d}/{_MONTH_NAMES[ts.month - 1]}/{ts.year:04d}:{ts.hour:02d}:{ts.minute:02d}:"
                 f"{ts.second:02d} {_stamp(ts)[-5:]}")
        iso = rec.ts.isoformat(timespec="milliseconds")
        kinds: tuple[str, ...]
        if self.fmt == "combined":
            kinds = (
                "this is not an access log line",
                "",
                f'{rec.ip} - - [{stamp}] "GET /healthz HTTP/1.1" 200 2 "-" "kube-probe/1.29"',
                f'{rec.ip} - - [{stamp}] "GET /api/handles/no-prefix-handle HTTP/1.1" 400 20 "-" "curl/8"',
                f'{rec.ip} - - [{stamp}] "POST /api/handles/88.100.1/x HTTP/1.1" 405 20 "-" "curl/8"',
                f'{rec.ip} - - [{stamp}] "GET /api/handles/88.100.1/bad%zz HTTP/1.1" 200 20 "-" "curl/8"',
                f'{rec.ip} - - [{stamp}] "GET /api/handles/88.100.1/moved HTTP/1.1" 302 0 "-" "curl/8"',
                f'{rec.ip} - - [32/{stamp[3:]}] "GET /api/handles/88.100.1/x HTTP/1.1" 200 20 "-" "curl/8"',
            )
        else:
            kinds = (
                "this is not JSON",
                "",
                '["a", "JSON", "list"]',
                json.dumps({"time": iso, "remote_addr": rec.ip, "method": "GET", "uri": "/api/handles/88.100.1/x"}),
                json.dumps({"time": iso[:-6], "remote_addr": rec.ip, "method": "GET", "uri": "/api/handles/88.100.1/x",
                            "status": 200}),
                json.dumps({"time": iso, "remote_addr": rec.ip, "method": "GET", "uri": "/metrics", "status": 200}),
                json.dumps({"time": iso, "remote_addr": rec.ip, "method": "HEAD", "uri": "/api/handles/88.100.1/x",
                            "status": 200}),
                json.dumps({"time": iso, "remote_addr": rec.ip, "method": "POST", "uri": "/identityv2/data/batchCreate",
                            "status": 200, "handles": "88.100.1/x"}),
                json.dumps({"time": iso, "remote_addr": rec.ip, "method": "GET", "uri": "/api/handles/88.100.1/x",
                            "status": "OK"}),
            )
        return self._rng.choice(kinds)


def _minute(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


@dataclass(frozen=True)
class _HandleRecord:
    ip: str
    iface: str
    ts: datetime
    op: int
    resp: int
    elapsed_ms: int
    handle: str  # unescaped


def _handle_record(text: str) -> _HandleRecord | None:
    """One well-formed line of the node's own log (None for its malformed lines and list operations)."""
    fields = text.split(" ")
    if len(fields) != 9 or not fields[6].endswith("ms"):
        return None
    ip, iface, day, clock, op, resp, elapsed, _, handle = fields
    try:
        ts = datetime.strptime(f"{day} {clock}", '"%Y-%m-%d %H:%M:%S.%f%z"')
        rec = _HandleRecord(ip, iface, ts, int(op), int(resp), int(elapsed[:-2]), unquote(handle, errors="strict"))
    except ValueError:
        return None
    if rec.op == OP_LIST or rec.resp not in _API_STATUS or "/" not in rec.handle or len(text) > 8192:
        return None
    return rec
