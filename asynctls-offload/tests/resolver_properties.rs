//! The residency resolver's host twin (the reference the GPU kernels are
//! tested against) on random batches and drifting selections, both
//! predictors: the two tables stay each other's inverse; every attended unit
//! is a hit or a miss and every miss is promoted or counted unplaced; no hit
//! is evicted in its own step, and with the union predictor no unit of the
//! last step either; victims are the least recently selected evictable
//! slots; a pool that holds a step's selection places every
//! miss, so the same selection again is all hits; a block table outside the
//! pool is an error that changes nothing.

mod common;

use std::collections::HashSet;

use asynctls_offload::{PromotePolicy, Residency};
use common::Batch;
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

fn units_of(batch: &Batch, rows: &[Vec<usize>]) -> Vec<usize> {
    let (candidates, counts) = batch.layout(rows);
    let sel = batch.selection(&candidates, &counts);
    (0..batch.rows())
        .flat_map(|row| {
            let seq = row / batch.kv_heads;
            sel.attended_blocks(row)
                .into_iter()
                .map(move |b| batch.table[seq * batch.max_blocks + b] as usize * batch.kv_heads + row % batch.kv_heads)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn residency_invariants_hold_over_random_steps(
        batch_size in 1usize..4,
        kv_heads in 1usize..4,
        block_topk in 1usize..10,
        max_len in 1usize..400,
        slots in 1usize..120,
        max_promote in 1usize..64,
        union in any::<bool>(),
        drift in 0.0f64..0.7,
        steps in 1usize..12,
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let batch = Batch::random(&mut rng, batch_size, kv_heads, block_topk, max_len);
        let policy = if union {
            PromotePolicy::union_of_last_two(max_promote)
        } else {
            PromotePolicy::one_step_lag(max_promote)
        };
        let unit_bytes = 4096;
        let mut table = Residency::new(batch.units(), slots).unwrap();
        let mut rows: Option<Vec<Vec<usize>>> = None;
        let mut previous: HashSet<usize> = HashSet::new();
        for step in 1..=steps as u32 {
            let now = batch.drift(&mut rng, rows.as_deref(), drift);
            let attended = units_of(&batch, &now);
            let (candidates, counts) = batch.layout(&now);
            let before = table.clone();
            let misses = table.resolve(&batch.selection(&candidates, &counts), step).unwrap();
            prop_assert_eq!(misses.len(), batch.rows() * batch.max_entries());
            let resolved = table.stats.since(before.stats);
            prop_assert_eq!(resolved.requested as usize, attended.len());
            prop_assert_eq!(resolved.hits + resolved.misses, resolved.requested);
            let resident_before: HashSet<usize> =
                attended.iter().copied().filter(|&u| before.unit_slot[u] >= 0).collect();
            prop_assert_eq!(resolved.hits as usize, resident_before.len());
            let missed: Vec<usize> = misses.iter().filter(|&&u| u >= 0).map(|&u| u as usize).collect();
            prop_assert_eq!(missed.len(), resolved.misses as usize);
            prop_assert!(missed.iter().all(|u| !resident_before.contains(u)));

            let age = |t: &Residency, slot: usize| {
                if t.slot_unit[slot] < 0 { u32::MAX } else { step - t.slot_last[slot] }
            };
            let ages: Vec<u32> = (0..slots).map(|s| age(&table, s)).collect();
            let copies = table.promote(&misses, step, policy, unit_bytes);
            // Victims are the least recently selected evictable slots.
            let chosen: HashSet<usize> = copies.iter().map(|&(_, s)| s as usize).collect();
            let youngest_victim = chosen.iter().map(|&s| ages[s]).min();
            let oldest_kept = (0..slots)
                .filter(|s| !chosen.contains(s) && ages[*s] >= policy.protect)
                .map(|s| ages[s].min(255))
                .max();
            if let (Some(v), Some(k)) = (youngest_victim, oldest_kept) {
                prop_assert!(v.min(255) >= k, "a victim of age {} while one of age {} stays", v, k);
            }
            prop_assert!(chosen.iter().all(|&s| ages[s] >= policy.protect));
            table.check().map_err(TestCaseError::fail)?;
            let stepped = table.stats.since(before.stats);
            // Free slots go first: no resident unit leaves while one stays free.
            if stepped.evicted > 0 {
                prop_assert!(table.slot_unit.iter().all(|&u| u >= 0), "evicted with a free slot left");
            }
            prop_assert_eq!(stepped.promoted as usize, copies.len());
            prop_assert_eq!(stepped.promoted + stepped.unplaced, stepped.misses);
            prop_assert!(copies.len() <= max_promote);
            prop_assert_eq!(stepped.h2d_bytes as usize, copies.len() * unit_bytes);
            prop_assert!(table.resident() <= slots);
            // The copies are the first misses, in order, each now in its slot.
            for (&(unit, slot), &want) in copies.iter().zip(&missed) {
                prop_assert_eq!(unit as usize, want);
                prop_assert_eq!(table.unit_slot[want], slot as i32);
            }
            // Hits keep their slots; with the union predictor, so does the
            // last step's selection.
            for &u in &resident_before {
                prop_assert_eq!(table.unit_slot[u], before.unit_slot[u]);
            }
            if union {
                for &u in &previous {
                    if before.unit_slot[u] >= 0 {
                        prop_assert_eq!(table.unit_slot[u], before.unit_slot[u], "unit {} of the last step was evicted", u);
                    }
                }
            }
            // A pool that holds the step's selection places every miss.
            if attended.len() <= slots && missed.len() <= max_promote && !union {
                prop_assert_eq!(stepped.unplaced, 0);
                let again = table.clone().resolve(&batch.selection(&candidates, &counts), step + 1).unwrap();
                prop_assert!(again.iter().all(|&u| u < 0), "a repeated selection missed");
            }
            previous = attended.into_iter().collect();
            rows = Some(now);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Rows sharing blocks (forks of one prompt) miss the same unit in one
    /// step: it is promoted once, for its first entry, so the tables stay
    /// each other's inverse and every resident unit has one slot.
    #[test]
    fn a_unit_several_rows_miss_is_promoted_once(
        batch_size in 2usize..5,
        kv_heads in 1usize..3,
        block_topk in 1usize..8,
        max_len in 16usize..300,
        slots in 1usize..100,
        union in any::<bool>(),
        steps in 1usize..8,
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let batch = Batch::random_shared(&mut rng, batch_size, kv_heads, block_topk, max_len);
        let policy = if union {
            PromotePolicy::union_of_last_two(usize::MAX)
        } else {
            PromotePolicy::one_step_lag(usize::MAX)
        };
        let mut table = Residency::new(batch.units(), slots).unwrap();
        let mut rows: Option<Vec<Vec<usize>>> = None;
        for step in 1..=steps as u32 {
            let now = batch.drift(&mut rng, rows.as_deref(), 0.3);
            let (candidates, counts) = batch.layout(&now);
            let before = table.stats;
            let misses = table.resolve(&batch.selection(&candidates, &counts), step).unwrap();
            let mut distinct: Vec<i32> = Vec::new();
            for &u in misses.iter().filter(|&&u| u >= 0) {
                if !distinct.contains(&u) {
                    distinct.push(u);
                }
            }
            let copies = table.promote(&misses, step, policy, 64);
            table.check().map_err(TestCaseError::fail)?;
            // The copies are the distinct misses in first-entry order.
            let copied: Vec<i32> = copies.iter().map(|&(u, _)| u as i32).collect();
            prop_assert_eq!(&copied[..], &distinct[..copied.len()]);
            let stepped = table.stats.since(before);
            prop_assert_eq!(stepped.promoted + stepped.unplaced, distinct.len() as u64);
            let slots_of: HashSet<u32> = copies.iter().map(|&(_, s)| s).collect();
            prop_assert_eq!(slots_of.len(), copies.len(), "a slot given twice");
            rows = Some(now);
        }
    }
}

#[test]
fn a_block_outside_the_pool_is_an_error_that_changes_nothing() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut batch = Batch::random(&mut rng, 2, 2, 4, 200);
    let rows = batch.drift(&mut rng, None, 0.0);
    let (candidates, counts) = batch.layout(&rows);
    let mut table = Residency::new(batch.units(), 16).unwrap();
    table.resolve(&batch.selection(&candidates, &counts), 1).unwrap();
    let before = table.clone();
    batch.table[0] = batch.host_blocks as i32 + 5;
    let err = table.resolve(&batch.selection(&candidates, &counts), 2).unwrap_err();
    assert!(err.to_string().contains("outside the host pool"), "{err}");
    assert_eq!(table, before);
    batch.table[0] = batch.table[1];
    let err = table.resolve(&batch.selection(&candidates, &counts), 2).unwrap_err();
    assert!(err.to_string().contains("attended twice"), "{err}");
    assert_eq!(table, before);
    assert!(Residency::new(10, 0).is_err());
}
