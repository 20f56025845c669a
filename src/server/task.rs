//! A request on its way to its first token, as a series of steps the worker runs between
//! decode steps: tokenize and check ([`Task::new`]), then each segment (preamble, documents)
//! read from the store or prefilled, one prefill per step, then the method's assembly
//! ([`crate::engine::Engine::assemble_prepared`], the one place a method runs). Plain
//! requests and uploads are one step each.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::openai::{ApiError, PromptDetails, Usage};
use super::scheduler::ReqId;
use super::worker::{Event, GenerateWork, Job, Permit, Seq, Work, Worker};
use crate::engine::generate::TextDecoder;
use crate::engine::{Engine, PrepareBuilder, Prepared, Source, Tokenized};
use crate::methods::Assembled;
use crate::store::DocId;

/// What one step did.
pub(crate) enum Outcome {
    /// More steps to go.
    Continue,
    /// Assembled: decode it from now on.
    Decode(Box<Seq>),
    /// Done without decoding (an upload); its answer is sent.
    Answered,
    Failed(ApiError),
}

enum Stage {
    /// Segments being read or prefilled.
    // Boxed parts keep the variants close in size (clippy::large_enum_variant).
    Documents {
        w: Box<GenerateWork>,
        decoder: Box<TextDecoder>,
        t: Tokenized,
        b: Box<PrepareBuilder>,
    },
    /// Every segment is ready: the method runs next.
    Method {
        w: Box<GenerateWork>,
        decoder: Box<TextDecoder>,
        t: Tokenized,
        prepared: Box<Prepared>,
    },
    /// A request without documents: one prefill.
    Plain {
        w: Box<GenerateWork>,
        decoder: Box<TextDecoder>,
        tokens: usize,
    },
    /// An upload: prefill and store one document.
    Ingest { t: Tokenized },
    /// Between two stages (only while a step runs).
    Taken,
}

pub(crate) struct Task {
    pub(crate) id: ReqId,
    pub(crate) events: UnboundedSender<Event>,
    pub(crate) received: Instant,
    permit: Option<Permit>,
    raw: bool,
    stage: Stage,
    context_tokens: usize,
    max_tokens: usize,
}

impl Task {
    /// Tokenizes and checks a job (the first step, cheap next to any prefill).
    pub(crate) fn new(w: &mut Worker, id: ReqId, job: Job) -> Result<Task, ApiError> {
        let Job {
            work,
            events,
            received,
            permit,
        } = job;
        let (raw, stage, context_tokens, max_tokens) = match work {
            Work::Ingest { text } => {
                w.set_chat(false);
                let t = w.engine.tokenize_document(&text)?;
                w.check_documents(&t.documents)?;
                let n = t.prefix.len() + t.documents.iter().map(Vec::len).sum::<usize>();
                (false, Stage::Ingest { t }, n, 0)
            }
            Work::Generate(g) => {
                // Checks the sampling knobs before any model work.
                let decoder = Box::new(TextDecoder::new(
                    &w.engine.tokenizer,
                    &g.sampling,
                    g.ignore_eos,
                )?);
                w.set_chat(g.raw);
                let max_tokens = g.sampling.max_new_tokens;
                if g.prompt.documents.is_empty() {
                    let tokens = w.engine.tokenize_plain(&g.prompt)?.len();
                    w.check_context(tokens)?;
                    let raw = g.raw;
                    let stage = Stage::Plain {
                        w: g,
                        decoder,
                        tokens,
                    };
                    (raw, stage, tokens, max_tokens)
                } else {
                    let t = w.engine.tokenize(&g.prompt)?;
                    w.check_documents(&t.documents)?;
                    let n = t.prefix.len()
                        + t.documents.iter().map(Vec::len).sum::<usize>()
                        + t.question.len();
                    w.check_context(n)?;
                    let b = Box::new(PrepareBuilder::new(&t, &[]));
                    let raw = g.raw;
                    let stage = Stage::Documents {
                        w: g,
                        decoder,
                        t,
                        b,
                    };
                    (raw, stage, n, max_tokens)
                }
            }
        };
        Ok(Task {
            id,
            events,
            received,
            permit: Some(permit),
            raw,
            stage,
            context_tokens,
            max_tokens,
        })
    }

    /// (context tokens, max_tokens), what the KV reservation is made of.
    pub(crate) fn token_counts(&self) -> (usize, usize) {
        (self.context_tokens, self.max_tokens)
    }

    /// Tokens the request's cache can grow to: its KV reservation.
    pub(crate) fn reserve_tokens(&self, max_context: usize) -> usize {
        (self.context_tokens + self.max_tokens).min(max_context.max(self.context_tokens))
    }

