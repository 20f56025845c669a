//! Combination methods: how independently computed per-document caches become one KV buffer
//! for decoding (`../shared/docs/METHODS.md`). One file per method, all behind [`Method`].
//!
//! Shared machinery: moving stored caches to their global positions ([`load`]), prefilling
//! the question ([`prefill_question`]) and the layer-by-layer partial recompute
//! ([`recompute_layers`]) that CacheBlend, EPIC and SamKV drive with different row sets.

pub mod cacheblend;
pub mod clock;
pub mod config;
pub mod epic;
pub mod infllm;
pub mod load;
pub mod oracle;
pub mod recompute;
pub mod reuse;
pub mod samkv;
pub mod settings;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};

pub use cacheblend::{CacheBlend, Deviation};
pub use config::{MethodConfig, METHOD_NAMES};
pub use epic::Epic;
pub use infllm::MultiInfLlm;
pub use load::{concat_caches, load_rows};
pub use oracle::Oracle;
pub use recompute::Recompute;
pub use reuse::Reuse;
pub use samkv::SamKv;
pub use settings::{Knob, MethodSettings};

use crate::kv::{KvCache, LayerKv};
use crate::model::{attend, LayerStep, Logits, Model, Qkv};
use crate::store::StoredDoc;
use crate::{Error, Result};
use clock::PhaseClock;

/// One piece of the request's context: the preamble or a document.
#[derive(Clone)]
pub struct Segment {
    pub tokens: Vec<u32>,
    /// Global position of the first token in the assembled request.
    pub start: u32,
    /// The independently computed KV (positions as stored in its meta).
    pub kv: Arc<StoredDoc>,
    /// The preamble is computed exactly (nothing precedes it) and always kept whole.
    pub is_preamble: bool,
}

impl Segment {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn positions(&self) -> std::ops::Range<u32> {
        self.start..self.start + self.tokens.len() as u32
    }
}

/// Everything a method needs for one request.
pub struct Context<'a> {
    pub model: &'a Model,
    /// Preamble (if any) first, then the documents in request order, contiguous in position.
    pub segments: Vec<Segment>,
    /// Question tokens (including the chat template's assistant header); they follow the
    /// last segment.
    pub question: Vec<u32>,
}

impl Context<'_> {
    pub fn context_len(&self) -> usize {
        self.segments.iter().map(Segment::len).sum()
    }

    pub fn question_positions(&self) -> Vec<u32> {
        let start = self.context_len() as u32;
        (start..start + self.question.len() as u32).collect()
    }

    /// Every token of the request and its position, in order.
    pub fn all_tokens(&self) -> (Vec<u32>, Vec<u32>) {
        let mut toks = Vec::with_capacity(self.context_len() + self.question.len());
        let mut pos = Vec::with_capacity(toks.capacity());
        for s in &self.segments {
            toks.extend_from_slice(&s.tokens);
            pos.extend(s.positions());
        }
        toks.extend_from_slice(&self.question);
        pos.extend(self.question_positions());
        (toks, pos)
    }

    /// Token at a global position.
    pub fn token_at(&self, pos: u32) -> u32 {
        for s in &self.segments {
            if s.positions().contains(&pos) {
                return s.tokens[(pos - s.start) as usize];
            }
        }
        self.question[(pos as usize) - self.context_len()]
    }
}

/// What a method reports about one assembly.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub method: String,
    pub context_tokens: usize,
    pub question_tokens: usize,
    /// Rows recomputed at each layer (question tokens included).
    pub recomputed_per_layer: Vec<usize>,
    /// Mean over layers of the context rows recomputed (question excluded).
    pub recomputed_tokens: f64,
    /// Context rows kept for decoding at each layer (question excluded).
    pub kept_per_layer: Vec<usize>,
    /// Mean over layers of `kept_per_layer`.
    pub kv_tokens_kept: f64,
    /// Bytes of K and V held for decoding after assembly (question rows included).
    pub kv_bytes_kept: usize,
    /// `kv_tokens_kept / context_tokens`.
    pub kept_fraction: f64,
    pub load_ms: f64,
    pub reposition_ms: f64,
    pub select_ms: f64,
    pub recompute_ms: f64,
    /// Load + assemble + question prefill: time to first token.
    pub ttft_ms: f64,
}

