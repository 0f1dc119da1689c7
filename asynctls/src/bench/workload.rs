//! Synthetic decode workloads whose attention is concentrated like a real
//! model's: random keys with a few dominant channels, and "planted" spans of
//! consecutive tokens at random positions (a relevant sentence, say) whose
//! keys lean towards the query direction of their KV head, so a small set of
//! tokens carries most of the softmax mass.

use asynctls_attn::AttnShape;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// How a workload is drawn.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSpec {
    /// Planted spans per sequence and KV head, per 1024 tokens of context.
    pub planted_per_1k: f32,
    /// Longest planted span (lengths are uniform in 1..=this).
    pub max_span: usize,
    /// Range of the logit bump of a planted token.
    pub planted_logit: (f32, f32),
    /// Every `outlier_every`-th channel has `outlier_scale` times the spread.
    pub outlier_every: usize,
    pub outlier_scale: f32,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            planted_per_1k: 0.5,
            max_span: 16,
            planted_logit: (4.0, 10.0),
            outlier_every: 8,
            outlier_scale: 4.0,
        }
    }
}

/// Keys, values and queries of a batch of sequences, one layer.
#[derive(Debug)]
pub struct Workload {
    /// Per sequence `[len, kv_heads, key_dim]`.
    pub keys: Vec<Vec<f32>>,
    /// Per sequence `[len, kv_heads, value_dim]` (empty for MLA).
    pub values: Vec<Vec<f32>>,
    /// `[batch, q_heads, key_dim]`.
    pub queries: Vec<f32>,
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box-Muller; rand's distributions crate is not worth a dependency here.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl WorkloadSpec {
    fn channel_scale(&self, c: usize) -> f32 {
        if self.outlier_every > 0 && c % self.outlier_every == 0 {
            self.outlier_scale
        } else {
            1.0
        }
    }

    /// One query direction per KV head (unit vectors), and per query head a
    /// query close to its group's direction.
    fn queries(&self, rng: &mut StdRng, shape: &AttnShape) -> (Vec<Vec<f32>>, Vec<f32>) {
        let kd = shape.key_dim;
        let dirs: Vec<Vec<f32>> = (0..shape.kv_heads)
            .map(|_| {
                let v: Vec<f32> = (0..kd).map(|c| gaussian(rng) * self.channel_scale(c)).collect();
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / n).collect()
            })
            .collect();
        let mut q = Vec::with_capacity(shape.q_heads * kd);
        for h in 0..shape.q_heads {
            let dir = &dirs[h / shape.group()];
            for (c, &d) in dir.iter().enumerate() {
                q.push(d * (kd as f32).sqrt() + 0.5 * gaussian(rng) * self.channel_scale(c) / (kd as f32).sqrt());
            }
        }
        (dirs, q)
    }

    /// Draws a batch: `lens[i]` tokens for sequence `i`.
    pub fn generate(&self, shape: &AttnShape, separate_values: bool, lens: &[usize], seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let kd = shape.key_dim;
        let (mut keys, mut values, mut queries) = (Vec::new(), Vec::new(), Vec::new());
        for &len in lens {
            let (dirs, q) = self.queries(&mut rng, shape);
            let mut k: Vec<f32> = (0..len * shape.kv_heads * kd)
                .map(|i| gaussian(&mut rng) * self.channel_scale(i % kd) / 2.0)
                .collect();
            let planted = ((len as f32 / 1024.0) * self.planted_per_1k).ceil() as usize;
            for h in 0..shape.kv_heads {
                // |q| is about sqrt(kd): a key bump of b along the direction
                // raises the logit by about b * sqrt(kd) * scale.
                let per_unit = (kd as f32).sqrt() * shape.scale;
                for _ in 0..planted {
                    let start = rng.random_range(0..len);
                    let span = rng.random_range(1..=self.max_span.max(1));
                    for t in start..(start + span).min(len) {
                        let bump = rng.random_range(self.planted_logit.0..self.planted_logit.1) / per_unit;
                        let row = &mut k[(t * shape.kv_heads + h) * kd..(t * shape.kv_heads + h + 1) * kd];
                        for (x, d) in row.iter_mut().zip(&dirs[h]) {
                            *x += bump * d;
                        }
                    }
                }
            }
            keys.push(k);
            values.push(if separate_values {
                (0..len * shape.kv_heads * shape.value_dim)
                    .map(|_| gaussian(&mut rng))
                    .collect()
            } else {
                Vec::new()
            });
            queries.extend(q);
        }
        Workload { keys, values, queries }
    }
}
