"""Count the devices OPC UA servers list (DI DeviceSet, or a configured folder tree), and which send fresh data.

One collection round (:meth:`OpcuaConnector.observe`) runs for every configured endpoint at once; for each:

1. Keep one session across rounds; if it was lost, reconnect and forget every node id learnt on the old
   session (the server may have restarted with another address space).
2. Resolve ``device_folder`` (browse-name patterns from Objects, default ``DeviceSet``) with batched Browse
   requests, one per level. A path without wildcards is resolved once per session; when the server no
   longer knows the folder (``BadNodeIdUnknown``, e.g. after a reload) the error is counted and the path is
   browsed again in the same round.
3. Browse the folders' child objects (batched, continuation points drained with BrowseNext). A child is a
   device when its browse name matches ``device_name`` and its type definition is, or derives from, the
   type named ``device_type`` (default DI ``ComponentType``; the type hierarchy is browsed once per
   session). Nodes of namespace 0 — the Server object above all — are never devices, nor is a device whose
   ProductInstanceUri is the server's own application URI.
4. Browse each new device's variables once per session (batched) to find ``Manufacturer``(``Uri``),
   ``Model``/``ProductCode``, ``SerialNumber``, ``ProductInstanceUri``, ``DeviceHealth``, the enterprise
   property and the activity variable by browse name.
5. Read them in chunked Read requests of at most ``max_nodes_per_call`` nodes (lowered to the server's
   OperationLimits), up to ``max_requests_in_flight`` chunks at a time; properties without timestamps,
   the activity variable with both. Never one request per node.

Browse, BrowseNext and Read go through asyncua's request path; their answers are decoded by
:mod:`connectors.opcua.wire` into light tuples (:class:`~connectors.opcua.wire.Ref`,
:class:`~connectors.opcua.wire.Reading`), falling back to asyncua's decoder for what it does not know.

Identity, strongest first: ProductInstanceUri; Manufacturer + Model + SerialNumber; else a local identity
(endpoint + node id). Manufacturer, model and serial always go into the evidence, so the agent can merge a
device that another protocol names only by manufacturer + model + serial.

Status:

- REGISTERED: listed as a device;
- REACHABLE: the read of its activity variable answered with a status that is not one of
  :data:`NOT_REACHABLE_CODES` (unknown node, no communication with the device, ...);
- ACTIVE: reachable, DeviceHealth is not FAILURE, the activity variable's status is Good and its
  SourceTimestamp advanced since the previous round (when there is no previous round for the device: lies
  within ``freshness_window_s`` of now). A SourceTimestamp more than ``freshness_window_s`` in the future is
  never fresh. Uncertain and Bad values are not active.

Peer problems (server down or hanging, timeouts, unknown nodes, malformed answers) are counted by stable
error code (:meth:`health`), logged once per episode and endpoint, and never raised: the round returns what
it could. Every network call is bounded by ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Self, TypeVar
from urllib.parse import urlparse

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_der_private_key, load_pem_private_key

from connectors.base import (
    ConfigError,
    ConnectorBase,
    ConnectorHealth,
    DeviceIdentity,
    DeviceObservation,
    DeviceStatus,
    optional,
    refuse_unknown,
)
from connectors.opcua import wire
from connectors.opcua.wire import BrowseResult, Reading, Ref

logger = logging.getLogger(__name__)

KIND = "opcua"

#: Every optional key with a default; ``sample.toml`` is exactly these plus the required ``endpoint``.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "device_folder": "DeviceSet",
        "device_name": "*",
        "device_type": "ComponentType",
        "activity_variable": "Value",
        "enterprise_property": "EnterpriseUSCC",
        "freshness_window_s": 300,
        "timeout_s": 5,
        "max_nodes_per_call": 1000,
        "max_requests_in_flight": 4,
        "security_policy": "None",
        "security_mode": "None",
    }
)
REQUIRED_KEYS = ("endpoint",)  # or "endpoints", a list: exactly one of the two
OPTIONAL_KEYS_WITHOUT_DEFAULT = (
    "endpoints", "enterprise", "username", "password", "certificate", "private_key", "server_certificate",
)
SECURITY_POLICIES = ("None", "Basic256Sha256")
SECURITY_MODES = ("None", "Sign", "SignAndEncrypt")

MAX_NODES_PER_CALL_LIMIT = 100_000
MAX_REQUESTS_IN_FLIGHT_LIMIT = 64
MAX_ENDPOINTS = 1000
MAX_TIMEOUT_S = 300.0
MAX_BROWSE_NEXT_ROUNDS = 10_000  # a server that hands out continuation points for ever is cut off
MAX_TYPE_DEPTH = 32  # supertypes followed from a device's type definition
MAX_EVIDENCE_TEXT = 200
AGENT_APPLICATION_URI = "urn:tianping:agent:opcua"

DEVICE_HEALTH_FAILURE = 1  # DI DeviceHealthEnumeration
IDENTITY_PROPERTIES = ("Manufacturer", "ManufacturerUri", "Model", "ProductCode", "SerialNumber",
                       "ProductInstanceUri", "DeviceHealth")

#: Read results that mean "the device did not answer" (the node or the device behind it is not there).
NOT_REACHABLE_CODES = frozenset(
    {
        StatusCodes.BadNodeIdUnknown,
        StatusCodes.BadNodeIdInvalid,
        StatusCodes.BadAttributeIdInvalid,
        StatusCodes.BadNotReadable,
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadCommunicationError,
        StatusCodes.BadNotConnected,
        StatusCodes.BadNoCommunication,
        StatusCodes.BadServerNotConnected,
        StatusCodes.BadOutOfService,
        StatusCodes.BadWaitingForInitialData,
        StatusCodes.BadDeviceFailure,
        StatusCodes.BadTimeout,
    }
)
_UNKNOWN_NODE_CODES = frozenset({StatusCodes.BadNodeIdUnknown, StatusCodes.BadNodeIdInvalid})
_AUTH_CODES = frozenset({StatusCodes.BadUserAccessDenied, StatusCodes.BadIdentityTokenInvalid,
                         StatusCodes.BadIdentityTokenRejected, StatusCodes.BadSecurityChecksFailed,
                         StatusCodes.BadCertificateInvalid, StatusCodes.BadCertificateUntrusted})
#: Standard non-hierarchical reference types. Device folders and devices are browsed for *all* forward
#: references (ReferenceTypeId null, which servers answer without walking the reference type hierarchy for
#: every reference) and these are dropped on our side.
NON_HIERARCHICAL_REFERENCES = frozenset({
    ObjectIds.NonHierarchicalReferences, ObjectIds.HasModellingRule, ObjectIds.HasEncoding,
    ObjectIds.HasDescription, ObjectIds.HasTypeDefinition, ObjectIds.GeneratesEvent,
    ObjectIds.AlwaysGeneratesEvent, ObjectIds.FromState, ObjectIds.ToState, ObjectIds.HasCause,
    ObjectIds.HasEffect, ObjectIds.HasSubStateMachine, ObjectIds.HasTrueSubState, ObjectIds.HasFalseSubState,
    ObjectIds.HasCondition, ObjectIds.HasDictionaryEntry, ObjectIds.HasInterface, ObjectIds.HasAlarmSuppressionGroup,
    ObjectIds.AlarmGroupMember, ObjectIds.HasEffectDisable, ObjectIds.HasEffectEnable,
    ObjectIds.HasEffectSuppressed, ObjectIds.HasEffectUnsuppressed, ObjectIds.HasGuard,
})
_GLOB = re.compile(r"[*?\[]")
_USCC = re.compile(r"[0-9A-HJ-NP-RTUW-Y]{18}")  # GB 32100-2015 alphabet (no I, O, S, V, Z)
_T = TypeVar("_T")


def default_config() -> dict[str, Any]:
    """The defaults of every optional key (a fresh, mutable copy)."""
    return dict(DEFAULTS)


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpcuaConfig:
    """A checked connector configuration."""

    endpoints: tuple[str, ...]
    enterprise: str | None
    enterprise_property: str
    device_folder: tuple[str, ...]  # browse-name patterns from Objects; () is Objects itself
    device_name: str
    device_type: str  # "" accepts any type
    activity_variable: str
    freshness_window_s: float
    timeout_s: float
    max_nodes_per_call: int
    max_requests_in_flight: int
    security_policy: str
    security_mode: str
    certificate: Path | None
    private_key: Path | None
    server_certificate: Path | None
    application_uri: str  # from the certificate when there is one
    username: str | None
    password: str | None = field(repr=False)

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]


def _check_endpoint(endpoint: str, where: str) -> None:
    url = urlparse(endpoint)
    if url.scheme != "opc.tcp" or not url.hostname:
        raise ConfigError(f"{where}: expected an opc.tcp://host[:port][/path] URL, got {endpoint!r}")
    try:
        url.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(f"{where}: expected a port in 1..65535, got {endpoint!r}") from None


def _check_security(
    where: str, policy: str, mode: str, certificate: str | None, private_key: str | None,
    server_certificate: str | None,
) -> tuple[Path | None, Path | None, Path | None, str]:
    """Refuse bad combinations; load the certificate and key so that a bad file is refused now."""
    if policy not in SECURITY_POLICIES:
        raise ConfigError(f"{where}.security_policy: expected one of {list(SECURITY_POLICIES)}, got {policy!r}")
    if mode not in SECURITY_MODES:
        raise ConfigError(f"{where}.security_mode: expected one of {list(SECURITY_MODES)}, got {mode!r}")
    if policy == "None" and mode != "None":
        raise ConfigError(f"{where}.security_mode: expected 'None' with security_policy 'None', got {mode!r}")
    if policy != "None" and mode == "None":
        raise ConfigError(
            f"{where}.security_mode: expected 'Sign' or 'SignAndEncrypt' with security_policy {policy!r}, got 'None'")
    if mode == "None":
        given = [k for k, v in (("certificate", certificate), ("private_key", private_key),
                                ("server_certificate", server_certificate)) if v is not None]
        if given:
            raise ConfigError(f"{where}: {', '.join(given)} only apply with security_mode 'Sign' or "
                              f"'SignAndEncrypt', got them with security_mode 'None'")
        return None, None, None, AGENT_APPLICATION_URI
    if certificate is None or private_key is None:
        missing = " and ".join(k for k, v in (("certificate", certificate), ("private_key", private_key)) if v is None)
        raise ConfigError(f"{where}: security_mode {mode!r} expects certificate and private_key (paths to the "
                          f"agent's application instance certificate and its key), got no {missing}")
    cert = _load_certificate(Path(certificate), f"{where}.certificate")
    _load_private_key(Path(private_key), f"{where}.private_key")
    if server_certificate is not None:
        _load_certificate(Path(server_certificate), f"{where}.server_certificate")
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise ConfigError(f"{where}.certificate: expected a certificate whose subject alternative names hold the "
                          f"agent's application URI, got {certificate!r} without a URI")
    return (Path(certificate), Path(private_key), Path(server_certificate) if server_certificate else None,
            uris[0])


def _read_file(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: expected a readable file, got {str(path)!r} ({exc.strerror})") from None


def _load_certificate(path: Path, where: str) -> x509.Certificate:
    data = _read_file(path, where)
    try:
        return x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") else \
            x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{where}: expected an X.509 certificate (DER or PEM), got {str(path)!r}") from None


def _load_private_key(path: Path, where: str) -> None:
    data = _read_file(path, where)
    try:
        if data.lstrip().startswith(b"-----"):
            load_pem_private_key(data, password=None)
        else:
            load_der_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: expected an unencrypted private key (PEM or DER), got {str(path)!r}") from None


def _check_config(
    *,
    endpoints: Sequence[str],
    enterprise: str | None,
    enterprise_property: str,
    device_folder: str,
    device_name: str,
    device_type: str,
    activity_variable: str,
    freshness_window_s: float,
    timeout_s: float,
    max_nodes_per_call: int,
    max_requests_in_flight: int,
    security_policy: str,
    security_mode: str,
    certificate: str | None,
    private_key: str | None,
    server_certificate: str | None,
    username: str | None,
    password: str | None,
) -> OpcuaConfig:
    where = f"connectors.{KIND}"
    if not 1 <= len(endpoints) <= MAX_ENDPOINTS:
        raise ConfigError(f"{where}.endpoints: expected 1..{MAX_ENDPOINTS} URLs, got {len(endpoints)}")
    for i, endpoint in enumerate(endpoints):
        if not isinstance(endpoint, str):
            raise ConfigError(f"{where}.endpoints[{i}]: expected str, got {type(endpoint).__name__} {endpoint!r}")
        _check_endpoint(endpoint, f"{where}.endpoint" if len(endpoints) == 1 else f"{where}.endpoints[{i}]")
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"{where}.endpoints: expected each URL once, got {list(endpoints)!r}")
    if enterprise is not None and not _USCC.fullmatch(enterprise):
        raise ConfigError(
            f"{where}.enterprise: expected an 18-character unified social credit code, got {enterprise!r}"
        )
    path = tuple(p.strip() for p in device_folder.split("/")) if device_folder.strip() else ()
    if any(not part for part in path):
        raise ConfigError(f"{where}.device_folder: expected browse-name patterns from Objects separated by '/' "
                          f"(or '' for Objects itself), got {device_folder!r}")
    if not device_name.strip():
        raise ConfigError(f"{where}.device_name: expected a browse-name pattern such as '*', got {device_name!r}")
    if not activity_variable.strip():
        raise ConfigError(f"{where}.activity_variable: expected a browse name, got {activity_variable!r}")
    if not (math.isfinite(freshness_window_s) and freshness_window_s > 0):
        raise ConfigError(f"{where}.freshness_window_s: expected a number > 0, got {freshness_window_s!r}")
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        raise ConfigError(f"{where}.timeout_s: expected a number in (0, {MAX_TIMEOUT_S:g}], got {timeout_s!r}")
    if not 1 <= max_nodes_per_call <= MAX_NODES_PER_CALL_LIMIT:
        raise ConfigError(
            f"{where}.max_nodes_per_call: expected an integer in 1..{MAX_NODES_PER_CALL_LIMIT}, "
            f"got {max_nodes_per_call!r}"
        )
    if not 1 <= max_requests_in_flight <= MAX_REQUESTS_IN_FLIGHT_LIMIT:
        raise ConfigError(
            f"{where}.max_requests_in_flight: expected an integer in 1..{MAX_REQUESTS_IN_FLIGHT_LIMIT}, "
            f"got {max_requests_in_flight!r}"
        )
    cert, key, server_cert, application_uri = _check_security(
        where, security_policy, security_mode, certificate, private_key, server_certificate)
    if (username is None) != (password is None):
        raise ConfigError(f"{where}: username and password go together; got only one of them")
    if username is not None and not username:
        raise ConfigError(f"{where}.username: expected a non-empty string, got {username!r}")
    if username is not None and security_mode == "None":
        logger.warning("%s: the password for %r may cross the network in clear text with security_mode 'None'",
                       where, username)
    return OpcuaConfig(
        endpoints=tuple(endpoints),
        enterprise=enterprise,
        enterprise_property=enterprise_property.strip(),
        device_folder=path,
        device_name=device_name.strip(),
        device_type=device_type.strip(),
        activity_variable=activity_variable.strip(),
        freshness_window_s=float(freshness_window_s),
        timeout_s=float(timeout_s),
        max_nodes_per_call=max_nodes_per_call,
        max_requests_in_flight=max_requests_in_flight,
        security_policy=security_policy,
        security_mode=security_mode,
        certificate=cert,
        private_key=key,
        server_certificate=server_cert,
        application_uri=application_uri,
        username=username,
        password=password,
    )


# --- per-endpoint, per-session state ----------------------------------------------------------------------


@dataclass(slots=True)
class _Session:
    """What one connection learnt: node ids are only trusted within it."""

    client: Client
    namespaces: list[str] = field(default_factory=list)
    server_uris: frozenset[str] = frozenset()
    read_chunk: int = 1000
    browse_chunk: int = 1000
    folders: list[ua.NodeId] | None = None  # resolved device_folder (kept when the path has no wildcard)
    type_match: dict[ua.NodeId, bool] = field(default_factory=dict)  # type definition -> is a device type
    # device node -> {browse name -> variable node}; filled once per device per session
    children: dict[ua.NodeId, dict[str, ua.NodeId]] = field(default_factory=dict)
    broken: bool = False  # a call failed: no further calls, the session is dropped after the round
    peer_gone: bool = False  # no graceful close: the peer is gone or does not answer


@dataclass(slots=True)
class _Endpoint:
    url: str
    session: _Session | None = None
    last_source_ts: dict[str, datetime] = field(default_factory=dict)  # local id -> SourceTimestamp last round
    logged: set[str] = field(default_factory=set)  # error codes already logged in the current episode
    errors: int = 0
    requests: int = 0  # service calls in the current round
    last_round: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Device:
    nodeid: ua.NodeId
    local_id: str
    values: dict[str, Reading] = field(default_factory=dict)


class _RoundAborted(Exception):
    """The session failed mid-round; the error is already counted."""


class OpcuaConnector(ConnectorBase):
    """Observe the devices of one or more OPC UA servers (see the module docstring)."""

    kind: ClassVar[str] = KIND

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        endpoints: Sequence[str] | None = None,
        enterprise: str | None = None,
        enterprise_property: str = DEFAULTS["enterprise_property"],
        device_folder: str = DEFAULTS["device_folder"],
        device_name: str = DEFAULTS["device_name"],
        device_type: str = DEFAULTS["device_type"],
        activity_variable: str = DEFAULTS["activity_variable"],
        freshness_window_s: float = DEFAULTS["freshness_window_s"],
        timeout_s: float = DEFAULTS["timeout_s"],
        max_nodes_per_call: int = DEFAULTS["max_nodes_per_call"],
        max_requests_in_flight: int = DEFAULTS["max_requests_in_flight"],
        security_policy: str = DEFAULTS["security_policy"],
        security_mode: str = DEFAULTS["security_mode"],
        certificate: str | None = None,
        private_key: str | None = None,
        server_certificate: str | None = None,
        username: str | None = None,
        password: str | None = None,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        where = f"connectors.{KIND}"
        if (endpoint is None) == (endpoints is None):
            got = "both" if endpoint is not None else "neither"
            raise ConfigError(f"{where}: expected exactly one of 'endpoint' (a URL) or 'endpoints' (a list of "
                              f"URLs), got {got}")
        self.config = _check_config(
            endpoints=[endpoint] if endpoint is not None else list(endpoints or ()),
            enterprise=enterprise,
            enterprise_property=enterprise_property,
            device_folder=device_folder,
            device_name=device_name,
            device_type=device_type,
            activity_variable=activity_variable,
            freshness_window_s=freshness_window_s,
            timeout_s=timeout_s,
            max_nodes_per_call=max_nodes_per_call,
            max_requests_in_flight=max_requests_in_flight,
            security_policy=security_policy,
            security_mode=security_mode,
            certificate=certificate,
            private_key=private_key,
            server_certificate=server_certificate,
            username=username,
            password=password,
        )
        super().__init__(source=",".join(self.config.endpoints))
        self._now = now
        self._endpoints = [_Endpoint(url) for url in self.config.endpoints]
        self._last_round: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, now: Callable[[], datetime] = utc_now) -> Self:
        where = f"connectors.{KIND}"
        refuse_unknown(cfg, {*REQUIRED_KEYS, *DEFAULTS, *OPTIONAL_KEYS_WITHOUT_DEFAULT}, where=where)
        if "endpoint" not in cfg and "endpoints" not in cfg:
            raise ConfigError(f"{where}: missing required key 'endpoint' (or 'endpoints', a list of URLs)")
        number = (int, float)

        def text(key: str) -> Any:
            return optional(cfg, key, str, DEFAULTS.get(key), where=where)

        return cls(
            endpoint=optional(cfg, "endpoint", str, None, where=where),
            endpoints=optional(cfg, "endpoints", list, None, where=where),
            enterprise=text("enterprise"),
            enterprise_property=text("enterprise_property"),
            device_folder=text("device_folder"),
            device_name=text("device_name"),
            device_type=text("device_type"),
            activity_variable=text("activity_variable"),
            freshness_window_s=optional(cfg, "freshness_window_s", number, DEFAULTS["freshness_window_s"],
                                        where=where),
            timeout_s=optional(cfg, "timeout_s", number, DEFAULTS["timeout_s"], where=where),
            max_nodes_per_call=optional(cfg, "max_nodes_per_call", int, DEFAULTS["max_nodes_per_call"],
                                        where=where),
            max_requests_in_flight=optional(cfg, "max_requests_in_flight", int, DEFAULTS["max_requests_in_flight"],
                                            where=where),
            security_policy=text("security_policy"),
            security_mode=text("security_mode"),
            certificate=text("certificate"),
            private_key=text("private_key"),
            server_certificate=text("server_certificate"),
            username=text("username"),
            password=text("password"),
            now=now,
        )

    # --- contract ---------------------------------------------------------------------------------------

    async def observe(self) -> Sequence[DeviceObservation]:
        now = self._now()
        rounds = await asyncio.gather(*(self._observe_endpoint(ep, now) for ep in self._endpoints))
        observations = [o for r in rounds for o in r]
        self._last_round = {
            "requests": sum(ep.last_round.get("requests", 0) for ep in self._endpoints),
            "devices": len(observations),
            "active": sum(1 for o in observations if o.status is DeviceStatus.ACTIVE),
        }
        return observations

    def health(self) -> ConnectorHealth:
        return ConnectorHealth(
            kind=self.kind,
            source=self.source,
            errors=dict(self._errors),
            extra={
                "connected": all(ep.session is not None for ep in self._endpoints),
                "last_round": dict(self._last_round),
                "decoder_fallbacks": wire.fallbacks(),
                "endpoints": {ep.url: {"connected": ep.session is not None, "last_round": dict(ep.last_round)}
                              for ep in self._endpoints},
            },
        )

    async def aclose(self) -> None:
        await asyncio.gather(*(self._drop_session(ep) for ep in self._endpoints))

    # --- one endpoint's round ---------------------------------------------------------------------------

    async def _observe_endpoint(self, ep: _Endpoint, now: datetime) -> list[DeviceObservation]:
        ep.requests = 0
        errors_before = ep.errors
        devices: list[_Device] = []
        session: _Session | None = None
        try:
            session = await self._ensure_session(ep)
            devices = await self._list_devices(ep, session)
            await self._learn_children(ep, session, devices)
            await self._read_values(ep, session, devices)
        except _RoundAborted:
            pass
        session = ep.session
        server_uris = session.server_uris if session is not None else frozenset()
        if session is not None and session.broken:
            await self._drop_session(ep)
        observations = [self._observation(ep, device, now) for device in devices
                        if _text(device.values.get("ProductInstanceUri")) not in server_uris]
        self._remember_timestamps(ep, devices)
        ep.last_round = {
            "requests": ep.requests,
            "devices": len(observations),
            "active": sum(1 for o in observations if o.status is DeviceStatus.ACTIVE),
        }
        if ep.errors == errors_before:
            ep.logged.clear()  # a clean round ends the episode: the next failure is logged again
        return observations

    # --- session ----------------------------------------------------------------------------------------

    async def _ensure_session(self, ep: _Endpoint) -> _Session:
        session = ep.session
        if session is not None and session.client.uaclient.state is UaClientState.CONNECTED:
            return session
        if session is not None:
            self._fail(ep, "opcua_connection_lost", "OPC UA session to %s was lost; reconnecting", ep.url)
            session.peer_gone = True
            await self._drop_session(ep)
        cfg = self.config
        client = Client(ep.url, timeout=cfg.timeout_s, watchdog_intervall=max(cfg.timeout_s, 1.0))
        client.name = client.description = "Tianping edge agent"
        client.application_uri = cfg.application_uri
        client.session_timeout = 600_000  # ms; what most servers grant, so none has to revise it
        if cfg.username is not None and cfg.password is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password)
        try:
            async with asyncio.timeout(cfg.timeout_s):
                if cfg.security_mode != "None":
                    await client.set_security(
                        SecurityPolicyBasic256Sha256,
                        certificate=str(cfg.certificate),
                        private_key=str(cfg.private_key),
                        server_certificate=str(cfg.server_certificate) if cfg.server_certificate else None,
                        mode=getattr(ua.MessageSecurityMode, cfg.security_mode),
                    )
                await client.connect()
        except asyncio.CancelledError:
            client.disconnect_socket()
            raise
        except Exception as exc:  # any failure to connect is a peer problem
            client.disconnect_socket()  # no session to close gracefully; a hung peer would not answer anyway
            self._connect_failed(ep, exc)
            raise _RoundAborted from exc
        ep.session = session = _Session(client, read_chunk=cfg.max_nodes_per_call,
                                        browse_chunk=cfg.max_nodes_per_call)
        await self._prepare_session(ep, session)
        logger.info("connected to OPC UA server %s (security %s/%s)", ep.url, cfg.security_policy,
                    cfg.security_mode)
        return session

    def _connect_failed(self, ep: _Endpoint, exc: BaseException) -> None:
        cfg = self.config
        if isinstance(exc, TimeoutError):
            self._fail(ep, "opcua_timeout", "OPC UA server %s did not complete the connection within %g s "
                       "(a hung peer or a firewall dropping packets)", ep.url, cfg.timeout_s)
        elif isinstance(exc, UaStatusCodeError) and exc.code in _AUTH_CODES:
            self._fail(ep, "opcua_auth_failed", "OPC UA server %s refused the agent's identity (user %r, security "
                       "%s/%s): %s", ep.url, cfg.username, cfg.security_policy, cfg.security_mode, _describe(exc))
        else:
            self._fail(ep, "opcua_connect_failed", "cannot connect to OPC UA server %s (security %s/%s): %s",
                       ep.url, cfg.security_policy, cfg.security_mode, _describe(exc))

    async def _prepare_session(self, ep: _Endpoint, session: _Session) -> None:
        """Namespace table, the server's own URIs and operation limits."""
        server_nodes = (
            ObjectIds.Server_NamespaceArray,
            ObjectIds.Server_ServerArray,
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse,
        )
        values = await self._read(ep, session, [_ns0(i) for i in server_nodes], timestamps=False)
        namespaces, server_uris, max_read, max_browse = (
            v.value if v is not None and _good(v) else None for v in values)
        if isinstance(namespaces, list) and all(isinstance(n, str) for n in namespaces):
            session.namespaces = namespaces
        if isinstance(server_uris, list):
            session.server_uris = frozenset(u for u in server_uris if isinstance(u, str) and u)
        session.read_chunk = _within_limit(session.read_chunk, max_read)
        session.browse_chunk = _within_limit(session.browse_chunk, max_browse)

    async def _drop_session(self, ep: _Endpoint) -> None:
        session, ep.session = ep.session, None
        if session is None:
            return
        if session.peer_gone:
            session.client.disconnect_socket()  # do not wait for a peer that is gone or not answering
        else:
            await _close_quietly(session.client, self.config.timeout_s)

    # --- finding the devices ----------------------------------------------------------------------------

    async def _folders(self, ep: _Endpoint, session: _Session) -> list[ua.NodeId]:
        """The nodes ``device_folder`` names (browsed level by level, one batched Browse per level)."""
        if session.folders is not None:
            return session.folders
        level = [_ns0(ObjectIds.ObjectsFolder)]
        walked = "Objects"
        for pattern in self.config.device_folder:
            found: dict[ua.NodeId, None] = {}
            for refs in await self._browse(ep, session, level, node_class=ua.NodeClass.Object):
                for ref in refs or ():
                    if _candidate(ref) and fnmatch.fnmatchcase(ref.browse_name or "", pattern):
                        found.setdefault(_plain(ref.node_id))
            walked += "/" + pattern
            if not found:
                self._fail(ep, "opcua_device_folder_missing", "OPC UA server %s has nothing matching %s",
                           ep.url, walked)
                raise _RoundAborted
            level = list(found)
        if not any(_GLOB.search(p) for p in self.config.device_folder):
            session.folders = level  # a fixed path: resolved once per session
        return level

    async def _list_devices(self, ep: _Endpoint, session: _Session) -> list[_Device]:
        folders = await self._folders(ep, session)
        results = await self._browse(ep, session, folders, node_class=ua.NodeClass.Object, quiet_unknown=True,
                                     type_definitions=True)
        if session.folders is not None and any(r is None for r in results):
            # A folder learnt on this session is gone: the server restarted its address space.
            self._fail(ep, "opcua_node_unknown", "OPC UA server %s no longer knows the device folder %s "
                       "(restarted or reloaded with new node ids); browsing again from Objects",
                       ep.url, ", ".join(f.to_string() for f in folders))
            session.folders = None
            session.children.clear()
            session.type_match.clear()
            folders = await self._folders(ep, session)
            results = await self._browse(ep, session, folders, node_class=ua.NodeClass.Object, type_definitions=True)
        candidates: dict[ua.NodeId, Ref] = {}
        for refs in results:
            for ref in refs or ():
                if _candidate(ref) and fnmatch.fnmatchcase(ref.browse_name or "", self.config.device_name):
                    candidates.setdefault(_plain(ref.node_id), ref)
        if self.config.device_type:
            await self._learn_types(ep, session, {_plain(r.type_definition) for r in candidates.values()})
            candidates = {n: r for n, r in candidates.items()
                          if session.type_match.get(_plain(r.type_definition), False)}
        for gone in set(session.children) - set(candidates):
            del session.children[gone]
        return [_Device(nodeid, self._stable_id(session, nodeid)) for nodeid in candidates]

    async def _learn_types(self, ep: _Endpoint, session: _Session, types: set[ua.NodeId]) -> None:
        """Whether each type definition is, or derives from, the type named ``device_type``: read the
        types' browse names, then follow HasSubtype upwards, one batched request per level."""
        wanted = self.config.device_type
        new = [t for t in types if t not in session.type_match]
        if not new:
            return
        names = await self._read(ep, session, new, attribute=AttributeIds.BrowseName, timestamps=False)
        current: dict[ua.NodeId, ua.NodeId] = {}  # type asked about -> the supertype reached so far
        for t, value in zip(new, names, strict=True):
            name = value.value if value is not None else None
            if isinstance(name, ua.QualifiedName) and name.Name == wanted:
                session.type_match[t] = True
            elif t.is_null() or t == _ns0(ObjectIds.BaseObjectType):
                session.type_match[t] = False
            else:
                current[t] = t
        for _ in range(MAX_TYPE_DEPTH):
            if not current:
                break
            asked = list(current)
            results = await self._browse(ep, session, [current[t] for t in asked], node_class=ua.NodeClass.ObjectType,
                                         direction=ua.BrowseDirection.Inverse, reference=ObjectIds.HasSubtype)
            for t, refs in zip(asked, results, strict=True):
                parents = [r for r in refs or () if _local(r.node_id)]
                if not parents:
                    session.type_match[t] = False
                    del current[t]
                elif parents[0].browse_name == wanted:
                    session.type_match[t] = True
                    del current[t]
                elif _plain(parents[0].node_id) == _ns0(ObjectIds.BaseObjectType):
                    session.type_match[t] = False
                    del current[t]
                else:
                    current[t] = _plain(parents[0].node_id)
        for t in current:
            session.type_match[t] = False  # deeper than any sane type hierarchy

    async def _learn_children(self, ep: _Endpoint, session: _Session, devices: list[_Device]) -> None:
        cfg = self.config
        wanted = {*IDENTITY_PROPERTIES, cfg.activity_variable}
        if cfg.enterprise_property:
            wanted.add(cfg.enterprise_property)
        new = [d.nodeid for d in devices if d.nodeid not in session.children]
        if not new:
            return
        results = await self._browse(ep, session, new, node_class=ua.NodeClass.Variable)
        for nodeid, refs in zip(new, results, strict=True):
            if refs is None:
                continue  # counted by _browse; the device stays REGISTERED and is browsed again next round
            found: dict[str, ua.NodeId] = {}
            for ref in refs:
                name = ref.browse_name
                if name in wanted and name not in found and _local(ref.node_id):
                    found[name] = _plain(ref.node_id)
            if cfg.activity_variable not in found:
                self._fail(ep, "opcua_activity_variable_missing", "OPC UA device %s on %s has no variable %r",
                           nodeid.to_string(), ep.url, cfg.activity_variable)
            session.children[nodeid] = found

    async def _read_values(self, ep: _Endpoint, session: _Session, devices: list[_Device], *,
                           again: bool = True) -> None:
        activity = self.config.activity_variable
        wanted: list[tuple[_Device, str, ua.NodeId]] = [
            (device, name, nodeid)
            for device in devices
            for name, nodeid in session.children.get(device.nodeid, {}).items()
        ]
        props = [w for w in wanted if w[1] != activity]
        values = [w for w in wanted if w[1] == activity]
        # Properties need no timestamps; the activity variable needs both (SourceTimestamp decides).
        read_props, read_values = await asyncio.gather(
            self._read(ep, session, [n for _, _, n in props], timestamps=False, keep_partial=True),
            self._read(ep, session, [n for _, _, n in values], timestamps=True, keep_partial=True),
        )
        stale: dict[ua.NodeId, _Device] = {}
        for batch, results in ((props, read_props), (values, read_values)):
            # Keep what the chunks read before a failure: those devices answered.
            for (device, name, _), value in zip(batch, results, strict=True):
                if value is None:
                    continue
                if _code(value) in _UNKNOWN_NODE_CODES:
                    stale[device.nodeid] = device
                device.values[name] = value
        if session.broken:
            raise _RoundAborted
        if not stale:
            return
        self._fail(ep, "opcua_node_unknown", "OPC UA server %s no longer knows variables of %d device(s), first "
                   "%s (restarted or reloaded with new node ids); browsing them again", ep.url, len(stale),
                   next(iter(stale)).to_string())
        for nodeid in stale:
            session.children.pop(nodeid, None)
        if again:  # once per round: a server that forgets again is counted again next round
            again_devices = list(stale.values())
            for device in again_devices:
                device.values.clear()
            await self._learn_children(ep, session, again_devices)
            await self._read_values(ep, session, again_devices, again=False)

    # --- services, chunked ------------------------------------------------------------------------------

    async def _read(
        self, ep: _Endpoint, session: _Session, nodes: list[ua.NodeId], *,
        attribute: int = AttributeIds.Value, timestamps: bool, keep_partial: bool = False,
    ) -> list[Reading | None]:
        """Read one attribute of every node in chunks, up to ``max_requests_in_flight`` at a time. A malformed
        answer reads as BadUnexpectedError. With ``keep_partial``, a failed session leaves ``None`` for the chunks
        not read (the caller keeps the rest); otherwise it raises."""
        out: list[Reading | None] = [None] * len(nodes)
        to_return = ua.TimestampsToReturn.Both if timestamps else ua.TimestampsToReturn.Neither

        async def one(start: int, chunk: list[ua.NodeId]) -> None:
            params = ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=to_return,
                NodesToRead=wire.read_value_ids(chunk, attribute),
            )
            results = await self._call(ep, session, "Read", partial(wire.read, session.client.uaclient, params))
            if len(results) != len(chunk):
                self._fail(ep, "opcua_malformed_answer", "OPC UA server %s answered %d results to a Read of %d nodes",
                           ep.url, len(results), len(chunk))
                results = [Reading(None, StatusCodes.BadUnexpectedError, None, None)] * len(chunk)
            out[start : start + len(chunk)] = results

        await self._pipelined(one, nodes, session.read_chunk, keep_partial=keep_partial)
        return out

    async def _pipelined(self, one: Callable[[int, list[_T]], Awaitable[None]], items: list[_T], size: int, *,
                         keep_partial: bool = False) -> None:
        """Run ``one`` over the chunks of ``items``, at most ``max_requests_in_flight`` at a time."""
        gate = asyncio.Semaphore(self.config.max_requests_in_flight)

        async def gated(start: int, chunk: list[_T]) -> None:
            async with gate:
                await one(start, chunk)

        outcomes = await asyncio.gather(*(gated(start, chunk) for start, chunk in _chunks(items, size)),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, _RoundAborted):
                raise outcome
        if not keep_partial and any(isinstance(o, _RoundAborted) for o in outcomes):
            raise _RoundAborted

    async def _browse(
        self, ep: _Endpoint, session: _Session, nodes: list[ua.NodeId], *, node_class: ua.NodeClass,
        direction: ua.BrowseDirection = ua.BrowseDirection.Forward, reference: int = ObjectIds.Null,
        quiet_unknown: bool = False, type_definitions: bool = False,
    ) -> list[list[Ref] | None]:
        """References of every node (to one node class), draining continuation points. ``None`` for a node
        whose browse failed (counted; with ``quiet_unknown`` an unknown node is left to the caller)."""
        out: list[list[Ref] | None] = [None] * len(nodes)
        # Only what is used: the reference type (to drop non-hierarchical ones), the browse name, and for
        # device candidates the type definition. Less for the server to encode and for us to decode.
        mask = int(ua.BrowseResultMask.ReferenceTypeId) | int(ua.BrowseResultMask.BrowseName)
        if type_definitions:
            mask |= int(ua.BrowseResultMask.TypeDefinition)

        async def one(start: int, chunk: list[ua.NodeId]) -> None:
            params = ua.BrowseParameters(
                View=ua.ViewDescription(),
                RequestedMaxReferencesPerNode=0,
                NodesToBrowse=[
                    ua.BrowseDescription(
                        NodeId=n,
                        BrowseDirection=direction,
                        ReferenceTypeId=_ns0(reference),
                        IncludeSubtypes=False,
                        NodeClassMask=int(node_class),
                        ResultMask=mask,
                    )
                    for n in chunk
                ],
            )
            results = await self._call(ep, session, "Browse", partial(wire.browse, session.client.uaclient, params))
            if len(results) != len(chunk):
                self._fail(ep, "opcua_malformed_answer", "OPC UA server %s answered %d results to a Browse of %d "
                           "nodes", ep.url, len(results), len(chunk))
                return
            refs: list[list[Ref] | None] = []
            pending: dict[int, bytes] = {}
            for i, (nodeid, result) in enumerate(zip(chunk, results, strict=True)):
                if not _browse_ok(result):
                    if not (quiet_unknown and result.status in _UNKNOWN_NODE_CODES):
                        self._browse_failed(ep, nodeid, result)
                    refs.append(None)
                    continue
                refs.append(_hierarchical(result.references) if reference == ObjectIds.Null else result.references)
                if result.continuation_point:
                    pending[i] = result.continuation_point
            await self._drain(ep, session, chunk, refs, pending)
            out[start : start + len(chunk)] = refs

        await self._pipelined(one, nodes, session.browse_chunk)
        return out

    async def _drain(
        self,
        ep: _Endpoint,
        session: _Session,
        chunk: list[ua.NodeId],
        refs: list[list[Ref] | None],
        pending: dict[int, bytes],
    ) -> None:
        rounds = 0
        while pending:
            rounds += 1
            if rounds > MAX_BROWSE_NEXT_ROUNDS:
                self._fail(ep, "opcua_malformed_answer", "OPC UA server %s kept returning continuation points",
                           ep.url)
                release = ua.BrowseNextParameters(ReleaseContinuationPoints=True,
                                                  ContinuationPoints=list(pending.values()))
                await self._call(ep, session, "BrowseNext", partial(wire.browse_next, session.client.uaclient, release))
                for i in pending:
                    refs[i] = None
                return
            batch = list(pending.items())[: session.browse_chunk]
            params = ua.BrowseNextParameters(ReleaseContinuationPoints=False, ContinuationPoints=[c for _, c in batch])
            results = await self._call(ep, session, "BrowseNext", partial(wire.browse_next, session.client.uaclient,
                                                                          params))
            if len(results) != len(batch):
                self._fail(ep, "opcua_malformed_answer", "OPC UA server %s answered %d results to a BrowseNext of "
                           "%d", ep.url, len(results), len(batch))
                for i, _ in batch:
                    refs[i] = None
                    del pending[i]
                continue
            for (i, _), result in zip(batch, results, strict=True):
                del pending[i]
                known = refs[i]
                if not _browse_ok(result) or known is None:
                    self._browse_failed(ep, chunk[i], result)
                    refs[i] = None
                    continue
                known.extend(_hierarchical(result.references))
                if result.continuation_point:
                    pending[i] = result.continuation_point

    async def _call(self, ep: _Endpoint, session: _Session, service: str, request: Callable[[], Awaitable[Any]]
                    ) -> Any:
        """One service call under the configured timeout. The first failure marks the session broken (it is
        dropped at the end of the round) and is counted; calls after it are not sent."""
        if session.broken:
            raise _RoundAborted
        ep.requests += 1
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await request()
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            code, text = "opcua_timeout", f"no answer within {self.config.timeout_s:g} s"
            session.peer_gone = True
        except (ConnectionError, OSError) as exc:
            code, text = "opcua_connection_lost", _describe(exc)
        except UaStatusCodeError as exc:
            code, text = "opcua_service_fault", _describe(exc)
        except Exception as exc:  # an answer asyncua could not decode is a peer problem
            code, text = "opcua_malformed_answer", _describe(exc)
        if not session.broken:
            session.broken = True
            self._fail(ep, code, "OPC UA %s to %s failed: %s", service, ep.url, text)
        raise _RoundAborted

    def _browse_failed(self, ep: _Endpoint, nodeid: ua.NodeId, result: BrowseResult) -> None:
        name = _status(result.status).name
        code = "opcua_node_unknown" if result.status in _UNKNOWN_NODE_CODES else "opcua_browse_failed"
        self._fail(ep, code, "OPC UA server %s refused to browse %s: %s", ep.url, nodeid.to_string(), name)

    # --- turning answers into observations --------------------------------------------------------------

    def _observation(self, ep: _Endpoint, device: _Device, now: datetime) -> DeviceObservation:
        cfg = self.config
        text = {name: _text(device.values.get(name)) for name in IDENTITY_PROPERTIES if name != "DeviceHealth"}
        manufacturer = text["Manufacturer"] or text["ManufacturerUri"]
        model = text["Model"] or text["ProductCode"]
        serial, uri = text["SerialNumber"], text["ProductInstanceUri"]
        if uri:
            identity = DeviceIdentity.product_instance_uri(uri)
        elif manufacturer and model and serial:
            identity = DeviceIdentity.manufacturer_model_serial(manufacturer, model, serial)
        else:
            identity = DeviceIdentity.local(KIND, ep.url, device.local_id)
        evidence: dict[str, Any] = {"node_id": device.local_id}
        for key, value in (("manufacturer", manufacturer), ("model", model), ("serial", serial),
                           ("product_instance_uri", uri)):
            if value:
                evidence[key] = value
        activity = device.values.get(cfg.activity_variable)
        status = DeviceStatus.REGISTERED
        if activity is not None and _code(activity) not in NOT_REACHABLE_CODES:
            status = DeviceStatus.REACHABLE
            evidence.update(_data_value_evidence(activity))
            health = _health(device.values.get("DeviceHealth"))
            if health is not None:
                evidence["device_health"] = health
            if health != DEVICE_HEALTH_FAILURE and _good(activity) and self._fresh(ep, device, activity, now):
                status = DeviceStatus.ACTIVE
        return DeviceObservation(
            protocol=KIND,
            source=ep.url,
            local_id=device.local_id,
            identity=identity,
            status=status,
            observed_at=now,
            enterprise=self._enterprise(ep, device),
            evidence=evidence,
        )

    def _fresh(self, ep: _Endpoint, device: _Device, value: Reading, now: datetime) -> bool:
        ts = _aware(value.source_timestamp)
        if ts is None:
            return False
        window = timedelta(seconds=self.config.freshness_window_s)
        if ts > now + window:
            return False  # a clock far ahead proves nothing about fresh data
        previous = ep.last_source_ts.get(device.local_id)
        if previous is None:
            return abs(now - ts) <= window
        return ts > previous

    def _remember_timestamps(self, ep: _Endpoint, devices: list[_Device]) -> None:
        seen: dict[str, datetime] = {}
        for device in devices:
            activity = device.values.get(self.config.activity_variable)
            ts = _aware(activity.source_timestamp) if activity is not None else None
            if ts is not None:
                seen[device.local_id] = ts
            elif device.local_id in ep.last_source_ts:
                seen[device.local_id] = ep.last_source_ts[device.local_id]
        if devices or ep.session is not None:
            ep.last_source_ts = seen
        # else: the server was unreachable; keep what we knew so the next round compares against it

    def _enterprise(self, ep: _Endpoint, device: _Device) -> str | None:
        prop = self.config.enterprise_property
        if prop:
            raw = _text(device.values.get(prop))
            if raw:
                code = raw.upper()
                if _USCC.fullmatch(code):
                    return code
                self._fail(ep, "opcua_enterprise_malformed", "OPC UA device %s on %s names enterprise %r, "
                           "not a unified social credit code", device.local_id, ep.url, raw[:40])
        return self.config.enterprise

    def _stable_id(self, session: _Session, nodeid: ua.NodeId) -> str:
        """The node id with its namespace URI instead of its index (indexes may change across restarts)."""
        text = nodeid.to_string()
        idx = nodeid.NamespaceIndex
        uri = session.namespaces[idx] if 0 <= idx < len(session.namespaces) else None
        if idx == 0 or uri is None:
            return text
        return f"nsu={uri};{text.split(';', 1)[1]}"

    def _fail(self, ep: _Endpoint, code: str, message: str, *args: Any) -> None:
        """Count an error; log it once per episode and endpoint (until a round without errors)."""
        self.count_error(code)
        ep.errors += 1
        if code in ep.logged:
            logger.debug(message, *args)
        else:
            ep.logged.add(code)
            logger.warning(message + " [%s]", *args, code)


