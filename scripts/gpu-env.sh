# Sourced by the scripts that run on the GPU machine (gpu-run.sh, gpu-serve.sh, gpu-qa.sh):
# defines log and step, finds the CUDA 13 libraries of that machine's python packages and
# unpacks the CUDA binaries carried in dist/gpu/*.xz into $BIN. Expects $RUN (a log file) to
# be set.
log() { printf '%s\n' "$*" | tee -a "$RUN"; }

# Runs a step under `timeout`, output to a file; records exit code and duration.
step() {
    local name=$1 secs=$2 file=$3
    shift 3
    local t0=$SECONDS
    log "== $name: timeout ${secs}s: $*"
    timeout -k 10 "$secs" "$@" >"$file" 2>&1
    local rc=$?
    local note=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (timed out)"
    log "== $name: exit $rc$note after $((SECONDS - t0)) s"
}

# The CUDA 13 libraries (cuBLAS, cuRAND, cudart) from the python packages' nvidia/ tree.
NVLIBS=$(timeout 60 python3 - <<'EOF' 2>>"$RUN"
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
want = ("libcublas.so.13*", "libcublasLt.so.13*", "libcudart.so.13*", "libcurand.so.10*")
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "cu13", "lib")) + glob.glob(os.path.join(r, "*", "lib"))):
        if d not in dirs and any(glob.glob(os.path.join(d, w)) for w in want):
            dirs.append(d)
print(":".join(dirs))
EOF
)
if [ -z "$NVLIBS" ]; then
    f=$(timeout 60 find / -xdev -name 'libcublas.so.13*' 2>/dev/null | head -n1)
    [ -n "$f" ] && NVLIBS=$(dirname "$f")
fi
export LD_LIBRARY_PATH="${NVLIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The binaries: unpacked from dist/gpu/*.xz (python's lzma: xz may not be installed there).
BIN="${TMPDIR:-/tmp}/samkv-gpu-bin"
mkdir -p "$BIN"
for b in samkv-cuda cuda_smoke; do
    if [ -f "dist/gpu/$b.xz" ]; then
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "dist/gpu/$b.xz" "$BIN/$b" 2>>"$RUN"
    elif [ -f "dist/$b" ]; then
        cp "dist/$b" "$BIN/$b"
    fi
    chmod +x "$BIN/$b" 2>/dev/null
done
