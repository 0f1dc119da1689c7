//! `cargo xtask gpu-pack`: the release test binaries that exercise the GPU,
//! stripped, in `.gpu/` with a `run.sh` that runs them all on the GPU machine
//! (which has no Rust) and prints a summary line last.

use std::path::Path;
use std::process::Command;

use crate::{run, Result};

/// Every (package, integration test) whose file is `<crate>/tests/gpu_*.rs`:
/// found by name, so a new GPU test cannot be left out of the pack.
fn gpu_tests(root: &Path) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(root).map_err(|e| e.to_string())?;
    for entry in entries.flatten() {
        let crate_dir = entry.path();
        let manifest = crate_dir.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let Some(package) = text
            .lines()
            .find_map(|l| l.strip_prefix("name = \"")?.strip_suffix('"').map(String::from))
        else {
            continue;
        };
        let Ok(tests) = std::fs::read_dir(crate_dir.join("tests")) else {
            continue;
        };
        for t in tests.flatten() {
            let name = t.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_prefix("gpu_").and_then(|n| n.strip_suffix(".rs")) {
                found.push((package.clone(), format!("gpu_{stem}")));
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err("no tests/gpu_*.rs found in the workspace".into());
    }
    Ok(found)
}

const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs every GPU test binary in this folder; the last line is the summary.
# TESTS=0 skips the tests (a benchmark-only call, after a passing run).
set -u
cd "$(dirname "$0")"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
passed=0; failed=0; skipped=0
for t in tests/*; do
    [ "${TESTS:-1}" = 0 ] && break
    echo "== $t"
    out=$("$t" --test-threads=1 --nocapture 2>&1); rc=$?
    echo "$out" | grep -A2 -E "^test |skipped|panicked|rel err|error|differ" | grep -v "^--$" || true
    s=$(echo "$out" | grep -c "skipped: no CUDA device" || true)
    # Counts from libtest's summary line (printed output can share a line with "... ok").
    ok=$(echo "$out" | sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed.*/\1/p' | head -1)
    bad=$(echo "$out" | sed -nE 's/^test result: [A-Za-z]+\. [0-9]+ passed; ([0-9]+) failed.*/\1/p' | head -1)
    ok=${ok:-0}; bad=${bad:-0}
    skipped=$((skipped + s)); passed=$((passed + ok - s)); failed=$((failed + bad))
    if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then failed=$((failed + 1)); fi
done
# The benchmarks: BENCH lists which (default "attn offload prefill e2e";
# also e2e-offload, e2e-glm, gemv-ab; "none" skips).
# attn: decode attention, GQA (Qwen3-8B) and MLA (GLM-4.7-Flash), with the
# torch SDPA peer in the same run; offload: GPU-resident vs offloaded decode.
out_dir="${OUT:-/tmp}"
BENCH="${BENCH:-attn offload prefill e2e}"
if [ -x ./asynctls ] && [[ " $BENCH " == *" prefill "* ]]; then
    ./asynctls bench prefill --device cuda --ctx "${PREFILL_CTX:-8192,32768}" --json > "$out_dir/prefill.json" \
        && python3 peers/torch_sdpa.py --prefill --ctx "${PREFILL_CTX:-8192,32768}" --ours "$out_dir/prefill.json" \
            --out "$out_dir/prefill_vs_sdpa.json" | tee "$out_dir/prefill_vs_sdpa.txt"
    ./asynctls bench prefill --device cuda --mla --q-heads 20 --ctx "${PREFILL_CTX:-8192,32768}" --json \
        > "$out_dir/prefill_mla.json" \
        && python3 peers/torch_sdpa.py --prefill --mla --q-heads 20 --ctx "${PREFILL_CTX:-8192,32768}" \
            --ours "$out_dir/prefill_mla.json" --out "$out_dir/prefill_mla_vs_sdpa.json" \
            | tee "$out_dir/prefill_mla_vs_sdpa.txt"
fi
if [ -x ./asynctls ] && [[ " $BENCH " == *" offload "* ]]; then
    ./asynctls bench offload --device cuda --ctx "${OFFLOAD_CTX:-98304}" --batch "${OFFLOAD_BATCH:-1,8}" \
        ${OFFLOAD_ARGS:-} --json > "$out_dir/offload.json" \
        && python3 -c "import json,sys; [print({k: v for k, v in r.items() if k != 'telemetry'}) for r in json.load(open(sys.argv[1]))['rows']]" "$out_dir/offload.json" | tail -40
fi
if [ -x ./asynctls ] && [[ " $BENCH " == *" attn "* ]]; then
    CTX="${BENCH_CTX:-32768,49152,65536,98304,131072}"; BATCH="${BENCH_BATCH:-1,2,4,8}"; BUDGET="${BENCH_BUDGET:-512,1024,2048}"
    ./asynctls bench attn --device cuda --shape qwen3-8b --ctx "$CTX" --batch "$BATCH" --budget "$BUDGET" \
        --reps 30 --json > "$out_dir/attn_gqa.json" \
        && python3 peers/torch_sdpa.py --ctx "$CTX" --batch "$BATCH" --ours "$out_dir/attn_gqa.json" \
            --out "$out_dir/gqa_vs_sdpa.json" | tee "$out_dir/gqa_vs_sdpa.txt"
    ./asynctls bench attn --device cuda --shape glm-4.7-flash --block-topk 256 --ctx "$CTX" --batch "$BATCH" \
        --budget "$BUDGET" --reps 30 --json > "$out_dir/attn_mla.json" \
        && python3 peers/torch_sdpa.py --mla --q-heads 20 --ctx "$CTX" --batch "$BATCH" --ours "$out_dir/attn_mla.json" \
            --out "$out_dir/mla_vs_sdpa.json" | tee "$out_dir/mla_vs_sdpa.txt"
fi
# e2e: the whole model at real size (random bf16 weights generated on the
# GPU) beside HF transformers on the same config in the same call.
if [ -x ./asynctls ] && [[ " $BENCH " == *" e2e "* ]]; then
    E2E_SHAPE="${E2E_SHAPE:-qwen3-8b}"; E2E_CTX="${E2E_CTX:-32768,65536,98304}"; E2E_BATCH="${E2E_BATCH:-1,4,8}"
    ./asynctls bench e2e --device cuda --model-shape "$E2E_SHAPE" --ctx "$E2E_CTX" --batch "$E2E_BATCH" \
        --policies dense,tls --budget "${E2E_BUDGET:-1024,2048}" --decode-tokens "${E2E_STEPS:-8}" \
        --prefill-tokens "${E2E_PREFILL:-32768}" ${E2E_LARGEST---largest-batch} --json > "$out_dir/e2e_ours.json" \
        && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['prefill']); [print(r) for r in d['rows']]; [print('skipped', s) for s in d['skipped']]" "$out_dir/e2e_ours.json"
    PYTHONUNBUFFERED=1 python3 peers/hf_e2e.py --model-shape "$E2E_SHAPE" --ctx "$E2E_CTX" --batch "$E2E_BATCH" \
        --decode-steps "${E2E_STEPS:-8}" --time-budget-s "${HF_BUDGET:-200}" ${HF_COMPILE:+--compile} \
        --ours "$out_dir/e2e_ours.json" --out "$out_dir/e2e_vs_hf.json" | tee "$out_dir/e2e_vs_hf.txt"
