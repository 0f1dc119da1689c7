//! GLM-4.7-Flash (`glm4_moe_lite`), top-down: config, MoE (router,
//! experts, shared expert), RoPE layout, MLA attention, decoder layer,
//! model. One forward on tensor ops for the CPU and the GPU.
//!
//! Attention runs in the absorbed form: the cache holds per token only the
//! normalized latent (`kv_lora_rank`) and the rotated rope key
//! (`qk_rope_head_dim`); each head's query is folded through its slice of
//! `kv_b_proj` into that latent space, attention runs over the one shared
//! latent "head", and the value up-projection is applied to its output.

use std::path::Path;
use std::sync::Arc;

use asynctls_attn::{AttentionBackend, AttentionPlan, AttnShape, Step};
use asynctls_kernels::cpu::moe::RouteConfig;
use asynctls_kernels::cpu::RopeTable;
use asynctls_kernels::moe::{self, ExpertBank};
use asynctls_kernels::ops::{self, Rope};
use asynctls_kernels::{Device, Tensor};
use asynctls_kvcache::{CacheConfig, HostKvStorage, KvDType, LabelChannels, PagedKvCache};
use serde::Deserialize;

use crate::config::{rope_inv_freq, rope_scaling, rope_theta, RopeScaling};
use crate::decoder::{attn_err, stack_vectors, Decoder, Layer, Linear, Mlp, TokenIo};
use crate::error::io_err;
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

/// The router of a MoE layer as the kernels take it.
fn route_config(c: &GlmConfig) -> RouteConfig {
    RouteConfig {
        experts: c.n_routed_experts,
        groups: c.n_group,
        top_groups: c.topk_group,
        top_k: c.num_experts_per_tok,
        normalize: c.norm_topk_prob,
        scaling: c.routed_scaling_factor,
    }
}

/// When on, each MoE layer records how many distinct experts a forward
/// touched (reading the routing back to the host, so only for eager steps:
/// what the benchmarks' bytes floor counts).
#[derive(Debug, Default)]
pub(crate) struct ExpertTrace {
    on: std::sync::atomic::AtomicBool,
    touched: std::sync::Mutex<Vec<usize>>,
}

/// The routed experts, the router and the shared expert of one MoE layer.
#[derive(Debug)]
struct Moe {
    trace: Arc<ExpertTrace>,
    /// `[experts, hidden]` (bf16 on a GPU, exact for bf16 checkpoints: the
    /// logits are still f32 products, as HF computes them).
    router: Tensor,
    correction_bias: Tensor,
    experts: ExpertBank,
    shared: Mlp,
    route: RouteConfig,
}

impl Moe {
    fn load(
        w: &dyn WeightSource,
        prefix: &str,
        c: &GlmConfig,
        device: &Device,
        trace: &Arc<ExpertTrace>,
    ) -> Result<Self> {
        let (h, i, e) = (c.hidden_size, c.moe_intermediate_size, c.n_routed_experts);
        let expert = |x: usize, name: &str, shape: &[usize]| {
            w.matrix(&format!("{prefix}.experts.{x}.{name}.weight"), shape, device)
        };
        let (mut gate, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new());
        for x in 0..e {
            gate.push(expert(x, "gate_proj", &[i, h])?);
            up.push(expert(x, "up_proj", &[i, h])?);
            down.push(expert(x, "down_proj", &[h, i])?);
        }
        Ok(Moe {
            trace: trace.clone(),
            router: w.matrix(&format!("{prefix}.gate.weight"), &[e, h], device)?,
            correction_bias: w.vector(&format!("{prefix}.gate.e_score_correction_bias"), &[e], device)?,
            experts: ExpertBank::new(gate, up, down)?,
            shared: Mlp::load(
                w,
                &format!("{prefix}.shared_experts"),
                h,
                i * c.n_shared_experts,
                device,
            )?,
            route: route_config(c),
        })
    }

