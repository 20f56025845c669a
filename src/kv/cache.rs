//! A KV buffer the caller owns: per layer, keys and values of shape (kv_heads, T, head_dim)
//! with one explicit position per row. Rows need not be contiguous in position (gaps are
//! normal after sparsification) and layers may hold different rows (Multi-InfLLM keeps a
//! different set per layer). Rows are kept sorted by position, which lets attention skip
//! keys that lie in every query's future.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::f16;

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct LayerKv {
    /// (kv_heads, capacity, head_dim); rows `0..pos.len()` are valid.
    k: Tensor,
    v: Tensor,
    pos: Vec<u32>,
    /// f16 copy for decoding on CPU (see [`HalfKv`]); built on first use, extended on append,
    /// dropped by any other change to the rows.
    half: Option<HalfKv>,
}

/// An f16 copy of a layer's K/V rows, (kv_heads, cap, head_dim) each, rows `0..len` in sync
/// with the f32 rows. Decoding one token reads every cached row once, so at long contexts its
/// speed is bound by memory traffic; reading f16 halves it (llama.cpp's default KV type).
/// `unusable` marks layers holding values outside f16's range: they keep the f32 path.
#[derive(Clone, Debug, Default)]
pub(crate) struct HalfKv {
    pub(crate) k: Vec<f16>,
    pub(crate) v: Vec<f16>,
    pub(crate) cap: usize,
    pub(crate) len: usize,
    unusable: bool,
}

impl LayerKv {
    pub fn empty(kv_heads: usize, head_dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        let k = Tensor::zeros((kv_heads, 0, head_dim), dtype, device)?;
        Ok(Self {
            v: k.clone(),
            k,
            pos: Vec::new(),
            half: None,
        })
    }

    /// An empty layer with room for `cap` rows, so that appending up to `cap` rows copies
    /// each row once (no regrowth).
    pub fn with_capacity(
        kv_heads: usize,
        cap: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let k = Tensor::zeros((kv_heads, cap, head_dim), dtype, device)?;
        Ok(Self {
            v: k.zeros_like()?,
            k,
            pos: Vec::new(),
            half: None,
        })
    }

    /// Wraps full tensors (kv_heads, T, head_dim) with their positions.
    pub fn from_parts(k: Tensor, v: Tensor, pos: Vec<u32>) -> Result<Self> {
        let t = k.dim(1)?;
        if v.dims() != k.dims() || t != pos.len() {
            return Err(Error::Internal(format!(
                "KV parts disagree: k {:?}, v {:?}, {} positions",
                k.dims(),
                v.dims(),
                pos.len()
            )));
        }
        let mut layer = Self {
            k,
            v,
            pos,
            half: None,
        };
        layer.sort_by_position()?;
        Ok(layer)
    }

