//! Paged decode attention on tensor cores (split-K flash-decoding): GQA, where a CTA reads
//! each K/V row of a group once for all its query heads, and MLA in the
//! absorbed form, where a CTA reads each latent row once for all heads. Dense
//! over every token, or sparse over per-row token lists (the exact-attention
//! stage of two-level sparse decode).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::CudaOps;
use crate::error::invalid;
use crate::Result;

/// Head dims and query heads per KV head the GQA kernel is instantiated for.
pub const DECODE_VARIANTS: &[(usize, usize)] = &[
    (64, 1),
    (64, 2),
    (64, 3),
    (64, 4),
    (64, 7),
    (64, 8),
    (128, 1),
    (128, 2),
    (128, 4),
    (128, 5),
    (128, 8),
];

/// The MLA kernel's widths (kv_lora_rank 512 + rope 64, values the first 512)
/// and the head counts it is instantiated for (GLM-4.7-Flash has 20).
pub const MLA_KEY_DIM: usize = 576;
pub const MLA_VALUE_DIM: usize = 512;
pub const MLA_HEADS: &[usize] = &[16, 20, 32];
const COMBINE_THREADS: u32 = 128;
/// Splits of one row's tokens the combine step merges (their weights sit in shared memory).
pub const MAX_SPLITS: usize = 8192;

/// Which decode kernel a split count is for: each holds a different number
/// of CTAs per SM (shared memory: GQA dense three stages of K/V tiles, 108 KB
/// at d 128; GQA over token lists two stages, 74 KB; MLA 196 KB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    GqaDense,
    GqaSparse,
    Mla,
}

impl DecodeKernel {
    fn ctas_per_sm(self) -> usize {
        match self {
            DecodeKernel::GqaDense => 2,
            DecodeKernel::GqaSparse => 3,
            DecodeKernel::Mla => 1,
        }
    }
}

/// A split count for a step: the fewest splits that fill whole waves of the
/// GPU (`CTAs per SM x sms` CTAs at a time), each split at least 128 tokens,
/// at most eight waves. A last wave a fifth full cost a fifth of the step
/// (96k, batch 8: 9 splits were 2.2 waves).
pub fn decode_splits(ctas_per_split: usize, tokens: usize, kernel: DecodeKernel, sms: usize) -> usize {
    let rows = ctas_per_split.max(1);
    let slots = kernel.ctas_per_sm() * sms.max(1);
    let cap = (tokens / 128).clamp(1, (8 * slots / rows).max(1)).min(MAX_SPLITS);
    // How busy the GPU is over the waves `splits` takes (a partial first wave
    // leaves SMs idle; a partial last wave, too).
    let busy = |splits: usize| {
        let ctas = rows * splits;
        ctas as f64 / (ctas.div_ceil(slots) * slots) as f64
    };
    let mut best = 1;
    for splits in 2..=cap {
        if busy(splits) > busy(best) + 1e-9 {
            best = splits;
        }
    }
    best
}

/// A paged K/V pool on the GPU: `[num_blocks, kv_heads, block_size, head_dim]`
/// bf16. MLA has no separate values (`values: None`): they are the first
/// `value_dim` channels of each key row.
#[derive(Debug, Clone, Copy)]
pub struct PagedKvView<'a> {
    pub keys: &'a CudaSlice<bf16>,
    pub values: Option<&'a CudaSlice<bf16>>,
    pub kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    /// `[batch, max_blocks]` physical block of each logical block.
    pub block_table: &'a CudaSlice<i32>,
    /// Offloaded K/V (GQA, or MLA without values): `keys`/`values` are then the resident slots.
    pub offload: Option<OffloadedKv<'a>>,
    pub max_blocks: usize,
    /// `[batch]` tokens per sequence.
    pub lens: &'a CudaSlice<i32>,
}

