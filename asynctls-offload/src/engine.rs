//! The engine: which units are resident where, what to copy, what to evict.

use std::collections::HashSet;

use serde::Serialize;

use crate::{EvictionPolicy, LeastRecentlySelected, OffloadError, Result, Slot, TransferBackend, Unit, UnitStats};

/// Sizing of the resident pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OffloadConfig {
    /// Units each layer keeps resident.
    pub slots_per_layer: usize,
}

impl OffloadConfig {
    /// Resident capacity as a multiple of k_b: `slack x k_b` units, plus the
    /// always-attended sink/local blocks, for each of `rows` (sequence, KV head) rows.
    pub fn with_slack(rows: usize, block_topk: usize, forced_blocks: usize, slack: f64) -> Result<Self> {
        if slack < 1.0 || !slack.is_finite() {
            return Err(OffloadError::Config(format!(
                "slack {slack}: the resident pool must hold at least one selection (slack >= 1)"
            )));
        }
        let per_row = (block_topk as f64 * slack).ceil() as usize + forced_blocks;
        Ok(OffloadConfig {
            slots_per_layer: rows * per_row,
        })
    }
}

/// What one decode step moved and waited for (all layers).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Units the attention asked for.
    pub requested: usize,
    /// Resident and copied in before the step asked.
    pub hits: usize,
    /// Prefetched but still in flight when asked (the compute waited on it;
    /// on the asynchronous path, still in flight when the attention was ordered).
    pub late: usize,
    /// Not resident: fetched on the critical path.
    pub misses: usize,
    /// Units the prefetcher copied in.
    pub prefetched: usize,
    pub evicted: usize,
    pub h2d_bytes: usize,
    pub d2h_bytes: usize,
    pub transfer_us: f64,
    pub exposed_us: f64,
}

impl StepMetrics {
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.requested.max(1) as f64
    }
    pub fn miss_rate(&self) -> f64 {
        self.misses as f64 / self.requested.max(1) as f64
    }
    /// Fraction of the transfer time the compute hid.
    pub fn hidden_fraction(&self) -> f64 {
        hidden_fraction(self.transfer_us, self.exposed_us)
    }
}

/// Of `transfer` time spent copying, the fraction the compute did not wait
/// for (`exposed` is the waiting); 1 when nothing was copied.
pub fn hidden_fraction(transfer: f64, exposed: f64) -> f64 {
    if transfer <= 0.0 {
        1.0
    } else {
        (1.0 - exposed / transfer).clamp(0.0, 1.0)
    }
}

/// The slots of a step's selection, in the order asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub slots: Vec<Slot>,
}

const NONE: u32 = u32::MAX;

/// One layer's residency, in arrays indexed by unit (`block * kv_heads +
/// head`) or by slot, so a step over thousands of units costs array reads.
#[derive(Debug)]
struct LayerState {
    /// Slot of each host unit, or NONE.
    slot_of: Vec<u32>,
    /// Unit (index) in each slot, or NONE.
    unit_of: Vec<u32>,
    free: Vec<Slot>,
    stats: Vec<UnitStats>,
    /// Ticket id of the copy into (fetch) or out of (flush) each slot that
    /// has not been seen complete, or NONE.
    fetching: Vec<u32>,
    flushing: Vec<u32>,
    /// Slots with a copy not yet seen complete.
    busy: Vec<Slot>,
    /// A slot is pinned (read by the current step) when its mark equals `pin_epoch`.
    pinned: Vec<u64>,
    pin_epoch: u64,
    pinned_count: usize,
    /// Scratch marks for the units a prefetch protects.
    protected: Vec<u64>,
    protect_epoch: u64,
}

impl LayerState {
    fn new(units: usize, slots: usize) -> Self {
        LayerState {
            slot_of: vec![NONE; units],
            unit_of: vec![NONE; slots],
            free: (0..slots as Slot).rev().collect(),
            stats: vec![
                UnitStats {
                    last_selected: 0,
                    loaded: 0
                };
                slots
            ],
            fetching: vec![NONE; slots],
            flushing: vec![NONE; slots],
            busy: Vec::new(),
            pinned: vec![0; slots],
            pin_epoch: 1,
            pinned_count: 0,
            protected: vec![0; slots],
            protect_epoch: 0,
        }
    }

