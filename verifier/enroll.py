"""Applicants, their enterprises, enrollment tokens, and the enrollment (and revocation) of agents' keys.

A token is ``tpe_`` and 256 random bits (``secrets.token_urlsafe(32)``; the prefix says what it is and keeps a
token from starting with '-', which a command line reads as an option), shown once and stored only as its SHA-256;
it works once, expires (24 h by default), and is bound to one applicant and optionally one of its enterprises. Enrolling
binds a new Ed25519 public key to a new agent id for that applicant and records a key event; a refused enrollment
changes nothing. Every function takes the time it should use (``now``): no clock is read here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from protocol.keys import key_id, load_public_key_b64, public_key_bytes
from protocol.report import GENESIS_HASH
from protocol.uscc import validate_uscc
from verifier.db import (
    agent_keys,
    agent_salts,
    agents,
    applicants,
    enrollment_tokens,
    enterprises,
    fingerprint_key,
    key_events,
)
from verifier.errors import (
    AgentRevoked,
    AgentUnknown,
    ApplicantExists,
    ApplicantUnknown,
    EnterpriseExists,
    EnterpriseUnknown,
    KeyAgentMismatch,
    KeyAlreadyEnrolled,
    RequestInvalid,
    TokenExpired,
    TokenUnknown,
    TokenUsed,
)
from verifier.ledger import append_key_event, lock_ledger

TOKEN_PREFIX = "tpe_"  # noqa: S105 - a public prefix naming Tianping enrollment tokens, not a secret

log = logging.getLogger(__name__)

SALT_BYTES = 32  # 256 bits


def key_event_body(event: str, *, agent_id: str, applicant_id: str, key_id: str, public_key: bytes | None,
                   at: datetime, detail: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON a key event's ledger leaf covers (``verifier.ledger.append_key_event`` canonicalizes it)."""
    return {"event": event, "agent_id": agent_id, "applicant_id": applicant_id, "key_id": key_id,
            "public_key": None if public_key is None else base64.b64encode(public_key).decode("ascii"),
            "at": at.astimezone(UTC).isoformat(), "detail": dict(detail)}

DEFAULT_TOKEN_TTL = timedelta(hours=24)
APPLICANT_KINDS = ("platform", "node")
_APPLICANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Applicant:
    id: str
    name: str
    kind: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "kind": self.kind}


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str  # shown once; only its SHA-256 is stored
    applicant_id: str
    enterprise: str | None
    expires_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "applicant_id": self.applicant_id, "enterprise": self.enterprise,
                "expires_at": self.expires_at.isoformat()}


@dataclass(frozen=True, slots=True)
class Enrollment:
    agent_id: str
    key_id: str
    applicant_id: str
    enterprise: dict[str, str] | None
    fingerprint_key: bytes
    resolution_salt: bytes  # the agent's own: resolution records are sampled under it (issue 4)

    def to_json(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "key_id": self.key_id, "applicant_id": self.applicant_id,
                "enterprise": self.enterprise,
                "fingerprint_key": base64.b64encode(self.fingerprint_key).decode("ascii"),
                "resolution_salt": base64.b64encode(self.resolution_salt).decode("ascii"), "next_seq": 1}


def get_applicant(conn: Connection, applicant_id: str) -> Applicant:
    row = conn.execute(select(applicants).where(applicants.c.id == applicant_id)).first()
    if row is None:
        raise ApplicantUnknown(f"applicant: expected a registered id, got {applicant_id[:64]!r}")
    return Applicant(id=row.id, name=row.name, kind=row.kind)


def list_applicants(conn: Connection) -> list[Applicant]:
    return [Applicant(id=r.id, name=r.name, kind=r.kind)
            for r in conn.execute(select(applicants).order_by(applicants.c.id))]


def add_applicant(engine: Engine, *, applicant_id: str, name: str, kind: str, now: datetime) -> Applicant:
    if not _APPLICANT_ID.match(applicant_id):
        raise RequestInvalid(f"id: expected letters, digits, '_', '.', '-' (at most 64), got {applicant_id[:80]!r}")
    if kind not in APPLICANT_KINDS:
        raise RequestInvalid(f"kind: expected one of {list(APPLICANT_KINDS)}, got {kind!r}")
    if not name.strip() or len(name) > 200:
        raise RequestInvalid(f"name: expected 1 to 200 characters, got {len(name)}")
    with engine.begin() as conn:
        if conn.execute(select(applicants.c.id).where(applicants.c.id == applicant_id)).first() is not None:
            raise ApplicantExists(f"applicant {applicant_id!r}: expected a new id, got one already registered")
        conn.execute(insert(applicants).values(id=applicant_id, name=name, kind=kind, created_at=now))
    log.info("registered applicant %r (%s)", applicant_id, kind)
    return Applicant(id=applicant_id, name=name, kind=kind)


