"""Figures for the report: matplotlib drawn to SVG and inlined in `report.html`.

Why matplotlib: every chart needs real axes, ticks, units and error bars, and a plotting library
draws them right (the hand-placed rectangles this replaced had no axes). Why inline SVG: the report
is one self-contained file that opens offline, and its text stays text (`svg.fonttype: none`), so
tick labels are selectable, searchable and testable.

Why it is written this way:
- Deterministic byte for byte: the SVG's hash salt is fixed per figure (from its caption) and the
  date metadata is dropped, so building the report twice gives the same file.
- Only the object-oriented `Figure` API is used, never pyplot: no global figure registry to leak
  or close, and no backend switch for a caller that has its own.
- Every figure's element ids get a per-figure prefix, so the several SVGs inline in one page have
  unique ids (valid HTML; clip paths and markers cannot resolve to another figure's).
- The caption is written once, in the `<figcaption>` (the SVG points at it with
  `aria-labelledby`); charts carry axis labels and panel titles, never the caption again.
"""

from __future__ import annotations

import hashlib
import html
import io
import math
import re
from typing import Callable, Sequence

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

BASELINE, POLICY = "#e45756", "#4c78a8"  # the same two colours in every chart
COLOURS = [POLICY, "#f58518", "#54a24b", BASELINE, "#72b7b2", "#b279a2"]
WIDTH = 9.0  # inches; the page scales the SVG to its column (about 1000 px)
STYLE = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial"],
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.titlelocation": "left",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "legend.fontsize": 9,
}
METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


def chart(caption: str, draw: Callable[[Figure, list[Axes]], None], *, nrows: int = 1, ncols: int = 1,
          height: float = 2.8, width: float = WIDTH, sharex: bool = False, note: str = "",
          layout: str | None = "constrained") -> str:
    """`draw(fig, axes)` fills the axes; the result is a `<figure>` with the inline SVG and the
    caption (and `note`, a sentence on how to read it) below it. `layout=None`: `draw` places the
    axes itself (constrained layout is half the drawing time of a tall stack of panels)."""
    key = hashlib.sha256(caption.encode()).hexdigest()[:8]
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": f"cai-report-{key}"}):
        fig = Figure(figsize=(width, height), layout=layout)
        axes = list(fig.subplots(nrows, ncols, squeeze=False, sharex=sharex).flat)
        draw(fig, axes)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata=METADATA)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    prefix = f"f{key}-"
    svg = re.sub(r'(\s)id="', rf'\1id="{prefix}', svg)
    svg = svg.replace('xlink:href="#', f'xlink:href="#{prefix}').replace("url(#", f"url(#{prefix}")
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"',
                 rf'<svg\1 class="chart" role="img" aria-labelledby="{prefix}caption"', svg, count=1)
    below = f" <span class=\"note\">{html.escape(note)}</span>" if note else ""
    return f'<figure>{svg}<figcaption id="{prefix}caption">{html.escape(caption)}{below}</figcaption></figure>'


def interval_errors(values: Sequence[float], intervals: Sequence) -> list[list[float]]:
    """matplotlib's asymmetric error bars (below, above) from (low, high) intervals; none -> 0."""
    below = [v - ci[0] if ci else 0.0 for v, ci in zip(values, intervals)]
    above = [ci[1] - v if ci else 0.0 for v, ci in zip(values, intervals)]
    return [[max(0.0, b) for b in below], [max(0.0, a) for a in above]]


def panels(caption: str, x_labels: Sequence, rows: Sequence[dict], *, note: str = "", x_title: str = "") -> str:
    """Small multiples sharing one x axis, one panel per row: {"title", "unit", "values" (None
    or not finite where missing), "intervals" (per point (low, high) or None), "reference" (a dashed line, e.g.
    0 or 0.5)}. Numeric x labels (steps) get a numeric axis; text ones (checkpoints) one tick each."""
    rows = [{**r, "values": [v if v is not None and math.isfinite(v) else None for v in r["values"]]} for r in rows]
    rows = [r for r in rows if any(v is not None for v in r["values"])]
    if not rows or not x_labels:
        return ""
    numeric = all(isinstance(x, (int, float)) for x in x_labels)
    xs = list(x_labels) if numeric else list(range(len(x_labels)))
    # Fixed margins in inches: room for the y ticks and unit on the left, each panel's title above
    # it, the x ticks and their title below the last.
    panel, gap, top, below, left, right = 1.2, 0.38, 0.3, 0.62, 0.95, 0.2
    height = top + len(rows) * panel + (len(rows) - 1) * gap + below

    def draw(fig: Figure, axes: list[Axes]) -> None:
        fig.subplots_adjust(left=left / WIDTH, right=1 - right / WIDTH, top=1 - top / height, bottom=below / height,
                            hspace=gap / panel)
        for index, (ax, row) in enumerate(zip(axes, rows)):
            colour = COLOURS[index % len(COLOURS)]
            points = [(x, v, ci) for x, v, ci in zip(xs, row["values"], row.get("intervals") or [None] * len(xs)) if v is not None]
            px, pv, pci = zip(*points)
            if any(pci):
                ax.errorbar(px, pv, yerr=interval_errors(pv, pci), fmt="none", ecolor=colour, elinewidth=1.2, capsize=3)
            ax.plot(px, pv, color=colour, marker="o" if len(points) <= 40 else None, markersize=4, linewidth=1.6)
            if row.get("reference") is not None:
                ax.axhline(row["reference"], color="#777", linestyle="--", linewidth=0.9)
            if len(points) <= 6:  # a short series gets its values written beside the points
                for x, v, _ in points:
                    ax.annotate(f"{v:.3g}", (x, v), textcoords="offset points", xytext=(5, 4), fontsize=8)
            ax.set_title(row["title"])
            ax.set_ylabel(row["unit"])
            ax.yaxis.set_major_locator(MaxNLocator(4))
        bottom = axes[len(rows) - 1]
        if numeric:
            bottom.xaxis.set_major_locator(MaxNLocator(10, integer=True))
        else:
            bottom.set_xticks(xs, [str(x) for x in x_labels])
            bottom.set_xlim(-0.3, len(xs) - 0.7)
        if x_title:
            bottom.set_xlabel(x_title)

    return chart(caption, draw, nrows=len(rows), sharex=True, height=height, note=note, layout=None)
