"""Delivery of signed reports to the verifier, in sequence order, with capped, jittered backoff.

Retried: connection errors, timeouts, 408, 429 (honouring Retry-After) and 5xx. Not retried: any other 4xx —
the verifier said why, the report stays in the outbox and the agent raises the alarm (``DeliveryRefused``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import httpx

from agent.errors import DeliveryRefused
from agent.outbox import Outbox

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    delivered: int
    remaining: int
    retry_after_s: float | None  # set when a transient failure stopped the round


def backoff_s(attempt: int, *, base_s: float = 0.5, cap_s: float = 300.0, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    r = rng or random.Random()
    return r.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30))))


class Deliverer:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        max_backoff_s: float = 300.0,
        client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_backoff_s = max_backoff_s
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._own_client = client is None
        self._rng = rng or random.Random()
        self.sent = 0
        self.failures: dict[str, int] = {}

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    def _fail(self, code: str) -> None:
        self.failures[code] = self.failures.get(code, 0) + 1

    async def deliver_pending(self, outbox: Outbox, *, batch: int = 100) -> DeliveryResult:
        delivered = 0
        while True:
            items = outbox.pending(batch)
            if not items:
                return DeliveryResult(delivered, 0, None)
            for item in items:
                try:
                    resp = await self._client.post(
                        f"{self.base_url}/v1/reports",
                        content=item.envelope,
                        headers={"Content-Type": "application/json"},
                    )
                except (httpx.TransportError, httpx.TimeoutException) as exc:
                    self._fail(type(exc).__name__)
                    outbox.note_failure(item.seq, f"{type(exc).__name__}: {exc}")
                    return DeliveryResult(delivered, outbox.depth(), self._backoff(item.attempts))
                if resp.status_code in (200, 201):
                    outbox.acknowledge(item.seq, resp.json().get("receipt", {}))
                    delivered += 1
                    self.sent += 1
                    continue
                detail = _error_of(resp)
                outbox.note_failure(item.seq, f"HTTP {resp.status_code}: {detail}")
                self._fail(f"http_{resp.status_code}")
                if resp.status_code in RETRYABLE_STATUS:
                    wait = self._backoff(item.attempts)
                    retry_after = resp.headers.get("Retry-After", "")
                    if retry_after.isdigit():
                        wait = max(wait, float(retry_after))
                    return DeliveryResult(delivered, outbox.depth(), wait)
                raise DeliveryRefused(
                    f"report seq {item.seq}: the verifier refused it with HTTP {resp.status_code} ({detail}); "
                    "it stays in the outbox until an operator acts"
                )

    def _backoff(self, attempts: int) -> float:
        return max(0.05, backoff_s(attempts, cap_s=self.max_backoff_s, rng=self._rng))


def _error_of(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error", {})
        return f"{err.get('code', '?')}: {err.get('message', '')}"
    except ValueError:
        return resp.text[:200]
