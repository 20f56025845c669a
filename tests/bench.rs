//! `samkv bench` end to end through the real binary: SmolLM2 on two MuSiQue examples (documents
//! cut short to keep it fast), every method this build has, result files that parse and agree
//! with the metrics, resume, and the sweep report.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use samkv::bench::qa::{Record, Summary};
use samkv::eval::{best_f1, exact_match, normalize_answer};
use samkv::methods::{MethodConfig, METHOD_NAMES};

/// The methods whose `build()` succeeds in this build; only "not available yet" is skipped.
fn available_methods() -> Vec<&'static str> {
    METHOD_NAMES
        .iter()
        .copied()
        .filter(|m| match MethodConfig::with_method(m).build() {
            Ok(_) => true,
            Err(e) if e.to_string().contains("not available in this build yet") => false,
            Err(e) => panic!("method {m} fails to build with its defaults: {e}"),
        })
        .collect()
}

fn bench(out: &Path, store: &Path, methods: &str, limit: usize, extra: &[&str]) -> Output {
    let model = model_path(SMOLLM2);
    let data = shared_data("musique_s.jsonl");
    let limit = limit.to_string();
    let mut args = vec![
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--methods",
        methods,
        "--limit",
        &limit,
        "--max-doc-tokens",
        "40",
        "--max-tokens",
        "8",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_samkv"))
        .args(&args)
        .env("SAMKV_STORE", store)
        .output()
        .expect("run samkv bench")
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "samkv bench failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn records(out: &Path) -> Vec<Record> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .expect("results.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a result line parses"))
        .collect()
}

/// Lines per (example, method).
fn counts(rs: &[Record]) -> BTreeMap<(String, String), usize> {
    let mut c = BTreeMap::new();
    for r in rs {
        *c.entry((r.example.clone(), r.method.clone())).or_insert(0) += 1;
    }
    c
}

#[test]
fn end_to_end_every_available_method_then_sweep_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, store) = (tmp.path().join("out"), tmp.path().join("store"));
    let methods = available_methods();
    assert!(methods.starts_with(&["recompute", "reuse"]), "{methods:?}");
    let stdout = ok(&bench(&out, &store, &methods.join(","), 2, &[]));

    let rs = records(&out);
    assert_eq!(
        rs.len(),
        2 * methods.len(),
        "one line per (example, method)"
    );
    assert!(counts(&rs).values().all(|&n| n == 1));
    let reference: HashMap<&str, &Record> = rs
        .iter()
        .filter(|r| r.method == "recompute")
        .map(|r| (r.example.as_str(), r))
        .collect();
    assert_eq!(reference.len(), 2);
    for r in &rs {
        assert!(
            r.error.is_none(),
            "{} on {}: {:?}",
            r.method,
            r.example,
            r.error
        );
        assert!(["0", "1"].contains(&r.example.as_str()));
        let reference = reference[r.example.as_str()];
        assert_eq!(r.reference_answer, reference.answer, "{}", r.method);
        assert_eq!(r.f1, best_f1(&r.answer, &r.golds));
        assert_eq!(r.em, exact_match(&r.answer, &r.golds));
        assert_eq!(
            r.agree,
            normalize_answer(&r.answer) == normalize_answer(&reference.answer)
        );
        let kl = r.kl.expect("finite KL");
        assert!(kl >= 0.0, "{}: KL {kl}", r.method);
        assert!(r.new_tokens >= 1 && r.new_tokens <= 8);
        let s = r.stats.as_ref().expect("stats");
        assert!(s.ttft_ms > 0.0 && s.context_tokens > 10 * 20, "{s:?}");
        assert!(
            s.kept_fraction > 0.0 && s.kept_fraction <= 1.0 + 1e-9,
            "{s:?}"
        );
        assert!(s.kv_bytes_kept > 0);
        assert!(r.peak_rss_bytes > 0);
        assert_eq!(r.ingest.docs, 10);
        assert_eq!(
            r.docs_computed, 0,
            "documents come from the store after ingestion"
        );
    }
    for r in reference.values() {
        assert!(r.agree && r.same_tokens && r.kl == Some(0.0));
        let s = r.stats.as_ref().unwrap();
        assert_eq!(s.kept_fraction, 1.0);
        assert_eq!(s.recomputed_tokens, s.context_tokens as f64);
        assert_eq!(s.load_ms, 0.0, "Recompute reads no stored KV");
    }
    let reuse = rs.iter().find(|r| r.method == "reuse").unwrap();
    assert_eq!(reuse.stats.as_ref().unwrap().recomputed_tokens, 0.0);
    assert!(reuse.kl.unwrap() > 0.0, "Reuse differs from Recompute");

    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
            .expect("summary.json parses");
    assert_eq!(summary.examples, 2);
    let names: Vec<&str> = summary.methods.iter().map(|m| m.method.as_str()).collect();
    assert_eq!(names, methods);
    let rec = &summary.methods[0];
    assert_eq!((rec.examples, rec.errors), (2, 0));
    assert_eq!(rec.agreement, Some(1.0));
    assert_eq!(rec.kl_mean, Some(0.0));
    for m in &summary.methods {
        let mine: Vec<&Record> = rs.iter().filter(|r| r.method == m.method).collect();
        let f1 = mine.iter().map(|r| r.f1).sum::<f64>() / 2.0;
        assert!((m.f1.unwrap() - f1).abs() < 1e-12);
        assert!(m.ttft_ms_median.unwrap() > 0.0);
    }
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(stdout.contains(&md), "the summary is printed");
    for m in &methods {
        assert!(md.contains(&format!("| {m} ")), "{m} row in {md}");
    }
    assert!(md.contains("| recompute ") && md.contains("| 100.0 "));

    // The sweep report over recompute and reuse: every pair is in the file already, so
    // nothing runs again; plots and the sweep table are written.
    let before = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let stdout = ok(&bench(&out, &store, "recompute,reuse", 2, &["--sweep"]));
    assert_eq!(
        std::fs::read_to_string(out.join("results.jsonl")).unwrap(),
        before
    );
    for f in [
        "f1_vs_kept.svg",
        "agreement_vs_kept.svg",
        "f1_vs_ttft.svg",
        "agreement_vs_ttft.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(svg.contains("<svg") && svg.contains("reuse"), "{f}");
    }
    let sweep = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(sweep.contains("| reuse ") && sweep.contains("f1_vs_kept.svg"));
    assert!(stdout.contains("Budget sweep"));
}

