"""Histograms as inline SVG: passed and rejected counts stacked per bin, configured thresholds as vertical lines.

Plain SVG text (no plotting library, nothing fetched) so the report stays one self-contained page.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

WIDTH, HEIGHT = 360, 150
_LEFT, _RIGHT, _TOP, _BOTTOM = 34, 8, 16, 22


@dataclass
class Histogram:
    edges: np.ndarray  # bins + 1 edges
    passed: np.ndarray  # count per bin
    rejected: np.ndarray
    missing: int  # values that were null or NaN


def histogram(
    values: np.ndarray, passed: np.ndarray | None = None, bins: int = 30, include: tuple[float, ...] = ()
) -> Histogram:
    """Counts of finite `values` in `bins` equal bins spanning them (and the `include` points, e.g. thresholds)."""
    values = np.asarray(values, dtype=float)
    passed = np.ones(len(values), bool) if passed is None else np.asarray(passed, bool)
    finite = np.isfinite(values)
    seen = values[finite]
    points = [float(v) for v in (*((seen.min(), seen.max()) if seen.size else ()), *include) if np.isfinite(v)]
    lo, hi = (min(points), max(points)) if points else (0.0, 1.0)
    if hi <= lo:  # one distinct value: a narrow axis around it
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, bins + 1)
    counts_passed, _ = np.histogram(values[finite & passed], edges)
    counts_rejected, _ = np.histogram(values[finite & ~passed], edges)
    return Histogram(edges, counts_passed, counts_rejected, int((~finite).sum()))


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def render_svg(hist: Histogram, title: str, thresholds: dict[str, float | None] | None = None) -> str:
    """The histogram as an `<svg>` element; `thresholds` maps a label ("min", "max") to a value or None."""
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    lo, hi = float(hist.edges[0]), float(hist.edges[-1])
    total = hist.passed + hist.rejected
    top = max(int(total.max()) if len(total) else 0, 1)

    def x_of(value: float) -> float:
        return _LEFT + (value - lo) / (hi - lo) * plot_w

    bar_w = plot_w / len(total)
    parts = [
        f'<svg class="hist" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'data-name="{html.escape(title)}">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{_LEFT}" y="11" class="t">{html.escape(title)}</text>',
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{WIDTH - _RIGHT}" y2="{_TOP + plot_h}" class="axis"/>',
        f'<text x="{_LEFT - 3}" y="{_TOP + 8}" class="yl">{top}</text>',
        f'<text x="{_LEFT - 3}" y="{_TOP + plot_h}" class="yl">0</text>',
        f'<text x="{_LEFT}" y="{HEIGHT - 6}" class="xl">{_fmt(lo)}</text>',
        f'<text x="{WIDTH - _RIGHT}" y="{HEIGHT - 6}" class="xl end">{_fmt(hi)}</text>',
    ]
    for i, (p, r) in enumerate(zip(hist.passed.tolist(), hist.rejected.tolist(), strict=True)):
        x = _LEFT + i * bar_w
        label = f"{_fmt(hist.edges[i])} to {_fmt(hist.edges[i + 1])}: {p} passed, {r} rejected"
        y = _TOP + plot_h
        for count, cls in ((p, "pass"), (r, "rej")):
            if count:
                h = count / top * plot_h
                y -= h
                parts.append(
                    f'<rect x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}" '
                    f'class="{cls}"><title>{label}</title></rect>'
                )
    for label, value in (thresholds or {}).items():
        if value is None or not lo <= value <= hi:
            continue
        x = x_of(value)
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP - 2}" x2="{x:.1f}" y2="{_TOP + plot_h}" class="thr" data-threshold="{label}">'
            f"<title>threshold {label} = {_fmt(value)}</title></line>"
        )
        right_half = x > _LEFT + plot_w / 2  # label on the side with room
        parts.append(
            f'<text x="{x - 2 if right_half else x + 2:.1f}" y="{_TOP + 8}" class="thl{" end" if right_half else ""}">'
            f"{label} {_fmt(value)}</text>"
        )
    if hist.missing:
        parts.append(f'<text x="{WIDTH - _RIGHT}" y="11" class="xl end">{hist.missing} without a value</text>')
    parts.append("</svg>")
    return "".join(parts)
