"""Read credentials for the JSON API (issue 5): who may read an applicant's verdicts, evidence, gates, evaluations,
reports and agents.

A credential is a bearer token ``tpr_`` + 256 random bits (base64url), shown once when issued and stored only as
its SHA-256, with a public id to list and revoke it by, a name saying whose it is, and an optional expiry. Its role
is either

- ``applicant``: one applicant's data (the applicant's own staff and tools), or
- ``official``: every applicant's data (the officials who check them).

The read routes also take the admin token, and ``GET /v1/agents/{id}`` takes a request signed by one of that
agent's keys (``protocol.request_auth``), so that an agent reads its own state with the key it already has.

Answers: no credential → 401 ``credential_required``; unknown, revoked or expired → 401 ``credential_invalid``;
another applicant's → 403 ``credential_forbidden`` — also when the applicant (or agent) asked for does not exist,
so that an applicant's credential cannot probe which others exist. Every function that needs the time takes it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Request
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine

from protocol.request_auth import (
    MAX_SKEW_S,
    SIGNATURE_HEADER,
    RequestSignature,
    RequestSignatureInvalid,
    check_request_signature,
    parse_request_signature,
)
from verifier.db import agent_keys, agents, api_credentials
from verifier.enroll import get_applicant
from verifier.errors import (
    CredentialForbidden,
    CredentialInvalid,
    CredentialRequired,
    CredentialUnknown,
    RequestInvalid,
)

log = logging.getLogger(__name__)

TOKEN_PREFIX = "tpr_"  # noqa: S105 (a prefix, not a secret)
TOKEN_BYTES = 32
MAX_TTL = timedelta(days=5 * 366)
Role = Literal["applicant", "official"]
ROLES: tuple[Role, ...] = ("applicant", "official")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Credential:
    id: str
    role: Role
    applicant_id: str | None
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "applicant_id": self.applicant_id, "name": self.name,
                "created_at": self.created_at.isoformat(),
                "expires_at": self.expires_at.isoformat() if self.expires_at else None,
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}

    def may_read(self, applicant_id: str) -> bool:
        return self.role == "official" or self.applicant_id == applicant_id


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    credential: Credential
    token: str  # shown this once

    def to_json(self) -> dict[str, Any]:
        return {**self.credential.to_json(), "token": self.token}


def _row_credential(row: Any) -> Credential:
    return Credential(id=row.id, role=row.role, applicant_id=row.applicant_id, name=row.name,
                      created_at=row.created_at, expires_at=row.expires_at, revoked_at=row.revoked_at)


def issue_credential(engine: Engine, *, role: str, applicant_id: str | None, name: str, now: datetime,
                     ttl: timedelta | None = None) -> IssuedCredential:
    """A new credential: an applicant's (``applicant_id`` must exist) or an official's (no applicant)."""
    if role not in ROLES:
        raise RequestInvalid(f"role: expected one of {list(ROLES)}, got {role[:40]!r}")
    if role == "applicant" and not applicant_id:
        raise RequestInvalid("applicant_id: expected the applicant whose data the credential reads, got none")
    if role == "official" and applicant_id is not None:
        raise RequestInvalid(f"applicant_id: expected none for an official credential (it reads every applicant), "
                             f"got {applicant_id[:64]!r}")
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise RequestInvalid(f"name: expected 1 to 200 characters saying whose credential it is, got {len(name)}")
    if ttl is not None and not timedelta(seconds=1) <= ttl <= MAX_TTL:
        raise RequestInvalid(f"ttl: expected 1 s to {MAX_TTL.days} days, got {ttl.total_seconds():.0f} s")
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).decode("ascii").rstrip("=")
    checked: Role = "official" if role == "official" else "applicant"
    cred = Credential(id=secrets.token_hex(8), role=checked, applicant_id=applicant_id, name=name,
                      created_at=now, expires_at=now + ttl if ttl is not None else None, revoked_at=None)
    with engine.begin() as conn:
        if applicant_id is not None:
            get_applicant(conn, applicant_id)  # ApplicantUnknown (404) for the admin
        conn.execute(insert(api_credentials).values(
            id=cred.id, token_sha256=token_digest(token), role=cred.role, applicant_id=cred.applicant_id,
            name=cred.name, created_at=now, expires_at=cred.expires_at, revoked_at=None))
    log.info("issued %s credential %s (%s) for %s", role, cred.id, name, applicant_id or "every applicant")
    return IssuedCredential(cred, token)


def list_credentials(conn: Connection) -> list[Credential]:
    rows = conn.execute(select(api_credentials).order_by(api_credentials.c.created_at, api_credentials.c.id))
    return [_row_credential(r) for r in rows]


def revoke_credential(engine: Engine, *, now: datetime, credential_id: str | None = None,
                      token: str | None = None) -> Credential:
    """Revoke by public id or by the token itself (a token found where it should not be). Idempotent: revoking
    again keeps the first revocation time."""
    if (credential_id is None) == (token is None):
        raise RequestInvalid("revoke: expected exactly one of a credential id or a token")
    where = (api_credentials.c.id == credential_id if credential_id is not None
             else api_credentials.c.token_sha256 == token_digest(token or ""))
    shown = credential_id[:40] if credential_id is not None else (token or "")[:8] + "…"
    with engine.begin() as conn:
        row = conn.execute(select(api_credentials).where(where)).first()
        if row is None:
            raise CredentialUnknown(f"credential: expected an issued credential, got {shown!r}")
        if row.revoked_at is None:
            conn.execute(update(api_credentials).where(api_credentials.c.id == row.id).values(revoked_at=now))
        row = conn.execute(select(api_credentials).where(api_credentials.c.id == row.id)).one()
    log.info("revoked credential %s (%s)", row.id, row.name)
    return _row_credential(row)


def authenticate(conn: Connection, token: str, *, now: datetime) -> Credential:
    """The live credential a bearer token is; CredentialInvalid when unknown, revoked or expired."""
    if not token.startswith(TOKEN_PREFIX):
        raise CredentialInvalid(f"Authorization: expected 'Bearer {TOKEN_PREFIX}…' (a read credential) or the admin "
                                "token, got another token")
    row = conn.execute(select(api_credentials).where(api_credentials.c.token_sha256 == token_digest(token))).first()
    if row is None:
        raise CredentialInvalid("Authorization: expected a credential issued by this verifier, got an unknown one")
    cred = _row_credential(row)
    if cred.revoked_at is not None:
        raise CredentialInvalid(f"credential {cred.id}: expected a live credential, got one revoked at "
                                f"{cred.revoked_at.isoformat()}")
    if cred.expires_at is not None and cred.expires_at <= now:
        raise CredentialInvalid(f"credential {cred.id}: expected a live credential, got one expired at "
                                f"{cred.expires_at.isoformat()}")
    return cred


# ---- the HTTP side: who is asking ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reader:
    """Who a read request was authenticated as: ``admin``, a credential, or an agent (by its request signature)."""

    kind: Literal["admin", "credential", "agent"]
    credential: Credential | None = None
    agent_id: str | None = None


class NonceCache:
    """The (key id, nonce) pairs of signed requests seen within the signature window, so that each is accepted once.
    Bounded: when full of unexpired nonces, new signed requests are refused until some expire (never forgotten
    early, which would let a replay through). Per process: replicas behind a load balancer each keep their own."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()  # -> forget after (unix), in insertion order
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def first_use(self, key_id: str, nonce: str, *, signed_at: int, now_unix: int) -> bool:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now_unix:
                self._seen.popitem(last=False)
            if (key_id, nonce) in self._seen:
                return False
            if len(self._seen) >= self.max_entries:
                raise RequestSignatureInvalid(f"nonce: too many signed requests in the last {2 * MAX_SKEW_S} s "
                                              f"({self.max_entries}); retry later")
            # a signature made at signed_at is refused as too old after signed_at + MAX_SKEW_S anyway; insertion
            # order is close to expiry order (clocks differ by at most the skew), which bounds the early scan
            self._seen[(key_id, nonce)] = max(signed_at, now_unix) + MAX_SKEW_S
            return True


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        raise CredentialInvalid(f"Authorization: expected 'Bearer <credential>', got the scheme {scheme[:20]!r}")
    if not given.strip():
        raise CredentialInvalid("Authorization: expected 'Bearer <credential>', got 'Bearer' with no credential")
    return given.strip()


