// Writes into the GPU-resident paged cache, the twins of HostKvStorage's
// write_token:
//
//   kv_append       stores tokens' K (and V) as bf16 and quantizes each
//                   token's INT4 label from the stored key
//   kv_block_bounds recomputes the channel-wise max/min of the stored keys
//                   of whole blocks (after an append, for the blocks it
//                   touched; a decode step touches one block per sequence)
//   kv_bounds_merge the same bounds from the step's new keys merged into
//                   the bounds of the rows before them, without reading the
//                   stored keys (which an offloaded cache keeps in host
//                   memory): max and min are associative, so the result is
//                   bit-equal to kv_block_bounds
//   kv_tier_copy    copy-on-write of a block's units in an offloaded cache:
//                   host rows to host rows, and to the destination's
//                   resident slot when it has one
//
// An offloaded cache (the GPU engine's host tier) passes the host tier's
// device-mapped addresses as keys/values, plus the layer's unit -> slot
// table and slot pools: every row written to a unit's host rows is also
// written to its slot when it has one (write-through), so a resident copy
// never goes stale. Units are (physical block * kv_heads + head), laid out
// [units, B, D] in both the host tier and the pool; slots [slots, B, D].
//
// Layouts: keys [num_blocks, kv_heads, B, D] bf16, values [.., DV] bf16 (or
// null when values are a key prefix, MLA), bounds [num_blocks, kv_heads, 2,
// D] bf16, labels [num_blocks, kv_heads, B, r/2] u8, label_params [..., B, 2]
// f16, channels [kv_heads, r] i32. slots[i] = physical block * B + slot of
// token i; new_keys [tokens, kv_heads, D] f32, new_values [tokens, kv_heads, DV].

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define THREADS 128
#define F16_LIMIT 65504.0f

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : fminf(v, other);
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = scratch[0];
    for (int w = 1; w < THREADS / 32; w++) r = is_max ? fmaxf(r, scratch[w]) : fminf(r, scratch[w]);
    return r;
}

// grid (tokens, kv_heads), THREADS threads; dynamic shared: D floats.
extern "C" __global__ void __launch_bounds__(THREADS)
    kv_append(const float* __restrict__ new_keys, const float* __restrict__ new_values, const int* __restrict__ slots,
              const int* __restrict__ channels, __nv_bfloat16* __restrict__ keys, __nv_bfloat16* __restrict__ values,
              unsigned char* __restrict__ labels, __half* __restrict__ label_params, int kv_heads, int d, int dv,
              int r, int block_size, const int* __restrict__ unit_slot, __nv_bfloat16* __restrict__ slot_keys,
              __nv_bfloat16* __restrict__ slot_values) {
    extern __shared__ float stored[];  // the key as stored (bf16-rounded)
    __shared__ float scratch[THREADS / 32];
    const int token = blockIdx.x, head = blockIdx.y;
    const size_t unit = (size_t)slots[token] / block_size * kv_heads + head;
    const int offset = slots[token] % block_size;
    const size_t row = unit * block_size + offset;
    // Offloaded: the unit's resident copy, written through (-1: none).
    const int slot = unit_slot != nullptr ? unit_slot[unit] : -1;
    const size_t slot_row = slot >= 0 ? (size_t)slot * block_size + offset : 0;
    for (int c = threadIdx.x; c < d; c += THREADS) {
        const __nv_bfloat16 k = __float2bfloat16(new_keys[((size_t)token * kv_heads + head) * d + c]);
        keys[row * d + c] = k;
        if (slot >= 0) slot_keys[slot_row * d + c] = k;
        stored[c] = __bfloat162float(k);
    }
    if (values != nullptr) {
        for (int c = threadIdx.x; c < dv; c += THREADS) {
            const __nv_bfloat16 v = __float2bfloat16(new_values[((size_t)token * kv_heads + head) * dv + c]);
            values[row * dv + c] = v;
            if (slot >= 0) slot_values[slot_row * dv + c] = v;
        }
    }
    __syncthreads();
    // The label: r picked channels, zero rounded down and scale up to f16 so
    // every code lands in 0..15 and |x - x^| <= scale / 2.
    float lo = INFINITY, hi = -INFINITY;
    for (int c = threadIdx.x; c < r; c += THREADS) {
        const float v = stored[channels[head * r + c]];
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    lo = block_reduce(lo, false, scratch);
    hi = block_reduce(hi, true, scratch);
    const __half zero_h = __float2half_rd(fminf(fmaxf(lo, -F16_LIMIT), F16_LIMIT));
    const float zero = __half2float(zero_h);
    // IEEE divisions (__fdiv_rn): the PTX is built with --use_fast_math, and
    // the codes must come out exactly as the host's.
    const float step = fminf(fmaxf(__fdiv_rn(fminf(hi, F16_LIMIT) - zero, 15.0f), 1.17549435e-38f), F16_LIMIT);
    const __half scale_h = __float2half_ru(step);
    const float scale = __half2float(scale_h);
    for (int b = threadIdx.x; b < r / 2; b += THREADS) {
        const float lo_v = stored[channels[head * r + 2 * b]], hi_v = stored[channels[head * r + 2 * b + 1]];
        const int lo_code = (int)fminf(fmaxf(roundf(__fdiv_rn(lo_v - zero, scale)), 0.0f), 15.0f);
        const int hi_code = (int)fminf(fmaxf(roundf(__fdiv_rn(hi_v - zero, scale)), 0.0f), 15.0f);
        labels[row * (r / 2) + b] = (unsigned char)(lo_code | (hi_code << 4));
    }
    if (threadIdx.x == 0) {
        label_params[row * 2] = scale_h;
        label_params[row * 2 + 1] = zero_h;
    }
}

// grid (blocks.len(), kv_heads); fills[i] tokens of physical block blocks[i].
extern "C" __global__ void __launch_bounds__(THREADS)
    kv_block_bounds(const __nv_bfloat16* __restrict__ keys, const int* __restrict__ blocks,
                    const int* __restrict__ fills, __nv_bfloat16* __restrict__ bounds, int kv_heads, int d, int block_size) {
    const int block = blocks[blockIdx.x], head = blockIdx.y, fill = fills[blockIdx.x];
    const size_t base = ((size_t)block * kv_heads + head) * block_size * d;
    __nv_bfloat16* max = bounds + ((size_t)block * kv_heads + head) * 2 * d;
    __nv_bfloat16* min = max + d;
    for (int c = threadIdx.x; c < d; c += THREADS) {
        float mx = -INFINITY, mn = INFINITY;
        // Eight rows' loads in flight at a time (one at a time, a decode
        // step's refresh of 47 layers took 37 us per layer at batch 8).
        int s = 0;
        for (; s + 8 <= fill; s += 8) {
            float v[8];
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = __bfloat162float(keys[base + (size_t)(s + j) * d + c]);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                mx = fmaxf(mx, v[j]);
                mn = fminf(mn, v[j]);
            }
        }
        for (; s < fill; s++) {
            const float v = __bfloat162float(keys[base + (size_t)s * d + c]);
            mx = fmaxf(mx, v);
            mn = fminf(mn, v);
        }
        // Rounded outward (exact here: the keys are bf16), so the bound
        // holds for every stored key whatever the keys' dtype.
        max[c] = __float2bfloat16_ru(mx);
        min[c] = __float2bfloat16_rd(mn);
    }
}

