// Sampling the next token of each row of logits: greedy, or temperature with
// top-k and top-p, seeded and deterministic. One CTA of 1024 threads per row.
// The CPU twin is asynctls-kernels/src/cpu/sampling.rs, whose module docs
// state the contract; the two are exact: the same inputs give the same
// token, bit for bit.
//
// Why exact is possible: every float step is one IEEE round-to-nearest
// operation written with the _rn intrinsics (so neither --use_fast_math nor
// FMA contraction changes it), subnormals are flushed explicitly on both
// sides (the PTX is built with -ftz), and exp is our own polynomial (expf
// under --use_fast_math is ex2.approx, which the CPU cannot reproduce). The
// weights are integers (p * 2^40, truncated), so every sum is exact and the
// order of a reduction cannot change it.
//
// The steps of a row:
//   1. argmax (NaN as -inf, first index on ties); greedy rows (temperature
//      <= 0 or subnormal, top_k == 1, or a non-finite max) stop here.
//   2. the CPU ranks tokens by a 50-bit key (logit order bits above
//      2^18 - 1 - index). Here a token's rank is the pair (U, key), U a
//      30-bit fixed point of x = (l - m) / T (inverted so larger is better,
//      0 below exp(-27)). U is monotone in the key, so the pair's order is
//      the key's order and kept sets are {rank >= threshold}; but U's digits
//      spread the tokens over the bins of the radix select, where a logit's
//      top bits (sign and exponent) put nearly all of them in a few.
//   3. top-k: the k-th largest rank, by radix select over 10-bit digits
//      (three of U, five of the key; counts only, no exp).
//   4. top-p: within the top-k set, the shortest best-first prefix whose
//      integer mass reaches max(1, ceil(M_k * floor(top_p * 2^24) / 2^24)),
//      by radix select with (count, mass) histograms.
//   5. r = splitmix64 output for (seed, step), target = (M * r) >> 64; the
//      token is the first index whose inclusive prefix of kept weights
//      exceeds target (per-chunk sums, a scan over them, one chunk rescanned).
// A select stops at the first digit whose bin is settled (by count: all of
// it is kept; by mass: it holds one weighted token), usually after one or two.
// The row's step counter in the parameters is advanced by one after use, so
// a captured CUDA graph draws a fresh step on every replay.
//
// Every pass reads the row in chunks of 128 logits per warp (four per lane,
// one 16-byte load when the row length is a multiple of 4), several chunks
// in flight, and recomputes what it needs from the logits: a row of 152k
// does not fit in shared memory, and recomputing is cheaper than a scratch
// buffer in global memory.

#include <cuda_runtime.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

namespace {

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
constexpr int DIGIT_BITS = 10;
constexpr int BINS = 1 << DIGIT_BITS;  // one bin per thread
constexpr int INDEX_BITS = 18;
constexpr uint32_t MAX_VOCAB = 1u << INDEX_BITS;
constexpr int CHUNK = 128;  // logits per warp step, four per lane
constexpr int MAX_CHUNKS = MAX_VOCAB / CHUNK;
constexpr int CHUNKS_PER_THREAD = MAX_CHUNKS / THREADS;
constexpr int UNROLL = 4;  // chunks a warp has in flight
// Rank digits: U_LEVELS of the 30-bit U, then KEY_LEVELS of the 50-bit key.
constexpr int U_LEVELS = 3;
constexpr int KEY_LEVELS = 5;
constexpr uint32_t U_MAX = (1u << 30) - 1;
constexpr uint32_t NO_BIN = 0xffffffffu;
constexpr uint32_t NO_INDEX = 0xffffffffu;
constexpr float MIN_NORMAL = 1.17549435e-38f;
// exp(x) for x below this is weight 0 (exp(-27) * 2^40 is about 2.07, so
// every x at or above it has a weight of at least 2).
constexpr float MIN_EXPONENT = -27.0f;
constexpr float WEIGHT_SCALE = 1099511627776.0f;  // 2^40
constexpr float FIXED_SCALE = 33554432.0f;         // 2^25: -x * 2^25 < 2^30 on [-27, 0]
constexpr uint64_t TOP_P_ONE = 1ull << 24;         // top_p in 24-bit fixed point

}  // namespace

