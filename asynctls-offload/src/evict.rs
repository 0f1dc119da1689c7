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

/// Orders eviction candidates (none pinned, being copied or being flushed):
/// the engine evicts from the front.
pub trait EvictionPolicy: Send {
    fn order(&self, candidates: &mut [(Unit, UnitStats)]);
    fn name(&self) -> &'static str;
}

/// The default: least recently selected first, then oldest loaded.
#[derive(Debug, Default)]
pub struct LeastRecentlySelected;

impl EvictionPolicy for LeastRecentlySelected {
    fn order(&self, candidates: &mut [(Unit, UnitStats)]) {
        candidates.sort_unstable_by_key(|(u, s)| (s.last_selected, s.loaded, *u));
    }
    fn name(&self) -> &'static str {
        "least-recently-selected"
    }
}

/// First loaded, first evicted.
#[derive(Debug, Default)]
pub struct FirstLoaded;

impl EvictionPolicy for FirstLoaded {
    fn order(&self, candidates: &mut [(Unit, UnitStats)]) {
        candidates.sort_unstable_by_key(|(u, s)| (s.loaded, *u));
    }
    fn name(&self) -> &'static str {
        "first-loaded"
    }
}
