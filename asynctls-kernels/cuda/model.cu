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

#include "bf16x8.cuh"

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
template <typename Out>
__device__ __forceinline__ void rms_norm_row(const float* x, const float* w, Out* out, int h, float eps) {
    const float* row = x + (size_t)blockIdx.x * h;
    Out* dst = out + (size_t)blockIdx.x * h;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) sq += row[i] * row[i];
    float inv = rsqrtf(block_sum_256(sq) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) store_norm(dst + i, row[i] * inv * w[i]);
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

// y[m, j] = sum_c x[m, c] w[j, c] for a decode step of one sequence (M = 1;
// the template takes more rows, but at 4 rows cuBLAS was faster end to end):
// a linear layer at batch 1 is a stream of its bf16 weights, read here
// once with 16-byte loads. A CTA takes GEMV_ROWS weight rows and its eight
// warps split k between them (a warp per row group left k/v projections of
// 1024 rows on 32 SMs); partial sums meet in shared memory. x (rounded to
// bf16, as the cuBLAS path rounds it) is read through the cache. Grid:
// ceil(n / GEMV_ROWS) CTAs of 256 threads. k % 8 == 0; x, w 16-byte aligned.
#define GEMV_WARPS 8
#define GEMV_ROWS 4


// Eight consecutive x values as floats rounded to bf16.
__device__ __forceinline__ void load_x8(const float* x, float* f) {
    const float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; i++) f[i] = __bfloat162float(__float2bfloat16_rn(v[i]));
}

__device__ __forceinline__ void load_x8(const __nv_bfloat16* x, float* f) {
    bf16x8_to_f32(*reinterpret_cast<const uint4*>(x), f);
}

template <int M, typename X>
__device__ void gemv_rows(const X* __restrict__ x, const __nv_bfloat16* __restrict__ w, float* __restrict__ y, int n,
                          int k) {
    __shared__ float partial[GEMV_WARPS][GEMV_ROWS][M];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = blockIdx.x * GEMV_ROWS;
    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int m = 0; m < M; m++) acc[r][m] = 0.0f;
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll 2
    for (int c = (warp * 32 + lane) * 8; c < k; c += GEMV_WARPS * 32 * 8) {
        uint4 wv[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
            wv[r] = row0 + r < n ? __ldcs(reinterpret_cast<const uint4*>(w + (size_t)(row0 + r) * k + c)) : zero;
        float xf[M][8];
#pragma unroll
        for (int m = 0; m < M; m++) load_x8(x + (size_t)m * k + c, xf[m]);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            float wf[8];
            bf16x8_to_f32(wv[r], wf);
#pragma unroll
            for (int m = 0; m < M; m++)
#pragma unroll
                for (int i = 0; i < 8; i++) acc[r][m] = fmaf(xf[m][i], wf[i], acc[r][m]);
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int m = 0; m < M; m++) {
            float v = acc[r][m];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
            if (lane == 0) partial[warp][r][m] = v;
        }
    __syncthreads();
    if (threadIdx.x < GEMV_ROWS * M) {
        const int r = threadIdx.x / M, m = threadIdx.x % M;
        float v = 0.0f;
#pragma unroll
        for (int i = 0; i < GEMV_WARPS; i++) v += partial[i][r][m];
        if (row0 + r < n) y[(size_t)m * n + row0 + r] = v;
    }
}

#define GEMV(M)                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        gemv_f32_m##M(const float* x, const __nv_bfloat16* w, float* y, int n, int k) {                            \
        gemv_rows<M>(x, w, y, n, k);                                                                                \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        gemv_bf16_m##M(const __nv_bfloat16* x, const __nv_bfloat16* w, float* y, int n, int k) {                   \
        gemv_rows<M>(x, w, y, n, k);                                                                                \
    }
GEMV(1)

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
    const int pos = positions[token];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = cos_t[(size_t)pos * half + i], s = sin_t[(size_t)pos * half + i];
        const float x0 = br[i], x1 = br[i + half];
        o[wa + i] = x0 * c - x1 * s;
        o[wa + i + half] = x0 * s + x1 * c;
    }
}
