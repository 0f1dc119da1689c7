//! `asynctls bench e2e`: prefill and decode throughput of a whole model
//! (random weights at a real model's size, or a checkpoint) on the CPU or a
//! GPU, through the library's engine path (`CausalLm` over an
//! `AttentionBackend`). Per context and batch every sequence holds `ctx`
//! tokens of distinct K/V: on a GPU written as random rows straight into the
//! cache (a 96k x batch 8 prefill would cost minutes and measures nothing the
//! prefill row does not), on the CPU by a prefill. Each policy then decodes
//! from forks of the same sequences, so every policy reads the same KV.
//! Each row carries the bytes floor of a step (weights once + the KV the
//! policy must read, over the HBM bandwidth), computed from the model's
//! sizes; the HF transformers peer runs in the same call on the GPU machine
//! (`bench/peers/hf_e2e.py`).

use std::time::Instant;

use anyhow::{bail, Result};
use asynctls_attn::{AttentionBackend, CudaAttention, Policy, SparseConfig, TieredAttention};
use asynctls_kernels::Device;
use asynctls_kvcache::{GpuKvStorage, KvDType, SeqId};
use asynctls_models::{AttentionPlan, CausalLm, DecodeGraphs};
use serde::Serialize;

use super::median;
pub use super::HBM_BYTES_PER_S;
const BLOCK: usize = 64;

#[derive(Debug, Clone)]
pub struct E2eBenchConfig {
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    /// (policy, token budget) pairs; dense ignores the budget.
    pub policies: Vec<(Policy, usize)>,
    pub block_topk: usize,
    pub dense_layers: usize,
    pub decode_tokens: usize,
    /// Prompt length of the prefill measurement (0: none).
    pub prefill_tokens: usize,
    pub prefill_chunk: usize,
    pub kv_dtype: KvDType,
    pub seed: u64,
    /// Replay decode steps from CUDA graphs (GPU).
    pub cuda_graphs: bool,
    /// Besides the listed batches, the largest batch whose cache fits in the
    /// GPU memory left (on a GPU; listed batches larger than it are skipped).
    pub largest_batch: bool,
    /// Keep the K/V in host memory behind the offload engine, with
    /// `slack x k_b + 3` resident units per (sequence, KV head) and layer
    /// (the sparse policies only: a dense step would read the whole cache
    /// over PCIe). `None`: the cache stays on the device.
    pub offload_slack: Option<f64>,
    /// Offloaded: host pools the offloaded layers share (`None`: one per
    /// layer). Fewer alias the layers' rows, so a batch whose K/V the host
    /// cannot hold still runs: its step time is measured, its tokens mean
    /// nothing.
    pub offload_host_tiers: Option<usize>,
    /// Offloaded: the first this many sequences of a batch in a resident
    /// tier (K/V whole on the GPU) beside the offloaded cache, the rest
    /// offloaded; 0 offloads them all.
    pub offload_resident_batch: usize,
    /// Offloaded on a GPU: how misses are promoted.
    pub offload_policy: asynctls_offload::PromotePolicy,
}

/// An offloaded row's residency.
#[derive(Debug, Clone, Serialize)]
pub struct E2eOffload {
    pub slots_per_layer: usize,
    /// The promotion policy: `union-of-last-two` or `one-step-lag`, and the
    /// misses promoted per layer and step at most (`None`: all).
    pub predictor: &'static str,
    pub max_promote: Option<usize>,
    /// Host pools the offloaded layers shared (aliased when fewer than them).
    pub host_tiers: Option<usize>,
    /// Sequences of the batch in the resident tier (the rest offloaded).
    pub resident_batch: usize,
    /// Units the timed steps read from resident slots and from the host tier.
    pub resident_reads: usize,
    pub host_reads: usize,
    pub hit_rate: f64,
    /// Per offloaded layer over the timed steps, when the device keeps the
    /// counters (the GPU's residency): hit rate, misses, promotions,
    /// evictions, bytes copied host to device a step, the selection's
    /// overlap with the previous step.
    pub layers: Vec<LayerResidency>,
    /// All layers: bytes copied host to device per step.
    pub h2d_bytes_per_step: Option<f64>,
}

/// One offloaded layer's residency over a row's timed steps.
#[derive(Debug, Clone, Serialize)]
pub struct LayerResidency {
    pub layer: usize,
    pub hit_rate: f64,
    pub misses: u64,
    pub promoted: u64,
    pub evicted: u64,
    pub h2d_bytes_per_step: f64,
    pub overlap_rate: f64,
}

