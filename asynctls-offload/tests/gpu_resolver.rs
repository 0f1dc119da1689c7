//! The device-side resolver against its host twin on the H200: random
//! batches and drifting selections, both predictors, eager steps and a
//! captured graph replayed with new selections; after every step each
//! layer's tables (unit -> slot, slot -> unit, recency, hand, counters) equal
//! the twin's entry for entry, the row slot table the attention reads names
//! each attended block's slot (or its unit in the host tier) as the twin's
//! tables did before the promotion, and at the end every resident slot
//! holds its unit's host data (keys and values). Prints `skipped: no CUDA device`
//! without a GPU.

mod common;

use asynctls_kernels::cuda::gather::ResolveInput;
use asynctls_kernels::cuda::CudaOps;
use asynctls_offload::cuda::CudaLayout;
use asynctls_offload::gpu_resolver::{GpuResidency, ResolverSizing};
use asynctls_offload::{PromotePolicy, Residency};
use common::Batch;
use cudarc::driver::CudaSlice;
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

struct DeviceSelection {
    candidates: CudaSlice<i32>,
    counts: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    table: CudaSlice<i32>,
}

fn input<'a>(batch: &Batch, d: &'a DeviceSelection) -> ResolveInput<'a> {
    ResolveInput {
        candidates: &d.candidates,
        candidate_counts: &d.counts,
        lens: &d.lens,
        block_table: &d.table,
        shape: batch.shape(),
    }
}

