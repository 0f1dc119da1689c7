//! `asynctls bench attn`: one decode step of attention, dense and every
//! sparse policy, on synthetic long-context workloads. Reports per
//! configuration the time per step, recall of the dense softmax mass, the
//! relative error of the output, and the bytes the step read next to the
//! bytes a dense step reads.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use asynctls_attn::calibrate::calibrate_channels;
use asynctls_attn::metrics::{dense_probabilities, recall, relative_l2};
use asynctls_attn::{decode, AttnShape, DecodeReport, GroupReduce, Policy, SparseConfig, StepBytes};
use asynctls_kernels::Device;
use asynctls_kvcache::{CacheConfig, HostKvStorage, LabelChannels, PagedKvCache, SeqId};
use serde::Serialize;

use super::median;
use super::workload::WorkloadSpec;

/// One benchmark sweep.
#[derive(Debug, Clone)]
pub struct AttnBenchConfig {
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    pub budgets: Vec<usize>,
    pub policies: Vec<Policy>,
    pub shape: AttnShape,
    /// MLA stores only keys; values are their first `value_dim` channels.
    pub mla: bool,
    pub block_size: usize,
    /// k_b for tls (quest's comes from the budget).
    pub block_topk: usize,
    pub group_reduce: GroupReduce,
    pub reps: usize,
    pub seed: u64,
}

