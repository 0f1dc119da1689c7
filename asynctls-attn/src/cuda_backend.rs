//! [`CudaAttention`]: the attention backend on a GPU. It owns the
//! GPU-resident paged cache ([`GpuKvStorage`]), the selection and decode
//! scratch, and the per-step metadata (write slots, touched blocks, block
//! tables, lengths) that is built once per step and read by every layer.
//! The [`SparseConfig`] -> GPU selection parameters conversion lives here,
//! once.
//!
//! Offloaded ([`CudaAttention::offloaded`]), the cache's K/V rows live in
//! pinned host memory with a pool of resident slots per layer, and the GPU
//! keeps the block bounds and labels: writes go through to the host tier
//! (and to a unit's slot when it has one), a sparse decode resolves its
//! selection to slots on the device ([`GpuResidency`]) and promotes its
//! misses behind the next layers, dense passes read through the unit ->
//! slot table, and a prefill chunk copies each layer's prefix into a GPU
//! staging buffer and attends there (`PrefillStaging`). A decode step
//! stays launches only, so it is captured as one CUDA graph as before.

use std::any::Any;

use asynctls_kernels::cuda::attention::{decode_splits, DecodeKernel};
use asynctls_kernels::cuda::gather::{ResolveInput, SelectionShape};
use asynctls_kernels::cuda::{CudaOps, DecodeScratch, PagedKvView, SelectParams, SelectScratch};
use asynctls_kernels::{CudaDevice, DType, Device, Tensor};
use asynctls_kvcache::{CacheConfig, GpuKvStorage, LabelChannels, PagedKvCache, SeqId};
use cudarc::driver::CudaSlice;

use asynctls_offload::cuda::CudaLayout;
use asynctls_offload::gpu_resolver::{GpuResidency, ResolverSizing};
use asynctls_offload::resolver::{PromotePolicy, ResidencyStats};

use crate::backend::{make_step, reserve_decode, Sequences};
use crate::step_layout::{step_layout, StepLayout};
use crate::{AttentionBackend, AttnError, AttnShape, Policy, Result, SparseConfig, Step, StepKind};

/// Blocks ds keeps in the GPU's block stage: all it can, so the stage keeps
/// every rankable block and ds ranks every token by its labels, as on the
/// CPU. The token stage takes at most `MAX_TOPK_ITEMS` candidates, so ds on
/// the GPU reaches contexts of about 32k tokens; longer is an error
/// ([`check_ds_reach`]), never a silent block filter.
fn ds_block_topk(block_size: usize) -> usize {
    asynctls_kernels::cuda::select::MAX_TOPK_ITEMS / block_size.max(1)
}

/// ds over `longest_blocks` blocks is exact only when every rankable block
/// (all but the sink and local ones) passes the block stage.
fn check_ds_reach(params: &SelectParams, longest_blocks: usize, block_size: usize) -> Result<()> {
    let rankable = longest_blocks.saturating_sub(params.sink_blocks + params.local_blocks);
    if rankable > params.block_topk {
        return Err(AttnError::Config(format!(
            "ds on the GPU ranks at most {} blocks ({} tokens) by their labels; this step reaches {longest_blocks} \
             blocks of {block_size} (use tls, or ds with --device cpu)",
            params.block_topk,
            params.block_topk * block_size
        )));
    }
    Ok(())
}

/// Whether `config` on the GPU serves sequences of `longest_blocks` blocks:
/// an error for ds beyond its reach, before any work is done (the engine
/// and the benches ask up front; the attention asks again at each step).
pub fn check_gpu_reach(config: &SparseConfig, longest_blocks: usize, block_size: usize) -> Result<()> {
    match (config.policy, select_params(config, block_size)?) {
        (Policy::Ds, Some(p)) => check_ds_reach(&p, longest_blocks, block_size),
        _ => Ok(()),
    }
}

/// The selection parameters of `config` on the GPU (`None`: dense).
pub fn select_params(config: &SparseConfig, block_size: usize) -> Result<Option<SelectParams>> {
    config.validate()?;
    let (block_topk, token_topk) = match config.policy {
        Policy::Dense => return Ok(None),
        Policy::Tls => (config.block_topk, config.token_topk),
        // Quest attends every token of its blocks: a token budget that keeps
        // all candidates turns the label stage into the identity.
        Policy::Quest => (config.block_topk, config.block_topk * block_size),
        // DoubleSparse: labels over every token, the block stage keeping all.
        Policy::Ds => (ds_block_topk(block_size), config.token_topk),
    };
    Ok(Some(SelectParams {
        block_topk,
        token_topk,
        sink_blocks: config.sink_blocks,
        local_blocks: config.local_blocks,
        reduce_max: config.group_reduce == crate::GroupReduce::Max,
    }))
}

/// Device copies of one step's cache metadata.
#[derive(Debug)]
struct StepMeta {
    /// Pool slot (block * block_size + offset) of each token written.
    slots: CudaSlice<i32>,
    /// Physical blocks the step's writes touch and their fill after it.
    blocks: CudaSlice<i32>,
    fills: CudaSlice<i32>,
    /// `[blocks + 1]`: block `i` gets the step's rows `starts[i]..starts[i + 1]`.
    starts: CudaSlice<i32>,
    /// `[seqs, max_blocks]` physical blocks, and the lengths after the step.
    table: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    max_blocks: usize,
    max_len: usize,
}