/// Where an offloaded cache's units are: `keys`/`values` of the view are the
/// resident slots (`[slots, block_size, head_dim]`), `slots` finds each
/// unit's slot, and a unit without one is read in place from the host pools
/// (`[num_blocks, kv_heads, block_size, head_dim]`, device-mapped addresses).
#[derive(Debug, Clone, Copy)]
pub struct OffloadedKv<'a> {
    pub slots: SlotLookup<'a>,
    pub host_keys: u64,
    pub host_values: u64,
}

/// How the attention finds a unit's slot.
#[derive(Debug, Clone, Copy)]
pub enum SlotLookup<'a> {
    /// `[num_blocks * kv_heads]`: the slot of each (physical block, head)
    /// unit or -1, looked up after the view's block table.
    ByUnit(&'a CudaSlice<i32>),
    /// `[batch * kv_heads, max_blocks]`: per (sequence, KV head) row and
    /// logical block, the slot or `-(unit + 1)` for a unit read in place,
    /// used instead of the block table (one lookup per token, not two;
    /// written by the offload resolver for the blocks a step attends).
    ByRow(&'a CudaSlice<i32>),
}

/// Per (sequence, KV head): the sorted positions to attend (sparse decode).
#[derive(Debug, Clone, Copy)]
pub struct TokenLists<'a> {
    /// `[batch * kv_heads, max_tokens]`
    pub tokens: &'a CudaSlice<i32>,
    /// `[batch * kv_heads]`
    pub counts: &'a CudaSlice<i32>,
    pub max_tokens: usize,
}

