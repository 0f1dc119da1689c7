// Causal prefill attention in the FlashAttention-2 style on tensor cores:
// mma.sync m16n8k16 (bf16 in, f32 accumulate) with ldmatrix fragment loads
// and cp.async double-buffered K/V tiles. The score and output accumulators
// stay in registers (the mma fragment layout is documented in the PTX ISA,
// so each thread knows which rows it holds and rescales them itself).
//
// Rows. A CTA owns BR rows of one KV head's query group, packed as (token,
// head in group): row r is query token r / G, head kv_head * G + r % G. The
// heads of a group share every K/V tile, so a tile is staged once for all of
// them (4x fewer loads for Qwen3's groups of 4, 20x for GLM's MLA).
//
// Warps. WM x WN warps: WM row tiles of 16 rows; the WN warps of a row tile
// split the value columns of O (needed when O is wide: MLA's 512 columns
// would take 256 registers per thread in one warp). When WN > 1 they also
// split the keys of S = Q K^T and exchange S through shared memory, then
// each runs the same online softmax over the whole row.
//
// Layouts: q [n, q_heads, DK] f32 (tokens start..start+n of the sequence);
// K pool [num_blocks, kv_heads, 64, DK] bf16; V pool [num_blocks, kv_heads,
// 64, DV] bf16, or (MLA, V_IN_K) V is the first DV columns of each key row;
// block_table [max_blocks] of the sequence; out [n, q_heads, DV] f32. Query
// token i sees keys 0..=start+i.
//
// Splits. A short chunk at a long offset has few row tiles, each walking
// the whole prefix: grid.z splits a row tile's key tiles into `splits`
// ranges, each CTA writing its normalised partial output and (max, sum)
// (base 2) to partial_acc [n, q_heads, splits, DV] / partial_ml [n,
// q_heads, splits, 2]; prefill_combine merges them into out.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mma.cuh"

#define BC 64      // keys per tile: one cache block
#define PAD 8      // bf16 row padding: 16 bytes, so ldmatrix rows hit distinct banks
#define STAGES 2   // K/V tiles in flight
#define LOG2E 1.4426950408889634f

template <int DK, int DV, bool V_IN_K, int WM, int WN, int MT>
struct PrefillTraits {
    static constexpr int BR = 16 * WM * MT;
    static constexpr int THREADS = 32 * WM * WN;
    static constexpr int LK = DK + PAD;                 // row stride of Q and K tiles (bf16)
    static constexpr int LV = V_IN_K ? LK : DV + PAD;   // of V tiles
    static constexpr int LS = BC + 4;                   // of the shared S rows (f32), WN > 1 only
    static constexpr int S_TILES = BC / WN / 8;         // n8 tiles of S a warp computes
    static constexpr int O_TILES = DV / WN / 8;         // n8 tiles of O a warp owns
    static constexpr int Q_ELEMS = BR * LK;
    static constexpr int K_ELEMS = BC * LK;
    static constexpr int V_ELEMS = V_IN_K ? 0 : BC * LV;
    static_assert(DK % 16 == 0 && DV % (16 * WN) == 0 && (BC / WN) % 16 == 0, "tile shapes");
};

// Stages tile `t` of the sequence's keys (and values) into `stage` with cp.async.
template <int DK, int DV, bool V_IN_K, int WM, int WN, int MT>
__device__ __forceinline__ void load_kv_tile(__nv_bfloat16* ks, __nv_bfloat16* vs, const __nv_bfloat16* k_pool,
                                             const __nv_bfloat16* v_pool, int block, int kv_heads, int kvh) {
    using T = PrefillTraits<DK, DV, V_IN_K, WM, WN, MT>;
    const size_t unit = (size_t)block * kv_heads + kvh;
    const __nv_bfloat16* kb = k_pool + unit * BC * DK;
    for (int i = threadIdx.x; i < BC * DK / 8; i += T::THREADS) {
        const int r = i / (DK / 8), c = i % (DK / 8);
        cp_async_16(ks + r * T::LK + c * 8, kb + (size_t)i * 8);
    }
    if constexpr (!V_IN_K) {
        const __nv_bfloat16* vb = v_pool + unit * BC * DV;
        for (int i = threadIdx.x; i < BC * DV / 8; i += T::THREADS) {
            const int r = i / (DV / 8), c = i % (DV / 8);
            cp_async_16(vs + r * T::LV + c * 8, vb + (size_t)i * 8);
        }
    }
}

