//! Checks of samkv's CUDA kernels against candle's op-by-op path on the same device, on
//! random inputs shaped like the models' (run by `samkv selfcheck` on a CUDA device). The
//! reference runs in f32, which the kernels leave to candle's ops.

use candle_core::{DType, Device, Tensor};

use super::rope::{Rope, RopeLayout};
use crate::cuda;
use crate::Result;

/// One kernel check: its name, whether it passed, and the numbers.
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// Largest |a - b| relative to the largest |a|.
fn rel_err(reference: &Tensor, got: &Tensor) -> Result<f32> {
    let r = reference.to_dtype(DType::F32)?.flatten_all()?;
    let g = got.to_dtype(DType::F32)?.flatten_all()?;
    let diff = (&r - &g)?.abs()?.max(0)?.to_scalar::<f32>()?;
    let scale = r.abs()?.max(0)?.to_scalar::<f32>()?.max(1e-6);
    Ok(diff / scale)
}

/// Tolerance of a kernel against the f32 reference, relative to the output's largest
/// magnitude: bf16 keeps 8 bits of mantissa (2^-8 = 0.004), and inputs, the probabilities
/// and the output are each rounded once; f32 differs only in the order of operations.
fn tol(dt: DType) -> f32 {
    match dt {
        DType::BF16 => 0.03,
        DType::F32 => 1e-5,
        _ => 0.01,
    }
}

/// The check's verdict: `err` is the relative error of the kernel's output, None when the
/// kernel declined the inputs (a failure: every check's inputs are ones it must take).
fn verdict(name: String, err: Option<f32>, dt: DType) -> Check {
    let limit = tol(dt);
    match err {
        None => Check {
            name,
            pass: false,
            detail: "the kernel declined these inputs".into(),
        },
        Some(e) => Check {
            name,
            pass: e < limit,
            detail: format!("max |diff| / max |ref| = {e:.2e} (tolerance {limit})"),
        },
    }
}

struct AttnCase {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    d: usize,
    qpos: Vec<u32>,
    kpos: Vec<u32>,
    dtype: DType,
}

fn attn_cases() -> Vec<AttnCase> {
    let range = |a: u32, b: u32| (a..b).collect::<Vec<u32>>();
    // Documents at gapped positions followed by the question's own rows.
    let gapped: Vec<u32> = [range(0, 500), range(700, 1160), range(1200, 1240)].concat();
    vec![
        AttnCase {
            name: "decode, 8B shape, 5184 keys (split keys)",
            heads: 32,
            kv_heads: 8,
            d: 128,
            qpos: vec![5184],
            kpos: range(0, 5185),
            dtype: DType::BF16,
        },
        AttnCase {
            name: "causal prefill, 8B shape, 300 tokens",
            heads: 32,
            kv_heads: 8,
            d: 128,
            qpos: range(0, 300),
            kpos: range(0, 300),
            dtype: DType::BF16,
        },
        AttnCase {
            name: "causal prefill, 8B shape, 1100 tokens, f16",
            heads: 32,
            kv_heads: 8,
            d: 128,
            qpos: range(0, 1100),
            kpos: range(0, 1100),
            dtype: DType::F16,
        },
        AttnCase {
            name: "question over gapped documents, SmolLM2 shape",
            heads: 9,
            kv_heads: 3,
            d: 64,
            qpos: range(1200, 1240),
            kpos: gapped,
            dtype: DType::BF16,
        },
        AttnCase {
            name: "causal prefill, Qwen-0.5B shape, 130 tokens, f16",
            heads: 14,
            kv_heads: 2,
            d: 64,
            qpos: range(0, 130),
            kpos: range(0, 130),
            dtype: DType::F16,
        },
        AttnCase {
            name: "decode batch row over a short cache, f16",
            heads: 32,
            kv_heads: 8,
            d: 128,
            qpos: vec![40],
            kpos: range(0, 41),
            dtype: DType::F16,
        },
    ]
}

