//! The offloaded K/V with its residency decided on the device: the host
//! tier and resident slots of [`KvPools`], per layer the tables of
//! [`crate::resolver`] in device memory, and the kernels that resolve a
//! step's selection, promote its misses and copy them, so an offloaded
//! decode step is launches only (no read-back, no host bookkeeping) and can
//! be captured as one CUDA graph.
//!
//! Per step: [`GpuResidency::begin_step`] moves the device's step counter
//! on; per layer, once the selection's candidate blocks are issued,
//! [`GpuResidency::resolve`] maps the attended blocks to slots (or the host
//! tier) on a resolve stream, overlapping the selection's token stage;
//! [`GpuResidency::before_attention`] joins it, the attention reads the
//! slots through [`GpuResidency::offloaded`] (a miss in place from the host
//! tier), and [`GpuResidency::after_attention`] forks the promotion and its
//! copies to a copy stream, where they overlap the next layers;
//! [`GpuResidency::end_step`] joins the copy stream back, so the next step
//! sees every table update and copy.

use std::sync::Arc;
use std::time::Duration;

use asynctls_kernels::cuda::gather::{ResidencyTables, ResolveInput, ResolveScratch, RESIDENCY_STATS};
use asynctls_kernels::cuda::{CudaOps, OffloadedKv, SlotLookup};
use asynctls_kernels::CudaDevice;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};

use crate::cuda::{CudaLayout, KvPools};
use crate::resolver::{PromotePolicy, Residency, ResidencyStats, STATS};
use crate::{OffloadError, Result};

/// One layer's device tables and scratch (scratch per layer: a layer's
/// promotion runs on the copy stream while the next layer resolves).
struct LayerTables {
    unit_slot: CudaSlice<i32>,
    slot_unit: CudaSlice<i32>,
    slot_last: CudaSlice<u32>,
    hand: CudaSlice<u32>,
    stats: CudaSlice<u64>,
    miss_units: CudaSlice<i32>,
    miss_list: CudaSlice<i32>,
    copy_units: CudaSlice<i64>,
    copy_slots: CudaSlice<i32>,
    copy_count: CudaSlice<i32>,
    /// `[rows, max_blocks]`: the last resolve's row slot table.
    row_slots: CudaSlice<i32>,
    /// Recorded on the compute stream when the candidates are issued, on
    /// the resolve stream after the resolve, on the compute stream after
    /// the attention.
    candidates: CudaEvent,
    resolved: CudaEvent,
    attended: CudaEvent,
    /// Recorded on the copy stream after the layer's copies.
    copied: CudaEvent,
}

/// Copy-stream timing of one step, when asked for ([`GpuResidency::timing`]).
struct Timing {
    /// Per layer: copy work (start, end).
    copies: Vec<(CudaEvent, CudaEvent)>,
    /// On the compute stream where the step ends, before the join.
    ready: CudaEvent,
}

/// What the copy stream did in one timed step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CopyTiming {
    /// Time the copy stream spent on promotions and copies (all layers).
    pub transfer: Duration,
    /// Time the compute stream waited at the join for them.
    pub exposed: Duration,
}

/// The largest step a [`GpuResidency`] serves (its scratch is sized once,
/// so a captured graph keeps its addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverSizing {
    /// (sequence, KV head) rows.
    pub rows: usize,
    /// Blocks one row attends at most (`ResolveInput::max_entries()`).
    pub max_entries: usize,
    /// Logical blocks of the longest sequence (the block table's width).
    pub max_blocks: usize,
}

