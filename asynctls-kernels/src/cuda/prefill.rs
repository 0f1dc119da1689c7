//! Causal prefill attention on tensor cores (FlashAttention-2 style, WMMA
//! bf16 with f32 accumulation) over the paged cache: the twin of
//! asynctls-attn's `prefill`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaOps, PagedKvView};
use crate::error::invalid;
use crate::Result;

const BR: usize = 64;
const WARPS: usize = 4;

impl CudaOps {
    /// Tokens `start..start + n` of one sequence (`q`: `[n, q_heads,
    /// head_dim]` f32) attend causally over the cache's tokens `0..=own
    /// position` (the view's first block-table row; blocks of 64). Writes
    /// `out` (`[n, q_heads, head_dim]` f32).
    pub fn prefill_attention(
        &self,
        q: &CudaSlice<f32>,
        kv: &PagedKvView<'_>,
        start: usize,
        q_heads: usize,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = kv.head_dim;
        let values = kv
            .values
            .ok_or_else(|| invalid("prefill_attention", "MLA prefill is not implemented on the GPU"))?;
        if kv.block_size != 64 || !(d == 64 || d == 128) || kv.offload.is_some() {
            return Err(invalid(
                "prefill_attention",
                format!(
                    "blocks of {} and head dim {d} (need blocks of 64, d 64 or 128, resident K/V)",
                    kv.block_size
                ),
            ));
        }
        if kv.kv_heads == 0 || q_heads % kv.kv_heads != 0 || q.len() % (q_heads * d) != 0 || out.len() != q.len() {
            return Err(invalid(
                "prefill_attention",
                format!("q of {} / out of {} for {q_heads} heads of {d}", q.len(), out.len()),
            ));
        }
        let n = q.len() / (q_heads * d);
        if (start + n).div_ceil(64) > kv.max_blocks {
            return Err(invalid(
                "prefill_attention",
                format!("{} tokens exceed the table's {} blocks", start + n, kv.max_blocks),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let f = Self::function(&self.prefill, &format!("prefill_attention_d{d}"))?;
        // Q, K, V tiles (bf16 rows padded by 8), S (f32, +4), P (bf16, +8),
        // O (f32, +4), and three per-row statistics; as the kernel lays them out.
        let (lq, ls, lp, lo) = (d + 8, 64 + 4, 64 + 8, d + 4);
        let shared = super::allow_dynamic_shared(
            &f,
            (BR + 2 * 64) * lq * 2 + WARPS * 16 * (ls * 4 + lp * 2 + lo * 4) + 3 * WARPS * 16 * 4,
        )?;
        let (nn, st, qh, kvh) = (n as i32, start as i32, q_heads as i32, kv.kv_heads as i32);
        let stream = self.device.stream();
        let mut b = stream.launch_builder(&f);
        b.arg(q)
            .arg(kv.keys)
            .arg(values)
            .arg(kv.block_table)
            .arg(out)
            .arg(&nn)
            .arg(&st)
            .arg(&qh)
            .arg(&kvh)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(BR) as u32, q_heads as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: shapes checked above; the table holds the sequence's blocks.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
