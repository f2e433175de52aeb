"""Count devices seen through an MQTT broker: Sparkplug B edge nodes, and plain topics named by templates.

Two layers (STYLE.md, example 4):

- :class:`DeviceTable` is the pure core: MQTT messages (topic, payload, retain flag, receive time) in,
  :class:`~connectors.base.DeviceObservation` snapshots out. No I/O, no clock of its own. The rules it enforces:

  1. A device is a Sparkplug ``group/edge node/device`` or a plain topic that matches a configured template.
     Edge nodes, gateways' keep-alives, host applications' STATE, commands and topics that match nothing are
     never devices.
  2. REGISTERED once known (DBIRTH, or DDATA from a device whose birth we missed); REACHABLE while born and not
     dead (DDEATH, or an NDEATH of the node) -- a DDATA is a sign of life too; ACTIVE only while reachable and a
     DDATA carrying a current value of good quality arrived within ``freshness_window_s``. A DBIRTH alone is
     never ACTIVE.
     A plain-topic device is ACTIVE while a non-retained, non-empty message arrived within the window, else
     REGISTERED.
  3. An NDEATH counts only when its ``bdSeq`` is the one of the node's current NBIRTH (or when that NBIRTH was
     never seen); a late NDEATH of an earlier session is ignored. A new NBIRTH invalidates the node's device
     births.
  4. Sequence numbers run 0-255 per edge node; a gap is counted (``sparkplug_seq_gap``).
  5. Malformed payloads, retained Sparkplug messages, unknown topics and devices beyond ``max_devices`` are
     counted as errors with a log line and change nothing else.
  6. A lost broker connection makes every Sparkplug device unreachable until it speaks again: deaths may have
     been missed while we were away.

- :class:`MqttConnector` is the adapter: one paho-mqtt client whose network loop runs in its own thread
  (``loop_start``), which reconnects with capped backoff and subscribes again on every connection.
  ``observe()`` returns a snapshot of the table.

The broker's ``$SYS/broker/clients/connected`` is kept in ``health().extra`` as corroboration only: a connected
client is not a device, and a device is not necessarily a client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import ssl
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

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
from connectors.mqtt.sparkplug import (
    NAMESPACE,
    NamedMetrics,
    SparkplugError,
    SparkplugTopic,
    decode_data,
    decode_named,
    encode_rebirth_request,
    parse_topic,
)
from connectors.mqtt.transport import BufferedClient
from protocol.uscc import UsccInvalid, validate_uscc

_log = logging.getLogger(__name__)

KIND = "mqtt"
SYS_CLIENTS_CONNECTED = "$SYS/broker/clients/connected"
REBIRTH_MIN_INTERVAL = timedelta(seconds=60)  # ask one edge node for a rebirth at most this often
_KEEPALIVE_S = 30
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 1, 30
# CONNACK reason codes meaning "your credentials": MQTT 5 134/135, which paho maps MQTT 3.1.1's 4 and 5 onto.
_AUTH_REFUSALS = frozenset({134, 135})

# The defaults of every optional key that has a fixed default; sample.toml is exactly these plus `host`.
DEFAULTS: Mapping[str, Any] = {
    "port": 1883,
    "tls": False,
    "tls_insecure": False,
    "sparkplug": True,
    "sparkplug_groups": ["+"],
    "enterprise_from": "group",
    "topics": [],
    "freshness_window_s": 300,
    "max_devices": 200_000,
    "rebirth": False,
    "timeout_s": 5,
}
REQUIRED = ("host",)
# client_id: "tianping-agent-<random>"; ca_file: the system's trusted CAs; certfile/keyfile: no client certificate.
_NO_DEFAULT = ("client_id", "username", "password", "ca_file", "certfile", "keyfile", "enterprise")
_KNOWN = {*REQUIRED, *DEFAULTS, *_NO_DEFAULT}
_ENTERPRISE_FROM = ("group", "static")
_NAMED_DECODE = frozenset({"NBIRTH", "DBIRTH", "NDEATH"})  # the others need only seq and freshness
_BIRTH_METRICS = frozenset({"bdSeq", "Properties/Manufacturer", "Properties/Model", "Properties/SerialNumber"})


# --- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    """A plain-MQTT topic template such as ``factory/{enterprise}/{device}/telemetry``.

    Placeholders fill whole topic levels; ``{device}`` is required, ``{enterprise}`` optional, ``+`` matches
    any one level; ``#`` and topics under ``$`` or the Sparkplug namespace are refused.
    """

    template: str
    levels: tuple[str, ...]

    PLACEHOLDERS: ClassVar[tuple[str, str]] = ("{enterprise}", "{device}")

    @classmethod
    def parse(cls, template: str, *, where: str) -> TopicTemplate:
        levels = tuple(template.split("/"))
        expected = "levels of literal text, '+', '{enterprise}' or '{device}', with '{device}' exactly once"
        problem = None
        if template.startswith(("$", NAMESPACE + "/")):
            problem = "a topic outside $SYS and the Sparkplug namespace"
        elif levels.count("{device}") != 1 or levels.count("{enterprise}") > 1:
            problem = expected
        else:
            for level in levels:
                if level in cls.PLACEHOLDERS or level == "+":
                    continue
                if not level or any(c in level for c in "+#{}"):
                    problem = expected
        if problem:
            raise ConfigError(f"{where}: expected {problem}, got {template!r}")
        return cls(template, levels)

    @property
    def subscription(self) -> str:
        return "/".join("+" if level in self.PLACEHOLDERS else level for level in self.levels)

    def match(self, topic: str) -> tuple[str | None, str] | None:
        """``(enterprise level or None, device level)`` when the topic matches, else ``None``."""
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        enterprise: str | None = None
        device = ""
        for level, part in zip(self.levels, parts, strict=True):
            if level == "{device}":
                device = part
            elif level == "{enterprise}":
                enterprise = part
            elif level != "+" and level != part:
                return None
            if not part:
                return None
        return enterprise, device


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """A validated ``[[connectors.mqtt]]`` table."""

    host: str
    port: int = 1883
    client_id: str = field(default_factory=lambda: "tianping-agent-" + secrets.token_hex(4))
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    tls_insecure: bool = False
    sparkplug: bool = True
    sparkplug_groups: tuple[str, ...] = ("+",)
    enterprise_from: str = "group"
    enterprise: str | None = None
    topics: tuple[TopicTemplate, ...] = ()
    freshness_window_s: float = 300
    max_devices: int = 200_000
    rebirth: bool = False
    timeout_s: float = 5

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], *, where: str = "connectors.mqtt") -> MqttConfig:
        refuse_unknown(cfg, _KNOWN, where=where)

        def opt(key: str, kind: type | tuple[type, ...]) -> Any:
            return optional(cfg, key, kind, DEFAULTS[key], where=where)

        host = require(cfg, "host", str, where=where)
        if not host.strip():
            raise ConfigError(f"{where}.host: expected a host name or address, got {host!r}")
        port = opt("port", int)
        if not 1 <= port <= 65535:
            raise ConfigError(f"{where}.port: expected 1..65535, got {port}")
        client_id = optional(cfg, "client_id", str, None, where=where)
        if client_id is not None and not 1 <= len(client_id) <= 65535:
            raise ConfigError(f"{where}.client_id: expected a non-empty string, got {client_id!r}")
        username = optional(cfg, "username", str, None, where=where)
        password = optional(cfg, "password", str, None, where=where)
        if password is not None and username is None:
            raise ConfigError(f"{where}.password: expected together with username, got a password alone")
        tls = opt("tls", bool)
        tls_insecure = opt("tls_insecure", bool)
        files = {key: optional(cfg, key, str, None, where=where) for key in ("ca_file", "certfile", "keyfile")}
        given = [key for key, value in files.items() if value is not None] + (["tls_insecure"] if tls_insecure else [])
        if given and not tls:
            raise ConfigError(f"{where}: expected tls = true with {', '.join(given)}, got tls = false")
        if (files["certfile"] is None) != (files["keyfile"] is None):
            raise ConfigError(f"{where}: expected certfile and keyfile together (a client certificate and its "
                              f"private key), got only {'certfile' if files['certfile'] else 'keyfile'}")
        for key, path in files.items():
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{where}.{key}: expected a readable PEM file, got {path!r} (no such file)")
        sparkplug = opt("sparkplug", bool)
        groups = _strings(opt("sparkplug_groups", list), where=f"{where}.sparkplug_groups")
        for group in groups:
            if group != "+" and any(c in group for c in "/+#"):
                raise ConfigError(f"{where}.sparkplug_groups: expected group ids or '+', got {group!r}")
        if sparkplug and not groups:
            raise ConfigError(f"{where}.sparkplug_groups: expected at least one group id or '+', got []")
        enterprise_from = opt("enterprise_from", str)
        if enterprise_from not in _ENTERPRISE_FROM:
            raise ConfigError(f"{where}.enterprise_from: expected one of {list(_ENTERPRISE_FROM)}, "
                              f"got {enterprise_from!r}")
        enterprise = optional(cfg, "enterprise", str, None, where=where)
        if enterprise is not None:
            try:
                validate_uscc(enterprise)
            except UsccInvalid as exc:
                raise ConfigError(f"{where}.enterprise: {exc}") from exc
        if enterprise_from == "static" and enterprise is None:
            raise ConfigError(f"{where}.enterprise: expected a unified social credit code when "
                              "enterprise_from = \"static\", got none")
        templates = tuple(
            TopicTemplate.parse(t, where=f"{where}.topics[{i}]")
            for i, t in enumerate(_strings(opt("topics", list), where=f"{where}.topics"))
        )
        if not sparkplug and not templates:
            raise ConfigError(f"{where}: expected sparkplug = true or at least one topic template, got neither "
                              "(nothing to observe)")
        freshness = _positive(opt("freshness_window_s", (int, float)), where=f"{where}.freshness_window_s")
        max_devices = opt("max_devices", int)
        if max_devices < 1:
            raise ConfigError(f"{where}.max_devices: expected at least 1, got {max_devices}")
        timeout = _positive(opt("timeout_s", (int, float)), where=f"{where}.timeout_s")
        extra: dict[str, Any] = {} if client_id is None else {"client_id": client_id}
        return cls(
            host=host, port=port, username=username, password=password, tls=tls, tls_insecure=tls_insecure,
            **{k: v for k, v in files.items() if v is not None}, sparkplug=sparkplug,
            sparkplug_groups=tuple(groups), enterprise_from=enterprise_from, enterprise=enterprise,
            topics=templates, freshness_window_s=float(freshness), max_devices=max_devices,
            rebirth=opt("rebirth", bool), timeout_s=float(timeout), **extra,
        )

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``tls = true`` (``None`` otherwise): TLS 1.2 or later, the server's certificate
        always verified against ``ca_file`` (else the system's CAs), its host name too unless ``tls_insecure``.
        Raises :class:`ConfigError` for an unreadable CA, certificate or key."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            if self.certfile is not None:
                context.load_cert_chain(self.certfile, self.keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"connectors.mqtt: expected PEM files for ca_file, certfile and keyfile, got "
                              f"{exc} (ca_file={self.ca_file!r}, certfile={self.certfile!r}, "
                              f"keyfile={self.keyfile!r})") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = not self.tls_insecure
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    @property
    def subscriptions(self) -> list[str]:
        subs = [f"{NAMESPACE}/{group}/#" for group in self.sparkplug_groups] if self.sparkplug else []
        return subs + [t.subscription for t in self.topics]


def _strings(values: list[Any], *, where: str) -> list[str]:
    bad = [v for v in values if not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(f"{where}: expected a list of non-empty strings, got {bad[0]!r} in {values!r}")
    return list(values)


def _positive(value: float, *, where: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number of seconds, got {value!r}")
    return value


# --- the pure core -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Node:
    bd_seq: int | None = None  # of the current NBIRTH
    born: bool = False
    last_seq: int | None = None
    devices: set[str] = field(default_factory=set)
    rebirth_asked_at: datetime | None = None


_KEEP_PAYLOAD_BYTES = 256  # evidence keeps a payload up to this size and hashes it when observed; larger: hashed now


@dataclass(slots=True)
class _Device:
    """One device. The last message's evidence is kept as plain fields (no per-message allocation: the hot path
    handles tens of thousands of messages a second) and turned into a mapping by :meth:`evidence`."""

    local_id: str
    identity: DeviceIdentity
    enterprise: str | None
    sparkplug: bool
    alive: bool = False
    last_data_at: datetime | None = None
    msn: tuple[tuple[str, str], ...] = ()  # manufacturer, model, serial from the DBIRTH
    last_topic: str = ""
    last_payload: bytes | str = b""  # the payload, or its SHA-256 (hex) when larger than _KEEP_PAYLOAD_BYTES
    last_at: datetime | None = None
    last_kind: str | None = None  # Sparkplug message type; None for a plain topic
    last_seq: int | None = None
    last_bd_seq: int | None = None
    last_retained: bool = False

    def keep(self, topic: str, payload: bytes, at: datetime) -> None:
        self.last_topic, self.last_at = topic, at
        self.last_payload = payload if len(payload) <= _KEEP_PAYLOAD_BYTES else hashlib.sha256(payload).hexdigest()

    def evidence(self) -> dict[str, Any]:
        if self.last_at is None:
            return {}
        raw = self.last_payload
        digest = raw if isinstance(raw, str) else hashlib.sha256(raw).hexdigest()
        out: dict[str, Any] = {"topic": self.last_topic, "payload_sha256": digest,
                               "received_at": self.last_at.isoformat()}
        if self.sparkplug:
            out.update(message_type=self.last_kind, seq=self.last_seq, bd_seq=self.last_bd_seq)
            out.update(self.msn)
        else:
            out["retained"] = self.last_retained
        return out


def _birth_identity(decoded: NamedMetrics) -> tuple[DeviceIdentity, tuple[tuple[str, str], ...]] | None:
    """Manufacturer + model + serial identity from a DBIRTH's properties, or None (then the local name stays)."""
    manufacturer = decoded.string("Properties/Manufacturer")
    model = decoded.string("Properties/Model")
    serial = decoded.string("Properties/SerialNumber")
    if not (manufacturer and model and serial):
        return None
    try:
        identity = DeviceIdentity.manufacturer_model_serial(manufacturer, model, serial)
    except ValueError:  # blank after normalisation
        return None
    return identity, (("manufacturer", manufacturer), ("model", model), ("serial", serial))