def add_enterprise(engine: Engine, *, applicant_id: str, uscc: str, name: str, now: datetime) -> dict[str, str]:
    validate_uscc(uscc)
    if not name.strip() or len(name) > 200:
        raise RequestInvalid(f"name: expected 1 to 200 characters, got {len(name)}")
    with engine.begin() as conn:
        get_applicant(conn, applicant_id)
        exists = conn.execute(select(enterprises.c.uscc).where(enterprises.c.applicant_id == applicant_id,
                                                               enterprises.c.uscc == uscc)).first()
        if exists is not None:
            raise EnterpriseExists(f"enterprise {uscc}: expected a new one for {applicant_id!r}, got a repeat")
        conn.execute(insert(enterprises).values(applicant_id=applicant_id, uscc=uscc, name=name, created_at=now))
    log.info("registered enterprise %s for applicant %r", uscc, applicant_id)
    return {"uscc": uscc, "name": name}


def issue_token(engine: Engine, *, applicant_id: str, enterprise: str | None = None, now: datetime,
                ttl: timedelta = DEFAULT_TOKEN_TTL) -> IssuedToken:
    if ttl <= timedelta(0) or ttl > timedelta(days=30):
        raise RequestInvalid(f"ttl: expected between 1 s and 30 days, got {ttl.total_seconds():.0f} s")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        get_applicant(conn, applicant_id)
        if enterprise is not None:
            found = conn.execute(select(enterprises.c.uscc).where(enterprises.c.applicant_id == applicant_id,
                                                                  enterprises.c.uscc == enterprise)).first()
            if found is None:
                raise EnterpriseUnknown(f"enterprise: expected one registered for {applicant_id!r}, "
                                        f"got {enterprise[:40]!r}")
        conn.execute(insert(enrollment_tokens).values(token_sha256=token_digest(token), applicant_id=applicant_id,
                                                      enterprise_uscc=enterprise, created_at=now,
                                                      expires_at=now + ttl))
    log.info("issued an enrollment token for applicant %r (expires %s)", applicant_id, (now + ttl).isoformat())
    return IssuedToken(token=token, applicant_id=applicant_id, enterprise=enterprise, expires_at=now + ttl)


def enroll_agent(engine: Engine, *, token: str, public_key_b64: str, agent_name: str, now: datetime) -> Enrollment:
    """Spend a token and bind a new public key to a new agent, in one transaction (refusals change nothing)."""
    if not agent_name.strip() or len(agent_name) > 200:
        raise RequestInvalid(f"agent_name: expected 1 to 200 characters, got {len(agent_name)}")
    public = load_public_key_b64(public_key_b64)
    raw = public_key_bytes(public)
    kid = key_id(public)
    agent_id = "agt-" + kid[:24]
    try:
        with engine.begin() as conn:
            lock_ledger(conn)
            row = conn.execute(select(enrollment_tokens)
                               .where(enrollment_tokens.c.token_sha256 == token_digest(token))).first()
            if row is None:
                raise TokenUnknown("token: expected one issued by this verifier, got an unknown token")
            if row.used_at is not None:
                raise TokenUsed(f"token: expected an unused token, got one used at {row.used_at.isoformat()}")
            if row.expires_at <= now:
                raise TokenExpired(f"token: expected one valid at {now.isoformat()}, got one that expired at "
                                   f"{row.expires_at.isoformat()}")
            if conn.execute(select(agents.c.agent_id).where(agents.c.key_id == kid)).first() is not None:
                raise KeyAlreadyEnrolled(f"public_key: expected a key not yet enrolled, got key {kid[:16]}… "
                                         "that is")
            conn.execute(update(enrollment_tokens).where(enrollment_tokens.c.token_sha256 == row.token_sha256,
                                                         enrollment_tokens.c.used_at.is_(None))
                         .values(used_at=now, used_by_agent=agent_id))
            conn.execute(insert(agents).values(
                agent_id=agent_id, applicant_id=row.applicant_id, enterprise_uscc=row.enterprise_uscc,
                name=agent_name, key_id=kid, public_key=raw, enrolled_at=now, next_seq=1, last_hash=GENESIS_HASH))
            conn.execute(insert(key_events).values(agent_id=agent_id, key_id=kid, event="enroll", at=now,
                                                   detail=f"token for applicant {row.applicant_id}"))
            conn.execute(insert(agent_keys).values(key_id=kid, agent_id=agent_id, public_key=raw, valid_from=now))
            salt = secrets.token_bytes(SALT_BYTES)
            conn.execute(insert(agent_salts).values(agent_id=agent_id, salt=salt, issued_at=now))
            append_key_event(conn, event=key_event_body(
                "enroll", agent_id=agent_id, applicant_id=row.applicant_id, key_id=kid, public_key=raw, at=now,
                detail={"enterprise": row.enterprise_uscc}))
            enterprise = None
            if row.enterprise_uscc is not None:
                ename = conn.execute(select(enterprises.c.name).where(
                    enterprises.c.applicant_id == row.applicant_id,
                    enterprises.c.uscc == row.enterprise_uscc)).scalar_one()
                enterprise = {"uscc": row.enterprise_uscc, "name": ename}
            fkey = fingerprint_key(conn)
    except IntegrityError:
        # a concurrent enrollment of the same key won the race
        raise KeyAlreadyEnrolled(f"public_key: expected a key not yet enrolled, got key {kid[:16]}… that is") \
            from None
    log.info("enrolled agent %r (key %s…) for applicant %r", agent_id, kid[:16], row.applicant_id)
    return Enrollment(agent_id=agent_id, key_id=kid, applicant_id=row.applicant_id, enterprise=enterprise,
                      fingerprint_key=fkey, resolution_salt=salt)


