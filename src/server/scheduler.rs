//! The serving loop's decisions, kept apart from the model so they can be tested with a fake:
//! which waiting requests are admitted under the KV-byte budget, which admitted requests take
//! an assembly step this round under the token budget, and how a failed batched decode step
//! is retried sequence by sequence so that only the failing sequence ends.
//!
//! Each round of the model thread (see [`super::worker`]) is: admit, one assembly step for
//! each request [`Scheduler::plan`] picks, one batched decode step for every running sequence.
//! Splitting assembly into steps (tokenize, one document's prefill, the method) is what keeps
//! running streams moving while a 10-document request is prepared.
//!
//! KV budget. A request reserves `(context tokens + max_tokens) x bytes per token` when it is
//! admitted and releases it when it ends, so the caches of everything admitted can never
//! outgrow the budget. Once assembled, the reservation shrinks to the cache as allocated, which
//! the worker sizes once for the rows kept plus `max_tokens` ([`Scheduler::shrink`]): a sparse
//! method that keeps 15% of the context then holds about 15% of Reuse's bytes, and the budget
//! admits that many more of its requests. A request that could not fit even into an empty server is
//! refused at once ([`KvRefusal`]); one that does not fit now waits.
//!
//! No starvation. Admission is FIFO, with bounded overtaking: while the request at the head of
//! the queue does not fit, later requests that do fit may be admitted past it, but at most
//! [`Budgets::max_overtake`] times; after that nothing behind it is admitted until it fits,
//! which it does once enough running requests end (its reservation is at most the budget).
//! Small requests keep flowing under a big one for a while, and the big one's wait is bounded.

use std::collections::VecDeque;

/// A request's identity inside the scheduler.
pub type ReqId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Tokens the model processes per round: one per decoding sequence plus the prefill of
    /// the assembly steps taken. At least one assembly step runs per round whatever its size,
    /// so a document larger than the budget still progresses.
    pub step_tokens: usize,
    /// KV bytes all admitted requests may reserve together.
    pub kv_bytes: u64,
    /// Requests admitted at once (assembling or decoding), `--max-batch`.
    pub max_running: usize,
    /// How often later requests may be admitted past a waiting head.
    pub max_overtake: usize,
}

/// A request whose reservation exceeds the whole KV budget: it can never run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRefusal {
    pub need: u64,
    pub budget: u64,
}

impl KvRefusal {
    pub fn message(&self, context_tokens: usize, max_tokens: usize) -> String {
        format!(
            "the request needs {} of KV cache ({context_tokens} context tokens + {max_tokens} \
             max_tokens), more than this server's whole KV budget of {} (--kv-budget); send \
             fewer or shorter documents, ask for fewer max_tokens, or raise --kv-budget",
            human_bytes(self.need),
            human_bytes(self.budget)
        )
    }
}

struct Waiting {
    id: ReqId,
    bytes: u64,
    overtaken: usize,
}

pub struct Scheduler {
    budgets: Budgets,
    reserved: u64,
    waiting: VecDeque<Waiting>,
    /// Admitted requests with their reservation, in admission order.
    admitted: Vec<(ReqId, u64)>,
}

