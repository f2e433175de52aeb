"""Award arithmetic, exact (Decimal): per-device amounts and their cap, percentages of recorded figures with caps per
item, per award, per year and per enterprise, multi-year schedules, preconditions, one-off awards; at and around
every threshold and cap."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from verifier import awards as arith
from verifier.eligibility import ApplicantFacts, DeviceYear, GateRecord, Verdict, evaluate
from verifier.rules import Policy, load_policy, parse_policy, shipped_policies

YEAR = 2025

RULES = '''
schema = 1
[policy]
id = "test-awards"
source = "test"
effective_from = "2025-01-01"
title.zh = "测试"
title.en = "test"
[definitions]
timezone = "Asia/Shanghai"
connected_device_min_active_days = 30
connected_device_recent_days = 90
[limits]
per_year_yuan = "1500000"
per_enterprise_yuan = "2000000"
[[measures]]
number = 1
applies_to = "platform"
title.zh = "平台"
title.en = "platform"
[[criteria]]
measure = 1
id = "devices-10000"
kind = "measured"
label.zh = "设备超 1 万台"
label.en = "> 10,000 devices"
metric = "connected_devices"
operator = ">"
threshold = 10000
unit = "devices"
window = "calendar_year"
definition.zh = "连接设备"
definition.en = "connected device"
[[criteria]]
measure = 1
id = "fee-300k"
kind = "figure"
label.zh = "年度服务费超 30 万元"
label.en = "Annual service fee above 300,000 yuan"
metric = "annual_service_fee_yuan"
operator = ">"
threshold = 300000
unit = "yuan"
window = "calendar_year"
definition.zh = "服务费"
definition.en = "service fee"
[[criteria]]
measure = 1
id = "investment"
kind = "figure"
label.zh = "投资额"
label.en = "investment"
metric = "investment_yuan"
operator = ">"
threshold = 0
unit = "yuan"
window = "calendar_year"
definition.zh = "投资"
definition.en = "investment"
[[awards]]
measure = 1
id = "per-device"
kind = "per_unit"
label.zh = "每台 2000 元，最高 100 万元"
label.en = "2,000 yuan a device, at most 1 million"
per_unit_yuan = "2000"
base = "devices-10000"
cap_yuan = "1000000"
requires = ["devices-10000"]
[[awards]]
measure = 1
id = "investment-30pct"
kind = "percentage"
label.zh = "投资额 30%，单项最高 20 万元，60%/40%/30% 分年兑现"
label.en = "30% of investment, at most 200,000 an item, paid 60% / 40% / 30% over three years"
rate = "0.30"
base = "investment"
cap_per_item_yuan = "200000"
cap_yuan = "500000"
schedule = ["0.6", "0.4", "0.3"]
requires = {all = ["investment", "fee-300k"]}
[[awards]]
measure = 1
id = "one-off"
kind = "fixed"
label.zh = "一次性奖励"
label.en = "one-off award"
amount_yuan = "100000.50"
recurring = false
requires = {any = ["fee-300k", "devices-10000"]}
'''


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(RULES.encode(), "test-awards.toml")


def devices(n: int) -> list[DeviceYear]:
    return [DeviceYear(f"d{i}", YEAR, 30, date(YEAR, 12, 31), 3, f"E{i % 7}") for i in range(n)]


def rec(metric: str, value: str, item: str = "", period: int = YEAR) -> GateRecord:
    return GateRecord(metric, Decimal(value), period, item, "王科长", "2026-01-05T09:00:00+08:00", "嘉经信〔2026〕1号")


def facts(n_devices: int = 0, *, fee: str | None = None, investments: tuple[str, ...] = (),
          before: dict[str, tuple[int, ...]] | None = None, paid_before: str = "0") -> ApplicantFacts:
    gates: dict[str, list[GateRecord]] = {}
    if fee is not None:
        gates["annual_service_fee_yuan"] = [rec("annual_service_fee_yuan", fee)]
    if investments:
        gates["investment_yuan"] = [rec("investment_yuan", v, f"item{i}") for i, v in enumerate(investments)]
    return ApplicantFacts("p", "平台", "platform", devices=devices(n_devices), resolution_days=(), gates=gates,
                          awarded_before=before or {}, awarded_total_before_yuan=Decimal(paid_before))


def award(v: Verdict, aid: str) -> dict[str, object]:
    return dict(next(a for a in v.to_json()["awards"] if a["id"] == aid))


def test_pure_helpers_are_exact_decimals() -> None:
    assert arith.yuan(Decimal("0.005")) == Decimal("0.01") and arith.yuan_text(Decimal("3000000.00")) == "3000000"
    assert arith.yuan_text(Decimal("1234.5")) == "1234.50"
    c = arith.apply_cap(arith.per_unit(Decimal(500), Decimal(2000)), Decimal(1_000_000), "per_award")
    assert c.amount == Decimal(1_000_000) and c.caps == []  # exactly at the cap: not reduced
    c = arith.apply_cap(arith.per_unit(Decimal("500.0005"), Decimal(2000)), Decimal(1_000_000), "per_award")
    assert c.amount == Decimal(1_000_000) and c.caps[0].before_yuan == Decimal("1000001.00")  # one yuan over
    p = arith.percentage([Decimal("0.1")] * 3, Decimal("0.1"))
    assert p.amount == Decimal("0.03") and isinstance(p.amount, Decimal)  # 0.01 × 3, never 0.030000000000000006
    assert [arith.schedule_rate([Decimal("0.6"), Decimal("0.4"), Decimal("0.3")], k) for k in (1, 2, 3, 4)] == \
        [Decimal("0.6"), Decimal("0.4"), Decimal("0.3"), Decimal(0)]
    assert arith.share_limit([Decimal(900), Decimal(900)], Decimal(1500)) == ([Decimal(900), Decimal(600)], True)
    with pytest.raises(ValueError, match="year_index: expected ≥ 1, got 0"):
        arith.schedule_rate([Decimal(1)], 0)


@pytest.mark.parametrize(("n", "passed", "amount", "capped"), [
    (10_000, False, "0", True),  # exactly 10,000 with ">" fails: nothing payable
    (10_001, True, "1000000", True),  # 10,001 × 2,000 = 20,002,000 → capped at 1 million
])
def test_per_device_award_at_the_device_threshold(policy: Policy, n: int, passed: bool, amount: str | None,
                                                  capped: bool) -> None:
    v = evaluate(policy, facts(n), YEAR)
    crit = next(c for c in v.to_json()["criteria"] if c["id"] == "devices-10000")
    assert (crit["value"], crit["passed"]) == (n, passed)
    a = award(v, "per-device")
    assert a["eligible"] is passed
    assert a["payable_yuan"] == amount and a["amount_yuan"] == "1000000"  # the amount as if eligible, capped
    assert a["computed_yuan"] == str(n * 2000)
    assert bool(a["caps_applied"]) is capped


def test_per_device_cap_exactly_and_one_yuan_over() -> None:
    at = arith.apply_cap(arith.per_unit(Decimal(500), Decimal(2000)), Decimal(1_000_000), "per_award")
    over = arith.apply_cap(arith.fixed(Decimal(1_000_001)), Decimal(1_000_000), "per_award")
    below = arith.apply_cap(arith.per_unit(Decimal(499), Decimal(2000)), Decimal(1_000_000), "per_award")
    assert (at.amount, at.caps) == (Decimal(1_000_000), [])
    assert over.amount == Decimal(1_000_000) and over.caps[0].to_json() == {
        "cap": "per_award", "limit_yuan": "1000000", "before_yuan": "1000001", "after_yuan": "1000000"}
    assert below.amount == Decimal(998_000)


@pytest.mark.parametrize(("fee", "eligible"), [("300000", False), ("300000.01", True), ("299999.99", False)])
def test_precondition_annual_fee_above_300000(policy: Policy, fee: str, eligible: bool) -> None:
    v = evaluate(policy, facts(fee=fee, investments=("100000",)), YEAR)
    assert award(v, "investment-30pct")["eligible"] is eligible


def test_fee_not_recorded_is_not_a_pass(policy: Policy) -> None:
    v = evaluate(policy, facts(investments=("100000",)), YEAR)
    a = award(v, "investment-30pct")
    assert a["eligible"] is None and a["payable_yuan"] == "0"
    assert award(v, "one-off")["eligible"] is None  # any(None, False) is unknown, not False


def test_percentage_with_caps_per_item_and_per_award_and_schedule(policy: Policy) -> None:
    # items: 30% of 600,000 = 180,000 (under the item cap); of 666,667 = 200,000.10 → 200,000; of 1,000,000 = 300,000
    # → 200,000; sum 580,000 → award cap 500,000; year 1 of the schedule: 60% → 300,000
    v = evaluate(policy, facts(fee="400000", investments=("600000", "666667", "1000000")), YEAR)
    a = award(v, "investment-30pct")
    assert a["computed_yuan"] == "680000.10"
    caps = [(c["cap"], c["before_yuan"], c["after_yuan"]) for c in a["caps_applied"]]  # type: ignore[attr-defined]
    assert caps == [("per_item", "200000.10", "200000"), ("per_item", "300000", "200000"),
                    ("per_award", "580000", "500000")]
    assert (a["amount_yuan"], a["payable_yuan"], a["year_index"]) == ("300000", "300000", 1)
    second = evaluate(policy, facts(fee="400000", investments=("100000",), before={"investment-30pct": (2024,)}), YEAR)
    assert award(second, "investment-30pct")["payable_yuan"] == "12000"  # 40% of 30,000
    third = evaluate(policy, facts(fee="400000", investments=("100000",),
                                   before={"investment-30pct": (2023, 2024)}), YEAR)
    assert award(third, "investment-30pct")["payable_yuan"] == "9000"  # 30% of 30,000
    fourth = evaluate(policy, facts(fee="400000", investments=("100000",),
                                    before={"investment-30pct": (2022, 2023, 2024)}), YEAR)
    a4 = award(fourth, "investment-30pct")
    assert a4["payable_yuan"] == "0" and "schedule of 3 years" in str(a4["reason"])


def test_one_off_award_is_paid_once(policy: Policy) -> None:
    first = award(evaluate(policy, facts(fee="300001"), YEAR), "one-off")
    assert (first["eligible"], first["payable_yuan"]) == (True, "100000.50")
    again = award(evaluate(policy, facts(fee="300001", before={"one-off": (2024,)}), YEAR), "one-off")
    assert again["eligible"] is False and again["reason"] == "one-off award already paid in 2024"


def test_limits_per_year_and_per_enterprise(policy: Policy) -> None:
    # per-device 1,000,000 + investment 60% × 500,000 = 300,000 + one-off 100,000.50 = 1,400,000.50 ≤ 1,500,000
    v = evaluate(policy, facts(10_001, fee="400000", investments=("700000", "700000", "700000")), YEAR)
    assert v.to_json()["total_payable_yuan"] == "1400000.50"
    # 2,000,000 per enterprise, 1,000,000 already paid: 1,000,000 left → the one-off gets 0, investment 0
    v2 = evaluate(policy, facts(10_001, fee="400000", investments=("700000",), paid_before="1000000"), YEAR)
    j = v2.to_json()
    assert j["total_payable_yuan"] == "1000000"
    inv = award(v2, "investment-30pct")
    assert inv["payable_yuan"] == "0" and inv["caps_applied"][-1]["cap"] == "per_enterprise"  # type: ignore[index]
    # exactly at the enterprise limit after this year: nothing reduced
    v3 = evaluate(policy, facts(10_001, paid_before="899999.50"), YEAR)
    assert v3.to_json()["total_payable_yuan"] == "1100000.50"


def test_per_year_limit_cuts_the_later_awards() -> None:
    text = RULES.replace('per_year_yuan = "1500000"', 'per_year_yuan = "1000000.25"')
    pol = parse_policy(text.encode(), "t.toml")
    v = evaluate(pol, facts(10_001, fee="300001"), YEAR)
    assert award(v, "per-device")["payable_yuan"] == "1000000"
    one_off = award(v, "one-off")
    assert one_off["payable_yuan"] == "0.25" and one_off["caps_applied"][0]["cap"] == "per_year"  # type: ignore[index]


# ---- the shipped Chengdu 2022 file: 10% of last year's revenue, at most 5 million ---------------------------------

@pytest.fixture(scope="module")
def chengdu() -> Policy:
    return load_policy(shipped_policies()["chengdu-2022"])


def chengdu_facts(n_devices: int, enterprises: int, revenue: str | None, period: int = YEAR - 1) -> ApplicantFacts:
    devs = [DeviceYear(f"d{i}", YEAR, 40, date(YEAR, 12, 20), 3, f"E{i % enterprises}") for i in range(n_devices)]
    gates = {"settled_contract_revenue_yuan": [rec("settled_contract_revenue_yuan", revenue, period=period)]} \
        if revenue is not None else {}
    return ApplicantFacts("p", "平台", "platform", devices=devs, resolution_days=(), gates=gates)


@pytest.mark.parametrize(("revenue", "payable", "capped"), [
    ("50000000", "5000000", False),  # exactly at the cap
    ("50000010", "5000000", True),  # one yuan over the cap (10% of 50,000,010 = 5,000,001)
    ("49999990", "4999999", False),
    ("12345.67", "1234.57", False),  # half up to the fen
])
def test_chengdu_revenue_share_and_cap(chengdu: Policy, revenue: str, payable: str, capped: bool) -> None:
    a = award(evaluate(chengdu, chengdu_facts(5_001, 201, revenue), YEAR), "cd-platform-10pct")
    assert (a["eligible"], a["payable_yuan"], bool(a["caps_applied"])) == (True, payable, capped)


def test_chengdu_thresholds_and_previous_year_figure(chengdu: Policy) -> None:
    assert award(evaluate(chengdu, chengdu_facts(5_000, 201, "1000"), YEAR), "cd-platform-10pct")["eligible"] is False
    assert award(evaluate(chengdu, chengdu_facts(5_001, 200, "1000"), YEAR), "cd-platform-10pct")["eligible"] is False
    missing = award(evaluate(chengdu, chengdu_facts(5_001, 201, None), YEAR), "cd-platform-10pct")
    assert missing["eligible"] is None and missing["payable_yuan"] == "0"
    wrong_year = award(evaluate(chengdu, chengdu_facts(5_001, 201, "1000", period=YEAR), YEAR), "cd-platform-10pct")
    assert wrong_year["eligible"] is None  # this year's revenue is not the previous year's
    v = evaluate(chengdu, chengdu_facts(5_001, 201, "1000"), YEAR).to_json()
    detail = v["criteria_detail"]["cd-revenue-recorded"]
    assert detail["source"] == "official" and detail["recorded"][0]["document_ref"] == "嘉经信〔2026〕1号"
    assert detail["window_dates"] == {"name": "previous_calendar_year", "start": "2024-01-01", "end": "2024-12-31",
                                      "days": 366}
