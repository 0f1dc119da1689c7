//! The attention seam between a model and its KV cache: a model's layer
//! projects queries, keys and values, then hands them to an
//! [`AttentionBackend`], which stores K/V and attends (dense prefill, dense or
//! sparse decode) on its device. [`CpuAttention`] runs the host reference
//! over any [`HostReadable`] storage (host memory or the offload engine's
//! tiers); [`CudaAttention`](crate::CudaAttention) runs the GPU kernels over a
//! GPU-resident cache. The model code is the same for both.
//!
//! A forward pass is one [`Step`]: a chunk of one sequence's prompt, or one
//! token of each sequence of a decode batch. `begin_*` reserves the step's
//! positions (all or nothing) and builds its metadata once; every layer
//! then calls `write_kv` and `attend` with it.

use std::any::Any;
use std::borrow::Cow;

use asynctls_kernels::{Device, Tensor};
use asynctls_kvcache::{BlockTable, HostReadable, KvStorage, MemoryReport, PagedKvCache, SeqId};

use crate::error::shape_err;
use crate::{AttnError, AttnShape, DecodeReport, Policy, Result, SparseConfig};

/// How decode steps attend: the sparse configuration, and how many leading
/// layers stay dense (they carry little sparsity and much accuracy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionPlan {
    pub sparse: SparseConfig,
    pub dense_layers: usize,
}

impl AttentionPlan {
    pub fn dense() -> Self {
        AttentionPlan {
            sparse: SparseConfig {
                policy: Policy::Dense,
                ..SparseConfig::default()
            },
            dense_layers: 0,
        }
    }

    /// The configuration layer `layer` decodes with.
    pub fn for_layer(&self, layer: usize) -> Cow<'_, SparseConfig> {
        if layer < self.dense_layers && self.sparse.policy != Policy::Dense {
            Cow::Owned(SparseConfig {
                policy: Policy::Dense,
                ..self.sparse.clone()
            })
        } else {
            Cow::Borrowed(&self.sparse)
        }
    }
}

/// Accumulated accuracy and sparsity of measured decode steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionStats {
    pub recall_sum: f64,
    pub attended_sum: f64,
    /// Layer-steps measured.
    pub count: usize,
}

impl AttentionStats {
    /// Mean fraction of the dense softmax mass on the attended tokens.
    pub fn recall(&self) -> f64 {
        self.recall_sum / self.count.max(1) as f64
    }

    /// Mean fraction of the context each layer-step attended.
    pub fn attended_fraction(&self) -> f64 {
        self.attended_sum / self.count.max(1) as f64
    }

    /// Adds one layer's step: recall against a dense pass over the same cache.
    pub fn record<S: HostReadable>(
        &mut self,
        storage: &S,
        tables: &[&BlockTable],
        layer: usize,
        q: &[f32],
        shape: &AttnShape,
        report: &DecodeReport,
    ) {
        let probs = crate::metrics::dense_probabilities(storage, tables, layer, q, shape);
        let lens: Vec<usize> = tables.iter().map(|t| t.written(layer)).collect();
        self.recall_sum += crate::metrics::recall(report, &probs, shape);
        self.attended_sum += report.attended_fraction(&lens, shape.kv_heads);
        self.count += 1;
    }
}

/// What one forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Tokens `start..` of one sequence's prompt, attending causally.
    Prefill { seq: SeqId, start: usize },
    /// One new token of each sequence of `Step::seqs`.
    Decode,
    /// A prefill chunk and a decode batch in one forward (`Step::parts`):
    /// the chunk's rows first, then one row per decoding sequence. Layers
    /// hand it to [`AttentionBackend::write_step`] / [`AttentionBackend::attend_step`],
    /// which run each part through the backend.
    Mixed,
}

/// The two parts of a [`StepKind::Mixed`] step.
#[derive(Debug, Clone)]
pub struct MixedParts {
    pub prefill: Step,
    pub decode: Step,
}

