// Paged decode attention for GQA (flash-decoding on tensor cores): one CTA
// per (sequence, KV head, split of the tokens). The G query heads of the
// group are the rows of an mma tile (padded to 16), so every K and V row
// staged in shared memory serves all of them, and the scores, their
// reductions and P V are mma.sync instead of per-token shuffles. With a
// token list it is the exact-attention stage of sparse decode (the rows
// are gathered); without, dense decode. Partial results (running max, sum
// and weighted values per split) are merged by decode_combine.
//
// Layouts: q [batch, q_heads, D] f32; K and V pools [num_blocks, kv_heads,
// BLOCK, D] bf16; block_table [batch, max_blocks] i32; lens [batch] i32;
// offloaded (unit_slots != null): the pools are the offload engine's
// resident slots [slots, BLOCK, D], unit_slots [num_blocks * kv_heads] names
// the slot of each (block, head) unit or -1, and a unit without a slot is
// read in place from host_k/host_v ([num_blocks, kv_heads, BLOCK, D], pinned
// host memory mapped into the device: a miss served on the critical path
// without a host round trip); with offload_rows set, block_table is instead
// [batch * kv_heads, max_blocks] per (sequence, KV head) row, each attended
// block's slot or -(unit + 1) for one read in place (written by the offload
// resolver's residency_resolve), one lookup per token instead of two;
// tokens [batch * kv_heads, max_tokens] i32 sorted positions and
// token_counts [batch * kv_heads] (or null for dense);
// partial_acc [batch, q_heads, splits, D], partial_ml [batch, q_heads, splits, 2].

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mma.cuh"

#define DECODE_WARPS 4
#define TILE 64      // tokens a CTA stages per step: 16 per warp
#define DPAD 8       // bf16 row padding: ldmatrix rows on distinct banks

template <int D>
struct DecodeTraits {
    static constexpr int LD = D + DPAD;
    static constexpr int ROW_ELEMS = TILE * LD;             // one tensor of one stage
    static constexpr int STAGE_ELEMS = 2 * ROW_ELEMS;       // K then V
    static constexpr int Q_ELEMS = 16 * LD;
    static constexpr int THREADS = DECODE_WARPS * 32;
    static constexpr int CHUNKS = D / 8;                    // 16-byte chunks of a row
    static constexpr int ROWS_PER_PASS = THREADS / CHUNKS;  // rows one pass of the CTA copies
};

// Stages the K and V rows of tokens [t0, t0 + TILE) of the split (clamped
// to `end`: rows past it repeat the split's first token, finite data that
// the mask then weighs by zero). Consecutive threads copy consecutive
// 16-byte chunks of a row, so each warp-wide cp.async covers whole rows.
template <int D>
__device__ __forceinline__ void stage_tile(__nv_bfloat16* stage, int t0, int begin, int end, int seq, int head,
                                           const int* __restrict__ row_tokens, const int* __restrict__ block_table,
                                           const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool, int kv_heads,
                                           int block_size, int max_blocks, const int* __restrict__ unit_slots,
                                           const __nv_bfloat16* host_k, const __nv_bfloat16* host_v,
                                           int offload_rows) {
    using T = DecodeTraits<D>;
    const int c = (threadIdx.x % T::CHUNKS) * 8, r0 = threadIdx.x / T::CHUNKS;
    const size_t table_row = (size_t)(offload_rows ? seq * kv_heads + head : seq) * max_blocks;
#pragma unroll
    for (int k = 0; k < TILE / T::ROWS_PER_PASS; k++) {
        const int r = r0 + k * T::ROWS_PER_PASS;
        const int t = t0 + r < end ? t0 + r : begin;
        const int pos = row_tokens != nullptr ? row_tokens[t] : t;
        const int block = block_table[table_row + pos / block_size];
        const __nv_bfloat16* kp = k_pool;
        const __nv_bfloat16* vp = v_pool;
        size_t row;
        if (offload_rows) {
            if (block < 0) {
                kp = host_k;
                vp = host_v;
            }
            row = ((size_t)(block >= 0 ? block : -block - 1) * block_size + pos % block_size) * D;
        } else if (unit_slots != nullptr) {
            const int unit = block * kv_heads + head;
            const int slot = unit_slots[unit];
            if (slot < 0) {
                kp = host_k;
                vp = host_v;
            }
            row = ((size_t)(slot >= 0 ? slot : unit) * block_size + pos % block_size) * D;
        } else {
            row = (((size_t)block * kv_heads + head) * block_size + pos % block_size) * D;
        }
        cp_async_16(stage + r * T::LD + c, kp + row + c);
        cp_async_16(stage + T::ROW_ELEMS + r * T::LD + c, vp + row + c);
    }
}

