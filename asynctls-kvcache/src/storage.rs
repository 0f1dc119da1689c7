//! Where the cache's tensors live.
//!
//! [`KvStorage`] is the seam between the cache's bookkeeping (which block
//! holds which tokens) and the memory that holds them. It takes every write
//! (a token's K/V together with the online update of its block's key min/max
//! and of its INT4 label) and says, for a decode step, where each block can be
//! read. [`HostKvStorage`] keeps everything in host memory and is the
//! reference; GPU-resident and offloaded storage implement the same trait.

use half::{bf16, f16};

use crate::config::{CacheConfig, KvDType, LabelChannels, ValueLayout};
use crate::label;
use crate::{BlockId, CacheError, Result};

/// The write side and the prefetch hint every storage implements.
pub trait KvStorage: Send + Sync {
    fn config(&self) -> &CacheConfig;

    /// Stores one token (`key`: `[kv_heads, key_dim]`, `value`:
    /// `[kv_heads, value_dim]`, ignored for key-prefix values) in `slot` of
    /// `block`, updating the block's key min/max and the token's labels.
    /// `slot == 0` starts a block afresh.
    fn write_token(&mut self, layer: usize, block: BlockId, slot: usize, key: &[f32], value: &[f32]) -> Result<()>;

    /// Copies the first `tokens` tokens of `src` into `dst` in every layer,
    /// with their metadata and labels (copy-on-write of a shared partial block).
    fn copy_block(&mut self, src: BlockId, dst: BlockId, tokens: usize) -> Result<()>;

    /// The blocks the next step of `layer` is expected to read. Storage that
    /// holds everything where it is read ignores it; an offloading storage
    /// starts their transfer.
    fn prefetch_hint(&mut self, _layer: usize, _blocks: &[BlockId]) {}

    /// Whether `prefetch_hint` does anything, so callers can skip computing
    /// hints for storage that holds everything where it is read.
    fn takes_prefetch_hints(&self) -> bool {
        false
    }

    /// Bytes of memory this storage holds for the pool.
    fn allocated_bytes(&self) -> usize;

    /// Makes the pool's memory resident now. A host pool's f32 and byte
    /// buffers are allocated zeroed by the OS and become resident at their
    /// first write (bf16 ones are written when allocated). A server
    /// commits its pool at start, so a machine that cannot hold it fails
    /// then and not in the middle of a load, and its resident memory after
    /// a load is its idle value. The default does nothing (device memory
    /// is committed when it is allocated).
    fn commit_memory(&mut self) {}

    /// Reads served from resident slots and from the host tier since the
    /// last call, for storage with a host tier (None otherwise).
    fn take_offload_reads(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Storage whose blocks can be read in place from the CPU.
pub trait HostReadable: KvStorage {
    /// Keys of one block and head: `block_size` rows of `key_dim`.
    fn keys(&self, layer: usize, block: BlockId, head: usize) -> Rows<'_>;
    /// Values of one block and head: `block_size` rows of `value_dim`.
    fn values(&self, layer: usize, block: BlockId, head: usize) -> Rows<'_>;
    /// Channel-wise `(max, min)` of the keys written to this block and head.
    fn key_bounds(&self, layer: usize, block: BlockId, head: usize) -> (&[f32], &[f32]);
    /// INT4 labels of one block and head: `block_size` rows of r/2 bytes, and
    /// `block_size` pairs of (scale, zero).
    fn labels(&self, layer: usize, block: BlockId, head: usize) -> (&[u8], &[[f16; 2]]);
    /// The channels the labels of `(layer, head)` keep.
    fn label_channels(&self, layer: usize, head: usize) -> &[u16];
}

/// Borrowed elements of a K/V pool.
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
}

/// Rows of a block: `len` rows of `width` elements, `stride` apart.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    data: KvSlice<'a>,
    stride: usize,
    width: usize,
}

