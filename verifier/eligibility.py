"""Eligibility as a pure function: an applicant's facts and a policy in, a verdict out.

The database query that feeds it is ``verifier.facts.load_applicant_facts``; the rule file says which thresholds,
operators, windows, aggregations, tiers, awards and definitions apply (``verifier.rules``). Measured values are
compared exactly (fractions, no floats); awards are computed with ``decimal.Decimal`` (``verifier.awards``).

Windows (for the assessment ``year``; ``as_of`` ends a year still running):

- calendar_year: 1 January to 31 December of ``year`` (or ``as_of``); daily averages over the year's days;
- previous_calendar_year: the whole of ``year - 1``;
- cumulative: from the applicant's first fact to the window end; since_go_live: from the go-live date (recorded by
  an official, else the first fact) to the window end;
- rolling_N_days: the N days ending at the window end.

Conditions are three-valued: a gate or figure an official has not recorded is "not recorded" (None), never a pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from verifier import awards as arith
from verifier.rules import ROLLING, Award, Condition, Criterion, Policy, condition_json, evaluate_operator

log = logging.getLogger(__name__)

ACTIVE_RANK = 3
REACHABLE_RANK = 2


@dataclass(frozen=True, slots=True)
class DeviceYear:
    """One device (by fingerprint) of one applicant over one calendar year (or over one window, see
    ``ApplicantFacts.window_devices``)."""

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
class GateRecord:
    """What an official recorded for a gate (yes/no) or a figure (a number), with who, when and the document."""

    metric: str
    value: bool | Decimal
    period: int | None = None  # the calendar year it is for; None: not tied to a year (e.g. a connection)
    item: str = ""  # figures may come in items (several investments); the latest record per item counts
    recorded_by: str = ""
    recorded_at: str = ""  # ISO 8601
    document_ref: str = ""
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        value: Any = self.value if isinstance(self.value, bool) else arith.yuan_text(self.value)
        return {"metric": self.metric, "value": value, "period": self.period, "item": self.item,
                "recorded_by": self.recorded_by, "recorded_at": self.recorded_at,
                "document_ref": self.document_ref, "note": self.note}


GateValue = bool | Decimal | GateRecord | Sequence[GateRecord]


@dataclass(frozen=True, slots=True)
class ApplicantFacts:
    applicant_id: str
    name: str
    kind: str  # "platform" | "node"
    devices: Sequence[DeviceYear]  # the assessment year and every earlier year with facts
    resolution_days: Sequence[ResolutionDay]  # every day any window needs
    gates: Mapping[str, GateValue] = field(default_factory=dict)  # by metric: what officials recorded
    window_devices: Mapping[tuple[date, date], Sequence[DeviceYear]] = field(default_factory=dict)
    first_day: date | None = None  # the applicant's first fact
    go_live: date | None = None  # recorded by an official; else the first fact counts
    awarded_before: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # award id → earlier years paid
    awarded_total_before_yuan: Decimal = Decimal(0)  # paid in earlier years under this policy
    evidence: Mapping[str, Any] = field(default_factory=dict)  # checkpoint / ledger size the facts came from


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    start: date
    end: date
    days: int  # the divisor of a daily average

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "start": self.start.isoformat(), "end": self.end.isoformat(), "days": self.days}


def days_in_year(year: int) -> int:
    return (date(year + 1, 1, 1) - date(year, 1, 1)).days


def window_bounds(name: str, year: int, *, as_of: date | None = None, first_day: date | None = None,
                  go_live: date | None = None) -> Window:
    """The dates a window covers for assessment ``year`` (see the module doc)."""
    year_end = date(year, 12, 31)
    end = min(year_end, as_of) if as_of is not None else year_end
    if name == "calendar_year":
        return Window(name, date(year, 1, 1), end, days_in_year(year))
    if name == "previous_calendar_year":
        return Window(name, date(year - 1, 1, 1), date(year - 1, 12, 31), days_in_year(year - 1))
    if name in ("cumulative", "since_go_live"):
        start = (go_live if name == "since_go_live" and go_live else first_day) or date(year, 1, 1)
        start = min(start, end)
        return Window(name, start, end, (end - start).days + 1)
    m = ROLLING.match(name)
    if m is None:
        raise ValueError(f"window: expected a known window, got {name!r}")
    n = int(m.group(1))
    return Window(name, end - timedelta(days=n - 1), end, n)


def connected_devices(devices: Iterable[DeviceYear], year: int | None, *, min_active_days: int, recent_days: int,
                      window_end: date) -> dict[str, str | None]:
    """Fingerprints of the devices counted as connected (with their enterprise): ``year`` None takes every row."""
    recent_from = window_end - timedelta(days=recent_days - 1)
    return {
        d.fp: d.enterprise
        for d in devices
        if (year is None or d.year == year) and d.active_days >= min_active_days
        and d.last_active_day is not None and d.last_active_day >= recent_from
    }


def _median(values: Sequence[int]) -> Fraction:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return Fraction(ordered[mid])
    return Fraction(ordered[mid - 1] + ordered[mid], 2)


def _number(value: Fraction | None) -> int | float | None:
    if value is None:
        return None
    if value.denominator == 1:
        return int(value)
    return round(float(value), 2)


def _records(value: GateValue | None) -> list[GateRecord]:
    if value is None:
        return []
    if isinstance(value, GateRecord):
        return [value]
    if isinstance(value, bool | Decimal):
        return [GateRecord(metric="", value=value)]
    return list(value)


def recorded(facts: ApplicantFacts, metric: str, period: int) -> list[GateRecord]:
    """The records that count for ``metric`` in ``period``: those for that year (else those for no year), the
    latest per item."""
    records = _records(facts.gates.get(metric))
    chosen = [r for r in records if r.period == period] or [r for r in records if r.period is None]
    latest: dict[str, GateRecord] = {}
    for r in sorted(chosen, key=lambda r: r.recorded_at):
        latest[r.item] = r
    return [latest[k] for k in sorted(latest)]


@dataclass(frozen=True, slots=True)
class CriterionResult:
    criterion: Criterion
    value: Fraction | None
    passed: bool | None
    window: Window | None = None
    records: tuple[GateRecord, ...] = ()
    params: tuple[tuple[str, int], ...] = ()

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

    def detail_json(self) -> dict[str, Any]:
        """How the value was obtained (the verdict's ``criteria_detail``, by criterion id)."""
        c = self.criterion
        return {
            "window_dates": self.window.to_json() if self.window else None,
            "aggregation": c.aggregation,
            "params": dict(self.params),
            "source": "agents" if c.kind == "measured" else "official",
            "recorded": [r.to_json() for r in self.records],
        }


@dataclass(frozen=True, slots=True)
class AwardResult:
    measure: int
    id: str
    label: dict[str, str]
    amount_yuan: str | None  # after caps and schedule, as if eligible (None: not computable yet)
    eligible: bool | None  # None: a gate or figure it needs is not recorded
    requires: tuple[str, ...]
    superseded_by: str | None
    kind: str = "fixed"
    condition: Any = None
    payable_yuan: str = "0"
    computed_yuan: str | None = None
    caps_applied: tuple[arith.CapApplied, ...] = ()
    steps: tuple[str, ...] = ()
    year_index: int = 1
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"measure": self.measure, "id": self.id, "label": self.label, "kind": self.kind,
                "amount_yuan": self.amount_yuan, "payable_yuan": self.payable_yuan,
                "computed_yuan": self.computed_yuan, "caps_applied": [c.to_json() for c in self.caps_applied],
                "steps": list(self.steps), "year_index": self.year_index, "eligible": self.eligible,
                "requires": list(self.requires), "condition": self.condition, "superseded_by": self.superseded_by,
                "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Verdict:
    applicant: dict[str, str]
    year: int
    policy: dict[str, Any]
    criteria: tuple[CriterionResult, ...]
    awards: tuple[AwardResult, ...]
    beside: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        payable = sum((Decimal(a.payable_yuan) for a in self.awards), Decimal(0))
        return {"applicant": self.applicant, "year": self.year, "policy": self.policy,
                "criteria": [c.to_json() for c in self.criteria],
                "criteria_detail": {c.criterion.id: c.detail_json() for c in self.criteria},
                "awards": [a.to_json() for a in self.awards],
                "total_payable_yuan": arith.yuan_text(payable), "beside": self.beside, "evidence": self.evidence}


def truth(cond: Condition, passed: Mapping[str, bool | None]) -> bool | None:
    """Three-valued AND/OR: False beats None beats True under "all"; True beats None beats False under "any"."""
    if isinstance(cond, str):
        return passed.get(cond)
    values = [truth(c, passed) for c in cond[1]]
    if cond[0] == "all":
        return False if False in values else (None if None in values else True)
    return True if True in values else (None if None in values else False)


class _Metrics:
    """Measured metrics over windows, computed once per (window, definition parameters)."""

    def __init__(self, policy: Policy, facts: ApplicantFacts, year: int, as_of: date | None) -> None:
        self.policy = policy
        self.facts = facts
        self.year = year
        self.as_of = as_of
        self._connected: dict[tuple[date, date, int, int], dict[str, str | None]] = {}
        self._earlier: dict[tuple[int, int, int], tuple[set[str], set[str]]] = {}

    def window(self, name: str) -> Window:
        return window_bounds(name, self.year, as_of=self.as_of, first_day=self.facts.first_day,
                             go_live=self.facts.go_live)

    def devices(self, w: Window) -> tuple[list[DeviceYear], int | None]:
        key = (w.start, w.end)
        if key in self.facts.window_devices:
            return list(self.facts.window_devices[key]), None
        if w.start == date(w.start.year, 1, 1) and w.end.year == w.start.year:
            return [d for d in self.facts.devices if d.year == w.start.year], w.start.year
        raise KeyError(f"facts for window {w.start}..{w.end}: expected them loaded, got none")

    def connected(self, w: Window, min_days: int, recent: int) -> dict[str, str | None]:
        key = (w.start, w.end, min_days, recent)
        if key not in self._connected:
            devices, year = self.devices(w)
            self._connected[key] = connected_devices(devices, year, min_active_days=min_days, recent_days=recent,
                                                     window_end=w.end)
        return self._connected[key]

    def earlier(self, before_year: int, min_days: int, recent: int) -> tuple[set[str], set[str]]:
        key = (before_year, min_days, recent)
        if key not in self._earlier:
            devices: set[str] = set()
            served: set[str] = set()
            for y in sorted({d.year for d in self.facts.devices if d.year < before_year}):
                found = connected_devices(self.facts.devices, y, min_active_days=min_days, recent_days=recent,
                                          window_end=date(y, 12, 31))
                devices.update(found)
                served.update(e for e in found.values() if e)
            self._earlier[key] = (devices, served)
        return self._earlier[key]

    def value(self, c: Criterion, w: Window) -> tuple[Fraction, tuple[tuple[str, int], ...]]:
        defs = self.policy.definitions
        min_days = c.param("min_active_days", defs.connected_device_min_active_days)
        recent = c.param("recent_days", defs.connected_device_recent_days)
        params = (("min_active_days", min_days), ("recent_days", recent))
        m = c.metric
        if m in ("connected_devices", "served_enterprises", "new_devices", "new_users"):
            now = self.connected(w, min_days, recent)
            if m == "connected_devices":
                return Fraction(len(now)), params
            served = {e for e in now.values() if e}
            if m == "served_enterprises":
                return Fraction(len(served)), params
            old_devices, old_served = self.earlier(w.start.year, min_days, recent)
            if m == "new_devices":
                return Fraction(len(set(now) - old_devices)), params
            return Fraction(len(served - old_served)), params
        if m in ("active_devices", "active_device_days"):
            devices, _ = self.devices(w)
            if m == "active_devices":
                return Fraction(sum(1 for d in devices if d.active_days > 0)), ()
            return Fraction(sum(d.active_days for d in devices)), ()
        days = [r for r in self.facts.resolution_days if w.start <= r.day <= w.end]
        # new_registrations: creates; resolutions and daily_average_resolutions: successful resolutions
        total = sum(r.creates_ok if m == "new_registrations" else r.resolutions_ok for r in days)
        if c.aggregation == "daily_average":
            return Fraction(total, w.days), ()
        return Fraction(total), ()


def _criterion(metrics: _Metrics, facts: ApplicantFacts, c: Criterion) -> CriterionResult:
    w = metrics.window(c.window)
    if c.kind == "measured":
        value, params = metrics.value(c, w)
        assert not isinstance(c.threshold, bool)  # guaranteed by the rule file's validation
        return CriterionResult(c, value, evaluate_operator(value, c.operator, Fraction(c.threshold)), w,
                               params=params)
    records = recorded(facts, c.metric, w.start.year)
    if not records:
        return CriterionResult(c, None, None, w)
    if c.kind == "gate":
        flag = bool(records[-1].value)
        return CriterionResult(c, Fraction(int(flag)), evaluate_operator(flag, c.operator, c.threshold), w,
                               tuple(records))
    total = sum((Decimal(r.value) for r in records), Decimal(0))
    assert not isinstance(c.threshold, bool)
    return CriterionResult(c, Fraction(total), evaluate_operator(total, c.operator, c.threshold), w, tuple(records))


def _amount(a: Award, by_id: Mapping[str, CriterionResult], year_index: int) -> arith.Computation | None:
    if a.kind == "qualification":
        return None
    if a.kind == "fixed":
        assert a.amount_yuan is not None
        comp = arith.fixed(a.amount_yuan)
    else:
        assert a.base is not None
        base = by_id.get(a.base)
        if base is None or base.value is None:
            return None
        if a.kind == "percentage":
            assert a.rate is not None
            items = [Decimal(r.value) for r in base.records] if base.records else \
                [Decimal(base.value.numerator) / Decimal(base.value.denominator)]
            comp = arith.percentage(items, a.rate, cap_per_item=a.cap_per_item_yuan)
        else:
            assert a.per_unit_yuan is not None
            comp = arith.per_unit(Decimal(base.value.numerator) / Decimal(base.value.denominator), a.per_unit_yuan)
    arith.apply_cap(comp, a.cap_yuan, "per_award")
    return arith.apply_schedule(comp, a.schedule, year_index)


def _awards(policy: Policy, facts: ApplicantFacts, year: int, measures: set[int],
            results: Sequence[CriterionResult]) -> list[AwardResult]:
    by_id = {r.criterion.id: r for r in results}
    passed = {r.criterion.id: r.passed for r in results}
    out: list[AwardResult] = []
    comps: list[arith.Computation | None] = []
    paid_in_group: dict[str, str] = {}
    for a in policy.awards:
        if a.measure not in measures:
            continue
        before = tuple(y for y in facts.awarded_before.get(a.id, ()) if y < year)
        year_index = len(set(before)) + 1
        met = truth(a.condition, passed)
        reason = None
        if met and not a.recurring and before:
            met, reason = False, f"one-off award already paid in {min(before)}"
        if met and a.schedule and year_index > len(a.schedule):
            reason = f"schedule of {len(a.schedule)} years already paid"
        comp = _amount(a, by_id, year_index)
        if met and a.kind in ("percentage", "per_unit") and comp is None:
            met, reason = None, f"base {a.base!r} not recorded"
        superseded_by = paid_in_group.get(a.exclusive_group) if a.exclusive_group else None
        eligible = met if superseded_by is None else False
        if eligible and a.exclusive_group:
            paid_in_group[a.exclusive_group] = a.id
        comps.append(comp if eligible else None)
        out.append(AwardResult(
            measure=a.measure, id=a.id, label=a.label.to_json(),
            amount_yuan=arith.yuan_text(comp.amount) if comp else None, eligible=eligible, requires=a.requires,
            superseded_by=superseded_by if met else None, kind=a.kind, condition=condition_json(a.condition),
            computed_yuan=arith.yuan_text(comp.computed) if comp else None,
            caps_applied=tuple(comp.caps) if comp else (), steps=tuple(comp.steps) if comp else (),
            year_index=year_index, reason=reason))
    # the policy's limits over all its awards: per year, then per enterprise (what earlier years left)
    payable = [c.amount if c else Decimal(0) for c in comps]
    limited, hit_year = arith.share_limit(payable, policy.limits.per_year_yuan)
    left = None
    if policy.limits.per_enterprise_yuan is not None:
        left = max(policy.limits.per_enterprise_yuan - facts.awarded_total_before_yuan, Decimal(0))
    final, hit_ent = arith.share_limit(limited, left)
    for i, r in enumerate(out):
        caps = list(r.caps_applied)
        if limited[i] != payable[i]:
            assert policy.limits.per_year_yuan is not None
            caps.append(arith.CapApplied("per_year", policy.limits.per_year_yuan, payable[i], limited[i]))
        if final[i] != limited[i]:
            assert left is not None
            caps.append(arith.CapApplied("per_enterprise", left, limited[i], final[i]))
        if hit_year or hit_ent:
            out[i] = AwardResult(**{**_fields(r), "caps_applied": tuple(caps)})
        out[i] = AwardResult(**{**_fields(out[i]), "payable_yuan": arith.yuan_text(final[i]) or "0"})
    return out


def _fields(r: AwardResult) -> dict[str, Any]:
    return {name: getattr(r, name) for name in AwardResult.__dataclass_fields__}


def evaluate(policy: Policy, facts: ApplicantFacts, year: int, *, as_of: date | None = None) -> Verdict:
    """The verdict for one applicant and one assessment year (see the module doc for the windows).

    ``as_of`` (a calendar day in Asia/Shanghai) ends the windows for a year still running; for a finished year they
    end on 31 December. Measures apply by applicant kind, as the rule file says.
    """
    metrics = _Metrics(policy, facts, year, as_of)
    measures = set(policy.measures_for(facts.kind))
    results = [_criterion(metrics, facts, c) for c in policy.criteria if c.measure in measures]
    award_results = _awards(policy, facts, year, measures, results)

    cal = metrics.window("calendar_year")
    defs = policy.definitions
    now_connected = metrics.connected(cal, defs.connected_device_min_active_days, defs.connected_device_recent_days)
    served = {e for e in now_connected.values() if e}
    this_year = [d for d in facts.devices if d.year == year]
    res = [r for r in facts.resolution_days if r.day.year == year]
    per_day: dict[date, int] = {}
    for r in res:
        per_day[r.day] = per_day.get(r.day, 0) + r.resolutions_ok
    total_ok = sum(per_day.values())
    daily = list(per_day.values()) + [0] * (cal.days - len(per_day))
    peak_day = max(per_day, key=lambda d: (per_day[d], d)) if per_day else None
    beside: dict[str, Any] = {
        "registered_devices": len(this_year),
        "reachable_devices": sum(1 for d in this_year if d.best_status_rank >= REACHABLE_RANK),
        "active_devices": sum(1 for d in this_year if d.active_days > 0),
        "active_device_days": sum(d.active_days for d in this_year),
        "connected_devices": len(now_connected),
        "served_enterprises": len(served),
        "window_end": cal.end.isoformat(),
        "days_in_year": cal.days,
        "successful_resolutions": total_ok,
        "failed_resolutions": sum(r.resolutions_failed for r in res),
        "new_registrations": sum(r.creates_ok for r in res),
        "successful_deletes": sum(r.deletes_ok for r in res),
        "days_with_resolutions": sum(1 for v in per_day.values() if v > 0),
        "median_daily_resolutions": _number(_median(daily)),
        "peak_daily_resolutions": per_day[peak_day] if peak_day else 0,
        "peak_day": peak_day.isoformat() if peak_day else None,
    }
    return Verdict(
        applicant={"id": facts.applicant_id, "name": facts.name, "kind": facts.kind},
        year=year,
        policy={"id": policy.id, "title": policy.title.to_json(), "source": policy.source, "sha256": policy.sha256},
        criteria=tuple(results),
        awards=tuple(award_results),
        beside=beside,
        evidence=dict(facts.evidence),
    )
