"""MQTT / Sparkplug B: the connector against simulated edge nodes on a real Mosquitto, and its pure core."""

from __future__ import annotations

import asyncio
import hashlib
import time
import tomllib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest

import simulator.sparkplug_edge as sim
from connectors.base import ConfigError, DeviceConnector, DeviceIdentity, DeviceObservation, DeviceStatus
from connectors.mqtt import DEFAULTS, DeviceTable, MqttConfig, MqttConnector
from connectors.mqtt import sparkplug as spb
from simulator.mosquitto import PrivateMosquitto, free_port
from simulator.plant import PlantShape, PlantSpec, make_plant, uscc

SAMPLE = Path(__file__).resolve().parents[1] / "connectors" / "mqtt" / "sample.toml"
FAST_S = 0.1  # DDATA interval of the simulated edge nodes


def small_plant(seed: int) -> PlantSpec:
    """Six MQTT devices of two enterprises, two of them silent; a distinct seed gives distinct group ids."""
    return make_plant(PlantShape(opcua=0, modbus=0, mqtt=6, opcua_and_mqtt=0, modbus_and_opcua=0, silent=2,
                                 enterprises=2), seed=seed)


class Clock:
    """Wall time plus an offset a test moves forward (never a sleep)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    """Poll a real peer's effect, bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


def by_name(observations: Any) -> dict[str, DeviceObservation]:
    return {o.local_id.rsplit("/", 1)[-1]: o for o in observations}


@dataclass
class Rig:
    spec: PlantSpec
    plant: sim.SparkplugPlant
    connector: MqttConnector
    clock: Clock
    broker: PrivateMosquitto

    async def statuses(self) -> dict[str, DeviceStatus]:
        return {name: o.status for name, o in by_name(await self.connector.observe()).items()}

    def truth(self) -> dict[str, DeviceStatus]:
        return {d.name: DeviceStatus.ACTIVE if d.active else DeviceStatus.REACHABLE for d in self.spec.on("mqtt")}

    async def settled(self) -> None:
        async def check() -> bool:
            return await self.statuses() == self.truth()

        await until(check, "the connector to see the plant's ground truth")


def connector_for(broker: PrivateMosquitto, spec: PlantSpec, clock: Clock, **cfg: Any) -> MqttConnector:
    groups = sorted({d.enterprise for d in spec.on("mqtt")})  # only this test's plant on the shared broker
    return MqttConnector.from_config({"host": broker.host, "port": broker.port, "sparkplug_groups": groups,
                                      "timeout_s": 2, **cfg}, now=clock)


@pytest.fixture
async def rig(request: pytest.FixtureRequest, mosquitto: PrivateMosquitto) -> AsyncIterator[Rig]:
    spec = small_plant(seed=zlib.crc32(request.node.name.encode()))  # own group ids on the shared broker
    clock = Clock()
    async with connector_for(mosquitto, spec, clock) as connector, \
            sim.SparkplugPlant(spec, host=mosquitto.host, port=mosquitto.port, update_interval_s=FAST_S) as plant:
        yield Rig(spec, plant, connector, clock, mosquitto)


# --- against a real broker -----------------------------------------------------------------------------------


async def test_devices_equal_ground_truth_and_silent_ones_are_not_active(rig: Rig) -> None:
    assert isinstance(rig.connector, DeviceConnector)
    await rig.settled()
    truth = rig.spec.ground_truth()
    observed = by_name(await rig.connector.observe())
    assert len(observed) == truth["per_protocol"]["mqtt"]  # type: ignore[index]
    assert sum(o.status == DeviceStatus.ACTIVE for o in observed.values()) == truth["per_protocol_active"]["mqtt"]  # type: ignore[index]
    for device in rig.spec.on("mqtt"):
        obs = observed[device.name]
        assert obs.identity == DeviceIdentity.manufacturer_model_serial(device.manufacturer, device.model,
                                                                        device.serial)
        assert (obs.evidence["manufacturer"], obs.evidence["model"], obs.evidence["serial"]) == (
            device.manufacturer, device.model, device.serial)
        assert obs.enterprise == device.enterprise
        assert obs.protocol == "mqtt" and obs.source == f"mqtt://{rig.broker.host}:{rig.broker.port}"
        assert obs.local_id.endswith(f"/{device.name}") and obs.local_id.startswith(device.enterprise + "/edge-")
        assert len(obs.evidence["payload_sha256"]) == 64
        assert obs.evidence["topic"].startswith(f"spBv1.0/{device.enterprise}/")
        assert obs.evidence["message_type"] == ("DDATA" if device.active else "DBIRTH")
        datetime.fromisoformat(obs.evidence["received_at"])
    assert rig.connector.health().errors == {}


