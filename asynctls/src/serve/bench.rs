//! The load generator behind `asynctls bench serve`: a fixed number of
//! workers, each sending one streamed completion after another (random
//! prompt token ids of a fixed length, a fixed number of output tokens,
//! past the stop token), until the duration or the request count runs out.
//!
//! Time to first token is measured from sending the request to the first
//! chunk carrying text; time per output token is the rest of the stream
//! divided by the other tokens (`usage` from the last chunk), per request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use super::client::Client;

/// One load level.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub model: String,
    pub concurrency: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// No request starts after this.
    pub duration: Duration,
    /// Requests in all, at most.
    pub max_requests: usize,
    /// Prompt ids are drawn from `1..vocab_size`.
    pub vocab_size: usize,
    pub seed: u64,
}

/// What one load level measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub concurrency: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub requests: usize,
    pub failed: usize,
    pub wall_s: f64,
    pub generated_tokens: usize,
    /// Generated tokens per second of wall time, over all streams.
    pub output_tokens_per_s: f64,
    /// Prompt plus generated tokens per second.
    pub total_tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
    /// The first few failures, for the report.
    pub errors: Vec<String>,
}

/// The `q`-quantile (0..=1) by nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One request's timings.
struct Sample {
    ttft_s: f64,
    tpot_s: Option<f64>,
    prompt_tokens: usize,
    generated: usize,
}

async fn one_request(client: &Client, body: &Value) -> Result<Sample, String> {
    let start = Instant::now();
    let mut stream = match client
        .stream("/v1/completions", body)
        .await
        .map_err(|e| e.to_string())?
    {
        Ok(s) => s,
        Err(reply) => return Err(format!("HTTP {}: {}", reply.status, reply.text())),
    };
    let (mut first, mut last, mut usage) = (None, start, None);
    while let Some(data) = stream.next_data().await.map_err(|e| e.to_string())? {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data).map_err(|e| format!("bad chunk {data}: {e}"))?;
        if let Some(err) = chunk.get("error") {
            return Err(err.to_string());
        }
        let text = chunk["choices"][0]["text"].as_str().unwrap_or("");
        if !text.is_empty() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some((
                u["prompt_tokens"].as_u64().unwrap_or(0) as usize,
                u["completion_tokens"].as_u64().unwrap_or(0) as usize,
            ));
        }
    }
    let (prompt_tokens, generated) = usage.ok_or("the stream ended without usage")?;
    let first = first.unwrap_or(last);
    Ok(Sample {
        ttft_s: (first - start).as_secs_f64(),
        tpot_s: (generated > 1).then(|| (last - first).as_secs_f64() / (generated - 1) as f64),
        prompt_tokens,
        generated,
    })
}

/// Runs one load level against the server `client` talks to.
pub async fn run_load(client: &Client, config: &LoadConfig) -> LoadReport {
    let issued = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..config.concurrency.max(1) {
        let (client, config, issued) = (client.clone(), config.clone(), issued.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed ^ (w as u64).wrapping_mul(0x9e37_79b9));
            let mut results = Vec::new();
            while start.elapsed() < config.duration && issued.fetch_add(1, Ordering::SeqCst) < config.max_requests {
                let ids: Vec<u32> = (0..config.prompt_tokens)
                    .map(|_| rng.random_range(1..config.vocab_size.max(2) as u32))
                    .collect();
                let body = json!({
                    "model": config.model,
                    "prompt": ids,
                    "max_tokens": config.output_tokens,
                    "temperature": 0,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                results.push(one_request(&client, &body).await);
            }
            results
        }));
    }
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    let mut failed = 0;
    for w in workers {
        match w.await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(s) => samples.push(s),
                        Err(e) => {
                            failed += 1;
                            if errors.len() < 5 {
                                errors.push(e);
                            }
                        }
                    }
                }
            }
            Err(e) => {
                failed += 1;
                errors.push(format!("worker: {e}"));
            }
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft_s * 1e3).collect();
    let mut tpot: Vec<f64> = samples.iter().filter_map(|s| s.tpot_s).map(|t| t * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    tpot.sort_by(f64::total_cmp);
    let generated: usize = samples.iter().map(|s| s.generated).sum();
    let prompt: usize = samples.iter().map(|s| s.prompt_tokens).sum();
    LoadReport {
        concurrency: config.concurrency,
        prompt_tokens: config.prompt_tokens,
        output_tokens: config.output_tokens,
        requests: samples.len(),
        failed,
        wall_s,
        generated_tokens: generated,
        output_tokens_per_s: generated as f64 / wall_s.max(1e-9),
        total_tokens_per_s: (generated + prompt) as f64 / wall_s.max(1e-9),
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p99_ms: percentile(&ttft, 0.99),
        tpot_p50_ms: percentile(&tpot, 0.5),
        tpot_p99_ms: percentile(&tpot, 0.99),
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
