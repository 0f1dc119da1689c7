//! Sampling the next token from one row of logits: greedy, or temperature
//! with top-k and top-p, seeded and deterministic. This is the CPU twin of
//! `cuda/sampling.cu` ([`CudaOps::sample_rows`](crate::cuda::CudaOps::sample_rows)),
//! and the two are exact: the same logits, parameters, seed and step give
//! the same token on both, not only up to float rounding.
//!
//! Owns the contract of sampling; the GPU kernel implements the same steps
//! with a radix select where this file sorts.
//!
//! # The contract
//!
//! For a row `l` of `vocab` logits (`1 ..= MAX_SAMPLING_VOCAB`):
//!
//! 1. **Canonical logits.** Subnormals and -0 become +0 (the GPU flushes
//!    them, so the CPU does too); NaN stays NaN.
//! 2. **Greedy** ([`SamplingParams::is_greedy`]: temperature `<= 0` or
//!    subnormal, or `top_k == 1`), or a row whose largest logit is not
//!    finite: the token is the argmax, NaN counting as -inf and ties to the
//!    first index ([`greedy_token`]).
//! 3. **Weights.** With `m` the largest logit and `T` the temperature,
//!    `w_i = floor(exp(x_i) * 2^40)` as an integer, with
//!    `x_i = (l_i - m) * (1 / T)` and `exp` our own polynomial ([`weight`]);
//!    `w_i = 0` below `exp(-27)` and for NaN.
//!    Integer weights make every sum exact, so a GPU reduction in any order
//!    gives the CPU's sum; the largest logit has weight `2^40`, and a token
//!    whose probability is below about 1e-12 of the top token's is dropped.
//! 4. **Order.** Every token has a unique [`sort_key`]: its logit's order
//!    bits above `2^18 - 1 - index`, so larger logits rank first and equal
//!    logits rank by lower index. Kept sets are `{i : key_i >= threshold}`.
//! 5. **Top-k** (`0 < top_k < vocab`): the `top_k` best-ranked tokens
//!    (exactly `top_k`: ties at the boundary go to the lower index).
//! 6. **Top-p** (`top_p < 1`), applied to the top-k set as in Hugging Face
//!    and vLLM (top-k first, top-p over what it kept): with `M_k` the set's
//!    mass and `q = floor(top_p * 2^24)`, the shortest best-ranked prefix
//!    whose mass is at least `max(1, ceil(M_k * q / 2^24))`. It always holds
//!    the argmax.
//! 7. **Draw.** `r = draw(seed, step)` (64 uniform bits from splitmix64),
//!    `target = (M * r) >> 64` with `M` the kept mass, and the token is the
//!    first index in vocabulary order whose inclusive prefix sum of kept
//!    weights exceeds `target`; each kept token is drawn with probability
//!    `w_i / M`.
//!
//! The draw depends on `(seed, step)` only, not on the row's position in the
//! batch: a request samples the same tokens whichever slot it runs in. Two
//! rows that must differ (n > 1 samples of one prompt) take different seeds.

use crate::error::invalid;
use crate::Result;

/// The largest vocabulary the sampler takes: token indices fill 18 bits of
/// the sort key.
pub const MAX_SAMPLING_VOCAB: usize = 1 << INDEX_BITS;

const INDEX_BITS: u32 = 18;
/// Below this exponent a token's weight is 0 (`exp(-27) * 2^40` is about
/// 2.07, so every token at or above it has a weight of at least 2).
const MIN_EXPONENT: f32 = -27.0;
/// `2^40`: the weight of the largest logit.
const WEIGHT_SCALE: f32 = 1_099_511_627_776.0;
/// `top_p` in 24-bit fixed point; this value means "off".
const TOP_P_ONE: u64 = 1 << 24;

/// The knobs of one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// `<= 0` (or subnormal) is greedy; NaN and infinities are rejected.
    pub temperature: f32,
    /// Keep the `top_k` best tokens; 0 is off, 1 is greedy.
    pub top_k: u32,
    /// Nucleus mass in `(0, 1]`; 1 is off.
    pub top_p: f32,
    /// The row's random stream; with the step it fixes the draw.
    pub seed: u64,
}

