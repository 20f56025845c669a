//! `samkv selfcheck`: is the runtime right on this device? Loads a real model on the CPU
//! (f32, dense weights: the reference) and on the device (f32 and bf16), compares their
//! last-position logits on a fixed prompt, checks that batched decoding equals separate decode
//! steps there, and checks the invariants of METHODS.md section 4 on the device with three
//! real passages (tests/data/selfcheck.json, compiled in). Prints PASS/FAIL/SKIP per check
//! and fails when any check fails.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::bench::gpu::method_config;
use crate::engine::{load_model, Engine, Prompt};
use crate::eval::metrics::kl_divergence;
use crate::fetch;
use crate::kv::KvCache;
use crate::methods::{Assembled, Method};
use crate::model::{LoadOptions, Logits, Model, WeightMode};
use crate::store::MemoryTier;
use crate::{Error, Result};

/// Three MuSiQue passages and their question (see the file's `source`).
const DOCS_JSON: &str = include_str!("../tests/data/selfcheck.json");

#[derive(clap::Args, Clone, Debug)]
pub struct SelfcheckArgs {
    /// A known model name or a GGUF file / Hugging Face directory (never fetched here).
    #[arg(long, short = 'm', default_value = fetch::DEFAULT_MODEL)]
    pub model: String,
    /// Device dtypes to check the invariants in (f32 is exact up to summation order; bf16
    /// gets a looser, distribution-level bound).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtypes: Vec<String>,
    /// Only check samkv's CUDA kernels against candle's ops (random inputs; no model needed).
    #[arg(long)]
    pub kernels_only: bool,
}

/// How two logit vectors compare.
struct Diff {
    max_abs: f32,
    /// max_abs divided by the reference's logit range.
    rel: f32,
    kl: f64,
    argmax: (usize, usize),
    /// Reference's gap between its two largest logits, and its largest.
    margin: f32,
    top: f32,
}

fn diff(reference: &[f32], other: &[f32]) -> Diff {
    let max_abs = reference
        .iter()
        .zip(other)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
    let hi = reference.iter().copied().fold(f32::MIN, f32::max);
    let lo = reference.iter().copied().fold(f32::MAX, f32::min);
    let mut sorted = reference.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    Diff {
        max_abs,
        rel: max_abs / (hi - lo).max(f32::MIN_POSITIVE),
        kl: kl_divergence(reference, other),
        argmax: (argmax(reference), argmax(other)),
        margin: sorted.first().copied().unwrap_or(0.0) - sorted.get(1).copied().unwrap_or(0.0),
        top: hi,
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |x| x.0)
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max|d| {:.3e} ({:.2e} of range), KL {:.2e}, argmax {} vs {} (ref margin {:.2})",
            self.max_abs, self.rel, self.kl, self.argmax.0, self.argmax.1, self.margin
        )
    }
}

/// Tolerances for one dtype: logits must agree this closely.
#[derive(Clone, Copy)]
struct Tol {
    rel: f32,
    kl: f64,
    /// Worst relative L2 difference of any layer's K or V.
    kv: f32,
}

impl Tol {
    fn for_dtype(dt: DType) -> Tol {
        match dt {
            // f32 differs only in summation order (measured ~1e-6 of the range on CPU).
            DType::F32 => Tol {
                rel: 1e-3,
                kl: 1e-4,
                kv: 1e-3,
            },
            // bf16 keeps 8 bits of mantissa; what must hold is the distribution. Its K/V
            // round at 2^-8 relative; a few roundings deep, a few percent.
            _ => Tol {
                rel: f32::INFINITY,
                kl: 0.05,
                kv: 0.05,
            },
        }
    }

    /// Within tolerance, and the same greedy token unless the reference's top two are
    /// within a few units of the last place of this dtype at that magnitude.
    fn ok(&self, d: &Diff, dt: DType) -> bool {
        let mantissa = match dt {
            DType::BF16 => 7,
            DType::F16 => 10,
            _ => 23,
        };
        let ulp = 2f32.powi(d.top.abs().max(1.0).log2().floor() as i32 - mantissa);
        let close_call = dt != DType::F32 && d.margin <= 4.0 * ulp;
        let rel_ok = self.rel.is_infinite() || d.rel < self.rel;
        rel_ok && d.kl < self.kl && (d.argmax.0 == d.argmax.1 || close_call)
    }
}

