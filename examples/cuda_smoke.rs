//! CUDA smoke test: checks that the CUDA build of candle works on the GPU machine.
//!
//! Runs the operations samkv leans on (bf16 and f32 matmul, softmax, rope, GGUF-quantized
//! matmul) on CUDA device 0, compares each with the CPU result, prints the max abs differences
//! and a matmul TFLOP/s figure, and exits with status 1 if any difference is out of tolerance, 2 if the checks could
//! not run (no CUDA device: a CPU-only build or a missing driver; a bad argument).
//!
//! Build: `cargo build --release --features cuda --example cuda_smoke`
//! (scripts/build-cuda.sh builds it into dist/cuda_smoke).
//! Usage: `cuda_smoke [--cpu] [N]` with N the matmul size (default 4096); `--cpu` checks the
//! CPU backend against itself, to try the harness where there is no GPU.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

/// One comparison of a CUDA result with the CPU one.
struct Check {
    name: String,
    max_abs_diff: f32,
    tol: f32,
}

impl Check {
    fn ok(&self) -> bool {
        // `<=` is false for NaN, so a NaN anywhere fails the check.
        self.max_abs_diff <= self.tol
    }
}

/// Max |a - b| over all elements, computed in f32 on the CPU.
fn max_abs_diff(gpu: &Tensor, cpu: &Tensor) -> Result<f32> {
    let gpu = gpu.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let cpu = cpu.to_dtype(DType::F32)?;
    let diff = (gpu - cpu)?.abs()?.flatten_all()?;
    // max() would hide NaNs (NaN comparisons are false), so look for them first.
    let values = diff.to_vec1::<f32>()?;
    if values.iter().any(|v| !v.is_finite()) {
        return Ok(f32::NAN);
    }
    Ok(values.into_iter().fold(0.0, f32::max))
}

/// Random normal tensor made on the CPU, so both sides see the same input.
fn randn(shape: &[usize], scale: f64) -> Result<Tensor> {
    Ok((Tensor::randn(0f32, 1f32, shape, &Device::Cpu)? * scale)?)
}

/// Times `iters` GPU matmuls of `a` and `b` and returns TFLOP/s.
fn matmul_tflops(a: &Tensor, b: &Tensor, dev: &Device, iters: usize) -> Result<f64> {
    let (m, k) = a.dims2()?;
    let n = b.dim(1)?;
    // Warm-up: cuBLAS picks its kernel and allocates its workspace on the first call.
    a.matmul(b)?;
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        a.matmul(b)?;
    }
    dev.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    Ok(2.0 * (m * n * k * iters) as f64 / secs / 1e12)
}

fn check_matmul(dev: &Device, n: usize, dtype: DType, tol: f32) -> Result<Check> {
    // Scaled so that the products are ~N(0, 1): then an absolute tolerance means something.
    let scale = 1.0 / (n as f64).sqrt();
    let a = randn(&[n, n], scale)?.to_dtype(dtype)?;
    let b = randn(&[n, n], 1.0)?.to_dtype(dtype)?;
    // The CPU reference works in f32 on the same (possibly bf16-rounded) inputs.
    let want = a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?;
    let (ga, gb) = (a.to_device(dev)?, b.to_device(dev)?);
    let got = ga.matmul(&gb)?;
    let diff = max_abs_diff(&got, &want)?;
    let tflops = matmul_tflops(&ga, &gb, dev, 20)?;
    println!("matmul {dtype:?} {n}x{n}: {tflops:.1} TFLOP/s");
    Ok(Check {
        name: format!("matmul {dtype:?} {n}x{n}"),
        max_abs_diff: diff,
        tol,
    })
}

fn check_softmax(dev: &Device, dtype: DType, tol: f32) -> Result<Check> {
    // Attention-like scores: (batch, heads, queries, keys) with a wide spread.
    let x = randn(&[2, 8, 128, 1000], 4.0)?.to_dtype(dtype)?;
    let want = candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?;
    let got = candle_nn::ops::softmax_last_dim(&x.to_device(dev)?)?;
    // The fused kernel must also agree with the plain definition on the CPU.
    let plain = {
        let xf = x.to_dtype(DType::F32)?;
        let e = xf.broadcast_sub(&xf.max_keepdim(D::Minus1)?)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
    };
    let diff = max_abs_diff(&got, &want)?.max(max_abs_diff(&got, &plain)?);
    Ok(Check {
        name: format!("softmax_last_dim {dtype:?}"),
        max_abs_diff: diff,
        tol,
    })
}

type RopeFn = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;

fn check_rope(dev: &Device, name: &str, f: RopeFn, dtype: DType, tol: f32) -> Result<Check> {
    let (b, h, t, d) = (2, 14, 300, 64);
    let x = randn(&[b, h, t, d], 1.0)?.to_dtype(dtype)?;
    // Real rotary tables: angle = pos / 10000^(2i/d), as in the models samkv runs.
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, d / 2), &Device::Cpu)?;
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((t, 1))?;
    let angles = pos.broadcast_mul(&inv_freq)?;
    let (cos, sin) = (
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    );
    let want = f(
        &x.to_dtype(DType::F32)?,
        &cos.to_dtype(DType::F32)?,
        &sin.to_dtype(DType::F32)?,
    )?;
    let got = f(
        &x.to_device(dev)?,
        &cos.to_device(dev)?,
        &sin.to_device(dev)?,
    )?;
    Ok(Check {
        name: format!("{name} {dtype:?}"),
        max_abs_diff: max_abs_diff(&got, &want)?,
        tol,
    })
}