impl CudaOps {
    /// Decode attention for a batch over a paged cache: dense when `lists`
    /// is `None`, else over each (sequence, KV head)'s token list.
    /// `q`: `[batch, q_heads, head_dim]`; `out`: `[batch, q_heads, value_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        q: &CudaSlice<f32>,
        kv: &PagedKvView<'_>,
        lists: Option<&TokenLists<'_>>,
        q_heads: usize,
        scale: f32,
        splits: usize,
        scratch: &mut DecodeScratch,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (d, dv) = (kv.head_dim, kv.value_dim);
        let batch = kv.lens.len();
        let splits = splits.max(1);
        if splits > MAX_SPLITS {
            return Err(invalid(
                "decode_attention",
                format!("{splits} splits (at most {MAX_SPLITS})"),
            ));
        }
        if kv.kv_heads == 0 || q_heads % kv.kv_heads != 0 {
            return Err(invalid(
                "decode_attention",
                format!("{q_heads} query heads do not divide into {} KV heads", kv.kv_heads),
            ));
        }
        let group = q_heads / kv.kv_heads;
        if q.len() != batch * q_heads * d || out.len() != batch * q_heads * dv {
            return Err(invalid(
                "decode_attention",
                format!(
                    "q of {} / out of {} elements for batch {batch}, {q_heads} heads, widths {d}/{dv}",
                    q.len(),
                    out.len()
                ),
            ));
        }
        let rows = batch * q_heads;
        scratch.ensure(self, rows * splits * dv, rows * splits * 2)?;
        let stream = self.device.stream();
        let (bs, mb) = (kv.block_size as i32, kv.max_blocks as i32);
        let mt = lists.map_or(0, |l| l.max_tokens as i32);
        // A null pointer selects the dense path.
        let null: u64 = 0;
        let table = match kv.offload.map(|o| o.slots) {
            // The resolver writes the entries of the attended blocks
            // only: a dense pass would read the others.
            Some(SlotLookup::ByRow(_)) if lists.is_none() => {
                return Err(invalid(
                    "decode_attention",
                    "a row slot table holds the selected blocks only: dense attention needs SlotLookup::ByUnit",
                ));
            }
            Some(SlotLookup::ByRow(rows)) => {
                if rows.len() < batch * kv.kv_heads * kv.max_blocks {
                    return Err(invalid(
                        "decode_attention",
                        format!(
                            "a row slot table of {} entries for {} rows of {} blocks",
                            rows.len(),
                            batch * kv.kv_heads,
                            kv.max_blocks
                        ),
                    ));
                }
                rows
            }
            _ => kv.block_table,
        };
        // The offloaded view's lookup (unit -> slot table or row slots) and
        // host tier, as both kernels take them.
        let (by_row, by_unit): (i32, i32) = (1, 0);
        let (unit_slots, host_keys, host_values, offload_rows) = match &kv.offload {
            Some(OffloadedKv {
                slots: SlotLookup::ByUnit(units),
                host_keys,
                host_values,
            }) => (Some(*units), *host_keys, *host_values, by_unit),
            Some(OffloadedKv {
                host_keys, host_values, ..
            }) => (None, *host_keys, *host_values, by_row),
            None => (None, 0, 0, by_unit),
        };
        match kv.values {
            Some(values) => {
                if !DECODE_VARIANTS.contains(&(d, group)) || dv != d {
                    return Err(invalid(
                        "decode_attention",
                        format!("no GQA kernel for head dim {d} with {group} query heads per KV head"),
                    ));
                }
                // Token lists take the two-stage variant (see DecodeKernel).
                let stages = if lists.is_some() { 2 } else { 3 };
                let suffix = if lists.is_some() { "_s2" } else { "" };
                let f = self.function(&self.attention, &format!("decode_attention_d{d}_g{group}{suffix}"))?;
                let kvh = kv.kv_heads as i32;

                let mut b = stream.launch_builder(&f);
                b.arg(q).arg(kv.keys).arg(values).arg(table).arg(kv.lens);
                match lists {
                    Some(l) => b.arg(l.tokens).arg(l.counts),
                    None => b.arg(&null).arg(&null),
                };
                b.arg(&mut scratch.acc)
                    .arg(&mut scratch.ml)
                    .arg(&kvh)
                    .arg(&bs)
                    .arg(&mb)
                    .arg(&mt)
                    .arg(&scale);
                match unit_slots {
                    Some(units) => b.arg(units),
                    None => b.arg(&null),
                };
                b.arg(&host_keys).arg(&host_values).arg(&offload_rows);
                // Q (16 padded rows) and the stages of K and V tiles of 64
                // rows, bf16 rows padded by 8, as the kernel lays them out.
                let shared = super::allow_dynamic_shared(&f, (16 + stages * 2 * 64) * (d + 8) * 2)?;
                let cfg = LaunchConfig {
                    grid_dim: ((batch * kv.kv_heads) as u32, splits as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: shared,
                };
                // SAFETY: the pools, tables and lists are laid out as documented
                // and sized by the caller.
                unsafe { b.launch(cfg) }?;
            }
            None => {
                if kv.kv_heads != 1 || d != MLA_KEY_DIM || dv != MLA_VALUE_DIM || !MLA_HEADS.contains(&q_heads) {
                    return Err(invalid(
                        "decode_attention",
                        format!(
                            "no MLA kernel for {} KV heads, widths {d}/{dv}, {q_heads} heads (have 1 KV head, \
                             {MLA_KEY_DIM}/{MLA_VALUE_DIM}, heads {MLA_HEADS:?})",
                            kv.kv_heads
                        ),
                    ));
                }
                // A resident pool runs the kernel built without the offload lookups.
                let variant = if kv.offload.is_some() {
                    "mla_decode_offloaded"
                } else {
                    "mla_decode"
                };
                let f = self.function(&self.mla, &format!("{variant}_k{d}_v{dv}_h{q_heads}"))?;
                // Q (32 padded rows), two stages of 64 staged rows (bf16,
                // padded by 8) and the shared scores (32 x 68 f32), as the
                // kernel lays them out.
                let shared = super::allow_dynamic_shared(&f, (32 + 2 * 64) * (d + 8) * 2 + 32 * 68 * 4)?;
                let mut b = stream.launch_builder(&f);
                b.arg(q).arg(kv.keys).arg(table).arg(kv.lens);
                match lists {
                    Some(l) => b.arg(l.tokens).arg(l.counts),
                    None => b.arg(&null).arg(&null),
                };
                b.arg(&mut scratch.acc)
                    .arg(&mut scratch.ml)
                    .arg(&bs)
                    .arg(&mb)
                    .arg(&mt)
                    .arg(&scale);
                // Offloaded: the slots are `kv.keys`, the host tier the rest.
                match unit_slots {
                    Some(units) => b.arg(units),
                    None => b.arg(&null),
                };
                b.arg(&host_keys).arg(&offload_rows);
                let cfg = LaunchConfig {
                    grid_dim: (batch as u32, splits as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: shared,
                };
                // SAFETY: as above; the shared size was allowed just before.
                unsafe { b.launch(cfg) }?;
            }
        }
        let combine = self.function(&self.attention, "decode_combine")?;
        let (s, dd) = (splits as i32, dv as i32);
        let mut b = stream.launch_builder(&combine);
        b.arg(&scratch.acc).arg(&scratch.ml).arg(out).arg(&s).arg(&dd);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, (dv as u32).div_ceil(COMBINE_THREADS), 1),
            block_dim: (COMBINE_THREADS, 1, 1),
            shared_mem_bytes: (splits * 4) as u32,
        };
        // SAFETY: as above; `splits` weights fit the shared memory (checked).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// Split-K partials, reused across steps.
#[derive(Debug)]
pub struct DecodeScratch {
    acc: CudaSlice<f32>,
    ml: CudaSlice<f32>,
}

impl DecodeScratch {
    pub fn new(ops: &CudaOps) -> Result<Self> {
        let stream = ops.device.stream();
        Ok(DecodeScratch {
            acc: stream.alloc_zeros(1)?,
            ml: stream.alloc_zeros(1)?,
        })
    }

