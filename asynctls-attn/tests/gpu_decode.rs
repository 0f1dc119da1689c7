//! The CUDA decode-attention kernel against the CPU decode (its twin) on
//! fresh random caches: dense, and over the token lists that the CPU's
//! two-level selection chose, also over the offload engine's layout (units
//! in resident slots found through a table, the rest read in place). bf16 K/V on both sides, f32 accumulation;
//! relative L2 error <= 1e-2 (the kernel rounds Q and P to bf16 for the
//! tensor cores; the bf16 bound). Prints `skipped: no CUDA device` without a GPU.

use asynctls_attn::metrics::relative_l2;
use asynctls_attn::{decode, prefill, AttnShape, Policy, SparseConfig};
use asynctls_kernels::cuda::{CudaOps, DecodeScratch, OffloadedKv, PagedKvView, SlotLookup, TokenLists};
use asynctls_kvcache::{
    BlockId, CacheConfig, HostKvStorage, HostReadable, KvDType, LabelChannels, PagedKvCache, SeqId,
};
use cudarc::driver::DevicePtr;
use half::bf16;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

fn gpu() -> Option<CudaOps> {
    CudaOps::for_tests()
}

#[test]
fn decode_kernel_matches_cpu_dense_and_sparse() {
    let Some(ops) = gpu() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    for &(q_heads, kv_heads, d, ref lens) in &[
        (32usize, 8usize, 128usize, vec![5000usize, 12_345, 777]),
        (14, 2, 64, vec![3000, 64]),
        (9, 3, 64, vec![1, 4097]),
        (40, 8, 128, vec![9000]),
    ] {
        let shape = AttnShape::gqa(q_heads, kv_heads, d);
        let (cache, seqs, blocks) = random_cache(kv_heads, d, lens, &mut rng);
        let tables: Vec<_> = seqs.iter().map(|&s| cache.table(s).unwrap()).collect();
        let storage = cache.storage();
        let (k_pool, v_pool) = flat_pools(storage, blocks, kv_heads, d);
        let max_blocks = tables.iter().map(|t| t.blocks().len()).max().unwrap();
        let mut table = vec![0i32; lens.len() * max_blocks];
        for (i, t) in tables.iter().enumerate() {
            for (j, b) in t.blocks().iter().enumerate() {
                table[i * max_blocks + j] = b.0 as i32;
            }
        }
        let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let q: Vec<f32> = (0..lens.len() * q_heads * d)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let (dk, dv) = (stream.clone_htod(&k_pool).unwrap(), stream.clone_htod(&v_pool).unwrap());
        let (dt, dl) = (stream.clone_htod(&table).unwrap(), stream.clone_htod(&lens_i).unwrap());
        let dq = stream.clone_htod(&q).unwrap();
        let view = PagedKvView {
            keys: &dk,
            values: Some(&dv),
            kv_heads,
            block_size: 64,
            head_dim: d,
            value_dim: d,
            block_table: &dt,
            offload: None,
            max_blocks,
            lens: &dl,
        };
        let mut scratch = DecodeScratch::new(&ops).unwrap();

        for policy in [Policy::Dense, Policy::Tls] {
            let cfg = SparseConfig {
                policy,
                token_topk: 256,
                block_topk: 16,
                dense_below: 0,
                ..SparseConfig::default()
            };
            let mut want = vec![0.0f32; q.len()];
            let report = decode(storage, &tables, 0, &q, &shape, &cfg, &mut want).unwrap();
            let lists = (policy == Policy::Tls).then(|| {
                let max_tokens = report.heads.iter().map(|h| h.tokens.len()).max().unwrap();
                let mut tokens = vec![0i32; report.heads.len() * max_tokens];
                let counts: Vec<i32> = report.heads.iter().map(|h| h.tokens.len() as i32).collect();
                for (i, h) in report.heads.iter().enumerate() {
                    for (j, &t) in h.tokens.iter().enumerate() {
                        tokens[i * max_tokens + j] = t as i32;
                    }
                }
                (
                    stream.clone_htod(&tokens).unwrap(),
                    stream.clone_htod(&counts).unwrap(),
                    max_tokens,
                )
            });
            let lists_view = lists.as_ref().map(|(t, c, m)| TokenLists {
                tokens: t,
                counts: c,
                max_tokens: *m,
            });
            // The same cache as the offload engine lays it out: about half
            // the (block, head) units copied into resident slots (in shuffled
            // order), the rest read in place from the "host" pools (here the
            // device pools stand in for mapped host memory).
            let unit = 64 * d;
            let units = blocks * kv_heads;
            let mut unit_slots = vec![-1i32; units];
            let mut slot_k = Vec::new();
            let mut slot_v = Vec::new();
            let mut order: Vec<usize> = (0..units).collect();
            order.shuffle(&mut rng);
            for &u in &order {
                if rng.random_bool(0.5) {
                    unit_slots[u] = (slot_k.len() / unit) as i32;
                    slot_k.extend_from_slice(&k_pool[u * unit..(u + 1) * unit]);
                    slot_v.extend_from_slice(&v_pool[u * unit..(u + 1) * unit]);
                }
            }
            slot_k.resize(slot_k.len().max(unit), bf16::ZERO);
            slot_v.resize(slot_v.len().max(unit), bf16::ZERO);
            let (dsk, dsv) = (stream.clone_htod(&slot_k).unwrap(), stream.clone_htod(&slot_v).unwrap());
            let dus = stream.clone_htod(&unit_slots).unwrap();
            // The same lookup per (sequence, KV head) row and logical block,
            // as the offload resolver writes it: slot, or -(unit + 1) in place.
            let rows = lens.len() * kv_heads;
            let mut row_slots = vec![0i32; rows * max_blocks];
            for row in 0..rows {
                let (seq, head) = (row / kv_heads, row % kv_heads);
                for b in 0..max_blocks {
                    let u = table[seq * max_blocks + b] as usize * kv_heads + head;
                    row_slots[row * max_blocks + b] = if unit_slots[u] >= 0 {
                        unit_slots[u]
                    } else {
                        -(u as i32) - 1
                    };
                }
            }
            let drs = stream.clone_htod(&row_slots).unwrap();
            for (lookup, name) in [
                (SlotLookup::ByUnit(&dus), "by unit"),
                (SlotLookup::ByRow(&drs), "by row"),
            ] {
                // A row table holds the selected blocks only: refused for dense.
                let by_row = matches!(lookup, SlotLookup::ByRow(_));
                let slot_view = PagedKvView {
                    keys: &dsk,
                    values: Some(&dsv),
                    offload: Some(OffloadedKv {
                        slots: lookup,
                        host_keys: dk.device_ptr(&stream).0,
                        host_values: dv.device_ptr(&stream).0,
                    }),
                    ..view
                };
                let mut via_slots = stream.clone_htod(&vec![f32::NAN; q.len()]).unwrap();
                let ran = ops.decode_attention(
                    &dq,
                    &slot_view,
                    lists_view.as_ref(),
                    q_heads,
                    shape.scale,
                    5,
                    &mut scratch,
                    &mut via_slots,
                );
                if by_row && lists_view.is_none() {
                    let err = ran.unwrap_err().to_string();
                    assert!(err.contains("selected blocks only"), "{err}");
                    continue;
                }
                ran.unwrap();
                let err = relative_l2(&stream.clone_dtoh(&via_slots).unwrap(), &want);
                assert!(err <= 1e-2, "{policy} offloaded layout, slots {name}: rel err {err}");
            }
            for splits in [1usize, 7, 32] {
                let mut out = stream.clone_htod(&vec![f32::NAN; q.len()]).unwrap();
                ops.decode_attention(
                    &dq,
                    &view,
                    lists_view.as_ref(),
                    q_heads,
                    shape.scale,
                    splits,
                    &mut scratch,
                    &mut out,
                )
                .unwrap();
                let got = stream.clone_dtoh(&out).unwrap();
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{policy} d{d} g{}: non-finite",
                    q_heads / kv_heads
                );
                let err = relative_l2(&got, &want);
                println!("{policy} d{d} heads {q_heads}/{kv_heads} splits {splits}: rel err {err:.2e}");
                assert!(
                    err <= 1e-2,
                    "{policy} d{d} heads {q_heads}/{kv_heads} splits {splits}: rel err {err}"
                );
            }
        }
    }
}

