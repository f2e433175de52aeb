"""Rule files: what a policy decided (thresholds, operators, windows, aggregations, tiers, award arithmetic,
definitions), as data. One file per policy and year (``verifier/rules/<city>-<year>.toml``).

The code knows how to evaluate a metric (``verifier.eligibility``) and compute an award (``verifier.awards``); the
TOML file knows what, say, Jiaxing decided in 2021. A rule file is validated completely when it is loaded: a TOML
syntax error, an unknown key, a wrong type, an unknown metric, window, aggregation or operator, a missing threshold
are refused with a ``RuleFileInvalid`` naming the file and line, the place (``criteria[2] (id 'm5-devices-10000')
.operator``), what was expected and what came: ``r.toml:57: criteria[1] (id 'x').operator: expected …, got …``.

Shape (see ``verifier/rules/*.toml``)::

    schema = 1
    [policy]        id, title.zh/en, source, effective_from
    [definitions]   timezone, connected_device_min_active_days, connected_device_recent_days
    [limits]        (optional) per_year_yuan, per_enterprise_yuan: caps over all awards of the policy
    [[measures]]    number, applies_to ("platform" | "node"), title.zh/en
    [[criteria]]    measure, id, kind ("measured" | "gate" | "figure"), label.zh/en, metric, operator (exactly as
                    written: ">" is not "≥"), threshold, unit, window, definition.zh/en;
                    optional: aggregation (default: the metric's), params (min_active_days, recent_days: the
                    definition parameters, default [definitions])
    [[awards]]      measure, id, label.zh/en, requires (criterion ids, all needed; or a nested {all=[…]} / {any=[…]});
                    kind ("fixed" default | "percentage" | "per_unit" | "qualification");
                    fixed: amount_yuan; percentage: rate, base (a criterion id whose value, or recorded items, is
                    the base); per_unit: per_unit_yuan, base (a criterion id: the count);
                    optional: cap_yuan, cap_per_item_yuan, schedule (rates by award year, e.g. ["0.6","0.4","0.3"]),
                    recurring (default true), exclusive_group (tiers: only the first eligible award listed is paid)

Windows: calendar_year, previous_calendar_year, cumulative, since_go_live, rolling_<N>_days.
Kinds: "measured" metrics come from agents' signed reports; "gate" (yes/no) and "figure" (a number, e.g. revenue)
metrics come from what an official recorded (``verifier.gates``).
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

RULES_DIR = Path(__file__).parent / "rules"
DEFAULT_RULES_PATH = RULES_DIR / "jiaxing-2021.toml"

OPERATORS: tuple[str, ...] = (">", ">=", "≥", "<", "<=", "≤", "=")
WINDOWS: tuple[str, ...] = ("calendar_year", "previous_calendar_year", "cumulative", "since_go_live",
                            "rolling_<N>_days")
ROLLING = re.compile(r"^rolling_([1-9][0-9]{0,3})_days$")
AGGREGATIONS: tuple[str, ...] = ("count", "distinct_count", "sum", "daily_average")
APPLICANT_KINDS: tuple[str, ...] = ("platform", "node")
CRITERION_KINDS: tuple[str, ...] = ("measured", "gate", "figure")
AWARD_KINDS: tuple[str, ...] = ("fixed", "percentage", "per_unit", "qualification")
PARAMS: tuple[str, ...] = ("min_active_days", "recent_days")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: str  # "measured" | "gate" | "figure"
    aggregations: tuple[str, ...]
    default: str


_DEVICES = ("distinct_count",)
_SUMS = ("sum", "daily_average")
# The metrics the code knows how to evaluate, where their values come from, and how they may be aggregated.
METRICS: dict[str, MetricSpec] = {
    "served_enterprises": MetricSpec("measured", _DEVICES, "distinct_count"),
    "connected_devices": MetricSpec("measured", _DEVICES, "distinct_count"),
    "new_users": MetricSpec("measured", _DEVICES, "distinct_count"),
    "new_devices": MetricSpec("measured", _DEVICES, "distinct_count"),
    "active_devices": MetricSpec("measured", _DEVICES, "distinct_count"),
    "active_device_days": MetricSpec("measured", ("count",), "count"),
    "new_registrations": MetricSpec("measured", _SUMS, "sum"),
    "resolutions": MetricSpec("measured", _SUMS, "sum"),
    "daily_average_resolutions": MetricSpec("measured", ("daily_average",), "daily_average"),
    "connected_to_top_level_node": MetricSpec("gate", ("count",), "count"),
    "onsite_inspection_passed": MetricSpec("gate", ("count",), "count"),
    "audit_opinion_unqualified": MetricSpec("gate", ("count",), "count"),
    "new_enterprise_nodes": MetricSpec("figure", ("sum",), "sum"),
    "settled_contract_revenue_yuan": MetricSpec("figure", ("sum",), "sum"),
    "investment_yuan": MetricSpec("figure", ("sum",), "sum"),
    "annual_service_fee_yuan": MetricSpec("figure", ("sum",), "sum"),
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
class Limits:
    per_year_yuan: Decimal | None = None
    per_enterprise_yuan: Decimal | None = None


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
    aggregation: str = "distinct_count"
    params: tuple[tuple[str, int], ...] = ()

    def param(self, name: str, default: int) -> int:
        return dict(self.params).get(name, default)


# A condition: a criterion id, or ("all" | "any", (conditions…)).
Condition = str | tuple[str, tuple["Condition", ...]]


def condition_ids(cond: Condition) -> list[str]:
    if isinstance(cond, str):
        return [cond]
    return [i for sub in cond[1] for i in condition_ids(sub)]


def condition_json(cond: Condition) -> Any:
    if isinstance(cond, str):
        return cond
    return {cond[0]: [condition_json(c) for c in cond[1]]}


@dataclass(frozen=True, slots=True)
class Award:
    measure: int
    id: str
    label: Text
    amount_yuan: Decimal | None
    requires: tuple[str, ...]  # every criterion id the condition names
    exclusive_group: str | None
    kind: str = "fixed"
    condition: Condition = ("all", ())
    rate: Decimal | None = None
    per_unit_yuan: Decimal | None = None
    base: str | None = None
    cap_yuan: Decimal | None = None
    cap_per_item_yuan: Decimal | None = None
    schedule: tuple[Decimal, ...] = ()
    recurring: bool = True


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
    limits: Limits = Limits()

    def measures_for(self, applicant_kind: str) -> tuple[int, ...]:
        return tuple(m.number for m in self.measures if m.applies_to == applicant_kind)


class _Lines:
    """Finds the line of a table or key in the rule file's text (tomllib reports lines for syntax errors only)."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\"]+)\s*\]\]?")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []  # (0-based line, name, is array)
        for n, line in enumerate(self.lines):
            m = self._HEADER.match(line)
            if m:
                self.headers.append((n, m.group(1), line.lstrip().startswith("[[")))

    def span(self, where: str) -> tuple[int, int]:
        """0-based [start, end) lines of the table ``where`` ("", "policy", "criteria[3]")."""
        m = re.match(r"^([A-Za-z0-9_]+)(?:\[(\d+)\])?", where)
        first_header = self.headers[0][0] if self.headers else len(self.lines)
        if not where or m is None:
            return 0, first_header
        name, index = m.group(1), m.group(2)
        found = [h for h in self.headers if h[1] == name and h[2] == (index is not None)]
        pos = int(index) if index is not None else 0
        if pos >= len(found):
            return 0, first_header
        start = found[pos][0]
        later = [h[0] for h in self.headers if h[0] > start]
        return start, (later[0] if later else len(self.lines))

    def line_of(self, where: str, key: str | None) -> int:
        """1-based line of ``key`` in the table ``where`` (or of the table's header)."""
        start, end = self.span(where)
        parts = [p for p in re.split(r"[.\s]", key or "") if p]
        for depth in range(len(parts), 0, -1):  # the full dotted key first, then its parents
            dotted = r"\s*\.\s*".join(rf"\"?{re.escape(p)}\"?" for p in parts[:depth])
            pattern = re.compile(rf"^\s*{dotted}\s*[=.]")
            for n in range(start, end):
                if pattern.match(self.lines[n]):
                    return n + 1
        return start + 1