async def test_broker_sys_counter_is_corroboration_only(rig: Rig) -> None:
    await rig.settled()

    async def seen() -> bool:
        return isinstance(rig.connector.health().extra["broker_clients_connected"], int)

    await until(seen, "$SYS/broker/clients/connected")  # the test broker refreshes $SYS every second
    extra = rig.connector.health().extra
    assert extra["broker_clients_connected"] >= 0 and extra["broker_clients_connected_at"]
    assert len(await rig.connector.observe()) == len(rig.spec.on("mqtt"))  # never the count


async def test_stale_data_is_not_active(rig: Rig) -> None:
    await rig.settled()
    rig.plant.kill_edge(*rig.plant.edge_nodes[0])  # nothing new from its devices...
    rig.clock.offset = timedelta(seconds=301)  # ...and the window passes
    statuses = await rig.statuses()
    killed = {d.name for d in rig.spec.on("mqtt") if rig.plant.edge_of(d.name) == rig.plant.edge_nodes[0]}
    assert all(statuses[name] != DeviceStatus.ACTIVE for name in killed)

    async def live_ones_fresh_again() -> bool:
        s = await rig.statuses()
        return all(s[d.name] == DeviceStatus.ACTIVE for d in rig.spec.on("mqtt") if d.active and d.name not in killed)

    await until(live_ones_fresh_again, "fresh DDATA under the moved clock")


async def test_ddeath_makes_device_not_reachable(rig: Rig) -> None:
    await rig.settled()
    victim = next(d for d in rig.spec.on("mqtt") if d.active)
    rig.plant.retire_device(victim.name)

    async def dead() -> bool:
        return (await rig.statuses())[victim.name] == DeviceStatus.REGISTERED

    await until(dead, "DDEATH to make the device unreachable")
    statuses = await rig.statuses()
    assert all(statuses[name] == want for name, want in rig.truth().items() if name != victim.name)


async def test_ungraceful_drop_fires_ndeath_will(rig: Rig) -> None:
    await rig.settled()
    group, edge = rig.plant.edge_nodes[1]
    rig.plant.kill_edge(group, edge)
    on_node = {d.name for d in rig.spec.on("mqtt") if rig.plant.edge_of(d.name) == (group, edge)}

    async def all_dead() -> bool:
        s = await rig.statuses()
        return all(s[name] == DeviceStatus.REGISTERED for name in on_node)

    await until(all_dead, "the broker's NDEATH will to mark the node's devices unreachable")
    statuses = await rig.statuses()
    assert all(statuses[name] == want for name, want in rig.truth().items() if name not in on_node)


async def test_late_ndeath_with_old_bdseq_is_ignored(rig: Rig) -> None:
    await rig.settled()
    group, edge = rig.plant.edge_nodes[0]
    old = (rig.plant.bd_seq(group, edge) - 1) % 256
    await rig.plant.publish_raw(f"spBv1.0/{group}/NDEATH/{edge}", sim.ndeath_payload(old), qos=1)

    async def ignored() -> bool:
        return bool(rig.connector.health().extra["stale_ndeath_ignored"] == 1)

    await until(ignored, "the late NDEATH to be recognised")
    assert await rig.statuses() == rig.truth()
    assert rig.connector.health().errors == {}


async def test_malformed_payload_and_unknown_topic_are_counted_never_devices(rig: Rig) -> None:
    await rig.settled()
    group, edge = rig.plant.edge_nodes[0]
    await rig.plant.publish_raw(f"spBv1.0/{group}/DDATA/{edge}/intruder", b"not protobuf \xff")
    await rig.plant.publish_raw(f"spBv1.0/{group}/DBIRTH/{edge}", sim.encode_payload([], seq=1, timestamp_ms=1))
    await rig.plant.publish_raw(f"spBv1.0/{group}/BOGUS/{edge}/intruder2", b"")

    async def counted() -> bool:
        errors = rig.connector.health().errors
        return errors.get("sparkplug_payload_malformed") == 1 and errors.get("sparkplug_topic_unknown") == 2

    await until(counted, "the malformed payload and unknown topics to be counted")
    assert await rig.statuses() == rig.truth()  # no intruder, nobody harmed


