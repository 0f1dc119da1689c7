"""The peer of `asynctls bench e2e --device cuda`: HF transformers decoding a
whole model (random bf16 weights, SDPA attention, a StaticCache) at each
context and batch, timed with CUDA events.

    python3 bench/peers/hf_e2e.py --model-shape qwen3-8b \
        --ctx 32768,65536,98304 --batch 1,4,8 [--decode-steps 8] [--compile] \
        [--ours ours.json] [--out combined.json] [--time-budget-s 240]

where ours.json is what `asynctls bench e2e --device cuda --model-shape qwen3-8b
--ctx 32768,65536,98304 --batch 1,4,8 --json` wrote on the same machine.

What is measured, per (ctx, batch):
  * The model is built from the public model card numbers (--model-shape) on
    the GPU, in bf16, weight init skipped and the parameters then filled in
    place (normal std 0.02; ones for the norms).
  * A StaticCache of ctx + decode steps + slack tokens is allocated and its
    first ctx positions are filled with random bf16 directly (no prefill with
    the model: at 96k and several batches that would cost minutes), and its
    length is set to ctx, so every decode step attends over ctx cached tokens
    at position ctx, as ours does. Before each step the length is set back to
    ctx, so each step is the same step at position ctx.
  * 2 warm-up steps, then --decode-steps steps, each timed with CUDA events;
    the median is reported (ms/step, tokens/s = batch / median), with
    torch.cuda.max_memory_allocated() of the point.
  * Prefill is measured once, at batch 1 and --prefill-ctx (32768): one
    forward of that many tokens into a fresh cache (tokens/s).
  * --compile also runs `torch.compile(model.forward, mode="reduce-overhead",
    fullgraph=True, dynamic=False)` (CUDA graphs), reported as the system
    "hf-compiled", for as many points as --time-budget-s leaves room for (each
    shape compiles anew: 56 s for qwen3-8b on the H200 with torch 2.11;
    --compile-points picks the points).
  A point that runs out of memory is recorded as {"oom": true}; points past the
  time budget as {"skipped": "time budget"}.

How HF runs this (transformers 4.5x-5.x): a StaticCache always presents its
full length to attention with a mask that hides the unused tail, and with a
mask transformers' SDPA path does not use SDPA's native GQA, so it expands
(repeat_kv) each layer's K/V to all query heads before calling SDPA (qwen3-8b
at 96k batch 8: 108 GiB of KV + 15 GiB of weights, peak 135 GiB, the extra 12
GiB being one layer's expanded K/V). That is what HF does in generate() with a
static cache too; it is measured as it is. Eager HF is bound by the host
(1250+ kernel launches a step; smollm2-135m is 25-32 ms/step whatever the
context), so eager numbers move with the host's speed.

Output (--out): {"peer": "hf-transformers", "transformers": ..., "torch": ...,
"model_shape": ..., "rows": [{"system": "hf-eager"|"hf-compiled", "ctx", "batch",
"decode_ms_per_step", "decode_tokens_per_s", "peak_gib", "oom", ...,
"prefill_tokens_per_s" (only on the hf-eager row at prefill ctx, batch 1)}],
"prefill": {...}, "ours": <the --ours JSON or null>}; the input of
scripts/plot_e2e.py.
"""

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import os
import statistics
import sys
import time
import traceback

# No network on the GPU machine; keep the hub from trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Points of 100+ GiB one after another: expandable segments keep the allocator
# from failing on fragmentation left by the previous point. Set before torch.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import transformers  # noqa: E402

WARMUP = 2  # eager warm-up steps (the compiled system adds its compile + graph-recording calls)
SLACK = 16  # cache tokens past ctx + warm-up + steps
COMPILE_ESTIMATE_S = 100.0  # until the first compile has been timed
GIB = float(1 << 30)
BF16 = torch.bfloat16

