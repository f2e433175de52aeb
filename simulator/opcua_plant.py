"""A simulated plant's OPC UA server (asyncua), built from a :class:`~simulator.plant.PlantSpec`.

The address space follows the OPC UA for Devices (DI, OPC 10000-100) layout that real plant servers use:

    Objects
    └── DeviceSet                 (ns = http://opcfoundation.org/UA/DI/, i=5001)
        ├── dev00000              (DeviceType; one object per device whose protocols include "opcua")
        │   ├── Manufacturer      property, String
        │   ├── Model             property, String
        │   ├── SerialNumber      property, String
        │   ├── ProductInstanceUri property, String
        │   ├── DeviceHealth      property, Int32 (0 NORMAL, 1 FAILURE, 2 CHECK_FUNCTION, 3 OFF_SPEC,
        │   │                                      4 MAINTENANCE_REQUIRED)
        │   ├── EnterpriseUSCC    property, String (not in DI: the owner's unified social credit code)
        │   └── Value             variable, Double: the process value
        └── ...

A background task writes a new ``Value`` (new SourceTimestamp, status Good) to every active device each
``update_interval_s``. Inactive devices are "connected but silent": their Value is Good but its
SourceTimestamp is :data:`STALE_SOURCE_TIMESTAMP` and never advances (also across server restarts).

asyncua checks every new child against all of its parent's references, so adding N devices to one flat
DeviceSet one by one is quadratic (BASELINES.md). The devices are therefore added without a parent and
then linked to DeviceSet directly in the server's address space, which is linear; their own properties
are added through the ordinary (checked) node-management service.

The simulator plays the outside world: it imports nothing from the project except ``simulator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from datetime import UTC, datetime
from types import TracebackType
from typing import Self, cast

from asyncua import ua
from asyncua.server.server import Server
from asyncua.ua.object_ids import ObjectIds

from simulator.plant import PlantSpec, SimDevice

logger = logging.getLogger(__name__)

DI_NAMESPACE_URI = "http://opcfoundation.org/UA/DI/"
PLANT_NAMESPACE_URI = "urn:tianping:simulator:plant"
ENDPOINT_PATH = "/tianping/plant"
DEVICE_SET_ID = 5001  # DeviceSet's numeric id in the DI nodeset
ENTERPRISE_PROPERTY = "EnterpriseUSCC"
ACTIVITY_VARIABLE = "Value"
# The SourceTimestamp a silent device keeps for ever: the day the Jiaxing measures came into force.
STALE_SOURCE_TIMESTAMP = datetime(2021, 3, 1, tzinfo=UTC)


class DeviceHealth(enum.IntEnum):
    """DI DeviceHealthEnumeration."""

    NORMAL = 0
    FAILURE = 1
    CHECK_FUNCTION = 2
    OFF_SPEC = 3
    MAINTENANCE_REQUIRED = 4


class OpcuaPlant:
    """An asyncua server exposing the plant's OPC UA devices under Objects/DeviceSet."""

    def __init__(
        self,
        spec: PlantSpec,
        *,
        host: str = "127.0.0.1",
        port: int,
        update_interval_s: float = 0.5,
        with_product_instance_uri: bool = True,
    ) -> None:
        """``with_product_instance_uri=False`` leaves the property out, as older DI servers do, so that
        manufacturer + model + serial number is the strongest identity a client finds."""
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port!r}")
        if not update_interval_s > 0:
            raise ValueError(f"update_interval_s must be > 0, got {update_interval_s!r}")
        self.spec = spec
        self.host = host
        self.port = port
        self.update_interval_s = update_interval_s
        self.with_product_instance_uri = with_product_instance_uri
        self.devices: tuple[SimDevice, ...] = tuple(spec.on("opcua"))
        self._by_index = {d.index: d for d in self.devices}
        self._active = {d.index: d.active for d in self.devices}
        self._value_ids: dict[int, ua.NodeId] = {}
        self._health_ids: dict[int, ua.NodeId] = {}
        self._rng = random.Random(spec.seed)
        self._server: Server | None = None
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

    async def wait_for_updates(self, n: int = 1, *, timeout_s: float = 5.0) -> None:
        """Return once n more update rounds have completed (raises TimeoutError after timeout_s)."""
        target = self._updates + n
        async with asyncio.timeout(timeout_s), self._updated:
            await self._updated.wait_for(lambda: self._updates >= target)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("OpcuaPlant already started")
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("Tianping simulated plant")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        di_idx = await server.register_namespace(DI_NAMESPACE_URI)
        plant_idx = await server.register_namespace(PLANT_NAMESPACE_URI)
        device_type = await server.nodes.base_object_type.add_object_type(
            _node_id(1002, di_idx), ua.QualifiedName("DeviceType", di_idx)
        )
        device_set = await server.nodes.objects.add_object(
            _node_id(DEVICE_SET_ID, di_idx), ua.QualifiedName("DeviceSet", di_idx)
        )
        await self._add_devices(server, device_set.nodeid, device_type.nodeid, plant_idx)
        await server.start()
        self._server = server
        self._updater = asyncio.create_task(self._update_loop(), name=f"opcua-plant-{self.port}-updates")
        logger.info("OPC UA plant with %d devices listening at %s", len(self.devices), self.endpoint)

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

    async def set_active(self, device_index: int, active: bool) -> None:
        """Let a device send fresh data (True) or keep it connected but silent (False)."""
        self._device(device_index)
        self._active[device_index] = active

    async def set_health(self, device_index: int, health: DeviceHealth) -> None:
        """Write a device's DeviceHealth (FAILURE makes it not active whatever its Value does)."""
        self._device(device_index)
        await self._require_server().write_attribute_value(
            self._health_ids[device_index],
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

    async def _add_devices(
        self, server: Server, device_set: ua.NodeId, device_type: ua.NodeId, ns: int
    ) -> None:
        di_ns = device_set.NamespaceIndex
        """Add every device under DeviceSet in time linear in the number of devices (see module doc)."""
        node_mgt = server.iserver.node_mgt_service
        aspace = server.iserver.aspace
        objects: list[ua.AddNodesItem] = []
        children: list[ua.AddNodesItem] = []
        for device in self.devices:
            device_id = _node_id(device.name, ns)
            objects.append(_object_item(device_id, ua.QualifiedName(device.name, ns), device_type))
            # The DI properties carry DI browse names; EnterpriseUSCC and Value are the plant's own.
            properties: tuple[tuple[int, str, ua.Variant], ...] = (
                (di_ns, "Manufacturer", ua.Variant(device.manufacturer, ua.VariantType.String)),
                (di_ns, "Model", ua.Variant(device.model, ua.VariantType.String)),
                (di_ns, "SerialNumber", ua.Variant(device.serial, ua.VariantType.String)),
                (di_ns, "ProductInstanceUri", ua.Variant(device.product_instance_uri, ua.VariantType.String)),
                (di_ns, "DeviceHealth", ua.Variant(int(DeviceHealth.NORMAL), ua.VariantType.Int32)),
                (ns, ENTERPRISE_PROPERTY, ua.Variant(device.enterprise, ua.VariantType.String)),
            )
            for name_ns, name, value in properties:
                if name == "ProductInstanceUri" and not self.with_product_instance_uri:
                    continue
                children.append(
                    _variable_item(device_id, device.name, ns, name_ns, name, value, is_property=True)
                )
            self._health_ids[device.index] = _node_id(f"{device.name}.DeviceHealth", ns)
            value_id = _node_id(f"{device.name}.{ACTIVITY_VARIABLE}", ns)
            self._value_ids[device.index] = value_id
            zero = ua.Variant(0.0, ua.VariantType.Double)
            children.append(
                _variable_item(device_id, device.name, ns, ns, ACTIVITY_VARIABLE, zero, is_property=False)
            )
        refused = list(node_mgt.try_add_nodes(objects, check=False))
        if refused:
            raise RuntimeError(f"asyncua refused {len(refused)} device objects, first {refused[0].BrowseName}")
        parent = aspace[device_set]
        parent_name = ua.QualifiedName("DeviceSet", device_set.NamespaceIndex)
        has_component = _node_id(ObjectIds.HasComponent)
        for item in objects:
            # The forward reference DeviceSet -> device and the inverse one, as _add_node would make them
            # but without scanning DeviceSet's (growing) reference list for duplicates.
            parent.references.append(
                ua.ReferenceDescription(
                    ReferenceTypeId=has_component, IsForward=True, NodeId=item.RequestedNewNodeId,
                    BrowseName=item.BrowseName, DisplayName=ua.LocalizedText(item.BrowseName.Name),
                    NodeClass=ua.NodeClass.Object, TypeDefinition=device_type,
                )
            )
            aspace[item.RequestedNewNodeId].references.append(
                ua.ReferenceDescription(
                    ReferenceTypeId=has_component, IsForward=False, NodeId=device_set,
                    BrowseName=parent_name, DisplayName=ua.LocalizedText("DeviceSet"),
                    NodeClass=ua.NodeClass.Object, TypeDefinition=_node_id(ObjectIds.BaseObjectType),
                )
            )
        bad = [r for r in node_mgt.add_nodes(children) if not r.StatusCode.is_good()]
        if bad:
            raise RuntimeError(f"asyncua refused {len(bad)} device variables, first {bad[0].StatusCode.name}")
        # Every device starts with a value: fresh for the active ones, stale for the silent ones.
        now = datetime.now(UTC)
        for device in self.devices:
            fresh = self._active[device.index]
            await server.write_attribute_value(
                self._value_ids[device.index], self._sample(now if fresh else STALE_SOURCE_TIMESTAMP)
            )

    def _sample(self, at: datetime) -> ua.DataValue:
        return _data_value(ua.Variant(round(self._rng.uniform(0.0, 100.0), 3), ua.VariantType.Double), at)

    async def _update_loop(self) -> None:
        server = self._require_server()
        while True:
            await asyncio.sleep(self.update_interval_s)
            now = datetime.now(UTC)
            for device in self.devices:
                if self._active[device.index]:  # read at write time: set_active() takes effect at once
                    await server.write_attribute_value(self._value_ids[device.index], self._sample(now))
            async with self._updated:
                self._updates += 1
                self._updated.notify_all()


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
        ParentNodeId=ua.NodeId(),  # linked to DeviceSet afterwards, see _add_devices
        ReferenceTypeId=_node_id(ObjectIds.HasComponent),
        TypeDefinition=type_definition,
        NodeAttributes=attrs,
    )


def _variable_item(
    parent: ua.NodeId, parent_name: str, ns: int, name_ns: int, name: str, value: ua.Variant, *, is_property: bool
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
        RequestedNewNodeId=_node_id(f"{parent_name}.{name}", ns),
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
