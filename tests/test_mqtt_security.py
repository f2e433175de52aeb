"""MQTT connector security: TLS with a private CA (server and client certificates) and user name / password,
against a real Mosquitto that refuses anonymous clients.

One broker for the module, with three listeners: plain (password only), TLS requiring a client certificate
signed by our CA, and TLS whose server certificate names another host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from connectors.base import ConfigError, DeviceStatus
from connectors.mqtt import MqttConnector
from simulator.mosquitto import PrivateMosquitto, free_port

AGENT, AGENT_PW = "tianping", "agent-secret"
PUBLISHER, PUBLISHER_PW = "plant", "plant-secret"
TEMPLATE = "factory/{device}/telemetry"


# --- a private PKI -------------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _ca(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(directory / name, cert)
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *,
          san: list[x509.GeneralName], server: bool) -> None:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.now(UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    _write(directory / name, builder.sign(ca_key, hashes.SHA256()), key)


@dataclass
class SecureBroker:
    broker: PrivateMosquitto
    tls_port: int  # server certificate for 127.0.0.1; a client certificate from our CA is required
    wrong_host_port: int  # server certificate for broker.example only
    pki: Path

    def cfg(self, **extra: Any) -> dict[str, Any]:
        return {"host": self.broker.host, "port": self.broker.port, "sparkplug": False, "topics": [TEMPLATE],
                "timeout_s": 3, **extra}

    def tls(self, **extra: Any) -> dict[str, Any]:
        return self.cfg(**{"port": self.tls_port, "tls": True, "ca_file": str(self.pki / "ca.crt"),
                           "username": AGENT, "password": AGENT_PW, **extra})

    def client_cert(self) -> dict[str, str]:
        return {"certfile": str(self.pki / "agent.crt"), "keyfile": str(self.pki / "agent.key")}

    def publish(self, device: str) -> None:
        mqtt_publish.single(TEMPLATE.format(device=device), b"21.5", hostname=self.broker.host,
                            port=self.broker.port, auth={"username": PUBLISHER, "password": PUBLISHER_PW})


@pytest.fixture(scope="module")
def secure() -> Iterator[SecureBroker]:
    # Mosquitto started as root drops to the `mosquitto` user before it reads certificates and the password
    # file: they live in a world-readable directory (test keys only), not under pytest's 0700 tmp_path.
    with tempfile.TemporaryDirectory(prefix="tianping-mqtt-pki-") as name:
        pki = Path(name)
        pki.chmod(0o755)
        yield from _secure_broker(pki)


def _secure_broker(pki: Path) -> Iterator[SecureBroker]:
    ca = _ca(pki, "ca")
    _ca(pki, "other-ca")  # trusted by nobody
    localhost = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    _leaf(pki, "server", ca, san=localhost, server=True)
    _leaf(pki, "wrong-host", ca, san=[x509.DNSName("broker.example")], server=True)
    _leaf(pki, "agent", ca, san=[], server=False)
    passwords = pki / "passwd"
    passwords.touch()
    for user, password in ((AGENT, AGENT_PW), (PUBLISHER, PUBLISHER_PW)):
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True, timeout=10,
                       capture_output=True)
    for path in pki.iterdir():
        path.chmod(0o644)
    tls_port, wrong_host_port = free_port(), free_port()
    conf = (
        f"allow_anonymous false\npassword_file {passwords}\n"
        f"listener {tls_port} 127.0.0.1\ncafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\n"
        f"keyfile {pki / 'server.key'}\nrequire_certificate true\n"
        f"listener {wrong_host_port} 127.0.0.1\ncertfile {pki / 'wrong-host.crt'}\n"
        f"keyfile {pki / 'wrong-host.key'}\n"
    )
    with PrivateMosquitto(extra_conf=conf) as broker:
        yield SecureBroker(broker, tls_port, wrong_host_port, pki)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


# --- TLS -----------------------------------------------------------------------------------------------------


async def test_tls_with_private_ca_client_certificate_and_password_sees_devices(secure: SecureBroker) -> None:
    async with MqttConnector.from_config(secure.tls(**secure.client_cert())) as connector:
        health = connector.health()
        assert health.extra["subscribed"] is True and health.extra["tls"] is True
        secure.publish("press-7")  # over the plain listener: the broker relays it to the TLS one

        async def seen() -> bool:
            return [(o.local_id, o.status) for o in await connector.observe()] == [
                ("factory/{device}/telemetry/press-7", DeviceStatus.ACTIVE)]

        await until(seen, "the device published on the plain listener, over TLS")
        assert connector.health().errors == {}


async def test_tls_server_signed_by_an_unknown_ca_is_refused_and_counted(secure: SecureBroker) -> None:
    cfg = secure.tls(ca_file=str(secure.pki / "other-ca.crt"), **secure.client_cert())
    async with MqttConnector.from_config(cfg) as connector:
        secure.publish("press-8")
        assert await connector.observe() == []
        health = connector.health()
    assert health.extra["connected"] is False
    assert health.errors.get("tls_failed", 0) >= 1 and "broker_unreachable" not in health.errors


async def test_tls_host_name_mismatch_is_refused_unless_tls_insecure(
        secure: SecureBroker, caplog: pytest.LogCaptureFixture) -> None:
    async with MqttConnector.from_config(secure.tls(port=secure.wrong_host_port)) as strict:
        assert strict.health().extra["subscribed"] is False
        assert strict.health().errors.get("tls_failed", 0) >= 1
    with caplog.at_level(logging.WARNING, logger="connectors.mqtt.connector"):
        async with MqttConnector.from_config(secure.tls(port=secure.wrong_host_port, tls_insecure=True)) as lax:
            assert lax.health().extra["subscribed"] is True
            assert lax.health().errors == {}
    assert "tls_insecure = true" in caplog.text


async def test_tls_listener_refuses_a_client_without_certificate(secure: SecureBroker) -> None:
    async with MqttConnector.from_config(secure.tls()) as connector:
        secure.publish("press-9")
        assert await connector.observe() == []
        health = connector.health()
    assert health.extra["subscribed"] is False
    assert health.errors.get("tls_failed", 0) >= 1 and "broker_unreachable" not in health.errors


# --- user name and password ----------------------------------------------------------------------------------


async def test_wrong_password_is_an_auth_error_never_a_crash(secure: SecureBroker) -> None:
    started = time.monotonic()
    async with MqttConnector.from_config(secure.cfg(username=AGENT, password="guess")) as connector:
        assert time.monotonic() - started < 2.5  # a refusal ends the wait for the subscriptions
        secure.publish("press-10")
        assert await connector.observe() == []
        health = connector.health()
    assert health.errors.get("auth_failed", 0) >= 1 and "broker_unreachable" not in health.errors
    assert health.extra["connected"] is False


async def test_anonymous_is_refused_and_right_password_is_accepted(secure: SecureBroker) -> None:
    async with MqttConnector.from_config(secure.cfg(timeout_s=1)) as anonymous:
        assert anonymous.health().errors.get("auth_failed", 0) >= 1
    async with MqttConnector.from_config(secure.cfg(username=AGENT, password=AGENT_PW)) as connector:
        assert connector.health().extra["subscribed"] is True
        secure.publish("press-11")

        async def seen() -> bool:
            return [o.local_id for o in await connector.observe()] == ["factory/{device}/telemetry/press-11"]

        await until(seen, "the device over the password-protected listener")
        assert connector.health().errors == {}


def test_password_never_appears_in_the_config_repr(secure: SecureBroker) -> None:
    connector = MqttConnector.from_config(secure.cfg(username=AGENT, password=AGENT_PW))
    assert AGENT_PW not in repr(connector.config) and AGENT in repr(connector.config)


# --- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "match"), [
    ({"ca_file": "ca.crt"}, "expected tls = true with ca_file, got tls = false"),
    ({"tls_insecure": True}, "expected tls = true with tls_insecure"),
    ({"tls": True, "certfile": "agent.crt"}, "expected certfile and keyfile together.*got only certfile"),
    ({"tls": True, "keyfile": "agent.key"}, "got only keyfile"),
    ({"tls": True, "ca_file": "missing.crt"}, r"ca_file: expected a readable PEM file, got '.*missing\.crt'"),
    ({"tls": True, "ca_file": "passwd"}, "expected PEM files for ca_file, certfile and keyfile"),
    ({"tls": True, "certfile": "ca.crt", "keyfile": "other-ca.crt"}, "expected PEM files"),
    ({"tls": "yes"}, "tls: expected bool, got str"),
    ({"tls": True, "tls_insecure": 1}, "tls_insecure: expected bool, got int"),
])
def test_bad_tls_config_is_refused_at_construction(secure: SecureBroker, extra: dict[str, Any], match: str) -> None:
    cfg = {k: str(secure.pki / v) if k in ("ca_file", "certfile", "keyfile") else v for k, v in extra.items()}
    with pytest.raises(ConfigError, match=match):
        MqttConnector.from_config({"host": "127.0.0.1", **cfg})
