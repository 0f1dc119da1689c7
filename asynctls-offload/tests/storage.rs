//! asynctls-attn's two-level sparse decode, unchanged, over the offloaded
//! storage (host tier + resident slots behind the kvcache storage trait) and
//! over plain host storage, on the same random caches and drifting queries,
//! GQA and MLA: the same selections and outputs (relative error <= 1e-6:
//! resident copies are exact f32 images of the bf16 cache), K/V reads served
//! from the host tier while nothing is resident, and from slots once the
//! previous step's blocks were hinted as the next step's prefetch.

use asynctls_attn::metrics::relative_l2;
use asynctls_attn::{decode, AttnShape, Policy, SparseConfig};
use asynctls_kvcache::{BlockId, CacheConfig, HostKvStorage, KvDType, KvStorage, LabelChannels, PagedKvCache, SeqId};
use asynctls_offload::OffloadedStorage;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn fill<S: asynctls_kvcache::KvStorage>(
    cache: &mut PagedKvCache<S>,
    lens: &[usize],
    kd: usize,
    vd: usize,
    heads: usize,
    seed: u64,
) -> Vec<SeqId> {
    let mut rng = StdRng::seed_from_u64(seed);
    lens.iter()
        .map(|&len| {
            let s = cache.add_sequence();
            let k: Vec<f32> = (0..len * heads * kd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let v: Vec<f32> = (0..len * heads * vd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            cache.append(s, &[&k], &[&v]).unwrap();
            s
        })
        .collect()
}

#[test]
fn sparse_decode_runs_unchanged_over_offloaded_storage() {
    for (shape, mla) in [
        (AttnShape::gqa(16, 4, 64), false),
        (AttnShape::mla(8, 128, 32, 0.08), true),
    ] {
        let lens = [3000usize, 5000];
        let blocks: usize = lens.iter().map(|l| l.div_ceil(64)).sum();
        let mut config = if mla {
            CacheConfig::mla(1, shape.value_dim, shape.key_dim - shape.value_dim, blocks)
        } else {
            CacheConfig::gqa(1, shape.kv_heads, shape.key_dim, blocks)
        };
        config.kv_dtype = KvDType::BF16;
        let vd = if mla { 0 } else { shape.value_dim };
        let channels = LabelChannels::leading(&config);
        let mut host = PagedKvCache::new(HostKvStorage::new(&config, channels.clone()).unwrap()).unwrap();
        // The storage trait's hint names blocks (every head of each), so
        // room for the union of the heads' blocks, for every head.
        let slots = lens.len() * shape.kv_heads * shape.kv_heads * (12 + 3);
        let offloaded_storage = OffloadedStorage::new(HostKvStorage::new(&config, channels).unwrap(), slots);
        let mut offloaded = PagedKvCache::new(offloaded_storage).unwrap();
        let seqs_h = fill(&mut host, &lens, shape.key_dim, vd, shape.kv_heads, 5);
        let seqs_o = fill(&mut offloaded, &lens, shape.key_dim, vd, shape.kv_heads, 5);
        let cfg = SparseConfig {
            policy: Policy::Tls,
            block_topk: 12,
            token_topk: 256,
            dense_below: 0,
            ..SparseConfig::default()
        };
        let mut rng = StdRng::seed_from_u64(9);
        let mut q: Vec<f32> = (0..lens.len() * shape.q_heads * shape.key_dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let out_len = lens.len() * shape.q_heads * shape.value_dim;
        let mut reads = Vec::new();
        for _step in 0..5 {
            let th: Vec<_> = seqs_h.iter().map(|&s| host.table(s).unwrap()).collect();
            let to: Vec<_> = seqs_o.iter().map(|&s| offloaded.table(s).unwrap()).collect();
            let (mut a, mut b) = (vec![0.0f32; out_len], vec![0.0f32; out_len]);
            let ra = decode(host.storage(), &th, 0, &q, &shape, &cfg, &mut a).unwrap();
            let rb = decode(offloaded.storage(), &to, 0, &q, &shape, &cfg, &mut b).unwrap();
            for (x, y) in ra.heads.iter().zip(&rb.heads) {
                assert_eq!(
                    x.tokens, y.tokens,
                    "{shape:?}: the selection reads only metadata and must not change"
                );
            }
            let err = relative_l2(&b, &a);
            assert!(err <= 1e-6, "{shape:?}: rel err {err}");
            reads.push(offloaded.storage().take_reads());
            // One-step lag: this step's blocks are the next step's prefetch.
            let mut hint: Vec<BlockId> = Vec::new();
            for (i, h) in rb.heads.iter().enumerate() {
                let table = to[i / shape.kv_heads];
                hint.extend(h.blocks.iter().map(|&b| table.blocks()[b as usize]));
            }
            hint.sort_unstable();
            hint.dedup();
            drop(th);
            drop(to);
            offloaded.storage_mut().prefetch_hint(0, &hint);
            for v in q.iter_mut() {
                *v += 0.02 * rng.random_range(-1.0f32..1.0);
            }
        }
        println!("{shape:?}: (hits, misses) per step {reads:?}");
        assert_eq!(reads[0].0, 0, "nothing is resident before the first hint");
        assert!(reads[0].1 > 0);
        let later_hits: usize = reads[1..].iter().map(|r| r.0).sum();
        let later_misses: usize = reads[1..].iter().map(|r| r.1).sum();
        assert!(
            later_hits > 4 * later_misses,
            "{shape:?}: prefetch barely hit: {reads:?}"
        );
    }
}

#[test]
fn eviction_keeps_the_recently_selected_block_not_the_first_loaded() {
    // Two resident units, one KV head: A and B are loaded in that order,
    // A is selected again, then C needs room. Least recently selected evicts
    // B; first-in-first-out would evict A.
    let mut config = CacheConfig::gqa(1, 1, 64, 4);
    config.label_channels = 32;
    let host = HostKvStorage::new(&config, LabelChannels::leading(&config)).unwrap();
    let mut storage = OffloadedStorage::new(host, 2);
    let (a, b, c) = (BlockId(0), BlockId(1), BlockId(2));
    let key = vec![0.5f32; 64];
    for block in [a, b, c] {
        storage.write_token(0, block, 0, &key, &key).unwrap();
    }
    use asynctls_kvcache::HostReadable;
    for hint in [a, b, a, c] {
        storage.prefetch_hint(0, &[hint]);
    }
    let _ = storage.take_reads();
    storage.keys(0, a, 0);
    assert_eq!(storage.take_reads(), (1, 0), "A (selected last but one) was evicted");
    storage.keys(0, b, 0);
    assert_eq!(storage.take_reads(), (0, 1), "B (never selected again) stayed resident");
    storage.keys(0, c, 0);
    assert_eq!(storage.take_reads(), (1, 0), "C was not prefetched");
}