/// The kernel against candle's ops; on a Hopper GPU (`hopper`) both of its forms, on the same
/// inputs, and how far the wgmma form is from the mma.sync one.
fn check_attention(dev: &Device, c: &AttnCase, hopper: bool) -> Result<Vec<Check>> {
    let (tq, tk) = (c.qpos.len(), c.kpos.len());
    let q = Tensor::randn(0f32, 1f32, (c.heads, tq, c.d), dev)?;
    let k = Tensor::randn(0f32, 1f32, (c.kv_heads, tk, c.d), dev)?;
    let v = Tensor::randn(0f32, 1f32, (c.kv_heads, tk, c.d), dev)?;
    // The reference sees the same rounded inputs as the kernel.
    let (q, k, v) = (
        q.to_dtype(c.dtype)?,
        k.to_dtype(c.dtype)?,
        v.to_dtype(c.dtype)?,
    );
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let want = super::attend(&f(&q)?, &f(&k)?, &f(&v)?, &c.qpos, &c.kpos)?;
    let name = format!("kernel attention: {}", c.name);
    if !hopper {
        let got = cuda::attend(&q, &k, &v, &c.qpos, &c.kpos)?;
        let err = got.map(|g| rel_err(&want, &g)).transpose()?;
        return Ok(vec![verdict(name, err, c.dtype)]);
    }
    let was = matches!(dev, Device::Cuda(d) if cuda::wgmma(d));
    let mut forms = Vec::new();
    for wg in [true, false] {
        cuda::set_wgmma(wg);
        let got = cuda::attend(&q, &k, &v, &c.qpos, &c.kpos);
        cuda::set_wgmma(was);
        forms.push(got?);
    }
    let mut out = Vec::new();
    for (got, tag) in forms.iter().zip(["wgmma", "mma.sync"]) {
        let err = got.as_ref().map(|g| rel_err(&want, g)).transpose()?;
        out.push(verdict(format!("{name} ({tag})"), err, c.dtype));
    }
    // Same inputs, same tiles and accumulation order: the two forms should agree closely.
    let err = match (&forms[0], &forms[1]) {
        (Some(a), Some(b)) => Some(rel_err(&f(b)?, &f(a)?)?),
        _ => None,
    };
    out.push(verdict(format!("{name} (wgmma vs mma.sync)"), err, c.dtype));
    Ok(out)
}

/// Batched decode: three sequences of different lengths, caches with spare capacity (as
/// LayerKv keeps them), one with a key after its query's position.
fn check_attention_batch(dev: &Device, dt: DType) -> Result<Check> {
    let (h, hkv, d) = (32, 8, 128);
    let lens = [41usize, 700, 5185];
    let q = Tensor::randn(0f32, 1f32, (h, lens.len(), d), dev)?.to_dtype(dt)?;
    let mut kv = Vec::new();
    let mut kpos = Vec::new();
    let mut qpos = Vec::new();
    for (i, &n) in lens.iter().enumerate() {
        let cap = n + 64;
        let k = Tensor::randn(0f32, 1f32, (hkv, cap, d), dev)?.to_dtype(dt)?;
        let v = Tensor::randn(0f32, 1f32, (hkv, cap, d), dev)?.to_dtype(dt)?;
        kv.push((k.narrow(1, 0, n)?, v.narrow(1, 0, n)?));
        kpos.push((0..n as u32).map(|p| p * 2).collect::<Vec<u32>>());
        // The second sequence's query sits before its last 10 keys.
        qpos.push(if i == 1 {
            2 * (n as u32 - 10)
        } else {
            2 * n as u32
        });
    }
    let args: Vec<(Tensor, Tensor, &[u32])> = kv
        .iter()
        .zip(&kpos)
        .map(|((k, v), p)| (k.clone(), v.clone(), p.as_slice()))
        .collect();
    let got = cuda::attend_batch(&q, &args, &qpos)?;
    let name = format!("kernel attention: batched decode, 3 caches of 41/700/5185 rows, {dt:?}")
        .to_lowercase();
    let Some(got) = got else {
        return Ok(verdict(name, None, dt));
    };
    let mut worst = 0f32;
    for (i, ((k, v), p)) in kv.iter().zip(&kpos).enumerate() {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let qi = q.narrow(1, i, 1)?;
        let want = super::attend_ops(&f(&qi)?, &f(k)?, &f(v)?, &qpos[i..i + 1], p)?;
        worst = worst.max(rel_err(&want, &got.narrow(0, i, 1)?)?);
    }
    Ok(verdict(name, Some(worst), dt))
}

