"""The officials' web console, served by the verifier under ``/console`` (HTML rendered on the server, no
JavaScript needed, no asset from outside: CSS is served from ``/console/static``).

Who sees what (anything else answers 403):

- admin: ``/console/admin`` (applicants, enterprises, enrollment tokens, revocation) and every agents page;
- official: the applicants list, every applicant page (verdicts, charts, evidence, spot checks, downloads) and
  every agents page;
- operator: the agents page of its own applicant only.

Forms carry a CSRF token (the session's, or before login a double-submit cookie); sessions are signed cookies
(``verifier.auth``). The language is a cookie (``zh`` by default, ``en`` on the switch).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import httpx
import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from verifier.auth import Session, User, authenticate, issue_session, read_session, session_key
from verifier.db import agents, web_users
from verifier.enroll import add_applicant, add_enterprise, get_applicant, issue_token, list_applicants, revoke_agent
from verifier.errors import ApplicantUnknown, VerifierError
from verifier.facts import applicant_verdict, shanghai_day
from verifier.rules import Policy
from verifier.web import charts, queries
from verifier.web.strings import (
    CONSOLE_LANGS,
    STRINGS,
    ConsoleLang,
    format_date,
    format_datetime,
    format_number,
    format_short_date,
    text,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "tp_session"
LOGIN_CSRF_COOKIE = "tp_login_csrf"
LANG_COOKIE = "tp_lang"
MAX_FORM_BYTES = 16 * 1024
DEFAULT_STALE_AFTER = timedelta(hours=2)
REPORT_FORMATS = ("pdf", "xlsx", "csv", "json")
BUNDLE_PATHS = ("/v1/applicants/{id}/export-bundle?year={year}", "/v1/applicants/{id}/bundle/{year}",
                "/v1/applicants/{id}/audit-bundle?year={year}")


class LoginRequired(Exception):
    pass


class Forbidden(Exception):
    pass


class NotFound(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    stale_after: timedelta = DEFAULT_STALE_AFTER
    secure_cookies: bool = False  # set behind TLS (the proxy terminates HTTPS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConsoleSettings:
        """``TIANPING_CONSOLE_SECURE_COOKIES=1`` (behind HTTPS), ``TIANPING_CONSOLE_STALE_AFTER_S`` (seconds)."""
        env = os.environ if environ is None else environ
        stale = env.get("TIANPING_CONSOLE_STALE_AFTER_S", "")
        if stale and (not stale.isdigit() or not 60 <= int(stale) <= 30 * 86400):
            raise ValueError(f"TIANPING_CONSOLE_STALE_AFTER_S: expected 60 to 2592000 seconds, got {stale!r}")
        return cls(stale_after=timedelta(seconds=int(stale)) if stale else DEFAULT_STALE_AFTER,
                   secure_cookies=env.get("TIANPING_CONSOLE_SECURE_COOKIES", "") in ("1", "true", "yes"))


def _lang(request: Request) -> ConsoleLang:
    return "en" if request.cookies.get(LANG_COOKIE) == "en" else "zh"


def mount_console(app: FastAPI, *, engine: Engine, policy: Policy, clock: Callable[[], Any],
                  read_token: str | None = None, rules_path: Path | None = None,
                  console: ConsoleSettings | None = None) -> None:
    """Add the console's routes, static files and error pages to the verifier's app."""
    cfg = console or ConsoleSettings.from_env()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=jinja2.select_autoescape(default=True))
    key_holder: dict[str, bytes] = {}

    def signing_key() -> bytes:
        if "k" not in key_holder:
            key_holder["k"] = session_key(engine)
        return key_holder["k"]

    env.filters["todate"] = date.fromisoformat
    env.globals["known_beside"] = {k for k in STRINGS if k.startswith("beside_")}
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")

    def render(request: Request, template: str, status: int = 200, session: Session | None = None,
               **context: Any) -> HTMLResponse:
        lang = _lang(request)

        def _(key: str, **fmt: object) -> str:
            return text(key, lang, **fmt)

        body = env.get_template(template).render(
            _=_, lang=lang, session=session, request_path=request.url.path,
            num=lambda v: format_number(v, lang), day=lambda d: format_date(d, lang),
            moment=lambda m: format_datetime(m, lang), pick=lambda t: t.get(lang, t.get("zh", "")),
            quote=quote, **context)
        return HTMLResponse(body, status_code=status)

    async def current(request: Request) -> Session:
        session = read_session(request.cookies.get(SESSION_COOKIE), signing_key(), now=clock())
        if session is None:
            raise LoginRequired
        def still_valid() -> bool:  # a disabled or changed user loses its session at once
            with engine.connect() as conn:
                row = conn.execute(select(web_users.c.role, web_users.c.applicant_id, web_users.c.disabled_at)
                                   .where(web_users.c.username == session.user.username)).first()
            return (row is not None and row.disabled_at is None and row.role == session.user.role
                    and row.applicant_id == session.user.applicant_id)
        if not await run_in_threadpool(still_valid):
            raise LoginRequired
        return session

    async def require(request: Request, *roles: str) -> Session:
        session = await current(request)
        if session.user.role not in roles:
            log.info("console: %r (%s) refused %s", session.user.username, session.user.role, request.url.path)
            raise Forbidden
        return session

    async def form_of(request: Request, session: Session | None) -> dict[str, str]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise Forbidden
        fields = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        expected = session.csrf if session else request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not expected or not secrets.compare_digest(fields.get("csrf", ""), expected):
            raise Forbidden
        return fields

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/console/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        session = read_session(request.cookies.get(SESSION_COOKIE), signing_key(), now=clock())
        return render(request, "error.html", 403, session=session, title_key="forbidden_title",
                      message_key="forbidden_text")

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        session = read_session(request.cookies.get(SESSION_COOKIE), signing_key(), now=clock())
        return render(request, "error.html", 404, session=session, title_key="not_found_title",
                      message_key="not_found_title")

    def home_of(user: User) -> str:
        if user.role == "official":
            return "/console/applicants"
        if user.role == "admin":
            return "/console/admin"
        return f"/console/applicants/{quote(user.applicant_id or '')}/agents"

    def this_year() -> int:
        return shanghai_day(clock()).year

    # ---- sign in and out, language --------------------------------------------------------------------------------
    @app.get("/console", include_in_schema=False)
    async def console_home(request: Request) -> Response:
        return RedirectResponse(home_of((await current(request)).user), status_code=303)

    @app.get("/console/login", include_in_schema=False)
    async def login_page(request: Request, next: str = "/console", failed: int = 0) -> Response:
        token = secrets.token_urlsafe(24)
        response = render(request, "login.html", 401 if failed else 200, csrf=token, next=_safe_next(next),
                          failed=bool(failed))
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=cfg.secure_cookies,
                            path="/console")
        return response

    @app.post("/console/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        fields = await form_of(request, None)
        user = await run_in_threadpool(authenticate, engine, fields.get("username", ""), fields.get("password", ""))
        if user is None:
            log.info("console: failed sign-in for %r", fields.get("username", "")[:64])
            return RedirectResponse(f"/console/login?failed=1&next={quote(_safe_next(fields.get('next', '')))}",
                                    status_code=303)
        cookie, _session = issue_session(user, signing_key(), now=clock())
        target = _safe_next(fields.get("next", ""))
        response = RedirectResponse(home_of(user) if target == "/console" else target, status_code=303)
        response.set_cookie(SESSION_COOKIE, cookie, httponly=True, samesite="lax", secure=cfg.secure_cookies,
                            path="/", max_age=8 * 3600)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/console")
        log.info("console: %r signed in as %s", user.username, user.role)
        return response

    @app.post("/console/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        await form_of(request, await current(request))
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/console/lang/{lang}", include_in_schema=False)
    async def switch_language(lang: str, next: str = "/console") -> Response:
        if lang not in CONSOLE_LANGS:
            raise NotFound
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(LANG_COOKIE, lang, samesite="lax", path="/", max_age=365 * 86400)
        return response

    # ---- officials ------------------------------------------------------------------------------------------------
    @app.get("/console/applicants", include_in_schema=False)
    async def applicants_page(request: Request) -> Response:
        session = await require(request, "official")
        year = this_year()

        def rows() -> list[dict[str, Any]]:
            with engine.connect() as conn:
                listed = list_applicants(conn)
            out = []
            for a in listed:
                verdict = applicant_verdict(engine, policy, a.id, year, as_of=shanghai_day(clock())).to_json()
                out.append({"applicant": a, "measures": _measure_summary(verdict)})
            return out

        return render(request, "applicants.html", session=session, year=year, rows=await run_in_threadpool(rows))

    @app.get("/console/applicants/{applicant_id}", include_in_schema=False)
    async def applicant_page(request: Request, applicant_id: str, year: int | None = None) -> Response:
        session = await require(request, "official")
        lang = _lang(request)
        y = year if year is not None and 2000 <= year <= 2100 else this_year()
        page = await run_in_threadpool(lambda: _applicant_context(engine, policy, applicant_id, y, clock(), lang))
        return render(request, "applicant.html", session=session, **page)

    @app.get("/console/applicants/{applicant_id}/verdict/{year}.json", include_in_schema=False)
    async def verdict_json(request: Request, applicant_id: str, year: int) -> Response:
        await require(request, "official")
        try:
            verdict = await run_in_threadpool(
                lambda: applicant_verdict(engine, policy, applicant_id, year, as_of=shanghai_day(clock())))
        except ApplicantUnknown:
            raise NotFound from None
        return Response(json.dumps(verdict.to_json(), ensure_ascii=False, indent=2), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{applicant_id}-{year}-verdict.json"'})

    async def fetch_internal(path: str) -> httpx.Response | None:
        """GET one of the verifier's own API paths (reports, bundles) in process; None when it does not exist."""
        headers = {"Authorization": f"Bearer {read_token}"} if read_token else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console.internal", timeout=60) as client:
            response = await client.get(path, headers=headers)
        if response.status_code in (404, 405):
            return None
        return response

    @app.get("/console/applicants/{applicant_id}/download/{what}", include_in_schema=False)
    async def download(request: Request, applicant_id: str, what: str, year: int) -> Response:
        session = await require(request, "official")
        ident = quote(applicant_id, safe="")
        if what in REPORT_FORMATS:
            candidates = [f"/v1/applicants/{ident}/reports/{year}.{what}?lang={_lang(request)}"]
            label = text("download_report", _lang(request), fmt=what.upper())
        elif what == "bundle":
            candidates = [p.format(id=ident, year=year) for p in BUNDLE_PATHS]
            label = text("download_bundle", _lang(request))
        else:
            raise NotFound
        for path in candidates:
            upstream = await fetch_internal(path)
            if upstream is None:
                continue
            if upstream.status_code != 200:
                return render(request, "error.html", upstream.status_code, session=session,
                              title_key="download_missing_title", message_key="refused",
                              message_args={"message": upstream.text[:300]})
            passthrough = {k: v for k, v in upstream.headers.items()
                           if k.lower() in ("content-type", "content-disposition")}
            return Response(upstream.content, headers=passthrough)
        if what == "bundle" and rules_path is not None:
            bundle = await run_in_threadpool(_bundle_zip, engine, applicant_id, year, rules_path, clock)
            if bundle is not None:
                return Response(bundle, media_type="application/zip", headers={
                    "Content-Disposition": f'attachment; filename="{ident}-{year}-audit-bundle.zip"'})
        return render(request, "error.html", 404, session=session, title_key="download_missing_title",
                      message_key="download_missing", message_args={"what": label},
                      back=f"/console/applicants/{ident}?year={year}")

    # ---- agents (official, admin, the applicant's own operator) ---------------------------------------------------
    @app.get("/console/applicants/{applicant_id}/agents", include_in_schema=False)
    async def agents_page(request: Request, applicant_id: str) -> Response:
        session = await require(request, "official", "admin", "operator")
        if session.user.role == "operator" and session.user.applicant_id != applicant_id:
            log.info("console: operator %r refused agents of %r", session.user.username, applicant_id)
            raise Forbidden

        def read() -> dict[str, Any]:
            with engine.connect() as conn:
                try:
                    applicant = get_applicant(conn, applicant_id)
                except ApplicantUnknown:
                    raise NotFound from None
                return {"applicant": applicant,
                        "agents": queries.agent_views(conn, applicant_id, now=clock(), stale_after=cfg.stale_after)}

        return render(request, "agents.html", session=session, stale_hours=cfg.stale_after.total_seconds() / 3600,
                      **await run_in_threadpool(read))

    # ---- admin ----------------------------------------------------------------------------------------------------
    async def admin_page(request: Request, session: Session, *, status: int = 200, **flash: Any) -> Response:
        def read() -> list[dict[str, Any]]:
            with engine.connect() as conn:
                out = []
                for a in list_applicants(conn):
                    out.append({"applicant": a, "enterprises": queries.enterprises_of(conn, a.id),
                                "agents": conn.execute(select(agents).where(agents.c.applicant_id == a.id)
                                                       .order_by(agents.c.agent_id)).all()})
                return out

        return render(request, "admin.html", status, session=session, rows=await run_in_threadpool(read),
                      flash=flash)

    @app.get("/console/admin", include_in_schema=False)
    async def admin_home(request: Request) -> Response:
        return await admin_page(request, await require(request, "admin"))

    AdminAction = Callable[[dict[str, str]], dict[str, Any]]

    async def admin_action(request: Request, action: AdminAction) -> Response:
        session = await require(request, "admin")
        fields = await form_of(request, session)
        try:
            flash = await run_in_threadpool(action, fields)
        except (VerifierError, ValueError) as exc:
            message = getattr(exc, "message", str(exc))
            return await admin_page(request, session, status=400, error=message)
        return await admin_page(request, session, **flash)

    @app.post("/console/admin/applicants", include_in_schema=False)
    async def admin_add_applicant(request: Request) -> Response:
        def act(f: dict[str, str]) -> dict[str, Any]:
            a = add_applicant(engine, applicant_id=f.get("id", "").strip(), name=f.get("name", "").strip(),
                              kind=f.get("kind", ""), now=clock())
            return {"done": text("done_applicant", _lang(request), id=a.id)}
        return await admin_action(request, act)

    @app.post("/console/admin/enterprises", include_in_schema=False)
    async def admin_add_enterprise(request: Request) -> Response:
        def act(f: dict[str, str]) -> dict[str, Any]:
            e = add_enterprise(engine, applicant_id=f.get("applicant", ""), uscc=f.get("uscc", "").strip(),
                               name=f.get("name", "").strip(), now=clock())
            return {"done": text("done_enterprise", _lang(request), uscc=e["uscc"])}
        return await admin_action(request, act)

    @app.post("/console/admin/tokens", include_in_schema=False)
    async def admin_issue_token(request: Request) -> Response:
        def act(f: dict[str, str]) -> dict[str, Any]:
            hours = f.get("ttl_hours", "24") or "24"
            if not hours.isdigit() or not 1 <= int(hours) <= 720:
                raise ValueError(f"ttl_hours: expected 1 to 720, got {hours[:10]!r}")
            issued = issue_token(engine, applicant_id=f.get("applicant", ""), enterprise=f.get("enterprise") or None,
                                 now=clock(), ttl=timedelta(hours=int(hours)))
            return {"token": issued.token, "expires_at": issued.expires_at}
        return await admin_action(request, act)

    @app.post("/console/admin/agents/{agent_id}/revoke", include_in_schema=False)
    async def admin_revoke(request: Request, agent_id: str) -> Response:
        def act(f: dict[str, str]) -> dict[str, Any]:
            revoke_agent(engine, agent_id=agent_id, now=clock(), reason=f.get("reason", "")[:500])
            return {"done": text("done_revoke", _lang(request), id=agent_id)}
        return await admin_action(request, act)


