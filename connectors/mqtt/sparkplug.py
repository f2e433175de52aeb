"""Sparkplug B topics and payloads: parse a topic, decode a payload into plain typed values.

The payload schema is Eclipse Tahu's ``sparkplug_b.proto`` (proto2, package ``org.eclipse.tahu.protobuf``),
written out below as a table and turned into message classes at import time with ``google.protobuf``, so no
``protoc`` and no generated code are needed. The simulator carries the same table (it may not import this
package); ``tests/test_mqtt.py`` checks that the two copies are identical.

Nothing here does I/O. Decoding either returns a :class:`DecodedPayload` or raises :class:`SparkplugError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from connectors.base import ConnectorError

NAMESPACE = "spBv1.0"
MAX_PAYLOAD_BYTES = 1 << 20  # a Sparkplug payload larger than 1 MiB is refused before decoding
QUALITY_GOOD = 192  # OPC-style quality code carried as the "Quality" metric property (Ignition, Tahu)

NODE_MESSAGES = frozenset({"NBIRTH", "NDEATH", "NDATA", "NCMD"})
DEVICE_MESSAGES = frozenset({"DBIRTH", "DDEATH", "DDATA", "DCMD"})


class SparkplugError(ConnectorError):
    """A Sparkplug topic or payload was refused; ``code`` says which kind of refusal."""

    code = "sparkplug_error"


class SparkplugTopicUnknown(SparkplugError):
    code = "sparkplug_topic_unknown"


class SparkplugPayloadMalformed(SparkplugError):
    code = "sparkplug_payload_malformed"


class SparkplugPayloadTooLarge(SparkplugError):
    code = "sparkplug_payload_too_large"


class DataType(enum.IntEnum):
    """Sparkplug B metric data types (Tahu ``DataType``)."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19
    PROPERTYSET = 20
    PROPERTYSETLIST = 21


# --- the Tahu schema -----------------------------------------------------------------------------------------
# One entry per message (parents before children); one line per field in .proto order:
# "<optional|repeated|value> <type> <name> = <number>", where "value" marks a member of the `value` oneof,
# and "extensions <n>" declares "extensions n to max". Keep identical to simulator/sparkplug_edge.py.
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
_EXTENSIONS_MAX = 536_870_912  # "to max": exclusive end of an extension range (2^29)


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
            field = msg.field.add(name=field_name, number=int(number))
            field.label = _F.LABEL_REPEATED if label == "repeated" else _F.LABEL_OPTIONAL
            if type_name in _SCALARS:
                field.type = _SCALARS[type_name]
            else:
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{_PACKAGE}.{type_name}"
            if label == "value":
                if not msg.oneof_decl:
                    msg.oneof_decl.add(name="value")
                field.oneof_index = 0
    return fdp


