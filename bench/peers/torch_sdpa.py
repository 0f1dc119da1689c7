"""The peer of `asynctls bench attn --device cuda`: torch scaled_dot_product_attention
for one decode step (query length 1), best of its flash, cuDNN and memory-efficient
backends (for MLA, whose 576/512 head dims the fused kernels refuse, also plain
bf16 matmul + softmax attention), each eager or replayed from a CUDA graph,
whichever is faster, timed with CUDA events (median of reps after warm-up) on
random bf16 K/V.

GQA: q [b, q_heads, 1, d], K/V [b, kv_heads, n, d] with enable_gqa.
MLA (absorbed, --mla): the heads become the query length of one shared KV head,
q [b, 1, heads, 576], K [b, 1, n, 576], V [b, 1, n, 512], so the latent is read
once per step, as FlashMLA-style kernels do.

    python3 bench/peers/torch_sdpa.py --ctx 32768,65536 --batch 1,8 [--mla] \
        [--ours ours.json] [--out combined.json]

With --ours (the JSON of `asynctls bench attn --device cuda --json` from the same
machine and run) it prints both side by side with the ratios, and --out writes
ours and the peer together (the input of scripts/plot_attn.py).
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HBM = 4.8e12
BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


def time_call(fn, reps):
    """Median microseconds of fn(), eager and replayed from a CUDA graph (as
    our side is timed); the better of the two."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()

    def median_of(call):
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            call()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        return statistics.median(times)

    eager = median_of(fn)
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            fn()
        for _ in range(3):
            graph.replay()
        replayed = median_of(graph.replay)
    except RuntimeError:
        replayed = float("inf")
    return min(eager, replayed)


def time_sdpa(q, k, v, backend, reps, gqa):
    with sdpa_kernel([backend]):
        return time_call(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), reps)


def time_matmul_attention(q, k, v, reps):
    """Attention as two bf16 batched matmuls and a softmax: what torch offers
    for head dims SDPA's fused kernels do not take (MLA's 576/512)."""
    scale = q.shape[-1] ** -0.5

    def step():
        p = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(q.dtype)
        return p @ v

    return time_call(step, reps)


