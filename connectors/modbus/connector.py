"""Modbus TCP connector: sweep unit ids behind gateways, identify each device, tell reachable from active.

Per gateway and round (one TCP connection, one request in flight, since the serial side behind a gateway is
half-duplex; gateways run in parallel, at most ``max_parallel_gateways`` at once):

1. **Presence.** Read the activity holding registers of each configured unit id, no retries, ``timeout_s``.
   Present: a normal answer or an application exception 0x01-0x04. Absent: exception 0x0A / 0x0B (the
   gateway says nothing answered) or silence.
2. **Identity** of a present unit: Read Device Identification (0x2B/0x0E) basic, then regular, then the
   private serial object (``serial_object_id``, individual access), following More-Follows; for fields
   still missing, Report Server ID (0x11) read as ``"<manufacturer>;<model>;<serial>"``; for a serial
   still missing, the optional ``serial_register_profile`` (ASCII, two characters a register). With
   manufacturer, model and serial the identity is :meth:`DeviceIdentity.manufacturer_model_serial`,
   otherwise ``DeviceIdentity.local("modbus", "host:port", "<unit>")``.
3. **Status.** REACHABLE when present; ACTIVE when the activity registers differ from the previous round's
   values for the same gateway and unit. A unit's first round is therefore REACHABLE only: one round of
   history is needed before fresh data can be told from a frozen value.
4. **Echo gateways.** A misconfigured gateway answers every unit id with the same device. When at least two
   present units share one answer signature (the strong identity, or the identification fields for units
   without one) and they are more than 90% of the swept ids, the gateway is flagged (error
   ``echo_gateway``, health extra ``echo_gateways``) and the group is reported as ONE device, the lowest
   unit id's.

Modbus TCP framing is done here on a plain asyncio stream (pymodbus encodes the requests and decodes the
answers' PDUs), so every byte a peer sends is accounted for: a frame with a foreign transaction id or unit
id, a protocol id other than 0, an MBAP length out of range or disagreeing with the PDU, a truncated frame,
an undecodable PDU, a wrong function code are each a bad answer (``garbage``). Bad answers, timeouts of
present units, late answers, a gateway that never says a word (``no_answer``) and connection failures are
counted with ``count_error`` and logged once per gateway and error code until that gateway has a clean
round again; they never raise out of :meth:`ModbusConnector.observe` and never become a device: a unit that
gave any bad answer in a round is not reported in that round. Three bad answers in a row end the gateway's
sweep for the round; a stream that lost its framing is closed and reopened (twice at most a round).
Well-formed frames that answer an earlier request after it timed out (a slow gateway) are set aside and
counted as ``late_answer``, not as bad.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Self

from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest, ReadDeviceInformationResponse
from pymodbus.pdu.other_message import ReportDeviceIdRequest, ReportDeviceIdResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, ReadHoldingRegistersResponse

from connectors.base import (
    ConfigError,
    ConnectorBase,
    ConnectorHealth,
    DeviceIdentity,
    DeviceObservation,
    DeviceStatus,
    optional,
    refuse_unknown,
    require,
)

log = logging.getLogger(__name__)

KIND = "modbus"

#: Connector-level defaults; ``sample.toml`` is exactly these plus the required ``gateways``.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "timeout_s": 0.2,
        "activity_register": 0,
        "activity_register_count": 2,
        "serial_object_id": 0x80,
        "max_parallel_gateways": 32,
    }
)
#: Defaults of one ``gateways`` entry (``host`` is required, ``enterprise`` optional without default).
GATEWAY_DEFAULTS: Mapping[str, Any] = MappingProxyType({"port": 502, "unit_ids": "1-247"})

ECHO_FRACTION = 0.9  # more than this share of the swept ids with one identity: an echoing gateway
MAX_TEXT_CHARS = 64  # identification strings from a peer are cut to this length
MAX_MORE_FOLLOWS = 8  # Read Device Identification continuation requests followed per read
MAX_CONSECUTIVE_GARBAGE = 3  # a gateway that answers only garbage is given up for the round
MAX_RECONNECTS = 2  # per gateway and round
MAX_EXPIRED_REQUESTS = 64  # timed-out requests whose late answers are still recognised as late
MAX_READ_BYTES = 4096  # one socket read
MIN_MBAP_LENGTH = 2  # MBAP length field: unit id + function code ...
MAX_MBAP_LENGTH = 254  # ... + at most 252 bytes of data (a 260-byte ADU)
PRESENT_EXCEPTIONS = frozenset({0x01, 0x02, 0x03, 0x04})  # the unit answered: it exists
ABSENT_EXCEPTIONS = frozenset({0x0A, 0x0B})  # the gateway answered for a unit that did not

_USCC = re.compile(r"[0-9A-HJ-NPQRTUWXY]{18}")
_UNIT_TOKEN = re.compile(r"(\d{1,3})(?:-(\d{1,3}))?")
_FC_READ_HOLDING = 0x03
_FC_MEI = 0x2B
_FC_SERVER_ID = 0x11
_MORE_FOLLOWS = 0xFF
_MEI_READ_DEVICE_ID = 0x0E
_MBAP_HEADER = 7  # transaction id, protocol id, length, unit id


# --- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """One gateway (or PLC) to sweep."""

    host: str
    port: int = GATEWAY_DEFAULTS["port"]
    enterprise: str | None = None  # USCC of the plant's owner
    unit_ids: tuple[int, ...] = tuple(range(1, 248))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RegisterProfile:
    """Holding registers that hold the serial number as ASCII (two characters a register, high byte first)."""

    address: int
    count: int


@dataclass(frozen=True, slots=True)
class ModbusConfig:
    gateways: tuple[GatewayConfig, ...]
    timeout_s: float = DEFAULTS["timeout_s"]
    activity_register: int = DEFAULTS["activity_register"]
    activity_register_count: int = DEFAULTS["activity_register_count"]
    serial_object_id: int = DEFAULTS["serial_object_id"]
    serial_register_profile: RegisterProfile | None = None
    max_parallel_gateways: int = DEFAULTS["max_parallel_gateways"]


def parse_unit_ids(value: object, *, where: str) -> tuple[int, ...]:
    """``"1-10,20,30-40"`` or a list of integers -> sorted, distinct unit ids in 0..255."""
    ids: set[int] = set()
    if isinstance(value, str):
        tokens = [t.strip() for t in value.split(",")]
        for token in tokens:
            match = _UNIT_TOKEN.fullmatch(token)
            if match is None:
                raise ConfigError(
                    f"{where}: expected unit ids like '1-10,20,30-40', got {value!r} (bad part {token!r})"
                )
            low = int(match.group(1))
            high = int(match.group(2)) if match.group(2) is not None else low
            if low > high:
                raise ConfigError(f"{where}: range {token!r} runs backwards; expected low-high")
            ids.update(range(low, high + 1))
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, int) or isinstance(item, bool):
                raise ConfigError(f"{where}: expected a list of integers, got {type(item).__name__} {item!r}")
            ids.add(item)
    else:
        raise ConfigError(f"{where}: expected a range string or a list of integers, got {type(value).__name__}")
    if not ids:
        raise ConfigError(f"{where}: expected at least one unit id, got {value!r}")
    bad = sorted(i for i in ids if not 0 <= i <= 255)
    if bad:
        raise ConfigError(f"{where}: unit ids must be in 0..255, got {bad[:5]}")
    return tuple(sorted(ids))


def _int_in(cfg: Mapping[str, Any], key: str, default: int | None, low: int, high: int, *, where: str) -> int:
    value = require(cfg, key, int, where=where) if default is None else optional(cfg, key, int, default, where=where)
    if not low <= value <= high:
        raise ConfigError(f"{where}.{key}: expected an integer in {low}..{high}, got {value!r}")
    return int(value)


def _parse_gateway(raw: object, *, where: str) -> GatewayConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table {{host, port, enterprise, unit_ids}}, got {type(raw).__name__}")
    refuse_unknown(raw, {"host", "port", "enterprise", "unit_ids"}, where=where)
    host = require(raw, "host", str, where=where).strip()
    if not host:
        raise ConfigError(f"{where}.host: expected a host name or address, got an empty string")
    port = _int_in(raw, "port", GATEWAY_DEFAULTS["port"], 1, 65535, where=where)
    enterprise = optional(raw, "enterprise", str, None, where=where)
    if enterprise is not None and not _USCC.fullmatch(enterprise):
        raise ConfigError(
            f"{where}.enterprise: expected an 18-character unified social credit code, got {enterprise!r}"
        )
    unit_ids = parse_unit_ids(raw.get("unit_ids", GATEWAY_DEFAULTS["unit_ids"]), where=f"{where}.unit_ids")
    return GatewayConfig(host=host, port=port, enterprise=enterprise, unit_ids=unit_ids)


def parse_config(cfg: Mapping[str, Any]) -> ModbusConfig:
    """Check a ``[[connectors.modbus]]`` table; raise :class:`ConfigError` on anything unexpected."""
    where = "connectors.modbus"
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(cfg).__name__}")
    refuse_unknown(cfg, {*DEFAULTS, "gateways", "serial_register_profile"}, where=where)
    raw_gateways = require(cfg, "gateways", list, where=where)
    if not raw_gateways:
        raise ConfigError(f"{where}.gateways: expected at least one gateway, got an empty list")
    gateways = tuple(_parse_gateway(g, where=f"{where}.gateways[{i}]") for i, g in enumerate(raw_gateways))
    seen: set[str] = set()
    for gateway in gateways:
        if gateway.address in seen:
            raise ConfigError(f"{where}.gateways: {gateway.address} is listed twice; expected each gateway once")
        seen.add(gateway.address)
    timeout_s = float(optional(cfg, "timeout_s", (int, float), DEFAULTS["timeout_s"], where=where))
    if not 0.001 <= timeout_s <= 60:
        raise ConfigError(f"{where}.timeout_s: expected seconds in 0.001..60, got {timeout_s!r}")
    activity_register = _int_in(cfg, "activity_register", DEFAULTS["activity_register"], 0, 65535, where=where)
    activity_count = _int_in(
        cfg, "activity_register_count", DEFAULTS["activity_register_count"], 1, 125, where=where
    )
    if activity_register + activity_count > 65536:
        raise ConfigError(
            f"{where}: activity_register {activity_register} + activity_register_count {activity_count} "
            "runs past register 65535"
        )
    serial_object_id = _int_in(cfg, "serial_object_id", DEFAULTS["serial_object_id"], 0x80, 0xFF, where=where)
    profile = None
    if "serial_register_profile" in cfg:
        pwhere = f"{where}.serial_register_profile"
        raw_profile = require(cfg, "serial_register_profile", Mapping, where=where)
        refuse_unknown(raw_profile, {"address", "count"}, where=pwhere)
        address = _int_in(raw_profile, "address", None, 0, 65535, where=pwhere)
        count = _int_in(raw_profile, "count", None, 1, 125, where=pwhere)
        if address + count > 65536:
            raise ConfigError(f"{pwhere}: address {address} + count {count} runs past register 65535")
        profile = RegisterProfile(address=address, count=count)
    max_parallel = _int_in(cfg, "max_parallel_gateways", DEFAULTS["max_parallel_gateways"], 1, 1024, where=where)
    return ModbusConfig(
        gateways=gateways,
        timeout_s=timeout_s,
        activity_register=activity_register,
        activity_register_count=activity_count,
        serial_object_id=serial_object_id,
        serial_register_profile=profile,
        max_parallel_gateways=max_parallel,
    )


# --- one gateway's session ----------------------------------------------------------------------------


class _Failure(enum.Enum):
    SILENT = "silent"  # no answer within the timeout
    GARBAGE = "garbage"  # bytes came back that are not a fitting Modbus answer
    LOST = "lost"  # no connection (and reconnecting failed)


class _BadStream(Exception):
    """The peer's bytes are not Modbus TCP framing: the stream cannot be resynchronised, so it is closed."""


