#!/usr/bin/env bash
# On the team's remote GPU machine, after every load of pack-qa.sh is staged (stage.sh): puts
# the staged files where scripts/gpu-qa.sh expects them on any GPU host (models/, the QA data
# in ../shared/data/, dist/gpu/samkv-cuda.xz) and checks the models' sha256.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash dev/remote/stage.sh
mkdir -p models dist/gpu ../shared/data
for f in $(awk '{print $2}' dist/staged/models.sha256); do
    [ -f "models/$f" ] || cat dist/staged/"$f".part* >"models/$f"
done
(cd models && sha256sum -c ../dist/staged/models.sha256)
cp -n dist/staged/*.jsonl ../shared/data/ 2>/dev/null || true
cp dist/staged/samkv-cuda.xz dist/gpu/
