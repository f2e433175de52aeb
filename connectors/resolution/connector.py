"""The resolution-log connector: tails a HANDLE.NET access log and counts what was appended since last time.

Each ``collect()`` reads from the remembered position to the end of the file and returns exact per-minute
counts (:class:`connectors.base.ResolutionBatch`). The position belongs to one file, named by its identity
``(st_dev, st_ino)``, never by its name:

- **rotation by rename** (logrotate's default): the old file keeps its inode, so the connector finishes it
  through the descriptor it holds, then starts the new ``access.log`` from 0;
- **copytruncate**: the file shrank, or no longer holds the bytes last read (``anchor``): the connector looks
  for the rotated copy beside it that holds those bytes at the same place, finishes that copy, then reads the
  truncated file from 0; if no copy holds them, the loss is counted (``truncated_unread``) and logged;
- **a partial last line** (no newline yet) is held back and counted once, whole, when its newline arrives;
- **restart**: with ``checkpoint_path`` set, ``(dev, ino, offset, anchor)`` is written atomically (temporary
  file, fsync, ``os.replace``) after each collection, and a new connector continues exactly there — also when
  the file was rotated by rename while it was stopped (it finds the inode among ``access.log.*``).

Reading and parsing run in a worker thread so that a large backlog does not stall the event loop.

**Commit.** By default the checkpoint is written when a round has been read. An agent that stores batches in
reports calls :meth:`ResolutionLogConnector.bind_agent` once (``explicit_commit=True``) and then
:meth:`~ResolutionLogConnector.commit` after each report is in its outbox: the checkpoint then only ever names
positions whose lines are in a stored report, so a crash in between makes the restarted agent read those lines
again instead of losing them.

**Gaps.** Minutes with no log line at all, for longer than ``gap_after_s`` between two lines (by the lines' own
timestamps, so late flushes and clock skew do not create gaps), are reported in the batch as gaps: no data,
never zero traffic. A missing log is counted (``log_missing``) and its stretch becomes a gap once lines resume.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Self

from connectors.base import (
    ConfigError,
    ConnectorBase,
    ConnectorError,
    ConnectorHealth,
    ResolutionBatch,
    optional,
    refuse_unknown,
    require,
)
from connectors.resolution.handle_log import (
    DEFAULT_MAX_LINE_BYTES,
    DEFAULT_READ_CHUNK_BYTES,
    FORMAT_HANDLE_NET,
    MIN_MAX_LINE_BYTES,
    HandleLogCounter,
    LineAssembler,
    UnknownFormatError,
    check_format,
    count_files,
    load_zone,
)
from connectors.resolution.registrations import (
    RegistrationConfig,
    RegistrationDayBatch,
    SqlRegistrationSource,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULTS",
    "CheckpointError",
    "ResolutionLogConfig",
    "ResolutionLogConnector",
    "count_files",
    "defaults",
]

WHERE = "connectors.resolution"

DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "format": FORMAT_HANDLE_NET,
        "max_line_bytes": DEFAULT_MAX_LINE_BYTES,
        "read_chunk_bytes": DEFAULT_READ_CHUNK_BYTES,
        "timezone": "Asia/Shanghai",
        "gap_after_s": 600,
        "resolution_sample_log2": 16,
        "registration_sample_log2": 10,
    }
)
REQUIRED_KEYS = ("path",)
OPTIONAL_KEYS = ("checkpoint_path", "registrations")  # optional, no default
MAX_LINE_BYTES_RANGE = (MIN_MAX_LINE_BYTES, 1 << 20)
READ_CHUNK_BYTES_RANGE = (4096, 64 << 20)
GAP_AFTER_S_RANGE = (120, 7 * 86400)
SAMPLE_LOG2_RANGE = (6, 40)
CHECKPOINT_VERSION = 1
_MAX_ROTATIONS_PER_COLLECT = 8


def defaults() -> dict[str, Any]:
    """The configuration defaults (sample.toml is exactly these plus the required ``path``)."""
    return dict(DEFAULTS)


class CheckpointError(ConnectorError):
    """The checkpoint file cannot be trusted; the connector refuses to guess where to continue."""

    code = "checkpoint_invalid"


@dataclass(frozen=True, slots=True)
class ResolutionLogConfig:
    path: Path
    format: str = FORMAT_HANDLE_NET
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    read_chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES
    checkpoint_path: Path | None = None
    timezone: str = "Asia/Shanghai"
    gap_after_s: int = 600
    resolution_sample_log2: int = 16
    registration_sample_log2: int = 10
    registrations: RegistrationConfig | None = None  # [connectors.resolution.registrations] (registrations.py)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ResolutionLogConfig:
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{WHERE}: expected a table, got {type(cfg).__name__}")
        refuse_unknown(cfg, {*DEFAULTS, *REQUIRED_KEYS, *OPTIONAL_KEYS}, where=WHERE)
        path = require(cfg, "path", str, where=WHERE)
        if not path.strip():
            raise ConfigError(f"{WHERE}.path: expected the access log's path, got an empty string")
        fmt = optional(cfg, "format", str, DEFAULTS["format"], where=WHERE)
        try:
            check_format(fmt)  # FORMATS, or json:field=key,... (api_log.py)
        except UnknownFormatError as exc:
            raise ConfigError(f"{WHERE}.{exc}") from None
        max_line_bytes = _bounded(cfg, "max_line_bytes", MAX_LINE_BYTES_RANGE)
        read_chunk_bytes = _bounded(cfg, "read_chunk_bytes", READ_CHUNK_BYTES_RANGE)
        checkpoint = optional(cfg, "checkpoint_path", str, None, where=WHERE)
        if checkpoint is not None and not checkpoint.strip():
            raise ConfigError(f"{WHERE}.checkpoint_path: expected a file path, got an empty string")
        if checkpoint is not None and Path(checkpoint) == Path(path):
            raise ConfigError(f"{WHERE}.checkpoint_path: expected a file other than the log, got {checkpoint!r}")
        zone = optional(cfg, "timezone", str, DEFAULTS["timezone"], where=WHERE)
        try:
            load_zone(zone)
        except ValueError as exc:
            raise ConfigError(f"{WHERE}.{exc}") from None
        return cls(
            path=Path(path),
            format=fmt,
            max_line_bytes=max_line_bytes,
            read_chunk_bytes=read_chunk_bytes,
            checkpoint_path=Path(checkpoint) if checkpoint is not None else None,
            timezone=zone,
            gap_after_s=_bounded(cfg, "gap_after_s", GAP_AFTER_S_RANGE),
            resolution_sample_log2=_bounded(cfg, "resolution_sample_log2", SAMPLE_LOG2_RANGE),
            registration_sample_log2=_bounded(cfg, "registration_sample_log2", SAMPLE_LOG2_RANGE),
            registrations=_registrations(cfg, path, checkpoint),
        )


def _registrations(cfg: Mapping[str, Any], path: str, checkpoint: str | None) -> RegistrationConfig | None:
    if "registrations" not in cfg:
        return None
    reg = RegistrationConfig.from_mapping(cfg["registrations"], where=f"{WHERE}.registrations")
    if reg.checkpoint_path is not None and reg.checkpoint_path in {Path(path), Path(checkpoint or path)}:
        raise ConfigError(f"{WHERE}.registrations.checkpoint_path: expected a file of its own, not the log or its "
                          f"checkpoint, got {str(reg.checkpoint_path)!r}")
    return reg


@dataclass(frozen=True, slots=True)
class RegistrationBatch:
    """What one round read from the registration source: new registrations per day (ISO date), the stretches in
    which the registry could not be read, and the sampling rate of their samples."""

    source: str  # the kind, e.g. "sql"
    days: Mapping[str, RegistrationDayBatch]
    gaps: tuple[tuple[datetime, datetime, str], ...]
    sample_log2: int


@dataclass(frozen=True, slots=True)
class ResolutionBatchWithRegistrations(ResolutionBatch):
    """A resolution batch plus what the registration source read in the same round (when one is configured)."""

    registrations: RegistrationBatch | None = None


def _bounded(cfg: Mapping[str, Any], key: str, bounds: tuple[int, int]) -> int:
    value: int = optional(cfg, key, int, DEFAULTS[key], where=WHERE)
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(f"{WHERE}.{key}: expected an integer from {low} to {high}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    dev: int
    ino: int
    offset: int  # end of the last complete line counted
    anchor: bytes  # the bytes just before offset

    @property
    def ident(self) -> tuple[int, int]:
        return (self.dev, self.ino)


class ResolutionLogConnector(ConnectorBase):
    """Counts identifier-resolution traffic in a HANDLE.NET access log (see the module docstring)."""

    kind: ClassVar[str] = "resolution"

    def __init__(self, config: ResolutionLogConfig) -> None:
        super().__init__(source=str(config.path))
        self.config = config
        self.zone = load_zone(config.timezone)  # for day roll-ups by the agent
        self._mutex = threading.Lock()  # one worker thread at a time
        self._collecting = asyncio.Lock()
        self._commit_lock = threading.Lock()
        self._carry: HandleLogCounter | None = None
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._asm = self._assembler()
        self._resume = self._load_checkpoint()
        self._saved: _Checkpoint | None = self._resume
        self._missing = False
        self._lines_total = 0
        self._malformed_total = 0
        self._rotations = 0
        self._truncations = 0
        self._salt: bytes | None = None
        self.explicit_commit = False
        self._delivered: _Checkpoint | None = None  # the position after the last batch handed to the caller
        self._last_minute: datetime | None = None  # the latest minute with a line, for gaps
        self.registrations: SqlRegistrationSource | None = None
        if config.registrations is not None:
            self.registrations = SqlRegistrationSource(
                config.registrations, zone=self.zone, sample_log2=config.registration_sample_log2)

    def bind_agent(self, *, salt: bytes | None, explicit_commit: bool = True) -> None:
        """Called once by the agent: the verifier-issued sampling salt, and whether the agent calls
        :meth:`commit` after storing each report (then a collection no longer writes the checkpoint)."""
        self._salt = salt
        self.explicit_commit = explicit_commit
        if self.registrations is not None:
            self.registrations.bind_salt(salt)

    def commit(self) -> None:
        """Everything handed out by ``collect()`` so far is stored: write the checkpoint for it."""
        with self._commit_lock:
            if self._delivered is not None:
                self._write_checkpoint(self._delivered)
        if self.registrations is not None:
            self.registrations.commit()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Self:
        return cls(ResolutionLogConfig.from_mapping(cfg))

    async def collect(self) -> ResolutionBatch:
        """Count what was appended since the last call (or since the checkpoint, or the start of the file).

        If the caller is cancelled while the worker thread reads, what it read is not lost: the next call
        returns it together with what was appended since."""
        async with self._collecting:
            counter, position = await asyncio.to_thread(self._collect)
            registrations = self.registrations
            if registrations is not None:
                await asyncio.to_thread(registrations.poll)
            self._carry = None  # delivered
            with self._commit_lock:
                self._delivered = position
            batch = self._batch(counter)
            if registrations is None:
                return batch
            days, gaps = registrations.take()
            if not self.explicit_commit:
                registrations.commit()
            part = RegistrationBatch(source=registrations.kind, days=days, gaps=tuple(gaps),
                                     sample_log2=self.config.registration_sample_log2 if self._salt else 0)
            return ResolutionBatchWithRegistrations(**{f: getattr(batch, f) for f in _BATCH_FIELDS},
                                                    registrations=part)

    def health(self) -> ConnectorHealth:
        extra: dict[str, Any] = {
            "position": self._asm.consumed,
            "lines_total": self._lines_total,
            "malformed_total": self._malformed_total,
            "rotations": self._rotations,
            "truncations": self._truncations,
        }
        errors = dict(self._errors)
        if self.registrations is not None:
            errors.update(self.registrations.errors)
            extra["registrations_source"] = self.registrations.source
            extra["registrations_watermark"] = self.registrations.watermark.isoformat()
            extra["registrations_total"] = self.registrations.new_total
        return ConnectorHealth(kind=self.kind, source=self.source, errors=errors, extra=extra)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)
        if self.registrations is not None:
            if not self.explicit_commit:
                self.registrations.commit()
            self.registrations.close()

    # --- one collection, in a worker thread ------------------------------------------------------------------

    def _collect(self) -> tuple[HandleLogCounter, _Checkpoint | None]:
        with self._mutex:
            if self._carry is None:  # else the last round was read but never delivered: add to it
                self._carry = HandleLogCounter(
                    max_line_bytes=self.config.max_line_bytes,
                    zone=self.zone,
                    salt=self._salt,
                    resolution_sample_log2=self.config.resolution_sample_log2,
                    registration_sample_log2=self.config.registration_sample_log2,
                    fmt=self.config.format,
                )
            counter = self._carry
            if self._fd is None:
                self._open_current(counter)
            if self._fd is not None:
                self._check_in_place(self._fd, counter)
                self._read_to_end(self._fd, counter)
                self._follow_rename(counter)
            position = self._position()
            if not self.explicit_commit and position is not None:
                self._write_checkpoint(position)
            return counter, position

    def _close(self) -> None:
        with self._mutex:
            if not self.explicit_commit:
                position = self._position()
                if position is not None:
                    self._write_checkpoint(position)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _assembler(self, *, consumed: int = 0, anchor: bytes = b"") -> LineAssembler:
        return LineAssembler(max_line_bytes=self.config.max_line_bytes, consumed=consumed, anchor=anchor)

    def _open_current(self, counter: HandleLogCounter) -> None:
        path = self.config.path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if not self._missing:
                log.warning("resolution log %s does not exist (yet); nothing to count", path)
            self._missing = True
            self.count_error("log_missing")
            return
        self._missing = False
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        resume, self._resume = self._resume, None
        self._asm = self._assembler()
        if resume is not None and resume.ident == ident:
            self._asm = self._assembler(consumed=resume.offset, anchor=resume.anchor)
            log.info("resolution log %s: continuing at byte %d from the checkpoint", path, resume.offset)
        elif resume is not None:
            self._finish_checkpointed_file(resume, counter)
        self._fd, self._ident = fd, ident

    def _finish_checkpointed_file(self, resume: _Checkpoint, counter: HandleLogCounter) -> None:
        """The checkpoint names a file that was rotated away while we were stopped: finish it, if it is still
        beside the log and still holds the bytes the checkpoint remembers."""
        for candidate in self._siblings():
            try:
                fd = os.open(candidate, os.O_RDONLY)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != resume.ident:
                    continue
                asm = self._assembler(consumed=resume.offset, anchor=resume.anchor)
                if not _holds(fd, asm):
                    break
                self._asm = asm
                self._read_to_end(fd, counter)
                self._asm.finish(counter)
                self._rotations += 1
                log.info(
                    "resolution log %s: finished %s, rotated while the connector was stopped", self.source, candidate
                )
                self._asm = self._assembler()
                return
            finally:
                os.close(fd)
        self.count_error("checkpoint_file_gone")
        log.warning(
            "resolution log %s: the file of the checkpoint (inode %d, byte %d) is gone or changed; lines appended "
            "to it after the checkpoint were not counted; starting the current file from its beginning",
            self.source,
            resume.ino,
            resume.offset,
        )
        self._asm = self._assembler()

    def _check_in_place(self, fd: int, counter: HandleLogCounter) -> None:
        """Truncated (copytruncate) or rewritten under us? Then finish the rotated copy and restart at 0."""
        if _holds(fd, self._asm):
            return
        self._truncations += 1
        old = self._asm
        copy = self._find_copy(old)
        if copy is not None:
            copy_fd = os.open(copy, os.O_RDONLY)
            try:
                self._read_to_end(copy_fd, counter)
            finally:
                os.close(copy_fd)
            old.finish(counter)
            log.info("resolution log %s was truncated; finished its rotated copy %s", self.source, copy)
        else:
            self.count_error("truncated_unread")
            log.warning(
                "resolution log %s was truncated and no rotated copy beside it holds the bytes before position %d; "
                "lines appended between the last collection and the truncation were not counted",
                self.source,
                old.position,
            )
            old.drop_pending(counter, "line cut off by truncation of the log")
        self._asm = self._assembler()

    def _find_copy(self, asm: LineAssembler) -> Path | None:
        if not asm.anchor and not asm.pending:
            return None
        for candidate in self._siblings():
            try:
                fd = os.open(candidate, os.O_RDONLY)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self._ident and _holds(fd, asm):
                    return candidate
            finally:
                os.close(fd)
        return None

    def _siblings(self) -> list[Path]:
        """Rotated files beside the log (``access.log.1``, ``access.log-20261126``, …), newest first."""
        path = self.config.path
        found: list[tuple[float, Path]] = []
        try:
            entries = list(path.parent.iterdir())
        except OSError:
            return []
        for entry in entries:
            name = entry.name
            if (
                name == path.name
                or not name.startswith(path.name)
                or name.endswith((".gz", ".bz2", ".xz", ".zst", ".tmp"))
                or (self.config.checkpoint_path is not None and entry == self.config.checkpoint_path)
            ):
                continue
            with contextlib.suppress(OSError):
                found.append((entry.stat().st_mtime, entry))
        return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]

    def _read_to_end(self, fd: int, counter: HandleLogCounter) -> None:
        size = self.config.read_chunk_bytes
        while chunk := os.pread(fd, size, self._asm.position):
            self._asm.push(chunk, counter)

    def _follow_rename(self, counter: HandleLogCounter) -> None:
        """If the name now points at another file, the one we hold was rotated by rename: finish it (the writer
        may have added lines before it switched), then read the new one from its beginning."""
        for _ in range(_MAX_ROTATIONS_PER_COLLECT):
            try:
                st = os.stat(self.config.path)
            except FileNotFoundError:
                return  # renamed, the new file not created yet: keep the old one
            if (st.st_dev, st.st_ino) == self._ident or self._fd is None:
                return
            self._read_to_end(self._fd, counter)
            self._asm.finish(counter)
            os.close(self._fd)
            self._fd = None
            self._rotations += 1
            log.info("resolution log %s was rotated; finished the old file at byte %d", self.source, self._asm.consumed)
            try:
                fd = os.open(self.config.path, os.O_RDONLY)
            except FileNotFoundError:
                return
            st = os.fstat(fd)
            self._fd, self._ident = fd, (st.st_dev, st.st_ino)
            self._asm = self._assembler()
            self._read_to_end(fd, counter)

    def _batch(self, counter: HandleLogCounter) -> ResolutionBatch:
        self._lines_total += counter.lines
        if counter.malformed:
            self._malformed_total += counter.malformed
            self._errors["malformed_line"] = self._errors.get("malformed_line", 0) + counter.malformed
            reasons = "; ".join(f"{n} × {reason}" for reason, n in counter.malformed_reasons.most_common(3))
            log.warning("resolution log %s: %d malformed lines (%s)", self.source, counter.malformed, reasons)
        return ResolutionBatch(
            source=self.source,
            buckets=tuple(counter.buckets()),
            lines_read=counter.lines,
            malformed_lines=counter.malformed,
            malformed_samples=tuple(counter.malformed_samples),
            created_handles=tuple(counter.created_handles()),
            created=tuple(counter.created()),
            day_shapes=dict(counter.shapes),
            gaps=tuple(self._gaps(counter)),
        )

    def _gaps(self, counter: HandleLogCounter) -> list[tuple[datetime, datetime, str]]:
        """Stretches longer than gap_after_s with no line at all, between the lines' minutes (this batch's and
        the last one's)."""
        minutes = sorted({b.minute for b in counter.buckets()})
        if not minutes:
            return []
        limit = timedelta(seconds=self.config.gap_after_s)
        gaps = []
        previous = self._last_minute
        for minute in minutes:
            if previous is not None and minute - previous > limit:
                gaps.append((previous + timedelta(minutes=1), minute, "no log lines"))
            if previous is None or minute > previous:
                previous = minute
        self._last_minute = previous
        return gaps

    # --- checkpoint ------------------------------------------------------------------------------------------

    def _load_checkpoint(self) -> _Checkpoint | None:
        target = self.config.checkpoint_path
        if target is None:
            return None
        try:
            raw = target.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"checkpoint {target}: cannot be read ({exc})") from None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"expected version {CHECKPOINT_VERSION}")
            if doc.get("path") != str(self.config.path):
                raise CheckpointError(
                    f"checkpoint {target}: belongs to {doc.get('path')!r}, not to {str(self.config.path)!r}"
                )
            values = [doc["dev"], doc["ino"], doc["offset"]]
            if not all(type(v) is int and v >= 0 for v in values):
                raise ValueError("expected non-negative integers dev, ino, offset")
            anchor = bytes.fromhex(doc["anchor"])
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {target}: expected JSON {{version, path, dev, ino, offset, anchor}}, got an unusable "
                f"file ({exc}); remove it only if counting the log again from its start is intended"
            ) from None
        return _Checkpoint(dev=values[0], ino=values[1], offset=values[2], anchor=anchor)

    def _position(self) -> _Checkpoint | None:
        if self._ident is None:
            return None
        return _Checkpoint(dev=self._ident[0], ino=self._ident[1], offset=self._asm.consumed, anchor=self._asm.anchor)

    def _write_checkpoint(self, current: _Checkpoint) -> None:
        target = self.config.checkpoint_path
        if target is None or current == self._saved:
            return
        doc = {
            "version": CHECKPOINT_VERSION,
            "path": str(self.config.path),
            "dev": current.dev,
            "ino": current.ino,
            "offset": current.offset,
            "anchor": current.anchor.hex(),
        }
        tmp = target.with_name(target.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        self._saved = current


_BATCH_FIELDS = tuple(f.name for f in fields(ResolutionBatch))


def _holds(fd: int, asm: LineAssembler) -> bool:
    """Does the file still hold, at the same place, the bytes the assembler last read?"""
    if os.fstat(fd).st_size < asm.position:
        return False
    expect = asm.anchor + asm.pending
    if not expect:
        return True
    return os.pread(fd, len(expect), asm.consumed - len(asm.anchor)) == expect


def salt_from_enrollment(enrollment: Any) -> bytes:
    """The sampling salt the verifier issued with enrollment (``resolution_salt``, base64). Enrollment records
    that have none yet fall back to the deployment's fingerprint key, which the verifier also knows."""
    salt = getattr(enrollment, "resolution_salt", None)
    if isinstance(salt, str) and salt:
        return base64.b64decode(salt, validate=True)
    log.info("enrollment carries no resolution_salt yet; sampling under the fingerprint key instead")
    key: bytes = enrollment.fingerprint_key_bytes
    return key
