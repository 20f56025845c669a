"""Drives a running `samkv serve` through the official OpenAI Python client.

Run by tests/openai_client.rs (so by `cargo test`), which starts the server:

    python3 tests/openai_client.py BASE_URL API_KEY LOUVRE_TEXT_FILE

Exits non-zero (never skips) when the `openai` package is missing or any check fails;
scripts/test.sh installs the pinned client.
"""

import sys
import threading

try:
    import openai
except ImportError as e:  # a missing client is a failure, not a skip
    sys.exit(f"the openai package is missing ({e}); run `python3 -m pip install openai==3.63.0`")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expect(exc, what, f):
    try:
        f()
    except exc as e:
        print(f"ok: {what}: {type(e).__name__}: {e.message}")
        return e
    raise AssertionError(f"{what}: expected {exc.__name__}, got no error")


def main():
    base, key, louvre_file = sys.argv[1], sys.argv[2], sys.argv[3]
    louvre = open(louvre_file, encoding="utf-8").read()
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"one model listed: {ids}")
    model = ids[0]
    check(client.models.retrieve(model).id == model, "models.retrieve")
    print(f"ok: models.list -> {model}")

    # A plain chat: the model's own chat template, no documents.
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    text = r.choices[0].message.content
    check(r.object == "chat.completion" and r.choices[0].message.role == "assistant", r)
    check("Paris" in text, f"plain answer mentions Paris: {text!r}")
    check(r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 24, r.usage)
    check(r.model_extra["samkv"]["method"] == "none", r.model_extra)
    print(f"ok: chat plain -> {text!r}")

    # Streaming with usage in a last chunk.
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text, f"stream {streamed!r} equals the full answer {text!r}")
    check(chunks[-1].usage is not None and chunks[-1].choices == [], chunks[-1])
    check(chunks[-1].usage.completion_tokens == r.usage.completion_tokens, chunks[-1].usage)
    check(any(c.choices and c.choices[0].finish_reason for c in chunks), "a finish_reason")
    print(f"ok: chat stream, {len(chunks)} chunks, usage {chunks[-1].usage.total_tokens}")

    # Text completion.
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    check(c.object == "text_completion" and isinstance(c.choices[0].text, str), c)
    check(c.choices[0].finish_reason in ("stop", "length"), c)
    print(f"ok: completions -> {c.choices[0].text!r}")

    # samkv's fields through extra_body: an inline document with a method, then by id.
    up = client.post("/documents", body={"id": "louvre", "text": louvre}, cast_to=object)
    check(up["id"] == "louvre", up)
    for docs in ([{"text": louvre}], ["louvre"]):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Which museum houses the Mona Lisa?"}],
            max_tokens=8,
            temperature=0,
            extra_body={"documents": docs, "kv": {"method": "reuse"}},
        )
        check(r.model_extra["samkv"]["method"] == "reuse", r.model_extra)
        check(len(r.model_extra["samkv"]["documents"]) == 1, r.model_extra)
        check(r.usage.prompt_tokens > 100, r.usage)
    check(r.usage.prompt_tokens_details.cached_tokens > 0, r.usage)
    print(f"ok: documents and kv via extra_body -> {r.choices[0].message.content!r}")
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Which museum houses the Mona Lisa?"}],
        max_tokens=8,
        temperature=0,
        extra_body={"retrieve": {"top_k": 1}},
    )
    check(r.model_extra["samkv"]["documents"][0]["source"] == "retrieved", r.model_extra)
    print("ok: retrieve via extra_body")

    # Errors arrive as the client's typed exceptions.
    q = [{"role": "user", "content": "Hi"}]
    e = expect(
        openai.BadRequestError,
        "a misspelt samkv field",
        lambda: client.chat.completions.create(model=model, messages=q, extra_body={"documentz": []}),
    )
    check(e.param == "documentz" or "documentz" in e.message, e.body)
    expect(
        openai.BadRequestError,
        "an OpenAI feature samkv lacks",
        lambda: client.chat.completions.create(model=model, messages=q, logprobs=True),
    )
    expect(
        openai.NotFoundError,
        "an unknown document",
        lambda: client.chat.completions.create(model=model, messages=q, extra_body={"documents": ["nope"]}),
    )
    expect(
        openai.NotFoundError,
        "an unknown model",
        lambda: client.chat.completions.create(model="gpt-17", messages=q),
    )
    bad = openai.OpenAI(base_url=base + "/v1", api_key=key + "x", max_retries=0)
    expect(openai.AuthenticationError, "a wrong API key", lambda: bad.models.list())

    # The server runs with --queue 1: while a stream holds the slot, the next request is
    # refused with 429, which the client raises as RateLimitError.
    stream = client.completions.create(
        model=model,
        prompt="Once upon a time",
        max_tokens=2000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))
    check(first.choices is not None, first)
    expect(
        openai.RateLimitError,
        "a full queue",
        lambda: client.chat.completions.create(model=model, messages=q, max_tokens=2),
    )
    stream.close()
    print("all checks passed")


if __name__ == "__main__":
    main()