/// The offloaded K/V of a batch, its residency kept by the device.
pub struct GpuResidency {
    ops: CudaOps,
    compute: Arc<CudaStream>,
    resolver: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    /// The host tier and the slots.
    pub pools: KvPools,
    layers: Vec<LayerTables>,
    /// Entries of each layer's last resolve (taken by its promotion), and
    /// whether the compute stream has joined it.
    resolved: Vec<Option<(usize, bool)>>,
    /// Layers whose copies this step issued (what `end_step` joins: a
    /// dense layer copies nothing, and a captured graph may wait only on
    /// events recorded inside it).
    copied_now: Vec<bool>,
    step: CudaSlice<u32>,
    policy: PromotePolicy,
    entries: usize,
    /// CTAs of the copy kernel (each copies whole units over PCIe; they
    /// share the SMs with the attention they overlap).
    pub copy_ctas: usize,
    /// Time the copy stream (record events) on the steps from now on.
    pub timing: bool,
    timed: Option<Timing>,
}

impl std::fmt::Debug for GpuResidency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuResidency")
            .field("layout", self.pools.layout())
            .field("policy", &self.policy)
            .field("entries", &self.entries)
            .finish()
    }
}

impl GpuResidency {
    /// Pools for `layout` and empty residency tables, for steps of at most
    /// `rows` (sequence, KV head) rows attending up to `max_entries` blocks
    /// each (`ResolveInput::max_entries()`) of at most `max_blocks` logical
    /// blocks.
    pub fn new(device: &CudaDevice, layout: CudaLayout, policy: PromotePolicy, sizing: ResolverSizing) -> Result<Self> {
        Self::with_host_tiers(device, layout, policy, sizing, layout.num_layers)
    }