#[test]
fn device_residency_matches_the_host_twin() {
    let Some(ops) = CudaOps::for_tests() else { return };
    let device = ops.device().clone();
    let stream = device.stream().clone();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for case in 0..6 {
        let union = case % 2 == 1;
        let layers = 2;
        // Large enough that the promote's scans and the resolve span several
        // chunks of their CTAs (1024 and 256 threads).
        let batch = Batch::random(&mut rng, 1 + case % 3, 1 + case % 4, 24 + 40 * case, 2400 + 700 * case);
        let slots = (batch.rows() * batch.max_entries()) * rng.random_range(8..16) / 10;
        let max_promote = if case == 4 {
            7
        } else {
            batch.rows() * batch.max_entries()
        };
        let policy = if union {
            PromotePolicy::union_of_last_two(max_promote)
        } else {
            PromotePolicy::one_step_lag(max_promote)
        };
        let layout = CudaLayout {
            num_layers: layers,
            kv_heads: batch.kv_heads,
            host_blocks: batch.host_blocks,
            block_size: batch.block_size,
            key_dim: 64,
            value_dim: if case == 3 { 0 } else { 32 },
            slots_per_layer: slots,
        };
        let sizing = ResolverSizing {
            rows: batch.rows(),
            max_entries: batch.max_entries(),
            max_blocks: batch.max_blocks,
        };
        let mut gpu = GpuResidency::new(&device, layout, policy, sizing).unwrap();
        for layer in 0..layers {
            let (k, v) = gpu.host_mut(layer).unwrap();
            k.iter_mut()
                .for_each(|x| *x = bf16::from_f32(rng.random_range(-4.0..4.0)));
            if let Some(v) = v {
                v.iter_mut()
                    .for_each(|x| *x = bf16::from_f32(rng.random_range(-4.0..4.0)));
            }
        }
        let (key_bytes, value_bytes) = gpu.pools.unit_bytes();
        let mut twins: Vec<Residency> = (0..layers)
            .map(|_| Residency::new(batch.units(), slots).unwrap())
            .collect();
        let mut last: Vec<Option<Vec<Vec<usize>>>> = vec![None; layers];
        let mut device_sel: Vec<DeviceSelection> = (0..layers)
            .map(|_| DeviceSelection {
                candidates: stream.alloc_zeros(batch.rows() * batch.block_topk).unwrap(),
                counts: stream.alloc_zeros(batch.rows()).unwrap(),
                lens: stream.clone_htod(&batch.lens).unwrap(),
                table: stream.clone_htod(&batch.table).unwrap(),
            })
            .collect();
        let mut graph = None;
        let mut expected_rows: Vec<(usize, i32)> = Vec::new();
        for step in 1..=10u32 {
            // New selections into the same device buffers (what a captured step reads).
            for layer in 0..layers {
                let rows = batch.drift(&mut rng, last[layer].as_deref(), 0.3);
                let (candidates, counts) = batch.layout(&rows);
                stream
                    .memcpy_htod(&candidates, &mut device_sel[layer].candidates)
                    .unwrap();
                stream.memcpy_htod(&counts, &mut device_sel[layer].counts).unwrap();
                let sel = batch.selection(&candidates, &counts);
                if layer == layers - 1 {
                    // What the attention of the last layer reads.
                    expected_rows.clear();
                    for row in 0..batch.rows() {
                        let seq = row / batch.kv_heads;
                        for b in sel.attended_blocks(row) {
                            let unit = batch.table[seq * batch.max_blocks + b] as usize * batch.kv_heads
                                + row % batch.kv_heads;
                            let slot = twins[layer].unit_slot[unit];
                            expected_rows.push((
                                row * batch.max_blocks + b,
                                if slot >= 0 { slot } else { -(unit as i32) - 1 },
                            ));
                        }
                    }
                }
                let misses = twins[layer].resolve(&sel, step).unwrap();
                twins[layer].promote(&misses, step, policy, key_bytes + value_bytes);
                last[layer] = Some(rows);
            }
            // Steps 1-5 eager; then one captured step replayed for the rest.
            if step <= 5 {
                gpu.begin_step().unwrap();
                for (layer, sel) in device_sel.iter().enumerate() {
                    // SAFETY: the table maps to distinct blocks of the pool.
                    unsafe { gpu.resolve(layer, &input(&batch, sel)) }.unwrap();
                    gpu.after_attention(layer).unwrap();
                }
                gpu.end_step().unwrap();
            } else {
                if graph.is_none() {
                    let (g, ()) = device
                        .capture(|| -> asynctls_offload::Result<()> {
                            gpu.begin_step()?;
                            for (layer, sel) in device_sel.iter().enumerate() {
                                // SAFETY: as above.
                                unsafe { gpu.resolve(layer, &input(&batch, sel)) }?;
                                gpu.after_attention(layer)?;
                            }
                            gpu.end_step()
                        })
                        .unwrap();
                    graph = Some(g);
                }
                graph.as_ref().unwrap().launch().unwrap();
            }
            let rows = gpu.row_slots(layers - 1).unwrap();
            for &(at, want) in &expected_rows {
                assert_eq!(rows[at], want, "case {case} step {step}: row slot table at {at}");
            }
            for (layer, twin) in twins.iter().enumerate() {
                let got = gpu.tables(layer).unwrap();
                assert_eq!(got.stats, twin.stats, "case {case} step {step} layer {layer}: counters");
                assert_eq!(got.hand, twin.hand, "case {case} step {step} layer {layer}: hand");
                assert!(
                    got.unit_slot == twin.unit_slot,
                    "case {case} step {step} layer {layer}: unit -> slot"
                );
                assert!(
                    got.slot_unit == twin.slot_unit,
                    "case {case} step {step} layer {layer}: slot -> unit"
                );
                assert!(
                    got.slot_last == twin.slot_last,
                    "case {case} step {step} layer {layer}: recency"
                );
            }
        }
        let stats: Vec<_> = twins.iter().map(|t| t.stats).collect();
        assert!(
            stats.iter().any(|s| s.promoted > 0 && s.hits > 0),
            "case {case}: {stats:?}"
        );
        if case == 4 {
            assert!(
                stats.iter().all(|s| s.unplaced > 0),
                "case {case}: max_promote binds: {stats:?}"
            );
        }
        // Every resident slot holds its unit's host rows.
        for (layer, twin) in twins.iter().enumerate() {
            let slot_k = stream.clone_dtoh(&gpu.pools.slot_keys[layer]).unwrap();
            let slot_v = gpu.pools.slot_values.get(layer).map(|s| stream.clone_dtoh(s).unwrap());
            let (host_k, host_v) = gpu.pools.host(layer);
            let (ku, vu) = (key_bytes / 2, value_bytes / 2);
            for (slot, &unit) in twin.slot_unit.iter().enumerate() {
                if unit < 0 {
                    continue;
                }
                let unit = unit as usize;
                assert!(
                    slot_k[slot * ku..(slot + 1) * ku] == host_k[unit * ku..(unit + 1) * ku],
                    "keys of slot {slot}"
                );
                if let (Some(sv), Some(hv)) = (&slot_v, host_v) {
                    assert!(
                        sv[slot * vu..(slot + 1) * vu] == hv[unit * vu..(unit + 1) * vu],
                        "values of slot {slot}"
                    );
                }
            }
        }
    }
}
