//! The generation loop: a batch of requests is prefilled one by one, then
//! decoded together, one token per live sequence per step; a sequence leaves
//! the batch at its stop token or its token limit, and its blocks are freed
//! at once.

use std::time::Instant;

use anyhow::{bail, Result};
use asynctls_kernels::{ops, Tensor};
use asynctls_kvcache::{KvDType, SeqId};
use asynctls_models::{AttentionPlan, CausalLm, DecodeGraphs, ModelError, DEFAULT_PREFILL_CHUNK};
use serde::Serialize;

use crate::sampler::{Sampler, SamplingParams};

/// One prompt to continue.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these (the stop token is kept).
    pub stop_ids: Vec<u32>,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

/// What one request produced, with its timings.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prefill_ms: f64,
    /// Wall time of the decode steps this sequence took part in.
    pub decode_ms: f64,
}

/// Timings of a whole batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchTimings {
    pub prefill_tokens: usize,
    pub prefill_ms: f64,
    pub decode_tokens: usize,
    pub decode_steps: usize,
    pub decode_ms: f64,
    /// Mean recall of the dense softmax mass, when measured.
    pub recall: Option<f64>,
    /// Mean fraction of the context attended per layer and step, when measured.
    pub attended_fraction: Option<f64>,
    /// With an offloaded cache: key reads served from resident slots and
    /// from the host tier (per attended token and head).
    pub offload_reads: Option<(usize, usize)>,
    /// Per offloaded layer, the device residency's counters over the run
    /// (the GPU's offloaded cache only).
    pub offload_layers: Option<Vec<(usize, asynctls_offload::ResidencyStats)>>,
}

impl BatchTimings {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prefill_tokens as f64 / (self.prefill_ms / 1e3).max(1e-9)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        self.decode_tokens as f64 / (self.decode_ms / 1e3).max(1e-9)
    }
}

/// A model with the way it attends.
#[derive(Debug)]
pub struct Engine {
    pub model: Box<dyn CausalLm>,
    pub plan: AttentionPlan,
    pub kv_dtype: KvDType,
    /// Measure recall and attended fraction at every decode step (slow).
    pub measure_attention: bool,
    /// Put the offload engine in front of the host cache with this many
    /// resident (block, head) units per layer; `None`: all in host memory.
    pub resident_slots: Option<usize>,
    /// With `resident_slots`: blocks of a resident tier beside the
    /// offloaded cache (sequences there while it has room).
    pub resident_tier_blocks: usize,
    /// With `resident_slots` on a GPU: which resident units a promotion may
    /// evict (the one-step-lag or the union-of-last-two predictor).
    pub offload_policy: asynctls_offload::PromotePolicy,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Replay greedy decode steps from CUDA graphs on a GPU.
    pub cuda_graphs: bool,
}

impl Engine {
    pub fn new(model: Box<dyn CausalLm>, plan: AttentionPlan, kv_dtype: KvDType) -> Self {
        Engine {
            model,
            plan,
            kv_dtype,
            measure_attention: false,
            resident_slots: None,
            resident_tier_blocks: 0,
            offload_policy: asynctls_offload::PromotePolicy::union_of_last_two(usize::MAX),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            cuda_graphs: true,
        }
    }

    /// Whether the plan serves `requests` on this device: on a GPU, ds
    /// beyond its reach is refused here, before any prefill.
    pub fn check_requests_reach(&self, requests: &[Request]) -> Result<()> {
        self.check_reach(requests.iter().map(request_blocks).max().unwrap_or(1))
    }

    fn check_reach(&self, max_blocks: usize) -> Result<()> {
        if self.model.device().is_cuda() {
            asynctls_attn::check_gpu_reach(&self.plan.sparse, max_blocks, REQUEST_BLOCK)?;
        }
        Ok(())
    }

