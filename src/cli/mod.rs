//! The `samkv` command line: one module per command, each with its arguments and `run`;
//! here the global options, the command list and what commands share (device, store, engine).

mod ask;
mod bench;
mod ingest;
mod model;
mod serve;
mod store;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use samkv::engine::{load_model, load_tokenizer, Engine};
use samkv::fetch;
use samkv::model::{LoadOptions, RuntimeFlags, WeightMode};
use samkv::store::{self as kvstore, KvStore};

#[derive(Parser)]
#[command(
    name = "samkv",
    version,
    about = "RAG inference with per-document KV reuse and SamKV sparse attention"
)]
pub struct Cli {
    /// Where models are stored and fetched to.
    #[arg(long, global = true, env = "SAMKV_MODELS")]
    pub models_dir: Option<PathBuf>,
    /// KV store: a directory (default ./samkv-store) or a redis://host:port URL.
    #[arg(long, global = true, env = "SAMKV_STORE")]
    pub store: Option<String>,
    /// In-memory KV tier budget, MiB.
    #[arg(long, global = true, default_value_t = 1024)]
    pub store_memory_mb: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// Log more (repeat for debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A known model name (see `samkv model list`), a GGUF file or a Hugging Face directory.
    #[arg(long, short = 'm', default_value = fetch::DEFAULT_MODEL)]
    pub model: String,
    /// How GGUF weights are held: auto (quantized for decode, dense for prefill), dense, quantized.
    #[arg(long, value_enum, default_value_t = WeightMode::Auto)]
    pub weights: WeightMode,
    /// Activation dtype: f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Storage dtype of cached K/V: f32, f16, bf16 or q8 (int8 with an f16 scale per 32
    /// channels; about half of f16's bytes).
    #[arg(long, default_value = "f16")]
    pub store_dtype: String,
    /// Do not wrap prompts in the model's chat template.
    #[arg(long)]
    pub no_chat: bool,
    /// Shape-only: seeded random weights at a known model's shape (llama-3.1-8b,
    /// smollm2-135m) with the tokenizer of --model and its vocabulary size. For speed and
    /// memory runs on hardware the real weights cannot reach; the answers are noise.
    #[arg(long, value_name = "SHAPE")]
    pub shape: Option<String>,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Fetch or list models.
    Model {
        #[command(subcommand)]
        cmd: model::ModelCmd,
    },
    /// Answer a question over documents (or, without any, plainly), streaming the answer.
    Ask(Box<ask::AskArgs>),
    /// Prefill documents one by one and store their KV.
    Ingest(ingest::IngestArgs),
    /// Serve an OpenAI-compatible HTTP API.
    Serve(Box<serve::ServeArgs>),
    /// Benchmark methods on a QA data file: F1, agreement with Recompute, cost.
    Bench(Box<bench::BenchArgs>),
    /// Time to first token of Reuse vs Recompute, store load cost and dtype fidelity.
    BenchReuse(bench::BenchReuseArgs),
    /// Prefill and decode tokens/s at several prompt lengths, next to llama.cpp (through
    /// llama-cpp-python, when installed) on the same GGUF file.
    BenchSpeed(bench::BenchSpeedArgs),
    /// Load-test a `samkv serve` on loopback: clients x methods over a stored corpus, each
    /// request 10 Zipf-drawn documents; requests/s, TTFT and inter-token latency p50/p99.
    BenchServe(Box<samkv::bench::serve::BenchServeArgs>),
    /// Inspect and manage the KV store.
    Store {
        #[command(subcommand)]
        cmd: store::StoreCmd,
    },
    /// The headline of several bench runs: one table (models x files) and agreement-vs-KV
    /// plots per model.
    BenchReport(Box<samkv::bench::headline::ReportArgs>),
    /// Time every method at production shape with random weights (e.g. on a GPU).
    BenchGpu(Box<samkv::bench::gpu::BenchGpuArgs>),
    /// Check the runtime on --device against the CPU, and the methods' invariants there.
    Selfcheck(samkv::selfcheck::SelfcheckArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    let models_dir = fetch::models_dir(cli.models_dir.as_deref());
    let dir = models_dir.as_path();
    match &cli.cmd {
        Cmd::Model { cmd } => model::run(dir, cmd),
        Cmd::Ask(a) => ask::run(&cli, dir, a),
        Cmd::Ingest(a) => ingest::run(&cli, dir, a),
        Cmd::Serve(a) => serve::run(&cli, dir, a),
        Cmd::Store { cmd } => store::run(&cli, cmd),
        Cmd::Bench(a) => bench::run(&cli, dir, a),
        Cmd::BenchSpeed(a) => bench::speed(dir, a),
        Cmd::BenchReuse(a) => bench::reuse(&cli, dir, a),
        Cmd::BenchServe(a) => {
            samkv::bench::serve::run(a, &store_spec(&cli))?;
            Ok(())
        }
        Cmd::BenchReport(a) => {
            print!("{}", samkv::bench::headline::run(a)?);
            Ok(())
        }
        Cmd::BenchGpu(a) => Ok(samkv::bench::gpu::run(a, device(&cli.device)?)?),
        Cmd::Selfcheck(a) => Ok(samkv::selfcheck::run(a, device(&cli.device)?, dir)?),
    }
}

pub fn device(spec: &str) -> Result<Device> {
    Ok(match spec {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)
            .context("opening CUDA device 0 (is this a --features cuda build?)")?,
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..]
                .parse()
                .context("device must be cpu, cuda or cuda:N")?;
            Device::new_cuda(n).with_context(|| format!("opening CUDA device {n}"))?
        }
        other => bail!("unknown device `{other}`: use cpu, cuda or cuda:N"),
    })
}

/// The store every command uses: `--store`, else $SAMKV_STORE, else ./samkv-store.
pub fn store_spec(cli: &Cli) -> String {
    cli.store
        .clone()
        .unwrap_or_else(|| kvstore::default_store_dir().display().to_string())
}

fn open_store(cli: &Cli) -> Result<Arc<dyn KvStore>> {
    Ok(kvstore::open_store(
        &store_spec(cli),
        cli.store_memory_mb << 20,
    )?)
}

pub fn engine(cli: &Cli, models_dir: &std::path::Path, m: &ModelArgs) -> Result<Engine> {
    let path = fetch::resolve_model(&m.model, models_dir, true)?;
    let device = device(&cli.device)?;
    let dtype = match &m.dtype {
        Some(d) => kvstore::parse_compute_dtype(d)?,
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
    };
    let opts = LoadOptions {
        device,
        dtype,
        weights: m.weights,
        flags: RuntimeFlags::from_env(),
    };
    let (model, tokenizer) = match &m.shape {
        None => load_model(&path, &opts).with_context(|| format!("loading {}", path.display()))?,
        Some(shape) => {
            let tokenizer = load_tokenizer(&path)
                .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
            let mut cfg = samkv::bench::gpu::shape_config(shape)?;
            // Every id the model can emit must decode to text, or streams lose tokens.
            cfg.vocab = tokenizer.vocab_size();
            tracing::warn!(
                "shape-only model: {shape} with random weights and a {}-token vocabulary \
                 (the tokenizer of {}); answers are noise",
                cfg.vocab,
                path.display()
            );
            let model = samkv::model::Model::random(cfg, 0, opts.dtype, &opts.device)?;
            (model, tokenizer)
        }
    };
    let mut e = Engine::new(model, tokenizer, open_store(cli)?);
    e.chat = !m.no_chat;
    e.store_dtype = kvstore::parse_dtype(&m.store_dtype)?;
    Ok(e)
}
