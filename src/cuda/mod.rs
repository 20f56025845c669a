//! samkv's own CUDA kernels (kernels.cu and flash_sm90.cu, compiled to PTX by build.rs) behind
//! candle's custom-op hook: attention without a score matrix (flash.rs), the Q/K/V split with
//! RoPE, SiLU(gate) * up, the residual add with RMS norm, and the request cache's gather and
//! row scatter (gather.rs). Each replaces a chain of candle ops (and, for attention, a
//! host-built mask that forced a host/device round trip per layer).
//!
//! Every entry point returns `Ok(None)` when its inputs are not what the kernel handles
//! (dtype, head size, layout), and the caller takes candle's op-by-op path.
//! `RuntimeFlags::cuda_kernels` (`SAMKV_CUDA_KERNELS=0`) turns all of them off, for
//! comparisons and as an escape hatch.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::Result;

mod flash;
pub mod gather;

pub use flash::{attend, attend_batch, attends, has_wgmma, set_wgmma, wgmma};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/samkv_kernels.ptx"));
const MODULE: &str = "samkv_kernels";

/// `RuntimeFlags::cuda_kernels` of the last model loaded (on until one is).
static KERNELS: AtomicBool = AtomicBool::new(true);

/// Whether samkv's kernels are on.
pub fn enabled() -> bool {
    KERNELS.load(Ordering::Relaxed)
}

/// Installs the switches of a model being loaded: the kernels are also called from code that
/// holds no model (KV cache scatter, the loader's gather).
pub fn configure(kernels: bool, wgmma: bool) {
    KERNELS.store(kernels, Ordering::Relaxed);
    set_wgmma(wgmma);
}

fn dtype_name(dt: DType) -> Option<&'static str> {
    match dt {
        DType::F32 => Some("f32"),
        DType::BF16 => Some("bf16"),
        DType::F16 => Some("f16"),
        _ => None,
    }
}

fn cuda_only(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name} runs on CUDA only"))
}

/// The typed device slice of a storage starting at the layout's offset.
fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// Whether a view starts on a 16-byte boundary (allocations do), as the 8-wide kernels need.
fn aligned16(l: &Layout, elem_bytes: usize) -> bool {
    (l.start_offset() * elem_bytes).is_multiple_of(16)
}

/// A tensor's storage, read-locked (any guard type), and its layout.
type Guard<'a, G> = (G, &'a Layout);

