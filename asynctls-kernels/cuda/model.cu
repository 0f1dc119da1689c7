// The per-token ops of a model forward that the tensor layer dispatches to
// (asynctls-kernels/src/ops.rs): dtype casts, residual and bias adds, the
// bf16 embedding lookup, an out-of-place RMSNorm, and the counter-based
// uniform fill that generates real-size random weights on the device.
// Activations are f32 (the residual stream keeps f32 precision); weights
// and the GEMM inputs are bf16. Each kernel has a CPU twin in
// asynctls-kernels/src/cpu and is tested against it on the GPU machine.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mma.cuh"

// Grid-stride loops: one launch covers any n.
#define FOR_EACH(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void cast_f32_bf16(const float* x, __nv_bfloat16* y, long long n) {
    FOR_EACH(i, n) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const __nv_bfloat16* x, float* y, long long n) {
    FOR_EACH(i, n) y[i] = __bfloat162float(x[i]);
}

// out = a + b (out may alias a).
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, long long n) {
    FOR_EACH(i, n) out[i] = a[i] + b[i];
}

// x[r, j] += bias[j] for rows of width w.
extern "C" __global__ void bias_add_f32(float* x, const float* bias, long long n, int w) {
    FOR_EACH(i, n) x[i] += bias[i % w];
}

// out[t, :] = table[ids[t], :] widened to f32. Grid: one block per token.
extern "C" __global__ void embedding_bf16_f32(const __nv_bfloat16* table, const unsigned int* ids, float* out, int h) {
    const __nv_bfloat16* src = table + (size_t)ids[blockIdx.x] * h;
    float* dst = out + (size_t)blockIdx.x * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
}

// The sum of v over a block of up to 256 threads (8 warps); every thread
// gets it. All threads must call it, once per block.
__device__ float block_sum_256(float v) {
    __shared__ float partial[8];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += partial[w];
    return total;
}

