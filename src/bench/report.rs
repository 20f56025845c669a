//! Summaries of `samkv bench` results: per method setting, the means and medians of
//! results.jsonl as a table (summary.md / summary.json), and the sweep report: F1 and agreement
//! against KV kept and against time to first token, one series per method.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::qa::{BenchArgs, Ingest, Record};
use super::sweep::MethodSpec;
use crate::eval::metrics::median;
use crate::eval::plot::{line_plot, markdown_table, Series};
use crate::methods::Stats;
use crate::Result;

/// The aggregate of one method setting over the examples of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MethodSummary {
    pub method: String,
    /// The method's base name (recompute, reuse, cacheblend, ...).
    pub method_name: String,
    /// Examples with a result.
    pub examples: usize,
    pub errors: usize,
    /// Means over examples, as fractions (tables show x100).
    pub f1: Option<f64>,
    pub em: Option<f64>,
    pub agreement: Option<f64>,
    pub same_tokens: Option<f64>,
    pub kl_mean: Option<f64>,
    pub kl_median: Option<f64>,
    pub ttft_ms_median: Option<f64>,
    pub ttft_ms_mean: Option<f64>,
    pub load_ms_median: Option<f64>,
    pub reposition_ms_median: Option<f64>,
    pub select_ms_median: Option<f64>,
    pub recompute_ms_median: Option<f64>,
    /// Median of Recompute's ttft over the median of this method's, same examples.
    pub ttft_speedup: Option<f64>,
    pub decode_tok_s_median: Option<f64>,
    pub kept_fraction: Option<f64>,
    pub kv_tokens_kept: Option<f64>,
    pub kv_bytes_kept: Option<f64>,
    pub recomputed_tokens: Option<f64>,
    pub context_tokens: Option<f64>,
    pub peak_rss_bytes: u64,
}

impl super::Row for MethodSummary {
    fn columns() -> &'static [&'static str] {
        &[
            "method",
            "n",
            "F1",
            "EM %",
            "agree %",
            "mean KL",
            "median ttft ms",
            "ttft speedup",
            "median decode tok/s",
            "KV kept %",
            "recomputed tokens",
            "KV MiB",
            "peak RSS MiB",
        ]
    }
    fn cells(&self) -> Vec<String> {
        let fmt = |v: Option<f64>, scale: f64, digits: usize| match v {
            Some(v) if v.is_finite() => format!("{:.*}", digits, v * scale),
            Some(v) => format!("{v}"),
            None => "-".into(),
        };
        vec![
            self.method.clone(),
            format!("{}/{}", self.examples, self.examples + self.errors),
            fmt(self.f1, 100.0, 2),
            fmt(self.em, 100.0, 1),
            fmt(self.agreement, 100.0, 1),
            fmt(self.kl_mean, 1.0, 4),
            fmt(self.ttft_ms_median, 1.0, 1),
            fmt(self.ttft_speedup, 1.0, 2),
            fmt(self.decode_tok_s_median, 1.0, 1),
            fmt(self.kept_fraction, 100.0, 1),
            fmt(self.recomputed_tokens, 1.0, 1),
            fmt(self.kv_bytes_kept, 1.0 / (1 << 20) as f64, 1),
            format!("{:.0}", self.peak_rss_bytes as f64 / (1 << 20) as f64),
        ]
    }
}

/// What `run` leaves behind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub examples: usize,
    pub agreement_rule: String,
    pub ingest_ms_mean: Option<f64>,
    pub docs_computed: usize,
    pub methods: Vec<MethodSummary>,
}

