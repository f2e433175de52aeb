"""HTTP routes of issue 6 (mounted by ``verifier.api.create_app``): officials' records of gates and figures, on-demand
and stored (signed) evaluations, the annual run, and reports.

    POST /v1/applicants/{id}/gates                 (admin) record a gate or figure: who, when, document
    GET  /v1/applicants/{id}/gates                 every record, oldest first
    GET  /v1/applicants/{id}/evaluate?year=Y[&as_of=YYYY-MM-DD][&policy=wuhan-2023]   on demand, not stored
    GET  /v1/applicants/{id}/evaluations/{year}    the stored annual evaluation with its signed envelope
    POST /v1/admin/annual/run?year=Y               (admin) the annual check for one year, now (idempotent)
    GET  /v1/applicants/{id}/reports/{year}.{pdf,xlsx,csv,json}[?lang=zh|en][&table=summary|awards|devices|…]

Every GET needs the applicant's own read credential, an official's, or the admin token (issue 5).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from verifier.annual import AnnualSettings, get_evaluation, on_demand, run_annual
from verifier.enroll import get_applicant
from verifier.errors import NotFound, RequestInvalid
from verifier.facts import shanghai_day
from verifier.gates import list_records, record_gate
from verifier.i18n import Lang
from verifier.reports import CSV_TABLES, FORMATS, MEDIA_TYPES, build_report, render
from verifier.rules import Policy, load_policy, shipped_policies

log = logging.getLogger(__name__)

_REPORT_NAME = re.compile(r"^(20[0-9]{2}|2100)\.(pdf|xlsx|csv|json)$")


class GateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Annotated[str, Field(min_length=1, max_length=64)]
    value: str | bool
    recorded_by: Annotated[str, Field(min_length=1, max_length=200)]
    document_ref: Annotated[str, Field(min_length=1, max_length=500)]
    period: Annotated[int | None, Field(ge=2000, le=2100)] = None
    item: Annotated[str, Field(max_length=200)] = ""
    note: Annotated[str, Field(max_length=2000)] = ""


def policy_named(default: Policy, name: str | None) -> Policy:
    """The app's policy, or a shipped one by its file stem ("wuhan-2023")."""
    if name is None or name == default.id:
        return default
    files = shipped_policies()
    if name not in files:
        raise RequestInvalid(f"policy: expected one of {sorted(files)}, got {name[:64]!r}")
    return load_policy(files[name])


def officials_router(engine: Engine, policy: Policy, *, clock: Callable[[], datetime], write_lock: asyncio.Lock,
                     admin: list[Any], reader: list[Any] | None = None,
                     annual: AnnualSettings | None = None) -> APIRouter:
    """``reader``: the dependencies of the read routes (issue 5: ``verifier.credentials.ReadGuard.applicant``)."""
    router = APIRouter(tags=["officials"])
    reader = reader if reader is not None else admin

    @router.post("/v1/applicants/{applicant_id}/gates", status_code=201, dependencies=admin)
    async def post_gate(applicant_id: str, body: GateRequest) -> JSONResponse:
        async with write_lock:
            rec = await run_in_threadpool(lambda: record_gate(
                engine, applicant_id=applicant_id, metric=body.metric, value=body.value,
                recorded_by=body.recorded_by, document_ref=body.document_ref, now=clock(), period=body.period,
                item=body.item, note=body.note))
        return JSONResponse(status_code=201, content=rec.to_json())

    @router.get("/v1/applicants/{applicant_id}/gates", dependencies=reader)
    async def get_gates(applicant_id: str) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            with engine.connect() as conn:
                get_applicant(conn, applicant_id)
                return {"applicant_id": applicant_id, "records": [r.to_json() for r in list_records(conn,
                                                                                                    applicant_id)]}

        return await run_in_threadpool(read)

    @router.get("/v1/applicants/{applicant_id}/evaluate", dependencies=reader)
    async def evaluate_now(applicant_id: str, year: Annotated[int, Query(ge=2000, le=2100)],
                           as_of: date | None = None, policy_id: Annotated[str | None, Query(alias="policy")] = None
                           ) -> dict[str, Any]:
        pol = policy_named(policy, policy_id)
        end = as_of or shanghai_day(clock())
        verdict = await run_in_threadpool(lambda: on_demand(engine, pol, applicant_id, year, as_of=end))
        return verdict.to_json()

    @router.get("/v1/applicants/{applicant_id}/evaluations/{year}", dependencies=reader)
    async def stored_evaluation(applicant_id: str, year: int) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            with engine.connect() as conn:
                get_applicant(conn, applicant_id)
                stored = get_evaluation(conn, applicant_id, year, policy.id)
            if stored is None:
                raise NotFound(f"evaluation: expected an annual evaluation of {applicant_id[:64]!r} for {year} under "
                               f"{policy.id!r}, got none")
            return stored.to_json()

        return await run_in_threadpool(read)

    @router.post("/v1/admin/annual/run", dependencies=admin)
    async def annual_run(year: Annotated[int, Query(ge=2000, le=2100)]) -> dict[str, Any]:
        async with write_lock:
            run = await run_in_threadpool(lambda: run_annual(engine, policy, year, now=clock(), settings=annual))
        return run.to_json()

    @router.get("/v1/applicants/{applicant_id}/reports/{name}", dependencies=reader)
    async def report(applicant_id: str, name: str, lang: Annotated[str, Query(pattern=r"^(zh|en)$")] = "zh",
                     table: str = "summary") -> Response:
        m = _REPORT_NAME.match(name)
        if m is None:
            raise RequestInvalid(f"report: expected YEAR.{{{','.join(FORMATS)}}}, got {name[:40]!r}")
        if table not in CSV_TABLES:
            raise RequestInvalid(f"table: expected one of {list(CSV_TABLES)}, got {table[:40]!r}")
        year, fmt = int(m.group(1)), m.group(2)
        language: Lang = "zh" if lang == "zh" else "en"

        def make() -> bytes:
            rep = build_report(engine, policy, applicant_id, year, now=clock(),
                               as_of=min(date(year, 12, 31), shanghai_day(clock())))
            return render(rep, fmt, lang=language, table=table)

        content = await run_in_threadpool(make)
        filename = f"{applicant_id}-{year}" + (f"-{table}" if fmt == "csv" else "") + f".{fmt}"
        return Response(content=content, media_type=MEDIA_TYPES[fmt],
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    return router
