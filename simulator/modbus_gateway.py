"""Simulated Modbus TCP gateways (pymodbus servers) built from a :class:`~simulator.plant.PlantSpec`.

One gateway (one TCP server on its own port) per enterprise that has Modbus devices, as a gateway sits in
one enterprise's plant. The enterprise's Modbus devices sit behind it at unit ids 1..n, each with its own
identity:

- holding registers (function 0x03): registers 0..1 are a 32-bit counter (high word first) that advances
  every ``update_interval_s`` for active devices and stays frozen for silent ones; registers 100..115 hold
  the serial number as ASCII, two characters a register, NUL padded (a "register profile");
- Read Device Identification (0x2B/0x0E): basic objects VendorName = manufacturer, ProductCode = model,
  MajorMinorRevision = "1.0"; regular objects ProductName = "<manufacturer> <model>" and ModelName = model;
  the serial number in the private object 0x80; stream access (codes 1-3) and individual access (code 4);
- Report Server ID (0x11): ``"<manufacturer>;<model>;<serial>"`` in ASCII, run indicator ON.

The counter is computed from the injected ``clock`` when it is read, so tests advance a fake clock instead of
sleeping. Unit ids without a device answer exception 0x0B (gateway target device failed to respond), as a real
gateway does for a silent serial-side device, or with ``absent="silent"`` they get no answer at all, as from
the many gateways that simply let the request time out. With ``echo=True`` every unit id answers with the
identity of the gateway's first device: a misconfigured gateway, for tests of echo detection. With
``max_objects_per_response=n`` a Read Device Identification stream answer carries at most ``n`` objects and
says More-Follows (0xFF) with the next object id, as a device with a small buffer does.

pymodbus 3.16.1 answers 0x2B/0x0E and 0x11 from one process-wide identity for every unit id, and unknown
unit ids with 0x04. So each gateway registers its own request classes for 0x2B and 0x11 (``custom_pdu``)
bound to its per-unit identities, serves a catch-all device 0 for absent ids, and rewrites every answer to
an absent id into exception 0x0B in its ``trace_pdu`` hook (or drops the request there, when silent).

The simulator plays the outside world: it imports nothing from the project but ``simulator``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from pymodbus.constants import ExcCodes, MoreData
from pymodbus.datastore import ModbusServerContext
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.mei_message import ReadDeviceInformationResponse
from pymodbus.pdu.other_message import ReportDeviceIdResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulator.mosquitto import free_port
from simulator.plant import PlantSpec
from simulator.plant import SimDevice as PlantDevice

log = logging.getLogger(__name__)

COUNTER_REGISTER = 0  # registers 0..1: 32-bit activity counter, high word first
SERIAL_REGISTER = 100  # registers 100..115: serial number, ASCII, NUL padded
SERIAL_REGISTER_COUNT = 16
REGISTER_COUNT = SERIAL_REGISTER + SERIAL_REGISTER_COUNT
SERIAL_OBJECT_ID = 0x80  # private Read Device Identification object holding the serial number
MAX_UNIT_ID = 247
_MEI_READ_DEVICE_ID = 0x0E
_CONFORMITY = 0x83  # basic, regular and extended identification; stream and individual access
ABSENT_MODES = ("0x0B", "silent")  # how a gateway treats a unit id with no device behind it


@dataclass(frozen=True)
class GatewayInfo:
    """Where one simulated gateway listens and what sits behind it."""

    host: str
    port: int
    enterprise: str  # USCC of the plant's owner
    unit_ids: list[int]  # unit ids that answer (1..247 for an echo gateway)
    device_indices: list[int]  # PlantSpec device indices; unit_ids[i] is device_indices[i] (echo: one device)
    echo: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class _Unit:
    """One device behind a gateway: what it says about itself."""

    device: PlantDevice

    def objects(self) -> dict[int, bytes]:
        d = self.device
        return {
            0x00: d.manufacturer.encode(),  # VendorName
            0x01: d.model.encode(),  # ProductCode
            0x02: b"1.0",  # MajorMinorRevision
            0x04: f"{d.manufacturer} {d.model}".encode(),  # ProductName
            0x05: d.model.encode(),  # ModelName
            SERIAL_OBJECT_ID: d.serial.encode(),
        }

    def server_id(self) -> bytes:
        d = self.device
        return f"{d.manufacturer};{d.model};{d.serial}".encode()


def _serial_registers(serial: str) -> list[int]:
    raw = serial.encode("ascii", errors="replace")[: 2 * SERIAL_REGISTER_COUNT]
    raw = raw.ljust(2 * SERIAL_REGISTER_COUNT, b"\x00")
    return list(struct.unpack(f">{SERIAL_REGISTER_COUNT}H", raw))


def _select_objects(objects: dict[int, bytes], read_code: int, object_id: int) -> dict[int, bytes] | int:
    """The objects a Read Device Identification answer carries, or an exception code (Modbus spec 6.21)."""
    if read_code == 4:  # individual access
        if object_id not in objects:
            return ExcCodes.ILLEGAL_ADDRESS
        return {object_id: objects[object_id]}
    upper = {1: 0x02, 2: 0x7F, 3: 0xFF}.get(read_code)
    if upper is None:
        return ExcCodes.ILLEGAL_VALUE
    in_category = {oid: value for oid, value in sorted(objects.items()) if oid <= upper}
    if object_id not in in_category:
        object_id = 0  # an unknown starting object restarts the stream at the beginning
    return {oid: value for oid, value in in_category.items() if oid >= object_id}


def _split(selected: dict[int, bytes], max_objects: int | None) -> tuple[dict[int, bytes], int | None]:
    """The objects that fit in one answer, and the object id to continue from (None: nothing follows)."""
    if max_objects is None or len(selected) <= max_objects:
        return selected, None
    ids = sorted(selected)
    return {oid: selected[oid] for oid in ids[:max_objects]}, ids[max_objects]


@dataclass
class _Gateway:
    """One pymodbus TCP server and the per-unit state it answers from."""

    info: GatewayInfo
    units: dict[int, _Unit]  # unit id -> device
    echo_unit: _Unit | None  # answers for every unit id when the gateway echoes
    counter: Callable[[_Unit], int]
    device_identification: bool = True  # False: 0x2B answers exception 0x01, as many PLCs do
    report_server_id: bool = True  # False: 0x11 answers exception 0x01
    absent: str = "0x0B"  # "0x0B": absent unit ids answer exception 0x0B; "silent": no answer at all
    max_objects_per_response: int | None = None  # split identification answers (More-Follows)
    server: ModbusTcpServer | None = None
    served: dict[str, int] = field(
        default_factory=lambda: {"requests": 0, "absent": 0, "silenced": 0, "identification": 0}
    )

    def unit(self, unit_id: int) -> _Unit | None:
        return self.echo_unit if self.echo_unit is not None else self.units.get(unit_id)

    # --- request handling -------------------------------------------------------------------------------

    def _register_action(self, unit: _Unit) -> Any:
        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            del function_code, address, count, set_values
            value = self.counter(unit) & 0xFFFFFFFF
            offset = COUNTER_REGISTER - start_address
            registers[offset] = value >> 16
            registers[offset + 1] = value & 0xFFFF
            return None

        return action

    def _absent_action(self) -> Any:
        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            del function_code, start_address, address, count, registers, set_values
            return ExcCodes.GATEWAY_NO_RESPONSE

        return action

    def _sim_device(self, unit_id: int, unit: _Unit | None) -> SimDevice:
        if unit is None:  # catch-all for absent unit ids: every register access answers 0x0B
            return SimDevice(
                id=unit_id,
                simdata=SimData(address=0, count=1, values=0, datatype=DataType.REGISTERS),
                action=self._absent_action(),
            )
        values = [0] * REGISTER_COUNT
        values[SERIAL_REGISTER:REGISTER_COUNT] = _serial_registers(unit.device.serial)
        return SimDevice(
            id=unit_id,
            simdata=SimData(address=0, values=values, datatype=DataType.REGISTERS),
            action=self._register_action(unit),
        )

    def _custom_pdus(self) -> list[type[ModbusPDU]]:
        gateway = self

        class ReadDeviceIdentificationPerUnit(ModbusPDU):
            """0x2B/0x0E answered from the addressed unit's own identity."""

            function_code = 0x2B
            rtu_frame_size = 7

            def __init__(self, dev_id: int = 0, transaction_id: int = 0) -> None:
                super().__init__(dev_id=dev_id, transaction_id=transaction_id)
                self.mei_type = 0
                self.read_code = 0
                self.object_id = 0

            def decode(self, data: bytes) -> None:
                self.mei_type, self.read_code, self.object_id = struct.unpack(">BBB", data[:3])

            async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
                del context
                unit = gateway.unit(device_id)
                if unit is None:
                    return ExceptionResponse(self.function_code, ExcCodes.GATEWAY_NO_RESPONSE)
                if self.mei_type != _MEI_READ_DEVICE_ID or not gateway.device_identification:
                    return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)
                selected = _select_objects(unit.objects(), self.read_code, self.object_id)
                if isinstance(selected, int):
                    return ExceptionResponse(self.function_code, selected)
                part, next_object_id = _split(selected, gateway.max_objects_per_response)
                response = ReadDeviceInformationResponse(
                    read_code=self.read_code,
                    information=dict(part),
                    dev_id=device_id,
                    transaction_id=self.transaction_id,
                )
                response.conformity = _CONFORMITY
                if next_object_id is not None:
                    response.more_follows = MoreData.KEEP_READING
                    response.next_object_id = next_object_id
                gateway.served["identification"] += 1
                return response

        class ReportServerIdPerUnit(ModbusPDU):
            """0x11 answered from the addressed unit's own identity."""

            function_code = 0x11
            rtu_frame_size = 4

            async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
                del context
                unit = gateway.unit(device_id)
                if unit is None:
                    return ExceptionResponse(self.function_code, ExcCodes.GATEWAY_NO_RESPONSE)
                if not gateway.report_server_id:
                    return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)
                return ReportDeviceIdResponse(
                    identifier=unit.server_id(), status=True, dev_id=device_id, transaction_id=self.transaction_id
                )

        return [ReadDeviceIdentificationPerUnit, ReportServerIdPerUnit]

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        """Count requests; drop requests to absent unit ids (silent) or turn their answers into 0x0B."""
        if not sending:
            self.served["requests"] += 1
            if self.absent == "silent" and self.unit(pdu.dev_id) is None:
                self.served["silenced"] += 1
                return None  # pymodbus drops a request its trace_pdu hook returns None for
            return pdu
        if self.unit(pdu.dev_id) is not None:
            return pdu
        self.served["absent"] += 1
        return ExceptionResponse(
            pdu.function_code & 0x7F,
            ExcCodes.GATEWAY_NO_RESPONSE,
            device_id=pdu.dev_id,
            transaction=pdu.transaction_id,
        )

    async def start(self) -> None:
        devices = [self._sim_device(uid, unit) for uid, unit in sorted(self.units.items())]
        devices.append(self._sim_device(0, self.echo_unit))  # catch-all: absent ids, or the echo
        if self.echo_unit is not None:
            devices = devices[-1:]
        server = ModbusTcpServer(
            devices,
            address=(self.info.host, self.info.port),
            trace_pdu=self._trace_pdu,  # type: ignore[arg-type]  # None drops the request
            custom_pdu=self._custom_pdus(),
        )
        await server.serve_forever(background=True)
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()  # type: ignore[no-untyped-call]
            self.server = None


