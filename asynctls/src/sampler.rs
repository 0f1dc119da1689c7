//! Choosing the next token from logits: greedy, or temperature with top-k
//! and top-p, from a seeded generator so that runs repeat.

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

/// How tokens are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// A sampler with its own random stream.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            params,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token for one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.is_greedy() {
            return asynctls_kernels::cpu::argmax(logits).unwrap_or(0);
        }
        let k = if p.top_k == 0 {
            logits.len()
        } else {
            p.top_k.min(logits.len())
        };
        let order = asynctls_kernels::cpu::topk_indices(logits, k);
        let mut probs: Vec<f32> = order.iter().map(|&i| logits[i as usize] / p.temperature).collect();
        asynctls_kernels::cpu::softmax_in_place(&mut probs);
        // Top-p over the sorted candidates: keep up to and including the
        // token that brings the mass to top_p.
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                mass += q;
                if mass >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut draw = self.rng.random_range(0.0..total.max(f32::MIN_POSITIVE));
        for (i, &q) in probs[..keep].iter().enumerate() {
            if draw < q {
                return order[i];
            }
            draw -= q;
        }
        order[keep - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn seeded_runs_repeat_and_cutoffs_hold() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(params(1.0, 0.9, 0, 7)), draw(params(1.0, 0.9, 0, 7)));
        assert_ne!(draw(params(1.0, 1.0, 0, 7)), draw(params(1.0, 1.0, 0, 8)));
        // top-k 1 and a tiny top-p are greedy.
        let best = asynctls_kernels::cpu::argmax(&logits).unwrap();
        assert!(draw(params(1.0, 1.0, 1, 3)).iter().all(|&t| t == best));
        assert!(draw(params(1.0, 1e-6, 0, 3)).iter().all(|&t| t == best));
        // top-k 3 never leaves the three best.
        let top3 = asynctls_kernels::cpu::topk_indices(&logits, 3);
        assert!(draw(params(2.0, 1.0, 3, 3)).iter().all(|t| top3.contains(t)));
        // a high temperature reaches beyond the best token.
        assert!(draw(params(5.0, 1.0, 0, 3)).iter().any(|&t| t != best));
    }
}