async def test_plain_topic_templates_count_devices_and_keepalives_do_not(mosquitto: PrivateMosquitto) -> None:
    import random

    enterprise = uscc(random.Random(4242))
    prefix = f"factory-{enterprise}"

    async def publish(topic: str, payload: bytes, *, retain: bool = False) -> None:
        await asyncio.to_thread(mqtt_publish.single, topic, payload, retain=retain, hostname=mosquitto.host,
                                port=mosquitto.port)

    await publish(f"{prefix}/{enterprise}/pump-2/telemetry", b'{"t": 1}', retain=True)  # old news
    try:
        connector = MqttConnector.from_config(
            {"host": mosquitto.host, "port": mosquitto.port, "sparkplug": False,
             "topics": [prefix + "/{enterprise}/{device}/telemetry"]})
        async with connector:
            await publish(f"{prefix}/{enterprise}/gateway-1/keepalive", b"alive")
            await publish(f"{prefix}/{enterprise}/pump-3/telemetry", b"")  # clears, carries no data
            await publish(f"{prefix}/{enterprise}/pump-1/telemetry", b'{"t": 2}')

            async def seen() -> bool:
                return "pump-1" in by_name(await connector.observe())

            await until(seen, "the plain-topic device")
            observed = by_name(await connector.observe())
    finally:
        await publish(f"{prefix}/{enterprise}/pump-2/telemetry", b"", retain=True)
    assert set(observed) == {"pump-1", "pump-2"}
    assert observed["pump-1"].status == DeviceStatus.ACTIVE
    assert observed["pump-1"].identity == DeviceIdentity.local("mqtt", enterprise, "pump-1")
    assert observed["pump-1"].enterprise == enterprise
    assert observed["pump-1"].evidence["payload_sha256"] == hashlib.sha256(b'{"t": 2}').hexdigest()
    assert observed["pump-2"].status == DeviceStatus.REGISTERED  # a retained message is not fresh data
    assert connector.health().errors == {}


async def test_rebirth_off_is_read_only_and_rebirth_on_recovers_identities(mosquitto: PrivateMosquitto) -> None:
    spec = small_plant(seed=77)
    clock = Clock()
    active = {d.name for d in spec.on("mqtt") if d.active}
    async with connector_for(mosquitto, spec, clock) as early, \
            sim.SparkplugPlant(spec, host=mosquitto.host, port=mosquitto.port, update_interval_s=FAST_S) as plant:
        # Once an early subscriber saw DDATA after the births, the broker has routed the births: they are gone.
        await Rig(spec, plant, early, clock, mosquitto).settled()
        async with connector_for(mosquitto, spec, clock) as late:
            # Started after the births: only DDATA is seen, so identities stay local and silent devices unknown.
            async def data_seen() -> bool:
                obs = by_name(await late.observe())
                return set(obs) == active and all(o.status == DeviceStatus.ACTIVE for o in obs.values())

            await until(data_seen, "DDATA-only devices")
            assert {o.identity.scheme for o in await late.observe()} == {"local"}
            assert all(plant.rebirths(*node) == 0 for node in plant.edge_nodes)
            async with connector_for(mosquitto, spec, clock, rebirth=True) as asking:
                async def reborn() -> bool:
                    obs = by_name(await asking.observe())
                    return len(obs) == len(spec.on("mqtt")) and all(o.identity.scheme == "msn" for o in obs.values())

                await until(reborn, "births after a rebirth request")
                assert all(plant.rebirths(*node) >= 1 for node in plant.edge_nodes)
                statuses = {n: o.status for n, o in by_name(await asking.observe()).items()}
                assert {n for n, s in statuses.items() if s == DeviceStatus.REACHABLE} == {
                    d.name for d in spec.on("mqtt") if not d.active}


