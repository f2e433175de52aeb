"""The OPC UA connector against a real asyncua server (simulator.opcua_plant) on a free loopback port."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from connectors.base import ConfigError, DeviceConnector, DeviceIdentity, DeviceObservation, DeviceStatus
from connectors.opcua import DEFAULTS, OpcuaConnector, wire
from simulator.mosquitto import free_port
from simulator.opcua_plant import DeviceHealth, HangingPeer, OpcuaPlant, run_opcua_plant
from simulator.plant import PlantShape, PlantSpec, SimDevice, make_plant

# Async tests share the module's event loop with the plant fixture (asyncio_mode=auto marks them).
in_module_loop = pytest.mark.asyncio(loop_scope="module")

SAMPLE = Path(__file__).resolve().parent.parent / "connectors" / "opcua" / "sample.toml"
UPDATE_INTERVAL_S = 0.1


@pytest.fixture(scope="module")
def spec() -> PlantSpec:
    return make_plant(PlantShape(opcua=12, modbus=4, mqtt=4, opcua_and_mqtt=2, modbus_and_opcua=2, silent=2))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant(spec: PlantSpec) -> AsyncIterator[OpcuaPlant]:
    async with OpcuaPlant(spec, port=free_port(), update_interval_s=UPDATE_INTERVAL_S) as running:
        yield running


async def wait_updates(plant: OpcuaPlant, n: int = 2) -> None:
    """Wait (bounded) until the real server has completed n more update rounds."""
    await plant.wait_for_updates(n, timeout_s=5.0)


def by_serial(observations: list[DeviceObservation]) -> dict[str, DeviceObservation]:
    return {o.evidence["serial"]: o for o in observations}


def opcua_devices(spec: PlantSpec) -> list[SimDevice]:
    return spec.on("opcua")


async def two_rounds(connector: OpcuaConnector, plant: OpcuaPlant) -> list[DeviceObservation]:
    await connector.observe()
    await wait_updates(plant)
    return list(await connector.observe())


# --- counting against the ground truth -------------------------------------------------------------------


@in_module_loop
async def test_identities_statuses_and_enterprises_match_ground_truth(spec: PlantSpec, plant: OpcuaPlant) -> None:
    truth = spec.ground_truth()
    fallbacks = wire.fallbacks()
    async with OpcuaConnector(endpoint=plant.endpoint) as connector:
        first = list(await connector.observe())
        await wait_updates(plant)
        second = list(await connector.observe())

    devices = opcua_devices(spec)
    assert len(first) == len(second) == truth["per_protocol"]["opcua"] == len(devices) == 12  # type: ignore[index]
    assert connector.health().extra["decoder_fallbacks"] == fallbacks  # every answer decoded by connectors.opcua.wire
    expected_keys = {DeviceIdentity.product_instance_uri(d.product_instance_uri).key() for d in devices}
    assert {o.identity.key() for o in second} == expected_keys
    seen = by_serial(second)
    for device in devices:
        obs = seen[device.serial]
        assert obs.protocol == "opcua" and obs.source == plant.endpoint
        assert obs.identity.scheme == "uri"
        assert obs.enterprise == device.enterprise
        # manufacturer/model/serial are in the evidence even when the URI is the identity (cross-protocol merge)
        assert (obs.evidence["manufacturer"], obs.evidence["model"]) == (device.manufacturer, device.model)
        assert obs.evidence["product_instance_uri"] == device.product_instance_uri
        assert obs.evidence["status"] == "Good"
        assert isinstance(obs.evidence["value"], float)
        assert datetime.fromisoformat(obs.evidence["source_timestamp"]).tzinfo is not None
        assert datetime.fromisoformat(obs.evidence["server_timestamp"]).tzinfo is not None
        expected = DeviceStatus.ACTIVE if device.active else DeviceStatus.REACHABLE
        assert obs.status is expected, device.name
    active = sum(1 for o in second if o.status is DeviceStatus.ACTIVE)
    assert active == truth["per_protocol_active"]["opcua"]  # type: ignore[index]
    assert any(not d.active for d in devices), "the plant must include a silent OPC UA device"
    # The server object (and anything else outside DeviceSet) is not a device.
    assert all(o.local_id.startswith("nsu=urn:tianping:simulator:plant;s=dev") for o in second)
    assert not any("i=2253" in o.local_id for o in second)
    assert connector.health().errors == {}


@in_module_loop
async def test_device_silenced_between_rounds_is_reachable_not_active(spec: PlantSpec, plant: OpcuaPlant) -> None:
    victim = next(d for d in opcua_devices(spec) if d.active)
    async with OpcuaConnector(endpoint=plant.endpoint) as connector:
        first = by_serial(list(await connector.observe()))
        await plant.set_active(victim.index, False)
        try:
            await wait_updates(plant)
            second = by_serial(list(await connector.observe()))
        finally:
            await plant.set_active(victim.index, True)
    # Fresh within the window on the first round; connected but silent afterwards.
    assert first[victim.serial].status is DeviceStatus.ACTIVE
    assert second[victim.serial].status is DeviceStatus.REACHABLE
    assert second[victim.serial].evidence["source_timestamp"] == first[victim.serial].evidence["source_timestamp"]
    others = [d for d in opcua_devices(spec) if d.active and d is not victim]
    assert all(second[d.serial].status is DeviceStatus.ACTIVE for d in others)


@in_module_loop
async def test_device_health_failure_is_not_active(spec: PlantSpec, plant: OpcuaPlant) -> None:
    victim = next(d for d in opcua_devices(spec) if d.active)
    await plant.set_health(victim.index, DeviceHealth.FAILURE)
    try:
        async with OpcuaConnector(endpoint=plant.endpoint) as connector:
            seen = by_serial(await two_rounds(connector, plant))
    finally:
        await plant.set_health(victim.index, DeviceHealth.NORMAL)
    assert seen[victim.serial].status is DeviceStatus.REACHABLE
    assert seen[victim.serial].evidence["device_health"] == int(DeviceHealth.FAILURE)


@in_module_loop
@pytest.mark.parametrize("offset", [timedelta(hours=1), -timedelta(hours=1)], ids=["clock-ahead", "clock-behind"])
async def test_first_round_freshness_uses_the_injected_clock(
    spec: PlantSpec, plant: OpcuaPlant, offset: timedelta
) -> None:
    """An hour away from the server's timestamps is outside the 300 s window, in the past or in the future."""
    instant = datetime.now(UTC) + offset
    clock: Callable[[], datetime] = lambda: instant  # noqa: E731
    async with OpcuaConnector(endpoint=plant.endpoint, now=clock) as connector:
        observations = list(await connector.observe())
    assert len(observations) == len(opcua_devices(spec))
    assert {o.status for o in observations} == {DeviceStatus.REACHABLE}
    assert {o.observed_at for o in observations} == {instant}


