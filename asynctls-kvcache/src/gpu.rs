//! The GPU-resident storage: one [`GpuKvPool`] per layer (bf16 K/V, f32
//! block bounds, INT4 labels), laid out as [`HostKvStorage`](crate::HostKvStorage)
//! lays out host memory, so the block tables of [`PagedKvCache`](crate::PagedKvCache)
//! address both. Writes are batched: [`GpuKvStorage::write_rows`] stores a
//! whole step's rows of one layer in one launch and refreshes the bounds of
//! the blocks it touched in another.
//!
//! An offloaded storage ([`GpuKvStorage::new_offloaded`]) keeps only the
//! bounds and labels on the GPU; its K/V rows live in a host tier given per
//! layer by [`GpuKvStorage::set_tier`] (the offload engine's pinned pools
//! and resident slots), written through to both.

use std::sync::Arc;

use asynctls_kernels::cuda::{CudaOps, GpuKvPool, HostTier, KvGeometry};
use asynctls_kernels::CudaDevice;
use cudarc::driver::CudaSlice;

use crate::{BlockId, CacheConfig, CacheError, KvDType, KvStorage, LabelChannels, Result, ValueLayout};

/// GPU memory kept free beside the cache (activations, cuBLAS workspace, scratch).
pub const GPU_HEADROOM_BYTES: usize = 2 << 30;

/// Every layer's K/V, bounds and labels on one GPU.
#[derive(Debug)]
pub struct GpuKvStorage {
    config: CacheConfig,
    ops: Arc<CudaOps>,
    layers: Vec<GpuKvPool>,
    /// Layers from this one on keep their K/V rows in host tiers (see
    /// [`GpuKvStorage::new_offloaded`]); `num_layers` when none does.
    offloaded_from: usize,
}

impl GpuKvStorage {
    /// The geometry of one layer's pool.
    pub fn geometry(config: &CacheConfig) -> KvGeometry {
        KvGeometry {
            num_blocks: config.num_blocks,
            kv_heads: config.kv_heads,
            block_size: config.block_size,
            key_dim: config.key_dim,
            value_dim: config.value_dim(),
            separate_values: matches!(config.values, ValueLayout::Separate { .. }),
            label_channels: config.label_channels,
        }
    }

    /// Bytes the storage of `config` takes on the GPU.
    pub fn bytes_for(config: &CacheConfig) -> usize {
        Self::geometry(config).bytes().saturating_mul(config.num_layers)
    }

    /// Bytes an offloaded storage of `config` takes on the GPU: the first
    /// `resident_layers` whole, the bounds and labels of the others.
    pub fn offloaded_bytes_for(config: &CacheConfig, resident_layers: usize) -> usize {
        let g = Self::geometry(config);
        let resident = resident_layers.min(config.num_layers);
        g.metadata_bytes()
            .saturating_mul(config.num_layers)
            .saturating_add(g.kv_bytes().saturating_mul(resident))
    }

    /// A zeroed cache on `device`. Refused before any allocation when the
    /// GPU has less free memory than the cache and a headroom need.
    pub fn new(device: &CudaDevice, config: &CacheConfig, channels: LabelChannels) -> Result<Self> {
        Self::allocate(device, config, channels, config.num_layers)
    }

    /// A cache on `device` whose layers from `resident_layers` on keep only
    /// their bounds and labels there, their K/V rows to live in the host
    /// tiers that [`Self::set_tier`] gives each of them before the first
    /// write (the first layers stay whole on the GPU). Refused like
    /// [`Self::new`], for the GPU's part.
    pub fn new_offloaded(
        device: &CudaDevice,
        config: &CacheConfig,
        channels: LabelChannels,
        resident_layers: usize,
    ) -> Result<Self> {
        Self::allocate(device, config, channels, resident_layers.min(config.num_layers))
    }

