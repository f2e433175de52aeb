"""Modbus TCP: the simulated gateways (real pymodbus servers on free ports) and the Modbus connector."""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ExceptionResponse
from pymodbus.pdu.mei_message import ReadDeviceInformationResponse
from pymodbus.pdu.other_message import ReportDeviceIdResponse

from connectors.base import ConfigError, DeviceConnector, DeviceIdentity, DeviceObservation, DeviceStatus
from connectors.modbus import DEFAULTS, GATEWAY_DEFAULTS, ModbusConnector, parse_unit_ids
from simulator.modbus_gateway import GatewayInfo, ModbusPlant, run_modbus_plant
from simulator.mosquitto import free_port
from simulator.plant import PlantSpec, SimDevice, make_plant

SAMPLE = Path(__file__).resolve().parent.parent / "connectors" / "modbus" / "sample.toml"
README = SAMPLE.with_name("README.md")


class FakeClock:
    """Seconds for the simulated counters; tests advance it instead of sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spec() -> PlantSpec:
    return make_plant()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def plant(spec: PlantSpec, clock: FakeClock) -> AsyncIterator[ModbusPlant]:
    async with ModbusPlant(spec, update_interval_s=0.5, clock=clock) as p:
        yield p


def config_for(gateways: list[GatewayInfo], unit_ids: str = "1-20", **extra: Any) -> dict[str, Any]:
    return {
        "gateways": [
            {"host": g.host, "port": g.port, "enterprise": g.enterprise, "unit_ids": unit_ids} for g in gateways
        ],
        **extra,
    }


def msn(device: SimDevice) -> str:
    return DeviceIdentity.manufacturer_model_serial(device.manufacturer, device.model, device.serial).key()


def by_key(observations: list[DeviceObservation] | Any) -> dict[str, DeviceObservation]:
    keys = [o.identity.key() for o in observations]
    assert len(keys) == len(set(keys)), f"a device was reported twice: {keys}"
    return {o.identity.key(): o for o in observations}


# --- the simulator ------------------------------------------------------------------------------------


async def test_simulator_gives_each_unit_its_own_identity_and_absent_ids_0x0B(
    spec: PlantSpec, plant: ModbusPlant
) -> None:
    gateway = next(g for g in plant.gateways if len(g.unit_ids) >= 2)
    devices = {d.index: d for d in spec.devices}
    client = AsyncModbusTcpClient(gateway.host, port=gateway.port, timeout=1, retries=0, reconnect_delay=0)
    await client.connect()
    try:
        for unit_id, index in zip(gateway.unit_ids[:2], gateway.device_indices[:2], strict=True):
            device = devices[index]
            basic = await client.read_device_information(read_code=1, device_id=unit_id)
            assert isinstance(basic, ReadDeviceInformationResponse)
            assert basic.information == {0: device.manufacturer.encode(), 1: device.model.encode(), 2: b"1.0"}
            private = await client.read_device_information(read_code=4, object_id=0x80, device_id=unit_id)
            assert isinstance(private, ReadDeviceInformationResponse)
            assert private.information == {0x80: device.serial.encode()}
            server_id = await client.report_device_id(device_id=unit_id)
            assert isinstance(server_id, ReportDeviceIdResponse)
            assert server_id.identifier == f"{device.manufacturer};{device.model};{device.serial}".encode()
            profile = await client.read_holding_registers(100, count=16, device_id=unit_id)
            raw = b"".join(r.to_bytes(2, "big") for r in profile.registers)
            assert raw.rstrip(b"\x00") == device.serial.encode()
        absent = max(gateway.unit_ids) + 1
        for answer in (
            await client.read_holding_registers(0, count=2, device_id=absent),
            await client.read_device_information(read_code=1, device_id=absent),
            await client.report_device_id(device_id=absent),
        ):
            assert isinstance(answer, ExceptionResponse)
            assert answer.exception_code == 0x0B
    finally:
        client.close()


async def test_run_modbus_plant_serves_until_cancelled(spec: PlantSpec) -> None:
    ready: asyncio.Queue[list[GatewayInfo]] = asyncio.Queue()
    task = asyncio.create_task(run_modbus_plant(spec, on_ready=ready.put_nowait))
    try:
        gateways = await asyncio.wait_for(ready.get(), timeout=10)
        assert sum(len(g.device_indices) for g in gateways) == len(spec.on("modbus"))
        async with ModbusConnector.from_config(config_for(gateways, unit_ids="1-4")) as connector:
            assert len(await connector.observe()) == len(spec.on("modbus"))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- the connector against real gateways -------------------------------------------------------------


async def test_one_round_finds_every_gateways_devices_with_their_identities(
    spec: PlantSpec, plant: ModbusPlant
) -> None:
    assert len(plant.gateways) >= 2, "the plant must have several gateways for this test to mean anything"
    async with ModbusConnector.from_config(config_for(plant.gateways)) as connector:
        assert isinstance(connector, DeviceConnector)
        observations = list(await connector.observe())
    expected = {msn(d): d for d in spec.on("modbus")}
    seen = by_key(observations)
    assert set(seen) == set(expected)
    assert len(seen) == spec.ground_truth()["per_protocol"]["modbus"]  # type: ignore[index]
    for key, obs in seen.items():
        device = expected[key]
        assert obs.enterprise == device.enterprise
        assert obs.protocol == "modbus"
        assert obs.status is DeviceStatus.REACHABLE  # first round: no history to tell fresh data from frozen
        assert obs.evidence["manufacturer"] == device.manufacturer
        assert obs.evidence["model"] == device.model
        assert obs.evidence["serial"] == device.serial
        adu = bytes.fromhex(obs.evidence["identification_adu"])
        assert adu[7:9] == b"\x2b\x0e" and device.manufacturer.encode() in adu
    # Every gateway contributed in the same round, and absent ids were answered 0x0B but not counted.
    assert {o.source for o in observations} == {g.address for g in plant.gateways}
    for gateway in plant.gateways:
        assert plant.stats()[gateway.address]["absent"] >= 20 - len(gateway.unit_ids)
    assert connector.health().errors == {}


async def test_identification_split_over_several_answers_is_followed_with_more_follows(
    spec: PlantSpec, clock: FakeClock
) -> None:
    async with ModbusPlant(spec, max_objects_per_response=1, clock=clock) as p:
        gateway = p.gateways[0]
        client = AsyncModbusTcpClient(gateway.host, port=gateway.port, timeout=1, retries=0, reconnect_delay=0)
        await client.connect()
        try:  # the simulator really splits: one object an answer, More-Follows 0xFF and the next object id
            first = await client.read_device_information(read_code=1, object_id=0, device_id=1)
        finally:
            client.close()
        assert isinstance(first, ReadDeviceInformationResponse)
        assert (len(first.information), first.more_follows, first.next_object_id) == (1, 0xFF, 0x01)
        before = sum(s["identification"] for s in p.stats().values())
        async with ModbusConnector.from_config(config_for(p.gateways, unit_ids="1-4")) as connector:
            observations = list(await connector.observe())
            health = connector.health()
        answers = sum(s["identification"] for s in p.stats().values()) - before
    assert set(by_key(observations)) == {msn(d) for d in spec.on("modbus")}
    assert {o.evidence["identification_source"] for o in observations} == {"0x2B/0x0E"}
    assert health.errors == {}
    # Per device: basic 3 objects (3 answers), regular 0x00-0x05 without 0x03 (5), the private serial (1).
    assert answers == 9 * len(observations)


async def test_absent_ids_that_stay_silent_cost_a_timeout_each_and_are_not_counted(
    spec: PlantSpec, clock: FakeClock
) -> None:
    async with ModbusPlant(spec, absent="silent", clock=clock) as p:
        cfg = config_for(p.gateways, unit_ids="1-6", timeout_s=0.03)
        async with ModbusConnector.from_config(cfg) as connector:
            observations = list(await connector.observe())
            health = connector.health()
        stats = p.stats()
    assert set(by_key(observations)) == {msn(d) for d in spec.on("modbus")}
    assert health.errors == {}
    for gateway in p.gateways:
        assert stats[gateway.address]["absent"] == 0  # no 0x0B: the absent ids were simply not answered
        assert stats[gateway.address]["silenced"] == 6 - len(gateway.unit_ids) > 0
        assert health.extra["gateways"][gateway.address]["swept"] == 6


async def test_silent_devices_stay_reachable_while_active_ones_turn_active(
    spec: PlantSpec, plant: ModbusPlant, clock: FakeClock
) -> None:
    silent = {msn(d) for d in spec.on("modbus") if not d.active}
    active = {msn(d) for d in spec.on("modbus") if d.active}
    assert silent and active, "the plant must have both silent and active Modbus devices"
    async with ModbusConnector.from_config(config_for(plant.gateways)) as connector:
        await connector.observe()
        clock.now += 1.0  # two counter periods
        second = by_key(list(await connector.observe()))
    assert {k for k, o in second.items() if o.status is DeviceStatus.ACTIVE} == active
    assert {k for k, o in second.items() if o.status is DeviceStatus.REACHABLE} == silent
    assert len(active) == spec.ground_truth()["per_protocol_active"]["modbus"]  # type: ignore[index]


async def test_echo_gateway_is_flagged_and_counted_as_one_device(spec: PlantSpec, clock: FakeClock) -> None:
    async with ModbusPlant(spec, echo=True, clock=clock) as echo_plant:
        gateway = echo_plant.gateways[0]
        assert gateway.echo and len(gateway.unit_ids) == 247
        async with ModbusConnector.from_config(config_for([gateway])) as connector:
            observations = list(await connector.observe())
            health = connector.health()
    first = next(d for d in spec.devices if d.index == gateway.device_indices[0])
    assert [o.identity.key() for o in observations] == [msn(first)]
    assert observations[0].evidence["echo_gateway"] is True
    assert observations[0].evidence["echo_unit_ids"] == 20
    assert health.errors["echo_gateway"] == 1
    assert health.extra["echo_gateways"] == [gateway.address]


async def test_a_normal_gateway_is_not_flagged_as_echo(plant: ModbusPlant) -> None:
    gateway = max(plant.gateways, key=lambda g: len(g.unit_ids))
    # Sweep only the ids that answer: 100% present, but each with its own identity.
    cfg = config_for([gateway], unit_ids=f"1-{len(gateway.unit_ids)}")
    async with ModbusConnector.from_config(cfg) as connector:
        observations = await connector.observe()
        health = connector.health()
    assert len(observations) == len(gateway.unit_ids) >= 2
    assert "echo_gateway" not in health.errors
    assert health.extra["echo_gateways"] == []


def _http_error(request: bytes) -> bytes:
    """A non-Modbus service on the gateway's port."""
    return b"HTTP/1.1 400 Bad Request\r\n\r\n"


