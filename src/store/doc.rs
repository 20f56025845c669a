//! [`StoredDoc`]: one document's KV cache as the store holds it, in its storage dtype.
//!
//! A q8 document stays quantized in memory (the memory tier charges its real size, about half
//! of f16) and is dequantized where it is used: [`StoredDoc::layer_kv`] picks rows first, so a
//! method that reads a few rows of a document dequantizes (and moves to the device) only those.

use super::{q8, DocId, DocMeta, StoreDtype};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// One document's KV cache plus per-document side data.
#[derive(Clone, Debug)]
pub struct StoredDoc {
    pub id: DocId,
    pub meta: DocMeta,
    /// Per layer, shape (n_kv_heads, T, head_dim), in the storage dtype (q8: u8 data, see
    /// [`q8`]). Read them through [`StoredDoc::layer_kv`], which dequantizes.
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// q8 only (empty otherwise): per layer, the f16 scales of k and v, shape
    /// (n_kv_heads, T, head_dim / block).
    pub k_scale: Vec<Tensor>,
    pub v_scale: Vec<Tensor>,
    /// Per-document side data for methods (e.g. "samkv.qloc.{layer}"), any dtype/shape.
    pub side: BTreeMap<String, Tensor>,
}

impl StoredDoc {
    /// Builds a float document with its id computed from `meta`, checking shapes against `meta`.
    pub fn new(
        meta: DocMeta,
        k: Vec<Tensor>,
        v: Vec<Tensor>,
        side: BTreeMap<String, Tensor>,
    ) -> Result<StoredDoc> {
        Self::with_scales(meta, k, v, Vec::new(), Vec::new(), side)
    }

    /// [`StoredDoc::new`] with q8 scales (empty for a float document).
    pub fn with_scales(
        meta: DocMeta,
        k: Vec<Tensor>,
        v: Vec<Tensor>,
        k_scale: Vec<Tensor>,
        v_scale: Vec<Tensor>,
        side: BTreeMap<String, Tensor>,
    ) -> Result<StoredDoc> {
        let doc = StoredDoc {
            id: meta.id(),
            meta,
            k,
            v,
            k_scale,
            v_scale,
            side,
        };
        doc.validate().map_err(Error::InvalidInput)?;
        Ok(doc)
    }

