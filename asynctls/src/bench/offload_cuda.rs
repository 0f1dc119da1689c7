//! `asynctls bench offload --device cuda`: two-level sparse decode with the
//! K/V resident on the GPU against the same decode with the K/V offloaded to
//! pinned host memory, on the same selections, over all the layers of a
//! step.
//!
//! Each of `layers` layers of the Qwen3-8B shape has a paged pool written by
//! the append kernel (its keys give the selection's GPU-resident metadata:
//! block bounds and INT4 labels). Queries drift: every step each layer's
//! query is the last plus uniform noise of amplitude `drift`, so consecutive
//! selections overlap as in decoding. Modes, each on the same queries:
//!
//! - `gpu-resident`: selection, then attention over the full paged pool;
//! - `offloaded-device` (one per predictor): the K/V in the host tier, the
//!   attention over the resident slots through the device's unit -> slot
//!   table (a miss read in place from the host tier over PCIe), and after
//!   each layer's attention the device-side resolver
//!   (asynctls-offload's `gpu_resolver`): resolve on a stream of its own
//!   beside the token stage, promotion and copies on a copy stream
//!   overlapping the next layers,
//!   joined at the end of the step. No host round trip: the step is
//!   launches only;
//! - `offloaded-host` (one per `memcpy_min_bytes`, when asked): the
//!   host-driven offload engine, whose host reads back each layer's
//!   candidates and prefetches for the next step.
//!
//! Timing: after warm-up, `steps` steps issued eagerly (host launch time
//! measured) and the same number replayed as CUDA graphs, one graph per
//! step captured beforehand (each reads its step's queries in place); step
//! time = wall time over the steps with the streams synchronized at both
//! ends. The device resolver's telemetry (hits, misses, overlap, promoted,
//! bytes, copy time and the part of it the compute waited for) comes from
//! separately synchronized eager steps with copy-stream timing events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use asynctls_kernels::cuda::gather::{ResolveInput, SelectionShape};
use asynctls_kernels::cuda::graph::StepGraph;
use asynctls_kernels::cuda::{
    attention::{decode_splits, DecodeKernel},
    CudaOps, DecodeScratch, GpuKvPool, KvGeometry, OffloadedKv, PagedKvView, SelectParams, SelectScratch, SlotLookup,
};
use asynctls_kernels::CudaDevice;
use asynctls_offload::cuda::{CudaBackend, CudaLayout};
use asynctls_offload::gpu_resolver::{GpuResidency, ResolverSizing};
use asynctls_offload::{
    OffloadConfig, OffloadEngine, OneStepLag, Predictor, PromotePolicy, ResidencyStats, StepMetrics, Unit,
};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use super::attn_cuda::{fill_pool, random_on_device};

const BLOCK: usize = 64;
const SINK_BLOCKS: usize = 1;
const LOCAL_BLOCKS: usize = 1;
const WARMUP: usize = 3;

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
    /// The device resolver's predictors to run (`one-step-lag`, `union`).
    pub predictors: Vec<PromotePolicyKind>,
    /// CTAs of the device resolver's copy kernel, one run per value (0: one per SM).
    pub copy_ctas: Vec<usize>,
    /// memcpy threshold(s) of the host-driven engine to compare (bytes; 0 =
    /// all memcpy, usize::MAX = all gather); empty: that mode does not run.
    pub memcpy_min_bytes: Vec<usize>,
    /// Pinned host memory the host tiers may take; beyond it the layers
    /// share host pools (their data alias; residency and traffic stay their own).
    pub host_budget_bytes: usize,
    /// Run the GPU-resident mode too. Without it the K/V never sit on the
    /// GPU all at once: each layer is filled, copied to the host tier and
    /// dropped, so batches whose K/V exceed GPU memory run offloaded.
    pub resident: bool,
}

/// Which predictor the device resolver follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromotePolicyKind {
    OneStepLag,
    UnionOfLastTwo,
}