impl SamplingParams {
    /// Argmax decoding.
    pub const fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Rejects a NaN or infinite temperature and `top_p` outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() {
            return Err(invalid(
                "sample",
                format!("temperature {} is not finite (use 0 for greedy)", self.temperature),
            ));
        }
        if self.top_p.is_nan() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(invalid(
                "sample",
                format!("top_p {} is outside (0, 1] (use 1 for off)", self.top_p),
            ));
        }
        Ok(())
    }

    /// Whether the row takes the argmax without drawing. Subnormal
    /// temperatures count as 0: the GPU flushes them, and dividing by one
    /// leaves only the argmax with a weight anyway.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature < f32::MIN_POSITIVE || self.top_k == 1
    }

    /// `top_p` in 24-bit fixed point (`TOP_P_ONE` and above: off).
    fn top_p_fixed(&self) -> u64 {
        let scaled = self.top_p * TOP_P_ONE as f32;
        if scaled >= TOP_P_ONE as f32 {
            TOP_P_ONE
        } else {
            // Truncation, as the GPU's cvt.rzi (NaN and negatives give 0).
            scaled as u64
        }
    }
}

/// Subnormals and -0 to +0; NaN passes.
#[inline]
fn flush(v: f32) -> f32 {
    if v.abs() < f32::MIN_POSITIVE {
        0.0
    } else {
        v
    }
}

/// The logit the sampler sees: subnormals and -0 as +0 (step 1 of the contract).
#[inline]
pub fn canonical(logit: f32) -> f32 {
    flush(logit)
}

/// The unique rank of token `index` (larger is better): order-preserving
/// bits of the canonical logit (NaN lowest) above `2^18 - 1 - index`.
#[inline]
pub fn sort_key(logit: f32, index: usize) -> u64 {
    debug_assert!(index < MAX_SAMPLING_VOCAB);
    let c = canonical(logit);
    let ordered = if c.is_nan() {
        0
    } else {
        let u = c.to_bits();
        if u & 0x8000_0000 != 0 {
            !u
        } else {
            u | 0x8000_0000
        }
    };
    (u64::from(ordered) << INDEX_BITS) | (MAX_SAMPLING_VOCAB - 1 - index) as u64
}

/// `exp(x)` for `x` in `[-27, 0]`: Cephes `expf` (ln 2 in two parts, a
/// degree-5 polynomial), one rounded f32 operation per step and no fused
/// multiply-add, exactly as the kernel writes it with `__fmul_rn` and
/// `__fadd_rn`. Rust never contracts `a * b + c`, so the two agree bit for bit.
#[inline]
fn exp_det(x: f32) -> f32 {
    // The kernel's constants by their bits, so both sides hold the same
    // values whatever the decimal parsers do (the PTX shows them in hex).
    const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 1.44269504
    const C1: f32 = f32::from_bits(0x3f31_8000); // 0.693359375
    const C2: f32 = f32::from_bits(0xb95e_8083); // -2.12194440e-4
    const P: [f32; 6] = [
        f32::from_bits(0x3950_6967), // 1.9875691500e-4
        f32::from_bits(0x3ab7_43ce), // 1.3981999507e-3
        f32::from_bits(0x3c08_8908), // 8.3334519073e-3
        f32::from_bits(0x3d2a_a9c1), // 4.1665795894e-2
        f32::from_bits(0x3e2a_aaaa), // 1.6666665459e-1
        0.5,                         // 5.0000001201e-1 as an f32
    ];
    let kf = (x * LOG2E).round_ties_even();
    let mut r = x - kf * C1;
    r -= kf * C2;
    let z = r * r;
    let mut y = P[0];
    for &c in &P[1..] {
        y = y * r + c;
    }
    y = (y * z + r) + 1.0;
    let k = kf as i32;
    y * f32::from_bits(((k + 127) as u32) << 23)
}

