//! The paged KV cache of asynctls.
//!
//! Owns: the block allocator ([`BlockAllocator`], O(1) alloc/free with
//! reference counts so forks share prefix blocks), per-sequence block tables
//! ([`PagedKvCache`]), appends with the online update of each block's
//! channel-wise key max/min and of the INT4 label cache (a configured subset
//! of `r` key channels per layer and KV head, per-token scale and zero),
//! memory accounting, and the [`KvStorage`] trait that says where blocks live.
//!
//! Does not own: attention (`asynctls-attn` reads the cache through
//! [`HostReadable`]) or the host/GPU tiering (`asynctls-offload` is another
//! [`KvStorage`]).
//!
//! ```
//! use asynctls_kvcache::{CacheConfig, HostKvStorage, LabelChannels, PagedKvCache};
//! let config = CacheConfig::gqa(1, 2, 64, 16);
//! let storage = HostKvStorage::new(&config, LabelChannels::leading(&config))?;
//! let mut cache = PagedKvCache::new(storage)?;
//! let seq = cache.add_sequence();
//! let key = vec![0.5f32; 2 * 64];
//! let value = vec![1.0f32; 2 * 64];
//! cache.append(seq, &[&key], &[&value])?;
//! assert_eq!(cache.table(seq)?.len(), 1);
//! # Ok::<(), asynctls_kvcache::CacheError>(())
//! ```

mod allocator;
mod cache;
mod config;
mod error;
mod gpu;
pub mod label;
mod storage;

pub use allocator::{BlockAllocator, BlockId};
pub use cache::{BlockTable, MemoryReport, PagedKvCache, SeqId};
pub use config::{CacheConfig, KvDType, LabelChannels, ValueLayout};
pub use error::{CacheError, Result};
pub use gpu::{GpuKvStorage, GPU_HEADROOM_BYTES};
pub use storage::{bf16_at_least, bf16_at_most, HostKvStorage, HostReadable, KvSlice, KvStorage, Rows};

/// Host memory the kernel reports as available (`MemAvailable` of
/// `/proc/meminfo`), if it can be read.
pub fn host_available_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
