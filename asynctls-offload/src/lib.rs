//! The asynchronous offload engine: the full K/V of every sequence lives in
//! (pinned) host memory, and each layer keeps a small resident pool of slots
//! on the GPU holding the blocks the sparse attention is about to read.
//!
//! The unit of residency is one block of one KV head in one layer
//! ([`Unit`]): two-level selection picks blocks per KV head, so a unit is
//! what one head's selection asks for, and its K/V rows are contiguous in the
//! host pool's `[block, kv_head, slot, dim]` layout.
//!
//! A decode step, per layer: the selection of step t-1 predicts step t's
//! ([`Predictor`], one-step lag by default); [`OffloadEngine::prefetch`]
//! copies only the predicted units that are not resident (incremental
//! transfer), evicting the least recently selected ones ([`EvictionPolicy`]),
//! on a copy stream while the GPU computes; [`OffloadEngine::acquire`] maps
//! step t's actual selection to slots, fetches any miss on the critical path
//! (counted, never skipped) and orders the attention after every copy it
//! depends on; [`OffloadEngine::release`] marks the slots read. Newly written
//! blocks are flushed to the host in the background
//! ([`OffloadEngine::flush`]). Every step's [`StepMetrics`] says what moved
//! and how much of the transfer time the compute hid.
//!
//! Data movement is behind [`TransferBackend`]: [`sim::SimBackend`] (copies
//! on a worker thread with injected delays, for property tests of the
//! engine's ordering) and [`cuda::CudaBackend`] (pinned host pool, a copy
//! stream, `cuMemcpyHtoDAsync` of contiguous runs, CUDA events).
//!
//! The same policy without the host: [`resolver`] keeps a layer's
//! residency in tables the device updates itself (resolve the selection,
//! promote its misses by the clock, copy them on a copy stream), its host
//! twin tested against the kernels; [`gpu_resolver::GpuResidency`] runs it
//! on the GPU so an offloaded step is one CUDA graph.
//!
//! [`OffloadedStorage`] puts the engine behind asynctls-kvcache's storage
//! trait (host tier + resident copies), so the CPU two-level decode of
//! asynctls-attn runs over it unchanged, GQA and MLA.
//!
//! Does not own: which blocks are selected (asynctls-attn and the GPU
//! selection kernels decide), or the attention kernels that read the slots.

pub mod backend;
pub mod cuda;
mod engine;
mod error;
mod evict;
pub mod gpu_resolver;
mod host;
mod predict;
pub mod resolver;
pub mod sim;
pub mod storage;

pub use backend::{StepTiming, TransferBackend};
pub use engine::{hidden_fraction, Acquired, OffloadConfig, OffloadEngine, StepMetrics};
pub use error::{OffloadError, Result};
pub use evict::{EvictionPolicy, FirstLoaded, LeastRecentlySelected, UnitStats};
pub use host::HostPool;
pub use predict::{OneStepLag, Predictor, UnionOfLastTwo};
pub use resolver::{PromotePolicy, Residency, ResidencyStats, StepSelection};
pub use storage::{KvStore, OffloadedStorage};

/// One block of one KV head in one layer: the unit of residency and transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Unit {
    /// Physical block in the host pool.
    pub block: u32,
    pub head: u16,
}

impl Unit {
    pub fn new(block: u32, head: u16) -> Self {
        Unit { block, head }
    }

    /// Position of the unit in a layer of the host pool (`block * kv_heads + head`).
    pub fn index(self, kv_heads: usize) -> usize {
        self.block as usize * kv_heads + self.head as usize
    }
}

/// A slot of a layer's resident pool on the device.
pub type Slot = u32;

/// Host memory the kernel reports as available: what a host tier may pin.
pub use asynctls_kvcache::host_available_bytes;
