//! GGUF to an HF-format directory: `config.json`, `model.safetensors` (bf16),
//! `tokenizer.json` and `tokenizer_config.json`, for the `llama` and `qwen2`
//! architectures.

use crate::config::limits;
use std::path::Path;

use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use super::{Gguf, GgufError, Value};

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub architecture: String,
    pub tensors: usize,
    pub parameters: usize,
    pub vocab_size: usize,
}

fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp stores the rows of Q and K of `llama` models interleaved per
/// rotary pair; HF keeps the two halves of a head apart. Undo it: GGUF row
/// `h*hd + 2i + j` is HF row `h*hd + j*hd/2 + i`.
fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * (hd / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The pre-tokenizer of a GGUF `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> serde_json::Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    match pre {
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]}),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true)
        ]}),
        _ => byte_level(true),
    }
}

fn tokenizer_files(g: &Gguf) -> Result<(serde_json::Value, serde_json::Value), GgufError> {
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::Malformed {
            path: g.path().to_path_buf(),
            what: format!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"),
        });
    }
    let strings = |key: &str| -> Result<Vec<String>, GgufError> {
        g.get(key)?
            .as_array()
            .ok_or_else(|| GgufError::MissingKey(key.into()))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| GgufError::MissingKey(key.into()))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .ok()
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Control (3) and user-defined (4) tokens are matched whole, before BPE.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre),
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let token_text = |key: &str| g.get_u64(key).ok().and_then(|id| tokens.get(id as usize)).cloned();
    let config = json!({
        "chat_template": g.get_str("tokenizer.chat_template").ok(),
        "bos_token": token_text("tokenizer.ggml.bos_token_id"),
        "eos_token": token_text("tokenizer.ggml.eos_token_id"),
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token").ok().map(|v| matches!(v, Value::Bool(true))),
    });
    Ok((tokenizer, config))
}

/// Writes the HF directory for `gguf` into `out_dir`. Everything is written
/// into a staging directory beside it first and moved into place only when
/// complete: a failed import leaves nothing behind (no empty or half-written
/// `out_dir`), and an existing `out_dir` keeps its other files.
pub fn import_gguf(gguf: &Gguf, out_dir: &Path, progress: impl FnMut(usize, usize)) -> Result<ImportReport, GgufError> {
    let io = |what, source| GgufError::Io {
        path: out_dir.to_path_buf(),
        what,
        source,
    };
    let name = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let staging = parent.join(format!(".{name}.importing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| io("cannot create a staging directory beside the output", e))?;
    let result = write_import(gguf, &staging, progress).and_then(|report| {
        if !out_dir.exists() {
            std::fs::rename(&staging, out_dir).map_err(|e| io("cannot move the import into place", e))?;
            return Ok(report);
        }
        // config.json last: its presence marks a complete import.
        for file in [
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "config.json",
        ] {
            std::fs::rename(staging.join(file), out_dir.join(file)).map_err(|e| io("cannot move into place", e))?;
        }
        Ok(report)
    });
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// The import itself, into a fresh directory `out_dir`.
fn write_import(
    gguf: &Gguf,
    out_dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<ImportReport, GgufError> {
    let arch = gguf.get_str("general.architecture")?.to_string();
    if arch != "llama" && arch != "qwen2" {
        return Err(GgufError::Malformed {
            path: gguf.path().to_path_buf(),
            what: format!("architecture `{arch}` is not supported (llama, qwen2)"),
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let malformed = |what: String| GgufError::Malformed {
        path: gguf.path().to_path_buf(),
        what,
    };
    // Sizes from the header: positive and plausible before anything divides
    // by them or sizes an allocation with them.
    let size = |k: &str, v: u64, max: u64| -> Result<usize, GgufError> {
        if v == 0 || v > max {
            return Err(malformed(format!("{k} = {v} (expected 1 to {max})")));
        }
        Ok(v as usize)
    };
    let heads = size(
        "attention.head_count",
        gguf.get_u64(&key("attention.head_count"))?,
        limits::HEADS as u64,
    )?;
    let kv_heads = match gguf.get_u64(&key("attention.head_count_kv")) {
        Ok(v) => size("attention.head_count_kv", v, limits::HEADS as u64)?,
        Err(_) => heads,
    };
    if heads % kv_heads != 0 {
        return Err(malformed(format!(
            "attention.head_count ({heads}) is not a multiple of attention.head_count_kv ({kv_heads})"
        )));
    }
    let hidden = size(
        "embedding_length",
        gguf.get_u64(&key("embedding_length"))?,
        limits::WIDTH as u64,
    )?;
    let head_dim = match gguf.get_u64(&key("rope.dimension_count")) {
        Ok(v) => size("rope.dimension_count", v, limits::HEAD_DIM as u64)?,
        Err(_) => hidden / heads,
    };
    let (tokenizer, tokenizer_config) = tokenizer_files(gguf)?;
    let vocab_size = tokenizer["model"]["vocab"].as_object().map_or(0, |v| v.len());
    let tied = gguf.tensor("output.weight").is_none();
    let has_bias = gguf.tensor("blk.0.attn_q.bias").is_some();
    let config = json!({
        "architectures": [if arch == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": arch,
        "vocab_size": gguf.get_u64(&key("vocab_size")).map(|v| v as usize).unwrap_or(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": size("feed_forward_length", gguf.get_u64(&key("feed_forward_length"))?, limits::WIDTH as u64)?,
        "num_hidden_layers": size("block_count", gguf.get_u64(&key("block_count"))?, limits::LAYERS as u64)?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": gguf.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": gguf.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": size("context_length", gguf.get_u64(&key("context_length"))?, limits::POSITIONS as u64)?,
        "tie_word_embeddings": tied,
        "attention_bias": has_bias,
        "hidden_act": "silu",
        "bos_token_id": gguf.get_u64("tokenizer.ggml.bos_token_id").ok(),
        "eos_token_id": gguf.get_u64("tokenizer.ggml.eos_token_id").ok(),
        "torch_dtype": "bfloat16",
    });

    let io = |what, source| GgufError::Io {
        path: out_dir.to_path_buf(),
        what,
        source,
    };
    let mut names = Vec::new();
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut parameters = 0;
    for (i, info) in gguf.tensors.iter().enumerate() {
        progress(i, gguf.tensors.len());
        let Some(name) = hf_name(&info.name) else {
            continue; // e.g. rope_freqs: recomputed from the config
        };
        let shape = info.shape();
        let mut values = gguf.dequantize(info);
        if arch == "llama" && shape.len() == 2 {
            let heads_of = if info.name.ends_with("attn_q.weight") {
                Some(heads)
            } else if info.name.ends_with("attn_k.weight") {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(h) = heads_of {
                let (rows, cols) = (shape[0], shape[1]);
                if cols == 0 || rows % h != 0 || (rows / h) % 2 != 0 {
                    return Err(malformed(format!(
                        "tensor `{}` of shape {shape:?} is not {h} heads of an even head dim",
                        info.name
                    )));
                }
                values = unpermute_rows(&values, h, cols);
            }
        }
        parameters += values.len();
        let bytes: Vec<u8> = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        names.push(name.clone());
        buffers.push((name, shape, bytes));
    }
    progress(gguf.tensors.len(), gguf.tensors.len());
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::BF16, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| GgufError::Malformed {
                    path: gguf.path().to_path_buf(),
                    what: format!("tensor `{n}`: {e}"),
                })
        })
        .collect::<Result<_, _>>()?;
    let write = |name: &str, text: String| -> Result<(), GgufError> {
        std::fs::write(out_dir.join(name), text).map_err(|e| io("cannot write", e))
    };
    safetensors::serialize_to_file(views, None, &out_dir.join("model.safetensors")).map_err(|e| {
        GgufError::Malformed {
            path: out_dir.to_path_buf(),
            what: format!("writing model.safetensors: {e}"),
        }
    })?;
    write("tokenizer.json", tokenizer.to_string())?;
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tokenizer_config).expect("json"),
    )?;
    write("config.json", serde_json::to_string_pretty(&config).expect("json"))?;
    Ok(ImportReport {
        architecture: arch,
        tensors: names.len(),
        parameters,
        vocab_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.bias").unwrap(),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // HF rows of one head of dim 4: [a0, a1, b0, b1] (halves). llama.cpp
        // interleaves pairs: [a0, b0, a1, b1].
        let gguf = vec![0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute_rows(&gguf, 1, 1), vec![0.0, 1.0, 2.0, 3.0]);
    }
}
