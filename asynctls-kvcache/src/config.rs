//! The shape of a cache: layers, heads, widths, block size, capacity, and
//! which key channels the label cache keeps.

use crate::{CacheError, Result};

/// Element type of the stored K/V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDType {
    F32,
    BF16,
}

impl KvDType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::BF16 => 2,
        }
    }
}

/// Where a token's value vector lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueLayout {
    /// GQA: a value vector of `dim` channels stored beside the key.
    Separate { dim: usize },
    /// MLA (absorbed form): the value is the first `dim` channels of the
    /// stored key (the latent), so no separate value is stored.
    KeyPrefix { dim: usize },
}

impl ValueLayout {
    pub fn dim(self) -> usize {
        match self {
            ValueLayout::Separate { dim } | ValueLayout::KeyPrefix { dim } => dim,
        }
    }
}

/// The geometry of a paged cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub num_layers: usize,
    /// KV heads per layer (1 for MLA's shared latent).
    pub kv_heads: usize,
    /// Channels of a stored key (head_dim for GQA; kv_lora_rank + rope dim for MLA).
    pub key_dim: usize,
    pub values: ValueLayout,
    /// Tokens per block (B).
    pub block_size: usize,
    /// Physical blocks in the pool, shared by all sequences.
    pub num_blocks: usize,
    pub kv_dtype: KvDType,
    /// Key channels kept per token in the INT4 label cache (r); even.
    pub label_channels: usize,
}

impl CacheConfig {
    /// A GQA cache with the design defaults: blocks of 64, r = 32 (or the
    /// whole head when it is narrower), bf16 K/V.
    pub fn gqa(num_layers: usize, kv_heads: usize, head_dim: usize, num_blocks: usize) -> Self {
        CacheConfig {
            num_layers,
            kv_heads,
            key_dim: head_dim,
            values: ValueLayout::Separate { dim: head_dim },
            block_size: 64,
            num_blocks,
            kv_dtype: KvDType::BF16,
            label_channels: 32.min(head_dim),
        }
    }

    /// An MLA cache: one latent "head" of `kv_lora_rank + rope_dim` channels,
    /// values the first `kv_lora_rank`; r = 128.
    pub fn mla(num_layers: usize, kv_lora_rank: usize, rope_dim: usize, num_blocks: usize) -> Self {
        let key_dim = kv_lora_rank + rope_dim;
        CacheConfig {
            num_layers,
            kv_heads: 1,
            key_dim,
            values: ValueLayout::KeyPrefix { dim: kv_lora_rank },
            block_size: 64,
            num_blocks,
            kv_dtype: KvDType::BF16,
            label_channels: 128.min(key_dim),
        }
    }

    pub fn value_dim(&self) -> usize {
        self.values.dim()
    }

    /// Bytes of one token's stored value for one head (0 when values are a
    /// prefix of the key).
    pub fn value_bytes_per_head(&self) -> usize {
        match self.values {
            ValueLayout::Separate { dim } => dim * self.kv_dtype.size_in_bytes(),
            ValueLayout::KeyPrefix { .. } => 0,
        }
    }

    /// Bytes of one token's stored K and V for one head.
    pub fn kv_bytes_per_head(&self) -> usize {
        self.key_dim * self.kv_dtype.size_in_bytes() + self.value_bytes_per_head()
    }

    /// Bytes of one token's label entry for one head: r/2 packed nibbles plus
    /// an f16 scale and an f16 zero point.
    pub fn label_bytes_per_head(&self) -> usize {
        self.label_channels / 2 + 4
    }

    /// Bytes a host pool of this geometry holds (K/V, f32 block bounds,
    /// labels), or `None` when the count overflows.
    pub fn host_bytes(&self) -> Option<usize> {
        let per_block_head = self
            .block_size
            .checked_mul(self.kv_bytes_per_head() + self.label_bytes_per_head())?
            .checked_add(2 * self.key_dim * 4)?;
        per_block_head
            .checked_mul(self.num_blocks)?
            .checked_mul(self.kv_heads)?
            .checked_mul(self.num_layers)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(CacheError::InvalidConfig(s));
        if self.num_layers == 0 || self.kv_heads == 0 || self.key_dim == 0 {
            return bad(format!(
                "layers ({}), kv heads ({}) and key dim ({}) must be positive",
                self.num_layers, self.kv_heads, self.key_dim
            ));
        }
        if self.block_size == 0 {
            return bad("block size must be positive".into());
        }
        if self.num_blocks == 0 || self.num_blocks > u32::MAX as usize {
            return bad(format!("block count {} must be in 1..=u32::MAX", self.num_blocks));
        }
        match self.values {
            ValueLayout::Separate { dim: 0 } => return bad("value dim must be positive".into()),
            ValueLayout::KeyPrefix { dim } if dim == 0 || dim > self.key_dim => {
                return bad(format!(
                    "a key-prefix value of {dim} channels must fit in the key's {}",
                    self.key_dim
                ))
            }
            _ => {}
        }
        if self.label_channels == 0 || self.label_channels % 2 != 0 || self.label_channels > self.key_dim {
            return bad(format!(
                "label channels r = {} must be even, positive and at most the key dim {}",
                self.label_channels, self.key_dim
            ));
        }
        Ok(())
    }
}

/// The key channels the label cache keeps, per layer and KV head.
///
/// Chosen offline by calibration (see `asynctls-attn`); fixed for the life of
/// the cache because stored labels are only meaningful for their channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelChannels {
    /// `[layer][kv_head]` -> `r` channel indices.
    channels: Vec<Vec<Vec<u16>>>,
}

impl LabelChannels {
    /// Explicit channels; checked against the config when the cache is built.
    pub fn new(channels: Vec<Vec<Vec<u16>>>) -> Self {
        LabelChannels { channels }
    }

    /// The first `r` channels of every head: the fallback before calibration.
    pub fn leading(config: &CacheConfig) -> Self {
        let head: Vec<u16> = (0..config.label_channels as u16).collect();
        LabelChannels {
            channels: vec![vec![head; config.kv_heads]; config.num_layers],
        }
    }

    pub fn get(&self, layer: usize, head: usize) -> &[u16] {
        &self.channels[layer][head]
    }

    pub(crate) fn validate(&self, config: &CacheConfig) -> Result<()> {
        let bad = |s: String| Err(CacheError::InvalidConfig(s));
        if self.channels.len() != config.num_layers {
            return bad(format!(
                "label channels given for {} layers, the cache has {}",
                self.channels.len(),
                config.num_layers
            ));
        }
        for (l, layer) in self.channels.iter().enumerate() {
            if layer.len() != config.kv_heads {
                return bad(format!(
                    "layer {l}: label channels for {} heads, the cache has {}",
                    layer.len(),
                    config.kv_heads
                ));
            }
            for (h, head) in layer.iter().enumerate() {
                if head.len() != config.label_channels {
                    return bad(format!(
                        "layer {l} head {h}: {} label channels, expected r = {}",
                        head.len(),
                        config.label_channels
                    ));
                }
                let mut seen = vec![false; config.key_dim];
                for &c in head {
                    let c = c as usize;
                    if c >= config.key_dim || std::mem::replace(&mut seen[c], true) {
                        return bad(format!(
                            "layer {l} head {h}: channel {c} is out of range or repeated (key dim {})",
                            config.key_dim
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
