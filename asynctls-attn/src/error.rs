//! Errors of the attention adapters.

/// What an attention call can refuse.
#[derive(Debug, thiserror::Error)]
pub enum AttnError {
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("invalid attention configuration: {0}")]
    Config(String),
    #[error("{end} positions exceed the model's context of {limit}")]
    ContextTooLong { end: usize, limit: usize },
    #[error(transparent)]
    Cache(#[from] asynctls_kvcache::CacheError),
    #[error(transparent)]
    Kernel(#[from] asynctls_kernels::Error),
    #[error(transparent)]
    Offload(#[from] asynctls_offload::OffloadError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, AttnError>;

pub(crate) fn shape_err(what: &'static str, expected: impl ToString, got: impl ToString) -> AttnError {
    AttnError::Shape {
        what,
        expected: expected.to_string(),
        got: got.to_string(),
    }
}