/// One forward pass's metadata, built once and read by every layer.
#[derive(Debug, Clone)]
pub struct Step {
    pub kind: StepKind,
    /// The sequences of the step (one for a prefill chunk).
    pub seqs: Vec<SeqId>,
    /// The position of each token of the step.
    pub positions: Vec<usize>,
    /// The same positions as i32 on the backend's device (for RoPE).
    pub positions_tensor: Tensor,
    /// The parts of a [`StepKind::Mixed`] step (`None` otherwise).
    pub parts: Option<Box<MixedParts>>,
}

impl Step {
    pub fn tokens(&self) -> usize {
        self.positions.len()
    }

    /// A decode step of `seqs` at `positions`, whose device copy is
    /// `positions_tensor` (a persistent buffer under CUDA graphs).
    pub(crate) fn decode_at(seqs: &[SeqId], positions: Vec<usize>, positions_tensor: Tensor) -> Step {
        Step {
            kind: StepKind::Decode,
            seqs: seqs.to_vec(),
            positions,
            positions_tensor,
            parts: None,
        }
    }
}

/// A KV cache and the attention over it, on one device.
pub trait AttentionBackend: Send + std::fmt::Debug {
    fn device(&self) -> &Device;
    /// The cache's sequence bookkeeping (the same for every backend).
    fn sequences(&self) -> &dyn Sequences;
    fn sequences_mut(&mut self) -> &mut dyn Sequences;
    fn add_sequence(&mut self) -> SeqId {
        self.sequences_mut().add_sequence()
    }
    /// Drops a sequence and returns its blocks; the number freed.
    fn free(&mut self, seq: SeqId) -> Result<usize> {
        self.sequences_mut().free(seq)
    }
    /// A new sequence sharing every block of `seq`.
    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        self.sequences_mut().fork(seq)
    }
    /// Tokens reserved for `seq`.
    fn seq_len(&self, seq: SeqId) -> Result<usize> {
        self.sequences().seq_len(seq)
    }
    fn memory_report(&self) -> MemoryReport {
        self.sequences().memory_report()
    }
    /// Tells the backend that `seq` (not yet reserved in) will hold
    /// `tokens` positions: a tiered cache places it where that fits
    /// ([`crate::TieredAttention`]); the others ignore it.
    fn plan_sequence(&mut self, _seq: SeqId, _tokens: usize) {}
    /// Whether a new sequence of `tokens` positions would fit (a tiered
    /// cache: in one of its tiers); admission asks before it reserves.
    /// Others say yes and let their own block count decide.
    fn room_for(&self, _tokens: usize) -> bool {
        true
    }
    /// Reserves `n` more positions of `seq` (a prefill chunk), below `limit`.
    fn begin_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<Step>;
    /// Reserves one more position of every sequence, all or nothing.
    fn begin_decode(&mut self, seqs: &[SeqId], limit: usize) -> Result<Step>;
    /// Stores the step's K/V of `layer`: `keys` `[tokens, kv_heads *
    /// key_dim]`, `values` `[tokens, kv_heads * value_dim]` (unused for MLA).
    fn write_kv(&mut self, step: &Step, layer: usize, keys: &Tensor, values: &Tensor) -> Result<()>;
    /// The step's attention output of `layer` for `q` (`[tokens, q_heads *
    /// key_dim]`): `[tokens, q_heads * value_dim]`. Prefill is dense and
    /// causal; decode follows `sparse`.
    fn attend(
        &mut self,
        step: &Step,
        layer: usize,
        q: &Tensor,
        shape: &AttnShape,
        sparse: &SparseConfig,
    ) -> Result<Tensor>;
    /// Reserves `n` prompt positions of `seq` and one position of each of
    /// `seqs` as one step (a prefill chunk carried by a decode step, so
    /// the weights are read once for both): rows are the chunk's, then the
    /// batch's. A failure after the chunk's positions were reserved leaves
    /// them reserved; the caller frees the sequences, as after a failed step.
    fn begin_mixed(&mut self, seq: SeqId, n: usize, seqs: &[SeqId], limit: usize) -> Result<Step> {
        if seqs.contains(&seq) {
            return Err(AttnError::Config(format!(
                "{seq:?} cannot be prefilled and decoded in one step"
            )));
        }
        let prefill = self.begin_prefill(seq, n, limit)?;
        let decode = self.begin_decode(seqs, limit)?;
        let positions: Vec<usize> = prefill.positions.iter().chain(&decode.positions).copied().collect();
        let mut all_seqs = vec![seq];
        all_seqs.extend_from_slice(seqs);
        Ok(Step {
            kind: StepKind::Mixed,
            seqs: all_seqs,
            positions_tensor: positions_tensor(&positions, self.device())?,
            positions,
            parts: Some(Box::new(MixedParts { prefill, decode })),
        })
    }
    /// [`Self::write_kv`] of any step, a mixed one part by part.
    fn write_step(&mut self, step: &Step, layer: usize, keys: &Tensor, values: &Tensor) -> Result<()> {
        let Some(parts) = &step.parts else {
            return self.write_kv(step, layer, keys, values);
        };
        let (n, d) = (parts.prefill.tokens(), parts.decode.tokens());
        self.write_kv(&parts.prefill, layer, &rows_of(keys, 0, n)?, &rows_of(values, 0, n)?)?;
        self.write_kv(&parts.decode, layer, &rows_of(keys, n, d)?, &rows_of(values, n, d)?)
    }
    /// [`Self::attend`] of any step, a mixed one part by part (the chunk's
    /// attention dense and causal, the batch's following `sparse`).
    fn attend_step(
        &mut self,
        step: &Step,
        layer: usize,
        q: &Tensor,
        shape: &AttnShape,
        sparse: &SparseConfig,
    ) -> Result<Tensor> {
        let Some(parts) = &step.parts else {
            return self.attend(step, layer, q, shape, sparse);
        };
        let (n, d) = (parts.prefill.tokens(), parts.decode.tokens());
        let chunk = self.attend(&parts.prefill, layer, &rows_of(q, 0, n)?, shape, sparse)?;
        let batch = self.attend(&parts.decode, layer, &rows_of(q, n, d)?, shape, sparse)?;
        Ok(asynctls_kernels::ops::concat_rows(&chunk, &batch)?)
    }
    /// Makes the cache's memory resident now ([`KvStorage::commit_memory`]):
    /// a server calls it at start. A GPU cache is committed when allocated.
    fn commit_memory(&mut self) {}
    /// Starts (or stops) measuring recall and attended fraction of decode
    /// steps against a dense pass (for evaluation; the CPU path only).
    fn measure(&mut self, _on: bool) -> Result<()> {
        Err(AttnError::Config(format!(
            "attention statistics are not measured on {}",
            self.device()
        )))
    }
    fn stats(&self) -> Option<AttentionStats> {
        None
    }
    /// Reads served from resident slots and from the host tier since the
    /// last call, when the cache has a host tier.
    fn take_offload_reads(&mut self) -> Option<(usize, usize)> {
        None
    }
    /// Per offloaded layer (its index in the model), the residency's
    /// cumulative counters (hits, misses, promotions, evictions, bytes
    /// copied, overlap with the previous step), when the device keeps them
    /// (the GPU's offloaded cache). Synchronizes the device.
    fn offload_layer_stats(&self) -> Option<Vec<(usize, asynctls_offload::ResidencyStats)>> {
        None
    }
    /// Switches decode steps to persistent metadata so that they can be
    /// captured and replayed as CUDA graphs; `max_blocks` bounds the blocks
    /// a sequence may hold while graphs are used. Backends without graphs
    /// (the CPU) refuse.
    fn enable_graphs(&mut self, _max_blocks: usize) -> Result<()> {
        Err(AttnError::Config(format!("CUDA graphs on {}", self.device())))
    }
    /// Changes whenever a buffer a captured graph may read was replaced
    /// (scratch grown, persistent metadata reallocated, graphs re-enabled):
    /// graphs captured under another generation must not be replayed.
    fn graph_generation(&self) -> u64 {
        0
    }
    /// For code that still needs the concrete backend (GLM's host loops).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// What a backend's paged cache does for sequences, whatever its storage.
