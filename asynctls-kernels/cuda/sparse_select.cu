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
// are the host cache's: bounds [num_blocks, kv_heads, 2, D] f32 (max, then
// min), labels [num_blocks, kv_heads, B, r/2] u8 (low nibble first),
// label_params [num_blocks, kv_heads, B, 2] f16 (scale, zero), channels
// [kv_heads, r] i32. q is [batch, kv_heads * G, D] f32.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define THREADS 256
#define WARPS (THREADS / 32)
// The top-k kernels run one CTA per row; with few rows (batch 1) the GPU is
// otherwise idle, so each takes as many threads as a CTA can have.
#define TOPK_THREADS 1024
#define TOPK_WARPS (TOPK_THREADS / 32)

// The rankable (not forced) logical blocks of a sequence of `len` tokens are
// [first, last): after the sink, before the local window and partial block.
__device__ __forceinline__ void rankable_range(int len, int block_size, int sink_blocks, int local_blocks, int* first,
                                               int* last) {
    const int num_blocks = (len + block_size - 1) / block_size;
    const int partial = len % block_size != 0;
    const int sink = min(sink_blocks, num_blocks);
    *first = sink;
    *last = max(num_blocks - local_blocks - partial, sink);
}

__device__ __forceinline__ float combine(float a, float b, int reduce_max) { return reduce_max ? fmaxf(a, b) : a + b; }

// grid (rows, ceil(max_blocks / (WARPS * BLOCKS_PER_WARP))); each warp
// scores BLOCKS_PER_WARP logical blocks, issuing all their bound loads before
// using any (a warp per block spent most of its life waiting on one load
// chain). Lane l holds channel pairs 2l + 64j, j < PAIRS (key dim <= 64 PAIRS).
// scores [rows, max_blocks]: the group-reduced bound of every block below
// the sequence's block count (forced blocks too; select_blocks skips them).
#define BLOCKS_PER_WARP 4
template <int PAIRS>
__device__ void block_scores_pairs(const float* __restrict__ q, const float* __restrict__ bounds,
                                   const int* __restrict__ block_table, const int* __restrict__ lens,
                                   float* __restrict__ scores, int kv_heads, int group, int d, int block_size,
                                   int max_blocks, int reduce_max) {
    extern __shared__ float q_group[];  // [group, d]
    const int row = blockIdx.x, seq = row / kv_heads, head = row % kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int first = (blockIdx.y * WARPS + warp) * BLOCKS_PER_WARP;
    const int num_blocks = (lens[seq] + block_size - 1) / block_size;
    // Lanes 0..3 look up the warp's physical blocks while the CTA stages q.
    int physical = -1;
    if (lane < BLOCKS_PER_WARP && first + lane < num_blocks)
        physical = block_table[(size_t)seq * max_blocks + first + lane];
    for (int i = threadIdx.x; i < group * d; i += blockDim.x) q_group[i] = q[(size_t)row * group * d + i];
    __syncthreads();
    if (first >= num_blocks) return;
    float2 hi[BLOCKS_PER_WARP][PAIRS], lo[BLOCKS_PER_WARP][PAIRS];
#pragma unroll
    for (int b = 0; b < BLOCKS_PER_WARP; b++) {
        const int phys = __shfl_sync(0xffffffff, physical, b);
        const float* block_max = bounds + ((size_t)max(phys, 0) * kv_heads + head) * 2 * d;
#pragma unroll
        for (int j = 0; j < PAIRS; j++) {
            const int c = 2 * lane + 64 * j;
            const bool live = phys >= 0 && c < d;
            hi[b][j] = live ? *reinterpret_cast<const float2*>(block_max + c) : make_float2(0.f, 0.f);
            lo[b][j] = live ? *reinterpret_cast<const float2*>(block_max + d + c) : make_float2(0.f, 0.f);
        }
    }
    float reduced[BLOCKS_PER_WARP];
    for (int g = 0; g < group; g++) {
        const float* qg = q_group + g * d;
        float s[BLOCKS_PER_WARP] = {};
#pragma unroll
        for (int j = 0; j < PAIRS; j++) {
            const int c = 2 * lane + 64 * j;
            if (c < d) {
                const float2 v = *reinterpret_cast<const float2*>(qg + c);
#pragma unroll
                for (int b = 0; b < BLOCKS_PER_WARP; b++) {
                    s[b] += v.x > 0.0f ? v.x * hi[b][j].x : v.x * lo[b][j].x;
                    s[b] += v.y > 0.0f ? v.y * hi[b][j].y : v.y * lo[b][j].y;
                }
            }
        }
#pragma unroll
        for (int b = 0; b < BLOCKS_PER_WARP; b++) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s[b] += __shfl_xor_sync(0xffffffff, s[b], o);
            reduced[b] = g == 0 ? s[b] : combine(reduced[b], s[b], reduce_max);
        }
    }
    if (lane < BLOCKS_PER_WARP) {
        float mine = reduced[0];
#pragma unroll
        for (int b = 1; b < BLOCKS_PER_WARP; b++) mine = lane == b ? reduced[b] : mine;
        if (first + lane < num_blocks) scores[(size_t)row * max_blocks + first + lane] = mine;
    }
}

