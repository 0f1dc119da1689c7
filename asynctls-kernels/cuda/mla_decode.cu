// Paged decode attention for MLA in the absorbed form (GLM-4.7-Flash,
// DeepSeek) on tensor cores: every query head attends to one shared cache
// row per token of DK = kv_lora_rank + rope channels, whose first DV
// channels are also the value. One CTA per (sequence, split of the tokens)
// serves all H heads as the rows of its mma tiles (two tiles of 16, padded),
// so each cache row is read from HBM once per step. Eight warps: two row
// tiles x four column quarters; each warp scores a quarter of the tile's
// keys (S exchanged through shared memory), runs the online softmax over
// the whole row, and accumulates its quarter of the 512 value columns.
//
// Layouts: q [batch, H, DK] f32; pool [num_blocks, BLOCK, DK] bf16;
// block_table [batch, max_blocks]; lens [batch]; tokens [batch, max_tokens]
// and token_counts [batch] (or null: dense); partial_acc [batch, H, splits,
// DV], partial_ml [batch, H, splits, 2], merged by decode_combine.
//
// Offloaded (the GPU engine's host tier, one KV head, so a unit is a
// block): pool is then the resident slots [slots, BLOCK, DK] and host the
// device-mapped host tier [num_blocks, BLOCK, DK]. With unit_slots (the
// unit -> slot table, -1 without a slot) a row is read from its unit's slot
// or in place from the host; with offload_rows, block_table is the
// resolver's row slot table instead (slot, or -(unit + 1) for a miss), as
// in decode_attention.cu.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mma.cuh"

#define MLA_WM 2   // row tiles of 16 heads
#define MLA_WN 4   // warps splitting the keys of S and the columns of O
#define MLA_THREADS (32 * MLA_WM * MLA_WN)
#define MLA_TILE 64
#define MLA_STAGES 2

template <int DK, int DV>
struct MlaTraits {
    static constexpr int LK = DK + 8;  // bf16 row stride of Q and K tiles
    static constexpr int LS = MLA_TILE + 4;
    static constexpr int Q_ELEMS = 16 * MLA_WM * LK;
    static constexpr int K_ELEMS = MLA_TILE * LK;
    static constexpr int CHUNKS = DK / 8;
    static constexpr int S_TILES = MLA_TILE / MLA_WN / 8;  // n8 tiles of S per warp (2)
    static constexpr int O_TILES = DV / MLA_WN / 8;        // n8 tiles of O per warp (16)
};

// Stages the rows of tokens [t0, t0 + TILE) of the split (rows past `end`
// repeat the split's first token; the mask weighs them by zero). Chunk i of
// the tile is row i / CHUNKS: consecutive threads copy consecutive 16 bytes.
// Where an offloaded cache's rows are (see the header); all null / 0 for a
// resident pool.
struct MlaOffload {
    const int* unit_slots;
    const __nv_bfloat16* host;
    int offload_rows;
};

// OFFLOADED is a compile-time switch, so the resident kernel's staging loop
// has no offload lookups at all: when one kernel served both (the lookups
// skipped at run time), GLM's dense decode at 96k batch 14 took 66 ms a
// step against 57 without them.
template <int DK, int DV, bool OFFLOADED>
__device__ __forceinline__ void mla_stage(__nv_bfloat16* ks, int t0, int begin, int end, int seq,
                                          const int* __restrict__ row_tokens, const int* __restrict__ block_table,
                                          const __nv_bfloat16* __restrict__ pool, int block_size, int max_blocks,
                                          MlaOffload off) {
    using T = MlaTraits<DK, DV>;
    for (int i = threadIdx.x; i < MLA_TILE * T::CHUNKS; i += MLA_THREADS) {
        const int r = i / T::CHUNKS, c = (i % T::CHUNKS) * 8;
        const int t = t0 + r < end ? t0 + r : begin;
        const int pos = row_tokens != nullptr ? row_tokens[t] : t;
        const int block = block_table[(size_t)seq * max_blocks + pos / block_size];
        if constexpr (!OFFLOADED) {
            cp_async_16(ks + r * T::LK + c, pool + ((size_t)block * block_size + pos % block_size) * DK + c);
            continue;
        }
        const __nv_bfloat16* src = pool;
        size_t unit;
        if (off.offload_rows) {
            if (block < 0) src = off.host;
            unit = (size_t)(block >= 0 ? block : -block - 1);
        } else if (off.unit_slots != nullptr) {
            const int slot = off.unit_slots[block];
            if (slot < 0) src = off.host;
            unit = (size_t)(slot >= 0 ? slot : block);
        } else {
            unit = (size_t)block;
        }
        cp_async_16(ks + r * T::LK + c, src + (unit * block_size + pos % block_size) * DK + c);
    }
}

