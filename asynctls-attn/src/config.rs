//! Attention policies and their knobs, with the defaults of the design.

use serde::{Deserialize, Serialize};

use crate::{AttnError, Result};

/// tls's k_b over an MLA latent cache (see [`SparseConfig::fit_to_cache`]).
pub const MLA_TLS_BLOCK_TOPK: usize = 256;

/// Which tokens a decode step attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Every token.
    Dense,
    /// Two-level: block filter (top-k_b blocks), then label scores over the
    /// candidates (top-k_t tokens).
    Tls,
    /// Block filter only (Quest): every token of the top blocks.
    Quest,
    /// Label scores over all tokens (Double-Sparsity style), no block stage.
    Ds,
}

impl Policy {
    pub const ALL: [Policy; 4] = [Policy::Dense, Policy::Tls, Policy::Quest, Policy::Ds];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Dense => "dense",
            Policy::Tls => "tls",
            Policy::Quest => "quest",
            Policy::Ds => "ds",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown attention policy `{s}` (expected dense, tls, quest or ds)"))
    }
}

/// How the per-query-head scores of a GQA group (or of all MLA heads) are
/// combined into one ranking per KV head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupReduce {
    Sum,
    Max,
}

/// The knobs of sparse decode. Budgets are per KV head and step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseConfig {
    pub policy: Policy,
    /// k_b: blocks kept by the block filter (tls: candidates; quest: the
    /// attended blocks), not counting the sink and local window.
    pub block_topk: usize,
    /// k_t: tokens kept by label scoring (tls, ds), not counting the sink and
    /// local window.
    pub token_topk: usize,
    /// Leading blocks always attended (attention sink).
    pub sink_blocks: usize,
    /// Newest full blocks always attended, in addition to the partial block.
    pub local_blocks: usize,
    /// Contexts shorter than this many tokens take the dense path.
    pub dense_below: usize,
    pub group_reduce: GroupReduce,
}

impl Default for SparseConfig {
    fn default() -> Self {
        SparseConfig {
            policy: Policy::Tls,
            block_topk: 128,
            token_topk: 1024,
            sink_blocks: 1,
            local_blocks: 1,
            dense_below: 4096,
            group_reduce: GroupReduce::Sum,
        }
    }
}

impl SparseConfig {
    /// A policy with one token budget: k_t for tls and ds, `budget / B`
    /// blocks for quest (so every policy attends about `budget` tokens).
    pub fn with_budget(policy: Policy, budget: usize, block_size: usize) -> Self {
        let mut c = SparseConfig {
            policy,
            ..SparseConfig::default()
        };
        match policy {
            Policy::Tls | Policy::Ds => c.token_topk = budget,
            Policy::Quest => c.block_topk = budget.div_ceil(block_size.max(1)),
            Policy::Dense => {}
        }
        c
    }

    /// Raises tls's k_b to [`MLA_TLS_BLOCK_TOPK`] over a latent (MLA)
    /// cache, where k_b 128 recalled 0.79 of the dense mass at 32k against
    /// 0.91 with 256 (docs/decisions/0003-mla-sparse-defaults.md); other
    /// caches and policies are left as they are.
    pub fn fit_to_cache(&mut self, cache: &asynctls_kvcache::CacheConfig) {
        let latent = matches!(cache.values, asynctls_kvcache::ValueLayout::KeyPrefix { .. });
        if latent && self.policy == Policy::Tls {
            self.block_topk = self.block_topk.max(MLA_TLS_BLOCK_TOPK);
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.policy != Policy::Dense {
            if self.policy != Policy::Ds && self.block_topk == 0 {
                return Err(AttnError::Config("block_topk (k_b) must be positive".into()));
            }
            if matches!(self.policy, Policy::Tls | Policy::Ds) && self.token_topk == 0 {
                return Err(AttnError::Config("token_topk (k_t) must be positive".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod fit_tests {
    use super::*;
    use asynctls_kvcache::CacheConfig;

    #[test]
    fn tls_over_a_latent_cache_keeps_more_blocks() {
        let mla = CacheConfig::mla(2, 512, 64, 8);
        let gqa = CacheConfig::gqa(2, 8, 128, 8);
        let mut tls = SparseConfig::with_budget(Policy::Tls, 1024, 64);
        tls.fit_to_cache(&gqa);
        assert_eq!(tls.block_topk, SparseConfig::default().block_topk);
        tls.fit_to_cache(&mla);
        assert_eq!(tls.block_topk, MLA_TLS_BLOCK_TOPK);
        let mut wide = SparseConfig {
            block_topk: 512,
            ..tls.clone()
        };
        wide.fit_to_cache(&mla);
        assert_eq!(wide.block_topk, 512, "never lowered");
        let mut quest = SparseConfig::with_budget(Policy::Quest, 1024, 64);
        quest.fit_to_cache(&mla);
        assert_eq!(quest.block_topk, 16, "quest's k_b is its budget");
    }
}
