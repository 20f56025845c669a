//! Answer quality (LongBench's `qa_f1_score`) and fidelity (KL divergence) metrics.
//!
//! Prediction post-processing: LongBench's `eval.py` keeps only the first line of the
//! prediction (`pred.lstrip('\n').split('\n')[0]`) for trec, triviaqa, samsum and lsht only;
//! for hotpotqa, 2wikimqa and musique it scores the raw prediction. These functions follow
//! that: they score the string they are given, whole. (CacheBlend's own scripts cut at the
//! first line and map yes/no answers before scoring; that is not done here.)

use std::collections::HashMap;

/// Python's `str.isspace`: Unicode White_Space plus the separators U+001C..U+001F, which
/// `str.split()` also splits on.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A character of Python's `\w` (Unicode alphanumerics and `_`).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// LongBench/SQuAD `normalize_answer`: lowercase, drop `string.punctuation` (the 32 ASCII
/// punctuation characters), replace the whole words a/an/the (`\b(a|an|the)\b`) by a space,
/// then collapse whitespace.
pub fn normalize_answer(s: &str) -> String {
    let no_punct: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();

    // `\b(a|an|the)\b` matches exactly a maximal run of word characters equal to an article.
    let mut no_articles = String::with_capacity(no_punct.len());
    let mut rest = no_punct.as_str();
    while let Some(c) = rest.chars().next() {
        let end = if is_word(c) {
            rest.find(|c: char| !is_word(c)).unwrap_or(rest.len())
        } else {
            c.len_utf8()
        };
        let piece = &rest[..end];
        if matches!(piece, "a" | "an" | "the") {
            no_articles.push(' ');
        } else {
            no_articles.push_str(piece);
        }
        rest = &rest[end..];
    }

    tokens_of(&no_articles).collect::<Vec<_>>().join(" ")
}

