//! Choosing the next token from logits: greedy, or temperature with top-k
//! and top-p, from a seeded generator so that runs repeat.

use asynctls_kernels::cpu::sampling::SamplingParams as KernelParams;
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

impl SamplingParams {
    /// The kernels' form of these knobs (the CPU twin and the GPU sampler
    /// take the same struct and draw the same token for the same step).
    pub fn kernel_params(&self) -> KernelParams {
        KernelParams {
            temperature: self.temperature,
            top_k: u32::try_from(self.top_k).unwrap_or(u32::MAX),
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

/// A request's sampler: its knobs and how many tokens it has drawn (the
/// draw of a step is a pure function of seed and step, so a request samples
/// the same tokens on the CPU and the GPU and in any batch slot).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    step: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler { params, step: 0 }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The step of the next draw.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Counts one draw made elsewhere (on the GPU) for this sampler.
    pub fn advance(&mut self) {
        self.step += 1;
    }

    /// The next token for one row of logits, on the host.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = asynctls_kernels::cpu::sampling::sample_row(logits, &self.params.kernel_params(), self.step)
            .unwrap_or_else(|_| asynctls_kernels::cpu::argmax(logits).unwrap_or(0));
        self.step += 1;
        token
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
