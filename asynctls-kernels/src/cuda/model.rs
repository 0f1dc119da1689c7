//! Launches of the per-token model ops (`cuda/model.cu`) and the mixed
//! precision GEMM of a linear layer, over raw device addresses so that
//! tensor views (a row window of a larger buffer) need no copy. The
//! tensor-level checks (shapes, dtypes, devices) are in [`crate::ops`]; these
//! functions trust them.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::CudaOps;

/// A kernel argument passed by value (addresses as u64, sizes, scalars).
pub(super) trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

impl<T: cudarc::driver::DeviceRepr> Arg for T {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}
use crate::{Error, Result};

/// Threads of the grid-stride kernels, and the most blocks one launch uses.
const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 132 * 16;

fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = (n as u64).div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows of x up to which a linear layer runs as [`CudaOps::gemv_raw`]; larger
/// products go to cuBLAS. The GEMV runs on the tensor cores with x's rows as
/// the eight columns of an mma tile, so any batch up to 8 costs one pass
/// over the weights (the earlier CUDA-core GEMV lost to cuBLAS at 4 rows and
/// was kept for one row only). `ASYNCTLS_GEMV_ROWS` overrides the bound (0
/// sends every product to cuBLAS), for measuring the two against each other.
pub const GEMV_MAX_ROWS: usize = 8;
/// Weight rows one CTA of the GEMV computes (its 8 warps split k).
const GEMV_TILE: usize = 16;

/// [`GEMV_MAX_ROWS`], or `ASYNCTLS_GEMV_ROWS` when set (read once).
fn gemv_max_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("ASYNCTLS_GEMV_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(GEMV_MAX_ROWS, |r: usize| r.min(GEMV_MAX_ROWS))
    })
}

/// A GEMM input or output type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmType {
    Bf16,
    F32,
}

impl GemmType {
    fn cuda(self) -> cudaDataType {
        match self {
            GemmType::Bf16 => cudaDataType::CUDA_R_16BF,
            GemmType::F32 => cudaDataType::CUDA_R_32F,
        }
    }
}

impl CudaOps {
    fn launch_grid_stride(&self, name: &str, n: usize, args: &[&dyn Arg]) -> Result<()> {
        self.launch_grid_stride_in(&self.model, name, n, args)
    }

    pub(super) fn launch_grid_stride_in(
        &self,
        module: &std::sync::Arc<cudarc::driver::CudaModule>,
        name: &str,
        n: usize,
        args: &[&dyn Arg],
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let cfg = elementwise_config(n);
        // SAFETY: every caller passes addresses of buffers holding the n
        // elements (checked by the tensor ops) in the kernel's argument order.
        unsafe { self.launch_on(module, name, cfg.grid_dim, cfg.block_dim.0, args) }
    }

    /// One launch of `name` (in `module`) on `grid` CTAs of `threads` threads.
    ///
    /// # Safety
    /// `args` are the kernel's arguments in its order, the addresses among
    /// them of live buffers of this device holding what the grid reads and writes.
    unsafe fn launch_on(
        &self,
        module: &std::sync::Arc<cudarc::driver::CudaModule>,
        name: &str,
        grid: (u32, u32, u32),
        threads: u32,
        args: &[&dyn Arg],
    ) -> Result<()> {
        let f = self.function(module, name)?;
        let stream = self.device.stream();
        let mut b = stream.launch_builder(&f);
        for a in args {
            a.push(&mut b);
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's contract.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `y[i] = bf16(x[i])` (`to_bf16`) or `y[i] = f32(x[i])`.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn cast_raw(&self, x: u64, y: u64, n: usize, to_bf16: bool) -> Result<()> {
        let name = if to_bf16 { "cast_f32_bf16" } else { "cast_bf16_f32" };
        let n64 = n as i64;
        self.launch_grid_stride(name, n, &[&x, &y, &n64])
    }

    /// `out = a + b` over `n` f32 (out may be a).
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn add_raw(&self, a: u64, b: u64, out: u64, n: usize) -> Result<()> {
        let n64 = n as i64;
        self.launch_grid_stride("add_f32", n, &[&a, &b, &out, &n64])
    }

    /// `x[r, j] += bias[j]` for `n` f32 in rows of `width`.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn bias_add_raw(&self, x: u64, bias: u64, n: usize, width: usize) -> Result<()> {
        let (n64, w) = (n as i64, width as i32);
        self.launch_grid_stride("bias_add_f32", n, &[&x, &bias, &n64, &w])
    }

