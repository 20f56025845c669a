//! The elementwise glue around the fused projections, one function per op that picks the
//! kernel: splitting the Q|K|V output into per-head layouts with bias and RoPE applied,
//! SiLU(gate) * up, and the residual add with RMS norm. Each takes samkv's CUDA kernel
//! (`super::cuda`) or its one-pass CPU kernel here where the inputs suit them, else candle's
//! ops; callers just call it. The CPU kernels replace several candle ops and copies (narrow,
//! reshape, transpose, contiguous, rope, silu, mul) with the same float operations in the
//! same order, so results are bit-identical to the op-by-op path.

use candle_core::Tensor;
use rayon::prelude::*;

use super::linear::{with_cpu_f32, OutBuf};
use super::rope::{Rope, RopeLayout};
use crate::Result;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// y: (t, (h + 2 hkv) d) = [Q | K | V] per row, `bias` the same width. Returns q (h, t, d) and
/// k (hkv, t, d) rotated by `rope` with the per-row tables cos/sin (t, d/2), and v (hkv, t, d).
#[allow(clippy::too_many_arguments)]
pub(crate) fn qkv_rope(
    y: &Tensor,
    bias: Option<&Tensor>,
    rope: &Rope,
    (cos, sin): &(Tensor, Tensor),
    h: usize,
    hkv: usize,
    d: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() {
        if let Some(out) = crate::cuda::qkv_rope(
            y,
            bias,
            cos,
            sin,
            rope.layout == RopeLayout::Interleaved,
            h,
            hkv,
            d,
        )? {
            return Ok(out);
        }
    }
    if y.device().is_cpu() {
        if let Some(out) = qkv_rope_cpu(y, bias, cos, sin, rope.layout, h, hkv, d)? {
            return Ok(out);
        }
    }
    let (q, k, v) = split_qkv(y, bias, h, hkv, d)?;
    let (q, k) = (rope.apply(&q, cos, sin)?, rope.apply(&k, cos, sin)?);
    Ok((q, k, v.contiguous()?))
}

/// y as in [`qkv_rope`] to q (h, t, d), k and v (hkv, t, d) with candle's ops, unrotated.
pub(crate) fn split_qkv(
    y: &Tensor,
    bias: Option<&Tensor>,
    h: usize,
    hkv: usize,
    d: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let t = y.dim(0)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y.clone(),
    };
    let part = |at: usize, heads: usize| -> Result<Tensor> {
        let p = y.narrow(1, at * d, heads * d)?;
        Ok(p.reshape((t, heads, d))?.transpose(0, 1)?)
    };
    Ok((part(0, h)?, part(h, hkv)?, part(h + hkv, hkv)?))
}

/// [`qkv_rope`] in one pass over rows; None when an input is not a contiguous f32 CPU tensor.
#[allow(clippy::too_many_arguments)]
fn qkv_rope_cpu(
    y: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    layout: RopeLayout,
    h: usize,
    hkv: usize,
    d: usize,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let t = y.dim(0)?;
    let width = (h + 2 * hkv) * d;
    if y.dims() != [t, width] || cos.dims() != [t, d / 2] || !d.is_multiple_of(2) {
        return Ok(None);
    }
    let bias_v = match bias {
        Some(b) => match with_cpu_f32(b, |s| s.to_vec()) {
            Some(v) if v.len() == width => Some(v),
            _ => return Ok(None),
        },
        None => None,
    };
    let res = with_cpu_f32(y, |ys| {
        with_cpu_f32(cos, |cs| {
            with_cpu_f32(sin, |ss| {
                let (mut q, mut k, mut v) = (
                    OutBuf::new(h * t * d),
                    OutBuf::new(hkv * t * d),
                    OutBuf::new(hkv * t * d),
                );
                let ptrs = [SendPtr(q.ptr()), SendPtr(k.ptr()), SendPtr(v.ptr())];
                let work = |r0: usize| {
                    let mut row = vec![0f32; width];
                    for r in r0..(r0 + ROWS_PER_TASK).min(t) {
                        let src = &ys[r * width..(r + 1) * width];
                        match &bias_v {
                            Some(b) => row
                                .iter_mut()
                                .zip(src.iter().zip(b))
                                .for_each(|(o, (x, b))| *o = x + b),
                            None => row.copy_from_slice(src),
                        }
                        let c = &cs[r * d / 2..(r + 1) * d / 2];
                        let s = &ss[r * d / 2..(r + 1) * d / 2];
                        for head in 0..h + 2 * hkv {
                            let x = &row[head * d..(head + 1) * d];
                            let (dst, idx, rotate) = if head < h {
                                (ptrs[0], head, true)
                            } else if head < h + hkv {
                                (ptrs[1], head - h, true)
                            } else {
                                (ptrs[2], head - h - hkv, false)
                            };
                            // SAFETY: row r of head idx (d elements) lies in its own buffer and is
                            // written by this task only.
                            unsafe {
                                let out = dst.at((idx * t + r) * d);
                                if rotate {
                                    rope_row(x, c, s, layout, out);
                                } else {
                                    std::ptr::copy_nonoverlapping(x.as_ptr(), out, d);
                                }
                            }
                        }
                    }
                };
                if t >= 2 * ROWS_PER_TASK {
                    (0..t)
                        .step_by(ROWS_PER_TASK)
                        .collect::<Vec<_>>()
                        .into_par_iter()
                        .for_each(work);
                } else {
                    (0..t).step_by(ROWS_PER_TASK).for_each(work);
                }
                // SAFETY: the tasks cover all rows, and each row writes every head of q, k, v.
                unsafe { (q.assume_init(), k.assume_init(), v.assume_init()) }
            })
        })
    });
    let Some(Some(Some((q, k, v)))) = res else {
        return Ok(None);
    };
    let dev = y.device();
    Ok(Some((
        Tensor::from_vec(q, (h, t, d), dev)?,
        Tensor::from_vec(k, (hkv, t, d), dev)?,
        Tensor::from_vec(v, (hkv, t, d), dev)?,
    )))
}

