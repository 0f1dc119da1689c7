//! [`TieredAttention`]: two attention backends serving as one cache. A
//! sequence is placed, at its first reservation, in the first tier (on a
//! GPU: the resident cache, K/V whole in device memory) while that tier has
//! room for it, and in the second (the offloaded cache: K/V in pinned host
//! memory, resident slots on the device) beyond it, and stays there. A
//! decode step over a batch that spans both runs each tier's rows through
//! its own backend: the rows are gathered per tier and the outputs
//! scattered back, so the model sees one backend. So the GPU serves more
//! sequences than its memory holds whole, the ones that fit at full speed.
//!
//! Sequences are placed whole, at admission: one never moves between
//! tiers. A sequence's tier is the one with room for the tokens announced
//! by [`AttentionBackend::plan_sequence`] (prompt and new tokens), else for
//! its first reservation; when neither has room the reservation fails with
//! the second tier's clear error and nothing changes.

use std::any::Any;
use std::collections::HashMap;

use asynctls_kernels::{ops, Device, Tensor};
use asynctls_kvcache::{MemoryReport, SeqId};

use crate::backend::Sequences;
use crate::{AttentionBackend, AttentionStats, AttnError, AttnShape, Result, SparseConfig, Step, StepKind};

/// Where a sequence lives: its tier and its id there.
type Placement = (usize, SeqId);

/// One tier's share of the current decode step.
#[derive(Debug)]
struct DecodePart {
    tier: usize,
    step: Step,
    /// The step's rows this tier has (u32 on the device), `None` when it
    /// has them all (no gather or scatter).
    rows: Option<Tensor>,
}

/// Two backends as one cache (see the module doc).
#[derive(Debug)]
pub struct TieredAttention {
    tiers: [Box<dyn AttentionBackend>; 2],
    block_size: usize,
    /// Composite id -> placement (`None` until the first reservation).
    seqs: HashMap<SeqId, Option<Placement>>,
    next_id: u64,
    /// Tokens a sequence will hold, told before its first reservation.
    planned: HashMap<SeqId, usize>,
    /// Per tier, the blocks its placed sequences will hold (what they
    /// announced, or their first reservation), and each sequence's share.
    promised: [usize; 2],
    shares: HashMap<SeqId, usize>,
    prefill: Option<(usize, Step)>,
    decode: Vec<DecodePart>,
    /// In graph mode, each batch size's row tensors and positions stay at
    /// fixed addresses (written in place every step).
    graphs: bool,
    fixed: HashMap<FixedKey, Tensor>,
    generation: u64,
    /// The current decode step's split (per part: tier and rows, and
    /// whether it passes straight through) and its longest sequence: a
    /// captured step replays one split and one dense/sparse choice, so
    /// the split is part of the graph generation.
    split: Vec<(usize, usize, bool)>,
    longest: usize,
}

impl TieredAttention {
    /// `first` takes sequences while it has room, `second` the rest; both
    /// on one device, with blocks of `block_size` tokens.
    pub fn new(first: Box<dyn AttentionBackend>, second: Box<dyn AttentionBackend>, block_size: usize) -> Result<Self> {
        if first.device().to_string() != second.device().to_string() {
            return Err(AttnError::Config(format!(
                "tiers on {} and {}: both must be on one device",
                first.device(),
                second.device()
            )));
        }
        Ok(TieredAttention {
            tiers: [first, second],
            block_size: block_size.max(1),
            seqs: HashMap::new(),
            next_id: 0,
            planned: HashMap::new(),
            promised: [0; 2],
            shares: HashMap::new(),
            prefill: None,
            decode: Vec::new(),
            graphs: false,
            fixed: HashMap::new(),
            generation: 0,
            split: Vec::new(),
            longest: 0,
        })
    }

    /// The tier `seq` lives in (`None` before its first reservation).
    pub fn tier_of(&self, seq: SeqId) -> Result<Option<usize>> {
        Ok(self.placement(seq)?.map(|(t, _)| t))
    }

