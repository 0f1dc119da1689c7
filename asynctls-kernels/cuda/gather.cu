// The offload engine's kernels: unit copies from pinned host memory mapped
// into the device's address space, and the device-side resolver that keeps a
// layer's residency (which unit sits in which resident slot) without a host
// round trip, so an offloaded decode step stays one CUDA graph.
//
// A unit is one block of one KV head (its rows of K or V); unit = physical
// block * kv_heads + head. Pools are [count, unit_vec4] in 16-byte words.

#include <cuda_runtime.h>

#include "select_range.cuh"

__device__ __forceinline__ void copy_unit(const uint4* __restrict__ src, uint4* __restrict__ dst, long long from_unit,
                                          long long to_slot, int unit_vec4) {
    const long long from = from_unit * unit_vec4;
    const long long to = to_slot * unit_vec4;
    for (int j = threadIdx.x; j < unit_vec4; j += blockDim.x) dst[to + j] = src[from + j];
}

// units[i] (in units of the source) goes to slots[i] (of the destination).
extern "C" __global__ void __launch_bounds__(256)
    gather_units(const uint4* __restrict__ src, uint4* __restrict__ dst, const long long* __restrict__ units,
                 const int* __restrict__ slots, int unit_vec4) {
    copy_unit(src, dst, units[blockIdx.x], slots[blockIdx.x], unit_vec4);
}

// table[index[i]] = values[i]: the offload engine's updates of a layer's
// unit -> slot table, applied on the copy stream in order with the copies.
extern "C" __global__ void scatter_i32(int* __restrict__ table, const int* __restrict__ index,
                                       const int* __restrict__ values, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) table[index[i]] = values[i];
}

// ---------------------------------------------------------------------------
// The device-side resolver. Per layer: unit_slot [units] (slot or -1),
// slot_unit [slots] (unit or -1), slot_last [slots] (the last step that
// selected the slot's unit; 0 = never), a clock hand, and u64 counters
// (STAT_*). The step number lives on the device (residency_next_step), so a
// captured graph replays with the right one. CPU twin:
// asynctls-offload's `resolver.rs`, which must agree with these kernels
// entry for entry.

#define STAT_REQUESTED 0
#define STAT_HITS 1
#define STAT_MISSES 2
#define STAT_OVERLAP 3
#define STAT_PROMOTED 4
#define STAT_EVICTED 5
#define STAT_UNPLACED 6
#define STAT_H2D_BYTES 7

extern "C" __global__ void residency_next_step(unsigned* step) { *step += 1; }

__device__ __forceinline__ int warp_sum(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The sum of v over the CTA (any multiple of 32 threads up to 1024); every
// thread gets it.
__device__ int block_sum(int v, int* shared32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    int total = lane < warps ? shared32[lane] : 0;
    return warp_sum(total);
}

// Exclusive prefix sum of v over the CTA in thread order; *total gets the sum.
__device__ int block_exclusive_scan(int v, int* shared32, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int inclusive = v;
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += n;
    }
    __syncthreads();
    if (lane == 31) shared32[warp] = inclusive;
    __syncthreads();
    int warp_prefix = 0, sum = 0;
    for (int w = 0; w < warps; ++w) {
        const int s = shared32[w];
        if (w < warp) warp_prefix += s;
        sum += s;
    }
    *total = sum;
    return warp_prefix + inclusive - v;
}

