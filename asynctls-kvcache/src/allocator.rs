//! The physical block pool: O(1) allocate and free, reference counts so that
//! forked sequences share their prefix blocks.

use crate::{CacheError, Result};

/// Index of a physical block, the same in every layer's pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A free stack plus a reference count per block.
///
/// Invariant: a block is on the free stack exactly when its count is zero,
/// so `free + live == total` and no block is handed out twice.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    ref_counts: Vec<u32>,
    free: Vec<u32>,
    block_size: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Low ids are popped first, which keeps a fresh cache's blocks in order.
        let free = (0..num_blocks as u32).rev().collect();
        BlockAllocator {
            ref_counts: vec![0; num_blocks],
            free,
            block_size,
        }
    }

    pub fn total(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.total() - self.num_free()
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block.index()]
    }

    /// Fails without side effects unless `n` blocks are free.
    pub fn ensure_free(&self, n: usize) -> Result<()> {
        if n > self.free.len() {
            return Err(CacheError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
                total: self.total(),
                block_size: self.block_size,
            });
        }
        Ok(())
    }

    /// Takes a free block with reference count one.
    pub fn allocate(&mut self) -> Result<BlockId> {
        self.ensure_free(1)?;
        let id = self.free.pop().expect("checked above");
        debug_assert_eq!(self.ref_counts[id as usize], 0);
        self.ref_counts[id as usize] = 1;
        Ok(BlockId(id))
    }

    /// One more owner of a live block.
    pub fn retain(&mut self, block: BlockId) {
        let rc = &mut self.ref_counts[block.index()];
        assert!(*rc > 0, "retain of free block {}", block.0);
        *rc += 1;
    }

    /// One owner fewer; returns whether the block went back to the free stack.
    pub fn release(&mut self, block: BlockId) -> bool {
        let rc = &mut self.ref_counts[block.index()];
        assert!(*rc > 0, "release of free block {}", block.0);
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block.0);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        Retain(usize),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Alloc),
            1 => any::<usize>().prop_map(Op::Retain),
            3 => any::<usize>().prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Conservation (free + owned == total), counts equal the model's, and
        /// no block is handed out while it is still owned.
        #[test]
        fn conservation_and_no_double_allocation(total in 1usize..40, ops in prop::collection::vec(op(), 0..300)) {
            let mut alloc = BlockAllocator::new(total, 64);
            // The model: owners per block.
            let mut owners = vec![0u32; total];
            // Handles held by "sequences": one entry per ownership.
            let mut held: Vec<BlockId> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc => match alloc.allocate() {
                        Ok(b) => {
                            prop_assert_eq!(owners[b.index()], 0, "block {} handed out twice", b.0);
                            owners[b.index()] = 1;
                            held.push(b);
                        }
                        Err(CacheError::OutOfBlocks { free, .. }) => {
                            prop_assert_eq!(free, 0);
                            prop_assert!(owners.iter().all(|&o| o > 0));
                        }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    },
                    Op::Retain(i) if !held.is_empty() => {
                        let b = held[i % held.len()];
                        alloc.retain(b);
                        owners[b.index()] += 1;
                        held.push(b);
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let b = held.swap_remove(i % held.len());
                        owners[b.index()] -= 1;
                        let freed = alloc.release(b);
                        prop_assert_eq!(freed, owners[b.index()] == 0);
                    }
                    _ => {}
                }
                let live = owners.iter().filter(|&&o| o > 0).count();
                prop_assert_eq!(alloc.num_free() + live, total);
                for (i, &o) in owners.iter().enumerate() {
                    prop_assert_eq!(alloc.ref_count(BlockId(i as u32)), o);
                }
            }
        }
    }

    #[test]
    fn full_pool_error_says_what_is_missing() {
        let mut a = BlockAllocator::new(2, 64);
        a.allocate().unwrap();
        a.allocate().unwrap();
        let msg = a.allocate().unwrap_err().to_string();
        assert!(msg.contains("1 more blocks") && msg.contains("0 free of 2"), "{msg}");
    }
}
