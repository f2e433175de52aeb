"""MQTT connector: devices seen through a broker, as Sparkplug B edge nodes' devices or plain topic templates."""

from connectors.mqtt.connector import DEFAULTS, REQUIRED, DeviceTable, MqttConfig, MqttConnector, TopicTemplate

__all__ = ["DEFAULTS", "REQUIRED", "DeviceTable", "MqttConfig", "MqttConnector", "TopicTemplate"]
