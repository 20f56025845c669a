//! HTTP tests against a real `samkv serve` process with SmolLM2 on loopback.

mod serve_common;

use serde_json::{json, Value};
use serve_common::{example_doc, expect_error, samkv, Server};

fn chat(question: &str, docs: Value, method: &str) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": question}],
        "documents": docs,
        "kv": {"method": method},
        "max_tokens": 8,
        "temperature": 0,
    })
}

fn usage(v: &Value, k: &str) -> u64 {
    v["usage"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("usage.{k} missing in {v}"))
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

#[test]
fn documents_and_chat_with_every_method() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = Server::start(
        store.to_str().expect("utf8"),
        dir.path(),
        &["--method", "reuse"],
    );
    let (eiffel, louvre) = (example_doc("eiffel.txt"), example_doc("louvre.txt"));

    let (st, h) = s.get("/health");
    assert_eq!((st, h["status"].as_str()), (200, Some("ok")));

    // Upload: computed once, then found in the store.
    let (st, up) = s.post(
        "/v1/documents",
        &json!({"text": eiffel, "id": "eiffel", "metadata": {"src": "t"}}),
    );
    assert_eq!(st, 200, "{up}");
    assert_eq!(up["id"], "eiffel");
    assert_eq!(up["cached"], false);
    let doc_tokens = up["tokens"].as_u64().expect("tokens");
    assert!(doc_tokens > 20, "{up}");
    let (_, again) = s.post("/v1/documents", &json!({"text": eiffel, "id": "eiffel"}));
    assert_eq!(
        (again["cached"].as_bool(), again["tokens"].as_u64()),
        (Some(true), Some(doc_tokens))
    );
    expect_error(
        s.post("/v1/documents", &json!({"text": "other", "id": "eiffel"})),
        409,
    );
    let (st, l) = s.post("/v1/documents", &json!({"text": louvre}));
    assert_eq!(st, 200, "{l}");
    let louvre_id = l["id"].as_str().expect("id").to_string();
    assert_eq!(louvre_id, samkv::retrieval::text_id(&louvre));

    let (_, list) = s.get("/v1/documents");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| d["id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(ids.contains(&"eiffel") && ids.contains(&louvre_id.as_str()));
    assert!(
        list["data"][0].get("text").is_none(),
        "listing carries no text"
    );
    let (st, one) = s.get("/v1/documents/eiffel");
    assert_eq!(
        (st, one["text"].as_str(), &one["metadata"]),
        (200, Some(eiffel.as_str()), &json!({"src": "t"}))
    );

    // Chat over an uploaded and an inline document, with every method this build has.
    let docs = json!(["eiffel", {"text": louvre}]);
    let q = "When was the Eiffel Tower completed?";
    let mut per_method = Vec::new();
    for &m in samkv::methods::METHOD_NAMES {
        if let Err(e) = samkv::methods::MethodConfig::with_method(m).build() {
            assert!(
                e.to_string().contains("not available in this build yet"),
                "{m}: {e}"
            );
            let err = expect_error(
                s.post("/v1/chat/completions", &chat(q, docs.clone(), m)),
                400,
            );
            assert!(
                err["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not available"),
                "{err}"
            );
            eprintln!("skipping method {m}: not in this build");
            continue;
        }
        let (st, r) = s.post("/v1/chat/completions", &chat(q, docs.clone(), m));
        assert_eq!(st, 200, "{m}: {r}");
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(
            r["samkv"]["method"].as_str().map(|n| n.starts_with(m)),
            Some(true),
            "{r}"
        );
        assert!(!content(&r).trim().is_empty(), "{m}: empty answer {r}");
        let (p, c) = (usage(&r, "prompt_tokens"), usage(&r, "completion_tokens"));
        assert!((1..=8).contains(&c), "{r}");
        assert_eq!(usage(&r, "total_tokens"), p + c);
        let kept = usage(&r, "kv_tokens_kept");
        assert!(p > doc_tokens + 20 && kept > 0 && kept < p, "{m}: {r}");
        // The uploaded document (and the preamble) came from the store; what the method
        // recomputed does not count as cached (Recompute reuses nothing).
        let cached = usage(&r, "cached_tokens");
        if m == "recompute" {
            assert_eq!(cached, 0, "{r}");
        } else {
            let recomputed = usage(&r, "recomputed_tokens");
            assert!(cached + recomputed >= doc_tokens && cached > 0, "{m}: {r}");
        }
        assert_eq!(
            r["usage"]["prompt_tokens_details"]["cached_tokens"],
            r["usage"]["cached_tokens"]
        );
        per_method.push((m, r));
    }
    let get = |m: &str| {
        &per_method
            .iter()
            .find(|(n, _)| *n == m)
            .expect("method ran")
            .1
    };
    let (rc, ru) = (get("recompute"), get("reuse"));
    // Recompute recomputes and keeps the whole context; Reuse keeps it all and recomputes none.
    assert_eq!(usage(rc, "recomputed_tokens"), usage(rc, "kv_tokens_kept"));
    assert_eq!(usage(ru, "recomputed_tokens"), 0);
    assert_eq!(usage(ru, "kv_tokens_kept"), usage(rc, "kv_tokens_kept"));
    assert_eq!(usage(ru, "prompt_tokens"), usage(rc, "prompt_tokens"));
    for (m, r) in &per_method {
        assert!(
            usage(r, "kv_tokens_kept") <= usage(rc, "kv_tokens_kept"),
            "{m}"
        );
        assert!(
            usage(r, "recomputed_tokens") <= usage(rc, "kv_tokens_kept"),
            "{m}"
        );
    }
    // Greedy decoding is reproducible; the server default method (reuse) applies without kv.
    let mut no_kv = chat(q, docs.clone(), "reuse");
    no_kv.as_object_mut().expect("obj").remove("kv");
    let (_, r2) = s.post("/v1/chat/completions", &no_kv);
    assert_eq!(content(&r2), content(ru));
    assert_eq!(r2["samkv"]["method"], "reuse");

    // A chat without documents, a system message and history; a plain completion.
    let (st, r) = s.post(
        "/v1/chat/completions",
        &json!({
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "Name a color."}],
        "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n\n"]}),
    );
    assert_eq!(st, 200, "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    assert!(usage(&r, "completion_tokens") <= 4, "{r}");
    assert_eq!(r["samkv"]["documents"], json!([]));
    // Nothing to combine: the model's own chat, whatever the server's default method.
    assert_eq!(r["samkv"]["method"], "none", "{r}");
    assert_eq!(usage(&r, "cached_tokens"), 0);
    let (st, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert!(r["choices"][0]["text"].is_string(), "{r}");
    assert!(
        usage(&r, "prompt_tokens") >= 5 && usage(&r, "completion_tokens") <= 4,
        "{r}"
    );

    // Delete: gone from the registry, and chats naming it fail.
    let (st, d) = s.delete("/v1/documents/eiffel");
    assert_eq!((st, &d["deleted"]), (200, &json!(true)));
    expect_error(s.get("/v1/documents/eiffel"), 404);
    expect_error(s.delete("/v1/documents/eiffel"), 404);
    let e = expect_error(
        s.post("/v1/chat/completions", &chat(q, json!(["eiffel"]), "reuse")),
        404,
    );
    assert_eq!(e["param"], "documents[0]");

    assert!(s.metric("samkv_cache_hits_total") >= 3.0);
    assert!(s.metric("samkv_cache_misses_total") >= 2.0);
    assert!(s.metric("samkv_time_to_first_token_seconds_count") >= per_method.len() as f64);
    assert!(s.metric("samkv_time_per_output_token_seconds_count") >= 1.0);
    assert!(s.metric("samkv_store_memory_bytes") > 0.0);
    assert_eq!(s.metric("samkv_store_errors_total"), 0.0);
    let (_, text) = s.get_text("/metrics");
    assert!(
        text.contains("samkv_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("samkv_request_errors_total{route=\"/v1/documents/{id}\",status=\"404\"} 2"),
        "{text}"
    );
}

#[test]
fn streaming_cancellation_and_queue_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = Server::start(
        store.to_str().expect("utf8"),
        dir.path(),
        &["--method", "reuse", "--queue", "1"],
    );
    let louvre = example_doc("louvre.txt");
    let mut req = chat(
        "Which museum is the most visited?",
        json!([{"text": louvre}]),
        "reuse",
    );
    let (st, full) = s.post("/v1/chat/completions", &req);
    assert_eq!(st, 200, "{full}");

    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (st, lines) = s.stream("/v1/chat/completions", &req);
    assert_eq!(st, 200);
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).expect("chunk JSON"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        content(&full),
        "streamed text differs from the non-streamed answer"
    );
    let fin = &chunks[chunks.len() - 2];
    assert_eq!(
        fin["choices"][0]["finish_reason"],
        full["choices"][0]["finish_reason"]
    );
    let u = &chunks[chunks.len() - 1];
    assert_eq!(u["choices"], json!([]));
    for k in [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "kv_tokens_kept",
        "recomputed_tokens",
    ] {
        assert_eq!(u["usage"][k], full["usage"][k], "{k}");
    }
    // The first request computed the inline document; this one found it in the store.
    assert_eq!(full["usage"]["cached_tokens"], 0);
    assert!(usage(u, "cached_tokens") > 0, "{u}");

    // Streamed completions, with a stop string honoured across token boundaries.
    let (st, lines) = s.stream(
        "/v1/completions",
        &json!({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 12,
        "temperature": 0, "stream": true, "stop": [" 8"]}),
    );
    assert_eq!(st, 200);
    let text: String = lines
        .iter()
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str::<Value>(l).expect("chunk"))
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert!(!text.contains(" 8"), "stop string leaked: {text:?}");

    // A client that goes away stops its generation, and frees its queue slot.
    let long = json!({"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": true,
        "temperature": 0, "stream": true});
    let (st, first) = s.stream_lines("/v1/completions", &long, 2);
    assert_eq!((st, first.len()), (200, 2));
    s.wait_until(60, "the cancelled generation to stop", |s| {
        s.metric("samkv_requests_cancelled_total") >= 1.0 && s.metric("samkv_queue_depth") == 0.0
    });

    // --queue 1: while one request runs, the next is refused with 429.
    let s_url = s.url.clone();
    let holder = std::thread::spawn(move || {
        let a = serve_common::agent();
        let r = a
            .post(format!("{s_url}/v1/completions"))
            .header("content-type", "application/json")
            .send(json!({"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": true, "temperature": 0}).to_string())
            .expect("POST");
        r.status().as_u16()
    });
    s.wait_until(60, "the first request to run", |s| {
        s.metric("samkv_queue_depth") == 1.0
    });
    let e = expect_error(
        s.post("/v1/chat/completions", &chat("x?", json!([]), "reuse")),
        429,
    );
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert_eq!(holder.join().expect("holder"), 200);
    assert!(s.metric("samkv_requests_rejected_total") >= 1.0);
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
}

