#!/usr/bin/env bash
# Session 7 (issue 15), the second GPU call (QA only; the first call's machine was given back
# mid-run and its QA results were lost). What ran on the GPU machine, started in the background by the call
# that carried the last load (scripts/gpu-pack-qa.sh + scripts/gpu-stage.sh put the binary,
# the data and both Qwen GGUFs in dist/staged/):
#   1. the models joined and checked against their sha256
#   2. `samkv selfcheck` on Qwen2.5-Coder-1.5B (CUDA kernels, CPU-vs-CUDA logits, every
#      METHODS.md invariant with K/V compared layer by layer)
#   3. the Hugging Face anchor and `samkv bench-gpu` at the Llama-3.1-8B shape (TTFT of every
#      SamKV selection beside the full prefill), alone on the GPU
#   4. `samkv bench` on every example of both files with both Qwen models every
#      method, 3 shards per (model, file) in parallel; shards merged and summarized at the end
# Everything lands in dist/out/ (run.txt, selfcheck.txt, anchor.jsonl, bench.txt/json,
# runs.tar.gz); a later call copies it to $OUT. DONE marks the end.
set -u
cd "$(dirname "$0")/../.."
O=dist/out
mkdir -p "$O" models dist/runs
RUN="$O/run.txt"
log() { printf '%s %s\n' "$(date -u +%T)" "$*" >>"$RUN"; }
for f in $(awk '{print $2}' dist/staged/models.sha256); do
    [ -f "models/$f" ] || cat dist/staged/"$f".part* >"models/$f"
done
(cd models && sha256sum -c ../dist/staged/models.sha256) >>"$RUN" 2>&1 || log "sha256 mismatch"
mkdir -p dist/gpu && cp dist/staged/samkv-cuda.xz dist/gpu/
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh
S="$BIN/samkv-cuda"
Q05=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
Q15=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; ldd "$S" | grep -i 'not found'; } >>"$RUN" 2>&1
METHODS="recompute,reuse,cacheblend,epic,infllm,samkv:selection=per-doc,$SK,$SK:samkv_score=attention,oracle:keep=0.15,$SK:samkv_score=attention:samkv_attend=all,oracle:keep=0.15:samkv_attend=all,samkv:selection=coverage:cover=0.3:keep=0.25:samkv_score=attention:samkv_attend=all,samkv:selection=coverage:cover=0.4:keep=0.2:samkv_score=attention:samkv_attend=all,samkv:selection=global:keep=1.0"
pids=()
for model in q15; do
    case $model in q15) M=$Q15; SHARDS=5 ;; esac
    for data in musique wikimqa; do
        case $data in musique) D=dist/staged/musique_s.jsonl ;; wikimqa) D=dist/staged/wikimqa_s_clean.jsonl ;; esac
        for i in $(seq 0 $((SHARDS - 1))); do
            name="$model-$data@$i"
            mkdir -p "dist/runs/$name"
            echo "$M $D --methods $METHODS --shard $i/$SHARDS" >"dist/runs/$name/cmd.txt"
            timeout -k 5 "${QA_SECS:-240}" "$S" --device cuda --store "/tmp/qa-store-$name" bench \
                --model "$M" --data "$D" --out "dist/runs/$name" --methods "$METHODS" \
                --shard "$i/$SHARDS" >"dist/runs/$name/log.txt" 2>&1 &
            pids+=($!)
        done
    done
done
log "bench: ${#pids[@]} processes"
for p in "${pids[@]}"; do wait "$p"; done
log "bench done"
# Merge the shards of each (model, file) and summarize over the longest prefix of examples
# that every method finished (a resume that computes nothing).
for model in q15; do
    case $model in q15) M=$Q15 ;; esac
    for data in musique wikimqa; do
        case $data in musique) D=dist/staged/musique_s.jsonl ;; wikimqa) D=dist/staged/wikimqa_s_clean.jsonl ;; esac
        m="dist/runs/$model-$data"
        mkdir -p "$m"
        cat "$m"@*/results.jsonl >"$m/results.jsonl" 2>/dev/null
        cp "$m@0/config.json" "$m/config.json"
        k=$(python3 - "$m" "$METHODS" <<'PY'
import json, sys
d, methods = sys.argv[1], sys.argv[2].split(",")
seen = {}
for line in open(f"{d}/results.jsonl"):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    seen.setdefault(r["example"], set()).add(r["method"])
n = 0
while str(n) in seen and set(methods) <= seen[str(n)]:
    n += 1
print(n)
PY
)
        log "$model-$data: $k complete examples"
        timeout -k 5 120 "$S" --device cuda --store "/tmp/qa-store-$model-$data@0" bench --model "$M" \
            --data "$D" --out "$m" --methods "$METHODS" --limit "$k" >>"$m/log.txt" 2>&1
        if false; then
            mkdir -p "$m-first20" && cp "$m/config.json" "$m/results.jsonl" "$m-first20/"
            timeout -k 5 120 "$S" --device cuda --store "/tmp/qa-store-$model-$data@0" bench --model "$M" \
                --data "$D" --out "$m-first20" --methods "$METHODS" --limit 20 >>"$m/log.txt" 2>&1
            rm -f "$m-first20/results.jsonl"
        fi
    done
done
(cd dist/runs && tar -czf "../../$O/runs.tar.gz" .)
log "DONE"
touch "$O/DONE"
