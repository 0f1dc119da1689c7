//! Ops on [`Tensor`]s: shape, dtype and device checks, then dispatch to the
//! CPU reference in [`crate::cpu`] or to its CUDA twin in [`crate::cuda`] by
//! the device the tensors live on (mixing devices is an error).
//!
//! The model-forward ops keep activations in f32 on both devices: the
//! residual stream and the logits stay f32, the GPU casts activations to
//! bf16 only as GEMM inputs (weights are bf16 there, f32 on the CPU).
//!
//! The CUDA launches take raw device addresses (so row views need no copy)
//! and are `unsafe`: every call here passes addresses of tensors whose
//! shapes, dtypes and device it has just checked, which is their contract.

use crate::cpu::{self, RopeStyle, RopeTable};
use crate::cuda::model::GemmType;
use crate::cuda::CudaOps;
use crate::error::{check_shape, invalid};
use crate::{DType, Device, Error, Result, Storage, Tensor};

fn cpu_only(op: &'static str, t: &Tensor) -> Result<()> {
    match t.storage() {
        Storage::Cpu(_) => Ok(()),
        Storage::Cuda { .. } => Err(Error::Unsupported {
            op,
            dtype: t.dtype(),
            device: t.device().to_string(),
        }),
    }
}

fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() == b.dtype() {
        Ok(())
    } else {
        Err(Error::DTypeMismatch {
            op,
            lhs_name: "lhs",
            lhs: a.dtype(),
            rhs_name: "rhs",
            rhs: b.dtype(),
        })
    }
}

/// `a[m, k] @ b[k, n]`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "matmul";
    let (m, k) = a.dims2(OP)?;
    let (k2, n) = b.dims2(OP)?;
    if k != k2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: "a",
            lhs: a.shape().to_vec(),
            rhs_name: "b",
            rhs: b.shape().to_vec(),
        });
    }
    same_dtype(OP, a, b)?;
    a.require_float(OP)?;
    cpu_only(OP, a)?;
    let mut out = vec![0.0; m * n];
    cpu::matmul(&a.to_f32_vec()?, &b.to_f32_vec()?, &mut out, m, k, n)?;
    Tensor::from_f32(out, &[m, n], a.dtype())
}

/// The kernels of the GPU a tensor is on, or `None` for a CPU tensor.
fn cuda_ops(t: &Tensor) -> Result<Option<std::sync::Arc<CudaOps>>> {
    match t.storage() {
        Storage::Cpu(_) => Ok(None),
        Storage::Cuda { device, .. } => Ok(Some(device.ops()?)),
    }
}

/// All of `others` live where `t` does.
fn same_device(op: &'static str, t: &Tensor, others: &[&Tensor]) -> Result<()> {
    let d = t.device();
    for o in others {
        if !d.same_device(&o.device()) {
            return Err(Error::DeviceMismatch {
                lhs: format!("{op}: {d}"),
                rhs: o.device().to_string(),
            });
        }
    }
    Ok(())
}

fn require_dtype(op: &'static str, name: &'static str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() == dtype {
        Ok(())
    } else {
        Err(Error::DTypeMismatch {
            op,
            lhs_name: name,
            lhs: t.dtype(),
            rhs_name: "expected",
            rhs: dtype,
        })
    }
}

/// An in-place op may only write a tensor nobody else reads.
fn require_unique(op: &'static str, t: &mut Tensor) -> Result<()> {
    if t.is_cuda() {
        // The raw-pointer launches write through the address; exclusive
        // ownership of the storage is what makes that sound.
        t.cuda_slice_mut_any()
            .map_err(|_| invalid(op, "the output's storage is shared or a view"))
    } else {
        Ok(())
    }
}

/// A copy of `x` on its own device (a whole buffer, even when `x` is a view).
pub fn copy(x: &Tensor) -> Result<Tensor> {
    match x.storage() {
        Storage::Cpu(_) => x.to_device(&Device::Cpu),
        Storage::Cuda { device, .. } => {
            let out = Tensor::uninit_on(x.shape(), x.dtype(), &x.device())?;
            let bytes = x.size_in_bytes();
            if bytes > 0 {
                let stream = device.stream();
                // SAFETY: both addresses hold `bytes` bytes on this device; the
                // copy is ordered on the device's one compute stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        out.device_ptr()?,
                        x.device_ptr()?,
                        bytes,
                        stream.cu_stream(),
                    )
                }?;
            }
            Ok(out)
        }
    }
}

/// Copies `src` over `dst` in place (same shape and dtype, same device):
/// `dst` keeps its address, as a buffer a CUDA graph reads must.
pub fn copy_into(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    const OP: &str = "copy_into";
    dst.require_same_shape(OP, src)?;
    require_dtype(OP, "src", src, dst.dtype())?;
    same_device(OP, dst, &[src])?;
    match src.storage() {
        Storage::Cpu(_) => {
            let v = src.to_device(&Device::Cpu)?;
            match dst.dtype() {
                DType::U32 => dst.as_slice_mut::<u32>()?.copy_from_slice(v.as_slice::<u32>()?),
                DType::I32 => dst.as_slice_mut::<i32>()?.copy_from_slice(v.as_slice::<i32>()?),
                DType::F32 => dst.as_slice_mut::<f32>()?.copy_from_slice(v.as_slice::<f32>()?),
                other => return Err(invalid(OP, format!("{other} on the CPU"))),
            }
            Ok(())
        }
        Storage::Cuda { device, .. } => {
            let bytes = src.size_in_bytes();
            if bytes > 0 {
                // SAFETY: both windows hold `bytes` bytes on this device, ordered on its stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst.device_ptr()?,
                        src.device_ptr()?,
                        bytes,
                        device.stream().cu_stream(),
                    )
                }?;
            }
            Ok(())
        }
    }
}

/// `x` converted to `dtype` on its device (f32 <-> bf16 on the GPU).
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "cast";
    let Some(ops) = cuda_ops(x)? else {
        return x.to_dtype(dtype);
    };
    if x.dtype() == dtype {
        return copy(x);
    }
    let to_bf16 = match (x.dtype(), dtype) {
        (DType::F32, DType::BF16) => true,
        (DType::BF16, DType::F32) => false,
        (from, to) => {
            return Err(invalid(OP, format!("{from} to {to} on the GPU (have f32 <-> bf16)")));
        }
    };
    let out = Tensor::uninit_on(x.shape(), dtype, &x.device())?;
    unsafe { ops.cast_raw(x.device_ptr()?, out.device_ptr()?, x.elem_count(), to_bf16) }?;
    Ok(out)
}

