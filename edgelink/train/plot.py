"""A hand-written SVG of an evaluation (no plotting library): one row per condition, accuracy as
a horizontal bar with its 95% CI whisker on the left, median latency (log scale, p90 whisker)
on the right. Input rows are dicts with ``name``, ``role``, ``acc``, ``ci`` and optionally
``latency_median_ms`` / ``latency_p90_ms`` (``edgelink.train.evaluate.ConditionResult`` as a dict)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

COLORS = {"bridge": "#1f77b4", "control": "#b0b0b0", "baseline": "#ff7f0e", "reference": "#6a9f58"}
ROW_H, LABEL_W, ACC_W, GAP, LAT_W, TOP, BOTTOM = 22, 210, 360, 40, 260, 48, 40


def _fmt_ms(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"


def render_svg(rows: Sequence[dict[str, Any]], title: str = "", chance: float | None = None) -> str:
    """The SVG document as a string."""
    n = len(rows)
    height = TOP + n * ROW_H + BOTTOM
    width = LABEL_W + ACC_W + GAP + LAT_W + 110  # room for p90 whiskers and labels
    x0, lx0 = LABEL_W, LABEL_W + ACC_W + GAP
    lats = [r[k] for r in rows for k in ("latency_median_ms", "latency_p90_ms")
            if r.get(k) is not None and r[k] > 0]
    lo_dec = math.floor(math.log10(min(lats))) if lats else 0
    hi_dec = math.ceil(math.log10(max(lats))) if lats else 1
    hi_dec = max(hi_dec, lo_dec + 1)

    def ax(acc: float) -> float:
        return x0 + max(0.0, min(1.0, acc)) * ACC_W

    def lx(ms: float) -> float:
        return lx0 + (math.log10(ms) - lo_dec) / (hi_dec - lo_dec) * LAT_W

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14" '
                   f'font-weight="bold">{escape(title)}</text>')
    out.append(f'<text x="{x0 + ACC_W / 2}" y="38" text-anchor="middle">accuracy (95% CI)</text>')
    out.append(f'<text x="{lx0 + LAT_W / 2}" y="38" text-anchor="middle">'
               f'latency per message, median (p90), log scale</text>')
    y_end = TOP + n * ROW_H
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):  # accuracy grid
        out.append(f'<line x1="{ax(t):.1f}" y1="{TOP}" x2="{ax(t):.1f}" y2="{y_end}" '
                   f'stroke="#e4e4e4"/>')
        out.append(f'<text x="{ax(t):.1f}" y="{y_end + 16}" text-anchor="middle">{t:g}</text>')
    if chance is not None:
        out.append(f'<line x1="{ax(chance):.1f}" y1="{TOP}" x2="{ax(chance):.1f}" y2="{y_end}" '
                   f'stroke="#888" stroke-dasharray="4 3"/>')
    for dec in range(lo_dec, hi_dec + 1):  # latency grid
        x = lx(10.0 ** dec)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{y_end}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x:.1f}" y="{y_end + 16}" text-anchor="middle">'
                   f'{escape(_fmt_ms(10.0 ** dec))}</text>')
    for i, r in enumerate(rows):
        y = TOP + i * ROW_H
        yc = y + ROW_H / 2
        color = COLORS.get(str(r.get("role")), "#777")
        acc = float(r["acc"])
        lo, hi = (float(v) for v in r["ci"])
        out.append(f'<text x="{x0 - 6}" y="{yc + 4:.1f}" text-anchor="end">'
                   f'{escape(str(r["name"]))}</text>')
        out.append(f'<rect x="{x0}" y="{y + 4}" width="{ax(acc) - x0:.1f}" height="{ROW_H - 8}" '
                   f'fill="{color}"><title>{escape(str(r["name"]))}: {acc:.3f} '
                   f'[{lo:.3f}, {hi:.3f}]</title></rect>')
        out.append(f'<line x1="{ax(lo):.1f}" y1="{yc:.1f}" x2="{ax(hi):.1f}" y2="{yc:.1f}" '
                   f'stroke="black"/>')
        for xv in (ax(lo), ax(hi)):
            out.append(f'<line x1="{xv:.1f}" y1="{y + 6}" x2="{xv:.1f}" y2="{y + ROW_H - 6}" '
                       f'stroke="black"/>')
        out.append(f'<text x="{ax(hi) + 4:.1f}" y="{yc + 4:.1f}" font-size="10">{acc:.3f}</text>')
        med, p90 = r.get("latency_median_ms"), r.get("latency_p90_ms")
        if med is not None and med > 0:
            out.append(f'<rect x="{lx0}" y="{y + 4}" width="{max(lx(med) - lx0, 1):.1f}" '
                       f'height="{ROW_H - 8}" fill="{color}" fill-opacity="0.7"/>')
            if p90 is not None and p90 > med:
                out.append(f'<line x1="{lx(med):.1f}" y1="{yc:.1f}" x2="{lx(p90):.1f}" '
                           f'y2="{yc:.1f}" stroke="black"/>')
            out.append(f'<text x="{max(lx(med), lx(p90 or med)) + 4:.1f}" y="{yc + 4:.1f}" '
                       f'font-size="10">{med:.0f} ms</text>')
        else:
            out.append(f'<text x="{lx0 + 4}" y="{yc + 4:.1f}" font-size="10" fill="#888">'
                       f'n/a</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_svg(path: str | Path, rows: Sequence[dict[str, Any]], title: str = "",
              chance: float | None = None) -> Path:
    p = Path(path)
    p.write_text(render_svg(rows, title, chance), encoding="utf-8")
    return p
