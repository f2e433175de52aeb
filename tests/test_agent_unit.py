"""Fast tests of the agent's pure parts: merging, tiers, outbox durability, configuration refusals."""

from __future__ import annotations

import base64
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cli import main as agent_main
from agent.config import AgentConfig, load_config, parse_config
from agent.enroll import Enrollment
from agent.errors import AgentConfigError
from agent.outbox import Outbox
from agent.rollup import PeriodRollup, merge_observations, summarize, tier_counts
from agent.runtime import Agent
from connectors.base import DeviceIdentity, DeviceObservation, DeviceStatus
from protocol.envelope import envelope_hash, open_envelope
from protocol.keys import key_id, read_private_key
from protocol.report import GENESIS_HASH, parse_report

T0 = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)
FP_KEY = bytes(range(32))


def obs(protocol: str, identity: DeviceIdentity, status: DeviceStatus, **evidence: str) -> DeviceObservation:
    return DeviceObservation(
        protocol=protocol,
        source=f"{protocol}://x",
        local_id=identity.key(),
        identity=identity,
        status=status,
        observed_at=T0,
        enterprise="91330400MA29G0BL2L",
        evidence=evidence,
    )


def test_device_seen_through_opcua_and_modbus_counts_once() -> None:
    opc = obs(
        "opcua",
        DeviceIdentity.product_instance_uri("urn:acme:x1:SN1"),
        DeviceStatus.ACTIVE,
        manufacturer="ACME",
        model="X1",
        serial="SN1",
    )
    mb = obs("modbus", DeviceIdentity.manufacturer_model_serial("acme ", "x1", "SN1"), DeviceStatus.REACHABLE)
    other = obs("mqtt", DeviceIdentity.local("mqtt", "g", "e", "d"), DeviceStatus.REGISTERED)
    merged = merge_observations([opc, mb, other])
    assert len(merged) == 2
    joined = next(d for d in merged if len(d.protocols) == 2)
    assert joined.protocols == ("modbus", "opcua")
    assert joined.status == DeviceStatus.ACTIVE
    assert joined.primary.scheme == "msn"  # the identity every protocol can carry
    s = summarize([opc, mb, other], merged)
    assert (s.union.registered, s.union.reachable, s.union.active) == (2, 1, 1)
    assert s.merged_across_protocols == 1 and s.unmatched == 1


def test_serial_numbers_differing_in_case_are_different_devices() -> None:
    a = obs("modbus", DeviceIdentity.manufacturer_model_serial("ACME", "X1", "sn1"), DeviceStatus.ACTIVE)
    b = obs("modbus", DeviceIdentity.manufacturer_model_serial("ACME", "X1", "SN1"), DeviceStatus.ACTIVE)
    assert len(merge_observations([a, b])) == 2


def test_tiers_include_higher_tiers() -> None:
    t = tier_counts([DeviceStatus.ACTIVE, DeviceStatus.REACHABLE, DeviceStatus.REGISTERED, DeviceStatus.ACTIVE])
    assert (t.registered, t.reachable, t.active) == (4, 3, 2)


def test_rollup_sends_fingerprints_not_serial_numbers() -> None:
    o = obs(
        "opcua",
        DeviceIdentity.manufacturer_model_serial("ACME", "X1", "SECRET-SERIAL-42"),
        DeviceStatus.ACTIVE,
        manufacturer="ACME",
        model="X1",
        serial="SECRET-SERIAL-42",
        status_code="Good",
    )
    r = PeriodRollup(FP_KEY)
    r.add_devices(merge_observations([o]), now=T0)
    entries = r.device_entries()
    samples = r.evidence_samples(5)
    blob = repr(entries) + repr(samples)
    assert "SECRET-SERIAL-42" not in blob
    assert len(entries) == 1 and len(entries[0].fp) == 64
    assert samples[0].data == {"status_code": "Good"}


def test_outbox_chains_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    seen: list[tuple[int, str]] = []

    def build(seq: int, prev: str) -> tuple[bytes, datetime]:
        seen.append((seq, prev))
        return f"envelope-{seq}".encode(), T0 + timedelta(minutes=seq)

    first = ob.append(build)
    second = ob.append(build)
    ob.close()
    ob = Outbox(path)  # a restart: the chain and the pending reports are still there
    assert seen == [(1, GENESIS_HASH), (2, envelope_hash(b"envelope-1"))]
    assert [i.seq for i in ob.pending()] == [1, 2]
    assert ob.chain().next_seq == 3 and ob.chain().last_hash == second.envelope_hash
    ob.acknowledge(first.seq, {"index": 0})
    assert [i.seq for i in ob.pending()] == [2]
    assert ob.last_receipt() == {"index": 0}


