//! Which resident units make room when the pool is full.

use crate::Unit;

/// What the engine knows about a resident unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitStats {
    /// Last step whose selection included it (0: never selected).
    pub last_selected: u64,
    /// Step in which it was copied in.
    pub loaded: u64,
}

/// Ranks eviction candidates (none pinned, being copied or being flushed):
/// the engine evicts the units with the smallest keys (ties broken by unit).
pub trait EvictionPolicy: Send + Sync {
    fn key(&self, unit: Unit, stats: &UnitStats) -> (u64, u64);
    fn name(&self) -> &'static str;
}

/// The default: least recently selected first, then oldest loaded.
#[derive(Debug, Default)]
pub struct LeastRecentlySelected;

impl EvictionPolicy for LeastRecentlySelected {
    fn key(&self, _unit: Unit, s: &UnitStats) -> (u64, u64) {
        (s.last_selected, s.loaded)
    }
    fn name(&self) -> &'static str {
        "least-recently-selected"
    }
}

/// First loaded, first evicted.
#[derive(Debug, Default)]
pub struct FirstLoaded;

impl EvictionPolicy for FirstLoaded {
    fn key(&self, _unit: Unit, s: &UnitStats) -> (u64, u64) {
        (s.loaded, 0)
    }
    fn name(&self) -> &'static str {
        "first-loaded"
    }
}
