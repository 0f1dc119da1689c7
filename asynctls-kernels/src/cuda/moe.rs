//! Launches of the mixture-of-experts kernels (`cuda/moe.cu`): the router,
//! the grouped experts of a decode step and the slot-order combine. The
//! tensor-level checks are in [`crate::moe`]; these trust them.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::CudaOps;
use crate::cpu::moe::RouteConfig;
use crate::Result;

/// Experts one router may have (the kernel's shared arrays).
pub const ROUTE_MAX_EXPERTS: usize = 256;
/// (token, slot) pairs one grouped launch may carry (the kernel's pair list).
pub const GROUPED_MAX_PAIRS: usize = 1024;
const ROUTE_WARPS: usize = 4;
const MOE_WARPS: usize = 8;

impl CudaOps {
    /// The experts and weights (`[n, top_k]` u32 and f32) of `n` tokens'
    /// f32 hidden states `x` (`[n, h]`) through the bf16 `router` (`[experts,
    /// h]`, logits in f32) with the correction `bias`.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply; `c` passed [`RouteConfig::check`] and has
    /// at most [`ROUTE_MAX_EXPERTS`] experts; `h % 8 == 0`, x and the router
    /// 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn moe_route_raw(
        &self,
        x: u64,
        router: u64,
        bias: u64,
        ids: u64,
        weights: u64,
        n: usize,
        h: usize,
        c: &RouteConfig,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let stream = self.device.stream();
        // SAFETY: every logit is written by the first launch before the second reads it.
        let logits = unsafe { stream.alloc::<f32>(n * c.experts) }?;
        let logits_ptr = {
            use cudarc::driver::DevicePtr;
            let (p, _sync) = logits.device_ptr(stream);
            p
        };
        let (n32, h32, e) = (n as i32, h as i32, c.experts as i32);
        let f = self.function(&self.moe, "moe_router_logits")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&router).arg(&logits_ptr).arg(&h32).arg(&e);
        let cfg = LaunchConfig {
            grid_dim: (c.experts.div_ceil(8) as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's buffers hold the sizes above.
        unsafe { b.launch(cfg) }?;
        let f = self.function(&self.moe, "moe_route_f32")?;
        let (g, tg, k, norm) = (
            c.groups as i32,
            c.top_groups as i32,
            c.top_k as i32,
            i32::from(c.normalize),
        );
        let mut b = stream.launch_builder(&f);
        b.arg(&logits_ptr)
            .arg(&bias)
            .arg(&ids)
            .arg(&weights)
            .arg(&n32)
            .arg(&e)
            .arg(&g)
            .arg(&tg)
            .arg(&k)
            .arg(&norm)
            .arg(&c.scaling);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(ROUTE_WARPS) as u32, 1, 1),
            block_dim: ((ROUTE_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logits holds n x experts; the outputs n x top_k.
        unsafe { b.launch(cfg) }?;
        drop(logits);
        Ok(())
    }

    /// The routed experts of `pairs = n * k` (token, slot) pairs: `act =
    /// silu(x W_gate^T) * (x W_up^T)` (bf16 `[pairs, inter]`), then `y =
    /// act W_down^T` (f32 `[pairs, h]`), each touched expert's weights read
    /// once. `x` bf16 `[n, h]`; `ids` u32 `[pairs]`; the pointer tables
    /// hold each expert's bf16 weight address.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply; every id must index the pointer tables;
    /// `h` and `inter` are multiples of 8 and the weights 16-byte aligned;
    /// `pairs <= GROUPED_MAX_PAIRS`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn moe_grouped_raw(
        &self,
        x: u64,
        ids: u64,
        pairs: usize,
        k: usize,
        tables: [u64; 3],
        act: u64,
        y: u64,
        h: usize,
        inter: usize,
    ) -> Result<()> {
        if pairs == 0 {
            return Ok(());
        }
        let stream = self.device.stream();
        let (p32, k32, h32, i32_) = (pairs as i32, k as i32, h as i32, inter as i32);
        let [gate, up, down] = tables;
        let f = self.function(&self.moe, "moe_gate_up_grouped")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x)
            .arg(&ids)
            .arg(&p32)
            .arg(&k32)
            .arg(&gate)
            .arg(&up)
            .arg(&act)
            .arg(&h32)
            .arg(&i32_);
        let cfg = LaunchConfig {
            grid_dim: (pairs as u32, inter.div_ceil(MOE_WARPS) as u32, 1),
            block_dim: ((MOE_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's buffers hold the sizes above.
        unsafe { b.launch(cfg) }?;
        let f = self.function(&self.moe, "moe_down_grouped")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&act).arg(&ids).arg(&p32).arg(&down).arg(&y).arg(&h32).arg(&i32_);
        let cfg = LaunchConfig {
            grid_dim: (pairs as u32, h.div_ceil(MOE_WARPS) as u32, 1),
            block_dim: ((MOE_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out[t] += base[t] + sum_j w[t, j] * y[t * k + j]` over f32 rows of `h`.
    ///
    /// # Safety
    /// Every address must point to a live device buffer of this device holding
    /// the elements the sizes imply (the tensor ops check them).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn moe_combine_raw(
        &self,
        out: u64,
        base: u64,
        y: u64,
        w: u64,
        n: usize,
        k: usize,
        h: usize,
    ) -> Result<()> {
        let (n64, k32, h32) = (n as i64, k as i32, h as i32);
        let moe = self.moe.clone();
        self.launch_grid_stride_in(&moe, "moe_combine_f32", n * h, &[&out, &base, &y, &w, &n64, &k32, &h32])
    }
}
