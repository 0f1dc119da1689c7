//! The GPU-resident paged cache of one layer, laid out exactly like the host
//! cache (asynctls-kvcache's `HostKvStorage`, bf16), and the kernels that
//! write it: `append` stores tokens' K/V and INT4 labels, `refresh_bounds`
//! recomputes the key min/max of the blocks an append touched.
//!
//! An offloaded pool ([`GpuKvPool::metadata_only`] with a [`HostTier`])
//! keeps only the bounds and labels on the GPU: its K/V rows live in the
//! host tier (pinned, device-mapped memory) and in the resident slots the
//! offload resolver manages. `append` then writes rows through to both,
//! and `merge_bounds` updates the bounds from the new keys alone.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

use super::{CudaOps, PagedKvView};
use crate::error::invalid;
use crate::Result;

/// The geometry of a GPU pool (one layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub block_size: usize,
    pub key_dim: usize,
    /// Width of the values; for MLA (`separate_values == false`) the first
    /// `value_dim` key channels.
    pub value_dim: usize,
    pub separate_values: bool,
    /// r: key channels per token in the INT4 labels (a multiple of 8).
    pub label_channels: usize,
}

impl KvGeometry {
    fn tokens(&self) -> usize {
        self.num_blocks * self.kv_heads * self.block_size
    }

    /// Bytes the pool holds on the GPU.
    pub fn bytes(&self) -> usize {
        self.kv_bytes() + self.metadata_bytes()
    }

    /// Bytes of the K/V rows (what an offloaded pool keeps in the host tier).
    pub fn kv_bytes(&self) -> usize {
        let values = if self.separate_values { self.value_dim } else { 0 };
        self.tokens() * (self.key_dim + values) * 2
    }

    /// Bytes of the block bounds and labels (what an offloaded pool keeps on the GPU).
    pub fn metadata_bytes(&self) -> usize {
        self.num_blocks * self.kv_heads * 2 * self.key_dim * 2 + self.tokens() * (self.label_channels / 2 + 4)
    }
}

/// One layer's K/V, block bounds and labels on the GPU.
#[derive(Debug)]
pub struct GpuKvPool {
    pub geometry: KvGeometry,
    /// `[num_blocks, kv_heads, block_size, key_dim]`
    pub keys: CudaSlice<bf16>,
    /// `[num_blocks, kv_heads, block_size, value_dim]`, GQA only.
    pub values: Option<CudaSlice<bf16>>,
    /// `[num_blocks, kv_heads, 2, key_dim]`: max, then min, in bf16. The
    /// keys are bf16, so their channel-wise max and min are exactly bf16
    /// values: half the bytes of f32 bounds and the same scores.
    pub bounds: CudaSlice<bf16>,
    /// `[num_blocks, kv_heads, block_size, r / 2]`, low nibble first.
    pub labels: CudaSlice<u8>,
    /// `[num_blocks, kv_heads, block_size, 2]`: scale, zero.
    pub label_params: CudaSlice<f16>,
    /// `[kv_heads, r]`: the key channels each head's labels keep.
    pub channels: CudaSlice<i32>,
    /// Set when the K/V rows live in a host tier instead of `keys`/`values`.
    tier: Option<HostTier>,
}

/// Where an offloaded layer's K/V rows are, as device addresses: the host
/// tier (`[num_blocks * kv_heads, block_size, dim]`, pinned and mapped,
/// every row), the resident slot pools (`[slots, block_size, dim]`) and the
/// unit -> slot table (`[num_blocks * kv_heads]`, -1 without a slot) that
/// the offload resolver keeps. 0 for values in an MLA cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTier {
    pub host_keys: u64,
    pub host_values: u64,
    pub slot_keys: u64,
    pub slot_values: u64,
    pub unit_slot: u64,
}

