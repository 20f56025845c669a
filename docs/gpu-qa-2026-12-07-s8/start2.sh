#!/usr/bin/env bash
# Session 8, second machine: resumes start.sh's run. The first machine's shards lost examples
# to errors (20 processes at once: CUDA out of memory, then a full disk from 20 stores; the
# error lines were dropped by the final read, see RESULTS.md), so the good lines of every
# (model, file) are carried in prev.tar.gz, copied into each new shard's directory, and the
# resume computes only the missing pairs, with 14 processes and a cleaner for old store files.
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
(cd dist/runs && tar xzf ../staged/prev.tar.gz)
mkdir -p dist/gpu && cp dist/staged/samkv-cuda.xz dist/gpu/
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh
S="$BIN/samkv-cuda"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$RUN" 2>&1
SK=samkv:selection=global:keep=0.15
METHODS="recompute,reuse,cacheblend,epic,infllm,samkv:selection=per-doc,$SK,$SK:samkv_score=attention,oracle:keep=0.15,$SK:samkv_score=attention:samkv_attend=all,oracle:keep=0.15:samkv_attend=all,samkv:selection=coverage:cover=0.4:keep=0.2:samkv_score=attention:samkv_attend=all"
n=0
for d in dist/runs/*@*; do
    name=$(basename "$d"); mf=${name%@*}; i=${name#*@}
    N=$(ls -d dist/runs/"$mf"@* | wc -l)
    case $mf in smol-*) M=models/SmolLM2-135M-Instruct.Q4_1.gguf ;; q05-*) M=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ;; q15-*) M=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf ;; esac
    case $mf in *-musique) D=dist/staged/musique_s.jsonl ;; *-wikimqa) D=dist/staged/wikimqa_s_clean.jsonl ;; esac
    echo "$M $D --methods $METHODS --shard $i/$N" >"$d/cmd.txt"
    setsid nohup timeout -k 5 "${QA_SECS:-500}" "$S" --device cuda --store "/tmp/qa-store-$name" bench \
        --model "$M" --data "$D" --out "$d" --methods "$METHODS" --shard "$i/$N" >"$d/log.txt" 2>&1 </dev/null &
    n=$((n + 1))
    sleep 1
done
log "bench: $n processes started"
# Old store files are not needed once their example is done: keep the disk from filling.
setsid nohup bash -c 'while sleep 20; do find /tmp/qa-store-* -type f -mmin +2 -delete 2>/dev/null; done' >/dev/null 2>&1 </dev/null &
exec bash "$(dirname "$0")/collect.sh"
