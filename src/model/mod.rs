//! The model runtime: Llama-family decoders (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5) and Qwen3,
//! driven layer by layer so KV-reuse methods can choose which rows to recompute between layers.
//! Each architecture is one file under `arch/`; the layer loop ([`Model::run_layers`]) is
//! shared by prefill, batched decode and partial recompute, which differ only in their
//! [`LayerStep`].
//!
//! Every token has an explicit position; the KV rows a token attends to are an explicit set
//! (causal by position), held in a [`KvCache`] the caller owns.

mod arch;
mod attention;
mod attn_cpu;
mod batch;
mod flags;
mod fused;
#[cfg(feature = "cuda")]
pub mod kernel_check;
mod linear;
mod load;
mod qmm;
pub mod rope;

use candle_core::{DType, Device, Tensor};

pub use attention::{attend, attend_ops, causal_mask, mean_rows};
pub use flags::RuntimeFlags;
pub use linear::Linear;
pub use load::{LoadOptions, WeightMode};
pub use rope::{Llama3Scaling, Rope, RopeLayout};

use crate::kv::{KvCache, LayerKv};
use crate::{Error, Result};
use arch::{Decoder, Stream};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
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
    flags: RuntimeFlags,
    arch: Box<dyn Decoder>,
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

    /// The runtime switches this model was loaded with.
    pub fn flags(&self) -> &RuntimeFlags {
        &self.flags
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
        self.arch.embed(tokens)
    }

    /// cos/sin tables for these positions, shared by all layers of one pass.
    pub fn rope_tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let offs: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        self.rope.tables(&offs, self.dtype, &self.device)
    }

    /// Step 1 of a layer: normalize the residual stream x (T, hidden) and project it to
    /// rotated Q, K and V.
    pub fn layer_qkv(&self, l: usize, x: &Tensor, rope: &(Tensor, Tensor)) -> Result<Qkv> {
        self.arch.layer_qkv(l, &Stream::new(x.clone()), rope)
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
        Ok(self.arch.layer_finish(l, x, &a, false)?.x)
    }

    /// All layers over the stream x (T, hidden) at the positions of the tables `rope`: each
    /// layer's Q/K/V go to `step`, which stores K/V and attends, and may narrow the rows
    /// carried on. Prefill, batched decode and partial recompute are this loop. Returns the
    /// final stream (before the final norm) of the rows carried through.
    pub fn run_layers(
        &self,
        x: Tensor,
        rope: (Tensor, Tensor),
        step: &mut dyn LayerStep,
    ) -> Result<Tensor> {
        let (mut s, mut rope) = (Stream::new(x), rope);
        let n = self.cfg.n_layers;
        for l in 0..n {
            let qkv = self.arch.layer_qkv(l, &s, &rope)?;
            let a = step.attend(l, &qkv)?;
            s = self.arch.layer_finish(l, &s.x, &a, l + 1 < n)?;
            if let Some(keep) = step.carry(l, qkv)? {
                let idx = Tensor::new(keep.as_slice(), &self.device)?;
                s = s.select(&idx)?;
                rope = (rope.0.index_select(&idx, 0)?, rope.1.index_select(&idx, 0)?);
            }
        }
        Ok(s.x)
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
        self.arch.logits(x, pass_rows)
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
        let mut step = Append {
            model: self,
            cache,
            positions,
            capture_layers,
            queries: Vec::new(),
        };
        let x = self.run_layers(self.embed(tokens)?, self.rope_tables(positions)?, &mut step)?;
        let queries = step.queries;
        let logits = match logits {
            Logits::None => None,
            Logits::Last => {
                let rows = x.dim(0)?;
                Some(self.logits_as(&x.narrow(0, rows - 1, 1)?, rows)?)
            }
            Logits::All => Some(self.logits(&x)?),
        };
        Ok(ForwardOut { logits, queries })
    }
}

/// What a pass through [`Model::run_layers`] does at each layer between Q/K/V and the MLP.
pub trait LayerStep {
    /// Stores layer `l`'s fresh K/V and returns the attention output of its queries,
    /// (rows, heads * head_dim).
    fn attend(&mut self, l: usize, qkv: &Qkv) -> Result<Tensor>;

    /// After layer `l`: the rows (indices into this layer's rows) to carry into the next
    /// layer, None for all.
    fn carry(&mut self, _l: usize, _qkv: Qkv) -> Result<Option<Vec<u32>>> {
        Ok(None)
    }
}

/// An ordinary pass: new K/V rows are appended to the cache and attend over all it holds.
struct Append<'a> {
    model: &'a Model,
    cache: &'a mut KvCache,
    positions: &'a [u32],
    capture_layers: &'a [usize],
    queries: Vec<(usize, Tensor)>,
}

impl LayerStep for Append<'_> {
    fn attend(&mut self, l: usize, qkv: &Qkv) -> Result<Tensor> {
        let layer_kv = &mut self.cache.layers[l];
        layer_kv.append(&qkv.k, &qkv.v, self.positions)?;
        self.model
            .decode_attention(&qkv.q, layer_kv, self.positions)
    }

    fn carry(&mut self, l: usize, qkv: Qkv) -> Result<Option<Vec<u32>>> {
        if self.capture_layers.contains(&l) {
            self.queries.push((l, qkv.q));
        }
        Ok(None)
    }
}
