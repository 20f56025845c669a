//! Prefetch: while a request waits for admission (KV budget, `--max-batch`), a thread reads
//! its stored documents from the store (disk or Redis, through the memory tier) into a
//! bounded host-memory buffer, so the model thread finds them there instead of waiting on
//! I/O between two decode steps.
//!
//! The buffer sits in front of the engine's store ([`PrefetchStore`]): the model thread's
//! `get` takes an entry out of it (a prefetch hit) or reads through as before. It holds at
//! most `--prefetch-bytes`; entries no request took (a cancelled request, one that was
//! admitted before its prefetch ran) are dropped oldest first. A read that fails here is
//! only logged: the model thread reads (or recomputes) the document itself.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use super::metrics::Metrics;
use crate::store::{DocId, EntryInfo, KvStore, StoreStats, StoredDoc};
use crate::Result;

#[derive(Default)]
struct Buf {
    docs: HashMap<DocId, Arc<StoredDoc>>,
    /// Insertion order, oldest first (may name entries already taken).
    order: VecDeque<DocId>,
    /// Requested and not read yet: the prefetcher skips those the model thread got to first.
    pending: HashSet<DocId>,
    bytes: usize,
}

/// The prefetched entries, shared by the prefetch thread and the store wrapper.
pub struct PrefetchBuffer {
    buf: Mutex<Buf>,
    budget: usize,
    metrics: Arc<Metrics>,
}

impl PrefetchBuffer {
    pub fn new(budget: usize, metrics: Arc<Metrics>) -> Arc<PrefetchBuffer> {
        Arc::new(PrefetchBuffer {
            buf: Mutex::default(),
            budget,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buf> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a prefetched entry (a hit), or None; a requested entry not yet read counts as a
    /// miss and is no longer prefetched.
    fn take(&self, id: &DocId) -> Option<Arc<StoredDoc>> {
        let mut b = self.lock();
        match b.docs.remove(id) {
            Some(d) => {
                b.bytes -= d.total_bytes();
                self.metrics.prefetch_hits.fetch_add(1, Relaxed);
                self.metrics.prefetch_bytes.store(b.bytes as u64, Relaxed);
                Some(d)
            }
            None => {
                if b.pending.remove(id) {
                    self.metrics.prefetch_late.fetch_add(1, Relaxed);
                }
                None
            }
        }
    }

    /// Keeps `doc`, dropping the oldest entries to stay within the budget; false if it
    /// alone exceeds the budget.
    fn insert(&self, doc: Arc<StoredDoc>) -> bool {
        let bytes = doc.total_bytes();
        if bytes > self.budget {
            return false;
        }
        let mut b = self.lock();
        while b.bytes + bytes > self.budget {
            let Some(old) = b.order.pop_front() else {
                break;
            };
            if let Some(d) = b.docs.remove(&old) {
                b.bytes -= d.total_bytes();
            }
        }
        if b.docs.insert(doc.id.clone(), doc.clone()).is_none() {
            b.bytes += bytes;
            b.order.push_back(doc.id.clone());
        }
        self.metrics.prefetch_bytes.store(b.bytes as u64, Relaxed);
        true
    }
}

/// Hands document ids to the prefetch thread.
#[derive(Clone)]
pub struct Prefetcher {
    tx: SyncSender<Vec<DocId>>,
    buf: Arc<PrefetchBuffer>,
}

impl Prefetcher {
    /// Starts the thread reading from `store` (the store without the buffer in front).
    pub fn spawn(store: Arc<dyn KvStore>, buf: Arc<PrefetchBuffer>) -> std::io::Result<Self> {
        // Bounded: when the thread is behind, requests are simply not prefetched.
        let (tx, rx) = sync_channel::<Vec<DocId>>(256);
        let b = buf.clone();
        std::thread::Builder::new()
            .name("samkv-prefetch".into())
            .spawn(move || {
                for ids in rx {
                    for id in ids {
                        if !b.lock().pending.contains(&id) {
                            continue; // taken by the model thread already
                        }
                        let r = store.get(&id);
                        b.lock().pending.remove(&id);
                        match r {
                            Ok(Some(doc)) => {
                                b.metrics.prefetch_reads.fetch_add(1, Relaxed);
                                b.insert(doc);
                            }
                            Ok(None) => {}
                            Err(e) => tracing::debug!("prefetch of {id}: {e}"),
                        }
                    }
                }
            })?;
        Ok(Prefetcher { tx, buf })
    }

    /// Queues a waiting request's documents; never blocks the model thread.
    pub fn request(&self, ids: Vec<DocId>) {
        if ids.is_empty() {
            return;
        }
        {
            let mut b = self.buf.lock();
            for id in &ids {
                if !b.docs.contains_key(id) {
                    b.pending.insert(id.clone());
                }
            }
        }
        if let Err(TrySendError::Full(ids) | TrySendError::Disconnected(ids)) =
            self.tx.try_send(ids)
        {
            let mut b = self.buf.lock();
            for id in &ids {
                b.pending.remove(id);
            }
        }
    }
}

/// The engine's store with the prefetch buffer in front of reads.
pub struct PrefetchStore {
    pub inner: Arc<dyn KvStore>,
    pub buf: Arc<PrefetchBuffer>,
}

impl KvStore for PrefetchStore {
    fn get(&self, id: &DocId) -> Result<Option<Arc<StoredDoc>>> {
        match self.buf.take(id) {
            Some(d) => Ok(Some(d)),
            None => self.inner.get(id),
        }
    }
    fn put(&self, doc: &StoredDoc) -> Result<bool> {
        self.inner.put(doc)
    }
    fn contains(&self, id: &DocId) -> Result<bool> {
        self.inner.contains(id)
    }
    fn remove(&self, id: &DocId) -> Result<bool> {
        self.buf.take(id);
        self.inner.remove(id)
    }
    fn list(&self) -> Result<Vec<EntryInfo>> {
        self.inner.list()
    }
    fn stats(&self) -> Result<StoreStats> {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_util::make_doc;
    use crate::store::MemoryTier;

    #[test]
    fn prefetched_entries_are_taken_once_and_the_buffer_stays_bounded() -> Result<()> {
        let m = Arc::new(Metrics::default());
        let store: Arc<dyn KvStore> = Arc::new(MemoryTier::new(1 << 30, None));
        let docs: Vec<StoredDoc> = (0..3)
            .map(|i| make_doc(2, 2, 8, 4, candle_core::DType::F32, i))
            .collect();
        for d in &docs {
            store.put(d)?;
        }
        let one = docs[0].total_bytes();
        let buf = PrefetchBuffer::new(2 * one, m.clone());
        let front = PrefetchStore {
            inner: store.clone(),
            buf: buf.clone(),
        };
        let p = Prefetcher::spawn(store, buf.clone())?;
        p.request(docs.iter().map(|d| d.id.clone()).collect());
        let t = std::time::Instant::now();
        while m.prefetch_reads.load(Relaxed) < 3 && t.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(m.prefetch_reads.load(Relaxed), 3);
        // Two fit: the oldest was dropped.
        assert_eq!(m.prefetch_bytes.load(Relaxed), 2 * one as u64);
        assert!(front.get(&docs[2].id)?.is_some());
        assert!(front.get(&docs[0].id)?.is_some(), "read through");
        assert!(front.get(&docs[2].id)?.is_some(), "read through once taken");
        assert_eq!(m.prefetch_hits.load(Relaxed), 1);
        Ok(())
    }
}
