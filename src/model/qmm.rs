//! Quantized matmul for ggml Q4_1, Q5_0 and Q8_0 weights on x86 CPUs with AVX-512 VNNI.
//!
//! candle has no SIMD kernel for Q4_1 or Q5_0 (SmolLM2's and Qwen2.5-0.5B's main weight
//! types) and none for Q8_0 when the row length is not a multiple of 256, so decoding ran at a
//! few tokens/s. Here weights are repacked once at load into tiles of 16 output rows x 32
//! inputs so one `vpdpbusd` multiplies 16 rows by 4 inputs: each 32-bit lane holds 4 unsigned
//! weight codes of one row, the 4 signed 8-bit activation codes are broadcast. Codes are kept
//! unsigned (Q5_0 and Q8_0 as code + 16 / + 128) and the offset is removed exactly in integers
//! with the per-block sum of activation codes.
//!
//! Activations are quantized to 8 bits per block of 32 exactly as candle does (Q8_1 for Q4_1,
//! Q8_0 otherwise), so results equal candle's quantized matmul up to float summation order.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use super::linear::OutBuf;

const TILE: usize = 16;
const QK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QKind {
    Q4_1,
    Q5_0,
    Q8_0,
}

impl QKind {
    fn of(dt: GgmlDType) -> Option<Self> {
        match dt {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// 64-byte lines per (tile, block): code lines + one mask line (Q5_0) + one scale line.
    fn lines(self) -> usize {
        match self {
            Self::Q4_1 => 5,
            Self::Q5_0 => 6,
            Self::Q8_0 => 9,
        }
    }

    /// Bytes of one ggml block of 32 values.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
        }
    }
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Whether this CPU runs the kernels (AVX-512 F/BW/VNNI); checked once.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix (n outputs x k inputs) in tiles of 16 rows; `n % 16 == 0`, `k % 32 == 0`.
pub(crate) struct Packed {
    kind: QKind,
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl Packed {
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Packs one or more CPU QTensors of the same type and input size, rows stacked in order
    /// (fused Q/K/V or gate/up). None when the type or shape is not handled here.
    pub(crate) fn from_qtensors(parts: &[&QTensor]) -> Option<Self> {
        if !available() || parts.is_empty() {
            return None;
        }
        let kind = QKind::of(parts[0].dtype())?;
        let k = parts[0].shape().dims2().ok()?.1;
        let mut rows: Vec<&[u8]> = Vec::new();
        let mut datas = Vec::with_capacity(parts.len());
        for p in parts {
            let (n, pk) = p.shape().dims2().ok()?;
            if QKind::of(p.dtype()) != Some(kind) || pk != k || n % TILE != 0 || k % QK != 0 {
                return None;
            }
            datas.push((p.data().ok()?, n));
        }
        let row_bytes = k / QK * kind.block_bytes();
        for (d, n) in &datas {
            if d.len() != n * row_bytes {
                return None;
            }
            rows.extend(d.chunks_exact(row_bytes));
        }
        let n = rows.len();
        let nb = k / QK;
        let lpb = kind.lines();
        let mut lines = vec![Line([0; 64]); n / TILE * nb * lpb];
        for t in 0..n / TILE {
            for b in 0..nb {
                let dst = &mut lines[(t * nb + b) * lpb..(t * nb + b + 1) * lpb];
                for r in 0..TILE {
                    let blk =
                        &rows[t * TILE + r][b * kind.block_bytes()..(b + 1) * kind.block_bytes()];
                    pack_block(kind, blk, r, dst);
                }
            }
        }
        Some(Self { kind, n, k, lines })
    }
}

/// Writes row `r`'s block into the tile's lines (layout in the module docs of each kind).
fn pack_block(kind: QKind, blk: &[u8], r: usize, dst: &mut [Line]) {
    let scale_line = kind.lines() - 1;
    // d (and Q4_1's m) stay f16: converted in the kernel with one instruction.
    dst[scale_line].0[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
    match kind {
        QKind::Q4_1 => {
            dst[scale_line].0[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
            // ggml byte j holds value j (low nibble) and j + 16 (high nibble); line c gets
            // bytes 4c..4c+4, so its low nibbles are values 4c.. and high ones 16+4c..
            let qs = &blk[4..20];
            for c in 0..4 {
                dst[c].0[4 * r..4 * r + 4].copy_from_slice(&qs[4 * c..4 * c + 4]);
            }
        }
        QKind::Q5_0 => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let qs = &blk[6..22];
            for c in 0..4 {
                dst[c].0[4 * r..4 * r + 4].copy_from_slice(&qs[4 * c..4 * c + 4]);
                // Fifth bits as byte masks: word 2c for values 4c.., 2c+1 for 16+4c..
                for j in 0..4 {
                    let lo = (qh >> (4 * c + j)) & 1;
                    let hi = (qh >> (16 + 4 * c + j)) & 1;
                    let bit = 4 * r + j;
                    set_mask_bit(&mut dst[4], 2 * c, bit, lo);
                    set_mask_bit(&mut dst[4], 2 * c + 1, bit, hi);
                }
            }
        }
        QKind::Q8_0 => {
            for g in 0..8 {
                for j in 0..4 {
                    dst[g].0[4 * r + j] = (blk[2 + 4 * g + j] as i8 as i16 + 128) as u8;
                }
            }
        }
    }
}

fn set_mask_bit(line: &mut Line, word: usize, bit: usize, v: u32) {
    if v != 0 {
        line.0[word * 8 + bit / 8] |= 1 << (bit % 8);
    }
}

/// Activations quantized per block of 32, as candle's `BlockQ8_1::from_float` (and
/// `BlockQ8_0::from_float`, which computes the same codes and scale).
pub(crate) struct QActs {
    k: usize,
    /// (m, k) codes
    qs: Vec<i8>,
    /// (m, k/32) f16-rounded scales
    d: Vec<f32>,
    /// (m, k/32) Q8_1 `s` = f16(f16(sum) * d) as f32, for Q4_1's min term
    s: Vec<f32>,
    /// (m, k/32) sums of codes, for removing code offsets exactly
    sum: Vec<i32>,
    /// (m, k/4) sums of each 4 consecutive codes (Q8_0 keeps per-4 partial sums)
    gsum: Vec<i32>,
}

impl QActs {
    pub(crate) fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let nb = k / QK;
        let mut a = QActs {
            k,
            qs: vec![0; m * k],
            d: vec![0.0; m * nb],
            s: vec![0.0; m * nb],
            sum: vec![0; m * nb],
            gsum: vec![0; m * k / 4],
        };
        type Row<'a> = (
            (&'a [f32], (&'a mut [i8], &'a mut [i32])),
            ((&'a mut [f32], &'a mut [f32]), &'a mut [i32]),
        );
        let work = |((xr, (qr, gr)), ((dr, sr), sumr)): Row| {
            for b in 0..nb {
                let xs = &xr[b * QK..(b + 1) * QK];
                let q = &mut qr[b * QK..(b + 1) * QK];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: quantize() is only reached where available() holds (AVX-512F/BW).
                let (d, sum) = unsafe { quantize_block_avx512(xs, q) };
                #[cfg(not(target_arch = "x86_64"))]
                let (d, sum) = quantize_block(xs, q);
                let d16 = f16::from_f32(d);
                dr[b] = d16.to_f32();
                sr[b] = f16::from_f32(f16::from_f32(sum as f32).to_f32() * d16.to_f32()).to_f32();
                sumr[b] = sum;
            }
            for (g, q4) in gr.iter_mut().zip(qr.chunks_exact(4)) {
                *g = q4.iter().map(|&q| q as i32).sum();
            }
        };
        if m >= 32 {
            let qs_rows = a.qs.par_chunks_mut(k).zip(a.gsum.par_chunks_mut(k / 4));
            let meta =
                a.d.par_chunks_mut(nb)
                    .zip(a.s.par_chunks_mut(nb))
                    .zip(a.sum.par_chunks_mut(nb));
            x.par_chunks(k)
                .zip(qs_rows)
                .zip(meta)
                .with_min_len(16)
                .for_each(work);
        } else {
            x.chunks(k)
                .zip(a.qs.chunks_mut(k).zip(a.gsum.chunks_mut(k / 4)))
                .zip(
                    a.d.chunks_mut(nb)
                        .zip(a.s.chunks_mut(nb))
                        .zip(a.sum.chunks_mut(nb)),
                )
                .for_each(work);
        }
        a
    }
}

/// candle's Q8 block quantization: d = max|x| / 127, q = round(x / d) (half away from zero).
/// Returns (d before f16 rounding, sum of codes).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(xs) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// [`quantize_block`] with AVX-512, bit-identical (round half away from zero done exactly).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let x0 = _mm512_loadu_ps(xs.as_ptr());
    let x1 = _mm512_loadu_ps(xs.as_ptr().add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let vid = _mm512_set1_ps(id);
    let half = _mm512_set1_ps(0.5);
    let one = _mm512_set1_ps(1.0);
    let round = |x: __m512| -> __m512i {
        let v = _mm512_mul_ps(x, vid);
        let t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        // |v - t| >= 0.5: step away from zero (v - t is exact here)
        let away = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), half, _CMP_GE_OQ);
        let step = _mm512_or_ps(one, _mm512_and_ps(v, _mm512_set1_ps(-0.0)));
        _mm512_cvtps_epi32(_mm512_mask_add_ps(t, away, t, step))
    };
    let q0 = round(x0);
    let q1 = round(x1);
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtsepi32_epi8(q1),
    );
    (d, _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)))
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Rows of activations one task handles: keeps its codes in L1 while a tile's weights stream.
const ROW_CHUNK: usize = 64;

