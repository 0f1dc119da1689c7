//! The `asynctls` binary end to end: `generate --json` reproduces HF's greedy
//! tokens on the golden fixtures with dense and with tls attention, and bad
//! input gives one clear line and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

use asynctls_models::Weights;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../asynctls-models/tests/fixtures")
        .join(name)
}

fn asynctls(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_asynctls"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// The document of a successful `generate --json` and its `generated_ids`.
fn generate_json(out: &std::process::Output) -> (serde_json::Value, Vec<u32>) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = doc["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    (doc, ids)
}

fn ids(w: &Weights, name: &str) -> Vec<u32> {
    w.get_ints(name).unwrap().into_iter().map(|x| x as u32).collect()
}

#[test]
fn generate_json_reproduces_hf_greedy_tokens() {
    for name in [
        "qwen3-tiny",
        "qwen2-bias",
        "llama-mha",
        "glm-tiny-grouped",
        "glm-tiny-plain",
    ] {
        let dir = fixture(name);
        let golden = Weights::open_file(&dir.join("golden.safetensors")).unwrap();
        let prompt: Vec<String> = ids(&golden, "input_ids_1").iter().map(|t| t.to_string()).collect();
        let want = ids(&golden, "greedy_1");
        let prompt = prompt.join(",");
        // The last case runs tls over the offloaded storage (host tier plus
        // 8 resident units per layer): the same tokens.
        for attention in [
            vec!["--attention", "dense"],
            vec!["--attention", "tls"],
            vec!["--attention", "tls", "--offload-slots", "8", "--dense-layers", "0"],
        ] {
            let mut args = vec![
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt-ids",
                &prompt,
                "--max-new-tokens",
                "12",
                "--greedy",
                "--json",
                "--device",
                "cpu",
                "--budget",
                "4096",
                "--dense-below",
                "0",
            ];
            args.extend(&attention);
            let out = asynctls(&args);
            let (doc, got) = generate_json(&out);
            assert_eq!(got, want, "{name} {attention:?}");
            assert_eq!(doc["prompt_ids"].as_array().unwrap().len(), prompt.split(',').count());
            assert!(doc["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
            if attention.len() > 2 {
                let reads = &doc["offload"];
                let (hits, misses) = (reads["hits"].as_u64().unwrap(), reads["misses"].as_u64().unwrap());
                assert!(hits > 0 && hits + misses > 0, "{name}: offload reads {reads}");
            }
        }
    }
}

#[test]
fn bad_input_is_one_clear_line() {
    let dir = fixture("qwen3-tiny");
    let dir = dir.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["generate", "--model", "/nonexistent", "--prompt-ids", "1"],
            "model directory /nonexistent not found",
        ),
        (vec!["generate", "--model", dir, "--prompt", "hi"], "no tokenizer.json"),
        (
            vec![
                "generate",
                "--model",
                dir,
                "--prompt-ids",
                "1,2",
                "--max-new-tokens",
                "1000",
            ],
            "beyond the model's context of 256",
        ),
        (
            vec!["generate", "--model", dir, "--prompt-ids", "999"],
            "token id 999 is outside the vocabulary",
        ),
        (vec!["generate", "--model", dir], "give a prompt"),
        // A KV pool larger than the machine: refused when sized, before the
        // allocation (which would abort the process).
        (
            vec!["serve", "--model-shape", "smollm2-135m", "--kv-blocks", "1000000000"],
            "the host KV pool does not fit",
        ),
        (
            vec![
                "generate",
                "--model",
                dir,
                "--prompt-ids",
                "1",
                "--offload-slots",
                "4",
                "--offload-predictor",
                "one-step-lag",
            ],
            "configure an offloaded cache on a GPU",
        ),
        (
            vec![
                "bench",
                "e2e",
                "--model",
                dir,
                "--offload",
                "--offload-max-promote",
                "8",
            ],
            "configure an offloaded cache on a GPU",
        ),
        (
            vec!["generate", "--model", dir, "--prompt-ids", "1", "--temperature", "nan"],
            "--temperature NaN must be a finite number",
        ),
        (
            vec!["generate", "--model", dir, "--prompt-ids", "1", "--temperature=-1"],
            "--temperature -1 must be a finite number",
        ),
        (
            vec!["generate", "--model", dir, "--prompt-ids", "1", "--temperature", "inf"],
            "must be a finite number",
        ),
        (
            vec!["generate", "--model", dir, "--prompt-ids", "1", "--top-p", "0"],
            "--top-p 0 must be in (0, 1]",
        ),
        (
            vec!["generate", "--model", dir, "--prompt-ids", "1", "--top-p", "1.5"],
            "--top-p 1.5 must be in (0, 1]",
        ),
        (
            // Near usize::MAX: must not wrap past the context check.
            vec![
                "generate",
                "--model",
                dir,
                "--prompt-ids",
                "1,2",
                "--max-new-tokens",
                "18446744073709551615",
            ],
            "beyond the model's context of 256",
        ),
    ];
    for (mut args, want) in cases {
        // Pinned to the CPU: the same answers on a machine with a GPU.
        args.extend(["--device", "cpu"]);
        let out = asynctls(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // A prompt file that is not UTF-8.
    let bad = std::env::temp_dir().join(format!("asynctls-bad-prompt-{}", std::process::id()));
    std::fs::write(&bad, [0x66, 0x6f, 0xff, 0xfe]).unwrap();
    let out = asynctls(&["generate", "--model", dir, "--prompt-file", bad.to_str().unwrap()]);
    std::fs::remove_file(&bad).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not valid UTF-8"), "{err}");
    // --device auto without a GPU runs on the CPU and says so; --device
    // cuda without one is one clear line.
    if !asynctls_kernels::cuda_driver_present() {
        for cmd in [
            &["generate", "--model", dir, "--prompt-ids", "1"][..],
            &["bench", "e2e", "--ctx", "64"][..],
        ] {
            let mut args = cmd.to_vec();
            args.extend(["--device", "cuda"]);
            let out = asynctls(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("no CUDA driver found"),
                "{args:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
        let out = asynctls(&[
            "generate",
            "--model",
            dir,
            "--device",
            "auto",
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "1",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.contains("--device auto picked cpu"),
            "{err}"
        );
    } else {
        println!("skipped the --device auto fallback: a CUDA driver is present");
    }
    // A huge --offload-slots is clamped to the pool's units, not allocated.
    let out = asynctls(&[
        "generate",
        "--model",
        dir,
        "--device",
        "cpu",
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "2",
        "--offload-slots",
        "18446744073709551615",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "huge --offload-slots: {err}");
    // A prompt file above the size cap is refused before it is read.
    let big = std::env::temp_dir().join(format!("asynctls-big-prompt-{}", std::process::id()));
    std::fs::write(&big, "word ".repeat(400)).unwrap();
    let args = [
        "generate",
        "--model",
        dir,
        "--device",
        "cpu",
        "--prompt-file",
        big.to_str().unwrap(),
        "--max-prompt-bytes",
        "100",
    ];
    let out = asynctls(&args);
    std::fs::remove_file(&big).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("more than --max-prompt-bytes 100"),
        "{err}"
    );
}

#[test]
fn bench_attn_json_is_one_document() {
    let out = asynctls(&[
        "bench",
        "attn",
        "--device",
        "cpu",
        "--ctx",
        "1024",
        "--budget",
        "128",
        "--q-heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "64",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = doc["reports"][0]["rows"].as_array().unwrap();
    // dense + tls, quest, ds at one budget.
    assert_eq!(rows.len(), 4);
    for row in rows {
        let recall = row["recall"].as_f64().unwrap();
        assert!((0.0..=1.0 + 1e-5).contains(&recall), "{recall}");
        assert!(row["bytes_total"].as_u64().unwrap() <= row["dense_bytes"].as_u64().unwrap());
    }
}

#[test]
fn bench_e2e_runs_the_engine_path_on_the_cpu() {
    // A checkpoint directory, several batches and two budgets: every row
    // decodes forks of the same sequences through the library's engine path.
    let dir = fixture("qwen3-tiny");
    let out = asynctls(&[
        "bench",
        "e2e",
        "--device",
        "cpu",
        "--model",
        dir.to_str().unwrap(),
        "--ctx",
        "40",
        "--batch",
        "1,3",
        "--budget",
        "16,32",
        "--dense-layers",
        "0",
        "--decode-tokens",
        "3",
        "--prefill-tokens",
        "24",
        "--prefill-chunk",
        "7",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["prefill"]["tokens"], 24);
    let rows = doc["rows"].as_array().unwrap();
    // (dense + tls at 2 budgets) x 2 batches.
    assert_eq!(rows.len(), 6, "{rows:?}");
    for r in rows {
        assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["floor_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["cuda_graphs"], false, "{r}");
    }
    assert!(doc["skipped"].as_array().unwrap().is_empty(), "{doc}");
}

#[test]
fn bench_e2e_offloaded_runs_the_sparse_rows_and_reports_the_residency() {
    // The K/V in the host tier behind the offload engine (the CPU twin of
    // the GPU path): tls rows carry the residency, dense is skipped with a reason.
    let dir = fixture("qwen3-tiny");
    let offloaded = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "bench",
            "e2e",
            "--device",
            "cpu",
            "--model",
            dir.to_str().unwrap(),
            "--ctx",
            "200",
            "--batch",
            "2",
            "--budget",
            "16",
            "--block-topk",
            "1",
            "--dense-layers",
            "0",
            "--decode-tokens",
            "3",
            "--prefill-tokens",
            "0",
            "--offload",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = asynctls(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let doc = offloaded(&[]);
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let offload = &rows[0]["offload"];
    let (resident, host) = (
        offload["resident_reads"].as_u64().unwrap(),
        offload["host_reads"].as_u64().unwrap(),
    );
    assert!(resident + host > 0, "{offload}");
    assert!(
        (0.0..=1.0).contains(&offload["hit_rate"].as_f64().unwrap()),
        "{offload}"
    );
    let skipped = doc["skipped"].as_array().unwrap();
    assert!(
        skipped.len() == 1 && skipped[0].as_str().unwrap().contains("dense"),
        "{skipped:?}"
    );
    // One of the two sequences in a resident tier beside the offloaded
    // cache; the other's reads are counted.
    let doc = offloaded(&["--policies", "tls", "--offload-resident-batch", "1"]);
    let reads = &doc["rows"][0]["offload"];
    assert_eq!(reads["resident_batch"], 1, "{doc}");
    assert!(reads["resident_reads"].as_u64().unwrap() + reads["host_reads"].as_u64().unwrap() > 0);
    let bad = asynctls(&["bench", "e2e", "--device", "cpu", "--offload", "--offload-slack", "0.5"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--offload-slack"));
}

#[test]
fn generate_over_two_tensor_parallel_ranks_gives_hf_greedy_tokens() {
    for name in ["qwen3-tiny", "qwen2-bias", "llama-mha"] {
        let dir = fixture(name);
        let golden = Weights::open_file(&dir.join("golden.safetensors")).unwrap();
        let prompt: Vec<String> = ids(&golden, "input_ids_1").iter().map(|t| t.to_string()).collect();
        let want = ids(&golden, "greedy_1");
        let prompt = prompt.join(",");
        for attention in ["dense", "tls"] {
            let out = asynctls(&[
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt-ids",
                &prompt,
                "--max-new-tokens",
                "12",
                "--greedy",
                "--json",
                "--device",
                "cpu",
                "--attention",
                attention,
                "--dense-below",
                "0",
                "--tensor-parallel",
                "2",
            ]);
            let (_, got) = generate_json(&out);
            assert_eq!(got, want, "{name} {attention} over 2 ranks");
        }
    }
    // What it cannot split is refused, saying why.
    for (name, ranks, says) in [
        ("qwen3-tiny", "3", "divide"),
        ("glm-tiny-grouped", "2", "GLM"),
        ("qwen3-tiny", "0", "at least 1"),
    ] {
        let out = asynctls(&[
            "generate",
            "--model",
            fixture(name).to_str().unwrap(),
            "--prompt-ids",
            "1,2,3",
            "--device",
            "cpu",
            "--tensor-parallel",
            ranks,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{name} x{ranks}: {err}");
    }
}