    /// The tiers, first (resident) then second (offloaded).
    pub fn tiers_mut(&mut self) -> &mut [Box<dyn AttentionBackend>; 2] {
        &mut self.tiers
    }

    /// Places `seq` for `tokens` positions (if it is not yet) and returns
    /// the backend of its tier and its id there: for writing a sequence's
    /// context straight into its tier (a benchmark's random K/V).
    pub fn tier_backend(
        &mut self,
        seq: SeqId,
        tokens: usize,
        tier: Option<usize>,
    ) -> Result<(&mut dyn AttentionBackend, SeqId)> {
        let (t, inner) = self.place_in(seq, tokens, tier)?;
        Ok((self.tiers[t].as_mut(), inner))
    }

    /// Undoes a placement whose first reservation was refused (nothing of
    /// the sequence stays in its tier).
    fn unplace(&mut self, seq: SeqId) {
        if let Some(Some((t, inner))) = self.seqs.get(&seq).copied() {
            let _ = self.tiers[t].free(inner);
            if let Some(share) = self.shares.remove(&seq) {
                self.promised[t] = self.promised[t].saturating_sub(share);
            }
            self.seqs.insert(seq, None);
        }
    }

    fn placement(&self, seq: SeqId) -> Result<Option<Placement>> {
        self.seqs
            .get(&seq)
            .copied()
            .ok_or(AttnError::Cache(asynctls_kvcache::CacheError::UnknownSequence(seq.0)))
    }

    /// Places `seq` (if it is not yet) for a first reservation of `n`
    /// tokens: the first tier when the blocks its sequences will hold leave
    /// room for the tokens this one will, else the second. Counting what the
    /// placed sequences announced (not what they hold yet) keeps a tier from
    /// running out while its sequences grow.
    fn place(&mut self, seq: SeqId, n: usize) -> Result<Placement> {
        self.place_in(seq, n, None)
    }

    /// Blocks a sequence of `tokens` is promised in a tier.
    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size) + 1
    }

    /// Blocks tier `t` has not promised to its sequences.
    fn room(&self, t: usize) -> usize {
        self.tiers[t]
            .memory_report()
            .blocks_total
            .saturating_sub(self.promised[t])
    }

    /// [`Self::place`], in `tier` when given (else by room).
    fn place_in(&mut self, seq: SeqId, n: usize, tier: Option<usize>) -> Result<Placement> {
        if let Some(p) = self.placement(seq)? {
            return Ok(p);
        }
        let tokens = self.planned.get(&seq).copied().unwrap_or(n).max(n);
        let blocks = self.blocks_for(tokens);
        let tier = tier.unwrap_or(if self.room(0) >= blocks { 0 } else { 1 }).min(1);
        let inner = self.tiers[tier].add_sequence();
        self.seqs.insert(seq, Some((tier, inner)));
        self.planned.remove(&seq);
        self.promised[tier] += blocks;
        self.shares.insert(seq, blocks);
        Ok((tier, inner))
    }

    fn new_id(&mut self, placement: Option<Placement>) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, placement);
        id
    }

    /// `data` as a tensor on the device: in graph mode at a fixed address
    /// per `key` (allocated once, bumping the generation, then written in
    /// place), so a replayed step reads this step's values.
    fn device_tensor<T: asynctls_kernels::WithDType>(&mut self, key: FixedKey, data: &[T]) -> Result<Tensor> {
        let device = self.tiers[0].device().clone();
        if !self.graphs {
            return Ok(Tensor::from_vec(data.to_vec(), &[data.len()])?.to_device(&device)?);
        }
        let t = match self.fixed.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                self.generation += 1;
                e.insert(Tensor::zeros_on(&[data.len()], T::DTYPE, &device)?)
            }
        };
        t.write_from_host(data)?;
        Ok(t.clone())
    }
}

/// The current prefill chunk's tier and its step there.
fn prefill_part<'a>(prefill: &'a Option<(usize, Step)>, op: &str) -> Result<(usize, &'a Step)> {
    prefill
        .as_ref()
        .map(|(t, step)| (*t, step))
        .ok_or_else(|| AttnError::Config(format!("{op} outside a step")))
}