/// A GPU-resident KV cache and the kernels that attend over it.
#[derive(Debug)]
pub struct CudaAttention {
    cache: PagedKvCache<GpuKvStorage>,
    device: Device,
    ops: std::sync::Arc<CudaOps>,
    sms: usize,
    decode_scratch: DecodeScratch,
    select_scratch: SelectScratch,
    /// The current prefill chunk's metadata and the current decode step's
    /// (both live at once in a mixed step).
    prefill_meta: Option<StepMeta>,
    decode_meta: Option<StepMeta>,
    /// The batch size whose persistent metadata the current decode step
    /// uses (instead of `decode_meta`).
    active_persistent: Option<usize>,
    /// Set for CUDA graph replay: decode metadata then lives in persistent
    /// buffers per batch size (fixed addresses), with block tables
    /// `graph_capacity` blocks wide.
    graph_capacity: Option<usize>,
    persistent: std::collections::HashMap<usize, (StepMeta, Tensor)>,
    /// See [`AttentionBackend::graph_generation`]; with the scratch
    /// footprint it was last checked against.
    generation: u64,
    footprint: ((usize, usize), [usize; 6]),
    /// A process-wide id, so graphs of another backend never match.
    id: u64,
    /// The host tier and device-side residency, when offloaded.
    offload: Option<Offload>,
}

/// An offloaded cache's residency and where its decode step stands.
struct Offload {
    /// Over the layers from `first_layer` on (the residency's layer 0).
    residency: GpuResidency,
    first_layer: usize,
    /// The step's `begin_step` is issued (by its first decode attention, so
    /// a captured graph replays it).
    step_open: bool,
    /// The counters at the last `take_offload_reads`, summed over layers.
    reported: ResidencyStats,
    /// A prefill chunk's prefix of one layer, copied from the host tier.
    staging: Option<PrefillStaging>,
}

impl Offload {
    /// `layer`'s index in the residency (`None` for a resident layer).
    fn tier_layer(&self, layer: usize) -> Option<usize> {
        layer.checked_sub(self.first_layer)
    }
}

/// One layer's K/V of the sequence being prefilled, on the GPU: its blocks
/// in logical order, so the view's block table is the identity.
///
/// Why: the prefill kernel gives each CTA a tile of query rows and walks
/// the whole prefix, so read in place from the host tier every CTA pulls
/// the prefix over PCIe again (measured on Qwen2.5-Coder-0.5B, 30k tokens:
/// 3,000 prefill tokens/s offloaded against 70,000 resident). Copied once
/// per layer and chunk by DMA, the prefix crosses PCIe once and the CTAs
/// re-read it from HBM. One layer's buffer serves every layer in turn (the
/// copies and the attention are ordered on the compute stream). It holds
/// one layer's K/V of the longest prompt prefilled so far (rounded up to
/// [`STAGING_GRAIN_BLOCKS`]) and lives as long as the backend, inside the
/// cache's GPU headroom: for a 96k Qwen3-8B prompt 1,536 blocks of 256 KiB
/// (keys and values of 8 heads), 384 MiB.
struct PrefillStaging {
    keys: CudaSlice<half::bf16>,
    values: Option<CudaSlice<half::bf16>>,
    /// `[capacity]`: 0, 1, 2, ...
    identity: CudaSlice<i32>,
    capacity: usize,
}

/// The staging buffer grows in steps of this many blocks (4,096 tokens of
/// 64): a reallocation every two 2,048-token chunks at most, and under one
/// step of slack.
const STAGING_GRAIN_BLOCKS: usize = 64;

impl PrefillStaging {
    /// A buffer of at least `blocks` blocks.
    fn ensure<'a>(
        staging: &'a mut Option<PrefillStaging>,
        device: &CudaDevice,
        blocks: usize,
        key_block: usize,
        value_block: usize,
    ) -> Result<&'a mut PrefillStaging> {
        if staging.as_ref().is_none_or(|s| s.capacity < blocks) {
            let capacity = blocks.next_multiple_of(STAGING_GRAIN_BLOCKS);
            let stream = device.stream();
            // Free the old buffer first: its memory is the new one's.
            *staging = None;
            let identity: Vec<i32> = (0..capacity as i32).collect();
            let driver = |e| AttnError::from(asynctls_kernels::Error::from(e));
            *staging = Some(PrefillStaging {
                keys: stream.alloc_zeros::<half::bf16>(capacity * key_block).map_err(driver)?,
                values: if value_block > 0 {
                    Some(
                        stream
                            .alloc_zeros::<half::bf16>(capacity * value_block)
                            .map_err(driver)?,
                    )
                } else {
                    None
                },
                identity: stream.clone_htod(&identity).map_err(driver)?,
                capacity,
            });
        }
        Ok(staging.as_mut().expect("allocated above"))
    }

    /// Copies the host blocks `blocks` (physical ids, in logical order) of
    /// one layer's host pools into blocks 0.. of this buffer, one DMA per
    /// run of consecutive physical blocks, on the device's stream.
    ///
    /// # Safety
    /// `host_keys` / `host_values` are device-mapped host pools of at least
    /// `max(blocks) + 1` blocks of `key_block` / `value_block` elements.
    unsafe fn stage(
        &mut self,
        device: &CudaDevice,
        host_keys: u64,
        host_values: u64,
        blocks: &[u32],
        key_block: usize,
        value_block: usize,
    ) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        let stream = device.stream();
        let (k_base, _k) = self.keys.device_ptr_mut(stream);
        let v_base = self.values.as_mut().map(|v| v.device_ptr_mut(stream));
        let elem = std::mem::size_of::<half::bf16>();
        for (i, run) in block_runs(blocks) {
            let copies = [(k_base, host_keys, key_block)];
            let values = v_base.as_ref().map(|(base, _)| (*base, host_values, value_block));
            for (dst, src, per_block) in copies.into_iter().chain(values) {
                let bytes = per_block * elem;
                // SAFETY (the caller's): the source run lies inside the host
                // pool; the destination, blocks i..i + run < capacity, inside
                // this buffer. cuMemcpyAsync infers the mapped host source.
                unsafe {
                    cudarc::driver::sys::cuMemcpyAsync(
                        dst + (i * bytes) as u64,
                        src + (blocks[i] as usize * bytes) as u64,
                        run * bytes,
                        stream.cu_stream(),
                    )
                }
                .result()
                .map_err(asynctls_kernels::Error::from)?;
            }
        }
        Ok(())
    }
}

