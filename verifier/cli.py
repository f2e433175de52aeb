"""``tianping-verifier``: administer the verifier's database, serve the API, print eligibility verdicts.

    tianping-verifier [--db URL] init
    tianping-verifier [--db URL] applicant add --id ID --name NAME --kind platform|node
    tianping-verifier [--db URL] enterprise add --applicant ID --uscc USCC --name NAME
    tianping-verifier [--db URL] token issue --applicant ID [--enterprise USCC] [--ttl-s N]
    tianping-verifier [--db URL] agent revoke --agent AGENT_ID [--reason TEXT]
    tianping-verifier [--db URL] credential issue (--applicant ID | --official) --name NAME [--ttl-s N]
    tianping-verifier [--db URL] credential revoke (--id ID | --token-stdin)
    tianping-verifier [--db URL] credential list
    tianping-verifier [--db URL] serve [--host 127.0.0.1] [--port 8700] [--rules PATH]
    tianping-verifier [--db URL] check --year Y [--applicant ID] [--lang zh|en|both] [--json] [--rules PATH]
                                       [--as-of YYYY-MM-DD]

``--db`` defaults to the environment variable TIANPING_DB, then sqlite:///var/verifier.sqlite.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.table import Table

from protocol.errors import ProtocolError
from verifier.audit import audit_main
from verifier.bundle import export_bundle
from verifier.checkpoints import ensure_note_key
from verifier.db import db_url_from_env, init_db, make_engine
from verifier.eligibility import Verdict
from verifier.enroll import DEFAULT_TOKEN_TTL, add_applicant, add_enterprise, issue_token, list_applicants, revoke_agent
from verifier.errors import VerifierError
from verifier.facts import applicant_verdict, shanghai_day
from verifier.i18n import LANGS, Lang, pick, t
from verifier.ledger_routes import sign_now
from verifier.rules import DEFAULT_RULES_PATH, load_policy

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tianping-verifier", description="Tianping (天平) central verifier")
    p.add_argument("--db", help="database URL (default: $TIANPING_DB or sqlite:///var/verifier.sqlite)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("init", help="create the schema and the per-deployment fingerprint key (idempotent)")

    applicant = sub.add_parser("applicant", help="applicants").add_subparsers(dest="action", required=True)
    a_add = applicant.add_parser("add", help="register an applicant")
    a_add.add_argument("--id", required=True)
    a_add.add_argument("--name", required=True)
    a_add.add_argument("--kind", required=True, choices=("platform", "node"))

    enterprise = sub.add_parser("enterprise", help="enterprises of an applicant").add_subparsers(
        dest="action", required=True)
    e_add = enterprise.add_parser("add", help="register an enterprise (by USCC) for an applicant")
    e_add.add_argument("--applicant", required=True)
    e_add.add_argument("--uscc", required=True)
    e_add.add_argument("--name", required=True)

    token = sub.add_parser("token", help="enrollment tokens").add_subparsers(dest="action", required=True)
    t_issue = token.add_parser("issue", help="issue a single-use enrollment token (printed alone on stdout)")
    t_issue.add_argument("--applicant", required=True)
    t_issue.add_argument("--enterprise", help="bind the token to one enterprise (USCC) of the applicant")
    t_issue.add_argument("--ttl-s", type=int, default=int(DEFAULT_TOKEN_TTL.total_seconds()))

    agent = sub.add_parser("agent", help="agents").add_subparsers(dest="action", required=True)
    g_revoke = agent.add_parser("revoke", help="revoke an agent: its reports are refused from now on")
    g_revoke.add_argument("--agent", required=True)
    g_revoke.add_argument("--reason", default="")

    # issue 5: read credentials of the JSON API (bearer tokens, shown once)
    credential = sub.add_parser("credential", help="read credentials of the HTTP API").add_subparsers(
        dest="action", required=True)
    c_issue = credential.add_parser("issue", help="issue a read credential (the token, printed alone on stdout, "
                                                  "is shown only this once)")
    c_whose = c_issue.add_mutually_exclusive_group(required=True)
    c_whose.add_argument("--applicant", help="reads this applicant's data only (its own staff and tools)")
    c_whose.add_argument("--official", action="store_true", help="reads every applicant's data (officials)")
    c_issue.add_argument("--name", required=True, help="whose credential it is, shown in `credential list`")
    c_issue.add_argument("--ttl-s", type=int, help="expires after this many seconds (default: until revoked)")
    c_revoke = credential.add_parser("revoke", help="revoke a read credential: refused from now on")
    c_which = c_revoke.add_mutually_exclusive_group(required=True)
    c_which.add_argument("--id", help="the credential's id (see `credential list`)")
    c_which.add_argument("--token-stdin", action="store_true",
                         help="the token itself, read from the first line of stdin (a token found where it should "
                              "not be)")
    credential.add_parser("list", help="every read credential, one JSON object a line (never the tokens)")

    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8700)
    serve.add_argument("--rules", type=Path, default=DEFAULT_RULES_PATH)
    serve.add_argument("--ssl-certfile", type=Path, help="serve HTTPS with this certificate (PEM; issue 7)")
    serve.add_argument("--ssl-keyfile", type=Path, help="the certificate's private key (PEM)")

    check = sub.add_parser("check", help="print the eligibility verdicts for a year")
    check.add_argument("--year", type=int, required=True)
    check.add_argument("--applicant", help="one applicant (default: all)")
    check.add_argument("--lang", choices=LANGS, default="both")
    check.add_argument("--json", action="store_true", help="print the same JSON as the API")
    check.add_argument("--rules", type=Path, default=DEFAULT_RULES_PATH)
    check.add_argument("--as-of", type=date.fromisoformat, default=None,
                       help="end of the 'last 90 days' window for a year still running (default: today, Shanghai)")
    # issue 5: checkpoints and audit bundles
    sub.add_parser("checkpoint", help="sign a checkpoint of the ledger now (refused if inconsistent with the last)")
    export = sub.add_parser("export-bundle", help="write an offline audit bundle for one applicant and year")
    export.add_argument("--applicant", required=True)
    export.add_argument("--year", type=int, required=True)
    export.add_argument("--out", type=Path, required=True, help="a directory to create")
    export.add_argument("--rules", type=Path, default=DEFAULT_RULES_PATH)
    export.add_argument("--as-of", type=date.fromisoformat, default=None)
    audit = sub.add_parser("audit", help="re-verify an audit bundle offline; exit 1 on any discrepancy")
    audit.add_argument("bundle", type=Path)
    audit.add_argument("--key", type=Path, help="a file holding the verifier's note key (default: the bundle's)")
    audit.add_argument("--checkpoint", type=Path, action="append", default=[],
                       help="a signed checkpoint obtained earlier (repeatable)")
    audit.add_argument("--json", action="store_true")
    # issue 6: gates, on-demand and annual evaluations, reports (and the annual check's options of `serve`)
    from verifier.reports.cli import add_parsers as add_officials_parsers

    add_officials_parsers(sub)
    # issue 7: users of the officials' web console (the password is read from stdin, never from argv)
    user = sub.add_parser("user", help="users of the web console").add_subparsers(dest="action", required=True)
    u_add = user.add_parser("add", help="add a console user; reads the password from the first line of stdin")
    u_add.add_argument("--username", required=True)
    u_add.add_argument("--role", required=True, choices=("admin", "official", "operator"))
    u_add.add_argument("--applicant", help="the operator's own applicant (operators only)")
    u_pw = user.add_parser("password", help="set a console user's password (read from stdin)")
    u_pw.add_argument("--username", required=True)
    return p


def _now() -> datetime:
    return datetime.now(UTC)


def _number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "✓" if value else "✗"
    return f"{value:,}"


def render_verdict(verdict: Verdict, lang: Lang, console: Console) -> None:
    """The verdict as rich tables: one row per criterion, then the awards."""
    data = verdict.to_json()
    app = data["applicant"]
    table = Table(title=t("verdict_title", lang, name=app["name"], id=app["id"], year=data["year"]),
                  caption=f"{t('policy', lang)}: {pick(data['policy']['title'], lang)} "
                          f"(sha256 {data['policy']['sha256'][:16]}…)", show_lines=lang == "both")
    for key in ("measure", "criterion", "value", "threshold", "result"):
        table.add_column(t(key, lang), justify="right" if key in ("value", "measure") else "left")
    for c in data["criteria"]:
        passed = c["passed"]
        result = t("not_recorded", lang) if passed is None else t("pass" if passed else "fail", lang)
        style = "yellow" if passed is None else ("green" if passed else "red")
        threshold = f"{c['operator']} {_number(c['threshold'])} {c['unit']}"
        table.add_row(str(c["measure"]), pick(c["label"], lang), _number(c["value"]), threshold,
                      f"[{style}]{result}[/{style}]")
    console.print(table)
    awards = Table(show_lines=lang == "both")
    for key in ("measure", "award", "amount", "result"):
        awards.add_column(t(key, lang))
    for a in data["awards"]:
        if a["eligible"]:
            result = f"[green]{t('eligible', lang)}[/green]"
        elif a["superseded_by"]:
            result = f"[yellow]{t('superseded', lang)}[/yellow]"
        else:
            result = f"[red]{t('not_eligible', lang)}[/red]"
        amount = f"{Decimal(a['amount_yuan']):,}" if a["amount_yuan"] is not None else "—"
        awards.add_row(str(a["measure"]), pick(a["label"], lang), amount, result)
    if data["awards"]:
        console.print(awards)
    beside = ", ".join(f"{k}={v}" for k, v in data["beside"].items())
    console.print(f"{t('beside', lang)}: {beside}", soft_wrap=True)


def _cmd_check(args: argparse.Namespace, db_url: str) -> int:
    policy = load_policy(args.rules)
    engine = make_engine(db_url)
    as_of: date = args.as_of or shanghai_day(_now())
    if args.applicant:
        ids = [args.applicant]
    else:
        with engine.connect() as conn:
            ids = [a.id for a in list_applicants(conn)]
    verdicts = [applicant_verdict(engine, policy, i, args.year, as_of=as_of) for i in ids]
    from verifier.node_days import flags_beside  # a node's evidence flags, beside its verdict (as the API)

    flags = {v.applicant["id"]: flags_beside(engine, v.applicant["id"], args.year) for v in verdicts
             if v.applicant["kind"] == "node"}
    if args.json:
        bodies = [{**v.to_json(), **({"flags_beside": flags[v.applicant["id"]]} if v.applicant["id"] in flags
                                     else {})} for v in verdicts]
        out: Any = bodies[0] if args.applicant else bodies
        sys.stdout.write(json.dumps(out, ensure_ascii=False, indent=2) + "\n")
        return 0
    console = Console(width=None if sys.stdout.isatty() else 160)  # pipes and files get whole lines
    if not verdicts:
        console.print(t("no_applicants", cast(Lang, args.lang)))
    for verdict in verdicts:
        render_verdict(verdict, cast(Lang, args.lang), console)
        if verdict.applicant["id"] in flags:
            flagged = flags[verdict.applicant["id"]]["days_flagged"]
            listed = ", ".join(f"{code}={n}" for code, n in flagged.items()) or "—"
            console.print(f"{t('flags_beside', cast(Lang, args.lang))}: {listed}", soft_wrap=True)
    return 0


def _cmd_serve(args: argparse.Namespace, db_url: str) -> int:
    import uvicorn

    from verifier.api import VerifierSettings, create_app

    app = create_app(VerifierSettings(db_url=db_url, rules_path=args.rules))
    from verifier.reports.cli import start_annual  # issue 6: the annual check, caught up at start

    annual = start_annual(args, db_url)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                    ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    finally:
        if annual is not None:
            annual.stop()
    return 0


def _run(args: argparse.Namespace) -> int:
    db_url = db_url_from_env(args.db)
    command: str = args.command
    action: str | None = getattr(args, "action", None)
    handlers: dict[tuple[str, str | None], Callable[[], int]] = {
        ("init", None): lambda: _init(db_url),
        ("applicant", "add"): lambda: _print(add_applicant(make_engine(db_url), applicant_id=args.id,
                                                           name=args.name, kind=args.kind, now=_now()).to_json()),
        ("enterprise", "add"): lambda: _print(add_enterprise(make_engine(db_url), applicant_id=args.applicant,
                                                             uscc=args.uscc, name=args.name, now=_now())),
        ("token", "issue"): lambda: _print_token(db_url, args),
        ("agent", "revoke"): lambda: _revoke(db_url, args),
        ("credential", "issue"): lambda: _issue_credential(db_url, args),  # issue 5
        ("credential", "revoke"): lambda: _revoke_credential(db_url, args),
        ("credential", "list"): lambda: _list_credentials(db_url),
        ("serve", None): lambda: _cmd_serve(args, db_url),
        ("check", None): lambda: _cmd_check(args, db_url),
        ("checkpoint", None): lambda: _print(sign_now(make_engine(db_url), _now())),
        ("export-bundle", None): lambda: _print({"bundle": str(args.out), "tree_size": export_bundle(
            make_engine(db_url), applicant_id=args.applicant, year=args.year, out=args.out, rules_path=args.rules,
            now=_now(), as_of=args.as_of or shanghai_day(_now()))["tree_size"]}),
        ("audit", None): lambda: audit_main(args.bundle, key_file=args.key, checkpoint_files=args.checkpoint,
                                            as_json=args.json, out=sys.stdout),
        ("user", "add"): lambda: _user(db_url, args),  # issue 7
        ("user", "password"): lambda: _user(db_url, args),
    }
    from verifier.reports.cli import handlers as officials_handlers  # issue 6

    handlers.update(officials_handlers(args, db_url))
    return handlers[(command, action)]()


def _init(db_url: str) -> int:
    created = init_db(make_engine(db_url))
    ensure_note_key(make_engine(db_url))  # issue 5: the checkpoint signing key
    sys.stderr.write(("initialized " if created else "already initialized ") + db_url + "\n")
    return 0


def _print(obj: Any) -> int:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return 0


def _print_token(db_url: str, args: argparse.Namespace) -> int:
    issued = issue_token(make_engine(db_url), applicant_id=args.applicant, enterprise=args.enterprise, now=_now(),
                         ttl=timedelta(seconds=args.ttl_s))
    sys.stdout.write(issued.token + "\n")
    sys.stderr.write(f"expires at {issued.expires_at.isoformat()}\n")
    return 0


def _issue_credential(db_url: str, args: argparse.Namespace) -> int:
    """issue 5: the token alone on stdout (shown only now), what it is on stderr."""
    from verifier.credentials import issue_credential

    issued = issue_credential(make_engine(db_url), role="official" if args.official else "applicant",
                              applicant_id=args.applicant, name=args.name, now=_now(),
                              ttl=timedelta(seconds=args.ttl_s) if args.ttl_s is not None else None)
    cred = issued.credential
    sys.stdout.write(issued.token + "\n")
    expires = cred.expires_at.isoformat() if cred.expires_at else "never (until revoked)"
    sys.stderr.write(f"credential {cred.id} ({cred.role}, {cred.applicant_id or 'every applicant'}), "
                     f"expires {expires}\n")
    return 0


def _revoke_credential(db_url: str, args: argparse.Namespace) -> int:
    from verifier.credentials import revoke_credential

    token = sys.stdin.readline().strip() if args.token_stdin else None
    revoked = revoke_credential(make_engine(db_url), credential_id=args.id, token=token, now=_now())
    return _print(revoked.to_json())


def _list_credentials(db_url: str) -> int:
    from verifier.credentials import list_credentials

    with make_engine(db_url).connect() as conn:
        for cred in list_credentials(conn):
            _print(cred.to_json())
    return 0


def _user(db_url: str, args: argparse.Namespace) -> int:
    """issue 7: add a console user or set its password; the password is the first line of stdin."""
    from verifier.auth import add_user, set_password

    password = sys.stdin.readline().rstrip("\r\n")
    if args.action == "password":
        set_password(make_engine(db_url), username=args.username, password=password)
        return _print({"username": args.username, "password": "changed"})
    user = add_user(make_engine(db_url), username=args.username, password=password, role=args.role,
                    applicant_id=args.applicant, now=_now())
    return _print({"username": user.username, "role": user.role, "applicant_id": user.applicant_id})


def _revoke(db_url: str, args: argparse.Namespace) -> int:
    revoke_agent(make_engine(db_url), agent_id=args.agent, now=_now(), reason=args.reason)
    return _print({"agent_id": args.agent, "revoked": True})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (VerifierError, ProtocolError) as exc:
        sys.stderr.write(f"tianping-verifier: {exc.code}: {exc.message}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
