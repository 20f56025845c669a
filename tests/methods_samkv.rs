//! SamKV and Multi-InfLLM on SmolLM2 with real MuSiQue passages: the invariants of
//! METHODS.md section 4 and what the defaults keep.
//!
//! The passages are the first words of three documents of `musique_s.jsonl` (cut so the whole
//! file runs in seconds on two cores). Weights are dense and K/V stored in f32, so the
//! only differences between equal computations are float summation order.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use common::*;
use samkv::engine::{load_model, Engine, Prompt};
use samkv::eval::{load_examples, longbench_prompt};
use samkv::methods::samkv::SamKv;
use samkv::methods::{
    concat_caches, load_rows, Assembled, Context, MethodConfig, Recompute, Reuse, Segment, Stats,
};
use samkv::methods::{Method, MultiInfLlm};
use samkv::model::{LoadOptions, WeightMode};
use samkv::store::{DiskStore, StoredDoc};

struct Fixture {
    engine: Engine,
    segments: Vec<Segment>,
    question: Vec<u32>,
    _dir: tempfile::TempDir,
}

const WORDS_PER_DOC: usize = 50;
const DOCS: usize = 3;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let opts = LoadOptions {
            weights: WeightMode::Dense,
            ..Default::default()
        };
        let (model, tok) = load_model(&model_path(SMOLLM2), &opts).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let mut engine = Engine::new(model, tok, Arc::new(store));
        engine.store_dtype = samkv::store::StoreDtype::F32;
        let mut ex = load_examples(&shared_data("musique_s.jsonl"))
            .unwrap()
            .swap_remove(0);
        ex.documents.truncate(DOCS);
        for d in &mut ex.documents {
            let words: Vec<&str> = d.text.split_whitespace().take(WORDS_PER_DOC).collect();
            d.text = words.join(" ");
        }
        let prompt: Prompt = longbench_prompt(&ex);
        let p = engine.prepare(&engine.tokenize(&prompt).unwrap()).unwrap();
        Fixture {
            engine,
            segments: p.segments,
            question: p.question,
            _dir: dir,
        }
    })
}

fn context(f: &Fixture) -> Context<'_> {
    Context {
        model: &f.engine.model,
        segments: f.segments.clone(),
        question: f.question.clone(),
    }
}

fn samkv_cfg(edit: impl FnOnce(&mut MethodConfig)) -> MethodConfig {
    let mut c = MethodConfig::with_method("samkv");
    edit(&mut c);
    c
}

fn run(ctx: &Context, m: &dyn Method) -> Assembled {
    m.assemble(ctx).unwrap()
}

fn logits(a: &Assembled) -> Vec<f32> {
    a.logits.to_vec1().unwrap()
}

/// Max abs difference of the first-token logits divided by the reference's logit range.
fn rel_diff(a: &Assembled, reference: &Assembled) -> f32 {
    let (x, r) = (logits(a), logits(reference));
    let range =
        r.iter().copied().fold(f32::MIN, f32::max) - r.iter().copied().fold(f32::MAX, f32::min);
    max_abs_diff(&x, &r) / range
}

fn preamble_len(ctx: &Context) -> usize {
    ctx.segments
        .iter()
        .filter(|s| s.is_preamble)
        .map(|s| s.len())
        .sum()
}

#[test]
fn passages_are_long_enough_to_sparsify() {
    let f = fixture();
    let ctx = context(f);
    assert_eq!(ctx.segments.iter().filter(|s| !s.is_preamble).count(), DOCS);
    for s in ctx.segments.iter().filter(|s| !s.is_preamble) {
        // Small preset: 24 anchor tokens, so every passage has at least 5 middle blocks.
        assert!(s.len() >= 24 + 5 * 8, "passage of {} tokens", s.len());
    }
}

