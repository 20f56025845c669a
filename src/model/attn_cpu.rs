//! Attention on CPU for f32 activations: per (KV head, block of queries), scores come from one
//! GEMM over the keys that block can see, a softmax over each query's visible prefix (keys
//! are sorted by position, so what a query sees is a prefix; no mask tensor), and one GEMM
//! with the values, written straight into the output rows. Blocks run in parallel; the score
//! block stays in cache; K/V are read in place from the cache buffer (strided, no copy).

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use super::linear::OutBuf;
use crate::Result;

thread_local! {
    /// Per-thread score block, reused across calls (allocating it per block cost a memset).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Queries per block: small enough that a block's scores for a 4k-key prefix (64 x 4096 x 4
/// bytes per head) stay in L2, large enough for efficient GEMMs.
const QUERY_BLOCK: usize = 64;

struct View<'a, T = f32> {
    data: &'a [T],
    /// element strides of dims (head, row); the last dim is contiguous
    s_head: usize,
    s_row: usize,
}

/// A 3-D f32 CPU tensor with a contiguous last dim, viewed in place.
fn view<'a>(storage: &'a Storage, t: &Tensor) -> Option<View<'a>> {
    let Storage::Cpu(CpuStorage::F32(data)) = storage else {
        return None;
    };
    let l = t.layout();
    let st = l.stride();
    if st.len() != 3 || (st[2] != 1 && t.dim(2).ok()? > 1) {
        return None;
    }
    Some(View {
        data: &data[l.start_offset()..],
        s_head: st[0],
        s_row: st[1],
    })
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// None when the inputs are not f32 CPU tensors with contiguous rows (the caller then uses
/// candle ops). Shapes as in [`super::attend`].
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    qpos: &[u32],
    kpos: &[u32],
) -> Result<Option<Tensor>> {
    let (h, tq, d) = q.dims3()?;
    let (hkv, tk, _) = k.dims3()?;
    if tq == 0 || tk == 0 || h % hkv != 0 {
        return Ok(None);
    }
    let (qs, _) = q.storage_and_layout();
    let (ks, _) = k.storage_and_layout();
    let (vs, _) = v.storage_and_layout();
    let (Some(qv), Some(kv), Some(vv)) = (view(&qs, q), view(&ks, k), view(&vs, v)) else {
        return Ok(None);
    };
    let group = h / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    // Visible prefix length of each query.
    let vis: Vec<usize> = qpos
        .iter()
        .map(|&p| kpos.partition_point(|&kp| kp <= p))
        .collect();
    #[cfg(target_arch = "x86_64")]
    if tq == 1 && (d == 64 || d == 128) && super::qmm::available() {
        let mut out = vec![0f32; h * d];
        decode(&qv, &kv, &vv, h, hkv, d, vis[0], scale, &mut out);
        drop((qs, ks, vs));
        return Ok(Some(Tensor::from_vec(out, (1, h * d), q.device())?));
    }
    let mut buf = OutBuf::new(tq * h * d);
    let optr = OutPtr(buf.ptr());
    let nblocks = tq.div_ceil(QUERY_BLOCK);
    let tasks: Vec<(usize, usize)> = (0..hkv)
        .flat_map(|g| (0..nblocks).map(move |b| (g, b)))
        .collect();
    let run = |&(g, b): &(usize, usize)| {
        let i0 = b * QUERY_BLOCK;
        let n = QUERY_BLOCK.min(tq - i0);
        let vis_b = &vis[i0..i0 + n];
        let c = vis_b.iter().copied().max().unwrap_or(0);
        SCORES.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < n * c.max(1) {
                buf.resize(n * c.max(1), 0.0);
            }
            let scores = &mut buf[..n * c.max(1)];
            for hh in g * group..(g + 1) * group {
                // SAFETY: each task writes rows i0..i0+n of its own heads' columns of `out`; all
                // pointers stay inside the views' buffers (checked by the dims above).
                unsafe {
                    head_block(
                        &qv, &kv, &vv, hh, g, i0, n, c, d, h, scale, vis_b, scores, optr,
                    );
                }
            }
        });
    };
    if tasks.len() == 1 || tq * tk < 1 << 14 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
    drop((qs, ks, vs));
    // SAFETY: tasks cover every (KV head, query block); each writes all rows of all heads of
    // its group (zeros where no key is visible).
    let out = unsafe { buf.assume_init() };
    Ok(Some(Tensor::from_vec(out, (tq, h * d), q.device())?))
}

