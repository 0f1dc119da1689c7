// The selection stages of two-level sparse decode on the GPU, one kernel per
// stage so that each has a CPU twin (asynctls-attn's select.rs):
//
//   block_scores   Quest's bound of every logical block, reduced over the
//                  query heads of a group (sum or max)
//   select_blocks  the top-k_b rankable blocks of each (sequence, KV head),
//                  in ascending block order
//   label_scores   INT4 label scores of every token of those blocks
//   select_tokens  the top-k_t of them, plus the sink and local-window
//                  tokens, as a sorted token list for decode_attention
//
// A "row" is one (sequence, KV head): row = seq * kv_heads + head. Layouts
// are the host cache's: bounds [num_blocks, kv_heads, 2, D] bf16 (max, then
// min; the host keeps the same values in f32), labels [num_blocks, kv_heads, B, r/2] u8 (low nibble first),
// label_params [num_blocks, kv_heads, B, 2] f16 (scale, zero), channels
// [kv_heads, r] i32. q is [batch, kv_heads * G, D] f32.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "select_range.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)
// The top-k kernels run one CTA per row. The token stage ranks 8-16k
// candidates and takes as many threads as a CTA can have; the block stage
// ranks about a thousand blocks, where the per-pass work of 32 warps
// outweighed their share of the items.
#define TOPK_THREADS 1024
#define BLOCK_TOPK_THREADS 256

__device__ __forceinline__ float combine(float a, float b, int reduce_max) { return reduce_max ? fmaxf(a, b) : a + b; }

// Copies n floats (n even; src and dst 8-byte aligned) from global to shared
// memory with several loads in flight per thread: a plain loop issues one
// load per iteration and waits on it before the next, and MLA's 20 x 576
// query made that chain most of the block-bound kernel's time.
template <typename V>
__device__ __forceinline__ void stage_vectors(const V* __restrict__ src, V* dst, int n) {
    for (int base = threadIdx.x; base < n; base += 8 * blockDim.x) {
        V v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = base + u * blockDim.x;
            if (i < n) v[u] = src[i];
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = base + u * blockDim.x;
            if (i < n) dst[i] = v[u];
        }
    }
}

__device__ __forceinline__ void stage_floats(const float* __restrict__ src, float* dst, int n) {
    if (n % 4 == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0)
        stage_vectors(reinterpret_cast<const float4*>(src), reinterpret_cast<float4*>(dst), n / 4);
    else
        stage_vectors(reinterpret_cast<const float2*>(src), reinterpret_cast<float2*>(dst), n / 2);
}

