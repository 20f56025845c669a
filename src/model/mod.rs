//! The model runtime: Llama-family decoders (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5) driven
//! layer by layer so KV-reuse methods can choose which rows to recompute between layers.
//!
//! Every token has an explicit position; the KV rows a token attends to are an explicit set
//! (causal by position), held in a [`KvCache`] the caller owns.

mod attention;
mod attn_cpu;
mod batch;
#[cfg(feature = "cuda")]
pub mod cuda;
mod fused;
mod linear;
mod load;
mod qmm;
pub mod rope;

use candle_core::{DType, Device, Tensor};

pub use attention::{attend, attend_ops, causal_mask, mean_rows};
pub use linear::Linear;
pub use load::{LoadOptions, WeightMode};
pub use rope::{Llama3Scaling, Rope, RopeLayout};

use crate::kv::{KvCache, LayerKv};
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

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V projections fused.
    qkv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections fused.
    gate_up: Linear,
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

/// Cached rows from which decoding reads the f16 copy of K/V: below it the f32 rows are
/// cheap to read and the exact path is kept.
const HALF_KV_MIN_ROWS: usize = 256;

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
        let eps = self.cfg.rms_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &self.layers[l].attn_norm, eps)?;
        self.layer_qkv_normed(l, &h, rope)
    }

    /// [`Model::layer_qkv`] on the already normalized stream h.
    fn layer_qkv_normed(&self, l: usize, h: &Tensor, rope: &(Tensor, Tensor)) -> Result<Qkv> {
        let c = &self.cfg;
        let layer = &self.layers[l];
        let t = h.dim(0)?;
        let y = layer.qkv.matmul_fused(h)?;
        let fast = fused::qkv_rope(
            &y,
            layer.qkv.bias(),
            &rope.0,
            &rope.1,
            self.rope.layout,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
        )?;
        if let Some((q, k, v)) = fast {
            return Ok(Qkv { q, k, v });
        }
        let mut p = layer.qkv.forward_parts(h)?.into_iter();
        let (q, k, v) = match (p.next(), p.next(), p.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => unreachable!("the fused QKV projection has three parts"),
        };
        let q = q.reshape((t, c.n_heads, c.head_dim))?.transpose(0, 1)?;
        let k = k.reshape((t, c.n_kv_heads, c.head_dim))?.transpose(0, 1)?;
        let v = v.reshape((t, c.n_kv_heads, c.head_dim))?.transpose(0, 1)?;
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
        let a = attend(q, keys, values, qpos, kpos)?;
        self.layer_after_attention(l, x, &a)
    }

    /// Output projection, residual and MLP on the attention output a (T, heads * head_dim).
    fn layer_after_attention(&self, l: usize, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        let (x, m) = self.layer_mlp(l, x, a)?;
        Ok((x + m)?)
    }

    /// [`Model::layer_after_attention`] short of its last residual add: returns the stream
    /// after attention's residual and the MLP's output, so a caller can fuse that add with
    /// the next layer's norm.
    fn layer_mlp(&self, l: usize, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[l];
        let eps = self.cfg.rms_eps as f32;
        let (x, h) = fused::add_rms_norm(x, &layer.wo.forward(a)?, &layer.ffn_norm, eps)?;
        let gu = layer.gate_up.matmul_fused(&h)?;
        let act = match fused::silu_mul(&gu)? {
            Some(a) => a,
            None => {
                let f = gu.dim(1)? / 2;
                (candle_nn::ops::silu(&gu.narrow(1, 0, f)?)? * gu.narrow(1, f, f)?)?
            }
        };
        let m = layer.down.forward(&act)?;
        Ok((x, m))
    }

    /// Attention of one decoded token over a layer's cache, reading the cache's f16 copy
    /// once the context is long enough for memory traffic to dominate (see `kv::HalfKv`).
    fn decode_attention(&self, q: &Tensor, layer_kv: &mut LayerKv, qpos: &[u32]) -> Result<Tensor> {
        if qpos.len() == 1 && layer_kv.len() >= HALF_KV_MIN_ROWS {
            // Keys are sorted by position: the visible ones are a prefix.
            let vis = layer_kv.positions().partition_point(|&p| p <= qpos[0]);
            if let Some(h) = layer_kv.half()? {
                if let Some(a) = attn_cpu::decode_half(q, &h.k, &h.v, h.cap, vis)? {
                    return Ok(a);
                }
            }
        }
        attend(
            q,
            &layer_kv.keys()?,
            &layer_kv.values()?,
            qpos,
            layer_kv.positions(),
        )
    }

    /// Final norm and LM head for the given rows of x, returned as f32 (rows, vocab).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.logits_as(x, x.dim(0)?)
    }

    /// [`Model::logits`] for rows of a pass of `pass_rows` rows. With `--weights auto` the LM
    /// head then uses the same (dense) kernel as the rest of the prompt's pass: taken with
    /// decode's quantized kernel because it is one row, the first token's logits differed
    /// from dense ones by ~0.1, enough to flip near-ties (SmolLM2's plain answer to "What is
    /// the capital of France?" started "L'Étoile" instead of "The capital ... Paris").
    pub fn logits_as(&self, x: &Tensor, pass_rows: usize) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x, &self.norm, self.cfg.rms_eps as f32)?;
        Ok(self
            .lm_head
            .forward_as(&h, pass_rows)?
            .to_dtype(DType::F32)?)
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
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            // Run the pass on a pool worker: the kernels' parallel loops then start on this
            // thread and the other workers, still spinning between loops, pick up their share
            // at once instead of being woken from sleep for every loop (decode runs ~150 short
            // loops per token).
            return rayon::scope(|_| {
                self.forward_inner(tokens, positions, cache, logits, capture_layers)
            });
        }
        self.forward_inner(tokens, positions, cache, logits, capture_layers)
    }

    fn forward_inner(
        &self,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        capture_layers: &[usize],
    ) -> Result<ForwardOut> {
        let rope = self.rope_tables(positions)?;
        let mut x = self.embed(tokens)?;
        let mut out = ForwardOut::default();
        // The next layer's normalized stream, when the last residual add produced it.
        let mut normed: Option<Tensor> = None;
        for l in 0..self.cfg.n_layers {
            let qkv = match normed.take() {
                Some(h) => self.layer_qkv_normed(l, &h, &rope)?,
                None => self.layer_qkv(l, &x, &rope)?,
            };
            let layer_kv = &mut cache.layers[l];
            layer_kv.append(&qkv.k, &qkv.v, positions)?;
            let a = self.decode_attention(&qkv.q, layer_kv, positions)?;
            let (mid, m) = self.layer_mlp(l, &x, &a)?;
            x = match self.layers.get(l + 1) {
                // One pass for the residual add and the next layer's norm (on CUDA).
                Some(next) => {
                    let eps = self.cfg.rms_eps as f32;
                    let (sum, h) = fused::add_rms_norm(&mid, &m, &next.attn_norm, eps)?;
                    normed = Some(h);
                    sum
                }
                None => (mid + m)?,
            };
            if capture_layers.contains(&l) {
                out.queries.push((l, qkv.q));
            }
        }
        out.logits = match logits {
            Logits::None => None,
            Logits::Last => {
                let rows = x.dim(0)?;
                Some(self.logits_as(&x.narrow(0, rows - 1, 1)?, rows)?)
            }
            Logits::All => Some(self.logits(&x)?),
        };
        Ok(out)
    }
}
