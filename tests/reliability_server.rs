//! Issue 19, the server side: slow and idle clients, the connection cap under a low fd
//! limit, the per-request deadline and per-client cap, errors answered before a handler
//! runs (414, 431, a path that is not UTF-8, a wrong Host) in OpenAI's JSON shape, knob
//! overflow, the id alphabet, and deletes seen by every server sharing a store.

mod serve_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::{expect_error, Server};

fn addr(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// Sends raw bytes, returns (status, body) of the reply (connection closed by us after).
fn raw(s: &Server, request: &[u8]) -> (u16, String) {
    let mut c = TcpStream::connect(addr(s)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(request).expect("send");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    // Read until the headers and Content-Length bytes of body are in.
    loop {
        let n = c.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP reply: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// An error reply in OpenAI's shape, as (status, error object).
fn json_error(r: (u16, String), status: u16) -> Value {
    let v: Value = serde_json::from_str(&r.1)
        .unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {:?}", r.0, r.1));
    expect_error((r.0, v), status)
}

#[test]
fn errors_outside_handlers_are_openai_json_and_inputs_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = Server::start(
        store.to_str().unwrap(),
        dir.path(),
        &[
            "--method",
            "reuse",
            "--allowed-hosts",
            "127.0.0.1,localhost",
        ],
    );
    let host = "Host: 127.0.0.1\r\n";
    // A request target over --max-uri-bytes (8192).
    let long = format!(
        "GET /v1/documents/{} HTTP/1.1\r\n{host}\r\n",
        "a".repeat(10_000)
    );
    let e = json_error(raw(&s, long.as_bytes()), 414);
    assert_eq!(e["code"], "uri_too_long");
    // Headers over --max-header-bytes (32768).
    let big = format!(
        "GET /health HTTP/1.1\r\n{host}X-Big: {}\r\n\r\n",
        "b".repeat(40_000)
    );
    let e = json_error(raw(&s, big.as_bytes()), 431);
    assert_eq!(e["code"], "headers_too_large");
    // A path segment that is not UTF-8.
    let bad = format!("GET /v1/documents/%FF%FE HTTP/1.1\r\n{host}\r\n");
    let e = json_error(raw(&s, bad.as_bytes()), 400);
    assert_eq!(e["code"], "invalid_id");
    let bad = format!("DELETE /v1/documents/%C0 HTTP/1.1\r\n{host}\r\n");
    json_error(raw(&s, bad.as_bytes()), 400);
    // A Host not in --allowed-hosts (a DNS-rebinding page).
    let evil = b"GET /v1/documents HTTP/1.1\r\nHost: evil.example\r\n\r\n";
    let e = json_error(raw(&s, evil), 421);
    assert_eq!(e["code"], "host_not_allowed");
    // A body without Content-Type is not taken as JSON.
    let body = r#"{"text":"hello there"}"#;
    let req = format!(
        "POST /v1/documents HTTP/1.1\r\n{host}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    json_error(raw(&s, req.as_bytes()), 415);

    // Ids: `.` and `..` and hidden names are refused.
    for id in [".", "..", ".x"] {
        let e = expect_error(
            s.post("/v1/documents", &json!({"id": id, "text": "Some text."})),
            400,
        );
        assert_eq!(e["param"], "id", "{id}: {e}");
    }
    // Knobs at u64::MAX: a 400 naming the knob, never an internal message.
    for (k, v) in [
        ("num_initial", json!(u64::MAX)),
        ("block_size", json!(u64::MAX)),
        ("infllm_topk", json!(u64::MAX)),
        ("epic_k", json!(u64::MAX)),
        ("check_layer", json!(u64::MAX)),
        ("num_local", json!(1u64 << 40)),
    ] {
        let (method, key) = match k {
            "infllm_topk" => ("infllm", k),
            "epic_k" => ("epic", k),
            "check_layer" => ("cacheblend", k),
            _ => ("samkv", k),
        };
        let r = s.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi?"}],
                    "documents": [{"text": "A short document."}],
                    "kv": {"method": method, key: v}, "max_tokens": 2}),
        );
        let e = expect_error(r, 400);
        let m = e["message"].as_str().unwrap();
        assert!(m.contains(k) && !m.contains("internal"), "{k}: {e}");
    }
    let e = expect_error(s.get("/v1/documents?limit=0"), 400);
    assert_eq!(e["param"], "limit");
}

#[test]
fn slow_and_idle_clients_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = Server::start(
        store.to_str().unwrap(),
        dir.path(),
        &["--max-connections", "8", "--header-timeout-secs", "2"],
    );
    // 16 slowloris clients: half a request line each, never finished.
    let mut slow: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut c = TcpStream::connect(addr(&s)).expect("connect");
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c
        })
        .collect();
    // Over the cap: answered 503 in OpenAI's shape and closed.
    let t = Instant::now();
    let mut refused = 0;
    let mut closed = 0;
    for c in slow.iter_mut() {
        let mut buf = String::new();
        let _ = c.read_to_string(&mut buf);
        if buf.starts_with("HTTP/1.1 503") {
            assert!(buf.contains("too_many_connections"), "{buf}");
            refused += 1;
        } else {
            closed += 1;
        }
    }
    // The 8 admitted ones were closed by the header deadline, not held forever.
    assert_eq!(
        (refused, closed),
        (8, 8),
        "refused {refused}, closed {closed}"
    );
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let (st, h) = s.get("/health");
    assert_eq!((st, h["status"].as_str()), (200, Some("ok")));

    // A body that never arrives: 408 after --body-timeout-secs.
    let s2 = Server::start(
        dir.path().join("store2").to_str().unwrap(),
        dir.path(),
        &["--body-timeout-secs", "1"],
    );
    let mut c = TcpStream::connect(addr(&s2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"POST /v1/documents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"te")
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).unwrap_or(0);
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(
        reply.starts_with("HTTP/1.1 408") && reply.contains("body_timeout"),
        "{reply}"
    );
}

