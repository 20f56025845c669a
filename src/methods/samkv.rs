//! SamKV (`../shared/docs/METHODS.md` section 3): sparse attention across independently
//! computed document caches. Every document keeps its sink and local tokens (the anchors);
//! blocks of its middle are scored against a question summary personalized with what the
//! other documents are about, a per-document share of them is kept (or, in the global
//! reading, the best blocks of all documents within one token budget), and the kept rows plus
//! the question are recomputed together so documents attend to each other. Decoding then runs
//! over the kept rows only.
//!
//! The functions below follow the steps of the spec in order: [`anchors`],
//! [`local_query_summaries`], [`question_queries`] and [`generic_query`],
//! [`personalized_queries`], [`score_blocks`] (or, as an option that is not the paper's,
//! [`score_blocks_by_attention`]) and [`keep_ratios_per_doc`] (Eq. 2 in [`keep_ratio`]; step
//! 5 lives in samkv/score.rs), [`block_selection`] (top-k in
//! [`select_blocks`] / [`select_blocks_global`]) and [`recompute_sets`] (the layer union
//! rule), then [`local_recompute`]; [`SamKv::plan`] strings steps 1-6 together.
//!
//! Positions: rows are named by their global position. Rows loaded from the store hold keys
//! re-rotated to those positions, so block keys are scored in the global frame; the
//! document-local query summaries were pooled at ingestion at the document's stored
//! positions and are used as stored.

use std::ops::Range;
use std::time::Instant;

use candle_core::{DType, Tensor, D};

use super::clock::PhaseClock;
use super::load::room_after;
use super::{
    load_rows, ms, prefill_question, recompute_layers, Assembled, Context, FixedPlan, Method,
    SideData, Stats, Update,
};
use crate::kv::{KvCache, LayerKv};
use crate::model::{mean_rows, Logits};
use crate::store::prefix_hash;
use crate::{Error, Result};

/// How the middle blocks to keep are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// Each document keeps `floor(num_blocks * P_i)` blocks (paper Eq. 2).
    PerDoc,
    /// The "globally most critical blocks": one ranking over every document's blocks, within
    /// a budget for the whole request: the retained context (anchors plus every selected
    /// block) is at most `keep` of the documents' tokens. With `relative`, blocks are ranked
    /// by [`relative_scores`] (each document's scores on Eq. 2's scale) instead of raw dot
    /// products, which differ in scale between documents (each has its own `q_hat_i`).
    Global { keep: f64, relative: bool },
    /// samkv's option, not the paper's: a per-request budget. Blocks are ranked by their share
    /// of the question's attention to the documents' middles (needs [`Score::Attention`]) and
    /// taken, best first, until they hold `cover` of it, or until the retained context
    /// would pass `keep` of the documents' tokens (a cap, as in `Global`). A question whose
    /// attention is concentrated keeps little, a diffuse one keeps up to the cap.
    Coverage { cover: f64, keep: f64 },
}

/// What step 7's recompute attends to.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attend {
    /// The paper: the retained rows only (original positions, with gaps).
    Kept,
    /// samkv's option, not the paper's: every context row. The retained rows and the question
    /// are recomputed over the whole reused cache (the rows not retained keep their stored
    /// K/V, as in CacheBlend), then only the retained rows are kept for decoding. The first
    /// token sees the whole context and the recomputed rows see what the dropped ones said;
    /// decoding still runs over the retained rows. It loads every row at every layer.
    All,
}

/// How step 5 scores a block.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// The paper: `s_b = <K_b, q_hat_i>`, the block's mean key against the document's
    /// personalized query, summed over KV heads.
    Dot,
    /// samkv's alternative, not the paper's: the block's mean share of the question's
    /// attention. The question tokens of step 3's prefill (over the anchors) attend, each head
    /// with its own softmax, over every document's cached keys at once; `s_b` is the mean
    /// attention a row of the block receives, `a` that of the document's anchor rows. Raw dot
    /// products are dominated by a few heads and by what all keys share (Qwen2's key bias);
    /// the softmax is not. See docs/RESULTS.md for what it changes.
    Attention,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SamKvParams {
    pub num_initial: usize,
    pub num_local: usize,
    pub block_size: usize,
    /// The last `stable_layers` layers score the blocks.
    pub stable_layers: usize,
    pub update: Update,
    pub selection: Selection,
    /// false: sparsify only, prefill the question over the kept rows.
    pub recompute: bool,
    pub score: Score,
    pub attend: Attend,
}