// grid (rows, ceil(max_blocks / (WARPS * BPW))); each warp scores BPW
// logical blocks, issuing all their bound loads before using any (a warp per
// block spent most of its life waiting on one load chain). Lane l holds
// channel pairs 2l + 64j, j < PAIRS (key dim <= 64 PAIRS). Each query value
// loaded from shared memory serves BPW blocks: with one block per warp,
// MLA's 20 heads x 576 channels made the query loads the bound.
// scores [rows, max_blocks]: the group-reduced bound of every block below
// the sequence's block count (forced blocks too; select_blocks skips them).
//
// Summed over the group, the bound needs no per-head work: a head's bound is
// sum_c max(q_c, 0) hi_c + min(q_c, 0) lo_c, so the group's is the same
// with P_c = sum_g max(q_gc, 0) and N_c = sum_g min(q_gc, 0) (what the CPU
// computes head by head, in another order). For MLA's 20 heads that is 20x
// fewer FMAs and one warp reduction per block instead of one per head.
template <int PAIRS, int BPW>
__device__ void block_scores_pairs(const float* __restrict__ q, const __nv_bfloat16* __restrict__ bounds,
                                   const int* __restrict__ block_table, const int* __restrict__ lens,
                                   float* __restrict__ scores, int kv_heads, int group, int d, int block_size,
                                   int max_blocks, int reduce_max) {
    extern __shared__ float q_group[];  // [group, d] (max) or P [d] then N [d] (sum)
    const int row = blockIdx.x, seq = row / kv_heads, head = row % kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int first = (blockIdx.y * WARPS + warp) * BPW;
    const int num_blocks = (lens[seq] + block_size - 1) / block_size;
    // Lanes 0..3 look up the warp's physical blocks while the CTA stages q.
    int physical = -1;
    if (lane < BPW && first + lane < num_blocks)
        physical = block_table[(size_t)seq * max_blocks + first + lane];
    const float* q_row = q + (size_t)row * group * d;
    if (reduce_max) {
        stage_floats(q_row, q_group, group * d);
    } else if (d % 4 == 0 && (reinterpret_cast<uintptr_t>(q_row) & 15) == 0) {
        // Four channels a thread, eight heads' loads in flight.
        const float4* q4 = reinterpret_cast<const float4*>(q_row);
        const int cols = d / 4;
        for (int col = threadIdx.x; col < cols; col += blockDim.x) {
            float4 pos = make_float4(0.f, 0.f, 0.f, 0.f), neg = pos;
#pragma unroll 8
            for (int g = 0; g < group; g++) {
                const float4 v = q4[(size_t)g * cols + col];
                pos.x += fmaxf(v.x, 0.0f);
                pos.y += fmaxf(v.y, 0.0f);
                pos.z += fmaxf(v.z, 0.0f);
                pos.w += fmaxf(v.w, 0.0f);
                neg.x += fminf(v.x, 0.0f);
                neg.y += fminf(v.y, 0.0f);
                neg.z += fminf(v.z, 0.0f);
                neg.w += fminf(v.w, 0.0f);
            }
            reinterpret_cast<float4*>(q_group)[col] = pos;
            reinterpret_cast<float4*>(q_group + d)[col] = neg;
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float pos = 0.0f, neg = 0.0f;
#pragma unroll 8
            for (int g = 0; g < group; g++) {
                const float v = q_row[(size_t)g * d + c];
                pos += fmaxf(v, 0.0f);
                neg += fminf(v, 0.0f);
            }
            q_group[c] = pos;
            q_group[d + c] = neg;
        }
    }
    __syncthreads();
    if (first >= num_blocks) return;
    float2 hi[BPW][PAIRS], lo[BPW][PAIRS];
#pragma unroll
    for (int b = 0; b < BPW; b++) {
        const int phys = __shfl_sync(0xffffffff, physical, b);
        const __nv_bfloat16* block_max = bounds + ((size_t)max(phys, 0) * kv_heads + head) * 2 * d;
#pragma unroll
        for (int j = 0; j < PAIRS; j++) {
            const int c = 2 * lane + 64 * j;
            const bool live = phys >= 0 && c < d;
            hi[b][j] = live ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(block_max + c))
                            : make_float2(0.f, 0.f);
            lo[b][j] = live ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(block_max + d + c))
                            : make_float2(0.f, 0.f);
        }
    }
    float reduced[BPW];
    if (!reduce_max) {
        float s[BPW] = {};
#pragma unroll
        for (int j = 0; j < PAIRS; j++) {
            const int c = 2 * lane + 64 * j;
            if (c < d) {
                const float2 pos = *reinterpret_cast<const float2*>(q_group + c);
                const float2 neg = *reinterpret_cast<const float2*>(q_group + d + c);
#pragma unroll
                for (int b = 0; b < BPW; b++)
                    s[b] += pos.x * hi[b][j].x + neg.x * lo[b][j].x + pos.y * hi[b][j].y + neg.y * lo[b][j].y;
            }
        }
#pragma unroll
        for (int b = 0; b < BPW; b++) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s[b] += __shfl_xor_sync(0xffffffff, s[b], o);
            reduced[b] = s[b];
        }
    }
    for (int g = 0; reduce_max && g < group; g++) {
        const float* qg = q_group + g * d;
        float s[BPW] = {};
#pragma unroll
        for (int j = 0; j < PAIRS; j++) {
            const int c = 2 * lane + 64 * j;
            if (c < d) {
                const float2 v = *reinterpret_cast<const float2*>(qg + c);
#pragma unroll
                for (int b = 0; b < BPW; b++) {
                    s[b] += v.x > 0.0f ? v.x * hi[b][j].x : v.x * lo[b][j].x;
                    s[b] += v.y > 0.0f ? v.y * hi[b][j].y : v.y * lo[b][j].y;
                }
            }
        }
#pragma unroll
        for (int b = 0; b < BPW; b++) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s[b] += __shfl_xor_sync(0xffffffff, s[b], o);
            reduced[b] = g == 0 ? s[b] : combine(reduced[b], s[b], reduce_max);
        }
    }
    if (lane < BPW) {
        float mine = reduced[0];
#pragma unroll
        for (int b = 1; b < BPW; b++) mine = lane == b ? reduced[b] : mine;
        if (first + lane < num_blocks) scores[(size_t)row * max_blocks + first + lane] = mine;
    }
}