// grid (blocks.len(), kv_heads): block blocks[i] holds fills[i] tokens after
// the step, of which the step wrote its rows starts[i] .. starts[i + 1]
// (new_keys [tokens, kv_heads, D] f32, as kv_append took them); the rows
// before them are summarized by the block's current bounds.
extern "C" __global__ void __launch_bounds__(THREADS)
    kv_bounds_merge(const float* __restrict__ new_keys, const int* __restrict__ blocks, const int* __restrict__ fills,
                    const int* __restrict__ starts, __nv_bfloat16* __restrict__ bounds, int kv_heads, int d) {
    const int block = blocks[blockIdx.x], head = blockIdx.y;
    const int first = starts[blockIdx.x], end = starts[blockIdx.x + 1];
    const bool has_old = fills[blockIdx.x] > end - first;
    __nv_bfloat16* max = bounds + ((size_t)block * kv_heads + head) * 2 * d;
    __nv_bfloat16* min = max + d;
    for (int c = threadIdx.x; c < d; c += THREADS) {
        float mx = has_old ? __bfloat162float(max[c]) : -INFINITY;
        float mn = has_old ? __bfloat162float(min[c]) : INFINITY;
        for (int t = first; t < end; t++) {
            // The key as kv_append stores it.
            const float v = __bfloat162float(__float2bfloat16(new_keys[((size_t)t * kv_heads + head) * d + c]));
            mx = fmaxf(mx, v);
            mn = fminf(mn, v);
        }
        max[c] = __float2bfloat16_ru(mx);
        min[c] = __float2bfloat16_rd(mn);
    }
}

// grid (kv_heads, 2): y 0 copies keys, 1 values (skipped when null). Copies
// physical block src's units over block dst's in the host tier, and into
// dst's resident slots where unit_slot has them. Rows are whole 16-byte
// words (key_words / value_words per unit).
extern "C" __global__ void __launch_bounds__(THREADS)
    kv_tier_copy(uint4* __restrict__ host_keys, uint4* __restrict__ host_values, uint4* __restrict__ slot_keys,
                 uint4* __restrict__ slot_values, const int* __restrict__ unit_slot, int src, int dst, int kv_heads,
                 int key_words, int value_words) {
    const int head = blockIdx.x;
    uint4* host = blockIdx.y == 0 ? host_keys : host_values;
    uint4* slots = blockIdx.y == 0 ? slot_keys : slot_values;
    const int words = blockIdx.y == 0 ? key_words : value_words;
    if (host == nullptr || words == 0) return;
    const size_t from = (size_t)src * kv_heads + head, to = (size_t)dst * kv_heads + head;
    const int slot = unit_slot[to];
    for (int w = threadIdx.x; w < words; w += THREADS) {
        const uint4 v = host[from * words + w];
        host[to * words + w] = v;
        if (slot >= 0) slots[(size_t)slot * words + w] = v;
    }
}
