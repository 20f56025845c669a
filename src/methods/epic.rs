//! EPIC / LegoLink (Hu et al., ICML 2025, arXiv 2410.15332): recompute only the first `k`
//! tokens of every document plus the question, in every layer, attending over the whole
//! merged cache. Those leading tokens carry each document's spurious attention sink; fixing
//! them is most of what cross-document repair buys. The preamble is exact and never
//! recomputed. All KV is kept for decoding.

use std::time::Instant;

use super::{
    concat_caches, ms, recompute_layers, Assembled, Context, FixedPlan, Method, Stats, Update,
};
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Epic {
    /// Leading tokens recomputed in every document (the paper uses 16 or 32).
    pub k: usize,
}

impl Epic {
    /// Rows recomputed at every layer: the first `k` positions of each document, then the
    /// question's, sorted.
    pub fn rows(&self, ctx: &Context) -> Vec<u32> {
        let mut rows: Vec<u32> = ctx
            .segments
            .iter()
            .filter(|s| !s.is_preamble)
            .flat_map(|s| s.start..s.start + s.len().min(self.k) as u32)
            .collect();
        rows.extend(ctx.question_positions());
        rows
    }
}

impl Method for Epic {
    fn name(&self) -> String {
        format!("epic(k={})", self.k)
    }

    fn assemble(&self, ctx: &Context) -> Result<Assembled> {
        if ctx.question.is_empty() {
            return Err(Error::InvalidInput(
                "EPIC needs at least one question token".into(),
            ));
        }
        let model = ctx.model;
        let mut stats = Stats::for_method(self.name());
        let mut cache = concat_caches(model, ctx, &mut stats)?;
        let t = Instant::now();
        let rows = self.rows(ctx);
        stats.select_ms = ms(t);
        let t = Instant::now();
        // Nothing to select per request: the same rows at every layer.
        let mut plan = FixedPlan(vec![rows.clone()]);
        let (logits, counts) =
            recompute_layers(model, ctx, &mut cache, rows, Update::Overwrite, &mut plan)?;
        stats.recompute_ms = ms(t);
        stats.finish(ctx, &cache, counts);
        Ok(Assembled {
            cache,
            logits,
            stats,
        })
    }
}
