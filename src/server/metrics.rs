//! Counters and histograms, rendered in the Prometheus text format (version 0.0.4), plus a
//! store wrapper that counts store failures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::store::{DocId, EntryInfo, KvStore, StoreStats, StoredDoc};
use crate::Result;

/// Latency buckets, seconds: 5 ms .. 60 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            g.0[i] += 1;
        }
        g.1 += v;
        g.2 += 1;
    }

    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).2
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, n) in self.bounds.iter().zip(&g.0) {
            acc += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}", g.1);
        let _ = writeln!(out, "{name}_count {}", g.2);
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub struct Metrics {
    /// (route, status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub ttft: Histogram,
    pub per_token: Histogram,
    pub queue_wait: Histogram,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub store_errors: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected_full: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// KV bytes held by requests being decoded now.
    pub active_kv_bytes: AtomicU64,
    pub active_sequences: AtomicU64,
    pub queued: AtomicU64,
    pub documents: AtomicU64,
    /// The KV budget (`--kv-budget`) and what admitted requests reserve of it.
    pub kv_budget_bytes: AtomicU64,
    pub kv_reserved_bytes: AtomicU64,
    /// Requests tokenized and waiting for KV room.
    pub waiting_for_kv: AtomicU64,
    pub kv_refused: AtomicU64,
    pub assembly_steps: AtomicU64,
    pub decode_retries: AtomicU64,
    /// Prefetch ([`super::prefetch`]): entries read ahead, used from the buffer, requested
    /// but read by the model thread first, and bytes held now.
    pub prefetch_reads: AtomicU64,
    pub prefetch_hits: AtomicU64,
    pub prefetch_late: AtomicU64,
    pub prefetch_bytes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            ttft: Histogram::new(&LATENCY_BUCKETS),
            per_token: Histogram::new(&LATENCY_BUCKETS),
            queue_wait: Histogram::new(&LATENCY_BUCKETS),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected_full: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            active_kv_bytes: AtomicU64::new(0),
            active_sequences: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            documents: AtomicU64::new(0),
            kv_budget_bytes: AtomicU64::new(0),
            kv_reserved_bytes: AtomicU64::new(0),
            waiting_for_kv: AtomicU64::new(0),
            kv_refused: AtomicU64::new(0),
            assembly_steps: AtomicU64::new(0),
            decode_retries: AtomicU64::new(0),
            prefetch_reads: AtomicU64::new(0),
            prefetch_hits: AtomicU64::new(0),
            prefetch_late: AtomicU64::new(0),
            prefetch_bytes: AtomicU64::new(0),
        }
    }
}

