//! The GPU-resident cache and the GPU sparse-decode pipeline against their
//! CPU twins, on fresh random tokens, GQA and MLA:
//!
//! - `append` + `refresh_bounds` write exactly what `HostKvStorage` writes
//!   (bf16 rows, f32 block max/min, INT4 codes and f16 scale/zero: bit-equal);
//! - `sparse_select` picks the tokens the CPU's `select` picks (the sets may
//!   differ only where label scores tie within float rounding: at most 1% of
//!   a row), and the attention over them matches the CPU's sparse decode
//!   (relative L2 error <= 1e-2, the bf16 bound: the kernels round Q and P
//!   to bf16 for the tensor cores);
//! - the MLA decode kernel matches the CPU decode, dense and sparse;
//! - the prefill kernel (GQA and MLA, from the same pool) matches the CPU
//!   prefill (relative L2 error <= 1e-2: Q and P are rounded to bf16).
//!
//! Outputs are poisoned with NaN before each launch. Prints `skipped: no CUDA
//! device` without a GPU.

use std::collections::BTreeSet;

use asynctls_attn::metrics::relative_l2;
use asynctls_attn::{attend, decode, prefill, AttnShape, GroupReduce, Policy, SparseConfig};
use asynctls_kernels::cuda::{CudaOps, DecodeScratch, GpuKvPool, KvGeometry, SelectParams, SelectScratch};
use asynctls_kvcache::{
    BlockId, CacheConfig, HostKvStorage, HostReadable, KvDType, LabelChannels, PagedKvCache, SeqId,
};
use cudarc::driver::CudaSlice;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

struct Fixture {
    cache: PagedKvCache<HostKvStorage>,
    seqs: Vec<SeqId>,
    pool: GpuKvPool,
    table: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    max_blocks: usize,
}

/// The same random tokens written to a host cache and, through the append
/// kernel, to a GPU pool (random label channels per head).
fn fixture(ops: &CudaOps, shape: &AttnShape, lens: &[usize], rng: &mut StdRng) -> Fixture {
    let stream = ops.device().stream().clone();
    let blocks: usize = lens.iter().map(|l| l.div_ceil(64)).sum::<usize>() + 3;
    let mla = shape.kv_heads == 1 && shape.value_dim < shape.key_dim;
    let mut config = if mla {
        CacheConfig::mla(1, shape.value_dim, shape.key_dim - shape.value_dim, blocks)
    } else {
        CacheConfig::gqa(1, shape.kv_heads, shape.key_dim, blocks)
    };
    config.kv_dtype = KvDType::BF16;
    let (kd, vd, r) = (config.key_dim, config.value_dim(), config.label_channels);
    let channels: Vec<Vec<u16>> = (0..shape.kv_heads)
        .map(|_| {
            let mut all: Vec<u16> = (0..kd as u16).collect();
            all.shuffle(rng);
            all.truncate(r);
            all
        })
        .collect();
    let mut cache =
        PagedKvCache::new(HostKvStorage::new(&config, LabelChannels::new(vec![channels.clone()])).unwrap()).unwrap();
    let geometry = KvGeometry {
        num_blocks: blocks,
        kv_heads: shape.kv_heads,
        block_size: 64,
        key_dim: kd,
        value_dim: vd,
        separate_values: !mla,
        label_channels: r,
    };
    let flat: Vec<u16> = channels.concat();
    let mut pool = GpuKvPool::new(ops, geometry, &flat).unwrap();
    // Take a few blocks first so the sequences' blocks are not 0, 1, 2, ...
    let filler = cache.add_sequence();
    cache.reserve(filler, 100).unwrap();
    let mut seqs = Vec::new();
    for &len in lens {
        let s = cache.add_sequence();
        let k: Vec<f32> = (0..len * shape.kv_heads * kd)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let v: Vec<f32> = (0..len * shape.kv_heads * vd)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        // Two appends, so a block is filled across calls (decode-style growth).
        let split = len / 3;
        let (h, kd_all, vd_all) = (shape.kv_heads, shape.kv_heads * kd, shape.kv_heads * vd);
        for (from, to) in [(0, split), (split, len)] {
            if from == to {
                continue;
            }
            let range = cache
                .append(s, &[&k[from * kd_all..to * kd_all]], &[&v[from * vd_all..to * vd_all]])
                .unwrap();
            let table = cache.table(s).unwrap().blocks().to_vec();
            let slots: Vec<i32> = range
                .clone()
                .map(|t| (table[t / 64].index() * 64 + t % 64) as i32)
                .collect();
            let dk = stream.clone_htod(&k[from * kd_all..to * kd_all]).unwrap();
            let dv = stream.clone_htod(&v[from * vd_all..to * vd_all]).unwrap();
            let ds = stream.clone_htod(&slots).unwrap();
            // SAFETY: the slots come from the host cache's block tables.
            unsafe { ops.append(&mut pool, &dk, (!mla).then_some(&dv), &ds) }.unwrap();
            let touched: Vec<i32> = (range.start / 64..range.end.div_ceil(64))
                .map(|b| table[b].index() as i32)
                .collect();
            let fills: Vec<i32> = (range.start / 64..range.end.div_ceil(64))
                .map(|b| (to - b * 64).min(64) as i32)
                .collect();
            // SAFETY: the touched blocks come from the host cache's block table.
            unsafe {
                ops.refresh_bounds(
                    &mut pool,
                    &stream.clone_htod(&touched).unwrap(),
                    &stream.clone_htod(&fills).unwrap(),
                )
            }
            .unwrap();
            let _ = h;
        }
        seqs.push(s);
    }
    let max_blocks = seqs
        .iter()
        .map(|&s| cache.table(s).unwrap().blocks().len())
        .max()
        .unwrap();
    let mut table = vec![0i32; seqs.len() * max_blocks];
    for (i, &s) in seqs.iter().enumerate() {
        for (j, b) in cache.table(s).unwrap().blocks().iter().enumerate() {
            table[i * max_blocks + j] = b.index() as i32;
        }
    }
    let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    Fixture {
        table: stream.clone_htod(&table).unwrap(),
        lens: stream.clone_htod(&lens_i).unwrap(),
        cache,
        seqs,
        pool,
        max_blocks,
    }
}

