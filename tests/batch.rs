//! `Model::decode_batch` against B separate `forward` calls on SmolLM2 (dense f32 weights, CPU):
//! same logits, same caches afterwards, for sequences of different lengths (padded and masked)
//! and with position gaps.

mod common;

use std::sync::OnceLock;

use common::*;
use samkv::kv::KvCache;
use samkv::model::{LoadOptions, Logits, Model, WeightMode};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let opts = LoadOptions {
            weights: WeightMode::Dense,
            ..Default::default()
        };
        Model::load(&model_path(SMOLLM2), &opts).unwrap()
    })
}

/// A sequence: prefill chunks (each a run of consecutive positions, start..end) and decode
/// positions.
struct Seq {
    chunks: Vec<(u32, u32)>,
    decode_at: Vec<u32>,
    seed: u64,
}

fn prefilled(m: &Model, s: &Seq) -> KvCache {
    let mut cache = m.new_cache().unwrap();
    for (i, &(start, end)) in s.chunks.iter().enumerate() {
        let pos: Vec<u32> = (start..end).collect();
        let toks = token_ids(pos.len(), m.cfg.vocab, s.seed * 100 + i as u64);
        m.forward(&toks, &pos, &mut cache, Logits::None, &[])
            .unwrap();
    }
    cache
}

fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

/// Runs `steps` decode steps both ways and compares logits after each and caches at the end.
/// Returns the largest logit difference seen.
fn check(seqs: &[Seq]) -> f32 {
    let m = model();
    let mut batch: Vec<KvCache> = seqs.iter().map(|s| prefilled(m, s)).collect();
    let mut single: Vec<KvCache> = seqs.iter().map(|s| prefilled(m, s)).collect();
    let steps = seqs[0].decode_at.len();
    let mut worst = 0f32;
    for step in 0..steps {
        let toks: Vec<u32> = seqs
            .iter()
            .map(|s| token_ids(1, m.cfg.vocab, s.seed * 1000 + step as u64)[0])
            .collect();
        let pos: Vec<u32> = seqs.iter().map(|s| s.decode_at[step]).collect();
        let got = rows(&m.decode_batch(&toks, &pos, &mut batch).unwrap());
        assert_eq!(got.len(), seqs.len());
        for (i, cache) in single.iter_mut().enumerate() {
            let out = m
                .forward(&toks[i..i + 1], &pos[i..i + 1], cache, Logits::Last, &[])
                .unwrap();
            let want = rows(&out.logits.unwrap()).remove(0);
            assert_eq!(got[i].len(), m.cfg.vocab);
            let d = max_abs_diff(&got[i], &want);
            worst = worst.max(d);
            // Measured 6e-5 (f32 matmuls over 1 vs B rows sum in another order).
            assert!(d < 1e-3, "step {step}, sequence {i}: logits differ by {d}");
            assert_eq!(argmax(&got[i]), argmax(&want), "step {step}, sequence {i}");
        }
    }
    for (i, (a, b)) in batch.iter().zip(&single).enumerate() {
        for (l, (la, lb)) in a.layers.iter().zip(&b.layers).enumerate() {
            assert_eq!(la.positions(), lb.positions(), "sequence {i}, layer {l}");
            let flat = |t: candle_core::Tensor| -> Vec<f32> {
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            let dk = max_abs_diff(&flat(la.keys().unwrap()), &flat(lb.keys().unwrap()));
            let dv = max_abs_diff(&flat(la.values().unwrap()), &flat(lb.values().unwrap()));
            assert!(
                dk < 1e-3 && dv < 1e-3,
                "sequence {i}, layer {l}: K {dk}, V {dv}"
            );
        }
    }
    worst
}

#[test]
fn different_lengths_and_gaps_match_separate_forwards() {
    let seqs = [
        // Short, contiguous.
        Seq {
            chunks: vec![(0, 12)],
            decode_at: vec![12, 13, 14],
            seed: 1,
        },
        // Longer: the others are padded to it.
        Seq {
            chunks: vec![(0, 30)],
            decode_at: vec![30, 31, 32],
            seed: 2,
        },
        // Gaps in the cache and between decode positions.
        Seq {
            chunks: vec![(0, 8), (20, 28)],
            decode_at: vec![40, 45, 46],
            seed: 3,
        },
    ];
    let worst = check(&seqs);
    eprintln!("decode_batch vs forward: max logit difference {worst:e}");
}

/// Inserting a row before cached ones makes `LayerKv::append` re-sort, whose `index_select`
/// on a view with spare capacity fails on CPU ("index-select only supports contiguous
/// tensors") in `forward` as much as here: a bug in src/kv/cache.rs, reported.
#[test]
#[ignore = "LayerKv::sort_by_position fails on a cache with spare capacity (src/kv/cache.rs)"]
fn new_tokens_before_cached_keys_match_separate_forwards() {
    let seqs = [
        Seq {
            chunks: vec![(0, 12)],
            decode_at: vec![12, 13, 14],
            seed: 1,
        },
        // Keys after the new token's position are masked; rows are re-sorted.
        Seq {
            chunks: vec![(0, 10), (50, 60)],
            decode_at: vec![30, 31, 70],
            seed: 4,
        },
    ];
    check(&seqs);
}

#[test]
fn equal_lengths_without_mask_and_batch_of_one_match() {
    let eq = |seed| Seq {
        chunks: vec![(0, 16)],
        decode_at: vec![16, 17],
        seed,
    };
    check(&[eq(5), eq(6), eq(7)]);
    check(&[eq(8)]);
}

#[test]
fn bad_input_is_rejected() {
    let m = model();
    let mut caches = vec![m.new_cache().unwrap(), m.new_cache().unwrap()];
    let err = |r: samkv::Result<candle_core::Tensor>| match r {
        Ok(_) => panic!("bad input was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err(m.decode_batch(&[], &[], &mut [])).contains("at least one"));
    assert!(err(m.decode_batch(&[1, 2], &[0], &mut caches)).contains("one position"));
    assert!(err(m.decode_batch(&[1], &[0], &mut caches)).contains("one cache"));
    let vocab = m.cfg.vocab as u32;
    assert!(err(m.decode_batch(&[1, vocab], &[0, 0], &mut caches)).contains("vocabulary"));
    let mut wrong =
        vec![KvCache::new(1, m.cfg.n_kv_heads, m.cfg.head_dim, m.dtype(), m.device()).unwrap()];
    assert!(err(m.decode_batch(&[1], &[0], &mut wrong)).contains("layers"));
    // A position the cache already holds.
    let mut c = vec![prefilled(
        m,
        &Seq {
            chunks: vec![(0, 4)],
            decode_at: vec![],
            seed: 9,
        },
    )];
    assert!(err(m.decode_batch(&[1], &[2], &mut c)).contains("share one position"));
}