#[test]
fn every_block_selected_with_overwrite_equals_recompute() {
    let f = fixture();
    let ctx = context(f);
    let cfg = samkv_cfg(|c| {
        c.selection = "global".into();
        c.keep = 1.0;
    });
    let a = run(&ctx, cfg.build().unwrap().as_ref());
    let r = run(&ctx, &Recompute);
    // Measured: ~1e-6 of the logit range (f32 summation order); the budget leaves 100x room.
    let d = rel_diff(&a, &r);
    eprintln!("samkv(all blocks, overwrite) vs recompute: {d:e} of the logit range");
    assert!(d < 1e-4, "samkv(all blocks) vs recompute: {d}");
    assert_eq!(argmax(&logits(&a)), argmax(&logits(&r)));
    assert_eq!(a.stats.kept_fraction, 1.0);
    // Every document row and the question are recomputed at every layer; the preamble is not.
    let doc_rows = ctx.context_len() - preamble_len(&ctx);
    for &n in &a.stats.recomputed_per_layer {
        assert_eq!(n, doc_rows + ctx.question.len());
    }
}

#[test]
fn keeping_everything_without_recompute_equals_reuse() {
    let f = fixture();
    let ctx = context(f);
    let cfg = samkv_cfg(|c| {
        c.selection = "global".into();
        c.keep = 1.0;
        c.no_recompute = true;
    });
    let a = run(&ctx, cfg.build().unwrap().as_ref());
    let r = run(&ctx, &Reuse);
    let d = rel_diff(&a, &r);
    eprintln!("samkv(all, no recompute) vs reuse: {d:e} of the logit range");
    assert!(d < 1e-5, "samkv(all, no recompute) vs reuse: {d}");
    assert_eq!(a.stats.kept_fraction, 1.0);
    assert_eq!(
        a.stats.recomputed_per_layer,
        vec![ctx.question.len(); ctx.model.n_layers()]
    );
}

#[test]
fn infllm_keeping_every_block_equals_reuse() {
    let f = fixture();
    let ctx = context(f);
    let m = MultiInfLlm {
        initial: 4,
        local: 8,
        block: 16,
        topk: ctx.context_len(),
    };
    let a = run(&ctx, &m);
    let r = run(&ctx, &Reuse);
    let d = rel_diff(&a, &r);
    eprintln!("infllm(all blocks) vs reuse: {d:e} of the logit range");
    assert!(d < 1e-5, "infllm(all blocks) vs reuse: {d}");
    assert_eq!(a.stats.kept_fraction, 1.0);
}

#[test]
fn infllm_keeps_initial_local_and_topk_blocks_per_layer() {
    let f = fixture();
    let ctx = context(f);
    let n = ctx.context_len();
    let m = MultiInfLlm {
        initial: 8,
        local: 32,
        block: 16,
        topk: 3,
    };
    let a = run(&ctx, &m);
    let q0 = n as u32;
    let blocks = m.blocks(n);
    assert!(blocks.len() > 3);
    let mut differ = false;
    for layer in &a.cache.layers {
        let pos = layer.positions();
        let ctx_pos: Vec<usize> = pos
            .iter()
            .filter(|&&p| p < q0)
            .map(|&p| p as usize)
            .collect();
        // Initial rows, local window and exactly 3 whole candidate blocks.
        assert!((0..8).all(|p| ctx_pos.contains(&p)));
        assert!((n - 32..n).all(|p| ctx_pos.contains(&p)));
        let chosen: Vec<_> = blocks
            .iter()
            .filter(|b| ctx_pos.contains(&b.start))
            .cloned()
            .collect();
        assert_eq!(chosen.len(), 3);
        assert_eq!(ctx_pos, m.kept_rows(n, &chosen));
        assert_eq!(
            &pos[pos.len() - ctx.question.len()..],
            &ctx.question_positions()[..]
        );
        differ |= layer.positions() != a.cache.layers[0].positions();
    }
    assert!(
        differ,
        "layers rank blocks on their own keys, so some keep other blocks"
    );
    assert!(a.stats.kept_fraction < 0.5);
}

/// SamKV's checked parameters from `cfg`'s knobs (SamKV's or the oracle's).
fn samkv_params(cfg: &MethodConfig) -> samkv::methods::samkv::SamKvParams {
    use samkv::methods::MethodSettings;
    match cfg.settings().unwrap() {
        MethodSettings::Samkv(s) | MethodSettings::Oracle(s) => s.params().unwrap(),
        other => panic!("not SamKV: {other:?}"),
    }
}