@in_module_loop
async def test_reads_are_chunked_never_one_request_per_node(spec: PlantSpec, plant: OpcuaPlant) -> None:
    n = len(opcua_devices(spec))
    async with OpcuaConnector(endpoint=plant.endpoint) as wide, OpcuaConnector(
        endpoint=plant.endpoint, max_nodes_per_call=5
    ) as narrow:
        wide_obs = await two_rounds(wide, plant)
        narrow_obs = await two_rounds(narrow, plant)
        # A steady round: one Browse of DeviceSet, then the reads of n devices x 6 properties (without
        # timestamps) and of n activity variables (with both timestamps).
        assert wide.health().extra["last_round"]["requests"] == 1 + 1 + 1
        assert narrow.health().extra["last_round"]["requests"] == 1 + math.ceil(n * 6 / 5) + math.ceil(n / 5)
    assert {o.identity.key() for o in wide_obs} == {o.identity.key() for o in narrow_obs}
    assert [o.status for o in sorted(wide_obs, key=lambda o: o.local_id)] == [
        o.status for o in sorted(narrow_obs, key=lambda o: o.local_id)
    ]


@in_module_loop
async def test_manufacturer_model_serial_identity_without_product_instance_uri(spec: PlantSpec) -> None:
    async with OpcuaPlant(spec, port=free_port(), update_interval_s=UPDATE_INTERVAL_S,
                          with_product_instance_uri=False) as plant, OpcuaConnector(endpoint=plant.endpoint) as c:
        observations = list(await c.observe())
    expected = {
        DeviceIdentity.manufacturer_model_serial(d.manufacturer, d.model, d.serial).key() for d in opcua_devices(spec)
    }
    assert {o.identity.key() for o in observations} == expected
    assert all("product_instance_uri" not in o.evidence for o in observations)


