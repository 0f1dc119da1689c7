//! `asynctls bench offload --device cuda`: two-level sparse decode with the
//! K/V resident on the GPU against the same decode with the K/V offloaded to
//! pinned host memory behind the offload engine, on the same selections.
//!
//! Each of `layers` layers of the Qwen3-8B shape has a paged pool written by
//! the append kernel; the offloaded run copies it to the engine's pinned
//! host pool, and its attention reads only the resident slots (and, for a
//! unit without a slot, the host pool in place through the device mapping).
//! Queries drift: every step each layer's query is the last plus uniform
//! noise of amplitude `drift`, so consecutive selections overlap as in
//! decoding.
//!
//! Per step and layer, in both modes, the GPU selection (block bounds,
//! top-k_b, labels, top-k_t) runs on GPU-resident metadata and the attention
//! follows on the GPU with no host round trip. Offloaded, the attention is
//! ordered after the copies into its slots and finds them through the
//! device-side unit -> slot table; after the step's launches, off the
//! critical path, the host reads back each layer's candidate blocks,
//! counts what the attention found resident (hits) or read from host memory
//! (misses), and prefetches those blocks for the next step (one-step lag:
//! only the ones not resident move, on the copy stream). Time per step is
//! the wall time of the timed steps over their number, after a warm-up,
//! with the streams synchronized at both ends (both modes alike).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use asynctls_kernels::cuda::{
    attention::{decode_splits, DecodeKernel},
    CudaOps, DecodeScratch, GpuKvPool, KvGeometry, OffloadedKv, PagedKvView, SelectParams, SelectScratch,
};
use asynctls_kernels::CudaDevice;
use asynctls_offload::cuda::{CudaBackend, CudaLayout};
use asynctls_offload::{OffloadConfig, OffloadEngine, OneStepLag, Predictor, StepMetrics, Unit};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use super::attn_cuda::{fill_pool, multiprocessors, random_on_device};

const BLOCK: usize = 64;