/// `blocks` split into maximal runs of consecutive ids, as (first index,
/// length): each run is one copy.
fn block_runs(blocks: &[u32]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let mut run = 1;
        while i + run < blocks.len() && blocks[i + run] == blocks[i].wrapping_add(run as u32) {
            run += 1;
        }
        runs.push((i, run));
        i += run;
    }
    runs
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload").field("residency", &self.residency).finish()
    }
}

/// How an offloaded [`CudaAttention`] keeps its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadOptions {
    /// Resident (block, KV head) units per layer on the GPU.
    pub slots_per_layer: usize,
    /// Which resident units a promotion may evict.
    pub policy: PromotePolicy,
    /// Host pools shared by the layers (`None`: one per layer). Fewer than
    /// the layers alias their rows: for benchmarks of more K/V than the
    /// host holds, never for results that are read.
    pub host_tiers: Option<usize>,
    /// The first layers keep their K/V on the GPU: the dense leading layers
    /// read every block each step, which over PCIe would cost more than the
    /// whole sparse step.
    pub resident_layers: usize,
    /// Blocks of a resident tier beside the offloaded cache (0: none):
    /// sequences go there, K/V whole on the device, while it has room, and
    /// to the offloaded cache beyond it ([`crate::TieredAttention`]).
    pub resident_tier_blocks: usize,
}

impl OffloadOptions {
    /// `slots_per_layer` units, the union-of-last-two predictor promoting
    /// every miss, a host pool per layer.
    pub fn new(slots_per_layer: usize) -> Self {
        OffloadOptions {
            slots_per_layer,
            policy: PromotePolicy::union_of_last_two(usize::MAX),
            host_tiers: None,
            resident_layers: 0,
            resident_tier_blocks: 0,
        }
    }
}

/// Refuses, before the cache is allocated rather than at the first prompt,
/// a cache of head shapes the GPU kernels are not built for.
fn check_kernel_shapes(config: &CacheConfig) -> Result<()> {
    let in_keys = !matches!(config.values, asynctls_kvcache::ValueLayout::Separate { .. });
    if !asynctls_kernels::cuda::prefill::prefill_supports(config.key_dim, config.value_dim(), in_keys) {
        return Err(AttnError::Config(format!(
            "the GPU kernels take head dims 64 and 128 (GQA) and 576/512 (MLA), not key dim {} / value dim {}: \
             use --device cpu for this model",
            config.key_dim,
            config.value_dim()
        )));
    }
    Ok(())
}