type Cache = PagedKvCache<HostKvStorage>;

/// A one-layer bf16 cache holding random tokens for sequences of `lens`.
fn random_cache(kv_heads: usize, d: usize, lens: &[usize], rng: &mut StdRng) -> (Cache, Vec<SeqId>, usize) {
    let blocks: usize = lens.iter().map(|l| l.div_ceil(64)).sum();
    let config = CacheConfig {
        kv_dtype: KvDType::BF16,
        ..CacheConfig::gqa(1, kv_heads, d, blocks)
    };
    let mut cache = PagedKvCache::new(HostKvStorage::new(&config, LabelChannels::leading(&config)).unwrap()).unwrap();
    let seqs = lens
        .iter()
        .map(|&len| {
            let s = cache.add_sequence();
            let k: Vec<f32> = (0..len * kv_heads * d)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let v: Vec<f32> = (0..len * kv_heads * d)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            cache.append(s, &[&k], &[&v]).unwrap();
            s
        })
        .collect();
    (cache, seqs, blocks)
}

/// The host pools of layer 0, flattened in the GPU layout.
fn flat_pools(storage: &HostKvStorage, blocks: usize, kv_heads: usize, d: usize) -> (Vec<bf16>, Vec<bf16>) {
    let mut k_pool = vec![bf16::ZERO; blocks * kv_heads * 64 * d];
    let mut v_pool = k_pool.clone();
    let mut row = vec![0.0f32; d];
    for b in 0..blocks {
        for h in 0..kv_heads {
            for slot in 0..64 {
                let at = ((b * kv_heads + h) * 64 + slot) * d;
                storage.keys(0, BlockId(b as u32), h).read(slot, &mut row);
                k_pool[at..at + d]
                    .iter_mut()
                    .zip(&row)
                    .for_each(|(o, v)| *o = bf16::from_f32(*v));
                storage.values(0, BlockId(b as u32), h).read(slot, &mut row);
                v_pool[at..at + d]
                    .iter_mut()
                    .zip(&row)
                    .for_each(|(o, v)| *o = bf16::from_f32(*v));
            }
        }
    }
    (k_pool, v_pool)
}

