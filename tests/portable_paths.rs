//! Tests, scripts and docs hold no machine-specific absolute path: the suite must pass on a
//! fresh clone anywhere, with the shared folder at `../shared` beside the checkout and
//! nowhere else (tests/common.rs::shared_data finds it there).

use std::path::{Path, PathBuf};

/// Roots under which a path names one machine's layout. System paths (/tmp, /dev, /usr,
/// /proc, /etc) mean the same everywhere and are allowed.
const MACHINE_ROOTS: &[&str] = &[
    "work",
    "home",
    "root",
    "Users",
    "mnt",
    "opt",
    "srv",
    "scratch",
    "data",
    "workspace",
];

/// Raw records of past runs (logs, configs as they ran) are kept as they were written;
/// docs/RESULTS.md is being edited on main at the moment (its reproduction block names a
/// target directory) and is checked once that lands.
fn skipped(rel: &str) -> bool {
    rel == "docs/RESULTS.md"
        || (rel.starts_with("docs/") && rel.matches('/').count() > 1)
        || rel.starts_with("fuzz/corpus/")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The machine-specific absolute paths in `text` (one under a root of MACHINE_ROOTS).
fn absolute_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for root in MACHINE_ROOTS {
        let needle = format!("/{root}/");
        for (i, _) in text.match_indices(&needle) {
            // A path starts the word: not a URL's path, not the tail of a relative path.
            let prev = text[..i].chars().next_back();
            if prev.is_some_and(|c| c.is_alphanumeric() || "/.:_-~$}".contains(c)) {
                continue;
            }
            let end = text[i..]
                .find(|c: char| c.is_whitespace() || "\"'`),;]".contains(c))
                .map_or(text.len(), |n| i + n);
            found.push(text[i..end].to_string());
        }
    }
    found
}

#[test]
fn the_checker_finds_absolute_paths_and_spares_relative_ones() {
    // Spelled in pieces so that this file passes its own check.
    let (w, h) = (
        format!("/{}/shared/data/x.jsonl", "work"),
        format!("/{}/u/m.gguf", "home"),
    );
    let bad = absolute_paths(&format!("open(\"{w}\") or `{h}`"));
    assert_eq!(bad, [w, h]);
    for ok in [
        "../shared/data/x.jsonl",
        "https://example.org/home/x",
        "$HOME/work/x",
        "/tmp/store /dev/null /usr/bin/env",
        "target/release/x",
    ] {
        assert!(absolute_paths(ok).is_empty(), "{ok}");
    }
}

#[test]
fn no_test_script_or_doc_names_an_absolute_path() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    for d in ["tests", "scripts", ".ci", "docs", "fuzz", "examples"] {
        files(&root.join(d), &mut all);
    }
    all.extend(["README.md", "Cargo.toml", "build.rs"].map(|f| root.join(f)));
    let mut bad = Vec::new();
    let mut checked = 0;
    for p in all {
        let rel = p
            .strip_prefix(root)
            .unwrap_or(&p)
            .to_string_lossy()
            .replace('\\', "/");
        if skipped(&rel) {
            continue;
        }
        // Binary files (models, corpora) are not text to check.
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        checked += 1;
        for (n, line) in text.lines().enumerate() {
            for a in absolute_paths(line) {
                bad.push(format!("{rel}:{}: {a}", n + 1));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} files checked; is the tree there?"
    );
    assert!(
        bad.is_empty(),
        "machine-specific absolute paths (use paths relative to the repository, e.g. \
         ../shared/data via tests/common.rs::shared_data):\n{}",
        bad.join("\n")
    );
}
