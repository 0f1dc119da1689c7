//! The head geometry of one attention layer.

use crate::error::shape_err;
use crate::Result;

/// Query heads, KV heads, widths and softmax scale of a decode.
///
/// GQA: query head `h` reads KV head `h / (q_heads / kv_heads)`, keys and
/// values of `head_dim`. MLA (absorbed): one KV head (the latent plus the
/// rope key, `key_dim` wide) shared by all query heads, whose absorbed queries
/// are `key_dim` wide; values are the first `value_dim` latent channels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub scale: f32,
}

impl AttnShape {
    pub fn gqa(q_heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttnShape {
            q_heads,
            kv_heads,
            key_dim: head_dim,
            value_dim: head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// MLA in the absorbed form. `scale` is the model's softmax scale
    /// (`1/sqrt(qk_nope_head_dim + qk_rope_head_dim)`, possibly YaRN-adjusted).
    pub fn mla(heads: usize, kv_lora_rank: usize, rope_dim: usize, scale: f32) -> Self {
        AttnShape {
            q_heads: heads,
            kv_heads: 1,
            key_dim: kv_lora_rank + rope_dim,
            value_dim: kv_lora_rank,
            scale,
        }
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    pub fn validate(&self) -> Result<()> {
        if self.kv_heads == 0 || self.q_heads == 0 || self.q_heads % self.kv_heads != 0 {
            return Err(shape_err(
                "query heads",
                format!("a positive multiple of the {} KV heads", self.kv_heads),
                self.q_heads,
            ));
        }
        if self.key_dim == 0 || self.value_dim == 0 {
            return Err(shape_err(
                "head widths",
                "positive",
                format!("{}/{}", self.key_dim, self.value_dim),
            ));
        }
        Ok(())
    }

    /// Checks the shape against a cache's geometry.
    pub fn check_cache(&self, cache: &asynctls_kvcache::CacheConfig) -> Result<()> {
        self.validate()?;
        if cache.kv_heads != self.kv_heads {
            return Err(shape_err("cache KV heads", self.kv_heads, cache.kv_heads));
        }
        if cache.key_dim != self.key_dim {
            return Err(shape_err("cache key dim", self.key_dim, cache.key_dim));
        }
        if cache.value_dim() != self.value_dim {
            return Err(shape_err("cache value dim", self.value_dim, cache.value_dim()));
        }
        Ok(())
    }
}
