"""A per-agent token bucket in front of report ingest: over the limit, HTTP 429 with ``Retry-After``.

The bucket is keyed by the key id the envelope names (read before any verification, so that a flood costs no
signature checks). Someone who knows an agent's key id could spend its budget; the agent then retries after
``Retry-After`` like after any 429, and nothing is lost. The clock is passed in (monotonic seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from protocol.envelope import claimed_key_id

RATE_LIMITED_CODE = "rate_limited"
_MAX_TRACKED = 100_000


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class AgentRateLimiter:
    rate_per_s: float = 50.0
    burst: int = 200
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError(f"rate limit: expected rate_per_s > 0 and burst >= 1, got {self.rate_per_s}, "
                             f"{self.burst}")

    def retry_after_s(self, key: str, *, now: float) -> float:
        """Take one token for ``key``; 0 when allowed, else the seconds until a token is available."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_TRACKED:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate_per_s)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def check(self, envelope: bytes, *, now: float) -> JSONResponse | None:
        """None when the envelope's agent is within its budget, else the 429 answer to send."""
        refused = self.refusal(envelope, now=now)
        if refused is None:
            return None
        return JSONResponse(status_code=429, headers={"Retry-After": str(refused["error"]["retry_after_s"])},
                            content=refused)

    def refusal(self, envelope: bytes, *, now: float) -> dict[str, Any] | None:
        """None when the envelope's agent is within its budget (a token is taken), else the 429 error body."""
        wait = self.retry_after_s(_claimed_key_id(envelope), now=now)
        if wait == 0.0:
            return None
        seconds = max(1, math.ceil(wait))
        message = f"agent rate: expected at most {self.rate_per_s:g} reports/s (burst {self.burst}), got more"
        return {"error": {"code": RATE_LIMITED_CODE, "message": f"Too many reports from this agent: {message}",
                          "message_zh": f"该代理提交报告过于频繁：{message}", "retry_after_s": seconds}}


def _claimed_key_id(envelope: bytes) -> str:
    """The key id an envelope names (unverified; only a bucket key). Anything unreadable shares one bucket."""
    return (claimed_key_id(envelope) or "")[:64]
