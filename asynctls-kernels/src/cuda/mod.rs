//! The CUDA twins of the CPU ops, from the PTX committed in `ptx/` (built by
//! `cargo xtask build-ptx` from `cuda/*.cu`). Every launch here has a CPU
//! reference it is tested against on the GPU machine.
//!
//! - this file: loading the modules, and the elementwise ops of the model
//!   (RMSNorm, SiLU-mul, softmax, RoPE, embedding, argmax);
//! - [`attention`]: paged decode attention, GQA and MLA, dense or over token lists;
//! - [`prefill`]: causal prefill attention on tensor cores (GQA and absorbed MLA);
//! - [`select`]: the two selection stages of sparse decode (block scores and
//!   top-k_b, label scores and top-k_t);
//! - [`kv`]: the GPU-resident paged cache and the kernels that append to it;
//! - [`blas`]: bf16 GEMM through cuBLAS;
//! - [`gather`]: unit gathers for the offload engine (from mapped host memory);
//! - [`moe`]: the router and the grouped experts of a mixture-of-experts layer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::error::invalid;
use crate::{CudaDevice, Result};

pub mod attention;
pub mod blas;
pub mod gather;
pub mod graph;
pub mod kv;
pub mod model;
pub mod moe;
pub mod prefill;
pub mod sampling;
pub mod select;

pub use attention::{DecodeScratch, OffloadedKv, PagedKvView, SlotLookup, TokenLists, DECODE_VARIANTS, MLA_HEADS};
pub use kv::{GpuKvPool, HostTier, KvGeometry};
pub use select::{SelectParams, SelectScratch};

const ELEMENTWISE_PTX: &str = include_str!("../../ptx/elementwise.ptx");
const DECODE_ATTENTION_PTX: &str = include_str!("../../ptx/decode_attention.ptx");
const MLA_DECODE_PTX: &str = include_str!("../../ptx/mla_decode.ptx");
const SPARSE_SELECT_PTX: &str = include_str!("../../ptx/sparse_select.ptx");
const KV_CACHE_PTX: &str = include_str!("../../ptx/kv_cache.ptx");
const GATHER_PTX: &str = include_str!("../../ptx/gather.ptx");
const PREFILL_PTX: &str = include_str!("../../ptx/prefill_attention.ptx");
const MODEL_PTX: &str = include_str!("../../ptx/model.ptx");
const SAMPLING_PTX: &str = include_str!("../../ptx/sampling.ptx");
const MOE_PTX: &str = include_str!("../../ptx/moe.ptx");

/// The loaded kernels of one device.
#[derive(Debug, Clone)]
pub struct CudaOps {
    device: CudaDevice,
    elementwise: Arc<CudaModule>,
    attention: Arc<CudaModule>,
    mla: Arc<CudaModule>,
    select: Arc<CudaModule>,
    kv: Arc<CudaModule>,
    gather: Arc<CudaModule>,
    prefill: Arc<CudaModule>,
    model: Arc<CudaModule>,
    sampling: Arc<CudaModule>,
    moe: Arc<CudaModule>,
    /// Function handles by (module, name), filled on first launch.
    functions: Arc<Mutex<HashMap<(usize, String), CudaFunction>>>,
    blas: Arc<std::sync::OnceLock<std::result::Result<blas::Blas, String>>>,
}

/// Lets `f` use `bytes` of dynamic shared memory (when that and the
/// function's static shared memory pass the default 48 KiB, a launch needs
/// the function's opt-in); returns the launch's shared size.
fn allow_dynamic_shared(f: &CudaFunction, bytes: usize) -> Result<u32> {
    use cudarc::driver::sys::CUfunction_attribute as Attr;
    let static_bytes = f.get_attribute(Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)? as usize;
    if static_bytes + bytes > 48 * 1024 {
        f.set_attribute(Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)?;
    }
    Ok(bytes as u32)
}