/// Backends created so far (their ids).
static BACKENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl CudaAttention {
    /// A cache of `config` on `device`; refused before allocating when it
    /// does not fit the GPU's free memory.
    pub fn new(device: &CudaDevice, config: &CacheConfig, channels: LabelChannels) -> Result<Self> {
        check_kernel_shapes(config)?;
        let storage = GpuKvStorage::new(device, config, channels)?;
        Self::with_storage(device, storage, None)
    }

    /// A cache of `config` whose K/V rows live in pinned host memory, with
    /// `options.slots_per_layer` resident units per layer on `device` and
    /// the bounds and labels there (GQA, or MLA's latent cache). Refused before
    /// allocating when the host tier does not fit the host's available
    /// memory or the bounds and labels the GPU's.
    pub fn offloaded(
        device: &CudaDevice,
        config: &CacheConfig,
        channels: LabelChannels,
        options: OffloadOptions,
    ) -> Result<Self> {
        check_kernel_shapes(config)?;
        // MLA's values are the latent channels of its keys: no value pools.
        let in_keys = !matches!(config.values, asynctls_kvcache::ValueLayout::Separate { .. });
        let value_dim = if in_keys { 0 } else { config.value_dim() };
        if options.slots_per_layer == 0 {
            return Err(AttnError::Config(
                "an offloaded cache needs at least one resident slot per layer".into(),
            ));
        }
        config.validate()?;
        let first_layer = options.resident_layers;
        if first_layer >= config.num_layers {
            return Err(AttnError::Config(format!(
                "{first_layer} resident (dense) layers of {}: no layer is left to offload (fewer dense layers, or \
                 no offload)",
                config.num_layers
            )));
        }
        let offloaded_layers = config.num_layers - first_layer;
        let layout = CudaLayout {
            num_layers: offloaded_layers,
            kv_heads: config.kv_heads,
            host_blocks: config.num_blocks,
            block_size: config.block_size,
            key_dim: config.key_dim,
            value_dim,
            slots_per_layer: options.slots_per_layer,
        };
        let tiers = options
            .host_tiers
            .unwrap_or(offloaded_layers)
            .clamp(1, offloaded_layers);
        let unit_rows = config.num_blocks * config.kv_heads * config.block_size;
        let host_bytes = unit_rows
            .checked_mul((config.key_dim + value_dim) * 2)
            .and_then(|b| b.checked_mul(tiers))
            .ok_or_else(|| AttnError::Config("the host tier's size overflows".into()))?;
        if let Some(available) = asynctls_offload::host_available_bytes() {
            if host_bytes > available {
                return Err(AttnError::Config(format!(
                    "the host tier needs {:.1} GiB of pinned memory ({} blocks x {} layers); {:.1} GiB are available",
                    host_bytes as f64 / (1u64 << 30) as f64,
                    config.num_blocks,
                    tiers,
                    available as f64 / (1u64 << 30) as f64
                )));
            }
        }
        let (free, _) = device.memory_info()?;
        // The same headroom beside the cache as a resident one keeps.
        let need = GpuKvStorage::offloaded_bytes_for(config, first_layer)
            .saturating_add(layout.resident_bytes())
            .saturating_add(asynctls_kvcache::GPU_HEADROOM_BYTES);
        if need > free {
            return Err(asynctls_kvcache::CacheError::GpuMemory {
                blocks: config.num_blocks,
                layers: config.num_layers,
                need_gib: need as f64 / (1u64 << 30) as f64,
                free_gib: free as f64 / (1u64 << 30) as f64,
            }
            .into());
        }
        let mut storage = GpuKvStorage::new_offloaded(device, config, channels, first_layer)?;
        // Sized for one sequence; decode steps grow it (ensure_sizing).
        let sizing = ResolverSizing {
            rows: config.kv_heads,
            max_entries: 8,
            max_blocks: 8,
        };
        let residency = GpuResidency::with_host_tiers(device, layout, options.policy, sizing, tiers)?;
        for layer in first_layer..config.num_layers {
            // SAFETY: the residency's pools and tables are laid out for this
            // cache's geometry (the layout above) and live in the same
            // backend, dropped after the cache (field order) and after its
            // streams are synchronized (GpuResidency's drop).
            unsafe { storage.set_tier(layer, residency.host_tier(layer - first_layer)) }?;
        }
        Self::with_storage(
            device,
            storage,
            Some(Offload {
                residency,
                first_layer,
                step_open: false,
                reported: ResidencyStats::default(),
                staging: None,
            }),
        )
    }

    fn with_storage(device: &CudaDevice, storage: GpuKvStorage, offload: Option<Offload>) -> Result<Self> {
        let ops = device.ops()?;
        let sms = device.multiprocessors();
        Ok(CudaAttention {
            cache: PagedKvCache::new(storage)?,
            device: Device::Cuda(device.clone()),
            decode_scratch: DecodeScratch::new(&ops)?,
            select_scratch: SelectScratch::new(&ops)?,
            ops,
            sms,
            prefill_meta: None,
            decode_meta: None,
            active_persistent: None,
            graph_capacity: None,
            persistent: std::collections::HashMap::new(),
            generation: 0,
            footprint: ((0, 0), [0; 6]),
            id: BACKENDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            offload,
        })
    }

    /// The residency of an offloaded cache.
    pub fn residency(&self) -> Option<&GpuResidency> {
        self.offload.as_ref().map(|o| &o.residency)
    }

    /// Empties an offloaded cache's residency (every unit back to the host
    /// tier only, counters zeroed): what a benchmark does between rows so
    /// that each starts cold. The rows themselves stay.
    pub fn reset_residency(&mut self) -> Result<()> {
        if let Some(off) = self.offload.as_mut() {
            let policy = off.residency.policy();
            off.residency.reset(policy)?;
            off.step_open = false;
            off.reported = ResidencyStats::default();
        }
        Ok(())
    }

    /// A decode step that failed (or whose capture failed) part-way left
    /// its residency step open: its copies are joined eagerly before
    /// anything else writes the cache, and the step is closed.
    fn close_failed_step(&mut self) -> Result<()> {
        if let Some(off) = self.offload.as_mut() {
            if off.step_open {
                off.residency.abort_step()?;
                off.step_open = false;
            }
        }
        Ok(())
    }

    /// Bumps the generation when a scratch buffer was replaced since the
    /// last check (a grown buffer has a new address).
    fn note_footprint(&mut self) {
        let now = (self.decode_scratch.footprint(), self.select_scratch.footprint());
        if now != self.footprint {
            self.footprint = now;
            self.generation += 1;
        }
    }

    pub fn cache(&self) -> &PagedKvCache<GpuKvStorage> {
        &self.cache
    }

    /// Reserves `len` positions of `seq` and writes random K/V (uniform in
    /// [-1, 1)) into every layer, as a prefill would but without the model:
    /// what a decode benchmark at a long context starts from.
    pub fn fill_random(&mut self, seq: SeqId, len: usize, seed: u64) -> Result<()> {
        const CHUNK: usize = 8192;
        let c = self.cache.config().clone();
        let start = self.cache.table(seq)?.len();
        self.cache.reserve(seq, len)?;
        let (kw, vw) = (c.kv_heads * c.key_dim, c.kv_heads * c.value_dim());
        for at in (start..start + len).step_by(CHUNK) {
            let n = CHUNK.min(start + len - at);
            let positions: Vec<usize> = (at..at + n).collect();
            self.prefill_meta = Some(self.build_meta(&[seq], &vec![seq; n], &positions)?);
            for layer in 0..c.num_layers {
                let salt = seed ^ ((layer as u64) << 40) ^ at as u64;
                let keys = asynctls_kernels::ops::fill_uniform(&[n, kw], DType::F32, &self.device, salt, 1.0, 0.0)?;
                let values =
                    asynctls_kernels::ops::fill_uniform(&[n, vw.max(1)], DType::F32, &self.device, !salt, 1.0, 0.0)?;
                let step = make_step(
                    StepKind::Prefill { seq, start: at },
                    vec![seq],
                    positions.clone(),
                    &Device::Cpu,
                )?;
                self.write_kv(&step, layer, &keys, &values)?;
            }
        }
        self.prefill_meta = None;
        Ok(())
    }

    /// The token lists of the last sparse decode (rows `seq * kv_heads + head`).
    pub fn last_selection(&self) -> Result<Vec<Vec<i32>>> {
        let lists = self.select_scratch.lists();
        let stream = self.ops.device().stream();
        let counts = stream.clone_dtoh(lists.counts).map_err(asynctls_kernels::Error::from)?;
        let tokens = stream.clone_dtoh(lists.tokens).map_err(asynctls_kernels::Error::from)?;
        Ok(counts
            .iter()
            .enumerate()
            .map(|(r, &c)| tokens[r * lists.max_tokens..r * lists.max_tokens + c.max(0) as usize].to_vec())
            .collect())
    }

    fn upload(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        let stream = self.ops.device().stream();
        Ok(stream.clone_htod(v).map_err(asynctls_kernels::Error::from)?)
    }

    /// Builds and uploads the metadata of a step over `seqs` whose tokens
    /// are at `positions` (one sequence repeated for a prefill chunk).
    fn build_meta(&self, seqs: &[SeqId], token_seqs: &[SeqId], positions: &[usize]) -> Result<StepMeta> {
        let host = self.host_meta(seqs, token_seqs, positions, None)?;
        Ok(StepMeta {
            slots: self.upload(&host.slots)?,
            blocks: self.upload(&host.blocks)?,
            fills: self.upload(&host.fills)?,
            starts: self.upload(&host.starts)?,
            table: self.upload(&host.table)?,
            lens: self.upload(&host.lens)?,
            max_blocks: host.max_blocks,
            max_len: host.max_len,
        })
    }

    /// The metadata of a step on the host ([`step_layout`] over this cache).
    fn host_meta(
        &self,
        seqs: &[SeqId],
        token_seqs: &[SeqId],
        positions: &[usize],
        width: Option<usize>,
    ) -> Result<StepLayout> {
        step_layout(&self.cache, seqs, token_seqs, positions, width)
    }

    /// Decode metadata for graph replay: written into the batch size's
    /// persistent buffers (allocated on first use), so a graph captured on
    /// an earlier step reads this step's values at the same addresses.
    fn persistent_meta(&mut self, seqs: &[SeqId], positions: &[usize], width: usize) -> Result<Tensor> {
        let host = self.host_meta(seqs, seqs, positions, Some(width))?;
        let b = seqs.len();
        if host.blocks.len() != b {
            return Err(AttnError::Config(
                "a decode step must touch one block per sequence".into(),
            ));
        }
        let (mut meta, mut pos) = match self.persistent.remove(&b) {
            Some(found) if found.0.max_blocks == width => found,
            _ => {
                // New buffers at new addresses.
                self.generation += 1;
                let s = self.ops.device().stream();
                let zeros = |n: usize| -> Result<CudaSlice<i32>> {
                    Ok(s.alloc_zeros::<i32>(n).map_err(asynctls_kernels::Error::from)?)
                };
                (
                    StepMeta {
                        slots: zeros(b)?,
                        blocks: zeros(b)?,
                        fills: zeros(b)?,
                        starts: zeros(b + 1)?,
                        table: zeros(b * width)?,
                        lens: zeros(b)?,
                        max_blocks: width,
                        max_len: 0,
                    },
                    Tensor::zeros_on(&[b], DType::I32, &self.device)?,
                )
            }
        };
        let s = self.ops.device().stream().clone();
        let copy = |src: &[i32], dst: &mut CudaSlice<i32>| -> Result<()> {
            Ok(s.memcpy_htod(src, dst).map_err(asynctls_kernels::Error::from)?)
        };
        copy(&host.slots, &mut meta.slots)?;
        copy(&host.blocks, &mut meta.blocks)?;
        copy(&host.fills, &mut meta.fills)?;
        copy(&host.starts, &mut meta.starts)?;
        copy(&host.table, &mut meta.table)?;
        copy(&host.lens, &mut meta.lens)?;
        meta.max_len = host.max_len;
        let p: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        pos.write_from_host(&p)?;
        let handle = pos.clone();
        self.persistent.insert(b, (meta, pos));
        Ok(handle)
    }

    /// Replays of decode steps read persistent metadata: `max_blocks` is the
    /// width of their block tables (the most blocks a sequence may reach
    /// while the graphs live). Until this is called, steps upload fresh
    /// metadata (eager launches only).
    pub fn enable_graphs(&mut self, max_blocks: usize) {
        self.graph_capacity = Some(max_blocks.max(1));
        self.persistent.clear();
        self.generation += 1;
    }
}