pub trait Sequences {
    fn add_sequence(&mut self) -> SeqId;
    fn free(&mut self, seq: SeqId) -> Result<usize>;
    fn fork(&mut self, seq: SeqId) -> Result<SeqId>;
    fn seq_len(&self, seq: SeqId) -> Result<usize>;
    fn memory_report(&self) -> MemoryReport;
    /// Reserves a prefill chunk of `n` positions below `limit`, all or
    /// nothing; its first position and all of them.
    fn reserve_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<(usize, Vec<usize>)>;
}

impl<S: KvStorage> Sequences for PagedKvCache<S> {
    fn add_sequence(&mut self) -> SeqId {
        PagedKvCache::add_sequence(self)
    }
    fn free(&mut self, seq: SeqId) -> Result<usize> {
        Ok(PagedKvCache::free(self, seq)?)
    }
    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        Ok(PagedKvCache::fork(self, seq)?)
    }
    fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.table(seq)?.len())
    }
    fn memory_report(&self) -> MemoryReport {
        PagedKvCache::memory_report(self)
    }
    fn reserve_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<(usize, Vec<usize>)> {
        let start = self.table(seq)?.len();
        check_positions(start + n, limit)?;
        Ok((start, self.reserve(seq, n)?.collect()))
    }
}

/// Positions `start..start + n` must fit the model's `limit`.
pub(crate) fn check_positions(end: usize, limit: usize) -> Result<()> {
    if end > limit {
        return Err(AttnError::ContextTooLong { end, limit });
    }
    Ok(())
}

