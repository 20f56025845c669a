//! The document registry: user-visible document ids -> text (and metadata), so chat requests
//! can name documents by id.
//!
//! The store is the source of truth, not this process: every lookup reads it, so a document
//! uploaded or deleted by one server is seen at once by every server sharing the store. One
//! record per document (a file `documents/<id>.json` in a store directory, the key
//! `samkv:doc:<id>` in Redis), so an upload writes one small record however many documents
//! there are, and listing is paginated by id.
//!
//! Every call returns the store's error instead of carrying on in memory: an upload the
//! store did not take is refused (503/507), never kept in one process only. Creating a
//! record is atomic (a hard link that fails if the name exists; a Lua script in Redis), so
//! two clients uploading different texts under one id cannot overwrite each other.

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::store::disk::tmp_name;
use crate::store::redis::RedisConn;
use crate::{Error, Result};

/// Redis key of a document's record.
pub fn redis_doc_key(id: &str) -> String {
    format!("samkv:doc:{id}")
}
/// Redis sorted set of every document id (all scores 0: ordered by id, for pagination).
pub const REDIS_IDS: &str = "samkv:docids";
/// Redis set of the document ids whose text has the KV entry `kv_id`.
pub fn redis_refs_key(kv_id: &str) -> String {
    format!("samkv:kvrefs:{kv_id}")
}
/// Directory of the records in a store directory.
pub const DIR_NAME: &str = "documents";
/// The single-file registry of samkv before per-document records; imported on open.
pub const LEGACY_FILE: &str = "documents.json";

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

/// A user-given document id: 1-128 characters from `[A-Za-z0-9._:-]`, not starting with
/// `.` (so never `.`, `..` or a hidden file): safe as a file name and a Redis key.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// What [`Registry::insert`] did.
#[derive(Debug, PartialEq)]
pub enum Inserted {
    /// A new record.
    Created,
    /// The id existed with the same text; its record was replaced (new metadata).
    Replaced,
    /// The id exists with another text: nothing was written.
    Conflict(DocRecord),
}

/// One page of [`Registry::list`].
#[derive(Debug, PartialEq)]
pub struct Page {
    pub data: Vec<DocRecord>,
    pub has_more: bool,
}

enum Backend {
    Dir {
        docs: PathBuf,
        refs: PathBuf,
        tmp: PathBuf,
    },
    Redis(Arc<RedisConn>),
    Memory(Mutex<BTreeMap<String, DocRecord>>),
}

pub struct Registry {
    backend: Backend,
}

fn parse(id: &str, bytes: &[u8], whence: &str) -> Result<DocRecord> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Store(format!(
            "registry record `{id}` ({whence}) is unreadable ({e}); delete the document and upload it again"
        ))
    })
}

