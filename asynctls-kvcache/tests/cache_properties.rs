//! Invariants of the paged cache over random sequences of operations:
//! appends (one or many tokens), forks, frees, a full pool. A shadow model
//! keeps every sequence's tokens; after each step the cache must serve
//! exactly those tokens, with block min/max equal to brute force and labels
//! within the INT4 bound.

use asynctls_kvcache::{
    bf16_at_least, bf16_at_most, label, CacheConfig, CacheError, HostKvStorage, HostReadable, KvDType, LabelChannels,
    PagedKvCache, SeqId, ValueLayout,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    NewSeq,
    Append { seq: usize, tokens: usize, seed: u32 },
    Fork(usize),
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::NewSeq),
        5 => (any::<usize>(), 1usize..40, any::<u32>()).prop_map(|(seq, tokens, seed)| Op::Append { seq, tokens, seed }),
        1 => any::<usize>().prop_map(Op::Fork),
        1 => any::<usize>().prop_map(Op::Free),
    ]
}

/// Deterministic pseudo-random values with a spread of magnitudes per channel.
fn token_values(seed: u32, n: usize) -> Vec<f32> {
    let mut x = seed as u64 | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
            u * (1.0 + (i % 7) as f32)
        })
        .collect()
}

/// One token's key and value as stored.
type StoredToken = (Vec<f32>, Vec<f32>);

struct Shadow {
    /// Per sequence: per layer, every token.
    tokens: Vec<(SeqId, Vec<Vec<StoredToken>>)>,
}

fn config(kv_dtype: KvDType, mla: bool) -> CacheConfig {
    if mla {
        CacheConfig {
            block_size: 8,
            kv_dtype,
            label_channels: 8,
            ..CacheConfig::mla(2, 12, 4, 24)
        }
    } else {
        CacheConfig {
            block_size: 8,
            kv_dtype,
            label_channels: 6,
            ..CacheConfig::gqa(2, 2, 16, 24)
        }
    }
}

fn round(kv_dtype: KvDType, v: &[f32]) -> Vec<f32> {
    match kv_dtype {
        KvDType::F32 => v.to_vec(),
        KvDType::BF16 => v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
    }
}

