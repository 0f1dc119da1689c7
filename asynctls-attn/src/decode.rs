//! One decode step of attention for a batch of sequences over a paged cache:
//! the policy picks each KV head's tokens, then exact attention (f32
//! accumulation, softmax over exactly the selected set) runs over them.

use asynctls_kernels::cpu;
use asynctls_kvcache::{BlockId, BlockTable, HostReadable};
use rayon::prelude::*;

use crate::error::shape_err;
use crate::select::{block_bounds, forced_blocks, label_scores, rankable_blocks, reduce_group};
use crate::{AttnShape, Policy, Result, SparseConfig};

/// What one KV head of one sequence attended to in a step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadSelection {
    /// Whether the step took the dense path (short context or dense policy).
    pub dense: bool,
    /// Blocks scored by the block filter (their metadata was read).
    pub scored_blocks: usize,
    /// Tokens scored by their labels.
    pub label_scored: usize,
    /// Logical blocks whose tokens were attended or label-scored, sorted.
    pub blocks: Vec<u32>,
    /// Attended token positions, sorted ascending.
    pub tokens: Vec<u32>,
}

/// Bytes a step read, by part (the whole batch, all KV heads).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepBytes {
    pub metadata: usize,
    pub labels: usize,
    pub kv: usize,
}

impl StepBytes {
    pub fn total(&self) -> usize {
        self.metadata + self.labels + self.kv
    }
}

/// The selections of a step: `heads[seq * kv_heads + kv_head]`.
#[derive(Debug, Clone, Default)]
pub struct DecodeReport {
    pub heads: Vec<HeadSelection>,
}

impl DecodeReport {
    /// Bytes read from a cache of this geometry by the step.
    pub fn bytes<S: HostReadable>(&self, storage: &S) -> StepBytes {
        let c = storage.config();
        let kv_per_token = c.kv_bytes_per_head();
        let mut bytes = StepBytes::default();
        for h in &self.heads {
            bytes.metadata += h.scored_blocks * 2 * c.key_dim * 4;
            bytes.labels += h.label_scored * c.label_bytes_per_head();
            bytes.kv += h.tokens.len() * kv_per_token;
        }
        bytes
    }

    /// Bytes a dense step over the same sequences reads.
    pub fn dense_bytes<S: HostReadable>(storage: &S, lens: &[usize]) -> usize {
        let c = storage.config();
        lens.iter().sum::<usize>() * c.kv_heads * c.kv_bytes_per_head()
    }

    /// Mean fraction of each sequence's context attended per KV head.
    pub fn attended_fraction(&self, lens: &[usize], kv_heads: usize) -> f64 {
        let mut sum = 0.0;
        for (i, h) in self.heads.iter().enumerate() {
            sum += h.tokens.len() as f64 / lens[i / kv_heads].max(1) as f64;
        }
        sum / self.heads.len().max(1) as f64
    }
}

/// The attention step: for every sequence in `tables` (attending to the
/// tokens written in `layer`), every query head in `q`
/// (`[batch, q_heads, key_dim]`), writes `out` (`[batch, q_heads, value_dim]`).
pub fn decode<S: HostReadable>(
    storage: &S,
    tables: &[&BlockTable],
    layer: usize,
    q: &[f32],
    shape: &AttnShape,
    config: &SparseConfig,
    out: &mut [f32],
) -> Result<DecodeReport> {
    shape.check_cache(storage.config())?;
    config.validate()?;
    let (kd, vd, g) = (shape.key_dim, shape.value_dim, shape.group());
    let batch = tables.len();
    if q.len() != batch * shape.q_heads * kd {
        return Err(shape_err(
            "queries",
            format!("[{batch}, {}, {kd}]", shape.q_heads),
            q.len(),
        ));
    }
    if out.len() != batch * shape.q_heads * vd {
        return Err(shape_err(
            "output",
            format!("[{batch}, {}, {vd}]", shape.q_heads),
            out.len(),
        ));
    }
    if layer >= storage.config().num_layers {
        return Err(asynctls_kvcache::CacheError::LayerOutOfRange {
            layer,
            num_layers: storage.config().num_layers,
        }
        .into());
    }
    let heads: Vec<Result<HeadSelection>> = out
        .par_chunks_mut(g * vd)
        .zip(q.par_chunks(g * kd))
        .enumerate()
        .map(|(i, (out_group, q_group))| {
            let table = tables[i / shape.kv_heads];
            let head = i % shape.kv_heads;
            let len = table.written(layer);
            let blocks = &table.blocks()[..len.div_ceil(storage.config().block_size)];
            let selection = select(storage, blocks, len, layer, head, q_group, config)?;
            attend(
                storage,
                blocks,
                layer,
                head,
                &selection.tokens,
                q_group,
                shape.scale,
                out_group,
            );
            Ok(selection)
        })
        .collect();
    Ok(DecodeReport {
        heads: heads.into_iter().collect::<Result<_>>()?,
    })
}