def test_outbox_keeps_nothing_when_signing_fails(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")

    def broken(seq: int, prev: str) -> tuple[bytes, datetime]:
        raise RuntimeError("signer unavailable")

    with pytest.raises(RuntimeError):
        ob.append(broken)
    assert ob.depth() == 0 and ob.chain().next_seq == 1


def write_config(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(
        f'[agent]\nname = "t"\nverifier_url = "http://127.0.0.1:9"\ncollect_interval_s = 1\n{extra}', encoding="utf-8"
    )
    return p


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[agent]\nname = "a"\nverifier_url = "http://x"\ncolour = 1\n', r"unknown keys \['colour'\]"),
        ('[agent]\nname = "a"\nverifier_url = "ftp://x"\n', r"expected an http:// or https:// URL, got 'ftp://x'"),
        (
            '[agent]\nname = "a"\nverifier_url = "http://x"\ncollect_interval_s = "fast"\n',
            r"expected a number, got str",
        ),
        ('[agent]\nname = "a"\nverifier_url = "http://x"\ntimezone = "Mars/Base"\n', r"IANA time zone.*Mars/Base"),
        ('[agent]\nname = "a"\nverifier_url = "http://x"\n[[connectors.zigbee]]\nx = 1\n', r"unknown connector kind"),
        ("[agent\n", r"expected TOML, got a syntax error"),
    ],
)
def test_bad_configuration_is_refused_with_what_was_expected(body: str, message: str) -> None:
    with pytest.raises(AgentConfigError, match=message):
        parse_config(body, path=Path("/etc/tianping/agent.toml"))


def test_init_makes_a_private_key_readable_by_owner_only(tmp_path: Path) -> None:
    cfg = tmp_path / "a" / "agent.toml"
    assert agent_main(["init", "--config", str(cfg), "--name", "edge-1"]) == 0
    config = load_config(cfg)
    assert stat.S_IMODE(config.key_path.stat().st_mode) == 0o600
    before = config.key_path.read_bytes()
    assert agent_main(["init", "--config", str(cfg)]) == 0  # a second init keeps the key
    assert config.key_path.read_bytes() == before


def enrolled_locally(tmp_path: Path) -> tuple[AgentConfig, Enrollment, dict[str, Ed25519PublicKey]]:
    """An initialised agent with an enrollment record written by hand (no verifier needed)."""
    cfg = tmp_path / "agent.toml"
    assert agent_main(["init", "--config", str(cfg)]) == 0
    config = load_config(cfg)
    public = read_private_key(config.key_path).public_key()
    enrollment = Enrollment(
        agent_id="agent-1",
        key_id=key_id(public),
        applicant_id="P1",
        enterprise=None,
        fingerprint_key=base64.b64encode(FP_KEY).decode(),
        verifier_url="http://127.0.0.1:9",
    )
    return config, enrollment, {key_id(public): public}


async def test_periods_never_cross_midnight_in_shanghai(tmp_path: Path) -> None:
    config, enrollment, keys = enrolled_locally(tmp_path)
    tz = ZoneInfo("Asia/Shanghai")
    start = datetime(2026, 11, 26, 23, 50, tzinfo=tz)
    async with Agent(config, enrollment=enrollment) as agent:
        await agent.collect_round(now=start)
        await agent.collect_round(now=start + timedelta(minutes=20))  # 00:10 the next day
        agent.close_period(end=start + timedelta(minutes=25))
        items = agent.outbox.pending()
    reports = [parse_report(open_envelope(i.envelope, keys).payload) for i in items]
    assert [(r.period.start.astimezone(tz), r.period.end.astimezone(tz)) for r in reports] == [
        (start, datetime(2026, 11, 27, 0, 0, tzinfo=tz)),
        (datetime(2026, 11, 27, 0, 0, tzinfo=tz), start + timedelta(minutes=25)),
    ]
    assert reports[1].prev_hash == items[0].envelope_hash and reports[1].seq == 2


def test_device_with_malformed_enterprise_code_is_kept_unattributed_and_counted() -> None:
    o = DeviceObservation(
        protocol="mqtt",
        source="mqtt://x",
        local_id="d",
        identity=DeviceIdentity.local("mqtt", "g", "e", "d"),
        status=DeviceStatus.ACTIVE,
        observed_at=T0,
        enterprise="NOT-A-USCC",
    )
    r = PeriodRollup(FP_KEY)
    r.add_devices(merge_observations([o]), now=T0)
    (entry,) = r.device_entries()
    assert entry.enterprise is None and entry.status == "active"
    assert {s.kind: dict(s.errors) for s in r.connector_statuses()} == {"agent": {"enterprise_invalid": 1}}


