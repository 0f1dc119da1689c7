//! Benchmarks run from the CLI (`asynctls bench ...`), each beside the
//! reference it is judged against.

pub mod attn;
pub mod attn_cuda;
pub mod e2e;
pub mod offload_cuda;
pub mod prefill_cuda;
pub mod workload;

/// The HBM bandwidth the bytes floors are computed with (H200 spec, bytes/s).
pub const HBM_BYTES_PER_S: f64 = 4.8e12;

/// The median of timing samples (the upper middle one for an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
