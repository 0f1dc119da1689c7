//! The server's counters, gauges and histograms, and their Prometheus text
//! form for `GET /metrics`.
//!
//! Everything is a plain atomic or a short mutex: the HTTP handlers and the
//! scheduler thread update them without waiting on each other, and a
//! scrape reads a consistent-enough snapshot (each series on its own).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How a request ended, the `outcome` label of `asynctls_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Generated to a stop or to its token limit.
    Completed,
    /// The client went away before the end.
    Cancelled,
    /// Refused before it reached the queue (bad input, unknown model).
    Invalid,
    Unauthorized,
    /// The queue was full (429).
    QueueFull,
    /// The engine failed on it, or the server shut down under it.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Completed,
        Outcome::Cancelled,
        Outcome::Invalid,
        Outcome::Unauthorized,
        Outcome::QueueFull,
        Outcome::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
            Outcome::Invalid => "invalid",
            Outcome::Unauthorized => "unauthorized",
            Outcome::QueueFull => "queue_full",
            Outcome::Failed => "failed",
        }
    }
}

/// A cumulative histogram over fixed upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Debug, Clone, Default)]
struct HistogramData {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new(HistogramData {
                counts: vec![0; bounds.len() + 1],
                ..HistogramData::default()
            }),
        }
    }

    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        // A poisoned lock only means another observer panicked mid-update:
        // the counts are still usable.
        let mut data = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        data.counts[bucket] += 1;
        data.sum += value;
        data.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let data = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&data.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", data.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", data.sum, data.count);
    }
}

/// Time to first token: from a CPU's seconds down to a GPU's milliseconds.
const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Time between two output tokens of one stream.
const TPOT_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5];
/// A whole request, queue included.
const LATENCY_BOUNDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// An f64 in an atomic (a gauge that is not a count).
#[derive(Debug, Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Every series the server exports.
#[derive(Debug)]
pub struct Metrics {
    requests: [AtomicU64; 6],
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests accepted and not yet admitted to the running batch.
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    /// Sequences admitted whose prompt is still being prefilled.
    pub prefilling: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub decode_steps: AtomicU64,
    pub prefill_chunks: AtomicU64,
    /// Prefill chunks carried by a decode step (`--mixed-steps`).
    pub mixed_steps: AtomicU64,
    /// Steps in which the engine panicked (their running requests failed).
    pub engine_failures: AtomicU64,
    /// The server process's resident memory (read at each scrape), and the
    /// GPU memory in use on the model's device (0 off a GPU; refreshed by
    /// the scheduler every few iterations and when it goes idle).
    pub resident_bytes: AtomicU64,
    pub gpu_used_bytes: AtomicU64,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub latency: Histogram,
    /// Wall time of one batched decode step (the engine alone).
    pub decode_step: Histogram,
    /// Key reads served from resident slots / from the host tier, when the
    /// cache has an offload tier (`None` until the backend reports any).
    offload: Mutex<Option<(u64, u64)>>,
    /// Mean attended fraction and recall of measured decode steps, when the
    /// server measures them (`--measure-attention`).
    attended_fraction: Mutex<Option<f64>>,
    recall: AtomicF64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            prefilling: AtomicU64::new(0),
            kv_blocks_used: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            prefill_chunks: AtomicU64::new(0),
            mixed_steps: AtomicU64::new(0),
            engine_failures: AtomicU64::new(0),
            resident_bytes: AtomicU64::new(0),
            gpu_used_bytes: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            tpot: Histogram::new(TPOT_BOUNDS),
            latency: Histogram::new(LATENCY_BOUNDS),
            decode_step: Histogram::new(TPOT_BOUNDS),
            offload: Mutex::new(None),
            attended_fraction: Mutex::new(None),
            recall: AtomicF64::default(),
        }
    }
}

