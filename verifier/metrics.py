"""The verifier's Prometheus metrics at ``GET /metrics`` (text exposition format).

- ``tianping_verifier_reports_total{result}``: report posts by outcome (``accepted``, ``duplicate``, ``refused``);
  its rate is the ingest rate;
- ``tianping_verifier_rejections_total{code}``: refused reports by error code (``signature_invalid``, …);
- ``tianping_verifier_ingest_seconds``: time to answer a report post (histogram);
- ``tianping_verifier_ledger_entries``: the ledger's size, read from the database at scrape time.

The counts are taken by a small ASGI middleware that watches ``POST /v1/reports`` answers (their status and
error code), so the ingest code itself is untouched; listeners (the InfluxDB writer) are told of each accepted
receipt from the same place, after the answer was sent.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from verifier.ledger import ledger_head

log = logging.getLogger(__name__)

REPORTS_PATH = "/v1/reports"
ReceiptListener = Callable[[dict[str, Any]], None]


class _LedgerCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._engine.connect() as conn:
            size = ledger_head(conn).size
        yield GaugeMetricFamily("tianping_verifier_ledger_entries", "Entries in the append-only ledger", value=size)


class VerifierMetrics:
    """The verifier's metrics in their own registry (no process-wide default registry)."""

    def __init__(self, engine: Engine, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reports = Counter("tianping_verifier_reports", "Report posts by outcome", ["result"],
                               registry=self.registry)
        self.rejections = Counter("tianping_verifier_rejections", "Refused reports by error code", ["code"],
                                  registry=self.registry)
        self.ingest_seconds = Histogram("tianping_verifier_ingest_seconds", "Time to answer a report post",
                                        registry=self.registry,
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.registry.register(_LedgerCollector(engine))
        self.listeners: list[ReceiptListener] = []

    def observe(self, status: int, body: bytes, seconds: float) -> None:
        self.ingest_seconds.observe(seconds)
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = {}
        if status in (200, 201):
            self.reports.labels("accepted" if status == 201 else "duplicate").inc()
            receipt = data.get("receipt") if isinstance(data, dict) else None
            if status == 201 and isinstance(receipt, dict):
                for listener in self.listeners:
                    try:
                        listener(receipt)
                    except Exception:  # a listener (dashboards) must never affect ingestion
                        log.exception("receipt listener failed")
            return
        self.reports.labels("refused").inc()
        code = "unknown"
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            code = str(data["error"].get("code", "unknown"))[:64]
        self.rejections.labels(code).inc()


class _IngestObserver:
    """Pure ASGI middleware: times ``POST /v1/reports`` and hands its status and (small JSON) body to metrics."""

    def __init__(self, app: ASGIApp, metrics: VerifierMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != REPORTS_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        body = bytearray()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and len(body) < 64 * 1024:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.observe(status, bytes(body), time.perf_counter() - started)


def install_metrics(app: FastAPI, engine: Engine) -> VerifierMetrics:
    """Add ``GET /metrics`` and the ingest observer to the app; returns the metrics (to add listeners)."""
    metrics = VerifierMetrics(engine)
    app.add_middleware(_IngestObserver, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        payload = await run_in_threadpool(generate_latest, metrics.registry)
        return Response(payload, media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics
    return metrics