fn shapes() -> Vec<(AttnShape, Vec<usize>)> {
    vec![
        (AttnShape::gqa(32, 8, 128), vec![9000, 4100, 70]),
        // 21 and 64: sequences within the sink block (no local window beyond it).
        (AttnShape::gqa(14, 2, 64), vec![5000, 64, 21]),
        (AttnShape::gqa(2, 2, 64), vec![21, 130]),
        (AttnShape::mla(20, 512, 64, 0.07), vec![7000, 3000]),
        (AttnShape::mla(16, 512, 64, 0.1), vec![2500]),
    ]
}

#[test]
fn append_writes_what_host_storage_writes() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    for (shape, lens) in shapes() {
        let fx = fixture(&ops, &shape, &lens, &mut rng);
        let storage = fx.cache.storage();
        let g = fx.pool.geometry;
        let keys = stream.clone_dtoh(&fx.pool.keys).unwrap();
        let bounds: Vec<f32> = stream
            .clone_dtoh(&fx.pool.bounds)
            .unwrap()
            .iter()
            .map(|b| b.to_f32())
            .collect();
        let labels = stream.clone_dtoh(&fx.pool.labels).unwrap();
        let params = stream.clone_dtoh(&fx.pool.label_params).unwrap();
        let values = fx.pool.values.as_ref().map(|v| stream.clone_dtoh(v).unwrap());
        let (kd, r2) = (g.key_dim, g.label_channels / 2);
        let mut row = vec![0.0f32; kd];
        let mut checked = 0;
        for &s in &fx.seqs {
            let table = fx.cache.table(s).unwrap();
            let len = table.written(0);
            for (bi, &b) in table.blocks().iter().enumerate() {
                let fill = (len - bi * 64).min(64);
                for head in 0..g.kv_heads {
                    let base = (b.index() * g.kv_heads + head) * 64;
                    let (max, min) = storage.key_bounds(0, b, head);
                    let at = (b.index() * g.kv_heads + head) * 2 * kd;
                    assert_eq!(&bounds[at..at + kd], max, "{shape:?} block max");
                    assert_eq!(&bounds[at + kd..at + 2 * kd], min, "{shape:?} block min");
                    let (host_labels, host_params) = storage.labels(0, b, head);
                    for slot in 0..fill {
                        let t = base + slot;
                        storage.keys(0, b, head).read(slot, &mut row);
                        let gpu_row: Vec<f32> = keys[t * kd..(t + 1) * kd].iter().map(|v| v.to_f32()).collect();
                        assert_eq!(gpu_row, row, "{shape:?} key row");
                        if let Some(values) = &values {
                            let vd = g.value_dim;
                            let mut vrow = vec![0.0f32; vd];
                            storage.values(0, b, head).read(slot, &mut vrow);
                            let gpu_v: Vec<f32> = values[t * vd..(t + 1) * vd].iter().map(|v| v.to_f32()).collect();
                            assert_eq!(gpu_v, vrow, "{shape:?} value row");
                        }
                        assert_eq!(
                            &labels[t * r2..(t + 1) * r2],
                            &host_labels[slot * r2..(slot + 1) * r2],
                            "{shape:?} label codes of slot {slot}"
                        );
                        let (gs, gz) = (params[2 * t], params[2 * t + 1]);
                        let [hs, hz] = host_params[slot];
                        assert!(
                            gs.to_bits() == hs.to_bits() && gz.to_bits() == hz.to_bits(),
                            "{shape:?} label scale/zero: gpu {gs:?}/{gz:?} ({:#x}/{:#x}), host {hs:?}/{hz:?} ({:#x}/{:#x}); picked {:?}",
                            gs.to_bits(),
                            gz.to_bits(),
                            hs.to_bits(),
                            hz.to_bits(),
                            storage.label_channels(0, head).iter().map(|&c| row[c as usize]).collect::<Vec<_>>()
                        );
                        checked += 1;
                    }
                }
            }
        }
        println!("{shape:?}: {checked} token rows bit-equal");
    }
}

