//! The compute layer of asynctls.
//!
//! Owns: [`Device`] (the CPU, or a CUDA GPU through cudarc with the driver
//! loaded at run time), a small [`Tensor`] (shape, dtype, storage per device),
//! and every primitive op. Each op has a CPU reference in [`cpu`] over plain
//! slices, and a tensor-level entry point in [`ops`] that checks shapes and
//! dtypes (naming both sides on a mismatch) and dispatches by device. The
//! CUDA kernels (from the committed PTX in `ptx/`) are in [`cuda`], each
//! tested against its CPU twin on the GPU machine.
//!
//! Does not own: caches, attention policies or models; those live in the
//! crates above and call into this one.
//!
//! ```
//! use asynctls_kernels::{ops, DType, Tensor};
//! let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
//! let b = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2])?;
//! let c = ops::matmul(&a, &b)?;
//! assert_eq!(c.to_f32_vec()?, vec![1.0, 2.0, 3.0, 4.0]);
//! assert_eq!(c.dtype(), DType::F32);
//! # Ok::<(), asynctls_kernels::Error>(())
//! ```

pub mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod moe;
pub mod ops;
mod tensor;

pub use device::{cuda_driver_present, CudaDevice, Device, DeviceRequest};
pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::{CpuStorage, CudaStorage, Storage, Tensor, WithDType};
