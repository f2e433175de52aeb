"""Benchmark: enumerate N DI devices (identity and activity) with the OPC UA connector, against the naive
per-node approach, on the same simulated server in the same run.

- connector: ``OpcuaConnector.observe()`` on a fresh connector (a first round: connect, browse DeviceSet,
  learn the device types, browse every device's variables, read them), best of ``--repeat`` runs;
- naive: asyncua's node API, one request per node: browse DeviceSet, then for each device browse its
  children, then read each wanted variable with its own Read request.

Both see the same devices and must agree on the number of devices, identities and active devices (checked).
The server runs in a child process (so that client and server each get a core, as on a real network, and
the client's peak memory is its own). The last line printed is one JSON object:

    {"metric": "opcua_devices_enumerate_s", "value": <connector s>, "unit": "s", "baseline": <naive s>,
     "ratio": <baseline / value>, "devices": N, "requests": ..., "peak_rss_mb": ..., "load_avg_1m": ...}

Usage: ``python bench/opcua_devices.py [--devices 10000] [--repeat 3] [--in-flight 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.object_ids import ObjectIds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.base import DeviceIdentity, DeviceStatus  # noqa: E402
from connectors.opcua import OpcuaConnector, wire  # noqa: E402
from simulator.mosquitto import free_port  # noqa: E402
from simulator.opcua_plant import DI_NAMESPACE_URI, OpcuaPlant  # noqa: E402
from simulator.plant import PlantShape, PlantSpec, make_plant  # noqa: E402

WANTED = ("Manufacturer", "Model", "SerialNumber", "ProductInstanceUri", "DeviceHealth", "EnterpriseUSCC", "Value")
WINDOW = timedelta(seconds=300)
READY = "ready"


def plant_spec(devices: int) -> PlantSpec:
    return make_plant(PlantShape(opcua=devices, modbus=0, mqtt=0, opcua_and_mqtt=0, modbus_and_opcua=0,
                                 silent=devices // 10, enterprises=max(1, devices // 100)))


async def serve(devices: int, port: int) -> None:
    """The child process: build the plant, say READY, serve until stdin closes."""
    # No value updates while measuring: activity is decided by the SourceTimestamps written at start.
    async with OpcuaPlant(plant_spec(devices), port=port, update_interval_s=24 * 3600):
        print(READY, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def run_connector(endpoint: str, in_flight: int) -> tuple[float, int, set[str], int]:
    connector = OpcuaConnector(endpoint=endpoint, timeout_s=60, max_requests_in_flight=in_flight)
    async with connector:
        start = time.perf_counter()
        observations = await connector.observe()
        elapsed = time.perf_counter() - start
    health = connector.health()
    if health.errors:
        raise RuntimeError(f"the connector counted errors: {health.errors}")
    active = sum(1 for o in observations if o.status is DeviceStatus.ACTIVE)
    return elapsed, health.extra["last_round"]["requests"], {o.identity.key() for o in observations}, active


async def run_naive(endpoint: str) -> tuple[float, int, set[str], int]:
    """Children one node at a time, then one Read per variable (asyncua's node API)."""
    requests = 0
    start = time.perf_counter()
    async with Client(endpoint, timeout=60) as client:
        di = await client.get_namespace_index(DI_NAMESPACE_URI)
        requests += 1
        device_set = client.get_node(ua.NodeId(ua.Int32(5001), ua.Int16(di)))
        device_type = ua.NodeId(ua.Int32(1002), ua.Int16(di))
        hierarchical = ObjectIds.HierarchicalReferences
        refs = await device_set.get_children_descriptions(refs=hierarchical, nodeclassmask=ua.NodeClass.Object)
        requests += 1
        identities: set[str] = set()
        active = 0
        now = datetime.now(UTC)
        for ref in refs:
            if ref.TypeDefinition != device_type:
                continue
            children = await client.get_node(ref.NodeId).get_children_descriptions(
                refs=hierarchical, nodeclassmask=ua.NodeClass.Variable)
            requests += 1
            values: dict[str, ua.DataValue] = {}
            for child in children:
                if child.BrowseName.Name in WANTED:
                    values[child.BrowseName.Name] = await client.get_node(child.NodeId).read_data_value()
                    requests += 1
            identities.add(DeviceIdentity.product_instance_uri(_raw(values["ProductInstanceUri"])).key())
            value = values["Value"]
            ts = value.SourceTimestamp
            if ts is not None and ts.tzinfo is None:
                ts = ts.replace(tzinfo=UTC)
            good = value.StatusCode is None or value.StatusCode.is_good()
            if _raw(values["DeviceHealth"]) != 1 and good and ts is not None and abs(now - ts) <= WINDOW:
                active += 1
    return time.perf_counter() - start, requests, identities, active


def _raw(value: ua.DataValue) -> Any:
    return value.Value.Value if value.Value is not None else None


async def measure(args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/tianping/plant"
    started = time.perf_counter()
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", "--devices", str(args.devices), "--port", str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        line = (await asyncio.wait_for(child.stdout.readline(), timeout=900)).decode()
        if line.strip() != READY:
            raise RuntimeError(f"the server did not start: {line!r}")
        build_s = time.perf_counter() - started
        print(f"server with {args.devices} devices ready in {build_s:.1f} s", file=sys.stderr)

        runs = []
        for i in range(args.repeat):
            runs.append(await run_connector(endpoint, args.in_flight))
            print(f"connector run {i + 1}: {runs[-1][0]:.2f} s, {runs[-1][1]} requests", file=sys.stderr)
        naive_s, naive_requests, naive_ids, naive_active = await run_naive(endpoint)
        print(f"naive: {naive_s:.2f} s, {naive_requests} requests", file=sys.stderr)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), timeout=30)
        except TimeoutError:
            child.kill()
            await child.wait()
    value, requests, ids, active = min(runs, key=lambda r: r[0])
    if len(ids) != args.devices or ids != naive_ids or active != naive_active:
        raise RuntimeError(f"connector and naive disagree: {len(ids)} vs {len(naive_ids)} devices, "
                           f"{active} vs {naive_active} active")
    return {
        "metric": "opcua_devices_enumerate_s",
        "value": round(value, 3),
        "unit": "s",
        "baseline": round(naive_s, 3),
        "ratio": round(naive_s / value, 2),
        "devices": len(ids),
        "active": active,
        "requests": requests,
        "baseline_requests": naive_requests,
        "runs_s": [round(r[0], 3) for r in runs],
        "max_requests_in_flight": args.in_flight,
        "decoder_fallbacks": wire.fallbacks(),  # answers the connector left to asyncua's decoder (0 expected)
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "server_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "server_build_s": round(build_s, 1),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # the machine is shared: figures depend on it
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="connector runs (the best counts)")
    parser.add_argument("--in-flight", type=int, default=4, help="the connector's max_requests_in_flight")
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.devices < 1 or args.repeat < 1:
        parser.error("--devices and --repeat must be >= 1")
    if args.serve:
        asyncio.run(serve(args.devices, args.port))
        return
    print(json.dumps(asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
