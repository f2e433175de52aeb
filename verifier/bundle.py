"""Export of a self-contained audit bundle for one applicant and year (``tianping-verifier export-bundle``).

A bundle is a directory an official can check offline with ``tianping-verifier audit`` (``verifier.audit``)::

    manifest.json       format, applicant, year, as_of, origin, verifier key, tree size, the leaf indexes listed
    checkpoint.txt      the signed checkpoint (C2SP signed note) of the tree every proof refers to
    checkpoints.json    every earlier checkpoint, with a consistency proof to the bundle's tree
    leaves/NNNNNNNNNNNN.report.json     the exact envelope bytes of each of the applicant's reports
    leaves/NNNNNNNNNNNN.key_event.json  the canonical JSON of each key event of the applicant's agents
    proofs.json         the RFC 9162 inclusion proof of every leaf, by tree index
    agents.json         the applicant's agents and the public keys they held
    rules.toml          the rule file the verdict applied (byte for byte)
    verdict.json        the verdict (``verifier.facts.applicant_verdict``)

The tree is the one of a checkpoint signed at export (after the usual consistency check against the last one).
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from verifier.checkpoints import all_checkpoints, note_signer, sign_checkpoint
from verifier.db import agent_keys, agents
from verifier.enroll import get_applicant
from verifier.errors import RequestInvalid
from verifier.facts import applicant_verdict
from verifier.ledger import LEAF_KEY_EVENT, TreeReader, read_leaves
from verifier.rules import load_policy

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "tianping-audit-bundle/1"
LEAVES_DIR = "leaves"


def leaf_file_name(index: int, kind: str) -> str:
    return f"{index:012d}.{kind}.json"


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_bundle(engine: Engine, *, applicant_id: str, year: int, out: Path, rules_path: Path, now: datetime,
                  as_of: date) -> dict[str, Any]:
    """Write the bundle directory ``out`` (which must not exist yet); return its manifest."""
    if out.exists():
        raise RequestInvalid(f"--out: expected a path that does not exist yet, got {str(out)!r}")
    policy = load_policy(rules_path)
    signed = sign_checkpoint(engine, now=now)
    size = signed.checkpoint.size
    with engine.connect() as conn:
        applicant = get_applicant(conn, applicant_id)
        verifier = note_signer(conn).verifier()
        agent_rows = conn.execute(select(agents.c.agent_id, agents.c.name, agents.c.enterprise_uscc)
                                  .where(agents.c.applicant_id == applicant_id).order_by(agents.c.agent_id)).all()
        agent_ids = {r.agent_id for r in agent_rows}
        keys = conn.execute(select(agent_keys).where(agent_keys.c.agent_id.in_(agent_ids))
                            .order_by(agent_keys.c.valid_from)).all()
        # the applicant's leaves: its agents' reports and key events, below the signed size
        indexes: list[int] = []
        reader = TreeReader(conn)
        leaves_dir = out / LEAVES_DIR
        leaves_dir.mkdir(parents=True)
        proofs: dict[str, list[str]] = {}
        kinds: dict[str, str] = {}
        step = 1000
        for start in range(0, size, step):
            for leaf in read_leaves(conn, start, min(size, start + step)):
                if leaf.kind == LEAF_KEY_EVENT:
                    owner = json.loads(leaf.data).get("agent_id")
                else:
                    owner = json.loads(base64.b64decode(json.loads(leaf.data)["payload"])).get("agent_id")
                if owner not in agent_ids:
                    continue
                indexes.append(leaf.tree_index)
                (leaves_dir / leaf_file_name(leaf.tree_index, leaf.kind)).write_bytes(leaf.data)
                proofs[str(leaf.tree_index)] = [p.hex() for p in reader.inclusion(leaf.tree_index, size)]
                kinds[str(leaf.tree_index)] = leaf.kind
        earlier = [{"note": c.note, "size": c.checkpoint.size,
                    "proof_to_tree": [p.hex() for p in reader.consistency(c.checkpoint.size, size)]}
                   for c in all_checkpoints(conn) if 0 < c.checkpoint.size <= size]
    verdict = applicant_verdict(engine, policy, applicant_id, year, as_of=as_of).to_json()
    manifest = {
        "format": BUNDLE_FORMAT,
        "applicant": applicant.to_json(),
        "year": year,
        "as_of": as_of.isoformat(),
        "exported_at": now.isoformat(),
        "origin": verifier.name,
        "verifier_key": verifier.encode(),
        "tree_size": size,
        "leaves": [{"index": i, "kind": kinds[str(i)]} for i in indexes],
        "policy_sha256": policy.sha256,
    }
    _write_json(out / "manifest.json", manifest)
    (out / "checkpoint.txt").write_text(signed.note, encoding="utf-8")
    _write_json(out / "checkpoints.json", earlier)
    _write_json(out / "proofs.json", proofs)
    _write_json(out / "agents.json", [
        {"agent_id": r.agent_id, "name": r.name, "enterprise": r.enterprise_uscc,
         "keys": [{"key_id": k.key_id, "public_key": base64.b64encode(bytes(k.public_key)).decode("ascii")}
                  for k in keys if k.agent_id == r.agent_id]} for r in agent_rows])
    (out / "rules.toml").write_bytes(Path(rules_path).read_bytes())
    _write_json(out / "verdict.json", verdict)
    log.info("exported the audit bundle of %r for %d to %s: %d leaves of a tree of %d", applicant_id,
             year, out, len(indexes), size)
    return manifest
