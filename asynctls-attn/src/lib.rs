//! Decode attention for asynctls: dense, and the two-level sparse attention
//! of AsyncTLS, over a paged KV cache.
//!
//! Owns: the policies ([`Policy`]: dense, tls, quest, ds) and their knobs
//! ([`SparseConfig`]), the selection stages ([`select`]: the block filter in
//! GEMM form, INT4 label scoring), exact attention over a selection
//! ([`decode`]), GQA and MLA head geometry ([`AttnShape`]), channel
//! calibration for the label cache ([`calibrate`]), causal prefill attention
//! ([`prefill`]), and accuracy metrics
//! ([`metrics`]: recall of the dense softmax mass, relative L2 error).
//!
//! Reads the cache only through `asynctls_kvcache::HostReadable`, so any
//! storage that can hand out host rows works; it never allocates blocks.
//!
//! ```
//! use asynctls_attn::{decode, AttnShape, Policy, SparseConfig};
//! use asynctls_kvcache::{CacheConfig, HostKvStorage, LabelChannels, PagedKvCache};
//! let shape = AttnShape::gqa(4, 2, 64);
//! let config = CacheConfig::gqa(1, 2, 64, 8);
//! let mut cache = PagedKvCache::new(HostKvStorage::new(&config, LabelChannels::leading(&config))?)?;
//! let seq = cache.add_sequence();
//! let keys: Vec<f32> = (0..10 * 2 * 64).map(|i| (i as f32 * 0.1).sin()).collect();
//! cache.append(seq, &[&keys], &[&keys])?;
//! let q = vec![0.1f32; 4 * 64];
//! let mut out = vec![0.0f32; 4 * 64];
//! let table = cache.table(seq)?;
//! let report = decode(cache.storage(), &[table], 0, &q, &shape, &SparseConfig::default(), &mut out)?;
//! assert!(report.heads[0].dense); // 10 tokens: below the sparse threshold
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
pub mod calibrate;
mod config;
mod cuda_backend;
mod decode;
mod error;
pub mod metrics;
mod prefill;
pub mod select;
mod shape;
pub mod step_layout;
mod tiered;

pub use backend::{
    reserve_decode, AttentionBackend, AttentionPlan, AttentionStats, CpuAttention, Sequences, Step, StepKind,
};
pub use config::{GroupReduce, Policy, SparseConfig, MLA_TLS_BLOCK_TOPK};
pub use cuda_backend::{check_gpu_reach, select_params, CudaAttention, OffloadOptions};
pub use decode::{attend, decode, DecodeReport, HeadSelection, StepBytes};
pub use error::{AttnError, Result};
pub use prefill::prefill;
pub use shape::AttnShape;
pub use tiered::TieredAttention;
