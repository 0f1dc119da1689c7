"""Plots the whole-model GPU decode benchmark: for each batch size (one chart
each, stacked), decode tokens/s against context for our dense decode, our
sparse (tls) decode at each budget, HF transformers eager and compiled, and
the bytes floor of our dense step (batch / floor_ms). Standard library only;
writes one SVG.

    python3 scripts/plot_e2e.py combined.json out.svg

The input is what `bench/peers/hf_e2e.py --ours ours.json --out combined.json`
writes on the GPU machine (ours.json being `asynctls bench e2e --device cuda
--json`). Points where HF ran out of memory are marked "oom" at the bottom
of the chart, in that system's colour.
"""

import argparse
import json
import math
from xml.sax.saxutils import escape

W, H = 640, 270  # one chart
PAD_L, PAD_B, PAD_T, PAD_R = 64, 36, 30, 16
TOP = 46  # the title over all charts
LEGEND_ROW = 18
FIXED = {"ours dense": "#1f77b4", "hf-eager": "#222222", "hf-compiled": "#9467bd", "bytes floor": "#999999"}
PALETTE = ["#2ca02c", "#ff7f0e", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def policy(r):
    return r.get("policy", r.get("kind"))


def tokens_per_s(r, batch):
    tps = r.get("decode_tokens_per_s")
    if tps is None:
        ms = r.get("decode_ms_per_step", r.get("decode_ms_per_token"))
        tps = batch * 1e3 / ms if ms else None
    return tps


def ours_label(r):
    p = policy(r)
    if p == "dense":
        return "ours dense"
    if r.get("budget") is not None:
        return f"ours {p} k={r['budget']}"
    return f"ours {p}"


def series(doc, batch):
    """{name: [(ctx, tokens/s)]} and {name: [ctx where it ran out of memory]}."""
    out, ooms = {}, {}
    ours = doc.get("ours")
    mine = ours.get("rows", []) if isinstance(ours, dict) else (ours if isinstance(ours, list) else [])
    for r in mine:
        if not isinstance(r, dict) or r.get("batch", 1) != batch or "ctx" not in r:
            continue
        name = ours_label(r)
        if r.get("oom"):
            ooms.setdefault(name, []).append(r["ctx"])
            continue
        tps = tokens_per_s(r, batch)
        if tps:
            out.setdefault(name, []).append((r["ctx"], tps))
        if policy(r) == "dense" and r.get("floor_ms"):
            out.setdefault("bytes floor", []).append((r["ctx"], batch * 1e3 / r["floor_ms"]))
    for r in doc.get("rows", []):
        if r.get("batch") != batch:
            continue
        if r.get("oom"):
            ooms.setdefault(r["system"], []).append(r["ctx"])
        elif r.get("decode_tokens_per_s"):
            out.setdefault(r["system"], []).append((r["ctx"], r["decode_tokens_per_s"]))
    return {k: sorted(v) for k, v in out.items()}, ooms


def order(name):
    """Legend and drawing order: floor, ours dense, ours sparse by budget, HF."""
    if name == "bytes floor":
        return (0, 0, name)
    if name == "ours dense":
        return (1, 0, name)
    if name.startswith("ours "):
        tail = name.rsplit("k=", 1)
        return (2, int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 1 << 30, name)
    return (3, 0, name)


def colors_for(names):
    colors, i = {}, 0
    for n in sorted(names, key=order):
        if n in FIXED:
            colors[n] = FIXED[n]
        else:
            colors[n] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def ctx_label(x):
    return f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)


