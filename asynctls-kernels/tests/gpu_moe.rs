//! The mixture-of-experts ops and the MLA helper ops on the GPU against
//! their CPU twins, on fresh random inputs (seed printed):
//!
//! - `moe_route` (router logits in f32 from the bf16 router, then routing):
//!   the same experts in the same order as the CPU fed the same bf16 router
//!   values (exact), weights within 1e-5 relative (expf vs exp, f32 sums in
//!   another order);
//! - `moe_experts`: the grouped decode kernels (up to 64 tokens) and the
//!   sorted-token GEMM path (more) against the CPU fed the same
//!   bf16-rounded inputs and weights: relative L2 error <= 1e-2 (the GPU
//!   rounds the SwiGLU activation to bf16 before the down projection);
//! - `gather_rows`, `scatter_rows`, `concat_cols`: exact;
//! - `head_matmul` (both weight layouts) and the f32-weight linear:
//!   <= 2e-3 and <= 1e-5;
//! - `rope_concat` (MLA's rotated rows after the latent) <= 1e-6 against the
//!   CPU's rope then concat; `rms_norm_gemm_input` (bf16 out) <= 4e-3
//!   against the CPU norm (bf16 rounding).
//!
//! Without a GPU every test prints `skipped: no CUDA device` and passes.

mod common;

use asynctls_kernels::cpu::moe::RouteConfig;
use asynctls_kernels::cpu::RopeTable;
use asynctls_kernels::moe::{moe_experts, moe_route, ExpertBank};
use asynctls_kernels::ops::Rope;
use asynctls_kernels::{ops, DType, Device, Tensor};
use common::{bf16_rounded, gpu, random, rng};
use rand::{rngs::StdRng, Rng};

fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let (g, w) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    assert!(g.iter().all(|v| v.is_finite()), "non-finite output");
    let norm = w.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt() / norm
}

#[test]
fn router_picks_the_cpus_experts() {
    let Some(dev) = gpu() else { return };
    let mut rng = rng();
    for (experts, groups, top_groups, top_k, normalize) in [
        (64usize, 1usize, 1usize, 4usize, true),
        (8, 2, 1, 2, true),
        (256, 8, 4, 8, true),
        (64, 1, 1, 6, false),
        (40, 4, 2, 3, true),
    ] {
        let c = RouteConfig {
            experts,
            groups,
            top_groups,
            top_k,
            normalize,
            scaling: 1.8,
        };
        let h = 2048;
        let router = bf16_rounded(&random(&mut rng, &[experts, h], 0.1));
        let gpu_router = router.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        for n in [1usize, 5, 130] {
            let x = random(&mut rng, &[n, h], 1.0);
            let bias = random(&mut rng, &[experts], 0.5);
            let (ci, cw) = moe_route(&x, &router, &bias, &c).unwrap();
            let (gi, gw) = moe_route(
                &x.to_device(&dev).unwrap(),
                &gpu_router,
                &bias.to_device(&dev).unwrap(),
                &c,
            )
            .unwrap();
            // The logits are f32 sums taken in another order on each side,
            // so a near tie between two experts (or two groups) of a token
            // may break either way: at most one token in 100 (and one in
            // all) may differ; the weights are compared on the tokens that agree.
            let (g_ids, c_ids) = (gi.to_vec::<u32>().unwrap(), ci.to_vec::<u32>().unwrap());
            let (g_w, c_w) = (gw.to_f32_vec().unwrap(), cw.to_f32_vec().unwrap());
            let differing: Vec<usize> = (0..n)
                .filter(|&t| g_ids[t * top_k..(t + 1) * top_k] != c_ids[t * top_k..(t + 1) * top_k])
                .collect();
            assert!(
                differing.len() <= (n / 100).max(1).min(n - 1),
                "{c:?} n {n}: tokens {differing:?} differ"
            );
            let agree = |w: &[f32]| -> Vec<f32> {
                (0..n)
                    .filter(|t| !differing.contains(t))
                    .flat_map(|t| w[t * top_k..(t + 1) * top_k].to_vec())
                    .collect()
            };
            let (g_a, c_a) = (agree(&g_w), agree(&c_w));
            let norm = c_a.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            let e = g_a.iter().zip(&c_a).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt() / norm;
            println!(
                "route {experts} experts / {groups} groups, top {top_k}, {n} tokens: {} of {n} tokens' ids equal, weights rel err {e:.1e}",
                n - differing.len()
            );
            assert!(g_w.iter().all(|v| v.is_finite()), "non-finite weights");
            assert!(e <= 1e-5, "weights rel err {e}");
        }
    }
}