// One row's knobs, as the Rust `SamplingRow` (repr(C), 32 bytes).
struct SamplingRow {
    float temperature;
    uint32_t top_k;
    float top_p;
    uint32_t pad;
    uint64_t seed;
    uint64_t step;
};
static_assert(sizeof(SamplingRow) == 32, "SamplingRow layout is shared with Rust");

// A rank threshold: tokens with (u, key) >= (u, key) lexicographically are kept.
struct Rank {
    uint32_t u;
    uint64_t key;
};

__device__ __forceinline__ bool is_nan(float v) { return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u; }

__device__ __forceinline__ bool is_finite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

// Subnormals (and -0) to +0; NaN passes. The CPU twin does the same, so the
// result does not depend on whether the hardware flushes.
__device__ __forceinline__ float flush(float v) { return fabsf(v) < MIN_NORMAL ? 0.0f : v; }

// The CPU's sort_key: order-preserving bits of the canonical logit (NaN
// lowest) above 2^18 - 1 - index.
__device__ __forceinline__ uint64_t sort_key(float c, uint32_t i) {
    uint32_t ordered = 0;
    if (!is_nan(c)) {
        const uint32_t u = __float_as_uint(c);
        ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    }
    return ((uint64_t)ordered << INDEX_BITS) | (uint64_t)(MAX_VOCAB - 1 - i);
}

// x = (c - m) / T as the CPU computes it: (c - m) * (1 / T), each result
// flushed. The .ftz forms flush in hardware whatever nvcc's flags (the CPU
// flushes explicitly; a zero's sign does not matter below), and inline PTX
// keeps nvcc from fusing the two into an fma.
__device__ __forceinline__ float exponent(float c, float m, float inv_t) {
    float d, x;
    asm("sub.rn.ftz.f32 %0, %1, %2;" : "=f"(d) : "f"(c), "f"(m));
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(x) : "f"(d), "f"(inv_t));
    return x;
}

// The high part of a rank: 0 below exp(-27) (and for NaN), else
// U_MAX - floor(-x * 2^25), at least 167772159.
__device__ __forceinline__ uint32_t fixed_u(float x) {
    return x >= MIN_EXPONENT ? U_MAX - __float2uint_rz(__fmul_rn(-x, FIXED_SCALE)) : 0;
}

__device__ __forceinline__ bool at_least(float c, uint32_t i, uint32_t u, Rank t) {
    return u > t.u || (u == t.u && sort_key(c, i) >= t.key);
}

__device__ __forceinline__ Rank max_rank(Rank a, Rank b) {
    return (a.u > b.u || (a.u == b.u && a.key >= b.key)) ? a : b;
}

// exp(x) for x in [-27, 0]: Cephes expf (range reduction by ln 2 in two
// parts, degree-5 polynomial), every step one rounded operation so the CPU
// twin reproduces it exactly. Inside this range nothing is subnormal.
__device__ __forceinline__ float exp_det(float x) {
    const float log2e = 1.44269504088896341f;
    const float c1 = 0.693359375f;
    const float c2 = -2.12194440e-4f;
    float kf = rintf(__fmul_rn(x, log2e));
    float r = __fsub_rn(x, __fmul_rn(kf, c1));
    r = __fsub_rn(r, __fmul_rn(kf, c2));
    float z = __fmul_rn(r, r);
    float y = 1.9875691500e-4f;
    y = __fadd_rn(__fmul_rn(y, r), 1.3981999507e-3f);
    y = __fadd_rn(__fmul_rn(y, r), 8.3334519073e-3f);
    y = __fadd_rn(__fmul_rn(y, r), 4.1665795894e-2f);
    y = __fadd_rn(__fmul_rn(y, r), 1.6666665459e-1f);
    y = __fadd_rn(__fmul_rn(y, r), 0.5f);  // Cephes' 5.0000001201e-1, as an f32
    y = __fadd_rn(__fadd_rn(__fmul_rn(y, z), r), 1.0f);
    int k = (int)kf;
    return __fmul_rn(y, __int_as_float((k + 127) << 23));
}

