#!/usr/bin/env bash
# Packs a real-weights QA benchmark for the GPU machine into loads of at most 56 MiB each, since
# the device tool carries 64 MiB per call (working tree included) and the models do not fit
# in one: dist/load/00 holds the xz'd CUDA binary, the QA data and a sha256 manifest; the
# following loads hold consecutive parts of the model files.
#
# Then, while the machine stays warm (it is given back 30 s after a call), one call per load:
#   carry ["dist/load/NN"], command `bash dev/remote/stage.sh`      (for every load but the last)
#   carry ["dist/load/LAST"], command `bash dev/remote/unpack-qa.sh && bash scripts/gpu-qa.sh`
# Run after scripts/build-cuda.sh. Models: the arguments (default: smollm2 and qwen2.5-coder-0.5b
# from ${SAMKV_MODELS:-models}).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODELS="${SAMKV_MODELS:-models}"
if [ $# -gt 0 ]; then files=("$@"); else
    files=("$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODELS/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
fi
[ -f dist/samkv-cuda ] || { echo "dist/samkv-cuda is missing: run scripts/build-cuda.sh first" >&2; exit 1; }
LOAD_MAX=$((56 * 1024 * 1024)) # the working tree (3.5 MiB and growing) travels too
rm -rf dist/load
mkdir -p dist/load/00
xz -T1 -6 -c dist/samkv-cuda >dist/load/00/samkv-cuda.xz
cp ../shared/data/musique_s.jsonl ../shared/data/wikimqa_s_clean.jsonl dist/load/00/
(cd "$(dirname "${files[0]}")" && sha256sum "${files[@]##*/}") >dist/load/00/models.sha256
used=$(du -cb dist/load/00/* | tail -n1 | cut -f1)
n=0
for f in "${files[@]}"; do
    size=$(stat -c %s "$f")
    off=0
    part=0
    while [ "$off" -lt "$size" ]; do
        room=$((LOAD_MAX - used))
        if [ "$room" -lt $((4 * 1024 * 1024)) ]; then
            n=$((n + 1))
            used=0
            room=$LOAD_MAX
        fi
        dir=$(printf 'dist/load/%02d' "$n")
        mkdir -p "$dir"
        len=$((size - off < room ? size - off : room))
        out=$(printf '%s/%s.part%03d' "$dir" "$(basename "$f")" "$part")
        dd if="$f" of="$out" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none
        off=$((off + len))
        used=$((used + len))
        part=$((part + 1))
    done
done
du -sb dist/load/* | awk '{printf "%6.1f MiB  %s\n", $1/1048576, $2}'