/// For kernels that take a table of caches: per K/V pair, their device addresses (at the
/// layouts' offsets) and head strides. The records returned log the reads for candle's event
/// tracking: hold them until the kernel is queued.
fn kv_table<'a, T, G>(
    pairs: &'a [(Guard<'a, G>, Guard<'a, G>)],
    stream: &'a CudaStream,
    what: &str,
) -> candle_core::Result<(Vec<[i64; 4]>, Vec<SyncOnDrop<'a>>)>
where
    T: candle_core::cuda_backend::CudaDType + 'a,
    G: std::ops::Deref<Target = candle_core::Storage>,
{
    let size = std::mem::size_of::<T>() as u64;
    let mut table = Vec::with_capacity(pairs.len());
    let mut reads = Vec::with_capacity(2 * pairs.len());
    for ((ks, kl), (vs, vl)) in pairs {
        let (kc, vc) = match (&**ks, &**vs) {
            (candle_core::Storage::Cuda(k), candle_core::Storage::Cuda(v)) => (k, v),
            _ => return Err(cuda_only(what)),
        };
        let (kp, kr) = kc.as_cuda_slice::<T>()?.device_ptr(stream);
        let (vp, vr) = vc.as_cuda_slice::<T>()?.device_ptr(stream);
        reads.extend([kr, vr]);
        table.push([
            (kp + kl.start_offset() as u64 * size) as i64,
            (vp + vl.start_offset() as u64 * size) as i64,
            kl.stride()[0] as i64,
            vl.stride()[0] as i64,
        ]);
    }
    Ok((table, reads))
}

fn launch_1d(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows of a (heads, T, d) tensor are d apart and each row is contiguous: what the kernel
/// indexes (the head stride is free, so narrowed KV buffers need no copy).
fn rows_packed(t: &Tensor, d: usize) -> bool {
    let (_, layout) = t.storage_and_layout();
    layout.stride().len() == 3 && layout.stride()[1] == d && layout.stride()[2] == 1
}

/// `t` itself when its rows are packed, else a contiguous copy.
fn packed(t: &Tensor, d: usize) -> Result<Tensor> {
    Ok(if rows_packed(t, d) {
        t.clone()
    } else {
        t.contiguous()?
    })
}

// ---------------------------------------------------------------------------------------
// Q/K/V split with RoPE

struct QkvRope {
    bias: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    h: usize,
    hkv: usize,
    d: usize,
    interleaved: bool,
}

impl QkvRope {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        ys: &CudaStorage,
        yl: &Layout,
        name: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let t = yl.shape().dims()[0];
        let heads = self.h + 2 * self.hkv;
        let out = unsafe { dev.alloc::<T>(heads * t * self.d)? };
        let y = view::<T>(ys, yl)?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (cs, ss) = match (&*cs, &*ss) {
            (candle_core::Storage::Cuda(c), candle_core::Storage::Cuda(s)) => (c, s),
            _ => return Err(cuda_only("qkv-rope tables")),
        };
        let cos = view::<T>(cs, cl)?;
        let sin = view::<T>(ss, sl)?;
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cuda(c) => Some(view::<T>(c, l)?),
                _ => return Err(cuda_only("qkv-rope bias")),
            },
            None => None,
        };
        let null = 0u64;
        let (t_i, h_i, hkv_i, d_i, il) = (
            t as i32,
            self.h as i32,
            self.hkv as i32,
            self.d as i32,
            self.interleaved as i32,
        );
        // 8 pairs per thread for 2-byte types (every model's head size qualifies).
        let wide = std::mem::size_of::<T>() == 2
            && (self.d / 2).is_multiple_of(8)
            && [yl, cl, sl].iter().all(|l| aligned16(l, 2))
            && bias_guard.as_ref().is_none_or(|(_, l)| aligned16(l, 2));
        let (kernel, threads) = match wide {
            true => (format!("qkv_rope_v8_{name}"), heads * t * self.d / 16),
            false => (format!("qkv_rope_{name}"), heads * t * self.d / 2),
        };
        let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&y);
        match &bias {
            Some(v) => b.arg(v),
            None => b.arg(&null),
        };
        b.arg(&cos).arg(&sin).arg(&out);
        b.arg(&t_i).arg(&h_i).arg(&hkv_i).arg(&d_i).arg(&il);
        unsafe { b.launch(launch_1d(threads)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((heads, t, self.d)),
        ))
    }
}

impl CustomOp1 for QkvRope {
    fn name(&self) -> &'static str {
        "samkv-qkv-rope"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_only(self.name()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        match s.dtype() {
            DType::F32 => self.run::<f32>(&dev, s, l, "f32"),
            DType::BF16 => self.run::<bf16>(&dev, s, l, "bf16"),
            DType::F16 => self.run::<f16>(&dev, s, l, "f16"),
            dt => Err(candle_core::Error::Msg(format!(
                "samkv-qkv-rope: {dt:?} is not supported"
            ))),
        }
    }
}

/// The CUDA counterpart of [`super::fused::qkv_rope`]: y (t, (h + 2 hkv) d) = [Q | K | V]
/// rows to q (h, t, d), k (hkv, t, d) rotated by cos/sin (t, d/2), and v (hkv, t, d).
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope(
    y: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
    h: usize,
    hkv: usize,
    d: usize,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !enabled() || !y.device().is_cuda() || dtype_name(y.dtype()).is_none() {
        return Ok(None);
    }
    let t = y.dim(0)?;
    let width = (h + 2 * hkv) * d;
    let same = |x: &Tensor| x.dtype() == y.dtype() && x.is_contiguous();
    if y.dims() != [t, width]
        || !y.is_contiguous()
        || cos.dims() != [t, d / 2]
        || !same(cos)
        || !same(sin)
        || bias.is_some_and(|b| b.elem_count() != width || !same(b))
    {
        return Ok(None);
    }
    let op = QkvRope {
        bias: bias.cloned(),
        cos: cos.clone(),
        sin: sin.clone(),
        h,
        hkv,
        d,
        interleaved,
    };
    let all = y.apply_op1_no_bwd(&op)?;
    Ok(Some((
        all.narrow(0, 0, h)?,
        all.narrow(0, h, hkv)?,
        all.narrow(0, h + hkv, hkv)?,
    )))
}

