//! CPU reference implementations over plain f32 slices.
//!
//! These are the single source of truth every CUDA kernel is tested against,
//! and the hot loops of the CPU attention path. They take slices, not
//! tensors, so callers that already hold their data in a cache layout do not
//! copy it into a [`Tensor`](crate::Tensor) first.

mod matmul;
pub mod moe;
mod rope;
pub mod sampling;

pub use matmul::{matmul, matmul_nt};
pub use rope::{RopeStyle, RopeTable};

use crate::error::invalid;
use crate::Result;

/// `sum_i a[i] * b[i]`, written so the compiler vectorizes it (eight
/// independent accumulators break the add dependency chain).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Root-mean-square normalization of each row of `x` (rows of `weight.len()`),
/// in place: `x * weight / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) -> Result<()> {
    let h = weight.len();
    if h == 0 || x.len() % h != 0 {
        return Err(invalid(
            "rms_norm",
            format!(
                "input of {} elements is not a whole number of rows of the weight's {h}",
                x.len()
            ),
        ));
    }
    for row in x.chunks_exact_mut(h) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v *= inv * w;
        }
    }
    Ok(())
}

/// `silu(gate) * up`, elementwise, into `gate`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) -> Result<()> {
    if gate.len() != up.len() {
        return Err(invalid(
            "silu_mul",
            format!("gate has {} elements but up has {}", gate.len(), up.len()),
        ));
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
    Ok(())
}

/// Numerically stable softmax of one row, in place. An empty row is left empty;
/// a row of `-inf` becomes all zeros rather than NaN.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Order used by every selection: larger score first, ties to the lower index,
/// NaN last. Deterministic, so the same scores always select the same set.
#[inline]
fn ranks_before(scores: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    let (sa, sb) = (scores[a as usize], scores[b as usize]);
    match (sa.is_nan(), sb.is_nan()) {
        (true, false) => std::cmp::Ordering::Greater,
        (false, true) => std::cmp::Ordering::Less,
        _ => sb.partial_cmp(&sa).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)),
    }
}

/// Indices of the `k` largest scores, best first (ties to the lower index).
/// `k` larger than the row returns every index. O(n + k log k).
pub fn topk_indices(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| ranks_before(scores, a, b));
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| ranks_before(scores, a, b));
    idx
}

/// Index of the largest value (the first one on ties; NaN never wins unless all are NaN).
pub fn argmax(row: &[f32]) -> Option<u32> {
    topk_indices(row, 1).first().copied()
}

/// Rows of `table` (`[vocab, hidden]`) picked by `ids`, into `out` (`[ids.len(), hidden]`).
pub fn embedding(table: &[f32], hidden: usize, ids: &[u32], out: &mut [f32]) -> Result<()> {
    if hidden == 0 || table.len() % hidden != 0 {
        return Err(invalid(
            "embedding",
            format!("table of {} elements is not rows of {hidden}", table.len()),
        ));
    }
    let vocab = table.len() / hidden;
    if out.len() != ids.len() * hidden {
        return Err(invalid(
            "embedding",
            format!(
                "output has {} elements, expected {} ids x {hidden}",
                out.len(),
                ids.len()
            ),
        ));
    }
    for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
        let id = id as usize;
        if id >= vocab {
            return Err(invalid(
                "embedding",
                format!("token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
    }
    Ok(())
}

/// Element `i` of the uniform stream `seed`, in [-1, 1): splitmix64 of
/// `seed + (i + 1) * golden`, top 24 bits. The GPU's random fill computes
/// the same bits, so random weights are the same on both devices.
pub fn uniform_at(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / 16_777_216.0 * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topk_orders_and_breaks_ties_by_index() {
        let s = [1.0, 3.0, 3.0, -1.0, f32::NAN, 2.0];
        assert_eq!(topk_indices(&s, 3), vec![1, 2, 5]);
        assert_eq!(topk_indices(&s, 10), vec![1, 2, 5, 0, 3, 4]);
        assert_eq!(topk_indices(&s, 0), Vec::<u32>::new());
        assert_eq!(argmax(&s), Some(1));
    }

    #[test]
    fn softmax_handles_all_masked_rows() {
        let mut row = [f32::NEG_INFINITY; 4];
        softmax_in_place(&mut row);
        assert_eq!(row, [0.0; 4]);
    }

    #[test]
    fn embedding_rejects_out_of_vocabulary_ids() {
        let table = vec![0.5f32; 4 * 3];
        let mut out = vec![0.0; 3];
        let err = embedding(&table, 3, &[4], &mut out).unwrap_err().to_string();
        assert!(err.contains("token id 4") && err.contains("vocabulary of 4"), "{err}");
    }

    proptest! {
        #[test]
        fn topk_matches_a_full_sort(scores in prop::collection::vec(-100.0f32..100.0, 0..200), k in 0usize..220) {
            let got = topk_indices(&scores, k);
            let mut all: Vec<u32> = (0..scores.len() as u32).collect();
            all.sort_by(|&a, &b| scores[b as usize].partial_cmp(&scores[a as usize]).unwrap().then(a.cmp(&b)));
            all.truncate(k);
            prop_assert_eq!(got, all);
        }

        #[test]
        fn softmax_sums_to_one(mut row in prop::collection::vec(-50.0f32..50.0, 1..100)) {
            softmax_in_place(&mut row);
            let sum: f32 = row.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-5);
            prop_assert!(row.iter().all(|&p| (0.0..=1.0).contains(&p)));
        }

        #[test]
        fn dot_matches_naive(pairs in prop::collection::vec((-10.0f32..10.0, -10.0f32..10.0), 0..300)) {
            let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b) as f64;
            prop_assert!((got - naive).abs() <= 1e-4 * (1.0 + naive.abs()) + 1e-3);
        }
    }
}
