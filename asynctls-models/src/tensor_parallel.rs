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
            let x_ref = &x;
            let work = self.ranks.iter().zip(backends.iter_mut()).zip(steps);
            let partials = on_every_rank(work, |((m, b), step)| {
                m.layers()[l].attention_out(x_ref, step, l, b.as_mut(), plan)
            })?;
            all_reduce_into(&mut x, &partials)?;
            let x_ref = &x;
            let partials = on_every_rank(self.ranks.iter(), |m| m.layers()[l].mlp_out(x_ref))?;
            all_reduce_into(&mut x, &partials)?;
        }
        io.logits(&x)
    }
}

/// `f` of each rank's `work` on a thread of its own; the results in rank order.
fn on_every_rank<T: Send, R: Send>(work: impl Iterator<Item = T>, f: impl Fn(T) -> Result<R> + Sync) -> Result<Vec<R>> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = work.map(|w| s.spawn(move || f(w))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank's thread panicked"))
            .collect()
    })
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

/// The backends of a tensor-parallel model's ranks, as the one backend the
/// engine holds: sequences are added, forked and freed on every rank at
/// once (so their ids agree); the steps themselves are driven by
/// [`TensorParallelGqa`], which hands each rank its own backend.
#[derive(Debug)]
pub struct RankBackends {
    ranks: Vec<Box<dyn AttentionBackend>>,
    device: Device,
}

impl RankBackends {
    fn driven_by_the_model() -> asynctls_attn::AttnError {
        asynctls_attn::AttnError::Config("a tensor-parallel backend is driven by its model's ranks".into())
    }
}

