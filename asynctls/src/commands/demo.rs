//! `asynctls demo`: long-context needle retrieval with dense and with
//! two-level sparse attention on a real model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use asynctls::demo::Needle;
use asynctls::engine::{Engine, Request};
use asynctls::sampler::SamplingParams;
use asynctls_attn::{Policy, SparseConfig};
use asynctls_kernels::{Device, DeviceRequest};
use asynctls_kvcache::KvDType;
use asynctls_models::{AttentionPlan, ChatMessage, Tokenizer};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::pull::ensure_pulled;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// A pulled model name or a model directory.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Words of filler text around the needle (about 1.3 tokens each).
    #[arg(long, default_value_t = 1500)]
    words: usize,
    /// Tokens the sparse run keeps per step and KV head (k_t), besides the
    /// sink and the local window.
    #[arg(long, default_value_t = 256)]
    budget: usize,
    /// Seed of the needle (random when absent).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    /// One JSON document instead of the report.
    #[arg(long)]
    json: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let device = Device::from_request(args.device).context("opening the device")?;
    if matches!(args.device, DeviceRequest::Auto) && !args.json {
        eprintln!("demo: --device auto picked {device}");
    }
    let dir = if std::path::Path::new(&args.model).is_dir() {
        PathBuf::from(&args.model)
    } else {
        ensure_pulled(&args.model, args.cache_dir.as_deref(), args.json)?
    };
    let spinner = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner.set_message(format!("loading {}", dir.display()));
    let model = asynctls::engine::load_for_request(&dir, args.device, &device)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let needle = Needle::generate(args.words, seed);
    let rendered = tokenizer.apply_chat_template(&[ChatMessage::user(needle.prompt())], true)?;
    let prompt_ids = tokenizer.encode(&rendered, false)?;
    let mut stop_ids = model.eos_token_ids();
    stop_ids.extend(tokenizer.eos_token_id());
    let request = Request {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids,
    };
    let runs = [
        ("dense", AttentionPlan::dense()),
        (
            "tls",
            AttentionPlan {
                sparse: SparseConfig {
                    policy: Policy::Tls,
                    token_topk: args.budget,
                    dense_below: 0,
                    ..SparseConfig::default()
                },
                dense_layers: 0,
            },
        ),
    ];
    let mut engine = Engine::new(model, AttentionPlan::dense(), KvDType::F32);
    engine.measure_attention = true;
    let mut results = Vec::new();
    for (name, plan) in runs {
        engine.plan = plan;
        spinner.set_message(format!("{name}: prefilling {} tokens", prompt_ids.len()));
        let (mut gens, timings) = engine.generate(std::slice::from_ref(&request), |_| {
            spinner.set_message(format!("{name}: decoding"))
        })?;
        let generation = gens.remove(0);
        let answer = tokenizer.decode(&generation.generated_ids)?;
        results.push(serde_json::json!({
            "attention": name,
            "answer": answer.trim(),
            "retrieved": needle.retrieved(&answer),
            "prefill_tokens_per_s": timings.prefill_tokens_per_s(),
            "decode_tokens_per_s": timings.decode_tokens_per_s(),
            "recall": timings.recall,
            "attended_fraction": timings.attended_fraction,
        }));
    }
    spinner.finish_and_clear();
    let doc = serde_json::json!({
        "model": dir,
        "context_tokens": prompt_ids.len(),
        "needle": format!("The special magic number for {} is {}.", needle.city, needle.number),
        "depth": needle.depth,
        "seed": seed,
        "runs": results,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "needle-in-a-haystack on {} ({} prompt tokens, needle at {:.0}% depth, seed {seed})",
        dir.display(),
        prompt_ids.len(),
        needle.depth * 100.0
    );
    println!("needle: {}", doc["needle"].as_str().unwrap_or_default());
    println!("question: {}\n", needle.question);
    for r in doc["runs"].as_array().expect("runs") {
        let pct = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0));
        println!(
            "{:>5}: {} | answer: {}",
            r["attention"].as_str().unwrap_or_default(),
            if r["retrieved"].as_bool() == Some(true) {
                "RETRIEVED"
            } else {
                "missed   "
            },
            r["answer"].as_str().unwrap_or_default().replace('\n', " ")
        );
        println!(
            "       prefill {:.0} tok/s, decode {:.1} tok/s, attended {} of the context per step, recall of dense attention {}",
            r["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            pct(&r["attended_fraction"]),
            pct(&r["recall"])
        );
    }
    let answers: Vec<&str> = doc["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|r| r["answer"].as_str())
        .collect();
    println!(
        "\nagreement: the two answers are {}",
        if answers.windows(2).all(|w| w[0] == w[1]) {
            "identical"
        } else {
            "different"
        }
    );
    Ok(())
}