impl<'a> Rows<'a> {
    /// `data` read as rows of `width` elements, `stride` apart (for storages
    /// outside this crate, e.g. an offloading one's resident copies).
    pub fn new(data: KvSlice<'a>, stride: usize, width: usize) -> Self {
        Rows { data, stride, width }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Row `i` converted to f32 into `out` (`width` elements).
    #[inline]
    pub fn read(&self, i: usize, out: &mut [f32]) {
        let start = i * self.stride;
        match self.data {
            KvSlice::F32(d) => out.copy_from_slice(&d[start..start + self.width]),
            KvSlice::BF16(d) => {
                for (o, v) in out.iter_mut().zip(&d[start..start + self.width]) {
                    *o = v.to_f32();
                }
            }
        }
    }

    /// `q . row_i`. `scratch` (`width` elements) is used for bf16 rows.
    #[inline]
    pub fn dot(&self, i: usize, q: &[f32], scratch: &mut [f32]) -> f32 {
        let start = i * self.stride;
        match self.data {
            KvSlice::F32(d) => asynctls_kernels::cpu::dot(q, &d[start..start + self.width]),
            KvSlice::BF16(_) => {
                self.read(i, scratch);
                asynctls_kernels::cpu::dot(q, scratch)
            }
        }
    }

    /// `acc += alpha * row_i`.
    #[inline]
    pub fn accumulate(&self, i: usize, alpha: f32, acc: &mut [f32]) {
        let start = i * self.stride;
        match self.data {
            KvSlice::F32(d) => asynctls_kernels::cpu::axpy(alpha, &d[start..start + self.width], acc),
            KvSlice::BF16(d) => {
                for (a, v) in acc.iter_mut().zip(&d[start..start + self.width]) {
                    *a += alpha * v.to_f32();
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum KvBuffer {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

impl KvBuffer {
    fn zeros(dtype: KvDType, n: usize) -> Self {
        match dtype {
            KvDType::F32 => KvBuffer::F32(vec![0.0; n]),
            KvDType::BF16 => KvBuffer::BF16(vec![bf16::ZERO; n]),
        }
    }

    fn slice(&self, start: usize, len: usize) -> KvSlice<'_> {
        match self {
            KvBuffer::F32(v) => KvSlice::F32(&v[start..start + len]),
            KvBuffer::BF16(v) => KvSlice::BF16(&v[start..start + len]),
        }
    }

    /// Stores `src` at `start` and returns the values as stored (rounded to
    /// the pool's dtype) into `stored`.
    fn store(&mut self, start: usize, src: &[f32], stored: &mut [f32]) {
        match self {
            KvBuffer::F32(v) => {
                v[start..start + src.len()].copy_from_slice(src);
                stored.copy_from_slice(src);
            }
            KvBuffer::BF16(v) => {
                for ((d, s), o) in v[start..start + src.len()].iter_mut().zip(src).zip(stored) {
                    *d = bf16::from_f32(*s);
                    *o = d.to_f32();
                }
            }
        }
    }

    fn copy_within(&mut self, src: usize, dst: usize, len: usize) {
        match self {
            KvBuffer::F32(v) => v.copy_within(src..src + len, dst),
            KvBuffer::BF16(v) => v.copy_within(src..src + len, dst),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvBuffer::F32(v) => v.len() * 4,
            KvBuffer::BF16(v) => v.len() * 2,
        }
    }
}

/// One layer's pools, each indexed `[block, head, ...]`.
#[derive(Debug, Clone)]
struct LayerPools {
    /// `[num_blocks, kv_heads, B, key_dim]`
    keys: KvBuffer,
    /// `[num_blocks, kv_heads, B, value_dim]`; empty for key-prefix values.
    values: KvBuffer,
    /// `[num_blocks, kv_heads, 2, key_dim]`: max then min.
    bounds: Vec<f32>,
    /// `[num_blocks, kv_heads, B, r/2]`
    labels: Vec<u8>,
    /// `[num_blocks, kv_heads, B]` of (scale, zero)
    label_params: Vec<[f16; 2]>,
}

/// All pools in host memory: the reference storage.
#[derive(Debug, Clone)]
pub struct HostKvStorage {
    config: CacheConfig,
    channels: LabelChannels,
    layers: Vec<LayerPools>,
    /// Scratch for one head's stored key, stored value and label channels.
    scratch: (Vec<f32>, Vec<f32>, Vec<f32>),
}

impl HostKvStorage {
    pub fn new(config: &CacheConfig, channels: LabelChannels) -> Result<Self> {
        config.validate()?;
        channels.validate(config)?;
        // Sized before anything is allocated: a pool larger than the
        // machine's memory is an error here, not an abort in the allocator.
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let need = config.host_bytes().ok_or_else(|| {
            CacheError::InvalidConfig(format!(
                "a host pool of {} blocks x {} layers overflows the address space",
                config.num_blocks, config.num_layers
            ))
        })?;
        if let Some(available) = crate::host_available_bytes() {
            if need > available {
                return Err(CacheError::HostMemory {
                    blocks: config.num_blocks,
                    layers: config.num_layers,
                    need_gib: gib(need),
                    available_gib: gib(available),
                });
            }
        }
        let c = config;
        let per_head_tokens = c.num_blocks * c.kv_heads * c.block_size;
        let value_len = match c.values {
            ValueLayout::Separate { dim } => per_head_tokens * dim,
            ValueLayout::KeyPrefix { .. } => 0,
        };
        let layers = (0..c.num_layers)
            .map(|_| LayerPools {
                keys: KvBuffer::zeros(c.kv_dtype, per_head_tokens * c.key_dim),
                values: KvBuffer::zeros(c.kv_dtype, value_len),
                bounds: vec![0.0; c.num_blocks * c.kv_heads * 2 * c.key_dim],
                labels: vec![0; per_head_tokens * c.label_channels / 2],
                label_params: vec![[f16::ZERO; 2]; per_head_tokens],
            })
            .collect();
        Ok(HostKvStorage {
            config: config.clone(),
            channels,
            layers,
            scratch: (
                vec![0.0; c.key_dim],
                vec![0.0; c.value_dim()],
                vec![0.0; c.label_channels],
            ),
        })
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.config.num_layers {
            return Err(CacheError::LayerOutOfRange {
                layer,
                num_layers: self.config.num_layers,
            });
        }
        Ok(())
    }

    /// Index of the first element of `(block, head, slot)` in a per-token pool.
    fn token_index(&self, block: BlockId, head: usize, slot: usize) -> usize {
        (block.index() * self.config.kv_heads + head) * self.config.block_size + slot
    }
}

/// Writes one element of every 4 KiB back onto itself, so every page of
/// `v` is resident and its contents are unchanged (the writes are volatile:
/// a store of the value just loaded is not optimized away).
fn touch_pages<T: Copy>(v: &mut [T]) {
    let step = (4096 / std::mem::size_of::<T>().max(1)).max(1);
    for i in (0..v.len()).step_by(step) {
        let p: *mut T = &mut v[i];
        // SAFETY: `p` points to an initialized element of `v`, borrowed mutably here.
        unsafe { std::ptr::write_volatile(p, std::ptr::read_volatile(p)) };
    }
}

fn check_len(op: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(CacheError::WrongLength { op, expected, got });
    }
    Ok(())
}

impl KvStorage for HostKvStorage {
    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn commit_memory(&mut self) {
        for pools in &mut self.layers {
            match &mut pools.keys {
                KvBuffer::F32(v) => touch_pages(v),
                KvBuffer::BF16(v) => touch_pages(v),
            }
            match &mut pools.values {
                KvBuffer::F32(v) => touch_pages(v),
                KvBuffer::BF16(v) => touch_pages(v),
            }
            touch_pages(&mut pools.bounds);
            touch_pages(&mut pools.labels);
            touch_pages(&mut pools.label_params);
        }
    }

    fn write_token(&mut self, layer: usize, block: BlockId, slot: usize, key: &[f32], value: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let c = &self.config;
        let (kd, vd, r) = (c.key_dim, c.value_dim(), c.label_channels);
        check_len("write_token key", key.len(), c.kv_heads * kd)?;
        if let ValueLayout::Separate { .. } = c.values {
            check_len("write_token value", value.len(), c.kv_heads * vd)?;
        }
        assert!(
            slot < c.block_size && block.index() < c.num_blocks,
            "slot or block out of range"
        );
        let kv_heads = c.kv_heads;
        for head in 0..kv_heads {
            let t = self.token_index(block, head, slot);
            let (stored, stored_value, picked) = &mut self.scratch;
            let pools = &mut self.layers[layer];
            pools.keys.store(t * kd, &key[head * kd..(head + 1) * kd], stored);
            if let ValueLayout::Separate { .. } = self.config.values {
                pools
                    .values
                    .store(t * vd, &value[head * vd..(head + 1) * vd], stored_value);
            }
            // Online min/max over the keys as stored, so the block bound
            // holds for exactly what attention will read, rounded outward to
            // bf16 values: the GPU keeps its bounds in bf16, and with bf16
            // keys (the GPU's) the rounding is exact, so both paths score
            // blocks against the same numbers.
            let b = (block.index() * kv_heads + head) * 2 * kd;
            let (max, min) = pools.bounds[b..b + 2 * kd].split_at_mut(kd);
            for ((mx, mn), &v) in max.iter_mut().zip(min.iter_mut()).zip(stored.iter()) {
                let (hi, lo) = if slot == 0 { (v, v) } else { (mx.max(v), mn.min(v)) };
                *mx = bf16_at_least(hi);
                *mn = bf16_at_most(lo);
            }
            for (p, &ch) in picked.iter_mut().zip(self.channels.get(layer, head)) {
                *p = stored[ch as usize];
            }
            let (scale, zero) = label::quantize(picked, &mut pools.labels[t * r / 2..(t + 1) * r / 2]);
            pools.label_params[t] = [scale, zero];
        }
        Ok(())
    }

    fn copy_block(&mut self, src: BlockId, dst: BlockId, tokens: usize) -> Result<()> {
        let c = &self.config;
        let (kd, vd, r, bs, heads) = (c.key_dim, c.value_dim(), c.label_channels, c.block_size, c.kv_heads);
        let separate = matches!(c.values, ValueLayout::Separate { .. });
        for pools in &mut self.layers {
            for head in 0..heads {
                let s = (src.index() * heads + head) * bs;
                let d = (dst.index() * heads + head) * bs;
                pools.keys.copy_within(s * kd, d * kd, tokens * kd);
                if separate {
                    pools.values.copy_within(s * vd, d * vd, tokens * vd);
                }
                pools.labels.copy_within(s * r / 2..(s + tokens) * r / 2, d * r / 2);
                pools.label_params.copy_within(s..s + tokens, d);
            }
            let (sb, db) = (src.index() * heads * 2 * kd, dst.index() * heads * 2 * kd);
            pools.bounds.copy_within(sb..sb + heads * 2 * kd, db);
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|p| p.keys.bytes() + p.values.bytes() + p.bounds.len() * 4 + p.labels.len() + p.label_params.len() * 4)
            .sum()
    }
}

impl HostReadable for HostKvStorage {
    fn keys(&self, layer: usize, block: BlockId, head: usize) -> Rows<'_> {
        let c = &self.config;
        let start = self.token_index(block, head, 0) * c.key_dim;
        Rows {
            data: self.layers[layer].keys.slice(start, c.block_size * c.key_dim),
            stride: c.key_dim,
            width: c.key_dim,
        }
    }

    fn values(&self, layer: usize, block: BlockId, head: usize) -> Rows<'_> {
        let c = &self.config;
        match c.values {
            ValueLayout::Separate { dim } => {
                let start = self.token_index(block, head, 0) * dim;
                Rows {
                    data: self.layers[layer].values.slice(start, c.block_size * dim),
                    stride: dim,
                    width: dim,
                }
            }
            ValueLayout::KeyPrefix { dim } => Rows {
                width: dim,
                ..self.keys(layer, block, head)
            },
        }
    }

    fn key_bounds(&self, layer: usize, block: BlockId, head: usize) -> (&[f32], &[f32]) {
        let kd = self.config.key_dim;
        let b = (block.index() * self.config.kv_heads + head) * 2 * kd;
        self.layers[layer].bounds[b..b + 2 * kd].split_at(kd)
    }

    fn labels(&self, layer: usize, block: BlockId, head: usize) -> (&[u8], &[[f16; 2]]) {
        let c = &self.config;
        let t = self.token_index(block, head, 0);
        let pools = &self.layers[layer];
        (
            &pools.labels[t * c.label_channels / 2..(t + c.block_size) * c.label_channels / 2],
            &pools.label_params[t..t + c.block_size],
        )
    }

    fn label_channels(&self, layer: usize, head: usize) -> &[u16] {
        self.channels.get(layer, head)
    }
}

/// The least bf16 value not below `x` (as f32; NaN stays NaN).
pub fn bf16_at_least(x: f32) -> f32 {
    let r = bf16::from_f32(x).to_f32();
    if r >= x || x.is_nan() {
        r
    } else {
        next_bf16(r, true)
    }
}

/// The greatest bf16 value not above `x` (as f32; NaN stays NaN).
pub fn bf16_at_most(x: f32) -> f32 {
    let r = bf16::from_f32(x).to_f32();
    if r <= x || x.is_nan() {
        r
    } else {
        next_bf16(r, false)
    }
}

/// The bf16 neighbour of the finite bf16 value `r` upward or downward.
fn next_bf16(r: f32, up: bool) -> f32 {
    let bits = bf16::from_f32(r).to_bits();
    let positive = bits & 0x8000 == 0;
    let next = match (up, positive, bits & 0x7fff == 0) {
        // From a zero: the smallest subnormal of the wanted sign.
        (true, _, true) => 0x0001,
        (false, _, true) => 0x8001,
        (true, true, false) | (false, false, false) => bits + 1,
        (true, false, false) | (false, true, false) => bits - 1,
    };
    bf16::from_bits(next).to_f32()
}

#[cfg(test)]
mod commit_tests {
    use super::touch_pages;
    use crate::{CacheConfig, CacheError, HostKvStorage, KvDType, KvStorage, LabelChannels};

    #[test]
    fn a_pool_is_sized_before_it_is_allocated() {
        for config in [
            CacheConfig::gqa(3, 2, 64, 17),
            CacheConfig {
                kv_dtype: KvDType::BF16,
                ..CacheConfig::gqa(2, 4, 128, 5)
            },
            CacheConfig::mla(2, 512, 64, 9),
        ] {
            let storage = HostKvStorage::new(&config, LabelChannels::leading(&config)).unwrap();
            assert_eq!(config.host_bytes(), Some(storage.allocated_bytes()), "{config:?}");
        }
        // More than any machine holds: refused with the sizes, not aborted.
        let huge = CacheConfig::gqa(64, 64, 128, u32::MAX as usize);
        match HostKvStorage::new(&huge, LabelChannels::leading(&huge)) {
            Err(CacheError::HostMemory { need_gib, .. }) => assert!(need_gib > 1e6),
            Err(CacheError::InvalidConfig(m)) => assert!(m.contains("overflows"), "{m}"),
            other => panic!("a huge pool: {other:?}"),
        }
    }

    #[test]
    fn touching_pages_keeps_every_value() {
        let mut v: Vec<u32> = (0..10_000).collect();
        touch_pages(&mut v);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        let mut empty: Vec<f32> = Vec::new();
        touch_pages(&mut empty);
    }
}
