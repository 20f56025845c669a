//! The model worker: one thread owns the engine and runs every model computation, so candle's
//! blocking CPU work never runs on the async reactor.
//!
//! Scheduling ([`super::scheduler`] decides, this thread does). A request arriving is
//! tokenized and checked, and reserves its KV bytes (context + max_tokens) when the
//! scheduler admits it; it waits while they do not fit (`--kv-budget`). Its assembly is then
//! a series of steps ([`super::task`]): each missing document's prefill, one per step, then
//! the method over the prepared documents. Each round the worker takes the assembly steps
//! the scheduler picks under the token budget (`--step-tokens`) and then advances every
//! running request by one decode step, all of them in one batched forward
//! (`Model::decode_batch`: the weights are read once per step for the whole batch). So a
//! 10-document request costs running streams one document's prefill per token, not ten.
//!
//! A batched step that fails is undone (each cache truncated to its length before the step)
//! and retried one sequence at a time: only the sequence that fails alone ends. A failed
//! assembly step (out of memory, a bad document) fails its request only.
//!
//! Admission is bounded by [`Gate`]: a request holds a [`Permit`] from arrival to completion,
//! and the HTTP layer answers 429 when none is left. A request whose client went away (its
//! event channel is closed) is dropped before its next step, or stopped at its next token.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use super::openai::{ApiError, Usage};
use super::prefetch::Prefetcher;
use super::scheduler::{decode_isolated, BatchStep, Budgets, ReqId, Scheduler};
use super::task::{Outcome, Task};
use crate::engine::generate::{Step, TextDecoder};
use crate::engine::{Engine, FinishReason, Prompt, Sampling};
use crate::kv::KvCache;
use crate::methods::Method;
use crate::model::Model;
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
    /// Tokens per round (decode + assembly steps), `--step-tokens`.
    pub step_tokens: usize,
    /// KV bytes all admitted requests may reserve, `--kv-budget`.
    pub kv_budget: u64,
    /// KV bytes of one token in a request's cache (all layers, K and V).
    pub kv_bytes_per_token: u64,
}

/// How often later requests may be admitted past a request waiting for KV room.
const MAX_OVERTAKE: usize = 8;

/// Starts the worker thread; it ends when every sender is dropped.
pub fn spawn(
    engine: Engine,
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
    prefetch: Option<Prefetcher>,
) -> std::io::Result<(Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name("samkv-model".into())
        .spawn(move || Worker::new(engine, cfg, metrics, prefetch).run(rx))?;
    Ok((tx, h))
}

/// One running generation.
pub(crate) struct Seq {
    pub(crate) id: ReqId,
    pub(crate) events: UnboundedSender<Event>,
    /// Released before the final event, so a client that sends its next request as soon as
    /// it has the answer finds the slot free.
    pub(crate) permit: Option<Permit>,
    pub(crate) received: Instant,
    pub(crate) cache: KvCache,
    pub(crate) logits: Tensor,
    pub(crate) decoder: TextDecoder,
    pub(crate) pos: u32,
    pub(crate) last_token: Option<Instant>,
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

pub(crate) fn internal(p: Box<dyn std::any::Any + Send>) -> crate::Error {
    crate::Error::Internal(format!("panic: {}", panic_message(p)))
}

pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

pub(crate) struct Worker {
    pub(crate) engine: Engine,
    pub(crate) cfg: WorkerConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) chat: bool,
    prefetch: Option<Prefetcher>,
    sched: Scheduler,
    next_id: ReqId,
}

/// One batched decode step over the running sequences, for [`decode_isolated`].
struct Batch<'a> {
    model: &'a Model,
    feed: &'a [u32],
    positions: &'a [u32],
    caches: &'a mut [KvCache],
    /// Each cache's layer lengths before the step.
    before: Vec<Vec<usize>>,
    /// The batched pass failed and sequences were run one by one.
    retried: bool,
}

impl BatchStep for Batch<'_> {
    type Out = Tensor;
    type Err = crate::Error;

    fn all(&mut self) -> Result<Vec<Tensor>> {
        let (m, f, p, n) = (self.model, self.feed, self.positions, self.feed.len());
        let caches = &mut *self.caches;
        catch_unwind(AssertUnwindSafe(|| {
            let logits = m.decode_batch(f, p, caches)?;
            (0..n)
                .map(|i| Ok(logits.get(i)?))
                .collect::<Result<Vec<Tensor>>>()
        }))
        .unwrap_or_else(|p| Err(internal(p)))
    }

    fn one(&mut self, i: usize) -> Result<Tensor> {
        self.retried = true;
        let (m, f, p) = (self.model, self.feed, self.positions);
        let cache = &mut self.caches[i..i + 1];
        catch_unwind(AssertUnwindSafe(|| {
            Ok(m.decode_batch(&f[i..i + 1], &p[i..i + 1], cache)?.get(0)?)
        }))
        .unwrap_or_else(|p| Err(internal(p)))
    }

    fn rollback(&mut self, i: usize) {
        self.caches[i].truncate_to(&self.before[i]);
    }
}