fn tokens_of(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// LongBench `qa_f1_score`: token F1 of the normalized strings over the multiset overlap.
/// 0 when nothing is shared, which includes an empty prediction or gold.
pub fn qa_f1(pred: &str, gold: &str) -> f64 {
    let pred = normalize_answer(pred);
    let gold = normalize_answer(gold);
    let pred_tokens: Vec<&str> = tokens_of(&pred).collect();
    let gold_tokens: Vec<&str> = tokens_of(&gold).collect();

    let mut gold_counts: HashMap<&str, usize> = HashMap::new();
    for t in &gold_tokens {
        *gold_counts.entry(t).or_insert(0) += 1;
    }
    let mut same = 0usize;
    for t in &pred_tokens {
        if let Some(n) = gold_counts.get_mut(t) {
            if *n > 0 {
                *n -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pred_tokens.len() as f64;
    let recall = same as f64 / gold_tokens.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The best `qa_f1` over the gold answers (LongBench's per-example score); 0 with no golds.
pub fn best_f1(pred: &str, golds: &[String]) -> f64 {
    golds.iter().map(|g| qa_f1(pred, g)).fold(0.0, f64::max)
}

/// Whether the normalized prediction equals some normalized gold answer.
pub fn exact_match(pred: &str, golds: &[String]) -> bool {
    let pred = normalize_answer(pred);
    golds.iter().any(|g| normalize_answer(g) == pred)
}

/// `log_softmax` in f64 with the log-sum-exp shift; `None` when it is undefined (empty, all
/// `-inf`, or a NaN / `+inf` logit).
fn log_softmax(logits: &[f32]) -> Option<Vec<f64>> {
    let max = logits
        .iter()
        .map(|&x| x as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() || logits.iter().any(|x| x.is_nan()) {
        return None;
    }
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    Some(logits.iter().map(|&x| x as f64 - lse).collect())
}

/// KL(P || Q) in nats, where P = softmax(`p_logits`) and Q = softmax(`q_logits`) (P is the
/// reference, e.g. Recompute's first-token distribution). Entries with P = 0 (`-inf` logit)
/// contribute nothing; an entry with P > 0 and Q = 0 makes it `+inf`. Returns NaN when the
/// lengths differ, the input is empty, or a logit vector holds NaN/`+inf` or only `-inf`.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    if p_logits.len() != q_logits.len() {
        return f64::NAN;
    }
    let (Some(lp), Some(lq)) = (log_softmax(p_logits), log_softmax(q_logits)) else {
        return f64::NAN;
    };
    let mut kl = 0.0;
    for (&a, &b) in lp.iter().zip(&lq) {
        if a == f64::NEG_INFINITY {
            continue;
        }
        kl += a.exp() * (a - b);
    }
    // Rounding can leave a tiny negative value for (near-)identical distributions.
    if kl < 0.0 {
        0.0
    } else {
        kl
    }
}

/// The median (mean of the two middle values for an even count); `None` when empty or when
/// any value is NaN.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() || xs.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golds(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn normalize_punctuation_articles_whitespace() {
        assert_eq!(normalize_answer("The Eiffel Tower!"), "eiffel tower");
        assert_eq!(
            normalize_answer("  A  cat,\tan  apple;\nTHE end. "),
            "cat apple end"
        );
        // Articles only as whole words: "theatre", "anna", "again" stay.
        assert_eq!(
            normalize_answer("Theatre Anna again a"),
            "theatre anna again"
        );
        // Punctuation is removed before articles, so "the-end" becomes "theend".
        assert_eq!(normalize_answer("the-end"), "theend");
        // "a.b" -> "ab"; "o'the" -> "othe"; "(the)" -> "" .
        assert_eq!(normalize_answer("a.b o'the (the)"), "ab othe");
        // Non-ASCII punctuation is not in string.punctuation and is kept.
        assert_eq!(
            normalize_answer("«Żuławski» — the director"),
            "«żuławski» — director"
        );
        assert_eq!(normalize_answer(""), "");
        assert_eq!(normalize_answer("the a an"), "");
    }

    #[test]
    fn f1_partial_overlap_exact_value() {
        // pred tokens: eiffel tower in paris (4); gold: eiffel tower (2); common 2.
        // precision 2/4, recall 2/2 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
        assert!(close(
            qa_f1("the Eiffel Tower in Paris", "Eiffel Tower"),
            2.0 / 3.0
        ));
        // Multiset overlap: pred "paris paris" vs gold "paris": common 1, P 1/2, R 1 -> 2/3.
        assert!(close(qa_f1("Paris paris", "Paris"), 2.0 / 3.0));
        // pred "new york city" vs gold "york new jersey": common 2, P 2/3, R 2/3 -> 2/3.
        assert!(close(qa_f1("New York City", "York, New Jersey"), 2.0 / 3.0));
        assert!(close(qa_f1("The Beatles.", "beatles"), 1.0));
        assert_eq!(qa_f1("London", "Paris"), 0.0);
    }

    #[test]
    fn f1_empty_cases_are_zero() {
        assert_eq!(qa_f1("", "Paris"), 0.0);
        assert_eq!(qa_f1("Paris", ""), 0.0);
        // LongBench returns 0 when nothing is shared, even when both are empty.
        assert_eq!(qa_f1("", ""), 0.0);
        assert_eq!(qa_f1("the", "a"), 0.0);
        assert_eq!(best_f1("Paris", &[]), 0.0);
    }

    #[test]
    fn best_f1_and_exact_match_over_golds() {
        let g = golds(&["Lahore", "Lahore, Pakistan"]);
        assert!(close(best_f1("Lahore Pakistan", &g), 1.0));
        // "in lahore" vs "lahore": P 1/2, R 1 -> 2/3; vs "lahore pakistan": P 1/2 R 1/2 -> 1/2.
        assert!(close(best_f1("in Lahore", &g), 2.0 / 3.0));
        assert!(exact_match("the lahore.", &g));
        assert!(exact_match("LAHORE  pakistan", &g));
        assert!(!exact_match("in Lahore", &g));
        assert!(!exact_match("Lahore", &[]));
    }

    #[test]
    fn kl_identical_is_zero_and_shift_invariant() {
        let p = [1.0f32, -2.0, 0.5, 3.0];
        assert_eq!(kl_divergence(&p, &p), 0.0);
        let shifted: Vec<f32> = p.iter().map(|x| x + 100.0).collect();
        assert!(kl_divergence(&p, &shifted).abs() < 1e-9);
        // Large logits do not overflow thanks to the log-sum-exp shift.
        let big = [1000.0f32, 999.0];
        assert!(kl_divergence(&big, &big).abs() < 1e-12);
    }

    #[test]
    fn kl_two_class_hand_computed() {
        // P = (1/2, 1/2); Q = softmax(0, ln 3) = (1/4, 3/4).
        // KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.14384103622589045.
        let kl = kl_divergence(&[0.0, 0.0], &[0.0, 3f32.ln()]);
        assert!((kl - 0.5 * (4.0f64 / 3.0).ln()).abs() < 1e-7, "{kl}");
        // Reverse direction: 1/4 ln(1/2) + 3/4 ln(3/2) = 0.13081203594113694.
        let rev = kl_divergence(&[0.0, 3f32.ln()], &[0.0, 0.0]);
        assert!(
            (rev - (0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln())).abs() < 1e-7,
            "{rev}"
        );
    }

    #[test]
    fn kl_masked_and_invalid() {
        let ninf = f32::NEG_INFINITY;
        // P puts no mass on class 1: KL = 1 * ln(1 / 0.5) = ln 2.
        assert!((kl_divergence(&[0.0, ninf], &[0.0, 0.0]) - 2f64.ln()).abs() < 1e-12);
        assert_eq!(kl_divergence(&[0.0, 0.0], &[0.0, ninf]), f64::INFINITY);
        assert!(kl_divergence(&[0.0], &[0.0, 1.0]).is_nan());
        assert!(kl_divergence(&[], &[]).is_nan());
        assert!(kl_divergence(&[f32::NAN, 0.0], &[0.0, 0.0]).is_nan());
        assert!(kl_divergence(&[ninf, ninf], &[0.0, 0.0]).is_nan());
    }

    #[test]
    fn median_cases() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }
}
