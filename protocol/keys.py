"""Ed25519 keys: generation, raw encoding, key ids, PEM files."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import ProtocolError

RAW_PUBLIC_KEY_BYTES = 32


class KeyFormatInvalid(ProtocolError):
    code = "key_format_invalid"


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_key_bytes(key)).decode("ascii")


def key_id(key: Ed25519PublicKey) -> str:
    """The key id: lowercase hex SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()


def load_public_key_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise KeyFormatInvalid(f"public key: expected base64 of 32 raw Ed25519 bytes, got {text[:60]!r}") from exc
    if len(raw) != RAW_PUBLIC_KEY_BYTES:
        raise KeyFormatInvalid(f"public key: expected {RAW_PUBLIC_KEY_BYTES} raw bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def write_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write a PKCS#8 PEM file readable by its owner only (0600), created atomically; never overwrite."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_key(path: Path) -> Ed25519PrivateKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFormatInvalid(f"{path}: private key must be readable by its owner only (0600), got {mode:04o}")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatInvalid(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key
