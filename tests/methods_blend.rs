//! CacheBlend and EPIC on SmolLM2 with real MuSiQue passages (METHODS.md sections 2 and 4),
//! plus the HKVD selection on hand-made tensors.
//!
//! Passages are cut to their first `WORDS` words and three of them are used, so every
//! request is ~350 tokens and each test takes a second or two. The model runs dense f32 and
//! the store keeps f32, so "equals Recompute" differs only by float summation order.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use common::*;
use samkv::engine::{load_model, Engine, Prompt};
use samkv::eval::{load_examples, longbench_prompt};
use samkv::kv::LayerKv;
use samkv::methods::cacheblend::{deviations, keep_count, select_hkvd, BlendPlan};
use samkv::methods::{
    concat_caches, recompute_layers, Assembled, CacheBlend, Context, Deviation, Epic, Method,
    MethodConfig, Recompute, Reuse, Stats, Update,
};
use samkv::model::{LoadOptions, WeightMode};
use samkv::store::DiskStore;

/// Words kept of each passage.
const WORDS: usize = 40;
/// Max |first-token logit difference| accepted for "equals Recompute". Measured here (x86-64,
/// 2 cores): CacheBlend at ratio 1 is bit-identical (0.0: the same rows go through the same
/// kernels), EPIC covering every document 5.0e-5, Reuse of one document 4.8e-5 (logits of
/// magnitude ~20). The tolerance leaves room for other CPUs' summation order.
const TOL: f32 = 2e-3;

struct Setup {
    engine: Engine,
    _dir: tempfile::TempDir,
}

fn engine() -> &'static Engine {
    static S: OnceLock<Setup> = OnceLock::new();
    &S.get_or_init(|| {
        let (model, tok) = load_model(
            &model_path(SMOLLM2),
            &LoadOptions {
                weights: WeightMode::Dense,
                ..Default::default()
            },
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(dir.path()).unwrap());
        let mut engine = Engine::new(model, tok, store);
        engine.store_dtype = samkv::store::StoreDtype::F32;
        Setup { engine, _dir: dir }
    })
    .engine
}

/// musique_s from the shared data folder; `SAMKV_DATA` (a folder) overrides it, e.g. in a
/// worktree that does not sit beside `shared/`.
fn data_path() -> PathBuf {
    match std::env::var_os("SAMKV_DATA") {
        Some(d) => PathBuf::from(d).join("musique_s.jsonl"),
        None => shared_data("musique_s.jsonl"),
    }
}

/// Example `i` of musique_s with its first `docs` passages, each cut to `WORDS` words.
fn prompt(i: usize, docs: usize) -> Prompt {
    let mut ex = load_examples(&data_path()).unwrap().swap_remove(i);
    ex.documents.truncate(docs);
    for d in &mut ex.documents {
        d.text = d
            .text
            .split_whitespace()
            .take(WORDS)
            .collect::<Vec<_>>()
            .join(" ");
    }
    longbench_prompt(&ex)
}

fn context<'a>(e: &'a Engine, p: &Prompt) -> Context<'a> {
    let prepared = e.prepare(&e.tokenize(p).unwrap()).unwrap();
    Context {
        model: &e.model,
        segments: prepared.segments,
        question: prepared.question,
    }
}

fn logits(a: &Assembled) -> Vec<f32> {
    a.logits.to_vec1::<f32>().unwrap()
}

fn run(m: &dyn Method, ctx: &Context) -> Assembled {
    m.assemble(ctx).unwrap()
}

/// Asserts `m` reproduces Recompute's first-token logits `r`; returns its assembly.
fn assert_equals_recompute(m: &dyn Method, ctx: &Context, r: &[f32]) -> Assembled {
    let a = run(m, ctx);
    let d = max_abs_diff(r, &logits(&a));
    eprintln!("{}: max |logit diff| vs recompute = {d:.2e}", m.name());
    assert!(d < TOL, "{} differs from recompute by {d}", m.name());
    assert_eq!(argmax(r), argmax(&logits(&a)));
    a
}

