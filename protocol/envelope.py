"""DSSE envelopes (https://github.com/secure-systems-lab/dsse) signed with Ed25519.

An envelope is the RFC 8785 canonical JSON object
``{"payload": b64, "payloadType": T, "signatures": [{"keyid": K, "sig": b64}]}``; the signature covers
``PAE(T, payload) = "DSSEv1" SP LEN(T) SP T SP LEN(payload) SP payload``. The verifier checks the signature
**before** it parses the payload, and requires canonical envelope bytes so that the envelope hash (which chains
reports) is well defined.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.canonical import canonical_json
from protocol.errors import (
    EnvelopeMalformed,
    EnvelopeNotCanonical,
    KeyUnknown,
    PayloadTypeUnsupported,
    SignatureInvalid,
    TooLarge,
)
from protocol.keys import key_id

REPORT_PAYLOAD_TYPE = "application/vnd.tianping.report.v1+json"
MAX_ENVELOPE_BYTES = 8 * 1024 * 1024
_ENVELOPE_KEYS = {"payload", "payloadType", "signatures"}
# Strings RFC 8785 writes as they are: printable ASCII without '"' and '\\' (no escape, no Unicode to normalize).
_PLAIN = re.compile(r"[ !#-\[\]-~]*")


_CLAIMED_KEYID = re.compile(rb'"keyid"\s*:\s*"([^"\\]{1,128})"')


def claimed_key_id(envelope: bytes) -> str | None:
    """The key id an envelope names, found without parsing it (unverified: for lookups and rate-limit buckets
    only; the signature check reads the parsed envelope)."""
    m = _CLAIMED_KEYID.search(envelope)
    return None if m is None else m.group(1).decode("utf-8", "replace")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def envelope_hash(envelope: bytes) -> str:
    """Lowercase hex SHA-256 of the canonical envelope bytes: what ``prev_hash`` chains to."""
    return hashlib.sha256(envelope).hexdigest()


def _canonical_envelope(payload: str, payload_type: str, kid: str, sig: str) -> bytes:
    """RFC 8785 bytes of an envelope: written directly when every string is plain (the usual case: base64, hex and
    a media type), else by the general canonicalizer. Both give the same bytes (tests/test_protocol.py checks)."""
    if all(_PLAIN.fullmatch(s) for s in (payload, payload_type, kid, sig)):
        return (f'{{"payload":"{payload}","payloadType":"{payload_type}",'
                f'"signatures":[{{"keyid":"{kid}","sig":"{sig}"}}]}}').encode("ascii")
    return canonical_json({"payload": payload, "payloadType": payload_type,
                           "signatures": [{"keyid": kid, "sig": sig}]})


def sign_envelope(payload: bytes, key: Ed25519PrivateKey, *, payload_type: str = REPORT_PAYLOAD_TYPE) -> bytes:
    sig = key.sign(pae(payload_type, payload))
    return canonical_json(
        {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": payload_type,
            "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(sig).decode("ascii")}],
        }
    )


@dataclass(frozen=True, slots=True)
class OpenedEnvelope:
    """An envelope whose signature verified: the payload bytes are authentic, not yet parsed."""

    payload: bytes
    payload_type: str
    key_id: str
    envelope_hash: str


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeMalformed(f"{what}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeMalformed(f"{what}: expected standard base64, got {value[:40]!r}") from exc


def open_envelope(
    envelope: bytes,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    payload_type: str = REPORT_PAYLOAD_TYPE,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> OpenedEnvelope:
    """Verify an envelope's signature against the trusted keys and return the authentic payload bytes.

    Fails closed with a typed error: TooLarge, EnvelopeMalformed, EnvelopeNotCanonical, PayloadTypeUnsupported,
    KeyUnknown, SignatureInvalid. Exactly one signature is expected.
    """
    if len(envelope) > max_bytes:
        raise TooLarge(f"envelope: expected at most {max_bytes} bytes, got {len(envelope)}")
    try:
        obj = json.loads(envelope)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeMalformed(f"envelope: expected a JSON object, got bytes that do not parse ({exc})") from exc
    if not isinstance(obj, dict):
        raise EnvelopeMalformed(f"envelope: expected a JSON object, got {type(obj).__name__}")
    if set(obj) != _ENVELOPE_KEYS:
        raise EnvelopeMalformed(f"envelope: expected exactly the keys {sorted(_ENVELOPE_KEYS)}, got {sorted(obj)}")
    if obj["payloadType"] != payload_type:
        raise PayloadTypeUnsupported(f"payloadType: expected {payload_type!r}, got {obj['payloadType']!r}")
    sigs = obj["signatures"]
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        raise EnvelopeMalformed(f"signatures: expected a list of exactly one object, got {str(sigs)[:80]}")
    if set(sigs[0]) != {"keyid", "sig"}:
        raise EnvelopeMalformed(f"signatures[0]: expected the keys ['keyid', 'sig'], got {sorted(sigs[0])}")
    kid = sigs[0]["keyid"]
    if not isinstance(kid, str):
        raise EnvelopeMalformed(f"signatures[0].keyid: expected a string, got {type(kid).__name__}")
    public = keys.get(kid)
    if public is None:
        raise KeyUnknown(f"signatures[0].keyid: expected a key enrolled with this verifier, got {kid[:64]!r}")
    payload = _b64(obj["payload"], "payload")
    sig = _b64(sigs[0]["sig"], "signatures[0].sig")
    try:
        public.verify(sig, pae(payload_type, payload))
    except InvalidSignature:
        raise SignatureInvalid(f"signature by key {kid[:16]}…: expected a valid Ed25519 signature over the payload, "
                               "got one that does not verify") from None
    if _canonical_envelope(obj["payload"], payload_type, kid, sigs[0]["sig"]) != envelope:
        raise EnvelopeNotCanonical("envelope: expected RFC 8785 canonical JSON bytes, got another encoding")
    return OpenedEnvelope(payload=payload, payload_type=payload_type, key_id=kid, envelope_hash=envelope_hash(envelope))
