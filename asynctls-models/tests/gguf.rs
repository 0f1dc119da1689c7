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
