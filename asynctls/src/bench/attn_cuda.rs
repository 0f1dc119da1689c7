//! `asynctls bench attn --device cuda`: decode attention on the GPU at real
//! shapes, GQA and MLA, dense and two-level sparse with every stage included
//! (block bounds and top-k_b, label scores and top-k_t, attention over the
//! selection), each captured as a CUDA graph (as a decode loop replays its
//! steps, so host launch overhead does not gate the small kernels) and timed
//! with CUDA events around a replay (median of many reps after a warm-up).
//! The cache is a GPU-resident paged pool (far larger than L2) written by the
//! append kernel from random data, its blocks scattered through the pool as
//! paging leaves them. Each row carries the HBM floor computed from the bytes
//! the step must read. The torch SDPA peer runs in the same call
//! (`bench/peers/torch_sdpa.py`, driven by `.gpu/run.sh`).

use anyhow::{bail, Context, Result};
use asynctls_attn::AttnShape;
use asynctls_kernels::cuda::attention::{decode_splits, DecodeKernel};
use asynctls_kernels::cuda::TokenLists;
use asynctls_kernels::cuda::{CudaOps, DecodeScratch, GpuKvPool, KvGeometry, SelectParams, SelectScratch};
use asynctls_kernels::CudaDevice;
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaStream};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use super::median;
pub use super::HBM_BYTES_PER_S;
const BLOCK: usize = 64;
/// Tokens written per append launch while filling the pool.
const FILL_CHUNK: usize = 8192;

#[derive(Debug, Clone, Serialize)]
pub struct CudaAttnRow {
    pub kind: &'static str,
    pub ctx: usize,
    pub batch: usize,
    pub budget: Option<usize>,
    pub block_topk: Option<usize>,
    /// Mean tokens attended per (sequence, KV head).
    pub attended_tokens: f64,
    pub splits: usize,
    /// Median of the whole step (selection + attention).
    pub time_us_median: f64,
    /// Medians of the selection stages and of the attention alone (sparse).
    pub select_us_median: Option<f64>,
    pub attend_us_median: Option<f64>,
    /// Bytes the step must read: K/V rows, plus block bounds and labels (sparse).
    pub bytes: usize,
    pub hbm_floor_us: f64,
    pub floor_ratio: f64,
    pub achieved_tb_s: f64,
}

/// What to sweep.
#[derive(Debug, Clone)]
pub struct CudaSweep {
    pub shape: AttnShape,
    /// MLA: values are the first `value_dim` key channels.
    pub mla: bool,
    pub label_channels: usize,
    pub block_topk: usize,
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    pub budgets: Vec<usize>,
    pub reps: usize,
}