class _Reader:
    """Reads one TOML table, remembering where it is, refusing unknown keys and wrong types."""

    def __init__(self, source: str, where: str, table: Any, lines: _Lines, label: str = "") -> None:
        self.source = source
        self.where = where  # the table path used to find lines: "criteria[1]"
        self.label = label or where  # what the message shows: "criteria[1] (id 'x')"
        self.lines = lines
        if not isinstance(table, dict):
            self.fail(f"expected a table, got {_kind(table)}")
        self.table: dict[str, Any] = table

    def fail(self, what: str, key: str | None = None, line_key: str | None = None) -> NoReturn:
        place = self.label + (f".{key}" if key and self.label else key or "")
        table = self.where.split(".")[0]
        inner = self.where.split(".", 1)[1] if "." in self.where else ""
        subkey = ".".join(p for p in (inner, key or line_key) if p)
        line = self.lines.line_of(table, subkey)
        raise RuleFileInvalid(f"{self.source}:{line}: {place or '(top level)'}: {what}", line=line)

    def keys(self, required: set[str], optional: set[str] | None = None) -> None:
        optional = optional or set()
        unknown = sorted(set(self.table) - required - optional)
        if unknown:
            self.fail(f"unknown key {unknown[0]!r}; expected only {sorted(required | optional)}",
                      line_key=unknown[0])
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

    def bool_(self, key: str) -> bool:
        value = self.table[key]
        if not isinstance(value, bool):
            self.fail(f"expected true or false, got {_kind(value)} {value!r}", key)
        return value

    def decimal(self, key: str, *, maximum: Decimal | None = None) -> Decimal:
        """A decimal string (amounts and rates are never floats): "3000000", "0.10"."""
        return _decimal(self, key, self.table[key], maximum=maximum)

    def opt_decimal(self, key: str, *, maximum: Decimal | None = None) -> Decimal | None:
        return self.decimal(key, maximum=maximum) if key in self.table else None

    def text(self, key: str) -> Text:
        sub = self.sub(key, self.table[key])
        sub.keys({"zh", "en"})
        return Text(zh=sub.str_("zh"), en=sub.str_("en"))

    def sub(self, key: str, table: Any, label: str = "") -> _Reader:
        where = f"{self.where}.{key}" if self.where else key
        shown = label or (f"{self.label}.{key}" if self.label else key)
        return _Reader(self.source, where, table, self.lines, shown)

    def array(self, key: str) -> list[Any]:
        value = self.table[key]
        if not isinstance(value, list):
            self.fail(f"expected an array of tables ([[{key}]]), got {_kind(value)}", key)
        return value


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _decimal(reader: _Reader, key: str, value: Any, *, maximum: Decimal | None = None) -> Decimal:
    if not isinstance(value, str):
        reader.fail(f"expected a non-empty string (a decimal such as \"3000000\" or \"0.10\"), got {_kind(value)} "
                    f"{value!r}", key)
    try:
        number = Decimal(value)
    except InvalidOperation:
        reader.fail(f"expected a decimal string such as \"3000000\", got {value!r}", key)
    if not number.is_finite() or number < 0:
        reader.fail(f"expected a finite amount ≥ 0, got {value!r}", key)
    if maximum is not None and number > maximum:
        reader.fail(f"expected at most {maximum}, got {value!r}", key)
    return number


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


