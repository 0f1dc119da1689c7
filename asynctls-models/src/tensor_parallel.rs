//! Tensor parallelism for the GQA family, Megatron-style, and its CPU twin:
//! ranks as threads, the all-reduce as a sum in rank order.
//!
//! Rank `r` of `N` holds query heads `r * H/N ..`, the KV heads of their
//! groups (and so its own part of the KV cache and its own sparse
//! selection: no selection crosses ranks), the matching columns of `o_proj`,
//! rows `r * I/N ..` of `gate_proj` / `up_proj` and those columns of
//! `down_proj`. Each layer is then two partial sums, one after attention and
//! one after the MLP, added into a replicated residual stream. Norms, the
//! embedding and the LM head are replicated.
//!
//! Each rank is an ordinary [`GqaModel`] of the sharded shape, loaded from
//! [`ShardWeights`], which cuts every tensor from the full checkpoint; the
//! GPU form (one device and NCCL communicator per rank) is not built yet.

use asynctls_attn::{AttentionBackend, AttentionPlan};
use asynctls_kernels::{ops, Device, Tensor};
use asynctls_kvcache::{KvDType, SeqId};

use crate::decoder::attn_err;
use crate::weights::WeightSource;
use crate::{GqaConfig, GqaModel, ModelError, Result};

/// The weights of rank `rank` of `ranks`: each tensor asked for at its
/// sharded shape, cut from the full one of `full`.
pub struct ShardWeights<'a> {
    pub full: &'a dyn WeightSource,
    pub config: &'a GqaConfig,
    pub rank: usize,
    pub ranks: usize,
}

impl std::fmt::Debug for ShardWeights<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardWeights(rank {} of {})", self.rank, self.ranks)
    }
}

impl ShardWeights<'_> {
    /// Rows `[first, first + n)` of a row-major `[rows, width]` tensor.
    fn rows(&self, name: &str, rows: usize, width: usize, first: usize, n: usize) -> Result<Vec<f32>> {
        let t = self.full.tensor(name, &[rows, width])?;
        Ok(t[first * width..(first + n) * width].to_vec())
    }

    /// Elements `[first, first + n)` of a vector of `len` (a bias).
    fn span(&self, name: &str, len: usize, first: usize, n: usize) -> Result<Vec<f32>> {
        let t = self.full.tensor(name, &[len])?;
        Ok(t[first..first + n].to_vec())
    }

    /// Columns `[first, first + n)` of a row-major `[rows, width]` tensor.
    fn cols(&self, name: &str, rows: usize, width: usize, first: usize, n: usize) -> Result<Vec<f32>> {
        let t = self.full.tensor(name, &[rows, width])?;
        Ok(t.chunks_exact(width)
            .flat_map(|row| row[first..first + n].to_vec())
            .collect())
    }
}

impl WeightSource for ShardWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let c = self.config;
        let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let (qs, kvs, is) = (q / self.ranks, kv / self.ranks, i / self.ranks);
        let r = self.rank;
        let part = |suffix: &str| name.ends_with(suffix);
        let v = if part("self_attn.q_proj.weight") {
            self.rows(name, q, h, r * qs, qs)?
        } else if part("self_attn.q_proj.bias") {
            self.span(name, q, r * qs, qs)?
        } else if part("self_attn.k_proj.weight") || part("self_attn.v_proj.weight") {
            self.rows(name, kv, h, r * kvs, kvs)?
        } else if part("self_attn.k_proj.bias") || part("self_attn.v_proj.bias") {
            self.span(name, kv, r * kvs, kvs)?
        } else if part("self_attn.o_proj.weight") {
            self.cols(name, h, q, r * qs, qs)?
        } else if part("mlp.gate_proj.weight") || part("mlp.up_proj.weight") {
            self.rows(name, i, h, r * is, is)?
        } else if part("mlp.down_proj.weight") {
            self.cols(name, h, i, r * is, is)?
        } else {
            return self.full.tensor(name, shape);
        };
        if v.len() != shape.iter().product::<usize>() {
            return Err(ModelError::Unsupported(format!(
                "shard of `{name}`: {} values for the shape {shape:?}",
                v.len()
            )));
        }
        Ok(v)
    }

    fn contains(&self, name: &str) -> bool {
        self.full.contains(name)
    }
}

/// A GQA model split over `ranks` ranks on the CPU.
#[derive(Debug)]
pub struct TensorParallelGqa {
    ranks: Vec<GqaModel>,
}