    /// Checks a request against the model before any work is done.
    pub fn validate(&self, request: &Request) -> Result<()> {
        let (context, vocab) = (self.model.max_positions(), self.model.vocab_size());
        if request.prompt_ids.is_empty() {
            return Err(ModelError::EmptyPrompt.into());
        }
        // Checked: a --max-new-tokens near usize::MAX must not wrap past the check.
        if request
            .prompt_ids
            .len()
            .checked_add(request.max_new_tokens)
            .is_none_or(|n| n > context)
        {
            return Err(ModelError::ContextTooLong {
                prompt: request.prompt_ids.len(),
                new: request.max_new_tokens,
                context,
            }
            .into());
        }
        if let Some(&id) = request.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange { id, vocab }.into());
        }
        Ok(())
    }

    /// Runs every request to completion.
    pub fn generate(
        &self,
        requests: &[Request],
        mut on_prefill: impl FnMut(usize),
    ) -> Result<(Vec<Generation>, BatchTimings)> {
        if requests.is_empty() {
            bail!("no requests to generate for");
        }
        for r in requests {
            self.validate(r)?;
        }
        let blocks: usize = requests.iter().map(request_blocks).sum();
        // The longest request's blocks: the width of the decode graphs'
        // tables, and what the plan must reach on a GPU.
        let max_blocks = requests.iter().map(request_blocks).max().unwrap_or(1);
        self.check_reach(max_blocks)?;
        // More resident slots than the pool has units are never used; the
        // offload engine allocates every slot up front.
        let units = blocks.saturating_mul(self.model.cache_config(1, self.kv_dtype).kv_heads);
        let offload = self.resident_slots.map(|s| asynctls_attn::OffloadOptions {
            resident_tier_blocks: self.resident_tier_blocks,
            // The dense leading layers read every block each step: they stay on the GPU.
            resident_layers: self.plan.dense_layers,
            policy: self.offload_policy,
            ..asynctls_attn::OffloadOptions::new(s.min(units))
        });
        let mut backend = self.model.new_backend(blocks, self.kv_dtype, offload)?;
        // Recall is measured against a dense pass on the host reference; a
        // GPU backend has none, and reports no recall rather than failing.
        let measuring = self.measure_attention && backend.measure(true).is_ok();
        let device = self.model.device().clone();
        let mut samplers: Vec<Sampler> = requests.iter().map(|r| Sampler::new(r.sampling)).collect();
        let mut out: Vec<Generation> = Vec::with_capacity(requests.len());
        let mut timings = BatchTimings {
            prefill_tokens: 0,
            prefill_ms: 0.0,
            decode_tokens: 0,
            decode_steps: 0,
            decode_ms: 0.0,
            recall: None,
            offload_reads: None,
            offload_layers: None,
            attended_fraction: None,
        };
        // (request index, sequence, next token)
        let mut live: Vec<(usize, SeqId, u32)> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let seq = backend.add_sequence();
            // A tiered cache places the sequence where all of it fits.
            backend.plan_sequence(seq, r.prompt_ids.len() + r.max_new_tokens);
            let start = Instant::now();
            let logits = self
                .model
                .prefill(backend.as_mut(), seq, &r.prompt_ids, false, self.prefill_chunk)?;
            let first = sample(&logits, &mut samplers, &[i])?[0];
            let ms = start.elapsed().as_secs_f64() * 1e3;
            timings.prefill_ms += ms;
            timings.prefill_tokens += r.prompt_ids.len();
            on_prefill(i);
            out.push(Generation {
                prompt_ids: r.prompt_ids.clone(),
                generated_ids: vec![],
                finish_reason: FinishReason::Length,
                prefill_ms: ms,
                decode_ms: 0.0,
            });
            if r.max_new_tokens == 0 {
                backend.free(seq)?;
                continue;
            }
            out[i].generated_ids.push(first);
            if r.stop_ids.contains(&first) || r.max_new_tokens == 1 {
                out[i].finish_reason = if r.stop_ids.contains(&first) {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                };
                backend.free(seq)?;
            } else {
                live.push((i, seq, first));
            }
        }
        // Greedy batches on a GPU replay their decode steps from CUDA graphs
        // (statistics need the host path's dense passes, so they stay eager).
        let all_greedy = requests.iter().all(|r| r.sampling.is_greedy());
        let mut graphs = DecodeGraphs::new(max_blocks, self.cuda_graphs && !measuring);
        while !live.is_empty() {
            let seqs: Vec<SeqId> = live.iter().map(|l| l.1).collect();
            let tokens: Vec<u32> = live.iter().map(|l| l.2).collect();
            let start = Instant::now();
            // The one host sync of a step: the sampled ids.
            let sampled = if all_greedy {
                self.model
                    .decode_greedy(backend.as_mut(), &seqs, &tokens, &self.plan, &mut graphs)?
            } else {
                let ids = Tensor::from_vec(tokens, &[seqs.len()])?.to_device(&device)?;
                let logits = self.model.decode_step(backend.as_mut(), &seqs, &ids, &self.plan)?;
                let rows: Vec<usize> = live.iter().map(|l| l.0).collect();
                sample(&logits, &mut samplers, &rows)?
            };
            let ms = start.elapsed().as_secs_f64() * 1e3;
            timings.decode_ms += ms;
            timings.decode_steps += 1;
            timings.decode_tokens += live.len();
            let mut still = Vec::with_capacity(live.len());
            for (token, (i, seq, _)) in sampled.into_iter().zip(live) {
                let g = &mut out[i];
                g.decode_ms += ms;
                g.generated_ids.push(token);
                if requests[i].stop_ids.contains(&token) {
                    g.finish_reason = FinishReason::Stop;
                    backend.free(seq)?;
                } else if g.generated_ids.len() >= requests[i].max_new_tokens {
                    backend.free(seq)?;
                } else {
                    still.push((i, seq, token));
                }
            }
            live = still;
        }
        if let Some(stats) = backend.stats().filter(|s| s.count > 0) {
            timings.recall = Some(stats.recall());
            timings.attended_fraction = Some(stats.attended_fraction());
        }
        timings.offload_reads = backend.take_offload_reads();
        timings.offload_layers = backend.offload_layer_stats();
        Ok((out, timings))
    }
}