fn json(rec: &DocRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(rec).map_err(|e| Error::Internal(format!("registry record: {e}")))
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::store_io("cannot fsync directory", dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

// Atomic in Redis: the record is created only if the id is free, with its listing and KV
// reference; otherwise the existing record comes back for the caller to compare.
const INSERT_LUA: &str = r#"
local old = redis.call('GET', KEYS[1])
if old then return old end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return false
"#;

impl Registry {
    /// A registry in `store_dir/documents/`; a legacy `documents.json` is imported once
    /// (then renamed `documents.json.imported`).
    pub fn in_dir(store_dir: &Path) -> Result<Registry> {
        let docs = store_dir.join(DIR_NAME);
        let refs = store_dir.join("document-refs");
        let tmp = store_dir.join("tmp");
        for d in [&docs, &refs, &tmp] {
            fs::create_dir_all(d).map_err(|e| Error::store_io("cannot create", d, e))?;
        }
        let r = Registry {
            backend: Backend::Dir { docs, refs, tmp },
        };
        r.import_legacy(&store_dir.join(LEGACY_FILE))?;
        Ok(r)
    }

    /// A registry in Redis (nothing is read at start: Redis may be down then).
    pub fn in_redis(conn: Arc<RedisConn>) -> Registry {
        Registry {
            backend: Backend::Redis(conn),
        }
    }

    /// A registry in this process's memory only (tests; a memory-only store).
    pub fn in_memory() -> Registry {
        Registry {
            backend: Backend::Memory(Mutex::default()),
        }
    }

    fn import_legacy(&self, path: &Path) -> Result<()> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::store_io("cannot read", path, e)),
        };
        let old: BTreeMap<String, DocRecord> = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Store(format!(
                "{} is not a samkv document registry ({e}); move it away",
                path.display()
            ))
        })?;
        for rec in old.into_values().filter(|r| valid_id(&r.id)) {
            self.insert(rec)?;
        }
        let done = path.with_extension("json.imported");
        fs::rename(path, &done).map_err(|e| Error::store_io("cannot rename", path, e))?;
        tracing::info!("imported {} into {}", path.display(), DIR_NAME);
        Ok(())
    }

    fn check(id: &str) -> Result<()> {
        if valid_id(id) {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "`{id}` is not a document id (1-128 of A-Z a-z 0-9 . _ : -, not starting with .)"
            )))
        }
    }

    /// The record of `id`, read from the store now.
    pub fn get(&self, id: &str) -> Result<Option<DocRecord>> {
        if !valid_id(id) {
            return Ok(None);
        }
        match &self.backend {
            Backend::Dir { docs, .. } => {
                let p = docs.join(format!("{id}.json"));
                match fs::read(&p) {
                    Ok(b) => parse(id, &b, &p.display().to_string()).map(Some),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::store_io("cannot read", &p, e)),
                }
            }
            Backend::Redis(c) => {
                let v: Option<Vec<u8>> = c.run("reading the document registry", |c| {
                    redis::cmd("GET").arg(redis_doc_key(id)).query(c)
                })?;
                v.map(|b| parse(id, &b, "Redis")).transpose()
            }
            Backend::Memory(m) => Ok(lock(m).get(id).cloned()),
        }
    }

    /// Creates the record of `rec.id`, or replaces it if it holds the same text; a record
    /// with another text is left alone and returned. Durable when it returns Ok.
    pub fn insert(&self, rec: DocRecord) -> Result<Inserted> {
        Self::check(&rec.id)?;
        let bytes = json(&rec)?;
        match &self.backend {
            Backend::Dir { docs, refs, tmp } => {
                let tmp_path = tmp.join(tmp_name(&format!("doc-{}", rec.id)));
                let r = Self::insert_file(docs, refs, &tmp_path, &rec, &bytes);
                let _ = fs::remove_file(&tmp_path);
                r
            }
            Backend::Redis(c) => {
                let old: Option<Vec<u8>> = c.run("writing the document registry", |c| {
                    redis::Script::new(INSERT_LUA)
                        .key(redis_doc_key(&rec.id))
                        .key(REDIS_IDS)
                        .key(redis_refs_key(&rec.kv_id))
                        .arg(bytes.as_slice())
                        .arg(&rec.id)
                        .invoke(c)
                })?;
                let Some(old) = old else {
                    return Ok(Inserted::Created);
                };
                let old = parse(&rec.id, &old, "Redis")?;
                if old.text != rec.text {
                    return Ok(Inserted::Conflict(old));
                }
                c.run("writing the document registry", |c| {
                    redis::cmd("SET")
                        .arg(redis_doc_key(&rec.id))
                        .arg(bytes.as_slice())
                        .query::<()>(c)
                })?;
                Ok(Inserted::Replaced)
            }
            Backend::Memory(m) => {
                let mut m = lock(m);
                match m.get(&rec.id) {
                    Some(old) if old.text != rec.text => Ok(Inserted::Conflict(old.clone())),
                    Some(_) => {
                        m.insert(rec.id.clone(), rec);
                        Ok(Inserted::Replaced)
                    }
                    None => {
                        m.insert(rec.id.clone(), rec);
                        Ok(Inserted::Created)
                    }
                }
            }
        }
    }

    fn insert_file(
        docs: &Path,
        refs: &Path,
        tmp_path: &Path,
        rec: &DocRecord,
        bytes: &[u8],
    ) -> Result<Inserted> {
        let io = |what: &str, p: &Path, e| Error::store_io(what, p, e);
        let mut f = fs::File::create_new(tmp_path).map_err(|e| io("cannot create", tmp_path, e))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| io("cannot write", tmp_path, e))?;
        drop(f);
        // The KV reference first: a crash between the two leaves a reference without a
        // record (it only keeps a KV entry alive), never a record whose KV may be deleted.
        let ref_dir = refs.join(&rec.kv_id);
        fs::create_dir_all(&ref_dir).map_err(|e| io("cannot create", &ref_dir, e))?;
        let marker = ref_dir.join(&rec.id);
        fs::write(&marker, b"").map_err(|e| io("cannot write", &marker, e))?;
        sync_dir(&ref_dir)?;
        let path = docs.join(format!("{}.json", rec.id));
        let out = match fs::hard_link(tmp_path, &path) {
            Ok(()) => Inserted::Created,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let old = fs::read(&path).map_err(|e| io("cannot read", &path, e))?;
                let old = parse(&rec.id, &old, &path.display().to_string())?;
                if old.text != rec.text {
                    // Keep the existing record's own reference.
                    if old.kv_id != rec.kv_id {
                        let _ = fs::remove_file(&marker);
                    }
                    return Ok(Inserted::Conflict(old));
                }
                fs::rename(tmp_path, &path).map_err(|e| io("cannot replace", &path, e))?;
                Inserted::Replaced
            }
            Err(e) => return Err(io("cannot create", &path, e)),
        };
        sync_dir(docs)?;
        Ok(out)
    }

    /// Removes a document's record; the removed record, None if there was none.
    pub fn remove(&self, id: &str) -> Result<Option<DocRecord>> {
        let Some(rec) = self.get(id)? else {
            return Ok(None);
        };
        match &self.backend {
            Backend::Dir { docs, refs, .. } => {
                let p = docs.join(format!("{id}.json"));
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(Error::store_io("cannot remove", &p, e)),
                }
                sync_dir(docs)?;
                let marker = refs.join(&rec.kv_id).join(id);
                if let Err(e) = fs::remove_file(&marker) {
                    if e.kind() != ErrorKind::NotFound {
                        return Err(Error::store_io("cannot remove", &marker, e));
                    }
                }
                // Only an empty directory goes; another id's reference keeps it.
                let _ = fs::remove_dir(refs.join(&rec.kv_id));
            }
            Backend::Redis(c) => {
                let (n,): (u64,) = c.run("removing from the document registry", |c| {
                    redis::pipe()
                        .atomic()
                        .cmd("DEL")
                        .arg(redis_doc_key(id))
                        .cmd("ZREM")
                        .arg(REDIS_IDS)
                        .arg(id)
                        .ignore()
                        .cmd("SREM")
                        .arg(redis_refs_key(&rec.kv_id))
                        .arg(id)
                        .ignore()
                        .query(c)
                })?;
                if n == 0 {
                    return Ok(None);
                }
            }
            Backend::Memory(m) => {
                lock(m).remove(id);
            }
        }
        Ok(Some(rec))
    }

    /// Whether any document's text has the KV entry `kv_id`.
    pub fn kv_in_use(&self, kv_id: &str) -> Result<bool> {
        match &self.backend {
            Backend::Dir { refs, .. } => match fs::read_dir(refs.join(kv_id)) {
                Ok(mut d) => Ok(d.next().is_some()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
                Err(e) => Err(Error::store_io("cannot read", &refs.join(kv_id), e)),
            },
            Backend::Redis(c) => c
                .run("reading the document registry", |c| {
                    redis::cmd("SCARD")
                        .arg(redis_refs_key(kv_id))
                        .query::<u64>(c)
                })
                .map(|n| n > 0),
            Backend::Memory(m) => Ok(lock(m).values().any(|r| r.kv_id == kv_id)),
        }
    }

    /// Up to `limit` records with ids after `after` (all when None), by id.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Page> {
        let ids: Vec<String> = match &self.backend {
            Backend::Dir { docs, .. } => {
                let mut ids = Vec::new();
                let rd = fs::read_dir(docs).map_err(|e| Error::store_io("cannot read", docs, e))?;
                for e in rd {
                    let e = e.map_err(|e| Error::store_io("cannot read", docs, e))?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some(id) = name.strip_suffix(".json").filter(|i| valid_id(i)) {
                        if after.is_none_or(|a| id > a) {
                            ids.push(id.to_string());
                        }
                    }
                }
                ids.sort();
                ids.truncate(limit.saturating_add(1));
                ids
            }
            Backend::Redis(c) => {
                let start = after.map_or("-".to_string(), |a| format!("({a}"));
                c.run("listing the document registry", |c| {
                    redis::cmd("ZRANGEBYLEX")
                        .arg(REDIS_IDS)
                        .arg(&start)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit.saturating_add(1).min(i64::MAX as usize))
                        .query(c)
                })?
            }
            Backend::Memory(m) => lock(m)
                .keys()
                .filter(|k| after.is_none_or(|a| k.as_str() > a))
                .take(limit.saturating_add(1))
                .cloned()
                .collect(),
        };
        let has_more = ids.len() > limit;
        let mut data = Vec::with_capacity(ids.len().min(limit));
        for id in ids.iter().take(limit) {
            // Deleted between the listing and the read: simply gone.
            if let Some(r) = self.get(id)? {
                data.push(r);
            }
        }
        Ok(Page { data, has_more })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, text: &str) -> DocRecord {
        DocRecord {
            id: id.into(),
            text: text.into(),
            metadata: serde_json::json!({"k": 1}),
            tokens: 3,
            kv_id: format!("{:0>64}", text.len()),
            created: 1,
        }
    }

    #[test]
    fn ids_are_restricted() {
        assert!(valid_id("doc-1.a:b_c"));
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "a\0b"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(!valid_id(&"x".repeat(129)));
    }

    fn exercise(a: &Registry, b: &Registry) -> Result<()> {
        assert_eq!(a.insert(rec("x", "one"))?, Inserted::Created);
        assert_eq!(a.insert(rec("y", "two!"))?, Inserted::Created);
        // Seen by the other instance at once.
        assert_eq!(b.get("x")?, Some(rec("x", "one")));
        let mut again = rec("x", "one");
        again.metadata = serde_json::json!({"k": 2});
        assert_eq!(b.insert(again.clone())?, Inserted::Replaced);
        assert_eq!(a.get("x")?, Some(again));
        match a.insert(rec("x", "other text"))? {
            Inserted::Conflict(old) => assert_eq!(old.text, "one"),
            other => panic!("{other:?}"),
        }
        assert!(a.kv_in_use(&rec("x", "one").kv_id)?);
        assert!(!a.kv_in_use(&rec("x", "other text").kv_id)?);
        let p = b.list(None, 1)?;
        assert_eq!(
            (p.data.len(), p.has_more, p.data[0].id.as_str()),
            (1, true, "x")
        );
        let p = b.list(Some("x"), 1)?;
        assert_eq!(
            (p.data.len(), p.has_more, p.data[0].id.as_str()),
            (1, false, "y")
        );
        // Deleted on one, gone on the other.
        assert_eq!(b.remove("y")?.map(|r| r.id), Some("y".into()));
        assert_eq!(a.get("y")?, None);
        assert_eq!(a.remove("y")?, None);
        assert!(!a.kv_in_use(&rec("y", "two!").kv_id)?);
        assert_eq!(a.list(None, 10)?.data.len(), 1);
        assert!(a.insert(rec(".", "z")).is_err());
        Ok(())
    }

    #[test]
    fn dir_registry_is_shared_between_instances() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let a = Registry::in_dir(dir.path())?;
        let b = Registry::in_dir(dir.path())?;
        exercise(&a, &b)?;
        let m = Registry::in_memory();
        // The memory backend's semantics match (one instance, seen twice).
        let m2 = &m;
        exercise(m2, m2)
    }

    #[test]
    fn legacy_file_is_imported_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut old = BTreeMap::new();
        old.insert("x".to_string(), rec("x", "one"));
        fs::write(
            dir.path().join(LEGACY_FILE),
            serde_json::to_vec(&old).unwrap(),
        )?;
        let r = Registry::in_dir(dir.path())?;
        assert_eq!(r.get("x")?, Some(rec("x", "one")));
        assert!(!dir.path().join(LEGACY_FILE).exists());
        assert!(Registry::in_dir(dir.path())?.get("x")?.is_some());
        Ok(())
    }

    #[test]
    fn unreachable_redis_is_an_error_not_a_local_copy() -> Result<()> {
        let r = Registry::in_redis(Arc::new(RedisConn::open("redis://127.0.0.1:1/")?));
        assert!(matches!(
            r.insert(rec("x", "t")),
            Err(Error::Unavailable(_))
        ));
        assert!(r.get("x").is_err());
        assert!(r.list(None, 10).is_err());
        Ok(())
    }
}
