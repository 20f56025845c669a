//! The handlers of `samkv ask`, `samkv ingest` and `samkv store` (part of the binary, not of
//! the library).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use samkv::engine::{generate, Progress, Prompt, Sampling};
use samkv::methods::MethodConfig;
use samkv::store;

use crate::{engine, Cli, ModelArgs};

#[derive(clap::Args)]
pub struct AskArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    method: MethodConfig,
    /// A document file (repeatable), in the order given. Without documents (and without
    /// --index) the question is answered plainly, by the model's own chat.
    #[arg(long = "doc")]
    docs: Vec<PathBuf>,
    /// Instruction before the documents (default: the LongBench QA instruction).
    #[arg(long)]
    preamble: Option<String>,
    /// System message, passed to the chat template as its system role (default: the
    /// template's own).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the answer contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Without --doc: pick documents from this BM25 index (see `ingest --index`).
    #[arg(long)]
    index: Option<PathBuf>,
    /// Number of documents picked from --index (`--top-k` is the sampling knob).
    #[arg(long, default_value_t = 3)]
    retrieve: usize,
    /// Print the method's statistics as JSON on stderr.
    #[arg(long)]
    stats: bool,
    /// The question.
    question: String,
}

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

/// A progress bar on stderr for documents being prefilled; indicatif hides it when stderr
/// is not a terminal. It appears with the first document that is not in the store.
fn prefill_bar(what: &str) -> Result<indicatif::ProgressBar> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template(&format!(
        "{{spinner}} {what} {{pos}}/{{len}} [{{bar:30}}] {{elapsed}} {{msg}}"
    ))?);
    Ok(bar)
}

fn on_progress<'a>(
    bar: &'a indicatif::ProgressBar,
    names: &'a [String],
) -> impl FnMut(Progress) + 'a {
    move |p| match p {
        Progress::Prefilling { index, of, tokens } => {
            if bar.length() == Some(0) {
                bar.set_length(of as u64);
                bar.enable_steady_tick(std::time::Duration::from_millis(200));
            }
            let name = names.get(index).map_or("", String::as_str);
            bar.set_position(index as u64);
            bar.set_message(format!("prefilling {name} ({tokens} tokens)"));
        }
        Progress::Ready { index, .. } => bar.set_position(index as u64 + 1),
    }
}

pub fn ask(cli: &Cli, models_dir: &Path, a: &AskArgs) -> Result<()> {
    if a.question.trim().is_empty() {
        bail!("the question is empty; ask something");
    }
    let method = a.method.build()?;
    let mut e = engine(cli, models_dir, &a.model)?;
    // New documents get the side data this method reads (SamKV's query summaries, say).
    e.side_data = method.side_data();
    let mut documents = Vec::new();
    let mut names = Vec::new();
    for p in &a.docs {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("reading document {}", p.display()))?;
        documents.push(text);
        names.push(p.display().to_string());
    }
    if let (true, Some(ix)) = (a.docs.is_empty(), &a.index) {
        let hits = samkv::retrieval::Retriever::open(ix)?.search(&a.question, a.retrieve)?;
        if hits.is_empty() {
            bail!(
                "the index {} has nothing matching the question",
                ix.display()
            );
        }
        eprintln!("retrieved {} from {}:", hits.len(), ix.display());
        for (i, h) in hits.iter().enumerate() {
            let head: String = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
            let head: String = head.chars().take(70).collect();
            eprintln!("  {}. {} (score {:.2}) {head}...", i + 1, h.id, h.score);
        }
        for h in hits {
            names.push(h.id);
            documents.push(h.text);
        }
    }
    let prompt = if documents.is_empty() {
        // Nothing to retrieve over: the model's own chat, with the question alone.
        Prompt {
            question: a.question.clone(),
            system: a.system.clone(),
            ..Default::default()
        }
    } else {
        let rp = Prompt::for_question(&documents, &a.question);
        Prompt {
            preamble: a.preamble.clone().unwrap_or(rp.preamble),
            system: a.system.clone(),
            ..rp
        }
    };
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        max_new_tokens: a.max_tokens,
        stop: a.stop.clone(),
    };
    let t0 = Instant::now();
    let bar = prefill_bar("documents")?;
    let (mut asm, prefill) = if prompt.documents.is_empty() {
        (e.assemble_plain(&prompt)?, None)
    } else {
        let (asm, prep) = e.assemble_with(
            &prompt,
            method.as_ref(),
            &names,
            &mut on_progress(&bar, &names),
        )?;
        (asm, Some((prep.documents_computed(), prep.compute_ms)))
    };
    bar.finish_and_clear();
    let first_token_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut out = std::io::stdout();
    let logits = asm.logits.clone();
    let g = generate(
        &e.model,
        &e.tokenizer,
        &mut asm.cache,
        &logits,
        &sampling,
        &mut |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
            true
        },
    )?;
    println!();
    let s = &asm.stats;
    if a.stats {
        eprintln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "stats": s,
                "prefill_new_documents_ms": prefill.map_or(0.0, |p| p.1),
                "first_token_ms": first_token_ms,
                "decode_tok_s": g.decode_tok_s(),
                "finish": g.finish,
            }))?
        );
        return Ok(());
    }
    match prefill {
        None => eprintln!(
            "[{}: no documents, the model's own chat] first token after {:.0} ms ({} prompt tokens), decode {:.1} tok/s",
            s.method,
            first_token_ms,
            s.question_tokens,
            g.decode_tok_s()
        ),
        Some((new, prefill_ms)) => {
            // The method's TTFT counts loading and assembling; prefilling documents seen for
            // the first time is paid once (they are stored), so it is reported on its own.
            let fresh = if new == 0 {
                "all documents from the store".to_string()
            } else {
                format!(
                    "{:.0} ms prefilling {new} new document{} (now stored)",
                    prefill_ms,
                    if new == 1 { "" } else { "s" }
                )
            };
            eprintln!(
                "[{}] first token after {:.0} ms: {fresh}, then ttft {:.0} ms; KV kept {:.0}/{} context tokens ({:.1}%), recomputed {:.0}, decode {:.1} tok/s",
                s.method,
                first_token_ms,
                s.ttft_ms,
                s.kv_tokens_kept,
                s.context_tokens,
                100.0 * s.kept_fraction,
                s.recomputed_tokens,
                g.decode_tok_s()
            );
        }
    }
    Ok(())
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

pub fn ingest(
    cli: &Cli,
    models_dir: &Path,
    m: &ModelArgs,
    paths: &[PathBuf],
    index: Option<&Path>,
) -> Result<()> {
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

pub fn store_cmd(cli: &Cli, cmd: &StoreCmd) -> Result<()> {
    // The same spec as every other command (a directory or redis://), but the persistent
    // store itself: the memory tier would only hide what is on disk or in Redis.
    let spec = cli
        .store
        .clone()
        .unwrap_or_else(|| store::default_store_dir().display().to_string());
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