@in_module_loop
async def test_enterprise_falls_back_to_the_configured_default(spec: PlantSpec, plant: OpcuaPlant) -> None:
    default = "91330400MA2B3C4D5E"
    async with OpcuaConnector(endpoint=plant.endpoint, enterprise=default, enterprise_property="NoSuchProperty") as c:
        observations = list(await c.observe())
    assert len(observations) == len(opcua_devices(spec))
    assert {o.enterprise for o in observations} == {default}


@in_module_loop
async def test_missing_device_folder_counts_an_error_and_observes_nothing(plant: OpcuaPlant) -> None:
    async with OpcuaConnector(endpoint=plant.endpoint, device_folder="NoSuchFolder") as connector:
        assert list(await connector.observe()) == []
    assert connector.health().errors == {"opcua_device_folder_missing": 1}


@in_module_loop
async def test_objects_that_are_not_devices_are_not_counted(spec: PlantSpec, plant: OpcuaPlant) -> None:
    """DeviceSet also holds DeviceFeatures (a FolderType): only ComponentType-derived children are devices."""
    async with OpcuaConnector(endpoint=plant.endpoint) as typed, OpcuaConnector(
        endpoint=plant.endpoint, device_type=""
    ) as untyped:
        typed_ids = {o.local_id for o in await typed.observe()}
        untyped_ids = {o.local_id for o in await untyped.observe()}
    assert len(typed_ids) == len(opcua_devices(spec))
    assert untyped_ids - typed_ids == {"nsu=http://opcfoundation.org/UA/DI/;i=15034"}  # DeviceFeatures
    # The Server object (namespace 0) is never a device, even when the folder pattern matches it.
    async with OpcuaConnector(endpoint=plant.endpoint, device_folder="", device_type="") as everything:
        top = {o.local_id for o in await everything.observe()}
    assert top == {"nsu=http://opcfoundation.org/UA/DI/;i=5001"}  # DeviceSet itself, not Server (i=2253)


@in_module_loop
async def test_missing_activity_variable_leaves_devices_registered(spec: PlantSpec, plant: OpcuaPlant) -> None:
    n = len(opcua_devices(spec))
    async with OpcuaConnector(endpoint=plant.endpoint, activity_variable="NoSuchVariable") as connector:
        observations = list(await connector.observe())
    assert len(observations) == n
    assert {o.status for o in observations} == {DeviceStatus.REGISTERED}
    assert connector.health().errors == {"opcua_activity_variable_missing": n}


# --- servers that are not asyncua's defaults --------------------------------------------------------------


@in_module_loop
async def test_continuation_points_are_drained_and_requests_fit_the_operation_limits(spec: PlantSpec) -> None:
    """A server that answers 3 references per Browse and accepts 4 nodes per Read and 2 per Browse."""
    n = len(opcua_devices(spec))
    async with OpcuaPlant(spec, port=free_port(), update_interval_s=UPDATE_INTERVAL_S, max_references_per_node=3,
                          max_nodes_per_read=4, max_nodes_per_browse=2) as strict:
        async with OpcuaConnector(endpoint=strict.endpoint) as connector:
            observations = list(await connector.observe())
            first = strict.requests
        assert strict.continuation_points_open == 0
    assert connector.health().errors == {}  # not one request refused with BadTooManyOperations
    expected = {DeviceIdentity.product_instance_uri(d.product_instance_uri).key() for d in opcua_devices(spec)}
    assert {o.identity.key() for o in observations} == expected
    # DeviceSet's 13 children come 3 at a time; every device's 7 variables too (3 + 3 + 1).
    assert first["BrowseNext"] >= math.ceil(13 / 3) - 1 + n
    # The reads: limits + browse names of the types, then 6 properties and 1 activity variable per device.
    assert first["Read"] == 1 + 1 + math.ceil(n * 6 / 4) + math.ceil(n / 4)


