use super::*;
use candle_core::Device;

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn close(a: &Tensor, b: &[f32]) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn keep_ratio_formula_and_edge_cases() {
    let s = [1.0, 2.0, 3.0, 5.0];
    assert_eq!(keep_ratio(&s, 2.0), 0.75);
    assert_eq!(keep_ratio(&s, 4.0), 0.25);
    // a == max: the anchors already match best, keep nothing.
    assert_eq!(keep_ratio(&s, 5.0), 0.0);
    // Outside the block range (on either side, min included) gives 0.
    assert_eq!(keep_ratio(&s, 6.0), 0.0);
    assert_eq!(keep_ratio(&s, 0.5), 0.0);
    assert_eq!(keep_ratio(&s, 1.0), 0.0);
    // All blocks tie: no spread, nothing kept; no blocks at all likewise.
    assert_eq!(keep_ratio(&[2.0, 2.0, 2.0], 2.0), 0.0);
    assert_eq!(keep_ratio(&[], 1.0), 0.0);
    // Ties at the maximum do not change the ratio.
    assert_eq!(keep_ratio(&[1.0, 5.0, 5.0], 3.0), 0.5);
}

#[test]
fn short_documents_are_kept_whole() {
    for len in [5u32, 23, 24] {
        let d = doc_span(1, 100..100 + len, 8, 16, 8);
        assert!(d.middle.is_empty() && d.blocks.is_empty(), "len {len}");
        assert_eq!(
            d.anchor_positions().collect::<Vec<_>>(),
            (100..100 + len).collect::<Vec<_>>()
        );
    }
}

#[test]
fn middle_blocks_end_with_a_partial_block() {
    let d = doc_span(2, 10..55, 8, 16, 8);
    assert_eq!(d.middle, 18..39);
    assert_eq!(d.blocks, vec![18..26, 26..34, 34..39]);
    let a: Vec<u32> = d.anchor_positions().collect();
    assert_eq!(a, (10..18).chain(39..55).collect::<Vec<_>>());
    // One token over the anchors: a one-token middle and block.
    assert_eq!(doc_span(0, 0..25, 8, 16, 8).blocks, vec![8..9]);
}

#[test]
fn grouped_query_heads_are_averaged_per_kv_group() {
    // 4 query heads, 2 KV groups: heads (0, 1) and (2, 3).
    let q = t(&[1., 2., 3., 4., 10., 20., 30., 40.], &[4, 2]);
    close(&group_mean(&q, 2).unwrap(), &[2., 3., 20., 30.]);
    close(
        &group_mean(&q, 4).unwrap(),
        &[1., 2., 3., 4., 10., 20., 30., 40.],
    );
    // A leading (stable layer) axis is kept.
    let q2 = Tensor::stack(&[&q, &(&q * 2.0).unwrap()], 0).unwrap();
    close(&group_mean(&q2, 1).unwrap(), &[11., 16.5, 22., 33.]);
    assert!(group_mean(&t(&[0.; 6], &[3, 2]), 2).is_err());
}

#[test]
fn personalized_query_with_one_document_is_the_generic_query() {
    let q_gen = t(&[1., 2., 3., 4.], &[1, 2, 2]);
    let q_loc = vec![t(&[5., 6., 7., 8.], &[1, 2, 2])];
    let out = personalized_queries(&q_loc, &q_gen, 2).unwrap();
    assert_eq!(out.len(), 1);
    close(&out[0], &[1., 2., 3., 4.]);
}

#[test]
fn personalized_query_adds_the_other_documents_weighted_by_cosine() {
    // One stable layer, one head, d = 2.
    let q_gen = t(&[1., 0.], &[1, 1, 2]);
    let q_loc = vec![
        t(&[1., 0.], &[1, 1, 2]),  // |cos| = 1
        t(&[0., 2.], &[1, 1, 2]),  // |cos| = 0
        t(&[-1., 1.], &[1, 1, 2]), // |cos| = 1/sqrt(2)
    ];
    let out = personalized_queries(&q_loc, &q_gen, 1).unwrap();
    let h = std::f32::consts::FRAC_1_SQRT_2 / 2.0;
    close(&out[0], &[1.0 - h, h]);
    close(&out[1], &[1.5 - h, h]);
    close(&out[2], &[1.5, 0.0]);
}

