//! Dequantization of the GGML block formats found in GGUF files.
//!
//! Each format packs a block of weights (32, or 256 for the K-quants) with
//! f16 scales; these functions expand whole blocks to f32, following the
//! layouts of ggml's reference (`dequantize_row_*`).

use half::{bf16, f16};

/// The tensor element types this reader understands (GGML type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// The type for a GGML type id, or `None` when unsupported.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes holding `n` elements, or `None` when `n` is not whole blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (per, bytes) = self.block();
        // Checked: `n` comes from a file's header.
        if n % per == 0 {
            (n / per).checked_mul(bytes)
        } else {
            None
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (
            ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4)) as f32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32,
        )
    }
}

/// Expands `data` (whole blocks of `ty`) into `out` (`out.len()` elements).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (per, bytes) = ty.block();
    debug_assert_eq!(data.len(), out.len() / per * bytes);
    for (block, y) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(per)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
            GgmlType::F16 => y[0] = f16_at(block, 0),
            GgmlType::BF16 => y[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32(),
            GgmlType::Q4_0 => {
                let d = f16_at(block, 0);
                for j in 0..16 {
                    let q = block[2 + j];
                    y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                for j in 0..16 {
                    let q = block[4 + j];
                    y[j] = (q & 0x0f) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 => {
                let d = f16_at(block, 0);
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                for j in 0..16 {
                    let q = block[6 + j];
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((q & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
                }
            }
            GgmlType::Q8_0 => {
                let d = f16_at(block, 0);
                for j in 0..32 {
                    y[j] = block[2 + j] as i8 as f32 * d;
                }
            }
            GgmlType::Q4K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let scales = &block[4..16];
                let qs = &block[16..144];
                for (chunk, pair) in (0..4).map(|c| (c, &qs[c * 32..c * 32 + 32])) {
                    let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                    let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                    for l in 0..32 {
                        y[chunk * 64 + l] = d * sc1 * (pair[l] & 0x0f) as f32 - dmin * m1;
                        y[chunk * 64 + 32 + l] = d * sc2 * (pair[l] >> 4) as f32 - dmin * m2;
                    }
                }
            }
            GgmlType::Q5K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let scales = &block[4..16];
                let qh = &block[16..48];
                let ql = &block[48..176];
                for chunk in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                    let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                    let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
                    let q = &ql[chunk * 32..chunk * 32 + 32];
                    for l in 0..32 {
                        let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        y[chunk * 64 + l] = d * sc1 * ((q[l] & 0x0f) + h1) as f32 - dmin * m1;
                        y[chunk * 64 + 32 + l] = d * sc2 * ((q[l] >> 4) + h2) as f32 - dmin * m2;
                    }
                }
            }
            GgmlType::Q6K => {
                let ql = &block[0..128];
                let qh = &block[128..192];
                let sc = &block[192..208];
                let d = f16_at(block, 208);
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &sc[half * 8..]);
                    let y = &mut y[half * 128..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}