#[test]
fn prefill_kernel_matches_cpu() {
    let Some(ops) = gpu() else { return };
    let stream = ops.device().stream().clone();
    let mut rng = StdRng::from_os_rng();
    for &(q_heads, kv_heads, d, start, n) in &[
        (32usize, 8usize, 128usize, 0usize, 777usize),
        (32, 8, 128, 1000, 300),
        // A short chunk at a long offset: the keys split across CTAs.
        (32, 8, 128, 6000, 64),
        (14, 2, 64, 200, 130),
        (8, 8, 64, 0, 64),
    ] {
        let shape = AttnShape::gqa(q_heads, kv_heads, d);
        let (cache, seqs, blocks) = random_cache(kv_heads, d, &[start + n], &mut rng);
        let table = cache.table(seqs[0]).unwrap();
        let q: Vec<f32> = (0..n * q_heads * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut want = vec![0.0f32; q.len()];
        prefill(cache.storage(), table, 0, start, &q, &shape, &mut want).unwrap();
        let (k_pool, v_pool) = flat_pools(cache.storage(), blocks, kv_heads, d);
        let (dk, dv) = (stream.clone_htod(&k_pool).unwrap(), stream.clone_htod(&v_pool).unwrap());
        let ids: Vec<i32> = table.blocks().iter().map(|b| b.0 as i32).collect();
        let dt = stream.clone_htod(&ids).unwrap();
        let lens = stream.clone_htod(&[(start + n) as i32]).unwrap();
        let view = PagedKvView {
            keys: &dk,
            values: Some(&dv),
            kv_heads,
            block_size: 64,
            head_dim: d,
            value_dim: d,
            block_table: &dt,
            offload: None,
            max_blocks: ids.len(),
            lens: &lens,
        };
        let dq = stream.clone_htod(&q).unwrap();
        let mut out = stream.clone_htod(&vec![f32::NAN; q.len()]).unwrap();
        ops.prefill_attention(&dq, &view, start, q_heads, shape.scale, &mut out)
            .unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        assert!(got.iter().all(|v| v.is_finite()), "prefill d{d}: non-finite");
        let err = relative_l2(&got, &want);
        println!("prefill heads {q_heads}/{kv_heads} d{d} start {start} n {n}: rel err {err:.2e}");
        assert!(
            err <= 1e-2,
            "prefill heads {q_heads}/{kv_heads} d{d} start {start} n {n}: rel err {err}"
        );
    }
}