_EXPECTED = "Authorization: Bearer <credential> (an applicant's or an official's read credential, or the admin token)"


class ReadGuard:
    """FastAPI dependencies for the read routes. ``applicant`` guards ``/v1/applicants/{applicant_id}/…``;
    ``agent`` guards ``/v1/agents/{agent_id}`` (which also takes the agent's own signed request)."""

    def __init__(self, engine: Engine, *, admin_token: str | None, clock: Callable[[], datetime],
                 nonces: NonceCache | None = None, internal_token: str | None = None) -> None:
        self.engine = engine
        self.admin_token = admin_token
        self.internal_token = internal_token  # held only in this process: the officials' console reading in-process
        self.clock = clock
        self.nonces = nonces or NonceCache()

    def _bearer_reader(self, request: Request) -> Reader | None:
        given = _bearer(request)
        if given is None:
            return None
        for trusted in (self.admin_token, self.internal_token):
            if trusted is not None and hmac.compare_digest(given.encode(), trusted.encode()):
                return Reader("admin")
        with self.engine.connect() as conn:
            return Reader("credential", credential=authenticate(conn, given, now=self.clock()))

    def applicant(self, request: Request, applicant_id: str) -> Reader:
        """(Sync: FastAPI runs it in its thread pool.)"""
        reader = self._bearer_reader(request)
        if reader is None:
            raise CredentialRequired(f"expected {_EXPECTED}, got no Authorization header")
        if reader.credential is not None and not reader.credential.may_read(applicant_id):
            raise CredentialForbidden(f"credential {reader.credential.id}: expected a request for applicant "
                                      f"{reader.credential.applicant_id!r}, got one for {applicant_id[:64]!r}")
        return reader

    def agent(self, request: Request, agent_id: str) -> Reader:
        reader = self._bearer_reader(request)
        if reader is None:
            signed = parse_request_signature(request.headers)
            if signed is None:
                raise CredentialRequired(f"expected {_EXPECTED}, or a request signed by the agent's key "
                                         f"({SIGNATURE_HEADER}), got neither")
            return self._agent_signed(request, agent_id, signed)
        if reader.credential is not None and reader.credential.role == "applicant":
            with self.engine.connect() as conn:
                owner = conn.execute(select(agents.c.applicant_id).where(agents.c.agent_id == agent_id)).scalar()
            if owner != reader.credential.applicant_id:  # another applicant's agent, or none: the same answer
                raise CredentialForbidden(f"credential {reader.credential.id}: expected an agent of applicant "
                                          f"{reader.credential.applicant_id!r}, got {agent_id[:64]!r}")
        return reader

    def _agent_signed(self, request: Request, agent_id: str, signed: RequestSignature) -> Reader:
        now, kid = self.clock(), signed.key_id
        with self.engine.connect() as conn:
            # the agent's current key, or an earlier one still inside its rotation overlap; none once revoked
            found = conn.execute(select(agent_keys.c.agent_id, agent_keys.c.public_key, agent_keys.c.valid_until)
                                 .where(agent_keys.c.key_id == kid)).first()
            if found is None:  # enrolled before keys were tracked: the current key only
                current = conn.execute(select(agents.c.agent_id, agents.c.public_key)
                                       .where(agents.c.key_id == kid)).first()
                found_row = None if current is None else (current.agent_id, bytes(current.public_key), None)
            else:
                found_row = (found.agent_id, bytes(found.public_key), found.valid_until)
            revoked = None if found_row is None else conn.execute(
                select(agents.c.revoked_at).where(agents.c.agent_id == found_row[0])).scalar()
        if found_row is None or revoked is not None or (found_row[2] is not None and found_row[2] <= now):
            raise RequestSignatureInvalid(f"{SIGNATURE_HEADER}: expected a live key of an enrolled agent, got key "
                                          f"{kid[:16]}…, which is unknown, past its rotation overlap or revoked")
        signer, raw, _ = found_row
        public = Ed25519PublicKey.from_public_bytes(raw)
        now_unix = int(now.timestamp())
        check_request_signature(signed, public, method=request.method, path=request.url.path, now_unix=now_unix)
        if not self.nonces.first_use(kid, signed.nonce, signed_at=signed.unix_time, now_unix=now_unix):
            raise RequestSignatureInvalid(f"nonce {signed.nonce[:20]!r}: expected a nonce not used before, got a "
                                          "replayed request")
        if signer != agent_id:
            raise CredentialForbidden(f"{SIGNATURE_HEADER}: expected a request about the signing agent, got agent "
                                      f"{agent_id[:64]!r}")
        return Reader("agent", agent_id=agent_id)
