"""Rule files: what a policy decided (thresholds, operators, windows, tiers, amounts, definitions), as data.

The code knows how to evaluate a metric (``verifier.eligibility``); the TOML file knows what, say, Jiaxing decided
in 2021. A rule file is validated completely when it is loaded: a TOML syntax error, an unknown key, a wrong type,
an unknown metric or operator, a missing threshold are refused with a ``RuleFileInvalid`` naming the file, the place
(``criteria[2] (id 'm5-devices-10000').operator``), what was expected and what came.

Shape (see ``verifier/rules/jiaxing-2021.toml``)::

    schema = 1
    [policy]        id, title.zh/en, source, effective_from
    [definitions]   timezone, connected_device_min_active_days, connected_device_recent_days
    [[measures]]    number, applies_to ("platform" | "node"), title.zh/en
    [[criteria]]    measure, id, kind ("measured" | "gate"), label.zh/en, metric, operator, threshold, unit,
                    window ("calendar_year"), definition.zh/en
    [[awards]]      measure, id, label.zh/en, amount_yuan (decimal string), requires = [criterion ids],
                    exclusive_group (optional: within a group only the first eligible award listed is paid)
"""

from __future__ import annotations

import hashlib
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NoReturn

from verifier.errors import RuleFileInvalid

log = logging.getLogger(__name__)

DEFAULT_RULES_PATH = Path(__file__).parent / "rules" / "jiaxing-2021.toml"

OPERATORS: tuple[str, ...] = (">", ">=", "≥", "<", "<=", "≤", "=")
WINDOWS: tuple[str, ...] = ("calendar_year",)
APPLICANT_KINDS: tuple[str, ...] = ("platform", "node")
CRITERION_KINDS: tuple[str, ...] = ("measured", "gate")
# The metrics the code knows how to evaluate, and whether an agent can measure them.
METRICS: dict[str, str] = {
    "served_enterprises": "measured",
    "connected_devices": "measured",
    "new_users": "measured",
    "new_devices": "measured",
    "new_registrations": "measured",
    "daily_average_resolutions": "measured",
    "connected_to_top_level_node": "gate",
}
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Text:
    zh: str
    en: str

    def to_json(self) -> dict[str, str]:
        return {"zh": self.zh, "en": self.en}


@dataclass(frozen=True, slots=True)
class Definitions:
    timezone: str
    connected_device_min_active_days: int
    connected_device_recent_days: int


@dataclass(frozen=True, slots=True)
class Measure:
    number: int
    applies_to: str
    title: Text


@dataclass(frozen=True, slots=True)
class Criterion:
    measure: int
    id: str
    kind: str
    label: Text
    metric: str
    operator: str
    threshold: Decimal | bool
    unit: str
    window: str
    definition: Text


@dataclass(frozen=True, slots=True)
class Award:
    measure: int
    id: str
    label: Text
    amount_yuan: Decimal
    requires: tuple[str, ...]
    exclusive_group: str | None


@dataclass(frozen=True, slots=True)
class Policy:
    id: str
    title: Text
    source: str
    effective_from: str
    sha256: str
    definitions: Definitions
    measures: tuple[Measure, ...]
    criteria: tuple[Criterion, ...]
    awards: tuple[Award, ...]

    def measures_for(self, applicant_kind: str) -> tuple[int, ...]:
        return tuple(m.number for m in self.measures if m.applies_to == applicant_kind)


