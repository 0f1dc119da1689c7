//! One interface over the model families, so that the engine and the CLI
//! do not care which architecture a directory holds.

use std::path::Path;

use asynctls_kvcache::{CacheConfig, HostKvStorage, KvDType, PagedKvCache, SeqId};
use asynctls_offload::KvStore;

use crate::error::io_err;
use crate::glm::{GlmConfig, GlmModel};
use crate::gqa::{AttentionPlan, AttentionStats, GqaModel};
use crate::weights::Weights;
use crate::{GqaConfig, ModelError, Result};

/// A causal language model over a paged KV cache whose storage is chosen by
/// configuration (host memory, or a host tier behind the offload engine).
pub trait CausalLm: Send + Sync + std::fmt::Debug {
    fn vocab_size(&self) -> usize;
    /// Positions the model can attend over.
    fn max_positions(&self) -> usize;
    fn eos_token_ids(&self) -> Vec<u32>;
    fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> CacheConfig;
    /// The host storage of a cache of `num_blocks`, with the model's label channels.
    fn host_storage(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<HostKvStorage>;
    /// A cache of `num_blocks`; `resident_slots` puts the offload engine in
    /// front of the host storage with that many resident units per layer.
    fn new_cache(
        &self,
        num_blocks: usize,
        kv_dtype: KvDType,
        resident_slots: Option<usize>,
    ) -> Result<PagedKvCache<KvStore>> {
        let host = self.host_storage(num_blocks, kv_dtype)?;
        Ok(PagedKvCache::new(KvStore::new(host, resident_slots))?)
    }
    /// Runs a sequence's next tokens, densely; logits of the last or of all.
    fn prefill(
        &self,
        cache: &mut PagedKvCache<KvStore>,
        seq: SeqId,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>>;
    /// One token for each sequence of a batch; logits `[batch, vocab]`.
    fn decode_step(
        &self,
        cache: &mut PagedKvCache<KvStore>,
        seqs: &[SeqId],
        tokens: &[u32],
        plan: &AttentionPlan,
        stats: Option<&mut AttentionStats>,
    ) -> Result<Vec<f32>>;
}

impl CausalLm for GqaModel {
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn max_positions(&self) -> usize {
        self.config().max_position_embeddings
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.config().eos_token_ids.clone()
    }
    fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> CacheConfig {
        GqaModel::cache_config(self, num_blocks, kv_dtype)
    }
    fn host_storage(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<HostKvStorage> {
        GqaModel::host_storage(self, num_blocks, kv_dtype)
    }
    fn prefill(
        &self,
        cache: &mut PagedKvCache<KvStore>,
        seq: SeqId,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        GqaModel::prefill(self, cache, seq, tokens, all_logits)
    }
    fn decode_step(
        &self,
        cache: &mut PagedKvCache<KvStore>,
        seqs: &[SeqId],
        tokens: &[u32],
        plan: &AttentionPlan,
        stats: Option<&mut AttentionStats>,
    ) -> Result<Vec<f32>> {
        GqaModel::decode_step(self, cache, seqs, tokens, plan, stats)
    }
}

impl CausalLm for GlmModel {
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn max_positions(&self) -> usize {
        self.config().max_position_embeddings
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.config().eos_token_ids.clone()
    }
    fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> CacheConfig {
        GlmModel::cache_config(self, num_blocks, kv_dtype)
    }
    fn host_storage(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<HostKvStorage> {
        GlmModel::host_storage(self, num_blocks, kv_dtype)
    }
    fn prefill(
        &self,
        cache: &mut PagedKvCache<KvStore>,
        seq: SeqId,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        GlmModel::prefill(self, cache, seq, tokens, all_logits)
    }
    fn decode_step(
        &self,
        cache: &mut PagedKvCache<KvStore>,
        seqs: &[SeqId],
        tokens: &[u32],
        plan: &AttentionPlan,
        stats: Option<&mut AttentionStats>,
    ) -> Result<Vec<f32>> {
        GlmModel::decode_step(self, cache, seqs, tokens, plan, stats)
    }
}

/// Loads any supported model directory, choosing the family by `model_type`.
pub fn load_model(dir: &Path) -> Result<Box<dyn CausalLm>> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| io_err(&config_path, "cannot read config", e))?;
    let model_type = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| ModelError::Config {
            path: config_path.clone(),
            what: e.to_string(),
        })?
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(String::from);
    let weights = || Weights::open(dir);
    match model_type.as_deref() {
        Some("glm4_moe_lite") => {
            let config = GlmConfig::from_json(&config_path, &text)?;
            Ok(Box::new(GlmModel::load(config, &weights()?)?))
        }
        _ => {
            let config = GqaConfig::from_json(&config_path, &text)?;
            Ok(Box::new(GqaModel::load(config, &weights()?)?))
        }
    }
}