/// Per layer, the counters of `after` since `before` over `steps` steps.
fn layer_residency(
    before: &[(usize, asynctls_offload::ResidencyStats)],
    after: &[(usize, asynctls_offload::ResidencyStats)],
    steps: usize,
) -> Vec<LayerResidency> {
    after
        .iter()
        .zip(before)
        .map(|(&(layer, a), &(_, b))| {
            let d = a.since(b);
            LayerResidency {
                layer,
                hit_rate: d.hit_rate(),
                misses: d.misses,
                promoted: d.promoted,
                evicted: d.evicted,
                h2d_bytes_per_step: d.h2d_bytes as f64 / steps.max(1) as f64,
                overlap_rate: d.overlap_rate(),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillRow {
    pub tokens: usize,
    pub chunk: usize,
    pub prefill_tokens_per_s: f64,
    pub prefill_s: f64,
    /// With `--offload`: the prompt's K/V in the host tier (the prefix
    /// staged on the GPU per layer and chunk), as an offloaded sequence is
    /// prefilled.
    pub offloaded: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eRow {
    pub ctx: usize,
    pub batch: usize,
    pub policy: Policy,
    pub budget: Option<usize>,
    pub decode_tokens_per_s: f64,
    /// Median wall time of one decode step (all layers, logits, the sampled
    /// ids back on the host).
    pub decode_ms_per_step: f64,
    /// Bytes a step must read (weights once, plus the KV, bounds and labels
    /// the policy reads) over the HBM bandwidth.
    pub floor_ms: f64,
    pub floor_ratio: f64,
    /// GPU memory in use after the decode (weights, cache, scratch).
    pub peak_gib: Option<f64>,
    /// Greedy tokens agreeing with the dense run's, position by position.
    pub agreement_with_dense: Option<f64>,
    /// Whether the timed steps were replayed from CUDA graphs.
    pub cuda_graphs: bool,
    /// The weights in the floor: every matrix once, and for a MoE only the
    /// experts a step of this batch touched (recorded on one extra step).
    pub floor_weight_bytes: usize,
    /// With the K/V in host memory (`--offload`).
    pub offload: Option<E2eOffload>,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub prefill: Option<PrefillRow>,
    pub rows: Vec<E2eRow>,
    /// Points that did not run, and why (e.g. the cache does not fit).
    pub skipped: Vec<String>,
}

fn gpu_used_gib(device: &Device) -> Option<f64> {
    let Device::Cuda(dev) = device else { return None };
    let (free, total) = dev.memory_info().ok()?;
    Some((total - free) as f64 / (1u64 << 30) as f64)
}

/// A deterministic pseudo-random prompt.
fn prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed) >> 17) as u32 % vocab as u32)
        .collect()
}

/// The plan of `policy` with `budget`, sparse from the first token on.
fn plan_for(policy: Policy, budget: usize, config: &E2eBenchConfig) -> AttentionPlan {
    let mut sparse = SparseConfig {
        dense_below: 0,
        ..SparseConfig::with_budget(policy, budget, BLOCK)
    };
    if policy == Policy::Tls {
        sparse.block_topk = config.block_topk.max(budget.div_ceil(BLOCK));
    }
    AttentionPlan {
        sparse,
        dense_layers: config.dense_layers,
    }
}

/// Bytes one decode step of `plan` reads at `ctx` for `batch` sequences,
/// with `weights` bytes of weights.
fn step_bytes(model: &dyn CausalLm, weights: usize, plan: &AttentionPlan, ctx: usize, batch: usize) -> usize {
    let c = model.cache_config(1, KvDType::BF16);
    let kv_token = c.kv_heads * c.kv_bytes_per_head();
    let mut bytes = weights;
    for layer in 0..c.num_layers {
        let p = plan.for_layer(layer);
        let per_seq = match p.policy {
            Policy::Dense => ctx * kv_token,
            _ => {
                let blocks = ctx.div_ceil(BLOCK);
                let forced = (p.sink_blocks + p.local_blocks + 1) * BLOCK;
                let tokens = match p.policy {
                    Policy::Quest => p.block_topk * BLOCK,
                    _ => p.token_topk,
                };
                // The GPU keeps the bounds in bf16.
                let bounds = blocks * c.kv_heads * 2 * c.key_dim * 2;
                // ds ranks every token by its labels; tls the k_b blocks' tokens.
                let labelled = match p.policy {
                    Policy::Ds => ctx,
                    _ => (p.block_topk * BLOCK).min(ctx),
                };
                let labels = labelled * c.kv_heads * c.label_bytes_per_head();
                (tokens + forced).min(ctx) * kv_token + bounds + labels
            }
        };
        bytes += batch * per_seq;
    }
    bytes
}

/// Gives `seq` `ctx` tokens of K/V: random rows on a GPU, a prefill on the CPU.
/// A tiered cache places it in `tier`.
fn fill(
    model: &dyn CausalLm,
    backend: &mut dyn AttentionBackend,
    seq: SeqId,
    ctx: usize,
    seed: u64,
    chunk: usize,
    tier: Option<usize>,
) -> Result<()> {
    // A tiered cache's sequence is written into the tier it is placed in.
    let (backend, seq) = if backend.as_any_mut().is::<TieredAttention>() {
        let tiered = backend.as_any_mut().downcast_mut::<TieredAttention>().expect("checked");
        tiered.tier_backend(seq, ctx, tier)?
    } else {
        (backend, seq)
    };
    if let Some(gpu) = backend.as_any_mut().downcast_mut::<CudaAttention>() {
        gpu.fill_random(seq, ctx, seed)?;
    } else {
        model.prefill(backend, seq, &prompt(ctx, model.vocab_size(), seed), false, chunk)?;
    }
    Ok(())
}

/// Empties the residency of an offloaded GPU cache (of each tier of a tiered one).
fn reset_residency(backend: &mut dyn AttentionBackend) -> Result<()> {
    if let Some(tiered) = backend.as_any_mut().downcast_mut::<TieredAttention>() {
        for tier in tiered.tiers_mut().iter_mut() {
            reset_residency(tier.as_mut())?;
        }
    } else if let Some(gpu) = backend.as_any_mut().downcast_mut::<CudaAttention>() {
        gpu.reset_residency()?;
    }
    Ok(())
}

/// Runs the sweep; `progress` is told what is running.
/// Blocks a batch of `batch` sequences at `ctx` takes in the bench (each
/// sequence, plus one partial block per fork of each policy).
fn blocks_for(config: &E2eBenchConfig, ctx: usize, batch: usize) -> usize {
    let per_seq = (ctx + config.decode_tokens).div_ceil(BLOCK) + 1;
    batch * per_seq + batch * config.policies.len() + 2
}

/// GPU memory the bench keeps free beside the cache: activations of a
/// prefill chunk, the selection and decode scratch, cuBLAS workspace, CUDA
/// graphs (more than the cache's own headroom).
const LARGEST_BATCH_SPARE_BYTES: usize = 6 << 30;

/// The largest batch whose cache fits in the GPU memory free now, less a
/// spare for everything else; None off a GPU.
fn largest_batch(model: &dyn CausalLm, config: &E2eBenchConfig, ctx: usize) -> Option<usize> {
    let Device::Cuda(dev) = model.device() else { return None };
    let (free, _) = dev.memory_info().ok()?;
    let budget = free.saturating_sub(LARGEST_BATCH_SPARE_BYTES);
    // Offloaded, the K/V must fit the host's available memory, less a spare.
    let host_budget = asynctls_offload::host_available_bytes()
        .unwrap_or(0)
        .saturating_sub(HOST_SPARE_BYTES);
    let fits = |batch: usize| {
        let cache = model.cache_config(blocks_for(config, ctx, batch), config.kv_dtype);
        match config.offload_slack {
            None => GpuKvStorage::bytes_for(&cache) <= budget,
            Some(slack) => {
                let c = model.cache_config(1, config.kv_dtype);
                let unit = c.block_size * c.kv_bytes_per_head();
                let slots = offload_slots(model, config, batch, slack)
                    * unit
                    * c.num_layers.saturating_sub(config.dense_layers);
                let gpu = GpuKvStorage::offloaded_bytes_for(&cache, config.dense_layers);
                let offloaded_layers = c.num_layers.saturating_sub(config.dense_layers).max(1);
                let host = GpuKvStorage::bytes_for(&cache).saturating_sub(gpu) / offloaded_layers
                    * config
                        .offload_host_tiers
                        .unwrap_or(offloaded_layers)
                        .min(offloaded_layers);
                gpu + slots <= budget && host <= host_budget
            }
        }
    };
    let mut batch = 1;
    while batch < 4096 && fits(batch + 1) {
        batch += 1;
    }
    fits(batch).then_some(batch)
}

/// Host memory an offloaded bench leaves free beside the host tier.
const HOST_SPARE_BYTES: usize = 8 << 30;

/// Resident units per layer of an offloaded batch: `slack x k_b + 3` per
/// (sequence, KV head), for the largest k_b of the policies.
fn offload_slots(model: &dyn CausalLm, config: &E2eBenchConfig, batch: usize, slack: f64) -> usize {
    let block_topk = config
        .policies
        .iter()
        .map(|&(p, b)| plan_for(p, b, config).sparse.block_topk)
        .max()
        .unwrap_or(config.block_topk);
    let kv_heads = model.cache_config(1, config.kv_dtype).kv_heads;
    batch * kv_heads * ((block_topk as f64 * slack).ceil() as usize + 3)
}

/// One prompt of `n` random tokens prefilled into `backend` after a short
/// warm-up (kernel loading, cuBLAS heuristics), timed to the logits.
fn time_prefill(
    model: &dyn CausalLm,
    config: &E2eBenchConfig,
    mut backend: Box<dyn asynctls_attn::AttentionBackend>,
    n: usize,
    offloaded: bool,
) -> Result<PrefillRow> {
    let p = prompt(n, model.vocab_size(), config.seed);
    let warm = backend.add_sequence();
    model.prefill(backend.as_mut(), warm, &p[..n.min(256)], false, config.prefill_chunk)?;
    backend.free(warm)?;
    let seq = backend.add_sequence();
    let start = Instant::now();
    let logits = model.prefill(backend.as_mut(), seq, &p, false, config.prefill_chunk)?;
    let _ = logits.to_f32_vec()?; // waits for the GPU
    let s = start.elapsed().as_secs_f64();
    Ok(PrefillRow {
        tokens: n,
        chunk: config.prefill_chunk,
        prefill_tokens_per_s: n as f64 / s,
        prefill_s: s,
        offloaded,
    })
}

pub fn run(model: &dyn CausalLm, config: &E2eBenchConfig, mut progress: impl FnMut(&str)) -> Result<E2eReport> {
    if config.offload_slack.is_some_and(|s| !(s.is_finite() && s >= 1.0)) {
        bail!("--offload-slack must be at least 1 (the slots must hold one selection)");
    }
    if config.offload_host_tiers == Some(0) {
        bail!("--offload-host-tiers must be positive (leave it out for a host pool per layer)");
    }
    let device = model.device().clone();
    let mut report = E2eReport {
        prefill: None,
        rows: Vec::new(),
        skipped: Vec::new(),
    };
    if config.prefill_tokens > 0 {
        let n = config.prefill_tokens;
        if n > model.max_positions() {
            bail!(
                "a prefill of {n} tokens exceeds the model's {} positions",
                model.max_positions()
            );
        }
        progress(&format!("prefill of {n} tokens"));
        let offload = config.offload_slack.map(|slack| asynctls_attn::OffloadOptions {
            resident_layers: config.dense_layers,
            host_tiers: config.offload_host_tiers,
            policy: config.offload_policy,
            ..asynctls_attn::OffloadOptions::new(offload_slots(model, config, 1, slack))
        });
        let offloaded = offload.is_some();
        // A cache that does not fit is a skipped row, as for the decode rows.
        match model.new_backend(n.div_ceil(BLOCK) + 1, config.kv_dtype, offload) {
            Ok(backend) => report.prefill = Some(time_prefill(model, config, backend, n, offloaded)?),
            Err(e) => {
                progress(&format!("prefill of {n} tokens: skipped ({e})"));
                report.skipped.push(format!("prefill of {n} tokens: {e}"));
            }
        }
    }
    for &ctx in &config.contexts {
        if ctx == 0 || ctx + config.decode_tokens > model.max_positions() {
            bail!(
                "context {ctx} + {} decode tokens does not fit the model's {} positions",
                config.decode_tokens,
                model.max_positions()
            );
        }
        let mut batches = config.batches.clone();
        if config.largest_batch {
            // Also when a listed batch is larger (it is then skipped as not fitting).
            match largest_batch(model, config, ctx) {
                Some(b) if !batches.contains(&b) => {
                    batches.push(b);
                    batches.sort_unstable();
                }
                Some(_) => {}
                None => report
                    .skipped
                    .push(format!("ctx {ctx}: no largest batch (not on a GPU)")),
            }
        }
        for &batch in &batches {
            let per_seq = (ctx + config.decode_tokens).div_ceil(BLOCK) + 1;
            let blocks = blocks_for(config, ctx, batch);
            // Tiered: the first sequences resident, the others offloaded.
            let resident_batch = config.offload_resident_batch.min(batch.saturating_sub(1));
            let slots = config
                .offload_slack
                .map(|slack| offload_slots(model, config, batch - resident_batch, slack));
            let offload = slots.map(|s| asynctls_attn::OffloadOptions {
                // The dense leading layers read every block each step: they stay on the GPU.
                resident_layers: config.dense_layers,
                host_tiers: config.offload_host_tiers,
                policy: config.offload_policy,
                resident_tier_blocks: if resident_batch > 0 {
                    blocks_for(config, ctx, resident_batch)
                } else {
                    0
                },
                ..asynctls_attn::OffloadOptions::new(s)
            });
            let blocks = if resident_batch > 0 {
                blocks_for(config, ctx, batch - resident_batch)
            } else {
                blocks
            };
            let mut backend = match model.new_backend(blocks, config.kv_dtype, offload) {
                Ok(b) => b,
                Err(e) => {
                    report.skipped.push(format!("ctx {ctx} batch {batch}: {e}"));
                    progress(&format!("ctx {ctx} batch {batch}: skipped ({e})"));
                    continue;
                }
            };
            progress(&format!("ctx {ctx} batch {batch}: writing the context"));
            let mut seqs = Vec::with_capacity(batch);
            for b in 0..batch {
                let seq = backend.add_sequence();
                // Tiered: exactly the first `resident_batch` whole on the GPU.
                let tier = (resident_batch > 0).then_some(usize::from(b >= resident_batch));
                fill(
                    model,
                    backend.as_mut(),
                    seq,
                    ctx,
                    config.seed ^ (b as u64) << 20,
                    config.prefill_chunk,
                    tier,
                )?;
                seqs.push(seq);
            }
            let mut dense_tokens: Option<Vec<u32>> = None;
            for &(policy, budget) in &config.policies {
                if slots.is_some() && policy == Policy::Dense {
                    report.skipped.push(format!(
                        "ctx {ctx} batch {batch} dense: offloaded, a dense step reads the whole cache over PCIe"
                    ));
                    continue;
                }
                let plan = plan_for(policy, budget, config);
                if model.device().is_cuda() {
                    if let Err(e) = asynctls_attn::check_gpu_reach(&plan.sparse, per_seq, BLOCK) {
                        report.skipped.push(format!("ctx {ctx} batch {batch} {policy}: {e}"));
                        continue;
                    }
                }
                progress(&format!("ctx {ctx} batch {batch}: decode {policy}"));
                // Every offloaded row starts with no unit resident, so rows compare.
                reset_residency(backend.as_mut())?;
                let forks = seqs
                    .iter()
                    .map(|&s| backend.fork(s))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let mut next: Vec<u32> = (0..batch as u32)
                    .map(|b| (b * 7919 + 1) % model.vocab_size() as u32)
                    .collect();
                let mut generated = Vec::with_capacity(config.decode_tokens);
                let mut times = Vec::with_capacity(config.decode_tokens);
                let mut graphs = DecodeGraphs::new(per_seq, config.cuda_graphs);
                let mut layers_before = None;
                // Warm-up steps (the first runs eagerly, the second is
                // captured as a CUDA graph), then the timed ones.
                const WARMUP: usize = 3;
                for step in 0..config.decode_tokens + WARMUP {
                    if step == WARMUP {
                        // The residency counts from the first timed step.
                        backend.take_offload_reads();
                        layers_before = backend.offload_layer_stats();
                    }
                    let start = Instant::now();
                    next = model.decode_greedy(backend.as_mut(), &forks, &next, &plan, &mut graphs)?;
                    if step >= WARMUP {
                        times.push(start.elapsed().as_secs_f64());
                        generated.push(next[0]);
                    }
                }
                if let Some(why) = &graphs.disabled {
                    report
                        .skipped
                        .push(format!("ctx {ctx} batch {batch} {policy}: CUDA graphs off ({why})"));
                }
                let graphed = graphs.replays > 0;
                drop(graphs);
                let layers = match (&layers_before, backend.offload_layer_stats()) {
                    (Some(b), Some(a)) => layer_residency(b, &a, config.decode_tokens),
                    _ => Vec::new(),
                };
                let h2d_bytes_per_step =
                    (!layers.is_empty()).then(|| layers.iter().map(|l| l.h2d_bytes_per_step).sum());
                let offload = slots
                    .zip(backend.take_offload_reads())
                    .map(|(slots, (hits, misses))| E2eOffload {
                        slots_per_layer: slots,
                        predictor: config.offload_policy.name(),
                        max_promote: (config.offload_policy.max_promote != usize::MAX)
                            .then_some(config.offload_policy.max_promote),
                        host_tiers: config.offload_host_tiers,
                        resident_batch,
                        resident_reads: hits,
                        host_reads: misses,
                        hit_rate: hits as f64 / (hits + misses).max(1) as f64,
                        layers: layers.clone(),
                        h2d_bytes_per_step,
                    });
                // One more step, eager, recording the weights it touches
                // (a MoE's experts depend on the batch): the floor's weights.
                model.trace_weights(true);
                let ids = asynctls_kernels::Tensor::from_vec(next.clone(), &[batch])?.to_device(&device)?;
                model.decode_step(backend.as_mut(), &forks, &ids, &plan)?;
                let weights = model.traced_weight_bytes().unwrap_or(model.weight_bytes_per_step());
                model.trace_weights(false);
                let peak = gpu_used_gib(&device);
                for f in forks {
                    backend.free(f)?;
                }
                let agreement = dense_tokens.as_ref().map(|d: &Vec<u32>| {
                    d.iter().zip(&generated).filter(|(a, b)| a == b).count() as f64 / d.len().max(1) as f64
                });
                if policy == Policy::Dense {
                    dense_tokens = Some(generated);
                }
                let step_s = median(times);
                let floor_ms = step_bytes(model, weights, &plan, ctx, batch) as f64 / HBM_BYTES_PER_S * 1e3;
                report.rows.push(E2eRow {
                    ctx,
                    batch,
                    policy,
                    budget: (policy != Policy::Dense).then_some(budget),
                    decode_tokens_per_s: batch as f64 / step_s,
                    decode_ms_per_step: step_s * 1e3,
                    floor_ms,
                    floor_ratio: step_s * 1e3 / floor_ms,
                    peak_gib: peak,
                    agreement_with_dense: agreement,
                    cuda_graphs: graphed,
                    floor_weight_bytes: weights,
                    offload,
                });
            }
        }
    }
    Ok(report)
}

pub fn render_table(name: &str, device: &Device, report: &E2eReport) -> String {
    use std::fmt::Write;
    let mut s = format!("end-to-end on {device}, {name}\n");
    if let Some(p) = &report.prefill {
        let _ = writeln!(
            s,
            "prefill of {} tokens (chunks of {}): {:.0} tokens/s ({:.2} s)",
            p.tokens, p.chunk, p.prefill_tokens_per_s, p.prefill_s
        );
    }
    let _ = writeln!(
        s,
        "{:>7} {:>5} {:>6} {:>6} {:>12} {:>10} {:>9} {:>7} {:>8} {:>6} {:>8}",
        "ctx",
        "batch",
        "policy",
        "budget",
        "decode tok/s",
        "ms/step",
        "floor ms",
        "x floor",
        "GPU GiB",
        "agree",
        "offload"
    );
    let _ = writeln!(
        s,
        "(steps replayed from CUDA graphs: {})",
        report.rows.iter().any(|r| r.cuda_graphs)
    );
    for r in &report.rows {
        let _ = writeln!(
            s,
            "{:>7} {:>5} {:>6} {:>6} {:>12.1} {:>10.2} {:>9.2} {:>7.2} {:>8} {:>6} {:>8}",
            r.ctx,
            r.batch,
            r.policy.name(),
            r.budget.map_or("-".into(), |b| b.to_string()),
            r.decode_tokens_per_s,
            r.decode_ms_per_step,
            r.floor_ms,
            r.floor_ratio,
            r.peak_gib.map_or("-".into(), |g| format!("{g:.1}")),
            r.agreement_with_dense
                .map_or("-".into(), |a| format!("{:.0}%", a * 100.0)),
            r.offload
                .as_ref()
                .map_or("-".into(), |o| format!("{:.1}% hit", o.hit_rate * 100.0))
        );
    }
    for skip in &report.skipped {
        let _ = writeln!(s, "skipped: {skip}");
    }
    s
}