template <int DK, int DV, bool V_IN_K, int WM, int WN, int MT>
__device__ void prefill_mma(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
                            const __nv_bfloat16* __restrict__ v_pool, const int* __restrict__ block_table,
                            float* __restrict__ out, int n, int start, int q_heads, int kv_heads, float scale,
                            float* __restrict__ partial_acc, float* __restrict__ partial_ml, int splits) {
    using T = PrefillTraits<DK, DV, V_IN_K, WM, WN, MT>;
    extern __shared__ __align__(128) unsigned char smem[];
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);  // [BR][LK], scaled by scale * log2(e)
    __nv_bfloat16* ks = qs + T::Q_ELEMS;                           // [STAGES][BC][LK]
    __nv_bfloat16* vs = ks + STAGES * T::K_ELEMS;                  // [STAGES][BC][LV] unless V_IN_K
    float* ss = reinterpret_cast<float*>(vs + STAGES * T::V_ELEMS);  // [BR][LS] when WN > 1

    const int group = q_heads / kv_heads;
    const int rows = n * group;
    // Heaviest (latest) row tiles first: the causal triangle's long rows start early.
    const int row0 = (gridDim.x - 1 - blockIdx.x) * T::BR;
    const int kvh = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp / WN, wn = warp % WN;
    const int g = lane >> 2, tq = lane & 3;  // fragment row group and column pair

    const int last_row = min(rows, row0 + T::BR) - 1;
    const int all_tiles = (start + last_row / group) / BC + 1;
    const int first_qpos = start + row0 / group;
    // This split's key tiles [t_begin, tiles).
    const int split = blockIdx.z;
    const int per_split = (all_tiles + splits - 1) / splits;
    const int t_begin = min(all_tiles, split * per_split);
    const int tiles = min(all_tiles, t_begin + per_split);

    // Prologue: the first K/V tile in flight while Q is converted.
    if (t_begin < tiles)
        load_kv_tile<DK, DV, V_IN_K, WM, WN, MT>(ks + (t_begin % STAGES) * T::K_ELEMS,
                                                 vs + (t_begin % STAGES) * T::V_ELEMS, k_pool, v_pool,
                                                 block_table[t_begin], kv_heads, kvh);
    cp_async_commit();
    const float qscale = scale * LOG2E;
    for (int i = threadIdx.x; i < T::BR * DK / 4; i += T::THREADS) {
        const int r = i / (DK / 4), c = (i % (DK / 4)) * 4, row = row0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row < rows) {
            const int token = row / group, head = kvh * group + row % group;
            v = *reinterpret_cast<const float4*>(q + ((size_t)token * q_heads + head) * DK + c);
        }
        uint2 packed = make_uint2(pack_bf16(v.x * qscale, v.y * qscale), pack_bf16(v.z * qscale, v.w * qscale));
        *reinterpret_cast<uint2*>(qs + r * T::LK + c) = packed;
    }

    float o[MT][T::O_TILES][4];
    float m_run[MT][2], l_run[MT][2];
    // The query position of this thread's fragment rows (g and g + 8 of each m-tile).
    int qpos[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int j = 0; j < T::O_TILES; j++) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            m_run[mt][h] = -INFINITY;
            l_run[mt][h] = 0.f;
            qpos[mt][h] = start + (row0 + (wm * MT + mt) * 16 + g + 8 * h) / group;
        }
    }

    // ldmatrix row addresses: lane -> (row within 16, column offset 0 or 8).
    const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_col = 8 * (lane >> 4);  // A operands (Q)
    const int b_row = (lane & 7) + 8 * (lane >> 4), b_col = 8 * ((lane >> 3) & 1);   // B from K rows
    const int v_row = (lane & 7) + 8 * ((lane >> 3) & 1), v_col = 8 * (lane >> 4);  // B from V (trans)
    const __nv_bfloat16* q_warp = qs + wm * MT * 16 * T::LK;

    for (int t = t_begin; t < tiles; t++) {
        const int stage = t % STAGES;
        if (t + 1 < tiles) {
            const int next = (t + 1) % STAGES;
            load_kv_tile<DK, DV, V_IN_K, WM, WN, MT>(ks + next * T::K_ELEMS, vs + next * T::V_ELEMS, k_pool, v_pool,
                                                     block_table[t + 1], kv_heads, kvh);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const __nv_bfloat16* kt = ks + stage * T::K_ELEMS;
        const __nv_bfloat16* vt = V_IN_K ? kt : vs + stage * T::V_ELEMS;

        // S = Q K^T for this warp's rows and its BC / WN keys; each K
        // fragment serves all MT m-tiles.
        float s[MT][T::S_TILES][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < T::S_TILES; j++) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
        const int key0 = wn * (BC / WN);
#pragma unroll 2
        for (int kk = 0; kk < DK / 16; kk++) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) ldmatrix_x4(a[mt], q_warp + (mt * 16 + a_row) * T::LK + kk * 16 + a_col);
#pragma unroll
            for (int j = 0; j < T::S_TILES; j += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, kt + (key0 + j * 8 + b_row) * T::LK + kk * 16 + b_col);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_16816(s[mt][j], a[mt], b[0], b[1]);
                    mma_16816(s[mt][j + 1], a[mt], b[2], b[3]);
                }
            }
        }

        // The whole row block's scores in this warp's registers, same layout.
        constexpr int ALL = BC / 8;
        float sf[MT][ALL][4];
        if constexpr (WN == 1) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < ALL; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) sf[mt][j][e] = s[mt][j][e];
        } else {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < T::S_TILES; j++) {
                    float* r0 = ss + ((wm * MT + mt) * 16 + g) * T::LS + key0 + j * 8 + 2 * tq;
                    *reinterpret_cast<float2*>(r0) = make_float2(s[mt][j][0], s[mt][j][1]);
                    *reinterpret_cast<float2*>(r0 + 8 * T::LS) = make_float2(s[mt][j][2], s[mt][j][3]);
                }
            __syncthreads();
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < ALL; j++) {
                    const float* r0 = ss + ((wm * MT + mt) * 16 + g) * T::LS + j * 8 + 2 * tq;
                    const float2 lo = *reinterpret_cast<const float2*>(r0);
                    const float2 hi = *reinterpret_cast<const float2*>(r0 + 8 * T::LS);
                    sf[mt][j][0] = lo.x, sf[mt][j][1] = lo.y, sf[mt][j][2] = hi.x, sf[mt][j][3] = hi.y;
                }
        }

        // Causal mask, only on tiles that reach past the block's first query.
        if (t * BC + BC - 1 > first_qpos) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < ALL; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = t * BC + j * 8 + 2 * tq + (e & 1);
                        if (key > qpos[mt][e >> 1]) sf[mt][j][e] = -INFINITY;
                    }
        }

        // Online softmax (base 2; Q carries log2(e)). A row lives in the 4
        // threads of a quad: reduce with two shuffles.
        uint32_t p[MT][ALL][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float mx = -INFINITY;
#pragma unroll
                for (int j = 0; j < ALL; j++) mx = fmaxf(mx, fmaxf(sf[mt][j][2 * h], sf[mt][j][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                const float m_new = fmaxf(m_run[mt][h], mx);
                const float base = m_new == -INFINITY ? 0.f : m_new;
                const float correction = exp2f(m_run[mt][h] - base);
                m_run[mt][h] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < ALL; j++) {
                    p[mt][j][h] = pack_bf16(exp2f(sf[mt][j][2 * h] - base), exp2f(sf[mt][j][2 * h + 1] - base));
                    // Sum exactly what P V adds up: the bf16-rounded weights.
                    const __nv_bfloat162 pb = *reinterpret_cast<__nv_bfloat162*>(&p[mt][j][h]);
                    sum += __low2float(pb) + __high2float(pb);
                }
                l_run[mt][h] = l_run[mt][h] * correction + sum;  // per-thread partial; quad-reduced at the end
#pragma unroll
                for (int j = 0; j < T::O_TILES; j++) {
                    o[mt][j][2 * h] *= correction;
                    o[mt][j][2 * h + 1] *= correction;
                }
            }

        // O += P V over this warp's value columns; each V fragment serves all MT m-tiles.
        const int col0 = wn * (DV / WN);
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {
#pragma unroll
            for (int j = 0; j < T::O_TILES; j += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vt + (kk * 16 + v_row) * T::LV + col0 + j * 8 + v_col);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const uint32_t a[4] = {p[mt][2 * kk][0], p[mt][2 * kk][1], p[mt][2 * kk + 1][0],
                                           p[mt][2 * kk + 1][1]};
                    mma_16816(o[mt][j], a, b[0], b[1]);
                    mma_16816(o[mt][j + 1], a, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // the stage and the S rows are reused by the next tiles
    }

    // Normalise and store: rows g and g + 8 of each m-tile, two columns per n8 tile.
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float l = l_run[mt][h];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const int row = row0 + (wm * MT + mt) * 16 + g + 8 * h;
            if (row >= rows) continue;
            const int token = row / group, head = kvh * group + row % group;
            const size_t out_row = (size_t)token * q_heads + head;
            float* dst = splits == 1 ? out + out_row * DV : partial_acc + (out_row * splits + split) * DV;
            dst += wn * (DV / WN) + 2 * tq;
            const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int j = 0; j < T::O_TILES; j++)
                *reinterpret_cast<float2*>(dst + j * 8) =
                    make_float2(o[mt][j][2 * h] * inv, o[mt][j][2 * h + 1] * inv);
            if (splits > 1 && wn == 0 && tq == 0)
                *reinterpret_cast<float2*>(partial_ml + (out_row * splits + split) * 2) =
                    make_float2(m_run[mt][h], l);
        }
}

