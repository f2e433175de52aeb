"""Modbus TCP connector: sweeps unit ids behind gateways, identifies devices, tells reachable from active."""

from connectors.modbus.connector import (
    DEFAULTS,
    GATEWAY_DEFAULTS,
    GatewayConfig,
    ModbusConfig,
    ModbusConnector,
    RegisterProfile,
    parse_config,
    parse_unit_ids,
)

__all__ = [
    "DEFAULTS",
    "GATEWAY_DEFAULTS",
    "GatewayConfig",
    "ModbusConfig",
    "ModbusConnector",
    "RegisterProfile",
    "parse_config",
    "parse_unit_ids",
]
