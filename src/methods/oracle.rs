//! Oracle selection: a diagnostic, not a method of the paper and not usable in serving.
//!
//! When SamKV at a small budget answers worse than Reuse, is that its choice of blocks or the
//! budget itself? The oracle keeps exactly what SamKV's global reading keeps (every
//! document's anchors plus middle blocks up to `keep` of the documents' tokens) and then runs
//! SamKV's steps 7-8 unchanged (local recompute of the retained rows, decoding from them
//! only). Only the choice of blocks differs: the blocks Recompute's question actually reads,
//! i.e. the softmax attention of every question token in a full prefill of the request,
//! summed over query heads and all layers. That needs the full prefill SamKV exists to avoid,
//! so the oracle's time to first token means nothing. Its agreement and KL show what a
//! selection informed by Recompute itself reaches at that budget: a strong reference, not a
//! proven bound (on SmolLM2, SamKV's own choice has the lower KL; docs/RESULTS.md).

use candle_core::{DType, Tensor};

use super::samkv::{
    anchors, assemble_planned, attention_probs, block_selection, Plan, SamKv, SamKvParams, Scores,
    Selection,
};
use super::{Assembled, Context, Method};
use crate::model::Logits;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Oracle {
    /// SamKV's knobs; `selection` is the global budget (`keep`).
    pub params: SamKvParams,
}

impl Oracle {
    /// Steps 1 and 6 of SamKV with the blocks scored by [`question_attention`].
    pub fn plan(&self, ctx: &Context) -> Result<Plan> {
        let p = &self.params;
        if !matches!(p.selection, Selection::Global { .. }) {
            return Err(Error::Internal(
                "the oracle fills a global budget: give it Selection::Global".into(),
            ));
        }
        let stable = SamKv::new(p.clone()).stable(ctx.model.n_layers())?;
        let (preamble, docs) = anchors(ctx, p.num_initial, p.num_local, p.block_size);
        let mass = question_attention(ctx)?;
        let per_doc: Vec<(Vec<f32>, f32)> = docs
            .iter()
            .map(|d| {
                let blocks = d.blocks.iter();
                let sums = blocks.map(|b| b.clone().map(|x| mass[x as usize]).sum());
                (sums.collect(), 0.0)
            })
            .collect();
        // Every stable layer ranks the same way, so their selections (and the union) agree.
        let scores: Scores = vec![per_doc; stable.len()];
        let selected = block_selection(&docs, &scores, &[], p.selection);
        Ok(Plan::from_selection(ctx, &stable, preamble, docs, selected))
    }
}

impl Method for Oracle {
    fn name(&self) -> String {
        let p = &self.params;
        let keep = match p.selection {
            Selection::Global { keep, .. } => format!("keep={keep}"),
            // Not built by MethodConfig.
            Selection::PerDoc | Selection::Coverage { .. } => "not-global".into(),
        };
        format!(
            "oracle(initial={},local={},block={},{keep})",
            p.num_initial, p.num_local, p.block_size
        )
    }

    fn assemble(&self, ctx: &Context) -> Result<Assembled> {
        assemble_planned(ctx, &self.params, self.name(), || self.plan(ctx))
    }
}

/// Attention each context position receives from the question in a full causal prefill of
/// the request, summed over question tokens, query heads and layers (one value per context
/// position, in position order).
pub fn question_attention(ctx: &Context) -> Result<Vec<f32>> {
    let model = ctx.model;
    let n = ctx.context_len();
    let (tokens, pos) = ctx.all_tokens();
    let mut cache = model.new_cache()?;
    model.forward(&tokens[..n], &pos[..n], &mut cache, Logits::None, &[])?;
    let qpos = ctx.question_positions();
    let layers: Vec<usize> = (0..model.n_layers()).collect();
    let out = model.forward(&ctx.question, &qpos, &mut cache, Logits::None, &layers)?;
    let mut mass = Tensor::zeros(n, DType::F32, model.device())?;
    for (l, q) in &out.queries {
        let layer = &cache.layers[*l];
        let probs = attention_probs(q, &layer.keys()?, &qpos, layer.positions())?;
        mass = (mass + probs.narrow(0, 0, n)?)?;
    }
    Ok(mass.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn attention_probs_sum_to_the_number_of_query_rows_and_respect_causality() {
        let dev = Device::Cpu;
        // 4 query heads over 2 KV heads, 2 queries at positions 2 and 3, keys at 0..4.
        let q = Tensor::arange(0f32, 32.0, &dev)
            .unwrap()
            .affine(0.1, -1.0)
            .unwrap()
            .reshape((4, 2, 4))
            .unwrap();
        let k = Tensor::arange(0f32, 32.0, &dev)
            .unwrap()
            .affine(-0.05, 0.7)
            .unwrap()
            .reshape((2, 4, 4))
            .unwrap();
        let m = attention_probs(&q, &k, &[2, 3], &[0, 1, 2, 3])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Each of the 4 heads x 2 queries spreads mass 1 over what it sees.
        assert!((m.iter().sum::<f32>() - 8.0).abs() < 1e-4, "{m:?}");
        // Key 3 is seen only by the query at position 3 (one per head): less than 4 in total,
        // and more than 0.
        assert!(m[3] > 0.0 && m[3] < 4.0, "{m:?}");
        // The query at position 2 cannot see key 3: with it alone, key 3 gets nothing.
        let m2 = attention_probs(&q.narrow(1, 0, 1).unwrap(), &k, &[2], &[0, 1, 2, 3])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(m2[3], 0.0);
        assert!((m2.iter().sum::<f32>() - 4.0).abs() < 1e-4, "{m2:?}");
    }
}
