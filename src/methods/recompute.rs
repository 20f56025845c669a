//! Recompute: one ordinary causal prefill of preamble, documents and question. The reference
//! every other method is measured against; it reads no stored KV.

use std::time::Instant;

use super::{ms, Assembled, Context, Method, Stats};
use crate::model::Logits;
use crate::Result;

#[derive(Clone, Debug, Default)]
pub struct Recompute;

impl Method for Recompute {
    fn name(&self) -> String {
        "recompute".into()
    }

    fn assemble(&self, ctx: &Context) -> Result<Assembled> {
        let t = Instant::now();
        let model = ctx.model;
        let (tokens, pos) = ctx.all_tokens();
        let mut cache = model.new_cache()?;
        let out = model.forward(&tokens, &pos, &mut cache, Logits::Last, &[])?;
        let logits = super::last_logits(out.logits)?;
        let mut stats = Stats::for_method(self.name());
        stats.recompute_ms = ms(t);
        stats.finish(ctx, &cache, vec![tokens.len(); model.n_layers()]);
        Ok(Assembled {
            cache,
            logits,
            stats,
        })
    }
}
