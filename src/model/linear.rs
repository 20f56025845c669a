//! Projections `x @ W^T + b`, possibly several of the same input fused (Q/K/V, gate/up), held
//! quantized, dense, or both (then chosen by row count).

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Module, Storage, Tensor};

use super::qmm::{self, Packed};
use crate::Result;

/// Rows at or below which a projection uses the quantized kernel (decode, short questions);
/// above it the dense matmul is faster on CPU (measured in docs/PERFORMANCE.md).
pub(crate) const QUANT_MAX_ROWS: usize = 8;

/// A quantized weight: repacked for the VNNI kernel where this CPU and the type allow, else
/// candle's own kernel.
pub(crate) enum Quant {
    Packed(Packed),
    Candle(QMatMul),
}

pub struct Linear {
    /// One entry per fused part (empty when only dense weights are held).
    quant: Vec<Quant>,
    /// W^T of all parts side by side, (in, sum of outs), contiguous.
    dense_t: Option<Tensor>,
    /// Bias of all parts side by side.
    bias: Option<Tensor>,
    /// Output width of each part.
    outs: Vec<usize>,
}

/// An f32 output buffer that kernels write completely, allocated without zero-filling (the
/// large activation buffers of a prefill were otherwise memset just to be overwritten).
pub(crate) struct OutBuf(Vec<std::mem::MaybeUninit<f32>>);

impl OutBuf {
    pub(crate) fn new(n: usize) -> Self {
        let mut v = Vec::with_capacity(n);
        // SAFETY: MaybeUninit elements need no initialization.
        unsafe { v.set_len(n) };
        Self(v)
    }

    pub(crate) fn ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr() as *mut f32
    }

    /// # Safety
    /// Every element must have been written through [`OutBuf::ptr`].
    pub(crate) unsafe fn assume_init(self) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: same allocation, length and capacity; initialized per the caller's contract.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor; None for other devices/dtypes/layouts.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let (a, b) = layout.contiguous_offsets()?;
            Some(f(&v[a..b]))
        }
        _ => None,
    }
}

impl Linear {
    /// Quantized parts (any mix of types) with optional dense copy; `keep_quant` false drops
    /// the quantized form after dequantizing.
    pub(crate) fn from_quantized(
        parts: Vec<QTensor>,
        biases: Vec<Option<Tensor>>,
        dense_dtype: Option<DType>,
        keep_quant: bool,
    ) -> Result<Self> {
        let outs: Vec<usize> = parts.iter().map(|q| q.shape().dims()[0]).collect();
        let dense_t = match dense_dtype {
            Some(dt) => {
                let ws: Vec<Tensor> = parts
                    .iter()
                    .map(|q| Ok(q.dequantize(&q.device())?.to_dtype(dt)?.t()?))
                    .collect::<Result<_>>()?;
                Some(Tensor::cat(&ws, 1)?.contiguous()?)
            }
            None => None,
        };
        let bias = fuse_bias(
            &biases,
            &outs,
            dense_t.as_ref().map_or(DType::F32, |t| t.dtype()),
        )?;
        let quant = if keep_quant {
            // One packed matrix for all parts when they share a type: one kernel call.
            let refs: Vec<&QTensor> = parts.iter().collect();
            match (parts.len() > 1)
                .then(|| Packed::from_qtensors(&refs))
                .flatten()
            {
                Some(p) => vec![Quant::Packed(p)],
                None => parts
                    .into_iter()
                    .map(|q| match Packed::from_qtensors(&[&q]) {
                        Some(p) => Ok(Quant::Packed(p)),
                        None => Ok(Quant::Candle(QMatMul::from_qtensor(q)?)),
                    })
                    .collect::<Result<_>>()?,
            }
        } else {
            Vec::new()
        };
        Ok(Self {
            quant,
            dense_t,
            bias,
            outs,
        })
    }