impl Stats {
    /// Empty stats of the named method, filled as it assembles.
    pub fn for_method(method: String) -> Self {
        Self {
            method,
            ..Default::default()
        }
    }

    /// Fills the kept/recomputed summaries from the final cache and per-layer counts.
    pub fn finish(&mut self, ctx: &Context, cache: &KvCache, recomputed_per_layer: Vec<usize>) {
        let q = ctx.question.len();
        self.context_tokens = ctx.context_len();
        self.question_tokens = q;
        self.kept_per_layer = cache
            .layers
            .iter()
            .map(|l| l.len().saturating_sub(q))
            .collect();
        let n = cache.layers.len().max(1) as f64;
        self.kv_tokens_kept = self.kept_per_layer.iter().sum::<usize>() as f64 / n;
        self.kv_bytes_kept = cache.bytes();
        self.kept_fraction = self.kv_tokens_kept / self.context_tokens.max(1) as f64;
        self.recomputed_tokens = recomputed_per_layer
            .iter()
            .map(|&r| r.saturating_sub(q))
            .sum::<usize>() as f64
            / n;
        self.recomputed_per_layer = recomputed_per_layer;
    }
}

/// The result of assembling a request: a KV buffer ready for decoding and the distribution
/// of the first generated token.
pub struct Assembled {
    pub cache: KvCache,
    /// First-token logits, f32, shape (vocab,).
    pub logits: Tensor,
    pub stats: Stats,
}

/// A way of combining per-document caches. `assemble` prefills the question and returns the
/// KV to decode from.
pub trait Method: Send + Sync {
    /// Name with its settings, e.g. `cacheblend(r=0.15)`.
    fn name(&self) -> String;
    fn assemble(&self, ctx: &Context) -> Result<Assembled>;
    /// Per-document data beside the K/V this method reads, which the engine computes when it
    /// prefills a document (an entry without it makes the method take a slower path).
    fn side_data(&self) -> Vec<SideData> {
        Vec::new()
    }
}

/// Per-document side data, computed at ingestion and stored in the entry's `side` map under
/// [`SideData::key`]: the entry itself says which it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SideData {
    /// SamKV's document-local query summary (step 2): per layer, the mean query state of the
    /// document's last `window` tokens, an f32 tensor (layers, heads, head_dim).
    QuerySummary { window: usize },
}

impl SideData {
    pub fn key(&self) -> String {
        match self {
            SideData::QuerySummary { window } => format!("samkv.qloc.{window}"),
        }
    }

