#!/usr/bin/env python3
"""Writes a smaller copy of a llama-architecture GGUF: its first --layers blocks, the same
tokenizer and metadata (block_count adjusted), and optionally the token embedding re-quantized
to Q4_1. For `samkv selfcheck` on the GPU machine, where everything carried must fit in
64 MiB: SmolLM2-135M's file is 94 MiB, its first 6 layers with a Q4_1 embedding about 30 MiB.
The weights stay real (the same tensors, fewer of them); selfcheck compares devices and the
methods' invariants, which hold for any depth.

Needs the `gguf` package (pip install gguf) here, not on the GPU machine.

    python3 scripts/small_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        dist/smollm2-135m-l6.gguf --layers 6 --embed-q4_1
"""

import argparse
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, required=True, help="blocks to keep (the first N)")
    ap.add_argument(
        "--embed-q4_1", action="store_true", help="re-quantize token_embd.weight to Q4_1"
    )
    args = ap.parse_args()

    r = GGUFReader(args.src)
    arch = r.fields["general.architecture"].contents()
    n_blocks = r.fields[f"{arch}.block_count"].contents()
    if not 1 <= args.layers <= n_blocks:
        sys.exit(f"--layers must be in 1..{n_blocks}")
    w = GGUFWriter(args.dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val = f.contents()
        if name == f"{arch}.block_count":
            val = args.layers
        elif name == "general.name":
            val = f"{val} (first {args.layers} layers)"
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, val, vtype, sub_type=sub)

    kept = 0
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= args.layers:
            continue
        qtype = t.tensor_type
        data = np.asarray(t.data)
        if args.embed_q4_1 and t.name == "token_embd.weight" and qtype != GGMLQuantizationType.Q4_1:
            # Dequantized values, row by row (the reader gives the logical shape reversed).
            shape = [int(x) for x in reversed(t.shape)]
            dense = quants.dequantize(data, qtype).reshape(shape).astype(np.float32)
            qtype = GGMLQuantizationType.Q4_1
            data = quants.quantize(dense, qtype)
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
        kept += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{args.dst}: {kept} tensors, {args.layers} of {n_blocks} layers")


if __name__ == "__main__":
    main()