/// Reserves one more position for every sequence of a decode batch, all or
/// nothing (a full pool fails before any write), and returns the positions.
pub fn reserve_decode<S: KvStorage>(cache: &mut PagedKvCache<S>, seqs: &[SeqId], limit: usize) -> Result<Vec<usize>> {
    let mut positions = Vec::with_capacity(seqs.len());
    for (i, &s) in seqs.iter().enumerate() {
        if seqs[..i].contains(&s) {
            return Err(shape_err("decode batch", "distinct sequences", format!("{s:?} twice")));
        }
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

fn positions_tensor(positions: &[usize], device: &Device) -> Result<Tensor> {
    let p: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    Ok(Tensor::from_vec(p, &[positions.len()])?.to_device(device)?)
}

pub(crate) fn make_step(kind: StepKind, seqs: Vec<SeqId>, positions: Vec<usize>, device: &Device) -> Result<Step> {
    let positions_tensor = positions_tensor(&positions, device)?;
    Ok(Step {
        kind,
        seqs,
        positions,
        positions_tensor,
        parts: None,
    })
}

/// Rows `start..start + n` of `t` as a tensor of its own (a view is not
/// enough for the GPU backend, which takes whole buffers).
fn rows_of(t: &Tensor, start: usize, n: usize) -> Result<Tensor> {
    Ok(asynctls_kernels::ops::copy(&t.narrow_rows(start, n)?)?)
}

/// The error of a backend handed a mixed step directly.
pub(crate) fn mixed_step_err() -> AttnError {
    AttnError::Config("a mixed step goes through write_step / attend_step, part by part".into())
}

/// The host reference: today's CPU prefill and decode over any storage the
/// CPU can read (host memory, or the offload engine's tiers).
#[derive(Debug)]
pub struct CpuAttention<S> {
    cache: PagedKvCache<S>,
    device: Device,
    stats: Option<AttentionStats>,
}

impl<S: HostReadable + std::fmt::Debug + 'static> CpuAttention<S> {
    pub fn new(cache: PagedKvCache<S>) -> Self {
        CpuAttention {
            cache,
            device: Device::Cpu,
            stats: None,
        }
    }

    pub fn cache(&self) -> &PagedKvCache<S> {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut PagedKvCache<S> {
        &mut self.cache
    }

    /// Tells the storage which blocks this step's sparse selection read in
    /// `layer`: the one-step-lag prediction of the next step's, which an
    /// offloading storage prefetches (host storage ignores it).
    fn hint_next_step(&mut self, seqs: &[SeqId], layer: usize, report: &DecodeReport, kv_heads: usize) -> Result<()> {
        if !self.cache.storage().takes_prefetch_hints() {
            return Ok(());
        }
        let mut blocks = Vec::new();
        for (i, head) in report.heads.iter().enumerate() {
            if head.dense {
                continue;
            }
            let table = self.cache.table(seqs[i / kv_heads])?;
            blocks.extend(head.blocks.iter().map(|&b| table.blocks()[b as usize]));
        }
        if blocks.is_empty() {
            return Ok(());
        }
        blocks.sort_unstable();
        blocks.dedup();
        self.cache.storage_mut().prefetch_hint(layer, &blocks);
        Ok(())
    }
}

fn cpu_f32(t: &Tensor) -> Result<&[f32]> {
    Ok(t.as_slice::<f32>()?)
}

impl<S: HostReadable + std::fmt::Debug + 'static> AttentionBackend for CpuAttention<S> {
    fn device(&self) -> &Device {
        &self.device
    }
    fn commit_memory(&mut self) {
        self.cache.storage_mut().commit_memory();
    }

    fn sequences(&self) -> &dyn Sequences {
        &self.cache
    }

    fn sequences_mut(&mut self) -> &mut dyn Sequences {
        &mut self.cache
    }

    fn begin_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<Step> {
        let (start, positions) = self.cache.reserve_prefill(seq, n, limit)?;
        make_step(StepKind::Prefill { seq, start }, vec![seq], positions, &self.device)
    }

    fn begin_decode(&mut self, seqs: &[SeqId], limit: usize) -> Result<Step> {
        let positions = reserve_decode(&mut self.cache, seqs, limit)?;
        make_step(StepKind::Decode, seqs.to_vec(), positions, &self.device)
    }

    fn write_kv(&mut self, step: &Step, layer: usize, keys: &Tensor, values: &Tensor) -> Result<()> {
        let (k, v) = (cpu_f32(keys)?, cpu_f32(values)?);
        match step.kind {
            StepKind::Mixed => return Err(mixed_step_err()),
            StepKind::Prefill { seq, start } => self.cache.write(seq, layer, start, k, v)?,
            StepKind::Decode => {
                let n = step.tokens().max(1);
                let (kw, vw) = (k.len() / n, v.len() / n);
                for (i, &s) in step.seqs.iter().enumerate() {
                    let value = if vw == 0 { &[][..] } else { &v[i * vw..(i + 1) * vw] };
                    self.cache
                        .write(s, layer, step.positions[i], &k[i * kw..(i + 1) * kw], value)?;
                }
            }
        }
        Ok(())
    }

    fn attend(
        &mut self,
        step: &Step,
        layer: usize,
        q: &Tensor,
        shape: &AttnShape,
        sparse: &SparseConfig,
    ) -> Result<Tensor> {
        let q = cpu_f32(q)?;
        let n = step.tokens();
        let mut out = vec![0.0; n * shape.q_heads * shape.value_dim];
        match step.kind {
            StepKind::Mixed => return Err(mixed_step_err()),
            StepKind::Prefill { seq, start } => {
                crate::prefill(
                    self.cache.storage(),
                    self.cache.table(seq)?,
                    layer,
                    start,
                    q,
                    shape,
                    &mut out,
                )?;
            }
            StepKind::Decode => {
                let tables = step
                    .seqs
                    .iter()
                    .map(|&s| self.cache.table(s))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let report = crate::decode(self.cache.storage(), &tables, layer, q, shape, sparse, &mut out)?;
                if let Some(stats) = self.stats.as_mut() {
                    stats.record(self.cache.storage(), &tables, layer, q, shape, &report);
                }
                drop(tables);
                self.hint_next_step(&step.seqs, layer, &report, shape.kv_heads)?;
            }
        }
        Ok(Tensor::from_vec(out, &[n, shape.q_heads * shape.value_dim])?)
    }

    fn measure(&mut self, on: bool) -> Result<()> {
        self.stats = on.then(AttentionStats::default);
        Ok(())
    }

    fn stats(&self) -> Option<AttentionStats> {
        self.stats
    }

    fn take_offload_reads(&mut self) -> Option<(usize, usize)> {
        self.cache.storage().take_offload_reads()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
