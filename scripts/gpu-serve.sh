#!/usr/bin/env bash
# On a GPU host: `samkv serve` at the Llama-3.1-8B shape (random weights, --shape) under
# `samkv bench-serve`, beside the Hugging Face anchor (scripts/hf_anchor.py), all within
# $SAMKV_GPU_BUDGET_S seconds (default 570).
#
# Needs, relative to the repository root: dist/samkv-cuda (or dist/gpu/samkv-cuda.xz) from
# scripts/build-cuda.sh; a GGUF whose tokenizer the server uses ($TOKENIZER_MODEL, default
# models/SmolLM2-135M-Instruct.Q4_1.gguf, else dist/gpu/smollm2-135m-l6.gguf); a python3 with
# torch + transformers for the anchor (skipped with ANCHOR=0).
#
# Writes to $OUT (default ./gpu-out): run.txt (environment, each step's exit code and time),
# anchor.jsonl / anchor.log, serve.txt (bench-serve's table) and serve.json (its rows).
#
# Env: SERVE_METHODS (default recompute,reuse,samkv:keep=0.15), SERVE_CLIENTS (1,16,64),
#      SERVE_SECONDS per run (20), SERVE_DOCS corpus documents (200), SERVE_DOC_WORDS (450:
#      about 512 tokens), SERVE_MAX_TOKENS (64), SERVE_ARGS: more bench-serve arguments.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
BUDGET="${SAMKV_GPU_BUDGET_S:-570}"
RUN="$OUT/run.txt"
: >"$RUN"
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh
MODEL="${TOKENIZER_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$MODEL" ] || MODEL=dist/gpu/smollm2-135m-l6.gguf
{
    echo "date: $(date -u)"
    echo "tokenizer model: $MODEL"
    timeout 30 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1
    free -g 2>&1 | head -2
} >>"$RUN" 2>&1

if [ "${ANCHOR:-1}" != 0 ]; then
    step anchor 150 "$OUT/anchor.jsonl" sh -c "exec python3 scripts/hf_anchor.py 2>'$OUT/anchor.log'"
fi
left=$((BUDGET - SECONDS))
STORE="${TMPDIR:-/tmp}/samkv-serve-store"
rm -rf "$STORE"
# One client address for every bench client: lift the per-client cap and size the batch and
# queue for the largest client count. The memory tier holds the whole corpus in host memory.
# shellcheck disable=SC2086 # SERVE_ARGS is a list of arguments
step bench-serve "$left" "$OUT/serve.txt" "$BIN/samkv-cuda" --store "$STORE" bench-serve \
    --model "$MODEL" \
    --serve-arg=--device=cuda --serve-arg=--shape=llama-3.1-8b \
    --serve-arg=--store-memory-mb="${SERVE_MEMORY_MB:-60000}" \
    --serve-arg=--max-batch=256 --serve-arg=--queue=1024 --serve-arg=--max-connections=1024 \
    --serve-arg=--max-requests-per-client=1024 --serve-arg=--request-timeout-secs=600 \
    --methods "${SERVE_METHODS:-recompute,reuse,samkv:keep=0.15}" \
    --clients "${SERVE_CLIENTS:-1,16,64}" --seconds "${SERVE_SECONDS:-20}" \
    --docs "${SERVE_DOCS:-200}" --doc-words "${SERVE_DOC_WORDS:-450}" \
    --max-tokens "${SERVE_MAX_TOKENS:-64}" --json "$OUT/serve.json" ${SERVE_ARGS:-}
log "== total $SECONDS s"