fn rows_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaOps {
    pub fn new(device: &CudaDevice) -> Result<Self> {
        let ctx = device.context();
        Ok(CudaOps {
            device: device.clone(),
            elementwise: ctx.load_module(Ptx::from_src(ELEMENTWISE_PTX))?,
            attention: ctx.load_module(Ptx::from_src(DECODE_ATTENTION_PTX))?,
            mla: ctx.load_module(Ptx::from_src(MLA_DECODE_PTX))?,
            select: ctx.load_module(Ptx::from_src(SPARSE_SELECT_PTX))?,
            kv: ctx.load_module(Ptx::from_src(KV_CACHE_PTX))?,
            gather: ctx.load_module(Ptx::from_src(GATHER_PTX))?,
            prefill: ctx.load_module(Ptx::from_src(PREFILL_PTX))?,
            model: ctx.load_module(Ptx::from_src(MODEL_PTX))?,
            sampling: ctx.load_module(Ptx::from_src(SAMPLING_PTX))?,
            moe: ctx.load_module(Ptx::from_src(MOE_PTX))?,
            functions: Arc::new(Mutex::new(HashMap::new())),
            blas: Arc::new(std::sync::OnceLock::new()),
        })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The kernels of GPU 0 for a GPU test, or `None` after printing
    /// `skipped: no CUDA device` (so one test binary serves CI and the H200).
    /// Only a missing driver or a machine without a GPU skips: any other
    /// failure to open the device or load the kernels fails the test.
    pub fn for_tests() -> Option<Self> {
        let device = CudaDevice::for_tests()?;
        match device.ops() {
            Ok(ops) => Some((*ops).clone()),
            Err(e) => panic!("a CUDA device is present but its kernels did not load: {e}"),
        }
    }

    /// The kernel `name` of `module`, looked up in the driver once and then
    /// served from the cache (a launch path never asks the driver by name).
    pub(crate) fn function(&self, module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
        let key = (Arc::as_ptr(module) as usize, name.to_string());
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&key) {
            return Ok(f.clone());
        }
        let f = module.load_function(name)?;
        cache.insert(key, f.clone());
        Ok(f)
    }

    /// RMSNorm of each row of `x` (`rows x h`) in place.
    pub fn rms_norm(&self, x: &mut CudaSlice<f32>, weight: &CudaSlice<f32>, rows: usize, eps: f32) -> Result<()> {
        let h = weight.len();
        if x.len() != rows * h {
            return Err(invalid(
                "rms_norm",
                format!("{} elements are not {rows} rows of {h}", x.len()),
            ));
        }
        let f = self.function(&self.elementwise, "rms_norm_f32")?;
        let h = h as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(x).arg(weight).arg(&h).arg(&eps);
        // SAFETY: argument types and lengths match the kernel's signature.
        unsafe { b.launch(rows_config(rows, 256)) }?;
        Ok(())
    }

    /// `gate = silu(gate) * up`.
    pub fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<()> {
        if gate.len() != up.len() {
            return Err(invalid(
                "silu_mul",
                format!("gate has {} elements, up {}", gate.len(), up.len()),
            ));
        }
        let f = self.function(&self.elementwise, "silu_mul_f32")?;
        let n = gate.len() as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(gate).arg(up).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }?;
        Ok(())
    }

    /// Softmax of each row (`rows x n`) in place.
    pub fn softmax_rows(&self, x: &mut CudaSlice<f32>, rows: usize, n: usize) -> Result<()> {
        if x.len() != rows * n {
            return Err(invalid(
                "softmax",
                format!("{} elements are not {rows} rows of {n}", x.len()),
            ));
        }
        let f = self.function(&self.elementwise, "softmax_rows_f32")?;
        let n = n as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(x).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(rows_config(rows, 256)) }?;
        Ok(())
    }

    /// RoPE of `x` (`[tokens, heads, head_dim]`) in `style` with tables
    /// `[max_pos, rotary_dim / 2]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        style: crate::cpu::RopeStyle,
    ) -> Result<()> {
        let tokens = positions.len();
        if x.len() != tokens * heads * head_dim || rotary_dim > head_dim {
            return Err(invalid(
                "rope",
                format!("{} elements are not [{tokens}, {heads}, {head_dim}]", x.len()),
            ));
        }
        let f = self.function(&self.elementwise, "rope_f32")?;
        let (h, d, r) = (heads as i32, head_dim as i32, rotary_dim as i32);
        let interleaved = i32::from(style == crate::cpu::RopeStyle::Interleaved);
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(x)
            .arg(cos)
            .arg(sin)
            .arg(positions)
            .arg(&h)
            .arg(&d)
            .arg(&r)
            .arg(&interleaved);
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, heads as u32, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Rows of `table` (`[vocab, h]`) for `ids` into `out` (`[ids, h]`).
    ///
    /// # Safety
    /// Every id must be below the table's rows (the ids live on the device
    /// and are not checked).
    pub unsafe fn embedding(
        &self,
        table: &CudaSlice<f32>,
        h: usize,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if out.len() != ids.len() * h {
            return Err(invalid(
                "embedding",
                format!("output of {} is not {} x {h}", out.len(), ids.len()),
            ));
        }
        let f = self.function(&self.elementwise, "embedding_f32")?;
        let hh = h as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(table).arg(ids).arg(out).arg(&hh);
        // SAFETY: as above; ids are checked by the caller against the vocabulary.
        unsafe { b.launch(rows_config(ids.len(), 128)) }?;
        Ok(())
    }

    /// Index of the largest value of each row.
    pub fn argmax_rows(&self, x: &CudaSlice<f32>, rows: usize, n: usize, out: &mut CudaSlice<u32>) -> Result<()> {
        if x.len() != rows * n || out.len() != rows {
            return Err(invalid(
                "argmax",
                format!("{} elements are not {rows} rows of {n}", x.len()),
            ));
        }
        let f = self.function(&self.elementwise, "argmax_rows_f32")?;
        let nn = n as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(x).arg(&nn).arg(out);
        // SAFETY: as above.
        unsafe { b.launch(rows_config(rows, 256)) }?;
        Ok(())
    }
}
