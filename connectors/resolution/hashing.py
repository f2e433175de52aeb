"""Vectorised (numpy) forms of the sampling specification in ``protocol/sampling.py``, which stays the
reference: tests hold the two to the same numbers on simulated logs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from protocol.sampling import F1, F2, K_LEN, K_WORD, SEED, STAGE1, word_multiplier

U64 = np.uint64


# --- vectorised --------------------------------------------------------------------------------------------


def vfmix64(h: Any) -> Any:
    h = h ^ (h >> U64(33))
    h = h * U64(F1)
    h = h ^ (h >> U64(33))
    h = h * U64(F2)
    return h ^ (h >> U64(33))


_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=U64)


def vh64_words(words: Any, lengths: Any) -> Any:
    """h64 of rows of little-endian words (n x k uint64, bytes beyond each row's length ignored)."""
    k = words.shape[1]
    valid = np.clip(lengths[:, None] - 8 * np.arange(k), 0, 8)
    mult = np.array([word_multiplier(j) for j in range(k)], dtype=U64)
    with np.errstate(over="ignore"):
        x = (words & _BYTE_MASKS[valid]) * mult
        x ^= x >> U64(31)
        x *= U64(K_WORD)
        acc = x.sum(axis=1, dtype=U64)
        return vfmix64(U64(SEED) ^ (lengths.astype(U64) * U64(K_LEN)) ^ acc)


def vh64(buf: Any, starts: Any, lengths: Any, width: int) -> Any:
    """h64 of ``buf[starts[i] : starts[i] + lengths[i]]`` for every i; every length must be at most ``width``
    (a multiple of 8)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=U64)
    pad = np.concatenate([buf, np.zeros(width, dtype=np.uint8)])
    rows = np.lib.stride_tricks.sliding_window_view(pad, width)[starts]
    return vh64_words(np.ascontiguousarray(rows).view("<u8"), lengths)


def vrecord_hash(ip_h: Any, handle_h: Any, utc_ms: Any, op: Any, resp: Any, elapsed: Any) -> Any:
    with np.errstate(over="ignore"):
        codes = (op.astype(U64) << U64(32)) | resp.astype(U64)
        inner = vfmix64(codes ^ vfmix64(elapsed.astype(U64)))
        inner = vfmix64(utc_ms.astype(U64) ^ inner)
        return vfmix64(ip_h ^ vfmix64(handle_h ^ inner))


def vstage1(rec: Any, k1: int) -> Any:
    with np.errstate(over="ignore"):
        return vfmix64(rec ^ U64(k1)) < U64(STAGE1)


def to_signed(values: Any) -> list[int]:
    """uint64 hashes as Python ints in the signed 64-bit range (what DataSketches' update(int) takes)."""
    out: list[int] = np.asarray(values, dtype=U64).view(np.int64).tolist()
    return out


def signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value
