"""C2SP signed notes (https://c2sp.org/signed-note) with Ed25519, and tlog checkpoints
(https://c2sp.org/tlog-checkpoint): ``origin\\nsize\\nbase64(root)\\n``.

Key id = the first 4 bytes of SHA-256(name || 0x0A || 0x01 || public key). A signature line is
``— name base64(key id || signature)``. Verification fails closed with :class:`NoteInvalid`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import ProtocolError
from protocol.keys import public_key_bytes

ALG_ED25519 = b"\x01"
SIG_PREFIX = "\u2014 "  # em dash, space


class NoteInvalid(ProtocolError):
    code = "note_invalid"


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise NoteInvalid(f"note key name: expected a non-empty name without spaces or '+', got {name!r}")


def note_key_id(name: str, public: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + ALG_ED25519 + public_key_bytes(public)).digest()[:4]


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    name: str
    key_id: bytes
    public: Ed25519PublicKey

    def encode(self) -> str:
        raw = ALG_ED25519 + public_key_bytes(self.public)
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(raw).decode()}"


@dataclass(frozen=True, slots=True)
class NoteSigner:
    name: str
    private: Ed25519PrivateKey

    @property
    def key_id(self) -> bytes:
        return note_key_id(self.name, self.private.public_key())

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.key_id, self.private.public_key())

    def encode(self) -> str:
        from cryptography.hazmat.primitives import serialization

        seed = self.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{base64.b64encode(ALG_ED25519 + seed).decode()}"


def parse_verifier_key(text: str) -> NoteVerifier:
    parts = text.strip().split("+", 2)
    if len(parts) != 3:
        raise NoteInvalid(f"verifier key: expected 'name+hexkeyid+base64key', got {text[:80]!r}")
    name, hexid, b64 = parts
    _check_name(name)
    try:
        raw = base64.b64decode(b64, validate=True)
        kid = bytes.fromhex(hexid)
    except (binascii.Error, ValueError) as exc:
        raise NoteInvalid(f"verifier key: expected hex key id and base64 key, got {text[:80]!r}") from exc
    if len(raw) != 33 or raw[:1] != ALG_ED25519:
        raise NoteInvalid(f"verifier key: expected 0x01 followed by 32 Ed25519 bytes, got {len(raw)} bytes")
    public = Ed25519PublicKey.from_public_bytes(raw[1:])
    if len(kid) != 4 or note_key_id(name, public) != kid:
        raise NoteInvalid(f"verifier key: key id {hexid!r} does not match the name and key")
    return NoteVerifier(name, kid, public)


def parse_signer_key(text: str) -> NoteSigner:
    parts = text.strip().split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise NoteInvalid("signer key: expected 'PRIVATE+KEY+name+hexkeyid+base64key'")
    name, hexid, b64 = parts[2:]
    _check_name(name)
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 33 or raw[:1] != ALG_ED25519:
        raise NoteInvalid(f"signer key: expected 0x01 followed by a 32-byte Ed25519 seed, got {len(raw)} bytes")
    signer = NoteSigner(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
    if signer.key_id.hex() != hexid:
        raise NoteInvalid(f"signer key: key id {hexid!r} does not match the key (expected {signer.key_id.hex()})")
    return signer


def signature_line(text: str, signer: NoteSigner) -> str:
    if not text.endswith("\n"):
        raise NoteInvalid("note text: expected it to end with a newline")
    sig = signer.private.sign(text.encode("utf-8"))
    return f"{SIG_PREFIX}{signer.name} {base64.b64encode(signer.key_id + sig).decode()}\n"


def sign_note(text: str, signer: NoteSigner) -> str:
    """The whole signed note: text, a blank line, one signature line."""
    return text + "\n" + signature_line(text, signer)


def open_note(note: str, verifier: NoteVerifier) -> str:
    """Return the note's text if a signature by ``verifier`` verifies; raise NoteInvalid otherwise."""
    text, sep, sigs = note.rpartition("\n\n")
    if not sep:
        raise NoteInvalid("signed note: expected text, a blank line and signature lines, got no blank line")
    text += "\n"
    for line in sigs.splitlines():
        if not line.startswith(SIG_PREFIX):
            raise NoteInvalid(f"signed note: expected signature lines starting with an em dash, got {line[:40]!r}")
        name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
        if name != verifier.name:
            continue
        raw = base64.b64decode(b64)
        if raw[:4] != verifier.key_id:
            continue
        try:
            verifier.public.verify(raw[4:], text.encode("utf-8"))
        except InvalidSignature:
            raise NoteInvalid(f"signed note: the signature by {name!r} does not verify") from None
        return text
    raise NoteInvalid(f"signed note: expected a signature by {verifier.name!r}+{verifier.key_id.hex()}, found none")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or not lines[0] or not lines[1].isdigit():
            raise NoteInvalid(f"checkpoint: expected 'origin\\nsize\\nbase64 root\\n', got {text[:80]!r}")
        root = base64.b64decode(lines[2], validate=True)
        if len(root) != 32:
            raise NoteInvalid(f"checkpoint: expected a 32-byte root, got {len(root)} bytes")
        return cls(lines[0], int(lines[1]), root)
