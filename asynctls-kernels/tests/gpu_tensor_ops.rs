//! The tensor ops of a model forward (`ops::*`) on the GPU against the same
//! ops on CPU tensors, on fresh random inputs (seed printed). f32 ops:
//! relative L2 error <= 1e-5; ops that round to bf16 on the GPU (casts, the
//! linear layer's GEMM inputs, bf16 tables) are compared with the CPU fed the
//! same bf16-rounded values: <= 1e-5 for exact widenings, <= 2e-3 for GEMMs
//! (f32 accumulation in another order). Without a GPU every test prints
//! `skipped: no CUDA device` and passes.

mod common;

use asynctls_kernels::cpu::{RopeStyle, RopeTable};
use asynctls_kernels::ops::{self, Rope};
use asynctls_kernels::{DType, Device, Tensor};
use common::{bf16_rounded, gpu, random, rng};
use half::bf16;
use rand::Rng;

fn assert_close(got: &Tensor, want: &Tensor, rel: f32, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let (g, w) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    assert!(g.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let norm = w.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    let diff = g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
    println!("{what}: rel err {:.2e}", diff / norm);
    assert!(diff / norm <= rel, "{what}: relative error {} > {rel}", diff / norm);
}

#[test]
fn elementwise_tensor_ops_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = rng();
    // Widths of 16-byte rows (the vector loads) and not (1001: scalar loads).
    for &(rows, h) in &[(1usize, 64usize), (7, 896), (33, 4096), (3, 1001)] {
        let x = random(&mut rng, &[rows, h], 3.0);
        let y = random(&mut rng, &[rows, h], 2.0);
        let w = random(&mut rng, &[h], 1.5);
        let (gx, gy, gw) = (
            x.to_device(&dev).unwrap(),
            y.to_device(&dev).unwrap(),
            w.to_device(&dev).unwrap(),
        );

        let want = ops::rms_norm(&x, &w, 1e-6).unwrap();
        assert_close(&ops::rms_norm(&gx, &gw, 1e-6).unwrap(), &want, 1e-5, "rms_norm");
        assert_close(&ops::add(&gx, &gy).unwrap(), &ops::add(&x, &y).unwrap(), 1e-6, "add");
        assert_close(
            &ops::silu_mul(&gx, &gy).unwrap(),
            &ops::silu_mul(&x, &y).unwrap(),
            1e-5,
            "silu_mul",
        );
        let mut gb = ops::copy(&gx).unwrap();
        ops::bias_add_(&mut gb, &gw).unwrap();
        let mut cb = x.clone();
        ops::bias_add_(&mut cb, &w).unwrap();
        assert_close(&gb, &cb, 1e-6, "bias_add");

        // Casts: f32 -> bf16 rounds to nearest even on both sides, exactly.
        let g16 = ops::cast(&gx, DType::BF16).unwrap();
        assert_eq!(
            g16.to_vec::<bf16>().unwrap(),
            x.to_dtype(DType::BF16).unwrap().to_vec::<bf16>().unwrap()
        );
        assert_close(
            &ops::cast(&g16, DType::F32).unwrap(),
            &bf16_rounded(&x),
            0.0,
            "cast bf16 -> f32",
        );

        // Argmax over views: the last rows of a larger buffer.
        let view = gx.narrow_rows(rows / 2, rows - rows / 2).unwrap();
        let want = ops::argmax(&x.narrow_rows(rows / 2, rows - rows / 2).unwrap()).unwrap();
        assert_eq!(
            ops::argmax(&view).unwrap().to_vec::<u32>().unwrap(),
            want.to_vec::<u32>().unwrap()
        );
    }
    // Vocabulary-long rows (the two-pass argmax), with planted ties of the
    // row's maximum (the lower index wins), NaN and -inf, and a row of NaN.
    for vocab in [154_880usize, 151_936, 2049, 7] {
        let rows = 5;
        let mut v = random(&mut rng, &[rows, vocab], 4.0).to_f32_vec().unwrap();
        for r in 0..rows {
            let row = &mut v[r * vocab..(r + 1) * vocab];
            let (a, b) = (rng.random_range(0..vocab), rng.random_range(0..vocab));
            row[a] = 9.0;
            row[b] = 9.0;
            row[rng.random_range(0..vocab)] = f32::NAN;
            row[rng.random_range(0..vocab)] = f32::NEG_INFINITY;
        }
        v[(rows - 1) * vocab..].iter_mut().for_each(|x| *x = f32::NAN);
        let x = Tensor::from_vec(v, &[rows, vocab]).unwrap();
        let want = ops::argmax(&x).unwrap().to_vec::<u32>().unwrap();
        let got = ops::argmax(&x.to_device(&dev).unwrap())
            .unwrap()
            .to_vec::<u32>()
            .unwrap();
        assert_eq!(got, want, "argmax over rows of {vocab}");
    }
}

