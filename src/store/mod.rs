//! Persistent per-document KV store.
//!
//! A document's KV cache is computed once (METHODS.md section 1) and kept here, addressed by
//! a content hash of everything that determines it (model, tokenizer, the prefix it was computed
//! after, its tokens). The store holds tensors only; the engine fills and interprets them.
//!
//! Layers: [`format`] (one safetensors file per document, checksummed), [`disk::DiskStore`]
//! (atomic, multi-process safe directory), [`memory::MemoryTier`] (byte-budgeted LRU in front).

pub mod disk;
mod doc;
pub mod format;
pub mod memory;
pub mod q8;
pub mod redis;

pub use self::redis::RedisStore;
pub use disk::{CorruptEntry, DiskStore, GcReport, VerifyReport};
pub use doc::StoredDoc;
pub use memory::MemoryTier;

use crate::error::{Error, Result};
use candle_core::DType;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;

/// Version of the on-disk entry layout of f32, f16 and bf16 entries; bump when the meaning of a
/// field or tensor changes.
pub const FORMAT_VERSION: u32 = 1;

/// Version of q8 entries: version 1 plus the `k_scale.{l}` / `v_scale.{l}` tensors. Float
/// entries keep writing version 1, so a samkv from before q8 still reads them; a q8 entry is one
/// it refuses as written by a newer samkv rather than as an unknown dtype.
pub const FORMAT_VERSION_Q8: u32 = 2;

/// Everything needed to check that a stored cache fits the request that wants to use it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DocMeta {
    pub format_version: u32,
    /// Hash of the weights file / config + tensors.
    pub model_fingerprint: String,
    pub tokenizer_fingerprint: String,
    /// [`prefix_hash`] of the token ids the document was computed after ("" if none).
    pub prefix_hash: String,
    /// Number of prefix tokens (the document's first position is `prefix_len`).
    pub prefix_len: usize,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Storage dtype of k and v: "f32" | "f16" | "bf16" | "q8" ([`StoreDtype`]).
    pub dtype: String,
    /// "interleaved" | "split_half".
    pub rope_layout: String,
    pub rope_base: f64,
    /// true: keys are stored rotated at `positions`.
    pub keys_post_rope: bool,
    /// One per token (normally prefix_len..prefix_len+T).
    pub positions: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub created_unix: u64,
    /// Where the text came from (a file name, an upload id), for `samkv store ls`; not part
    /// of the content address. Absent in entries written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl DocMeta {
    /// Number of document tokens (T).
    pub fn n_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// The content address this meta describes.
    pub fn id(&self) -> DocId {
        doc_id_from_prefix_hash(
            &self.model_fingerprint,
            &self.tokenizer_fingerprint,
            &self.prefix_hash,
            &self.token_ids,
        )
    }

    /// The storage dtype named by `dtype`.
    pub fn storage_dtype(&self) -> Result<StoreDtype> {
        parse_dtype(&self.dtype)
    }
}

/// Content address of a stored document: 64 lowercase hex chars (sha256).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocId(pub String);

impl DocId {
    /// Parses and checks a textual id (so it can safely become a file name).
    pub fn parse(s: &str) -> Result<DocId> {
        let id = DocId(s.to_string());
        if id.is_valid() {
            Ok(id)
        } else {
            Err(Error::InvalidInput(format!(
                "`{s}` is not a document id (expected 64 lowercase hex characters)"
            )))
        }
    }

