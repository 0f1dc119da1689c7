//! Helpers shared by this crate's GPU tests: the device (or a printed skip),
//! a seeded RNG whose seed is printed, random tensors, and bf16 rounding.

#![allow(dead_code)] // each test binary uses its own subset

use asynctls_kernels::{CudaDevice, DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// GPU 0, or `None` after printing `skipped: no CUDA device`.
pub fn gpu() -> Option<Device> {
    CudaDevice::for_tests().map(Device::Cuda)
}

/// A fresh seed, printed so a failure can be repeated.
pub fn rng() -> StdRng {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// A CPU f32 tensor of `shape`, uniform in `[-scale, scale)`.
pub fn random(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        (0..n).map(|_| rng.random_range(-scale..scale)).collect::<Vec<f32>>(),
        shape,
    )
    .unwrap()
}

/// `t` with every value rounded through bf16 (what the GPU computes from).
pub fn bf16_rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}
