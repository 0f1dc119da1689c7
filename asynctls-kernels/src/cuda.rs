//! The CUDA twins of the CPU ops, from the PTX committed in `ptx/` (built by
//! `cargo xtask build-ptx` from `cuda/*.cu`). Every launch here has a CPU
//! reference it is tested against on the GPU machine.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use half::bf16;

use crate::error::invalid;
use crate::{CudaDevice, Result};

const ELEMENTWISE_PTX: &str = include_str!("../ptx/elementwise.ptx");
const DECODE_ATTENTION_PTX: &str = include_str!("../ptx/decode_attention.ptx");

/// Query heads per KV head and head dims the decode kernel is instantiated for.
pub const DECODE_VARIANTS: &[(usize, usize)] = &[
    (64, 1),
    (64, 2),
    (64, 3),
    (64, 4),
    (64, 7),
    (64, 8),
    (128, 1),
    (128, 2),
    (128, 4),
    (128, 5),
    (128, 8),
];

/// The loaded kernels of one device.
#[derive(Debug, Clone)]
pub struct CudaOps {
    device: CudaDevice,
    elementwise: Arc<CudaModule>,
    attention: Arc<CudaModule>,
}

/// A paged K/V pool on the GPU: `[num_blocks, kv_heads, block_size, head_dim]` bf16 each.
#[derive(Debug)]
pub struct PagedKvView<'a> {
    pub keys: &'a CudaSlice<bf16>,
    pub values: &'a CudaSlice<bf16>,
    pub kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
    /// `[batch, max_blocks]` physical block of each logical block.
    pub block_table: &'a CudaSlice<i32>,
    pub max_blocks: usize,
    /// `[batch]` tokens per sequence.
    pub lens: &'a CudaSlice<i32>,
}

/// Per (sequence, KV head): the sorted positions to attend (sparse decode).
#[derive(Debug)]
pub struct TokenLists<'a> {
    /// `[batch * kv_heads, max_tokens]`
    pub tokens: &'a CudaSlice<i32>,
    /// `[batch * kv_heads]`
    pub counts: &'a CudaSlice<i32>,
    pub max_tokens: usize,
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
        })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The kernels of GPU 0 for a GPU test, or `None` after printing
    /// `skipped: no CUDA device` (so one test binary serves CI and the H200).
    pub fn for_tests() -> Option<Self> {
        if !crate::cuda_driver_present() {
            println!("skipped: no CUDA device");
            return None;
        }
        match CudaDevice::open(0).and_then(|dev| CudaOps::new(&dev)) {
            Ok(ops) => Some(ops),
            Err(e) => {
                println!("skipped: no CUDA device ({e})");
                None
            }
        }
    }

    fn function(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
        Ok(module.load_function(name)?)
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
        let f = Self::function(&self.elementwise, "rms_norm_f32")?;
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
        let f = Self::function(&self.elementwise, "silu_mul_f32")?;
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
        let f = Self::function(&self.elementwise, "softmax_rows_f32")?;
        let n = n as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(x).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(rows_config(rows, 256)) }?;
        Ok(())
    }

    /// NeoX RoPE of `x` (`[tokens, heads, head_dim]`) with tables `[max_pos, rotary_dim / 2]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_neox(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        heads: usize,
        head_dim: usize,
        rotary_dim: usize,
    ) -> Result<()> {
        let tokens = positions.len();
        if x.len() != tokens * heads * head_dim || rotary_dim > head_dim {
            return Err(invalid(
                "rope",
                format!("{} elements are not [{tokens}, {heads}, {head_dim}]", x.len()),
            ));
        }
        let f = Self::function(&self.elementwise, "rope_neox_f32")?;
        let (h, d, r) = (heads as i32, head_dim as i32, rotary_dim as i32);
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(x).arg(cos).arg(sin).arg(positions).arg(&h).arg(&d).arg(&r);
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
    pub fn embedding(
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
        let f = Self::function(&self.elementwise, "embedding_f32")?;
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
        let f = Self::function(&self.elementwise, "argmax_rows_f32")?;
        let nn = n as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(x).arg(&nn).arg(out);
        // SAFETY: as above.
        unsafe { b.launch(rows_config(rows, 256)) }?;
        Ok(())
    }

    /// Decode attention for a batch over a paged cache: dense when `lists`
    /// is `None`, else over each (sequence, KV head)'s token list.
    /// `q`: `[batch, q_heads, head_dim]`; `out` the same shape.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        q: &CudaSlice<f32>,
        kv: &PagedKvView<'_>,
        lists: Option<&TokenLists<'_>>,
        q_heads: usize,
        scale: f32,
        splits: usize,
        scratch: &mut DecodeScratch,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = kv.head_dim;
        let batch = kv.lens.len();
        let group = q_heads / kv.kv_heads.max(1);
        if !DECODE_VARIANTS.contains(&(d, group)) || q_heads % kv.kv_heads != 0 {
            return Err(invalid(
                "decode_attention",
                format!("no kernel for head dim {d} with {group} query heads per KV head"),
            ));
        }
        if q.len() != batch * q_heads * d || out.len() != q.len() {
            return Err(invalid(
                "decode_attention",
                format!("q/out of {} elements for batch {batch}", q.len()),
            ));
        }
        let rows = batch * q_heads;
        scratch.ensure(self, rows * splits * d, rows * splits * 2)?;
        let f = Self::function(&self.attention, &format!("decode_attention_d{d}_g{group}"))?;
        let stream = self.device.stream();
        let (kvh, bs, mb) = (kv.kv_heads as i32, kv.block_size as i32, kv.max_blocks as i32);
        let mt = lists.map_or(0, |l| l.max_tokens as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(q).arg(kv.keys).arg(kv.values).arg(kv.block_table).arg(kv.lens);
        // A null pointer selects the dense path.
        let null: u64 = 0;
        match lists {
            Some(l) => {
                b.arg(l.tokens).arg(l.counts);
            }
            None => {
                b.arg(&null).arg(&null);
            }
        }
        b.arg(&mut scratch.acc)
            .arg(&mut scratch.ml)
            .arg(&kvh)
            .arg(&bs)
            .arg(&mb)
            .arg(&mt)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: ((batch * kv.kv_heads) as u32, splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the pools, tables and lists are laid out as documented and
        // sized by the caller; splits >= 1.
        unsafe { b.launch(cfg) }?;
        let combine = Self::function(&self.attention, "decode_combine")?;
        let (s, dd) = (splits as i32, d as i32);
        let mut b = stream.launch_builder(&combine);
        b.arg(&scratch.acc).arg(&scratch.ml).arg(out).arg(&s).arg(&dd);
        // SAFETY: as above.
        unsafe { b.launch(rows_config(rows, 128)) }?;
        Ok(())
    }
}

/// Split-K partials, reused across steps.
#[derive(Debug)]
pub struct DecodeScratch {
    acc: CudaSlice<f32>,
    ml: CudaSlice<f32>,
}

impl DecodeScratch {
    pub fn new(ops: &CudaOps) -> Result<Self> {
        let stream = ops.device.stream();
        Ok(DecodeScratch {
            acc: stream.alloc_zeros(1)?,
            ml: stream.alloc_zeros(1)?,
        })
    }

    fn ensure(&mut self, ops: &CudaOps, acc: usize, ml: usize) -> Result<()> {
        let stream = ops.device.stream();
        if self.acc.len() < acc {
            self.acc = stream.alloc_zeros(acc)?;
        }
        if self.ml.len() < ml {
            self.ml = stream.alloc_zeros(ml)?;
        }
        Ok(())
    }
}
