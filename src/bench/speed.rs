//! Throughput of the model runtime: prefill and decode tokens/s at given prompt lengths, side
//! by side with llama.cpp (through llama-cpp-python) on the same GGUF file when it is installed.
//!
//! Prompts are random token ids: speed does not depend on the text, and no tokenizer is needed.
//! Each repetition starts from an empty KV cache; reported numbers are medians over repetitions.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::model::{LoadOptions, Logits, Model, WeightMode};
use crate::{Error, Result};

/// One prompt length's measurement.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SpeedRow {
    /// "samkv (auto)", "llama.cpp", ...
    pub engine: String,
    pub prompt_tokens: usize,
    /// Median prompt tokens per second of a full prefill from an empty cache.
    pub prefill_tok_s: f64,
    /// Tokens decoded one at a time after the prompt.
    pub decode_tokens: usize,
    /// Median decode tokens per second after this prompt.
    pub decode_tok_s: f64,
    /// Peak resident memory of the process so far (VmHWM), MiB; None where unknown.
    pub peak_rss_mib: Option<f64>,
    pub reps: usize,
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`); None elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Deterministic pseudo-random token ids in `0..vocab` (a fixed LCG; no tokenizer needed).
/// Also the tests' source of token ids.
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Prefill then decode throughput for each prompt length: `reps` repetitions each (after one
/// untimed warm-up pass that also packs/initializes lazily built kernels), medians reported.
/// Decoding feeds `decode_tokens` tokens one per step, each returning the last logits, as a
/// generation loop would.
pub fn measure(
    model: &Model,
    lengths: &[usize],
    decode_tokens: usize,
    reps: usize,
) -> Result<Vec<SpeedRow>> {
    if reps == 0 {
        return Err(Error::InvalidInput(
            "speed measurement needs at least one repetition".into(),
        ));
    }
    let max_ctx = model.cfg.max_context;
    if let Some(&l) = lengths
        .iter()
        .find(|&&l| l == 0 || l + decode_tokens > max_ctx)
    {
        return Err(Error::InvalidInput(format!(
            "prompt length {l} (+{decode_tokens} decoded) must be in 1..={max_ctx} for this model"
        )));
    }
    let vocab = model.cfg.vocab.min(32_000);
    // Warm-up: first-call costs (thread pools, weight repacking) are not throughput.
    {
        let mut cache = model.new_cache()?;
        let toks = random_tokens(16, vocab, 1);
        let pos: Vec<u32> = (0..16).collect();
        model.forward(&toks, &pos, &mut cache, Logits::Last, &[])?;
        model.forward(&toks[..1], &[16], &mut cache, Logits::Last, &[])?;
    }
    let mut rows = Vec::with_capacity(lengths.len());
    for &len in lengths {
        let mut pre = Vec::with_capacity(reps);
        let mut dec = Vec::with_capacity(reps);
        for rep in 0..reps {
            let toks = random_tokens(len + decode_tokens, vocab, 7 + rep as u64);
            let pos: Vec<u32> = (0..(len + decode_tokens) as u32).collect();
            let mut cache = model.new_cache()?;
            let t0 = Instant::now();
            model.forward(&toks[..len], &pos[..len], &mut cache, Logits::Last, &[])?;
            pre.push(len as f64 / t0.elapsed().as_secs_f64());
            if decode_tokens > 0 {
                let t1 = Instant::now();
                for i in len..len + decode_tokens {
                    model.forward(
                        &toks[i..i + 1],
                        &pos[i..i + 1],
                        &mut cache,
                        Logits::Last,
                        &[],
                    )?;
                }
                dec.push(decode_tokens as f64 / t1.elapsed().as_secs_f64());
            }
        }
        rows.push(SpeedRow {
            engine: "samkv".into(),
            prompt_tokens: len,
            prefill_tok_s: median(&mut pre),
            decode_tokens,
            decode_tok_s: if decode_tokens > 0 {
                median(&mut dec)
            } else {
                0.0
            },
            peak_rss_mib: peak_rss_mib(),
            reps,
        });
    }
    Ok(rows)
}

/// The same measurement by llama.cpp through `scripts/llamacpp_bench.py` (llama-cpp-python,
/// 2 threads). Returns None, with a note on stderr, when `import llama_cpp` fails.
pub fn anchor_llamacpp(
    gguf: &Path,
    lengths: &[usize],
    decode_tokens: usize,
    reps: usize,
) -> Result<Option<Vec<SpeedRow>>> {
    let have = Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .output();
    if !have.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "note: llama.cpp anchor skipped: `python3 -c \"import llama_cpp\"` failed; install it with \
             CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
             -DGGML_AMX_BF16=OFF\" python3 -m pip install llama-cpp-python==0.3.36"
        );
        return Ok(None);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/llamacpp_bench.py");
    if !script.exists() {
        return Err(Error::InvalidInput(format!(
            "{} is missing (it ships with the samkv sources)",
            script.display()
        )));
    }
    let lens: Vec<String> = lengths.iter().map(|l| l.to_string()).collect();
    let threads = candle_core::utils::get_num_threads();
    let out = Command::new("python3")
        .arg(&script)
        .arg(gguf)
        .args(["--lengths", &lens.join(",")])
        .args(["--decode", &decode_tokens.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--reps", &reps.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(Error::InvalidInput(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
    {
        let row: SpeedRow = serde_json::from_str(line).map_err(|e| {
            Error::InvalidInput(format!("unexpected llamacpp_bench.py output `{line}`: {e}"))
        })?;
        rows.push(row);
    }
    Ok(Some(rows))
}

/// The table as Markdown: one row per prompt length, samkv next to llama.cpp with ratios
/// (samkv / llama.cpp; above 1 means samkv is faster).
pub fn format_table(ours: &[SpeedRow], anchor: Option<&[SpeedRow]>) -> String {
    let mut s = String::new();
    let engine = ours.first().map_or("samkv", |r| r.engine.as_str());
    s.push_str(&format!(
        "| prompt | {engine} prefill tok/s | llama.cpp prefill tok/s | ratio | {engine} decode tok/s | llama.cpp decode tok/s | ratio | peak RSS MiB |\n"
    ));
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let first_prefill = ours.first().map(|r| r.prefill_tok_s);
    for r in ours {
        let a = anchor.and_then(|a| a.iter().find(|x| x.prompt_tokens == r.prompt_tokens));
        let fmt = |v: Option<f64>| {
            v.filter(|v| v.is_finite())
                .map_or("-".to_string(), |v| format!("{v:.1}"))
        };
        let ratio = |x: f64, y: Option<f64>| {
            y.filter(|y| *y > 0.0 && x.is_finite())
                .map_or("-".to_string(), |y| format!("{:.2}", x / y))
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.prompt_tokens,
            fmt(Some(r.prefill_tok_s)),
            fmt(a.map(|a| a.prefill_tok_s)),
            ratio(r.prefill_tok_s, a.map(|a| a.prefill_tok_s)),
            fmt(Some(r.decode_tok_s)),
            fmt(a.map(|a| a.decode_tok_s)),
            ratio(r.decode_tok_s, a.map(|a| a.decode_tok_s)),
            r.peak_rss_mib
                .map_or("-".to_string(), |m| format!("{m:.0}")),
        ));
    }
    if let (Some(p0), Some(l0)) = (first_prefill, ours.first()) {
        let scal: Vec<String> = ours
            .iter()
            .skip(1)
            .map(|r| format!("{}: {:.2}x", r.prompt_tokens, r.prefill_tok_s / p0))
            .collect();
        if !scal.is_empty() {
            s.push_str(&format!(
                "\nprefill throughput relative to {} tokens: {}\n",
                l0.prompt_tokens,
                scal.join(", ")
            ));
        }
    }
    s
}