#[test]
fn block_scores_use_block_means_and_the_anchor_mean() {
    // A layer holding positions 0..10; the document is 4..10 with 1 sink, 1 local and
    // blocks of 2, so its middle 5..9 has blocks 5..7 and 7..9.
    let mut k = vec![0f32; 8];
    k.extend([1., 0., 2., 0., 0., 2., 4., 4., 0., 0., 1., 1.]);
    let keys = t(&k, &[1, 10, 2]);
    let layer = LayerKv::from_parts(keys.clone(), keys, (0..10).collect()).unwrap();
    let d = doc_span(1, 4..10, 1, 1, 2);
    let (s, a) = block_scores(&layer, &d, &t(&[1., 1.], &[1, 2])).unwrap();
    assert_eq!(s, vec![2.0, 4.0]);
    assert_eq!(a, 1.5);
}

#[test]
fn top_blocks_per_document() {
    let s = [1.0, 4.0, 2.0, 4.0];
    assert_eq!(select_blocks(&s, 0.5), vec![1, 3]);
    assert_eq!(select_blocks(&s, 0.74), vec![1, 3]);
    assert_eq!(select_blocks(&s, 0.75), vec![1, 2, 3]);
    assert_eq!(select_blocks(&s, 0.0), Vec::<usize>::new());
    assert_eq!(select_blocks(&s, 1.0), vec![0, 1, 2, 3]);
    // Ties go to the earlier block.
    assert_eq!(select_blocks(&[3.0, 3.0, 3.0], 0.34), vec![0]);
}

#[test]
fn global_selection_spends_one_token_budget_over_all_documents() {
    let s = vec![vec![vec![1.0, 5.0], vec![3.0], vec![], vec![4.0, 0.5]]];
    let lens = vec![vec![8, 8], vec![8], vec![], vec![8, 3]];
    let g = |b| select_blocks_global(&s, &lens, b);
    assert_eq!(g(24), vec![vec![vec![1], vec![0], vec![], vec![0]]]);
    // The third block does not fit in 23 tokens; selection stops there.
    assert_eq!(g(23), vec![vec![vec![1], vec![], vec![], vec![0]]]);
    assert_eq!(g(0), vec![vec![Vec::<usize>::new(); 4]]);
    assert_eq!(g(100), vec![vec![vec![0, 1], vec![0], vec![], vec![0, 1]]]);
    // Ties go to the earlier block.
    let t = vec![vec![vec![2.0, 2.0], vec![2.0]]];
    assert_eq!(
        select_blocks_global(&t, &[vec![4, 4], vec![4]], 8),
        vec![vec![vec![0, 1], vec![]]]
    );
    // Two stable layers take turns; a block both pick is paid for once.
    let two = vec![
        vec![vec![9.0, 1.0], vec![2.0]],
        vec![vec![9.0, 1.0], vec![5.0]],
    ];
    let l2 = vec![vec![4, 4], vec![4]];
    assert_eq!(
        select_blocks_global(&two, &l2, 8),
        vec![vec![vec![0], vec![0]], vec![vec![0], vec![0]]]
    );
    assert_eq!(
        select_blocks_global(&two, &l2, 4),
        vec![vec![vec![0], vec![]], vec![vec![0], vec![]]]
    );
}

#[test]
fn layer_union_rule() {
    let base = [1u32, 100];
    let sets = recompute_sets(6, &[3, 4, 5], &[vec![30], vec![40, 41], vec![50]], &base);
    assert_eq!(sets[5], vec![1, 50, 100]);
    assert_eq!(sets[4], vec![1, 40, 41, 50, 100]);
    assert_eq!(sets[3], vec![1, 30, 40, 41, 50, 100]);
    for l in 0..3 {
        assert_eq!(sets[l], sets[3], "layer {l} holds the union of all");
    }
    // A row selected at several stable layers appears once.
    let sets = recompute_sets(3, &[1, 2], &[vec![7, 9], vec![7]], &[]);
    assert_eq!(sets, vec![vec![7, 9], vec![7, 9], vec![7]]);
}

#[test]
fn cosine_fusion_weights() {
    let old = t(&[1., 0., 2., 2.], &[1, 2, 2]);
    // Row 0 keeps its direction (c = 1): linear fusion with theta. Row 1 turns around
    // (c = -1): overwritten.
    let new = t(&[3., 0., -1., -1.], &[1, 2, 2]);
    let (k, v) = cosine_fusion(&old, &old, &new, &new, 0.9).unwrap();
    close(&k, &[0.1 + 2.7, 0., -1., -1.]);
    close(&v, &[0.1 + 2.7, 0., -1., -1.]);
    // Orthogonal (c = 0): weight theta + (1 - theta) / 2 on the new row.
    let (a, b) = (t(&[1., 0.], &[1, 1, 2]), t(&[0., 1.], &[1, 1, 2]));
    let (k, _) = cosine_fusion(&a, &a, &b, &b, 0.5).unwrap();
    close(&k, &[0.25, 0.75]);
}