/// The integer weight of `logit` at temperature `temperature` (normal and
/// positive) against the row's largest logit `max` (canonical and finite):
/// `floor(exp(x) * 2^40)` with `x = (l - max) * (1 / T)` (a product, not a
/// quotient: the kernel computes `1 / T` once per row), or 0 below
/// `exp(-27)` and for NaN.
#[inline]
pub fn weight(logit: f32, max: f32, temperature: f32) -> u64 {
    let x = exponent(canonical(logit), max, flush(1.0 / temperature));
    if x.is_nan() || x < MIN_EXPONENT {
        return 0;
    }
    (exp_det(x) * WEIGHT_SCALE) as u64
}

/// `x` of a canonical logit, each step flushed as on the GPU.
#[inline]
fn exponent(c: f32, max: f32, inv_temperature: f32) -> f32 {
    flush(flush(c - max) * inv_temperature)
}

#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 64 uniform bits of `(seed, step)`: output `step` of a splitmix64
/// stream that starts at the hashed seed (hashing keeps nearby seeds apart).
#[inline]
pub fn draw(seed: u64, step: u64) -> u64 {
    mix64(mix64(seed).wrapping_add(step.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// The argmax the sampler uses: canonical logits, NaN as -inf, the first
/// index on ties (so an all-NaN row gives 0). `logits` must not be empty.
pub fn greedy_token(logits: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0usize);
    for (i, &l) in logits.iter().enumerate() {
        let c = canonical(l);
        let v = if c.is_nan() { f32::NEG_INFINITY } else { c };
        if i == 0 || v > best.0 {
            best = (v, i);
        }
    }
    best.1 as u32
}

/// The tokens a non-greedy row may draw: `{i : sort_key(l_i, i) >= threshold}`
/// (only those of positive weight are ever drawn), with their mass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeptSet {
    /// The lowest kept [`sort_key`].
    pub threshold: u64,
    /// The sum of the kept weights (`M` of the draw).
    pub mass: u64,
    /// The kept tokens of positive weight.
    pub len: usize,
    /// The row's largest logit (canonical).
    pub max: f32,
    pub temperature: f32,
}

impl KeptSet {
    /// Whether `token` of `logits` is kept and has a positive weight.
    pub fn contains(&self, logits: &[f32], token: u32) -> bool {
        let i = token as usize;
        i < logits.len()
            && sort_key(logits[i], i) >= self.threshold
            && weight(logits[i], self.max, self.temperature) > 0
    }

    /// The weight of token `i` in the draw (0 when not kept).
    pub fn weight_of(&self, logits: &[f32], i: usize) -> u64 {
        if sort_key(logits[i], i) >= self.threshold {
            weight(logits[i], self.max, self.temperature)
        } else {
            0
        }
    }
}

fn check_row(logits: &[f32], params: &SamplingParams) -> Result<()> {
    params.validate()?;
    if logits.is_empty() || logits.len() > MAX_SAMPLING_VOCAB {
        return Err(invalid(
            "sample",
            format!(
                "a row of {} logits (the sampler takes 1 to {MAX_SAMPLING_VOCAB})",
                logits.len()
            ),
        ));
    }
    Ok(())
}

/// The kept set of a row after temperature, top-k and top-p (steps 3 to 6
/// of the contract), or `None` when the row is greedy.
pub fn kept_set(logits: &[f32], params: &SamplingParams) -> Result<Option<KeptSet>> {
    check_row(logits, params)?;
    if params.is_greedy() {
        return Ok(None);
    }
    let max = canonical(logits[greedy_token(logits) as usize]);
    if !max.is_finite() {
        return Ok(None);
    }
    let t = params.temperature;
    let mut items: Vec<(u64, u64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (sort_key(l, i), weight(l, max, t)))
        .collect();
    let mut threshold = 0;
    let k = params.top_k as usize;
    if k > 0 && k < items.len() {
        items.select_nth_unstable_by(k - 1, |a, b| b.0.cmp(&a.0));
        threshold = items[k - 1].0;
        items.truncate(k);
    }
    items.retain(|&(_, w)| w > 0);
    let total: u64 = items.iter().map(|&(_, w)| w).sum();
    let q = params.top_p_fixed();
    if q >= TOP_P_ONE {
        return Ok(Some(KeptSet {
            threshold,
            mass: total,
            len: items.len(),
            max,
            temperature: t,
        }));
    }
    let need = ((u128::from(total) * u128::from(q)).div_ceil(u128::from(TOP_P_ONE)) as u64).max(1);
    items.sort_unstable_by_key(|&(key, _)| std::cmp::Reverse(key));
    let mut mass = 0u64;
    for (j, &(key, w)) in items.iter().enumerate() {
        mass += w;
        if mass >= need {
            return Ok(Some(KeptSet {
                threshold: key,
                mass,
                len: j + 1,
                max,
                temperature: t,
            }));
        }
    }
    // need <= total, and the loop reaches total.
    Err(invalid("sample", "top-p found no prefix reaching its mass (a bug)"))
}

/// The token of one row (`logits` of `1 ..= MAX_SAMPLING_VOCAB`) at draw
/// `step` of the row's seed.
pub fn sample_row(logits: &[f32], params: &SamplingParams, step: u64) -> Result<u32> {
    let Some(kept) = kept_set(logits, params)? else {
        return Ok(greedy_token(logits));
    };
    let target = ((u128::from(kept.mass) * u128::from(draw(params.seed, step))) >> 64) as u64;
    let mut prefix = 0u64;
    for i in 0..logits.len() {
        prefix += kept.weight_of(logits, i);
        if prefix > target {
            return Ok(i as u32);
        }
    }
    // target < mass, and the loop reaches mass.
    Err(invalid("sample", "the draw fell past the kept mass (a bug)"))
}

/// One token per row of `logits` (`[params.len(), vocab]`), row `r` at
/// `steps[r]`: what [`CudaOps::sample_rows`](crate::cuda::CudaOps::sample_rows)
/// computes (which then advances each row's step by one).
pub fn sample_rows(logits: &[f32], vocab: usize, params: &[SamplingParams], steps: &[u64]) -> Result<Vec<u32>> {
    if vocab == 0 || logits.len() != params.len() * vocab || steps.len() != params.len() {
        return Err(invalid(
            "sample",
            format!(
                "{} logits, {} parameter rows and {} steps for rows of {vocab}",
                logits.len(),
                params.len(),
                steps.len()
            ),
        ));
    }
    logits
        .chunks_exact(vocab)
        .zip(params.iter().zip(steps))
        .map(|(row, (p, &step))| sample_row(row, p, step))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    /// The probabilities the contract promises, in f64: softmax at `t`,
    /// top-k by (logit, lower index), top-p over the top-k set, renormalised.
    fn expected(logits: &[f64], t: f64, top_k: usize, top_p: f64) -> Vec<f64> {
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = logits.iter().map(|l| ((l - m) / t).exp()).collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
        let k = if top_k == 0 {
            logits.len()
        } else {
            top_k.min(logits.len())
        };
        order.truncate(k);
        let mk: f64 = order.iter().map(|&i| p[i]).sum();
        let mut kept = Vec::new();
        let mut acc = 0.0;
        for &i in &order {
            kept.push(i);
            acc += p[i];
            if acc >= top_p * mk {
                break;
            }
        }
        let mass: f64 = kept.iter().map(|&i| p[i]).sum();
        let mut out = vec![0.0; logits.len()];
        for &i in &kept {
            out[i] = p[i] / mass;
        }
        out
    }

    #[test]
    fn frequencies_follow_the_filtered_softmax() {
        let logits = [0.5f32, 2.0, -1.0, 1.0];
        let l64: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
        let draws = 20_000u64;
        for &(t, k, p) in &[
            (1.0f32, 0u32, 1.0f32),
            (0.5, 0, 1.0),
            (1.5, 0, 1.0),
            (1.0, 3, 1.0),
            (1.0, 2, 1.0),
            (1.0, 0, 0.8),
            (1.0, 0, 0.95),
            (1.5, 3, 0.9),
        ] {
            let sp = params(t, k, p, 0x5eed_0000 + u64::from(k));
            let want = expected(&l64, f64::from(t), k as usize, f64::from(p));
            let mut counts = [0u64; 4];
            for step in 0..draws {
                counts[sample_row(&logits, &sp, step).unwrap() as usize] += 1;
            }
            for (i, (&c, &w)) in counts.iter().zip(&want).enumerate() {
                let f = c as f64 / draws as f64;
                assert!(
                    (f - w).abs() <= 0.02,
                    "T {t} top_k {k} top_p {p}: token {i} drawn {f:.4}, softmax says {w:.4} ({counts:?})"
                );
                if w == 0.0 {
                    assert_eq!(
                        c, 0,
                        "T {t} top_k {k} top_p {p}: token {i} is filtered out but was drawn"
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_seed_and_step_give_the_same_token() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let sp = params(1.0, 0, 1.0, 42);
        let first: Vec<u32> = (0..200).map(|s| sample_row(&logits, &sp, s).unwrap()).collect();
        let again: Vec<u32> = (0..200).map(|s| sample_row(&logits, &sp, s).unwrap()).collect();
        assert_eq!(first, again);
        // The steps do move the draw, and so does the seed.
        let distinct = first.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct > 50, "{distinct} distinct tokens over 200 steps");
        let other: Vec<u32> = (0..200)
            .map(|s| sample_row(&logits, &params(1.0, 0, 1.0, 43), s).unwrap())
            .collect();
        assert_ne!(first, other);
    }

    #[test]
    fn exp_matches_the_library_within_two_ulps() {
        let mut x = -27.0f32;
        while x <= 0.0 {
            let got = exp_det(x);
            let want = f64::from(x).exp();
            let rel = ((f64::from(got) - want) / want).abs();
            assert!(rel <= 2.5e-7, "exp({x}) = {got}, want {want} (rel {rel:e})");
            x += 0.000_731;
        }
        assert_eq!(exp_det(0.0), 1.0);
        assert_eq!(weight(3.0, 3.0, 0.7), 1 << 40);
        assert!(weight(-24.0, 3.0, 1.0) >= 2);
        assert_eq!(weight(-24.5, 3.0, 1.0), 0);
        assert_eq!(weight(f32::NAN, 3.0, 1.0), 0);
        assert_eq!(weight(f32::NEG_INFINITY, 3.0, 1.0), 0);
    }

    #[test]
    fn greedy_rows_take_the_first_argmax() {
        let logits = [1.0f32, 3.0, f32::NAN, 3.0, -2.0];
        for sp in [
            SamplingParams::greedy(),
            params(-1.0, 0, 1.0, 9),
            params(1e-40, 0, 1.0, 9),
            params(1.0, 1, 0.5, 9),
        ] {
            assert!(sp.is_greedy());
            assert_eq!(kept_set(&logits, &sp).unwrap(), None);
            for step in 0..20 {
                assert_eq!(sample_row(&logits, &sp, step).unwrap(), 1);
            }
        }
        assert_eq!(greedy_token(&[f32::NAN; 3]), 0);
        assert_eq!(greedy_token(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(greedy_token(&[-0.0, 0.0, 1e-40]), 0);
        assert_eq!(greedy_token(&[f32::NAN, 2.0, f32::INFINITY, f32::INFINITY]), 2);
        // A non-finite max leaves weights undefined: the row is greedy.
        let inf_row = [1.0f32, f32::INFINITY, 2.0];
        assert_eq!(kept_set(&inf_row, &params(1.0, 0, 1.0, 1)).unwrap(), None);
        assert_eq!(sample_row(&inf_row, &params(1.0, 0, 1.0, 1), 0).unwrap(), 1);
    }

    #[test]
    fn top_k_keeps_exactly_k_with_ties_to_the_lower_index() {
        let logits = [1.0f32; 10];
        let kept = kept_set(&logits, &params(1.0, 3, 1.0, 0)).unwrap().unwrap();
        assert_eq!(kept.len, 3);
        assert_eq!(kept.mass, 3 << 40);
        let members: Vec<u32> = (0..10).filter(|&i| kept.contains(&logits, i)).collect();
        assert_eq!(members, [0, 1, 2]);
        // top_k at or above the vocabulary is off.
        let all = kept_set(&logits, &params(1.0, 10, 1.0, 0)).unwrap().unwrap();
        assert_eq!((all.len, all.threshold), (10, 0));
    }

    #[test]
    fn top_p_keeps_the_shortest_prefix_and_always_the_argmax() {
        // Weights 2^40 * {1, e^-1, e^-2, e^-3}: masses 0.644, 0.881, 0.968, 1.
        let logits = [-1.0f32, 2.0, 0.0, 1.0];
        let members = |p: f32| -> Vec<u32> {
            let kept = kept_set(&logits, &params(1.0, 0, p, 0)).unwrap().unwrap();
            (0..4).filter(|&i| kept.contains(&logits, i)).collect()
        };
        assert_eq!(members(0.5), [1]);
        assert_eq!(members(0.7), [1, 3]);
        assert_eq!(members(0.9), [1, 2, 3]);
        assert_eq!(members(1.0), [0, 1, 2, 3]);
        assert_eq!(members(1e-9), [1]);
        // Top-p is over the top-k set: with top_k 2 the mass is 1 + e^-1,
        // of which the argmax alone is 0.731.
        let kept = kept_set(&logits, &params(1.0, 2, 0.75, 0)).unwrap().unwrap();
        assert_eq!(kept.len, 2);
        let kept = kept_set(&logits, &params(1.0, 2, 0.7, 0)).unwrap().unwrap();
        assert_eq!(kept.len, 1);
    }

    #[test]
    fn invalid_parameters_and_rows_are_errors() {
        let row = [0.0f32; 4];
        for (sp, what) in [
            (params(f32::NAN, 0, 1.0, 0), "temperature NaN"),
            (params(f32::INFINITY, 0, 1.0, 0), "temperature inf"),
            (params(1.0, 0, 0.0, 0), "top_p 0"),
            (params(1.0, 0, 1.5, 0), "top_p 1.5"),
            (params(1.0, 0, f32::NAN, 0), "top_p NaN"),
            (params(0.0, 0, -0.5, 0), "top_p negative, even when greedy"),
        ] {
            let err = sample_row(&row, &sp, 0).unwrap_err().to_string();
            assert!(err.starts_with("sample:"), "{what}: {err}");
        }
        assert!(sample_row(&[], &SamplingParams::greedy(), 0).is_err());
        let big = vec![0.0f32; MAX_SAMPLING_VOCAB + 1];
        assert!(sample_row(&big, &SamplingParams::greedy(), 0).is_err());
        let err = sample_rows(&[0.0; 6], 4, &[SamplingParams::greedy(); 2], &[0, 0]).unwrap_err();
        assert!(err.to_string().contains("6 logits"), "{err}");
    }

    #[test]
    fn sort_keys_rank_logits_then_lower_index() {
        assert!(sort_key(1.0, 5) > sort_key(0.5, 0));
        assert!(sort_key(1.0, 0) > sort_key(1.0, 1));
        assert!(sort_key(-1.0, 0) > sort_key(-2.0, 0));
        assert!(sort_key(f32::NEG_INFINITY, 0) > sort_key(f32::NAN, 0));
        // -0 and subnormals are +0.
        assert_eq!(sort_key(-0.0, 3), sort_key(0.0, 3));
        assert_eq!(sort_key(-1e-40, 3), sort_key(0.0, 3));
        assert!(sort_key(f32::MIN_POSITIVE, 3) > sort_key(0.0, 0));
    }
}
