//! `asynctls bench e2e`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use asynctls::bench::e2e::{self, E2eBenchConfig};
use asynctls_attn::Policy;
use asynctls_kernels::{Device, DeviceRequest};
use asynctls_kvcache::KvDType;
use asynctls_models::{load_model, CausalLm, GqaConfig, GqaModel, RandomWeights};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct E2eArgs {
    #[arg(long, default_value = "cpu")]
    device: DeviceRequest,
    /// A built-in real-model configuration with random weights
    /// (smollm2-135m, qwen2.5-0.5b, qwen3-8b, qwen3-14b).
    #[arg(long, default_value = "smollm2-135m", conflicts_with = "model")]
    model_shape: String,
    /// A model directory instead of a built-in shape.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1024,8192")]
    ctx: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "dense,tls")]
    policies: Vec<Policy>,
    #[arg(long, default_value_t = 1024)]
    budget: usize,
    #[arg(long, default_value_t = 2)]
    dense_layers: usize,
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: E2eArgs) -> Result<()> {
    let device = Device::from_request(args.device).context("opening the device")?;
    if device.is_cuda() {
        bail!("bench e2e runs on the CPU for now (the CUDA model path is not built yet); use --device cpu");
    }
    let (name, model) = match &args.model {
        Some(dir) => (dir.display().to_string(), load_model(dir)?),
        None => {
            let config = GqaConfig::preset(&args.model_shape).with_context(|| {
                format!(
                    "unknown --model-shape `{}` (known: {})",
                    args.model_shape,
                    GqaConfig::PRESETS.join(", ")
                )
            })?;
            let weights = RandomWeights {
                seed: args.seed,
                std: 0.02,
            };
            (
                format!("{} (random weights)", args.model_shape),
                Box::new(GqaModel::load(config, &weights)?) as Box<dyn CausalLm>,
            )
        }
    };
    let config = E2eBenchConfig {
        contexts: args.ctx.clone(),
        policies: args.policies.clone(),
        budget: args.budget,
        dense_layers: args.dense_layers,
        decode_tokens: args.decode_tokens,
        kv_dtype: KvDType::BF16,
        seed: args.seed,
    };
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} bench e2e: {msg} ({elapsed})").expect("static template"));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let rows = e2e::run(model.as_ref(), &config, |m| bar.set_message(m.to_string()))?;
    bar.finish_and_clear();
    if args.json {
        let doc = serde_json::json!({ "bench": "e2e", "model": name, "device": device.to_string(), "rows": rows });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{}", e2e::render_table(&name, &rows));
    }
    Ok(())
}
