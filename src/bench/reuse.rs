//! The store benchmark (`samkv bench-reuse`): time to first token of Reuse against Recompute
//! for documents of a fixed size, with the cost of loading the bytes from disk and from the
//! memory tier, for each storage dtype (f32, f16, bf16, q8), each dtype's store write and load
//! time per entry, and its fidelity against the f32 and f16 stores.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{Engine, Prompt};
use crate::eval::{kl_divergence, load_examples, markdown_table, median};
use crate::methods::{Method, Recompute, Reuse};
use crate::model::Logits;
use crate::store::{DiskStore, KvStore, MemoryTier, StoreDtype};
use crate::{Error, Result};

pub struct ReuseBenchArgs {
    pub data: std::path::PathBuf,
    pub docs: usize,
    pub doc_tokens: usize,
    pub reps: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct DtypeRow {
    pub dtype: String,
    pub bytes_per_token: f64,
    pub ingest_ms_per_doc: f64,
    pub reuse_ttft_memory_ms: f64,
    pub reuse_ttft_disk_ms: f64,
    pub load_disk_ms_per_mb: f64,
    pub load_memory_ms_per_mb: f64,
    /// Median over reps of the mean time to put one entry into a fresh disk store (encode,
    /// checksum, atomic write).
    pub write_ms_per_entry: f64,
    /// Median over reps of the mean time to get one entry from that store (read, checksum,
    /// decode) and turn every layer's K/V into the activation dtype (q8: dequantize).
    pub load_ms_per_entry: f64,
    pub kl_vs_recompute: f64,
    pub max_logit_diff_vs_f32: f32,
    /// Against the f16 store (the default before q8): NaN for the rows before it.
    pub max_logit_diff_vs_f16: f32,
    pub kl_vs_f16: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ReuseBench {
    pub context_tokens: usize,
    pub question_tokens: usize,
    pub recompute_ttft_ms: f64,
    pub question_only_prefill_ms: f64,
    pub rows: Vec<DtypeRow>,
}

/// Documents of about `n` tokens each, built from consecutive real passages.
fn documents(engine: &Engine, args: &ReuseBenchArgs) -> Result<(Vec<String>, String)> {
    let ex = load_examples(&args.data)?;
    let passages: Vec<&str> = ex
        .iter()
        .flat_map(|e| e.documents.iter().map(|d| d.text.as_str()))
        .collect();
    let mut docs = Vec::new();
    let mut cur = String::new();
    for p in passages {
        cur.push_str(p);
        cur.push('\n');
        let ids = engine.tokenizer.encode(&cur)?;
        if ids.len() >= args.doc_tokens {
            docs.push(engine.tokenizer.decode(&ids[..args.doc_tokens])?);
            cur.clear();
            if docs.len() == args.docs {
                break;
            }
        }
    }
    if docs.len() < args.docs {
        return Err(Error::InvalidInput(format!(
            "{} holds too little text for {} documents",
            args.data.display(),
            args.docs
        )));
    }
    Ok((docs, ex[0].question.clone()))
}

pub fn run(engine: &mut Engine, args: &ReuseBenchArgs) -> Result<ReuseBench> {
    let (docs, question) = documents(engine, args)?;
    let prompt = Prompt::for_question(&docs, &question);
    let tokenized = engine.tokenize(&prompt)?;
    let context_tokens =
        tokenized.prefix.len() + tokenized.documents.iter().map(Vec::len).sum::<usize>();
    let reps = args.reps.max(1);
    let ttft = |e: &Engine, m: &dyn Method| -> Result<(f64, Vec<f32>, f64)> {
        let (a, prep) = e.assemble(&prompt, m)?;
        Ok((a.stats.ttft_ms, a.logits.to_vec1()?, prep.load_ms))
    };

    // Recompute reads no stored KV: any store will do.
    engine.store = Arc::new(MemoryTier::new(usize::MAX, None));
    let mut rec = Vec::new();
    let mut rec_logits = Vec::new();
    for _ in 0..reps {
        let (t, l, _) = ttft(engine, &Recompute)?;
        rec.push(t);
        rec_logits = l;
    }
    let mut q_only = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let pos: Vec<u32> = (0..tokenized.question.len() as u32).collect();
        let mut c = engine.model.new_cache()?;
        engine
            .model
            .forward(&tokenized.question, &pos, &mut c, Logits::Last, &[])?;
        q_only.push(t0.elapsed().as_secs_f64() * 1e3);
    }

    let mut rows = Vec::new();
    let mut f32_logits: Option<Vec<f32>> = None;
    let mut f16_logits: Option<Vec<f32>> = None;
    for dt in [
        StoreDtype::F32,
        StoreDtype::F16,
        StoreDtype::BF16,
        StoreDtype::Q8,
    ] {
        let dir = tempfile::tempdir()?;
        let disk: Arc<dyn KvStore> = Arc::new(DiskStore::open(dir.path())?);
        engine.store_dtype = dt;
        engine.store = disk.clone();
        let t0 = Instant::now();
        engine.prepare(&tokenized)?;
        let ingest_ms = t0.elapsed().as_secs_f64() * 1e3 / (docs.len() + 1) as f64;
        let bytes: u64 = disk.list()?.iter().map(|e| e.bytes).sum();
        let mb = bytes as f64 / (1 << 20) as f64;
        let (write_ms, load_ms) = entry_times(engine, disk.as_ref(), reps)?;

        let (mut disk_ttft, mut disk_load) = (Vec::new(), Vec::new());
        let mut logits = Vec::new();
        for _ in 0..reps {
            engine.store = Arc::new(MemoryTier::new(usize::MAX, Some(disk.clone()))); // cold memory tier
            let (t, l, load) = ttft(engine, &Reuse)?;
            disk_ttft.push(t);
            disk_load.push(load);
            logits = l;
        }
        let (mut mem_ttft, mut mem_load) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            // The last cold tier is now warm: every get is a memory hit.
            let (t, _, load) = ttft(engine, &Reuse)?;
            mem_ttft.push(t);
            mem_load.push(load);
        }
        let diff = |r: &[f32]| {
            r.iter()
                .zip(&logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max)
        };
        let max_diff = f32_logits.as_deref().map_or(0.0, diff);
        rows.push(DtypeRow {
            dtype: dt.name().into(),
            bytes_per_token: bytes as f64 / context_tokens as f64,
            ingest_ms_per_doc: ingest_ms,
            reuse_ttft_memory_ms: median(&mem_ttft).unwrap_or(f64::NAN),
            reuse_ttft_disk_ms: median(&disk_ttft).unwrap_or(f64::NAN),
            load_disk_ms_per_mb: median(&disk_load).unwrap_or(f64::NAN) / mb,
            load_memory_ms_per_mb: median(&mem_load).unwrap_or(f64::NAN) / mb,
            write_ms_per_entry: write_ms,
            load_ms_per_entry: load_ms,
            kl_vs_recompute: kl_divergence(&rec_logits, &logits),
            max_logit_diff_vs_f32: max_diff,
            max_logit_diff_vs_f16: f16_logits.as_deref().map_or(f32::NAN, diff),
            kl_vs_f16: f16_logits
                .as_deref()
                .map_or(f64::NAN, |r| kl_divergence(r, &logits)),
        });
        match dt {
            StoreDtype::F32 => f32_logits = Some(logits),
            StoreDtype::F16 => f16_logits = Some(logits),
            _ => {}
        }
    }
    Ok(ReuseBench {
        context_tokens,
        question_tokens: tokenized.question.len(),
        recompute_ttft_ms: median(&rec).unwrap_or(f64::NAN),
        question_only_prefill_ms: median(&q_only).unwrap_or(f64::NAN),
        rows,
    })
}

