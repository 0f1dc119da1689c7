//! The offload engine behind asynctls-kvcache's storage trait, for the CPU
//! decode: [`OffloadedStorage`] keeps the full cache in a host tier (a
//! [`HostKvStorage`]) and copies of the units the engine holds resident in
//! slots, so `asynctls_attn::decode` runs unchanged over it. It mirrors the
//! GPU path: block bounds and labels are read where they are (the selection
//! needs all of them), K/V rows come from a slot when the unit is resident
//! (a hit) and from the host tier in place otherwise (a miss served on the
//! critical path), `prefetch_hint` moves the predicted blocks in, and
//! writes go through to the host tier and to a resident copy.

use std::sync::atomic::{AtomicUsize, Ordering};

use asynctls_kvcache::{
    BlockId, CacheConfig, HostKvStorage, HostReadable, KvSlice, KvStorage, Result as CacheResult, Rows,
};
use half::f16;

use crate::{OffloadEngine, Result, Slot, StepTiming, TransferBackend, Unit};

/// Host tier plus resident copies (f32, exact for bf16 caches), moved
/// synchronously: the CPU twin of the CUDA backend's copy engine.
#[derive(Debug)]
pub struct ResidentCopies {
    host: HostKvStorage,
    slots: usize,
    /// Per layer `[slots, block_size, key_dim]`.
    keys: Vec<Vec<f32>>,
    /// Per layer `[slots, block_size, value_dim]` (GQA only).
    values: Vec<Vec<f32>>,
}

impl ResidentCopies {
    fn separate_values(&self) -> bool {
        self.host.config().value_bytes_per_head() > 0
    }

    fn copy_in(&mut self, layer: usize, unit: Unit, slot: Slot) {
        let c = self.host.config().clone();
        let (bs, kd, vd) = (c.block_size, c.key_dim, c.value_dim());
        let block = BlockId(unit.block);
        let head = unit.head as usize;
        let keys = self.host.keys(layer, block, head);
        let dst = &mut self.keys[layer][slot as usize * bs * kd..(slot as usize + 1) * bs * kd];
        for (i, row) in dst.chunks_exact_mut(kd).enumerate() {
            keys.read(i, row);
        }
        if self.separate_values() {
            let values = self.host.values(layer, block, head);
            let dst = &mut self.values[layer][slot as usize * bs * vd..(slot as usize + 1) * bs * vd];
            for (i, row) in dst.chunks_exact_mut(vd).enumerate() {
                values.read(i, row);
            }
        }
    }
}

impl TransferBackend for ResidentCopies {
    type Ticket = ();

    fn num_layers(&self) -> usize {
        self.host.config().num_layers
    }
    fn kv_heads(&self) -> usize {
        self.host.config().kv_heads
    }
    fn host_blocks(&self) -> usize {
        self.host.config().num_blocks
    }
    fn slots_per_layer(&self) -> usize {
        self.slots
    }
    fn unit_bytes(&self) -> usize {
        self.host.config().kv_bytes_per_head() * self.host.config().block_size
    }
    fn fetch(&mut self, layer: usize, copies: &[(Unit, Slot)]) -> Result<()> {
        for &(unit, slot) in copies {
            self.copy_in(layer, unit, slot);
        }
        Ok(())
    }
    fn flush(&mut self, _layer: usize, _copies: &[(Slot, Unit)]) -> Result<()> {
        // Writes go through to the host tier already.
        Ok(())
    }
    fn is_complete(&mut self, _ticket: &()) -> Result<bool> {
        Ok(true)
    }
    fn order_before_compute(&mut self, _ticket: &()) -> Result<()> {
        Ok(())
    }
    fn reads_done(&mut self, _layer: usize) -> Result<()> {
        Ok(())
    }
    fn finish_step(&mut self) -> Result<StepTiming> {
        Ok(StepTiming::default())
    }
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A cache storage whose K/V rows are read from resident slots when the
/// offload engine holds them, and from the host tier otherwise.
#[derive(Debug)]
pub struct OffloadedStorage {
    engine: OffloadEngine<ResidentCopies>,
    hits: AtomicUsize,
    misses: AtomicUsize,
}

impl OffloadedStorage {
    /// `host` holds the whole cache; `slots_per_layer` units per layer are
    /// kept resident.
    pub fn new(host: HostKvStorage, slots_per_layer: usize) -> Self {
        let c = host.config().clone();
        let value_len = if c.value_bytes_per_head() > 0 {
            slots_per_layer * c.block_size * c.value_dim()
        } else {
            0
        };
        let backend = ResidentCopies {
            keys: vec![vec![0.0; slots_per_layer * c.block_size * c.key_dim]; c.num_layers],
            values: vec![vec![0.0; value_len]; c.num_layers],
            slots: slots_per_layer,
            host,
        };
        OffloadedStorage {
            engine: OffloadEngine::new(backend),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
        }
    }

