// Causal prefill attention in the FlashAttention-2 style on tensor cores
// (WMMA bf16 16x16x16, f32 accumulation): one CTA of four warps per (64
// query rows, query head); each warp owns 16 rows. Key tiles are whole
// cache blocks (64 tokens of one KV head, contiguous in the paged pool),
// staged in shared memory; S = Q K^T on tensor cores, the online softmax on
// the warp's rows, then O = O * correction + P V on tensor cores with O kept
// in shared memory (WMMA does not expose which row a fragment element is).
//
// Layouts: q [n, q_heads, D] f32 (tokens start..start+n of the sequence);
// K/V pools [num_blocks, kv_heads, 64, D] bf16; block_table [max_blocks] of
// the sequence; out [n, q_heads, D] f32. Query i sees keys 0..=start+i.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

using namespace nvcuda;

#define BR 64  // query rows per CTA
#define BC 64  // keys per tile: one cache block
#define PREFILL_WARPS 4
// Shared-memory rows are padded (16 bytes for bf16, 16 for f32) so the
// tensor-core fragment loads of 16 rows do not all hit the same banks.
#define PAD_H 8
#define PAD_F 4

template <int D>
__device__ void prefill_tile(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
                             const __nv_bfloat16* __restrict__ v_pool, const int* __restrict__ block_table,
                             float* __restrict__ out, int n, int start, int q_heads, int kv_heads, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int LQ = D + PAD_H;   // row stride of Q, K, V (bf16)
    constexpr int LS = BC + PAD_F;  // of S (f32)
    constexpr int LP = BC + PAD_H;  // of P (bf16)
    constexpr int LO = D + PAD_F;   // of O (f32)
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);  // [BR][LQ], pre-scaled
    __nv_bfloat16* ks = qs + BR * LQ;                             // [BC][LQ]
    __nv_bfloat16* vs = ks + BC * LQ;                             // [BC][LQ]
    float* ss = reinterpret_cast<float*>(vs + BC * LQ);           // [warps][16][LS]
    __nv_bfloat16* ps = reinterpret_cast<__nv_bfloat16*>(ss + PREFILL_WARPS * 16 * LS);  // [warps][16][LP]
    float* os = reinterpret_cast<float*>(ps + PREFILL_WARPS * 16 * LP);                 // [warps][16][LO]
    float* ms = os + PREFILL_WARPS * 16 * LO;  // [warps * 16] running max
    float* ls = ms + PREFILL_WARPS * 16;       // running sum
    float* cs = ls + PREFILL_WARPS * 16;       // correction of the tile

    const int q0 = blockIdx.x * BR, h = blockIdx.y, kvh = h / (q_heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int threads = PREFILL_WARPS * 32;
    for (int i = threadIdx.x; i < BR * D; i += threads) {
        const int r = i / D, c = i % D;
        const float v = q0 + r < n ? q[((size_t)(q0 + r) * q_heads + h) * D + c] * scale : 0.0f;
        qs[r * LQ + c] = __float2bfloat16(v);
    }
    for (int i = threadIdx.x; i < PREFILL_WARPS * 16 * LO; i += threads) os[i] = 0.0f;
    for (int i = threadIdx.x; i < PREFILL_WARPS * 16; i += threads) {
        ms[i] = -INFINITY;
        ls[i] = 0.0f;
    }
    __syncthreads();

    float* sw = ss + warp * 16 * LS;
    __nv_bfloat16* pw = ps + warp * 16 * LP;
    float* ow = os + warp * 16 * LO;
    const int last = start + min(n, q0 + BR) - 1;  // the tile's last query position
    const int tiles = last / BC + 1;
    for (int t = 0; t < tiles; t++) {
        const size_t base = ((size_t)block_table[t] * kv_heads + kvh) * BC * D;
        const uint4* kb = reinterpret_cast<const uint4*>(k_pool + base);
        const uint4* vb = reinterpret_cast<const uint4*>(v_pool + base);
        for (int i = threadIdx.x; i < BC * D / 8; i += threads) {
            const int r = i / (D / 8), c = i % (D / 8);
            reinterpret_cast<uint4*>(ks + r * LQ)[c] = kb[i];
            reinterpret_cast<uint4*>(vs + r * LQ)[c] = vb[i];
        }
        __syncthreads();

        // S = Q_w K^T (16 x BC).
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag[BC / 16];
#pragma unroll
        for (int j = 0; j < BC / 16; j++) wmma::fill_fragment(s_frag[j], 0.0f);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
            wmma::load_matrix_sync(a, qs + warp * 16 * LQ + kk * 16, LQ);
#pragma unroll
            for (int j = 0; j < BC / 16; j++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
                wmma::load_matrix_sync(b, ks + j * 16 * LQ + kk * 16, LQ);
                wmma::mma_sync(s_frag[j], a, b, s_frag[j]);
            }
        }
#pragma unroll
        for (int j = 0; j < BC / 16; j++) wmma::store_matrix_sync(sw + j * 16, s_frag[j], LS, wmma::mem_row_major);
        __syncwarp();

        // Online softmax over the causal part of the tile, one row at a time
        // across the warp (lane reads columns lane and lane + 32: no bank
        // conflicts), reductions by shuffles.
        for (int r = 0; r < 16; r++) {
            const int qpos = start + q0 + warp * 16 + r;
            const int k0 = t * BC + lane, k1 = k0 + 32;
            const float s0 = k0 <= qpos ? sw[r * LS + lane] : -INFINITY;
            const float s1 = k1 <= qpos ? sw[r * LS + lane + 32] : -INFINITY;
            float mx = fmaxf(s0, s1);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
            const float m_old = ms[warp * 16 + r];
            const float m_new = fmaxf(m_old, mx);
            const __nv_bfloat16 p0 = __float2bfloat16(s0 == -INFINITY ? 0.0f : __expf(s0 - m_new));
            const __nv_bfloat16 p1 = __float2bfloat16(s1 == -INFINITY ? 0.0f : __expf(s1 - m_new));
            pw[r * LP + lane] = p0;
            pw[r * LP + lane + 32] = p1;
            // The sum of exactly what P V adds up.
            float sum = __bfloat162float(p0) + __bfloat162float(p1);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
            if (lane == 0) {
                const float correction = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
                ms[warp * 16 + r] = m_new;
                ls[warp * 16 + r] = ls[warp * 16 + r] * correction + sum;
                cs[warp * 16 + r] = correction;
            }
        }
        __syncwarp();
        for (int i = lane; i < 16 * D; i += 32) ow[(i / D) * LO + i % D] *= cs[warp * 16 + i / D];
        __syncwarp();

        // O += P V (16 x D).
#pragma unroll
        for (int dd = 0; dd < D / 16; dd++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
            wmma::load_matrix_sync(o, ow + dd * 16, LO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> p;
                wmma::load_matrix_sync(p, pw + kk * 16, LP);
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> v;
                wmma::load_matrix_sync(v, vs + kk * 16 * LQ + dd * 16, LQ);
                wmma::mma_sync(o, p, v, o);
            }
            wmma::store_matrix_sync(ow + dd * 16, o, LO, wmma::mem_row_major);
        }
        __syncthreads();  // before the next tile overwrites ks / vs
    }

    for (int i = lane; i < 16 * D; i += 32) {
        const int r = i / D, c = i % D, qi = q0 + warp * 16 + r;
        if (qi < n) {
            const float l = ls[warp * 16 + r];
            out[((size_t)qi * q_heads + h) * D + c] = l > 0.0f ? ow[r * LO + c] / l : 0.0f;
        }
    }
}

#define PREFILL_KERNEL(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(PREFILL_WARPS * 32) prefill_attention_d##D(                        \
        const float* q, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool, const int* block_table,          \
        float* out, int n, int start, int q_heads, int kv_heads, float scale) {                                    \
        prefill_tile<D>(q, k_pool, v_pool, block_table, out, n, start, q_heads, kv_heads, scale);                  \
    }

PREFILL_KERNEL(64)
PREFILL_KERNEL(128)