async def test_broker_restart_reconnects_and_resubscribes() -> None:
    spec = small_plant(seed=55)
    clock = Clock()
    port = free_port()
    broker = PrivateMosquitto(port=port).start()
    try:
        async with connector_for(broker, spec, clock) as connector:
            async with sim.SparkplugPlant(spec, host=broker.host, port=port, update_interval_s=FAST_S) as plant:
                rig = Rig(spec, plant, connector, clock, broker)
                await rig.settled()
                broker.stop()

                async def lost() -> bool:
                    return connector.health().extra["connected"] is False

                await until(lost, "the connector to notice the broker is gone")
                assert all(s == DeviceStatus.REGISTERED for s in (await rig.statuses()).values())
                broker = PrivateMosquitto(port=port).start()

                async def back() -> bool:
                    return bool(connector.health().extra["subscribed"])

                await until(back, "the connector to reconnect and subscribe again", timeout_s=15)
            # The first plant's connections died with the broker; a new one is seen only if we re-subscribed.
            async with sim.SparkplugPlant(spec, host=broker.host, port=port, update_interval_s=FAST_S) as plant:
                rig.plant = plant
                await rig.settled()
            health = connector.health()
            assert health.extra["reconnects"] >= 1 and health.errors.get("connection_lost", 0) >= 1
    finally:
        broker.stop()


async def test_run_sparkplug_plant_stops_gracefully_when_cancelled(mosquitto: PrivateMosquitto) -> None:
    spec = small_plant(seed=31)
    clock = Clock()
    async with connector_for(mosquitto, spec, clock) as connector:
        truth = {d.name: DeviceStatus.ACTIVE if d.active else DeviceStatus.REACHABLE for d in spec.on("mqtt")}
        task = asyncio.create_task(sim.run_sparkplug_plant(spec, mosquitto.host, mosquitto.port,
                                                           update_interval_s=FAST_S))

        async def statuses_are(want: dict[str, DeviceStatus]) -> bool:
            return {n: o.status for n, o in by_name(await connector.observe()).items()} == want

        await until(lambda: statuses_are(truth), "the running plant")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: statuses_are(dict.fromkeys(truth, DeviceStatus.REGISTERED)), "DDEATH/NDEATH on stop")
        assert connector.health().extra["stale_ndeath_ignored"] == 0


async def test_unreachable_broker_is_counted_not_raised() -> None:
    connector = MqttConnector.from_config({"host": "127.0.0.1", "port": free_port(), "timeout_s": 0.3})
    async with connector:
        assert await connector.observe() == []
        health = connector.health()
    assert health.extra["connected"] is False
    assert health.errors.get("broker_unreachable", 0) >= 1


# --- configuration -------------------------------------------------------------------------------------------


