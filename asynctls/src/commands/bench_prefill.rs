//! `asynctls bench prefill`.

use anyhow::{bail, Context, Result};
use asynctls::bench::prefill_cuda::{self, PrefillShape};
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
    /// MLA in the absorbed form (GLM-4.7-Flash: one latent KV head of
    /// 512 + 64, values the first 512 columns); --q-heads 20 for its shape.
    /// --kv-heads and --head-dim are ignored.
    #[arg(long)]
    mla: bool,
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
        if args.mla {
            PrefillShape {
                q_heads: args.q_heads,
                kv_heads: 1,
                key_dim: 576,
                value_dim: 512,
                mla: true,
            }
        } else {
            PrefillShape {
                q_heads: args.q_heads,
                kv_heads: args.kv_heads,
                key_dim: args.head_dim,
                value_dim: args.head_dim,
                mla: false,
            }
        },
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
        "{:>7} {:>8} {:>8} {:>12} {:>8}",
        "ctx", "heads", "dk/dv", "median us", "TFLOP/s"
    );
    for r in &rows {
        println!(
            "{:>7} {:>8} {:>8} {:>12.1} {:>8.1}",
            r.ctx,
            format!("{}/{}", r.q_heads, r.kv_heads),
            format!("{}/{}", r.head_dim, r.value_dim),
            r.time_us_median,
            r.tflops
        );
    }
    Ok(())
}