    fn resident(&self) -> usize {
        self.unit_of.len() - self.free.len()
    }

    fn full_error(&self, layer: usize, needed: usize) -> OffloadError {
        OffloadError::ResidentPoolFull {
            layer,
            needed,
            capacity: self.unit_of.len(),
            pinned: self.pinned_count,
            busy: self.busy.len(),
        }
    }
}

/// The offload engine over one backend.
pub struct OffloadEngine<B: TransferBackend> {
    backend: B,
    policy: Box<dyn EvictionPolicy>,
    layers: Vec<LayerState>,
    tickets: Vec<Option<B::Ticket>>,
    /// Ids of `tickets` whose copies completed, reused by the next copies,
    /// so the list is as long as the most copies ever in flight at once.
    free_tickets: Vec<u32>,
    step: u64,
    metrics: StepMetrics,
}

impl<B: TransferBackend> std::fmt::Debug for OffloadEngine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloadEngine")
            .field("policy", &self.policy.name())
            .field("layers", &self.layers.len())
            .field("step", &self.step)
            .finish()
    }
}

impl<B: TransferBackend> OffloadEngine<B> {
    /// An engine evicting the least recently selected units.
    pub fn new(backend: B) -> Self {
        Self::with_policy(backend, Box::new(LeastRecentlySelected))
    }

