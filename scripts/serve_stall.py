#!/usr/bin/env python3
"""The largest inter-token gap of a running stream while `samkv serve` assembles another
request with 10 documents it has never seen (docs/PERFORMANCE.md, "stall").

    python3 scripts/serve_stall.py --bin target/release/samkv \
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf [--doc-words 150] [-- serve flags]

Starts the server on a fresh store (loopback, any port), streams request A (one short
document, --a-tokens tokens, ignore_eos), and once A runs sends B (10 new documents, 4 tokens).
Prints A's largest gap between two chunks while B was assembled (from B's submission to its
first chunk), A's median gap outside that window, and B's time to first chunk. Standard
library only.
"""
import argparse
import http.client
import json
import re
import statistics
import subprocess
import tempfile
import threading
import time


def doc(i, words):
    topics = ["rivers", "bridges", "harbours", "markets", "libraries", "gardens"]
    filler = ["the", "old", "town", "kept", "its", "many", "well", "known"]
    out = []
    for w in range(words):
        k = w % 12
        out.append(f"Record {i}." if k == 0 else topics[(i + w) % 6] if k == 3
                   else str(i * 131 + w) if k == 7 else filler[w % 8])
    return " ".join(out)


def stream(port, body, on_chunk):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, (r.status, r.read())
    for line in r:
        if line.startswith(b"data: "):
            on_chunk(time.monotonic())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--doc-words", type=int, default=150)
    ap.add_argument("--a-tokens", type=int, default=120)
    ap.add_argument("serve_args", nargs="*")
    a = ap.parse_args()
    store = tempfile.mkdtemp(prefix="samkv-stall-")
    srv = subprocess.Popen([a.bin, "--store", store, "serve", "--model", a.model, "--port", "0",
                            "--method", "reuse", *a.serve_args],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = None
        for line in srv.stdout:
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "the server did not start"
        a_times = []
        body_a = {"messages": [{"role": "user", "content": "Tell a long story."}],
                  "documents": [{"text": doc(1, 40)}], "max_tokens": a.a_tokens, "ignore_eos": True,
                  "temperature": 0, "stream": True}
        t = threading.Thread(target=stream, args=(port, body_a, a_times.append))
        t.start()
        while len(a_times) < 20:
            time.sleep(0.01)
        body_b = {"messages": [{"role": "user", "content": "Which records mention rivers?"}],
                  "documents": [{"text": doc(10 + i, a.doc_words)} for i in range(10)],
                  "max_tokens": 4, "temperature": 0, "stream": True}
        b_first = []
        sent = time.monotonic()
        stream(port, body_b, lambda now: b_first.append(now))
        first = b_first[0]
        t.join()
        gaps_in, gaps_out = [], []
        for x, y in zip(a_times, a_times[1:]):
            (gaps_in if y > sent and x < first else gaps_out).append(y - x)
        print(json.dumps({
            "largest_gap_during_assembly_ms": round(max(gaps_in, default=first - sent) * 1e3, 1),
            "a_chunks_during_assembly": sum(1 for x in a_times if sent < x < first),
            "median_gap_otherwise_ms": round(statistics.median(gaps_out) * 1e3, 1),
            "b_ttft_ms": round((first - sent) * 1e3, 1),
        }))
    finally:
        srv.kill()
        srv.wait()


if __name__ == "__main__":
    main()
