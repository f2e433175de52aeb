"""RFC 9162 Merkle proofs against the transparency-dev/merkle vectors in shared/testdata, and round trips."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from protocol.merkle import (
    ProofInvalid,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# shared/ lies beside the project's clone, for developers and CI alike.
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "merkle"


def _cases(kind: str) -> list[Path]:
    return sorted((VECTORS / kind).rglob("*.json"))


def _b(s: str) -> bytes:
    return base64.b64decode(s)


def test_vectors_are_present() -> None:
    assert len(_cases("inclusion")) > 40 and len(_cases("consistency")) > 40


@pytest.mark.parametrize("path", _cases("inclusion"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inclusion_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    args = (_b(v["leafHash"]), v["leafIdx"], v["treeSize"], [_b(p) for p in v["proof"] or []], _b(v["root"]))
    if v["wantErr"]:
        with pytest.raises(ProofInvalid):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", _cases("consistency"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_consistency_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    args = (v["size1"], v["size2"], [_b(p) for p in v["proof"] or []], _b(v["root1"]), _b(v["root2"]))
    if v["wantErr"]:
        with pytest.raises(ProofInvalid):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_proofs_we_build_verify_for_every_size_up_to_40() -> None:
    leaves = [leaf_hash(f"entry {i}".encode()) for i in range(40)]
    for n in range(1, 41):
        root = root_from_leaf_hashes(leaves[:n])
        for i in range(n):
            verify_inclusion(leaves[i], i, n, inclusion_proof(leaves[:n], i), root)
        for m in range(1, n + 1):
            verify_consistency(m, n, consistency_proof(leaves[:n], m), root_from_leaf_hashes(leaves[:m]), root)


def test_rewritten_history_fails_consistency() -> None:
    leaves = [leaf_hash(f"entry {i}".encode()) for i in range(10)]
    old_root = root_from_leaf_hashes(leaves[:6])
    forged = [*leaves[:3], leaf_hash(b"rewritten"), *leaves[4:]]
    with pytest.raises(ProofInvalid, match="old root mismatch"):
        verify_consistency(6, 10, consistency_proof(forged, 6), old_root, root_from_leaf_hashes(forged))
