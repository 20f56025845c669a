//! A KV buffer the caller owns: per layer, keys and values of shape (kv_heads, T, head_dim)
//! with one explicit position per row. Rows need not be contiguous in position (gaps are
//! normal after sparsification) and layers may hold different rows (Multi-InfLLM keeps a
//! different set per layer). Rows are kept sorted by position, which lets attention skip
//! keys that lie in every query's future.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct LayerKv {
    /// (kv_heads, capacity, head_dim); rows `0..pos.len()` are valid.
    k: Tensor,
    v: Tensor,
    pos: Vec<u32>,
}

impl LayerKv {
    pub fn empty(kv_heads: usize, head_dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        let k = Tensor::zeros((kv_heads, 0, head_dim), dtype, device)?;
        Ok(Self {
            v: k.clone(),
            k,
            pos: Vec::new(),
        })
    }

    /// Wraps full tensors (kv_heads, T, head_dim) with their positions.
    pub fn from_parts(k: Tensor, v: Tensor, pos: Vec<u32>) -> Result<Self> {
        let t = k.dim(1)?;
        if v.dims() != k.dims() || t != pos.len() {
            return Err(Error::InvalidInput(format!(
                "KV parts disagree: k {:?}, v {:?}, {} positions",
                k.dims(),
                v.dims(),
                pos.len()
            )));
        }
        let mut layer = Self { k, v, pos };
        layer.sort_by_position()?;
        Ok(layer)
    }

    pub fn len(&self) -> usize {
        self.pos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }

    pub fn positions(&self) -> &[u32] {
        &self.pos
    }

    pub fn keys(&self) -> Result<Tensor> {
        Ok(self.k.narrow(1, 0, self.len())?)
    }

    pub fn values(&self) -> Result<Tensor> {
        Ok(self.v.narrow(1, 0, self.len())?)
    }

    /// Bytes of the valid rows (not the spare capacity).
    pub fn bytes(&self) -> usize {
        let (h, _, d) = self.k.dims3().unwrap_or((0, 0, 0));
        2 * h * d * self.len() * self.k.dtype().size_in_bytes()
    }

    /// Appends rows; decoding appends one at a time, so capacity grows geometrically and rows
    /// are written in place instead of re-concatenating the whole buffer each step.
    pub fn append(&mut self, k: &Tensor, v: &Tensor, pos: &[u32]) -> Result<()> {
        let n = pos.len();
        if n == 0 {
            return Ok(());
        }
        let sorted_after = self.pos.last().is_none_or(|&last| pos[0] > last)
            && pos.windows(2).all(|w| w[0] < w[1]);
        let len = self.len();
        let cap = self.k.dim(1)?;
        if len + n > cap {
            let (h, _, d) = self.k.dims3()?;
            let new_cap = (len + n).max(cap * 2).max(16);
            let nk = Tensor::zeros((h, new_cap, d), self.k.dtype(), self.k.device())?;
            let nv = nk.zeros_like()?;
            if len > 0 {
                nk.slice_set(&self.keys()?.contiguous()?, 1, 0)?;
                nv.slice_set(&self.values()?.contiguous()?, 1, 0)?;
            }
            self.k = nk;
            self.v = nv;
        }
        self.k.slice_set(&k.contiguous()?, 1, len)?;
        self.v.slice_set(&v.contiguous()?, 1, len)?;
        self.pos.extend_from_slice(pos);
        if !sorted_after {
            self.sort_by_position()?;
        }
        Ok(())
    }

    /// Keeps the given rows (indices into the current rows), in position order.
    pub fn select(&self, rows: &[usize]) -> Result<Self> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx_t = Tensor::new(idx.as_slice(), self.k.device())?;
        let k = self.keys()?.index_select(&idx_t, 1)?;
        let v = self.values()?.index_select(&idx_t, 1)?;
        let pos = rows.iter().map(|&r| self.pos[r]).collect();
        Self::from_parts(k, v, pos)
    }

    /// Replaces the K/V of the given rows with new values (rows x (kv_heads, n, head_dim)).
    pub fn overwrite(&mut self, rows: &[usize], k: &Tensor, v: &Tensor) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let len = self.len();
        let mut idx: Vec<u32> = (0..len as u32).collect();
        for (j, &r) in rows.iter().enumerate() {
            idx[r] = (len + j) as u32;
        }
        let idx_t = Tensor::new(idx.as_slice(), self.k.device())?;
        self.k = Tensor::cat(&[&self.keys()?, k], 1)?.index_select(&idx_t, 1)?;
        self.v = Tensor::cat(&[&self.values()?, v], 1)?.index_select(&idx_t, 1)?;
        Ok(())
    }

    /// K/V of the given rows, (kv_heads, rows, head_dim).
    pub fn gather(&self, rows: &[usize]) -> Result<(Tensor, Tensor)> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx_t = Tensor::new(idx.as_slice(), self.k.device())?;
        Ok((
            self.keys()?.index_select(&idx_t, 1)?,
            self.values()?.index_select(&idx_t, 1)?,
        ))
    }

    fn sort_by_position(&mut self) -> Result<()> {
        if self.pos.windows(2).all(|w| w[0] < w[1]) {
            return Ok(());
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| self.pos[i]);
        if order.windows(2).any(|w| self.pos[w[0]] == self.pos[w[1]]) {
            return Err(Error::InvalidInput(
                "two KV rows share one position; each position may appear once".into(),
            ));
        }
        let idx: Vec<u32> = order.iter().map(|&r| r as u32).collect();
        let idx_t = Tensor::new(idx.as_slice(), self.k.device())?;
        self.k = self.keys()?.index_select(&idx_t, 1)?;
        self.v = self.values()?.index_select(&idx_t, 1)?;
        self.pos = order.iter().map(|&i| self.pos[i]).collect();
        Ok(())
    }
}

/// One [`LayerKv`] per transformer layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layer = LayerKv::empty(kv_heads, head_dim, dtype, device)?;
        Ok(Self {
            layers: vec![layer; n_layers],
        })
    }

    /// Rows in the largest layer (all layers hold the same rows except after per-layer selection).
    pub fn len(&self) -> usize {
        self.layers.iter().map(|l| l.len()).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }

    /// The next free position (one past the largest held).
    pub fn next_position(&self) -> u32 {
        self.layers
            .iter()
            .filter_map(|l| l.positions().last())
            .max()
            .map_or(0, |&p| p + 1)
    }
}
