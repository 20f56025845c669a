#!/usr/bin/env python3
"""Hugging Face anchor for `samkv bench-gpu`: the same Llama-3.1-8B shape with random weights
in transformers (LlamaForCausalLM, bf16, SDPA attention), timed the same way: full prefill at
several lengths and one decode step over a cache of a given length, each the median of --reps
runs after one warm-up, with torch.cuda.synchronize() around every run.

Prints one JSON object per line: a header (versions, device, config), then one line per
measurement. Prefill computes the last position's logits only (logits_to_keep=1, as samkv
does) and keeps the KV cache (use_cache=True). Each decode step appends to the cache it times,
so "cached" is the length before the first step.

    python3 scripts/hf_anchor.py            # on a CUDA machine (needs ~20 GB of GPU memory)
    python3 scripts/hf_anchor.py --tiny     # a tiny shape, on the CPU if there is no GPU
"""

import argparse
import json
import statistics
import sys
import time

# Reference numbers from the task brief (H200, Llama-3.1-8B, bf16), for side-by-side reading.
BRIEF_PREFILL_MS = {1024: 42.5, 2048: 61.4, 5120: 153.7, 10240: 335.5}
BRIEF_DECODE_MS = {1536: 23.5, 10240: 28.9}

LLAMA31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def emit(obj):
    print(json.dumps(obj), flush=True)


def make_config(shape):
    import transformers
    from transformers import LlamaConfig

    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5: RoPE settings, theta included, live in rope_parameters.
        return LlamaConfig(**shape, rope_parameters=dict(ROPE))
    # transformers 4 would keep an unknown rope_parameters as a plain attribute and ignore it.
    scaling = {k: v for k, v in ROPE.items() if k != "rope_theta"}
    return LlamaConfig(**shape, rope_theta=ROPE["rope_theta"], rope_scaling=scaling)


def make_model(cfg, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except TypeError:
            model = AutoModelForCausalLM.from_config(
                cfg, torch_dtype=dtype, attn_implementation="sdpa"
            )
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


def timed(fn, reps, sync):
    """Median and all times (ms) of `reps` calls after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape (a quick check, CPU if no GPU)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill", default="1024,2048,5120,10240", help="prefill lengths")
    ap.add_argument("--cached", default="1536,10240", help="cache lengths for the decode step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        emit({"error": "no CUDA device; use --tiny for a CPU check"})
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    prefill = [int(x) for x in args.prefill.split(",") if x]
    cached = [int(x) for x in args.cached.split(",") if x]
    if args.tiny:
        prefill = [n // 64 for n in prefill]
        cached = [n // 64 for n in cached]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(args.seed)

    shape = TINY if args.tiny else LLAMA31_8B
    cfg = make_config(shape)
    t0 = time.perf_counter()
    model = make_model(cfg, device, dtype)
    sync()
    emit(
        {
            "what": "header",
            "label": "shape-only (random weights)",
            "shape": "tiny" if args.tiny else "llama-3.1-8b",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "dtype": str(dtype),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "rope": getattr(model.config, "rope_parameters", None)
            or getattr(model.config, "rope_scaling", None),
            "params": sum(p.numel() for p in model.parameters()),
            "model_init_s": time.perf_counter() - t0,
            "reps": args.reps,
        }
    )
    vocab = shape["vocab_size"]

    def ids(n):
        return torch.randint(0, vocab, (1, n), device=device)

    with torch.inference_mode():
        for n in prefill:
            x = ids(n)
            try:
                med, all_ms = timed(
                    lambda: model(input_ids=x, use_cache=True, logits_to_keep=1), args.reps, sync
                )
                line = {"what": "prefill", "tokens": n, "ms_median": med, "ms_all": all_ms}
            except Exception as e:  # report and go on: one failed length must not hide the rest
                line = {"what": "prefill", "tokens": n, "error": repr(e)}
            line["brief_ms"] = BRIEF_PREFILL_MS.get(n)
            if cuda:
                line["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            emit(line)

        for n in cached:
            try:
                out = model(input_ids=ids(n), use_cache=True, logits_to_keep=1)
                pkv = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
                del out

                def step():
                    nonlocal tok
                    o = model(input_ids=tok, past_key_values=pkv, use_cache=True, logits_to_keep=1)
                    tok = o.logits[:, -1:].argmax(-1)

                med, all_ms = timed(step, args.reps, sync)
                line = {"what": "decode_step", "cached": n, "ms_median": med, "ms_all": all_ms}
                del pkv
            except Exception as e:
                line = {"what": "decode_step", "cached": n, "error": repr(e)}
            line["brief_ms"] = BRIEF_DECODE_MS.get(n)
            if cuda:
                line["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.empty_cache()
            emit(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
