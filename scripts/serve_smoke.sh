#!/usr/bin/env bash
# A smoke run of `asynctls serve` on one device: a completion, the same one
# streamed, eight concurrent chat completions, the KV gauge afterwards, then a
# clean stop. Usage: scripts/serve_smoke.sh ASYNCTLS_BIN MODEL_DIR DEVICE [PORT]
set -u
bin=$1; model=$2; device=$3; port=${4:-8765}
name=$(basename "$model")
url="http://127.0.0.1:$port"
"$bin" serve --model "$model" --device "$device" --port "$port" --max-batch 8 > /tmp/serve-smoke.log 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "$url/health" > /dev/null && break; sleep 0.2; done
body='{"model":"'$name'","prompt":"hello world","max_tokens":16,"temperature":0}'
echo "== completion"
curl -s "$url/v1/completions" -H 'content-type: application/json' -d "$body"; echo
echo "== streamed (last chunks)"
curl -sN "$url/v1/completions" -H 'content-type: application/json' \
    -d '{"model":"'$name'","prompt":"hello world","max_tokens":16,"temperature":0,"stream":true}' | tail -4
echo "== 8 concurrent chat completions"
clients=()
for i in $(seq 8); do
    curl -s "$url/v1/chat/completions" -H 'content-type: application/json' \
        -d '{"model":"'$name'","messages":[{"role":"user","content":"hi '$i'"}],"max_tokens":24,"temperature":0}' \
        -o "/tmp/serve-smoke-$i.json" &
    clients+=($!)
done
wait "${clients[@]}"
echo "finished: $(grep -l '"finish_reason"' /tmp/serve-smoke-*.json | wc -l) of 8"
echo "== metrics"
curl -s "$url/metrics" | grep -E "^asynctls_(kv_blocks|requests_total|running)" | head -12
kill -INT $pid; wait $pid; echo "server exit: $?"
tail -3 /tmp/serve-smoke.log
