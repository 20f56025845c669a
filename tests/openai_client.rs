//! The official OpenAI Python client against a real `samkv serve` (tests/openai_client.py).
//! The `openai` package must be installed (scripts/test.sh installs the pinned version): a
//! missing client fails this test, it is not skipped.

mod serve_common;

use std::process::Command;

use serve_common::{example_doc, samkv, Server};

#[test]
fn openai_python_client_works_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let index = dir.path().join("index");
    let (store_s, index_s) = (store.to_str().expect("utf8"), index.to_str().expect("utf8"));
    let model = serve_common::model_path();
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/docs");
    let (ok, _, err) = samkv(&[
        "--store",
        store_s,
        "ingest",
        "--model",
        model.to_str().expect("utf8"),
        "--index",
        index_s,
        docs,
    ]);
    assert!(ok, "ingest failed: {err}");
    let key = "sk-samkv-client-test";
    // --queue 1: the script provokes a 429 while a stream holds the only slot.
    let s = Server::start(
        store_s,
        dir.path(),
        &["--queue", "1", "--index", index_s, "--api-key", key],
    );
    let louvre = dir.path().join("louvre.txt");
    std::fs::write(&louvre, example_doc("louvre.txt")).expect("write");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let python = std::env::var("SAMKV_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(script)
        .arg(&s.url)
        .arg(key)
        .arg(&louvre)
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} ({e}); install Python 3"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "tests/openai_client.py failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