/// (write, load) ms per entry, medians over `reps` of the mean over the entries of `from`:
/// each rep puts every entry into a fresh disk store, then gets each back and converts its K/V
/// to the activation dtype on the model's device. The files were just written, so reads come
/// from the page cache: this is the decode cost, not the disk's.
fn entry_times(engine: &Engine, from: &dyn KvStore, reps: usize) -> Result<(f64, f64)> {
    let mut docs = Vec::new();
    for e in from.list()? {
        if let Some(d) = from.get(&e.id)? {
            docs.push(d);
        }
    }
    if docs.is_empty() {
        return Err(Error::Store("no entries to time".into()));
    }
    let n = docs.len() as f64;
    let (m, mut write, mut load) = (&engine.model, Vec::new(), Vec::new());
    for _ in 0..reps {
        let dir = tempfile::tempdir()?;
        let store = DiskStore::open(dir.path())?;
        let t0 = Instant::now();
        for d in &docs {
            store.put(d)?;
        }
        write.push(t0.elapsed().as_secs_f64() * 1e3 / n);
        let t0 = Instant::now();
        for d in &docs {
            let back = store
                .get(&d.id)?
                .ok_or_else(|| Error::Store(format!("entry {} vanished", d.id)))?;
            for l in 0..back.k.len() {
                back.layer_kv(l, None, m.device(), m.dtype())?;
            }
        }
        load.push(t0.elapsed().as_secs_f64() * 1e3 / n);
    }
    Ok((
        median(&write).unwrap_or(f64::NAN),
        median(&load).unwrap_or(f64::NAN),
    ))
}

pub fn markdown(b: &ReuseBench) -> String {
    let mut s = format!(
        "context {} tokens + question {} tokens; Recompute ttft {:.0} ms; question-only prefill {:.0} ms\n\n",
        b.context_tokens, b.question_tokens, b.recompute_ttft_ms, b.question_only_prefill_ms
    );
    let rows: Vec<Vec<String>> = b
        .rows
        .iter()
        .map(|r| {
            vec![
                r.dtype.clone(),
                format!("{:.0}", r.bytes_per_token),
                format!("{:.0}", r.ingest_ms_per_doc),
                format!("{:.0}", r.reuse_ttft_disk_ms),
                format!("{:.0}", r.reuse_ttft_memory_ms),
                format!("{:.1}x", b.recompute_ttft_ms / r.reuse_ttft_memory_ms),
                format!("{:.2}", r.load_disk_ms_per_mb),
                format!("{:.2}", r.load_memory_ms_per_mb),
                format!("{:.1}", r.write_ms_per_entry),
                format!("{:.1}", r.load_ms_per_entry),
                format!("{:.2e}", r.kl_vs_recompute),
                format!("{:.4}", r.max_logit_diff_vs_f32),
                format!("{:.4}", r.max_logit_diff_vs_f16),
                format!("{:.2e}", r.kl_vs_f16),
            ]
        })
        .collect();
    s.push_str(&markdown_table(
        &[
            "store dtype",
            "bytes/token",
            "ingest ms/doc",
            "Reuse ttft, disk (ms)",
            "Reuse ttft, memory (ms)",
            "Recompute / Reuse (memory)",
            "load ms/MB disk",
            "load ms/MB memory",
            "write ms/entry",
            "load+dequant ms/entry",
            "KL(Recompute||Reuse)",
            "max |logit - f32 store|",
            "max |logit - f16 store|",
            "KL(f16 store||this)",
        ],
        &rows,
    ));
    s
}
