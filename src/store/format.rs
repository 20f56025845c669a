//! On-disk format of one stored document: a safetensors file.
//!
//! Tensors `k.{layer}`, `v.{layer}` (shape (n_kv_heads, T, head_dim)) and `side.{name}`.
//! `__metadata__` holds `samkv.meta` (the [`DocMeta`] as JSON) and `samkv.checksum`: sha256 hex
//! over the meta JSON string and then every tensor's name, dtype, shape and raw bytes in sorted
//! name order. Covering the meta too means a corrupted field such as `keys_post_rope`, which no
//! shape check could notice, is still detected. Being safetensors, entries open in any
//! safetensors tool.

use super::{DocId, DocMeta, StoredDoc, FORMAT_VERSION};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

pub const META_KEY: &str = "samkv.meta";
pub const CHECKSUM_KEY: &str = "samkv.checksum";

/// Largest header [`read_meta_json`] accepts (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

// Every failure of decoding found the bytes wrong: corruption, not an I/O error.
fn store_err(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

fn checksum<'a>(
    meta_json: &str,
    tensors: impl Iterator<Item = (&'a str, StDtype, &'a [usize], &'a [u8])>,
) -> String {
    let mut h = Sha256::new();
    h.update(b"samkv.checksum.v1");
    let put = |h: &mut Sha256, b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    put(&mut h, meta_json.as_bytes());
    for (name, dtype, shape, data) in tensors {
        put(&mut h, name.as_bytes());
        put(&mut h, format!("{dtype:?}").as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        put(&mut h, data);
    }
    hex::encode(h.finalize())
}

/// Serializes a document. Fails if the document is inconsistent with its meta, so nothing
/// unreadable is ever written.
pub fn encode(doc: &StoredDoc) -> Result<Vec<u8>> {
    doc.validate()
        .map_err(|e| Error::InvalidInput(format!("cannot store document {}: {e}", doc.id)))?;
    // BTreeMap: the checksum's sorted-name order.
    let mut named: BTreeMap<String, &Tensor> = BTreeMap::new();
    for (l, (k, v)) in doc.k.iter().zip(&doc.v).enumerate() {
        named.insert(format!("k.{l}"), k);
        named.insert(format!("v.{l}"), v);
    }
    for (n, t) in &doc.side {
        named.insert(format!("side.{n}"), t);
    }
    let mut raw: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(named.len());
    for (name, t) in named {
        let mut bytes = Vec::with_capacity(t.elem_count() * t.dtype().size_in_bytes());
        t.write_bytes(&mut bytes)
            .map_err(|e| Error::InvalidInput(format!("cannot store tensor {name}: {e}")))?;
        raw.push((name, t.dtype().into(), t.dims().to_vec(), bytes));
    }
    let meta_json = serde_json::to_string(&doc.meta)
        .map_err(|e| store_err(format!("cannot serialize meta: {e}")))?;
    let sum = checksum(
        &meta_json,
        raw.iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())),
    );
    let views = raw
        .iter()
        .map(|(n, d, s, b)| Ok((n.as_str(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| store_err(format!("cannot build tensor view: {e}")))?;
    let mut md = HashMap::new();
    md.insert(META_KEY.to_string(), meta_json);
    md.insert(CHECKSUM_KEY.to_string(), sum);
    safetensors::serialize(views, Some(md))
        .map_err(|e| store_err(format!("cannot serialize safetensors: {e}")))
}

/// [`decode_on`] onto the CPU.
pub fn decode(bytes: &[u8], expected: Option<&DocId>) -> Result<StoredDoc> {
    decode_on(bytes, expected, &Device::Cpu)
}

fn check_version(meta: &str) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(meta)
        .map_err(|e| store_err(format!("samkv.meta is not valid JSON: {e}")))?;
    let version = v
        .get("format_version")
        .and_then(|x| x.as_u64())
        .ok_or_else(|| store_err("samkv.meta has no format_version; re-ingest the document"))?;
    if version != u64::from(FORMAT_VERSION) {
        let who = if version > u64::from(FORMAT_VERSION) {
            "a newer"
        } else {
            "an older"
        };
        return Err(store_err(format!(
            "entry has format version {version}, written by {who} samkv; this samkv reads version \
             {FORMAT_VERSION} only; remove the entry and re-ingest the document"
        )));
    }
    Ok(())
}

/// Parses and checks one entry, loading tensors onto `device` in their stored dtype.
/// `expected`: the id the entry was stored under (its file name); a mismatch means the file was
/// renamed or copied to the wrong place.
pub fn decode_on(bytes: &[u8], expected: Option<&DocId>, device: &Device) -> Result<StoredDoc> {
    let (n, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
        store_err(format!(
            "not a complete safetensors file ({} bytes; truncated or overwritten?): {e}",
            bytes.len()
        ))
    })?;
    let md = header
        .metadata()
        .as_ref()
        .ok_or_else(|| store_err("safetensors file has no __metadata__; not a samkv entry"))?;
    let meta_json = md
        .get(META_KEY)
        .ok_or_else(|| store_err(format!("metadata has no `{META_KEY}`; not a samkv entry")))?;
    let want_sum = md.get(CHECKSUM_KEY).ok_or_else(|| {
        store_err(format!(
            "metadata has no `{CHECKSUM_KEY}`; not a samkv entry"
        ))
    })?;
    check_version(meta_json)?;
    let meta: DocMeta = serde_json::from_str(meta_json)
        .map_err(|e| store_err(format!("samkv.meta does not describe a document: {e}")))?;

    // read_metadata has checked that every tensor's offsets lie inside the data section.
    let data = bytes
        .get(8 + n..)
        .ok_or_else(|| store_err("file ends inside its header (truncated)"))?;
    let mut views: BTreeMap<String, (StDtype, &[usize], &[u8])> = BTreeMap::new();
    for (name, info) in header.tensors() {
        let (a, b) = info.data_offsets;
        let slice = data
            .get(a..b)
            .ok_or_else(|| store_err(format!("tensor {name} lies outside the file")))?;
        views.insert(name, (info.dtype, info.shape.as_slice(), slice));
    }
    let load = |name: &str, (dt, shape, raw): (StDtype, &[usize], &[u8])| -> Result<Tensor> {
        let dt = DType::try_from(dt)
            .map_err(|e| store_err(format!("tensor {name}: unsupported dtype: {e}")))?;
        Tensor::from_raw_buffer(raw, dt, shape, device)
            .map_err(|e| store_err(format!("tensor {name}: {e}")))
    };
    // Bound n_layers by what the file holds before allocating by it.
    if meta.n_layers > views.len() {
        return Err(store_err(format!(
            "meta says n_layers={} but the file holds only {} tensors (metadata and tensors disagree)",
            meta.n_layers,
            views.len()
        )));
    }
    let mut k: Vec<Option<Tensor>> = vec![None; meta.n_layers];
    let mut v: Vec<Option<Tensor>> = vec![None; meta.n_layers];
    let mut side = BTreeMap::new();
    for (name, &view) in &views {
        let name = name.as_str();
        if let Some(s) = name.strip_prefix("side.") {
            side.insert(s.to_string(), load(name, view)?);
            continue;
        }
        let (slot, layer) = match name.split_once('.') {
            Some(("k", l)) => (&mut k, l),
            Some(("v", l)) => (&mut v, l),
            _ => return Err(store_err(format!("unexpected tensor `{name}` in entry"))),
        };
        let l: usize = layer
            .parse()
            .map_err(|_| store_err(format!("unexpected tensor `{name}` in entry")))?;
        let cell = slot.get_mut(l).ok_or_else(|| {
            store_err(format!(
                "tensor {name} but meta says n_layers={} (metadata and tensors disagree)",
                meta.n_layers
            ))
        })?;
        *cell = Some(load(name, view)?);
    }
    let collect = |kind: &str, ts: Vec<Option<Tensor>>| -> Result<Vec<Tensor>> {
        ts.into_iter()
            .enumerate()
            .map(|(l, t)| {
                t.ok_or_else(|| {
                    store_err(format!(
                        "tensor {kind}.{l} is missing but meta says n_layers={} (metadata and tensors disagree)",
                        meta.n_layers
                    ))
                })
            })
            .collect()
    };
    let k = collect("k", k)?;
    let v = collect("v", v)?;
    let doc = StoredDoc {
        id: meta.id(),
        meta,
        k,
        v,
        side,
    };
    doc.validate()
        .map_err(|e| store_err(format!("metadata and tensors disagree: {e}")))?;

    let got_sum = checksum(
        meta_json,
        views.iter().map(|(n, (d, s, b))| (n.as_str(), *d, *s, *b)),
    );
    if &got_sum != want_sum {
        return Err(store_err(format!(
            "checksum mismatch (stored {want_sum}, computed {got_sum}): the file is corrupt"
        )));
    }
    if let Some(e) = expected {
        if *e != doc.id {
            return Err(store_err(format!(
                "entry is stored as {e} but its contents are document {}: the file was renamed or \
                 copied to the wrong name",
                doc.id
            )));
        }
    }
    Ok(doc)
}

/// The `samkv.meta` JSON of an entry file, reading only its header (for listings; nothing is
/// verified beyond the header parsing).
pub fn read_meta_json(path: &Path) -> Result<serde_json::Value> {
    read_meta_json_from(&mut std::fs::File::open(path)?)
}

/// [`read_meta_json`] from any reader positioned at the start of an entry.
pub fn read_meta_json_from(f: &mut impl Read) -> Result<serde_json::Value> {
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| store_err(format!("header unreadable (truncated file?): {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(store_err(format!(
            "header length {n} is implausible; corrupt file"
        )));
    }
    // Read what is there rather than allocating the claimed length up front.
    let mut buf = Vec::new();
    f.take(n)
        .read_to_end(&mut buf)
        .map_err(|e| store_err(format!("header unreadable: {e}")))?;
    if buf.len() as u64 != n {
        return Err(store_err(format!(
            "header unreadable (truncated file?): {} of {n} header bytes",
            buf.len()
        )));
    }
    let header: serde_json::Value =
        serde_json::from_slice(&buf).map_err(|e| store_err(format!("header is not JSON: {e}")))?;
    let meta = header
        .get("__metadata__")
        .and_then(|m| m.get(META_KEY))
        .and_then(|m| m.as_str())
        .ok_or_else(|| store_err(format!("header has no `{META_KEY}`; not a samkv entry")))?;
    serde_json::from_str(meta).map_err(|e| store_err(format!("samkv.meta is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{assert_same, make_doc};
    use super::*;

    /// Re-serializes `bytes` with the meta JSON edited by `f`, keeping tensors and checksum.
    fn rewrite_meta(bytes: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let (_, header) = SafeTensors::read_metadata(bytes).expect("header");
        let st = SafeTensors::deserialize(bytes).expect("deserialize");
        let mut md = header.metadata().clone().expect("metadata");
        let mut meta: serde_json::Value = serde_json::from_str(&md[META_KEY]).expect("json");
        f(&mut meta);
        md.insert(META_KEY.into(), meta.to_string());
        safetensors::serialize(st.tensors(), Some(md)).expect("serialize")
    }

    fn err_of(r: Result<StoredDoc>) -> String {
        match r {
            Ok(_) => panic!("decode accepted a bad entry"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn round_trip_every_field_and_dtype() -> Result<()> {
        for (i, dt) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            let d = make_doc(3, 2, 7, 8, dt, i as u32);
            let bytes = encode(&d)?;
            let back = decode(&bytes, Some(&d.id))?;
            assert_same(&d, &back);
            assert_eq!(back.meta.dtype, super::super::dtype_name(dt).unwrap_or("?"));
            assert_eq!(back.side["ids"].to_vec1::<u32>()?, vec![i as u32, 5, 6]);
            // Re-encoding what was read gives the same entry (header key order may differ:
            // safetensors keeps metadata in a HashMap).
            assert_same(&d, &decode(&encode(&back)?, Some(&d.id))?);
        }
        Ok(())
    }

    #[test]
    fn truncated_file_is_detected() -> Result<()> {
        let bytes = encode(&make_doc(2, 2, 4, 4, DType::F16, 1))?;
        for cut in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
            let e = err_of(decode(&bytes[..cut], None));
            assert!(e.contains("truncated"), "cut {cut}: {e}");
        }
        Ok(())
    }

    #[test]
    fn flipped_payload_byte_is_detected() -> Result<()> {
        let d = make_doc(2, 2, 4, 4, DType::F32, 1);
        let bytes = encode(&d)?;
        for pos in [bytes.len() - 1, bytes.len() - 300] {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x10;
            let e = err_of(decode(&bad, Some(&d.id)));
            assert!(e.contains("checksum mismatch"), "{e}");
        }
        Ok(())
    }

    #[test]
    fn modified_metadata_is_detected() -> Result<()> {
        let d = make_doc(2, 2, 4, 4, DType::F32, 1);
        let bytes = encode(&d)?;
        let bad = rewrite_meta(&bytes, |m| m["n_layers"] = 3.into());
        let e = err_of(decode(&bad, None));
        assert!(e.contains("n_layers=3") && e.contains("missing"), "{e}");
        let bad = rewrite_meta(&bytes, |m| m["n_layers"] = u64::MAX.into());
        let e = err_of(decode(&bad, None));
        assert!(e.contains("n_layers="), "{e}");
        let bad = rewrite_meta(&bytes, |m| m["n_layers"] = 1.into());
        let e = err_of(decode(&bad, None));
        assert!(e.contains("n_layers=1"), "{e}");
        let bad = rewrite_meta(&bytes, |m| m["n_kv_heads"] = 4.into());
        let e = err_of(decode(&bad, None));
        assert!(e.contains("n_kv_heads"), "{e}");
        let bad = rewrite_meta(&bytes, |m| m["dtype"] = "f16".into());
        let e = err_of(decode(&bad, None));
        assert!(e.contains("dtype f16"), "{e}");
        // A field no shape check sees is still covered by the checksum.
        let bad = rewrite_meta(&bytes, |m| m["keys_post_rope"] = false.into());
        let e = err_of(decode(&bad, None));
        assert!(e.contains("checksum mismatch"), "{e}");
        // Changed token ids change the id: caught as a rename when the file name is known.
        let bad = rewrite_meta(&bytes, |m| m["token_ids"][0] = 999_999.into());
        let e = err_of(decode(&bad, Some(&d.id)));
        assert!(
            e.contains("checksum mismatch") || e.contains("renamed"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn unknown_format_version_is_detected() -> Result<()> {
        let bytes = encode(&make_doc(1, 1, 2, 2, DType::F32, 1))?;
        let bad = rewrite_meta(&bytes, |m| m["format_version"] = 99.into());
        let e = err_of(decode(&bad, None));
        assert!(
            e.contains("format version 99") && e.contains("re-ingest"),
            "{e}"
        );
        assert!(e.contains("newer"), "{e}");
        let bad = rewrite_meta(&bytes, |m| m["format_version"] = 0.into());
        let e = err_of(decode(&bad, None));
        assert!(e.contains("format version 0") && e.contains("older"), "{e}");
        Ok(())
    }

    #[test]
    fn renamed_file_is_detected() -> Result<()> {
        let a = make_doc(1, 1, 2, 2, DType::F32, 1);
        let b = make_doc(1, 1, 2, 2, DType::F32, 2);
        let e = err_of(decode(&encode(&a)?, Some(&b.id)));
        assert!(e.contains("renamed") && e.contains(&b.id.0), "{e}");
        Ok(())
    }

    #[test]
    fn foreign_safetensors_is_rejected() -> Result<()> {
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?;
        let plain = safetensors::serialize([("x", &t)], None).expect("serialize");
        let e = err_of(decode(&plain, None));
        assert!(e.contains("not a samkv entry"), "{e}");
        let d = make_doc(1, 1, 2, 2, DType::F32, 1);
        let mut md = HashMap::new();
        md.insert(
            META_KEY.to_string(),
            serde_json::to_string(&d.meta).expect("json"),
        );
        let e = err_of(decode(
            &safetensors::serialize([("x", &t)], Some(md)).expect("ser"),
            None,
        ));
        assert!(e.contains(CHECKSUM_KEY), "{e}");
        Ok(())
    }

    #[test]
    fn encode_rejects_inconsistent_doc() {
        let mut d = make_doc(2, 2, 4, 4, DType::F32, 1);
        d.v.pop();
        let e = encode(&d).unwrap_err().to_string();
        assert!(e.contains("n_layers=2") && e.contains("`v`"), "{e}");
        let mut d = make_doc(2, 2, 4, 4, DType::F32, 1);
        d.id = make_doc(2, 2, 4, 4, DType::F32, 2).id;
        assert!(encode(&d).is_err());
    }

    #[test]
    fn header_meta_reads_without_payload() -> Result<()> {
        let d = make_doc(2, 2, 4, 4, DType::BF16, 3);
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, encode(&d)?)?;
        let m = read_meta_json(&p)?;
        assert_eq!(m["model_fingerprint"], "model-fp");
        assert_eq!(m["token_ids"].as_array().map(|a| a.len()), Some(4));
        std::fs::write(&p, [1u8, 2, 3])?;
        assert!(read_meta_json(&p).is_err());
        Ok(())
    }
}