// floor(exp(x) * 2^40), 0 below exp(-27) and for NaN.
__device__ __forceinline__ uint64_t weight(float x) {
    if (!(x >= MIN_EXPONENT)) return 0;
    return __float2ull_rz(__fmul_rn(exp_det(x), WEIGHT_SCALE));
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The uniform 64-bit draw of (seed, step): output `step` of a splitmix64
// stream whose start is the hashed seed (hashing keeps nearby seeds apart).
__device__ __forceinline__ uint64_t draw(uint64_t seed, uint64_t step) {
    return mix64(mix64(seed) + (step + 1) * 0x9e3779b97f4a7c15ull);
}

// Index of a lane's logit j of chunk c: with 16-byte loads the lane's four
// are adjacent, else they are 32 apart (so each load is coalesced).
template <bool VEC>
__device__ __forceinline__ uint32_t index_of(uint32_t c, int lane, int j) {
    return VEC ? c * CHUNK + 4 * lane + j : c * CHUNK + 32 * j + lane;
}

// The lane's four canonical logits of chunk c (NaN past the row's end;
// callers test the index against the vocabulary).
template <bool VEC>
__device__ __forceinline__ void load_chunk(const float* __restrict__ l, uint32_t vocab, uint32_t c, int lane,
                                           float (&v)[4]) {
    if (VEC) {
        const uint32_t i = index_of<VEC>(c, lane, 0);
        float4 q = make_float4(NAN, NAN, NAN, NAN);
        if (i < vocab) q = __ldg(reinterpret_cast<const float4*>(l + i));
        v[0] = flush(q.x);
        v[1] = flush(q.y);
        v[2] = flush(q.z);
        v[3] = flush(q.w);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t i = index_of<VEC>(c, lane, j);
            v[j] = i < vocab ? flush(__ldg(l + i)) : NAN;
        }
    }
}

// Calls f(index, canonical logit, valid) for the lane's four slots of each
// of the warp's chunks (chunk warp, warp + WARPS, ...), UNROLL chunks loaded
// before any is used. The trip count is warp-uniform and f runs on every
// lane (valid false past the row's end), so f may use warp votes.
template <bool VEC, typename F>
__device__ __forceinline__ void for_each_logit(const float* __restrict__ l, uint32_t vocab, uint32_t chunks, F f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (uint32_t c0 = warp; c0 < chunks; c0 += WARPS * UNROLL) {
        float v[UNROLL][4];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) load_chunk<VEC>(l, vocab, c0 + u * WARPS, lane, v[u]);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint32_t c = c0 + u * WARPS;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t i = index_of<VEC>(c, lane, j);
                f(i, v[u][j], c < chunks && i < vocab);
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T n = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

struct Shared {
    uint32_t cnt[BINS];
    // Bin masses as two 32-bit halves: 64-bit shared atomics are CAS loops.
    uint32_t mass_lo[BINS];
    uint32_t mass_hi[BINS];
    uint64_t chunk_mass[MAX_CHUNKS];
    uint64_t tmp[WARPS];
    float best_v[WARPS];
    uint32_t best_i[WARPS];
    uint32_t bin, count, chunk;
    uint64_t need, base;
};

// Inclusive scan of one value per thread over the block; `total` gets the sum.
__device__ __forceinline__ uint64_t block_inclusive_scan(uint64_t v, Shared& sh, uint64_t& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint64_t incl = warp_inclusive_scan(v);
    if (lane == 31) sh.tmp[warp] = incl;
    __syncthreads();
    if (warp == 0) sh.tmp[lane] = warp_inclusive_scan(sh.tmp[lane]);
    __syncthreads();
    incl += warp ? sh.tmp[warp - 1] : 0;
    total = sh.tmp[WARPS - 1];
    __syncthreads();  // tmp is reused by the next scan
    return incl;
}

// Adds one token (count 1, mass w) to `bin` of the histogram; NO_BIN adds
// nothing. Called by the whole warp. When every lane has the same bin (a
// run of equal logits, or no lane matching), one lane adds the warp's sums:
// 32 atomics on one address would serialise.
template <bool BY_MASS>
__device__ __forceinline__ void histogram_add(Shared& sh, uint32_t bin, uint64_t w) {
    const int lane = threadIdx.x & 31;
    const uint32_t bin0 = __shfl_sync(FULL_MASK, bin, 0);
    if (__all_sync(FULL_MASK, bin == bin0)) {
        if (bin0 == NO_BIN) return;
        if (BY_MASS) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(FULL_MASK, w, o);
        }
        if (lane != 0) return;
        atomicAdd(&sh.cnt[bin], 32u);
    } else if (bin == NO_BIN) {
        return;
    } else {
        atomicAdd(&sh.cnt[bin], 1u);
    }
    if (BY_MASS) {
        const uint32_t lo = (uint32_t)w;
        uint32_t hi = (uint32_t)(w >> 32);
        const uint32_t old = atomicAdd(&sh.mass_lo[bin], lo);
        if (old + lo < old) hi += 1;  // the low half wrapped
        if (hi) atomicAdd(&sh.mass_hi[bin], hi);
    }
}

