//! Building blocks shared by the model families: linear layers and the
//! SwiGLU MLP, with HF weight names.

use asynctls_kernels::cpu;

use crate::weights::WeightSource;
use crate::Result;

/// A dense layer `y = x W^T + b` with HF's `[out, in]` weight.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    pub(crate) fn load(w: &dyn WeightSource, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?,
            bias: if bias {
                Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
            } else {
                None
            },
            in_dim,
            out_dim,
        })
    }

    /// `x`: `[n, in]` -> `[n, out]`.
    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.in_dim;
        let mut y = vec![0.0; n * self.out_dim];
        cpu::matmul_nt(x, &self.weight, &mut y, n, self.in_dim, self.out_dim).expect("shapes checked at load");
        if let Some(b) = &self.bias {
            y.chunks_exact_mut(self.out_dim)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
        }
        y
    }
}

#[derive(Debug)]
pub(crate) struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub(crate) fn load(w: &dyn WeightSource, prefix: &str, h: usize, i: usize) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), h, i, false)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), h, i, false)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, h, false)?,
        })
    }

    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut gate = self.gate_proj.forward(x);
        cpu::silu_mul(&mut gate, &self.up_proj.forward(x)).expect("same shapes");
        self.down_proj.forward(&gate)
    }
}

/// The token interface of a decoder: the embedding table in, the final norm
/// and the LM head (tied to the embeddings or not) out.
#[derive(Debug)]
pub(crate) struct TokenIo {
    embed_tokens: Vec<f32>,
    norm: Vec<f32>,
    lm_head: Option<Vec<f32>>,
    vocab: usize,
    hidden: usize,
    eps: f32,
}

impl TokenIo {
    pub(crate) fn load(w: &dyn WeightSource, vocab: usize, hidden: usize, eps: f32, tied: bool) -> Result<Self> {
        // Some tied checkpoints still ship lm_head; use it when present.
        let lm_head = if !tied || w.contains("lm_head.weight") {
            Some(w.get("lm_head.weight", &[vocab, hidden])?)
        } else {
            None
        };
        Ok(TokenIo {
            embed_tokens: w.get("model.embed_tokens.weight", &[vocab, hidden])?,
            norm: w.get("model.norm.weight", &[hidden])?,
            lm_head,
            vocab,
            hidden,
            eps,
        })
    }

    pub(crate) fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut x = vec![0.0; tokens.len() * self.hidden];
        cpu::embedding(&self.embed_tokens, self.hidden, tokens, &mut x).map_err(|_| {
            crate::ModelError::TokenOutOfRange {
                id: *tokens.iter().find(|&&t| t as usize >= self.vocab).unwrap_or(&0),
                vocab: self.vocab,
            }
        })?;
        Ok(x)
    }

    /// Final norm and LM head over rows of hidden states.
    pub(crate) fn logits(&self, mut x: Vec<f32>) -> Result<Vec<f32>> {
        cpu::rms_norm(&mut x, &self.norm, self.eps)?;
        let n = x.len() / self.hidden;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let mut logits = vec![0.0; n * self.vocab];
        cpu::matmul_nt(&x, head, &mut logits, n, self.hidden, self.vocab)?;
        Ok(logits)
    }
}

/// `x += y`.
pub(crate) fn add_residual(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// A context of `end` positions must fit the model's `limit`.
pub(crate) fn check_positions(end: usize, limit: usize) -> Result<()> {
    if end > limit {
        return Err(crate::ModelError::ContextTooLong {
            prompt: end,
            new: 0,
            context: limit,
        });
    }
    Ok(())
}

/// Prefill scaffolding shared by the families: reserves the tokens, runs the
/// layers (`layers(cache, start)` returns the final hidden states), frees the
/// sequence when anything fails (a half-written sequence is unusable), and
/// returns the logits of the last token or of all.
pub(crate) fn prefill_with<S: asynctls_kvcache::HostReadable>(
    cache: &mut asynctls_kvcache::PagedKvCache<S>,
    seq: asynctls_kvcache::SeqId,
    tokens: &[u32],
    all_logits: bool,
    io: &TokenIo,
    layers: impl FnOnce(&mut asynctls_kvcache::PagedKvCache<S>, usize) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    if tokens.is_empty() {
        return Err(crate::ModelError::EmptyPrompt);
    }
    let range = cache.reserve(seq, tokens.len())?;
    let result = layers(cache, range.start);
    if result.is_err() {
        let _ = cache.free(seq);
    }
    let x = result?;
    io.logits(if all_logits {
        x
    } else {
        x[x.len() - io.hidden..].to_vec()
    })
}

/// Reserves one more position for every sequence of a decode batch, all or
/// nothing (a full pool fails before any write), and returns the positions.
pub(crate) fn reserve_next_tokens<S: asynctls_kvcache::KvStorage>(
    cache: &mut asynctls_kvcache::PagedKvCache<S>,
    seqs: &[asynctls_kvcache::SeqId],
    tokens: &[u32],
    limit: usize,
) -> Result<Vec<usize>> {
    if seqs.len() != tokens.len() {
        return Err(crate::ModelError::Attention(asynctls_attn::AttnError::Shape {
            what: "decode batch",
            expected: format!("{} tokens", seqs.len()),
            got: tokens.len().to_string(),
        }));
    }
    let mut positions = Vec::with_capacity(seqs.len());
    for &s in seqs {
        let p = cache.table(s)?.len();
        check_positions(p + 1, limit)?;
        positions.push(p);
    }
    let block_size = cache.config().block_size;
    cache
        .allocator()
        .ensure_free(positions.iter().filter(|&&p| p % block_size == 0).count())?;
    for &s in seqs {
        cache.reserve(s, 1)?;
    }
    Ok(positions)
}

/// Tells the cache's storage which blocks this step's sparse selection read
/// in `layer`: the one-step-lag prediction of the next step's, which an
/// offloading storage prefetches (host storage ignores it). Dense steps read
/// everything and hint nothing.
pub(crate) fn hint_next_step<S: asynctls_kvcache::HostReadable>(
    cache: &mut asynctls_kvcache::PagedKvCache<S>,
    seqs: &[asynctls_kvcache::SeqId],
    layer: usize,
    report: &asynctls_attn::DecodeReport,
    kv_heads: usize,
) -> Result<()> {
    if !cache.storage().takes_prefetch_hints() {
        return Ok(());
    }
    let mut blocks = Vec::new();
    for (i, head) in report.heads.iter().enumerate() {
        if head.dense {
            continue;
        }
        let table = cache.table(seqs[i / kv_heads])?;
        blocks.extend(head.blocks.iter().map(|&b| table.blocks()[b as usize]));
    }
    if blocks.is_empty() {
        return Ok(());
    }
    blocks.sort_unstable();
    blocks.dedup();
    cache.storage_mut().prefetch_hint(layer, &blocks);
    Ok(())
}
