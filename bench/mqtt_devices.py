"""Benchmark: 10,000 Sparkplug B devices publishing through a private Mosquitto; does the agent's MqttConnector
keep up with the message rate a bare paho-mqtt subscriber reaches on the same broker in the same run?

- broker: a private Mosquitto (``simulator/mosquitto.py``) with ``max_queued_messages`` lifted, so a subscriber
  that falls behind is queued for, never silently dropped (Mosquitto drops QoS 0 messages beyond the limit);
- publisher: a SEPARATE PROCESS, one paho client publishing as fast as it can at QoS 0: per phase an NBIRTH
  per edge node (``--nodes``, default 100), a DBIRTH per device (Manufacturer, Model, SerialNumber, Value),
  then ``--rounds`` DDATA per device, round-robin over devices, with each node's ``seq`` running 0-255;
- baseline: a bare paho subscriber (``loop_start``, subscribe, count messages, nothing else) in its own process;
- connector: ``MqttConnector`` (full Sparkplug decoding and device tracking) in its own process, whose peak RSS
  is ``peak_rss_mb``. After the phase its ``observe()`` must show every device ACTIVE and no error counted.

Both subscribers take their paho callback thread's view: rate = (messages - 1) / (time of the last message -
time of the first), and every phase must deliver every published message (count = published), else the run
fails. Phases alternate (baseline, connector) ``--repeat`` times (default 5); ``value`` and ``baseline`` are the
MEDIAN rates (on a shared machine single runs swing by 2x either way; the median resists a lucky run as well as
an unlucky one). Each phase uses a fresh Sparkplug group. ``--rate`` paces the publisher instead (msg/s).

    .venv/bin/python bench/mqtt_devices.py                 # about 2 minutes
    .venv/bin/python bench/mqtt_devices.py --rate 10000    # 10,000 devices x 1 message/s

The last line printed is one JSON object: {"metric": "mqtt_sparkplug_msgs_per_s", "value": <connector rate>,
"unit": "msg/s", "baseline": <bare paho rate>, "ratio": value/baseline, "peak_rss_mb": ..., "devices": 10000,
"messages": <per phase>, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import random
import resource
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simulator.mosquitto import PrivateMosquitto
from simulator.plant import uscc
from simulator.sparkplug_edge import DOUBLE, STRING, Metric, ddata_payload, encode_payload, nbirth_payload

NAMESPACE = "spBv1.0"
GOAL_RATIO_MIN = 0.9
GOAL_PEAK_RSS_MB = 150
IDLE_TIMEOUT_S = 15.0  # a subscriber that receives nothing for this long has lost messages


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the publisher process -----------------------------------------------------------------------------------


def _phase_messages(group: str, devices: int, nodes: int, rounds: int) -> list[tuple[str, bytes]]:
    """Every (topic, payload) of one phase, in publishing order, with each edge node's seq running 0-255."""
    now = int(time.time() * 1000)
    seq = [0] * nodes
    out = [(f"{NAMESPACE}/{group}/NBIRTH/edge-{n}", nbirth_payload(1, timestamp_ms=now)) for n in range(nodes)]
    ddata = [ddata_payload(21.5, seq=s, timestamp_ms=now) for s in range(256)]

    def next_seq(node: int) -> int:
        seq[node] = (seq[node] + 1) % 256
        return seq[node]

    for d in range(devices):
        node = d % nodes
        out.append((f"{NAMESPACE}/{group}/DBIRTH/edge-{node}/dev-{d}", encode_payload([
            Metric("Properties/Manufacturer", STRING, "Bench Instruments"),
            Metric("Properties/Model", STRING, f"BX-{d % 7}"),
            Metric("Properties/SerialNumber", STRING, f"SN{d:08d}"),
            Metric("Value", DOUBLE, 20.0),
        ], seq=next_seq(node), timestamp_ms=now)))
    for _ in range(rounds):
        for d in range(devices):
            node = d % nodes
            out.append((f"{NAMESPACE}/{group}/DDATA/edge-{node}/dev-{d}", ddata[next_seq(node)]))
    return out