#[allow(clippy::too_many_arguments)]
unsafe fn head_block(
    q: &View,
    k: &View,
    v: &View,
    hh: usize,
    g: usize,
    i0: usize,
    n: usize,
    c: usize,
    d: usize,
    h: usize,
    scale: f32,
    vis: &[usize],
    scores: &mut [f32],
    out: OutPtr,
) {
    let dst = out.0.add(i0 * h * d + hh * d);
    if c == 0 {
        // No visible key: zero output rows.
        for i in 0..n {
            std::ptr::write_bytes(dst.add(i * h * d), 0, d);
        }
        return;
    }
    let qp = q.data.as_ptr().add(hh * q.s_head + i0 * q.s_row);
    let kp = k.data.as_ptr().add(g * k.s_head);
    let vp = v.data.as_ptr().add(g * v.s_head);
    // scores (n, c) = scale * Q (n, d) . K^T (d, c)
    gemm::gemm(
        n,
        c,
        d,
        scores.as_mut_ptr(),
        1,
        c as isize,
        false,
        qp,
        1,
        q.s_row as isize,
        kp,
        k.s_row as isize,
        1,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
    for (row, &vi) in scores.chunks_exact_mut(c).zip(vis) {
        softmax_prefix(row, vi);
    }
    // out rows (n, d), row stride h*d = P (n, c) . V (c, d)
    gemm::gemm(
        n,
        d,
        c,
        dst,
        1,
        (h * d) as isize,
        false,
        scores.as_ptr(),
        1,
        c as isize,
        vp,
        1,
        v.s_row as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Element types K/V rows are read from in decode: the cache's f32 rows or its f16 copy.
pub(crate) trait KvElem: Copy + Send + Sync {
    /// 16 consecutive values widened to f32.
    ///
    /// # Safety
    /// 16 elements must be readable at p; AVX-512F must be available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for half::f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// One decode step over the f16 copy of a layer's cache: q (heads, 1, d) attends to the first
/// `vis` rows of K/V (kv_heads, cap, d). None when the shapes or CPU do not suit the kernel.
pub(crate) fn decode_half(
    q: &Tensor,
    k: &[half::f16],
    v: &[half::f16],
    cap: usize,
    vis: usize,
) -> Result<Option<Tensor>> {
    let (h, tq, d) = q.dims3()?;
    let hkv = k.len() / (cap * d).max(1);
    #[cfg(target_arch = "x86_64")]
    if tq == 1 && (d == 64 || d == 128) && hkv > 0 && h % hkv == 0 && super::qmm::available() {
        let (qs, _) = q.storage_and_layout();
        let Some(qv) = view(&qs, q) else {
            return Ok(None);
        };
        let kv = View {
            data: k,
            s_head: cap * d,
            s_row: d,
        };
        let vv = View {
            data: v,
            s_head: cap * d,
            s_row: d,
        };
        let mut out = vec![0f32; h * d];
        decode(
            &qv,
            &kv,
            &vv,
            h,
            hkv,
            d,
            vis,
            1.0 / (d as f32).sqrt(),
            &mut out,
        );
        drop(qs);
        return Ok(Some(Tensor::from_vec(out, (1, h * d), q.device())?));
    }
    let _ = (h, tq, d, hkv, v, vis);
    Ok(None)
}

/// Keys per decode task: the cache is split so both cores work even with 2-3 KV heads.
const DECODE_CHUNK: usize = 512;

/// One query (decode step): per (KV head, chunk of keys) a partial softmax (max, sum,
/// unnormalized output) for the heads of the group, merged afterwards. Dot products and the
/// weighted sum of values use AVX-512 directly: GEMM calls with one row are gemv-slow.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn decode<T: KvElem>(
    q: &View,
    k: &View<T>,
    v: &View<T>,
    h: usize,
    hkv: usize,
    d: usize,
    vis: usize,
    scale: f32,
    out: &mut [f32],
) {
    if vis == 0 {
        return;
    }
    let group = h / hkv;
    let nchunks = vis.div_ceil(DECODE_CHUNK);
    let tasks: Vec<(usize, usize)> = (0..hkv)
        .flat_map(|g| (0..nchunks).map(move |c| (g, c)))
        .collect();
    // Per task: for each head of the group, (max, sum, d outputs).
    let stride = 2 + d;
    let run = |&(g, c): &(usize, usize)| -> Vec<f32> {
        let j0 = c * DECODE_CHUNK;
        let n = (j0 + DECODE_CHUNK).min(vis) - j0;
        let mut part = vec![0f32; group * stride];
        let mut sc = vec![0f32; group * n];
        // SAFETY: AVX-512F checked by the caller; indices within the views (dims checked).
        unsafe {
            let kp = k.data.as_ptr().add(g * k.s_head + j0 * k.s_row);
            let vp = v.data.as_ptr().add(g * v.s_head + j0 * v.s_row);
            let mut r0 = 0;
            while r0 < group {
                let rows = (group - r0).min(4);
                let qp = q.data.as_ptr().add((g * group + r0) * q.s_head);
                let scr = &mut sc[r0 * n..(r0 + rows) * n];
                match d {
                    64 => scores_avx512::<4, T>(qp, q.s_head, rows, kp, k.s_row, n, scale, scr),
                    _ => scores_avx512::<8, T>(qp, q.s_head, rows, kp, k.s_row, n, scale, scr),
                }
                for (r, row) in scr.chunks_exact_mut(n).enumerate() {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum = exp_sub_sum_avx512(row, max);
                    part[(r0 + r) * stride] = max;
                    part[(r0 + r) * stride + 1] = sum;
                }
                let o = part[r0 * stride..].as_mut_ptr().add(2);
                match d {
                    64 => weighted_rows_avx512::<4, T>(scr, rows, n, vp, v.s_row, o, stride),
                    _ => weighted_rows_avx512::<8, T>(scr, rows, n, vp, v.s_row, o, stride),
                }
                r0 += rows;
            }
        }
        part
    };
    let parts: Vec<Vec<f32>> = if tasks.len() * vis < 4096 || tasks.len() == 1 {
        tasks.iter().map(run).collect()
    } else {
        tasks.par_iter().map(run).collect()
    };
    for g in 0..hkv {
        for r in 0..group {
            let ps: Vec<&[f32]> = (0..nchunks)
                .map(|c| &parts[g * nchunks + c][r * stride..(r + 1) * stride])
                .collect();
            let m = ps.iter().map(|p| p[0]).fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f32> = ps.iter().map(|p| (p[0] - m).exp()).collect();
            let total: f32 = ps.iter().zip(&w).map(|(p, w)| p[1] * w).sum();
            let dst = &mut out[(g * group + r) * d..(g * group + r + 1) * d];
            for (p, w) in ps.iter().zip(&w) {
                let f = w / total;
                for (o, x) in dst.iter_mut().zip(&p[2..]) {
                    *o += f * x;
                }
            }
        }
    }
}

/// scores[r * n + j] = scale * q_r . k_j for `rows` (<= 4) query heads (row stride q_s) and
/// n keys (row stride k_s); DC = head_dim / 16. Each key is loaded once for all rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx512<const DC: usize, T: KvElem>(
    q: *const f32,
    q_s: usize,
    rows: usize,
    k: *const T,
    k_s: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut qv = [[_mm512_setzero_ps(); DC]; 4];
    for (r, qr) in qv.iter_mut().enumerate().take(rows) {
        for (c, x) in qr.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(q.add(r * q_s + 16 * c));
        }
    }
    for j in 0..n {
        let kp = k.add(j * k_s);
        let mut kv = [_mm512_setzero_ps(); DC];
        for (c, x) in kv.iter_mut().enumerate() {
            *x = T::load16(kp.add(16 * c));
        }
        for (r, qr) in qv.iter().enumerate().take(rows) {
            let mut acc = _mm512_mul_ps(qr[0], kv[0]);
            for c in 1..DC {
                acc = _mm512_fmadd_ps(qr[c], kv[c], acc);
            }
            *scores.get_unchecked_mut(r * n + j) = _mm512_reduce_add_ps(acc) * scale;
        }
    }
}

/// out_r[..16 * DC] = sum_j w[r * n + j] * v_j for `rows` (<= 4) rows; out_r at out + r * out_s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_rows_avx512<const DC: usize, T: KvElem>(
    w: &[f32],
    rows: usize,
    n: usize,
    v: *const T,
    v_s: usize,
    out: *mut f32,
    out_s: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); DC]; 4];
    for j in 0..n {
        let vp = v.add(j * v_s);
        let mut vv = [_mm512_setzero_ps(); DC];
        for (c, x) in vv.iter_mut().enumerate() {
            *x = T::load16(vp.add(16 * c));
        }
        for (r, ar) in acc.iter_mut().enumerate().take(rows) {
            let p = _mm512_set1_ps(*w.get_unchecked(r * n + j));
            for c in 0..DC {
                ar[c] = _mm512_fmadd_ps(p, vv[c], ar[c]);
            }
        }
    }
    for (r, ar) in acc.iter().enumerate().take(rows) {
        for (c, x) in ar.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * out_s + 16 * c), *x);
        }
    }
}

