//! The residency resolver: per layer, which unit (block of one KV head) sits
//! in which resident slot, decided on the device by the kernels of
//! asynctls-kernels' `cuda/gather.cu` so an offloaded step needs no host
//! round trip, and here on the host as their twin, entry for entry.
//!
//! A step of one layer, after the selection:
//! 1. **resolve**: every block a row attends (its sink blocks, its selected
//!    candidates, its local window and partial block, in that order) is a
//!    hit when resident (the slot's recency becomes this step) or a miss,
//!    which the attention reads in place from the host tier;
//! 2. **promote**: after the attention, the step's misses (in row and entry
//!    order, a unit several rows missed once, at most `max_promote`) take slots, so the next step finds them
//!    resident: the one-step-lag prediction, decided without the host.
//!    Victims are the least recently selected slots (free ones first) among
//!    those no step of the last `protect` selected: a histogram of the
//!    slots' ages (capped at 254 steps; free slots in a bucket of their
//!    own) gives the age threshold,
//!    and among slots of that age a clock hand decides, moving past the last
//!    victim. `protect = 2` keeps the last two selections resident, the
//!    union-of-two predictor;
//! 3. the copies the promotion decided run on a copy stream, overlapped with
//!    the next layers.
//!
//! The tables are plain arrays with the kernels' layout, so a GPU test can
//! compare every entry after every step.

use asynctls_kernels::cuda::gather::SelectionShape;
use serde::Serialize;

use crate::{OffloadError, Result};

/// Counters of one layer's residency (the kernels' `STAT_*` order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ResidencyStats {
    /// Units the attention asked for.
    pub requested: u64,
    /// Of those, resident when asked.
    pub hits: u64,
    /// Not resident: read in place from the host tier.
    pub misses: u64,
    /// Hits whose unit the previous step selected too (the selection's
    /// overlap with the previous step, counted on resident units).
    pub overlap: u64,
    /// Misses given a slot (copied in for the next step).
    pub promoted: u64,
    /// Resident units that gave up their slot.
    pub evicted: u64,
    /// Misses left without a slot (too few evictable slots, or over `max_promote`).
    pub unplaced: u64,
    /// Bytes copied host to device by the promotions.
    pub h2d_bytes: u64,
}

/// Age buckets of the promotion's histogram (the kernel's `AGE_BUCKETS`):
/// the last holds the free slots, the one before it every slot unselected
/// for `AGE_BUCKETS - 2` steps or more.
pub const AGE_BUCKETS: usize = 256;

/// Number of counters in [`ResidencyStats`] (`RESIDENCY_STATS` of the kernels).
pub const STATS: usize = 8;

impl ResidencyStats {
    pub fn from_array(a: [u64; STATS]) -> Self {
        ResidencyStats {
            requested: a[0],
            hits: a[1],
            misses: a[2],
            overlap: a[3],
            promoted: a[4],
            evicted: a[5],
            unplaced: a[6],
            h2d_bytes: a[7],
        }
    }

    pub fn to_array(self) -> [u64; STATS] {
        [
            self.requested,
            self.hits,
            self.misses,
            self.overlap,
            self.promoted,
            self.evicted,
            self.unplaced,
            self.h2d_bytes,
        ]
    }

    /// What happened between `earlier` and `self` (both cumulative).
    pub fn since(self, earlier: ResidencyStats) -> ResidencyStats {
        let (a, b) = (self.to_array(), earlier.to_array());
        ResidencyStats::from_array(std::array::from_fn(|i| a[i].saturating_sub(b[i])))
    }

    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.requested.max(1) as f64
    }
    pub fn miss_rate(&self) -> f64 {
        self.misses as f64 / self.requested.max(1) as f64
    }
    pub fn overlap_rate(&self) -> f64 {
        self.overlap as f64 / self.requested.max(1) as f64
    }
}

