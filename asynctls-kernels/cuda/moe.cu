// The mixture-of-experts layer of GLM-4.7-Flash (and DeepSeek-style
// routers) on the device, so that a decode step never waits for the host:
//
// - moe_route_f32: router logits -> the top-k experts of each token and
//   their weights, as HF's Glm4MoeLiteTopkRouter + route_tokens_to_experts
//   compute them (sigmoid scores, the correction bias only for choosing,
//   groups ranked by the sum of their two best, top-k, normalisation,
//   routed scaling);
// - moe_gate_up_grouped / moe_down_grouped: the routed experts of a decode
//   step. A CTA serves one expert, for every (token, slot) pair routed to
//   it, so each touched expert's weights are read once per step however many
//   tokens chose it, and experts nobody chose are not read at all;
// - moe_combine: out[t] += shared[t] + sum_j weight[t, j] * expert_out[t, j],
//   in slot order (deterministic: no atomics), into the residual stream.
//
// The CPU twins are in asynctls-kernels/src/cpu/moe.rs; tests/gpu_moe.rs
// checks each against them on random inputs.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "bf16x8.cuh"

#define FOR_EACH(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// At most this many experts per router (GLM-4.7-Flash has 64, DeepSeek-V3 256).
#define ROUTE_MAX_EXPERTS 256
#define ROUTE_WARPS 4

// The selection order of cpu::topk_indices: larger first, ties to the lower
// index, NaN after everything.
__device__ __forceinline__ bool ranks_before(float a, int i, float b, int j) {
    const bool an = isnan(a), bn = isnan(b);
    if (an != bn) return bn;
    if (!an && a != b) return a > b;
    return i < j;
}

// The best not-yet-taken entry of vals[0..n) over the warp; every lane gets it.
__device__ int warp_best(const float* vals, const unsigned char* taken, int n) {
    const int lane = threadIdx.x & 31;
    float best = 0.0f;
    int at = -1;
    for (int i = lane; i < n; i += 32) {
        if (taken[i]) continue;
        if (at < 0 || ranks_before(vals[i], i, best, at)) {
            best = vals[i];
            at = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffff, best, o);
        const int oa = __shfl_xor_sync(0xffffffff, at, o);
        if (oa >= 0 && (at < 0 || ranks_before(ob, oa, best, at))) {
            best = ob;
            at = oa;
        }
    }
    return at;
}

// logits[t, e] = x[t] . W[e] in f32 (x as computed, the bf16 router
// widened exactly: HF routes in f32). Grid (ceil(experts / 8), n), a warp
// per (token, expert) with its loads in flight. h % 8 == 0, W 16-byte aligned.
extern "C" __global__ void __launch_bounds__(256)
    moe_router_logits(const float* __restrict__ x, const __nv_bfloat16* __restrict__ router,
                      float* __restrict__ logits, int h, int experts) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e = blockIdx.x * 8 + warp, t = blockIdx.y;
    if (e >= experts) return;
    const float* xr = x + (size_t)t * h;
    const __nv_bfloat16* wr = router + (size_t)e * h;
    float acc = 0.0f;
    for (int base = lane * 8; base < h; base += 32 * 8 * 4) {
        uint4 wv[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int c = base + j * 32 * 8;
            wv[j] = c < h ? __ldg(reinterpret_cast<const uint4*>(wr + c)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int c = base + j * 32 * 8;
            if (c >= h) break;
            float w8[8];
            bf16x8_to_f32(wv[j], w8);
            const float4 a = *reinterpret_cast<const float4*>(xr + c), b = *reinterpret_cast<const float4*>(xr + c + 4);
            acc = fmaf(a.x, w8[0], acc);
            acc = fmaf(a.y, w8[1], acc);
            acc = fmaf(a.z, w8[2], acc);
            acc = fmaf(a.w, w8[3], acc);
            acc = fmaf(b.x, w8[4], acc);
            acc = fmaf(b.y, w8[5], acc);
            acc = fmaf(b.z, w8[6], acc);
            acc = fmaf(b.w, w8[7], acc);
        }
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    if (lane == 0) logits[(size_t)t * experts + e] = acc;
}

// One warp per token from its logits. ids/weights: [n, k]. groups divides
// experts; the kept groups are the top_groups groups by the sum of their
// two best biased scores; the others are masked to -inf before the top-k.
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32)
    moe_route_f32(const float* __restrict__ logits, const float* __restrict__ bias, unsigned* __restrict__ ids,
                  float* __restrict__ weights, int n, int experts, int groups, int top_groups, int k, int norm,
                  float scaling) {
    __shared__ float s_score[ROUTE_WARPS][ROUTE_MAX_EXPERTS];
    __shared__ float s_choice[ROUTE_WARPS][ROUTE_MAX_EXPERTS];
    __shared__ unsigned char s_taken[ROUTE_WARPS][ROUTE_MAX_EXPERTS];
    __shared__ float s_group[ROUTE_WARPS][ROUTE_MAX_EXPERTS];
    __shared__ unsigned char s_gtaken[ROUTE_WARPS][ROUTE_MAX_EXPERTS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= n) return;
    float* score = s_score[warp];
    float* choice = s_choice[warp];
    unsigned char* taken = s_taken[warp];
    const float* row = logits + (size_t)t * experts;
    for (int e = lane; e < experts; e += 32) {
        const float s = 1.0f / (1.0f + expf(-row[e]));
        score[e] = s;
        choice[e] = s + bias[e];
        taken[e] = 0;
    }
    __syncwarp();
    if (groups > 1) {
        const int per = experts / groups;
        float* gs = s_group[warp];
        unsigned char* gt = s_gtaken[warp];
        for (int g = lane; g < groups; g += 32) {
            // The two best of the group (ties to the lower index), summed best first.
            int a = -1, b = -1;
            for (int i = g * per; i < (g + 1) * per; i++) {
                if (a < 0 || ranks_before(choice[i], i, choice[a], a)) {
                    b = a;
                    a = i;
                } else if (b < 0 || ranks_before(choice[i], i, choice[b], b)) {
                    b = i;
                }
            }
            gs[g] = b < 0 ? choice[a] : choice[a] + choice[b];
            gt[g] = 0;
        }
        __syncwarp();
        for (int r = 0; r < top_groups; r++) {
            const int g = warp_best(gs, gt, groups);
            if (lane == 0 && g >= 0) gt[g] = 1;
            __syncwarp();
        }
        for (int e = lane; e < experts; e += 32)
            if (!gt[e / per]) choice[e] = -INFINITY;
        __syncwarp();
    }
    unsigned* out_ids = ids + (size_t)t * k;
    float* out_w = weights + (size_t)t * k;
    for (int r = 0; r < k; r++) {
        const int e = warp_best(choice, taken, experts);
        if (lane == 0) {
            taken[e] = 1;
            out_ids[r] = (unsigned)e;
            out_w[r] = score[e];
        }
        __syncwarp();
    }
    if (lane == 0) {
        if (norm) {
            float sum = 0.0f;
            for (int r = 0; r < k; r++) sum += out_w[r];
            sum += 1e-20f;
            for (int r = 0; r < k; r++) out_w[r] /= sum;
        }
        for (int r = 0; r < k; r++) out_w[r] *= scaling;
    }
}