fn blend(ratio: f64, dev: Deviation, gradual: bool) -> CacheBlend {
    CacheBlend::new(ratio, 1, dev, gradual).unwrap()
}

fn doc_count(ctx: &Context) -> usize {
    ctx.segments.iter().filter(|s| !s.is_preamble).count()
}

#[test]
fn cacheblend_ratio_one_equals_recompute() {
    let e = engine();
    let ctx = context(e, &prompt(0, 3));
    assert_eq!(doc_count(&ctx), 3);
    let r = logits(&run(&Recompute, &ctx));
    let all = ctx.context_len() + ctx.question.len();
    // Gradual filtering at ratio 1 also keeps everything.
    for (dev, gradual) in [
        (Deviation::K, false),
        (Deviation::V, false),
        (Deviation::K, true),
    ] {
        let a = assert_equals_recompute(&blend(1.0, dev, gradual), &ctx, &r);
        assert_eq!(a.stats.recomputed_per_layer, vec![all; e.model.n_layers()]);
        check_stats(&a.stats, &ctx);
    }
}

#[test]
fn epic_covering_every_document_equals_recompute() {
    let e = engine();
    let ctx = context(e, &prompt(0, 3));
    let longest = ctx
        .segments
        .iter()
        .filter(|s| !s.is_preamble)
        .map(|s| s.len())
        .max()
        .unwrap();
    let r = logits(&run(&Recompute, &ctx));
    let a = assert_equals_recompute(&Epic { k: longest }, &ctx, &r);
    let all_docs = ctx.context_len() - ctx.segments[0].len();
    let rows = all_docs + ctx.question.len();
    assert_eq!(a.stats.recomputed_per_layer, vec![rows; e.model.n_layers()]);
    // A k past every document selects the same rows.
    assert_eq!(
        Epic { k: longest + 100 }.rows(&ctx),
        Epic { k: longest }.rows(&ctx)
    );
}

#[test]
fn reuse_of_one_document_equals_recompute() {
    let e = engine();
    let ctx = context(e, &prompt(0, 1));
    assert_eq!(doc_count(&ctx), 1);
    assert!(ctx.segments[0].is_preamble);
    let r = logits(&run(&Recompute, &ctx));
    assert_equals_recompute(&Reuse, &ctx, &r);
}

#[test]
fn cacheblend_015_recomputes_15_percent_after_check_layer() {
    let e = engine();
    let ctx = context(e, &prompt(0, 3));
    let (n, q, layers) = (ctx.context_len(), ctx.question.len(), e.model.n_layers());
    // floor(0.15 * n), the rounding CacheBlend's own code uses (int(len * ratio)).
    let target = (0.15 * n as f64).floor() as usize;
    assert_eq!(keep_count(0.15, n), target);
    let mut expected = vec![n + q; 2];
    expected.extend(vec![target + q; layers - 2]);

    let reuse = logits(&run(&Reuse, &ctx));
    let recompute = logits(&run(&Recompute, &ctx));
    for dev in [Deviation::K, Deviation::V] {
        let a = run(&blend(0.15, dev, false), &ctx);
        assert_eq!(a.stats.recomputed_per_layer, expected, "deviation {dev:?}");
        check_stats(&a.stats, &ctx);
        let d_reuse = max_abs_diff(&reuse, &logits(&a));
        let d_rec = max_abs_diff(&recompute, &logits(&a));
        eprintln!("cacheblend 0.15 {dev:?}: |diff| vs reuse {d_reuse:.3}, vs recompute {d_rec:.3}");
        assert!(
            d_reuse > 1e-2,
            "CacheBlend 0.15 ({dev:?}) did not change Reuse's output"
        );
    }

    // Gradual: 1.5x the ratio for the layer after the check layer, then the ratio.
    let a = run(&blend(0.15, Deviation::K, true), &ctx);
    let mut expected = vec![n + q; 2];
    expected.push((0.225 * n as f64).floor() as usize + q);
    expected.extend(vec![target + q; layers - 3]);
    assert_eq!(a.stats.recomputed_per_layer, expected);

    // Ratio 0 keeps only the question after the check layer.
    let a = run(&blend(0.0, Deviation::K, false), &ctx);
    assert!(a.stats.recomputed_per_layer[2..].iter().all(|&c| c == q));
}