impl std::ops::Add for ResidencyStats {
    type Output = ResidencyStats;
    fn add(self, other: ResidencyStats) -> ResidencyStats {
        let (a, b) = (self.to_array(), other.to_array());
        ResidencyStats::from_array(std::array::from_fn(|i| a[i] + b[i]))
    }
}

/// How the promotion chooses (the device kernels take the same two numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromotePolicy {
    /// A slot is kept while one of the last `protect` steps selected its unit.
    pub protect: u32,
    /// Misses promoted per layer and step at most (bounds the copy list).
    pub max_promote: usize,
}

impl PromotePolicy {
    /// The one-step-lag predictor: this step's selection is kept for the next.
    pub fn one_step_lag(max_promote: usize) -> Self {
        PromotePolicy {
            protect: 1,
            max_promote,
        }
    }
    /// The union of the last two selections is kept.
    pub fn union_of_last_two(max_promote: usize) -> Self {
        PromotePolicy {
            protect: 2,
            max_promote,
        }
    }
    pub fn name(&self) -> &'static str {
        match self.protect {
            1 => "one-step-lag",
            2 => "union-of-last-two",
            _ => "last-n",
        }
    }
}

/// One layer's step selection as the resolver reads it: the selection
/// kernels' candidates and the batch's lengths and block table.
#[derive(Debug, Clone, Copy)]
pub struct StepSelection<'a> {
    /// `[rows, block_topk]`, each row's selected logical blocks.
    pub candidates: &'a [i32],
    /// `[rows]`
    pub candidate_counts: &'a [i32],
    /// `[batch]`
    pub lens: &'a [i32],
    /// `[batch, max_blocks]`: logical -> physical block.
    pub block_table: &'a [i32],
    pub shape: SelectionShape,
}

impl StepSelection<'_> {
    /// (sequence, KV head) rows: `lens.len() * kv_heads`.
    pub fn rows(&self) -> usize {
        self.lens.len() * self.shape.kv_heads
    }
    /// The most blocks one row attends.
    pub fn max_entries(&self) -> usize {
        self.shape.max_entries()
    }

    /// The logical blocks `row` attends, in entry order (sink, candidates,
    /// local window and partial block), at most [`Self::max_entries`].
    pub fn attended_blocks(&self, row: usize) -> Vec<usize> {
        let seq = row / self.shape.kv_heads;
        let len = self.lens[seq].max(0) as usize;
        let num_blocks = len.div_ceil(self.shape.block_size);
        let (first, last) = rankable_range(
            len,
            self.shape.block_size,
            self.shape.sink_blocks,
            self.shape.local_blocks,
        );
        let count = (self.candidate_counts[row].max(0) as usize).min(self.shape.block_topk);
        let candidates = &self.candidates[row * self.shape.block_topk..row * self.shape.block_topk + count];
        let blocks = (0..first)
            .chain(candidates.iter().map(|&b| b as usize))
            .chain(last..num_blocks);
        blocks.take(self.max_entries()).collect()
    }
}

/// The rankable (not forced) logical blocks `[first, last)` of a sequence of
/// `len` tokens: after the sink, before the local window and a partial
/// block (the selection kernels' `rankable_range`).
pub fn rankable_range(len: usize, block_size: usize, sink_blocks: usize, local_blocks: usize) -> (usize, usize) {
    let num_blocks = len.div_ceil(block_size);
    let partial = usize::from(len % block_size != 0);
    let first = sink_blocks.min(num_blocks);
    (first, num_blocks.saturating_sub(local_blocks + partial).max(first))
}

/// One layer's residency on the host: the twin of the device tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residency {
    /// `[units]`: slot or -1.
    pub unit_slot: Vec<i32>,
    /// `[slots]`: unit or -1.
    pub slot_unit: Vec<i32>,
    /// `[slots]`: last step that selected the slot's unit (0: never).
    pub slot_last: Vec<u32>,
    pub hand: u32,
    pub stats: ResidencyStats,
}