#[derive(Clone, Debug)]
pub struct SamKv {
    pub params: SamKvParams,
}

/// One document's rows in the request (positions).
#[derive(Clone, Debug, PartialEq)]
pub struct DocSpan {
    /// Index into `Context::segments`.
    pub segment: usize,
    pub rows: Range<u32>,
    /// The candidates for sparsification; empty (at `rows.end`) when the document is kept whole.
    pub middle: Range<u32>,
    /// The middle cut into `block_size` blocks, the last one possibly shorter.
    pub blocks: Vec<Range<u32>>,
}

impl DocSpan {
    /// The initial and local tokens (the whole document when it has no middle).
    pub fn anchor_positions(&self) -> impl Iterator<Item = u32> + '_ {
        (self.rows.start..self.middle.start).chain(self.middle.end..self.rows.end)
    }
}

/// What SamKV decided for one request.
#[derive(Clone, Debug)]
pub struct Plan {
    pub docs: Vec<DocSpan>,
    /// P_i per document (0 for documents kept whole); computed but unused by global selection.
    pub keep_ratios: Vec<f64>,
    /// Per stable layer (in layer order), the middle positions selected there.
    pub selected: Vec<Vec<u32>>,
    /// Context positions kept for decoding: preamble, anchors and every selected block.
    pub retained: Vec<u32>,
    /// Per layer, the positions recomputed there (question included).
    pub recompute: Vec<Vec<u32>>,
    /// Documents whose query summary had to be recomputed (not stored for `num_local`).
    pub slow_path_docs: usize,
}

impl SamKv {
    pub fn new(params: SamKvParams) -> Self {
        Self { params }
    }

    /// The stable layers (the last `stable_layers`), checked against the model's depth.
    pub fn stable(&self, n_layers: usize) -> Result<Vec<usize>> {
        let s = self.params.stable_layers;
        if s == 0 || s > n_layers {
            return Err(Error::InvalidInput(format!(
                "stable_layers is {s} but the model has {n_layers} layers; choose 1..={n_layers}"
            )));
        }
        Ok((n_layers - s..n_layers).collect())
    }

    /// Steps 1-6: which rows are kept and which are recomputed at each layer. Loads from the
    /// store only what it reads: the anchors at every layer for the question's prefill, and
    /// every row at the stable layers for scoring.
    pub fn plan(&self, ctx: &Context) -> Result<Plan> {
        let p = &self.params;
        let model = ctx.model;
        let n_layers = model.n_layers();
        let stable = self.stable(n_layers)?;
        let (preamble, docs) = anchors(ctx, p.num_initial, p.num_local, p.block_size);
        let mut anchor_pos: Vec<u32> = preamble.clone();
        anchor_pos.extend(docs.iter().flat_map(|d| d.anchor_positions()));
        anchor_pos.sort_unstable();
        let mut keep_ratios = vec![0.0; docs.len()];
        let mut selected = vec![Vec::new(); stable.len()];
        let mut slow_path_docs = 0;
        let mut clock = PhaseClock::new(model);
        if docs.iter().any(|d| !d.blocks.is_empty()) {
            let question = question_queries(ctx, &anchor_pos, &stable)?;
            clock.lap("question over anchors");
            let keys = stable_rows(ctx, &stable)?;
            clock.lap("stable rows");
            let scores = match p.score {
                Score::Dot => {
                    let (q_loc, slow) = local_query_summaries(ctx, &docs, &stable, p.num_local)?;
                    slow_path_docs = slow;
                    clock.lap("query summaries");
                    let q_gen = generic_query(&question)?;
                    let q_hat = personalized_queries(&q_loc, &q_gen, model.cfg.n_kv_heads)?;
                    clock.lap("personalized queries");
                    score_blocks(&keys, &docs, &q_hat, &stable)?
                }
                Score::Attention => {
                    let qpos = ctx.question_positions();
                    score_blocks_by_attention(&keys, &docs, &question, &qpos, &stable)?
                }
            };
            clock.lap("scores");
            keep_ratios = keep_ratios_per_doc(&scores, docs.len());
            selected = block_selection(&docs, &scores, &keep_ratios, p.selection);
            clock.lap("selection");
        }
        clock.report("samkv plan");
        let mut plan = Plan::from_selection(ctx, &stable, preamble, docs, selected);
        plan.keep_ratios = keep_ratios;
        plan.slow_path_docs = slow_path_docs;
        Ok(plan)
    }
}

