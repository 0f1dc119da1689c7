//! The load generator behind `asynctls bench serve`: a fixed number of
//! workers, each sending one streamed completion after another (random
//! prompt token ids of a fixed length, a fixed number of output tokens,
//! past the stop token), until the duration or the request count runs out.
//!
//! Time to first token is measured from sending the request to the first
//! chunk carrying text; time per output token is the rest of the stream
//! divided by the other tokens (`usage` from the last chunk), per request.
//!
//! Two figures separate decoding from the prefills around it:
//! - the **steady state**: the window in which every stream of the
//!   level's first wave (its first `concurrency` requests) has its first
//!   token and none has finished (all prompts are in, none arrives). In it,
//!   tokens per second over all streams, and each stream's gaps between
//!   tokens, the interfering prefill below left out of both;
//! - the **prefill interference** (`interfere_prompt_tokens`): once the
//!   streams are steady, one more request with a long prompt (one output
//!   token) is sent; the streams' gaps between tokens while it is
//!   prefilled (until its token arrives), against their steady gaps.

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
    /// With a value, one request of this many prompt tokens is sent once
    /// every stream is steady, and the streams' token gaps during its
    /// prefill are reported.
    pub interfere_prompt_tokens: Option<usize>,
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
    /// Seconds in which every stream of the first wave had its first token
    /// and none had finished, less the interfering prefill (0 when there was
    /// no such window).
    pub steady_window_s: f64,
    /// Tokens per second over all streams in that window.
    pub steady_output_tokens_per_s: Option<f64>,
    /// Gaps between consecutive tokens of a stream in that window.
    pub steady_tpot_mean_ms: Option<f64>,
    pub steady_tpot_p50_ms: Option<f64>,
    pub steady_tpot_p99_ms: Option<f64>,
    /// The interfering request: its prompt, its time to first token, and
    /// the streams' gaps between tokens while it was prefilled.
    pub interfere_prompt_tokens: Option<usize>,
    pub interfere_ttft_ms: Option<f64>,
    pub tpot_during_prefill_mean_ms: Option<f64>,
    pub tpot_during_prefill_p50_ms: Option<f64>,
    pub tpot_during_prefill_p99_ms: Option<f64>,
    /// Mean gap during the prefill over the mean steady gap: how much a
    /// running stream's time per token rises (one long gap, an unchunked
    /// prefill, counts in full).
    pub tpot_during_prefill_ratio: Option<f64>,
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
    /// When the request was sent, and when each chunk carrying text arrived.
    sent: Instant,
    arrivals: Vec<Instant>,
}

/// Gaps (ms, sorted) between consecutive arrivals of each stream whose
/// two ends `keep` accepts.
fn gaps_where(samples: &[Sample], keep: impl Fn(Instant, Instant) -> bool) -> Vec<f64> {
    let mut gaps: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.arrivals.windows(2))
        .filter(|w| keep(w[0], w[1]))
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps
}

/// One streamed request; `started` is bumped when its first token arrives.
async fn one_request(client: &Client, body: &Value, started: &AtomicUsize) -> Result<Sample, String> {
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
    let mut arrivals = Vec::new();
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
            if first.is_none() {
                started.fetch_add(1, Ordering::SeqCst);
            }
            first.get_or_insert(now);
            last = now;
            arrivals.push(now);
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
        sent: start,
        arrivals,
    })
}