impl TensorParallelGqa {
    /// Loads `ranks` shards of the model of `config` from `weights`; the
    /// query heads, KV heads and MLP width must divide by `ranks`.
    pub fn load(config: GqaConfig, weights: &dyn WeightSource, ranks: usize) -> Result<Self> {
        let c = &config;
        if ranks == 0
            || c.num_attention_heads % ranks != 0
            || c.num_key_value_heads % ranks != 0
            || c.intermediate_size % ranks != 0
        {
            return Err(ModelError::Unsupported(format!(
                "--tensor-parallel {ranks}: {} query heads, {} KV heads and an MLP of {} must each divide by it",
                c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
            )));
        }
        let shard = GqaConfig {
            num_attention_heads: c.num_attention_heads / ranks,
            num_key_value_heads: c.num_key_value_heads / ranks,
            intermediate_size: c.intermediate_size / ranks,
            ..c.clone()
        };
        let ranks = (0..ranks)
            .map(|rank| {
                let w = ShardWeights {
                    full: weights,
                    config: c,
                    rank,
                    ranks,
                };
                GqaModel::load_on(shard.clone(), &w, &Device::Cpu)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TensorParallelGqa { ranks })
    }

    pub fn ranks(&self) -> usize {
        self.ranks.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.ranks[0].config().vocab_size
    }

    /// One backend per rank, each over its own KV heads.
    pub fn new_backends(&self, num_blocks: usize, kv_dtype: KvDType) -> Result<Vec<Box<dyn AttentionBackend>>> {
        self.ranks
            .iter()
            .map(|m| m.new_backend(num_blocks, kv_dtype, None))
            .collect()
    }

    /// Prefills `tokens` of `seq` (the same id on every rank's backend) as
    /// one chunk, densely; the logits of every position.
    pub fn prefill(&self, backends: &mut [Box<dyn AttentionBackend>], seq: SeqId, tokens: &[u32]) -> Result<Tensor> {
        let limit = self.ranks[0].config().max_position_embeddings;
        let mut steps = Vec::with_capacity(backends.len());
        for b in backends.iter_mut() {
            steps.push(b.begin_prefill(seq, tokens.len(), limit).map_err(attn_err)?);
        }
        self.forward(backends, &steps, tokens, &AttentionPlan::dense())
    }

    /// One decode step of `seqs` whose next tokens are `ids`; logits `[batch, vocab]`.
    pub fn decode(
        &self,
        backends: &mut [Box<dyn AttentionBackend>],
        seqs: &[SeqId],
        ids: &[u32],
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let limit = self.ranks[0].config().max_position_embeddings;
        let mut steps = Vec::with_capacity(backends.len());
        for b in backends.iter_mut() {
            steps.push(b.begin_decode(seqs, limit).map_err(attn_err)?);
        }
        self.forward(backends, &steps, ids, plan)
    }

    fn forward(
        &self,
        backends: &mut [Box<dyn AttentionBackend>],
        steps: &[asynctls_attn::Step],
        ids: &[u32],
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let io = self.ranks[0].io();
        io.check_ids(ids)?;
        let mut x = io.embed(&Tensor::from_vec(ids.to_vec(), &[ids.len()])?)?;
        for l in 0..self.ranks[0].layers().len() {
            // Attention: every rank's heads at once, then the all-reduce.
            let partials = std::thread::scope(|s| {
                let x = &x;
                let handles: Vec<_> = self
                    .ranks
                    .iter()
                    .zip(backends.iter_mut())
                    .zip(steps)
                    .map(|((m, b), step)| s.spawn(move || m.layers()[l].attention_out(x, step, l, b.as_mut(), plan)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a rank's thread panicked"))
                    .collect::<Result<Vec<_>>>()
            })?;
            all_reduce_into(&mut x, &partials)?;
            let partials = std::thread::scope(|s| {
                let x = &x;
                let handles: Vec<_> = self
                    .ranks
                    .iter()
                    .map(|m| s.spawn(move || m.layers()[l].mlp_out(x)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a rank's thread panicked"))
                    .collect::<Result<Vec<_>>>()
            })?;
            all_reduce_into(&mut x, &partials)?;
        }
        io.logits(&x)
    }
}

/// `x += sum of partials`, the partials summed first in rank order (as an
/// all-reduce hands every rank the same sum).
fn all_reduce_into(x: &mut Tensor, partials: &[Tensor]) -> Result<()> {
    let mut sum = ops::copy(&partials[0])?;
    for p in &partials[1..] {
        ops::add_(&mut sum, p)?;
    }
    Ok(ops::add_(x, &sum)?)
}