// ---------------------------------------------------------------------------------------
// SiLU(gate) * up

struct SiluMul;

impl SiluMul {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        s: &CudaStorage,
        l: &Layout,
        name: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (t, f2) = l.shape().dims2()?;
        let f = f2 / 2;
        let out = unsafe { dev.alloc::<T>(t * f)? };
        let gu = view::<T>(s, l)?;
        let (t_i, f_i) = (t as i32, f as i32);
        let wide = std::mem::size_of::<T>() == 2 && f.is_multiple_of(8) && aligned16(l, 2);
        let (kernel, threads) = match wide {
            true => (format!("silu_mul_v8_{name}"), t * f / 8),
            false => (format!("silu_mul_{name}"), t * f),
        };
        let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&gu).arg(&out).arg(&t_i).arg(&f_i);
        unsafe { b.launch(launch_1d(threads)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((t, f)),
        ))
    }
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "samkv-silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_only(self.name()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        match s.dtype() {
            DType::F32 => Self::run::<f32>(&dev, s, l, "f32"),
            DType::BF16 => Self::run::<bf16>(&dev, s, l, "bf16"),
            DType::F16 => Self::run::<f16>(&dev, s, l, "f16"),
            dt => Err(candle_core::Error::Msg(format!(
                "samkv-silu-mul: {dt:?} is not supported"
            ))),
        }
    }
}

/// gu (t, 2f) = [gate | up] rows to silu(gate) * up (t, f) in one pass.
pub fn silu_mul(gu: &Tensor) -> Result<Option<Tensor>> {
    if !enabled()
        || !gu.device().is_cuda()
        || dtype_name(gu.dtype()).is_none()
        || !gu.is_contiguous()
        || gu.rank() != 2
        || gu.dim(1)? % 2 != 0
    {
        return Ok(None);
    }
    Ok(Some(gu.apply_op1_no_bwd(&SiluMul)?))
}

// ---------------------------------------------------------------------------------------
// Residual add and RMS norm

struct AddRmsNorm {
    eps: f32,
}

impl AddRmsNorm {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (as_, al): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        name: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let (t, n) = xl.shape().dims2()?;
        let so = unsafe { dev.alloc::<T>(2 * t * n)? };
        let (x, a, w) = (view::<T>(xs, xl)?, view::<T>(as_, al)?, view::<T>(ws, wl)?);
        let (t_i, n_i) = (t as i32, n as i32);
        let func = dev.get_or_load_custom_func(&format!("add_rms_norm_{name}"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&x)
            .arg(&a)
            .arg(&w)
            .arg(&so)
            .arg(&t_i)
            .arg(&n_i)
            .arg(&self.eps);
        // One block per row, one thread per 8 elements, whole warps.
        let threads = (n / 8).div_ceil(32).clamp(1, 32) as u32 * 32;
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(so, dev),
            Shape::from((2, t, n)),
        ))
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "samkv-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_only(self.name()))
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        as_: &CudaStorage,
        al: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let args = ((xs, xl), (as_, al), (ws, wl));
        match xs.dtype() {
            DType::BF16 => self.run::<bf16>(args.0, args.1, args.2, "bf16"),
            DType::F16 => self.run::<f16>(args.0, args.1, args.2, "f16"),
            dt => Err(candle_core::Error::Msg(format!(
                "samkv-add-rms-norm: {dt:?} is not supported"
            ))),
        }
    }
}

/// x + a and the RMS norm of that sum scaled by w, in one pass over rows of x, a (t, n) for
/// 2-byte types with n a multiple of 8: returns (sum, normed), each (t, n).
pub fn add_rms_norm(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    let two_byte = matches!(x.dtype(), DType::BF16 | DType::F16);
    let fits = |t: &Tensor| t.dtype() == x.dtype() && t.is_contiguous() && aligned16(t.layout(), 2);
    let ok = enabled()
        && x.device().is_cuda()
        && two_byte
        && x.rank() == 2
        && a.dims() == x.dims()
        && w.dims() == [x.dim(1)?]
        && x.dim(1)?.is_multiple_of(8)
        && [x, a, w].into_iter().all(fits);
    if !ok {
        return Ok(None);
    }
    let both = x.apply_op3_no_bwd(a, w, &AddRmsNorm { eps })?;
    Ok(Some((both.get(0)?, both.get(1)?)))
}
