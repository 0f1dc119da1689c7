//! `asynctls bench serve`: the load generator against a running server
//! (`--url`) or one started in this process (`--model`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use asynctls::serve::bench::{run_load, LoadConfig, LoadReport};
use asynctls::serve::client::Client;
use clap::Args;

use super::serve::{build_state, EngineArgs};

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// A running server, `http://HOST:PORT`.
    #[arg(long, conflicts_with = "model")]
    url: Option<String>,
    /// Start a server on this model in-process (on 127.0.0.1, any port).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// The server's API key, if it has one.
    #[arg(long)]
    api_key: Option<String>,
    /// Concurrent streams, one load level each (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    concurrency: Vec<usize>,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Generated tokens per request (the stop token is ignored).
    #[arg(long, default_value_t = 64)]
    output_tokens: usize,
    /// Once every stream of a level has its first token, send one more
    /// request with this many prompt tokens (and one output token) and
    /// report the streams' time per token while it is prefilled.
    #[arg(long)]
    interfere_prompt_tokens: Option<usize>,
    /// Seconds each level starts requests for.
    #[arg(long, default_value_t = 30.0)]
    duration_s: f64,
    /// Requests per level at most.
    #[arg(long, default_value_t = 256)]
    max_requests: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_url(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url}: only http://HOST:PORT is understood"))?;
    let hostport = rest.trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .with_context(|| format!("--url {url}: cannot resolve {hostport}"))?
        .next()
        .with_context(|| format!("--url {url}: no address"))
}

pub fn run(args: BenchServeArgs) -> Result<()> {
    if !(args.duration_s.is_finite() && args.duration_s > 0.0) {
        bail!("--duration-s must be a positive number of seconds");
    }
    if args.concurrency.contains(&0) {
        bail!("--concurrency levels must be positive");
    }
    if args.prompt_tokens == 0 || args.output_tokens == 0 {
        bail!("--prompt-tokens and --output-tokens must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // In-process: the server runs on this runtime until the levels are done.
    let (addr, local) = match (&args.url, &args.model) {
        (Some(url), _) => (parse_url(url)?, None),
        (None, model) if model.is_some() || args.engine.model_shape.is_some() => {
            let state = build_state(model.as_deref(), &args.engine, args.api_key.clone())?;
            let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            let addr = listener.local_addr()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = runtime.spawn(asynctls::serve::run(
                listener,
                state.clone(),
                async move {
                    let _ = stopped.await;
                },
                Duration::from_secs(5),
            ));
            (addr, Some((state, stop, server)))
        }
        (None, _) => {
            bail!("give --url http://HOST:PORT of a running server, or --model (or --model-shape) to start one")
        }
    };
    let mut client = Client::new(addr);
    client.api_key = args.api_key.clone();
    let result = runtime.block_on(async {
        let models = client.get("/v1/models").await?;
        if models.status != 200 {
            bail!("GET /v1/models: HTTP {}: {}", models.status, models.text());
        }
        let card = models.json()?["data"][0].clone();
        let model = card["id"].as_str().context("/v1/models lists no model")?.to_string();
        let vocab_size = card["vocab_size"].as_u64().unwrap_or(1000) as usize;
        let mut reports = Vec::new();
        for &concurrency in &args.concurrency {
            let config = LoadConfig {
                model: model.clone(),
                concurrency,
                prompt_tokens: args.prompt_tokens,
                output_tokens: args.output_tokens,
                duration: Duration::from_secs_f64(args.duration_s),
                max_requests: args.max_requests,
                vocab_size,
                seed: args.seed,
                interfere_prompt_tokens: args.interfere_prompt_tokens,
            };
            if !args.json {
                eprintln!("bench serve: concurrency {concurrency} ...");
            }
            reports.push(run_load(&client, &config).await);
        }
        // After the load: the server's KV blocks in use should be back at idle.
        let kv_used_after = client.metric("asynctls_kv_blocks_used").await?;
        let running_after = client.metric("asynctls_running_sequences").await?;
        let step_sum = client.metric("asynctls_decode_step_seconds_sum").await?;
        let step_count = client.metric("asynctls_decode_step_seconds_count").await?;
        if let (Some(sum), Some(count)) = (step_sum, step_count.filter(|&c| c > 0.0)) {
            eprintln!(
                "server: {count} decode steps, {:.2} ms each on average (all levels)",
                sum / count * 1e3
            );
        }
        Ok((model, reports, kv_used_after, running_after))
    });
    if let Some((state, stop, server)) = local {
        let _ = stop.send(());
        let _ = runtime.block_on(server);
        state.scheduler.join();
    }
    let (model, reports, kv_used_after, running_after) = result?;
    if args.json {
        let doc = serde_json::json!({
            "model": model,
            "server": args.url.clone().unwrap_or_else(|| "in-process".into()),
            "levels": reports,
            "kv_blocks_used_after": kv_used_after,
            "running_sequences_after": running_after,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_table(&model, &reports);
        println!(
            "after the load: {} KV blocks in use, {} running sequences",
            kv_used_after.map_or("?".into(), |v| v.to_string()),
            running_after.map_or("?".into(), |v| v.to_string())
        );
    }
    if reports.iter().any(|r| r.failed > 0) {
        for r in &reports {
            for e in &r.errors {
                eprintln!("concurrency {}: {e}", r.concurrency);
            }
        }
        bail!("some requests failed");
    }
    Ok(())
}

fn print_table(model: &str, reports: &[LoadReport]) {
    println!("model {model}");
    println!(
        "| concurrency | prompt | output | requests | failed | output tok/s | total tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.concurrency,
            r.prompt_tokens,
            r.output_tokens,
            r.requests,
            r.failed,
            r.output_tokens_per_s,
            r.total_tokens_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.tpot_p50_ms,
            r.tpot_p99_ms
        );
    }
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!();
    println!("| concurrency | steady window s | steady tok/s | steady TPOT mean / p50 / p99 ms | interfering prompt | its TTFT ms | TPOT during its prefill mean / p50 / p99 ms | x steady (means) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        println!(
            "| {} | {:.2} | {} | {} / {} / {} | {} | {} | {} / {} / {} | {} |",
            r.concurrency,
            r.steady_window_s,
            opt(r.steady_output_tokens_per_s),
            opt(r.steady_tpot_mean_ms),
            opt(r.steady_tpot_p50_ms),
            opt(r.steady_tpot_p99_ms),
            r.interfere_prompt_tokens.map_or("-".into(), |t| t.to_string()),
            opt(r.interfere_ttft_ms),
            opt(r.tpot_during_prefill_mean_ms),
            opt(r.tpot_during_prefill_p50_ms),
            opt(r.tpot_during_prefill_p99_ms),
            opt(r.tpot_during_prefill_ratio)
        );
    }
}
