"""OPC UA message security and user login against a real asyncua server that offers only Basic256Sha256
Sign / SignAndEncrypt endpoints and accepts one user. Certificates are made here with ``cryptography``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from connectors.base import ConfigError, DeviceStatus
from connectors.opcua import OpcuaConnector, wire
from simulator.mosquitto import free_port
from simulator.opcua_plant import OpcuaPlant, write_self_signed_certificate
from simulator.plant import PlantShape, PlantSpec, make_plant

in_module_loop = pytest.mark.asyncio(loop_scope="module")

USER, PASSWORD = "tianping", "s3cret-pass"
AGENT_URI = "urn:tianping:agent:opcua:test"


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.server_cert, self.server_key = root / "server-cert.der", root / "server-key.pem"
        self.agent_cert, self.agent_key = root / "agent-cert.der", root / "agent-key.pem"
        self.other_cert, self.other_key = root / "other-cert.der", root / "other-key.pem"
        write_self_signed_certificate(self.server_cert, self.server_key, server=True,
                                      application_uri="urn:tianping:simulator:opcua-server", common_name="plant")
        write_self_signed_certificate(self.agent_cert, self.agent_key, server=False, application_uri=AGENT_URI,
                                      common_name="agent")
        write_self_signed_certificate(self.other_cert, self.other_key, server=True,
                                      application_uri="urn:impostor", common_name="impostor")

    def secure(self, mode: str = "SignAndEncrypt", **extra: Any) -> dict[str, Any]:
        return {"security_policy": "Basic256Sha256", "security_mode": mode, "certificate": str(self.agent_cert),
                "private_key": str(self.agent_key), **extra}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def spec() -> PlantSpec:
    return make_plant(PlantShape(opcua=6, modbus=0, mqtt=0, opcua_and_mqtt=0, modbus_and_opcua=0, silent=1))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure_plant(spec: PlantSpec, pki: Pki) -> AsyncIterator[OpcuaPlant]:
    async with OpcuaPlant(spec, port=free_port(), update_interval_s=0.1,
                          security=("Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"),
                          certificate=pki.server_cert, private_key=pki.server_key,
                          users={USER: PASSWORD}) as running:
        yield running


def connector(endpoint: str, **cfg: Any) -> OpcuaConnector:
    return OpcuaConnector.from_config({"endpoint": endpoint, "timeout_s": 3, **cfg})


@in_module_loop
@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_signed_and_encrypted_sessions_with_user_login_count_every_device(
    spec: PlantSpec, pki: Pki, secure_plant: OpcuaPlant, mode: str
) -> None:
    fallbacks = wire.fallbacks()
    async with connector(secure_plant.endpoint, **pki.secure(mode, username=USER, password=PASSWORD)) as c:
        observations = list(await c.observe())
    assert c.health().errors == {}
    # Signed / decrypted below asyncua's request path: the answers reach the connector's own decoder intact.
    assert wire.fallbacks() == fallbacks and c.health().extra["decoder_fallbacks"] == fallbacks
    assert c.config.application_uri == AGENT_URI  # taken from the certificate
    assert {o.evidence["serial"] for o in observations} == {d.serial for d in spec.on("opcua")}
    active = {o.evidence["serial"] for o in observations if o.status is DeviceStatus.ACTIVE}
    assert active == {d.serial for d in spec.on("opcua") if d.active}


@in_module_loop
async def test_pinned_server_certificate_is_accepted(spec: PlantSpec, pki: Pki, secure_plant: OpcuaPlant) -> None:
    cfg = pki.secure(server_certificate=str(pki.server_cert), username=USER, password=PASSWORD)
    async with connector(secure_plant.endpoint, **cfg) as c:
        assert len(await c.observe()) == len(spec.on("opcua"))
    assert c.health().errors == {}


@in_module_loop
async def test_server_with_another_certificate_than_the_pinned_one_is_refused(
    pki: Pki, secure_plant: OpcuaPlant
) -> None:
    """The agent encrypts for the pinned certificate; the real server cannot read it and never answers."""
    cfg = pki.secure(server_certificate=str(pki.other_cert), username=USER, password=PASSWORD, timeout_s=1)
    async with connector(secure_plant.endpoint, **cfg) as c:
        assert list(await c.observe()) == []
    assert c.health().errors == {"opcua_timeout": 1}


@in_module_loop
@pytest.mark.parametrize(("login", "why"), [
    ({"username": USER, "password": "wrong"}, "wrong password"),
    ({"username": "intruder", "password": PASSWORD}, "unknown user"),
    ({}, "anonymous"),
], ids=["wrong-password", "unknown-user", "anonymous"])
async def test_bad_login_is_refused_counted_and_nothing_observed(
    pki: Pki, secure_plant: OpcuaPlant, login: dict[str, str], why: str
) -> None:
    async with connector(secure_plant.endpoint, **pki.secure(**login)) as c:
        assert list(await c.observe()) == [], why
    assert c.health().errors == {"opcua_auth_failed": 1}


@in_module_loop
async def test_security_none_against_a_secure_only_server_is_refused(secure_plant: OpcuaPlant) -> None:
    async with connector(secure_plant.endpoint, username=USER, password=PASSWORD) as c:
        assert list(await c.observe()) == []
    assert c.health().errors == {"opcua_connect_failed": 1}


# --- configuration refused at construction ------------------------------------------------------------------

E = "opc.tcp://127.0.0.1:4840"


def test_sign_and_encrypt_without_a_certificate_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"security_mode 'SignAndEncrypt' expects certificate and private_key "
                                          r".*got no certificate and private_key"):
        OpcuaConnector.from_config({"endpoint": E, "security_policy": "Basic256Sha256",
                                    "security_mode": "SignAndEncrypt"})


@pytest.mark.parametrize(("cfg", "message"), [
    ({"security_policy": "None", "security_mode": "Sign"},
     r"security_mode: expected 'None' with security_policy 'None', got 'Sign'"),
    ({"security_policy": "Basic256Sha256"},
     r"security_mode: expected 'Sign' or 'SignAndEncrypt' with security_policy 'Basic256Sha256', got 'None'"),
    ({"security_mode": "Encrypt"}, r"security_mode: expected one of \['None', 'Sign', 'SignAndEncrypt'\]"),
    ({"certificate": "agent.der"}, r"certificate only apply with security_mode 'Sign' or 'SignAndEncrypt', got "
                                   r"them with security_mode 'None'"),
], ids=["mode-without-policy", "policy-without-mode", "unknown-mode", "certificate-unused"])
def test_bad_security_combinations_are_refused(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OpcuaConnector.from_config({"endpoint": E, **cfg})


def test_unreadable_or_malformed_key_material_is_refused(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.der"
    garbage.write_bytes(b"\x30\x03not a certificate")
    base = pki.secure()
    with pytest.raises(ConfigError, match=r"certificate: expected a readable file, got '.*missing\.der'"):
        OpcuaConnector.from_config({"endpoint": E, **base, "certificate": str(tmp_path / "missing.der")})
    with pytest.raises(ConfigError, match=r"certificate: expected an X\.509 certificate \(DER or PEM\)"):
        OpcuaConnector.from_config({"endpoint": E, **base, "certificate": str(garbage)})
    with pytest.raises(ConfigError, match=r"private_key: expected an unencrypted private key"):
        OpcuaConnector.from_config({"endpoint": E, **base, "private_key": str(pki.agent_cert)})
    with pytest.raises(ConfigError, match=r"server_certificate: expected an X\.509 certificate"):
        OpcuaConnector.from_config({"endpoint": E, **base, "server_certificate": str(garbage)})