impl GpuKvPool {
    /// A zeroed pool; `channels` holds `r` channel indices per KV head.
    pub fn new(ops: &CudaOps, geometry: KvGeometry, channels: &[u16]) -> Result<Self> {
        Self::allocate(ops, geometry, channels, true)
    }

    /// A pool with bounds and labels only: its rows go to the host tier
    /// given by [`Self::set_tier`] before the first append.
    pub fn metadata_only(ops: &CudaOps, geometry: KvGeometry, channels: &[u16]) -> Result<Self> {
        Self::allocate(ops, geometry, channels, false)
    }

    fn allocate(ops: &CudaOps, geometry: KvGeometry, channels: &[u16], with_kv: bool) -> Result<Self> {
        let g = geometry;
        if g.label_channels == 0 || g.label_channels % 8 != 0 || g.label_channels > g.key_dim {
            return Err(invalid(
                "gpu kv pool",
                format!(
                    "{} label channels (need a positive multiple of 8 up to the key dim)",
                    g.label_channels
                ),
            ));
        }
        if g.key_dim % 8 != 0 || g.value_dim > g.key_dim && !g.separate_values {
            return Err(invalid(
                "gpu kv pool",
                format!("key dim {} / value dim {}", g.key_dim, g.value_dim),
            ));
        }
        if channels.len() != g.kv_heads * g.label_channels || channels.iter().any(|&c| c as usize >= g.key_dim) {
            return Err(invalid(
                "gpu kv pool",
                format!(
                    "{} label channel indices for {} heads of {} (each below {})",
                    channels.len(),
                    g.kv_heads,
                    g.label_channels,
                    g.key_dim
                ),
            ));
        }
        let stream = ops.device.stream();
        let t = g.tokens();
        let channels: Vec<i32> = channels.iter().map(|&c| c as i32).collect();
        // An offloaded pool's `keys`/`values` stand in only for their type
        // (views of it read the slots and the host tier).
        let rows = if with_kv { t } else { 1 };
        Ok(GpuKvPool {
            geometry: g,
            keys: stream.alloc_zeros(rows * g.key_dim)?,
            values: if g.separate_values {
                Some(stream.alloc_zeros(rows * g.value_dim)?)
            } else {
                None
            },
            bounds: stream.alloc_zeros(g.num_blocks * g.kv_heads * 2 * g.key_dim)?,
            labels: stream.alloc_zeros(t * g.label_channels / 2)?,
            label_params: stream.alloc_zeros(t * 2)?,
            channels: stream.clone_htod(&channels)?,
            tier: None,
        })
    }

    /// Points an offloaded pool's rows at `tier`.
    ///
    /// # Safety
    /// The addresses must stay valid, and laid out for this pool's geometry
    /// as [`HostTier`] documents, for as long as the pool is written, copied
    /// or read through them; the unit -> slot table must name slots inside
    /// the slot pools.
    pub unsafe fn set_tier(&mut self, tier: HostTier) -> Result<()> {
        if self.keys.len() != self.geometry.key_dim {
            return Err(invalid(
                "gpu kv pool",
                "a host tier for a pool that holds its own K/V (make it with metadata_only)",
            ));
        }
        self.tier = Some(tier);
        Ok(())
    }

    /// The host tier the rows live in, for an offloaded pool.
    pub fn tier(&self) -> Option<HostTier> {
        self.tier
    }

    /// The pool as the attention kernels read it, for sequences with this
    /// block table (`[batch, max_blocks]`) and lengths.
    pub fn view<'a>(
        &'a self,
        block_table: &'a CudaSlice<i32>,
        max_blocks: usize,
        lens: &'a CudaSlice<i32>,
    ) -> PagedKvView<'a> {
        let g = self.geometry;
        PagedKvView {
            keys: &self.keys,
            values: self.values.as_ref(),
            kv_heads: g.kv_heads,
            block_size: g.block_size,
            head_dim: g.key_dim,
            value_dim: g.value_dim,
            block_table,
            offload: None,
            max_blocks,
            lens,
        }
    }
}

