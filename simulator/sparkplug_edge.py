"""Simulated Sparkplug B edge nodes publishing a plant's MQTT devices to a broker.

One edge node per enterprise that owns MQTT devices: group id = the enterprise's unified social credit code,
edge node id ``edge-<k>`` (k = the enterprise's index in the plant), device id = ``SimDevice.name``.
Each node connects with its NDEATH as the MQTT will (carrying ``bdSeq``), publishes NBIRTH and one DBIRTH per
device (``Properties/Manufacturer``, ``Properties/Model``, ``Properties/SerialNumber`` and ``Value``), then
DDATA every ``update_interval_s`` for its active devices; silent devices are born and never speak again.
``seq`` runs 0-255 per node (NBIRTH is 0). A graceful stop publishes DDEATHs and NDEATH; :meth:`kill_edge`
drops a node's TCP connection so the broker fires its will. A node answers ``Node Control/Rebirth`` (NCMD).

All clients run on the asyncio loop through paho's external-loop API (no thread per client), so a plant with
hundreds of enterprises stays in one thread.

The simulator plays the outside world and imports nothing from the project; it carries its own copy of the
Tahu schema table (identical to ``connectors/mqtt/sparkplug.py``, checked by a test).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from simulator.plant import PlantSpec, SimDevice

_log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
_CONNECT_TIMEOUT_S = 10.0
_KEEPALIVE_S = 30

# Sparkplug B data types used here (Tahu DataType).
INT64, DOUBLE, BOOLEAN, STRING = 4, 10, 11, 12

# --- the Tahu schema (a copy of connectors/mqtt/sparkplug.py's table; keep identical) ---------------------------
_PACKAGE = "org.eclipse.tahu.protobuf"
_SCHEMA: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Payload", (
        "optional uint64 timestamp = 1", "repeated Payload.Metric metrics = 2", "optional uint64 seq = 3",
        "optional string uuid = 4", "optional bytes body = 5", "extensions 6",
    )),
    ("Payload.Template", (
        "optional string version = 1", "repeated Payload.Metric metrics = 2",
        "repeated Payload.Template.Parameter parameters = 3", "optional string template_ref = 4",
        "optional bool is_definition = 5", "extensions 6",
    )),
    ("Payload.Template.Parameter", (
        "optional string name = 1", "optional uint32 type = 2",
        "value uint32 int_value = 3", "value uint64 long_value = 4", "value float float_value = 5",
        "value double double_value = 6", "value bool boolean_value = 7", "value string string_value = 8",
        "value Payload.Template.Parameter.ParameterValueExtension extension_value = 9",
    )),
    ("Payload.Template.Parameter.ParameterValueExtension", ("extensions 1",)),
    ("Payload.DataSet", (
        "optional uint64 num_of_columns = 1", "repeated string columns = 2", "repeated uint32 types = 3",
        "repeated Payload.DataSet.Row rows = 4", "extensions 5",
    )),
    ("Payload.DataSet.DataSetValue", (
        "value uint32 int_value = 1", "value uint64 long_value = 2", "value float float_value = 3",
        "value double double_value = 4", "value bool boolean_value = 5", "value string string_value = 6",
        "value Payload.DataSet.DataSetValue.DataSetValueExtension extension_value = 7",
    )),
    ("Payload.DataSet.DataSetValue.DataSetValueExtension", ("extensions 1",)),
    ("Payload.DataSet.Row", ("repeated Payload.DataSet.DataSetValue elements = 1", "extensions 2")),
    ("Payload.PropertyValue", (
        "optional uint32 type = 1", "optional bool is_null = 2",
        "value uint32 int_value = 3", "value uint64 long_value = 4", "value float float_value = 5",
        "value double double_value = 6", "value bool boolean_value = 7", "value string string_value = 8",
        "value Payload.PropertySet propertyset_value = 9",
        "value Payload.PropertySetList propertysets_value = 10",
        "value Payload.PropertyValue.PropertyValueExtension extension_value = 11",
    )),
    ("Payload.PropertyValue.PropertyValueExtension", ("extensions 1",)),
    ("Payload.PropertySet", (
        "repeated string keys = 1", "repeated Payload.PropertyValue values = 2", "extensions 3",
    )),
    ("Payload.PropertySetList", ("repeated Payload.PropertySet propertyset = 1", "extensions 2")),
    ("Payload.MetaData", (
        "optional bool is_multi_part = 1", "optional string content_type = 2", "optional uint64 size = 3",
        "optional uint64 seq = 4", "optional string file_name = 5", "optional string file_type = 6",
        "optional string md5 = 7", "optional string description = 8", "extensions 9",
    )),
    ("Payload.Metric", (
        "optional string name = 1", "optional uint64 alias = 2", "optional uint64 timestamp = 3",
        "optional uint32 datatype = 4", "optional bool is_historical = 5", "optional bool is_transient = 6",
        "optional bool is_null = 7", "optional Payload.MetaData metadata = 8",
        "optional Payload.PropertySet properties = 9",
        "value uint32 int_value = 10", "value uint64 long_value = 11", "value float float_value = 12",
        "value double double_value = 13", "value bool boolean_value = 14", "value string string_value = 15",
        "value bytes bytes_value = 16", "value Payload.DataSet dataset_value = 17",
        "value Payload.Template template_value = 18",
        "value Payload.Metric.MetricValueExtension extension_value = 19",
    )),
    ("Payload.Metric.MetricValueExtension", ("extensions 1",)),
)

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
    "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES,
}
_EXTENSIONS_MAX = 536_870_912


def schema() -> descriptor_pb2.FileDescriptorProto:
    """The Tahu ``sparkplug_b.proto`` file as a descriptor."""
    fdp = descriptor_pb2.FileDescriptorProto(name="sparkplug_b.proto", package=_PACKAGE, syntax="proto2")
    made: dict[str, descriptor_pb2.DescriptorProto] = {}
    for path, lines in _SCHEMA:
        parent, _, name = path.rpartition(".")
        msg = (made[parent].nested_type if parent else fdp.message_type).add(name=name)
        made[path] = msg
        for line in lines:
            words = line.replace("=", " ").split()
            if words[0] == "extensions":
                msg.extension_range.add(start=int(words[1]), end=_EXTENSIONS_MAX)
                continue
            label, type_name, field_name, number = words
            fld = msg.field.add(name=field_name, number=int(number))
            fld.label = _F.LABEL_REPEATED if label == "repeated" else _F.LABEL_OPTIONAL
            if type_name in _SCALARS:
                fld.type = _SCALARS[type_name]
            else:
                fld.type = _F.TYPE_MESSAGE
                fld.type_name = f".{_PACKAGE}.{type_name}"
            if label == "value":
                if not msg.oneof_decl:
                    msg.oneof_decl.add(name="value")
                fld.oneof_index = 0
    return fdp


def _payload_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(schema().SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Payload"))


Payload: Any = _payload_class()


# --- payloads ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    datatype: int  # INT64, DOUBLE, BOOLEAN or STRING
    value: int | float | bool | str


_VALUE_FIELD = {INT64: "long_value", DOUBLE: "double_value", BOOLEAN: "boolean_value", STRING: "string_value"}


def encode_payload(metrics: Sequence[Metric], *, seq: int | None, timestamp_ms: int) -> bytes:
    msg = Payload(timestamp=timestamp_ms)
    if seq is not None:
        msg.seq = seq
    for m in metrics:
        pb = msg.metrics.add(name=m.name, timestamp=timestamp_ms, datatype=m.datatype)
        setattr(pb, _VALUE_FIELD[m.datatype], m.value)
    return bytes(msg.SerializeToString())


def nbirth_payload(bd_seq: int, *, timestamp_ms: int, seq: int = 0) -> bytes:
    return encode_payload([Metric("bdSeq", INT64, bd_seq), Metric("Node Control/Rebirth", BOOLEAN, False)],
                          seq=seq, timestamp_ms=timestamp_ms)


def ndeath_payload(bd_seq: int, *, timestamp_ms: int | None = None) -> bytes:
    """An NDEATH (no seq, just ``bdSeq``); tests use it to publish a late death of an earlier session."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return encode_payload([Metric("bdSeq", INT64, bd_seq)], seq=None, timestamp_ms=ts)


