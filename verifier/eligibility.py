"""Eligibility as a pure function: an applicant's facts and a policy in, a verdict out.

The database query that feeds it is ``verifier.facts.load_applicant_facts``; the rule file says which thresholds,
operators, tiers and definitions apply (``verifier.rules``). Values are compared exactly (fractions, no floats).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from fractions import Fraction
from typing import Any

from verifier.rules import Criterion, Policy, evaluate_operator

log = logging.getLogger(__name__)

ACTIVE_RANK = 3
REACHABLE_RANK = 2


@dataclass(frozen=True, slots=True)
class DeviceYear:
    """One device (by fingerprint) of one applicant over one calendar year."""

    fp: str
    year: int
    active_days: int  # distinct Asia/Shanghai days with status "active"
    last_active_day: date | None
    best_status_rank: int  # 1 registered, 2 reachable, 3 active
    enterprise: str | None


@dataclass(frozen=True, slots=True)
class ResolutionDay:
    day: date
    resolutions_ok: int = 0
    resolutions_failed: int = 0
    creates_ok: int = 0
    deletes_ok: int = 0


@dataclass(frozen=True, slots=True)
class ApplicantFacts:
    applicant_id: str
    name: str
    kind: str  # "platform" | "node"
    devices: Sequence[DeviceYear]  # the assessment year and every earlier year with facts
    resolution_days: Sequence[ResolutionDay]  # the assessment year
    gates: Mapping[str, bool] = field(default_factory=dict)  # gate metrics recorded by an official


@dataclass(frozen=True, slots=True)
class CriterionResult:
    criterion: Criterion
    value: Fraction | None
    passed: bool | None

    def to_json(self) -> dict[str, Any]:
        c = self.criterion
        return {
            "measure": c.measure,
            "id": c.id,
            "label": c.label.to_json(),
            "metric": c.metric,
            "value": _number(self.value),
            "operator": c.operator,
            "threshold": c.threshold if isinstance(c.threshold, bool) else _number(Fraction(c.threshold)),
            "unit": c.unit,
            "window": c.window,
            "definition": c.definition.to_json(),
            "passed": self.passed,
            "kind": c.kind,
        }


@dataclass(frozen=True, slots=True)
class AwardResult:
    measure: int
    id: str
    label: dict[str, str]
    amount_yuan: str
    eligible: bool
    requires: tuple[str, ...]
    superseded_by: str | None

    def to_json(self) -> dict[str, Any]:
        return {"measure": self.measure, "id": self.id, "label": self.label, "amount_yuan": self.amount_yuan,
                "eligible": self.eligible, "requires": list(self.requires), "superseded_by": self.superseded_by}


@dataclass(frozen=True, slots=True)
class Verdict:
    applicant: dict[str, str]
    year: int
    policy: dict[str, Any]
    criteria: tuple[CriterionResult, ...]
    awards: tuple[AwardResult, ...]
    beside: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"applicant": self.applicant, "year": self.year, "policy": self.policy,
                "criteria": [c.to_json() for c in self.criteria], "awards": [a.to_json() for a in self.awards],
                "beside": self.beside}


def _number(value: Fraction | None) -> int | float | None:
    if value is None:
        return None
    if value.denominator == 1:
        return int(value)
    return round(float(value), 2)


def days_in_year(year: int) -> int:
    return (date(year + 1, 1, 1) - date(year, 1, 1)).days


def connected_devices(devices: Iterable[DeviceYear], year: int, *, min_active_days: int, recent_days: int,
                      window_end: date) -> dict[str, str | None]:
    """Fingerprints of the devices counted as connected in ``year`` (with their enterprise)."""
    recent_from = window_end - timedelta(days=recent_days - 1)
    return {
        d.fp: d.enterprise
        for d in devices
        if d.year == year and d.active_days >= min_active_days
        and d.last_active_day is not None and d.last_active_day >= recent_from
    }


def _median(values: Sequence[int]) -> Fraction:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return Fraction(ordered[mid])
    return Fraction(ordered[mid - 1] + ordered[mid], 2)


def evaluate(policy: Policy, facts: ApplicantFacts, year: int, *, as_of: date | None = None) -> Verdict:
    """The verdict for one applicant and one calendar year.

    ``as_of`` (a calendar day in Asia/Shanghai) ends the "last 90 days" window for a year still running; for a
    finished year the window ends on 31 December. Measures apply by applicant kind, as the rule file says.
    """
    defs = policy.definitions
    year_end = date(year, 12, 31)
    window_end = min(year_end, as_of) if as_of is not None else year_end

    def connected_in(y: int, end: date) -> dict[str, str | None]:
        return connected_devices(facts.devices, y, min_active_days=defs.connected_device_min_active_days,
                                 recent_days=defs.connected_device_recent_days, window_end=end)

    now_connected = connected_in(year, window_end)
    served = {e for e in now_connected.values() if e}
    earlier_years = sorted({d.year for d in facts.devices if d.year < year})
    earlier_devices: set[str] = set()
    earlier_served: set[str] = set()
    for y in earlier_years:
        before = connected_in(y, date(y, 12, 31))
        earlier_devices.update(before)
        earlier_served.update(e for e in before.values() if e)

    this_year = [d for d in facts.devices if d.year == year]
    res = [r for r in facts.resolution_days if r.day.year == year]
    n_days = days_in_year(year)
    per_day: dict[date, int] = {}
    for r in res:
        per_day[r.day] = per_day.get(r.day, 0) + r.resolutions_ok
    total_ok = sum(per_day.values())
    daily = list(per_day.values()) + [0] * (n_days - len(per_day))
    peak_day = max(per_day, key=lambda d: (per_day[d], d)) if per_day else None

    metrics: dict[str, Fraction] = {
        "served_enterprises": Fraction(len(served)),
        "connected_devices": Fraction(len(now_connected)),
        "new_users": Fraction(len(served - earlier_served)),
        "new_devices": Fraction(len(set(now_connected) - earlier_devices)),
        "new_registrations": Fraction(sum(r.creates_ok for r in res)),
        "daily_average_resolutions": Fraction(total_ok, n_days),
    }

    measures = set(policy.measures_for(facts.kind))
    results: list[CriterionResult] = []
    for c in policy.criteria:
        if c.measure not in measures:
            continue
        if c.kind == "gate":
            recorded = facts.gates.get(c.metric)
            passed = None if recorded is None else evaluate_operator(recorded, c.operator, c.threshold)
            results.append(CriterionResult(c, None if recorded is None else Fraction(int(recorded)), passed))
            continue
        value = metrics[c.metric]
        assert not isinstance(c.threshold, bool)  # guaranteed by the rule file's validation
        results.append(CriterionResult(c, value, evaluate_operator(value, c.operator, Fraction(c.threshold))))
    passed_by_id = {r.criterion.id: r.passed for r in results}

    awards: list[AwardResult] = []
    paid_in_group: dict[str, str] = {}
    for a in policy.awards:
        if a.measure not in measures:
            continue
        met = all(passed_by_id.get(req) is True for req in a.requires)
        superseded_by = paid_in_group.get(a.exclusive_group) if a.exclusive_group else None
        eligible = met and superseded_by is None
        if eligible and a.exclusive_group:
            paid_in_group[a.exclusive_group] = a.id
        awards.append(AwardResult(measure=a.measure, id=a.id, label=a.label.to_json(),
                                  amount_yuan=str(a.amount_yuan), eligible=eligible, requires=a.requires,
                                  superseded_by=superseded_by if met else None))

    beside: dict[str, Any] = {
        "registered_devices": len(this_year),
        "reachable_devices": sum(1 for d in this_year if d.best_status_rank >= REACHABLE_RANK),
        "active_devices": sum(1 for d in this_year if d.active_days > 0),
        "active_device_days": sum(d.active_days for d in this_year),
        "connected_devices": len(now_connected),
        "served_enterprises": len(served),
        "window_end": window_end.isoformat(),
        "days_in_year": n_days,
        "successful_resolutions": total_ok,
        "failed_resolutions": sum(r.resolutions_failed for r in res),
        "successful_deletes": sum(r.deletes_ok for r in res),
        "days_with_resolutions": sum(1 for v in per_day.values() if v > 0),
        "median_daily_resolutions": _number(_median(daily)),
        "peak_daily_resolutions": per_day[peak_day] if peak_day else 0,
        "peak_day": peak_day.isoformat() if peak_day else None,
    }
    return Verdict(
        applicant={"id": facts.applicant_id, "name": facts.name, "kind": facts.kind},
        year=year,
        policy={"id": policy.id, "title": policy.title.to_json(), "sha256": policy.sha256},
        criteria=tuple(results),
        awards=tuple(awards),
        beside=beside,
    )