pub const AGREEMENT_RULE: &str =
    "answer equals Recompute's after LongBench normalize_answer (lowercase, no punctuation, no articles, whitespace collapsed)";

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Aggregates the records of each method setting, in the order of `specs`.
pub fn summarize(records: &[Record], specs: &[MethodSpec], examples: usize) -> Summary {
    let mut methods = Vec::new();
    for spec in specs {
        let mine: Vec<&Record> = records.iter().filter(|r| r.method == spec.label).collect();
        let ok: Vec<&Record> = mine.iter().copied().filter(|r| r.error.is_none()).collect();
        let f = |g: &dyn Fn(&Record) -> f64| ok.iter().map(|r| g(r)).collect::<Vec<f64>>();
        let st = |g: &dyn Fn(&Stats) -> f64| {
            ok.iter()
                .filter_map(|r| r.stats.as_ref().map(g))
                .collect::<Vec<f64>>()
        };
        let kls: Vec<f64> = ok.iter().filter_map(|r| r.kl).collect();
        let ttft = median(&st(&|s| s.ttft_ms));
        let ref_ttft = median(&f(&|r| r.reference_ttft_ms));
        methods.push(MethodSummary {
            method: spec.label.clone(),
            method_name: spec.config.name().to_string(),
            examples: ok.len(),
            errors: mine.len() - ok.len(),
            f1: mean(&f(&|r| r.f1)),
            em: mean(&f(&|r| r.em as u8 as f64)),
            agreement: mean(&f(&|r| r.agree as u8 as f64)),
            same_tokens: mean(&f(&|r| r.same_tokens as u8 as f64)),
            kl_mean: mean(&kls),
            kl_median: median(&kls),
            ttft_ms_median: ttft,
            ttft_ms_mean: mean(&st(&|s| s.ttft_ms)),
            load_ms_median: median(&st(&|s| s.load_ms)),
            reposition_ms_median: median(&st(&|s| s.reposition_ms)),
            select_ms_median: median(&st(&|s| s.select_ms)),
            recompute_ms_median: median(&st(&|s| s.recompute_ms)),
            ttft_speedup: match (ref_ttft, ttft) {
                (Some(r), Some(t)) if t > 0.0 => Some(r / t),
                _ => None,
            },
            decode_tok_s_median: median(&f(&|r| r.decode_tok_s)),
            kept_fraction: mean(&st(&|s| s.kept_fraction)),
            kv_tokens_kept: mean(&st(&|s| s.kv_tokens_kept)),
            kv_bytes_kept: mean(&st(&|s| s.kv_bytes_kept as f64)),
            recomputed_tokens: mean(&st(&|s| s.recomputed_tokens)),
            context_tokens: mean(&st(&|s| s.context_tokens as f64)),
            peak_rss_bytes: ok.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0),
        });
    }
    // Ingestion is per example: take it once from each example's lines.
    let mut seen = HashSet::new();
    let ingests: Vec<&Ingest> = records
        .iter()
        .filter(|r| r.error.is_none() && seen.insert(r.example.clone()))
        .map(|r| &r.ingest)
        .collect();
    Summary {
        examples,
        agreement_rule: AGREEMENT_RULE.into(),
        ingest_ms_mean: mean(&ingests.iter().map(|i| i.ms).collect::<Vec<_>>()),
        docs_computed: ingests.iter().map(|i| i.docs_computed).sum(),
        methods,
    }
}

/// The summary as Markdown: a table with a line per method setting and notes on the columns.
pub fn summary_markdown(s: &Summary, args: &BenchArgs) -> String {
    let table = super::table(&s.methods);
    format!(
        "# Benchmark: {data}\n\n{n} examples, at most {mt} new tokens, greedy, LongBench prompt{trunc}.\n\
         Ingestion (documents into the store, before any method): mean {ing} ms per example, \
         {dc} documents computed.\n\n{table}\n\
         F1: LongBench qa_f1 x100, max over gold answers, mean over examples. EM: normalized \
         answer equals a gold. agree: {rule}. KL: of the first token's distribution from \
         Recompute's, nats. ttft: store load + assembly + question prefill (Recompute: full \
         prefill, no load); speedup = median Recompute ttft / median ttft. KV kept: mean over \
         layers of context rows kept, as % of context tokens; recomputed: context rows \
         recomputed, mean over layers. KV MiB: mean bytes of K and V held for decoding. Peak \
         RSS: VmHWM, process-wide and monotone over the run.\n",
        data = args.data.display(),
        n = s.examples,
        mt = args.max_tokens,
        trunc = args
            .max_doc_tokens
            .map(|n| format!(", documents cut to {n} tokens"))
            .unwrap_or_default(),
        ing = super::num(s.ingest_ms_mean, 0),
        dc = s.docs_computed,
        rule = s.agreement_rule,
    )
}

