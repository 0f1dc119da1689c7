//! The engine: which units are resident where, what to copy, what to evict.

use std::collections::{HashMap, HashSet};

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
    /// Prefetched but still in flight when asked (the compute waited on it).
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
        if self.transfer_us <= 0.0 {
            1.0
        } else {
            (1.0 - self.exposed_us / self.transfer_us).clamp(0.0, 1.0)
        }
    }
}

/// The slots of a step's selection, in the order asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub slots: Vec<Slot>,
}

#[derive(Debug)]
struct LayerState {
    slot_of: HashMap<Unit, Slot>,
    unit_of: Vec<Option<Unit>>,
    free: Vec<Slot>,
    stats: HashMap<Unit, UnitStats>,
    /// Units whose fetch (or flush) has not been seen complete: ticket ids.
    fetching: HashMap<Unit, usize>,
    flushing: HashMap<Unit, usize>,
    /// Units the current step's attention reads.
    pinned: HashSet<Unit>,
}

impl LayerState {
    fn new(slots: usize) -> Self {
        LayerState {
            slot_of: HashMap::new(),
            unit_of: vec![None; slots],
            free: (0..slots as Slot).rev().collect(),
            stats: HashMap::new(),
            fetching: HashMap::new(),
            flushing: HashMap::new(),
            pinned: HashSet::new(),
        }
    }
}

/// The offload engine over one backend.
pub struct OffloadEngine<B: TransferBackend> {
    backend: B,
    policy: Box<dyn EvictionPolicy>,
    layers: Vec<LayerState>,
    tickets: Vec<Option<B::Ticket>>,
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
        let layers = (0..backend.num_layers())
            .map(|_| LayerState::new(backend.slots_per_layer()))
            .collect();
        OffloadEngine {
            backend,
            policy,
            layers,
            tickets: Vec::new(),
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
        self.layers.get(layer).map_or(0, |l| l.slot_of.len())
    }

