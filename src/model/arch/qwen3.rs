//! Qwen3: the Llama block with an RMS norm on each query and key head before RoPE (and no
//! Q/K/V biases). Everything but the Q/K/V step is Llama's.

use candle_core::Tensor;

use super::{Decoder, Llama, Name, Stream, Weights};
use crate::model::{fused, Config, Qkv, Rope};
use crate::Result;

pub(crate) struct Qwen3 {
    base: Llama,
    /// Per layer, the query and key norms' weights (head_dim each).
    qk_norm: Vec<(Tensor, Tensor)>,
}

impl Qwen3 {
    pub fn load(cfg: &Config, rope: Rope, src: &mut dyn Weights) -> Result<Self> {
        let base = Llama::load(cfg, rope, src)?;
        let qk_norm = (0..cfg.n_layers)
            .map(|l| {
                let q = src.vector(Name::QNorm(l), cfg.head_dim)?;
                Ok((q, src.vector(Name::KNorm(l), cfg.head_dim)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { base, qk_norm })
    }
}

impl Decoder for Qwen3 {
    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        self.base.embed(tokens)
    }

    fn layer_qkv(&self, l: usize, s: &Stream, rope: &(Tensor, Tensor)) -> Result<Qkv> {
        let (b, qkv) = (&self.base, &self.base.layers[l].qkv);
        let y = qkv.matmul_fused(&b.attn_input(l, s)?)?;
        let c = &b.cfg;
        let (q, k, v) = fused::split_qkv(&y, qkv.bias(), c.n_heads, c.n_kv_heads, c.head_dim)?;
        let eps = c.rms_eps as f32;
        // The norm runs over each head's row of head_dim values, and needs them contiguous.
        let (qn, kn) = &self.qk_norm[l];
        let q = candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?;
        let k = candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?;
        Ok(Qkv {
            q: b.rope.apply(&q, &rope.0, &rope.1)?,
            k: b.rope.apply(&k, &rope.0, &rope.1)?,
            v: v.contiguous()?,
        })
    }

    fn layer_finish(&self, l: usize, x: &Tensor, a: &Tensor, norm_next: bool) -> Result<Stream> {
        self.base.layer_finish(l, x, a, norm_next)
    }

    fn logits(&self, x: &Tensor, pass_rows: usize) -> Result<Tensor> {
        self.base.logits(x, pass_rows)
    }
}