@in_module_loop
async def test_a_channel_device_tree_without_the_di_model(spec: PlantSpec) -> None:
    """KEPServerEX-style: Objects/ChannelN/<device>/<tags>, with _System folders at every level."""
    devices = opcua_devices(spec)
    async with (
        OpcuaPlant(spec, port=free_port(), update_interval_s=UPDATE_INTERVAL_S, layout="kepware",
                   devices_per_channel=5) as kepware,
        OpcuaConnector(endpoint=kepware.endpoint, device_folder="[!_]*", device_name="[!_]*",
                       device_type="") as connector,
        OpcuaConnector(endpoint=kepware.endpoint) as di,
    ):
        await connector.observe()
        await wait_updates(kepware)
        observations = list(await connector.observe())
        assert list(await di.observe()) == []
    assert di.health().errors == {"opcua_device_folder_missing": 1}
    assert connector.health().errors == {}
    assert {o.identity.key() for o in observations} == {
        DeviceIdentity.manufacturer_model_serial(d.manufacturer, d.model, d.serial).key() for d in devices
    }
    assert {o.local_id.split(";s=")[1].split(".")[0] for o in observations} == {"Channel1", "Channel2", "Channel3"}
    active = {o.evidence["serial"] for o in observations if o.status is DeviceStatus.ACTIVE}
    assert active == {d.serial for d in devices if d.active}
    assert {o.enterprise for o in observations} == {d.enterprise for d in devices}


@in_module_loop
async def test_node_ids_changed_under_a_live_session_are_counted_and_browsed_again(
    spec: PlantSpec, caplog: pytest.LogCaptureFixture
) -> None:
    expected = {DeviceIdentity.product_instance_uri(d.product_instance_uri).key() for d in opcua_devices(spec)}
    async with (
        OpcuaPlant(spec, port=free_port(), update_interval_s=UPDATE_INTERVAL_S, id_prefix="a.") as reloading,
        OpcuaConnector(endpoint=reloading.endpoint) as connector,
    ):
        before = list(await connector.observe())
        await reloading.reload(id_prefix="b.")  # the session survives; every node id it learnt is gone
        with caplog.at_level(logging.WARNING, logger="connectors.opcua.connector"):
            after = list(await connector.observe())
        assert connector.health().extra["connected"] is True
    assert {o.identity.key() for o in before} == {o.identity.key() for o in after} == expected
    assert all(";s=b.dev" in o.local_id for o in after)
    assert connector.health().errors == {"opcua_node_unknown": 1}
    [warning] = [r.getMessage() for r in caplog.records if r.name == "connectors.opcua.connector"]
    assert "no longer knows the device folder" in warning and "browsing again" in warning


# --- a peer that goes away -------------------------------------------------------------------------------


@in_module_loop
async def test_server_down_gives_empty_result_and_counts_error_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    connector = OpcuaConnector(endpoint=f"opc.tcp://127.0.0.1:{free_port()}/tianping/plant", timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="connectors.opcua.connector"):
        async with connector:
            assert list(await connector.observe()) == []
            assert list(await connector.observe()) == []
    assert connector.health().errors == {"opcua_connect_failed": 2}
    assert connector.health().extra["connected"] is False
    warnings = [r for r in caplog.records if r.name == "connectors.opcua.connector"]
    assert len(warnings) == 1 and "cannot connect" in warnings[0].getMessage()