    pub fn is_valid(&self) -> bool {
        self.0.len() == 64
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DocId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

// Every variable-length field is length-prefixed so that ("ab","c") and ("a","bc"), or a token
// moved from the prefix to the document, give different hashes.
fn hash_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

fn hash_ids(h: &mut Sha256, ids: &[u32]) {
    h.update((ids.len() as u64).to_le_bytes());
    for id in ids {
        h.update(id.to_le_bytes());
    }
}

/// Hash of the prefix token ids stored in [`DocMeta::prefix_hash`]; "" for an empty prefix.
pub fn prefix_hash(prefix_ids: &[u32]) -> String {
    if prefix_ids.is_empty() {
        return String::new();
    }
    let mut h = Sha256::new();
    h.update(b"samkv.prefix.v1");
    hash_ids(&mut h, prefix_ids);
    hex::encode(h.finalize())
}

/// Content address of a document's KV: sha256 over the model and tokenizer fingerprints, the
/// prefix and the document's token ids.
pub fn doc_id(model_fp: &str, tokenizer_fp: &str, prefix_ids: &[u32], token_ids: &[u32]) -> DocId {
    doc_id_from_prefix_hash(model_fp, tokenizer_fp, &prefix_hash(prefix_ids), token_ids)
}

/// [`doc_id`] when only the prefix's hash is known (as in a stored [`DocMeta`]).
pub fn doc_id_from_prefix_hash(
    model_fp: &str,
    tokenizer_fp: &str,
    prefix_hash: &str,
    token_ids: &[u32],
) -> DocId {
    let mut h = Sha256::new();
    h.update(b"samkv.doc.v1");
    hash_str(&mut h, model_fp);
    hash_str(&mut h, tokenizer_fp);
    hash_str(&mut h, prefix_hash);
    hash_ids(&mut h, token_ids);
    DocId(hex::encode(h.finalize()))
}

/// Seconds since the Unix epoch, for [`DocMeta::created_unix`].
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A dtype word: the floats, for weights, activations and stored K/V, and `q8`, for stored
/// K/V only ([`q8`]: int8 with an f16 scale per 32 channels of a token row).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StoreDtype {
    F32,
    /// The default storage dtype (docs/RESULTS.md, "8-bit storage", says why not q8).
    #[default]
    F16,
    BF16,
    Q8,
}

/// Every dtype word, in the order messages list them.
const DTYPE_WORDS: [(&str, StoreDtype); 4] = [
    ("f32", StoreDtype::F32),
    ("f16", StoreDtype::F16),
    ("bf16", StoreDtype::BF16),
    ("q8", StoreDtype::Q8),
];

impl StoreDtype {
    /// The word [`parse_dtype`] reads and [`DocMeta::dtype`] holds.
    pub fn name(self) -> &'static str {
        DTYPE_WORDS
            .iter()
            .find(|(_, d)| *d == self)
            .map_or("?", |(n, _)| n)
    }

    /// The candle dtype of a float; None for q8, which has no candle dtype of its own.
    pub fn float(self) -> Option<DType> {
        match self {
            StoreDtype::F32 => Some(DType::F32),
            StoreDtype::F16 => Some(DType::F16),
            StoreDtype::BF16 => Some(DType::BF16),
            StoreDtype::Q8 => None,
        }
    }

    /// The float dtype `dt` as a storage dtype, if it is one.
    pub fn from_float(dt: DType) -> Option<StoreDtype> {
        DTYPE_WORDS
            .iter()
            .map(|(_, d)| *d)
            .find(|d| d.float() == Some(dt))
    }

    /// Entry format version of entries of this dtype.
    pub fn format_version(self) -> u32 {
        match self {
            StoreDtype::Q8 => FORMAT_VERSION_Q8,
            _ => FORMAT_VERSION,
        }
    }
}

impl std::fmt::Display for StoreDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The one dtype word parser: `f32`, `f16`, `bf16` or `q8`, for stored K/V (`--store-dtype`,
/// the server's options, entry metas); the inverse of [`StoreDtype::name`]. Activations and
/// weights take [`parse_compute_dtype`], which refuses `q8`.
pub fn parse_dtype(s: &str) -> Result<StoreDtype> {
    DTYPE_WORDS
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, d)| *d)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "unknown dtype `{s}`: use f32, f16, bf16 or (stored K/V only) q8"
            ))
        })
}

/// A dtype for weights and activations (`--dtype`): a [`parse_dtype`] word that is a float.
pub fn parse_compute_dtype(s: &str) -> Result<DType> {
    parse_dtype(s)?.float().ok_or_else(|| {
        Error::InvalidInput(format!(
            "`{s}` is a storage dtype for cached K/V only (--store-dtype); weights and \
             activations use f32, f16 or bf16"
        ))
    })
}

/// Name used in [`DocMeta::dtype`] for a float dtype, if it is a storage dtype.
pub fn dtype_name(dt: DType) -> Option<&'static str> {
    StoreDtype::from_float(dt).map(StoreDtype::name)
}