class _Reader:
    """Reads one TOML table, remembering where it is, refusing unknown keys and wrong types."""

    def __init__(self, source: str, where: str, table: Any) -> None:
        self.source = source
        self.where = where
        if not isinstance(table, dict):
            self.fail(f"expected a table, got {_kind(table)}")
        self.table: dict[str, Any] = table

    def fail(self, what: str, key: str | None = None) -> NoReturn:
        place = self.where + (f".{key}" if key and self.where else key or "")
        raise RuleFileInvalid(f"{self.source}: {place or '(top level)'}: {what}")

    def keys(self, required: set[str], optional: set[str] | None = None) -> None:
        optional = optional or set()
        unknown = sorted(set(self.table) - required - optional)
        if unknown:
            self.fail(f"unknown key {unknown[0]!r}; expected only {sorted(required | optional)}")
        missing = sorted(required - set(self.table))
        if missing:
            self.fail(f"missing key {missing[0]!r}; expected {sorted(required)}")

    def str_(self, key: str, choices: tuple[str, ...] | None = None, pattern: re.Pattern[str] | None = None) -> str:
        value = self.table[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(f"expected a non-empty string, got {_kind(value)} {value!r}", key)
        if choices is not None and value not in choices:
            self.fail(f"expected one of {list(choices)}, got {value!r}", key)
        if pattern is not None and not pattern.match(value):
            self.fail(f"expected an id matching {pattern.pattern}, got {value!r}", key)
        return value

    def int_(self, key: str, minimum: int = 0) -> int:
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"expected an integer, got {_kind(value)} {value!r}", key)
        if value < minimum:
            self.fail(f"expected an integer ≥ {minimum}, got {value}", key)
        return value

    def text(self, key: str) -> Text:
        sub = self.sub(key, self.table[key])
        sub.keys({"zh", "en"})
        return Text(zh=sub.str_("zh"), en=sub.str_("en"))

    def sub(self, key: str, table: Any) -> _Reader:
        return _Reader(self.source, f"{self.where}.{key}" if self.where else key, table)

    def array(self, key: str) -> list[Any]:
        value = self.table[key]
        if not isinstance(value, list):
            self.fail(f"expected an array of tables ([[{key}]]), got {_kind(value)}", key)
        return value


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _threshold(reader: _Reader, kind: str) -> Decimal | bool:
    value = reader.table["threshold"]
    if kind == "gate":
        if not isinstance(value, bool):
            reader.fail(f"expected true or false for a gate, got {_kind(value)} {value!r}", "threshold")
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        reader.fail(f"expected a number (or a decimal string), got {_kind(value)} {value!r}", "threshold")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        reader.fail(f"expected a number (or a decimal string), got {value!r}", "threshold")
    if not number.is_finite() or number < 0:
        reader.fail(f"expected a finite number ≥ 0, got {value!r}", "threshold")
    return number


