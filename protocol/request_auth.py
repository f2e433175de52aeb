"""Requests signed by an agent's Ed25519 key: how an agent reads its own record (``GET /v1/agents/{id}``) without a
bearer credential — it already holds a key the verifier knows, so it needs no second secret.

Three headers::

    X-Tianping-Agent-Time:      <unix seconds>
    X-Tianping-Agent-Nonce:     <16 to 64 characters of [A-Za-z0-9_-], fresh for every request>
    X-Tianping-Agent-Signature: <key id>:<base64 Ed25519 signature>

The signature covers ``SIGNING_CONTEXT \\n METHOD \\n PATH \\n TIME \\n NONCE`` (UTF-8). The context string keeps a
request signature from being taken for any other signed object (DSSE envelopes sign their own PAE encoding). The
verifier accepts a time within ``MAX_SKEW_S`` of its clock and each (key id, nonce) once: an old signature or a
replayed one is refused. Ed25519 is deterministic, so the nonce is also what makes two requests in the same second
differ.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import ProtocolError
from protocol.keys import key_id

SIGNING_CONTEXT = "tianping-agent-request-v1"
TIME_HEADER = "X-Tianping-Agent-Time"
NONCE_HEADER = "X-Tianping-Agent-Nonce"
SIGNATURE_HEADER = "X-Tianping-Agent-Signature"
MAX_SKEW_S = 300

_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{64}$")
_TIME = re.compile(r"^[0-9]{1,12}$")


class RequestSignatureInvalid(ProtocolError):
    """A signed request whose headers are malformed, whose time is too far from the verifier's clock, whose nonce
    was used before, or whose signature does not verify."""

    code = "request_signature_invalid"


@dataclass(frozen=True, slots=True)
class RequestSignature:
    key_id: str
    unix_time: int
    nonce: str
    signature: bytes


def signing_input(method: str, path: str, unix_time: int, nonce: str) -> bytes:
    """The exact bytes an agent signs for one request."""
    return "\n".join((SIGNING_CONTEXT, method.upper(), path, str(unix_time), nonce)).encode("utf-8")


def sign_request(key: Ed25519PrivateKey, method: str, path: str, *, unix_time: int,
                 nonce: str | None = None) -> dict[str, str]:
    """The three headers of a request signed by ``key`` at ``unix_time`` (a fresh random nonce unless given)."""
    nonce = nonce if nonce is not None else secrets.token_urlsafe(18)
    if not _NONCE.match(nonce):
        raise ValueError(f"nonce: expected 16 to 64 characters of [A-Za-z0-9_-], got {nonce!r}")
    sig = key.sign(signing_input(method, path, unix_time, nonce))
    return {TIME_HEADER: str(unix_time), NONCE_HEADER: nonce,
            SIGNATURE_HEADER: f"{key_id(key.public_key())}:{base64.b64encode(sig).decode('ascii')}"}


def parse_request_signature(headers: Mapping[str, str]) -> RequestSignature | None:
    """The signature a request carries; None when it carries none (no signature header); RequestSignatureInvalid
    when the headers are there but malformed. ``headers`` must look names up case-insensitively (as HTTP
    libraries' header mappings do)."""
    value = headers.get(SIGNATURE_HEADER)
    if value is None:
        return None
    kid, sep, sig_b64 = value.partition(":")
    if not sep or not _KEY_ID.match(kid):
        raise RequestSignatureInvalid(f"{SIGNATURE_HEADER}: expected '<64 hex key id>:<base64 signature>', "
                                      f"got {value[:100]!r}")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError):
        sig = b""
    if len(sig) != 64:
        raise RequestSignatureInvalid(f"{SIGNATURE_HEADER}: expected base64 of a 64-byte Ed25519 signature, "
                                      f"got {sig_b64[:100]!r}")
    when = headers.get(TIME_HEADER, "")
    if not _TIME.match(when):
        raise RequestSignatureInvalid(f"{TIME_HEADER}: expected the signing time in unix seconds, got {when[:40]!r}")
    nonce = headers.get(NONCE_HEADER, "")
    if not _NONCE.match(nonce):
        raise RequestSignatureInvalid(f"{NONCE_HEADER}: expected 16 to 64 characters of [A-Za-z0-9_-], "
                                      f"got {nonce[:80]!r}")
    return RequestSignature(key_id=kid, unix_time=int(when), nonce=nonce, signature=sig)


def check_request_signature(sig: RequestSignature, public_key: Ed25519PublicKey, *, method: str, path: str,
                            now_unix: int, max_skew_s: int = MAX_SKEW_S) -> None:
    """Raise RequestSignatureInvalid unless ``sig`` was made by ``public_key`` for this method and path, at a time
    within ``max_skew_s`` of ``now_unix``. (Replays within the window are the verifier's to refuse: it keeps the
    nonces it has seen.)"""
    if abs(now_unix - sig.unix_time) > max_skew_s:
        raise RequestSignatureInvalid(f"{TIME_HEADER}: expected a time within {max_skew_s} s of the verifier's "
                                      f"clock ({now_unix}), got {sig.unix_time} ({sig.unix_time - now_unix:+d} s)")
    try:
        public_key.verify(sig.signature, signing_input(method, path, sig.unix_time, sig.nonce))
    except InvalidSignature:
        raise RequestSignatureInvalid(f"{SIGNATURE_HEADER}: expected a signature by key {sig.key_id[:16]}… over "
                                      f"{method.upper()} {path[:100]} at {sig.unix_time}, got one that does not "
                                      "verify") from None
