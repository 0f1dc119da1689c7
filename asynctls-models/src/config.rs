//! The HF `config.json` of the GQA families (qwen3, qwen2, llama), with the
//! differences between them as fields rather than types.

use std::path::Path;

use serde::Deserialize;

use crate::error::io_err;
use crate::{ModelError, Result};

/// Which architecture a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Qwen3,
    Qwen2,
    Llama,
}

/// RoPE as the config asks for it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// YaRN (Qwen3 beyond 32k).
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        truncate: bool,
    },
    /// Llama 3.1's smooth interpolation (SmolLM2 and Llama 3 checkpoints).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
}

/// A GQA decoder's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct GqaConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (qwen2 always; llama by flag).
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before RoPE (qwen3).
    pub qk_norm: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The fields as HF writes them; every model-defining one is required.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// transformers 5 keeps theta and scaling here.
    rope_parameters: Option<serde_json::Map<String, serde_json::Value>>,
    /// transformers 4 keeps scaling here.
    rope_scaling: Option<serde_json::Map<String, serde_json::Value>>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<u32>,
}

fn required<T>(path: &Path, name: &str, v: Option<T>) -> Result<T> {
    v.ok_or_else(|| ModelError::Config {
        path: path.to_path_buf(),
        what: format!("missing field `{name}`"),
    })
}

/// RoPE's base: top level (transformers 4) or in `rope_parameters` (5).
pub(crate) fn rope_theta(top: Option<f64>, params: Option<&serde_json::Map<String, serde_json::Value>>) -> Option<f64> {
    top.or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
}

pub(crate) fn rope_scaling(path: &Path, params: &serde_json::Map<String, serde_json::Value>) -> Result<RopeScaling> {
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let f = |name: &str| params.get(name).and_then(|v| v.as_f64());
    let need = |name: &str| {
        f(name).ok_or_else(|| ModelError::Config {
            path: path.to_path_buf(),
            what: format!("rope scaling `{kind}` needs `{name}`"),
        })
    };
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "yarn" => RopeScaling::Yarn {
            factor: need("factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
            beta_fast: f("beta_fast").unwrap_or(32.0),
            beta_slow: f("beta_slow").unwrap_or(1.0),
            attention_factor: f("attention_factor"),
            truncate: params.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        },
        other => {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                what: format!("unsupported rope scaling type `{other}` (supported: default, linear, yarn, llama3)"),
            })
        }
    })
}

/// Upper bounds on sizes read from config files: far above every real model
/// (Qwen3-235B: hidden 4096..8192, 94 layers, vocab 151,936; context 1M at
/// most), and low enough that the allocations they imply can be checked.
pub mod limits {
    pub const WIDTH: usize = 1 << 18;
    pub const VOCAB: usize = 1 << 22;
    pub const LAYERS: usize = 1024;
    pub const HEADS: usize = 1024;
    pub const HEAD_DIM: usize = 1024;
    /// 4M positions: the RoPE table at head dim 128 is then 2 GiB.
    pub const POSITIONS: usize = 1 << 22;
}