impl Plan {
    /// The rest of step 6 once the blocks are chosen: the recompute set of every layer (the
    /// union rule) and the retained rows. `selected[s]` holds the rows chosen at `stable[s]`.
    pub fn from_selection(
        ctx: &Context,
        stable: &[usize],
        preamble: Vec<u32>,
        docs: Vec<DocSpan>,
        selected: Vec<Vec<u32>>,
    ) -> Plan {
        let mut base: Vec<u32> = docs.iter().flat_map(|d| d.anchor_positions()).collect();
        base.extend(ctx.question_positions());
        let recompute = recompute_sets(ctx.model.n_layers(), stable, &selected, &base);
        let mut retained = preamble;
        let q0 = ctx.context_len() as u32;
        retained.extend(recompute[0].iter().copied().filter(|&x| x < q0));
        retained.sort_unstable();
        Plan {
            keep_ratios: vec![0.0; docs.len()],
            docs,
            selected,
            retained,
            recompute,
            slow_path_docs: 0,
        }
    }
}

impl Method for SamKv {
    fn name(&self) -> String {
        let p = &self.params;
        let sel = match p.selection {
            Selection::PerDoc => "per-doc".to_string(),
            Selection::Global {
                keep,
                relative: false,
            } => format!("global,keep={keep}"),
            Selection::Global {
                keep,
                relative: true,
            } => format!("global-relative,keep={keep}"),
            Selection::Coverage { cover, keep } => format!("coverage,cover={cover},keep={keep}"),
        };
        let upd = match p.update {
            Update::Overwrite => "overwrite".to_string(),
            Update::Fusion { theta } => format!("fusion,theta={theta}"),
            Update::CosineFusion { theta } => format!("cosine-fusion,theta={theta}"),
        };
        let score = match p.score {
            Score::Dot => "",
            Score::Attention => ",score=attention",
        };
        let attend = match p.attend {
            Attend::Kept => "",
            Attend::All => ",attend=all",
        };
        format!(
            "samkv(initial={},local={},block={},stable={},{sel},{}{score}{attend})",
            p.num_initial,
            p.num_local,
            p.block_size,
            p.stable_layers,
            if p.recompute {
                upd
            } else {
                "no-recompute".into()
            }
        )
    }

    fn assemble(&self, ctx: &Context) -> Result<Assembled> {
        assemble_planned(ctx, &self.params, self.name(), || self.plan(ctx))
    }

    /// Step 2's query summaries, for the paper's dot-product scoring only.
    fn side_data(&self) -> Vec<SideData> {
        match self.params.score {
            Score::Dot => vec![SideData::QuerySummary {
                window: self.params.num_local,
            }],
            Score::Attention => Vec::new(),
        }
    }
}

/// A whole assembly around a planner: `plan` (timed as the selection phase, the loads it
/// needs included), the retained rows loaded from the store, steps 7-8 and the report. SamKV
/// and the oracle differ only in `plan`.
pub fn assemble_planned(
    ctx: &Context,
    params: &SamKvParams,
    name: String,
    plan: impl FnOnce() -> Result<Plan>,
) -> Result<Assembled> {
    let mut stats = Stats::for_method(name);
    let mut clock = PhaseClock::new(ctx.model);
    let t = Instant::now();
    let plan = plan()?;
    stats.select_ms = ms(t);
    clock.lap("plan");
    let loaded = match params.attend {
        Attend::Kept => plan.retained.clone(),
        Attend::All => ctx.segments.iter().flat_map(|s| s.positions()).collect(),
    };
    let want = vec![loaded.clone(); ctx.model.n_layers()];
    let cap = loaded.len() + room_after(ctx);
    let mut cache = load_rows(ctx.model, ctx, &want, cap, &mut stats)?;
    clock.lap("load retained");
    let t = Instant::now();
    let (logits, counts) = local_recompute(ctx, &mut cache, &plan, params)?;
    if loaded.len() != plan.retained.len() {
        cache = keep_only(&cache, &plan.retained, ctx.context_len(), room_after(ctx))?;
    }
    stats.recompute_ms = ms(t);
    clock.lap("local recompute");
    clock.report("samkv assembly");
    stats.finish(ctx, &cache, counts);
    Ok(Assembled {
        cache,
        logits,
        stats,
    })
}