/// What a fixed-address tensor of a graph-mode decode step holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FixedKey {
    /// A tier's rows (how many) of a batch of this size.
    Rows { batch: usize, tier: usize, count: usize },
    /// The positions of a batch of this size.
    Positions { batch: usize },
}

/// The rows `rows` of `t` (all of them when `None`); an empty-width tensor
/// (MLA's absent values) is narrowed on its own device.
fn pick(t: &Tensor, rows: Option<&Tensor>, count: usize) -> Result<Tensor> {
    match rows {
        None => Ok(t.clone()),
        Some(_) if t.elem_count() == 0 => Ok(Tensor::from_vec(Vec::<f32>::new(), &[count, 0])?),
        Some(r) => Ok(ops::gather_rows(t, r)?),
    }
}

impl Sequences for TieredAttention {
    fn add_sequence(&mut self) -> SeqId {
        self.new_id(None)
    }

    fn free(&mut self, seq: SeqId) -> Result<usize> {
        let placement = self.placement(seq)?;
        self.seqs.remove(&seq);
        self.planned.remove(&seq);
        if let (Some((t, _)), Some(share)) = (placement, self.shares.remove(&seq)) {
            self.promised[t] = self.promised[t].saturating_sub(share);
        }
        match placement {
            Some((t, inner)) => self.tiers[t].free(inner),
            None => Ok(0),
        }
    }

    /// A fork lives in its parent's tier (it shares the parent's blocks).
    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let placement = match self.placement(seq)? {
            Some((t, inner)) => Some((t, self.tiers[t].fork(inner)?)),
            None => None,
        };
        // Promised its parent's share again: it may outlive the parent and
        // grows blocks of its own, and over-promising keeps placement safe.
        let share = self.shares.get(&seq).copied();
        let id = self.new_id(placement);
        if let (Some((t, _)), Some(share)) = (placement, share) {
            self.promised[t] += share;
            self.shares.insert(id, share);
        }
        Ok(id)
    }

    fn seq_len(&self, seq: SeqId) -> Result<usize> {
        match self.placement(seq)? {
            Some((t, inner)) => self.tiers[t].seq_len(inner),
            None => Ok(0),
        }
    }

    /// Both tiers' blocks together (the per-token sizes are the first's).
    fn memory_report(&self) -> MemoryReport {
        let (a, b) = (self.tiers[0].memory_report(), self.tiers[1].memory_report());
        MemoryReport {
            blocks_used: a.blocks_used + b.blocks_used,
            blocks_total: a.blocks_total + b.blocks_total,
            storage_bytes: a.storage_bytes + b.storage_bytes,
            ..a
        }
    }

    fn reserve_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<(usize, Vec<usize>)> {
        let (t, inner) = self.place(seq, n)?;
        self.tiers[t].sequences_mut().reserve_prefill(inner, n, limit)
    }
}

impl AttentionBackend for TieredAttention {
    fn device(&self) -> &Device {
        self.tiers[0].device()
    }

    fn sequences(&self) -> &dyn Sequences {
        self
    }

    fn sequences_mut(&mut self) -> &mut dyn Sequences {
        self
    }

    /// Places the sequence now (its tier promised the blocks), so that
    /// [`AttentionBackend::room_for`] answers for the next one.
    fn plan_sequence(&mut self, seq: SeqId, tokens: usize) {
        if matches!(self.seqs.get(&seq), Some(None)) {
            self.planned.insert(seq, tokens);
            let _ = self.place(seq, tokens);
        }
    }

    fn begin_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<Step> {
        // Nothing reserved yet (placed by plan_sequence, or not at all).
        let fresh = Sequences::seq_len(self, seq)? == 0;
        let (t, inner) = self.place(seq, n)?;
        let step = match self.tiers[t].begin_prefill(inner, n, limit) {
            Ok(step) => step,
            Err(e) => {
                // A refused first reservation changes nothing.
                if fresh {
                    self.unplace(seq);
                }
                return Err(e);
            }
        };
        let StepKind::Prefill { start, .. } = step.kind else {
            return Err(AttnError::Config(
                "a tier began a prefill as another kind of step".into(),
            ));
        };
        let outer = Step {
            kind: StepKind::Prefill { seq, start },
            seqs: vec![seq],
            positions: step.positions.clone(),
            positions_tensor: step.positions_tensor.clone(),
            parts: None,
        };
        self.prefill = Some((t, step));
        Ok(outer)
    }

