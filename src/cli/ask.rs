//! `samkv ask`: one question over documents (or, without any, plainly), the answer streamed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use samkv::engine::{generate, Progress, Prompt, Sampling};
use samkv::methods::MethodConfig;

use super::{engine, Cli, ModelArgs};

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

pub fn run(cli: &Cli, models_dir: &Path, a: &AskArgs) -> Result<()> {
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