pub fn print_table(ours: &[SpeedRow], anchor: Option<&[SpeedRow]>) {
    print!("{}", format_table(ours, anchor));
}

/// `samkv bench-speed`: load `model` with `weights`, measure, run the llama.cpp anchor on the
/// same file (GGUF only), print the table. Returns the rows (samkv, then llama.cpp if any).
pub fn run_cli(
    model: &Path,
    lengths: &[usize],
    weights: WeightMode,
    decode_tokens: usize,
    reps: usize,
    with_anchor: bool,
) -> Result<(Vec<SpeedRow>, Option<Vec<SpeedRow>>)> {
    let opts = LoadOptions {
        weights,
        ..Default::default()
    };
    let t0 = Instant::now();
    let m = Model::load(model, &opts)?;
    let mode = format!("{weights:?}").to_lowercase();
    eprintln!(
        "loaded {} ({mode} weights) in {:.1}s; {} threads",
        model.display(),
        t0.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    let mut ours = measure(&m, lengths, decode_tokens, reps)?;
    for r in &mut ours {
        r.engine = format!("samkv ({mode})");
    }
    drop(m);
    let anchor = if with_anchor && model.is_file() {
        anchor_llamacpp(model, lengths, decode_tokens, reps)?
    } else {
        None
    };
    println!(
        "{} — {mode} weights, {reps} reps, {decode_tokens} decoded tokens, medians",
        model.display()
    );
    print_table(&ours, anchor.as_deref());
    Ok((ours, anchor))
}