/// The first `rows` token lists (the scratch may hold more from a larger batch).
fn to_rows(ops: &CudaOps, lists: &asynctls_kernels::cuda::TokenLists<'_>, rows: usize) -> Vec<Vec<u32>> {
    let stream = ops.device().stream();
    let tokens = stream.clone_dtoh(lists.tokens).unwrap();
    let counts = stream.clone_dtoh(lists.counts).unwrap();
    counts[..rows]
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            tokens[i * lists.max_tokens..i * lists.max_tokens + c as usize]
                .iter()
                .map(|&t| t as u32)
                .collect()
        })
        .collect()
}

#[test]
fn sparse_pipeline_matches_cpu() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    let mut select_scratch = SelectScratch::new(&ops).unwrap();
    let mut scratch = DecodeScratch::new(&ops).unwrap();
    for (shape, lens) in shapes() {
        let fx = fixture(&ops, &shape, &lens, &mut rng);
        let tables: Vec<_> = fx.seqs.iter().map(|&s| fx.cache.table(s).unwrap()).collect();
        let q: Vec<f32> = (0..lens.len() * shape.q_heads * shape.key_dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let dq = stream.clone_htod(&q).unwrap();
        let view = fx.pool.view(&fx.table, fx.max_blocks, &fx.lens);
        let out_len = lens.len() * shape.q_heads * shape.value_dim;
        // The decode kernels round Q and P to bf16 for the tensor cores.
        let bound = 1e-2;

        // Dense first (the MLA kernel's dense path; GQA's is in gpu_decode).
        let dense = SparseConfig {
            policy: Policy::Dense,
            ..SparseConfig::default()
        };
        let mut want = vec![0.0f32; out_len];
        decode(fx.cache.storage(), &tables, 0, &q, &shape, &dense, &mut want).unwrap();
        let mut out = stream.clone_htod(&vec![f32::NAN; out_len]).unwrap();
        ops.decode_attention(&dq, &view, None, shape.q_heads, shape.scale, 9, &mut scratch, &mut out)
            .unwrap();
        let err = relative_l2(&stream.clone_dtoh(&out).unwrap(), &want);
        assert!(err <= bound, "{shape:?} dense: rel err {err}");

        // tls at two settings, and ds (labels over every token: on the GPU
        // the block stage keeps every block, as `select_params` sets it).
        let cases = [
            (Policy::Tls, GroupReduce::Sum, 16, 256),
            (Policy::Tls, GroupReduce::Max, 40, 1000),
            (Policy::Ds, GroupReduce::Sum, 0, 300),
        ];
        for (policy, reduce, k_b, k_t) in cases {
            let cfg = SparseConfig {
                policy,
                block_topk: k_b,
                token_topk: k_t,
                dense_below: 0,
                group_reduce: reduce,
                ..SparseConfig::default()
            };
            let mut want = vec![0.0f32; out_len];
            let report = decode(fx.cache.storage(), &tables, 0, &q, &shape, &cfg, &mut want).unwrap();
            let params = asynctls_attn::select_params(&cfg, fx.pool.geometry.block_size)
                .unwrap()
                .expect("a sparse policy");
            let k_b = params.block_topk;
            ops.sparse_select(
                &dq,
                &fx.pool,
                &fx.table,
                fx.max_blocks,
                &fx.lens,
                shape.q_heads,
                &params,
                &mut select_scratch,
            )
            .unwrap();
            let got = to_rows(&ops, &select_scratch.lists(), lens.len() * shape.kv_heads);
            // The candidate blocks the GPU kept, to tell a block-stage
            // difference from a token-stage one when a row differs.
            let (cands, counts) = select_scratch.candidates();
            let (cands, counts) = (stream.clone_dtoh(cands).unwrap(), stream.clone_dtoh(counts).unwrap());
            let mut differing = 0;
            for (row, (g, w)) in got.iter().zip(&report.heads).enumerate() {
                assert!(
                    g.windows(2).all(|p| p[0] < p[1]),
                    "{shape:?} row {row}: not sorted ascending"
                );
                let (g_set, w_set): (BTreeSet<u32>, BTreeSet<u32>) =
                    (g.iter().copied().collect(), w.tokens.iter().copied().collect());
                let diff = g_set.symmetric_difference(&w_set).count();
                assert_eq!(g.len(), w.tokens.len(), "{shape:?} row {row}: token count");
                let gpu_blocks = &cands[row * k_b..row * k_b + counts[row] as usize];
                let stray: Vec<&i32> = gpu_blocks
                    .iter()
                    .filter(|b| !w.blocks.contains(&(**b as u32)))
                    .collect();
                assert!(
                    diff * 100 <= w.tokens.len().max(100),
                    "{shape:?} {policy:?} {reduce:?} row {row}: {diff} of {} tokens differ; GPU candidate blocks \
                     not in the CPU's: {stray:?}",
                    w.tokens.len()
                );
                differing += diff;
            }
            let mut out = stream.clone_htod(&vec![f32::NAN; out_len]).unwrap();
            let lists = select_scratch.lists();
            ops.decode_attention(
                &dq,
                &view,
                Some(&lists),
                shape.q_heads,
                shape.scale,
                4,
                &mut scratch,
                &mut out,
            )
            .unwrap();
            // The attention stage against the CPU's over the very tokens the
            // GPU chose (a swapped near-tie token moves a flat softmax's output
            // by ~1%, so the end-to-end comparison is only exact when the sets are).
            let got_out = stream.clone_dtoh(&out).unwrap();
            let (g, kd, vd) = (shape.group(), shape.key_dim, shape.value_dim);
            let mut cpu_out = vec![0.0f32; out_len];
            for (row, tokens) in got.iter().enumerate() {
                let blocks = tables[row / shape.kv_heads].blocks();
                attend(
                    fx.cache.storage(),
                    blocks,
                    0,
                    row % shape.kv_heads,
                    tokens,
                    &q[row * g * kd..(row + 1) * g * kd],
                    shape.scale,
                    &mut cpu_out[row * g * vd..(row + 1) * g * vd],
                );
            }
            let err = relative_l2(&got_out, &cpu_out);
            let end_to_end = relative_l2(&got_out, &want);
            println!(
                "{shape:?} {policy:?} {reduce:?} k_b {k_b} k_t {k_t}: {differing} tokens differ; attention rel err {err:.2e}, vs CPU decode {end_to_end:.2e}"
            );
            assert!(err <= bound, "{shape:?} {reduce:?}: attention rel err {err}");
            if differing == 0 {
                assert!(
                    end_to_end <= bound,
                    "{shape:?} {reduce:?}: rel err {end_to_end} with equal selections"
                );
            }
        }
    }
}

