#!/usr/bin/env bash
# Packs what scripts/gpu-run.sh needs on the GPU machine into dist/gpu/, small enough for the
# device tool's 64 MiB (working tree + carried paths):
#   dist/gpu/samkv-cuda.xz, dist/gpu/cuda_smoke.xz   the CUDA binaries (32 + 24 MiB -> ~19 MiB)
#   dist/gpu/smollm2-135m-l6.gguf                   SmolLM2-135M's first 6 layers with a Q4_1
#                                                   embedding (94 MiB -> 31 MiB), for selfcheck
# Run after scripts/build-cuda.sh; then carry `dist/gpu` and run `bash scripts/gpu-run.sh`.
# The small model needs the python `gguf` package here (pip install gguf).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${SAMKV_MODELS:-models}/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p dist/gpu
for b in samkv-cuda cuda_smoke; do
    if [ ! -f "dist/$b" ]; then
        echo "dist/$b is missing: run scripts/build-cuda.sh first" >&2
        exit 1
    fi
    if [ ! -f "dist/gpu/$b.xz" ] || [ "dist/$b" -nt "dist/gpu/$b.xz" ]; then
        xz -T1 -6 -c "dist/$b" >"dist/gpu/$b.xz.tmp"
        mv "dist/gpu/$b.xz.tmp" "dist/gpu/$b.xz"
    fi
done
if [ ! -f dist/gpu/smollm2-135m-l6.gguf ]; then
    python3 scripts/small_gguf.py "$MODEL" dist/gpu/smollm2-135m-l6.gguf --layers 6 --embed-q4_1
fi
du -b dist/gpu/* | awk '{s+=$1; printf "%8.1f MiB  %s\n", $1/1048576, $2} END {printf "%8.1f MiB  total\n", s/1048576}'
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
echo "tracked files: $((tree / 1048576)) MiB (the device tool carries 64 MiB in all, tracked and" \
    "untracked-not-ignored files included)"
