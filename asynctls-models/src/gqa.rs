//! The GQA decoder shared by Qwen3, Qwen2 and Llama, top-down: RoPE, linear
//! layers, MLP, attention, decoder layer, model. Weight names mirror the HF
//! safetensors names. Attention does not own a KV cache: every forward is
//! handed the paged cache, so paging, sparsity and offload stay in their crates.

use asynctls_attn::{AttentionBackend, AttentionPlan, AttnShape, Step};
use asynctls_kernels::cpu::RopeTable;
use asynctls_kernels::ops::{self, Rope};
use asynctls_kernels::{Device, Tensor};
use asynctls_kvcache::{CacheConfig, HostKvStorage, KvDType, LabelChannels, PagedKvCache};

use crate::decoder::{attn_err, Decoder, Layer, Linear, Mlp, TokenIo};
use crate::weights::{WeightSource, Weights};
use crate::{GqaConfig, Result};

#[derive(Debug)]
struct Attention {
    /// q, k and v stacked into one layer (one GEMV a decode step).
    qkv_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head q_norm and k_norm.
    qk_norm: Option<(Tensor, Tensor)>,
    shape: AttnShape,
    eps: f32,
}

impl Attention {
    fn load(w: &dyn WeightSource, prefix: &str, c: &GqaConfig, device: &Device) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qh, kvh) = (c.num_attention_heads, c.num_key_value_heads);
        let norm = |name: &str| w.vector(&format!("{prefix}.{name}.weight"), &[d], device);
        let qk_norm = match c.qk_norm {
            true => Some((norm("q_norm")?, norm("k_norm")?)),
            false => None,
        };
        let (q, k, v) = (
            format!("{prefix}.q_proj"),
            format!("{prefix}.k_proj"),
            format!("{prefix}.v_proj"),
        );
        Ok(Attention {
            qkv_proj: Linear::load_stacked(w, &[(&q, qh * d), (&k, kvh * d), (&v, kvh * d)], h, c.qkv_bias, device)?,
            o_proj: Linear::load(w, &format!("{prefix}.o_proj"), qh * d, h, false, device)?,
            qk_norm,
            shape: AttnShape::gqa(qh, kvh, d),
            eps: c.rms_norm_eps as f32,
        })
    }

    /// Queries and keys after the optional per-head norm and RoPE, and
    /// values, for the step's tokens: `[n, heads * head_dim]` each.
    fn project(&self, x: &Tensor, step: &Step, rope: &Rope) -> Result<(Tensor, Tensor, Tensor)> {
        let qkv = self.qkv_proj.forward(&ops::gemm_input(x)?)?;
        let heads = (self.shape.q_heads, self.shape.kv_heads, self.shape.key_dim);
        let norms = self.qk_norm.as_ref().map(|(q, k)| (q, k));
        Ok(ops::qkv_heads(
            &qkv,
            heads,
            norms,
            self.eps,
            rope,
            &step.positions_tensor,
        )?)
    }
}

#[derive(Debug)]
pub(crate) struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    rope: Rope,
    eps: f32,
}

impl DecoderLayer {
    fn load(w: &dyn WeightSource, layer: usize, c: &GqaConfig, rope: &Rope, device: &Device) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        Ok(DecoderLayer {
            input_layernorm: w.vector(&format!("{p}.input_layernorm.weight"), &[c.hidden_size], device)?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), c, device)?,
            post_attention_layernorm: w.vector(
                &format!("{p}.post_attention_layernorm.weight"),
                &[c.hidden_size],
                device,
            )?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), c.hidden_size, c.intermediate_size, device)?,
            rope: rope.clone(),
            eps: c.rms_norm_eps as f32,
        })
    }
}

impl DecoderLayer {
    /// The attention heads' output of `norm(x)` for `step` (with the step's
    /// K/V written), before the output projection.
    fn attend(
        &self,
        x: &Tensor,
        step: &Step,
        layer: usize,
        backend: &mut dyn AttentionBackend,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let attn = &self.self_attn;
        // Both norms feed only GEMMs: bf16 straight from the norm on a GPU.
        let normed = ops::rms_norm_gemm_input(x, &self.input_layernorm, self.eps)?;
        let (q, k, v) = attn.project(&normed, step, &self.rope)?;
        backend.write_step(step, layer, &k, &v).map_err(attn_err)?;
        backend
            .attend_step(step, layer, &q, &attn.shape, &plan.for_layer(layer))
            .map_err(attn_err)
    }

    /// The attention block's contribution to the residual stream:
    /// `o_proj(attend(q, k, v))` of `norm(x)` (with the step's K/V written).
    /// Under tensor parallelism each rank's share, summed across ranks.
    pub(crate) fn attention_out(
        &self,
        x: &Tensor,
        step: &Step,
        layer: usize,
        backend: &mut dyn AttentionBackend,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        self.self_attn
            .o_proj
            .forward(&self.attend(x, step, layer, backend, plan)?)
    }

    /// The MLP block's contribution: `mlp(norm(x))`.
    pub(crate) fn mlp_out(&self, x: &Tensor) -> Result<Tensor> {
        let normed = ops::rms_norm_gemm_input(x, &self.post_attention_layernorm, self.eps)?;
        self.mlp.forward(&normed)
    }
}