/// What to sweep.
#[derive(Debug, Clone)]
pub struct OffloadSweep {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    pub block_topk: usize,
    pub token_topk: usize,
    pub slack: f64,
    /// Query drift per step (noise scale relative to the query's).
    pub drift: f32,
    pub steps: usize,
    /// memcpy threshold(s) of the backend to compare (bytes; 0 = all memcpy,
    /// usize::MAX = all gather).
    pub memcpy_min_bytes: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OffloadRow {
    pub ctx: usize,
    pub batch: usize,
    pub layers: usize,
    pub mode: String,
    pub memcpy_min_bytes: Option<usize>,
    pub step_us_median: f64,
    /// Offloaded step time over the GPU-resident one (same run).
    pub vs_resident: Option<f64>,
    pub hit_rate: Option<f64>,
    pub miss_rate: Option<f64>,
    pub late_per_step: Option<f64>,
    pub h2d_bytes_per_step: Option<f64>,
    pub hidden_fraction: Option<f64>,
    pub memcpy_units: Option<usize>,
    pub gathered_units: Option<usize>,
    /// Host wall time per step spent issuing the step's GPU work (selection,
    /// attention, and for the offload engine its ordering and release calls).
    pub host_launch_us_per_step: f64,
    /// Host wall time per step in the offload engine's bookkeeping off the
    /// critical path (waiting for a layer's read-back, hit/miss accounting,
    /// prefetch decisions and copy issue, end of step).
    pub host_bookkeeping_us_per_step: Option<f64>,
    /// GPU bytes one sequence holds per layer in this mode (K/V or slots, plus bounds and labels).
    pub gpu_bytes_per_seq_layer: usize,
    /// The same over the sequence's dense K/V per layer.
    pub gpu_fraction_of_dense_kv: f64,
}

struct Layer {
    pool: GpuKvPool,
    table: CudaSlice<i32>,
    table_host: Vec<i32>,
}

/// Runs the sweep.
pub fn run(device: &CudaDevice, sweep: &OffloadSweep, mut progress: impl FnMut(&str)) -> Result<Vec<OffloadRow>> {
    let ops = CudaOps::new(device)?;
    let stream = device.stream().clone();
    let sms = multiprocessors(device)?;
    let (qh, kvh, d) = (sweep.q_heads, sweep.kv_heads, sweep.head_dim);
    let r = 32.min(d);
    let scale = 1.0 / (d as f32).sqrt();
    let mut rng = StdRng::seed_from_u64(11);
    let random = random_on_device(device, &mut rng)?;
    let channels: Vec<u16> = (0..kvh).flat_map(|_| 0..r as u16).collect();
    let params = SelectParams {
        block_topk: sweep.block_topk,
        token_topk: sweep.token_topk,
        sink_blocks: 1,
        local_blocks: 1,
        reduce_max: false,
    };
    let mut rows_out = Vec::new();
    for &ctx in &sweep.contexts {
        for &batch in &sweep.batches {
            let blocks_per_seq = ctx.div_ceil(BLOCK);
            let num_blocks = batch * blocks_per_seq;
            let rows = batch * kvh;
            let geometry = KvGeometry {
                num_blocks,
                kv_heads: kvh,
                block_size: BLOCK,
                key_dim: d,
                value_dim: d,
                separate_values: true,
                label_channels: r,
            };
            progress(&format!("ctx {ctx} batch {batch}: filling {} layers", sweep.layers));
            let mut layers = Vec::new();
            for _ in 0..sweep.layers {
                let mut pool = GpuKvPool::new(&ops, geometry, &channels)?;
                let table_host = fill_pool(&ops, &mut pool, batch, ctx, &random, &mut rng).context("filling a pool")?;
                layers.push(Layer {
                    table: stream.clone_htod(&table_host)?,
                    table_host,
                    pool,
                });
            }
            let lens = stream.clone_htod(&vec![ctx as i32; batch])?;
            // The drifting queries of every step, the same for every mode.
            let total_steps = sweep.steps + 3;
            let mut queries: Vec<Vec<CudaSlice<f32>>> = Vec::new(); // [step][layer], on the device
            let mut q_now: Vec<Vec<f32>> = (0..sweep.layers)
                .map(|_| (0..batch * qh * d).map(|_| rng.random_range(-1.0f32..1.0)).collect())
                .collect();
            for _ in 0..total_steps {
                for q in q_now.iter_mut() {
                    for v in q.iter_mut() {
                        *v += sweep.drift * rng.random_range(-1.0f32..1.0);
                    }
                }
                queries.push(
                    q_now
                        .iter()
                        .map(|q| stream.clone_htod(q))
                        .collect::<std::result::Result<Vec<_>, _>>()?,
                );
            }
            let max_tokens_guess = ctx.min(sweep.token_topk + 3 * BLOCK);
            let splits = decode_splits(rows, max_tokens_guess, DecodeKernel::GqaSparse, sms);
            let dense_kv_per_seq_layer = ctx * kvh * d * 2 * 2;
            let metadata_per_seq_layer = blocks_per_seq * kvh * 2 * d * 4 + ctx * kvh * (r / 2 + 4);
            let mut select_scratch = SelectScratch::new(&ops)?;
            let mut scratch = DecodeScratch::new(&ops)?;
            let mut out = stream.alloc_zeros::<f32>(batch * qh * d)?;

            // GPU-resident sparse decode.
            progress(&format!("ctx {ctx} batch {batch}: resident"));
            let warmup = 3;
            let mut start = Instant::now();
            let mut launch = Duration::ZERO;
            for (step, qs) in queries.iter().enumerate() {
                if step == warmup {
                    stream.synchronize()?;
                    start = Instant::now();
                    launch = Duration::ZERO;
                }
                let issued = Instant::now();
                for (layer, q) in layers.iter().zip(qs) {
                    ops.sparse_select(
                        q,
                        &layer.pool,
                        &layer.table,
                        blocks_per_seq,
                        &lens,
                        qh,
                        &params,
                        &mut select_scratch,
                    )?;
                    let view = layer.pool.view(&layer.table, blocks_per_seq, &lens);
                    let lists = select_scratch.lists();
                    ops.decode_attention(q, &view, Some(&lists), qh, scale, splits, &mut scratch, &mut out)?;
                }
                launch += issued.elapsed();
            }
            stream.synchronize()?;
            let timed_steps = (queries.len() - warmup) as f64;
            let resident_us = start.elapsed().as_secs_f64() * 1e6 / timed_steps;
            let resident_bytes = dense_kv_per_seq_layer + metadata_per_seq_layer;
            rows_out.push(OffloadRow {
                ctx,
                batch,
                layers: sweep.layers,
                mode: "gpu-resident".into(),
                memcpy_min_bytes: None,
                step_us_median: resident_us,
                vs_resident: None,
                hit_rate: None,
                miss_rate: None,
                late_per_step: None,
                h2d_bytes_per_step: None,
                hidden_fraction: None,
                memcpy_units: None,
                gathered_units: None,
                host_launch_us_per_step: launch.as_secs_f64() * 1e6 / timed_steps,
                host_bookkeeping_us_per_step: None,
                gpu_bytes_per_seq_layer: resident_bytes,
                gpu_fraction_of_dense_kv: resident_bytes as f64 / dense_kv_per_seq_layer as f64,
            });

            for &memcpy_min_bytes in &sweep.memcpy_min_bytes {
                progress(&format!(
                    "ctx {ctx} batch {batch}: offloaded (memcpy >= {memcpy_min_bytes} B)"
                ));
                let config = OffloadConfig::with_slack(rows, sweep.block_topk, 3, sweep.slack)?;
                let layout = CudaLayout {
                    num_layers: sweep.layers,
                    kv_heads: kvh,
                    host_blocks: num_blocks,
                    block_size: BLOCK,
                    key_dim: d,
                    value_dim: d,
                    slots_per_layer: config.slots_per_layer,
                };
                let mut backend = CudaBackend::new(device, layout)?;
                backend.memcpy_min_bytes = memcpy_min_bytes;
                for (l, layer) in layers.iter().enumerate() {
                    let (hk, hv) = backend.host_mut(l);
                    stream.memcpy_dtoh(&layer.pool.keys, hk)?;
                    stream.memcpy_dtoh(layer.pool.values.as_ref().expect("gqa"), hv.expect("gqa"))?;
                }
                stream.synchronize()?;
                let mut engine = OffloadEngine::new(backend);
                let mut predictor = OneStepLag;
                let mut readback = Readback::new(device, sweep.layers, rows, kvh, blocks_per_seq, sweep.block_topk)?;
                let mut pending: Option<usize> = None;
                let warmup = 3;
                let mut start = Instant::now();
                let mut metrics: Vec<StepMetrics> = Vec::new();
                let (mut launch, mut bookkeeping) = (Duration::ZERO, Duration::ZERO);
                for (step, qs) in queries.iter().enumerate() {
                    if step == warmup {
                        stream.synchronize()?;
                        start = Instant::now();
                        (launch, bookkeeping) = (Duration::ZERO, Duration::ZERO);
                    }
                    engine.begin_step();
                    // The critical path: selection, then attention over the
                    // slots (after the copies into them), nothing on the host.
                    for (l, (layer, q)) in layers.iter().zip(qs).enumerate() {
                        let issued = Instant::now();
                        ops.sparse_select(
                            q,
                            &layer.pool,
                            &layer.table,
                            blocks_per_seq,
                            &lens,
                            qh,
                            &params,
                            &mut select_scratch,
                        )?;
                        engine.order_before_attention(l)?;
                        let backend = engine.backend();
                        let (host_keys, host_values) = backend.host_device_ptrs(l);
                        let view = PagedKvView {
                            keys: &backend.slot_keys[l],
                            values: Some(&backend.slot_values[l]),
                            offload: Some(OffloadedKv {
                                unit_slots: &backend.unit_slots[l],
                                host_keys,
                                host_values,
                            }),
                            ..layer.pool.view(&layer.table, blocks_per_seq, &lens)
                        };
                        let lists = select_scratch.lists();
                        ops.decode_attention(q, &view, Some(&lists), qh, scale, splits, &mut scratch, &mut out)?;
                        engine.release(l)?;
                        launch += issued.elapsed();
                        let booked = Instant::now();
                        // Off the critical path: the layer launched before this
                        // one (here or in the last step) has finished on the GPU
                        // by now or soon; its candidate and forced blocks are
                        // what it read (counted) and what its next step will
                        // read (prefetched).
                        if let Some(prev) = pending.replace(l) {
                            readback.account_and_prefetch(
                                &mut engine,
                                &mut predictor,
                                prev,
                                &layers[prev].table_host,
                            )?;
                        }
                        readback.issue(&stream, l, &select_scratch)?;
                        bookkeeping += booked.elapsed();
                    }
                    let booked = Instant::now();
                    let m = engine.end_step()?;
                    bookkeeping += booked.elapsed();
                    if step >= warmup {
                        metrics.push(m);
                    }
                }
                stream.synchronize()?;
                let t = start.elapsed().as_secs_f64() * 1e6 / (queries.len() - warmup) as f64;
                if let Some(prev) = pending.take() {
                    readback.account_and_prefetch(&mut engine, &mut predictor, prev, &layers[prev].table_host)?;
                }
                let n = metrics.len().max(1) as f64;
                let sum = |f: fn(&StepMetrics) -> f64| metrics.iter().map(f).sum::<f64>();
                let requested = sum(|m| m.requested as f64).max(1.0);
                let transfer = sum(|m| m.transfer_us);
                let exposed = sum(|m| m.exposed_us);
                let counts = engine.backend().counts;
                // Slots and the unit -> slot table, per sequence and layer.
                let slots_bytes =
                    (engine.backend().layout().resident_bytes() / sweep.layers + num_blocks * kvh * 4) / batch;
                let offload_bytes = slots_bytes + metadata_per_seq_layer;
                rows_out.push(OffloadRow {
                    ctx,
                    batch,
                    layers: sweep.layers,
                    mode: "offloaded".into(),
                    memcpy_min_bytes: Some(memcpy_min_bytes),
                    step_us_median: t,
                    vs_resident: Some(t / resident_us),
                    hit_rate: Some(sum(|m| m.hits as f64) / requested),
                    miss_rate: Some(sum(|m| m.misses as f64) / requested),
                    late_per_step: Some(sum(|m| m.late as f64) / n),
                    h2d_bytes_per_step: Some(sum(|m| m.h2d_bytes as f64) / n),
                    hidden_fraction: Some(if transfer > 0.0 {
                        (1.0 - exposed / transfer).clamp(0.0, 1.0)
                    } else {
                        1.0
                    }),
                    memcpy_units: Some(counts.memcpy_units),
                    gathered_units: Some(counts.gathered_units),
                    host_launch_us_per_step: launch.as_secs_f64() * 1e6 / n,
                    host_bookkeeping_us_per_step: Some(bookkeeping.as_secs_f64() * 1e6 / n),
                    gpu_bytes_per_seq_layer: offload_bytes,
                    gpu_fraction_of_dense_kv: offload_bytes as f64 / dense_kv_per_seq_layer as f64,
                });
                progress(&format!(
                    "ctx {ctx} batch {batch}: offloaded {t:.0} us vs resident {resident_us:.0} us"
                ));
            }
        }
    }
    Ok(rows_out)
}

/// Each layer's candidate blocks, read back to pinned host memory after its
/// attention (off the critical path), and what the host does with them.
struct Readback {
    rows: usize,
    kv_heads: usize,
    blocks_per_seq: usize,
    block_topk: usize,
    /// Per layer: candidates `[rows, k_b]` and their counts `[rows]`.
    staging: Vec<(PinnedHostSlice<i32>, PinnedHostSlice<i32>)>,
    /// Per layer: recorded after its read-back copies.
    landed: Vec<Option<CudaEvent>>,
    /// Scratch: the row that last took each logical block (dedup per row).
    mark: Vec<usize>,
}

impl Readback {
    fn new(
        device: &CudaDevice,
        layers: usize,
        rows: usize,
        kv_heads: usize,
        blocks_per_seq: usize,
        block_topk: usize,
    ) -> Result<Self> {
        let ctx = device.context();
        let mut staging = Vec::with_capacity(layers);
        for _ in 0..layers {
            // SAFETY: written by the device copies before any read (after `landed`).
            staging.push(unsafe {
                (
                    ctx.alloc_pinned::<i32>(rows * block_topk)?,
                    ctx.alloc_pinned::<i32>(rows)?,
                )
            });
        }
        Ok(Readback {
            rows,
            kv_heads,
            blocks_per_seq,
            block_topk,
            staging,
            landed: (0..layers).map(|_| None).collect(),
            mark: vec![0; blocks_per_seq],
        })
    }

