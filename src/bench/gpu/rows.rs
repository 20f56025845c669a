//! What `samkv bench-gpu` measures, as serializable rows: the JSON report is these structs,
//! and each table is [`crate::bench::table`] of them.

use serde::Serialize;

use crate::bench::{num, Row};
use crate::methods::Stats;
use crate::model::Config;

const MIB: f64 = (1u64 << 20) as f64;

/// The whole run, as `--out` writes it (rewritten after each document length).
#[derive(Serialize)]
pub struct Report {
    pub label: &'static str,
    pub shape: String,
    pub config: Config,
    pub device: String,
    pub dtype: String,
    pub store_dtype: String,
    pub seed: u64,
    pub reps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_init_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<Vec<AttentionRow>>,
    pub runs: Vec<LengthRun>,
    /// Peak device memory in use, sampled after each phase (None off CUDA).
    pub peak_mem_gib_sampled: Option<f64>,
}

/// Attention alone at one request length.
#[derive(Serialize)]
pub struct AttentionRow {
    pub tokens: usize,
    pub attend_ms: f64,
    pub tflops: f64,
    pub mma_sync_ms: Option<f64>,
    pub wgmma_ms: Option<f64>,
    pub ops_ms: Option<f64>,
}

impl Row for AttentionRow {
    fn columns() -> &'static [&'static str] {
        &[
            "tokens",
            "attend ms",
            "TFLOP/s",
            "mma.sync ms",
            "wgmma ms",
            "candle ops ms",
            "ops / attend",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.tokens.to_string(),
            format!("{:.2}", self.attend_ms),
            format!("{:.0}", self.tflops),
            num(self.mma_sync_ms, 2),
            num(self.wgmma_ms, 2),
            num(self.ops_ms, 2),
            self.ops_ms
                .map_or("-".into(), |o| format!("{:.1}x", o / self.attend_ms)),
        ]
    }
}

/// One document length: ingestion, every method's time to first token, decoding.
#[derive(Serialize)]
pub struct LengthRun {
    pub doc_len: usize,
    /// Why this length did not run to the end (the rows hold what did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub docs: usize,
    pub preamble_tokens: usize,
    pub question_tokens: usize,
    pub total_tokens: usize,
    pub ingest_ms_per_doc_median: Option<f64>,
    pub ingest_ms_all: Vec<f64>,
    pub stored_bytes_per_doc: usize,
    pub methods: Vec<MethodRow>,
    pub decode: Vec<DecodeRow>,
    pub mem_used_gib_after: Option<f64>,
}

impl LengthRun {
    pub fn failed(doc_len: usize, error: String) -> LengthRun {
        LengthRun {
            doc_len,
            error: Some(error),
            docs: 0,
            preamble_tokens: 0,
            question_tokens: 0,
            total_tokens: 0,
            ingest_ms_per_doc_median: None,
            ingest_ms_all: Vec::new(),
            stored_bytes_per_doc: 0,
            methods: Vec::new(),
            decode: Vec::new(),
            mem_used_gib_after: None,
        }
    }
}

/// One method spec's time to first token (or why it has none).
#[derive(Serialize)]
pub struct MethodRow {
    pub spec: String,
    /// The method's name with its knobs; None when the spec did not build.
    pub name: Option<String>,
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub timing: Option<MethodTiming>,
}

#[derive(Serialize)]
pub struct MethodTiming {
    pub ttft_ms_median: f64,
    pub ttft_ms_all: Vec<f64>,
    pub load_ms_median: f64,
    pub reposition_ms_median: f64,
    pub select_ms_median: f64,
    pub recompute_ms_median: f64,
    /// The first timed run's stats (sizes are the same in every run).
    pub stats: Stats,
}

