//! `asynctls bench prefill --device cuda`: causal prefill attention of a
//! whole prompt on the GPU (our tensor-core kernel over the paged cache, GQA
//! or MLA in the absorbed form),
//! timed with CUDA events (median of reps after a warm-up), with its FLOP
//! rate; the torch SDPA peer runs in the same call (`bench/peers/torch_sdpa.py
//! --prefill`, driven by `.gpu/run.sh`).

use anyhow::{Context, Result};
use asynctls_kernels::cuda::{CudaOps, GpuKvPool, KvGeometry};
use asynctls_kernels::CudaDevice;
use cudarc::driver::sys::CUevent_flags;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use super::attn_cuda::{fill_pool, random_on_device};
use super::median;

#[derive(Debug, Clone, Serialize)]
pub struct PrefillRow {
    pub ctx: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub time_us_median: f64,
    /// Causal attention FLOPs: 2 FLOP x ctx^2 / 2 x (key dim + value dim) x heads.
    pub tflops: f64,
}

/// The attention a prefill bench runs: GQA with separate values, or MLA's
/// absorbed form (one latent KV head; values are the first `value_dim` key
/// columns).
#[derive(Debug, Clone, Copy)]
pub struct PrefillShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub mla: bool,
}

pub fn run(device: &CudaDevice, shape: PrefillShape, contexts: &[usize], reps: usize) -> Result<Vec<PrefillRow>> {
    let ops = CudaOps::new(device)?;
    let stream = device.stream().clone();
    let mut rng = StdRng::seed_from_u64(3);
    let random = random_on_device(device, &mut rng)?;
    let PrefillShape {
        q_heads,
        kv_heads,
        key_dim: d,
        value_dim,
        mla,
    } = shape;
    let mut rows = Vec::new();
    for &ctx in contexts {
        let geometry = KvGeometry {
            num_blocks: ctx.div_ceil(64),
            kv_heads,
            block_size: 64,
            key_dim: d,
            value_dim,
            separate_values: !mla,
            label_channels: 32.min(d),
        };
        let channels: Vec<u16> = (0..kv_heads).flat_map(|_| 0..geometry.label_channels as u16).collect();
        let mut pool = GpuKvPool::new(&ops, geometry, &channels)?;
        let table = fill_pool(&ops, &mut pool, 1, ctx, &random, &mut rng).context("filling the pool")?;
        let table = stream.clone_htod(&table)?;
        let lens = stream.clone_htod(&[ctx as i32])?;
        let view = pool.view(&table, ctx.div_ceil(64), &lens);
        // Queries: windows of the random buffer.
        let q_len = ctx * q_heads * d;
        let mut q = stream.alloc_zeros::<f32>(q_len)?;
        let mut at = 0;
        while at < q_len {
            let len = (random.len() / 2).min(q_len - at);
            let off = rng.random_range(0..random.len() - len);
            stream.memcpy_dtod(&random.slice(off..off + len), &mut q.slice_mut(at..at + len))?;
            at += len;
        }
        let mut out = stream.alloc_zeros::<f32>(ctx * q_heads * value_dim)?;
        // MLA's softmax scale is that of the decompressed head (192 + 64).
        let scale = 1.0 / (if mla { 256.0f32 } else { d as f32 }).sqrt();
        for _ in 0..2 {
            ops.prefill_attention(&q, &view, 0, q_heads, scale, &mut out)?;
        }
        let ctx_ = device.context();
        let mut times = Vec::new();
        for _ in 0..reps {
            let start = ctx_.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let end = ctx_.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            start.record(&stream)?;
            ops.prefill_attention(&q, &view, 0, q_heads, scale, &mut out)?;
            end.record(&stream)?;
            end.synchronize()?;
            times.push(start.elapsed_ms(&end)? as f64 * 1e3);
        }
        let t = median(times);
        let flops = 2.0 * (ctx as f64) * (ctx as f64) / 2.0 * (d + value_dim) as f64 * q_heads as f64;
        rows.push(PrefillRow {
            ctx,
            q_heads,
            kv_heads,
            head_dim: d,
            value_dim,
            time_us_median: t,
            tflops: flops / (t * 1e-6) / 1e12,
        });
    }
    Ok(rows)
}
