"""C2SP signed notes: the shared vector byte for byte, and refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.keys import generate_private_key
from protocol.note import (
    Checkpoint,
    NoteInvalid,
    NoteSigner,
    open_note,
    parse_signer_key,
    parse_verifier_key,
    sign_note,
    signature_line,
)

VECTOR = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "signed-note.txt"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"


def _field(name: str) -> str:
    m = re.search(rf"^{name}: (.+)$", VECTOR.read_text(), re.M)
    assert m, f"{name} missing from {VECTOR}"
    return m.group(1).split(" ")[0] if name != "signature (base64 of keyid || signature)" else m.group(1)


def test_shared_vector_reproduced_byte_for_byte() -> None:
    signer = parse_signer_key(_field("signer-key"))
    verifier = parse_verifier_key(_field("verifier-key"))
    assert signer.verifier().encode() == _field("verifier-key")
    assert signer.encode() == _field("signer-key")
    line = signature_line(TEXT, signer)
    assert line == f"\u2014 PeterNeumann {_field(re.escape('signature (base64 of keyid || signature)'))}\n"
    assert open_note(sign_note(TEXT, signer), verifier) == TEXT


def test_note_with_changed_text_is_refused() -> None:
    signer = NoteSigner("tianping.example/ledger", generate_private_key())
    note = sign_note("tianping.example/ledger\n5\n" + "A" * 43 + "=\n", signer)
    with pytest.raises(NoteInvalid, match="does not verify"):
        open_note(note.replace("\n5\n", "\n6\n"), signer.verifier())


def test_note_signed_by_another_key_is_refused() -> None:
    a = NoteSigner("tianping", generate_private_key())
    b = NoteSigner("tianping", generate_private_key())
    with pytest.raises(NoteInvalid, match="found none"):
        open_note(sign_note("x\n", b), a.verifier())


def test_checkpoint_round_trip() -> None:
    cp = Checkpoint("tianping.example/ledger", 12, bytes(range(32)))
    assert Checkpoint.parse(cp.body()) == cp
    with pytest.raises(NoteInvalid, match="expected a 32-byte root"):
        Checkpoint.parse("o\n1\nAAAA\n")
