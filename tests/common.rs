//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of a model fetched by `samkv model fetch NAME`; a missing file fails the test with the
/// command to run (CI fetches models before testing).
pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("SAMKV_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let p = dir.join(file);
    assert!(
        p.exists(),
        "{} is missing: run `cargo run --release -- model fetch` for it first",
        p.display()
    );
    p
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN05: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// Deterministic pseudo-random token ids below `vocab` (samkv's own, as `bench-speed` uses).
pub fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    samkv::bench::speed::random_tokens(n, vocab, seed)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(a: &[f32]) -> usize {
    a.iter()
        .enumerate()
        .max_by(|x, y| x.1.total_cmp(y.1))
        .map(|x| x.0)
        .unwrap()
}

/// A file of the project's shared data (`../shared/data` beside the repository).
pub fn shared_data(file: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(file);
    assert!(
        p.exists(),
        "{} is missing: the shared data folder must sit beside the repository",
        p.display()
    );
    p
}
