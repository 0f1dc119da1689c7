//! The mixture-of-experts ops on tensors: the router ([`moe_route`]) and
//! the routed experts ([`moe_experts`]), dispatched like [`crate::ops`] by
//! device to the CPU twins in [`crate::cpu::moe`] or the kernels of
//! `cuda/moe.cu`.
//!
//! On the GPU a decode step's experts run as two grouped kernels that read
//! the routing on the device (no host round trip, so the step stays one
//! CUDA graph); a prefill chunk (more than [`GROUPED_MAX_TOKENS`] tokens)
//! sorts its tokens by expert on the host and runs each expert as cuBLAS
//! GEMMs over its gathered rows, where tensor cores pay.

use cudarc::driver::CudaSlice;

use crate::cpu::moe::{ExpertRef, RouteConfig};
use crate::cuda::moe::{GROUPED_MAX_PAIRS, ROUTE_MAX_EXPERTS};
use crate::error::{check_shape, invalid};
use crate::{ops, DType, Device, Error, Result, Storage, Tensor};

/// Tokens up to which the GPU runs the grouped (decode) kernels.
pub const GROUPED_MAX_TOKENS: usize = 64;

/// The routed experts of one MoE layer: each expert's SwiGLU weights (HF's
/// `[out, in]` layout: gate and up `[inter, hidden]`, down `[hidden, inter]`;
/// f32 on the CPU, bf16 on the GPU), and on the GPU the tables of their
/// addresses the grouped kernels read.
pub struct ExpertBank {
    gate: Vec<Tensor>,
    up: Vec<Tensor>,
    down: Vec<Tensor>,
    hidden: usize,
    inter: usize,
    /// Device tables of the gate, up and down addresses (GPU only).
    tables: Option<[CudaSlice<u64>; 3]>,
}

impl std::fmt::Debug for ExpertBank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertBank")
            .field("experts", &self.gate.len())
            .field("hidden", &self.hidden)
            .field("inter", &self.inter)
            .field("device", &self.gate.first().map(|t| t.device().to_string()))
            .finish()
    }
}

impl ExpertBank {
    /// The bank of `gate`, `up` and `down` (one tensor per expert each, all
    /// on one device).
    pub fn new(gate: Vec<Tensor>, up: Vec<Tensor>, down: Vec<Tensor>) -> Result<Self> {
        const OP: &str = "ExpertBank";
        let experts = gate.len();
        if experts == 0 || up.len() != experts || down.len() != experts {
            return Err(invalid(
                OP,
                format!("{} gate, {} up and {} down matrices", gate.len(), up.len(), down.len()),
            ));
        }
        let (inter, hidden) = gate[0].dims2(OP)?;
        let device = gate[0].device();
        for e in 0..experts {
            check_shape(OP, "gate", gate[e].shape(), "[inter, hidden]", &[inter, hidden])?;
            check_shape(OP, "up", up[e].shape(), "[inter, hidden]", &[inter, hidden])?;
            check_shape(OP, "down", down[e].shape(), "[hidden, inter]", &[hidden, inter])?;
            for t in [&gate[e], &up[e], &down[e]] {
                if !t.device().same_device(&device) {
                    return Err(Error::DeviceMismatch {
                        lhs: format!("{OP}: {device}"),
                        rhs: t.device().to_string(),
                    });
                }
            }
        }
        let tables = match &device {
            Device::Cpu => None,
            Device::Cuda(dev) => {
                if hidden % 8 != 0 || inter % 8 != 0 {
                    return Err(invalid(
                        OP,
                        format!(
                            "the GPU kernels take widths that are multiples of 8, not hidden {hidden} / inter {inter}"
                        ),
                    ));
                }
                let table = |ts: &[Tensor]| -> Result<CudaSlice<u64>> {
                    let mut ptrs = Vec::with_capacity(ts.len());
                    for t in ts {
                        if t.dtype() != DType::BF16 {
                            return Err(invalid(
                                OP,
                                format!("{} expert weights on the GPU (bf16 there)", t.dtype()),
                            ));
                        }
                        let p = t.device_ptr()?;
                        if p % 16 != 0 {
                            return Err(invalid(OP, "expert weights must be 16-byte aligned"));
                        }
                        ptrs.push(p);
                    }
                    Ok(dev.stream().clone_htod(&ptrs)?)
                };
                Some([table(&gate)?, table(&up)?, table(&down)?])
            }
        };
        Ok(ExpertBank {
            gate,
            up,
            down,
            hidden,
            inter,
            tables,
        })
    }

    pub fn experts(&self) -> usize {
        self.gate.len()
    }