def _bundle_zip(engine: Engine, applicant_id: str, year: int, rules_path: Path,
                clock: Callable[[], Any]) -> bytes | None:
    """The audit bundle (``verifier.bundle``, when that module exists) as a zip archive; None when it does not."""
    try:
        from verifier.bundle import export_bundle
    except ImportError:
        return None
    now = clock()
    with tempfile.TemporaryDirectory(prefix="tianping-bundle-") as tmp:
        out = Path(tmp) / f"{applicant_id}-{year}"
        try:
            export_bundle(engine, applicant_id=applicant_id, year=year, out=out, rules_path=rules_path, now=now,
                          as_of=shanghai_day(now))
        except ApplicantUnknown:
            raise NotFound from None
        archive = shutil.make_archive(str(Path(tmp) / "bundle"), "zip", root_dir=tmp, base_dir=out.name)
        return Path(archive).read_bytes()


def _safe_next(target: str) -> str:
    """Only paths of the console itself (no open redirect)."""
    if target.startswith("/console") and not target.startswith("//") and "\\" not in target:
        return target
    return "/console"


def _measure_summary(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    by_measure: dict[int, dict[str, Any]] = defaultdict(lambda: {"passed": 0, "total": 0, "eligible": []})
    for c in verdict["criteria"]:
        m = by_measure[c["measure"]]
        m["total"] += 1
        m["passed"] += 1 if c["passed"] else 0
    for a in verdict["awards"]:
        if a["eligible"]:
            by_measure[a["measure"]]["eligible"].append(a["label"])
    return [{"measure": k, **v} for k, v in sorted(by_measure.items())]


def _thresholds(policy: Policy, metric: str, lang: ConsoleLang) -> list[charts.Threshold]:
    values = sorted({float(c.threshold) for c in policy.criteria
                     if c.metric == metric and not isinstance(c.threshold, bool)})
    return [charts.Threshold(v, text("line", lang, value=format_number(v, lang))) for v in values]


def _applicant_context(engine: Engine, policy: Policy, applicant_id: str, year: int, now: datetime,
                       lang: ConsoleLang) -> dict[str, Any]:
    today = shanghai_day(now)
    try:
        verdict = applicant_verdict(engine, policy, applicant_id, year, as_of=today).to_json()
    except ApplicantUnknown:
        raise NotFound from None
    with engine.connect() as conn:
        series = queries.year_series(conn, applicant_id, year)
        sample = queries.spot_check(conn, applicant_id, year)
        entries, late = queries.ledger_entries_of(conn, applicant_id, year)
    last = min(date(year, 12, 31), max(today, date(year, 1, 1)))
    with_data = [d for s in (series.active_devices, series.resolutions) for d in s.points]
    first = min([*with_data, last]) if with_data else date(year, 1, 1)  # the charts start with the first facts
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]

    def chart(chart_id: str, title_key: str, values: list[int], metric: str | None) -> Any:
        return charts.line_chart(chart_id=chart_id, title=text(title_key, lang), first=first, values=values,
                                 thresholds=_thresholds(policy, metric, lang) if metric else [],
                                 number=lambda v: format_number(int(v), lang),
                                 day_label=lambda d: format_short_date(d, lang))

    kind = verdict["applicant"]["kind"]
    figures: list[tuple[str, Any]] = []
    if kind == "platform":
        figures.append(("chart_active", chart("chart-active", "chart_active",
                                              [series.active_devices.on(d) for d in days], "connected_devices")))
        figures.append(("chart_served", chart("chart-served", "chart_served",
                                              [series.served_enterprises.on(d) for d in days],
                                              "served_enterprises")))
        figures.append(("chart_new_devices", chart("chart-new-devices", "chart_new_devices",
                                                   queries.fill_cumulative(series.new_devices_cumulative, first,
                                                                           last), "new_devices")))
        figures.append(("chart_new_users", chart("chart-new-users", "chart_new_users",
                                                 queries.fill_cumulative(series.new_users_cumulative, first, last),
                                                 "new_users")))
    else:
        figures.append(("chart_resolutions", chart("chart-resolutions", "chart_resolutions",
                                                   [series.resolutions.on(d) for d in days],
                                                   "daily_average_resolutions")))
    from verifier.reports import build_report  # the same anomaly flags as the annual report

    anomalies = build_report(engine, policy, applicant_id, year, now=now, as_of=today).data["anomalies"]
    from verifier.gates import list_records  # what officials recorded: shown read-only here

    with engine.connect() as conn:
        gates = [r.to_json() for r in list_records(conn, applicant_id)]
    return {"verdict": verdict, "year": year, "figures": figures, "spot": sample, "entries": entries,
            "late": late, "anomalies": anomalies, "formats": REPORT_FORMATS, "gates": gates,
            "applicant_id": applicant_id, "years": list(range(today.year, today.year - 5, -1))}

