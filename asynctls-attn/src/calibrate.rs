//! Offline choice of the label channels: per layer and KV head, the `r`
//! channels where queries and keys carry the most of `q . k`.

use crate::error::shape_err;
use crate::{AttnShape, Result};

/// Ranks channels by the mean of `|q_c * k_c|` over all pairs of calibration
/// queries (`[n_q, q_heads, key_dim]`) and keys (`[n_k, kv_heads, key_dim]`),
/// per KV head over the query heads of its group, and keeps the top `r`
/// (sorted ascending). The mean over pairs factorizes into
/// `mean|q_c| * mean|k_c|`, so this costs one pass over each side.
pub fn calibrate_channels(queries: &[f32], keys: &[f32], shape: &AttnShape, r: usize) -> Result<Vec<Vec<u16>>> {
    let kd = shape.key_dim;
    if queries.len() % (shape.q_heads * kd) != 0 || queries.is_empty() {
        return Err(shape_err(
            "calibration queries",
            format!("[n, {}, {kd}]", shape.q_heads),
            queries.len(),
        ));
    }
    if keys.len() % (shape.kv_heads * kd) != 0 || keys.is_empty() {
        return Err(shape_err(
            "calibration keys",
            format!("[n, {}, {kd}]", shape.kv_heads),
            keys.len(),
        ));
    }
    if r > kd || r > u16::MAX as usize {
        return Err(shape_err("label channels r", format!("at most {kd}"), r));
    }
    let q_mean = mean_abs(queries, shape.q_heads, kd);
    let k_mean = mean_abs(keys, shape.kv_heads, kd);
    Ok((0..shape.kv_heads)
        .map(|head| {
            let importance: Vec<f32> = (0..kd)
                .map(|c| {
                    let q: f32 = (0..shape.group())
                        .map(|h| q_mean[(head * shape.group() + h) * kd + c])
                        .sum();
                    q * k_mean[head * kd + c]
                })
                .collect();
            top_channels(&importance, r)
        })
        .collect())
}

/// The fallback when no calibration queries exist: rank channels by the mean
/// `|k_c|` of the prompt's own keys (`[n, kv_heads, key_dim]`).
pub fn channels_from_keys(keys: &[f32], kv_heads: usize, key_dim: usize, r: usize) -> Result<Vec<Vec<u16>>> {
    if keys.len() % (kv_heads * key_dim) != 0 || keys.is_empty() || r > key_dim {
        return Err(shape_err(
            "keys for channel ranking",
            format!("[n, {kv_heads}, {key_dim}], r <= {key_dim}"),
            keys.len(),
        ));
    }
    let k_mean = mean_abs(keys, kv_heads, key_dim);
    Ok(k_mean.chunks_exact(key_dim).map(|m| top_channels(m, r)).collect())
}

/// The default before any calibration, for NeoX-layout RoPE heads: the
/// `r / 2` lowest-frequency rotary pairs (channels `i` and `i + d/2` for the
/// largest `i`). Those channels rotate slowly, so they carry the
/// position-independent part of a key where real models' outlier channels
/// sit. Sorted.
pub fn low_frequency_channels(head_dim: usize, r: usize) -> Vec<u16> {
    let half = head_dim / 2;
    let pairs = (r / 2).min(half);
    let mut channels: Vec<u16> = (half - pairs..half)
        .chain(head_dim - pairs..head_dim)
        .map(|c| c as u16)
        .collect();
    channels.sort_unstable();
    channels
}

/// Mean `|x|` per (head, channel) over rows of `[n, heads, dim]`.
fn mean_abs(x: &[f32], heads: usize, dim: usize) -> Vec<f32> {
    let mut acc = vec![0.0f64; heads * dim];
    let rows = x.len() / (heads * dim);
    for row in x.chunks_exact(heads * dim) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v.abs() as f64;
        }
    }
    acc.into_iter().map(|a| (a / rows as f64) as f32).collect()
}

fn top_channels(importance: &[f32], r: usize) -> Vec<u16> {
    let mut top: Vec<u16> = asynctls_kernels::cpu::topk_indices(importance, r)
        .into_iter()
        .map(|c| c as u16)
        .collect();
    top.sort_unstable();
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_channels_where_both_sides_are_large() {
        let shape = AttnShape::gqa(2, 1, 4);
        // Channel 1 is large in q, channel 2 large in k, channel 3 large in both.
        let q = vec![0.1, 5.0, 0.1, 3.0, 0.1, 5.0, 0.1, 3.0];
        let k = vec![0.1, 0.1, 5.0, 3.0];
        let ch = calibrate_channels(&q, &k, &shape, 1).unwrap();
        assert_eq!(ch, vec![vec![3]]);
        let ch = channels_from_keys(&k, 1, 4, 2).unwrap();
        assert_eq!(ch, vec![vec![2, 3]]);
        assert!(calibrate_channels(&q[..3], &k, &shape, 1).is_err());
        assert_eq!(low_frequency_channels(8, 4), vec![2, 3, 6, 7]);
    }
}