/// The cache for decoding under [`Attend::All`]: at every layer the `retained` context rows
/// and every row from position `context_len` on (the question), with room for `spare` more.
pub fn keep_only(
    cache: &KvCache,
    retained: &[u32],
    context_len: usize,
    spare: usize,
) -> Result<KvCache> {
    let q0 = context_len as u32;
    let layers = cache
        .layers
        .iter()
        .map(|layer| {
            let held = layer.positions();
            let mut rows = rows_of(layer, retained)?;
            rows.extend(held.partition_point(|&p| p < q0)..held.len());
            let pos: Vec<u32> = rows.iter().map(|&r| held[r]).collect();
            let (k, v) = layer.gather(&rows)?;
            let (h, _, d) = k.dims3()?;
            let mut kept = LayerKv::with_capacity(h, rows.len() + spare, d, k.dtype(), k.device())?;
            kept.append(&k, &v, &pos)?;
            Ok(kept)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(KvCache { layers })
}

/// Step 1. The preamble's positions (kept whole) and each document's span: its first
/// `num_initial` and last `num_local` tokens are anchors, the rest is the middle, cut into
/// blocks. A document no longer than `num_initial + num_local` is kept whole.
pub fn anchors(
    ctx: &Context,
    num_initial: usize,
    num_local: usize,
    block_size: usize,
) -> (Vec<u32>, Vec<DocSpan>) {
    let mut preamble = Vec::new();
    let mut docs = Vec::new();
    for (i, s) in ctx.segments.iter().enumerate() {
        if s.is_preamble {
            preamble.extend(s.positions());
        } else {
            docs.push(doc_span(
                i,
                s.positions(),
                num_initial,
                num_local,
                block_size,
            ));
        }
    }
    (preamble, docs)
}

/// One document's anchors, middle and blocks.
pub fn doc_span(
    segment: usize,
    rows: Range<u32>,
    num_initial: usize,
    num_local: usize,
    block_size: usize,
) -> DocSpan {
    let len = (rows.end - rows.start) as usize;
    let middle = if len > num_initial + num_local {
        rows.start + num_initial as u32..rows.end - num_local as u32
    } else {
        rows.end..rows.end
    };
    let step = block_size.max(1) as u32;
    let blocks = (middle.start..middle.end)
        .step_by(step as usize)
        .map(|b| b..(b + step).min(middle.end))
        .collect();
    DocSpan {
        segment,
        rows,
        middle,
        blocks,
    }
}

/// Step 2. Each document's query summary `q_i^loc` at the stable layers, (stable, heads,
/// head_dim) f32, read from the side data stored at ingestion. When `num_local` is not one of
/// the stored windows the document's prefill is re-run (the slow path). Returns the summaries
/// and how many documents took the slow path.
pub fn local_query_summaries(
    ctx: &Context,
    docs: &[DocSpan],
    stable: &[usize],
    num_local: usize,
) -> Result<(Vec<Tensor>, usize)> {
    let mut out = Vec::with_capacity(docs.len());
    let mut slow = 0;
    for d in docs {
        let kv = &ctx.segments[d.segment].kv;
        let q = match kv
            .side
            .get(&SideData::QuerySummary { window: num_local }.key())
        {
            Some(t) => t
                .narrow(0, stable[0], stable.len())?
                .to_device(ctx.model.device())?
                .to_dtype(DType::F32)?,
            None => {
                slow += 1;
                recompute_local_summary(ctx, d.segment, stable, num_local)?
            }
        };
        out.push(q);
    }
    Ok((out, slow))
}

/// The slow path of step 2: prefill the document again after its prefix, at its stored
/// positions, and pool the query states of its last `num_local` tokens.
fn recompute_local_summary(
    ctx: &Context,
    segment: usize,
    stable: &[usize],
    num_local: usize,
) -> Result<Tensor> {
    let m = ctx.model;
    let seg = &ctx.segments[segment];
    let doc = &seg.kv;
    tracing::warn!(
        "SamKV slow path: document {} has no stored query summary over its last {num_local} \
         tokens; re-running its prefill (store this window at ingestion to avoid it)",
        doc.id
    );
    let mut cache = m.new_cache()?;
    if doc.meta.prefix_len > 0 {
        let pre = ctx
            .segments
            .iter()
            .find(|s| s.is_preamble && prefix_hash(&s.tokens) == doc.meta.prefix_hash)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "document {} was computed after a {}-token prefix that is not in this \
                     request, so its query summary cannot be recomputed; re-ingest it",
                    doc.id, doc.meta.prefix_len
                ))
            })?;
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            let (k, v) = pre.kv.layer_kv(l, None, m.device(), m.dtype())?;
            layer.append(&k, &v, &pre.kv.meta.positions)?;
        }
    }
    let out = m.forward(
        &seg.tokens,
        &doc.meta.positions,
        &mut cache,
        Logits::None,
        stable,
    )?;
    let t = seg.len();
    let take = num_local.min(t);
    let pooled = out
        .queries
        .iter()
        .map(|(_, q)| mean_rows(&q.narrow(1, t - take, take)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&pooled, 0)?)
}