template <int D, int G, int STAGES>
__device__ void decode_split(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
                             const __nv_bfloat16* __restrict__ v_pool, const int* __restrict__ block_table,
                             const int* __restrict__ lens, const int* __restrict__ tokens,
                             const int* __restrict__ token_counts, float* __restrict__ partial_acc,
                             float* __restrict__ partial_ml, int kv_heads, int block_size, int max_blocks,
                             int max_tokens, float scale, const int* __restrict__ unit_slots,
                             const __nv_bfloat16* host_k, const __nv_bfloat16* host_v, int offload_rows) {
    using T = DecodeTraits<D>;
    static_assert(G <= 8, "the group's heads are rows 0..7 of the mma tile");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [16][LD], rows >= G zero
    __nv_bfloat16* stages = qs + T::Q_ELEMS;                         // [STAGES][K, V][TILE][LD]

    const int seq = blockIdx.x / kv_heads, head = blockIdx.x % kv_heads;
    const int split = blockIdx.y, splits = gridDim.y;
    const int q_heads = kv_heads * G;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;

    const bool sparse = tokens != nullptr;
    const int n = sparse ? token_counts[blockIdx.x] : lens[seq];
    const int* row_tokens = sparse ? tokens + (size_t)blockIdx.x * max_tokens : nullptr;
    // Whole tiles per split, so dense tiles stay within cache blocks.
    const int per_split = ((n + splits - 1) / splits + TILE - 1) / TILE * TILE;
    const int begin = min(n, split * per_split), end = min(n, begin + per_split);
    const int tiles = (end - begin + TILE - 1) / TILE;

    for (int s = 0; s < STAGES - 1; s++) {
        if (s < tiles)
            stage_tile<D>(stages + s * T::STAGE_ELEMS, begin + s * TILE, begin, end, seq, head, row_tokens,
                          block_table, k_pool, v_pool, kv_heads, block_size, max_blocks, unit_slots, host_k, host_v, offload_rows);
        cp_async_commit();
    }
    for (int i = threadIdx.x; i < 16 * D / 2; i += T::THREADS) {
        const int r = i / (D / 2), c = (i % (D / 2)) * 2;
        float2 v = make_float2(0.f, 0.f);
        if (r < G) v = *reinterpret_cast<const float2*>(q + ((size_t)seq * q_heads + head * G + r) * D + c);
        *reinterpret_cast<uint32_t*>(qs + r * T::LD + c) = pack_bf16(v.x * scale, v.y * scale);
    }
    __syncthreads();
    // Q as A fragments, for every 16 channels.
    uint32_t qf[D / 16][4];
    const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_col = 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) ldmatrix_x4(qf[kk], qs + a_row * T::LD + kk * 16 + a_col);

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_run = -INFINITY, l_run = 0.f;  // row g (rows g + 8 are padding)

    const int b_row = (lane & 7) + 8 * (lane >> 4), b_col = 8 * ((lane >> 3) & 1);
    const int v_row = (lane & 7) + 8 * ((lane >> 3) & 1), v_col = 8 * (lane >> 4);
    for (int t = 0; t < tiles; t++) {
        // Tile t has landed once at most STAGES - 2 later groups are pending;
        // after the barrier every warp is done with tile t - 1, whose stage
        // then takes tile t + STAGES - 1 (one barrier per tile).
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int ahead = t + STAGES - 1;
        if (ahead < tiles)
            stage_tile<D>(stages + (ahead % STAGES) * T::STAGE_ELEMS, begin + ahead * TILE, begin, end, seq, head,
                          row_tokens, block_table, k_pool, v_pool, kv_heads, block_size, max_blocks, unit_slots,
                          host_k, host_v, offload_rows);
        cp_async_commit();
        const __nv_bfloat16* ks = stages + (t % STAGES) * T::STAGE_ELEMS + warp * 16 * T::LD;
        const __nv_bfloat16* vs = ks + T::ROW_ELEMS;

        // S = Q K^T for the warp's 16 tokens (two n8 tiles).
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t b[4];
            ldmatrix_x4(b, ks + b_row * T::LD + kk * 16 + b_col);
            mma_16816(s[0], qf[kk], b[0], b[1]);
            mma_16816(s[1], qf[kk], b[2], b[3]);
        }
        const int tok0 = begin + t * TILE + warp * 16;
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                if (tok0 + j * 8 + 2 * tq + e >= end) s[j][e] = -INFINITY;
                mx = fmaxf(mx, s[j][e]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float m_new = fmaxf(m_run, mx);
        const float base = m_new == -INFINITY ? 0.f : m_new;
        const float correction = __expf(m_run - base);
        m_run = m_new;
        const uint32_t p0 = pack_bf16(__expf(s[0][0] - base), __expf(s[0][1] - base));
        const uint32_t p1 = pack_bf16(__expf(s[1][0] - base), __expf(s[1][1] - base));
        // Sum exactly what P V adds up: the bf16-rounded weights.
        const __nv_bfloat162 pb0 = *reinterpret_cast<const __nv_bfloat162*>(&p0);
        const __nv_bfloat162 pb1 = *reinterpret_cast<const __nv_bfloat162*>(&p1);
        l_run = l_run * correction + __low2float(pb0) + __high2float(pb0) + __low2float(pb1) + __high2float(pb1);
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[j][0] *= correction;
            o[j][1] *= correction;
        }
        // O += P V; rows g + 8 of P are zero (padding heads).
        const uint32_t a[4] = {p0, 0u, p1, 0u};