fi
# e2e-offload: the engine's decode with the K/V in pinned host memory beside
# the GPU-resident cache, the same model, contexts and batches in one call.
# E2E_OFFLOAD_ARGS goes to every offloaded run (e.g. "--offload-max-promote 64
# --offload-predictor one-step-lag").
# The rows without the per-layer residency (kept in the JSON files), so the
# call's output tail shows every row.
show_e2e() {
    python3 -c "import json, sys
d = json.load(open(sys.argv[2]))
for r in d['rows']:
    if r.get('offload'):
        r['offload'] = {k: v for k, v in r['offload'].items() if k != 'layers'}
    print(sys.argv[1], r)
for s in d['skipped']:
    print('skipped', s)" "$1" "$2"
}
if [ -x ./asynctls ] && [[ " $BENCH " == *" e2e-offload "* ]]; then
    E2E_SHAPE="${E2E_SHAPE:-qwen3-8b}"; E2E_CTX="${E2E_CTX:-98304}"; E2E_BATCH="${E2E_BATCH:-1,4}"
    for mode in resident offload; do
        ./asynctls bench e2e --device cuda --model-shape "$E2E_SHAPE" --ctx "$E2E_CTX" --batch "$E2E_BATCH" \
            --policies tls --budget "${E2E_BUDGET:-1024,2048}" --decode-tokens "${E2E_STEPS:-8}" --prefill-tokens 0 \
            ${E2E_LARGEST---largest-batch} $([ $mode = offload ] && echo --offload ${E2E_OFFLOAD_ARGS:-}) --json \
            > "$out_dir/e2e_$mode.json" \
            && show_e2e $mode "$out_dir/e2e_$mode.json"
    done
    # Batches past what the host holds, the layers sharing a few host pools
    # (their step times only: aliased rows give meaningless tokens).
    ./asynctls bench e2e --device cuda --model-shape "$E2E_SHAPE" --ctx "$E2E_CTX" --batch "${E2E_ALIAS_BATCH:-16,24}" \
        --policies tls --budget "${E2E_BUDGET:-1024,2048}" --decode-tokens "${E2E_STEPS:-8}" --prefill-tokens 0 \
        --offload --offload-host-tiers "${E2E_HOST_TIERS:-4}" ${E2E_OFFLOAD_ARGS:-} --json > "$out_dir/e2e_offload_aliased.json" \
        && show_e2e aliased "$out_dir/e2e_offload_aliased.json"
    # Tiered: some sequences whole on the GPU, the rest offloaded, one batch.
    ./asynctls bench e2e --device cuda --model-shape "$E2E_SHAPE" --ctx "$E2E_CTX" --batch "${E2E_TIERED_BATCH:-12}" \
        --policies tls --budget "${E2E_BUDGET:-1024,2048}" --decode-tokens "${E2E_STEPS:-8}" --prefill-tokens 0 \
        --offload --offload-resident-batch "${E2E_RESIDENT_BATCH:-6}" ${E2E_OFFLOAD_ARGS:-} --json > "$out_dir/e2e_tiered.json" \
        && show_e2e tiered "$out_dir/e2e_tiered.json"
