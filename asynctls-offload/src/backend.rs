//! The seam between the engine's bookkeeping and the memory it moves.

use std::time::Duration;

use crate::{Result, Slot, Unit};

/// Transfer time of a step and the part of it the compute did not hide.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTiming {
    /// Time the copy engine spent on this step's copies.
    pub transfer: Duration,
    /// Time the compute waited for copies (misses on the critical path, and
    /// prefetches that had not landed when the attention needed them).
    pub exposed: Duration,
}

/// Moves units between the host pool and a layer's resident slots.
///
/// Copies are asynchronous and complete in issue order (one copy engine);
/// a ticket names one batch of them.
pub trait TransferBackend: Send {
    type Ticket: Clone + std::fmt::Debug + Send;

    fn num_layers(&self) -> usize;
    fn kv_heads(&self) -> usize;
    /// Blocks in the host pool (units per layer = blocks x heads).
    fn host_blocks(&self) -> usize;
    fn slots_per_layer(&self) -> usize;
    /// Bytes one unit moves (its K and V rows).
    fn unit_bytes(&self) -> usize;

    /// Starts copying host units into slots of `layer`. The copies wait for
    /// every read of `layer`'s slots announced by [`reads_done`](Self::reads_done).
    fn fetch(&mut self, layer: usize, copies: &[(Unit, Slot)]) -> Result<Self::Ticket>;
    /// Starts copying slots of `layer` back to their host units.
    fn flush(&mut self, layer: usize, copies: &[(Slot, Unit)]) -> Result<Self::Ticket>;
    /// Whether a ticket's copies have completed (never blocks).
    fn is_complete(&mut self, ticket: &Self::Ticket) -> Result<bool>;
    /// Orders the next compute after the ticket's copies: a GPU makes the
    /// compute stream wait (the host does not block); the simulator blocks.
    fn order_before_compute(&mut self, ticket: &Self::Ticket) -> Result<()>;
    /// The compute that reads `layer`'s pinned slots has been issued; copies
    /// issued later into those slots must wait for it.
    fn reads_done(&mut self, layer: usize) -> Result<()>;
    /// The timing of the copies that completed since the last call (never
    /// blocks: prefetches for the next step stay in flight across the step
    /// boundary).
    fn finish_step(&mut self) -> Result<StepTiming>;
    /// Blocks until every copy issued so far has completed.
    fn synchronize(&mut self) -> Result<()>;

    /// `units` of `layer` lost their slots (before any copy into those slots
    /// is issued). A backend whose kernels look slots up on the device
    /// updates its table with the next batch of copies.
    fn evicted(&mut self, _layer: usize, _units: &[Unit]) -> Result<()> {
        Ok(())
    }

    /// `unit` of `layer` was given `slot` for a block written on the device.
    fn placed_new(&mut self, _layer: usize, _unit: Unit, _slot: Slot) -> Result<()> {
        Ok(())
    }
}