def parse_policy(data: bytes, source: str = "<rules>") -> Policy:
    """Parse and validate a rule file's bytes (see the module doc); raise RuleFileInvalid on the first problem."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RuleFileInvalid(f"{source}: expected UTF-8 text, got undecodable bytes at offset {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RuleFileInvalid(f"{source}: TOML syntax error: {exc}") from None
    top = _Reader(source, "", raw)
    top.keys({"schema", "policy", "definitions", "measures", "criteria", "awards"})
    if top.table["schema"] != 1 or isinstance(top.table["schema"], bool):
        top.fail(f"expected 1, got {top.table['schema']!r}", "schema")

    pol = top.sub("policy", top.table["policy"])
    pol.keys({"id", "title", "source", "effective_from"})
    defs = top.sub("definitions", top.table["definitions"])
    defs.keys({"timezone", "connected_device_min_active_days", "connected_device_recent_days"})
    definitions = Definitions(
        timezone=defs.str_("timezone", choices=("Asia/Shanghai",)),
        connected_device_min_active_days=defs.int_("connected_device_min_active_days", 1),
        connected_device_recent_days=defs.int_("connected_device_recent_days", 1),
    )

    measures: list[Measure] = []
    for i, item in enumerate(top.array("measures")):
        r = top.sub(f"measures[{i}]", item)
        r.keys({"number", "applies_to", "title"})
        measures.append(Measure(number=r.int_("number", 1), applies_to=r.str_("applies_to", APPLICANT_KINDS),
                                title=r.text("title")))
    numbers = [m.number for m in measures]
    if len(set(numbers)) != len(numbers):
        top.fail(f"expected each measure number once, got {numbers}", "measures")

    criteria: list[Criterion] = []
    for i, item in enumerate(top.array("criteria")):
        ident = item.get("id") if isinstance(item, dict) else None
        r = top.sub(f"criteria[{i}]" + (f" (id {ident!r})" if isinstance(ident, str) else ""), item)
        r.keys({"measure", "id", "kind", "label", "metric", "operator", "threshold", "unit", "window", "definition"})
        measure = r.int_("measure", 1)
        if measure not in numbers:
            r.fail(f"expected a measure listed in [[measures]] {numbers}, got {measure}", "measure")
        kind = r.str_("kind", CRITERION_KINDS)
        metric = r.str_("metric", tuple(METRICS))
        if METRICS[metric] != kind:
            r.fail(f"expected kind {METRICS[metric]!r} for metric {metric!r}, got {kind!r}", "kind")
        criteria.append(Criterion(
            measure=measure, id=r.str_("id", pattern=_ID), kind=kind, label=r.text("label"), metric=metric,
            operator=r.str_("operator", OPERATORS), threshold=_threshold(r, kind), unit=r.str_("unit"),
            window=r.str_("window", WINDOWS), definition=r.text("definition"),
        ))
    ids = [c.id for c in criteria]
    if len(set(ids)) != len(ids):
        top.fail(f"expected each criterion id once, got {ids}", "criteria")

    awards: list[Award] = []
    for i, item in enumerate(top.array("awards")):
        ident = item.get("id") if isinstance(item, dict) else None
        r = top.sub(f"awards[{i}]" + (f" (id {ident!r})" if isinstance(ident, str) else ""), item)
        r.keys({"measure", "id", "label", "amount_yuan", "requires"}, {"exclusive_group"})
        measure = r.int_("measure", 1)
        if measure not in numbers:
            r.fail(f"expected a measure listed in [[measures]] {numbers}, got {measure}", "measure")
        amount_text = r.str_("amount_yuan")
        try:
            amount = Decimal(amount_text)
        except InvalidOperation:
            r.fail(f"expected a decimal string such as \"3000000\", got {amount_text!r}", "amount_yuan")
        if not amount.is_finite() or amount < 0:
            r.fail(f"expected a finite amount ≥ 0, got {amount_text!r}", "amount_yuan")
        requires = r.table["requires"]
        if not isinstance(requires, list) or not requires or not all(isinstance(x, str) for x in requires):
            r.fail(f"expected a non-empty array of criterion ids, got {requires!r}", "requires")
        for req in requires:
            if req not in ids:
                r.fail(f"expected criterion ids from [[criteria]], got unknown {req!r}", "requires")
        group = r.str_("exclusive_group", pattern=_ID) if "exclusive_group" in r.table else None
        awards.append(Award(measure=measure, id=r.str_("id", pattern=_ID), label=r.text("label"),
                            amount_yuan=amount, requires=tuple(requires), exclusive_group=group))

    return Policy(
        id=pol.str_("id", pattern=_ID),
        title=pol.text("title"),
        source=pol.str_("source"),
        effective_from=str(pol.table["effective_from"]),
        sha256=hashlib.sha256(data).hexdigest(),
        definitions=definitions,
        measures=tuple(measures),
        criteria=tuple(criteria),
        awards=tuple(awards),
    )


def load_policy(path: Path | str = DEFAULT_RULES_PATH) -> Policy:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RuleFileInvalid(f"{path}: expected a readable rule file, got {exc.strerror}") from None
    policy = parse_policy(data, str(path))
    log.info("loaded rule file %r (policy %r, sha256 %s)", str(path), policy.id, policy.sha256[:16])
    return policy


def evaluate_operator(value: Any, operator: str, threshold: Any) -> bool:
    """Compare exactly as the rule file wrote it (``>`` is not ``≥``)."""
    ops: Mapping[str, Any] = {
        ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "≥": lambda a, b: a >= b,
        "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, "≤": lambda a, b: a <= b, "=": lambda a, b: a == b,
    }
    return bool(ops[operator](value, threshold))