struct Report {
    failed: usize,
    lines: Vec<serde_json::Value>,
}

impl Report {
    fn check(&mut self, name: &str, pass: bool, detail: &str) {
        let tag = if pass { "PASS" } else { "FAIL" };
        println!("{tag}  {name}: {detail}");
        if !pass {
            self.failed += 1;
        }
        self.lines
            .push(json!({"check": name, "result": tag, "detail": detail}));
    }

    /// Prints the tally; Err when a check failed.
    fn finish(&self) -> Result<()> {
        println!(
            "\n{} checks, {} failed",
            self.lines.iter().filter(|l| l["result"] != "SKIP").count(),
            self.failed
        );
        if self.failed > 0 {
            return Err(Error::InvalidInput(format!(
                "{} selfcheck(s) failed",
                self.failed
            )));
        }
        Ok(())
    }

    fn skip(&mut self, name: &str, why: &str) {
        println!("SKIP  {name}: {why}");
        self.lines
            .push(json!({"check": name, "result": "SKIP", "detail": why}));
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// Runs every check; Err when one fails (after printing them all).
pub fn run(args: &SelfcheckArgs, device: Device, models_dir: &Path) -> Result<()> {
    let mut rep = Report {
        failed: 0,
        lines: Vec::new(),
    };
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        println!("# samkv's CUDA kernels vs candle's ops (f32) on random inputs");
        for c in crate::model::kernel_check::check_kernels(&device) {
            rep.check(&c.name, c.pass, &c.detail);
        }
    }
    if args.kernels_only {
        if !device.is_cuda() {
            return Err(Error::InvalidInput(
                "--kernels-only checks the CUDA kernels: use --device cuda with a CUDA build"
                    .into(),
            ));
        }
        return rep.finish();
    }
    let path = fetch::resolve_model(&args.model, models_dir, false)?;
    let docs: serde_json::Value = serde_json::from_str(DOCS_JSON)
        .map_err(|e| Error::InvalidInput(format!("tests/data/selfcheck.json: {e}")))?;
    let texts: Vec<String> = docs["documents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let question = docs["question"].as_str().unwrap_or_default().to_string();
    if texts.len() < 3 || question.is_empty() {
        return Err(Error::InvalidInput(
            "tests/data/selfcheck.json needs 3 documents and a question".into(),
        ));
    }
    println!(
        "# samkv selfcheck: {} on {}",
        path.display(),
        crate::bench::gpu::device_name(&device)
    );
    let load = |dev: &Device, dt: DType| -> Result<Engine> {
        let opts = LoadOptions {
            device: dev.clone(),
            dtype: dt,
            weights: WeightMode::Dense,
            ..Default::default()
        };
        let (model, tok) = load_model(&path, &opts)?;
        let mut e = Engine::new(model, tok, Arc::new(MemoryTier::new(usize::MAX, None)));
        // Stored K/V in the activation dtype: the invariants are about the methods, not
        // about storage rounding.
        e.store_dtype = crate::store::StoreDtype::from_float(dt).unwrap_or_default();
        Ok(e)
    };

    // 1. Logits: CPU f32 against the device in each dtype, on the full prompt.
    let cpu = load(&Device::Cpu, DType::F32)?;
    let prompt = Prompt::for_question(&texts, &question);
    let t = cpu.tokenize(&prompt)?;
    let tokens: Vec<u32> = [t.prefix.clone(), t.documents.concat(), t.question.clone()].concat();
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    let last_logits = |m: &Model| -> Result<Vec<f32>> {
        let mut cache = m.new_cache()?;
        let out = m.forward(&tokens, &positions, &mut cache, Logits::Last, &[])?;
        to_vec(
            &out.logits
                .ok_or_else(|| Error::InvalidInput("no logits".into()))?,
        )
    };
    let reference = last_logits(&cpu.model)?;
    println!("prompt: {} tokens", tokens.len());
    drop(cpu);
    for dts in &args.dtypes {
        let dt = crate::store::parse_compute_dtype(dts)?;
        let engine = load(&device, dt)?;
        let name = format!("{dts} logits vs cpu f32");
        match last_logits(&engine.model) {
            Ok(l) => {
                let d = diff(&reference, &l);
                rep.check(&name, Tol::for_dtype(dt).ok(&d, dt), &d.to_string());
            }
            Err(e) => rep.check(&name, false, &format!("error: {e}")),
        }
        check_decode_batch(&mut rep, &engine.model, dt);
        check_invariants(&mut rep, &engine, &texts, &question, dt);
    }
    rep.finish()
}

/// decode_batch over three caches of different lengths equals separate forward steps.
fn check_decode_batch(rep: &mut Report, m: &Model, dt: DType) {
    let name = format!("{dt:?} decode_batch vs forward").to_lowercase();
    let res = (|| -> Result<Diff> {
        let lens = [7u32, 23, 16];
        let prefill = |n: u32| -> Result<crate::kv::KvCache> {
            let mut c = m.new_cache()?;
            let toks: Vec<u32> = (0..n).map(|i| (i * 37 + n) % m.cfg.vocab as u32).collect();
            let pos: Vec<u32> = (0..n).collect();
            m.forward(&toks, &pos, &mut c, Logits::None, &[])?;
            Ok(c)
        };
        let mut batch = lens
            .iter()
            .map(|&n| prefill(n))
            .collect::<Result<Vec<_>>>()?;
        let mut single = lens
            .iter()
            .map(|&n| prefill(n))
            .collect::<Result<Vec<_>>>()?;
        let toks = [11u32, 500, 1234];
        let got = m
            .decode_batch(&toks, &lens, &mut batch)?
            .to_dtype(DType::F32)?;
        let mut worst: Option<Diff> = None;
        for (i, c) in single.iter_mut().enumerate() {
            let out = m.forward(&toks[i..i + 1], &lens[i..i + 1], c, Logits::Last, &[])?;
            let want = to_vec(
                &out.logits
                    .ok_or_else(|| Error::InvalidInput("no logits".into()))?,
            )?;
            let d = diff(&want, &to_vec(&got.get(i)?)?);
            if worst.as_ref().is_none_or(|w| d.kl > w.kl || d.rel > w.rel) {
                worst = Some(d);
            }
        }
        worst.ok_or_else(|| Error::InvalidInput("no sequences".into()))
    })();
    match res {
        Ok(d) => rep.check(&name, Tol::for_dtype(dt).ok(&d, dt), &d.to_string()),
        Err(e) => rep.check(&name, false, &format!("error: {e}")),
    }
}

fn assemble(engine: &Engine, prompt: &Prompt, m: &dyn Method) -> Result<Assembled> {
    Ok(engine.assemble(prompt, m)?.0)
}

/// The largest `|x - ref| / |ref|` (L2, over each layer's K and over its V) of two caches
/// holding the same positions, and the layer where it is.
fn cache_diff(reference: &KvCache, other: &KvCache) -> Result<(f32, usize)> {
    let mut worst = (0f32, 0);
    if reference.layers.len() != other.layers.len() {
        return Err(Error::InvalidInput(
            "the caches have different depths".into(),
        ));
    }
    for (l, (r, o)) in reference.layers.iter().zip(&other.layers).enumerate() {
        if r.positions() != o.positions() {
            return Err(Error::InvalidInput(format!(
                "layer {l} holds {} rows against the reference's {}",
                o.len(),
                r.len()
            )));
        }
        for (x, y) in [(r.keys()?, o.keys()?), (r.values()?, o.values()?)] {
            let x = x.to_dtype(DType::F32)?;
            let y = y.to_dtype(DType::F32)?;
            let num = (&y - &x)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
            let den = x.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
            let rel = num / den.max(f32::MIN_POSITIVE);
            if rel.is_nan() || rel > worst.0 {
                worst = (if rel.is_nan() { f32::INFINITY } else { rel }, l);
            }
        }
    }
    Ok(worst)
}

/// METHODS.md section 4 on this device and dtype.
fn check_invariants(
    rep: &mut Report,
    engine: &Engine,
    texts: &[String],
    question: &str,
    dt: DType,
) {
    let dts = format!("{dt:?}").to_lowercase();
    let prompt_of = |docs: &[String]| Prompt::for_question(docs, question);
    let one = prompt_of(&texts[..1]);
    let three = prompt_of(texts);
    let longest = match engine.tokenize(&three) {
        Ok(t) => t.documents.iter().map(Vec::len).max().unwrap_or(0),
        Err(e) => {
            rep.check(&format!("{dts} tokenize"), false, &e.to_string());
            return;
        }
    };
    let tol = Tol::for_dtype(dt);
    let run = |prompt: &Prompt, spec: &str| -> std::result::Result<Assembled, String> {
        let cfg = method_config(spec).map_err(|e| format!("config: {e}"))?;
        let m = cfg.build().map_err(|e| format!("not available: {e}"))?;
        assemble(engine, prompt, m.as_ref()).map_err(|e| format!("error: {e}"))
    };
    let cases: Vec<(&str, &Prompt, String, &str)> = vec![
        (
            "single-doc reuse = recompute",
            &one,
            "reuse".into(),
            "recompute",
        ),
        (
            "cacheblend ratio 1.0 = recompute",
            &three,
            "cacheblend:ratio=1.0".into(),
            "recompute",
        ),
        (
            "epic k >= doc length = recompute",
            &three,
            format!("epic:epic_k={longest}"),
            "recompute",
        ),
        (
            "samkv all blocks selected (overwrite) = recompute",
            &three,
            "samkv:selection=global:keep=1.0:update=overwrite".into(),
            "recompute",
        ),
        (
            "samkv attend=all, all blocks selected = recompute",
            &three,
            "samkv:selection=global:keep=1.0:samkv_attend=all:samkv_score=attention".into(),
            "recompute",
        ),
        (
            "samkv keep-all, no recompute = reuse",
            &three,
            "samkv:selection=global:keep=1.0:no_recompute=true".into(),
            "reuse",
        ),
        (
            "infllm keep-all = reuse",
            &three,
            format!("infllm:infllm_topk={}", 3 * longest + 1),
            "reuse",
        ),
    ];
    for (what, prompt, spec, reference) in cases {
        let name = format!("{dts} {what}");
        let a = match run(prompt, &spec) {
            Ok(a) => a,
            Err(e) if e.starts_with("not available") || e.starts_with("config") => {
                rep.skip(&name, &e);
                continue;
            }
            Err(e) => {
                rep.check(&name, false, &e);
                continue;
            }
        };
        let r = match run(prompt, reference) {
            Ok(r) => r,
            Err(e) => {
                rep.check(&name, false, &format!("reference {reference}: {e}"));
                continue;
            }
        };
        match (to_vec(&r.logits), to_vec(&a.logits)) {
            (Ok(rl), Ok(al)) => {
                let d = diff(&rl, &al);
                let detail = format!(
                    "{d}; kept {:.0}/{} tokens",
                    a.stats.kv_tokens_kept, a.stats.context_tokens
                );
                rep.check(&name, tol.ok(&d, dt), &detail);
            }
            (Err(e), _) | (_, Err(e)) => rep.check(&name, false, &format!("error: {e}")),
        }
        // The caches too, layer by layer: a defect in one layer (RoPE, anchors, a mask) can
        // hide in the logits of a short prompt but not here.
        match cache_diff(&r.cache, &a.cache) {
            Ok((worst, layer)) => rep.check(
                &format!("{name} (K/V per layer)"),
                worst < tol.kv,
                &format!("worst relative L2 difference of K or V {worst:.2e} at layer {layer}"),
            ),
            Err(e) => rep.check(&format!("{name} (K/V per layer)"), false, &e.to_string()),
        }
    }
}