    /// Prefill tokens the next step may cost (an upper bound: a stored document costs a read).
    pub(crate) fn cost(&self) -> usize {
        match &self.stage {
            Stage::Documents { b, .. } => b.next_tokens().unwrap_or(0),
            Stage::Method { w, t, .. } => {
                if w.method.name() == "recompute" {
                    self.context_tokens
                } else {
                    t.question.len()
                }
            }
            Stage::Plain { tokens, .. } => *tokens,
            Stage::Ingest { .. } | Stage::Taken => self.context_tokens,
        }
    }

    /// Store ids of the segments this request will read, for the prefetcher.
    pub(crate) fn document_ids(&self, engine: &Engine) -> Vec<DocId> {
        let t = match &self.stage {
            Stage::Documents { t, .. } => t,
            _ => return Vec::new(),
        };
        let mut ids = Vec::with_capacity(t.documents.len() + 1);
        if !t.prefix.is_empty() {
            ids.push(engine.doc_id(&[], &t.prefix));
        }
        ids.extend(t.documents.iter().map(|d| engine.doc_id(&t.prefix, d)));
        ids
    }
}

impl Worker {
    /// Runs the next step of `task`.
    pub(crate) fn step(&mut self, task: &mut Task) -> Outcome {
        if task.events.is_closed() {
            self.metrics.cancelled.fetch_add(1, Relaxed);
            return Outcome::Answered;
        }
        self.set_chat(task.raw);
        match std::mem::replace(&mut task.stage, Stage::Taken) {
            Stage::Documents {
                w,
                decoder,
                t,
                mut b,
            } => {
                // Stored segments are read in the same step; at most one is prefilled.
                loop {
                    match self.engine.prepare_next(&mut b, &mut |_| {}) {
                        Err(e) => return Outcome::Failed(e.into()),
                        Ok(None) => {
                            task.stage = Stage::Method {
                                w,
                                decoder,
                                t,
                                prepared: Box::new((*b).finish()),
                            };
                            return Outcome::Continue;
                        }
                        Ok(Some(Source::Computed)) if !b.is_done() => {
                            task.stage = Stage::Documents { w, decoder, t, b };
                            return Outcome::Continue;
                        }
                        Ok(Some(_)) => {}
                    }
                }
            }
            Stage::Method {
                w,
                decoder,
                t,
                prepared,
            } => match self.assemble_rag(&w, &t, &prepared) {
                Ok((a, usage)) => self.ready(task, a, usage, w.method.name(), *decoder),
                Err(e) => Outcome::Failed(e),
            },
            Stage::Plain { w, decoder, tokens } => match self.engine.assemble_plain(&w.prompt) {
                Ok(a) => {
                    self.metrics.prompt_tokens.fetch_add(tokens as u64, Relaxed);
                    let usage = Usage {
                        prompt_tokens: tokens,
                        ..Default::default()
                    };
                    let method = a.stats.method.clone();
                    self.ready(task, a, usage, method, *decoder)
                }
                Err(e) => Outcome::Failed(e.into()),
            },
            Stage::Ingest { t } => match self.ingest(&t) {
                Ok(ev) => {
                    task.permit = None;
                    let _ = task.events.send(ev);
                    Outcome::Answered
                }
                Err(e) => Outcome::Failed(e),
            },
            Stage::Taken => Outcome::Failed(ApiError::internal("a request was stepped twice")),
        }
    }

    fn ready(
        &self,
        task: &mut Task,
        a: Assembled,
        usage: Usage,
        method: String,
        decoder: TextDecoder,
    ) -> Outcome {
        let _ = task.events.send(Event::Started { usage, method });
        let pos = a.cache.next_position();
        Outcome::Decode(Box::new(Seq {
            id: task.id,
            events: task.events.clone(),
            permit: task.permit.take(),
            received: task.received,
            cache: a.cache,
            logits: a.logits,
            decoder,
            pos,
            last_token: None,
        }))
    }

    fn assemble_rag(
        &self,
        w: &GenerateWork,
        t: &Tokenized,
        prepared: &Prepared,
    ) -> Result<(Assembled, Usage), ApiError> {
        let a = self.engine.assemble_prepared(prepared, w.method.as_ref())?;
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
            prompt_tokens_details: PromptDetails {
                cached_tokens: cached,
            },
            ..Default::default()
        };
        Ok((a, usage))
    }

    fn ingest(&self, t: &Tokenized) -> Result<Event, ApiError> {
        // An upload is acknowledged only once its KV is in the store (ingest fails otherwise).
        let r = self.engine.ingest(t, None)?;
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
