//! Benchmarks run from the CLI (`asynctls bench ...`), each beside the
//! reference it is judged against.

pub mod attn;
pub mod attn_cuda;
pub mod e2e;
pub mod offload_cuda;
pub mod prefill_cuda;
pub mod workload;
