"""``tianping-verifier`` subcommands of issue 6 (added to ``verifier.cli``'s parser):

    tianping-verifier gate record --applicant A --metric M --value V --by NAME --document REF
                                  [--period YEAR] [--item ITEM] [--note TEXT]
    tianping-verifier gate list --applicant A
    tianping-verifier evaluate --applicant A --year Y [--as-of YYYY-MM-DD] [--rules PATH] [--store]
    tianping-verifier annual run --year Y [--rules PATH] [--webhook-url URL]
    tianping-verifier report --applicant A --year Y --format pdf|xlsx|csv|json --out FILE [--lang zh|en]
                             [--table summary|awards|devices|enterprises|monthly|anomalies] [--rules PATH]
    tianping-verifier serve … [--annual-cron "0 2 5 1 *"] [--annual-timezone Asia/Shanghai] [--webhook-url URL]
                              [--no-annual]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from verifier.annual import (
    DEFAULT_CRON,
    SHANGHAI,
    AnnualScheduler,
    AnnualSettings,
    evaluate_and_store,
    on_demand,
    run_annual,
    signing_key,
)
from verifier.db import make_engine
from verifier.facts import shanghai_day
from verifier.gates import RECORDABLE, list_records, record_gate
from verifier.reports import CSV_TABLES, FORMATS, build_report, render
from verifier.rules import DEFAULT_RULES_PATH, load_policy

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def add_parsers(sub: Any) -> None:
    """Add the subcommands to ``verifier.cli``'s subparsers (and the annual-check options to ``serve``)."""
    gate = sub.add_parser("gate", help="gates and figures recorded by an official").add_subparsers(
        dest="action", required=True)
    g_rec = gate.add_parser("record", help="record a gate (true/false) or a figure (a decimal) with its document")
    g_rec.add_argument("--applicant", required=True)
    g_rec.add_argument("--metric", required=True, choices=RECORDABLE)
    g_rec.add_argument("--value", required=True, help="true/false, a decimal such as 1250000.50, or a date")
    g_rec.add_argument("--by", required=True, help="the official who established it")
    g_rec.add_argument("--document", required=True, help="the document's reference, e.g. 嘉经信〔2026〕3号")
    g_rec.add_argument("--period", type=int, help="the calendar year it is for (default: not tied to a year)")
    g_rec.add_argument("--item", default="")
    g_rec.add_argument("--note", default="")
    g_list = gate.add_parser("list", help="every record of an applicant")
    g_list.add_argument("--applicant", required=True)

    ev = sub.add_parser("evaluate", help="evaluate one applicant for one year now (JSON, same as the API)")
    ev.add_argument("--applicant", required=True)
    ev.add_argument("--year", type=int, required=True)
    ev.add_argument("--as-of", type=date.fromisoformat, default=None,
                    help="end of the windows for a year still running (default: today, Shanghai)")
    ev.add_argument("--rules", type=Path, default=DEFAULT_RULES_PATH)
    ev.add_argument("--store", action="store_true", help="store it as the year's signed evaluation (idempotent)")

    annual = sub.add_parser("annual", help="the annual check").add_subparsers(dest="action", required=True)
    a_run = annual.add_parser("run", help="evaluate a year for every applicant now (idempotent)")
    a_run.add_argument("--year", type=int, required=True)
    a_run.add_argument("--rules", type=Path, default=DEFAULT_RULES_PATH)
    a_run.add_argument("--webhook-url", default=None)

    rep = sub.add_parser("report", help="write a report for one applicant and year")
    rep.add_argument("--applicant", required=True)
    rep.add_argument("--year", type=int, required=True)
    rep.add_argument("--format", required=True, choices=FORMATS)
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--lang", choices=("zh", "en"), default="zh")
    rep.add_argument("--table", choices=CSV_TABLES, default="summary", help="the table a CSV holds")
    rep.add_argument("--rules", type=Path, default=DEFAULT_RULES_PATH)

    serve = sub.choices.get("serve")
    if serve is not None:
        serve.add_argument("--annual-cron", default=DEFAULT_CRON, help="when the annual check runs (crontab)")
        serve.add_argument("--annual-timezone", default=SHANGHAI)
        serve.add_argument("--webhook-url", default=None, help="POSTed a JSON summary when evaluations are ready")
        serve.add_argument("--no-annual", action="store_true", help="do not schedule the annual check")


def _print(obj: Any) -> int:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
    return 0


def _report(args: argparse.Namespace, db_url: str) -> int:
    engine = make_engine(db_url)
    policy = load_policy(args.rules)
    now = _now()
    rep = build_report(engine, policy, args.applicant, args.year, now=now,
                       as_of=min(date(args.year, 12, 31), shanghai_day(now)))
    data = render(rep, args.format, lang=args.lang, table=args.table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    sys.stderr.write(f"wrote {args.out} ({len(data)} bytes)\n")
    return 0


def _list_gates(args: argparse.Namespace, db_url: str) -> int:
    with make_engine(db_url).connect() as conn:
        return _print([r.to_json() for r in list_records(conn, args.applicant)])


def _evaluate(args: argparse.Namespace, db_url: str) -> int:
    engine = make_engine(db_url)
    policy = load_policy(args.rules)
    if args.store:
        stored, created = evaluate_and_store(engine, policy, args.applicant, args.year, now=_now(),
                                             key=signing_key(engine))
        return _print({"created": created, **stored.to_json()})
    return _print(on_demand(engine, policy, args.applicant, args.year,
                            as_of=args.as_of or shanghai_day(_now())).to_json())


def handlers(args: argparse.Namespace, db_url: str) -> dict[tuple[str, str | None], Callable[[], int]]:
    return {
        ("gate", "record"): lambda: _print(record_gate(
            make_engine(db_url), applicant_id=args.applicant, metric=args.metric, value=args.value,
            recorded_by=args.by, document_ref=args.document, now=_now(), period=args.period, item=args.item,
            note=args.note).to_json()),
        ("gate", "list"): lambda: _list_gates(args, db_url),
        ("evaluate", None): lambda: _evaluate(args, db_url),
        ("annual", "run"): lambda: _print(run_annual(
            make_engine(db_url), load_policy(args.rules), args.year, now=_now(),
            settings=AnnualSettings(webhook_url=args.webhook_url)).to_json()),
        ("report", None): lambda: _report(args, db_url),
    }


def start_annual(args: argparse.Namespace, db_url: str) -> AnnualScheduler | None:
    """For ``serve``: catch up a missed annual run, then schedule the next ones (unless --no-annual)."""
    if getattr(args, "no_annual", True):
        return None
    settings = AnnualSettings.from_config({"cron": args.annual_cron, "timezone": args.annual_timezone,
                                           **({"webhook_url": args.webhook_url} if args.webhook_url else {})})
    scheduler = AnnualScheduler(make_engine(db_url), load_policy(args.rules), settings)
    scheduler.start()
    log.info("annual check scheduled (%s %s), next run %s", settings.cron, settings.timezone,
             scheduler.next_run_time())
    return scheduler