def _is_uscc(text: str) -> bool:
    try:
        validate_uscc(text)
    except UsccInvalid:
        return False
    return True


class DeviceTable:
    """What the broker showed us, as devices. Pure: the caller passes every message and every clock reading.

    ``report(code, message, *args)`` is called for each refused input (count it and log it).
    """

    def __init__(self, config: MqttConfig, *, source: str, report: Callable[..., None]) -> None:
        self._cfg = config
        self._source = source
        self._report = report
        self._window = timedelta(seconds=config.freshness_window_s)
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._devices: dict[tuple[str, ...], _Device] = {}
        # DDATA topic of a tracked device -> what the hot path needs; one entry per device at most
        self._hot: dict[str, tuple[SparkplugTopic, _Node, _Device]] = {}
        self._uscc_cache: dict[str, bool] = {}
        self.stale_ndeath_ignored = 0
        self.messages_handled = 0

    @property
    def device_count(self) -> int:
        return len(self._devices)

    @property
    def edge_node_count(self) -> int:
        return len(self._nodes)

    # messages in -----------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, *, retained: bool, received_at: datetime) -> list[tuple[str, str]]:
        """Apply one message. Returns the (group, edge node) pairs to ask for a rebirth (only with rebirth on)."""
        self.messages_handled += 1
        hot = self._hot.get(topic)
        if hot is not None and not retained:
            return self._known_ddata(hot, topic, payload, received_at)
        if self._cfg.sparkplug and topic.startswith(NAMESPACE + "/"):
            return self._sparkplug(topic, payload, retained, received_at)
        for template in self._cfg.topics:
            found = template.match(topic)
            if found is not None:
                self._plain(template, found, topic, payload, retained, received_at)
                return []
        self._report("topic_unknown", "message on %r matches no Sparkplug group or topic template", topic)
        return []

    def connection_lost(self) -> None:
        """Deaths may be missed while disconnected: nothing stays reachable until it speaks again."""
        for node in self._nodes.values():
            node.born, node.bd_seq, node.last_seq = False, None, None
        for device in self._devices.values():
            if device.sparkplug:
                device.alive = False

    def _sparkplug(self, topic: str, payload: bytes, retained: bool, at: datetime) -> list[tuple[str, str]]:
        try:
            parsed = parse_topic(topic)
        except SparkplugError as exc:
            self._report(exc.code, "%s", exc)
            return []
        if parsed is None or parsed.message_type in ("NCMD", "DCMD"):
            return []  # host application state and commands: not observations of devices
        kind = parsed.message_type
        if retained:
            self._report("sparkplug_retained", "retained %s on %r: Sparkplug messages are never retained; ignored",
                         kind, topic)
            return []
        decoded: NamedMetrics | None = None
        fresh = False
        try:
            if kind in _NAMED_DECODE:
                decoded = decode_named(payload, _BIRTH_METRICS)
                seq = decoded.seq
            else:
                seq, fresh = decode_data(payload)
        except SparkplugError as exc:
            self._report(exc.code, "%s on %r", exc, topic)
            return []
        key = (parsed.group, parsed.edge_node)
        node = self._nodes.get(key)
        if node is None:
            if len(self._nodes) >= self._cfg.max_devices:
                self._report("max_devices_exceeded", "edge node %r/%r not tracked: %d edge nodes already",
                             parsed.group, parsed.edge_node, len(self._nodes))
                return []
            node = self._nodes[key] = _Node()
        if kind == "NDEATH":
            assert decoded is not None
            self._ndeath(parsed, node, decoded)
            return []
        if seq is None or seq > 255:
            self._report("sparkplug_payload_invalid", "%s on %r: expected a seq of 0..255, got %r",
                         kind, topic, seq)
            return []
        if kind == "NBIRTH":
            assert decoded is not None
            bd_seq = decoded.integer("bdSeq")
            if bd_seq is None:
                self._report("sparkplug_payload_invalid", "NBIRTH on %r without a bdSeq metric", topic)
                return []
            node.bd_seq, node.born, node.last_seq = bd_seq, True, seq
            for name in node.devices:  # a new NBIRTH invalidates every earlier device birth
                self._devices[("spb", *key, name)].alive = False
            return []
        rebirth = self._sequence(parsed, node, seq, topic)
        if kind != "NDATA":
            self._device_message(parsed, node, seq, fresh, decoded, topic, payload, at)
        return self._rebirth(parsed, node, rebirth, at)

    def _known_ddata(self, hot: tuple[SparkplugTopic, _Node, _Device], topic: str, payload: bytes,
                     at: datetime) -> list[tuple[str, str]]:
        """The hot path: DDATA of a device already tracked (the same rules as the general path, fewer steps)."""
        parsed, node, device = hot
        try:
            seq, fresh = decode_data(payload)
        except SparkplugError as exc:
            self._report(exc.code, "%s on %r", exc, topic)
            return []
        if seq is None or seq > 255:
            self._report("sparkplug_payload_invalid", "DDATA on %r: expected a seq of 0..255, got %r", topic, seq)
            return []
        rebirth = self._sequence(parsed, node, seq, topic)
        device.alive = True
        if fresh:
            device.last_data_at = at
        device.keep(topic, payload, at)
        device.last_kind, device.last_seq, device.last_bd_seq = "DDATA", seq, node.bd_seq
        return self._rebirth(parsed, node, rebirth, at) if rebirth else []

    def _sequence(self, parsed: SparkplugTopic, node: _Node, seq: int, topic: str) -> bool:
        """Check and record a node's seq; True when a rebirth would help (a gap, or a birth we did not see)."""
        rebirth = False
        last = node.last_seq
        if last is not None and seq != (last + 1) % 256:
            self._report("sparkplug_seq_gap", "edge node %r/%r: expected seq %d, got %d on %r",
                         parsed.group, parsed.edge_node, (last + 1) % 256, seq, topic)
            rebirth = True
        node.last_seq = seq
        return rebirth or not node.born  # not born: data from a node whose birth we did not see

    def _rebirth(self, parsed: SparkplugTopic, node: _Node, wanted: bool, at: datetime) -> list[tuple[str, str]]:
        if wanted and self._cfg.rebirth and (
            node.rebirth_asked_at is None or at - node.rebirth_asked_at >= REBIRTH_MIN_INTERVAL
        ):
            node.rebirth_asked_at = at
            return [(parsed.group, parsed.edge_node)]
        return []

    def _ndeath(self, parsed: SparkplugTopic, node: _Node, decoded: NamedMetrics) -> None:
        bd_seq = decoded.integer("bdSeq")
        if bd_seq is None:
            self._report("sparkplug_payload_invalid", "NDEATH of %r/%r without a bdSeq metric",
                         parsed.group, parsed.edge_node)
            return
        if node.bd_seq is not None and bd_seq != node.bd_seq:
            self.stale_ndeath_ignored += 1
            _log.info("ignored a late NDEATH of %r/%r: bdSeq %d, the current NBIRTH has %d",
                      parsed.group, parsed.edge_node, bd_seq, node.bd_seq)
            return
        node.born, node.last_seq = False, None
        for name in node.devices:
            self._devices[("spb", parsed.group, parsed.edge_node, name)].alive = False

    def _device_message(self, parsed: SparkplugTopic, node: _Node, seq: int, fresh: bool,
                        decoded: NamedMetrics | None, topic: str, payload: bytes, at: datetime) -> None:
        assert parsed.device is not None
        key = ("spb", parsed.group, parsed.edge_node, parsed.device)
        device = self._devices.get(key)
        kind = parsed.message_type
        born_as: tuple[DeviceIdentity, tuple[tuple[str, str], ...]] | None = None
        if kind == "DBIRTH":
            assert decoded is not None
            born_as = _birth_identity(decoded)
        if device is None:
            if kind == "DDEATH":
                return  # the death of a device we never knew
            device = self._add(key, _Device(
                local_id=f"{parsed.group}/{parsed.edge_node}/{parsed.device}",
                identity=born_as[0] if born_as else DeviceIdentity.local(
                    KIND, parsed.group, parsed.edge_node, parsed.device),
                enterprise=self._enterprise(parsed.group), sparkplug=True,
            ))
            if device is None:
                return
            node.devices.add(parsed.device)
        if kind == "DDATA":
            device.alive = True
            if fresh:
                device.last_data_at = at
            self._hot[topic] = (parsed, node, device)
        elif kind == "DBIRTH":
            if born_as:
                device.identity, device.msn = born_as
            device.alive = True
        else:  # DDEATH
            device.alive = False
        device.keep(topic, payload, at)
        device.last_kind, device.last_seq, device.last_bd_seq = kind, seq, node.bd_seq

    def _plain(self, template: TopicTemplate, found: tuple[str | None, str], topic: str, payload: bytes,
               retained: bool, at: datetime) -> None:
        if not payload:
            return  # an empty message clears a retained one: no data
        topic_enterprise, name = found
        namespace = topic_enterprise or self._cfg.enterprise or template.template
        key = ("topic", namespace, name)
        device = self._devices.get(key)
        if device is None:
            if self._cfg.enterprise_from == "static":
                enterprise = self._cfg.enterprise
            else:
                enterprise = topic_enterprise if topic_enterprise and self._valid(topic_enterprise) \
                    else self._cfg.enterprise
            device = self._add(key, _Device(
                local_id=f"{namespace}/{name}", identity=DeviceIdentity.local(KIND, namespace, name),
                enterprise=enterprise, sparkplug=False,
            ))
            if device is None:
                return
        if not retained:  # a retained message may be arbitrarily old: known, not fresh
            device.last_data_at = at
        device.keep(topic, payload, at)
        device.last_retained = retained

    def _add(self, key: tuple[str, ...], device: _Device) -> _Device | None:
        if len(self._devices) >= self._cfg.max_devices:
            self._report("max_devices_exceeded", "device %r not tracked: %d devices already (max_devices)",
                         device.local_id, len(self._devices))
            return None
        self._devices[key] = device
        return device

    def _enterprise(self, group: str) -> str | None:
        if self._cfg.enterprise_from == "static":
            return self._cfg.enterprise
        return group if self._valid(group) else None

    def _valid(self, text: str) -> bool:
        known = self._uscc_cache.get(text)
        if known is None:
            if len(self._uscc_cache) >= self._cfg.max_devices:
                return _is_uscc(text)
            known = self._uscc_cache[text] = _is_uscc(text)
        return known

    # observations out ------------------------------------------------------------------------------------

    def observations(self, now: datetime) -> list[DeviceObservation]:
        out = []
        for device in self._devices.values():
            fresh = device.last_data_at is not None and now - device.last_data_at <= self._window
            if device.sparkplug:
                status = (DeviceStatus.ACTIVE if device.alive and fresh
                          else DeviceStatus.REACHABLE if device.alive else DeviceStatus.REGISTERED)
            else:
                status = DeviceStatus.ACTIVE if fresh else DeviceStatus.REGISTERED
            out.append(DeviceObservation(
                protocol=KIND, source=self._source, local_id=device.local_id, identity=device.identity,
                status=status, observed_at=now, enterprise=device.enterprise, evidence=device.evidence(),
            ))
        return out