impl PromotePolicyKind {
    fn policy(self, max_promote: usize) -> PromotePolicy {
        match self {
            PromotePolicyKind::OneStepLag => PromotePolicy::one_step_lag(max_promote),
            PromotePolicyKind::UnionOfLastTwo => PromotePolicy::union_of_last_two(max_promote),
        }
    }
}

impl std::str::FromStr for PromotePolicyKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "one-step-lag" | "lag" => Ok(PromotePolicyKind::OneStepLag),
            "union" | "union-of-last-two" => Ok(PromotePolicyKind::UnionOfLastTwo),
            other => Err(format!("unknown predictor {other:?} (one-step-lag or union)")),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OffloadRow {
    pub ctx: usize,
    pub batch: usize,
    pub layers: usize,
    pub mode: String,
    /// The device resolver's predictor and its copy kernel's CTAs.
    pub predictor: Option<String>,
    pub copy_ctas: Option<usize>,
    pub memcpy_min_bytes: Option<usize>,
    /// Step time with the step replayed as a CUDA graph (not for the host-driven engine).
    pub graph_step_us: Option<f64>,
    /// Step time with every launch issued from the host.
    pub eager_step_us: f64,
    /// The offloaded step over the GPU-resident one, graph against graph
    /// where both have one, else eager against eager (same run).
    pub vs_resident: Option<f64>,
    pub hit_rate: Option<f64>,
    pub miss_rate: Option<f64>,
    /// Of the units a step attended, the resident ones the previous step attended too.
    pub overlap_rate: Option<f64>,
    pub late_per_step: Option<f64>,
    pub h2d_bytes_per_step: Option<f64>,
    /// Misses left without a slot per step.
    pub unplaced_per_step: Option<f64>,
    pub transfer_us_per_step: Option<f64>,
    pub exposed_us_per_step: Option<f64>,
    pub hidden_fraction: Option<f64>,
    pub memcpy_units: Option<usize>,
    pub gathered_units: Option<usize>,
    /// Host wall time per step issuing the step's GPU work eagerly.
    pub host_launch_us_per_step: f64,
    /// Host wall time of one step's graph launch on an idle GPU (median).
    pub host_graph_launch_us_per_step: Option<f64>,
    /// Host wall time per step in the host-driven engine's bookkeeping off
    /// the critical path (waiting for a layer's read-back, hit/miss
    /// accounting, prefetch decisions and copy issue, end of step).
    pub host_bookkeeping_us_per_step: Option<f64>,
    /// GPU bytes one sequence holds per layer in this mode (K/V or slots, plus bounds and labels).
    pub gpu_bytes_per_seq_layer: usize,
    /// The same over the sequence's dense K/V per layer.
    pub gpu_fraction_of_dense_kv: f64,
    /// Host pools behind the layers (fewer than the layers: shared).
    pub host_tiers: Option<usize>,
    /// Per telemetry step, per layer: the device resolver's counters.
    pub telemetry: Option<Vec<StepTelemetry>>,
}

impl OffloadRow {
    /// The copy time of `steps` steps (us, in all) and the part of it the
    /// compute waited for: per step, and the fraction hidden.
    fn copy_times(&mut self, transfer: f64, exposed: f64, steps: f64) {
        self.transfer_us_per_step = Some(transfer / steps);
        self.exposed_us_per_step = Some(exposed / steps);
        self.hidden_fraction = Some(asynctls_offload::hidden_fraction(transfer, exposed));
    }
}

/// One telemetry step of the device resolver.
#[derive(Debug, Clone, Serialize)]
pub struct StepTelemetry {
    pub transfer_us: f64,
    pub exposed_us: f64,
    pub layers: Vec<ResidencyStats>,
}

struct Layer {
    pool: GpuKvPool,
    table: CudaSlice<i32>,
    table_host: Vec<i32>,
}

/// What every mode of one (ctx, batch) point shares.
struct Point<'a> {
    ops: &'a CudaOps,
    device: &'a CudaDevice,
    sweep: &'a OffloadSweep,
    ctx: usize,
    batch: usize,
    blocks_per_seq: usize,
    rows: usize,
    layers: Vec<Layer>,
    lens: CudaSlice<i32>,
    /// `[step][layer]`, on the device.
    queries: Vec<Vec<CudaSlice<f32>>>,
    params: SelectParams,
    splits: usize,
    scale: f32,
    dense_kv_per_seq_layer: usize,
    metadata_per_seq_layer: usize,
}

