//! Causal prefill attention on tensor cores (FlashAttention-2 style:
//! mma.sync bf16 with f32 accumulation, ldmatrix fragments, cp.async
//! double-buffered K/V tiles) over the paged cache: the twin of
//! asynctls-attn's `prefill`, GQA (head dim 64 or 128) and MLA in the
//! absorbed form (one latent KV head of 576, values its first 512 columns).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaOps, PagedKvView};
use crate::error::invalid;
use crate::Result;

/// Keys per tile (one cache block) and K/V tiles in flight, as the kernel has them.
const BC: usize = 64;
const STAGES: usize = 2;

/// One compiled variant: its name, dims and warp grid (`wm` warps down the
/// rows, each with `mt` tiles of 16 rows; `wn` warps splitting each row
/// tile's value columns).
struct Variant {
    name: &'static str,
    key_dim: usize,
    value_dim: usize,
    values_in_keys: bool,
    wm: usize,
    wn: usize,
    mt: usize,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "prefill_attention_d64",
        key_dim: 64,
        value_dim: 64,
        values_in_keys: false,
        wm: 4,
        wn: 1,
        mt: 2,
    },
    Variant {
        name: "prefill_attention_d128",
        key_dim: 128,
        value_dim: 128,
        values_in_keys: false,
        wm: 4,
        wn: 1,
        mt: 2,
    },
    Variant {
        name: "prefill_attention_mla576",
        key_dim: 576,
        value_dim: 512,
        values_in_keys: true,
        wm: 2,
        wn: 4,
        mt: 1,
    },
];

impl Variant {
    fn rows(&self) -> usize {
        16 * self.wm * self.mt
    }

    /// Q tile, K (and V) stages, and the shared S rows when warps split keys;
    /// as the kernel lays them out (bf16 rows padded by 8, S rows by 4).
    fn shared_bytes(&self) -> usize {
        let lk = self.key_dim + 8;
        let values = if self.values_in_keys {
            0
        } else {
            STAGES * BC * (self.value_dim + 8) * 2
        };
        let scores = if self.wn > 1 { self.rows() * (BC + 4) * 4 } else { 0 };
        self.rows() * lk * 2 + STAGES * BC * lk * 2 + values + scores
    }
}

/// Whether the prefill kernel has a variant for these head dims (values a
/// prefix of the keys for MLA).
pub fn prefill_supports(key_dim: usize, value_dim: usize, values_in_keys: bool) -> bool {
    VARIANTS
        .iter()
        .any(|v| v.key_dim == key_dim && v.value_dim == value_dim && v.values_in_keys == values_in_keys)
}

