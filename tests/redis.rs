//! The Redis tier against a real redis-server (started here on a free loopback port; the
//! tests fail if redis-server is not installed: run .ci/redis.sh).

mod serve_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use samkv::store::{
    doc_id, open_store, prefix_hash, DocId, DocMeta, KvStore, RedisStore, StoredDoc, FORMAT_VERSION,
};
use serde_json::json;
use serve_common::{example_doc, Redis, Server};

fn doc(seed: u32, t: usize) -> StoredDoc {
    let (layers, heads, hd) = (2, 2, 4);
    let dev = Device::Cpu;
    let mk = |s: f32| {
        (0..layers)
            .map(|l| {
                let data: Vec<f32> = (0..heads * t * hd)
                    .map(|i| s + l as f32 + i as f32 * 0.01)
                    .collect();
                Tensor::from_vec(data, (heads, t, hd), &dev)
                    .and_then(|x| x.to_dtype(DType::F16))
                    .expect("tensor")
            })
            .collect::<Vec<_>>()
    };
    let tokens: Vec<u32> = (0..t as u32).map(|i| seed * 1000 + i).collect();
    let meta = DocMeta {
        format_version: FORMAT_VERSION,
        model_fingerprint: "m".into(),
        tokenizer_fingerprint: "t".into(),
        prefix_hash: prefix_hash(&[1, 2]),
        prefix_len: 2,
        n_layers: layers,
        n_kv_heads: heads,
        head_dim: hd,
        dtype: "f16".into(),
        rope_layout: "split_half".into(),
        rope_base: 10000.0,
        keys_post_rope: true,
        positions: (2..2 + t as u32).collect(),
        token_ids: tokens.clone(),
        created_unix: 1,
        source: Some(format!("doc-{seed}.txt")),
    };
    let mut side = BTreeMap::new();
    side.insert(
        "samkv.qloc.16".to_string(),
        Tensor::ones((layers, heads, hd), DType::F32, &dev).expect("side"),
    );
    let d = StoredDoc::new(meta, mk(seed as f32), mk(-(seed as f32)), side).expect("doc");
    assert_eq!(d.id, doc_id("m", "t", &[1, 2], &tokens));
    d
}

fn raw(t: &Tensor) -> Vec<u8> {
    let mut v = Vec::new();
    t.write_bytes(&mut v).expect("bytes");
    v
}

#[test]
fn redis_store_roundtrip_corruption_and_outage() {
    let mut redis = Redis::start();
    let store = RedisStore::open(&redis.url()).expect("open");
    let (a, b) = (doc(1, 5), doc(2, 3));
    assert!(store.put(&a).expect("put"));
    assert!(
        !store.put(&a).expect("put again"),
        "an id names its content"
    );
    assert!(store.put(&b).expect("put b"));
    let got = store.get(&a.id).expect("get").expect("present");
    assert_eq!(got.meta, a.meta);
    for (x, y) in got.k.iter().zip(&a.k).chain(got.v.iter().zip(&a.v)) {
        assert_eq!(raw(x), raw(y));
    }
    assert_eq!(
        raw(&got.side["samkv.qloc.16"]),
        raw(&a.side["samkv.qloc.16"])
    );
    assert!(store.contains(&b.id).expect("contains"));
    let list = store.list().expect("list");
    assert_eq!(list.len(), 2);
    let la = list.iter().find(|e| e.id == a.id).expect("listed");
    assert_eq!((la.tokens, la.model_fingerprint.as_str()), (5, "m"));
    assert_eq!(la.source.as_deref(), Some("doc-1.txt"));
    let stats = store.stats().expect("stats");
    assert_eq!(stats.entries, 2);
    assert_eq!(stats.bytes, list.iter().map(|e| e.bytes).sum::<u64>());
    // The disk format's bytes: the disk store's decoder reads them.
    let bytes: Vec<u8> = store
        .conn()
        .run("test", |c| {
            redis::cmd("GET").arg(format!("samkv:kv:{}", a.id)).query(c)
        })
        .expect("raw get");
    let back = samkv::store::format::decode(&bytes, Some(&a.id)).expect("disk format");
    assert_eq!(back.meta, a.meta);
    assert!(raw(&back.k[1]) == raw(&a.k[1]), "k.1 differs");
    assert!(store.remove(&b.id).expect("remove"));
    assert!(!store.remove(&b.id).expect("remove again"));
    assert!(store.get(&b.id).expect("get removed").is_none());

    // A damaged entry is reported, not used.
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 3] ^= 0xff;
    store
        .conn()
        .run("test", |c| {
            redis::cmd("SET")
                .arg(format!("samkv:kv:{}", a.id))
                .arg(bad.as_slice())
                .query::<()>(c)
        })
        .expect("raw set");
    let e = store.get(&a.id).unwrap_err().to_string();
    assert!(e.contains(&format!("samkv:kv:{}", a.id)), "{e}");
    let other = DocId("f".repeat(64));
    assert!(store.get(&other).expect("absent").is_none());

    // open_store puts a memory tier in front.
    let tiered = open_store(&redis.url(), 1 << 20).expect("open_store");
    assert!(tiered.put(&b).expect("put via tier"));
    assert!(store.contains(&b.id).expect("written through"));
    assert!(tiered.get(&b.id).expect("get").is_some());

    // Redis gone: errors come back quickly instead of hanging.
    redis.stop();
    let t = Instant::now();
    assert!(store.get(&other).is_err());
    assert!(store.put(&a).is_err());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The memory tier still serves what it holds.
    assert!(tiered.get(&b.id).expect("from memory").is_some());
}

