#!/usr/bin/env python3
"""llama.cpp anchor for `samkv bench-speed`: prefill and decode tokens/s of one GGUF file.

For each prompt length: `--reps` repetitions, each from an empty KV cache, of
  prefill: one eval of LEN random token ids (batches of --batch, logits for the last token only),
  decode:  --decode single-token evals after it,
and one JSON line with the medians, in samkv's SpeedRow format.

Needs llama-cpp-python (0.3.36 was used; on CPUs whose AMX kernels crash build it with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF").
"""

import argparse
import json
import random
import resource
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF file")
    ap.add_argument("--lengths", default="512,2048,4096", help="comma-separated prompt lengths")
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded one at a time after each prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512, help="n_batch = n_ubatch")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (off by default)")
    args = ap.parse_args()

    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not installed: python3 -m pip install llama-cpp-python==0.3.36", file=sys.stderr)
        return 2

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) <= 0 or args.reps <= 0 or args.decode < 0:
        print("lengths must be positive and reps >= 1", file=sys.stderr)
        return 2
    n_ctx = max(lengths) + args.decode + 16
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=n_ctx,
        n_batch=args.batch,
        n_ubatch=args.batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=args.flash_attn,
        logits_all=False,
        verbose=False,
    )
    vocab = min(llm.n_vocab(), 32000)

    def one_run(n: int, seed: int) -> tuple[float, float]:
        rng = random.Random(seed)
        toks = [rng.randrange(vocab) for _ in range(n + args.decode)]
        llm.reset()
        llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        llm.eval(toks[:n])
        prefill = n / (time.perf_counter() - t0)
        decode = float("nan")
        if args.decode:
            t1 = time.perf_counter()
            for t in toks[n:]:
                llm.eval([t])
            decode = args.decode / (time.perf_counter() - t1)
        return prefill, decode

    one_run(16, 1)  # warm-up: first-call allocations and thread start-up are not throughput
    engine = "llama.cpp" + (" (flash-attn)" if args.flash_attn else "")
    for n in lengths:
        runs = [one_run(n, 7 + r) for r in range(args.reps)]
        row = {
            "engine": engine,
            "prompt_tokens": n,
            "prefill_tok_s": statistics.median(r[0] for r in runs),
            "decode_tokens": args.decode,
            "decode_tok_s": statistics.median(r[1] for r in runs) if args.decode else 0.0,
            # ru_maxrss is KiB on Linux
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "reps": args.reps,
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
