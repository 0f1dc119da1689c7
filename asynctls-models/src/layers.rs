//! Host-slice building blocks of GLM-4.7-Flash's layers (linear layers and
//! the SwiGLU MLP over `&[f32]`, HF weight names), which compute on the CPU
//! until GLM's projections and MoE move onto tensor ops
//! ([`crate::decoder`] holds the tensor forms the GQA family uses).

use asynctls_kernels::cpu;

use crate::weights::WeightSource;
use crate::Result;

/// A dense layer `y = x W^T + b` with HF's `[out, in]` weight.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    pub(crate) fn load(w: &dyn WeightSource, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?,
            bias: if bias {
                Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
            } else {
                None
            },
            in_dim,
            out_dim,
        })
    }

    /// `x`: `[n, in]` -> `[n, out]`.
    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.in_dim;
        let mut y = vec![0.0; n * self.out_dim];
        cpu::matmul_nt(x, &self.weight, &mut y, n, self.in_dim, self.out_dim).expect("shapes checked at load");
        if let Some(b) = &self.bias {
            y.chunks_exact_mut(self.out_dim)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
        }
        y
    }
}

#[derive(Debug)]
pub(crate) struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub(crate) fn load(w: &dyn WeightSource, prefix: &str, h: usize, i: usize) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), h, i, false)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), h, i, false)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, h, false)?,
        })
    }

    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut gate = self.gate_proj.forward(x);
        cpu::silu_mul(&mut gate, &self.up_proj.forward(x)).expect("same shapes");
        self.down_proj.forward(&gate)
    }
}

/// `x += y`.
pub(crate) fn add_residual(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
