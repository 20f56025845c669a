//! `samkv store`: inspect and maintain the persistent store (a directory or Redis).

use anyhow::{bail, Result};
use samkv::store;

use super::{store_spec, Cli};

#[derive(clap::Subcommand)]
pub enum StoreCmd {
    /// List entries: id, tokens, bytes, model, and where the text came from.
    Ls,
    /// Entry count and bytes.
    Stats,
    /// Remove entries by id.
    Rm { ids: Vec<String> },
    /// Remove temporary files of writers that are gone (their process id no longer exists)
    /// or older than --tmp-max-age; with --remove-corrupt, also entries that fail
    /// verification. Entries that cannot be read are reported and kept.
    Gc {
        #[arg(long)]
        remove_corrupt: bool,
        /// Seconds after which a temporary file is removed even if its writer's process id
        /// is alive (it may have been reused, or the writer runs on another host).
        #[arg(long, default_value_t = 3600)]
        tmp_max_age: u64,
    },
    /// Check every entry's checksum and shapes.
    Verify,
}

pub fn run(cli: &Cli, cmd: &StoreCmd) -> Result<()> {
    // The same spec as every other command (a directory or redis://), but the persistent
    // store itself: the memory tier would only hide what is on disk or in Redis.
    let spec = store_spec(cli);
    let disk = store::open_backend(&spec)?;
    let shown = store::shown_spec(&spec);
    match cmd {
        StoreCmd::Ls => {
            for e in disk.list()? {
                println!(
                    "{}  {:>6} tokens  {:>10} bytes  model {}  {}",
                    e.id,
                    e.tokens,
                    e.bytes,
                    &e.model_fingerprint[..12.min(e.model_fingerprint.len())],
                    e.source.as_deref().unwrap_or("-")
                );
            }
        }
        StoreCmd::Stats => {
            let s = disk.stats()?;
            println!(
                "{shown}: {} entries, {:.1} MiB",
                s.entries,
                s.bytes as f64 / (1 << 20) as f64
            );
        }
        StoreCmd::Rm { ids } => {
            for id in ids {
                let id = store::DocId::parse(id)?;
                println!(
                    "{id}: {}",
                    if disk.remove(&id)? {
                        "removed"
                    } else {
                        "not found"
                    }
                );
            }
        }
        StoreCmd::Gc {
            remove_corrupt,
            tmp_max_age,
        } => {
            let r = disk.gc(
                *remove_corrupt,
                std::time::Duration::from_secs(*tmp_max_age),
            )?;
            for u in &r.unreadable {
                eprintln!("unreadable (kept): {} ({})", u.path.display(), u.reason);
            }
            println!(
                "removed {} temporary files ({} bytes); {} entries checked, {} corrupt, {} removed, {} unreadable",
                r.tmp_removed,
                r.tmp_bytes_removed,
                r.checked,
                r.corrupt.len(),
                r.corrupt_removed,
                r.unreadable.len()
            );
            if !r.unreadable.is_empty() {
                bail!(
                    "{} entries could not be read or removed; check their permissions",
                    r.unreadable.len()
                );
            }
        }
        StoreCmd::Verify => {
            let v = disk.verify()?;
            for c in &v.corrupt {
                println!("corrupt: {} ({})", c.path.display(), c.reason);
            }
            for u in &v.unreadable {
                println!("unreadable: {} ({})", u.path.display(), u.reason);
            }
            if !v.corrupt.is_empty() || !v.unreadable.is_empty() {
                bail!(
                    "{} of {} entries corrupt, {} unreadable; `samkv store gc --remove-corrupt` \
                     removes corrupt ones (unreadable ones are kept: check their permissions)",
                    v.corrupt.len(),
                    v.checked,
                    v.unreadable.len()
                );
            }
            println!("all entries verified");
        }
    }
    Ok(())
}