# --- helpers ----------------------------------------------------------------------------------------------


def _ns0(identifier: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(identifier))


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _within_limit(chunk: int, limit: Any) -> int:
    """The chunk size lowered to a server's advertised OperationLimit (0 or absent: no limit)."""
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return min(chunk, limit)
    return chunk


def _chunks(items: list[_T], size: int) -> Iterator[tuple[int, list[_T]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


async def _close_quietly(client: Client, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await client.disconnect()
    except asyncio.CancelledError:
        client.disconnect_socket()
        raise
    except Exception:  # the peer is gone or misbehaving; the socket is closed below anyway
        logger.debug("closing the OPC UA client raised", exc_info=True)
    client.disconnect_socket()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _code(value: Reading) -> int:
    return value.status


def _good(value: Reading) -> bool:
    return value.status & 0xC000_0000 == 0  # the severity bits: Good


def _browse_ok(result: BrowseResult) -> bool:
    return result.status & 0xC000_0000 == 0


def _local(nodeid: ua.NodeId) -> bool:
    return not (isinstance(nodeid, ua.ExpandedNodeId) and (nodeid.ServerIndex or nodeid.NamespaceUri))


def _candidate(ref: Ref) -> bool:
    """A local node outside namespace 0: the Server object and the standard nodes are never devices."""
    return _local(ref.node_id) and ref.node_id.NamespaceIndex != 0 and ref.browse_name is not None


def _hierarchical(refs: Sequence[Ref]) -> list[Ref]:
    """The references that are not of a standard non-hierarchical type."""
    return [r for r in refs if not (r.reference_type.NamespaceIndex == 0
                                    and r.reference_type.Identifier in NON_HIERARCHICAL_REFERENCES)]


def _plain(nodeid: ua.NodeId) -> ua.NodeId:
    if type(nodeid) is ua.NodeId:
        return nodeid
    return ua.NodeId(nodeid.Identifier, nodeid.NamespaceIndex, nodeid.NodeIdType)


def _aware(ts: datetime | None) -> datetime | None:
    if not isinstance(ts, datetime):
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _text(value: Reading | None) -> str:
    """A String or LocalizedText property's text, stripped; empty when absent, bad or of another type."""
    if value is None or not _good(value):
        return ""
    raw = value.value
    if isinstance(raw, ua.LocalizedText):
        raw = raw.Text
    return raw.strip() if isinstance(raw, str) else ""


def _health(value: Reading | None) -> int | None:
    if value is None or not _good(value):
        return None
    raw = value.value
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def _data_value_evidence(value: Reading) -> dict[str, Any]:
    raw = value.value
    shown: Any
    if raw is None or isinstance(raw, bool | int | str):
        shown = raw[:MAX_EVIDENCE_TEXT] if isinstance(raw, str) else raw
    elif isinstance(raw, float):
        shown = raw if math.isfinite(raw) else repr(raw)
    else:
        shown = repr(raw)[:MAX_EVIDENCE_TEXT]
    source, server = _aware(value.source_timestamp), _aware(value.server_timestamp)
    return {
        "value": shown,
        "status": _status(value.status).name,
        "source_timestamp": source.isoformat() if source else None,
        "server_timestamp": server.isoformat() if server else None,
    }
