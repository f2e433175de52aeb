"""Unified social credit codes (统一社会信用代码, GB 32100-2015): the identity of a served enterprise."""

from __future__ import annotations

import functools

from protocol.errors import ProtocolError

ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
LENGTH = 18


class UsccInvalid(ProtocolError):
    code = "uscc_invalid"


def check_character(body: str) -> str:
    total = sum(ALPHABET.index(c) * w for c, w in zip(body, WEIGHTS, strict=True))
    return ALPHABET[(31 - total % 31) % 31]


@functools.lru_cache(maxsize=1 << 16)  # reports name the same enterprises over and over; refusals are not cached
def validate_uscc(code: str) -> str:
    """Return the code if it is a well-formed USCC with a correct check character; raise UsccInvalid otherwise."""
    if len(code) != LENGTH:
        raise UsccInvalid(f"unified social credit code: expected {LENGTH} characters, got {len(code)} in {code!r}")
    bad = sorted({c for c in code if c not in ALPHABET})
    if bad:
        raise UsccInvalid(f"unified social credit code: expected only {ALPHABET}, got {bad} in {code!r}")
    want = check_character(code[:-1])
    if code[-1] != want:
        raise UsccInvalid(f"unified social credit code {code!r}: expected check character {want!r}, got {code[-1]!r}")
    return code