impl GqaConfig {
    /// Names of the built-in configurations ([`GqaConfig::preset`]).
    pub const PRESETS: [&'static str; 4] = ["smollm2-135m", "qwen2.5-0.5b", "qwen3-8b", "qwen3-14b"];

    /// The configuration of a real model, from its public model card, for
    /// measuring at real size with random weights.
    pub fn preset(name: &str) -> Option<Self> {
        let qwen3 = |hidden, layers, heads, intermediate| GqaConfig {
            family: Family::Qwen3,
            vocab_size: 151_936,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            rope_scaling: RopeScaling::Default,
            // 40960 natively; the model cards extend it to 131072 with YaRN,
            // which the long-context measurements (96k) need.
            max_position_embeddings: 131_072,
            tie_word_embeddings: false,
            qkv_bias: false,
            qk_norm: true,
            eos_token_ids: vec![151_645],
            bos_token_id: None,
        };
        Some(match name {
            "smollm2-135m" => GqaConfig {
                family: Family::Llama,
                vocab_size: 49_152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 1e5,
                rope_scaling: RopeScaling::Default,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                qkv_bias: false,
                qk_norm: false,
                eos_token_ids: vec![2],
                bos_token_id: Some(1),
            },
            "qwen2.5-0.5b" => GqaConfig {
                family: Family::Qwen2,
                vocab_size: 151_936,
                hidden_size: 896,
                intermediate_size: 4864,
                num_hidden_layers: 24,
                num_attention_heads: 14,
                num_key_value_heads: 2,
                head_dim: 64,
                rms_norm_eps: 1e-6,
                rope_theta: 1e6,
                rope_scaling: RopeScaling::Default,
                max_position_embeddings: 32_768,
                tie_word_embeddings: false,
                qkv_bias: true,
                qk_norm: false,
                eos_token_ids: vec![151_645],
                bos_token_id: None,
            },
            "qwen3-8b" => qwen3(4096, 36, 32, 12_288),
            "qwen3-14b" => qwen3(5120, 40, 40, 17_408),
            _ => return None,
        })
    }

    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, "cannot read config", e))?;
        Self::from_json(path, &text)
    }

    /// Parses config JSON; `path` is only used in error messages.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        let model_type = required(path, "model_type", raw.model_type)?;
        let family = match model_type.as_str() {
            "qwen3" => Family::Qwen3,
            "qwen2" => Family::Qwen2,
            "llama" => Family::Llama,
            _ => return Err(ModelError::UnsupportedModel(model_type)),
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    what: format!("unsupported hidden_act `{act}` (only silu)"),
                });
            }
        }
        let hidden_size = required(path, "hidden_size", raw.hidden_size)?;
        let num_attention_heads = required(path, "num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_attention_heads.max(1));
        let rope_params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta =
            rope_theta(raw.rope_theta, raw.rope_parameters.as_ref()).ok_or_else(|| ModelError::Config {
                path: path.to_path_buf(),
                what: "missing field `rope_theta` (top level or in `rope_parameters`)".into(),
            })?;
        let config = GqaConfig {
            family,
            vocab_size: required(path, "vocab_size", raw.vocab_size)?,
            hidden_size,
            intermediate_size: required(path, "intermediate_size", raw.intermediate_size)?,
            num_hidden_layers: required(path, "num_hidden_layers", raw.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: required(path, "rms_norm_eps", raw.rms_norm_eps)?,
            rope_theta,
            rope_scaling: rope_params.map_or(Ok(RopeScaling::Default), |p| rope_scaling(path, p))?,
            max_position_embeddings: required(path, "max_position_embeddings", raw.max_position_embeddings)?,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: match family {
                Family::Qwen2 => true,
                Family::Qwen3 | Family::Llama => raw.attention_bias.unwrap_or(false),
            },
            qk_norm: family == Family::Qwen3,
            eos_token_ids: raw.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
            bos_token_id: raw.bos_token_id,
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |what: String| {
            Err(ModelError::Config {
                path: path.to_path_buf(),
                what,
            })
        };
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!("head_dim ({}) must be even and positive", self.head_dim));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return bad("hidden_size, vocab_size, intermediate_size and num_hidden_layers must be positive".into());
        }
        // Plausibility caps: each of these sizes an allocation (the RoPE
        // table, the weights, the cache geometry), so an absurd value is an
        // error here, not an abort later.
        for (field, value, max) in [
            ("hidden_size", self.hidden_size, limits::WIDTH),
            ("intermediate_size", self.intermediate_size, limits::WIDTH),
            ("vocab_size", self.vocab_size, limits::VOCAB),
            ("num_hidden_layers", self.num_hidden_layers, limits::LAYERS),
            ("num_attention_heads", self.num_attention_heads, limits::HEADS),
            ("num_key_value_heads", self.num_key_value_heads, limits::HEADS),
            ("head_dim", self.head_dim, limits::HEAD_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                limits::POSITIONS,
            ),
        ] {
            if value > max {
                return bad(format!("{field} = {value} is implausible (at most {max})"));
            }
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta = {} must be a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps = {} must be a non-negative number",
                self.rms_norm_eps
            ));
        }
        Ok(())
    }

    /// Inverse RoPE frequencies and the attention factor, as HF computes them.
    pub fn rope_inv_freq(&self) -> (Vec<f32>, f32) {
        rope_inv_freq(&self.rope_scaling, self.head_dim, self.rope_theta)
    }
}

/// Inverse frequencies of a `d`-dimensional rotary embedding with base
/// `base`, and the factor HF multiplies cos and sin by.
pub(crate) fn rope_inv_freq(scaling: &RopeScaling, d: usize, base: f64) -> (Vec<f32>, f32) {
    {
        let default: Vec<f64> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64)).collect();
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        match scaling {
            RopeScaling::Default => (to_f32(default), 1.0),
            RopeScaling::Linear { factor } => (to_f32(default.iter().map(|f| f / factor).collect()), 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let mscale = |scale: f64| if scale <= 1.0 { 1.0 } else { 0.1 * scale.ln() + 1.0 };
                let attention = attention_factor.unwrap_or_else(|| mscale(*factor));
                let orig = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    (d as f64 * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(d as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                // HF computes the ramp and the blend in f32.
                let inv: Vec<f32> = (0..d / 2)
                    .map(|i| {
                        let pos_freq = base.powf((2 * i) as f64 / d as f64) as f32;
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (*factor as f32 * pos_freq);
                        let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect();
                (inv, attention as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let orig = *original_max_position_embeddings as f64;
                let low_wavelen = orig / low_freq_factor;
                let high_wavelen = orig / high_freq_factor;
                let inv = default
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (to_f32(inv), 1.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN3: &str = r#"{"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 64, "eos_token_id": [3, 4]}"#;

    #[test]
    fn parses_transformers_5_configs() {
        let c = GqaConfig::from_json(Path::new("config.json"), QWEN3).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.eos_token_ids, vec![3, 4]);
    }

    #[test]
    fn missing_field_and_unknown_type_are_named() {
        let text = QWEN3.replace(r#""hidden_size": 8,"#, "");
        let err = GqaConfig::from_json(Path::new("m/config.json"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing field `hidden_size`") && err.contains("m/config.json"),
            "{err}"
        );
        let text = QWEN3.replace("qwen3", "mamba");
        let err = GqaConfig::from_json(Path::new("config.json"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported model type `mamba`"), "{err}");
        let err = GqaConfig::from_json(Path::new("config.json"), "{")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid config"), "{err}");
    }
}