// One level of the radix select: the histogram of the digit at `shift` (of
// U when ON_U, else of the key, U being then fixed to prefix_u) over the
// tokens whose higher digits match the prefix and whose rank is >= lower;
// BY_MASS counts only positive weights and adds their mass.
template <bool VEC, bool BY_MASS, bool ON_U>
__device__ __forceinline__ void histogram_pass(const float* __restrict__ l, uint32_t vocab, uint32_t chunks, float m,
                                               float inv_t, Rank lower, bool has_lower, uint32_t prefix_u,
                                               uint64_t prefix_k, int shift, Shared& sh) {
    for_each_logit<VEC>(l, vocab, chunks, [&](uint32_t i, float c, bool valid) {
        uint32_t bin = NO_BIN;
        uint64_t w = 0;
        const float x = exponent(c, m, inv_t);
        const uint32_t u = fixed_u(x);
        uint32_t digit = NO_BIN;
        if (ON_U) {
            if ((u >> (shift + DIGIT_BITS)) == prefix_u) digit = (u >> shift) & (BINS - 1);
        } else if (u == prefix_u) {
            const uint64_t key = sort_key(c, i);
            if ((key >> (shift + DIGIT_BITS)) == prefix_k) digit = (uint32_t)(key >> shift) & (BINS - 1);
        }
        if (valid && digit != NO_BIN && (!has_lower || at_least(c, i, u, lower))) {
            if (BY_MASS) w = weight(x);
            if (!BY_MASS || w > 0) bin = digit;
        }
        histogram_add<BY_MASS>(sh, bin, w);
    });
}

// Radix select of a threshold among ranks >= `lower`. By count (BY_MASS
// false): the `need`-th largest rank, every token counting. By mass: the
// shortest best-first prefix of the positive-weight tokens whose mass
// reaches max(1, ceil(M * tp / 2^24)), M their total. Never below `lower`.
template <bool VEC, bool BY_MASS>
__device__ Rank radix_select(const float* __restrict__ l, uint32_t vocab, uint32_t chunks, float m, float inv_t,
                             Rank lower, uint64_t need, uint64_t tp, Shared& sh) {
    const int tid = threadIdx.x;
    const bool has_lower = lower.u != 0 || lower.key != 0;
    uint32_t prefix_u = 0;
    uint64_t prefix_k = 0;
    for (int level = 0; level < U_LEVELS + KEY_LEVELS; ++level) {
        const bool on_u = level < U_LEVELS;
        const int shift = on_u ? DIGIT_BITS * (U_LEVELS - 1 - level) : DIGIT_BITS * (U_LEVELS + KEY_LEVELS - 1 - level);
        sh.cnt[tid] = 0;
        if (BY_MASS) {
            sh.mass_lo[tid] = 0;
            sh.mass_hi[tid] = 0;
        }
        __syncthreads();
        if (on_u) {
            histogram_pass<VEC, BY_MASS, true>(l, vocab, chunks, m, inv_t, lower, has_lower, prefix_u, prefix_k,
                                               shift, sh);
        } else {
            histogram_pass<VEC, BY_MASS, false>(l, vocab, chunks, m, inv_t, lower, has_lower, prefix_u, prefix_k,
                                                shift, sh);
        }
        __syncthreads();
        const uint64_t v = BY_MASS ? ((uint64_t)sh.mass_hi[tid] << 32) | sh.mass_lo[tid] : sh.cnt[tid];
        uint64_t total;
        const uint64_t incl = block_inclusive_scan(v, sh, total);
        if (BY_MASS && level == 0) {
            // total is M (>= 2^40: the max has weight 2^40); ceil(M * tp / 2^24) in 128 bits.
            const uint64_t hi = __umul64hi(total, tp << 40);
            const uint64_t lo = total * (tp << 40);
            need = hi + (lo != 0 ? 1 : 0);
            if (need == 0) need = 1;
        }
        // Mass (or count) in bins above this one: total - incl. Exactly one
        // bin holds the need-th unit.
        const uint64_t above = total - incl;
        if (above < need && need <= above + v) {
            sh.bin = tid;
            sh.need = need - above;
            sh.count = sh.cnt[tid];
        }
        __syncthreads();
        if (on_u) {
            prefix_u = (prefix_u << DIGIT_BITS) | sh.bin;
        } else {
            prefix_k = (prefix_k << DIGIT_BITS) | sh.bin;
        }
        need = sh.need;
        // By count: the whole bin is kept. By mass: one weighted token is
        // left, and the set ends with it. Either way the bin's lowest rank
        // is the threshold (zero-weight tokens, U = 0, never share a bin
        // with weighted ones).
        const bool done = BY_MASS ? sh.count == 1 : sh.count == need;
        if (done || level == U_LEVELS + KEY_LEVELS - 1) {
            const Rank t = on_u ? Rank{prefix_u << shift, 0} : Rank{prefix_u, prefix_k << shift};
            return max_rank(t, lower);
        }
    }
    return lower;  // unreachable: the last digit holds one token per bin
}