/// One row of [`KvStore::list`].
#[derive(Clone, Debug, PartialEq)]
pub struct EntryInfo {
    pub id: DocId,
    pub bytes: u64,
    pub tokens: usize,
    pub model_fingerprint: String,
    pub format_version: u32,
    pub created_unix: u64,
    /// [`DocMeta::source`].
    pub source: Option<String>,
}

/// Counters of a store. Fields a tier does not have stay 0.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreStats {
    /// Persistent entries and their bytes on disk (memory-only store: cached docs).
    pub entries: usize,
    pub bytes: u64,
    /// Gets that returned a document (memory or disk).
    pub hits: u64,
    /// Gets that found nothing.
    pub misses: u64,
    /// Gets that found a corrupt or incompatible entry.
    pub errors: u64,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub memory_entries: usize,
    pub memory_bytes: usize,
    pub memory_budget: usize,
    pub evictions: u64,
}

/// A content-addressed store of [`StoredDoc`]s.
pub trait KvStore: Send + Sync {
    /// Ok(None) when absent; Err([`Error::Corrupt`]) when present but corrupt or
    /// incompatible (callers then recompute, and may remove it first); any other Err when
    /// it could not be read (I/O, Redis down): the entry may be fine and must be kept.
    fn get(&self, id: &DocId) -> Result<Option<Arc<StoredDoc>>>;
    /// false if it was already there (same id = same content, so nothing is rewritten).
    fn put(&self, doc: &StoredDoc) -> Result<bool>;
    fn contains(&self, id: &DocId) -> Result<bool>;
    fn remove(&self, id: &DocId) -> Result<bool>;
    fn list(&self) -> Result<Vec<EntryInfo>>;
    fn stats(&self) -> Result<StoreStats>;

    /// `samkv store verify`: reads every entry and reports the corrupt and the unreadable
    /// ones; changes nothing. By default through [`KvStore::list`] and [`KvStore::get`].
    fn verify(&self) -> Result<VerifyReport> {
        Ok(verify_by_reading(self)?.0)
    }

    /// `samkv store gc`: removes what killed writers left behind (temporary files whose
    /// writer is gone or older than `tmp_max_age`, where the store has any) and, with
    /// `remove_corrupt`, the corrupt entries. Unreadable ones are reported and kept.
    fn gc(&self, remove_corrupt: bool, tmp_max_age: std::time::Duration) -> Result<GcReport> {
        let _ = tmp_max_age;
        gc_by_reading(self, remove_corrupt)
    }

    /// [`KvStore::get`], failing if the entry was computed by a model with another fingerprint.
    fn get_for_model(&self, id: &DocId, model_fp: &str) -> Result<Option<Arc<StoredDoc>>> {
        match self.get(id)? {
            // The model's fingerprint is part of the content address: a mismatch means the
            // bytes are not what their address says.
            Some(doc) if doc.meta.model_fingerprint != model_fp => Err(Error::Corrupt(format!(
                "entry {id} was computed by another model (fingerprint {}, expected {model_fp}); recompute it",
                doc.meta.model_fingerprint
            ))),
            other => Ok(other),
        }
    }
}

/// [`KvStore::verify`] for a store without files of its own to check: every listed entry
/// is read; also returns the ids of the corrupt ones.
fn verify_by_reading<S: KvStore + ?Sized>(store: &S) -> Result<(VerifyReport, Vec<DocId>)> {
    let mut r = VerifyReport::default();
    let mut ids = Vec::new();
    for e in store.list()? {
        let entry = |reason: String| CorruptEntry {
            path: PathBuf::from(e.id.to_string()),
            reason,
        };
        match store.get(&e.id) {
            Ok(_) => r.checked += 1,
            Err(err) if err.is_corrupt() => {
                r.checked += 1;
                r.corrupt.push(entry(err.to_string()));
                ids.push(e.id.clone());
            }
            Err(err) => r.unreadable.push(entry(format!("cannot read: {err}"))),
        }
    }
    Ok((r, ids))
}

