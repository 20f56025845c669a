#!/usr/bin/env bash
# Session 8 (issue 15): QA on every example of both files with all three models, on the GPU
# machine. Run by the call that carries the last load (after scripts/gpu-stage.sh put the
# binary, the data and the model parts in dist/staged/): joins and checks the models, starts
# every shard in the background (setsid, so they outlive this call while the machine stays
# warm), then waits like collect.sh. Shards write results.jsonl line by line, so whatever
# finished comes back even if the machine is taken away later.
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
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; ldd "$S" | grep -i 'not found'; nproc; } >>"$RUN" 2>&1
SK=samkv:selection=global:keep=0.15
METHODS="recompute,reuse,cacheblend,epic,infllm,samkv:selection=per-doc,$SK,$SK:samkv_score=attention,oracle:keep=0.15,$SK:samkv_score=attention:samkv_attend=all,oracle:keep=0.15:samkv_attend=all,samkv:selection=coverage:cover=0.4:keep=0.2:samkv_score=attention:samkv_attend=all"
echo "$METHODS" >dist/runs/methods.txt
n=0
for model in smol q05 q15; do
    case $model in
        smol) M=models/SmolLM2-135M-Instruct.Q4_1.gguf; SHARDS=2 ;;
        q05) M=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; SHARDS=3 ;;
        q15) M=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf; SHARDS=5 ;;
    esac
    for data in musique wikimqa; do
        case $data in musique) D=dist/staged/musique_s.jsonl ;; wikimqa) D=dist/staged/wikimqa_s_clean.jsonl ;; esac
        for i in $(seq 0 $((SHARDS - 1))); do
            name="$model-$data@$i"
            mkdir -p "dist/runs/$name"
            echo "$M $D --methods $METHODS --shard $i/$SHARDS" >"dist/runs/$name/cmd.txt"
            setsid nohup timeout -k 5 "${QA_SECS:-1150}" "$S" --device cuda --store "/tmp/qa-store-$name" bench \
                --model "$M" --data "$D" --out "dist/runs/$name" --methods "$METHODS" \
                --shard "$i/$SHARDS" >"dist/runs/$name/log.txt" 2>&1 </dev/null &
            n=$((n + 1))
        done
    done
done
log "bench: $n processes started"
exec bash "$(dirname "$0")/collect.sh"
