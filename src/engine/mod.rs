//! The engine: tokenizes a request into preamble, documents and question, loads (or computes
//! and stores) each document's KV, hands them to a [`Method`] to assemble, and decodes.

pub mod generate;
pub mod prompt;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

pub use generate::{generate, FinishReason, Generation, Sampling, Step, TextDecoder};
pub use prompt::Prompt;

use crate::methods::{Assembled, Context, Method, Recompute, Segment, SideData};
use crate::model::{mean_rows, Logits, Model};
use crate::store::{
    doc_id, now_unix, prefix_hash, DocId, DocMeta, KvStore, StoreDtype, StoredDoc, FORMAT_VERSION,
};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The method reported for a request without documents ([`Engine::assemble_plain`]).
pub const PLAIN_METHOD: &str = "none";

/// What [`Engine::ingest`] did with a document.
#[derive(Clone, Debug)]
pub struct Ingested {
    pub id: DocId,
    pub tokens: usize,
    /// It was already stored (nothing computed).
    pub cached: bool,
}

/// What [`Engine::prepare_with`] reports about each document, in order.
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// Document `index` (of `of`, 0-based) is not in the store and is being prefilled.
    Prefilling {
        index: usize,
        of: usize,
        tokens: usize,
    },
    /// Document `index` is ready, from `source`, after `ms`.
    Ready {
        index: usize,
        of: usize,
        source: Source,
        ms: f64,
    },
}

/// The request's token ids, segment by segment.
#[derive(Clone, Debug)]
pub struct Tokenized {
    pub prefix: Vec<u32>,
    pub documents: Vec<Vec<u32>>,
    pub question: Vec<u32>,
}

/// Where a document's KV came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Store,
    Computed,
}

pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub store: Arc<dyn KvStore>,
    /// Wrap prompts in the model's chat template.
    pub chat: bool,
    /// Dtype K/V are stored in.
    pub store_dtype: StoreDtype,
    /// Side data computed with every newly prefilled document: what the methods this engine
    /// runs declare ([`Method::side_data`]). Default: every method's with its default
    /// settings, for a store that requests of any method share.
    pub side_data: Vec<SideData>,
}

/// A request's context, ready for a method, with where each document came from.
pub struct Prepared {
    pub segments: Vec<Segment>,
    pub question: Vec<u32>,
    pub sources: Vec<Source>,
    pub load_ms: f64,
    pub compute_ms: f64,
    /// Segments computed but not stored, with the store's error (disk full, Redis down):
    /// fine for answering, fatal for an ingest, which promises the entry is stored.
    pub unstored: Vec<(usize, Error)>,
}

impl Prepared {
    /// The method's view of the request.
    pub fn context<'a>(&self, model: &'a Model) -> Context<'a> {
        Context {
            model,
            segments: self.segments.clone(),
            question: self.question.clone(),
        }
    }

    /// Documents (not the preamble) computed for this request rather than read from the store.
    pub fn documents_computed(&self) -> usize {
        self.segments
            .iter()
            .zip(&self.sources)
            .filter(|(s, src)| !s.is_preamble && **src == Source::Computed)
            .count()
    }

    /// Err with the first store failure, for callers that promise the KV is stored.
    pub fn require_stored(&mut self) -> Result<()> {
        match self.unstored.drain(..).next() {
            None => Ok(()),
            Some((_, e)) => Err(e),
        }
    }
}

/// A [`Prepared`] built one segment at a time by [`Engine::prepare_next`].
pub struct PrepareBuilder {
    t: Tokenized,
    names: Vec<String>,
    prefix_kv: Option<Arc<StoredDoc>>,
    /// Position of the next segment's first token.
    start: u32,
    out: Prepared,
}

impl PrepareBuilder {
    /// A request's segments, none ready yet; `names[i]` is recorded with document i if it
    /// is computed.
    pub fn new(t: &Tokenized, names: &[String]) -> PrepareBuilder {
        PrepareBuilder {
            t: t.clone(),
            names: names.to_vec(),
            prefix_kv: None,
            start: 0,
            out: Prepared {
                segments: Vec::with_capacity(t.documents.len() + 1),
                question: t.question.clone(),
                sources: Vec::with_capacity(t.documents.len() + 1),
                load_ms: 0.0,
                compute_ms: 0.0,
                unstored: Vec::new(),
            },
        }
    }