#[test]
fn in_place_ops_refuse_shared_storage() {
    let Some(dev) = gpu() else { return };
    let mut a = Tensor::zeros_on(&[4], DType::F32, &dev).unwrap();
    let b = a.clone();
    let err = ops::add_(&mut a, &b).unwrap_err().to_string();
    assert!(err.contains("shared"), "{err}");
    let cpu = Tensor::zeros(&[4], DType::F32);
    let err = ops::add(&b, &cpu).unwrap_err().to_string();
    assert!(err.contains("cpu") && err.contains("cuda"), "{err}");
}

#[test]
fn linear_embedding_and_rope_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = rng();
    // Decode-batch rows (1-8 run the tensor-core GEMV) and prefill-like 9
    // and 64 rows (cuBLAS); k not a multiple of the GEMV's 64-wide chunk,
    // and weight rows not a multiple of its 16 per CTA, included. x as f32
    // and, for the GEMV, as bf16 (as a cast activation arrives).
    for &(n, k, out) in &[
        (1usize, 896usize, 4864usize),
        (5, 4096, 1024),
        (8, 1536, 2048),
        (2, 12288, 1024),
        (1, 520, 777),
        (3, 4096, 6144),
        (4, 4096, 1000),
        (7, 1032, 130),
        (9, 896, 512),
        (64, 576, 1536),
    ] {
        let x = random(&mut rng, &[n, k], 2.0);
        let w = random(&mut rng, &[out, k], 0.05);
        let b = random(&mut rng, &[out], 0.1);
        let want = ops::linear(&bf16_rounded(&x), &bf16_rounded(&w), Some(&b)).unwrap();
        let w_gpu = w.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let b_gpu = b.to_device(&dev).unwrap();
        let mut inputs = vec![("f32", x.to_device(&dev).unwrap())];
        if n <= 8 {
            inputs.push(("bf16", x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap()));
        }
        // The accumulating form adds the same product to a residual.
        let residual = random(&mut rng, &[n, out], 1.0);
        let want_sum = ops::add(&residual, &want).unwrap();
        for (dtype, xg) in inputs {
            let got = ops::linear(&xg, &w_gpu, Some(&b_gpu)).unwrap();
            assert_close(&got, &want, 2e-3, &format!("linear {n}x{k}x{out} ({dtype} x)"));
            let mut sum = residual.to_device(&dev).unwrap();
            ops::linear_add_(&mut sum, &xg, &w_gpu, Some(&b_gpu)).unwrap();
            assert_close(&sum, &want_sum, 2e-3, &format!("linear_add {n}x{k}x{out} ({dtype} x)"));
        }
    }

    let (vocab, h) = (1000usize, 896usize);
    let table = random(&mut rng, &[vocab, h], 1.0);
    let ids: Vec<u32> = (0..37).map(|_| rng.random_range(0..vocab as u32)).collect();
    let ids = Tensor::from_vec(ids, &[37]).unwrap();
    let want = ops::embedding(&bf16_rounded(&table), &ids).unwrap();
    let got = ops::embedding(
        &table.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap(),
        &ids.to_device(&dev).unwrap(),
    )
    .unwrap();
    assert_close(&got, &want, 0.0, "embedding bf16");

    for &(style, heads, d) in &[(RopeStyle::Neox, 8usize, 128usize), (RopeStyle::Interleaved, 1, 64)] {
        let table = RopeTable::new(d, 1e6, 4096).unwrap();
        let (cpu_rope, gpu_rope) = (
            Rope::new(table.clone(), &Device::Cpu).unwrap(),
            Rope::new(table, &dev).unwrap(),
        );
        let tokens = 19;
        let pos: Vec<i32> = (0..tokens).map(|_| rng.random_range(0..4096)).collect();
        let pos = Tensor::from_vec(pos, &[tokens]).unwrap();
        let x = random(&mut rng, &[tokens, heads, d], 2.0);
        let mut want = x.clone();
        ops::rope_(&mut want, &cpu_rope, &pos, style).unwrap();
        let mut got = x.to_device(&dev).unwrap();
        ops::rope_(&mut got, &gpu_rope, &pos.to_device(&dev).unwrap(), style).unwrap();
        assert_close(&got, &want, 1e-5, &format!("rope {style:?}"));
    }
}

