"""Annual checks: every applicant evaluated for the previous calendar year against a frozen snapshot of the ledger,
stored once, signed by the verifier; and on-demand evaluations for any applicant and window.

- The snapshot: the facts and the ledger's size (plus its last leaf hash and the latest signed checkpoint, when one
  exists) are read in one database transaction, so the facts are exactly those derived from ledger entries
  [0, ledger_size) — ingest writes an entry and its facts in one transaction. :func:`snapshot_point` names it; it
  is a plain function of a connection so that another evidence source can replace it.
- Idempotent: exactly one evaluation per (applicant, year, policy) (a unique constraint); a re-run returns the one
  stored. A run missed while the verifier was down is caught up when the scheduler starts.
- Signed: the verdict's canonical JSON in a DSSE envelope (payload type :data:`EVALUATION_PAYLOAD_TYPE`) signed with
  the verifier's Ed25519 key — the checkpoint signer's note key (``verifier.checkpoints``), created at init.
- A webhook (POST of a JSON summary, with a timeout) is told when a run stored new evaluations.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import insert, inspect, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from connectors.base import ConfigError, optional, refuse_unknown
from protocol.canonical import canonical_json
from protocol.envelope import open_envelope, sign_envelope
from protocol.keys import key_id
from verifier.checkpoints import ensure_note_key, note_signer
from verifier.db import evaluations
from verifier.eligibility import Verdict
from verifier.enroll import list_applicants
from verifier.facts import applicant_verdict
from verifier.ledger import ledger_head
from verifier.rules import Policy

log = logging.getLogger(__name__)

EVALUATION_PAYLOAD_TYPE = "application/vnd.tianping.evaluation.v1+json"
SHANGHAI = "Asia/Shanghai"
DEFAULT_CRON = "0 2 5 1 *"  # 02:00 on 5 January, Asia/Shanghai
SnapshotFn = Callable[[Connection], dict[str, Any]]


def snapshot_point(conn: Connection) -> dict[str, Any]:
    """The evidence an evaluation used, read in the caller's transaction: the ledger's size and last leaf hash, and
    the latest signed checkpoint if the checkpoints table holds one."""
    head = ledger_head(conn)
    point: dict[str, Any] = {"ledger_size": head.size, "last_leaf_hash": head.last_leaf_hash, "checkpoint": None}
    if inspect(conn).has_table("checkpoints"):
        from verifier.db import checkpoints

        row = conn.execute(select(checkpoints).order_by(checkpoints.c.id.desc()).limit(1)).first()
        if row is not None:
            point["checkpoint"] = {"size": int(row.size), "root": bytes(row.root).hex(),
                                   "signed_at": row.signed_at.isoformat()}
    return point


def signing_key(engine: Engine) -> Ed25519PrivateKey:
    """The verifier's Ed25519 key: the checkpoint signer's (created now if missing)."""
    ensure_note_key(engine)
    with engine.connect() as conn:
        return note_signer(conn).private


@dataclass(frozen=True, slots=True)
class StoredEvaluation:
    applicant_id: str
    year: int
    policy_id: str
    ledger_size: int
    verdict: dict[str, Any]
    envelope: bytes
    key_id: str
    payable_yuan: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"applicant_id": self.applicant_id, "year": self.year, "policy_id": self.policy_id,
                "ledger_size": self.ledger_size, "payable_yuan": self.payable_yuan, "key_id": self.key_id,
                "created_at": self.created_at.isoformat(), "verdict": self.verdict,
                "envelope": base64.b64encode(self.envelope).decode("ascii")}


def _stored(row: Any) -> StoredEvaluation:
    return StoredEvaluation(applicant_id=row.applicant_id, year=int(row.year), policy_id=row.policy_id,
                            ledger_size=int(row.ledger_size), verdict=json.loads(row.verdict),
                            envelope=bytes(row.envelope), key_id=row.key_id, payable_yuan=row.payable_yuan,
                            created_at=row.created_at)


def get_evaluation(conn: Connection, applicant_id: str, year: int, policy_id: str) -> StoredEvaluation | None:
    row = conn.execute(select(evaluations).where(evaluations.c.applicant_id == applicant_id,
                                                 evaluations.c.year == year,
                                                 evaluations.c.policy_id == policy_id)).first()
    return None if row is None else _stored(row)


def count_evaluations(conn: Connection) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for row in conn.execute(select(evaluations.c.applicant_id, evaluations.c.year)):
        out[(row.applicant_id, int(row.year))] = out.get((row.applicant_id, int(row.year)), 0) + 1
    return out


def verify_evaluation(stored: StoredEvaluation, public: Ed25519PublicKey) -> dict[str, Any]:
    """Check the envelope's signature and that it signs exactly the stored verdict; return the signed verdict."""
    opened = open_envelope(stored.envelope, {key_id(public): public}, payload_type=EVALUATION_PAYLOAD_TYPE)
    signed: dict[str, Any] = json.loads(opened.payload)
    if signed != stored.verdict:
        raise ValueError("evaluation: expected the envelope to sign the stored verdict, got a different one")
    return signed


