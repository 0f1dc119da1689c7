//! GGUF reading: every quantization type against the `gguf` Python package's
//! dequantization (fixture made by `scripts/golden/make_gguf_fixtures.py`),
//! and clear errors for broken files.

use std::path::{Path, PathBuf};

use asynctls_models::gguf::{Gguf, GgufError};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quants.gguf")
}

#[test]
fn every_type_matches_the_reference_dequantization() {
    let g = Gguf::open(&fixture()).unwrap();
    assert_eq!(g.version, 3);
    let types = [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
    ];
    for ty in types {
        let info = g.tensor(ty).unwrap_or_else(|| panic!("{ty} missing"));
        let expected = g.tensor(&format!("{ty}.expected")).unwrap();
        assert_eq!(info.shape(), vec![2, 512], "{ty}");
        let got = g.dequantize(info);
        let want = g.dequantize(expected);
        let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        assert!(max_err <= 1e-6 * scale.max(1.0), "{ty}: max abs error {max_err}");
        assert!(want.iter().any(|&v| v != 0.0), "{ty}: fixture is all zeros");
    }
}

fn write_tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("asynctls-gguf-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn broken_files_give_clear_errors() {
    let good = std::fs::read(fixture()).unwrap();

    let p = write_tmp("magic", &[b"GGML", &good[4..]].concat());
    let err = Gguf::open(&p).unwrap_err();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    assert!(err.to_string().contains("not a GGUF file"));

    let p = write_tmp("trunc", &good[..200]);
    let err = Gguf::open(&p).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");

    // Cut inside the tensor data: the directory is intact, the data is not.
    let p = write_tmp("data", &good[..good.len() - 100]);
    let err = Gguf::open(&p).unwrap_err();
    assert!(matches!(err, GgufError::OutOfBounds { .. }), "{err}");
    assert!(err.to_string().contains("outside the file"), "{err}");

    // An unknown type id in the first tensor's directory entry: find the
    // entry "F32" (name length 3) and overwrite its type field.
    let mut bytes = good.clone();
    let needle = [3u8, 0, 0, 0, 0, 0, 0, 0, b'F', b'3', b'2'];
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len();
    // n_dims (u32) then two dims (u64 each), then the type (u32).
    let type_at = at + 4 + 16;
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let p = write_tmp("type", &bytes);
    let err = Gguf::open(&p).unwrap_err();
    assert!(matches!(err, GgufError::UnknownType { type_id: 99, .. }), "{err}");

    let err = Gguf::open(Path::new("/nonexistent.gguf")).unwrap_err();
    assert!(err.to_string().contains("cannot open"), "{err}");
}

/// A minimal GGUF v3 file: string and u32 metadata, tensor directory
/// entries of F32 tensors with the given dims (data: zeros for those that fit).
fn tiny_gguf(meta: &[(&str, Meta)], tensors: &[(&str, Vec<u64>)]) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
        }
    }
    let mut offset = 0u64;
    let mut data = 0u64;
    for (name, dims) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(offset.to_le_bytes());
        let n = dims
            .iter()
            .try_fold(4u64, |n, &d| n.checked_mul(d))
            .filter(|&n| n < 1 << 20)
            .unwrap_or(0);
        offset += n.next_multiple_of(32);
        data += n.next_multiple_of(32);
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; data as usize]);
    b
}

enum Meta {
    U32(u32),
    Str(&'static str),
}

#[test]
fn dimensions_whose_product_overflows_are_refused() {
    // 2^40 x 2^40 elements: the product wraps a u64; the byte size must not.
    let bytes = tiny_gguf(
        &[],
        &[
            ("huge", vec![1 << 40, 1 << 40]),
            ("wraps", vec![1 << 33, 1 << 33, 1 << 2]),
        ],
    );
    let p = write_tmp("overflow", &bytes);
    let err = Gguf::open(&p).unwrap_err().to_string();
    assert!(err.contains("overflows"), "{err}");
}

#[test]
fn zero_head_counts_fail_the_import_and_leave_nothing_behind() {
    for (field, heads, kv) in [
        ("head_count", 0u32, 2u32),
        ("head_count_kv", 4, 0),
        ("head_count", 6, 4),
    ] {
        let bytes = tiny_gguf(
            &[
                ("general.architecture", Meta::Str("llama")),
                ("llama.attention.head_count", Meta::U32(heads)),
                ("llama.attention.head_count_kv", Meta::U32(kv)),
                ("llama.embedding_length", Meta::U32(64)),
            ],
            &[("token_embd.weight", vec![64, 8])],
        );
        let p = write_tmp(&format!("heads-{heads}-{kv}"), &bytes);
        let g = Gguf::open(&p).unwrap();
        let out = std::env::temp_dir().join(format!("asynctls-import-{}-{heads}-{kv}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let err = asynctls_models::gguf::import_gguf(&g, &out, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
        assert!(!out.exists(), "a failed import left {} behind", out.display());
        let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .contains(&format!("importing-{}", std::process::id()))
            })
            .collect();
        assert!(leftovers.is_empty(), "staging directories left: {leftovers:?}");
    }
}
