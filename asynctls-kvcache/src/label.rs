//! INT4 labels: `r` chosen key channels per token and head, quantized with a
//! per-token scale and zero point.
//!
//! The scale and zero point are stored as f16 and rounded in the safe
//! direction (zero down, scale up) so that every channel maps into 0..=15 and
//! the dequantization error stays within half a step: `|x - x^| <= scale / 2`
//! for keys of magnitude below f16's range (65504).

use half::f16;

const F16_LIMIT: f32 = 65504.0;

/// The largest f16 not above `x` (for finite `x` within f16's range).
fn f16_at_most(x: f32) -> f16 {
    let x = x.clamp(-F16_LIMIT, F16_LIMIT);
    let h = f16::from_f32(x);
    if h.to_f32() <= x {
        h
    } else {
        step_down(h)
    }
}

/// The smallest f16 not below `x`.
fn f16_at_least(x: f32) -> f16 {
    -f16_at_most(-x)
}

fn step_down(h: f16) -> f16 {
    let bits = h.to_bits();
    if bits & 0x7fff == 0 {
        f16::from_bits(0x8001) // below +-0: the smallest negative subnormal
    } else if bits & 0x8000 == 0 {
        f16::from_bits(bits - 1)
    } else {
        f16::from_bits(bits + 1)
    }
}

/// Quantizes `x` (the r selected channels of one token) into `packed`
/// (r/2 bytes, low nibble first). Returns `(scale, zero)`.
pub fn quantize(x: &[f32], packed: &mut [u8]) -> (f16, f16) {
    debug_assert_eq!(packed.len() * 2, x.len());
    let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let zero = f16_at_most(lo);
    let step = ((hi.min(F16_LIMIT) - zero.to_f32()) / 15.0).max(f32::MIN_POSITIVE);
    let scale = f16_at_least(step).max(f16::from_bits(1));
    let (z, s) = (zero.to_f32(), scale.to_f32());
    let code = |v: f32| ((v - z) / s).round().clamp(0.0, 15.0) as u8;
    for (byte, pair) in packed.iter_mut().zip(x.chunks_exact(2)) {
        *byte = code(pair[0]) | (code(pair[1]) << 4);
    }
    (scale, zero)
}

/// The code of channel `i` in a packed row.
#[inline]
pub fn code_at(packed: &[u8], i: usize) -> u8 {
    (packed[i / 2] >> ((i % 2) * 4)) & 0x0f
}

/// Dequantizes a packed row into `out`.
pub fn dequantize(packed: &[u8], scale: f16, zero: f16, out: &mut [f32]) {
    let (s, z) = (scale.to_f32(), zero.to_f32());
    for (i, o) in out.iter_mut().enumerate() {
        *o = z + s * code_at(packed, i) as f32;
    }
}

/// `sum_i q[i] * x^[i]` without materializing x^: `zero * sum(q) + scale * sum(q[i] * code[i])`.
/// `q_sum` is `sum(q)`, computed once per query.
#[inline]
pub fn dot_dequantized(packed: &[u8], scale: f16, zero: f16, q: &[f32], q_sum: f32) -> f32 {
    let mut acc = 0.0f32;
    for (pair, &byte) in q.chunks_exact(2).zip(packed) {
        acc += pair[0] * (byte & 0x0f) as f32 + pair[1] * (byte >> 4) as f32;
    }
    zero.to_f32() * q_sum + scale.to_f32() * acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn error_within_half_a_step(x in prop::collection::vec(-1000.0f32..1000.0, 2..=64).prop_filter("even", |v| v.len() % 2 == 0)) {
            let mut packed = vec![0u8; x.len() / 2];
            let (scale, zero) = quantize(&x, &mut packed);
            let mut back = vec![0.0; x.len()];
            dequantize(&packed, scale, zero, &mut back);
            let s = scale.to_f32();
            let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            // The step is at most a hair above (max - min) / 15.
            prop_assert!(s <= (hi - lo) / 15.0 * 1.01 + 0.01 * (1.0 + lo.abs()) / 15.0 + 1e-6, "scale {s} for range {lo}..{hi}");
            for (v, b) in x.iter().zip(&back) {
                prop_assert!((v - b).abs() <= s / 2.0 * (1.0 + 1e-5) + 1e-6 * v.abs(), "{v} -> {b}, scale {s}");
            }
            let q: Vec<f32> = (0..x.len()).map(|i| (i as f32 * 0.7).sin()).collect();
            let want: f32 = q.iter().zip(&back).map(|(a, b)| a * b).sum();
            let got = dot_dequantized(&packed, scale, zero, &q, q.iter().sum());
            prop_assert!((want - got).abs() <= 1e-3 * (1.0 + want.abs()));
        }
    }

    #[test]
    fn constant_rows_are_exact_enough() {
        let x = [0.3f32; 8];
        let mut packed = [0u8; 4];
        let (scale, zero) = quantize(&x, &mut packed);
        let mut back = [0.0; 8];
        dequantize(&packed, scale, zero, &mut back);
        for b in back {
            assert!((b - 0.3).abs() <= scale.to_f32() / 2.0 + 1e-7);
        }
    }

    #[test]
    fn directed_rounding() {
        for x in [0.1f32, -0.1, 3.3e-5, -7.7, 0.0, 65504.0, -65504.0, 1e-9, -1e-9] {
            assert!(f16_at_most(x).to_f32() <= x, "{x}");
            assert!(f16_at_least(x).to_f32() >= x, "{x}");
        }
    }
}
