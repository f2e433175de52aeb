"""Keyed device fingerprints: HMAC-SHA256 under a per-deployment key that the verifier issues.

The same device seen by two agents (or two applicants) of one deployment yields the same fingerprint, so it
counts once, while raw serial numbers never leave the operator's network.
"""

from __future__ import annotations

import hashlib
import hmac

FINGERPRINT_KEY_BYTES = 32


def device_fingerprint(key: bytes, identity_key: str) -> str:
    """Lowercase hex HMAC-SHA256 of the identity's canonical key (``DeviceIdentity.key()``)."""
    if len(key) != FINGERPRINT_KEY_BYTES:
        raise ValueError(f"fingerprint key: expected {FINGERPRINT_KEY_BYTES} bytes, got {len(key)}")
    return hmac.new(key, identity_key.encode("utf-8"), hashlib.sha256).hexdigest()