    /// The slot holding `unit`, if resident or arriving.
    pub fn slot_of(&self, layer: usize, unit: Unit) -> Option<Slot> {
        self.layers.get(layer)?.slot_of.get(&unit).copied()
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

    fn new_ticket(&mut self, ticket: B::Ticket) -> usize {
        self.tickets.push(Some(ticket));
        self.tickets.len() - 1
    }

    /// Forgets the copies of `layer` that have completed.
    fn poll(&mut self, layer: usize) -> Result<()> {
        let mut done: HashMap<usize, bool> = HashMap::new();
        let state = &self.layers[layer];
        for &id in state.fetching.values().chain(state.flushing.values()) {
            if let std::collections::hash_map::Entry::Vacant(e) = done.entry(id) {
                let complete = match &self.tickets[id] {
                    Some(t) => self.backend.is_complete(t)?,
                    None => true,
                };
                e.insert(complete);
            }
        }
        let state = &mut self.layers[layer];
        state.fetching.retain(|_, id| !done[id]);
        state.flushing.retain(|_, id| !done[id]);
        Ok(())
    }

    /// Frees slots until `n` are free, never evicting `protect`ed, pinned,
    /// arriving or flushing units. Returns how many are free.
    fn make_room(&mut self, layer: usize, n: usize, protect: &HashSet<Unit>) -> Result<usize> {
        if self.layers[layer].free.len() >= n {
            return Ok(n);
        }
        self.poll(layer)?;
        let state = &mut self.layers[layer];
        let mut candidates: Vec<(Unit, UnitStats)> = state
            .slot_of
            .keys()
            .filter(|u| {
                !protect.contains(u)
                    && !state.pinned.contains(u)
                    && !state.fetching.contains_key(u)
                    && !state.flushing.contains_key(u)
            })
            .map(|u| (*u, state.stats[u]))
            .collect();
        self.policy.order(&mut candidates);
        let want = n - state.free.len();
        for (unit, _) in candidates.into_iter().take(want) {
            let slot = state.slot_of.remove(&unit).expect("candidate is resident");
            state.unit_of[slot as usize] = None;
            state.stats.remove(&unit);
            state.free.push(slot);
            self.metrics.evicted += 1;
        }
        Ok(state.free.len().min(n))
    }

    /// Places `units` (not resident) into free slots and starts their copy.
    fn fetch_into_free(&mut self, layer: usize, units: &[Unit]) -> Result<Option<usize>> {
        if units.is_empty() {
            return Ok(None);
        }
        let step = self.step;
        let state = &mut self.layers[layer];
        let mut copies = Vec::with_capacity(units.len());
        for &unit in units {
            let slot = state.free.pop().expect("room was made");
            state.slot_of.insert(unit, slot);
            state.unit_of[slot as usize] = Some(unit);
            state.stats.insert(
                unit,
                UnitStats {
                    last_selected: 0,
                    loaded: step,
                },
            );
            copies.push((unit, slot));
        }
        // Contiguous runs go out as one copy each in the GPU backend: keep
        // them in host order.
        copies.sort_unstable_by_key(|&(u, _)| u);
        let ticket = self.backend.fetch(layer, &copies)?;
        let id = self.new_ticket(ticket);
        let state = &mut self.layers[layer];
        for &(unit, _) in &copies {
            state.fetching.insert(unit, id);
        }
        self.metrics.h2d_bytes += units.len() * self.backend.unit_bytes();
        Ok(Some(id))
    }

    /// Copies in the predicted units of `layer` that are not resident, as far
    /// as the pool has room after evicting what neither the prediction nor
    /// the current step needs. Best effort: what does not fit is a miss later.
    pub fn prefetch(&mut self, layer: usize, predicted: &[Unit]) -> Result<usize> {
        self.check(layer, predicted)?;
        let protect: HashSet<Unit> = predicted.iter().copied().collect();
        let mut missing: Vec<Unit> = protect
            .iter()
            .filter(|u| !self.layers[layer].slot_of.contains_key(u))
            .copied()
            .collect();
        missing.sort_unstable();
        let room = self.make_room(layer, missing.len(), &protect)?;
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
        let mut wait_for: Vec<usize> = Vec::new();
        let mut misses: Vec<Unit> = Vec::new();
        {
            let state = &mut self.layers[layer];
            for &unit in selected {
                if !state.pinned.insert(unit) {
                    continue; // asked twice in one step
                }
                self.metrics.requested += 1;
                match state.slot_of.get(&unit) {
                    Some(_) => match state.fetching.get(&unit) {
                        Some(&id) => {
                            self.metrics.late += 1;
                            wait_for.push(id);
                        }
                        None => self.metrics.hits += 1,
                    },
                    None => misses.push(unit),
                }
            }
        }
        if !misses.is_empty() {
            let protect = HashSet::new();
            let room = self.make_room(layer, misses.len(), &protect)?;
            if room < misses.len() {
                let state = &self.layers[layer];
                return Err(OffloadError::ResidentPoolFull {
                    layer,
                    needed: misses.len() - room,
                    capacity: state.unit_of.len(),
                    pinned: state.pinned.len(),
                    busy: state.fetching.len() + state.flushing.len(),
                });
            }
            self.metrics.misses += misses.len();
            if let Some(id) = self.fetch_into_free(layer, &misses)? {
                wait_for.push(id);
            }
        }
        wait_for.sort_unstable();
        wait_for.dedup();
        for id in wait_for {
            if let Some(t) = &self.tickets[id] {
                self.backend.order_before_compute(t)?;
            }
        }
        let state = &mut self.layers[layer];
        let mut slots = Vec::with_capacity(selected.len());
        for unit in selected {
            slots.push(state.slot_of[unit]);
            if let Some(s) = state.stats.get_mut(unit) {
                s.last_selected = step;
            }
        }
        Ok(Acquired { slots })
    }

    /// The attention over `layer`'s acquired slots has been issued.
    pub fn release(&mut self, layer: usize) -> Result<()> {
        self.check(layer, &[])?;
        self.layers[layer].pinned.clear();
        self.backend.reads_done(layer)
    }

    /// A slot for a block being written on the device (the newest block of
    /// a sequence): resident at once, nothing copied in.
    pub fn place_new(&mut self, layer: usize, unit: Unit) -> Result<Slot> {
        self.check(layer, &[unit])?;
        if let Some(slot) = self.slot_of(layer, unit) {
            // A write must not race a fetch still landing in the same slot.
            self.poll(layer)?;
            if let Some(&id) = self.layers[layer].fetching.get(&unit) {
                if let Some(t) = &self.tickets[id] {
                    self.backend.order_before_compute(t)?;
                }
            }
            return Ok(slot);
        }
        let protect = HashSet::new();
        if self.make_room(layer, 1, &protect)? < 1 {
            let state = &self.layers[layer];
            return Err(OffloadError::ResidentPoolFull {
                layer,
                needed: 1,
                capacity: state.unit_of.len(),
                pinned: state.pinned.len(),
                busy: state.fetching.len() + state.flushing.len(),
            });
        }
        let step = self.step;
        let state = &mut self.layers[layer];
        let slot = state.free.pop().expect("room was made");
        state.slot_of.insert(unit, slot);
        state.unit_of[slot as usize] = Some(unit);
        state.stats.insert(
            unit,
            UnitStats {
                last_selected: step,
                loaded: step,
            },
        );
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
        for &(_, unit) in &copies {
            self.layers[layer].flushing.insert(unit, id);
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
        let live: HashSet<usize> = self
            .layers
            .iter()
            .flat_map(|l| l.fetching.values().chain(l.flushing.values()).copied())
            .collect();
        for (id, t) in self.tickets.iter_mut().enumerate() {
            if !live.contains(&id) {
                *t = None;
            }
        }
        if live.is_empty() {
            self.tickets.clear();
        }
    }
}
