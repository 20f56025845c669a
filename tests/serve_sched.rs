//! The serving loop under load (CPU, SmolLM2): running streams keep producing tokens while a
//! 10-document request is assembled, the KV budget refuses what can never fit, and stored
//! documents are prefetched from disk before the model thread needs them.

mod serve_common;

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use serde_json::{json, Value};
use serve_common::{expect_error, Server};

/// A distinct synthetic document of roughly `words` words.
fn doc(i: usize, words: usize) -> String {
    let topics = [
        "rivers",
        "bridges",
        "harbours",
        "markets",
        "libraries",
        "gardens",
    ];
    (0..words)
        .map(|w| match w % 12 {
            0 => format!("Record {i}."),
            3 => topics[(i + w) % topics.len()].to_string(),
            7 => format!("{}", i * 131 + w),
            _ => ["the", "old", "town", "kept", "its", "many", "well", "known"][w % 8].to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Streams `body` and counts its `data:` lines in `count`; returns when the stream ends.
fn stream_counting(s: &Server, body: &Value, count: &AtomicUsize) -> u16 {
    let r = s
        .agent
        .post(format!("{}/v1/chat/completions", s.url))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("POST");
    let status = r.status().as_u16();
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        if line.expect("read stream").starts_with("data: ") {
            count.fetch_add(1, SeqCst);
        }
    }
    status
}

#[test]
fn a_stream_keeps_producing_tokens_while_ten_new_documents_assemble() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = Arc::new(Server::start(
        store.to_str().expect("utf8"),
        dir.path(),
        &[
            "--method",
            "reuse",
            "--kv-budget",
            "100MiB",
            "--max-batch",
            "4",
        ],
    ));
    // Over the whole budget: refused at once with the numbers and the flag.
    let docs: Vec<Value> = (0..10).map(|i| json!({"text": doc(100 + i, 80)})).collect();
    let huge = json!({"messages": [{"role": "user", "content": "Which records mention rivers?"}],
        "documents": docs, "max_tokens": 4000, "ignore_eos": true, "temperature": 0});
    let e = expect_error(s.post("/v1/chat/completions", &huge), 400);
    assert_eq!(e["code"], "kv_budget_exceeded", "{e}");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("--kv-budget") && msg.contains("4000 max_tokens"),
        "{msg}"
    );
    assert_eq!(s.metric("samkv_requests_kv_refused_total"), 1.0);

    // A long stream over one short document.
    let a_tokens = Arc::new(AtomicUsize::new(0));
    let a = {
        let (s, n) = (s.clone(), a_tokens.clone());
        std::thread::spawn(move || {
            let body = json!({"messages": [{"role": "user", "content": "Tell a long story."}],
                "documents": [{"text": doc(1, 40)}], "max_tokens": 300, "ignore_eos": true,
                "temperature": 0, "stream": true});
            stream_counting(&s, &body, &n)
        })
    };
    s.wait_until(120, "the first stream to run", |_| {
        a_tokens.load(SeqCst) >= 5
    });
    // Ten documents no one has seen: ten prefills, one per round between decode steps.
    let docs: Vec<Value> = (0..10).map(|i| json!({"text": doc(10 + i, 80)})).collect();
    let b_body = json!({"messages": [{"role": "user", "content": "Which records mention rivers?"}],
        "documents": docs, "max_tokens": 4, "temperature": 0, "stream": true});
    let before = a_tokens.load(SeqCst);
    let r = s
        .agent
        .post(format!("{}/v1/chat/completions", s.url))
        .header("content-type", "application/json")
        .send(b_body.to_string())
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    let mut lines = BufReader::new(r.into_body().into_reader()).lines();
    let first = lines
        .find_map(|l| l.expect("read").strip_prefix("data: ").map(str::to_string))
        .expect("a first chunk");
    let during = a_tokens.load(SeqCst) - before;
    assert!(first.contains("chat.completion.chunk"), "{first}");
    for l in lines {
        l.expect("read");
    }
    assert_eq!(a.join().expect("stream thread"), 200);
    // Chunks, not tokens: the decoder holds back text that may be part of a longer piece.
    assert!(
        a_tokens.load(SeqCst) > 150,
        "the stream did not finish: {a_tokens:?}"
    );
    // Eleven assembly steps (10 prefills and the method), each followed by a decode step of
    // the running stream; before the split this was 0.
    assert!(
        during >= 10,
        "the running stream got only {during} chunks while 10 documents were assembled"
    );
    assert!(s.metric("samkv_assembly_steps_total") >= 12.0);
    s.wait_until(30, "reservations released", |s| {
        s.metric("samkv_kv_reserved_bytes") == 0.0
    });
    assert_eq!(s.metric("samkv_kv_budget_bytes"), (100u64 << 20) as f64);
}

#[test]
fn waiting_requests_documents_are_prefetched_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store = store.to_str().expect("utf8");
    // Upload ten documents, then restart: their KV is on disk only.
    let ids: Vec<String> = {
        let s = Server::start(store, dir.path(), &["--method", "reuse"]);
        (0..10)
            .map(|i| {
                let (st, v) = s.post("/v1/documents", &json!({"text": doc(200 + i, 60)}));
                assert!(st == 200 || st == 201, "{v}");
                v["id"].as_str().expect("id").to_string()
            })
            .collect()
    };
    // One request at a time: the second waits while the first decodes, and its documents
    // are read from disk meanwhile.
    let s = Arc::new(Server::start(
        store,
        dir.path(),
        &[
            "--method",
            "reuse",
            "--max-batch",
            "1",
            "--prefetch-bytes",
            "64MiB",
        ],
    ));
    let a_tokens = Arc::new(AtomicUsize::new(0));
    let a = {
        let (s, n) = (s.clone(), a_tokens.clone());
        std::thread::spawn(move || {
            let body = json!({"messages": [{"role": "user", "content": "Tell a long story."}],
                "documents": [{"text": doc(1, 30)}], "max_tokens": 150, "ignore_eos": true,
                "temperature": 0, "stream": true});
            stream_counting(&s, &body, &n)
        })
    };
    s.wait_until(120, "the first stream to run", |_| {
        a_tokens.load(SeqCst) >= 3
    });
    let docs: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Which records mention rivers?"}],
            "documents": docs, "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(a.join().expect("stream thread"), 200);
    assert!(v["usage"]["cached_tokens"].as_u64().unwrap_or(0) > 0, "{v}");
    let hits = s.metric("samkv_prefetch_hits_total");
    assert!(hits >= 10.0, "prefetch hits {hits}");
    s.wait_until(20, "the disk reads in the store sample", |s| {
        s.metric("samkv_store_backend_hits_total") >= 10.0
    });
    assert_eq!(
        s.metric("samkv_prefetch_bytes"),
        0.0,
        "every prefetched entry was used"
    );
}
