//! Loading weights: GGUF files (`llama`, `qwen2`, `qwen3`) and Hugging Face directories
//! (config.json + *.safetensors for Llama/Mistral/Qwen2/Qwen3ForCausalLM), each read through
//! a [`Weights`] source by the architecture's own builder (`arch/`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::arch::{self, Name, Weights};
use super::{Arch, Config, Linear, Llama3Scaling, Model, Rope, RopeLayout, RuntimeFlags};
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
    pub flags: RuntimeFlags,
}

impl Default for LoadOptions {
    /// CPU, f32, `--weights auto`, and the runtime switches the environment sets.
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            weights: WeightMode::Auto,
            flags: RuntimeFlags::from_env(),
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
            "qwen3" => Arch::Qwen3,
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
            // GGUF's llama conversion permutes Q/K rows for interleaved pairs; qwen2/3 do not.
            rope_layout: if arch == Arch::Llama {
                RopeLayout::Interleaved
            } else {
                RopeLayout::SplitHalf
            },
            rope_scaling: None,
            rms_eps: get_f("attention.layer_norm_rms_epsilon", 1e-5),
            max_context: get_u("context_length").unwrap_or(4096),
        };
        let mut src = Gguf {
            path,
            content: &content,
            file,
            opts,
            embed: None,
        };
        // Llama-3 GGUFs ship their RoPE scaling as per-frequency factors.
        let freq_factors = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => Some(
                src.read("rope_freqs.weight")?
                    .dequantize(&Device::Cpu)?
                    .to_vec1::<f32>()?,
            ),
            false => None,
        };
        let fingerprint = file_fingerprint(path)?;
        Self::build(cfg, fingerprint, freq_factors, opts, &mut src)
    }

    pub fn load_hf(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e.to_string()))?;
        let hf: HfConfig =
            serde_json::from_str(&text).map_err(|e| file_err(&cfg_path, e.to_string()))?;
        let named = hf.architectures.first().or(hf.model_type.as_ref());
        let arch = match named.map(String::as_str) {
            Some("LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral") => Arch::Llama,
            Some("Qwen2ForCausalLM" | "qwen2") => Arch::Qwen2,
            Some("Qwen3ForCausalLM" | "qwen3") => Arch::Qwen3,
            Some(other) => return Err(Error::UnknownArch(other.to_string())),
            None => {
                let msg = "config.json has neither `architectures` nor `model_type`";
                return Err(file_err(&cfg_path, msg));
            }
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
        let mut h = Sha256::new();
        h.update(text.as_bytes());
        for f in &files {
            h.update(file_fingerprint(f)?.as_bytes());
        }
        let fingerprint = hex::encode(h.finalize());
        let mut src = Hf {
            dir,
            tensors,
            dtype: opts.dtype,
            tied: hf.tie_word_embeddings.unwrap_or(false),
            embed: None,
        };
        Self::build(cfg, fingerprint, None, opts, &mut src)
    }

    /// A model of the given shape with seeded random weights, for speed measurements at
    /// production scale where real weights are not available ("shape-only" runs).
    pub fn random(cfg: Config, seed: u64, dtype: DType, device: &Device) -> Result<Model> {
        // The CPU backend has no seedable generator (set_seed errors there); its randn is
        // unseeded, which is fine for shape-only speed runs.
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let fingerprint = format!("random-{seed}-{}x{}", cfg.n_layers, cfg.hidden);
        let mut src = Random { dtype, device };
        let opts = LoadOptions {
            device: device.clone(),
            dtype,
            ..Default::default()
        };
        Self::build(cfg, fingerprint, None, &opts, &mut src)
    }

    /// The model of `cfg` with weights from `src`.
    fn build(
        cfg: Config,
        fingerprint: String,
        freq_factors: Option<Vec<f32>>,
        opts: &LoadOptions,
        src: &mut dyn Weights,
    ) -> Result<Model> {
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_base,
            cfg.rope_layout,
            cfg.rope_scaling,
            freq_factors.as_deref(),
        );
        let arch = arch::build(&cfg, rope.clone(), src)?;
        // The kernels are also reached from code that holds no model (the KV cache's row
        // scatter, the loader's gather), so they read the switches the last load set.
        #[cfg(feature = "cuda")]
        crate::cuda::configure(opts.flags.cuda_kernels, opts.flags.wgmma);
        Ok(Model {
            cfg,
            fingerprint,
            rope,
            dtype: opts.dtype,
            device: opts.device.clone(),
            flags: opts.flags,
            arch,
        })
    }
}

/// A tensor's shape against the one the config implies.
fn check_shape(file: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(file_err(
        file,
        format!(
            "tensor {name} has shape {got:?} but the model's config implies {want:?}; the \
             weights do not match their config (re-fetch or re-convert the model)"
        ),
    ))
}

/// GGUF tensors, kept quantized, dense or both per [`WeightMode`].
struct Gguf<'a> {
    path: &'a Path,
    content: &'a gguf_file::Content,
    file: std::fs::File,
    opts: &'a LoadOptions,
    /// The embedding's quantized form, for an LM head tied to it.
    embed: Option<QTensor>,
}