    /// `x += shared(normed) + the routed experts of each token` (routed as
    /// HF does: see [`asynctls_kernels::cpu::moe::route`]), on the device.
    fn forward_into(&self, normed: &Tensor, x: &mut Tensor) -> Result<()> {
        let (ids, weights) = moe::moe_route(normed, &self.router, &self.correction_bias, &self.route)?;
        if self.trace.on.load(std::sync::atomic::Ordering::Relaxed) {
            let mut chosen = ids.to_vec::<u32>()?;
            chosen.sort_unstable();
            chosen.dedup();
            self.trace
                .touched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(chosen.len());
        }
        let xb = ops::gemm_input(normed)?;
        let shared = self.shared.forward(&xb)?;
        moe::moe_experts(&xb, &self.experts, &ids, &weights, &shared, x)?;
        Ok(())
    }
}

// One per layer, so the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

/// The output order of a rope block's rows: with `rope_interleave` HF
/// rotates (even, odd) channel pairs and writes the result de-interleaved
/// (evens then odds), which is NeoX rotation of the de-interleaved
/// channels; reordering the projection's rows that way at load makes the
/// rotation a plain NeoX RoPE.
fn rope_rows(first: usize, width: usize, interleave: bool) -> impl Iterator<Item = u32> {
    (0..width).map(move |i| {
        let c = if interleave {
            if i < width / 2 {
                2 * i
            } else {
                2 * (i - width / 2) + 1
            }
        } else {
            i
        };
        (first + c) as u32
    })
}

/// `t`'s rows in the order `rows` (on `t`'s device).
fn reorder_rows(t: &Tensor, rows: Vec<u32>) -> Result<Tensor> {
    let n = rows.len();
    let idx = Tensor::from_vec(rows, &[n])?.to_device(&t.device())?;
    Ok(ops::gather_rows(t, &idx)?)
}

/// Multi-head latent attention, in the absorbed form.
#[derive(Debug)]
struct MlaAttention {
    /// The down projections of one input stacked into one layer: the rows
    /// of `q_a_proj` (`q_rank` of them, none without q LoRA), then
    /// `kv_a_proj_with_mqa`'s latent and rope-key rows (NeoX order).
    down: Linear,
    q_rank: usize,
    /// `q_a_proj`'s norm (`None` without q LoRA: `q_proj` reads the input).
    q_a_norm: Option<Tensor>,
    /// `q_b_proj` (or `q_proj`) split into the no-rope rows of every head
    /// and their rope rows (in NeoX order), views of one reordered weight.
    q_nope: Linear,
    q_rope: Linear,
    /// Both, as one layer over the whole reordered weight (no copy): a
    /// one-token step reads them in one GEMV, its row's columns split by view.
    q_up: Linear,
    kv_a_norm: Tensor,
    /// `kv_b_proj` as the per-head key absorption `[heads, nope, rank]` and
    /// value up-projection `[heads, v, rank]`.
    w_uk: Tensor,
    w_uv: Tensor,
    o_proj: Linear,
    rope: Rope,
}