fn check_qkv_rope(dev: &Device, layout: RopeLayout, dt: DType, bias: bool) -> Result<Check> {
    let (h, hkv, d, t) = (9, 3, 64, 37);
    let width = (h + 2 * hkv) * d;
    let y = Tensor::randn(0f32, 1f32, (t, width), dev)?.to_dtype(dt)?;
    let b = Tensor::randn(0f32, 1f32, width, dev)?.to_dtype(dt)?;
    let rope = Rope::new(d, 10000.0, layout, None, None);
    let pos: Vec<i64> = (0..t as i64).map(|p| p * 7 + 3).collect();
    let (cos, sin) = rope.tables(&pos, dt, dev)?;
    let got = cuda::qkv_rope(
        &y,
        bias.then_some(&b),
        &cos,
        &sin,
        layout == RopeLayout::Interleaved,
        h,
        hkv,
        d,
    )?;
    // Reference: candle's ops in f32.
    let yf = if bias {
        y.to_dtype(DType::F32)?
            .broadcast_add(&b.to_dtype(DType::F32)?)?
    } else {
        y.to_dtype(DType::F32)?
    };
    let (cf, sf) = rope.tables(&pos, DType::F32, dev)?;
    let part = |off: usize, n: usize| -> Result<Tensor> {
        Ok(yf
            .narrow(1, off * d, n * d)?
            .reshape((t, n, d))?
            .transpose(0, 1)?
            .contiguous()?)
    };
    let want_q = rope.apply(&part(0, h)?, &cf, &sf)?;
    let want_k = rope.apply(&part(h, hkv)?, &cf, &sf)?;
    let want_v = part(h + hkv, hkv)?;
    let name = format!(
        "kernel qkv+rope: {} {dt:?}{}",
        layout.as_str(),
        if bias { " with bias" } else { "" }
    )
    .to_lowercase();
    let err = match got {
        Some((q, k, v)) => Some(
            rel_err(&want_q, &q)?
                .max(rel_err(&want_k, &k)?)
                .max(rel_err(&want_v, &v)?),
        ),
        None => None,
    };
    Ok(verdict(name, err, dt))
}

fn check_silu_mul(dev: &Device, dt: DType) -> Result<Check> {
    let gu = Tensor::randn(0f32, 2f32, (23, 2 * 96), dev)?.to_dtype(dt)?;
    let g = gu.narrow(1, 0, 96)?.to_dtype(DType::F32)?;
    let u = gu.narrow(1, 96, 96)?.to_dtype(DType::F32)?;
    let want = (candle_nn::ops::silu(&g)? * u)?;
    let got = cuda::silu_mul(&gu)?;
    let err = got.map(|g| rel_err(&want, &g)).transpose()?;
    Ok(verdict(
        format!("kernel silu*up: {dt:?}").to_lowercase(),
        err,
        dt,
    ))
}

fn check_add_rms_norm(dev: &Device, dt: DType) -> Result<Check> {
    let (t, n) = (19, 576);
    let x = Tensor::randn(0f32, 1f32, (t, n), dev)?.to_dtype(dt)?;
    let a = Tensor::randn(0f32, 1f32, (t, n), dev)?.to_dtype(dt)?;
    let w = Tensor::randn(1f32, 0.2f32, n, dev)?.to_dtype(dt)?;
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let want_sum = (f(&x)? + f(&a)?)?;
    let want = candle_nn::ops::rms_norm(&want_sum, &f(&w)?, 1e-5)?;
    let got = cuda::add_rms_norm(&x, &a, &w, 1e-5)?;
    let err = match got {
        Some((sum, h)) => Some(rel_err(&want_sum, &sum)?.max(rel_err(&want, &h)?)),
        None => None,
    };
    Ok(verdict(
        format!("kernel add+rms_norm: {dt:?}").to_lowercase(),
        err,
        dt,
    ))
}