    /// What `methods` need between them, each once.
    pub fn of(methods: &[&dyn Method]) -> Vec<SideData> {
        let mut all: Vec<SideData> = methods.iter().flat_map(|m| m.side_data()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// What every method needs with its default settings (both SamKV presets): what a store
    /// shared by requests of any method should hold.
    pub fn for_default_methods() -> Vec<SideData> {
        let mut all = Vec::new();
        for name in METHOD_NAMES {
            for preset in ["small", "large"] {
                let flags = MethodConfig {
                    method: name.to_string(),
                    samkv_preset: preset.to_string(),
                    ..MethodConfig::default()
                };
                all.extend(flags.build());
            }
        }
        let refs: Vec<&dyn Method> = all.iter().map(|m| m.as_ref()).collect();
        SideData::of(&refs)
    }
}

/// How recomputed K/V replace the cached rows.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Update {
    Overwrite,
    /// `(1 - theta) * cached + theta * new`.
    Fusion {
        theta: f32,
    },
    /// Per row and KV head, weight `theta + (1 - theta)(1 - cos(K_cached, K_new))/2` on the
    /// new K/V ([`samkv::cosine_fusion`]).
    CosineFusion {
        theta: f32,
    },
}

/// Ordinary prefill of the question over whatever `cache` holds; returns first-token logits.
pub fn prefill_question(model: &Model, ctx: &Context, cache: &mut KvCache) -> Result<Tensor> {
    let pos = ctx.question_positions();
    let out = model.forward(&ctx.question, &pos, cache, Logits::Last, &[])?;
    last_logits(out.logits)
}

pub(crate) fn last_logits(t: Option<Tensor>) -> Result<Tensor> {
    let t = t.ok_or_else(|| Error::Internal("no logits were computed".into()))?;
    Ok(t.flatten_all()?.to_dtype(DType::F32)?)
}

/// Decides, layer by layer, which rows keep being recomputed.
pub trait LayerPlan {
    /// Called with layer `l`'s fresh Q/K/V for `rows` (global positions, sorted) before they
    /// are written to `cached`. Returns the rows to carry into layer l + 1: a subset of `rows`
    /// that keeps every question row.
    fn next_rows(
        &mut self,
        l: usize,
        rows: &[u32],
        qkv: &Qkv,
        cached: &LayerKv,
    ) -> Result<Vec<u32>>;
}

/// A plan fixed in advance: `rows[l]` is recomputed at layer l (each a subset of the one
/// before, all holding the question).
pub struct FixedPlan(pub Vec<Vec<u32>>);

impl LayerPlan for FixedPlan {
    fn next_rows(&mut self, l: usize, rows: &[u32], _: &Qkv, _: &LayerKv) -> Result<Vec<u32>> {
        Ok(self.0.get(l + 1).cloned().unwrap_or_else(|| rows.to_vec()))
    }
}

/// Layer-by-layer partial recompute. Starting from embeddings of `rows` (global positions,
/// sorted; the question's rows last), each layer computes Q/K/V for the current rows, writes
/// their K/V into `cache` (update rule for rows it holds, appended for new ones such as the
/// question), and lets them attend over every row `cache` holds at that layer. `plan` narrows
/// the rows between layers. Returns the last row's logits and the rows recomputed per layer.
pub fn recompute_layers(
    model: &Model,
    ctx: &Context,
    cache: &mut KvCache,
    rows: Vec<u32>,
    update: Update,
    plan: &mut dyn LayerPlan,
) -> Result<(Tensor, Vec<usize>)> {
    let tokens: Vec<u32> = rows.iter().map(|&p| ctx.token_at(p)).collect();
    let x = model.embed(&tokens)?;
    let rope = model.rope_tables(&rows)?;
    let mut step = Partial {
        cache,
        rows,
        next: Vec::new(),
        update,
        plan,
        counts: Vec::with_capacity(model.n_layers()),
        clock: PhaseClock::new(model),
    };
    step.clock.lap("embed");
    let x = model.run_layers(x, rope, &mut step)?;
    // The kernel of the pass that computed these rows (Model::logits_as).
    let n = x.dim(0)?;
    let logits = model.logits_as(&x.narrow(0, n - 1, 1)?, n)?;
    step.clock.lap("logits");
    step.clock.report("recompute_layers");
    Ok((last_logits(Some(logits))?, step.counts))
}

/// The layer step of [`recompute_layers`].
struct Partial<'a> {
    cache: &'a mut KvCache,
    /// This layer's rows, and the plan's rows for the next.
    rows: Vec<u32>,
    next: Vec<u32>,
    update: Update,
    plan: &'a mut dyn LayerPlan,
    counts: Vec<usize>,
    clock: PhaseClock,
}

