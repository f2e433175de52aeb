"""The agent at work: collection rounds, period roll-ups, signing into the outbox, delivery.

Time is injected: ``collect_round(now=...)`` and ``close_period(end=...)`` take the time they act for, so the
scheduler drives them with the wall clock and tests (or the demo's compressed-time history) with their own.
A report period never crosses midnight in the agent's time zone; resolution buckets of minutes at or after a
period's end are carried into the next period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from types import TracebackType
from typing import Any, Self

from agent.config import AgentConfig
from agent.delivery import Deliverer, DeliveryResult
from agent.enroll import Enrollment, load_enrollment
from agent.outbox import Outbox, OutboxItem
from agent.rollup import MergedDevice, PeriodRollup, ScanSummary, merge_observations, summarize
from connectors.base import ConnectorError, DeviceObservation
from connectors.registry import DEVICE_KINDS, connector_class
from protocol.envelope import sign_envelope
from protocol.keys import read_private_key
from protocol.report import Period, ReportV1

log = logging.getLogger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


def build_connectors(config: AgentConfig) -> list[Any]:
    """Instantiate every configured connector; a configuration error raises here, before anything runs."""
    built = []
    for kind, tables in config.connectors.items():
        cls = connector_class(kind)
        for i, table in enumerate(tables):
            try:
                built.append(cls.from_config(table))
            except ConnectorError as exc:
                raise type(exc)(f"[[connectors.{kind}]] #{i + 1}: {exc}") from None
    return built


@dataclass(frozen=True, slots=True)
class RoundResult:
    at: datetime
    observations: Sequence[DeviceObservation]
    merged: Sequence[MergedDevice]
    summary: ScanSummary
    resolution_lines: int
    health: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


class Agent:
    def __init__(
        self, config: AgentConfig, *, enrollment: Enrollment | None = None, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.config = config
        self.enrollment = enrollment or load_enrollment(config.enrollment_path)
        self.clock = clock
        self._key = read_private_key(config.key_path)
        self.connectors = build_connectors(config)
        for c in self.connectors:
            if c.kind == "resolution":
                # The verifier-issued sampling salt, and an explicit commit of the tail position only once the
                # report that carries those lines is in the outbox (a crash in between re-reads, never loses).
                from connectors.resolution.connector import salt_from_enrollment

                c.bind_agent(salt=salt_from_enrollment(self.enrollment), explicit_commit=True)
        self.outbox = Outbox(config.outbox_path)
        self.deliverer = Deliverer(
            self.enrollment.verifier_url,
            timeout_s=config.agent.request_timeout_s,
            max_backoff_s=config.agent.max_backoff_s,
        )
        # A period starts at the first round after start-up: time the agent was not running is a gap in the
        # ledger, never a report of zero observations. It never starts before the last reported period ended.
        self._last_end = self.outbox.chain().last_period_end
        self.period_start: datetime | None = None
        self.rollup = PeriodRollup(self.enrollment.fingerprint_key_bytes)
        self.reports_signed = 0

    async def __aenter__(self) -> Self:
        for c in self.connectors:
            enter = getattr(c, "__aenter__", None)
            if enter is not None:
                await enter()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for c in self.connectors:
            try:
                await c.aclose()
            except Exception:  # closing must not hide the original error; logged, not deciding trust
                log.exception("closing connector %s failed", getattr(c, "kind", "?"))
        await self.deliverer.aclose()
        self.outbox.close()

    @property
    def has_resolution_source(self) -> bool:
        return any(c.kind == "resolution" for c in self.connectors)

    def _midnight_after(self, t: datetime) -> datetime:
        local = t.astimezone(self.config.tz)
        return datetime.combine(local.date() + timedelta(days=1), time(0), tzinfo=self.config.tz)

    async def collect_round(self, *, now: datetime | None = None) -> RoundResult:
        """Observe every source once and fold the round into the current period."""
        at = now or self.clock()
        if self.period_start is None:
            self.period_start = max(at, self._last_end) if self._last_end else at
        # A period never crosses midnight: close the old day first.
        while at >= self._midnight_after(self.period_start):
            self.close_period(end=self._midnight_after(self.period_start))
        device_conns = [c for c in self.connectors if c.kind in DEVICE_KINDS]
        results = await asyncio.gather(*(c.observe() for c in device_conns), return_exceptions=True)
        observations: list[DeviceObservation] = []
        for conn, res in zip(device_conns, results, strict=True):
            if isinstance(res, BaseException):
                log.error("connector %s at %r failed a round: %s", conn.kind, conn.source, res)
                conn.count_error("round_failed")
                continue
            observations.extend(res)
        merged = merge_observations(observations, self.config.same_device)
        self.rollup.add_devices(merged, now=at)
        lines = 0
        for conn in self.connectors:
            if conn.kind == "resolution":
                batch = await conn.collect()
                self.rollup.add_resolution(batch)
                lines += batch.lines_read
        health = {}
        for conn in self.connectors:
            h = conn.health()
            self.rollup.note_health(h.kind, h.source, h.errors)
            health[f"{h.kind} {h.source}"] = dict(h.errors)
        return RoundResult(at, observations, merged, summarize(observations, merged), lines, health)

    def close_period(self, *, end: datetime | None = None) -> OutboxItem | None:
        """Sign the period's report into the outbox and start the next period at ``end``."""
        end = end or self.clock()
        start = self.period_start or end
        if end <= start:
            return None
        rollup, self.rollup = self.rollup, PeriodRollup(self.enrollment.fingerprint_key_bytes)
        # Resolution lines of minutes at or after the end belong to the next period.
        for key in [k for k in rollup.buckets if k[0] >= end]:
            self.rollup.buckets[key] = rollup.buckets.pop(key)
        enrollment = self.enrollment

        def build(seq: int, prev_hash: str) -> tuple[bytes, datetime]:
            report = ReportV1(
                agent_id=enrollment.agent_id,
                key_id=enrollment.key_id,
                seq=seq,
                prev_hash=prev_hash,
                period=Period(start=start, end=end),
                created_at=self.clock(),
                devices=rollup.device_entries(),
                resolution=rollup.resolution_summary(has_source=self.has_resolution_source),
                connectors=rollup.connector_statuses(),
                evidence=rollup.evidence_samples(self.config.agent.evidence_sample_size),
                outbox_depth=self.outbox.depth(),
            )
            return sign_envelope(report.to_bytes(), self._key), end

        item = self.outbox.append(build)
        for c in self.connectors:
            if c.kind == "resolution":
                c.commit()
        self.period_start = end
        self.reports_signed += 1
        return item

    async def deliver(self) -> DeliveryResult:
        return await self.deliverer.deliver_pending(self.outbox)