/// A linear layer `y = x . w^T (+ bias)`: `x` `[n, in]` f32 (on the GPU also
/// bf16, already cast: layers that feed one input to several projections
/// cast it once), `w` `[out, in]` (f32 on the CPU, bf16 on the GPU), `bias`
/// `[out]` f32; `y` `[n, out]` f32.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, out_dim) = check_linear("linear", x, w, bias)?;
    if !x.is_cuda() {
        let y = cpu_linear(x, w, bias, n, out_dim)?;
        return Tensor::from_vec(y, &[n, out_dim]);
    }
    let mut y = Tensor::uninit_on(&[n, out_dim], DType::F32, &x.device())?;
    linear_on_gpu(x, w, bias, &mut y, false)?;
    Ok(y)
}

/// `y += x . w^T (+ bias)` in place: [`linear`] added to f32 `y` (`[n,
/// out]`), a residual stream, without the product's own buffer or the
/// add's launch on a GPU (the GEMV and cuBLAS accumulate into `y`).
pub fn linear_add_(y: &mut Tensor, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    const OP: &str = "linear_add";
    let (n, out_dim) = check_linear(OP, x, w, bias)?;
    check_shape(OP, "y", y.shape(), "x rows x weight rows", &[n, out_dim])?;
    require_dtype(OP, "y", y, DType::F32)?;
    same_device(OP, x, &[y])?;
    require_unique(OP, y)?;
    if !x.is_cuda() {
        let product = cpu_linear(x, w, bias, n, out_dim)?;
        y.as_slice_mut::<f32>()?
            .iter_mut()
            .zip(&product)
            .for_each(|(a, b)| *a += b);
        return Ok(());
    }
    linear_on_gpu(x, w, bias, y, true)
}

/// The shape, dtype and device checks of a linear layer: `(rows, out)`.
fn check_linear(op: &'static str, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize)> {
    let (n, k) = x.dims2(op)?;
    let (out_dim, k2) = w.dims2(op)?;
    if k != k2 {
        return Err(Error::ShapeMismatch {
            op,
            lhs_name: "x",
            lhs: x.shape().to_vec(),
            rhs_name: "weight",
            rhs: w.shape().to_vec(),
        });
    }
    if !(x.dtype() == DType::F32 || x.dtype() == DType::BF16 && x.is_cuda()) {
        require_dtype(op, "x", x, DType::F32)?;
    }
    if let Some(b) = bias {
        check_shape(op, "bias", b.shape(), "weight rows", &[out_dim])?;
        require_dtype(op, "bias", b, DType::F32)?;
        same_device(op, x, &[b])?;
    }
    same_device(op, x, &[w])?;
    if x.is_cuda() && w.dtype() == DType::F32 {
        // Kept in f32 on purpose (a MoE router, which HF computes in f32).
        require_dtype(op, "x (with an f32 weight)", x, DType::F32)?;
    } else if x.is_cuda() {
        require_dtype(op, "weight", w, DType::BF16)?;
    }
    Ok((n, out_dim))
}

/// The CPU twin: `x . w^T (+ bias)` as `[n, out]` f32 values.
fn cpu_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, n: usize, out_dim: usize) -> Result<Vec<f32>> {
    let k = x.last_dim();
    let mut y = vec![0.0; n * out_dim];
    let weight: std::borrow::Cow<'_, [f32]> = match w.dtype() {
        DType::F32 => w.as_slice::<f32>()?.into(),
        _ => w.to_f32_vec()?.into(),
    };
    cpu::matmul_nt(x.as_slice::<f32>()?, &weight, &mut y, n, k, out_dim)?;
    if let Some(b) = bias {
        let b = b.as_slice::<f32>()?;
        y.chunks_exact_mut(out_dim)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    Ok(y)
}

/// The product on the GPU into `y` (checked by [`check_linear`]), added to
/// it when `accumulate`: the tensor-core GEMV for a decode step's few rows,
/// cuBLAS for more (or an f32 weight).
fn linear_on_gpu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, y: &mut Tensor, accumulate: bool) -> Result<()> {
    let ops = cuda_ops(x)?.ok_or_else(|| invalid("linear", "expected a GPU tensor"))?;
    let (n, k) = (x.rows(), x.last_dim());
    let out_dim = w.rows();
    let (xp, wp, yp) = (x.device_ptr()?, w.device_ptr()?, y.device_ptr()?);
    if w.dtype() == DType::F32 {
        // SAFETY: shapes, dtypes and devices checked by check_linear.
        unsafe { ops.gemm_nt_raw(xp, wp, yp, n, k, out_dim, GemmType::F32, GemmType::F32, accumulate) }?;
    } else if CudaOps::gemv_takes(n, k, xp, wp) {
        // SAFETY: as above; gemv_takes held.
        unsafe { ops.gemv_raw(xp, x.dtype() == DType::BF16, wp, yp, n, k, out_dim, accumulate) }?;
    } else {
        let xb = gemm_input(x)?;
        // SAFETY: as above, with x cast to bf16.
        unsafe {
            ops.gemm_nt_raw(
                xb.device_ptr()?,
                wp,
                yp,
                n,
                k,
                out_dim,
                GemmType::Bf16,
                GemmType::F32,
                accumulate,
            )
        }?;
    }
    if let Some(b) = bias {
        // SAFETY: y holds n x out_dim, b holds out_dim (checked by check_linear).
        unsafe { ops.bias_add_raw(yp, b.device_ptr()?, n * out_dim, out_dim) }?;
    }
    Ok(())
}

/// `x` as a linear layer's input on its device: cast to bf16 once on a GPU
/// (so several projections of the same input share the cast), as is on the CPU.
pub fn gemm_input(x: &Tensor) -> Result<Tensor> {
    if x.is_cuda() && x.dtype() == DType::F32 {
        cast(x, DType::BF16)
    } else {
        Ok(x.clone())
    }
}

/// RMSNorm over the last dimension of f32 `x` with an f32 `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let h = x.last_dim();
    check_shape(OP, "x (last dim)", &[h], "weight", weight.shape())?;
    require_dtype(OP, "x", x, DType::F32)?;
    require_dtype(OP, "weight", weight, DType::F32)?;
    same_device(OP, x, &[weight])?;
    match cuda_ops(x)? {
        None => {
            let mut v = x.as_slice::<f32>()?.to_vec();
            cpu::rms_norm(&mut v, weight.as_slice::<f32>()?, eps)?;
            Tensor::from_vec(v, x.shape())
        }
        Some(ops) => {
            let out = Tensor::uninit_on(x.shape(), DType::F32, &x.device())?;
            let rows = x.elem_count() / h.max(1);
            unsafe { ops.rms_norm_raw(x.device_ptr()?, weight.device_ptr()?, out.device_ptr()?, rows, h, eps) }?;
            Ok(out)
        }
    }
}