    fn allocate(
        device: &CudaDevice,
        config: &CacheConfig,
        channels: LabelChannels,
        offloaded_from: usize,
    ) -> Result<Self> {
        config.validate()?;
        channels.validate(config)?;
        if config.kv_dtype != KvDType::BF16 {
            return Err(CacheError::InvalidConfig(format!(
                "the GPU cache stores bf16 K/V, not {:?}",
                config.kv_dtype
            )));
        }
        let need = Self::offloaded_bytes_for(config, offloaded_from);
        let (free, _total) = device.memory_info()?;
        if need.saturating_add(GPU_HEADROOM_BYTES) > free {
            return Err(CacheError::GpuMemory {
                blocks: config.num_blocks,
                layers: config.num_layers,
                need_gib: need as f64 / (1u64 << 30) as f64,
                free_gib: free as f64 / (1u64 << 30) as f64,
            });
        }
        let ops = device.ops()?;
        let layers = (0..config.num_layers)
            .map(|l| {
                let flat: Vec<u16> = (0..config.kv_heads).flat_map(|h| channels.get(l, h).to_vec()).collect();
                if l >= offloaded_from {
                    GpuKvPool::metadata_only(&ops, Self::geometry(config), &flat)
                } else {
                    GpuKvPool::new(&ops, Self::geometry(config), &flat)
                }
            })
            .collect::<asynctls_kernels::Result<Vec<_>>>()?;
        Ok(GpuKvStorage {
            config: config.clone(),
            ops,
            layers,
            offloaded_from,
        })
    }

    pub fn layer(&self, layer: usize) -> &GpuKvPool {
        &self.layers[layer]
    }

    /// Whether `layer`'s K/V rows live in a host tier.
    pub fn is_offloaded(&self, layer: usize) -> bool {
        layer >= self.offloaded_from
    }

    /// The layers that keep their K/V rows on the GPU (the first ones).
    pub fn resident_layers(&self) -> usize {
        self.offloaded_from
    }

    /// Gives an offloaded storage's `layer` its host tier.
    ///
    /// # Safety
    /// As [`GpuKvPool::set_tier`]: the tier must outlive every write, copy
    /// and read of the layer, laid out for this storage's geometry.
    pub unsafe fn set_tier(&mut self, layer: usize, tier: HostTier) -> Result<()> {
        let num_layers = self.layers.len();
        let pool = self
            .layers
            .get_mut(layer)
            .ok_or(CacheError::LayerOutOfRange { layer, num_layers })?;
        // SAFETY: the caller's contract.
        Ok(unsafe { pool.set_tier(tier) }?)
    }

    pub fn ops(&self) -> &Arc<CudaOps> {
        &self.ops
    }

    /// Stores a step's rows of `layer`: `keys` `[n, kv_heads, key_dim]` f32,
    /// `values` `[n, kv_heads, value_dim]` (None for MLA), row `i` into pool
    /// slot `slots[i]` (block * block_size + offset), then brings the bounds
    /// of the touched `blocks` up to their `fills` tokens. Block `i` got
    /// rows `starts[i]` to `starts[i + 1]`: an offloaded storage merges
    /// them into the bounds (its stored keys are in host memory), a
    /// resident one recomputes the blocks from the stored keys.
    ///
    /// # Safety
    /// Every slot must lie in the pool (`< num_blocks * block_size`), every
    /// block below `num_blocks`, and the starts ascend over the rows with
    /// each block's range within its fill: the indices live on the device
    /// and the kernels do not check them. An offloaded layer needs its tier.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn write_rows(
        &mut self,
        layer: usize,
        keys: &CudaSlice<f32>,
        values: Option<&CudaSlice<f32>>,
        slots: &CudaSlice<i32>,
        blocks: &CudaSlice<i32>,
        fills: &CudaSlice<i32>,
        starts: &CudaSlice<i32>,
    ) -> Result<()> {
        let num_layers = self.layers.len();
        let pool = self
            .layers
            .get_mut(layer)
            .ok_or(CacheError::LayerOutOfRange { layer, num_layers })?;
        let offloaded = layer >= self.offloaded_from;
        if offloaded && pool.tier().is_none() {
            return Err(CacheError::InvalidConfig(format!(
                "layer {layer} of an offloaded cache has no host tier"
            )));
        }
        // SAFETY: the caller's contract (above).
        unsafe {
            self.ops.append(pool, keys, values, slots)?;
            if offloaded {
                self.ops.merge_bounds(pool, keys, blocks, fills, starts)?;
            } else {
                self.ops.refresh_bounds(pool, blocks, fills)?;
            }
        }
        Ok(())
    }
}

