"""Golden fixtures for GLM-4.7-Flash (`glm4_moe_lite`: MLA + MoE).

Run on the GPU machine (torch + transformers 5.17):

    python3 scripts/golden/make_glm_fixtures.py OUT_DIR [CASE ...]

Writes OUT_DIR/<name>/ with config.json, model.safetensors and
golden.safetensors (two prompts: input ids, logits of every position, 12
greedy tokens), like make_gqa_fixtures.py. The greedy tokens come from
repeated full forward passes (argmax of the last position), not from
`generate`, which disagreed with the forward pass on this model. Every bias, norm weight and the
router's score-correction bias are randomized so that the tests see them.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

NEW_TOKENS = 12
PROMPT_LENS = (17, 29)

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=112, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=32,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=1.8,
    norm_topk_prob=True, n_group=2, topk_group=1, first_k_dense_replace=1,
    max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
)
CASES = {
    # grouped routing (2 groups, keep 1), interleaved rope
    "glm-tiny-grouped": dict(BASE),
    # one group, no top-k normalization, a different rope layout, no q LoRA
    "glm-tiny-plain": dict(BASE, n_group=1, topk_group=1, norm_topk_prob=False, q_lora_rank=None,
                           rope_interleave=False, num_experts_per_tok=3, first_k_dense_replace=2,
                           num_hidden_layers=4),
    # the head shapes the GPU's MLA kernels take (latent 512 + rope 64, 16
    # heads), tested on the GPU by asynctls-models/tests/gpu_forward.rs
    "glm-gpu": dict(BASE, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                    num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=64,
                    qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=32, vocab_size=256,
                    num_hidden_layers=2, initializer_range=0.05, bf16_weights=True),
}


def build(spec, seed):
    spec = dict(spec)
    init = spec.pop("initializer_range", 0.25)
    bf16_weights = spec.pop("bf16_weights", False)
    config = AutoConfig.for_model("glm4_moe_lite", **spec)
    config.initializer_range = init
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(".bias") or "correction_bias" in name:
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            if bf16_weights:
                # Values a bf16 file holds exactly; the goldens are still computed in f32.
                p.copy_(p.to(torch.bfloat16).float())
    return model


def main():
    out_root = sys.argv[1]
    only = set(sys.argv[2:])
    for name, spec in CASES.items():
        if only and name not in only:
            continue
        for seed in range(100):
            model = build(spec, seed)
            gen = torch.Generator().manual_seed(1000 + seed)
            tensors, ok = {}, True
            for i, n in enumerate(PROMPT_LENS):
                ids = torch.randint(0, spec["vocab_size"], (1, n), generator=gen)
                with torch.no_grad():
                    logits = model(ids).logits[0].float()
                    # Greedy by full forwards without a cache: HF's `generate` on
                    # this model disagreed with its own forward's argmax on some
                    # prompts (printed below when it happens).
                    seq = ids
                    for _ in range(NEW_TOKENS):
                        nxt = model(seq).logits[0, -1].argmax()
                        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
                    tokens = seq[0, n:]
                    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                         eos_token_id=None, use_cache=True)
                    if not torch.equal(out[0, n:], tokens):
                        print(name, "prompt", i, "generate() differs from greedy forwards:",
                              out[0, n:].tolist(), "vs", tokens.tolist())
                ok &= len(set(tokens.tolist())) >= 4
                tensors[f"input_ids_{i}"] = ids[0].to(torch.int32).contiguous()
                tensors[f"logits_{i}"] = logits.contiguous()
                tensors[f"greedy_{i}"] = tokens.to(torch.int32).contiguous()
            if ok:
                break
        target = os.path.join(out_root, name)
        if spec.get("bf16_weights"):
            model = model.to(torch.bfloat16)  # exact: the values were rounded in build()
        model.save_pretrained(target, safe_serialization=True)
        save_file(tensors, os.path.join(target, "golden.safetensors"))
        print(name, "seed", seed, [tensors[f"greedy_{i}"].tolist() for i in range(2)])
        print(json.dumps(json.load(open(os.path.join(target, "config.json"))), sort_keys=True))
        from safetensors import safe_open
        with safe_open(os.path.join(target, "model.safetensors"), "pt") as f:
            for k in sorted(f.keys()):
                if ".layers.0." in k or ".layers.1." in k or "layers" not in k:
                    print("  ", k, tuple(f.get_slice(k).get_shape()))


if __name__ == "__main__":
    main()