#define BLOCK_SCORES(PAIRS, BPW)                                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) block_scores_p##PAIRS(                                 \
        const float* q, const __nv_bfloat16* bounds, const int* block_table, const int* lens, float* scores, int kv_heads, \
        int group, int d, int block_size, int max_blocks, int reduce_max) {                                       \
        block_scores_pairs<PAIRS, BPW>(q, bounds, block_table, lens, scores, kv_heads, group, d, block_size,          \
                                  max_blocks, reduce_max);                                                        \
    }
BLOCK_SCORES(1, 4)
BLOCK_SCORES(2, 4)
BLOCK_SCORES(9, 4)

// Floats as unsigned integers in the same order.
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of one value per thread (in thread order) over the
// CTA of NT threads, and the total. All threads must call it. The first warp
// scans the warp totals with shuffles: every thread walking all of them was
// most of the top-k kernels' instructions (five scans a call, 32 warps each).
template <int NT>
__device__ __forceinline__ int cta_exclusive_scan(int v, int* total) {
    constexpr int NW = NT / 32;
    __shared__ int warp_sums[NW + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int inclusive = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int other = __shfl_up_sync(0xffffffff, inclusive, o);
        if (lane >= o) inclusive += other;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int mine = lane < NW ? warp_sums[lane] : 0;
        int running = mine;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int other = __shfl_up_sync(0xffffffff, running, o);
            if (lane >= o) running += other;
        }
        if (lane < NW) warp_sums[lane] = running - mine;
        if (lane == 31) warp_sums[NW] = running;
    }
    __syncthreads();
    const int before = warp_sums[warp];
    *total = warp_sums[NW];
    __syncthreads();
    return before + inclusive - v;
}