# --- the adapter ---------------------------------------------------------------------------------------------


class MqttConnector(ConnectorBase):
    """Devices seen through one MQTT broker (Sparkplug B and plain topic templates). Read-only unless
    ``rebirth = true``, which lets it publish Sparkplug rebirth requests (NCMD) to edge nodes it missed."""

    kind: ClassVar[str] = KIND

    def __init__(self, config: MqttConfig, *, now: Callable[[], datetime] | None = None) -> None:
        super().__init__(source=f"mqtt://{config.host}:{config.port}")
        self.config = config
        self._now = now or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()  # the paho thread writes the table; observe() and health() read it
        self._table = DeviceTable(config, source=self.source, report=self._report)
        self._tls = config.tls_context()  # bad certificate files are a configuration error, raised here
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()  # connected, and the broker acknowledged our subscriptions
        self._settled = threading.Event()  # subscribed, or refused in a way that retrying will not fix
        self._refusal: str | None = None  # "auth_failed" or "tls_failed" until a connection succeeds
        self._is_connected = False
        self._connack_seen = False  # on the current connection
        self._subscribe_mid: int | None = None
        self._ever_connected = False
        self._closing = False
        self._reconnects = 0
        self._broker_clients: int | None = None
        self._broker_clients_at: datetime | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, now: Callable[[], datetime] | None = None) -> Self:
        return cls(MqttConfig.from_mapping(cfg), now=now)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def start(self) -> None:
        """Connect and subscribe in the background; wait up to ``timeout_s`` for the subscriptions to be in place.
        A broker that is not there yet is counted (``broker_unreachable``) and retried, never raised."""
        if self._client is not None:
            return
        cfg = self.config
        client = BufferedClient(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, clean_session=True)
        client.connect_timeout = cfg.timeout_s
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
            if cfg.tls_insecure:
                _log.warning("mqtt %s: tls_insecure = true: the broker's certificate is not checked against its "
                             "host name; anyone holding a certificate from the same CA can pose as this broker",
                             self.source)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._closing = False
        client.connect_async(cfg.host, cfg.port, keepalive=_KEEPALIVE_S)
        client.loop_start()
        self._client = client
        await asyncio.to_thread(self._settled.wait, cfg.timeout_s)
        if not self._subscribed.is_set() and self._refusal is None:
            with self._lock:
                self._report("broker_unreachable", "no connection to %s within %.1f s; retrying in the background",
                             self.source, cfg.timeout_s)

    async def observe(self) -> Sequence[DeviceObservation]:
        await self.start()
        now = self._now()
        with self._lock:
            return self._table.observations(now)

    def health(self) -> ConnectorHealth:
        with self._lock:
            base = super().health()
            extra = {
                "connected": self._is_connected,
                "tls": self.config.tls,
                "messages_handled": self._table.messages_handled,
                "subscribed": self._subscribed.is_set(),
                "reconnects": self._reconnects,
                "devices_tracked": self._table.device_count,
                "edge_nodes_tracked": self._table.edge_node_count,
                "stale_ndeath_ignored": self._table.stale_ndeath_ignored,
                # Corroboration only: connected clients are not devices.
                "broker_clients_connected": self._broker_clients,
                "broker_clients_connected_at": (
                    self._broker_clients_at.isoformat() if self._broker_clients_at else None
                ),
            }
        return ConnectorHealth(kind=base.kind, source=base.source, errors=base.errors, extra=extra)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._closing = True
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self._subscribed.clear()
        self._settled.clear()
        self._is_connected = False

    # paho callbacks (network thread) -------------------------------------------------------------------

    def _report(self, code: str, message: str, *args: Any) -> None:
        """Count one refused input and log it (every one of the first ten of a kind, then every thousandth).
        Callers hold the lock."""
        self.count_error(code)
        n = self._errors[code]
        if n <= 10 or n % 1000 == 0:
            _log.warning("mqtt %s (%s #%d): " + message, self.source, code, n, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        self._connack_seen = True
        if reason_code.is_failure:
            with self._lock:
                if reason_code.value in _AUTH_REFUSALS:
                    self._refusal = "auth_failed"
                    self._report("auth_failed", "broker refused our credentials (user name %r): %s; retrying",
                                 self.config.username, reason_code)
                    self._settled.set()
                else:
                    self._report("connect_refused", "broker refused the connection: %s", reason_code)
            return
        topics = [*self.config.subscriptions, SYS_CLIENTS_CONNECTED]
        with self._lock:
            _, self._subscribe_mid = client.subscribe([(topic, 0) for topic in topics])
            if self._ever_connected:
                self._reconnects += 1
            self._ever_connected = self._is_connected = True
        _log.info("mqtt %s connected; subscribed to %s", self.source, topics)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        exc = sys.exc_info()[1]  # paho calls this from inside its `except OSError` around the connect
        with self._lock:
            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                self._refusal = "tls_failed"
                self._report("tls_failed", "TLS handshake with %s failed: %s; retrying", self.source, exc)
                self._settled.set()
            else:
                self._report("connect_failed", "could not connect to %s (%s); retrying", self.source, exc)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._subscribed.clear()
        with self._lock:
            answered, self._connack_seen = self._connack_seen, False
            self._is_connected = False
            self._table.connection_lost()
            if self._closing:
                pass
            elif self._tls is not None and not answered:
                # TLS 1.3: a broker that refuses our client certificate closes the connection after the handshake.
                self._refusal = "tls_failed"
                self._report("tls_failed", "%s closed the TLS connection before answering CONNECT (%s): does it "
                             "require a client certificate (certfile/keyfile) it trusts?", self.source, reason_code)
                self._settled.set()
            else:
                self._report("connection_lost", "connection to %s lost (%s); reconnecting", self.source, reason_code)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        with self._lock:
            if refused:
                self._report("subscribe_refused", "broker refused %d subscription(s): %s", len(refused), refused)
            if mid == self._subscribe_mid:
                self._refusal = None
                self._subscribed.set()
                self._settled.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            at = self._now()
            try:
                topic = message.topic
            except UnicodeDecodeError:
                with self._lock:
                    self._report("topic_invalid", "topic is not UTF-8: %r", message._topic[:200])
                return
            if topic == SYS_CLIENTS_CONNECTED:
                self._sys_message(bytes(message.payload), at)
                return
            with self._lock:
                rebirths = self._table.handle(topic, bytes(message.payload), retained=message.retain,
                                              received_at=at)
            if rebirths:
                self._ask_rebirth(client, rebirths, at)
        except Exception:  # a bug must not kill the network thread; it is counted and logged in full
            with self._lock:
                self.count_error("internal_error")
            _log.exception("mqtt %s: failed to handle a message", self.source)

    def _sys_message(self, payload: bytes, at: datetime) -> None:
        try:
            clients = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            with self._lock:
                self._report("sys_payload_invalid", "%s: expected an integer, got %r",
                             SYS_CLIENTS_CONNECTED, payload[:40])
            return
        with self._lock:
            self._broker_clients, self._broker_clients_at = clients, at

    def _ask_rebirth(self, client: mqtt.Client, rebirths: list[tuple[str, str]], at: datetime) -> None:
        for group, edge in rebirths:
            _log.info("mqtt %s: asking edge node %r/%r for a rebirth", self.source, group, edge)
            client.publish(f"{NAMESPACE}/{group}/NCMD/{edge}", encode_rebirth_request(int(at.timestamp() * 1000)))
