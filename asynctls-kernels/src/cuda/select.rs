//! The selection stages of two-level sparse decode on the GPU (the twins of
//! asynctls-attn's `select`): block bounds against the query group, top-k_b
//! blocks, INT4 label scores of their tokens, top-k_t tokens plus the sink
//! and local window, as token lists for [`CudaOps::decode_attention`].
//! Every stage reads only what it needs: block bounds, then labels of the
//! candidate blocks; no K/V row is read before the attention itself.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaOps, GpuKvPool, TokenLists};
use crate::error::invalid;
use crate::Result;

const THREADS: u32 = 256;
/// Threads of the token and block top-k kernels (one CTA per row).
const TOPK_THREADS: u32 = 1024;
const BLOCK_TOPK_THREADS: u32 = 256;
/// Query heads per KV head the label kernel accepts.
pub const MAX_SELECT_GROUP: usize = 32;
/// Items one top-k can rank (staged in shared memory): logical blocks of a
/// sequence for top-k_b, k_b * block_size candidates for top-k_t.
pub const MAX_TOPK_ITEMS: usize = 32768;
/// Key channels the block-bound kernel holds in registers (9 pairs per lane).
pub const MAX_SELECT_KEY_DIM: usize = 576;
/// Logical blocks one warp of the block-bound kernel scores.
const BLOCKS_PER_WARP: u32 = 4;
/// Label channels the label kernel holds in registers.
pub const MAX_LABEL_CHANNELS: usize = 128;

/// The knobs of the selection (the GPU side of asynctls-attn's `SparseConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectParams {
    /// k_b: candidate blocks per (sequence, KV head), besides sink and local.
    pub block_topk: usize,
    /// k_t: tokens kept from the candidates.
    pub token_topk: usize,
    pub sink_blocks: usize,
    pub local_blocks: usize,
    /// Combine a group's per-head scores by max (else by sum).
    pub reduce_max: bool,
}

/// Buffers of the selection, reused across steps; after
/// [`CudaOps::sparse_select`] its token lists feed the attention.
#[derive(Debug)]
pub struct SelectScratch {
    block_scores: CudaSlice<f32>,
    candidates: CudaSlice<i32>,
    candidate_counts: CudaSlice<i32>,
    token_scores: CudaSlice<f32>,
    tokens: CudaSlice<i32>,
    token_counts: CudaSlice<i32>,
    max_tokens: usize,
}

impl SelectScratch {
    pub fn new(ops: &CudaOps) -> Result<Self> {
        let s = ops.device.stream();
        Ok(SelectScratch {
            block_scores: s.alloc_zeros(1)?,
            candidates: s.alloc_zeros(1)?,
            candidate_counts: s.alloc_zeros(1)?,
            token_scores: s.alloc_zeros(1)?,
            tokens: s.alloc_zeros(1)?,
            token_counts: s.alloc_zeros(1)?,
            max_tokens: 0,
        })
    }

    /// The buffers' lengths: they change exactly when a buffer was replaced
    /// (its old address freed), which invalidates captured CUDA graphs.
    pub fn footprint(&self) -> [usize; 6] {
        [
            self.block_scores.len(),
            self.candidates.len(),
            self.candidate_counts.len(),
            self.token_scores.len(),
            self.tokens.len(),
            self.token_counts.len(),
        ]
    }

    /// The token lists of the last selection.
    pub fn lists(&self) -> TokenLists<'_> {
        TokenLists {
            tokens: &self.tokens,
            counts: &self.token_counts,
            max_tokens: self.max_tokens,
        }
    }

    /// The candidate blocks (`[rows, k_b]`) and their counts of the last selection.
    pub fn candidates(&self) -> (&CudaSlice<i32>, &CudaSlice<i32>) {
        (&self.candidates, &self.candidate_counts)
    }

    fn ensure(
        &mut self,
        ops: &CudaOps,
        rows: usize,
        max_blocks: usize,
        p: &SelectParams,
        block_size: usize,
    ) -> Result<()> {
        let s = ops.device.stream();
        let grow = |buf: &mut CudaSlice<i32>, n: usize| -> Result<()> {
            if buf.len() < n {
                *buf = s.alloc_zeros(n)?;
            }
            Ok(())
        };
        grow(&mut self.candidates, rows * p.block_topk)?;
        grow(&mut self.candidate_counts, rows)?;
        grow(&mut self.token_counts, rows)?;
        self.max_tokens = (p.sink_blocks + p.local_blocks + 1) * block_size + p.token_topk;
        grow(&mut self.tokens, rows * self.max_tokens)?;
        for (buf, n) in [
            (&mut self.block_scores, rows * max_blocks),
            (&mut self.token_scores, rows * p.block_topk * block_size),
        ] {
            if buf.len() < n {
                *buf = s.alloc_zeros(n)?;
            }
        }
        Ok(())
    }
}

