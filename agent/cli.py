"""``tianping-agent``: init, enroll, run, status, scan, count-logs, backfill-demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from agent.config import SKELETON, AgentConfig, load_config
from agent.errors import AgentError
from connectors.base import ConnectorError
from protocol.errors import ProtocolError

log = logging.getLogger("agent")
DEFAULT_CONFIG = Path("agent.toml")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help="agent configuration (TOML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tianping-agent", description="Tianping edge agent (天平 边缘代理)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="make the agent's key pair (0600) and a configuration skeleton")
    _config_arg(p)
    p.add_argument("--name", default="agent")
    p.add_argument("--verifier", default="http://127.0.0.1:8700", help="verifier base URL")

    p = sub.add_parser("enroll", help="bind this agent's key to an applicant with a single-use token")
    _config_arg(p)
    p.add_argument("--verifier", required=True, help="verifier base URL")
    p.add_argument("--token", required=True)

    p = sub.add_parser("rotate-key", help="make a new key and bind it with a request signed by the current key")
    _config_arg(p)

    p = sub.add_parser("run", help="collect, roll up, sign and deliver reports on schedule")
    _config_arg(p)
    p.add_argument("--duration-s", type=float, default=None, help="stop after this long (default: run until signalled)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (default: [agent].metrics_port, else off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for /metrics (default 127.0.0.1)")

    p = sub.add_parser("status", help="enrollment, outbox depth, chain state, last receipt")
    _config_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("scan", help="count devices now and print a table per protocol")
    _config_arg(p)
    p.add_argument("--once", action="store_true", help="one scan, then exit (the default and only mode)")
    p.add_argument("--rounds", type=int, default=2, help="observation passes (activity needs two); default 2")
    p.add_argument("--interval-s", type=float, default=1.0, help="seconds between passes")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")

    p = sub.add_parser("count-logs", help="count resolution log files offline; daily totals as JSON")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument(
        "--format",
        default="handle-net",
        help="handle-net (HANDLE.NET server access log, the default), handle-proxy (its HTTP proxy's log), combined "
        "(HTTP API access log, NCSA combined format) or json (HTTP API access log, one JSON object per line; "
        "json:field=key,... names the keys); see connectors/resolution/README.md",
    )
    p.add_argument("--timezone", default="Asia/Shanghai")
    p.add_argument("--workers", type=int, default=None,
                   help="threads scanning plain files (processes without the C scanner; default: one per CPU)")
    p.add_argument("--salt-hex", default=None, help="sample evidence lines under this salt (hex), as the agent does")

    p = sub.add_parser(
        "backfill-demo",
        help="DEMO ONLY: real scans stamped as past days at compressed time (the verifier marks them late)",
    )
    _config_arg(p)
    p.add_argument("--start", type=date.fromisoformat, required=True, help="first simulated day (YYYY-MM-DD)")
    p.add_argument("--days", type=int, required=True)
    p.add_argument("--pace-s", type=float, default=0.15, help="real seconds between simulated days")
    return parser


def cmd_init(args: argparse.Namespace) -> int:
    from protocol.keys import generate_private_key, key_id, write_private_key

    cfg_path: Path = args.config
    if cfg_path.exists():
        print(f"{cfg_path} exists; leaving it as it is")
    else:
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(SKELETON.format(name=args.name, verifier_url=args.verifier), encoding="utf-8")
        print(f"wrote {cfg_path}")
    config = load_config(cfg_path)
    if config.key_path.exists():
        print(f"{config.key_path} exists; keeping the agent's key")
    else:
        key = generate_private_key()
        write_private_key(key, config.key_path)
        print(f"wrote {config.key_path} (0600), key id {key_id(key.public_key())}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.enroll import enroll

    config = load_config(args.config)
    e = enroll(
        key_path=config.key_path,
        enrollment_path=config.enrollment_path,
        verifier_url=args.verifier,
        token=args.token,
        agent_name=config.agent.name,
        timeout_s=config.agent.request_timeout_s,
    )
    print(f"enrolled: agent {e.agent_id} for applicant {e.applicant_id} (key {e.key_id[:16]}…)")
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from datetime import UTC

    from agent.enroll import rotate_key

    config = load_config(args.config)
    e = rotate_key(
        key_path=config.key_path,
        enrollment_path=config.enrollment_path,
        now=datetime.now(UTC),
        timeout_s=config.agent.request_timeout_s,
    )
    print(f"rotated: agent {e.agent_id} now signs with key {e.key_id[:16]}… (a running agent picks it up at restart)")
    return 0


async def _run(config: AgentConfig, duration_s: float | None, *, metrics_port: int | None = None,
               metrics_host: str = "127.0.0.1") -> int:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from agent.runtime import Agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    wake = asyncio.Event()
    async with Agent(config) as agent, contextlib.AsyncExitStack() as exits:
        metrics = None
        port = metrics_port or config.agent.metrics_port
        if port:  # issue 7: the agent's Prometheus metrics
            from agent.metrics import AgentMetrics

            metrics = AgentMetrics(agent, config.outbox_path)
            metrics.serve(port, metrics_host)
            exits.callback(metrics.close)

        async def collect() -> None:
            r = await agent.collect_round()
            if metrics is not None:
                metrics.note_round()
            log.info("round: %d devices active of %d seen", r.summary.union.active, r.summary.union.registered)

        async def report() -> None:
            item = agent.close_period()
            if item is not None:
                log.info("signed report seq %d into the outbox", item.seq)
                wake.set()

        async def deliver_loop() -> None:
            while not stop.is_set():
                try:
                    result = await agent.deliver()
                except AgentError as exc:
                    log.error("delivery stopped: %s", exc)
                    result = None
                wait = result.retry_after_s if result and result.retry_after_s else config.agent.report_interval_s
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await wake.wait()

        scheduler = AsyncIOScheduler()
        now = datetime.now().astimezone()
        scheduler.add_job(
            collect,
            "interval",
            seconds=config.agent.collect_interval_s,
            next_run_time=now,
            id="collect",
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            report, "interval", seconds=config.agent.report_interval_s, id="report", max_instances=1, coalesce=True
        )
        scheduler.start()
        deliverer = asyncio.create_task(deliver_loop(), name="deliver")
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(duration_s):
                    await stop.wait()
        finally:
            # Stop in order: no new jobs, one last round and report, the delivery loop told to finish (not
            # cancelled mid-request), then one last delivery of whatever is left.
            stop.set()
            scheduler.shutdown(wait=False)
            await collect()
            await report()
            wake.set()
            await deliverer
            try:
                result = await agent.deliver()
                log.info("stopping: %d delivered, %d still in the outbox", result.delivered, result.remaining)
            except AgentError as exc:
                log.error("stopping: %s", exc)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(load_config(args.config), args.duration_s, metrics_port=args.metrics_port,
                            metrics_host=args.metrics_host))


def cmd_status(args: argparse.Namespace) -> int:
    from agent.enroll import load_enrollment
    from agent.errors import NotEnrolled
    from agent.outbox import Outbox

    config = load_config(args.config)
    status: dict[str, Any] = {"name": config.agent.name, "config": str(config.path)}
    try:
        e = load_enrollment(config.enrollment_path)
        status.update(enrolled=True, agent_id=e.agent_id, applicant_id=e.applicant_id, verifier=e.verifier_url)
    except NotEnrolled:
        status["enrolled"] = False
    outbox = Outbox(config.outbox_path)
    chain = outbox.chain()
    status.update(
        outbox_depth=outbox.depth(),
        next_seq=chain.next_seq,
        last_period_end=chain.last_period_end.isoformat() if chain.last_period_end else None,
        last_receipt=outbox.last_receipt(),
        last_error=outbox.last_error(),
        connectors={k: len(v) for k, v in config.connectors.items()},
    )
    outbox.close()
    if args.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"tianping-agent {config.agent.name}")
        t.add_column("field")
        t.add_column("value")
        for k, v in status.items():
            t.add_row(k, json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else str(v))
        Console().print(t)
    return 0


async def _scan(config: AgentConfig, rounds: int, interval_s: float) -> dict[str, Any]:
    from rich.progress import Progress

    from agent.rollup import merge_observations, summarize
    from agent.runtime import build_connectors
    from connectors.registry import DEVICE_KINDS

    conns = [c for c in build_connectors(config) if c.kind in DEVICE_KINDS]
    observations: list[Any] = []
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("scanning", total=rounds * max(1, len(conns)))
        for r in range(rounds):
            observations = []
            for c in conns:
                progress.update(task, description=f"round {r + 1}/{rounds}: {c.kind} {c.source}")
                observations.extend(await c.observe())
                progress.advance(task)
            if r + 1 < rounds:
                await asyncio.sleep(interval_s)
    health = {f"{c.kind} {c.source}": dict(c.health().errors) for c in conns}
    for c in conns:
        await c.aclose()
    merged = merge_observations(observations, config.same_device)
    s = summarize(observations, merged)

    def tiers(t: Any) -> dict[str, int]:
        return {"registered": t.registered, "reachable": t.reachable, "active": t.active}

    return {
        "per_protocol": {p: tiers(t) for p, t in s.per_protocol.items()},
        "union": tiers(s.union),
        "merged_across_protocols": s.merged_across_protocols,
        "unmatched": s.unmatched,
        "enterprises_active": s.enterprises_active,
        "errors": health,
    }


def cmd_scan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    result = asyncio.run(_scan(config, max(1, args.rounds), args.interval_s))
    if args.json:
        print(json.dumps(result, ensure_ascii=False, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="设备计数 / device counts")
    for col in ("协议 protocol", "登记 registered", "可达 reachable", "活跃 active"):
        t.add_column(col, justify="right" if col[0] != "协" else "left")
    for proto, c in result["per_protocol"].items():
        t.add_row(proto, str(c["registered"]), str(c["reachable"]), str(c["active"]))
    u = result["union"]
    t.add_row("去重合计 union", str(u["registered"]), str(u["reachable"]), str(u["active"]), style="bold")
    Console().print(t)
    print(
        f"merged across protocols: {result['merged_across_protocols']}; "
        f"unmatched (protocol-local identity only): {result['unmatched']}; "
        f"active enterprises: {result['enterprises_active']}"
    )
    return 0


def cmd_count_logs(args: argparse.Namespace) -> int:
    from connectors.resolution import count_files

    salt = bytes.fromhex(args.salt_hex) if args.salt_hex else None
    result = count_files(args.paths, fmt=args.format, tz=args.timezone, workers=args.workers, salt=salt)
    print(json.dumps(result, ensure_ascii=False, sort_keys=True))
    return 0


async def _backfill(config: AgentConfig, start: date, days: int, pace_s: float) -> int:
    from agent.runtime import Agent

    async with Agent(config) as agent:
        tz = config.tz
        first = datetime.combine(start, time(0), tzinfo=tz)
        chain_end = agent.outbox.chain().last_period_end
        if chain_end is not None and chain_end > first:
            raise AgentError(f"backfill: expected a start after the last reported period ({chain_end}), got {first}")
        agent.period_start = first
        for d in range(days):
            day = first + timedelta(days=d)
            await agent.collect_round(now=day + timedelta(hours=12))
            agent.close_period(end=day + timedelta(days=1))
            await agent.deliver()
            await asyncio.sleep(pace_s)
        result = await agent.deliver()
        print(f"backfill-demo: {days} simulated days from {start} signed; {result.remaining} left in the outbox")
        return 0 if result.remaining == 0 else 1


def cmd_backfill(args: argparse.Namespace) -> int:
    return asyncio.run(_backfill(load_config(args.config), args.start, args.days, args.pace_s))


COMMANDS = {
    "init": cmd_init,
    "enroll": cmd_enroll,
    "rotate-key": cmd_rotate_key,
    "run": cmd_run,
    "status": cmd_status,
    "scan": cmd_scan,
    "count-logs": cmd_count_logs,
    "backfill-demo": cmd_backfill,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # The protocol libraries log every request (and pymodbus every unanswered probe of an absent unit id,
        # which is how a sweep works): the connectors count those as metrics instead.
        for noisy in ("asyncua", "apscheduler", "httpx", "pymodbus"):
            logging.getLogger(noisy).setLevel(logging.WARNING if noisy != "pymodbus" else logging.CRITICAL)
    try:
        return COMMANDS[args.command](args)
    except (AgentError, ConnectorError, ProtocolError) as exc:
        print(f"tianping-agent: {getattr(exc, 'code', 'error')}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tianping-agent: file_unreadable: expected a readable file, got {exc.strerror}: {exc.filename}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
