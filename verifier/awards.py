"""Award arithmetic, exact: ``decimal.Decimal`` only (never floats), rounded to the fen (0.01 yuan, half up) once,
at the end of each step that can produce fractions.

An award is one of:

- fixed: ``amount_yuan``;
- percentage: ``rate`` × base, where the base is a figure an official recorded (investment, fee, revenue), possibly
  in items: each item's share is capped at ``cap_per_item_yuan``;
- per_unit: ``per_unit_yuan`` × a measured count (2,000 yuan a device);
- qualification: pass/fail only, no amount.

Then, in this order: the award's own cap (``cap_yuan``, per item of the policy and year), the multi-year schedule
(``schedule[k-1]`` in the k-th year the award is paid, nothing after the last), the policy's cap per year over all
its awards (``[limits] per_year_yuan``) and per enterprise over all years (``per_enterprise_yuan``, minus what was
already awarded). Every cap that changed the amount is listed with the amount before and after.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

log = logging.getLogger(__name__)

FEN = Decimal("0.01")
ZERO = Decimal(0)


def yuan(amount: Decimal) -> Decimal:
    """Rounded to the fen, half up."""
    return amount.quantize(FEN, rounding=ROUND_HALF_UP)


def yuan_text(amount: Decimal | None) -> str | None:
    """"3000000" for whole yuan, "1234.50" otherwise (a string: JSON numbers would be floats)."""
    if amount is None:
        return None
    if amount == amount.to_integral_value():
        return str(int(amount))
    return str(yuan(amount))


@dataclass(frozen=True, slots=True)
class CapApplied:
    cap: str  # "per_item" | "per_award" | "per_year" | "per_enterprise"
    limit_yuan: Decimal
    before_yuan: Decimal
    after_yuan: Decimal

    def to_json(self) -> dict[str, Any]:
        return {"cap": self.cap, "limit_yuan": yuan_text(self.limit_yuan), "before_yuan": yuan_text(self.before_yuan),
                "after_yuan": yuan_text(self.after_yuan)}


@dataclass(slots=True)
class Computation:
    """An amount and how it came to be."""

    amount: Decimal
    computed: Decimal  # before any cap or schedule
    caps: list[CapApplied] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


def apply_cap(comp: Computation, limit: Decimal | None, name: str) -> Computation:
    """Cap ``comp.amount`` at ``limit`` (None: no cap); exactly at the cap is not reduced."""
    if limit is None or comp.amount <= limit:
        return comp
    comp.caps.append(CapApplied(name, limit, comp.amount, limit))
    comp.steps.append(f"{name} cap {yuan_text(limit)}: {yuan_text(comp.amount)} → {yuan_text(limit)}")
    comp.amount = limit
    return comp


def fixed(amount: Decimal) -> Computation:
    return Computation(amount=amount, computed=amount, steps=[f"fixed {yuan_text(amount)}"])


def percentage(items: Sequence[Decimal], rate: Decimal, *, cap_per_item: Decimal | None = None) -> Computation:
    """``rate`` of each item of the base, each capped at ``cap_per_item``, summed."""
    total = ZERO
    computed = ZERO
    caps: list[CapApplied] = []
    steps: list[str] = []
    for item in items:
        share = yuan(item * rate)
        computed += share
        steps.append(f"{rate} × {yuan_text(item)} = {yuan_text(share)}")
        if cap_per_item is not None and share > cap_per_item:
            caps.append(CapApplied("per_item", cap_per_item, share, cap_per_item))
            steps.append(f"per_item cap {yuan_text(cap_per_item)}: {yuan_text(share)} → {yuan_text(cap_per_item)}")
            share = cap_per_item
        total += share
    return Computation(amount=total, computed=computed, caps=caps, steps=steps)


def per_unit(count: Decimal, amount_each: Decimal) -> Computation:
    amount = yuan(count * amount_each)
    return Computation(amount=amount, computed=amount,
                       steps=[f"{yuan_text(count)} × {yuan_text(amount_each)} = {yuan_text(amount)}"])


def schedule_rate(schedule: Sequence[Decimal], year_index: int) -> Decimal:
    """The share paid in the ``year_index``-th (1-based) year of a multi-year schedule; 1 without a schedule."""
    if not schedule:
        return Decimal(1)
    if year_index < 1:
        raise ValueError(f"year_index: expected ≥ 1, got {year_index}")
    return schedule[year_index - 1] if year_index <= len(schedule) else ZERO


def apply_schedule(comp: Computation, schedule: Sequence[Decimal], year_index: int) -> Computation:
    if not schedule:
        return comp
    rate = schedule_rate(schedule, year_index)
    after = yuan(comp.amount * rate)
    comp.steps.append(f"schedule year {year_index}: {rate} × {yuan_text(comp.amount)} = {yuan_text(after)}")
    comp.amount = after
    return comp


def share_limit(amounts: Sequence[Decimal], limit: Decimal | None) -> tuple[list[Decimal], bool]:
    """Fit a list of awards (in rule-file order) under one total ``limit``: earlier awards are paid first."""
    if limit is None or sum(amounts, ZERO) <= limit:
        return list(amounts), False
    left = limit
    out: list[Decimal] = []
    for amount in amounts:
        paid = min(amount, left)
        out.append(paid)
        left -= paid
    return out, True
