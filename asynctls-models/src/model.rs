//! One interface over the model families, so that the engine and the CLI
//! do not care which architecture a directory holds.

use std::path::Path;

use asynctls_attn::{AttentionBackend, AttentionPlan, OffloadOptions};
use asynctls_kernels::{Device, Tensor};
use asynctls_kvcache::{CacheConfig, KvDType, LabelChannels, SeqId};

use crate::decoder::DecodeGraphs;
use crate::error::io_err;
use crate::glm::{GlmConfig, GlmModel};
use crate::gqa::GqaModel;
use crate::weights::Weights;
use crate::{GqaConfig, ModelError, Result};

/// A causal language model on one device, over the KV cache and attention
/// of an [`AttentionBackend`] it makes for that device.
pub trait CausalLm: Send + Sync + std::fmt::Debug {
    fn vocab_size(&self) -> usize;
    /// Positions the model can attend over.
    fn max_positions(&self) -> usize;
    fn eos_token_ids(&self) -> Vec<u32>;
    /// Where the weights are and the forward runs.
    fn device(&self) -> &Device;
    fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> CacheConfig;
    /// Label channels for every cache this model makes from now on, instead
    /// of its defaults (check them first with [`crate::read_label_channels`]).
    fn set_label_channels(&mut self, channels: LabelChannels);
    /// Bytes of weights one decode step reads (every matrix once, the LM
    /// head included), in the dtype they are stored in on the model's device;
    /// 0 when not known. The bytes floor of a step is this plus its KV reads.
    fn weight_bytes_per_step(&self) -> usize {
        0
    }
    /// Records (`true`) or stops recording which weights eager forwards
    /// touch, where that depends on the input (a MoE's experts).
    fn trace_weights(&self, _on: bool) {}
    /// Bytes of weights one recorded forward read, when the model records
    /// them ([`trace_weights`](Self::trace_weights)); `None` otherwise.
    fn traced_weight_bytes(&self) -> Option<usize> {
        None
    }
    /// A cache of `num_blocks` and the attention over it on the model's
    /// device; `offload` keeps the K/V in a host tier behind the offload
    /// engine with that many resident units per layer (on a GPU, pinned
    /// host memory with the residency decided on the device, the first
    /// `resident_layers` layers kept on the GPU).
    fn new_backend(
        &self,
        num_blocks: usize,
        kv_dtype: KvDType,
        offload: Option<OffloadOptions>,
    ) -> Result<Box<dyn AttentionBackend>>;
    /// Runs a sequence's next tokens, densely, in chunks of `chunk` tokens;
    /// logits (f32, on the model's device) of the last token or of all.
    fn prefill(
        &self,
        backend: &mut dyn AttentionBackend,
        seq: SeqId,
        tokens: &[u32],
        all_logits: bool,
        chunk: usize,
    ) -> Result<Tensor>;
    /// One token for each sequence of a batch (`ids`: u32 `[batch]` on the
    /// model's device); logits `[batch, vocab]` on the model's device.
    fn decode_step(
        &self,
        backend: &mut dyn AttentionBackend,
        seqs: &[SeqId],
        ids: &Tensor,
        plan: &AttentionPlan,
    ) -> Result<Tensor>;
    /// A prefill chunk of `seq` and one token of each of `seqs` (their last
    /// tokens `ids`, on the host) in one forward: logits `[1 + seqs,
    /// vocab]`, the chunk's last token's first (see `Decoder::mixed_step`).
    /// Families without it refuse, and the caller runs the two apart.
    fn mixed_step(
        &self,
        _backend: &mut dyn AttentionBackend,
        _seq: SeqId,
        _chunk: &[u32],
        _seqs: &[SeqId],
        _ids: &[u32],
        _plan: &AttentionPlan,
    ) -> Result<Tensor> {
        Err(ModelError::Unsupported(
            "a prefill chunk and a decode batch in one step".into(),
        ))
    }
    /// Whether [`Self::mixed_step`] runs (the shared decoder's families).
    fn supports_mixed_steps(&self) -> bool {
        false
    }
    /// One greedy step (`ids` the last tokens, on the host); the next ids on
    /// the host. On a GPU, replayed from a CUDA graph where `graphs` holds one.
    fn decode_greedy(
        &self,
        backend: &mut dyn AttentionBackend,
        seqs: &[SeqId],
        ids: &[u32],
        plan: &AttentionPlan,
        graphs: &mut DecodeGraphs,
    ) -> Result<Vec<u32>>;
}

