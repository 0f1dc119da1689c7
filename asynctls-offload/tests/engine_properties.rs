//! The offload engine over the simulated backend (copies on a worker thread
//! after random delays), on random drifting selection sequences (candidate
//! blocks drift; the attention reads a random part of them; the predictor
//! sees the candidates): every
//! acquired slot holds its unit's data when the attention reads it and still
//! when it finishes (no copy lands late, no slot is reused under a reader),
//! misses are fetched and counted rather than skipped, the resident pool
//! never exceeds its slots, written blocks reach the host after a flush, and
//! a selection larger than the pool is a clear error that leaves the engine
//! usable.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use asynctls_offload::sim::{SimBackend, SimConfig};
use asynctls_offload::{
    FirstLoaded, OffloadEngine, OffloadError, OneStepLag, Predictor, TransferBackend, UnionOfLastTwo, Unit,
};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn tag(layer: usize, unit: Unit) -> u64 {
    ((layer as u64) << 48) | ((unit.block as u64) << 16) | unit.head as u64
}

#[derive(Debug, Clone)]
struct Case {
    layers: usize,
    kv_heads: usize,
    host_blocks: usize,
    slots: usize,
    per_batch_us: u64,
    per_unit_us: u64,
    steps: usize,
    drift: f64,
    union_predictor: bool,
    fifo: bool,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        1usize..3,
        1usize..4,
        8usize..48,
        4usize..40,
        0u64..300,
        0u64..20,
        3usize..14,
        0.0f64..0.6,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                layers,
                kv_heads,
                host_blocks,
                slots,
                per_batch_us,
                per_unit_us,
                steps,
                drift,
                union_predictor,
                fifo,
                seed,
            )| Case {
                layers,
                kv_heads,
                host_blocks,
                slots,
                per_batch_us,
                per_unit_us,
                steps,
                drift,
                union_predictor,
                fifo,
                seed,
            },
        )
}

/// Runs `case`, checking every invariant at every step; returns the ticket
/// list's capacity and the process's resident memory (KiB, Linux) every
/// 500 steps, for the soak test's flatness check.
fn run(case: &Case) -> std::result::Result<Vec<(usize, usize, usize)>, TestCaseError> {
    let config = SimConfig {
        num_layers: case.layers,
        kv_heads: case.kv_heads,
        host_blocks: case.host_blocks,
        slots_per_layer: case.slots,
        unit_bytes: 1024,
        per_batch: Duration::from_micros(case.per_batch_us),
        per_unit: Duration::from_micros(case.per_unit_us),
    };
    let backend = SimBackend::new(config, tag);
    let (host, device) = (backend.host.clone(), backend.device.clone());
    let mut engine = if case.fifo {
        OffloadEngine::with_policy(backend, Box::new(FirstLoaded))
    } else {
        OffloadEngine::new(backend)
    };
    let mut predictor: Box<dyn Predictor> = if case.union_predictor {
        Box::new(UnionOfLastTwo::default())
    } else {
        Box::new(OneStepLag)
    };
    let mut rng = StdRng::seed_from_u64(case.seed);
    let all_units = case.host_blocks * case.kv_heads;
    let unit_at = |i: usize| Unit::new((i / case.kv_heads) as u32, (i % case.kv_heads) as u16);
    // What the host must hold for each unit (changes when a written block is flushed).
    let mut expected: Vec<HashMap<Unit, u64>> = (0..case.layers)
        .map(|l| (0..all_units).map(|i| (unit_at(i), tag(l, unit_at(i)))).collect())
        .collect();
    let size = (case.slots / 2).max(1).min(all_units);
    let mut selections: Vec<BTreeSet<usize>> = (0..case.layers)
        .map(|_| {
            let mut s = BTreeSet::new();
            while s.len() < size {
                s.insert(rng.random_range(0..all_units));
            }
            s
        })
        .collect();
    let mut written = 0u64;
    let mut late = 0usize;
    let mut samples = Vec::new();
    for step in 0..case.steps {
        engine.begin_step();
        let mut flushed: Vec<(usize, Unit, u64)> = Vec::new();
        for layer in 0..case.layers {
            // Drift: replace a fraction of the selection with random units.
            let sel = &mut selections[layer];
            let replace = (sel.len() as f64 * case.drift).round() as usize;
            for _ in 0..replace {
                let victim = *sel.iter().nth(rng.random_range(0..sel.len())).unwrap();
                sel.remove(&victim);
                while sel.len() < size {
                    sel.insert(rng.random_range(0..all_units));
                }
            }
            // The block filter's candidates (`sel`) drive the prefetch; the
            // attention reads the blocks of the tokens chosen among them.
            let candidates: Vec<Unit> = sel.iter().map(|&i| unit_at(i)).collect();
            let units: Vec<Unit> = candidates.iter().copied().filter(|_| rng.random_bool(0.6)).collect();
            let acquired = engine
                .acquire(layer, &units)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(acquired.slots.len(), units.len());
            let distinct: BTreeSet<u32> = acquired.slots.iter().copied().collect();
            prop_assert_eq!(distinct.len(), units.len(), "two units share a slot");
            let check = |when: &str| -> std::result::Result<(), TestCaseError> {
                let dev = device[layer].lock().unwrap();
                for (u, &s) in units.iter().zip(&acquired.slots) {
                    prop_assert_eq!(
                        dev[s as usize],
                        expected[layer][u],
                        "{} unit {:?} in slot {}: stale or overwritten",
                        when,
                        u,
                        s
                    );
                }
                Ok(())
            };
            check("at acquire")?;
            // The "attention" takes a while; copies keep landing meanwhile.
            std::thread::sleep(Duration::from_micros(rng.random_range(0..200)));
            check("after the attention")?;
            engine.release(layer).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(engine.resident(layer) <= case.slots);
            let predicted = predictor.observe(layer, &candidates);
            engine
                .prefetch(layer, &predicted)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Sometimes a block is written on the device and flushed.
            if rng.random_bool(0.3) {
                let unit = unit_at(rng.random_range(0..all_units));
                let slot = engine
                    .place_new(layer, unit)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                written += 1;
                let new_tag = (1u64 << 63) | written;
                device[layer].lock().unwrap()[slot as usize] = new_tag;
                engine
                    .flush(layer, &[unit])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                flushed.push((layer, unit, new_tag));
            }
        }
        let m = engine.end_step().map_err(|e| TestCaseError::fail(e.to_string()))?;
        if step % 500 == 499 {
            samples.push((step + 1, engine.ticket_capacity(), resident_kib()));
        }
        prop_assert_eq!(m.hits + m.late + m.misses, m.requested);
        prop_assert!(m.exposed_us <= m.transfer_us + 1e-6);
        late += m.late;
        if flushed.is_empty() {
            continue;
        }
        // Flushes land in the background; check them once everything has.
        engine.synchronize().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (layer, unit, new_tag) in flushed {
            prop_assert_eq!(host[layer].lock().unwrap()[unit.index(case.kv_heads)], new_tag);
            expected[layer].insert(unit, new_tag);
        }
    }
    LATE_SEEN.fetch_add(late, std::sync::atomic::Ordering::Relaxed);
    Ok(samples)
}

