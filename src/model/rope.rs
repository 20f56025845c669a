//! Rotary position embeddings at explicit, arbitrary positions.
//!
//! Every token carries its own position, so cos/sin tables are built per call for exactly the
//! positions in hand (cheap: T x head_dim/2 values). Rotations compose, which is what lets a
//! cached key computed at position p be moved to p' by rotating it by (p' - p).

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// How a checkpoint pairs the dimensions that RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeLayout {
    /// Pairs (0,1), (2,3), ...: GGUF `llama` (Q/K rows permuted at conversion).
    Interleaved,
    /// Pairs (i, i + d/2): Hugging Face llama/qwen2 and GGUF `qwen2`.
    SplitHalf,
}

impl RopeLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            RopeLayout::Interleaved => "interleaved",
            RopeLayout::SplitHalf => "split_half",
        }
    }
}

/// Llama-3 style frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f64>,
    pub layout: RopeLayout,
}

impl Rope {
    /// `freq_factors` are GGUF's `rope_freqs.weight` (Llama-3 GGUFs ship the scaling this way).
    pub fn new(
        head_dim: usize,
        base: f64,
        layout: RopeLayout,
        scaling: Option<Llama3Scaling>,
        freq_factors: Option<&[f32]>,
    ) -> Self {
        let mut inv_freq: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        if let Some(s) = scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        if let Some(ff) = freq_factors {
            for (f, d) in inv_freq.iter_mut().zip(ff) {
                *f /= *d as f64;
            }
        }
        Self { inv_freq, layout }
    }

    /// cos and sin of shape (T, head_dim/2) for signed offsets (positions or position deltas).
    /// Angles are computed in f64: positions reach 1e5 and f32 would lose the low bits.
    pub fn tables(
        &self,
        offsets: &[i64],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(offsets.len() * half);
        let mut sin = Vec::with_capacity(offsets.len() * half);
        for &p in offsets {
            for &f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let shape = (offsets.len(), half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotate x of shape (heads, T, head_dim) with per-row tables from [`Rope::tables`].
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?.contiguous()?;
        let y = match self.layout {
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeLayout::SplitHalf => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        };
        Ok(y.squeeze(0)?)
    }

    /// Move already-rotated keys (heads, T, head_dim) by `deltas[t]` positions each.
    pub fn shift(&self, k: &Tensor, deltas: &[i64]) -> Result<Tensor> {
        if deltas.iter().all(|&d| d == 0) {
            return Ok(k.clone());
        }
        let (cos, sin) = self.tables(deltas, k.dtype(), k.device())?;
        self.apply(k, &cos, &sin)
    }
}