impl AttentionBackend for RankBackends {
    fn device(&self) -> &Device {
        &self.device
    }
    fn commit_memory(&mut self) {
        for rank in &mut self.ranks {
            rank.commit_memory();
        }
    }
    fn sequences(&self) -> &dyn asynctls_attn::Sequences {
        self.ranks[0].sequences()
    }
    fn sequences_mut(&mut self) -> &mut dyn asynctls_attn::Sequences {
        self.ranks[0].sequences_mut()
    }
    /// The whole model's cache: each rank holds its KV heads' share of every
    /// block, so the per-token sizes and the storage add up across ranks;
    /// the block counts are every rank's (their tables agree).
    fn memory_report(&self) -> asynctls_kvcache::MemoryReport {
        let mut total = self.ranks[0].memory_report();
        for rank in &self.ranks[1..] {
            let r = rank.memory_report();
            total.key_bytes_per_token += r.key_bytes_per_token;
            total.value_bytes_per_token += r.value_bytes_per_token;
            total.metadata_bytes_per_token += r.metadata_bytes_per_token;
            total.label_bytes_per_token += r.label_bytes_per_token;
            total.storage_bytes += r.storage_bytes;
        }
        total
    }
    fn add_sequence(&mut self) -> SeqId {
        let ids: Vec<SeqId> = self.ranks.iter_mut().map(|b| b.add_sequence()).collect();
        debug_assert!(ids.windows(2).all(|w| w[0] == w[1]), "ranks' sequence ids diverged");
        ids[0]
    }
    fn free(&mut self, seq: SeqId) -> asynctls_attn::Result<usize> {
        let mut freed = 0;
        for (r, b) in self.ranks.iter_mut().enumerate() {
            let n = b.free(seq)?;
            if r == 0 {
                freed = n;
            }
        }
        Ok(freed)
    }
    fn fork(&mut self, seq: SeqId) -> asynctls_attn::Result<SeqId> {
        let mut ids = Vec::with_capacity(self.ranks.len());
        for b in self.ranks.iter_mut() {
            ids.push(b.fork(seq)?);
        }
        Ok(ids[0])
    }
    fn begin_prefill(&mut self, _seq: SeqId, _n: usize, _limit: usize) -> asynctls_attn::Result<asynctls_attn::Step> {
        Err(Self::driven_by_the_model())
    }
    fn begin_decode(&mut self, _seqs: &[SeqId], _limit: usize) -> asynctls_attn::Result<asynctls_attn::Step> {
        Err(Self::driven_by_the_model())
    }
    fn write_kv(
        &mut self,
        _step: &asynctls_attn::Step,
        _layer: usize,
        _keys: &Tensor,
        _values: &Tensor,
    ) -> asynctls_attn::Result<()> {
        Err(Self::driven_by_the_model())
    }
    fn attend(
        &mut self,
        _step: &asynctls_attn::Step,
        _layer: usize,
        _q: &Tensor,
        _shape: &asynctls_attn::AttnShape,
        _sparse: &asynctls_attn::SparseConfig,
    ) -> asynctls_attn::Result<Tensor> {
        Err(Self::driven_by_the_model())
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

fn rank_backends(backend: &mut dyn AttentionBackend) -> Result<&mut RankBackends> {
    backend
        .as_any_mut()
        .downcast_mut::<RankBackends>()
        .ok_or_else(|| ModelError::Unsupported("a tensor-parallel model over another model's backend".into()))
}

/// The engine's view: every rank's shard behind one model and one backend.
impl crate::CausalLm for TensorParallelGqa {
    fn vocab_size(&self) -> usize {
        TensorParallelGqa::vocab_size(self)
    }
    fn max_positions(&self) -> usize {
        self.ranks[0].config().max_position_embeddings
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.ranks[0].config().eos_token_ids.clone()
    }
    fn device(&self) -> &Device {
        self.ranks[0].device()
    }
    /// One rank's cache (its share of the KV heads).
    fn cache_config(&self, num_blocks: usize, kv_dtype: KvDType) -> asynctls_kvcache::CacheConfig {
        self.ranks[0].cache_config(num_blocks, kv_dtype)
    }
    /// Channels for the whole model's KV heads, each rank taking its own.
    fn set_label_channels(&mut self, channels: asynctls_kvcache::LabelChannels) {
        let c = self.ranks[0].cache_config(1, KvDType::F32);
        for (r, m) in self.ranks.iter_mut().enumerate() {
            let own = (0..c.num_layers)
                .map(|l| {
                    (0..c.kv_heads)
                        .map(|h| channels.get(l, r * c.kv_heads + h).to_vec())
                        .collect()
                })
                .collect();
            m.set_label_channels(asynctls_kvcache::LabelChannels::new(own));
        }
    }
    fn new_backend(
        &self,
        num_blocks: usize,
        kv_dtype: KvDType,
        offload: Option<asynctls_attn::OffloadOptions>,
    ) -> Result<Box<dyn AttentionBackend>> {
        if offload.is_some() {
            return Err(ModelError::Unsupported("--offload-slots with --tensor-parallel".into()));
        }
        Ok(Box::new(RankBackends {
            ranks: self.new_backends(num_blocks, kv_dtype)?,
            device: Device::Cpu,
        }))
    }
    fn prefill(
        &self,
        backend: &mut dyn AttentionBackend,
        seq: SeqId,
        tokens: &[u32],
        all_logits: bool,
        chunk: usize,
    ) -> Result<Tensor> {
        let io = self.ranks[0].io();
        crate::decoder::guarded_prefill(io, self.max_positions(), backend, seq, tokens, |backend| {
            let ranks = rank_backends(backend)?;
            let vocab = self.vocab_size();
            let mut all = Vec::new();
            let mut last = Vec::new();
            for part in tokens.chunks(chunk.max(1)) {
                let logits = TensorParallelGqa::prefill(self, &mut ranks.ranks, seq, part)?.to_f32_vec()?;
                last = logits[logits.len() - vocab..].to_vec();
                if all_logits {
                    all.extend(logits);
                }
            }
            if all_logits {
                Ok(Tensor::from_vec(all, &[tokens.len(), vocab])?)
            } else {
                Ok(Tensor::from_vec(last, &[1, vocab])?)
            }
        })
    }
    fn decode_step(
        &self,
        backend: &mut dyn AttentionBackend,
        seqs: &[SeqId],
        ids: &Tensor,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let ids = ids.to_vec::<u32>()?;
        let ranks = rank_backends(backend)?;
        self.decode(&mut ranks.ranks, seqs, &ids, plan)
    }
    fn decode_greedy(
        &self,
        backend: &mut dyn AttentionBackend,
        seqs: &[SeqId],
        ids: &[u32],
        plan: &AttentionPlan,
        _graphs: &mut crate::DecodeGraphs,
    ) -> Result<Vec<u32>> {
        let ranks = rank_backends(backend)?;
        let logits = self.decode(&mut ranks.ranks, seqs, ids, plan)?;
        Ok(ops::argmax(&logits)?.to_vec::<u32>()?)
    }
}
