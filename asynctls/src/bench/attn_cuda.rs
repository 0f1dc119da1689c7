//! `asynctls bench attn --device cuda`: the paged decode-attention kernel on
//! the GPU at real shapes, timed with CUDA events (median of many reps after
//! a warm-up, K/V pools far larger than L2, random bf16 data, blocks scattered
//! through the pool as paging leaves them), next to the HBM floor computed
//! from the bytes it must read. The torch SDPA peer runs in the same call
//! (`bench/peers/torch_sdpa.py`, driven by `.gpu/run.sh`).
//!
//! Measured today: dense decode, and the exact-attention stage of sparse
//! decode over `budget` tokens (plus sink and local window) per KV head. The
//! selection stages (block scores, label top-k) are not yet on the GPU, so
//! the sparse row is that stage alone and says so.

use anyhow::{bail, Result};
use asynctls_kernels::cuda::{CudaOps, DecodeScratch, PagedKvView, TokenLists};
use asynctls_kernels::CudaDevice;
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

/// The HBM bandwidth the floor is computed with (H200 spec, bytes/s).
pub const HBM_BYTES_PER_S: f64 = 4.8e12;
const BLOCK: usize = 64;

#[derive(Debug, Clone, Serialize)]
pub struct CudaAttnRow {
    pub kind: &'static str,
    pub ctx: usize,
    pub batch: usize,
    pub budget: Option<usize>,
    pub attended_tokens: usize,
    pub splits: usize,
    pub time_us_median: f64,
    pub bytes: usize,
    pub hbm_floor_us: f64,
    pub floor_ratio: f64,
    pub achieved_tb_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the sweep for a GQA shape.
#[allow(clippy::too_many_arguments)]
pub fn run(
    device: &CudaDevice,
    q_heads: usize,
    kv_heads: usize,
    d: usize,
    contexts: &[usize],
    batches: &[usize],
    budgets: &[usize],
    reps: usize,
    mut progress: impl FnMut(&str),
) -> Result<Vec<CudaAttnRow>> {
    let ops = CudaOps::new(device)?;
    let stream = device.stream().clone();
    let ctx = device.context().clone();
    let mut scratch = DecodeScratch::new(&ops)?;
    let mut rng = StdRng::seed_from_u64(7);
    // One random chunk, copied over the pools (generating gigabytes on the host is slow).
    let chunk: Vec<bf16> = (0..(1 << 24))
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect();
    let mut rows = Vec::new();
    for &seq_len in contexts {
        for &batch in batches {
            let blocks_per_seq = seq_len.div_ceil(BLOCK);
            let num_blocks = batch * blocks_per_seq;
            let pool_len = num_blocks * kv_heads * BLOCK * d;
            let mut keys = stream.alloc_zeros::<bf16>(pool_len)?;
            let mut values = stream.alloc_zeros::<bf16>(pool_len)?;
            for pool in [&mut keys, &mut values] {
                let mut at = 0;
                while at < pool_len {
                    let n = chunk.len().min(pool_len - at);
                    // Offset the source each time so rows differ.
                    let off = rng.random_range(0..chunk.len() - n + 1);
                    stream.memcpy_htod(&chunk[off..off + n], &mut pool.slice_mut(at..at + n))?;
                    at += n;
                }
            }
            // Scatter the logical blocks through the pool.
            let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
            for i in (1..perm.len()).rev() {
                perm.swap(i, rng.random_range(0..=i));
            }
            let table = stream.clone_htod(&perm)?;
            let lens = stream.clone_htod(&vec![seq_len as i32; batch])?;
            let q_host: Vec<f32> = (0..batch * q_heads * d)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let q = stream.clone_htod(&q_host)?;
            let mut out = stream.alloc_zeros::<f32>(q_host.len())?;
            let view = PagedKvView {
                keys: &keys,
                values: &values,
                kv_heads,
                block_size: BLOCK,
                head_dim: d,
                block_table: &table,
                max_blocks: blocks_per_seq,
                lens: &lens,
            };
            let mut jobs: Vec<Option<usize>> = vec![None];
            jobs.extend(budgets.iter().map(|&b| Some(b)));
            for budget in jobs {
                // Token lists: sink block, local block, and `budget` random positions between.
                let (lists, attended) = match budget {
                    None => (None, seq_len),
                    Some(b) => {
                        let mut per_head = Vec::new();
                        let mut count = 0;
                        for _ in 0..batch * kv_heads {
                            let mut t: Vec<i32> = (0..BLOCK as i32).collect();
                            let mid: Vec<i32> = (0..b)
                                .map(|_| rng.random_range(BLOCK..seq_len - BLOCK) as i32)
                                .collect();
                            t.extend(mid);
                            t.extend((seq_len - BLOCK) as i32..seq_len as i32);
                            t.sort_unstable();
                            t.dedup();
                            count = count.max(t.len());
                            per_head.push(t);
                        }
                        let mut flat = vec![0i32; per_head.len() * count];
                        let counts: Vec<i32> = per_head.iter().map(|t| t.len() as i32).collect();
                        for (i, t) in per_head.iter().enumerate() {
                            flat[i * count..i * count + t.len()].copy_from_slice(t);
                        }
                        (
                            Some((stream.clone_htod(&flat)?, stream.clone_htod(&counts)?, count)),
                            count,
                        )
                    }
                };
                let lists_view = lists.as_ref().map(|(t, c, m)| TokenLists {
                    tokens: t,
                    counts: c,
                    max_tokens: *m,
                });
                // About four CTAs per SM (132 SMs), each with at least 128 tokens.
                let ctas = batch * kv_heads;
                let splits = (528usize.div_ceil(ctas)).clamp(1, (attended / 128).max(1));
                let scale = 1.0 / (d as f32).sqrt();
                let launch = |out: &mut cudarc::driver::CudaSlice<f32>, scratch: &mut DecodeScratch| {
                    ops.decode_attention(&q, &view, lists_view.as_ref(), q_heads, scale, splits, scratch, out)
                };
                for _ in 0..3 {
                    launch(&mut out, &mut scratch)?;
                }
                let mut times = Vec::with_capacity(reps);
                for _ in 0..reps {
                    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                    start.record(&stream)?;
                    launch(&mut out, &mut scratch)?;
                    end.record(&stream)?;
                    end.synchronize()?;
                    times.push(start.elapsed_ms(&end)? as f64 * 1e3);
                }
                let got = stream.clone_dtoh(&out)?;
                if got.iter().any(|v| !v.is_finite()) {
                    bail!("non-finite attention output at ctx {seq_len} batch {batch}");
                }
                let bytes = batch * kv_heads * attended * d * 2 * 2;
                let t = median(times);
                let floor = bytes as f64 / HBM_BYTES_PER_S * 1e6;
                rows.push(CudaAttnRow {
                    kind: if budget.is_none() {
                        "dense"
                    } else {
                        "sparse-attend-stage"
                    },
                    ctx: seq_len,
                    batch,
                    budget,
                    attended_tokens: attended,
                    splits,
                    time_us_median: t,
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