impl Residency {
    /// Empty tables for `units` host units and `slots` resident slots.
    pub fn new(units: usize, slots: usize) -> Result<Self> {
        if units > i32::MAX as usize || slots > i32::MAX as usize || slots == 0 {
            return Err(OffloadError::Config(format!(
                "residency of {units} units in {slots} slots (need 1 to 2^31 - 1 of each)"
            )));
        }
        Ok(Residency {
            unit_slot: vec![-1; units],
            slot_unit: vec![-1; slots],
            slot_last: vec![0; slots],
            hand: 0,
            stats: ResidencyStats::default(),
        })
    }

    pub fn slots(&self) -> usize {
        self.slot_unit.len()
    }

    /// Resident units.
    pub fn resident(&self) -> usize {
        self.slot_unit.iter().filter(|&&u| u >= 0).count()
    }

    /// The step's hits and misses (see the module doc): returns the misses
    /// by entry (`[rows, max_entries]`, -1 for hits and empty entries), as
    /// `residency_resolve` writes them. Rows may share units (forks of one
    /// prompt: each counts its own hit or miss). A physical block outside
    /// the table, or a unit twice in one row, is an error and changes nothing.
    pub fn resolve(&mut self, selection: &StepSelection<'_>, step: u32) -> Result<Vec<i32>> {
        let (rows, max_entries, kvh) = (selection.rows(), selection.max_entries(), selection.shape.kv_heads);
        let mut units = Vec::with_capacity(rows);
        for row in 0..rows {
            let seq = row / kvh;
            let mut row_units = Vec::new();
            // Rows may share units (forks of one prompt); one row may not.
            let mut seen = std::collections::HashSet::new();
            for block in selection.attended_blocks(row) {
                let physical = block
                    .checked_add(seq * selection.shape.max_blocks)
                    .filter(|_| block < selection.shape.max_blocks)
                    .and_then(|at| selection.block_table.get(at))
                    .ok_or_else(|| OffloadError::Config(format!("row {row}: logical block {block} has no entry")))?;
                let physical = u32::try_from(*physical).map_err(|_| {
                    OffloadError::Config(format!(
                        "row {row}: logical block {block} maps to physical block {physical}"
                    ))
                })?;
                let unit = physical as usize * kvh + row % kvh;
                if unit >= self.unit_slot.len() {
                    return Err(OffloadError::UnitOutOfRange {
                        block: physical,
                        head: (row % kvh) as u16,
                        blocks: self.unit_slot.len() / kvh,
                        kv_heads: kvh,
                    });
                }
                if !seen.insert(unit) {
                    return Err(OffloadError::Config(format!(
                        "row {row}: unit {unit} attended twice (a block table maps two logical blocks to one)"
                    )));
                }
                row_units.push(unit);
            }
            units.push(row_units);
        }
        let mut misses = vec![-1; rows * max_entries];
        for (row, row_units) in units.iter().enumerate() {
            for (e, &unit) in row_units.iter().enumerate() {
                self.stats.requested += 1;
                match self.unit_slot[unit] {
                    slot if slot >= 0 => {
                        let slot = slot as usize;
                        self.stats.hits += 1;
                        self.stats.overlap += u64::from(self.slot_last[slot].wrapping_add(1) == step);
                        self.slot_last[slot] = step;
                    }
                    _ => {
                        self.stats.misses += 1;
                        misses[row * max_entries + e] = unit as i32;
                    }
                }
            }
        }
        Ok(misses)
    }

    /// The age bucket of `slot` at `step` (as the kernel's `slot_age`): steps
    /// since its unit was selected, up to `AGE_BUCKETS - 2`; the last bucket
    /// holds the free slots alone, so they are taken first.
    fn age(&self, slot: usize, step: u32) -> usize {
        if self.slot_unit[slot] < 0 {
            AGE_BUCKETS - 1
        } else {
            (step.wrapping_sub(self.slot_last[slot]) as usize).min(AGE_BUCKETS - 2)
        }
    }

