//! The document registry: user-visible document ids -> text (and metadata), so chat requests
//! can name documents by id. Kept in memory and in the store: `documents.json` in a store
//! directory, or the `samkv:docs` hash in Redis, so other server processes sharing the store
//! see the same documents.
//!
//! The persistent copy is best effort: if it cannot be read or written (Redis down), the
//! server carries on with its in-memory copy, logs a warning and counts a store error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use fs2::FileExt;
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use crate::store::redis::RedisConn;
use crate::{Error, Result};

/// Redis hash of the registry: field = document id, value = [`DocRecord`] JSON.
pub const REDIS_KEY: &str = "samkv:docs";
/// File of the registry in a store directory.
pub const FILE_NAME: &str = "documents.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocRecord {
    pub id: String,
    pub text: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// Tokens of the document segment as the model sees it.
    pub tokens: usize,
    /// Content address of its KV in the store (computed after the default preamble).
    pub kv_id: String,
    pub created: u64,
}

/// A user-given document id: 1-128 characters from `[A-Za-z0-9._:-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

enum Backend {
    File(PathBuf),
    Redis(Arc<RedisConn>),
    None,
}

pub struct Registry {
    local: RwLock<BTreeMap<String, DocRecord>>,
    backend: Backend,
    metrics: Arc<Metrics>,
}

fn read_file(path: &Path) -> Result<BTreeMap<String, DocRecord>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Error::Store(format!(
                "{} is not a samkv document registry ({e}); move it away",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e.into()),
    }
}

impl Registry {
    /// A registry kept in `dir/documents.json`.
    pub fn in_dir(dir: &Path, metrics: Arc<Metrics>) -> Result<Registry> {
        let path = dir.join(FILE_NAME);
        let local = read_file(&path)?;
        Ok(Registry {
            local: RwLock::new(local),
            backend: Backend::File(path),
            metrics,
        })
    }

    /// A registry kept in Redis (loaded lazily: Redis may be down at start).
    pub fn in_redis(conn: Arc<RedisConn>, metrics: Arc<Metrics>) -> Registry {
        Registry {
            local: RwLock::default(),
            backend: Backend::Redis(conn),
            metrics,
        }
    }

    /// A registry in memory only.
    pub fn in_memory(metrics: Arc<Metrics>) -> Registry {
        Registry {
            local: RwLock::default(),
            backend: Backend::None,
            metrics,
        }
    }

    fn degraded(&self, what: &str, e: &Error) {
        self.metrics.store_errors.fetch_add(1, Relaxed);
        tracing::warn!("document registry: {what}: {e}; using this process's copy");
    }

    fn local_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, DocRecord>> {
        self.local.read().unwrap_or_else(|p| p.into_inner())
    }

