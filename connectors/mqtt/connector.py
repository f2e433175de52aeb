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
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
    DecodedPayload,
    SparkplugError,
    SparkplugTopic,
    decode_payload,
    encode_rebirth_request,
    parse_topic,
)
from protocol.uscc import UsccInvalid, validate_uscc

_log = logging.getLogger(__name__)

KIND = "mqtt"
SYS_CLIENTS_CONNECTED = "$SYS/broker/clients/connected"
REBIRTH_MIN_INTERVAL = timedelta(seconds=60)  # ask one edge node for a rebirth at most this often
_KEEPALIVE_S = 30
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 1, 30

# The defaults of every optional key that has a fixed default; sample.toml is exactly these plus `host`.
DEFAULTS: Mapping[str, Any] = {
    "port": 1883,
    "tls": False,
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
_NO_DEFAULT = ("client_id", "username", "password", "enterprise")  # client_id: "tianping-agent-<random>"
_KNOWN = {*REQUIRED, *DEFAULTS, *_NO_DEFAULT}
_ENTERPRISE_FROM = ("group", "static")


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
        if opt("tls", bool):
            raise ConfigError(f"{where}.tls: expected false (TLS comes in a later release; terminate TLS in a "
                              "local bridge until then), got true")
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
            host=host, port=port, username=username, password=password, tls=False, sparkplug=sparkplug,
            sparkplug_groups=tuple(groups), enterprise_from=enterprise_from, enterprise=enterprise,
            topics=templates, freshness_window_s=float(freshness), max_devices=max_devices,
            rebirth=opt("rebirth", bool), timeout_s=float(timeout), **extra,
        )

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