def sampling_salt(conn: Connection, agent_id: str) -> bytes:
    """The salt ``agent_id`` samples resolution records under: the one issued at its enrollment, or, for an agent
    enrolled before salts were issued, the deployment's fingerprint key (what such an agent falls back to)."""
    salt = conn.execute(select(agent_salts.c.salt).where(agent_salts.c.agent_id == agent_id)).scalar_one_or_none()
    return bytes(salt) if salt is not None else fingerprint_key(conn)


def revoke_agent(engine: Engine, *, agent_id: str, now: datetime, reason: str = "") -> None:
    with engine.begin() as conn:
        lock_ledger(conn)
        row = conn.execute(select(agents.c.key_id, agents.c.applicant_id, agents.c.revoked_at, agents.c.next_seq)
                           .where(agents.c.agent_id == agent_id)).first()
        if row is None:
            raise AgentUnknown(f"agent: expected an enrolled agent id, got {agent_id[:64]!r}")
        if row.revoked_at is not None:
            return
        conn.execute(update(agents).where(agents.c.agent_id == agent_id).values(revoked_at=now))
        conn.execute(insert(key_events).values(agent_id=agent_id, key_id=row.key_id, event="revoke", at=now,
                                               detail=reason))
        append_key_event(conn, event=key_event_body(
            "revoke", agent_id=agent_id, applicant_id=row.applicant_id, key_id=row.key_id, public_key=None, at=now,
            detail={"reason": reason, "reports_before_revocation": int(row.next_seq) - 1}))
        # the old reports stay in the ledger, marked by this event (every seq up to reports_before_revocation);
        # any key the agent held stops now
        conn.execute(update(agent_keys).where(agent_keys.c.agent_id == agent_id,
                                              (agent_keys.c.valid_until.is_(None)) | (agent_keys.c.valid_until > now))
                     .values(valid_until=now))
    log.info("revoked agent %r", agent_id)


# ---- issue 5: key rotation signed by the old key, admin rebinding -------------------------------------------------
ROTATION_PAYLOAD_TYPE = "application/vnd.tianping.key-rotation.v1+json"
DEFAULT_ROTATION_OVERLAP = timedelta(days=7)
_ROTATION_FIELDS = {"agent_id", "old_key_id", "new_public_key", "created_at"}


@dataclass(frozen=True, slots=True)
class Rotation:
    agent_id: str
    old_key_id: str
    new_key_id: str
    old_key_valid_until: datetime

    def to_json(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "old_key_id": self.old_key_id, "new_key_id": self.new_key_id,
                "old_key_valid_until": self.old_key_valid_until.isoformat()}


def _replace_key(conn: Connection, *, agent_id: str, new_raw: bytes, new_kid: str, now: datetime,
                 old_valid_until: datetime) -> None:
    if conn.execute(select(agent_keys.c.key_id).where(agent_keys.c.key_id == new_kid)).first() is not None or \
            conn.execute(select(agents.c.agent_id).where(agents.c.key_id == new_kid)).first() is not None:
        raise KeyAlreadyEnrolled(f"new key: expected a key never enrolled, got key {new_kid[:16]}… that was")
    conn.execute(update(agent_keys).where(agent_keys.c.agent_id == agent_id, agent_keys.c.valid_until.is_(None))
                 .values(valid_until=old_valid_until))
    conn.execute(insert(agent_keys).values(key_id=new_kid, agent_id=agent_id, public_key=new_raw, valid_from=now))
    conn.execute(update(agents).where(agents.c.agent_id == agent_id).values(key_id=new_kid, public_key=new_raw))