class ModbusPlant:
    """The plant's Modbus gateways: one pymodbus TCP server per enterprise with Modbus devices.

    ``clock`` (seconds, monotonic) drives the activity counters; tests inject one and advance it instead
    of sleeping. ``echo=True`` makes every gateway answer every unit id 1..247 with its first device.
    ``device_identification=False`` / ``report_server_id=False`` make the units answer 0x2B / 0x11 with
    exception 0x01 (illegal function), for tests of the identification fallbacks. ``absent`` is one of
    :data:`ABSENT_MODES`; ``max_objects_per_response`` splits identification answers with More-Follows.
    """

    def __init__(
        self,
        spec: PlantSpec,
        *,
        host: str = "127.0.0.1",
        base_port: int | None = None,
        update_interval_s: float = 0.5,
        echo: bool = False,
        device_identification: bool = True,
        report_server_id: bool = True,
        absent: str = "0x0B",
        max_objects_per_response: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if update_interval_s <= 0:
            raise ValueError(f"update_interval_s must be > 0, got {update_interval_s!r}")
        if base_port is not None and not 1 <= base_port <= 65535:
            raise ValueError(f"base_port must be in 1..65535, got {base_port!r}")
        if absent not in ABSENT_MODES:
            raise ValueError(f"absent must be one of {ABSENT_MODES}, got {absent!r}")
        if max_objects_per_response is not None and max_objects_per_response < 1:
            raise ValueError(f"max_objects_per_response must be >= 1 or None, got {max_objects_per_response!r}")
        self.spec = spec
        self.host = host
        self.base_port = base_port
        self.update_interval_s = update_interval_s
        self.echo = echo
        self.device_identification = device_identification
        self.report_server_id = report_server_id
        self.absent = absent
        self.max_objects_per_response = max_objects_per_response
        self._clock = clock
        self._t0 = clock()
        self._gateways: list[_Gateway] = []

    def _counter(self, unit: _Unit) -> int:
        if not unit.device.active:
            return 1000 + unit.device.index  # silent: frozen
        return 1000 + unit.device.index + int((self._clock() - self._t0) / self.update_interval_s)

    def _plan(self) -> list[tuple[str, list[PlantDevice]]]:
        modbus = self.spec.on("modbus")
        plan = []
        for enterprise in self.spec.enterprises:
            devices = [d for d in modbus if d.enterprise == enterprise.uscc]
            if devices:
                plan.append((enterprise.uscc, devices))
        return plan

    @property
    def gateways(self) -> list[GatewayInfo]:
        return [g.info for g in self._gateways]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per gateway address: requests received, answers turned into 0x0B for absent unit ids (``absent``),
        requests to absent unit ids left unanswered (``silenced``), identification answers sent."""
        return {g.info.address: dict(g.served) for g in self._gateways}

    async def start(self) -> None:
        if self._gateways:
            raise RuntimeError("ModbusPlant already started")
        self._t0 = self._clock()
        try:
            for k, (enterprise, devices) in enumerate(self._plan()):
                self._gateways.append(await self._start_gateway(k, enterprise, devices))
        except BaseException:
            await self.stop()
            raise

    async def _start_gateway(self, k: int, enterprise: str, devices: list[PlantDevice]) -> _Gateway:
        if len(devices) > MAX_UNIT_ID:
            raise ValueError(
                f"enterprise {enterprise} has {len(devices)} Modbus devices; one gateway holds at most {MAX_UNIT_ID}"
            )
        units = {uid: _Unit(d) for uid, d in enumerate(devices, start=1)}
        echo_unit = units[1] if self.echo else None
        attempts = 1 if self.base_port is not None else 5
        for attempt in range(attempts):
            port = self.base_port + k if self.base_port is not None else free_port()
            info = GatewayInfo(
                host=self.host,
                port=port,
                enterprise=enterprise,
                unit_ids=list(range(1, MAX_UNIT_ID + 1)) if self.echo else sorted(units),
                device_indices=[devices[0].index] if self.echo else [d.index for d in devices],
                echo=self.echo,
            )
            gateway = _Gateway(
                info=info,
                units=units,
                echo_unit=echo_unit,
                counter=self._counter,
                device_identification=self.device_identification,
                report_server_id=self.report_server_id,
                absent=self.absent,
                max_objects_per_response=self.max_objects_per_response,
            )
            try:
                await gateway.start()
            except RuntimeError:
                if attempt + 1 == attempts:
                    raise
                log.debug("port %d was taken, trying another", port)
                continue
            log.info(
                "modbus gateway for %s on %s: %d units%s", enterprise, info.address, len(units),
                " (echo)" if self.echo else "",
            )
            return gateway
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        gateways, self._gateways = self._gateways, []
        for gateway in gateways:
            await gateway.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def run_modbus_plant(
    spec: PlantSpec,
    *,
    host: str = "127.0.0.1",
    base_port: int | None = None,
    update_interval_s: float = 0.5,
    echo: bool = False,
    absent: str = "0x0B",
    max_objects_per_response: int | None = None,
    on_ready: Callable[[list[GatewayInfo]], None] | None = None,
) -> None:
    """Serve the plant's Modbus gateways until cancelled; ``on_ready`` gets the gateways once listening."""
    async with ModbusPlant(
        spec, host=host, base_port=base_port, update_interval_s=update_interval_s, echo=echo, absent=absent,
        max_objects_per_response=max_objects_per_response,
    ) as plant:
        if on_ready is not None:
            on_ready(plant.gateways)
        await asyncio.Event().wait()
