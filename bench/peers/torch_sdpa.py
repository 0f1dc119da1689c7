"""The peer of `asynctls bench attn --device cuda`: torch scaled_dot_product_attention
for one decode step (query length 1, GQA), best of its flash and cuDNN backends,
timed with CUDA events (median of reps after warm-up) on random bf16 K/V.

    python3 bench/peers/torch_sdpa.py --ctx 32768,65536 --batch 1,8 [--ours ours.json]

With --ours (the JSON of `asynctls bench attn --device cuda --json` from the
same machine and run) it prints both side by side with the ratios.
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HBM = 4.8e12


def time_sdpa(q, k, v, backend, reps):
    with sdpa_kernel([backend]):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", default="32768,65536,98304,131072")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--ours")
    a = ap.parse_args()
    rows = []
    for ctx in map(int, a.ctx.split(",")):
        for b in map(int, a.batch.split(",")):
            q = torch.randn(b, a.q_heads, 1, a.head_dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, a.kv_heads, ctx, a.head_dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            best = {}
            for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
                try:
                    best[name] = time_sdpa(q, k, v, backend, a.reps)
                except RuntimeError as e:
                    best[name] = None
            valid = {n: t for n, t in best.items() if t is not None}
            name, t = min(valid.items(), key=lambda kv: kv[1])
            rows.append({"ctx": ctx, "batch": b, "sdpa_us": t, "backend": name, "all": best,
                         "hbm_floor_us": b * a.kv_heads * ctx * a.head_dim * 2 * 2 / HBM * 1e6})
            del q, k, v
            torch.cuda.empty_cache()
    if a.ours:
        ours = json.load(open(a.ours))["reports"][0]["rows"]
        print(f"{'ctx':>7} {'batch':>5} {'ours dense us':>14} {'sdpa us':>9} {'sdpa/ours':>10} {'floor us':>9} "
              f"{'ours/floor':>10} {'sparse-stage us':>16} {'sdpa/sparse':>12}")
        for r in rows:
            dense = next((o for o in ours if o["ctx"] == r["ctx"] and o["batch"] == r["batch"] and o["kind"] == "dense"), None)
            sparse = [o for o in ours if o["ctx"] == r["ctx"] and o["batch"] == r["batch"] and o["kind"] != "dense"]
            if dense is None:
                continue
            sp = sparse[-1]["time_us_median"] if sparse else float("nan")
            print(f"{r['ctx']:>7} {r['batch']:>5} {dense['time_us_median']:>14.1f} {r['sdpa_us']:>9.1f} "
                  f"{r['sdpa_us'] / dense['time_us_median']:>10.2f} {r['hbm_floor_us']:>9.1f} "
                  f"{dense['time_us_median'] / r['hbm_floor_us']:>10.2f} {sp:>16.1f} {r['sdpa_us'] / sp:>12.2f}")
    print(json.dumps({"peer": "torch_sdpa", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