def rotate_agent_key(engine: Engine, *, agent_id: str, envelope: bytes, now: datetime,
                     overlap: timedelta = DEFAULT_ROTATION_OVERLAP) -> Rotation:
    """Bind a new key to an agent on a request signed by its current key; the old key keeps working for reports
    until ``now + overlap`` (reports already signed and queued with it). Logged as a key event in the ledger."""
    from protocol.envelope import open_envelope  # local: only rotation needs it here

    with engine.begin() as conn:
        lock_ledger(conn)
        row = conn.execute(select(agents).where(agents.c.agent_id == agent_id)).first()
        if row is None:
            raise AgentUnknown(f"agent: expected an enrolled agent id, got {agent_id[:64]!r}")
        if row.revoked_at is not None:
            raise AgentRevoked(f"agent {agent_id!r}: expected an active agent, got one revoked at "
                               f"{row.revoked_at.isoformat()}")
        current = load_public_key_b64(base64.b64encode(bytes(row.public_key)).decode("ascii"))
        opened = open_envelope(envelope, {row.key_id: current}, payload_type=ROTATION_PAYLOAD_TYPE, max_bytes=4096)
        try:
            body = json.loads(opened.payload)
        except ValueError:
            body = None
        if not isinstance(body, dict) or set(body) != _ROTATION_FIELDS:
            raise RequestInvalid(f"rotation: expected exactly the fields {sorted(_ROTATION_FIELDS)}, got "
                                 f"{sorted(body) if isinstance(body, dict) else type(body).__name__}")
        if body["agent_id"] != agent_id or body["old_key_id"] != row.key_id:
            raise KeyAgentMismatch(f"rotation: expected agent {agent_id!r} and its current key {row.key_id[:16]}…, "
                                   f"got {str(body['agent_id'])[:64]!r} and {str(body['old_key_id'])[:16]}…")
        new_public = load_public_key_b64(str(body["new_public_key"]))
        new_raw, new_kid = public_key_bytes(new_public), key_id(new_public)
        valid_until = now + overlap
        _replace_key(conn, agent_id=agent_id, new_raw=new_raw, new_kid=new_kid, now=now, old_valid_until=valid_until)
        conn.execute(insert(key_events).values(agent_id=agent_id, key_id=new_kid, event="rotate", at=now,
                                               detail=f"signed by {row.key_id}; old key valid until "
                                                      f"{valid_until.isoformat()}"))
        append_key_event(conn, event=key_event_body(
            "rotate", agent_id=agent_id, applicant_id=row.applicant_id, key_id=new_kid, public_key=new_raw, at=now,
            detail={"old_key_id": row.key_id, "old_key_valid_until": valid_until.astimezone(UTC).isoformat(),
                    "request_envelope_sha256": opened.envelope_hash}))
    log.info("rotated the key of agent %r to %s… (old key valid until %s)", agent_id, new_kid[:16],
             valid_until.isoformat())
    return Rotation(agent_id, row.key_id, new_kid, valid_until)


def rebind_agent_key(engine: Engine, *, agent_id: str, public_key_b64: str, now: datetime, admin: str,
                     reason: str) -> Rotation:
    """The admin action that replaces an agent's key without the old key (lost or stolen): the old key stops at
    once, and the action (who, why) is a key event in the ledger."""
    if not reason.strip():
        raise RequestInvalid("reason: expected why the binding is replaced, got nothing")
    public = load_public_key_b64(public_key_b64)
    new_raw, new_kid = public_key_bytes(public), key_id(public)
    with engine.begin() as conn:
        lock_ledger(conn)
        row = conn.execute(select(agents).where(agents.c.agent_id == agent_id)).first()
        if row is None:
            raise AgentUnknown(f"agent: expected an enrolled agent id, got {agent_id[:64]!r}")
        _replace_key(conn, agent_id=agent_id, new_raw=new_raw, new_kid=new_kid, now=now, old_valid_until=now)
        conn.execute(insert(key_events).values(agent_id=agent_id, key_id=new_kid, event="rebind", at=now,
                                               detail=f"by {admin}: {reason}"[:1000]))
        append_key_event(conn, event=key_event_body(
            "rebind", agent_id=agent_id, applicant_id=row.applicant_id, key_id=new_kid, public_key=new_raw, at=now,
            detail={"old_key_id": row.key_id, "admin": admin, "reason": reason}))
    log.warning("admin %r replaced the key of agent %r (%s)", admin, agent_id, reason)
    return Rotation(agent_id, row.key_id, new_kid, now)