// A norm's output element as stored: f32, or bf16 for a norm whose output
// only feeds GEMMs (the same values the f32 norm then a cast give, one
// launch fewer).
__device__ __forceinline__ void store_norm(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void store_norm(__nv_bfloat16* dst, float v) { *dst = __float2bfloat16_rn(v); }

// out[row] = x[row] * w / sqrt(mean(x[row]^2) + eps); one block of 256 per row.
// The sum of squares is taken per thread then across the block; the CPU twin
// sums sequentially, so the two agree to f32 rounding (about 1e-6 relative).
// The loads are 16-byte and unrolled so that a thread's share of the row is
// in flight at once: the plain loop waited on one load per iteration, which
// made a 4096-wide row (one per decode step at batch 1) take 14.5 us.
template <typename Out>
__device__ __forceinline__ void rms_norm_span(const float* __restrict__ row, const float* __restrict__ w,
                                              Out* __restrict__ dst, int h, float eps) {
    float sq = 0.0f;
    if ((h & 3) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
        const float4* r4 = reinterpret_cast<const float4*>(row);
#pragma unroll 4
        for (int i = threadIdx.x; i < h / 4; i += blockDim.x) {
            const float4 v = r4[i];
            sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
#pragma unroll 4
        for (int i = threadIdx.x; i < h; i += blockDim.x) sq += row[i] * row[i];
    }
    float inv = rsqrtf(block_sum_256(sq) / h + eps);
#pragma unroll 8
    for (int i = threadIdx.x; i < h; i += blockDim.x) store_norm(dst + i, row[i] * inv * w[i]);
}

// Row blockIdx.x of x [rows, h] into out.
template <typename Out>
__device__ __forceinline__ void rms_norm_row(const float* x, const float* w, Out* out, int h, float eps) {
    rms_norm_span(x + (size_t)blockIdx.x * h, w, out + (size_t)blockIdx.x * h, h, eps);
}

extern "C" __global__ void rms_norm_out_f32(const float* x, const float* w, float* out, int h, float eps) {
    rms_norm_row(x, w, out, h, eps);
}

extern "C" __global__ void rms_norm_out_bf16(const float* x, const float* w, __nv_bfloat16* out, int h, float eps) {
    rms_norm_row(x, w, out, h, eps);
}

// The uniform draw of element i of a stream: splitmix64 of seed + i, top 24
// bits to [-1, 1). The CPU twin (cpu::uniform_at) computes the same bits.
__device__ __forceinline__ float uniform_at(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ull) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z = z ^ (z >> 31);
    return (float)(z >> 40) / 16777216.0f * 2.0f - 1.0f;
}

// y[i] = offset + scale * u_i as bf16: random weights without a host copy.
extern "C" __global__ void fill_uniform_bf16(__nv_bfloat16* y, long long n, unsigned long long seed, float scale,
                                             float offset) {
    FOR_EACH(i, n) y[i] = __float2bfloat16_rn(offset + scale * uniform_at(seed, (unsigned long long)i));
}

extern "C" __global__ void fill_uniform_f32(float* y, long long n, unsigned long long seed, float scale, float offset) {
    FOR_EACH(i, n) y[i] = offset + scale * uniform_at(seed, (unsigned long long)i);
}

// y[m, j] (+)= sum_c x[m, c] w[j, c] for the few rows of a decode step (m <=
// 8): a linear layer at small batch is a stream of its bf16 weights, read
// here once, on the tensor cores so that eight rows of x cost no more than
// one. A CTA owns 16 weight rows (the A operand of mma.m16n8k16, the rows
// of x its 8 columns) and its 8 warps split k in chunks of 64: in a chunk,
// lane (g, t) loads 32 contiguous bytes of weight rows g and g + 8 at k
// offset 16 t (four lanes cover a row's 128 bytes) and the same k range of
// x row g. The order of k inside an mma is free as long as A and B agree,
// so each 16-byte word feeds one mma directly, no shuffle or shared-memory
// staging. Partial sums meet in shared memory; `accumulate` adds them to y
// (a residual stream), else y is overwritten. x (rounded to bf16, as the
// cuBLAS path rounds it) is read through the cache. Grid: ceil(n / 16)
// CTAs of 256 threads. k % 8 == 0; x, w 16-byte aligned.
#define GEMV_WARPS 8
#define GEMV_TILE 16
#define GEMV_UNROLL 2


// Eight consecutive x values packed as bf16 pairs.
__device__ __forceinline__ uint4 load_x8_bf16(const float* x) {
    const float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
    return make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
}

__device__ __forceinline__ uint4 load_x8_bf16(const __nv_bfloat16* x) { return *reinterpret_cast<const uint4*>(x); }

template <typename X>
__device__ void gemv_mma(const X* __restrict__ x, const __nv_bfloat16* __restrict__ w, float* __restrict__ y, int m,
                         int n, int k, int accumulate) {
    __shared__ float partial[GEMV_WARPS][GEMV_TILE][8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * GEMV_TILE;
    const bool has_a = row0 + g < n, has_b = row0 + g + 8 < n, has_x = g < m;
    // Rows past n (and x rows past m) read nothing: their operands are zeros.
    const __nv_bfloat16* wa = w + (size_t)(has_a ? row0 + g : 0) * k;
    const __nv_bfloat16* wb = w + (size_t)(has_b ? row0 + g + 8 : 0) * k;
    const X* xr = x + (size_t)(has_x ? g : 0) * k;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    float acc0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int chunks = (k + 63) / 64;
    for (int c0 = warp; c0 < chunks; c0 += GEMV_WARPS * GEMV_UNROLL) {
        uint4 ra[GEMV_UNROLL][2], rb[GEMV_UNROLL][2], rx[GEMV_UNROLL][2];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int off = (c0 + u * GEMV_WARPS) * 64 + 16 * t + 8 * j;
                const bool in = c0 + u * GEMV_WARPS < chunks && off < k;
                ra[u][j] = in && has_a ? __ldcs(reinterpret_cast<const uint4*>(wa + off)) : zero;
                rb[u][j] = in && has_b ? __ldcs(reinterpret_cast<const uint4*>(wb + off)) : zero;
                rx[u][j] = in && has_x ? load_x8_bf16(xr + off) : zero;
            }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const uint32_t lo[4] = {ra[u][j].x, rb[u][j].x, ra[u][j].y, rb[u][j].y};
                mma_16816(acc0, lo, rx[u][j].x, rx[u][j].y);
                const uint32_t hi[4] = {ra[u][j].z, rb[u][j].z, ra[u][j].w, rb[u][j].w};
                mma_16816(acc1, hi, rx[u][j].z, rx[u][j].w);
            }
    }
    // C fragment: (row g, columns 2t, 2t + 1) and (row g + 8, the same).
    partial[warp][g][2 * t] = acc0[0] + acc1[0];
    partial[warp][g][2 * t + 1] = acc0[1] + acc1[1];
    partial[warp][g + 8][2 * t] = acc0[2] + acc1[2];
    partial[warp][g + 8][2 * t + 1] = acc0[3] + acc1[3];
    __syncthreads();
    if (threadIdx.x < GEMV_TILE * 8) {
        const int r = threadIdx.x >> 3, col = threadIdx.x & 7, row = row0 + r;
        float v = 0.0f;
#pragma unroll
        for (int i = 0; i < GEMV_WARPS; i++) v += partial[i][r][col];
        if (row < n && col < m) {
            float* dst = y + (size_t)col * n + row;
            *dst = accumulate ? *dst + v : v;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    gemv_f32(const float* x, const __nv_bfloat16* w, float* y, int m, int n, int k, int accumulate) {
    gemv_mma(x, w, y, m, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    gemv_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, float* y, int m, int n, int k, int accumulate) {
    gemv_mma(x, w, y, m, n, k, accumulate);
}

// dst[i, :] = src[idx[i], :] for rows of w elements of 2 or 4 bytes (a
// row gather: the MoE prefill's tokens of one expert, a weight's rows
// reordered at load).
extern "C" __global__ void gather_rows_b16(const unsigned short* src, const unsigned* idx, unsigned short* dst,
                                           long long m, int w) {
    FOR_EACH(i, m * w) dst[i] = src[(size_t)idx[i / w] * w + i % w];
}

extern "C" __global__ void gather_rows_b32(const unsigned* src, const unsigned* idx, unsigned* dst, long long m,
                                           int w) {
    FOR_EACH(i, m * w) dst[i] = src[(size_t)idx[i / w] * w + i % w];
}

// dst[idx[i], :] = src[i, :] (the indices distinct) for f32 rows of w.
extern "C" __global__ void scatter_rows_f32(const float* src, const unsigned* idx, float* dst, long long m, int w) {
    FOR_EACH(i, m * w) dst[(size_t)idx[i / w] * w + i % w] = src[i];
}

// out[r, :] = [a[r, :], b[r, :]] for f32 rows of wa and wb.
extern "C" __global__ void concat_cols_f32(const float* a, const float* b, float* out, long long rows, int wa, int wb) {
    const int w = wa + wb;
    FOR_EACH(i, rows * w) {
        const long long r = i / w;
        const int c = (int)(i % w);
        out[i] = c < wa ? a[r * wa + c] : b[r * wb + c - wa];
    }
}

// dst = src rotated NeoX-style at position pos (the math of rope_f32) for
// one row of 2 half channels, tables [max_pos, half]; the block's threads
// share the pairs.
__device__ __forceinline__ void rope_neox_row(const float* src, float* dst, const float* cos_t, const float* sin_t,
                                              int pos, int half) {
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = cos_t[(size_t)pos * half + i], s = sin_t[(size_t)pos * half + i];
        const float x0 = src[i], x1 = src[i + half];
        dst[i] = x0 * c - x1 * s;
        dst[i + half] = x0 * s + x1 * c;
    }
}

// out[r] = [a[r], rope(b[r])] for rows r = token * heads + head: a NeoX
// rotation of b's rd channels (the math of rope_f32) written after a's wa
// channels, one launch for MLA's rope and concat. Grid: tokens x heads.
extern "C" __global__ void rope_concat_f32(const float* a, const float* b, float* out, const float* cos_t,
                                           const float* sin_t, const int* positions, int heads, int wa, int rd) {
    const int token = blockIdx.x, head = blockIdx.y, half = rd / 2;
    const size_t r = (size_t)token * heads + head;
    const float* ar = a + r * wa;
    const float* br = b + r * rd;
    float* o = out + r * (wa + rd);
    for (int i = threadIdx.x; i < wa; i += blockDim.x) o[i] = ar[i];
    rope_neox_row(br, o + wa, cos_t, sin_t, positions[token], half);
}

// The fused q/k/v projection's rows [q heads | k heads | v heads] (each d
// wide) split into q [tokens, qh, d], k [tokens, kvh, d] and v [tokens,
// kvh, d]: q and k heads RMS-normed per head when their norm weights are
// given (Qwen3's q_norm / k_norm, the math of rms_norm_out_f32), then
// rotated NeoX-style on their first rd channels at the token's position
// (the math of rope_f32); v heads copied. One launch for what was two norms
// and two rotations. Grid: tokens x (qh + 2 kvh), 128 threads; d <= 512.
extern "C" __global__ void __launch_bounds__(128)
    qkv_heads_f32(const float* __restrict__ qkv, const float* __restrict__ q_norm, const float* __restrict__ k_norm,
                  float* __restrict__ q, float* __restrict__ k, float* __restrict__ v, const float* __restrict__ cos_t,
                  const float* __restrict__ sin_t, const int* __restrict__ positions, int qh, int kvh, int d, int rd,
                  float eps) {
    __shared__ float head_row[512];
    const int token = blockIdx.x, head = blockIdx.y, heads = qh + 2 * kvh;
    const float* src = qkv + ((size_t)token * heads + head) * d;
    if (head >= qh + kvh) {
        float* dst = v + ((size_t)token * kvh + head - qh - kvh) * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
        return;
    }
    const bool is_q = head < qh;
    float* dst = is_q ? q + ((size_t)token * qh + head) * d : k + ((size_t)token * kvh + head - qh) * d;
    const float* norm = is_q ? q_norm : k_norm;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float x = src[i];
        head_row[i] = x;
        sq += x * x;
    }
    if (norm != nullptr) {
        const float inv = rsqrtf(block_sum_256(sq) / d + eps);
        for (int i = threadIdx.x; i < d; i += blockDim.x) head_row[i] = head_row[i] * inv * norm[i];
    }
    __syncthreads();
    const int pos = positions[token], half = rd / 2;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float out = head_row[i];
        if (i < rd) {
            const int j = i < half ? i : i - half;
            const float c = cos_t[(size_t)pos * half + j], s = sin_t[(size_t)pos * half + j];
            const float a = head_row[j], b = head_row[j + half];
            out = i < half ? a * c - b * s : a * s + b * c;
        }
        dst[i] = out;
    }
}

// out[r, j] = silu(gu[r, j]) * gu[r, i + j] as bf16, for rows [gate | up]
// of 2i: the fused gate/up projection's output straight to the down
// projection's bf16 input (the math of silu_mul_f32, then the cast).
extern "C" __global__ void silu_mul_halves_bf16(const float* gu, __nv_bfloat16* out, long long rows, int i) {
    FOR_EACH(e, rows * i) {
        const long long r = e / i;
        const int j = (int)(e % i);
        const float g = gu[r * 2 * i + j];
        out[e] = __float2bfloat16_rn(g / (1.0f + __expf(-g)) * gu[r * 2 * i + i + j]);
    }
}

// MLA's stacked down projections, one token per blockIdx.x: the row [q_a
// (qr) | latent (rank) | rope key (rd)] becomes q_in = bf16(rms_norm(q_a,
// q_norm)) (blockIdx.y 0; the q up-projection's GEMM input) and the cache
// row [rms_norm(latent, kv_norm) | rope(rope key)] in f32 (blockIdx.y 1),
// NeoX-rotated at the token's position (the math of rms_norm_out_* and
// rope_concat_f32). One launch for two norms and a rotation. Grid: tokens x
// (qr > 0 ? 2 : 1) with the cache row at y = gridDim.y - 1, 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    mla_down_heads_f32(const float* __restrict__ a, const float* __restrict__ q_norm, const float* __restrict__ kv_norm,
                       __nv_bfloat16* __restrict__ q_in, float* __restrict__ keys, const float* __restrict__ cos_t,
                       const float* __restrict__ sin_t, const int* __restrict__ positions, int qr, int rank, int rd,
                       float eps) {
    const int token = blockIdx.x;
    const float* row = a + (size_t)token * (qr + rank + rd);
    if (blockIdx.y + 1 < gridDim.y) {
        rms_norm_span(row, q_norm, q_in + (size_t)token * qr, qr, eps);
        return;
    }
    float* dst = keys + (size_t)token * (rank + rd);
    rms_norm_span(row + qr, kv_norm, dst, rank, eps);
    rope_neox_row(row + qr + rank, dst + rank, cos_t, sin_t, positions[token], rd / 2);
}
