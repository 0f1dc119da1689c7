// The per-token ops of a model forward that the tensor layer dispatches to
// (asynctls-kernels/src/ops.rs): dtype casts, residual and bias adds, the
// bf16 embedding lookup, an out-of-place RMSNorm, and the counter-based
// uniform fill that generates real-size random weights on the device.
// Activations are f32 (the residual stream keeps f32 precision); weights
// and the GEMM inputs are bf16. Each kernel has a CPU twin in
// asynctls-kernels/src/cpu and is tested against it on the GPU machine.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

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

// out[row] = x[row] * w / sqrt(mean(x[row]^2) + eps); one block of 256 per row.
// The sum of squares is taken per thread then across the block; the CPU twin
// sums sequentially, so the two agree to f32 rounding (about 1e-6 relative).
extern "C" __global__ void rms_norm_out_f32(const float* x, const float* w, float* out, int h, float eps) {
    const float* row = x + (size_t)blockIdx.x * h;
    float* dst = out + (size_t)blockIdx.x * h;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) sq += row[i] * row[i];
    float inv = rsqrtf(block_sum_256(sq) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) dst[i] = row[i] * inv * w[i];
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