/// Chooses the tokens one KV head attends to.
pub fn select<S: HostReadable>(
    storage: &S,
    blocks: &[BlockId],
    len: usize,
    layer: usize,
    head: usize,
    q_group: &[f32],
    config: &SparseConfig,
) -> Result<HeadSelection> {
    let bs = storage.config().block_size;
    if config.policy == Policy::Dense || len < config.dense_below {
        return Ok(HeadSelection {
            dense: true,
            blocks: (0..len.div_ceil(bs) as u32).collect(),
            tokens: (0..len as u32).collect(),
            ..HeadSelection::default()
        });
    }
    let forced = forced_blocks(len, bs, config.sink_blocks, config.local_blocks);
    let rankable = rankable_blocks(len, bs, &forced);
    let g = q_group.len() / storage.config().key_dim;
    let physical = |logical: &[u32]| -> Vec<BlockId> { logical.iter().map(|&b| blocks[b as usize]).collect() };

    // Stage one: the block filter (tls, quest).
    let (scored_blocks, candidates) = if config.policy == Policy::Ds {
        (0, rankable)
    } else {
        let bounds = block_bounds(storage, layer, head, &physical(&rankable), q_group)?;
        let reduced = reduce_group(&bounds, g, config.group_reduce);
        let mut kept: Vec<u32> = cpu::topk_indices(&reduced, config.block_topk)
            .into_iter()
            .map(|i| rankable[i as usize])
            .collect();
        kept.sort_unstable();
        (rankable.len(), kept)
    };

    let mut selection = HeadSelection {
        scored_blocks,
        ..HeadSelection::default()
    };
    let mut tokens: Vec<u32> = forced
        .iter()
        .flat_map(|&b| (b as usize * bs) as u32..((b as usize + 1) * bs).min(len) as u32)
        .collect();

    // Stage two: label scores over the candidates (tls, ds); quest attends
    // every candidate token.
    if config.policy == Policy::Quest {
        tokens.extend(candidates.iter().flat_map(|&b| (b * bs as u32)..((b + 1) * bs as u32)));
    } else {
        let scores = label_scores(storage, layer, head, &physical(&candidates), q_group);
        let reduced = reduce_group(&scores, g, config.group_reduce);
        selection.label_scored = reduced.len();
        tokens.extend(
            cpu::topk_indices(&reduced, config.token_topk)
                .into_iter()
                .map(|i| candidates[i as usize / bs] * bs as u32 + i % bs as u32),
        );
    }
    tokens.sort_unstable();
    let mut all_blocks = forced;
    all_blocks.extend(candidates);
    all_blocks.sort_unstable();
    selection.blocks = all_blocks;
    selection.tokens = tokens;
    Ok(selection)
}

/// Exact attention of a group's query heads over `tokens` (sorted positions):
/// each key and value row is read once for all heads of the group.
#[allow(clippy::too_many_arguments)]
pub fn attend<S: HostReadable>(
    storage: &S,
    blocks: &[BlockId],
    layer: usize,
    head: usize,
    tokens: &[u32],
    q_group: &[f32],
    scale: f32,
    out_group: &mut [f32],
) {
    let c = storage.config();
    let (kd, vd, bs) = (c.key_dim, c.value_dim(), c.block_size);
    let g = q_group.len() / kd;
    let n = tokens.len();
    let mut row = vec![0.0f32; kd.max(vd)];
    let mut scores = vec![0.0f32; g * n];
    for_each_row(tokens, bs, |i, block, slot| {
        let keys = storage.keys(layer, blocks[block], head);
        keys.read(slot, &mut row[..kd]);
        for h in 0..g {
            scores[h * n + i] = cpu::dot(&q_group[h * kd..(h + 1) * kd], &row[..kd]) * scale;
        }
    });
    for h in 0..g {
        cpu::softmax_in_place(&mut scores[h * n..(h + 1) * n]);
    }
    out_group.fill(0.0);
    for_each_row(tokens, bs, |i, block, slot| {
        let values = storage.values(layer, blocks[block], head);
        values.read(slot, &mut row[..vd]);
        for h in 0..g {
            cpu::axpy(scores[h * n + i], &row[..vd], &mut out_group[h * vd..(h + 1) * vd]);
        }
    });
}

fn for_each_row(tokens: &[u32], block_size: usize, mut f: impl FnMut(usize, usize, usize)) {
    for (i, &t) in tokens.iter().enumerate() {
        let t = t as usize;
        f(i, t / block_size, t % block_size);
    }
}