/// Step 3, first half: the question prefilled at its real positions over a temporary cache
/// holding only the anchors (`anchor_pos`, preamble included); returns its query states at
/// each stable layer, (heads, question tokens, head_dim) each.
pub fn question_queries(
    ctx: &Context,
    anchor_pos: &[u32],
    stable: &[usize],
) -> Result<Vec<Tensor>> {
    let want = vec![anchor_pos.to_vec(); ctx.model.n_layers()];
    let cap = anchor_pos.len() + ctx.question.len();
    let mut tmp = load_rows(ctx.model, ctx, &want, cap, &mut Stats::default())?;
    let pos = ctx.question_positions();
    let out = ctx
        .model
        .forward(&ctx.question, &pos, &mut tmp, Logits::None, stable)?;
    Ok(out.queries.into_iter().map(|(_, q)| q).collect())
}

/// What step 5 scores against: every context row at the stable layers, keys moved to their
/// global positions (other layers stay empty: scoring does not read them).
pub fn stable_rows(ctx: &Context, stable: &[usize]) -> Result<KvCache> {
    let all: Vec<u32> = ctx.segments.iter().flat_map(|s| s.positions()).collect();
    let want: Vec<Vec<u32>> = (0..ctx.model.n_layers())
        .map(|l| match stable.contains(&l) {
            true => all.clone(),
            false => Vec::new(),
        })
        .collect();
    load_rows(ctx.model, ctx, &want, all.len(), &mut Stats::default())
}

/// Step 3, second half: `q_gen`, (stable, heads, head_dim) f32, the question's query states
/// mean-pooled at each stable layer.
pub fn generic_query(question: &[Tensor]) -> Result<Tensor> {
    let pooled = question.iter().map(mean_rows).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&pooled, 0)?)
}

/// Step 4. `q_hat_i = q_gen + sum_{j != i} w_j q_j^loc / (D - 1)` with
/// `w_j = |cos(q_j^loc, q_gen)|` per head (D = 1: `q_hat = q_gen`), then averaged over the
/// query heads of each KV group. Inputs (stable, heads, d); outputs (stable, kv_heads, d).
/// The D documents are the retrieved ones: the preamble is kept whole and is not among them.
pub fn personalized_queries(
    q_loc: &[Tensor],
    q_gen: &Tensor,
    kv_heads: usize,
) -> Result<Vec<Tensor>> {
    let n = q_loc.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    // Every document at once (D, stable, heads, d): a few launches, not a dozen per document.
    let q = Tensor::stack(q_loc, 0)?;
    let g = q_gen.unsqueeze(0)?;
    let weighted = q.broadcast_mul(&cosine(&q, &g)?.abs()?)?;
    let q_hat = if n > 1 {
        let others = weighted.sum_keepdim(0)?.broadcast_sub(&weighted)?;
        (others / (n - 1) as f64)?.broadcast_add(&g)?
    } else {
        g
    };
    let q_hat = group_mean(&q_hat, kv_heads)?;
    (0..n).map(|i| Ok(q_hat.get(i)?)).collect()
}