    /// The buffers' lengths: they change exactly when a buffer was replaced
    /// (its old address freed), which invalidates captured CUDA graphs.
    pub fn footprint(&self) -> (usize, usize) {
        (self.acc.len(), self.ml.len())
    }

    fn ensure(&mut self, ops: &CudaOps, acc: usize, ml: usize) -> Result<()> {
        let stream = ops.device.stream();
        if self.acc.len() < acc {
            self.acc = stream.alloc_zeros(acc)?;
        }
        if self.ml.len() < ml {
            self.ml = stream.alloc_zeros(ml)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{decode_splits, DecodeKernel};

    #[test]
    fn dense_splits_fill_whole_waves() {
        // 132 SMs hold 264 dense CTAs: 96k tokens over 8 rows (batch 1) or
        // 64 rows (batch 8) take 33 splits, one or eight full waves.
        assert_eq!(decode_splits(8, 98_304, DecodeKernel::GqaDense, 132), 33);
        assert_eq!(decode_splits(64, 98_304, DecodeKernel::GqaDense, 132), 33);
        // No split under 128 tokens.
        assert_eq!(decode_splits(8, 100, DecodeKernel::GqaDense, 132), 1);
    }

    #[test]
    fn sparse_splits_fill_waves_of_three_ctas_per_sm() {
        // 396 slots: batch 1 (8 rows) is capped by 2176 / 128 = 17 splits;
        // batch 8 (64 rows) takes 6 splits, 384 CTAs (97% of one wave).
        assert_eq!(decode_splits(8, 2176, DecodeKernel::GqaSparse, 132), 17);
        assert_eq!(decode_splits(64, 2176, DecodeKernel::GqaSparse, 132), 6);
    }

    #[test]
    fn mla_splits_fill_waves_of_one_cta_per_sm() {
        assert_eq!(decode_splits(1, 98_304, DecodeKernel::Mla, 132), 132);
        assert_eq!(decode_splits(8, 98_304, DecodeKernel::Mla, 132), 33);
        assert_eq!(decode_splits(1, 2304, DecodeKernel::Mla, 132), 18);
    }
}