/// Store numbers sampled for /metrics (listing a store can be slow, so it is cached).
#[derive(Clone, Debug, Default)]
pub struct StoreSample {
    pub entries: usize,
    pub bytes: u64,
    pub memory_bytes: usize,
    pub memory_budget: usize,
    /// Reads the memory tier answered, reads of the backend (disk or Redis) that found the
    /// entry, and reads that found it nowhere.
    pub memory_hits: u64,
    pub backend_hits: u64,
    pub misses: u64,
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn render(&self, store: Option<&StoreSample>) -> String {
        let mut o = String::new();
        {
            let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            o.push_str("# HELP samkv_requests_total HTTP requests by route and status.\n");
            o.push_str("# TYPE samkv_requests_total counter\n");
            for ((r, s), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "samkv_requests_total{{route=\"{}\",status=\"{s}\"}} {n}",
                    label(r)
                );
            }
            o.push_str(
                "# HELP samkv_request_errors_total HTTP requests answered with a 4xx or 5xx status.\n",
            );
            o.push_str("# TYPE samkv_request_errors_total counter\n");
            for ((r, s), n) in m.iter().filter(|((_, s), _)| *s >= 400) {
                let _ = writeln!(
                    o,
                    "samkv_request_errors_total{{route=\"{}\",status=\"{s}\"}} {n}",
                    label(r)
                );
            }
        }
        self.ttft.render(
            &mut o,
            "samkv_time_to_first_token_seconds",
            "Time from receiving a generation request to its first token.",
        );
        self.per_token.render(
            &mut o,
            "samkv_time_per_output_token_seconds",
            "Time between consecutive generated tokens of one request.",
        );
        self.queue_wait.render(
            &mut o,
            "samkv_queue_wait_seconds",
            "Time a request waited before the worker started it.",
        );
        let counters: [(&str, &str, &AtomicU64); 15] = [
            ("samkv_cache_hits_total", "Document KV caches loaded from the store.", &self.cache_hits),
            ("samkv_cache_misses_total", "Document KV caches computed because the store did not have them.", &self.cache_misses),
            ("samkv_store_errors_total", "Failed store or document registry operations (the request recomputed or went on without it).", &self.store_errors),
            ("samkv_requests_cancelled_total", "Generations stopped because the client went away.", &self.cancelled),
            ("samkv_requests_rejected_total", "Requests refused with 429 because the queue was full.", &self.rejected_full),
            ("samkv_prompt_tokens_total", "Prompt tokens of finished generation requests.", &self.prompt_tokens),
            ("samkv_completion_tokens_total", "Generated tokens.", &self.completion_tokens),
            ("samkv_cached_tokens_total", "Prompt tokens whose KV came from the store.", &self.cached_tokens),
            ("samkv_documents_uploaded_total", "Documents uploaded through /v1/documents.", &self.documents),
            ("samkv_requests_kv_refused_total", "Requests refused because their KV reservation exceeds the whole --kv-budget.", &self.kv_refused),
            ("samkv_assembly_steps_total", "Assembly steps run between decode steps (tokenized requests' segment loads or prefills, and method assemblies).", &self.assembly_steps),
            ("samkv_decode_retries_total", "Batched decode steps that failed and were retried one sequence at a time.", &self.decode_retries),
            ("samkv_prefetch_reads_total", "Store entries read ahead for waiting requests.", &self.prefetch_reads),
            ("samkv_prefetch_hits_total", "Store reads of the model thread answered by the prefetch buffer.", &self.prefetch_hits),
            ("samkv_prefetch_late_total", "Prefetches the model thread overtook (it read the entry itself).", &self.prefetch_late),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let mut gauges: Vec<(&str, &str, u64)> = vec![
            (
                "samkv_active_kv_bytes",
                "KV bytes held by requests being decoded.",
                self.active_kv_bytes.load(Relaxed),
            ),
            (
                "samkv_active_sequences",
                "Requests being decoded.",
                self.active_sequences.load(Relaxed),
            ),
            (
                "samkv_queue_depth",
                "Requests admitted and not finished (queued or running).",
                self.queued.load(Relaxed),
            ),
            (
                "samkv_kv_budget_bytes",
                "KV bytes admitted requests may reserve together (--kv-budget).",
                self.kv_budget_bytes.load(Relaxed),
            ),
            (
                "samkv_kv_reserved_bytes",
                "KV bytes reserved by admitted requests: (context + max_tokens) x bytes per token each.",
                self.kv_reserved_bytes.load(Relaxed),
            ),
            (
                "samkv_prefetch_bytes",
                "Bytes held in the prefetch buffer (--prefetch-bytes).",
                self.prefetch_bytes.load(Relaxed),
            ),
            (
                "samkv_requests_waiting_for_kv",
                "Requests tokenized and waiting for room in the KV budget.",
                self.waiting_for_kv.load(Relaxed),
            ),
        ];
        if let Some(s) = store {
            gauges.push((
                "samkv_store_entries",
                "Documents in the persistent KV store.",
                s.entries as u64,
            ));
            gauges.push((
                "samkv_store_bytes",
                "Bytes of the persistent KV store.",
                s.bytes,
            ));
            gauges.push((
                "samkv_store_memory_bytes",
                "KV bytes held in the in-memory tier.",
                s.memory_bytes as u64,
            ));
            gauges.push((
                "samkv_store_memory_budget_bytes",
                "Budget of the in-memory tier.",
                s.memory_budget as u64,
            ));
        }
        for (name, help, v) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        if let Some(s) = store {
            self.render_tiers(&mut o, s);
        }
        o
    }

