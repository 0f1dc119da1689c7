//! How close a sparse step is to dense attention: recall of the dense
//! softmax mass, and the relative L2 error of the output.

use asynctls_kernels::cpu;
use asynctls_kvcache::{BlockTable, HostReadable};

use crate::{AttnShape, DecodeReport};

/// Dense softmax probabilities of every query head over every token of each
/// sequence: `probs[seq][q_head * len + token]`.
pub fn dense_probabilities<S: HostReadable>(
    storage: &S,
    tables: &[&BlockTable],
    layer: usize,
    q: &[f32],
    shape: &AttnShape,
) -> Vec<Vec<f32>> {
    let (kd, bs) = (shape.key_dim, storage.config().block_size);
    let mut row = vec![0.0f32; kd];
    tables
        .iter()
        .enumerate()
        .map(|(s, table)| {
            let len = table.written(layer);
            let mut probs = vec![0.0f32; shape.q_heads * len];
            for qh in 0..shape.q_heads {
                let head = qh / shape.group();
                let query = &q[(s * shape.q_heads + qh) * kd..(s * shape.q_heads + qh + 1) * kd];
                let p = &mut probs[qh * len..(qh + 1) * len];
                for (t, pt) in p.iter_mut().enumerate() {
                    storage.keys(layer, table.blocks()[t / bs], head).read(t % bs, &mut row);
                    *pt = cpu::dot(query, &row) * shape.scale;
                }
                cpu::softmax_in_place(p);
            }
            probs
        })
        .collect()
}

/// Mean over sequences and query heads of the dense softmax mass that falls
/// on the tokens the step attended. 1.0 for dense.
pub fn recall(report: &DecodeReport, probs: &[Vec<f32>], shape: &AttnShape) -> f64 {
    let mut total = 0.0f64;
    let mut count = 0usize;
    for (s, p) in probs.iter().enumerate() {
        let len = p.len() / shape.q_heads;
        for qh in 0..shape.q_heads {
            let sel = &report.heads[s * shape.kv_heads + qh / shape.group()];
            let row = &p[qh * len..(qh + 1) * len];
            total += sel.tokens.iter().map(|&t| row[t as usize] as f64).sum::<f64>();
            count += 1;
        }
    }
    total / count.max(1) as f64
}

/// `||a - b|| / ||b||` (0 when both are zero).
pub fn relative_l2(a: &[f32], reference: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(reference) {
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}