/// Softmax over row[..vis]; row[vis..] (keys after this query) set to 0.
fn softmax_prefix(row: &mut [f32], vis: usize) {
    let (live, dead) = row.split_at_mut(vis);
    dead.fill(0.0);
    if live.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::qmm::available() {
        // SAFETY: AVX-512F checked.
        unsafe {
            let max = max_avx512(live);
            let sum = exp_sub_sum_avx512(live, max);
            scale_avx512(live, 1.0 / sum);
        }
        return;
    }
    let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_sub_sum(live, max);
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_avx512(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < x.len() {
        let rem = x.len() - i;
        let mask: __mmask16 = if rem >= 16 {
            0xFFFF
        } else {
            (1u32 << rem) as u16 - 1
        };
        m = _mm512_mask_max_ps(m, mask, m, _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i)));
        i += 16;
    }
    _mm512_reduce_max_ps(m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_avx512(x: &mut [f32], s: f32) {
    use std::arch::x86_64::*;
    let vs = _mm512_set1_ps(s);
    let mut i = 0;
    while i < x.len() {
        let rem = x.len() - i;
        let mask: __mmask16 = if rem >= 16 {
            0xFFFF
        } else {
            (1u32 << rem) as u16 - 1
        };
        let p = x.as_mut_ptr().add(i);
        _mm512_mask_storeu_ps(p, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, p), vs));
        i += 16;
    }
}

