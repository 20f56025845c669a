//! Loading weights: GGUF files (`llama`, `qwen2`) and Hugging Face directories
//! (config.json + *.safetensors for Llama/Mistral/Qwen2ForCausalLM).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::{Arch, Config, Layer, Linear, Llama3Scaling, Model, Rope, RopeLayout};
use crate::{Error, Result};

/// How GGUF weights are held in memory.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightMode {
    /// Quantized blocks only: least memory; prefill is slow on CPU.
    Quantized,
    /// Dequantized to the activation dtype: fastest prefill, 4-8x the memory.
    Dense,
    /// Both: quantized kernels for a few rows (decode), dense matmul for prefill.
    #[default]
    Auto,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// Activation dtype (f32 on CPU; bf16 or f32 on CUDA).
    pub dtype: DType,
    pub weights: WeightMode,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            weights: WeightMode::Auto,
        }
    }
}

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::ModelFile {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl Model {
    /// Loads a GGUF file or a Hugging Face model directory.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
        if path.is_dir() {
            Self::load_hf(path, opts)
        } else if path.exists() {
            Self::load_gguf(path, opts)
        } else {
            Err(file_err(path, "no such file or directory; give a GGUF file, a Hugging Face model directory, or a known model name (see `samkv model list`)"))
        }
    }

    pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let mut file = std::fs::File::open(path).map_err(|e| file_err(path, e.to_string()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            file_err(
                path,
                format!("not a readable GGUF file ({e}); re-fetch it with `samkv model fetch`"),
            )
        })?;
        let md = |k: &str| content.metadata.get(k);
        let arch_name = md("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| file_err(path, "GGUF metadata lacks general.architecture"))?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(Error::UnknownArch(other.to_string())),
        };
        let a = arch_name.as_str();
        let get_u = |k: &str| -> Result<usize> {
            let key = format!("{a}.{k}");
            md(&key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| file_err(path, format!("GGUF metadata lacks {key}")))
        };
        let get_f = |k: &str, default: f64| -> f64 {
            md(&format!("{a}.{k}"))
                .and_then(|v| v.to_f32().ok())
                .map_or(default, f64::from)
        };
        let hidden = get_u("embedding_length")?;
        let n_heads = get_u("attention.head_count")?;
        let n_kv_heads = get_u("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = get_u("attention.key_length").unwrap_or(hidden / n_heads);
        let tensor_info = |name: &str| content.tensor_infos.get(name);
        let vocab = tensor_info("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| file_err(path, "GGUF has no token_embd.weight"))?;
        let cfg = Config {
            arch,
            n_layers: get_u("block_count")?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn: get_u("feed_forward_length")?,
            vocab,
            rope_base: get_f("rope.freq_base", 10000.0),
            // GGUF's llama conversion permutes Q/K rows for interleaved pairs; qwen2 does not.
            rope_layout: if arch == Arch::Llama {
                RopeLayout::Interleaved
            } else {
                RopeLayout::SplitHalf
            },
            rope_scaling: None,
            rms_eps: get_f("attention.layer_norm_rms_epsilon", 1e-5),
            max_context: get_u("context_length").unwrap_or(4096),
        };
        let device = &opts.device;
        let mut read = |name: &str| -> Result<QTensor> {
            content.tensor(&mut file, name, device).map_err(|e| {
                file_err(
                    path,
                    format!("tensor {name}: {e} (file truncated or corrupt? re-fetch it)"),
                )
            })
        };
        let freq_factors = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => Some(
                read("rope_freqs.weight")?
                    .dequantize(&Device::Cpu)?
                    .to_vec1::<f32>()?,
            ),
            false => None,
        };
        let dt = opts.dtype;
        let mode = opts.weights;
        let dense = |q: &QTensor| -> Result<Tensor> { Ok(q.dequantize(device)?.to_dtype(dt)?) };
        // Parts of one fused projection; float-typed weights (F32/F16) are only kept dense.
        let linear = |parts: Vec<QTensor>, biases: Vec<Option<QTensor>>| -> Result<Linear> {
            let is_float = parts
                .iter()
                .any(|q| matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16));
            let keep_quant = mode != WeightMode::Dense && !is_float && dt == DType::F32;
            let keep_dense = mode != WeightMode::Quantized || !keep_quant;
            let biases = biases
                .iter()
                .map(|b| b.as_ref().map(&dense).transpose())
                .collect::<Result<Vec<_>>>()?;
            Linear::from_quantized(parts, biases, keep_dense.then_some(dt), keep_quant)
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blk.{i}");
            let mut opt_bias = |n: &str| -> Result<Option<QTensor>> {
                let name = format!("{p}.{n}.bias");
                if content.tensor_infos.contains_key(&name) {
                    Ok(Some(read(&name)?))
                } else {
                    Ok(None)
                }
            };
            let (bq, bk, bv) = (
                opt_bias("attn_q")?,
                opt_bias("attn_k")?,
                opt_bias("attn_v")?,
            );
            let mut w = |n: &str| read(&format!("{p}.{n}.weight"));
            let qkv = vec![w("attn_q")?, w("attn_k")?, w("attn_v")?];
            let wo = w("attn_output")?;
            let gate_up = vec![w("ffn_gate")?, w("ffn_up")?];
            let down = w("ffn_down")?;
            let (attn_norm, ffn_norm) = (w("attn_norm")?, w("ffn_norm")?);
            layers.push(Layer {
                attn_norm: dense(&attn_norm)?,
                qkv: linear(qkv, vec![bq, bk, bv])?,
                wo: linear(vec![wo], vec![None])?,
                ffn_norm: dense(&ffn_norm)?,
                gate_up: linear(gate_up, vec![None, None])?,
                down: linear(vec![down], vec![None])?,
            });
        }
        let embed_q = read("token_embd.weight")?;
        let embed = dense(&embed_q)?;
        let lm_head = if content.tensor_infos.contains_key("output.weight") {
            linear(vec![read("output.weight")?], vec![None])?
        } else {
            linear(vec![embed_q], vec![None])? // tied embeddings
        };
        let norm = dense(&read("output_norm.weight")?)?;
        let fingerprint = file_fingerprint(path)?;
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_base,
            cfg.rope_layout,
            None,
            freq_factors.as_deref(),
        );
        Ok(Model {
            cfg,
            fingerprint,
            rope,
            dtype: dt,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn load_hf(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e.to_string()))?;
        let hf: HfConfig =
            serde_json::from_str(&text).map_err(|e| file_err(&cfg_path, e.to_string()))?;
        let arch = match hf.architectures.first().map(String::as_str) {
            Some("LlamaForCausalLM" | "MistralForCausalLM") => Arch::Llama,
            Some("Qwen2ForCausalLM") => Arch::Qwen2,
            Some(other) => return Err(Error::UnknownArch(other.to_string())),
            None => return Err(file_err(&cfg_path, "config.json has no `architectures`")),
        };
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        let rope_scaling = hf.rope_scaling.as_ref().and_then(|s| {
            (s.get("rope_type")
                .or(s.get("type"))
                .and_then(|v| v.as_str())
                == Some("llama3"))
            .then(|| Llama3Scaling {
                factor: s["factor"].as_f64().unwrap_or(8.0),
                low_freq_factor: s["low_freq_factor"].as_f64().unwrap_or(1.0),
                high_freq_factor: s["high_freq_factor"].as_f64().unwrap_or(4.0),
                original_max_position_embeddings: s["original_max_position_embeddings"]
                    .as_f64()
                    .unwrap_or(8192.0),
            })
        });
        let cfg = Config {
            arch,
            n_layers: hf.num_hidden_layers,
            hidden: hf.hidden_size,
            n_heads: hf.num_attention_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            ffn: hf.intermediate_size,
            vocab: hf.vocab_size,
            rope_base: hf.rope_theta.unwrap_or(10000.0),
            rope_layout: RopeLayout::SplitHalf,
            rope_scaling,
            rms_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_context: hf.max_position_embeddings.unwrap_or(4096),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(file_err(
                dir,
                "no *.safetensors files in the model directory",
            ));
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for f in &files {
            let t = candle_core::safetensors::load(f, &opts.device)
                .map_err(|e| file_err(f, e.to_string()))?;
            tensors.extend(t);
        }
        let dt = opts.dtype;
        let mut take = |name: &str| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| file_err(dir, format!("missing tensor {name}")))?;
            Ok(t.to_dtype(dt)?)
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let qb = arch == Arch::Qwen2;
            let mut lin = |names: &[&str], bias: bool| -> Result<Linear> {
                let mut ws = Vec::with_capacity(names.len());
                let mut bs = Vec::with_capacity(names.len());
                for n in names {
                    ws.push(take(&format!("{p}.{n}.weight"))?);
                    bs.push(if bias {
                        Some(take(&format!("{p}.{n}.bias"))?)
                    } else {
                        None
                    });
                }
                Linear::from_dense(&ws, bs)
            };
            layers.push(Layer {
                qkv: lin(
                    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    qb,
                )?,
                wo: lin(&["self_attn.o_proj"], false)?,
                gate_up: lin(&["mlp.gate_proj", "mlp.up_proj"], false)?,
                down: lin(&["mlp.down_proj"], false)?,
                attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
                ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        let embed = take("model.embed_tokens.weight")?;
        let head = if hf.tie_word_embeddings.unwrap_or(false) {
            embed.clone()
        } else {
            take("lm_head.weight")?
        };
        let lm_head = Linear::from_dense(&[head], vec![None])?;
        let norm = take("model.norm.weight")?;
        let mut h = Sha256::new();
        h.update(text.as_bytes());
        for f in &files {
            h.update(file_fingerprint(f)?.as_bytes());
        }
        let fingerprint = hex::encode(h.finalize());
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_base,
            cfg.rope_layout,
            cfg.rope_scaling,
            None,
        );
        Ok(Model {
            cfg,
            fingerprint,
            rope,
            dtype: dt,
            device: opts.device.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// A model of the given shape with seeded random weights, for speed measurements at
    /// production scale where real weights are not available ("shape-only" runs).
    pub fn random(cfg: Config, seed: u64, dtype: DType, device: &Device) -> Result<Model> {
        // The CPU backend has no seedable generator (set_seed errors there); its randn is
        // unseeded, which is fine for shape-only speed runs.
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let std = 0.02f32;
        let rnd = |r: usize, c: usize| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, std, (r, c), device)?.to_dtype(dtype)?)
        };
        let lin = |outs: &[usize], inp: usize| -> Result<Linear> {
            let ws = outs
                .iter()
                .map(|&o| rnd(o, inp))
                .collect::<Result<Vec<_>>>()?;
            Linear::from_dense(&ws, vec![None; outs.len()])
        };
        let ones = Tensor::ones(cfg.hidden, dtype, device)?;
        let (qd, kd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            layers.push(Layer {
                attn_norm: ones.clone(),
                qkv: lin(&[qd, kd, kd], cfg.hidden)?,
                wo: lin(&[cfg.hidden], qd)?,
                ffn_norm: ones.clone(),
                gate_up: lin(&[cfg.ffn, cfg.ffn], cfg.hidden)?,
                down: lin(&[cfg.hidden], cfg.ffn)?,
            });
        }
        let embed = rnd(cfg.vocab, cfg.hidden)?;
        let lm_head = lin(&[cfg.vocab], cfg.hidden)?;
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_base,
            cfg.rope_layout,
            cfg.rope_scaling,
            None,
        );
        let fingerprint = format!("random-{seed}-{}x{}", cfg.n_layers, cfg.hidden);
        Ok(Model {
            cfg,
            fingerprint,
            rope,
            dtype,
            device: device.clone(),
            embed,
            layers,
            norm: ones,
            lm_head,
        })
    }
}

#[derive(serde::Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

/// sha256 of a file's size and first and last MiB: hashing whole multi-GB files at every load
/// would dominate start-up, and these bytes (header, metadata, tensor tail) change whenever the
/// weights do in practice. `samkv model fetch` verifies full hashes.
pub fn file_fingerprint(path: &Path) -> Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let chunk = 1 << 20;
    let mut buf = vec![0u8; chunk.min(len as usize)];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    if len as usize > chunk {
        f.seek(SeekFrom::Start(len - buf.len() as u64))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
    }
    Ok(hex::encode(h.finalize()))
}