fi
# e2e-glm: GLM-4.7-Flash at real size with random weights, dense and tls
# (k_b 256), 32k and 96k, batch 1, 8 and the largest that fits (no peer:
# HF's GLM rows are in docs/bench/e2e/, from an earlier call).
if [ -x ./asynctls ] && [[ " $BENCH " == *" e2e-glm "* ]]; then
    ./asynctls bench e2e --device cuda --model-shape glm-4.7-flash --ctx "${GLM_CTX:-32768,98304}" \
        --batch "${GLM_BATCH:-1,8}" --policies dense,tls --budget "${GLM_BUDGET:-1024}" --block-topk 256 \
        --decode-tokens "${E2E_STEPS:-8}" --prefill-tokens 0 ${E2E_LARGEST---largest-batch} --json \
        > "$out_dir/e2e_glm.json" && show_e2e glm "$out_dir/e2e_glm.json"
fi
# gemv-ab: our tensor-core GEMV against cuBLAS for the decode projections
# (ASYNCTLS_GEMV_ROWS=0 sends every product to cuBLAS), whole decode steps
# of both model shapes at 32k, batch 1, 4 and 8, in one call.
if [ -x ./asynctls ] && [[ " $BENCH " == *" gemv-ab "* ]]; then
    for shape in qwen3-8b glm-4.7-flash; do
        for rows in 8 0; do
            ASYNCTLS_GEMV_ROWS=$rows ./asynctls bench e2e --device cuda --model-shape $shape --ctx 32768 \
                --batch 1,4,8 --policies dense --decode-tokens "${E2E_STEPS:-8}" --prefill-tokens 0 --json \
                > "$out_dir/gemv_${shape}_rows$rows.json" && show_e2e "$shape gemv-rows=$rows" "$out_dir/gemv_${shape}_rows$rows.json"
        done
    done