/// x <- exp(x - max) in place; returns the sum.
fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::qmm::available() {
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { exp_sub_sum_avx512(x, max) };
    }
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        s += *v;
    }
    s
}

/// exp via 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial (about 1 ulp),
/// scaled with `vscalefps`; inputs below -87 give (nearly) 0 as wanted for softmax.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sub_sum_avx512(x: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let vmax = _mm512_set1_ps(max);
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let ln2_hi = _mm512_set1_ps(0.693_145_75);
    let ln2_lo = _mm512_set1_ps(1.428_606_8e-6);
    let lo = _mm512_set1_ps(-87.0);
    let c = [
        1.0f32 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .map(|v| _mm512_set1_ps(v));
    let mut acc = _mm512_setzero_ps();
    let n = x.len();
    let mut i = 0;
    while i < n {
        let rem = n - i;
        let mask: __mmask16 = if rem >= 16 {
            0xFFFF
        } else {
            (1u32 << rem) as u16 - 1
        };
        let p = x.as_mut_ptr().add(i);
        let v = _mm512_maskz_loadu_ps(mask, p);
        let t = _mm512_max_ps(_mm512_sub_ps(v, vmax), lo);
        let k = _mm512_roundscale_ps(
            _mm512_mul_ps(t, log2e),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, t));
        let mut y = c[0];
        for ci in &c[1..] {
            y = _mm512_fmadd_ps(y, r, *ci);
        }
        let e = _mm512_scalef_ps(y, k);
        _mm512_mask_storeu_ps(p, mask, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(mask, e));
        i += 16;
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap()
    }

    #[test]
    fn exp_matches_libm() {
        let mut xs: Vec<f32> = (0..1000).map(|i| -90.0 + i as f32 * 0.09).collect();
        let want: Vec<f32> = xs.iter().map(|&x| (x - 0.5).exp()).collect();
        let sum = exp_sub_sum(&mut xs, 0.5);
        for (a, b) in xs.iter().zip(&want) {
            assert!((a - b).abs() <= 4e-7 * b.abs() + 1e-37, "{a} vs {b}");
        }
        assert!((sum - want.iter().sum::<f32>()).abs() < 1e-5 * sum);
    }

    /// The blocked kernel against candle ops on GQA shapes, strided K/V (a cache buffer with
    /// spare capacity), position gaps, unsorted queries and queries that see no key (zeros).
    #[test]
    fn blocked_kernel_matches_ops() {
        let dev = Device::Cpu;
        let (h, hkv, d, tq, tk) = (6, 2, 32, 150, 300);
        let q = Tensor::randn(0f32, 1.0, (h, tq, d), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (hkv, tk + 40, d), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (hkv, tk + 40, d), &dev).unwrap();
        let k = kbuf.narrow(1, 0, tk).unwrap();
        let v = vbuf.narrow(1, 0, tk).unwrap();
        let kpos: Vec<u32> = (0..tk as u32).map(|i| 10 + 2 * i).collect();
        let mut qpos: Vec<u32> = (0..tq as u32).map(|i| 4 * i + 11).rev().collect();
        let ours = attend(&q, &k, &v, &qpos, &kpos).unwrap().unwrap();
        let reference = super::super::attention::attend_ops(&q, &k, &v, &qpos, &kpos).unwrap();
        assert_eq!(ours.dims(), &[tq, h * d]);
        let diff = max_abs_diff(&ours, &reference);
        assert!(diff < 1e-5, "max diff {diff}");
        // Keys all after the query: no visible key gives a zero row, not NaN.
        qpos[7] = 5;
        let ours = attend(&q, &k, &v, &qpos, &kpos).unwrap().unwrap();
        let row = ours.get(7).unwrap().to_vec1::<f32>().unwrap();
        assert!(row.iter().all(|&x| x == 0.0), "{row:?}");
        assert!(ours
            .get(8)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite() && *x != 0.0));
    }

    /// One query (the decode kernel, key chunks merged) against candle ops.
    #[test]
    fn decode_kernel_matches_ops() {
        let dev = Device::Cpu;
        for (h, hkv, d, tk) in [(9, 3, 64, 1300), (14, 2, 64, 700), (4, 4, 128, 40)] {
            let q = Tensor::randn(0f32, 1.0, (h, 1, d), &dev).unwrap();
            let kbuf = Tensor::randn(0f32, 1.0, (hkv, tk + 9, d), &dev).unwrap();
            let vbuf = Tensor::randn(0f32, 1.0, (hkv, tk + 9, d), &dev).unwrap();
            let k = kbuf.narrow(1, 0, tk).unwrap();
            let v = vbuf.narrow(1, 0, tk).unwrap();
            let kpos: Vec<u32> = (0..tk as u32).collect();
            let qpos = [tk as u32 - 3];
            let ours = attend(&q, &k, &v, &qpos, &kpos).unwrap().unwrap();
            let reference = super::super::attention::attend_ops(&q, &k, &v, &qpos, &kpos).unwrap();
            let diff = max_abs_diff(&ours, &reference);
            assert!(
                diff < 1e-5,
                "h {h} hkv {hkv} d {d} tk {tk}: max diff {diff}"
            );
        }
    }
}