#[test]
fn random_fill_matches_cpu_bits() {
    let Some(dev) = gpu() else { return };
    let seed: u64 = rand::random();
    println!("seed {seed}");
    for dtype in [DType::F32, DType::BF16] {
        let want = ops::fill_uniform(&[3, 1001], dtype, &Device::Cpu, seed, 0.02, 0.0).unwrap();
        let got = ops::fill_uniform(&[3, 1001], dtype, &dev, seed, 0.02, 0.0).unwrap();
        assert_eq!(got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap(), "{dtype}");
    }
}

/// The fused projections' ops: the q/k/v split with per-head norms and RoPE,
/// MLA's down-projection split, the gate/up halves' SwiGLU as a bf16 GEMM
/// input, and stacked weights.
#[test]
fn fused_projection_ops_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = rng();
    // Qwen3-like (norms, full rotation), Qwen2-like (no norms), and a
    // partial rotation (rotary dim below the head dim).
    for &(qh, kvh, d, rotary, norms) in &[
        (32usize, 8usize, 128usize, 128usize, true),
        (14, 2, 64, 64, false),
        (4, 1, 96, 32, true),
    ] {
        let tokens = 5;
        let (cpu_rope, gpu_rope, pos) = rope_case(&dev, &mut rng, rotary, tokens);
        let qkv = random(&mut rng, &[tokens, (qh + 2 * kvh) * d], 2.0);
        let (qn, kn) = (random(&mut rng, &[d], 1.5), random(&mut rng, &[d], 1.5));
        let want = ops::qkv_heads(&qkv, (qh, kvh, d), norms.then_some((&qn, &kn)), 1e-6, &cpu_rope, &pos).unwrap();
        let (gqn, gkn) = (qn.to_device(&dev).unwrap(), kn.to_device(&dev).unwrap());
        let got = ops::qkv_heads(
            &qkv.to_device(&dev).unwrap(),
            (qh, kvh, d),
            norms.then_some((&gqn, &gkn)),
            1e-6,
            &gpu_rope,
            &pos.to_device(&dev).unwrap(),
        )
        .unwrap();
        let what = format!("qkv_heads {qh}/{kvh} heads of {d} (rotary {rotary}, norms {norms})");
        assert_close(&got.0, &want.0, 1e-5, &format!("{what}: q"));
        assert_close(&got.1, &want.1, 1e-5, &format!("{what}: k"));
        assert_close(&got.2, &want.2, 0.0, &format!("{what}: v"));
    }

    // MLA's stacked down projections: with q LoRA (GLM-4.7-Flash's widths)
    // and without. q_in is bf16 on the GPU: within bf16 rounding.
    for &(q_rank, kv_rank, rd) in &[(768usize, 512usize, 64usize), (0, 512, 64)] {
        let tokens = 3;
        let (cpu_rope, gpu_rope, pos) = rope_case(&dev, &mut rng, rd, tokens);
        let a = random(&mut rng, &[tokens, q_rank + kv_rank + rd], 2.0);
        let (qn, kvn) = (random(&mut rng, &[q_rank], 1.5), random(&mut rng, &[kv_rank], 1.5));
        let widths = (q_rank, kv_rank, rd);
        let q_norm = (q_rank > 0).then_some(&qn);
        let want = ops::mla_down_heads(&a, widths, q_norm, &kvn, 1e-6, &cpu_rope, &pos).unwrap();
        // No zero-size buffer on the device: the q norm goes there only with q LoRA.
        let gqn = (q_rank > 0).then(|| qn.to_device(&dev).unwrap());
        let gkvn = kvn.to_device(&dev).unwrap();
        let got = ops::mla_down_heads(
            &a.to_device(&dev).unwrap(),
            widths,
            gqn.as_ref(),
            &gkvn,
            1e-6,
            &gpu_rope,
            &pos.to_device(&dev).unwrap(),
        )
        .unwrap();
        let what = format!("mla_down_heads q rank {q_rank}");
        assert_close(&got.1, &want.1, 1e-5, &format!("{what}: keys"));
        match (got.0, want.0) {
            (Some(g), Some(w)) => {
                assert_eq!(g.dtype(), DType::BF16);
                assert_close(&g, &w, 4e-3, &format!("{what}: q_in"));
            }
            (None, None) => {}
            _ => panic!("{what}: q_in on one side only"),
        }
    }

    // SwiGLU of the halves, written as bf16: within bf16 rounding of the CPU.
    for &(rows, i) in &[(1usize, 12288usize), (6, 896)] {
        let gu = random(&mut rng, &[rows, 2 * i], 3.0);
        let want = ops::silu_mul_halves_gemm_input(&gu).unwrap();
        let got = ops::silu_mul_halves_gemm_input(&gu.to_device(&dev).unwrap()).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_close(&got, &want, 4e-3, &format!("silu_mul_halves {rows}x{i}"));
    }

    // Stacked bf16 weights: the parts' bits in order.
    let parts: Vec<Tensor> = [3usize, 1, 5]
        .iter()
        .map(|&r| random(&mut rng, &[r, 24], 1.0).to_dtype(DType::BF16).unwrap())
        .collect();
    let refs: Vec<&Tensor> = parts.iter().collect();
    let want = ops::stack_rows(&refs).unwrap();
    let on_gpu: Vec<Tensor> = parts.iter().map(|p| p.to_device(&dev).unwrap()).collect();
    let refs: Vec<&Tensor> = on_gpu.iter().collect();
    let got = ops::stack_rows(&refs).unwrap();
    assert_eq!(got.shape(), &[9, 24]);
    assert_close(&got, &want, 0.0, "stack_rows bf16");
}

/// A RoPE table of `rotary` channels on the CPU and on `dev`, and `tokens`
/// random positions below its length (on the CPU).
fn rope_case(dev: &Device, rng: &mut impl Rng, rotary: usize, tokens: usize) -> (Rope, Rope, Tensor) {
    let table = RopeTable::new(rotary, 1e6, 4096).unwrap();
    let ropes = (
        Rope::new(table.clone(), &Device::Cpu).unwrap(),
        Rope::new(table, dev).unwrap(),
    );
    let pos: Vec<i32> = (0..tokens).map(|_| rng.random_range(0..4096)).collect();
    (ropes.0, ropes.1, Tensor::from_vec(pos, &[tokens]).unwrap())
}