/// A random bank of `experts` on the CPU (bf16-rounded f32) and the same on the GPU.
fn banks(rng: &mut StdRng, dev: &Device, experts: usize, h: usize, inter: usize) -> (ExpertBank, ExpertBank) {
    let mats = |rng: &mut StdRng, shape: &[usize]| -> Vec<Tensor> {
        (0..experts).map(|_| bf16_rounded(&random(rng, shape, 0.1))).collect()
    };
    let (g, u, d) = (mats(rng, &[inter, h]), mats(rng, &[inter, h]), mats(rng, &[h, inter]));
    let on_gpu = |ts: &[Tensor]| -> Vec<Tensor> {
        ts.iter()
            .map(|t| t.to_dtype(DType::BF16).unwrap().to_device(dev).unwrap())
            .collect()
    };
    let gpu = ExpertBank::new(on_gpu(&g), on_gpu(&u), on_gpu(&d)).unwrap();
    (ExpertBank::new(g, u, d).unwrap(), gpu)
}

#[test]
fn experts_match_the_cpu_grouped_and_sorted() {
    let Some(dev) = gpu() else { return };
    let mut rng = rng();
    for (experts, h, inter, k) in [
        (64usize, 2048usize, 1536usize, 4usize),
        (8, 64, 24, 2),
        (16, 136, 40, 3),
    ] {
        let (cpu_bank, gpu_bank) = banks(&mut rng, &dev, experts, h, inter);
        let c = RouteConfig {
            experts,
            groups: 1,
            top_groups: 1,
            top_k: k,
            normalize: true,
            scaling: 1.8,
        };
        // 1, 8 and 64 tokens take the grouped kernels; 200 the sorted GEMMs.
        for n in [1usize, 8, 64, 200] {
            let x = bf16_rounded(&random(&mut rng, &[n, h], 1.0));
            let router = random(&mut rng, &[experts, h], 0.1);
            let (ids, weights) = moe_route(&x, &router, &random(&mut rng, &[experts], 0.2), &c).unwrap();
            let (start, base) = (random(&mut rng, &[n, h], 0.5), random(&mut rng, &[n, h], 0.5));
            let mut want = start.clone();
            moe_experts(&x, &cpu_bank, &ids, &weights, &base, &mut want).unwrap();
            let mut got = start.to_device(&dev).unwrap();
            moe_experts(
                &x.to_device(&dev).unwrap(),
                &gpu_bank,
                &ids.to_device(&dev).unwrap(),
                &weights.to_device(&dev).unwrap(),
                &base.to_device(&dev).unwrap(),
                &mut got,
            )
            .unwrap();
            let e = rel_err(&got, &want);
            println!("experts {experts} x [{inter}, {h}], top {k}, {n} tokens: rel err {e:.2e}");
            assert!(e <= 1e-2, "rel err {e}");
        }
    }
}

#[test]
fn row_and_column_ops_are_exact() {
    let Some(dev) = gpu() else { return };
    let mut rng = rng();
    let table = random(&mut rng, &[50, 24], 1.0);
    let idx_v: Vec<u32> = (0..37).map(|_| rng.random_range(0..50)).collect();
    let idx = Tensor::from_vec(idx_v.clone(), &[37]).unwrap();
    let (gt, gi) = (table.to_device(&dev).unwrap(), idx.to_device(&dev).unwrap());
    for dtype in [DType::F32, DType::BF16] {
        let want = ops::gather_rows(&table.to_dtype(dtype).unwrap(), &idx).unwrap();
        let got = ops::gather_rows(&ops::cast(&gt, dtype).unwrap(), &gi).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert_eq!(got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap(), "gather {dtype}");
    }
    // Scatter to distinct rows.
    let rows: Vec<u32> = (0..50u32).rev().step_by(3).collect();
    let m = rows.len();
    let src = random(&mut rng, &[m, 24], 1.0);
    let sidx = Tensor::from_vec(rows, &[m]).unwrap();
    let mut want = random(&mut rng, &[50, 24], 1.0);
    let mut got = want.to_device(&dev).unwrap();
    ops::scatter_rows(&mut want, &sidx, &src).unwrap();
    ops::scatter_rows(&mut got, &sidx.to_device(&dev).unwrap(), &src.to_device(&dev).unwrap()).unwrap();
    assert_eq!(got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap(), "scatter");
    let (a, b) = (random(&mut rng, &[33, 512], 1.0), random(&mut rng, &[33, 64], 1.0));
    let want = ops::concat_cols(&a, &b).unwrap();
    let got = ops::concat_cols(&a.to_device(&dev).unwrap(), &b.to_device(&dev).unwrap()).unwrap();
    assert_eq!(got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap(), "concat");
    println!("gather (f32, bf16), scatter, concat: exact");
}

