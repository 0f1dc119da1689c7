//! CUDA kernels against their CPU twins on fresh random inputs, outputs
//! poisoned with NaN before each launch. f32 ops: relative error <= 1e-4.
//! Without a GPU every test prints `skipped: no CUDA device` and passes.

use asynctls_kernels::cpu::{self, RopeStyle, RopeTable};
use asynctls_kernels::cuda::CudaOps;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn gpu() -> Option<CudaOps> {
    CudaOps::for_tests()
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    let diff = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    assert!(diff / norm <= rel, "{what}: relative error {} > {rel}", diff / norm);
}

#[test]
fn elementwise_ops_match_cpu() {
    let Some(ops) = gpu() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    for &(rows, h) in &[(1usize, 64usize), (7, 576), (33, 4096)] {
        let x = random(&mut rng, rows * h, 3.0);
        let w = random(&mut rng, h, 1.5);
        let mut want = x.clone();
        cpu::rms_norm(&mut want, &w, 1e-6).unwrap();
        let mut dx = stream.clone_htod(&x).unwrap();
        let dw = stream.clone_htod(&w).unwrap();
        ops.rms_norm(&mut dx, &dw, rows, 1e-6).unwrap();
        assert_close(&stream.clone_dtoh(&dx).unwrap(), &want, 1e-4, "rms_norm");

        let g = random(&mut rng, rows * h, 6.0);
        let u = random(&mut rng, rows * h, 2.0);
        let mut want = g.clone();
        cpu::silu_mul(&mut want, &u).unwrap();
        let mut dg = stream.clone_htod(&g).unwrap();
        let du = stream.clone_htod(&u).unwrap();
        ops.silu_mul(&mut dg, &du).unwrap();
        assert_close(&stream.clone_dtoh(&dg).unwrap(), &want, 1e-4, "silu_mul");

        let s = random(&mut rng, rows * h, 10.0);
        let mut want = s.clone();
        want.chunks_exact_mut(h).for_each(cpu::softmax_in_place);
        let mut ds = stream.clone_htod(&s).unwrap();
        ops.softmax_rows(&mut ds, rows, h).unwrap();
        assert_close(&stream.clone_dtoh(&ds).unwrap(), &want, 1e-4, "softmax");

        let want: Vec<u32> = s.chunks_exact(h).map(|r| cpu::argmax(r).unwrap()).collect();
        let mut out = stream.clone_htod(&vec![u32::MAX; rows]).unwrap();
        ops.argmax_rows(&stream.clone_htod(&s).unwrap(), rows, h, &mut out)
            .unwrap();
        assert_eq!(stream.clone_dtoh(&out).unwrap(), want, "argmax");
    }
}

#[test]
fn rope_and_embedding_match_cpu() {
    let Some(ops) = gpu() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    for &(tokens, heads, d) in &[(5usize, 4usize, 64usize), (17, 32, 128)] {
        let max_pos = 4096;
        let table = RopeTable::new(d, 1e6, max_pos).unwrap();
        let positions: Vec<usize> = (0..tokens).map(|_| rng.random_range(0..max_pos)).collect();
        let x = random(&mut rng, tokens * heads * d, 2.0);
        // The CPU table's cos/sin, read back by rotating unit vectors.
        let half = d / 2;
        let (mut cos, mut sin) = (vec![0.0f32; max_pos * half], vec![0.0f32; max_pos * half]);
        for p in 0..max_pos {
            let mut probe = vec![0.0f32; d];
            probe[..half].fill(1.0);
            table.apply(&mut probe, d, &[p], RopeStyle::Neox).unwrap();
            cos[p * half..(p + 1) * half].copy_from_slice(&probe[..half]);
            sin[p * half..(p + 1) * half].copy_from_slice(&probe[half..]);
        }
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let mut want = x.clone();
            table.apply(&mut want, d, &positions, style).unwrap();
            let mut dx = stream.clone_htod(&x).unwrap();
            ops.rope(
                &mut dx,
                &stream.clone_htod(&cos).unwrap(),
                &stream.clone_htod(&sin).unwrap(),
                &stream.clone_htod(&pos).unwrap(),
                heads,
                d,
                d,
                style,
            )
            .unwrap();
            assert_close(
                &stream.clone_dtoh(&dx).unwrap(),
                &want,
                1e-4,
                &format!("rope {style:?}"),
            );
        }
    }
    let (vocab, h) = (1000usize, 96usize);
    let table = random(&mut rng, vocab * h, 1.0);
    let ids: Vec<u32> = (0..13).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut want = vec![0.0; ids.len() * h];
    cpu::embedding(&table, h, &ids, &mut want).unwrap();
    let mut out = stream.clone_htod(&vec![f32::NAN; ids.len() * h]).unwrap();
    // SAFETY: the ids were drawn below the vocabulary.
    unsafe {
        ops.embedding(
            &stream.clone_htod(&table).unwrap(),
            h,
            &stream.clone_htod(&ids).unwrap(),
            &mut out,
        )
    }
    .unwrap();
    assert_eq!(stream.clone_dtoh(&out).unwrap(), want, "embedding");
}

#[test]
fn cublas_bf16_matmul_matches_cpu() {
    let Some(ops) = gpu() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    for &(m, k, n) in &[(1usize, 64usize, 96usize), (7, 576, 2048), (33, 4096, 1024)] {
        let a: Vec<half::bf16> = random(&mut rng, m * k, 1.0)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect();
        let b: Vec<half::bf16> = random(&mut rng, n * k, 1.0)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect();
        let (af, bf): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|v| v.to_f32()).collect(),
            b.iter().map(|v| v.to_f32()).collect(),
        );
        let mut want = vec![0.0f32; m * n];
        cpu::matmul_nt(&af, &bf, &mut want, m, k, n).unwrap();
        let mut c = stream.clone_htod(&vec![half::bf16::NAN; m * n]).unwrap();
        ops.matmul_nt_bf16(
            &stream.clone_htod(&a).unwrap(),
            &stream.clone_htod(&b).unwrap(),
            &mut c,
            m,
            k,
            n,
        )
        .unwrap();
        let got: Vec<f32> = stream.clone_dtoh(&c).unwrap().iter().map(|v| v.to_f32()).collect();
        assert_close(&got, &want, 1e-2, "cublas bf16 matmul_nt");
    }
}
