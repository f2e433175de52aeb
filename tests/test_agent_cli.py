"""The agent's command line against real peers, as an operator would run it (each command in its own process)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from simulator.modbus_gateway import ModbusPlant
from simulator.mosquitto import PrivateMosquitto, free_port
from simulator.opcua_plant import OpcuaPlant
from simulator.plant import PlantShape, make_plant
from simulator.resolution_node import ResolutionNode
from simulator.sparkplug_edge import SparkplugPlant

AGENT = str(Path(sys.executable).parent / "tianping-agent")


async def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(), err.decode())


async def test_scan_once_json_counts_each_device_once(tmp_path: Path, mosquitto: PrivateMosquitto) -> None:
    spec = make_plant(
        PlantShape(opcua=8, modbus=5, mqtt=6, opcua_and_mqtt=2, modbus_and_opcua=2, silent=2, enterprises=2), seed=11
    )
    truth = spec.ground_truth()
    async with (
        OpcuaPlant(spec, port=free_port(), update_interval_s=0.1) as opcua,
        ModbusPlant(spec, update_interval_s=0.1) as modbus,
        SparkplugPlant(spec, host=mosquitto.host, port=mosquitto.port, update_interval_s=0.1),
    ):
        gateways = ", ".join(
            f'{{ host = "{g.host}", port = {g.port}, enterprise = "{g.enterprise}", unit_ids = "1-10" }}'
            for g in modbus.gateways
        )
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            '[agent]\nname = "scan-test"\nverifier_url = "http://127.0.0.1:9"\n\n'
            f'[[connectors.opcua]]\nendpoint = "{opcua.endpoint}"\n\n'
            f"[[connectors.modbus]]\ngateways = [{gateways}]\n\n"
            f'[[connectors.mqtt]]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\nrebirth = true\n',
            encoding="utf-8",
        )
        done = await _run(
            AGENT, "scan", "--once", "--json", "--config", str(cfg), "--rounds", "2", "--interval-s", "0.5"
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["union"] == {
        "registered": truth["devices"],
        "reachable": truth["devices"],
        "active": truth["active_devices"],
    }
    assert result["merged_across_protocols"] == truth["multi_protocol_devices"]
    assert result["unmatched"] == 0
    for proto in ("opcua", "modbus", "mqtt"):
        assert result["per_protocol"][proto]["registered"] == truth["per_protocol"][proto]
        assert result["per_protocol"][proto]["active"] == truth["per_protocol_active"][proto]


async def test_scan_table_names_each_protocol_and_the_union(tmp_path: Path) -> None:
    spec = make_plant(
        PlantShape(opcua=3, modbus=0, mqtt=0, opcua_and_mqtt=0, modbus_and_opcua=0, silent=0, enterprises=1), seed=3
    )
    async with OpcuaPlant(spec, port=free_port(), update_interval_s=0.1) as opcua:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            f'[agent]\nname = "t"\nverifier_url = "http://127.0.0.1:9"\n\n[[connectors.opcua]]\n'
            f'endpoint = "{opcua.endpoint}"\n',
            encoding="utf-8",
        )
        done = await _run(AGENT, "scan", "--once", "--config", str(cfg), "--interval-s", "0.3")
    assert done.returncode == 0, done.stderr
    assert "opcua" in done.stdout and "union" in done.stdout and "merged across protocols: 0" in done.stdout


async def test_count_logs_prints_daily_totals_equal_to_ground_truth(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=5, rate_per_s=10)
    start = datetime(2025, 3, 1, 22, 0, tzinfo=ZoneInfo("Asia/Shanghai"))
    node.write_lines(3000, start=start, spacing_s=5)  # crosses midnight in Shanghai
    truth = node.ground_truth().as_count_dict()
    done = await _run(AGENT, "count-logs", str(node.path))
    assert done.returncode == 0, done.stderr
    counted = json.loads(done.stdout)
    assert counted["lines"] == truth["lines"] == 3000
    assert set(counted["days"]) == {"2025-03-01", "2025-03-02"}
    for day, want in truth["days"].items():
        for key in ("resolutions_ok", "resolutions_failed", "creates_ok", "deletes_ok", "lines"):
            assert counted["days"][day][key] == want[key], (day, key)
    assert start + timedelta(seconds=5 * 3000) > start  # the timestamps span both days by construction


async def test_count_logs_refuses_a_missing_file_clearly(tmp_path: Path) -> None:
    done = await _run(AGENT, "count-logs", str(tmp_path / "absent.log"))
    assert done.returncode == 2
    assert "absent.log" in done.stderr and "expected" in done.stderr
