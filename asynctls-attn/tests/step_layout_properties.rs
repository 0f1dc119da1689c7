//! Properties of the per-step layout a GPU backend uploads
//! (`asynctls_attn::step_layout`), over random sequences of prefill chunks,
//! decode steps, forks and frees on a paged cache. The offloaded cache's
//! bounds merge reads exactly these: each touched block's run of new rows
//! (`starts`) and its rows once written (`fills`), from which it tells
//! whether the block had rows before the step.

use asynctls_attn::step_layout::step_layout;
use asynctls_attn::{reserve_decode, Sequences};
use asynctls_kvcache::{CacheConfig, HostKvStorage, KvDType, LabelChannels, PagedKvCache, SeqId};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// A new sequence prefilled in chunks of these sizes.
    Prompt(Vec<usize>),
    /// One decode step of the live sequences whose index bit is set.
    Decode(u32),
    /// Fork live sequence i % live.
    Fork(usize),
    /// Free live sequence i % live.
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        prop::collection::vec(1usize..150, 1..4).prop_map(Op::Prompt),
        any::<u32>().prop_map(Op::Decode),
        any::<usize>().prop_map(Op::Fork),
        any::<usize>().prop_map(Op::Free),
    ]
}

/// The layout of the step that reserved `positions` for `token_seqs`
/// checked against the tables it was built from.
fn check(cache: &PagedKvCache<HostKvStorage>, seqs: &[SeqId], token_seqs: &[SeqId], positions: &[usize]) {
    let bs = cache.config().block_size;
    let width = if seqs.len() > 1 { Some(64) } else { None };
    let l = step_layout(cache, seqs, token_seqs, positions, width).unwrap();
    assert_eq!(l.slots.len(), positions.len());
    assert_eq!(l.starts.len(), l.blocks.len() + 1);
    assert_eq!(l.fills.len(), l.blocks.len());
    assert_eq!((l.starts[0], *l.starts.last().unwrap()), (0, positions.len() as i32));
    for (i, (&s, &p)) in token_seqs.iter().zip(positions).enumerate() {
        let block = cache.table(s).unwrap().blocks()[p / bs].0 as i32;
        assert_eq!(l.slots[i], block * bs as i32 + (p % bs) as i32, "row {i}");
    }
    for b in 0..l.blocks.len() {
        let (first, end) = (l.starts[b] as usize, l.starts[b + 1] as usize);
        assert!(first < end, "an empty run");
        // Every row of the run lands in the block, at consecutive offsets.
        for r in first..end {
            assert_eq!(l.slots[r] / bs as i32, l.blocks[b], "run {b} row {r}");
            if r > first {
                assert_eq!(l.slots[r], l.slots[r - 1] + 1, "run {b}: rows out of order");
            }
        }
        // Runs are maximal: the next run is another block.
        if b + 1 < l.blocks.len() {
            assert_ne!(l.blocks[b], l.blocks[b + 1]);
        }
        // The fill is the last new row's offset + 1, and the rows before the
        // step are exactly the first new row's offset (what the merge uses).
        let (first_offset, last_offset) = (l.slots[first] % bs as i32, l.slots[end - 1] % bs as i32);
        assert_eq!(l.fills[b], last_offset + 1);
        assert_eq!(l.fills[b] - (end - first) as i32, first_offset);
    }
    for (i, &s) in seqs.iter().enumerate() {
        let t = cache.table(s).unwrap();
        assert_eq!(l.lens[i] as usize, t.len());
        for (j, b) in t.blocks().iter().enumerate() {
            assert_eq!(l.table[i * l.max_blocks + j], b.0 as i32);
        }
    }
    assert!(
        l.max_blocks
            >= seqs
                .iter()
                .map(|&s| cache.table(s).unwrap().blocks().len())
                .max()
                .unwrap_or(0)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn step_layouts_describe_the_rows_they_place(ops in prop::collection::vec(op(), 1..40)) {
        let config = CacheConfig { kv_dtype: KvDType::F32, ..CacheConfig::gqa(1, 2, 16, 512) };
        let channels = LabelChannels::leading(&config);
        let mut cache = PagedKvCache::new(HostKvStorage::new(&config, channels).unwrap()).unwrap();
        let mut live: Vec<SeqId> = vec![];
        for op in ops {
            match op {
                Op::Prompt(chunks) => {
                    let seq = cache.add_sequence();
                    for n in chunks {
                        let Ok((start, positions)) = cache.reserve_prefill(seq, n, 4096) else { break };
                        prop_assert_eq!(positions[0], start);
                        check(&cache, &[seq], &vec![seq; n], &positions);
                    }
                    live.push(seq);
                }
                Op::Decode(mask) => {
                    let batch: Vec<SeqId> =
                        live.iter().enumerate().filter(|(i, _)| mask >> (i % 32) & 1 == 1).map(|(_, &s)| s).collect();
                    if batch.is_empty() {
                        continue;
                    }
                    let Ok(positions) = reserve_decode(&mut cache, &batch, 4096) else { continue };
                    check(&cache, &batch, &batch, &positions);
                }
                Op::Fork(i) if !live.is_empty() => {
                    if let Ok(f) = cache.fork(live[i % live.len()]) {
                        live.push(f);
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let s = live.swap_remove(i % live.len());
                    cache.free(s).unwrap();
                }
                _ => {}
            }
        }
    }
}
