//! The model runtime: Llama-family decoders (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5) driven
//! layer by layer so KV-reuse methods can choose which rows to recompute between layers.
//!
//! Every token has an explicit position; the KV rows a token attends to are an explicit set
//! (causal by position), held in a [`KvCache`] the caller owns.

mod attention;
mod batch;
mod load;
pub mod rope;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

pub use attention::{attend, mean_rows};
pub use load::{LoadOptions, WeightMode};
pub use rope::{Llama3Scaling, Rope, RopeLayout};

use crate::kv::KvCache;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_base: f64,
    pub rope_layout: RopeLayout,
    pub rope_scaling: Option<Llama3Scaling>,
    pub rms_eps: f64,
    pub max_context: usize,
}

/// Rows at or below which a projection uses the quantized kernel (decode, short questions);
/// above it a dequantized dense matmul is faster on CPU (measured in docs/PERFORMANCE.md).
const QUANT_MAX_ROWS: usize = 8;

/// A projection `x @ W^T + b`, kept quantized, dense, or both (then chosen by row count).
pub struct Linear {
    quant: Option<QMatMul>,
    /// W^T, (in, out), contiguous.
    dense_t: Option<Tensor>,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let y = match (&self.quant, &self.dense_t) {
            (Some(q), None) => q.forward(x)?,
            (Some(q), Some(_)) if rows <= QUANT_MAX_ROWS => q.forward(x)?,
            (_, Some(w)) => x.matmul(w)?,
            (None, None) => unreachable!("a Linear always holds weights"),
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Per-layer query, key and value states of a set of tokens, already rotated to their positions.
pub struct Qkv {
    /// (heads, T, head_dim)
    pub q: Tensor,
    /// (kv_heads, T, head_dim)
    pub k: Tensor,
    pub v: Tensor,
}

pub struct Model {
    pub cfg: Config,
    /// A stable identity of the weights: cached KV is only valid for the model that made it.
    pub fingerprint: String,
    pub rope: Rope,
    dtype: DType,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
}

/// Which rows' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

#[derive(Default)]
pub struct ForwardOut {
    /// (rows, vocab) in f32, rows per [`Logits`].
    pub logits: Option<Tensor>,
    /// Query states captured at the requested layers: (layer, (heads, T, head_dim)).
    pub queries: Vec<(usize, Tensor)>,
}

impl Model {
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn n_layers(&self) -> usize {
        self.cfg.n_layers
    }

    pub fn new_cache(&self) -> Result<KvCache> {
        KvCache::new(
            self.cfg.n_layers,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            self.dtype,
            &self.device,
        )
    }

    /// Bytes of K+V per token across all layers, in the model's dtype.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.n_layers * self.cfg.n_kv_heads * self.cfg.head_dim * self.dtype.size_in_bytes()
    }

    /// Token embeddings, (T, hidden).
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.cfg.vocab
            )));
        }
        let ids = Tensor::new(tokens, &self.device)?;
        Ok(self.embed.index_select(&ids, 0)?)
    }

    /// cos/sin tables for these positions, shared by all layers of one pass.
    pub fn rope_tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let offs: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        self.rope.tables(&offs, self.dtype, &self.device)
    }

    /// Step 1 of a layer: normalize the residual stream x (T, hidden) and project it to
    /// rotated Q, K and V.
    pub fn layer_qkv(&self, l: usize, x: &Tensor, rope: &(Tensor, Tensor)) -> Result<Qkv> {
        let c = &self.cfg;
        let layer = &self.layers[l];
        let t = x.dim(0)?;
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, c.rms_eps as f32)?;
        let q = layer
            .wq
            .forward(&h)?
            .reshape((t, c.n_heads, c.head_dim))?
            .transpose(0, 1)?;
        let k = layer
            .wk
            .forward(&h)?
            .reshape((t, c.n_kv_heads, c.head_dim))?
            .transpose(0, 1)?;
        let v = layer
            .wv
            .forward(&h)?
            .reshape((t, c.n_kv_heads, c.head_dim))?
            .transpose(0, 1)?;
        let q = self.rope.apply(&q, &rope.0, &rope.1)?;
        let k = self.rope.apply(&k, &rope.0, &rope.1)?;
        Ok(Qkv {
            q,
            k,
            v: v.contiguous()?,
        })
    }

    /// Step 2 of a layer: attend with queries q (at `qpos`) over keys/values (at `kpos`,
    /// sorted), then output projection, residual and MLP. Returns the new residual stream.
    #[allow(clippy::too_many_arguments)] // the rows to attend over are the caller's choice
    pub fn layer_finish(
        &self,
        l: usize,
        x: &Tensor,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        qpos: &[u32],
        kpos: &[u32],
    ) -> Result<Tensor> {
        let layer = &self.layers[l];
        let a = attend(q, keys, values, qpos, kpos)?;
        let x = (x + layer.wo.forward(&a)?)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.cfg.rms_eps as f32)?;
        let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
        let m = layer.down.forward(&(g * layer.up.forward(&h)?)?)?;
        Ok((x + m)?)
    }

    /// Final norm and LM head for the given rows of x, returned as f32 (rows, vocab).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x, &self.norm, self.cfg.rms_eps as f32)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// An ordinary forward pass: the new tokens' K/V are appended to `cache` and every new
    /// token attends to all rows of `cache` at or before its position. Used for prefill,
    /// decode (also over caches with position gaps) and per-document ingestion.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        capture_layers: &[usize],
    ) -> Result<ForwardOut> {
        if tokens.is_empty() {
            return Err(Error::InvalidInput(
                "forward needs at least one token".into(),
            ));
        }
        if tokens.len() != positions.len() {
            return Err(Error::InvalidInput(
                "one position per token is required".into(),
            ));
        }
        let max_pos = positions.iter().copied().max().unwrap_or(0) as usize;
        if max_pos >= self.cfg.max_context {
            return Err(Error::ContextTooLong {
                tokens: max_pos + 1,
                max: self.cfg.max_context,
            });
        }
        let rope = self.rope_tables(positions)?;
        let mut x = self.embed(tokens)?;
        let mut out = ForwardOut::default();
        for l in 0..self.cfg.n_layers {
            let qkv = self.layer_qkv(l, &x, &rope)?;
            let layer_kv = &mut cache.layers[l];
            layer_kv.append(&qkv.k, &qkv.v, positions)?;
            x = self.layer_finish(
                l,
                &x,
                &qkv.q,
                &layer_kv.keys()?,
                &layer_kv.values()?,
                positions,
                layer_kv.positions(),
            )?;
            if capture_layers.contains(&l) {
                out.queries.push((l, qkv.q));
            }
        }
        out.logits = match logits {
            Logits::None => None,
            Logits::Last => Some(self.logits(&x.narrow(0, x.dim(0)? - 1, 1)?)?),
            Logits::All => Some(self.logits(&x)?),
        };
        Ok(out)
    }
}
