// Copies whole units (one block of one KV head: its rows of K or V) from a
// source pool to slots of a destination pool, 16 bytes per thread and step.
// The offload engine points `src` at pinned host memory mapped into the
// device's address space, so one launch pulls many scattered units over
// PCIe where a memcpy per unit would pay a call and a DMA setup each.
//
// units[i] (in units of the source) goes to slots[i] (of the destination);
// both pools are [count, unit_vec4] in 16-byte words.

#include <cuda_runtime.h>

extern "C" __global__ void __launch_bounds__(256)
    gather_units(const uint4* __restrict__ src, uint4* __restrict__ dst, const long long* __restrict__ units,
                 const int* __restrict__ slots, int unit_vec4) {
    const long long from = units[blockIdx.x] * unit_vec4;
    const long long to = (long long)slots[blockIdx.x] * unit_vec4;
    for (int j = threadIdx.x; j < unit_vec4; j += blockDim.x) dst[to + j] = src[from + j];
}

// table[index[i]] = values[i]: the offload engine's updates of a layer's
// unit -> slot table, applied on the copy stream in order with the copies.
extern "C" __global__ void scatter_i32(int* __restrict__ table, const int* __restrict__ index,
                                       const int* __restrict__ values, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) table[index[i]] = values[i];
}