#[test]
fn bad_inputs_get_openai_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = Server::start(
        store.to_str().expect("utf8"),
        dir.path(),
        &[
            "--method",
            "reuse",
            "--max-documents",
            "2",
            "--max-document-tokens",
            "64",
        ],
    );
    let c = "/v1/chat/completions";
    let ok = || chat("What is it?", json!([]), "reuse");
    let with = |k: &str, v: Value| {
        let mut r = ok();
        r[k] = v;
        r
    };

    let e = expect_error(s.post_raw(c, "{\"messages\": [", "application/json"), 400);
    assert_eq!(e["code"], "invalid_json");
    expect_error(s.post_raw(c, "", "application/json"), 400);
    expect_error(s.post(c, &json!({"messages": "hi"})), 400);
    expect_error(s.post_raw(c, &ok().to_string(), "text/plain"), 415);
    let e = expect_error(
        s.post(
            c,
            &json!({"messages": [{"role": "system", "content": "x"}]}),
        ),
        400,
    );
    assert_eq!(e["param"], "messages");
    expect_error(s.post(c, &json!({"messages": [{"role": "wizard", "content": "x"}, {"role": "user", "content": "q"}]})), 400);

    // Documents.
    let e = expect_error(s.post(c, &with("documents", json!(["nope"]))), 404);
    assert_eq!(e["param"], "documents[0]");
    let e = expect_error(
        s.post(c, &with("documents", json!([{"text": "  \n"}]))),
        400,
    );
    assert_eq!(e["code"], "empty_document");
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(30);
    let e = expect_error(s.post(c, &with("documents", json!([{"text": long}]))), 400);
    assert_eq!(e["code"], "document_too_long");
    let huge = "x".repeat(64 * 64 + 1);
    let e = expect_error(s.post(c, &with("documents", json!([{"text": huge}]))), 400);
    assert_eq!(e["code"], "document_too_long");
    let e = expect_error(
        s.post(
            c,
            &with(
                "documents",
                json!([{"text": "a"}, {"text": "b"}, {"text": "c"}]),
            ),
        ),
        400,
    );
    assert_eq!(e["code"], "too_many_documents");
    expect_error(s.post(c, &with("documents", json!([3]))), 400);
    let e = expect_error(s.post(c, &with("retrieve", json!({"top_k": 1}))), 400);
    assert_eq!(e["param"], "retrieve");

    // Sampling parameters.
    for (k, v) in [
        ("temperature", json!(3)),
        ("temperature", json!(-1)),
        ("top_p", json!(0)),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(100000)),
        ("n", json!(2)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("stop", json!([""])),
    ] {
        let e = expect_error(s.post(c, &with(k, v.clone())), 400);
        assert_eq!(e["param"], k, "{k}={v}");
    }
    expect_error(s.post(c, &with("seed", json!(-1))), 400);
    expect_error(s.post(c, &with("max_tokens", json!("many"))), 400);

    // Method settings.
    let e = expect_error(s.post(c, &with("kv", json!({"method": "magic"}))), 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("unknown method"),
        "{e}"
    );
    let e = expect_error(s.post(c, &with("kv", json!({"methd": "reuse"}))), 400);
    assert_eq!(e["param"], "kv.methd");
    expect_error(s.post(c, &with("kv", json!({"ratio": "high"}))), 400);
    expect_error(s.post(c, &with("kv", json!("reuse"))), 400);

    // Uploads.
    let d = "/v1/documents";
    expect_error(s.post(d, &json!({"text": "hello", "id": "a/b"})), 400);
    let e = expect_error(s.post(d, &json!({"text": " "})), 400);
    assert_eq!(e["code"], "empty_document");
    expect_error(s.post(d, &json!({"id": "x"})), 400);
    let e = expect_error(s.post(d, &json!({"text": long})), 400);
    assert_eq!(e["code"], "document_too_long");

    // Completions and routing.
    expect_error(s.post("/v1/completions", &json!({"prompt": 5})), 400);
    expect_error(s.post("/v1/completions", &json!({"prompt": "  "})), 400);
    expect_error(s.get("/v1/nothing"), 404);
    expect_error(s.get(c), 405);

    // Still serving, and the errors were counted.
    let (st, r) = s.post(c, &ok());
    assert_eq!(st, 200, "{r}");
    let (_, text) = s.get_text("/metrics");
    assert!(
        text.contains("samkv_request_errors_total{route=\"/v1/chat/completions\",status=\"400\"}"),
        "{text}"
    );
    assert_eq!(s.metric("samkv_documents_uploaded_total"), 0.0);
}

