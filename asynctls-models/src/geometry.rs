//! The attention geometry of the real models the benchmarks are sized after
//! (from their public model cards).

use serde::Serialize;

/// How a model's attention caches keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AttentionKind {
    /// Grouped-query attention: `kv_heads` heads of `head_dim` for K and for V.
    Gqa { kv_heads: usize, head_dim: usize },
    /// Multi-head latent attention: one latent of `kv_lora_rank` plus a
    /// decoupled rope key of `rope_dim` per token.
    Mla {
        kv_lora_rank: usize,
        rope_dim: usize,
        qk_nope_head_dim: usize,
        v_head_dim: usize,
    },
}

/// The attention geometry of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AttentionGeometry {
    pub name: &'static str,
    pub num_layers: usize,
    pub q_heads: usize,
    pub kind: AttentionKind,
}

impl AttentionGeometry {
    /// Values cached per token and layer (keys and values together).
    pub fn cached_width_per_layer(&self) -> usize {
        match self.kind {
            AttentionKind::Gqa { kv_heads, head_dim } => 2 * kv_heads * head_dim,
            AttentionKind::Mla {
                kv_lora_rank, rope_dim, ..
            } => kv_lora_rank + rope_dim,
        }
    }

    /// The softmax scale of one query head.
    pub fn softmax_scale(&self) -> f32 {
        match self.kind {
            AttentionKind::Gqa { head_dim, .. } => 1.0 / (head_dim as f32).sqrt(),
            AttentionKind::Mla {
                rope_dim,
                qk_nope_head_dim,
                ..
            } => 1.0 / ((qk_nope_head_dim + rope_dim) as f32).sqrt(),
        }
    }
}

/// Models whose real sizes the benchmarks are run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownModel {
    Qwen3_8B,
    Qwen3_14B,
    Glm47Flash,
}

impl KnownModel {
    pub const ALL: [KnownModel; 3] = [KnownModel::Qwen3_8B, KnownModel::Qwen3_14B, KnownModel::Glm47Flash];

    pub fn name(self) -> &'static str {
        self.geometry().name
    }

    pub fn geometry(self) -> AttentionGeometry {
        match self {
            KnownModel::Qwen3_8B => AttentionGeometry {
                name: "qwen3-8b",
                num_layers: 36,
                q_heads: 32,
                kind: AttentionKind::Gqa {
                    kv_heads: 8,
                    head_dim: 128,
                },
            },
            KnownModel::Qwen3_14B => AttentionGeometry {
                name: "qwen3-14b",
                num_layers: 40,
                q_heads: 40,
                kind: AttentionKind::Gqa {
                    kv_heads: 8,
                    head_dim: 128,
                },
            },
            // The one table of GLM's sizes is its config's real-size constructor.
            KnownModel::Glm47Flash => {
                let c = crate::GlmConfig::glm_4_7_flash();
                AttentionGeometry {
                    name: "glm-4.7-flash",
                    num_layers: c.num_hidden_layers,
                    q_heads: c.num_attention_heads,
                    kind: AttentionKind::Mla {
                        kv_lora_rank: c.kv_lora_rank,
                        rope_dim: c.qk_rope_head_dim,
                        qk_nope_head_dim: c.qk_nope_head_dim,
                        v_head_dim: c.v_head_dim,
                    },
                }
            }
        }
    }
}

impl std::str::FromStr for KnownModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KnownModel::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<_> = KnownModel::ALL.iter().map(|m| m.name()).collect();
            format!("unknown model shape `{s}` (known: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_widths_per_token_and_layer() {
        assert_eq!(KnownModel::Qwen3_8B.geometry().cached_width_per_layer(), 2048);
        assert_eq!(KnownModel::Glm47Flash.geometry().cached_width_per_layer(), 576);
        assert_eq!(KnownModel::Glm47Flash.geometry().softmax_scale(), 1.0 / 16.0);
        assert_eq!("qwen3-14b".parse::<KnownModel>(), Ok(KnownModel::Qwen3_14B));
        assert!("gpt".parse::<KnownModel>().unwrap_err().contains("glm-4.7-flash"));
    }
}
