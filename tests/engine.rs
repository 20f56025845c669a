//! The runtime's reuse-oriented API on real weights: re-positioning, layer-by-layer
//! execution, gapped decoding, answers, and recovery from a corrupt store entry.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use samkv::engine::{load_model, Engine, Prompt, Sampling, Source};
use samkv::methods::{recompute_layers, Context, FixedPlan, Method, Recompute, Reuse, Update};
use samkv::model::{attend, LoadOptions, Logits, Model, WeightMode};
use samkv::store::{DiskStore, KvStore};

fn dense() -> LoadOptions {
    LoadOptions {
        weights: WeightMode::Dense,
        ..Default::default()
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A key computed at position p and rotated by (p' - p) equals the key computed at p'.
fn check_shift(file: &str) {
    let m = Model::load(&model_path(file), &dense()).unwrap();
    let toks = token_ids(12, 40_000, 3);
    let x = m.embed(&toks).unwrap();
    let at = |start: u32| {
        let pos: Vec<u32> = (start..start + 12).collect();
        m.layer_qkv(0, &x, &m.rope_tables(&pos).unwrap()).unwrap().k
    };
    let (k0, k_far) = (at(0), at(3000));
    let shifted = m.rope.shift(&k0, &[3000; 12]).unwrap();
    let d = max_abs_diff(&flat(&shifted), &flat(&k_far));
    let scale = flat(&k_far).iter().fold(0f32, |a, b| a.max(b.abs()));
    eprintln!(
        "{file} ({:?}): |shifted - direct| = {d:e}, max |k| = {scale}",
        m.rope.layout
    );
    assert!(d < 1e-4 * scale.max(1.0), "re-rotated keys differ by {d}");
    // And rotating back returns the original.
    let back = m.rope.shift(&shifted, &[-3000; 12]).unwrap();
    assert!(max_abs_diff(&flat(&back), &flat(&k0)) < 1e-4 * scale.max(1.0));
}

#[test]
fn reposition_interleaved_rope_smollm2() {
    check_shift(SMOLLM2);
}

#[test]
fn reposition_split_half_rope_qwen2() {
    check_shift(QWEN05);
}

/// Driving the layers one at a time (the path sparse methods use) gives the same logits as
/// the one-shot forward.
#[test]
fn layer_by_layer_equals_forward() {
    let m = Model::load(&model_path(SMOLLM2), &dense()).unwrap();
    let toks = token_ids(300, 40_000, 5);
    let pos: Vec<u32> = (0..300).collect();
    let mut c1 = m.new_cache().unwrap();
    let one = m
        .forward(&toks, &pos, &mut c1, Logits::Last, &[])
        .unwrap()
        .logits
        .unwrap();
    let ctx = Context {
        model: &m,
        segments: vec![],
        question: toks.clone(),
    };
    let mut c2 = m.new_cache().unwrap();
    let (layered, counts) = recompute_layers(
        &m,
        &ctx,
        &mut c2,
        pos.clone(),
        Update::Overwrite,
        &mut FixedPlan(vec![]),
    )
    .unwrap();
    let d = max_abs_diff(&flat(&one), &flat(&layered));
    assert!(d < 1e-4, "layer-by-layer logits differ by {d}");
    assert_eq!(counts, vec![300; m.n_layers()]);
    for (a, b) in c1.layers.iter().zip(&c2.layers) {
        assert_eq!(a.positions(), b.positions());
        assert!(max_abs_diff(&flat(&a.keys().unwrap()), &flat(&b.keys().unwrap())) < 1e-4);
    }
}

/// Attention over rows with position gaps, against a naive loop.
#[test]
fn gapped_attention_matches_naive_loop() {
    let dev = Device::Cpu;
    let (h, hkv, d) = (6, 2, 8);
    let kpos: Vec<u32> = vec![0, 1, 2, 7, 8, 20, 21, 40];
    let qpos: Vec<u32> = vec![8, 21, 22, 45];
    let q = Tensor::randn(0f32, 1.0, (h, qpos.len(), d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (hkv, kpos.len(), d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (hkv, kpos.len(), d), &dev).unwrap();
    let got = flat(&attend(&q, &k, &v, &qpos, &kpos).unwrap()); // (Tq, h*d)
    let (qv, kv, vv) = (
        q.to_vec3::<f32>().unwrap(),
        k.to_vec3::<f32>().unwrap(),
        v.to_vec3::<f32>().unwrap(),
    );
    for (i, &p) in qpos.iter().enumerate() {
        for hh in 0..h {
            let g = hh / (h / hkv);
            let vis: Vec<usize> = (0..kpos.len()).filter(|&j| kpos[j] <= p).collect();
            let s: Vec<f32> = vis
                .iter()
                .map(|&j| {
                    (0..d).map(|e| qv[hh][i][e] * kv[g][j][e]).sum::<f32>() / (d as f32).sqrt()
                })
                .collect();
            let mx = s.iter().cloned().fold(f32::MIN, f32::max);
            let w: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
            let z: f32 = w.iter().sum();
            for e in 0..d {
                let want: f32 = vis
                    .iter()
                    .zip(&w)
                    .map(|(&j, wj)| wj / z * vv[g][j][e])
                    .sum();
                let have = got[i * h * d + hh * d + e];
                assert!(
                    (want - have).abs() < 1e-5,
                    "query {i} head {hh} dim {e}: {have} vs {want}"
                );
            }
        }
    }
}

/// Decoding step by step over a cache with a position gap equals one pass over the same
/// gapped positions.
#[test]
fn gapped_decode_equals_one_pass() {
    let m = Model::load(&model_path(SMOLLM2), &dense()).unwrap();
    let toks = token_ids(40, 40_000, 9);
    let mut pos: Vec<u32> = (0..20).collect();
    pos.extend(100..120); // a gap of 80 positions, as after sparsification
    let mut once = m.new_cache().unwrap();
    let all = m
        .forward(&toks, &pos, &mut once, Logits::All, &[])
        .unwrap()
        .logits
        .unwrap();
    let mut inc = m.new_cache().unwrap();
    m.forward(&toks[..20], &pos[..20], &mut inc, Logits::None, &[])
        .unwrap();
    for i in 20..40 {
        let l = m
            .forward(&toks[i..i + 1], &pos[i..i + 1], &mut inc, Logits::Last, &[])
            .unwrap()
            .logits
            .unwrap();
        let want = flat(&all.narrow(0, i, 1).unwrap());
        let d = max_abs_diff(&flat(&l), &want);
        assert!(d < 1e-3, "step {i}: logits differ by {d}");
    }
    assert_eq!(inc.layers[0].positions(), &pos[..]);
}

/// Dense weights: SmolLM2's first answer token is a near tie ("The" 25.33 vs "L" 25.24 for the
/// France question), and the 8-bit activation rounding of the quantized kernels flips it.
fn engine(dir: &std::path::Path) -> Engine {
    let (model, tok) = load_model(&model_path(SMOLLM2), &dense()).unwrap();
    let store: Arc<dyn KvStore> = Arc::new(DiskStore::open(dir).unwrap());
    let mut e = Engine::new(model, tok, store);
    e.store_dtype = samkv::store::StoreDtype::F32;
    e
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let p = Prompt {
        question: "What is the capital of France?".into(),
        ..Default::default()
    };
    let (g, _) = e
        .answer(&p, &Recompute, &Sampling::default(), &mut |_| true)
        .unwrap();
    eprintln!("answer: {:?}", g.text);
    assert!(g.text.contains("Paris"), "answer was {:?}", g.text);
}

#[test]
fn corrupt_store_entry_is_recomputed_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let p = Prompt {
        preamble: "Answer briefly.\n".into(),
        documents: vec!["The Eiffel Tower was designed by the company of Gustave Eiffel.\n".into()],
        question: "Who designed the Eiffel Tower?".into(),
        ..Default::default()
    };
    let (first, prep) = e.assemble(&p, &Reuse).unwrap();
    assert!(prep.sources.iter().all(|s| *s == Source::Computed));
    let (again, prep) = e.assemble(&p, &Reuse).unwrap();
    assert!(prep.sources.iter().all(|s| *s == Source::Store));
    assert!(max_abs_diff(&flat(&first.logits), &flat(&again.logits)) < 1e-5);
    // Flip one payload byte of every stored file.
    let mut flipped = 0;
    for entry in walk(dir.path()) {
        if entry.extension().is_some_and(|x| x == "safetensors") {
            let mut b = std::fs::read(&entry).unwrap();
            let n = b.len();
            b[n - 5] ^= 0x40;
            std::fs::write(&entry, b).unwrap();
            flipped += 1;
        }
    }
    assert_eq!(flipped, 2, "preamble and document entries");
    let (healed, prep) = e.assemble(&p, &Reuse).unwrap();
    assert!(
        prep.sources.iter().all(|s| *s == Source::Computed),
        "corrupt entries must be recomputed"
    );
    assert!(max_abs_diff(&flat(&first.logits), &flat(&healed.logits)) < 1e-5);
}

/// Entries hold the side data the engine's methods declare, and only that; SamKV on an entry
/// without its query summary recomputes it (the slow path) and assembles the same result.
#[test]
fn entries_hold_the_declared_side_data_and_samkv_works_without_it() {
    use samkv::methods::{MethodConfig, SideData};
    let samkv = MethodConfig::with_method("samkv").build().unwrap();
    let want = samkv.side_data();
    assert_eq!(want, [SideData::QuerySummary { window: 16 }]);
    let doc = "Gustave Eiffel's company designed and built the tower for the 1889 World's Fair. \
               It was criticised by artists at first and is now the symbol of Paris.\n"
        .repeat(3);
    let p = Prompt {
        preamble: "Answer briefly.\n".into(),
        documents: vec![doc.clone(), doc.replace("Eiffel", "Sauvestre")],
        question: "Who designed the Eiffel Tower?".into(),
        ..Default::default()
    };
    let run = |side: Vec<SideData>| {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        e.side_data = side;
        let (a, prep) = e.assemble(&p, samkv.as_ref()).unwrap();
        let keys: Vec<Vec<String>> = prep
            .segments
            .iter()
            .map(|s| s.kv.side.keys().cloned().collect())
            .collect();
        (a, keys)
    };
    let (with, keys) = run(want.clone());
    assert!(keys.iter().all(|k| *k == ["samkv.qloc.16"]), "{keys:?}");
    let (without, keys) = run(Vec::new());
    assert!(keys.iter().all(|k| k.is_empty()), "{keys:?}");
    assert_eq!(with.stats.kv_tokens_kept, without.stats.kv_tokens_kept);
    let d = max_abs_diff(&flat(&with.logits), &flat(&without.logits));
    assert!(d < 1e-3, "slow path differs: {d}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn methods_reject_empty_question() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let p = Prompt {
        question: "   ".into(),
        ..Default::default()
    };
    let err = e
        .assemble(&p, &Recompute)
        .err()
        .expect("an empty question must fail");
    assert!(err.to_string().contains("question is empty"), "{err}");
    let _ = Recompute.name();
}

/// q8-stored documents answer as f16-stored ones: Reuse over entries read back from disk (the
/// second request) gives the same greedy answer, and first-token logits within a tolerance about
/// twice what was measured (0.18 max |dlogit|, KL 2e-4; docs/RESULTS.md, "8-bit storage"), so a
/// broken scale or block layout, which moves logits by whole units, fails it.
#[test]
fn q8_store_answers_as_f16_store() {
    use samkv::store::StoreDtype;
    let p = Prompt {
        preamble: "Answer briefly.\n".into(),
        documents: vec![
            "The Eiffel Tower was designed by the company of Gustave Eiffel and finished in 1889.\n"
                .into(),
            "Gustave Eiffel was born in Dijon, France, in 1832.\n".into(),
        ],
        question: "In which city was the designer of the Eiffel Tower born?".into(),
        ..Default::default()
    };
    let run = |dt: StoreDtype| {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        e.store_dtype = dt;
        // K/V only: the side data is the same for both and would hide the ratio.
        e.side_data = Vec::new();
        e.assemble(&p, &Reuse).unwrap(); // computes and stores
        let (a, prep) = e.assemble(&p, &Reuse).unwrap();
        assert!(prep.sources.iter().all(|s| *s == Source::Store));
        let bytes: u64 = walk(dir.path())
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok().map(|m| m.len()))
            .sum();
        let (g, _) = e
            .answer(&p, &Reuse, &Sampling::default(), &mut |_| true)
            .unwrap();
        (flat(&a.logits), g.text, bytes)
    };
    let (l16, a16, b16) = run(StoreDtype::F16);
    let (l8, a8, b8) = run(StoreDtype::Q8);
    let d = max_abs_diff(&l16, &l8);
    let kl = samkv::eval::kl_divergence(&l16, &l8);
    eprintln!("f16 {a16:?} ({b16} B), q8 {a8:?} ({b8} B): max |dlogit| {d}, KL {kl:e}");
    assert_eq!(a8, a16, "q8 storage changed the greedy answer");
    assert!(d < 0.4, "q8 logits differ from f16 by {d}");
    assert!(kl < 1e-3, "KL(f16 || q8) = {kl}");
    assert!((b8 as f64) < 0.6 * b16 as f64, "q8 {b8} B vs f16 {b16} B");
}

/// The measurement behind q8's block of 32 channels (docs/RESULTS.md, "8-bit storage"): Reuse's
/// first-token logits over documents quantized with 32-channel blocks and with one scale per
/// head row (64 channels, SmolLM2's head_dim), against the f32 store, on real MuSiQue prompts.
///
///     cargo test --release --test engine -- --ignored q8_block_size --nocapture
#[test]
#[ignore = "a measurement (minutes); run by hand"]
fn q8_block_size_measurement() {
    use samkv::store::{q8, MemoryTier, StoreDtype, StoredDoc};
    let ex = samkv::eval::load_examples(&shared_data("musique_s.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine(dir.path());
    e.side_data = Vec::new();
    for x in ex.iter().take(3) {
        let texts: Vec<String> = x.documents.iter().map(|d| d.text.clone()).collect();
        let p = Prompt::for_question(&texts, &x.question);
        e.store = Arc::new(MemoryTier::new(usize::MAX, None));
        let (a, prep) = e.assemble(&p, &Reuse).unwrap();
        let reference = flat(&a.logits);
        let f32_docs: Vec<Arc<StoredDoc>> = prep.segments.iter().map(|s| s.kv.clone()).collect();
        for block in [32, 64] {
            let store = Arc::new(MemoryTier::new(usize::MAX, None));
            for d in &f32_docs {
                let (mut k, mut v, mut ks, mut vs) = (vec![], vec![], vec![], vec![]);
                for l in 0..d.k.len() {
                    let (a, sa) = q8::quantize(&d.k[l], block).unwrap();
                    let (b, sb) = q8::quantize(&d.v[l], block).unwrap();
                    k.push(a);
                    v.push(b);
                    ks.push(sa);
                    vs.push(sb);
                }
                let mut meta = d.meta.clone();
                meta.dtype = "q8".into();
                meta.format_version = StoreDtype::Q8.format_version();
                let q = StoredDoc::with_scales(meta, k, v, ks, vs, d.side.clone()).unwrap();
                store.put(&q).unwrap();
            }
            e.store = store;
            let (b, prep) = e.assemble(&p, &Reuse).unwrap();
            assert!(prep.sources.iter().all(|s| *s == Source::Store));
            let l = flat(&b.logits);
            eprintln!(
                "example {} ({} context tokens), block {block}: max |dlogit| vs f32 {:.4}, KL {:.2e}, same argmax {}",
                x.id,
                prep.segments.iter().map(|s| s.len()).sum::<usize>(),
                max_abs_diff(&reference, &l),
                samkv::eval::kl_divergence(&reference, &l),
                argmax(&reference) == argmax(&l)
            );
        }
    }
}
