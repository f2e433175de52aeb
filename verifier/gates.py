"""Gates and figures that no agent can measure — the connection to the national top-level node, an on-site
inspection's outcome, an audit opinion, investment, fee and revenue figures, a go-live date — recorded by an official
with who, when and the document reference. Records are append-only: a correction is a newer record; for each
(metric, period, item) the latest counts. The verdict shows each as recorded by an official, with its record.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine

from verifier.db import official_records
from verifier.eligibility import GateRecord
from verifier.enroll import get_applicant
from verifier.errors import RequestInvalid
from verifier.rules import METRICS

log = logging.getLogger(__name__)

GO_LIVE = "go_live_date"
GATE_METRICS: tuple[str, ...] = tuple(m for m, s in METRICS.items() if s.kind == "gate")
FIGURE_METRICS: tuple[str, ...] = tuple(m for m, s in METRICS.items() if s.kind == "figure")
RECORDABLE: tuple[str, ...] = (*GATE_METRICS, *FIGURE_METRICS, GO_LIVE)
_DECIMAL = re.compile(r"^[0-9]{1,15}(\.[0-9]{1,2})?$")


@dataclass(frozen=True, slots=True)
class Recorded:
    id: int
    applicant_id: str
    record: GateRecord

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "applicant_id": self.applicant_id, **self.record.to_json()}


def parse_value(metric: str, value: str | bool) -> str:
    """The stored text of a value, checked for the metric: "true"/"false" for a gate, a decimal (at most 2 places,
    no exponent) for a figure, an ISO date for the go-live date."""
    text = str(value).lower() if isinstance(value, bool) else str(value).strip()
    if metric not in RECORDABLE:
        raise RequestInvalid(f"metric: expected one of {list(RECORDABLE)}, got {metric[:64]!r}")
    if metric in GATE_METRICS:
        if text not in ("true", "false"):
            raise RequestInvalid(f"value of gate {metric!r}: expected true or false, got {text[:64]!r}")
        return text
    if metric == GO_LIVE:
        try:
            return date.fromisoformat(text).isoformat()
        except ValueError:
            raise RequestInvalid(f"value of {metric!r}: expected an ISO date (YYYY-MM-DD), got {text[:64]!r}") \
                from None
    if not _DECIMAL.match(text):
        raise RequestInvalid(f"value of figure {metric!r}: expected a decimal such as \"1250000.50\" (≥ 0, at most "
                             f"2 decimal places, no exponent), got {text[:64]!r}")
    try:
        Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern already guarantees it
        raise RequestInvalid(f"value of figure {metric!r}: expected a decimal, got {text[:64]!r}") from None
    return text


def record_gate(engine: Engine, *, applicant_id: str, metric: str, value: str | bool, recorded_by: str,
                document_ref: str, now: datetime, period: int | None = None, item: str = "",
                note: str = "") -> Recorded:
    """Record what an official established (append-only). Refuses an unknown metric, a wrong value, no official's
    name or no document reference."""
    text = parse_value(metric, value)
    if not recorded_by.strip():
        raise RequestInvalid("recorded_by: expected the official's name, got an empty string")
    if not document_ref.strip():
        raise RequestInvalid("document_ref: expected the document's reference (e.g. a file number), got an empty "
                             "string")
    if period is not None and not 2000 <= period <= 2100:
        raise RequestInvalid(f"period: expected a year from 2000 to 2100, got {period}")
    with engine.begin() as conn:
        get_applicant(conn, applicant_id)
        row_id = conn.execute(insert(official_records).values(
            applicant_id=applicant_id, metric=metric, period=period, item=item, value=text,
            recorded_by=recorded_by.strip(), recorded_at=now, document_ref=document_ref.strip(), note=note,
        )).inserted_primary_key
    log.info("official record: %s %s=%s (period %s, item %r) by %r, document %r", applicant_id, metric, text,
             period, item, recorded_by, document_ref)
    assert row_id is not None
    return Recorded(int(row_id[0]), applicant_id, _record(metric, text, period, item, recorded_by.strip(),
                                                          now.isoformat(), document_ref.strip(), note))


def _record(metric: str, text: str, period: int | None, item: str, by: str, at: str, doc: str,
            note: str) -> GateRecord:
    value: bool | Decimal = text == "true" if metric in GATE_METRICS else Decimal(text) \
        if metric in FIGURE_METRICS else Decimal(0)
    return GateRecord(metric=metric, value=value, period=period, item=item, recorded_by=by, recorded_at=at,
                      document_ref=doc, note=note if metric != GO_LIVE else text)


def list_records(conn: Connection, applicant_id: str) -> list[Recorded]:
    rows = conn.execute(select(official_records).where(official_records.c.applicant_id == applicant_id)
                        .order_by(official_records.c.id))
    return [Recorded(int(r.id), r.applicant_id, _record(r.metric, r.value, r.period, r.item, r.recorded_by,
                                                        r.recorded_at.isoformat(), r.document_ref, r.note))
            for r in rows]


def gates_for_facts(conn: Connection, applicant_id: str) -> tuple[dict[str, list[GateRecord]], date | None]:
    """Every gate and figure record by metric (``verifier.eligibility.recorded`` picks what counts), and the
    go-live date if one was recorded (the latest)."""
    out: dict[str, list[GateRecord]] = {}
    go_live: date | None = None
    for rec in list_records(conn, applicant_id):
        if rec.record.metric == GO_LIVE:
            go_live = date.fromisoformat(rec.record.note)
            continue
        out.setdefault(rec.record.metric, []).append(rec.record)
    return out, go_live
