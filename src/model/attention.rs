//! Attention of new queries over an explicit set of cached rows, causal by position.
//!
//! A query at position p sees every key whose position is <= p, wherever that key came from
//! (its own document, another document's cache, a recomputed row). Grouped-query attention is
//! done without copying K/V per query head: the query heads of one KV group are stacked along
//! the row axis so a single batched matmul per KV head covers them.

use candle_core::{DType, Tensor, D};

use crate::Result;

/// Queries per block: bounds the score matrix (heads x block x keys) so long prompts stay in
/// cache and memory, and lets each block skip keys that lie after its last query.
const QUERY_BLOCK: usize = 512;

/// q: (heads, Tq, d), already rotated; k, v: (kv_heads, Tk, d) with `kpos` sorted ascending.
/// Returns (Tq, heads * d).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, qpos: &[u32], kpos: &[u32]) -> Result<Tensor> {
    // Tiny problems (short prompts, decode over a short cache) stay on candle's ops, which
    // match candle-transformers' attention bit for bit; larger ones take the blocked kernel.
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::attend(q, k, v, qpos, kpos)? {
        return Ok(out);
    }
    let tk = k.dim(1)?;
    if q.dim(1)? >= 64 || tk >= 256 {
        if let Some(out) = super::attn_cpu::attend(q, k, v, qpos, kpos)? {
            return Ok(out);
        }
    }
    attend_ops(q, k, v, qpos, kpos)
}

/// The same attention with candle's ops only (matmul, mask, softmax, matmul), block by block:
/// the path for small problems, and the reference the fast kernels are checked against.
pub fn attend_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    qpos: &[u32],
    kpos: &[u32],
) -> Result<Tensor> {
    let (h, tq, d) = q.dims3()?;
    let (hkv, tk, _) = k.dims3()?;
    debug_assert_eq!(tk, kpos.len());
    let group = h / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let mut outs = Vec::with_capacity(tq.div_ceil(QUERY_BLOCK));
    let mut start = 0;
    while start < tq {
        let n = QUERY_BLOCK.min(tq - start);
        let qp = &qpos[start..start + n];
        let max_q = *qp.iter().max().unwrap_or(&0);
        let min_q = *qp.iter().min().unwrap_or(&0);
        // Keys are sorted, so the visible ones for this block are a prefix.
        let visible = kpos.partition_point(|&p| p <= max_q);
        let qb = q.narrow(1, start, n)?;
        let kb = k.narrow(1, 0, visible)?;
        let vb = v.narrow(1, 0, visible)?;
        // (hkv, group * n, d): heads of one group are consecutive in q.
        let qg = qb.contiguous()?.reshape((hkv, group * n, d))?;
        let scores = (qg.matmul(&kb.t()?)? * scale)?; // (hkv, group*n, visible)
        let needs_mask = kpos[..visible].last().is_some_and(|&p| p > min_q);
        let scores = if needs_mask {
            let mask = causal_mask(qp, &kpos[..visible], scores.dtype(), scores.device())?;
            scores
                .reshape((hkv, group, n, visible))?
                .broadcast_add(&mask)?
                .reshape((hkv, group * n, visible))?
        } else {
            scores
        };
        let probs = softmax(&scores)?;
        let o = probs.matmul(&vb.contiguous()?)?; // (hkv, group*n, d)
        let o = o.reshape((h, n, d))?.transpose(0, 1)?.reshape((n, h * d))?;
        outs.push(o);
        start += n;
    }
    Ok(if outs.len() == 1 {
        outs.pop().expect("one block")
    } else {
        Tensor::cat(&outs, 0)?
    })
}

/// Softmax in f32 whatever the activation dtype: bf16 scores lose too much in exp/sum.
fn softmax(scores: &Tensor) -> Result<Tensor> {
    let dt = scores.dtype();
    if dt == DType::F32 {
        Ok(candle_nn::ops::softmax_last_dim(scores)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dt)?)
    }
}

/// (n, visible) additive mask: 0 where key position <= query position, -inf elsewhere.
pub fn causal_mask(
    qpos: &[u32],
    kpos: &[u32],
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut m = Vec::with_capacity(qpos.len() * kpos.len());
    for &qp in qpos {
        m.extend(
            kpos.iter()
                .map(|&kp| if kp <= qp { 0f32 } else { f32::NEG_INFINITY }),
        );
    }
    Ok(Tensor::from_vec(m, (qpos.len(), kpos.len()), device)?.to_dtype(dtype)?)
}

/// Mean over rows of per-head states: (heads, T, d) -> (heads, d).
pub fn mean_rows(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?.mean(D::Minus2)?)
}
