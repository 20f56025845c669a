//! A byte-budgeted LRU of decoded documents in front of an optional persistent store.
//!
//! Loading from disk costs a read, a checksum and a copy per tensor; documents that recur across
//! requests (the common RAG case) are served from here instead. The budget counts
//! [`StoredDoc::total_bytes`] (k, v and side tensors).

use super::{DocId, EntryInfo, KvStore, StoreStats, StoredDoc};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

struct Entry {
    doc: Arc<StoredDoc>,
    bytes: usize,
    tick: u64,
}

#[derive(Default)]
struct Lru {
    map: HashMap<DocId, Entry>,
    /// tick -> id, oldest first.
    order: BTreeMap<u64, DocId>,
    next_tick: u64,
    bytes: usize,
    memory_hits: u64,
    disk_hits: u64,
    misses: u64,
    errors: u64,
    evictions: u64,
}

impl Lru {
    fn touch(&mut self, id: &DocId) -> Option<Arc<StoredDoc>> {
        let tick = self.next_tick;
        let e = self.map.get_mut(id)?;
        self.order.remove(&e.tick);
        e.tick = tick;
        self.order.insert(tick, id.clone());
        self.next_tick += 1;
        Some(e.doc.clone())
    }

    fn remove(&mut self, id: &DocId) -> bool {
        match self.map.remove(id) {
            Some(e) => {
                self.order.remove(&e.tick);
                self.bytes -= e.bytes;
                true
            }
            None => false,
        }
    }

    /// Caches `doc` as most recent, evicting the least recent until it fits. False (and no
    /// change) when the doc alone exceeds the budget.
    fn insert(&mut self, doc: Arc<StoredDoc>, budget: usize) -> bool {
        let bytes = doc.total_bytes();
        if bytes > budget {
            return false;
        }
        if self.touch(&doc.id).is_some() {
            return true;
        }
        while self.bytes + bytes > budget {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&old) {
                self.bytes -= e.bytes;
                self.evictions += 1;
            }
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        self.order.insert(tick, doc.id.clone());
        self.map.insert(doc.id.clone(), Entry { doc, bytes, tick });
        self.bytes += bytes;
        true
    }
}

/// LRU memory tier; write-through to `inner` when there is one.
pub struct MemoryTier {
    budget: usize,
    inner: Option<Arc<dyn KvStore>>,
    lru: Mutex<Lru>,
}

