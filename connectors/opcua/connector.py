"""Count the devices an OPC UA server lists under its DI DeviceSet, and which of them send fresh data.

One collection round (:meth:`OpcuaConnector.observe`):

1. Keep one session across rounds; if it was lost, reconnect and forget every node id learnt on the old
   session (the server may have restarted with another address space).
2. Browse the children of ``device_set`` (a browse path from Objects, default ``DeviceSet``) with batched
   Browse requests, draining continuation points with BrowseNext. Each child Object is a device.
3. Browse each new device's variables once per session (batched), to find ``Manufacturer``, ``Model``,
   ``SerialNumber``, ``ProductInstanceUri``, ``DeviceHealth``, the enterprise property and the activity
   variable by browse name.
4. Read all of them in chunked Read requests (at most ``max_nodes_per_call`` nodes, and at most the
   server's advertised OperationLimits).

Identity, strongest first: ProductInstanceUri; Manufacturer + Model + SerialNumber; else a local identity
(endpoint + node id). Manufacturer, model and serial always go into the evidence, so the agent can merge a
device that another protocol names only by manufacturer + model + serial.

Status:

- REGISTERED: listed under DeviceSet;
- REACHABLE: the read of its activity variable answered with a status that is not one of
  :data:`NOT_REACHABLE_CODES` (unknown node, no communication with the device, ...);
- ACTIVE: reachable, DeviceHealth is not FAILURE, the activity variable's status is Good and its
  SourceTimestamp advanced since the previous round (when there is no previous round for the device: lies
  within ``freshness_window_s`` of now). A SourceTimestamp more than ``freshness_window_s`` in the future is
  never fresh. Uncertain and Bad values are not active.

Peer problems (server down, timeouts, unknown nodes, malformed answers) are counted by stable error code
(:meth:`health`), logged once per episode, and never raised: the round returns what it could.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Self, TypeVar
from urllib.parse import urlparse

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError

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

logger = logging.getLogger(__name__)

KIND = "opcua"

#: Every optional key with a default; ``sample.toml`` is exactly these plus the required ``endpoint``.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "enterprise_property": "EnterpriseUSCC",
        "device_set": "DeviceSet",
        "activity_variable": "Value",
        "freshness_window_s": 300,
        "timeout_s": 5,
        "max_nodes_per_call": 1000,
        "security": "None",
    }
)
REQUIRED_KEYS = ("endpoint",)
OPTIONAL_KEYS_WITHOUT_DEFAULT = ("enterprise", "username", "password")
SUPPORTED_SECURITY = ("None",)

MAX_NODES_PER_CALL_LIMIT = 100_000
MAX_TIMEOUT_S = 300.0
MAX_BROWSE_NEXT_ROUNDS = 10_000  # a server that hands out continuation points for ever is cut off
MAX_EVIDENCE_TEXT = 200

DEVICE_HEALTH_FAILURE = 1  # DI DeviceHealthEnumeration
IDENTITY_PROPERTIES = ("Manufacturer", "Model", "SerialNumber", "ProductInstanceUri", "DeviceHealth")

#: Read results that mean "the device did not answer" (the node or the device behind it is not there).
NOT_REACHABLE_CODES = frozenset(
    {
        StatusCodes.BadNodeIdUnknown,
        StatusCodes.BadNodeIdInvalid,
        StatusCodes.BadAttributeIdInvalid,
        StatusCodes.BadNotReadable,
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadCommunicationError,
        StatusCodes.BadNotConnected,
        StatusCodes.BadNoCommunication,
        StatusCodes.BadServerNotConnected,
        StatusCodes.BadOutOfService,
        StatusCodes.BadWaitingForInitialData,
        StatusCodes.BadDeviceFailure,
        StatusCodes.BadTimeout,
    }
)
_UNKNOWN_NODE_CODES = frozenset({StatusCodes.BadNodeIdUnknown, StatusCodes.BadNodeIdInvalid})

_USCC = re.compile(r"[0-9A-HJ-NP-RTUW-Y]{18}")  # GB 32100-2015 alphabet (no I, O, S, V, Z)
_T = TypeVar("_T")


def default_config() -> dict[str, Any]:
    """The defaults of every optional key (a fresh, mutable copy)."""
    return dict(DEFAULTS)


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpcuaConfig:
    """A checked connector configuration."""

    endpoint: str
    enterprise: str | None
    enterprise_property: str
    device_set: tuple[str, ...]
    activity_variable: str
    freshness_window_s: float
    timeout_s: float
    max_nodes_per_call: int
    security: str
    username: str | None
    password: str | None = field(repr=False)


def _check_config(
    *,
    endpoint: str,
    enterprise: str | None,
    enterprise_property: str,
    device_set: str,
    activity_variable: str,
    freshness_window_s: float,
    timeout_s: float,
    max_nodes_per_call: int,
    security: str,
    username: str | None,
    password: str | None,
) -> OpcuaConfig:
    where = f"connectors.{KIND}"
    url = urlparse(endpoint)
    if url.scheme != "opc.tcp" or not url.hostname:
        raise ConfigError(f"{where}.endpoint: expected an opc.tcp://host[:port][/path] URL, got {endpoint!r}")
    try:
        url.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(f"{where}.endpoint: expected a port in 1..65535, got {endpoint!r}") from None
    if enterprise is not None and not _USCC.fullmatch(enterprise):
        raise ConfigError(
            f"{where}.enterprise: expected an 18-character unified social credit code, got {enterprise!r}"
        )
    path = tuple(device_set.split("/"))
    if any(not part.strip() for part in path):
        raise ConfigError(
            f"{where}.device_set: expected browse names from Objects separated by '/', got {device_set!r}"
        )
    if not activity_variable.strip():
        raise ConfigError(f"{where}.activity_variable: expected a browse name, got {activity_variable!r}")
    if not (math.isfinite(freshness_window_s) and freshness_window_s > 0):
        raise ConfigError(f"{where}.freshness_window_s: expected a number > 0, got {freshness_window_s!r}")
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        raise ConfigError(f"{where}.timeout_s: expected a number in (0, {MAX_TIMEOUT_S:g}], got {timeout_s!r}")
    if not 1 <= max_nodes_per_call <= MAX_NODES_PER_CALL_LIMIT:
        raise ConfigError(
            f"{where}.max_nodes_per_call: expected an integer in 1..{MAX_NODES_PER_CALL_LIMIT}, "
            f"got {max_nodes_per_call!r}"
        )
    if security not in SUPPORTED_SECURITY:
        raise ConfigError(
            f"{where}.security: only 'None' is supported for now (signing and encryption come later), "
            f"got {security!r}"
        )
    if (username is None) != (password is None):
        raise ConfigError(f"{where}: username and password go together; got only one of them")
    if username is not None and not username:
        raise ConfigError(f"{where}.username: expected a non-empty string, got {username!r}")
    return OpcuaConfig(
        endpoint=endpoint,
        enterprise=enterprise,
        enterprise_property=enterprise_property.strip(),
        device_set=tuple(p.strip() for p in path),
        activity_variable=activity_variable.strip(),
        freshness_window_s=float(freshness_window_s),
        timeout_s=float(timeout_s),
        max_nodes_per_call=max_nodes_per_call,
        security=security,
        username=username,
        password=password,
    )


# --- per-session state ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Session:
    """What one connection learnt: node ids are only trusted within it."""

    client: Client
    namespaces: list[str]
    device_set: ua.NodeId
    read_chunk: int
    browse_chunk: int
    # device node -> {browse name -> variable node}; filled once per device per session
    children: dict[ua.NodeId, dict[str, ua.NodeId]] = field(default_factory=dict)


@dataclass(slots=True)
class _Device:
    nodeid: ua.NodeId
    local_id: str
    values: dict[str, ua.DataValue] = field(default_factory=dict)


class _RoundAborted(Exception):
    """The session failed mid-round; the error is already counted."""


class OpcuaConnector(ConnectorBase):
    """Observe the devices under an OPC UA server's DI DeviceSet (see the module docstring)."""

    kind: ClassVar[str] = KIND

    def __init__(
        self,
        *,
        endpoint: str,
        enterprise: str | None = None,
        enterprise_property: str = DEFAULTS["enterprise_property"],
        device_set: str = DEFAULTS["device_set"],
        activity_variable: str = DEFAULTS["activity_variable"],
        freshness_window_s: float = DEFAULTS["freshness_window_s"],
        timeout_s: float = DEFAULTS["timeout_s"],
        max_nodes_per_call: int = DEFAULTS["max_nodes_per_call"],
        security: str = DEFAULTS["security"],
        username: str | None = None,
        password: str | None = None,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = _check_config(
            endpoint=endpoint,
            enterprise=enterprise,
            enterprise_property=enterprise_property,
            device_set=device_set,
            activity_variable=activity_variable,
            freshness_window_s=freshness_window_s,
            timeout_s=timeout_s,
            max_nodes_per_call=max_nodes_per_call,
            security=security,
            username=username,
            password=password,
        )
        super().__init__(source=endpoint)
        self._now = now
        self._session: _Session | None = None
        self._last_source_ts: dict[str, datetime] = {}  # local id -> SourceTimestamp read last round
        self._logged: set[str] = set()  # error codes already logged in the current episode
        self._requests = 0  # service calls in the current round
        self._last_round: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, now: Callable[[], datetime] = utc_now) -> Self:
        where = f"connectors.{KIND}"
        refuse_unknown(cfg, {*REQUIRED_KEYS, *DEFAULTS, *OPTIONAL_KEYS_WITHOUT_DEFAULT}, where=where)
        number = (int, float)
        return cls(
            endpoint=require(cfg, "endpoint", str, where=where),
            enterprise=optional(cfg, "enterprise", str, None, where=where),
            enterprise_property=optional(cfg, "enterprise_property", str, DEFAULTS["enterprise_property"],
                                         where=where),
            device_set=optional(cfg, "device_set", str, DEFAULTS["device_set"], where=where),
            activity_variable=optional(cfg, "activity_variable", str, DEFAULTS["activity_variable"], where=where),
            freshness_window_s=optional(cfg, "freshness_window_s", number, DEFAULTS["freshness_window_s"],
                                        where=where),
            timeout_s=optional(cfg, "timeout_s", number, DEFAULTS["timeout_s"], where=where),
            max_nodes_per_call=optional(cfg, "max_nodes_per_call", int, DEFAULTS["max_nodes_per_call"],
                                        where=where),
            security=optional(cfg, "security", str, DEFAULTS["security"], where=where),
            username=optional(cfg, "username", str, None, where=where),
            password=optional(cfg, "password", str, None, where=where),
            now=now,
        )

    # --- contract ---------------------------------------------------------------------------------------

    async def observe(self) -> Sequence[DeviceObservation]:
        now = self._now()
        self._requests = 0
        errors_before = sum(self._errors.values())
        devices: list[_Device] = []
        try:
            session = await self._ensure_session()
            devices = await self._list_devices(session)
            await self._learn_children(session, devices)
            await self._read_values(session, devices)
        except _RoundAborted:
            pass
        observations = [self._observation(device, now) for device in devices]
        self._remember_timestamps(devices)
        self._last_round = {
            "requests": self._requests,
            "devices": len(observations),
            "active": sum(1 for o in observations if o.status is DeviceStatus.ACTIVE),
        }
        if sum(self._errors.values()) == errors_before:
            self._logged.clear()  # a clean round ends the episode: the next failure is logged again
        return observations

    def health(self) -> ConnectorHealth:
        return ConnectorHealth(
            kind=self.kind,
            source=self.source,
            errors=dict(self._errors),
            extra={"connected": self._session is not None, "last_round": dict(self._last_round)},
        )

    async def aclose(self) -> None:
        await self._drop_session()

    # --- session ----------------------------------------------------------------------------------------

    async def _ensure_session(self) -> _Session:
        session = self._session
        if session is not None and session.client.uaclient.state is UaClientState.CONNECTED:
            return session
        if session is not None:
            self._fail("opcua_connection_lost", "OPC UA session to %s was lost; reconnecting", self.source)
            await self._drop_session()
        cfg = self.config
        client = Client(cfg.endpoint, timeout=cfg.timeout_s, watchdog_intervall=max(cfg.timeout_s, 1.0))
        client.name = client.description = "Tianping edge agent"
        client.application_uri = "urn:tianping:agent:opcua"
        client.session_timeout = 600_000  # ms; what most servers grant, so none has to revise it
        if cfg.username is not None and cfg.password is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password)
        try:
            async with asyncio.timeout(cfg.timeout_s):
                await client.connect()
        except asyncio.CancelledError:
            await _close_quietly(client, cfg.timeout_s)
            raise
        except Exception as exc:  # any failure to connect is a peer problem
            await _close_quietly(client, cfg.timeout_s)
            self._fail("opcua_connect_failed", "cannot connect to OPC UA server %s: %s", self.source, _describe(exc))
            raise _RoundAborted from exc
        self._session = session = _Session(client, [], ua.NodeId(), cfg.max_nodes_per_call, cfg.max_nodes_per_call)
        try:
            await self._prepare_session(session)
        except _RoundAborted:
            await self._drop_session()
            raise
        logger.info("connected to OPC UA server %s (DeviceSet %s)", self.source, session.device_set.to_string())
        return session

    async def _prepare_session(self, session: _Session) -> None:
        """Namespace table and operation limits, then resolve the DeviceSet browse path."""
        server_nodes = (
            ObjectIds.Server_NamespaceArray,
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse,
        )
        values = await self._read(session, [_ns0(i) for i in server_nodes])
        namespaces, max_read, max_browse = (v.Value.Value if v.Value is not None and _good(v) else None
                                            for v in values)
        if isinstance(namespaces, list) and all(isinstance(n, str) for n in namespaces):
            session.namespaces = namespaces
        session.read_chunk = _within_limit(session.read_chunk, max_read)
        session.browse_chunk = _within_limit(session.browse_chunk, max_browse)
        node = _ns0(ObjectIds.ObjectsFolder)
        walked = "Objects"
        for name in self.config.device_set:
            [refs] = await self._browse(session, [node], node_class=ua.NodeClass.Object)
            matches = [_plain(r.NodeId) for r in refs or () if r.BrowseName.Name == name and _local(r.NodeId)]
            if not matches:
                self._fail("opcua_device_set_missing", "OPC UA server %s has no %r under %s",
                           self.source, name, walked)
                raise _RoundAborted
            node = self._prefer_di(matches)
            walked += "/" + name
        session.device_set = node

    def _prefer_di(self, nodes: list[ua.NodeId]) -> ua.NodeId:
        for nodeid in nodes:
            if self._namespace_uri(nodeid) == "http://opcfoundation.org/UA/DI/":
                return nodeid
        return nodes[0]

    async def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await _close_quietly(session.client, self.config.timeout_s)

    # --- the round --------------------------------------------------------------------------------------

    async def _list_devices(self, session: _Session) -> list[_Device]:
        [refs] = await self._browse(session, [session.device_set], node_class=ua.NodeClass.Object)
        if refs is None:
            self._fail("opcua_device_set_missing", "OPC UA server %s no longer answers a browse of DeviceSet %s",
                       self.source, session.device_set.to_string())
            await self._drop_session()  # browse it again from Objects on the next round
            raise _RoundAborted
        devices: dict[ua.NodeId, _Device] = {}
        for ref in refs:
            if not _local(ref.NodeId):
                continue  # a device on another server is that server's to count
            nodeid = _plain(ref.NodeId)
            devices.setdefault(nodeid, _Device(nodeid, self._stable_id(nodeid)))
        listed = set(devices)
        for gone in set(session.children) - listed:
            del session.children[gone]
        return list(devices.values())

    async def _learn_children(self, session: _Session, devices: list[_Device]) -> None:
        wanted = {*IDENTITY_PROPERTIES, self.config.activity_variable}
        if self.config.enterprise_property:
            wanted.add(self.config.enterprise_property)
        new = [d.nodeid for d in devices if d.nodeid not in session.children]
        if not new:
            return
        results = await self._browse(session, new, node_class=ua.NodeClass.Variable)
        for nodeid, refs in zip(new, results, strict=True):
            if refs is None:
                continue  # counted by _browse; the device stays REGISTERED and is browsed again next round
            found: dict[str, ua.NodeId] = {}
            for ref in refs:
                name = ref.BrowseName.Name
                if name in wanted and name not in found and _local(ref.NodeId):
                    found[name] = _plain(ref.NodeId)
            if self.config.activity_variable not in found:
                self._fail("opcua_activity_variable_missing", "OPC UA device %s on %s has no variable %r",
                           nodeid.to_string(), self.source, self.config.activity_variable)
            session.children[nodeid] = found

    async def _read_values(self, session: _Session, devices: list[_Device]) -> None:
        wanted: list[tuple[_Device, str, ua.NodeId]] = [
            (device, name, nodeid)
            for device in devices
            for name, nodeid in session.children.get(device.nodeid, {}).items()
        ]
        values: list[ua.DataValue] = []
        try:
            await self._read(session, [nodeid for _, _, nodeid in wanted], into=values)
        finally:
            # Keep what the chunks read before a failure: those devices answered.
            stale: set[ua.NodeId] = set()
            for (device, name, _), value in zip(wanted, values, strict=False):
                if _code(value) in _UNKNOWN_NODE_CODES:
                    stale.add(device.nodeid)
                device.values[name] = value
            for nodeid in stale:
                # The server forgot a variable it listed: browse the device again next round.
                session.children.pop(nodeid, None)
                self._fail("opcua_node_unknown", "OPC UA server %s no longer knows a variable of %s",
                           self.source, nodeid.to_string())

    # --- services, chunked ------------------------------------------------------------------------------

    async def _read(
        self, session: _Session, nodes: list[ua.NodeId], *, into: list[ua.DataValue] | None = None
    ) -> list[ua.DataValue]:
        """Read the Value attribute of every node, in chunks, appending to ``into`` as chunks arrive;
        a malformed answer reads as BadUnexpectedError."""
        out: list[ua.DataValue] = [] if into is None else into
        for chunk in _chunks(nodes, session.read_chunk):
            params = ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=AttributeIds.Value) for n in chunk],
            )
            results = await self._call(session, "Read", session.client.uaclient.read(params))
            if len(results) != len(chunk) or not all(isinstance(r, ua.DataValue) for r in results):
                self._fail("opcua_malformed_answer", "OPC UA server %s answered %d results to a Read of %d nodes",
                           self.source, len(results), len(chunk))
                results = [ua.DataValue(StatusCode=_status(StatusCodes.BadUnexpectedError))] * len(chunk)
            out.extend(results)
        return out

    async def _browse(
        self, session: _Session, nodes: list[ua.NodeId], *, node_class: ua.NodeClass
    ) -> list[list[ua.ReferenceDescription] | None]:
        """Forward hierarchical references of every node (of one node class), draining continuation
        points. ``None`` for a node whose browse failed (counted)."""
        out: list[list[ua.ReferenceDescription] | None] = []
        for chunk in _chunks(nodes, session.browse_chunk):
            params = ua.BrowseParameters(
                View=ua.ViewDescription(),
                RequestedMaxReferencesPerNode=0,
                NodesToBrowse=[
                    ua.BrowseDescription(
                        NodeId=n,
                        BrowseDirection=ua.BrowseDirection.Forward,
                        ReferenceTypeId=_ns0(ObjectIds.HierarchicalReferences),
                        IncludeSubtypes=True,
                        NodeClassMask=int(node_class),
                        ResultMask=int(ua.BrowseResultMask.All),
                    )
                    for n in chunk
                ],
            )
            results = await self._call(session, "Browse", session.client.uaclient.browse(params))
            if len(results) != len(chunk):
                self._fail("opcua_malformed_answer", "OPC UA server %s answered %d results to a Browse of %d nodes",
                           self.source, len(results), len(chunk))
                out.extend([None] * len(chunk))
                continue
            refs: list[list[ua.ReferenceDescription] | None] = []
            pending: dict[int, bytes] = {}
            for i, (nodeid, result) in enumerate(zip(chunk, results, strict=True)):
                if not _browse_ok(result):
                    self._browse_failed(nodeid, result)
                    refs.append(None)
                    continue
                refs.append(list(result.References or ()))
                if result.ContinuationPoint:
                    pending[i] = result.ContinuationPoint
            await self._drain(session, chunk, refs, pending)
            out.extend(refs)
        return out

    async def _drain(
        self,
        session: _Session,
        chunk: list[ua.NodeId],
        refs: list[list[ua.ReferenceDescription] | None],
        pending: dict[int, bytes],
    ) -> None:
        rounds = 0
        while pending:
            rounds += 1
            if rounds > MAX_BROWSE_NEXT_ROUNDS:
                self._fail("opcua_malformed_answer", "OPC UA server %s kept returning continuation points",
                           self.source)
                await self._call(session, "BrowseNext", session.client.uaclient.browse_next(
                    ua.BrowseNextParameters(ReleaseContinuationPoints=True,
                                            ContinuationPoints=list(pending.values()))))
                return
            batch = list(pending.items())[: session.browse_chunk]
            params = ua.BrowseNextParameters(ReleaseContinuationPoints=False, ContinuationPoints=[c for _, c in batch])
            results = await self._call(session, "BrowseNext", session.client.uaclient.browse_next(params))
            if len(results) != len(batch):
                self._fail("opcua_malformed_answer", "OPC UA server %s answered %d results to a BrowseNext of %d",
                           self.source, len(results), len(batch))
                for i, _ in batch:
                    refs[i] = None
                    del pending[i]
                continue
            for (i, _), result in zip(batch, results, strict=True):
                del pending[i]
                known = refs[i]
                if not _browse_ok(result) or known is None:
                    self._browse_failed(chunk[i], result)
                    refs[i] = None
                    continue
                known.extend(result.References or ())
                if result.ContinuationPoint:
                    pending[i] = result.ContinuationPoint

    async def _call(self, session: _Session, service: str, request: Any) -> Any:
        """Await one service call under the configured timeout; a failure drops the session."""
        self._requests += 1
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await request
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            code, text = "opcua_timeout", f"no answer within {self.config.timeout_s:g} s"
        except (ConnectionError, OSError) as exc:
            code, text = "opcua_connection_lost", _describe(exc)
        except UaStatusCodeError as exc:
            code, text = "opcua_service_fault", _describe(exc)
        except Exception as exc:  # an answer asyncua could not decode is a peer problem
            code, text = "opcua_malformed_answer", _describe(exc)
        self._fail(code, "OPC UA %s to %s failed: %s", service, self.source, text)
        await self._drop_session()
        raise _RoundAborted

    def _browse_failed(self, nodeid: ua.NodeId, result: Any) -> None:
        status = getattr(result, "StatusCode", None)
        name = status.name if isinstance(status, ua.StatusCode) else "malformed"
        code = "opcua_node_unknown" if _code_of(status) in _UNKNOWN_NODE_CODES else "opcua_browse_failed"
        self._fail(code, "OPC UA server %s refused to browse %s: %s", self.source, nodeid.to_string(), name)

    # --- turning answers into observations --------------------------------------------------------------

    def _observation(self, device: _Device, now: datetime) -> DeviceObservation:
        cfg = self.config
        text = {name: _text(device.values.get(name)) for name in ("Manufacturer", "Model", "SerialNumber",
                                                                     "ProductInstanceUri")}
        manufacturer, model, serial, uri = (text[n] for n in ("Manufacturer", "Model", "SerialNumber",
                                                               "ProductInstanceUri"))
        if uri:
            identity = DeviceIdentity.product_instance_uri(uri)
        elif manufacturer and model and serial:
            identity = DeviceIdentity.manufacturer_model_serial(manufacturer, model, serial)
        else:
            identity = DeviceIdentity.local(KIND, cfg.endpoint, device.local_id)
        evidence: dict[str, Any] = {"node_id": device.local_id}
        for key, value in (("manufacturer", manufacturer), ("model", model), ("serial", serial),
                           ("product_instance_uri", uri)):
            if value:
                evidence[key] = value
        activity = device.values.get(cfg.activity_variable)
        status = DeviceStatus.REGISTERED
        if activity is not None and _code(activity) not in NOT_REACHABLE_CODES:
            status = DeviceStatus.REACHABLE
            evidence.update(_data_value_evidence(activity))
            health = _health(device.values.get("DeviceHealth"))
            if health is not None:
                evidence["device_health"] = health
            if health != DEVICE_HEALTH_FAILURE and _good(activity) and self._fresh(device, activity, now):
                status = DeviceStatus.ACTIVE
        return DeviceObservation(
            protocol=KIND,
            source=cfg.endpoint,
            local_id=device.local_id,
            identity=identity,
            status=status,
            observed_at=now,
            enterprise=self._enterprise(device),
            evidence=evidence,
        )

    def _fresh(self, device: _Device, value: ua.DataValue, now: datetime) -> bool:
        ts = _aware(value.SourceTimestamp)
        if ts is None:
            return False
        window = timedelta(seconds=self.config.freshness_window_s)
        if ts > now + window:
            return False  # a clock far ahead proves nothing about fresh data
        previous = self._last_source_ts.get(device.local_id)
        if previous is None:
            return abs(now - ts) <= window
        return ts > previous

    def _remember_timestamps(self, devices: list[_Device]) -> None:
        seen: dict[str, datetime] = {}
        for device in devices:
            activity = device.values.get(self.config.activity_variable)
            ts = _aware(activity.SourceTimestamp) if activity is not None else None
            if ts is not None:
                seen[device.local_id] = ts
            elif device.local_id in self._last_source_ts:
                seen[device.local_id] = self._last_source_ts[device.local_id]
        if devices or self._session is not None:
            self._last_source_ts = seen
        # else: the server was unreachable; keep what we knew so the next round compares against it

    def _enterprise(self, device: _Device) -> str | None:
        prop = self.config.enterprise_property
        if prop:
            raw = _text(device.values.get(prop))
            if raw:
                code = raw.upper()
                if _USCC.fullmatch(code):
                    return code
                self._fail("opcua_enterprise_malformed", "OPC UA device %s on %s names enterprise %r, "
                           "not a unified social credit code", device.local_id, self.source, raw[:40])
        return self.config.enterprise

    def _stable_id(self, nodeid: ua.NodeId) -> str:
        """The node id with its namespace URI instead of its index (indexes may change across restarts)."""
        text = nodeid.to_string()
        uri = self._namespace_uri(nodeid)
        if nodeid.NamespaceIndex == 0 or uri is None:
            return text
        return f"nsu={uri};{text.split(';', 1)[1]}"

    def _namespace_uri(self, nodeid: ua.NodeId) -> str | None:
        namespaces = self._session.namespaces if self._session is not None else []
        idx = nodeid.NamespaceIndex
        return namespaces[idx] if 0 <= idx < len(namespaces) else None

    def _fail(self, code: str, message: str, *args: Any) -> None:
        """Count an error; log it once per episode (until a round without errors)."""
        self.count_error(code)
        if code in self._logged:
            logger.debug(message, *args)
        else:
            self._logged.add(code)
            logger.warning(message + " [%s]", *args, code)


