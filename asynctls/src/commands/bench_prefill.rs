//! `asynctls bench prefill`.

use anyhow::{bail, Context, Result};
use asynctls::bench::prefill_cuda;
use asynctls_kernels::{Device, DeviceRequest};
use clap::Args;

#[derive(Debug, Args)]
pub struct PrefillArgs {
    /// Where to run: cuda, cuda:N or auto (this benchmark is GPU only).
    #[arg(long, default_value = "cuda")]
    device: DeviceRequest,
    /// Prompt lengths (tokens), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768")]
    ctx: Vec<usize>,
    /// Query heads, KV heads, head dim (Qwen3-8B by default).
    #[arg(long, default_value_t = 32)]
    q_heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PrefillArgs) -> Result<()> {
    let device = Device::from_request(args.device).context("opening the device")?;
    let Device::Cuda(gpu) = &device else {
        bail!("bench prefill measures the CUDA prefill kernel; it needs --device cuda");
    };
    let rows = prefill_cuda::run(
        gpu,
        args.q_heads,
        args.kv_heads,
        args.head_dim,
        &args.ctx,
        args.reps.max(3),
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"bench": "prefill", "device": gpu.name().unwrap_or_default(), "rows": rows})
            )?
        );
        return Ok(());
    }
    println!("causal prefill attention on {} (cuda)", gpu.name().unwrap_or_default());
    println!(
        "{:>7} {:>8} {:>4} {:>12} {:>8}",
        "ctx", "heads", "d", "median us", "TFLOP/s"
    );
    for r in &rows {
        println!(
            "{:>7} {:>8} {:>4} {:>12.1} {:>8.1}",
            r.ctx,
            format!("{}/{}", r.q_heads, r.kv_heads),
            r.head_dim,
            r.time_us_median,
            r.tflops
        );
    }
    Ok(())
}
