//! `samkv bench-gpu`: speed of every method at production shape on one device, with seeded
//! random weights ("shape-only": the numbers are times and sizes, never quality).
//!
//! Per document length: ingestion cost per document (prefill + packing into a memory-only
//! store), time to first token per method with its load / re-position / select / recompute
//! split, decode step time at batch 1 over the full KV (Recompute's cache) and SamKV's
//! retained KV, and decode tokens/s with [`Model::decode_batch`] at growing batch sizes until
//! the device runs out of memory. The device is synchronized before every clock read; the
//! per-phase split comes from the methods' own clocks, which on an asynchronous device only
//! see what the host waited for (the total is exact).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};

use super::table;
use crate::engine::{Engine, Tokenized};
use crate::eval::metrics::median;
use crate::kv::{KvCache, LayerKv};
use crate::methods::{Assembled, MethodConfig, MethodSettings, Stats};
use crate::model::{Arch, Config, Llama3Scaling, Logits, Model, RopeLayout};
use crate::store::MemoryTier;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

mod rows;

pub use rows::{AttentionRow, BatchRow, DecodeRow, LengthRun, MethodRow, MethodTiming, Report};

pub const LABEL: &str = "shape-only (random weights)";

#[derive(clap::Args, Clone, Debug)]
pub struct BenchGpuArgs {
    /// Model shape: llama-3.1-8b or smollm2-135m.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub shape: String,
    /// Activation dtype: bf16, f16 or f32 (default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Dtype the stored K/V are kept in (default: the activation dtype).
    #[arg(long)]
    pub store_dtype: Option<String>,
    /// Document lengths in tokens; one table each.
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    pub doc_len: Vec<usize>,
    /// Documents per request.
    #[arg(long, default_value_t = 10)]
    pub docs: usize,
    #[arg(long, default_value_t = 32)]
    pub question_len: usize,
    #[arg(long, default_value_t = 32)]
    pub preamble_len: usize,
    /// Timed repetitions per method (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Decode steps timed at batch 1 (after one warm-up step).
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Decode steps timed per batch size (after one warm-up step).
    #[arg(long, default_value_t = 8)]
    pub batch_steps: usize,
    /// Largest batch tried; sizes are 1, 8, 32, 64, 128, ... up to it.
    #[arg(long, default_value_t = 1024)]
    pub max_batch: usize,
    /// Methods as name[:knob=value...], e.g. `cacheblend:ratio=0.15`; knobs are
    /// MethodConfig fields. Methods this build lacks are reported as not available. Decoding
    /// is timed over Recompute's cache and over each samkv entry's (the second default
    /// holds SamKV to the paper's 15% of middle blocks, whatever random weights select).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "recompute,reuse,cacheblend:ratio=0.15,epic:epic_k=16,infllm,samkv,\
                         samkv:selection=global:keep=0.15"
    )]
    pub methods: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Time attention alone (the first table) and stop.
    #[arg(long)]
    pub attention_only: bool,
    /// Write the results as JSON here (rewritten after each document length).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Llama-3.1-8B or SmolLM2-135M, as their Hugging Face configs describe them.
