//! Rotary position embedding, in the two layouts checkpoints use.

use crate::error::invalid;
use crate::Result;

/// How the rotated pairs are laid out in a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// GPT-NeoX / HF Llama: channel `i` pairs with `i + d/2`.
    Neox,
    /// GPT-J / original: channel `2i` pairs with `2i + 1`.
    Interleaved,
}

/// Precomputed `cos` and `sin` per position and frequency.
#[derive(Debug, Clone)]
pub struct RopeTable {
    rotary_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Table for `max_positions` positions, frequencies `theta^(-2i/rotary_dim)`.
    pub fn new(rotary_dim: usize, theta: f32, max_positions: usize) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..rotary_dim / 2)
            .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / rotary_dim as f64) as f32)
            .collect();
        Self::from_inv_freq(rotary_dim, &inv_freq, max_positions)
    }

    /// Table from explicit inverse frequencies (for scaled RoPE variants).
    pub fn from_inv_freq(rotary_dim: usize, inv_freq: &[f32], max_positions: usize) -> Result<Self> {
        if rotary_dim == 0 || rotary_dim % 2 != 0 || inv_freq.len() != rotary_dim / 2 {
            return Err(invalid(
                "rope",
                format!(
                    "rotary dim {rotary_dim} must be even and match {} inverse frequencies",
                    inv_freq.len()
                ),
            ));
        }
        let half = rotary_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in inv_freq {
                let angle = p as f64 * f as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(RopeTable { rotary_dim, cos, sin })
    }

    /// Multiplies every cos and sin by `scale` (YaRN's attention factor,
    /// which HF folds into the rotation).
    pub fn with_attention_scale(mut self, scale: f32) -> Self {
        self.cos.iter_mut().chain(self.sin.iter_mut()).for_each(|v| *v *= scale);
        self
    }

    /// The cos and sin tables, `[max_positions, rotary_dim / 2]` each (what
    /// the GPU's RoPE kernel reads).
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / (self.rotary_dim / 2)
    }

    /// Rotates the first `rotary_dim` channels of every head of `x`
    /// (`[positions.len(), heads, head_dim]`), in place.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, positions: &[usize], style: RopeStyle) -> Result<()> {
        if head_dim < self.rotary_dim || positions.is_empty() || x.len() % (positions.len() * head_dim) != 0 {
            return Err(invalid(
                "rope",
                format!(
                    "input of {} elements is not [{} positions, heads, {head_dim}] with head_dim >= rotary dim {}",
                    x.len(),
                    positions.len(),
                    self.rotary_dim
                ),
            ));
        }
        let half = self.rotary_dim / 2;
        let per_token = x.len() / positions.len();
        for (token, &pos) in x.chunks_exact_mut(per_token).zip(positions) {
            if pos >= self.max_positions() {
                return Err(invalid(
                    "rope",
                    format!(
                        "position {pos} is beyond the table's {} positions",
                        self.max_positions()
                    ),
                ));
            }
            let cos = &self.cos[pos * half..(pos + 1) * half];
            let sin = &self.sin[pos * half..(pos + 1) * half];
            for head in token.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match style {
                        RopeStyle::Neox => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_relative_positions() {
        let table = RopeTable::new(8, 10_000.0, 64).unwrap();
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let q0: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect();
            let k0: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos()).collect();
            let score = |pq: usize, pk: usize| {
                let (mut q, mut k) = (q0.clone(), k0.clone());
                table.apply(&mut q, 8, &[pq], style).unwrap();
                table.apply(&mut k, 8, &[pk], style).unwrap();
                crate::cpu::dot(&q, &k)
            };
            // q.k depends only on the distance between positions.
            assert!((score(10, 3) - score(20, 13)).abs() < 1e-4);
            let mut q = q0.clone();
            table.apply(&mut q, 8, &[17], style).unwrap();
            let n0: f32 = q0.iter().map(|v| v * v).sum();
            let n1: f32 = q.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
        }
    }

    #[test]
    fn position_zero_is_identity_and_styles_differ() {
        let table = RopeTable::new(4, 100.0, 4).unwrap();
        let x = vec![1.0, 2.0, 3.0, 4.0];
        let mut y = x.clone();
        table.apply(&mut y, 4, &[0], RopeStyle::Neox).unwrap();
        assert_eq!(x, y);
        let (mut a, mut b) = (x.clone(), x.clone());
        table.apply(&mut a, 4, &[1], RopeStyle::Neox).unwrap();
        table.apply(&mut b, 4, &[1], RopeStyle::Interleaved).unwrap();
        assert_ne!(a, b);
        // neox pairs (0,2): angle 1 rad for the first frequency.
        assert!((a[0] - (1.0 * 1f32.cos() - 3.0 * 1f32.sin())).abs() < 1e-6);
        // interleaved pairs (0,1).
        assert!((b[0] - (1.0 * 1f32.cos() - 2.0 * 1f32.sin())).abs() < 1e-6);
    }

    #[test]
    fn out_of_table_position_is_an_error() {
        let table = RopeTable::new(4, 100.0, 4).unwrap();
        let err = table.apply(&mut [0.0; 4], 4, &[4], RopeStyle::Neox).unwrap_err();
        assert!(err.to_string().contains("position 4"));
    }
}