/// Summaries every method must fill: all context KV kept, timings set.
fn check_stats(s: &Stats, ctx: &Context) {
    assert_eq!(s.context_tokens, ctx.context_len());
    assert_eq!(s.question_tokens, ctx.question.len());
    assert!(s.kept_per_layer.iter().all(|&k| k == ctx.context_len()));
    assert!((s.kept_fraction - 1.0).abs() < 1e-12);
    assert!(s.recompute_ms > 0.0 && s.select_ms >= 0.0);
}

#[test]
fn cacheblend_selects_rows_whose_cache_is_stale() {
    // The preamble and the first document were computed with exactly the prefix they have
    // in the request, so their cached K is right and must never rank among the HKVD tokens;
    // later documents lack cross-attention and hold every selected row.
    let e = engine();
    let ctx = context(e, &prompt(0, 3));
    let m = blend(0.15, Deviation::K, false);
    let mut stats = Stats::default();
    let mut cache = concat_caches(&e.model, &ctx, &mut stats).unwrap();
    let (_, rows) = ctx.all_tokens();
    let mut plan = BlendPlan::new(&m, ctx.context_len());
    recompute_layers(
        &e.model,
        &ctx,
        &mut cache,
        rows,
        Update::Overwrite,
        &mut plan,
    )
    .unwrap();
    assert_eq!(plan.chosen.len(), 1);
    let (layer, chosen) = &plan.chosen[0];
    assert_eq!(*layer, 1);
    let exact_end = ctx.segments[1].positions().end;
    let q0 = ctx.context_len() as u32;
    let ctx_rows: Vec<u32> = chosen.iter().copied().filter(|&p| p < q0).collect();
    assert_eq!(ctx_rows.len(), keep_count(0.15, ctx.context_len()));
    assert!(
        ctx_rows.iter().all(|&p| p >= exact_end),
        "rows with exact cached KV were selected: {ctx_rows:?} (exact below {exact_end})"
    );
}

#[test]
fn epic_recomputes_first_16_of_each_document() {
    let e = engine();
    let ctx = context(e, &prompt(0, 3));
    assert!(ctx.segments.iter().all(|s| s.is_preamble || s.len() > 16));
    let m = Epic { k: 16 };
    let a = run(&m, &ctx);
    let q = ctx.question.len();
    assert_eq!(
        a.stats.recomputed_per_layer,
        vec![16 * 3 + q; e.model.n_layers()]
    );
    check_stats(&a.stats, &ctx);
    let rows = m.rows(&ctx);
    for s in ctx.segments.iter().filter(|s| !s.is_preamble) {
        let mine: Vec<u32> = rows
            .iter()
            .copied()
            .filter(|p| s.positions().contains(p))
            .collect();
        assert_eq!(mine, (s.start..s.start + 16).collect::<Vec<_>>());
    }
    let reuse = logits(&run(&Reuse, &ctx));
    assert!(
        max_abs_diff(&reuse, &logits(&a)) > 1e-2,
        "EPIC did not change Reuse's output"
    );
}

#[test]
fn config_builds_and_validates() {
    let mut c = MethodConfig::with_method("cacheblend");
    assert_eq!(
        c.build().unwrap().name(),
        "cacheblend(r=0.15,check=1,dev=k)"
    );
    c.gradual = true;
    c.deviation = "v".into();
    assert_eq!(
        c.build().unwrap().name(),
        "cacheblend(r=0.15,check=1,dev=v,gradual)"
    );
    for bad in [-0.1, 1.01, f64::NAN] {
        c.ratio = bad;
        let err = c.build().err().expect("bad ratio accepted").to_string();
        assert!(err.contains("ratio") && err.contains("[0, 1]"), "{err}");
    }
    c.ratio = 0.15;
    c.deviation = "q".into();
    assert!(c.build().err().unwrap().to_string().contains("`k` or `v`"));
    assert_eq!(
        MethodConfig::with_method("epic").build().unwrap().name(),
        "epic(k=16)"
    );

    // The check layer is checked against the model at assembly, before any work.
    let e = engine();
    let ctx = context(e, &prompt(0, 1));
    let n = e.model.n_layers();
    let err = CacheBlend::new(0.15, n, Deviation::K, false)
        .unwrap()
        .assemble(&ctx)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("check_layer") && err.contains(&format!("0..={}", n - 1)),
        "{err}"
    );
    // The last layer is a valid (if pointless) check layer: everything is recomputed.
    let a = CacheBlend::new(0.15, n - 1, Deviation::K, false)
        .unwrap()
        .assemble(&ctx)
        .unwrap();
    assert!(a
        .stats
        .recomputed_per_layer
        .iter()
        .all(|&c| c == ctx.context_len() + ctx.question.len()));
}