// The k largest of score(0..n), by radix select on their order keys staged
// in shared memory (`keys`, n entries); calls emit(index, rank) for each in
// ascending index order, rank being its position in that order. Ties at the
// threshold go to the lower indices. Returns how many were emitted. All
// threads must call it; score(i) is called once for each i, by one thread.
//
// The leading bits every key shares (scores of one row have one sign and
// few exponents) are found from the keys' min and max and skipped: the
// radix passes (8-bit digits, most significant first) start at the first
// bit that differs, so the first pass already spreads the keys over many
// bins and plain shared atomics do not queue on one bin.
template <int NT, typename Score, typename Emit>
__device__ int top_k_in_order(Score score, int n, int k, uint32_t* keys, Emit emit) {
    constexpr int NW = NT / 32;
    __shared__ int histogram[256];
    __shared__ uint32_t s_prefix, s_lo[NW], s_hi[NW];
    __shared__ int s_remaining;
    uint32_t lo = 0xffffffffu, hi = 0u;
    for (int i = threadIdx.x; i < n; i += NT) {
        const uint32_t key = order_key(score(i));
        keys[i] = key;
        lo = min(lo, key);
        hi = max(hi, key);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xffffffff, lo, o));
        hi = max(hi, __shfl_xor_sync(0xffffffff, hi, o));
    }
    if ((threadIdx.x & 31) == 0) {
        s_lo[threadIdx.x >> 5] = lo;
        s_hi[threadIdx.x >> 5] = hi;
    }
    if (threadIdx.x == 0) s_remaining = min(k, n);
    __syncthreads();
    // The first warp reduces the warps' ranges and hands the result back.
    if (threadIdx.x < 32) {
        lo = threadIdx.x < NW ? s_lo[threadIdx.x] : 0xffffffffu;
        hi = threadIdx.x < NW ? s_hi[threadIdx.x] : 0u;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            lo = min(lo, __shfl_xor_sync(0xffffffff, lo, o));
            hi = max(hi, __shfl_xor_sync(0xffffffff, hi, o));
        }
        if (threadIdx.x == 0) {
            s_lo[0] = lo;
            s_hi[0] = hi;
        }
    }
    __syncthreads();
    lo = s_lo[0];
    hi = s_hi[0];
    uint32_t threshold = 0;
    int take_equal = 0;
    if (n > k) {
        // Bits above `top` are the same in every key: they are the prefix.
        const int top = lo == hi ? -1 : 31 - __clz(lo ^ hi);
        uint32_t mask = top < 0 ? 0xffffffffu : top == 31 ? 0u : ~((2u << top) - 1u);
        if (threadIdx.x == 0) s_prefix = lo & mask;
        __syncthreads();
        for (int high = top; high >= 0;) {
            const int width = min(8, high + 1), shift = high - width + 1;
            const uint32_t digits = (1u << width) - 1u;
            if (threadIdx.x < 256) histogram[threadIdx.x] = 0;
            __syncthreads();
            const uint32_t prefix = s_prefix;
            for (int i = threadIdx.x; i < n; i += NT) {
                const uint32_t key = keys[i];
                if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & digits], 1);
            }
            __syncthreads();
            // The digit where the count from the top reaches `remaining`: the
            // first warp scans the 256 bins from the top, 8 per lane.
            if (threadIdx.x < 32) {
                const int lane = threadIdx.x;
                int bins[8], mine = 0;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    bins[j] = histogram[255 - (lane * 8 + j)];
                    mine += bins[j];
                }
                int inclusive = mine;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const int other = __shfl_up_sync(0xffffffff, inclusive, o);
                    if (lane >= o) inclusive += other;
                }
                const int remaining = s_remaining;
                int above = inclusive - mine;  // keys in higher digits than this lane's bins
                if (above < remaining && inclusive >= remaining) {
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        if (above < remaining && above + bins[j] >= remaining) {
                            s_prefix = prefix | ((uint32_t)(255 - (lane * 8 + j)) << shift);
                            s_remaining = remaining - above;
                        }
                        above += bins[j];
                    }
                }
            }
            __syncthreads();
            mask |= digits << shift;
            high = shift - 1;
        }
        threshold = s_prefix;
        take_equal = s_remaining;
    }
    // Each thread owns a contiguous run of indices, so ranks follow index order.
    const int per = (n + NT - 1) / NT;
    const int begin = min(n, threadIdx.x * per), end = min(n, begin + per);
    int above = 0, equal = 0;
    for (int i = begin; i < end; i++) {
        const uint32_t key = keys[i];
        above += n <= k || key > threshold;
        equal += n > k && key == threshold;
    }
    int equal_total;
    const int equal_before = cta_exclusive_scan<NT>(equal, &equal_total);
    const int equal_taken = max(0, min(equal, take_equal - equal_before));
    int emitted;
    int rank = cta_exclusive_scan<NT>(above + equal_taken, &emitted);
    int equal_seen = equal_before;
    for (int i = begin; i < end; i++) {
        const uint32_t key = keys[i];
        bool take = n <= k || key > threshold;
        if (n > k && key == threshold) take = equal_seen++ < take_equal;
        if (take) emit(i, rank++);
    }
    return emitted;
}

// grid (rows); out_blocks [rows, k], counts [rows]: the selected rankable
// logical blocks, ascending.
extern "C" __global__ void __launch_bounds__(BLOCK_TOPK_THREADS)
    select_blocks(const float* __restrict__ scores, const int* __restrict__ lens, int* __restrict__ out_blocks,
                  int* __restrict__ counts, int kv_heads, int block_size, int max_blocks, int k, int sink_blocks,
                  int local_blocks) {
    const int row = blockIdx.x, seq = row / kv_heads;
    int first, last;
    rankable_range(lens[seq], block_size, sink_blocks, local_blocks, &first, &last);
    extern __shared__ uint32_t keys[];
    const float* row_scores = scores + (size_t)row * max_blocks + first;
    int* out = out_blocks + (size_t)row * k;
    const int n = top_k_in_order<BLOCK_TOPK_THREADS>([&](int i) { return row_scores[i]; }, last - first, k, keys,
                                 [&](int i, int rank) { out[rank] = first + i; });
    if (threadIdx.x == 0) counts[row] = n;
}