/// [`KvStore::gc`] for a store without temporary files: removes corrupt entries if asked.
fn gc_by_reading<S: KvStore + ?Sized>(store: &S, remove_corrupt: bool) -> Result<GcReport> {
    let mut report = GcReport::default();
    if !remove_corrupt {
        return Ok(report);
    }
    let (v, ids) = verify_by_reading(store)?;
    for (c, id) in v.corrupt.iter().zip(&ids) {
        match store.remove(id) {
            Ok(_) => report.corrupt_removed += 1,
            Err(e) => report.unreadable.push(CorruptEntry {
                path: c.path.clone(),
                reason: format!("corrupt, but cannot remove: {e}"),
            }),
        }
    }
    report.checked = v.checked;
    report.corrupt = v.corrupt;
    report.unreadable.extend(v.unreadable);
    Ok(report)
}

/// A persistent store from a spec: a directory path (created if needed) or a `redis://` URL,
/// with no memory tier in front. What `samkv store` maintains, and what
/// [`open_store`] puts its memory tier in front of.
pub fn open_backend(spec: &str) -> Result<Arc<dyn KvStore>> {
    if is_redis_spec(spec) {
        return Ok(Arc::new(RedisStore::open(spec)?));
    }
    if let Some((scheme, _)) = spec.split_once("://") {
        return Err(Error::Store(format!(
            "unknown store scheme `{scheme}://` in `{spec}`; use a directory path or redis://host:port"
        )));
    }
    if spec.is_empty() {
        return Err(Error::InvalidInput(
            "empty store path; give a directory (default: $SAMKV_STORE or ./samkv-store)".into(),
        ));
    }
    Ok(Arc::new(DiskStore::open(spec)?))
}

/// Opens a store from a spec: a directory path (created if needed) or a `redis://` URL,
/// wrapped in a memory tier of `memory_budget` bytes. Redis is connected lazily, so this
/// succeeds while it is down (requests then recompute).
pub fn open_store(spec: &str, memory_budget: usize) -> Result<Arc<dyn KvStore>> {
    Ok(Arc::new(MemoryTier::new(
        memory_budget,
        Some(open_backend(spec)?),
    )))
}

/// A store spec for messages: a Redis URL without its password.
pub fn shown_spec(spec: &str) -> String {
    if is_redis_spec(spec) {
        self::redis::hide_password(spec)
    } else {
        spec.to_string()
    }
}

/// Whether a store spec names Redis rather than a directory.
pub fn is_redis_spec(spec: &str) -> bool {
    spec.starts_with("redis://") || spec.starts_with("rediss://")
}