class _PeerClosed(Exception):
    """The peer closed the connection (or reset it) while an answer was awaited."""


class _WrongFrame(Exception):
    """A well-framed answer that belongs to no request in flight: wrong transaction id or wrong unit id."""


def _cut_frame(buffer: bytearray) -> bytes | None:
    """Cut one complete Modbus TCP frame (MBAP header + PDU) off the front of ``buffer``; None if incomplete."""
    if len(buffer) < _MBAP_HEADER:
        return None
    _tid, protocol_id, length = struct.unpack_from(">HHH", buffer)
    if protocol_id != 0 or not MIN_MBAP_LENGTH <= length <= MAX_MBAP_LENGTH:
        raise _BadStream(
            f"MBAP header {bytes(buffer[:_MBAP_HEADER]).hex()} (protocol id {protocol_id}, length {length}; "
            f"expected protocol id 0 and length {MIN_MBAP_LENGTH}..{MAX_MBAP_LENGTH})"
        )
    end = 6 + length
    if len(buffer) < end:
        return None
    frame = bytes(buffer[:end])
    del buffer[:end]
    return frame


def _length_problem(pdu: bytes) -> str | None:
    """Why an answer PDU disagrees with its own length fields (None if it does not), before it is decoded."""
    function_code = pdu[0]
    if function_code & 0x80:
        return None if len(pdu) == 2 else f"exception answer of {len(pdu)} bytes where 2 are expected"
    if function_code in (_FC_READ_HOLDING, _FC_SERVER_ID):
        if len(pdu) < 2 or pdu[1] != len(pdu) - 2:
            return f"byte count {pdu[1] if len(pdu) > 1 else 'missing'} in a {len(pdu)}-byte PDU"
    elif function_code == _FC_MEI and len(pdu) >= 2 and pdu[1] == _MEI_READ_DEVICE_ID:
        if len(pdu) < 7:
            return f"Read Device Identification answer of {len(pdu)} bytes, shorter than its 7-byte header"
        offset, objects = 7, 0
        while offset < len(pdu):
            if offset + 2 > len(pdu) or offset + 2 + pdu[offset + 1] > len(pdu):
                return f"object {objects + 1} runs past the end of a {len(pdu)}-byte PDU"
            offset += 2 + pdu[offset + 1]
            objects += 1
        if objects != pdu[6]:
            return f"{objects} objects where the header says {pdu[6]}"
    return None