    pub fn with_policy(backend: B, policy: Box<dyn EvictionPolicy>) -> Self {
        let units = backend.host_blocks() * backend.kv_heads();
        let layers = (0..backend.num_layers())
            .map(|_| LayerState::new(units, backend.slots_per_layer()))
            .collect();
        OffloadEngine {
            backend,
            policy,
            layers,
            tickets: Vec::new(),
            free_tickets: Vec::new(),
            step: 0,
            metrics: StepMetrics::default(),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Units resident (or arriving) in a layer.
    pub fn resident(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, LayerState::resident)
    }

    /// The slot holding `unit`, if resident or arriving.
    pub fn slot_of(&self, layer: usize, unit: Unit) -> Option<Slot> {
        let heads = self.backend.kv_heads();
        let s = *self.layers.get(layer)?.slot_of.get(unit.index(heads))?;
        (s != NONE).then_some(s)
    }

    /// Starts a decode step.
    pub fn begin_step(&mut self) {
        self.step += 1;
        self.metrics = StepMetrics {
            step: self.step,
            ..StepMetrics::default()
        };
    }

    fn check(&self, layer: usize, units: &[Unit]) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(OffloadError::LayerOutOfRange {
                layer,
                num_layers: self.layers.len(),
            });
        }
        let (blocks, heads) = (self.backend.host_blocks(), self.backend.kv_heads());
        if let Some(u) = units
            .iter()
            .find(|u| u.block as usize >= blocks || u.head as usize >= heads)
        {
            return Err(OffloadError::UnitOutOfRange {
                block: u.block,
                head: u.head,
                blocks,
                kv_heads: heads,
            });
        }
        Ok(())
    }

    fn new_ticket(&mut self, ticket: B::Ticket) -> u32 {
        if let Some(id) = self.free_tickets.pop() {
            self.tickets[id as usize] = Some(ticket);
            return id;
        }
        self.tickets.push(Some(ticket));
        (self.tickets.len() - 1) as u32
    }

    /// Entries of the ticket list (live or free for reuse): bounded by the
    /// copies in flight at once, however many steps have run.
    pub fn ticket_capacity(&self) -> usize {
        self.tickets.len()
    }

    /// Forgets the copies of `layer` that have completed.
    fn poll(&mut self, layer: usize) -> Result<()> {
        let mut complete: Vec<(u32, bool)> = Vec::new();
        let state = &self.layers[layer];
        for &slot in &state.busy {
            for id in [state.fetching[slot as usize], state.flushing[slot as usize]] {
                if id != NONE && !complete.iter().any(|&(c, _)| c == id) {
                    let done = match &self.tickets[id as usize] {
                        Some(t) => self.backend.is_complete(t)?,
                        None => true,
                    };
                    complete.push((id, done));
                }
            }
        }
        let done = |id: u32| id == NONE || complete.iter().any(|&(c, d)| c == id && d);
        let state = &mut self.layers[layer];
        let mut still = Vec::with_capacity(state.busy.len());
        for &slot in &state.busy {
            let s = slot as usize;
            if done(state.fetching[s]) {
                state.fetching[s] = NONE;
            }
            if done(state.flushing[s]) {
                state.flushing[s] = NONE;
            }
            if state.fetching[s] != NONE || state.flushing[s] != NONE {
                still.push(slot);
            }
        }
        state.busy = still;
        Ok(())
    }

    /// Frees slots until `n` are free, never evicting protected, pinned,
    /// arriving or flushing units. Returns how many are free (at most `n`).
    fn make_room(&mut self, layer: usize, n: usize) -> Result<usize> {
        if self.layers[layer].free.len() >= n {
            return Ok(n);
        }
        self.poll(layer)?;
        let state = &mut self.layers[layer];
        let mut candidates: Vec<((u64, u64), Unit)> = Vec::new();
        let heads = self.backend.kv_heads();
        for (slot, &unit) in state.unit_of.iter().enumerate() {
            if unit == NONE
                || state.pinned[slot] == state.pin_epoch
                || state.protected[slot] == state.protect_epoch
                || state.fetching[slot] != NONE
                || state.flushing[slot] != NONE
            {
                continue;
            }
            let u = Unit::new(unit / heads as u32, (unit % heads as u32) as u16);
            candidates.push((self.policy.key(u, &state.stats[slot]), u));
        }
        // Only the `want` smallest keys matter: a selection, not a sort.
        let want = (n - state.free.len()).min(candidates.len());
        if want > 0 && want < candidates.len() {
            candidates.select_nth_unstable(want - 1);
        }
        let mut evicted = Vec::with_capacity(want);
        for &(_, unit) in &candidates[..want] {
            let index = unit.index(heads);
            let slot = state.slot_of[index];
            state.slot_of[index] = NONE;
            state.unit_of[slot as usize] = NONE;
            state.free.push(slot);
            evicted.push(unit);
        }
        self.metrics.evicted += evicted.len();
        self.backend.evicted(layer, &evicted)?;
        let state = &self.layers[layer];
        Ok(state.free.len().min(n))
    }

    /// Places `units` (not resident) into free slots and starts their copy.
    fn fetch_into_free(&mut self, layer: usize, units: &[Unit]) -> Result<Option<u32>> {
        if units.is_empty() {
            return Ok(None);
        }
        let step = self.step;
        let heads = self.backend.kv_heads();
        let state = &mut self.layers[layer];
        let mut copies = Vec::with_capacity(units.len());
        // Sorted by unit, so runs contiguous in the host pool get consecutive slots.
        let mut sorted = units.to_vec();
        sorted.sort_unstable();
        for unit in sorted {
            let slot = state.free.pop().expect("room was made");
            state.slot_of[unit.index(heads)] = slot;
            state.unit_of[slot as usize] = unit.index(heads) as u32;
            state.stats[slot as usize] = UnitStats {
                last_selected: 0,
                loaded: step,
            };
            copies.push((unit, slot));
        }
        let ticket = self.backend.fetch(layer, &copies)?;
        let id = self.new_ticket(ticket);
        let state = &mut self.layers[layer];
        for &(_, slot) in &copies {
            state.fetching[slot as usize] = id;
            state.busy.push(slot);
        }
        self.metrics.h2d_bytes += units.len() * self.backend.unit_bytes();
        Ok(Some(id))
    }

    /// Copies in the predicted units of `layer` that are not resident, as far
    /// as the pool has room after evicting what neither the prediction nor
    /// the current step needs. Best effort: what does not fit is a miss later.
    pub fn prefetch(&mut self, layer: usize, predicted: &[Unit]) -> Result<usize> {
        self.check(layer, predicted)?;
        let heads = self.backend.kv_heads();
        let state = &mut self.layers[layer];
        state.protect_epoch += 1;
        let mut missing: Vec<Unit> = Vec::new();
        let mut seen: HashSet<Unit> = HashSet::new();
        for &unit in predicted {
            match state.slot_of[unit.index(heads)] {
                NONE => {
                    if seen.insert(unit) {
                        missing.push(unit);
                    }
                }
                slot => state.protected[slot as usize] = state.protect_epoch,
            }
        }
        let room = self.make_room(layer, missing.len())?;
        missing.truncate(room);
        self.fetch_into_free(layer, &missing)?;
        self.metrics.prefetched += missing.len();
        Ok(missing.len())
    }

    /// Maps step t's selection of `layer` to slots: hits as they are, units
    /// still arriving waited for, misses fetched now (counted). The
    /// attention issued next may read exactly these slots; they stay pinned
    /// until [`release`](Self::release).
    pub fn acquire(&mut self, layer: usize, selected: &[Unit]) -> Result<Acquired> {
        self.check(layer, selected)?;
        self.poll(layer)?;
        let step = self.step;
        let heads = self.backend.kv_heads();
        let mut wait_for: Vec<u32> = Vec::new();
        let mut misses: Vec<Unit> = Vec::new();
        let mut missed: HashSet<Unit> = HashSet::new();
        {
            let state = &mut self.layers[layer];
            for &unit in selected {
                match state.slot_of[unit.index(heads)] {
                    NONE => {
                        if missed.insert(unit) {
                            misses.push(unit);
                            self.metrics.requested += 1;
                        }
                    }
                    slot => {
                        let s = slot as usize;
                        if state.pinned[s] == state.pin_epoch {
                            continue; // asked twice in one step
                        }
                        state.pinned[s] = state.pin_epoch;
                        state.pinned_count += 1;
                        self.metrics.requested += 1;
                        if state.fetching[s] != NONE {
                            self.metrics.late += 1;
                            wait_for.push(state.fetching[s]);
                        } else {
                            self.metrics.hits += 1;
                        }
                    }
                }
            }
        }
        if !misses.is_empty() {
            state_protect_none(&mut self.layers[layer]);
            let room = self.make_room(layer, misses.len())?;
            if room < misses.len() {
                return Err(self.layers[layer].full_error(layer, misses.len() - room));
            }
            self.metrics.misses += misses.len();
            if let Some(id) = self.fetch_into_free(layer, &misses)? {
                wait_for.push(id);
            }
            let state = &mut self.layers[layer];
            for unit in &misses {
                let s = state.slot_of[unit.index(heads)] as usize;
                state.pinned[s] = state.pin_epoch;
                state.pinned_count += 1;
            }
        }
        wait_for.sort_unstable();
        wait_for.dedup();
        for id in wait_for {
            if let Some(t) = &self.tickets[id as usize] {
                self.backend.order_before_compute(t)?;
            }
        }
        let state = &mut self.layers[layer];
        let mut slots = Vec::with_capacity(selected.len());
        for unit in selected {
            let slot = state.slot_of[unit.index(heads)];
            state.stats[slot as usize].last_selected = step;
            slots.push(slot);
        }
        Ok(Acquired { slots })
    }

    /// Orders the coming attention of `layer` after every copy into its
    /// slots still in flight (the asynchronous path: the attention looks
    /// slots up on the device and reads units without one from host memory,
    /// so nothing is acquired on the host). Returns how many units were
    /// still arriving.
    pub fn order_before_attention(&mut self, layer: usize) -> Result<usize> {
        self.check(layer, &[])?;
        self.poll(layer)?;
        let state = &self.layers[layer];
        let mut ids: Vec<u32> = state
            .busy
            .iter()
            .map(|&s| state.fetching[s as usize])
            .filter(|&id| id != NONE)
            .collect();
        let arriving = ids.len();
        self.metrics.late += arriving;
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if let Some(t) = &self.tickets[id as usize] {
                self.backend.order_before_compute(t)?;
            }
        }
        Ok(arriving)
    }

    /// Counts a selection the attention has already read through the
    /// device-side slot table (after the fact, nothing moves): resident
    /// units are hits, the rest were read from host memory on the critical
    /// path (misses). Marks them selected for the eviction policy. (On this
    /// path `late` counts the units still arriving when the attention was
    /// ordered, selected or not, and is not part of `requested`.)
    pub fn account(&mut self, layer: usize, selected: &[Unit]) -> Result<()> {
        self.check(layer, selected)?;
        let (step, heads) = (self.step, self.backend.kv_heads());
        let state = &mut self.layers[layer];
        for unit in selected {
            self.metrics.requested += 1;
            match state.slot_of[unit.index(heads)] {
                NONE => self.metrics.misses += 1,
                slot => {
                    self.metrics.hits += 1;
                    state.stats[slot as usize].last_selected = step;
                }
            }
        }
        Ok(())
    }

    /// The attention over `layer`'s acquired slots has been issued.
    pub fn release(&mut self, layer: usize) -> Result<()> {
        self.check(layer, &[])?;
        let state = &mut self.layers[layer];
        state.pin_epoch += 1;
        state.pinned_count = 0;
        self.backend.reads_done(layer)
    }

    /// A slot for a block being written on the device (the newest block of
    /// a sequence): resident at once, nothing copied in.
    pub fn place_new(&mut self, layer: usize, unit: Unit) -> Result<Slot> {
        self.check(layer, &[unit])?;
        let heads = self.backend.kv_heads();
        if let Some(slot) = self.slot_of(layer, unit) {
            // A write must not race a fetch still landing in the same slot.
            self.poll(layer)?;
            let id = self.layers[layer].fetching[slot as usize];
            if id != NONE {
                if let Some(t) = &self.tickets[id as usize] {
                    self.backend.order_before_compute(t)?;
                }
            }
            return Ok(slot);
        }
        state_protect_none(&mut self.layers[layer]);
        if self.make_room(layer, 1)? < 1 {
            return Err(self.layers[layer].full_error(layer, 1));
        }
        let step = self.step;
        let state = &mut self.layers[layer];
        let slot = state.free.pop().expect("room was made");
        state.slot_of[unit.index(heads)] = slot;
        state.unit_of[slot as usize] = unit.index(heads) as u32;
        state.stats[slot as usize] = UnitStats {
            last_selected: step,
            loaded: step,
        };
        self.backend.placed_new(layer, unit, slot)?;
        Ok(slot)
    }

    /// Copies written blocks back to the host in the background; they are
    /// not evicted before the copy completes.
    pub fn flush(&mut self, layer: usize, units: &[Unit]) -> Result<()> {
        self.check(layer, units)?;
        let copies: Vec<(Slot, Unit)> = units
            .iter()
            .filter_map(|u| self.slot_of(layer, *u).map(|s| (s, *u)))
            .collect();
        if copies.is_empty() {
            return Ok(());
        }
        let ticket = self.backend.flush(layer, &copies)?;
        let id = self.new_ticket(ticket);
        let state = &mut self.layers[layer];
        for &(slot, _) in &copies {
            state.flushing[slot as usize] = id;
            state.busy.push(slot);
        }
        self.metrics.d2h_bytes += copies.len() * self.backend.unit_bytes();
        Ok(())
    }

    /// Ends the step and returns its metrics. Does not wait: the prefetches
    /// for the next step keep flowing.
    pub fn end_step(&mut self) -> Result<StepMetrics> {
        let timing = self.backend.finish_step()?;
        for layer in 0..self.layers.len() {
            self.poll(layer)?;
        }
        self.forget_completed_tickets();
        self.metrics.transfer_us = timing.transfer.as_secs_f64() * 1e6;
        self.metrics.exposed_us = timing.exposed.as_secs_f64() * 1e6;
        Ok(self.metrics.clone())
    }

    /// Blocks until every copy issued so far (prefetches, flushes) has completed.
    pub fn synchronize(&mut self) -> Result<()> {
        self.backend.synchronize()?;
        for layer in 0..self.layers.len() {
            self.poll(layer)?;
        }
        self.forget_completed_tickets();
        Ok(())
    }

    fn forget_completed_tickets(&mut self) {
        let live: HashSet<u32> = self
            .layers
            .iter()
            .flat_map(|l| {
                l.busy
                    .iter()
                    .flat_map(|&s| [l.fetching[s as usize], l.flushing[s as usize]])
            })
            .filter(|&id| id != NONE)
            .collect();
        if live.is_empty() {
            self.tickets.clear();
            self.free_tickets.clear();
            return;
        }
        for (id, t) in self.tickets.iter_mut().enumerate() {
            if !live.contains(&(id as u32)) && t.take().is_some() {
                self.free_tickets.push(id as u32);
            }
        }
    }
}

/// Starts a new protection epoch with nothing protected (evictions for
/// misses and new blocks may take anything not pinned or busy).
fn state_protect_none(state: &mut LayerState) {
    state.protect_epoch += 1;
}
