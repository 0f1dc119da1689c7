//! The GPU backend: per layer, the host pool's K and V in pinned host memory
//! (mapped into the device's address space) and a resident slot pool in
//! device memory; copies on a stream of their own, ordered against the
//! compute stream with CUDA events only (the host never blocks on a copy).
//!
//! Two transfer mechanisms: `cuMemcpyHtoDAsync` of each run of units that
//! are contiguous in both the host pool and the slot pool, and one gather
//! launch (`asynctls-kernels`' `gather_units`) that reads the mapped host
//! memory directly for the scattered rest. Runs of at least
//! [`CudaBackend::memcpy_min_bytes`] go by memcpy; the benchmark measures
//! the choice.

use std::sync::Arc;
use std::time::Duration;

use asynctls_kernels::cuda::CudaOps;
use asynctls_kernels::CudaDevice;
use cudarc::driver::sys::{self, CUevent_flags};
use cudarc::driver::{result, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use half::bf16;

use crate::{OffloadError, Result, Slot, StepTiming, TransferBackend, Unit};

/// Geometry of the pools (one layer's host pool holds `host_blocks x
/// kv_heads` units; each unit is `block_size` rows of K and, for GQA, of V).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaLayout {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub host_blocks: usize,
    pub block_size: usize,
    pub key_dim: usize,
    /// 0 when values are a prefix of the key (MLA).
    pub value_dim: usize,
    pub slots_per_layer: usize,
}

impl CudaLayout {
    fn key_unit(&self) -> usize {
        self.block_size * self.key_dim
    }
    fn value_unit(&self) -> usize {
        self.block_size * self.value_dim
    }
    /// Device bytes of the resident pools of all layers.
    pub fn resident_bytes(&self) -> usize {
        self.num_layers * self.slots_per_layer * (self.key_unit() + self.value_unit()) * 2
    }
}

/// Page-locked host memory, mapped into the device's address space.
struct Pinned {
    ptr: *mut bf16,
    len: usize,
    device_ptr: u64,
}

// SAFETY: the allocation is owned by this value and only reached through it.
unsafe impl Send for Pinned {}
unsafe impl Sync for Pinned {}