// A 4-bit code as a float without an int-to-float conversion (those run at
// a quarter of the FMA rate): 2^23 + code has the code in its low mantissa
// bits, and subtracting 2^23 is exact.
__device__ __forceinline__ float code_at(uint32_t word, int j) {
    return __uint_as_float(0x4B000000u | ((word >> (4 * j)) & 15u)) - 8388608.0f;
}

// The label score of one token for the query group: `picked` [group, r] are
// the query's label channels and `sums` [group] their sums (both in shared
// memory), `words` the token's r/8 words of codes, `scale`/`zero` its
// label parameters; the heads' scores combined by sum or max.
// WORDS: the label words (8 channels each) a variant holds in registers;
// sized to r, since holding 16 for every r took 155 registers a thread and
// left one CTA per SM, too few warps to hide the chain of dependent loads.
// G: the group size when known at compile time (0: the runtime `group`);
// then each token's codes are converted to floats once for all heads, not
// once per head.
template <int WORDS, int G>
__device__ __forceinline__ float label_score(const float* picked, const float* sums, const uint32_t* code_words,
                                             float scale, float zero, int group, int r, int reduce_max) {
    float reduced = 0.0f;
    if constexpr (G > 0) {
        float dot[G];
#pragma unroll
        for (int g = 0; g < G; g++) dot[g] = 0.0f;
        // The word loop stays rolled for wide labels: fully unrolled (16
        // words x G heads x 8 channels), nvcc 13.0 numbered the registers
        // differently from run to run, and the committed PTX must come out
        // the same on every machine.
#pragma unroll(WORDS <= 4 ? WORDS : 1)
        for (int w = 0; w < WORDS; w++) {
            if (w < r / 8) {
                const uint32_t cw = code_words[w];
                float c[8];
#pragma unroll
                for (int j = 0; j < 8; j++) c[j] = code_at(cw, j);
#pragma unroll
                for (int g = 0; g < G; g++) {
                    const float4 lo = reinterpret_cast<const float4*>(picked + g * r)[2 * w];
                    const float4 hi = reinterpret_cast<const float4*>(picked + g * r)[2 * w + 1];
                    dot[g] += lo.x * c[0] + lo.y * c[1] + lo.z * c[2] + lo.w * c[3] + hi.x * c[4] + hi.y * c[5] +
                              hi.z * c[6] + hi.w * c[7];
                }
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float s = zero * sums[g] + scale * dot[g];
            reduced = g == 0 ? s : combine(reduced, s, reduce_max);
        }
    } else {
        for (int g = 0; g < group; g++) {
            const float* qg = picked + g * r;
            float dot = 0.0f;
#pragma unroll
            for (int w = 0; w < WORDS; w++) {
                if (w < r / 8) {
                    const float4 lo = reinterpret_cast<const float4*>(qg)[2 * w];
                    const float4 hi = reinterpret_cast<const float4*>(qg)[2 * w + 1];
                    const uint32_t cw = code_words[w];
                    dot += lo.x * code_at(cw, 0) + lo.y * code_at(cw, 1) + lo.z * code_at(cw, 2) +
                           lo.w * code_at(cw, 3) + hi.x * code_at(cw, 4) + hi.y * code_at(cw, 5) +
                           hi.z * code_at(cw, 6) + hi.w * code_at(cw, 7);
                }
            }
            const float s = zero * sums[g] + scale * dot;
            reduced = g == 0 ? s : combine(reduced, s, reduce_max);
        }
    }
    return reduced;
}

// Stages the query group's label channels of `row` ([group, r]) and their
// sums ([group]) in shared memory. All threads must call it. The channel
// indices are read first, then four gathers per thread are in flight, and
// each warp sums a head's channels with shuffles (one thread per head
// walking 128 channels was a long chain of dependent shared loads).
//
// `summed`: the group's scores are to be summed, and a sum over heads of
// zero * sum_g + scale * (q_g . codes) is zero * (sum of sums) + scale *
// ((sum_g q_g) . codes): the heads' channels are summed here and the scores
// computed as for one head (20x fewer FMAs for MLA). Then picked is [r] and
// sums [1].
__device__ __forceinline__ void stage_label_query(const float* __restrict__ q, const int* __restrict__ channels,
                                                  float* picked, float* sums, int row, int head, int group, int d,
                                                  int r, bool summed) {
    const float* q_row = q + (size_t)row * group * d;
    const int* head_channels = channels + head * r;
    if (summed) {
        for (int c = threadIdx.x; c < r; c += blockDim.x) {
            const int channel = head_channels[c];
            float total = 0.0f;
#pragma unroll 8
            for (int g = 0; g < group; g++) total += q_row[(size_t)g * d + channel];
            picked[c] = total;
        }
        group = 1;
        __syncthreads();
    } else {
    for (int base = threadIdx.x; base < group * r; base += 4 * blockDim.x) {
        int at[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = base + u * blockDim.x;
            at[u] = i < group * r ? (i / r) * d + head_channels[i % r] : -1;
        }
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) v[u] = at[u] >= 0 ? q_row[at[u]] : 0.0f;
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = base + u * blockDim.x;
            if (i < group * r) picked[i] = v[u];
        }
    }
    __syncthreads();
    }
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int g = threadIdx.x >> 5; g < group; g += warps) {
        float s = 0.0f;
        for (int c = lane; c < r; c += 32) s += picked[g * r + c];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (lane == 0) sums[g] = s;
    }
    __syncthreads();
}