// HKVD selection on hand-made tensors: 1 KV head, head_dim 2.

fn t(rows: &[[f32; 2]]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (1, rows.len(), 2), &Device::Cpu).unwrap()
}

/// Cached rows at positions 0..5; fresh rows for 0..5 plus question rows 5, 6.
fn hand_made() -> (Vec<u32>, Tensor, LayerKv) {
    let cached = t(&[[0., 0.], [1., 1.], [2., 2.], [3., 3.], [4., 4.]]);
    let layer = LayerKv::from_parts(cached.clone(), cached, vec![0, 1, 2, 3, 4]).unwrap();
    // Squared deviations: 0:0, 1:4, 2:1, 3:4 (tie with 1), 4:9; rows 5, 6 are uncached.
    let fresh = t(&[
        [0., 0.],
        [3., 1.],
        [2., 3.],
        [3., 1.],
        [4., 7.],
        [9., 9.],
        [9., 9.],
    ]);
    (vec![0, 1, 2, 3, 4, 5, 6], fresh, layer)
}

fn pick(keep: usize) -> Vec<u32> {
    let (rows, fresh, layer) = hand_made();
    select_hkvd(&rows, &fresh, &layer, Deviation::K, keep).unwrap()
}

#[test]
fn hkvd_deviation_is_squared_l2() {
    let (rows, fresh, layer) = hand_made();
    let d = deviations(&rows, &fresh, &layer, Deviation::K).unwrap();
    assert_eq!(d, vec![(0, 0.0), (1, 4.0), (2, 1.0), (3, 4.0), (4, 9.0)]);
    // V is read when asked for: here V equals K, so the same numbers.
    assert_eq!(deviations(&rows, &fresh, &layer, Deviation::V).unwrap(), d);
    // Summed over KV heads: two heads with the same rows double it.
    let two = |x: &Tensor| Tensor::cat(&[x, x], 0).unwrap();
    let k2 = two(&layer.keys().unwrap());
    let layer2 = LayerKv::from_parts(k2.clone(), k2, layer.positions().to_vec()).unwrap();
    let d2 = deviations(&rows, &two(&fresh), &layer2, Deviation::K).unwrap();
    assert_eq!(d2[4], (4, 18.0));
}

#[test]
fn hkvd_selection_ranks_ties_and_extremes() {
    assert_eq!(pick(1), vec![4, 5, 6]);
    // 1 and 3 tie at 4.0: the earlier position wins.
    assert_eq!(pick(2), vec![1, 4, 5, 6]);
    assert_eq!(pick(3), vec![1, 3, 4, 5, 6]);
    // Ratio 0 keeps only the question; ratio 1 keeps everything.
    assert_eq!(pick(keep_count(0.0, 5)), vec![5, 6]);
    assert_eq!(pick(keep_count(1.0, 5)), vec![0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(pick(100), vec![0, 1, 2, 3, 4, 5, 6]);
}

#[test]
fn keep_count_rounds_down() {
    assert_eq!(keep_count(0.15, 100), 15);
    assert_eq!(keep_count(0.15, 99), 14);
    assert_eq!(keep_count(0.29, 100), 29);
    assert_eq!(keep_count(1.0, 7), 7);
    assert_eq!(keep_count(0.0, 7), 0);
}
