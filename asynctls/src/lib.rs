//! asynctls: long-context LLM inference with asynchronous two-level sparse
//! attention.
//!
//! This crate is the product on top of the libraries: the generation loop
//! ([`engine`]: batched prefill and decode, stop tokens, timings), token
//! sampling ([`sampler`]), the model cache and pulls ([`registry`]), benchmarks ([`bench`]), the
//! OpenAI-compatible server on a continuous-batching scheduler ([`serve`])
//! the RULER-style accuracy evals ([`eval`]) and the `asynctls` command line.
//!
//! The layering, bottom up: `asynctls-kernels` (devices, tensors, ops),
//! `asynctls-kvcache` (paged cache with block metadata and labels),
//! `asynctls-attn` (dense and sparse decode attention), `asynctls-models`
//! (model families), and this crate.

pub mod bench;
pub mod demo;
pub mod engine;
pub mod eval;
pub mod registry;
pub mod sampler;
pub mod serve;
