//! Whole-unit gathers for the offload engine: one launch copies many
//! scattered units (a block's rows of one KV head) into resident slots,
//! reading the source through the device's mapping of pinned host memory.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::{CudaOps, SelectParams, SelectScratch};
use crate::error::invalid;
use crate::Result;

impl CudaOps {
    /// On `stream`, copies unit `units[i]` of the pool at device address
    /// `src` (`[.., unit_bytes]`, e.g. mapped pinned host memory) to slot
    /// `slots[i]` of the pool at device address `dst`.
    ///
    /// # Safety
    /// `src` and `dst` must be device-accessible addresses holding every unit
    /// and slot named, valid until the copy completes on `stream`.
    pub unsafe fn gather_units(
        &self,
        stream: &Arc<CudaStream>,
        src: u64,
        dst: u64,
        units: &CudaSlice<i64>,
        slots: &CudaSlice<i32>,
        unit_bytes: usize,
    ) -> Result<()> {
        if unit_bytes % 16 != 0 || units.len() != slots.len() {
            return Err(invalid(
                "gather_units",
                format!(
                    "unit of {unit_bytes} bytes (need a multiple of 16), {} units for {} slots",
                    units.len(),
                    slots.len()
                ),
            ));
        }
        if units.is_empty() {
            return Ok(());
        }
        let f = self.function(&self.gather, "gather_units")?;
        let vec4 = (unit_bytes / 16) as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&src).arg(&dst).arg(units).arg(slots).arg(&vec4);
        let cfg = LaunchConfig {
            grid_dim: (units.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller vouches for `src` and `dst`.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

impl CudaOps {
    /// On `stream`: `table[index[i]] = values[i]`.
    ///
    /// # Safety
    /// Every `index[i]` must be below `table.len()` (the indices live on the
    /// device and are not checked).
    pub unsafe fn scatter_i32(
        &self,
        stream: &Arc<CudaStream>,
        table: &mut CudaSlice<i32>,
        index: &CudaSlice<i32>,
        values: &CudaSlice<i32>,
    ) -> Result<()> {
        if index.len() != values.len() {
            return Err(invalid(
                "scatter_i32",
                format!("{} indices for {} values", index.len(), values.len()),
            ));
        }
        if index.is_empty() {
            return Ok(());
        }
        let f = self.function(&self.gather, "scatter_i32")?;
        let n = index.len() as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(table).arg(index).arg(values).arg(&n);
        // SAFETY: indices come from the caller's bookkeeping of this table
        // (each below its length).
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }?;
        Ok(())
    }
}

/// Counters of a layer's device-side residency, in the order the resolver
/// kernels keep them (`[u64; RESIDENCY_STATS]` per layer).
pub const RESIDENCY_STATS: usize = 8;

/// Which blocks a step's rows attend, besides the candidates themselves:
/// the selection's parameters and the batch's table geometry. Shared by the
/// device resolver's input and its host twin's (asynctls-offload's
/// `StepSelection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectionShape {
    /// Width of the block table (logical blocks per sequence).
    pub max_blocks: usize,
    pub kv_heads: usize,
    pub block_size: usize,
    pub block_topk: usize,
    pub sink_blocks: usize,
    pub local_blocks: usize,
}

impl SelectionShape {
    /// The shape of a selection made with `params` over a block table of
    /// `max_blocks` (so the resolver maps exactly the blocks it chose).
    pub fn of(params: &SelectParams, max_blocks: usize, kv_heads: usize, block_size: usize) -> Self {
        SelectionShape {
            max_blocks,
            kv_heads,
            block_size,
            block_topk: params.block_topk,
            sink_blocks: params.sink_blocks,
            local_blocks: params.local_blocks,
        }
    }

    /// The most blocks one row attends: sink, candidates, local window and a partial block.
    pub fn max_entries(&self) -> usize {
        self.sink_blocks + self.block_topk + self.local_blocks + 1
    }
}

/// The step's selection as the resolver reads it (the selection kernels'
/// candidates, the batch's lengths and block table).
#[derive(Debug, Clone, Copy)]
pub struct ResolveInput<'a> {
    /// `[rows, block_topk]`, ascending per row.
    pub candidates: &'a CudaSlice<i32>,
    /// `[rows]`
    pub candidate_counts: &'a CudaSlice<i32>,
    /// `[batch]`
    pub lens: &'a CudaSlice<i32>,
    /// `[batch, max_blocks]`: logical -> physical block.
    pub block_table: &'a CudaSlice<i32>,
    pub shape: SelectionShape,
}

