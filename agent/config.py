"""The agent's TOML configuration: frozen, bounded, unknown keys refused with what was expected.

```toml
[agent]
name = "plant-agent"
data_dir = "."                      # relative to this file: key, enrollment, outbox, checkpoints
verifier_url = "http://127.0.0.1:8700"
collect_interval_s = 60
report_interval_s = 300
timezone = "Asia/Shanghai"

[[connectors.opcua]]
endpoint = "opc.tcp://127.0.0.1:4840/"
```
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.errors import AgentConfigError
from connectors.registry import CONNECTOR_KINDS

_AGENT_KEYS = {
    "name",
    "data_dir",
    "verifier_url",
    "collect_interval_s",
    "report_interval_s",
    "timezone",
    "request_timeout_s",
    "max_backoff_s",
    "evidence_sample_size",
    "metrics_port",  # issue 7: Prometheus /metrics of the agent (absent: not served)
}


@dataclass(frozen=True, slots=True)
class AgentSettings:
    name: str
    data_dir: Path
    verifier_url: str
    collect_interval_s: float = 60.0
    report_interval_s: float = 300.0
    timezone: str = "Asia/Shanghai"
    request_timeout_s: float = 10.0
    max_backoff_s: float = 300.0
    evidence_sample_size: int = 5
    metrics_port: int | None = None  # issue 7


@dataclass(frozen=True, slots=True)
class AgentConfig:
    path: Path
    agent: AgentSettings
    connectors: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)
    # Operator-declared identities: (protocol, source, local id) -> a name shared by one physical device's
    # entries, for devices no protocol identifies well enough to merge on its own.
    same_device: Mapping[tuple[str, str, str], str] = field(default_factory=dict)

    @property
    def key_path(self) -> Path:
        return self.agent.data_dir / "agent.key"

    @property
    def enrollment_path(self) -> Path:
        return self.agent.data_dir / "enrollment.json"

    @property
    def outbox_path(self) -> Path:
        return self.agent.data_dir / "outbox.sqlite"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.agent.timezone)


def _num(table: Mapping[str, Any], key: str, default: float, *, lo: float, hi: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AgentConfigError(f"[agent].{key}: expected a number, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise AgentConfigError(f"[agent].{key}: expected a value from {lo} to {hi}, got {value}")
    return float(value)


def _str(table: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise AgentConfigError(f"[agent].{key}: expected a non-empty string, got {value!r}")
    return value


def parse_config(text: str, *, path: Path) -> AgentConfig:
    """Parse and check a whole configuration; nothing is started until it is accepted."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AgentConfigError(f"{path}: expected TOML, got a syntax error: {exc}") from None
    unknown = sorted(set(raw) - {"agent", "connectors", "same_device"})
    if unknown:
        raise AgentConfigError(
            f"{path}: unknown top-level tables {unknown}; expected only ['agent', 'connectors', 'same_device']"
        )
    table = raw.get("agent")
    if not isinstance(table, dict):
        raise AgentConfigError(f"{path}: expected an [agent] table, got {type(table).__name__}")
    extra = sorted(set(table) - _AGENT_KEYS)
    if extra:
        raise AgentConfigError(f"[agent]: unknown keys {extra}; expected only {sorted(_AGENT_KEYS)}")
    url = _str(table, "verifier_url")
    if not url.startswith(("http://", "https://")):
        raise AgentConfigError(f"[agent].verifier_url: expected an http:// or https:// URL, got {url!r}")
    tz = _str(table, "timezone", "Asia/Shanghai")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise AgentConfigError(
            f"[agent].timezone: expected an IANA time zone such as 'Asia/Shanghai', got {tz!r}"
        ) from None
    sample = table.get("evidence_sample_size", 5)
    if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample <= 1000:
        raise AgentConfigError(f"[agent].evidence_sample_size: expected an integer from 0 to 1000, got {sample!r}")
    metrics_port = table.get("metrics_port")  # issue 7
    if metrics_port is not None and (isinstance(metrics_port, bool) or not isinstance(metrics_port, int)
                                     or not 1 <= metrics_port <= 65535):
        raise AgentConfigError(f"[agent].metrics_port: expected an integer from 1 to 65535, got {metrics_port!r}")
    settings = AgentSettings(
        name=_str(table, "name"),
        data_dir=(path.parent / _str(table, "data_dir", ".")).resolve(),
        verifier_url=url.rstrip("/"),
        collect_interval_s=_num(table, "collect_interval_s", 60, lo=0.05, hi=86_400),
        report_interval_s=_num(table, "report_interval_s", 300, lo=0.05, hi=86_400),
        timezone=tz,
        request_timeout_s=_num(table, "request_timeout_s", 10, lo=0.1, hi=600),
        max_backoff_s=_num(table, "max_backoff_s", 300, lo=0.1, hi=86_400),
        evidence_sample_size=sample,
        metrics_port=metrics_port,
    )
    connectors = raw.get("connectors", {})
    if not isinstance(connectors, dict):
        raise AgentConfigError(f"[connectors]: expected tables such as [[connectors.opcua]], got {connectors!r}")
    parsed: dict[str, tuple[Mapping[str, Any], ...]] = {}
    for kind, entries in connectors.items():
        if kind not in CONNECTOR_KINDS:
            raise AgentConfigError(
                f"[connectors.{kind}]: unknown connector kind; expected one of {sorted(CONNECTOR_KINDS)}"
            )
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise AgentConfigError(
                f"[connectors.{kind}]: expected an array of tables ([[connectors.{kind}]]), "
                f"got {type(entries).__name__}"
            )
        parsed[kind] = tuple(entries)
    same = _same_device(raw.get("same_device", []))
    return AgentConfig(path=path, agent=settings, connectors=parsed, same_device=same)