template <bool VEC>
__device__ void sample_row(const float* __restrict__ l, uint32_t vocab, SamplingRow* __restrict__ params,
                           uint32_t* __restrict__ out, Shared& sh) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t chunks = (vocab + CHUNK - 1) / CHUNK;
    const SamplingRow p = *params;

    // 1. argmax: NaN as -inf, first index on ties.
    float bv = -INFINITY;
    uint32_t bi = NO_INDEX;
    for_each_logit<VEC>(l, vocab, chunks, [&](uint32_t i, float c, bool valid) {
        const float v = is_nan(c) ? -INFINITY : c;
        if (valid && (bi == NO_INDEX || v > bv || (v == bv && i < bi))) {
            bv = v;
            bi = i;
        }
    });
    for (int round = 0; round < 2; ++round) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            const uint32_t oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (oi != NO_INDEX && (bi == NO_INDEX || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        if (round == 0) {
            if (lane == 0) {
                sh.best_v[warp] = bv;
                sh.best_i[warp] = bi;
            }
            __syncthreads();
            bv = sh.best_v[lane];
            bi = sh.best_i[lane];
        }
    }
    // Every warp reduced the same 32 partials: all threads hold the argmax.
    const uint32_t argmax = bi;
    const float m = bv;
    const float t = p.temperature;

    // The CPU's `SamplingParams::is_greedy`, plus rows whose max is infinite
    // (or all -inf / NaN), where weights are undefined.
    if (!(t >= MIN_NORMAL) || p.top_k == 1 || !is_finite(m)) {
        if (tid == 0) {
            *out = argmax;
            params->step = p.step + 1;
        }
        return;
    }
    const float inv_t = flush(__fdiv_rn(1.0f, t));

    // 3. top-k (by rank, step 2): every token counts, weight or not.
    Rank lower = {0, 0};
    if (p.top_k > 0 && p.top_k < vocab) {
        lower = radix_select<VEC, false>(l, vocab, chunks, m, inv_t, lower, p.top_k, 0, sh);
    }

    // 4. top-p within the top-k set.
    const float top_p_scaled = __fmul_rn(p.top_p, (float)TOP_P_ONE);
    const uint64_t tp = top_p_scaled >= (float)TOP_P_ONE ? TOP_P_ONE : __float2ull_rz(top_p_scaled);
    if (tp < TOP_P_ONE) lower = radix_select<VEC, true>(l, vocab, chunks, m, inv_t, lower, 0, tp, sh);

    // 5. draw: the kept mass of every chunk, a scan over the chunks for the
    // one holding the target, and one warp's scan of that chunk.
    for (uint32_t c0 = warp; c0 < chunks; c0 += WARPS * UNROLL) {
        float v[UNROLL][4];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) load_chunk<VEC>(l, vocab, c0 + u * WARPS, lane, v[u]);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint32_t c = c0 + u * WARPS;
            uint64_t s = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t i = index_of<VEC>(c, lane, j);
                const float x = exponent(v[u][j], m, inv_t);
                if (i < vocab && at_least(v[u][j], i, fixed_u(x), lower)) s += weight(x);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
            if (lane == 0 && c < chunks) sh.chunk_mass[c] = s;
        }
    }
    if (tid == 0) sh.chunk = NO_INDEX;
    __syncthreads();
    // Thread t owns chunks [t * CHUNKS_PER_THREAD, (t + 1) * CHUNKS_PER_THREAD).
    uint64_t mine[CHUNKS_PER_THREAD];
    uint64_t own = 0;