impl LayerStep for Partial<'_> {
    fn attend(&mut self, l: usize, qkv: &Qkv) -> Result<Tensor> {
        self.counts.push(self.rows.len());
        self.clock.lap("qkv");
        // The plan sees the cached rows as they were before this layer's update.
        self.next = self
            .plan
            .next_rows(l, &self.rows, qkv, &self.cache.layers[l])?;
        self.clock.lap("plan");
        let layer = &mut self.cache.layers[l];
        upsert(layer, &self.rows, &qkv.k, &qkv.v, self.update)?;
        self.clock.lap("upsert");
        let (keys, values) = (layer.keys()?, layer.values()?);
        attend(&qkv.q, &keys, &values, &self.rows, layer.positions())
    }

    fn carry(&mut self, _: usize, _: Qkv) -> Result<Option<Vec<u32>>> {
        let keep = match self.next.len() != self.rows.len() {
            true => Some(subset_indices(&self.rows, &self.next)?),
            false => None,
        };
        if keep.is_some() {
            self.rows = std::mem::take(&mut self.next);
        }
        self.clock.lap("attention+mlp");
        Ok(keep)
    }
}

/// Indices (into `rows`) of the positions in `subset`; both sorted.
fn subset_indices(rows: &[u32], subset: &[u32]) -> Result<Vec<u32>> {
    subset
        .iter()
        .map(|p| {
            rows.binary_search(p)
                .map(|i| i as u32)
                .map_err(|_| Error::Internal(format!("plan keeps row {p} that was not recomputed")))
        })
        .collect()
}

/// Writes fresh K/V for `pos` into a layer: rows it holds are updated, others appended.
pub fn upsert(
    layer: &mut LayerKv,
    pos: &[u32],
    k: &Tensor,
    v: &Tensor,
    update: Update,
) -> Result<()> {
    let held = layer.positions();
    let mut old_rows = Vec::new(); // (row in layer, index in pos)
    let mut new_idx = Vec::new();
    for (i, p) in pos.iter().enumerate() {
        match held.binary_search(p) {
            Ok(r) => old_rows.push((r, i as u32)),
            Err(_) => new_idx.push(i as u32),
        }
    }
    // Usually the held rows come first and the new ones (the question) last: then both are
    // narrowed views, not gathers (each gather is an index upload and two kernels per layer).
    let take = |at: &[u32]| -> Result<(Tensor, Tensor)> {
        let n = at.len();
        if at
            .first()
            .is_some_and(|&f| at.iter().enumerate().all(|(i, &x)| x == f + i as u32))
        {
            let f = at[0] as usize;
            return Ok((k.narrow(1, f, n)?, v.narrow(1, f, n)?));
        }
        let idx = Tensor::new(at, k.device())?;
        Ok((k.index_select(&idx, 1)?, v.index_select(&idx, 1)?))
    };
    if !old_rows.is_empty() {
        let rows: Vec<usize> = old_rows.iter().map(|x| x.0).collect();
        let (nk, nv) = take(&old_rows.iter().map(|x| x.1).collect::<Vec<_>>())?;
        let (nk, nv) = match update {
            Update::Overwrite => (nk, nv),
            Update::Fusion { theta } => {
                let (ck, cv) = layer.gather(&rows)?;
                let t = theta as f64;
                (
                    ((ck * (1.0 - t))? + (nk * t)?)?,
                    ((cv * (1.0 - t))? + (nv * t)?)?,
                )
            }
            Update::CosineFusion { theta } => {
                let (ck, cv) = layer.gather(&rows)?;
                samkv::cosine_fusion(&ck, &cv, &nk, &nv, theta)?
            }
        };
        layer.overwrite(&rows, &nk, &nv)?;
    }
    if !new_idx.is_empty() {
        let newp: Vec<u32> = new_idx.iter().map(|&i| pos[i as usize]).collect();
        let (nk, nv) = take(&new_idx)?;
        layer.append(&nk, &nv, &newp)?;
    }
    Ok(())
}

/// Milliseconds since `t`.
pub(crate) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