/// The plan SamKV makes for `cfg`.
fn plan(ctx: &Context, cfg: &MethodConfig) -> samkv::methods::samkv::Plan {
    let m = SamKv::new(samkv_params(cfg));
    m.plan(ctx).unwrap()
}

/// The plan SamKV makes for `cfg` and its assembly.
fn plan_and_assemble(
    ctx: &Context,
    cfg: &MethodConfig,
) -> (samkv::methods::samkv::Plan, Assembled) {
    let m = SamKv::new(samkv_params(cfg));
    let plan = m.plan(ctx).unwrap();
    (plan, run(ctx, &m))
}

#[test]
fn defaults_keep_far_less_and_the_cache_holds_exactly_the_retained_rows() {
    let f = fixture();
    let ctx = context(f);
    let cfg = MethodConfig::default();
    assert_eq!(cfg.method, "samkv");
    match cfg.settings().unwrap() {
        samkv::methods::MethodSettings::Samkv(s) => assert_eq!(s.anchors(), (8, 16, 8)),
        other => panic!("{other:?}"),
    }
    let (plan, a) = plan_and_assemble(&ctx, &cfg);
    let n = ctx.context_len();
    eprintln!(
        "defaults: kept {:.3} of {n} context tokens, P = {:?}",
        a.stats.kept_fraction, plan.keep_ratios
    );
    assert!(
        a.stats.kept_fraction < 0.75,
        "kept {} of the context",
        a.stats.kept_fraction
    );
    assert!(a.stats.kept_fraction > 0.0);
    assert_eq!(
        plan.slow_path_docs, 0,
        "summaries for num_local 16 are stored"
    );
    // The cache is exactly the retained rows plus the question, in every layer.
    let mut expect = plan.retained.clone();
    expect.extend(ctx.question_positions());
    for layer in &a.cache.layers {
        assert_eq!(layer.positions(), &expect[..]);
    }
    assert_eq!(
        a.stats.kept_per_layer,
        vec![plan.retained.len(); ctx.model.n_layers()]
    );
    // Retained = preamble + anchors + whole selected blocks.
    let pre = preamble_len(&ctx) as u32;
    assert!((0..pre).all(|p| plan.retained.binary_search(&p).is_ok()));
    for d in &plan.docs {
        assert!(d
            .anchor_positions()
            .all(|p| plan.retained.binary_search(&p).is_ok()));
        for b in &d.blocks {
            let kept = b
                .clone()
                .filter(|p| plan.retained.binary_search(p).is_ok())
                .count();
            assert!(kept == 0 || kept == b.len(), "block {b:?} partly kept");
        }
    }
    // Per-doc selection: each stable layer keeps floor(num_blocks * P_i) blocks of doc i.
    for sel in &plan.selected {
        for (d, &pi) in plan.docs.iter().zip(&plan.keep_ratios) {
            let blocks = d
                .blocks
                .iter()
                .filter(|b| sel.binary_search(&b.start).is_ok())
                .count();
            assert_eq!(blocks, (d.blocks.len() as f64 * pi).floor() as usize);
        }
    }
    // The recompute sets shrink with depth and always hold the question.
    for w in plan.recompute.windows(2) {
        assert!(w[1].iter().all(|p| w[0].binary_search(p).is_ok()));
    }
    assert_eq!(a.stats.recomputed_per_layer[0], plan.recompute[0].len());
    let answer = f
        .engine
        .tokenizer
        .decode(&[argmax(&logits(&a)) as u32])
        .unwrap();
    assert!(!answer.is_empty());
}

/// The fixture's short passages are a third anchors (small preset), so the budget here is
/// half the document tokens: enough to leave several blocks to choose.
#[test]
fn global_selection_retains_keep_times_the_document_tokens() {
    let f = fixture();
    let ctx = context(f);
    let cfg = samkv_cfg(|c| {
        c.selection = "global".into();
        c.keep = 0.5;
    });
    let (plan, a) = plan_and_assemble(&ctx, &cfg);
    let doc_tokens: usize = plan.docs.iter().map(|d| d.rows.len()).sum();
    let budget = (0.5f64 * doc_tokens as f64).floor() as usize;
    let pre = preamble_len(&ctx);
    // Retained document rows: anchors plus the union of every stable layer's blocks, filled
    // up to the budget (selection stops at the first block, at most 8 tokens, that overruns).
    let kept_docs = plan.retained.len() - pre;
    assert!(
        kept_docs <= budget && kept_docs + 8 > budget,
        "{kept_docs} of {doc_tokens} document tokens kept, budget {budget}"
    );
    for sel in &plan.selected {
        assert!(!sel.is_empty(), "every stable layer selects blocks");
    }
    let n = ctx.context_len() as f64;
    assert_eq!(a.stats.kept_fraction, plan.retained.len() as f64 / n);
    assert!(a.stats.kept_fraction <= (budget + pre) as f64 / n);
}