    /// Bytes of k and v (with their scales).
    pub fn kv_bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .chain(&self.k_scale)
            .chain(&self.v_scale)
            .map(tensor_bytes)
            .sum()
    }

    /// Bytes of the side tensors.
    pub fn side_bytes(&self) -> usize {
        self.side.values().map(tensor_bytes).sum()
    }

    /// kv_bytes + side_bytes: what the memory tier charges against its budget.
    pub fn total_bytes(&self) -> usize {
        self.kv_bytes() + self.side_bytes()
    }

    /// Number of document tokens (T).
    pub fn len(&self) -> usize {
        self.meta.n_tokens()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether k and v are q8 data (with scales) rather than floats.
    pub fn is_q8(&self) -> bool {
        !self.k_scale.is_empty()
    }

    /// Layer `l`'s K and V as `dt` on `dev`: the rows `rows` (indices into the document, a u32
    /// tensor on the document's device) or all of them. Rows are picked before anything moves
    /// or is dequantized, so the cost follows the rows read.
    pub fn layer_kv(
        &self,
        l: usize,
        rows: Option<&Tensor>,
        dev: &Device,
        dt: DType,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (self.k.get(l), self.v.get(l)) {
            (Some(k), Some(v)) => (k, v),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "stored document {} has {} layers; layer {l} was asked for",
                    self.id,
                    self.k.len()
                )))
            }
        };
        let pick = |t: &Tensor| -> Result<Tensor> {
            let t = match rows {
                Some(r) => t.index_select(r, 1)?,
                None => t.clone(),
            };
            Ok(t.to_device(dev)?)
        };
        if !self.is_q8() {
            return Ok((pick(k)?.to_dtype(dt)?, pick(v)?.to_dtype(dt)?));
        }
        let (ks, vs) = match (self.k_scale.get(l), self.v_scale.get(l)) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "stored q8 document {} has no scales for layer {l}",
                    self.id
                )))
            }
        };
        Ok((
            q8::dequantize(&pick(k)?, &pick(ks)?, dt)?,
            q8::dequantize(&pick(v)?, &pick(vs)?, dt)?,
        ))
    }

    /// A copy with k and v stored as `dt`. q8 quantizes (with [`q8::block_for`] head_dim) or
    /// dequantizes; side tensors keep their dtype: methods choose their own precision for them.
    pub fn to_dtype(&self, dt: StoreDtype) -> Result<StoredDoc> {
        let mut meta = self.meta.clone();
        meta.dtype = dt.name().to_string();
        meta.format_version = dt.format_version();
        // Quantizing what is already q8 would add a second rounding: keep it.
        if dt == StoreDtype::Q8 && self.is_q8() {
            return Ok(self.clone());
        }
        let n = self.k.len();
        let (mut k, mut v, mut k_scale, mut v_scale) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::new(),
            Vec::new(),
        );
        for l in 0..n {
            let dev = self.k[l].device().clone();
            match dt.float() {
                Some(f) => {
                    let (a, b) = self.layer_kv(l, None, &dev, f)?;
                    k.push(a);
                    v.push(b);
                }
                None => {
                    let block = q8::block_for(self.meta.head_dim);
                    let (a, sa) = q8::quantize(&self.k[l], block)?;
                    let (b, sb) = q8::quantize(&self.v[l], block)?;
                    k.push(a);
                    v.push(b);
                    k_scale.push(sa);
                    v_scale.push(sb);
                }
            }
        }
        let doc = StoredDoc {
            id: self.id.clone(),
            meta,
            k,
            v,
            k_scale,
            v_scale,
            side: self.side.clone(),
        };
        doc.validate().map_err(Error::InvalidInput)?;
        Ok(doc)
    }

    /// Checks meta against itself and the tensors; the message says what is inconsistent.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let m = &self.meta;
        let dt = m.storage_dtype().map_err(|e| e.to_string())?;
        if m.format_version != dt.format_version() {
            return Err(format!(
                "format version {} is not the one this samkv writes for {dt} entries ({})",
                m.format_version,
                dt.format_version()
            ));
        }
        if m.rope_layout != "interleaved" && m.rope_layout != "split_half" {
            return Err(format!(
                "rope_layout `{}` is not `interleaved` or `split_half`",
                m.rope_layout
            ));
        }
        if !(m.rope_base.is_finite() && m.rope_base > 0.0) {
            return Err(format!(
                "rope_base {} is not a positive number",
                m.rope_base
            ));
        }
        if m.n_layers == 0 || m.n_kv_heads == 0 || m.head_dim == 0 {
            return Err(format!(
                "n_layers {}, n_kv_heads {}, head_dim {} must all be positive",
                m.n_layers, m.n_kv_heads, m.head_dim
            ));
        }
        let t = m.n_tokens();
        if t == 0 {
            return Err("document has no tokens".to_string());
        }
        if m.positions.len() != t {
            return Err(format!(
                "{} positions for {t} tokens (need one per token)",
                m.positions.len()
            ));
        }
        let valid_hash = DocId(m.prefix_hash.clone()).is_valid();
        if (m.prefix_len == 0) != m.prefix_hash.is_empty() || (m.prefix_len > 0 && !valid_hash) {
            return Err(format!(
                "prefix_len {} does not fit prefix_hash `{}` (use prefix_hash() of the prefix ids, \"\" for none)",
                m.prefix_len, m.prefix_hash
            ));
        }
        let data_dt = dt.float().unwrap_or(DType::U8);
        let want = [m.n_kv_heads, t, m.head_dim];
        for (kind, ts) in [("k", &self.k), ("v", &self.v)] {
            if ts.len() != m.n_layers {
                return Err(format!(
                    "meta says n_layers={} but there are {} `{kind}` tensors",
                    m.n_layers,
                    ts.len()
                ));
            }
            for (l, x) in ts.iter().enumerate() {
                if x.dims() != want {
                    return Err(format!(
                        "{kind}.{l} has shape {:?} but meta says (n_kv_heads, T, head_dim) = {want:?}",
                        x.dims()
                    ));
                }
                if x.dtype() != data_dt {
                    return Err(format!(
                        "{kind}.{l} is {:?} but meta says dtype {}",
                        x.dtype(),
                        m.dtype
                    ));
                }
            }
        }
        for (kind, ts) in [("k_scale", &self.k_scale), ("v_scale", &self.v_scale)] {
            let n = if dt == StoreDtype::Q8 { m.n_layers } else { 0 };
            if ts.len() != n {
                return Err(format!(
                    "a {dt} entry of {} layers has {} `{kind}` tensors (q8: one per layer; \
                     floats: none)",
                    m.n_layers,
                    ts.len()
                ));
            }
            for (l, s) in ts.iter().enumerate() {
                q8::check_shapes(&want, s.dims()).map_err(|e| format!("{kind}.{l}: {e}"))?;
                if s.dtype() != DType::F16 {
                    return Err(format!("{kind}.{l} is {:?}, not F16", s.dtype()));
                }
            }
        }
        if self.side.keys().any(|k| k.is_empty()) {
            return Err("side tensor with an empty name".to_string());
        }
        let id = m.id();
        if id != self.id {
            return Err(format!(
                "id {} does not match the id {id} computed from its meta",
                self.id
            ));
        }
        Ok(())
    }
}