impl Metrics {
    pub fn count_request(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|&o| o == outcome).unwrap_or(0);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self, outcome: Outcome) -> u64 {
        let i = Outcome::ALL.iter().position(|&o| o == outcome).unwrap_or(0);
        self.requests[i].load(Ordering::Relaxed)
    }

    /// Adds offload reads the backend reported since its last report.
    pub fn add_offload_reads(&self, hits: usize, misses: usize) {
        let mut o = self.offload.lock().unwrap_or_else(|e| e.into_inner());
        let (h, m) = o.get_or_insert((0, 0));
        *h += hits as u64;
        *m += misses as u64;
    }

    pub fn set_attention_stats(&self, attended_fraction: f64, recall: f64) {
        *self.attended_fraction.lock().unwrap_or_else(|e| e.into_inner()) = Some(attended_fraction);
        self.recall.set(recall);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        if let Some(rss) = process_resident_bytes() {
            self.resident_bytes.store(rss, Ordering::Relaxed);
        }
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP asynctls_requests_total Requests by how they ended.\n");
        out.push_str("# TYPE asynctls_requests_total counter\n");
        for (o, n) in Outcome::ALL.iter().zip(&self.requests) {
            let _ = writeln!(out, "asynctls_requests_total{{outcome=\"{}\"}} {}", o.label(), load(n));
        }
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let series: [(&str, &str, &str, &AtomicU64); 13] = [
            (
                "asynctls_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                &self.prompt_tokens,
            ),
            (
                "asynctls_generated_tokens_total",
                "counter",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "asynctls_queue_depth",
                "gauge",
                "Requests waiting for a place in the running batch.",
                &self.queue_depth,
            ),
            (
                "asynctls_running_sequences",
                "gauge",
                "Sequences in the running batch (prefilling or decoding).",
                &self.running,
            ),
            (
                "asynctls_prefilling_sequences",
                "gauge",
                "Running sequences whose prompt is still being prefilled.",
                &self.prefilling,
            ),
            (
                "asynctls_kv_blocks_used",
                "gauge",
                "KV cache blocks held by sequences.",
                &self.kv_blocks_used,
            ),
            (
                "asynctls_kv_blocks_total",
                "gauge",
                "KV cache blocks in the pool.",
                &self.kv_blocks_total,
            ),
            (
                "asynctls_decode_steps_total",
                "counter",
                "Batched decode steps run.",
                &self.decode_steps,
            ),
            (
                "asynctls_prefill_chunks_total",
                "counter",
                "Prefill chunks run.",
                &self.prefill_chunks,
            ),
            (
                "asynctls_mixed_steps_total",
                "counter",
                "Decode steps that carried a prefill chunk in the same forward.",
                &self.mixed_steps,
            ),
            (
                "asynctls_engine_failures_total",
                "counter",
                "Engine steps that panicked; the requests running in them failed.",
                &self.engine_failures,
            ),
            (
                "asynctls_process_resident_bytes",
                "gauge",
                "Resident memory of the server process (host KV, weights on the CPU, pinned host tiers).",
                &self.resident_bytes,
            ),
            (
                "asynctls_gpu_memory_used_bytes",
                "gauge",
                "GPU memory in use on the model's device (weights, KV cache, scratch); 0 off a GPU.",
                &self.gpu_used_bytes,
            ),
        ];
        for (name, kind, help, value) in series {
            scalar(&mut out, name, kind, help, load(value).to_string());
        }
        let free = load(&self.kv_blocks_total).saturating_sub(load(&self.kv_blocks_used));
        scalar(
            &mut out,
            "asynctls_kv_blocks_free",
            "gauge",
            "KV cache blocks free in the pool.",
            free.to_string(),
        );
        self.ttft.render(
            &mut out,
            "asynctls_time_to_first_token_seconds",
            "From arrival to the first generated token.",
        );
        self.tpot.render(
            &mut out,
            "asynctls_time_per_output_token_seconds",
            "Between two consecutive tokens of one sequence.",
        );
        self.latency.render(
            &mut out,
            "asynctls_request_duration_seconds",
            "From arrival to the last token.",
        );
        self.decode_step.render(
            &mut out,
            "asynctls_decode_step_seconds",
            "One batched decode step of the engine (sampling included).",
        );
        // Sparse and offload telemetry only where the backend measured it:
        // a missing series means "not measured", never zero.
        if let Some((hits, misses)) = *self.offload.lock().unwrap_or_else(|e| e.into_inner()) {
            out.push_str("# HELP asynctls_offload_key_reads_total Key reads of sparse decode by tier.\n");
            out.push_str("# TYPE asynctls_offload_key_reads_total counter\n");
            let _ = writeln!(out, "asynctls_offload_key_reads_total{{tier=\"resident\"}} {hits}");
            let _ = writeln!(out, "asynctls_offload_key_reads_total{{tier=\"host\"}} {misses}");
            let rate = if hits + misses > 0 {
                hits as f64 / (hits + misses) as f64
            } else {
                0.0
            };
            scalar(
                &mut out,
                "asynctls_offload_hit_rate",
                "gauge",
                "Fraction of key reads served from resident slots.",
                rate.to_string(),
            );
        }
        if let Some(fraction) = *self.attended_fraction.lock().unwrap_or_else(|e| e.into_inner()) {
            scalar(
                &mut out,
                "asynctls_attended_fraction",
                "gauge",
                "Mean fraction of the context attended per layer and decode step (measured steps).",
                fraction.to_string(),
            );
            scalar(
                &mut out,
                "asynctls_attention_recall",
                "gauge",
                "Mean dense softmax mass on the attended tokens (measured steps).",
                self.recall.get().to_string(),
            );
        }
        out
    }
}

/// This process's resident memory (`VmRSS` of `/proc/self/status`), if readable.
fn process_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The value of an unlabelled series in Prometheus text (for tests and the
/// load generator).
pub fn scrape_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_series_parse_back() {
        let m = Metrics::default();
        m.ttft.observe(0.007);
        m.ttft.observe(100.0);
        m.count_request(Outcome::Completed);
        m.kv_blocks_total.store(10, Ordering::Relaxed);
        m.kv_blocks_used.store(3, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("asynctls_time_to_first_token_seconds_bucket{le=\"0.01\"} 1"));
        assert!(text.contains("asynctls_time_to_first_token_seconds_bucket{le=\"60\"} 1"));
        assert!(text.contains("asynctls_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("asynctls_requests_total{outcome=\"completed\"} 1"));
        assert_eq!(scrape_value(&text, "asynctls_kv_blocks_free"), Some(7.0));
        assert_eq!(scrape_value(&text, "asynctls_kv_blocks_used"), Some(3.0));
        // Not measured: not exported.
        assert!(!text.contains("asynctls_offload_hit_rate"));
        m.add_offload_reads(3, 1);
        assert_eq!(scrape_value(&m.render(), "asynctls_offload_hit_rate"), Some(0.75));
    }
}