fn request_body(config: &LoadConfig, rng: &mut impl Rng, prompt_tokens: usize, max_tokens: usize) -> Value {
    let ids: Vec<u32> = (0..prompt_tokens)
        .map(|_| rng.random_range(1..config.vocab_size.max(2) as u32))
        .collect();
    json!({
        "model": config.model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// Runs one load level against the server `client` talks to.
pub async fn run_load(client: &Client, config: &LoadConfig) -> LoadReport {
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..config.concurrency.max(1) {
        let (client, config, issued, started, finished) = (
            client.clone(),
            config.clone(),
            issued.clone(),
            started.clone(),
            finished.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed ^ (w as u64).wrapping_mul(0x9e37_79b9));
            let mut results = Vec::new();
            while start.elapsed() < config.duration && issued.fetch_add(1, Ordering::SeqCst) < config.max_requests {
                let body = request_body(&config, &mut rng, config.prompt_tokens, config.output_tokens);
                results.push(one_request(&client, &body, &started).await);
            }
            finished.fetch_add(1, Ordering::SeqCst);
            results
        }));
    }
    // The interfering request: sent half a second after every stream of
    // the first wave has its first token (all of their prompts are in).
    let interferer = config.interfere_prompt_tokens.map(|tokens| {
        let (client, config, started, finished) = (client.clone(), config.clone(), started.clone(), finished.clone());
        let workers = config.concurrency.max(1);
        let wave = workers.min(config.max_requests);
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed ^ 0x5eed);
            let body = request_body(&config, &mut rng, tokens, 1);
            // Until the wave has its first tokens (or its workers are done:
            // a failed request never brings one).
            while started.load(Ordering::SeqCst) < wave && finished.load(Ordering::SeqCst) < workers {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let sent = Instant::now();
            let ignored = AtomicUsize::new(0);
            (sent, one_request(&client, &body, &ignored).await)
        })
    });
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
    let interfered = match interferer {
        Some(task) => match task.await {
            Ok((sent, Ok(sample))) => Some((sent, sent + Duration::from_secs_f64(sample.ttft_s))),
            Ok((_, Err(e))) => {
                failed += 1;
                errors.push(format!("interfering request: {e}"));
                None
            }
            Err(e) => {
                failed += 1;
                errors.push(format!("interfering request: {e}"));
                None
            }
        },
        None => None,
    };
    let wall_s = start.elapsed().as_secs_f64();
    summarize(config, &samples, failed, errors, interfered, wall_s)
}