struct Timer {
    stream: std::sync::Arc<CudaStream>,
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl Timer {
    fn event(&self) -> Result<CudaEvent> {
        Ok(self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
    }
    fn record(&self) -> Result<CudaEvent> {
        let e = self.event()?;
        e.record(&self.stream)?;
        Ok(e)
    }
}

/// 2^25 random f32 in [-1, 1) on the device: the source the benchmarks cut
/// windows of for keys, values and queries (generating gigabytes on the host is slow).
pub(crate) fn random_on_device(device: &CudaDevice, rng: &mut StdRng) -> Result<CudaSlice<f32>> {
    let host: Vec<f32> = (0..(1 << 25)).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(device.stream().clone_htod(&host)?)
}

/// Records what `work` launches on `stream` as a CUDA graph.
fn capture(stream: &std::sync::Arc<CudaStream>, work: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .context("starting a CUDA graph capture")?;
    let worked = work();
    let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    worked.context("launching while capturing a CUDA graph")?;
    graph
        .context("instantiating the captured CUDA graph")?
        .ok_or_else(|| anyhow::anyhow!("the captured step launched nothing"))
}

/// Median time of one replay of `graph`, in microseconds, after a warm-up.
fn time_graph(timer: &Timer, graph: &CudaGraph, reps: usize) -> Result<f64> {
    for _ in 0..3 {
        graph.launch()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = timer.record()?;
        graph.launch()?;
        let end = timer.record()?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64 * 1e3);
    }
    Ok(median(times))
}

/// Fills `pool` with `batch` sequences of `len` random tokens through the
/// append kernel; returns the block table (scattered blocks).
pub(crate) fn fill_pool(
    ops: &CudaOps,
    pool: &mut GpuKvPool,
    batch: usize,
    len: usize,
    random: &CudaSlice<f32>,
    rng: &mut StdRng,
) -> Result<Vec<i32>> {
    let stream = ops.device().stream().clone();
    let g = pool.geometry;
    let blocks_per_seq = len.div_ceil(BLOCK);
    let mut perm: Vec<i32> = (0..(batch * blocks_per_seq) as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.random_range(0..=i));
    }
    let key_row = g.kv_heads * g.key_dim;
    let value_row = g.kv_heads * g.value_dim;
    for seq in 0..batch {
        let table = &perm[seq * blocks_per_seq..(seq + 1) * blocks_per_seq];
        for start in (0..len).step_by(FILL_CHUNK) {
            let n = FILL_CHUNK.min(len - start);
            let slots: Vec<i32> = (start..start + n)
                .map(|t| table[t / BLOCK] * BLOCK as i32 + (t % BLOCK) as i32)
                .collect();
            // Windows of one random buffer at random offsets, so rows differ.
            let at = |rng: &mut StdRng, width: usize| rng.random_range(0..random.len() - n * width);
            let (k_at, v_at) = (at(rng, key_row), at(rng, value_row));
            let keys = random.slice(k_at..k_at + n * key_row);
            let values = random.slice(v_at..v_at + n * value_row);
            let mut k_buf = stream.alloc_zeros::<f32>(n * key_row)?;
            stream.memcpy_dtod(&keys, &mut k_buf)?;
            let mut v_buf = stream.alloc_zeros::<f32>(n * value_row)?;
            stream.memcpy_dtod(&values, &mut v_buf)?;
            let slots = stream.clone_htod(&slots)?;
            // SAFETY: the slots index the permuted blocks of this pool.
            unsafe { ops.append(pool, &k_buf, g.separate_values.then_some(&v_buf), &slots) }?;
        }
    }
    let fills: Vec<i32> = (0..batch)
        .flat_map(|_| (0..blocks_per_seq).map(|b| (len - b * BLOCK).min(BLOCK) as i32))
        .collect();
    // SAFETY: `perm` holds this pool's blocks.
    unsafe { ops.refresh_bounds(pool, &stream.clone_htod(&perm)?, &stream.clone_htod(&fills)?) }?;
    Ok(perm)
}

