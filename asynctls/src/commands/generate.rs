//! `asynctls generate`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use asynctls::engine::{Engine, Request};
use asynctls::sampler::SamplingParams;
use asynctls_attn::{Policy, SparseConfig};
use asynctls_kernels::{Device, DeviceRequest};
use asynctls_kvcache::KvDType;
use asynctls_models::{AttentionPlan, ChatMessage, Tokenizer};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory (config.json, model.safetensors or shards, and
    /// tokenizer.json for text prompts), or the name of a pulled model.
    #[arg(long)]
    model: String,
    /// Model cache for names (see `asynctls pull --help`).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// A UTF-8 file holding the prompt text.
    #[arg(long, group = "input")]
    prompt_file: Option<PathBuf>,
    /// The prompt as token ids, comma separated (no tokenizer needed).
    #[arg(long, group = "input", value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Always take the most likely token (the default unless --temperature is set).
    #[arg(long, conflicts_with = "temperature")]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decode attention: dense, tls (two-level sparse), quest or ds.
    #[arg(long, default_value = "dense")]
    attention: Policy,
    /// Token budget of the sparse policy (k_t for tls/ds, k_b*64 tokens for quest).
    #[arg(long, default_value_t = 1024)]
    budget: usize,
    /// Leading layers that always attend densely.
    #[arg(long, default_value_t = 2)]
    dense_layers: usize,
    /// Contexts shorter than this decode densely.
    #[arg(long, default_value_t = 4096)]
    dense_below: usize,
    /// Keep the K/V in a host tier behind the offload engine with this many
    /// resident (block, head) units per layer: on a GPU in pinned host
    /// memory, the residency decided on the device (GQA models); on the
    /// CPU its twin. Without it, the whole cache stays where it computes.
    #[arg(long)]
    offload_slots: Option<usize>,
    /// With --offload-slots: a resident tier of this many blocks (64
    /// tokens each) beside the offloaded cache; sequences go there, K/V
    /// whole on the device, while it has room for them.
    #[arg(long, default_value_t = 0, requires = "offload_slots")]
    resident_tier_blocks: usize,
    #[command(flatten)]
    offload_policy: super::OffloadPolicyArgs,
    /// K/V element type in the cache: f32 or bf16.
    #[arg(long, default_value = "f32")]
    kv_dtype: String,
    /// Split the model over this many tensor-parallel ranks (attention heads,
    /// KV heads and MLP columns; the GQA family). On the CPU the ranks run
    /// as threads (the twin of the multi-GPU form, which is not built yet).
    #[arg(long, default_value_t = 1)]
    tensor_parallel: usize,
    /// Calibrated label channels (`asynctls calibrate --out FILE`) instead of
    /// the model's own (its directory's label_channels.json, or the defaults).
    #[arg(long)]
    label_channels: Option<PathBuf>,
    /// Where to run: cpu, cuda, cuda:N or auto (the GPU when one is
    /// present; the K/V is then bf16 whatever --kv-dtype says).
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    /// The largest --prompt-file read, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_prompt_bytes: u64,
    /// Prompt tokens per prefill chunk (bounds the activations of a long prompt).
    #[arg(long, default_value_t = asynctls_models::DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn read_prompt_file(path: &PathBuf, max_bytes: u64) -> Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))?
        .len();
    if len > max_bytes {
        bail!(
            "prompt file {} has {len} bytes, more than --max-prompt-bytes {max_bytes} (raise it to read the file)",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read prompt file {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "prompt file {} is not valid UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let device = Device::from_request(args.device).context("opening the device")?;
    if matches!(args.device, DeviceRequest::Auto) {
        eprintln!("generate: --device auto picked {device}");
    }
    let model_dir = asynctls::registry::resolve_model(&args.model, args.cache_dir.as_deref())?;
    let kv_dtype = match args.kv_dtype.as_str() {
        "f32" => KvDType::F32,
        "bf16" => KvDType::BF16,
        other => bail!("unknown --kv-dtype `{other}` (expected f32 or bf16)"),
    };
    let spinner = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner.set_message(format!("loading {}", model_dir.display()));
    let load_start = Instant::now();
    if args.tensor_parallel == 0 {
        anyhow::bail!("--tensor-parallel must be at least 1");
    }
    let mut model = if args.tensor_parallel > 1 {
        if device.is_cuda() {
            anyhow::bail!(
                "--tensor-parallel {} on {device}: the multi-GPU form (NCCL) is not built yet; \
                 --device cpu runs its CPU twin",
                args.tensor_parallel
            );
        }
        asynctls_models::load_model_tensor_parallel(&model_dir, args.tensor_parallel).map_err(anyhow::Error::from)
    } else {
        asynctls::engine::load_for_request(&model_dir, args.device, &device)
    }
    .with_context(|| format!("loading model from {}", model_dir.display()))?;
    if let Some(path) = &args.label_channels {
        let config = model.cache_config(1, KvDType::BF16);
        model.set_label_channels(asynctls_models::read_label_channels(path, &config)?);
    }
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    let tokenizer = if model_dir.join("tokenizer.json").is_file() {
        Some(Tokenizer::from_dir(&model_dir)?)
    } else {
        None
    };

    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Some(p.clone()),
        (_, Some(f)) => Some(read_prompt_file(f, args.max_prompt_bytes)?),
        _ => None,
    };
    let prompt_ids = match (&args.prompt_ids, text) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tokenizer
                .as_ref()
                .with_context(|| format!("{} has no tokenizer.json; pass --prompt-ids", model_dir.display()))?;
            if args.chat {
                let rendered = tok.apply_chat_template(&[ChatMessage::user(text)], true)?;
                tok.encode(&rendered, false)?
            } else {
                tok.encode(&text, true)?
            }
        }
        (None, None) => bail!("give a prompt: --prompt TEXT, --prompt-file FILE or --prompt-ids 1,2,3"),
    };

    let mut stop_ids = model.eos_token_ids();
    if let Some(eos) = tokenizer.as_ref().and_then(|t| t.eos_token_id()) {
        stop_ids.push(eos);
    }
    if let Some(t) = args.temperature {
        if !t.is_finite() || t < 0.0 {
            bail!("--temperature {t} must be a finite number >= 0 (0 is greedy)");
        }
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p {} must be in (0, 1] (1 keeps every token)", args.top_p);
    }
    let sampling = match args.temperature {
        Some(t) if !args.greedy => SamplingParams {
            temperature: t,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        _ => SamplingParams::greedy(),
    };
    let mut plan = AttentionPlan {
        sparse: SparseConfig {
            dense_below: args.dense_below,
            ..SparseConfig::with_budget(args.attention, args.budget, 64)
        },
        dense_layers: args.dense_layers,
    };
    plan.sparse.fit_to_cache(&model.cache_config(1, KvDType::BF16));
    if args.offload_slots == Some(0) {
        anyhow::bail!("--offload-slots must be positive (leave it out to keep the whole cache in host memory)");
    }
    let mut engine = Engine::new(model, plan, kv_dtype);
    engine.resident_slots = args.offload_slots;
    engine.resident_tier_blocks = args.resident_tier_blocks;
    engine.offload_policy = args
        .offload_policy
        .policy(device.is_cuda() && args.offload_slots.is_some())?;
    engine.prefill_chunk = args.prefill_chunk;
    if args.prefill_chunk == 0 {
        anyhow::bail!("--prefill-chunk must be positive");
    }
    let request = Request {
        prompt_ids,
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_ids,
    };
    spinner.set_message(format!("prefilling {} tokens", request.prompt_ids.len()));
    let (mut generations, timings) = engine.generate(std::slice::from_ref(&request), |_| {
        spinner.set_message("decoding".to_string());
    })?;
    spinner.finish_and_clear();
    let generation = generations.remove(0);
    let text = tokenizer
        .as_ref()
        .map(|t| t.decode(&generation.generated_ids))
        .transpose()?;
    let memory = engine.model.new_backend(1, kv_dtype, None)?.memory_report();
    if args.json {
        let doc = serde_json::json!({
            "prompt_ids": generation.prompt_ids,
            "generated_ids": generation.generated_ids,
            "text": text,
            "finish_reason": generation.finish_reason,
            "attention": args.attention,
            "budget": if args.attention == Policy::Dense { None } else { Some(args.budget) },
            "kv_bytes_per_token": memory.kv_bytes_per_token(),
            "kv_metadata_bytes_per_token": memory.metadata_bytes_per_token,
            "kv_label_bytes_per_token": memory.label_bytes_per_token,
            "timings": {
                "load_ms": load_ms,
                "prefill_ms": timings.prefill_ms,
                "decode_ms": timings.decode_ms,
                "decode_steps": timings.decode_steps,
                "prefill_tokens_per_s": timings.prefill_tokens_per_s(),
                "decode_tokens_per_s": timings.decode_tokens_per_s(),
            },
            "offload": timings.offload_reads.map(|(hits, misses)| serde_json::json!({
                "resident_slots_per_layer": args.offload_slots,
                "predictor": args.offload_policy.offload_predictor,
                "max_promote": args.offload_policy.offload_max_promote,
                "hits": hits,
                "misses": misses,
                // On a GPU, each offloaded layer's residency over the run.
                "layers": timings.offload_layers.as_ref().map(|layers| layers
                    .iter()
                    .map(|(layer, s)| serde_json::json!({"layer": layer, "counters": s, "hit_rate": s.hit_rate(),
                                                         "overlap_rate": s.overlap_rate()}))
                    .collect::<Vec<_>>()),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        match &text {
            Some(t) => println!("{t}"),
            None => println!("{:?}", generation.generated_ids),
        }
        eprintln!(
            "[{} prompt tokens, {} generated ({:?}); prefill {:.1} tok/s, decode {:.1} tok/s, attention {}]",
            generation.prompt_ids.len(),
            generation.generated_ids.len(),
            generation.finish_reason,
            timings.prefill_tokens_per_s(),
            timings.decode_tokens_per_s(),
            args.attention
        );
    }
    Ok(())
}