#[test]
fn tied_scores_select_what_the_cpu_selects() {
    // A zero query ties every block and token score: both top-k stages must
    // then break ties as the CPU does (lower indices first).
    let Some(ops) = CudaOps::for_tests() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    let shape = AttnShape::gqa(32, 8, 128);
    let lens = [5000usize, 1300];
    let fx = fixture(&ops, &shape, &lens, &mut rng);
    let tables: Vec<_> = fx.seqs.iter().map(|&s| fx.cache.table(s).unwrap()).collect();
    let q = vec![0.0f32; lens.len() * shape.q_heads * shape.key_dim];
    let cfg = SparseConfig {
        policy: Policy::Tls,
        token_topk: 300,
        block_topk: 10,
        dense_below: 0,
        ..SparseConfig::default()
    };
    let mut want = vec![0.0f32; lens.len() * shape.q_heads * shape.value_dim];
    let report = decode(fx.cache.storage(), &tables, 0, &q, &shape, &cfg, &mut want).unwrap();
    let params = SelectParams {
        block_topk: cfg.block_topk,
        token_topk: cfg.token_topk,
        sink_blocks: cfg.sink_blocks,
        local_blocks: cfg.local_blocks,
        reduce_max: false,
    };
    let mut scratch = SelectScratch::new(&ops).unwrap();
    let dq = stream.clone_htod(&q).unwrap();
    ops.sparse_select(
        &dq,
        &fx.pool,
        &fx.table,
        fx.max_blocks,
        &fx.lens,
        shape.q_heads,
        &params,
        &mut scratch,
    )
    .unwrap();
    let got = to_rows(&ops, &scratch.lists(), lens.len() * shape.kv_heads);
    for (row, (g, w)) in got.iter().zip(&report.heads).enumerate() {
        assert_eq!(g, &w.tokens, "row {row}: tied selection differs from the CPU's");
    }
}

