"""The console's charts as plain SVG, drawn on the server (issue 25 item 4).

No charting library and no script: a chart is a handful of rectangles and a polyline, so the
page reads without JavaScript, nothing comes from a CDN, and the Content-Security-Policy
(`style-src 'self'`) holds: colours are presentation attributes, never inline styles. Each
chart is `role="img"` with a <title> and a <desc> that say in words what it shows (screen
readers), and each bar has its own <title> (a tooltip: the day and the figure). The figures
are integers (uses, minor units); only the drawing scales them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 200
LEFT, BOTTOM, TOP = 60, 24, 12
# Colour-blind safe (Okabe-Ito), and distinguishable in grey by their lightness.
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7")


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    values: Sequence[int]


def _label(value: int, money: str | None) -> str:
    if money is None:
        return f"{value:,}"
    sign = "-" if value < 0 else ""
    return f"{sign}{abs(value) // 100:,}.{abs(value) % 100:02d} {money}"


def _short(value: int, money: str | None) -> str:
    """An axis label that fits left of the axis (the bars' own titles carry exact figures)."""
    units = value / 100 if money else value
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(units) >= size:
            return f"{units / size:.1f}{suffix}"
    return f"{units:,.2f}" if money and units != int(units) else f"{units:,.0f}"


def _frame(chart_id: str, title: str, desc: str, body: list[str], legend: list[str]) -> Markup:
    return Markup(  # noqa: S704 (every piece of text in it is escaped above)
        f'<figure class="chart"><svg id="{escape(chart_id)}" role="img" '
        f'aria-labelledby="{escape(chart_id)}-title {escape(chart_id)}-desc" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" preserveAspectRatio="xMidYMid meet" '
        'xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>'
        f'<desc id="{escape(chart_id)}-desc">{escape(desc)}</desc>'
        + "".join(body)
        + "</svg>"
        + f"<figcaption><strong>{escape(title)}</strong> {''.join(legend)}</figcaption>"
        + "</figure>"
    )


def _axis(top: int, bottom: int, money: str | None) -> list[str]:
    """The zero line, and the scale's top and bottom as labels on the left."""
    zero_y = _y(0, top, bottom)
    parts = [
        f'<line x1="{LEFT}" y1="{zero_y:.1f}" x2="{WIDTH}" y2="{zero_y:.1f}" stroke="#888"/>',
        f'<text x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end" font-size="11" '
        f'fill="currentColor">{escape(_short(top, money))}</text>',
    ]
    if bottom < 0:
        parts.append(
            f'<text x="{LEFT - 4}" y="{HEIGHT - BOTTOM}" text-anchor="end" font-size="11" '
            f'fill="currentColor">{escape(_short(bottom, money))}</text>'
        )
    return parts


def _y(value: int, top: int, bottom: int) -> float:
    span = (top - bottom) or 1
    return TOP + (top - value) * (HEIGHT - BOTTOM - TOP) / span


def _legend(series: Sequence[Series]) -> list[str]:
    return [
        f'<span class="key"><svg width="10" height="10" aria-hidden="true"><rect width="10" '
        f'height="10" fill="{COLOURS[n % len(COLOURS)]}"/></svg> {escape(s.name)}</span> '
        for n, s in enumerate(series)
    ]


def _dates(labels: Sequence[str]) -> list[str]:
    """The first and last period under the axis."""
    if not labels:
        return []
    y = HEIGHT - 6
    return [
        f'<text x="{LEFT}" y="{y}" font-size="11" fill="currentColor">{escape(labels[0])}</text>',
        f'<text x="{WIDTH}" y="{y}" text-anchor="end" font-size="11" '
        f'fill="currentColor">{escape(labels[-1])}</text>',
    ]


def bars(
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    stacked: bool = True,
    money: str | None = None,
) -> Markup:
    """One bar (stacked) or one group of bars per label; negative values go below zero."""
    count = max(len(labels), 1)
    per_label = [[s.values[i] for s in series] for i in range(len(labels))]
    if stacked:
        top = max([sum(v for v in vals if v > 0) for vals in per_label] + [1])
        bottom = min([sum(v for v in vals if v < 0) for vals in per_label] + [0])
    else:
        top = max([v for vals in per_label for v in vals] + [1])
        bottom = min([v for vals in per_label for v in vals] + [0])
    slot = (WIDTH - LEFT) / count
    body = _axis(top, bottom, money)
    for i, label in enumerate(labels):
        up, down = 0, 0
        for n, s in enumerate(series):
            value = s.values[i]
            if not value:
                continue
            if stacked:
                base = up if value > 0 else down
                x, width = LEFT + i * slot + slot * 0.1, slot * 0.8
            else:
                base = 0
                width = slot * 0.8 / len(series)
                x = LEFT + i * slot + slot * 0.1 + n * width
            y1, y2 = _y(base + value, top, bottom), _y(base, top, bottom)
            if stacked and value > 0:
                up += value
            elif stacked:
                down += value
            body.append(
                f'<rect x="{x:.1f}" y="{min(y1, y2):.1f}" width="{max(width, 0.5):.1f}" '
                f'height="{max(abs(y2 - y1), 0.5):.1f}" fill="{COLOURS[n % len(COLOURS)]}">'
                f"<title>{escape(label)}: {escape(s.name)} {escape(_label(value, money))}"
                "</title></rect>"
            )
    body += _dates(labels)
    totals = ", ".join(f"{s.name} {_label(sum(s.values), money)}" for s in series)
    desc = f"{title}, {labels[0]} to {labels[-1]}: in total {totals}." if labels else title
    return _frame(chart_id, title, desc, body, _legend(series))


def line(
    chart_id: str, title: str, labels: Sequence[str], values: Sequence[int], money: str | None
) -> Markup:
    """A balance over time (one point per label)."""
    top, bottom = max([*values, 1]), min([*values, 0])
    count = max(len(values) - 1, 1)
    points = " ".join(
        f"{LEFT + i * (WIDTH - LEFT) / count:.1f},{_y(v, top, bottom):.1f}"
        for i, v in enumerate(values)
    )
    body = _axis(top, bottom, money)
    body.append(f'<polyline points="{points}" fill="none" stroke="{COLOURS[0]}" stroke-width="2"/>')
    body += _dates(labels)
    desc = (
        f"{title} from {_label(values[0], money)} on {labels[0]} "
        f"to {_label(values[-1], money)} on {labels[-1]}."
        if values
        else title
    )
    return _frame(chart_id, title, desc, body, [])
