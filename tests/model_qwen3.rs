//! Qwen3 against candle-transformers' qwen3 (safetensors) and quantized_qwen3 (GGUF) on a small
//! random-weight checkpoint written here: head_dim differs from hidden / heads, grouped KV
//! heads, non-unit q/k norms. Everything is f32, so logits differ only by summation order.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{quantized_qwen3, qwen3};
use common::*;
use samkv::model::{Arch, LoadOptions, Logits, Model};

const VOCAB: usize = 320;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 32;
const FFN: usize = 96;
const LAYERS: usize = 2;
const EPS: f64 = 1e-6;
const THETA: f64 = 1e6;
/// Logits of this random model are O(1); 1e-3 is float noise, a wrong op is O(0.1) or more.
const TOL: f32 = 1e-3;

/// HF-named random weights (lm_head untied).
fn weights() -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let randn = |dims: &[usize], std: f64| Tensor::randn(0f32, std as f32, dims, &dev).unwrap();
    // Norm weights near 1 but not 1, so a norm applied in the wrong place shows.
    let norm = |n: usize| (randn(&[n], 0.2) + 1.0).unwrap();
    let mut w = HashMap::new();
    let (qd, kd) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let mut put = |n: &str, t: Tensor| w.insert(format!("{p}.{n}.weight"), t);
        put("input_layernorm", norm(HIDDEN));
        put("post_attention_layernorm", norm(HIDDEN));
        put("self_attn.q_proj", randn(&[qd, HIDDEN], 0.15));
        put("self_attn.k_proj", randn(&[kd, HIDDEN], 0.15));
        put("self_attn.v_proj", randn(&[kd, HIDDEN], 0.15));
        put("self_attn.o_proj", randn(&[HIDDEN, qd], 0.1));
        put("self_attn.q_norm", norm(HEAD_DIM));
        put("self_attn.k_norm", norm(HEAD_DIM));
        put("mlp.gate_proj", randn(&[FFN, HIDDEN], 0.15));
        put("mlp.up_proj", randn(&[FFN, HIDDEN], 0.15));
        put("mlp.down_proj", randn(&[HIDDEN, FFN], 0.1));
    }
    w.insert(
        "model.embed_tokens.weight".into(),
        randn(&[VOCAB, HIDDEN], 1.0),
    );
    w.insert("model.norm.weight".into(), norm(HIDDEN));
    w.insert("lm_head.weight".into(), randn(&[VOCAB, HIDDEN], 0.2));
    w
}

fn write_hf(dir: &Path, w: &HashMap<String, Tensor>) {
    let cfg = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "attention_bias": false,
        "max_position_embeddings": 512,
        "sliding_window": null,
        "max_window_layers": LAYERS,
        "tie_word_embeddings": false,
        "rope_theta": THETA,
        "rms_norm_eps": EPS,
        "use_sliding_window": false,
        "hidden_act": "silu",
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(w, dir.join("model.safetensors")).unwrap();
}

/// The same weights as a GGUF `qwen3` file, f32, LM head tied to the embedding (no
/// output.weight), as small Qwen3 GGUFs ship.
fn write_gguf(path: &Path, w: &HashMap<String, Tensor>) {
    use gguf_file::Value;
    let u = |v: usize| Value::U32(v as u32);
    let md = [
        ("general.architecture", Value::String("qwen3".into())),
        ("general.dtype", Value::U32(0)), // f32 RoPE tables in quantized_qwen3
        ("qwen3.block_count", u(LAYERS)),
        ("qwen3.embedding_length", u(HIDDEN)),
        ("qwen3.feed_forward_length", u(FFN)),
        ("qwen3.attention.head_count", u(HEADS)),
        ("qwen3.attention.head_count_kv", u(KV_HEADS)),
        ("qwen3.attention.key_length", u(HEAD_DIM)),
        ("qwen3.context_length", u(512)),
        (
            "qwen3.attention.layer_norm_rms_epsilon",
            Value::F32(EPS as f32),
        ),
        ("qwen3.rope.freq_base", Value::F32(THETA as f32)),
    ];
    let rename = |hf: &str| -> Option<String> {
        let map = [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ];
        match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight".into()),
            "model.norm.weight" => Some("output_norm.weight".into()),
            "lm_head.weight" => None,
            _ => {
                let rest = hf.strip_prefix("model.layers.")?;
                let (l, name) = rest.split_once('.')?;
                let name = name.strip_suffix(".weight")?;
                let (_, g) = map.iter().find(|(h, _)| *h == name)?;
                Some(format!("blk.{l}.{g}.weight"))
            }
        }
    };
    let tensors: Vec<(String, QTensor)> = w
        .iter()
        .filter_map(|(n, t)| Some((rename(n)?, QTensor::quantize(t, GgmlDType::F32).unwrap())))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &refs).unwrap();
}

fn to_vec(t: Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// samkv's last-row logits for the prompt and then for one decoded token.
fn ours(path: &Path, prompt: &[u32], next: u32) -> (Vec<f32>, Vec<f32>) {
    let m = Model::load(path, &LoadOptions::default()).unwrap();
    assert_eq!(m.cfg.arch, Arch::Qwen3);
    assert_eq!(m.cfg.head_dim, HEAD_DIM);
    let pos: Vec<u32> = (0..prompt.len() as u32).collect();
    let mut cache = m.new_cache().unwrap();
    let a = m.forward(prompt, &pos, &mut cache, Logits::Last, &[]);
    let b = m.forward(
        &[next],
        &[prompt.len() as u32],
        &mut cache,
        Logits::Last,
        &[],
    );
    (
        to_vec(a.unwrap().logits.unwrap()),
        to_vec(b.unwrap().logits.unwrap()),
    )
}

fn ids(t: &[u32]) -> Tensor {
    Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn check(what: &str, ours: &[f32], reference: &[f32]) {
    let d = max_abs_diff(ours, reference);
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!("qwen3 {what}: max |logit diff| = {d:.2e} (max |logit| {scale:.2})");
    assert!(
        d < TOL,
        "qwen3 {what}: logits differ by {d} (tolerance {TOL})"
    );
    assert_eq!(argmax(ours), argmax(reference), "{what}");
}

#[test]
fn qwen3_logits_match_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights();
    write_hf(dir.path(), &w);
    let prompt = token_ids(23, VOCAB, 5);
    let next = 17;

    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg: qwen3::Config = serde_json::from_str(&text).unwrap();
    let files = [dir.path().join("model.safetensors")];
    // SAFETY: the file was just written by this test and is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu).unwrap()
    };
    let mut r = qwen3::ModelForCausalLM::new(&cfg, vb).unwrap();
    let r_prompt = to_vec(r.forward(&ids(&prompt), 0).unwrap());
    let r_next = to_vec(r.forward(&ids(&[next]), prompt.len()).unwrap());
    let (o_prompt, o_next) = ours(dir.path(), &prompt, next);
    check("safetensors prompt", &o_prompt, &r_prompt);
    check("safetensors decode", &o_next, &r_next);

    // GGUF, with the LM head tied to the embedding on both sides.
    let gguf = dir.path().join("qwen3.gguf");
    write_gguf(&gguf, &w);
    let mut f = std::fs::File::open(&gguf).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut r = quantized_qwen3::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let r_prompt = to_vec(r.forward(&ids(&prompt), 0).unwrap());
    let r_next = to_vec(r.forward(&ids(&[next]), prompt.len()).unwrap());
    let (o_prompt, o_next) = ours(&gguf, &prompt, next);
    check("gguf prompt", &o_prompt, &r_prompt);
    check("gguf decode", &o_next, &r_next);
}
