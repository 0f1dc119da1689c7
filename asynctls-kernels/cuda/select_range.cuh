// The forced and rankable logical blocks of a sequence, shared by the
// selection kernels (sparse_select.cu) and the offload resolver (gather.cu),
// so both agree on which blocks a step attends. CPU twin:
// asynctls-attn's `rankable_blocks`.
#pragma once

// The rankable (not forced) logical blocks of a sequence of `len` tokens are
// [first, last): after the sink, before the local window and partial block.
__device__ __forceinline__ void rankable_range(int len, int block_size, int sink_blocks, int local_blocks, int* first,
                                               int* last) {
    const int num_blocks = (len + block_size - 1) / block_size;
    const int partial = len % block_size != 0;
    const int sink = min(sink_blocks, num_blocks);
    *first = sink;
    *last = max(num_blocks - local_blocks - partial, sink);
}