def _payload_class() -> Any:
    pool = descriptor_pool.DescriptorPool()  # private pool: the simulator registers the same names in its own
    pool.AddSerializedFile(schema().SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Payload"))


Payload: Any = _payload_class()


# --- topics --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    """``spBv1.0/<group>/<message type>/<edge node>[/<device>]``."""

    group: str
    message_type: str
    edge_node: str
    device: str | None = None


def parse_topic(topic: str) -> SparkplugTopic | None:
    """Parse a Sparkplug B topic. ``None`` for a host application's STATE topic (not device data);
    :class:`SparkplugTopicUnknown` for anything else that is not Sparkplug B."""
    levels = topic.split("/")
    if len(levels) == 3 and levels[0] == NAMESPACE and levels[1] == "STATE":
        return None  # Sparkplug 3.0 host application state: spBv1.0/STATE/<host id>
    if len(levels) < 4 or levels[0] != NAMESPACE:
        raise SparkplugTopicUnknown(
            f"not a Sparkplug B topic: expected {NAMESPACE}/<group>/<type>/<edge node>[/<device>], got {topic!r}")
    group, message_type, edge = levels[1], levels[2], levels[3]
    want = 4 if message_type in NODE_MESSAGES else 5 if message_type in DEVICE_MESSAGES else 0
    if want == 0:
        raise SparkplugTopicUnknown(f"unknown Sparkplug message type {message_type!r} in topic {topic!r}")
    if len(levels) != want or not all(levels[1:]):
        raise SparkplugTopicUnknown(f"{message_type} topic: expected {want} non-empty levels, got {topic!r}")
    return SparkplugTopic(group, message_type, edge, levels[4] if want == 5 else None)


# --- payloads ------------------------------------------------------------------------------------------------

MetricValue = int | float | bool | str | bytes | None


@dataclass(frozen=True, slots=True)
class DecodedMetric:
    name: str | None
    alias: int | None
    datatype: int
    value: MetricValue  # None for a null metric or a complex value (DataSet, Template, extension)
    is_null: bool
    is_historical: bool
    quality: int | None  # the "Quality" property, when the metric carries one

    @property
    def is_good_current_value(self) -> bool:
        """Fresh data of good quality: a present, current value whose quality (if stated) is good."""
        return (not self.is_null and not self.is_historical and self.value is not None
                and (self.quality is None or self.quality == QUALITY_GOOD))


@dataclass(frozen=True, slots=True)
class DecodedPayload:
    timestamp_ms: int | None
    seq: int | None
    metrics: tuple[DecodedMetric, ...]

    def metric(self, name: str) -> DecodedMetric | None:
        for m in self.metrics:
            if m.name == name:
                return m
        return None

    def string(self, name: str) -> str | None:
        m = self.metric(name)
        return m.value if m is not None and isinstance(m.value, str) else None

    def integer(self, name: str) -> int | None:
        m = self.metric(name)
        if m is None or isinstance(m.value, bool) or not isinstance(m.value, int):
            return None
        return m.value

    @property
    def has_fresh_value(self) -> bool:
        return any(m.is_good_current_value for m in self.metrics)


_SIMPLE_VALUES = frozenset({"int_value", "long_value", "float_value", "double_value", "boolean_value",
                            "string_value",
                            "bytes_value"})


def _parse(data: bytes) -> Any:
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SparkplugPayloadTooLarge(f"payload of {len(data)} bytes: expected at most {MAX_PAYLOAD_BYTES}")
    try:
        return Payload.FromString(data)
    except DecodeError as exc:
        raise SparkplugPayloadMalformed(
            f"payload is not a Sparkplug B protobuf ({exc}); got {len(data)} bytes starting {data[:16].hex()}"
        ) from exc


def decode_data(data: bytes) -> tuple[int | None, bool]:
    """The hot path for DDATA, NDATA and DDEATH: ``(seq, whether a metric carries a good current value)``,
    with the same rules as :func:`decode_payload` but without building the decoded metrics."""
    msg = _parse(data)
    fresh = False
    for m in msg.metrics:
        if (not m.is_null and not m.is_historical and m.WhichOneof("value") in _SIMPLE_VALUES
                and (not m.HasField("properties") or _quality(m) in (None, QUALITY_GOOD))):
            fresh = True
            break
    return (msg.seq if msg.HasField("seq") else None), fresh


@dataclass(frozen=True, slots=True)
class NamedMetrics:
    """``seq`` and the simple values of a few named metrics of one payload (see :func:`decode_named`)."""

    seq: int | None
    values: dict[str, MetricValue]

    def string(self, name: str) -> str | None:
        value = self.values.get(name)
        return value if isinstance(value, str) else None

    def integer(self, name: str) -> int | None:
        value = self.values.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def decode_named(data: bytes, names: frozenset[str]) -> NamedMetrics:
    """The births' path: ``seq`` and the first non-null simple value of each metric named in ``names`` -- what
    :func:`decode_payload` would give for them, at a tenth of the cost (no metric objects are built)."""
    msg = _parse(data)
    values: dict[str, MetricValue] = {}
    for m in msg.metrics:
        name = m.name
        if name in names and name not in values:
            kind = m.WhichOneof("value")
            values[name] = getattr(m, kind) if kind in _SIMPLE_VALUES and not m.is_null else None
    return NamedMetrics(msg.seq if msg.HasField("seq") else None, values)


def decode_payload(data: bytes) -> DecodedPayload:
    """Decode a Sparkplug B payload, or raise :class:`SparkplugError` saying why it was refused."""
    msg = _parse(data)
    metrics = []
    for m in msg.metrics:
        kind = m.WhichOneof("value")
        value: MetricValue = getattr(m, kind) if kind in _SIMPLE_VALUES else None
        metrics.append(DecodedMetric(
            name=m.name if m.HasField("name") else None,
            alias=m.alias if m.HasField("alias") else None,
            datatype=m.datatype,
            value=None if m.is_null else value,
            is_null=m.is_null,
            is_historical=m.is_historical,
            quality=_quality(m),
        ))
    return DecodedPayload(
        timestamp_ms=msg.timestamp if msg.HasField("timestamp") else None,
        seq=msg.seq if msg.HasField("seq") else None,
        metrics=tuple(metrics),
    )


def _quality(metric: Any) -> int | None:
    if not metric.HasField("properties"):
        return None
    props = metric.properties
    for key, value in zip(props.keys, props.values, strict=False):
        if key == "Quality" and value.WhichOneof("value") in ("int_value", "long_value"):
            return int(getattr(value, value.WhichOneof("value")))
    return None


def encode_rebirth_request(timestamp_ms: int) -> bytes:
    """An NCMD payload asking an edge node to publish its births again (``Node Control/Rebirth = true``)."""
    msg = Payload(timestamp=timestamp_ms)
    metric = msg.metrics.add(name="Node Control/Rebirth", timestamp=timestamp_ms, datatype=DataType.BOOLEAN)
    metric.boolean_value = True
    return bytes(msg.SerializeToString())