impl Scheduler {
    pub fn new(budgets: Budgets) -> Scheduler {
        Scheduler {
            budgets: Budgets {
                step_tokens: budgets.step_tokens.max(1),
                max_running: budgets.max_running.max(1),
                ..budgets
            },
            reserved: 0,
            waiting: VecDeque::new(),
            admitted: Vec::new(),
        }
    }

    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// Bytes reserved by admitted requests.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn admitted(&self) -> usize {
        self.admitted.len()
    }

    /// Queues a request needing `bytes`; refused if it exceeds the whole budget.
    pub fn submit(&mut self, id: ReqId, bytes: u64) -> Result<(), KvRefusal> {
        if bytes > self.budgets.kv_bytes {
            return Err(KvRefusal {
                need: bytes,
                budget: self.budgets.kv_bytes,
            });
        }
        self.waiting.push_back(Waiting {
            id,
            bytes,
            overtaken: 0,
        });
        Ok(())
    }

    /// Ends a request, waiting or admitted, releasing its reservation.
    pub fn release(&mut self, id: ReqId) {
        if let Some(i) = self.admitted.iter().position(|(r, _)| *r == id) {
            let (_, b) = self.admitted.remove(i);
            self.reserved -= b;
        }
        self.waiting.retain(|w| w.id != id);
    }

    /// Lowers an admitted request's reservation to `bytes` (never raises it): once assembled,
    /// a request holds only the rows its method kept plus room for its answer, so a sparse
    /// method leaves room for more requests than its admission reserved.
    pub fn shrink(&mut self, id: ReqId, bytes: u64) {
        if let Some((_, b)) = self.admitted.iter_mut().find(|(r, _)| *r == id) {
            if bytes < *b {
                self.reserved -= *b - bytes;
                *b = bytes;
            }
        }
    }

    /// Admits waiting requests that fit, in FIFO order with bounded overtaking (module docs);
    /// returns them in admission order.
    pub fn admit(&mut self) -> Vec<ReqId> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() && self.admitted.len() < self.budgets.max_running {
            if i > 0 && self.waiting[0].overtaken >= self.budgets.max_overtake {
                break;
            }
            let fits = self.reserved + self.waiting[i].bytes <= self.budgets.kv_bytes;
            if fits {
                let w = self.waiting.remove(i).expect("index checked");
                self.reserved += w.bytes;
                self.admitted.push((w.id, w.bytes));
                out.push(w.id);
                if i > 0 {
                    self.waiting[0].overtaken += 1;
                }
                continue;
            }
            // This one does not fit: later ones may pass it (the head a bounded number of
            // times, checked above).
            i += 1;
        }
        out
    }

    /// Which assembling requests take a step this round, given how many sequences decode and
    /// each assembling request's next step's token cost (in admission order). One step per
    /// request per round; steps share what the decode leaves of the token budget; the first
    /// always runs, so assembly never stops while streams decode.
    pub fn plan(&self, decoding: usize, assembling: &[(ReqId, usize)]) -> Vec<ReqId> {
        let mut left = self.budgets.step_tokens.saturating_sub(decoding);
        let mut out = Vec::new();
        for (k, &(id, cost)) in assembling.iter().enumerate() {
            if k == 0 || cost <= left {
                left = left.saturating_sub(cost);
                out.push(id);
            }
        }
        out
    }
}

/// One batched decode step over sequences `0..n`, as [`decode_isolated`] drives it.
pub trait BatchStep {
    type Out;
    type Err;
    /// Every sequence in one pass.
    fn all(&mut self) -> Result<Vec<Self::Out>, Self::Err>;
    /// Sequence `i` alone.
    fn one(&mut self, i: usize) -> Result<Self::Out, Self::Err>;
    /// Restores sequence `i`'s cache to its length before the step (a failed pass may have
    /// appended the new token to some layers only).
    fn rollback(&mut self, i: usize);
}

/// Runs the batched step; if it fails, rolls every sequence back and runs each alone, so only
/// a sequence that fails alone gets an error. Returns one result per sequence.
pub fn decode_isolated<B: BatchStep>(b: &mut B, n: usize) -> Vec<Result<B::Out, B::Err>> {
    if let Ok(v) = b.all() {
        if v.len() == n {
            return v.into_iter().map(Ok).collect();
        }
    }
    (0..n)
        .map(|i| {
            b.rollback(i);
            let r = b.one(i);
            if r.is_err() {
                b.rollback(i);
            }
            r
        })
        .collect()
}

/// Parses a byte size: `20GiB`, `512MiB`, `1.5GB`, `4096` (bytes); binary (KiB, MiB, GiB, TiB,
/// also K, M, G, T) and decimal (KB, MB, GB, TB) units.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. 20GiB, 512MiB or 1000000"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => {
            return Err(format!(
                "unknown unit `{u}` in `{s}`; use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 1.0 {
        return Err(format!("`{s}` is not a positive size"));
    }
    Ok(v as u64)
}

/// [`parse_bytes`], also accepting 0 (a feature turned off).
pub fn parse_bytes_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_bytes(s)
}

/// `1.5 GiB`, `512.0 MiB`, `300 B`.
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < U.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", U[u])
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
