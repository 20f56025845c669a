//! The benchmark commands: `bench` (QA methods), `bench-reuse`, `bench-speed`; their code is
//! in the library's `bench` module.

use std::path::{Path, PathBuf};

use anyhow::Result;
use samkv::fetch;
use samkv::model::WeightMode;

use super::{engine, Cli, ModelArgs};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bench: samkv::bench::qa::BenchArgs,
}

pub fn run(cli: &Cli, models_dir: &Path, b: &BenchArgs) -> Result<()> {
    let specs = b.bench.plan()?;
    let mut e = engine(cli, models_dir, &b.model)?;
    // Documents are prefilled with the side data the benchmarked methods read.
    let methods = specs
        .iter()
        .map(|s| s.config.build())
        .collect::<samkv::Result<Vec<_>>>()?;
    let refs: Vec<&dyn samkv::methods::Method> = methods.iter().map(|m| m.as_ref()).collect();
    e.side_data = samkv::methods::SideData::of(&refs);
    let extra = [
        ("model", b.model.model.clone()),
        ("weights", format!("{:?}", b.model.weights)),
    ];
    let s = samkv::bench::qa::run(&e, &b.bench, &specs, &extra)?;
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

#[derive(clap::Args)]
pub struct BenchReuseArgs {
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
}

pub fn reuse(cli: &Cli, models_dir: &Path, a: &BenchReuseArgs) -> Result<()> {
    let BenchReuseArgs {
        model,
        data,
        docs,
        doc_tokens,
        reps,
    } = a;
    let mut e = engine(cli, models_dir, model)?;
    let args = samkv::bench::reuse::ReuseBenchArgs {
        data: data.clone(),
        docs: *docs,
        doc_tokens: *doc_tokens,
        reps: *reps,
    };
    let b = samkv::bench::reuse::run(&mut e, &args)?;
    println!(
        "model {} ({} threads)\n{}",
        model.model,
        candle_core::utils::get_num_threads(),
        samkv::bench::reuse::markdown(&b)
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchSpeedArgs {
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
}

pub fn speed(models_dir: &Path, a: &BenchSpeedArgs) -> Result<()> {
    let BenchSpeedArgs {
        model,
        weights,
        lengths,
        decode,
        reps,
        no_anchor,
    } = a;
    let path = fetch::resolve_model(model, models_dir, true)?;
    samkv::bench::speed::run_cli(&path, lengths, *weights, *decode, *reps, !no_anchor)?;
    Ok(())
}
