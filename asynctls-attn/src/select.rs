//! The two selection stages, each as a function of its own so that the CUDA
//! kernels have a CPU twin per stage.
//!
//! Stage one scores blocks with Quest's bound in GEMM form:
//! `sum_i max(q_i * max_i, q_i * min_i) = q+ . max + q- . min`, so stacking
//! `[q+ | q-]` for a group's query heads against `[max | min]` of every block
//! is one `matmul_nt`. Stage two scores tokens by their INT4 labels.

use asynctls_kernels::cpu;
use asynctls_kvcache::{BlockId, HostReadable};

use crate::{GroupReduce, Result};

/// Logical blocks always attended: the first `sink_blocks`, and the newest
/// `local_blocks` full blocks plus the partial block (if any). Sorted.
pub fn forced_blocks(num_tokens: usize, block_size: usize, sink_blocks: usize, local_blocks: usize) -> Vec<u32> {
    let num_blocks = num_tokens.div_ceil(block_size);
    let partial = usize::from(num_tokens % block_size != 0);
    let local_start = num_blocks.saturating_sub(local_blocks + partial);
    let mut forced: Vec<u32> = (0..sink_blocks.min(num_blocks) as u32).collect();
    forced.extend((local_start.max(sink_blocks.min(num_blocks)) as u32)..num_blocks as u32);
    forced
}

/// The logical blocks that are not forced: the ones the selection ranks.
pub fn rankable_blocks(num_tokens: usize, block_size: usize, forced: &[u32]) -> Vec<u32> {
    let num_blocks = num_tokens.div_ceil(block_size) as u32;
    (0..num_blocks).filter(|b| forced.binary_search(b).is_err()).collect()
}

/// Combines per-head scores (`[g, n]`, row per query head) into one row.
pub fn reduce_group(per_head: &[f32], group: usize, reduce: GroupReduce) -> Vec<f32> {
    let n = per_head.len() / group.max(1);
    let mut out = per_head[..n].to_vec();
    for row in per_head.chunks_exact(n.max(1)).skip(1).take(group.saturating_sub(1)) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o = match reduce {
                GroupReduce::Sum => *o + v,
                GroupReduce::Max => o.max(v),
            };
        }
    }
    out
}

/// Per-head upper bounds of `q . k` for every key of each block, `[g, blocks.len()]`
/// (row per query head), computed as one GEMM of `[q+ | q-]` against `[max | min]`.
pub fn block_bounds<S: HostReadable>(
    storage: &S,
    layer: usize,
    head: usize,
    blocks: &[BlockId],
    queries: &[f32],
) -> Result<Vec<f32>> {
    let kd = storage.config().key_dim;
    let g = queries.len() / kd;
    let mut signed = vec![0.0f32; g * 2 * kd];
    for (q, row) in queries.chunks_exact(kd).zip(signed.chunks_exact_mut(2 * kd)) {
        let (pos, neg) = row.split_at_mut(kd);
        for ((p, n), &v) in pos.iter_mut().zip(neg.iter_mut()).zip(q) {
            *p = v.max(0.0);
            *n = v.min(0.0);
        }
    }
    let mut meta = vec![0.0f32; blocks.len() * 2 * kd];
    for (&b, row) in blocks.iter().zip(meta.chunks_exact_mut(2 * kd)) {
        let (max, min) = storage.key_bounds(layer, b, head);
        row[..kd].copy_from_slice(max);
        row[kd..].copy_from_slice(min);
    }
    let mut scores = vec![0.0f32; g * blocks.len()];
    cpu::matmul_nt(&signed, &meta, &mut scores, g, 2 * kd, blocks.len())?;
    Ok(scores)
}

/// Approximate `q . k` from the INT4 labels, for every token of each of
/// `blocks` (all full), `[g, blocks.len() * block_size]`.
pub fn label_scores<S: HostReadable>(
    storage: &S,
    layer: usize,
    head: usize,
    blocks: &[BlockId],
    queries: &[f32],
) -> Vec<f32> {
    let c = storage.config();
    let (kd, bs, r2) = (c.key_dim, c.block_size, c.label_channels / 2);
    let channels = storage.label_channels(layer, head);
    let g = queries.len() / kd;
    // The queries restricted to the label channels, and their sums.
    let picked: Vec<Vec<f32>> = queries
        .chunks_exact(kd)
        .map(|q| channels.iter().map(|&ch| q[ch as usize]).collect())
        .collect();
    let sums: Vec<f32> = picked.iter().map(|p| p.iter().sum()).collect();
    let n = blocks.len() * bs;
    let mut scores = vec![0.0f32; g * n];
    // Unpack each token's codes once, then score it for every head of the group.
    let mut codes = vec![0.0f32; 2 * r2];
    for (bi, &b) in blocks.iter().enumerate() {
        let (labels, params) = storage.labels(layer, b, head);
        for slot in 0..bs {
            for (pair, &byte) in codes.chunks_exact_mut(2).zip(&labels[slot * r2..(slot + 1) * r2]) {
                pair[0] = (byte & 0x0f) as f32;
                pair[1] = (byte >> 4) as f32;
            }
            let [scale, zero] = params[slot];
            let (scale, zero) = (scale.to_f32(), zero.to_f32());
            for h in 0..g {
                scores[h * n + bi * bs + slot] = zero * sums[h] + scale * cpu::dot(&picked[h], &codes);
            }
        }
    }
    scores
}