#[test]
fn prefill_kernel_matches_cpu_over_the_gpu_pool() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    for (shape, start, n) in [
        (AttnShape::mla(20, 512, 64, 0.07), 0usize, 777usize),
        (AttnShape::mla(16, 512, 64, 0.1), 1000, 130),
        // A short chunk at a long offset: the keys split across CTAs.
        (AttnShape::mla(20, 512, 64, 0.07), 3000, 40),
        (AttnShape::gqa(32, 8, 128), 64, 450),
        (AttnShape::gqa(14, 2, 64), 0, 301),
    ] {
        let fx = fixture(&ops, &shape, &[start + n], &mut rng);
        let table = fx.cache.table(fx.seqs[0]).unwrap();
        let q: Vec<f32> = (0..n * shape.q_heads * shape.key_dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut want = vec![0.0f32; n * shape.q_heads * shape.value_dim];
        prefill(fx.cache.storage(), table, 0, start, &q, &shape, &mut want).unwrap();
        let view = fx.pool.view(&fx.table, fx.max_blocks, &fx.lens);
        let dq = stream.clone_htod(&q).unwrap();
        let mut out = stream.clone_htod(&vec![f32::NAN; want.len()]).unwrap();
        ops.prefill_attention(&dq, &view, start, shape.q_heads, shape.scale, &mut out)
            .unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{shape:?}: non-finite prefill output"
        );
        let err = relative_l2(&got, &want);
        println!(
            "prefill {}/{} heads, dims {}/{}, start {start}, n {n}: rel err {err:.2e}",
            shape.q_heads, shape.kv_heads, shape.key_dim, shape.value_dim
        );
        assert!(err <= 1e-2, "{shape:?} start {start} n {n}: rel err {err}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let geometry = KvGeometry {
        num_blocks: 4,
        kv_heads: 2,
        block_size: 64,
        key_dim: 128,
        value_dim: 128,
        separate_values: true,
        label_channels: 12,
    };
    assert!(
        GpuKvPool::new(&ops, geometry, &[0; 24]).is_err(),
        "r not a multiple of 8"
    );
    let geometry = KvGeometry {
        label_channels: 16,
        ..geometry
    };
    assert!(
        GpuKvPool::new(&ops, geometry, &[200; 32]).is_err(),
        "channel out of range"
    );
    let pool = GpuKvPool::new(&ops, geometry, &[1; 32]).unwrap();
    let stream = ops.device().stream().clone();
    let q = stream.alloc_zeros::<f32>(3).unwrap();
    let table = stream.alloc_zeros::<i32>(4).unwrap();
    let lens = stream.clone_htod(&[10i32]).unwrap();
    let mut scratch = SelectScratch::new(&ops).unwrap();
    let params = SelectParams {
        block_topk: 2,
        token_topk: 8,
        sink_blocks: 1,
        local_blocks: 1,
        reduce_max: false,
    };
    let err = ops
        .sparse_select(&q, &pool, &table, 4, &lens, 8, &params, &mut scratch)
        .unwrap_err();
    assert!(err.to_string().contains("q of 3 elements"), "{err}");
    let _ = BlockId(0);
}