#pragma unroll
        for (int j = 0; j < D / 8; j += 2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vs + v_row * T::LD + j * 8 + v_col);
            mma_16816(o[j], a, b[0], b[1]);
            mma_16816(o[j + 1], a, b[2], b[3]);
        }
    }
    cp_async_wait<0>();

    // Merge the warps' states (rows < G) through shared memory.
    float l = l_run;
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    float* wm = reinterpret_cast<float*>(stages);  // [warps][G]
    float* wl = wm + DECODE_WARPS * G;               // [warps][G]
    float* wo = wl + DECODE_WARPS * G;               // [warps][G][D]
    __syncthreads();
    if (g < G) {
        if (tq == 0) {
            wm[warp * G + g] = m_run;
            wl[warp * G + g] = l;
        }
#pragma unroll
        for (int j = 0; j < D / 8; j++)
            *reinterpret_cast<float2*>(wo + (warp * G + g) * D + j * 8 + 2 * tq) = make_float2(o[j][0], o[j][1]);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * D; idx += T::THREADS) {
        const int hg = idx / D, d = idx % D;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; w++) mx = fmaxf(mx, wm[w * G + hg]);
        float lsum = 0.0f, acc = 0.0f;
        if (mx != -INFINITY) {
#pragma unroll
            for (int w = 0; w < DECODE_WARPS; w++) {
                const float c = __expf(wm[w * G + hg] - mx);
                lsum += wl[w * G + hg] * c;
                acc += wo[(w * G + hg) * D + d] * c;
            }
        }
        const size_t out = ((size_t)seq * q_heads + head * G + hg) * splits + split;
        partial_acc[out * D + d] = acc;
        if (d == 0) {
            partial_ml[out * 2] = mx;
            partial_ml[out * 2 + 1] = lsum;
        }
    }
}