def _publisher_main(conn: Connection, host: str, port: int, devices: int, nodes: int, rounds: int,
                    rate: float) -> None:
    """Child process: one paho client, no network thread (publish() writes straight to the socket); on each
    ("go", group) publish one phase as fast as possible (or at ``rate`` msg/s when > 0, in bursts of 100) and
    answer (messages, seconds, cpu seconds)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-publisher-{os.getpid()}")
    client.connect(host, port, keepalive=120)
    while client.want_write():
        client.loop(0.1)
    client.loop(0.1)  # CONNACK
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "stop":
            client.disconnect()
            return
        _, group = command
        messages = _phase_messages(group, devices, nodes, rounds)
        cpu0, t0 = time.process_time(), time.perf_counter()
        publish = client.publish
        for i, (topic, payload) in enumerate(messages):
            if rate > 0 and i % 100 == 0 and (ahead := t0 + i / rate - time.perf_counter()) > 0:
                client.loop_write()
                time.sleep(ahead)
            publish(topic, payload)
        while client.want_write():  # drain what the socket did not take yet
            client.loop(0.05)
        conn.send((len(messages), time.perf_counter() - t0, time.process_time() - cpu0))


# --- the subscriber processes --------------------------------------------------------------------------------


class _Stamps:
    """First and last message times, taken in the subscriber's network thread."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0

    def mark(self) -> None:
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last

    def now(self) -> datetime:  # the connector's clock: called once per message it handles
        self.mark()
        return datetime.now(UTC)


def _wait_for(count: Any, expected: int) -> None:
    """Poll (every 20 ms) until ``count()`` reaches ``expected`` or nothing arrives for IDLE_TIMEOUT_S."""
    seen, since = -1, time.monotonic()
    while (n := count()) < expected:
        if n != seen:
            seen, since = n, time.monotonic()
        elif time.monotonic() - since > IDLE_TIMEOUT_S:
            return
        time.sleep(0.02)


def _poll(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)


def _bare_main(conn: Connection, host: str, port: int, group: str, expected: int) -> None:
    """Child process: the baseline. Subscribe, count messages, nothing else."""
    stamps = _Stamps()
    received = 0
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += 1
        stamps.mark()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{os.getpid()}")
    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{NAMESPACE}/{group}/#", qos=0)
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("bare subscriber: no SUBACK within 10 s")
    cpu0 = time.process_time()
    conn.send("ready")
    _wait_for(lambda: received, expected)
    cpu = time.process_time() - cpu0
    client.disconnect()
    client.loop_stop()
    conn.send({"messages": received, "first": stamps.first, "last": stamps.last, "cpu_s": cpu,
               "peak_rss_mb": _peak_rss_mb()})