/// The level's report from its requests' samples and the interfering
/// request's prefill window (sent, first token).
fn summarize(
    config: &LoadConfig,
    samples: &[Sample],
    failed: usize,
    errors: Vec<String>,
    interfered: Option<(Instant, Instant)>,
    wall_s: f64,
) -> LoadReport {
    // Steady: the first wave (the `concurrency` requests sent first), from
    // its last first token to its first last token, without the
    // interfering request's prefill.
    let mut wave: Vec<&Sample> = samples.iter().collect();
    wave.sort_by_key(|s| s.sent);
    wave.truncate(config.concurrency.max(1));
    let steady = wave
        .iter()
        .map(|s| s.arrivals.first().copied())
        .collect::<Option<Vec<_>>>()
        .and_then(|firsts| firsts.into_iter().max())
        .zip(wave.iter().filter_map(|s| s.arrivals.last().copied()).min())
        .filter(|(from, to)| to > from);
    let (steady_window_s, steady_rate, steady_gaps) = match steady {
        Some((from, to)) => {
            let outside = |x: Instant, y: Instant| interfered.is_none_or(|(a, b)| y <= a || x >= b);
            let gaps = gaps_where(samples, |x, y| x >= from && y <= to && outside(x, y));
            let tokens = samples
                .iter()
                .flat_map(|s| &s.arrivals)
                .filter(|&&t| t > from && t <= to && outside(t, t))
                .count();
            let overlap = interfered.map_or(0.0, |(a, b)| {
                (to.min(b).saturating_duration_since(from.max(a))).as_secs_f64()
            });
            let window = (to - from).as_secs_f64() - overlap;
            (window, Some(tokens as f64 / window.max(1e-9)), gaps)
        }
        None => (0.0, None, Vec::new()),
    };
    // Gaps that overlap the prefill of the interfering request.
    let during: Vec<f64> = interfered.map_or_else(Vec::new, |(a, b)| gaps_where(samples, |x, y| y > a && x < b));
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let (steady_p50, during_p50) = (
        (!steady_gaps.is_empty()).then(|| percentile(&steady_gaps, 0.5)),
        (!during.is_empty()).then(|| percentile(&during, 0.5)),
    );
    let (steady_mean, during_mean) = (mean(&steady_gaps), mean(&during));
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
        steady_window_s,
        steady_output_tokens_per_s: steady_rate,
        steady_tpot_mean_ms: steady_mean,
        steady_tpot_p50_ms: steady_p50,
        steady_tpot_p99_ms: (!steady_gaps.is_empty()).then(|| percentile(&steady_gaps, 0.99)),
        interfere_prompt_tokens: config.interfere_prompt_tokens,
        interfere_ttft_ms: interfered.map(|(a, b)| (b - a).as_secs_f64() * 1e3),
        tpot_during_prefill_mean_ms: during_mean,
        tpot_during_prefill_p50_ms: during_p50,
        tpot_during_prefill_p99_ms: (!during.is_empty()).then(|| percentile(&during, 0.99)),
        tpot_during_prefill_ratio: steady_mean.zip(during_mean).map(|(s, d)| d / s),
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose tokens arrive every `gap_ms` from `start_ms`, `n` of them.
    fn stream(t0: Instant, start_ms: u64, gap_ms: u64, n: usize) -> Sample {
        let arrivals: Vec<Instant> = (0..n)
            .map(|i| t0 + Duration::from_millis(start_ms + gap_ms * i as u64))
            .collect();
        Sample {
            ttft_s: start_ms as f64 / 1e3,
            tpot_s: Some(gap_ms as f64 / 1e3),
            prompt_tokens: 8,
            generated: n,
            sent: t0 + Duration::from_millis(start_ms / 2),
            arrivals,
        }
    }

    fn config() -> LoadConfig {
        LoadConfig {
            model: "m".into(),
            concurrency: 2,
            prompt_tokens: 8,
            output_tokens: 100,
            duration: Duration::from_secs(1),
            max_requests: 2,
            vocab_size: 10,
            seed: 0,
            interfere_prompt_tokens: Some(1000),
        }
    }

    #[test]
    fn the_steady_window_and_the_interference_are_told_apart() {
        let t0 = Instant::now();
        // Two streams: tokens every 10 ms, from 100 ms and 200 ms; the second
        // stream's gaps are 40 ms while a prefill runs from 500 to 700 ms.
        let a = stream(t0, 100, 10, 100); // 100..1090 ms
        let mut b = stream(t0, 200, 10, 30); // 200..490 ms
        let tail: Vec<Instant> = (1..=5).map(|i| t0 + Duration::from_millis(490 + 40 * i)).collect(); // ..690
        b.arrivals.extend(tail);
        let later: Vec<Instant> = (1..=20).map(|i| t0 + Duration::from_millis(690 + 10 * i)).collect(); // ..890
        b.arrivals.extend(later);
        let window = (t0 + Duration::from_millis(500), t0 + Duration::from_millis(700));
        let r = summarize(&config(), &[a, b], 0, Vec::new(), Some(window), 1.0);
        // Steady from the later first token (200 ms) to the earlier last (890
        // ms), less the 200 ms of the interfering prefill; two streams of one
        // token per 10 ms outside it.
        assert!((r.steady_window_s - 0.49).abs() < 1e-6, "{}", r.steady_window_s);
        let rate = r.steady_output_tokens_per_s.unwrap();
        assert!((190.0..215.0).contains(&rate), "{rate}");
        assert!((r.steady_tpot_p50_ms.unwrap() - 10.0).abs() < 0.5);
        assert!(
            (r.steady_tpot_mean_ms.unwrap() - 10.0).abs() < 0.5,
            "{:?}",
            r.steady_tpot_mean_ms
        );
        // During the prefill: stream a's 10 ms gaps and stream b's 40 ms ones.
        let during = r.tpot_during_prefill_mean_ms.unwrap();
        assert!(during > 15.0 && during < 25.0, "{during}");
        assert!(r.tpot_during_prefill_ratio.unwrap() > 1.5);
        assert!((r.interfere_ttft_ms.unwrap() - 200.0).abs() < 1e-6);
        // Without a window in which both run, there is no steady state.
        let r = summarize(
            &config(),
            &[stream(t0, 0, 10, 5), stream(t0, 100, 10, 5)],
            0,
            Vec::new(),
            None,
            1.0,
        );
        assert_eq!(r.steady_window_s, 0.0);
        assert!(r.steady_output_tokens_per_s.is_none() && r.tpot_during_prefill_ratio.is_none());
    }

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
