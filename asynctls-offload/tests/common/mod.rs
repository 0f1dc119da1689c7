//! Random batches and drifting block selections for the resolver's tests
//! (the host twin's properties and the GPU-against-host comparison).

#![allow(dead_code)]

use asynctls_kernels::cuda::gather::SelectionShape;
use asynctls_offload::resolver::rankable_range;
use asynctls_offload::StepSelection;
use rand::seq::SliceRandom;
use rand::Rng;

/// A batch laid out in a host pool: lengths and a shuffled block table.
#[derive(Debug, Clone)]
pub struct Batch {
    pub kv_heads: usize,
    pub block_size: usize,
    pub block_topk: usize,
    pub sink_blocks: usize,
    pub local_blocks: usize,
    pub lens: Vec<i32>,
    pub max_blocks: usize,
    /// `[batch, max_blocks]`, distinct physical blocks (unused entries 0).
    pub table: Vec<i32>,
    pub host_blocks: usize,
}

impl Batch {
    pub fn random(rng: &mut impl Rng, batch: usize, kv_heads: usize, block_topk: usize, max_len: usize) -> Batch {
        let block_size = 16;
        let lens: Vec<i32> = (0..batch).map(|_| rng.random_range(1..=max_len) as i32).collect();
        let max_blocks = max_len.div_ceil(block_size);
        let host_blocks = batch * max_blocks + rng.random_range(0..4);
        let mut physical: Vec<i32> = (0..host_blocks as i32).collect();
        physical.shuffle(rng);
        let table = physical[..batch * max_blocks].to_vec();
        Batch {
            kv_heads,
            block_size,
            block_topk,
            sink_blocks: 1,
            local_blocks: 1,
            lens,
            max_blocks,
            table,
            host_blocks,
        }
    }

    /// As [`Self::random`], with every sequence after the first sharing a
    /// random prefix of the first's physical blocks (forks of one prompt:
    /// their rows can attend, and miss, the same units in one step).
    pub fn random_shared(
        rng: &mut impl Rng,
        batch: usize,
        kv_heads: usize,
        block_topk: usize,
        max_len: usize,
    ) -> Batch {
        let mut b = Batch::random(rng, batch, kv_heads, block_topk, max_len);
        let first_blocks = (b.lens[0] as usize).div_ceil(b.block_size);
        for s in 1..batch {
            let own_blocks = (b.lens[s] as usize).div_ceil(b.block_size);
            let shared = rng.random_range(0..=first_blocks.min(own_blocks));
            for j in 0..shared {
                b.table[s * b.max_blocks + j] = b.table[j];
            }
        }
        b
    }

    pub fn rows(&self) -> usize {
        self.lens.len() * self.kv_heads
    }

    pub fn units(&self) -> usize {
        self.host_blocks * self.kv_heads
    }

    pub fn max_entries(&self) -> usize {
        self.sink_blocks + self.block_topk + self.local_blocks + 1
    }

    /// Each row's candidates (`[rows, block_topk]`, ascending) and counts:
    /// the last step's with each block replaced with probability `drift`
    /// by a random unselected rankable one (fresh when `last` is `None`).
    pub fn drift(&self, rng: &mut impl Rng, last: Option<&[Vec<usize>]>, drift: f64) -> Vec<Vec<usize>> {
        (0..self.rows())
            .map(|row| {
                let len = self.lens[row / self.kv_heads] as usize;
                let (first, end) = rankable_range(len, self.block_size, self.sink_blocks, self.local_blocks);
                let mut pool: Vec<usize> = (first..end).collect();
                let k = self.block_topk.min(pool.len());
                let mut kept: Vec<usize> = match last {
                    Some(l) => l[row].iter().copied().filter(|_| !rng.random_bool(drift)).collect(),
                    None => Vec::new(),
                };
                pool.retain(|b| !kept.contains(b));
                pool.shuffle(rng);
                kept.extend(pool.into_iter().take(k - kept.len().min(k)));
                kept.truncate(k);
                kept.sort_unstable();
                kept
            })
            .collect()
    }

    /// The selection kernels' layout of `rows`' candidates.
    pub fn layout(&self, rows: &[Vec<usize>]) -> (Vec<i32>, Vec<i32>) {
        let mut candidates = vec![0i32; self.rows() * self.block_topk];
        let mut counts = Vec::with_capacity(rows.len());
        for (row, c) in rows.iter().enumerate() {
            for (i, &b) in c.iter().enumerate() {
                candidates[row * self.block_topk + i] = b as i32;
            }
            counts.push(c.len() as i32);
        }
        (candidates, counts)
    }

    pub fn shape(&self) -> SelectionShape {
        SelectionShape {
            max_blocks: self.max_blocks,
            kv_heads: self.kv_heads,
            block_size: self.block_size,
            block_topk: self.block_topk,
            sink_blocks: self.sink_blocks,
            local_blocks: self.local_blocks,
        }
    }

    pub fn selection<'a>(&'a self, candidates: &'a [i32], counts: &'a [i32]) -> StepSelection<'a> {
        StepSelection {
            candidates,
            candidate_counts: counts,
            lens: &self.lens,
            block_table: &self.table,
            shape: self.shape(),
        }
    }
}