// One token's codes (r/8 words) into registers.
template <int WORDS>
__device__ __forceinline__ void load_codes(const unsigned char* __restrict__ labels, size_t token, int r,
                                           uint32_t* code_words) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(labels + token * (r / 2));
    if (WORDS % 4 == 0 && r / 8 == WORDS) {
#pragma unroll
        for (int w = 0; w < WORDS; w += 4) {
            const uint4 v = reinterpret_cast<const uint4*>(words)[w / 4];
            code_words[w] = v.x;
            code_words[w + 1] = v.y;
            code_words[w + 2] = v.z;
            code_words[w + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int w = 0; w < WORDS; w++) code_words[w] = w < r / 8 ? words[w] : 0u;
    }
}

// grid (rows, ceil(max_candidates * B / THREADS)); one thread per candidate
// token. token_scores [rows, max_candidates * B]. G == 1: the summed group
// (any group size, reduce_max 0), scored as one head.
template <int WORDS, int G>
__device__ void label_scores_words(const float* __restrict__ q, const unsigned char* __restrict__ labels,
                 const __half* __restrict__ label_params, const int* __restrict__ channels,
                 const int* __restrict__ block_table, const int* __restrict__ candidates,
                 const int* __restrict__ candidate_counts, float* __restrict__ token_scores, int kv_heads, int group,
                 int d, int r, int block_size, int max_blocks, int max_candidates, int reduce_max) {
    extern __shared__ float picked[];  // [group, r], then [group] sums
    float* sums = picked + group * r;
    const int row = blockIdx.x, seq = row / kv_heads, head = row % kv_heads;
    // The token's codes are loaded before the query is staged, so the two
    // chains of dependent loads (candidate, block, codes; channel, query)
    // overlap.
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    const int candidate = i / block_size, slot = i % block_size;
    const bool live = candidate < candidate_counts[row];
    uint32_t code_words[WORDS];
    __half2 params = __floats2half2_rn(0.0f, 0.0f);
    if (live) {
        const int logical = candidates[(size_t)row * max_candidates + candidate];
        const int physical = block_table[(size_t)seq * max_blocks + logical];
        const size_t token = ((size_t)physical * kv_heads + head) * block_size + slot;
        load_codes<WORDS>(labels, token, r, code_words);
        params = reinterpret_cast<const __half2*>(label_params)[token];
    }
    stage_label_query(q, channels, picked, sums, row, head, group, d, r, G == 1);
    if (!live) return;
    const float scale = __low2float(params), zero = __high2float(params);
    token_scores[(size_t)row * max_candidates * block_size + i] =
        label_score<WORDS, G>(picked, sums, code_words, scale, zero, G == 1 ? 1 : group, r, reduce_max);
}