/// [`rms_norm`] of `x` as a GEMM input: bf16 on a GPU (written by the norm
/// itself, the same values as the f32 norm then [`cast`]), f32 on the CPU.
pub fn rms_norm_gemm_input(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let Some(ops) = cuda_ops(x)? else {
        return rms_norm(x, weight, eps);
    };
    let h = x.last_dim();
    check_shape(OP, "x (last dim)", &[h], "weight", weight.shape())?;
    require_dtype(OP, "x", x, DType::F32)?;
    require_dtype(OP, "weight", weight, DType::F32)?;
    same_device(OP, x, &[weight])?;
    let out = Tensor::uninit_on(x.shape(), DType::BF16, &x.device())?;
    let rows = x.elem_count() / h.max(1);
    // SAFETY: shapes, dtypes and devices checked above.
    unsafe {
        ops.rms_norm_into(
            x.device_ptr()?,
            weight.device_ptr()?,
            out.device_ptr()?,
            rows,
            h,
            eps,
            true,
        )
    }?;
    Ok(out)
}

/// A RoPE table on a device: the CPU table and, on a GPU, its cos/sin.
#[derive(Debug, Clone)]
pub struct Rope {
    table: RopeTable,
    device_tables: Option<(Tensor, Tensor)>,
}

impl Rope {
    pub fn new(table: RopeTable, device: &Device) -> Result<Self> {
        let device_tables = match device {
            Device::Cpu => None,
            Device::Cuda(_) => {
                let (cos, sin) = table.tables();
                let half = table.rotary_dim() / 2;
                let shape = [cos.len() / half.max(1), half];
                Some((
                    Tensor::from_vec(cos.to_vec(), &shape)?.to_device(device)?,
                    Tensor::from_vec(sin.to_vec(), &shape)?.to_device(device)?,
                ))
            }
        };
        Ok(Rope { table, device_tables })
    }

    pub fn table(&self) -> &RopeTable {
        &self.table
    }

    /// The cos/sin tables for `op` on `x`'s GPU: an error when the table was
    /// built for the CPU or for another device.
    fn device_tables_for(&self, op: &'static str, x: &Tensor) -> Result<(&Tensor, &Tensor)> {
        let (cos, sin) = self
            .device_tables
            .as_ref()
            .ok_or_else(|| invalid(op, "the RoPE table was built for the CPU"))?;
        same_device(op, x, &[cos])?;
        Ok((cos, sin))
    }
}

/// RoPE in place on f32 `x` (`[tokens, heads, head_dim]`) at `positions`
/// (`[tokens]` i32 on x's device; checked against the table on the CPU, and
/// by the caller that built them on the GPU).
pub fn rope_(x: &mut Tensor, rope: &Rope, positions: &Tensor, style: RopeStyle) -> Result<()> {
    const OP: &str = "rope";
    let [tokens, heads, head_dim] = x.shape()[..] else {
        return Err(invalid(
            OP,
            format!("expected [tokens, heads, head_dim], got {:?}", x.shape()),
        ));
    };
    check_shape(OP, "x tokens", &[tokens], "positions", positions.shape())?;
    require_dtype(OP, "x", x, DType::F32)?;
    require_dtype(OP, "positions", positions, DType::I32)?;
    same_device(OP, x, &[positions])?;
    require_unique(OP, x)?;
    match cuda_ops(x)? {
        None => {
            let pos: Vec<usize> = positions
                .as_slice::<i32>()?
                .iter()
                .map(|&p| usize::try_from(p).map_err(|_| invalid(OP, format!("negative position {p}"))))
                .collect::<Result<_>>()?;
            rope.table.apply(x.as_slice_mut::<f32>()?, head_dim, &pos, style)
        }
        Some(ops) => {
            let (cos, sin) = rope.device_tables_for(OP, x)?;
            if head_dim < rope.table.rotary_dim() {
                return Err(invalid(OP, format!("head dim {head_dim} below the rotary dim")));
            }
            unsafe {
                ops.rope_raw(
                    x.device_ptr()?,
                    cos.device_ptr()?,
                    sin.device_ptr()?,
                    positions.device_ptr()?,
                    tokens,
                    heads,
                    head_dim,
                    rope.table.rotary_dim(),
                    style == RopeStyle::Interleaved,
                )
            }
        }
    }
}

/// `[a | rope(b)]`: f32 `a` (`[tokens * heads, wa]`) and `b` (`[tokens,
/// heads, rd]`) rotated NeoX-style at `positions` (i32 `[tokens]`), as
/// `[tokens * heads, wa + rd]`: [`rope_`] then [`concat_cols`] in one
/// launch on the GPU (MLA's query and cache rows).
pub fn rope_concat(a: &Tensor, b: &Tensor, rope: &Rope, positions: &Tensor) -> Result<Tensor> {
    const OP: &str = "rope_concat";
    let [tokens, heads, rd] = b.shape()[..] else {
        return Err(invalid(
            OP,
            format!("b must be [tokens, heads, rd], got {:?}", b.shape()),
        ));
    };
    let (rows, wa) = a.dims2(OP)?;
    check_shape(OP, "a rows", &[rows], "tokens x heads", &[tokens * heads])?;
    let Some(ops) = cuda_ops(a)? else {
        let mut rotated = copy(b)?;
        rope_(&mut rotated, rope, positions, RopeStyle::Neox)?;
        return concat_cols(a, &rotated.reshaped(&[rows, rd])?);
    };
    check_shape(OP, "b tokens", &[tokens], "positions", positions.shape())?;
    require_dtype(OP, "a", a, DType::F32)?;
    require_dtype(OP, "b", b, DType::F32)?;
    require_dtype(OP, "positions", positions, DType::I32)?;
    same_device(OP, a, &[b, positions])?;
    let (cos, sin) = rope.device_tables_for(OP, a)?;
    if rd != rope.table.rotary_dim() {
        return Err(invalid(
            OP,
            format!(
                "rope width {rd} is not the table's rotary dim {}",
                rope.table.rotary_dim()
            ),
        ));
    }
    let out = Tensor::uninit_on(&[rows, wa + rd], DType::F32, &a.device())?;
    // SAFETY: shapes, dtypes and devices checked above; positions come from
    // the backend's step (below the table's length).
    unsafe {
        ops.rope_concat_raw(
            a.device_ptr()?,
            b.device_ptr()?,
            out.device_ptr()?,
            cos.device_ptr()?,
            sin.device_ptr()?,
            positions.device_ptr()?,
            tokens,
            heads,
            wa,
            rd,
        )
    }?;
    Ok(out)
}

