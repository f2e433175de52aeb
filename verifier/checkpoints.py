"""Signed checkpoints of the ledger's Merkle tree (C2SP tlog-checkpoint in a C2SP signed note, Ed25519).

The verifier's note key is generated once (at ``init``, or at the first start of an older database) and kept in the
``settings`` table with the log's origin line; its verifier key (``name+keyid+base64``) is public. A checkpoint is
signed only after the new tree was proven (RFC 9162 consistency proof, checked with ``protocol.merkle``) to extend
the last checkpoint signed before: the verifier never signs two views of its history. A refusal raises
:class:`CheckpointInconsistent` and signs nothing.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from protocol import merkle
from protocol.keys import generate_private_key
from protocol.note import Checkpoint, NoteSigner, NoteVerifier, open_note, parse_signer_key, sign_note
from verifier.db import checkpoints, settings_table
from verifier.errors import VerifierError
from verifier.ledger import TreeReader, lock_ledger, tree_size

log = logging.getLogger(__name__)

NOTE_KEY_SETTING = "checkpoint_note_key"
ORIGIN_PREFIX = "tianping.verifier/"


class CheckpointInconsistent(VerifierError):
    """The tree no longer extends a checkpoint signed before (a rolled-back or altered database)."""

    code = "checkpoint_inconsistent"


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    note: str
    signed_at: datetime

    def to_json(self) -> dict[str, object]:
        return {"origin": self.checkpoint.origin, "size": self.checkpoint.size,
                "root": self.checkpoint.root.hex(), "note": self.note, "signed_at": self.signed_at.isoformat()}


def _insert_ignore(conn: Connection) -> object:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(settings_table).on_conflict_do_nothing()
    return sqlite.insert(settings_table).on_conflict_do_nothing()


def ensure_note_key(engine: Engine) -> NoteVerifier:
    """Create the note key (with a fresh origin) if missing; return its public verifier. Idempotent, race-free."""
    with engine.begin() as conn:
        if conn.execute(select(settings_table.c.name).where(settings_table.c.name == NOTE_KEY_SETTING)).first() \
                is None:
            origin = ORIGIN_PREFIX + secrets.token_hex(8)
            signer = NoteSigner(origin, generate_private_key())
            conn.execute(_insert_ignore(conn).values(name=NOTE_KEY_SETTING,  # type: ignore[attr-defined]
                                                     value=signer.encode().encode("ascii")))
            log.info("created the checkpoint note key for origin %r", origin)
    with engine.connect() as conn:
        return note_signer(conn).verifier()


def note_signer(conn: Connection) -> NoteSigner:
    value = conn.execute(select(settings_table.c.value).where(settings_table.c.name == NOTE_KEY_SETTING)).scalar()
    if value is None:
        raise CheckpointInconsistent("settings.checkpoint_note_key: expected the key created at init, got none")
    return parse_signer_key(bytes(value).decode("ascii"))


def latest_checkpoint(conn: Connection) -> SignedCheckpoint | None:
    row = conn.execute(select(checkpoints).order_by(checkpoints.c.id.desc()).limit(1)).first()
    if row is None:
        return None
    return SignedCheckpoint(Checkpoint(note_signer(conn).name, int(row.size), bytes(row.root)), row.note,
                            row.signed_at)


def all_checkpoints(conn: Connection) -> list[SignedCheckpoint]:
    origin = note_signer(conn).name
    return [SignedCheckpoint(Checkpoint(origin, int(r.size), bytes(r.root)), r.note, r.signed_at)
            for r in conn.execute(select(checkpoints).order_by(checkpoints.c.id))]


def check_extends(previous: Checkpoint, size: int, root: bytes, proof: list[bytes]) -> None:
    """Raise CheckpointInconsistent unless the tree (size, root) extends ``previous`` (proof: previous -> size)."""
    if size < previous.size:
        raise CheckpointInconsistent(
            f"tree size: expected at least {previous.size} (a checkpoint signed before), got {size}: "
            "the database is older than a checkpoint it signed (rolled back?)")
    if previous.size == 0:
        return
    try:
        merkle.verify_consistency(previous.size, size, proof, previous.root, root)
    except merkle.ProofInvalid as exc:
        raise CheckpointInconsistent(
            f"tree of size {size}: expected it to extend the checkpoint of size {previous.size} signed before, "
            f"got a tree that does not ({exc})") from None


def sign_checkpoint(engine: Engine, *, now: datetime) -> SignedCheckpoint:
    """Sign a checkpoint of the current tree, after proving it extends the last one signed; store it and return it.

    Returns the last checkpoint unchanged when the tree has not grown since."""
    with engine.begin() as conn:
        size = lock_ledger(conn)
        signer = note_signer(conn)
        reader = TreeReader(conn)
        root = reader.root(size)
        last = latest_checkpoint(conn)
        if last is not None:
            open_note(last.note, signer.verifier())  # the stored note is ours and intact
            if Checkpoint.parse(open_note(last.note, signer.verifier())) != last.checkpoint:
                raise CheckpointInconsistent("checkpoints: the stored note does not match its stored size and root")
            proof = reader.consistency(last.checkpoint.size, size) if 0 < last.checkpoint.size <= size else []
            try:
                check_extends(last.checkpoint, size, root, proof)
            except CheckpointInconsistent as exc:
                log.critical("REFUSING to sign a checkpoint: %s", exc.message)
                raise
            if last.checkpoint.size == size:
                return last
        cp = Checkpoint(signer.name, size, root)
        note = sign_note(cp.body(), signer)
        conn.execute(insert(checkpoints).values(size=size, root=root, note=note, signed_at=now))
    log.info("signed checkpoint %s size %d root %s", cp.origin, size, root.hex())
    return SignedCheckpoint(cp, note, now)


@dataclass
class CheckpointSchedule:
    """Sign every ``every_entries`` new leaves, or every ``every_s`` seconds while leaves are unsigned."""

    every_s: float = 60.0
    every_entries: int = 1000
    _last_size: int = -1
    _last_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.every_s <= 0 or self.every_entries < 1:
            raise ValueError(f"checkpoint schedule: expected every_s > 0 and every_entries >= 1, "
                             f"got {self.every_s}, {self.every_entries}")

    def due(self, size: int, now: datetime) -> bool:
        if self._last_size < 0:
            return True
        if size <= self._last_size:
            return False
        if size - self._last_size >= self.every_entries:
            return True
        return self._last_at is None or now - self._last_at >= timedelta(seconds=self.every_s)

    def maybe_sign(self, engine: Engine, *, now: datetime) -> SignedCheckpoint | None:
        """Sign a checkpoint if one is due (the first call always checks the tree against the last one)."""
        with engine.connect() as conn:
            size = tree_size(conn)
        if not self.due(size, now):
            return None
        signed = sign_checkpoint(engine, now=now)
        self._last_size = signed.checkpoint.size
        self._last_at = now
        return signed