/// `samkv store` takes the same `--store redis://...` as every other command: ls, stats,
/// verify, gc --remove-corrupt and rm act on the Redis entries.
#[test]
fn store_cli_on_redis() {
    let redis = Redis::start();
    let store = RedisStore::open(&redis.url()).expect("open");
    let (a, b) = (doc(1, 5), doc(2, 3));
    store.put(&a).expect("put a");
    store.put(&b).expect("put b");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_samkv"))
            .args(["store", "--store", &redis.url()])
            .args(args)
            .output()
            .expect("run samkv");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, out, err) = cli(&["ls"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(a.id.as_str()) && out.contains(b.id.as_str()),
        "{out}"
    );
    assert!(out.contains("doc-1.txt"), "{out}");
    let (ok, out, err) = cli(&["stats"]);
    assert!(ok && out.contains("2 entries"), "{out}{err}");
    assert!(out.starts_with(&redis.url()), "{out}");
    let (ok, out, err) = cli(&["verify"]);
    assert!(ok && out.contains("all entries verified"), "{out}{err}");

    // One entry damaged: verify names it and fails; gc --remove-corrupt removes only it.
    let key = format!("samkv:kv:{}", a.id);
    let mut bytes: Vec<u8> = store
        .conn()
        .run("test", |c| redis::cmd("GET").arg(&key).query(c))
        .expect("raw get");
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    store
        .conn()
        .run("test", |c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(bytes.as_slice())
                .query::<()>(c)
        })
        .expect("raw set");
    let (ok, out, err) = cli(&["verify"]);
    assert!(!ok, "a corrupt entry must fail verify: {out}");
    assert!(out.contains(&format!("corrupt: {}", a.id)), "{out}");
    assert!(err.contains("1 of 2 entries corrupt"), "{err}");
    let (ok, out, err) = cli(&["gc", "--remove-corrupt"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 corrupt, 1 removed"), "{out}");
    assert!(store.get(&a.id).expect("get").is_none());
    assert!(store.contains(&b.id).expect("b kept"));

    let (ok, out, err) = cli(&["rm", b.id.as_str(), a.id.as_str()]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("{}: removed", b.id)), "{out}");
    assert!(out.contains(&format!("{}: not found", a.id)), "{out}");
    let (ok, out, _) = cli(&["stats"]);
    assert!(ok && out.contains("0 entries"), "{out}");
}

#[test]
fn two_servers_share_documents_and_survive_an_outage() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = redis.url();
    let args = ["--method", "reuse"];
    let a = Server::start(&url, dir.path(), &args);
    let b = Server::start(&url, dir.path(), &args);
    let eiffel = example_doc("eiffel.txt");

    let (st, up) = a.post("/v1/documents", &json!({"id": "eiffel", "text": eiffel}));
    assert_eq!(st, 200, "{up}");
    let tokens = up["tokens"].as_u64().expect("tokens");
    let (st, d) = b.get("/v1/documents/eiffel");
    assert_eq!((st, d["text"].as_str()), (200, Some(eiffel.as_str())));
    let (_, list) = b.get("/v1/documents");
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1));

    let req = |docs: serde_json::Value| {
        json!({"messages": [{"role": "user", "content": "When was the tower completed?"}],
               "documents": docs, "max_tokens": 6, "temperature": 0})
    };
    let (st, r) = b.post("/v1/chat/completions", &req(json!(["eiffel"])));
    assert_eq!(st, 200, "{r}");
    // B never computed the document: its KV (and the preamble's) came from Redis.
    assert!(
        r["usage"]["cached_tokens"].as_u64().expect("cached") >= tokens,
        "{r}"
    );
    assert_eq!(b.metric("samkv_cache_misses_total"), 0.0);
    assert_eq!(b.metric("samkv_cache_hits_total"), 1.0);
    assert!(b.metric("samkv_store_entries") >= 2.0);

    // Redis stops: requests still succeed by recomputing, and the errors are counted.
    redis.stop();
    let louvre = example_doc("louvre.txt");
    let (st, r) = b.post("/v1/chat/completions", &req(json!([{"text": louvre}])));
    assert_eq!(st, 200, "{r}");
    let (cached, prompt) = (
        r["usage"]["cached_tokens"].as_u64(),
        r["usage"]["prompt_tokens"].as_u64(),
    );
    assert!(
        cached.unwrap_or(0) + 20 < prompt.unwrap_or(0),
        "the new document was not computed: {r}"
    );
    assert!(b.metric("samkv_store_errors_total") >= 1.0);
    assert!(b.metric("samkv_cache_misses_total") >= 1.0);
    // The registry lives in Redis only: naming a document by id, or uploading one, fails
    // with 503 (never a 404, never a copy kept in one process).
    let (st, r) = a.post("/v1/chat/completions", &req(json!(["eiffel"])));
    assert_eq!(st, 503, "{r}");
    assert_eq!(r["error"]["code"], "store_unavailable", "{r}");
    let (st, up) = b.post("/v1/documents", &json!({"id": "louvre", "text": louvre}));
    assert_eq!(st, 503, "{up}");
    let (st, h) = b.get("/health");
    assert_eq!((st, h["status"].as_str()), (200, Some("ok")));
}