#[test]
fn retrieval_from_an_ingested_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let index = dir.path().join("index");
    let (store_s, index_s) = (store.to_str().expect("utf8"), index.to_str().expect("utf8"));
    let model = serve_common::model_path();
    let model_s = model.to_str().expect("utf8");
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/docs");
    let (ok, out, err) = samkv(&[
        "--store", store_s, "ingest", "--model", model_s, "--index", index_s, docs,
    ]);
    assert!(ok, "ingest failed: {err}");
    assert!(out.contains("2 documents indexed"), "{out}");

    let (ok, out, err) = samkv(&[
        "--store",
        store_s,
        "ask",
        "--model",
        model_s,
        "--method",
        "reuse",
        "--index",
        index_s,
        "--retrieve",
        "1",
        "--max-tokens",
        "4",
        "Which museum houses the Mona Lisa?",
    ]);
    assert!(ok, "ask failed: {err}");
    assert!(!out.trim().is_empty());
    // It says what it retrieved.
    let louvre = samkv::retrieval::text_id(&example_doc("louvre.txt"));
    assert!(
        err.contains("retrieved 1 from") && err.contains(&format!("1. {louvre}")),
        "{err}"
    );
    let empty = dir.path().join("empty-index");
    let (ok, _, err) = samkv(&[
        "--store",
        store_s,
        "ask",
        "--model",
        model_s,
        "--method",
        "reuse",
        "--index",
        empty.to_str().expect("utf8"),
        "Which museum?",
    ]);
    assert!(!ok && err.contains("nothing matching"), "{err}");

    let s = Server::start(
        store_s,
        dir.path(),
        &["--method", "reuse", "--index", index_s],
    );
    let louvre_id = samkv::retrieval::text_id(&example_doc("louvre.txt"));
    let eiffel_id = samkv::retrieval::text_id(&example_doc("eiffel.txt"));
    let mut req = chat("Which museum houses the Mona Lisa?", json!([]), "reuse");
    req["retrieve"] = json!({"top_k": 1});
    let (st, r) = s.post("/v1/chat/completions", &req);
    assert_eq!(st, 200, "{r}");
    let used = &r["samkv"]["documents"];
    assert_eq!(used.as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(
        (used[0]["id"].as_str(), used[0]["source"].as_str()),
        (Some(louvre_id.as_str()), Some("retrieved"))
    );
    // `ingest` stored its KV in the same layout, so the server loads it instead of computing.
    assert_eq!(
        s.metric("samkv_cache_misses_total"),
        0.0,
        "ingested KV was not reused"
    );
    assert!(usage(&r, "cached_tokens") > 0);
    // Ingested documents can be named by id; retrieval skips ones given explicitly.
    req["documents"] = json!([louvre_id]);
    let (st, r) = s.post("/v1/chat/completions", &req);
    assert_eq!(st, 200, "{r}");
    let ids: Vec<&str> = r["samkv"]["documents"]
        .as_array()
        .expect("docs")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, [louvre_id.as_str(), eiffel_id.as_str()]);
    let (st, d) = s.get(&format!("/v1/documents/{louvre_id}"));
    assert_eq!((st, d["source"].as_str()), (200, Some("index")));

    // Uploads are indexed too.
    let (st, _) = s.post("/v1/documents", &json!({"id": "bio", "text": "Photosynthesis turns light into chemical energy in chloroplasts."}));
    assert_eq!(st, 200);
    let mut req = chat("What happens in chloroplasts?", json!([]), "reuse");
    req["retrieve"] = json!({"top_k": 1});
    let (st, r) = s.post("/v1/chat/completions", &req);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["samkv"]["documents"][0]["id"], "bio");
    let e = expect_error(
        s.post("/v1/chat/completions", &{
            req["retrieve"] = json!({"top_k": 17});
            req
        }),
        400,
    );
    assert_eq!(e["param"], "retrieve.top_k");
}