    /// Tokens of the next segment to prepare (what its prefill costs if it is not stored),
    /// None when all are ready.
    pub fn next_tokens(&self) -> Option<usize> {
        let has_prefix = !self.t.prefix.is_empty();
        let i = self.out.segments.len();
        if has_prefix && i == 0 {
            return Some(self.t.prefix.len());
        }
        self.t
            .documents
            .get(i - usize::from(has_prefix))
            .map(Vec::len)
    }

    pub fn is_done(&self) -> bool {
        self.next_tokens().is_none()
    }

    /// The segments ready so far (all of them once [`PrepareBuilder::is_done`]).
    pub fn finish(self) -> Prepared {
        self.out
    }
}

impl Engine {
    pub fn new(model: Model, tokenizer: Tokenizer, store: Arc<dyn KvStore>) -> Self {
        Self {
            model,
            tokenizer,
            store,
            chat: true,
            store_dtype: StoreDtype::F16,
            side_data: SideData::for_default_methods(),
        }
    }

    /// Text before the preamble and after the question: the chat template's halves around
    /// the last user turn, or (no template, or `chat` off) the system message and earlier
    /// turns as plain lines.
    fn wrap(&self, p: &Prompt) -> Result<(String, String)> {
        if self.chat && self.tokenizer.has_chat_template() {
            return self
                .tokenizer
                .chat_wrap_with(p.system.as_deref(), &p.history);
        }
        let mut pre = String::new();
        if let Some(s) = p.system.as_deref().filter(|s| !s.is_empty()) {
            pre.push_str(&format!("{s}\n\n"));
        }
        for m in &p.history {
            pre.push_str(&format!("{}: {}\n", m.role, m.content));
        }
        Ok((pre, String::new()))
    }

    pub fn tokenize(&self, p: &Prompt) -> Result<Tokenized> {
        if p.question.trim().is_empty() {
            return Err(Error::InvalidInput(
                "the question is empty; ask something".into(),
            ));
        }
        let (_, post) = self.wrap(p)?;
        let (prefix, documents) = self.tokenize_context(p)?;
        let question = self.tokenizer.encode(&format!("{}{post}", p.question))?;
        let total = prefix.len() + documents.iter().map(Vec::len).sum::<usize>() + question.len();
        if total >= self.model.cfg.max_context {
            return Err(Error::ContextTooLong {
                tokens: total,
                max: self.model.cfg.max_context,
            });
        }
        Ok(Tokenized {
            prefix,
            documents,
            question,
        })
    }

