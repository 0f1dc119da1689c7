//! `asynctls calibrate`: the label channels of a model from calibration
//! text (per layer and KV head, the channels with the largest mean
//! `|q_c k_c|` over the text's prefill), written where models load them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use asynctls_attn::calibrate::CalibrationRecorder;
use asynctls_attn::AttentionBackend;
use asynctls_kernels::Device;
use asynctls_kvcache::KvDType;
use asynctls_models::{ChannelsFile, Tokenizer, LABEL_CHANNELS_FILE};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

/// Prefill chunk of the calibration pass.
const CHUNK: usize = 512;
/// Fewer tokens than this calibrate nothing a model will see.
const MIN_TOKENS: usize = 64;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Model directory (with tokenizer.json), or the name of a pulled model.
    #[arg(long)]
    model: String,
    /// Model cache for names (see `asynctls pull --help`).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Calibration text (UTF-8): any long document that is not the
    /// evaluation's haystack.
    #[arg(long)]
    text: PathBuf,
    /// Tokens of the text to run (from its start).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Where to write the channels (default: the model directory's
    /// label_channels.json, which the model then loads).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let dir = asynctls::registry::resolve_model(&args.model, args.cache_dir.as_deref())?;
    if args.tokens < MIN_TOKENS {
        bail!(
            "--tokens {} is too few to calibrate on (at least {MIN_TOKENS})",
            args.tokens
        );
    }
    // The CPU reference sees every query and key in f32; the result is the
    // same channels for either device.
    let model = asynctls_models::load_model_on(&dir, &Device::Cpu)
        .with_context(|| format!("loading model from {}", dir.display()))?;
    let config = model.cache_config(1, KvDType::F32);
    if dir.join(LABEL_CHANNELS_FILE).is_file() {
        eprintln!(
            "calibrate: replacing the channels in {}",
            dir.join(LABEL_CHANNELS_FILE).display()
        );
    }
    let tokenizer = Tokenizer::from_dir(&dir).context("calibration text needs the model's tokenizer")?;
    let meta = std::fs::metadata(&args.text).with_context(|| format!("reading {}", args.text.display()))?;
    // Tokens are a few bytes each: read no more than the run needs.
    let limit = (args.tokens as u64).saturating_mul(64).min(meta.len());
    let bytes = {
        use std::io::Read;
        let mut buf = Vec::with_capacity(limit as usize);
        std::fs::File::open(&args.text)?.take(limit).read_to_end(&mut buf)?;
        buf
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut ids = tokenizer.encode(&text, false)?;
    if ids.len() < MIN_TOKENS {
        bail!(
            "{} holds {} tokens, fewer than the {MIN_TOKENS} calibration needs",
            args.text.display(),
            ids.len()
        );
    }
    if ids.len() > model.max_positions() && args.tokens > model.max_positions() {
        eprintln!(
            "calibrate: {} tokens asked, the model attends over {}: using {}",
            args.tokens,
            model.max_positions(),
            model.max_positions()
        );
    }
    ids.truncate(args.tokens.min(model.max_positions()));
    let n = ids.len();
    // Prefill is dense, so the cache's own label channels do not matter here.
    let blocks = n.div_ceil(config.block_size) + 1;
    let backend = model.new_backend(blocks, KvDType::F32, None)?;
    let mut recorder = CalibrationRecorder::new(backend);
    let seq = recorder.add_sequence();
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("calibrate {bar:30} {pos}/{len} tokens ({elapsed})").expect("static template"),
    );
    for (i, part) in ids.chunks(CHUNK).enumerate() {
        // One chunk at a time so the bar moves; the sequence keeps growing.
        model
            .prefill(&mut recorder, seq, part, false, CHUNK)
            .with_context(|| format!("prefill of chunk {i}"))?;
        bar.inc(part.len() as u64);
    }
    bar.finish_and_clear();
    let channels = recorder.channels(config.label_channels)?;
    let out = args.out.unwrap_or_else(|| dir.join(LABEL_CHANNELS_FILE));
    let file = ChannelsFile::new(
        &channels,
        &config,
        serde_json::json!({
            "tokens": n,
            "text": args.text.display().to_string(),
            "rule": "largest mean |q_c k_c| per layer and KV head (asynctls-attn calibrate)",
        }),
    );
    file.write(&out)?;
    println!(
        "calibrate: {} channels per head for {} layers x {} KV heads from {n} tokens -> {}",
        config.label_channels,
        config.num_layers,
        config.kv_heads,
        out.display()
    );
    Ok(())
}
