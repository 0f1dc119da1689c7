//! The CUDA decode-attention kernel against the CPU decode (its twin) on
//! fresh random caches: dense, and over the token lists that the CPU's
//! two-level selection chose, also through per-(sequence, head) slot tables
//! as the offload engine lays them out. bf16 K/V on both sides, f32 accumulation;
//! relative L2 error <= 1e-3. Prints `skipped: no CUDA device` without a GPU.

use asynctls_attn::metrics::relative_l2;
use asynctls_attn::{decode, AttnShape, Policy, SparseConfig};
use asynctls_kernels::cuda::{CudaOps, DecodeScratch, PagedKvView, TokenLists};
use asynctls_kvcache::{BlockId, CacheConfig, HostKvStorage, HostReadable, KvDType, LabelChannels, PagedKvCache};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

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
        let blocks: usize = lens.iter().map(|l: &usize| l.div_ceil(64)).sum();
        let config = CacheConfig {
            kv_dtype: KvDType::BF16,
            ..CacheConfig::gqa(1, kv_heads, d, blocks)
        };
        let mut cache =
            PagedKvCache::new(HostKvStorage::new(&config, LabelChannels::leading(&config)).unwrap()).unwrap();
        let seqs: Vec<_> = lens
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
        let tables: Vec<_> = seqs.iter().map(|&s| cache.table(s).unwrap()).collect();
        let storage = cache.storage();
        // The host pools, flattened in the GPU layout.
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
            table_per_row: false,
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
            // The same pools re-laid per (sequence, KV head) into slots, as
            // the offload engine's resident pool holds them, read through a
            // table per row: the same output.
            let rows = lens.len() * kv_heads;
            let unit = 64 * d;
            let mut slot_k = vec![bf16::ZERO; rows * max_blocks * unit];
            let mut slot_v = slot_k.clone();
            let mut slot_table = vec![0i32; rows * max_blocks];
            for (i, t) in tables.iter().enumerate() {
                for h in 0..kv_heads {
                    let row = i * kv_heads + h;
                    for (j, b) in t.blocks().iter().enumerate() {
                        // Slots in reverse so slot order differs from block order.
                        let slot = rows * max_blocks - 1 - (row * max_blocks + j);
                        slot_table[row * max_blocks + j] = slot as i32;
                        let from = (b.index() * kv_heads + h) * unit;
                        slot_k[slot * unit..(slot + 1) * unit].copy_from_slice(&k_pool[from..from + unit]);
                        slot_v[slot * unit..(slot + 1) * unit].copy_from_slice(&v_pool[from..from + unit]);
                    }
                }
            }
            let (dsk, dsv) = (stream.clone_htod(&slot_k).unwrap(), stream.clone_htod(&slot_v).unwrap());
            let dst = stream.clone_htod(&slot_table).unwrap();
            let slot_view = PagedKvView {
                keys: &dsk,
                values: Some(&dsv),
                block_table: &dst,
                table_per_row: true,
                ..view
            };
            let mut via_slots = stream.clone_htod(&vec![f32::NAN; q.len()]).unwrap();
            ops.decode_attention(
                &dq,
                &slot_view,
                lists_view.as_ref(),
                q_heads,
                shape.scale,
                5,
                &mut scratch,
                &mut via_slots,
            )
            .unwrap();
            let err = relative_l2(&stream.clone_dtoh(&via_slots).unwrap(), &want);
            assert!(err <= 1e-3, "{policy} per-row slot tables: rel err {err}");
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
                assert!(
                    err <= 1e-3,
                    "{policy} d{d} heads {q_heads}/{kv_heads} splits {splits}: rel err {err}"
                );
            }
        }
    }
}