    /// Promotes the step's misses (as [`Self::resolve`] returned them) by
    /// `policy`, as `residency_promote` does: each distinct unit once, in
    /// the order of its first entry, into the least recently selected
    /// evictable slots (free ones first), ties in clock order from the hand;
    /// returns the copies to make (unit -> slot), in order.
    pub fn promote(
        &mut self,
        miss_units: &[i32],
        step: u32,
        policy: PromotePolicy,
        unit_bytes: usize,
    ) -> Vec<(u32, u32)> {
        // A unit several rows missed (rows sharing a block) is promoted
        // once, for its first entry.
        let mut seen = std::collections::HashSet::new();
        let misses: Vec<u32> = miss_units
            .iter()
            .filter(|&&u| u >= 0)
            .map(|&u| u as u32)
            .filter(|&u| seen.insert(u))
            .collect();
        let want = misses.len().min(policy.max_promote);
        let slots = self.slots();
        let protect = policy.protect as usize;
        let mut histogram = [0usize; AGE_BUCKETS];
        if want > 0 {
            for slot in 0..slots {
                let age = self.age(slot, step);
                if age >= protect {
                    histogram[age] += 1;
                }
            }
        }
        // The oldest buckets that hold `want` victims; all evictable when fewer.
        let (mut taken, mut threshold) = (0, AGE_BUCKETS - 1);
        while threshold > protect && taken + histogram[threshold] < want {
            taken += histogram[threshold];
            threshold -= 1;
        }
        let need_at_threshold = (want - taken).min(histogram[threshold]);
        let found = taken + need_at_threshold;
        let hand = self.hand as usize % slots;
        let mut victims = Vec::with_capacity(found);
        let (mut equal_before, mut last_victim) = (0, 0);
        for k in 0..slots {
            if victims.len() == found {
                break;
            }
            let slot = (hand + k) % slots;
            let age = self.age(slot, step);
            let chosen = age > threshold || (age == threshold && equal_before < need_at_threshold);
            if age == threshold {
                equal_before += 1;
            }
            if chosen {
                victims.push(slot as u32);
                last_victim = k;
            }
        }
        let mut copies = Vec::with_capacity(found);
        for (&slot, &unit) in victims.iter().zip(&misses) {
            let old = self.slot_unit[slot as usize];
            if old >= 0 {
                self.unit_slot[old as usize] = -1;
                self.stats.evicted += 1;
            }
            self.unit_slot[unit as usize] = slot as i32;
            self.slot_unit[slot as usize] = unit as i32;
            self.slot_last[slot as usize] = step;
            copies.push((unit, slot));
        }
        if found > 0 {
            self.hand = ((hand + last_victim + 1) % slots) as u32;
        }
        self.stats.promoted += found as u64;
        self.stats.unplaced += (misses.len() - found) as u64;
        self.stats.h2d_bytes += (found * unit_bytes) as u64;
        copies
    }

    /// The tables agree with each other: a unit's slot holds that unit and
    /// back, and no slot is claimed twice.
    pub fn check(&self) -> std::result::Result<(), String> {
        for (unit, &slot) in self.unit_slot.iter().enumerate() {
            if slot >= 0 && self.slot_unit.get(slot as usize) != Some(&(unit as i32)) {
                return Err(format!(
                    "unit {unit} points at slot {slot}, which holds {:?}",
                    self.slot_unit.get(slot as usize)
                ));
            }
        }
        for (slot, &unit) in self.slot_unit.iter().enumerate() {
            if unit >= 0 && self.unit_slot.get(unit as usize) != Some(&(slot as i32)) {
                return Err(format!(
                    "slot {slot} holds unit {unit}, which points at {:?}",
                    self.unit_slot.get(unit as usize)
                ));
            }
        }
        Ok(())
    }
}
