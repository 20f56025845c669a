//! The model worker: one thread owns the engine and runs every model computation, so candle's
//! blocking CPU work never runs on the async reactor.
//!
//! Scheduling. Requests wait in a FIFO. Each round the worker starts (assembles) at most one
//! waiting request, then advances every running request by one decode step, all of them in one
//! batched forward (`Model::decode_batch`: the weights are read once per step for the whole
//! batch). New requests get their first token without waiting for long generations to end,
//! and every running stream keeps moving.
//!
//! Admission is bounded by [`Gate`]: a request holds a [`Permit`] from arrival to completion,
//! and the HTTP layer answers 429 when none is left. A request whose client went away (its
//! event channel is closed) is dropped before it starts, or stopped at its next token.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use super::openai::{ApiError, Usage};
use crate::engine::generate::{Step, TextDecoder};
use crate::engine::{Engine, FinishReason, Prompt, Sampling, Source};
use crate::kv::KvCache;
use crate::methods::Method;
use crate::Result;

/// Bounds the requests admitted at once (waiting or running).
#[derive(Clone)]
pub struct Gate {
    max: usize,
    metrics: Arc<Metrics>,
}

/// A slot in the [`Gate`], released on drop.
pub struct Permit(Arc<Metrics>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Relaxed);
    }
}

impl Gate {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Gate {
        Gate { max, metrics }
    }

    pub fn try_acquire(&self) -> Option<Permit> {
        let q = &self.metrics.queued;
        let mut cur = q.load(Relaxed);
        loop {
            if cur as usize >= self.max {
                return None;
            }
            match q.compare_exchange_weak(cur, cur + 1, Relaxed, Relaxed) {
                Ok(_) => return Some(Permit(self.metrics.clone())),
                Err(now) => cur = now,
            }
        }
    }
}

pub struct GenerateWork {
    pub prompt: Prompt,
    pub method: Box<dyn Method>,
    pub sampling: Sampling,
    pub ignore_eos: bool,
    /// Do not wrap the prompt in the chat template (plain completions).
    pub raw: bool,
}

pub enum Work {
    Generate(Box<GenerateWork>),
    /// Prefill and store one document (computed after the default preamble, as chat
    /// requests without a system message use it).
    Ingest {
        text: String,
    },
}

pub struct Job {
    pub work: Work,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
    pub permit: Permit,
}

/// What the worker reports about a job, in order: `Started`, `Text`*, `Done`; or `Failed`
/// (at any point); or `Ingested`.
#[derive(Debug)]
pub enum Event {
    Started {
        usage: Usage,
        method: String,
    },
    Text(String),
    Done {
        finish: FinishReason,
        completion_tokens: usize,
    },
    Ingested {
        kv_id: String,
        tokens: usize,
        cached: bool,
    },
    Failed(ApiError),
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub max_batch: usize,
    pub max_document_tokens: usize,
    /// Most context tokens (everything before the answer) in one request.
    pub max_context_tokens: usize,
}

/// Starts the worker thread; it ends when every sender is dropped.
pub fn spawn(
    engine: Engine,
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name("samkv-model".into())
        .spawn(move || Worker::new(engine, cfg, metrics).run(rx))?;
    Ok((tx, h))
}

/// One running generation.
struct Seq {
    events: UnboundedSender<Event>,
    /// Released before the final event, so a client that sends its next request as soon as
    /// it has the answer finds the slot free.
    permit: Option<Permit>,
    received: Instant,
    cache: KvCache,
    logits: Tensor,
    decoder: TextDecoder,
    pos: u32,
    last_token: Option<Instant>,
}

impl Seq {
    fn send(&self, text: String) {
        if !text.is_empty() {
            let _ = self.events.send(Event::Text(text));
        }
    }