def on_demand(engine: Engine, policy: Policy, applicant_id: str, year: int, *, as_of: date,
              snapshot: SnapshotFn = snapshot_point) -> Verdict:
    """An evaluation of any applicant for any year (windows end at ``as_of`` for a year still running), with the
    snapshot it used; not stored."""
    return applicant_verdict(engine, policy, applicant_id, year, as_of=as_of, snapshot=snapshot)


def evaluate_and_store(engine: Engine, policy: Policy, applicant_id: str, year: int, *, now: datetime,
                       key: Ed25519PrivateKey, snapshot: SnapshotFn = snapshot_point) -> tuple[StoredEvaluation, bool]:
    """The stored evaluation of (applicant, year, policy), creating and signing it if missing. Returns it and whether
    it was created now."""
    with engine.connect() as conn:
        existing = get_evaluation(conn, applicant_id, year, policy.id)
    if existing is not None:
        return existing, False
    verdict = applicant_verdict(engine, policy, applicant_id, year, as_of=date(year, 12, 31), snapshot=snapshot)
    body = verdict.to_json()
    body["evaluated_at"] = now.astimezone(UTC).isoformat()
    payload = canonical_json(body)
    envelope = sign_envelope(payload, key, payload_type=EVALUATION_PAYLOAD_TYPE)
    kid = key_id(key.public_key())
    try:
        with engine.begin() as conn:
            conn.execute(insert(evaluations).values(
                applicant_id=applicant_id, year=year, policy_id=policy.id, policy_sha256=policy.sha256,
                ledger_size=int(body["evidence"].get("ledger_size", 0)), verdict=payload.decode("utf-8"),
                envelope=envelope, key_id=kid, payable_yuan=body["total_payable_yuan"], created_at=now))
    except IntegrityError:  # another run stored it first: that one stands
        with engine.connect() as conn:
            stored = get_evaluation(conn, applicant_id, year, policy.id)
        assert stored is not None
        return stored, False
    with engine.connect() as conn:
        created = get_evaluation(conn, applicant_id, year, policy.id)
    assert created is not None
    log.info("annual evaluation stored: %s %d (%s), ledger size %d, payable %s yuan", applicant_id, year, policy.id,
             created.ledger_size, created.payable_yuan)
    return created, True


@dataclass(frozen=True, slots=True)
class AnnualSettings:
    """``[verifier.annual]``: when the annual check runs and whom it tells."""

    cron: str = DEFAULT_CRON
    timezone: str = SHANGHAI
    webhook_url: str | None = None
    webhook_timeout_s: float = 10.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AnnualSettings:
        where = "verifier.annual"
        refuse_unknown(cfg, {"cron", "timezone", "webhook_url", "webhook_timeout_s"}, where=where)
        settings = cls(cron=optional(cfg, "cron", str, DEFAULT_CRON, where=where),
                       timezone=optional(cfg, "timezone", str, SHANGHAI, where=where),
                       webhook_url=optional(cfg, "webhook_url", str, None, where=where),
                       webhook_timeout_s=float(optional(cfg, "webhook_timeout_s", (int, float), 10.0, where=where)))
        settings.trigger()
        if settings.webhook_timeout_s <= 0:
            raise ConfigError(f"verifier.annual.webhook_timeout_s: expected > 0, got {settings.webhook_timeout_s}")
        return settings

    def trigger(self) -> CronTrigger:
        try:
            return CronTrigger.from_crontab(self.cron, timezone=ZoneInfo(self.timezone))
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"verifier.annual.cron/timezone: expected a 5-field crontab and an IANA zone, got "
                              f"{self.cron!r} in {self.timezone!r} ({exc})") from None