#[test]
fn missing_query_summaries_are_recomputed_on_the_slow_path() {
    let f = fixture();
    let ctx = context(f);
    let cfg = MethodConfig::default();
    let stored = plan(&ctx, &cfg);
    // Drop the second document's stored summaries.
    let mut bare = context(f);
    let s = &mut bare.segments[stored.docs[1].segment];
    s.kv = Arc::new(StoredDoc {
        side: BTreeMap::new(),
        ..(*s.kv).clone()
    });
    let slow = plan(&bare, &cfg);
    assert_eq!(slow.slow_path_docs, 1);
    for (x, y) in slow.keep_ratios.iter().zip(&stored.keep_ratios) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    assert_eq!(slow.retained, stored.retained);
}

#[test]
fn cosine_fusion_runs_and_moves_the_recomputed_rows() {
    let f = fixture();
    let ctx = context(f);
    let global = |c: &mut MethodConfig| {
        c.selection = "global".into();
        c.keep = 0.5;
    };
    let over = run(&ctx, samkv_cfg(global).build().unwrap().as_ref());
    let cfg = samkv_cfg(|c| {
        global(c);
        c.update = "fusion".into();
        c.fusion_rule = "cosine".into();
        c.theta = 0.5;
    });
    let cos = run(&ctx, cfg.build().unwrap().as_ref());
    assert!(cos.stats.method.contains("cosine-fusion"));
    // Same rows either way; only the update of the recomputed rows differs.
    assert_eq!(cos.stats.kept_per_layer, over.stats.kept_per_layer);
    let d = rel_diff(&cos, &over);
    assert!(d > 0.0 && d < 0.5, "cosine fusion vs overwrite: {d}");
}

#[test]
fn attention_scoring_keeps_the_invariant_and_the_budget() {
    let f = fixture();
    let ctx = context(f);
    let all = samkv_cfg(|c| {
        c.selection = "global".into();
        c.keep = 1.0;
        c.samkv_score = "attention".into();
    });
    let a = run(&ctx, all.build().unwrap().as_ref());
    let r = run(&ctx, &Recompute);
    let d = rel_diff(&a, &r);
    assert!(d < 1e-4, "samkv(attention, all blocks) vs recompute: {d}");
    let half = samkv_cfg(|c| {
        c.selection = "global".into();
        c.keep = 0.5;
        c.samkv_score = "attention".into();
    });
    let (plan, _) = plan_and_assemble(&ctx, &half);
    let doc_tokens: usize = plan.docs.iter().map(|d| d.rows.len()).sum();
    let budget = doc_tokens / 2;
    let kept_docs = plan.retained.len() - preamble_len(&ctx);
    assert!(
        kept_docs <= budget && kept_docs + 8 > budget,
        "{kept_docs} of {doc_tokens} document tokens kept, budget {budget}"
    );
    // The attention path does not read the stored query summaries.
    assert_eq!(plan.slow_path_docs, 0);
}