#[test]
fn relative_scores_put_documents_on_one_scale() {
    // Same shape, 10x the scale: equal relative scores.
    assert_eq!(
        relative_scores(&[1.0, 3.0, 5.0], 2.0),
        vec![-0.25, 0.25, 0.75]
    );
    assert_eq!(
        relative_scores(&[10.0, 30.0, 50.0], 20.0),
        vec![-0.25, 0.25, 0.75]
    );
    assert_eq!(relative_scores(&[2.0, 2.0], 1.0), vec![0.0, 0.0]);
    assert!(relative_scores(&[], 1.0).is_empty());
}

#[test]
fn block_means_by_runs_equal_block_by_block_means() {
    // kv_heads 2, 11 rows, d 3: distinct values so a wrong row or head shows.
    let v: Vec<f32> = (0..2 * 11 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
    let keys = t(&v, &[2, 11, 3]);
    let v = &v;
    // Three back-to-back blocks of 3, a last partial block of 1, then a gap and a block of 2.
    let blocks = vec![0..3, 3..6, 6..9, 9..10, 9..11];
    let got = block_mean_keys(&keys, &blocks).unwrap();
    assert_eq!(got.dims(), &[5, 2, 3]);
    let want: Vec<f32> = blocks
        .iter()
        .flat_map(|b| {
            (0..2).flat_map(move |h| {
                (0..3).map(move |j| {
                    b.clone().map(|r| v[(h * 11 + r) * 3 + j]).sum::<f32>() / b.len() as f32
                })
            })
        })
        .collect();
    close(&got, &want);
}

#[test]
fn all_documents_at_once_score_as_one_by_one() {
    // Two stable layers of 2 KV heads over positions 0..90: a document kept whole, two with
    // middles (one ending in a partial block), each with its own q_hat per layer.
    let dev = Device::Cpu;
    let layers: Vec<LayerKv> = (0..2)
        .map(|_| {
            let k = Tensor::randn(0f32, 1f32, (2, 90, 4), &dev).unwrap();
            LayerKv::from_parts(k.clone(), k, (0..90).collect()).unwrap()
        })
        .collect();
    let keys = KvCache { layers };
    let docs = vec![
        doc_span(1, 0..20, 8, 16, 8),
        doc_span(2, 20..61, 8, 16, 8),
        doc_span(3, 61..90, 2, 3, 4),
    ];
    let q_hat: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn(0f32, 1f32, (2, 2, 4), &dev).unwrap())
        .collect();
    let batched = score_blocks(&keys, &docs, &q_hat, &[0, 1]).unwrap();
    for (s, layer) in batched.iter().enumerate() {
        for (i, d) in docs.iter().enumerate() {
            let (b, a) = block_scores(&keys.layers[s], d, &q_hat[i].get(s).unwrap()).unwrap();
            let (bb, ba) = &layer[i];
            assert_eq!(b.len(), bb.len(), "layer {s} doc {i}");
            for (x, y) in b.iter().chain([&a]).zip(bb.iter().chain([ba])) {
                assert!((x - y).abs() < 1e-4, "layer {s} doc {i}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn attention_shares_weigh_blocks_by_length_and_average_the_layers() {
    // Two documents: blocks of 8, 8 and 4 tokens, then one of 8. Scores are the mean
    // attention per row, so mass = score x length.
    let lens = vec![vec![8, 8, 4], vec![8]];
    let layer_a: Vec<(Vec<f32>, f32)> = vec![(vec![1.0, 0.0, 2.0], 0.0), (vec![1.0], 0.0)];
    // Masses 8, 0, 8, 8 of 24.
    let s = attention_shares(&vec![layer_a.clone()], &lens);
    let third = 1.0 / 3.0;
    for (x, y) in s.concat().iter().zip([third, 0.0, third, third]) {
        assert!((x - y).abs() < 1e-6, "{s:?}");
    }
    // A second layer where only document 1's block is attended: the shares average.
    let layer_b: Vec<(Vec<f32>, f32)> = vec![(vec![0.0, 0.0, 0.0], 0.0), (vec![3.0], 0.0)];
    let s = attention_shares(&vec![layer_a, layer_b.clone()], &lens);
    let want = [third / 2.0, 0.0, third / 2.0, (third + 1.0) / 2.0];
    for (x, y) in s.concat().iter().zip(want) {
        assert!((x - y).abs() < 1e-6, "{s:?}");
    }
    assert!((s.concat().iter().sum::<f32>() - 1.0).abs() < 1e-6);
    // A layer with no attention on any block adds nothing (no division by zero).
    let zero: Vec<(Vec<f32>, f32)> = vec![(vec![0.0; 3], 0.0), (vec![0.0], 0.0)];
    assert!(attention_shares(&vec![zero], &lens)
        .concat()
        .iter()
        .all(|&x| x == 0.0));
}

#[test]
fn coverage_takes_the_best_blocks_until_the_target_is_held() {
    let lens = vec![vec![8, 8, 8], vec![8, 8]];
    let shares = vec![vec![0.1, 0.4, 0.05], vec![0.3, 0.15]];
    // 0.4 alone is under half; 0.4 + 0.3 holds it.
    assert_eq!(
        select_blocks_coverage(&shares, &lens, 0.5, 1000),
        vec![vec![1], vec![0]]
    );
    // Exactly reaching the target stops there.
    assert_eq!(
        select_blocks_coverage(&shares, &lens, 0.4, 1000),
        vec![vec![1], vec![]]
    );
    // The cap wins over the target: 16 tokens allow two blocks whatever the cover.
    assert_eq!(
        select_blocks_coverage(&shares, &lens, 1.0, 16),
        vec![vec![1], vec![0]]
    );
    // Selection stops at the first block that would overrun the budget, as in Global.
    assert_eq!(
        select_blocks_coverage(&shares, &lens, 1.0, 12),
        vec![vec![1], vec![]]
    );
    // Ties: the earlier document and block first.
    let tied = vec![vec![0.25, 0.25], vec![0.25, 0.25]];
    assert_eq!(
        select_blocks_coverage(&tied, &[vec![8, 8], vec![8, 8]], 0.5, 1000),
        vec![vec![0, 1], vec![]]
    );
    // Documents without a middle (no blocks) and no blocks at all.
    assert_eq!(
        select_blocks_coverage(&[vec![], vec![1.0]], &[vec![], vec![8]], 0.9, 8),
        vec![vec![], vec![0]]
    );
    assert_eq!(
        select_blocks_coverage(&[], &[], 0.9, 100),
        Vec::<Vec<usize>>::new()
    );
}

#[test]
fn coverage_selection_respects_the_keep_cap_through_block_selection() {
    // Two 40-token documents: anchors 8 + 16, middles of 16 tokens = two blocks of 8 each.
    let docs = vec![doc_span(0, 0..40, 8, 16, 8), doc_span(1, 40..80, 8, 16, 8)];
    let layer: Vec<(Vec<f32>, f32)> = vec![(vec![0.4, 0.1], 0.0), (vec![0.3, 0.2], 0.0)];
    let scores = vec![layer.clone(), layer];
    // keep 0.7 of 80 tokens = 56, minus 48 anchor tokens: one block of 8.
    let sel = block_selection(
        &docs,
        &scores,
        &[],
        Selection::Coverage {
            cover: 1.0,
            keep: 0.7,
        },
    );
    assert_eq!(sel, vec![(8..16).collect::<Vec<u32>>(); 2]);
    // A generous cap: cover 0.6 takes blocks 0 of doc 0 (0.4) and doc 1 (0.3).
    let sel = block_selection(
        &docs,
        &scores,
        &[],
        Selection::Coverage {
            cover: 0.6,
            keep: 1.0,
        },
    );
    let want: Vec<u32> = (8..16).chain(48..56).collect();
    assert_eq!(sel, vec![want.clone(), want]);
}

#[test]
fn keep_only_keeps_the_retained_rows_and_the_question() {
    let dev = Device::Cpu;
    // One layer, one KV head, head_dim 2, rows at positions 0..6 (context 0..4, question 4..6).
    let k = Tensor::arange(0f32, 12.0, &dev)
        .unwrap()
        .reshape((1, 6, 2))
        .unwrap();
    let v = (k.clone() * 10.0).unwrap();
    let layer = LayerKv::from_parts(k, v, (0..6).collect()).unwrap();
    let cache = KvCache {
        layers: vec![layer.clone(), layer],
    };
    let kept = keep_only(&cache, &[1, 3], 4, 2).unwrap();
    for l in &kept.layers {
        assert_eq!(l.positions(), &[1, 3, 4, 5]);
        close(&l.keys().unwrap(), &[2., 3., 6., 7., 8., 9., 10., 11.]);
        close(
            &l.values().unwrap(),
            &[20., 30., 60., 70., 80., 90., 100., 110.],
        );
    }
    // A retained position the cache does not hold is an error, not a silent drop.
    assert!(keep_only(&cache, &[1, 9], 4, 0).is_err());
}
