"""The peer of `asynctls bench e2e --device cuda`: HF transformers decoding a
whole model (random bf16 weights, SDPA attention, a StaticCache) at each
context and batch, timed with CUDA events.

    python3 bench/peers/hf_e2e.py --model-shape qwen3-8b \
        --ctx 32768,65536,98304 --batch 1,4,8 [--decode-steps 8] [--compile] \
        [--ours ours.json] [--out combined.json] [--time-budget-s 240]

    python3 bench/peers/hf_e2e.py --model-shape glm-4.7-flash --ctx 32768,65536 --batch 1,4
    python3 bench/peers/hf_e2e.py --model-shape glm-4.7-flash --tiny   # CPU check of the code paths

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

GLM-4.7-Flash (--model-shape glm-4.7-flash, transformers' Glm4MoeLiteForCausalLM,
model type glm4_moe_lite; 47 layers, the first dense and 46 MoE with 64 routed
experts top-4 plus a shared one, MLA attention with 20 heads, 29.94 B
parameters, 55.8 GiB bf16): the same flow, with what HF caches read off the
model itself (one 1-token forward into HF's own cache before the points,
`cache_layout`), since that changed between transformers releases:
  * transformers 5.15 and later (5.17 on the GPU machine): the latents.
    Glm4MoeLiteAttention.forward views the normed kv_a latent as
    [batch, 1, len, kv_lora_rank=512] and the roped shared key as
    [batch, 1, len, qk_rope_head_dim=64] and passes those to
    past_key_values.update (modeling_glm4_moe_lite.py lines 333-344 in 5.17.0);
    the StaticLayer keeps keys [batch, 1, max_len, 512] and values
    [batch, 1, max_len, 64]: 576 bf16 = 1152 bytes per token per layer,
    54,144 bytes per token for the 47 layers, the same as our 576-wide latent.
    But each step then re-expands every cached position (the static cache's
    full max_len) through kv_b_proj (expand_kv, line 348): per layer a
    [batch, max_len, 20 x (192+256)] projection, keys [batch, 20, max_len, 256]
    copied out of it and values [batch, 20, max_len, 256] (a view of it), then
    SDPA over them. So the resident cache is as small as ours, but every step
    does a max_len x 512 x 8960 matmul per layer per sequence (about 0.9 TFLOP
    per layer at 96k) and holds one layer's expansion as transient memory (at
    96k batch 8: 13.1 GiB of projection + 7.5 GiB of keys).
  * transformers 5.0-5.14 (seen in 5.0.0, 5.10.4, 5.12.1, 5.14.1): the
    un-absorbed per-head K/V: keys
    [batch, 20, len, 192+64=256] and values [batch, 20, len, 256] (the
    update at modeling_glm4_moe_lite.py line 320 in 5.14.1), i.e.
    2 x 20 x 256 bf16 = 20,480 bytes per token per layer, 962,560 bytes per
    token for 47 layers (17.8x our latent; 96k tokens at batch 1 is 88 GiB, which
    with the weights does not fit an H200: recorded as oom).
  The cache is filled with random values in whatever shapes the probe found;
  the rows carry kv_gib (the allocated cache) and the document carries
  "cache_layout" (the per-layer shapes and bytes per token). The MoE experts
  are fused 3-D parameters in transformers 5 (gate_up_proj [E, 2I, H],
  down_proj [E, H, I]); they are filled like every other >= 2-D parameter
  (normal std 0.02), the norms with ones, the router's e_score_correction_bias
  (an fp32 buffer) with zeros. The experts implementation HF picked
  (grouped_mm by default in 5.x) is recorded as "experts_implementation".
  Our side (--ours) is whatever `asynctls bench e2e` gives for this shape; at
  this commit its --model-shape takes the GQA presets only.

--tiny (a check without a GPU) shrinks the chosen shape to a few layers of
width 64 (keeping its family, and for GLM its dense-then-MoE layout and MLA)
and runs the whole flow on the CPU (--device cpu, the default with --tiny) at
small contexts; times there are host wall-clock and peak_gib is the process's
peak RSS. It only says the code paths work.

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
# GLM-4.7-Flash: the sizes of our `GlmConfig::glm_4_7_flash()` (the defaults of HF's Glm4MoeLiteConfig).
# dense_layers: the first that many layers have a dense MLP, the rest MoE (mlp_layer_types in transformers 5,
# first_k_dense_replace where the config class takes that instead).
SHAPES["glm-4.7-flash"] = {
    "family": "glm4_moe_lite", "rope_theta": 1e4, "dense_layers": 1,
    "config": dict(vocab_size=154880, hidden_size=2048, intermediate_size=10240, moe_intermediate_size=1536,
                   num_hidden_layers=47, num_attention_heads=20, q_lora_rank=768, kv_lora_rank=512,
                   qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=64,
                   num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=1.8, norm_topk_prob=True,
                   n_group=1, topk_group=1, rope_interleave=True, rms_norm_eps=1e-5,
                   max_position_embeddings=202752, tie_word_embeddings=False, attention_bias=False),
}
FAMILIES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "llama": ("LlamaConfig", "LlamaForCausalLM"),
            "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM")}
MLA_FAMILIES = {"glm4_moe_lite"}  # what they cache is read off the model (cache_layout), not the config
# --tiny: the sizes each family is shrunk to (the rest of the shape is kept).
TINY = {
    "gqa": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=512),
    "glm4_moe_lite": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=8,
                          num_experts_per_tok=2),
}
DEV = "cuda"  # --device; "cpu" only for --tiny checks


def tiny_spec(spec):
    spec = dict(spec)
    spec["config"] = dict(spec["config"], **TINY.get(spec["family"], TINY["gqa"]))
    return spec


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


def build_config(shape, spec=None):
    spec = spec or SHAPES[shape]
    cls = getattr(transformers, FAMILIES[spec["family"]][0], None)
    if cls is None:
        raise SystemExit(f"transformers {transformers.__version__} has no {FAMILIES[spec['family']][0]}")
    names, var_kw = accepted_params(cls)
    kw = dict(spec["config"], use_cache=True)
    if "use_sliding_window" in names:
        kw["use_sliding_window"] = False
    # transformers 5 moved rope_theta into rope_parameters.
    if "rope_parameters" in names:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
    else:
        kw["rope_theta"] = spec["rope_theta"]
    want_moe = None
    if "dense_layers" in spec:  # MoE families: the first dense_layers layers dense, the rest MoE
        n, k = spec["config"]["num_hidden_layers"], spec["dense_layers"]
        want_moe = [i >= k for i in range(n)]
        if "mlp_layer_types" in names:
            kw["mlp_layer_types"] = ["sparse" if m else "dense" for m in want_moe]
        elif "first_k_dense_replace" in names:
            kw["first_k_dense_replace"] = k
        else:
            raise SystemExit(f"{cls.__name__} takes neither mlp_layer_types nor first_k_dense_replace")
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
    if want_moe is not None and moe_layers_of(cfg) != want_moe:
        raise SystemExit(f"config MoE layers: wanted {want_moe}, the {cls.__name__} has {moe_layers_of(cfg)}")
    if rope_theta_of(cfg) != spec["rope_theta"]:
        log(f"warning: rope theta is {rope_theta_of(cfg)}, wanted {spec['rope_theta']} (timing is unaffected)")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        raise SystemExit("the config came out with sliding-window attention; expected full attention")
    return cfg


def moe_layers_of(cfg):
    """Which layers the config makes MoE: mlp_layer_types (transformers 5), else first_k_dense_replace
    (and moe_layer_freq, DeepSeek-style)."""
    types = getattr(cfg, "mlp_layer_types", None)
    if types:
        return [t != "dense" for t in types]
    k = getattr(cfg, "first_k_dense_replace", None)
    if k is None:
        return None
    freq = getattr(cfg, "moe_layer_freq", 1) or 1
    return [i >= k and i % freq == 0 for i in range(cfg.num_hidden_layers)]


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
    with torch.device(DEV):
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
    if any(p.device.type != DEV for p in params):
        # Built on meta (or host): give it real, uninitialised GPU storage; filled below.
        log(f"parameters were not on the {DEV} device after construction; to_empty({DEV})")
        model.to_empty(device=DEV)
        for m in model.modules():  # the rotary tables were lost with the meta storage
            if hasattr(m, "inv_freq") and hasattr(m, "config"):
                with contextlib.suppress(Exception):
                    init = getattr(m, "rope_init_fn", None) or m.compute_default_rope_parameters
                    inv_freq, _ = init(m.config, torch.device(DEV))
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
        # MoE routers' selection bias (an fp32 buffer, uninitialised if the model was built on meta).
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        w = model.get_input_embeddings().weight
        assert torch.count_nonzero(w[:4]).item() > 0, "weights came out zero"
    n = sum(p.numel() for p in model.parameters())
    impl = getattr(model.config, "_attn_implementation", "?")
    log(f"model built via {how}: {n / 1e9:.3f} B params, {n * 2 / GIB:.2f} GiB bf16, attention {impl}")
    if impl != "sdpa":
        log(f"warning: attention implementation is {impl!r}, not sdpa")
    want_moe = moe_layers_of(model.config) if family in MLA_FAMILIES else None
    if want_moe is not None:
        layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
        got = [hasattr(layer.mlp, "experts") for layer in layers]
        if got != want_moe:
            raise SystemExit(f"the model's MoE layers are {got}, the config says {want_moe}")
        experts = next(layer.mlp.experts for layer in layers if hasattr(layer.mlp, "experts"))
        shapes = dict(list({n: tuple(p.shape) for n, p in experts.named_parameters()}.items())[:3])
        log(f"{sum(got)} MoE layers of {len(got)}; experts {type(experts).__name__} {shapes}, "
            f"experts implementation {getattr(model.config, '_experts_implementation', None)}")
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
        kw["device"] = DEV
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


def cache_layout(model, cfg, family):
    """What the cache holds per layer and token: ((key heads, key width), (value heads, value width)).
    GQA families: num_key_value_heads x head_dim for both, from the config. MLA families (GLM): read
    off one 1-token forward into the model's own (dynamic) cache, since what HF caches changed
    between releases (the un-absorbed per-head K/V until 5.14, the latents from 5.15 on)."""
    if family not in MLA_FAMILIES:
        kvh, hd = cfg.num_key_value_heads, head_dim_of(cfg)
        return (kvh, hd), (kvh, hd)
    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=DEV), use_cache=True)
    pairs = kv_pairs(getattr(out, "past_key_values", None)) or []
    shapes = {((k.shape[1], k.shape[-1]), (v.shape[1], v.shape[-1])) for k, v in pairs
              if k is not None and v is not None}
    del out, pairs
    if len(shapes) != 1:
        raise RuntimeError(f"cannot tell what the model caches: per-layer (heads, width) of K, V: {shapes}")
    return shapes.pop()


def layout_bytes_per_token(layout, layers):
    (hk, dk), (hv, dv) = layout
    return layers * (hk * dk + hv * dv) * 2  # bf16


def kv_ready(pairs, want_k, want_v):
    return bool(pairs) and all(k is not None and v is not None and tuple(k.shape) == want_k
                               and tuple(v.shape) == want_v for k, v in pairs)


def init_cache(cache, model, cfg, batch, max_len, fwd_names, layout):
    """Allocate the cache's K/V now: early_initialization (4.56+ and 5.x; only where keys and values
    have one shape), else each layer's lazy_initialization (one argument in 4.5x, key and value in
    5.x), else one forward of one token. Returns the per-layer (keys, values) tensors."""
    (hk, dk), (hv, dv) = layout
    want_k, want_v = (batch, hk, max_len, dk), (batch, hv, max_len, dv)
    pairs = kv_pairs(cache)
    if kv_ready(pairs, want_k, want_v):
        return pairs
    if hasattr(cache, "early_initialization") and (hk, dk) == (hv, dv):
        try:
            cache.early_initialization(batch_size=batch, num_heads=hk, head_dim=dk, dtype=BF16,
                                       device=torch.device(DEV))
        except TypeError:
            cache.early_initialization(batch, hk, dk, BF16, torch.device(DEV))
        pairs = kv_pairs(cache)
        if kv_ready(pairs, want_k, want_v):
            return pairs
    layers = getattr(cache, "layers", None) or []
    if layers and hasattr(layers[0], "lazy_initialization"):
        fake_k = torch.zeros((batch, hk, 0, dk), dtype=BF16, device=DEV)
        fake_v = torch.zeros((batch, hv, 0, dv), dtype=BF16, device=DEV)
        for layer in layers:
            if getattr(layer, "keys", None) is not None:
                continue
            n_args = len([p for p in inspect.signature(layer.lazy_initialization).parameters.values()
                          if p.default is inspect.Parameter.empty
                          and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
            layer.lazy_initialization(*([fake_k, fake_v] + [fake_k] * (n_args - 2) if n_args >= 2 else [fake_k]))
        pairs = kv_pairs(cache)
        if kv_ready(pairs, want_k, want_v):
            return pairs
    log("cache still not allocated; running one 1-token forward to initialise it")
    kw = {"input_ids": torch.zeros((batch, 1), dtype=torch.long, device=DEV),
          "position_ids": torch.zeros((batch, 1), dtype=torch.long, device=DEV),
          "past_key_values": cache, "use_cache": True}
    if "cache_position" in fwd_names:
        kw["cache_position"] = torch.zeros((1,), dtype=torch.long, device=DEV)
    with torch.no_grad():
        model(**kw)
    pairs = kv_pairs(cache)
    if not kv_ready(pairs, want_k, want_v):
        shapes = [(tuple(k.shape), tuple(v.shape)) if k is not None and v is not None else None
                  for k, v in (pairs or [])][:2]
        raise RuntimeError(f"cannot allocate the static cache as keys {want_k}, values {want_v}; "
                           f"its layers have {shapes}")
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
    if DEV == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    """The GPU's peak allocation since reset_peak(); on the CPU (--tiny) the process's peak RSS."""
    if DEV == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


class Stopwatch:
    """CUDA events on the GPU; the host clock on the CPU (--tiny)."""

    def __init__(self):
        if DEV == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.t0 = self.t1 = None

    def begin(self):
        if DEV == "cuda":
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if DEV == "cuda":
            self.end.record()
            self.end.synchronize()
        else:
            self.t1 = time.perf_counter()

    def ms(self):
        return self.start.elapsed_time(self.end) if DEV == "cuda" else (self.t1 - self.t0) * 1e3


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
        watch = Stopwatch()
        watch.begin()
        call()
        watch.stop()
        times.append(watch.ms())
    return times


def decode_point(model, cfg, ctx, batch, args, fwd_names, layout, compiled=None, fullgraph=True):
    """One (ctx, batch) point; compiled is None for eager. Returns the row's measurements."""
    max_len = ctx + WARMUP + args.decode_steps + SLACK
    out = {"max_cache_len": max_len,
           "kv_gib": batch * max_len * layout_bytes_per_token(layout, cfg.num_hidden_layers) / GIB}
    reset_peak()
    cache = make_cache(cfg, batch, max_len)
    pairs = init_cache(cache, model, cfg, batch, max_len, fwd_names, layout)
    fill_cache(pairs, ctx)
    set_cache_length(cache, ctx)
    kw = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, 1), device=DEV),
          "position_ids": torch.full((batch, 1), ctx, dtype=torch.long, device=DEV),
          "past_key_values": cache, "use_cache": True}
    if "cache_position" in fwd_names:
        kw["cache_position"] = torch.tensor([ctx], dtype=torch.long, device=DEV)
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
            sync()
            t = time.perf_counter()
            step()  # compiles
            sync()
            out["compile_s"] = time.perf_counter() - t
            out["fullgraph"] = fullgraph
            log(f"  compiled in {out['compile_s']:.1f} s")
            for _ in range(2):  # CUDA-graph warm-up and recording
                reset()
                step()
            sync()
        reset()
        try:
            step()
        except Exception as e:
            if is_oom(e) or compiled is not None:
                raise
            # Should not be needed (the model builds its causal mask from the positions), but some
            # versions may want a 2-D mask the length of the static cache.
            log(f"  decode without attention_mask failed ({type(e).__name__}: {e}); retrying with a ones mask")
            kw["attention_mask"] = torch.ones((batch, max_len), dtype=torch.long, device=DEV)
            out["attention_mask"] = True
            reset()
            step()
        sync()
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
                "peak_gib": peak_gib()})
    del kw, pairs, cache
    return out


