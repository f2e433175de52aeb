"""The offline audit of a bundle (``tianping-verifier audit BUNDLE``): trust nothing but the verifier's public note
key (given by the official with ``--key``, or the one the bundle names) and checkpoints the official already holds.

Checked, each failure reported as one discrepancy (the audit goes on to find the others):

1. the signed checkpoint verifies under the note key and names the bundle's origin and tree size;
2. every checkpoint the official holds (``--checkpoint``) and every earlier one in the bundle is consistent with
   the bundle's tree (RFC 9162 consistency proof); one of a *larger* size means the bundle was cut from an older
   database snapshot;
3. every leaf the manifest lists is present, hashes (SHA-256(0x00‖bytes)) to a leaf the signed tree holds at its
   index (inclusion proof), and no unlisted leaf is present;
4. key events: the keys each agent held come from enrollment and rotation events in the tree; a revoked agent has
   no report after its revocation;
5. reports: every DSSE signature verifies under a key its agent held, the report parses, and each agent's chain
   runs seq 1, 2, 3, … with ``prev_hash`` the SHA-256 of the previous envelope, in tree order;
6. the facts are re-derived from the verified reports (``verifier.facts.derive_facts`` and ``write_facts`` into a
   scratch SQLite database — the same code the verifier runs at ingest) and the verdict recomputed with
   ``verifier.facts.applicant_verdict`` (the pure ``verifier.eligibility.evaluate``) under the bundled rule file;
   every measured criterion's value and result must equal the bundled verdict's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import insert

from protocol import merkle
from protocol.envelope import open_envelope
from protocol.errors import ProtocolError
from protocol.keys import load_public_key_b64
from protocol.note import Checkpoint, NoteInvalid, NoteVerifier, open_note, parse_verifier_key
from protocol.report import GENESIS_HASH, ReportV1, parse_report
from verifier.bundle import BUNDLE_FORMAT, LEAVES_DIR, leaf_file_name
from verifier.db import applicants, make_engine, metadata
from verifier.facts import applicant_verdict, derive_facts, write_facts
from verifier.rules import parse_policy

log = logging.getLogger(__name__)


@dataclass
class AuditReport:
    problems: list[str] = field(default_factory=list)
    leaves_checked: int = 0
    reports_verified: int = 0
    key_events: int = 0
    tree_size: int = 0
    verdict: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, message: str) -> None:
        log.warning("audit: %s", message)
        self.problems.append(message)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "tree_size": self.tree_size,
                "leaves_checked": self.leaves_checked, "reports_verified": self.reports_verified,
                "key_events": self.key_events}


@dataclass
class _AgentKeys:
    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked_at_index: int | None = None
    applicant_id: str | None = None


def _read_json(path: Path, report: AuditReport) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        report.problem(f"{path.name}: expected a readable JSON file, got {exc}")
        return None


def _open_checkpoint(note: str, verifier: NoteVerifier, what: str, report: AuditReport) -> Checkpoint | None:
    try:
        cp = Checkpoint.parse(open_note(note, verifier))
    except (NoteInvalid, ValueError) as exc:
        report.problem(f"{what}: expected a checkpoint signed by {verifier.name}, got one that does not verify "
                       f"({exc})")
        return None
    if cp.origin != verifier.name:
        report.problem(f"{what}: expected origin {verifier.name!r}, got {cp.origin!r}")
        return None
    return cp


def _check_earlier(cp: Checkpoint, tree: Checkpoint, proof: Sequence[bytes] | None, what: str,
                   report: AuditReport) -> None:
    if cp.size > tree.size:
        report.problem(f"{what}: a checkpoint of size {cp.size} was signed, later than the bundle's tree of size "
                       f"{tree.size}: the bundle comes from an older database snapshot (or history was cut)")
        return
    if cp.size == tree.size:
        if cp.root != tree.root:
            report.problem(f"{what}: same size {cp.size} as the bundle's tree but another root "
                           f"({cp.root.hex()} vs {tree.root.hex()}): two histories were signed")
        return
    if proof is None:
        report.problem(f"{what}: no consistency proof from size {cp.size} to {tree.size} in the bundle")
        return
    try:
        merkle.verify_consistency(cp.size, tree.size, proof, cp.root, tree.root)
    except merkle.ProofInvalid as exc:
        report.problem(f"{what}: the bundle's tree does not extend the checkpoint of size {cp.size} ({exc})")


def audit_bundle(path: Path, *, key: str | None = None, held_checkpoints: Sequence[str] = ()) -> AuditReport:
    """Re-verify a bundle offline; return every discrepancy found (``AuditReport.ok`` when there is none)."""
    report = AuditReport()
    manifest = _read_json(path / "manifest.json", report)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        report.problem(f"manifest.json: expected format {BUNDLE_FORMAT!r}, got {str(manifest)[:80]}")
        return report
    try:
        verifier = parse_verifier_key(key or manifest["verifier_key"])
    except (NoteInvalid, KeyError) as exc:
        report.problem(f"verifier key: expected 'name+keyid+base64', got an unusable one ({exc})")
        return report
    if key is not None and manifest.get("verifier_key") != verifier.encode():
        report.problem(f"manifest.json: names verifier key {manifest.get('verifier_key')!r}, expected the one given "
                       f"({verifier.encode()})")
    tree = _open_checkpoint((path / "checkpoint.txt").read_text(encoding="utf-8"), verifier, "checkpoint.txt",
                            report)
    if tree is None:
        return report
    report.tree_size = tree.size
    if manifest.get("tree_size") != tree.size:
        report.problem(f"manifest.json: tree_size {manifest.get('tree_size')} differs from the signed checkpoint's "
                       f"{tree.size}")

    earlier = _read_json(path / "checkpoints.json", report) or []
    proofs_to_tree: dict[int, list[bytes]] = {}
    for i, item in enumerate(earlier):
        cp = _open_checkpoint(item.get("note", ""), verifier, f"checkpoints.json[{i}]", report)
        if cp is None:
            continue
        proof = [bytes.fromhex(p) for p in item.get("proof_to_tree", [])]
        proofs_to_tree[cp.size] = proof
        _check_earlier(cp, tree, proof, f"checkpoints.json[{i}]", report)
    for i, note in enumerate(held_checkpoints):
        cp = _open_checkpoint(note, verifier, f"held checkpoint {i + 1}", report)
        if cp is not None:
            _check_earlier(cp, tree, proofs_to_tree.get(cp.size), f"held checkpoint {i + 1} (size {cp.size})",
                           report)

    leaves = _check_leaves(path, manifest, tree, report)
    reports = _check_keys_and_chains(leaves, str(manifest.get("applicant", {}).get("id")), report)
    _check_verdict(path, manifest, reports, report)
    return report


def _check_leaves(path: Path, manifest: dict[str, Any], tree: Checkpoint,
                  report: AuditReport) -> list[tuple[int, str, bytes]]:
    proofs = _read_json(path / "proofs.json", report) or {}
    listed = manifest.get("leaves", [])
    listed_names = {leaf_file_name(int(item["index"]), str(item["kind"])) for item in listed}
    present = {p.name for p in (path / LEAVES_DIR).glob("*.json")}
    for extra in sorted(present - listed_names):
        report.problem(f"{LEAVES_DIR}/{extra}: a leaf the manifest does not list")
    out: list[tuple[int, str, bytes]] = []
    previous = -1
    for item in listed:
        index, kind = int(item["index"]), str(item["kind"])
        if index <= previous:
            report.problem(f"manifest.json: leaf {index} listed after leaf {previous}: expected tree order")
        previous = index
        file = path / LEAVES_DIR / leaf_file_name(index, kind)
        if not file.exists():
            report.problem(f"leaf {index} ({kind}): listed in the manifest but missing from the bundle (deleted?)")
            continue
        data = file.read_bytes()
        leaf = merkle.leaf_hash(data)
        try:
            merkle.verify_inclusion(leaf, index, tree.size, [bytes.fromhex(p) for p in proofs.get(str(index), [])],
                                    tree.root)
        except (merkle.ProofInvalid, ValueError) as exc:
            report.problem(f"leaf {index} ({kind}): its bytes are not the leaf the signed tree holds at index "
                           f"{index} (altered, or moved from another index): {exc}")
            continue
        report.leaves_checked += 1
        out.append((index, kind, data))
    return out


def _check_keys_and_chains(leaves: list[tuple[int, str, bytes]], applicant_id: str,
                           report: AuditReport) -> list[ReportV1]:
    agents: dict[str, _AgentKeys] = {}
    verified: list[ReportV1] = []
    chains: dict[str, tuple[int, str, int]] = {}  # agent -> (last seq, last envelope hash, tree index)
    for index, kind, data in leaves:
        if kind == "key_event":
            report.key_events += 1
            event = json.loads(data)
            state = agents.setdefault(str(event.get("agent_id")), _AgentKeys())
            state.applicant_id = event.get("applicant_id")
            if event.get("applicant_id") != applicant_id:
                report.problem(f"leaf {index}: key event for applicant {event.get('applicant_id')!r}, expected "
                               f"{applicant_id!r}")
            if event.get("event") in ("enroll", "rotate") and event.get("public_key"):
                state.keys[str(event["key_id"])] = load_public_key_b64(event["public_key"])
            elif event.get("event") == "revoke":
                state.revoked_at_index = index
            continue
        all_keys = {kid: pub for a in agents.values() for kid, pub in a.keys.items()}
        try:
            opened = open_envelope(data, all_keys)
            parsed = parse_report(opened.payload)
        except ProtocolError as exc:
            report.problem(f"leaf {index}: the report does not verify under the keys its agents were enrolled "
                           f"with ({exc.code}: {exc})")
            continue
        agent = agents.get(parsed.agent_id)
        if agent is None or opened.key_id not in agent.keys:
            report.problem(f"leaf {index}: signed by key {opened.key_id[:16]}…, which agent {parsed.agent_id!r} "
                           "never held")
            continue
        if agent.revoked_at_index is not None:
            report.problem(f"leaf {index}: report of agent {parsed.agent_id!r} after its revocation at leaf "
                           f"{agent.revoked_at_index}")
        last_seq, last_hash, last_index = chains.get(parsed.agent_id, (0, GENESIS_HASH, -1))
        if parsed.seq != last_seq + 1:
            where = f"after seq {last_seq} (leaf {last_index})" if last_seq else "as the agent's first report"
            report.problem(f"leaf {index}: agent {parsed.agent_id!r} seq {parsed.seq} {where}: expected seq "
                           f"{last_seq + 1} (a report is missing or out of order)")
        elif parsed.prev_hash != last_hash:
            report.problem(f"leaf {index}: agent {parsed.agent_id!r} seq {parsed.seq}: prev_hash "
                           f"{parsed.prev_hash[:16]}… does not chain to the previous envelope {last_hash[:16]}…")
        chains[parsed.agent_id] = (parsed.seq, hashlib.sha256(data).hexdigest(), index)
        report.reports_verified += 1
        verified.append(parsed)
    return verified


def _measured(verdict: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {str(c["id"]): (c.get("value"), c.get("passed")) for c in verdict.get("criteria", [])
            if c.get("source", "agents") == "agents"}


def _check_verdict(path: Path, manifest: dict[str, Any], reports: list[ReportV1], report: AuditReport) -> None:
    rules = (path / "rules.toml").read_bytes()
    if hashlib.sha256(rules).hexdigest() != manifest.get("policy_sha256"):
        report.problem(f"rules.toml: SHA-256 {hashlib.sha256(rules).hexdigest()[:16]}… differs from the manifest's "
                       f"{str(manifest.get('policy_sha256'))[:16]}…")
    bundled = _read_json(path / "verdict.json", report)
    applicant = manifest["applicant"]
    policy = parse_policy(rules, "rules.toml")
    with tempfile.TemporaryDirectory(prefix="tianping-audit-") as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'facts.sqlite'}")
        try:
            metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(insert(applicants).values(id=applicant["id"], name=applicant["name"],
                                                       kind=applicant["kind"], created_at=datetime.now(UTC)))
                for r in reports:
                    write_facts(conn, derive_facts(r, applicant["id"]))
            verdict = applicant_verdict(engine, policy, applicant["id"], int(manifest["year"]),
                                        as_of=date.fromisoformat(manifest["as_of"])).to_json()
        finally:
            engine.dispose()
    report.verdict = verdict
    if not isinstance(bundled, dict):
        return
    if verdict.get("policy", {}).get("sha256") != bundled.get("policy", {}).get("sha256"):
        report.problem("verdict.json: computed under another rule file than rules.toml")
    mine, theirs = _measured(verdict), _measured(bundled)
    for cid in sorted(set(mine) | set(theirs)):
        if mine.get(cid) != theirs.get(cid):
            report.problem(f"verdict.json: criterion {cid}: the bundle says value/passed {theirs.get(cid)}, the "
                           f"reports give {mine.get(cid)}")
    if verdict.get("beside") != bundled.get("beside"):
        report.problem(f"verdict.json: 'beside' {bundled.get('beside')} differs from the recomputed "
                       f"{verdict.get('beside')}")


def load_held_checkpoints(paths: Sequence[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in paths]


def audit_main(bundle: Path, *, key_file: Path | None, checkpoint_files: Sequence[Path], as_json: bool,
               out: Any) -> int:
    """``tianping-verifier audit``: print each discrepancy (or the summary as JSON); 0 when none, 1 otherwise."""
    key = key_file.read_text(encoding="utf-8").strip() if key_file is not None else None
    result = audit_bundle(bundle, key=key, held_checkpoints=load_held_checkpoints(checkpoint_files))
    if as_json:
        out.write(json.dumps(result.to_json(), ensure_ascii=False, indent=2) + "\n")
    else:
        for problem in result.problems:
            out.write(f"DISCREPANCY: {problem}\n")
        out.write(f"{'OK' if result.ok else 'FAILED'}: tree size {result.tree_size}, {result.leaves_checked} leaves "
                  f"proven, {result.reports_verified} reports verified, {result.key_events} key events, "
                  f"{len(result.problems)} discrepancies\n")
    return 0 if result.ok else 1