@in_module_loop
async def test_a_hung_peer_costs_one_timeout_and_never_blocks_the_other_endpoints(
    spec: PlantSpec, plant: OpcuaPlant, caplog: pytest.LogCaptureFixture
) -> None:
    async with HangingPeer(port=free_port()) as hung:
        connector = OpcuaConnector(endpoints=[hung.endpoint, plant.endpoint], timeout_s=0.5)
        with caplog.at_level(logging.WARNING, logger="connectors.opcua.connector"):
            async with connector:
                started = time.monotonic()
                observations = list(await connector.observe())
                elapsed = time.monotonic() - started
        assert hung.connections == 1
    assert elapsed < 0.5 + 1.5  # bounded by timeout_s, not by the hung peer
    assert {o.source for o in observations} == {plant.endpoint}  # the hung peer is never a device
    assert len(observations) == len(opcua_devices(spec))
    assert connector.health().errors == {"opcua_timeout": 1}
    assert connector.health().extra["endpoints"][hung.endpoint]["connected"] is False
    [warning] = [r.getMessage() for r in caplog.records if r.name == "connectors.opcua.connector"]
    assert hung.endpoint in warning and "within 0.5 s" in warning


@in_module_loop
async def test_a_server_that_stops_answering_mid_session_times_out_and_is_reconnected(
    spec: PlantSpec, plant: OpcuaPlant
) -> None:
    async with OpcuaConnector(endpoint=plant.endpoint, timeout_s=0.5) as connector:
        assert len(await connector.observe()) == len(opcua_devices(spec))
        plant.freeze()
        try:
            started = time.monotonic()
            assert list(await connector.observe()) == []
            elapsed = time.monotonic() - started
        finally:
            plant.freeze(False)
        assert connector.health().extra["connected"] is False
        again = list(await connector.observe())  # a new session
    assert elapsed < 0.5 + 1.5
    assert connector.health().errors == {"opcua_timeout": 1}
    assert len(again) == len(opcua_devices(spec))


@in_module_loop
async def test_reconnects_after_server_restart_and_counts_correctly_again(spec: PlantSpec) -> None:
    port = free_port()
    expected = {DeviceIdentity.product_instance_uri(d.product_instance_uri).key() for d in opcua_devices(spec)}
    async with OpcuaConnector(endpoint=f"opc.tcp://127.0.0.1:{port}/tianping/plant", timeout_s=2) as connector:
        async with OpcuaPlant(spec, port=port, update_interval_s=UPDATE_INTERVAL_S):
            before = list(await connector.observe())
        assert {o.identity.key() for o in before} == expected

        # Server gone: nothing observed, an error counted, no exception.
        assert list(await connector.observe()) == []
        assert sum(connector.health().errors.values()) >= 1

        # The server comes back with other node ids for the same devices.
        async with OpcuaPlant(spec, port=port, update_interval_s=UPDATE_INTERVAL_S, id_prefix="b.") as restarted:
            after: list[DeviceObservation] = []
            for _ in range(20):  # bounded: a later round reconnects and re-browses
                after = list(await connector.observe())
                if after:
                    break
                await wait_updates(restarted, 1)
            await wait_updates(restarted)
            second = list(await connector.observe())
    assert {o.identity.key() for o in after} == expected
    assert {o.local_id for o in before}.isdisjoint({o.local_id for o in after})
    assert all(";s=b.dev" in o.local_id for o in after)
    active = {o.evidence["serial"] for o in second if o.status is DeviceStatus.ACTIVE}
    assert active == {d.serial for d in opcua_devices(spec) if d.active}
    assert set(connector.health().errors) <= {"opcua_connection_lost", "opcua_connect_failed", "opcua_timeout"}


@in_module_loop
async def test_run_opcua_plant_serves_until_cancelled(spec: PlantSpec) -> None:
    port = free_port()
    task = asyncio.create_task(run_opcua_plant(spec, port))
    try:
        async with OpcuaConnector(endpoint=f"opc.tcp://127.0.0.1:{port}/tianping/plant", timeout_s=2) as connector:
            observations: list[DeviceObservation] = []
            async with asyncio.timeout(10):
                while not observations:  # bounded poll of a real peer that is starting up
                    observations = list(await connector.observe())
                    if not observations:
                        await asyncio.sleep(0.1)
        assert len(observations) == len(opcua_devices(spec))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- configuration ---------------------------------------------------------------------------------------


