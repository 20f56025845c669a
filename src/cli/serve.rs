//! `samkv serve`: the OpenAI-compatible HTTP API.

use std::path::Path;

use anyhow::Result;
use samkv::methods::MethodConfig;

use super::{engine, store_spec, Cli, ModelArgs};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    method: MethodConfig,
    #[command(flatten)]
    opts: samkv::server::ServeOptions,
}

pub fn run(cli: &Cli, models_dir: &Path, a: &ServeArgs) -> Result<()> {
    let e = engine(cli, models_dir, &a.model)?;
    Ok(samkv::server::serve(
        e,
        &a.model.model,
        &store_spec(cli),
        a.method.clone(),
        a.opts.clone(),
    )?)
}
