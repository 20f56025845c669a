//! A store directory: `objects/ab/<id>.safetensors` plus `tmp/` for writes in progress.
//!
//! Writes are atomic and safe across processes: the entry is written and fsynced under a unique
//! name in `tmp/`, then hard-linked into place. Linking fails if the name exists, so exactly one
//! writer "wins" and the others return Ok(false) without rewriting (entries are
//! content-addressed, so the loser's bytes were identical anyway). Where the filesystem has no
//! hard links, rename is used instead (last rename wins, with identical content). A crash leaves
//! at most a file in `tmp/`, invisible to readers and removed by [`DiskStore::gc`]: temporary
//! names carry the writer's process id, so gc removes them as soon as that process is gone.
//!
//! Errors: a full disk is [`Error::StoreFull`]; any other I/O failure is [`Error::Store`] and
//! never removes anything; only bytes read and found wrong are [`Error::Corrupt`].

use super::format::{decode_on, encode, read_meta_json};
use super::{DocId, EntryInfo, KvStore, StoreStats, StoredDoc};
use crate::error::{Error, Result};
use candle_core::Device;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Age after which [`DiskStore::gc`] removes a tmp file even when its writer's process id
/// is alive (the id may have been reused, or the writer runs on another host).
pub const TMP_MAX_AGE: Duration = Duration::from_secs(3600);

const EXT: &str = "safetensors";

/// A directory of entries, one file per document.
pub struct DiskStore {
    root: PathBuf,
    device: Device,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
}

/// An entry that failed to decode (or is misnamed), with the reason.
#[derive(Clone, Debug, PartialEq)]
pub struct CorruptEntry {
    pub path: PathBuf,
    pub reason: String,
}

/// What [`KvStore::gc`] found and did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GcReport {
    pub tmp_removed: usize,
    pub tmp_bytes_removed: u64,
    /// Entries decoded (only when checking entries).
    pub checked: usize,
    pub corrupt: Vec<CorruptEntry>,
    pub corrupt_removed: usize,
    /// Entries (or tmp files) that could not be read or removed: reported, kept, skipped.
    pub unreadable: Vec<CorruptEntry>,
}

/// What [`KvStore::verify`] found: entries whose bytes are wrong, and entries it could not
/// read (permission, a directory in the file's place): neither stops the check.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyReport {
    pub checked: usize,
    pub corrupt: Vec<CorruptEntry>,
    pub unreadable: Vec<CorruptEntry>,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::store_io(what, path, e)
}

/// The writer's process id in a tmp name `<anything>.<pid>.<hex>.tmp`.
fn tmp_writer_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_suffix(".tmp")?.rsplit('.');
    let _rand = parts.next()?;
    parts.next()?.parse().ok()
}

/// Whether process `pid` exists on this host (Linux: /proc). Unknown elsewhere: assumed
/// alive, so only the age rule applies.
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

