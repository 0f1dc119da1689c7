//! The GQA decoder shared by Qwen3, Qwen2 and Llama, top-down: RoPE, linear
//! layers, MLP, attention, decoder layer, model. Weight names mirror the HF
//! safetensors names. Attention does not own a KV cache: every forward is
//! handed the paged cache, so paging, sparsity and offload stay in their crates.

use asynctls_attn::{AttnShape, Policy, SparseConfig};
use asynctls_kernels::cpu::{self, RopeStyle, RopeTable};
use asynctls_kvcache::{CacheConfig, HostKvStorage, HostReadable, KvDType, LabelChannels, PagedKvCache, SeqId};

use crate::layers::{add_residual, check_positions, prefill_with, reserve_next_tokens, Linear, Mlp, TokenIo};
use crate::weights::{WeightSource, Weights};
use crate::{GqaConfig, Result};

/// How decode steps attend: the sparse configuration, and how many leading
/// layers stay dense (they carry little sparsity and much accuracy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionPlan {
    pub sparse: SparseConfig,
    pub dense_layers: usize,
}

impl AttentionPlan {
    pub fn dense() -> Self {
        AttentionPlan {
            sparse: SparseConfig {
                policy: Policy::Dense,
                ..SparseConfig::default()
            },
            dense_layers: 0,
        }
    }

    pub(crate) fn for_layer(&self, layer: usize) -> std::borrow::Cow<'_, SparseConfig> {
        if layer < self.dense_layers && self.sparse.policy != Policy::Dense {
            std::borrow::Cow::Owned(SparseConfig {
                policy: Policy::Dense,
                ..self.sparse.clone()
            })
        } else {
            std::borrow::Cow::Borrowed(&self.sparse)
        }
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    shape: AttnShape,
    eps: f32,
}

impl Attention {
    fn load(w: &dyn WeightSource, prefix: &str, c: &GqaConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qh, kvh) = (c.num_attention_heads, c.num_key_value_heads);
        let norm = |name: &str| -> Result<Option<Vec<f32>>> {
            if c.qk_norm {
                Ok(Some(w.get(&format!("{prefix}.{name}.weight"), &[d])?))
            } else {
                Ok(None)
            }
        };
        Ok(Attention {
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), h, qh * d, c.qkv_bias)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), h, kvh * d, c.qkv_bias)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), h, kvh * d, c.qkv_bias)?,
            o_proj: Linear::load(w, &format!("{prefix}.o_proj"), qh * d, h, false)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            shape: AttnShape::gqa(qh, kvh, d),
            eps: c.rms_norm_eps as f32,
        })
    }

    /// Queries and keys after the optional per-head norm and RoPE, and values,
    /// for tokens at `positions`.
    fn project(&self, x: &[f32], positions: &[usize], rope: &RopeTable) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let mut q = self.q_proj.forward(x);
        let mut k = self.k_proj.forward(x);
        let v = self.v_proj.forward(x);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            cpu::rms_norm(&mut q, qn, self.eps)?;
            cpu::rms_norm(&mut k, kn, self.eps)?;
        }
        let d = self.shape.key_dim;
        rope.apply(&mut q, d, positions, RopeStyle::Neox)?;
        rope.apply(&mut k, d, positions, RopeStyle::Neox)?;
        Ok((q, k, v))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: Vec<f32>,
    self_attn: Attention,
    post_attention_layernorm: Vec<f32>,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(w: &dyn WeightSource, layer: usize, c: &GqaConfig) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        Ok(DecoderLayer {
            input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[c.hidden_size])?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), c)?,
            post_attention_layernorm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[c.hidden_size])?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), c.hidden_size, c.intermediate_size)?,
        })
    }
}

/// Accumulated accuracy and sparsity of measured decode steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionStats {
    pub recall_sum: f64,
    pub attended_sum: f64,
    /// Layer-steps measured.
    pub count: usize,
}

impl AttentionStats {
    /// Mean fraction of the dense softmax mass on the attended tokens.
    pub fn recall(&self) -> f64 {
        self.recall_sum / self.count.max(1) as f64
    }

    /// Mean fraction of the context each layer-step attended.
    pub fn attended_fraction(&self) -> f64 {
        self.attended_sum / self.count.max(1) as f64
    }

    /// Adds one layer's step: recall against a dense pass over the same cache.
    pub(crate) fn record<S: HostReadable>(
        &mut self,
        storage: &S,
        tables: &[&asynctls_kvcache::BlockTable],
        layer: usize,
        q: &[f32],
        shape: &AttnShape,
        report: &asynctls_attn::DecodeReport,
    ) {
        let probs = asynctls_attn::metrics::dense_probabilities(storage, tables, layer, q, shape);
        let lens: Vec<usize> = tables.iter().map(|t| t.written(layer)).collect();
        self.recall_sum += asynctls_attn::metrics::recall(report, &probs, shape);
        self.attended_sum += report.attended_fraction(&lens, shape.kv_heads);
        self.count += 1;
    }
}

/// A GQA causal language model.
#[derive(Debug)]
pub struct GqaModel {
    config: GqaConfig,
    io: TokenIo,
    layers: Vec<DecoderLayer>,
    rope: RopeTable,
}