def _text(raw: bytes) -> str | None:
    """An identification string from a peer: decoded, control characters dropped, bounded; None if empty."""
    text = raw.decode("utf-8", errors="replace")
    text = "".join(ch for ch in text if ch.isprintable())
    text = " ".join(text.split())[:MAX_TEXT_CHARS]
    return text or None


@dataclass
class _Identification:
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    server_id: str | None = None
    source: str | None = None  # which answer gave the first identity field
    adu_hex: str | None = None  # that answer, as received

    def complete(self) -> bool:
        return bool(self.manufacturer and self.model and self.serial)

    def take(self, source: str, adu_hex: str | None, **fields: str | None) -> None:
        took = False
        for name, value in fields.items():
            if value and not getattr(self, name):
                setattr(self, name, value)
                took = True
        if took and self.source is None:
            self.source, self.adu_hex = source, adu_hex


@dataclass
class _Unit:
    """A present unit, as seen in one round."""

    unit_id: int
    activity: tuple[int, ...] | None
    ident: _Identification
    observed_at: datetime

    def identity(self, address: str) -> DeviceIdentity:
        i = self.ident
        if i.manufacturer and i.model and i.serial:
            return DeviceIdentity.manufacturer_model_serial(i.manufacturer, i.model, i.serial)
        return DeviceIdentity.local(KIND, address, str(self.unit_id))

    def signature(self, address: str) -> tuple[str | None, ...]:
        """What an echoing gateway repeats for every unit id."""
        identity = self.identity(address)
        if identity.scheme != "local":
            return (identity.key(),)
        i = self.ident
        return ("local", i.manufacturer, i.model, i.serial, i.server_id)