/// A unique tmp name for a writer of `stem` in this process ([`DiskStore::gc`] reads the pid).
pub fn tmp_name(stem: &str) -> String {
    format!(
        "{stem}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    )
}

// Makes a rename/link/create in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot fsync directory", dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

impl DiskStore {
    /// Opens (creating if needed) a store directory; documents load onto the CPU.
    pub fn open(dir: impl AsRef<Path>) -> Result<DiskStore> {
        DiskStore::open_on(dir, Device::Cpu)
    }

    /// Opens a store directory whose `get` loads tensors onto `device`.
    pub fn open_on(dir: impl AsRef<Path>, device: Device) -> Result<DiskStore> {
        let root = dir.as_ref().to_path_buf();
        for sub in ["objects", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|e| io_err("cannot create store directory", &p, e))?;
        }
        Ok(DiskStore {
            root,
            device,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the entry for `id` lives (whether or not it exists).
    pub fn path_of(&self, id: &DocId) -> Result<PathBuf> {
        if !id.is_valid() {
            return Err(Error::InvalidInput(format!(
                "`{id}` is not a document id (expected 64 lowercase hex characters)"
            )));
        }
        Ok(self
            .root
            .join("objects")
            .join(&id.0[..2])
            .join(format!("{id}.{EXT}")))
    }

    /// Every entry file as (path, id parsed from its name, or None if misnamed/misplaced).
    fn entry_files(&self) -> Result<Vec<(PathBuf, Option<DocId>)>> {
        let objects = self.root.join("objects");
        let mut out = Vec::new();
        let shards = fs::read_dir(&objects).map_err(|e| io_err("cannot read", &objects, e))?;
        for shard in shards {
            let shard = shard.map_err(|e| io_err("cannot read", &objects, e))?;
            let shard_name = shard.file_name().to_string_lossy().into_owned();
            if !shard.path().is_dir() {
                continue;
            }
            let files = match fs::read_dir(shard.path()) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("cannot read", &shard.path(), e)),
            };
            for f in files {
                let f = f.map_err(|e| io_err("cannot read", &shard.path(), e))?;
                let path = f.path();
                if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                    continue;
                }
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                let id = DocId(stem.to_string());
                let ok = id.is_valid() && id.0[..2] == shard_name;
                out.push((path, ok.then_some(id)));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes tmp files whose writer process is gone, or older than `tmp_max_age` (a
    /// younger one whose writer lives may be a write in progress); and, if `remove_corrupt`,
    /// decodes every entry and removes those whose bytes are wrong. Entries it cannot read
    /// are reported in `unreadable` and kept.
    fn gc_files(&self, remove_corrupt: bool, tmp_max_age: Duration) -> Result<GcReport> {
        let mut report = GcReport::default();
        let tmp = self.root.join("tmp");
        let now = SystemTime::now();
        for f in fs::read_dir(&tmp).map_err(|e| io_err("cannot read", &tmp, e))? {
            let f = f.map_err(|e| io_err("cannot read", &tmp, e))?;
            let Ok(md) = f.metadata() else { continue };
            let age = md
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or(Duration::ZERO);
            let name = f.file_name().to_string_lossy().into_owned();
            let writer_gone = tmp_writer_pid(&name).is_some_and(|pid| !process_alive(pid));
            if md.is_file() && (writer_gone || age >= tmp_max_age) {
                match fs::remove_file(f.path()) {
                    Ok(()) => {
                        report.tmp_removed += 1;
                        report.tmp_bytes_removed += md.len();
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => report.unreadable.push(CorruptEntry {
                        path: f.path(),
                        reason: format!("cannot remove: {e}"),
                    }),
                }
            }
        }
        if remove_corrupt {
            let v = self.verify_files()?;
            report.checked = v.checked;
            for c in &v.corrupt {
                match fs::remove_file(&c.path) {
                    Ok(()) => report.corrupt_removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => report.unreadable.push(CorruptEntry {
                        path: c.path.clone(),
                        reason: format!("corrupt, but cannot remove: {e}"),
                    }),
                }
            }
            report.corrupt = v.corrupt;
            report.unreadable.extend(v.unreadable);
        }
        Ok(report)
    }

    /// Decodes every entry; reports those whose bytes are wrong and those it cannot read,
    /// without removing anything.
    fn verify_files(&self) -> Result<VerifyReport> {
        let mut r = VerifyReport::default();
        for (path, id) in self.entry_files()? {
            let Some(id) = id else {
                r.corrupt.push(CorruptEntry {
                    path,
                    reason: "file name is not `<64 hex id>.safetensors` in its `ab/` shard".into(),
                });
                continue;
            };
            r.checked += 1;
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    r.unreadable.push(CorruptEntry {
                        path,
                        reason: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            if let Err(e) = decode_on(&bytes, Some(&id), &Device::Cpu) {
                r.corrupt.push(CorruptEntry {
                    path,
                    reason: e.to_string(),
                });
            }
        }
        Ok(r)
    }

    fn write_new(&self, final_path: &Path, bytes: &[u8], id: &DocId) -> Result<bool> {
        let tmp_path = self.root.join("tmp").join(tmp_name(id.as_str()));
        let written = (|| {
            let mut f = fs::File::create_new(&tmp_path)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp_path);
            return Err(io_err("cannot write", &tmp_path, e));
        }
        let shard = final_path.parent().unwrap_or(&self.root);
        if !shard.is_dir() {
            fs::create_dir_all(shard).map_err(|e| io_err("cannot create", shard, e))?;
            sync_dir(&self.root.join("objects"))?;
        }
        let added = match fs::hard_link(&tmp_path, final_path) {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
            // No hard links here (some network/FUSE filesystems): rename is still atomic.
            Err(_) => match fs::rename(&tmp_path, final_path) {
                Ok(()) => true,
                Err(e) => {
                    let _ = fs::remove_file(&tmp_path);
                    return Err(io_err("cannot move entry into", final_path, e));
                }
            },
        };
        match fs::remove_file(&tmp_path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot remove", &tmp_path, e)),
        }
        if added {
            sync_dir(shard)?;
        }
        Ok(added)
    }
}

impl KvStore for DiskStore {
    fn verify(&self) -> Result<VerifyReport> {
        self.verify_files()
    }

    fn gc(&self, remove_corrupt: bool, tmp_max_age: Duration) -> Result<GcReport> {
        self.gc_files(remove_corrupt, tmp_max_age)
    }

    fn get(&self, id: &DocId) -> Result<Option<Arc<StoredDoc>>> {
        let path = self.path_of(id)?;
        // A plain read, not mmap: tensors are copied out anyway, and a mapped file truncated
        // by someone else would crash the process instead of returning an error.
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            // Not corruption: permission, too many open files... The entry is kept.
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                return Err(io_err("cannot read", &path, e));
            }
        };
        match decode_on(&bytes, Some(id), &self.device) {
            Ok(doc) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Arc::new(doc)))
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                Err(Error::Corrupt(format!(
                    "entry {}: {}; recompute the document (gc with remove_corrupt deletes bad entries)",
                    path.display(),
                    e.to_string().trim_start_matches("KV store: corrupt entry: ")
                )))
            }
        }
    }

    fn put(&self, doc: &StoredDoc) -> Result<bool> {
        let path = self.path_of(&doc.id)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot check", &path, e)),
        }
        let bytes = encode(doc)?;
        self.write_new(&path, &bytes, &doc.id)
    }

    fn contains(&self, id: &DocId) -> Result<bool> {
        let path = self.path_of(id)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("cannot check", &path, e)),
        }
    }

    fn remove(&self, id: &DocId) -> Result<bool> {
        let path = self.path_of(id)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("cannot remove", &path, e)),
        }
    }

    /// Entries whose header cannot be read are skipped with a warning (see `verify`).
    fn list(&self) -> Result<Vec<EntryInfo>> {
        let mut out = Vec::new();
        for (path, id) in self.entry_files()? {
            let Some(id) = id else {
                tracing::warn!("store: ignoring misnamed file {}", path.display());
                continue;
            };
            let bytes = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("cannot stat", &path, e)),
            };
            let meta = match read_meta_json(&path) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("store: skipping unreadable entry {}: {e}", path.display());
                    continue;
                }
            };
            out.push(EntryInfo {
                id,
                bytes,
                tokens: meta["token_ids"].as_array().map_or(0, |a| a.len()),
                model_fingerprint: meta["model_fingerprint"].as_str().unwrap_or("").to_string(),
                format_version: meta["format_version"].as_u64().unwrap_or(0) as u32,
                created_unix: meta["created_unix"].as_u64().unwrap_or(0),
                source: meta["source"].as_str().map(str::to_string),
            });
        }
        Ok(out)
    }

    fn stats(&self) -> Result<StoreStats> {
        let mut entries = 0;
        let mut bytes = 0;
        for (path, id) in self.entry_files()? {
            if id.is_none() {
                continue;
            }
            if let Ok(m) = fs::metadata(&path) {
                entries += 1;
                bytes += m.len();
            }
        }
        let hits = self.hits.load(Ordering::Relaxed);
        Ok(StoreStats {
            entries,
            bytes,
            hits,
            disk_hits: hits,
            misses: self.misses.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            ..StoreStats::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::encode;
    use super::super::test_util::{assert_same, make_doc};
    use super::*;
    use candle_core::DType;

    fn count_files(dir: &Path) -> usize {
        let mut n = 0;
        for e in fs::read_dir(dir).expect("read_dir").flatten() {
            if e.path().is_dir() {
                n += count_files(&e.path());
            } else {
                n += 1;
            }
        }
        n
    }

    #[test]
    fn put_get_list_remove() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = DiskStore::open(dir.path())?;
        let d = make_doc(2, 3, 5, 4, DType::F16, 1);
        assert!(s.get(&d.id)?.is_none());
        assert!(!s.contains(&d.id)?);
        assert!(s.put(&d)?);
        assert!(
            !s.put(&d)?,
            "second put of the same id must report it was there"
        );
        assert_eq!(count_files(&dir.path().join("objects")), 1);
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
        let path = s.path_of(&d.id)?;
        assert!(path.starts_with(dir.path().join("objects").join(&d.id.0[..2])));
        assert!(s.contains(&d.id)?);
        let back = s.get(&d.id)?.expect("stored");
        assert_same(&d, &back);
        let list = s.list()?;
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, d.id);
        assert_eq!(list[0].tokens, 5);
        assert_eq!(list[0].model_fingerprint, "model-fp");
        assert_eq!(list[0].created_unix, d.meta.created_unix);
        assert_eq!(list[0].bytes, fs::metadata(&path)?.len());
        let st = s.stats()?;
        assert_eq!(
            (st.entries, st.bytes, st.hits, st.misses),
            (1, list[0].bytes, 1, 1)
        );
        assert!(s.remove(&d.id)?);
        assert!(!s.remove(&d.id)?);
        assert!(s.get(&d.id)?.is_none());
        assert!(s.get(&DocId("../../x".into())).is_err());
        Ok(())
    }

    #[test]
    fn corrupt_and_renamed_entries_error_and_gc_removes_them() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = DiskStore::open(dir.path())?;
        let a = make_doc(2, 2, 4, 4, DType::F32, 1);
        let b = make_doc(2, 2, 4, 4, DType::F32, 2);
        let c = make_doc(2, 2, 4, 4, DType::F32, 3);
        s.put(&a)?;
        s.put(&c)?;
        // a: flip a payload byte; b: a's bytes copied under b's name.
        let pa = s.path_of(&a.id)?;
        let mut bytes = fs::read(&pa)?;
        let good_a = bytes.clone();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&pa, &bytes)?;
        let pb = s.path_of(&b.id)?;
        fs::create_dir_all(pb.parent().expect("shard"))?;
        fs::write(&pb, &good_a)?;

        let e = s.get(&a.id).unwrap_err().to_string();
        assert!(
            e.contains("checksum") && e.contains(&*pa.to_string_lossy()),
            "{e}"
        );
        let e = s.get(&b.id).unwrap_err().to_string();
        assert!(e.contains("renamed"), "{e}");
        assert_eq!(s.stats()?.errors, 2);
        let e = s.get_for_model(&c.id, "another").unwrap_err().to_string();
        assert!(e.contains("another model"), "{e}");

        let bad = s.verify()?;
        assert_eq!((bad.corrupt.len(), bad.unreadable.len()), (2, 0));
        assert_eq!(s.gc(false, TMP_MAX_AGE)?.corrupt_removed, 0);
        assert!(s.contains(&a.id)?);
        let r = s.gc(true, TMP_MAX_AGE)?;
        assert_eq!((r.checked, r.corrupt_removed), (3, 2));
        assert!(s.get(&a.id)?.is_none() && s.get(&b.id)?.is_none());
        assert!(s.get(&c.id)?.is_some());
        Ok(())
    }

    #[test]
    fn crash_leftover_tmp_is_invisible_and_collected() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = DiskStore::open(dir.path())?;
        let d = make_doc(1, 2, 3, 4, DType::BF16, 1);
        // A writer that died after writing half the file, before the link. This process is
        // alive, so its name keeps the file until it is old.
        let bytes = encode(&d)?;
        let live = dir.path().join("tmp").join(tmp_name(d.id.as_str()));
        fs::write(&live, &bytes[..bytes.len() / 2])?;
        assert!(s.list()?.is_empty());
        assert!(s.get(&d.id)?.is_none());
        assert!(!s.contains(&d.id)?);
        assert_eq!(s.stats()?.entries, 0);
        assert_eq!(s.gc(true, TMP_MAX_AGE)?.tmp_removed, 0);
        assert!(live.exists());
        let r = s.gc(false, Duration::ZERO)?;
        assert_eq!(r.tmp_removed, 1);
        assert_eq!(r.tmp_bytes_removed, (bytes.len() / 2) as u64);
        assert!(!live.exists());
        // The store still works after the crash.
        assert!(s.put(&d)?);
        assert!(s.get(&d.id)?.is_some());
        Ok(())
    }

    #[test]
    fn tmp_of_a_dead_writer_is_collected_at_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = DiskStore::open(dir.path())?;
        // A child that has exited: its pid names no process (until reused).
        let mut child = std::process::Command::new("true").spawn()?;
        let pid = child.id();
        child.wait()?;
        assert!(!process_alive(pid), "pid {pid} still exists");
        assert!(process_alive(std::process::id()));
        let dead = dir.path().join("tmp").join(format!("x.{pid}.00ff.tmp"));
        let mine = dir.path().join("tmp").join(tmp_name("y"));
        fs::write(&dead, b"partial")?;
        fs::write(&mine, b"in progress")?;
        let r = s.gc(false, TMP_MAX_AGE)?;
        assert_eq!((r.tmp_removed, r.tmp_bytes_removed), (1, 7));
        assert!(!dead.exists() && mine.exists());
        assert_eq!(tmp_writer_pid(&format!("a.b.{pid}.00ff.tmp")), Some(pid));
        assert_eq!(tmp_writer_pid("a.tmp"), None);
        Ok(())
    }

    #[test]
    fn unreadable_entries_are_reported_kept_and_skipped() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = DiskStore::open(dir.path())?;
        let (a, b, c) = (
            make_doc(1, 2, 3, 4, DType::F16, 1),
            make_doc(1, 2, 3, 4, DType::F16, 2),
            make_doc(1, 2, 3, 4, DType::F16, 3),
        );
        s.put(&a)?;
        s.put(&c)?;
        // A directory where b's entry should be: reading it fails with EISDIR.
        let pb = s.path_of(&b.id)?;
        fs::create_dir_all(&pb)?;
        fs::write(pb.join("junk"), b"x")?;
        // c's bytes damaged: detected corruption.
        let pc = s.path_of(&c.id)?;
        let mut bytes = fs::read(&pc)?;
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        fs::write(&pc, &bytes)?;
        let e = s.get(&b.id).unwrap_err();
        assert!(!e.is_corrupt(), "an I/O error is not corruption: {e}");
        assert!(s.get(&c.id).unwrap_err().is_corrupt());
        let v = s.verify()?;
        assert_eq!((v.checked, v.corrupt.len(), v.unreadable.len()), (3, 1, 1));
        assert_eq!(v.unreadable[0].path, pb);
        let r = s.gc(true, TMP_MAX_AGE)?;
        assert_eq!((r.corrupt_removed, r.unreadable.len()), (1, 1));
        assert!(pb.is_dir(), "an unreadable entry is never removed");
        assert!(s.get(&a.id)?.is_some() && !pc.exists());
        Ok(())
    }

    #[test]
    fn concurrent_writers_store_each_doc_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let docs: Vec<StoredDoc> = (0..12)
            .map(|i| make_doc(2, 2, 16, 8, DType::F16, i))
            .collect();
        let added = AtomicU64::new(0);
        std::thread::scope(|sc| {
            for t in 0..4usize {
                let (docs, added, root) = (&docs, &added, dir.path());
                sc.spawn(move || {
                    let s = DiskStore::open(root).expect("open");
                    // Overlapping sets in different orders: thread t puts docs 3t..3t+6 (mod 12).
                    for j in 0..6 {
                        let j = if t % 2 == 0 { j } else { 5 - j };
                        let d = &docs[(3 * t + j) % 12];
                        if s.put(d).expect("put") {
                            added.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            added.load(Ordering::Relaxed),
            12,
            "each doc added exactly once"
        );
        assert_eq!(count_files(&dir.path().join("objects")), 12);
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
        let s = DiskStore::open(dir.path())?;
        assert_eq!(s.list()?.len(), 12);
        for d in &docs {
            assert_same(d, &s.get(&d.id)?.expect("stored"));
        }
        let v = s.verify()?;
        assert!(v.corrupt.is_empty() && v.unreadable.is_empty());
        Ok(())
    }

    /// Process CPU seconds (user + system) from /proc, so the bench is meaningful on a busy
    /// machine; 0 where /proc is missing.
    fn cpu_secs() -> f64 {
        let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<f64> = after
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the `)`; 100 ticks/s.
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
    }

    /// Prints bytes per 1000 tokens for SmolLM2-shaped KV and decode speed from the page cache.
    /// `cargo test --release store::disk::tests::bench_sizes_and_load -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_sizes_and_load() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = DiskStore::open(dir.path())?;
        for (i, dt) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            let mut d = make_doc(30, 3, 1000, 64, dt, 100 + i as u32);
            d.side.clear();
            let t0 = std::time::Instant::now();
            s.put(&d)?;
            let put_s = t0.elapsed().as_secs_f64();
            let path = s.path_of(&d.id)?;
            let size = fs::metadata(&path)?.len();
            s.get(&d.id)?; // warm the page cache
            let n = 10;
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                s.get(&d.id)?.expect("stored");
            }
            let get_s = t0.elapsed().as_secs_f64() / n as f64;
            let mb = size as f64 / 1e6;
            let c0 = cpu_secs();
            for _ in 0..n {
                s.get(&d.id)?.expect("stored");
            }
            let get_cpu = (cpu_secs() - c0) / n as f64;
            let bytes = fs::read(&path)?;
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                decode_on(&bytes, None, &Device::Cpu)?;
            }
            let dec_s = t0.elapsed().as_secs_f64() / n as f64;
            println!(
                "{dt:?}: {size} bytes per 1000 tokens (kv {}), put {:.1} ms, get {:.2} ms/MB \
                 wall ({:.2} GB/s), {:.2} ms/MB cpu, decode only {:.2} ms/MB wall",
                d.kv_bytes(),
                put_s * 1e3,
                get_s * 1e3 / mb,
                mb / get_s / 1e3,
                get_cpu * 1e3 / mb,
                dec_s * 1e3 / mb
            );
        }
        Ok(())
    }
}