impl Pinned {
    fn new(len: usize) -> Result<Self> {
        let bytes = len.max(1) * 2;
        // SAFETY: a fresh allocation; zeroed below before any read.
        let ptr = unsafe { result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE) }?
            as *mut bf16;
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` was allocated with DEVICEMAP just above.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr as *mut _, 0) }.result()?;
        // SAFETY: `ptr` holds `len` elements (at least one).
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        Ok(Pinned { ptr, len, device_ptr })
    }
    fn slice(&self) -> &[bf16] {
        // SAFETY: owned allocation of `len` initialized elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn slice_mut(&mut self) -> &mut [bf16] {
        // SAFETY: as above, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host; the owner synchronized its copies.
        let _ = unsafe { result::free_host(self.ptr as *mut _) };
    }
}

/// Per layer, the host tier (pinned, mapped) and the resident slot pool on
/// the device: what both the host-driven engine ([`CudaBackend`]) and the
/// device-side resolver ([`crate::gpu_resolver::GpuResidency`]) move units between.
pub struct KvPools {
    layout: CudaLayout,
    host_keys: Vec<Pinned>,
    host_values: Vec<Pinned>,
    /// `[slots, block_size, key_dim]` per layer: what the attention reads.
    pub slot_keys: Vec<CudaSlice<bf16>>,
    /// `[slots, block_size, value_dim]` per layer (GQA only).
    pub slot_values: Vec<CudaSlice<bf16>>,
}

impl std::fmt::Debug for KvPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPools").field("layout", &self.layout).finish()
    }
}

impl KvPools {
    /// Zeroed host and slot pools for `layout`, allocated on `stream`.
    pub fn new(stream: &Arc<CudaStream>, layout: CudaLayout) -> Result<Self> {
        Self::with_host_tiers(stream, layout, layout.num_layers)
    }

    /// As [`Self::new`], but with only `tiers` host pools, layer `l` using
    /// pool `l % tiers`: for benchmarks whose every layer's host tier would
    /// not fit the machine's memory (the layers' data then alias; their
    /// residency, slots and traffic stay their own).
    pub fn with_host_tiers(stream: &Arc<CudaStream>, layout: CudaLayout, tiers: usize) -> Result<Self> {
        if tiers == 0 || tiers > layout.num_layers.max(1) {
            return Err(OffloadError::Config(format!(
                "{tiers} host tiers for {} layers (need 1 to one per layer)",
                layout.num_layers
            )));
        }
        if layout.key_unit() * 2 % 16 != 0 || layout.value_unit() * 2 % 16 != 0 {
            return Err(OffloadError::Config("unit rows must be whole 16-byte words".into()));
        }
        let host_units = layout
            .host_blocks
            .checked_mul(layout.kv_heads)
            .ok_or_else(|| OffloadError::Config("host pool size overflows".into()))?;
        let mut pools = KvPools {
            layout,
            host_keys: Vec::new(),
            host_values: Vec::new(),
            slot_keys: Vec::new(),
            slot_values: Vec::new(),
        };
        for layer in 0..layout.num_layers {
            if layer < tiers {
                pools.host_keys.push(Pinned::new(host_units * layout.key_unit())?);
                if layout.value_dim > 0 {
                    pools.host_values.push(Pinned::new(host_units * layout.value_unit())?);
                }
            }
            pools
                .slot_keys
                .push(stream.alloc_zeros::<bf16>(layout.slots_per_layer * layout.key_unit())?);
            if layout.value_dim > 0 {
                pools
                    .slot_values
                    .push(stream.alloc_zeros::<bf16>(layout.slots_per_layer * layout.value_unit())?);
            }
        }
        Ok(pools)
    }

    pub fn layout(&self) -> &CudaLayout {
        &self.layout
    }

    /// The host pool of `layer` (`[host_blocks, kv_heads, block_size, dim]`),
    /// keys and values; no copy from or to it may be in flight.
    pub fn host_mut(&mut self, layer: usize) -> (&mut [bf16], Option<&mut [bf16]>) {
        let tier = self.tier(layer);
        let values = self.host_values.get_mut(tier).map(Pinned::slice_mut);
        (self.host_keys[tier].slice_mut(), values)
    }

    pub fn host(&self, layer: usize) -> (&[bf16], Option<&[bf16]>) {
        let tier = self.tier(layer);
        (
            self.host_keys[tier].slice(),
            self.host_values.get(tier).map(Pinned::slice),
        )
    }

    /// The host pool `layer` uses.
    pub fn tier(&self, layer: usize) -> usize {
        layer % self.host_keys.len().max(1)
    }

    /// Host bytes of the pools (pinned).
    pub fn host_bytes(&self) -> usize {
        self.host_keys.iter().chain(&self.host_values).map(|p| p.len * 2).sum()
    }

    /// Device addresses of `layer`'s host pools (keys, values; 0 without
    /// values), for kernels that read units in place.
    pub fn host_device_ptrs(&self, layer: usize) -> (u64, u64) {
        let tier = self.tier(layer);
        (
            self.host_keys[tier].device_ptr,
            self.host_values.get(tier).map_or(0, |p| p.device_ptr),
        )
    }

    /// Device addresses of `layer`'s slot pools (keys, values; 0 without values).
    pub fn slot_device_ptrs(&self, layer: usize, stream: &CudaStream) -> (u64, u64) {
        (
            self.slot_keys[layer].device_ptr(stream).0,
            self.slot_values.get(layer).map_or(0, |s| s.device_ptr(stream).0),
        )
    }

    /// Bytes of one unit's keys and of its values.
    pub fn unit_bytes(&self) -> (usize, usize) {
        (self.layout.key_unit() * 2, self.layout.value_unit() * 2)
    }
}

/// How the transfers went out (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransferCounts {
    pub memcpy_calls: usize,
    pub memcpy_units: usize,
    pub gather_launches: usize,
    pub gathered_units: usize,
}

/// The GPU backend.
pub struct CudaBackend {
    ops: CudaOps,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    layout: CudaLayout,
    /// The host tier and the resident slots of every layer.
    pub pools: KvPools,
    /// `[host_blocks * kv_heads]` per layer: each unit's slot or -1, as the
    /// attention kernel looks it up; updated on the copy stream with the copies.
    pub unit_slots: Vec<CudaSlice<i32>>,
    /// Table updates not yet issued: (unit index, slot or -1).
    pending: Vec<Vec<(i32, i32)>>,
    reads_done: Vec<Option<CudaEvent>>,
    transfers: Vec<(CudaEvent, Arc<CudaEvent>)>,
    waits: Vec<(CudaEvent, Arc<CudaEvent>)>,
    last: Option<Arc<CudaEvent>>,
    /// Runs of contiguous units at least this long go by memcpy; shorter
    /// ones by the gather kernel.
    pub memcpy_min_bytes: usize,
    pub counts: TransferCounts,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("layout", &self.layout)
            .field("memcpy_min_bytes", &self.memcpy_min_bytes)
            .finish()
    }
}

impl CudaBackend {
    /// Pinned host pools and device slot pools for `layout`; the attention
    /// runs on the device's stream, copies on a new one.
    pub fn new(device: &CudaDevice, layout: CudaLayout) -> Result<Self> {
        let ops = CudaOps::new(device)?;
        let compute = device.stream().clone();
        let copy = device.context().new_stream()?;
        let pools = KvPools::new(&compute, layout)?;
        let host_units = layout.host_blocks * layout.kv_heads;
        let mut unit_slots = Vec::new();
        for _ in 0..layout.num_layers {
            unit_slots.push(compute.clone_htod(&vec![-1i32; host_units])?);
        }
        compute.synchronize()?;
        Ok(CudaBackend {
            ops,
            compute,
            copy,
            layout,
            pools,
            unit_slots,
            pending: vec![Vec::new(); layout.num_layers],
            reads_done: (0..layout.num_layers).map(|_| None).collect(),
            transfers: Vec::new(),
            waits: Vec::new(),
            last: None,
            memcpy_min_bytes: 256 * 1024,
            counts: TransferCounts::default(),
        })
    }

    pub fn layout(&self) -> &CudaLayout {
        &self.layout
    }

    /// The host pool of `layer`; call [`TransferBackend::synchronize`] first
    /// if copies may be in flight.
    pub fn host_mut(&mut self, layer: usize) -> (&mut [bf16], Option<&mut [bf16]>) {
        self.pools.host_mut(layer)
    }

    pub fn host(&self, layer: usize) -> (&[bf16], Option<&[bf16]>) {
        self.pools.host(layer)
    }

    /// Device addresses of `layer`'s host pools (keys, values).
    pub fn host_device_ptrs(&self, layer: usize) -> (u64, u64) {
        self.pools.host_device_ptrs(layer)
    }

    /// Issues the pending unit -> slot table updates of `layer` on `stream`.
    fn apply_table(&mut self, layer: usize, on_copy_stream: bool) -> Result<()> {
        if self.pending[layer].is_empty() {
            return Ok(());
        }
        let stream = if on_copy_stream {
            self.copy.clone()
        } else {
            self.compute.clone()
        };
        let (index, values): (Vec<i32>, Vec<i32>) = self.pending[layer].drain(..).unzip();
        let index = stream.clone_htod(&index)?;
        let values = stream.clone_htod(&values)?;
        // SAFETY: the pending entries are unit indices of units the engine
        // checked against the host pool (`OffloadEngine::check`), each below
        // the table's `host_blocks * kv_heads` entries.
        unsafe {
            self.ops
                .scatter_i32(&stream, &mut self.unit_slots[layer], &index, &values)
        }?;
        Ok(())
    }

    fn event(&self, timing: bool) -> Result<CudaEvent> {
        let flags = if timing {
            CUevent_flags::CU_EVENT_DEFAULT
        } else {
            CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        Ok(self.compute.context().new_event(Some(flags))?)
    }

    /// Copies `copies` (sorted by unit) of one pool pair: runs by memcpy,
    /// the scattered rest by one gather launch.
    fn host_to_slots(&mut self, layer: usize, copies: &[(Unit, Slot)]) -> Result<()> {
        let heads = self.layout.kv_heads;
        let pools: Vec<(u64, u64, usize)> = {
            let (host_k, host_v) = self.pools.host_device_ptrs(layer);
            let (slot_k, slot_v) = self.pools.slot_device_ptrs(layer, &self.copy);
            let (key_bytes, value_bytes) = self.pools.unit_bytes();
            let mut p = vec![(host_k, slot_k, key_bytes)];
            if value_bytes > 0 {
                p.push((host_v, slot_v, value_bytes));
            }
            p
        };
        let unit_bytes: usize = pools.iter().map(|p| p.2).sum();
        // Runs contiguous in both pools.
        let mut runs: Vec<(usize, Slot, usize)> = Vec::new();
        for &(unit, slot) in copies {
            let index = unit.index(heads);
            match runs.last_mut() {
                Some((start, first_slot, len)) if *start + *len == index && *first_slot + *len as Slot == slot => {
                    *len += 1
                }
                _ => runs.push((index, slot, 1)),
            }
        }
        let (mut gather_units, mut gather_slots) = (Vec::new(), Vec::new());
        for &(index, slot, len) in &runs {
            if len * unit_bytes >= self.memcpy_min_bytes {
                for (k, &(_, dst, bytes)) in pools.iter().enumerate() {
                    let (host_k, host_v) = self.pools.host(layer);
                    let host = if k == 0 { host_k } else { host_v.unwrap_or(host_k) };
                    let elems = bytes / 2;
                    let src = &host[index * elems..(index + len) * elems];
                    // SAFETY: the slot range lies in the slot pool (slots <
                    // slots_per_layer, checked by the engine's bookkeeping);
                    // `src` is pinned and outlives the copy (the pool lives
                    // as long as the backend, which synchronizes on drop).
                    unsafe {
                        result::memcpy_htod_async(dst + (slot as usize * bytes) as u64, src, self.copy.cu_stream())
                    }?;
                    self.counts.memcpy_calls += 1;
                }
                self.counts.memcpy_units += len;
            } else {
                for j in 0..len {
                    gather_units.push((index + j) as i64);
                    gather_slots.push(slot as i32 + j as i32);
                }
            }
        }
        if !gather_units.is_empty() {
            let units = self.copy.clone_htod(&gather_units)?;
            let slots = self.copy.clone_htod(&gather_slots)?;
            for &(src, dst, bytes) in &pools {
                // SAFETY: `src` is the device mapping of this layer's pinned
                // pool, `dst` its slot pool; every index is in range.
                unsafe { self.ops.gather_units(&self.copy, src, dst, &units, &slots, bytes) }?;
                self.counts.gather_launches += 1;
            }
            self.counts.gathered_units += gather_units.len();
        }
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.copy.synchronize();
        let _ = self.compute.synchronize();
    }
}

impl TransferBackend for CudaBackend {
    type Ticket = Arc<CudaEvent>;

    fn num_layers(&self) -> usize {
        self.layout.num_layers
    }
    fn kv_heads(&self) -> usize {
        self.layout.kv_heads
    }
    fn host_blocks(&self) -> usize {
        self.layout.host_blocks
    }
    fn slots_per_layer(&self) -> usize {
        self.layout.slots_per_layer
    }
    fn unit_bytes(&self) -> usize {
        (self.layout.key_unit() + self.layout.value_unit()) * 2
    }

    fn fetch(&mut self, layer: usize, copies: &[(Unit, Slot)]) -> Result<Arc<CudaEvent>> {
        if let Some(read) = &self.reads_done[layer] {
            self.copy.wait(read)?;
        }
        let start = self.event(true)?;
        start.record(&self.copy)?;
        // Evictions first (no reader may take an evicted slot for its old
        // unit once it is overwritten), then the copies, then the new entries.
        self.apply_table(layer, true)?;
        self.host_to_slots(layer, copies)?;
        let heads = self.layout.kv_heads;
        self.pending[layer].extend(copies.iter().map(|&(u, s)| (u.index(heads) as i32, s as i32)));
        self.apply_table(layer, true)?;
        let end = Arc::new(self.event(true)?);
        end.record(&self.copy)?;
        self.transfers.push((start, end.clone()));
        self.last = Some(end.clone());
        Ok(end)
    }

    fn flush(&mut self, layer: usize, copies: &[(Slot, Unit)]) -> Result<Arc<CudaEvent>> {
        // The writes into these slots were issued on the compute stream.
        let written = self.event(false)?;
        written.record(&self.compute)?;
        self.copy.wait(&written)?;
        let start = self.event(true)?;
        start.record(&self.copy)?;
        let heads = self.layout.kv_heads;
        for &(slot, unit) in copies {
            let index = unit.index(heads);
            let elems = self.layout.key_unit();
            let (slot_k, slot_v) = self.pools.slot_device_ptrs(layer, &self.copy);
            let src = slot_k + (slot as usize * elems * 2) as u64;
            let (host_k, host_v) = self.pools.host_mut(layer);
            let dst = &mut host_k[index * elems..(index + 1) * elems];
            // SAFETY: pinned destination owned by the backend; the slot is in range.
            unsafe { result::memcpy_dtoh_async(dst, src, self.copy.cu_stream()) }?;
            if self.layout.value_dim > 0 {
                let elems = self.layout.value_unit();
                let src = slot_v + (slot as usize * elems * 2) as u64;
                let Some(host_v) = host_v else { continue };
                let dst = &mut host_v[index * elems..(index + 1) * elems];
                // SAFETY: as above.
                unsafe { result::memcpy_dtoh_async(dst, src, self.copy.cu_stream()) }?;
            }
        }
        let end = Arc::new(self.event(true)?);
        end.record(&self.copy)?;
        self.transfers.push((start, end.clone()));
        self.last = Some(end.clone());
        Ok(end)
    }

    fn is_complete(&mut self, ticket: &Arc<CudaEvent>) -> Result<bool> {
        Ok(ticket.is_complete())
    }

    fn order_before_compute(&mut self, ticket: &Arc<CudaEvent>) -> Result<()> {
        let ready = self.event(true)?;
        ready.record(&self.compute)?;
        self.compute.wait(ticket)?;
        self.waits.push((ready, ticket.clone()));
        Ok(())
    }

    fn reads_done(&mut self, layer: usize) -> Result<()> {
        let read = self.event(false)?;
        read.record(&self.compute)?;
        self.reads_done[layer] = Some(read);
        Ok(())
    }

    fn finish_step(&mut self) -> Result<StepTiming> {
        let mut timing = StepTiming::default();
        let mut pending = Vec::new();
        for (start, end) in self.transfers.drain(..) {
            if end.is_complete() {
                timing.transfer += Duration::from_secs_f64(start.elapsed_ms(&end)?.max(0.0) as f64 * 1e-3);
            } else {
                pending.push((start, end));
            }
        }
        self.transfers = pending;
        let mut pending = Vec::new();
        for (ready, end) in self.waits.drain(..) {
            if end.is_complete() && ready.is_complete() {
                // The compute stream stalled from `ready` until the copy ended.
                let stall = ready.elapsed_ms(&end)?;
                timing.exposed += Duration::from_secs_f64(stall.max(0.0) as f64 * 1e-3);
            } else {
                pending.push((ready, end));
            }
        }
        self.waits = pending;
        Ok(timing)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.copy.synchronize()?;
        Ok(())
    }

    fn evicted(&mut self, layer: usize, units: &[Unit]) -> Result<()> {
        let heads = self.layout.kv_heads;
        self.pending[layer].extend(units.iter().map(|u| (u.index(heads) as i32, -1)));
        Ok(())
    }

    fn placed_new(&mut self, layer: usize, unit: Unit, slot: Slot) -> Result<()> {
        // The block is written on the compute stream: its entry (and any
        // eviction that made room) goes there first.
        self.pending[layer].push((unit.index(self.layout.kv_heads) as i32, slot as i32));
        self.apply_table(layer, false)
    }
}
