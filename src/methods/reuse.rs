//! Reuse: concatenate the re-positioned independent caches and prefill only the question.
//! Fast, but no document ever attended to another, and each keeps its own attention sink.

use std::time::Instant;

use super::{concat_caches, ms, prefill_question, Assembled, Context, Method, Stats};
use crate::Result;

#[derive(Clone, Debug, Default)]
pub struct Reuse;

impl Method for Reuse {
    fn name(&self) -> String {
        "reuse".into()
    }

    fn assemble(&self, ctx: &Context) -> Result<Assembled> {
        let mut stats = Stats::for_method(self.name());
        let mut cache = concat_caches(ctx.model, ctx, &mut stats)?;
        let t = Instant::now();
        let logits = prefill_question(ctx.model, ctx, &mut cache)?;
        stats.recompute_ms = ms(t);
        let q = ctx.question.len();
        stats.finish(ctx, &cache, vec![q; ctx.model.n_layers()]);
        Ok(Assembled {
            cache,
            logits,
            stats,
        })
    }
}
