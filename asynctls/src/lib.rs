//! asynctls: long-context LLM inference with asynchronous two-level sparse
//! attention.
//!
//! This crate is the product on top of the libraries: benchmarks ([`bench`])
//! and the `asynctls` command line. The engine (sequences, scheduler,
//! sampler, generation loop), evals and the HTTP server join it as the models
//! arrive.
//!
//! The layering, bottom up: `asynctls-kernels` (devices, tensors, ops),
//! `asynctls-kvcache` (paged cache with block metadata and labels),
//! `asynctls-attn` (dense and sparse decode attention), `asynctls-models`
//! (model families), and this crate.

pub mod bench;