impl Layer for DecoderLayer {
    /// Both blocks add their output projection into the residual stream
    /// (one GEMV or GEMM each, no separate add).
    fn forward(
        &self,
        mut x: Tensor,
        step: &Step,
        layer: usize,
        backend: &mut dyn AttentionBackend,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let heads = self.attend(&x, step, layer, backend, plan)?;
        self.self_attn.o_proj.forward_add(&heads, &mut x)?;
        let normed = ops::rms_norm_gemm_input(&x, &self.post_attention_layernorm, self.eps)?;
        self.mlp.forward_add(&normed, &mut x)?;
        Ok(x)
    }
}

/// A GQA causal language model on one device.
#[derive(Debug)]
pub struct GqaModel {
    config: GqaConfig,
    io: TokenIo,
    layers: Vec<DecoderLayer>,
    device: Device,
    /// Calibrated label channels, when given (else the defaults).
    calibrated: Option<LabelChannels>,
}

impl GqaModel {
    /// Loads every weight the config implies onto the CPU; a missing or
    /// mis-shaped tensor is an error naming it.
    pub fn load(config: GqaConfig, weights: &dyn WeightSource) -> Result<Self> {
        Self::load_on(config, weights, &Device::Cpu)
    }

    /// Loads the model onto `device` (bf16 weights on a GPU).
    pub fn load_on(config: GqaConfig, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        let c = &config;
        crate::weights::check_layer_count(weights, c.num_hidden_layers)?;
        // Refused before any weight is allocated. Stacking a layer's gate and
        // up weights holds their parts and the stacked copy at once: that
        // transient (the largest of a layer) counts too.
        let stacking = c.hidden_size.saturating_mul(c.intermediate_size).saturating_mul(2 * 2);
        let need = gqa_weight_bytes(c, 2)
            .saturating_add(c.vocab_size.saturating_mul(c.hidden_size).saturating_mul(2))
            .saturating_add(stacking);
        crate::model::check_weights_fit(device, need)?;
        let io = TokenIo::load(
            weights,
            c.vocab_size,
            c.hidden_size,
            c.rms_norm_eps as f32,
            c.tie_word_embeddings,
            device,
        )?;
        let (inv_freq, attention_factor) = c.rope_inv_freq();
        let table = RopeTable::from_inv_freq(c.head_dim, &inv_freq, c.max_position_embeddings)?
            .with_attention_scale(attention_factor);
        let rope = Rope::new(table, device)?;
        let layers = (0..c.num_hidden_layers)
            .map(|l| DecoderLayer::load(weights, l, c, &rope, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(GqaModel {
            config,
            io,
            layers,
            device: device.clone(),
            calibrated: None,
        })
    }

    pub fn config(&self) -> &GqaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn attention_shape(&self) -> AttnShape {
        self.layers[0].self_attn.shape
    }

    /// A cache geometry for this model with `num_blocks` blocks.
    pub fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> CacheConfig {
        let c = &self.config;
        CacheConfig {
            kv_dtype,
            ..CacheConfig::gqa(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks)
        }
    }

    /// The label channels: calibrated ones when set, else the lowest RoPE
    /// frequencies (which carry the position-independent part of a key).
    pub fn label_channels(&self, config: &CacheConfig) -> LabelChannels {
        if let Some(c) = &self.calibrated {
            return c.clone();
        }
        let head = asynctls_attn::calibrate::low_frequency_channels(config.key_dim, config.label_channels);
        LabelChannels::new(vec![vec![head; config.kv_heads]; config.num_layers])
    }

    /// Uses `channels` (checked against the cache by
    /// [`crate::read_label_channels`]) instead of the default label channels.
    pub fn set_label_channels(&mut self, channels: LabelChannels) {
        self.calibrated = Some(channels);
    }

    /// A host cache for this model.
    pub fn new_cache(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<PagedKvCache<HostKvStorage>> {
        Ok(PagedKvCache::new(self.host_storage(num_blocks, kv_dtype)?)?)
    }

    /// The host storage [`new_cache`](Self::new_cache) wraps.
    pub fn host_storage(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<HostKvStorage> {
        let config = self.cache_config(num_blocks, kv_dtype);
        Ok(HostKvStorage::new(&config, self.label_channels(&config))?)
    }

    /// The attention backend of this model's device: the host reference
    /// (optionally behind the offload engine) on the CPU, the GPU-resident
    /// cache and kernels on a GPU (bf16 K/V there).
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

    pub(crate) fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    pub(crate) fn io(&self) -> &TokenIo {
        &self.io
    }

    pub(crate) fn decoder(&self) -> Decoder<'_, DecoderLayer> {
        Decoder {
            io: &self.io,
            layers: &self.layers,
            max_positions: self.config.max_position_embeddings,
        }
    }
}

/// Bytes of a GQA model's matrices (every layer's projections and the LM
/// head, at `elem` bytes each): what one decode step reads.
pub(crate) fn gqa_weight_bytes(c: &GqaConfig, elem: usize) -> usize {
    // Saturating: the sizes come from a config file and only size a check.
    let m = |a: usize, b: usize| a.saturating_mul(b);
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let heads = m(c.num_attention_heads, d);
    let attn = m(h, heads.saturating_add(m(2, m(c.num_key_value_heads, d)))).saturating_add(m(heads, h));
    let layer = attn.saturating_add(m(3, m(h, i)));
    let params = m(c.num_hidden_layers, layer).saturating_add(m(c.vocab_size, h));
    m(params, elem)
}

/// Loads a model directory's config and weights onto the CPU.
pub fn load_gqa(dir: &std::path::Path) -> Result<GqaModel> {
    let config = GqaConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::open(dir)?;
    GqaModel::load(config, &weights)
}