def _connector_main(conn: Connection, host: str, port: int, group: str, expected: int, devices: int,
                    py_spy: str | None) -> None:
    """Child process: the agent's MqttConnector, full decoding and device tracking."""
    logging.basicConfig(level=logging.WARNING)
    if py_spy:  # sample this process while it works (collapsed stacks, one line per stack)
        import subprocess

        spy = Path(sys.executable).with_name("py-spy")
        subprocess.Popen([str(spy), "record", "--pid", str(os.getpid()), "--format", "raw", "--output", py_spy,
                          "--duration", "20", "--rate", "200", "--threads"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        time.sleep(1)
    from connectors.base import DeviceStatus
    from connectors.mqtt import MqttConnector

    stamps = _Stamps()

    async def run() -> dict[str, Any]:
        cfg = {"host": host, "port": port, "sparkplug_groups": [group], "timeout_s": 10}
        async with MqttConnector.from_config(cfg, now=stamps.now) as connector:
            if not connector.health().extra["subscribed"]:
                raise SystemExit("connector: not subscribed within 10 s")
            # The retained $SYS counter arrives right after the SUBACK; wait for it, then start the clock.
            await asyncio.to_thread(_poll, lambda: connector.health().extra["broker_clients_connected"] is not None)
            stamps.first = None
            cpu0 = time.process_time()
            conn.send("ready")
            await asyncio.to_thread(_wait_for, lambda: connector.health().extra["messages_handled"], expected)
            cpu = time.process_time() - cpu0
            t0 = time.perf_counter()
            observations = await connector.observe()
            observe_s = time.perf_counter() - t0
            health = connector.health()
        active = sum(1 for o in observations if o.status == DeviceStatus.ACTIVE)
        identified = sum(1 for o in observations if o.identity.strength > 1)
        return {"messages": health.extra["messages_handled"], "first": stamps.first, "last": stamps.last,
                "cpu_s": cpu, "devices": len(observations), "active": active, "identified": identified,
                "errors": dict(health.errors), "observe_s": observe_s, "peak_rss_mb": _peak_rss_mb()}

    conn.send(asyncio.run(run()))


# --- orchestration -------------------------------------------------------------------------------------------


def _phase(ctx: Any, kind: str, publisher: Connection, broker: PrivateMosquitto, group: str, expected: int,
           devices: int, py_spy: str | None = None) -> dict[str, Any]:
    parent, child = ctx.Pipe()
    if kind == "bare":
        proc = ctx.Process(target=_bare_main, args=(child, broker.host, broker.port, group, expected))
    else:
        proc = ctx.Process(target=_connector_main, args=(child, broker.host, broker.port, group, expected, devices,
                                                              py_spy))
    proc.start()
    if not parent.poll(60) or parent.recv() != "ready":
        proc.kill()
        raise SystemExit(f"{kind} subscriber did not become ready")
    publisher.send(("go", group))
    published, publish_s, publish_cpu_s = publisher.recv()
    if not parent.poll(IDLE_TIMEOUT_S + 120):
        proc.kill()
        raise SystemExit(f"{kind} subscriber did not finish")
    result: dict[str, Any] = parent.recv()
    proc.join(10)
    if result["messages"] != published:
        raise SystemExit(f"{kind}: {result['messages']} of {published} messages received: messages were lost")
    if kind == "connector" and (result["devices"] != devices or result["active"] != devices
                                or result["identified"] != devices or result["errors"]):
        raise SystemExit(f"connector: expected {devices} identified ACTIVE devices and no error, got "
                         f"{result['devices']} devices, {result['active']} active, {result['identified']} "
                         f"identified, errors {result['errors']}")
    result["rate"] = (result["messages"] - 1) / (result["last"] - result["first"])
    result["publisher_rate"] = published / publish_s
    result["publisher_cpu_s"] = publish_cpu_s
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random(2026)
    expected = args.nodes + args.devices * (1 + args.rounds)
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "connector": []}
    with PrivateMosquitto() as broker:  # max_queued_messages 0: nobody's messages are dropped
        publisher, child = ctx.Pipe()
        proc = ctx.Process(target=_publisher_main,
                           args=(child, broker.host, broker.port, args.devices, args.nodes, args.rounds,
                                 args.rate))
        proc.start()
        try:
            if not publisher.poll(30) or publisher.recv() != "ready":
                raise SystemExit("publisher did not connect")
            for i in range(args.repeat):
                for kind in ("bare", "connector"):
                    r = _phase(ctx, kind, publisher, broker, uscc(rng), expected, args.devices, args.py_spy)
                    runs[kind].append(r)
                    print(f"run {i + 1} {kind:9}: {r['rate']:8.0f} msg/s  (publisher {r['publisher_rate']:6.0f} "
                          f"msg/s; subscriber CPU {1e6 * r['cpu_s'] / r['messages']:.1f} us/msg; "
                          f"peak RSS {r['peak_rss_mb']:.1f} MB)", file=sys.stderr, flush=True)
            publisher.send("stop")
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    bare = statistics.median(r["rate"] for r in runs["bare"])
    value = statistics.median(r["rate"] for r in runs["connector"])
    peak = max(r["peak_rss_mb"] for r in runs["connector"])
    ratio = value / bare
    return {
        "metric": "mqtt_sparkplug_msgs_per_s",
        "value": round(value),
        "unit": "msg/s",
        "baseline": round(bare),
        "ratio": round(ratio, 3),
        "peak_rss_mb": round(peak, 1),
        "devices": args.devices,
        "messages": expected,
        "edge_nodes": args.nodes,
        "publisher_rate_limit": args.rate or None,
        "best_msgs_per_s": {k: round(max(r["rate"] for r in v)) for k, v in runs.items()},
        "pair_ratios": [round(c["rate"] / b["rate"], 3) for b, c in zip(runs["bare"], runs["connector"], strict=True)],
        "goal_met": ratio >= GOAL_RATIO_MIN and peak < GOAL_PEAK_RSS_MB,
        "runs_msgs_per_s": {k: [round(r["rate"]) for r in v] for k, v in runs.items()},
        "publisher_msgs_per_s": [round(r["publisher_rate"]) for v in runs.values() for r in v],
        "cpu_us_per_msg": {k: round(statistics.median(1e6 * r["cpu_s"] / r["messages"] for r in v), 1)
                           for k, v in runs.items()},
        "baseline_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["bare"]), 1),
        "observe_s": round(statistics.median(r["observe_s"] for r in runs["connector"]), 3),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=100, help="edge nodes the devices are spread over")
    parser.add_argument("--rounds", type=int, default=10, help="DDATA per device per phase")
    parser.add_argument("--rate", type=float, default=0, help="publish at this many msg/s (default 0: as fast "
                        "as the publisher can)")
    parser.add_argument("--repeat", type=int, default=5, help="(baseline, connector) phase pairs; medians count")
    parser.add_argument("--py-spy", metavar="FILE", help="profile the connector process with py-spy into FILE "
                        "(collapsed stacks; slows the connector down)")
    args = parser.parse_args()
    if min(args.devices, args.nodes, args.rounds, args.repeat) < 1 or args.nodes > args.devices:
        parser.error("--devices, --nodes, --rounds, --repeat must be >= 1 and --nodes <= --devices")
    print(json.dumps(measure(args)))


if __name__ == "__main__":
    main()
