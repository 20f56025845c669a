//! SamKV step 5: every middle block scored against its document's personalized query (the
//! paper's dot product, [`score_blocks`]) or by the question's attention
//! ([`score_blocks_by_attention`], samkv's option), and Eq. 2's keep ratio per document.

use std::ops::Range;

use candle_core::{DType, Tensor};

use super::{rows_of, DocSpan};
use crate::kv::{KvCache, LayerKv};
use crate::model::{causal_mask, mean_rows};
use crate::Result;

/// Mean key of each block of rows, (blocks, kv_heads, d) f32. `blocks` are ranges of row
/// indices into `keys` (kv_heads, T, d). Runs of back-to-back blocks of one length (all of a
/// document's middle but its last block) are averaged by one reshape and mean, not block by
/// block: on a GPU that is a few kernels per document instead of a few per block.
pub fn block_mean_keys(keys: &Tensor, blocks: &[Range<usize>]) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let (start, len) = (blocks[i].start, blocks[i].len());
        let mut n = 1;
        while i + n < blocks.len()
            && blocks[i + n].start == start + n * len
            && blocks[i + n].len() == len
        {
            n += 1;
        }
        let (kv, _, d) = keys.dims3()?;
        let run = keys
            .narrow(1, start, n * len)?
            .to_dtype(DType::F32)?
            .reshape((kv, n, len, d))?
            .mean(2)?; // (kv, n, d)
        parts.push(run.transpose(0, 1)?);
        i += n;
    }
    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
}

/// `<K_b, q>` summed over KV heads for each block mean `K_b`: means (blocks, kv, d), q (kv, d).
pub fn dot_scores(means: &Tensor, q: &Tensor) -> Result<Vec<f32>> {
    Ok(means
        .broadcast_mul(&q.unsqueeze(0)?)?
        .sum((1, 2))?
        .to_vec1()?)
}

/// Step 5's scores at one layer for one document: `s_b` for each middle block of `doc` and
/// the anchor score `a = <mean(K_anchor), q_hat>`. [`score_blocks`] does this for every
/// document at once.
pub fn block_scores(layer: &LayerKv, doc: &DocSpan, q_hat: &Tensor) -> Result<(Vec<f32>, f32)> {
    if doc.blocks.is_empty() {
        return Ok((Vec::new(), 0.0));
    }
    let pos = layer.positions();
    let first = rows_of(layer, &[doc.rows.start])?[0];
    let base = pos[first];
    let to_rows =
        |r: &Range<u32>| (first + (r.start - base) as usize)..(first + (r.end - base) as usize);
    let keys = layer.keys()?;
    let blocks: Vec<Range<usize>> = doc.blocks.iter().map(to_rows).collect();
    let anchor: Vec<usize> = doc
        .anchor_positions()
        .map(|p| first + (p - base) as usize)
        .collect();
    let k_anchor = mean_rows(&layer.gather_keys(&anchor)?)?;
    // One read back to the host for the blocks and the anchor together.
    let means = Tensor::cat(
        &[block_mean_keys(&keys, &blocks)?, k_anchor.unsqueeze(0)?],
        0,
    )?;
    let mut s = dot_scores(&means, q_hat)?;
    let a = s.pop().unwrap_or_default();
    Ok((s, a))
}

/// Step 5, paper Eq. 2: `P = (max - a) / (max - min)` when `min < a <= max`, else 0 (so an
/// anchor score outside the blocks' range, or no spread at all, keeps no middle block).
pub fn keep_ratio(scores: &[f32], a: f32) -> f64 {
    let (min, max) = score_range(scores);
    let (min, max, a) = (min as f64, max as f64, a as f64);
    if scores.is_empty() || !(min < a && a <= max) {
        return 0.0;
    }
    (max - a) / (max - min)
}

/// (min, max) of a document's block scores; (inf, -inf) when it has none.
pub(super) fn score_range(scores: &[f32]) -> (f32, f32) {
    let min = scores.iter().copied().fold(f32::INFINITY, f32::min);
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (min, max)
}

/// Block and anchor scores, `scores[s][i]`, of document i at stable layer s.
pub type Scores = Vec<Vec<(Vec<f32>, f32)>>;