def panel(x0, y0, title, data, ooms, colors):
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    parts = [f'<text x="{x0 + W / 2}" y="{y0 + 18}" text-anchor="middle" font-size="13">{escape(title)}</text>',
             f'<rect x="{x0 + PAD_L}" y="{y0 + PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>']
    xs = sorted({x for s in data.values() for x, _ in s} | {x for s in ooms.values() for x in s})
    ys = [y for s in data.values() for _, y in s if y > 0]
    if not xs:
        parts.append(f'<text x="{x0 + W / 2}" y="{y0 + H / 2}" text-anchor="middle" font-size="12" '
                     f'fill="#888">no data</text>')
        return parts
    xmin, xmax = xs[0], xs[-1]
    if xmin == xmax:
        xmin, xmax = xmin * 0.5, xmax * 1.5
    if ys:
        ymin, ymax = math.log10(min(ys)), math.log10(max(ys))
    else:
        ymin, ymax = 0.0, 1.0
    span = max(ymax - ymin, 0.3)
    ymin, ymax = ymin - 0.08 * span, ymax + 0.08 * span

    def px(x):
        return x0 + PAD_L + 12 + (x - xmin) / (xmax - xmin) * (pw - 24)

    def py(y):
        return y0 + PAD_T + (ymax - math.log10(y)) / (ymax - ymin) * ph

    decade = 10 ** math.floor(ymin)
    while decade <= 10 ** ymax:
        for m in (1, 2, 5):
            v = decade * m
            if ymin <= math.log10(v) <= ymax:
                parts.append(f'<line x1="{x0 + PAD_L}" x2="{x0 + PAD_L + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                             f'stroke="#eee"/>')
                parts.append(f'<text x="{x0 + PAD_L - 5}" y="{py(v) + 4:.1f}" text-anchor="end" '
                             f'font-size="10">{v:g}</text>')
        decade *= 10
    for x in xs:
        parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{y0 + PAD_T}" y2="{y0 + PAD_T + ph}" '
                     f'stroke="#f3f3f3"/>')
        parts.append(f'<text x="{px(x):.1f}" y="{y0 + H - PAD_B + 14}" text-anchor="middle" '
                     f'font-size="10">{ctx_label(x)}</text>')
    parts.append(f'<text x="{x0 + PAD_L + pw}" y="{y0 + H - 6}" text-anchor="end" font-size="9" '
                 f'fill="#555">context (tokens)</text>')
    parts.append(f'<text x="{x0 + 14}" y="{y0 + PAD_T + ph / 2}" text-anchor="middle" font-size="9" fill="#555" '
                 f'transform="rotate(-90 {x0 + 14} {y0 + PAD_T + ph / 2})">decode tokens/s</text>')
    for name in sorted(data, key=order):
        pts = data[name]
        color = colors[name]
        dash = ' stroke-dasharray="5 3"' if name == "bytes floor" else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"{dash}>'
                     f'<title>{escape(name)}</title></polyline>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{color}">'
                         f'<title>{escape(name)}: {ctx_label(x)} {y:.1f} tok/s</title></circle>')
    row = 0
    for name in sorted(ooms, key=order):
        for x in ooms[name]:
            yy = y0 + PAD_T + ph - 6 - 11 * row
            xx = px(x)
            anchor = "end" if xx > x0 + PAD_L + pw - 45 else ("start" if xx < x0 + PAD_L + 45 else "middle")
            xx = xx + 4 if anchor == "start" else (xx - 4 if anchor == "end" else xx)
            parts.append(f'<text x="{xx:.1f}" y="{yy:.1f}" text-anchor="{anchor}" font-size="9" '
                         f'fill="{colors[name]}">{escape(name)} oom</text>')
        row += 1
    return parts


def main():
    ap = argparse.ArgumentParser(description="plot the e2e decode benchmark as an SVG")
    ap.add_argument("input", help="the JSON written by bench/peers/hf_e2e.py --out")
    ap.add_argument("output", help="the SVG to write")
    a = ap.parse_args()
    doc = json.load(open(a.input))
    ours = doc.get("ours")
    mine = ours.get("rows", []) if isinstance(ours, dict) else (ours if isinstance(ours, list) else [])
    batches = sorted({r["batch"] for r in doc.get("rows", []) if "batch" in r}
                     | {r.get("batch", 1) for r in mine if isinstance(r, dict)})
    panels = [(b, *series(doc, b)) for b in batches]
    names = {n for _, d, o in panels for n in list(d) + list(o)}
    colors = colors_for(names)
    legend = sorted(names, key=order)
    per_row = 3
    legend_h = LEGEND_ROW * max(1, math.ceil(len(legend) / per_row)) + 10
    width, height = W, TOP + H * max(1, len(panels)) + legend_h
    shape = doc.get("model_shape", "?")
    sub = ", ".join(str(x) for x in (f"transformers {doc.get('transformers')}" if doc.get("transformers") else None,
                                     f"torch {doc.get('torch')}" if doc.get("torch") else None,
                                     doc.get("device")) if x)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">'
             f'{escape(shape)}: decode throughput against context</text>',
             f'<text x="{width / 2}" y="35" text-anchor="middle" font-size="10" fill="#555">'
             f'HF peer: {escape(sub or "versions not recorded")}</text>']
    for i, (b, data, ooms) in enumerate(panels):
        parts += panel(0, TOP + i * H, f"batch {b} (decode tokens/s, log scale)", data, ooms, colors)
    y_leg = TOP + H * max(1, len(panels)) + 6
    col_w = (width - 20) / per_row
    for i, name in enumerate(legend):
        x, y = 10 + (i % per_row) * col_w, y_leg + (i // per_row) * LEGEND_ROW + 12
        dash = ' stroke-dasharray="5 3"' if name == "bytes floor" else ""
        parts.append(f'<line x1="{x:.1f}" x2="{x + 20:.1f}" y1="{y - 4}" y2="{y - 4}" stroke="{colors[name]}" '
                     f'stroke-width="2"{dash}/>')
        label = "bytes floor (ours dense)" if name == "bytes floor" else name
        parts.append(f'<text x="{x + 25:.1f}" y="{y}" font-size="11">{escape(label)}</text>')
    parts.append("</svg>")
    with open(a.output, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