/// The query, key and value heads of a fused q/k/v projection: `qkv` f32
/// `[tokens, (q_heads + 2 kv_heads) * head_dim]` (rows `[q | k | v]`) into
/// `q` `[tokens, q_heads * head_dim]`, `k` and `v` `[tokens, kv_heads *
/// head_dim]`, with q and k RMS-normed per head by `norms` (Qwen3's q_norm
/// and k_norm, `[head_dim]` f32 each) when given, then rotated NeoX-style at
/// `positions` (i32 `[tokens]`). On the CPU: the columns split, then
/// [`rms_norm`] and [`rope_`] (the twin); on a GPU one launch.
pub fn qkv_heads(
    qkv: &Tensor,
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
    norms: Option<(&Tensor, &Tensor)>,
    eps: f32,
    rope: &Rope,
    positions: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "qkv_heads";
    let (tokens, width) = qkv.dims2(OP)?;
    let d = head_dim;
    check_shape(
        OP,
        "qkv (width)",
        &[width],
        "(q + 2 kv heads) x head dim",
        &[(q_heads + 2 * kv_heads) * d],
    )?;
    check_shape(OP, "positions", positions.shape(), "qkv rows", &[tokens])?;
    require_dtype(OP, "qkv", qkv, DType::F32)?;
    require_dtype(OP, "positions", positions, DType::I32)?;
    same_device(OP, qkv, &[positions])?;
    if let Some((qn, kn)) = norms {
        for (name, n) in [("q norm", qn), ("k norm", kn)] {
            check_shape(OP, name, n.shape(), "head dim", &[d])?;
            require_dtype(OP, name, n, DType::F32)?;
            same_device(OP, qkv, &[n])?;
        }
    }
    let (qw, kw) = (q_heads * d, kv_heads * d);
    let Some(ops) = cuda_ops(qkv)? else {
        let rows = qkv.as_slice::<f32>()?;
        let split = |from: usize, w: usize, heads: usize| {
            Tensor::from_vec(cpu_columns(rows, width, from, w), &[tokens, heads, d])
        };
        let (mut q, mut k, v) = (
            split(0, qw, q_heads)?,
            split(qw, kw, kv_heads)?,
            split(qw + kw, kw, kv_heads)?,
        );
        if let Some((qn, kn)) = norms {
            q = rms_norm(&q, qn, eps)?;
            k = rms_norm(&k, kn, eps)?;
        }
        rope_(&mut q, rope, positions, RopeStyle::Neox)?;
        rope_(&mut k, rope, positions, RopeStyle::Neox)?;
        return Ok((
            q.reshaped(&[tokens, qw])?,
            k.reshaped(&[tokens, kw])?,
            v.reshaped(&[tokens, kw])?,
        ));
    };
    let (cos, sin) = rope.device_tables_for(OP, qkv)?;
    let rd = rope.table.rotary_dim();
    if d > 512 || rd > d || rd % 2 != 0 {
        return Err(invalid(
            OP,
            format!("head dim {d} (at most 512) with rotary dim {rd} (even, at most the head dim)"),
        ));
    }
    let device = qkv.device();
    let q = Tensor::uninit_on(&[tokens, qw], DType::F32, &device)?;
    let k = Tensor::uninit_on(&[tokens, kw], DType::F32, &device)?;
    let v = Tensor::uninit_on(&[tokens, kw], DType::F32, &device)?;
    let norm_ptrs = match norms {
        Some((qn, kn)) => (qn.device_ptr()?, kn.device_ptr()?),
        None => (0, 0),
    };
    // SAFETY: shapes, dtypes and devices checked above; positions come from
    // the backend's step (below the table's length).
    unsafe {
        ops.qkv_heads_raw(
            qkv.device_ptr()?,
            norm_ptrs,
            (q.device_ptr()?, k.device_ptr()?, v.device_ptr()?),
            (cos.device_ptr()?, sin.device_ptr()?, positions.device_ptr()?),
            tokens,
            (q_heads, kv_heads, d, rd),
            eps,
        )
    }?;
    Ok((q, k, v))
}

/// MLA's stacked down projections, split: `a` f32 with rows `[q_a | latent |
/// rope key]` (`q_rank`, `kv_rank` and `rope_dim` wide; `q_rank` 0 without
/// q LoRA) into the q up-projection's input `rms_norm(q_a, q_norm)` (a GEMM
/// input: bf16 on a GPU; `None` when `q_rank` is 0) and the cache rows
/// `[rms_norm(latent, kv_norm) | rope(rope key)]` (f32, `kv_rank` plus
/// `rope_dim` wide, NeoX-rotated at `positions`). On the CPU: the columns
/// split, then [`rms_norm`] and [`rope_concat`] (the twin); on a GPU one
/// launch.
pub fn mla_down_heads(
    a: &Tensor,
    (q_rank, kv_rank, rope_dim): (usize, usize, usize),
    q_norm: Option<&Tensor>,
    kv_norm: &Tensor,
    eps: f32,
    rope: &Rope,
    positions: &Tensor,
) -> Result<(Option<Tensor>, Tensor)> {
    const OP: &str = "mla_down_heads";
    let (tokens, width) = a.dims2(OP)?;
    check_shape(
        OP,
        "a (width)",
        &[width],
        "q + kv rank + rope dim",
        &[q_rank + kv_rank + rope_dim],
    )?;
    check_shape(OP, "positions", positions.shape(), "a rows", &[tokens])?;
    check_shape(OP, "kv norm", kv_norm.shape(), "kv rank", &[kv_rank])?;
    require_dtype(OP, "a", a, DType::F32)?;
    require_dtype(OP, "kv norm", kv_norm, DType::F32)?;
    require_dtype(OP, "positions", positions, DType::I32)?;
    same_device(OP, a, &[kv_norm, positions])?;
    match (q_norm, q_rank) {
        (None, 0) => {}
        (Some(qn), r) if r > 0 => {
            check_shape(OP, "q norm", qn.shape(), "q rank", &[r])?;
            require_dtype(OP, "q norm", qn, DType::F32)?;
            same_device(OP, a, &[qn])?;
        }
        _ => return Err(invalid(OP, "a q norm goes with a nonzero q rank, and only with one")),
    }
    let Some(ops) = cuda_ops(a)? else {
        let rows = a.as_slice::<f32>()?;
        let part = |from: usize, w: usize| cpu_columns(rows, width, from, w);
        let q_in = match q_norm {
            Some(qn) => Some(rms_norm(
                &Tensor::from_vec(part(0, q_rank), &[tokens, q_rank])?,
                qn,
                eps,
            )?),
            None => None,
        };
        let latent = rms_norm(
            &Tensor::from_vec(part(q_rank, kv_rank), &[tokens, kv_rank])?,
            kv_norm,
            eps,
        )?;
        let k_rope = Tensor::from_vec(part(q_rank + kv_rank, rope_dim), &[tokens, 1, rope_dim])?;
        return Ok((q_in, rope_concat(&latent, &k_rope, rope, positions)?));
    };
    let (cos, sin) = rope.device_tables_for(OP, a)?;
    if rope_dim != rope.table.rotary_dim() || rope_dim % 2 != 0 {
        return Err(invalid(
            OP,
            format!(
                "rope dim {rope_dim} is not the table's (even) rotary dim {}",
                rope.table.rotary_dim()
            ),
        ));
    }
    let device = a.device();
    let q_in = match q_rank {
        0 => None,
        r => Some(Tensor::uninit_on(&[tokens, r], DType::BF16, &device)?),
    };
    let keys = Tensor::uninit_on(&[tokens, kv_rank + rope_dim], DType::F32, &device)?;
    let q_norm_ptr = match q_norm {
        Some(qn) => qn.device_ptr()?,
        None => 0,
    };
    let q_in_ptr = match &q_in {
        Some(t) => t.device_ptr()?,
        None => 0,
    };
    // SAFETY: shapes, dtypes and devices checked above; positions come from
    // the backend's step (below the table's length).
    unsafe {
        ops.mla_down_heads_raw(
            a.device_ptr()?,
            (q_norm_ptr, kv_norm.device_ptr()?),
            (q_in_ptr, keys.device_ptr()?),
            (cos.device_ptr()?, sin.device_ptr()?, positions.device_ptr()?),
            tokens,
            (q_rank, kv_rank, rope_dim),
            eps,
        )
    }?;
    Ok((q_in, keys))
}

