#!/usr/bin/env bash
# On the GPU machine: moves the carried load(s) of dev/remote/pack-qa.sh into dist/staged/,
# which stays there while the machine is warm. Prints what is staged so far.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p dist/staged
for d in dist/load/*/; do
    [ -d "$d" ] && mv "$d"* dist/staged/ 2>/dev/null || true
done
ls -l dist/staged | awk 'NR > 1 {s += $5; n++} END {printf "staged: %d files, %.1f MiB\n", n, s/1048576}'
