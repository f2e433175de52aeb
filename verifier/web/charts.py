"""Server-side SVG line charts (no JavaScript, no CDN): one value per day, with the policy's threshold lines."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from markupsafe import Markup

WIDTH = 720
HEIGHT = 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 14, 28


@dataclass(frozen=True, slots=True)
class Threshold:
    value: float
    label: str


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return float(step * magnitude)
    return float(10 * magnitude)


def line_chart(*, chart_id: str, title: str, first: date, values: Sequence[int], thresholds: Sequence[Threshold],
               number: Callable[[float], str], day_label: Callable[[date], str]) -> Markup:
    """An accessible inline SVG: ``values[i]`` is the figure on ``first + i`` days; thresholds are dashed lines."""
    top_value = _nice_max(max([*values, *(t.value for t in thresholds), 1]) * 1.05)
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    n = max(len(values), 2)

    def x(i: int) -> float:
        return _LEFT + plot_w * i / (n - 1)

    def y(v: float) -> float:
        return _TOP + plot_h * (1 - v / top_value)

    esc = html.escape
    parts = [f'<svg class="chart" id="{esc(chart_id)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-labelledby="{esc(chart_id)}-title" xmlns="http://www.w3.org/2000/svg">',
             f'<title id="{esc(chart_id)}-title">{esc(title)}</title>',
             f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" class="plot"/>']
    for k in range(5):
        v = top_value * k / 4
        parts.append(f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
                     f'<text x="{_LEFT - 6}" y="{y(v) + 4:.1f}" class="axis" text-anchor="end">{esc(number(v))}</text>')
    ticks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
    for i in ticks:
        parts.append(f'<text x="{x(i):.1f}" y="{HEIGHT - 8}" class="axis" text-anchor="middle">'
                     f'{esc(day_label(first + timedelta(days=i)))}</text>')
    for t in thresholds:
        parts.append(f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(t.value):.1f}" y2="{y(t.value):.1f}" '
                     f'class="threshold"/><text x="{WIDTH - _RIGHT - 4}" y="{y(t.value) - 4:.1f}" '
                     f'class="threshold-label" text-anchor="end">{esc(t.label)}</text>')
    if values:
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline points="{points}" class="series"/>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every outside string above is escaped)