/// Token count of a plain chat as the model's own template renders it.
fn template_tokens(messages: &[(&str, &str)]) -> u64 {
    let model = serve_common::model_path();
    let mut f = std::fs::File::open(&model).expect("model");
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).expect("gguf");
    let tok = samkv::tokenizer::Tokenizer::from_gguf(&content).expect("tokenizer");
    let msgs: Vec<_> = messages
        .iter()
        .map(|(r, c)| samkv::tokenizer::ChatMessage::new(*r, *c))
        .collect();
    let text = tok.render_chat(&msgs, true).expect("render");
    (tok.encode(&text).expect("encode").len() + usize::from(tok.add_bos())) as u64
}

#[test]
fn system_role_models_and_unknown_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = Server::start(store.to_str().expect("utf8"), dir.path(), &[]);
    let c = "/v1/chat/completions";

    // A system message is the template's system role (it replaces the template's default
    // system prompt), not text prepended to the user turn.
    let (sys, q) = (
        "You are a helpful assistant.",
        "What is the capital of France?",
    );
    let (st, r) = s.post(
        c,
        &json!({"messages": [{"role": "system", "content": sys}, {"role": "user", "content": q}],
                "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        usage(&r, "prompt_tokens"),
        template_tokens(&[("system", sys), ("user", q)]),
        "{r}"
    );
    assert!(content(&r).contains("Paris"), "{r}");
    assert_eq!(r["samkv"]["method"], "none");
    // Earlier turns are turns of the template too.
    let turns = [("user", "Hi"), ("assistant", "Hello."), ("user", q)];
    let msgs: Vec<Value> = turns
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect();
    let (st, r) = s.post(c, &json!({"messages": msgs, "max_tokens": 2}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(usage(&r, "prompt_tokens"), template_tokens(&turns));

    // Models: the list, one model by id (or its known name), unknown ids 404.
    let (st, list) = s.get("/v1/models");
    assert_eq!(st, 200);
    let id = list["data"][0]["id"].as_str().expect("id").to_string();
    assert_eq!(id, "smollm2", "{list}");
    let (st, m) = s.get(&format!("/v1/models/{id}"));
    assert_eq!(
        (st, m["id"].as_str(), m["object"].as_str()),
        (200, Some(id.as_str()), Some("model"))
    );
    let (st, _) = s.get(&format!("/v1/models/{}", serve_common::SMOLLM2));
    assert_eq!(st, 200, "the file name is an alias");
    let e = expect_error(s.get("/v1/models/gpt-17"), 404);
    assert_eq!(e["code"], "model_not_found");
    let e = expect_error(
        s.post(
            c,
            &json!({"model": "gpt-17", "messages": [{"role": "user", "content": q}]}),
        ),
        404,
    );
    assert_eq!(e["param"], "model");

    // Unknown and unsupported fields are refused with a 400 that names them.
    let base = json!({"model": id, "messages": [{"role": "user", "content": q}], "max_tokens": 2});
    let with = |k: &str, v: Value| {
        let mut r = base.clone();
        r[k] = v;
        r
    };
    for (k, v, code) in [
        ("documentz", json!([]), "unknown_parameter"),
        ("logprobs", json!(true), "unsupported_parameter"),
        ("top_logprobs", json!(3), "unsupported_parameter"),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
            "unsupported_parameter",
        ),
        (
            "response_format",
            json!({"type": "json_object"}),
            "unsupported_parameter",
        ),
        ("frequency_penalty", json!(0.5), "unsupported_parameter"),
        ("presence_penalty", json!(1), "unsupported_parameter"),
    ] {
        let e = expect_error(s.post(c, &with(k, v.clone())), 400);
        assert_eq!(
            (e["param"].as_str(), e["code"].as_str()),
            (Some(k), Some(code)),
            "{k}={v}: {e}"
        );
        assert!(e["message"].as_str().unwrap_or("").contains(k), "{e}");
    }
    for (k, v) in [
        ("retrieve", json!({"top_k": 1, "query": "x"})),
        ("stream_options", json!({"include_usage": true, "x": 1})),
    ] {
        let e = expect_error(s.post(c, &with(k, v)), 400);
        assert!(
            e["message"].as_str().unwrap_or("").contains('x')
                || e["message"].as_str().unwrap_or("").contains("query"),
            "{e}"
        );
    }
    let e = expect_error(
        s.post(
            c,
            &with(
                "messages",
                json!([{"role": "user", "content": q, "name": "bob"}]),
            ),
        ),
        400,
    );
    assert!(e["message"].as_str().unwrap_or("").contains("name"), "{e}");
    let e = expect_error(
        s.post(
            "/v1/completions",
            &json!({"prompt": "Hi", "documents": ["x"]}),
        ),
        400,
    );
    assert_eq!(e["param"], "documents");
    let e = expect_error(
        s.post("/v1/documents", &json!({"text": "Hi", "meta": {}})),
        400,
    );
    assert_eq!(e["param"], "meta");
    // The "off" value of an unsupported field, nulls, `user` and stream_options are fine.
    let mut ok = with("frequency_penalty", json!(0));
    for (k, v) in [
        ("presence_penalty", json!(0.0)),
        ("logprobs", json!(false)),
        ("tools", json!(null)),
        ("response_format", json!({"type": "text"})),
        ("user", json!("u-1")),
        ("stream_options", json!({"include_usage": true})),
    ] {
        ok[k] = v;
    }
    let (st, r) = s.post(c, &ok);
    assert_eq!(st, 200, "{r}");
}

#[test]
fn api_key_body_limit_and_context_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let key = "sk-test-7a1c9e";
    let mut s = Server::start_env(
        store.to_str().expect("utf8"),
        dir.path(),
        &["--max-body-bytes", "65536", "--max-context-tokens", "120"],
        &[("SAMKV_API_KEY", key)],
    );
    // /health stays open (load balancers probe it); everything else needs the key.
    let (st, _) = s.get("/health");
    assert_eq!(st, 200);
    for path in [
        "/v1/models",
        "/metrics",
        "/v1/documents",
        "/v1/models/smollm2",
    ] {
        let e = expect_error(s.get(path), 401);
        assert_eq!(e["code"], "invalid_api_key", "{path}");
    }
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    expect_error(s.post("/v1/chat/completions", &chat), 401);
    s.key = Some(format!("{key}x"));
    let e = expect_error(s.get("/v1/models"), 401);
    assert!(
        e["message"].as_str().unwrap_or("").contains("incorrect"),
        "{e}"
    );
    s.key = Some(key.to_string());
    let (st, r) = s.get("/v1/models");
    assert_eq!(st, 200, "{r}");
    let (st, r) = s.post("/v1/chat/completions", &chat);
    assert_eq!(st, 200, "{r}");

    // 413 past --max-body-bytes, in OpenAI's shape; a body under it is read.
    let big = "word ".repeat(20_000);
    let e = expect_error(s.post("/v1/documents", &json!({"text": big})), 413);
    assert_eq!(e["code"], "request_too_large");
    assert!(e["message"].as_str().unwrap_or("").contains("65536"), "{e}");
    // --max-context-tokens counts system, documents and question together.
    let doc = "The quick brown fox jumps over the lazy dog. ".repeat(12);
    let mut rag = chat.clone();
    rag["documents"] = json!([{"text": doc}]);
    let e = expect_error(s.post("/v1/chat/completions", &rag), 400);
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("--max-context-tokens"),
        "{e}"
    );
    let mut long = chat.clone();
    long["messages"][0]["content"] = json!("Tell me more. ".repeat(40));
    let e = expect_error(s.post("/v1/chat/completions", &long), 400);
    assert_eq!(e["code"], "context_length_exceeded");

    // The key never reaches the log.
    let log = std::fs::read_to_string(&s.log).expect("log");
    assert!(log.contains("API key required"), "{log}");
    assert!(!log.contains(key), "the API key was logged: {log}");
}
