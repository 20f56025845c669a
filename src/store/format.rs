//! On-disk format of one stored document: a safetensors file.
//!
//! Tensors `k.{layer}`, `v.{layer}` (shape (n_kv_heads, T, head_dim)), for q8 entries (format
//! version 2) also `k_scale.{layer}`, `v_scale.{layer}` (see [`super::q8`]), and `side.{name}`.
//! `__metadata__` holds `samkv.meta` (the [`DocMeta`] as JSON) and `samkv.checksum`: sha256 hex
//! over the meta JSON string and then every tensor's name, dtype, shape and raw bytes in sorted
//! name order. Covering the meta too means a corrupted field such as `keys_post_rope`, which no
//! shape check could notice, is still detected. Being safetensors, entries open in any
//! safetensors tool.

use super::{DocId, DocMeta, StoredDoc, FORMAT_VERSION, FORMAT_VERSION_Q8};
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
    for (l, (k, v)) in doc.k_scale.iter().zip(&doc.v_scale).enumerate() {
        named.insert(format!("k_scale.{l}"), k);
        named.insert(format!("v_scale.{l}"), v);
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
    // Version 2 only adds q8 tensors to version 1: this samkv reads both (and [`StoredDoc::
    // validate`] checks that the version fits the entry's dtype).
    if !(u64::from(FORMAT_VERSION)..=u64::from(FORMAT_VERSION_Q8)).contains(&version) {
        let who = if version > u64::from(FORMAT_VERSION_Q8) {
            "a newer"
        } else {
            "an older"
        };
        return Err(store_err(format!(
            "entry has format version {version}, written by {who} samkv; this samkv reads versions \
             {FORMAT_VERSION} to {FORMAT_VERSION_Q8}; remove the entry and re-ingest the document"
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
    let mut ks: Vec<Option<Tensor>> = vec![None; meta.n_layers];
    let mut vs: Vec<Option<Tensor>> = vec![None; meta.n_layers];
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
            Some(("k_scale", l)) => (&mut ks, l),
            Some(("v_scale", l)) => (&mut vs, l),
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
    // Scales: all layers (q8) or none (floats); validate says which the dtype wants.
    let scales = |kind: &str, ts: Vec<Option<Tensor>>| -> Result<Vec<Tensor>> {
        if ts.iter().all(Option::is_none) {
            Ok(Vec::new())
        } else {
            collect(kind, ts)
        }
    };
    let k = collect("k", k)?;
    let v = collect("v", v)?;
    let k_scale = scales("k_scale", ks)?;
    let v_scale = scales("v_scale", vs)?;
    let doc = StoredDoc {
        id: meta.id(),
        meta,
        k,
        v,
        k_scale,
        v_scale,
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
    fn q8_round_trip_keeps_shapes_positions_and_bounds_the_error() -> Result<()> {
        use super::super::StoreDtype;
        // head_dim 64: two 32-channel blocks per row; 8: one block per row.
        for hd in [64, 8] {
            let f = make_doc(2, 3, 5, hd, DType::F32, 4);
            let q = f.to_dtype(StoreDtype::Q8)?;
            let bytes = encode(&q)?;
            let back = decode(&bytes, Some(&q.id))?;
            assert_same(&q, &back);
            assert_eq!(back.meta.positions, f.meta.positions);
            assert_eq!(
                (back.meta.dtype.as_str(), back.meta.format_version),
                ("q8", 2)
            );
            let block = if hd == 64 { 32 } else { 8 };
            for l in 0..2 {
                let (k, v) = back.layer_kv(l, None, &Device::Cpu, DType::F32)?;
                let pairs = [
                    (&f.k[l], &k, &back.k_scale[l]),
                    (&f.v[l], &v, &back.v_scale[l]),
                ];
                for (want, got, scale) in pairs {
                    assert_eq!(got.dims(), &[3, 5, hd]);
                    let (w, g) = (want.to_vec3::<f32>()?, got.to_vec3::<f32>()?);
                    let sc = scale.to_dtype(DType::F32)?.to_vec3::<f32>()?;
                    for ((h, t), c) in (0..3)
                        .flat_map(|h| (0..5).map(move |t| (h, t)))
                        .flat_map(|ht| (0..hd).map(move |c| (ht, c)))
                    {
                        let err = (w[h][t][c] - g[h][t][c]).abs();
                        let half = sc[h][t][c / block] / 2.0;
                        assert!(err <= half + 1e-7, "hd {hd} ({h},{t},{c}): {err} > {half}");
                    }
                }
            }
            // Row selection picks data and scales together.
            let rows = Tensor::new(&[4u32, 1][..], &Device::Cpu)?;
            let (k2, _) = back.layer_kv(1, Some(&rows), &Device::Cpu, DType::F32)?;
            let (k, _) = back.layer_kv(1, None, &Device::Cpu, DType::F32)?;
            let want = k.index_select(&rows, 1)?;
            assert_eq!(k2.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
            // Half of f16's bytes, plus the scales.
            let f16 = f.to_dtype(StoreDtype::F16)?;
            assert!(encode(&q)?.len() < encode(&f16)?.len());
        }
        Ok(())
    }

    #[test]
    fn q8_corrupt_scale_or_data_is_detected() -> Result<()> {
        use super::super::StoreDtype;
        let q = make_doc(2, 2, 4, 32, DType::F32, 6).to_dtype(StoreDtype::Q8)?;
        let bytes = encode(&q)?;
        let (n, header) = SafeTensors::read_metadata(&bytes).expect("header");
        for name in ["k_scale.1", "v_scale.0", "k.0", "v.1"] {
            let info = header.info(name).expect("tensor in entry");
            let mut bad = bytes.clone();
            bad[8 + n + info.data_offsets.0 + 1] ^= 0x04;
            let e = err_of(decode(&bad, Some(&q.id)));
            assert!(e.contains("checksum mismatch"), "{name}: {e}");
        }
        // A q8 meta over float tensors, or scales without a q8 meta, disagree.
        let f = make_doc(2, 2, 4, 32, DType::F16, 6);
        let bad = rewrite_meta(&encode(&f)?, |m| {
            m["dtype"] = "q8".into();
            m["format_version"] = 2.into();
        });
        let e = err_of(decode(&bad, None));
        assert!(e.contains("meta says dtype q8"), "{e}");
        let bad = rewrite_meta(&bytes, |m| {
            m["dtype"] = "f16".into();
            m["format_version"] = 1.into();
        });
        let e = err_of(decode(&bad, None));
        assert!(e.contains("meta says dtype f16"), "{e}");
        // A q8 entry must say version 2.
        let bad = rewrite_meta(&bytes, |m| m["format_version"] = 1.into());
        let e = err_of(decode(&bad, None));
        assert!(e.contains("format version 1") && e.contains("q8"), "{e}");
        Ok(())
    }

    /// Entries written before q8 existed (the valid ones of the fuzz corpus, all version 1)
    /// still read, and re-encode to what they were.
    #[test]
    fn entries_from_before_q8_still_read() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/store_decode");
        let mut read = std::collections::BTreeSet::new();
        for f in std::fs::read_dir(dir)? {
            let Ok(d) = decode(&std::fs::read(f?.path())?, None) else {
                continue; // a fuzz input, not an entry
            };
            assert_eq!(d.meta.format_version, 1);
            assert!(!d.is_q8());
            read.insert(d.meta.dtype.clone());
            let (k, _) = d.layer_kv(0, None, &Device::Cpu, DType::F32)?;
            assert_eq!(k.dims(), d.k[0].dims());
            assert_same(&d, &decode(&encode(&d)?, Some(&d.id))?);
        }
        let want: std::collections::BTreeSet<String> =
            ["bf16", "f16", "f32"].map(String::from).into();
        assert_eq!(
            read, want,
            "the corpus should hold valid f16, f32 and bf16 entries"
        );
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
