"""The stateless half of verification (size, signature, canonical bytes, schema, the facts a report carries) for a
batch of envelopes, spread over worker processes.

Ed25519 verification is most of the CPU a report costs, and ``cryptography`` holds the GIL while it verifies, so
threads cannot share it out; processes can. The verifier's single writer hands each large batch to the pool in one
chunk per worker, together with the public keys the envelopes name (raw bytes: a worker holds no database
connection), and gets back, per envelope, a compact :class:`Opened` or the protocol error that refuses it. The
stateful half (key still valid, binding, sequence, chain, time) stays with the writer, inside its transaction
(:mod:`verifier.ingest`). Small batches are verified in the writer itself: a round trip to a worker costs more
than it saves there.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.envelope import MAX_ENVELOPE_BYTES
from protocol.errors import ProtocolError
from verifier.core import ReportHead, leaf_hash, open_report
from verifier.facts import CompactFacts, compact_facts, derive_facts

log = logging.getLogger(__name__)

DEFAULT_MIN_BATCH = 32  # below this many envelopes, verify in the calling process
_KEY_CACHE_MAX = 10_000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class Opened(NamedTuple):
    """An authentic, schema-valid report envelope, reduced to what the writer needs, as plain values (pickling
    dataclasses and aware datetimes back from a worker cost the writer more than parsing the report again)."""

    key_id: str  # the signing key
    envelope_hash: str
    leaf_hash: str
    agent_id: str
    report_key_id: str
    seq: int
    prev_hash: str
    period_start_us: int  # microseconds since the epoch (UTC)
    period_end_us: int
    facts: CompactFacts  # no applicant: the writer knows it from the key

    @property
    def head(self) -> ReportHead:
        return ReportHead(agent_id=self.agent_id, key_id=self.report_key_id, seq=self.seq, prev_hash=self.prev_hash,
                          period_start=_EPOCH + self.period_start_us * _US,
                          period_end=_EPOCH + self.period_end_us * _US)


_keys: dict[bytes, Ed25519PublicKey] = {}  # per process: raw public key -> key object


class _RawKeys(Mapping[str, Ed25519PublicKey]):
    def __init__(self, raw: Mapping[str, bytes]) -> None:
        self._raw = raw

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        raw = self._raw[kid]
        key = _keys.get(raw)
        if key is None:
            if len(_keys) >= _KEY_CACHE_MAX:
                _keys.clear()
            key = _keys[raw] = Ed25519PublicKey.from_public_bytes(raw)
        return key

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def open_envelopes(envelopes: Sequence[bytes], public_keys: Mapping[str, bytes],
                   max_bytes: int = MAX_ENVELOPE_BYTES) -> list[Opened | ProtocolError]:
    """Rules 1-3 of :func:`verifier.core.verify_report` for each envelope, against the raw public keys by key id."""
    keys = _RawKeys(public_keys)
    out: list[Opened | ProtocolError] = []
    for envelope in envelopes:
        try:
            opened, report = open_report(envelope, keys, max_bytes=max_bytes)
        except ProtocolError as exc:
            out.append(exc)
            continue
        period = report.period
        out.append(Opened(opened.key_id, opened.envelope_hash, leaf_hash(envelope), report.agent_id, report.key_id,
                          report.seq, report.prev_hash, (period.start - _EPOCH) // _US, (period.end - _EPOCH) // _US,
                          compact_facts(derive_facts(report, ""))))
    return out


def _exit_with(parent: int) -> None:
    """Worker initializer: leave as soon as the verifier that started us is gone (even after kill -9, which no
    shutdown hook sees), instead of lingering as an orphan."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class VerifyPool:
    """``workers`` processes (started on first use, spawned: the verifier runs threads) for batches of at least
    ``min_batch`` envelopes; 0 workers verifies everything in the calling process."""

    def __init__(self, workers: int, *, min_batch: int = DEFAULT_MIN_BATCH) -> None:
        if workers < 0 or min_batch < 1:
            raise ValueError(f"verify pool: expected workers >= 0 and min_batch >= 1, got {workers}, {min_batch}")
        self.workers, self.min_batch = workers, min_batch
        self._executor: ProcessPoolExecutor | None = None

    def open(self, envelopes: Sequence[bytes], public_keys: Mapping[str, bytes],
             max_bytes: int = MAX_ENVELOPE_BYTES) -> list[Opened | ProtocolError]:
        if self.workers == 0 or len(envelopes) < self.min_batch:
            return open_envelopes(envelopes, public_keys, max_bytes)
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_exit_with, initargs=(os.getpid(),))
            log.info("verifying large batches in %d worker processes", self.workers)
        size = -(-len(envelopes) // self.workers)
        keys = dict(public_keys)
        try:
            futures = [self._executor.submit(open_envelopes, envelopes[i:i + size], keys, max_bytes)
                       for i in range(0, len(envelopes), size)]
            return [opened for future in futures for opened in future.result()]
        except BrokenProcessPool:  # a worker died (killed, out of memory): this batch inline, a fresh pool next
            log.error("a verify worker process died; verifying this batch of %d in the writer", len(envelopes))
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            return open_envelopes(envelopes, public_keys, max_bytes)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