/// One row of the result.
#[derive(Debug, Clone, Serialize)]
pub struct AttnBenchRow {
    pub ctx: usize,
    pub batch: usize,
    pub policy: Policy,
    /// Token budget (k_t for tls/ds, k_b * B for quest); none for dense.
    pub budget: Option<usize>,
    pub time_ms_median: f64,
    pub time_ms_min: f64,
    pub recall: f64,
    pub rel_err: f64,
    pub attended_fraction: f64,
    pub bytes: StepBytes,
    pub bytes_total: usize,
    pub dense_bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttnBenchReport {
    pub device: String,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub mla: bool,
    pub block_size: usize,
    pub reps: usize,
    pub rows: Vec<AttnBenchRow>,
}

/// Runs the sweep on `device`, calling `progress` after each configuration.
pub fn run(config: &AttnBenchConfig, device: &Device, mut progress: impl FnMut(&str)) -> Result<AttnBenchReport> {
    if !device.is_cpu() {
        bail!("bench attn on {device}: the CUDA attention kernels are not built yet; run with --device cpu");
    }
    let shape = config.shape;
    shape.validate()?;
    if config.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let spec = WorkloadSpec::default();
    let mut rows = Vec::new();
    for &ctx in &config.contexts {
        for &batch in &config.batches {
            if ctx == 0 || batch == 0 {
                bail!("contexts and batch sizes must be positive (got ctx {ctx}, batch {batch})");
            }
            let lens = vec![ctx; batch];
            let seed = config.seed ^ (ctx as u64).wrapping_mul(0x9e37_79b9) ^ batch as u64;
            let workload = spec.generate(&shape, !config.mla, &lens, seed);

            // Label channels from a separate calibration draw of the same distribution.
            let calib = spec.generate(&shape, false, &[2048], seed ^ 0xca11b);
            let r = if config.mla { 128 } else { 32 }.min(shape.key_dim);
            let channels = calibrate_channels(&calib.queries, &calib.keys[0], &shape, r)?;

            let mut cache_config = if config.mla {
                CacheConfig::mla(1, shape.value_dim, shape.key_dim - shape.value_dim, 1)
            } else {
                CacheConfig::gqa(1, shape.kv_heads, shape.key_dim, 1)
            };
            cache_config.block_size = config.block_size;
            cache_config.label_channels = r;
            cache_config.num_blocks = batch * ctx.div_ceil(config.block_size);
            let storage = HostKvStorage::new(&cache_config, LabelChannels::new(vec![channels]))?;
            let mut cache = PagedKvCache::new(storage)?;
            let seqs: Vec<SeqId> = (0..batch).map(|_| cache.add_sequence()).collect();
            for (i, &s) in seqs.iter().enumerate() {
                cache
                    .append(s, &[&workload.keys[i]], &[&workload.values[i]])
                    .context("filling the cache")?;
            }
            let tables: Vec<_> = seqs.iter().map(|&s| cache.table(s)).collect::<Result<_, _>>()?;
            let storage = cache.storage();
            let q = &workload.queries;
            let probs = dense_probabilities(storage, &tables, 0, q, &shape);
            let dense_bytes = DecodeReport::dense_bytes(storage, &lens);

            let time = |sparse: &SparseConfig| -> Result<(Vec<f32>, DecodeReport, Vec<f64>)> {
                let mut out = vec![0.0f32; batch * shape.q_heads * shape.value_dim];
                let mut report = decode(storage, &tables, 0, q, &shape, sparse, &mut out)?; // warm-up
                let mut times = Vec::with_capacity(config.reps);
                for _ in 0..config.reps {
                    let start = Instant::now();
                    report = decode(storage, &tables, 0, q, &shape, sparse, &mut out)?;
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
                Ok((out, report, times))
            };

            let dense_cfg = SparseConfig {
                policy: Policy::Dense,
                ..SparseConfig::default()
            };
            let (dense_out, _, _) = time(&dense_cfg)?;
            let mut jobs: Vec<(Policy, Option<usize>)> = Vec::new();
            for &p in &config.policies {
                if p == Policy::Dense {
                    jobs.push((p, None));
                } else {
                    jobs.extend(config.budgets.iter().map(|&b| (p, Some(b))));
                }
            }
            for (policy, budget) in jobs {
                let sparse = match budget {
                    None => dense_cfg.clone(),
                    Some(b) => {
                        let mut sparse = SparseConfig::with_budget(policy, b, config.block_size);
                        // The bench measures the sparse path itself at every context.
                        sparse.dense_below = 0;
                        sparse.group_reduce = config.group_reduce;
                        if policy == Policy::Tls {
                            sparse.block_topk = config.block_topk;
                        }
                        sparse
                    }
                };
                let (out, report, times) = time(&sparse)?;
                let bytes = report.bytes(storage);
                rows.push(AttnBenchRow {
                    ctx,
                    batch,
                    policy,
                    budget,
                    time_ms_median: median(times.clone()),
                    time_ms_min: times.iter().cloned().fold(f64::INFINITY, f64::min),
                    recall: recall(&report, &probs, &shape),
                    rel_err: relative_l2(&out, &dense_out),
                    attended_fraction: report.attended_fraction(&lens, shape.kv_heads),
                    bytes,
                    bytes_total: bytes.total(),
                    dense_bytes,
                });
                progress(&format!(
                    "ctx {ctx} batch {batch} {policy} {}",
                    budget.map_or("-".into(), |b| b.to_string())
                ));
            }
        }
    }
    Ok(AttnBenchReport {
        device: device.to_string(),
        q_heads: shape.q_heads,
        kv_heads: shape.kv_heads,
        key_dim: shape.key_dim,
        value_dim: shape.value_dim,
        mla: config.mla,
        block_size: config.block_size,
        reps: config.reps,
        rows,
    })
}

/// Number of configurations a sweep runs (for progress bars).
pub fn job_count(config: &AttnBenchConfig) -> usize {
    let per_shape: usize = config
        .policies
        .iter()
        .map(|&p| if p == Policy::Dense { 1 } else { config.budgets.len() })
        .sum();
    per_shape * config.contexts.len() * config.batches.len()
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// The human-readable table.
pub fn render_table(report: &AttnBenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "attention decode on {}: {} q heads, {} kv heads, key dim {}, value dim {}{}, blocks of {}, median of {} reps",
        report.device,
        report.q_heads,
        report.kv_heads,
        report.key_dim,
        report.value_dim,
        if report.mla { " (MLA latent)" } else { "" },
        report.block_size,
        report.reps
    );
    let _ = writeln!(
        s,
        "{:>7} {:>5} {:>6} {:>6} {:>10} {:>8} {:>9} {:>9} {:>11} {:>11} {:>7}",
        "ctx",
        "batch",
        "policy",
        "budget",
        "time ms",
        "recall",
        "rel err",
        "attended",
        "read MiB",
        "dense MiB",
        "read/d"
    );
    for r in &report.rows {
        let _ = writeln!(
            s,
            "{:>7} {:>5} {:>6} {:>6} {:>10.3} {:>8.4} {:>9.2e} {:>8.1}% {:>11.2} {:>11.2} {:>7.3}",
            r.ctx,
            r.batch,
            r.policy.name(),
            r.budget.map_or("-".to_string(), |b| b.to_string()),
            r.time_ms_median,
            r.recall,
            r.rel_err,
            r.attended_fraction * 100.0,
            mib(r.bytes_total),
            mib(r.dense_bytes),
            r.bytes_total as f64 / r.dense_bytes as f64
        );
    }
    s
}