impl MemoryTier {
    pub fn new(budget_bytes: usize, inner: Option<Arc<dyn KvStore>>) -> MemoryTier {
        MemoryTier {
            budget: budget_bytes,
            inner,
            lru: Mutex::new(Lru::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        // The LRU's invariants hold between statements, so a panic elsewhere cannot leave it
        // half-updated in a harmful way; keep serving.
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn inner(&self) -> Option<&Arc<dyn KvStore>> {
        self.inner.as_ref()
    }

    /// Whether `id` is in memory (does not change recency).
    pub fn is_cached(&self, id: &DocId) -> bool {
        self.lock().map.contains_key(id)
    }

    /// Cached ids, least recently used first.
    pub fn cached_ids(&self) -> Vec<DocId> {
        self.lock().order.values().cloned().collect()
    }

    /// Drops everything from memory (the inner store is untouched).
    pub fn clear(&self) {
        let mut l = self.lock();
        l.map.clear();
        l.order.clear();
        l.bytes = 0;
    }
}

impl KvStore for MemoryTier {
    // Maintenance is the persistent store's: the memory tier holds copies only.
    fn verify(&self) -> Result<super::VerifyReport> {
        match &self.inner {
            Some(inner) => inner.verify(),
            None => Ok(Default::default()),
        }
    }

    fn gc(
        &self,
        remove_corrupt: bool,
        tmp_max_age: std::time::Duration,
    ) -> Result<super::GcReport> {
        match &self.inner {
            Some(inner) => inner.gc(remove_corrupt, tmp_max_age),
            None => Ok(Default::default()),
        }
    }

    fn get(&self, id: &DocId) -> Result<Option<Arc<StoredDoc>>> {
        {
            let mut l = self.lock();
            if let Some(doc) = l.touch(id) {
                l.memory_hits += 1;
                return Ok(Some(doc));
            }
        }
        // Read outside the lock so a slow disk read does not block memory hits.
        let found = match &self.inner {
            Some(inner) => inner.get(id),
            None => Ok(None),
        };
        let mut l = self.lock();
        match found {
            Ok(Some(doc)) => {
                l.disk_hits += 1;
                l.insert(doc.clone(), self.budget);
                Ok(Some(doc))
            }
            Ok(None) => {
                l.misses += 1;
                Ok(None)
            }
            Err(e) => {
                l.errors += 1;
                Err(e)
            }
        }
    }

    fn put(&self, doc: &StoredDoc) -> Result<bool> {
        let added = match &self.inner {
            Some(inner) => inner.put(doc)?,
            None => {
                doc.validate().map_err(|e| {
                    Error::InvalidInput(format!("cannot store document {}: {e}", doc.id))
                })?;
                if doc.total_bytes() > self.budget {
                    return Err(Error::Store(format!(
                        "document {} needs {} bytes, more than the memory budget of {} bytes, \
                         and there is no persistent store behind it; raise the budget",
                        doc.id,
                        doc.total_bytes(),
                        self.budget
                    )));
                }
                !self.lock().map.contains_key(&doc.id)
            }
        };
        // Tensors are reference-counted, so this clone shares their storage.
        self.lock().insert(Arc::new(doc.clone()), self.budget);
        Ok(added)
    }

    fn contains(&self, id: &DocId) -> Result<bool> {
        if self.is_cached(id) {
            return Ok(true);
        }
        match &self.inner {
            Some(inner) => inner.contains(id),
            None => Ok(false),
        }
    }

    fn remove(&self, id: &DocId) -> Result<bool> {
        let in_memory = self.lock().remove(id);
        match &self.inner {
            Some(inner) => inner.remove(id),
            None => Ok(in_memory),
        }
    }

    fn list(&self) -> Result<Vec<EntryInfo>> {
        if let Some(inner) = &self.inner {
            return inner.list();
        }
        let l = self.lock();
        Ok(l.order
            .values()
            .filter_map(|id| l.map.get(id))
            .map(|e| EntryInfo {
                id: e.doc.id.clone(),
                bytes: e.bytes as u64,
                tokens: e.doc.len(),
                model_fingerprint: e.doc.meta.model_fingerprint.clone(),
                format_version: e.doc.meta.format_version,
                created_unix: e.doc.meta.created_unix,
                source: e.doc.meta.source.clone(),
            })
            .collect())
    }

    fn stats(&self) -> Result<StoreStats> {
        let (entries, bytes) = match &self.inner {
            Some(inner) => {
                let s = inner.stats()?;
                (s.entries, s.bytes)
            }
            None => {
                let l = self.lock();
                (l.map.len(), l.bytes as u64)
            }
        };
        let l = self.lock();
        Ok(StoreStats {
            entries,
            bytes,
            hits: l.memory_hits + l.disk_hits,
            misses: l.misses,
            errors: l.errors,
            memory_hits: l.memory_hits,
            disk_hits: l.disk_hits,
            memory_entries: l.map.len(),
            memory_bytes: l.bytes,
            memory_budget: self.budget,
            evictions: l.evictions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{assert_same, make_doc};
    use super::super::DiskStore;
    use super::*;
    use candle_core::DType;

    #[test]
    fn lru_evicts_least_recently_used_within_budget() -> Result<()> {
        let docs: Vec<StoredDoc> = (0..4)
            .map(|i| make_doc(2, 2, 8, 4, DType::F32, i))
            .collect();
        let one = docs[0].total_bytes();
        assert!(docs.iter().all(|d| d.total_bytes() == one));
        let m = MemoryTier::new(one * 5 / 2, None); // room for two
        let (a, b, c, d) = (&docs[0], &docs[1], &docs[2], &docs[3]);
        assert!(m.put(a)?);
        assert!(m.put(b)?);
        assert!(!m.put(b)?);
        assert_eq!(m.cached_ids(), vec![a.id.clone(), b.id.clone()]);
        // Touch a, so b becomes least recent and is the one evicted by c.
        assert!(m.get(&a.id)?.is_some());
        assert!(m.put(c)?);
        assert_eq!(m.cached_ids(), vec![a.id.clone(), c.id.clone()]);
        assert!(m.get(&b.id)?.is_none());
        assert!(m.put(d)?);
        assert_eq!(m.cached_ids(), vec![c.id.clone(), d.id.clone()]);
        let st = m.stats()?;
        assert_eq!(st.evictions, 2);
        assert_eq!(st.memory_entries, 2);
        assert_eq!(st.memory_bytes, 2 * one);
        assert!(st.memory_bytes <= st.memory_budget);
        assert_eq!((st.memory_hits, st.misses), (1, 1));
        assert_eq!(m.list()?.len(), 2);
        assert!(m.remove(&c.id)?);
        assert!(!m.contains(&c.id)?);
        assert_eq!(m.stats()?.memory_bytes, one);
        Ok(())
    }

    #[test]
    fn reads_through_and_caches_disk_entries() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let disk = Arc::new(DiskStore::open(dir.path())?);
        let d = make_doc(2, 2, 8, 4, DType::BF16, 1);
        disk.put(&d)?;
        let m = MemoryTier::new(1 << 20, Some(disk.clone()));
        assert!(!m.is_cached(&d.id));
        assert!(m.contains(&d.id)?);
        assert_same(&d, &m.get(&d.id)?.expect("on disk"));
        assert!(m.is_cached(&d.id));
        m.get(&d.id)?;
        let st = m.stats()?;
        assert_eq!((st.disk_hits, st.memory_hits, st.hits), (1, 1, 2));
        assert_eq!((st.entries, st.memory_entries), (1, 1));
        assert_eq!(disk.stats()?.hits, 1, "second get must not touch the disk");
        // Put writes through.
        let e = make_doc(2, 2, 8, 4, DType::BF16, 2);
        assert!(m.put(&e)?);
        assert!(disk.contains(&e.id)?);
        assert!(m.is_cached(&e.id));
        assert!(!m.put(&e)?);
        assert!(m.remove(&e.id)?);
        assert!(!disk.contains(&e.id)? && !m.is_cached(&e.id));
        Ok(())
    }

    #[test]
    fn oversize_doc_is_written_through_but_not_cached() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let disk = Arc::new(DiskStore::open(dir.path())?);
        let small = make_doc(1, 1, 4, 4, DType::F32, 1);
        let big = make_doc(4, 2, 64, 8, DType::F32, 2);
        let m = MemoryTier::new(big.total_bytes() - 1, Some(disk.clone()));
        assert!(m.put(&small)?);
        assert!(m.put(&big)?);
        assert!(disk.contains(&big.id)?);
        assert!(!m.is_cached(&big.id));
        assert!(
            m.is_cached(&small.id),
            "an uncacheable doc must not evict others"
        );
        assert_same(&big, &m.get(&big.id)?.expect("from disk"));
        assert!(!m.is_cached(&big.id));
        assert_eq!(m.stats()?.evictions, 0);
        // Without a persistent store there is nowhere to put it.
        let mem_only = MemoryTier::new(big.total_bytes() - 1, None);
        let e = mem_only.put(&big).unwrap_err().to_string();
        assert!(e.contains("memory budget"), "{e}");
        Ok(())
    }

    #[test]
    fn corrupt_inner_entry_is_an_error_not_a_miss() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let disk = Arc::new(DiskStore::open(dir.path())?);
        let d = make_doc(1, 1, 4, 4, DType::F32, 1);
        disk.put(&d)?;
        let p = disk.path_of(&d.id)?;
        let bytes = std::fs::read(&p)?;
        std::fs::write(&p, &bytes[..bytes.len() - 3])?;
        let m = MemoryTier::new(1 << 20, Some(disk));
        assert!(m.get(&d.id).is_err());
        assert!(!m.is_cached(&d.id));
        assert_eq!(m.stats()?.errors, 1);
        Ok(())
    }

    #[test]
    fn shared_across_threads() -> Result<()> {
        let docs: Vec<StoredDoc> = (0..8)
            .map(|i| make_doc(1, 1, 8, 4, DType::F16, i))
            .collect();
        let m = MemoryTier::new(docs[0].total_bytes() * 3, None);
        std::thread::scope(|sc| {
            for t in 0..4 {
                let (m, docs) = (&m, &docs);
                sc.spawn(move || {
                    for i in 0..8 {
                        let d = &docs[(i + t) % 8];
                        m.put(d).expect("put");
                        if let Some(got) = m.get(&d.id).expect("get") {
                            assert_eq!(got.id, d.id);
                        }
                    }
                });
            }
        });
        let st = m.stats()?;
        assert!(st.memory_entries <= 3 && st.memory_bytes <= st.memory_budget);
        assert_eq!(m.cached_ids().len(), st.memory_entries);
        Ok(())
    }
}
