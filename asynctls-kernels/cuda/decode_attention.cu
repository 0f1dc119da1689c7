// Paged decode attention for GQA (flash-decoding): one CTA per (sequence,
// KV head, split of the tokens); every K and V row it loads serves all G
// query heads of the group. With a token list it is the exact-attention
// stage of sparse decode; without, dense decode. Partial results (running
// max, sum and weighted values per split) are merged by decode_combine.
//
// Layouts: q [batch, q_heads, D] f32; K and V pools [num_blocks, kv_heads,
// BLOCK, D] bf16; block_table [batch, max_blocks] i32; lens [batch] i32;
// offloaded (unit_slots != null): the pools are the offload engine's
// resident slots [slots, BLOCK, D], unit_slots [num_blocks * kv_heads] names
// the slot of each (block, head) unit or -1, and a unit without a slot is
// read in place from host_k/host_v ([num_blocks, kv_heads, BLOCK, D], pinned
// host memory mapped into the device: a miss served on the critical path
// without a host round trip);
// tokens [batch * kv_heads, max_tokens] i32 sorted positions and
// token_counts [batch * kv_heads] (or null for dense);
// partial_acc [batch, q_heads, splits, D], partial_ml [batch, q_heads, splits, 2].

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define WARPS 8

// Each row (one token's K or V for one head, D bf16) is read by LANES lanes
// with 16-byte loads (8 bf16 per lane), so a warp reads ROWS tokens at once
// and every lane keeps two loads in flight; the per-token score is reduced
// over the LANES lanes of its row.
template <int D, int G>
__device__ void decode_split(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
                             const __nv_bfloat16* __restrict__ v_pool, const int* __restrict__ block_table,
                             const int* __restrict__ lens, const int* __restrict__ tokens,
                             const int* __restrict__ token_counts, float* __restrict__ partial_acc,
                             float* __restrict__ partial_ml, int kv_heads, int block_size, int max_blocks,
                             int max_tokens, float scale, const int* __restrict__ unit_slots,
                             const __nv_bfloat16* host_k, const __nv_bfloat16* host_v) {
    constexpr int LANES = D / 8;        // lanes per row
    constexpr int ROWS = 32 / LANES;    // rows a warp reads at once
    const int seq = blockIdx.x / kv_heads, head = blockIdx.x % kv_heads;
    const int split = blockIdx.y, splits = gridDim.y;
    const int q_heads = kv_heads * G;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LANES, part = lane % LANES;  // which row of the warp, which 8 channels

    const bool sparse = tokens != nullptr;
    const int n = sparse ? token_counts[blockIdx.x] : lens[seq];
    const int per_split = (n + splits - 1) / splits;
    const int begin = split * per_split, end = min(n, begin + per_split);

    float qr[G][8];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int i = 0; i < 8; i++)
            qr[g][i] = q[((size_t)seq * q_heads + head * G + g) * D + part * 8 + i] * scale;

    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = 0.0f;
    }

    const int stride = WARPS * ROWS;
    // Software pipeline: the loads of the next rows are issued before the
    // current ones are used, so each lane keeps four 16-byte loads in flight.
    auto load = [&](int t, uint4& kraw, uint4& vraw) {
        if (t < end) {
            const int pos = sparse ? tokens[(size_t)blockIdx.x * max_tokens + t] : t;
            const int block = block_table[(size_t)seq * max_blocks + pos / block_size];
            const __nv_bfloat16* kp = k_pool;
            const __nv_bfloat16* vp = v_pool;
            size_t row;
            if (unit_slots != nullptr) {
                const int unit = block * kv_heads + head;
                const int slot = unit_slots[unit];
                if (slot < 0) {
                    kp = host_k;
                    vp = host_v;
                }
                row = ((size_t)(slot >= 0 ? slot : unit) * block_size + pos % block_size) * D + part * 8;
            } else {
                row = (((size_t)block * kv_heads + head) * block_size + pos % block_size) * D + part * 8;
            }
            kraw = __ldg(reinterpret_cast<const uint4*>(kp + row));
            vraw = __ldg(reinterpret_cast<const uint4*>(vp + row));
        }
    };
    uint4 kcur = make_uint4(0, 0, 0, 0), vcur = kcur, knext = kcur, vnext = kcur;
    int t0 = begin + warp * ROWS;
    load(t0 + sub, kcur, vcur);
    for (; t0 < end; t0 += stride) {
        const int t = t0 + sub;
        const bool valid = t < end;
        load(t + stride, knext, vnext);
        float kr[8], vr[8];
        const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(&kcur);
        const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(&vcur);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 kf = __bfloat1622float2(k2[i]);
            const float2 vf = __bfloat1622float2(v2[i]);
            kr[2 * i] = kf.x;
            kr[2 * i + 1] = kf.y;
            vr[2 * i] = vf.x;
            vr[2 * i + 1] = vf.y;
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) s += qr[g][i] * kr[i];
#pragma unroll
            for (int o = LANES / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
            if (valid) {
                const float m_new = fmaxf(m[g], s);
                const float correction = __expf(m[g] - m_new);
                const float p = __expf(s - m_new);
                l[g] = l[g] * correction + p;
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * correction + p * vr[i];
                m[g] = m_new;
            }
        }
        kcur = knext;
        vcur = vnext;
    }

    // Merge the ROWS row-states of each warp (lanes LANES apart hold the
    // same channels) with shuffles, then the warps through shared memory.
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int o = LANES; o < 32; o <<= 1) {
            const float om = __shfl_xor_sync(0xffffffff, m[g], o);
            const float ol = __shfl_xor_sync(0xffffffff, l[g], o);
            const float mx = fmaxf(m[g], om);
            const float a = mx == -INFINITY ? 0.0f : __expf(m[g] - mx);
            const float b = mx == -INFINITY ? 0.0f : __expf(om - mx);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float oa = __shfl_xor_sync(0xffffffff, acc[g][i], o);
                acc[g][i] = acc[g][i] * a + oa * b;
            }
            l[g] = l[g] * a + ol * b;
            m[g] = mx;
        }
    }
    __shared__ float sm[WARPS][G], sl[WARPS][G];
    __shared__ float sacc[WARPS][G][D];
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) {
            sm[warp][g] = m[g];
            sl[warp][g] = l[g];
        }
        if (sub == 0) {
#pragma unroll
            for (int i = 0; i < 8; i++) sacc[warp][g][part * 8 + i] = acc[g][i];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
        const int g = idx / D, d = idx % D;
        float mx = -INFINITY;
        for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm[w][g]);
        float lsum = 0.0f, a = 0.0f;
        if (mx != -INFINITY) {
            for (int w = 0; w < WARPS; w++) {
                const float c = __expf(sm[w][g] - mx);
                lsum += sl[w][g] * c;
                a += sacc[w][g][d] * c;
            }
        }
        const size_t out = ((size_t)seq * q_heads + head * G + g) * splits + split;
        partial_acc[out * D + d] = a;
        if (d == 0) {
            partial_ml[out * 2] = mx;
            partial_ml[out * 2 + 1] = lsum;
        }
    }
}

#define DECODE_KERNEL(D, G)                                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) decode_attention_d##D##_g##G(                      \
        const float* q, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool, const int* block_table,       \
        const int* lens, const int* tokens, const int* token_counts, float* partial_acc, float* partial_ml,    \
        int kv_heads, int block_size, int max_blocks, int max_tokens, float scale, const int* unit_slots,       \
        const __nv_bfloat16* host_k, const __nv_bfloat16* host_v) {                                             \
        decode_split<D, G>(q, k_pool, v_pool, block_table, lens, tokens, token_counts, partial_acc, partial_ml, \
                           kv_heads, block_size, max_blocks, max_tokens, scale, unit_slots, host_k, host_v);    \
    }

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
    float a = 0.0f;
    for (int s = 0; s < splits; s++) {
        const float w = weights[s];
        if (w != 0.0f) a += partial_acc[(row * splits + s) * d + i] * w;
    }
    out[row * d + i] = denom > 0.0f ? a / denom : 0.0f;
}
