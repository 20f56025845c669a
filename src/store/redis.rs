//! A [`KvStore`] in Redis, so several server processes share documents' KV caches.
//!
//! Each entry is the same checksummed safetensors bytes the disk store writes
//! ([`super::format`]), under `samkv:kv:<id>`, with a small JSON summary under
//! `samkv:meta:<id>` so listing does not read whole caches. [`super::open_store`] puts a
//! [`super::MemoryTier`] in front, so documents in use are not fetched on every request.
//!
//! Redis may go away: every call has a timeout, and after a failed connection attempt the
//! store answers with an error at once for [`RETRY_AFTER`] instead of waiting on the network
//! again. Callers (the engine) then recompute and carry on.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::format::{decode, encode};
use super::{DocId, EntryInfo, KvStore, StoreStats, StoredDoc};
use crate::error::{Error, Result};

/// Key of a document's encoded KV.
pub fn kv_key(id: &DocId) -> String {
    format!("samkv:kv:{id}")
}

/// Key of a document's listing summary.
pub fn meta_key(id: &DocId) -> String {
    format!("samkv:meta:{id}")
}

/// How long a failed connection keeps the store answering "unavailable" without retrying.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

struct ConnState {
    conn: Option<redis::Connection>,
    down_until: Option<Instant>,
}

/// One lazily opened, automatically reopened connection to a Redis server.
pub struct RedisConn {
    client: redis::Client,
    /// The URL without any password, for messages.
    shown: String,
    state: Mutex<ConnState>,
}

pub(crate) fn hide_password(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***{}", &url[at..]),
        _ => url.to_string(),
    }
}

impl RedisConn {
    /// Parses the URL (`redis://host:port/db`); does not connect yet, so a server can start
    /// while Redis is down.
    pub fn open(url: &str) -> Result<RedisConn> {
        let shown = hide_password(url);
        let client = redis::Client::open(url).map_err(|e| {
            Error::Store(format!(
                "`{shown}` is not a usable Redis URL ({e}); expected redis://host:port[/db]"
            ))
        })?;
        Ok(RedisConn {
            client,
            shown,
            state: Mutex::new(ConnState {
                conn: None,
                down_until: None,
            }),
        })
    }

    /// The URL, password hidden.
    pub fn url(&self) -> &str {
        &self.shown
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection, connecting first if needed. Any failure drops the
    /// connection (its protocol state is unknown) so the next call starts afresh.
    pub fn run<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let mut st = self.lock();
        // A connection kept from before may have died with a Redis restart: its first
        // failure is retried once on a fresh connection before Redis counts as down.
        let mut reused = st.conn.is_some();
        loop {
            if st.conn.is_none() {
                if let Some(t) = st.down_until {
                    if Instant::now() < t {
                        return Err(Error::Unavailable(format!(
                            "Redis at {} is unavailable (retrying shortly); {what} skipped",
                            self.shown
                        )));
                    }
                }
                let conn = self
                    .client
                    .get_connection_with_timeout(CONNECT_TIMEOUT)
                    .and_then(|c| {
                        c.set_read_timeout(Some(IO_TIMEOUT))?;
                        c.set_write_timeout(Some(IO_TIMEOUT))?;
                        Ok(c)
                    });
                match conn {
                    Ok(c) => {
                        st.conn = Some(c);
                        st.down_until = None;
                    }
                    Err(e) => {
                        st.down_until = Some(Instant::now() + RETRY_AFTER);
                        return Err(Error::Unavailable(format!(
                            "cannot connect to Redis at {} ({e}); is redis-server running? {what} skipped",
                            self.shown
                        )));
                    }
                }
            }
            let conn = st.conn.as_mut().expect("connected above");
            let e = match f(conn) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            st.conn = None;
            let msg = format!("Redis at {}: {what}: {e}", self.shown);
            if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                if std::mem::take(&mut reused) {
                    continue;
                }
                st.down_until = Some(Instant::now() + RETRY_AFTER);
                return Err(Error::Unavailable(msg));
            }
            // Redis out of memory (maxmemory) refuses writes with OOM.
            if e.code() == Some("OOM") {
                return Err(Error::StoreFull(msg));
            }
            return Err(Error::Store(msg));
        }
    }
}

/// The listing summary kept beside each entry.
#[derive(serde::Serialize, serde::Deserialize)]
struct Summary {
    bytes: u64,
    tokens: usize,
    model_fingerprint: String,
    format_version: u32,
    created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
}

/// Documents' KV caches in Redis.
pub struct RedisStore {
    conn: Arc<RedisConn>,
}

impl RedisStore {
    pub fn open(url: &str) -> Result<RedisStore> {
        Ok(RedisStore {
            conn: Arc::new(RedisConn::open(url)?),
        })
    }

    pub fn with_conn(conn: Arc<RedisConn>) -> RedisStore {
        RedisStore { conn }
    }

