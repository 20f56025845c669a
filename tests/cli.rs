//! The `samkv` binary on bad input (clear error, non-zero exit, never a panic) and concurrent
//! ingestion into one store.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn samkv(args: &[&str], store: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samkv"))
        .args(args)
        .env("SAMKV_STORE", store)
        .env_remove("SAMKV_MODELS")
        .output()
        .expect("run samkv")
}

/// Asserts a clean failure whose message contains `needle`.
fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "samkv panicked: {err}");
    assert!(err.contains("error:"), "no error line: {err}");
    assert!(
        err.contains(needle),
        "error should mention {needle:?}: {err}"
    );
}

#[test]
fn missing_model_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = samkv(
        &[
            "ask",
            "--model",
            "/nonexistent/model.gguf",
            "--method",
            "reuse",
            "hi?",
        ],
        tmp.path(),
    );
    fails_with(&out, "/nonexistent/model.gguf");
}

#[test]
fn unknown_model_name_lists_the_known_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = samkv(
        &["ask", "--model", "gpt-17", "--method", "reuse", "hi?"],
        tmp.path(),
    );
    fails_with(&out, "smollm2");
}

#[test]
fn truncated_model_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(model_path(SMOLLM2)).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = samkv(
        &[
            "ask",
            "--model",
            cut.to_str().unwrap(),
            "--method",
            "reuse",
            "hi?",
        ],
        tmp.path(),
    );
    fails_with(&out, "truncated");
}

#[test]
fn unknown_architecture() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpt2.gguf");
    let t = candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &q)],
    )
    .unwrap();
    drop(f);
    let out = samkv(
        &[
            "ask",
            "--model",
            path.to_str().unwrap(),
            "--method",
            "reuse",
            "hi?",
        ],
        tmp.path(),
    );
    fails_with(&out, "unsupported model architecture `gpt2`");
}

#[test]
fn prompt_over_the_context_length() {
    let tmp = tempfile::tempdir().unwrap();
    let doc = tmp.path().join("long.txt");
    std::fs::write(&doc, "word ".repeat(9000)).unwrap();
    let model = model_path(SMOLLM2);
    let out = samkv(
        &[
            "ask",
            "--model",
            model.to_str().unwrap(),
            "--doc",
            doc.to_str().unwrap(),
            "--method",
            "reuse",
            "hi?",
        ],
        tmp.path(),
    );
    fails_with(&out, "context length");
}

#[test]
fn empty_question() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_path(SMOLLM2);
    let out = samkv(
        &["ask", "--model", model.to_str().unwrap(), "  "],
        tmp.path(),
    );
    fails_with(&out, "question is empty");
}

#[test]
fn unknown_method() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_path(SMOLLM2);
    let out = samkv(
        &[
            "ask",
            "--model",
            model.to_str().unwrap(),
            "--method",
            "magic",
            "hi?",
        ],
        tmp.path(),
    );
    fails_with(&out, "unknown method `magic`");
}

