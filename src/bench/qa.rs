//! `samkv bench`: quality, fidelity and cost of every method on a multi-document QA file.
//!
//! Per example: the LongBench prompt is tokenized (chat template as the engine is set up) and
//! every document is prepared once (loaded from the store or computed and stored): that is
//! the *ingestion*, reported on its own. Then Recompute runs as the reference (always, listed
//! or not), then every listed method, each loading the documents from the store afresh, so
//! every method's time to first token counts the same work: store load + assembly + question
//! prefill + reading the first-token logits (Recompute reads no stored KV, so none is charged
//! to it). Answers are decoded greedily.
//!
//! Metrics per (example, method) go to `OUT/results.jsonl` as they come, one flushed line
//! each; a rerun skips the pairs already there, so a killed run resumes. `OUT/config.json`
//! holds the settings; a resume with other settings is refused. At the end `OUT/summary.md`
//! and `OUT/summary.json` (and with `--sweep`, the plots of [`super::report`]).
//!
//! Agreement is equality of the LongBench-normalized answers ([`normalize_answer`]) with
//! Recompute's; `same_tokens` in each line is the stricter equality of the generated ids.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use super::report::{summarize, summary_markdown, MethodSummary, Summary};
use super::report::{write_sweep_report, AGREEMENT_RULE};
use super::sweep::{expand, MethodSpec};
use crate::engine::{generate, Engine, FinishReason, Prepared, Prompt, Sampling, Tokenized};
use crate::eval::metrics::{best_f1, exact_match, kl_divergence, normalize_answer};
use crate::eval::{load_examples, longbench_prompt, Example};
use crate::methods::{Context, Method, MethodConfig, MethodSettings, Recompute, Stats};
use crate::{Error, Result};

#[derive(clap::Args, Clone, Debug)]
// `--methods` names the methods; the flattened knobs' own `--method` would be ignored.
#[command(mut_arg("method", |a| a.hide(true)))]
pub struct BenchArgs {
    /// QA data file (CacheBlend, LongBench, HotpotQA/2Wiki or MuSiQue format).
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated method settings, `name[:key=value...]`, e.g.
    /// `recompute,reuse,cacheblend:ratio=0.3,samkv:selection=global:keep=0.1`.
    #[arg(long, default_value = "recompute,reuse,cacheblend,epic,infllm,samkv")]
    pub methods: String,
    /// Only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only shard I of N (`I/N`, 0-based): the examples whose index is I modulo N, so N
    /// processes sharing a device split one data file. Each shard writes its own --out; their
    /// results.jsonl files concatenated in one directory resume as one run.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Output directory (results.jsonl, config.json, summary.md/json, sweep plots).
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// New tokens per answer (METHODS.md: 32).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Cut every document to its first N tokens (for quick runs).
    #[arg(long)]
    pub max_doc_tokens: Option<usize>,
    /// Run each bare method name over its budget grid and plot F1 and agreement against KV
    /// kept and time to first token.
    #[arg(long)]
    pub sweep: bool,
    /// Replace a method's sweep grid: `name:key=v1,v2[:key2=w1,w2]` (repeatable).
    #[arg(long)]
    pub grid: Vec<String>,
    /// Knobs for every method (a spec's `key=value` overrides them).
    #[command(flatten, next_help_heading = "Method knobs (all methods)")]
    pub knobs: MethodConfig,
}

impl BenchArgs {
    /// The method settings to run, each checked by building it.
    pub fn plan(&self) -> Result<Vec<MethodSpec>> {
        if self.max_tokens == 0 {
            return Err(Error::InvalidInput(
                "--max-tokens must be at least 1".into(),
            ));
        }
        if self.max_doc_tokens == Some(0) {
            return Err(Error::InvalidInput(
                "--max-doc-tokens must be at least 1".into(),
            ));
        }
        if self.knobs.method != MethodConfig::default().method {
            return Err(Error::InvalidInput(
                "`samkv bench` takes its methods from --methods, not --method".into(),
            ));
        }
        let specs = expand(&self.methods, self.sweep, &self.grid, &self.knobs)?;
        for s in &specs {
            s.config.build().map_err(|e| match e {
                Error::InvalidInput(m) => Error::InvalidInput(format!("`{}`: {m}", s.label)),
                other => other,
            })?;
        }
        Ok(specs)
    }
}

