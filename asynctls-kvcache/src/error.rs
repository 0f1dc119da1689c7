//! Errors of the paged KV cache.

/// Everything the cache refuses, with enough detail to act on.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("KV cache is full: {needed} more blocks of {block_size} tokens needed, {free} free of {total}")]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
        block_size: usize,
    },
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),
    #[error("{op}: expected {expected} values, got {got}")]
    WrongLength {
        op: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("layer {layer} is out of range (the cache has {num_layers} layers)")]
    LayerOutOfRange { layer: usize, num_layers: usize },
    #[error(
        "sequence {seq}, layer {layer}: writes must continue at position {expected}, got {got} \
         (the sequence has {len} reserved tokens)"
    )]
    OutOfOrderWrite {
        seq: u64,
        layer: usize,
        expected: usize,
        got: usize,
        len: usize,
    },
    #[error("sequence {seq} cannot be forked: layer {layer} has written {written} of its {len} tokens")]
    IncompleteSequence {
        seq: u64,
        layer: usize,
        written: usize,
        len: usize,
    },
    #[error("storage does not support {0}")]
    StorageUnsupported(&'static str),
    #[error(
        "the GPU cache does not fit: {blocks} blocks of {layers} layers need {need_gib:.2} GiB, \
         {free_gib:.2} GiB of GPU memory are free"
    )]
    GpuMemory {
        blocks: usize,
        layers: usize,
        need_gib: f64,
        free_gib: f64,
    },
    #[error(
        "the host KV pool does not fit: {blocks} blocks of {layers} layers need {need_gib:.2} GiB, \
         {available_gib:.2} GiB of host memory are available"
    )]
    HostMemory {
        blocks: usize,
        layers: usize,
        need_gib: f64,
        available_gib: f64,
    },
    #[error(transparent)]
    Kernel(#[from] asynctls_kernels::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CacheError>;