#[test]
fn a_low_fd_limit_does_not_stop_the_server_or_delete_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let st = store.to_str().unwrap();
    let s = Server::start_wrapped(
        &["prlimit", "--nofile=64:64", "--"],
        st,
        dir.path(),
        &[
            "--method",
            "reuse",
            "--max-connections",
            "24",
            "--header-timeout-secs",
            "2",
        ],
        &[],
    );
    let (code, up) = s.post(
        "/v1/documents",
        &json!({"id": "keep", "text": "The bridge opened in 1932."}),
    );
    assert_eq!(code, 200, "{up}");
    // 300 idle connections against a 64-fd process.
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(addr(&s)).ok())
        .collect();
    assert!(idle.len() > 64, "only {} connections opened", idle.len());
    // While they are held, store reads hit EMFILE at worst: an error, never a deletion.
    std::thread::sleep(Duration::from_secs(3));
    drop(idle);
    let t = Instant::now();
    let r = loop {
        let r = s.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "When?"}],
                    "documents": ["keep"], "max_tokens": 2, "temperature": 0}),
        );
        if r.0 == 200 || t.elapsed() > Duration::from_secs(20) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(s.get("/v1/documents/keep").0, 200);
    let kv = up["kv_id"].as_str().unwrap();
    assert!(
        store
            .join("objects")
            .join(&kv[..2])
            .join(format!("{kv}.safetensors"))
            .is_file(),
        "the document's KV entry was deleted"
    );
}

#[test]
fn deadline_and_per_client_cap_keep_the_batch_moving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let s = Server::start(
        store.to_str().unwrap(),
        dir.path(),
        &[
            "--max-requests-per-client",
            "2",
            "--request-timeout-secs",
            "3",
        ],
    );
    let long = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "Count to ten thousand."}],
               "max_tokens": 4000, "ignore_eos": true, "stream": stream})
    };
    let t = Instant::now();
    let (a, b, third) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| s.stream("/v1/chat/completions", &long(true)));
        let hb = sc.spawn(|| s.stream("/v1/chat/completions", &long(true)));
        // Both streams hold this client's two slots by now.
        std::thread::sleep(Duration::from_millis(1500));
        let third = s.post("/v1/chat/completions", &long(false));
        (ha.join().unwrap(), hb.join().unwrap(), third)
    });
    let e = expect_error(third, 429);
    assert_eq!(e["code"], "too_many_concurrent_requests");
    for (st, lines) in [a, b] {
        assert_eq!(st, 200);
        assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
        let err: Value = serde_json::from_str(&lines[lines.len() - 2]).expect("JSON");
        assert_eq!(err["error"]["code"], "timeout", "{err}");
    }
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // A non-streamed request past the deadline: 504, and the slot is free again.
    let e = expect_error(s.post("/v1/chat/completions", &long(false)), 504);
    assert_eq!(e["code"], "timeout");
    let (st, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{r}");
}

#[test]
fn two_servers_on_one_store_see_each_others_uploads_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let st = store.to_str().unwrap();
    let a = Server::start(st, dir.path(), &["--method", "reuse"]);
    let b = Server::start(st, dir.path(), &["--method", "reuse", "--private-cache"]);
    let text = "The lighthouse at the cape was lit for the first time in 1871.";
    let (code, up) = a.post("/v1/documents", &json!({"id": "cape", "text": text}));
    assert_eq!(code, 200, "{up}");
    assert_eq!(up["cached"], false);
    // B sees it at once, and with --private-cache does not tell whether it was stored.
    let (code, up2) = b.post("/v1/documents", &json!({"id": "cape2", "text": text}));
    assert_eq!(code, 200, "{up2}");
    assert!(up2["cached"].is_null(), "{up2}");
    let chat = json!({"messages": [{"role": "user", "content": "When?"}],
                      "documents": ["cape"], "max_tokens": 2, "temperature": 0});
    let (code, r) = b.post("/v1/chat/completions", &chat);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["usage"]["cached_tokens"], 0, "{r}");
    // A deletes; B no longer finds it, without a restart.
    assert_eq!(a.delete("/v1/documents/cape").0, 200);
    expect_error(b.get("/v1/documents/cape"), 404);
    expect_error(b.post("/v1/chat/completions", &chat), 404);
    expect_error(b.delete("/v1/documents/cape"), 404);
    // The KV stays while another id (cape2) names the same text.
    let kv = up["kv_id"].as_str().unwrap();
    let entry = store
        .join("objects")
        .join(&kv[..2])
        .join(format!("{kv}.safetensors"));
    assert!(entry.is_file());
    assert_eq!(b.delete("/v1/documents/cape2").0, 200);
    assert!(!entry.exists(), "the KV of a deleted document was kept");
    let (_, list) = a.get("/v1/documents");
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0), "{list}");
}