/// Mean over the query heads of each KV group: (..., heads, d) -> (..., kv_heads, d). The
/// heads of one group are consecutive (as in attention).
pub fn group_mean(q: &Tensor, kv_heads: usize) -> Result<Tensor> {
    let dims = q.dims().to_vec();
    let r = dims.len();
    let (h, d) = (dims[r - 2], dims[r - 1]);
    if kv_heads == 0 || h % kv_heads != 0 {
        return Err(Error::Internal(format!(
            "{h} query heads do not split into {kv_heads} KV groups"
        )));
    }
    let mut shape = dims[..r - 2].to_vec();
    shape.extend([kv_heads, h / kv_heads, d]);
    Ok(q.reshape(shape)?.mean(r - 1)?)
}

/// Cosine similarity along the last axis, keeping it (size 1).
fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = a.broadcast_mul(b)?.sum_keepdim(D::Minus1)?;
    let na = a.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(dot.broadcast_div(&na.broadcast_mul(&nb)?.affine(1.0, 1e-12)?)?)
}

// Step 5 (scoring the blocks, Eq. 2's keep ratio) is in samkv/score.rs.

/// Step 6: per stable layer, the middle positions selected there (sorted), per document by
/// its keep ratio or globally within the budget.
pub fn block_selection(
    docs: &[DocSpan],
    scores: &Scores,
    keep_ratios: &[f64],
    selection: Selection,
) -> Vec<Vec<u32>> {
    let chosen: Vec<Vec<Vec<usize>>> = match selection {
        Selection::PerDoc => scores
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .zip(keep_ratios)
                    .map(|((sc, _), &p)| select_blocks(sc, p))
                    .collect()
            })
            .collect(),
        Selection::Global { keep, relative } => {
            let budget = budget_of(docs, keep);
            let lens = block_lens(docs);
            let sc: Vec<Vec<Vec<f32>>> = scores
                .iter()
                .map(|layer| {
                    layer
                        .iter()
                        .map(|(s, a)| match relative {
                            true => relative_scores(s, *a),
                            false => s.clone(),
                        })
                        .collect()
                })
                .collect();
            select_blocks_global(&sc, &lens, budget)
        }
        Selection::Coverage { cover, keep } => {
            let lens = block_lens(docs);
            let shares = attention_shares(scores, &lens);
            let chosen = select_blocks_coverage(&shares, &lens, cover, budget_of(docs, keep));
            vec![chosen; scores.len()]
        }
    };
    chosen
        .into_iter()
        .map(|layer| {
            let mut rows: Vec<u32> = docs
                .iter()
                .zip(layer)
                .flat_map(|(d, bs)| bs.into_iter().flat_map(|b| d.blocks[b].clone()))
                .collect();
            rows.sort_unstable();
            rows
        })
        .collect()
}

/// The middle tokens a global budget of `keep` of the documents' tokens leaves once every
/// document's anchors are kept.
fn budget_of(docs: &[DocSpan], keep: f64) -> usize {
    let doc_tokens: usize = docs.iter().map(|d| d.rows.len()).sum();
    let anchor_tokens: usize = docs.iter().map(|d| d.anchor_positions().count()).sum();
    ((keep * doc_tokens as f64).floor() as usize).saturating_sub(anchor_tokens)
}

/// `lens[d][b]`: the token count of document d's block b.
fn block_lens(docs: &[DocSpan]) -> Vec<Vec<usize>> {
    docs.iter()
        .map(|d| d.blocks.iter().map(|b| b.len()).collect())
        .collect()
}