/// Where one document set came from before the methods ran.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ingest {
    pub ms: f64,
    pub docs: usize,
    /// Documents computed (not found in the store).
    pub docs_computed: usize,
    pub context_tokens: usize,
}

/// One line of results.jsonl.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// The example's id in the data file.
    pub example: String,
    /// Its 0-based position in the file.
    pub index: usize,
    /// The method's label (its spec).
    pub method: String,
    /// `Method::name()`, with its settings.
    pub method_name: String,
    pub answer: String,
    pub reference_answer: String,
    pub golds: Vec<String>,
    pub f1: f64,
    pub em: bool,
    /// Normalized answer equal to Recompute's.
    pub agree: bool,
    /// Generated token ids equal to Recompute's.
    pub same_tokens: bool,
    /// KL(Recompute || method) of the first token, nats; null when not finite.
    pub kl: Option<f64>,
    pub new_tokens: usize,
    pub finish: Option<FinishReason>,
    pub decode_ms: f64,
    pub decode_tok_s: f64,
    /// Recompute's time to first token on the same example.
    pub reference_ttft_ms: f64,
    /// Documents the method's own preparation had to compute (0 when the store held all).
    pub docs_computed: usize,
    pub stats: Option<Stats>,
    pub ingest: Ingest,
    /// VmHWM of the process after this method: process-wide and never decreasing.
    pub peak_rss_bytes: u64,
    pub error: Option<String>,
}

/// `I/N` with I < N.
fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("`{s}` is not a shard I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Settings a resumed run must share with the run that started the directory.
fn settings(
    engine: &Engine,
    args: &BenchArgs,
    specs: &[MethodSpec],
    extra: &[(&str, String)],
) -> Result<Value> {
    let bytes = std::fs::read(&args.data)?;
    let mut methods = serde_json::Map::new();
    for s in specs {
        methods.insert(s.label.clone(), s.config_json()?);
    }
    let extra: BTreeMap<&str, &String> = extra.iter().map(|(k, v)| (*k, v)).collect();
    Ok(serde_json::json!({
        "samkv_version": env!("CARGO_PKG_VERSION"),
        "data": args.data.display().to_string(),
        "data_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        "model_fingerprint": engine.model.fingerprint,
        "tokenizer_fingerprint": engine.tokenizer.fingerprint(),
        "cli": extra,
        "dtype": format!("{:?}", engine.model.dtype()),
        "store_dtype": format!("{:?}", engine.store_dtype),
        "device": format!("{:?}", engine.model.device().location()),
        "chat": engine.chat,
        "prompt": "longbench",
        "decoding": "greedy",
        "max_tokens": args.max_tokens,
        "max_doc_tokens": args.max_doc_tokens,
        "agreement": AGREEMENT_RULE,
        "methods": methods,
    }))
}

/// Keys of the settings that are informational only (a resume may change them).
const FREE_KEYS: &[&str] = &["data", "methods", "cli"];

/// Checks a resume against the directory's config.json and returns the merged settings
/// (methods not run before may be added; a label whose knobs changed is refused).
fn check_resume(old: &Value, new: &Value, path: &Path) -> Result<Value> {
    let refuse = |what: String| {
        Err(Error::InvalidInput(format!(
            "{} was written by a run with other settings ({what}); use another --out \
             directory, or remove it to start over",
            path.display()
        )))
    };
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return refuse("it is not a JSON object".into());
    };
    let mut differ = Vec::new();
    for key in o
        .keys()
        .chain(n.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if !FREE_KEYS.contains(&key.as_str()) && o.get(key) != n.get(key) {
            differ.push(format!(
                "{key}: {} then, {} now",
                o.get(key).unwrap_or(&Value::Null),
                n.get(key).unwrap_or(&Value::Null)
            ));
        }
    }
    if o.get("cli").and_then(|c| c.get("weights")) != n.get("cli").and_then(|c| c.get("weights")) {
        differ.push("cli.weights".into());
    }
    let empty = serde_json::Map::new();
    let om = o
        .get("methods")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let nm = n
        .get("methods")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (label, cfg) in nm {
        if let Some(before) = om.get(label) {
            differ.extend(knob_changes(label, before, cfg));
        }
    }
    if !differ.is_empty() {
        return refuse(differ.join("; "));
    }
    let mut merged = new.clone();
    let mut methods = om.clone();
    methods.extend(nm.clone());
    merged["methods"] = Value::Object(methods);
    Ok(merged)
}