    /// Fills `n` elements (bf16 or f32) with `offset + scale * u_i`, `u_i`
    /// uniform in [-1, 1) from (seed, i) as [`crate::cpu::uniform_at`].
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn fill_uniform_raw(
        &self,
        y: u64,
        n: usize,
        bf16: bool,
        seed: u64,
        scale: f32,
        offset: f32,
    ) -> Result<()> {
        let name = if bf16 { "fill_uniform_bf16" } else { "fill_uniform_f32" };
        let n64 = n as i64;
        self.launch_grid_stride(name, n, &[&y, &n64, &seed, &scale, &offset])
    }

    /// Rows of a bf16 `table` (`[vocab, h]`) for `count` u32 ids into f32 `out`.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn embedding_bf16_raw(&self, table: u64, ids: u64, out: u64, count: usize, h: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let hh = h as i32;
        // SAFETY: ids were checked against the vocabulary on the host or come
        // from the sampler (always below the vocabulary); out holds count x h.
        unsafe {
            self.launch_on(
                &self.model,
                "embedding_bf16_f32",
                (count as u32, 1, 1),
                256,
                &[&table, &ids, &out, &hh],
            )
        }
    }

    /// `out[r] = x[r] * w / rms(x[r])` for `rows` rows of `h` f32.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn rms_norm_raw(&self, x: u64, w: u64, out: u64, rows: usize, h: usize, eps: f32) -> Result<()> {
        unsafe { self.rms_norm_into(x, w, out, rows, h, eps, false) }
    }

    /// [`Self::rms_norm_raw`] with `out` bf16 when `bf16_out`.
    ///
    /// # Safety
    /// As [`Self::rms_norm_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rms_norm_into(
        &self,
        x: u64,
        w: u64,
        out: u64,
        rows: usize,
        h: usize,
        eps: f32,
        bf16_out: bool,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let name = if bf16_out {
            "rms_norm_out_bf16"
        } else {
            "rms_norm_out_f32"
        };
        let hh = h as i32;
        // SAFETY: x and out hold rows x h, w holds h.
        unsafe { self.launch_on(&self.model, name, (rows as u32, 1, 1), 256, &[&x, &w, &out, &hh, &eps]) }
    }

    /// `gate = silu(gate) * up` over `n` f32.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn silu_mul_raw(&self, gate: u64, up: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        // The kernel indexes with an int.
        if n > i32::MAX as usize {
            return Err(crate::error::invalid(
                "silu_mul",
                format!(
                    "{n} elements in one launch (at most {}; use a smaller --prefill-chunk)",
                    i32::MAX
                ),
            ));
        }
        let f = self.function(&self.elementwise, "silu_mul_f32")?;
        let nn = n as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(&gate).arg(&up).arg(&nn);
        // SAFETY: both hold n elements.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }?;
        Ok(())
    }

    /// RoPE in place on `x` (`[tokens, heads, head_dim]` f32) at the i32
    /// `positions` (`[tokens]`), tables `[max_pos, rotary_dim / 2]`.
    #[allow(clippy::too_many_arguments)]
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn rope_raw(
        &self,
        x: u64,
        cos: u64,
        sin: u64,
        positions: u64,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        interleaved: bool,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let (h, d, r, i) = (heads as i32, head_dim as i32, rotary_dim as i32, i32::from(interleaved));
        let grid = (tokens as u32, heads as u32, 1);
        // SAFETY: shapes checked by the tensor op; positions are below the table's length.
        unsafe {
            self.launch_on(
                &self.elementwise,
                "rope_f32",
                grid,
                64,
                &[&x, &cos, &sin, &positions, &h, &d, &r, &i],
            )
        }
    }

    /// Index of the largest value of each of `rows` rows of `n` f32, as u32.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn argmax_raw(&self, x: u64, rows: usize, n: usize, out: u64) -> Result<()> {
        if rows == 0 || n == 0 {
            return Ok(());
        }
        // Slices of about 2048 values, so a row of 150k is ~75 CTAs.
        let parts = n.div_ceil(2048).clamp(1, 128);
        let part_len = n.div_ceil(parts);
        let stream = self.device.stream();
        // SAFETY: every key is written by the first launch before the second reads it.
        let keys = unsafe { stream.alloc::<u64>(rows * parts) }?;
        let keys_ptr = {
            use cudarc::driver::DevicePtr;
            let (p, _sync) = keys.device_ptr(stream);
            p
        };
        let (nn, pl, pp) = (n as i32, part_len as i32, parts as i32);
        let m = &self.elementwise;
        // SAFETY: x holds rows x n; keys rows x parts.
        unsafe {
            self.launch_on(
                m,
                "argmax_partial_f32",
                (rows as u32, parts as u32, 1),
                256,
                &[&x, &nn, &pl, &keys_ptr],
            )
        }?;
        // SAFETY: keys holds rows x parts, out holds rows.
        unsafe { self.launch_on(m, "argmax_final", (rows as u32, 1, 1), 32, &[&keys_ptr, &pp, &out]) }?;
        drop(keys);
        Ok(())
    }

    /// Whether [`Self::gemv_raw`] takes this product: up to [`GEMV_MAX_ROWS`]
    /// rows, `k` a multiple of 8, both operands 16-byte aligned.
    pub fn gemv_takes(rows: usize, k: usize, x: u64, w: u64) -> bool {
        (1..=gemv_max_rows()).contains(&rows) && k % 8 == 0 && k <= i32::MAX as usize && x % 16 == 0 && w % 16 == 0
    }

    /// `y[m, j] = x[m, :] . w[j, :]` (or `+=` when `accumulate`) for the few
    /// rows of a decode step: `x` `[rows, k]` f32 (rounded to bf16 as the
    /// GEMM path rounds it) or bf16, `w` `[n, k]` bf16, `y` `[rows, n]` f32.
    /// Reads each weight once.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply, and [`Self::gemv_takes`] must hold.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemv_raw(
        &self,
        x: u64,
        x_bf16: bool,
        w: u64,
        y: u64,
        rows: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let name = if x_bf16 { "gemv_bf16" } else { "gemv_f32" };
        let (m32, n32, k32, acc) = (rows as i32, n as i32, k as i32, i32::from(accumulate));
        let grid = (n.div_ceil(GEMV_TILE) as u32, 1, 1);
        // SAFETY: the caller's buffers hold the sizes above; gemv_takes held.
        unsafe { self.launch_on(&self.model, name, grid, 256, &[&x, &w, &y, &m32, &n32, &k32, &acc]) }
    }

    /// `dst[i] = src[idx[i]]` for `m` rows of `w` elements of `elem_bytes`
    /// (2 or 4) bytes.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply, and every index must be a row of `src`.
    pub unsafe fn gather_rows_raw(
        &self,
        src: u64,
        idx: u64,
        dst: u64,
        m: usize,
        w: usize,
        elem_bytes: usize,
    ) -> Result<()> {
        let name = if elem_bytes == 2 {
            "gather_rows_b16"
        } else {
            "gather_rows_b32"
        };
        let (m64, w32) = (m as i64, w as i32);
        self.launch_grid_stride(name, m * w, &[&src, &idx, &dst, &m64, &w32])
    }

    /// `dst[idx[i]] = src[i]` for `m` f32 rows of `w` (distinct indices).
    ///
    /// # Safety
    /// As [`Self::gather_rows_raw`], with every index a row of `dst`.
    pub unsafe fn scatter_rows_raw(&self, src: u64, idx: u64, dst: u64, m: usize, w: usize) -> Result<()> {
        let (m64, w32) = (m as i64, w as i32);
        self.launch_grid_stride("scatter_rows_f32", m * w, &[&src, &idx, &dst, &m64, &w32])
    }

    /// The fused q/k/v projection's rows (`[tokens, qh + 2 kvh, d]` f32)
    /// split into `q` `[tokens, qh, d]`, `k` and `v` `[tokens, kvh, d]`: q and
    /// k heads RMS-normed per head by `q_norm` / `k_norm` (`d` f32 each; 0 for
    /// none), then rotated NeoX-style on their first `rd` channels at the i32
    /// `positions` with the tables `[max_pos, rd / 2]`.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply; positions are below the tables' length;
    /// `d <= 512`, `rd <= d` even.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn qkv_heads_raw(
        &self,
        qkv: u64,
        norms: (u64, u64),
        out: (u64, u64, u64),
        rope: (u64, u64, u64),
        tokens: usize,
        (qh, kvh, d, rd): (usize, usize, usize, usize),
        eps: f32,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let (qh32, kvh32, d32, rd32) = (qh as i32, kvh as i32, d as i32, rd as i32);
        let args: [&dyn Arg; 14] = [
            &qkv, &norms.0, &norms.1, &out.0, &out.1, &out.2, &rope.0, &rope.1, &rope.2, &qh32, &kvh32, &d32, &rd32,
            &eps,
        ];
        let grid = (tokens as u32, (qh + 2 * kvh) as u32, 1);
        // SAFETY: the caller's buffers hold the sizes above.
        unsafe { self.launch_on(&self.model, "qkv_heads_f32", grid, 128, &args) }
    }

    /// MLA's stacked down-projection rows (`[tokens, qr + rank + rd]` f32)
    /// into `q_in` (`[tokens, qr]` bf16, the normed q_a; skipped when `qr` is
    /// 0) and the cache rows `keys` (`[tokens, rank + rd]` f32: the normed
    /// latent and the NeoX-rotated rope key at the i32 `positions`, tables
    /// `[max_pos, rd / 2]`).
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (`q_norm` and `q_in` may be 0 when `qr`
    /// is); positions are below the tables' length; `rd` even.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn mla_down_heads_raw(
        &self,
        a: u64,
        norms: (u64, u64),
        out: (u64, u64),
        rope: (u64, u64, u64),
        tokens: usize,
        (qr, rank, rd): (usize, usize, usize),
        eps: f32,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let (qr32, rank32, rd32) = (qr as i32, rank as i32, rd as i32);
        let args: [&dyn Arg; 12] = [
            &a, &norms.0, &norms.1, &out.0, &out.1, &rope.0, &rope.1, &rope.2, &qr32, &rank32, &rd32, &eps,
        ];
        let grid = (tokens as u32, if qr > 0 { 2 } else { 1 }, 1);
        // SAFETY: the caller's buffers hold the sizes above.
        unsafe { self.launch_on(&self.model, "mla_down_heads_f32", grid, 256, &args) }
    }

    /// `out[r, j] = silu(gu[r, j]) * gu[r, i + j]` as bf16 for `rows` f32
    /// rows `[gate | up]` of `2 i`.
    ///
    /// # Safety
    /// `gu` holds `rows x 2i` f32, `out` `rows x i` bf16, on this device.
    pub unsafe fn silu_mul_halves_raw(&self, gu: u64, out: u64, rows: usize, i: usize) -> Result<()> {
        let (r64, i32_) = (rows as i64, i as i32);
        self.launch_grid_stride("silu_mul_halves_bf16", rows * i, &[&gu, &out, &r64, &i32_])
    }

    /// `out[r] = [a[r], rope(b[r])]` for `tokens * heads` rows: `a` f32
    /// `[rows, wa]`, `b` f32 `[tokens, heads, rd]` rotated NeoX-style at the
    /// i32 `positions` with the tables `[max_pos, rd / 2]`.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply; positions are below the tables' length.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope_concat_raw(
        &self,
        a: u64,
        b: u64,
        out: u64,
        cos: u64,
        sin: u64,
        positions: u64,
        tokens: usize,
        heads: usize,
        wa: usize,
        rd: usize,
    ) -> Result<()> {
        if tokens == 0 || heads == 0 {
            return Ok(());
        }
        let (h, wa32, rd32) = (heads as i32, wa as i32, rd as i32);
        let args: [&dyn Arg; 9] = [&a, &b, &out, &cos, &sin, &positions, &h, &wa32, &rd32];
        // SAFETY: the caller's buffers hold the sizes above.
        unsafe {
            self.launch_on(
                &self.model,
                "rope_concat_f32",
                (tokens as u32, heads as u32, 1),
                128,
                &args,
            )
        }
    }

    /// `out[r] = [a[r], b[r]]` for `rows` f32 rows of `wa` and `wb`.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    pub unsafe fn concat_cols_raw(&self, a: u64, b: u64, out: u64, rows: usize, wa: usize, wb: usize) -> Result<()> {
        let (r64, a32, b32) = (rows as i64, wa as i32, wb as i32);
        self.launch_grid_stride("concat_cols_f32", rows * (wa + wb), &[&a, &b, &out, &r64, &a32, &b32])
    }

    /// Per head `h` of `heads`: `c[:, h, :] = a[:, h, :] . op(b[h])` with f32
    /// accumulation, `a` bf16 `[m, heads, k]`, `b` bf16 `[heads, k, n]`
    /// (`b_transposed`: `[heads, n, k]`), `c` f32 `[m, heads, n]`: one
    /// strided-batched cuBLAS call.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn head_gemm_raw(
        &self,
        a: u64,
        b: u64,
        c: u64,
        m: usize,
        heads: usize,
        k: usize,
        n: usize,
        b_transposed: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 || heads == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let blas = self.blas()?;
        // Column-major, per head: C_h^T [n, m] = op(B_h)^T [n, k] . A_h^T [k, m].
        // Row-major B_h [k, n] is column-major [n, k] (no transpose, ld n);
        // row-major [n, k] is column-major [k, n], transposed (ld k). A_h's
        // rows are `heads * k` apart and heads `k` apart; C's likewise.
        let (op_b, ldb) = if b_transposed {
            (cublasOperation_t::CUBLAS_OP_T, k)
        } else {
            (cublasOperation_t::CUBLAS_OP_N, n)
        };
        // SAFETY: the addresses hold the elements above (checked by the tensor op).
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op_b,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                b as *const _,
                GemmType::Bf16.cuda(),
                ldb as i32,
                (k * n) as i64,
                a as *const _,
                GemmType::Bf16.cuda(),
                (heads * k) as i32,
                k as i64,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                GemmType::F32.cuda(),
                (heads * n) as i32,
                n as i64,
                heads as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::CudaLibrary(format!("cuBLAS gemm_strided_batched_ex: {e}")))?;
        Ok(())
    }

    /// `c[m, n] = a[m, k] . b[n, k]^T` (`+=` when `accumulate`) with f32 accumulation: `a` and `b`
    /// of `operands` (bf16: activations cast, weights as stored; f32: the
    /// router of a MoE layer, which HF computes in f32), `c` of `c_type`
    /// (f32 keeps the residual stream and the logits in f32).
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_nt_raw(
        &self,
        a: u64,
        b: u64,
        c: u64,
        m: usize,
        k: usize,
        n: usize,
        operands: GemmType,
        c_type: GemmType,
        accumulate: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        // beta = 1 adds the product to c (a residual stream in f32).
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let blas = self.blas()?;
        // Row-major C[m, n] is column-major C^T[n, m] = B . A^T: cuBLAS sees
        // b as a column-major [k, n] to transpose and a as [k, m].
        // SAFETY: the three addresses hold m x k, n x k and m x n elements of
        // the stated types (the tensor op checked them), on this stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                b as *const _,
                operands.cuda(),
                k as i32,
                a as *const _,
                operands.cuda(),
                k as i32,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                c_type.cuda(),
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::CudaLibrary(format!("cuBLAS gemm_ex ({operands:?} operands): {e}")))?;
        Ok(())
    }
}