@dataclass(slots=True)
class _Device:
    local_id: str
    identity: DeviceIdentity
    enterprise: str | None
    sparkplug: bool
    alive: bool = False
    last_data_at: datetime | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)  # replaced, never mutated


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
        self._uscc_cache: dict[str, bool] = {}
        self.stale_ndeath_ignored = 0

    @property
    def device_count(self) -> int:
        return len(self._devices)

    @property
    def edge_node_count(self) -> int:
        return len(self._nodes)

    # messages in -----------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, *, retained: bool, received_at: datetime) -> list[tuple[str, str]]:
        """Apply one message. Returns the (group, edge node) pairs to ask for a rebirth (only with rebirth on)."""
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
        if retained:
            self._report("sparkplug_retained", "retained %s on %r: Sparkplug messages are never retained; ignored",
                         parsed.message_type, topic)
            return []
        try:
            decoded = decode_payload(payload)
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
        kind = parsed.message_type
        if kind == "NDEATH":
            self._ndeath(parsed, node, decoded)
            return []
        if decoded.seq is None or decoded.seq > 255:
            self._report("sparkplug_payload_invalid", "%s on %r: expected a seq of 0..255, got %r",
                         kind, topic, decoded.seq)
            return []
        if kind == "NBIRTH":
            bd_seq = decoded.integer("bdSeq")
            if bd_seq is None:
                self._report("sparkplug_payload_invalid", "NBIRTH on %r without a bdSeq metric", topic)
                return []
            node.bd_seq, node.born, node.last_seq = bd_seq, True, decoded.seq
            for name in node.devices:  # a new NBIRTH invalidates every earlier device birth
                self._devices[("spb", *key, name)].alive = False
            return []
        rebirth = False
        if node.last_seq is not None and decoded.seq != (node.last_seq + 1) % 256:
            self._report("sparkplug_seq_gap", "edge node %r/%r: expected seq %d, got %d on %r",
                         parsed.group, parsed.edge_node, (node.last_seq + 1) % 256, decoded.seq, topic)
            rebirth = True
        node.last_seq = decoded.seq
        if not node.born:
            rebirth = True  # data from a node whose birth we did not see
        if kind != "NDATA":
            self._device_message(parsed, node, decoded, topic, payload, at)
        if rebirth and self._cfg.rebirth and (
            node.rebirth_asked_at is None or at - node.rebirth_asked_at >= REBIRTH_MIN_INTERVAL
        ):
            node.rebirth_asked_at = at
            return [key]
        return []

    def _ndeath(self, parsed: SparkplugTopic, node: _Node, decoded: DecodedPayload) -> None:
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

    def _device_message(self, parsed: SparkplugTopic, node: _Node, decoded: DecodedPayload, topic: str,
                        payload: bytes, at: datetime) -> None:
        assert parsed.device is not None
        key = ("spb", parsed.group, parsed.edge_node, parsed.device)
        device = self._devices.get(key)
        kind = parsed.message_type
        if device is None:
            if kind == "DDEATH":
                return  # the death of a device we never knew
            enterprise = self._enterprise(parsed.group)
            device = self._add(key, _Device(
                local_id=f"{parsed.group}/{parsed.edge_node}/{parsed.device}",
                identity=DeviceIdentity.local(KIND, parsed.group, parsed.edge_node, parsed.device),
                enterprise=enterprise, sparkplug=True,
            ))
            if device is None:
                return
            node.devices.add(parsed.device)
        msn: dict[str, str] = {}
        if kind == "DBIRTH":
            manufacturer = decoded.string("Properties/Manufacturer")
            model = decoded.string("Properties/Model")
            serial = decoded.string("Properties/SerialNumber")
            if manufacturer and model and serial:
                try:
                    device.identity = DeviceIdentity.manufacturer_model_serial(manufacturer, model, serial)
                    msn = {"manufacturer": manufacturer, "model": model, "serial": serial}
                except ValueError:  # blank after normalisation: keep the local identity
                    pass
            device.alive = True
        elif kind == "DDATA":
            device.alive = True
            if decoded.has_fresh_value:
                device.last_data_at = at
        else:  # DDEATH
            device.alive = False
        if not msn:
            msn = {k: device.evidence[k] for k in ("manufacturer", "model", "serial") if k in device.evidence}
        device.evidence = {
            "topic": topic, "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "received_at": at.isoformat(), "message_type": kind, "seq": decoded.seq,
            "bd_seq": node.bd_seq, **msn,
        }

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
        device.evidence = {"topic": topic, "payload_sha256": hashlib.sha256(payload).hexdigest(),
                           "received_at": at.isoformat(), "retained": retained}

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
                status=status, observed_at=now, enterprise=device.enterprise, evidence=device.evidence,
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
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()  # connected, and the broker acknowledged our subscriptions
        self._is_connected = False
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
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, clean_session=True)
        client.connect_timeout = cfg.timeout_s
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._closing = False
        client.connect_async(cfg.host, cfg.port, keepalive=_KEEPALIVE_S)
        client.loop_start()
        self._client = client
        if not await asyncio.to_thread(self._subscribed.wait, cfg.timeout_s):
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
        if reason_code.is_failure:
            with self._lock:
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
        with self._lock:
            self._report("connect_failed", "could not connect to %s; retrying", self.source)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._subscribed.clear()
        with self._lock:
            self._is_connected = False
            self._table.connection_lost()
            if not self._closing:
                self._report("connection_lost", "connection to %s lost (%s); reconnecting", self.source, reason_code)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        with self._lock:
            if refused:
                self._report("subscribe_refused", "broker refused %d subscription(s): %s", len(refused), refused)
            if mid == self._subscribe_mid:
                self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._handle_message(client, message)
        except Exception:  # a bug must not kill the network thread; it is counted and logged in full
            with self._lock:
                self.count_error("internal_error")
            _log.exception("mqtt %s: failed to handle a message", self.source)

    def _handle_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        at = self._now()
        try:
            topic = message.topic
        except UnicodeDecodeError:
            with self._lock:
                self._report("topic_invalid", "topic is not UTF-8: %r", message._topic[:200])
            return
        payload = bytes(message.payload)
        if topic == SYS_CLIENTS_CONNECTED:
            try:
                clients = int(payload.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                with self._lock:
                    self._report("sys_payload_invalid", "%s: expected an integer, got %r",
                                 SYS_CLIENTS_CONNECTED, payload[:40])
                return
            with self._lock:
                self._broker_clients, self._broker_clients_at = clients, at
            return
        with self._lock:
            rebirths = self._table.handle(topic, payload, retained=bool(message.retain), received_at=at)
        for group, edge in rebirths:
            _log.info("mqtt %s: asking edge node %r/%r for a rebirth", self.source, group, edge)
            client.publish(f"{NAMESPACE}/{group}/NCMD/{edge}", encode_rebirth_request(int(at.timestamp() * 1000)))