impl KvStorage for GpuKvStorage {
    fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// One token through the batched path (a test and fallback path; the
    /// engine writes whole steps with [`GpuKvStorage::write_rows`]).
    fn write_token(&mut self, layer: usize, block: BlockId, slot: usize, key: &[f32], value: &[f32]) -> Result<()> {
        let s = self.ops.device().stream().clone();
        let keys = s.clone_htod(key).map_err(asynctls_kernels::Error::from)?;
        let values = if value.is_empty() {
            None
        } else {
            Some(s.clone_htod(value).map_err(asynctls_kernels::Error::from)?)
        };
        let bs = self.config.block_size;
        let at = (block.0 as usize * bs + slot) as i32;
        let slots = s.clone_htod(&[at]).map_err(asynctls_kernels::Error::from)?;
        let blocks = s.clone_htod(&[block.0 as i32]).map_err(asynctls_kernels::Error::from)?;
        let fills = s
            .clone_htod(&[(slot + 1) as i32])
            .map_err(asynctls_kernels::Error::from)?;
        let starts = s.clone_htod(&[0i32, 1]).map_err(asynctls_kernels::Error::from)?;
        if block.0 as usize >= self.config.num_blocks || slot >= bs {
            return Err(CacheError::InvalidConfig(format!(
                "block {} slot {slot} is outside the pool of {} blocks of {bs}",
                block.0, self.config.num_blocks
            )));
        }
        // SAFETY: the one slot and block were checked against the pool just above.
        unsafe { self.write_rows(layer, &keys, values.as_ref(), &slots, &blocks, &fills, &starts) }
    }

    /// Copy-on-write of a shared partial block: the block's rows, labels
    /// and bounds in every layer, device to device.
    fn copy_block(&mut self, src: BlockId, dst: BlockId, _tokens: usize) -> Result<()> {
        let (s, d) = (src.0 as usize, dst.0 as usize);
        let c = &self.config;
        let stream = self.ops.device().stream().clone();
        let unit = c.kv_heads * c.block_size;
        for pool in &mut self.layers {
            if pool.tier().is_some() {
                // SAFETY: both blocks come from the cache's allocator (below
                // num_blocks) and differ; the tier is the layer's (set_tier).
                unsafe { self.ops.copy_tier_block(pool, s, d) }?;
            } else {
                copy_range(&stream, &mut pool.keys, s, d, unit * c.key_dim)?;
                if let Some(v) = pool.values.as_mut() {
                    copy_range(&stream, v, s, d, unit * c.value_dim())?;
                }
            }
            copy_range(&stream, &mut pool.bounds, s, d, c.kv_heads * 2 * c.key_dim)?;
            copy_range(&stream, &mut pool.labels, s, d, unit * c.label_channels / 2)?;
            copy_range(&stream, &mut pool.label_params, s, d, unit * 2)?;
        }
        Ok(())
    }

    /// GPU bytes (an offloaded storage's host tier is its engine's).
    fn allocated_bytes(&self) -> usize {
        Self::offloaded_bytes_for(&self.config, self.offloaded_from)
    }
}

/// Copies block `src`'s `per_block` elements over block `dst`'s.
fn copy_range<T: cudarc::driver::DeviceRepr>(
    stream: &cudarc::driver::CudaStream,
    buf: &mut CudaSlice<T>,
    src: usize,
    dst: usize,
    per_block: usize,
) -> Result<()> {
    use cudarc::driver::DevicePtr;
    let (base, _guard) = buf.device_ptr(stream);
    let size = std::mem::size_of::<T>();
    let bytes = per_block * size;
    // SAFETY: both ranges lie inside `buf` (block ids come from the cache's
    // allocator, below num_blocks) and do not overlap (src != dst).
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(
            base + (dst * bytes) as u64,
            base + (src * bytes) as u64,
            bytes,
            stream.cu_stream(),
        )
    }
    .map_err(asynctls_kernels::Error::from)?;
    Ok(())
}