impl GqaModel {
    /// Loads every weight the config implies; a missing or mis-shaped tensor
    /// is an error naming it.
    pub fn load(config: GqaConfig, weights: &dyn WeightSource) -> Result<Self> {
        let c = &config;
        let io = TokenIo::load(
            weights,
            c.vocab_size,
            c.hidden_size,
            c.rms_norm_eps as f32,
            c.tie_word_embeddings,
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|l| DecoderLayer::load(weights, l, c))
            .collect::<Result<Vec<_>>>()?;
        let (inv_freq, attention_factor) = c.rope_inv_freq();
        let rope = RopeTable::from_inv_freq(c.head_dim, &inv_freq, c.max_position_embeddings)?
            .with_attention_scale(attention_factor);
        Ok(GqaModel {
            config,
            io,
            layers,
            rope,
        })
    }

    pub fn config(&self) -> &GqaConfig {
        &self.config
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

    /// A host cache for this model, with the default label channels (the
    /// lowest RoPE frequencies, which carry the position-independent part of
    /// a key) until calibration provides better ones.
    pub fn new_cache(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<PagedKvCache<HostKvStorage>> {
        Ok(PagedKvCache::new(self.host_storage(num_blocks, kv_dtype)?)?)
    }

    /// The host storage [`new_cache`](Self::new_cache) wraps.
    pub fn host_storage(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<HostKvStorage> {
        let config = self.cache_config(num_blocks, kv_dtype);
        let head = asynctls_attn::calibrate::low_frequency_channels(config.key_dim, config.label_channels);
        let channels = LabelChannels::new(vec![vec![head; config.kv_heads]; config.num_layers]);
        Ok(HostKvStorage::new(&config, channels)?)
    }

    /// Runs `tokens` of one sequence through the model (dense causal
    /// attention), appending their K/V to the cache. Returns the logits of the
    /// last token, or of every token when `all_logits`.
    pub fn prefill<S: HostReadable>(
        &self,
        cache: &mut PagedKvCache<S>,
        seq: SeqId,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        prefill_with(cache, seq, tokens, all_logits, &self.io, |cache, start| {
            self.prefill_layers(cache, seq, tokens, start)
        })
    }

    fn prefill_layers<S: HostReadable>(
        &self,
        cache: &mut PagedKvCache<S>,
        seq: SeqId,
        tokens: &[u32],
        start: usize,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        check_positions(start + tokens.len(), c.max_position_embeddings)?;
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let mut x = self.io.embed(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut normed = x.clone();
            cpu::rms_norm(&mut normed, &layer.input_layernorm, c.rms_norm_eps as f32)?;
            let attn = &layer.self_attn;
            let (q, k, v) = attn.project(&normed, &positions, &self.rope)?;
            cache.write(seq, l, start, &k, &v)?;
            let mut out = vec![0.0; tokens.len() * attn.shape.q_heads * attn.shape.value_dim];
            asynctls_attn::prefill(cache.storage(), cache.table(seq)?, l, start, &q, &attn.shape, &mut out)?;
            self.residual_mlp(layer, &mut x, &out)?;
        }
        Ok(x)
    }

    /// `x += o_proj(attn)`, then `x += mlp(norm(x))`.
    fn residual_mlp(&self, layer: &DecoderLayer, x: &mut [f32], attn: &[f32]) -> Result<()> {
        add_residual(x, &layer.self_attn.o_proj.forward(attn));
        let mut normed = x.to_vec();
        cpu::rms_norm(
            &mut normed,
            &layer.post_attention_layernorm,
            self.config.rms_norm_eps as f32,
        )?;
        add_residual(x, &layer.mlp.forward(&normed));
        Ok(())
    }

    /// One decode step for a batch: `tokens[i]` is the next token of
    /// `seqs[i]`. Appends their K/V and returns logits `[batch, vocab]`.
    /// With `stats`, also measures in every layer how much of the dense
    /// softmax mass the selection kept and how much of the context it read
    /// (a dense pass per layer: for evaluation only).
    pub fn decode_step<S: HostReadable>(
        &self,
        cache: &mut PagedKvCache<S>,
        seqs: &[SeqId],
        tokens: &[u32],
        plan: &AttentionPlan,
        mut stats: Option<&mut AttentionStats>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let positions = reserve_next_tokens(cache, seqs, tokens, c.max_position_embeddings)?;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let mut x = self.io.embed(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut normed = x.clone();
            cpu::rms_norm(&mut normed, &layer.input_layernorm, c.rms_norm_eps as f32)?;
            let attn = &layer.self_attn;
            let (q, k, v) = attn.project(&normed, &positions, &self.rope)?;
            for (i, &s) in seqs.iter().enumerate() {
                let row = i * kv_width..(i + 1) * kv_width;
                cache.write(s, l, positions[i], &k[row.clone()], &v[row])?;
            }
            let tables = seqs
                .iter()
                .map(|&s| cache.table(s))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let mut out = vec![0.0; seqs.len() * attn.shape.q_heads * attn.shape.value_dim];
            let report = asynctls_attn::decode(
                cache.storage(),
                &tables,
                l,
                &q,
                &attn.shape,
                &plan.for_layer(l),
                &mut out,
            )?;
            if let Some(stats) = stats.as_deref_mut() {
                stats.record(cache.storage(), &tables, l, &q, &attn.shape, &report);
            }
            drop(tables);
            crate::layers::hint_next_step(cache, seqs, l, &report, attn.shape.kv_heads)?;
            self.residual_mlp(layer, &mut x, &out)?;
        }
        self.io.logits(x)
    }
}

/// Loads a model directory's config and weights.
pub fn load_gqa(dir: &std::path::Path) -> Result<GqaModel> {
    let config = GqaConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::open(dir)?;
    GqaModel::load(config, &weights)
}