    /// Dense parts given as (out, in) weights.
    pub(crate) fn from_dense(ws: &[Tensor], biases: Vec<Option<Tensor>>) -> Result<Self> {
        let outs: Vec<usize> = ws
            .iter()
            .map(|w| w.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let ts: Vec<Tensor> = ws
            .iter()
            .map(|w| w.t())
            .collect::<candle_core::Result<_>>()?;
        let dense_t = Tensor::cat(&ts, 1)?.contiguous()?;
        let bias = fuse_bias(&biases, &outs, dense_t.dtype())?;
        Ok(Self {
            quant: Vec::new(),
            dense_t: Some(dense_t),
            bias,
            outs,
        })
    }

    /// Fused bias of all parts, if any part has one.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Output of each part with bias, (rows, out_i); parts of a fused projection are views.
    pub(crate) fn forward_parts(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut y = self.matmul_fused(x)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if self.outs.len() == 1 {
            return Ok(vec![y]);
        }
        let mut off = 0;
        let mut parts = Vec::with_capacity(self.outs.len());
        for &n in &self.outs {
            parts.push(y.narrow(1, off, n)?);
            off += n;
        }
        Ok(parts)
    }

    /// Single-part output with bias, (rows, out).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_parts(x)?.swap_remove(0))
    }

    /// Single-part output with bias, the kernel chosen as for `pass_rows` rows.
    pub(crate) fn forward_as(&self, x: &Tensor, pass_rows: usize) -> Result<Tensor> {
        let y = self.matmul_fused_as(x, pass_rows)?;
        match &self.bias {
            Some(b) if self.outs.len() == 1 => Ok(y.broadcast_add(b)?),
            Some(b) => Ok(y.broadcast_add(b)?.narrow(1, 0, self.outs[0])?),
            None => Ok(y.narrow(1, 0, self.outs[0])?),
        }
    }

    /// All parts side by side without bias, (rows, sum of outs).
    pub(crate) fn matmul_fused(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul_fused_as(x, x.dim(0)?)
    }

    /// [`Linear::matmul_fused`], choosing the kernel as for a pass of `pass_rows` rows: the
    /// last row of a prompt must get the arithmetic of the prompt it ends, not decode's.
    pub(crate) fn matmul_fused_as(&self, x: &Tensor, pass_rows: usize) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let use_quant = !self.quant.is_empty()
            && (self.dense_t.is_none() || rows.max(pass_rows) <= QUANT_MAX_ROWS);
        if !use_quant {
            let w = self
                .dense_t
                .as_ref()
                .expect("a Linear holds dense weights when it has no quantized ones");
            return Ok(x.matmul(w)?);
        }
        let x_c = x.contiguous()?;
        let packed: Vec<&Packed> = self
            .quant
            .iter()
            .filter_map(|q| match q {
                Quant::Packed(p) => Some(p),
                Quant::Candle(_) => None,
            })
            .collect();
        let mut outs: Vec<Tensor> = Vec::with_capacity(self.quant.len());
        if packed.len() == self.quant.len() {
            // All packed: one activation quantization and one parallel region for all parts.
            if let Some(ys) = with_cpu_f32(&x_c, |xs| qmm::matmul(&packed, xs, rows)) {
                for (y, p) in ys.into_iter().zip(&packed) {
                    outs.push(Tensor::from_vec(y, (rows, p.n()), x.device())?);
                }
            }
        }
        if outs.is_empty() {
            for q in &self.quant {
                outs.push(match q {
                    Quant::Candle(m) => m.forward(&x_c)?,
                    Quant::Packed(p) => {
                        let y = with_cpu_f32(&x_c, |xs| qmm::matmul(&[p], xs, rows).swap_remove(0))
                            .expect("packed weights exist only on CPU with f32 activations");
                        Tensor::from_vec(y, (rows, p.n()), x.device())?
                    }
                });
            }
        }
        Ok(if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat(&outs, 1)?
        })
    }
}

/// Biases of fused parts side by side; zeros for parts without one; None if none has one.
fn fuse_bias(biases: &[Option<Tensor>], outs: &[usize], dtype: DType) -> Result<Option<Tensor>> {
    if biases.iter().all(Option::is_none) {
        return Ok(None);
    }
    let device = biases
        .iter()
        .flatten()
        .next()
        .map(|b| b.device().clone())
        .expect("one bias");
    let parts: Vec<Tensor> = biases
        .iter()
        .zip(outs)
        .map(|(b, &n)| match b {
            Some(b) => Ok(b.to_dtype(dtype)?),
            None => Ok(Tensor::zeros(n, dtype, &device)?),
        })
        .collect::<Result<_>>()?;
    Ok(Some(Tensor::cat(&parts, 0)?))
}