#define DECODE_KERNEL_S(NAME, D, G, S)                                                                           \
    extern "C" __global__ void __launch_bounds__(DECODE_WARPS * 32) NAME(                                         \
        const float* q, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool, const int* block_table,       \
        const int* lens, const int* tokens, const int* token_counts, float* partial_acc, float* partial_ml,    \
        int kv_heads, int block_size, int max_blocks, int max_tokens, float scale, const int* unit_slots,       \
        const __nv_bfloat16* host_k, const __nv_bfloat16* host_v, int offload_rows) {                           \
        decode_split<D, G, S>(q, k_pool, v_pool, block_table, lens, tokens, token_counts, partial_acc, partial_ml, \
                           kv_heads, block_size, max_blocks, max_tokens, scale, unit_slots, host_k, host_v,     \
                           offload_rows);                                                                        \
    }

// Dense: three stages of K/V tiles in flight (two CTAs of 108 KB per SM at
// d 128). Token lists (`_s2`): two stages, three CTAs per SM: gathered rows
// are latency-bound and gain more from more CTAs than from a deeper
// pipeline (96k batch 8: 41.8 vs 57.6 us; dense streaming is the other way
// round at batch 1).
#define DECODE_KERNEL(D, G)                                 \
    DECODE_KERNEL_S(decode_attention_d##D##_g##G, D, G, 3) \
    DECODE_KERNEL_S(decode_attention_d##D##_g##G##_s2, D, G, 2)
DECODE_KERNEL(64, 1)
DECODE_KERNEL(64, 2)
DECODE_KERNEL(64, 3)
DECODE_KERNEL(64, 4)
DECODE_KERNEL(64, 7)
DECODE_KERNEL(64, 8)
DECODE_KERNEL(128, 1)
DECODE_KERNEL(128, 2)
DECODE_KERNEL(128, 4)
DECODE_KERNEL(128, 5)
DECODE_KERNEL(128, 8)

// out[row, :] = sum_s acc[row, s, :] * exp(m_s - M) / sum_s l_s * exp(m_s - M).
// grid (rows, ceil(d / COMBINE_THREADS)): each CTA computes the split weights
// of its row once into shared memory (dynamic: `splits` floats), then each
// thread merges one channel over the splits (reads coalesced across threads).
#define COMBINE_THREADS 128

__device__ __forceinline__ float combine_reduce(float v, bool is_max, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = scratch[0];
    for (int w = 1; w < COMBINE_THREADS / 32; w++) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
    return r;
}

extern "C" __global__ void __launch_bounds__(COMBINE_THREADS)
    decode_combine(const float* __restrict__ partial_acc, const float* __restrict__ partial_ml,
                   float* __restrict__ out, int splits, int d) {
    extern __shared__ float weights[];
    __shared__ float scratch[COMBINE_THREADS / 32];
    const size_t row = blockIdx.x;
    const float* ml = partial_ml + row * splits * 2;
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < splits; s += COMBINE_THREADS) mx = fmaxf(mx, ml[2 * s]);
    mx = combine_reduce(mx, true, scratch);
    float denom = 0.0f;
    for (int s = threadIdx.x; s < splits; s += COMBINE_THREADS) {
        const float m = ml[2 * s];
        const float w = m == -INFINITY ? 0.0f : __expf(m - mx);
        weights[s] = w;
        denom += ml[2 * s + 1] * w;
    }
    denom = combine_reduce(denom, false, scratch);  // its barriers also publish `weights`
    const int i = blockIdx.y * COMBINE_THREADS + threadIdx.x;
    if (i >= d) return;
    // No branch on the weight (empty splits hold zeros), so the loads of
    // consecutive splits are independent and overlap: one L2 round trip
    // per split made this kernel 7 us at 33 splits.
    float a = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; s++) a += partial_acc[(row * splits + s) * d + i] * weights[s];
    out[row * d + i] = denom > 0.0f ? a / denom : 0.0f;
}
