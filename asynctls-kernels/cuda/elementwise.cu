// Row-wise and elementwise ops, f32. Each kernel has a CPU twin in
// asynctls-kernels/src/cpu and is tested against it on the GPU machine.

#include <cuda_runtime.h>

// Block-wide sum of one value per thread (blockDim.x a multiple of 32, <= 1024).
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : 0.0f;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    float total = partial[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = lane < warps ? partial[lane] : -INFINITY;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    float total = partial[0];
    __syncthreads();
    return total;
}

// One block per row: x[row] = x[row] * w / sqrt(mean(x^2) + eps).
extern "C" __global__ void rms_norm_f32(float* x, const float* w, int h, float eps) {
    float* row = x + (size_t)blockIdx.x * h;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) sq += row[i] * row[i];
    float inv = rsqrtf(block_sum(sq) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) row[i] = row[i] * inv * w[i];
}

// gate = silu(gate) * up, n elements.
extern "C" __global__ void silu_mul_f32(float* gate, const float* up, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        gate[i] = g / (1.0f + __expf(-g)) * up[i];
    }
}

// One block per row, softmax in place; a row of -inf becomes zeros.
extern "C" __global__ void softmax_rows_f32(float* x, int n) {
    float* row = x + (size_t)blockIdx.x * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max(m);
    if (m == -INFINITY) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = 0.0f;
        return;
    }
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = __expf(row[i] - m);
        row[i] = e;
        s += e;
    }
    float inv = 1.0f / block_sum(s);
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] *= inv;
}

// RoPE on x [tokens, heads, head_dim], rotating the first rotary_dim
// channels in pairs: (i, i + rotary_dim/2) for NeoX, (2i, 2i + 1) when
// interleaved (GLM's MLA rope key); cos/sin tables [max_pos, rotary_dim/2].
// Grid: tokens x heads.
extern "C" __global__ void rope_f32(float* x, const float* cos_t, const float* sin_t, const int* positions, int heads,
                                    int head_dim, int rotary_dim, int interleaved) {
    int token = blockIdx.x, head = blockIdx.y, half = rotary_dim / 2;
    float* v = x + ((size_t)token * heads + head) * head_dim;
    int pos = positions[token];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float c = cos_t[(size_t)pos * half + i], s = sin_t[(size_t)pos * half + i];
        const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
        float a = v[ia], b = v[ib];
        v[ia] = a * c - b * s;
        v[ib] = a * s + b * c;
    }
}

// Rows of table [vocab, h] by ids into out [n, h]. Grid: n.
extern "C" __global__ void embedding_f32(const float* table, const unsigned int* ids, float* out, int h) {
    const float* src = table + (size_t)ids[blockIdx.x] * h;
    float* dst = out + (size_t)blockIdx.x * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) dst[i] = src[i];
}

// Index of the largest value of each row (first on ties). One block per row.
extern "C" __global__ void argmax_rows_f32(const float* x, int n, unsigned int* out) {
    const float* row = x + (size_t)blockIdx.x * n;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];
        if (v > best || (v == best && i < idx)) { best = v; idx = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffff, best, o);
        int oi = __shfl_xor_sync(0xffffffff, idx, o);
        if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
    }
    __shared__ float sb[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sb[warp] = best; si[warp] = idx; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (sb[w] > best || (sb[w] == best && si[w] < idx)) { best = sb[w]; idx = si[w]; }
        out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}

// Argmax of long rows (a vocabulary of 150k at batch 1 took 243 us in one
// CTA) in two passes: a grid of (rows, parts) CTAs each reduces a slice to
// one 64-bit key, then one warp per row reduces the row's keys. A key orders
// as the selection does: the value (NaN lowest) in the high word, the
// complement of the index in the low word (ties to the lower index).
__device__ __forceinline__ unsigned long long argmax_key(float v, unsigned i) {
    unsigned u = __float_as_uint(v);
    const unsigned ord = isnan(v) ? 0u : (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)ord << 32) | (0xffffffffu - i);
}

extern "C" __global__ void argmax_partial_f32(const float* x, int n, int part_len, unsigned long long* keys) {
    const float* row = x + (size_t)blockIdx.x * n;
    const int start = blockIdx.y * part_len, end = min(n, start + part_len);
    unsigned long long best = 0;
    for (int i = start + threadIdx.x; i < end; i += blockDim.x) best = max(best, argmax_key(row[i], (unsigned)i));
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffff, best, o));
    __shared__ unsigned long long s[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) s[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) best = max(best, s[w]);
        keys[(size_t)blockIdx.x * gridDim.y + blockIdx.y] = best;
    }
}

// One warp per row over its `parts` keys; an all-NaN row gives index 0.
extern "C" __global__ void argmax_final(const unsigned long long* keys, int parts, unsigned int* out) {
    unsigned long long best = 0;
    for (int p = threadIdx.x; p < parts; p += 32) best = max(best, keys[(size_t)blockIdx.x * parts + p]);
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffff, best, o));
    if (threadIdx.x == 0) out[blockIdx.x] = 0xffffffffu - (unsigned)(best & 0xffffffffu);
}