impl MlaAttention {
    fn load(w: &dyn WeightSource, p: &str, c: &GlmConfig, rope: &Rope, device: &Device) -> Result<Self> {
        let (h, heads, rank) = (c.hidden_size, c.num_attention_heads, c.kv_lora_rank);
        let (nope, rd, v) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim);
        let qd = c.qk_head_dim();
        let (q_rank, q_in, q_name) = match c.q_lora_rank {
            Some(r) => (r, r, "q_b_proj"),
            None => (0, h, "q_proj"),
        };
        // Every head's no-rope rows, then every head's rope rows.
        let q_w = w.matrix(&format!("{p}.{q_name}.weight"), &[heads * qd, q_in], device)?;
        let mut order: Vec<u32> = (0..heads)
            .flat_map(|hd| (hd * qd..hd * qd + nope).map(|r| r as u32))
            .collect();
        order.extend((0..heads).flat_map(|hd| rope_rows(hd * qd + nope, rd, c.rope_interleave)));
        let q_w = reorder_rows(&q_w, order)?;
        let kv_name = format!("{p}.kv_a_proj_with_mqa");
        let kv_w = w.matrix(&format!("{kv_name}.weight"), &[rank + rd, h], device)?;
        let kv_order: Vec<u32> = (0..rank as u32).chain(rope_rows(rank, rd, c.rope_interleave)).collect();
        let kv_w = reorder_rows(&kv_w, kv_order.clone())?;
        // q_a's rows (when q LoRA) stacked above kv_a's: one GEMV a step.
        let (mut down_w, mut down_b) = (vec![], vec![]);
        if q_rank > 0 {
            down_w.push(w.matrix(&format!("{p}.q_a_proj.weight"), &[q_rank, h], device)?);
            if c.attention_bias {
                down_b.push(w.vector(&format!("{p}.q_a_proj.bias"), &[q_rank], device)?);
            }
        }
        down_w.push(kv_w);
        if c.attention_bias {
            let b = w
                .vector(&format!("{kv_name}.bias"), &[rank + rd], device)?
                .reshaped(&[rank + rd, 1])?;
            down_b.push(reorder_rows(&b, kv_order)?.reshaped(&[rank + rd])?);
        }
        let down_w = ops::stack_rows(&down_w.iter().collect::<Vec<_>>())?;
        let down_b = match c.attention_bias {
            true => Some(stack_vectors(&down_b.iter().collect::<Vec<_>>())?),
            false => None,
        };
        // Per head: `nope` key rows then `v` value rows of the latent.
        let kv_b = w.matrix(&format!("{p}.kv_b_proj.weight"), &[heads * (nope + v), rank], device)?;
        let mut b_order: Vec<u32> = (0..heads)
            .flat_map(|hd| (hd * (nope + v)..hd * (nope + v) + nope).map(|r| r as u32))
            .collect();
        b_order.extend((0..heads).flat_map(|hd| (hd * (nope + v) + nope..(hd + 1) * (nope + v)).map(|r| r as u32)));
        let kv_b = reorder_rows(&kv_b, b_order)?;
        Ok(MlaAttention {
            down: Linear::new(down_w, down_b),
            q_rank,
            q_a_norm: match q_rank {
                0 => None,
                r => Some(w.vector(&format!("{p}.q_a_layernorm.weight"), &[r], device)?),
            },
            q_nope: Linear::new(q_w.narrow_rows(0, heads * nope)?, None),
            q_rope: Linear::new(q_w.narrow_rows(heads * nope, heads * rd)?, None),
            q_up: Linear::new(q_w, None),
            kv_a_norm: w.vector(&format!("{p}.kv_a_layernorm.weight"), &[rank], device)?,
            w_uk: kv_b.narrow_rows(0, heads * nope)?.reshaped(&[heads, nope, rank])?,
            w_uv: kv_b.narrow_rows(heads * nope, heads * v)?.reshaped(&[heads, v, rank])?,
            o_proj: Linear::load(w, &format!("{p}.o_proj"), heads * v, h, c.attention_bias, device)?,
            rope: rope.clone(),
        })
    }

    /// Absorbed queries `[n, heads * (rank + rope)]` (per head the query
    /// folded through `W_uk` into the latent, then its rotated rope part)
    /// and cache rows `[n, rank + rope]` (the normed latent, the rotated
    /// rope key) of the normed hidden states `x`.
    fn project(&self, x: &Tensor, step: &Step, c: &GlmConfig) -> Result<(Tensor, Tensor)> {
        let n = x.rows();
        let (heads, nope, rd, rank) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.kv_lora_rank,
        );
        let positions = &step.positions_tensor;
        // `x` is already a GEMM input (bf16 on a GPU) when the layer's norm wrote it.
        let xb = ops::gemm_input(x)?;
        // q_a and kv_a in one GEMV, their norms and the key's rotation in one launch.
        let down = self.down.forward(&xb)?;
        let (q_in, keys) = ops::mla_down_heads(
            &down,
            (self.q_rank, rank, rd),
            self.q_a_norm.as_ref(),
            &self.kv_a_norm,
            LORA_NORM_EPS,
            &self.rope,
            positions,
        )?;
        let q_in = q_in.unwrap_or(xb);
        let (q_nope, q_rope) = if n == 1 {
            // One row: its no-rope and rope columns are contiguous windows.
            let both = self.q_up.forward(&q_in)?.reshaped(&[heads * (nope + rd), 1])?;
            (
                both.narrow_rows(0, heads * nope)?.reshaped(&[1, heads, nope])?,
                both.narrow_rows(heads * nope, heads * rd)?.reshaped(&[1, heads, rd])?,
            )
        } else {
            (
                self.q_nope.forward(&q_in)?.reshaped(&[n, heads, nope])?,
                self.q_rope.forward(&q_in)?.reshaped(&[n, heads, rd])?,
            )
        };
        let q_latent = ops::head_matmul(&q_nope, &self.w_uk, false)?.reshaped(&[n * heads, rank])?;
        // Rotated and appended in one launch on a GPU.
        let q = ops::rope_concat(&q_latent, &q_rope, &self.rope, positions)?.reshaped(&[n, heads * (rank + rd)])?;
        Ok((q, keys))
    }

    /// `x +=` the output projection of per-head latent outputs `[n, heads *
    /// rank]` (`[n, hidden]`).
    fn add_output(&self, latent: &Tensor, c: &GlmConfig, x: &mut Tensor) -> Result<()> {
        let (n, heads) = (latent.rows(), c.num_attention_heads);
        let latent = latent.reshape(&[n, heads, c.kv_lora_rank])?;
        let values = ops::head_matmul(&latent, &self.w_uv, true)?.reshaped(&[n, heads * c.v_head_dim])?;
        self.o_proj.forward_add(&values, x)
    }
}

