"""Benchmark: sweep 20 Modbus TCP gateways x 247 unit ids in parallel vs one gateway x 247 unit ids.

Goal (issue 3): 20 gateways scanned in at most 1.5x the time of one gateway, measured in the same run.

The simulated gateways (real pymodbus TCP servers from ``simulator/modbus_gateway.py``) run in a SEPARATE
PROCESS, started here with ``multiprocessing`` (spawn), so the scanner's wall time and CPU time are its own.
Each gateway has ``--present`` devices (default 10) at unit ids 1..n; the other ids have no device and are
either SILENT (no answer: each costs the connector's ``timeout_s``, as behind most real serial gateways) or
answered with exception 0x0B. Both modes are measured; the headline metric is the silent mode.

One scan = one ``ModbusConnector.observe()`` round with a fresh connector (connect, sweep every unit id,
identify each present device). The one-gateway baseline sweeps the first gateway of the same simulator.
Every scan is checked: the devices found must be exactly the simulated ones and no error may be counted.

    .venv/bin/python bench/modbus_scan.py                  # timeout 0.1 s, both modes
    .venv/bin/python bench/modbus_scan.py --timeout-s 0.05 --modes silent

The last line printed is one JSON object: metric, value (20-gateway seconds, silent), unit, baseline
(1-gateway seconds, silent), ratio, goal_ratio_max, and the figures of every mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors.modbus import ModbusConnector
from simulator.modbus_gateway import ModbusPlant
from simulator.plant import PlantShape, make_plant

GOAL_RATIO_MAX = 1.5


def _plant_spec(gateways: int, present: int) -> Any:
    shape = PlantShape(
        opcua=0, modbus=gateways * present, mqtt=0, opcua_and_mqtt=0, modbus_and_opcua=0,
        silent=gateways, enterprises=gateways,
    )
    return make_plant(shape, seed=11)


# --- the simulator process ----------------------------------------------------------------------------------


def _simulator_main(conn: Connection, gateways: int, present: int, absent: str) -> None:
    """Child process: serve the gateways until told to stop; answer with this process's CPU seconds."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        async with ModbusPlant(_plant_spec(gateways, present), absent=absent) as plant:
            conn.send([{"host": g.host, "port": g.port, "enterprise": g.enterprise, "units": len(g.unit_ids)}
                       for g in plant.gateways])
            while True:
                command = await loop.run_in_executor(None, conn.recv)
                if command == "cpu":
                    conn.send(time.process_time())
                elif command == "stop":
                    conn.send({"cpu_s": time.process_time(), "served": plant.stats()})
                    return

    asyncio.run(serve())


class Simulator:
    """The simulated gateways in their own process."""

    def __init__(self, *, gateways: int, present: int, absent: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_simulator_main, args=(child, gateways, present, absent), name=f"modbus-sim-{absent}",
            daemon=True,
        )
        self._process.start()
        if not self._conn.poll(60):
            self._process.kill()
            raise RuntimeError("the simulator process did not start within 60 s")
        self.gateways: list[dict[str, Any]] = self._conn.recv()

    def cpu_s(self) -> float:
        self._conn.send("cpu")
        return float(self._conn.recv())

    def stop(self) -> dict[str, Any]:
        self._conn.send("stop")
        result: dict[str, Any] = self._conn.recv() if self._conn.poll(30) else {}
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
        return result


# --- the scanner (this process) -----------------------------------------------------------------------------


async def _scan(gateways: list[dict[str, Any]], unit_ids: int, timeout_s: float) -> tuple[float, float, int]:
    """One observe() round of a fresh connector; (wall seconds, scanner CPU seconds, devices found)."""
    cfg = {
        "gateways": [{"host": g["host"], "port": g["port"], "enterprise": g["enterprise"],
                      "unit_ids": f"1-{unit_ids}"} for g in gateways],
        "timeout_s": timeout_s,
    }
    cpu0, t0 = time.process_time(), time.perf_counter()
    async with ModbusConnector.from_config(cfg) as connector:
        observations = await connector.observe()
        health = connector.health()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    expected = sum(g["units"] for g in gateways)
    if len(observations) != expected or health.errors:
        raise SystemExit(f"scan of {len(gateways)} gateway(s) found {len(observations)} devices where {expected} "
                         f"are simulated, errors {dict(health.errors)}")
    return wall, cpu, len(observations)