pub fn shape_config(name: &str) -> Result<Config> {
    match name {
        "llama-3.1-8b" => Ok(Config {
            arch: Arch::Llama,
            n_layers: 32,
            hidden: 4096,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            ffn: 14336,
            vocab: 128256,
            rope_base: 500000.0,
            rope_layout: RopeLayout::SplitHalf,
            rope_scaling: Some(Llama3Scaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            rms_eps: 1e-5,
            max_context: 131072,
        }),
        "smollm2-135m" => Ok(Config {
            arch: Arch::Llama,
            n_layers: 30,
            hidden: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn: 1536,
            vocab: 49152,
            rope_base: 100000.0,
            rope_layout: RopeLayout::SplitHalf,
            rope_scaling: None,
            rms_eps: 1e-5,
            max_context: 8192,
        }),
        other => Err(Error::InvalidInput(format!(
            "unknown shape `{other}`; use llama-3.1-8b or smollm2-135m"
        ))),
    }
}

/// Parses `name[:knob=value...]` over the default knobs (the one spec parser).
pub fn method_config(spec: &str) -> Result<MethodSettings> {
    MethodSettings::parse_spec(spec, &MethodConfig::default())
}

/// Attention alone, one layer, causal prefill of each request's length: the attention
/// kernel against candle's op-by-op attention (skipped where it would take long), with the
/// kernel's throughput (4 T^2 d h / 2 FLOPs: the causal half of QK^T and PV). On a Hopper GPU
/// the kernel is the wgmma one, and its mma.sync form is timed beside it.
/// Attention alone, one layer, causal prefill of each request's length: the attention
/// kernel against candle's op-by-op attention (skipped where it would take long), with the
/// kernel's throughput (4 T^2 d h / 2 FLOPs: the causal half of QK^T and PV). On a Hopper GPU
/// the kernel is the wgmma one, and its mma.sync form is timed beside it.
fn attention_table(
    cfg: &Config,
    dtype: DType,
    dev: &Device,
    args: &BenchGpuArgs,
) -> Result<Option<Vec<AttentionRow>>> {
    if !dev.is_cuda() {
        return Ok(None);
    }
    let (h, hkv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        f()?;
        sync(dev)?;
        let mut ms = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            f()?;
            sync(dev)?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(&ms).unwrap_or_default())
    };
    let mut rows = Vec::new();
    for &len in &args.doc_len {
        let t = args.docs * len + args.preamble_len + args.question_len;
        let q = Tensor::randn(0f32, 1f32, (h, t, d), dev)?.to_dtype(dtype)?;
        let k = Tensor::randn(0f32, 1f32, (hkv, t, d), dev)?.to_dtype(dtype)?;
        let v = Tensor::randn(0f32, 1f32, (hkv, t, d), dev)?.to_dtype(dtype)?;
        let pos: Vec<u32> = (0..t as u32).collect();
        let kernel = time(&|| crate::model::attend(&q, &k, &v, &pos, &pos))?;
        // On a Hopper GPU, the kernel's other form (wgmma or mma.sync) beside it.
        let other = time_other_form(dev, || {
            time(&|| crate::model::attend(&q, &k, &v, &pos, &pos))
        })?;
        let (mma, wg) = match other {
            Some((true, ms)) => (Some(ms), Some(kernel)),
            Some((false, ms)) => (Some(kernel), Some(ms)),
            None => (None, None),
        };
        let ops = if t <= 6000 {
            Some(time(&|| crate::model::attend_ops(&q, &k, &v, &pos, &pos))?)
        } else {
            None
        };
        rows.push(AttentionRow {
            tokens: t,
            attend_ms: kernel,
            tflops: 2.0 * (t as f64).powi(2) * (d * h) as f64 / (kernel * 1e-3) / 1e12,
            mma_sync_ms: mma,
            wgmma_ms: wg,
            ops_ms: ops,
        });
    }
    println!(
        "\n## Attention alone: one layer, causal prefill ({h} heads, {hkv} KV heads, d {d})\n"
    );
    println!("{}", table(&rows));
    println!(
        "attend: what the model runs (samkv's kernel where it applies; SAMKV_CUDA_KERNELS=0 turns \
         it off); mma.sync, wgmma: the kernel's two forms, timed on a Hopper GPU (the model runs the \
         wgmma one there; SAMKV_WGMMA=0 turns it off); candle ops: matmul, host-built mask, softmax, \
         matmul per 512 queries. Median of 5 after a warm-up."
    );
    Ok(Some(rows))
}

/// Waits for the device's queued work, so the clock reads what it did.
pub fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// (free, total) device memory in bytes, where the backend can tell.
#[cfg(feature = "cuda")]
pub fn mem_info(dev: &Device) -> Option<(usize, usize)> {
    match dev {
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok(),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
pub fn mem_info(_: &Device) -> Option<(usize, usize)> {
    None
}

/// On a Hopper GPU, `time` run with the attention's other form (crate::cuda::set_wgmma),
/// and whether the form the model runs is wgmma; None elsewhere.
#[cfg(feature = "cuda")]
fn time_other_form(dev: &Device, time: impl Fn() -> Result<f64>) -> Result<Option<(bool, f64)>> {
    use crate::cuda;
    let Device::Cuda(d) = dev else {
        return Ok(None);
    };
    if !cuda::has_wgmma(d) {
        return Ok(None);
    }
    let was = cuda::wgmma(d);
    cuda::set_wgmma(!was);
    let ms = time();
    cuda::set_wgmma(was);
    Ok(Some((was, ms?)))
}
#[cfg(not(feature = "cuda"))]
fn time_other_form(_: &Device, _: impl Fn() -> Result<f64>) -> Result<Option<(bool, f64)>> {
    Ok(None)
}

/// The device's name (CUDA) or "cpu".
pub fn device_name(dev: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "cuda".into());
    }
    format!("{:?}", dev.location())
}

