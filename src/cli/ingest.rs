//! `samkv ingest`: prefill documents one by one and store their KV.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::{engine, Cli, ModelArgs};

#[derive(clap::Args)]
pub struct IngestArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Files, or directories of .txt/.md files.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Also add the documents to this BM25 index (for `ask --index`, `serve --index`).
    #[arg(long)]
    index: Option<PathBuf>,
}

/// Files to ingest: each file given, and the .txt/.md files of each directory given.
fn ingest_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "txt" || x == "md"))
                .collect();
            v.sort();
            files.extend(v);
        } else if p.exists() {
            files.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(files)
}

pub fn run(cli: &Cli, models_dir: &Path, a: &IngestArgs) -> Result<()> {
    let (m, paths, index) = (&a.model, &a.paths, a.index.as_deref());
    let e = engine(cli, models_dir, m)?;
    let files = ingest_files(paths)?;
    let mut indexed = Vec::new();
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{spinner} {bar:40} {pos}/{len} docs {per_sec} eta {eta} {msg}",
    )?);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let (mut stored, mut skipped) = (0, 0);
    let mut failed: Vec<String> = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let bytes = std::fs::read(f).with_context(|| format!("reading {name}"))?;
        let Ok(text) = String::from_utf8(bytes) else {
            // One odd file must not stop a directory of good ones.
            // `suspend`, not `println`: a hidden bar (stderr not a terminal) drops printlns.
            bar.suspend(|| {
                eprintln!("warning: skipped {name}: not UTF-8 text (convert it, e.g. with iconv)")
            });
            skipped += 1;
            bar.inc(1);
            continue;
        };
        let t = e.tokenize_document(&text)?;
        bar.set_message(format!(
            "prefilling {name} ({} tokens)",
            t.documents[0].len()
        ));
        let id = e.doc_id(&t.prefix, &t.documents[0]);
        // A document counts as stored only once the store said so; the others are counted
        // and make the command fail at the end (a full disk must not look like success).
        let new = match e.ingest(&t, Some(&name)) {
            Ok(r) => !r.cached,
            Err(err) if err.is_store() => {
                bar.suspend(|| eprintln!("error: {name} ({id}) was not stored: {err}"));
                failed.push(name);
                bar.inc(1);
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        stored += new as usize;
        bar.suspend(|| {
            println!(
                "{} {} ({} tokens) {name}",
                if new { "stored" } else { "cached" },
                id,
                t.documents[0].len(),
            )
        });
        bar.inc(1);
        if index.is_some() {
            indexed.push((samkv::retrieval::text_id(&text), text));
        }
    }
    bar.finish_and_clear();
    if let Some(ix) = index {
        samkv::retrieval::Retriever::open(ix)?.add(&indexed)?;
        println!("{} documents indexed in {}", indexed.len(), ix.display());
    }
    let read = files.len() - skipped;
    let skipped = if skipped == 0 {
        String::new()
    } else {
        format!("; {skipped} skipped (not UTF-8 text)")
    };
    let failures = if failed.is_empty() {
        String::new()
    } else {
        format!("; {} failed to store", failed.len())
    };
    println!(
        "{read} documents: {stored} newly stored, {} already cached{failures}{skipped}",
        read - stored - failed.len(),
    );
    if !failed.is_empty() {
        bail!(
            "{} of {read} documents could not be stored (first: {}); see the errors above, \
             fix the store (free disk space, start Redis) and run ingest again",
            failed.len(),
            failed[0]
        );
    }
    Ok(())
}
