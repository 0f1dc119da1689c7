// Eight bf16 values packed in a 16-byte word, widened to f32 (a bf16 is the
// high half of an f32): the weight loads of the GEMV and the MoE experts.
#pragma once

#include <stdint.h>

__device__ __forceinline__ void bf16x8_to_f32(uint4 v, float* f) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(words[i] << 16);
        f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}