impl Row for MethodRow {
    fn columns() -> &'static [&'static str] {
        &[
            "method",
            "TTFT ms",
            "load",
            "re-position",
            "select",
            "recompute",
            "tokens recomputed",
            "KV tokens kept",
            "kept %",
            "KV MiB",
        ]
    }
    fn cells(&self) -> Vec<String> {
        let name = self.name.clone().unwrap_or_else(|| self.spec.clone());
        let Some(t) = &self.timing else {
            let why = match (&self.error, self.available) {
                (Some(e), true) => format!("failed: {e}"),
                _ => "not available".into(),
            };
            return vec![name, why];
        };
        let st = &t.stats;
        vec![
            name,
            format!("{:.1}", t.ttft_ms_median),
            format!("{:.1}", t.load_ms_median),
            format!("{:.1}", t.reposition_ms_median),
            format!("{:.1}", t.select_ms_median),
            format!("{:.1}", t.recompute_ms_median),
            format!("{:.0}", st.recomputed_tokens),
            format!("{:.0} / {}", st.kv_tokens_kept, st.context_tokens),
            format!("{:.1}", 100.0 * st.kept_fraction),
            format!("{:.1}", st.kv_bytes_kept as f64 / MIB),
        ]
    }
}

/// Decoding over one method's KV: batch 1, then growing batches.
#[derive(Serialize)]
pub struct DecodeRow {
    /// Which KV: "full KV" (Recompute's cache) or "SamKV KV".
    pub kv: String,
    pub method: String,
    pub kv_tokens: usize,
    pub kv_bytes: usize,
    pub step_ms_batch1_median: f64,
    pub step_ms_batch1_all: Vec<f64>,
    pub batches: Vec<BatchRow>,
}

impl DecodeRow {
    /// The batch with the most tokens per second.
    fn best(&self) -> Option<&BatchRow> {
        self.batches
            .iter()
            .filter(|b| b.tok_s.is_some())
            .max_by(|x, y| x.tok_s.unwrap_or(0.0).total_cmp(&y.tok_s.unwrap_or(0.0)))
    }
}

impl Row for DecodeRow {
    fn columns() -> &'static [&'static str] {
        &[
            "decode over",
            "KV tokens",
            "KV MiB",
            "step ms (batch 1)",
            "tok/s (batch 1)",
            "best batch",
            "tok/s (best batch)",
        ]
    }
    fn cells(&self) -> Vec<String> {
        let one = self.step_ms_batch1_median;
        let best = self.best();
        vec![
            self.kv.clone(),
            self.kv_tokens.to_string(),
            format!("{:.1}", self.kv_bytes as f64 / MIB),
            format!("{one:.2}"),
            format!("{:.1}", 1e3 / one),
            best.map_or("-".into(), |b| b.batch.to_string()),
            num(best.and_then(|b| b.tok_s), 0),
        ]
    }
}

/// One batch size of `decode_batch` steps, or why it was not run.
#[derive(Serialize)]
pub struct BatchRow {
    /// The KV it decodes over (the table's first column; the JSON has it from its parent).
    #[serde(skip)]
    pub kv: String,
    pub batch: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_ms_median: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tok_s: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub step_ms_all: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_used_gib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl BatchRow {
    pub fn not_run(kv: &str, batch: usize) -> BatchRow {
        BatchRow {
            kv: kv.into(),
            batch,
            step_ms_median: None,
            tok_s: None,
            step_ms_all: Vec::new(),
            mem_used_gib: None,
            skipped: None,
            failed: None,
        }
    }
}

impl Row for BatchRow {
    fn columns() -> &'static [&'static str] {
        &[
            "decode over",
            "batch",
            "step ms",
            "tok/s",
            "device GiB in use",
            "note",
        ]
    }
    fn cells(&self) -> Vec<String> {
        let note = match (&self.skipped, &self.failed) {
            (Some(s), _) => format!("skipped: {s}"),
            (_, Some(f)) => format!("failed: {f}"),
            _ => String::new(),
        };
        let blank = |x: Option<f64>, p| x.map_or(String::new(), |x| format!("{x:.p$}"));
        vec![
            self.kv.clone(),
            self.batch.to_string(),
            blank(self.step_ms_median, 1),
            blank(self.tok_s, 0),
            blank(self.mem_used_gib, 1),
            note,
        ]
    }
}
