//! The CUDA backend: see the crate doc.