impl CudaOps {
    /// Stores tokens: `keys` `[n, kv_heads, key_dim]`, `values` `[n, kv_heads,
    /// value_dim]` (ignored for MLA), token `i` into pool slot `slots[i]`
    /// (physical block * block_size + slot). Quantizes each token's label from
    /// its stored key. Block bounds are not touched: call `refresh_bounds`.
    ///
    /// # Safety
    /// Every `slots[i]` must be a slot of the pool (below `num_blocks *
    /// block_size`); the slots live on the device and are not checked.
    pub unsafe fn append(
        &self,
        pool: &mut GpuKvPool,
        keys: &CudaSlice<f32>,
        values: Option<&CudaSlice<f32>>,
        slots: &CudaSlice<i32>,
    ) -> Result<()> {
        let g = pool.geometry;
        let n = slots.len();
        let want_values = g.separate_values;
        if keys.len() != n * g.kv_heads * g.key_dim
            || want_values && values.is_none_or(|v| v.len() != n * g.kv_heads * g.value_dim)
        {
            return Err(invalid(
                "kv append",
                format!(
                    "keys/values for {n} tokens of {} heads do not match the pool",
                    g.kv_heads
                ),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&self.kv, "kv_append")?;
        let (h, d, dv, r, bs) = (
            g.kv_heads as i32,
            g.key_dim as i32,
            g.value_dim as i32,
            g.label_channels as i32,
            g.block_size as i32,
        );
        let null: u64 = 0;
        let stream = self.device.stream();
        let mut b = stream.launch_builder(&f);
        b.arg(keys);
        match (values, want_values) {
            (Some(v), true) => b.arg(v),
            _ => b.arg(&null),
        };
        b.arg(slots).arg(&pool.channels);
        let tier = pool.tier;
        match &tier {
            // Written through to the host tier and the resident slots.
            Some(t) => b.arg(&t.host_keys).arg(&t.host_values),
            None => {
                b.arg(&mut pool.keys);
                match pool.values.as_mut() {
                    Some(v) => b.arg(v),
                    None => b.arg(&null),
                }
            }
        };
        b.arg(&mut pool.labels)
            .arg(&mut pool.label_params)
            .arg(&h)
            .arg(&d)
            .arg(&dv)
            .arg(&r)
            .arg(&bs);
        match &tier {
            Some(t) => b.arg(&t.unit_slot).arg(&t.slot_keys).arg(&t.slot_values),
            None => b.arg(&null).arg(&null).arg(&null),
        };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, g.kv_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (g.key_dim * 4) as u32,
        };
        // SAFETY: lengths checked above; slots are the caller's (in range of the pool).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Updates the key max/min of `blocks` (physical, `fills[i]` tokens
    /// each after the step) from the step's new keys (`keys` as
    /// [`Self::append`] took them): block `i` got rows `starts[i]` to
    /// `starts[i + 1]`, and the rows before them are its current bounds.
    /// Bit-equal to [`Self::refresh_bounds`] without reading stored keys
    /// (an offloaded pool keeps them in host memory).
    ///
    /// # Safety
    /// Every block must be below the pool's `num_blocks`, and the starts
    /// ascending rows of `keys` with each block's range at most its fill
    /// (device-side values the kernel does not check).
    pub unsafe fn merge_bounds(
        &self,
        pool: &mut GpuKvPool,
        keys: &CudaSlice<f32>,
        blocks: &CudaSlice<i32>,
        fills: &CudaSlice<i32>,
        starts: &CudaSlice<i32>,
    ) -> Result<()> {
        let g = pool.geometry;
        if blocks.len() != fills.len() || starts.len() != blocks.len() + 1 {
            return Err(invalid(
                "merge bounds",
                format!(
                    "{} blocks, {} fills and {} starts (need one more start than blocks)",
                    blocks.len(),
                    fills.len(),
                    starts.len()
                ),
            ));
        }
        if keys.len() % (g.kv_heads * g.key_dim) != 0 {
            return Err(invalid(
                "merge bounds",
                format!(
                    "{} key values for rows of {} heads of {}",
                    keys.len(),
                    g.kv_heads,
                    g.key_dim
                ),
            ));
        }
        if blocks.is_empty() {
            return Ok(());
        }
        let f = self.function(&self.kv, "kv_bounds_merge")?;
        let (h, d) = (g.kv_heads as i32, g.key_dim as i32);
        let stream = self.device.stream();
        let mut b = stream.launch_builder(&f);
        b.arg(keys)
            .arg(blocks)
            .arg(fills)
            .arg(starts)
            .arg(&mut pool.bounds)
            .arg(&h)
            .arg(&d);
        let cfg = LaunchConfig {
            grid_dim: (blocks.len() as u32, g.kv_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's contract (above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Copies physical block `src`'s K/V rows over block `dst`'s in an
    /// offloaded pool's host tier, and into `dst`'s resident slots (the
    /// bounds and labels are the caller's: device memory).
    ///
    /// # Safety
    /// Both blocks must be below the pool's `num_blocks` and differ.
    pub unsafe fn copy_tier_block(&self, pool: &GpuKvPool, src: usize, dst: usize) -> Result<()> {
        let g = pool.geometry;
        let tier = pool
            .tier
            .ok_or_else(|| invalid("copy tier block", "the pool is not offloaded"))?;
        let words = |dim: usize| (g.block_size * dim * 2 / 16) as i32;
        let (kw, vw) = (words(g.key_dim), if g.separate_values { words(g.value_dim) } else { 0 });
        if (g.block_size * g.key_dim * 2) % 16 != 0 || (g.block_size * g.value_dim * 2) % 16 != 0 {
            return Err(invalid("copy tier block", "unit rows must be whole 16-byte words"));
        }
        let f = self.function(&self.kv, "kv_tier_copy")?;
        let (s, d, h) = (src as i32, dst as i32, g.kv_heads as i32);
        let stream = self.device.stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&tier.host_keys)
            .arg(&tier.host_values)
            .arg(&tier.slot_keys)
            .arg(&tier.slot_values)
            .arg(&tier.unit_slot)
            .arg(&s)
            .arg(&d)
            .arg(&h)
            .arg(&kw)
            .arg(&vw);
        let cfg = LaunchConfig {
            grid_dim: (g.kv_heads as u32, 2, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's blocks, the tier's layout (set_tier's contract).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Recomputes the key max/min of `blocks` (physical) over their first
    /// `fills[i]` tokens.
    ///
    /// # Safety
    /// Every block must be below the pool's `num_blocks` (device-side
    /// indices the kernel does not check).
    pub unsafe fn refresh_bounds(
        &self,
        pool: &mut GpuKvPool,
        blocks: &CudaSlice<i32>,
        fills: &CudaSlice<i32>,
    ) -> Result<()> {
        let g = pool.geometry;
        if pool.tier.is_some() {
            return Err(invalid(
                "refresh bounds",
                "an offloaded pool's keys are in host memory: use merge_bounds",
            ));
        }
        if blocks.len() != fills.len() {
            return Err(invalid(
                "refresh bounds",
                format!("{} blocks but {} fills", blocks.len(), fills.len()),
            ));
        }
        if blocks.is_empty() {
            return Ok(());
        }
        let f = self.function(&self.kv, "kv_block_bounds")?;
        let (h, d, bs) = (g.kv_heads as i32, g.key_dim as i32, g.block_size as i32);
        let stream = self.device.stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&pool.keys)
            .arg(blocks)
            .arg(fills)
            .arg(&mut pool.bounds)
            .arg(&h)
            .arg(&d)
            .arg(&bs);
        let cfg = LaunchConfig {
            grid_dim: (blocks.len() as u32, g.kv_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
