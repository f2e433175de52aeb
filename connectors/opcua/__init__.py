"""OPC UA device connector: counts the devices under a server's DI DeviceSet."""

from connectors.opcua.connector import DEFAULTS, OpcuaConnector, default_config

__all__ = ["DEFAULTS", "OpcuaConnector", "default_config"]