/// The metadata of the current step of `kind`: a prefill chunk's own; a
/// decode step's in the batch size's persistent buffers in graph mode, else
/// its own (a free function over the fields, so callers can hold it while
/// they write the cache).
fn current_meta<'a>(
    kind: StepKind,
    prefill: &'a Option<StepMeta>,
    decode: &'a Option<StepMeta>,
    persistent: &'a std::collections::HashMap<usize, (StepMeta, Tensor)>,
    active: Option<usize>,
    op: &str,
) -> Result<&'a StepMeta> {
    match (kind, active) {
        (StepKind::Mixed, _) => return Err(crate::backend::mixed_step_err()),
        (StepKind::Prefill { .. }, _) => prefill.as_ref(),
        (StepKind::Decode, Some(b)) => persistent.get(&b).map(|m| &m.0),
        (StepKind::Decode, None) => decode.as_ref(),
    }
    .ok_or_else(|| AttnError::Config(format!("{op} outside a step (call begin_prefill or begin_decode)")))
}

/// The offload state and `layer`'s index among the offloaded layers, when
/// `layer` is one of them.
fn offloaded_layer(offload: &mut Option<Offload>, layer: usize) -> Option<(usize, &mut Offload)> {
    offload.as_mut().and_then(|o| Some((o.tier_layer(layer)?, o)))
}

