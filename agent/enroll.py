"""Enrollment: the agent's own Ed25519 key, bound to one applicant with a single-use token."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from agent.errors import EnrollmentRefused, NotEnrolled
from protocol.keys import public_key_b64, read_private_key


@dataclass(frozen=True, slots=True)
class Enrollment:
    agent_id: str
    key_id: str
    applicant_id: str
    enterprise: str | None
    fingerprint_key: str  # base64, issued by the verifier for the whole deployment
    verifier_url: str

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
    )
    save_enrollment(enrollment, enrollment_path)
    return enrollment
