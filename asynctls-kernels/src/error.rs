//! One error type for the compute layer.

use crate::DType;

/// Everything that can go wrong in `asynctls-kernels`.
///
/// Mismatches name both sides, so a caller can tell which argument was wrong
/// without reading the op's source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch, {lhs_name} is {lhs:?} but {rhs_name} is {rhs:?}")]
    ShapeMismatch {
        op: &'static str,
        lhs_name: &'static str,
        lhs: Vec<usize>,
        rhs_name: &'static str,
        rhs: Vec<usize>,
    },
    #[error("{op}: dtype mismatch, {lhs_name} is {lhs} but {rhs_name} is {rhs}")]
    DTypeMismatch {
        op: &'static str,
        lhs_name: &'static str,
        lhs: DType,
        rhs_name: &'static str,
        rhs: DType,
    },
    #[error("{op}: {what}")]
    InvalidArgument { op: &'static str, what: String },
    #[error("{op} is not implemented for {dtype} on {device}")]
    Unsupported {
        op: &'static str,
        dtype: DType,
        device: String,
    },
    #[error(
        "no CUDA driver found (libcuda could not be loaded); use --device cpu or run on a machine with an NVIDIA GPU"
    )]
    NoCudaDriver,
    #[error("CUDA device {ordinal} could not be opened")]
    CudaOpen {
        ordinal: usize,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("CUDA driver call failed")]
    Cuda(#[from] cudarc::driver::DriverError),
    #[error("{0}")]
    CudaLibrary(String),
    #[error("tensors live on different devices: {lhs} and {rhs}")]
    DeviceMismatch { lhs: String, rhs: String },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn check_shape(
    op: &'static str,
    lhs_name: &'static str,
    lhs: &[usize],
    rhs_name: &'static str,
    rhs: &[usize],
) -> Result<()> {
    if lhs == rhs {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op,
            lhs_name,
            lhs: lhs.to_vec(),
            rhs_name,
            rhs: rhs.to_vec(),
        })
    }
}

pub(crate) fn invalid(op: &'static str, what: impl Into<String>) -> Error {
    Error::InvalidArgument { op, what: what.into() }
}