# --- helpers ----------------------------------------------------------------------------------------------


def _ns0(identifier: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(identifier))


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _within_limit(chunk: int, limit: Any) -> int:
    """The chunk size lowered to a server's advertised OperationLimit (0 or absent: no limit)."""
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return min(chunk, limit)
    return chunk


def _chunks(items: list[_T], size: int) -> Iterator[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def _close_quietly(client: Client, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await client.disconnect()
    except asyncio.CancelledError:
        client.disconnect_socket()
        raise
    except Exception:  # the peer is gone or misbehaving; the socket is closed below anyway
        logger.debug("closing the OPC UA client raised", exc_info=True)
    client.disconnect_socket()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _code_of(status: Any) -> int | None:
    return status.value if isinstance(status, ua.StatusCode) else None


def _code(value: ua.DataValue) -> int:
    status = value.StatusCode
    return StatusCodes.Good if status is None else status.value


def _good(value: ua.DataValue) -> bool:
    return value.StatusCode is None or value.StatusCode.is_good()


def _browse_ok(result: Any) -> bool:
    return isinstance(result, ua.BrowseResult) and (result.StatusCode is None or result.StatusCode.is_good())


def _local(nodeid: ua.NodeId) -> bool:
    return not (isinstance(nodeid, ua.ExpandedNodeId) and (nodeid.ServerIndex or nodeid.NamespaceUri))


def _plain(nodeid: ua.NodeId) -> ua.NodeId:
    return ua.NodeId(nodeid.Identifier, nodeid.NamespaceIndex, nodeid.NodeIdType)


def _aware(ts: datetime | None) -> datetime | None:
    if not isinstance(ts, datetime):
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _text(value: ua.DataValue | None) -> str:
    """A String or LocalizedText property's text, stripped; empty when absent, bad or of another type."""
    if value is None or not _good(value) or value.Value is None:
        return ""
    raw = value.Value.Value
    if isinstance(raw, ua.LocalizedText):
        raw = raw.Text
    return raw.strip() if isinstance(raw, str) else ""


def _health(value: ua.DataValue | None) -> int | None:
    if value is None or not _good(value) or value.Value is None:
        return None
    raw = value.Value.Value
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def _data_value_evidence(value: ua.DataValue) -> dict[str, Any]:
    raw = value.Value.Value if value.Value is not None else None
    shown: Any
    if raw is None or isinstance(raw, bool | int | str):
        shown = raw[:MAX_EVIDENCE_TEXT] if isinstance(raw, str) else raw
    elif isinstance(raw, float):
        shown = raw if math.isfinite(raw) else repr(raw)
    else:
        shown = repr(raw)[:MAX_EVIDENCE_TEXT]
    status = value.StatusCode if value.StatusCode is not None else _status(StatusCodes.Good)
    source, server = _aware(value.SourceTimestamp), _aware(value.ServerTimestamp)
    return {
        "value": shown,
        "status": status.name,
        "source_timestamp": source.isoformat() if source else None,
        "server_timestamp": server.isoformat() if server else None,
    }