def test_sample_toml_is_exactly_the_defaults_plus_required_keys() -> None:
    tables = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))["connectors"]["mqtt"]
    assert len(tables) == 1
    sample = tables[0]
    assert sample == {"host": sample["host"], **DEFAULTS}
    config = MqttConfig.from_mapping(sample)
    built = MqttConfig(host=sample["host"])
    for key, value in DEFAULTS.items():
        got = getattr(config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
        assert getattr(built, key) == getattr(config, key), key
    assert config.client_id.startswith("tianping-agent-")


@pytest.mark.parametrize(("cfg", "match"), [
    ({}, "missing required key 'host'"),
    ({"host": "h", "colour": "red"}, r"unknown keys \['colour'\]"),
    ({"host": "h", "port": "1883"}, "port: expected int, got str"),
    ({"host": "h", "port": True}, "port: expected int, got bool"),
    ({"host": "h", "port": 70000}, r"port: expected 1\.\.65535, got 70000"),
    ({"host": "h", "tls": True, "keyfile": "k.pem"}, "expected certfile and keyfile together"),
    ({"host": "h", "enterprise_from": "static"}, "enterprise: expected a unified social credit code"),
    ({"host": "h", "enterprise_from": "topic"}, r"enterprise_from: expected one of \['group', 'static'\]"),
    ({"host": "h", "enterprise": "91330400ABC"}, "expected 18 characters"),
    ({"host": "h", "topics": ["plant/{enterprise}/telemetry"]}, "with '{device}' exactly once"),
    ({"host": "h", "topics": ["plant/#"]}, "with '{device}' exactly once"),
    ({"host": "h", "topics": ["spBv1.0/{device}"]}, "outside \\$SYS and the Sparkplug namespace"),
    ({"host": "h", "topics": "plant/{device}"}, "topics: expected list, got str"),
    ({"host": "h", "sparkplug_groups": ["a/b"]}, "sparkplug_groups: expected group ids"),
    ({"host": "h", "sparkplug": False}, "nothing to observe"),
    ({"host": "h", "freshness_window_s": 0}, "freshness_window_s: expected a positive number"),
    ({"host": "h", "max_devices": 0}, "max_devices: expected at least 1"),
    ({"host": "h", "timeout_s": "5"}, "timeout_s: expected int or float, got str"),
    ({"host": "h", "password": "pw"}, "password: expected together with username"),
])
def test_bad_config_is_refused_clearly(cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MqttConnector.from_config(cfg)


# --- the pure core -------------------------------------------------------------------------------------------


def test_simulator_and_connector_carry_the_same_tahu_schema() -> None:
    assert sim.schema().SerializeToString(deterministic=True) == spb.schema().SerializeToString(deterministic=True)


class Table:
    """A DeviceTable fed directly with payloads from the simulator's encoder."""

    G, E = uscc(__import__("random").Random(1)), "edge-0"

    def __init__(self, **cfg: Any) -> None:
        self.errors: list[str] = []
        self.at = datetime(2026, 3, 1, tzinfo=UTC)
        config = MqttConfig.from_mapping({"host": "h", **cfg})
        self.table = DeviceTable(config, source="mqtt://h:1883", report=lambda code, *a: self.errors.append(code))

    def send(self, kind: str, payload: bytes, device: str | None = None, *, retained: bool = False) -> Any:
        topic = f"spBv1.0/{self.G}/{kind}/{self.E}" + (f"/{device}" if device else "")
        return self.table.handle(topic, payload, retained=retained, received_at=self.at)

    def status(self, device: str) -> DeviceStatus | None:
        found = {o.local_id: o.status for o in self.table.observations(self.at)}
        return found.get(f"{self.G}/{self.E}/{device}")


def ddata(seq: int, value: float = 1.0) -> bytes:
    return sim.ddata_payload(value, seq=seq, timestamp_ms=1)


def born(table: Table, bd_seq: int = 3) -> None:
    table.send("NBIRTH", sim.nbirth_payload(bd_seq, timestamp_ms=1))
    table.send("DBIRTH", sim.encode_payload([sim.Metric("Value", sim.DOUBLE, 1.0)], seq=1, timestamp_ms=1), "d1")


def test_seq_gap_is_counted_and_a_new_nbirth_invalidates_device_births() -> None:
    t = Table()
    born(t)
    t.send("DDATA", ddata(2), "d1")
    assert t.status("d1") == DeviceStatus.ACTIVE and t.errors == []
    t.send("DDATA", ddata(9), "d1")
    assert t.errors == ["sparkplug_seq_gap"]
    t.send("NBIRTH", sim.nbirth_payload(4, timestamp_ms=1))
    assert t.status("d1") == DeviceStatus.REGISTERED  # until its DBIRTH under the new session


def test_ndeath_of_the_current_session_kills_and_a_stale_one_does_not() -> None:
    t = Table()
    born(t, bd_seq=3)
    t.send("NDEATH", sim.ndeath_payload(2))
    assert t.status("d1") == DeviceStatus.REACHABLE and t.table.stale_ndeath_ignored == 1
    t.send("NDEATH", sim.ndeath_payload(3))
    assert t.status("d1") == DeviceStatus.REGISTERED and t.errors == []


def test_freshness_window_uses_the_injected_time() -> None:
    t = Table(freshness_window_s=60)
    born(t)
    t.send("DDATA", ddata(2), "d1")
    assert t.status("d1") == DeviceStatus.ACTIVE
    t.at += timedelta(seconds=61)
    assert t.status("d1") == DeviceStatus.REACHABLE


def test_bad_quality_null_or_historical_data_is_not_fresh() -> None:
    t = Table()
    born(t)
    msg = spb.Payload(seq=2, timestamp=1)
    bad = msg.metrics.add(name="Value", datatype=spb.DataType.DOUBLE, double_value=1.0)
    bad.properties.keys.append("Quality")
    bad.properties.values.add(type=spb.DataType.INT32, int_value=0)
    msg.metrics.add(name="Other", datatype=spb.DataType.DOUBLE, is_null=True)
    msg.metrics.add(name="Old", datatype=spb.DataType.DOUBLE, double_value=2.0, is_historical=True)
    t.send("DDATA", msg.SerializeToString(), "d1")
    assert t.status("d1") == DeviceStatus.REACHABLE


def test_retained_and_seqless_sparkplug_messages_are_refused() -> None:
    t = Table()
    born(t)
    t.send("DDATA", ddata(2), "d2", retained=True)
    t.send("DDATA", sim.encode_payload([sim.Metric("Value", sim.DOUBLE, 1.0)], seq=None, timestamp_ms=1), "d3")
    t.send("NBIRTH", sim.encode_payload([], seq=0, timestamp_ms=1))  # no bdSeq
    assert t.errors == ["sparkplug_retained", "sparkplug_payload_invalid", "sparkplug_payload_invalid"]
    assert t.status("d2") is None and t.status("d3") is None


def test_max_devices_bounds_memory() -> None:
    t = Table(max_devices=2)
    born(t)
    for i, name in enumerate(["d2", "d3", "d4"]):
        t.send("DDATA", ddata(2 + i), name)
    assert len(t.table.observations(t.at)) == 2
    assert t.errors == ["max_devices_exceeded", "max_devices_exceeded"]
    assert len(t.table._hot) == 1  # the hot path remembers tracked devices only (d2; d1 sent no DDATA)


def test_data_from_an_unborn_node_asks_for_rebirth_only_when_allowed() -> None:
    read_only, asking = Table(), Table(rebirth=True)
    assert read_only.send("DDATA", ddata(5), "d1") == []
    assert asking.send("DDATA", ddata(5), "d1") == [(Table.G, Table.E)]
    assert asking.send("DDATA", ddata(6), "d1") == []  # rate-limited
    assert read_only.status("d1") == DeviceStatus.ACTIVE


def test_max_devices_bounds_edge_nodes_and_plain_topic_devices_too() -> None:
    t = Table(max_devices=2, topics=["plant/{device}/telemetry"])
    for edge in ("edge-a", "edge-b", "edge-c"):
        t.table.handle(f"spBv1.0/{Table.G}/NBIRTH/{edge}", sim.nbirth_payload(1, timestamp_ms=1), retained=False,
                       received_at=t.at)
    assert t.table.edge_node_count == 2 and t.errors == ["max_devices_exceeded"]
    for name in ("p1", "p2", "p3"):
        t.table.handle(f"plant/{name}/telemetry", b"1", retained=False, received_at=t.at)
    assert t.table.device_count == 2 and t.errors == ["max_devices_exceeded"] * 2


def _payload(seq: int | None, *metrics: dict[str, Any], quality: int | None = None) -> bytes:
    msg = spb.Payload(timestamp=1)
    if seq is not None:
        msg.seq = seq
    for fields in metrics:
        m = msg.metrics.add(**fields)
        if quality is not None:
            m.properties.keys.append("Quality")
            m.properties.values.add(type=spb.DataType.INT32, int_value=quality)
    return bytes(msg.SerializeToString())


FAST_PATH_CASES = [
    _payload(5, {"name": "Value", "double_value": 1.5}),
    _payload(5, {"name": "Value", "double_value": 1.5}, quality=spb.QUALITY_GOOD),
    _payload(5, {"name": "Value", "double_value": 1.5}, quality=0),
    _payload(5, {"name": "Value", "is_null": True}),
    _payload(5, {"name": "Value", "double_value": 1.5, "is_historical": True}),
    _payload(5, {"name": "Table", "dataset_value": {"num_of_columns": 0}}),
    _payload(None, {"name": "Value", "int_value": 3}),
    _payload(7),
    _payload(0, {"name": "bdSeq", "long_value": 9}, {"name": "bdSeq", "long_value": 10},
             {"name": "Properties/Model", "string_value": "M"}, {"name": "Properties/Serial", "boolean_value": True}),
    _payload(1, {"name": "bdSeq", "boolean_value": True}, {"name": "Properties/Model", "is_null": True}),
]


@pytest.mark.parametrize("payload", FAST_PATH_CASES)
def test_fast_decoders_agree_with_the_full_decoder(payload: bytes) -> None:
    full = spb.decode_payload(payload)
    assert spb.decode_data(payload) == (full.seq, full.has_fresh_value)
    names = frozenset({"bdSeq", "Properties/Model", "Properties/Serial", "Value"})
    named = spb.decode_named(payload, names)
    assert named.seq == full.seq
    for name in names:
        assert (named.string(name), named.integer(name)) == (full.string(name), full.integer(name)), name


def test_fast_decoders_refuse_malformed_payloads_like_the_full_one() -> None:
    for decode in (spb.decode_payload, spb.decode_data, lambda p: spb.decode_named(p, frozenset({"bdSeq"}))):
        with pytest.raises(spb.SparkplugPayloadMalformed, match="not a Sparkplug B protobuf"):
            decode(b"\xff\xff\xff")
        with pytest.raises(spb.SparkplugPayloadTooLarge, match="expected at most"):
            decode(b"\x00" * (spb.MAX_PAYLOAD_BYTES + 1))


def test_hot_path_for_known_devices_keeps_every_rule() -> None:
    t = Table()
    born(t)
    t.send("DDATA", ddata(2), "d1")  # from now on d1's DDATA take the hot path
    t.send("DDATA", ddata(3), "d1", retained=True)
    t.send("DDATA", b"\xff\xff", "d1")
    t.send("DDATA", sim.encode_payload([sim.Metric("Value", sim.DOUBLE, 1.0)], seq=None, timestamp_ms=1), "d1")
    t.send("DDATA", ddata(7), "d1")
    assert t.errors == ["sparkplug_retained", "sparkplug_payload_malformed", "sparkplug_payload_invalid",
                        "sparkplug_seq_gap"]
    t.at += timedelta(seconds=400)
    t.send("DDATA", _payload(8, {"name": "Value", "double_value": 1.0}, quality=0), "d1")
    assert t.status("d1") == DeviceStatus.REACHABLE  # bad quality does not refresh
    t.send("DDEATH", sim.ddeath_payload(seq=9, timestamp_ms=1), "d1")
    assert t.status("d1") == DeviceStatus.REGISTERED
    t.send("DDATA", ddata(10), "d1")
    assert t.status("d1") == DeviceStatus.ACTIVE
    evidence = t.table.observations(t.at)[0].evidence
    assert (evidence["message_type"], evidence["seq"], evidence["bd_seq"]) == ("DDATA", 10, 3)
    assert evidence["payload_sha256"] == hashlib.sha256(ddata(10)).hexdigest()


def test_hot_path_asks_for_a_rebirth_after_a_seq_gap_when_allowed() -> None:
    t = Table(rebirth=True)
    born(t)
    assert t.send("DDATA", ddata(2), "d1") == []
    assert t.send("DDATA", ddata(9), "d1") == [(Table.G, Table.E)]


def test_large_payloads_are_hashed_at_once_not_kept() -> None:
    t = Table()
    born(t)
    big = sim.encode_payload([sim.Metric("Value", sim.STRING, "x" * 1000)], seq=2, timestamp_ms=1)
    t.send("DDATA", big, "d1")
    evidence = t.table.observations(t.at)[0].evidence
    assert evidence["payload_sha256"] == hashlib.sha256(big).hexdigest()
    assert all(isinstance(device.last_payload, str) for device in t.table._devices.values())  # kept: the hash


def test_buffered_reads_hand_out_the_stream_in_the_pieces_asked_for() -> None:
    import socket

    from connectors.mqtt.transport import BufferedReads

    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        reader = BufferedReads(b)
        with pytest.raises(BlockingIOError):
            reader.recv(1)
        a.sendall(b"\x30\x05hello\x30\x03abc")
        assert (reader.recv(1), reader.pending()) == (b"\x30", 11)
        assert (reader.recv(1), reader.recv(5), reader.recv(1)) == (b"\x05", b"hello", b"\x30")
        assert (reader.recv(100), reader.pending()) == (b"\x03abc", 0)
        a.shutdown(socket.SHUT_WR)
        assert reader.recv(1) == b""  # end of stream, as a socket says it
        assert reader.fileno() == b.fileno()
