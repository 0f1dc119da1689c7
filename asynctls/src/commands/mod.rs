//! One module per subcommand: its arguments and what it runs.

pub mod bench_attn;
pub mod bench_e2e;
pub mod bench_kv;
pub mod bench_offload;
pub mod bench_prefill;
pub mod bench_serve;
pub mod calibrate;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod import_gguf;
pub mod pull;
pub mod serve;