#[test]
fn head_matmul_and_f32_linear_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = rng();
    // MLA's shapes: q_nope . W_uk ([20, 192, 512]) and latent . W_uv^T ([20, 256, 512]).
    for (n, heads, k, m, transposed) in [
        (1usize, 20usize, 192usize, 512usize, false),
        (37, 20, 512, 256, true),
        (5, 4, 24, 32, false),
        (300, 4, 32, 40, true),
    ] {
        let x = bf16_rounded(&random(&mut rng, &[n, heads, k], 1.0));
        let shape = if transposed { [heads, m, k] } else { [heads, k, m] };
        let w = bf16_rounded(&random(&mut rng, &shape, 0.2));
        let want = ops::head_matmul(&x, &w, transposed).unwrap();
        let got = ops::head_matmul(
            &x.to_device(&dev).unwrap(),
            &w.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap(),
            transposed,
        )
        .unwrap();
        let e = rel_err(&got, &want);
        println!("head_matmul n {n} heads {heads} k {k} m {m} transposed {transposed}: rel err {e:.2e}");
        assert!(e <= 2e-3, "rel err {e}");
    }
    for (n, k, out) in [(1usize, 2048usize, 64usize), (700, 64, 8)] {
        let x = random(&mut rng, &[n, k], 1.0);
        let w = random(&mut rng, &[out, k], 0.1);
        let want = ops::linear(&x, &w, None).unwrap();
        let got = ops::linear(&x.to_device(&dev).unwrap(), &w.to_device(&dev).unwrap(), None).unwrap();
        let e = rel_err(&got, &want);
        println!("f32 linear (router) [{n}, {k}] x [{out}, {k}]^T: rel err {e:.2e}");
        assert!(e <= 1e-5, "rel err {e}");
    }
}

#[test]
fn rope_concat_and_bf16_norm_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = rng();
    let table = RopeTable::new(64, 10_000.0, 4096).unwrap();
    let (cpu_rope, gpu_rope) = (
        Rope::new(table.clone(), &Device::Cpu).unwrap(),
        Rope::new(table, &dev).unwrap(),
    );
    for (tokens, heads) in [(1usize, 20usize), (37, 20), (5, 1), (300, 1)] {
        let a = random(&mut rng, &[tokens * heads, 512], 1.0);
        let b = random(&mut rng, &[tokens, heads, 64], 1.0);
        let pos: Vec<i32> = (0..tokens).map(|_| rng.random_range(0..4096)).collect();
        let positions = Tensor::from_vec(pos, &[tokens]).unwrap();
        let want = ops::rope_concat(&a, &b, &cpu_rope, &positions).unwrap();
        let got = ops::rope_concat(
            &a.to_device(&dev).unwrap(),
            &b.to_device(&dev).unwrap(),
            &gpu_rope,
            &positions.to_device(&dev).unwrap(),
        )
        .unwrap();
        let e = rel_err(&got, &want);
        println!("rope_concat {tokens} tokens x {heads} heads: rel err {e:.2e}");
        assert!(e <= 1e-6, "rel err {e}");
    }
    for (rows, h) in [(1usize, 2048usize), (64, 768), (7, 4096)] {
        let x = random(&mut rng, &[rows, h], 3.0);
        let w = random(&mut rng, &[h], 1.5);
        let want = ops::rms_norm(&x, &w, 1e-6).unwrap();
        let got = ops::rms_norm_gemm_input(&x.to_device(&dev).unwrap(), &w.to_device(&dev).unwrap(), 1e-6).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let e = rel_err(&got.to_dtype(DType::F32).unwrap(), &want);
        println!("rms_norm_gemm_input [{rows}, {h}] (bf16 out): rel err {e:.2e}");
        assert!(e <= 4e-3, "rel err {e}");
    }
}