/// The knobs of `label` whose values differ between two runs. A knob only one side has (one
/// added to or removed from this build since) is not a change of setting: it is logged.
fn knob_changes(label: &str, before: &Value, now: &Value) -> Vec<String> {
    let (Some(b), Some(n)) = (before.as_object(), now.as_object()) else {
        return (before != now)
            .then(|| format!("the knobs of `{label}`"))
            .into_iter()
            .collect();
    };
    let mut out = Vec::new();
    for (k, v) in n {
        match b.get(k) {
            Some(old) if old != v => out.push(format!("`{label}` {k}: {old} then, {v} now")),
            Some(_) => {}
            None => tracing::warn!("`{label}`: knob {k} is new in this build"),
        }
    }
    for k in b.keys().filter(|k| !n.contains_key(*k)) {
        tracing::warn!("`{label}`: knob {k} is gone from this build");
    }
    out
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads results.jsonl. A torn last line (a killed write) and error lines are dropped, and
/// the file rewritten without them, so those pairs run again; any other bad line is an error.
pub fn read_results(path: &Path) -> Result<Vec<Record>> {
    let Some(text) = read_text(path)? else {
        return Ok(Vec::new());
    };
    let (out, dropped) = parse_results(path, &text)?;
    if dropped > 0 || (!text.is_empty() && !text.ends_with('\n')) {
        let mut s = String::new();
        for r in &out {
            s.push_str(&to_line(r)?);
        }
        write_atomic(path, &s)?;
    }
    Ok(out)
}

/// The records of results.jsonl as [`read_results`] keeps them, without rewriting the file
/// (for reports over runs that may still be written to, or are read-only copies).
pub fn peek_results(path: &Path) -> Result<Vec<Record>> {
    match read_text(path)? {
        Some(text) => Ok(parse_results(path, &text)?.0),
        None => Ok(Vec::new()),
    }
}

fn read_text(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The good records of results.jsonl's text and how many lines were dropped (error lines and
/// a torn last line); any other bad line is an error.
fn parse_results(path: &Path, text: &str) -> Result<(Vec<Record>, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut dropped = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) if r.error.is_some() => dropped += 1,
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() => {
                tracing::warn!("{}: dropping a torn last line", path.display());
                dropped += 1;
            }
            Err(e) => {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: format!("not a bench result line ({e}); was the file edited?"),
                })
            }
        }
    }
    Ok((out, dropped))
}

fn to_line(r: &Record) -> Result<String> {
    let mut s = serde_json::to_string(r)
        .map_err(|e| Error::InvalidInput(format!("cannot serialize a result: {e}")))?;
    s.push('\n');
    Ok(s)
}

/// VmHWM (peak resident set) of this process in bytes; 0 where /proc is not available.
pub fn peak_rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Cuts every document of `ex` to its first `n` tokens.
fn truncate_docs(engine: &Engine, ex: &Example, n: usize) -> Result<Example> {
    let mut ex = ex.clone();
    for d in &mut ex.documents {
        let ids = engine.tokenizer.encode(&d.text)?;
        if ids.len() > n {
            d.text = engine.tokenizer.decode(&ids[..n])?;
        }
    }
    Ok(ex)
}

/// One method's run on one example.
struct Outcome {
    name: String,
    tokens: Vec<u32>,
    text: String,
    finish: FinishReason,
    decode_ms: f64,
    decode_tok_s: f64,
    logits: Vec<f32>,
    stats: Stats,
    docs_computed: usize,
}

/// Assembles with `method` and decodes. `given` is an already prepared context whose cost is
/// not charged (Recompute's); otherwise the documents are loaded from the store here and that
/// time is part of the time to first token.
fn run_method(
    engine: &Engine,
    method: &dyn Method,
    t: &Tokenized,
    given: Option<&Prepared>,
    sampling: &Sampling,
) -> Result<Outcome> {
    let t0 = Instant::now();
    let owned;
    let p = match given {
        Some(p) => p,
        None => {
            owned = engine.prepare(t)?;
            &owned
        }
    };
    let prepare_ms = if given.is_some() {
        0.0
    } else {
        t0.elapsed().as_secs_f64() * 1e3
    };
    let t1 = Instant::now();
    let mut a = engine.assemble_prepared(p, method)?;
    // Reading the logits waits for an accelerator to finish, and sampling needs them.
    let logits: Vec<f32> = a.logits.to_vec1()?;
    let assemble_ms = t1.elapsed().as_secs_f64() * 1e3;
    if given.is_some() {
        // A given context's loading was not this method's cost.
        a.stats.load_ms -= p.load_ms;
    }
    a.stats.ttft_ms = prepare_ms + assemble_ms;
    let g = generate(
        &engine.model,
        &engine.tokenizer,
        &mut a.cache,
        &a.logits,
        sampling,
        &mut |_| true,
    )?;
    Ok(Outcome {
        name: method.name(),
        decode_tok_s: g.decode_tok_s(),
        tokens: g.tokens,
        text: g.text,
        finish: g.finish,
        decode_ms: g.decode_ms,
        logits,
        stats: a.stats,
        docs_computed: if given.is_some() {
            0
        } else {
            p.documents_computed()
        },
    })
}