    /// As [`Self::new`] with `tiers` host pools shared by the layers
    /// ([`KvPools::with_host_tiers`]).
    pub fn with_host_tiers(
        device: &CudaDevice,
        layout: CudaLayout,
        policy: PromotePolicy,
        sizing: ResolverSizing,
        tiers: usize,
    ) -> Result<Self> {
        let entries = sizing.rows.saturating_mul(sizing.max_entries);
        let table = sizing.rows.saturating_mul(sizing.max_blocks);
        let ops = CudaOps::new(device)?;
        let compute = device.stream().clone();
        let copy = device.context().new_stream()?;
        let resolver = device.context().new_stream()?;
        let units = layout
            .host_blocks
            .checked_mul(layout.kv_heads)
            .filter(|&u| u <= i32::MAX as usize)
            .ok_or_else(|| OffloadError::Config("more host units than a 32-bit table indexes".into()))?;
        let slots = layout.slots_per_layer;
        if slots == 0 || slots > i32::MAX as usize || !(1..256).contains(&policy.protect) || entries == 0 {
            return Err(OffloadError::Config(format!(
                "{slots} slots, protect {}, {entries} entries per step (slots and entries nonzero and below 2^31, \
                 protect 1 to 255)",
                policy.protect
            )));
        }
        let max_promote = policy.max_promote.clamp(1, entries);
        let pools = KvPools::with_host_tiers(&compute, layout, tiers)?;
        let event = || -> Result<CudaEvent> {
            Ok(compute
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?)
        };
        let mut layers = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            layers.push(LayerTables {
                unit_slot: compute.clone_htod(&vec![-1i32; units])?,
                slot_unit: compute.clone_htod(&vec![-1i32; slots])?,
                slot_last: compute.alloc_zeros::<u32>(slots)?,
                hand: compute.alloc_zeros::<u32>(1)?,
                stats: compute.alloc_zeros::<u64>(RESIDENCY_STATS)?,
                miss_units: compute.alloc_zeros::<i32>(entries)?,
                miss_list: compute.alloc_zeros::<i32>(entries)?,
                copy_units: compute.alloc_zeros::<i64>(max_promote)?,
                copy_slots: compute.alloc_zeros::<i32>(max_promote)?,
                copy_count: compute.alloc_zeros::<i32>(1)?,
                row_slots: compute.alloc_zeros::<i32>(table.max(1))?,
                candidates: event()?,
                resolved: event()?,
                attended: event()?,
                copied: event()?,
            });
        }
        let step = compute.alloc_zeros::<u32>(1)?;
        compute.synchronize()?;
        let sms = device.multiprocessors();
        Ok(GpuResidency {
            ops,
            compute,
            resolver,
            copy,
            pools,
            resolved: vec![None; layers.len()],
            copied_now: vec![false; layers.len()],
            layers,
            step,
            policy: PromotePolicy { max_promote, ..policy },
            entries,
            // One per SM by default; `bench offload --copy-ctas` measures others.
            copy_ctas: sms.max(1),
            timing: false,
            timed: None,
        })
    }

    pub fn policy(&self) -> PromotePolicy {
        self.policy
    }

    /// Grows the per-layer scratch to serve steps of `sizing` (a larger
    /// batch or longer block tables than before); `true` when buffers were
    /// replaced (new addresses: graphs captured before must be recaptured).
    /// The copy list grows with the entries when the policy promotes every
    /// miss (`max_promote` at the old entries).
    pub fn ensure_sizing(&mut self, sizing: ResolverSizing) -> Result<bool> {
        let entries = sizing.rows.saturating_mul(sizing.max_entries);
        let table = sizing.rows.saturating_mul(sizing.max_blocks);
        let Some(first) = self.layers.first() else {
            return Ok(false);
        };
        if entries <= first.miss_units.len() && table <= first.row_slots.len() {
            return Ok(false);
        }
        // Geometric growth: a batch whose longest sequence gains a block
        // every 64 steps reallocates (and recaptures its graphs) rarely.
        let entries = entries.max(2 * first.miss_units.len());
        let table = table.max(2 * first.row_slots.len());
        let promote_all = self.policy.max_promote >= self.entries;
        let max_promote = if promote_all {
            entries
        } else {
            self.policy.max_promote.min(entries)
        };
        // The old buffers may still be read by work in flight.
        self.resolver.synchronize()?;
        self.copy.synchronize()?;
        self.compute.synchronize()?;
        for t in &mut self.layers {
            t.miss_units = self.compute.alloc_zeros::<i32>(entries)?;
            t.miss_list = self.compute.alloc_zeros::<i32>(entries)?;
            t.row_slots = self.compute.alloc_zeros::<i32>(table.max(1))?;
            if max_promote > t.copy_units.len() {
                t.copy_units = self.compute.alloc_zeros::<i64>(max_promote)?;
                t.copy_slots = self.compute.alloc_zeros::<i32>(max_promote)?;
            }
        }
        self.compute.synchronize()?;
        self.entries = entries;
        self.policy.max_promote = max_promote;
        Ok(true)
    }

    /// The addresses an offloaded pool of `layer` writes its rows through
    /// to (see `GpuKvPool::set_tier`): the host tier, the slots and the
    /// unit -> slot table. They stay valid while `self` lives.
    pub fn host_tier(&self, layer: usize) -> asynctls_kernels::cuda::HostTier {
        let (host_keys, host_values) = self.pools.host_device_ptrs(layer);
        let (slot_keys, slot_values) = self.pools.slot_device_ptrs(layer, &self.compute);
        asynctls_kernels::cuda::HostTier {
            host_keys,
            host_values,
            slot_keys,
            slot_values,
            unit_slot: self.layers[layer].unit_slot.device_ptr(&self.compute).0,
        }
    }

    /// What a dense pass over `layer` reads: the slot pools and the unit ->
    /// slot table, a unit without a slot read in place from the host tier.
    pub fn dense_view(
        &self,
        layer: usize,
    ) -> (&CudaSlice<half::bf16>, Option<&CudaSlice<half::bf16>>, OffloadedKv<'_>) {
        let (host_keys, host_values) = self.pools.host_device_ptrs(layer);
        (
            &self.pools.slot_keys[layer],
            self.pools.slot_values.get(layer),
            OffloadedKv {
                slots: SlotLookup::ByUnit(&self.layers[layer].unit_slot),
                host_keys,
                host_values,
            },
        )
    }

    /// Empties the residency (every unit back to the host tier only, counters
    /// zeroed) and follows `policy` from now on; the host tier keeps its data.
    /// `max_promote` is capped at the copy list allocated by the constructor.
    pub fn reset(&mut self, policy: PromotePolicy) -> Result<()> {
        if !(1..256).contains(&policy.protect) {
            return Err(OffloadError::Config("protect must be 1 to 255 steps".into()));
        }
        self.resolver.synchronize()?;
        self.copy.synchronize()?;
        self.compute.synchronize()?;
        self.resolved.iter_mut().for_each(|r| *r = None);
        self.copied_now.iter_mut().for_each(|c| *c = false);
        for t in &mut self.layers {
            self.compute
                .memcpy_htod(&vec![-1i32; t.unit_slot.len()], &mut t.unit_slot)?;
            self.compute
                .memcpy_htod(&vec![-1i32; t.slot_unit.len()], &mut t.slot_unit)?;
            self.compute.memset_zeros(&mut t.slot_last)?;
            self.compute.memset_zeros(&mut t.hand)?;
            self.compute.memset_zeros(&mut t.stats)?;
        }
        self.compute.memset_zeros(&mut self.step)?;
        self.compute.synchronize()?;
        self.policy = PromotePolicy {
            max_promote: policy
                .max_promote
                .clamp(1, self.layers.first().map_or(1, |t| t.copy_units.len())),
            ..policy
        };
        Ok(())
    }

    /// Starts a step: the device's step counter moves on (on the compute stream).
    pub fn begin_step(&mut self) -> Result<()> {
        self.ops.residency_next_step(&self.compute, &mut self.step)?;
        if self.timing {
            let mut copies = Vec::with_capacity(self.layers.len());
            for _ in 0..self.layers.len() {
                copies.push((self.timing_event()?, self.timing_event()?));
            }
            self.timed = Some(Timing {
                copies,
                ready: self.timing_event()?,
            });
        }
        Ok(())
    }

    fn timing_event(&self) -> Result<CudaEvent> {
        Ok(self
            .compute
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// What `layer`'s attention reads after its [`Self::resolve`]: its slot
    /// pools (keys, values) and the row slot table, with the host tier for misses.
    pub fn offloaded(&self, layer: usize) -> (&CudaSlice<half::bf16>, Option<&CudaSlice<half::bf16>>, OffloadedKv<'_>) {
        let (host_keys, host_values) = self.pools.host_device_ptrs(layer);
        (
            &self.pools.slot_keys[layer],
            self.pools.slot_values.get(layer),
            OffloadedKv {
                slots: SlotLookup::ByRow(&self.layers[layer].row_slots),
                host_keys,
                host_values,
            },
        )
    }

    /// The row slot table `layer`'s last resolve wrote (synchronizes), for tests.
    pub fn row_slots(&self, layer: usize) -> Result<Vec<i32>> {
        self.resolver.synchronize()?;
        self.compute.synchronize()?;
        Ok(self.compute.clone_dtoh(&self.layers[layer].row_slots)?)
    }

    /// Once `layer`'s candidate blocks are issued on the compute stream (see
    /// `CudaOps::sparse_select_staged`): on the resolve stream, counts the
    /// step's hits and misses, marks the hits' recency and writes the row
    /// slot table the attention reads after [`Self::before_attention`].
    ///
    /// # Safety
    /// `input.block_table` must map every attended logical block of each
    /// sequence to a distinct physical block below the pool's `host_blocks`
    /// (the table lives on the device and the kernels do not check it).
    pub unsafe fn resolve(&mut self, layer: usize, input: &ResolveInput<'_>) -> Result<()> {
        let entries = input.rows() * input.max_entries();
        let t = self.layers.get_mut(layer).ok_or(OffloadError::LayerOutOfRange {
            layer,
            num_layers: self.pools.layout().num_layers,
        })?;
        if entries > t.miss_units.len() || input.rows() * input.shape.max_blocks > t.row_slots.len() {
            return Err(OffloadError::Config(format!(
                "a step of {} rows attending up to {} of {} blocks in layer {layer}; the resolver was sized \
                 for {} entries and a table of {}",
                input.rows(),
                input.max_entries(),
                input.shape.max_blocks,
                t.miss_units.len(),
                t.row_slots.len()
            )));
        }
        if input.shape.kv_heads != self.pools.layout().kv_heads {
            return Err(OffloadError::Config(format!(
                "a selection of {} KV heads for a pool of {}",
                input.shape.kv_heads,
                self.pools.layout().kv_heads
            )));
        }
        t.candidates.record(&self.compute)?;
        self.resolver.wait(&t.candidates)?;
        let (mut tables, mut scratch) = layer_parts(t);
        // SAFETY: the caller's contract (above); the physical blocks' units
        // are exactly the entries of `unit_slot`.
        unsafe {
            self.ops
                .residency_resolve(&self.resolver, input, &mut tables, &self.step, &mut scratch)
        }?;
        t.resolved.record(&self.resolver)?;
        self.resolved[layer] = Some((entries, false));
        Ok(())
    }

    /// Orders the compute stream after `layer`'s resolve: call before the
    /// attention that reads [`Self::offloaded`].
    pub fn before_attention(&mut self, layer: usize) -> Result<()> {
        match self.resolved.get_mut(layer) {
            Some(Some((_, joined))) => {
                if !*joined {
                    self.compute.wait(&self.layers[layer].resolved)?;
                    *joined = true;
                }
                Ok(())
            }
            _ => Err(OffloadError::Config(format!(
                "layer {layer}: an attention without a resolve before it"
            ))),
        }
    }

    /// After `layer`'s attention (in stream order): promotes the misses of
    /// its last [`Self::resolve`] and copies them, on the copy stream.
    pub fn after_attention(&mut self, layer: usize) -> Result<()> {
        self.before_attention(layer)?;
        let Some((entries, _)) = self.resolved[layer].take() else {
            unreachable!("before_attention checked the resolve");
        };
        let (key_bytes, value_bytes) = self.pools.unit_bytes();
        let (host_k, host_v) = self.pools.host_device_ptrs(layer);
        let (slot_k, slot_v) = self.pools.slot_device_ptrs(layer, &self.copy);
        let t = &mut self.layers[layer];
        t.attended.record(&self.compute)?;
        self.copy.wait(&t.attended)?;
        if let Some(timed) = &self.timed {
            timed.copies[layer].0.record(&self.copy)?;
        }
        let (mut tables, mut scratch) = layer_parts(t);
        // SAFETY: the misses were written by the resolve ordered before
        // (its contract keeps every unit inside `unit_slot`).
        unsafe {
            self.ops.residency_promote(
                &self.copy,
                entries,
                &mut tables,
                &self.step,
                self.policy.protect,
                self.policy.max_promote,
                key_bytes + value_bytes,
                &mut scratch,
            )
        }?;
        // SAFETY: the host tier is this layer's pinned, mapped pool and the
        // slots its slot pool; the promote names units and slots of both.
        unsafe {
            self.ops.gather_units_counted(
                &self.copy,
                (host_k, slot_k),
                key_bytes,
                (host_v, slot_v),
                value_bytes,
                &scratch,
                self.copy_ctas,
            )
        }?;
        t.copied.record(&self.copy)?;
        self.copied_now[layer] = true;
        if let Some(timed) = &self.timed {
            timed.copies[layer].1.record(&self.copy)?;
        }
        Ok(())
    }

    /// Closes a step that failed part-way (eagerly, never inside a capture):
    /// waits for every copy and resolve it issued, so nothing written to the
    /// cache next races them, and forgets its resolves.
    pub fn abort_step(&mut self) -> Result<()> {
        self.resolver.synchronize()?;
        self.copy.synchronize()?;
        self.resolved.iter_mut().for_each(|r| *r = None);
        self.copied_now.iter_mut().for_each(|c| *c = false);
        self.timed = None;
        Ok(())
    }

    /// Ends a step: the compute stream waits for the copies of every layer
    /// that made some this step.
    pub fn end_step(&mut self) -> Result<()> {
        if let Some(timed) = &self.timed {
            timed.ready.record(&self.compute)?;
        }
        for (t, copied) in self.layers.iter().zip(&mut self.copied_now) {
            if std::mem::take(copied) {
                self.compute.wait(&t.copied)?;
            }
        }
        Ok(())
    }

    /// The last timed step's copy timing (synchronizes); `None` when the
    /// step was not timed.
    pub fn copy_timing(&mut self) -> Result<Option<CopyTiming>> {
        let Some(timed) = self.timed.take() else {
            return Ok(None);
        };
        // The copies' end events are on the copy stream.
        self.copy.synchronize()?;
        self.compute.synchronize()?;
        let mut timing = CopyTiming::default();
        let mut last_end: Option<&CudaEvent> = None;
        for (start, end) in &timed.copies {
            timing.transfer += Duration::from_secs_f64(start.elapsed_ms(end)?.max(0.0) as f64 * 1e-3);
            last_end = Some(end);
        }
        if let Some(end) = last_end {
            // The copy stream runs layer after layer; the compute stream
            // stalled from `ready` until the last layer's copies ended.
            timing.exposed = Duration::from_secs_f64(timed.ready.elapsed_ms(end)?.max(0.0) as f64 * 1e-3);
        }
        Ok(Some(timing))
    }

    /// Every layer's cumulative counters (synchronizes the compute stream).
    pub fn stats(&self) -> Result<Vec<ResidencyStats>> {
        self.resolver.synchronize()?;
        // The promotions count on the copy stream.
        self.copy.synchronize()?;
        self.compute.synchronize()?;
        self.layers
            .iter()
            .map(|t| {
                let v = self.compute.clone_dtoh(&t.stats)?;
                let mut a = [0u64; STATS];
                a.copy_from_slice(&v[..STATS]);
                Ok(ResidencyStats::from_array(a))
            })
            .collect()
    }

    /// `layer`'s tables as the host twin holds them (synchronizes), for tests.
    pub fn tables(&self, layer: usize) -> Result<Residency> {
        self.resolver.synchronize()?;
        self.copy.synchronize()?;
        self.compute.synchronize()?;
        let t = &self.layers[layer];
        let stats = self.compute.clone_dtoh(&t.stats)?;
        let mut a = [0u64; STATS];
        a.copy_from_slice(&stats[..STATS]);
        Ok(Residency {
            unit_slot: self.compute.clone_dtoh(&t.unit_slot)?,
            slot_unit: self.compute.clone_dtoh(&t.slot_unit)?,
            slot_last: self.compute.clone_dtoh(&t.slot_last)?,
            hand: self.compute.clone_dtoh(&t.hand)?[0],
            stats: ResidencyStats::from_array(a),
        })
    }

    /// The host tier's pools of `layer` to fill (synchronizes both streams first).
    pub fn host_mut(&mut self, layer: usize) -> Result<(&mut [half::bf16], Option<&mut [half::bf16]>)> {
        self.resolver.synchronize()?;
        self.copy.synchronize()?;
        self.compute.synchronize()?;
        Ok(self.pools.host_mut(layer))
    }
}

/// A layer's tables and scratch as the kernels take them.
fn layer_parts(t: &mut LayerTables) -> (ResidencyTables<'_>, ResolveScratch<'_>) {
    (
        ResidencyTables {
            unit_slot: &mut t.unit_slot,
            slot_unit: &mut t.slot_unit,
            slot_last: &mut t.slot_last,
            hand: &mut t.hand,
            stats: &mut t.stats,
        },
        ResolveScratch {
            row_slots: &mut t.row_slots,
            miss_units: &mut t.miss_units,
            miss_list: &mut t.miss_list,
            copy_units: &mut t.copy_units,
            copy_slots: &mut t.copy_slots,
            copy_count: &mut t.copy_count,
        },
    )
}

impl Drop for GpuResidency {
    fn drop(&mut self) {
        let _ = self.resolver.synchronize();
        let _ = self.copy.synchronize();
        let _ = self.compute.synchronize();
    }
}