#[test]
fn oracle_keeps_the_blocks_the_question_attends_to_most() {
    use samkv::methods::oracle::{question_attention, Oracle};
    let f = fixture();
    let ctx = context(f);
    let cfg = |keep: f64| {
        let mut c = MethodConfig::with_method("oracle");
        c.keep = keep;
        c
    };
    // Everything kept and recomputed: Recompute again.
    let a = run(&ctx, cfg(1.0).build().unwrap().as_ref());
    let r = run(&ctx, &Recompute);
    let d = rel_diff(&a, &r);
    assert!(d < 1e-4, "oracle(keep 1) vs recompute: {d}");
    // At half the document tokens: within the budget, and every chosen block gets at least as
    // much of the question's attention as any block left out.
    let mut params = samkv_params(&cfg(0.5));
    params.selection = samkv::methods::samkv::Selection::Global {
        keep: 0.5,
        relative: false,
    };
    let plan = Oracle { params }.plan(&ctx).unwrap();
    let mass = question_attention(&ctx).unwrap();
    assert_eq!(mass.len(), ctx.context_len());
    let (mut chosen, mut left) = (f32::INFINITY, f32::NEG_INFINITY);
    for d in &plan.docs {
        for b in &d.blocks {
            let m: f32 = b.clone().map(|p| mass[p as usize]).sum();
            match plan.retained.binary_search(&b.start).is_ok() {
                true => chosen = chosen.min(m),
                false => left = left.max(m),
            }
        }
    }
    assert!(
        chosen.is_finite() && left.is_finite(),
        "some blocks kept, some left"
    );
    assert!(
        chosen >= left,
        "a kept block has {chosen}, a dropped one {left}"
    );
    let doc_tokens: usize = plan.docs.iter().map(|d| d.rows.len()).sum();
    assert!(plan.retained.len() - preamble_len(&ctx) <= doc_tokens / 2);
}

/// SamKV loads only the rows it reads; what it loads must be exactly those rows of the full
/// concatenation that Reuse starts from (same re-rotated keys, same values).
#[test]
fn loading_some_rows_equals_selecting_them_from_the_concatenation() {
    let f = fixture();
    let ctx = context(f);
    let full = concat_caches(ctx.model, &ctx, &mut Stats::default()).unwrap();
    let n = ctx.context_len() as u32;
    // Per layer a different subset: nothing, every row, every 3rd, one segment's tail...
    let want: Vec<Vec<u32>> = (0..ctx.model.n_layers())
        .map(|l| match l % 4 {
            0 => Vec::new(),
            1 => (0..n).collect(),
            2 => (0..n)
                .filter(|p| (p + l as u32).is_multiple_of(3))
                .collect(),
            _ => (n / 2..n).collect(),
        })
        .collect();
    let got = load_rows(ctx.model, &ctx, &want, 0, &mut Stats::default()).unwrap();
    for (l, rows) in want.iter().enumerate() {
        let layer = &got.layers[l];
        assert_eq!(layer.positions(), rows.as_slice(), "layer {l}");
        let idx: Vec<usize> = rows.iter().map(|&p| p as usize).collect();
        let expect = full.layers[l].select(&idx).unwrap();
        if rows.is_empty() {
            continue;
        }
        for (a, b) in [
            (layer.keys().unwrap(), expect.keys().unwrap()),
            (layer.values().unwrap(), expect.values().unwrap()),
        ] {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
            let d = d.max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-6, "layer {l}: loaded rows differ by {d}");
        }
    }
    // Bad requests are errors, not panics.
    let mut bad = want.clone();
    bad[1] = vec![5, 3];
    let e = load_rows(ctx.model, &ctx, &bad, 0, &mut Stats::default());
    assert!(e.err().unwrap().to_string().contains("sorted"));
    bad[1] = vec![n];
    let e = load_rows(ctx.model, &ctx, &bad, 0, &mut Stats::default());
    assert!(e.err().unwrap().to_string().contains("no document"));
    let e = load_rows(ctx.model, &ctx, &want[..2], 0, &mut Stats::default());
    assert!(e.is_err());
}

