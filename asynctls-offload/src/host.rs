//! Admission against the host pool's byte budget.

use asynctls_kvcache::{BlockAllocator, BlockId};

use crate::{OffloadError, Result};

/// The host pool's blocks: a sequence is admitted only when all of its
/// blocks fit; when the pool is full, admission is refused with a clear
/// error and nothing is allocated.
#[derive(Debug)]
pub struct HostPool {
    allocator: BlockAllocator,
    block_size: usize,
    bytes_per_block: usize,
}

impl HostPool {
    /// As many blocks as `budget_bytes` holds, at `bytes_per_block` (K/V of
    /// every layer and head of one block, plus its metadata).
    pub fn with_budget(budget_bytes: usize, bytes_per_block: usize, block_size: usize) -> Result<Self> {
        if bytes_per_block == 0 || block_size == 0 {
            return Err(OffloadError::Config(
                "block size and bytes per block must be positive".into(),
            ));
        }
        let blocks = budget_bytes / bytes_per_block;
        if blocks == 0 {
            return Err(OffloadError::Config(format!(
                "a host budget of {budget_bytes} bytes holds no block of {bytes_per_block} bytes"
            )));
        }
        Ok(HostPool {
            allocator: BlockAllocator::new(blocks, block_size),
            block_size,
            bytes_per_block,
        })
    }

    pub fn capacity_blocks(&self) -> usize {
        self.allocator.total()
    }

    pub fn free_blocks(&self) -> usize {
        self.allocator.num_free()
    }

    /// Blocks for a sequence of `tokens`, all or none.
    pub fn admit(&mut self, tokens: usize) -> Result<Vec<BlockId>> {
        let needed = tokens.div_ceil(self.block_size);
        if self.allocator.ensure_free(needed).is_err() {
            return Err(OffloadError::HostPoolFull {
                needed,
                free: self.allocator.num_free(),
                capacity: self.allocator.total(),
                capacity_bytes: self.allocator.total() * self.bytes_per_block,
            });
        }
        (0..needed)
            .map(|_| {
                self.allocator.allocate().map_err(|_| OffloadError::HostPoolFull {
                    needed,
                    free: 0,
                    capacity: self.allocator.total(),
                    capacity_bytes: self.allocator.total() * self.bytes_per_block,
                })
            })
            .collect()
    }

    /// Returns a finished sequence's blocks.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            self.allocator.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_pool_refuses_without_allocating() {
        let mut pool = HostPool::with_budget(10 * 1000, 1000, 64).unwrap();
        assert_eq!(pool.capacity_blocks(), 10);
        let a = pool.admit(64 * 6).unwrap();
        assert_eq!(a.len(), 6);
        let err = pool.admit(64 * 5).unwrap_err();
        assert!(
            err.to_string()
                .contains("host KV pool is full: 5 more blocks needed, 4 free of 10"),
            "{err}"
        );
        assert_eq!(pool.free_blocks(), 4, "a refused admission allocates nothing");
        pool.release(&a);
        assert_eq!(pool.admit(64 * 10).unwrap().len(), 10);
        assert!(HostPool::with_budget(999, 1000, 64).is_err());
    }
}