/// `view` (the resident pool's) for a pass over every block: offloaded,
/// the slots where units have one and the host tier for the others.
fn full_view<'a>(offload: Option<&'a Offload>, layer: usize, view: PagedKvView<'a>) -> PagedKvView<'a> {
    match offload.and_then(|o| Some((o, o.tier_layer(layer)?))) {
        Some((o, tier_layer)) => tier_view(view, o.residency.dense_view(tier_layer)),
        None => view,
    }
}

/// `view` reading the slot pools and host tier of `tier` (a residency's
/// `dense_view` or `offloaded`) instead of the pool's own K/V.
fn tier_view<'a>(view: PagedKvView<'a>, tier: TierParts<'a>) -> PagedKvView<'a> {
    let (keys, values, offload) = tier;
    PagedKvView {
        keys,
        values,
        offload: Some(offload),
        ..view
    }
}

/// What a residency hands a view: slot keys, slot values, the lookup.
type TierParts<'a> = (
    &'a CudaSlice<half::bf16>,
    Option<&'a CudaSlice<half::bf16>>,
    asynctls_kernels::cuda::OffloadedKv<'a>,
);

fn gpu_err(what: &'static str) -> AttnError {
    AttnError::Config(format!("{what} must be a whole f32 tensor on the GPU"))
}

impl AttentionBackend for CudaAttention {
    fn device(&self) -> &Device {
        &self.device
    }

    fn sequences(&self) -> &dyn Sequences {
        &self.cache
    }

    fn sequences_mut(&mut self) -> &mut dyn Sequences {
        &mut self.cache
    }

    fn begin_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<Step> {
        self.close_failed_step()?;
        let (start, positions) = self.cache.reserve_prefill(seq, n, limit)?;
        self.prefill_meta = Some(self.build_meta(&[seq], &vec![seq; n], &positions)?);
        make_step(StepKind::Prefill { seq, start }, vec![seq], positions, &self.device)
    }

    /// A decode step's rows are recorded as written in every layer here,
    /// before the forward: a replayed graph writes them without calling back
    /// into the host. A step that fails part-way leaves its sequences
    /// unusable; the engine frees them.
    fn begin_decode(&mut self, seqs: &[SeqId], limit: usize) -> Result<Step> {
        self.close_failed_step()?;
        let positions = reserve_decode(&mut self.cache, seqs, limit)?;
        for layer in 0..self.cache.config().num_layers {
            for (&s, &p) in seqs.iter().zip(&positions) {
                self.cache.mark_written(s, layer, p, 1)?;
            }
        }
        match self.graph_capacity {
            None => {
                self.decode_meta = Some(self.build_meta(seqs, seqs, &positions)?);
                self.active_persistent = None;
                make_step(StepKind::Decode, seqs.to_vec(), positions, &self.device)
            }
            Some(width) => {
                let positions_tensor = self.persistent_meta(seqs, &positions, width)?;
                self.active_persistent = Some(seqs.len());
                Ok(Step::decode_at(seqs, positions, positions_tensor))
            }
        }
    }

    fn write_kv(&mut self, step: &Step, layer: usize, keys: &Tensor, values: &Tensor) -> Result<()> {
        // Everything is checked before the write is recorded, so a refused
        // write leaves the cache as it was; decode rows were recorded by
        // `begin_decode`.
        let k = keys.cuda_slice::<f32>().map_err(|_| gpu_err("keys"))?;
        if layer >= self.cache.config().num_layers {
            return Err(asynctls_kvcache::CacheError::LayerOutOfRange {
                layer,
                num_layers: self.cache.config().num_layers,
            }
            .into());
        }
        let separate = self.cache.storage().layer(layer).geometry.separate_values;
        let v = if separate {
            Some(values.cuda_slice::<f32>().map_err(|_| gpu_err("values"))?)
        } else {
            None
        };
        let meta = current_meta(
            step.kind,
            &self.prefill_meta,
            &self.decode_meta,
            &self.persistent,
            self.active_persistent,
            "write_kv",
        )?;
        if let StepKind::Prefill { seq, start } = step.kind {
            self.cache.mark_written(seq, layer, start, step.tokens())?;
        }
        // SAFETY: the step's slots, blocks and fills were built by
        // `build_meta` / `persistent_meta` from this cache's block tables.
        Ok(unsafe {
            self.cache
                .storage_mut()
                .write_rows(layer, k, v, &meta.slots, &meta.blocks, &meta.fills, &meta.starts)
        }?)
    }