/// Runs the first call of every kernel once, outside any timing, on a question-only prompt.
fn warm_up(engine: &Engine) -> Result<()> {
    let question = engine.tokenizer.encode("Warm-up: what is two plus two?")?;
    let ctx = Context {
        model: &engine.model,
        segments: Vec::new(),
        question,
    };
    let mut a = Recompute.assemble(&ctx)?;
    let sampling = Sampling {
        max_new_tokens: 2,
        ..Sampling::default()
    };
    generate(
        &engine.model,
        &engine.tokenizer,
        &mut a.cache,
        &a.logits,
        &sampling,
        &mut |_| true,
    )?;
    Ok(())
}

/// Runs the benchmark into `args.out` and writes the summary (and sweep report). `extra` are
/// command-line settings the engine does not hold (model name, weight mode), kept in
/// config.json.
pub fn run(
    engine: &Engine,
    args: &BenchArgs,
    specs: &[MethodSpec],
    extra: &[(&str, String)],
) -> Result<Summary> {
    let examples = load_examples(&args.data)?;
    let selected: Vec<(usize, &Example)> = examples
        .iter()
        .enumerate()
        .take(args.limit.unwrap_or(usize::MAX))
        .filter(|(i, _)| args.shard.is_none_or(|(k, n)| i % n == k))
        .collect();
    let mut ids = HashSet::new();
    if let Some((_, dup)) = selected.iter().find(|(_, e)| !ids.insert(e.id.as_str())) {
        return Err(Error::InvalidInput(format!(
            "{}: example id `{}` occurs twice; results are keyed by id",
            args.data.display(),
            dup.id
        )));
    }
    std::fs::create_dir_all(&args.out)?;
    let config_path = args.out.join("config.json");
    let mut config = settings(engine, args, specs, extra)?;
    if config_path.exists() {
        let old: Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path)?).map_err(|e| {
                Error::Data {
                    path: config_path.clone(),
                    line: e.line(),
                    msg: format!("invalid JSON ({e}); remove the directory to start over"),
                }
            })?;
        config = check_resume(&old, &config, &config_path)?;
    }
    let pretty = serde_json::to_string_pretty(&config).unwrap_or_default();
    write_atomic(&config_path, &pretty)?;

    let results_path = args.out.join("results.jsonl");
    let done_records = read_results(&results_path)?;
    let mut done: HashSet<(String, String)> = done_records
        .iter()
        .map(|r| (r.example.clone(), r.method.clone()))
        .collect();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&results_path)?;
    let methods: Vec<(&MethodSpec, Box<dyn Method>)> = specs
        .iter()
        .map(|s| Ok((s, s.config.build()?)))
        .collect::<Result<_>>()?;
    let sampling = Sampling {
        max_new_tokens: args.max_tokens,
        ..Sampling::default()
    };

    let todo = |id: &str, done: &HashSet<(String, String)>| {
        specs
            .iter()
            .filter(|s| !done.contains(&(id.to_string(), s.label.clone())))
            .count()
    };
    let already = selected
        .iter()
        .filter(|(_, e)| todo(&e.id, &done) == 0)
        .count();
    let bar = indicatif::ProgressBar::new(selected.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} examples  {per_sec}  eta {eta}  {msg}",
        )
        .map_err(|e| Error::InvalidInput(format!("progress bar template: {e}")))?,
    );
    bar.set_position(already as u64);
    bar.reset_eta();
    if already < selected.len() {
        warm_up(engine)?;
    }

    for (index, ex) in &selected {
        if todo(&ex.id, &done) == 0 {
            continue;
        }
        let mut written = Vec::new();
        let mut emit = |r: Record| -> Result<()> {
            file.write_all(to_line(&r)?.as_bytes())?;
            file.flush()?;
            if let Some(e) = &r.error {
                // A warning, not bar.println: the bar is hidden when stderr is not a
                // terminal, and the final read drops error lines, so this is the only trace.
                bar.suspend(|| tracing::warn!("example {} {}: {e}", r.example, r.method));
            }
            bar.set_message(format!("{} F1 {:.2}", r.method, r.f1));
            written.push((r.example, r.method));
            Ok(())
        };
        bench_example(
            engine, args, *index, ex, &methods, &done, &sampling, &mut emit,
        )?;
        done.extend(written);
        bar.inc(1);
    }
    bar.finish_and_clear();
    drop(file);

    let records = read_results(&results_path)?;
    let wanted: HashSet<&str> = selected.iter().map(|(_, e)| e.id.as_str()).collect();
    let records: Vec<Record> = records
        .into_iter()
        .filter(|r| wanted.contains(r.example.as_str()))
        .collect();
    let summary = summarize(&records, specs, selected.len());
    let mut md = summary_markdown(&summary, args);
    if args.sweep {
        md.push('\n');
        md.push_str(&write_sweep_report(&args.out, &summary.methods)?);
    }
    write_atomic(&args.out.join("summary.md"), &md)?;
    let json = serde_json::to_string_pretty(&summary)
        .map_err(|e| Error::InvalidInput(format!("cannot serialize the summary: {e}")))?;
    write_atomic(&args.out.join("summary.json"), &json)?;
    Ok(summary)
}

