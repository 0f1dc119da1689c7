//! `asynctls bench e2e`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use asynctls::bench::e2e::{self, E2eBenchConfig};
use asynctls_attn::Policy;
use asynctls_kernels::{Device, DeviceRequest};
use asynctls_kvcache::KvDType;
use asynctls_models::{load_model_on, ModelShape, RandomWeights};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct E2eArgs {
    /// cpu, cuda, cuda:N or auto (the GPU when one is present).
    #[arg(long, default_value = "cpu")]
    device: DeviceRequest,
    /// A built-in real-model configuration with random weights
    /// (smollm2-135m, qwen2.5-0.5b, qwen3-8b, qwen3-14b, glm-4.7-flash);
    /// on a GPU the weights are generated there in bf16.
    #[arg(long, default_value = "smollm2-135m", conflicts_with = "model")]
    model_shape: String,
    /// A model directory instead of a built-in shape.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1024,8192")]
    ctx: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "dense,tls")]
    policies: Vec<Policy>,
    /// Token budgets of the sparse policies (each sparse policy runs at each).
    #[arg(long, value_delimiter = ',', default_value = "1024")]
    budget: Vec<usize>,
    /// k_b of tls (raised to cover the budget when smaller); default 128
    /// for GQA and 256 for MLA (docs/decisions/0003-mla-sparse-defaults.md).
    #[arg(long)]
    block_topk: Option<usize>,
    #[arg(long, default_value_t = 2)]
    dense_layers: usize,
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Prompt length of the prefill measurement (0 skips it; default: the first context).
    #[arg(long)]
    prefill_tokens: Option<usize>,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = asynctls_models::DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run the largest batch whose cache fits in the GPU memory left,
    /// at each context (GPU only).
    #[arg(long)]
    largest_batch: bool,
    /// Run every decode step eagerly instead of replaying CUDA graphs.
    #[arg(long)]
    no_cuda_graphs: bool,
    /// Keep the K/V in pinned host memory behind the offload engine (the
    /// residency decided on the GPU), the sparse policies only; with
    /// --largest-batch, the largest batch the host memory holds.
    #[arg(long)]
    offload: bool,
    /// Resident slots of an offloaded cache: this many times k_b, plus the
    /// sink, local and partial blocks, per (sequence, KV head) and layer.
    #[arg(long, default_value_t = 2.0, requires = "offload")]
    offload_slack: f64,
    /// Offloaded layers share this many host pools: fewer than the layers
    /// alias their rows, so batches whose K/V the host cannot hold still
    /// run (their step time is measured; their tokens mean nothing).
    #[arg(long, requires = "offload")]
    offload_host_tiers: Option<usize>,
    /// Offloaded: the first N sequences of each batch in a resident tier
    /// (K/V whole on the GPU) beside the offloaded cache, the rest
    /// offloaded: what a GPU serves when its memory holds only some.
    #[arg(long, default_value_t = 0, requires = "offload")]
    offload_resident_batch: usize,
    #[command(flatten)]
    offload_policy: super::OffloadPolicyArgs,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: E2eArgs) -> Result<()> {
    let device = Device::from_request(args.device).context("opening the device")?;
    if matches!(args.device, DeviceRequest::Auto) {
        eprintln!("bench e2e: --device auto picked {device}");
    }
    let (name, model) = match &args.model {
        Some(dir) => (dir.display().to_string(), load_model_on(dir, &device)?),
        None => {
            let weights = RandomWeights {
                seed: args.seed,
                std: 0.02,
            };
            let shape = ModelShape::named(&args.model_shape).with_context(|| {
                format!(
                    "unknown --model-shape `{}` (known: {})",
                    args.model_shape,
                    ModelShape::names().join(", ")
                )
            })?;
            let model = shape.load(&weights, &device)?;
            (format!("{} (random weights)", args.model_shape), model)
        }
    };
    if args.prefill_chunk == 0 || args.decode_tokens == 0 || args.batch.contains(&0) {
        bail!("--prefill-chunk, --decode-tokens and --batch must be positive");
    }
    let mut policies = Vec::new();
    for &p in &args.policies {
        if p == Policy::Dense {
            policies.push((p, 0));
        } else {
            policies.extend(args.budget.iter().map(|&b| (p, b)));
        }
    }
    let config = E2eBenchConfig {
        contexts: args.ctx.clone(),
        batches: args.batch.clone(),
        policies,
        block_topk: args.block_topk.unwrap_or_else(|| {
            let mut sparse = asynctls_attn::SparseConfig::with_budget(Policy::Tls, 0, 64);
            sparse.fit_to_cache(&model.cache_config(1, KvDType::BF16));
            sparse.block_topk
        }),
        dense_layers: args.dense_layers,
        decode_tokens: args.decode_tokens,
        prefill_tokens: args.prefill_tokens.unwrap_or(args.ctx.first().copied().unwrap_or(0)),
        prefill_chunk: args.prefill_chunk,
        kv_dtype: KvDType::BF16,
        seed: args.seed,
        cuda_graphs: !args.no_cuda_graphs,
        largest_batch: args.largest_batch,
        offload_slack: args.offload.then_some(args.offload_slack),
        offload_host_tiers: args.offload_host_tiers,
        offload_resident_batch: args.offload_resident_batch,
        offload_policy: args.offload_policy.policy(args.offload && device.is_cuda())?,
    };
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} bench e2e: {msg} ({elapsed})").expect("static template"));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let report = e2e::run(model.as_ref(), &config, |m| bar.set_message(m.to_string()))?;
    bar.finish_and_clear();
    if args.json {
        let doc = serde_json::json!({
            "bench": "e2e",
            "model": name,
            "model_shape": args.model.is_none().then_some(&args.model_shape),
            "device": device.to_string(),
            "hbm_bytes_per_s": e2e::HBM_BYTES_PER_S,
            "prefill": report.prefill,
            "rows": report.rows,
            "skipped": report.skipped,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{}", e2e::render_table(&name, &device, &report));
    }
    Ok(())
}