impl Worker {
    fn new(
        engine: Engine,
        cfg: WorkerConfig,
        metrics: Arc<Metrics>,
        prefetch: Option<Prefetcher>,
    ) -> Worker {
        let chat = engine.chat;
        let sched = Scheduler::new(Budgets {
            step_tokens: cfg.step_tokens,
            kv_bytes: cfg.kv_budget,
            max_running: cfg.max_batch,
            max_overtake: MAX_OVERTAKE,
        });
        metrics.kv_budget_bytes.store(cfg.kv_budget, Relaxed);
        Worker {
            engine,
            cfg,
            metrics,
            chat,
            prefetch,
            sched,
            next_id: 0,
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        // Requests tokenized and not finished assembling, by id; `assembling` holds the
        // admitted ones in admission order.
        let mut tasks: HashMap<ReqId, Task> = HashMap::new();
        let mut assembling: Vec<ReqId> = Vec::new();
        let mut running: Vec<Seq> = Vec::new();
        let mut fresh: Vec<ReqId> = Vec::new();
        loop {
            if running.is_empty() && assembling.is_empty() {
                let got = if tasks.is_empty() {
                    rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                } else {
                    // Only waiting requests: they are admitted below (or cancelled).
                    rx.recv_timeout(Duration::from_millis(20))
                };
                match got {
                    Ok(j) => fresh.extend(self.intake(j, &mut tasks)),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                fresh.extend(self.intake(j, &mut tasks));
            }
            self.drop_cancelled(&mut tasks, &mut assembling);
            let admitted = self.sched.admit();
            // New requests that must wait: read their stored documents meanwhile.
            if let Some(p) = &self.prefetch {
                for id in fresh.drain(..).filter(|id| !admitted.contains(id)) {
                    if let Some(t) = tasks.get(&id) {
                        p.request(t.document_ids(&self.engine));
                    }
                }
            }
            fresh.clear();
            for id in admitted {
                if let Some(t) = tasks.get(&id) {
                    self.metrics
                        .queue_wait
                        .observe(t.received.elapsed().as_secs_f64());
                }
                assembling.push(id);
            }
            let costs: Vec<(ReqId, usize)> = assembling
                .iter()
                .filter_map(|id| tasks.get(id).map(|t| (*id, t.cost())))
                .collect();
            for id in self.sched.plan(running.len(), &costs) {
                let Some(mut task) = tasks.remove(&id) else {
                    continue;
                };
                let events = task.events.clone();
                let out =
                    catch_unwind(AssertUnwindSafe(|| self.step(&mut task))).unwrap_or_else(|p| {
                        Outcome::Failed(ApiError::internal(format!(
                            "the request failed with a panic: {}",
                            panic_message(p)
                        )))
                    });
                self.metrics.assembly_steps.fetch_add(1, Relaxed);
                match out {
                    Outcome::Continue => {
                        tasks.insert(id, task);
                        continue;
                    }
                    Outcome::Decode(mut seq) => {
                        // Room for the whole answer in one allocation, then the reservation
                        // becomes exactly what the sequence holds.
                        let (_, answer) = task.token_counts();
                        match seq.cache.reserve(answer) {
                            Ok(()) => {
                                self.sched.shrink(id, seq.cache.allocated_bytes() as u64);
                                running.push(*seq);
                            }
                            Err(e) => {
                                seq.fail(format!("allocating the answer's KV rows: {e}"));
                                self.sched.release(id);
                            }
                        }
                    }
                    Outcome::Answered => self.sched.release(id),
                    Outcome::Failed(e) => {
                        drop(task);
                        let _ = events.send(Event::Failed(e));
                        self.sched.release(id);
                    }
                }
                assembling.retain(|a| *a != id);
            }
            for id in self.decode_step(&mut running) {
                self.sched.release(id);
            }
            self.publish(&running, tasks.len().saturating_sub(assembling.len()));
        }
    }

    /// The first step of every request: tokenize and check it, and queue it for admission
    /// under the KV budget (or refuse it at once when it could never fit).
    fn intake(&mut self, job: Job, tasks: &mut HashMap<ReqId, Task>) -> Option<ReqId> {
        if job.events.is_closed() {
            self.metrics.cancelled.fetch_add(1, Relaxed);
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let events = job.events.clone();
        let r = catch_unwind(AssertUnwindSafe(|| Task::new(self, id, job))).unwrap_or_else(|p| {
            Err(ApiError::internal(format!(
                "the request failed with a panic: {}",
                panic_message(p)
            )))
        });
        let task = match r {
            Ok(t) => t,
            Err(e) => {
                let _ = events.send(Event::Failed(e));
                return None;
            }
        };
        let bytes = task.reserve_tokens(self.engine.model.cfg.max_context) as u64
            * self.cfg.kv_bytes_per_token;
        if let Err(refusal) = self.sched.submit(id, bytes) {
            self.metrics.kv_refused.fetch_add(1, Relaxed);
            let (ctx, out) = task.token_counts();
            let _ = events.send(Event::Failed(
                ApiError::invalid(refusal.message(ctx, out)).code("kv_budget_exceeded"),
            ));
            return None;
        }
        tasks.insert(id, task);
        Some(id)
    }

    /// Drops requests whose client went away before they decode.
    fn drop_cancelled(&mut self, tasks: &mut HashMap<ReqId, Task>, assembling: &mut Vec<ReqId>) {
        let gone: Vec<ReqId> = tasks
            .iter()
            .filter(|(_, t)| t.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            tasks.remove(&id);
            assembling.retain(|a| *a != id);
            self.sched.release(id);
            self.metrics.cancelled.fetch_add(1, Relaxed);
        }
    }

    fn publish(&self, running: &[Seq], waiting: usize) {
        let m = &self.metrics;
        let bytes: usize = running.iter().map(|s| s.cache.bytes()).sum();
        m.active_kv_bytes.store(bytes as u64, Relaxed);
        m.active_sequences.store(running.len() as u64, Relaxed);
        m.kv_reserved_bytes.store(self.sched.reserved(), Relaxed);
        m.waiting_for_kv.store(waiting as u64, Relaxed);
    }

    /// One decode step for every running sequence: each samples its next token; those not
    /// finished go through the model together ([`crate::model::Model::decode_batch`]: one
    /// pass over the weights for all of them), which is what makes concurrent requests cheap.
    /// Returns the ids of the sequences that ended.
    fn decode_step(&self, running: &mut Vec<Seq>) -> Vec<ReqId> {
        let (engine, metrics) = (&self.engine, &*self.metrics);
        let mut feed = Vec::with_capacity(running.len());
        let mut ended = Vec::new();
        running.retain_mut(|s| {
            let r = catch_unwind(AssertUnwindSafe(|| s.next_token(engine, metrics)))
                .unwrap_or_else(|p| Err(internal(p)));
            match r {
                Ok(Ok(tok)) => {
                    feed.push(tok);
                    return true;
                }
                Ok(Err(reason)) => s.finish(reason, metrics),
                Err(e) => s.fail(e.to_string()),
            }
            ended.push(s.id);
            false
        });
        if running.is_empty() {
            return ended;
        }
        let positions: Vec<u32> = running.iter().map(|s| s.pos).collect();
        let mut caches: Vec<KvCache> = running
            .iter_mut()
            .map(|s| std::mem::replace(&mut s.cache, KvCache { layers: Vec::new() }))
            .collect();
        let before = caches.iter().map(KvCache::layer_lens).collect();
        let n = feed.len();
        let mut batch = Batch {
            model: &engine.model,
            feed: &feed,
            positions: &positions,
            caches: &mut caches,
            before,
            retried: false,
        };
        let results = decode_isolated(&mut batch, n);
        if batch.retried {
            metrics.decode_retries.fetch_add(1, Relaxed);
        }
        let mut keep = vec![true; n];
        for (i, ((s, cache), r)) in running.iter_mut().zip(caches).zip(results).enumerate() {
            s.cache = cache;
            match r {
                Ok(logits) => {
                    s.logits = logits;
                    s.pos += 1;
                }
                Err(e) => {
                    s.fail(e.to_string());
                    ended.push(s.id);
                    keep[i] = false;
                }
            }
        }
        let mut k = keep.into_iter();
        running.retain(|_| k.next().unwrap_or(true));
        ended
    }

    /// Sets the engine's chat wrapping for one request's step (plain completions are raw).
    pub(crate) fn set_chat(&mut self, raw: bool) {
        self.engine.chat = self.chat && !raw;
    }

    pub(crate) fn check_documents(&self, docs: &[Vec<u32>]) -> std::result::Result<(), ApiError> {
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

    pub(crate) fn check_context(&self, tokens: usize) -> std::result::Result<(), ApiError> {
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