/// Columns `from .. from + w` of each row of `rows` (`width` wide), in order.
fn cpu_columns(rows: &[f32], width: usize, from: usize, w: usize) -> Vec<f32> {
    rows.chunks_exact(width.max(1))
        .flat_map(|r| &r[from..from + w])
        .copied()
        .collect()
}

/// `silu(gate) * up` of a fused gate/up projection's rows `[gate | up]` (f32
/// `[n, 2i]`) as the next linear layer's input `[n, i]`: bf16 on a GPU
/// (written by the one kernel), f32 on the CPU.
pub fn silu_mul_halves_gemm_input(gate_up: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu_mul_halves";
    let (n, w) = gate_up.dims2(OP)?;
    require_dtype(OP, "gate_up", gate_up, DType::F32)?;
    if w % 2 != 0 {
        return Err(invalid(OP, format!("width {w} is not two halves")));
    }
    let i = w / 2;
    match cuda_ops(gate_up)? {
        None => {
            let rows = gate_up.as_slice::<f32>()?;
            let (mut gate, up) = (cpu_columns(rows, w, 0, i), cpu_columns(rows, w, i, i));
            cpu::silu_mul(&mut gate, &up)?;
            Tensor::from_vec(gate, &[n, i])
        }
        Some(ops) => {
            let out = Tensor::uninit_on(&[n, i], DType::BF16, &gate_up.device())?;
            // SAFETY: gate_up holds n x 2i f32, out n x i bf16.
            unsafe { ops.silu_mul_halves_raw(gate_up.device_ptr()?, out.device_ptr()?, n, i) }?;
            Ok(out)
        }
    }
}

/// `gate = silu(gate) * up` in place (f32).
pub fn silu_mul_(gate: &mut Tensor, up: &Tensor) -> Result<()> {
    const OP: &str = "silu_mul";
    gate.require_same_shape(OP, up)?;
    require_dtype(OP, "gate", gate, DType::F32)?;
    require_dtype(OP, "up", up, DType::F32)?;
    same_device(OP, gate, &[up])?;
    require_unique(OP, gate)?;
    match cuda_ops(gate)? {
        None => {
            let up = up.as_slice::<f32>()?.to_vec();
            cpu::silu_mul(gate.as_slice_mut::<f32>()?, &up)
        }
        Some(ops) => unsafe { ops.silu_mul_raw(gate.device_ptr()?, up.device_ptr()?, gate.elem_count()) },
    }
}

/// `silu(gate) * up` (f32).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let mut g = copy(gate)?;
    silu_mul_(&mut g, up)?;
    Ok(g)
}

/// `x += y` in place (f32): the residual add.
pub fn add_(x: &mut Tensor, y: &Tensor) -> Result<()> {
    const OP: &str = "add";
    x.require_same_shape(OP, y)?;
    require_dtype(OP, "x", x, DType::F32)?;
    require_dtype(OP, "y", y, DType::F32)?;
    same_device(OP, x, &[y])?;
    require_unique(OP, x)?;
    match cuda_ops(x)? {
        None => {
            let y = y.as_slice::<f32>()?.to_vec();
            x.as_slice_mut::<f32>()?.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            Ok(())
        }
        Some(ops) => {
            let p = x.device_ptr()?;
            unsafe { ops.add_raw(p, y.device_ptr()?, p, x.elem_count()) }
        }
    }
}

/// `x + y` (f32).
pub fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let mut out = copy(x)?;
    add_(&mut out, y)?;
    Ok(out)
}

/// `x[r, :] += bias` in place for f32 rows of `bias.len()`.
pub fn bias_add_(x: &mut Tensor, bias: &Tensor) -> Result<()> {
    const OP: &str = "bias_add";
    check_shape(OP, "x (last dim)", &[x.last_dim()], "bias", bias.shape())?;
    require_dtype(OP, "x", x, DType::F32)?;
    require_dtype(OP, "bias", bias, DType::F32)?;
    same_device(OP, x, &[bias])?;
    require_unique(OP, x)?;
    match cuda_ops(x)? {
        None => {
            let b = bias.as_slice::<f32>()?.to_vec();
            let w = b.len();
            if w > 0 {
                x.as_slice_mut::<f32>()?
                    .chunks_exact_mut(w)
                    .for_each(|row| row.iter_mut().zip(&b).for_each(|(v, b)| *v += b));
            }
            Ok(())
        }
        Some(ops) => unsafe { ops.bias_add_raw(x.device_ptr()?, bias.device_ptr()?, x.elem_count(), x.last_dim()) },
    }
}

/// Softmax over the last dimension (CPU).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax";
    x.require_float(OP)?;
    cpu_only(OP, x)?;
    let mut v = x.to_f32_vec()?;
    let n = x.last_dim();
    if n > 0 {
        v.chunks_exact_mut(n).for_each(cpu::softmax_in_place);
    }
    Tensor::from_f32(v, x.shape(), x.dtype())
}

/// The `k` largest values of each row of the last dimension, best first:
/// `(values in x's dtype, indices as i32)`, both `[.., k]` (CPU).
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "topk";
    x.require_float(OP)?;
    cpu_only(OP, x)?;
    let n = x.last_dim();
    if k > n {
        return Err(invalid(OP, format!("k = {k} is larger than the row length {n}")));
    }
    let v = x.to_f32_vec()?;
    let rows = v.len().checked_div(n).unwrap_or(0);
    let (mut values, mut indices) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    for row in v.chunks_exact(n.max(1)).take(rows) {
        for i in cpu::topk_indices(row, k) {
            values.push(row[i as usize]);
            indices.push(i as i32);
        }
    }
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = k;
    }
    Ok((
        Tensor::from_f32(values, &shape, x.dtype())?,
        Tensor::from_vec(indices, &shape)?,
    ))
}