def prefill(a):
    """Causal prefill of each context, best of flash and cuDNN, next to ours.

    With --mla the peer computes the same layer's attention in the
    decompressed form that MLA prefill uses in practice (GLM-4.7-Flash: per
    head q/k of 192 + 64, v of 256, --q-heads heads), since SDPA's fused
    kernels refuse the absorbed 576/512 form; the ratio is of times.
    """
    ours = json.load(open(a.ours))["rows"] if a.ours else []
    if a.mla:
        heads, kv_heads, dk, dv = a.q_heads, a.q_heads, 256, 256
    else:
        heads, kv_heads, dk, dv = a.q_heads, a.kv_heads, a.head_dim, a.head_dim
    print(f"{'ctx':>7} {'sdpa us':>10} {'backend':>8} {'sdpa TFLOP/s':>13} {'ours us':>10} {'ours TFLOP/s':>13} {'sdpa/ours time':>15}")
    rows = []
    for ctx in map(int, a.ctx.split(",")):
        q = torch.randn(1, heads, ctx, dk, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, ctx, dk, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, kv_heads, ctx, dv, device="cuda", dtype=torch.bfloat16)
        best = {}
        for name, backend in BACKENDS[:2]:
            try:
                with sdpa_kernel([backend]):
                    best[name] = time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), a.reps)
            except RuntimeError:
                best[name] = None
        name, t = min(((n, t) for n, t in best.items() if t is not None), key=lambda kv: kv[1])
        flops = 2.0 * ctx * ctx / 2 * (dk + dv) * heads
        mine = next((o for o in ours if o["ctx"] == ctx), None)
        o_t = mine["time_us_median"] if mine else float("nan")
        o_tf = mine["tflops"] if mine else float("nan")
        print(f"{ctx:>7} {t:>10.1f} {name:>8} {flops / t / 1e6:>13.1f} {o_t:>10.1f} {o_tf:>13.1f} {t / o_t:>15.2f}")
        rows.append({"ctx": ctx, "sdpa_us": t, "sdpa_tflops": flops / t / 1e6, "backend": name, "all": best,
                     "ours_us": o_t, "ours_tflops": o_tf, "sdpa_shape": [heads, kv_heads, dk, dv]})
        del q, k, v
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"peer": "torch_sdpa", "torch": torch.__version__, "prefill": rows, "ours": ours}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", default="32768,65536,98304,131072")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--mla", action="store_true", help="absorbed MLA: --q-heads heads over a 576/512 latent")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--prefill", action="store_true", help="causal prefill of the whole context (GQA, or MLA with --mla)")
    ap.add_argument("--ours")
    ap.add_argument("--out")
    a = ap.parse_args()
    kind = "mla" if a.mla else "gqa"
    rows = []
    if a.prefill:
        return prefill(a)
    for ctx in map(int, a.ctx.split(",")):
        for b in map(int, a.batch.split(",")):
            if a.mla:
                q = torch.randn(b, 1, a.q_heads, 576, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(b, 1, ctx, 576, device="cuda", dtype=torch.bfloat16)
                v = k[..., :512]
                bytes_ = b * ctx * 576 * 2
            else:
                q = torch.randn(b, a.q_heads, 1, a.head_dim, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(b, a.kv_heads, ctx, a.head_dim, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                bytes_ = b * a.kv_heads * ctx * a.head_dim * 2 * 2
            best = {}
            import warnings
            warnings.filterwarnings("ignore")
            for name, backend in BACKENDS:
                try:
                    best[name] = time_sdpa(q, k, v, backend, a.reps, not a.mla)
                except RuntimeError:
                    best[name] = None
            if a.mla:
                best["matmul"] = time_matmul_attention(q, k, v, a.reps)
            valid = {n: t for n, t in best.items() if t is not None}
            name, t = min(valid.items(), key=lambda kv: kv[1])
            rows.append({"attention": kind, "ctx": ctx, "batch": b, "sdpa_us": t, "backend": name, "all": best,
                         "hbm_floor_us": bytes_ / HBM * 1e6})
            del q, k, v
            torch.cuda.empty_cache()
    combined = {"peer": "torch_sdpa", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                "attention": kind, "rows": rows}
    if a.ours:
        reports = [r for r in json.load(open(a.ours))["reports"] if r.get("attention", "gqa") == kind]
        ours = [row for r in reports for row in r["rows"]]
        combined["ours"] = ours
        budgets = sorted({o["budget"] for o in ours if o["budget"] is not None})
        head = (f"{'ctx':>7} {'batch':>5} {'sdpa us':>9} {'backend':>9} {'ours dense':>10} {'sdpa/dense':>10} "
                f"{'floor us':>9} {'dense/floor':>11}")
        for bud in budgets:
            head += f" {'tls' + str(bud) + ' us':>11} {'speedup':>8}"
        print(f"[{kind}] speedup = sdpa / ours (higher is better)")
        print(head)
        for r in rows:
            mine = [o for o in ours if o["ctx"] == r["ctx"] and o["batch"] == r["batch"]]
            dense = next((o for o in mine if o["kind"] == "dense"), None)
            if dense is None:
                continue
            line = (f"{r['ctx']:>7} {r['batch']:>5} {r['sdpa_us']:>9.1f} {r['backend']:>9} "
                    f"{dense['time_us_median']:>10.1f} {r['sdpa_us'] / dense['time_us_median']:>10.2f} "
                    f"{r['hbm_floor_us']:>9.1f} {dense['time_us_median'] / r['hbm_floor_us']:>11.2f}")
            for bud in budgets:
                sp = next((o for o in mine if o["budget"] == bud), None)
                t = sp["time_us_median"] if sp else float("nan")
                line += f" {t:>11.1f} {r['sdpa_us'] / t:>8.2f}"
            print(line)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(combined, f, indent=1)
    print(json.dumps({k: v for k, v in combined.items() if k != "ours"}))


if __name__ == "__main__":
    main()