    /// Wraps buffers (kv_heads, capacity, head_dim) whose first `pos.len()` rows are valid and
    /// sorted by position; the rest is room to append into.
    pub fn from_buffer(k: Tensor, v: Tensor, pos: Vec<u32>) -> Result<Self> {
        let cap = k.dim(1)?;
        if v.dims() != k.dims() || pos.len() > cap || !pos.windows(2).all(|w| w[0] < w[1]) {
            return Err(Error::Internal(format!(
                "KV buffers disagree: k {:?}, v {:?}, {} positions (must be sorted and fit)",
                k.dims(),
                v.dims(),
                pos.len()
            )));
        }
        Ok(Self {
            k,
            v,
            pos,
            half: None,
        })
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

    /// Keeps the first `len` rows, dropping rows appended since (the buffer keeps its
    /// capacity): undoes a decode step that failed after appending to some layers.
    pub fn truncate(&mut self, len: usize) {
        if len < self.pos.len() {
            self.pos.truncate(len);
            if let Some(h) = &mut self.half {
                h.len = h.len.min(len);
            }
        }
    }

    /// Bytes of the K/V buffers as allocated (valid rows and spare capacity).
    pub fn allocated_bytes(&self) -> usize {
        let (h, cap, d) = self.k.dims3().unwrap_or((0, 0, 0));
        2 * h * d * cap * self.k.dtype().size_in_bytes()
    }

    /// Makes room for `extra` more rows in one allocation of exactly that size, so that the
    /// appends that follow neither reallocate nor double the buffer: a server that knows a
    /// sequence's largest length holds exactly the bytes it reserved for it.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let (h, cap, d) = self.k.dims3()?;
        let len = self.len();
        if len + extra <= cap {
            return Ok(());
        }
        let nk = Tensor::zeros((h, len + extra, d), self.k.dtype(), self.k.device())?;
        let nv = nk.zeros_like()?;
        if len > 0 {
            nk.slice_set(&self.keys()?.contiguous()?, 1, 0)?;
            nv.slice_set(&self.values()?.contiguous()?, 1, 0)?;
        }
        self.k = nk;
        self.v = nv;
        Ok(())
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

    /// The f16 copy of the valid rows, brought up to date (converting only rows appended since
    /// the last call). None unless the rows are f32 on the CPU and fit f16's range.
    pub(crate) fn half(&mut self) -> Result<Option<&HalfKv>> {
        if self.k.dtype() != DType::F32 || !self.k.device().is_cpu() {
            return Ok(None);
        }
        let (h, cap32, d) = self.k.dims3()?;
        let len = self.len();
        let mut hk = self.half.take().unwrap_or_default();
        if hk.unusable {
            self.half = Some(hk);
            return Ok(None);
        }
        if hk.len < len {
            if hk.cap < len {
                // Grow geometrically like the f32 buffer, moving the rows already converted.
                let new_cap = len.max(hk.cap * 2).max(16);
                let mut nk = vec![f16::ZERO; h * new_cap * d];
                let mut nv = vec![f16::ZERO; h * new_cap * d];
                for head in 0..h {
                    let (src, dst) = (head * hk.cap * d, head * new_cap * d);
                    nk[dst..dst + hk.len * d].copy_from_slice(&hk.k[src..src + hk.len * d]);
                    nv[dst..dst + hk.len * d].copy_from_slice(&hk.v[src..src + hk.len * d]);
                }
                (hk.k, hk.v, hk.cap) = (nk, nv, new_cap);
            }
            let ok = convert_rows(&self.k, &mut hk.k, h, cap32, hk.cap, d, hk.len, len)?
                && convert_rows(&self.v, &mut hk.v, h, cap32, hk.cap, d, hk.len, len)?;
            if !ok {
                self.half = Some(HalfKv {
                    unusable: true,
                    ..Default::default()
                });
                return Ok(None);
            }
            hk.len = len;
        }
        self.half = Some(hk);
        Ok(self.half.as_ref())
    }

    /// Keeps the given rows (indices into the current rows), in position order.
    pub fn select(&self, rows: &[usize]) -> Result<Self> {
        let (k, v) = self.gather(rows)?;
        let pos = rows.iter().map(|&r| self.pos[r]).collect();
        Self::from_parts(k, v, pos)
    }

    /// Replaces the K/V of the given rows with new values (rows x (kv_heads, n, head_dim)).
    pub fn overwrite(&mut self, rows: &[usize], k: &Tensor, v: &Tensor) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let len = self.len();
        if let Some(&r) = rows.iter().find(|&&r| r >= len) {
            return Err(Error::Internal(format!(
                "overwrite of row {r}, but the layer holds {len} rows"
            )));
        }
        let (h, n, d) = k.dims3()?;
        let r: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        self.half = None;
        // On CUDA one thread per element (candle's scatter loops over the rows in each thread).
        #[cfg(feature = "cuda")]
        if self.k.device().is_cuda() {
            use crate::cuda::gather::scatter_rows;
            let idx = Tensor::new(r.as_slice(), self.k.device())?;
            // Row-packed views (a narrowed recompute) are taken as they are.
            let (k, v) = (k.to_dtype(self.k.dtype())?, v.to_dtype(self.v.dtype())?);
            if scatter_rows(&self.k, &k, &idx)? {
                if !scatter_rows(&self.v, &v, &idx)? {
                    return Err(Error::Internal(
                        "overwrite: keys and values have different layouts".into(),
                    ));
                }
                return Ok(());
            }
        }
        // Elsewhere candle's scatter: every (head, row, dim) element of the new rows goes to
        // (head, rows[j], dim). The (h, n, d) index is broadcast on the device from the n row
        // numbers: built on the host it was h * d times larger, and on a GPU its upload
        // dominated the recompute.
        let idx_t = Tensor::from_vec(r, (1, n, 1), self.k.device())?
            .broadcast_as((h, n, d))?
            .contiguous()?;
        self.k
            .scatter_set(&idx_t, &k.to_dtype(self.k.dtype())?.contiguous()?, 1)?;
        self.v
            .scatter_set(&idx_t, &v.to_dtype(self.v.dtype())?.contiguous()?, 1)?;
        Ok(())
    }

    /// K/V of the given rows, (kv_heads, rows, head_dim).
    pub fn gather(&self, rows: &[usize]) -> Result<(Tensor, Tensor)> {
        let idx = self.row_index(rows)?;
        Ok((self.k.index_select(&idx, 1)?, self.v.index_select(&idx, 1)?))
    }