    fn attend(
        &mut self,
        step: &Step,
        layer: usize,
        q: &Tensor,
        shape: &AttnShape,
        sparse: &SparseConfig,
    ) -> Result<Tensor> {
        let n = step.tokens();
        let qs = q.cuda_slice::<f32>().map_err(|_| gpu_err("queries"))?;
        let mut out = Tensor::zeros_on(&[n, shape.q_heads * shape.value_dim], DType::F32, &self.device)?;
        let meta = current_meta(
            step.kind,
            &self.prefill_meta,
            &self.decode_meta,
            &self.persistent,
            self.active_persistent,
            "attend",
        )?;
        let pool = self.cache.storage().layer(layer);
        let view = pool.view(&meta.table, meta.max_blocks, &meta.lens);
        match step.kind {
            StepKind::Mixed => return Err(crate::backend::mixed_step_err()),
            StepKind::Prefill { seq, start } => {
                let o = out.cuda_slice_mut::<f32>()?;
                let tiered = offloaded_layer(&mut self.offload, layer);
                match tiered {
                    None => self
                        .ops
                        .prefill_attention(qs, &view, start, shape.q_heads, shape.scale, o)?,
                    Some((tier_layer, off)) => {
                        // The prefix (this chunk's rows included: written
                        // through by write_kv, earlier on this stream) staged
                        // on the GPU, then attended from there.
                        let Device::Cuda(dev) = &self.device else {
                            unreachable!("a CUDA backend's device")
                        };
                        let bs = view.block_size;
                        let blocks = (start + n).div_ceil(bs);
                        let table = self.cache.table(seq)?.blocks();
                        if table.len() < blocks {
                            return Err(AttnError::Config(format!(
                                "a prefill to position {} needs {blocks} blocks; the sequence holds {}",
                                start + n,
                                table.len()
                            )));
                        }
                        let physical: Vec<u32> = table[..blocks].iter().map(|b| b.0).collect();
                        let key_block = view.kv_heads * bs * view.head_dim;
                        let value_block = if view.values.is_some() {
                            view.kv_heads * bs * view.value_dim
                        } else {
                            0
                        };
                        let tier = off.residency.host_tier(tier_layer);
                        let staging = PrefillStaging::ensure(&mut off.staging, dev, blocks, key_block, value_block)?;
                        // SAFETY: the physical blocks come from this cache's
                        // block table, below num_blocks, the host pools' size
                        // (laid out as the pool's blocks).
                        unsafe {
                            staging.stage(dev, tier.host_keys, tier.host_values, &physical, key_block, value_block)
                        }?;
                        let staged = PagedKvView {
                            keys: &staging.keys,
                            values: staging.values.as_ref(),
                            block_table: &staging.identity,
                            offload: None,
                            max_blocks: staging.capacity,
                            ..view
                        };
                        self.ops
                            .prefill_attention(qs, &staged, start, shape.q_heads, shape.scale, o)?;
                    }
                }
            }
            StepKind::Decode => {
                let bs = self.cache.config().block_size;
                // Per sequence the CPU goes dense below `dense_below`; here a
                // step is dense when every sequence is, else sparse for all
                // (a short sequence's selection then covers most of it).
                let params = if meta.max_len < sparse.dense_below {
                    None
                } else {
                    select_params(sparse, bs)?
                };
                if let (Some(p), Policy::Ds) = (&params, sparse.policy) {
                    // A replayed graph serves contexts up to its tables' width.
                    let longest = self.graph_capacity.unwrap_or(meta.max_len.div_ceil(bs));
                    check_ds_reach(p, longest, bs)?;
                }
                let mla = pool.values.is_none();
                let ctas = if mla {
                    step.seqs.len()
                } else {
                    step.seqs.len() * shape.kv_heads
                };
                // A replayed graph keeps this split count while contexts grow:
                // size it for the longest context the tables can hold.
                let longest = match self.graph_capacity {
                    Some(w) => w * bs,
                    None => meta.max_len,
                };
                let (kernel, attended) = match (&params, mla) {
                    (_, true) => (DecodeKernel::Mla, longest),
                    (None, false) => (DecodeKernel::GqaDense, longest),
                    (Some(p), false) => (
                        DecodeKernel::GqaSparse,
                        (p.token_topk + (p.sink_blocks + p.local_blocks + 1) * bs).min(longest),
                    ),
                };
                let splits = decode_splits(ctas, attended, kernel, self.sms);
                let o = out.cuda_slice_mut::<f32>()?;
                // The residency's layer, for an offloaded one.
                let tiered = offloaded_layer(&mut self.offload, layer);
                match (params, tiered) {
                    (None, off) => self.ops.decode_attention(
                        qs,
                        &full_view(off.map(|(_, o)| &*o), layer, view),
                        None,
                        shape.q_heads,
                        shape.scale,
                        splits,
                        &mut self.decode_scratch,
                        o,
                    )?,
                    (Some(p), mut tiered) => {
                        let selection = SelectionShape::of(&p, meta.max_blocks, shape.kv_heads, bs);
                        if let Some((_, off)) = tiered.as_mut() {
                            // The step's first sparse attention moves the
                            // device's step counter on (inside a captured
                            // graph, so replays do; dense steps do not age
                            // the slots).
                            if !off.step_open {
                                off.residency.begin_step()?;
                                off.step_open = true;
                            }
                            let sizing = ResolverSizing {
                                rows: step.seqs.len() * shape.kv_heads,
                                max_entries: selection.max_entries(),
                                max_blocks: meta.max_blocks,
                            };
                            if off.residency.ensure_sizing(sizing)? {
                                self.generation += 1;
                            }
                        }
                        // Offloaded, the resolve needs only the candidates: it
                        // runs on its own stream while the token stage scores.
                        self.ops.sparse_select_staged(
                            qs,
                            pool,
                            &meta.table,
                            meta.max_blocks,
                            &meta.lens,
                            shape.q_heads,
                            &p,
                            &mut self.select_scratch,
                            |select| -> Result<()> {
                                if let Some((tier_layer, off)) = tiered.as_mut() {
                                    let input = ResolveInput::new(select, &meta.lens, &meta.table, selection);
                                    // SAFETY: the cache's block tables map each
                                    // sequence's blocks to distinct physical
                                    // blocks below num_blocks, the host tier's
                                    // blocks.
                                    unsafe { off.residency.resolve(*tier_layer, &input) }?;
                                }
                                Ok(())
                            },
                        )?;
                        if let Some((tier_layer, off)) = tiered.as_mut() {
                            off.residency.before_attention(*tier_layer)?;
                        }
                        {
                            // Offloaded: the slots the resolve chose, misses in place.
                            let view = match &tiered {
                                Some((tier_layer, off)) => tier_view(view, off.residency.offloaded(*tier_layer)),
                                None => view,
                            };
                            let lists = self.select_scratch.lists();
                            self.ops.decode_attention(
                                qs,
                                &view,
                                Some(&lists),
                                shape.q_heads,
                                shape.scale,
                                splits,
                                &mut self.decode_scratch,
                                o,
                            )?;
                        }
                        if let Some((tier_layer, off)) = tiered {
                            off.residency.after_attention(tier_layer)?;
                        }
                    }
                }
                if let Some(off) = self.offload.as_mut().filter(|o| o.step_open) {
                    if layer + 1 == self.cache.config().num_layers {
                        // The copy stream joins back within the step (a
                        // captured graph must end on its own stream).
                        off.residency.end_step()?;
                        off.step_open = false;
                    }
                }
            }
        }
        self.note_footprint();
        Ok(out)
    }