def dbirth_payload(device: SimDevice, value: float, *, seq: int, timestamp_ms: int) -> bytes:
    return encode_payload([
        Metric("Properties/Manufacturer", STRING, device.manufacturer),
        Metric("Properties/Model", STRING, device.model),
        Metric("Properties/SerialNumber", STRING, device.serial),
        Metric("Value", DOUBLE, value),
    ], seq=seq, timestamp_ms=timestamp_ms)


def ddata_payload(value: float, *, seq: int, timestamp_ms: int) -> bytes:
    return encode_payload([Metric("Value", DOUBLE, value)], seq=seq, timestamp_ms=timestamp_ms)


def ddeath_payload(*, seq: int, timestamp_ms: int) -> bytes:
    return encode_payload([], seq=seq, timestamp_ms=timestamp_ms)


def _is_rebirth_request(payload: bytes) -> bool:
    try:
        msg = Payload.FromString(payload)
    except DecodeError:
        return False
    return any(m.name == "Node Control/Rebirth" and m.WhichOneof("value") == "boolean_value" and m.boolean_value
               for m in msg.metrics)


# --- paho on asyncio -----------------------------------------------------------------------------------------


def _attach_to_loop(client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
    """Drive a paho client from the asyncio loop (paho's external-loop API: readers, writers, loop_misc)."""

    def opened(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop.add_reader(sock, c.loop_read)

    def closed(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop.remove_reader(sock)
        loop.remove_writer(sock)

    def want_write(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop.add_writer(sock, c.loop_write)

    def written(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop.remove_writer(sock)

    client.on_socket_open = opened
    client.on_socket_close = closed
    client.on_socket_register_write = want_write
    client.on_socket_unregister_write = written


async def _sent(info: mqtt.MQTTMessageInfo) -> None:
    """Wait until paho wrote a publish (QoS 0) or the broker acknowledged it (QoS 1), bounded."""
    await asyncio.to_thread(info.wait_for_publish, _CONNECT_TIMEOUT_S)
    if not info.is_published():
        raise TimeoutError(f"publish {info.mid} not sent within {_CONNECT_TIMEOUT_S} s")


@dataclass
class _EdgeNode:
    group: str
    edge_id: str
    devices: tuple[SimDevice, ...]
    client: mqtt.Client
    bd_seq: int
    seq: int = -1
    online: bool = False
    publishing: bool = False
    rebirths: int = 0
    retired: set[str] = field(default_factory=set)  # devices that published their DDEATH
    last_birth: mqtt.MQTTMessageInfo | None = None
    connected: asyncio.Future[None] | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def topic(self, kind: str, device: str | None = None) -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.edge_id}"
        return base if device is None else f"{base}/{device}"

    @property
    def live_devices(self) -> list[SimDevice]:
        return [d for d in self.devices if d.name not in self.retired]

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq


class SparkplugPlant:
    """The MQTT side of a :class:`~simulator.plant.PlantSpec`, as Sparkplug B edge nodes on one broker.

    ``bd_seq`` is the birth/death sequence number every node starts with (a real node keeps it across
    restarts); ``clock`` gives the payload timestamps (seconds since the epoch).
    """

    def __init__(self, spec: PlantSpec, *, host: str, port: int, update_interval_s: float = 0.5,
                 bd_seq: int = 0, clock: Callable[[], float] = time.time) -> None:
        if update_interval_s <= 0:
            raise ValueError(f"update_interval_s: expected a positive number, got {update_interval_s!r}")
        self.spec = spec
        self.host, self.port = host, port
        self.update_interval_s = update_interval_s
        self._first_bd_seq = bd_seq % 256
        self._clock = clock
        self._nodes: dict[tuple[str, str], _EdgeNode] = {}
        self._injector: mqtt.Client | None = None
        self._injector_gone = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._tick = 0

    # -- what tests need to know --------------------------------------------------------------------------

    @property
    def edge_nodes(self) -> list[tuple[str, str]]:
        """(group, edge node id) of every node, in enterprise order."""
        return list(self._nodes)

    def edge_of(self, device_name: str) -> tuple[str, str]:
        for key, node in self._nodes.items():
            if any(d.name == device_name for d in node.devices):
                return key
        raise KeyError(f"no edge node carries device {device_name!r}")

    def bd_seq(self, group: str, edge: str) -> int:
        return self._nodes[(group, edge)].bd_seq

    def rebirths(self, group: str, edge: str) -> int:
        return self._nodes[(group, edge)].rebirths

    # -- life cycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        by_enterprise: dict[str, list[SimDevice]] = {}
        for device in self.spec.on("mqtt"):
            by_enterprise.setdefault(device.enterprise, []).append(device)
        for k, enterprise in enumerate(self.spec.enterprises):
            devices = by_enterprise.get(enterprise.uscc)
            if not devices:
                continue
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-spb-{k}-{secrets.token_hex(4)}",
                                 clean_session=True)
            node = _EdgeNode(enterprise.uscc, f"edge-{k}", tuple(devices), client, self._first_bd_seq)
            self._nodes[(node.group, node.edge_id)] = node
            self._wire(node, loop)
        try:
            await asyncio.gather(*(self._connect(node, loop) for node in self._nodes.values()))
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="sparkplug-ddata"),
            asyncio.create_task(self._keepalive_forever(), name="sparkplug-keepalive"),
        ]
        _log.info("sparkplug plant: %d edge nodes, %d devices on %s:%d", len(self._nodes),
                  sum(len(n.devices) for n in self._nodes.values()), self.host, self.port)

    async def stop(self) -> None:
        """Graceful: every live node publishes its DDEATHs and NDEATH, then disconnects."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for node in self._nodes.values():
            if node.online:
                node.publishing = False
                now = self._now_ms()
                for device in node.live_devices:
                    node.client.publish(node.topic("DDEATH", device.name),
                                        ddeath_payload(seq=node.next_seq(), timestamp_ms=now))
                node.client.publish(node.topic("NDEATH"), ndeath_payload(node.bd_seq, timestamp_ms=now), qos=1)
                node.client.disconnect()
        if self._injector is not None:
            self._injector.disconnect()
        # The DISCONNECTs are written by the loop's writers; on_disconnect fires once each is out.
        pending = [n.gone for n in self._nodes.values() if n.client.socket() is not None]
        if self._injector is not None and self._injector.socket() is not None:
            pending.append(self._injector_gone)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in pending)), _CONNECT_TIMEOUT_S)
        self._injector = None
        self._nodes.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- faults, for tests --------------------------------------------------------------------------------

    def kill_edge(self, group: str, edge: str) -> None:
        """Drop a node's TCP connection without DISCONNECT: the broker publishes its will (NDEATH)."""
        node = self._nodes[(group, edge)]
        node.publishing = False
        sock = node.client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)

    def retire_device(self, device_name: str) -> None:
        """The device publishes its DDEATH and falls silent; its edge node stays up."""
        node = self._nodes[self.edge_of(device_name)]
        node.retired.add(device_name)
        node.client.publish(node.topic("DDEATH", device_name),
                            ddeath_payload(seq=node.next_seq(), timestamp_ms=self._now_ms()))

    async def publish_raw(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Publish any bytes on any topic from a separate client (a late NDEATH, a malformed payload...)."""
        if self._injector is None:
            loop = asyncio.get_running_loop()
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-inject-{secrets.token_hex(4)}")
            _attach_to_loop(client, loop)
            done: asyncio.Future[None] = loop.create_future()

            def on_connect(c: mqtt.Client, u: Any, f: mqtt.ConnectFlags, rc: ReasonCode,
                           p: Properties | None) -> None:
                if not done.done():
                    done.set_result(None)

            def on_disconnect(c: mqtt.Client, u: Any, f: mqtt.DisconnectFlags, rc: ReasonCode,
                              p: Properties | None) -> None:
                self._injector_gone.set()

            client.on_connect = on_connect
            client.on_disconnect = on_disconnect
            client.connect(self.host, self.port, keepalive=_KEEPALIVE_S)
            await asyncio.wait_for(done, _CONNECT_TIMEOUT_S)
            self._injector = client
        await _sent(self._injector.publish(topic, payload, qos=qos, retain=retain))

    # -- internals ----------------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _value(self, device: SimDevice) -> float:
        return 20.0 + device.index % 10 + 0.1 * (self._tick % 50)

    def _wire(self, node: _EdgeNode, loop: asyncio.AbstractEventLoop) -> None:
        client = node.client
        _attach_to_loop(client, loop)
        client.will_set(node.topic("NDEATH"), ndeath_payload(node.bd_seq), qos=1, retain=False)

        def on_connect(c: mqtt.Client, u: Any, f: mqtt.ConnectFlags, rc: ReasonCode, p: Properties | None) -> None:
            fut = node.connected
            if rc.is_failure:
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError(f"broker refused edge node {node.edge_id}: {rc}"))
                return
            node.online = True
            c.subscribe(node.topic("NCMD"), qos=0)
            self._birth(node)
            node.publishing = True
            if fut is not None and not fut.done():
                fut.set_result(None)

        def on_disconnect(c: mqtt.Client, u: Any, f: mqtt.DisconnectFlags, rc: ReasonCode,
                          p: Properties | None) -> None:
            node.online = node.publishing = False
            node.gone.set()

        def on_message(c: mqtt.Client, u: Any, message: mqtt.MQTTMessage) -> None:
            if message.topic == node.topic("NCMD") and _is_rebirth_request(bytes(message.payload)):
                node.rebirths += 1
                _log.info("sparkplug edge node %s/%s: rebirth requested", node.group, node.edge_id)
                self._birth(node)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message

    async def _connect(self, node: _EdgeNode, loop: asyncio.AbstractEventLoop) -> None:
        node.connected = loop.create_future()
        node.client.connect(self.host, self.port, keepalive=_KEEPALIVE_S)
        await asyncio.wait_for(node.connected, _CONNECT_TIMEOUT_S)
        if node.last_birth is not None:  # started = the births are on the wire
            await _sent(node.last_birth)

    def _birth(self, node: _EdgeNode) -> None:
        now = self._now_ms()
        node.seq = -1
        node.last_birth = node.client.publish(
            node.topic("NBIRTH"), nbirth_payload(node.bd_seq, seq=node.next_seq(), timestamp_ms=now))
        for device in node.live_devices:
            node.last_birth = node.client.publish(
                node.topic("DBIRTH", device.name),
                dbirth_payload(device, self._value(device), seq=node.next_seq(), timestamp_ms=now))

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self.update_interval_s)
            self._tick += 1
            now = self._now_ms()
            for node in self._nodes.values():
                if not node.publishing:
                    continue
                for device in node.live_devices:
                    if device.active:
                        node.client.publish(node.topic("DDATA", device.name),
                                            ddata_payload(self._value(device), seq=node.next_seq(), timestamp_ms=now))

    async def _keepalive_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for client in [n.client for n in self._nodes.values()] + ([self._injector] if self._injector else []):
                client.loop_misc()


async def run_sparkplug_plant(spec: PlantSpec, host: str, port: int, *, update_interval_s: float = 0.5) -> None:
    """Run the plant's Sparkplug edge nodes until cancelled, then stop them gracefully."""
    async with SparkplugPlant(spec, host=host, port=port, update_interval_s=update_interval_s):
        await asyncio.Event().wait()
