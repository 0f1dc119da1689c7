//! What a GPU backend uploads for a step, computed on the host from the
//! cache's block tables: where each new row goes, which blocks the step
//! touches (and which of the step's rows each gets), and the batch's block
//! table and lengths. A pure function of the tables, so its invariants are
//! property-tested without a GPU (`tests/step_layout_properties.rs`); the
//! bounds merge of an offloaded cache relies on them.

use asynctls_kvcache::{KvStorage, PagedKvCache, SeqId};

use crate::{AttnError, Result};

/// One step's layout (i32, as the kernels read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLayout {
    /// Per new row: its pool slot (physical block * block_size + offset).
    pub slots: Vec<i32>,
    /// The physical blocks the rows land in, in row order, each once per
    /// run of consecutive rows.
    pub blocks: Vec<i32>,
    /// Per touched block: its rows once the step is written (the offset of
    /// its last new row + 1; rows are written in order).
    pub fills: Vec<i32>,
    /// `[blocks + 1]`: block `i` gets the step's rows `starts[i]..starts[i + 1]`;
    /// its rows before the step are `fills[i] - (starts[i + 1] - starts[i])`.
    pub starts: Vec<i32>,
    /// `[seqs, max_blocks]` physical blocks (0 past a sequence's end).
    pub table: Vec<i32>,
    /// Tokens reserved per sequence.
    pub lens: Vec<i32>,
    pub max_blocks: usize,
    pub max_len: usize,
}

/// The layout of a step over `seqs` whose new rows belong to `token_seqs`
/// at `positions` (one sequence repeated for a prefill chunk; the positions
/// already reserved). `width` fixes the block table's width (CUDA graph
/// replay), else it is the longest sequence's.
pub fn step_layout<S: KvStorage>(
    cache: &PagedKvCache<S>,
    seqs: &[SeqId],
    token_seqs: &[SeqId],
    positions: &[usize],
    width: Option<usize>,
) -> Result<StepLayout> {
    if token_seqs.len() != positions.len() {
        return Err(AttnError::Config(format!(
            "{} rows for {} positions",
            token_seqs.len(),
            positions.len()
        )));
    }
    let bs = cache.config().block_size;
    let mut slots = Vec::with_capacity(positions.len());
    let mut touched: Vec<(i32, i32)> = Vec::new();
    let mut starts = vec![];
    for (i, (&s, &p)) in token_seqs.iter().zip(positions).enumerate() {
        let table = cache.table(s)?;
        let block = table
            .blocks()
            .get(p / bs)
            .ok_or_else(|| AttnError::Config(format!("position {p} of {s:?} is not reserved")))?
            .0 as i32;
        slots.push(block * bs as i32 + (p % bs) as i32);
        // Rows written in the block once this token is (rows are written
        // in order): not the reserved length, which may run ahead.
        let fill = (p % bs + 1) as i32;
        match touched.last_mut() {
            Some(last) if last.0 == block => last.1 = fill,
            _ => {
                touched.push((block, fill));
                starts.push(i as i32);
            }
        }
    }
    starts.push(positions.len() as i32);
    let tables = seqs
        .iter()
        .map(|&s| cache.table(s))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let longest = tables.iter().map(|t| t.blocks().len()).max().unwrap_or(1).max(1);
    let max_blocks = match width {
        Some(w) if longest > w => {
            return Err(AttnError::Config(format!(
                "a sequence of {longest} blocks outgrew the CUDA graphs' block tables of {w}"
            )))
        }
        Some(w) => w,
        None => longest,
    };
    let mut table = vec![0i32; seqs.len() * max_blocks];
    for (i, t) in tables.iter().enumerate() {
        for (j, b) in t.blocks().iter().enumerate() {
            table[i * max_blocks + j] = b.0 as i32;
        }
    }
    let lens: Vec<i32> = tables.iter().map(|t| t.len() as i32).collect();
    let (blocks, fills): (Vec<i32>, Vec<i32>) = touched.into_iter().unzip();
    Ok(StepLayout {
        slots,
        blocks,
        fills,
        starts,
        table,
        lens,
        max_blocks,
        max_len: tables.iter().map(|t| t.len()).max().unwrap_or(0),
    })
}