    /// Keys of the given rows, (kv_heads, rows, head_dim).
    pub fn gather_keys(&self, rows: &[usize]) -> Result<Tensor> {
        Ok(self.k.index_select(&self.row_index(rows)?, 1)?)
    }

    /// Values of the given rows, (kv_heads, rows, head_dim).
    pub fn gather_values(&self, rows: &[usize]) -> Result<Tensor> {
        Ok(self.v.index_select(&self.row_index(rows)?, 1)?)
    }

    /// Row indices for index_select on the whole buffer: they are below len, so selecting
    /// from the (contiguous) buffer avoids the strided view keys() returns when there is spare
    /// capacity, which index_select does not take.
    fn row_index(&self, rows: &[usize]) -> Result<Tensor> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        Ok(Tensor::new(idx.as_slice(), self.k.device())?)
    }

    fn sort_by_position(&mut self) -> Result<()> {
        if self.pos.windows(2).all(|w| w[0] < w[1]) {
            return Ok(());
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| self.pos[i]);
        if order.windows(2).any(|w| self.pos[w[0]] == self.pos[w[1]]) {
            return Err(Error::Internal(
                "two KV rows share one position; each position may appear once".into(),
            ));
        }
        let idx: Vec<u32> = order.iter().map(|&r| r as u32).collect();
        let idx_t = Tensor::new(idx.as_slice(), self.k.device())?;
        self.half = None;
        // Indices are below len: select from the whole (contiguous) buffer.
        self.k = self.k.index_select(&idx_t, 1)?;
        self.v = self.v.index_select(&idx_t, 1)?;
        self.pos = order.iter().map(|&i| self.pos[i]).collect();
        Ok(())
    }
}

