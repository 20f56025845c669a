#!/usr/bin/env bash
# On a GPU host with the CUDA build (dist/samkv-cuda, or dist/gpu/samkv-cuda.xz), the models in
# models/ and the QA data in ../shared/data/: checks CUDA against the CPU on real SmolLM2
# (`samkv selfcheck`), then runs `samkv bench` with real weights on both QA files and both
# models, all at once (small models leave an H100/H200 mostly idle, so runs in parallel add
# up), each stopped in time to write its summary; under 10 minutes in all.
#
# Writes to $OUT three files: run.txt (log),
# selfcheck.txt, and runs.tar.gz with one folder per run (config.json, results.jsonl,
# summary.md/json, sweep plots, log.txt) and NAME-first20/ summaries for MuSiQue runs.
# Env: SAMKV_GPU_BUDGET_S (default 560) seconds for the whole script; QA_RUNS to replace the
# default run list (lines of `name model data extra-args...`); SAMKV_BIN and SAMKV_DEVICE for a
# dry run on another machine (a CPU binary and `cpu`).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT" models
BUDGET="${SAMKV_GPU_BUDGET_S:-560}"
RUN="$OUT/run.txt"
: >"$RUN"
log() { printf '%s\n' "$*" | tee -a "$RUN"; }

for f in models/SmolLM2-135M-Instruct.Q4_1.gguf models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
    ../shared/data/musique_s.jsonl ../shared/data/wikimqa_s_clean.jsonl; do
    [ -f "$f" ] || { log "$f is missing: copy it to the GPU host first (README: GPU); stopping"; exit 1; }
done
if [ -n "${SAMKV_BIN:-}" ]; then
    S="$SAMKV_BIN" # a dry run elsewhere, e.g. SAMKV_BIN=target/release/samkv SAMKV_DEVICE=cpu
else
    # shellcheck source=scripts/gpu-env.sh
    source scripts/gpu-env.sh
    S="$BIN/samkv-cuda"
fi
DEV="${SAMKV_DEVICE:-cuda}"
{
    echo "date: $(date -u)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    ldd "$S" | grep -i 'not found'
} >>"$RUN" 2>&1

SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
QWEN=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN15=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf # for QA_RUNS
t0=$SECONDS
timeout -k 5 150 "$S" --device "$DEV" selfcheck --model "$SMOL" >"$OUT/selfcheck.txt" 2>&1
log "== selfcheck: exit $? after $((SECONDS - t0)) s"

# How many examples of run directory $1 have every method's result, in order.
completed() {
    python3 - "$1" <<'PY'
import json, sys
d = sys.argv[1]
cfg = json.load(open(f"{d}/config.json"))
labels = set(cfg.get("methods", {})) or None
seen, order = {}, []
for line in open(f"{d}/results.jsonl"):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r["example"] not in seen:
        order.append(r["example"])
        seen[r["example"]] = set()
    seen[r["example"]].add(r["method"])
n = 0
for ex in order:
    if labels is not None and not labels <= seen[ex]:
        break
    n += 1
print(n)
PY
}

# Writes the summary of run directory $1 over its first $5 examples: a resume with --limit
# that computes nothing new (args $4 with any --limit of their own dropped).
summarize() {
    local dir=$1 model=$2 data=$3 args=$4 limit=$5
    args=$(echo "$args" | sed -E 's/--limit [0-9]+//')
    # shellcheck disable=SC2086 # args is a list of arguments
    timeout -k 5 60 "$S" --device "$DEV" --store "/tmp/qa-store-$(basename "$dir" -first20)" bench \
        --model "$model" --data "$data" --out "$dir" $args --limit "$limit"
}

METHODS="recompute,reuse,cacheblend,epic,infllm,samkv,samkv:selection=global:keep=0.15"
DEFAULT_RUNS="qwen-musique $QWEN ../shared/data/musique_s.jsonl --methods $METHODS
qwen-wikimqa $QWEN ../shared/data/wikimqa_s_clean.jsonl --methods $METHODS
smollm2-musique $SMOL ../shared/data/musique_s.jsonl --methods $METHODS
smollm2-wikimqa $SMOL ../shared/data/wikimqa_s_clean.jsonl --methods $METHODS
smollm2-musique-sweep $SMOL ../shared/data/musique_s.jsonl --sweep --limit 40"
RUNS="${QA_RUNS:-$DEFAULT_RUNS}"
# What is left, less a minute for the summaries of runs stopped early and the archives.
left=$((BUDGET - SECONDS - 60))
log "== benches: ${left}s each, in parallel"
declare -A PIDS
while read -r name model data args; do
    [ -z "$name" ] && continue
    mkdir -p "dist/runs/$name"
    # Each run its own store: runs share nothing but the GPU.
    # shellcheck disable=SC2086 # args is a list of arguments
    RUST_BACKTRACE=1 timeout -k 5 "$left" "$S" --device "$DEV" --store "/tmp/qa-store-$name" \
        bench --model "$model" \
        --data "$data" --out "dist/runs/$name" $args >"dist/runs/$name/log.txt" 2>&1 &
    PIDS[$name]=$!
    echo "$name $model $data $args" >"dist/runs/$name/cmd.txt"
done <<<"$RUNS"
for name in "${!PIDS[@]}"; do
    wait "${PIDS[$name]}"
    log "== $name: exit $?"
done
# A run stopped by the timeout has no summary yet: rerun it with --limit set to the examples
# it completed (a resume that computes nothing and writes the summary).
while read -r name model data args; do
    [ -z "$name" ] && continue
    d="dist/runs/$name"
    if [ ! -f "$d/summary.md" ] && [ -f "$d/results.jsonl" ]; then
        k=$(completed "$d")
        log "== $name: summary over the first $k completed examples"
        summarize "$d" "$model" "$data" "$args" "$k" >>"$d/log.txt" 2>&1
    fi
done <<<"$RUNS"
# Issue 4's table: the first 20 MuSiQue examples of each MuSiQue run, from the same results.
while read -r name model data args; do
    case "$name" in *-musique) ;; *) continue ;; esac
    [ -f "dist/runs/$name/results.jsonl" ] || continue
    [ "$(completed "dist/runs/$name")" -ge 20 ] || continue
    f20="dist/runs/$name-first20"
    rm -rf "$f20"
    cp -r "dist/runs/$name" "$f20"
    rm -f "$f20"/summary.*
    summarize "$f20" "$model" "$data" "$args" 20 >>"$RUN" 2>&1
    rm -f "$f20/results.jsonl" # the summary is what this copy is for
done <<<"$RUNS"
names=$(while read -r name _; do [ -n "$name" ] && echo "$name"; done <<<"$RUNS")
# shellcheck disable=SC2086 # names is a list
(cd dist/runs && tar -czf "$OUT/runs.tar.gz" $names $(ls -d ./*-first20 2>/dev/null))
log "== total $SECONDS s"