// One CTA per row (sequence, KV head). The row's attended blocks, in this
// order: the sink blocks, the selected candidates (select_blocks' output),
// the local window and partial block; entry e of the row is its e-th block.
// A resident unit is a hit (its slot's recency becomes this step); any other
// is a miss, written to miss_units [rows, max_entries] (-1 elsewhere) for
// residency_promote. Each attended block's slot, or -(unit + 1) for a miss,
// goes to row_slots [rows, max_blocks]: the table the attention then reads
// (decode_attention's offload_rows), which reads a miss in place from host memory.
extern "C" __global__ void __launch_bounds__(256)
    residency_resolve(const int* __restrict__ candidates, const int* __restrict__ candidate_counts,
                      const int* __restrict__ lens, const int* __restrict__ block_table, int max_blocks, int kv_heads,
                      int block_size, int block_topk, int sink_blocks, int local_blocks,
                      const int* __restrict__ unit_slot, unsigned* __restrict__ slot_last,
                      const unsigned* __restrict__ step_ptr, int* __restrict__ miss_units, int max_entries,
                      int* __restrict__ row_slots, unsigned long long* __restrict__ stats) {
    __shared__ int shared32[32];
    const int row = blockIdx.x, seq = row / kv_heads, head = row % kv_heads;
    const unsigned step = *step_ptr;
    const int len = lens[seq];
    int first, last;
    rankable_range(len, block_size, sink_blocks, local_blocks, &first, &last);
    const int num_blocks = (len + block_size - 1) / block_size;
    const int count = min(max(candidate_counts[row], 0), block_topk);
    const int entries = min(first + count + (num_blocks - last), max_entries);
    int hits = 0, misses = 0, overlap = 0;
    for (int e = threadIdx.x; e < max_entries; e += blockDim.x) {
        int miss = -1;
        if (e < entries) {
            const int block = e < first           ? e
                              : e < first + count ? candidates[row * block_topk + e - first]
                                                  : last + (e - first - count);
            const int unit = block_table[seq * max_blocks + block] * kv_heads + head;
            const int slot = unit_slot[unit];
            row_slots[(size_t)row * max_blocks + block] = slot >= 0 ? slot : -unit - 1;
            if (slot >= 0) {
                ++hits;
                overlap += slot_last[slot] + 1 == step;
                slot_last[slot] = step;
            } else {
                ++misses;
                miss = unit;
            }
        }
        miss_units[row * max_entries + e] = miss;
    }
    hits = block_sum(hits, shared32);
    misses = block_sum(misses, shared32);
    overlap = block_sum(overlap, shared32);
    if (threadIdx.x == 0) {
        atomicAdd(stats + STAT_REQUESTED, (unsigned long long)(hits + misses));
        atomicAdd(stats + STAT_HITS, (unsigned long long)hits);
        atomicAdd(stats + STAT_MISSES, (unsigned long long)misses);
        atomicAdd(stats + STAT_OVERLAP, (unsigned long long)overlap);
    }
}

// Ages (steps since a slot's unit was last selected) in the promotion's
// histogram: the last bucket holds the free slots alone, so they go first;
// resident ages past the one before it share that one.
#define AGE_BUCKETS 256

__device__ __forceinline__ int slot_age(int unit, unsigned last, unsigned step) {
    return unit < 0 ? AGE_BUCKETS - 1 : (int)min(step - last, (unsigned)(AGE_BUCKETS - 2));
}