def _window(reader: _Reader) -> str:
    value = reader.str_("window")
    if value not in WINDOWS and not ROLLING.match(value):
        reader.fail(f"expected one of {list(WINDOWS)} (N from 1 to 9999), got {value!r}", "window")
    return value


def _condition(reader: _Reader, value: Any, ids: list[str], key: str, depth: int = 0) -> Condition:
    if depth > 8:
        reader.fail("expected conditions nested at most 8 deep", key)
    if isinstance(value, str):
        if value not in ids:
            reader.fail(f"expected criterion ids from [[criteria]], got unknown {value!r}", key)
        return value
    if isinstance(value, list):
        if not value:
            reader.fail("expected a non-empty array of criterion ids, got []", key)
        return ("all", tuple(_condition(reader, v, ids, key, depth + 1) for v in value))
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("all", "any"):
        op, items = next(iter(value.items()))
        if not isinstance(items, list) or not items:
            reader.fail(f"expected {{{op} = [conditions…]}} with a non-empty array, got {items!r}", key)
        return (op, tuple(_condition(reader, v, ids, key, depth + 1) for v in items))
    reader.fail(f"expected a criterion id, an array of them, or {{all = […]}} / {{any = […]}}, got {value!r}", key)


def _criterion(r: _Reader, numbers: list[int], defs: Definitions) -> Criterion:
    r.keys({"measure", "id", "kind", "label", "metric", "operator", "threshold", "unit", "window", "definition"},
           {"aggregation", "params"})
    measure = r.int_("measure", 1)
    if measure not in numbers:
        r.fail(f"expected a measure listed in [[measures]] {numbers}, got {measure}", "measure")
    kind = r.str_("kind", CRITERION_KINDS)
    metric = r.str_("metric", tuple(METRICS))
    spec = METRICS[metric]
    if spec.kind != kind:
        r.fail(f"expected kind {spec.kind!r} for metric {metric!r}, got {kind!r}", "kind")
    aggregation = r.str_("aggregation", spec.aggregations) if "aggregation" in r.table else spec.default
    params: list[tuple[str, int]] = []
    if "params" in r.table:
        p = r.sub("params", r.table["params"])
        p.keys(set(), set(PARAMS))
        params = [(name, p.int_(name, 1)) for name in PARAMS if name in p.table]
    window = _window(r)
    if kind != "measured" and window not in ("calendar_year", "previous_calendar_year"):
        r.fail(f"expected window 'calendar_year' or 'previous_calendar_year' for an official-recorded {kind}, "
               f"got {window!r}", "window")
    return Criterion(
        measure=measure, id=r.str_("id", pattern=_ID), kind=kind, label=r.text("label"), metric=metric,
        operator=r.str_("operator", OPERATORS), threshold=_threshold(r, kind), unit=r.str_("unit"),
        window=window, definition=r.text("definition"), aggregation=aggregation, params=tuple(params),
    )