@dataclass
class _GatewayRound:
    gateway: GatewayConfig
    units: list[_Unit] = field(default_factory=list)
    swept: int = 0
    connected: bool = False
    faults: int = 0
    echo: bool = False


class _Session:
    """One round's connection to one gateway: one request in flight, every answer checked, failures counted.

    The transport is a plain asyncio stream with Modbus TCP framing done here, so that every byte the peer
    sends is accounted for (pymodbus's client silently skips frames with a foreign transaction or unit id,
    drops buffers over 264 bytes and closes the connection after a few silences); requests and answers are
    encoded and decoded by pymodbus's PDU classes.
    """

    def __init__(self, connector: ModbusConnector, gateway: GatewayConfig, result: _GatewayRound) -> None:
        self._connector = connector
        self.gateway = gateway
        self._result = result
        self.timeout_s = connector.config.timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = bytearray()  # bytes received and not yet cut into frames
        self._tid = 0
        self._expired: dict[int, int] = {}  # transaction id -> unit id of requests given up on, oldest first
        self._decoder = DecodePDU(is_server=False)
        self.last_rx = b""  # the frame that answered the last request
        self._garbage_in_a_row = 0
        self.garbage_total = 0
        self.heard_from = False  # the peer sent any byte this round (a late or a bad answer included)
        self._reconnects = 0
        self.gave_up = False

    def fault(self, code: str, message: str, *args: object) -> None:
        self._result.faults += 1
        self._connector._fault(self.gateway.address, code, message, *args)

    async def connect(self) -> bool:
        self.close()
        try:
            async with asyncio.timeout(self.timeout_s):
                self._reader, self._writer = await asyncio.open_connection(self.gateway.host, self.gateway.port)
        except (TimeoutError, OSError) as exc:
            self.fault("connect_failed", "modbus gateway %s: cannot connect within %.3f s: %s",
                       self.gateway.address, self.timeout_s, exc or type(exc).__name__)
            return False
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        self._buffer.clear()
        self._expired.clear()  # answers to the old connection's requests cannot come on a new one

    async def request(self, pdu: ModbusPDU, expect: type[ModbusPDU]) -> ModbusPDU | _Failure:
        """Send one request and wait ``timeout_s`` for its answer (an ExceptionResponse included)."""
        if self.gave_up:
            return _Failure.LOST
        connected = self._writer is not None and not self._writer.is_closing()
        if not connected and (self._reconnects >= MAX_RECONNECTS or not await self._reconnect()):
            self.gave_up = True
            self.fault("connection_lost", "modbus gateway %s: connection lost; sweep abandoned this round",
                       self.gateway.address)
            return _Failure.LOST
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        self._tid = self._tid % 0xFFFF + 1
        tid, unit, function_code = self._tid, pdu.dev_id, pdu.function_code
        body = bytes((function_code,)) + pdu.encode()
        writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
        try:
            async with asyncio.timeout(self.timeout_s):
                frame = await self._answer(reader, tid, unit)
        except TimeoutError:
            if self._buffer:
                pending = bytes(self._buffer)
                self.close()
                return self.bad_answer("unit %d: truncated frame %s (%d bytes, then nothing within %.3f s)",
                                       unit, pending[:32].hex(), len(pending), self.timeout_s)
            self._expire(tid, unit)
            return _Failure.SILENT
        except _BadStream as exc:
            self.close()
            return self.bad_answer("unit %d: not Modbus TCP: %s", unit, exc)
        except _WrongFrame as exc:
            self._expire(tid, unit)  # its own answer, if it still comes, is late rather than foreign
            return self.bad_answer("unit %d: %s", unit, exc)
        except (_PeerClosed, OSError) as exc:
            pending = bytes(self._buffer)
            self.close()
            if pending:
                return self.bad_answer("unit %d: truncated frame %s (%d bytes, then the connection closed)",
                                       unit, pending[:32].hex(), len(pending))
            log.debug("modbus gateway %s unit %d: connection closed by the peer (%s)", self.gateway.address, unit,
                      exc or type(exc).__name__)
            return _Failure.LOST
        self.last_rx = frame
        answer_pdu = frame[_MBAP_HEADER:]
        problem = _length_problem(answer_pdu)
        response = None if problem else self._decoder.decode(answer_pdu)
        if response is None:
            return self.bad_answer("unit %d: undecodable answer %s%s", unit, frame[:32].hex(),
                                   f" ({problem})" if problem else "")
        if isinstance(response, ExceptionResponse):
            if response.function_code & 0x7F != function_code:
                return self.bad_answer("unit %d: exception for function %#x to a %#x request", unit,
                                       response.function_code & 0x7F, function_code)
        elif not isinstance(response, expect) or response.function_code != function_code:
            return self.bad_answer("unit %d: %s (function %#x) to a %#x request", unit, type(response).__name__,
                                   response.function_code, function_code)
        self._garbage_in_a_row = 0
        return response

    async def _answer(self, reader: asyncio.StreamReader, tid: int, unit: int) -> bytes:
        """The next frame that answers (tid, unit); late answers to expired requests are set aside."""
        while True:
            frame = _cut_frame(self._buffer)
            if frame is None:
                try:
                    data = await reader.read(MAX_READ_BYTES)
                except ConnectionError as exc:
                    raise _PeerClosed(str(exc)) from exc
                if not data:
                    raise _PeerClosed("end of stream")
                self._buffer += data
                self.heard_from = True
                continue
            frame_tid, frame_unit = struct.unpack_from(">H", frame)[0], frame[6]
            if frame_tid == tid and frame_unit == unit:
                return frame
            if self._expired.get(frame_tid) == frame_unit:
                del self._expired[frame_tid]
                self.fault("late_answer", "modbus gateway %s: unit %d answered after timeout_s=%.3f s and was "
                           "taken as absent; raise timeout_s if this repeats", self.gateway.address, frame_unit,
                           self.timeout_s)
                continue
            if frame_tid == tid:
                raise _WrongFrame(f"answer from unit {frame_unit} to a request for unit {unit}")
            raise _WrongFrame(f"transaction id {frame_tid} answers no request in flight (expected {tid}): "
                              f"{frame[:32].hex()}")

    def _expire(self, tid: int, unit: int) -> None:
        self._expired[tid] = unit
        if len(self._expired) > MAX_EXPIRED_REQUESTS:
            del self._expired[next(iter(self._expired))]

    async def _reconnect(self) -> bool:
        self._reconnects += 1
        return await self.connect()

    def bad_answer(self, message: str, *args: object) -> _Failure:
        self._garbage_in_a_row += 1
        self.garbage_total += 1
        self.fault("garbage", "modbus gateway %s: bad answer: " + message, self.gateway.address, *args)
        if self._garbage_in_a_row >= MAX_CONSECUTIVE_GARBAGE:
            self.gave_up = True
            self.fault("gateway_abandoned", "modbus gateway %s: %d bad answers in a row; sweep abandoned this round",
                       self.gateway.address, self._garbage_in_a_row)
        return _Failure.GARBAGE

