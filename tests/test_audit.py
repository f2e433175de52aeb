"""Audit bundles: exported by the CLI from a real SQLite ledger, re-verified offline by the CLI; every tampering is
found with its own message (tests named after the attack)."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from protocol.keys import generate_private_key
from protocol.note import NoteSigner
from tests.test_verifier_api import write_test_rules
from tests.test_verifier_core import NOW, AgentSim, _enrolled, bucket, device, uscc
from verifier.audit import audit_bundle
from verifier.checkpoints import ensure_note_key, sign_checkpoint
from verifier.cli import main
from verifier.db import init_db, make_engine
from verifier.enroll import add_applicant, add_enterprise, issue_token
from verifier.ingest import ingest_report


@dataclass
class Ledger:
    engine: Engine
    db_url: str
    rules: Path
    tmp: Path
    sims: list[AgentSim]

    def deliver(self, sim: AgentSim, n: int = 1) -> None:
        for _ in range(n):
            env = sim.next_envelope(devices=[device(f"dev-{sim.agent_id}-{i}", enterprise=uscc(1), start=sim.start)
                                             for i in range(3)],
                                    buckets=[bucket(sim.start + timedelta(minutes=5), count=7)])
            ingest_report(self.engine, env, now=NOW + timedelta(days=10))
            sim.advance(env)

    def export(self, name: str, db_url: str | None = None) -> Path:
        out = self.tmp / name
        code, _ = run_cli("--db", db_url or self.db_url, "export-bundle", "--applicant", "app-1", "--year", "2025",
                          "--out", str(out), "--rules", str(self.rules), "--as-of", "2025-06-10")
        assert code == 0
        return out


def run_cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(list(argv))
    return code, buf.getvalue()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    db_url = f"sqlite:///{tmp_path / 'verifier.sqlite'}"
    engine = make_engine(db_url)
    init_db(engine)
    ensure_note_key(engine)
    add_applicant(engine, applicant_id="app-1", name="示范平台", kind="platform", now=NOW)
    add_enterprise(engine, applicant_id="app-1", uscc=uscc(1), name="企业一", now=NOW)
    add_applicant(engine, applicant_id="app-2", name="另一平台", kind="platform", now=NOW)
    sims = [_enrolled(engine) for _ in range(2)]
    for s in sims:
        s.period = timedelta(days=1)
    other_token = issue_token(engine, applicant_id="app-2", now=NOW).token
    assert other_token  # an applicant whose data must stay out of app-1's bundle
    led = Ledger(engine, db_url, write_test_rules(tmp_path), tmp_path, sims)
    for _ in range(3):
        for s in sims:
            led.deliver(s)
    yield led
    engine.dispose()


def _report_leaves(bundle: Path) -> list[Path]:
    return sorted((bundle / "leaves").glob("*.report.json"))


def test_clean_bundle_audits_without_discrepancy(ledger: Ledger) -> None:
    bundle = ledger.export("b")
    code, out = run_cli("audit", str(bundle))
    assert code == 0, out
    assert out.strip().endswith("0 discrepancies") and "8 leaves proven, 6 reports verified, 2 key events" in out
    verdict = json.loads((bundle / "verdict.json").read_text())
    recomputed = audit_bundle(bundle).verdict
    assert recomputed is not None
    assert [c["value"] for c in recomputed["criteria"]] == [c["value"] for c in verdict["criteria"]]
    assert any(c["value"] for c in verdict["criteria"])  # the reports did count for something


def test_one_flipped_byte_in_an_envelope_is_found(ledger: Ledger) -> None:
    bundle = ledger.export("b")
    target = _report_leaves(bundle)[2]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    code, out = run_cli("audit", str(bundle))
    index = int(target.name.split(".")[0])
    assert code == 1
    assert f"leaf {index} (report): its bytes are not the leaf the signed tree holds at index {index}" in out


def test_a_deleted_entry_is_found(ledger: Ledger) -> None:
    bundle = ledger.export("b")
    target = _report_leaves(bundle)[1]
    target.unlink()
    result = audit_bundle(bundle)
    index = int(target.name.split(".")[0])
    assert f"leaf {index} (report): listed in the manifest but missing from the bundle (deleted?)" in result.problems
    # and when the manifest is edited too, the agent's chain shows the hole
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["leaves"] = [leaf for leaf in manifest["leaves"] if leaf["index"] != index]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    problems = audit_bundle(bundle).problems
    assert any("expected seq" in p and "a report is missing or out of order" in p for p in problems), problems


def test_reordered_entries_are_found(ledger: Ledger) -> None:
    bundle = ledger.export("b")
    first, second = _report_leaves(bundle)[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    problems = audit_bundle(bundle).problems
    for target in (first, second):
        index = int(target.name.split(".")[0])
        assert any(p.startswith(f"leaf {index} (report): its bytes are not the leaf") and "moved" in p
                   for p in problems), problems


def test_bundle_from_an_older_database_snapshot_is_found(ledger: Ledger) -> None:
    snapshot = ledger.tmp / "snapshot.sqlite"
    with sqlite3.connect(ledger.db_url.removeprefix("sqlite:///")) as src, sqlite3.connect(snapshot) as dst:
        src.backup(dst)
    for s in ledger.sims:
        ledger.deliver(s)
    held = sign_checkpoint(ledger.engine, now=NOW)  # the official fetched this one before the rollback
    held_file = ledger.tmp / "held.txt"
    held_file.write_text(held.note)
    bundle = ledger.export("old", db_url=f"sqlite:///{snapshot}")
    code, out = run_cli("audit", str(bundle), "--checkpoint", str(held_file))
    assert code == 1
    assert (f"a checkpoint of size {held.checkpoint.size} was signed, later than the bundle's tree of size "
            f"{held.checkpoint.size - 2}: the bundle comes from an older database snapshot") in out
    # the same bundle audits clean without the official's checkpoint: that is why officials keep them
    assert audit_bundle(bundle).ok


def test_a_bundle_signed_by_another_key_is_refused(ledger: Ledger) -> None:
    bundle = ledger.export("b")
    real_key = json.loads((bundle / "manifest.json").read_text())["verifier_key"]
    other = NoteSigner(real_key.split("+")[0], generate_private_key()).verifier().encode()
    key_file = ledger.tmp / "key.txt"
    key_file.write_text(other)
    code, out = run_cli("audit", str(bundle), "--key", str(key_file))
    assert code == 1 and "checkpoint.txt: expected a checkpoint signed by" in out


def test_an_edited_verdict_is_found(ledger: Ledger) -> None:
    bundle = ledger.export("b")
    verdict = json.loads((bundle / "verdict.json").read_text())
    measured = next(c for c in verdict["criteria"] if c.get("source", "agents") == "agents")
    measured["value"] = 999_999
    (bundle / "verdict.json").write_text(json.dumps(verdict))
    problems = audit_bundle(bundle).problems
    assert any(p.startswith(f"verdict.json: criterion {measured['id']}: the bundle says value/passed (999999")
               for p in problems), problems


def test_export_refuses_an_existing_directory_and_another_applicants_data_stays_out(ledger: Ledger) -> None:
    bundle = ledger.export("b")
    code = main(["--db", ledger.db_url, "export-bundle", "--applicant", "app-1", "--year", "2025", "--out",
                 str(bundle), "--rules", str(ledger.rules)])
    assert code == 2
    agents = {a["agent_id"] for a in json.loads((bundle / "agents.json").read_text())}
    assert agents == {s.agent_id for s in ledger.sims}
    shutil.rmtree(bundle)


def test_cli_init_creates_the_note_key_and_checkpoint_signs_on_demand(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    assert main(["--db", db_url, "init"]) == 0
    code, out = run_cli("--db", db_url, "checkpoint")
    signed = json.loads(out)
    assert code == 0 and signed["size"] == 0 and signed["origin"].startswith("tianping.verifier/")
    assert signed["note"].startswith(signed["origin"] + "\n0\n")