_AWARD_KEYS = {"exclusive_group", "kind", "amount_yuan", "rate", "per_unit_yuan", "base", "cap_yuan",
               "cap_per_item_yuan", "schedule", "recurring"}
_AWARD_NEEDS: dict[str, set[str]] = {"fixed": {"amount_yuan"}, "percentage": {"rate", "base"},
                                     "per_unit": {"per_unit_yuan", "base"}, "qualification": set()}


def _award(r: _Reader, numbers: list[int], criteria: list[Criterion]) -> Award:
    r.keys({"measure", "id", "label", "requires"}, _AWARD_KEYS)
    measure = r.int_("measure", 1)
    if measure not in numbers:
        r.fail(f"expected a measure listed in [[measures]] {numbers}, got {measure}", "measure")
    kind = r.str_("kind", AWARD_KINDS) if "kind" in r.table else "fixed"
    needs = _AWARD_NEEDS[kind]
    for key in sorted(needs):
        if key not in r.table:
            r.fail(f"missing key {key!r}; an award of kind {kind!r} needs {sorted(needs)}")
    for key in ("amount_yuan", "rate", "per_unit_yuan", "base", "cap_per_item_yuan"):
        if key in r.table and key not in needs and not (key == "cap_per_item_yuan" and kind == "percentage"):
            r.fail(f"unexpected key {key!r} for an award of kind {kind!r}", key)
    ids = [c.id for c in criteria]
    condition = _condition(r, r.table["requires"], ids, "requires")
    if isinstance(condition, str):
        condition = ("all", (condition,))
    base = None
    if "base" in r.table:
        base = r.str_("base")
        crit = next((c for c in criteria if c.id == base), None)
        if crit is None:
            r.fail(f"expected a criterion id from [[criteria]], got unknown {base!r}", "base")
        if crit.kind == "gate":
            r.fail(f"expected a criterion with a number (measured or figure), got gate {base!r}", "base")
    schedule: list[Decimal] = []
    if "schedule" in r.table:
        raw = r.table["schedule"]
        if not isinstance(raw, list) or not raw:
            r.fail(f"expected a non-empty array of decimal strings such as [\"0.6\", \"0.4\"], got {raw!r}",
                   "schedule")
        schedule = [_decimal(r, "schedule", v, maximum=Decimal(1)) for v in raw]
    return Award(
        measure=measure, id=r.str_("id", pattern=_ID), label=r.text("label"),
        amount_yuan=r.opt_decimal("amount_yuan"), requires=tuple(dict.fromkeys(condition_ids(condition))),
        exclusive_group=r.str_("exclusive_group", pattern=_ID) if "exclusive_group" in r.table else None,
        kind=kind, condition=condition, rate=r.opt_decimal("rate", maximum=Decimal(1)),
        per_unit_yuan=r.opt_decimal("per_unit_yuan"), base=base, cap_yuan=r.opt_decimal("cap_yuan"),
        cap_per_item_yuan=r.opt_decimal("cap_per_item_yuan"), schedule=tuple(schedule),
        recurring=r.bool_("recurring") if "recurring" in r.table else True,
    )


