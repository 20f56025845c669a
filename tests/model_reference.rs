//! samkv's forward against candle-transformers' own model code on the same GGUF weights.
//!
//! Two comparisons per model, each against the reference run the same way:
//! - dense: both sides dequantize the weights to f32 (candle's CANDLE_DEQUANTIZE_ALL), so
//!   the only differences are float summation order: logits agree to 1e-3.
//! - quantized: both sides use candle's quantized kernels, which round activations to 8 bits
//!   per layer; that rounding amplifies summation-order differences as prompts grow, so the
//!   tight check uses a short prompt.
//!
//! The env switch is read once per thread, so each comparison runs in a fresh thread, and
//! everything runs from one #[test] to keep the switch from leaking into other tests.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use common::*;
use samkv::model::{LoadOptions, Logits, Model, WeightMode};

fn reference_logits(path: &std::path::Path, ids: &[u32], qwen: bool) -> Vec<f32> {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = if qwen {
        let mut m = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
            content,
            &mut f,
            &Device::Cpu,
        )
        .unwrap();
        m.forward(&x, 0).unwrap()
    } else {
        let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content,
            &mut f,
            &Device::Cpu,
        )
        .unwrap();
        m.forward(&x, 0).unwrap()
    };
    out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn ours(path: &std::path::Path, ids: &[u32], weights: WeightMode) -> Vec<f32> {
    let m = Model::load(
        path,
        &LoadOptions {
            weights,
            ..Default::default()
        },
    )
    .unwrap();
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let mut cache = m.new_cache().unwrap();
    let out = m.forward(ids, &pos, &mut cache, Logits::Last, &[]).unwrap();
    out.logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn compare(file: &'static str, qwen: bool, n: usize, mode: WeightMode, tol: f32) {
    std::thread::spawn(move || {
        let path = model_path(file);
        let ids = token_ids(n, if qwen { 151_000 } else { 49_000 }, 7);
        let r = reference_logits(&path, &ids, qwen);
        let o = ours(&path, &ids, mode);
        let d = max_abs_diff(&r, &o);
        eprintln!("{file} {mode:?} {n} tokens: max |logit diff| = {d:.6}");
        assert!(
            d < tol,
            "{file} {mode:?}: logits differ by {d} (tolerance {tol})"
        );
        assert_eq!(argmax(&o), argmax(&r));
    })
    .join()
    .unwrap();
}

#[test]
fn logits_match_candle_transformers() {
    compare(SMOLLM2, false, 5, WeightMode::Quantized, 1e-3);
    compare(QWEN05, true, 5, WeightMode::Quantized, 1e-3);
    // SAFETY: no other thread of this test binary reads the environment concurrently.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    compare(SMOLLM2, false, 200, WeightMode::Dense, 1e-3);
    compare(QWEN05, true, 200, WeightMode::Dense, 1e-3);
}
