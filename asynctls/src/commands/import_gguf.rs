//! `asynctls import-gguf FILE OUT_DIR`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use asynctls_models::gguf::{import_gguf, Gguf, ImportReport};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The GGUF file (llama or qwen2 architecture).
    file: PathBuf,
    /// Directory to write config.json, model.safetensors (bf16), tokenizer.json
    /// and tokenizer_config.json into.
    out_dir: PathBuf,
}

/// Imports with a progress bar over the tensors.
pub fn import_with_progress(file: &Path, out_dir: &Path, quiet: bool) -> Result<ImportReport> {
    let gguf = Gguf::open(file).with_context(|| format!("reading {}", file.display()))?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(gguf.tensors.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} importing [{bar:30}] {pos}/{len} tensors ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let report = import_gguf(&gguf, out_dir, |i, _| bar.set_position(i as u64))
        .with_context(|| format!("importing {} into {}", file.display(), out_dir.display()))?;
    bar.finish_and_clear();
    Ok(report)
}

pub fn run(args: ImportArgs) -> Result<()> {
    let report = import_with_progress(&args.file, &args.out_dir, false)?;
    println!(
        "imported {} ({}): {} tensors, {:.1}M parameters, vocabulary of {} -> {}",
        args.file.display(),
        report.architecture,
        report.tensors,
        report.parameters as f64 / 1e6,
        report.vocab_size,
        args.out_dir.display()
    );
    Ok(())
}
