"""Plots `asynctls eval` results: one chart per (task, context), score
against budget, one line per sparse policy (and k_b for tls), dense as a
dashed line. Rows of the depth grid (`--depths`) and rows with calibrated
label channels are left out; a cell run
more than once is shown by its row with the most samples. Standard
library only; writes one SVG.

    python3 scripts/plot_eval.py docs/eval/smollm2-135m-2k.jsonl [more.jsonl ...] out.svg
"""

import json
import math
import sys
from xml.sax.saxutils import escape

W, H = 420, 230  # one chart
PAD_L, PAD_B, PAD_T, PAD_R = 48, 36, 28, 130
COLS = 2
PALETTE = ["#2ca02c", "#ff7f0e", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#1f77b4"]


def series_name(r):
    if r["policy"] == "tls":
        return f"tls (k_b {r['block_topk']})"
    return r["policy"]


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    # Rows with calibrated label channels are a comparison of their own.
    return [r for r in rows if r.get("depth") is None and r.get("label_channels", "default") == "default"]


def chart(x0, y0, title, dense, series, colors):
    out = [f'<g transform="translate({x0},{y0})">']
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    budgets = sorted({b for pts in series.values() for b, _ in pts})
    if not budgets:
        return ""
    lo, hi = math.log2(min(budgets)), math.log2(max(budgets))
    span = max(hi - lo, 1.0)

    def px(b):
        return PAD_L + (math.log2(b) - lo) / span * pw if hi > lo else PAD_L + pw / 2

    def py(score):
        return PAD_T + ph - score / 100.0 * ph

    out.append(f'<text x="{PAD_L}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>')
    out.append(f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>')
    for s in (0, 25, 50, 75, 100):
        out.append(f'<text x="{PAD_L - 6}" y="{py(s) + 4:.1f}" font-size="10" text-anchor="end">{s}</text>')
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{py(s):.1f}" y2="{py(s):.1f}" stroke="#eee"/>')
    for b in budgets:
        out.append(f'<text x="{px(b):.1f}" y="{PAD_T + ph + 14}" font-size="10" text-anchor="middle">{b}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{H - 4}" font-size="10" text-anchor="middle">budget (tokens)</text>')
    legend_y = PAD_T + 8
    if dense is not None:
        out.append(
            f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{py(dense):.1f}" y2="{py(dense):.1f}" '
            'stroke="#222" stroke-dasharray="5,4"/>'
        )
        out.append(f'<text x="{PAD_L + pw + 8}" y="{legend_y}" font-size="11">dense {dense:.0f}</text>')
        legend_y += 16
    for name, pts in sorted(series.items()):
        pts = sorted(pts)
        c = colors[name]
        path = " ".join(f"{'M' if i == 0 else 'L'}{px(b):.1f},{py(s):.1f}" for i, (b, s) in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for b, s in pts:
            out.append(f'<circle cx="{px(b):.1f}" cy="{py(s):.1f}" r="3" fill="{c}"/>')
        out.append(f'<text x="{PAD_L + pw + 8}" y="{legend_y}" font-size="11" fill="{c}">{escape(name)}</text>')
        legend_y += 16
    out.append("</g>")
    return "\n".join(out)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rows = load(sys.argv[1:-1])
    # Where a cell was run more than once (different sample counts), the
    # row with the most samples stands.
    best = {}
    for r in rows:
        cell = (r["task"], r["ctx"], series_name(r), r.get("budget"))
        if cell not in best or r["samples"] > best[cell]["samples"]:
            best[cell] = r
    panels = {}
    for (task, ctx, name, budget), r in best.items():
        panel = panels.setdefault((task, ctx), {"dense": None, "series": {}})
        if r["policy"] == "dense":
            panel["dense"] = r["score"]
        elif budget:
            panel["series"].setdefault(name, []).append((budget, r["score"]))
    names = sorted({n for p in panels.values() for n in p["series"]})
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    keys = sorted(panels)
    rows_n = math.ceil(len(keys) / COLS)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * COLS}" height="{H * rows_n}" '
        'font-family="sans-serif">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    for i, (task, ctx) in enumerate(keys):
        p = panels[(task, ctx)]
        parts.append(chart((i % COLS) * W, (i // COLS) * H, f"{task}, {ctx} tokens", p["dense"], p["series"], colors))
    parts.append("</svg>")
    with open(sys.argv[-1], "w") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()
