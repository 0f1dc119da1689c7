//! Helpers the model tests share: fixture paths, a relative error, prompts.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A fixture directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Relative L2 error of `got` against `want` (all finite).
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite logits");
    let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt() / norm
}

/// A deterministic prompt of `len` ids below `vocab`, varied by `salt`.
pub fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 31 + salt * 7 + 3) % vocab) as u32).collect()
}
