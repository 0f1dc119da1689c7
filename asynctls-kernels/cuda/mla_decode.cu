// Paged decode attention for MLA in the absorbed form (GLM-4.7-Flash,
// DeepSeek): every query head attends to one shared cache row per token of
// DK = kv_lora_rank + rope channels, whose first DV channels are also the
// value. One CTA per (sequence, split of the tokens) serves all H heads, so
// each cache row is read from HBM once per step; it is staged in shared
// memory and read there twice (scores, then values).
//
// Layouts: q [batch, H, DK] f32; pool [num_blocks, BLOCK, DK] bf16;
// block_table [batch, max_blocks]; lens [batch]; tokens [batch, max_tokens]
// and token_counts [batch] (or null: dense); partial_acc [batch, H, splits,
// DV], partial_ml [batch, H, splits, 2], merged by decode_combine.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define THREADS 256
#define WARPS 8
#define TILE 32  // tokens per shared-memory tile: one per lane

template <int DK, int DV, int H>
__device__ void mla_split(const float* __restrict__ q, const __nv_bfloat16* __restrict__ pool,
                          const int* __restrict__ block_table, const int* __restrict__ lens,
                          const int* __restrict__ tokens, const int* __restrict__ token_counts,
                          float* __restrict__ partial_acc, float* __restrict__ partial_ml, int block_size,
                          int max_blocks, int max_tokens, float scale) {
    static_assert(DV == 2 * THREADS, "each thread owns two value channels");
    // bf16 pairs per staged row, padded by two words: 8-byte aligned rows
    // whose 8-byte reads by 16 lanes (one per row) hit distinct banks.
    constexpr int ROW_WORDS = DK / 2 + 2;
    constexpr int HPW = (H + WARPS - 1) / WARPS;  // heads scored per warp
    extern __shared__ float shared[];
    float* q_s = shared;                                    // [H, DK], pre-scaled
    float* p_s = q_s + H * DK;                              // [H, TILE] probabilities of the tile
    float* m_s = p_s + H * TILE;                            // [H] running max
    float* l_s = m_s + H;                                   // [H] running sum
    float* c_s = l_s + H;                                   // [H] correction of the tile
    // [TILE, ROW_WORDS] staged cache rows, 16-byte aligned.
    unsigned* rows = reinterpret_cast<unsigned*>(shared + ((H * DK + H * TILE + 3 * H + 3) & ~3));

    const int seq = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool sparse = tokens != nullptr;
    const int n = sparse ? token_counts[seq] : lens[seq];
    const int per_split = (n + splits - 1) / splits;
    const int begin = split * per_split, end = min(n, begin + per_split);

    for (int i = threadIdx.x; i < H * DK; i += THREADS) q_s[i] = q[(size_t)seq * H * DK + i] * scale;
    for (int h = threadIdx.x; h < H; h += THREADS) {
        m_s[h] = -INFINITY;
        l_s[h] = 0.0f;
    }
    float acc[H][2];
#pragma unroll
    for (int h = 0; h < H; h++) acc[h][0] = acc[h][1] = 0.0f;
    __syncthreads();

    // The next tile's rows are fetched into registers while the current one
    // is computed on: each thread's LOADS 16-byte loads are independent, so
    // their latencies overlap instead of adding up.
    constexpr int CHUNKS = DK / 8;  // 16-byte chunks per row
    constexpr int LOADS = TILE * CHUNKS / THREADS;
    static_assert(TILE * CHUNKS % THREADS == 0, "whole loads per thread");
    uint4 next[LOADS];
    auto fetch = [&](int t0) {
        const int count = min(TILE, end - t0);
#pragma unroll
        for (int j = 0; j < LOADS; j++) {
            const int i = threadIdx.x + j * THREADS, t = i / CHUNKS, chunk = i % CHUNKS;
            if (t < count) {
                const int pos = sparse ? tokens[(size_t)seq * max_tokens + t0 + t] : t0 + t;
                const int block = block_table[(size_t)seq * max_blocks + pos / block_size];
                next[j] = __ldg(reinterpret_cast<const uint4*>(
                    pool + ((size_t)block * block_size + pos % block_size) * DK + chunk * 8));
            }
        }
    };
    if (begin < end) fetch(begin);

    for (int t0 = begin; t0 < end; t0 += TILE) {
        const int count = min(TILE, end - t0);
#pragma unroll
        for (int j = 0; j < LOADS; j++) {
            const int i = threadIdx.x + j * THREADS, t = i / CHUNKS, chunk = i % CHUNKS;
            if (t < count) {
                unsigned* dst = rows + t * ROW_WORDS + chunk * 4;
                dst[0] = next[j].x;
                dst[1] = next[j].y;
                dst[2] = next[j].z;
                dst[3] = next[j].w;
            }
        }
        __syncthreads();
        if (t0 + TILE < end) fetch(t0 + TILE);

        // Scores: lane = token of the tile, warp = heads warp, warp + 8, ...
        float s[HPW];
#pragma unroll
        for (int j = 0; j < HPW; j++) s[j] = 0.0f;
        if (lane < count) {
            // Four channels per step: one 8-byte read of the row, one
            // 16-byte broadcast read of q per head (shared-memory reads, not
            // FMAs, bound this loop).
            const uint2* row = reinterpret_cast<const uint2*>(rows + lane * ROW_WORDS);
            for (int c = 0; c < DK / 4; c++) {
                const uint2 word = row[c];
                const float2 k01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&word.x));
                const float2 k23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&word.y));