impl<'a> ResolveInput<'a> {
    /// The candidates `select` holds after a selection of `shape` over
    /// `lens` and `block_table`.
    pub fn new(
        select: &'a SelectScratch,
        lens: &'a CudaSlice<i32>,
        block_table: &'a CudaSlice<i32>,
        shape: SelectionShape,
    ) -> Self {
        let (candidates, candidate_counts) = select.candidates();
        ResolveInput {
            candidates,
            candidate_counts,
            lens,
            block_table,
            shape,
        }
    }

    /// The most blocks one row attends: sink, candidates, local window and a partial block.
    pub fn max_entries(&self) -> usize {
        self.shape.max_entries()
    }
    /// (sequence, KV head) rows: `lens.len() * kv_heads`.
    pub fn rows(&self) -> usize {
        self.lens.len() * self.shape.kv_heads
    }
}

/// One layer's device-side residency tables (see `cuda/gather.cu`).
#[derive(Debug)]
pub struct ResidencyTables<'a> {
    /// `[units]`: slot or -1 (what the attention's offloaded view reads).
    pub unit_slot: &'a mut CudaSlice<i32>,
    /// `[slots]`: unit or -1.
    pub slot_unit: &'a mut CudaSlice<i32>,
    /// `[slots]`: last step that selected the slot's unit.
    pub slot_last: &'a mut CudaSlice<u32>,
    /// `[1]`: the clock hand.
    pub hand: &'a mut CudaSlice<u32>,
    /// `[RESIDENCY_STATS]`
    pub stats: &'a mut CudaSlice<u64>,
}

/// Scratch of one layer's resolve and promote.
#[derive(Debug)]
pub struct ResolveScratch<'a> {
    /// `[rows, max_blocks]`: each attended block's slot or `-(unit + 1)`,
    /// what the attention reads ([`super::SlotLookup::ByRow`]).
    pub row_slots: &'a mut CudaSlice<i32>,
    /// `[rows * max_entries]`: the step's misses by entry, -1 elsewhere.
    pub miss_units: &'a mut CudaSlice<i32>,
    /// `[rows * max_entries]`: the misses, compacted.
    pub miss_list: &'a mut CudaSlice<i32>,
    /// `[max_promote]`: the copies to make (unit -> slot) and their count.
    pub copy_units: &'a mut CudaSlice<i64>,
    pub copy_slots: &'a mut CudaSlice<i32>,
    pub copy_count: &'a mut CudaSlice<i32>,
}

impl CudaOps {
    /// On `stream`: the device's step counter (`[1]`) moves on by one.
    pub fn residency_next_step(&self, stream: &Arc<CudaStream>, step: &mut CudaSlice<u32>) -> Result<()> {
        let f = self.function(&self.gather, "residency_next_step")?;
        let mut b = stream.launch_builder(&f);
        b.arg(step);
        // SAFETY: one thread writes the one element.
        unsafe { b.launch(LaunchConfig::for_num_elems(1)) }?;
        Ok(())
    }

    /// On `stream`: counts the step's hits and misses of one layer, marks
    /// the hits' recency, writes the misses by entry and the row slot table
    /// the attention reads (see `cuda/gather.cu`).
    ///
    /// # Safety
    /// Every physical block of `input.block_table` reached by a row's
    /// attended blocks must be below `tables.unit_slot.len() / kv_heads`
    /// (the table lives on the device and is not checked), and no two
    /// (sequence, logical block) pairs may share a physical block.
    pub unsafe fn residency_resolve(
        &self,
        stream: &Arc<CudaStream>,
        input: &ResolveInput<'_>,
        tables: &mut ResidencyTables<'_>,
        step: &CudaSlice<u32>,
        scratch: &mut ResolveScratch<'_>,
    ) -> Result<()> {
        let rows = input.rows();
        let max_entries = input.max_entries();
        if rows == 0 {
            return Ok(());
        }
        if input.shape.kv_heads == 0
            || input.shape.block_size == 0
            || input.candidate_counts.len() < rows
            || input.candidates.len() < rows * input.shape.block_topk
            || input.block_table.len() < input.lens.len() * input.shape.max_blocks
            || scratch.miss_units.len() < rows * max_entries
            || scratch.row_slots.len() < rows * input.shape.max_blocks
            || tables.stats.len() < RESIDENCY_STATS
        {
            return Err(invalid(
                "residency_resolve",
                format!(
                    "{rows} rows of {} KV heads, {} candidates for k_b {}, {} lengths, a table of {} for {} blocks, \
                     {} miss entries for {}",
                    input.shape.kv_heads,
                    input.candidates.len(),
                    input.shape.block_topk,
                    input.lens.len(),
                    input.block_table.len(),
                    input.shape.max_blocks,
                    scratch.miss_units.len(),
                    rows * max_entries
                ),
            ));
        }
        let f = self.function(&self.gather, "residency_resolve")?;
        let ints = [
            input.shape.max_blocks as i32,
            input.shape.kv_heads as i32,
            input.shape.block_size as i32,
            input.shape.block_topk as i32,
            input.shape.sink_blocks as i32,
            input.shape.local_blocks as i32,
        ];
        let max_entries = max_entries as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(input.candidates)
            .arg(input.candidate_counts)
            .arg(input.lens)
            .arg(input.block_table);
        for v in &ints {
            b.arg(v);
        }
        b.arg(&*tables.unit_slot)
            .arg(&mut *tables.slot_last)
            .arg(step)
            .arg(&mut *scratch.miss_units)
            .arg(&max_entries)
            .arg(&mut *scratch.row_slots)
            .arg(&mut *tables.stats);
        // SAFETY: sizes checked above; the caller vouches for the block table.
        unsafe { b.launch(super::rows_config(rows, 256)) }?;
        Ok(())
    }