def _framed(pdu: bytes) -> Callable[[bytes], bytes]:
    """A well-framed answer (same transaction and unit id) carrying the same PDU whatever was asked."""

    def answer(request: bytes) -> bytes:
        return request[:4] + (len(pdu) + 1).to_bytes(2, "big") + request[6:7] + pdu

    return answer


async def _garbage_server(
    port: int, answer: Callable[[bytes], bytes] = _http_error, connections: list[int] | None = None
) -> asyncio.Server:
    """A peer that answers every request with ``answer(request)``; ``connections`` gets one entry a connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if connections is not None:
            connections.append(1)
        try:
            while request := await reader.read(260):
                writer.write(answer(request))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_down_and_garbage_gateways_are_counted_and_the_others_still_seen(
    spec: PlantSpec, plant: ModbusPlant
) -> None:
    down_port, garbage_port = free_port(), free_port()
    garbage = await _garbage_server(garbage_port)
    try:
        cfg = config_for(plant.gateways, timeout_s=0.05)
        cfg["gateways"] += [
            {"host": "127.0.0.1", "port": down_port, "unit_ids": "1-5"},
            {"host": "127.0.0.1", "port": garbage_port, "unit_ids": "1-5"},
        ]
        async with ModbusConnector.from_config(cfg) as connector:
            observations = list(await connector.observe())
            health = connector.health()
    finally:
        garbage.close()
        await garbage.wait_closed()
    assert set(by_key(observations)) == {msn(d) for d in spec.on("modbus")}
    assert {o.source for o in observations} == {g.address for g in plant.gateways}
    assert health.errors["connect_failed"] == 1
    assert health.errors["garbage"] == 3  # then the sweep of that gateway is given up for the round
    assert health.errors["gateway_abandoned"] == 1
    gateways = health.extra["gateways"]
    assert gateways[f"127.0.0.1:{down_port}"]["up"] is False
    assert gateways[f"127.0.0.1:{garbage_port}"]["present"] == 0


def _mbap(tid: int, unit: int, pdu: bytes, *, protocol_id: int = 0, length: int | None = None) -> bytes:
    size = len(pdu) + 1 if length is None else length
    return tid.to_bytes(2, "big") + protocol_id.to_bytes(2, "big") + size.to_bytes(2, "big") + bytes([unit]) + pdu


def _tid(request: bytes) -> int:
    return int.from_bytes(request[:2], "big")


@pytest.mark.parametrize(
    ("answer", "logged"),
    [
        pytest.param(_http_error, "not Modbus TCP: MBAP header 485454", id="not-modbus"),
        pytest.param(lambda r: b"A" * 1000, "not Modbus TCP: MBAP header 414141", id="flood"),
        pytest.param(_framed(b"\x04\x04\x00\x01\x00\x02"), "ReadInputRegistersResponse (function 0x4)",
                     id="wrong-function-echo"),
        pytest.param(_framed(b"\x03\x04\x00\x01\x00\x02"), "(function 0x3) to a 0x2b request",
                     id="registers-to-everything"),
        pytest.param(_framed(b"\x83"), "exception answer of 1 bytes", id="exception-without-code"),
        pytest.param(_framed(b"\x2b\x0e"), "shorter than its 7-byte header", id="undecodable"),
        pytest.param(_framed(b"\x03\x02\x00\x01"), "1 registers where 2 were asked", id="short-read"),
        pytest.param(_framed(b"\x03\x04\x00\x01"), "byte count 4 in a 4-byte PDU", id="byte-count-too-big"),
        pytest.param(lambda r: _mbap(_tid(r) + 1000, r[6], b"\x03\x04\x00\x01\x00\x02"),
                     "transaction id", id="wrong-transaction-id"),
        pytest.param(lambda r: _mbap(_tid(r), r[6] + 1, b"\x03\x04\x00\x01\x00\x02"),
                     "answer from unit 2 to a request for unit 1", id="wrong-unit-id"),
        pytest.param(lambda r: _mbap(_tid(r), r[6], b"\x03\x04\x00\x01\x00\x02", protocol_id=7),
                     "protocol id 7", id="wrong-protocol-id"),
        pytest.param(lambda r: _mbap(_tid(r), r[6], b"\x03\x04\x00\x01\x00\x02", length=40),
                     "truncated frame", id="mbap-length-too-long"),
        pytest.param(lambda r: _mbap(_tid(r), r[6], b"\x03\x04\x00\x01\x00\x02", length=3),
                     "byte count 4 in a 2-byte PDU", id="mbap-length-too-short"),
        pytest.param(lambda r: r[:5], "truncated frame", id="truncated-mbap"),
    ],
)
async def test_a_peer_answering_garbage_is_counted_logged_and_never_a_device(
    answer: Callable[[bytes], bytes], logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    server = await _garbage_server(port, answer)
    try:
        cfg = {"gateways": [{"host": "127.0.0.1", "port": port, "unit_ids": "1-4"}], "timeout_s": 0.05}
        with caplog.at_level(logging.WARNING, logger="connectors.modbus.connector"):
            async with ModbusConnector.from_config(cfg) as connector:
                observations = await connector.observe()
                health = connector.health()
    finally:
        server.close()
        await server.wait_closed()
    assert list(observations) == []
    assert health.errors["garbage"] >= 1
    assert health.extra["gateways"][f"127.0.0.1:{port}"]["present"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "connectors.modbus.connector"]
    bad = [m for m in warnings if ": bad answer: " in m]
    assert len(bad) == 1, warnings  # one clear line per gateway and error code; repeats go to DEBUG
    assert f"modbus gateway 127.0.0.1:{port}: bad answer: unit 1: " in bad[0]
    assert logged in bad[0]


async def test_more_follows_without_progress_is_garbage_and_the_unit_not_counted() -> None:
    def answer(request: bytes) -> bytes:
        if request[7] == 0x03:
            return _framed(b"\x03\x04\x00\x01\x00\x02")(request)
        if request[7] == 0x2B:  # More-Follows, but the next object id goes back to the start
            return _framed(b"\x2b\x0e\x01\x83\xff\x00\x01\x00\x03ACM")(request)
        return _framed(bytes([request[7] | 0x80, 0x01]))(request)

    port = free_port()
    server = await _garbage_server(port, answer)
    try:
        cfg = {"gateways": [{"host": "127.0.0.1", "port": port, "unit_ids": "1"}], "timeout_s": 0.05}
        async with ModbusConnector.from_config(cfg) as connector:
            observations = await connector.observe()
            health = connector.health()
    finally:
        server.close()
        await server.wait_closed()
    assert list(observations) == []
    assert health.errors == {"garbage": 1}


async def test_a_peer_that_hangs_is_counted_and_never_a_device(caplog: pytest.LogCaptureFixture) -> None:
    """A gateway that accepts the connection and reads every request but never answers anything."""
    port = free_port()
    server = await _garbage_server(port, lambda request: b"")
    try:
        cfg = {"gateways": [{"host": "127.0.0.1", "port": port, "unit_ids": "1-4"}], "timeout_s": 0.03}
        with caplog.at_level(logging.WARNING, logger="connectors.modbus.connector"):
            async with ModbusConnector.from_config(cfg) as connector:
                observations = await connector.observe()
                health = connector.health()
    finally:
        server.close()
        await server.wait_closed()
    assert list(observations) == []
    assert health.errors == {"no_answer": 1}
    assert health.extra["gateways"][f"127.0.0.1:{port}"] == {
        "up": True, "swept": 4, "present": 0, "reported": 0, "echo": False
    }
    assert any("none of 4 unit ids answered within 0.030 s" in r.getMessage() for r in caplog.records)


async def test_a_peer_that_hangs_up_on_every_request_is_counted_connection_lost() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(260)
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        cfg = {"gateways": [{"host": "127.0.0.1", "port": port, "unit_ids": "1-10"}], "timeout_s": 0.05}
        async with ModbusConnector.from_config(cfg) as connector:
            observations = await connector.observe()
            health = connector.health()
    finally:
        server.close()
        await server.wait_closed()
    assert list(observations) == []
    assert health.errors == {"connection_lost": 1}  # after two reconnects, the sweep is given up
    assert health.extra["gateways"][f"127.0.0.1:{port}"]["swept"] == 4


async def test_one_request_in_flight_per_gateway_and_gateways_in_parallel() -> None:
    """Each peer answers 0x0B after a short pause and records how many requests it held at once."""
    outstanding: dict[int, int] = {}
    most: dict[int, int] = {}
    first_last: dict[int, list[float]] = {}

    def server_for(port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        async def answer_soon(writer: asyncio.StreamWriter, request: bytes) -> None:
            await asyncio.sleep(0.005)  # the peer is a little slow; the test waits on the connector
            outstanding[port] -= 1
            writer.write(_framed(bytes([request[7] | 0x80, 0x0B]))(request))

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            pending: set[asyncio.Task[None]] = set()
            try:
                while request := await reader.read(260):
                    outstanding[port] = outstanding.get(port, 0) + 1
                    most[port] = max(most.get(port, 0), outstanding[port])
                    first_last.setdefault(port, [loop.time(), 0.0])[1] = loop.time()
                    task = asyncio.create_task(answer_soon(writer, request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            finally:
                writer.close()

        return handle

    ports = [free_port() for _ in range(3)]
    servers = [await asyncio.start_server(server_for(p), "127.0.0.1", p) for p in ports]
    try:
        cfg = {"gateways": [{"host": "127.0.0.1", "port": p, "unit_ids": "1-6"} for p in ports], "timeout_s": 1}
        async with ModbusConnector.from_config(cfg) as connector:
            assert list(await connector.observe()) == []
            health = connector.health()
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    assert health.errors == {}
    assert most == dict.fromkeys(ports, 1)
    # Parallel: every gateway got its first request before any gateway got its last.
    assert max(first for first, _ in first_last.values()) < min(last for _, last in first_last.values())


async def test_silent_unit_ids_do_not_close_the_connection_before_a_later_device() -> None:
    """A serial line where absent ids stay silent; pymodbus would hang up after 3 silences by default."""

    def answer(request: bytes) -> bytes:
        unit_id, function = request[6], request[7]
        if unit_id != 7:
            return b""
        if function == 0x03:
            return _framed(b"\x03\x04\x00\x01\x00\x02")(request)
        return _framed(bytes([function | 0x80, 0x01]))(request)  # no identification: illegal function

    port = free_port()
    connections: list[int] = []
    server = await _garbage_server(port, answer, connections)
    try:
        cfg = {"gateways": [{"host": "127.0.0.1", "port": port, "unit_ids": "1-7"}], "timeout_s": 0.03}
        async with ModbusConnector.from_config(cfg) as connector:
            observations = list(await connector.observe())
            health = connector.health()
    finally:
        server.close()
        await server.wait_closed()
    assert [o.identity for o in observations] == [DeviceIdentity.local("modbus", f"127.0.0.1:{port}", "7")]
    assert observations[0].evidence["activity_registers"] == [1, 2]
    assert health.errors == {}
    assert len(connections) == 1  # the six silences did not make the client hang up and reconnect


async def test_a_slow_gateway_answering_late_is_counted_late_not_garbage() -> None:
    """A gateway that answers 0x0B only after the connector's timeout: late frames are set aside, not bad."""
    timeout_s = 0.05
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def answer_late(request: bytes) -> None:
            await asyncio.sleep(timeout_s * 1.6)  # the peer is slow; the test itself waits on the connector
            writer.write(_framed(bytes([request[7] | 0x80, 0x0B]))(request))

        try:
            while request := await reader.read(260):
                task = asyncio.create_task(answer_late(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        cfg = {"gateways": [{"host": "127.0.0.1", "port": port, "unit_ids": "1-4"}], "timeout_s": timeout_s}
        async with ModbusConnector.from_config(cfg) as connector:
            observations = await connector.observe()
            health = connector.health()
    finally:
        for task in tasks:
            task.cancel()
        server.close()
        await server.wait_closed()
    assert list(observations) == []
    # Answers arrive while a later request waits (the last one after the sweep ended): late, never bad.
    assert set(health.errors) == {"late_answer"}
    assert 1 <= health.errors["late_answer"] <= 3
    assert health.extra["gateways"][f"127.0.0.1:{port}"]["swept"] == 4


async def test_identity_falls_back_to_report_server_id(spec: PlantSpec, clock: FakeClock) -> None:
    async with ModbusPlant(spec, device_identification=False, clock=clock) as p:
        connector = ModbusConnector.from_config(config_for(p.gateways, unit_ids="1-5"))
        async with connector:
            observations = list(await connector.observe())
    assert set(by_key(observations)) == {msn(d) for d in spec.on("modbus")}
    assert {o.evidence["identification_source"] for o in observations} == {"0x11"}
    assert all(bytes.fromhex(o.evidence["identification_adu"])[7] == 0x11 for o in observations)


async def test_register_profile_gives_the_serial_of_an_unidentified_device(
    spec: PlantSpec, clock: FakeClock
) -> None:
    async with ModbusPlant(spec, device_identification=False, report_server_id=False, clock=clock) as p:
        gateway = p.gateways[0]
        cfg = config_for([gateway], unit_ids="1-5", serial_register_profile={"address": 100, "count": 16})
        async with ModbusConnector.from_config(cfg) as connector:
            observations = list(await connector.observe())
    devices = {d.index: d for d in spec.devices}
    expected = {str(u): devices[i].serial for u, i in zip(gateway.unit_ids, gateway.device_indices, strict=True)}
    # Without manufacturer and model the identity stays local to the gateway and unit id.
    assert {o.identity.key() for o in observations} == {
        DeviceIdentity.local("modbus", gateway.address, u).key() for u in expected
    }
    assert {o.local_id: o.evidence["serial"] for o in observations} == expected
    assert {o.evidence["identification_source"] for o in observations} == {"registers"}


# --- configuration -------------------------------------------------------------------------------------


def test_sample_toml_is_exactly_the_defaults_plus_the_required_keys() -> None:
    tables = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))["connectors"]["modbus"]
    assert len(tables) == 1
    table = tables[0]
    assert {k: v for k, v in table.items() if k != "gateways"} == dict(DEFAULTS)
    (gateway,) = table["gateways"]
    assert {k: v for k, v in gateway.items() if k != "host"} == dict(GATEWAY_DEFAULTS)
    connector = ModbusConnector.from_config(table)
    assert connector.config.gateways[0].unit_ids == tuple(range(1, 248))
    assert "```toml\n" + SAMPLE.read_text(encoding="utf-8") + "```" in README.read_text(encoding="utf-8")
    assert connector.config.timeout_s == DEFAULTS["timeout_s"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("gateways"), r"missing required key 'gateways'"),
        (lambda c: c.update(gateways=[]), r"gateways: expected at least one gateway"),
        (lambda c: c.update(timeout=1), r"unknown keys \['timeout'\]"),
        (lambda c: c.update(timeout_s="0.2"), r"timeout_s: expected int or float, got str"),
        (lambda c: c.update(timeout_s=0), r"timeout_s: expected seconds in 0.001..60, got 0"),
        (lambda c: c.update(serial_object_id=0x05), r"serial_object_id: expected an integer in 128..255"),
        (lambda c: c.update(activity_register_count=True), r"activity_register_count: expected int, got bool"),
        (lambda c: c.update(max_parallel_gateways=0), r"max_parallel_gateways: expected an integer in 1..1024"),
        (lambda c: c["gateways"][0].pop("host"), r"gateways\[0\]: missing required key 'host'"),
        (lambda c: c["gateways"][0].update(port=70000), r"gateways\[0\]\.port: expected an integer in 1\.\.65535"),
        (lambda c: c["gateways"][0].update(unit_ids="1-x"), r"unit_ids: expected unit ids like .*bad part '1-x'"),
        (lambda c: c["gateways"][0].update(unit_ids="9-3"), r"range '9-3' runs backwards"),
        (lambda c: c["gateways"][0].update(unit_ids=[1, 300]), r"unit ids must be in 0\.\.255, got \[300\]"),
        (lambda c: c["gateways"][0].update(enterprise="ACME"), r"enterprise: expected an 18-character"),
        (lambda c: c["gateways"][0].update(name="x"), r"gateways\[0\]: unknown keys \['name'\]"),
        (lambda c: c["gateways"].append(dict(c["gateways"][0])), r"127\.0\.0\.1:502 is listed twice"),
        (lambda c: c.update(serial_register_profile={"address": 100}), r"missing required key 'count'"),
    ],
)
def test_bad_configuration_is_refused_with_what_was_expected(
    change: Callable[[dict[str, Any]], object], message: str
) -> None:
    cfg: dict[str, Any] = {"gateways": [{"host": "127.0.0.1"}]}
    ModbusConnector.from_config(cfg)  # the base configuration is fine
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        ModbusConnector.from_config(cfg)


def test_unit_id_ranges_parse_to_sorted_distinct_ids() -> None:
    assert parse_unit_ids("1-3, 20,30-31,2", where="t") == (1, 2, 3, 20, 30, 31)
    assert parse_unit_ids([7, 3, 7], where="t") == (3, 7)
    with pytest.raises(ConfigError, match=r"t: expected at least one unit id"):
        parse_unit_ids([], where="t")

