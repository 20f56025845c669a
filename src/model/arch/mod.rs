//! Decoder architectures behind one layer-stepping trait, [`Decoder`], one file each. The layer
//! loop itself ([`super::Model::run_layers`]) is shared: an architecture only says how a layer
//! turns its input into Q/K/V and how the attention output becomes the next layer's input.
//!
//! Weights are read by role ([`Name`]) from a [`Weights`] source (GGUF, Hugging Face
//! safetensors, or seeded random), so each architecture is built by one function whatever
//! the checkpoint format.

mod llama;
mod qwen3;

use candle_core::Tensor;

pub(crate) use llama::Llama;
pub(crate) use qwen3::Qwen3;

use super::{Arch, Config, Linear, Qkv, Rope};
use crate::Result;

/// The residual stream entering a layer and, when the previous layer's last residual add
/// produced it in the same pass (fused on CUDA), its normalized form for this layer.
pub(crate) struct Stream {
    pub x: Tensor,
    pub normed: Option<Tensor>,
}

impl Stream {
    pub fn new(x: Tensor) -> Self {
        Self { x, normed: None }
    }

    /// The rows `idx` of the stream (normalization is per row, so it stays valid).
    pub fn select(self, idx: &Tensor) -> Result<Self> {
        Ok(Self {
            x: self.x.index_select(idx, 0)?,
            normed: self.normed.map(|h| h.index_select(idx, 0)).transpose()?,
        })
    }
}

/// One decoder architecture, driven a layer at a time by the caller, which owns the KV rows
/// and decides what each layer's queries attend to.
pub(crate) trait Decoder: Send + Sync {
    /// Token embeddings, (T, hidden); ids are checked by the caller.
    fn embed(&self, tokens: &[u32]) -> Result<Tensor>;

    /// Normalize the stream (unless already done) and project it to Q, K and V rotated by
    /// the tables of [`Rope::tables`] (the architecture holds its own copy of the model's
    /// [`Rope`] for the pairing of rotated dimensions).
    fn layer_qkv(&self, l: usize, s: &Stream, rope: &(Tensor, Tensor)) -> Result<Qkv>;

    /// Output projection, residual and MLP on the attention output a (T, heads * head_dim).
    /// With `norm_next` the next layer's input norm is computed with the last residual add.
    fn layer_finish(&self, l: usize, x: &Tensor, a: &Tensor, norm_next: bool) -> Result<Stream>;

    /// Final norm and LM head, kernel chosen as for a pass of `pass_rows` rows; f32.
    fn logits(&self, x: &Tensor, pass_rows: usize) -> Result<Tensor>;
}

/// Builds the decoder of `cfg.arch` from a weight source.
pub(crate) fn build(cfg: &Config, rope: Rope, src: &mut dyn Weights) -> Result<Box<dyn Decoder>> {
    Ok(match cfg.arch {
        Arch::Llama | Arch::Qwen2 => Box::new(Llama::load(cfg, rope, src)?),
        Arch::Qwen3 => Box::new(Qwen3::load(cfg, rope, src)?),
    })
}

/// A weight by its role; [`Name::gguf`] and [`Name::hf`] spell it in each format (without the
/// `.weight` / `.bias` suffix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Name {
    Embed,
    Norm,
    LmHead,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    QNorm(usize),
    KNorm(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl Name {
    /// (layer, GGUF name, Hugging Face name): the one table of both spellings.
    fn spellings(self) -> (Option<usize>, &'static str, &'static str) {
        use Name::*;
        match self {
            Embed => (None, "token_embd", "model.embed_tokens"),
            Norm => (None, "output_norm", "model.norm"),
            LmHead => (None, "output", "lm_head"),
            AttnNorm(l) => (Some(l), "attn_norm", "input_layernorm"),
            Q(l) => (Some(l), "attn_q", "self_attn.q_proj"),
            K(l) => (Some(l), "attn_k", "self_attn.k_proj"),
            V(l) => (Some(l), "attn_v", "self_attn.v_proj"),
            QNorm(l) => (Some(l), "attn_q_norm", "self_attn.q_norm"),
            KNorm(l) => (Some(l), "attn_k_norm", "self_attn.k_norm"),
            O(l) => (Some(l), "attn_output", "self_attn.o_proj"),
            FfnNorm(l) => (Some(l), "ffn_norm", "post_attention_layernorm"),
            Gate(l) => (Some(l), "ffn_gate", "mlp.gate_proj"),
            Up(l) => (Some(l), "ffn_up", "mlp.up_proj"),
            Down(l) => (Some(l), "ffn_down", "mlp.down_proj"),
        }
    }

    pub fn gguf(self) -> String {
        match self.spellings() {
            (Some(l), g, _) => format!("blk.{l}.{g}"),
            (None, g, _) => g.to_string(),
        }
    }

    pub fn hf(self) -> String {
        match self.spellings() {
            (Some(l), _, h) => format!("model.layers.{l}.{h}"),
            (None, _, h) => h.to_string(),
        }
    }
}

/// Where an architecture's weights come from. Shapes are given by the caller so every source
/// can check them (and the random one can make them).
pub(crate) trait Weights {
    /// A vector such as a norm's weight, dense in the activation dtype.
    fn vector(&mut self, name: Name, len: usize) -> Result<Tensor>;

    /// The projection from `inp` features to the parts' widths, fused side by side, with the
    /// biases the checkpoint has.
    fn linear(&mut self, parts: &[(Name, usize)], inp: usize) -> Result<Linear>;

    /// The token embedding table (vocab, hidden), dense.
    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Tensor>;

    /// The LM head: its own weights, or the embedding's where the checkpoint ties them.
    /// Called after [`Weights::embedding`].
    fn lm_head(&mut self, vocab: usize, hidden: usize) -> Result<Linear>;
}