// Pairs (token, slot) handled per pass of a warp; more pairs per expert take
// more passes over the (then cached) weight row.
#define MOE_PASS 8
#define MOE_WARPS 8
#define MOE_MAX_PAIRS 1024
#define MOE_UNROLL 4

// The pairs routed to the expert of pair blockIdx.x, into s_pairs (in
// ascending order); 0 when an earlier pair has the same expert (that
// CTA serves them all), so each touched expert is served exactly once.
__device__ int pairs_of_my_expert(const unsigned* ids, int pairs, int* s_pairs, unsigned* expert) {
    __shared__ int s_count;
    __shared__ int s_dup;
    const unsigned e = ids[blockIdx.x];
    if (threadIdx.x == 0) {
        s_count = 0;
        s_dup = 0;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x)
        if (ids[p] == e && p < (int)blockIdx.x) s_dup = 1;
    __syncthreads();
    if (s_dup) return 0;
    // Ascending order, one warp: ballots over chunks of 32 pairs.
    if (threadIdx.x < 32) {
        int count = 0;
        for (int base = 0; base < pairs; base += 32) {
            const int p = base + threadIdx.x;
            const bool mine = p < pairs && ids[p] == e;
            const unsigned ballot = __ballot_sync(0xffffffff, mine);
            if (mine) s_pairs[count + __popc(ballot & ((1u << threadIdx.x) - 1))] = p;
            count += __popc(ballot);
        }
        if (threadIdx.x == 0) s_count = count;
    }
    __syncthreads();
    *expert = e;
    return s_count;
}

