"""The agent's own health as Prometheus metrics, served at ``http://<host>:<metrics_port>/metrics``.

- ``tianping_agent_rounds_total``: collection rounds done;
- ``tianping_agent_reports_signed_total``: reports signed into the outbox;
- ``tianping_agent_reports_sent_total``: reports the verifier acknowledged;
- ``tianping_agent_delivery_failures_total{code}``: failed delivery attempts by cause;
- ``tianping_agent_outbox_depth``: signed reports waiting for the verifier;
- ``tianping_agent_connector_errors_total{kind,source,code}``: each connector's error counters.

Values are read from the running agent at scrape time (the outbox depth through a separate read-only SQLite
connection, so the scrape thread never shares the agent's connection). The registry belongs to the instance: no
process-wide state.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class _AgentLike(Protocol):
    connectors: list[Any]
    reports_signed: int
    deliverer: Any


def outbox_depth(path: Path) -> int:
    """Reports waiting in the outbox at ``path`` (read-only; 0 when the outbox does not exist yet)."""
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


class AgentMetrics(Collector):
    """Collects from an agent at scrape time; ``note_round()`` counts collection rounds."""

    def __init__(self, agent: _AgentLike, outbox_path: Path) -> None:
        self.agent = agent
        self.outbox_path = outbox_path
        self.rounds = 0
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self._server: Any = None

    def note_round(self) -> None:
        with self._lock:
            self.rounds += 1

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("tianping_agent_rounds", "Collection rounds done", value=self.rounds)
        yield CounterMetricFamily("tianping_agent_reports_signed", "Reports signed into the outbox",
                                  value=self.agent.reports_signed)
        yield CounterMetricFamily("tianping_agent_reports_sent", "Reports acknowledged by the verifier",
                                  value=int(getattr(self.agent.deliverer, "sent", 0)))
        failures = CounterMetricFamily("tianping_agent_delivery_failures", "Failed delivery attempts by cause",
                                       labels=["code"])
        for code, n in sorted(dict(getattr(self.agent.deliverer, "failures", {})).items()):
            failures.add_metric([code], n)
        yield failures
        yield GaugeMetricFamily("tianping_agent_outbox_depth", "Signed reports waiting for the verifier",
                                value=outbox_depth(self.outbox_path))
        errors = CounterMetricFamily("tianping_agent_connector_errors", "Connector errors by code",
                                     labels=["kind", "source", "code"])
        for conn in list(self.agent.connectors):
            health = conn.health()
            for code, n in sorted(dict(health.errors).items()):
                errors.add_metric([health.kind, health.source, code], n)
        yield errors

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` in a background thread; returns the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = int(server.server_address[1])
        log.info("agent metrics at http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
