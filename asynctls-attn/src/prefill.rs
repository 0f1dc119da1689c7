//! Causal attention of a chunk of new tokens over everything before them:
//! the prompt's prefill. Dense by design (sparse selection pays off per
//! decode step, not over a prompt). The CPU reference for the
//! FlashAttention-style prefill kernel.

use asynctls_kernels::cpu;
use asynctls_kvcache::{BlockTable, HostReadable};
use rayon::prelude::*;

use crate::error::shape_err;
use crate::{AttnShape, Result};

/// Query rows per GEMM: bounds the score matrix at `ROWS x context` floats.
const ROWS_PER_CHUNK: usize = 128;

/// Attention of tokens `start..start + n` of a sequence (`q`: `[n, q_heads,
/// key_dim]`) over tokens `0..=own position`, reading K/V from the cache
/// (which must already hold them). Writes `out` (`[n, q_heads, value_dim]`).
#[allow(clippy::too_many_arguments)]
pub fn prefill<S: HostReadable>(
    storage: &S,
    table: &BlockTable,
    layer: usize,
    start: usize,
    q: &[f32],
    shape: &AttnShape,
    out: &mut [f32],
) -> Result<()> {
    shape.check_cache(storage.config())?;
    let (kd, vd, g, qh) = (shape.key_dim, shape.value_dim, shape.group(), shape.q_heads);
    if q.len() % (qh * kd) != 0 {
        return Err(shape_err("prefill queries", format!("[n, {qh}, {kd}]"), q.len()));
    }
    let n = q.len() / (qh * kd);
    if out.len() != n * qh * vd {
        return Err(shape_err("prefill output", format!("[{n}, {qh}, {vd}]"), out.len()));
    }
    let total = start + n;
    if table.written(layer) < total {
        return Err(shape_err(
            "tokens in the cache for prefill",
            format!("at least {total}"),
            table.written(layer),
        ));
    }
    let bs = storage.config().block_size;
    // Per KV head: the output rows of its group, `[n, g, vd]`.
    let per_head: Vec<Vec<f32>> = (0..shape.kv_heads)
        .into_par_iter()
        .map(|head| {
            let mut keys = vec![0.0f32; total * kd];
            let mut values = vec![0.0f32; total * vd];
            for t in 0..total {
                let block = table.blocks()[t / bs];
                storage
                    .keys(layer, block, head)
                    .read(t % bs, &mut keys[t * kd..(t + 1) * kd]);
                storage
                    .values(layer, block, head)
                    .read(t % bs, &mut values[t * vd..(t + 1) * vd]);
            }
            // The group's queries as rows (token, head-in-group).
            let mut rows = vec![0.0f32; n * g * kd];
            for i in 0..n {
                let src = &q[(i * qh + head * g) * kd..(i * qh + head * g + g) * kd];
                rows[i * g * kd..(i + 1) * g * kd].copy_from_slice(src);
            }
            let mut result = vec![0.0f32; n * g * vd];
            for chunk_start in (0..n).step_by(ROWS_PER_CHUNK) {
                let chunk_end = (chunk_start + ROWS_PER_CHUNK).min(n);
                let m = (chunk_end - chunk_start) * g;
                let visible = start + chunk_end;
                let mut scores = vec![0.0f32; m * visible];
                cpu::matmul_nt(
                    &rows[chunk_start * g * kd..chunk_end * g * kd],
                    &keys[..visible * kd],
                    &mut scores,
                    m,
                    kd,
                    visible,
                )
                .expect("shapes derived above");
                for (r, row) in scores.chunks_exact_mut(visible).enumerate() {
                    let own = start + chunk_start + r / g;
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = if j <= own { *s * shape.scale } else { f32::NEG_INFINITY };
                    }
                    cpu::softmax_in_place(row);
                }
                cpu::matmul(
                    &scores,
                    &values[..visible * vd],
                    &mut result[chunk_start * g * vd..chunk_end * g * vd],
                    m,
                    visible,
                    vd,
                )
                .expect("shapes derived above");
            }
            result
        })
        .collect();
    for (head, rows) in per_head.iter().enumerate() {
        for i in 0..n {
            out[(i * qh + head * g) * vd..(i * qh + head * g + g) * vd]
                .copy_from_slice(&rows[i * g * vd..(i + 1) * g * vd]);
        }
    }
    Ok(())
}
