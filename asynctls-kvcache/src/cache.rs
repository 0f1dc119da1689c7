//! Sequences over the block pool: block tables, appends, forks, frees, and
//! the memory report.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::storage::KvStorage;
use crate::{BlockAllocator, BlockId, CacheConfig, CacheError, Result};

/// A sequence's handle in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// The logical-to-physical map of one sequence.
#[derive(Debug, Clone, Default)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    /// Tokens reserved (positions `0..len` are addressable).
    len: usize,
    /// Per layer, how many tokens have been written (writes are in order).
    written: Vec<usize>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens written so far in `layer`.
    pub fn written(&self, layer: usize) -> usize {
        self.written[layer]
    }
}

/// Bytes each part of the cache holds per token (all layers, all KV heads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReport {
    pub key_bytes_per_token: usize,
    pub value_bytes_per_token: usize,
    /// Block max/min, amortized over the block (f32 here).
    pub metadata_bytes_per_token: f64,
    /// INT4 labels plus their f16 scale and zero.
    pub label_bytes_per_token: usize,
    pub blocks_used: usize,
    pub blocks_total: usize,
    pub storage_bytes: usize,
}

impl MemoryReport {
    pub fn kv_bytes_per_token(&self) -> usize {
        self.key_bytes_per_token + self.value_bytes_per_token
    }
}

/// Writes of `layer` must continue where its last write stopped and stay
/// within the reserved positions.
fn check_write_order(seq: SeqId, layer: usize, table: &BlockTable, start: usize, n: usize) -> Result<()> {
    if start != table.written[layer] || start.checked_add(n).is_none_or(|end| end > table.len) {
        return Err(CacheError::OutOfOrderWrite {
            seq: seq.0,
            layer,
            expected: table.written[layer],
            got: start,
            len: table.len,
        });
    }
    Ok(())
}

/// A paged KV cache: one block pool shared by every sequence, with block
/// metadata and labels maintained on every write.
#[derive(Debug)]
pub struct PagedKvCache<S> {
    config: CacheConfig,
    allocator: BlockAllocator,
    tables: BTreeMap<SeqId, BlockTable>,
    next_id: u64,
    storage: S,
}