/// $SAMKV_STORE, or ./samkv-store.
pub fn default_store_dir() -> PathBuf {
    match std::env::var_os("SAMKV_STORE") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("./samkv-store"),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::collections::BTreeMap;

    /// A small document with random k/v in `dt`, random f32 and fixed u32 side tensors.
    /// `seed` picks the token ids (and thus the id).
    pub fn make_doc(
        n_layers: usize,
        heads: usize,
        t: usize,
        hd: usize,
        dt: DType,
        seed: u32,
    ) -> StoredDoc {
        let dev = Device::Cpu;
        let rnd = |shape: (usize, usize, usize)| {
            Tensor::randn(0f32, 1f32, shape, &dev)
                .and_then(|x| x.to_dtype(dt))
                .expect("randn")
        };
        let k = (0..n_layers).map(|_| rnd((heads, t, hd))).collect();
        let v = (0..n_layers).map(|_| rnd((heads, t, hd))).collect();
        let prefix = [1u32, 2, 3];
        let meta = DocMeta {
            format_version: FORMAT_VERSION,
            model_fingerprint: "model-fp".into(),
            tokenizer_fingerprint: "tok-fp".into(),
            prefix_hash: prefix_hash(&prefix),
            prefix_len: prefix.len(),
            n_layers,
            n_kv_heads: heads,
            head_dim: hd,
            dtype: dtype_name(dt).expect("kv dtype").into(),
            rope_layout: "split_half".into(),
            rope_base: 10000.0,
            keys_post_rope: true,
            positions: (3..3 + t as u32).collect(),
            token_ids: (0..t as u32)
                .map(|i| seed.wrapping_mul(7919).wrapping_add(i))
                .collect(),
            created_unix: 1_700_000_000 + seed as u64,
            source: None,
        };
        let mut side = BTreeMap::new();
        side.insert(
            "samkv.qloc.1".to_string(),
            Tensor::randn(0f32, 1f32, (heads * 3, hd), &dev).expect("randn"),
        );
        side.insert(
            "ids".to_string(),
            Tensor::new(&[seed, 5, 6][..], &dev).expect("tensor"),
        );
        StoredDoc::new(meta, k, v, side).expect("valid test doc")
    }

    /// Raw little-endian bytes of a tensor, to compare tensors exactly.
    pub fn raw(t: &Tensor) -> Vec<u8> {
        let mut out = Vec::new();
        t.write_bytes(&mut out).expect("write_bytes");
        out
    }

    pub fn assert_same(a: &StoredDoc, b: &StoredDoc) {
        assert_eq!(a.id, b.id);
        assert_eq!(a.meta, b.meta);
        assert_eq!(a.k.len(), b.k.len());
        assert_eq!(a.k_scale.len(), b.k_scale.len());
        assert_eq!(a.v_scale.len(), b.v_scale.len());
        let pairs = a.k.iter().zip(&b.k).chain(a.v.iter().zip(&b.v));
        let scales = a.k_scale.iter().zip(&b.k_scale);
        for (x, y) in pairs.chain(scales).chain(a.v_scale.iter().zip(&b.v_scale)) {
            assert_eq!(x.dims(), y.dims());
            assert_eq!(x.dtype(), y.dtype());
            assert_eq!(raw(x), raw(y));
        }
        assert_eq!(
            a.side.keys().collect::<Vec<_>>(),
            b.side.keys().collect::<Vec<_>>()
        );
        for (n, x) in &a.side {
            let y = &b.side[n];
            assert_eq!(x.dims(), y.dims());
            assert_eq!(x.dtype(), y.dtype());
            assert_eq!(raw(x), raw(y));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::make_doc;
    use super::*;

    #[test]
    fn doc_id_is_length_prefixed_and_stable() {
        let a = doc_id("ab", "c", &[], &[1, 2]);
        assert_eq!(a, doc_id("ab", "c", &[], &[1, 2]));
        assert!(a.is_valid());
        assert_ne!(a, doc_id("a", "bc", &[], &[1, 2]));
        // A token moved between prefix and document changes the id.
        assert_ne!(
            doc_id("m", "t", &[1], &[2, 3]),
            doc_id("m", "t", &[1, 2], &[3])
        );
        assert_ne!(doc_id("m", "t", &[], &[1, 2]), doc_id("m", "t", &[1], &[2]));
        assert_ne!(
            doc_id("m", "t", &[], &[1, 2]),
            doc_id("m2", "t", &[], &[1, 2])
        );
        assert_eq!(prefix_hash(&[]), "");
        assert_eq!(prefix_hash(&[7]).len(), 64);
        assert_eq!(
            doc_id("m", "t", &[4, 5], &[6]),
            doc_id_from_prefix_hash("m", "t", &prefix_hash(&[4, 5]), &[6])
        );
    }

    #[test]
    fn doc_id_parse_rejects_paths() {
        assert!(DocId::parse("../../etc/passwd").is_err());
        assert!(DocId::parse(&"A".repeat(64)).is_err());
        assert!(DocId::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn sizes_len_and_to_dtype() -> Result<()> {
        let d = make_doc(2, 3, 5, 4, DType::F32, 1);
        assert_eq!(d.len(), 5);
        assert!(!d.is_empty());
        assert_eq!(d.kv_bytes(), 2 * 2 * 3 * 5 * 4 * 4);
        assert_eq!(d.side_bytes(), 9 * 4 * 4 + 3 * 4);
        assert_eq!(d.total_bytes(), d.kv_bytes() + d.side_bytes());
        let h = d.to_dtype(StoreDtype::BF16)?;
        assert_eq!(h.meta.dtype, "bf16");
        assert_eq!(h.id, d.id);
        assert!(h.k.iter().chain(&h.v).all(|t| t.dtype() == DType::BF16));
        assert_eq!(h.side["samkv.qloc.1"].dtype(), DType::F32);
        assert_eq!(h.kv_bytes() * 2, d.kv_bytes());
        h.validate().map_err(Error::Store)?;
        // q8: one byte per element plus one f16 scale per 32 channels (hd 4: one per row).
        let q = d.to_dtype(StoreDtype::Q8)?;
        assert_eq!((q.meta.dtype.as_str(), q.meta.format_version), ("q8", 2));
        assert_eq!(q.kv_bytes(), 2 * 2 * 3 * 5 * (4 + 2));
        assert!(q.is_q8() && !d.is_q8());
        q.validate().map_err(Error::Store)?;
        // Back to a float: the float entry version again.
        let f = q.to_dtype(StoreDtype::F32)?;
        assert_eq!((f.meta.dtype.as_str(), f.meta.format_version), ("f32", 1));
        assert!(f.k_scale.is_empty());
        Ok(())
    }

    #[test]
    fn dtype_words_parse_and_refuse() {
        for (w, d) in [
            ("f32", StoreDtype::F32),
            ("f16", StoreDtype::F16),
            ("bf16", StoreDtype::BF16),
            ("q8", StoreDtype::Q8),
        ] {
            assert_eq!(parse_dtype(w).ok(), Some(d));
            assert_eq!(d.name(), w);
            assert_eq!(d.to_string(), w);
        }
        for bad in ["Q8", "int8", "q4", "", "f64", "fp16"] {
            let e = parse_dtype(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")) && e.contains("q8"), "{e}");
        }
        // Weights and activations take the floats only, and say where q8 belongs.
        assert_eq!(parse_compute_dtype("bf16").ok(), Some(DType::BF16));
        let e = parse_compute_dtype("q8").unwrap_err().to_string();
        assert!(
            e.contains("--store-dtype") && e.contains("f32, f16 or bf16"),
            "{e}"
        );
        assert!(parse_compute_dtype("x").is_err());
        assert_eq!(dtype_name(DType::U8), None);
        assert_eq!(StoreDtype::from_float(DType::F16), Some(StoreDtype::F16));
        assert_eq!(StoreDtype::default(), StoreDtype::F16);
    }

    #[test]
    fn new_rejects_inconsistent_meta() {
        let d = make_doc(2, 3, 5, 4, DType::F32, 1);
        let mut m = d.meta.clone();
        m.positions.pop();
        let e = StoredDoc::new(m, d.k.clone(), d.v.clone(), d.side.clone()).unwrap_err();
        assert!(e.to_string().contains("positions"), "{e}");
        let mut m = d.meta.clone();
        m.head_dim = 8;
        let e = StoredDoc::new(m, d.k.clone(), d.v.clone(), d.side.clone()).unwrap_err();
        assert!(e.to_string().contains("head_dim"), "{e}");
        let mut m = d.meta.clone();
        m.prefix_len = 0;
        let e = StoredDoc::new(m, d.k.clone(), d.v.clone(), d.side.clone()).unwrap_err();
        assert!(e.to_string().contains("prefix_len"), "{e}");
    }

    #[test]
    fn open_store_specs() -> Result<()> {
        // Nothing listens on port 1: opening succeeds (lazy), reading fails with a message.
        let r = open_store("redis://127.0.0.1:1", 1 << 20)?;
        let e = r.get(&DocId("a".repeat(64))).unwrap_err();
        assert!(e.to_string().contains("cannot connect to Redis"), "{e}");
        let e = open_store("s3://bucket", 1 << 20)
            .err()
            .expect("s3 refused");
        assert!(e.to_string().contains("unknown store scheme"), "{e}");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("st");
        let store = open_store(path.to_str().expect("utf8 path"), 1 << 20)?;
        let d = make_doc(1, 1, 3, 2, DType::F16, 9);
        assert!(store.put(&d)?);
        assert!(store.get(&d.id)?.is_some());
        assert!(DiskStore::open(&path)?.contains(&d.id)?);
        assert!(store.get_for_model(&d.id, "model-fp")?.is_some());
        let e = store.get_for_model(&d.id, "other").unwrap_err();
        assert!(e.to_string().contains("another model"), "{e}");
        Ok(())
    }

    #[test]
    fn default_dir_follows_env() {
        // The only test touching SAMKV_STORE, so no race with other tests.
        std::env::set_var("SAMKV_STORE", "/tmp/x-samkv");
        assert_eq!(default_store_dir(), PathBuf::from("/tmp/x-samkv"));
        std::env::remove_var("SAMKV_STORE");
        assert_eq!(default_store_dir(), PathBuf::from("./samkv-store"));
    }
}