fi
if [ "${TESTS:-1}" = 0 ]; then
    echo "gpu tests: not run (TESTS=0)"
    exit 0
fi
echo "gpu tests: $passed passed, $failed failed, $skipped skipped"
[ $failed -eq 0 ] && [ $skipped -eq 0 ]
"#;

pub fn gpu_pack(root: &Path) -> Result<()> {
    let out = root.join(".gpu");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("tests")).map_err(|e| e.to_string())?;
    let tests = gpu_tests(root)?;
    for (package, test) in &tests {
        let output = Command::new(env!("CARGO"))
            .current_dir(root)
            .args([
                "test",
                "--release",
                "--no-run",
                "--message-format=json",
                "-p",
                package.as_str(),
                "--test",
                test.as_str(),
            ])
            .output()
            .map_err(|e| format!("running cargo: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "building {package}/{test} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let exe = stdout
            .lines()
            .filter(|l| l.contains("\"executable\":\"") && l.contains(&format!("\"name\":\"{test}\"")))
            .find_map(|l| l.split("\"executable\":\"").nth(1)?.split('"').next().map(String::from))
            .ok_or_else(|| format!("cargo reported no executable for {package}/{test}"))?;
        let dest = out.join("tests").join(test);
        std::fs::copy(&exe, &dest).map_err(|e| format!("copying {exe}: {e}"))?;
        run(Command::new("strip").arg(&dest))?;
    }
    run(Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["build", "--release", "-p", "asynctls"]))?;
    let bin = out.join("asynctls");
    std::fs::copy(root.join("target/release/asynctls"), &bin).map_err(|e| format!("copying asynctls: {e}"))?;
    run(Command::new("strip").arg(&bin))?;
    std::fs::create_dir_all(out.join("peers")).map_err(|e| e.to_string())?;
    for peer in ["torch_sdpa.py", "hf_e2e.py"] {
        std::fs::copy(root.join("bench/peers").join(peer), out.join("peers").join(peer)).map_err(|e| e.to_string())?;
    }
    std::fs::write(out.join("inner.sh"), RUN_SH).map_err(|e| e.to_string())?;
    // The binaries pass the 64 MiB a device call carries with the tracked
    // files (about 58 MB stripped, 5.5 MB compressed): ship them as one xz
    // archive beside a run.sh that unpacks it where it runs.
    let archive = root.join("target/gpu-pack.tar.xz");
    run(Command::new("tar")
        .current_dir(&out)
        .args(["-cJf"])
        .arg(&archive)
        .args(["inner.sh", "asynctls", "tests", "peers"]))?;
    std::fs::remove_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::rename(&archive, out.join("pack.tar.xz")).map_err(|e| e.to_string())?;
    std::fs::write(out.join("run.sh"), UNPACK_SH).map_err(|e| e.to_string())?;
    let bytes = std::fs::metadata(out.join("pack.tar.xz"))
        .map_err(|e| e.to_string())?
        .len();
    println!(
        "gpu-pack: {} test binaries in {} (pack.tar.xz, {:.1} MB) and run.sh",
        tests.len(),
        out.display(),
        bytes as f64 / 1e6
    );
    Ok(())
}

/// `.gpu/run.sh`: unpacks the archive next to it (a carried `.gpu` holds
/// only the archive), then runs the tests and benchmarks.
const UNPACK_SH: &str = r#"#!/usr/bin/env bash
# Unpacks pack.tar.xz (made by `cargo xtask gpu-pack`) and runs inner.sh:
# every GPU test binary, then the benchmarks BENCH names.
set -u
cd "$(dirname "$0")"
tar -xJf pack.tar.xz || { echo "gpu-pack: cannot unpack pack.tar.xz"; exit 1; }
exec bash ./inner.sh "$@"
"#;