// act[p, r] = bf16(silu(x[t_p] . gate_e[r]) * (x[t_p] . up_e[r])) for the
// pairs p of one expert e, t_p = p / k. x: bf16 [n, h]; the expert's gate
// and up: bf16 [inter, h] at gate_ptrs[e], up_ptrs[e]. Grid: (pairs,
// ceil(inter / MOE_WARPS)), 256 threads; a warp per weight row. h % 8 == 0.
extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)
    moe_gate_up_grouped(const __nv_bfloat16* __restrict__ x, const unsigned* __restrict__ ids, int pairs, int k,
                        const unsigned long long* __restrict__ gate_ptrs, const unsigned long long* __restrict__ up_ptrs,
                        __nv_bfloat16* __restrict__ act, int h, int inter) {
    __shared__ int s_pairs[MOE_MAX_PAIRS];
    unsigned e;
    const int count = pairs_of_my_expert(ids, pairs, s_pairs, &e);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.y * MOE_WARPS + warp;
    if (count == 0 || r >= inter) return;
    const __nv_bfloat16* wg = reinterpret_cast<const __nv_bfloat16*>(gate_ptrs[e]) + (size_t)r * h;
    const __nv_bfloat16* wu = reinterpret_cast<const __nv_bfloat16*>(up_ptrs[e]) + (size_t)r * h;
    for (int first = 0; first < count; first += MOE_PASS) {
        const int m = min(MOE_PASS, count - first);
        float g[MOE_PASS], u[MOE_PASS];
#pragma unroll
        for (int q = 0; q < MOE_PASS; q++) g[q] = u[q] = 0.0f;
        // MOE_UNROLL chunks of 8 per lane in flight before any is used.
        for (int base = lane * 8; base < h; base += 32 * 8 * MOE_UNROLL) {
            uint4 vg[MOE_UNROLL], vu[MOE_UNROLL];
#pragma unroll
            for (int j = 0; j < MOE_UNROLL; j++) {
                const int c = base + j * 32 * 8;
                vg[j] = c < h ? __ldcs(reinterpret_cast<const uint4*>(wg + c)) : make_uint4(0, 0, 0, 0);
                vu[j] = c < h ? __ldcs(reinterpret_cast<const uint4*>(wu + c)) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int j = 0; j < MOE_UNROLL; j++) {
                const int c = base + j * 32 * 8;
                if (c >= h) break;
                float fg[8], fu[8];
                bf16x8_to_f32(vg[j], fg);
                bf16x8_to_f32(vu[j], fu);
#pragma unroll
                for (int q = 0; q < MOE_PASS; q++) {
                    if (q >= m) break;
                    float fx[8];
                    bf16x8_to_f32(*reinterpret_cast<const uint4*>(x + (size_t)(s_pairs[first + q] / k) * h + c), fx);
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        g[q] = fmaf(fx[i], fg[i], g[q]);
                        u[q] = fmaf(fx[i], fu[i], u[q]);
                    }
                }
            }
        }
#pragma unroll
        for (int q = 0; q < MOE_PASS; q++) {
            if (q >= m) break;
            float gv = g[q], uv = u[q];
            for (int o = 16; o > 0; o >>= 1) {
                gv += __shfl_xor_sync(0xffffffff, gv, o);
                uv += __shfl_xor_sync(0xffffffff, uv, o);
            }
            if (lane == 0)
                act[(size_t)s_pairs[first + q] * inter + r] = __float2bfloat16_rn(gv / (1.0f + expf(-gv)) * uv);
        }
    }
}

// y[p, r] = act[p] . down_e[r] for the pairs p of one expert e. act: bf16
// [pairs, inter]; down: bf16 [h, inter] at down_ptrs[e]; y: f32 [pairs, h].
// Grid: (pairs, ceil(h / MOE_WARPS)), 256 threads. inter % 8 == 0.
extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)
    moe_down_grouped(const __nv_bfloat16* __restrict__ act, const unsigned* __restrict__ ids, int pairs,
                     const unsigned long long* __restrict__ down_ptrs, float* __restrict__ y, int h, int inter) {
    __shared__ int s_pairs[MOE_MAX_PAIRS];
    unsigned e;
    const int count = pairs_of_my_expert(ids, pairs, s_pairs, &e);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.y * MOE_WARPS + warp;
    if (count == 0 || r >= h) return;
    const __nv_bfloat16* wd = reinterpret_cast<const __nv_bfloat16*>(down_ptrs[e]) + (size_t)r * inter;
    for (int first = 0; first < count; first += MOE_PASS) {
        const int m = min(MOE_PASS, count - first);
        float acc[MOE_PASS];
#pragma unroll
        for (int q = 0; q < MOE_PASS; q++) acc[q] = 0.0f;
        for (int base = lane * 8; base < inter; base += 32 * 8 * MOE_UNROLL) {
            uint4 vw[MOE_UNROLL];
#pragma unroll
            for (int j = 0; j < MOE_UNROLL; j++) {
                const int c = base + j * 32 * 8;
                vw[j] = c < inter ? __ldcs(reinterpret_cast<const uint4*>(wd + c)) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int j = 0; j < MOE_UNROLL; j++) {
                const int c = base + j * 32 * 8;
                if (c >= inter) break;
                float fw[8];
                bf16x8_to_f32(vw[j], fw);
#pragma unroll
                for (int q = 0; q < MOE_PASS; q++) {
                    if (q >= m) break;
                    float fa[8];
                    bf16x8_to_f32(*reinterpret_cast<const uint4*>(act + (size_t)s_pairs[first + q] * inter + c), fa);
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[q] = fmaf(fa[i], fw[i], acc[q]);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < MOE_PASS; q++) {
            if (q >= m) break;
            float v = acc[q];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
            if (lane == 0) y[(size_t)s_pairs[first + q] * h + r] = v;
        }
    }
}

// out[t, c] += base[t, c] + sum_j w[t, j] * y[t * k + j, c], slots in order
// (base: the shared expert's output; out: the residual stream).
extern "C" __global__ void moe_combine_f32(float* __restrict__ out, const float* __restrict__ base,
                                           const float* __restrict__ y, const float* __restrict__ w, long long n,
                                           int k, int h) {
    FOR_EACH(i, n * h) {
        const long long t = i / h, c = i % h;
        float acc = base[i];
        for (int j = 0; j < k; j++) acc += w[t * k + j] * y[(t * k + j) * h + c];
        out[i] += acc;
    }
}