impl Gguf<'_> {
    fn read(&mut self, name: &str) -> Result<QTensor> {
        let dev = &self.opts.device;
        self.content.tensor(&mut self.file, name, dev).map_err(|e| {
            file_err(
                self.path,
                format!("tensor {name}: {e} (file truncated or corrupt? re-fetch it)"),
            )
        })
    }

    fn read_shaped(&mut self, name: &str, dims: &[usize]) -> Result<QTensor> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| {
            file_err(
                self.path,
                format!("GGUF has no tensor {name}; re-fetch or re-convert it"),
            )
        })?;
        check_shape(self.path, name, info.shape.dims(), dims)?;
        self.read(name)
    }

    fn dense(&self, q: &QTensor) -> Result<Tensor> {
        Ok(q.dequantize(&self.opts.device)?.to_dtype(self.opts.dtype)?)
    }

    /// Parts of one fused projection; float-typed weights (F32/F16) are only kept dense.
    fn fuse(&self, parts: Vec<QTensor>, biases: Vec<Option<QTensor>>) -> Result<Linear> {
        let (dt, mode) = (self.opts.dtype, self.opts.weights);
        let is_float = parts
            .iter()
            .any(|q| matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16));
        let keep_quant = mode != WeightMode::Dense && !is_float && dt == DType::F32;
        let keep_dense = mode != WeightMode::Quantized || !keep_quant;
        let biases = biases
            .iter()
            .map(|b| b.as_ref().map(|b| self.dense(b)).transpose())
            .collect::<Result<Vec<_>>>()?;
        Linear::from_quantized(parts, biases, keep_dense.then_some(dt), keep_quant)
    }
}

impl Weights for Gguf<'_> {
    fn vector(&mut self, name: Name, len: usize) -> Result<Tensor> {
        let q = self.read_shaped(&format!("{}.weight", name.gguf()), &[len])?;
        self.dense(&q)
    }

    fn linear(&mut self, parts: &[(Name, usize)], inp: usize) -> Result<Linear> {
        let (mut ws, mut bs) = (Vec::new(), Vec::new());
        for &(name, out) in parts {
            let n = name.gguf();
            ws.push(self.read_shaped(&format!("{n}.weight"), &[out, inp])?);
            let bias = format!("{n}.bias");
            bs.push(match self.content.tensor_infos.contains_key(&bias) {
                true => Some(self.read_shaped(&bias, &[out])?),
                false => None,
            });
        }
        self.fuse(ws, bs)
    }

    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Tensor> {
        let q = self.read_shaped("token_embd.weight", &[vocab, hidden])?;
        let t = self.dense(&q)?;
        self.embed = Some(q);
        Ok(t)
    }

    fn lm_head(&mut self, vocab: usize, hidden: usize) -> Result<Linear> {
        match (
            self.content.tensor_infos.contains_key("output.weight"),
            self.embed.take(),
        ) {
            (false, Some(e)) => self.fuse(vec![e], vec![None]), // tied embeddings
            _ => self.linear(&[(Name::LmHead, vocab)], hidden),
        }
    }
}

/// Tensors of a Hugging Face checkpoint, converted to the activation dtype as taken.
struct Hf<'a> {
    dir: &'a Path,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    /// `tie_word_embeddings`: the LM head is the embedding.
    tied: bool,
    embed: Option<Tensor>,
}

impl Hf<'_> {
    fn take(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| file_err(self.dir, format!("missing tensor {name}")))?;
        check_shape(self.dir, name, t.dims(), dims)?;
        Ok(t.to_dtype(self.dtype)?)
    }
}

impl Weights for Hf<'_> {
    fn vector(&mut self, name: Name, len: usize) -> Result<Tensor> {
        self.take(&format!("{}.weight", name.hf()), &[len])
    }

    fn linear(&mut self, parts: &[(Name, usize)], inp: usize) -> Result<Linear> {
        let (mut ws, mut bs) = (Vec::new(), Vec::new());
        for &(name, out) in parts {
            let n = name.hf();
            ws.push(self.take(&format!("{n}.weight"), &[out, inp])?);
            let bias = format!("{n}.bias");
            bs.push(match self.tensors.contains_key(&bias) {
                true => Some(self.take(&bias, &[out])?),
                false => None,
            });
        }
        Linear::from_dense(&ws, bs)
    }

    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Tensor> {
        let t = self.take(&format!("{}.weight", Name::Embed.hf()), &[vocab, hidden])?;
        self.embed = self.tied.then(|| t.clone());
        Ok(t)
    }

    fn lm_head(&mut self, vocab: usize, hidden: usize) -> Result<Linear> {
        match self.embed.take() {
            Some(e) => Linear::from_dense(&[e], vec![None]),
            None => self.linear(&[(Name::LmHead, vocab)], hidden),
        }
    }
}

/// Seeded random weights (std 0.02) and unit norms, no biases.
struct Random<'a> {
    dtype: DType,
    device: &'a Device,
}

impl Random<'_> {
    fn randn(&self, r: usize, c: usize) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02, (r, c), self.device)?.to_dtype(self.dtype)?)
    }
}

impl Weights for Random<'_> {
    fn vector(&mut self, _: Name, len: usize) -> Result<Tensor> {
        Ok(Tensor::ones(len, self.dtype, self.device)?)
    }

    fn linear(&mut self, parts: &[(Name, usize)], inp: usize) -> Result<Linear> {
        let ws = parts
            .iter()
            .map(|&(_, o)| self.randn(o, inp))
            .collect::<Result<Vec<_>>>()?;
        Linear::from_dense(&ws, vec![None; parts.len()])
    }

    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Tensor> {
        self.randn(vocab, hidden)
    }

    fn lm_head(&mut self, vocab: usize, hidden: usize) -> Result<Linear> {
        self.linear(&[(Name::LmHead, vocab)], hidden)
    }
}

#[derive(serde::Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
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