/// Sampled peak of device memory in use (total - free), as the driver reports it.
struct MemWatch {
    dev: Device,
    peak: usize,
}

impl MemWatch {
    fn sample(&mut self) -> Option<usize> {
        let (free, total) = mem_info(&self.dev)?;
        let used = total.saturating_sub(free);
        self.peak = self.peak.max(used);
        Some(used)
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Seeded token ids in [0, vocab) (SplitMix64; no tokenizer is involved).
fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % vocab as u64) as u32
        })
        .collect()
}

/// A word-level tokenizer that is never used for text: the engine needs one (its fingerprint
/// is part of every document id), the bench feeds token ids.
fn placeholder_tokenizer() -> Result<Tokenizer> {
    let dir = tempfile::tempdir()?;
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
        "decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0},"unk_token":"<unk>"}}"#;
    std::fs::write(dir.path().join("tokenizer.json"), json)?;
    Tokenizer::from_hf_dir(dir.path())
}

/// A copy of `c` that shares no storage with it and holds no spare capacity.
pub fn deep_copy(c: &KvCache) -> Result<KvCache> {
    let layers = c
        .layers
        .iter()
        .map(|l| {
            // affine(1, 0) is exact and always writes a fresh, tight buffer.
            let k = l.keys()?.affine(1.0, 0.0)?;
            let v = l.values()?.affine(1.0, 0.0)?;
            LayerKv::from_parts(k, v, l.positions().to_vec())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(KvCache { layers })
}

/// Greedy next tokens of (rows, vocab) logits, read back to the host (a real decoder must).
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let l = if logits.rank() == 1 {
        logits.unsqueeze(0)?
    } else {
        logits.clone()
    };
    Ok(l.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

fn med(xs: &[f64]) -> f64 {
    median(xs).unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints Markdown tables; see the module docs.
pub fn run(args: &BenchGpuArgs, device: Device) -> Result<()> {
    let cfg = shape_config(&args.shape)?;
    let dtype = match &args.dtype {
        Some(s) => crate::store::parse_compute_dtype(s)?,
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
    };
    let store_dtype = match &args.store_dtype {
        Some(s) => crate::store::parse_dtype(s)?,
        None => crate::store::StoreDtype::from_float(dtype).unwrap_or_default(),
    };
    if args.docs == 0 || args.question_len == 0 || args.reps == 0 {
        return Err(Error::InvalidInput(
            "--docs, --question-len and --reps must be at least 1".into(),
        ));
    }
    let mut mem = MemWatch {
        dev: device.clone(),
        peak: 0,
    };
    let base_used = mem.sample();
    println!("# samkv bench-gpu: {} ({LABEL})", args.shape);
    let name = device_name(&device);
    let mut report = Report {
        label: LABEL,
        shape: args.shape.clone(),
        config: cfg.clone(),
        device: name.clone(),
        dtype: format!("{dtype:?}").to_lowercase(),
        store_dtype: format!("{store_dtype:?}").to_lowercase(),
        seed: args.seed,
        reps: args.reps,
        model_init_s: None,
        attention: None,
        runs: Vec::new(),
        peak_mem_gib_sampled: None,
    };
    let save = |report: &Report| -> Result<()> {
        if let Some(p) = &args.out {
            let json = serde_json::to_string_pretty(report)
                .map_err(|e| Error::Internal(format!("bench-gpu report: {e}")))?;
            std::fs::write(p, json)?;
        }
        Ok(())
    };
    // Attention alone needs no model (its weights take 15.5 GiB at the 8B shape).
    let engine = if args.attention_only {
        println!("device {name}, dtype {dtype:?}, attention only (no model built)");
        None
    } else {
        let t0 = Instant::now();
        let model = Model::random(cfg.clone(), args.seed, dtype, &device)?;
        sync(&device)?;
        let init_s = t0.elapsed().as_secs_f64();
        let weights_used = mem.sample();
        println!(
            "device {name}, dtype {dtype:?}, store dtype {store_dtype:?}, model built in {init_s:.1} s{}",
            match (base_used, weights_used) {
                (Some(a), Some(b)) => format!(", weights take {:.1} GiB", (b - a) as f64 / GIB),
                _ => String::new(),
            }
        );
        report.model_init_s = Some(init_s);
        let store = Arc::new(MemoryTier::new(usize::MAX, None));
        let mut engine = Engine::new(model, placeholder_tokenizer()?, store);
        engine.chat = false;
        engine.store_dtype = store_dtype;
        Some(engine)
    };
    report.attention = attention_table(&cfg, dtype, &device, args)?;
    let Some(engine) = engine else {
        return save(&report);
    };
    for &len in &args.doc_len {
        let run = bench_length(&engine, args, len, &mut mem).unwrap_or_else(|e| {
            println!("\ndocument length {len}: failed: {e}");
            LengthRun::failed(len, e.to_string())
        });
        report.runs.push(run);
        report.peak_mem_gib_sampled = mem_info(&device).map(|_| mem.peak as f64 / GIB);
        save(&report)?;
    }
    match mem_info(&device) {
        Some(_) => println!(
            "\npeak device memory in use (sampled after each phase): {:.1} GiB",
            mem.peak as f64 / GIB
        ),
        None => println!("\npeak device memory: not available on this device"),
    }
    Ok(())
}

/// One request shape: preamble, `args.docs` documents of `len` tokens, question.
fn bench_length(
    engine: &Engine,
    args: &BenchGpuArgs,
    len: usize,
    mem: &mut MemWatch,
) -> Result<LengthRun> {
    let model = &engine.model;
    let dev = model.device().clone();
    let vocab = model.cfg.vocab;
    let seed = args.seed ^ ((len as u64) << 20);
    let t = Tokenized {
        prefix: random_tokens(args.preamble_len, vocab, seed + 1),
        documents: (0..args.docs)
            .map(|i| random_tokens(len, vocab, seed + 100 + i as u64))
            .collect(),
        question: random_tokens(args.question_len, vocab, seed + 2),
    };
    let total = t.prefix.len() + args.docs * len + t.question.len();
    if total + args.decode_steps + args.batch_steps + 2 >= model.cfg.max_context {
        return Err(Error::ContextTooLong {
            tokens: total,
            max: model.cfg.max_context,
        });
    }
    println!(
        "\n## {} documents x {len} tokens + {} preamble + {} question = {total} tokens ({LABEL})\n",
        args.docs,
        t.prefix.len(),
        t.question.len()
    );

    // Ingestion: each document prefilled on its own after the preamble and stored. One
    // untimed document first, so one-off kernel loading is not charged to the first one.
    let warm = random_tokens(len, vocab, seed + 3);
    let _ = engine.compute_document(&[], None, &warm)?;
    sync(&dev)?;
    let ingest = |prefix: &[u32], pkv: Option<&crate::store::StoredDoc>, toks: &[u32]| {
        let t0 = Instant::now();
        let doc = engine.compute_document(prefix, pkv, toks)?;
        engine.store.put(&doc)?;
        sync(&dev)?;
        Ok::<_, Error>((doc, t0.elapsed().as_secs_f64() * 1e3))
    };
    let prefix_doc = if t.prefix.is_empty() {
        None
    } else {
        Some(ingest(&[], None, &t.prefix)?.0)
    };
    let mut ingest_ms = Vec::with_capacity(args.docs);
    let mut doc_bytes = 0;
    for d in &t.documents {
        let (doc, ms) = ingest(&t.prefix, prefix_doc.as_ref(), d)?;
        doc_bytes = doc.total_bytes();
        ingest_ms.push(ms);
    }
    mem.sample();
    println!(
        "ingestion: {:.1} ms per document (median of {}), {:.1} MiB stored per document\n",
        med(&ingest_ms),
        ingest_ms.len(),
        doc_bytes as f64 / (1 << 20) as f64
    );

    // Time to first token per method.
    let mut methods = Vec::new();
    let mut full: Option<Assembled> = None;
    let mut sparse: Vec<(String, Assembled)> = Vec::new();
    for spec in &args.methods {
        let mut row = MethodRow {
            spec: spec.clone(),
            name: None,
            available: false,
            error: None,
            timing: None,
        };
        let method = match method_config(spec).and_then(|c| c.build()) {
            Ok(m) => m,
            Err(e) => {
                row.error = Some(e.to_string());
                methods.push(row);
                continue;
            }
        };
        row.name = Some(method.name());
        row.available = true;
        match time_method(engine, &t, method.as_ref(), args.reps, mem) {
            Ok((times, stats, last)) => {
                let s = |f: fn(&Stats) -> f64| med(&stats.iter().map(f).collect::<Vec<_>>());
                row.timing = Some(MethodTiming {
                    ttft_ms_median: med(&times),
                    load_ms_median: s(|x| x.load_ms),
                    reposition_ms_median: s(|x| x.reposition_ms),
                    select_ms_median: s(|x| x.select_ms),
                    recompute_ms_median: s(|x| x.recompute_ms),
                    ttft_ms_all: times,
                    stats: stats[0].clone(),
                });
                if cfg_method(spec) == "recompute" {
                    full = Some(last);
                } else if cfg_method(spec) == "samkv" {
                    sparse.push((method.name(), last));
                }
            }
            Err(e) => row.error = Some(e.to_string()),
        }
        methods.push(row);
    }
    println!("{}", table(&methods));
    println!(
        "TTFT: median of {} after 1 warm-up, device synchronized; load..recompute: medians of \
         the methods' own clocks (host-side; on CUDA work still queued is charged to the phase \
         that waits for it).\n",
        args.reps
    );

    // Decoding: full KV (Recompute's cache) against SamKV's retained KV.
    let mut decode = Vec::new();
    let mut caches: Vec<(String, String, Assembled)> = Vec::new();
    if let Some(a) = full {
        caches.push(("full KV".into(), "recompute".into(), a));
    }
    let n_sparse = sparse.len();
    for (i, (n, a)) in sparse.into_iter().enumerate() {
        let label = match n_sparse {
            1 => "SamKV KV".to_string(),
            _ => format!("SamKV KV #{}", i + 1),
        };
        caches.push((label, n, a));
    }
    if caches.is_empty() {
        println!("decode: skipped (neither recompute nor samkv ran)");
    }
    for (kv, method, a) in caches {
        let Assembled {
            mut cache, logits, ..
        } = a;
        let kv_tokens = cache.len();
        // Batches start from the same KV, untouched by the batch-1 steps.
        let base = deep_copy(&cache)?;
        let step_ms = decode_single(model, &mut cache, &logits, args.decode_steps)?;
        drop(cache);
        mem.sample();
        let batches = decode_batches(model, &base, &kv, args, mem)?;
        decode.push(DecodeRow {
            kv,
            method,
            kv_tokens,
            kv_bytes: base.bytes(),
            step_ms_batch1_median: med(&step_ms),
            step_ms_batch1_all: step_ms,
            batches,
        });
    }
    if !decode.is_empty() {
        println!("\n{}", table(&decode));
        let batches: Vec<&BatchRow> = decode.iter().flat_map(|d| &d.batches).collect();
        println!("\n{}", table(&batches));
        let kept: Vec<String> = decode
            .iter()
            .filter(|d| d.kv != "full KV")
            .map(|d| format!("{}: what {} kept", d.kv, d.method))
            .collect();
        println!(
            "full KV: Recompute's cache; {}. step ms: median of {} steps at batch 1 (forward + \
             greedy token to host) and of {} decode_batch steps per batch size, each after 1 \
             warm-up step.",
            kept.join("; "),
            args.decode_steps,
            args.batch_steps
        );
    }
    Ok(LengthRun {
        doc_len: len,
        error: None,
        docs: args.docs,
        preamble_tokens: t.prefix.len(),
        question_tokens: t.question.len(),
        total_tokens: total,
        ingest_ms_per_doc_median: median(&ingest_ms),
        ingest_ms_all: ingest_ms,
        stored_bytes_per_doc: doc_bytes,
        methods,
        decode,
        mem_used_gib_after: mem.sample().map(|u| u as f64 / GIB),
    })
}

fn cfg_method(spec: &str) -> &str {
    spec.split(':').next().unwrap_or_default().trim()
}

/// Time to first token: prepare (documents from the memory store) + assemble, `reps` times
/// after a warm-up. Returns the times, each run's stats and the last run's result.
fn time_method(
    engine: &Engine,
    t: &Tokenized,
    method: &dyn crate::methods::Method,
    reps: usize,
    mem: &mut MemWatch,
) -> Result<(Vec<f64>, Vec<Stats>, Assembled)> {
    let dev = engine.model.device();
    let mut times = Vec::with_capacity(reps);
    let mut stats = Vec::with_capacity(reps);
    let mut last = None;
    for rep in 0..=reps {
        drop(last.take());
        sync(dev)?;
        let t0 = Instant::now();
        let prepared = engine.prepare(t)?;
        if let Some(i) = prepared
            .sources
            .iter()
            .position(|s| *s != crate::engine::Source::Store)
        {
            return Err(Error::InvalidInput(format!(
                "segment {i} was not found in the store and was recomputed; the timing would \
                 include ingestion"
            )));
        }
        let mut a = engine.assemble_prepared(&prepared, method)?;
        drop(prepared);
        sync(dev)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        mem.sample();
        a.stats.ttft_ms = ms;
        if rep > 0 {
            times.push(ms);
            stats.push(a.stats.clone());
        }
        last = Some(a);
    }
    let last = last.ok_or_else(|| Error::InvalidInput("no repetitions ran".into()))?;
    Ok((times, stats, last))
}

/// Batch-1 decode with [`Model::forward`]: one warm-up step, then `steps` timed ones.
fn decode_single(
    model: &Model,
    cache: &mut KvCache,
    first: &Tensor,
    steps: usize,
) -> Result<Vec<f64>> {
    let dev = model.device();
    let mut tok = argmax_rows(first)?[0];
    let start = cache.next_position();
    let mut out = Vec::with_capacity(steps);
    for step in 0..=steps {
        let pos = start + step as u32;
        sync(dev)?;
        let t0 = Instant::now();
        let o = model.forward(&[tok], &[pos], cache, Logits::Last, &[])?;
        let logits = o
            .logits
            .ok_or_else(|| Error::InvalidInput("forward returned no logits".into()))?;
        tok = argmax_rows(&logits)?[0];
        sync(dev)?;
        if step > 0 {
            out.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(out)
}

/// Decode tokens/s with [`Model::decode_batch`] at batch 1, 8, 32, 64, 128, ... over copies
/// of `base`, until `--max-batch`, the device's free memory, or an allocation failure.
fn decode_batches(
    model: &Model,
    base: &KvCache,
    kv: &str,
    args: &BenchGpuArgs,
    mem: &mut MemWatch,
) -> Result<Vec<BatchRow>> {
    let dev = model.device().clone();
    let c = &model.cfg;
    let mut sizes = vec![1usize, 8, 32];
    while *sizes.last().unwrap_or(&1) < args.max_batch {
        let next = sizes.last().copied().unwrap_or(1) * 2;
        sizes.push(next);
    }
    sizes.retain(|&b| b <= args.max_batch);
    let mut out = Vec::new();
    for b in sizes {
        // LayerKv doubles its capacity on the first append, so each sequence ends up holding
        // twice its rows; add one layer's stacked K/V for the batched attention and a margin.
        let t = base.len() + args.batch_steps + 2;
        let stacked = 2 * b * t * c.n_kv_heads * c.head_dim * model.dtype().size_in_bytes();
        let need = 2 * b * base.bytes() + 2 * stacked + (1usize << 30);
        let mut row = BatchRow::not_run(kv, b);
        if let Some((free, _)) = mem_info(&dev) {
            if need > free {
                row.skipped = Some(format!(
                    "would need ~{:.1} GiB, {:.1} GiB free",
                    need as f64 / GIB,
                    free as f64 / GIB
                ));
                out.push(row);
                break;
            }
        }
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            time_batch(model, base, b, args.batch_steps, args.seed, mem)
        }));
        let _ = sync(&dev);
        let failed = match attempt {
            Ok(Ok((steps, used))) => {
                let m = med(&steps);
                row.step_ms_median = Some(m);
                row.tok_s = Some(b as f64 * 1e3 / m);
                row.step_ms_all = steps;
                row.mem_used_gib = used.map(|u| u as f64 / GIB);
                false
            }
            Ok(Err(e)) => {
                row.failed = Some(e.to_string());
                true
            }
            Err(_) => {
                row.failed = Some("panicked (see stderr)".into());
                true
            }
        };
        out.push(row);
        if failed {
            break;
        }
    }
    Ok(out)
}

fn time_batch(
    model: &Model,
    base: &KvCache,
    b: usize,
    steps: usize,
    seed: u64,
    mem: &mut MemWatch,
) -> Result<(Vec<f64>, Option<usize>)> {
    let dev = model.device();
    let mut caches = (0..b)
        .map(|_| deep_copy(base))
        .collect::<Result<Vec<_>>>()?;
    let mut toks = random_tokens(b, model.cfg.vocab, seed + b as u64);
    let mut pos = vec![base.next_position(); b];
    let mut out = Vec::with_capacity(steps);
    let mut used = None;
    for step in 0..=steps {
        sync(dev)?;
        let t0 = Instant::now();
        let logits = model.decode_batch(&toks, &pos, &mut caches)?;
        toks = argmax_rows(&logits)?;
        sync(dev)?;
        if step > 0 {
            out.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        used = mem.sample().or(used);
        for p in &mut pos {
            *p += 1;
        }
    }
    Ok((out, used))
}