    /// Each tier reserves its sequences' positions (a failure in the second
    /// after the first reserved leaves the batch unusable, as a failed
    /// step does; the engine frees its sequences).
    fn begin_decode(&mut self, seqs: &[SeqId], limit: usize) -> Result<Step> {
        // The context limit is checked for every sequence before any tier
        // reserves (a tier running out of blocks after the other reserved
        // still leaves the batch unusable, as a failed step does).
        for &s in seqs {
            crate::backend::check_positions(Sequences::seq_len(self, s)? + 1, limit)?;
        }
        let mut by_tier: [(Vec<u32>, Vec<SeqId>); 2] = Default::default();
        for (row, &s) in seqs.iter().enumerate() {
            let (t, inner) = self
                .placement(s)?
                .ok_or_else(|| AttnError::Config(format!("{s:?} decodes before anything was prefilled into it")))?;
            by_tier[t].0.push(row as u32);
            by_tier[t].1.push(inner);
        }
        let mut positions = vec![0usize; seqs.len()];
        let mut parts = Vec::with_capacity(2);
        for (t, (rows, inner)) in by_tier.into_iter().enumerate() {
            if inner.is_empty() {
                continue;
            }
            let step = self.tiers[t].begin_decode(&inner, limit)?;
            for (&row, &p) in rows.iter().zip(&step.positions) {
                positions[row as usize] = p;
            }
            let rows = if rows.len() == seqs.len() {
                None
            } else {
                let key = FixedKey::Rows {
                    batch: seqs.len(),
                    tier: t,
                    count: rows.len(),
                };
                Some(self.device_tensor(key, &rows)?)
            };
            parts.push(DecodePart { tier: t, step, rows });
        }
        self.split = parts
            .iter()
            .map(|p| (p.tier, p.step.tokens(), p.rows.is_none()))
            .collect();
        self.longest = positions.iter().map(|&p| p + 1).max().unwrap_or(0);
        self.decode = parts;
        let single = match self.decode.as_slice() {
            [only] if only.rows.is_none() => Some(only.step.positions_tensor.clone()),
            _ => None,
        };
        let positions_tensor = match single {
            Some(t) => t,
            None => {
                let p: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
                self.device_tensor(FixedKey::Positions { batch: seqs.len() }, &p)?
            }
        };
        Ok(Step::decode_at(seqs, positions, positions_tensor))
    }

    fn write_kv(&mut self, step: &Step, layer: usize, keys: &Tensor, values: &Tensor) -> Result<()> {
        match step.kind {
            StepKind::Mixed => Err(crate::backend::mixed_step_err()),
            StepKind::Prefill { .. } => {
                let (t, inner) = prefill_part(&self.prefill, "write_kv")?;
                self.tiers[t].write_kv(inner, layer, keys, values)
            }
            StepKind::Decode => {
                for part in &self.decode {
                    let n = part.step.tokens();
                    let (k, v) = (pick(keys, part.rows.as_ref(), n)?, pick(values, part.rows.as_ref(), n)?);
                    self.tiers[part.tier].write_kv(&part.step, layer, &k, &v)?;
                }
                Ok(())
            }
        }
    }

