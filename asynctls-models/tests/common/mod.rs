//! Helpers the model tests share: fixture paths, a relative error, prompts,
//! the tls plan of the tiny fixtures.

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

/// tls over the tiny fixtures: one block and 24 tokens a step, sparse at
/// every length, after one dense layer (so both stages cut).
pub fn tiny_tls_plan() -> asynctls_models::AttentionPlan {
    asynctls_models::AttentionPlan {
        sparse: asynctls_attn::SparseConfig {
            policy: asynctls_attn::Policy::Tls,
            block_topk: 1,
            token_topk: 24,
            dense_below: 0,
            ..asynctls_attn::SparseConfig::default()
        },
        dense_layers: 1,
    }
}
