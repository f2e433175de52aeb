"""Stable 64-bit hashes of resolution-log fields and the salted sample selection: the one specification the
agent (``connectors/resolution``, which also has a vectorised numpy form that tests hold to this one) and the
verifier (``verifier/node_evidence.py``, which recomputes the choice) share. Pure Python, no I/O.

- ``h64(data)``: the bytes as little-endian 64-bit words ``w_j`` (the last one zero-padded);
  ``h = fmix64(SEED ^ len * K_LEN ^ sum_j g(w_j * M_j))`` modulo 2**64, with ``g(x) = (x ^ x >> 31) * K_WORD``,
  ``M_j`` the odd constants ``M[j % 8] + 2 * (j // 8)`` and ``fmix64`` MurmurHash3's finaliser. ``g(0) = 0``, so
  zero padding adds nothing (which is what lets the vectorised form work on fixed-width rows).
- ``record_hash(ip, handle, utc_ms, op, resp, elapsed)``: one resolution-log record; two lines that differ in
  any of these fields (the handle unescaped, UTF-8; ``elapsed`` is :func:`elapsed_key` of the digits before
  ``ms``) hash apart, a replayed line hashes the same.
- Sample selection under a salt issued by the verifier: stage 1 keeps a record when
  ``fmix64(record_hash ^ k1) < STAGE1``, with ``k1`` the first 8 bytes (little-endian) of
  ``HMAC-SHA256(salt, "tianping/resolution-sample/v1")``; stage 2 keeps it when the first 8 bytes (big-endian) of
  ``HMAC-SHA256(salt, line)`` are below ``rate / STAGE1_RATE * 2**64``. Without the salt the choice cannot be
  predicted (stage 2 is an HMAC); with it, anyone can recompute it from the line.
"""

from __future__ import annotations

import hashlib
import hmac

MASK = (1 << 64) - 1
SEED = 0x9E3779B97F4A7C15
K_LEN = 0xC2B2AE3D27D4EB4F
K_WORD = 0x87C37B91114253D5
F1 = 0xFF51AFD7ED558CCD
F2 = 0xC4CEB9FE1A85EC53
SAMPLE_LABEL = b"tianping/resolution-sample/v1"
STAGE1_RATE_LOG2 = 6  # stage 1 keeps 1 record in 64
STAGE1 = 1 << (64 - STAGE1_RATE_LOG2)


def fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * F1) & MASK
    h ^= h >> 33
    h = (h * F2) & MASK
    h ^= h >> 33
    return h


M = (
    0x9E3779B97F4A7C15,
    0xBF58476D1CE4E5B9,
    0x94D049BB133111EB,
    0xD6E8FEB86659FD93,
    0xA0761D6478BD642F,
    0xE7037ED1A0B428DB,
    0x8EBC6AF09C88C6E3,
    0x589965CC75374CC3,
)


def word_multiplier(j: int) -> int:
    return (M[j % 8] + 2 * (j // 8)) & MASK


def h64(data: bytes) -> int:
    acc = 0
    for j, i in enumerate(range(0, len(data), 8)):
        x = (int.from_bytes(data[i : i + 8].ljust(8, b"\0"), "little") * word_multiplier(j)) & MASK
        acc += ((x ^ (x >> 31)) * K_WORD) & MASK
    return fmix64(SEED ^ ((len(data) * K_LEN) & MASK) ^ (acc & MASK))


def elapsed_key(digits: bytes) -> int:
    """The elapsed-time digits as a little-endian word (up to 8 digits), else their h64."""
    return int.from_bytes(digits, "little") if len(digits) <= 8 else h64(digits)


def record_hash(ip: bytes, handle: bytes, utc_ms: int, op: int, resp: int, elapsed: int) -> int:
    codes = ((op & 0xFFFFFFFF) << 32) | (resp & 0xFFFFFFFF)
    inner = fmix64((codes ^ fmix64(elapsed & MASK)) & MASK)
    inner = fmix64((utc_ms & MASK) ^ inner)
    return fmix64(h64(ip) ^ fmix64(h64(handle) ^ inner))


def sample_key(salt: bytes) -> int:
    return int.from_bytes(hmac.digest(salt, SAMPLE_LABEL, "sha256")[:8], "little")


def stage2_threshold(rate_log2: int) -> int:
    """Stage 2's bound for an overall rate of 2**-rate_log2 (rate_log2 >= STAGE1_RATE_LOG2)."""
    return 1 << (64 - (rate_log2 - STAGE1_RATE_LOG2))


def stage1(rec: int, k1: int) -> bool:
    return fmix64(rec ^ k1) < STAGE1


def stage2(salt: bytes, line: bytes, rate_log2: int) -> bool:
    return int.from_bytes(hmac.digest(salt, line, "sha256")[:8], "big") < stage2_threshold(rate_log2)


def hmac_line(salt: bytes, line: bytes) -> str:
    return hmac.new(salt, line, hashlib.sha256).hexdigest()


def sampled(salt: bytes, rec: int, line: bytes, rate_log2: int) -> bool:
    """Both stages: was the line with record hash ``rec`` due under ``salt`` at one line in 2**rate_log2?"""
    return stage1(rec, sample_key(salt)) and stage2(salt, line, rate_log2)
