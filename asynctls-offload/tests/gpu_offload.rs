//! The offload engine over the CUDA backend on the H200: after every
//! acquire, the slot pools read back on the compute stream (ordered after
//! the copies by events only) hold exactly the host data of the acquired
//! units; memcpy runs, the mapped-memory gather and a mix of both; and
//! flushed blocks reach the pinned host pool. Prints `skipped: no CUDA
//! device` without a GPU.

use std::collections::BTreeSet;

use asynctls_kernels::cuda::CudaOps;
use asynctls_offload::cuda::{CudaBackend, CudaLayout};
use asynctls_offload::{OffloadEngine, OneStepLag, Predictor, TransferBackend, Unit};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

#[test]
fn acquired_slots_hold_host_data_on_the_gpu() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let device = ops.device().clone();
    let layout = CudaLayout {
        num_layers: 2,
        kv_heads: 4,
        host_blocks: 48,
        block_size: 64,
        key_dim: 128,
        value_dim: 128,
        slots_per_layer: 40,
    };
    let unit = layout.block_size * layout.key_dim;
    let mut rng = StdRng::from_os_rng();
    for memcpy_min_bytes in [0usize, usize::MAX, 64 * 1024] {
        let mut backend = CudaBackend::new(&device, layout).unwrap();
        backend.memcpy_min_bytes = memcpy_min_bytes;
        for layer in 0..layout.num_layers {
            let (k, v) = backend.host_mut(layer);
            k.iter_mut()
                .for_each(|x| *x = bf16::from_f32(rng.random_range(-4.0..4.0)));
            v.unwrap()
                .iter_mut()
                .for_each(|x| *x = bf16::from_f32(rng.random_range(-4.0..4.0)));
        }
        let mut engine = OffloadEngine::new(backend);
        let mut predictor = OneStepLag;
        let all = layout.host_blocks * layout.kv_heads;
        let at = |i: usize| Unit::new((i / layout.kv_heads) as u32, (i % layout.kv_heads) as u16);
        let mut candidates: Vec<BTreeSet<usize>> = (0..layout.num_layers)
            .map(|_| (0..20).map(|_| rng.random_range(0..all)).collect())
            .collect();
        let (mut requested, mut hits, mut late, mut misses) = (0, 0, 0, 0);
        for _ in 0..12 {
            engine.begin_step();
            for (layer, c) in candidates.iter_mut().enumerate() {
                for _ in 0..4 {
                    let victim = *c.iter().nth(rng.random_range(0..c.len())).unwrap();
                    c.remove(&victim);
                    c.insert(rng.random_range(0..all));
                }
                let cand: Vec<Unit> = c.iter().map(|&i| at(i)).collect();
                let selected: Vec<Unit> = cand.iter().copied().filter(|_| rng.random_bool(0.6)).collect();
                let got = engine.acquire(layer, &selected).unwrap();
                let stream = device.stream();
                let slots_k = stream.clone_dtoh(&engine.backend().pools.slot_keys[layer]).unwrap();
                let slots_v = stream.clone_dtoh(&engine.backend().pools.slot_values[layer]).unwrap();
                let (host_k, host_v) = engine.backend().host(layer);
                let host_v = host_v.unwrap();
                for (u, &s) in selected.iter().zip(&got.slots) {
                    let (i, s) = (u.index(layout.kv_heads), s as usize);
                    assert!(
                        slots_k[s * unit..(s + 1) * unit] == host_k[i * unit..(i + 1) * unit],
                        "K of {u:?} in slot {s} (memcpy_min_bytes {memcpy_min_bytes})"
                    );
                    assert!(
                        slots_v[s * unit..(s + 1) * unit] == host_v[i * unit..(i + 1) * unit],
                        "V of {u:?} in slot {s}"
                    );
                }
                engine.release(layer).unwrap();
                let predicted = predictor.observe(layer, &cand);
                engine.prefetch(layer, &predicted).unwrap();
            }
            let m = engine.end_step().unwrap();
            assert_eq!(m.hits + m.late + m.misses, m.requested);
            requested += m.requested;
            hits += m.hits;
            late += m.late;
            misses += m.misses;
        }
        let counts = engine.backend().counts;
        println!(
            "memcpy_min_bytes {memcpy_min_bytes}: {requested} requested, {hits} hits, {late} late, {misses} misses; {counts:?}"
        );
        match memcpy_min_bytes {
            0 => assert_eq!(counts.gathered_units, 0),
            usize::MAX => assert_eq!(counts.memcpy_units, 0),
            _ => {}
        }
        assert!(hits > 0, "prefetching never hit");

        // A block written on the device reaches the host after a flush.
        engine.begin_step();
        let unit_id = Unit::new(7, 3);
        let slot = engine.place_new(1, unit_id).unwrap() as usize;
        let fresh: Vec<bf16> = (0..unit).map(|_| bf16::from_f32(rng.random_range(-1.0..1.0))).collect();
        {
            let stream = device.stream().clone();
            let backend = engine.backend_mut();
            let mut view = backend.pools.slot_keys[1].slice_mut(slot * unit..(slot + 1) * unit);
            stream.memcpy_htod(&fresh, &mut view).unwrap();
        }
        engine.flush(1, &[unit_id]).unwrap();
        engine.synchronize().unwrap();
        let (host_k, _) = engine.backend().host(1);
        let i = unit_id.index(layout.kv_heads);
        assert_eq!(
            &host_k[i * unit..(i + 1) * unit],
            &fresh[..],
            "flushed block on the host"
        );
        let m = engine.end_step().unwrap();
        assert_eq!(m.d2h_bytes, engine.backend().unit_bytes());
    }
}
