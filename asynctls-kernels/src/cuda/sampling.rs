//! Sampling the next token of a batch on the GPU (`cuda/sampling.cu`), the
//! twin of [`cpu::sampling`](crate::cpu::sampling), whose module docs state
//! the contract both follow. The two are exact: the same logits, parameters,
//! seed and step give the same token.
//!
//! Owns [`SamplingRow`], the device layout of one row's parameters and step
//! counter, and [`CudaOps::sample_rows`]. The parameters live in a device
//! buffer and the kernel advances each row's step after its draw, so a
//! decode step with fixed parameters can be captured in a CUDA graph and
//! replayed: every replay draws the next step of each row's stream.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::CudaOps;
use crate::cpu::sampling::{SamplingParams, MAX_SAMPLING_VOCAB};
use crate::error::invalid;
use crate::Result;

/// One CTA per row; the kernel's histograms have one bin per thread.
const SAMPLING_THREADS: u32 = 1024;

/// One row's parameters and step counter, as the kernel reads them (the
/// `SamplingRow` struct of `cuda/sampling.cu`, 32 bytes).
///
/// Built only from validated [`SamplingParams`], so a buffer of these never
/// holds a NaN temperature or a `top_p` outside `(0, 1]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingRow {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    _pad: u32,
    seed: u64,
    step: u64,
}

// SAFETY: repr(C) of plain f32/u32/u64 fields with no padding the compiler
// adds (the explicit `_pad` aligns `seed`), matching the CUDA struct, which
// static_asserts the same 32 bytes; every bit pattern is a valid value.
unsafe impl DeviceRepr for SamplingRow {}

impl SamplingRow {
    /// The row for `params` whose next draw is `step`.
    pub fn new(params: &SamplingParams, step: u64) -> Result<Self> {
        params.validate()?;
        Ok(SamplingRow {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            _pad: 0,
            seed: params.seed,
            step,
        })
    }

    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }

    /// The step the next draw of this row uses.
    pub fn step(&self) -> u64 {
        self.step
    }
}

impl CudaOps {
    /// One token per row of `logits` (`[rows, vocab]`, vocab at most
    /// [`MAX_SAMPLING_VOCAB`]) into `out` (`[rows]`), row `r` drawn with
    /// `params[r]` at its step; each row's step is then advanced by one (on
    /// the device, in stream order). The CPU twin is
    /// [`cpu::sampling::sample_rows`](crate::cpu::sampling::sample_rows).
    pub fn sample_rows(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        params: &mut CudaSlice<SamplingRow>,
        out: &mut CudaSlice<u32>,
    ) -> Result<()> {
        if vocab == 0 || vocab > MAX_SAMPLING_VOCAB {
            return Err(invalid(
                "sample_rows",
                format!("vocabulary of {vocab} (the sampler takes 1 to {MAX_SAMPLING_VOCAB})"),
            ));
        }
        if logits.len() != rows * vocab || params.len() != rows || out.len() != rows {
            return Err(invalid(
                "sample_rows",
                format!(
                    "{} logits, {} parameter rows and {} outputs for {rows} rows of {vocab}",
                    logits.len(),
                    params.len(),
                    out.len()
                ),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        if rows > i32::MAX as usize {
            return Err(invalid("sample_rows", format!("{rows} rows exceed one launch's grid")));
        }
        let f = self.function(&self.sampling, "sample_rows_f32")?;
        let v = vocab as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(logits).arg(&v).arg(params).arg(out);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (SAMPLING_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match `sample_rows_f32(const float*, int,
        // SamplingRow*, uint32_t*)`; logits hold rows x vocab, params and out
        // one entry per row (checked above), and the kernel touches no more.
        // Its 16-byte loads (when vocab % 4 == 0) need the logits on 16
        // bytes, which a `CudaSlice` (a whole allocation) always is.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