impl CudaOps {
    /// Chooses every (sequence, KV head)'s tokens for one decode step:
    /// `q` `[batch, q_heads, key_dim]` against `pool` for the sequences of
    /// `block_table` (`[batch, max_blocks]`) and `lens`. The result is in
    /// `scratch.lists()`.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_select(
        &self,
        q: &CudaSlice<f32>,
        pool: &GpuKvPool,
        block_table: &CudaSlice<i32>,
        max_blocks: usize,
        lens: &CudaSlice<i32>,
        q_heads: usize,
        params: &SelectParams,
        scratch: &mut SelectScratch,
    ) -> Result<()> {
        self.sparse_select_staged(q, pool, block_table, max_blocks, lens, q_heads, params, scratch, |_| {
            Ok(())
        })
    }

    /// As [`Self::sparse_select`], calling `between` once the block stage's
    /// candidates are issued (`scratch.candidates()`, in stream order) and
    /// before the token stage: work that needs only the candidates (the
    /// offload resolver) can start on another stream while the tokens are
    /// scored.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_select_staged<E: From<crate::Error>>(
        &self,
        q: &CudaSlice<f32>,
        pool: &GpuKvPool,
        block_table: &CudaSlice<i32>,
        max_blocks: usize,
        lens: &CudaSlice<i32>,
        q_heads: usize,
        params: &SelectParams,
        scratch: &mut SelectScratch,
        mut between: impl FnMut(&SelectScratch) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let g = pool.geometry;
        let batch = lens.len();
        let group = q_heads / g.kv_heads.max(1);
        if q_heads % g.kv_heads != 0 || group == 0 || group > MAX_SELECT_GROUP {
            return Err(invalid(
                "sparse_select",
                format!(
                    "{q_heads} query heads over {} KV heads (group at most {MAX_SELECT_GROUP})",
                    g.kv_heads
                ),
            )
            .into());
        }
        if q.len() != batch * q_heads * g.key_dim || block_table.len() < batch * max_blocks {
            return Err(invalid(
                "sparse_select",
                format!(
                    "q of {} elements / block table of {} for batch {batch}",
                    q.len(),
                    block_table.len()
                ),
            )
            .into());
        }
        if params.block_topk == 0 || params.token_topk == 0 {
            return Err(invalid("sparse_select", "k_b and k_t must be positive").into());
        }
        if max_blocks > MAX_TOPK_ITEMS || params.block_topk * g.block_size > MAX_TOPK_ITEMS {
            return Err(invalid(
                "sparse_select",
                format!(
                    "{max_blocks} blocks per sequence / k_b {} x {} candidate tokens exceed the {MAX_TOPK_ITEMS} \
                     items one top-k ranks",
                    params.block_topk, g.block_size
                ),
            )
            .into());
        }
        if g.key_dim > MAX_SELECT_KEY_DIM || g.key_dim % 2 != 0 {
            return Err(invalid(
                "sparse_select",
                format!(
                    "key dim {} (the block kernel takes even dims up to {MAX_SELECT_KEY_DIM})",
                    g.key_dim
                ),
            )
            .into());
        }
        if g.label_channels > MAX_LABEL_CHANNELS {
            return Err(invalid(
                "sparse_select",
                format!("{} label channels (at most {MAX_LABEL_CHANNELS})", g.label_channels),
            )
            .into());
        }
        let rows = batch * g.kv_heads;
        scratch.ensure(self, rows, max_blocks, params, g.block_size)?;
        let stream = self.device.stream();
        let (kvh, gr, d, bs, mb) = (
            g.kv_heads as i32,
            group as i32,
            g.key_dim as i32,
            g.block_size as i32,
            max_blocks as i32,
        );
        let (kb, kt, sink, local) = (
            params.block_topk as i32,
            params.token_topk as i32,
            params.sink_blocks as i32,
            params.local_blocks as i32,
        );
        let r = g.label_channels as i32;
        let reduce_max = i32::from(params.reduce_max);
        let warps = THREADS / 32;

        // Stage one: block bounds, then the top-k_b rankable blocks.
        // Lanes hold channel pairs 2l + 64j: the variant with enough pairs.
        let pairs = match g.key_dim.div_ceil(64) {
            1 => 1,
            2 => 2,
            _ => 9,
        };
        let f = self.function(&self.select, &format!("block_scores_p{pairs}"))?;
        let mut b = stream.launch_builder(&f);
        b.arg(q)
            .arg(&pool.bounds)
            .arg(block_table)
            .arg(lens)
            .arg(&mut scratch.block_scores)
            .arg(&kvh)
            .arg(&gr)
            .arg(&d)
            .arg(&bs)
            .arg(&mb)
            .arg(&reduce_max);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, (max_blocks as u32).div_ceil(warps * BLOCKS_PER_WARP), 1),
            block_dim: (THREADS, 1, 1),
            // The query group (max), or its positive and negative sums (sum).
            shared_mem_bytes: (group.max(2) * g.key_dim * 4) as u32,
        };
        // SAFETY: buffers sized by `ensure` and checked above.
        unsafe { b.launch(cfg) }.map_err(crate::Error::from)?;

        let f = self.function(&self.select, "select_blocks")?;
        let shared = super::allow_dynamic_shared(&f, max_blocks * 4)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&scratch.block_scores)
            .arg(lens)
            .arg(&mut scratch.candidates)
            .arg(&mut scratch.candidate_counts)
            .arg(&kvh)
            .arg(&bs)
            .arg(&mb)
            .arg(&kb)
            .arg(&sink)
            .arg(&local);
        // SAFETY: as above; the shared size was allowed.
        unsafe { b.launch(with_shared(rows, BLOCK_TOPK_THREADS, shared)) }.map_err(crate::Error::from)?;
        between(scratch)?;

        // Stage two: label scores of the candidates' tokens, then top-k_t.
        // The variant holding enough label words (8 channels each) for r.
        let words = match g.label_channels.div_ceil(8) {
            0..=4 => 4,
            5..=8 => 8,
            _ => 16,
        };
        let mt = scratch.max_tokens as i32;
        let candidates_per_row = params.block_topk * g.block_size;
        // Summed, the group is scored as one head; else a variant
        // specialised to the group, where there is one.
        let name = if !params.reduce_max {
            format!("label_scores_w{words}_sum")
        } else if matches!((words, group), (4, 4) | (16, 16) | (16, 20) | (16, 32)) {
            format!("label_scores_w{words}_g{group}")
        } else {
            format!("label_scores_w{words}")
        };
        let f = self.function(&self.select, &name)?;
        let mut b = stream.launch_builder(&f);
        b.arg(q)
            .arg(&pool.labels)
            .arg(&pool.label_params)
            .arg(&pool.channels)
            .arg(block_table)
            .arg(&scratch.candidates)
            .arg(&scratch.candidate_counts)
            .arg(&mut scratch.token_scores)
            .arg(&kvh)
            .arg(&gr)
            .arg(&d)
            .arg(&r)
            .arg(&bs)
            .arg(&mb)
            .arg(&kb)
            .arg(&reduce_max);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, (candidates_per_row as u32).div_ceil(THREADS), 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: ((group * g.label_channels + group) * 4) as u32,
        };
        // SAFETY: as above.
        unsafe { b.launch(cfg) }.map_err(crate::Error::from)?;

        let f = self.function(&self.select, "select_tokens")?;
        let shared = super::allow_dynamic_shared(&f, candidates_per_row * 4)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&scratch.token_scores)
            .arg(&scratch.candidates)
            .arg(&scratch.candidate_counts)
            .arg(lens)
            .arg(&mut scratch.tokens)
            .arg(&mut scratch.token_counts)
            .arg(&kvh)
            .arg(&bs)
            .arg(&kb)
            .arg(&kt)
            .arg(&sink)
            .arg(&local)
            .arg(&mt);
        // SAFETY: as above.
        unsafe { b.launch(with_shared(rows, TOPK_THREADS, shared)) }.map_err(crate::Error::from)?;
        Ok(())
    }
}

fn with_shared(rows: usize, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}
