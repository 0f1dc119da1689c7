//! Mutation fuzzing of every parser of untrusted model files, on stable Rust
//! (libFuzzer's `cargo fuzz` needs a nightly toolchain this project cannot
//! fetch). Each target starts from valid seeds (the committed fixtures,
//! `tests/fixtures/`, made by the scripts under `scripts/golden/`) and
//! mutates them structurally (byte flips, splices, truncations; JSON values
//! replaced by extreme numbers, wrong types and huge strings; chat templates
//! assembled from Jinja fragments). A target passes when no input panics,
//! aborts or runs without bound: errors are the expected answer.
//!
//! CI runs a bounded number of cases per target; a long run sets
//! `FUZZ_CASES` (e.g. `FUZZ_CASES=20000 cargo test --release -p
//! asynctls-models --test fuzz`).

use std::path::{Path, PathBuf};

use asynctls_models::gguf::{import_gguf, Gguf};
use asynctls_models::{load_model, render_chat_template, ChatMessage, GlmConfig, GqaConfig, Weights};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("asynctls-fuzz-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Byte-level mutations of a seed: flips, overwrites with boundary values,
/// splices of a region elsewhere, truncation. `hot` bytes (a header) are
/// mutated more often than the rest.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Put(usize, u64),
    Splice(usize, usize, usize),
    Truncate(usize),
}