def test_sample_toml_is_exactly_the_defaults_plus_the_required_endpoint() -> None:
    parsed = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    [table] = parsed["connectors"]["opcua"]
    assert set(table) - set(DEFAULTS) == {"endpoint"}
    assert {k: v for k, v in table.items() if k != "endpoint"} == dict(DEFAULTS)
    connector = OpcuaConnector.from_config(table)
    assert isinstance(connector, DeviceConnector)
    assert connector.kind == "opcua"
    assert connector.config.device_folder == ("DeviceSet",)
    assert connector.config.endpoints == ("opc.tcp://127.0.0.1:4840/tianping/plant",)
    assert connector.config.timeout_s == 5.0


def test_readme_shows_the_sample_verbatim() -> None:
    readme = (SAMPLE.parent / "README.md").read_text(encoding="utf-8")
    assert "```toml\n" + SAMPLE.read_text(encoding="utf-8") + "```" in readme


ENDPOINT = "opc.tcp://127.0.0.1:4840/tianping/plant"


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({}, r"missing required key 'endpoint' \(or 'endpoints'"),
        ({"endpoint": ENDPOINT, "endpoints": [ENDPOINT]}, r"exactly one of 'endpoint' .* or 'endpoints' .*got both"),
        ({"endpoints": []}, r"endpoints: expected 1\.\.1000 URLs, got 0"),
        ({"endpoints": ENDPOINT}, r"endpoints: expected list, got str"),
        ({"endpoints": [ENDPOINT, 4840]}, r"endpoints\[1\]: expected str, got int 4840"),
        ({"endpoints": [ENDPOINT, "tcp://x"]}, r"endpoints\[1\]: expected an opc\.tcp://"),
        ({"endpoints": [ENDPOINT, ENDPOINT]}, r"endpoints: expected each URL once"),
        ({"endpoint": ENDPOINT, "device_set": "DeviceSet"}, r"unknown keys \['device_set'\]"),
        ({"endpoint": ENDPOINT, "device_name": " "}, r"device_name: expected a browse-name pattern"),
        ({"endpoint": ENDPOINT, "max_requests_in_flight": 0}, r"max_requests_in_flight: expected an integer in 1\.\."),
        ({"endpoint": ENDPOINT, "endpont": "x"}, r"unknown keys \['endpont'\]"),
        ({"endpoint": "http://127.0.0.1:4840"}, r"endpoint: expected an opc\.tcp://"),
        ({"endpoint": "opc.tcp://127.0.0.1:99999"}, r"endpoint: expected a port"),
        ({"endpoint": ENDPOINT, "timeout_s": "5"}, r"timeout_s: expected int or float, got str '5'"),
        ({"endpoint": ENDPOINT, "timeout_s": 0}, r"timeout_s: expected a number in \(0, 300\], got 0"),
        ({"endpoint": ENDPOINT, "max_nodes_per_call": True}, r"max_nodes_per_call: expected int, got bool"),
        ({"endpoint": ENDPOINT, "max_nodes_per_call": 0}, r"max_nodes_per_call: expected an integer in 1\.\."),
        ({"endpoint": ENDPOINT, "freshness_window_s": -1}, r"freshness_window_s: expected a number > 0, got -1"),
        ({"endpoint": ENDPOINT, "security_policy": "Basic128Rsa15"}, r"security_policy: expected one of \['None', "
         r"'Basic256Sha256'\], got 'Basic128Rsa15'"),
        ({"endpoint": ENDPOINT, "enterprise": "acme"}, r"enterprise: expected an 18-character unified social"),
        ({"endpoint": ENDPOINT, "device_folder": "Plant//DeviceSet"}, r"device_folder: expected browse-name patterns"),
        ({"endpoint": ENDPOINT, "username": "u"}, r"username and password go together"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_configuration_is_refused_with_a_clear_message(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OpcuaConnector.from_config(cfg)