#pragma unroll
    for (int q = 0; q < CHUNKS_PER_THREAD; ++q) {
        const uint32_t c = tid * CHUNKS_PER_THREAD + q;
        mine[q] = c < chunks ? sh.chunk_mass[c] : 0;
        own += mine[q];
    }
    uint64_t kept_mass;
    const uint64_t incl = block_inclusive_scan(own, sh, kept_mass);
    const uint64_t target = __umul64hi(kept_mass, draw(p.seed, p.step));
    uint64_t before = incl - own;
    if (own > 0 && before <= target && target < incl) {
#pragma unroll
        for (int q = 0; q < CHUNKS_PER_THREAD; ++q) {
            if (mine[q] > 0 && before <= target && target < before + mine[q]) {
                sh.chunk = tid * CHUNKS_PER_THREAD + q;
                sh.base = before;
            }
            before += mine[q];
        }
    }
    __syncthreads();
    const uint32_t c = sh.chunk;
    if (warp == 0 && c != NO_INDEX) {
        float v[4];
        load_chunk<VEC>(l, vocab, c, lane, v);
        uint64_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t i = index_of<VEC>(c, lane, j);
            w[j] = 0;
            if (i < vocab) {
                const float x = exponent(v[j], m, inv_t);
                if (at_least(v[j], i, fixed_u(x), lower)) w[j] = weight(x);
            }
        }
        uint64_t running = sh.base;
        if (VEC) {
            // Lane order is index order: scan the lanes' sums, then the hit lane's four.
            const uint64_t s = w[0] + w[1] + w[2] + w[3];
            const uint64_t lane_incl = warp_inclusive_scan(s);
            const uint32_t hit = __ballot_sync(FULL_MASK, running + lane_incl > target);
            if (hit && lane == __ffs(hit) - 1) {
                uint64_t r = running + lane_incl - s;
                uint32_t token = index_of<VEC>(c, lane, 3);
                bool found = false;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    r += w[j];
                    if (!found && r > target) {
                        token = index_of<VEC>(c, lane, j);
                        found = true;
                    }
                }
                *out = token;
            }
        } else {
            // Index order is j, then lane: one scan of the lanes per j.
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint64_t lane_incl = warp_inclusive_scan(w[j]);
                const uint32_t hit = __ballot_sync(FULL_MASK, running + lane_incl > target);
                if (hit) {
                    if (lane == __ffs(hit) - 1) *out = index_of<VEC>(c, lane, j);
                    break;
                }
                running += __shfl_sync(FULL_MASK, lane_incl, 31);
            }
        }
    }
    if (tid == 0) {
        // Unreachable with exact sums; keeps the output a valid token regardless.
        if (c == NO_INDEX) *out = argmax;
        params->step = p.step + 1;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    sample_rows_f32(const float* __restrict__ logits, int vocab_i, SamplingRow* __restrict__ params,
                    uint32_t* __restrict__ out) {
    __shared__ Shared sh;
    const uint32_t row = blockIdx.x;
    const uint32_t vocab = (uint32_t)vocab_i;
    const float* l = logits + (size_t)row * vocab;
    // 16-byte loads need a row start on 16 bytes: every row's is when vocab % 4 == 0.
    if (vocab % 4 == 0) {
        sample_row<true>(l, vocab, params + row, out + row, sh);
    } else {
        sample_row<false>(l, vocab, params + row, out + row, sh);
    }
}
