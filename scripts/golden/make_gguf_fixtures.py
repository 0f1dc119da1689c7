"""GGUF dequantization fixtures, checked by an independent implementation.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf==0.17.1 numpy==2.4.6
    /tmp/gguf-venv/bin/python scripts/golden/make_gguf_fixtures.py asynctls-models/tests/fixtures/quants.gguf

For every supported type it writes random raw blocks (with sane f16 scale
fields) as tensor `<type>` and what the `gguf` package's dequantize makes of
them as the f32 tensor `<type>.expected`. The Rust test dequantizes `<type>`
and compares.
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# type -> byte offsets of the f16 scale fields inside a block
SCALES = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
ROWS, COLS = 2, 512

rng = np.random.default_rng(20261128)
writer = GGUFWriter(sys.argv[1], "llama")
writer.add_name("asynctls quant fixtures")
for ty in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]:
    block, size = GGML_QUANT_SIZES[ty]
    n_blocks = ROWS * COLS // block
    if ty in SCALES:
        raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
        for off in SCALES[ty]:
            scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
            raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    elif ty == T.F32:
        raw = rng.standard_normal(ROWS * COLS).astype(np.float32).view(np.uint8)
    elif ty == T.F16:
        raw = rng.standard_normal(ROWS * COLS).astype(np.float16).view(np.uint8)
    else:  # BF16: the upper halves of f32 values
        f = rng.standard_normal(ROWS * COLS).astype(np.float32).view(np.uint32)
        raw = (f >> 16).astype(np.uint16).view(np.uint8)
    raw = raw.reshape(ROWS, -1)
    expected = dequantize(raw, ty).astype(np.float32).reshape(ROWS, COLS)
    writer.add_tensor(ty.name, raw, raw_dtype=ty)
    writer.add_tensor(ty.name + ".expected", expected)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
