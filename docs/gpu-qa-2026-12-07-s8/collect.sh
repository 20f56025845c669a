#!/usr/bin/env bash
# Waits up to WAIT seconds (default 540) for the shards of start.sh, then packs what they
# have written so far (dist/runs: results.jsonl, log.txt, config.json per shard) into $OUT.
set -u
cd "$(dirname "$0")/../.."
O=dist/out
RUN="$O/run.txt"
log() { printf '%s %s\n' "$(date -u +%T)" "$*" >>"$RUN"; }
end=$(($(date +%s) + ${WAIT:-540}))
while [ "$(date +%s)" -lt "$end" ] && pgrep -f 'samkv-cuda .* bench' >/dev/null; do sleep 5; done
left=$(pgrep -fc 'samkv-cuda .* bench')
log "collect: $left shards still running"
for d in dist/runs/*@*/; do
    printf '%s %s lines\n' "$d" "$(wc -l <"$d/results.jsonl" 2>/dev/null || echo 0)" >>"$RUN"
done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >>"$RUN" 2>&1
(cd dist/runs && tar -czf "../../$O/runs.tar.gz" .)
cp "$RUN" "$O/runs.tar.gz" "${OUT:-/tmp}/" 2>/dev/null
[ "$left" -eq 0 ] && log "DONE"
true
