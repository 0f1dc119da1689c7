#!/usr/bin/env bash
# Issue 15's third goal: after a load, KV blocks in use and the process's
# resident memory return to their idle values. Starts `asynctls serve`,
# reads /metrics idle, runs LOADS rounds of `asynctls bench serve`, and
# reads /metrics after each (and again SETTLE_S seconds later).
#   scripts/serve_memory.sh BIN MODEL [DEVICE]   (BIN: the asynctls binary)
# Env: PORT (8790), LOADS (3), CONC (8), PROMPT (256), OUT_TOKENS (32),
# REQUESTS (16), CTX (1024), SETTLE_S (5).
set -u
bin=$1; model=$2; device=${3:-cpu}; port=${PORT:-8790}
"$bin" serve --model "$model" --device "$device" --port "$port" --max-batch 8 --max-context "${CTX:-1024}" \
    > /tmp/serve-memory.log 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 0.2; done
metrics() {
  curl -s "http://127.0.0.1:$port/metrics" | awk -v tag="$1" '
    /^asynctls_process_resident_bytes /{rss=$2} /^asynctls_kv_blocks_used /{kv=$2}
    /^asynctls_gpu_memory_used_bytes /{gpu=$2} /^asynctls_running_sequences /{run=$2}
    END {printf "%-14s resident %.1f MiB  kv_blocks_used %s  running %s  gpu %s\n", tag, rss/1048576, kv, run, (gpu==""?"-":sprintf("%.1f MiB", gpu/1048576))}'
}
# The gauges refresh every 16 scheduler iterations; one short request
# after the health check makes the idle reading a measured one.
curl -s "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
  -d '{"prompt":"hi","max_tokens":1}' > /dev/null
metrics idle
for i in $(seq "${LOADS:-3}"); do
  "$bin" bench serve --url "http://127.0.0.1:$port" --concurrency "${CONC:-8}" --prompt-tokens "${PROMPT:-256}" \
      --output-tokens "${OUT_TOKENS:-32}" --duration-s 1 --max-requests "${REQUESTS:-16}" > /dev/null 2>&1
  metrics "after load $i"
  sleep "${SETTLE_S:-5}"
  metrics "  +${SETTLE_S:-5} s"
done