/// The backend of a model on `device` over a cache of `cache(blocks,
/// dtype)` with `channels(config)`: the host reference (optionally behind
/// the offload engine with `resident_slots`) on the CPU, the GPU-resident
/// cache and kernels on a GPU (bf16 there). Every family's `new_backend`.
pub(crate) fn backend_on(
    device: &Device,
    num_blocks: usize,
    kv_dtype: KvDType,
    offload: Option<OffloadOptions>,
    cache: &dyn Fn(usize, KvDType) -> CacheConfig,
    channels: &dyn Fn(&CacheConfig) -> LabelChannels,
) -> Result<Box<dyn AttentionBackend>> {
    // A resident tier beside the offloaded cache: both, as one backend.
    if let Some(o) = offload.filter(|o| o.resident_tier_blocks > 0) {
        let resident = backend_on(device, o.resident_tier_blocks, kv_dtype, None, cache, channels)?;
        let offloaded = backend_on(
            device,
            num_blocks,
            kv_dtype,
            Some(OffloadOptions {
                resident_tier_blocks: 0,
                ..o
            }),
            cache,
            channels,
        )?;
        let block_size = cache(1, kv_dtype).block_size;
        return Ok(Box::new(asynctls_attn::TieredAttention::new(
            resident, offloaded, block_size,
        )?));
    }
    match device {
        Device::Cpu => {
            let config = cache(num_blocks, kv_dtype);
            let host = asynctls_kvcache::HostKvStorage::new(&config, channels(&config))?;
            Ok(Box::new(asynctls_attn::CpuAttention::new(
                asynctls_kvcache::PagedKvCache::new(asynctls_offload::KvStore::new(
                    host,
                    offload.map(|o| o.slots_per_layer),
                ))?,
            )))
        }
        Device::Cuda(dev) => {
            let config = cache(num_blocks, KvDType::BF16);
            let channels = channels(&config);
            Ok(Box::new(match offload {
                // The K/V in pinned host memory, some units per layer resident.
                Some(options) => asynctls_attn::CudaAttention::offloaded(dev, &config, channels, options)?,
                None => asynctls_attn::CudaAttention::new(dev, &config, channels)?,
            }))
        }
    }
}

/// Refuses, before any weight is allocated, a model of `need` bytes of
/// weights that `device`'s free memory cannot hold (a no-op off a GPU).
pub(crate) fn check_weights_fit(device: &Device, need: usize) -> Result<()> {
    if let Device::Cuda(dev) = device {
        let (free, _) = dev.memory_info()?;
        if need > free {
            return Err(ModelError::WeightsDoNotFit {
                device: device.to_string(),
                need_gib: need as f64 / (1u64 << 30) as f64,
                free_gib: free as f64 / (1u64 << 30) as f64,
            });
        }
    }
    Ok(())
}

/// The forward methods of a family whose `decoder()` is the shared loop.
macro_rules! forward_through_the_decoder {
    () => {
        fn prefill(
            &self,
            backend: &mut dyn AttentionBackend,
            seq: SeqId,
            tokens: &[u32],
            all_logits: bool,
            chunk: usize,
        ) -> Result<Tensor> {
            self.decoder().prefill(backend, seq, tokens, all_logits, chunk)
        }
        fn decode_step(
            &self,
            backend: &mut dyn AttentionBackend,
            seqs: &[SeqId],
            ids: &Tensor,
            plan: &AttentionPlan,
        ) -> Result<Tensor> {
            self.decoder().decode(backend, seqs, ids, plan)
        }
        fn decode_greedy(
            &self,
            backend: &mut dyn AttentionBackend,
            seqs: &[SeqId],
            ids: &[u32],
            plan: &AttentionPlan,
            graphs: &mut DecodeGraphs,
        ) -> Result<Vec<u32>> {
            self.decoder().decode_greedy(backend, seqs, ids, plan, graphs)
        }
        fn mixed_step(
            &self,
            backend: &mut dyn AttentionBackend,
            seq: SeqId,
            chunk: &[u32],
            seqs: &[SeqId],
            ids: &[u32],
            plan: &AttentionPlan,
        ) -> Result<Tensor> {
            self.decoder().mixed_step(backend, seq, chunk, seqs, ids, plan)
        }
        fn supports_mixed_steps(&self) -> bool {
            true
        }
    };
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
    fn device(&self) -> &Device {
        GqaModel::device(self)
    }
    fn weight_bytes_per_step(&self) -> usize {
        crate::gqa::gqa_weight_bytes(self.config(), if self.device().is_cuda() { 2 } else { 4 })
    }
    fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> CacheConfig {
        GqaModel::cache_config(self, num_blocks, kv_dtype)
    }
    fn set_label_channels(&mut self, channels: LabelChannels) {
        GqaModel::set_label_channels(self, channels)
    }
    fn new_backend(
        &self,
        num_blocks: usize,
        kv_dtype: KvDType,
        offload: Option<OffloadOptions>,
    ) -> Result<Box<dyn AttentionBackend>> {
        GqaModel::new_backend(self, num_blocks, kv_dtype, offload)
    }
    forward_through_the_decoder!();
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
    fn device(&self) -> &Device {
        GlmModel::device(self)
    }
    fn weight_bytes_per_step(&self) -> usize {
        self.weight_bytes_per_token(if self.device().is_cuda() { 2 } else { 4 })
    }
    fn trace_weights(&self, on: bool) {
        self.trace_experts(on)
    }
    fn traced_weight_bytes(&self) -> Option<usize> {
        GlmModel::traced_weight_bytes(self, if self.device().is_cuda() { 2 } else { 4 })
    }
    fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> CacheConfig {
        GlmModel::cache_config(self, num_blocks, kv_dtype)
    }
    fn set_label_channels(&mut self, channels: LabelChannels) {
        GlmModel::set_label_channels(self, channels)
    }
    fn new_backend(
        &self,
        num_blocks: usize,
        kv_dtype: KvDType,
        offload: Option<OffloadOptions>,
    ) -> Result<Box<dyn AttentionBackend>> {
        GlmModel::new_backend(self, num_blocks, kv_dtype, offload)
    }
    forward_through_the_decoder!();
}

