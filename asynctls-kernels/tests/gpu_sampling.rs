//! The GPU sampler (`CudaOps::sample_rows`) against its CPU twin
//! (`cpu::sampling`) on fresh random logits each run; the seed is printed,
//! and `SAMPLING_TEST_SEED=<n>` repeats a run.
//!
//! The twin is exact by construction (integer weights, our own exp, every
//! float step one IEEE operation on both sides), so every token must match,
//! not 99% of them: a single mismatch is a bug in one of the two. The test
//! also checks what holds whatever the twin says: greedy and top-k 1 rows
//! are the argmax (first index on ties), every sampled token is in the CPU's
//! kept set, and each launch advances every row's step by one.
//! Without a GPU every test prints `skipped: no CUDA device` and passes.

use asynctls_kernels::cpu;
use asynctls_kernels::cpu::sampling::{self, SamplingParams, MAX_SAMPLING_VOCAB};
use asynctls_kernels::cuda::sampling::SamplingRow;
use asynctls_kernels::cuda::CudaOps;
use rand::{rngs::StdRng, Rng, SeedableRng};

const TEMPERATURES: [f32; 3] = [0.5, 1.0, 1.5];
const TOP_KS: [u32; 4] = [0, 1, 20, 1000];
const TOP_PS: [f32; 3] = [1.0, 0.9, 0.5];

fn test_rng(name: &str) -> StdRng {
    let seed = match std::env::var("SAMPLING_TEST_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("SAMPLING_TEST_SEED={s} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    println!("{name}: random seed {seed} (SAMPLING_TEST_SEED={seed} repeats it)");
    StdRng::seed_from_u64(seed)
}

/// A standard normal by Box-Muller (rand's distributions crate is not a dependency).
fn normal(rng: &mut StdRng) -> f32 {
    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let v: f64 = rng.random();
    ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
}

/// Rows of logits shaped like a model's: normal with a per-row spread, a
/// few far-below tokens, and now and then a tie at the top.
fn random_logits(rng: &mut StdRng, rows: usize, vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * vocab);
    for _ in 0..rows {
        let scale = rng.random_range(0.5f32..6.0);
        let shift = rng.random_range(-20.0f32..20.0);
        let start = out.len();
        out.extend((0..vocab).map(|_| shift + scale * normal(rng)));
        let row = &mut out[start..];
        for _ in 0..vocab / 1000 {
            let i = rng.random_range(0..vocab);
            row[i] = shift - 40.0 * scale;
        }
        if vocab > 1 && rng.random_bool(0.25) {
            let top = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let i = rng.random_range(0..vocab);
            row[i] = top;
        }
    }
    out
}

/// Every (temperature, top_k, top_p) of the grid twice, then greedy rows.
fn grid_params(rng: &mut StdRng) -> Vec<SamplingParams> {
    let mut params = Vec::new();
    for _ in 0..2 {
        for &temperature in &TEMPERATURES {
            for &top_k in &TOP_KS {
                for &top_p in &TOP_PS {
                    params.push(SamplingParams {
                        temperature,
                        top_k,
                        top_p,
                        seed: rng.random(),
                    });
                }
            }
        }
    }
    for (i, &temperature) in [0.0f32, -1.0, 0.0, -0.5, 0.0, 0.0, -2.0, 0.0].iter().enumerate() {
        params.push(SamplingParams {
            temperature,
            top_k: TOP_KS[i % TOP_KS.len()],
            top_p: TOP_PS[i % TOP_PS.len()],
            seed: rng.random(),
        });
    }
    params
}

/// Samples on the GPU at `steps`, twice (the second launch at the steps the
/// first advanced to); returns both launches' tokens and checks the steps.
fn sample_twice(
    ops: &CudaOps,
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParams],
    steps: &[u64],
) -> [Vec<u32>; 2] {
    let stream = ops.device().stream().clone();
    let rows = params.len();
    let host_rows: Vec<SamplingRow> = params
        .iter()
        .zip(steps)
        .map(|(p, &s)| SamplingRow::new(p, s).unwrap())
        .collect();
    let d_logits = stream.clone_htod(logits).unwrap();
    let mut d_rows = stream.clone_htod(&host_rows).unwrap();
    let mut got = [Vec::new(), Vec::new()];
    for (launch, tokens) in got.iter_mut().enumerate() {
        let mut out = stream.clone_htod(&vec![u32::MAX; rows]).unwrap();
        ops.sample_rows(&d_logits, rows, vocab, &mut d_rows, &mut out).unwrap();
        *tokens = stream.clone_dtoh(&out).unwrap();
        let after = stream.clone_dtoh(&d_rows).unwrap();
        for (r, (row, &s)) in after.iter().zip(steps).enumerate() {
            let want = s.wrapping_add(launch as u64 + 1);
            assert_eq!(row.step(), want, "row {r}: step after launch {launch}");
            assert_eq!(row.params(), params[r], "row {r}: parameters changed");
        }
    }
    got
}