    fn attend(
        &mut self,
        step: &Step,
        layer: usize,
        q: &Tensor,
        shape: &AttnShape,
        sparse: &SparseConfig,
    ) -> Result<Tensor> {
        match step.kind {
            StepKind::Mixed => Err(crate::backend::mixed_step_err()),
            StepKind::Prefill { .. } => {
                let (t, inner) = prefill_part(&self.prefill, "attend")?;
                self.tiers[t].attend(inner, layer, q, shape, sparse)
            }
            StepKind::Decode => {
                // On a GPU a step is dense or sparse as a whole (by its
                // longest sequence, as DecodeGraphs keys its graphs), not
                // tier by tier; the CPU decides per sequence either way.
                let step_wide;
                let sparse = if self.tiers[0].device().is_cuda() && self.longest >= sparse.dense_below {
                    step_wide = SparseConfig {
                        dense_below: 0,
                        ..sparse.clone()
                    };
                    &step_wide
                } else {
                    sparse
                };
                if let [only] = self.decode.as_slice() {
                    if only.rows.is_none() {
                        return self.tiers[only.tier].attend(&only.step, layer, q, shape, sparse);
                    }
                }
                let width = shape.q_heads * shape.value_dim;
                let mut out = Tensor::zeros_on(&[step.tokens(), width], asynctls_kernels::DType::F32, &q.device())?;
                for part in &self.decode {
                    let rows = part
                        .rows
                        .as_ref()
                        .ok_or_else(|| AttnError::Config("a tier's rows of a split step".into()))?;
                    let q_part = ops::gather_rows(q, rows)?;
                    let o = self.tiers[part.tier].attend(&part.step, layer, &q_part, shape, sparse)?;
                    ops::scatter_rows(&mut out, rows, &o)?;
                }
                Ok(out)
            }
        }
    }

    fn measure(&mut self, on: bool) -> Result<()> {
        self.tiers[0].measure(on)?;
        self.tiers[1].measure(on)
    }

    /// Both tiers' statistics together.
    fn stats(&self) -> Option<AttentionStats> {
        match (self.tiers[0].stats(), self.tiers[1].stats()) {
            (Some(a), Some(b)) => Some(AttentionStats {
                recall_sum: a.recall_sum + b.recall_sum,
                attended_sum: a.attended_sum + b.attended_sum,
                count: a.count + b.count,
            }),
            (a, b) => a.or(b),
        }
    }

    /// Whether a sequence of `tokens` has room in a tier (by what the
    /// tiers promised their sequences): what admission asks first.
    fn room_for(&self, tokens: usize) -> bool {
        let blocks = self.blocks_for(tokens);
        self.room(0) >= blocks || self.room(1) >= blocks
    }

    fn commit_memory(&mut self) {
        for tier in &mut self.tiers {
            tier.commit_memory();
        }
    }

    fn take_offload_reads(&mut self) -> Option<(usize, usize)> {
        let (a, b) = (self.tiers[0].take_offload_reads(), self.tiers[1].take_offload_reads());
        match (a, b) {
            (Some(x), Some(y)) => Some((x.0 + y.0, x.1 + y.1)),
            (x, y) => x.or(y),
        }
    }

    /// The offloaded tier's (a resident tier keeps none).
    fn offload_layer_stats(&self) -> Option<Vec<(usize, asynctls_offload::ResidencyStats)>> {
        self.tiers[1]
            .offload_layer_stats()
            .or_else(|| self.tiers[0].offload_layer_stats())
    }

    fn enable_graphs(&mut self, max_blocks: usize) -> Result<()> {
        self.tiers[0].enable_graphs(max_blocks)?;
        self.tiers[1].enable_graphs(max_blocks)?;
        self.graphs = true;
        self.fixed.clear();
        self.generation += 1;
        Ok(())
    }

    fn graph_generation(&self) -> u64 {
        // Any tier's buffers replaced, or this backend's row tensors.
        let mix = |h: u64, v: u64| (h ^ v).wrapping_mul(0x100_0000_01b3);
        // And the current step's split (tiers, rows, pass-through): a
        // captured step replays one split.
        let split = self.split.iter().fold(0u64, |h, &(t, n, whole)| {
            mix(h, (t as u64) << 40 | (n as u64) << 1 | whole as u64)
        });
        [
            self.tiers[0].graph_generation(),
            self.tiers[1].graph_generation(),
            self.generation,
            split,
        ]
        .into_iter()
        .fold(0xcbf2_9ce4_8422_2325, mix)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