#[derive(Debug)]
pub(crate) struct GlmLayer {
    input_layernorm: Tensor,
    self_attn: MlaAttention,
    post_attention_layernorm: Tensor,
    mlp: FeedForward,
    config: Arc<GlmConfig>,
    shape: AttnShape,
}

impl Layer for GlmLayer {
    fn forward(
        &self,
        mut x: Tensor,
        step: &Step,
        layer: usize,
        backend: &mut dyn AttentionBackend,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let c = &*self.config;
        let eps = c.rms_norm_eps as f32;
        let n = step.tokens();
        // The norm writes the projections' GEMM input (bf16 on a GPU) itself.
        let normed = ops::rms_norm_gemm_input(&x, &self.input_layernorm, eps)?;
        let (q, keys) = self.self_attn.project(&normed, step, c)?;
        // The latent cache has no separate values (they are the latent).
        let no_values = Tensor::from_vec(Vec::<f32>::new(), &[n, 0])?;
        backend.write_step(step, layer, &keys, &no_values).map_err(attn_err)?;
        let out = backend
            .attend_step(step, layer, &q, &self.shape, &plan.for_layer(layer))
            .map_err(attn_err)?;
        self.self_attn.add_output(&out, c, &mut x)?;
        match &self.mlp {
            FeedForward::Dense(mlp) => {
                let normed = ops::rms_norm_gemm_input(&x, &self.post_attention_layernorm, eps)?;
                mlp.forward_add(&normed, &mut x)?
            }
            // The router reads the norm in f32 (its choice must be HF's).
            FeedForward::Moe(moe) => {
                let normed = ops::rms_norm(&x, &self.post_attention_layernorm, eps)?;
                moe.forward_into(&normed, &mut x)?
            }
        }
        Ok(x)
    }
}

/// GLM-4.7-Flash as a causal language model over a latent KV cache, on one device.
#[derive(Debug)]
pub struct GlmModel {
    config: Arc<GlmConfig>,
    io: TokenIo,
    layers: Vec<GlmLayer>,
    trace: Arc<ExpertTrace>,
    rope_positions: usize,
    device: Device,
    /// Calibrated label channels, when given (else the defaults).
    calibrated: Option<LabelChannels>,
}

impl GlmModel {
    /// Loads every weight the config implies onto the CPU.
    pub fn load(config: GlmConfig, w: &dyn WeightSource) -> Result<Self> {
        Self::load_on(config, w, &Device::Cpu)
    }

