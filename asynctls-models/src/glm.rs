//! GLM-4.7-Flash (`glm4_moe_lite`), top-down: config, RoPE, MoE (router,
//! experts, shared expert), MLA attention, decoder layer, model.
//!
//! Attention runs in the absorbed form: the cache holds per token only the
//! normalized latent (`kv_lora_rank`) and the rotated rope key
//! (`qk_rope_head_dim`); each head's query is folded through its slice of
//! `kv_b_proj` into that latent space, attention runs over the one shared
//! latent "head", and the value up-projection is applied to its output.

use std::path::Path;
use std::sync::Arc;

use asynctls_attn::{AttentionBackend, AttentionPlan, AttnShape, CpuAttention, Step};
use asynctls_kernels::cpu::{self, RopeStyle, RopeTable};
use asynctls_kernels::{Device, Tensor};
use asynctls_kvcache::{CacheConfig, HostKvStorage, KvDType, LabelChannels, PagedKvCache};
use asynctls_offload::KvStore;
use serde::Deserialize;

use crate::config::{rope_inv_freq, rope_scaling, rope_theta, RopeScaling};
use crate::decoder::{attn_err, Decoder, Layer, TokenIo};
use crate::error::io_err;
use crate::layers::{add_residual, Linear, Mlp};
use crate::weights::WeightSource;
use crate::{ModelError, Result};

/// The eps of GLM's q/kv LoRA norms (HF builds them with its default).
const LORA_NORM_EPS: f32 = 1e-6;

/// `Glm4MoeLiteConfig`, every field that changes the computation.
#[derive(Debug, Clone, PartialEq)]
pub struct GlmConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_shared_experts: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub n_group: usize,
    pub topk_group: usize,
    /// Per layer: whether its MLP is the MoE (`"sparse"`) or dense.
    pub moe_layers: Vec<bool>,
    pub rope_interleave: bool,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawGlm {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    n_routed_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    n_shared_experts: Option<usize>,
    routed_scaling_factor: Option<f32>,
    norm_topk_prob: Option<bool>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    mlp_layer_types: Option<Vec<String>>,
    rope_interleave: Option<bool>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Map<String, serde_json::Value>>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    eos_token_id: Option<serde_json::Value>,
}