/// Runs the sweep.
pub fn run(device: &CudaDevice, sweep: &OffloadSweep, mut progress: impl FnMut(&str)) -> Result<Vec<OffloadRow>> {
    let ops = CudaOps::new(device)?;
    let stream = device.stream().clone();
    let sms = device.multiprocessors();
    let (qh, kvh, d) = (sweep.q_heads, sweep.kv_heads, sweep.head_dim);
    let r = 32.min(d);
    let mut rng = StdRng::seed_from_u64(11);
    let random = random_on_device(device, &mut rng)?;
    let channels: Vec<u16> = (0..kvh).flat_map(|_| 0..r as u16).collect();
    let params = SelectParams {
        block_topk: sweep.block_topk,
        token_topk: sweep.token_topk,
        sink_blocks: SINK_BLOCKS,
        local_blocks: LOCAL_BLOCKS,
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
            let tiers = host_tiers(sweep, num_blocks * kvh * BLOCK * d * 2 * 2);
            let sizing = ResolverSizing {
                rows,
                max_entries: SINK_BLOCKS + sweep.block_topk + LOCAL_BLOCKS + 1,
                max_blocks: blocks_per_seq,
            };
            let entries = sizing.rows * sizing.max_entries;
            let first = sweep
                .predictors
                .first()
                .copied()
                .unwrap_or(PromotePolicyKind::OneStepLag);
            let layout = offload_layout(sweep, rows, batch * blocks_per_seq)?;
            // Every miss of a step can be promoted (the copy list is sized for it).
            let new_residency = || GpuResidency::with_host_tiers(device, layout, first.policy(entries), sizing, tiers);
            // Without the resident mode, each layer's K/V goes to the host
            // tier as soon as it is written and leaves the GPU.
            let mut residency = if sweep.resident { None } else { Some(new_residency()?) };
            progress(&format!("ctx {ctx} batch {batch}: filling {} layers", sweep.layers));
            let mut layers = Vec::new();
            for l in 0..sweep.layers {
                let mut pool = GpuKvPool::new(&ops, geometry, &channels)?;
                let table_host = fill_pool(&ops, &mut pool, batch, ctx, &random, &mut rng).context("filling a pool")?;
                if let Some(residency) = residency.as_mut() {
                    to_host_tier(&stream, &mut pool, residency, l, tiers)?;
                }
                layers.push(Layer {
                    table: stream.clone_htod(&table_host)?,
                    table_host,
                    pool,
                });
            }
            let lens = stream.clone_htod(&vec![ctx as i32; batch])?;
            // The drifting queries of every step (warm-up, eager, graph and
            // telemetry steps), the same for every mode.
            let total_steps = WARMUP + 2 * sweep.steps + TELEMETRY_STEPS;
            let mut queries: Vec<Vec<CudaSlice<f32>>> = Vec::new();
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
            let mut point = Point {
                ops: &ops,
                device,
                sweep,
                ctx,
                batch,
                blocks_per_seq,
                rows,
                layers,
                lens,
                queries,
                params,
                splits: decode_splits(rows, max_tokens_guess, DecodeKernel::GqaSparse, sms),
                scale: 1.0 / (d as f32).sqrt(),
                dense_kv_per_seq_layer: ctx * kvh * d * 2 * 2,
                metadata_per_seq_layer: blocks_per_seq * kvh * 2 * d * 2 + ctx * kvh * (r / 2 + 4),
            };
            let (mut resident_graph, mut resident_eager) = (None, None);
            if sweep.resident {
                progress(&format!("ctx {ctx} batch {batch}: resident"));
                let resident = point.resident()?;
                (resident_graph, resident_eager) = (resident.graph_step_us, Some(resident.eager_step_us));
                rows_out.push(resident);
            }
            let ratio = |row: &mut OffloadRow| {
                row.vs_resident = match (row.graph_step_us, resident_graph, resident_eager) {
                    (Some(g), Some(rg), _) => Some(g / rg),
                    (_, _, Some(re)) => Some(row.eager_step_us / re),
                    _ => None,
                };
            };
            if sweep.predictors.is_empty() && sweep.memcpy_min_bytes.is_empty() {
                continue;
            }
            // The host tiers are filled from the GPU pools; then the pools'
            // K/V leave the GPU (the offloaded modes keep only the metadata).
            let mut residency = match residency.take() {
                Some(r) => r,
                None => {
                    let mut r = new_residency()?;
                    for (l, layer) in point.layers.iter_mut().enumerate() {
                        to_host_tier(&stream, &mut layer.pool, &mut r, l, tiers)?;
                    }
                    r
                }
            };
            let default_ctas = residency.copy_ctas;
            let ctas = if sweep.copy_ctas.is_empty() {
                vec![0]
            } else {
                sweep.copy_ctas.clone()
            };
            for (&kind, &copy_ctas) in sweep.predictors.iter().flat_map(|k| ctas.iter().map(move |c| (k, c))) {
                progress(&format!(
                    "ctx {ctx} batch {batch}: offloaded, device resolver ({kind:?}, {copy_ctas} copy CTAs)"
                ));
                residency.reset(kind.policy(entries))?;
                residency.copy_ctas = if copy_ctas == 0 { default_ctas } else { copy_ctas };
                let mut row = point.device_resolver(&mut residency, tiers)?;
                row.copy_ctas = Some(residency.copy_ctas);
                ratio(&mut row);
                progress(&format!(
                    "ctx {ctx} batch {batch}: device resolver {:.0} us",
                    row.graph_step_us.unwrap_or(row.eager_step_us)
                ));
                rows_out.push(row);
            }
            for &memcpy_min_bytes in &sweep.memcpy_min_bytes {
                progress(&format!(
                    "ctx {ctx} batch {batch}: offloaded, host engine (memcpy >= {memcpy_min_bytes} B)"
                ));
                let mut row = point.host_engine(memcpy_min_bytes, &residency, tiers)?;
                ratio(&mut row);
                rows_out.push(row);
            }
        }
    }
    Ok(rows_out)
}