fn mutation(hot: usize) -> impl Strategy<Value = Mutation> {
    let at = prop_oneof![3 => 0..hot.max(1), 1 => 0..usize::MAX / 2];
    prop_oneof![
        (at.clone(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            at.clone(),
            prop::sample::select(vec![
                0u64,
                1,
                2,
                0xff,
                0xffff,
                0xffff_ffff,
                1 << 31,
                1 << 40,
                u64::MAX,
                u64::MAX / 2
            ])
        )
            .prop_map(|(i, v)| Mutation::Put(i, v)),
        (at.clone(), at.clone(), 1usize..64).prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
        at.prop_map(Mutation::Truncate),
    ]
}

fn apply(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in mutations {
        let len = b.len().max(1);
        match *m {
            Mutation::Flip(i, x) => {
                if !b.is_empty() {
                    b[i % len] ^= x;
                }
            }
            Mutation::Put(i, v) => {
                let i = i % len;
                for (k, byte) in v.to_le_bytes().iter().enumerate() {
                    if let Some(slot) = b.get_mut(i + k) {
                        *slot = *byte;
                    }
                }
            }
            Mutation::Splice(from, to, n) => {
                let (from, to) = (from % len, to % len);
                let chunk: Vec<u8> = b.iter().skip(from).take(n).copied().collect();
                for (k, byte) in chunk.into_iter().enumerate() {
                    if let Some(slot) = b.get_mut(to + k) {
                        *slot = byte;
                    }
                }
            }
            Mutation::Truncate(n) => b.truncate(n % len),
        }
    }
    b
}

#[test]
fn gguf_reader_and_import_survive_mutated_files() {
    let seed = std::fs::read(fixture("quants.gguf")).unwrap();
    let dir = scratch("gguf");
    let file = dir.join("m.gguf");
    // The header, metadata and tensor directory take the first few KB.
    let strategy = prop::collection::vec(mutation(4096), 1..6);
    runner()
        .run(&strategy, |ms| {
            std::fs::write(&file, apply(&seed, &ms)).unwrap();
            if let Ok(g) = Gguf::open(&file) {
                for info in g.tensors.iter().take(4) {
                    let _ = g.dequantize(info);
                }
                let out = dir.join("out");
                let _ = import_gguf(&g, &out, |_, _| {});
                let _ = std::fs::remove_dir_all(&out);
            }
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn safetensors_headers_and_indexes_survive_mutation() {
    let seed = std::fs::read(fixture("qwen3-tiny").join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let dir = scratch("st");
    let file = dir.join("model.safetensors");
    let strategy = prop::collection::vec(mutation(header), 1..6);
    runner()
        .run(&strategy, |ms| {
            std::fs::write(&file, apply(&seed, &ms)).unwrap();
            if let Ok(w) = Weights::open_file(&file) {
                for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
                    if let Ok(shape) = w.shape(name) {
                        let _ = w.get(name, &shape);
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    // Shard indexes: arbitrary JSON where the weight map should be.
    let index_dir = scratch("index");
    let strategy = prop::collection::vec((any::<String>(), json_value()), 0..4);
    runner()
        .run(&strategy, |entries| {
            let map: serde_json::Map<String, serde_json::Value> = entries.into_iter().collect();
            let doc = serde_json::json!({ "weight_map": map });
            std::fs::write(index_dir.join("model.safetensors.index.json"), doc.to_string()).unwrap();
            let _ = Weights::open(&index_dir);
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&index_dir).unwrap();
}

/// JSON values that stress a config: extremes, wrong types, nesting.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(u64::MAX),
            json!(1u64 << 31),
            json!(1u64 << 40),
            json!(i64::MIN),
            json!(0.0),
            json!(-0.5),
            json!(1e300),
            json!(1e-300),
            json!(null),
            json!(true),
            json!("silu"),
            json!("yarn"),
            json!([]),
            json!({}),
            json!([1, 2, 3]),
            json!({"rope_type": "yarn", "factor": 0.0}),
            json!({"rope_type": "llama3", "factor": -1.0, "low_freq_factor": 0.0}),
        ]),
        any::<i64>().prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| serde_json::Number::from_f64(v).map_or(json!(null), serde_json::Value::Number)),
        "[a-z_]{0,12}".prop_map(|s| json!(s)),
    ]
}

#[test]
fn configs_with_mutated_fields_never_panic() {
    for name in ["qwen3-tiny", "qwen2-gpu", "llama-mha", "glm-tiny-grouped"] {
        let seed_dir = fixture(name);
        let text = std::fs::read_to_string(seed_dir.join("config.json")).unwrap();
        let base: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
        let dir = scratch(&format!("cfg-{name}"));
        for entry in std::fs::read_dir(&seed_dir).unwrap().flatten() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let strategy = prop::collection::vec((prop::sample::select(keys.clone()), json_value()), 1..4);
        runner()
            .run(&strategy, |edits| {
                let mut v = base.clone();
                for (k, value) in edits {
                    v[&k] = value;
                }
                let text = v.to_string();
                let path = dir.join("config.json");
                std::fs::write(&path, &text).unwrap();
                let _ = GqaConfig::from_json(&path, &text);
                let _ = GlmConfig::from_json(&path, &text);
                // A config that parses must load or fail cleanly against the
                // fixture's weights (sizes that imply huge allocations are
                // refused before allocating).
                let _ = load_model(&dir);
                Ok(())
            })
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Chat templates assembled from Jinja fragments, including unbalanced ones,
/// deep nesting and loops over large ranges.
fn template() -> impl Strategy<Value = String> {
    let fragment = prop::sample::select(vec![
        "{% for m in messages %}",
        "{% for i in range(100000) %}",
        "{% for i in range(1000000000) %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}",
        "{% else %}",
        "{% endif %}",
        "{{ m.content }}",
        "{{ m['role'] | upper }}",
        "{{ messages | length }}",
        "{{ raise_exception('no') }}",
        "{{ bos_token ~ eos_token }}",
        "{% set x = x ~ x %}",
        "{{ x }}",
        "{% set x = 'ab' %}",
        "{{ ('a' * 100000) }}",
        "{{ m.content.split(' ') | join('-') }}",
        "{{ m.content.strip() }}",
        "{%- if m.role == 'user' -%}<u>{%- endif -%}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        "{{",
        "}}",
        "{%",
        "text ",
    ]);
    prop::collection::vec(fragment, 0..12).prop_map(|v| v.concat())
}

#[test]
fn chat_templates_render_or_fail_in_bounded_time() {
    let messages = [ChatMessage::user("hello there"), ChatMessage::user("again")];
    runner()
        .run(&template(), |t| {
            let start = std::time::Instant::now();
            let _ = render_chat_template(&t, &messages, true, "<s>", "</s>");
            prop_assert!(
                start.elapsed().as_secs() < 10,
                "template ran {:?}: {t}",
                start.elapsed()
            );
            Ok(())
        })
        .unwrap();
}