/// Prints the time of one launch (for the record; nothing is asserted).
fn time_launches(ops: &CudaOps, logits: &[f32], vocab: usize, params: &[SamplingParams]) {
    let stream = ops.device().stream().clone();
    let rows = params.len();
    let host_rows: Vec<SamplingRow> = params.iter().map(|p| SamplingRow::new(p, 0).unwrap()).collect();
    let d_logits = stream.clone_htod(logits).unwrap();
    let mut d_rows = stream.clone_htod(&host_rows).unwrap();
    let mut out = stream.clone_htod(&vec![0u32; rows]).unwrap();
    ops.sample_rows(&d_logits, rows, vocab, &mut d_rows, &mut out).unwrap();
    stream.synchronize().unwrap();
    let reps = 20;
    let start = std::time::Instant::now();
    for _ in 0..reps {
        ops.sample_rows(&d_logits, rows, vocab, &mut d_rows, &mut out).unwrap();
    }
    stream.synchronize().unwrap();
    let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(reps);
    println!("sample_rows: {rows} rows x {vocab} (mixed top-k / top-p): {us:.0} us per launch");
}

/// Compares one launch with the CPU twin row by row; returns the mismatches.
fn compare(what: &str, logits: &[f32], vocab: usize, params: &[SamplingParams], steps: &[u64], got: &[u32]) -> usize {
    let want = sampling::sample_rows(logits, vocab, params, steps).unwrap();
    let mut mismatches = 0;
    for (r, ((row, p), (&g, &w))) in logits
        .chunks_exact(vocab)
        .zip(params)
        .zip(got.iter().zip(&want))
        .enumerate()
    {
        assert!(
            (g as usize) < vocab,
            "{what} row {r}: token {g} outside a vocabulary of {vocab}"
        );
        if p.is_greedy() {
            assert_eq!(g, sampling::greedy_token(row), "{what} row {r}: greedy {p:?}");
        }
        if let Some(kept) = sampling::kept_set(row, p).unwrap() {
            assert!(
                kept.contains(row, g),
                "{what} row {r}: GPU token {g} (logit {}) is outside the CPU's kept set of {} tokens, {p:?}",
                row[g as usize],
                kept.len
            );
        }
        if g != w {
            mismatches += 1;
            println!(
                "{what} row {r}: GPU {g} (logit {}), CPU {w} (logit {}), {p:?} step {}",
                row[g as usize], row[w as usize], steps[r]
            );
        }
    }
    mismatches
}

#[test]
fn sampling_matches_the_cpu_twin() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let mut rng = test_rng("sampling_matches_the_cpu_twin");
    let mut total = 0;
    let mut mismatches = 0;
    for &vocab in &[151_936usize, 1000, MAX_SAMPLING_VOCAB, 33, 1] {
        let mut params = grid_params(&mut rng);
        if vocab == MAX_SAMPLING_VOCAB {
            params.truncate(12);
        }
        let rows = params.len();
        let logits = random_logits(&mut rng, rows, vocab);
        // Steps anywhere in the counter, a few next to the wrap.
        let steps: Vec<u64> = (0..rows)
            .map(|r| match r % 4 {
                0 => r as u64,
                1 => u64::MAX - r as u64 % 2,
                _ => rng.random(),
            })
            .collect();
        let [first, second] = sample_twice(&ops, &logits, vocab, &params, &steps);
        if vocab == 151_936 {
            time_launches(&ops, &logits, vocab, &params);
        }
        let next: Vec<u64> = steps.iter().map(|s| s.wrapping_add(1)).collect();
        mismatches += compare(&format!("vocab {vocab}"), &logits, vocab, &params, &steps, &first);
        mismatches += compare(
            &format!("vocab {vocab}, next step"),
            &logits,
            vocab,
            &params,
            &next,
            &second,
        );
        total += 2 * rows;

        // Top-k 1 and greedy rows are the crate's argmax exactly (these rows
        // hold no NaN or subnormal, where the two argmaxes' rules differ).
        for (r, (row, p)) in logits.chunks_exact(vocab).zip(&params).enumerate() {
            if p.is_greedy() {
                let argmax = cpu::argmax(row).unwrap();
                assert_eq!(first[r], argmax, "vocab {vocab} row {r}: {p:?} is not the argmax");
                assert_eq!(second[r], argmax, "vocab {vocab} row {r}: {p:?} is not the argmax");
            }
        }
    }
    println!("sampling: {} of {total} rows match the CPU twin", total - mismatches);
    assert_eq!(mismatches, 0, "{mismatches} of {total} rows differ from the CPU twin");
}