#pragma unroll
                for (int j = 0; j < HPW; j++) {
                    const int h = warp + j * WARPS;
                    if (h < H) {
                        const float4 qv = reinterpret_cast<const float4*>(q_s + h * DK)[c];
                        s[j] += qv.x * k01.x + qv.y * k01.y + qv.z * k23.x + qv.w * k23.y;
                    }
                }
            }
        }
        // Online softmax per head, over the warp's 32 lanes.
#pragma unroll
        for (int j = 0; j < HPW; j++) {
            const int h = warp + j * WARPS;
            if (h >= H) continue;
            float tile_max = lane < count ? s[j] : -INFINITY;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, o));
            const float m_old = m_s[h];
            const float m_new = fmaxf(m_old, tile_max);
            const float p = lane < count ? __expf(s[j] - m_new) : 0.0f;
            float sum = p;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
            p_s[h * TILE + lane] = p;
            __syncwarp();
            if (lane == 0) {
                const float correction = __expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                c_s[h] = correction;
                l_s[h] = l_s[h] * correction + sum;
                m_s[h] = m_new;
            }
        }
        __syncthreads();

        // Values: thread owns channels 2 * tid, 2 * tid + 1 for every head.
#pragma unroll
        for (int h = 0; h < H; h++) {
            acc[h][0] *= c_s[h];
            acc[h][1] *= c_s[h];
        }
        // Four tokens per step: a 16-byte broadcast read of each head's
        // probabilities (zero past `count`), four reads of this thread's pairs.
        for (int t = 0; t < count; t += 4) {
            float2 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const unsigned word = t + u < count ? rows[(t + u) * ROW_WORDS + threadIdx.x] : 0u;
                v[u] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&word));
            }
#pragma unroll
            for (int h = 0; h < H; h++) {
                const float4 p = *reinterpret_cast<const float4*>(p_s + h * TILE + t);
                acc[h][0] += p.x * v[0].x + p.y * v[1].x + p.z * v[2].x + p.w * v[3].x;
                acc[h][1] += p.x * v[0].y + p.y * v[1].y + p.z * v[2].y + p.w * v[3].y;
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int h = 0; h < H; h++) {
        const size_t out = ((size_t)seq * H + h) * splits + split;
        partial_acc[out * DV + 2 * threadIdx.x] = acc[h][0];
        partial_acc[out * DV + 2 * threadIdx.x + 1] = acc[h][1];
        if (threadIdx.x == 0) {
            partial_ml[out * 2] = m_s[h];
            partial_ml[out * 2 + 1] = l_s[h];
        }
    }
}

#define MLA_KERNEL(DK, DV, H)                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) mla_decode_k##DK##_v##DV##_h##H(                         \
        const float* q, const __nv_bfloat16* pool, const int* block_table, const int* lens, const int* tokens,    \
        const int* token_counts, float* partial_acc, float* partial_ml, int block_size, int max_blocks,           \
        int max_tokens, float scale) {                                                                             \
        mla_split<DK, DV, H>(q, pool, block_table, lens, tokens, token_counts, partial_acc, partial_ml, block_size, \
                             max_blocks, max_tokens, scale);                                                       \
    }

MLA_KERNEL(576, 512, 16)
MLA_KERNEL(576, 512, 20)
MLA_KERNEL(576, 512, 32)