@dataclass
class AnnualRun:
    year: int
    policy_id: str
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    webhook_status: int | None = None
    webhook_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"year": self.year, "policy_id": self.policy_id, "created": self.created, "existing": self.existing,
                "webhook_status": self.webhook_status, "webhook_error": self.webhook_error}


def post_webhook(url: str, body: dict[str, Any], timeout_s: float) -> int:
    response = httpx.post(url, json=body, timeout=timeout_s)
    return response.status_code


def run_annual(engine: Engine, policy: Policy, year: int, *, now: datetime, settings: AnnualSettings | None = None,
               snapshot: SnapshotFn = snapshot_point) -> AnnualRun:
    """Evaluate ``year`` for every applicant (idempotent), then tell the webhook if anything new was stored."""
    settings = settings or AnnualSettings()
    key = signing_key(engine)
    with engine.connect() as conn:
        ids = [a.id for a in list_applicants(conn)]
    run = AnnualRun(year=year, policy_id=policy.id)
    stored: list[StoredEvaluation] = []
    for applicant_id in ids:
        evaluation, created = evaluate_and_store(engine, policy, applicant_id, year, now=now, key=key,
                                                 snapshot=snapshot)
        (run.created if created else run.existing).append(applicant_id)
        stored.append(evaluation)
    if run.created and settings.webhook_url:
        body = {"event": "evaluations_ready", "year": year, "policy_id": policy.id,
                "evaluations": [{"applicant_id": e.applicant_id, "ledger_size": e.ledger_size,
                                 "payable_yuan": e.payable_yuan, "key_id": e.key_id} for e in stored]}
        try:
            run.webhook_status = post_webhook(settings.webhook_url, body, settings.webhook_timeout_s)
        except httpx.HTTPError as exc:
            run.webhook_error = f"{type(exc).__name__}: {exc}"
            log.warning("annual check %d: webhook %s failed: %s", year, settings.webhook_url, run.webhook_error)
    log.info("annual check %d (%s): %d stored now, %d already stored", year, policy.id, len(run.created),
             len(run.existing))
    return run


def last_fire_before(trigger: CronTrigger, now: datetime, *, horizon: timedelta = timedelta(days=800)) -> \
        datetime | None:
    """The latest time the schedule fired at or before ``now`` (within ``horizon``)."""
    last: datetime | None = None
    t = trigger.get_next_fire_time(None, now - horizon)
    for _ in range(200_000):
        if t is None or t > now:
            break
        last = t
        t = trigger.get_next_fire_time(t, t + timedelta(seconds=1))
    return last


class AnnualScheduler:
    """The APScheduler job of the annual check, with an injected clock. ``start()`` catches up the last run the
    schedule was due (the verifier may have been down then), then schedules the next ones."""

    def __init__(self, engine: Engine, policy: Policy, settings: AnnualSettings, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 snapshot: SnapshotFn = snapshot_point) -> None:
        self.engine = engine
        self.policy = policy
        self.settings = settings
        self.clock = clock
        self.snapshot = snapshot
        self.trigger = settings.trigger()
        self.scheduler: BackgroundScheduler | None = None
        self.runs: list[AnnualRun] = []
        self._lock = threading.Lock()

    def due_year(self, now: datetime) -> int | None:
        """The year the last due run evaluates: the calendar year before that run (in the schedule's zone)."""
        fired = last_fire_before(self.trigger, now)
        if fired is None:
            return None
        return fired.astimezone(ZoneInfo(self.settings.timezone)).year - 1

    def run_due(self) -> AnnualRun | None:
        """The job: evaluate the year the schedule last made due (nothing new if it is stored already)."""
        now = self.clock()
        year = self.due_year(now)
        if year is None:
            return None
        with self._lock:
            run = run_annual(self.engine, self.policy, year, now=now, settings=self.settings, snapshot=self.snapshot)
            self.runs.append(run)
        return run

    def start(self) -> AnnualRun | None:
        caught_up = self.run_due()
        self.scheduler = BackgroundScheduler(timezone=ZoneInfo(self.settings.timezone))
        self.scheduler.add_job(self.run_due, trigger=self.trigger, id="annual-check", replace_existing=True,
                               coalesce=True, max_instances=1, misfire_grace_time=24 * 3600)
        self.scheduler.start()
        return caught_up

    def next_run_time(self) -> datetime | None:
        if self.scheduler is None:
            return None
        job = self.scheduler.get_job("annual-check")
        return None if job is None else job.next_run_time  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
