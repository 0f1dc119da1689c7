"""Golden fixtures for the GQA model families (qwen3, qwen2, llama).

Run on the GPU machine (it has torch and transformers 5.17):

    python3 scripts/golden/make_gqa_fixtures.py OUT_DIR [NAME ...]

(NAMEs pick cases; all by default.)

For each tiny random model it writes OUT_DIR/<name>/ with config.json and
model.safetensors (save_pretrained, fp32) and golden.safetensors holding, for
two prompts of different lengths, the input ids, the logits of every prompt
position (eager attention, fp32) and 12 greedy tokens. The tests in
asynctls-models/tests/golden.rs load them.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

NEW_TOKENS = 12
PROMPT_LENS = (17, 29)

CASES = {
    # Qwen3: q/k norm, explicit head_dim wider than hidden/heads, untied head.
    "qwen3-tiny": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256,
        max_position_embeddings=256, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
    ),
    # Qwen3 with YaRN scaling and a group of 4, tied embeddings.
    "qwen3-yarn-tied": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=192,
        max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1000.0, rms_norm_eps=1e-6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
    # Qwen2: qkv bias (made nonzero below), head_dim = hidden / heads, untied.
    "qwen2-bias": dict(
        model_type="qwen2", hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, vocab_size=200,
        max_position_embeddings=256, tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    # Shapes the GPU kernels are built for (head dim 128 with a group of 2;
    # head dim 64 with a group of 2), so the GPU forward is checked against
    # HF too: Qwen3 with q/k norm, Qwen2 with qkv bias.
    "qwen3-gpu": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128, vocab_size=256,
        max_position_embeddings=256, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
    ),
    "qwen2-gpu": dict(
        model_type="qwen2", hidden_size=128, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=200,
        max_position_embeddings=256, tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    # Llama: plain MHA (kv = q heads), tied embeddings, head_dim 64.
    "llama-mha": dict(
        model_type="llama", hidden_size=128, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, vocab_size=160,
        max_position_embeddings=256, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
        attention_bias=False,
    ),
}


def build(name, spec, seed):
    spec = dict(spec)
    model_type = spec.pop("model_type")
    rope_scaling = spec.pop("rope_scaling", None)
    config = AutoConfig.for_model(model_type, **spec)
    if rope_scaling is not None:
        params = dict(getattr(config, "rope_parameters", None) or {})
        params.update(rope_scaling)
        params.setdefault("rope_theta", spec["rope_theta"])
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = params
        else:
            config.rope_scaling = params
    config.initializer_range = 0.25
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            # HF initializes biases and norms to constants; make them random
            # so the fixtures check that they are loaded and applied.
            if module_name.endswith(".bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in module_name:
                param.uniform_(0.5, 1.5)
    return model


def greedy(model, ids):
    out = model.generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        eos_token_id=None, use_cache=True,
    )
    return out[0, ids.shape[1]:]


def main():
    out_root = sys.argv[1]
    only = set(sys.argv[2:])
    for name, spec in CASES.items():
        if only and name not in only:
            continue
        for seed in range(100):
            model = build(name, spec, seed)
            gen = torch.Generator().manual_seed(1000 + seed)
            tensors = {}
            ok = True
            for i, n in enumerate(PROMPT_LENS):
                ids = torch.randint(0, spec["vocab_size"], (1, n), generator=gen)
                with torch.no_grad():
                    logits = model(ids).logits[0].float()
                    tokens = greedy(model, ids)
                # A continuation of one repeated token tests little.
                ok &= len(set(tokens.tolist())) >= 4
                tensors[f"input_ids_{i}"] = ids[0].to(torch.int32).contiguous()
                tensors[f"logits_{i}"] = logits.contiguous()
                tensors[f"greedy_{i}"] = tokens.to(torch.int32).contiguous()
            if ok:
                break
        target = os.path.join(out_root, name)
        model.save_pretrained(target, safe_serialization=True)
        save_file(tensors, os.path.join(target, "golden.safetensors"))
        print(name, "seed", seed, "greedy", [tensors[f"greedy_{i}"].tolist() for i in range(len(PROMPT_LENS))])
        print(json.dumps(json.load(open(os.path.join(target, "config.json"))), sort_keys=True))


if __name__ == "__main__":
    main()