    fn local_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, DocRecord>> {
        self.local.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a read-modify-write of the registry file under an exclusive lock, so processes
    /// sharing the store directory do not lose each other's updates.
    fn update_file<T>(
        path: &Path,
        f: impl FnOnce(&mut BTreeMap<String, DocRecord>) -> T,
    ) -> Result<T> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.with_extension("json.lock"))?;
        lock.lock_exclusive()?;
        let mut map = read_file(path)?;
        let out = f(&mut map);
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&mut tmp, &map)
            .map_err(|e| Error::Store(format!("cannot write {}: {e}", path.display())))?;
        tmp.persist(path).map_err(|e| e.error)?;
        drop(lock);
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Option<DocRecord> {
        if let Some(r) = self.local_map().get(id) {
            return Some(r.clone());
        }
        let found = match &self.backend {
            Backend::None => Ok(None),
            Backend::File(p) => read_file(p).map(|mut m| m.remove(id)),
            Backend::Redis(c) => c
                .run("reading the document registry", |c| {
                    redis::cmd("HGET")
                        .arg(REDIS_KEY)
                        .arg(id)
                        .query::<Option<String>>(c)
                })
                .and_then(|v| {
                    v.map(|s| {
                        serde_json::from_str::<DocRecord>(&s).map_err(|e| {
                            Error::Store(format!("registry entry `{id}` is unreadable: {e}"))
                        })
                    })
                    .transpose()
                }),
        };
        match found {
            Ok(Some(r)) => {
                self.local_mut().insert(id.to_string(), r.clone());
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                self.degraded("lookup failed", &e);
                None
            }
        }
    }

    pub fn put(&self, rec: DocRecord) {
        let r = match &self.backend {
            Backend::None => Ok(()),
            Backend::File(p) => Self::update_file(p, |m| {
                m.insert(rec.id.clone(), rec.clone());
            }),
            Backend::Redis(c) => serde_json::to_string(&rec)
                .map_err(|e| Error::Store(e.to_string()))
                .and_then(|json| {
                    c.run("writing the document registry", |c| {
                        redis::cmd("HSET")
                            .arg(REDIS_KEY)
                            .arg(&rec.id)
                            .arg(json)
                            .query::<u64>(c)
                    })
                })
                .map(|_| ()),
        };
        if let Err(e) = r {
            self.degraded("write failed", &e);
        }
        self.local_mut().insert(rec.id.clone(), rec);
    }

    /// Removes a document; false if no copy had it.
    pub fn remove(&self, id: &str) -> bool {
        let local = self.local_mut().remove(id).is_some();
        let r = match &self.backend {
            Backend::None => Ok(false),
            Backend::File(p) => Self::update_file(p, |m| m.remove(id).is_some()),
            Backend::Redis(c) => c
                .run("removing from the document registry", |c| {
                    redis::cmd("HDEL").arg(REDIS_KEY).arg(id).query::<u64>(c)
                })
                .map(|n| n > 0),
        };
        match r {
            Ok(b) => b || local,
            Err(e) => {
                self.degraded("remove failed", &e);
                local
            }
        }
    }

    /// Every document, by id.
    pub fn list(&self) -> Vec<DocRecord> {
        let shared = match &self.backend {
            Backend::None => Ok(BTreeMap::new()),
            Backend::File(p) => read_file(p),
            Backend::Redis(c) => c
                .run("listing the document registry", |c| {
                    redis::cmd("HGETALL")
                        .arg(REDIS_KEY)
                        .query::<BTreeMap<String, String>>(c)
                })
                .map(|m| {
                    m.into_iter()
                        .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
                        .collect()
                }),
        };
        let mut all = match shared {
            Ok(m) => m,
            Err(e) => {
                self.degraded("listing failed", &e);
                BTreeMap::new()
            }
        };
        for (k, v) in self.local_map().iter() {
            all.entry(k.clone()).or_insert_with(|| v.clone());
        }
        all.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> DocRecord {
        DocRecord {
            id: id.into(),
            text: format!("text of {id}"),
            metadata: serde_json::json!({"k": 1}),
            tokens: 3,
            kv_id: "a".repeat(64),
            created: 1,
        }
    }

    #[test]
    fn ids_are_restricted() {
        assert!(valid_id("doc-1.a:b_c"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[test]
    fn file_registry_is_shared_between_instances() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let m = Arc::new(Metrics::default());
        let a = Registry::in_dir(dir.path(), m.clone())?;
        let b = Registry::in_dir(dir.path(), m.clone())?;
        a.put(rec("x"));
        a.put(rec("y"));
        assert_eq!(b.get("x"), Some(rec("x")));
        assert_eq!(b.list().len(), 2);
        assert!(b.remove("y"));
        assert!(!b.remove("y"));
        let c = Registry::in_dir(dir.path(), m.clone())?;
        assert_eq!(
            c.list().iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["x"]
        );
        assert_eq!(m.store_errors.load(Relaxed), 0);
        Ok(())
    }

    #[test]
    fn unreachable_redis_keeps_a_local_copy() -> Result<()> {
        let m = Arc::new(Metrics::default());
        let r = Registry::in_redis(
            Arc::new(RedisConn::open("redis://127.0.0.1:1/")?),
            m.clone(),
        );
        r.put(rec("x"));
        assert_eq!(r.get("x"), Some(rec("x")));
        assert_eq!(r.get("nope"), None);
        assert_eq!(r.list().len(), 1);
        assert!(m.store_errors.load(Relaxed) >= 3);
        Ok(())
    }
}