def parse_policy(data: bytes, source: str = "<rules>") -> Policy:
    """Parse and validate a rule file's bytes (see the module doc); raise RuleFileInvalid on the first problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RuleFileInvalid(f"{source}: expected UTF-8 text, got undecodable bytes at offset {exc.start}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleFileInvalid(f"{source}: TOML syntax error: {exc}") from None
    lines = _Lines(text)
    top = _Reader(source, "", raw, lines)
    top.keys({"schema", "policy", "definitions", "measures", "criteria", "awards"}, {"limits"})
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
    limits = Limits()
    if "limits" in top.table:
        lim = top.sub("limits", top.table["limits"])
        lim.keys(set(), {"per_year_yuan", "per_enterprise_yuan"})
        limits = Limits(per_year_yuan=lim.opt_decimal("per_year_yuan"),
                        per_enterprise_yuan=lim.opt_decimal("per_enterprise_yuan"))

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
        label = f"criteria[{i}]" + (f" (id {ident!r})" if isinstance(ident, str) else "")
        r = top.sub(f"criteria[{i}]", item, label)
        crit = _criterion(r, numbers, definitions)
        if crit.id in {c.id for c in criteria}:
            r.fail(f"expected each criterion id once, got {crit.id!r} again", "id")
        criteria.append(crit)

    awards: list[Award] = []
    for i, item in enumerate(top.array("awards")):
        ident = item.get("id") if isinstance(item, dict) else None
        label = f"awards[{i}]" + (f" (id {ident!r})" if isinstance(ident, str) else "")
        r = top.sub(f"awards[{i}]", item, label)
        award = _award(r, numbers, criteria)
        if award.id in {a.id for a in awards}:
            r.fail(f"expected each award id once, got {award.id!r} again", "id")
        awards.append(award)

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
        limits=limits,
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


def shipped_policies() -> dict[str, Path]:
    """The rule files shipped in ``verifier/rules/`` by policy file stem ("jiaxing-2021")."""
    return {p.stem: p for p in sorted(RULES_DIR.glob("*.toml"))}


def evaluate_operator(value: Any, operator: str, threshold: Any) -> bool:
    """Compare exactly as the rule file wrote it (``>`` is not ``≥``)."""
    ops: Mapping[str, Any] = {
        ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "≥": lambda a, b: a >= b,
        "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, "≤": lambda a, b: a <= b, "=": lambda a, b: a == b,
    }
    return bool(ops[operator](value, threshold))