# Public model card numbers (the same shapes as `asynctls --model-shape`).
SHAPES = {
    "qwen3-8b": {
        "family": "qwen3", "rope_theta": 1e6,
        "config": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=12288, vocab_size=151936, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, max_position_embeddings=131072),
    },
    "qwen3-14b": {
        "family": "qwen3", "rope_theta": 1e6,
        "config": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                       head_dim=128, intermediate_size=17408, vocab_size=151936, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, max_position_embeddings=131072),
    },
    "qwen2.5-0.5b": {
        "family": "qwen2", "rope_theta": 1e6,
        "config": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       head_dim=64, intermediate_size=4864, vocab_size=151936, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=32768),
    },
    "smollm2-135m": {
        "family": "llama", "rope_theta": 1e5,
        "config": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, intermediate_size=1536, vocab_size=49152, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, max_position_embeddings=8192),
    },
}
FAMILIES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "llama": ("LlamaConfig", "LlamaForCausalLM")}


def log(msg):
    print(f"[hf_e2e] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- config and model


def accepted_params(fn_or_cls):
    """Keyword names a callable takes, and whether it also takes **kwargs."""
    names, var_kw = set(), False
    targets = (fn_or_cls, fn_or_cls.__init__) if inspect.isclass(fn_or_cls) else (fn_or_cls,)
    for target in targets:
        if target is None:
            continue
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            continue
        for p in params.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                var_kw = True
            elif p.name != "self":
                names.add(p.name)
    if inspect.isclass(fn_or_cls) and dataclasses.is_dataclass(fn_or_cls):
        names |= {f.name for f in dataclasses.fields(fn_or_cls)}
    return names, var_kw


def rope_theta_of(cfg):
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else getattr(params, "rope_theta", None)
    return theta


def head_dim_of(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def set_sdpa(obj):
    for attr in ("_attn_implementation", "_attn_implementation_internal"):
        with contextlib.suppress(Exception):
            setattr(obj, attr, "sdpa")
            return


def build_config(shape):
    spec = SHAPES[shape]
    cls = getattr(transformers, FAMILIES[spec["family"]][0])
    names, var_kw = accepted_params(cls)
    kw = dict(spec["config"], use_cache=True)
    if "use_sliding_window" in names:
        kw["use_sliding_window"] = False
    # transformers 5 moved rope_theta into rope_parameters.
    if "rope_parameters" in names:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
    else:
        kw["rope_theta"] = spec["rope_theta"]
    if not var_kw:
        kw = {k: v for k, v in kw.items() if k in names}
    elif names:
        # head_dim is not a parameter of every config (old Qwen2Config); it equals hidden / heads there.
        kw = {k: v for k, v in kw.items() if k in names or k != "head_dim"}
    try:
        cfg = cls(**kw, attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001 - strict (5.x) configs may refuse the kwarg; set it below instead
        log(f"{cls.__name__}(attn_implementation=...) refused ({type(e).__name__}: {e}); setting it afterwards")
        cfg = cls(**kw)
    set_sdpa(cfg)
    for key, want in spec["config"].items():
        got = head_dim_of(cfg) if key == "head_dim" else getattr(cfg, key, None)
        if got != want:
            with contextlib.suppress(Exception):
                setattr(cfg, key, want)
            got = head_dim_of(cfg) if key == "head_dim" else getattr(cfg, key, None)
            if got != want:
                raise SystemExit(f"config {key}: wanted {want}, the {cls.__name__} has {got}")
    if rope_theta_of(cfg) != spec["rope_theta"]:
        log(f"warning: rope theta is {rope_theta_of(cfg)}, wanted {spec['rope_theta']} (timing is unaffected)")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        raise SystemExit("the config came out with sliding-window attention; expected full attention")
    return cfg


def no_init_context():
    """transformers' no_init_weights (its home moved between versions), or nothing."""
    for mod_name in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(Exception):
            mod = __import__(mod_name, fromlist=["no_init_weights"])
            fn = getattr(mod, "no_init_weights", None)
            if fn is not None:
                return fn()
    return contextlib.nullcontext()


@contextlib.contextmanager
def default_dtype(dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(cfg, family):
    model_cls = getattr(transformers, FAMILIES[family][1])
    model, how = None, None
    with torch.device("cuda"):
        # transformers 5 takes dtype=, 4.x torch_dtype=; else build directly with bf16 as the default dtype.
        for dtype_kw in ("dtype", "torch_dtype"):
            try:
                with no_init_context():
                    model = transformers.AutoModelForCausalLM.from_config(
                        cfg, **{dtype_kw: BF16}, attn_implementation="sdpa")
                how = f"AutoModelForCausalLM.from_config({dtype_kw}=bf16)"
                break
            except TypeError as e:
                log(f"from_config with {dtype_kw}= refused ({e}); trying the next way")
        if model is None:
            with no_init_context(), default_dtype(BF16):
                model = model_cls(cfg)
            how = f"{model_cls.__name__}(config) under default dtype bf16"
    params = list(model.parameters())
    if any(p.device.type != "cuda" for p in params):
        # Built on meta (or host): give it real, uninitialised GPU storage; filled below.
        log("parameters were not on the GPU after construction; to_empty(cuda)")
        model.to_empty(device="cuda")
        for m in model.modules():  # the rotary tables were lost with the meta storage
            if hasattr(m, "inv_freq") and hasattr(m, "config"):
                with contextlib.suppress(Exception):
                    init = getattr(m, "rope_init_fn", None) or m.compute_default_rope_parameters
                    inv_freq, _ = init(m.config, torch.device("cuda"))
                    m.inv_freq = inv_freq
                    m.original_inv_freq = inv_freq
    set_sdpa(model.config)
    with contextlib.suppress(Exception):
        model.set_attn_implementation("sdpa")
    model.eval()
    model.requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype != BF16:
                p.data = p.data.to(BF16)
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif "norm" in name:
                p.fill_(1.0)
            else:  # biases (Qwen2 q/k/v)
                p.normal_(0.0, 0.02)
        w = model.get_input_embeddings().weight
        assert torch.count_nonzero(w[:4]).item() > 0, "weights came out zero"
    n = sum(p.numel() for p in model.parameters())
    impl = getattr(model.config, "_attn_implementation", "?")
    log(f"model built via {how}: {n / 1e9:.3f} B params, {n * 2 / GIB:.2f} GiB bf16, attention {impl}")
    if impl != "sdpa":
        log(f"warning: attention implementation is {impl!r}, not sdpa")
    return model


# ----------------------------------------------------------------------------- cache


def make_cache(cfg, batch, max_len):
    """A StaticCache: transformers 5 takes (config, max_cache_len) and sizes batch,
    heads, dtype and device lazily; 4.x takes max_batch_size, device, dtype too."""
    names, _ = accepted_params(transformers.StaticCache)
    kw = {"config": cfg, "max_cache_len": max_len}
    for key in ("max_batch_size", "batch_size"):
        if key in names:
            kw[key] = batch
            break
    if "device" in names:
        kw["device"] = "cuda"
    if "dtype" in names:
        kw["dtype"] = BF16
    return transformers.StaticCache(**kw)


def kv_pairs(cache):
    layers = getattr(cache, "layers", None)
    if layers:
        return [(getattr(l, "keys", None), getattr(l, "values", None)) for l in layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return None


def kv_ready(pairs, want):
    return bool(pairs) and all(k is not None and v is not None and tuple(k.shape) == want and tuple(v.shape) == want
                               for k, v in pairs)


def init_cache(cache, model, cfg, batch, max_len, fwd_names):
    """Allocate the cache's K/V now: early_initialization (4.56+ and 5.x), else each
    layer's lazy_initialization (one argument in 4.5x, key and value in 5.x), else
    one forward of one token. Returns the per-layer (keys, values) tensors."""
    kvh, hd = cfg.num_key_value_heads, head_dim_of(cfg)
    want = (batch, kvh, max_len, hd)
    pairs = kv_pairs(cache)
    if kv_ready(pairs, want):
        return pairs
    if hasattr(cache, "early_initialization"):
        try:
            cache.early_initialization(batch_size=batch, num_heads=kvh, head_dim=hd, dtype=BF16,
                                       device=torch.device("cuda"))
        except TypeError:
            cache.early_initialization(batch, kvh, hd, BF16, torch.device("cuda"))
        pairs = kv_pairs(cache)
        if kv_ready(pairs, want):
            return pairs
    layers = getattr(cache, "layers", None) or []
    if layers and hasattr(layers[0], "lazy_initialization"):
        fake = torch.zeros((batch, kvh, 0, hd), dtype=BF16, device="cuda")
        for layer in layers:
            if getattr(layer, "keys", None) is not None:
                continue
            n_args = len([p for p in inspect.signature(layer.lazy_initialization).parameters.values()
                          if p.default is inspect.Parameter.empty
                          and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
            layer.lazy_initialization(*([fake] * max(1, n_args)))
        pairs = kv_pairs(cache)
        if kv_ready(pairs, want):
            return pairs
    log("cache still not allocated; running one 1-token forward to initialise it")
    kw = {"input_ids": torch.zeros((batch, 1), dtype=torch.long, device="cuda"),
          "position_ids": torch.zeros((batch, 1), dtype=torch.long, device="cuda"),
          "past_key_values": cache, "use_cache": True}
    if "cache_position" in fwd_names:
        kw["cache_position"] = torch.zeros((1,), dtype=torch.long, device="cuda")
    with torch.no_grad():
        model(**kw)
    pairs = kv_pairs(cache)
    if not kv_ready(pairs, want):
        shapes = [tuple(k.shape) if k is not None else None for k, _ in (pairs or [])][:2]
        raise RuntimeError(f"cannot allocate the static cache as {want}; its layers have {shapes}")
    return pairs


def set_cache_length(cache, n):
    """Where the next token is written: transformers 5.x static layers keep a
    cumulative_length (a tensor, updated in place, which CUDA graphs read); 4.x
    and early 5.x take cache_position from the forward's arguments instead."""
    for layer in getattr(cache, "layers", None) or []:
        cl = getattr(layer, "cumulative_length", None)
        if isinstance(cl, torch.Tensor):
            cl.fill_(n)
        elif isinstance(cl, int):
            layer.cumulative_length = n


def fill_cache(pairs, ctx):
    with torch.no_grad():
        for k, v in pairs:
            k[:, :, :ctx].normal_()
            v[:, :, :ctx].normal_()
            k[:, :, ctx:].zero_()
            v[:, :, ctx:].zero_()


# ----------------------------------------------------------------------------- measuring


def is_oom(e):
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(e, oom_types):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "cublas_status_alloc_failed" in text)


def free_memory():
    gc.collect()
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_compiler():
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    with contextlib.suppress(Exception):
        from torch._inductor import cudagraph_trees
        cudagraph_trees.reset_cudagraph_trees()


def mark_step():
    fn = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if fn is not None:
        fn()


def timed(call, reset, n):
    times = []
    for _ in range(n):
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def decode_point(model, cfg, ctx, batch, args, fwd_names, compiled=None, fullgraph=True):
    """One (ctx, batch) point; compiled is None for eager. Returns the row's measurements."""
    max_len = ctx + WARMUP + args.decode_steps + SLACK
    kvh, hd, layers = cfg.num_key_value_heads, head_dim_of(cfg), cfg.num_hidden_layers
    out = {"max_cache_len": max_len, "kv_gib": 2 * layers * batch * kvh * max_len * hd * 2 / GIB}
    torch.cuda.reset_peak_memory_stats()
    cache = make_cache(cfg, batch, max_len)
    pairs = init_cache(cache, model, cfg, batch, max_len, fwd_names)
    fill_cache(pairs, ctx)
    set_cache_length(cache, ctx)
    kw = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda"),
          "position_ids": torch.full((batch, 1), ctx, dtype=torch.long, device="cuda"),
          "past_key_values": cache, "use_cache": True}
    if "cache_position" in fwd_names:
        kw["cache_position"] = torch.tensor([ctx], dtype=torch.long, device="cuda")
    fn = compiled if compiled is not None else model

    def reset():
        set_cache_length(cache, ctx)
        # Empty layer 0's slot at ctx again, so the write check below sees this step's write.
        pairs[0][0][:, :, ctx].zero_()
        pairs[0][1][:, :, ctx].zero_()

    def step():
        mark_step()
        fn(**kw)

    with torch.no_grad():
        if compiled is not None:
            reset()
            torch.cuda.synchronize()
            t = time.perf_counter()
            step()  # compiles
            torch.cuda.synchronize()
            out["compile_s"] = time.perf_counter() - t
            out["fullgraph"] = fullgraph
            log(f"  compiled in {out['compile_s']:.1f} s")
            for _ in range(2):  # CUDA-graph warm-up and recording
                reset()
                step()
            torch.cuda.synchronize()
        reset()
        try:
            step()
        except Exception as e:
            if is_oom(e) or compiled is not None:
                raise
            # Should not be needed (the model builds its causal mask from the positions), but some
            # versions may want a 2-D mask the length of the static cache.
            log(f"  decode without attention_mask failed ({type(e).__name__}: {e}); retrying with a ones mask")
            kw["attention_mask"] = torch.ones((batch, max_len), dtype=torch.long, device="cuda")
            out["attention_mask"] = True
            reset()
            step()
        torch.cuda.synchronize()
        # The step must have written position ctx (and nothing past it): it attended over ctx tokens.
        k0 = pairs[0][0]
        wrote = bool(torch.count_nonzero(k0[:, :, ctx]).item() > 0)
        clean = ctx + 1 >= max_len or bool(torch.count_nonzero(k0[:, :, ctx + 1]).item() == 0)
        out["write_pos_ok"] = wrote and clean
        if not out["write_pos_ok"]:
            log(f"  warning: the step did not write cache position {ctx} alone (wrote {wrote}, clean {clean})")
        timed(step, reset, WARMUP - 1)
        times = timed(step, reset, args.decode_steps)
    med = statistics.median(times)
    out.update({"decode_ms_per_step": med, "decode_tokens_per_s": batch / (med / 1e3),
                "step_ms": [round(t, 4) for t in times],
                "peak_gib": torch.cuda.max_memory_allocated() / GIB})
    del kw, pairs, cache
    return out


def prefill_point(model, cfg, n, fwd_names):
    """One forward of n tokens at batch 1 into a fresh static cache."""
    torch.cuda.reset_peak_memory_stats()
    max_len = n + SLACK
    cache = make_cache(cfg, 1, max_len)
    init_cache(cache, model, cfg, 1, max_len, fwd_names)
    ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")

    def run(m):
        kw = {"input_ids": ids[:, :m], "position_ids": torch.arange(m, device="cuda")[None],
              "past_key_values": cache, "use_cache": True}
        if "cache_position" in fwd_names:
            kw["cache_position"] = torch.arange(m, device="cuda")
        for key in ("logits_to_keep", "num_logits_to_keep"):  # only the last token's logits, as serving does
            if key in fwd_names:
                kw[key] = 1
                break
        model(**kw)

    with torch.no_grad():
        run(min(n, 512))  # warm-up (kernels, cuBLAS handles)
        torch.cuda.synchronize()
        with contextlib.suppress(Exception):
            cache.reset()
        set_cache_length(cache, 0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(n)
        end.record()
        end.synchronize()
    ms = start.elapsed_time(end)
    res = {"ctx": n, "batch": 1, "prefill_ms": ms, "prefill_tokens_per_s": n / (ms / 1e3),
           "peak_gib": torch.cuda.max_memory_allocated() / GIB}
    del cache, ids
    return res


def guarded(fn):
    """fn() -> (result, None), or (None, "oom" | error text); memory freed either way."""
    result, err = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - a point's failure is recorded, the run goes on
        if is_oom(e):
            err = "oom"
        else:
            err = f"{type(e).__name__}: {e}"[:600]
            log(traceback.format_exc())
    free_memory()
    return result, err


# ----------------------------------------------------------------------------- tables


def fmt(x, spec=".2f", missing="-"):
    if x is None:
        return missing
    if isinstance(x, str):
        return x
    return format(x, spec)


def cell(row):
    """A row's ms/step, or why it has none."""
    if row is None:
        return None
    if row.get("oom"):
        return "oom"
    if row.get("skipped"):
        return "skip"
    if row.get("error"):
        return "err"
    return row.get("decode_ms_per_step")


def print_rows(rows):
    print(f"{'system':<12} {'ctx':>7} {'batch':>5} {'ms/step':>9} {'tok/s':>9} {'peak GiB':>9} {'compile s':>9}  note")
    for r in rows:
        note = "oom" if r.get("oom") else (r.get("skipped") or r.get("error") or "")
        if r.get("write_pos_ok") is False:
            note = (note + " write-pos?").strip()
        print(f"{r['system']:<12} {r['ctx']:>7} {r['batch']:>5} {fmt(r.get('decode_ms_per_step')):>9} "
              f"{fmt(r.get('decode_tokens_per_s'), '.1f'):>9} {fmt(r.get('peak_gib')):>9} "
              f"{fmt(r.get('compile_s'), '.1f'):>9}  {note}")


def ours_rows(ours):
    rows = ours.get("rows", []) if isinstance(ours, dict) else (ours if isinstance(ours, list) else [])
    return [r for r in rows if isinstance(r, dict)]


def ours_ms(r):
    ms = r.get("decode_ms_per_step", r.get("decode_ms_per_token"))
    if ms is None and r.get("decode_tokens_per_s"):
        ms = 1e3 * r.get("batch", 1) / r["decode_tokens_per_s"]
    return ms


def ratio(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def print_side_by_side(rows, ours, prefill):
    mine = ours_rows(ours)
    if not mine:
        print("\n(--ours has no rows)")
        return
    policy = lambda r: r.get("policy", r.get("kind"))  # noqa: E731
    budgets = sorted({r.get("budget") for r in mine if policy(r) == "tls" and r.get("budget") is not None})
    others = sorted({str(policy(r)) for r in mine if policy(r) not in ("dense", "tls")})
    keys = sorted({(r["ctx"], r.get("batch", 1)) for r in mine if "ctx" in r} | {(r["ctx"], r["batch"]) for r in rows})
    hf = {(r["system"], r["ctx"], r["batch"]): r for r in rows}
    head = [f"{'ctx':>7}", f"{'batch':>5}", f"{'dense':>8}"] + [f"{'tls@' + str(b):>9}" for b in budgets]
    head += [f"{o:>9}" for o in others]
    head += [f"{'floor':>7}", f"{'hf-eager':>9}", f"{'hf-comp':>8}", f"{'eager/dn':>8}", f"{'comp/dn':>8}",
             f"{'dn/floor':>8}"] + [f"{'dn/tls@' + str(b):>10}" for b in budgets]
    print("\nms per decode step, ours (dense, tls per budget) vs HF; the floor is ours' bytes floor of the dense step")
    print(" ".join(head))
    for ctx, batch in keys:
        at = [r for r in mine if r.get("ctx") == ctx and r.get("batch", 1) == batch]
        dense = next((r for r in at if policy(r) == "dense"), None)
        d_ms = ours_ms(dense) if dense else None
        tls = {b: next((ours_ms(r) for r in at if policy(r) == "tls" and r.get("budget") == b), None) for b in budgets}
        other = {o: next((ours_ms(r) for r in at if str(policy(r)) == o), None) for o in others}
        floor = (dense or {}).get("floor_ms")
        if floor is None:
            floor = next((r.get("floor_ms") for r in at if r.get("floor_ms") is not None), None)
        eager, comp = cell(hf.get(("hf-eager", ctx, batch))), cell(hf.get(("hf-compiled", ctx, batch)))
        line = [f"{ctx:>7}", f"{batch:>5}", f"{fmt(d_ms):>8}"] + [f"{fmt(tls[b]):>9}" for b in budgets]
        line += [f"{fmt(other[o]):>9}" for o in others]
        line += [f"{fmt(floor):>7}", f"{fmt(eager):>9}", f"{fmt(comp):>8}", f"{fmt(ratio(eager, d_ms)):>8}",
                 f"{fmt(ratio(comp, d_ms)):>8}", f"{fmt(ratio(d_ms, floor)):>8}"]
        line += [f"{fmt(ratio(d_ms, tls[b])):>10}" for b in budgets]
        print(" ".join(line))
    if prefill:
        p_ctx = prefill.get("ctx")
        o = next((r for r in mine if r.get("ctx") == p_ctx and r.get("batch", 1) == 1 and policy(r) == "dense"
                  and r.get("prefill_tokens_per_s")), None)
        o = o or next((r for r in mine if r.get("ctx") == p_ctx and r.get("batch", 1) == 1
                       and r.get("prefill_tokens_per_s")), None)
        o_tps = o.get("prefill_tokens_per_s") if o else None
        # `asynctls bench e2e --json` reports its prefill at the top level.
        top = (ours or {}).get("prefill") if isinstance(ours, dict) else None
        if o_tps is None and top and top.get("tokens") == p_ctx:
            o_tps = top.get("prefill_tokens_per_s")
        h_tps = "oom" if prefill.get("oom") else prefill.get("prefill_tokens_per_s")
        print(f"\nprefill at ctx {p_ctx}, batch 1: ours {fmt(o_tps, '.0f')} tok/s, HF eager {fmt(h_tps, '.0f')} tok/s, "
              f"ours/HF {fmt(ratio(o_tps, h_tps))}")


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--ctx", default="32768,65536,98304")
    ap.add_argument("--batch", default="1,4,8")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--prefill-ctx", type=int, default=32768, help="batch-1 prefill length; 0 skips it")
    ap.add_argument("--compile", action="store_true", help="also run torch.compile(reduce-overhead) as hf-compiled")
    ap.add_argument("--compile-points", default="", help="CTXxBATCH,... to compile (default: every point, in order)")
    ap.add_argument("--ours", help="the JSON of `asynctls bench e2e --device cuda --json`")
    ap.add_argument("--out", help="where to write the combined JSON")
    ap.add_argument("--time-budget-s", type=float, default=240.0)
    a = ap.parse_args()
    t0 = time.monotonic()
    elapsed = lambda: time.monotonic() - t0  # noqa: E731

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    ctxs = [int(x) for x in a.ctx.split(",") if x.strip()]
    batches = [int(x) for x in a.batch.split(",") if x.strip()]
    ours = json.load(open(a.ours)) if a.ours else None
    torch.manual_seed(0)
    total_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)} "
        f"({total_gib:.1f} GiB), shape {a.model_shape}, ctx {ctxs}, batch {batches}, budget {a.time_budget_s:.0f} s")

    spec = SHAPES[a.model_shape]
    cfg = build_config(a.model_shape)
    model = build_model(cfg, spec["family"])
    fwd_names, _ = accepted_params(model.forward)
    log(f"forward takes cache_position: {'cache_position' in fwd_names}; "
        f"StaticCache params: {sorted(accepted_params(transformers.StaticCache)[0])}")
    max_pos = cfg.max_position_embeddings
    rows = []

    def base(system, ctx, batch):
        return {"system": system, "ctx": ctx, "batch": batch, "decode_ms_per_step": None,
                "decode_tokens_per_s": None, "peak_gib": None, "oom": False}

    prefill = None
    if a.prefill_ctx > 0:
        if a.prefill_ctx > max_pos:
            prefill = {"ctx": a.prefill_ctx, "batch": 1, "skipped": f"beyond max_position_embeddings {max_pos}"}
        else:
            log(f"prefill {a.prefill_ctx} tokens at batch 1")
            res, err = guarded(lambda: prefill_point(model, cfg, a.prefill_ctx, fwd_names))
            prefill = res or {"ctx": a.prefill_ctx, "batch": 1, "oom": err == "oom",
                              **({"error": err} if err and err != "oom" else {})}
            if res:
                log(f"  prefill: {res['prefill_tokens_per_s']:.0f} tok/s ({res['prefill_ms']:.0f} ms)")
            else:
                log(f"  prefill: {err}")

    points = [(c, b) for c in ctxs for b in batches]
    for ctx, batch in points:
        row = base("hf-eager", ctx, batch)
        if ctx + WARMUP + a.decode_steps > max_pos:
            row["skipped"] = f"beyond max_position_embeddings {max_pos}"
        elif elapsed() > a.time_budget_s:
            row["skipped"] = "time budget"
        else:
            log(f"hf-eager ctx {ctx} batch {batch} ({elapsed():.0f} s in)")
            res, err = guarded(lambda: decode_point(model, cfg, ctx, batch, a, fwd_names))
            if res:
                row.update(res)
                log(f"  {res['decode_ms_per_step']:.2f} ms/step, {res['decode_tokens_per_s']:.1f} tok/s, "
                    f"peak {res['peak_gib']:.1f} GiB")
            else:
                row["oom"] = err == "oom"
                if err != "oom":
                    row["error"] = err
                log(f"  {err}")
        if prefill and batch == 1 and ctx == prefill.get("ctx"):
            for key in ("prefill_tokens_per_s", "prefill_ms"):
                if key in prefill:
                    row[key] = prefill[key]
            if prefill.get("oom"):
                row["prefill_oom"] = True
        rows.append(row)

    if a.compile:
        for name, value in (("cache_size_limit", 64), ("recompile_limit", 64)):
            with contextlib.suppress(Exception):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, value)
        with contextlib.suppress(Exception):
            torch._logging.set_logs(perf_hints=True)  # says so on stderr if CUDA graphs get skipped
        wanted = None
        if a.compile_points:
            wanted = {tuple(int(v) for v in p.lower().split("x")) for p in a.compile_points.split(",") if p.strip()}
        estimate, fullgraph = COMPILE_ESTIMATE_S, True
        for ctx, batch in points:
            if wanted is not None and (ctx, batch) not in wanted:
                continue
            row = base("hf-compiled", ctx, batch)
            eager = next(r for r in rows if r["system"] == "hf-eager" and r["ctx"] == ctx and r["batch"] == batch)
            if ctx + WARMUP + a.decode_steps > max_pos:
                row["skipped"] = f"beyond max_position_embeddings {max_pos}"
            elif eager.get("oom"):
                row["oom"], row["skipped_because"] = True, "eager ran out of memory at this point"
            elif elapsed() + estimate > a.time_budget_s:
                row["skipped"] = "time budget"
            else:
                while True:
                    log(f"hf-compiled ctx {ctx} batch {batch} fullgraph={fullgraph} ({elapsed():.0f} s in)")
                    reset_compiler()
                    compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)
                    res, err = guarded(lambda: decode_point(model, cfg, ctx, batch, a, fwd_names, compiled, fullgraph))
                    del compiled
                    reset_compiler()
                    free_memory()
                    if res:
                        row.update(res)
                        estimate = max(res.get("compile_s", estimate), 30.0)
                        log(f"  {res['decode_ms_per_step']:.2f} ms/step, {res['decode_tokens_per_s']:.1f} tok/s, "
                            f"peak {res['peak_gib']:.1f} GiB")
                        break
                    if err == "oom":
                        row["oom"] = True
                        log("  oom")
                        break
                    log(f"  {err}")
                    if fullgraph and elapsed() + estimate <= a.time_budget_s:
                        fullgraph = False  # a graph break: try once more, letting dynamo split the graph
                        row["fullgraph_error"] = err
                        continue
                    row["error"] = err
                    break
            rows.append(row)

    print_rows(rows)
    if ours is not None:
        print_side_by_side(rows, ours, prefill)
    doc = {"peer": "hf-transformers", "transformers": transformers.__version__, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0), "model_shape": a.model_shape,
           "config": {k: (head_dim_of(cfg) if k == "head_dim" else getattr(cfg, k, None)) for k in spec["config"]}
           | {"rope_theta": rope_theta_of(cfg), "attn_implementation": getattr(cfg, "_attn_implementation", None)},
           "decode_steps": a.decode_steps, "warmup_steps": WARMUP, "time_budget_s": a.time_budget_s,
           "elapsed_s": elapsed(), "prefill": prefill, "rows": rows, "ours": ours}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