/// Index of the largest value in each row of the last dimension (the first
/// on ties), as u32 on x's device: greedy sampling.
pub fn argmax(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "argmax";
    x.require_float(OP)?;
    let n = x.last_dim();
    if n == 0 {
        return Err(invalid(OP, "argmax of an empty row"));
    }
    let shape = &x.shape()[..x.shape().len().saturating_sub(1)];
    let rows = x.elem_count() / n;
    match cuda_ops(x)? {
        None => {
            let v = x.to_f32_vec()?;
            let out: Vec<u32> = v.chunks_exact(n).map(|row| cpu::argmax(row).unwrap_or(0)).collect();
            Tensor::from_vec(out, shape)
        }
        Some(ops) => {
            require_dtype(OP, "x", x, DType::F32)?;
            let out = Tensor::uninit_on(shape, DType::U32, &x.device())?;
            unsafe { ops.argmax_raw(x.device_ptr()?, rows, n, out.device_ptr()?) }?;
            Ok(out)
        }
    }
}

/// One token per row of f32 `logits` (`[rows, vocab]`), row `r` drawn
/// with `params[r]` at `steps[r]` (greedy, or temperature with top-k and
/// top-p), as u32 on the logits' device. The CPU twin and the GPU kernel
/// draw the same token for the same inputs.
pub fn sample(logits: &Tensor, params: &[cpu::sampling::SamplingParams], steps: &[u64]) -> Result<Tensor> {
    const OP: &str = "sample";
    require_dtype(OP, "logits", logits, DType::F32)?;
    let vocab = logits.last_dim();
    let rows = logits.elem_count() / vocab.max(1);
    if params.len() != rows || steps.len() != rows {
        return Err(invalid(
            OP,
            format!("{} params and {} steps for {rows} rows", params.len(), steps.len()),
        ));
    }
    match cuda_ops(logits)? {
        None => {
            let ids = cpu::sampling::sample_rows(logits.as_slice::<f32>()?, vocab, params, steps)?;
            Tensor::from_vec(ids, &[rows])
        }
        Some(ops) => {
            let device = logits.device();
            let Device::Cuda(dev) = &device else {
                unreachable!("a CUDA tensor")
            };
            let rows_params = params
                .iter()
                .zip(steps)
                .map(|(p, &s)| crate::cuda::sampling::SamplingRow::new(p, s))
                .collect::<Result<Vec<_>>>()?;
            let mut params_dev = dev.stream().clone_htod(&rows_params)?;
            let whole = if logits.is_whole() {
                logits.clone()
            } else {
                copy(logits)?
            };
            let mut out = Tensor::uninit_on(&[rows], DType::U32, &device)?;
            ops.sample_rows(
                whole.cuda_slice::<f32>()?,
                rows,
                vocab,
                &mut params_dev,
                out.cuda_slice_mut::<u32>()?,
            )?;
            Ok(out)
        }
    }
}

/// Rows of `table` (`[vocab, hidden]`; f32 on the CPU, bf16 or f32 on the
/// GPU) for the u32 token ids in `ids`, as f32 `[ids, hidden]`. CPU ids at
/// or beyond the vocabulary are an error; ids already on the GPU are not
/// checked (the decoder checks host ids before uploading them, and sampled
/// ids are below the vocabulary by construction).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let (vocab, hidden) = table.dims2(OP)?;
    require_dtype(OP, "ids", ids, DType::U32)?;
    same_device(OP, table, &[ids])?;
    let count = ids.elem_count();
    match cuda_ops(table)? {
        None => {
            let ids = ids.as_slice::<u32>()?;
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(invalid(
                    OP,
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            let mut out = vec![0.0; count * hidden];
            let t: std::borrow::Cow<'_, [f32]> = match table.dtype() {
                DType::F32 => table.as_slice::<f32>()?.into(),
                _ => table.to_f32_vec()?.into(),
            };
            cpu::embedding(&t, hidden, ids, &mut out)?;
            Tensor::from_vec(out, &[count, hidden])
        }
        Some(ops) => {
            let out = Tensor::uninit_on(&[count, hidden], DType::F32, &table.device())?;
            match table.dtype() {
                DType::BF16 => unsafe {
                    ops.embedding_bf16_raw(table.device_ptr()?, ids.device_ptr()?, out.device_ptr()?, count, hidden)
                }?,
                other => {
                    return Err(invalid(
                        OP,
                        format!("a {other} table on the GPU (weights are bf16 there)"),
                    ))
                }
            }
            Ok(out)
        }
    }
}

/// A tensor of `shape` on `device` filled with `offset + scale * u_i`, `u_i`
/// uniform in [-1, 1) from `(seed, i)` (identical bits on both devices, so a
/// random model is the same model on the CPU and the GPU, up to the dtype).
pub fn fill_uniform(
    shape: &[usize],
    dtype: DType,
    device: &Device,
    seed: u64,
    scale: f32,
    offset: f32,
) -> Result<Tensor> {
    const OP: &str = "fill_uniform";
    match device {
        Device::Cpu => {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n as u64)
                .map(|i| offset + scale * cpu::uniform_at(seed, i))
                .collect();
            Tensor::from_f32(v, shape, dtype)
        }
        Device::Cuda(dev) => {
            let bf16 = match dtype {
                DType::BF16 => true,
                DType::F32 => false,
                other => return Err(invalid(OP, format!("{other} (have bf16 and f32)"))),
            };
            let out = Tensor::uninit_on(shape, dtype, device)?;
            // SAFETY: `out` was just allocated with exactly these elements.
            unsafe {
                dev.ops()?
                    .fill_uniform_raw(out.device_ptr()?, out.elem_count(), bf16, seed, scale, offset)
            }?;
            Ok(out)
        }
    }
}

/// Rows `idx` (u32, each below `table`'s row count) of a 2-D `table` of
/// f32, bf16 or u32, as a `[idx, width]` tensor of the same dtype: the
/// tokens of one expert in a MoE prefill, a weight's rows reordered at load.
/// Indices are checked on the host (CPU indices) or trusted (GPU ones come
/// from our own kernels or from [`Tensor::from_vec`] of checked values).
pub fn gather_rows(table: &Tensor, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    let (rows, w) = table.dims2(OP)?;
    require_dtype(OP, "idx", idx, DType::U32)?;
    same_device(OP, table, &[idx])?;
    let m = idx.elem_count();
    match cuda_ops(table)? {
        None => {
            let ids = idx.as_slice::<u32>()?;
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
                return Err(invalid(OP, format!("row {bad} of a table of {rows} rows")));
            }
            fn pick<T: crate::WithDType + Copy>(t: &Tensor, ids: &[u32], w: usize) -> Result<Tensor> {
                let src = t.as_slice::<T>()?;
                let mut out = Vec::with_capacity(ids.len() * w);
                for &i in ids {
                    out.extend_from_slice(&src[i as usize * w..(i as usize + 1) * w]);
                }
                Tensor::from_vec(out, &[ids.len(), w])
            }
            match table.dtype() {
                DType::F32 => pick::<f32>(table, ids, w),
                DType::BF16 => pick::<half::bf16>(table, ids, w),
                DType::U32 => pick::<u32>(table, ids, w),
                other => Err(invalid(OP, format!("a {other} table"))),
            }
        }
        Some(ops) => {
            let bytes = table.dtype().size_in_bytes();
            if bytes != 2 && bytes != 4 {
                return Err(invalid(OP, format!("a {} table on the GPU", table.dtype())));
            }
            let out = Tensor::uninit_on(&[m, w], table.dtype(), &table.device())?;
            // SAFETY: the table holds rows x w, idx m indices below rows, out m x w.
            unsafe { ops.gather_rows_raw(table.device_ptr()?, idx.device_ptr()?, out.device_ptr()?, m, w, bytes) }?;
            Ok(out)
        }
    }
}

