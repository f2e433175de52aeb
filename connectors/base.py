"""The connector contract and the typed observations every connector returns.

A connector is one small contract (STYLE.md, example 1):

- ``kind``: a class attribute naming the source (``"opcua"``, ``"modbus"``, ``"mqtt"``, ``"resolution"``);
- ``from_config(cfg)``: build from a mapping (a TOML table); static configuration errors raise
  :class:`ConfigError` here, never half-way through a collection;
- ``async observe()``: one collection round, returning observations;
- ``async aclose()``: release sockets and tasks; the connector is an async context manager.

Connectors never sign, store or send anything; the agent does that.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self, runtime_checkable


class ConnectorError(Exception):
    """Base of every connector error; ``code`` is stable and machine-readable."""

    code: ClassVar[str] = "connector_error"


class ConfigError(ConnectorError, ValueError):
    """A configuration was refused. The message says what was expected and what arrived."""

    code = "config_invalid"


class DeviceStatus(enum.IntEnum):
    """The three tiers every device count is reported in; higher includes lower."""

    REGISTERED = 1  # declared (in an address space, a BIRTH, a configured list)
    REACHABLE = 2  # answered a probe in the window
    ACTIVE = 3  # fresh data of good quality in the window


def _norm(text: str) -> str:
    """Normalise one identity part: NFKC, surrounding space stripped, inner runs of space folded."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """The strongest identity a protocol gave for one physical device.

    ``key()`` is the canonical string that is fingerprinted: the same device seen through several
    protocols or by several agents gives the same key when the protocols expose the same identity.
    Strength, strongest first: ``uri`` (OPC UA ProductInstanceUri), ``msn`` (manufacturer + model +
    serial number), ``local`` (a protocol-local name such as a Sparkplug group/edge/device, or a
    gateway + unit id), which only ever matches itself.
    """

    scheme: str  # "uri" | "msn" | "local"
    parts: tuple[str, ...]

    SCHEMES: ClassVar[tuple[str, ...]] = ("uri", "msn", "local")

    def __post_init__(self) -> None:
        if self.scheme not in self.SCHEMES:
            raise ValueError(f"identity scheme must be one of {self.SCHEMES}, got {self.scheme!r}")
        if not self.parts or any(not _norm(p) for p in self.parts):
            raise ValueError(f"identity parts must be non-empty strings, got {self.parts!r}")

    @classmethod
    def product_instance_uri(cls, uri: str) -> DeviceIdentity:
        return cls("uri", (_norm(uri),))

    @classmethod
    def manufacturer_model_serial(cls, manufacturer: str, model: str, serial: str) -> DeviceIdentity:
        # Manufacturer and model compare case-insensitively; the serial number is kept as written.
        return cls("msn", (_norm(manufacturer).casefold(), _norm(model).casefold(), _norm(serial)))

    @classmethod
    def local(cls, protocol: str, *names: str) -> DeviceIdentity:
        return cls("local", (protocol, *(_norm(n) for n in names)))

    @property
    def strength(self) -> int:
        return len(self.SCHEMES) - self.SCHEMES.index(self.scheme)

    def key(self) -> str:
        return self.scheme + ":" + "|".join(self.parts)


@dataclass(frozen=True, slots=True)
class DeviceObservation:
    """What one connector saw of one device in one collection round."""

    protocol: str  # the connector kind that saw it
    source: str  # endpoint URL, gateway host:port, broker host:port
    local_id: str  # node id, unit id, group/edge/device
    identity: DeviceIdentity
    status: DeviceStatus
    observed_at: datetime  # timezone-aware
    enterprise: str | None = None  # unified social credit code (统一社会信用代码), when the source names it
    # Raw protocol evidence for a sample (Modbus ADU hex, OPC UA DataValue with both timestamps,
    # MQTT topic + payload hash + receive time). Small, JSON-serialisable values only.
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConnectorHealth:
    """Counters a connector keeps about itself (exposed as metrics, carried in reports)."""

    kind: str
    source: str
    errors: Mapping[str, int] = field(default_factory=dict)  # error code -> count since start
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. broker $SYS corroboration


@runtime_checkable
class DeviceConnector(Protocol):
    """A device source (OPC UA, Modbus, MQTT)."""

    kind: ClassVar[str]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Self: ...

    async def observe(self) -> Sequence[DeviceObservation]: ...

    def health(self) -> ConnectorHealth: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class ConnectorBase:
    """Shared plumbing: async context manager and error counters. Subclasses set ``kind``."""

    kind: ClassVar[str] = ""

    def __init__(self, *, source: str) -> None:
        self.source = source
        self._errors: dict[str, int] = {}

    def count_error(self, code: str) -> None:
        self._errors[code] = self._errors.get(code, 0) + 1

    def health(self) -> ConnectorHealth:
        return ConnectorHealth(kind=self.kind, source=self.source, errors=dict(self._errors))

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def require(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, where: str) -> Any:
    """Fetch a required key of the given type or raise ConfigError naming what was expected and what came."""
    if key not in cfg:
        raise ConfigError(f"{where}: missing required key {key!r}")
    value = cfg[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ConfigError(f"{where}.{key}: expected {_type_names(kind)}, got {type(value).__name__} {value!r}")
    return value


def optional(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any, *, where: str) -> Any:
    if key not in cfg:
        return default
    return require(cfg, key, kind, where=where)


def refuse_unknown(cfg: Mapping[str, Any], known: set[str], *, where: str) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected only {sorted(known)}")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(kind))


# --- identifier-resolution traffic -------------------------------------------------------------------------

# HANDLE.NET opCodes and response codes the counting distinguishes (others are kept by number).
OP_RESOLUTION = 1
OP_CREATE = 100
OP_DELETE = 101
RC_SUCCESS = 1
RC_NOT_FOUND = 100


@dataclass(frozen=True, slots=True)
class ResolutionBucket:
    """Exact count of log lines in one 60-second bucket with one (opCode, respCode, transport)."""

    minute: datetime  # timezone-aware start of the minute
    op_code: int
    resp_code: int
    transport: str  # "UDP", "TCP", "HTTP"
    count: int


@dataclass(frozen=True, slots=True)
class ResolutionBatch:
    """What one collection round of a resolution-log connector read."""

    source: str
    buckets: Sequence[ResolutionBucket]
    lines_read: int
    malformed_lines: int = 0
    malformed_samples: Sequence[str] = ()  # a few malformed lines, for the error report
    created_handles: Sequence[str] = ()  # handles successfully created in this round (for Merkle roots, samples)
    # Issue 4 (optional): creates with their minute, per-day shape (connectors.resolution.shape.DayShape by ISO
    # date), and stretches with no log data at all: (start, end, reason).
    created: Sequence[tuple[datetime, str]] = ()
    day_shapes: Mapping[str, Any] = field(default_factory=dict)
    gaps: Sequence[tuple[datetime, datetime, str]] = ()


@runtime_checkable
class ResolutionConnector(Protocol):
    """A source of identifier-resolution traffic (HANDLE.NET access logs and the like)."""

    kind: ClassVar[str]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Self: ...

    async def collect(self) -> ResolutionBatch: ...

    def health(self) -> ConnectorHealth: ...

    async def aclose(self) -> None: ...