    /// Per-tier reads and hit rates: the memory tier, the backend store (disk or Redis),
    /// the prefetch buffer in front of both.
    fn render_tiers(&self, o: &mut String, s: &StoreSample) {
        let reads = s.memory_hits + s.backend_hits + s.misses;
        let prefetch = self.prefetch_hits.load(Relaxed);
        let counters = [
            (
                "samkv_store_memory_hits_total",
                "Store reads answered by the memory tier.",
                s.memory_hits,
            ),
            (
                "samkv_store_backend_hits_total",
                "Store reads answered by the backend (disk or Redis) after a memory-tier miss.",
                s.backend_hits,
            ),
            (
                "samkv_store_misses_total",
                "Store reads that found no entry.",
                s.misses,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let ratio = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        let rates = [
            ("samkv_store_memory_hit_ratio", "Share of store reads answered by the memory tier.", ratio(s.memory_hits, reads)),
            ("samkv_store_backend_hit_ratio", "Share of store reads answered by the backend.", ratio(s.backend_hits, reads)),
            ("samkv_prefetch_hit_ratio", "Prefetch hits over prefetch hits plus store reads (the prefetch thread's own reads of the memory tier and the backend included).", ratio(prefetch, prefetch + reads)),
        ];
        for (name, help, v) in rates {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
    }
}

/// Forwards to a store and counts its failures in `samkv_store_errors_total`, so a Redis
/// outage shows up in the metrics while requests carry on by recomputing.
pub struct ObservedStore {
    pub inner: Arc<dyn KvStore>,
    pub metrics: Arc<Metrics>,
}

impl ObservedStore {
    fn count<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.metrics.store_errors.fetch_add(1, Relaxed);
        }
        r
    }
}

impl KvStore for ObservedStore {
    fn get(&self, id: &DocId) -> Result<Option<Arc<StoredDoc>>> {
        self.count(self.inner.get(id))
    }
    fn put(&self, doc: &StoredDoc) -> Result<bool> {
        self.count(self.inner.put(doc))
    }
    fn contains(&self, id: &DocId) -> Result<bool> {
        self.count(self.inner.contains(id))
    }
    fn remove(&self, id: &DocId) -> Result<bool> {
        self.count(self.inner.remove(id))
    }
    fn list(&self) -> Result<Vec<EntryInfo>> {
        self.count(self.inner.list())
    }
    fn stats(&self) -> Result<StoreStats> {
        self.count(self.inner.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&LATENCY_BUCKETS);
        h.observe(0.001);
        h.observe(0.2);
        h.observe(100.0);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.005\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.25\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"60\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
        assert!(s.contains("x_sum 100.201"), "{s}");
    }

    #[test]
    fn render_has_every_family_with_type_lines() {
        let m = Metrics::default();
        m.request("/v1/chat/completions", 200);
        m.request("/v1/chat/completions", 400);
        m.store_errors.fetch_add(2, Relaxed);
        let s = m.render(Some(&StoreSample::default()));
        assert!(s.contains("samkv_requests_total{route=\"/v1/chat/completions\",status=\"400\"} 1"));
        assert!(s.contains(
            "samkv_request_errors_total{route=\"/v1/chat/completions\",status=\"400\"} 1"
        ));
        assert!(!s
            .contains("samkv_request_errors_total{route=\"/v1/chat/completions\",status=\"200\"}"));
        assert!(s.contains("samkv_store_errors_total 2\n"));
        for l in s.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                s.contains(&format!("# TYPE {family} ")),
                "no TYPE line for {name}"
            );
        }
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