    pub fn conn(&self) -> &Arc<RedisConn> {
        &self.conn
    }

    fn summaries(&self) -> Result<Vec<(DocId, Summary)>> {
        let keys: Vec<String> = self.conn.run("listing entries", |c| {
            Ok(redis::Commands::scan_match::<_, String>(c, "samkv:meta:*")?.collect())
        })?;
        let mut out = Vec::with_capacity(keys.len());
        // MGET in chunks: one round trip per chunk, bounded reply size.
        for chunk in keys.chunks(256) {
            let vals: Vec<Option<String>> = self.conn.run("listing entries", |c| {
                redis::cmd("MGET").arg(chunk).query(c)
            })?;
            for (k, v) in chunk.iter().zip(vals) {
                let Some(id) = k.strip_prefix("samkv:meta:") else {
                    continue;
                };
                let Ok(id) = DocId::parse(id) else {
                    tracing::warn!("ignoring Redis key `{k}`: not a samkv document id");
                    continue;
                };
                // A summary removed between SCAN and MGET is simply gone.
                let Some(v) = v else { continue };
                match serde_json::from_str::<Summary>(&v) {
                    Ok(s) => out.push((id, s)),
                    Err(e) => tracing::warn!("ignoring unreadable summary {k}: {e}"),
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

impl KvStore for RedisStore {
    fn get(&self, id: &DocId) -> Result<Option<Arc<StoredDoc>>> {
        let bytes: Option<Vec<u8>> = self.conn.run("reading a document", |c| {
            redis::cmd("GET").arg(kv_key(id)).query(c)
        })?;
        match bytes {
            None => Ok(None),
            Some(b) => Ok(Some(Arc::new(decode(&b, Some(id)).map_err(|e| {
                Error::Corrupt(format!("Redis entry {}: {e}", kv_key(id)))
            })?))),
        }
    }

    fn put(&self, doc: &StoredDoc) -> Result<bool> {
        let bytes = encode(doc)?;
        let summary = Summary {
            bytes: bytes.len() as u64,
            tokens: doc.len(),
            model_fingerprint: doc.meta.model_fingerprint.clone(),
            format_version: doc.meta.format_version,
            created_unix: doc.meta.created_unix,
            source: doc.meta.source.clone(),
        };
        let summary = serde_json::to_string(&summary)
            .map_err(|e| Error::Store(format!("cannot serialize summary: {e}")))?;
        // SET NX: an id names its content, so an existing entry is already right.
        let (set,): (Option<String>,) = self.conn.run("storing a document", |c| {
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(kv_key(&doc.id))
                .arg(bytes.as_slice())
                .arg("NX")
                .cmd("SET")
                .arg(meta_key(&doc.id))
                .arg(&summary)
                .ignore()
                .query(c)
        })?;
        Ok(set.is_some())
    }

    fn contains(&self, id: &DocId) -> Result<bool> {
        self.conn
            .run("checking a document", |c| {
                redis::cmd("EXISTS").arg(kv_key(id)).query::<u64>(c)
            })
            .map(|n| n > 0)
    }

    fn remove(&self, id: &DocId) -> Result<bool> {
        let n: u64 = self.conn.run("removing a document", |c| {
            redis::cmd("DEL").arg(kv_key(id)).arg(meta_key(id)).query(c)
        })?;
        Ok(n > 0)
    }

    fn list(&self) -> Result<Vec<EntryInfo>> {
        Ok(self
            .summaries()?
            .into_iter()
            .map(|(id, s)| EntryInfo {
                id,
                bytes: s.bytes,
                tokens: s.tokens,
                model_fingerprint: s.model_fingerprint,
                format_version: s.format_version,
                created_unix: s.created_unix,
                source: s.source,
            })
            .collect())
    }

    fn stats(&self) -> Result<StoreStats> {
        let s = self.summaries()?;
        Ok(StoreStats {
            entries: s.len(),
            bytes: s.iter().map(|(_, s)| s.bytes).sum(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_hidden_in_messages() {
        assert_eq!(
            hide_password("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(hide_password("redis://host:1"), "redis://host:1");
    }

    #[test]
    fn unreachable_redis_fails_fast_then_backs_off() {
        // Port 1 on loopback: nothing listens there, so the connection is refused.
        let s = RedisStore::open("redis://127.0.0.1:1/").expect("url parses");
        let id = DocId("a".repeat(64));
        let e = s.get(&id).unwrap_err().to_string();
        assert!(e.contains("cannot connect to Redis"), "{e}");
        let t = Instant::now();
        let e = s.contains(&id).unwrap_err().to_string();
        assert!(e.contains("unavailable"), "{e}");
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn bad_url_is_rejected() {
        let e = RedisStore::open("redis://[::1").err().expect("bad url");
        assert!(e.to_string().contains("not a usable Redis URL"), "{e}");
    }
}