const TELEMETRY_STEPS: usize = 5;

/// The offloaded layout of a point: slack x k_b + 3 slots per row.
fn offload_layout(sweep: &OffloadSweep, rows: usize, host_blocks: usize) -> Result<CudaLayout> {
    let config = OffloadConfig::with_slack(rows, sweep.block_topk, 3, sweep.slack)?;
    Ok(CudaLayout {
        num_layers: sweep.layers,
        kv_heads: sweep.kv_heads,
        host_blocks,
        block_size: BLOCK,
        key_dim: sweep.head_dim,
        value_dim: sweep.head_dim,
        slots_per_layer: config.slots_per_layer,
    })
}

/// Copies `pool`'s K/V into layer `layer`'s host tier (when the layer has a
/// pool of its own, `layer < tiers`), then drops them from the GPU: the
/// offloaded modes keep only the metadata there.
fn to_host_tier(
    stream: &Arc<CudaStream>,
    pool: &mut GpuKvPool,
    residency: &mut GpuResidency,
    layer: usize,
    tiers: usize,
) -> Result<()> {
    if layer < tiers {
        let (hk, hv) = residency.host_mut(layer)?;
        stream.memcpy_dtoh(&pool.keys, hk)?;
        stream.memcpy_dtoh(
            pool.values.as_ref().context("a GQA pool has values")?,
            hv.context("values")?,
        )?;
        stream.synchronize()?;
    }
    pool.keys = stream.alloc_zeros(8)?;
    pool.values = Some(stream.alloc_zeros(8)?);
    Ok(())
}

/// Host pools for the layers within the budget (at least one).
fn host_tiers(sweep: &OffloadSweep, bytes_per_layer: usize) -> usize {
    (sweep.host_budget_bytes / bytes_per_layer.max(1)).clamp(1, sweep.layers.max(1))
}