/// `dst[idx[i]] = src[i]` for f32 rows (the indices distinct and below
/// `dst`'s row count; on the CPU checked).
pub fn scatter_rows(dst: &mut Tensor, idx: &Tensor, src: &Tensor) -> Result<()> {
    const OP: &str = "scatter_rows";
    let (rows, w) = dst.dims2(OP)?;
    let (m, w2) = src.dims2(OP)?;
    check_shape(OP, "src", &[m, w2], "idx x dst width", &[idx.elem_count(), w])?;
    require_dtype(OP, "dst", dst, DType::F32)?;
    require_dtype(OP, "src", src, DType::F32)?;
    require_dtype(OP, "idx", idx, DType::U32)?;
    same_device(OP, dst, &[idx, src])?;
    require_unique(OP, dst)?;
    match cuda_ops(dst)? {
        None => {
            let ids = idx.as_slice::<u32>()?.to_vec();
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
                return Err(invalid(OP, format!("row {bad} of a tensor of {rows} rows")));
            }
            let s = src.as_slice::<f32>()?.to_vec();
            let d = dst.as_slice_mut::<f32>()?;
            for (i, &r) in ids.iter().enumerate() {
                d[r as usize * w..(r as usize + 1) * w].copy_from_slice(&s[i * w..(i + 1) * w]);
            }
            Ok(())
        }
        // SAFETY: shapes checked above; indices below rows by the contract.
        Some(ops) => unsafe { ops.scatter_rows_raw(src.device_ptr()?, idx.device_ptr()?, dst.device_ptr()?, m, w) },
    }
}

/// `[a | b]`: the f32 rows of `a` (`[r, wa]`) followed by those of `b` (`[r, wb]`).
pub fn concat_cols(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "concat_cols";
    let (r, wa) = a.dims2(OP)?;
    let (r2, wb) = b.dims2(OP)?;
    if r != r2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: "a",
            lhs: a.shape().to_vec(),
            rhs_name: "b",
            rhs: b.shape().to_vec(),
        });
    }
    require_dtype(OP, "a", a, DType::F32)?;
    require_dtype(OP, "b", b, DType::F32)?;
    same_device(OP, a, &[b])?;
    match cuda_ops(a)? {
        None => {
            let (av, bv) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
            let mut out = Vec::with_capacity(r * (wa + wb));
            for i in 0..r {
                out.extend_from_slice(&av[i * wa..(i + 1) * wa]);
                out.extend_from_slice(&bv[i * wb..(i + 1) * wb]);
            }
            Tensor::from_vec(out, &[r, wa + wb])
        }
        Some(ops) => {
            let out = Tensor::uninit_on(&[r, wa + wb], DType::F32, &a.device())?;
            // SAFETY: shapes checked above.
            unsafe { ops.concat_cols_raw(a.device_ptr()?, b.device_ptr()?, out.device_ptr()?, r, wa, wb) }?;
            Ok(out)
        }
    }
}

/// The rows of `a` (`[ra, w]`) followed by those of `b` (`[rb, w]`): two
/// copies into one buffer on the device (a mixed step's attention outputs,
/// the chunk's then the batch's). See [`stack_rows`] for more parts.
pub fn concat_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    stack_rows(&[a, b])
}

/// The rows of every part in order (`[r_i, w]` each, one float dtype, one
/// device) as `[sum r_i, w]`: device-to-device copies on a GPU. Fused
/// projections stack their layers' weights with it at load.
pub fn stack_rows(parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "stack_rows";
    let Some(first) = parts.first() else {
        return Err(invalid(OP, "no parts"));
    };
    let (_, w) = first.dims2(OP)?;
    let mut rows = 0;
    for p in parts {
        let (r, pw) = p.dims2(OP)?;
        check_shape(OP, "part (width)", &[pw], "first part (width)", &[w])?;
        require_dtype(OP, "part", p, first.dtype())?;
        p.require_float(OP)?;
        same_device(OP, first, &[p])?;
        rows += r;
    }
    match cuda_ops(first)? {
        None => {
            let mut out = Vec::with_capacity(rows * w);
            for p in parts {
                out.extend_from_slice(&p.to_f32_vec()?);
            }
            // Exact for bf16 / f16 parts: their values round-trip through f32.
            Tensor::from_f32(out, &[rows, w], first.dtype())
        }
        Some(ops) => {
            let out = Tensor::uninit_on(&[rows, w], first.dtype(), &first.device())?;
            let stream = ops.device().stream();
            let mut at = 0u64;
            for p in parts {
                let bytes = p.size_in_bytes();
                if bytes > 0 {
                    // SAFETY: `out` holds every part's bytes, this one at
                    // offset `at`; the copy is ordered on the compute stream.
                    unsafe {
                        cudarc::driver::result::memcpy_dtod_async(
                            out.device_ptr()? + at,
                            p.device_ptr()?,
                            bytes,
                            stream.cu_stream(),
                        )
                    }?;
                }
                at += bytes as u64;
            }
            Ok(out)
        }
    }
}

