//! `asynctls bench attn`.

use anyhow::{Context, Result};
use asynctls::bench::attn::{self, AttnBenchConfig};
use asynctls_attn::{AttnShape, GroupReduce, Policy};
use asynctls_kernels::{Device, DeviceRequest};
use asynctls_models::{AttentionKind, KnownModel};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct AttnArgs {
    /// Where to run: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: DeviceRequest,
    /// Context lengths (tokens), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768")]
    ctx: Vec<usize>,
    /// Batch sizes (sequences per step), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Token budgets of the sparse policies (k_t for tls/ds, k_b*B for quest).
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048")]
    budget: Vec<usize>,
    /// Policies to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "dense,tls,quest,ds")]
    policies: Vec<Policy>,
    /// A known model's attention shape (qwen3-8b, qwen3-14b, glm-4.7-flash);
    /// overrides the head options below.
    #[arg(long)]
    shape: Option<KnownModel>,
    /// Query heads (per KV head group for GQA; all heads for MLA).
    #[arg(long, value_delimiter = ',', default_value = "32")]
    q_heads: Vec<usize>,
    /// KV heads (GQA).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    kv_heads: Vec<usize>,
    /// Head dimension (GQA).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    head_dim: Vec<usize>,
    /// MLA in the absorbed form: one latent KV head of kv-lora-rank + rope-dim.
    #[arg(long)]
    mla: bool,
    #[arg(long, default_value_t = 512)]
    kv_lora_rank: usize,
    #[arg(long, default_value_t = 64)]
    rope_dim: usize,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Blocks the tls block filter keeps (k_b).
    #[arg(long, default_value_t = 128)]
    block_topk: usize,
    /// How a group's per-head scores are combined: sum or max.
    #[arg(long, default_value = "sum")]
    group_reduce: String,
    /// Timed repetitions per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

impl AttnArgs {
    /// Every (shape, mla) the options ask for.
    fn shapes(&self) -> Vec<(AttnShape, bool)> {
        if let Some(model) = self.shape {
            let g = model.geometry();
            return vec![match g.kind {
                AttentionKind::Gqa { kv_heads, head_dim } => (AttnShape::gqa(g.q_heads, kv_heads, head_dim), false),
                AttentionKind::Mla {
                    kv_lora_rank, rope_dim, ..
                } => (
                    AttnShape::mla(g.q_heads, kv_lora_rank, rope_dim, g.softmax_scale()),
                    true,
                ),
            }];
        }
        if self.mla {
            let scale = 1.0 / ((self.kv_lora_rank / 2 + self.rope_dim) as f32).sqrt();
            return self
                .q_heads
                .iter()
                .map(|&h| (AttnShape::mla(h, self.kv_lora_rank, self.rope_dim, scale), true))
                .collect();
        }
        let mut shapes = Vec::new();
        for &q in &self.q_heads {
            for &kv in &self.kv_heads {
                for &d in &self.head_dim {
                    shapes.push((AttnShape::gqa(q, kv, d), false));
                }
            }
        }
        shapes
    }
}

pub fn run(args: AttnArgs) -> Result<()> {
    let device = Device::from_request(args.device).context("opening the device")?;
    if let Device::Cuda(gpu) = &device {
        return run_cuda(&args, gpu);
    }
    let group_reduce = match args.group_reduce.as_str() {
        "sum" => GroupReduce::Sum,
        "max" => GroupReduce::Max,
        other => anyhow::bail!("unknown --group-reduce `{other}` (expected sum or max)"),
    };
    let mut reports = Vec::new();
    for (shape, mla) in args.shapes() {
        let config = AttnBenchConfig {
            contexts: args.ctx.clone(),
            batches: args.batch.clone(),
            budgets: args.budget.clone(),
            policies: args.policies.clone(),
            shape,
            mla,
            block_size: args.block_size,
            block_topk: args.block_topk,
            group_reduce,
            reps: args.reps,
            seed: args.seed,
        };
        let bar = ProgressBar::new(attn::job_count(&config) as u64).with_style(
            ProgressStyle::with_template("{spinner} bench attn [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .expect("static template")
                .progress_chars("=> "),
        );
        let report = attn::run(&config, &device, |msg| {
            bar.set_message(msg.to_string());
            bar.inc(1);
        })?;
        bar.finish_and_clear();
        if !args.json {
            println!("{}", attn::render_table(&report));
        }
        reports.push(report);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "bench": "attn", "reports": reports }))?
        );
    }
    Ok(())
}

/// The GPU sweep: every shape asked for, dense and tls at each budget.
fn run_cuda(args: &AttnArgs, gpu: &asynctls_kernels::CudaDevice) -> Result<()> {
    use asynctls::bench::attn_cuda::{self, CudaSweep};
    let mut all = Vec::new();
    for (shape, mla) in args.shapes() {
        let label_channels = if mla { 128 } else { 32 }.min(shape.key_dim);
        let sweep = CudaSweep {
            shape,
            mla,
            label_channels,
            block_topk: args.block_topk,
            contexts: args.ctx.clone(),
            batches: args.batch.clone(),
            budgets: args.budget.clone(),
            reps: args.reps.max(20),
        };
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let rows = attn_cuda::run(gpu, &sweep, |m| bar.set_message(m.to_string()))?;
        bar.finish_and_clear();
        let what = if mla { "mla" } else { "gqa" };
        if !args.json {
            println!(
                "decode attention on {} (cuda), {what}: {} q heads, {} kv heads, key dim {}, value dim {}, k_b {}, r {}; HBM floor at {:.1} TB/s",
                gpu.name().unwrap_or_default(),
                shape.q_heads,
                shape.kv_heads,
                shape.key_dim,
                shape.value_dim,
                args.block_topk,
                label_channels,
                attn_cuda::HBM_BYTES_PER_S / 1e12
            );
            println!(
                "{:>6} {:>7} {:>5} {:>6} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8} {:>7}",
                "kind",
                "ctx",
                "batch",
                "budget",
                "attended",
                "splits",
                "step us",
                "select us",
                "attend us",
                "floor us",
                "x floor",
                "TB/s"
            );
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            for r in &rows {
                println!(
                    "{:>6} {:>7} {:>5} {:>6} {:>9.0} {:>6} {:>10.1} {:>10} {:>10} {:>10.1} {:>8.2} {:>7.2}",
                    r.kind,
                    r.ctx,
                    r.batch,
                    r.budget.map_or("-".into(), |b| b.to_string()),
                    r.attended_tokens,
                    r.splits,
                    r.time_us_median,
                    opt(r.select_us_median),
                    opt(r.attend_us_median),
                    r.hbm_floor_us,
                    r.floor_ratio,
                    r.achieved_tb_s
                );
            }
        }
        all.push(serde_json::json!({
            "attention": what, "q_heads": shape.q_heads, "kv_heads": shape.kv_heads,
            "key_dim": shape.key_dim, "value_dim": shape.value_dim, "label_channels": label_channels,
            "rows": rows
        }));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"bench": "attn", "device": "cuda", "reports": all}))?
        );
    }
    Ok(())
}