/// Step 5's scoring at every stable layer (documents without a middle get no blocks). `keys`
/// holds every context row at the stable layers ([`stable_rows`]). Computes what
/// [`block_scores`] does one document at a time, for all of them at once: the dot product is
/// linear, so a block's score `<mean(K_b), q_hat_i>` is the mean of its rows' own
/// `<K_r, q_hat_i>`. One matmul per stable layer gives every row against every document's
/// query, one read back brings them all to the host, which averages blocks and anchors (per
/// document and layer this was a dozen small launches and a host sync each).
pub fn score_blocks(
    keys: &KvCache,
    docs: &[DocSpan],
    q_hat: &[Tensor],
    stable: &[usize],
) -> Result<Scores> {
    let mut out = vec![vec![(Vec::new(), 0.0); docs.len()]; stable.len()];
    let scored: Vec<usize> = (0..docs.len())
        .filter(|&i| !docs[i].blocks.is_empty())
        .collect();
    if scored.is_empty() {
        return Ok(out);
    }
    let mut dots = Vec::with_capacity(stable.len());
    for (s, &l) in stable.iter().enumerate() {
        let k = keys.layers[l].keys()?.to_dtype(DType::F32)?; // (kv, T, d)
        let q: Vec<Tensor> = scored
            .iter()
            .map(|&i| q_hat[i].get(s))
            .collect::<candle_core::Result<_>>()?;
        let q = Tensor::stack(&q, 2)?; // (kv, d, docs)
        dots.push(k.matmul(&q)?.sum(0)?); // (T, docs): summed over KV heads
    }
    // One read back; layers may hold different rows, so each is flattened.
    let lens: Vec<usize> = dots.iter().map(|t| t.elem_count()).collect();
    let flat: Vec<Tensor> = dots
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let flat: Vec<f32> = Tensor::cat(&flat, 0)?.to_vec1()?;
    let n = scored.len();
    for (s, &l) in stable.iter().enumerate() {
        let layer = &keys.layers[l];
        let at: usize = lens[..s].iter().sum();
        let dots = &flat[at..at + lens[s]]; // (rows, docs) row-major
        for (c, &i) in scored.iter().enumerate() {
            let mean = |pos: &mut dyn Iterator<Item = u32>| -> Result<f32> {
                let rows = rows_of(layer, &pos.collect::<Vec<_>>())?;
                let sum: f32 = rows.iter().map(|&r| dots[r * n + c]).sum();
                Ok(sum / rows.len().max(1) as f32)
            };
            let d = &docs[i];
            let blocks = d
                .blocks
                .iter()
                .map(|b| mean(&mut b.clone()))
                .collect::<Result<Vec<_>>>()?;
            out[s][i] = (blocks, mean(&mut d.anchor_positions())?);
        }
    }
    Ok(out)
}

/// Step 5 with [`Score::Attention`]: at each stable layer, the attention every cached row
/// receives from the question (`question[s]`, at `qpos`), then per document the mean over
/// each block's rows and over its anchor rows. One read back to the host per stable layer.
pub fn score_blocks_by_attention(
    keys: &KvCache,
    docs: &[DocSpan],
    question: &[Tensor],
    qpos: &[u32],
    stable: &[usize],
) -> Result<Scores> {
    let mean = |m: &[f32], rows: &mut dyn Iterator<Item = usize>| {
        let (sum, n) = rows.fold((0f32, 0usize), |(s, n), r| (s + m[r], n + 1));
        sum / n.max(1) as f32
    };
    stable
        .iter()
        .zip(question)
        .map(|(&l, q)| {
            let layer = &keys.layers[l];
            let mass = attention_probs(q, &layer.keys()?, qpos, layer.positions())?;
            let mass: Vec<f32> = mass.to_vec1()?;
            docs.iter()
                .map(|d| {
                    let idx = |p: u32| layer.positions().binary_search(&p).ok();
                    let blocks = d
                        .blocks
                        .iter()
                        .map(|b| mean(&mass, &mut b.clone().filter_map(idx)))
                        .collect();
                    let a = mean(&mass, &mut d.anchor_positions().filter_map(idx));
                    Ok((blocks, a))
                })
                .collect()
        })
        .collect()
}

/// Softmax attention of queries q (heads, Tq, d) over keys k (kv_heads, Tk, d), causal by
/// position, summed over heads and queries: (Tk,) f32.
pub fn attention_probs(q: &Tensor, k: &Tensor, qpos: &[u32], kpos: &[u32]) -> Result<Tensor> {
    let (h, tq, d) = q.dims3()?;
    let (kv, tk, _) = k.dims3()?;
    let g = h / kv.max(1);
    // (kv, g * tq, d): the query heads of a group are consecutive, as in attention.
    let q = q
        .to_dtype(DType::F32)?
        .contiguous()?
        .reshape((kv, g * tq, d))?;
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    // Only keys after the earliest query need masking (none when scoring the context).
    let first_q = qpos.iter().copied().min().unwrap_or(0);
    let scores = if kpos.last().is_some_and(|&p| p > first_q) {
        let mask = causal_mask(qpos, kpos, DType::F32, q.device())?;
        scores
            .reshape((kv, g, tq, tk))?
            .broadcast_add(&mask)?
            .reshape((kv, g * tq, tk))?
    } else {
        scores
    };
    Ok(candle_nn::ops::softmax_last_dim(&scores)?.sum((0, 1))?)
}

/// Step 5: `P_i`, the keep ratio of each document averaged over the stable layers (0 for a
/// document without a middle).
pub fn keep_ratios_per_doc(scores: &Scores, n_docs: usize) -> Vec<f64> {
    (0..n_docs)
        .map(|i| {
            let sum: f64 = scores.iter().map(|l| keep_ratio(&l[i].0, l[i].1)).sum();
            sum / scores.len().max(1) as f64
        })
        .collect()
}
