"""The verifier's HTTP API (FastAPI): a thin adapter around enrollment, the pure verification core, the ledger and
eligibility. OpenAPI is published at ``/openapi.json``.

Every error answer is ``{"error": {"code", "message", "message_zh"}}`` with the status from
``verifier.errors.ERRORS``; a refusal changes nothing stored. Writes are serialized by one ``asyncio.Lock`` (and by
the database), and a receipt is sent only after its transaction committed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import OperationalError, ProgrammingError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol.envelope import MAX_ENVELOPE_BYTES
from protocol.errors import ProtocolError, TooLarge
from verifier.checkpoints import CheckpointSchedule, ensure_note_key
from verifier.core import DEFAULT_FUTURE_SKEW, DEFAULT_LATE_AFTER
from verifier.credentials import ReadGuard, issue_credential, revoke_credential
from verifier.db import agents, db_url_from_env, fingerprint_key, make_engine
from verifier.enroll import add_applicant, add_enterprise, enroll_agent, issue_token, revoke_agent
from verifier.errors import (
    AdminDisabled,
    AdminUnauthorized,
    AgentUnknown,
    BatchInvalid,
    ContentTypeUnsupported,
    NotInitialized,
    VerifierError,
    error_body,
    error_text,
)
from verifier.facts import applicant_verdict, shanghai_day
from verifier.ingest import GroupCommitWriter, IngestResult
from verifier.ledger import ledger_head
from verifier.ledger_routes import agent_key_router, ledger_router
from verifier.pool import VerifyPool
from verifier.ratelimit import AgentRateLimiter
from verifier.rules import DEFAULT_RULES_PATH, load_policy

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "TIANPING_ADMIN_TOKEN"  # noqa: S105 (the variable's name, not a secret)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _admin_token_from_env() -> str | None:
    return os.environ.get(ADMIN_TOKEN_ENV) or None


@dataclass(frozen=True, slots=True)
class VerifierSettings:
    """Everything the app needs; ``clock`` is injected so that tests can move time without sleeping."""

    db_url: str = field(default_factory=db_url_from_env)
    rules_path: Path = DEFAULT_RULES_PATH
    admin_token: str | None = field(default_factory=_admin_token_from_env)
    max_report_bytes: int = MAX_ENVELOPE_BYTES
    token_ttl_s: int = 24 * 3600
    future_skew_s: int = int(DEFAULT_FUTURE_SKEW.total_seconds())
    late_after_s: int = int(DEFAULT_LATE_AFTER.total_seconds())
    clock: Callable[[], datetime] = utc_now
    # issue 5: checkpoints and the per-agent rate limit
    checkpoint_every_s: float = 60.0
    checkpoint_every_entries: int = 1000
    agent_rate_per_s: float = 50.0
    agent_burst: int = 200
    max_batch_reports: int = 1000  # envelopes in one POST /v1/reports/batch
    max_batch_bytes: int = 16 * 1024 * 1024
    # processes that check signatures of large ingest batches (None: one per CPU when there are several)
    verify_workers: int | None = None

    def __post_init__(self) -> None:
        if not 1024 <= self.max_report_bytes <= 64 * 1024 * 1024:
            raise ValueError(f"max_report_bytes: expected 1 KiB to 64 MiB, got {self.max_report_bytes}")
        if not 1 <= self.max_batch_reports <= 10_000:
            raise ValueError(f"max_batch_reports: expected 1 to 10000, got {self.max_batch_reports}")
        if not self.max_report_bytes <= self.max_batch_bytes <= 256 * 1024 * 1024:
            raise ValueError(f"max_batch_bytes: expected {self.max_report_bytes} (max_report_bytes) to 256 MiB, "
                             f"got {self.max_batch_bytes}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError(f"admin_token: expected at least 16 characters, got {len(self.admin_token)}")


# ---- request bodies (unknown fields refused) ------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnrollRequest(_Body):
    token: Annotated[str, Field(min_length=1, max_length=200)]
    public_key: Annotated[str, Field(min_length=1, max_length=100, description="base64 of the raw 32-byte key")]
    agent_name: Annotated[str, Field(min_length=1, max_length=200)]


class ApplicantRequest(_Body):
    id: Annotated[str, Field(min_length=1, max_length=64)]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    kind: Annotated[str, Field(pattern=r"^(platform|node)$")]


class EnterpriseRequest(_Body):
    uscc: Annotated[str, Field(min_length=1, max_length=40)]
    name: Annotated[str, Field(min_length=1, max_length=200)]


class TokenRequest(_Body):
    applicant_id: Annotated[str, Field(min_length=1, max_length=64)]
    enterprise: Annotated[str | None, Field(max_length=40)] = None
    ttl_s: Annotated[int | None, Field(ge=1, le=30 * 24 * 3600)] = None


class RevokeRequest(_Body):
    reason: Annotated[str, Field(max_length=500)] = ""


class CredentialRequest(_Body):
    """A read credential: ``role`` "applicant" with its ``applicant_id``, or "official" (every applicant) with none."""

    applicant_id: Annotated[str | None, Field(min_length=1, max_length=64)] = None
    role: Annotated[str, Field(pattern=r"^(applicant|official)$")]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    ttl_s: Annotated[int | None, Field(ge=1, le=5 * 366 * 24 * 3600)] = None


def _error_response(exc: VerifierError | ProtocolError) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(status_code=status, content=body)


def _plain_error(code: str, message: str, status: int | None = None) -> JSONResponse:
    text = error_text(code)
    return JSONResponse(status_code=status or text.status, content={
        "error": {"code": code, "message": f"{text.en}: {message}", "message_zh": f"{text.zh}：{message}"}})


async def _read_body(request: Request, limit: int, what: str = "envelope") -> bytes:
    """The request body, refused (TooLarge) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what}: expected at most {limit} bytes, got a declared length of {declared}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"{what}: expected at most {limit} bytes, got more")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: VerifierSettings) -> FastAPI:
    """The verifier's FastAPI app. The database must be initialized (``tianping-verifier init``); the rule file is
    loaded and validated now, so a wrong one stops the app from starting."""
    engine = make_engine(settings.db_url)
    policy = load_policy(settings.rules_path)
    try:
        with engine.connect() as conn:
            fingerprint_key(conn)
    except (OperationalError, ProgrammingError) as exc:
        raise NotInitialized(f"database {engine.url!r}: expected the verifier's schema, got none ({exc.orig})") \
            from None
    write_lock = asyncio.Lock()
    future_skew = timedelta(seconds=settings.future_skew_s)
    late_after = timedelta(seconds=settings.late_after_s)

    app = FastAPI(title="Tianping verifier", version="0.1.0",
                  description="Central verifier: enrollment, signed report ingest, ledger, eligibility.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.policy = policy

    @app.exception_handler(VerifierError)
    async def _verifier_error(request: Request, exc: VerifierError) -> JSONResponse:
        log.info("refused %s %s: %s %s", request.method, request.url.path, exc.code, exc.message)
        return _error_response(exc)

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        log.info("refused %s %s: %s %s", request.method, request.url.path, exc.code, exc.message)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in list(exc.errors())[:5])
        return _plain_error("request_invalid", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "request_invalid"
        return _plain_error(code, f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _plain_error("internal_error", type(exc).__name__)

    def require_admin(request: Request) -> None:
        if settings.admin_token is None:
            raise AdminDisabled(f"expected {ADMIN_TOKEN_ENV} to be set when the verifier started, got it unset")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
            raise AdminUnauthorized("Authorization: expected 'Bearer <admin token>', got a missing or wrong token")

    admin = [Depends(require_admin)]
    # issue 5: the read routes need the admin token, an official's credential or the applicant's own (or, for an
    # agent's record, a request signed by that agent's key): verifier.credentials
    # the officials' console reads reports through this app in process; it signs users in itself, so it reads with a
    # token that exists only in this process (it grants reads, never the admin routes)
    internal_read_token = secrets.token_urlsafe(32)
    guard = ReadGuard(engine, admin_token=settings.admin_token, clock=settings.clock,
                      internal_token=internal_read_token)
    read_applicant = [Depends(guard.applicant)]
    # issue 5: the Merkle ledger's routes, checkpoints signed on a schedule, a per-agent rate limit
    ensure_note_key(engine)
    schedule = CheckpointSchedule(every_s=settings.checkpoint_every_s, every_entries=settings.checkpoint_every_entries)
    limiter = AgentRateLimiter(rate_per_s=settings.agent_rate_per_s, burst=settings.agent_burst)
    app.include_router(ledger_router(engine, clock=settings.clock, write_lock=write_lock, schedule=schedule,
                                     admin=admin))
    workers = settings.verify_workers
    if workers is None:
        workers = cpus if (cpus := os.cpu_count() or 1) > 1 else 0
    writer = GroupCommitWriter(engine, lock=write_lock, clock=settings.clock,
                               after_commit=lambda: schedule.maybe_sign(engine, now=settings.clock()),
                               max_bytes=settings.max_report_bytes, future_skew=future_skew, late_after=late_after,
                               pool=VerifyPool(workers), tick_s=settings.checkpoint_every_s)
    app.state.writer = writer
    app.include_router(agent_key_router(engine, clock=settings.clock, write_lock=write_lock, admin=admin))
    # issue 6: officials' gates and figures, on-demand and signed annual evaluations, reports
    from verifier.reports.routes import officials_router

    app.include_router(officials_router(engine, policy, clock=settings.clock, write_lock=write_lock, admin=admin,
                                        reader=read_applicant))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        def head() -> int:
            with engine.connect() as conn:
                return ledger_head(conn).size

        return {"status": "ok", "ledger_size": await run_in_threadpool(head), "policy": policy.id}

    @app.post("/v1/enroll", status_code=201)
    async def enroll(body: EnrollRequest) -> JSONResponse:
        async with write_lock:
            enrollment = await run_in_threadpool(
                lambda: enroll_agent(engine, token=body.token, public_key_b64=body.public_key,
                                     agent_name=body.agent_name, now=settings.clock()))
        return JSONResponse(status_code=201, content=enrollment.to_json())

    @app.post("/v1/reports", status_code=201, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "description": "A DSSE envelope (RFC 8785 canonical bytes) of a report v1 payload",
            "required": ["payload", "payloadType", "signatures"]}}}}})
    async def post_report(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise ContentTypeUnsupported(f"Content-Type: expected application/json, got {content_type[:60]!r}")
        envelope = await _read_body(request, settings.max_report_bytes)
        limited = limiter.check(envelope, now=time.monotonic())  # issue 5: 429 with Retry-After
        if limited is not None:
            return limited
        result = await writer.submit(envelope)  # issue 5: group commit, answered after the commit
        return JSONResponse(status_code=201 if result.created else 200,
                            content={"receipt": result.receipt.to_json()})

    @app.post("/v1/reports/batch", openapi_extra={
        "requestBody": {"required": True, "content": {"application/x-ndjson": {"schema": {
            "type": "string", "description": "DSSE envelopes (RFC 8785 canonical bytes), one per line, in the order "
                                             "they are to be ingested"}}}}})
    async def post_reports(request: Request) -> JSONResponse:
        """Several envelopes in one request (an agent draining its outbox): each is verified and stored as if posted
        alone, in order, and answered once committed — one result per line, each with the status and body
        ``POST /v1/reports`` would have answered."""
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/x-ndjson":
            raise ContentTypeUnsupported(f"Content-Type: expected application/x-ndjson, got {content_type[:60]!r}")
        body = await _read_body(request, settings.max_batch_bytes, "batch")
        lines = body.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the last line's newline
        if not 1 <= len(lines) <= settings.max_batch_reports:
            raise BatchInvalid(f"batch: expected 1 to {settings.max_batch_reports} envelopes, one per line, "
                               f"got {len(lines)}")
        answers: list[dict[str, Any] | None] = [None] * len(lines)
        todo: list[int] = []
        now = time.monotonic()
        for i, line in enumerate(lines):
            if len(line) > settings.max_report_bytes:
                status, err = error_body(TooLarge(f"envelope: expected at most {settings.max_report_bytes} bytes, "
                                                  f"got {len(line)}"))
                answers[i] = {"status": status, **err}
            elif (refused := limiter.refusal(line, now=now)) is not None:
                answers[i] = {"status": 429, **refused}
            else:
                todo.append(i)
        outcomes = await writer.submit_many([lines[i] for i in todo]) if todo else []
        for i, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, IngestResult):
                answers[i] = {"status": 201 if outcome.created else 200, "receipt": outcome.receipt.to_json()}
            else:
                status, err = error_body(outcome)
                answers[i] = {"status": status, **err}
        # 200 when any report was stored (each line says what happened to it); when none was, the first refusal's
        # status, so that a batch of nothing but invalid reports is not answered with a success
        status = 200 if any(a is not None and a["status"] < 300 for a in answers) else answers[0]["status"]  # type: ignore[index]
        headers = {}
        if status == 429:
            headers["Retry-After"] = str(max(a["error"]["retry_after_s"] for a in answers  # type: ignore[index]
                                             if a is not None and a["status"] == 429))
        return JSONResponse(status_code=status, content={"results": answers}, headers=headers)

    @app.get("/v1/agents/{agent_id}", dependencies=[Depends(guard.agent)])
    async def get_agent(agent_id: str) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            with engine.connect() as conn:
                row = conn.execute(select(agents).where(agents.c.agent_id == agent_id)).first()
            if row is None:
                raise AgentUnknown(f"agent: expected an enrolled agent id, got {agent_id[:64]!r}")
            return {"agent_id": row.agent_id, "applicant_id": row.applicant_id, "key_id": row.key_id,
                    "next_seq": int(row.next_seq), "last_hash": row.last_hash,
                    "last_report_at": row.last_report_at.isoformat() if row.last_report_at else None,
                    "revoked": row.revoked_at is not None}

        return await run_in_threadpool(read)

    @app.get("/v1/applicants/{applicant_id}/eligibility", dependencies=read_applicant)
    async def eligibility(applicant_id: str,
                          year: Annotated[int, Query(ge=2000, le=2100)]) -> dict[str, Any]:
        as_of = shanghai_day(settings.clock())
        verdict = await run_in_threadpool(lambda: applicant_verdict(engine, policy, applicant_id, year, as_of=as_of))
        body = verdict.to_json()
        if verdict.applicant["kind"] == "node":  # issue 4: the node evidence's flags beside the verdict
            from verifier.node_days import flags_beside

            body["flags_beside"] = await run_in_threadpool(lambda: flags_beside(engine, applicant_id, year))
        return body

    @app.get("/v1/applicants/{applicant_id}/resolution-days", dependencies=read_applicant)
    async def resolution_days_evidence(applicant_id: str,
                                       year: Annotated[int, Query(ge=2000, le=2100)]) -> dict[str, Any]:
        """Measure 2 evidence per agent and day: distinct identifiers and clients, gaps, anomaly flags (issue 4)."""
        from verifier.node_days import node_days

        return await run_in_threadpool(lambda: node_days(engine, applicant_id, year))

    # ---- admin ----------------------------------------------------------------------------------------------------
    @app.post("/v1/admin/applicants", status_code=201, dependencies=admin)
    async def admin_add_applicant(body: ApplicantRequest) -> JSONResponse:
        async with write_lock:
            applicant = await run_in_threadpool(
                lambda: add_applicant(engine, applicant_id=body.id, name=body.name, kind=body.kind,
                                      now=settings.clock()))
        return JSONResponse(status_code=201, content=applicant.to_json())

    @app.post("/v1/admin/applicants/{applicant_id}/enterprises", status_code=201, dependencies=admin)
    async def admin_add_enterprise(applicant_id: str, body: EnterpriseRequest) -> JSONResponse:
        async with write_lock:
            enterprise = await run_in_threadpool(
                lambda: add_enterprise(engine, applicant_id=applicant_id, uscc=body.uscc, name=body.name,
                                       now=settings.clock()))
        return JSONResponse(status_code=201, content={"applicant_id": applicant_id, **enterprise})

    @app.post("/v1/admin/tokens", status_code=201, dependencies=admin)
    async def admin_issue_token(body: TokenRequest) -> JSONResponse:
        ttl = timedelta(seconds=body.ttl_s if body.ttl_s is not None else settings.token_ttl_s)
        async with write_lock:
            issued = await run_in_threadpool(
                lambda: issue_token(engine, applicant_id=body.applicant_id, enterprise=body.enterprise,
                                    now=settings.clock(), ttl=ttl))
        return JSONResponse(status_code=201, content=issued.to_json())

    @app.post("/v1/admin/agents/{agent_id}/revoke", dependencies=admin)
    async def admin_revoke(agent_id: str, body: RevokeRequest) -> dict[str, Any]:
        async with write_lock:
            await run_in_threadpool(lambda: revoke_agent(engine, agent_id=agent_id, now=settings.clock(),
                                                         reason=body.reason))
        return {"agent_id": agent_id, "revoked": True}

    # issue 5: read credentials (bearer tokens shown once; verifier.credentials)
    @app.post("/v1/admin/credentials", status_code=201, dependencies=admin)
    async def admin_issue_credential(body: CredentialRequest) -> JSONResponse:
        ttl = timedelta(seconds=body.ttl_s) if body.ttl_s is not None else None
        async with write_lock:
            issued = await run_in_threadpool(
                lambda: issue_credential(engine, role=body.role, applicant_id=body.applicant_id, name=body.name,
                                         now=settings.clock(), ttl=ttl))
        return JSONResponse(status_code=201, content=issued.to_json())

    @app.post("/v1/admin/credentials/{credential_id}/revoke", dependencies=admin)
    async def admin_revoke_credential(credential_id: str) -> dict[str, Any]:
        async with write_lock:
            revoked = await run_in_threadpool(
                lambda: revoke_credential(engine, credential_id=credential_id, now=settings.clock()))
        return revoked.to_json()

    # ---- issue 7: officials' web console (/console), Prometheus metrics (/metrics), InfluxDB facts (optional) -----
    from verifier.metrics import install_metrics
    from verifier.web import mount_console

    mount_console(app, engine=engine, policy=policy, clock=settings.clock, read_token=internal_read_token,
                  rules_path=settings.rules_path)
    metrics = install_metrics(app, engine)
    if os.environ.get("TIANPING_INFLUX_URL"):
        from verifier.influx import FactWriter, InfluxSettings

        influx_settings = InfluxSettings.from_env()
        if influx_settings is not None:
            app.state.fact_writer = FactWriter(engine, influx_settings)
            metrics.listeners.append(app.state.fact_writer.notify)

    return app


@contextmanager
def serve_in_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int, timeout_s: float = 10.0) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server in a background thread; yield its base URL; stop it on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"verifier-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn on {host}:{port}: expected to start within {timeout_s} s, it did not")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
