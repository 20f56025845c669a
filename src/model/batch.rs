//! Batched decoding: one new token for each of B independent sequences per step.
//!
//! On a GPU a decode step at batch 1 is bound by reading the weights (16 GB for an 8B model in
//! bf16). Running the B rows through every projection and the MLP as one matmul reads them
//! once per step for all sequences, which is what makes batching pay. Attention stays per
//! sequence (each has its own cache, length and positions), but is done as one batched
//! matmul over the caches stacked (and, if their lengths differ, padded and masked).

use candle_core::{DType, Tensor};

use super::{LayerStep, Model, Qkv};
use crate::kv::KvCache;
use crate::{Error, Result};

impl Model {
    /// Decodes one token for each sequence: `tokens[b]` at `positions[b]` is appended to
    /// `caches[b]` (every layer) and attends to the rows of `caches[b]` at or before its
    /// position. Caches may differ in length and positions (gaps allowed). Returns (B, vocab)
    /// f32 logits; row b equals what `forward(&[tokens[b]], &[positions[b]], &mut caches[b],
    /// Logits::Last, &[])` returns.
    ///
    /// The caches must not share storage (a `KvCache::clone` does): appending writes rows in
    /// place. On an error the caches may hold the new rows in some layers; drop them.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [KvCache],
    ) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 {
            return Err(Error::InvalidInput(
                "decode_batch needs at least one sequence".into(),
            ));
        }
        if positions.len() != b || caches.len() != b {
            return Err(Error::InvalidInput(format!(
                "decode_batch takes one token, one position and one cache per sequence; got {b} \
                 tokens, {} positions, {} caches",
                positions.len(),
                caches.len()
            )));
        }
        let n_layers = self.cfg.n_layers;
        if let Some(i) = caches.iter().position(|c| c.layers.len() != n_layers) {
            return Err(Error::InvalidInput(format!(
                "cache {i} has {} layers but the model has {n_layers}; make caches with \
                 Model::new_cache",
                caches[i].layers.len()
            )));
        }
        let max_pos = positions.iter().copied().max().unwrap_or(0) as usize;
        if max_pos >= self.cfg.max_context {
            return Err(Error::ContextTooLong {
                tokens: max_pos + 1,
                max: self.cfg.max_context,
            });
        }
        let mut step = Batch {
            model: self,
            caches,
            positions,
        };
        let x = self.run_layers(self.embed(tokens)?, self.rope_tables(positions)?, &mut step)?;
        self.logits(&x)
    }

    /// Whether attention on this model's device and dtype reads caches in place.
    fn attends_in_place(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() {
            return crate::cuda::attends(self.dtype, self.cfg.head_dim);
        }
        false
    }

    /// Attention of B single-token queries q (heads, B, d), each over its own cache's layer
    /// `l`. Returns (B, heads * d).
    fn attend_batch(
        &self,
        q: &Tensor,
        caches: &[KvCache],
        l: usize,
        qpos: &[u32],
    ) -> Result<Tensor> {
        let (h, b, d) = q.dims3()?;
        let hkv = self.cfg.n_kv_heads;
        let group = h / hkv;
        let lens: Vec<usize> = caches.iter().map(|c| c.layers[l].len()).collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        let dev = q.device();
        let dt = q.dtype();
        // Pad shorter caches with zero rows (masked below) so all stack to (B, hkv, T, d).
        let pad = |x: Tensor, len: usize| -> Result<Tensor> {
            if len == t {
                return Ok(x);
            }
            let z = Tensor::zeros((hkv, t - len, d), dt, dev)?;
            Ok(Tensor::cat(&[&x, &z], 1)?)
        };
        let mut ks = Vec::with_capacity(b);
        let mut vs = Vec::with_capacity(b);
        for (c, &len) in caches.iter().zip(&lens) {
            let layer = &c.layers[l];
            ks.push(pad(layer.keys()?, len)?);
            vs.push(pad(layer.values()?, len)?);
        }
        let k = Tensor::stack(&ks, 0)?; // (B, hkv, T, d)
        let v = Tensor::stack(&vs, 0)?;
        drop((ks, vs));
        // Heads of one KV group are consecutive, as in `attend`.
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, hkv, group, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?; // (B, hkv, group, T)
                                                    // A mask is needed only for padding or for keys after a query's position; in the
                                                    // usual decode (equal lengths, new token last) there is none to build or upload.
        let needs_mask = caches.iter().zip(&lens).zip(qpos).any(|((c, &len), &p)| {
            len < t || c.layers[l].positions().last().is_some_and(|&last| last > p)
        });
        let scores = if needs_mask {
            let mut m = vec![0f32; b * t];
            for (i, c) in caches.iter().enumerate() {
                let row = &mut m[i * t..(i + 1) * t];
                let kpos = c.layers[l].positions();
                for (j, slot) in row.iter_mut().enumerate() {
                    if kpos.get(j).is_none_or(|&kp| kp > qpos[i]) {
                        *slot = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, 1, t), dev)?.to_dtype(scores.dtype())?;
            scores.broadcast_add(&mask)?
        } else {
            scores
        };
        // Softmax in f32 whatever the activation dtype, as in `attend`.
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dt)?;
        let o = probs.matmul(&v)?; // (B, hkv, group, d)
        Ok(o.reshape((b, h * d))?)
    }
}

/// One decode step of B sequences: row b appends to and attends over its own cache.
struct Batch<'a> {
    model: &'a Model,
    caches: &'a mut [KvCache],
    positions: &'a [u32],
}

impl LayerStep for Batch<'_> {
    fn attend(&mut self, l: usize, qkv: &Qkv) -> Result<Tensor> {
        let (m, positions) = (self.model, self.positions);
        let b = positions.len();
        // (B, kv_heads, d), contiguous, so each sequence's row is one contiguous slab.
        let k_rows = qkv.k.transpose(0, 1)?.contiguous()?;
        let v_rows = qkv.v.transpose(0, 1)?.contiguous()?;
        for (i, cache) in self.caches.iter_mut().enumerate() {
            let k = k_rows.get(i)?.unsqueeze(1)?;
            let v = v_rows.get(i)?.unsqueeze(1)?;
            cache.layers[l].append(&k, &v, &positions[i..i + 1])?;
        }
        // Each sequence attends on its own where a kernel reads its cache in place (CPU,
        // samkv's CUDA kernel: stacking would copy every cache every step); otherwise
        // one batched matmul over the stacked caches saves B op chains per layer.
        #[cfg(feature = "cuda")]
        if b > 1 && m.device.is_cuda() {
            let kv = self
                .caches
                .iter()
                .map(|c| {
                    let layer = &c.layers[l];
                    Ok((layer.keys()?, layer.values()?, layer.positions()))
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some(a) = crate::cuda::attend_batch(&qkv.q, &kv, positions)? {
                return Ok(a);
            }
        }
        if b == 1 || m.device.is_cpu() || m.attends_in_place() {
            let mut outs = Vec::with_capacity(b);
            for (i, cache) in self.caches.iter_mut().enumerate() {
                let q = qkv.q.narrow(1, i, 1)?;
                outs.push(m.decode_attention(&q, &mut cache.layers[l], &positions[i..i + 1])?);
            }
            return Ok(Tensor::cat(&outs, 0)?);
        }
        m.attend_batch(&qkv.q, self.caches, l, positions)
    }
}
