"""Delivery of signed reports to the verifier, in sequence order, with capped, jittered backoff.

Retried: connection errors, timeouts, 408, 429 (honouring Retry-After) and 5xx. Not retried: any other 4xx —
the verifier said why, the report stays in the outbox and the agent raises the alarm (``DeliveryRefused``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx

from agent.errors import DeliveryRefused
from agent.outbox import Outbox, OutboxItem

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
        self._batches = True  # until the verifier says it has no batch endpoint

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    def _fail(self, code: str) -> None:
        self.failures[code] = self.failures.get(code, 0) + 1

    async def deliver_pending(self, outbox: Outbox, *, batch: int = 100) -> DeliveryResult:
        """Send what the outbox holds, oldest first, until it is empty or a failure stops the round. A backlog goes
        ``batch`` reports per request (``POST /v1/reports/batch``); a single report, or a verifier without the batch
        endpoint, one per request."""
        delivered = 0
        while True:
            items = outbox.pending(batch)
            if not items:
                return DeliveryResult(delivered, 0, None)
            if len(items) > 1 and self._batches:
                answers = await self._post_batch(outbox, items)
                if answers is None:
                    continue  # the verifier has no batch endpoint: one per request from now on
            else:
                answers = await self._post_one(outbox, items[0])
            for item, (status, body, retry_after) in zip(items, answers, strict=False):
                if isinstance(status, str):  # a transport error
                    self._fail(status)
                    outbox.note_failure(item.seq, str(body["error"]["message"]))
                    return DeliveryResult(delivered, outbox.depth(), self._backoff(item.attempts))
                if status in (200, 201):
                    outbox.acknowledge(item.seq, body.get("receipt", {}))
                    delivered += 1
                    self.sent += 1
                    continue
                detail = _error_text(body)
                outbox.note_failure(item.seq, f"HTTP {status}: {detail}")
                self._fail(f"http_{status}")
                if status in RETRYABLE_STATUS:
                    wait = self._backoff(item.attempts)
                    if retry_after is not None:
                        wait = max(wait, retry_after)
                    return DeliveryResult(delivered, outbox.depth(), wait)
                raise DeliveryRefused(
                    f"report seq {item.seq}: the verifier refused it with HTTP {status} ({detail}); "
                    "it stays in the outbox until an operator acts"
                )

    async def _post_one(self, outbox: Outbox, item: OutboxItem) -> list[_Answer]:
        try:
            resp = await self._client.post(f"{self.base_url}/v1/reports", content=item.envelope,
                                           headers={"Content-Type": "application/json"})
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            return [(type(exc).__name__, {"error": {"message": f"{type(exc).__name__}: {exc}"}}, None)]
        return [(resp.status_code, _json(resp), _retry_after(resp))]

    async def _post_batch(self, outbox: Outbox, items: list[OutboxItem]) -> list[_Answer] | None:
        """One request for ``items``; each answer as if posted alone. None when the verifier lacks the endpoint."""
        try:
            resp = await self._client.post(f"{self.base_url}/v1/reports/batch",
                                           content=b"".join(item.envelope + b"\n" for item in items),
                                           headers={"Content-Type": "application/x-ndjson"})
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            return [(type(exc).__name__, {"error": {"message": f"{type(exc).__name__}: {exc}"}}, None)]
        body = _json(resp)
        results = body.get("results")
        if resp.status_code in (404, 405) and results is None:
            log.info("the verifier has no batch endpoint (HTTP %d): sending one report per request",
                     resp.status_code)
            self._batches = False
            return None
        if not isinstance(results, list) or len(results) != len(items):  # the whole request was refused
            return [(resp.status_code, body, _retry_after(resp))]
        return [(int(r.get("status", 0)), r,
                 float(r["error"]["retry_after_s"]) if r.get("status") == 429 else None) for r in results]

    def _backoff(self, attempts: int) -> float:
        return max(0.05, backoff_s(attempts, cap_s=self.max_backoff_s, rng=self._rng))


_Answer = tuple[int | str, dict[str, Any], float | None]  # status (or transport error), body, Retry-After


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {"error": {"message": resp.text[:200]}}
    return body if isinstance(body, dict) else {"error": {"message": str(body)[:200]}}


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _error_text(body: dict[str, Any]) -> str:
    err = body.get("error", {})
    if not isinstance(err, dict):
        return str(err)[:200]
    return f"{err.get('code', '?')}: {err.get('message', '')}"
