"""Enrollment: the agent's own Ed25519 key, bound to one applicant with a single-use token."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import EnrollmentRefused, NotEnrolled
from protocol.canonical import canonical_json
from protocol.envelope import sign_envelope
from protocol.keys import generate_private_key, key_id, public_key_b64, read_private_key, write_private_key
from protocol.request_auth import sign_request


@dataclass(frozen=True, slots=True)
class Enrollment:
    agent_id: str
    key_id: str
    applicant_id: str
    enterprise: str | None
    fingerprint_key: str  # base64, issued by the verifier for the whole deployment
    verifier_url: str
    resolution_salt: str | None = None  # base64, issued by the verifier for this agent (None: enrolled before salts)

    @property
    def fingerprint_key_bytes(self) -> bytes:
        return base64.b64decode(self.fingerprint_key)


def save_enrollment(enrollment: Enrollment, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(enrollment), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_enrollment(path: Path) -> Enrollment:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotEnrolled(f"{path}: this agent is not enrolled yet (run 'tianping-agent enroll')") from None
    return Enrollment(**raw)


def enroll(
    *, key_path: Path, enrollment_path: Path, verifier_url: str, token: str, agent_name: str, timeout_s: float = 10.0
) -> Enrollment:
    """Send the public key with the token; store what the verifier answers. Refuses to enroll twice."""
    if enrollment_path.exists():
        current = load_enrollment(enrollment_path)
        raise EnrollmentRefused(
            f"{enrollment_path}: already enrolled as agent {current.agent_id!r}; a new binding needs an admin action"
        )
    key = read_private_key(key_path)
    body = {"token": token, "public_key": public_key_b64(key.public_key()), "agent_name": agent_name}
    url = verifier_url.rstrip("/")
    resp = httpx.post(f"{url}/v1/enroll", json=body, timeout=timeout_s)
    if resp.status_code != 201:
        try:
            err = resp.json()["error"]
            detail = f"{err['code']}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            detail = resp.text[:200]
        raise EnrollmentRefused(f"the verifier refused enrollment with HTTP {resp.status_code} ({detail})")
    got = resp.json()
    enrollment = Enrollment(
        agent_id=got["agent_id"],
        key_id=got["key_id"],
        applicant_id=got["applicant_id"],
        enterprise=got.get("enterprise"),
        fingerprint_key=got["fingerprint_key"],
        verifier_url=url,
        resolution_salt=got.get("resolution_salt"),
    )
    save_enrollment(enrollment, enrollment_path)
    return enrollment


# ---- issue 5: key rotation, signed by the old key -------------------------------------------------------------------
ROTATION_PAYLOAD_TYPE = "application/vnd.tianping.key-rotation.v1+json"  # = verifier.enroll.ROTATION_PAYLOAD_TYPE


def read_own_record(url: str, agent_id: str, keys: Sequence[Ed25519PrivateKey], *, now: datetime,
                    timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The verifier's record of this agent (``GET /v1/agents/{id}``), read with a request signed by the agent's own
    key (``protocol.request_auth``; no bearer credential needed). ``keys`` are tried in order — the current key,
    then the one a rotation is replacing — and None is answered when the verifier accepts none of them."""
    path = f"/v1/agents/{agent_id}"
    for key in keys:
        headers = sign_request(key, "GET", path, unix_time=int(now.timestamp()))
        resp = httpx.get(f"{url}{path}", headers=headers, timeout=timeout_s)
        if resp.status_code == 200:
            record: dict[str, Any] = resp.json()
            return record
    return None


def _current_key_id(url: str, agent_id: str, keys: Sequence[Ed25519PrivateKey], now: datetime,
                    timeout_s: float) -> str | None:
    record = read_own_record(url, agent_id, keys, now=now, timeout_s=timeout_s)
    value = None if record is None else record.get("key_id")
    return value if isinstance(value, str) else None


def rotate_key(*, key_path: Path, enrollment_path: Path, now: datetime, timeout_s: float = 10.0) -> Enrollment:
    """Make a new key, have the verifier bind it with a request signed by the current key, then switch to it.

    Crash-safe: the new key is written (0600, fsync) before the request and reused by a retry; when the verifier
    already holds the new key, only the local switch is finished. The old key is kept as ``<key>.old``; reports
    already signed with it stay valid for the verifier's overlap window. A running agent picks the new key up at
    its next start.
    """
    enrollment = load_enrollment(enrollment_path)
    old = read_private_key(key_path)
    new_path = key_path.with_name(key_path.name + ".new")
    if new_path.exists():
        new = read_private_key(new_path)
    else:
        new = generate_private_key()
        write_private_key(new, new_path)
    new_kid = key_id(new.public_key())
    url = enrollment.verifier_url
    # signed by the old key; by the new one when a crashed earlier attempt already had it bound
    if _current_key_id(url, enrollment.agent_id, (old, new), now, timeout_s) != new_kid:
        payload = canonical_json({"agent_id": enrollment.agent_id, "old_key_id": key_id(old.public_key()),
                                  "new_public_key": public_key_b64(new.public_key()),
                                  "created_at": now.isoformat()})
        resp = httpx.post(f"{url}/v1/agents/{enrollment.agent_id}/rotate",
                          content=sign_envelope(payload, old, payload_type=ROTATION_PAYLOAD_TYPE),
                          headers={"Content-Type": "application/json"}, timeout=timeout_s)
        if resp.status_code != 200:
            raise EnrollmentRefused(f"the verifier refused the key rotation with HTTP {resp.status_code} "
                                    f"({_detail(resp)})")
    old_copy = key_path.with_name(key_path.name + ".old")
    if old_copy.exists():
        old_copy.unlink()
    os.link(key_path, old_copy)
    os.replace(new_path, key_path)
    rotated = replace(enrollment, key_id=new_kid)
    save_enrollment(rotated, enrollment_path)
    return rotated


def _detail(resp: httpx.Response) -> str:
    try:
        err = resp.json()["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
