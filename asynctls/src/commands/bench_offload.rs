//! `asynctls bench offload`.

use anyhow::{bail, Context, Result};
use asynctls::bench::offload_cuda::{self, OffloadSweep, PromotePolicyKind};
use asynctls_kernels::{Device, DeviceRequest};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct OffloadArgs {
    /// Where to run: cuda, cuda:N or auto (the offload engine needs a GPU).
    #[arg(long, default_value = "cuda")]
    device: DeviceRequest,
    /// Context lengths (tokens), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "98304")]
    ctx: Vec<usize>,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Layers per step (each with its own pool, selection and residency;
    /// Qwen3-8B has 36). One layer's copies overlap the next layers.
    #[arg(long, default_value_t = 36)]
    layers: usize,
    /// Query heads and KV heads, head dim (Qwen3-8B by default).
    #[arg(long, default_value_t = 32)]
    q_heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// k_b: candidate blocks per (sequence, KV head).
    #[arg(long, default_value_t = 128)]
    block_topk: usize,
    /// k_t: tokens attended per (sequence, KV head), besides sink and local.
    #[arg(long, default_value_t = 2048)]
    budget: usize,
    /// Resident slots per (sequence, KV head) as a multiple of k_b.
    #[arg(long, default_value_t = 1.5)]
    slack: f64,
    /// Per-step query drift (uniform noise of this amplitude added to q).
    #[arg(long, default_value_t = 0.05)]
    drift: f32,
    /// Timed steps per configuration (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Predictors of the device-side resolver to run: one-step-lag, union
    /// (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "one-step-lag,union")]
    predictor: Vec<PromotePolicyKind>,
    /// CTAs of the device resolver's copy kernel, one run per value (0: one per SM).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    copy_ctas: Vec<usize>,
    /// Also run the host-driven offload engine, once per value: runs of
    /// contiguous units at least this many bytes go by memcpy, the rest by
    /// the mapped-memory gather (0: all memcpy; a huge value: all gather).
    /// It keeps a host pool per layer, so it needs --layers within the host budget.
    #[arg(long, value_delimiter = ',')]
    memcpy_min_bytes: Vec<usize>,
    /// Pinned host memory (GiB) the host tiers may take; beyond it layers
    /// share host pools (their data alias; each layer's residency, slots and
    /// traffic stay its own).
    #[arg(long, default_value_t = 48.0)]
    host_budget_gb: f64,
    /// Skip the GPU-resident mode: each layer's K/V goes to the host tier as
    /// soon as it is written, so batches whose K/V exceed GPU memory run.
    #[arg(long)]
    no_resident: bool,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: OffloadArgs) -> Result<()> {
    let device = Device::from_request(args.device).context("opening the device")?;
    let Device::Cuda(gpu) = &device else {
        bail!("bench offload needs a CUDA device (the offload engine moves K/V between host and GPU memory)");
    };
    if args.slack < 1.0 {
        bail!("--slack must be at least 1 (the resident pool must hold one selection)");
    }
    let sweep = OffloadSweep {
        q_heads: args.q_heads,
        kv_heads: args.kv_heads,
        head_dim: args.head_dim,
        layers: args.layers,
        contexts: args.ctx.clone(),
        batches: args.batch.clone(),
        block_topk: args.block_topk,
        token_topk: args.budget,
        slack: args.slack,
        drift: args.drift,
        steps: args.steps.max(3),
        predictors: args.predictor.clone(),
        copy_ctas: args.copy_ctas.clone(),
        memcpy_min_bytes: args.memcpy_min_bytes.clone(),
        host_budget_bytes: (args.host_budget_gb.max(0.0) * (1u64 << 30) as f64) as usize,
        resident: !args.no_resident,
    };
    let bar = ProgressBar::new_spinner().with_style(ProgressStyle::default_spinner());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let rows = offload_cuda::run(gpu, &sweep, |m| bar.set_message(m.to_string()))?;
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "bench": "offload", "device": gpu.name().unwrap_or_default(),
                "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                "layers": args.layers, "block_topk": args.block_topk, "budget": args.budget,
                "slack": args.slack, "drift": args.drift, "host_budget_gb": args.host_budget_gb, "rows": rows
            }))?
        );
        return Ok(());
    }
    println!(
        "sparse decode, K/V on the GPU vs offloaded ({}): {} layers of {}/{} heads, d {}, k_b {}, k_t {}, slack {}, drift {}",
        gpu.name().unwrap_or_default(),
        args.layers,
        args.q_heads,
        args.kv_heads,
        args.head_dim,
        args.block_topk,
        args.budget,
        args.slack,
        args.drift
    );
    println!(
        "{:>7} {:>5} {:>16} {:>12} {:>9} {:>9} {:>7} {:>6} {:>6} {:>7} {:>10} {:>7} {:>8} {:>9} {:>9} {:>8}",
        "ctx",
        "batch",
        "mode",
        "predictor",
        "graph us",
        "eager us",
        "x res.",
        "hit",
        "miss",
        "overlap",
        "H2D MB/st",
        "hidden",
        "x dense",
        "launch us",
        "graph-l us",
        "book us"
    );
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for r in &rows {
        let label = match (&r.predictor, r.memcpy_min_bytes) {
            (Some(p), _) => format!("{p}/{}", r.copy_ctas.unwrap_or(0)),
            (None, Some(usize::MAX)) => "gather".into(),
            (None, Some(b)) => format!("memcpy>={b}"),
            (None, None) => "-".into(),
        };
        println!(
            "{:>7} {:>5} {:>16} {:>12} {:>9} {:>9.0} {:>7} {:>6} {:>6} {:>7} {:>10} {:>7} {:>8.3} {:>9.0} {:>9} {:>8}",
            r.ctx,
            r.batch,
            r.mode,
            label,
            opt(r.graph_step_us, 0),
            r.eager_step_us,
            opt(r.vs_resident, 2),
            opt(r.hit_rate, 3),
            opt(r.miss_rate, 4),
            opt(r.overlap_rate, 3),
            opt(r.h2d_bytes_per_step.map(|b| b / 1e6), 2),
            opt(r.hidden_fraction, 2),
            r.gpu_fraction_of_dense_kv,
            r.host_launch_us_per_step,
            opt(r.host_graph_launch_us_per_step, 0),
            opt(r.host_bookkeeping_us_per_step, 0)
        );
    }
    Ok(())
}
