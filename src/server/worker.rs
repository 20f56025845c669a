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
use crate::engine::generate::Sampler;
use crate::engine::{Engine, FinishReason, Prompt, Sampling, Source};
use crate::eval::RagPrompt;
use crate::kv::KvCache;
use crate::methods::{Context, Method};
use crate::tokenizer::StreamDecoder;
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
    sampler: Sampler,
    stream: StreamDecoder,
    params: Sampling,
    ignore_eos: bool,
    pos: u32,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    last_token: Option<Instant>,
}

impl Seq {
    fn send_upto(&mut self, end: usize) {
        if end > self.sent {
            let s = self.text[self.sent..end].to_string();
            self.sent = end;
            let _ = self.events.send(Event::Text(s));
        }
    }

    /// Length of `text` that can be sent: all but a tail that could begin a stop string.
    fn safe_len(&self) -> usize {
        let mut hold = 0;
        for s in &self.params.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        self.text.len() - hold
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
        let tok = self.sampler.sample(&self.logits)?;
        let now = Instant::now();
        match self.last_token {
            None => metrics.ttft.observe((now - self.received).as_secs_f64()),
            Some(t) => metrics.per_token.observe((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
        if !self.ignore_eos && engine.tokenizer.is_eos(tok) {
            return Ok(Err(FinishReason::Stop));
        }
        self.tokens.push(tok);
        if let Some(delta) = self.stream.push(tok)? {
            self.text.push_str(&delta);
            let cut = self
                .params
                .stop
                .iter()
                .filter_map(|s| self.text.find(s.as_str()))
                .min();
            if let Some(cut) = cut {
                self.text.truncate(cut);
                self.send_upto(cut);
                return Ok(Err(FinishReason::Stop));
            }
            self.send_upto(self.safe_len());
        }
        if self.tokens.len() >= self.params.max_new_tokens
            || self.pos as usize >= engine.model.cfg.max_context
        {
            return Ok(Err(FinishReason::Length));
        }
        Ok(Ok(tok))
    }

    /// Reports a failure and releases the slot.
    fn fail(&mut self, msg: String) {
        tracing::error!("decoding failed: {msg}");
        self.permit = None;
        let _ = self.events.send(Event::Failed(ApiError::internal(msg)));
    }

    /// Sends what is left and the final event.
    fn finish(&mut self, reason: FinishReason, metrics: &Metrics) {
        self.permit = None;
        if reason == FinishReason::Cancelled {
            metrics.cancelled.fetch_add(1, Relaxed);
            return;
        }
        if let Ok(Some(rest)) = self.stream.finish() {
            self.text.push_str(&rest);
        }
        self.send_upto(self.text.len());
        metrics
            .completion_tokens
            .fetch_add(self.tokens.len() as u64, Relaxed);
        let _ = self.events.send(Event::Done {
            finish: reason,
            completion_tokens: self.tokens.len(),
        });
    }
}

fn internal(p: Box<dyn std::any::Any + Send>) -> crate::Error {
    crate::Error::InvalidInput(format!("internal error: {}", panic_message(p)))
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
                            tracing::error!("request failed with a panic: {m}");
                            let _ = events.send(Event::Failed(ApiError::internal(format!(
                                "internal error: {m}"
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
                Ok((a, usage, method)) => {
                    let _ = events.send(Event::Started { usage, method });
                    let pos = a.cache.next_position();
                    Some(Seq {
                        events,
                        permit: Some(permit),
                        received,
                        cache: a.cache,
                        logits: a.logits,
                        sampler: Sampler::new(w.sampling.clone()),
                        stream: self.engine.tokenizer.stream_decoder(),
                        params: w.sampling,
                        ignore_eos: w.ignore_eos,
                        pos,
                        tokens: Vec::new(),
                        text: String::new(),
                        sent: 0,
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
    ) -> std::result::Result<(crate::methods::Assembled, Usage, String), ApiError> {
        w.sampling.validate()?;
        self.engine.chat = self.chat && !w.raw;
        if w.prompt.documents.is_empty() {
            return self.assemble_plain(w);
        }
        let t = self.engine.tokenize(&w.prompt)?;
        self.check_documents(&t.documents)?;
        self.check_context(
            t.prefix.len() + t.documents.iter().map(Vec::len).sum::<usize>() + t.question.len(),
        )?;
        let prepared = self.engine.prepare(&t)?;
        let ctx = Context {
            model: &self.engine.model,
            segments: prepared.segments.clone(),
            question: prepared.question.clone(),
        };
        let a = w.method.assemble(&ctx)?;
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
        let prompt_tokens = ctx.context_len() + ctx.question.len();
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
        let p = Prompt {
            preamble: RagPrompt::for_question(&[], "x").preamble,
            documents: vec![RagPrompt::document(text)],
            question: "x".into(),
            ..Default::default()
        };
        let t = self.engine.tokenize(&p)?;
        self.check_documents(&t.documents)?;
        let mut prepared = self.engine.prepare(&t)?;
        // An upload is acknowledged only once its KV is in the store.
        prepared.require_stored()?;
        let cached = prepared.sources.last() == Some(&Source::Store);
        let c = if cached {
            &self.metrics.cache_hits
        } else {
            &self.metrics.cache_misses
        };
        c.fetch_add(1, Relaxed);
        Ok(Event::Ingested {
            kv_id: self.engine.doc_id(&t.prefix, &t.documents[0]).to_string(),
            tokens: t.documents[0].len(),
            cached,
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