/// Resident set size of this process in KiB (0 where /proc is absent).
fn resident_kib() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()))
        .map_or(0, |pages| pages * 4)
}

/// Many steps through the engine with random drifting selections, injected
/// copy delays and flushes: no lost or stale block at any step (checked by
/// `run`), and memory flat: the ticket list and the process's resident set
/// stop growing once the working set is reached. CI runs 1,500 steps;
/// `SOAK_STEPS=10000` is the long form.
#[test]
fn soak_many_steps_without_loss_or_growth() {
    let steps = std::env::var("SOAK_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let case = Case {
        layers: 2,
        kv_heads: 2,
        host_blocks: 48,
        slots: 32,
        per_batch_us: 40,
        per_unit_us: 2,
        steps,
        drift: 0.3,
        union_predictor: true,
        fifo: false,
        seed: 99,
    };
    let samples = run(&case).unwrap();
    println!("soak {steps} steps: (step, ticket entries, RSS KiB) {samples:?}");
    let warm = samples.len() / 3;
    let early_tickets = samples[..=warm].iter().map(|s| s.1).max().unwrap();
    let late_tickets = samples[warm..].iter().map(|s| s.1).max().unwrap();
    assert!(
        late_tickets <= early_tickets.max(16),
        "tickets grew from {early_tickets} to {late_tickets}"
    );
    let (early_rss, late_rss) = (samples[warm].2, samples.last().unwrap().2);
    assert!(
        late_rss <= early_rss + 4096,
        "resident memory grew from {early_rss} KiB to {late_rss} KiB"
    );
}

/// Prefetches still in flight when the next step asks (over all cases): the
/// cases must exercise the ordering, not only finished copies.
static LATE_SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn acquired_slots_always_hold_their_units(case in cases()) {
        run(&case)?;
    }
}

