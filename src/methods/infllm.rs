//! Multi-InfLLM (InfLLM, Xiao et al. 2024, applied to the concatenated per-document caches):
//! no context row is recomputed. The question is prefilled layer by layer; at each layer the
//! context keeps its initial tokens, its local window and the `topk` blocks whose mean key
//! best matches the question's mean query, and the question attends to those rows only.
//! Layers keep different rows, and decoding uses exactly what each layer kept.

use std::ops::Range;
use std::time::Instant;

use candle_core::Tensor;

use super::samkv::{block_mean_keys, dot_scores, group_mean};
use super::{concat_caches, last_logits, ms, Assembled, Context, Method, Stats};
use crate::kv::KvCache;
use crate::model::{attend, mean_rows, LayerStep, Qkv};
use crate::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct MultiInfLlm {
    /// Leading rows of the concatenated context kept at every layer.
    pub initial: usize,
    /// Trailing context rows kept at every layer.
    pub local: usize,
    /// Block size for ranking the rows in between.
    pub block: usize,
    /// Blocks kept per layer.
    pub topk: usize,
}

impl MultiInfLlm {
    /// Row ranges of the candidate blocks of an `n`-row context: everything after the initial
    /// rows and before the local window, the last block possibly shorter.
    pub fn blocks(&self, n: usize) -> Vec<Range<usize>> {
        let start = self.initial.min(n);
        let end = n.saturating_sub(self.local).max(start);
        let step = self.block.max(1);
        (start..end)
            .step_by(step)
            .map(|b| b..(b + step).min(end))
            .collect()
    }

    /// Rows kept for a context of `n` rows given the chosen blocks (sorted, deduplicated).
    pub fn kept_rows(&self, n: usize, chosen: &[Range<usize>]) -> Vec<usize> {
        let start = self.initial.min(n);
        let end = n.saturating_sub(self.local).max(start);
        let mut rows: Vec<usize> = (0..start).collect();
        for b in chosen {
            rows.extend(b.clone());
        }
        rows.extend(end..n);
        rows.sort_unstable();
        rows.dedup();
        rows
    }
}

impl Method for MultiInfLlm {
    fn name(&self) -> String {
        format!(
            "infllm(initial={},local={},block={},topk={})",
            self.initial, self.local, self.block, self.topk
        )
    }

    fn assemble(&self, ctx: &Context) -> Result<Assembled> {
        let model = ctx.model;
        let mut stats = Stats::for_method(self.name());
        let mut cache = concat_caches(model, ctx, &mut stats)?;
        let t = Instant::now();
        let pos = ctx.question_positions();
        let mut step = Select {
            m: self,
            n_kv_heads: model.cfg.n_kv_heads,
            cache: &mut cache,
            pos: &pos,
            select_s: 0.0,
        };
        let (x, rope) = (model.embed(&ctx.question)?, model.rope_tables(&pos)?);
        let x = model.run_layers(x, rope, &mut step)?;
        let select_s = step.select_s;
        let n = x.dim(0)?;
        let logits = last_logits(Some(model.logits_as(&x.narrow(0, n - 1, 1)?, n)?))?;
        stats.select_ms = select_s * 1e3;
        stats.recompute_ms = ms(t) - stats.select_ms;
        stats.finish(ctx, &cache, vec![ctx.question.len(); model.n_layers()]);
        Ok(Assembled {
            cache,
            logits,
            stats,
        })
    }
}

/// The layer step of [`MultiInfLlm`]: narrows each layer's cache to the chosen blocks, then
/// appends the question's rows and attends over what is left.
struct Select<'a> {
    m: &'a MultiInfLlm,
    n_kv_heads: usize,
    cache: &'a mut KvCache,
    pos: &'a [u32],
    select_s: f64,
}

impl LayerStep for Select<'_> {
    fn attend(&mut self, l: usize, qkv: &Qkv) -> Result<Tensor> {
        let ts = Instant::now();
        let layer = &mut self.cache.layers[l];
        let n = layer.len();
        let blocks = self.m.blocks(n);
        let chosen: Vec<Range<usize>> = if blocks.len() <= self.m.topk {
            blocks
        } else {
            // The question's mean query per KV group against each block's mean key.
            let q = group_mean(&mean_rows(&qkv.q)?, self.n_kv_heads)?;
            let scores = dot_scores(&block_mean_keys(&layer.keys()?, &blocks)?, &q)?;
            let mut order: Vec<usize> = (0..blocks.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            order.truncate(self.m.topk);
            order.into_iter().map(|i| blocks[i].clone()).collect()
        };
        let keep = self.m.kept_rows(n, &chosen);
        if keep.len() != n {
            *layer = layer.select(&keep)?;
        }
        self.select_s += ts.elapsed().as_secs_f64();
        layer.append(&qkv.k, &qkv.v, self.pos)?;
        let (keys, values) = (layer.keys()?, layer.values()?);
        attend(&qkv.q, &keys, &values, self.pos, layer.positions())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(initial: usize, local: usize, block: usize) -> MultiInfLlm {
        MultiInfLlm {
            initial,
            local,
            block,
            topk: 1,
        }
    }

    #[test]
    fn blocks_cover_the_middle_with_a_short_last_block() {
        assert_eq!(m(2, 3, 4).blocks(15), vec![2..6, 6..10, 10..12]);
        assert_eq!(
            m(2, 3, 4).kept_rows(15, std::slice::from_ref(&(6..10))),
            vec![0, 1, 6, 7, 8, 9, 12, 13, 14]
        );
    }

    #[test]
    fn short_context_has_no_blocks_and_is_kept_whole() {
        assert!(m(4, 4, 2).blocks(6).is_empty());
        assert_eq!(m(4, 4, 2).kept_rows(6, &[]), (0..6).collect::<Vec<_>>());
    }
}