    /// Key reads (one per attended token and head) served from resident
    /// slots and from the host tier since the last call: `(hits, misses)`.
    pub fn take_reads(&self) -> (usize, usize) {
        (
            self.hits.swap(0, Ordering::Relaxed),
            self.misses.swap(0, Ordering::Relaxed),
        )
    }

    pub fn engine(&self) -> &OffloadEngine<ResidentCopies> {
        &self.engine
    }

    fn host(&self) -> &HostKvStorage {
        &self.engine.backend().host
    }

    fn resident_rows(&self, layer: usize, block: BlockId, head: usize, values: bool) -> Option<Rows<'_>> {
        let slot = self.engine.slot_of(layer, Unit::new(block.0, head as u16))? as usize;
        let c = self.host().config();
        let backend = self.engine.backend();
        let (pool, width) = if values && backend.separate_values() {
            (&backend.values[layer], c.value_dim())
        } else {
            (&backend.keys[layer], c.key_dim)
        };
        let stride = width;
        let data = &pool[slot * c.block_size * width..(slot + 1) * c.block_size * width];
        let shown = if values { c.value_dim() } else { c.key_dim };
        Some(Rows::new(KvSlice::F32(data), stride, shown))
    }

    fn count(&self, hit: bool) {
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keeps a resident copy in step with a write to the host tier.
    fn refresh(&mut self, layer: usize, block: BlockId) {
        let heads = self.host().config().kv_heads;
        for head in 0..heads {
            let unit = Unit::new(block.0, head as u16);
            if let Some(slot) = self.engine.slot_of(layer, unit) {
                self.engine.backend_mut().copy_in(layer, unit, slot);
            }
        }
    }
}

impl KvStorage for OffloadedStorage {
    fn config(&self) -> &CacheConfig {
        self.host().config()
    }

    fn write_token(
        &mut self,
        layer: usize,
        block: BlockId,
        slot: usize,
        key: &[f32],
        value: &[f32],
    ) -> CacheResult<()> {
        self.engine
            .backend_mut()
            .host
            .write_token(layer, block, slot, key, value)?;
        self.refresh(layer, block);
        Ok(())
    }

    fn copy_block(&mut self, src: BlockId, dst: BlockId, tokens: usize) -> CacheResult<()> {
        self.engine.backend_mut().host.copy_block(src, dst, tokens)?;
        for layer in 0..self.host().config().num_layers {
            self.refresh(layer, dst);
        }
        Ok(())
    }

    fn takes_prefetch_hints(&self) -> bool {
        true
    }

    /// Moves the blocks the next step of `layer` is predicted to read (all
    /// heads) into resident slots; what does not fit stays a miss.
    fn prefetch_hint(&mut self, layer: usize, blocks: &[BlockId]) {
        let heads = self.host().config().kv_heads;
        let units: Vec<Unit> = blocks
            .iter()
            .flat_map(|b| (0..heads).map(move |h| Unit::new(b.0, h as u16)))
            .collect();
        self.engine.begin_step();
        // The hinted blocks are the ones this step's selection read: after
        // the prefetch has placed them, mark them selected, so eviction ranks
        // by recent selection (without this every resident unit looked
        // never-selected and the policy fell back to first-in-first-out).
        // Best effort by contract: a unit outside the pool is a caller bug
        // the cache's own checks already exclude.
        let _ = self.engine.prefetch(layer, &units);
        let _ = self.engine.account(layer, &units);
    }

