"""The general rule engine: every window, aggregation and condition form, the shipped rule files (Jiaxing 2021,
Wuhan 2023, Chengdu 2022), and wrong rule files refused with the line and the reason."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from verifier.eligibility import ApplicantFacts, DeviceYear, GateRecord, ResolutionDay, Verdict, evaluate, truth
from verifier.errors import RuleFileInvalid
from verifier.rules import Policy, load_policy, parse_policy, shipped_policies

YEAR = 2025


def crit(v: Verdict, cid: str) -> tuple[object, bool | None]:
    c = next(c for c in v.to_json()["criteria"] if c["id"] == cid)
    return c["value"], c["passed"]


def test_every_shipped_rule_file_loads() -> None:
    files = shipped_policies()
    assert {"jiaxing-2021", "wuhan-2023", "chengdu-2022"} <= set(files)
    for stem, path in files.items():
        assert load_policy(path).id == stem


# ---- Wuhan 2023 ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wuhan() -> Policy:
    return load_policy(shipped_policies()["wuhan-2023"])


def wuhan_node(registrations: int, per_day: int, nodes: str | None) -> ApplicantFacts:
    days = [ResolutionDay(date(YEAR, 1, 1) + (date(YEAR, 1, 2) - date(YEAR, 1, 1)) * i, resolutions_ok=per_day)
            for i in range(365)]
    days[0] = ResolutionDay(days[0].day, resolutions_ok=per_day, creates_ok=registrations)
    gates = {"new_enterprise_nodes": [GateRecord("new_enterprise_nodes", Decimal(nodes), YEAR, "", "李处长",
                                                 "2026-01-04T10:00:00+08:00", "武经信〔2026〕3号")]} if nodes else {}
    return ApplicantFacts("n", "节点", "node", devices=(), resolution_days=days, gates=gates)


def test_wuhan_node_at_the_thresholds_passes_with_at_least(wuhan: Policy) -> None:
    v = evaluate(wuhan, wuhan_node(100_000_000, 600_000, "100"), YEAR)
    assert crit(v, "wh-node-registrations-100m") == (100_000_000, True)
    assert crit(v, "wh-node-daily-resolutions-600k") == (600_000, True)
    assert crit(v, "wh-node-enterprise-nodes-100") == (100, True)
    assert next(a for a in v.to_json()["awards"])["eligible"] is True
    assert {c["measure"] for c in v.to_json()["criteria"]} == {1}


def test_wuhan_node_one_below_fails_and_unrecorded_nodes_are_unknown(wuhan: Policy) -> None:
    v = evaluate(wuhan, wuhan_node(99_999_999, 599_999, "99"), YEAR)
    assert [crit(v, c)[1] for c in ("wh-node-registrations-100m", "wh-node-daily-resolutions-600k",
                                    "wh-node-enterprise-nodes-100")] == [False, False, False]
    unknown = evaluate(wuhan, wuhan_node(100_000_000, 600_000, None), YEAR)
    assert crit(unknown, "wh-node-enterprise-nodes-100") == (None, None)
    award = unknown.to_json()["awards"][0]
    assert award["eligible"] is None and award["amount_yuan"] is None and award["kind"] == "qualification"


@pytest.mark.parametrize(("devices", "enterprises", "ok"), [(5_001, 101, True), (5_000, 101, False),
                                                            (5_001, 100, False)])
def test_wuhan_platform_uses_greater_than(wuhan: Policy, devices: int, enterprises: int, ok: bool) -> None:
    devs = [DeviceYear(f"d{i}", YEAR, 30, date(YEAR, 10, 3), 3, f"E{i % enterprises}") for i in range(devices)]
    v = evaluate(wuhan, ApplicantFacts("p", "平台", "platform", devices=devs, resolution_days=()), YEAR)
    assert v.to_json()["awards"][0]["eligible"] is ok


# ---- windows, aggregations and definition parameters --------------------------------------------------------------

RULES = '''
schema = 1
[policy]
id = "windows"
source = "test"
effective_from = "2025-01-01"
title.zh = "窗口"
title.en = "windows"
[definitions]
timezone = "Asia/Shanghai"
connected_device_min_active_days = 30
connected_device_recent_days = 90
[[measures]]
number = 1
applies_to = "node"
title.zh = "节点"
title.en = "node"
[[measures]]
number = 2
applies_to = "platform"
title.zh = "平台"
title.en = "platform"
'''


def criterion(cid: str, metric: str, window: str, operator: str = ">", threshold: int = 0, measure: int = 1,
              extra: str = "") -> str:
    return f'''
[[criteria]]
measure = {measure}
id = "{cid}"
kind = "measured"
label.zh = "{cid}"
label.en = "{cid}"
metric = "{metric}"
operator = "{operator}"
threshold = {threshold}
unit = "x"
window = "{window}"
definition.zh = "d"
definition.en = "d"
{extra}'''


def award(requires: str, measure: int = 1) -> str:
    return f'''
[[awards]]
measure = {measure}
id = "a{measure}"
label.zh = "a"
label.en = "a"
amount_yuan = "1"
requires = {requires}
'''


def test_resolution_windows_and_aggregations() -> None:
    text = RULES + "".join([
        criterion("year-sum", "resolutions", "calendar_year", extra='aggregation = "sum"'),
        criterion("year-avg", "resolutions", "calendar_year", extra='aggregation = "daily_average"'),
        criterion("prev-sum", "resolutions", "previous_calendar_year"),
        criterion("roll-avg", "resolutions", "rolling_10_days", extra='aggregation = "daily_average"'),
        criterion("cum-sum", "new_registrations", "cumulative"),
        criterion("cum-avg", "new_registrations", "cumulative", extra='aggregation = "daily_average"'),
    ]) + award('["year-sum"]')
    pol = parse_policy(text.encode(), "w.toml")
    days = [ResolutionDay(date(2024, 12, 31), resolutions_ok=1000, creates_ok=10),
            ResolutionDay(date(YEAR, 1, 1), resolutions_ok=365, creates_ok=20),
            ResolutionDay(date(YEAR, 12, 22), resolutions_ok=100),
            ResolutionDay(date(YEAR, 12, 31), resolutions_ok=50)]
    facts = ApplicantFacts("n", "节点", "node", devices=(), resolution_days=days, first_day=date(2024, 12, 31))
    v = evaluate(pol, facts, YEAR)
    assert crit(v, "year-sum")[0] == 515 and crit(v, "year-avg")[0] == round(515 / 365, 2)
    assert crit(v, "prev-sum")[0] == 1000
    assert crit(v, "roll-avg")[0] == 15  # 22..31 December: 150 / 10
    assert crit(v, "cum-sum")[0] == 30 and crit(v, "cum-avg")[0] == round(30 / 366, 2)
    detail = v.to_json()["criteria_detail"]["roll-avg"]
    assert detail["window_dates"] == {"name": "rolling_10_days", "start": "2025-12-22", "end": "2025-12-31",
                                      "days": 10}
    assert detail["aggregation"] == "daily_average" and detail["source"] == "agents"


def test_device_windows_use_loaded_window_facts_and_params() -> None:
    text = RULES + "".join([
        criterion("roll", "connected_devices", "rolling_30_days", measure=2,
                  extra="params.min_active_days = 5\nparams.recent_days = 7"),
        criterion("live", "connected_devices", "since_go_live", measure=2),
        criterion("days", "active_device_days", "calendar_year", measure=2),
        criterion("act", "active_devices", "calendar_year", measure=2),
    ]) + award('["roll"]', 2)
    pol = parse_policy(text.encode(), "w.toml")
    roll = [DeviceYear("a", YEAR, 5, date(YEAR, 12, 25), 3, "E1"),
            DeviceYear("b", YEAR, 4, date(YEAR, 12, 31), 3, "E1"),
            DeviceYear("c", YEAR, 9, date(YEAR, 12, 24), 3, "E2")]
    live = [DeviceYear("a", YEAR, 300, date(YEAR, 12, 25), 3, "E1")]
    year = [DeviceYear("a", YEAR, 40, date(YEAR, 12, 25), 3, "E1"), DeviceYear("z", YEAR, 0, None, 2, None)]
    facts = ApplicantFacts("p", "平台", "platform", devices=year, resolution_days=(), go_live=date(2024, 3, 1),
                           first_day=date(2024, 1, 1),
                           window_devices={(date(YEAR, 12, 2), date(YEAR, 12, 31)): roll,
                                           (date(2024, 3, 1), date(YEAR, 12, 31)): live})
    v = evaluate(pol, facts, YEAR)
    assert crit(v, "roll") == (1, True)  # a: 5 days, last 25 Dec ≥ 25 Dec; b: 4 days; c: last 24 Dec < 25 Dec
    assert v.to_json()["criteria_detail"]["roll"]["params"] == {"min_active_days": 5, "recent_days": 7}
    assert crit(v, "live") == (1, True) and crit(v, "days") == (40, True) and crit(v, "act") == (1, True)
    with pytest.raises(KeyError, match=r"facts for window .*: expected them loaded, got none"):
        evaluate(pol, ApplicantFacts("p", "平台", "platform", devices=year, resolution_days=(),
                                     go_live=date(2024, 3, 1)), YEAR)


def test_nested_and_or_conditions_are_three_valued() -> None:
    cond = ("any", ("a", ("all", ("b", "c"))))
    assert truth(cond, {"a": False, "b": True, "c": True}) is True
    assert truth(cond, {"a": False, "b": True, "c": False}) is False
    assert truth(cond, {"a": False, "b": True, "c": None}) is None
    assert truth(cond, {"a": True, "b": None, "c": None}) is True
    assert truth(("all", ("a", "b")), {"a": None, "b": False}) is False
    text = RULES + criterion("x", "resolutions", "calendar_year", threshold=10) + \
        criterion("y", "resolutions", "calendar_year", ">", 100) + \
        criterion("z", "resolutions", "calendar_year", "≥", 50) + award('{any = ["y", {all = ["x", "z"]}]}')
    pol = parse_policy(text.encode(), "w.toml")
    facts = ApplicantFacts("n", "节点", "node", devices=(), resolution_days=[ResolutionDay(date(YEAR, 5, 1),
                                                                                       resolutions_ok=50)])
    a = evaluate(pol, facts, YEAR).to_json()["awards"][0]
    assert a["eligible"] is True and a["condition"] == {"any": ["y", {"all": ["x", "z"]}]}


# ---- wrong rule files: the line and the reason --------------------------------------------------------------------

def line_of(text: str, needle: str) -> int:
    return text[:text.index(needle)].count("\n") + 1


@pytest.mark.parametrize(("old", "new", "needle", "reason"), [
    ('metric = "new_registrations"\naggregation = "sum"', 'metric = "new_registrations"\naggregation = "median"',
     'aggregation = "median"', r"criteria\[1\] \(id 'wh-node-registrations-100m'\)\.aggregation: expected one of "
                               r"\['sum', 'daily_average'\], got 'median'"),
    ('window = "calendar_year"\nparams', 'window = "rolling_0_days"\nparams', 'window = "rolling_0_days"',
     r"\.window: expected one of .*got 'rolling_0_days'"),
    ("params.recent_days = 90", "params.recent_dayz = 90", "params.recent_dayz",
     r"\.params: unknown key 'recent_dayz'"),
    ('requires = ["wh-platform-served-100", "wh-platform-devices-5000"]',
     'requires = {either = ["wh-platform-served-100"]}', "requires = {either",
     r"awards\[1\] \(id 'wh-platform-qualified'\)\.requires: expected a criterion id, an array of them, or"),
    ('kind = "figure"', 'kind = "measured"', 'kind = "measured"\nlabel.zh = "年度新增接入',
     r"\.kind: expected kind 'figure' for metric 'new_enterprise_nodes', got 'measured'"),
    ('kind = "qualification"\nlabel.zh = "平台', 'kind = "percentage"\nlabel.zh = "平台', 'kind = "percentage"',
     r"awards\[1\] .*: missing key 'base'; an award of kind 'percentage' needs \['base', 'rate'\]"),
])
def test_wrong_wuhan_file_is_refused_with_line_and_reason(old: str, new: str, needle: str, reason: str) -> None:
    text = shipped_policies()["wuhan-2023"].read_text(encoding="utf-8")
    assert old in text
    bad = text.replace(old, new, 1)
    line = line_of(bad, needle)
    with pytest.raises(RuleFileInvalid, match=rf"^bad\.toml:(\d+): .*{reason}") as info:
        parse_policy(bad.encode(), "bad.toml")
    got = int(info.value.message.split(":")[1])
    # the named line is the offending key's, or (for a missing key) its table's header
    assert got == line or (bad.splitlines()[got - 1].startswith("[[") and got < line), (got, line)
    assert info.value.detail["line"] == got


def test_rate_as_a_float_and_an_over_100_percent_schedule_are_refused() -> None:
    text = shipped_policies()["chengdu-2022"].read_text(encoding="utf-8")
    bad = text.replace('rate = "0.10"', "rate = 0.10")
    with pytest.raises(RuleFileInvalid, match=rf"bad\.toml:{line_of(bad, 'rate = 0.10')}: awards\[0\] .*\.rate: "
                                              r"expected a non-empty string \(a decimal"):
        parse_policy(bad.encode(), "bad.toml")
    bad2 = text.replace('cap_yuan = "5000000"', 'cap_yuan = "5000000"\nschedule = ["1.5"]')
    with pytest.raises(RuleFileInvalid, match=rf":{line_of(bad2, 'schedule')}: .*\.schedule: expected at most 1"):
        parse_policy(bad2.encode(), "bad.toml")
    bad3 = text.replace('window = "previous_calendar_year"', 'window = "rolling_30_days"')
    with pytest.raises(RuleFileInvalid, match=r"\.window: expected window 'calendar_year' or 'previous_calendar_"
                                              r"year' for an official-recorded figure"):
        parse_policy(bad3.encode(), "bad.toml")