/// A matrix product per head: `x` `[n, heads, k]` (f32; on the GPU also
/// bf16), `w` `[heads, k, m]`, or `[heads, m, k]` when `w_transposed` (f32
/// on the CPU, bf16 on the GPU); the result f32 `[n, heads, m]`. MLA's
/// absorbed query (`q_nope . W_uk` per head) and value up-projection
/// (`latent . W_uv^T` per head).
pub fn head_matmul(x: &Tensor, w: &Tensor, w_transposed: bool) -> Result<Tensor> {
    const OP: &str = "head_matmul";
    let (&[n, heads, k], &[wh, w1, w2]) = (x.shape(), w.shape()) else {
        return Err(invalid(
            OP,
            format!("x {:?} and w {:?} must be 3-D", x.shape(), w.shape()),
        ));
    };
    let (wk, m) = if w_transposed { (w2, w1) } else { (w1, w2) };
    if wh != heads || wk != k {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: "x",
            lhs: x.shape().to_vec(),
            rhs_name: "w",
            rhs: w.shape().to_vec(),
        });
    }
    same_device(OP, x, &[w])?;
    match cuda_ops(x)? {
        None => {
            require_dtype(OP, "x", x, DType::F32)?;
            require_dtype(OP, "w", w, DType::F32)?;
            let (xv, wv) = (x.as_slice::<f32>()?, w.as_slice::<f32>()?);
            let mut out = vec![0.0; n * heads * m];
            let (mut xh, mut yh) = (vec![0.0; n * k], vec![0.0; n * m]);
            for h in 0..heads {
                for t in 0..n {
                    xh[t * k..(t + 1) * k].copy_from_slice(&xv[(t * heads + h) * k..(t * heads + h + 1) * k]);
                }
                let wh = &wv[h * k * m..(h + 1) * k * m];
                if w_transposed {
                    cpu::matmul_nt(&xh, wh, &mut yh, n, k, m)?;
                } else {
                    cpu::matmul(&xh, wh, &mut yh, n, k, m)?;
                }
                for t in 0..n {
                    out[(t * heads + h) * m..(t * heads + h + 1) * m].copy_from_slice(&yh[t * m..(t + 1) * m]);
                }
            }
            Tensor::from_vec(out, &[n, heads, m])
        }
        Some(ops) => {
            require_dtype(OP, "w", w, DType::BF16)?;
            let xb = gemm_input(x)?;
            require_dtype(OP, "x", &xb, DType::BF16)?;
            let out = Tensor::uninit_on(&[n, heads, m], DType::F32, &x.device())?;
            // SAFETY: shapes, dtypes and devices checked above.
            unsafe {
                ops.head_gemm_raw(
                    xb.device_ptr()?,
                    w.device_ptr()?,
                    out.device_ptr()?,
                    n,
                    heads,
                    k,
                    m,
                    w_transposed,
                )
            }?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_shape_mismatch_names_both_sides() {
        let a = Tensor::zeros(&[2, 3], DType::F32);
        let b = Tensor::zeros(&[4, 5], DType::F32);
        let msg = matmul(&a, &b).unwrap_err().to_string();
        assert!(msg.contains("[2, 3]") && msg.contains("[4, 5]"), "{msg}");
    }

    #[test]
    fn dtype_mismatch_names_both_sides() {
        let a = Tensor::zeros(&[2, 3], DType::F32);
        let b = Tensor::zeros(&[3, 2], DType::BF16);
        let msg = matmul(&a, &b).unwrap_err().to_string();
        assert!(msg.contains("f32") && msg.contains("bf16"), "{msg}");
    }

    #[test]
    fn bf16_ops_compute_in_f32_and_keep_dtype() {
        let x = Tensor::from_f32(vec![1.0, 2.0, 3.0, 4.0], &[2, 2], DType::BF16).unwrap();
        let w = Tensor::from_f32(vec![1.0, 1.0], &[2], DType::BF16).unwrap();
        // Activations are f32 on both devices: a bf16 input is named.
        let err = rms_norm(&x, &w, 1e-6).unwrap_err().to_string();
        assert!(err.contains("bf16") && err.contains("f32"), "{err}");
        let y = rms_norm(&x.to_dtype(DType::F32).unwrap(), &w.to_dtype(DType::F32).unwrap(), 1e-6).unwrap();
        let v = y.to_f32_vec().unwrap();
        let want = 1.0 / (2.5f32).sqrt();
        assert!((v[0] - want).abs() < 1e-6, "{v:?}");
        let (vals, idx) = topk(&x, 1).unwrap();
        assert_eq!(idx.as_slice::<i32>().unwrap(), &[1, 1]);
        assert_eq!(vals.to_f32_vec().unwrap(), vec![2.0, 4.0]);
        assert_eq!(argmax(&x).unwrap().as_slice::<u32>().unwrap(), &[1, 1]);
    }

    #[test]
    fn embedding_and_silu_and_softmax() {
        let table = Tensor::from_vec((0..6).map(|i| i as f32).collect(), &[3, 2]).unwrap();
        let ids = Tensor::from_vec(vec![2u32, 0], &[2]).unwrap();
        let e = embedding(&table, &ids).unwrap();
        assert_eq!(e.to_f32_vec().unwrap(), vec![4.0, 5.0, 0.0, 1.0]);
        let bad = Tensor::from_vec(vec![3u32], &[1]).unwrap();
        assert!(embedding(&table, &bad).unwrap_err().to_string().contains("vocabulary"));
        let g = Tensor::from_vec(vec![0.0f32, 1.0], &[2]).unwrap();
        let u = Tensor::from_vec(vec![3.0f32, 2.0], &[2]).unwrap();
        let s = silu_mul(&g, &u).unwrap().to_f32_vec().unwrap();
        assert!((s[0]).abs() < 1e-7 && (s[1] - 2.0 * 0.731_058_6).abs() < 1e-5);
        let p = softmax(&u).unwrap().to_f32_vec().unwrap();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[0] > p[1]);
        assert!(silu_mul(&g, &Tensor::zeros(&[3], DType::F32)).is_err());
    }

    #[test]
    fn rope_checks_positions() {
        let rope = Rope::new(RopeTable::new(4, 10_000.0, 8).unwrap(), &Device::Cpu).unwrap();
        let mut x = Tensor::zeros(&[2, 1, 4], DType::F32);
        let pos = Tensor::from_vec(vec![0i32], &[1]).unwrap();
        let msg = rope_(&mut x, &rope, &pos, RopeStyle::Neox).unwrap_err().to_string();
        assert!(msg.contains("[2]") && msg.contains("[1]"), "{msg}");
        let far = Tensor::from_vec(vec![0i32, 8], &[2]).unwrap();
        assert!(rope_(&mut x, &rope, &far, RopeStyle::Neox).is_err());
    }

    #[test]
    fn linear_adds_bias_and_checks_shapes() {
        let x = Tensor::from_vec(vec![1.0f32, 2.0], &[1, 2]).unwrap();
        let w = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]).unwrap();
        let b = Tensor::from_vec(vec![0.5f32, 0.0, -1.0], &[3]).unwrap();
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.to_f32_vec().unwrap(), vec![1.5, 2.0, 2.0]);
        assert!(linear(&x, &b.reshape(&[1, 3]).unwrap(), None).is_err());
        let mut r = y.clone();
        add_(&mut r, &y).unwrap();
        assert_eq!(r.to_f32_vec().unwrap(), vec![3.0, 4.0, 4.0]);
        assert_eq!(
            y.to_f32_vec().unwrap(),
            vec![1.5, 2.0, 2.0],
            "CPU in-place ops copy on write"
        );
    }

    #[test]
    fn random_fill_is_a_pure_function_of_seed_and_index() {
        let a = fill_uniform(&[4, 8], DType::F32, &Device::Cpu, 9, 0.5, 1.0).unwrap();
        let b = fill_uniform(&[32], DType::F32, &Device::Cpu, 9, 0.5, 1.0).unwrap();
        assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        let v = a.to_f32_vec().unwrap();
        assert!(v.iter().all(|x| (0.5..1.5).contains(x)) && v.windows(2).any(|w| w[0] != w[1]));
    }
}
