"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing and proofs.

leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || left || right). The tree over n leaves splits at the
largest power of two smaller than n. Verification fails closed with :class:`ProofInvalid`, whose message says
what was expected and what arrived; it never returns False.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from protocol.errors import ProtocolError

HASH_BYTES = 32


class ProofInvalid(ProtocolError):
    code = "proof_invalid"


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(leaves: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves, iteratively (no recursion depth limits)."""
    if not leaves:
        return EMPTY_ROOT
    # Fold level by level, carrying the odd node up unchanged: equals the RFC's recursive definition.
    level = list(leaves)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]) over leaf hashes (RFC 9162 2.1.3.1)."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ProofInvalid(f"inclusion proof: expected 0 <= index < {n}, got {index}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(leaves[:k], index), root_from_leaf_hashes(leaves[k:])]
    return [*inclusion_proof(leaves[k:], index - k), root_from_leaf_hashes(leaves[:k])]


def consistency_proof(leaves: Sequence[bytes], size1: int) -> list[bytes]:
    """PROOF(size1, D[n]) over leaf hashes (RFC 9162 2.1.4.1)."""
    n = len(leaves)
    if not 0 < size1 <= n:
        raise ProofInvalid(f"consistency proof: expected 0 < size1 <= {n}, got {size1}")

    def subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
        if m == len(d):
            return [] if b else [root_from_leaf_hashes(d)]
        k = _split(len(d))
        if m <= k:
            return [*subproof(m, d[:k], b), root_from_leaf_hashes(d[k:])]
        return [*subproof(m - k, d[k:], False), root_from_leaf_hashes(d[:k])]

    return subproof(size1, leaves, True)


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_BYTES:
        raise ProofInvalid(f"{what}: expected a {HASH_BYTES}-byte SHA-256 hash, got {len(value)} bytes")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 2.1.3.2: check that ``leaf`` (a leaf hash) is at ``index`` in the tree of ``size`` with ``root``."""
    _check_hash(leaf, "leaf hash")
    _check_hash(root, "root")
    if not 0 <= index < size:
        raise ProofInvalid(f"inclusion proof: expected 0 <= index < size, got index {index}, size {size}")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof[{i}]")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise ProofInvalid(f"inclusion proof: expected at most {len(proof) - 1} components, got {len(proof)}")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofInvalid(f"inclusion proof: expected more components for index {index} in size {size}")
    if r != root:
        raise ProofInvalid(f"inclusion proof: root mismatch (got {r.hex()}, expected {root.hex()})")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """RFC 9162 2.1.4.2: check that the tree of ``size2``/``root2`` extends the tree of ``size1``/``root1``."""
    if size1 > size2:
        raise ProofInvalid(f"consistency proof: expected size1 <= size2, got {size1} > {size2}")
    if size1 == size2:
        if proof:
            raise ProofInvalid(f"consistency proof: expected an empty proof for equal sizes, got {len(proof)}")
        if size1 == 0:
            raise ProofInvalid("consistency proof: expected size1 > 0, got an empty tree (nothing to prove)")
        if root1 != root2:
            raise ProofInvalid(f"consistency proof: equal sizes but roots differ ({root1.hex()} vs {root2.hex()})")
        return
    if size1 == 0:
        raise ProofInvalid("consistency proof: expected size1 > 0, got an empty tree (nothing to prove)")
    _check_hash(root1, "root1")
    _check_hash(root2, "root2")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof[{i}]")
    if not proof:
        raise ProofInvalid(f"consistency proof: expected components for sizes {size1} -> {size2}, got none")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: root1 is the first node
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofInvalid(f"consistency proof: expected fewer components, got {len(proof)}")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofInvalid(f"consistency proof: expected more components for sizes {size1} -> {size2}")
    if fr != root1:
        raise ProofInvalid(f"consistency proof: old root mismatch (got {fr.hex()}, expected {root1.hex()})")
    if sr != root2:
        raise ProofInvalid(f"consistency proof: new root mismatch (got {sr.hex()}, expected {root2.hex()})")


def identifiers_root(identifiers: Iterable[str]) -> bytes:
    """The root a report carries over a period's new identifiers: distinct, sorted, UTF-8 leaves."""
    return root_from_leaf_hashes([leaf_hash(i.encode("utf-8")) for i in sorted(set(identifiers))])