#[test]
fn attend_all_with_every_block_equals_recompute_and_without_recompute_reuse() {
    let f = fixture();
    let ctx = context(f);
    let r = run(&ctx, &Recompute);
    for score in ["dot", "attention"] {
        let cfg = samkv_cfg(|c| {
            c.selection = "global".into();
            c.keep = 1.0;
            c.samkv_score = score.into();
            c.samkv_attend = "all".into();
        });
        let a = run(&ctx, cfg.build().unwrap().as_ref());
        let d = rel_diff(&a, &r);
        assert!(
            d < 1e-4,
            "samkv(attend=all, {score}, all blocks) vs recompute: {d}"
        );
        assert!(a.stats.method.contains("attend=all"), "{}", a.stats.method);
    }
    // Coverage with everything to cover and no cap selects every block: Recompute again.
    let cfg = samkv_cfg(|c| {
        c.selection = "coverage".into();
        c.cover = 1.0;
        c.keep = 1.0;
        c.samkv_score = "attention".into();
        c.samkv_attend = "all".into();
    });
    let a = run(&ctx, cfg.build().unwrap().as_ref());
    let d = rel_diff(&a, &r);
    assert!(
        d < 1e-4,
        "samkv(coverage 1.0, attend=all) vs recompute: {d}"
    );
    let reuse = run(&ctx, &Reuse);
    let cfg = samkv_cfg(|c| {
        c.selection = "global".into();
        c.keep = 1.0;
        c.no_recompute = true;
        c.samkv_attend = "all".into();
    });
    let a = run(&ctx, cfg.build().unwrap().as_ref());
    let d = rel_diff(&a, &reuse);
    assert!(
        d < 1e-4,
        "samkv(attend=all, keep-all, no recompute) vs reuse: {d}"
    );
}

#[test]
fn attend_all_decodes_from_the_same_rows_as_the_paper_but_sees_all_of_them_first() {
    let f = fixture();
    let ctx = context(f);
    let cfg = |attend: &str| {
        samkv_cfg(|c| {
            c.selection = "global".into();
            c.keep = 0.5;
            c.samkv_score = "attention".into();
            c.samkv_attend = attend.into();
        })
    };
    let (plan, kept) = plan_and_assemble(&ctx, &cfg("kept"));
    let (plan_all, all) = plan_and_assemble(&ctx, &cfg("all"));
    // One plan: the choice of rows does not depend on what the recompute attends to.
    assert_eq!(plan.retained, plan_all.retained);
    // The decoding cache holds exactly the retained rows and the question, at every layer.
    let q = ctx.question_positions();
    for layer in &all.cache.layers {
        let want: Vec<u32> = plan.retained.iter().copied().chain(q.clone()).collect();
        assert_eq!(layer.positions(), want.as_slice());
    }
    assert_eq!(all.stats.kept_per_layer, kept.stats.kept_per_layer);
    assert_eq!(all.stats.kv_bytes_kept, kept.stats.kv_bytes_kept);
    assert!(all.stats.kept_fraction < 0.6, "{}", all.stats.kept_fraction);
    // The same rows are recomputed, but over every row instead of the retained ones: the
    // first token's distribution moves (towards Recompute's here).
    assert_eq!(
        all.stats.recomputed_per_layer,
        kept.stats.recomputed_per_layer
    );
    let r = run(&ctx, &Recompute);
    let (d_all, d_kept) = (rel_diff(&all, &r), rel_diff(&kept, &r));
    eprintln!("attend=all vs recompute {d_all:e}, attend=kept vs recompute {d_kept:e}");
    assert!(d_all != d_kept && d_all > 0.0, "{d_all} {d_kept}");
}

#[test]
fn coverage_keeps_less_for_a_smaller_target_and_never_passes_its_cap() {
    let f = fixture();
    let ctx = context(f);
    let cfg = |cover: f64, keep: f64| {
        samkv_cfg(|c| {
            c.selection = "coverage".into();
            c.cover = cover;
            c.keep = keep;
            c.samkv_score = "attention".into();
        })
    };
    let kept = |cover: f64, keep: f64| {
        let (plan, a) = plan_and_assemble(&ctx, &cfg(cover, keep));
        let docs: usize = plan.docs.iter().map(|d| d.rows.len()).sum();
        let held = plan.retained.len() - preamble_len(&ctx);
        assert!(
            held as f64 <= keep * docs as f64,
            "cover {cover}: {held} of {docs} kept, cap {keep}"
        );
        assert_eq!(a.stats.kept_per_layer[0], plan.retained.len());
        held
    };
    let (small, large, capped) = (kept(0.2, 1.0), kept(0.8, 1.0), kept(0.8, 0.5));
    eprintln!("coverage kept: cover 0.2 {small}, 0.8 {large}, 0.8 capped at 0.5 {capped}");
    assert!(small < large, "{small} vs {large}");
    assert!(capped <= large);
}