    /// Samples the next token and streams its text. Ok(Err(reason)) when the sequence is
    /// done; otherwise the token to feed the model (with its position, `self.pos`).
    fn next_token(
        &mut self,
        engine: &Engine,
        metrics: &Metrics,
    ) -> Result<std::result::Result<u32, FinishReason>> {
        if self.events.is_closed() {
            return Ok(Err(FinishReason::Cancelled));
        }
        let at_end = self.pos as usize >= engine.model.cfg.max_context;
        let (text, step) = self.decoder.step(&engine.tokenizer, &self.logits, at_end)?;
        let now = Instant::now();
        match self.last_token {
            None => metrics.ttft.observe((now - self.received).as_secs_f64()),
            Some(t) => metrics.per_token.observe((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
        self.send(text);
        Ok(match step {
            Step::Feed(tok) => Ok(tok),
            Step::Done(reason) => Err(reason),
        })
    }

    /// Reports a failure and releases the slot.
    fn fail(&mut self, msg: String) {
        self.permit = None;
        let _ = self.events.send(Event::Failed(ApiError::internal(format!(
            "decoding failed: {msg}"
        ))));
    }

    /// Sends the final event (the decoder has released all text by now).
    fn finish(&mut self, reason: FinishReason, metrics: &Metrics) {
        self.permit = None;
        if reason == FinishReason::Cancelled {
            metrics.cancelled.fetch_add(1, Relaxed);
            return;
        }
        let n = self.decoder.tokens().len();
        metrics.completion_tokens.fetch_add(n as u64, Relaxed);
        let _ = self.events.send(Event::Done {
            finish: reason,
            completion_tokens: n,
        });
    }
}

fn internal(p: Box<dyn std::any::Any + Send>) -> crate::Error {
    crate::Error::Internal(format!("panic: {}", panic_message(p)))
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

struct Worker {
    engine: Engine,
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
    chat: bool,
}

impl Worker {
    fn new(engine: Engine, cfg: WorkerConfig, metrics: Arc<Metrics>) -> Worker {
        let chat = engine.chat;
        Worker {
            engine,
            cfg,
            metrics,
            chat,
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut running: Vec<Seq> = Vec::new();
        loop {
            if running.is_empty() && waiting.is_empty() {
                match rx.recv() {
                    Ok(j) => waiting.push_back(j),
                    Err(_) => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                waiting.push_back(j);
            }
            if running.len() < self.cfg.max_batch.max(1) {
                if let Some(job) = waiting.pop_front() {
                    let events = job.events.clone();
                    match catch_unwind(AssertUnwindSafe(|| self.start(job))) {
                        Ok(Some(seq)) => running.push(seq),
                        Ok(None) => {}
                        Err(p) => {
                            let m = panic_message(p);
                            let _ = events.send(Event::Failed(ApiError::internal(format!(
                                "the request failed with a panic: {m}"
                            ))));
                        }
                    }
                }
            }
            self.decode_step(&mut running);
            let bytes: usize = running.iter().map(|s| s.cache.bytes()).sum();
            self.metrics.active_kv_bytes.store(bytes as u64, Relaxed);
            self.metrics
                .active_sequences
                .store(running.len() as u64, Relaxed);
        }
    }

    /// One decode step for every running sequence: each samples its next token; those not
    /// finished go through the model together ([`crate::model::Model::decode_batch`]: one
    /// pass over the weights for all of them), which is what makes concurrent requests cheap.
    fn decode_step(&self, running: &mut Vec<Seq>) {
        let (engine, metrics) = (&self.engine, &*self.metrics);
        let mut feed = Vec::with_capacity(running.len());
        running.retain_mut(|s| {
            let r = catch_unwind(AssertUnwindSafe(|| s.next_token(engine, metrics)))
                .unwrap_or_else(|p| Err(internal(p)));
            match r {
                Ok(Ok(tok)) => {
                    feed.push(tok);
                    true
                }
                Ok(Err(reason)) => {
                    s.finish(reason, metrics);
                    false
                }
                Err(e) => {
                    s.fail(e.to_string());
                    false
                }
            }
        });
        if running.is_empty() {
            return;
        }
        let positions: Vec<u32> = running.iter().map(|s| s.pos).collect();
        let mut caches: Vec<KvCache> = running
            .iter_mut()
            .map(|s| std::mem::replace(&mut s.cache, KvCache { layers: Vec::new() }))
            .collect();
        let r = catch_unwind(AssertUnwindSafe(|| {
            let logits = engine.model.decode_batch(&feed, &positions, &mut caches)?;
            (0..feed.len())
                .map(|i| Ok(logits.get(i)?))
                .collect::<Result<Vec<Tensor>>>()
        }))
        .unwrap_or_else(|p| Err(internal(p)));
        match r {
            Ok(rows) => {
                for ((s, cache), logits) in running.iter_mut().zip(caches).zip(rows) {
                    s.cache = cache;
                    s.logits = logits;
                    s.pos += 1;
                }
            }
            Err(e) => {
                // The caches may hold the new token in some layers only: every sequence of
                // the batch ends.
                for s in running.iter_mut() {
                    s.fail(e.to_string());
                }
                running.clear();
            }
        }
    }

    /// Runs a job up to its first token; returns the sequence to decode, if any.
    fn start(&mut self, job: Job) -> Option<Seq> {
        let Job {
            work,
            events,
            received,
            permit,
        } = job;
        if events.is_closed() {
            self.metrics.cancelled.fetch_add(1, Relaxed);
            return None;
        }
        self.metrics
            .queue_wait
            .observe(received.elapsed().as_secs_f64());
        match work {
            Work::Ingest { text } => {
                let ev = match self.ingest(&text) {
                    Ok(ev) => ev,
                    Err(e) => Event::Failed(e),
                };
                drop(permit);
                let _ = events.send(ev);
                None
            }
            Work::Generate(w) => match self.assemble(&w) {
                Ok((a, usage, method, decoder)) => {
                    let _ = events.send(Event::Started { usage, method });
                    let pos = a.cache.next_position();
                    Some(Seq {
                        events,
                        permit: Some(permit),
                        received,
                        cache: a.cache,
                        logits: a.logits,
                        decoder,
                        pos,
                        last_token: None,
                    })
                }
                Err(e) => {
                    drop(permit);
                    let _ = events.send(Event::Failed(e));
                    None
                }
            },
        }
    }

    fn check_documents(&self, docs: &[Vec<u32>]) -> std::result::Result<(), ApiError> {
        for (i, d) in docs.iter().enumerate() {
            if d.len() > self.cfg.max_document_tokens {
                return Err(ApiError::invalid(format!(
                    "document {} has {} tokens, more than this server's limit of {} (--max-document-tokens); split it",
                    i + 1,
                    d.len(),
                    self.cfg.max_document_tokens
                ))
                .param(format!("documents[{i}]"))
                .code("document_too_long"));
            }
        }
        Ok(())
    }

    fn check_context(&self, tokens: usize) -> std::result::Result<(), ApiError> {
        let max = self.cfg.max_context_tokens;
        if tokens > max {
            return Err(ApiError::invalid(format!(
                "the request has {tokens} context tokens (system, documents and question), more \
                 than this server's limit of {max} (--max-context-tokens); send fewer or shorter \
                 documents"
            ))
            .code("context_length_exceeded"));
        }
        Ok(())
    }

    fn assemble(
        &mut self,
        w: &GenerateWork,
    ) -> std::result::Result<(crate::methods::Assembled, Usage, String, TextDecoder), ApiError>
    {
        // Checks the sampling knobs before any model work.
        let decoder = TextDecoder::new(&self.engine.tokenizer, &w.sampling, w.ignore_eos)?;
        self.engine.chat = self.chat && !w.raw;
        let (a, usage, method) = if w.prompt.documents.is_empty() {
            self.assemble_plain(w)?
        } else {
            self.assemble_rag(w)?
        };
        Ok((a, usage, method, decoder))
    }

    fn assemble_rag(
        &mut self,
        w: &GenerateWork,
    ) -> std::result::Result<(crate::methods::Assembled, Usage, String), ApiError> {
        let t = self.engine.tokenize(&w.prompt)?;
        self.check_documents(&t.documents)?;
        self.check_context(
            t.prefix.len() + t.documents.iter().map(Vec::len).sum::<usize>() + t.question.len(),
        )?;
        let prepared = self.engine.prepare(&t)?;
        let a = self
            .engine
            .assemble_prepared(&prepared, w.method.as_ref())?;
        let mut cached = 0;
        for (s, src) in prepared.segments.iter().zip(&prepared.sources) {
            if *src == Source::Store {
                cached += s.len();
            }
            if !s.is_preamble {
                let c = match src {
                    Source::Store => &self.metrics.cache_hits,
                    Source::Computed => &self.metrics.cache_misses,
                };
                c.fetch_add(1, Relaxed);
            }
        }
        // Stored KV the method recomputed was not reused: Recompute reuses none of it.
        let cached = cached.saturating_sub(a.stats.recomputed_tokens.round() as usize);
        let prompt_tokens =
            t.prefix.len() + t.documents.iter().map(Vec::len).sum::<usize>() + t.question.len();
        let m = &self.metrics;
        m.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
        m.cached_tokens.fetch_add(cached as u64, Relaxed);
        let usage = Usage {
            prompt_tokens,
            cached_tokens: cached,
            recomputed_tokens: a.stats.recomputed_tokens.round() as usize,
            kv_tokens_kept: a.stats.kv_tokens_kept.round() as usize,
            prompt_tokens_details: super::openai::PromptDetails {
                cached_tokens: cached,
            },
            ..Default::default()
        };
        Ok((a, usage, w.method.name()))
    }

    /// A request without documents: the model's own chat (or, raw, the prompt as given), one
    /// prefill, nothing from the store; the method is reported as `none`.
    fn assemble_plain(
        &mut self,
        w: &GenerateWork,
    ) -> std::result::Result<(crate::methods::Assembled, Usage, String), ApiError> {
        // Tokenizing twice costs little next to a prefill that could not be used.
        let prompt_tokens = self.engine.tokenize_plain(&w.prompt)?.len();
        self.check_context(prompt_tokens)?;
        let a = self.engine.assemble_plain(&w.prompt)?;
        self.metrics
            .prompt_tokens
            .fetch_add(prompt_tokens as u64, Relaxed);
        let usage = Usage {
            prompt_tokens,
            ..Default::default()
        };
        let method = a.stats.method.clone();
        Ok((a, usage, method))
    }

    fn ingest(&mut self, text: &str) -> std::result::Result<Event, ApiError> {
        self.engine.chat = self.chat;
        let t = self.engine.tokenize_document(text)?;
        self.check_documents(&t.documents)?;
        // An upload is acknowledged only once its KV is in the store (ingest fails otherwise).
        let r = self.engine.ingest(&t, None)?;
        let c = if r.cached {
            &self.metrics.cache_hits
        } else {
            &self.metrics.cache_misses
        };
        c.fetch_add(1, Relaxed);
        Ok(Event::Ingested {
            kv_id: r.id.to_string(),
            tokens: r.tokens,
            cached: r.cached,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_bounds_admission_and_releases_on_drop() {
        let m = Arc::new(Metrics::default());
        let g = Gate::new(2, m.clone());
        let a = g.try_acquire().expect("first");
        let b = g.try_acquire().expect("second");
        assert!(g.try_acquire().is_none());
        assert_eq!(m.queued.load(Relaxed), 2);
        drop(a);
        let c = g.try_acquire().expect("freed");
        drop((b, c));
        assert_eq!(m.queued.load(Relaxed), 0);
    }
}
