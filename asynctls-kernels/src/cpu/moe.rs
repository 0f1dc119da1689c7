//! The CPU twins of the mixture-of-experts kernels (`cuda/moe.cu`): the
//! router of GLM-4.7-Flash / DeepSeek-V3 as HF computes it, and the routed
//! experts' SwiGLU over a token's chosen experts, combined in slot order.

use super::{matmul_nt, silu_mul, topk_indices};
use crate::error::invalid;
use crate::Result;

/// How a router turns a token's logits into its experts and their weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteConfig {
    pub experts: usize,
    /// Expert groups (`n_group`); the experts divide evenly into them.
    pub groups: usize,
    /// Groups kept per token (`topk_group`), ranked by their two best scores.
    pub top_groups: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Normalise the chosen experts' scores to sum to one (`norm_topk_prob`).
    pub normalize: bool,
    /// Factor on every weight after normalising (`routed_scaling_factor`).
    pub scaling: f32,
}

impl RouteConfig {
    /// Checks the sizes hold together (a model config is untrusted input).
    pub fn check(&self) -> Result<()> {
        let c = self;
        if c.experts == 0
            || c.groups == 0
            || c.experts % c.groups != 0
            || c.top_groups == 0
            || c.top_groups > c.groups
            || c.top_k == 0
            || c.top_k > c.experts
            || c.top_k > c.top_groups * (c.experts / c.groups)
        {
            return Err(invalid(
                "moe_route",
                format!(
                    "{} experts in {} groups, keeping {} groups and {} experts, is inconsistent",
                    c.experts, c.groups, c.top_groups, c.top_k
                ),
            ));
        }
        Ok(())
    }
}

/// The experts (best first) and weights of one token from its router
/// logits: sigmoid scores; `bias` (the score-correction bias) added only
/// for choosing; with groups, the groups ranked by the sum of their two best
/// biased scores and all but the best `top_groups` masked; top-k of the
/// biased scores; weights from the unbiased scores, normalised and scaled.
pub fn route(logits: &[f32], bias: &[f32], c: &RouteConfig) -> (Vec<u32>, Vec<f32>) {
    let scores: Vec<f32> = logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
    let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    if c.groups > 1 {
        let per_group = c.experts / c.groups;
        let group_scores: Vec<f32> = choice
            .chunks_exact(per_group)
            .map(|g| topk_indices(g, 2).iter().map(|&i| g[i as usize]).sum())
            .collect();
        let kept = topk_indices(&group_scores, c.top_groups);
        for (g, chunk) in choice.chunks_exact_mut(per_group).enumerate() {
            if !kept.contains(&(g as u32)) {
                chunk.fill(f32::NEG_INFINITY);
            }
        }
    }
    let top = topk_indices(&choice, c.top_k);
    let mut weights: Vec<f32> = top.iter().map(|&i| scores[i as usize]).collect();
    if c.normalize {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    weights.iter_mut().for_each(|w| *w *= c.scaling);
    (top, weights)
}

/// [`route`] of each row of `x` (`[n, h]`) through the f32 `router`
/// (`[experts, h]`): the experts and weights, `[n, top_k]` each.
pub fn route_rows(x: &[f32], router: &[f32], bias: &[f32], h: usize, c: &RouteConfig) -> Result<(Vec<u32>, Vec<f32>)> {
    let n = x.len() / h.max(1);
    let mut logits = vec![0.0; n * c.experts];
    matmul_nt(x, router, &mut logits, n, h, c.experts)?;
    let (mut ids, mut weights) = (Vec::with_capacity(n * c.top_k), Vec::with_capacity(n * c.top_k));
    for row in logits.chunks_exact(c.experts) {
        let (i, w) = route(row, bias, c);
        ids.extend(i);
        weights.extend(w);
    }
    Ok((ids, weights))
}

/// One expert's SwiGLU weights as f32 slices (`[inter, h]`, `[inter, h]`, `[h, inter]`).
#[derive(Debug, Clone, Copy)]
pub struct ExpertRef<'a> {
    pub gate: &'a [f32],
    pub up: &'a [f32],
    pub down: &'a [f32],
}

/// `out[t] += base[t] + sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`
/// for `x` `[n, h]`, `ids` / `weights` `[n, k]`, summed in slot order onto
/// `base` and then added to `out` (as `moe_combine`).
#[allow(clippy::too_many_arguments)]
pub fn experts_forward(
    x: &[f32],
    experts: &[ExpertRef<'_>],
    ids: &[u32],
    weights: &[f32],
    k: usize,
    h: usize,
    inter: usize,
    base: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let n = x.len() / h.max(1);
    if x.len() != n * h || out.len() != n * h || base.len() != n * h || ids.len() != n * k || weights.len() != n * k {
        return Err(invalid(
            "moe_experts",
            format!(
                "x has {} values, out {}, ids {}, weights {} for {n} tokens of {h} and {k} experts each",
                x.len(),
                out.len(),
                ids.len(),
                weights.len()
            ),
        ));
    }
    let (mut gate, mut up, mut y) = (vec![0.0; inter], vec![0.0; inter], vec![0.0; h]);
    for t in 0..n {
        let row = &x[t * h..(t + 1) * h];
        let mut acc = base[t * h..(t + 1) * h].to_vec();
        for j in 0..k {
            let e = experts.get(ids[t * k + j] as usize).ok_or_else(|| {
                invalid(
                    "moe_experts",
                    format!("expert {} of {} experts", ids[t * k + j], experts.len()),
                )
            })?;
            matmul_nt(row, e.gate, &mut gate, 1, h, inter)?;
            matmul_nt(row, e.up, &mut up, 1, h, inter)?;
            silu_mul(&mut gate, &up)?;
            matmul_nt(&gate, e.down, &mut y, 1, inter, h)?;
            super::axpy(weights[t * k + j], &y, &mut acc);
        }
        out[t * h..(t + 1) * h].iter_mut().zip(&acc).for_each(|(o, a)| *o += a);
    }
    Ok(())
}
