"""Users of the officials' web console, their roles, password hashing and signed session cookies.

Roles:

- ``admin``: applicants, enterprises, enrollment tokens, revocation of agents;
- ``official``: every applicant, verdicts, gates, reports, audit bundles, agents;
- ``operator``: its own applicant only: the agents and their health.

Passwords are hashed with scrypt (``hashlib.scrypt``, n=2**14, r=8, p=1, a 16-byte salt) and compared in constant
time. A session is a cookie ``<base64url(JSON)>.<base64url(HMAC-SHA256)>`` signed with a per-deployment key kept in
the ``settings`` table (shared by every verifier replica); it carries the user, role, applicant, expiry and the
CSRF token that every form must echo. Every function that needs the time takes it (``now``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from verifier.db import settings_table, web_users
from verifier.enroll import get_applicant
from verifier.errors import RequestInvalid

log = logging.getLogger(__name__)

Role = Literal["admin", "official", "operator"]
ROLES: tuple[Role, ...] = ("admin", "official", "operator")
SESSION_KEY_SETTING = "web_session_key"
SESSION_TTL = timedelta(hours=8)
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{1,63}$")
MIN_PASSWORD_CHARS = 10


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64) of ``password``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the stored scrypt hash (constant-time comparison)."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, digest = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        given = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(digest))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(given, digest)


@dataclass(frozen=True, slots=True)
class User:
    username: str
    role: Role
    applicant_id: str | None


def add_user(engine: Engine, *, username: str, password: str, role: str, applicant_id: str | None,
             now: datetime) -> User:
    """Register a console user. An operator must name its applicant; the other roles must not."""
    if not _USERNAME.match(username):
        raise RequestInvalid(f"username: expected 2 to 64 letters, digits or '_.@-', got {username[:80]!r}")
    if role not in ROLES:
        raise RequestInvalid(f"role: expected one of {list(ROLES)}, got {role!r}")
    if len(password) < MIN_PASSWORD_CHARS:
        raise RequestInvalid(f"password: expected at least {MIN_PASSWORD_CHARS} characters, got {len(password)}")
    if (role == "operator") != (applicant_id is not None):
        raise RequestInvalid(f"applicant: expected one for an operator and none for other roles, got "
                             f"{applicant_id!r} for role {role!r}")
    hashed = hash_password(password)
    try:
        with engine.begin() as conn:
            if applicant_id is not None:
                get_applicant(conn, applicant_id)
            conn.execute(insert(web_users).values(username=username, password_hash=hashed, role=role,
                                                  applicant_id=applicant_id, created_at=now))
    except IntegrityError:
        raise RequestInvalid(f"username: expected a new one, got {username!r} already registered") from None
    log.info("added console user %r (%s)", username, role)
    return User(username=username, role=role, applicant_id=applicant_id)


def set_password(engine: Engine, *, username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise RequestInvalid(f"password: expected at least {MIN_PASSWORD_CHARS} characters, got {len(password)}")
    with engine.begin() as conn:
        done = conn.execute(update(web_users).where(web_users.c.username == username)
                            .values(password_hash=hash_password(password)))
    if done.rowcount != 1:
        raise RequestInvalid(f"username: expected a registered user, got {username!r}")


def authenticate(engine: Engine, username: str, password: str) -> User | None:
    """The user, when the name exists, is not disabled and the password matches; otherwise None."""
    with engine.connect() as conn:
        row = conn.execute(select(web_users).where(web_users.c.username == username)).first()
    if row is None:
        verify_password(password, hash_password("timing-equaliser"))  # same cost whether or not the user exists
        return None
    if row.disabled_at is not None or not verify_password(password, row.password_hash):
        return None
    return User(username=row.username, role=row.role, applicant_id=row.applicant_id)


def session_key(engine: Engine) -> bytes:
    """The per-deployment key that signs session cookies; created on first use, shared by all replicas."""
    with engine.connect() as conn:
        value = conn.execute(select(settings_table.c.value)
                             .where(settings_table.c.name == SESSION_KEY_SETTING)).scalar_one_or_none()
    if value is not None:
        return bytes(value)
    try:
        with engine.begin() as conn:
            conn.execute(insert(settings_table).values(name=SESSION_KEY_SETTING, value=secrets.token_bytes(32)))
    except IntegrityError:
        pass  # another replica created it first
    with engine.connect() as conn:
        return bytes(conn.execute(select(settings_table.c.value)
                                  .where(settings_table.c.name == SESSION_KEY_SETTING)).scalar_one())


@dataclass(frozen=True, slots=True)
class Session:
    user: User
    csrf: str
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_session(user: User, key: bytes, *, now: datetime, ttl: timedelta = SESSION_TTL) -> tuple[str, Session]:
    """A signed cookie value and the session it carries (with a fresh CSRF token)."""
    session = Session(user=user, csrf=secrets.token_urlsafe(24), expires_at=now + ttl)
    body = json.dumps({"u": user.username, "r": user.role, "a": user.applicant_id, "c": session.csrf,
                       "x": int(session.expires_at.timestamp())}, separators=(",", ":")).encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(mac)}", session


def read_session(cookie: str | None, key: bytes, *, now: datetime) -> Session | None:
    """The session in a cookie, or None when it is missing, forged, malformed or expired."""
    if not cookie or cookie.count(".") != 1 or len(cookie) > 4096:
        return None
    body_b64, mac_b64 = cookie.split(".")
    try:
        body, mac = _unb64(body_b64), _unb64(mac_b64)
    except (ValueError, binascii.Error):
        return None
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        return None
    try:
        data = json.loads(body)
        role = data["r"]
        expires = datetime.fromtimestamp(int(data["x"]), tz=now.tzinfo)
        user = User(username=str(data["u"]), role=role, applicant_id=data["a"])
        csrf = str(data["c"])
    except (ValueError, KeyError, TypeError):
        return None
    if role not in ROLES or expires <= now:
        return None
    return Session(user=user, csrf=csrf, expires_at=expires)