/// Writes the sweep report into `out`: four SVG plots (F1 and agreement against the KV kept
/// and against the median time to first token, one series per method) and `sweep.md`.
/// Returns the Markdown.
pub fn write_sweep_report(out: &Path, summaries: &[MethodSummary]) -> Result<String> {
    let mut by_method: BTreeMap<&str, Vec<&MethodSummary>> = BTreeMap::new();
    for s in summaries.iter().filter(|s| s.examples > 0) {
        by_method.entry(s.method_name.as_str()).or_default().push(s);
    }
    let series = |x: fn(&MethodSummary) -> Option<f64>, y: fn(&MethodSummary) -> Option<f64>| {
        by_method
            .iter()
            .map(|(name, v)| Series {
                name: name.to_string(),
                points: v
                    .iter()
                    .filter_map(|s| Some((x(s)?, y(s)?)))
                    .filter(|(a, b)| a.is_finite() && b.is_finite())
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect::<Vec<_>>()
    };
    let kept = |s: &MethodSummary| Some(100.0 * s.kept_fraction?);
    let ttft = |s: &MethodSummary| s.ttft_ms_median;
    let f1 = |s: &MethodSummary| Some(100.0 * s.f1?);
    let agree = |s: &MethodSummary| Some(100.0 * s.agreement?);
    let plots = [
        (
            "f1_vs_kept.svg",
            "F1 vs KV kept",
            "KV kept (% of context tokens)",
            "F1 (x100)",
            kept as fn(&_) -> _,
            f1 as fn(&_) -> _,
        ),
        (
            "agreement_vs_kept.svg",
            "Agreement with Recompute vs KV kept",
            "KV kept (% of context tokens)",
            "agreement (%)",
            kept,
            agree,
        ),
        (
            "f1_vs_ttft.svg",
            "F1 vs time to first token",
            "median time to first token (ms)",
            "F1 (x100)",
            ttft,
            f1,
        ),
        (
            "agreement_vs_ttft.svg",
            "Agreement with Recompute vs time to first token",
            "median time to first token (ms)",
            "agreement (%)",
            ttft,
            agree,
        ),
    ];
    let mut md = String::from("# Budget sweep\n\n");
    for (file, title, xl, yl, x, y) in plots {
        let s = series(x, y);
        if s.is_empty() {
            md.push_str(&format!("- {file}: not drawn (no successful results)\n"));
            continue;
        }
        line_plot(&out.join(file), title, xl, yl, &s)?;
        md.push_str(&format!("- [{title}]({file})\n"));
    }
    let fmt = |v: Option<f64>, scale: f64, digits: usize| match v {
        Some(v) if v.is_finite() => format!("{:.*}", digits, v * scale),
        Some(v) => format!("{v}"),
        None => "-".into(),
    };
    let rows: Vec<Vec<String>> = by_method
        .values()
        .flatten()
        .map(|s| {
            vec![
                s.method_name.clone(),
                s.method.clone(),
                s.examples.to_string(),
                fmt(s.kept_fraction, 100.0, 1),
                fmt(s.recomputed_tokens, 1.0, 1),
                fmt(s.ttft_ms_median, 1.0, 1),
                fmt(s.f1, 100.0, 2),
                fmt(s.agreement, 100.0, 1),
                fmt(s.kl_mean, 1.0, 4),
            ]
        })
        .collect();
    md.push('\n');
    md.push_str(&markdown_table(
        &[
            "method",
            "setting",
            "n",
            "KV kept %",
            "recomputed tokens",
            "median ttft ms",
            "F1",
            "agreement %",
            "mean KL",
        ],
        &rows,
    ));
    std::fs::write(out.join("sweep.md"), &md)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ex: &str, method: &str, f1: f64, agree: bool, kl: f64, ttft: f64) -> Record {
        Record {
            example: ex.into(),
            method: method.into(),
            f1,
            agree,
            kl: Some(kl),
            reference_ttft_ms: 100.0,
            stats: Some(Stats {
                ttft_ms: ttft,
                kept_fraction: 0.5,
                ..Stats::default()
            }),
            ingest: Ingest {
                ms: 10.0,
                docs_computed: 3,
                ..Ingest::default()
            },
            ..Record::default()
        }
    }

    #[test]
    fn summarize_means_medians_errors_and_speedup() {
        let spec = MethodSpec {
            label: "reuse".into(),
            config: crate::methods::MethodSettings::Reuse,
        };
        let records = vec![
            rec("0", "reuse", 1.0, true, 0.1, 10.0),
            rec("1", "reuse", 0.0, false, 0.3, 30.0),
            rec("2", "reuse", 0.5, true, 0.2, 20.0),
            Record {
                example: "3".into(),
                method: "reuse".into(),
                error: Some("x".into()),
                ..Record::default()
            },
            rec("0", "other", 0.0, false, 9.0, 1.0),
        ];
        let s = summarize(&records, &[spec], 4);
        let m = &s.methods[0];
        assert_eq!((m.examples, m.errors), (3, 1));
        assert_eq!(m.f1, Some(0.5));
        assert_eq!(m.agreement, Some(2.0 / 3.0));
        assert!((m.kl_mean.unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(m.ttft_ms_median, Some(20.0));
        assert_eq!(m.ttft_speedup, Some(5.0));
        assert_eq!(m.kept_fraction, Some(0.5));
        // Ingestion counted once per example (0, 1, 2), not per line.
        assert_eq!(s.docs_computed, 9);
        assert_eq!(s.ingest_ms_mean, Some(10.0));
    }
}