/// Each block's share of the attention the question gives to all middle blocks, averaged
/// over the stable layers: `shares[d][b]`, summing to 1 (0 everywhere when no block gets any).
/// `scores` are [`Score::Attention`]'s, the mean attention a row of the block receives, so a
/// block's mass is its score times its length.
pub fn attention_shares(scores: &Scores, lens: &[Vec<usize>]) -> Vec<Vec<f32>> {
    let mut shares: Vec<Vec<f32>> = lens.iter().map(|l| vec![0.0; l.len()]).collect();
    for layer in scores {
        let mass =
            |d: usize, b: usize| layer[d].0.get(b).copied().unwrap_or(0.0) * lens[d][b] as f32;
        let total: f32 = (0..lens.len())
            .flat_map(|d| (0..lens[d].len()).map(move |b| (d, b)))
            .map(|(d, b)| mass(d, b))
            .sum();
        if !(total.is_finite() && total > 0.0) {
            continue;
        }
        for (d, doc) in shares.iter_mut().enumerate() {
            for (b, x) in doc.iter_mut().enumerate() {
                *x += mass(d, b) / total / scores.len() as f32;
            }
        }
    }
    shares
}

/// [`Selection::Coverage`]: blocks of all documents, best share first (ties: the earlier
/// document and block), until the taken ones hold at least `cover` of the attention, or
/// until the next one would pass `budget` tokens. Returns per document the chosen blocks in
/// order.
pub fn select_blocks_coverage(
    shares: &[Vec<f32>],
    lens: &[Vec<usize>],
    cover: f64,
    budget: usize,
) -> Vec<Vec<usize>> {
    let ids: Vec<(usize, usize)> = lens
        .iter()
        .enumerate()
        .flat_map(|(d, l)| (0..l.len()).map(move |b| (d, b)))
        .collect();
    let flat: Vec<f32> = ids.iter().map(|&(d, b)| shares[d][b]).collect();
    let mut out = vec![Vec::new(); lens.len()];
    let (mut held, mut used) = (0f64, 0usize);
    for g in ranking(&flat) {
        let (d, b) = ids[g];
        if held >= cover || used + lens[d][b] > budget {
            break;
        }
        out[d].push(b);
        held += flat[g] as f64;
        used += lens[d][b];
    }
    for doc in &mut out {
        doc.sort_unstable();
    }
    out
}

/// One document's block scores on the scale of Eq. 2: `(s_b - a) / (max_b s_b - min_b s_b)`,
/// how far each block stands above the document's anchors relative to the spread of its
/// blocks; comparable across documents, unlike the raw dot products. No spread gives zeros.
pub fn relative_scores(scores: &[f32], a: f32) -> Vec<f32> {
    let (min, max) = score_range(scores);
    let spread = max - min;
    // Also catches NaN (and the empty case, where the spread is -inf).
    if spread.is_nan() || spread <= 0.0 {
        return vec![0.0; scores.len()];
    }
    scores.iter().map(|s| (s - a) / spread).collect()
}

/// Indices of `scores`, best first (ties: the earlier index first).
fn ranking(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
    order
}

/// Indices of the `k` highest scores (ties: the earlier block wins), in index order.
fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order = ranking(scores);
    order.truncate(k);
    order.sort_unstable();
    order
}

/// Step 6, per document: the top `floor(num_blocks * P)` blocks by score.
pub fn select_blocks(scores: &[f32], p: f64) -> Vec<usize> {
    let k = (scores.len() as f64 * p.clamp(0.0, 1.0)).floor() as usize;
    top_k(scores, k)
}

/// Step 6, global reading: "the globally most critical blocks" within one budget of
/// `budget` middle tokens for the whole request. `scores[s][d]` are stable layer s's scores
/// of document d's blocks, `lens[d][b]` the blocks' token counts. Each stable layer ranks all
/// documents' blocks together; the layers take their next best block in turn, and a block
/// already taken by another layer costs nothing more (the retained sequence is the union).
/// Selection stops at the first block that would overrun the budget. Returns, per stable
/// layer and document, the chosen block indices in order.
pub fn select_blocks_global(
    scores: &[Vec<Vec<f32>>],
    lens: &[Vec<usize>],
    budget: usize,
) -> Vec<Vec<Vec<usize>>> {
    let ids: Vec<(usize, usize)> = lens
        .iter()
        .enumerate()
        .flat_map(|(d, l)| (0..l.len()).map(move |b| (d, b)))
        .collect();
    let orders: Vec<Vec<usize>> = scores
        .iter()
        .map(|layer| ranking(&layer.iter().flatten().copied().collect::<Vec<f32>>()))
        .collect();
    let mut out = vec![vec![Vec::new(); lens.len()]; scores.len()];
    let mut taken = vec![false; ids.len()];
    let mut used = 0;
    'rank: for r in 0..ids.len() {
        for (s, order) in orders.iter().enumerate() {
            let g = order[r];
            let (d, b) = ids[g];
            if !taken[g] {
                if used + lens[d][b] > budget {
                    break 'rank;
                }
                taken[g] = true;
                used += lens[d][b];
            }
            out[s][d].push(b);
        }
    }
    for layer in &mut out {
        for doc in layer {
            doc.sort_unstable();
        }
    }
    out
}