#[test]
fn some_prefetches_are_still_in_flight_when_asked() {
    // A fixed case with slow copies: the next step's acquire must find
    // prefetched units still arriving, and wait for them.
    let case = Case {
        layers: 1,
        kv_heads: 2,
        host_blocks: 40,
        slots: 30,
        per_batch_us: 2000,
        per_unit_us: 100,
        steps: 6,
        drift: 0.3,
        union_predictor: false,
        fifo: false,
        seed: 3,
    };
    let before = LATE_SEEN.load(std::sync::atomic::Ordering::Relaxed);
    run(&case).unwrap();
    assert!(
        LATE_SEEN.load(std::sync::atomic::Ordering::Relaxed) > before,
        "no prefetch was late"
    );
}

#[test]
fn a_static_selection_hits_after_the_first_step() {
    let config = SimConfig {
        num_layers: 1,
        kv_heads: 2,
        host_blocks: 32,
        slots_per_layer: 16,
        unit_bytes: 4096,
        per_batch: Duration::from_micros(50),
        per_unit: Duration::from_micros(5),
    };
    let mut engine = OffloadEngine::new(SimBackend::new(config, tag));
    let units: Vec<Unit> = (0..8).map(|b| Unit::new(b * 3, (b % 2) as u16)).collect();
    engine.begin_step();
    engine.acquire(0, &units).unwrap();
    engine.release(0).unwrap();
    engine.prefetch(0, &units).unwrap();
    let first = engine.end_step().unwrap();
    assert_eq!((first.misses, first.hits, first.prefetched), (8, 0, 0));
    assert_eq!(first.h2d_bytes, 8 * 4096);
    for _ in 0..3 {
        engine.begin_step();
        engine.acquire(0, &units).unwrap();
        engine.release(0).unwrap();
        engine.prefetch(0, &units).unwrap();
        let m = engine.end_step().unwrap();
        assert_eq!((m.hits, m.misses, m.h2d_bytes), (8, 0, 0), "{m:?}");
    }
}

#[test]
fn oversized_selection_is_an_error_and_the_engine_recovers() {
    let config = SimConfig {
        num_layers: 1,
        kv_heads: 1,
        host_blocks: 64,
        slots_per_layer: 8,
        unit_bytes: 1,
        per_batch: Duration::ZERO,
        per_unit: Duration::ZERO,
    };
    let mut engine = OffloadEngine::new(SimBackend::new(config, tag));
    engine.begin_step();
    let too_many: Vec<Unit> = (0..9).map(|b| Unit::new(b, 0)).collect();
    let err = engine.acquire(0, &too_many).unwrap_err();
    assert!(matches!(err, OffloadError::ResidentPoolFull { .. }), "{err}");
    assert!(err.to_string().contains("raise the slack"), "{err}");
    engine.release(0).unwrap();
    let fits: Vec<Unit> = (10..18).map(|b| Unit::new(b, 0)).collect();
    let got = engine.acquire(0, &fits).unwrap();
    assert_eq!(got.slots.len(), 8);
    let out_of_range = engine.acquire(0, &[Unit::new(64, 0)]).unwrap_err();
    assert!(
        out_of_range.to_string().contains("outside the host pool"),
        "{out_of_range}"
    );
    assert!(engine.backend().slots_per_layer() == 8);
}

#[test]
fn the_ticket_list_stays_bounded_over_many_steps() {
    // Slow copies keep some in flight at every step end, so the list is never
    // cleared; completed tickets must be reused rather than appended.
    let config = SimConfig {
        num_layers: 2,
        kv_heads: 2,
        host_blocks: 64,
        slots_per_layer: 24,
        unit_bytes: 64,
        per_batch: Duration::from_micros(300),
        per_unit: Duration::from_micros(20),
    };
    let mut engine = OffloadEngine::new(SimBackend::new(config, tag));
    let mut rng = 12345u64;
    let mut next = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) as u32
    };
    let mut most = 0;
    for step in 0..400 {
        engine.begin_step();
        for layer in 0..2 {
            let units: Vec<Unit> = (0..8).map(|_| Unit::new(next() % 64, (next() % 2) as u16)).collect();
            let mut units = units;
            units.sort_by_key(|u| (u.block, u.head));
            units.dedup();
            engine.acquire(layer, &units).unwrap();
            engine.release(layer).unwrap();
            let predicted: Vec<Unit> = units.iter().map(|u| Unit::new((u.block + 1) % 64, u.head)).collect();
            engine.prefetch(layer, &predicted).unwrap();
        }
        engine.end_step().unwrap();
        most = most.max(engine.ticket_capacity());
        if step == 50 {
            // By now the list has reached its working size.
            assert!(most > 0);
        }
    }
    // Each layer issues at most a prefetch and a flush per step: a list
    // sized by the copies in flight, not by the 400 steps.
    assert!(most <= 64, "the ticket list grew to {most} entries");
}