/// GGUF-quantized matmul: on CUDA, batch 1 goes to the `mmvq` kernels and larger batches to
/// `mmq`, both precompiled machine code (not PTX), so this is the check that they load.
fn check_qmatmul(dev: &Device, dtype: GgmlDType, batch: usize, tol: f32) -> Result<Check> {
    let (out, k) = (1024, 2048);
    let w = randn(&[out, k], 1.0 / (k as f64).sqrt())?;
    let x = randn(&[batch, k], 1.0)?;
    let qw = QTensor::quantize(&w, dtype)?;
    // Reference: exact f32 product with the dequantized weights. Both backends also round
    // the activations to 8 bits, which is what the tolerance allows for.
    let want = x.matmul(&qw.dequantize(&Device::Cpu)?.t()?)?;
    let qmm = QMatMul::from_qtensor(QTensor::quantize(&w.to_device(dev)?, dtype)?)?;
    let got = qmm.forward(&x.to_device(dev)?)?;
    Ok(Check {
        name: format!("qmatmul {dtype:?} b={batch}"),
        max_abs_diff: max_abs_diff(&got, &want)?,
        tol,
    })
}

fn run(dev: &Device, n: usize) -> Result<Vec<Check>> {
    // The CUDA softmax sums in f32; candle's CPU one sums the bf16 exponentials in bf16, which
    // over 1000 columns is off by a few 1e-2: --cpu gets a looser bound for that one check.
    let softmax_bf16_tol = if dev.is_cpu() { 1e-1 } else { 8e-3 };
    // bf16 rounds to 2^-8 relative; on values of a few units, after up to three roundings
    // (rope), that is a few 1e-2.
    let mut checks = vec![
        check_matmul(dev, n, DType::F32, 1e-3)?,
        check_matmul(dev, n, DType::BF16, 6e-2)?,
        check_softmax(dev, DType::F32, 1e-5)?,
        check_softmax(dev, DType::BF16, softmax_bf16_tol)?,
        check_rope(dev, "rope", candle_nn::rotary_emb::rope, DType::F32, 1e-5)?,
        check_rope(
            dev,
            "rope_i",
            candle_nn::rotary_emb::rope_i,
            DType::F32,
            1e-5,
        )?,
        check_rope(dev, "rope", candle_nn::rotary_emb::rope, DType::BF16, 6e-2)?,
        check_rope(
            dev,
            "rope_i",
            candle_nn::rotary_emb::rope_i,
            DType::BF16,
            6e-2,
        )?,
    ];
    // The quantization types of the GGUF models samkv runs (Q4_1; Q4_K_M = Q4_K + Q6_K).
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q8_0,
    ] {
        for batch in [1, 64] {
            // --cpu shows up to ~3e-2 here (8-bit activations, max over 64k outputs of
            // ~N(0, 1)); a wrong kernel is off by O(1).
            checks.push(check_qmatmul(dev, dtype, batch, 1e-1)?);
        }
    }
    Ok(checks)
}

/// Parses `[--cpu] [N]`.
fn parse_args() -> Result<(bool, usize)> {
    let mut cpu = false;
    let mut n = 4096;
    for arg in std::env::args().skip(1) {
        if arg == "--cpu" {
            cpu = true;
        } else {
            n = arg
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| {
                    format!(
                        "usage: cuda_smoke [--cpu] [N]; N must be a positive integer, got {arg:?}"
                    )
                })?;
        }
    }
    Ok((cpu, n))
}

fn smoke() -> Result<ExitCode> {
    let (cpu, n) = parse_args()?;
    // --cpu runs the same checks against the CPU backend: it tests this harness and the
    // tolerances on a machine without a GPU (f32 diffs are then exactly 0).
    let dev = if cpu {
        Device::Cpu
    } else {
        Device::new_cuda(0).context(
            "cannot open CUDA device 0 (build with --features cuda; on the GPU machine the \
             driver's libcuda.so.1 and the CUDA 13 libraries must be found by the loader, \
             see docs/GPU.md)",
        )?
    };
    println!("device: {dev:?}");
    let checks = run(&dev, n)?;
    let mut failed = 0;
    for c in &checks {
        let verdict = if c.ok() { "ok" } else { "FAIL" };
        println!(
            "{:<24} max_abs_diff {:>10.3e}  tol {:>8.1e}  {verdict}",
            c.name, c.max_abs_diff, c.tol
        );
        failed += usize::from(!c.ok());
    }
    println!("{} passed, {} failed", checks.len() - failed, failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    match smoke() {
        Ok(code) => code,
        Err(e) => {
            // Status 2, not 1: the checks did not run, which is not the same as a wrong result.
            eprintln!("cuda_smoke: {e:#}");
            ExitCode::from(2)
        }
    }
}
