//! Llama-family decoders: Llama 2/3, Mistral, SmolLM2, and Qwen2/2.5 (the same network with
//! biases on the Q/K/V projections, which the weight source supplies where the checkpoint has
//! them). Pre-norm blocks: RMS norm, attention with RoPE, residual, RMS norm, SiLU-gated MLP,
//! residual.

use candle_core::{DType, Tensor};

use super::{Decoder, Name, Stream, Weights};
use crate::model::{fused, Config, Linear, Qkv, Rope};
use crate::Result;

pub(crate) struct Layer {
    pub attn_norm: Tensor,
    /// Q, K and V projections fused.
    pub qkv: Linear,
    pub wo: Linear,
    pub ffn_norm: Tensor,
    /// Gate and up projections fused.
    pub gate_up: Linear,
    pub down: Linear,
}

pub(crate) struct Llama {
    pub cfg: Config,
    pub rope: Rope,
    embed: Tensor,
    pub layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
}

impl Llama {
    pub fn load(cfg: &Config, rope: Rope, src: &mut dyn Weights) -> Result<Self> {
        let (h, f) = (cfg.hidden, cfg.ffn);
        let (qd, kd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            use Name::*;
            layers.push(Layer {
                attn_norm: src.vector(AttnNorm(l), h)?,
                qkv: src.linear(&[(Q(l), qd), (K(l), kd), (V(l), kd)], h)?,
                wo: src.linear(&[(O(l), h)], qd)?,
                ffn_norm: src.vector(FfnNorm(l), h)?,
                gate_up: src.linear(&[(Gate(l), f), (Up(l), f)], h)?,
                down: src.linear(&[(Down(l), h)], f)?,
            });
        }
        let embed = src.embedding(cfg.vocab, h)?;
        let lm_head = src.lm_head(cfg.vocab, h)?;
        let norm = src.vector(Name::Norm, h)?;
        Ok(Self {
            cfg: cfg.clone(),
            rope,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    fn eps(&self) -> f32 {
        self.cfg.rms_eps as f32
    }

    /// The layer's input, normalized.
    pub fn attn_input(&self, l: usize, s: &Stream) -> Result<Tensor> {
        Ok(match &s.normed {
            Some(h) => h.clone(),
            None => candle_nn::ops::rms_norm(&s.x, &self.layers[l].attn_norm, self.eps())?,
        })
    }
}

impl Decoder for Llama {
    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(tokens, self.embed.device())?;
        Ok(self.embed.index_select(&ids, 0)?)
    }

    fn layer_qkv(&self, l: usize, s: &Stream, rope: &(Tensor, Tensor)) -> Result<Qkv> {
        let (c, qkv) = (&self.cfg, &self.layers[l].qkv);
        let y = qkv.matmul_fused(&self.attn_input(l, s)?)?;
        let (h, hkv, d) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let (q, k, v) = fused::qkv_rope(&y, qkv.bias(), &self.rope, rope, h, hkv, d)?;
        Ok(Qkv { q, k, v })
    }

    fn layer_finish(&self, l: usize, x: &Tensor, a: &Tensor, norm_next: bool) -> Result<Stream> {
        let layer = &self.layers[l];
        let eps = self.eps();
        let (x, h) = fused::add_rms_norm(x, &layer.wo.forward(a)?, &layer.ffn_norm, eps)?;
        let act = fused::silu_mul(&layer.gate_up.matmul_fused(&h)?)?;
        let m = layer.down.forward(&act)?;
        match self.layers.get(l + 1).filter(|_| norm_next) {
            // One pass for the residual add and the next layer's norm (on CUDA).
            Some(next) => {
                let (x, h) = fused::add_rms_norm(&x, &m, &next.attn_norm, eps)?;
                Ok(Stream { x, normed: Some(h) })
            }
            None => Ok(Stream::new((x + m)?)),
        }
    }

    fn logits(&self, x: &Tensor, pass_rows: usize) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x, &self.norm, self.eps())?;
        Ok(self
            .lm_head
            .forward_as(&h, pass_rows)?
            .to_dtype(DType::F32)?)
    }
}