#[test]
fn sampling_edge_rows_match_the_cpu_twin() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let mut rng = test_rng("sampling_edge_rows_match_the_cpu_twin");
    let vocab = 2048;
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let base = random_logits(&mut rng, 1, vocab);
    let with = |f: &dyn Fn(&mut Vec<f32>)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    rows.push(with(&|r| r.iter_mut().step_by(3).for_each(|v| *v = f32::NAN)));
    rows.push(with(&|r| r.iter_mut().step_by(2).for_each(|v| *v = f32::NEG_INFINITY)));
    rows.push(with(&|r| r[777] = f32::INFINITY));
    rows.push(vec![f32::NEG_INFINITY; vocab]);
    rows.push(vec![f32::NAN; vocab]);
    rows.push(vec![0.25; vocab]);
    rows.push((0..vocab).map(|i| (i % 7) as f32).collect());
    rows.push(with(&|r| r.iter_mut().step_by(5).for_each(|v| *v = -1e-40)));
    rows.push((0..vocab).map(|i| if i % 2 == 0 { 1e-39 } else { 1.5e-38 }).collect());
    rows.push(with(&|r| r.iter_mut().for_each(|v| *v *= 1e30)));
    let shapes = rows.len();
    let mut params = Vec::new();
    let mut logits = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        for (temperature, top_k, top_p) in [
            (1.0f32, 0u32, 1.0f32),
            (0.7, 0, 0.6),
            (1.3, 5, 1.0),
            (1.0, 3, 0.3),
            (2.0e-38, 0, 1.0),
            (1.0e30, 0, 0.99),
            (0.0, 0, 1.0),
        ] {
            params.push(SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: rng.random::<u64>() ^ i as u64,
            });
            logits.extend_from_slice(row);
        }
    }
    let steps: Vec<u64> = (0..params.len()).map(|_| rng.random()).collect();
    let [first, second] = sample_twice(&ops, &logits, vocab, &params, &steps);
    let next: Vec<u64> = steps.iter().map(|s| s.wrapping_add(1)).collect();
    let mut mismatches = compare("edge", &logits, vocab, &params, &steps, &first);
    mismatches += compare("edge, next step", &logits, vocab, &params, &next, &second);
    assert_eq!(
        mismatches,
        0,
        "{mismatches} of {} edge rows ({shapes} shapes) differ",
        2 * params.len()
    );

    // Many draws of one small row: each step's token is the CPU's.
    let small = [0.5f32, 2.0, -1.0, 1.0];
    let draws = 4096;
    let p = SamplingParams {
        temperature: 1.0,
        top_k: 3,
        top_p: 0.95,
        seed: rng.random(),
    };
    let params = vec![p; draws];
    let logits: Vec<f32> = small.iter().cycle().take(draws * small.len()).cloned().collect();
    let steps: Vec<u64> = (0..draws as u64).collect();
    let [first, _] = sample_twice(&ops, &logits, small.len(), &params, &steps);
    assert_eq!(compare("small", &logits, small.len(), &params, &steps, &first), 0);
}

#[test]
fn sample_rows_rejects_bad_shapes() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let stream = ops.device().stream().clone();
    let row = SamplingRow::new(&SamplingParams::greedy(), 0).unwrap();
    let mut params = stream.clone_htod(&vec![row; 2]).unwrap();
    let mut out = stream.clone_htod(&vec![0u32; 2]).unwrap();
    let logits = stream.clone_htod(&vec![0.0f32; 2 * 8]).unwrap();
    assert!(ops.sample_rows(&logits, 2, 8, &mut params, &mut out).is_ok());
    let err = ops.sample_rows(&logits, 2, 7, &mut params, &mut out).unwrap_err();
    assert!(err.to_string().contains("16 logits"), "{err}");
    assert!(ops.sample_rows(&logits, 0, 0, &mut params, &mut out).is_err());
    let big = stream.clone_htod(&vec![0.0f32; MAX_SAMPLING_VOCAB + 1]).unwrap();
    let mut one = stream.clone_htod(&vec![row]).unwrap();
    let mut one_out = stream.clone_htod(&vec![0u32]).unwrap();
    let err = ops
        .sample_rows(&big, 1, MAX_SAMPLING_VOCAB + 1, &mut one, &mut one_out)
        .unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let bad = SamplingParams {
        top_p: 0.0,
        ..SamplingParams::greedy()
    };
    assert!(SamplingRow::new(&bad, 0).is_err());
}