/// y_p = x W_p^T for each packed part p sharing the activations x (m, k), in one parallel
/// region. Returns one (m, n_p) row-major buffer per part.
pub(crate) fn matmul(parts: &[&Packed], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let k = parts[0].k;
    debug_assert!(parts.iter().all(|p| p.k == k) && x.len() == m * k);
    let acts = QActs::quantize(x, m, k);
    let mut bufs: Vec<OutBuf> = parts.iter().map(|p| OutBuf::new(m * p.n)).collect();
    let ptrs: Vec<SendPtr> = bufs.iter_mut().map(|o| SendPtr(o.ptr())).collect();
    // Work units: (part, tile, row chunk).
    let row_chunks = m.div_ceil(ROW_CHUNK);
    let mut units = Vec::new();
    for (pi, p) in parts.iter().enumerate() {
        for t in 0..p.n / TILE {
            for rc in 0..row_chunks {
                units.push((pi, t, rc));
            }
        }
    }
    let run = |&(pi, t, rc): &(usize, usize, usize)| {
        let p = parts[pi];
        let r0 = rc * ROW_CHUNK;
        let r1 = (r0 + ROW_CHUNK).min(m);
        // SAFETY: each unit writes its own 16 columns of its own rows of part pi's output.
        unsafe { tile_rows(p, &acts, t, r0, r1, ptrs[pi]) };
    };
    if units.len() * m * k < 1 << 16 {
        units.iter().for_each(run);
    } else {
        let per = units
            .len()
            .div_ceil(8 * rayon::current_num_threads())
            .max(1);
        units.par_iter().with_min_len(per).for_each(run);
    }
    // The units cover every (row, 16-column tile) of every part: all elements are written.
    // SAFETY: see above.
    bufs.into_iter()
        .map(|b| unsafe { b.assume_init() })
        .collect()
}