#[test]
fn resume_skips_done_pairs_and_refuses_other_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, store) = (tmp.path().join("out"), tmp.path().join("store"));
    ok(&bench(&out, &store, "recompute,reuse", 1, &[]));
    let first = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(first.lines().count(), 2);

    ok(&bench(&out, &store, "recompute,reuse", 2, &[]));
    let second = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert!(
        second.starts_with(&first),
        "the first example's lines are kept, not run again"
    );
    let rs = records(&out);
    let c = counts(&rs);
    assert_eq!(c.len(), 4);
    assert!(c.values().all(|&n| n == 1), "{c:?}");

    // Other settings in the same directory are refused, naming what differs.
    let o = bench(&out, &store, "recompute,reuse", 2, &["--no-chat"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("other settings") && err.contains("chat: true then, false now"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    assert_eq!(
        std::fs::read_to_string(out.join("results.jsonl")).unwrap(),
        second
    );

    // Recompute not listed: it still runs as the reference, and only reuse is written.
    let out2 = tmp.path().join("out2");
    ok(&bench(&out2, &store, "reuse", 2, &[]));
    let rs2 = records(&out2);
    assert_eq!(rs2.len(), 2);
    for r in &rs2 {
        assert_eq!(r.method, "reuse");
        let before = rs
            .iter()
            .find(|x| x.method == "recompute" && x.example == r.example)
            .unwrap();
        assert_eq!(r.reference_answer, before.answer);
        assert!(r.reference_ttft_ms > 0.0);
    }
}

#[test]
fn bad_method_settings_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_samkv"))
            .args([
                "bench",
                "--model",
                "/nonexistent/model.gguf",
                "--data",
                "/nonexistent.jsonl",
            ])
            .args(["--out", tmp.path().join("out").to_str().unwrap()])
            .args(args)
            .output()
            .expect("run samkv bench");
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let err = run(&["--methods", "reuse,epic:k=3"]);
    assert!(
        err.contains("epic has no knob `k`") && err.contains("epic_k"),
        "{err}"
    );
    let err = run(&["--methods", "reuse,blend"]);
    assert!(err.contains("unknown method `blend`"), "{err}");
    let err = run(&["--methods", "reuse", "--method", "epic"]);
    assert!(err.contains("--methods"), "{err}");
    let err = run(&["--methods", "reuse", "--grid", "epic:epic_k"]);
    assert!(err.contains("key=v1,v2"), "{err}");
    // Checked before the model is loaded: the missing model is not what fails.
    assert!(!err.contains("/nonexistent/model.gguf"), "{err}");
    assert!(!tmp.path().join("out").exists());
}
