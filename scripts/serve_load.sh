#!/usr/bin/env bash
# Real-size serve load on the GPU: Qwen3-8B random weights, 32k prompts, dense
# then tls 2048; run in the folder of `cargo xtask gpu-pack` (.gpu) with OUT set.
# LEVELS (default 1,8) and OUTPUT (default 64) pick the load.
set -u
for att in dense tls; do
  ./asynctls serve --model-shape qwen3-8b --device cuda --port 8770 --max-batch 8 --max-context 32832 \
      --prefill-chunk 2048 --attention $att --budget 2048 > /tmp/serve-$att.log 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf http://127.0.0.1:8770/health > /dev/null && break; sleep 0.2; done
  echo "== $att"
  timeout 150 ./asynctls bench serve --url http://127.0.0.1:8770 --concurrency ${LEVELS:-1,8} --prompt-tokens 32000 \
      --output-tokens ${OUTPUT:-64} --duration-s 1 --max-requests 8 --json > $OUT/serve_$att.json
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print({k: (round(v,2) if isinstance(v,float) else v) for k,v in l.items()}) for l in d.get('levels', d.get('rows', []))]; print({k:v for k,v in d.items() if k not in ('levels','rows')})" $OUT/serve_$att.json
  curl -s http://127.0.0.1:8770/metrics | grep -E "^asynctls_(kv_blocks_used|running_sequences|requests_total)" | head -8
  kill -INT $pid; wait $pid; tail -2 /tmp/serve-$att.log
done