fn check_gather_kv(dev: &Device, layout: RopeLayout, dt: DType) -> Result<Check> {
    use cuda::gather::{gather_kv, GatherPlan};
    let (h, d, lens) = (3, 64, [7usize, 12, 5]);
    let rope = Rope::new(d, 10000.0, layout, None, None);
    let deltas = [0i64, 7, 19];
    // Two layers; the second segment's cache is a view with spare rows, as stores hold them.
    let sources = (0..2)
        .map(|_| {
            let seg = lens.iter().map(|&t| {
                let k = Tensor::randn(0f32, 1f32, (h, t + 4, d), dev)?.to_dtype(dt)?;
                let v = Tensor::randn(0f32, 1f32, (h, t, d), dev)?.to_dtype(dt)?;
                Ok((k.narrow(1, 0, t)?, v))
            });
            seg.collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    // Layer 0: segment 0 rows 1, 3; segment 1 rows 0, 5, 11; segment 2 row 4. Layer 1: all.
    let l0: Vec<[u32; 2]> = vec![[0, 1], [0, 3], [1, 0], [1, 5], [1, 11], [2, 4]];
    let l1: Vec<[u32; 2]> = (0..3)
        .flat_map(|s| (0..lens[s] as u32).map(move |r| [s as u32, r]))
        .collect();
    let entries: Vec<u32> = l0.iter().chain(&l1).flatten().copied().collect();
    let ranges = [0, l0.len() as u32, l0.len() as u32, l1.len() as u32];
    let (cos, sin) = rope.tables(&deltas, DType::F32, &Device::Cpu)?;
    let tables = Tensor::cat(&[cos, sin], 1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plan = GatherPlan {
        sources: &sources,
        ranges: &ranges,
        entries: &entries,
        rope: &tables,
        interleaved: layout == RopeLayout::Interleaved,
        cap: 40,
    };
    let got = gather_kv(&plan)?;
    // Reference: each row picked with candle's ops and rotated by its segment's delta in f32.
    let mut err = None;
    if let Some(all) = got {
        let mut worst = 0f32;
        for (l, rows) in [l0, l1].iter().enumerate() {
            let pick = |s: &[u32; 2], kv: usize| -> Result<Tensor> {
                let (k, v) = &sources[l][s[0] as usize];
                let t = if kv == 0 { k } else { v };
                Ok(t.narrow(1, s[1] as usize, 1)?.to_dtype(DType::F32)?)
            };
            let picked = |kv: usize| -> Result<Tensor> {
                let parts = rows
                    .iter()
                    .map(|s| pick(s, kv))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 1)?)
            };
            let (k, v) = (picked(0)?, picked(1)?);
            let per_row: Vec<i64> = rows.iter().map(|s| deltas[s[0] as usize]).collect();
            let (c, s) = rope.tables(&per_row, DType::F32, dev)?;
            let want_k = rope.apply(&k, &c, &s)?;
            let n = rows.len();
            let layer = all.get(l)?;
            worst = worst
                .max(rel_err(&want_k, &layer.get(0)?.narrow(1, 0, n)?)?)
                .max(rel_err(&v, &layer.get(1)?.narrow(1, 0, n)?)?);
        }
        err = Some(worst);
    }
    Ok(verdict(
        format!("kernel gather+rope: {} {dt:?}", layout.as_str()).to_lowercase(),
        err,
        dt,
    ))
}

fn check_scatter_rows(dev: &Device, dt: DType) -> Result<Check> {
    let (h, cap, n, d) = (3, 50, 9, 64);
    let dst = Tensor::randn(0f32, 1f32, (h, cap, d), dev)?.to_dtype(dt)?;
    let src = Tensor::randn(0f32, 1f32, (h, n, d), dev)?.to_dtype(dt)?;
    let rows: Vec<u32> = (0..n as u32).map(|j| (j * 5 + 2) % cap as u32).collect();
    // Reference: candle's scatter on a copy.
    let want = dst.copy()?;
    let idx = Tensor::from_vec(rows.clone(), (1, n, 1), dev)?
        .broadcast_as((h, n, d))?
        .contiguous()?;
    want.scatter_set(&idx, &src, 1)?;
    let done = cuda::gather::scatter_rows(&dst, &src, &Tensor::new(rows.as_slice(), dev)?)?;
    let err = done.then(|| rel_err(&want, &dst)).transpose()?;
    Ok(verdict(
        format!("kernel scatter rows: {dt:?}").to_lowercase(),
        err,
        dt,
    ))
}

/// Every kernel check; an error inside one becomes a failed check.
pub fn check_kernels(dev: &Device) -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |name: &str, r: Result<Check>| {
        out.push(r.unwrap_or_else(|e| Check {
            name: name.into(),
            pass: false,
            detail: format!("error: {e}"),
        }))
    };
    // On a Hopper GPU both forms of the attention are checked: mma.sync and wgmma.
    let hopper = matches!(dev, Device::Cuda(d) if cuda::has_wgmma(d));
    for c in attn_cases() {
        match check_attention(dev, &c, hopper) {
            Ok(checks) => checks.into_iter().for_each(|k| push(c.name, Ok(k))),
            Err(e) => push(c.name, Err(e)),
        }
    }
    for dt in [DType::BF16, DType::F16] {
        push("batched attention", check_attention_batch(dev, dt));
    }
    for (layout, dt, bias) in [
        (RopeLayout::SplitHalf, DType::F32, true),
        (RopeLayout::SplitHalf, DType::BF16, false),
        (RopeLayout::SplitHalf, DType::BF16, true),
        (RopeLayout::Interleaved, DType::F32, false),
        (RopeLayout::Interleaved, DType::F16, true),
    ] {
        push("qkv+rope", check_qkv_rope(dev, layout, dt, bias));
    }
    for dt in [DType::F32, DType::BF16] {
        push("silu*up", check_silu_mul(dev, dt));
    }
    for dt in [DType::BF16, DType::F16] {
        push("add+rms_norm", check_add_rms_norm(dev, dt));
    }
    for (layout, dt) in [
        (RopeLayout::SplitHalf, DType::BF16),
        (RopeLayout::Interleaved, DType::F32),
    ] {
        push("gather+rope", check_gather_kv(dev, layout, dt));
    }
    for dt in [DType::BF16, DType::F32] {
        push("scatter rows", check_scatter_rows(dev, dt));
    }
    out
}