fn check_sequence(
    cache: &PagedKvCache<HostKvStorage>,
    seq: SeqId,
    layers: &[Vec<StoredToken>],
) -> Result<(), TestCaseError> {
    let c = cache.config();
    let table = cache.table(seq).unwrap();
    let storage = cache.storage();
    let n = layers[0].len();
    prop_assert_eq!(table.len(), n);
    prop_assert_eq!(table.blocks().len(), n.div_ceil(c.block_size));
    let (kd, vd) = (c.key_dim, c.value_dim());
    let mut row = vec![0.0; kd];
    let mut picked = vec![0.0; c.label_channels];
    let mut back = vec![0.0; c.label_channels];
    for (layer, toks) in layers.iter().enumerate() {
        for (b, &block) in table.blocks().iter().enumerate() {
            let in_block = &toks[b * c.block_size..((b + 1) * c.block_size).min(n)];
            for head in 0..c.kv_heads {
                let keys = storage.keys(layer, block, head);
                let values = storage.values(layer, block, head);
                let (max, min) = storage.key_bounds(layer, block, head);
                let (labels, params) = storage.labels(layer, block, head);
                let channels = storage.label_channels(layer, head);
                for ch in 0..kd {
                    let want_max = in_block
                        .iter()
                        .map(|t| t.0[head * kd + ch])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let want_min = in_block
                        .iter()
                        .map(|t| t.0[head * kd + ch])
                        .fold(f32::INFINITY, f32::min);
                    // The bounds are the brute-force max/min rounded outward
                    // to bf16: the nearest bf16 values that still hold
                    // every stored key (equal to it for bf16 keys).
                    prop_assert_eq!(
                        max[ch],
                        bf16_at_least(want_max),
                        "layer {} block {} head {} ch {}",
                        layer,
                        b,
                        head,
                        ch
                    );
                    prop_assert_eq!(min[ch], bf16_at_most(want_min));
                    prop_assert!(max[ch] >= want_max && min[ch] <= want_min);
                    prop_assert_eq!(half::bf16::from_f32(max[ch]).to_f32(), max[ch], "max is a bf16 value");
                    prop_assert_eq!(half::bf16::from_f32(min[ch]).to_f32(), min[ch], "min is a bf16 value");
                    if c.kv_dtype == KvDType::BF16 {
                        prop_assert_eq!((max[ch], min[ch]), (want_max, want_min), "bf16 keys round exactly");
                    }
                }
                for (slot, t) in in_block.iter().enumerate() {
                    keys.read(slot, &mut row);
                    prop_assert_eq!(&row[..], &t.0[head * kd..(head + 1) * kd]);
                    let mut v = vec![0.0; vd];
                    values.read(slot, &mut v);
                    let want_v = match c.values {
                        ValueLayout::Separate { .. } => &t.1[head * vd..(head + 1) * vd],
                        ValueLayout::KeyPrefix { dim } => &t.0[head * kd..head * kd + dim],
                    };
                    prop_assert_eq!(&v[..], want_v);
                    for (p, &ch) in picked.iter_mut().zip(channels) {
                        *p = t.0[head * kd + ch as usize];
                    }
                    let r2 = c.label_channels / 2;
                    let [scale, zero] = params[slot];
                    label::dequantize(&labels[slot * r2..(slot + 1) * r2], scale, zero, &mut back);
                    for (x, y) in picked.iter().zip(&back) {
                        prop_assert!(
                            (x - y).abs() <= scale.to_f32() / 2.0 * (1.0 + 1e-5) + 1e-6,
                            "label {x} vs {y}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn run_ops(ops: Vec<Op>, kv_dtype: KvDType, mla: bool) -> Result<(), TestCaseError> {
    let c = config(kv_dtype, mla);
    let channels = if mla {
        LabelChannels::leading(&c)
    } else {
        // Non-leading channels: the label must follow the configuration.
        LabelChannels::new(vec![vec![vec![15, 3, 9, 0, 7, 12], vec![1, 2, 4, 8, 10, 14]]; 2])
    };
    let storage = HostKvStorage::new(&c, channels).unwrap();
    let mut cache = PagedKvCache::new(storage).unwrap();
    let mut shadow = Shadow { tokens: Vec::new() };
    let key_w = c.kv_heads * c.key_dim;
    let val_w = c.kv_heads * c.value_dim();
    for op in ops {
        match op {
            Op::NewSeq => {
                let id = cache.add_sequence();
                shadow.tokens.push((id, vec![Vec::new(); c.num_layers]));
            }
            Op::Append { seq, tokens, seed } if !shadow.tokens.is_empty() => {
                let i = seq % shadow.tokens.len();
                let id = shadow.tokens[i].0;
                let free_before = cache.allocator().num_free();
                let keys: Vec<Vec<f32>> = (0..c.num_layers)
                    .map(|l| token_values(seed ^ (l as u32 * 7919), tokens * key_w))
                    .collect();
                let vals: Vec<Vec<f32>> = (0..c.num_layers)
                    .map(|l| token_values(seed ^ (l as u32 * 104729) ^ 1, tokens * val_w))
                    .collect();
                let kr: Vec<&[f32]> = keys.iter().map(|v| &v[..]).collect();
                let vr: Vec<&[f32]> = vals.iter().map(|v| &v[..]).collect();
                match cache.append(id, &kr, &vr) {
                    Ok(range) => {
                        prop_assert_eq!(range.len(), tokens);
                        for l in 0..c.num_layers {
                            for t in 0..tokens {
                                let k = round(kv_dtype, &keys[l][t * key_w..(t + 1) * key_w]);
                                let v = round(kv_dtype, &vals[l][t * val_w..(t + 1) * val_w]);
                                shadow.tokens[i].1[l].push((k, v));
                            }
                        }
                    }
                    Err(CacheError::OutOfBlocks { .. }) => {
                        // Nothing lost, nothing half-done.
                        prop_assert_eq!(cache.allocator().num_free(), free_before);
                        prop_assert_eq!(cache.table(id).unwrap().len(), shadow.tokens[i].1[0].len());
                    }
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
            }
            Op::Fork(seq) if !shadow.tokens.is_empty() => {
                let i = seq % shadow.tokens.len();
                let id = cache.fork(shadow.tokens[i].0).unwrap();
                let copy = shadow.tokens[i].1.clone();
                shadow.tokens.push((id, copy));
            }
            Op::Free(seq) if !shadow.tokens.is_empty() => {
                let i = seq % shadow.tokens.len();
                let (id, _) = shadow.tokens.swap_remove(i);
                cache.free(id).unwrap();
                prop_assert!(cache.table(id).is_err());
            }
            _ => {}
        }
        // Every live block is owned, and the pool conserves blocks.
        let mut owners = vec![0u32; c.num_blocks];
        for (id, _) in &shadow.tokens {
            for b in cache.table(*id).unwrap().blocks() {
                owners[b.index()] += 1;
            }
        }
        for (b, &o) in owners.iter().enumerate() {
            prop_assert_eq!(cache.allocator().ref_count(asynctls_kvcache::BlockId(b as u32)), o);
        }
        let used = owners.iter().filter(|&&o| o > 0).count();
        prop_assert_eq!(used + cache.allocator().num_free(), c.num_blocks);
        for (id, layers) in &shadow.tokens {
            check_sequence(&cache, *id, layers)?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gqa_cache_serves_what_was_written_f32(ops in prop::collection::vec(op(), 1..40)) {
        run_ops(ops, KvDType::F32, false)?;
    }

    #[test]
    fn gqa_cache_serves_what_was_written_bf16(ops in prop::collection::vec(op(), 1..40)) {
        run_ops(ops, KvDType::BF16, false)?;
    }

    #[test]
    fn mla_cache_serves_what_was_written(ops in prop::collection::vec(op(), 1..40)) {
        run_ops(ops, KvDType::BF16, true)?;
    }
}

#[test]
fn writes_must_be_in_order_and_reserved() {
    let c = config(KvDType::F32, false);
    let mut cache = PagedKvCache::new(HostKvStorage::new(&c, LabelChannels::leading(&c)).unwrap()).unwrap();
    let s = cache.add_sequence();
    cache.reserve(s, 3).unwrap();
    let k = vec![0.0; c.kv_heads * c.key_dim];
    let v = vec![0.0; c.kv_heads * c.value_dim()];
    let err = cache.write(s, 0, 1, &k, &v).unwrap_err().to_string();
    assert!(err.contains("continue at position 0"), "{err}");
    cache.write(s, 0, 0, &k, &v).unwrap();
    // A fork needs every layer written.
    let err = cache.fork(s).unwrap_err().to_string();
    assert!(err.contains("cannot be forked"), "{err}");
    let err = cache.write(s, 5, 0, &k, &v).unwrap_err().to_string();
    assert!(err.contains("layer 5"), "{err}");
    let err = cache.write(s, 0, 1, &k[1..], &v).unwrap_err().to_string();
    assert!(err.contains("expected"), "{err}");
}

#[test]
fn bad_label_channels_are_rejected() {
    let c = config(KvDType::F32, false);
    let dup = LabelChannels::new(vec![vec![vec![0, 0, 1, 2, 3, 4], vec![0, 1, 2, 3, 4, 5]]; 2]);
    let err = HostKvStorage::new(&c, dup).unwrap_err().to_string();
    assert!(err.contains("repeated"), "{err}");
    let odd = CacheConfig {
        label_channels: 5,
        ..c.clone()
    };
    assert!(HostKvStorage::new(&odd, LabelChannels::leading(&odd)).is_err());
}

#[test]
fn memory_report_counts_each_part() {
    let gqa = CacheConfig::gqa(36, 8, 128, 4);
    let cache = PagedKvCache::new(HostKvStorage::new(&gqa, LabelChannels::leading(&gqa)).unwrap()).unwrap();
    let m = cache.memory_report();
    // Qwen3-8B: 36 layers x 8 heads x 128 x bf16, K and V.
    assert_eq!(m.kv_bytes_per_token(), 36 * 8 * 128 * 2 * 2);
    assert_eq!(m.label_bytes_per_token, 36 * 8 * (16 + 4));
    assert_eq!(m.metadata_bytes_per_token, (36 * 8 * 2 * 128 * 4) as f64 / 64.0);
    let mla = CacheConfig::mla(47, 512, 64, 4);
    let cache = PagedKvCache::new(HostKvStorage::new(&mla, LabelChannels::leading(&mla)).unwrap()).unwrap();
    let m = cache.memory_report();
    // GLM-4.7-Flash stores only the latent and the rope key.
    assert_eq!(m.kv_bytes_per_token(), 47 * 576 * 2);
    assert_eq!(m.value_bytes_per_token, 0);
}

proptest! {
    /// The outward roundings give the tightest bf16 values on the right
    /// side of any finite f32 (or infinity).
    #[test]
    fn bf16_outward_rounding_is_tight(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        prop_assume!(!x.is_nan());
        let (up, down) = (bf16_at_least(x), bf16_at_most(x));
        prop_assert!(up >= x && down <= x, "{} -> [{}, {}]", x, down, up);
        for r in [up, down] {
            prop_assert_eq!(half::bf16::from_f32(r).to_f32().to_bits(), r.to_bits());
        }
        // Exact values stay; others land on the two bf16 neighbours of x.
        let order = |v: f32| {
            let b = half::bf16::from_f32(v).to_bits();
            if b & 0x8000 != 0 { !b } else { b | 0x8000 }
        };
        if half::bf16::from_f32(x).to_f32() == x {
            prop_assert_eq!((up, down), (x, x));
        } else {
            prop_assert!(down < x && x < up);
            prop_assert_eq!(order(up), order(down) + 1, "{} and {} are neighbours", down, up);
        }
    }
}
