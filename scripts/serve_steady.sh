#!/usr/bin/env bash
# The serve goals of issue 15 on the GPU, in the folder of `cargo xtask
# gpu-pack` (.gpu) with OUT set: Qwen3-8B random weights, tls 2048.
#  1. bench e2e at 32k, batch 8: the engine's decode step (the peer);
#  2. steady-state serving: 8 streams of 32k prompts, 512 output tokens,
#     tokens/s in the window where all eight decode;
#  3. prefill interference: 1 and 7 running streams (1k prompts) while one
#     32k prompt is prefilled, at PREFILL chunks (default 2048,512,256), one
#     JSON document per line in serve_interfere.jsonl.
# STEADY=0 skips points 1 and 2. MIXED=1 serves with --mixed-steps (each
# prefill chunk carried by the decode step of its iteration).
set -u
port=8771
start_server() {
  ./asynctls serve --model-shape qwen3-8b --device cuda --port $port --max-batch 8 --max-context 33000 \
      --prefill-chunk $1 --attention tls --budget 2048 $([ "${MIXED:-0}" = 1 ] && echo --mixed-steps) \
      > /tmp/serve-$1.log 2>&1 &
  pid=$!
  for _ in $(seq 600); do curl -sf http://127.0.0.1:$port/health > /dev/null && return; sleep 0.2; done
}
show() {
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print({k: (round(v,2) if isinstance(v,float) else v) for k,v in l.items() if k!='errors'}) for l in d['levels']]; print({k:v for k,v in d.items() if k!='levels'})" $1
}
if [ "${STEADY:-1}" = 1 ]; then
  ./asynctls bench e2e --device cuda --model-shape qwen3-8b --ctx 32768 --batch 8 --policies tls --budget 2048 \
      --decode-tokens 16 --prefill-tokens 2048 --json > $OUT/serve_peer_e2e.json 2> /tmp/e2e.log
  python3 -c "import json,sys; [print('e2e', r) for r in json.load(open(sys.argv[1]))['rows']]" $OUT/serve_peer_e2e.json
  start_server 2048
  echo "== steady, chunk 2048"
  timeout 200 ./asynctls bench serve --url http://127.0.0.1:$port --concurrency 8 --prompt-tokens 32000 \
      --output-tokens 512 --duration-s 1 --max-requests 8 --json > $OUT/serve_steady.json && show $OUT/serve_steady.json
  kill -INT $pid; wait $pid
fi
for chunk in $(echo ${PREFILL:-2048,512,256} | tr ',' ' '); do
  start_server $chunk
  echo "== interference, chunk $chunk"
  for c in 1 7; do
    timeout 150 ./asynctls bench serve --url http://127.0.0.1:$port --concurrency $c --prompt-tokens 1024 \
        --output-tokens 1500 --duration-s 1 --max-requests $c --interfere-prompt-tokens 32000 --json \
        > /tmp/interfere.json && show /tmp/interfere.json \
        && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['prefill_chunk']=int(sys.argv[2]); print(json.dumps(d))" \
            /tmp/interfere.json $chunk >> $OUT/serve_interfere$([ "${MIXED:-0}" = 1 ] && echo _mixed).jsonl
  done
  curl -s http://127.0.0.1:$port/metrics | grep -E "^asynctls_(kv_blocks_used|running_sequences) " | head -4
  kill -INT $pid; wait $pid
done
