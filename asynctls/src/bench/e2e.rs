//! `asynctls bench e2e`: prefill and decode throughput of a whole model
//! (random weights at a real model's size, or a checkpoint), with each
//! attention policy decoding from the same prefilled context (a fork of it,
//! so every policy sees the same KV).

use std::time::Instant;

use anyhow::{bail, Result};
use asynctls_attn::{Policy, SparseConfig};
use asynctls_kernels::cpu;
use asynctls_kvcache::KvDType;
use asynctls_models::{AttentionPlan, CausalLm};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct E2eBenchConfig {
    pub contexts: Vec<usize>,
    pub policies: Vec<Policy>,
    pub budget: usize,
    pub dense_layers: usize,
    pub decode_tokens: usize,
    pub kv_dtype: KvDType,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eRow {
    pub ctx: usize,
    pub policy: Policy,
    pub budget: Option<usize>,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub decode_ms_per_token: f64,
    /// Greedy tokens agreeing with the dense run's, position by position.
    pub agreement_with_dense: Option<f64>,
}

/// Runs the sweep; `progress` is told what is running.
pub fn run(model: &dyn CausalLm, config: &E2eBenchConfig, mut progress: impl FnMut(&str)) -> Result<Vec<E2eRow>> {
    let mut rows = Vec::new();
    for &ctx in &config.contexts {
        if ctx == 0 || ctx + config.decode_tokens > model.max_positions() {
            bail!(
                "context {ctx} + {} decode tokens does not fit the model's {} positions",
                config.decode_tokens,
                model.max_positions()
            );
        }
        let blocks = 2 * (ctx + config.decode_tokens).div_ceil(64) + config.policies.len() + 2;
        let mut cache = model.new_cache(blocks, config.kv_dtype, None)?;
        // A deterministic pseudo-random prompt.
        let prompt: Vec<u32> = (0..ctx as u64)
            .map(|i| ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ config.seed) >> 17) as u32 % model.vocab_size() as u32)
            .collect();
        progress(&format!("ctx {ctx}: prefill"));
        let seq = cache.add_sequence();
        let start = Instant::now();
        let logits = model.prefill(&mut cache, seq, &prompt, false)?;
        let prefill_s = start.elapsed().as_secs_f64();
        let first = cpu::argmax(&logits).unwrap_or(0);
        let mut dense_tokens: Option<Vec<u32>> = None;
        for &policy in &config.policies {
            progress(&format!("ctx {ctx}: decode {policy}"));
            let plan = AttentionPlan {
                sparse: SparseConfig {
                    dense_below: 0,
                    ..SparseConfig::with_budget(policy, config.budget, 64)
                },
                dense_layers: config.dense_layers,
            };
            let fork = cache.fork(seq)?;
            let mut token = first;
            let mut tokens = Vec::with_capacity(config.decode_tokens);
            let start = Instant::now();
            for _ in 0..config.decode_tokens {
                let logits = model.decode_step(&mut cache, &[fork], &[token], &plan, None)?;
                token = cpu::argmax(&logits).unwrap_or(0);
                tokens.push(token);
            }
            let decode_s = start.elapsed().as_secs_f64();
            cache.free(fork)?;
            let agreement = dense_tokens.as_ref().map(|d: &Vec<u32>| {
                d.iter().zip(&tokens).filter(|(a, b)| a == b).count() as f64 / d.len().max(1) as f64
            });
            if policy == Policy::Dense {
                dense_tokens = Some(tokens);
            }
            rows.push(E2eRow {
                ctx,
                policy,
                budget: (policy != Policy::Dense).then_some(config.budget),
                prefill_tokens_per_s: ctx as f64 / prefill_s,
                decode_tokens_per_s: config.decode_tokens as f64 / decode_s,
                decode_ms_per_token: decode_s * 1e3 / config.decode_tokens.max(1) as f64,
                agreement_with_dense: agreement,
            });
        }
    }
    Ok(rows)
}

pub fn render_table(name: &str, rows: &[E2eRow]) -> String {
    use std::fmt::Write;
    let mut s = format!("end-to-end on cpu, {name}, batch 1\n");
    let _ = writeln!(
        s,
        "{:>7} {:>6} {:>6} {:>14} {:>13} {:>10} {:>10}",
        "ctx", "policy", "budget", "prefill tok/s", "decode tok/s", "ms/token", "agree"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>7} {:>6} {:>6} {:>14.1} {:>13.2} {:>10.1} {:>10}",
            r.ctx,
            r.policy.name(),
            r.budget.map_or("-".into(), |b| b.to_string()),
            r.prefill_tokens_per_s,
            r.decode_tokens_per_s,
            r.decode_ms_per_token,
            r.agreement_with_dense
                .map_or("-".into(), |a| format!("{:.0}%", a * 100.0))
        );
    }
    s
}