/// Two processes ingest overlapping document sets into one store at once: every document
/// ends up stored exactly once and readable.
#[test]
fn concurrent_ingest_stores_each_document_once() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    let text = std::fs::read_to_string(shared_data("musique_s.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mut paths = Vec::new();
    for (i, c) in first["ctxs"].as_array().unwrap().iter().take(6).enumerate() {
        let words: Vec<&str> = c["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .take(60)
            .collect();
        let p = docs.join(format!("d{i}.txt"));
        std::fs::write(&p, words.join(" ")).unwrap();
        paths.push(p.to_str().unwrap().to_string());
    }
    let store = tmp.path().join("store");
    let model = model_path(SMOLLM2);
    let spawn = |set: &[String]| {
        let mut args = vec![
            "ingest".to_string(),
            "--model".into(),
            model.to_str().unwrap().into(),
        ];
        args.extend(set.iter().cloned());
        Command::new(env!("CARGO_BIN_EXE_samkv"))
            .args(&args)
            .env("SAMKV_STORE", &store)
            .spawn()
            .unwrap()
    };
    // Sets {0..4} and {2..6}: documents 2 and 3 are ingested by both.
    let mut a = spawn(&paths[0..4]);
    let mut b = spawn(&paths[2..6]);
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let ls = samkv(&["store", "ls"], &store);
    assert!(ls.status.success());
    let listing = String::from_utf8_lossy(&ls.stdout);
    // Six documents plus the shared preamble, each once.
    assert_eq!(listing.lines().count(), 7, "{listing}");
    let verify = samkv(&["store", "verify"], &store);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// The README's first commands: a plain question gets the model's own chat (and "Paris"), and
/// the two-document question keeps the RAG answer the README shows.
#[test]
fn plain_question_and_readme_rag_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_path(SMOLLM2);
    let m = model.to_str().unwrap();
    let out = samkv(
        &["ask", "--model", m, "What is the capital of France?"],
        tmp.path(),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "plain answer: {stdout:?}");
    assert_eq!(stdout.trim(), README_PLAIN_ANSWER);
    assert!(stderr.contains("[none: no documents"), "{stderr}");

    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/docs");
    let (e, l) = (docs.join("eiffel.txt"), docs.join("louvre.txt"));
    let args = [
        "ask",
        "--model",
        m,
        "--doc",
        e.to_str().unwrap(),
        "--doc",
        l.to_str().unwrap(),
        "Who designed the Eiffel Tower?",
    ];
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for (round, fresh) in [
        (1, "prefilling 2 new documents"),
        (2, "all documents from the store"),
    ] {
        let out = samkv(&args, tmp.path());
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stdout.trim(), README_RAG_ANSWER, "round {round}");
        // Both times are reported: prefilling new documents, and the method's own TTFT.
        assert!(
            stderr.contains(fresh) && stderr.contains("ttft"),
            "{stderr}"
        );
        assert!(stderr.starts_with("[samkv("), "{stderr}");
    }
    // A stop string of several tokens: nothing of it reaches stdout, not even its first
    // tokens (they are held back until the stop string is told apart from plain text).
    let stopped = [&args[..], &["--stop", " and Gustave"]].concat();
    let out = samkv(&stopped, tmp.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "The Eiffel Tower was designed by Gustave Eiffel"
    );
    assert!(
        readme.contains(README_RAG_ANSWER),
        "README shows another answer"
    );
    assert!(
        readme.contains(README_PLAIN_ANSWER),
        "README shows another plain answer"
    );
}

const README_RAG_ANSWER: &str =
    "The Eiffel Tower was designed by Gustave Eiffel and Gustave Eiffelauboeuf.";
const README_PLAIN_ANSWER: &str = "The capital of France is Paris.";

/// A directory ingest skips (and counts) a file that is not UTF-8 text; `store ls` names
/// each entry's source.
#[test]
fn ingest_skips_non_utf8_and_store_ls_names_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "Paris is the capital of France.").unwrap();
    std::fs::write(docs.join("b.txt"), [0x50u8, 0xff, 0xfe, 0x41]).unwrap();
    let store = tmp.path().join("store");
    let model = model_path(SMOLLM2);
    let out = samkv(
        &[
            "ingest",
            "--model",
            model.to_str().unwrap(),
            docs.to_str().unwrap(),
        ],
        &store,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout
            .contains("1 documents: 1 newly stored, 0 already cached; 1 skipped (not UTF-8 text)"),
        "{stdout}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("skipped")
            && format!("{stdout}{stderr}").contains("b.txt"),
        "{stdout}{stderr}"
    );
    let ls = samkv(&["store", "ls"], &store);
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.status.success());
    assert!(
        listing
            .lines()
            .any(|l| l.ends_with(&docs.join("a.txt").display().to_string())),
        "{listing}"
    );
    assert!(
        listing.lines().any(|l| l.ends_with("(preamble)")),
        "{listing}"
    );
}

/// `--shape`: random weights at a known shape with the tokenizer of `--model` run the whole
/// RAG path (ingest, SamKV, decode); an unknown shape is a clear error.
#[test]
fn shape_only_model_runs_rag_with_the_models_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let doc = tmp.path().join("doc.txt");
    std::fs::write(&doc, "The Louvre is a museum in Paris. It opened in 1793.").unwrap();
    let model = model_path(SMOLLM2);
    let model = model.to_str().unwrap();
    let doc = doc.to_str().unwrap();
    let args = |shape: &'static str| {
        vec![
            "ask",
            "--model",
            model,
            "--shape",
            shape,
            "--method",
            "samkv",
            "--doc",
            doc,
            "--max-tokens",
            "3",
            "When did it open?",
        ]
    };
    let out = samkv(&args("smollm2-135m"), &tmp.path().join("store"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("shape-only model: smollm2-135m"), "{err}");
    assert!(err.contains("samkv"), "no stats line: {err}");
    fails_with(
        &samkv(&args("gpt-17"), &tmp.path().join("store")),
        "unknown shape `gpt-17`",
    );
}
