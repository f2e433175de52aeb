"""The connector kinds the agent knows, resolved lazily so that a kind's libraries load only when used.

An explicit table, not registration by import side effect."""

from __future__ import annotations

import importlib
from typing import Any

CONNECTOR_KINDS: dict[str, str] = {
    "opcua": "connectors.opcua:OpcuaConnector",
    "modbus": "connectors.modbus:ModbusConnector",
    "mqtt": "connectors.mqtt:MqttConnector",
    "resolution": "connectors.resolution:ResolutionLogConnector",
}
DEVICE_KINDS = ("opcua", "modbus", "mqtt")


def connector_class(kind: str) -> Any:
    try:
        target = CONNECTOR_KINDS[kind]
    except KeyError:
        raise ValueError(f"connector kind: expected one of {sorted(CONNECTOR_KINDS)}, got {kind!r}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