    /// Bytes of one expert's three matrices as stored.
    pub fn expert_bytes(&self) -> usize {
        self.gate[0].size_in_bytes() * 3
    }
}

/// The experts (u32 `[n, top_k]`, best first) and weights (f32 `[n,
/// top_k]`) of `n` tokens' f32 hidden states `x` (`[n, h]`) through the
/// `router` (`[experts, h]`; f32 on the CPU, bf16 on the GPU, where its
/// values widen exactly: the logits are f32 products of f32 `x` on both)
/// and the f32 correction `bias` (`[experts]`): see [`crate::cpu::moe::route`].
pub fn moe_route(x: &Tensor, router: &Tensor, bias: &Tensor, c: &RouteConfig) -> Result<(Tensor, Tensor)> {
    const OP: &str = "moe_route";
    c.check()?;
    let (n, h) = x.dims2(OP)?;
    check_shape(OP, "router", router.shape(), "[experts, hidden]", &[c.experts, h])?;
    check_shape(OP, "bias", bias.shape(), "experts", &[c.experts])?;
    for (name, t) in [("x", x), ("bias", bias)] {
        if t.dtype() != DType::F32 {
            return Err(invalid(OP, format!("{name} must be f32, not {}", t.dtype())));
        }
    }
    for t in [router, bias] {
        if !x.device().same_device(&t.device()) {
            return Err(Error::DeviceMismatch {
                lhs: format!("{OP}: {}", x.device()),
                rhs: t.device().to_string(),
            });
        }
    }
    match x.storage() {
        Storage::Cpu(_) => {
            let w = router.to_f32_vec()?;
            let (ids, weights) = crate::cpu::moe::route_rows(x.as_slice::<f32>()?, &w, bias.as_slice::<f32>()?, h, c)?;
            Ok((
                Tensor::from_vec(ids, &[n, c.top_k])?,
                Tensor::from_vec(weights, &[n, c.top_k])?,
            ))
        }
        Storage::Cuda { device, .. } => {
            if c.experts > ROUTE_MAX_EXPERTS || h % 8 != 0 || router.dtype() != DType::BF16 {
                return Err(invalid(
                    OP,
                    format!(
                        "the GPU router takes up to {ROUTE_MAX_EXPERTS} experts, a hidden size that is a multiple of 8 \
                         and a bf16 router (got {} experts, hidden {h}, {})",
                        c.experts,
                        router.dtype()
                    ),
                ));
            }
            let (xp, rp) = (x.device_ptr()?, router.device_ptr()?);
            if xp % 16 != 0 || rp % 16 != 0 {
                return Err(invalid(OP, "x and the router must be 16-byte aligned on the GPU"));
            }
            let ops = device.ops()?;
            let d = x.device();
            let ids = Tensor::uninit_on(&[n, c.top_k], DType::U32, &d)?;
            let weights = Tensor::uninit_on(&[n, c.top_k], DType::F32, &d)?;
            // SAFETY: shapes, dtypes, alignment and the config checked above.
            unsafe {
                ops.moe_route_raw(
                    xp,
                    rp,
                    bias.device_ptr()?,
                    ids.device_ptr()?,
                    weights.device_ptr()?,
                    n,
                    h,
                    c,
                )
            }?;
            Ok((ids, weights))
        }
    }
}