// Merges the splits' partial outputs: out = sum_s w_s acc_s / sum_s w_s with
// w_s = 2^(m_s - max m) l_s. One CTA per (token, head) row.
extern "C" __global__ void prefill_combine(const float* __restrict__ partial_acc, const float* __restrict__ partial_ml,
                                           float* __restrict__ out, int splits, int dv) {
    const size_t row = blockIdx.x;
    const float* ml = partial_ml + row * splits * 2;
    float m = -INFINITY;
    for (int s = 0; s < splits; s++) m = fmaxf(m, ml[2 * s]);
    float total = 0.f;
    for (int s = 0; s < splits; s++) total += ml[2 * s] == -INFINITY ? 0.f : exp2f(ml[2 * s] - m) * ml[2 * s + 1];
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int d = threadIdx.x; d < dv; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < splits; s++) {
            const float w = ml[2 * s] == -INFINITY ? 0.f : exp2f(ml[2 * s] - m) * ml[2 * s + 1];
            acc += w * partial_acc[(row * splits + s) * dv + d];
        }
        out[row * dv + d] = acc * inv;
    }
}

#define PREFILL_KERNEL(NAME, DK, DV, V_IN_K, WM, WN, MT)                                                          \
    extern "C" __global__ void __launch_bounds__(32 * WM * WN) NAME(                                              \
        const float* q, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool, const int* block_table,        \
        float* out, int n, int start, int q_heads, int kv_heads, float scale, float* partial_acc,                \
        float* partial_ml, int splits) {                                                                          \
        prefill_mma<DK, DV, V_IN_K, WM, WN, MT>(q, k_pool, v_pool, block_table, out, n, start, q_heads,          \
                                                kv_heads, scale, partial_acc, partial_ml, splits);                \
    }

// GQA: 128 rows, each warp 32 rows (two m-tiles, so every K and V fragment
// loaded from shared memory feeds two mma: one m-tile per warp left the
// kernel bound by ldmatrix traffic, 249 vs 602 TFLOP/s for cuDNN at 32k).
PREFILL_KERNEL(prefill_attention_d64, 64, 64, false, 4, 1, 2)
PREFILL_KERNEL(prefill_attention_d128, 128, 128, false, 4, 1, 2)
// MLA (absorbed; one latent KV head, V = the first 512 key columns): 32 rows,
// four warps per 16 rows, each with 128 of the 512 output columns.
PREFILL_KERNEL(prefill_attention_mla576, 576, 512, true, 2, 4, 1)
