//! What the next step will select, guessed from what the last ones did.

use std::collections::BTreeSet;

use crate::Unit;

/// Predicts step t+1's units of a layer from the selections seen so far.
pub trait Predictor: Send {
    /// Records step t's selection of `layer` and returns the units to
    /// prefetch for step t+1 of that layer.
    fn observe(&mut self, layer: usize, selected: &[Unit]) -> Vec<Unit>;
    fn name(&self) -> &'static str;
}

/// The paper's one-step-lag block filter: step t+1 will select what step t did.
#[derive(Debug, Default)]
pub struct OneStepLag;

impl Predictor for OneStepLag {
    fn observe(&mut self, _layer: usize, selected: &[Unit]) -> Vec<Unit> {
        selected.to_vec()
    }
    fn name(&self) -> &'static str {
        "one-step-lag"
    }
}

/// The union of the last two selections: more transfer, fewer misses when
/// selections oscillate.
#[derive(Debug, Default)]
pub struct UnionOfLastTwo {
    previous: Vec<Vec<Unit>>,
}

impl Predictor for UnionOfLastTwo {
    fn observe(&mut self, layer: usize, selected: &[Unit]) -> Vec<Unit> {
        if self.previous.len() <= layer {
            self.previous.resize(layer + 1, Vec::new());
        }
        let mut union: BTreeSet<Unit> = selected.iter().copied().collect();
        union.extend(self.previous[layer].iter().copied());
        self.previous[layer] = selected.to_vec();
        union.into_iter().collect()
    }
    fn name(&self) -> &'static str {
        "union-of-last-two"
    }
}