/// `out[t] += base[t] + sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`:
/// the routed experts of `n` tokens added, with `base` (the shared
/// expert's output), to `out` (the residual stream). `x` f32 `[n, hidden]`
/// (on the GPU also bf16), `ids` u32 and `weights` f32 `[n, k]` as
/// [`moe_route`] gives them, `base` and `out` f32 `[n, hidden]`. Ids must be
/// below the bank's expert count: on the CPU they are checked; on the GPU
/// they come from [`moe_route`].
pub fn moe_experts(
    x: &Tensor,
    bank: &ExpertBank,
    ids: &Tensor,
    weights: &Tensor,
    base: &Tensor,
    out: &mut Tensor,
) -> Result<()> {
    const OP: &str = "moe_experts";
    let (n, h) = x.dims2(OP)?;
    let (n2, k) = ids.dims2(OP)?;
    check_shape(OP, "x", &[n, h], "tokens x bank hidden", &[n2, bank.hidden])?;
    check_shape(OP, "weights", weights.shape(), "ids", &[n2, k])?;
    check_shape(OP, "out", out.shape(), "x", &[n, h])?;
    check_shape(OP, "base", base.shape(), "x", &[n, h])?;
    if ids.dtype() != DType::U32
        || weights.dtype() != DType::F32
        || out.dtype() != DType::F32
        || base.dtype() != DType::F32
    {
        return Err(invalid(OP, "ids must be u32, weights, base and out f32"));
    }
    let device = x.device();
    for t in [ids, weights, base, &*out, &bank.gate[0]] {
        if !t.device().same_device(&device) {
            return Err(Error::DeviceMismatch {
                lhs: format!("{OP}: {device}"),
                rhs: t.device().to_string(),
            });
        }
    }
    let Some([gate_t, up_t, down_t]) = &bank.tables else {
        let experts: Vec<ExpertRef<'_>> = (0..bank.experts())
            .map(|e| {
                Ok(ExpertRef {
                    gate: bank.gate[e].as_slice::<f32>()?,
                    up: bank.up[e].as_slice::<f32>()?,
                    down: bank.down[e].as_slice::<f32>()?,
                })
            })
            .collect::<Result<_>>()?;
        let xv = x.as_slice::<f32>()?.to_vec();
        let (iv, wv) = (ids.as_slice::<u32>()?.to_vec(), weights.as_slice::<f32>()?.to_vec());
        let base = base.as_slice::<f32>()?.to_vec();
        return crate::cpu::moe::experts_forward(
            &xv,
            &experts,
            &iv,
            &wv,
            k,
            h,
            bank.inter,
            &base,
            out.as_slice_mut::<f32>()?,
        );
    };
    let Device::Cuda(dev) = &device else {
        return Err(invalid(OP, "a GPU bank with CPU tensors"));
    };
    out.cuda_slice_mut_any()
        .map_err(|_| invalid(OP, "the output's storage is shared or a view"))?;
    let ops_ = dev.ops()?;
    let pairs = n * k;
    let xb = ops::gemm_input(x)?;
    let mut y = Tensor::uninit_on(&[pairs, h], DType::F32, &device)?;
    if n <= GROUPED_MAX_TOKENS && pairs <= GROUPED_MAX_PAIRS {
        let act = Tensor::uninit_on(&[pairs, bank.inter], DType::BF16, &device)?;
        let base = |s: &CudaSlice<u64>| {
            use cudarc::driver::DevicePtr;
            let (p, _sync) = s.device_ptr(dev.stream());
            p
        };
        // SAFETY: shapes and devices checked above; ids come from moe_route
        // (below the expert count); widths and alignment checked by the bank.
        unsafe {
            ops_.moe_grouped_raw(
                xb.device_ptr()?,
                ids.device_ptr()?,
                pairs,
                k,
                [base(gate_t), base(up_t), base(down_t)],
                act.device_ptr()?,
                y.device_ptr()?,
                h,
                bank.inter,
            )
        }?;
    } else {
        // Tokens sorted by expert on the host (prefill is not a graph), and
        // the sorted lists uploaded once: each expert's rows are a window.
        let routed = ids.to_vec::<u32>()?;
        let mut counts = vec![0usize; bank.experts()];
        for &e in &routed {
            *counts
                .get_mut(e as usize)
                .ok_or_else(|| invalid(OP, format!("expert {e} of {}", bank.experts())))? += 1;
        }
        let mut starts = Vec::with_capacity(bank.experts() + 1);
        starts.push(0usize);
        for c in &counts {
            starts.push(starts.last().copied().unwrap_or(0) + c);
        }
        let (mut tokens, mut slots) = (vec![0u32; pairs], vec![0u32; pairs]);
        let mut next = starts.clone();
        for (p, &e) in routed.iter().enumerate() {
            let at = next[e as usize];
            tokens[at] = (p / k) as u32;
            slots[at] = p as u32;
            next[e as usize] += 1;
        }
        let tokens = Tensor::from_vec(tokens, &[pairs])?.to_device(&device)?;
        let slots = Tensor::from_vec(slots, &[pairs])?.to_device(&device)?;
        for e in 0..bank.experts() {
            let (at, m) = (starts[e], counts[e]);
            if m == 0 {
                continue;
            }
            let xs = ops::gather_rows(&xb, &tokens.narrow_rows(at, m)?)?;
            let mut g = ops::linear(&xs, &bank.gate[e], None)?;
            ops::silu_mul_(&mut g, &ops::linear(&xs, &bank.up[e], None)?)?;
            let d = ops::linear(&g, &bank.down[e], None)?;
            ops::scatter_rows(&mut y, &slots.narrow_rows(at, m)?, &d)?;
        }
    }
    // SAFETY: out and base [n, h], y [n * k, h] (every pair written above), weights [n, k].
    unsafe {
        ops_.moe_combine_raw(
            out.device_ptr()?,
            base.device_ptr()?,
            y.device_ptr()?,
            weights.device_ptr()?,
            n,
            k,
            h,
        )
    }
}