template <int DK, int DV, int H, bool OFFLOADED>
__device__ void mla_split(const float* __restrict__ q, const __nv_bfloat16* __restrict__ pool,
                          const int* __restrict__ block_table, const int* __restrict__ lens,
                          const int* __restrict__ tokens, const int* __restrict__ token_counts,
                          float* __restrict__ partial_acc, float* __restrict__ partial_ml, int block_size,
                          int max_blocks, int max_tokens, float scale, MlaOffload off) {
    using T = MlaTraits<DK, DV>;
    static_assert(H <= 16 * MLA_WM, "the heads are the rows of two mma tiles");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [32][LK], rows >= H zero
    __nv_bfloat16* ks = qs + T::Q_ELEMS;                             // [STAGES][TILE][LK]
    float* ss = reinterpret_cast<float*>(ks + MLA_STAGES * T::K_ELEMS);  // [32][LS]

    const int seq = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp / MLA_WN, wn = warp % MLA_WN;
    const int g = lane >> 2, tq = lane & 3;

    const bool sparse = tokens != nullptr;
    const int n = sparse ? token_counts[seq] : lens[seq];
    const int* row_tokens = sparse ? tokens + (size_t)seq * max_tokens : nullptr;
    const int per_split = ((n + splits - 1) / splits + MLA_TILE - 1) / MLA_TILE * MLA_TILE;
    const int begin = min(n, split * per_split), end = min(n, begin + per_split);
    const int tiles = (end - begin + MLA_TILE - 1) / MLA_TILE;

    if (tiles > 0)
        mla_stage<DK, DV, OFFLOADED>(ks, begin, begin, end, seq, row_tokens, block_table, pool, block_size, max_blocks, off);
    cp_async_commit();
    for (int i = threadIdx.x; i < 16 * MLA_WM * DK / 2; i += MLA_THREADS) {
        const int r = i / (DK / 2), c = (i % (DK / 2)) * 2;
        float2 v = make_float2(0.f, 0.f);
        if (r < H) v = *reinterpret_cast<const float2*>(q + ((size_t)seq * H + r) * DK + c);
        *reinterpret_cast<uint32_t*>(qs + r * T::LK + c) = pack_bf16(v.x * scale, v.y * scale);
    }

    float o[T::O_TILES][4];
#pragma unroll
    for (int j = 0; j < T::O_TILES; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_col = 8 * (lane >> 4);
    const int b_row = (lane & 7) + 8 * (lane >> 4), b_col = 8 * ((lane >> 3) & 1);
    const int v_row = (lane & 7) + 8 * ((lane >> 3) & 1), v_col = 8 * (lane >> 4);
    const int key0 = wn * (MLA_TILE / MLA_WN), col0 = wn * (DV / MLA_WN);

    for (int t = 0; t < tiles; t++) {
        if (t + 1 < tiles)
            mla_stage<DK, DV, OFFLOADED>(ks + ((t + 1) % MLA_STAGES) * T::K_ELEMS, begin + (t + 1) * MLA_TILE, begin, end, seq,
                              row_tokens, block_table, pool, block_size, max_blocks, off);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const __nv_bfloat16* kt = ks + (t % MLA_STAGES) * T::K_ELEMS;

        // This warp's quarter of S = Q K^T, to shared memory.
        float s[T::S_TILES][4];
#pragma unroll
        for (int j = 0; j < T::S_TILES; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll 4
        for (int kk = 0; kk < DK / 16; kk++) {
            uint32_t a[4], b[4];
            ldmatrix_x4(a, qs + (wm * 16 + a_row) * T::LK + kk * 16 + a_col);
            ldmatrix_x4(b, kt + (key0 + b_row) * T::LK + kk * 16 + b_col);
            mma_16816(s[0], a, b[0], b[1]);
            mma_16816(s[1], a, b[2], b[3]);
        }
#pragma unroll
        for (int j = 0; j < T::S_TILES; j++) {
            float* r0 = ss + (wm * 16 + g) * T::LS + key0 + j * 8 + 2 * tq;
            *reinterpret_cast<float2*>(r0) = make_float2(s[j][0], s[j][1]);
            *reinterpret_cast<float2*>(r0 + 8 * T::LS) = make_float2(s[j][2], s[j][3]);
        }
        __syncthreads();

        // The whole row block's scores, masked past the split's end.
        constexpr int ALL = MLA_TILE / 8;
        float sf[ALL][4];
        const int tile0 = begin + t * MLA_TILE;
#pragma unroll
        for (int j = 0; j < ALL; j++) {
            const float* r0 = ss + (wm * 16 + g) * T::LS + j * 8 + 2 * tq;
            const float2 lo = *reinterpret_cast<const float2*>(r0);
            const float2 hi = *reinterpret_cast<const float2*>(r0 + 8 * T::LS);
            const bool in0 = tile0 + j * 8 + 2 * tq < end, in1 = tile0 + j * 8 + 2 * tq + 1 < end;
            sf[j][0] = in0 ? lo.x : -INFINITY;
            sf[j][1] = in1 ? lo.y : -INFINITY;
            sf[j][2] = in0 ? hi.x : -INFINITY;
            sf[j][3] = in1 ? hi.y : -INFINITY;
        }
        uint32_t p[ALL][2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < ALL; j++) mx = fmaxf(mx, fmaxf(sf[j][2 * h], sf[j][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float m_new = fmaxf(m_run[h], mx);
            const float base = m_new == -INFINITY ? 0.f : m_new;
            const float correction = __expf(m_run[h] - base);
            m_run[h] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < ALL; j++) {
                p[j][h] = pack_bf16(__expf(sf[j][2 * h] - base), __expf(sf[j][2 * h + 1] - base));
                // Sum exactly what P V adds up: the bf16-rounded weights.
                const __nv_bfloat162 pb = *reinterpret_cast<const __nv_bfloat162*>(&p[j][h]);
                sum += __low2float(pb) + __high2float(pb);
            }
            l_run[h] = l_run[h] * correction + sum;
#pragma unroll
            for (int j = 0; j < T::O_TILES; j++) {
                o[j][2 * h] *= correction;
                o[j][2 * h + 1] *= correction;
            }
        }

        // O += P V over this warp's quarter of the value columns (the first
        // DV channels of the staged rows).
#pragma unroll
        for (int kk = 0; kk < MLA_TILE / 16; kk++) {
            const uint32_t a[4] = {p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]};
#pragma unroll
            for (int j = 0; j < T::O_TILES; j += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, kt + (kk * 16 + v_row) * T::LK + col0 + j * 8 + v_col);
                mma_16816(o[j], a, b[0], b[1]);
                mma_16816(o[j + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // the stage and S are reused
    }
    cp_async_wait<0>();

    // Partials of heads g and g + 8 of this warp's row tile.
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float l = l_run[h];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        const int head = wm * 16 + g + 8 * h;
        if (head >= H) continue;
        const size_t out = ((size_t)seq * H + head) * splits + split;
        float* dst = partial_acc + out * DV + col0 + 2 * tq;
#pragma unroll
        for (int j = 0; j < T::O_TILES; j++)
            *reinterpret_cast<float2*>(dst + j * 8) = make_float2(o[j][2 * h], o[j][2 * h + 1]);
        if (wn == 0 && tq == 0) {
            partial_ml[out * 2] = m_run[h];
            partial_ml[out * 2 + 1] = l;
        }
    }
}

#define MLA_KERNEL_AS(NAME, DK, DV, H, OFFLOADED)                                                                 \
    extern "C" __global__ void __launch_bounds__(MLA_THREADS) NAME(                                                 \
        const float* q, const __nv_bfloat16* pool, const int* block_table, const int* lens, const int* tokens,    \
        const int* token_counts, float* partial_acc, float* partial_ml, int block_size, int max_blocks,           \
        int max_tokens, float scale, const int* unit_slots, const __nv_bfloat16* host, int offload_rows) {         \
        mla_split<DK, DV, H, OFFLOADED>(q, pool, block_table, lens, tokens, token_counts, partial_acc, partial_ml, \
                                        block_size, max_blocks, max_tokens, scale,                                 \
                                        MlaOffload{unit_slots, host, offload_rows});                               \
    }
// Each shape twice: over a resident pool, and over an offloaded one.
#define MLA_KERNEL(DK, DV, H)                                                   \
    MLA_KERNEL_AS(mla_decode_k##DK##_v##DV##_h##H, DK, DV, H, false)           \
    MLA_KERNEL_AS(mla_decode_offloaded_k##DK##_v##DV##_h##H, DK, DV, H, true)

MLA_KERNEL(576, 512, 16)
MLA_KERNEL(576, 512, 20)
MLA_KERNEL(576, 512, 32)