/// Per step: eager wall time and its host launch time, and the graphs' wall
/// time, in us; and the graphs.
struct Timed {
    eager: f64,
    launch: f64,
    graph: f64,
    graphs: Vec<StepGraph>,
}

/// The host's cost of a step as a graph: one launch on an idle GPU (median
/// over `graphs`; in a timed loop a launch also waits while the launch
/// queue is full). Replays the graphs.
fn launch_latency(stream: &CudaStream, graphs: &[StepGraph]) -> Result<Option<f64>> {
    let mut launches: Vec<f64> = Vec::with_capacity(graphs.len());
    for g in graphs {
        stream.synchronize()?;
        let issued = Instant::now();
        g.launch()?;
        launches.push(issued.elapsed().as_secs_f64() * 1e6);
    }
    stream.synchronize()?;
    launches.sort_by(f64::total_cmp);
    Ok(launches.get(launches.len() / 2).copied())
}

impl Point<'_> {
    fn stream(&self) -> Arc<CudaStream> {
        self.device.stream().clone()
    }

    fn row(&self, mode: &str, eager_step_us: f64, launch_us: f64, gpu_bytes: usize) -> OffloadRow {
        OffloadRow {
            ctx: self.ctx,
            batch: self.batch,
            layers: self.sweep.layers,
            mode: mode.into(),
            predictor: None,
            copy_ctas: None,
            memcpy_min_bytes: None,
            graph_step_us: None,
            eager_step_us,
            vs_resident: None,
            hit_rate: None,
            miss_rate: None,
            overlap_rate: None,
            late_per_step: None,
            h2d_bytes_per_step: None,
            unplaced_per_step: None,
            transfer_us_per_step: None,
            exposed_us_per_step: None,
            hidden_fraction: None,
            memcpy_units: None,
            gathered_units: None,
            host_launch_us_per_step: launch_us,
            host_graph_launch_us_per_step: None,
            host_bookkeeping_us_per_step: None,
            gpu_bytes_per_seq_layer: gpu_bytes,
            gpu_fraction_of_dense_kv: gpu_bytes as f64 / self.dense_kv_per_seq_layer as f64,
            host_tiers: None,
            telemetry: None,
        }
    }

    /// Times `step` (which issues step `i`'s work) over the eager steps and
    /// then over graphs captured of the graph steps (after the caller's
    /// [`WARMUP`] steps).
    fn time_modes(&self, mut step: impl FnMut(usize) -> Result<()>) -> Result<Timed> {
        let stream = self.stream();
        let steps = self.sweep.steps;
        stream.synchronize()?;
        let start = Instant::now();
        for i in WARMUP..WARMUP + steps {
            step(i)?;
        }
        let launch = start.elapsed();
        stream.synchronize()?;
        let eager = start.elapsed().as_secs_f64() * 1e6 / steps as f64;
        let launch = launch.as_secs_f64() * 1e6 / steps as f64;
        let mut captured = Vec::with_capacity(steps);
        for i in WARMUP + steps..WARMUP + 2 * steps {
            let (g, ()) = self.device.capture(|| step(i))?;
            captured.push(g);
        }
        for g in &captured {
            g.upload()?;
        }
        stream.synchronize()?;
        let start = Instant::now();
        for g in &captured {
            g.launch()?;
        }
        stream.synchronize()?;
        let graph = start.elapsed().as_secs_f64() * 1e6 / steps as f64;
        Ok(Timed {
            eager,
            launch,
            graph,
            graphs: captured,
        })
    }

    /// `layer`'s selection for query `q` into `select`, calling `between`
    /// once its candidates are issued (see `CudaOps::sparse_select_staged`).
    fn select(
        &self,
        q: &CudaSlice<f32>,
        layer: &Layer,
        select: &mut SelectScratch,
        between: impl FnMut(&SelectScratch) -> Result<()>,
    ) -> Result<()> {
        self.ops.sparse_select_staged(
            q,
            &layer.pool,
            &layer.table,
            self.blocks_per_seq,
            &self.lens,
            self.sweep.q_heads,
            &self.params,
            select,
            between,
        )
    }

    /// The attention of query `q` over `view`, on the tokens `select` chose.
    fn attend(
        &self,
        q: &CudaSlice<f32>,
        view: &PagedKvView<'_>,
        select: &SelectScratch,
        scratch: &mut DecodeScratch,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let lists = select.lists();
        Ok(self.ops.decode_attention(
            q,
            view,
            Some(&lists),
            self.sweep.q_heads,
            self.scale,
            self.splits,
            scratch,
            out,
        )?)
    }

    fn resident(&mut self) -> Result<OffloadRow> {
        let mut select = SelectScratch::new(self.ops)?;
        let mut scratch = DecodeScratch::new(self.ops)?;
        let (qh, d) = (self.sweep.q_heads, self.sweep.head_dim);
        let mut out = self.stream().alloc_zeros::<f32>(self.batch * qh * d)?;
        let this = &*self;
        let mut step = |i: usize| -> Result<()> {
            for (layer, q) in this.layers.iter().zip(&this.queries[i]) {
                this.select(q, layer, &mut select, |_| Ok(()))?;
                let view = layer.pool.view(&layer.table, this.blocks_per_seq, &this.lens);
                this.attend(q, &view, &select, &mut scratch, &mut out)?;
            }
            Ok(())
        };
        for i in 0..WARMUP {
            step(i)?;
        }
        let timed = this.time_modes(step)?;
        let bytes = self.dense_kv_per_seq_layer + self.metadata_per_seq_layer;
        let mut row = self.row("gpu-resident", timed.eager, timed.launch, bytes);
        row.graph_step_us = Some(timed.graph);
        row.host_graph_launch_us_per_step = launch_latency(&self.stream(), &timed.graphs)?;
        Ok(row)
    }

    fn layout(&self) -> Result<CudaLayout> {
        offload_layout(self.sweep, self.rows, self.batch * self.blocks_per_seq)
    }

    /// What the resolver reads of `layer`'s step: the selection's candidates.
    fn resolve_input<'a>(&'a self, select: &'a SelectScratch, layer: &'a Layer) -> ResolveInput<'a> {
        let shape = SelectionShape::of(&self.params, self.blocks_per_seq, self.sweep.kv_heads, BLOCK);
        ResolveInput::new(select, &self.lens, &layer.table, shape)
    }

    fn device_resolver(&mut self, residency: &mut GpuResidency, tiers: usize) -> Result<OffloadRow> {
        let layout = self.layout()?;
        let policy = residency.policy();
        let mut select = SelectScratch::new(self.ops)?;
        let mut scratch = DecodeScratch::new(self.ops)?;
        let (qh, d) = (self.sweep.q_heads, self.sweep.head_dim);
        let mut out = self.stream().alloc_zeros::<f32>(self.batch * qh * d)?;
        let this = &*self;
        let mut step = |i: usize, residency: &mut GpuResidency| -> Result<()> {
            residency.begin_step()?;
            for (l, (layer, q)) in this.layers.iter().zip(&this.queries[i]).enumerate() {
                // The resolve needs only the candidates: it runs on its own
                // stream while the token stage scores.
                this.select(q, layer, &mut select, |select| -> Result<()> {
                    let input = this.resolve_input(select, layer);
                    // SAFETY: `fill_pool`'s block table maps each sequence's
                    // blocks to distinct physical blocks of the pool, which
                    // the host tier mirrors.
                    unsafe { residency.resolve(l, &input) }?;
                    Ok(())
                })?;
                residency.before_attention(l)?;
                let (keys, values, offload) = residency.offloaded(l);
                let view = PagedKvView {
                    keys,
                    values,
                    offload: Some(offload),
                    ..layer.pool.view(&layer.table, this.blocks_per_seq, &this.lens)
                };
                this.attend(q, &view, &select, &mut scratch, &mut out)?;
                residency.after_attention(l)?;
            }
            residency.end_step()?;
            Ok(())
        };
        for i in 0..WARMUP {
            step(i, residency)?;
        }
        // Counted from the first timed step (the first steps miss everything).
        let before = residency.stats()?;
        let timed_run = this.time_modes(|i| step(i, residency))?;
        let timed = residency.stats()?;
        // Telemetry: synchronized eager steps with copy-stream timing.
        residency.timing = true;
        let mut telemetry = Vec::with_capacity(TELEMETRY_STEPS);
        let first = WARMUP + 2 * this.sweep.steps;
        for i in first..first + TELEMETRY_STEPS {
            let was = residency.stats()?;
            step(i, residency)?;
            let timing = residency.copy_timing()?.unwrap_or_default();
            let now = residency.stats()?;
            telemetry.push(StepTelemetry {
                transfer_us: timing.transfer.as_secs_f64() * 1e6,
                exposed_us: timing.exposed.as_secs_f64() * 1e6,
                layers: now.iter().zip(&was).map(|(n, w)| n.since(*w)).collect(),
            });
        }
        // Counters over the timed (eager and graph) steps, all layers.
        let total = timed
            .iter()
            .zip(&before)
            .fold(ResidencyStats::default(), |acc, (t, b)| acc + t.since(*b));
        let timed_steps = (2 * this.sweep.steps) as f64;
        // Slots, the tables (unit -> slot, slot -> unit and recency) per sequence and layer.
        let slots_bytes = (layout.resident_bytes() / this.sweep.layers
            + layout.host_blocks * layout.kv_heads * 4
            + layout.slots_per_layer * 8)
            / this.batch;
        let bytes = slots_bytes + this.metadata_per_seq_layer;
        let mut row = this.row("offloaded-device", timed_run.eager, timed_run.launch, bytes);
        row.predictor = Some(policy.name().into());
        row.graph_step_us = Some(timed_run.graph);
        // Last: the replays move the residency on.
        row.host_graph_launch_us_per_step = launch_latency(&this.stream(), &timed_run.graphs)?;
        row.hit_rate = Some(total.hit_rate());
        row.miss_rate = Some(total.miss_rate());
        row.overlap_rate = Some(total.overlap_rate());
        row.h2d_bytes_per_step = Some(total.h2d_bytes as f64 / timed_steps);
        row.unplaced_per_step = Some(total.unplaced as f64 / timed_steps);
        let n = telemetry.len().max(1) as f64;
        let transfer: f64 = telemetry.iter().map(|t| t.transfer_us).sum();
        let exposed: f64 = telemetry.iter().map(|t| t.exposed_us).sum();
        row.copy_times(transfer, exposed, n);
        row.host_tiers = Some(tiers);
        row.telemetry = Some(telemetry);
        Ok(row)
    }

    fn host_engine(&mut self, memcpy_min_bytes: usize, tier: &GpuResidency, tiers: usize) -> Result<OffloadRow> {
        let stream = self.stream();
        let layout = self.layout()?;
        if tiers < layout.num_layers {
            anyhow::bail!(
                "the host-driven engine keeps a host pool per layer: {} layers do not fit the host budget \
                 (lower --layers or raise --host-budget-gb)",
                layout.num_layers
            );
        }
        let (qh, d, kvh) = (self.sweep.q_heads, self.sweep.head_dim, self.sweep.kv_heads);
        let mut backend = CudaBackend::new(self.device, layout)?;
        backend.memcpy_min_bytes = memcpy_min_bytes;
        for l in 0..layout.num_layers {
            let (k, v) = tier.pools.host(l);
            let (hk, hv) = backend.host_mut(l);
            hk.copy_from_slice(k);
            hv.context("values")?
                .copy_from_slice(v.context("a GQA host tier has values")?);
        }
        let mut engine = OffloadEngine::new(backend);
        let mut predictor = OneStepLag;
        let mut readback = Readback::new(
            self.device,
            self.sweep.layers,
            self.rows,
            kvh,
            self.blocks_per_seq,
            self.sweep.block_topk,
        )?;
        let mut select = SelectScratch::new(self.ops)?;
        let mut scratch = DecodeScratch::new(self.ops)?;
        let mut out = stream.alloc_zeros::<f32>(self.batch * qh * d)?;
        let mut pending: Option<usize> = None;
        let mut start = Instant::now();
        let mut metrics: Vec<StepMetrics> = Vec::new();
        let (mut launch, mut bookkeeping) = (Duration::ZERO, Duration::ZERO);
        let steps = WARMUP + self.sweep.steps;
        for (step, qs) in self.queries[..steps].iter().enumerate() {
            if step == WARMUP {
                stream.synchronize()?;
                start = Instant::now();
                (launch, bookkeeping) = (Duration::ZERO, Duration::ZERO);
            }
            engine.begin_step();
            // The critical path: selection, then attention over the slots
            // (after the copies into them), nothing on the host.
            for (l, (layer, q)) in self.layers.iter().zip(qs).enumerate() {
                let issued = Instant::now();
                self.select(q, layer, &mut select, |_| Ok(()))?;
                engine.order_before_attention(l)?;
                let backend = engine.backend();
                let (host_keys, host_values) = backend.host_device_ptrs(l);
                let view = PagedKvView {
                    keys: &backend.pools.slot_keys[l],
                    values: Some(&backend.pools.slot_values[l]),
                    offload: Some(OffloadedKv {
                        slots: SlotLookup::ByUnit(&backend.unit_slots[l]),
                        host_keys,
                        host_values,
                    }),
                    ..layer.pool.view(&layer.table, self.blocks_per_seq, &self.lens)
                };
                self.attend(q, &view, &select, &mut scratch, &mut out)?;
                engine.release(l)?;
                launch += issued.elapsed();
                let booked = Instant::now();
                // Off the critical path: the layer launched before this one
                // (here or in the last step) has finished on the GPU by now
                // or soon; its candidate and forced blocks are what it read
                // (counted) and what its next step will read (prefetched).
                if let Some(prev) = pending.replace(l) {
                    readback.account_and_prefetch(&mut engine, &mut predictor, prev, &self.layers[prev].table_host)?;
                }
                readback.issue(&stream, l, &select)?;
                bookkeeping += booked.elapsed();
            }
            let booked = Instant::now();
            let m = engine.end_step()?;
            bookkeeping += booked.elapsed();
            if step >= WARMUP {
                metrics.push(m);
            }
        }
        stream.synchronize()?;
        let t = start.elapsed().as_secs_f64() * 1e6 / self.sweep.steps as f64;
        if let Some(prev) = pending.take() {
            readback.account_and_prefetch(&mut engine, &mut predictor, prev, &self.layers[prev].table_host)?;
        }
        let n = metrics.len().max(1) as f64;
        let sum = |f: fn(&StepMetrics) -> f64| metrics.iter().map(f).sum::<f64>();
        let requested = sum(|m| m.requested as f64).max(1.0);
        let transfer = sum(|m| m.transfer_us);
        let exposed = sum(|m| m.exposed_us);
        let counts = engine.backend().counts;
        // Slots and the unit -> slot table, per sequence and layer.
        let slots_bytes = (layout.resident_bytes() / self.sweep.layers + layout.host_blocks * kvh * 4) / self.batch;
        let mut row = self.row(
            "offloaded-host",
            t,
            launch.as_secs_f64() * 1e6 / n,
            slots_bytes + self.metadata_per_seq_layer,
        );
        row.memcpy_min_bytes = Some(memcpy_min_bytes);
        row.hit_rate = Some(sum(|m| m.hits as f64) / requested);
        row.miss_rate = Some(sum(|m| m.misses as f64) / requested);
        row.late_per_step = Some(sum(|m| m.late as f64) / n);
        row.h2d_bytes_per_step = Some(sum(|m| m.h2d_bytes as f64) / n);
        row.copy_times(transfer, exposed, n);
        row.memcpy_units = Some(counts.memcpy_units);
        row.gathered_units = Some(counts.gathered_units);
        row.host_bookkeeping_us_per_step = Some(bookkeeping.as_secs_f64() * 1e6 / n);
        row.host_tiers = Some(layout.num_layers);
        Ok(row)
    }
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