/// Step 6, the layer union rule: a row selected at stable layer n is recomputed in every
/// layer <= n, so layer l recomputes `base` (document anchors and question) plus the
/// selections of all stable layers >= l; below the first stable layer that is all of them.
/// `selected[s]` belongs to layer `stable[s]`. Each set is sorted and contains the next.
pub fn recompute_sets(
    n_layers: usize,
    stable: &[usize],
    selected: &[Vec<u32>],
    base: &[u32],
) -> Vec<Vec<u32>> {
    let mut sets = vec![Vec::new(); n_layers];
    let mut acc: Vec<u32> = base.to_vec();
    let mut s = stable.len();
    for l in (0..n_layers).rev() {
        while s > 0 && stable[s - 1] >= l {
            s -= 1;
            acc.extend(&selected[s]);
        }
        acc.sort_unstable();
        acc.dedup();
        sets[l] = acc.clone();
    }
    sets
}

/// Step 7 and 8. Over `cache`, which holds the retained rows (and after this the question),
/// recomputes the planned rows layer by layer attending only to retained rows (or, without
/// recompute, prefills the question over them). Returns the first-token logits and the rows
/// recomputed per layer.
pub fn local_recompute(
    ctx: &Context,
    cache: &mut KvCache,
    plan: &Plan,
    p: &SamKvParams,
) -> Result<(Tensor, Vec<usize>)> {
    if !p.recompute {
        let logits = prefill_question(ctx.model, ctx, cache)?;
        return Ok((logits, vec![ctx.question.len(); ctx.model.n_layers()]));
    }
    let rows = plan.recompute[0].clone();
    let mut fixed = FixedPlan(plan.recompute.clone());
    recompute_layers(ctx.model, ctx, cache, rows, p.update, &mut fixed)
}

/// Cosine-weighted fusion of recomputed into cached K/V, per row and KV head: with
/// `c = cos(K_cached, K_new)`, the new rows get weight `w = theta + (1 - theta)(1 - c)/2`
/// and the cached ones `1 - w`. Rows whose key kept its direction fuse like the linear rule;
/// the further the recomputed key turned away from the cached one, the more it is trusted
/// (`c = -1` overwrites). Tensors (kv_heads, rows, d).
pub fn cosine_fusion(
    ck: &Tensor,
    cv: &Tensor,
    nk: &Tensor,
    nv: &Tensor,
    theta: f32,
) -> Result<(Tensor, Tensor)> {
    let dt = nk.dtype();
    let c = cosine(&ck.to_dtype(DType::F32)?, &nk.to_dtype(DType::F32)?)?;
    let t = theta as f64;
    let w = c
        .affine(-(1.0 - t) / 2.0, t + (1.0 - t) / 2.0)?
        .to_dtype(dt)?;
    let w_old = w.affine(-1.0, 1.0)?;
    let k = (ck.broadcast_mul(&w_old)? + nk.broadcast_mul(&w)?)?;
    let v = (cv.broadcast_mul(&w_old)? + nv.broadcast_mul(&w)?)?;
    Ok((k, v))
}

/// Row indices in `layer` of the given positions (all must be held).
pub(crate) fn rows_of(layer: &LayerKv, pos: &[u32]) -> Result<Vec<usize>> {
    let held = layer.positions();
    pos.iter()
        .map(|p| {
            held.binary_search(p).map_err(|_| {
                Error::Internal(format!("position {p} is not in the concatenated cache"))
            })
        })
        .collect()
}

mod score;
pub use score::*;

#[cfg(test)]
mod tests;