impl CudaOps {
    /// Tokens `start..start + n` of one sequence (`q`: `[n, q_heads,
    /// key_dim]` f32) attend causally over the cache's tokens `0..=own
    /// position` (the view's first block-table row; blocks of 64). Writes
    /// `out` (`[n, q_heads, value_dim]` f32).
    pub fn prefill_attention(
        &self,
        q: &CudaSlice<f32>,
        kv: &PagedKvView<'_>,
        start: usize,
        q_heads: usize,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (kd, vd) = (kv.head_dim, kv.value_dim);
        let in_keys = kv.values.is_none();
        let variant = VARIANTS
            .iter()
            .find(|v| v.key_dim == kd && v.value_dim == vd && v.values_in_keys == in_keys)
            .ok_or_else(|| {
                invalid(
                    "prefill_attention",
                    format!(
                        "key dim {kd}, value dim {vd}{} (have GQA 64/64, 128/128 and MLA 576/512 in the keys)",
                        if in_keys { " in the keys" } else { "" }
                    ),
                )
            })?;
        if kv.block_size != BC {
            return Err(invalid(
                "prefill_attention",
                format!("blocks of {} (need blocks of {BC})", kv.block_size),
            ));
        }
        // An offloaded cache's host tier holds every row (the resident slots
        // are write-through copies), so a prefill reads it in place there
        // through the view's block table.
        let host = match &kv.offload {
            Some(o) if o.host_keys == 0 || (!in_keys && o.host_values == 0) => {
                return Err(invalid(
                    "prefill_attention",
                    "an offloaded view needs the host tier's keys (and values, unless they are in the keys)",
                ))
            }
            // MLA: the values are the keys' first channels.
            Some(o) if in_keys => Some((o.host_keys, o.host_keys)),
            Some(o) => Some((o.host_keys, o.host_values)),
            None => None,
        };
        if kv.kv_heads == 0 || q_heads % kv.kv_heads != 0 || q.len() % (q_heads * kd) != 0 {
            return Err(invalid(
                "prefill_attention",
                format!(
                    "q of {} for {q_heads} heads of {kd} over {} KV heads",
                    q.len(),
                    kv.kv_heads
                ),
            ));
        }
        let n = q.len() / (q_heads * kd);
        if out.len() != n * q_heads * vd {
            return Err(invalid(
                "prefill_attention",
                format!("out of {} for {n} tokens x {q_heads} heads of {vd}", out.len()),
            ));
        }
        if (start + n).div_ceil(BC) > kv.max_blocks {
            return Err(invalid(
                "prefill_attention",
                format!("{} tokens exceed the table's {} blocks", start + n, kv.max_blocks),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&self.prefill, variant.name)?;
        let shared = super::allow_dynamic_shared(&f, variant.shared_bytes())?;
        let values = kv.values.unwrap_or(kv.keys);
        let (nn, st, qh, kvh) = (n as i32, start as i32, q_heads as i32, kv.kv_heads as i32);
        let stream = self.device.stream();
        let rows = n * (q_heads / kv.kv_heads);
        let row_tiles = rows.div_ceil(variant.rows());
        let splits = prefill_splits(
            row_tiles * kv.kv_heads,
            (start + n).div_ceil(BC),
            self.device.multiprocessors(),
        );
        // The splits' partial outputs and (max, sum), merged below.
        let (mut partial_acc, mut partial_ml) = if splits > 1 {
            // SAFETY: every (token, head, split) entry is written by the
            // split's CTA (an empty split writes zeros and (-inf, 0)) before
            // the combine reads it, in stream order.
            unsafe {
                (
                    stream.alloc::<f32>(n * q_heads * splits * vd)?,
                    stream.alloc::<f32>(n * q_heads * splits * 2)?,
                )
            }
        } else {
            (stream.alloc_zeros::<f32>(1)?, stream.alloc_zeros::<f32>(1)?)
        };
        let splits_arg = splits as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(q);
        match &host {
            Some((keys, values)) => b.arg(keys).arg(values),
            None => b.arg(kv.keys).arg(values),
        };
        b.arg(kv.block_table)
            .arg(&mut *out)
            .arg(&nn)
            .arg(&st)
            .arg(&qh)
            .arg(&kvh)
            .arg(&scale)
            .arg(&mut partial_acc)
            .arg(&mut partial_ml)
            .arg(&splits_arg);
        let cfg = LaunchConfig {
            grid_dim: (row_tiles as u32, kv.kv_heads as u32, splits as u32),
            block_dim: ((32 * variant.wm * variant.wn) as u32, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: shapes checked above; the table holds the sequence's blocks.
        unsafe { b.launch(cfg) }?;
        if splits > 1 {
            let f = self.function(&self.prefill, "prefill_combine")?;
            let dv = vd as i32;
            let mut b = stream.launch_builder(&f);
            b.arg(&partial_acc).arg(&partial_ml).arg(out).arg(&splits_arg).arg(&dv);
            let cfg = LaunchConfig {
                grid_dim: ((n * q_heads) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the partials were sized for n x q_heads rows of `splits`.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }
}

/// Key splits of a prefill launch: one while its `ctas` (row tiles x KV
/// heads) fill the GPU's `sms`, else enough to fill about two waves, each
/// split keeping at least 4 of the `key_tiles` tiles of 64 keys.
pub fn prefill_splits(ctas: usize, key_tiles: usize, sms: usize) -> usize {
    if ctas == 0 || ctas >= sms || key_tiles < 8 {
        return 1;
    }
    (2 * sms).div_ceil(ctas).min(key_tiles / 4).clamp(1, 32)
}

#[cfg(test)]
mod tests {
    use super::prefill_splits;

    #[test]
    fn prefill_splits_fill_the_gpu_only_when_the_row_tiles_do_not() {
        // A 2,048-token chunk of Qwen3-8B: 64 row tiles x 8 KV heads.
        assert_eq!(prefill_splits(512, 512, 132), 1);
        // A 256-token chunk at 32k: 8 x 8 CTAs over 516 key tiles.
        assert_eq!(prefill_splits(64, 516, 132), 5);
        // Short prefixes keep at least 4 key tiles a split.
        assert_eq!(prefill_splits(4, 12, 132), 3);
        assert_eq!(prefill_splits(4, 7, 132), 1);
        assert_eq!(prefill_splits(1, 100_000, 132), 32);
    }
}