#define LABEL_SCORES(NAME, WORDS, G)                                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                                     \
        const float* q, const unsigned char* labels, const __half* label_params, const int* channels,              \
        const int* block_table, const int* candidates, const int* candidate_counts, float* token_scores,           \
        int kv_heads, int group, int d, int r, int block_size, int max_blocks, int max_candidates, int reduce_max) { \
        label_scores_words<WORDS, G>(q, labels, label_params, channels, block_table, candidates, candidate_counts,  \
                                     token_scores, kv_heads, group, d, r, block_size, max_blocks, max_candidates,   \
                                     reduce_max);                                                                 \
    }
LABEL_SCORES(label_scores_w4, 4, 0)
LABEL_SCORES(label_scores_w8, 8, 0)
LABEL_SCORES(label_scores_w16, 16, 0)
// The group summed (reduce by sum, any group size).
LABEL_SCORES(label_scores_w4_sum, 4, 1)
LABEL_SCORES(label_scores_w8_sum, 8, 1)
LABEL_SCORES(label_scores_w16_sum, 16, 1)
// The groups of the models served: Qwen3 (4 per KV head, r 32) and MLA (16,
// 20 or 32 heads over the latent, r 128).
LABEL_SCORES(label_scores_w4_g4, 4, 4)
LABEL_SCORES(label_scores_w16_g16, 16, 16)
LABEL_SCORES(label_scores_w16_g20, 16, 20)
LABEL_SCORES(label_scores_w16_g32, 16, 32)

// tokens [rows, max_tokens], token_counts [rows] of one row: the sink
// tokens, the top-k of the label-scored candidates (score(i) of candidate
// token i), the local window and partial block, ascending (the candidate
// blocks lie between sink and local). One CTA of TOPK_THREADS per row.
template <typename Score>
__device__ void select_row_tokens(Score score, int n, const int* __restrict__ row_candidates, int len, int* out,
                                  int* __restrict__ token_count, uint32_t* keys, int block_size, int k,
                                  int sink_blocks, int local_blocks) {
    int first, last;
    rankable_range(len, block_size, sink_blocks, local_blocks, &first, &last);
    const int sink_tokens = min(first * block_size, len);
    for (int t = threadIdx.x; t < sink_tokens; t += TOPK_THREADS) out[t] = t;
    const int taken = top_k_in_order<TOPK_THREADS>(score, n, k, keys, [&](int i, int rank) {
        out[sink_tokens + rank] = row_candidates[i / block_size] * block_size + i % block_size;
    });
    // A sequence within its sink block has no local window beyond it.
    const int local_start = min(max(last * block_size, sink_tokens), len);
    for (int t = local_start + threadIdx.x; t < len; t += TOPK_THREADS) out[sink_tokens + taken + t - local_start] = t;
    if (threadIdx.x == 0) *token_count = sink_tokens + taken + (len - local_start);
}

// grid (rows): the token stage over the scores label_scores wrote.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    select_tokens(const float* __restrict__ token_scores, const int* __restrict__ candidates,
                  const int* __restrict__ candidate_counts, const int* __restrict__ lens, int* __restrict__ tokens,
                  int* __restrict__ token_counts, int kv_heads, int block_size, int max_candidates, int k,
                  int sink_blocks, int local_blocks, int max_tokens) {
    const int row = blockIdx.x, seq = row / kv_heads;
    extern __shared__ uint32_t keys[];
    const float* row_scores = token_scores + (size_t)row * max_candidates * block_size;
    select_row_tokens([&](int i) { return row_scores[i]; }, candidate_counts[row] * block_size,
                      candidates + (size_t)row * max_candidates, lens[seq], tokens + (size_t)row * max_tokens,
                      token_counts + row, keys, block_size, k, sink_blocks, local_blocks);
}