#define BLOCK_SCORES(PAIRS)                                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) block_scores_p##PAIRS(                                 \
        const float* q, const float* bounds, const int* block_table, const int* lens, float* scores, int kv_heads, \
        int group, int d, int block_size, int max_blocks, int reduce_max) {                                       \
        block_scores_pairs<PAIRS>(q, bounds, block_table, lens, scores, kv_heads, group, d, block_size,          \
                                  max_blocks, reduce_max);                                                        \
    }
BLOCK_SCORES(1)
BLOCK_SCORES(2)
BLOCK_SCORES(9)

// Floats as unsigned integers in the same order.
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of one value per thread (in thread order) over the
// CTA, and the total. All threads must call it.
__device__ __forceinline__ int cta_exclusive_scan(int v, int* total) {
    __shared__ int warp_sums[TOPK_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int inclusive = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int other = __shfl_up_sync(0xffffffff, inclusive, o);
        if (lane >= o) inclusive += other;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    int before = 0, sum = 0;
#pragma unroll
    for (int w = 0; w < TOPK_WARPS; w++) {
        before += w < warp ? warp_sums[w] : 0;
        sum += warp_sums[w];
    }
    __syncthreads();
    *total = sum;
    return before + inclusive - v;
}

// The k largest of scores[0, n), by radix select on their order keys staged
// in shared memory (`keys`, n entries); calls emit(index, rank) for each in
// ascending index order, rank being its position in that order. Ties at the
// threshold go to the lower indices. Returns how many were emitted. All
// threads must call it.
//
// The leading bits every key shares (scores of one row have one sign and
// few exponents) are found from the keys' min and max and skipped: the
// radix passes (8-bit digits, most significant first) start at the first
// bit that differs, so the first pass already spreads the keys over many
// bins and plain shared atomics do not queue on one bin.
template <typename Emit>
__device__ int top_k_in_order(const float* __restrict__ scores, int n, int k, uint32_t* keys, Emit emit) {
    __shared__ int histogram[256];
    __shared__ uint32_t s_prefix, s_lo[TOPK_WARPS], s_hi[TOPK_WARPS];
    __shared__ int s_remaining;
    uint32_t lo = 0xffffffffu, hi = 0u;
    for (int i = threadIdx.x; i < n; i += TOPK_THREADS) {
        const uint32_t key = order_key(scores[i]);
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
#pragma unroll
    for (int w = 0; w < TOPK_WARPS; w++) {
        lo = min(lo, s_lo[w]);
        hi = max(hi, s_hi[w]);
    }
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
            for (int i = threadIdx.x; i < n; i += TOPK_THREADS) {
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
    const int per = (n + TOPK_THREADS - 1) / TOPK_THREADS;
    const int begin = min(n, threadIdx.x * per), end = min(n, begin + per);
    int above = 0, equal = 0;
    for (int i = begin; i < end; i++) {
        const uint32_t key = keys[i];
        above += n <= k || key > threshold;
        equal += n > k && key == threshold;
    }
    int equal_total;
    const int equal_before = cta_exclusive_scan(equal, &equal_total);
    const int equal_taken = max(0, min(equal, take_equal - equal_before));
    int emitted;
    int rank = cta_exclusive_scan(above + equal_taken, &emitted);
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
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    select_blocks(const float* __restrict__ scores, const int* __restrict__ lens, int* __restrict__ out_blocks,
                  int* __restrict__ counts, int kv_heads, int block_size, int max_blocks, int k, int sink_blocks,
                  int local_blocks) {
    const int row = blockIdx.x, seq = row / kv_heads;
    int first, last;
    rankable_range(lens[seq], block_size, sink_blocks, local_blocks, &first, &last);
    extern __shared__ uint32_t keys[];
    const float* row_scores = scores + (size_t)row * max_blocks + first;
    int* out = out_blocks + (size_t)row * k;
    const int n = top_k_in_order(row_scores, last - first, k, keys, [&](int i, int rank) { out[rank] = first + i; });
    if (threadIdx.x == 0) counts[row] = n;
}

// grid (rows, ceil(max_candidates * B / THREADS)); one thread per candidate
// token. token_scores [rows, max_candidates * B].
// WORDS: the label words (8 channels each) a variant holds in registers;
// sized to r, since holding 16 for every r took 155 registers a thread and
// left one CTA per SM, too few warps to hide the chain of dependent loads.
// G: the group size when known at compile time (0: the runtime `group`);
// then each token's codes are converted to floats once for all heads, not
// once per head (the int-to-float conversions run at a quarter of the FMA
// rate: 20 heads of 128 channels made them the bulk of MLA's label step).
template <int WORDS, int G>
__device__ void label_scores_words(const float* __restrict__ q, const unsigned char* __restrict__ labels,
                 const __half* __restrict__ label_params, const int* __restrict__ channels,
                 const int* __restrict__ block_table, const int* __restrict__ candidates,
                 const int* __restrict__ candidate_counts, float* __restrict__ token_scores, int kv_heads, int group,
                 int d, int r, int block_size, int max_blocks, int max_candidates, int reduce_max) {
    extern __shared__ float picked[];  // [group, r], then [group] sums
    float* sums = picked + group * r;
    const int row = blockIdx.x, seq = row / kv_heads, head = row % kv_heads;
    for (int i = threadIdx.x; i < group * r; i += blockDim.x) {
        const int g = i / r, c = i % r;
        picked[i] = q[((size_t)row * group + g) * d + channels[head * r + c]];
    }
    __syncthreads();
    for (int g = threadIdx.x; g < group; g += blockDim.x) {
        float s = 0.0f;
        for (int c = 0; c < r; c++) s += picked[g * r + c];
        sums[g] = s;
    }
    __syncthreads();
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    const int candidate = i / block_size, slot = i % block_size;
    if (candidate >= candidate_counts[row]) return;
    const int logical = candidates[(size_t)row * max_candidates + candidate];
    const int physical = block_table[(size_t)seq * max_blocks + logical];
    const size_t token = ((size_t)physical * kv_heads + head) * block_size + slot;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(labels + token * (r / 2));
    const float scale = __half2float(label_params[token * 2]);
    const float zero = __half2float(label_params[token * 2 + 1]);
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
                const uint32_t cw = words[w];
                float c[8];
#pragma unroll
                for (int j = 0; j < 8; j++) c[j] = (float)((cw >> (4 * j)) & 15u);
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
        // The token's r/2 bytes of codes, as words in registers (r <= 128).
        uint32_t code_words[WORDS];
#pragma unroll
        for (int w = 0; w < WORDS; w++) code_words[w] = w < r / 8 ? words[w] : 0u;
        for (int g = 0; g < group; g++) {
            const float* qg = picked + g * r;
            float dot = 0.0f;
#pragma unroll
            for (int w = 0; w < WORDS; w++) {
                if (w < r / 8) {
                    const float4 lo = reinterpret_cast<const float4*>(qg)[2 * w];
                    const float4 hi = reinterpret_cast<const float4*>(qg)[2 * w + 1];
                    const uint32_t cw = code_words[w];
                    dot += lo.x * (float)(cw & 15u) + lo.y * (float)((cw >> 4) & 15u) +
                           lo.z * (float)((cw >> 8) & 15u) + lo.w * (float)((cw >> 12) & 15u) +
                           hi.x * (float)((cw >> 16) & 15u) + hi.y * (float)((cw >> 20) & 15u) +
                           hi.z * (float)((cw >> 24) & 15u) + hi.w * (float)(cw >> 28);
                }
            }
            const float s = zero * sums[g] + scale * dot;
            reduced = g == 0 ? s : combine(reduced, s, reduce_max);
        }
    }
    token_scores[(size_t)row * max_candidates * block_size + i] = reduced;
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
// The groups of the models served: Qwen3 (4 per KV head, r 32) and MLA (16,
// 20 or 32 heads over the latent, r 128).
LABEL_SCORES(label_scores_w4_g4, 4, 4)
LABEL_SCORES(label_scores_w16_g16, 16, 16)
LABEL_SCORES(label_scores_w16_g20, 16, 20)
LABEL_SCORES(label_scores_w16_g32, 16, 32)

// grid (rows); tokens [rows, max_tokens], token_counts [rows]: the sink
// tokens, the top-k of the label-scored candidates, the local window and
// partial block, ascending (the candidate blocks lie between sink and local).
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    select_tokens(const float* __restrict__ token_scores, const int* __restrict__ candidates,
                  const int* __restrict__ candidate_counts, const int* __restrict__ lens, int* __restrict__ tokens,
                  int* __restrict__ token_counts, int kv_heads, int block_size, int max_candidates, int k,
                  int sink_blocks, int local_blocks, int max_tokens) {
    const int row = blockIdx.x, seq = row / kv_heads;
    const int len = lens[seq];
    int first, last;
    rankable_range(len, block_size, sink_blocks, local_blocks, &first, &last);
    int* out = tokens + (size_t)row * max_tokens;
    const int sink_tokens = min(first * block_size, len);
    for (int t = threadIdx.x; t < sink_tokens; t += TOPK_THREADS) out[t] = t;
    extern __shared__ uint32_t keys[];
    const int* row_candidates = candidates + (size_t)row * max_candidates;
    const int n = top_k_in_order(token_scores + (size_t)row * max_candidates * block_size,
                                 candidate_counts[row] * block_size, k, keys, [&](int i, int rank) {
                                     out[sink_tokens + rank] =
                                         row_candidates[i / block_size] * block_size + i % block_size;
                                 });
    // A sequence within its sink block has no local window beyond it.
    const int local_start = min(max(last * block_size, sink_tokens), len);
    for (int t = local_start + threadIdx.x; t < len; t += TOPK_THREADS) out[sink_tokens + n + t - local_start] = t;
    if (threadIdx.x == 0) token_counts[row] = sink_tokens + n + (len - local_start);
}