def test_sparkplug_device_seen_before_its_birth_joins_itself_once_the_identity_arrives() -> None:
    """An agent that starts after the DBIRTH sees DDATA only (a protocol-local identity); after a rebirth the
    same device carries manufacturer + model + serial. Within one period that is one device, not two."""
    ddata_only = DeviceObservation(
        protocol="mqtt",
        source="mqtt://b:1883",
        local_id="g/e/d1",
        identity=DeviceIdentity.local("mqtt", "g", "e", "d1"),
        status=DeviceStatus.ACTIVE,
        observed_at=T0,
    )
    born = DeviceObservation(
        protocol="mqtt",
        source="mqtt://b:1883",
        local_id="g/e/d1",
        identity=DeviceIdentity.manufacturer_model_serial("ACME", "X1", "SN1"),
        status=DeviceStatus.ACTIVE,
        observed_at=T0,
        evidence={"manufacturer": "ACME", "model": "X1", "serial": "SN1"},
    )
    via_opcua = obs(
        "opcua",
        DeviceIdentity.product_instance_uri("urn:x"),
        DeviceStatus.ACTIVE,
        manufacturer="ACME",
        model="X1",
        serial="SN1",
    )
    r = PeriodRollup(FP_KEY)
    r.add_devices(merge_observations([ddata_only]), now=T0)
    r.add_devices(merge_observations([born, via_opcua]), now=T0 + timedelta(minutes=1))
    (entry,) = r.device_entries()
    assert entry.protocols == ("mqtt", "opcua")
    assert entry.first_seen == T0 and entry.last_seen == T0 + timedelta(minutes=1)
    msn = DeviceIdentity.manufacturer_model_serial("ACME", "X1", "SN1").key()
    from protocol.fingerprint import device_fingerprint

    assert entry.fp == device_fingerprint(FP_KEY, msn)


def test_operator_declared_mapping_joins_devices_no_protocol_could_match() -> None:
    a = DeviceObservation(
        protocol="modbus",
        source="10.0.0.20:502",
        local_id="3",
        identity=DeviceIdentity.local("modbus", "10.0.0.20:502", "3"),
        status=DeviceStatus.ACTIVE,
        observed_at=T0,
    )
    b = DeviceObservation(
        protocol="mqtt",
        source="mqtt://b:1883",
        local_id="factory/line1/press",
        identity=DeviceIdentity.local("mqtt", "factory", "line1/press"),
        status=DeviceStatus.REACHABLE,
        observed_at=T0,
    )
    assert len(merge_observations([a, b])) == 2
    cfg = parse_config(
        '[agent]\nname = "a"\nverifier_url = "http://x"\n\n[[same_device]]\nname = "press-1"\nmembers = [\n'
        '  { protocol = "modbus", source = "10.0.0.20:502", local_id = "3" },\n'
        '  { protocol = "mqtt", source = "mqtt://b:1883", local_id = "factory/line1/press" },\n]\n',
        path=Path("agent.toml"),
    )
    merged = merge_observations([a, b], cfg.same_device)
    assert len(merged) == 1 and merged[0].protocols == ("modbus", "mqtt")
    assert summarize([a, b], merged).unmatched == 0


def test_declared_mapping_with_one_member_is_refused() -> None:
    with pytest.raises(AgentConfigError, match=r"members: expected a list of two or more tables"):
        parse_config(
            '[agent]\nname = "a"\nverifier_url = "http://x"\n[[same_device]]\nname = "x"\n'
            'members = [{ protocol = "modbus", source = "h:502", local_id = "1" }]\n',
            path=Path("agent.toml"),
        )


async def test_each_report_carries_the_outbox_depth_it_was_signed_behind(tmp_path: Path) -> None:
    config, enrollment, keys = enrolled_locally(tmp_path)
    async with Agent(config, enrollment=enrollment) as agent:
        for minutes in (1, 2, 3):
            await agent.collect_round(now=T0 + timedelta(minutes=minutes - 1))
            agent.close_period(end=T0 + timedelta(minutes=minutes))
        items = agent.outbox.pending()
    assert [parse_report(open_envelope(i.envelope, keys).payload).outbox_depth for i in items] == [0, 1, 2]
