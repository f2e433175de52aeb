"""The rule file and the pure eligibility evaluation: thresholds at the edge, tier exclusivity, definitions, and
malformed rule files refused with where and what."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import pytest

from verifier.api import VerifierSettings, create_app
from verifier.db import init_db, make_engine
from verifier.eligibility import ApplicantFacts, DeviceYear, ResolutionDay, Verdict, evaluate
from verifier.errors import RuleFileInvalid
from verifier.rules import DEFAULT_RULES_PATH, METRICS, Policy, load_policy, parse_policy

YEAR = 2025


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy()


def connected(n: int, *, enterprises: int, year: int = YEAR, prefix: str = "d") -> list[DeviceYear]:
    """``n`` devices that each meet the connected-device definition, spread over ``enterprises`` USCCs."""
    return [DeviceYear(fp=f"{prefix}{i}", year=year, active_days=30, last_active_day=date(year, 12, 1),
                       best_status_rank=3, enterprise=f"E{i % enterprises:05d}") for i in range(n)]


def platform(devices: Sequence[DeviceYear]) -> ApplicantFacts:
    return ApplicantFacts("p1", "平台", "platform", devices=devices, resolution_days=())


def node(days: Sequence[ResolutionDay]) -> ApplicantFacts:
    return ApplicantFacts("n1", "节点", "node", devices=(), resolution_days=days)


def criterion(verdict: Verdict, cid: str) -> tuple[object, bool | None]:
    c = next(c for c in verdict.to_json()["criteria"] if c["id"] == cid)
    return c["value"], c["passed"]


def award(verdict: Verdict, aid: str) -> dict[str, object]:
    return dict(next(a for a in verdict.to_json()["awards"] if a["id"] == aid))


def test_shipped_rule_file_states_the_policy(policy: Policy) -> None:
    assert policy.id == "jiaxing-2021"
    assert policy.sha256 == hashlib.sha256(DEFAULT_RULES_PATH.read_bytes()).hexdigest()
    ops = {c.id: (c.operator, c.threshold) for c in policy.criteria}
    assert ops["m5-devices-10000"] == (">", 10000) and ops["m2-new-registrations-20m"] == ("≥", 20_000_000)
    assert ops["m2-daily-resolutions-5m"] == (">", 5_000_000) and ops["m2-top-level-node"] == ("=", True)
    assert all(c.window == "calendar_year" and c.definition.zh and c.definition.en for c in policy.criteria)
    assert "registration source" in next(c for c in policy.criteria if c.metric == "new_registrations").definition.en
    assert {c.metric for c in policy.criteria} <= set(METRICS)


def test_exactly_10000_devices_with_greater_than_fails(policy: Policy) -> None:
    v = evaluate(policy, platform(connected(10_000, enterprises=301)), YEAR)
    assert criterion(v, "m5-devices-10000") == (10_000, False)
    assert criterion(v, "m5-served-300") == (301, True)
    assert award(v, "m5-scale-3m")["eligible"] is False
    assert award(v, "m5-scale-1.5m")["eligible"] is True  # > 150 and > 5,000


def test_10001_devices_pass_and_only_the_higher_tier_is_paid(policy: Policy) -> None:
    v = evaluate(policy, platform(connected(10_001, enterprises=301)), YEAR)
    assert criterion(v, "m5-devices-10000") == (10_001, True)
    assert criterion(v, "m5-devices-5000") == (10_001, True) and criterion(v, "m5-served-150") == (301, True)
    assert award(v, "m5-scale-3m")["eligible"] is True
    lower = award(v, "m5-scale-1.5m")
    assert lower["eligible"] is False and lower["superseded_by"] == "m5-scale-3m"
    assert award(v, "m5-growth-1m")["eligible"] is True  # all new: 301 users > 100, 10,001 devices > 3,000
    assert [a["amount_yuan"] for a in v.to_json()["awards"] if a["eligible"]] == ["3000000", "1000000"]


def test_exactly_300_enterprises_fails_and_301_passes(policy: Policy) -> None:
    assert criterion(evaluate(policy, platform(connected(600, enterprises=300)), YEAR), "m5-served-300") == (300, False)
    assert criterion(evaluate(policy, platform(connected(600, enterprises=301)), YEAR), "m5-served-300") == (301, True)


def test_growth_counts_only_what_no_earlier_year_counted(policy: Policy) -> None:
    old = connected(3_000, enterprises=100, year=YEAR - 1)  # d0…d2999 over E00000…E00099 in 2024
    now = connected(6_001, enterprises=201)  # d0…d6000 over E00000…E00200 in 2025
    v = evaluate(policy, platform(old + now), YEAR)
    assert criterion(v, "m5-new-devices-3000") == (3_001, True)
    assert criterion(v, "m5-new-users-100") == (101, True)
    v2 = evaluate(policy, platform(old + connected(6_000, enterprises=200)), YEAR)
    assert criterion(v2, "m5-new-devices-3000") == (3_000, False) and criterion(v2, "m5-new-users-100") == (100, False)


def test_connected_device_needs_30_active_days_and_one_in_the_last_90(policy: Policy) -> None:
    def dev(fp: str, days: int, last: date) -> DeviceYear:
        return DeviceYear(fp=fp, year=YEAR, active_days=days, last_active_day=last, best_status_rank=3, enterprise="E")

    devices = [dev("ok", 30, date(YEAR, 10, 3)), dev("few", 29, date(YEAR, 12, 31)),
               dev("stale", 200, date(YEAR, 10, 2)),
               DeviceYear("reach", YEAR, 0, None, 2, "E"), DeviceYear("reg", YEAR, 0, None, 1, None)]
    v = evaluate(policy, platform(devices), YEAR)  # the last 90 days of 2025 start on 3 October
    assert criterion(v, "m5-devices-5000")[0] == 1
    b = v.beside
    assert (b["registered_devices"], b["reachable_devices"], b["active_devices"], b["active_device_days"]) == \
        (5, 4, 3, 259)
    running = evaluate(policy, platform(devices), YEAR, as_of=date(YEAR, 12, 30))
    assert criterion(running, "m5-devices-5000")[0] == 2  # a year still running: the window is 2 Oct–30 Dec
    assert running.beside["window_end"] == "2025-12-30"


def test_exactly_20_million_registrations_with_at_least_passes(policy: Policy) -> None:
    days = [ResolutionDay(date(YEAR, 1, 1), creates_ok=10_000_000), ResolutionDay(date(YEAR, 7, 1),
                                                                                 creates_ok=10_000_000)]
    v = evaluate(policy, node(days), YEAR)
    assert criterion(v, "m2-new-registrations-20m") == (20_000_000, True)
    short = [ResolutionDay(date(YEAR, 1, 1), creates_ok=19_999_999)]
    assert criterion(evaluate(policy, node(short), YEAR), "m2-new-registrations-20m") == (19_999_999, False)


def test_daily_average_is_over_calendar_days_and_exactly_5_million_fails(policy: Policy) -> None:
    total = 5_000_000 * 365
    days = [ResolutionDay(date(YEAR, 3, 1), resolutions_ok=total // 2),
            ResolutionDay(date(YEAR, 3, 2), resolutions_ok=total - total // 2, resolutions_failed=7)]
    v = evaluate(policy, node(days), YEAR)
    assert criterion(v, "m2-daily-resolutions-5m") == (5_000_000, False)
    assert v.beside["median_daily_resolutions"] == 0 and v.beside["peak_daily_resolutions"] == total - total // 2
    assert v.beside["peak_day"] == "2025-03-02" and v.beside["failed_resolutions"] == 7
    more = [*days, ResolutionDay(date(YEAR, 3, 3), resolutions_ok=1)]
    value, passed = criterion(evaluate(policy, node(more), YEAR), "m2-daily-resolutions-5m")
    assert passed is True and value == 5_000_000.0
    both = [*more, ResolutionDay(date(YEAR, 3, 3), creates_ok=20_000_000)]
    v3 = evaluate(policy, node(both), YEAR)
    assert award(v3, "m2-operator-500k")["eligible"] is True


def test_top_level_node_gate_is_shown_not_recorded(policy: Policy) -> None:
    v = evaluate(policy, node(()), YEAR).to_json()
    gate = next(c for c in v["criteria"] if c["id"] == "m2-top-level-node")
    assert (gate["kind"], gate["value"], gate["passed"]) == ("gate", None, None)
    assert {c["measure"] for c in v["criteria"]} == {2}  # measure 5 does not apply to a node
    recorded = ApplicantFacts("n1", "节点", "node", devices=(), resolution_days=(),
                              gates={"connected_to_top_level_node": True})
    gate2 = next(c for c in evaluate(policy, recorded, YEAR).to_json()["criteria"] if c["kind"] == "gate")
    assert gate2["passed"] is True


# ---- malformed rule files -----------------------------------------------------------------------------------------

def _shipped() -> str:
    return DEFAULT_RULES_PATH.read_text(encoding="utf-8")


def test_toml_syntax_error_names_line_and_column() -> None:
    text = _shipped().replace('operator = ">"\nthreshold = 300', 'operator = >\nthreshold = 300', 1)
    line = text[:text.index("operator = >")].count("\n") + 1
    with pytest.raises(RuleFileInvalid, match=rf"bad\.toml: TOML syntax error: .*line {line}, column 12"):
        parse_policy(text.encode(), "bad.toml")


def test_unknown_key_is_refused_naming_where() -> None:
    text = _shipped().replace("threshold = 10000", "treshold = 10000", 1)
    with pytest.raises(RuleFileInvalid, match=r"criteria\[1\] \(id 'm5-devices-10000'\): unknown key 'treshold'; "
                                              r"expected only \[.*'threshold'"):
        parse_policy(text.encode(), "r.toml")


def test_wrong_operator_is_refused_with_expected_and_got() -> None:
    text = _shipped().replace('operator = "≥"', 'operator = "=>"', 1)
    with pytest.raises(RuleFileInvalid, match=r"criteria\[7\] \(id 'm2-new-registrations-20m'\)\.operator: "
                                              r"expected one of \['>', '>=', '≥'.*got '=>'"):
        parse_policy(text.encode(), "r.toml")


def test_missing_threshold_is_refused() -> None:
    text = _shipped().replace("threshold = 300\n", "", 1)
    with pytest.raises(RuleFileInvalid, match=r"criteria\[0\] \(id 'm5-served-300'\): missing key 'threshold'"):
        parse_policy(text.encode(), "r.toml")


@pytest.mark.parametrize(("old", "new", "match"), [
    ("threshold = 5000\n", 'threshold = "lots"\n', r"\.threshold: expected a number .*got 'lots'"),
    ("threshold = true", "threshold = 1", r"\.threshold: expected true or false for a gate, got an integer 1"),
    ('amount_yuan = "3000000"', "amount_yuan = 3000000", r"awards\[0\] .*\.amount_yuan: expected a non-empty string"),
    ('requires = ["m5-served-300", "m5-devices-10000"]', 'requires = ["m5-served-3000"]',
     r"\.requires: expected criterion ids from \[\[criteria\]\], got unknown 'm5-served-3000'"),
    ('metric = "connected_devices"', 'metric = "devices_seen"', r"\.metric: expected one of \[.*got 'devices_seen'"),
    ('window = "calendar_year"', 'window = "rolling_365"',
     r"\.window: expected one of \['calendar_year', .*'rolling_<N>_days'\].*got 'rolling_365'"),
    ("connected_device_min_active_days = 30", "connected_device_min_active_days = 0",
     r"definitions\.connected_device_min_active_days: expected an integer ≥ 1, got 0"),
])
def test_malformed_values_are_refused(old: str, new: str, match: str) -> None:
    text = _shipped()
    assert old in text
    with pytest.raises(RuleFileInvalid, match=match):
        parse_policy(text.replace(old, new, 1).encode(), "r.toml")


def test_app_refuses_to_start_with_a_wrong_rule_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(_shipped().replace("[definitions]", "[definitions]\nextra = 1"), encoding="utf-8")
    db_url = f"sqlite:///{tmp_path / 'v.sqlite'}"
    init_db(make_engine(db_url))
    with pytest.raises(RuleFileInvalid, match=r"bad\.toml:\d+: definitions: unknown key 'extra'"):
        create_app(VerifierSettings(db_url=db_url, rules_path=bad, admin_token=None))
    with pytest.raises(RuleFileInvalid, match="expected a readable rule file"):
        load_policy(tmp_path / "missing.toml")
