//! Issue 19, the store side: a full disk (a real tmpfs of a few MiB), killed writers, entries
//! that cannot be read, and Redis stopped and restarted under a running server. Mounting a
//! tmpfs needs root (CI runs as root); elsewhere these tests fail saying so, never skip.

mod serve_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use serve_common::{bin, expect_error, model_path, samkv, Redis, Server};

/// A tmpfs of `kib` KiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    fn new(kib: usize) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "these tests fill a real filesystem: mounting a tmpfs needs root (CI runs as root); \
             mount said: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { _dir: dir, path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// A distinct document of roughly 60 tokens.
fn text(i: usize) -> String {
    format!(
        "Report {i}. The harbour of town number {i} was rebuilt in the year {}. Its lighthouse, \
         painted red and white, guides ships past the northern rocks, and the old market beside \
         it sells fish, bread and wool every morning except on the day of the festival {i}.",
        1700 + i
    )
}

fn count_entries(store: &Path) -> usize {
    let (ok, out, err) = samkv(&["--store", store.to_str().unwrap(), "store", "ls"]);
    assert!(ok, "store ls failed: {err}");
    out.lines().filter(|l| !l.trim().is_empty()).count()
}

#[test]
fn ingest_on_a_full_disk_exits_non_zero_with_the_count() {
    let fs = Tmpfs::new(4096);
    let docs = tempfile::tempdir().expect("tempdir");
    for i in 0..8 {
        std::fs::write(docs.path().join(format!("d{i}.txt")), text(i)).expect("write doc");
    }
    let store = fs.path.join("store");
    let model = model_path();
    let (ok, out, err) = samkv(&[
        "--store",
        store.to_str().unwrap(),
        "ingest",
        "--model",
        model.to_str().unwrap(),
        docs.path().to_str().unwrap(),
    ]);
    assert!(!ok, "ingest succeeded on a full disk:\n{out}\n{err}");
    let stored = out.lines().filter(|l| l.starts_with("stored ")).count();
    let failed = err.lines().filter(|l| l.contains("was not stored")).count();
    assert!(stored >= 1 && failed >= 1, "{out}\n{err}");
    assert_eq!(stored + failed, 8, "{out}\n{err}");
    eprintln!("full disk: ingest stored {stored}, reported {failed} failed writes");
    assert!(
        out.contains(&format!("{stored} newly stored"))
            && out.contains(&format!("{failed} failed to store")),
        "{out}"
    );
    assert!(
        err.contains(&format!("{failed} of 8 documents could not be stored"))
            && err.contains("No space left"),
        "{err}"
    );
    // What ingest said it stored is there (plus the preamble), and nothing half-written is.
    assert_eq!(count_entries(&store), stored + 1);
    let (ok, out, err) = samkv(&["--store", store.to_str().unwrap(), "store", "verify"]);
    assert!(ok, "{out}{err}");
}

#[test]
fn uploads_on_a_full_disk_are_507_and_every_200_survives_a_restart() {
    let fs = Tmpfs::new(4096);
    let logs = tempfile::tempdir().expect("tempdir");
    let store = fs.path.join("store");
    let store = store.to_str().unwrap();
    let s = Server::start(store, logs.path(), &["--method", "reuse"]);
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..8 {
        let id = format!("doc-{i}");
        let (st, v) = s.post("/v1/documents", &json!({"id": id, "text": text(i)}));
        match st {
            200 => acked.push(id),
            _ => {
                let e = expect_error((st, v), 507);
                assert_eq!(e["code"], "insufficient_storage", "{e}");
                refused += 1;
            }
        }
    }
    assert!(
        !acked.is_empty() && refused >= 1,
        "acked {acked:?}, refused {refused}"
    );
    eprintln!(
        "full disk: {} uploads acknowledged, {refused} refused with 507",
        acked.len()
    );
    drop(s);
    let s = Server::start(store, logs.path(), &["--method", "reuse"]);
    for id in &acked {
        let (st, d) = s.get(&format!("/v1/documents/{id}"));
        assert_eq!(st, 200, "acknowledged upload {id} lost: {d}");
    }
    let (st, list) = s.get("/v1/documents");
    assert_eq!(st, 200);
    assert_eq!(
        list["data"].as_array().map(Vec::len),
        Some(acked.len()),
        "{list}"
    );
    // Their KV is in the store too: a chat over them computes nothing new.
    let (st, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Which year?"}],
                "documents": [acked[0]], "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(s.metric("samkv_cache_misses_total"), 0.0);
}

#[test]
fn gc_removes_temporaries_of_killed_writers_and_skips_unreadable_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let st = store.to_str().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for i in 0..6 {
        std::fs::write(docs.join(format!("d{i}.txt")), text(i)).unwrap();
    }
    let model = model_path();
    // Writers killed at different points of their run (kill -9).
    for round in 0..5u64 {
        let mut child = Command::new(bin())
            .args(["--store", st, "ingest", "--model", model.to_str().unwrap()])
            .arg(&docs)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ingest");
        std::thread::sleep(Duration::from_millis(800 + 300 * round));
        let _ = child.kill();
        let _ = child.wait();
    }
    // And a writer certain to have died holding a temporary: its name carries its pid.
    let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
    let pid = child.id();
    std::fs::create_dir_all(store.join("tmp")).unwrap();
    let tmp = store.join("tmp").join(format!("abc.{pid}.00ff.tmp"));
    std::fs::write(&tmp, vec![0u8; 1 << 20]).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let (ok, out, err) = samkv(&["--store", st, "store", "gc"]);
    assert!(ok, "{out}{err}");
    assert!(!tmp.exists(), "gc kept a dead writer's temporary: {out}");
    let left: Vec<_> = std::fs::read_dir(store.join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "temporaries left after gc: {left:?}");
    let (ok, out, err) = samkv(&["--store", st, "store", "verify"]);
    assert!(ok, "killed writers left a bad entry: {out}{err}");

    // A full run after the kills stores everything.
    let (ok, out, err) = samkv(&[
        "--store",
        st,
        "ingest",
        "--model",
        model.to_str().unwrap(),
        docs.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    // An entry replaced by a directory: reported, kept, and the others still checked.
    let (_, ls, _) = samkv(&["--store", st, "store", "ls"]);
    let ids: Vec<&str> = ls
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(ids.len() >= 2, "{ls}");
    let entry = |id: &str| {
        store
            .join("objects")
            .join(&id[..2])
            .join(format!("{id}.safetensors"))
    };
    std::fs::remove_file(entry(ids[0])).unwrap();
    std::fs::create_dir(entry(ids[0])).unwrap();
    let mut bytes = std::fs::read(entry(ids[1])).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(entry(ids[1]), &bytes).unwrap();
    let (ok, out, _) = samkv(&["--store", st, "store", "verify"]);
    assert!(!ok);
    assert!(
        out.contains("unreadable:") && out.contains("corrupt:"),
        "{out}"
    );
    let (ok, out, err) = samkv(&["--store", st, "store", "gc", "--remove-corrupt"]);
    assert!(!ok, "gc must report the unreadable entry: {out}");
    assert!(
        out.contains("1 corrupt, 1 removed, 1 unreadable"),
        "{out}{err}"
    );
    assert!(entry(ids[0]).is_dir(), "an unreadable entry was removed");
    assert!(!entry(ids[1]).exists(), "the corrupt entry was kept");
    for id in &ids[2..] {
        assert!(entry(id).is_file(), "a good entry was removed");
    }
}

#[test]
fn redis_outage_fails_writes_with_503_and_loses_no_acknowledged_write() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut redis = Redis::start_persistent(data.path(), 0);
    let port = redis.port;
    let url = redis.url();
    let logs = tempfile::tempdir().expect("tempdir");
    let a = Server::start(&url, logs.path(), &["--method", "reuse"]);
    let b = Server::start(&url, logs.path(), &["--method", "reuse"]);
    let (st, v) = a.post("/v1/documents", &json!({"id": "one", "text": text(1)}));
    assert_eq!(st, 200, "{v}");

    // The id check is atomic across servers: different texts under one id, at once.
    let (ta, tb) = (text(2), text(3));
    let (ra, rb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| {
            a.post("/v1/documents", &json!({"id": "race", "text": ta}))
                .0
        });
        let hb = sc.spawn(|| {
            b.post("/v1/documents", &json!({"id": "race", "text": tb}))
                .0
        });
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let mut codes = [ra, rb];
    codes.sort();
    assert_eq!(
        codes,
        [200, 409],
        "both uploads of `race` answered {codes:?}"
    );
    let winner = a.get("/v1/documents/race").1["text"].clone();

    redis.stop();
    let (st, v) = a.post("/v1/documents", &json!({"id": "two", "text": text(4)}));
    let e = expect_error((st, v), 503);
    assert_eq!(e["code"], "store_unavailable", "{e}");
    // Not "not found": the registry could not be asked.
    expect_error(b.get("/v1/documents/one"), 503);
    let chat = |docs: serde_json::Value| {
        json!({"messages": [{"role": "user", "content": "Which year?"}],
               "documents": docs, "max_tokens": 2, "temperature": 0})
    };
    expect_error(b.post("/v1/chat/completions", &chat(json!(["one"]))), 503);
    // A chat that needs nothing stored still works (computed, not stored).
    let (st, r) = b.post("/v1/chat/completions", &chat(json!([{"text": text(5)}])));
    assert_eq!(st, 200, "{r}");

    // Redis back on the same port and data: every acknowledged write is there, the
    // refused one is not, and uploads work again.
    let _redis = Redis::start_persistent(data.path(), port);
    let t = Instant::now();
    let back = loop {
        let r = b.get("/v1/documents/one");
        if r.0 == 200 || t.elapsed() > Duration::from_secs(20) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(back.0, 200, "{}", back.1);
    assert_eq!(b.get("/v1/documents/race").1["text"], winner);
    expect_error(b.get("/v1/documents/two"), 404);
    let (st, v) = a.post("/v1/documents", &json!({"id": "two", "text": text(4)}));
    assert_eq!(st, 200, "{v}");
    let (st, l) = b.get("/v1/documents?limit=2");
    assert_eq!(st, 200);
    assert_eq!(l["has_more"], true, "{l}");
    let (_, l2) = b.get(&format!(
        "/v1/documents?limit=2&after={}",
        l["last_id"].as_str().unwrap()
    ));
    assert_eq!(l2["data"].as_array().map(Vec::len), Some(1), "{l2}");
    assert_eq!(l2["has_more"], false);
}