# --- the connector -------------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ModbusConnector(ConnectorBase):
    """Counts Modbus TCP devices behind gateways; see the module docstring for the rules."""

    kind = KIND

    def __init__(self, config: ModbusConfig, *, clock: Callable[[], datetime] = _utc_now) -> None:
        super().__init__(source=",".join(g.address for g in config.gateways))
        self.config = config
        self._clock = clock
        self._previous: dict[tuple[str, int], tuple[int, ...]] = {}  # (gateway, unit) -> activity registers
        self._logged: set[tuple[str, str]] = set()  # (gateway, error code) already logged at WARNING
        self._rounds = 0
        self._gateway_health: dict[str, dict[str, Any]] = {}
        self._echo_gateways: set[str] = set()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Self:
        return cls(parse_config(cfg))

    def health(self) -> ConnectorHealth:
        return ConnectorHealth(
            kind=self.kind,
            source=self.source,
            errors=dict(self._errors),
            extra={
                "rounds": self._rounds,
                "echo_gateways": sorted(self._echo_gateways),
                "gateways": {k: dict(v) for k, v in self._gateway_health.items()},
            },
        )

    def _fault(self, address: str, code: str, message: str, *args: object) -> None:
        self.count_error(code)
        if (address, code) in self._logged:
            log.debug(message, *args)
        else:
            self._logged.add((address, code))
            log.warning(message, *args)

    async def observe(self) -> Sequence[DeviceObservation]:
        """One round over every gateway; returns one observation per present device."""
        semaphore = asyncio.Semaphore(self.config.max_parallel_gateways)

        async def limited(gateway: GatewayConfig) -> _GatewayRound:
            async with semaphore:
                return await self._sweep(gateway)

        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(limited(g), name=f"modbus sweep {g.address}") for g in self.config.gateways
            ]
        self._rounds += 1
        observations: list[DeviceObservation] = []
        previous: dict[tuple[str, int], tuple[int, ...]] = {}
        for task in tasks:
            observations.extend(self._report(task.result(), previous))
        self._previous = previous
        return observations

    async def _sweep(self, gateway: GatewayConfig) -> _GatewayRound:
        result = _GatewayRound(gateway=gateway)
        session = _Session(self, gateway, result)
        try:
            if not await session.connect():
                return result
            result.connected = True
            for unit_id in gateway.unit_ids:
                if session.gave_up:
                    break
                result.swept += 1
                unit = await self._probe(session, unit_id)
                if unit is not None:
                    result.units.append(unit)
            if not session.heard_from and not session.gave_up:
                session.fault("no_answer", "modbus gateway %s: connected, but none of %d unit ids answered within "
                              "%.3f s (a hung gateway, or nothing behind it)", gateway.address, result.swept,
                              self.config.timeout_s)
        finally:
            session.close()
        return result

    async def _probe(self, session: _Session, unit_id: int) -> _Unit | None:
        cfg = self.config
        garbage_before = session.garbage_total
        answer = await session.request(
            ReadHoldingRegistersRequest(address=cfg.activity_register, count=cfg.activity_register_count,
                                        dev_id=unit_id),
            ReadHoldingRegistersResponse,
        )
        if isinstance(answer, _Failure):
            return None
        activity: tuple[int, ...] | None = None
        if isinstance(answer, ExceptionResponse):
            if answer.exception_code in ABSENT_EXCEPTIONS:
                return None
            if answer.exception_code not in PRESENT_EXCEPTIONS:
                session.fault("unexpected_exception", "modbus gateway %s unit %d: exception %#x to a register read",
                              session.gateway.address, unit_id, answer.exception_code)
                return None
        else:
            if len(answer.registers) != cfg.activity_register_count:
                session.bad_answer("unit %d: %d registers where %d were asked", unit_id, len(answer.registers),
                                   cfg.activity_register_count)
                return None
            activity = tuple(int(r) for r in answer.registers)
        ident = await self._identify(session, unit_id)
        if session.garbage_total > garbage_before:
            log.debug("modbus gateway %s unit %d: not counted after a bad answer", session.gateway.address, unit_id)
            return None
        return _Unit(unit_id=unit_id, activity=activity, ident=ident, observed_at=self._clock())

    async def _identify(self, session: _Session, unit_id: int) -> _Identification:
        ident = _Identification()
        garbage_before = session.garbage_total

        def spoilt() -> bool:  # a bad answer: the unit is not counted this round, so stop asking it
            return session.garbage_total > garbage_before or session.gave_up

        objects, adu = await self._read_identification(session, unit_id, read_code=1, object_id=0)
        if objects is not None and not spoilt():
            ident.take("0x2B/0x0E", adu, manufacturer=objects.get(0x00), model=objects.get(0x01))
            regular, adu = await self._read_identification(session, unit_id, read_code=2, object_id=0)
            if regular:
                ident.take("0x2B/0x0E", adu, manufacturer=regular.get(0x00),
                           model=regular.get(0x01) or regular.get(0x05))
            private, adu = await self._read_identification(
                session, unit_id, read_code=4, object_id=self.config.serial_object_id
            )
            if private:
                ident.take("0x2B/0x0E", adu, serial=private.get(self.config.serial_object_id))
        if spoilt():
            return ident
        if not ident.complete():
            await self._report_server_id(session, unit_id, ident)
        profile = self.config.serial_register_profile
        if profile is not None and not ident.serial:
            answer = await session.request(
                ReadHoldingRegistersRequest(address=profile.address, count=profile.count, dev_id=unit_id),
                ReadHoldingRegistersResponse,
            )
            if isinstance(answer, ReadHoldingRegistersResponse) and len(answer.registers) == profile.count:
                raw = struct.pack(f">{profile.count}H", *(int(r) & 0xFFFF for r in answer.registers))
                ident.take("registers", session.last_rx.hex(), serial=_text(raw.replace(b"\x00", b" ")))
        return ident

    async def _read_identification(
        self, session: _Session, unit_id: int, *, read_code: int, object_id: int
    ) -> tuple[dict[int, str] | None, str | None]:
        """Read Device Identification, following More-Follows; (objects, first answer hex) or (None, None)."""
        objects: dict[int, str] = {}
        first_adu: str | None = None
        next_id = object_id
        for _ in range(MAX_MORE_FOLLOWS):
            answer = await session.request(
                ReadDeviceInformationRequest(read_code=read_code, object_id=next_id, dev_id=unit_id),
                ReadDeviceInformationResponse,
            )
            if isinstance(answer, _Failure):
                if answer is _Failure.SILENT:
                    session.fault("timeout", "modbus gateway %s unit %d: no answer to Read Device Identification",
                                  session.gateway.address, unit_id)
                break
            if not isinstance(answer, ReadDeviceInformationResponse):
                break  # an exception answer: the unit does not offer this
            if first_adu is None:
                first_adu = session.last_rx.hex()
            for oid, value in answer.information.items():
                raw = value[0] if isinstance(value, list) and value else value
                if isinstance(raw, bytes) and (text := _text(raw)) is not None:
                    objects.setdefault(int(oid), text)
            if answer.more_follows != _MORE_FOLLOWS or read_code == 4:
                break
            if answer.next_object_id <= next_id:
                session.bad_answer("unit %d: More-Follows without progress (object %#x)", unit_id,
                                   answer.next_object_id)
                break
            next_id = answer.next_object_id
        if first_adu is None:
            return None, None
        return objects, first_adu

    async def _report_server_id(self, session: _Session, unit_id: int, ident: _Identification) -> None:
        answer = await session.request(ReportDeviceIdRequest(dev_id=unit_id), ReportDeviceIdResponse)
        if answer is _Failure.SILENT:
            session.fault("timeout", "modbus gateway %s unit %d: no answer to Report Server ID",
                          session.gateway.address, unit_id)
        if not isinstance(answer, ReportDeviceIdResponse):
            return
        text = _text(bytes(answer.identifier))
        ident.server_id = text
        fields = [f.strip() for f in text.split(";")] if text else []
        if len(fields) == 3 and all(fields):
            ident.take("0x11", session.last_rx.hex(), manufacturer=fields[0], model=fields[1], serial=fields[2])

    # --- turning a gateway's round into observations -------------------------------------------------------

    def _report(
        self, result: _GatewayRound, previous: dict[tuple[str, int], tuple[int, ...]]
    ) -> list[DeviceObservation]:
        gateway = result.gateway
        address = gateway.address
        echo_units: list[_Unit] = []
        if len(result.units) >= 2 and result.swept:
            signature, count = Counter(u.signature(address) for u in result.units).most_common(1)[0]
            if count >= 2 and count > ECHO_FRACTION * result.swept:
                echo_units = [u for u in result.units if u.signature(address) == signature]
        result.echo = bool(echo_units)
        if result.echo:
            self._echo_gateways.add(address)
            self._fault(address, "echo_gateway",
                        "modbus gateway %s: %d of %d swept unit ids answer as one device; counted once",
                        address, len(echo_units), result.swept)
        else:
            self._echo_gateways.discard(address)
        echo_ids = {u.unit_id for u in echo_units[1:]}  # the lowest unit id stands for the whole group
        observations = []
        for unit in result.units:
            if unit.unit_id in echo_ids:
                continue
            key = (address, unit.unit_id)
            before = self._previous.get(key)
            status = DeviceStatus.REACHABLE
            if unit.activity is not None:
                previous[key] = unit.activity
                if before is not None and before != unit.activity:
                    status = DeviceStatus.ACTIVE
            ident = unit.ident
            evidence: dict[str, Any] = {
                "unit_id": unit.unit_id,
                "manufacturer": ident.manufacturer,
                "model": ident.model,
                "serial": ident.serial,
                "identification_source": ident.source,
                "identification_adu": ident.adu_hex,
                "activity_registers": list(unit.activity) if unit.activity is not None else None,
            }
            if ident.server_id is not None:
                evidence["server_id"] = ident.server_id
            if echo_units and unit is echo_units[0]:
                evidence["echo_gateway"] = True
                evidence["echo_unit_ids"] = len(echo_units)
            observations.append(
                DeviceObservation(
                    protocol=KIND,
                    source=address,
                    local_id=str(unit.unit_id),
                    identity=unit.identity(address),
                    status=status,
                    observed_at=unit.observed_at,
                    enterprise=gateway.enterprise,
                    evidence=evidence,
                )
            )
        self._gateway_health[address] = {
            "up": result.connected,
            "swept": result.swept,
            "present": len(result.units),
            "reported": len(observations),
            "echo": result.echo,
        }
        if result.connected and result.faults == 0 and not result.echo:
            self._logged = {entry for entry in self._logged if entry[0] != address}  # log a new outage again
        return observations