def measure_mode(absent: str, args: argparse.Namespace) -> dict[str, Any]:
    sim = Simulator(gateways=args.gateways, present=args.present, absent=absent)
    repeats = args.repeats_silent if absent == "silent" else args.repeats_0x0b
    try:
        one: list[tuple[float, float, int]] = []
        many: list[tuple[float, float, int]] = []
        sim_cpu0 = sim.cpu_s()
        for _ in range(repeats):  # interleaved, so a burst of load on the machine hits both alike
            one.append(asyncio.run(_scan(sim.gateways[:1], args.unit_ids, args.timeout_s)))
            many.append(asyncio.run(_scan(sim.gateways, args.unit_ids, args.timeout_s)))
        sim_cpu = sim.cpu_s() - sim_cpu0
    finally:
        served = sim.stop()
    baseline = statistics.median(r[0] for r in one)
    value = statistics.median(r[0] for r in many)
    requests = sum(s["requests"] for s in served.get("served", {}).values())
    result = {
        "absent_mode": absent,
        "repeats": repeats,
        "one_gateway_s": round(baseline, 3),
        "twenty_gateways_s": round(value, 3),
        "ratio": round(value / baseline, 3),
        "one_gateway_runs_s": [round(r[0], 3) for r in one],
        "twenty_gateways_runs_s": [round(r[0], 3) for r in many],
        "scanner_cpu_s_one": round(statistics.median(r[1] for r in one), 3),
        "scanner_cpu_s_twenty": round(statistics.median(r[1] for r in many), 3),
        "simulator_cpu_s_total": round(sim_cpu, 3),
        "simulator_requests_total": requests,
        "devices_found_twenty": many[0][2],
    }
    print(f"absent={absent:6} timeout={args.timeout_s}s  1 gateway: {baseline:7.3f} s "
          f"(scanner CPU {result['scanner_cpu_s_one']} s)   {args.gateways} gateways: {value:7.3f} s "
          f"(scanner CPU {result['scanner_cpu_s_twenty']} s, {many[0][2]} devices)   ratio {value / baseline:.2f}",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--unit-ids", type=int, default=247, help="unit ids 1..N swept on every gateway")
    parser.add_argument("--present", type=int, default=10, help="devices per gateway, at unit ids 1..n")
    parser.add_argument("--timeout-s", type=float, default=0.1, help="the connector's timeout_s")
    parser.add_argument("--modes", default="silent,0x0B", help="absent-id behaviours to measure, comma separated")
    parser.add_argument("--repeats-silent", type=int, default=1)
    parser.add_argument("--repeats-0x0b", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # one ERROR line per unanswered request otherwise
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = {mode: measure_mode(mode, args) for mode in modes}
    head = results.get("silent") or next(iter(results.values()))
    print(json.dumps({
        "metric": f"modbus_scan_{args.gateways}x{args.unit_ids}_s",
        "value": head["twenty_gateways_s"],
        "unit": "s",
        "baseline": head["one_gateway_s"],
        "ratio": head["ratio"],
        "goal_ratio_max": GOAL_RATIO_MAX,
        "goal_met": head["ratio"] <= GOAL_RATIO_MAX,
        "gateways": args.gateways,
        "unit_ids": args.unit_ids,
        "present_per_gateway": args.present,
        "absent_mode": head["absent_mode"],
        "timeout_s": args.timeout_s,
        "modes": results,
    }))


if __name__ == "__main__":
    main()