    /// Loads the model onto `device` (bf16 matrices on a GPU; the router
    /// and the norms stay f32); refused before any weight is allocated when
    /// the GPU's free memory cannot hold them.
    pub fn load_on(config: GlmConfig, w: &dyn WeightSource, device: &Device) -> Result<Self> {
        crate::weights::check_layer_count(w, config.num_hidden_layers)?;
        if device.is_cuda() {
            // Refused before any weight is allocated rather than at the first
            // prompt: the shapes the GPU kernels are built for.
            check_gpu_shapes(&config)?;
        }
        // Plus the transient of stacking a layer's gate and up weights (parts
        // and stacked copy at once): the widest stacked MLP, the dense
        // layers' or the shared experts'.
        let dense_width = match config.moe_layers.iter().all(|&moe| moe) {
            true => 0,
            false => config.intermediate_size,
        };
        let shared_width = config.moe_intermediate_size.saturating_mul(config.n_shared_experts);
        let stacking = config
            .hidden_size
            .saturating_mul(dense_width.max(shared_width))
            .saturating_mul(2 * 2);
        crate::model::check_weights_fit(device, config.weight_bytes(2).saturating_add(stacking))?;
        let config = Arc::new(config);
        let c = &*config;
        let h = c.hidden_size;
        let (inv, factor) = rope_inv_freq(&c.rope_scaling, c.qk_rope_head_dim, c.rope_theta);
        let table = RopeTable::from_inv_freq(c.qk_rope_head_dim, &inv, c.max_position_embeddings.min(1 << 20))?
            .with_attention_scale(factor);
        let rope_positions = table.max_positions();
        let rope = Rope::new(table, device)?;
        let shape = AttnShape::mla(
            c.num_attention_heads,
            c.kv_lora_rank,
            c.qk_rope_head_dim,
            1.0 / (c.qk_head_dim() as f32).sqrt(),
        );
        let trace = Arc::new(ExpertTrace::default());
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(GlmLayer {
                    input_layernorm: w.vector(&format!("{p}.input_layernorm.weight"), &[h], device)?,
                    self_attn: MlaAttention::load(w, &format!("{p}.self_attn"), c, &rope, device)?,
                    post_attention_layernorm: w.vector(
                        &format!("{p}.post_attention_layernorm.weight"),
                        &[h],
                        device,
                    )?,
                    mlp: if c.moe_layers[l] {
                        FeedForward::Moe(Moe::load(w, &format!("{p}.mlp"), c, device, &trace)?)
                    } else {
                        FeedForward::Dense(Mlp::load(w, &format!("{p}.mlp"), h, c.intermediate_size, device)?)
                    },
                    config: config.clone(),
                    shape,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let io = TokenIo::load(w, c.vocab_size, h, c.rms_norm_eps as f32, c.tie_word_embeddings, device)?;
        Ok(GlmModel {
            io,
            layers,
            trace,
            rope_positions,
            config,
            device: device.clone(),
            calibrated: None,
        })
    }

    pub fn config(&self) -> &GlmConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
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

    /// The label channels: calibrated ones when set, else the rope key plus
    /// the leading latent channels.
    pub fn label_channels(&self, config: &CacheConfig) -> LabelChannels {
        if let Some(c) = &self.calibrated {
            return c.clone();
        }
        let rank = self.config.kv_lora_rank;
        let rope: Vec<u16> = (rank..config.key_dim).map(|c| c as u16).collect();
        let mut head: Vec<u16> = (0..(config.label_channels - rope.len().min(config.label_channels)) as u16).collect();
        head.extend(rope.iter().take(config.label_channels - head.len()));
        head.sort_unstable();
        LabelChannels::new(vec![vec![head]; config.num_layers])
    }

    /// Uses `channels` (checked against the cache by
    /// [`crate::read_label_channels`]) instead of the default label channels.
    pub fn set_label_channels(&mut self, channels: LabelChannels) {
        self.calibrated = Some(channels);
    }

    /// A host cache holding only the latent and the rope key per token.
    pub fn new_cache(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<PagedKvCache<HostKvStorage>> {
        Ok(PagedKvCache::new(self.host_storage(num_blocks, kv_dtype)?)?)
    }

    /// The host storage [`new_cache`](Self::new_cache) wraps.
    pub fn host_storage(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<HostKvStorage> {
        let config = self.cache_config(num_blocks, kv_dtype);
        Ok(HostKvStorage::new(&config, self.label_channels(&config))?)
    }

    /// Positions the model can attend over (the RoPE table bounds them too).
    fn position_limit(&self) -> usize {
        self.config.max_position_embeddings.min(self.rope_positions)
    }

    /// The attention backend of the model's device: the host reference
    /// (optionally behind the offload engine) on the CPU, the GPU-resident
    /// latent cache and the MLA kernels on a GPU (bf16 there).
    pub fn new_backend(
        &self,
        num_blocks: usize,
        kv_dtype: KvDType,
        offload: Option<asynctls_attn::OffloadOptions>,
    ) -> Result<Box<dyn AttentionBackend>> {
        crate::model::backend_on(
            &self.device,
            num_blocks,
            kv_dtype,
            offload,
            &|n, d| self.cache_config(n, d),
            &|c| self.label_channels(c),
        )
    }

    /// Bytes of the weights a decode step of one token reads: every matrix
    /// but the routed experts, plus the `num_experts_per_tok` experts it
    /// uses per MoE layer, at `elem` bytes per value (the router in f32).
    pub fn weight_bytes_per_token(&self, elem: usize) -> usize {
        self.config.weight_bytes_touched(elem, self.config.num_experts_per_tok)
    }

    /// Starts (`true`) or stops recording the experts each MoE forward touches.
    pub fn trace_experts(&self, on: bool) {
        self.trace.on.store(on, std::sync::atomic::Ordering::Relaxed);
        self.trace.touched.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Bytes of the weights the forwards recorded since [`trace_experts`]
    /// read, per forward: every matrix but the routed experts, plus the
    /// distinct experts each MoE layer touched (averaged over the forwards
    /// recorded); `None` when none was.
    ///
    /// [`trace_experts`]: Self::trace_experts
    pub fn traced_weight_bytes(&self, elem: usize) -> Option<usize> {
        let touched = self.trace.touched.lock().unwrap_or_else(|e| e.into_inner());
        let moe_layers = self.config.moe_layers.iter().filter(|&&m| m).count();
        if touched.is_empty() || moe_layers == 0 {
            return None;
        }
        let forwards = touched.len() as f64 / moe_layers as f64;
        let experts_per_layer = touched.iter().sum::<usize>() as f64 / forwards / moe_layers as f64;
        let c = &self.config;
        let base = c.weight_bytes_touched(elem, 0);
        let expert = 3 * c.hidden_size * c.moe_intermediate_size * elem;
        Some(base + (experts_per_layer * (expert * moe_layers) as f64) as usize)
    }

    pub(crate) fn decoder(&self) -> Decoder<'_, GlmLayer> {
        Decoder {
            io: &self.io,
            layers: &self.layers,
            max_positions: self.position_limit(),
        }
    }
}

impl GlmConfig {
    /// Bytes of every weight at `elem` bytes per matrix value (norms and
    /// the router in f32): what the model holds on a device.
    pub fn weight_bytes(&self, elem: usize) -> usize {
        let embed = self.vocab_size.saturating_mul(self.hidden_size).saturating_mul(elem);
        self.weight_bytes_touched(elem, self.n_routed_experts)
            .saturating_add(embed)
    }

    /// The matrices a decode step reads when it touches `experts` routed
    /// experts per MoE layer: every layer's attention and MLP (the shared
    /// expert and those experts), the routers and the LM head (not the
    /// embedding table, of which a step reads a row per token).
    pub fn weight_bytes_touched(&self, elem: usize, experts: usize) -> usize {
        // Saturating: the sizes come from a config file and only size a check.
        let m = |a: usize, b: usize| a.saturating_mul(b);
        let c = self;
        let (h, heads, rank, rd) = (c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim);
        let q = match c.q_lora_rank {
            Some(r) => m(h, r).saturating_add(m(r, m(heads, c.qk_head_dim()))),
            None => m(h, m(heads, c.qk_head_dim())),
        };
        let attn = q
            .saturating_add(m(h, rank + rd))
            .saturating_add(m(m(heads, c.qk_nope_head_dim + c.v_head_dim), rank))
            .saturating_add(m(m(heads, c.v_head_dim), h));
        let expert = m(3, m(h, c.moe_intermediate_size));
        let moe = m(expert, experts.saturating_add(c.n_shared_experts));
        let dense = m(3, m(h, c.intermediate_size));
        let mut total = m(c.vocab_size, h);
        for &is_moe in &c.moe_layers {
            let mlp = if is_moe { moe } else { dense };
            total = total.saturating_add(attn).saturating_add(mlp);
        }
        let router = m(m(c.n_routed_experts, h), 4) / elem.max(1);
        let routers = m(router, c.moe_layers.iter().filter(|&&x| x).count());
        m(total.saturating_add(routers), elem)
    }
}

/// The GLM shapes the GPU kernels take: the MLA decode and prefill kernels'
/// latent (512 + 64) and head counts, the router's expert count, and widths
/// the 16-byte loads of the expert and router kernels divide.
fn check_gpu_shapes(c: &GlmConfig) -> Result<()> {
    use asynctls_kernels::cuda::attention::{MLA_HEADS, MLA_KEY_DIM, MLA_VALUE_DIM};
    use asynctls_kernels::cuda::moe::ROUTE_MAX_EXPERTS;
    let mut wrong = Vec::new();
    if c.kv_lora_rank + c.qk_rope_head_dim != MLA_KEY_DIM || c.kv_lora_rank != MLA_VALUE_DIM {
        wrong.push(format!(
            "kv_lora_rank {} + qk_rope_head_dim {} (the MLA kernels take {MLA_VALUE_DIM} + {})",
            c.kv_lora_rank,
            c.qk_rope_head_dim,
            MLA_KEY_DIM - MLA_VALUE_DIM
        ));
    }
    if !MLA_HEADS.contains(&c.num_attention_heads) {
        wrong.push(format!(
            "num_attention_heads {} (the MLA kernels take {MLA_HEADS:?})",
            c.num_attention_heads
        ));
    }
    if c.n_routed_experts > ROUTE_MAX_EXPERTS {
        wrong.push(format!(
            "n_routed_experts {} (the router kernel takes up to {ROUTE_MAX_EXPERTS})",
            c.n_routed_experts
        ));
    }
    if c.hidden_size % 8 != 0 || c.moe_intermediate_size % 8 != 0 {
        wrong.push(format!(
            "hidden_size {} / moe_intermediate_size {} (multiples of 8 on the GPU)",
            c.hidden_size, c.moe_intermediate_size
        ));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(ModelError::Unsupported(format!(
            "this GLM on the GPU: {}; use --device cpu",
            wrong.join(", ")
        )))
    }
}

/// Reads a `glm4_moe_lite` config.json.
pub fn read_glm_config(path: &Path) -> Result<GlmConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, "cannot read config", e))?;
    GlmConfig::from_json(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_shape_check_names_what_the_kernels_do_not_take() {
        assert!(check_gpu_shapes(&GlmConfig::glm_4_7_flash()).is_ok());
        let tiny = GlmConfig {
            kv_lora_rank: 32,
            qk_rope_head_dim: 16,
            num_attention_heads: 4,
            n_routed_experts: 300,
            hidden_size: 60,
            ..GlmConfig::glm_4_7_flash()
        };
        let err = check_gpu_shapes(&tiny).unwrap_err().to_string();
        for field in [
            "kv_lora_rank 32",
            "num_attention_heads 4",
            "n_routed_experts 300",
            "hidden_size 60",
        ] {
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn weight_bytes_count_every_matrix_and_only_touched_experts() {
        let c = GlmConfig::glm_4_7_flash();
        // 29.94 B parameters at 2 bytes (HF's count of the same config);
        // the f32 router adds a little.
        let gib = c.weight_bytes(2) as f64 / (1u64 << 30) as f64;
        assert!((55.5..56.5).contains(&gib), "{gib}");
        let touched = c.weight_bytes_touched(2, c.num_experts_per_tok);
        let expert = 3 * c.hidden_size * c.moe_intermediate_size * 2;
        assert_eq!(
            c.weight_bytes_touched(2, c.num_experts_per_tok + 1) - touched,
            expert * 46,
            "one more expert in each of the 46 MoE layers"
        );
    }
}