impl GlmConfig {
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let bad = |what: String| ModelError::Config {
            path: path.to_path_buf(),
            what,
        };
        let raw: RawGlm = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let need = |name: &str, v: Option<usize>| v.ok_or_else(|| bad(format!("missing field `{name}`")));
        if raw.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            return Err(bad(format!(
                "unsupported hidden_act `{}`",
                raw.hidden_act.unwrap_or_default()
            )));
        }
        let layers = need("num_hidden_layers", raw.num_hidden_layers)?;
        // Checked before it sizes the per-layer list below.
        if layers == 0 || layers > crate::config::limits::LAYERS {
            return Err(bad(format!(
                "num_hidden_layers = {layers} is out of range (1 to {})",
                crate::config::limits::LAYERS
            )));
        }
        let moe_layers = match raw.mlp_layer_types {
            Some(types) => {
                if types.len() != layers {
                    return Err(bad(format!(
                        "mlp_layer_types has {} entries for {layers} layers",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sparse" => Ok(true),
                        "dense" => Ok(false),
                        other => Err(bad(format!("unknown mlp layer type `{other}`"))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            // HF's default: dense first layer, MoE after.
            None => (0..layers).map(|l| l > 0).collect(),
        };
        let rope_theta = rope_theta(raw.rope_theta, raw.rope_parameters.as_ref()).unwrap_or(10000.0);
        let scaling = raw
            .rope_parameters
            .as_ref()
            .map_or(Ok(RopeScaling::Default), |p| rope_scaling(path, p))?;
        if scaling != RopeScaling::Default {
            return Err(bad("glm4_moe_lite with scaled RoPE is not supported yet".into()));
        }
        let eos_token_ids = match raw.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
            _ => Vec::new(),
        };
        let config = GlmConfig {
            vocab_size: need("vocab_size", raw.vocab_size)?,
            hidden_size: need("hidden_size", raw.hidden_size)?,
            intermediate_size: need("intermediate_size", raw.intermediate_size)?,
            moe_intermediate_size: need("moe_intermediate_size", raw.moe_intermediate_size)?,
            num_hidden_layers: layers,
            num_attention_heads: need("num_attention_heads", raw.num_attention_heads)?,
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: need("kv_lora_rank", raw.kv_lora_rank)?,
            qk_nope_head_dim: need("qk_nope_head_dim", raw.qk_nope_head_dim)?,
            qk_rope_head_dim: need("qk_rope_head_dim", raw.qk_rope_head_dim)?,
            v_head_dim: need("v_head_dim", raw.v_head_dim)?,
            n_routed_experts: need("n_routed_experts", raw.n_routed_experts)?,
            num_experts_per_tok: need("num_experts_per_tok", raw.num_experts_per_tok)?,
            n_shared_experts: raw.n_shared_experts.unwrap_or(1),
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(true),
            n_group: raw.n_group.unwrap_or(1),
            topk_group: raw.topk_group.unwrap_or(1),
            moe_layers,
            rope_interleave: raw.rope_interleave.unwrap_or(true),
            rope_theta,
            rope_scaling: scaling,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            max_position_embeddings: need("max_position_embeddings", raw.max_position_embeddings)?,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(false),
            eos_token_ids,
        };
        if config.n_group == 0
            || config.n_routed_experts % config.n_group != 0
            || config.topk_group > config.n_group
            || config.num_experts_per_tok > config.n_routed_experts
        {
            return Err(bad(format!(
                "routing: {} experts in {} groups, keeping {} groups and {} experts, is inconsistent",
                config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok
            )));
        }
        use crate::config::limits;
        for (field, value, max) in [
            ("vocab_size", config.vocab_size, limits::VOCAB),
            ("hidden_size", config.hidden_size, limits::WIDTH),
            ("intermediate_size", config.intermediate_size, limits::WIDTH),
            ("moe_intermediate_size", config.moe_intermediate_size, limits::WIDTH),
            ("num_hidden_layers", config.num_hidden_layers, limits::LAYERS),
            ("num_attention_heads", config.num_attention_heads, limits::HEADS),
            ("q_lora_rank", config.q_lora_rank.unwrap_or(1), limits::WIDTH),
            ("kv_lora_rank", config.kv_lora_rank, limits::HEAD_DIM),
            ("qk_nope_head_dim", config.qk_nope_head_dim, limits::HEAD_DIM),
            ("qk_rope_head_dim", config.qk_rope_head_dim, limits::HEAD_DIM),
            ("v_head_dim", config.v_head_dim, limits::HEAD_DIM),
            ("n_routed_experts", config.n_routed_experts, limits::HEADS),
            ("n_shared_experts", config.n_shared_experts, limits::HEADS),
            ("num_experts_per_tok", config.num_experts_per_tok, limits::HEADS),
            ("n_group", config.n_group, limits::HEADS),
            (
                "max_position_embeddings",
                config.max_position_embeddings,
                limits::POSITIONS,
            ),
        ] {
            let may_be_zero = matches!(field, "n_routed_experts" | "n_shared_experts" | "num_experts_per_tok");
            if value == 0 && !may_be_zero || value > max {
                return Err(bad(format!("{field} = {value} is out of range (1 to {max})")));
            }
        }
        if config.qk_rope_head_dim % 2 != 0 {
            return Err(bad(format!(
                "qk_rope_head_dim = {} must be even",
                config.qk_rope_head_dim
            )));
        }
        if !(config.rope_theta.is_finite() && config.rope_theta > 0.0) {
            return Err(bad(format!(
                "rope_theta = {} must be a positive number",
                config.rope_theta
            )));
        }
        if !(config.rms_norm_eps.is_finite() && config.rms_norm_eps >= 0.0) {
            return Err(bad(format!(
                "rms_norm_eps = {} must be a non-negative number",
                config.rms_norm_eps
            )));
        }
        Ok(config)
    }

    /// GLM-4.7-Flash at its real size (the defaults of `Glm4MoeLiteConfig`).
    pub fn glm_4_7_flash() -> Self {
        GlmConfig {
            vocab_size: 154_880,
            hidden_size: 2048,
            intermediate_size: 10_240,
            moe_intermediate_size: 1536,
            num_hidden_layers: 47,
            num_attention_heads: 20,
            q_lora_rank: Some(768),
            kv_lora_rank: 512,
            qk_nope_head_dim: 192,
            qk_rope_head_dim: 64,
            v_head_dim: 256,
            n_routed_experts: 64,
            num_experts_per_tok: 4,
            n_shared_experts: 1,
            routed_scaling_factor: 1.8,
            norm_topk_prob: true,
            n_group: 1,
            topk_group: 1,
            moe_layers: (0..47).map(|l| l > 0).collect(),
            rope_interleave: true,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 202_752,
            tie_word_embeddings: false,
            attention_bias: false,
            eos_token_ids: vec![1],
        }
    }

    fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// The routed experts, the router and the shared expert of one MoE layer.
#[derive(Debug)]
struct Moe {
    router: Vec<f32>,
    correction_bias: Vec<f32>,
    experts: Vec<Mlp>,
    shared: Mlp,
}

impl Moe {
    fn load(w: &dyn WeightSource, prefix: &str, c: &GlmConfig) -> Result<Self> {
        let (h, i, e) = (c.hidden_size, c.moe_intermediate_size, c.n_routed_experts);
        Ok(Moe {
            router: w.get(&format!("{prefix}.gate.weight"), &[e, h])?,
            correction_bias: w.get(&format!("{prefix}.gate.e_score_correction_bias"), &[e])?,
            experts: (0..e)
                .map(|x| Mlp::load(w, &format!("{prefix}.experts.{x}"), h, i))
                .collect::<Result<_>>()?,
            shared: Mlp::load(w, &format!("{prefix}.shared_experts"), h, i * c.n_shared_experts)?,
        })
    }

    /// The experts and weights of one token, as HF routes: sigmoid scores,
    /// the correction bias only for choosing, groups ranked by their two best
    /// experts, top-k within the kept groups, weights from the unbiased scores.
    fn route(&self, x: &[f32], c: &GlmConfig) -> Vec<(usize, f32)> {
        let e = c.n_routed_experts;
        let mut logits = vec![0.0; e];
        cpu::matmul_nt(x, &self.router, &mut logits, 1, c.hidden_size, e).expect("router shape");
        let scores: Vec<f32> = logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
        let mut choice: Vec<f32> = scores.iter().zip(&self.correction_bias).map(|(s, b)| s + b).collect();
        let per_group = e / c.n_group;
        let group_scores: Vec<f32> = choice
            .chunks_exact(per_group)
            .map(|g| cpu::topk_indices(g, 2).iter().map(|&i| g[i as usize]).sum())
            .collect();
        let kept = cpu::topk_indices(&group_scores, c.topk_group);
        for (g, chunk) in choice.chunks_exact_mut(per_group).enumerate() {
            if !kept.contains(&(g as u32)) {
                chunk.fill(f32::NEG_INFINITY);
            }
        }
        let top = cpu::topk_indices(&choice, c.num_experts_per_tok);
        let mut weights: Vec<f32> = top.iter().map(|&i| scores[i as usize]).collect();
        if c.norm_topk_prob {
            let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        top.iter()
            .zip(weights)
            .map(|(&i, w)| (i as usize, w * c.routed_scaling_factor))
            .collect()
    }

    fn forward(&self, x: &[f32], c: &GlmConfig) -> Vec<f32> {
        let h = c.hidden_size;
        let mut out = self.shared.forward(x);
        for (row, out_row) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            for (expert, weight) in self.route(row, c) {
                let y = self.experts[expert].forward(row);
                cpu::axpy(weight, &y, out_row);
            }
        }
        out
    }
}

#[derive(Debug)]
enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

/// Multi-head latent attention.
#[derive(Debug)]
struct MlaAttention {
    /// `q_a_proj`, its norm and `q_b_proj`; or one `q_proj` without LoRA.
    q_a: Option<(Linear, Vec<f32>)>,
    q_b: Linear,
    kv_a: Linear,
    kv_a_norm: Vec<f32>,
    /// `[heads * (nope + v), kv_lora_rank]`: per head, the key rows then the value rows.
    kv_b: Vec<f32>,
    o_proj: Linear,
}

impl MlaAttention {
    fn load(w: &dyn WeightSource, p: &str, c: &GlmConfig) -> Result<Self> {
        let (h, heads, rank) = (c.hidden_size, c.num_attention_heads, c.kv_lora_rank);
        let q_out = heads * c.qk_head_dim();
        let (q_a, q_b) = match c.q_lora_rank {
            Some(r) => (
                Some((
                    Linear::load(w, &format!("{p}.q_a_proj"), h, r, c.attention_bias)?,
                    w.get(&format!("{p}.q_a_layernorm.weight"), &[r])?,
                )),
                Linear::load(w, &format!("{p}.q_b_proj"), r, q_out, false)?,
            ),
            None => (None, Linear::load(w, &format!("{p}.q_proj"), h, q_out, false)?),
        };
        Ok(MlaAttention {
            q_a,
            q_b,
            kv_a: Linear::load(
                w,
                &format!("{p}.kv_a_proj_with_mqa"),
                h,
                rank + c.qk_rope_head_dim,
                c.attention_bias,
            )?,
            kv_a_norm: w.get(&format!("{p}.kv_a_layernorm.weight"), &[rank])?,
            kv_b: w.get(
                &format!("{p}.kv_b_proj.weight"),
                &[heads * (c.qk_nope_head_dim + c.v_head_dim), rank],
            )?,
            o_proj: Linear::load(w, &format!("{p}.o_proj"), heads * c.v_head_dim, h, c.attention_bias)?,
        })
    }

    /// Rotates the rope part of a row in place, in the layout HF uses: with
    /// `rope_interleave` the pairs are (even, odd) channels and the result is
    /// written de-interleaved (evens then odds), otherwise NeoX halves.
    fn rope(rope: &RopeTable, x: &mut [f32], positions: &[usize], width: usize, interleave: bool) -> Result<()> {
        if interleave {
            let mut tmp = vec![0.0; width];
            for row in x.chunks_exact_mut(width) {
                for i in 0..width / 2 {
                    tmp[i] = row[2 * i];
                    tmp[width / 2 + i] = row[2 * i + 1];
                }
                row.copy_from_slice(&tmp);
            }
        }
        Ok(rope.apply(x, width, positions, RopeStyle::Neox)?)
    }

    /// Absorbed queries `[n, heads, rank + rope]` and cache rows `[n, rank + rope]`.
    fn project(&self, x: &[f32], positions: &[usize], rope: &RopeTable, c: &GlmConfig) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = positions.len();
        let (heads, nope, rd, rank, v) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.kv_lora_rank,
            c.v_head_dim,
        );
        let q = match &self.q_a {
            Some((a, norm)) => {
                let mut qa = a.forward(x);
                cpu::rms_norm(&mut qa, norm, LORA_NORM_EPS)?;
                self.q_b.forward(&qa)
            }
            None => self.q_b.forward(x),
        };
        let ckv = self.kv_a.forward(x);
        let mut keys = vec![0.0; n * (rank + rd)];
        let mut k_rot = vec![0.0; n * rd];
        for t in 0..n {
            let src = &ckv[t * (rank + rd)..(t + 1) * (rank + rd)];
            keys[t * (rank + rd)..t * (rank + rd) + rank].copy_from_slice(&src[..rank]);
            cpu::rms_norm(
                &mut keys[t * (rank + rd)..t * (rank + rd) + rank],
                &self.kv_a_norm,
                LORA_NORM_EPS,
            )?;
            k_rot[t * rd..(t + 1) * rd].copy_from_slice(&src[rank..]);
        }
        Self::rope(rope, &mut k_rot, positions, rd, c.rope_interleave)?;
        let mut q_rot = vec![0.0; n * heads * rd];
        let mut q_nope = vec![0.0; heads * n * nope]; // [heads, n, nope]
        let qd = c.qk_head_dim();
        for t in 0..n {
            for h in 0..heads {
                let row = &q[(t * heads + h) * qd..(t * heads + h + 1) * qd];
                q_nope[(h * n + t) * nope..(h * n + t + 1) * nope].copy_from_slice(&row[..nope]);
                q_rot[(t * heads + h) * rd..(t * heads + h + 1) * rd].copy_from_slice(&row[nope..]);
            }
        }
        Self::rope(rope, &mut q_rot, positions, rd, c.rope_interleave)?;
        let mut absorbed = vec![0.0; n * heads * (rank + rd)];
        let mut lat = vec![0.0; n * rank];
        for h in 0..heads {
            let w_uk = &self.kv_b[h * (nope + v) * rank..(h * (nope + v) + nope) * rank];
            cpu::matmul(&q_nope[h * n * nope..(h + 1) * n * nope], w_uk, &mut lat, n, nope, rank)?;
            for t in 0..n {
                let dst = &mut absorbed[(t * heads + h) * (rank + rd)..(t * heads + h + 1) * (rank + rd)];
                dst[..rank].copy_from_slice(&lat[t * rank..(t + 1) * rank]);
                dst[rank..].copy_from_slice(&q_rot[(t * heads + h) * rd..(t * heads + h + 1) * rd]);
            }
        }
        for t in 0..n {
            keys[t * (rank + rd) + rank..(t + 1) * (rank + rd)].copy_from_slice(&k_rot[t * rd..(t + 1) * rd]);
        }
        Ok((absorbed, keys))
    }

    /// From per-head latent outputs `[n, heads, rank]` to `[n, hidden]`.
    fn output(&self, latent: &[f32], c: &GlmConfig) -> Vec<f32> {
        let (heads, nope, rank, v) = (c.num_attention_heads, c.qk_nope_head_dim, c.kv_lora_rank, c.v_head_dim);
        let n = latent.len() / (heads * rank);
        let mut per_head = vec![0.0; n * rank];
        let mut vh = vec![0.0; n * v];
        let mut values = vec![0.0; n * heads * v];
        for h in 0..heads {
            for t in 0..n {
                per_head[t * rank..(t + 1) * rank]
                    .copy_from_slice(&latent[(t * heads + h) * rank..(t * heads + h + 1) * rank]);
            }
            let w_uv = &self.kv_b[(h * (nope + v) + nope) * rank..(h + 1) * (nope + v) * rank];
            cpu::matmul_nt(&per_head, w_uv, &mut vh, n, rank, v).expect("shapes from the config");
            for t in 0..n {
                values[(t * heads + h) * v..(t * heads + h + 1) * v].copy_from_slice(&vh[t * v..(t + 1) * v]);
            }
        }
        self.o_proj.forward(&values)
    }
}

#[derive(Debug)]
pub(crate) struct GlmLayer {
    input_layernorm: Vec<f32>,
    self_attn: MlaAttention,
    post_attention_layernorm: Vec<f32>,
    mlp: FeedForward,
    config: Arc<GlmConfig>,
    rope: Arc<RopeTable>,
    shape: AttnShape,
}

impl GlmLayer {
    /// `x += o_proj(attn)`, then `x += mlp(norm(x))`.
    fn residual_mlp(&self, x: &mut [f32], attn: &[f32]) -> Result<()> {
        let c = &*self.config;
        add_residual(x, &self.self_attn.output(attn, c));
        let mut normed = x.to_vec();
        cpu::rms_norm(&mut normed, &self.post_attention_layernorm, c.rms_norm_eps as f32)?;
        let m = match &self.mlp {
            FeedForward::Dense(mlp) => mlp.forward(&normed),
            FeedForward::Moe(moe) => moe.forward(&normed, c),
        };
        add_residual(x, &m);
        Ok(())
    }
}

/// GLM's layers compute on host slices (the MLA projections and the MoE
/// have no GPU path yet); the attention goes through the backend like every
/// family's.
impl Layer for GlmLayer {
    fn forward(
        &self,
        x: Tensor,
        step: &Step,
        layer: usize,
        backend: &mut dyn AttentionBackend,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let c = &*self.config;
        if x.is_cuda() {
            return Err(ModelError::Unsupported("GLM-4.7-Flash on the GPU".into()));
        }
        let n = step.tokens();
        let mut h = x.as_slice::<f32>()?.to_vec();
        let mut normed = h.clone();
        cpu::rms_norm(&mut normed, &self.input_layernorm, c.rms_norm_eps as f32)?;
        let (q, keys) = self.self_attn.project(&normed, &step.positions, &self.rope, c)?;
        let width = c.kv_lora_rank + c.qk_rope_head_dim;
        let keys = Tensor::from_vec(keys, &[n, width])?;
        let no_values = Tensor::from_vec(Vec::<f32>::new(), &[n, 0])?;
        backend.write_kv(step, layer, &keys, &no_values).map_err(attn_err)?;
        let q = Tensor::from_vec(q, &[n, self.shape.q_heads * self.shape.key_dim])?;
        let out = backend
            .attend(step, layer, &q, &self.shape, &plan.for_layer(layer))
            .map_err(attn_err)?;
        self.residual_mlp(&mut h, out.as_slice::<f32>()?)?;
        Ok(Tensor::from_vec(h, &[n, c.hidden_size])?)
    }
}

/// GLM-4.7-Flash as a causal language model over a latent KV cache.
#[derive(Debug)]
pub struct GlmModel {
    config: Arc<GlmConfig>,
    io: TokenIo,
    layers: Vec<GlmLayer>,
    rope: Arc<RopeTable>,
}

impl GlmModel {
    pub fn load(config: GlmConfig, w: &dyn WeightSource) -> Result<Self> {
        crate::weights::check_layer_count(w, config.num_hidden_layers)?;
        let config = Arc::new(config);
        let c = &*config;
        let h = c.hidden_size;
        let (inv, factor) = rope_inv_freq(&c.rope_scaling, c.qk_rope_head_dim, c.rope_theta);
        let rope = Arc::new(
            RopeTable::from_inv_freq(c.qk_rope_head_dim, &inv, c.max_position_embeddings.min(1 << 20))?
                .with_attention_scale(factor),
        );
        let shape = AttnShape::mla(
            c.num_attention_heads,
            c.kv_lora_rank,
            c.qk_rope_head_dim,
            1.0 / (c.qk_head_dim() as f32).sqrt(),
        );
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(GlmLayer {
                    input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                    self_attn: MlaAttention::load(w, &format!("{p}.self_attn"), c)?,
                    post_attention_layernorm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    mlp: if c.moe_layers[l] {
                        FeedForward::Moe(Moe::load(w, &format!("{p}.mlp"), c)?)
                    } else {
                        FeedForward::Dense(Mlp::load(w, &format!("{p}.mlp"), h, c.intermediate_size)?)
                    },
                    config: config.clone(),
                    rope: rope.clone(),
                    shape,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let io = TokenIo::load(
            w,
            c.vocab_size,
            h,
            c.rms_norm_eps as f32,
            c.tie_word_embeddings,
            &Device::Cpu,
        )?;
        Ok(GlmModel {
            io,
            layers,
            rope,
            config,
        })
    }

    pub fn config(&self) -> &GlmConfig {
        &self.config
    }

    pub fn attention_shape(&self) -> AttnShape {
        self.layers[0].shape
    }

    pub fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> CacheConfig {
        let c = &self.config;
        CacheConfig {
            kv_dtype,
            ..CacheConfig::mla(c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim, num_blocks)
        }
    }

    /// A host cache holding only the latent and the rope key per token. Label
    /// channels default to the rope key plus the leading latent channels.
    pub fn new_cache(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<PagedKvCache<HostKvStorage>> {
        Ok(PagedKvCache::new(self.host_storage(num_blocks, kv_dtype)?)?)
    }

    /// The host storage [`new_cache`](Self::new_cache) wraps.
    pub fn host_storage(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<HostKvStorage> {
        let config = self.cache_config(num_blocks, kv_dtype);
        let rank = self.config.kv_lora_rank;
        let rope: Vec<u16> = (rank..config.key_dim).map(|c| c as u16).collect();
        let mut head: Vec<u16> = (0..(config.label_channels - rope.len().min(config.label_channels)) as u16).collect();
        head.extend(rope.iter().take(config.label_channels - head.len()));
        head.sort_unstable();
        let channels = LabelChannels::new(vec![vec![head]; config.num_layers]);
        Ok(HostKvStorage::new(&config, channels)?)
    }

    /// Positions the model can attend over (the RoPE table bounds them too).
    fn position_limit(&self) -> usize {
        self.config.max_position_embeddings.min(self.rope.max_positions())
    }

    /// The host reference backend (GLM has no GPU path yet), optionally
    /// behind the offload engine.
    pub fn new_backend(
        &self,
        num_blocks: usize,
        kv_dtype: KvDType,
        resident_slots: Option<usize>,
    ) -> Result<Box<dyn AttentionBackend>> {
        let host = self.host_storage(num_blocks, kv_dtype)?;
        Ok(Box::new(CpuAttention::new(PagedKvCache::new(KvStore::new(
            host,
            resident_slots,
        ))?)))
    }

    pub(crate) fn decoder(&self) -> Decoder<'_, GlmLayer> {
        Decoder {
            io: &self.io,
            layers: &self.layers,
            max_positions: self.position_limit(),
        }
    }
}

/// Reads a `glm4_moe_lite` config.json.
pub fn read_glm_config(path: &Path) -> Result<GlmConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, "cannot read config", e))?;
    GlmConfig::from_json(path, &text)
}
