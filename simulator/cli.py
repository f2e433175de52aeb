"""``tianping-sim``: the simulated outside world.

- ``tianping-sim plant``: an OPC UA server, Modbus TCP gateways and Sparkplug B edge nodes over one plant;
  writes the plant's ground truth and the endpoints to ``--state`` (JSON) once everything listens.
- ``tianping-sim node``: a secondary node writing HANDLE.NET-style access logs, in real time and/or as a
  compressed-time history of past days.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from simulator.mosquitto import free_port
from simulator.plant import PlantShape, make_plant

log = logging.getLogger("simulator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tianping-sim", description="Tianping simulated plant and node")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plant", help="OPC UA + Modbus TCP + Sparkplug B over one simulated plant")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--opcua", type=int, default=20, help="devices visible through OPC UA")
    p.add_argument("--modbus", type=int, default=10, help="devices visible through Modbus TCP")
    p.add_argument("--mqtt", type=int, default=15, help="devices visible through MQTT (Sparkplug B)")
    p.add_argument("--opcua-and-mqtt", type=int, default=4, help="of those, visible through OPC UA and MQTT")
    p.add_argument("--modbus-and-opcua", type=int, default=3, help="of those, visible through Modbus and OPC UA")
    p.add_argument("--silent", type=int, default=3, help="devices connected but sending no fresh data")
    p.add_argument("--enterprises", type=int, default=4)
    p.add_argument("--mqtt-host", default="127.0.0.1")
    p.add_argument("--mqtt-port", type=int, required=True, help="the broker the edge nodes publish to")
    p.add_argument("--opcua-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--update-interval-s", type=float, default=0.5)
    p.add_argument("--state", type=Path, required=True, help="where to write endpoints and ground truth (JSON)")

    p = sub.add_parser("node", help="a secondary node writing HANDLE.NET access logs")
    p.add_argument("--log-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prefixes", type=int, default=20)
    p.add_argument("--rate-per-s", type=float, default=50.0, help="live lines per second (0: no live traffic)")
    p.add_argument("--history-start", type=date.fromisoformat, default=None, help="first day of history to write")
    p.add_argument("--history-days", type=int, default=0)
    p.add_argument("--history-lines-per-day", type=int, default=288)
    p.add_argument("--state", type=Path, default=None, help="where to write the ground truth (JSON) on exit")
    p.add_argument("--duration-s", type=float, default=None)
    return parser


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


async def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_plant(args: argparse.Namespace) -> int:
    from simulator.modbus_gateway import ModbusPlant
    from simulator.opcua_plant import OpcuaPlant
    from simulator.sparkplug_edge import SparkplugPlant

    shape = PlantShape(
        opcua=args.opcua,
        modbus=args.modbus,
        mqtt=args.mqtt,
        opcua_and_mqtt=args.opcua_and_mqtt,
        modbus_and_opcua=args.modbus_and_opcua,
        silent=args.silent,
        enterprises=args.enterprises,
    )
    spec = make_plant(shape, seed=args.seed)
    stop = await _stop_event()
    opcua_port = args.opcua_port or free_port()
    async with (
        OpcuaPlant(spec, port=opcua_port, update_interval_s=args.update_interval_s) as opcua,
        ModbusPlant(spec, update_interval_s=args.update_interval_s) as modbus,
        SparkplugPlant(spec, host=args.mqtt_host, port=args.mqtt_port, update_interval_s=args.update_interval_s),
    ):
        _write_json(
            args.state,
            {
                "opcua_endpoint": opcua.endpoint,
                "modbus_gateways": [
                    {"host": g.host, "port": g.port, "enterprise": g.enterprise, "unit_ids": list(g.unit_ids)}
                    for g in modbus.gateways
                ],
                "mqtt": {"host": args.mqtt_host, "port": args.mqtt_port},
                "enterprises": [{"uscc": e.uscc, "name": e.name} for e in spec.enterprises],
                "ground_truth": spec.ground_truth(),
            },
        )
        log.warning("plant up: %s", spec.ground_truth())
        await stop.wait()
    return 0


async def run_node(args: argparse.Namespace) -> int:
    from simulator.resolution_node import ResolutionNode

    node = ResolutionNode(
        args.log_dir, seed=args.seed, prefixes=args.prefixes, rate_per_s=max(args.rate_per_s, 1.0)
    )
    tz = ZoneInfo("Asia/Shanghai")
    if args.history_start and args.history_days > 0:
        spacing = 86_400 / max(1, args.history_lines_per_day)
        for d in range(args.history_days):
            day = datetime.combine(args.history_start + timedelta(days=d), time(0), tzinfo=tz)
            node.write_lines(args.history_lines_per_day, start=day, spacing_s=spacing)
    stop = await _stop_event()
    if args.rate_per_s > 0:
        task = asyncio.create_task(node.run(), name="node")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.duration_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if args.state:
        truth = node.ground_truth()
        _write_json(args.state, {**truth.as_count_dict(), "recreated": len(truth.recreated)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = run_plant if args.command == "plant" else run_node
    return asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
