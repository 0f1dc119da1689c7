#!/usr/bin/env bash
# Issue 14 point 5 on the GPU machine: Qwen2.5-Coder-0.5B real weights, NIAH
# prompts of about 30k tokens (scripts/niah_prompt.py), greedy: the answers
# of the GPU-resident cache (dense, tls) and of the offloaded one with the
# union and one-step-lag predictors at two slot counts, and the offload
# counters (hits, misses, bytes host to device) of each run, one JSON
# document per line in $OUT/locality.jsonl.
#
# Run from the repository root after `cargo xtask gpu-pack`, with the model
# imported to $MODEL (`asynctls import-gguf`) and the prompts in $PROMPTS
# (niah-30k-d*.txt). BUDGET (default 1024), SLOTS (default "300 518": about
# 1.2x and 2x the 2 x 128 units k_b = 128 selects per layer), NEW (16).
set -u
BIN=${BIN:-.gpu/asynctls}
MODEL=${MODEL:?the imported model directory}
PROMPTS=${PROMPTS:?the folder of niah-30k-d*.txt}
BUDGET=${BUDGET:-1024}; NEW=${NEW:-16}
out=${OUT:-/tmp}/locality.jsonl
run() { # name, then generate's flags
  local name=$1; shift
  "$BIN" generate --model "$MODEL" --device cuda --prompt-file "$p" --greedy --max-new-tokens "$NEW" --json "$@" \
    2> /tmp/gen.err | python3 -c "
import json, sys
d = json.load(sys.stdin); d.pop('prompt_ids', None)
d['run'] = sys.argv[1]; d['prompt'] = sys.argv[2]; d['flags'] = sys.argv[3]
print(json.dumps(d))" "$name" "$(basename "$p")" "$*" >> "$out" || { echo "$name $(basename "$p") failed:"; tail -3 /tmp/gen.err; }
}
for p in "$PROMPTS"/niah-30k-d*.txt; do
  run dense --attention dense
  run tls --attention tls --budget "$BUDGET"
  for s in ${SLOTS:-300 518}; do
    run "offload-union-$s" --attention tls --budget "$BUDGET" --offload-slots "$s"
    run "offload-lag-$s" --attention tls --budget "$BUDGET" --offload-slots "$s" --offload-predictor one-step-lag
  done
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
resident = {(r['prompt']): r for r in rows if r['run'] == 'tls'}
for r in rows:
    o = r.get('offload') or {}
    layers = o.get('layers') or []
    steps = max(r['timings'].get('decode_steps') or 1, 1)
    h2d = sum(l['counters']['h2d_bytes'] for l in layers) / steps
    req = sum(l['counters']['requested'] for l in layers); hit = sum(l['counters']['hits'] for l in layers)
    same = resident.get(r['prompt'], {}).get('generated_ids') == r['generated_ids']
    print(f"{r['prompt']:22} {r['run']:18} text {r['text']!r:40.40} same-as-tls {same!s:5} "
          f"hit {hit / req if req else float('nan'):.3f} h2d/step {h2d / 1e6:.2f} MB "
          f"decode {r['timings']['decode_tokens_per_s']:.1f} tok/s")
PY
