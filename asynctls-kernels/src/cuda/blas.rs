//! bf16 GEMM through cuBLAS (f32 accumulation): the projections of a GPU
//! forward pass. The handle is created on first use, so a machine without
//! libcublas only fails when a GEMM is asked for.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;
use half::bf16;

use super::CudaOps;
use crate::error::invalid;
use crate::{Error, Result};

/// Bytes of the workspace cuBLAS is given (what it would otherwise
/// allocate on its own, which a CUDA graph capture does not allow).
const WORKSPACE_BYTES: usize = 32 << 20;

/// The cuBLAS handle and the workspace it owns for the process.
#[derive(Debug)]
pub(crate) struct Blas {
    handle: CudaBlas,
    _workspace: CudaSlice<u8>,
}

impl CudaOps {
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        let blas = self.blas.get_or_init(|| {
            let stream = self.device.stream().clone();
            let handle = CudaBlas::new(stream.clone()).map_err(|e| e.to_string())?;
            let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| e.to_string())?;
            let ptr = cudarc::driver::DevicePtr::device_ptr(&workspace, &stream).0;
            // SAFETY: the workspace lives as long as the handle (both in `Blas`).
            let status =
                unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*handle.handle(), ptr as *mut _, WORKSPACE_BYTES) };
            if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(format!("cublasSetWorkspace: {status:?}"));
            }
            Ok(Blas {
                handle,
                _workspace: workspace,
            })
        });
        blas.as_ref()
            .map(|b| &b.handle)
            .map_err(|e| Error::CudaLibrary(format!("cuBLAS: {e}")))
    }

    /// `c = a . b^T` for row-major `a` `[m, k]`, `b` `[n, k]`, `c` `[m, n]`
    /// (the layout of a linear layer's weight: `y = x . W^T`).
    pub fn matmul_nt_bf16(
        &self,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        c: &mut CudaSlice<bf16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if a.len() != m * k || b.len() != n * k || c.len() != m * n {
            return Err(invalid(
                "matmul_nt_bf16",
                format!(
                    "a {} / b {} / c {} elements for m {m}, k {k}, n {n}",
                    a.len(),
                    b.len(),
                    c.len()
                ),
            ));
        }
        // Row-major C[m, n] is column-major C^T[n, m] = B . A^T: cuBLAS sees
        // b as a column-major [k, n] to transpose and a as [k, m].
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        // SAFETY: the three buffers hold exactly the elements the config reads/writes.
        unsafe { self.blas()?.gemm(cfg, b, a, c) }.map_err(|e| Error::CudaLibrary(format!("cuBLAS gemm: {e}")))?;
        Ok(())
    }
}
