#!/usr/bin/env bash
# On a GPU host: environment, CUDA smoke test, selfcheck, the Hugging Face anchor and
# `samkv bench-gpu` (Llama-3.1-8B shape, random weights, documents of 512 and 1024 tokens),
# each under its own timeout, all within 10 minutes.
#
# Needs, relative to the repository root (the working directory): dist/samkv-cuda and
# dist/cuda_smoke from scripts/build-cuda.sh (or xz'd copies in dist/gpu/); and a python3 with
# torch + transformers whose nvidia/ packages hold the CUDA 13 libraries. selfcheck uses
# models/SmolLM2-135M-Instruct.Q4_1.gguf when present, else dist/gpu/smollm2-135m-l6.gguf
# (its first 6 layers, from dev/remote/pack.sh).
#
# Writes to $OUT (default ./gpu-out), 7 files (9 with BENCH_OFF_ARGS):
#   run.txt        environment, nvidia-smi, missing libraries, each step's exit code and time
#   smoke.txt      dist/cuda_smoke
#   selfcheck.txt  samkv selfcheck --device cuda (kernels vs candle's ops; with a model, device
#                  vs CPU logits and the METHODS.md invariants)
#   anchor.jsonl   scripts/hf_anchor.py (HF prefill / decode step times); anchor.log its stderr
#   bench.txt      samkv bench-gpu tables; bench.json the same as JSON (written after each
#                  document length, so a timeout keeps what finished)
#
# Env: SAMKV_GPU_BUDGET_S (default 570): seconds the whole script may take; the benchmark
#      gets what the earlier steps left. BENCH_ARGS: extra arguments for bench-gpu.
#      BENCH_OFF_ARGS: when set, bench-gpu runs again with these arguments and samkv's CUDA
#      kernels off (SAMKV_CUDA_KERNELS=0), to bench-off.txt / bench-off.json.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
BUDGET="${SAMKV_GPU_BUDGET_S:-570}"
RUN="$OUT/run.txt"
: >"$RUN"
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MODEL" ] || MODEL=dist/gpu/smollm2-135m-l6.gguf

{
    echo "date: $(date -u)"
    echo "host: $(uname -a)"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "python: $(python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1 | tail -n1)"
    ls -l dist/gpu/ "$BIN" "$MODEL" 2>&1
    echo "--- missing libraries (none expected):"
    ldd "$BIN/samkv-cuda" "$BIN/cuda_smoke" 2>&1 | grep -i 'not found'
    echo "--- nvidia-smi"
    timeout 30 nvidia-smi 2>&1
} >>"$RUN" 2>&1

[ -x "$BIN/cuda_smoke" ] && step smoke 90 "$OUT/smoke.txt" "$BIN/cuda_smoke"
if [ -f "$MODEL" ]; then
    step selfcheck 150 "$OUT/selfcheck.txt" "$BIN/samkv-cuda" --device cuda selfcheck --model "$MODEL"
else
    # No model carried: samkv's CUDA kernels against candle's ops only.
    step selfcheck 150 "$OUT/selfcheck.txt" "$BIN/samkv-cuda" --device cuda selfcheck --kernels-only
fi
step anchor 150 "$OUT/anchor.jsonl" sh -c "exec python3 scripts/hf_anchor.py 2>'$OUT/anchor.log'"
# Leave the kernels-off run its share.
reserve=0
[ -n "${BENCH_OFF_ARGS:-}" ] && reserve=120
left=$((BUDGET - SECONDS - reserve))
if [ "$left" -lt 60 ]; then
    log "== bench: only ${left}s left of ${BUDGET}s; skipped"
else
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
    step bench "$left" "$OUT/bench.txt" "$BIN/samkv-cuda" --device cuda bench-gpu \
        --shape llama-3.1-8b --doc-len 512,1024 --out "$OUT/bench.json" ${BENCH_ARGS:-}
fi
# The same shape with samkv's CUDA kernels off (candle's ops only), for a side-by-side.
left=$((BUDGET - SECONDS))
if [ -n "${BENCH_OFF_ARGS:-}" ] && [ "$left" -ge 60 ]; then
    # shellcheck disable=SC2086 # BENCH_OFF_ARGS is a list of arguments
    step bench-off "$left" "$OUT/bench-off.txt" env SAMKV_CUDA_KERNELS=0 "$BIN/samkv-cuda" \
        --device cuda bench-gpu --shape llama-3.1-8b --out "$OUT/bench-off.json" $BENCH_OFF_ARGS
fi
log "== total $SECONDS s"