    fn commit_memory(&mut self) {
        // The host tier: the resident copies are a few slots per layer.
        self.engine.backend_mut().host.commit_memory();
    }
    fn allocated_bytes(&self) -> usize {
        let b = self.engine.backend();
        self.host().allocated_bytes()
            + b.keys.iter().map(|k| k.len() * 4).sum::<usize>()
            + b.values.iter().map(|v| v.len() * 4).sum::<usize>()
    }
}

impl HostReadable for OffloadedStorage {
    fn keys(&self, layer: usize, block: BlockId, head: usize) -> Rows<'_> {
        match self.resident_rows(layer, block, head, false) {
            Some(rows) => {
                self.count(true);
                rows
            }
            None => {
                self.count(false);
                self.host().keys(layer, block, head)
            }
        }
    }

    fn values(&self, layer: usize, block: BlockId, head: usize) -> Rows<'_> {
        match self.resident_rows(layer, block, head, true) {
            Some(rows) => rows,
            None => self.host().values(layer, block, head),
        }
    }

    fn key_bounds(&self, layer: usize, block: BlockId, head: usize) -> (&[f32], &[f32]) {
        self.host().key_bounds(layer, block, head)
    }

    fn labels(&self, layer: usize, block: BlockId, head: usize) -> (&[u8], &[[f16; 2]]) {
        self.host().labels(layer, block, head)
    }

    fn label_channels(&self, layer: usize, head: usize) -> &[u16] {
        self.host().label_channels(layer, head)
    }
}

/// The storage a model's cache uses, chosen by configuration: everything in
/// host memory, or a host tier with resident slots behind the offload engine.
#[derive(Debug)]
pub enum KvStore {
    Host(HostKvStorage),
    // Boxed: the engine's bookkeeping makes this variant twice the other's size.
    Offloaded(Box<OffloadedStorage>),
}

impl KvStore {
    /// `resident_slots`: `None` keeps everything in `host`; `Some(n)` puts
    /// the offload engine in front of it with `n` resident units per layer.
    pub fn new(host: HostKvStorage, resident_slots: Option<usize>) -> Self {
        match resident_slots {
            None => KvStore::Host(host),
            Some(n) => KvStore::Offloaded(Box::new(OffloadedStorage::new(host, n))),
        }
    }

    /// The offloaded storage, if this is one.
    pub fn offloaded(&self) -> Option<&OffloadedStorage> {
        match self {
            KvStore::Offloaded(o) => Some(o),
            KvStore::Host(_) => None,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            KvStore::Host($s) => $e,
            KvStore::Offloaded($s) => $e,
        }
    };
}

impl KvStorage for KvStore {
    fn config(&self) -> &CacheConfig {
        delegate!(self, s => s.config())
    }
    fn write_token(
        &mut self,
        layer: usize,
        block: BlockId,
        slot: usize,
        key: &[f32],
        value: &[f32],
    ) -> CacheResult<()> {
        delegate!(self, s => s.write_token(layer, block, slot, key, value))
    }
    fn copy_block(&mut self, src: BlockId, dst: BlockId, tokens: usize) -> CacheResult<()> {
        delegate!(self, s => s.copy_block(src, dst, tokens))
    }
    fn prefetch_hint(&mut self, layer: usize, blocks: &[BlockId]) {
        delegate!(self, s => s.prefetch_hint(layer, blocks))
    }
    fn takes_prefetch_hints(&self) -> bool {
        delegate!(self, s => s.takes_prefetch_hints())
    }
    fn allocated_bytes(&self) -> usize {
        delegate!(self, s => s.allocated_bytes())
    }
    fn commit_memory(&mut self) {
        delegate!(self, s => s.commit_memory())
    }
    fn take_offload_reads(&self) -> Option<(usize, usize)> {
        self.offloaded().map(|o| o.take_reads())
    }
}

impl HostReadable for KvStore {
    fn keys(&self, layer: usize, block: BlockId, head: usize) -> Rows<'_> {
        delegate!(self, s => s.keys(layer, block, head))
    }
    fn values(&self, layer: usize, block: BlockId, head: usize) -> Rows<'_> {
        delegate!(self, s => s.values(layer, block, head))
    }
    fn key_bounds(&self, layer: usize, block: BlockId, head: usize) -> (&[f32], &[f32]) {
        delegate!(self, s => s.key_bounds(layer, block, head))
    }
    fn labels(&self, layer: usize, block: BlockId, head: usize) -> (&[u8], &[[f16; 2]]) {
        delegate!(self, s => s.labels(layer, block, head))
    }
    fn label_channels(&self, layer: usize, head: usize) -> &[u16] {
        delegate!(self, s => s.label_channels(layer, head))
    }
}