    fn offload_layer_stats(&self) -> Option<Vec<(usize, ResidencyStats)>> {
        let off = self.offload.as_ref()?;
        let stats = off.residency.stats().ok()?;
        Some(
            stats
                .into_iter()
                .enumerate()
                .map(|(i, s)| (off.first_layer + i, s))
                .collect(),
        )
    }

    fn take_offload_reads(&mut self) -> Option<(usize, usize)> {
        let off = self.offload.as_mut()?;
        let now = off
            .residency
            .stats()
            .ok()?
            .into_iter()
            .fold(ResidencyStats::default(), |acc, s| acc + s);
        let since = now.since(off.reported);
        off.reported = now;
        Some((since.hits as usize, since.misses as usize))
    }

    fn enable_graphs(&mut self, max_blocks: usize) -> Result<()> {
        CudaAttention::enable_graphs(self, max_blocks);
        Ok(())
    }

    fn graph_generation(&self) -> u64 {
        (self.id << 32) ^ self.generation
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::{block_runs, check_ds_reach, check_gpu_reach, select_params};
    use crate::{Policy, SparseConfig};
    use proptest::prelude::*;

    #[test]
    fn ds_keeps_every_block_it_can_and_refuses_beyond() {
        let ds = SparseConfig::with_budget(Policy::Ds, 512, 64);
        let p = select_params(&ds, 64).unwrap().expect("sparse");
        // 32,768 candidate tokens: the token stage's limit.
        assert_eq!((p.block_topk, p.token_topk), (512, 512));
        // Every rankable block of a 32k context passes (sink and local forced).
        let forced = p.sink_blocks + p.local_blocks;
        assert!(check_ds_reach(&p, 512 + forced, 64).is_ok());
        let err = check_ds_reach(&p, 513 + forced, 64).unwrap_err().to_string();
        assert!(err.contains("ds on the GPU ranks at most 512 blocks"), "{err}");
        // The up-front check: ds refused beyond its reach, tls at any length.
        assert!(check_gpu_reach(&ds, 514, 64).is_ok());
        assert!(check_gpu_reach(&ds, 1537, 64).is_err());
        let tls = SparseConfig::with_budget(Policy::Tls, 1024, 64);
        assert!(check_gpu_reach(&tls, 1537, 64).is_ok());
        // tls and quest keep their own k_b.
        assert_eq!(select_params(&tls, 64).unwrap().unwrap().block_topk, tls.block_topk);
        let dense = SparseConfig {
            policy: Policy::Dense,
            ..SparseConfig::default()
        };
        assert!(select_params(&dense, 64).unwrap().is_none());
    }

    proptest! {
        /// The runs cover the blocks in order, each run is consecutive ids,
        /// and no two neighbouring runs could have been one.
        #[test]
        fn block_runs_are_maximal_and_cover_in_order(blocks in proptest::collection::vec(0u32..40, 0..60)) {
            let runs = block_runs(&blocks);
            let mut next = 0;
            for &(start, len) in &runs {
                prop_assert_eq!(start, next);
                prop_assert!(len > 0);
                for k in 1..len {
                    prop_assert_eq!(blocks[start + k], blocks[start] + k as u32);
                }
                next = start + len;
            }
            prop_assert_eq!(next, blocks.len());
            for w in runs.windows(2) {
                let (a, alen) = w[0];
                prop_assert_ne!(blocks[w[1].0], blocks[a + alen - 1].wrapping_add(1));
            }
        }
    }

    #[test]
    fn a_fresh_sequence_is_one_run() {
        assert_eq!(block_runs(&[7, 8, 9, 10]), vec![(0, 4)]);
        assert_eq!(block_runs(&[3, 4, 9, 10, 2]), vec![(0, 2), (2, 2), (4, 1)]);
        assert!(block_runs(&[]).is_empty());
    }
}