/// Runs the sweep for one shape.
pub fn run(device: &CudaDevice, sweep: &CudaSweep, mut progress: impl FnMut(&str)) -> Result<Vec<CudaAttnRow>> {
    let ops = CudaOps::new(device)?;
    let stream = device.stream().clone();
    let timer = Timer {
        stream: stream.clone(),
        ctx: device.context().clone(),
    };
    let shape = sweep.shape;
    let sms = device.multiprocessors();
    let mut scratch = DecodeScratch::new(&ops)?;
    let mut select_scratch = SelectScratch::new(&ops)?;
    let mut rng = StdRng::seed_from_u64(7);
    let random = random_on_device(device, &mut rng)?;
    let channels: Vec<u16> = (0..shape.kv_heads)
        .flat_map(|_| 0..sweep.label_channels as u16)
        .collect();
    let kv_bytes_per_token = if sweep.mla {
        shape.key_dim * 2
    } else {
        (shape.key_dim + shape.value_dim) * 2
    };
    let mut rows = Vec::new();
    for &seq_len in &sweep.contexts {
        for &batch in &sweep.batches {
            let blocks_per_seq = seq_len.div_ceil(BLOCK);
            let geometry = KvGeometry {
                num_blocks: batch * blocks_per_seq,
                kv_heads: shape.kv_heads,
                block_size: BLOCK,
                key_dim: shape.key_dim,
                value_dim: shape.value_dim,
                separate_values: !sweep.mla,
                label_channels: sweep.label_channels,
            };
            let mut pool = GpuKvPool::new(&ops, geometry, &channels)?;
            progress(&format!("filling ctx {seq_len} batch {batch}"));
            let table = fill_pool(&ops, &mut pool, batch, seq_len, &random, &mut rng).context("filling the pool")?;
            let table = stream.clone_htod(&table)?;
            let lens = stream.clone_htod(&vec![seq_len as i32; batch])?;
            let q_host: Vec<f32> = (0..batch * shape.q_heads * shape.key_dim)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let q = stream.clone_htod(&q_host)?;
            let mut out = stream.alloc_zeros::<f32>(batch * shape.q_heads * shape.value_dim)?;
            let view = pool.view(&table, blocks_per_seq, &lens);
            let ctas = if sweep.mla { batch } else { batch * shape.kv_heads };

            let mut jobs: Vec<Option<usize>> = vec![None];
            jobs.extend(sweep.budgets.iter().map(|&b| Some(b)));
            for budget in jobs {
                let params = budget.map(|b| SelectParams {
                    block_topk: sweep.block_topk.max(b.div_ceil(BLOCK)),
                    token_topk: b,
                    sink_blocks: 1,
                    local_blocks: 1,
                    reduce_max: false,
                });
                let attended_max = budget.map_or(seq_len, |b| b + 3 * BLOCK);
                let kernel = match (sweep.mla, budget) {
                    (true, _) => DecodeKernel::Mla,
                    (false, None) => DecodeKernel::GqaDense,
                    (false, Some(_)) => DecodeKernel::GqaSparse,
                };
                let splits = decode_splits(ctas, attended_max, kernel, sms);
                let select = |scratch: &mut SelectScratch| -> Result<()> {
                    if let Some(p) = params.as_ref() {
                        ops.sparse_select(&q, &pool, &table, blocks_per_seq, &lens, shape.q_heads, p, scratch)?;
                    }
                    Ok(())
                };
                let attend = |lists: Option<&TokenLists<'_>>,
                              scratch: &mut DecodeScratch,
                              out: &mut CudaSlice<f32>|
                 -> Result<()> {
                    ops.decode_attention(&q, &view, lists, shape.q_heads, shape.scale, splits, scratch, out)?;
                    Ok(())
                };
                // Warm up (and size the scratch buffers), then capture the step,
                // its selection and its attention as CUDA graphs, as a decode
                // loop replays them.
                for _ in 0..3 {
                    select(&mut select_scratch)?;
                    let lists = params.as_ref().map(|_| select_scratch.lists());
                    attend(lists.as_ref(), &mut scratch, &mut out)?;
                }
                let (step_graph, select_graph, attend_graph) = {
                    let g_step = capture(&stream, || {
                        select(&mut select_scratch)?;
                        let lists = params.as_ref().map(|_| select_scratch.lists());
                        attend(lists.as_ref(), &mut scratch, &mut out)
                    })?;
                    let g_select = capture(&stream, || select(&mut select_scratch))?;
                    let g_attend = capture(&stream, || {
                        let lists = params.as_ref().map(|_| select_scratch.lists());
                        attend(lists.as_ref(), &mut scratch, &mut out)
                    })?;
                    (g_step, g_select, g_attend)
                };
                let total = time_graph(&timer, &step_graph, sweep.reps)?;
                let (sel, att) = if params.is_some() {
                    (
                        Some(time_graph(&timer, &select_graph, sweep.reps)?),
                        Some(time_graph(&timer, &attend_graph, sweep.reps)?),
                    )
                } else {
                    (None, None)
                };
                let got = stream.clone_dtoh(&out)?;
                if got.iter().any(|v| !v.is_finite()) {
                    bail!("non-finite attention output at ctx {seq_len} batch {batch}");
                }
                let rows_kv = batch * shape.kv_heads;
                let (attended, bytes) = match &params {
                    None => (seq_len as f64, rows_kv * seq_len * kv_bytes_per_token),
                    Some(p) => {
                        let counts = stream.clone_dtoh(select_scratch.lists().counts)?;
                        let tokens: usize = counts[..rows_kv].iter().map(|&c| c as usize).sum();
                        let ranked = blocks_per_seq.saturating_sub(3);
                        // bf16 bounds of every ranked block.
                        let meta = rows_kv * ranked * 2 * shape.key_dim * 2;
                        let labels = rows_kv * p.block_topk.min(ranked) * BLOCK * (sweep.label_channels / 2 + 4);
                        (
                            tokens as f64 / rows_kv as f64,
                            meta + labels + tokens * kv_bytes_per_token,
                        )
                    }
                };
                let t = total;
                let floor = bytes as f64 / HBM_BYTES_PER_S * 1e6;
                rows.push(CudaAttnRow {
                    kind: if budget.is_none() { "dense" } else { "tls" },
                    ctx: seq_len,
                    batch,
                    budget,
                    block_topk: params.as_ref().map(|p| p.block_topk),
                    attended_tokens: attended,
                    splits,
                    time_us_median: t,
                    select_us_median: sel,
                    attend_us_median: att,
                    bytes,
                    hbm_floor_us: floor,
                    floor_ratio: t / floor,
                    achieved_tb_s: bytes as f64 / (t * 1e-6) / 1e12,
                });
                progress(&format!("ctx {seq_len} batch {batch} {budget:?}: {t:.1} us"));
            }
        }
    }
    Ok(rows)
}
