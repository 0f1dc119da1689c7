//! The `asynctls` command line.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod commands;

/// Long-context LLM inference with asynchronous two-level sparse attention.
#[derive(Debug, Parser)]
#[command(name = "asynctls", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main demo: long-context needle retrieval with dense and two-level sparse attention.
    Demo(commands::demo::DemoArgs),
    /// RULER-style accuracy evals: every task x context x policy x budget.
    Eval(commands::eval::EvalArgs),
    /// Label channels of a model from calibration text, written where it loads them.
    Calibrate(commands::calibrate::CalibrateArgs),
    /// Continue a prompt with a model directory (HF config.json + safetensors).
    Generate(commands::generate::GenerateArgs),
    /// An OpenAI-compatible HTTP server (chat and completions, streaming) on a
    /// continuous-batching engine.
    Serve(commands::serve::ServeArgs),
    /// Fetch a known small real model (smollm2-135m, qwen2.5-coder-0.5b) into the model cache.
    Pull(commands::pull::PullArgs),
    /// Convert a GGUF file (llama, qwen2) into an HF-format model directory.
    ImportGguf(commands::import_gguf::ImportArgs),
    /// Benchmarks (each next to the reference it is judged against).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// One decode step of attention: dense, tls, quest and ds on synthetic
    /// long-context workloads (time, recall, error, bytes read).
    Attn(commands::bench_attn::AttnArgs),
    /// KV cache bytes per token of the real models, per part.
    Kv(commands::bench_kv::KvArgs),
    /// Whole-model prefill and decode throughput per attention policy.
    E2e(commands::bench_e2e::E2eArgs),
    /// Sparse decode with the K/V on the GPU vs offloaded to host memory (GPU only).
    Offload(commands::bench_offload::OffloadArgs),
    /// Causal prefill attention of a whole prompt on the GPU.
    Prefill(commands::bench_prefill::PrefillArgs),
    /// Load against the OpenAI-compatible server: throughput, TTFT and TPOT.
    Serve(commands::bench_serve::BenchServeArgs),
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(args) => commands::demo::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Calibrate(args) => commands::calibrate::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::ImportGguf(args) => commands::import_gguf::run(args),
        Command::Pull(args) => commands::pull::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Bench {
            what: BenchCommand::Attn(args),
        } => commands::bench_attn::run(args),
        Command::Bench {
            what: BenchCommand::E2e(args),
        } => commands::bench_e2e::run(args),
        Command::Bench {
            what: BenchCommand::Kv(args),
        } => commands::bench_kv::run(args),
        Command::Bench {
            what: BenchCommand::Offload(args),
        } => commands::bench_offload::run(args),
        Command::Bench {
            what: BenchCommand::Prefill(args),
        } => commands::bench_prefill::run(args),
        Command::Bench {
            what: BenchCommand::Serve(args),
        } => commands::bench_serve::run(args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