    /// The prefix (BOS, chat template up to the last user turn, preamble) and the documents,
    /// each tokenized on its own; the question is not needed for either.
    fn tokenize_context(&self, p: &Prompt) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
        let (pre, _) = self.wrap(p)?;
        let mut prefix = Vec::new();
        if self.tokenizer.add_bos() {
            prefix.extend(self.tokenizer.bos_id());
        }
        prefix.extend(self.tokenizer.encode(&format!("{pre}{}", p.preamble))?);
        let documents = p
            .documents
            .iter()
            .map(|d| self.tokenizer.encode(d))
            .collect::<Result<Vec<_>>>()?;
        if let Some(i) = documents.iter().position(|d| d.is_empty()) {
            return Err(Error::InvalidInput(format!("document {} is empty", i + 1)));
        }
        let total = prefix.len() + documents.iter().map(Vec::len).sum::<usize>();
        if total >= self.model.cfg.max_context {
            return Err(Error::ContextTooLong {
                tokens: total,
                max: self.model.cfg.max_context,
            });
        }
        Ok((prefix, documents))
    }

    /// One free-standing document for ingestion, laid out as `samkv ask` and chat requests
    /// without a system message lay it out (after the default preamble); no question.
    pub fn tokenize_document(&self, text: &str) -> Result<Tokenized> {
        let p = Prompt {
            preamble: Prompt::documents_preamble(),
            documents: vec![Prompt::document(text)],
            ..Default::default()
        };
        let (prefix, documents) = self.tokenize_context(&p)?;
        Ok(Tokenized {
            prefix,
            documents,
            question: Vec::new(),
        })
    }

    /// Ingestion: computes and stores the documents of `t` (from
    /// [`Engine::tokenize_document`]), or finds them stored; reports the last. Fails if a newly
    /// computed entry could not be stored: an ingest promises it is.
    pub fn ingest(&self, t: &Tokenized, source: Option<&str>) -> Result<Ingested> {
        let doc = t
            .documents
            .last()
            .ok_or_else(|| Error::Internal("ingest of a request without documents".into()))?;
        let names: Vec<String> = source.into_iter().map(str::to_string).collect();
        let mut prepared = self.prepare_with(t, &names, &mut |_| {})?;
        prepared.require_stored()?;
        Ok(Ingested {
            id: self.doc_id(&t.prefix, doc),
            tokens: doc.len(),
            cached: prepared.sources.last() == Some(&Source::Store),
        })
    }

    /// A request without documents as the model's own chat would see it: the whole
    /// conversation encoded in one piece (BOS, template, preamble, question), nothing split
    /// out for the store.
    pub fn tokenize_plain(&self, p: &Prompt) -> Result<Vec<u32>> {
        if p.question.trim().is_empty() {
            return Err(Error::InvalidInput(
                "the question is empty; ask something".into(),
            ));
        }
        if !p.documents.is_empty() {
            return Err(Error::InvalidInput(
                "a plain request has no documents".into(),
            ));
        }
        let (pre, post) = self.wrap(p)?;
        let mut tokens: Vec<u32> = Vec::new();
        if self.tokenizer.add_bos() {
            tokens.extend(self.tokenizer.bos_id());
        }
        tokens.extend(
            self.tokenizer
                .encode(&format!("{pre}{}{}{post}", p.preamble, p.question))?,
        );
        if tokens.len() >= self.model.cfg.max_context {
            return Err(Error::ContextTooLong {
                tokens: tokens.len(),
                max: self.model.cfg.max_context,
            });
        }
        Ok(tokens)
    }

    /// Assembles a request without documents: one ordinary prefill, no store, reported as
    /// method `none` (there is nothing to reuse or sparsify).
    pub fn assemble_plain(&self, p: &Prompt) -> Result<Assembled> {
        let t0 = Instant::now();
        let tokens = self.tokenize_plain(p)?;
        let ctx = Context {
            model: &self.model,
            segments: Vec::new(),
            question: tokens,
        };
        let mut a = Recompute.assemble(&ctx)?;
        a.stats.method = PLAIN_METHOD.into();
        a.stats.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(a)
    }

    /// The content address of a document computed after `prefix`.
    pub fn doc_id(&self, prefix: &[u32], tokens: &[u32]) -> DocId {
        doc_id(
            &self.model.fingerprint,
            &self.tokenizer.fingerprint(),
            prefix,
            tokens,
        )
    }

    /// Reads a document's KV from the store, or computes and stores it. A corrupt or
    /// foreign entry is reported in the log, removed and recomputed, never used; an entry
    /// that could not be read (I/O error, store unreachable) is recomputed and kept. The
    /// third value is the error of storing a computed entry, if that failed.
    pub fn document_kv(
        &self,
        prefix: &[u32],
        prefix_kv: Option<&StoredDoc>,
        tokens: &[u32],
    ) -> Result<(Arc<StoredDoc>, Source, Option<Error>)> {
        self.document_kv_with(prefix, prefix_kv, tokens, None, &mut || {})
    }

    /// [`Engine::document_kv`], recording `source` with a newly computed entry and calling
    /// `on_prefill` before computing one.
    fn document_kv_with(
        &self,
        prefix: &[u32],
        prefix_kv: Option<&StoredDoc>,
        tokens: &[u32],
        source: Option<&str>,
        on_prefill: &mut dyn FnMut(),
    ) -> Result<(Arc<StoredDoc>, Source, Option<Error>)> {
        let id = self.doc_id(prefix, tokens);
        match self.store.get_for_model(&id, &self.model.fingerprint) {
            Ok(Some(doc)) if doc.meta.token_ids == tokens => return Ok((doc, Source::Store, None)),
            Ok(Some(_)) => tracing::warn!("store entry {id} holds other tokens; recomputing"),
            Ok(None) => {}
            // Only bytes found wrong justify deleting: an I/O error (EACCES, EMFILE, Redis
            // down) says nothing about the entry, which may be fine.
            Err(e) if e.is_corrupt() => {
                tracing::warn!("store entry {id} is corrupt ({e}); removing and recomputing it");
                if let Err(e) = self.store.remove(&id) {
                    tracing::warn!("could not remove corrupt entry {id}: {e}");
                }
            }
            Err(e) => tracing::warn!("store entry {id} could not be read ({e}); recomputing"),
        }
        on_prefill();
        let mut doc = self.compute_document(prefix, prefix_kv, tokens)?;
        doc.meta.source = source.map(str::to_string);
        let unstored = match self.store.put(&doc) {
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("could not store document {id}: {e}");
                Some(e)
            }
        };
        Ok((Arc::new(doc), Source::Computed, unstored))
    }

    /// Prefills one document on its own, after the prefix (whose KV is given), and packs its
    /// rows with the side data methods need (SamKV's document-local query summaries).
    pub fn compute_document(
        &self,
        prefix: &[u32],
        prefix_kv: Option<&StoredDoc>,
        tokens: &[u32],
    ) -> Result<StoredDoc> {
        let m = &self.model;
        let mut cache = m.new_cache()?;
        if let Some(p) = prefix_kv {
            for (l, layer) in cache.layers.iter_mut().enumerate() {
                let (k, v) = p.layer_kv(l, None, m.device(), m.dtype())?;
                layer.append(&k, &v, &p.meta.positions)?;
            }
        }
        let start = prefix.len() as u32;
        let positions: Vec<u32> = (start..start + tokens.len() as u32).collect();
        // Query states are captured only when some side data is made of them.
        let capture: Vec<usize> = if self.side_data.is_empty() {
            Vec::new()
        } else {
            (0..m.n_layers()).collect()
        };
        let out = m.forward(tokens, &positions, &mut cache, Logits::None, &capture)?;
        let mut side = BTreeMap::new();
        for d in &self.side_data {
            let t = match d {
                SideData::QuerySummary { window } => {
                    pool_queries(&out.queries, tokens.len(), *window)?
                }
            };
            side.insert(d.key(), t);
        }
        // q8 is quantized from the compute dtype's values, not from a rounded float copy.
        let float = self.store_dtype.float().unwrap_or(m.dtype());
        let float_name = crate::store::dtype_name(float).unwrap_or("f32");
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        let skip = prefix_kv.map_or(0, |p| p.meta.positions.len());
        for layer in &cache.layers {
            ks.push(
                layer
                    .keys()?
                    .narrow(1, skip, tokens.len())?
                    .to_dtype(float)?
                    .contiguous()?,
            );
            vs.push(
                layer
                    .values()?
                    .narrow(1, skip, tokens.len())?
                    .to_dtype(float)?
                    .contiguous()?,
            );
        }
        let c = &m.cfg;
        let meta = DocMeta {
            format_version: FORMAT_VERSION,
            model_fingerprint: m.fingerprint.clone(),
            tokenizer_fingerprint: self.tokenizer.fingerprint(),
            prefix_hash: prefix_hash(prefix),
            prefix_len: prefix.len(),
            n_layers: c.n_layers,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            dtype: float_name.to_string(),
            rope_layout: c.rope_layout.as_str().to_string(),
            rope_base: c.rope_base,
            keys_post_rope: true,
            positions,
            token_ids: tokens.to_vec(),
            created_unix: now_unix(),
            source: None,
        };
        let doc = StoredDoc::new(meta, ks, vs, side)?;
        match self.store_dtype {
            StoreDtype::Q8 => doc.to_dtype(StoreDtype::Q8),
            _ => Ok(doc),
        }
    }

    /// Loads or computes the KV of every segment of a tokenized request.
    pub fn prepare(&self, t: &Tokenized) -> Result<Prepared> {
        self.prepare_with(t, &[], &mut |_| {})
    }

    /// [`Engine::prepare`], recording `names[i]` (where document i came from) with each
    /// newly computed entry and reporting each document's [`Progress`].
    pub fn prepare_with(
        &self,
        t: &Tokenized,
        names: &[String],
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Prepared> {
        let mut b = PrepareBuilder::new(t, names);
        while self.prepare_next(&mut b, progress)?.is_some() {}
        Ok(b.finish())
    }

    /// Loads or computes the next segment of `b` (the preamble, then each document in
    /// order): what [`Engine::prepare_with`] does for all of them, one at a time, so that the
    /// server can decode running streams between two documents' prefills. Returns where the
    /// segment came from, or None once every segment is ready.
    pub fn prepare_next(
        &self,
        b: &mut PrepareBuilder,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Option<Source>> {
        let t = &b.t;
        let has_prefix = !t.prefix.is_empty();
        let segment = b.out.segments.len();
        let t0 = Instant::now();
        let (kv, src, unstored, tokens, is_preamble, index) = if has_prefix && segment == 0 {
            let (kv, src, e) =
                self.document_kv_with(&[], None, &t.prefix, Some("(preamble)"), &mut || {})?;
            b.prefix_kv = Some(kv.clone());
            (kv, src, e, t.prefix.clone(), true, None)
        } else {
            let index = segment - usize::from(has_prefix);
            let Some(d) = t.documents.get(index) else {
                return Ok(None);
            };
            let of = t.documents.len();
            let (kv, src, e) = self.document_kv_with(
                &t.prefix,
                b.prefix_kv.as_deref(),
                d,
                b.names.get(index).map(String::as_str),
                &mut || {
                    progress(Progress::Prefilling {
                        index,
                        of,
                        tokens: d.len(),
                    })
                },
            )?;
            (kv, src, e, d.clone(), false, Some(index))
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        match src {
            Source::Store => b.out.load_ms += ms,
            Source::Computed => b.out.compute_ms += ms,
        }
        if let Some(e) = unstored {
            b.out.unstored.push((segment, e));
        }
        if let Some(index) = index {
            progress(Progress::Ready {
                index,
                of: b.t.documents.len(),
                source: src,
                ms,
            });
        }
        let start = b.start;
        b.start += tokens.len() as u32;
        b.out.segments.push(Segment {
            tokens,
            start,
            kv,
            is_preamble,
        });
        b.out.sources.push(src);
        Ok(Some(src))
    }

    /// Tokenizes, prepares and assembles a request with `method`. The returned stats count
    /// loading from the store in `load_ms` and in time to first token.
    pub fn assemble(&self, prompt: &Prompt, method: &dyn Method) -> Result<(Assembled, Prepared)> {
        self.assemble_with(prompt, method, &[], &mut |_| {})
    }

    /// [`Engine::assemble`] with [`Engine::prepare_with`]'s document names and progress.
    /// Time to first token leaves out prefilling new documents (`Prepared::compute_ms`):
    /// that is paid once per document, not per request.
    pub fn assemble_with(
        &self,
        prompt: &Prompt,
        method: &dyn Method,
        names: &[String],
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Assembled, Prepared)> {
        let t = self.tokenize(prompt)?;
        let prepared = self.prepare_with(&t, names, progress)?;
        let a = self.assemble_prepared(&prepared, method)?;
        Ok((a, prepared))
    }

    /// Runs `method` over a prepared request: the one place every caller (CLI, server,
    /// benchmarks, selfcheck) assembles. The stats count loading from the store in `load_ms`
    /// and in the time to first token, which is loading plus this assembly.
    pub fn assemble_prepared(&self, prepared: &Prepared, method: &dyn Method) -> Result<Assembled> {
        let t0 = Instant::now();
        let mut a = method.assemble(&prepared.context(&self.model))?;
        a.stats.load_ms += prepared.load_ms;
        a.stats.ttft_ms = prepared.load_ms + t0.elapsed().as_secs_f64() * 1e3;
        Ok(a)
    }

    /// Assembles and decodes; `on_text` receives the answer as it is generated. A prompt
    /// without documents is answered plainly ([`Engine::assemble_plain`]), whatever `method`.
    pub fn answer(
        &self,
        prompt: &Prompt,
        method: &dyn Method,
        sampling: &Sampling,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(Generation, Assembled)> {
        let mut a = if prompt.documents.is_empty() {
            self.assemble_plain(prompt)?
        } else {
            self.assemble(prompt, method)?.0
        };
        let logits = a.logits.clone();
        let g = generate(
            &self.model,
            &self.tokenizer,
            &mut a.cache,
            &logits,
            sampling,
            on_text,
        )?;
        Ok((g, a))
    }
}

/// Mean of each captured layer's query states over the last `n` tokens: (layers, heads, d).
fn pool_queries(queries: &[(usize, Tensor)], t: usize, n: usize) -> Result<Tensor> {
    let take = n.min(t);
    let pooled = queries
        .iter()
        .map(|(_, q)| mean_rows(&q.narrow(1, t - take, take)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&pooled, 0)?)
}

/// Loads a model file or directory and its tokenizer.
pub fn load_model(
    path: &std::path::Path,
    opts: &crate::model::LoadOptions,
) -> Result<(Model, Tokenizer)> {
    let model = Model::load(path, opts)?;
    Ok((model, load_tokenizer(path)?))
}

/// Loads the tokenizer (and chat template) of a model file or directory, without its weights.
pub fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer> {
    Ok(if path.is_dir() {
        Tokenizer::from_hf_dir(path)?
    } else {
        let mut f = std::fs::File::open(path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| {
            Error::ModelFile {
                path: path.to_path_buf(),
                msg: e.to_string(),
            }
        })?;
        Tokenizer::from_gguf(&content)?
    })
}