/// Loads any supported model directory onto the CPU.
pub fn load_model(dir: &Path) -> Result<Box<dyn CausalLm>> {
    load_model_on(dir, &Device::Cpu)
}

/// Loads any supported model directory onto `device`, choosing the family
/// by `model_type`.
pub fn load_model_on(dir: &Path, device: &Device) -> Result<Box<dyn CausalLm>> {
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
    let mut model: Box<dyn CausalLm> = match model_type.as_deref() {
        Some("glm4_moe_lite") => {
            let config = GlmConfig::from_json(&config_path, &text)?;
            Box::new(GlmModel::load_on(config, &weights()?, device)?)
        }
        _ => {
            let config = GqaConfig::from_json(&config_path, &text)?;
            Box::new(GqaModel::load_on(config, &weights()?, device)?)
        }
    };
    // Calibrated label channels beside the weights (`asynctls calibrate`).
    let channels = dir.join(crate::LABEL_CHANNELS_FILE);
    if channels.is_file() {
        let config = model.cache_config(1, KvDType::BF16);
        model.set_label_channels(crate::read_label_channels(&channels, &config)?);
    }
    Ok(model)
}

/// A built-in real-model shape (`--model-shape`): the GQA presets and GLM-4.7-Flash.
#[derive(Debug, Clone)]
pub enum ModelShape {
    Gqa(GqaConfig),
    Glm(GlmConfig),
}

impl ModelShape {
    /// The names [`ModelShape::named`] knows.
    pub fn names() -> Vec<&'static str> {
        let mut names = GqaConfig::PRESETS.to_vec();
        names.push(crate::KnownModel::Glm47Flash.name());
        names
    }

    /// The shape called `name`, or `None` (the caller names [`Self::names`]).
    pub fn named(name: &str) -> Option<Self> {
        if name == crate::KnownModel::Glm47Flash.name() {
            return Some(ModelShape::Glm(GlmConfig::glm_4_7_flash()));
        }
        GqaConfig::preset(name).map(ModelShape::Gqa)
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelShape::Gqa(c) => c.vocab_size,
            ModelShape::Glm(c) => c.vocab_size,
        }
    }

    /// The model at this shape with `weights` (random, generated on `device`).
    pub fn load(&self, weights: &dyn crate::WeightSource, device: &Device) -> Result<Box<dyn CausalLm>> {
        Ok(match self {
            ModelShape::Gqa(c) => Box::new(GqaModel::load_on(c.clone(), weights, device)?),
            ModelShape::Glm(c) => Box::new(GlmModel::load_on(c.clone(), weights, device)?),
        })
    }
}

/// Loads a GQA model directory split over `ranks` tensor-parallel ranks on
/// the CPU (the CPU twin of the multi-GPU form; [`crate::TensorParallelGqa`]).
pub fn load_model_tensor_parallel(dir: &Path, ranks: usize) -> Result<Box<dyn CausalLm>> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| io_err(&config_path, "cannot read config", e))?;
    if text.contains("\"glm4_moe_lite\"") {
        return Err(ModelError::Unsupported(
            "--tensor-parallel for GLM-4.7-Flash (the GQA family only for now)".into(),
        ));
    }
    let config = GqaConfig::from_json(&config_path, &text)?;
    // The whole model's cache geometry, which a channel file describes.
    let whole = CacheConfig::gqa(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 1);
    let mut model: Box<dyn CausalLm> = Box::new(crate::TensorParallelGqa::load(config, &Weights::open(dir)?, ranks)?);
    let channels = dir.join(crate::LABEL_CHANNELS_FILE);
    if channels.is_file() {
        // Checked against every KV head, then split by rank.
        model.set_label_channels(crate::read_label_channels(&channels, &whole)?);
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::ModelShape;

    #[test]
    fn model_shapes_name_gqa_presets_and_glm() {
        let names = ModelShape::names();
        assert!(
            names.contains(&"qwen3-8b") && names.contains(&"glm-4.7-flash"),
            "{names:?}"
        );
        for name in &names {
            assert!(ModelShape::named(name).is_some(), "{name}");
        }
        match ModelShape::named("glm-4.7-flash") {
            Some(ModelShape::Glm(c)) => assert_eq!((c.num_hidden_layers, c.vocab_size), (47, 154_880)),
            other => panic!("{other:?}"),
        }
        assert!(ModelShape::named("gpt-5").is_none());
    }
}