impl<S: KvStorage> PagedKvCache<S> {
    pub fn new(storage: S) -> Result<Self> {
        let config = storage.config().clone();
        config.validate()?;
        Ok(PagedKvCache {
            allocator: BlockAllocator::new(config.num_blocks, config.block_size),
            config,
            tables: BTreeMap::new(),
            next_id: 0,
            storage,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.tables.insert(
            id,
            BlockTable {
                written: vec![0; self.config.num_layers],
                ..BlockTable::default()
            },
        );
        id
    }

    pub fn table(&self, seq: SeqId) -> Result<&BlockTable> {
        self.tables.get(&seq).ok_or(CacheError::UnknownSequence(seq.0))
    }

    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.tables.keys().copied()
    }

    /// Reserves `n` more positions for `seq`, allocating blocks as needed.
    /// All or nothing: when the pool cannot hold them, nothing changes and
    /// the error says how many blocks were missing. A partial last block
    /// shared with a fork is copied first (copy-on-write).
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<Range<usize>> {
        let bs = self.config.block_size;
        let table = self.tables.get(&seq).ok_or(CacheError::UnknownSequence(seq.0))?;
        let start = table.len;
        let end = start + n;
        let have = table.blocks.len();
        let need_total = end.div_ceil(bs);
        let shared_partial = start % bs != 0
            && n > 0
            && self
                .allocator
                .ref_count(*table.blocks.last().expect("partial block exists"))
                > 1;
        let new_blocks = need_total.saturating_sub(have) + usize::from(shared_partial);
        self.allocator.ensure_free(new_blocks)?;

        if shared_partial {
            let old = *table.blocks.last().expect("checked");
            let copy = self.allocator.allocate()?;
            self.storage.copy_block(old, copy, start % bs)?;
            self.allocator.release(old);
            let table = self.tables.get_mut(&seq).expect("checked");
            *table.blocks.last_mut().expect("checked") = copy;
        }
        for _ in have..need_total {
            let block = self.allocator.allocate()?;
            self.tables.get_mut(&seq).expect("checked").blocks.push(block);
        }
        self.tables.get_mut(&seq).expect("checked").len = end;
        Ok(start..end)
    }

    /// Writes tokens `start..start + n` of `layer` (`keys`: `[n, kv_heads,
    /// key_dim]`, `values`: `[n, kv_heads, value_dim]`, ignored for MLA).
    /// Positions must have been reserved and must continue where the last
    /// write of this layer stopped.
    pub fn write(&mut self, seq: SeqId, layer: usize, start: usize, keys: &[f32], values: &[f32]) -> Result<()> {
        let c = &self.config;
        if layer >= c.num_layers {
            return Err(CacheError::LayerOutOfRange {
                layer,
                num_layers: c.num_layers,
            });
        }
        let key_width = c.kv_heads * c.key_dim;
        let value_width = c.kv_heads * c.value_dim();
        let separate = matches!(c.values, crate::ValueLayout::Separate { .. });
        if keys.len() % key_width != 0 {
            return Err(CacheError::WrongLength {
                op: "write keys",
                expected: keys.len().next_multiple_of(key_width),
                got: keys.len(),
            });
        }
        let n = keys.len() / key_width;
        if separate && values.len() != n * value_width {
            return Err(CacheError::WrongLength {
                op: "write values",
                expected: n * value_width,
                got: values.len(),
            });
        }
        let bs = c.block_size;
        let table = self.tables.get(&seq).ok_or(CacheError::UnknownSequence(seq.0))?;
        check_write_order(seq, layer, table, start, n)?;
        for i in 0..n {
            let pos = start + i;
            let block = table.blocks[pos / bs];
            let value = if separate {
                &values[i * value_width..(i + 1) * value_width]
            } else {
                &[][..]
            };
            self.storage
                .write_token(layer, block, pos % bs, &keys[i * key_width..(i + 1) * key_width], value)?;
        }
        self.tables.get_mut(&seq).expect("checked").written[layer] += n;
        Ok(())
    }

    /// Records that tokens `start..start + n` of `layer` were stored by a
    /// batched write that went to the storage directly (the GPU cache writes
    /// a whole step's rows in one launch). The same order rules as
    /// [`write`](Self::write) apply, checked before the caller writes.
    pub fn mark_written(&mut self, seq: SeqId, layer: usize, start: usize, n: usize) -> Result<()> {
        if layer >= self.config.num_layers {
            return Err(CacheError::LayerOutOfRange {
                layer,
                num_layers: self.config.num_layers,
            });
        }
        let table = self.tables.get_mut(&seq).ok_or(CacheError::UnknownSequence(seq.0))?;
        check_write_order(seq, layer, table, start, n)?;
        table.written[layer] += n;
        Ok(())
    }

    /// Reserves and writes `n` tokens in every layer at once
    /// (`keys[layer]`, `values[layer]` as in [`write`](Self::write)).
    pub fn append(&mut self, seq: SeqId, keys: &[&[f32]], values: &[&[f32]]) -> Result<Range<usize>> {
        let layers = self.config.num_layers;
        if keys.len() != layers || values.len() != layers {
            return Err(CacheError::WrongLength {
                op: "append (layers)",
                expected: layers,
                got: keys.len().min(values.len()),
            });
        }
        let n = keys[0].len() / (self.config.kv_heads * self.config.key_dim);
        let range = self.reserve(seq, n)?;
        for layer in 0..layers {
            self.write(seq, layer, range.start, keys[layer], values[layer])?;
        }
        Ok(range)
    }

    /// A new sequence sharing every block of `seq` (reference counted); the
    /// first write into a shared partial block copies it.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let table = self.table(seq)?.clone();
        if let Some((layer, &written)) = table.written.iter().enumerate().find(|(_, &w)| w != table.len) {
            return Err(CacheError::IncompleteSequence {
                seq: seq.0,
                layer,
                written,
                len: table.len,
            });
        }
        for &b in &table.blocks {
            self.allocator.retain(b);
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.tables.insert(id, table);
        Ok(id)
    }

    /// Drops `seq` and returns its blocks to the pool (shared blocks stay
    /// until their last owner is freed). Returns the number of blocks freed.
    pub fn free(&mut self, seq: SeqId) -> Result<usize> {
        let table = self.tables.remove(&seq).ok_or(CacheError::UnknownSequence(seq.0))?;
        Ok(table.blocks.iter().filter(|&&b| self.allocator.release(b)).count())
    }

    pub fn memory_report(&self) -> MemoryReport {
        let c = &self.config;
        let kv = c.kv_dtype.size_in_bytes();
        let per_layer_heads = c.num_layers * c.kv_heads;
        MemoryReport {
            key_bytes_per_token: per_layer_heads * c.key_dim * kv,
            value_bytes_per_token: per_layer_heads * c.value_bytes_per_head(),
            metadata_bytes_per_token: (per_layer_heads * 2 * c.key_dim * 4) as f64 / c.block_size as f64,
            label_bytes_per_token: per_layer_heads * c.label_bytes_per_head(),
            blocks_used: self.allocator.num_used(),
            blocks_total: self.allocator.total(),
            storage_bytes: self.storage.allocated_bytes(),
        }
    }
}