/// Tokens per KV block of the engine's caches.
const REQUEST_BLOCK: usize = 64;

/// Blocks the engine gives one request: its prompt and new tokens, plus
/// one spare.
fn request_blocks(r: &Request) -> usize {
    (r.prompt_ids.len() + r.max_new_tokens).div_ceil(REQUEST_BLOCK) + 1
}

/// Loads the model directory `dir` onto `device`, which `request` resolved
/// to. Under `--device auto`, a family without a GPU path yet (GLM) falls
/// back to the CPU with a note instead of failing; an explicit `cuda` does
/// not.
pub fn load_for_request(
    dir: &std::path::Path,
    request: asynctls_kernels::DeviceRequest,
    device: &asynctls_kernels::Device,
) -> Result<Box<dyn CausalLm>> {
    match asynctls_models::load_model_on(dir, device) {
        Err(ModelError::Unsupported(what)) if device.is_cuda() && request == asynctls_kernels::DeviceRequest::Auto => {
            eprintln!("note: {what}; --device auto falls back to the CPU");
            Ok(asynctls_models::load_model_on(dir, &asynctls_kernels::Device::Cpu)?)
        }
        other => Ok(other?),
    }
}

/// The next token of each row of `logits` (`[rows, vocab]`, on the model's
/// device), row `r` drawn by `samplers[which[r]]`, on the logits' device:
/// only the ids cross to the host.
pub fn sample(logits: &Tensor, samplers: &mut [Sampler], which: &[usize]) -> Result<Vec<u32>> {
    let vocab = logits.last_dim();
    let rows = logits.elem_count() / vocab.max(1);
    if rows != which.len() {
        bail!("{rows} rows of logits for {} samplers", which.len());
    }
    if which.iter().all(|&i| samplers[i].params().is_greedy()) {
        return Ok(ops::argmax(logits)?.to_vec::<u32>()?);
    }
    let params: Vec<_> = which.iter().map(|&i| samplers[i].params().kernel_params()).collect();
    let steps: Vec<u64> = which.iter().map(|&i| samplers[i].step()).collect();
    let ids = ops::sample(logits, &params, &steps)?.to_vec::<u32>()?;
    for &i in which {
        samplers[i].advance();
    }
    Ok(ids)
}