// One CTA of 1024 threads per layer, after the layer's attention: gives the
// step's misses (in row and entry order, at most max_promote of them) slots,
// so the next step finds them resident (the one-step-lag prediction: what a
// step selected, the next one selects again). Victims are the least
// recently selected slots among those no step of the last `protect`
// selected (1: not this step; 2: not this step nor the last, the
// union-of-two predictor), free slots first: a histogram of the slots' ages
// gives the age threshold, and among slots of the threshold age the clock
// order from the hand decides (the hand then moves past the last victim).
// Writes the copies to make (copy_units[i] -> copy_slots[i], *copy_count of
// them, victims in clock order) for gather_units_counted, and updates the
// tables as if they were done (the copies follow on the same stream).
extern "C" __global__ void __launch_bounds__(1024)
    residency_promote(const int* __restrict__ miss_units, int entries, int* __restrict__ miss_list,
                      int* __restrict__ unit_slot, int* __restrict__ slot_unit, unsigned* __restrict__ slot_last,
                      int slots, const unsigned* __restrict__ step_ptr, int protect, int max_promote,
                      unsigned* __restrict__ hand_ptr, long long* __restrict__ copy_units,
                      int* __restrict__ copy_slots, int* __restrict__ copy_count,
                      unsigned long long* __restrict__ stats, int unit_bytes) {
    __shared__ int shared32[32];
    __shared__ int histogram[AGE_BUCKETS];
    __shared__ int threshold, need_at_threshold, found, last_victim;
    const unsigned step = *step_ptr;
    // A unit that several rows miss (rows sharing a block: a fork beside its
    // parent) is promoted once, for its first entry: each entry claims its
    // unit in unit_slot (-1 for every miss) with the smallest INT_MIN + entry,
    // and only the claim's owner is compacted.
    for (int i = threadIdx.x; i < entries; i += blockDim.x) {
        const int unit = miss_units[i];
        if (unit >= 0) atomicMin(unit_slot + unit, INT_MIN + i);
    }
    __syncthreads();
    // The misses, compacted in order.
    int misses = 0;
    for (int base = 0; base < entries; base += blockDim.x) {
        const int i = base + threadIdx.x;
        int unit = i < entries ? miss_units[i] : -1;
        if (unit >= 0 && unit_slot[unit] != INT_MIN + i) unit = -1;
        int total;
        const int rank = block_exclusive_scan(unit >= 0, shared32, &total);
        if (unit >= 0) miss_list[misses + rank] = unit;
        misses += total;
    }
    __syncthreads();
    // The claims undone (the promoted get their slots below).
    for (int i = threadIdx.x; i < misses; i += blockDim.x) unit_slot[miss_list[i]] = -1;
    __syncthreads();
    const int want = min(misses, max_promote);
    // The ages of the evictable slots.
    for (int a = threadIdx.x; a < AGE_BUCKETS; a += blockDim.x) histogram[a] = 0;
    __syncthreads();
    if (want > 0)
        for (int s = threadIdx.x; s < slots; s += blockDim.x) {
            const int age = slot_age(slot_unit[s], slot_last[s], step);
            if (age >= protect) atomicAdd(&histogram[age], 1);
        }
    __syncthreads();
    if (threadIdx.x == 0) {
        // The oldest buckets that hold `want` victims; all evictable when fewer.
        int taken = 0, a = AGE_BUCKETS - 1;
        for (; a > protect && taken + histogram[a] < want; --a) taken += histogram[a];
        threshold = a;
        need_at_threshold = min(want - taken, histogram[a]);
        found = taken + need_at_threshold;
        last_victim = -1;
    }
    __syncthreads();
    const unsigned hand = slots > 0 ? *hand_ptr % (unsigned)slots : 0;
    const int victims = found;
    int taken = 0, equal_before = 0;
    for (int base = 0; base < slots && taken < victims; base += blockDim.x) {
        const int k = base + threadIdx.x;
        const int slot = k < slots ? (int)((hand + k) % slots) : 0;
        const int age = k < slots ? slot_age(slot_unit[slot], slot_last[slot], step) : -1;
        int equal_total, total;
        const int equal_rank = block_exclusive_scan(age == threshold, shared32, &equal_total);
        const bool chosen = age > threshold || (age == threshold && equal_before + equal_rank < need_at_threshold);
        equal_before += equal_total;
        const int rank = block_exclusive_scan(chosen, shared32, &total);
        if (chosen) {
            copy_slots[taken + rank] = slot;
            if (taken + rank == victims - 1) last_victim = k;
        }
        taken += total;
    }
    __syncthreads();
    int evicted = 0;
    for (int i = threadIdx.x; i < victims; i += blockDim.x) {
        const int slot = copy_slots[i], unit = miss_list[i], old = slot_unit[slot];
        if (old >= 0) {
            unit_slot[old] = -1;
            ++evicted;
        }
        unit_slot[unit] = slot;
        slot_unit[slot] = unit;
        slot_last[slot] = step;
        copy_units[i] = unit;
    }
    evicted = block_sum(evicted, shared32);
    if (threadIdx.x == 0) {
        *copy_count = victims;
        if (victims > 0) *hand_ptr = (hand + last_victim + 1) % slots;
        stats[STAT_PROMOTED] += victims;
        stats[STAT_EVICTED] += evicted;
        stats[STAT_UNPLACED] += misses - victims;
        stats[STAT_H2D_BYTES] += (unsigned long long)victims * unit_bytes;
    }
}

// The copies residency_promote decided: *count units, keys and (when
// value_vec4 > 0) values, grid-strided so a fixed grid serves any count.
extern "C" __global__ void __launch_bounds__(256)
    gather_units_counted(const uint4* __restrict__ src_keys, uint4* __restrict__ dst_keys, int key_vec4,
                         const uint4* __restrict__ src_values, uint4* __restrict__ dst_values, int value_vec4,
                         const long long* __restrict__ units, const int* __restrict__ slots,
                         const int* __restrict__ count) {
    const int n = *count;
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        copy_unit(src_keys, dst_keys, units[i], slots[i], key_vec4);
        if (value_vec4 > 0) copy_unit(src_values, dst_values, units[i], slots[i], value_vec4);
    }
}