/// Rows r0..r1 of tile t, in groups of up to 8 rows sharing the unpacked weights.
unsafe fn tile_rows(p: &Packed, a: &QActs, t: usize, r0: usize, r1: usize, out: SendPtr) {
    #[cfg(target_arch = "x86_64")]
    if p.kind == QKind::Q8_0 {
        for r in r0..r1 {
            kernel_q8_0(p, a, t, r, out);
        }
        return;
    }
    let mut r = r0;
    while r < r1 {
        let left = r1 - r;
        let done = if left >= 8 {
            tile_kernel::<8>(p, a, t, r, out);
            8
        } else if left >= 4 {
            tile_kernel::<4>(p, a, t, r, out);
            4
        } else if left >= 2 {
            tile_kernel::<2>(p, a, t, r, out);
            2
        } else {
            tile_kernel::<1>(p, a, t, r, out);
            1
        };
        r += done;
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn tile_kernel<const MR: usize>(p: &Packed, a: &QActs, t: usize, r: usize, out: SendPtr) {
    match p.kind {
        QKind::Q4_1 => kernel::<MR, 0>(p, a, t, r, out),
        QKind::Q5_0 => kernel::<MR, 1>(p, a, t, r, out),
        QKind::Q8_0 => unreachable!("Q8_0 has its own kernel"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_kernel<const MR: usize>(_: &Packed, _: &QActs, _: usize, _: usize, _: SendPtr) {
    unreachable!("packed weights exist only where available() is true")
}

/// One tile (16 outputs) for MR activation rows starting at r. KIND: 0 Q4_1, 1 Q5_0.
///
/// The float steps per block repeat candle's scalar `vec_dot` operation for operation (no
/// fused multiply-add), so each output equals candle's bit for bit: the model's 8-bit
/// activation rounding would otherwise amplify last-bit differences layer after layer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const MR: usize, const KIND: u8>(
    p: &Packed,
    a: &QActs,
    t: usize,
    r: usize,
    out: SendPtr,
) {
    use std::arch::x86_64::*;
    let nb = p.k / QK;
    let lpb = p.kind.lines();
    let base = p.lines.as_ptr().add(t * nb * lpb) as *const u8;
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); MR];
    for b in 0..nb {
        let w = base.add(b * lpb * 64);
        let sc = w.add((lpb - 1) * 64);
        let dw = _mm512_cvtph_ps(_mm256_load_si256(sc as *const __m256i));
        // Unpacked codes: 8 vectors, vector g holds values 4g..4g+4 of each of the 16 rows.
        let mut wv = [_mm512_setzero_si512(); 8];
        {
            for c in 0..4 {
                let v = _mm512_load_si512(w.add(c * 64) as *const _);
                wv[c] = _mm512_and_si512(v, m4);
                wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
            if KIND == 1 {
                let masks = w.add(4 * 64) as *const u64;
                let sixteen = _mm512_set1_epi8(16);
                for c in 0..4 {
                    wv[c] = _mm512_mask_add_epi8(wv[c], *masks.add(2 * c), wv[c], sixteen);
                    wv[c + 4] =
                        _mm512_mask_add_epi8(wv[c + 4], *masks.add(2 * c + 1), wv[c + 4], sixteen);
                }
            }
        }
        let mw = if KIND == 0 {
            _mm512_cvtph_ps(_mm256_load_si256(sc.add(32) as *const __m256i))
        } else {
            dw
        };
        for (i, acc) in acc.iter_mut().enumerate() {
            let row = r + i;
            let y = a.qs.as_ptr().add(row * a.k + b * QK) as *const i32;
            let mut s0 = _mm512_setzero_si512();
            let mut s1 = _mm512_setzero_si512();
            for g in 0..4 {
                s0 = _mm512_dpbusd_epi32(
                    s0,
                    wv[g],
                    _mm512_set1_epi32(std::ptr::read_unaligned(y.add(g))),
                );
                s1 = _mm512_dpbusd_epi32(
                    s1,
                    wv[g + 4],
                    _mm512_set1_epi32(std::ptr::read_unaligned(y.add(g + 4))),
                );
            }
            let mut si = _mm512_add_epi32(s0, s1);
            let mi = row * nb + b;
            if KIND == 1 {
                si = _mm512_sub_epi32(si, _mm512_set1_epi32(16 * *a.sum.get_unchecked(mi)));
            }
            // candle: sumf += sumi * d_w * d_x (+ m_w * s_x for Q4_1)
            let t = _mm512_mul_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(si), dw),
                _mm512_set1_ps(*a.d.get_unchecked(mi)),
            );
            let t = if KIND == 0 {
                _mm512_add_ps(t, _mm512_mul_ps(mw, _mm512_set1_ps(*a.s.get_unchecked(mi))))
            } else {
                t
            };
            *acc = _mm512_add_ps(*acc, t);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.0.add((r + i) * p.n + t * TILE), *acc);
    }
}

/// Q8_0 tile for one activation row, reproducing candle's AVX2 `vec_dot_q8_0_q8_0`: per
/// block, 8 partial sums of 4 products each, `acc_g = fma(d_w * d_x, partial_g, acc_g)`, and
/// at the end its horizontal-sum order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel_q8_0(p: &Packed, a: &QActs, t: usize, row: usize, out: SendPtr) {
    use std::arch::x86_64::*;
    let nb = p.k / QK;
    let lpb = p.kind.lines();
    let base = p.lines.as_ptr().add(t * nb * lpb) as *const u8;
    let mut acc = [_mm512_setzero_ps(); 8];
    let y = a.qs.as_ptr().add(row * a.k) as *const i32;
    let gs = a.gsum.as_ptr().add(row * a.k / 4);
    for b in 0..nb {
        let w = base.add(b * lpb * 64);
        let dw = _mm512_cvtph_ps(_mm256_load_si256(w.add(8 * 64) as *const __m256i));
        let d = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked(row * nb + b)));
        for (g, acc) in acc.iter_mut().enumerate() {
            let wv = _mm512_load_si512(w.add(g * 64) as *const _);
            let yv = _mm512_set1_epi32(std::ptr::read_unaligned(y.add(b * 8 + g)));
            let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, yv);
            // codes were stored + 128: remove 128 * (sum of these 4 activation codes)
            let dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * *gs.add(b * 8 + g)));
            *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(dot), *acc);
        }
    }
    // hsum_float_8 of lanes (a0..a7): ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
    let s04 = _mm512_add_ps(acc[4], acc[0]);
    let s15 = _mm512_add_ps(acc[5], acc[1]);
    let s26 = _mm512_add_ps(acc[6], acc[2]);
    let s37 = _mm512_add_ps(acc[7], acc[3]);
    let r = _mm512_add_ps(_mm512_add_ps(s04, s26), _mm512_add_ps(s15, s37));
    _mm512_storeu_ps(out.0.add(row * p.n + t * TILE), r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    fn check(dt: GgmlDType, m: usize) {
        if !available() {
            eprintln!("AVX-512 VNNI not available: packed kernels unused on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let (n, k) = (48, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let p = Packed::from_qtensors(&[&q]).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ours = matmul(&[&p], &xv, m).remove(0);
        let reference = candle_core::quantized::QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap();
        let reference = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let max = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (o, r) in ours.iter().zip(&reference) {
            // Bit-exact: the model test relies on it (see `kernel`).
            assert_eq!(
                o.to_bits(),
                r.to_bits(),
                "{dt:?} m={m}: {o} vs candle {r} (max {max})"
            );
        }
    }

    #[test]
    fn block_quantization_matches_scalar() {
        if !available() {
            return;
        }
        // Random blocks plus blocks whose scaled values fall exactly on .5 (rounding ties).
        let mut blocks: Vec<Vec<f32>> = (0..50)
            .map(|i| {
                (0..32)
                    .map(|j| ((i * 37 + j * 11) % 101) as f32 * 0.37 - 18.0)
                    .collect()
            })
            .collect();
        blocks.push(
            (0..32)
                .map(|j| if j == 0 { 127.0 } else { j as f32 - 15.5 })
                .collect(),
        );
        blocks.push(
            (0..32)
                .map(|j| if j == 0 { -127.0 } else { 0.5 - j as f32 })
                .collect(),
        );
        blocks.push(vec![0.0; 32]);
        for b in &blocks {
            let (mut q1, mut q2) = ([0i8; 32], [0i8; 32]);
            let r1 = quantize_block(b, &mut q1);
            let r2 = unsafe { quantize_block_avx512(b, &mut q2) };
            assert_eq!(q1, q2, "{b:?}");
            assert_eq!(r1.0.to_bits(), r2.0.to_bits());
            assert_eq!(r1.1, r2.1);
        }
    }

    #[test]
    fn packed_matmul_matches_candle() {
        for dt in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            for m in [1, 3, 7, 15, 70] {
                check(dt, m);
            }
        }
    }
}
