//! `asynctls bench offload`.

use anyhow::{bail, Context, Result};
use asynctls::bench::offload_cuda::{self, OffloadSweep};
use asynctls_kernels::{Device, DeviceRequest};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct OffloadArgs {
    /// Where to run: cuda, cuda:N or auto (the offload engine needs a GPU).
    #[arg(long, default_value = "cuda")]
    device: DeviceRequest,
    /// Context lengths (tokens), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "49152,98304")]
    ctx: Vec<usize>,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    batch: Vec<usize>,
    /// Layers simulated per step (each with its own pool; prefetches of one
    /// layer overlap the compute of the others).
    #[arg(long, default_value_t = 4)]
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
    /// Runs of contiguous units at least this many bytes go by memcpy, the
    /// rest by the mapped-memory gather; several values compare them
    /// (0: all memcpy; a huge value: all gather).
    #[arg(long, value_delimiter = ',', default_value = "0,262144,18446744073709551615")]
    memcpy_min_bytes: Vec<usize>,
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
        memcpy_min_bytes: args.memcpy_min_bytes.clone(),
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
                "slack": args.slack, "drift": args.drift, "rows": rows
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
        "{:>7} {:>5} {:>13} {:>10} {:>10} {:>8} {:>6} {:>6} {:>6} {:>11} {:>7} {:>10} {:>8} {:>9} {:>9}",
        "ctx",
        "batch",
        "mode",
        "memcpy>=",
        "step us",
        "x res.",
        "hit",
        "miss",
        "late",
        "H2D MB/st",
        "hidden",
        "GPU MB/seq",
        "x dense",
        "launch us",
        "book us"
    );
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for r in &rows {
        println!(
            "{:>7} {:>5} {:>13} {:>10} {:>10.0} {:>8} {:>6} {:>6} {:>6} {:>11} {:>7} {:>10.1} {:>8.3} {:>9.0} {:>9}",
            r.ctx,
            r.batch,
            r.mode,
            r.memcpy_min_bytes.map_or("-".into(), |b| if b == usize::MAX {
                "never".into()
            } else {
                b.to_string()
            }),
            r.step_us_median,
            opt(r.vs_resident, 2),
            opt(r.hit_rate, 3),
            opt(r.miss_rate, 3),
            opt(r.late_per_step, 0),
            opt(r.h2d_bytes_per_step.map(|b| b / 1e6), 2),
            opt(r.hidden_fraction, 2),
            r.gpu_bytes_per_seq_layer as f64 / 1e6 * r.layers as f64,
            r.gpu_fraction_of_dense_kv,
            r.host_launch_us_per_step,
            opt(r.host_bookkeeping_us_per_step, 0)
        );
    }
    Ok(())
}