    /// Queues the copy of `layer`'s candidates (just selected) on `stream`.
    fn issue(&mut self, stream: &Arc<CudaStream>, layer: usize, select: &SelectScratch) -> Result<()> {
        let (cand, counts) = select.candidates();
        let (c_host, n_host) = &mut self.staging[layer];
        stream.memcpy_dtoh(&cand.slice(0..self.rows * self.block_topk), c_host)?;
        stream.memcpy_dtoh(&counts.slice(0..self.rows), n_host)?;
        // Our own event: the pinned buffers' built-in one is only recorded
        // when cudarc tracks events, which the device turns off.
        let landed = stream.context().new_event(None)?;
        landed.record(stream)?;
        self.landed[layer] = Some(landed);
        Ok(())
    }

    /// Waits for `layer`'s candidates, counts what its attention found
    /// resident, and prefetches them (and the forced blocks) for its next step.
    fn account_and_prefetch(
        &mut self,
        engine: &mut OffloadEngine<CudaBackend>,
        predictor: &mut OneStepLag,
        layer: usize,
        table_host: &[i32],
    ) -> Result<()> {
        if let Some(landed) = self.landed[layer].take() {
            landed.synchronize()?;
        }
        let (cand, cand_counts) = (self.staging[layer].0.as_slice()?, self.staging[layer].1.as_slice()?);
        let (nb, k_b) = (self.blocks_per_seq, self.block_topk);
        let mut units: Vec<Unit> = Vec::with_capacity(self.rows * (k_b + 3));
        for row in 0..self.rows {
            let (seq, head) = (row / self.kv_heads, row % self.kv_heads);
            let n = cand_counts[row] as usize;
            // The sink block and the local window (the last two blocks cover it
            // and a partial block), besides the candidates.
            let forced = [0, nb.saturating_sub(2), nb - 1];
            let logical = cand[row * k_b..row * k_b + n].iter().map(|&b| b as usize).chain(forced);
            for b in logical {
                if self.mark[b] != row + 1 {
                    self.mark[b] = row + 1;
                    units.push(Unit::new(table_host[seq * nb + b] as u32, head as u16));
                }
            }
        }
        self.mark.iter_mut().for_each(|m| *m = 0);
        engine.account(layer, &units)?;
        let predicted = predictor.observe(layer, &units);
        engine.prefetch(layer, &predicted)?;
        Ok(())
    }
}