def prefill_point(model, cfg, n, fwd_names, layout):
    """One forward of n tokens at batch 1 into a fresh static cache."""
    reset_peak()
    max_len = n + SLACK
    cache = make_cache(cfg, 1, max_len)
    init_cache(cache, model, cfg, 1, max_len, fwd_names, layout)
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=DEV)

    def run(m):
        kw = {"input_ids": ids[:, :m], "position_ids": torch.arange(m, device=DEV)[None],
              "past_key_values": cache, "use_cache": True}
        if "cache_position" in fwd_names:
            kw["cache_position"] = torch.arange(m, device=DEV)
        for key in ("logits_to_keep", "num_logits_to_keep"):  # only the last token's logits, as serving does
            if key in fwd_names:
                kw[key] = 1
                break
        model(**kw)

    with torch.no_grad():
        run(min(n, 512))  # warm-up (kernels, cuBLAS handles)
        sync()
        with contextlib.suppress(Exception):
            cache.reset()
        set_cache_length(cache, 0)
        watch = Stopwatch()
        watch.begin()
        run(n)
        watch.stop()
    ms = watch.ms()
    res = {"ctx": n, "batch": 1, "prefill_ms": ms, "prefill_tokens_per_s": n / (ms / 1e3),
           "peak_gib": peak_gib()}
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
    ap.add_argument("--ctx", help="contexts (default 32768,65536,98304; 64,256 with --tiny)")
    ap.add_argument("--batch", help="batch sizes (default 1,4,8; 1,2 with --tiny)")
    ap.add_argument("--decode-steps", type=int, help="timed steps per point (default 8; 3 with --tiny)")
    ap.add_argument("--prefill-ctx", type=int,
                    help="batch-1 prefill length (default 32768; 128 with --tiny); 0 skips it")
    ap.add_argument("--compile", action="store_true", help="also run torch.compile(reduce-overhead) as hf-compiled")
    ap.add_argument("--compile-points", default="", help="CTXxBATCH,... to compile (default: every point, in order)")
    ap.add_argument("--ours", help="the JSON of `asynctls bench e2e --device cuda --json`")
    ap.add_argument("--out", help="where to write the combined JSON")
    ap.add_argument("--time-budget-s", type=float, default=240.0)
    ap.add_argument("--tiny", action="store_true",
                    help="check the code paths: the shape shrunk to a few narrow layers, on the CPU, small contexts")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default cuda; cpu with --tiny")
    a = ap.parse_args()
    t0 = time.monotonic()
    elapsed = lambda: time.monotonic() - t0  # noqa: E731
    tiny = a.tiny
    for key, full, small in (("ctx", "32768,65536,98304", "64,256"), ("batch", "1,4,8", "1,2"),
                             ("decode_steps", 8, 3), ("prefill_ctx", 32768, 128),
                             ("device", "cuda", "cpu")):
        if getattr(a, key) is None:
            setattr(a, key, small if tiny else full)
    global DEV
    DEV = a.device

    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    ctxs = [int(x) for x in a.ctx.split(",") if x.strip()]
    batches = [int(x) for x in a.batch.split(",") if x.strip()]
    ours = json.load(open(a.ours)) if a.ours else None
    torch.manual_seed(0)
    if DEV == "cuda":
        device_name = torch.cuda.get_device_name(0)
        total_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    else:
        device_name, total_gib = "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, {device_name} "
        f"({total_gib:.1f} GiB), shape {a.model_shape}{' (tiny)' if tiny else ''}, ctx {ctxs}, batch {batches}, "
        f"budget {a.time_budget_s:.0f} s")

    spec = tiny_spec(SHAPES[a.model_shape]) if tiny else SHAPES[a.model_shape]
    cfg = build_config(a.model_shape, spec)
    model = build_model(cfg, spec["family"])
    fwd_names, _ = accepted_params(model.forward)
    log(f"forward takes cache_position: {'cache_position' in fwd_names}; "
        f"StaticCache params: {sorted(accepted_params(transformers.StaticCache)[0])}")
    layout = cache_layout(model, cfg, spec["family"])
    bpt = layout_bytes_per_token(layout, cfg.num_hidden_layers)
    (hk, dk), (hv, dv) = layout
    log(f"cache per layer: keys [batch, {hk}, len, {dk}], values [batch, {hv}, len, {dv}] bf16: "
        f"{bpt} bytes per token over {cfg.num_hidden_layers} layers")
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
            res, err = guarded(lambda: prefill_point(model, cfg, a.prefill_ctx, fwd_names, layout))
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
            res, err = guarded(lambda: decode_point(model, cfg, ctx, batch, a, fwd_names, layout))
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
                    res, err = guarded(lambda: decode_point(model, cfg, ctx, batch, a, fwd_names, layout, compiled,
                                                            fullgraph))
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
           "device": device_name, "model_shape": a.model_shape,
           "config": {k: (head_dim_of(cfg) if k == "head_dim" else getattr(cfg, k, None)) for k in spec["config"]}
           | {"rope_theta": rope_theta_of(cfg), "attn_implementation": getattr(cfg, "_attn_implementation", None)},
           "decode_steps": a.decode_steps, "warmup_steps": WARMUP, "time_budget_s": a.time_budget_s,
           "elapsed_s": elapsed(), "prefill": prefill, "rows": rows, "ours": ours,
           "cache_layout": {"keys": ["batch", hk, "len", dk], "values": ["batch", hv, "len", dv],
                            "bytes_per_token": bpt, "layers": cfg.num_hidden_layers}}
    if spec["family"] in MLA_FAMILIES:
        moe = moe_layers_of(cfg) or []
        doc["config"] |= {"dense_layers": len(moe) - sum(moe), "moe_layers": sum(moe)}
        doc["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    if tiny:
        doc["tiny"] = True
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
