//! `cargo run --release --example bench_speed -- MODEL [--lengths 512,2048,4096]
//! [--weights auto|dense|quantized] [--decode 32] [--reps 3] [--no-anchor]`
//! (the same as `samkv bench-speed`).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use samkv::model::WeightMode;

#[derive(Parser)]
struct Args {
    model: PathBuf,
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 2048, 4096])]
    lengths: Vec<usize>,
    #[arg(long, default_value = "auto")]
    weights: String,
    #[arg(long, default_value_t = 32)]
    decode: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long)]
    no_anchor: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let weights = WeightMode::from_str(&a.weights, true).map_err(anyhow::Error::msg)?;
    samkv::speed::run_cli(&a.model, &a.lengths, weights, a.decode, a.reps, !a.no_anchor)?;
    Ok(())
}
