use thiserror::Error;

/// What can go wrong in the offload engine.
#[derive(Debug, Error)]
pub enum OffloadError {
    #[error(
        "the host KV pool is full: {needed} more blocks needed, {free} free of {capacity} \
         ({capacity_bytes} bytes); raise the host budget or admit fewer sequences"
    )]
    HostPoolFull {
        needed: usize,
        free: usize,
        capacity: usize,
        capacity_bytes: usize,
    },
    #[error(
        "layer {layer}'s resident pool cannot hold this step's selection: {needed} units to place, \
         {capacity} slots ({pinned} pinned, {busy} busy with copies); raise the slack or lower k_b"
    )]
    ResidentPoolFull {
        layer: usize,
        needed: usize,
        capacity: usize,
        pinned: usize,
        busy: usize,
    },
    #[error("unit (block {block}, head {head}) is outside the host pool ({blocks} blocks x {kv_heads} heads)")]
    UnitOutOfRange {
        block: u32,
        head: u16,
        blocks: usize,
        kv_heads: usize,
    },
    #[error("layer {layer} out of range (the engine has {num_layers})")]
    LayerOutOfRange { layer: usize, num_layers: usize },
    #[error("invalid offload configuration: {0}")]
    Config(String),
    #[error("transfer failed: {0}")]
    Transfer(String),
    #[error(transparent)]
    Cuda(#[from] cudarc::driver::DriverError),
    #[error(transparent)]
    Kernels(#[from] asynctls_kernels::Error),
}

pub type Result<T> = std::result::Result<T, OffloadError>;