/// Converts rows r0..r1 of each head of an f32 (h, cap32, d) buffer into dst (h, cap16, d).
/// Returns false if a value is outside f16's finite range.
#[allow(clippy::too_many_arguments)]
fn convert_rows(
    src: &Tensor,
    dst: &mut [f16],
    h: usize,
    cap32: usize,
    cap16: usize,
    d: usize,
    r0: usize,
    r1: usize,
) -> Result<bool> {
    use half::slice::HalfFloatSliceExt;
    let (storage, layout) = src.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Ok(false);
    };
    let Some((off, _)) = layout.contiguous_offsets() else {
        return Ok(false);
    };
    for head in 0..h {
        let s = &data[off + (head * cap32 + r0) * d..off + (head * cap32 + r1) * d];
        // Also catches NaN: f16 cannot hold what f32 has here, so keep reading f32.
        if !s.iter().all(|x| x.abs() <= 65000.0) {
            return Ok(false);
        }
        dst[(head * cap16 + r0) * d..(head * cap16 + r1) * d].convert_from_f32_slice(s);
    }
    Ok(true)
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

    /// [`LayerKv::reserve`] in every layer.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.reserve(extra))
    }

    /// Bytes of every layer's K/V buffers as allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::allocated_bytes).sum()
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

    /// Rows of each layer, to restore with [`KvCache::truncate_to`].
    pub fn layer_lens(&self) -> Vec<usize> {
        self.layers.iter().map(LayerKv::len).collect()
    }

    /// Truncates each layer to its length in `lens` (from [`KvCache::layer_lens`]).
    pub fn truncate_to(&mut self, lens: &[usize]) {
        for (l, &n) in self.layers.iter_mut().zip(lens) {
            l.truncate(n);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One head, head_dim 2; row r holds [r, 10 + r] in K and the negation in V.
    fn rows(pos: &[u32]) -> (Tensor, Tensor) {
        let k: Vec<f32> = pos
            .iter()
            .flat_map(|&p| [p as f32, 10.0 + p as f32])
            .collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let n = pos.len();
        (
            Tensor::from_vec(k, (1, n, 2), &Device::Cpu).unwrap(),
            Tensor::from_vec(v, (1, n, 2), &Device::Cpu).unwrap(),
        )
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn reserve_allocates_once_for_the_rows_to_come() {
        let mut l = LayerKv::empty(1, 2, DType::F32, &Device::Cpu).unwrap();
        let first: Vec<u32> = (0..20).collect();
        let (k, v) = rows(&first);
        l.append(&k, &v, &first).unwrap();
        l.reserve(5).unwrap();
        // 25 rows x 2 dims x K and V x 4 bytes, exactly; appends within it keep the buffer
        // (without reserve the first one would double it to 40 rows).
        assert_eq!(l.allocated_bytes(), 25 * 2 * 2 * 4);
        for p in 20..25 {
            let (k, v) = rows(&[p]);
            l.append(&k, &v, &[p]).unwrap();
        }
        assert_eq!(l.allocated_bytes(), 25 * 2 * 2 * 4);
        assert_eq!(flat(&l.keys().unwrap())[..4], [0.0, 10.0, 1.0, 11.0]);
        assert_eq!(l.positions(), (0..25).collect::<Vec<u32>>());
        // Room already there: nothing moves.
        l.reserve(0).unwrap();
        assert_eq!(l.allocated_bytes(), 25 * 2 * 2 * 4);
    }

    #[test]
    fn truncate_undoes_an_append_and_the_f16_copy_follows() {
        let mut c = KvCache {
            layers: vec![LayerKv::empty(1, 2, DType::F32, &Device::Cpu).unwrap(); 2],
        };
        let (k, v) = rows(&[0, 1, 2]);
        for l in c.layers.iter_mut() {
            l.append(&k, &v, &[0, 1, 2]).unwrap();
            assert_eq!(l.half().unwrap().unwrap().len, 3);
        }
        let before = c.layer_lens();
        // A failed step appended to the first layer only.
        let (k1, v1) = rows(&[3]);
        c.layers[0].append(&k1, &v1, &[3]).unwrap();
        let _ = c.layers[0].half().unwrap();
        c.truncate_to(&before);
        assert_eq!(c.layer_lens(), vec![3, 3]);
        assert_eq!(c.next_position(), 3);
        assert_eq!(c.layers[0].half().unwrap().unwrap().len, 3);
        // The retried step appends at the same place.
        c.layers[0].append(&k1, &v1, &[3]).unwrap();
        assert_eq!(flat(&c.layers[0].keys().unwrap())[6..], [3.0, 13.0]);
    }

    #[test]
    fn row_operations_work_with_spare_capacity() {
        let mut layer = LayerKv::with_capacity(1, 8, 2, DType::F32, &Device::Cpu).unwrap();
        let (k, v) = rows(&[1, 3, 5]);
        layer.append(&k, &v, &[1, 3, 5]).unwrap();
        // A row before the others: appended, then re-sorted.
        let (k0, v0) = rows(&[0]);
        layer.append(&k0, &v0, &[0]).unwrap();
        assert_eq!(layer.positions(), &[0, 1, 3, 5]);
        assert_eq!(
            flat(&layer.keys().unwrap()),
            [0., 10., 1., 11., 3., 13., 5., 15.]
        );
        let (gk, gv) = layer.gather(&[3, 1]).unwrap();
        assert_eq!(flat(&gk), [5., 15., 1., 11.]);
        assert_eq!(flat(&gv), [-5., -15., -1., -11.]);
        // Overwrite rows 1 and 3 (positions 1 and 5) in place.
        let (nk, nv) = rows(&[100, 200]);
        layer.overwrite(&[1, 3], &nk, &nv).unwrap();
        assert_eq!(
            flat(&layer.keys().unwrap()),
            [0., 10., 100., 110., 3., 13., 200., 210.]
        );
        assert_eq!(flat(&layer.values().unwrap())[2..4], [-100., -110.]);
        assert!(layer
            .overwrite(
                &[4],
                &nk.narrow(1, 0, 1).unwrap(),
                &nv.narrow(1, 0, 1).unwrap()
            )
            .is_err());
        let kept = layer.select(&[0, 3]).unwrap();
        assert_eq!(kept.positions(), &[0, 5]);
        assert_eq!(flat(&kept.keys().unwrap()), [0., 10., 200., 210.]);
    }

    #[test]
    fn a_buffer_with_room_takes_appends_in_place_and_bad_buffers_are_errors() {
        // Room for 5 rows, the first 2 valid (positions 2 and 4).
        let (k, v) = rows(&[2, 4, 0, 0, 0]);
        let mut layer = LayerKv::from_buffer(k.clone(), v.clone(), vec![2, 4]).unwrap();
        assert_eq!(flat(&layer.keys().unwrap()), [2., 12., 4., 14.]);
        let (k9, v9) = rows(&[9]);
        layer.append(&k9, &v9, &[9]).unwrap();
        assert_eq!(layer.positions(), &[2, 4, 9]);
        assert_eq!(
            flat(&layer.values().unwrap()),
            [-2., -12., -4., -14., -9., -19.]
        );
        // More positions than room, unsorted positions, K and V of different shapes.
        assert!(LayerKv::from_buffer(k.clone(), v.clone(), (0..6).collect()).is_err());
        assert!(LayerKv::from_buffer(k.clone(), v.clone(), vec![4, 2]).is_err());
        assert!(LayerKv::from_buffer(k.clone(), v.narrow(1, 0, 4).unwrap(), vec![1]).is_err());
    }
}
