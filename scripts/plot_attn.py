"""Plots the GPU attention benchmark: for each attention kind (GQA, MLA) and
batch size, step time against context for torch SDPA (the peer), our dense
decode, our sparse decode (two-level, every stage) at each budget, and the
HBM floor of the dense step. Standard library only; writes one SVG.

    python3 scripts/plot_attn.py docs/bench/gpu-attn/gqa_vs_sdpa.json \
        docs/bench/gpu-attn/mla_vs_sdpa.json -o docs/bench/gpu-attn/attn.svg

The inputs are what `bench/peers/torch_sdpa.py --ours ... --out ...` writes on
the GPU machine (`bash .gpu/run.sh` after `cargo xtask gpu-pack`).
"""

import argparse
import json
import math

W, H = 300, 220  # one panel
PAD_L, PAD_B, PAD_T, PAD_R = 52, 34, 26, 10
COLORS = {"sdpa": "#222222", "dense": "#1f77b4", "floor": "#999999",
          512: "#2ca02c", 1024: "#ff7f0e", 2048: "#d62728"}


def series(doc, batch):
    peer = sorted((r for r in doc["rows"] if r["batch"] == batch), key=lambda r: r["ctx"])
    ours = [o for o in doc["ours"] if o["batch"] == batch]
    out = {"sdpa": [(r["ctx"], r["sdpa_us"]) for r in peer],
           "floor": [(r["ctx"], r["hbm_floor_us"]) for r in peer],
           "dense": sorted((o["ctx"], o["time_us_median"]) for o in ours if o["kind"] == "dense")}
    for b in sorted({o["budget"] for o in ours if o["budget"] is not None}):
        out[b] = sorted((o["ctx"], o["time_us_median"]) for o in ours if o["budget"] == b)
    return out


def panel(x0, y0, title, data):
    xs = [x for s in data.values() for x, _ in s]
    ys = [y for s in data.values() for _, y in s]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = math.log10(min(ys)) - 0.05, math.log10(max(ys)) + 0.05
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def px(x):
        return x0 + PAD_L + (x - xmin) / max(xmax - xmin, 1) * pw

    def py(y):
        return y0 + PAD_T + (ymax - math.log10(y)) / (ymax - ymin) * ph

    parts = [f'<text x="{x0 + W / 2}" y="{y0 + 16}" text-anchor="middle" font-size="12">{title}</text>',
             f'<rect x="{x0 + PAD_L}" y="{y0 + PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>']
    decade = 10 ** math.floor(ymin)
    while decade <= 10 ** ymax:
        for m in (1, 2, 5):
            v = decade * m
            if ymin <= math.log10(v) <= ymax:
                parts.append(f'<line x1="{x0 + PAD_L}" x2="{x0 + PAD_L + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>')
                parts.append(f'<text x="{x0 + PAD_L - 4}" y="{py(v) + 4:.1f}" text-anchor="end" font-size="9">{v:g}</text>')
        decade *= 10
    for x in sorted(set(xs)):
        parts.append(f'<text x="{px(x):.1f}" y="{y0 + H - PAD_B + 13}" text-anchor="middle" font-size="9">{x // 1024}k</text>')
    for name, pts in data.items():
        color = COLORS.get(name, "#8c564b")
        dash = ' stroke-dasharray="4 3"' if name == "floor" else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>')
    return parts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    docs = [json.load(open(p)) for p in a.inputs]
    batches = sorted({r["batch"] for d in docs for r in d["rows"]})
    width, height = W * len(batches), H * len(docs) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for row, doc in enumerate(docs):
        for col, b in enumerate(batches):
            title = f'{doc["attention"].upper()} decode, batch {b} (us, log)'
            parts += panel(col * W, row * H, title, series(doc, b))
    legend = [("sdpa", "torch SDPA (best backend)"), ("dense", "ours dense"), ("floor", "HBM floor (dense)"),
              (512, "ours tls k_t 512"), (1024, "ours tls k_t 1024"), (2048, "ours tls k_t 2048")]
    for i, (key, label) in enumerate(legend):
        x, y = 10 + i * (width - 20) / len(legend), height - 16
        parts.append(f'<line x1="{x}" x2="{x + 18}" y1="{y - 4}" y2="{y - 4}" stroke="{COLORS[key]}" stroke-width="2"/>')
        parts.append(f'<text x="{x + 22}" y="{y}" font-size="10">{label}</text>')
    parts.append(f'<text x="{width - 6}" y="{height - 2}" text-anchor="end" font-size="8">context (tokens)</text>')
    parts.append("</svg>")
    with open(a.output, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