    /// On `stream`: gives up to `max_promote` of the step's misses (written
    /// by [`Self::residency_resolve`] over `entries` entries) resident slots
    /// by age (least recently selected first, ties by the clock) among slots
    /// not selected in the last `protect` steps (1 to 255),
    /// updates the tables and writes the copies to make.
    ///
    /// # Safety
    /// Every unit in `scratch.miss_units` must index `tables.unit_slot`
    /// (as the resolve writes them under its own contract).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn residency_promote(
        &self,
        stream: &Arc<CudaStream>,
        entries: usize,
        tables: &mut ResidencyTables<'_>,
        step: &CudaSlice<u32>,
        protect: u32,
        max_promote: usize,
        unit_bytes: usize,
        scratch: &mut ResolveScratch<'_>,
    ) -> Result<()> {
        let slots = tables.slot_unit.len();
        if scratch.miss_units.len() < entries
            || scratch.miss_list.len() < entries
            || scratch.copy_units.len() < max_promote
            || scratch.copy_slots.len() < max_promote
            || tables.slot_last.len() != slots
            || protect == 0
            || protect >= 256
            || slots > i32::MAX as usize
        {
            return Err(invalid(
                "residency_promote",
                format!(
                    "{entries} entries, {} miss slots, {} copy slots for {max_promote}, {slots} slots, protect {protect}",
                    scratch.miss_units.len(),
                    scratch.copy_units.len()
                ),
            ));
        }
        let f = self.function(&self.gather, "residency_promote")?;
        let (entries, slots, protect, max_promote, unit_bytes) = (
            entries as i32,
            slots as i32,
            protect as i32,
            max_promote as i32,
            unit_bytes as i32,
        );
        let mut b = stream.launch_builder(&f);
        b.arg(&*scratch.miss_units)
            .arg(&entries)
            .arg(&mut *scratch.miss_list)
            .arg(&mut *tables.unit_slot)
            .arg(&mut *tables.slot_unit)
            .arg(&mut *tables.slot_last)
            .arg(&slots)
            .arg(step)
            .arg(&protect)
            .arg(&max_promote)
            .arg(&mut *tables.hand)
            .arg(&mut *scratch.copy_units)
            .arg(&mut *scratch.copy_slots)
            .arg(&mut *scratch.copy_count)
            .arg(&mut *tables.stats)
            .arg(&unit_bytes);
        // SAFETY: the caller vouches that every unit in `miss_units` indexes `unit_slot`
        // (the resolve's contract); slots and copies are sized above.
        unsafe { b.launch(super::rows_config(1, 1024)) }?;
        Ok(())
    }

    /// On `stream`: the copies [`Self::residency_promote`] decided, keys and
    /// (when `value_bytes > 0`) values, in one launch of `grid` CTAs.
    ///
    /// # Safety
    /// `src_*` and `dst_*` must be device-accessible pools holding every unit
    /// and slot the copy list names, valid until the copy completes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_units_counted(
        &self,
        stream: &Arc<CudaStream>,
        keys: (u64, u64),
        key_bytes: usize,
        values: (u64, u64),
        value_bytes: usize,
        scratch: &ResolveScratch<'_>,
        grid: usize,
    ) -> Result<()> {
        if key_bytes % 16 != 0 || value_bytes % 16 != 0 || key_bytes == 0 {
            return Err(invalid(
                "gather_units_counted",
                format!("units of {key_bytes} + {value_bytes} bytes (need nonzero multiples of 16)"),
            ));
        }
        let f = self.function(&self.gather, "gather_units_counted")?;
        let (kv4, vv4) = ((key_bytes / 16) as i32, (value_bytes / 16) as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&keys.0)
            .arg(&keys.1)
            .arg(&kv4)
            .arg(&values.0)
            .arg(&values.1)
            .arg(&vv4)
            .arg(&*scratch.copy_units)
            .arg(&*scratch.copy_slots)
            .arg(&*scratch.copy_count);
        let cfg = LaunchConfig {
            grid_dim: (grid.max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller vouches for the pools; the list is the promote's.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