/// Runs `f`, turning a panic into an error, so that one example that trips a bug becomes an
/// error line (with the panic's message; RUST_BACKTRACE=1 prints where) instead of ending a
/// run of hundreds.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        Err(crate::Error::Internal(format!("panicked: {msg}")))
    })
}

/// Runs every missing (example, method) pair of one example, handing each line to `emit` as
/// soon as it is ready; a failed method becomes an error line.
#[allow(clippy::too_many_arguments)]
fn bench_example(
    engine: &Engine,
    args: &BenchArgs,
    index: usize,
    ex: &Example,
    methods: &[(&MethodSpec, Box<dyn Method>)],
    done: &HashSet<(String, String)>,
    sampling: &Sampling,
    emit: &mut dyn FnMut(Record) -> Result<()>,
) -> Result<()> {
    let base = Record {
        example: ex.id.clone(),
        index,
        golds: ex.answers.clone(),
        ..Record::default()
    };
    let pending: Vec<&(&MethodSpec, Box<dyn Method>)> = methods
        .iter()
        .filter(|(s, _)| !done.contains(&(ex.id.clone(), s.label.clone())))
        .collect();
    let fail_all = |msg: String, emit: &mut dyn FnMut(Record) -> Result<()>| {
        for (s, _) in &pending {
            emit(Record {
                method: s.label.clone(),
                error: Some(msg.clone()),
                peak_rss_bytes: peak_rss_bytes(),
                ..base.clone()
            })?;
        }
        Ok(())
    };

    // Ingestion: every document into the store, before any method is timed.
    let prepared = (|| -> Result<(Tokenized, Prepared, Ingest)> {
        let ex = match args.max_doc_tokens {
            Some(n) => truncate_docs(engine, ex, n)?,
            None => ex.clone(),
        };
        let prompt: Prompt = longbench_prompt(&ex);
        let t = engine.tokenize(&prompt)?;
        let t0 = Instant::now();
        let p = engine.prepare(&t)?;
        let ingest = Ingest {
            ms: t0.elapsed().as_secs_f64() * 1e3,
            docs: t.documents.len(),
            docs_computed: p
                .sources
                .iter()
                .filter(|s| **s == crate::engine::Source::Computed)
                .count(),
            context_tokens: p.segments.iter().map(|s| s.len()).sum(),
        };
        Ok((t, p, ingest))
    })();
    let (t, prepared, ingest) = match prepared {
        Ok(x) => x,
        Err(e) => return fail_all(format!("preparing the example: {e}"), emit),
    };
    let reference = match guarded(|| run_method(engine, &Recompute, &t, Some(&prepared), sampling))
    {
        Ok(r) => r,
        Err(e) => return fail_all(format!("the Recompute reference failed: {e}"), emit),
    };
    drop(prepared);
    let base = Record {
        reference_answer: reference.text.clone(),
        reference_ttft_ms: reference.stats.ttft_ms,
        ingest,
        ..base
    };

    for (spec, method) in pending {
        let fresh;
        let o = if spec.config == MethodSettings::Recompute {
            &reference
        } else {
            match guarded(|| run_method(engine, method.as_ref(), &t, None, sampling)) {
                Ok(o) => {
                    fresh = o;
                    &fresh
                }
                Err(e) => {
                    emit(Record {
                        method: spec.label.clone(),
                        error: Some(e.to_string()),
                        peak_rss_bytes: peak_rss_bytes(),
                        ..base.clone()
                    })?;
                    continue;
                }
            }
        };
        let kl = kl_divergence(&reference.logits, &o.logits);
        emit(Record {
            method: spec.label.clone(),
            method_name: o.name.clone(),
            answer: o.text.clone(),
            f1: best_f1(&o.text, &ex.answers),
            em: exact_match(&o.text, &ex.answers),
            agree: normalize_answer(&o.text) == normalize_answer(&reference.text),
            same_tokens: o.tokens == reference.tokens,
            kl: kl.is_finite().then_some(kl),
            new_tokens: o.tokens.len(),
            finish: Some(o.finish),
            decode_ms: o.decode_ms,
            decode_tok_s: o.decode_tok_s,
            docs_computed: o.docs_computed,
            stats: Some(o.stats.clone()),
            peak_rss_bytes: peak_rss_bytes(),
            ..base.clone()
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_refuse_bad_forms() {
        assert_eq!(parse_shard("1/4"), Ok((1, 4)));
        assert_eq!(parse_shard(" 0 / 1 "), Ok((0, 1)));
        for bad in ["4/4", "1", "a/2", "1/0", "-1/3"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resume_check_allows_new_methods_and_refuses_changes() {
        let old =
            serde_json::json!({"max_tokens": 32, "data": "a", "methods": {"reuse": {"x": 1}}});
        let p = Path::new("out/config.json");
        let new = serde_json::json!({"max_tokens": 32, "data": "b",
            "methods": {"reuse": {"x": 1}, "epic": {"x": 2}}});
        let merged = check_resume(&old, &new, p).unwrap();
        assert_eq!(merged["methods"].as_object().unwrap().len(), 2);
        let new = serde_json::json!({"max_tokens": 16, "methods": {"reuse": {"x": 1}}});
        let e = check_resume(&old, &new, p).unwrap_err().to_string();
        assert!(e.contains("max_tokens: 32 then, 16 now"), "{e}");
        let new = serde_json::json!({"max_tokens": 32, "methods": {"reuse": {"x": 2}}});
        let e = check_resume(&old, &new, p).unwrap_err().to_string();
        assert!(e.contains("`reuse` x: 1 then, 2 now"), "{e}");
        // A knob this build added (or dropped) is not a change of the run's settings.
        let new = serde_json::json!({"max_tokens": 32, "methods": {"reuse": {"x": 1, "y": 0}}});
        assert!(check_resume(&old, &new, p).is_ok());
        let old2 = serde_json::json!({"max_tokens": 32, "methods": {"reuse": {"x": 1, "z": 0}}});
        assert!(check_resume(&old2, &new, p).is_ok());
    }

    #[test]
    fn torn_and_error_lines_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let good = to_line(&Record {
            example: "0".into(),
            method: "reuse".into(),
            ..Record::default()
        })
        .unwrap();
        let err = to_line(&Record {
            example: "1".into(),
            method: "reuse".into(),
            error: Some("boom".into()),
            ..Record::default()
        })
        .unwrap();
        std::fs::write(&path, format!("{good}{err}{{\"example\": \"2\", \"met")).unwrap();
        let r = read_results(&path).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
        std::fs::write(&path, format!("not json\n{good}")).unwrap();
        assert!(read_results(&path)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let e = guarded::<()>(|| panic!("index 7 out of range")).unwrap_err();
        assert!(matches!(&e, crate::Error::Internal(m) if m.contains("index 7 out of range")));
        let e = guarded::<()>(|| std::panic::panic_any(42u8)).unwrap_err();
        assert!(e.to_string().contains("(no message)"), "{e}");
        assert_eq!(guarded(|| Ok(5)).unwrap(), 5);
    }

    #[test]
    fn peak_rss_is_read() {
        assert!(peak_rss_bytes() > 0);
    }
}