def _same_device(entries: Any) -> dict[tuple[str, str, str], str]:
    """``[[same_device]]`` tables: ``name`` and ``members = [{protocol, source, local_id}, ...]`` (two or more)."""
    where = "[[same_device]]"
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise AgentConfigError(f"{where}: expected an array of tables, got {type(entries).__name__}")
    declared: dict[tuple[str, str, str], str] = {}
    for i, entry in enumerate(entries, 1):
        extra = sorted(set(entry) - {"name", "members"})
        if extra:
            raise AgentConfigError(f"{where} #{i}: unknown keys {extra}; expected only ['members', 'name']")
        name, members = entry.get("name"), entry.get("members")
        if not isinstance(name, str) or not name:
            raise AgentConfigError(f"{where} #{i}.name: expected a non-empty string, got {name!r}")
        if not isinstance(members, list) or len(members) < 2:
            raise AgentConfigError(f"{where} #{i}.members: expected a list of two or more tables, got {members!r}")
        for m in members:
            if not isinstance(m, dict) or set(m) != {"protocol", "source", "local_id"} or not all(
                isinstance(v, str) and v for v in m.values()
            ):
                raise AgentConfigError(
                    f"{where} #{i}.members: expected tables {{protocol, source, local_id}} of non-empty strings, "
                    f"got {m!r}"
                )
            key = (m["protocol"], m["source"], m["local_id"])
            if key in declared and declared[key] != name:
                raise AgentConfigError(f"{where} #{i}: {key} is already declared as {declared[key]!r}")
            declared[key] = name
    return declared


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AgentConfigError(
            f"{path}: expected a configuration file, found none (run 'tianping-agent init')"
        ) from None
    return parse_config(text, path=path)


SKELETON = """\
# Tianping edge agent configuration. Every connector kind has a sample.toml beside its code
# (connectors/<kind>/sample.toml) with each key, its default and what it means.
[agent]
name = "{name}"
data_dir = "."                          # key, enrollment, outbox and checkpoints live here
verifier_url = "{verifier_url}"
collect_interval_s = 60                 # one collection round a minute
report_interval_s = 300                 # one signed report every five minutes
timezone = "Asia/Shanghai"              # calendar days are counted in this zone

# [[connectors.opcua]]
# endpoint = "opc.tcp://plc-gateway.example:4840/"
#
# [[connectors.modbus]]
# gateways = [{{ host = "10.0.0.20", port = 502, enterprise = "91330400MA2XXXXXXX", unit_ids = "1-247" }}]
#
# [[connectors.mqtt]]
# host = "broker.example"
#
# [[connectors.resolution]]
# path = "/var/log/handle/access.log"
"""