/// candle_nn's rope_i / rope for one row, same expressions.
///
/// # Safety
/// `out` must be valid for writing x.len() elements.
unsafe fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], layout: RopeLayout, out: *mut f32) {
    let half = x.len() / 2;
    match layout {
        RopeLayout::Interleaved => {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                out.add(2 * i).write(a * cos[i] - b * sin[i]);
                out.add(2 * i + 1).write(a * sin[i] + b * cos[i]);
            }
        }
        RopeLayout::SplitHalf => {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                out.add(i).write(a * cos[i] - b * sin[i]);
                out.add(i + half).write(a * sin[i] + b * cos[i]);
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Going through a method makes closures capture the whole (Sync) wrapper.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// y: (t, 2 f) = [gate | up] per row. Returns silu(gate) * up, (t, f).
pub(crate) fn silu_mul(y: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() {
        if let Some(out) = crate::cuda::silu_mul(y)? {
            return Ok(out);
        }
    }
    if y.device().is_cpu() {
        if let Some(out) = silu_mul_cpu(y)? {
            return Ok(out);
        }
    }
    let f = y.dim(1)? / 2;
    Ok((candle_nn::ops::silu(&y.narrow(1, 0, f)?)? * y.narrow(1, f, f)?)?)
}

/// [`silu_mul`] in one pass, computed as candle's `silu` (v / (1 + exp(-v))) followed by the
/// product; None when y is not a contiguous f32 CPU tensor.
fn silu_mul_cpu(y: &Tensor) -> Result<Option<Tensor>> {
    let (t, w) = y.dims2()?;
    let f = w / 2;
    let out = with_cpu_f32(y, |ys| {
        let mut buf = OutBuf::new(t * f);
        let out = SendPtr(buf.ptr());
        let work = |(r, src): (usize, &[f32])| {
            let (g, u) = src.split_at(f);
            for (j, (&g, &u)) in g.iter().zip(u).enumerate() {
                // SAFETY: element (r, j) of the (t, f) buffer, written once.
                unsafe { out.at(r * f + j).write(g / (1.0 + (-g).exp()) * u) };
            }
        };
        if t >= 2 * ROWS_PER_TASK {
            ys.par_chunks(w)
                .enumerate()
                .with_min_len(ROWS_PER_TASK)
                .for_each(work);
        } else {
            ys.chunks(w).enumerate().for_each(work);
        }
        // SAFETY: every row r < t and column j < f was written above.
        unsafe { buf.assume_init() }
    });
    match out {
        Some(o) => Ok(Some(Tensor::from_vec(o, (t, f), y.device())?)),
        None => Ok(None),
    }
}

/// The residual add and the RMS norm after it: `(x + a, rms_norm(x + a) * w)`. On CUDA one
/// kernel reads x and a once (`crate::cuda::add_rms_norm`); elsewhere candle's ops.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::add_rms_norm(x, a, w, eps)? {
        return Ok(out);
    }
    let sum = (x + a)?;
    let h = candle_nn::ops::rms_norm(&sum, w, eps)?;
    Ok((sum, h))
}
