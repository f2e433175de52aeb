"""A simulated plant's OPC UA server (asyncua), built from a :class:`~simulator.plant.PlantSpec`.

Two address-space layouts, as real plant servers have them.

``layout="di"`` (default), OPC UA for Devices (DI, OPC 10000-100)::

    Objects
    └── DeviceSet                 (ns = http://opcfoundation.org/UA/DI/, i=5001)
        ├── DeviceFeatures        (FolderType, DI i=15034: not a device)
        ├── dev00000              (DeviceType ⊂ ComponentType ⊂ TopologyElementType; one per OPC UA device)
        │   ├── Manufacturer      property, String
        │   ├── Model             property, String
        │   ├── SerialNumber      property, String
        │   ├── ProductInstanceUri property, String
        │   ├── DeviceHealth      property, Int32 (0 NORMAL, 1 FAILURE, 2 CHECK_FUNCTION, 3 OFF_SPEC,
        │   │                                      4 MAINTENANCE_REQUIRED)
        │   ├── EnterpriseUSCC    property, String (not in DI: the owner's unified social credit code)
        │   └── Value             variable, Double: the process value
        └── ...

``layout="kepware"``, a server without the DI model (a KEPServerEX-style channel/device tree)::

    Objects
    ├── _System                   (FolderType: the server's own diagnostics, not a device)
    ├── Channel1                  (FolderType, s=Channel1)
    │   ├── _System               (FolderType, s=Channel1._System)
    │   ├── dev00000              (FolderType, s=Channel1.dev00000)
    │   │   ├── _System           (FolderType)
    │   │   ├── Manufacturer, Model, SerialNumber, EnterpriseUSCC   tags, String
    │   │   └── Value             tag, Double
    │   └── ...                   (``devices_per_channel`` devices per channel)
    └── Channel2 ...

A background task writes a new ``Value`` (new SourceTimestamp, status Good) to every active device each
``update_interval_s``. Inactive devices are "connected but silent": their Value is Good but its
SourceTimestamp is :data:`STALE_SOURCE_TIMESTAMP` and never advances (also across server restarts).

Behaviour of real servers that asyncua's server lacks, switched on by options:

- ``max_references_per_node``: Browse answers at most this many references per node (or fewer when the
  client asks for fewer) and hands out continuation points that BrowseNext drains (asyncua's own server
  ignores RequestedMaxReferencesPerNode and does not implement BrowseNext);
- Browse answers only the ReferenceDescription fields of the request's ResultMask, and Read only the
  timestamps of its TimestampsToReturn, as the specification asks (asyncua's server always sends all);
- ``max_nodes_per_read`` / ``max_nodes_per_browse``: advertised in ServerCapabilities/OperationLimits and
  enforced (a larger request is refused with BadTooManyOperations);
- ``id_prefix`` and :meth:`OpcuaPlant.reload`: the same devices under other node ids, as after a server
  restart or a configuration reload;
- ``security`` / ``users``: Basic256Sha256 Sign and SignAndEncrypt endpoints with a certificate, and a user
  manager that accepts only the configured user names and passwords;
- :meth:`OpcuaPlant.freeze`: the server keeps its connections but stops answering.

:class:`HangingPeer` accepts TCP connections and never answers at all.

asyncua checks every new child against all of its parent's references, so adding N devices to one flat
folder one by one is quadratic (BASELINES.md). The device objects are therefore added without a parent and
then linked directly in the server's address space, which is linear; their own variables are added through
the ordinary (checked) node-management service.

The simulator plays the outside world: it imports nothing from the project except ``simulator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import hmac
import ipaddress
import itertools
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, cast

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.ua_binary import struct_from_binary
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulator.plant import PlantSpec, SimDevice

logger = logging.getLogger(__name__)

DI_NAMESPACE_URI = "http://opcfoundation.org/UA/DI/"
PLANT_NAMESPACE_URI = "urn:tianping:simulator:plant"
SERVER_APPLICATION_URI = "urn:tianping:simulator:opcua-server"
ENDPOINT_PATH = "/tianping/plant"
DEVICE_SET_ID = 5001  # DeviceSet's numeric id in the DI nodeset
DEVICE_FEATURES_ID = 15034
TOPOLOGY_ELEMENT_TYPE_ID = 1001
DEVICE_TYPE_ID = 1002
COMPONENT_TYPE_ID = 15063
ENTERPRISE_PROPERTY = "EnterpriseUSCC"
ACTIVITY_VARIABLE = "Value"
# The SourceTimestamp a silent device keeps for ever: the day the Jiaxing measures came into force.
STALE_SOURCE_TIMESTAMP = datetime(2021, 3, 1, tzinfo=UTC)

#: The security settings the plant can offer (asyncua's names, without the policy type prefix).
SECURITY_CHOICES: Mapping[str, ua.SecurityPolicyType] = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}

_BROWSE = ua.NodeId(ua.Int32(ObjectIds.BrowseRequest_Encoding_DefaultBinary))
_BROWSE_NEXT = ua.NodeId(ua.Int32(ObjectIds.BrowseNextRequest_Encoding_DefaultBinary))
_READ = ua.NodeId(ua.Int32(ObjectIds.ReadRequest_Encoding_DefaultBinary))


class DeviceHealth(enum.IntEnum):
    """DI DeviceHealthEnumeration."""

    NORMAL = 0
    FAILURE = 1
    CHECK_FUNCTION = 2
    OFF_SPEC = 3
    MAINTENANCE_REQUIRED = 4


def write_self_signed_certificate(
    cert_path: Path, key_path: Path, *, application_uri: str, common_name: str, server: bool
) -> None:
    """Write an OPC UA application instance certificate (DER) and its private key (PEM, unencrypted).

    The certificate names ``application_uri`` and ``127.0.0.1`` / ``localhost`` as subject alternative names, as
    OPC 10000-6 6.2.2 asks."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tianping simulator")])
    now = datetime.now(UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(application_uri),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                     data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


class _OnlyTheseUsers:
    """A user manager that accepts the configured user names and passwords and nobody else."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def get_user(self, iserver: InternalServer, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        expected = self._users.get(username or "")
        if expected is None or password is None or not hmac.compare_digest(expected, password):
            return None
        return User(role=UserRole.User, name=username)


# --- a server with the behaviour asyncua's lacks ------------------------------------------------------------


@dataclass(slots=True)
class _Behaviour:
    """Per-server switches and the continuation points handed out (shared by all connections)."""

    max_references_per_node: int = 0
    max_nodes_per_read: int = 0
    max_nodes_per_browse: int = 0
    frozen: bool = False
    continuation: dict[bytes, list[ua.ReferenceDescription]] = field(default_factory=dict)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    requests: dict[str, int] = field(default_factory=dict)  # service -> requests answered


class _Processor(UaProcessor):
    def __init__(self, behaviour: _Behaviour, *args: Any) -> None:
        super().__init__(*args)
        self._behaviour = behaviour

    async def _process_message(self, typeid: ua.NodeId, requesthdr: Any, seqhdr: Any, body: Any) -> bool:
        b = self._behaviour
        if b.frozen:
            return True  # read and dropped: the peer hangs
        session = self.session
        if session is None or not session.is_activated() or typeid not in (_BROWSE, _BROWSE_NEXT, _READ):
            return cast(bool, await super()._process_message(typeid, requesthdr, seqhdr, body))  # type: ignore[no-untyped-call]
        session.touch()
        response: Any
        if typeid == _READ:
            read = struct_from_binary(ua.ReadParameters, body)
            _limit(len(read.NodesToRead), b.max_nodes_per_read)
            response = ua.ReadResponse(Results=_timestamps(await session.read(read), read.TimestampsToReturn))
            name = "Read"
        elif typeid == _BROWSE:
            browse = struct_from_binary(ua.BrowseParameters, body)
            _limit(len(browse.NodesToBrowse), b.max_nodes_per_browse)
            results = [_masked(r, d.ResultMask) for r, d in zip(await session.browse(browse), browse.NodesToBrowse,
                                                                  strict=True)]
            page = min(x for x in (browse.RequestedMaxReferencesPerNode, b.max_references_per_node, 1 << 31) if x)
            response = ua.BrowseResponse(Results=[self._page(r, page) for r in results])
            name = "Browse"
        else:
            more = struct_from_binary(ua.BrowseNextParameters, body)
            _limit(len(more.ContinuationPoints), b.max_nodes_per_browse)
            page = b.max_references_per_node or 1 << 31
            out: list[ua.BrowseResult] = []
            for point in more.ContinuationPoints:
                rest = b.continuation.pop(point, None)
                if rest is None:
                    out.append(ua.BrowseResult(StatusCode=_status(StatusCodes.BadContinuationPointInvalid)))
                elif more.ReleaseContinuationPoints:
                    out.append(ua.BrowseResult())
                else:
                    out.append(self._page(ua.BrowseResult(References=rest), page))
            response = ua.BrowseNextResponse(Parameters=ua.BrowseNextResult(Results=out))
            name = "BrowseNext"
        b.requests[name] = b.requests.get(name, 0) + 1
        self.send_response(requesthdr.RequestHandle, seqhdr, response)  # type: ignore[no-untyped-call]
        return True

    def _page(self, result: ua.BrowseResult, page: int) -> ua.BrowseResult:
        refs = result.References
        if len(refs) <= page:
            return result
        point = f"cp{next(self._behaviour.counter)}".encode()
        self._behaviour.continuation[point] = refs[page:]
        return ua.BrowseResult(StatusCode=result.StatusCode, ContinuationPoint=point, References=refs[:page])


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


_ALL = int(ua.BrowseResultMask.All)


def _masked(result: ua.BrowseResult, mask: int) -> ua.BrowseResult:
    """Only the ReferenceDescription fields the client asked for (asyncua's server returns them all)."""
    if mask & _ALL == _ALL or not result.References:
        return result
    null = ua.NodeId()
    return ua.BrowseResult(StatusCode=result.StatusCode, References=[ua.ReferenceDescription(
        ReferenceTypeId=r.ReferenceTypeId if mask & 1 else null,
        IsForward=r.IsForward,
        NodeId=r.NodeId,
        BrowseName=r.BrowseName if mask & 8 else ua.QualifiedName(),
        DisplayName=r.DisplayName if mask & 16 else ua.LocalizedText(),
        NodeClass=r.NodeClass if mask & 4 else ua.NodeClass.Unspecified,
        TypeDefinition=r.TypeDefinition if mask & 32 else null,
    ) for r in result.References])


def _timestamps(values: list[ua.DataValue], which: ua.TimestampsToReturn) -> list[ua.DataValue]:
    """Only the timestamps the client asked for (asyncua's server returns the stored ones)."""
    if which == ua.TimestampsToReturn.Both:
        return values
    source = which == ua.TimestampsToReturn.Source
    server = which == ua.TimestampsToReturn.Server
    return [ua.DataValue(Value=v.Value, StatusCode=v.StatusCode,
                         SourceTimestamp=v.SourceTimestamp if source else None,
                         ServerTimestamp=v.ServerTimestamp if server else None) for v in values]


def _limit(count: int, limit: int) -> None:
    if limit and count > limit:
        raise ServiceError(StatusCodes.BadTooManyOperations)


class _Protocol(OPCUAProtocol):
    behaviour: _Behaviour

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.processor is not None:  # not refused for max_connections
            self.processor = _Processor(self.behaviour, self.iserver, self.transport, self.limits)
            self.processor.set_policies(self.policies)  # type: ignore[no-untyped-call]


class _BinaryServer(BinaryServer):
    behaviour: _Behaviour

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = _Protocol(iserver=self.iserver, policies=self._policies, clients=self.clients,
                             closing_tasks=self.closing_tasks, limits=self.limits)
        protocol.behaviour = self.behaviour
        return protocol


class _Server(Server):
    """asyncua's Server with the listener above (Server.start, with another BinaryServer)."""

    def __init__(self, behaviour: _Behaviour, user_manager: Any = None) -> None:
        super().__init__(user_manager=user_manager)
        self.behaviour = behaviour

    async def start(self) -> None:
        await self._setup_server_nodes()
        await self.iserver.start()
        host, port = self._get_bind_socket_info()
        bserver = _BinaryServer(self.iserver, host, port, self.limits)  # type: ignore[arg-type]  # as Server.start
        bserver.behaviour = self.behaviour
        bserver.set_policies(self._policies)
        self.bserver = bserver
        try:
            await bserver.start()
        except Exception:
            await self.iserver.stop()
            raise


# --- the plant --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tree:
    """The node ids one build of the plant's address space created (so that a reload can remove them)."""

    roots: list[ua.NodeId] = field(default_factory=list)  # linked under Objects
    nodes: list[ua.NodeId] = field(default_factory=list)
    value_ids: dict[int, ua.NodeId] = field(default_factory=dict)
    health_ids: dict[int, ua.NodeId] = field(default_factory=dict)


class OpcuaPlant:
    """An asyncua server exposing the plant's OPC UA devices (see the module docstring)."""

    def __init__(
        self,
        spec: PlantSpec,
        *,
        host: str = "127.0.0.1",
        port: int,
        update_interval_s: float = 0.5,
        with_product_instance_uri: bool = True,
        layout: Literal["di", "kepware"] = "di",
        devices_per_channel: int = 10,
        id_prefix: str = "",
        max_references_per_node: int = 0,
        max_nodes_per_read: int = 0,
        max_nodes_per_browse: int = 0,
        security: Sequence[str] = ("None",),
        certificate: Path | None = None,
        private_key: Path | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        """``with_product_instance_uri=False`` leaves the property out, as older DI servers do, so that
        manufacturer + model + serial number is the strongest identity a client finds. ``id_prefix``
        prefixes every node id of the plant (in the DI layout DeviceSet then gets a string id too)."""
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port!r}")
        if not update_interval_s > 0:
            raise ValueError(f"update_interval_s must be > 0, got {update_interval_s!r}")
        if layout not in ("di", "kepware"):
            raise ValueError(f"layout must be 'di' or 'kepware', got {layout!r}")
        if devices_per_channel < 1:
            raise ValueError(f"devices_per_channel must be >= 1, got {devices_per_channel!r}")
        for limit in (max_references_per_node, max_nodes_per_read, max_nodes_per_browse):
            if limit < 0:
                raise ValueError(f"limits must be >= 0 (0: none), got {limit!r}")
        unknown = [s for s in security if s not in SECURITY_CHOICES]
        if not security or unknown:
            raise ValueError(f"security must be some of {sorted(SECURITY_CHOICES)}, got {list(security)!r}")
        if any(s != "None" for s in security) and (certificate is None or private_key is None):
            raise ValueError("signing and encryption need the server's certificate and private_key")
        self.spec = spec
        self.host = host
        self.port = port
        self.update_interval_s = update_interval_s
        self.with_product_instance_uri = with_product_instance_uri
        self.layout = layout
        self.devices_per_channel = devices_per_channel
        self.id_prefix = id_prefix
        self.security = tuple(security)
        self.certificate = certificate
        self.private_key = private_key
        self.users = dict(users) if users is not None else None
        self.devices: tuple[SimDevice, ...] = tuple(spec.on("opcua"))
        self._by_index = {d.index: d for d in self.devices}
        self._active = {d.index: d.active for d in self.devices}
        self._behaviour = _Behaviour(max_references_per_node, max_nodes_per_read, max_nodes_per_browse)
        self._tree = _Tree()
        self._lock = asyncio.Lock()  # a reload and the updates do not interleave
        self._rng = random.Random(spec.seed)
        self._server: _Server | None = None
        self._updater: asyncio.Task[None] | None = None
        self._updates = 0
        self._updated = asyncio.Condition()

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}{ENDPOINT_PATH}"

    @property
    def updates(self) -> int:
        """How many update rounds have completed since start (a test waits on it instead of sleeping)."""
        return self._updates

    @property
    def requests(self) -> Mapping[str, int]:
        """Browse, BrowseNext and Read requests answered since start, by service."""
        return dict(self._behaviour.requests)

    @property
    def continuation_points_open(self) -> int:
        """Continuation points handed out and neither drained nor released."""
        return len(self._behaviour.continuation)

    def freeze(self, frozen: bool = True) -> None:
        """Keep every connection open but answer nothing (True), or answer again (False)."""
        self._behaviour.frozen = frozen

    async def wait_for_updates(self, n: int = 1, *, timeout_s: float = 5.0) -> None:
        """Return once n more update rounds have completed (raises TimeoutError after timeout_s)."""
        target = self._updates + n
        async with asyncio.timeout(timeout_s), self._updated:
            await self._updated.wait_for(lambda: self._updates >= target)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("OpcuaPlant already started")
        server = _Server(self._behaviour, _OnlyTheseUsers(self.users) if self.users is not None else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("Tianping simulated plant")
        await server.set_application_uri(SERVER_APPLICATION_URI)
        server.set_security_policy([SECURITY_CHOICES[s] for s in self.security])
        if self.certificate is not None and self.private_key is not None:
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
        tokens: list[type] = [ua.UserNameIdentityToken] if self.users is not None else [ua.AnonymousIdentityToken]
        server.set_identity_tokens(tokens)
        await self._advertise_limits(server)
        di_idx = await server.register_namespace(DI_NAMESPACE_URI)
        plant_idx = await server.register_namespace(PLANT_NAMESPACE_URI)
        topology = await server.nodes.base_object_type.add_object_type(
            _node_id(TOPOLOGY_ELEMENT_TYPE_ID, di_idx), ua.QualifiedName("TopologyElementType", di_idx))
        component = await topology.add_object_type(
            _node_id(COMPONENT_TYPE_ID, di_idx), ua.QualifiedName("ComponentType", di_idx))
        await component.add_object_type(_node_id(DEVICE_TYPE_ID, di_idx), ua.QualifiedName("DeviceType", di_idx))
        self._di_idx, self._plant_idx = di_idx, plant_idx
        await self._build(server, self.id_prefix)
        await server.start()
        self._server = server
        self._updater = asyncio.create_task(self._update_loop(), name=f"opcua-plant-{self.port}-updates")
        logger.info("OPC UA plant with %d devices (%s layout) listening at %s", len(self.devices), self.layout,
                    self.endpoint)

    async def stop(self) -> None:
        updater, self._updater = self._updater, None
        if updater is not None:
            updater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await updater
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
            logger.info("OPC UA plant at %s stopped", self.endpoint)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def reload(self, *, id_prefix: str) -> None:
        """Rebuild the plant's address space under other node ids while the server and its sessions keep
        running (as a configuration reload does): every node id a client learnt becomes unknown."""
        server = self._require_server()
        async with self._lock:
            aspace = server.iserver.aspace
            old = self._tree
            objects = aspace[_node_id(ObjectIds.ObjectsFolder)]
            gone = set(old.roots)
            objects.references = [r for r in objects.references if r.NodeId not in gone]
            for nodeid in old.nodes:
                if nodeid in aspace:
                    del aspace[nodeid]
            self._tree = _Tree()
            self.id_prefix = id_prefix
            await self._build(server, id_prefix)
        logger.info("OPC UA plant at %s reloaded with node id prefix %r", self.endpoint, id_prefix)

    async def set_active(self, device_index: int, active: bool) -> None:
        """Let a device send fresh data (True) or keep it connected but silent (False)."""
        self._device(device_index)
        self._active[device_index] = active

    async def set_health(self, device_index: int, health: DeviceHealth) -> None:
        """Write a device's DeviceHealth (FAILURE makes it not active whatever its Value does)."""
        self._device(device_index)
        if self.layout != "di":
            raise ValueError("DeviceHealth exists in the DI layout only")
        await self._require_server().write_attribute_value(
            self._tree.health_ids[device_index],
            _data_value(ua.Variant(int(health), ua.VariantType.Int32), datetime.now(UTC)),
        )

    def _device(self, device_index: int) -> SimDevice:
        try:
            return self._by_index[device_index]
        except KeyError:
            raise KeyError(f"device {device_index} is not exposed over OPC UA by this plant") from None

    def _require_server(self) -> Server:
        if self._server is None:
            raise RuntimeError("OpcuaPlant is not started")
        return self._server

    async def _advertise_limits(self, server: Server) -> None:
        b = self._behaviour
        for nodeid, limit in (
            (ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead, b.max_nodes_per_read),
            (ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse, b.max_nodes_per_browse),
        ):
            if limit:
                await server.write_attribute_value(
                    _node_id(nodeid), _data_value(ua.Variant(limit, ua.VariantType.UInt32), datetime.now(UTC)))

    # --- building the address space -----------------------------------------------------------------------

    async def _build(self, server: Server, prefix: str) -> None:
        """Add the plant's folders, devices and variables in time linear in the number of devices."""
        tree = self._tree
        builder = _Builder(server, tree)
        ns, di = self._plant_idx, self._di_idx
        folder_type = _node_id(ObjectIds.FolderType)
        objects = _node_id(ObjectIds.ObjectsFolder)
        variables: list[ua.AddNodesItem] = []
        if self.layout == "di":
            device_set = _node_id(f"{prefix}DeviceSet", ns) if prefix else _node_id(DEVICE_SET_ID, di)
            builder.add_object(objects, device_set, ua.QualifiedName("DeviceSet", di),
                               _node_id(ObjectIds.BaseObjectType), root=True)
            features = _node_id(f"{prefix}DeviceFeatures", ns) if prefix else _node_id(DEVICE_FEATURES_ID, di)
            builder.add_object(device_set, features, ua.QualifiedName("DeviceFeatures", di), folder_type)
            device_type = _node_id(DEVICE_TYPE_ID, di)
            for device in self.devices:
                device_id = _node_id(prefix + device.name, ns)
                builder.add_object(device_set, device_id, ua.QualifiedName(device.name, ns), device_type)
                variables += self._variables(device, device_id, prefix + device.name, di_names=True)
        else:
            system = _node_id(f"{prefix}_System", ns)
            builder.add_object(objects, system, ua.QualifiedName("_System", ns), folder_type, root=True)
            for start in range(0, len(self.devices), self.devices_per_channel):
                channel = f"Channel{start // self.devices_per_channel + 1}"
                channel_id = _node_id(prefix + channel, ns)
                builder.add_object(objects, channel_id, ua.QualifiedName(channel, ns), folder_type, root=True)
                builder.add_object(channel_id, _node_id(f"{prefix}{channel}._System", ns),
                                   ua.QualifiedName("_System", ns), folder_type)
                for device in self.devices[start : start + self.devices_per_channel]:
                    path = f"{prefix}{channel}.{device.name}"
                    device_id = _node_id(path, ns)
                    builder.add_object(channel_id, device_id, ua.QualifiedName(device.name, ns), folder_type)
                    builder.add_object(device_id, _node_id(f"{path}._System", ns), ua.QualifiedName("_System", ns),
                                       folder_type)
                    variables += self._variables(device, device_id, path, di_names=False)
        builder.commit()
        node_mgt = server.iserver.node_mgt_service
        bad = [r for r in node_mgt.add_nodes(variables) if not r.StatusCode.is_good()]
        if bad:
            raise RuntimeError(f"asyncua refused {len(bad)} device variables, first {bad[0].StatusCode.name}")
        tree.nodes += [item.RequestedNewNodeId for item in variables]
        # Every device starts with a value: fresh for the active ones, stale for the silent ones.
        now = datetime.now(UTC)
        for device in self.devices:
            fresh = self._active[device.index]
            await server.write_attribute_value(
                tree.value_ids[device.index], self._sample(now if fresh else STALE_SOURCE_TIMESTAMP))

    def _variables(self, device: SimDevice, device_id: ua.NodeId, path: str, *, di_names: bool
                   ) -> list[ua.AddNodesItem]:
        ns = self._plant_idx
        name_ns = self._di_idx if di_names else ns  # DI properties carry DI browse names
        identity: list[tuple[int, str, ua.Variant]] = [
            (name_ns, "Manufacturer", ua.Variant(device.manufacturer, ua.VariantType.String)),
            (name_ns, "Model", ua.Variant(device.model, ua.VariantType.String)),
            (name_ns, "SerialNumber", ua.Variant(device.serial, ua.VariantType.String)),
        ]
        if di_names and self.with_product_instance_uri:
            identity.append(
                (name_ns, "ProductInstanceUri", ua.Variant(device.product_instance_uri, ua.VariantType.String)))
        if di_names:
            identity.append((name_ns, "DeviceHealth", ua.Variant(int(DeviceHealth.NORMAL), ua.VariantType.Int32)))
            self._tree.health_ids[device.index] = _node_id(f"{path}.DeviceHealth", ns)
        identity.append((ns, ENTERPRISE_PROPERTY, ua.Variant(device.enterprise, ua.VariantType.String)))
        items = [_variable_item(device_id, path, ns, name_ns, name, value, is_property=di_names)
                 for name_ns, name, value in identity]
        self._tree.value_ids[device.index] = _node_id(f"{path}.{ACTIVITY_VARIABLE}", ns)
        items.append(_variable_item(device_id, path, ns, ns, ACTIVITY_VARIABLE,
                                    ua.Variant(0.0, ua.VariantType.Double), is_property=False))
        return items

    def _sample(self, at: datetime) -> ua.DataValue:
        return _data_value(ua.Variant(round(self._rng.uniform(0.0, 100.0), 3), ua.VariantType.Double), at)

    async def _update_loop(self) -> None:
        server = self._require_server()
        while True:
            await asyncio.sleep(self.update_interval_s)
            now = datetime.now(UTC)
            async with self._lock:
                for device in self.devices:
                    if self._active[device.index]:  # read at write time: set_active() takes effect at once
                        await server.write_attribute_value(self._tree.value_ids[device.index], self._sample(now))
            async with self._updated:
                self._updates += 1
                self._updated.notify_all()


class _Builder:
    """Adds objects without a parent, then links each to its parent directly in the address space.

    The forward reference parent -> child and the inverse one are what ``_add_node`` would make, but without
    scanning the parent's (growing) reference list for duplicates: linear instead of quadratic."""

    def __init__(self, server: Server, tree: _Tree) -> None:
        self._server = server
        self._tree = tree
        self._items: list[tuple[ua.NodeId, ua.AddNodesItem]] = []

    def add_object(self, parent: ua.NodeId, nodeid: ua.NodeId, name: ua.QualifiedName, type_definition: ua.NodeId,
                   *, root: bool = False) -> None:
        self._items.append((parent, _object_item(nodeid, name, type_definition)))
        if root:
            self._tree.roots.append(nodeid)

    def commit(self) -> None:
        node_mgt = self._server.iserver.node_mgt_service
        aspace = self._server.iserver.aspace
        refused = list(node_mgt.try_add_nodes([item for _, item in self._items], check=False))
        if refused:
            raise RuntimeError(f"asyncua refused {len(refused)} objects, first {refused[0].BrowseName}")
        organizes, has_component = _node_id(ObjectIds.Organizes), _node_id(ObjectIds.HasComponent)
        objects = _node_id(ObjectIds.ObjectsFolder)
        names: dict[ua.NodeId, ua.QualifiedName] = {}
        for parent, item in self._items:
            parent_data = aspace[parent]
            ref_type = organizes if parent == objects else has_component
            parent_name = names.get(parent)
            if parent_name is None:
                parent_name = names[parent] = parent_data.attributes[AttributeIds.BrowseName].value.Value.Value  # type: ignore[union-attr]
            parent_data.references.append(ua.ReferenceDescription(
                ReferenceTypeId=ref_type, IsForward=True, NodeId=item.RequestedNewNodeId,
                BrowseName=item.BrowseName, DisplayName=ua.LocalizedText(item.BrowseName.Name),
                NodeClass=ua.NodeClass.Object, TypeDefinition=item.TypeDefinition,
            ))
            aspace[item.RequestedNewNodeId].references.append(ua.ReferenceDescription(
                ReferenceTypeId=ref_type, IsForward=False, NodeId=parent, BrowseName=parent_name,
                DisplayName=ua.LocalizedText(parent_name.Name), NodeClass=ua.NodeClass.Object,
                TypeDefinition=_node_id(ObjectIds.BaseObjectType),
            ))
            self._tree.nodes.append(item.RequestedNewNodeId)
        self._items.clear()


class HangingPeer:
    """A TCP listener that accepts connections, reads what arrives and never answers (a hung server)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int) -> None:
        self.host = host
        self.port = port
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}{ENDPOINT_PATH}"

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._swallow, self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        for writer in self._writers:
            writer.close()
        if server is not None:
            server.close()
            await server.wait_closed()


def _node_id(identifier: int | str, ns: int = 0) -> ua.NodeId:
    return ua.NodeId(ua.Int32(identifier) if isinstance(identifier, int) else ua.String(identifier), ua.Int16(ns))


def _data_value(value: ua.Variant, source_timestamp: datetime) -> ua.DataValue:
    """A Good value with both timestamps (asyncua types them as its own DateTime subclass)."""
    return ua.DataValue(
        value,
        StatusCode=ua.StatusCode(),
        SourceTimestamp=cast(ua.DateTime, source_timestamp),
        ServerTimestamp=cast(ua.DateTime, datetime.now(UTC)),
    )


def _object_item(nodeid: ua.NodeId, name: ua.QualifiedName, type_definition: ua.NodeId) -> ua.AddNodesItem:
    attrs = ua.ObjectAttributes(
        DisplayName=ua.LocalizedText(name.Name), Description=ua.LocalizedText(name.Name), EventNotifier=0
    )
    return ua.AddNodesItem(
        RequestedNewNodeId=nodeid,
        BrowseName=name,
        NodeClass=ua.NodeClass.Object,
        ParentNodeId=ua.NodeId(),  # linked to its parent afterwards, see _Builder
        ReferenceTypeId=_node_id(ObjectIds.HasComponent),
        TypeDefinition=type_definition,
        NodeAttributes=attrs,
    )


def _variable_item(
    parent: ua.NodeId, parent_path: str, ns: int, name_ns: int, name: str, value: ua.Variant, *, is_property: bool
) -> ua.AddNodesItem:
    attrs = ua.VariableAttributes(
        DisplayName=ua.LocalizedText(name),
        Description=ua.LocalizedText(name),
        Value=value,
        DataType=_node_id(value.VariantType.value),
        ValueRank=ua.ValueRank.Scalar,
        AccessLevel=ua.AccessLevel.CurrentRead.mask,
        UserAccessLevel=ua.AccessLevel.CurrentRead.mask,
    )
    return ua.AddNodesItem(
        RequestedNewNodeId=_node_id(f"{parent_path}.{name}", ns),
        BrowseName=ua.QualifiedName(name, name_ns),
        NodeClass=ua.NodeClass.Variable,
        ParentNodeId=parent,
        ReferenceTypeId=_node_id(ObjectIds.HasProperty if is_property else ObjectIds.HasComponent),
        TypeDefinition=_node_id(ObjectIds.PropertyType if is_property else ObjectIds.BaseDataVariableType),
        NodeAttributes=attrs,
    )


async def run_opcua_plant(spec: PlantSpec, port: int, *, host: str = "127.0.0.1",
                          update_interval_s: float = 0.5) -> None:
    """Serve the plant's OPC UA devices until cancelled (``tianping-sim plant`` calls this)."""
    async with OpcuaPlant(spec, host=host, port=port, update_interval_s=update_interval_s):
        await asyncio.Event().wait()
