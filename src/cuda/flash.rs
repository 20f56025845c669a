//! The attention kernel behind candle's custom-op hook: flash_attn (flash.cuh) in its mma.sync
//! form (kernels.cu, any GPU from Ampere on) or, on Hopper, its wgmma form (flash_sm90.cu) fed
//! by the TMA through tensor maps built here; flash_combine merges key splits. Single-sequence
//! attention at any positions (`attend`) and batched decode over per-sequence caches
//! (`attend_batch`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{self, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::{cuda_only, enabled, kv_table, packed, rows_packed, view, MODULE, PTX};
use crate::Result;

/// flash_sm90.cu: the attention on Hopper's wgmma (empty unless built for compute capability 90).
const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/samkv_sm90.ptx"));

/// Packed query rows per attention block (BQ in kernels.cu).
const BQ: usize = 64;
/// Threads per attention block: 4 warps of 16 rows.
const THREADS: u32 = 128;
/// Keys per tile (BK in kernels.cu).
const BK: usize = 64;
/// Blocks worth filling the GPU with (an H200 has 132 SMs; three attention blocks fit on each).
const TARGET_BLOCKS: usize = 264;

/// The PTX flash_attn is loaded from: samkv's, or for tuning the kernel without rebuilding
/// samkv (docs/GPU.md), a file compiled from a changed flash.cuh with the same block shape (BQ,
/// BK, 4 warps), named by `SAMKV_FLASH_PTX` (mma.sync, from kernels.cu) or
/// `SAMKV_FLASH_WG_PTX` (wgmma, from flash_sm90.cu).
fn flash_ptx(wg: bool) -> candle_core::Result<&'static str> {
    type Src = OnceLock<std::result::Result<String, String>>;
    static SRC: [Src; 2] = [OnceLock::new(), OnceLock::new()];
    let (var, built) = if wg {
        ("SAMKV_FLASH_WG_PTX", PTX_SM90)
    } else {
        ("SAMKV_FLASH_PTX", PTX)
    };
    let src = SRC[wg as usize].get_or_init(|| match std::env::var(var) {
        Ok(path) => std::fs::read_to_string(&path)
            .map_err(|e| format!("{var}={path} cannot be read: {e}; unset it")),
        Err(_) => Ok(built.to_string()),
    });
    src.as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Whether attention runs on wgmma where the device has it (flash_sm90.cu: 1.9x the mma.sync
/// form at 10k tokens on the H200, docs/PERFORMANCE.md). `RuntimeFlags::wgmma`
/// (`SAMKV_WGMMA=0`) turns it off at load; benchmarks and selfcheck switch it with
/// `set_wgmma` to compare the two forms.
fn wgmma_flag() -> &'static AtomicBool {
    static ON: AtomicBool = AtomicBool::new(true);
    &ON
}

/// Turns the wgmma attention on or off for this process (where the device has it).
pub fn set_wgmma(on: bool) {
    wgmma_flag().store(on, Ordering::Relaxed);
}

/// Whether `dev` can run the wgmma attention: a Hopper GPU (compute capability 9.0) and a build
/// for it (CUDA_COMPUTE_CAP=90), with samkv's kernels on.
pub fn has_wgmma(dev: &CudaDevice) -> bool {
    if !enabled() || PTX_SM90.is_empty() {
        return false;
    }
    static HOPPER: OnceLock<Mutex<HashMap<DeviceId, bool>>> = OnceLock::new();
    let mut known = HOPPER
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    *known
        .entry(dev.id())
        .or_insert_with(|| dev.cuda_stream().context().compute_capability().ok() == Some((9, 0)))
}

/// Whether attention on `dev` runs on wgmma now.
pub fn wgmma(dev: &CudaDevice) -> bool {
    wgmma_flag().load(Ordering::Relaxed) && has_wgmma(dev)
}

/// Whether the attention kernel takes activations of this dtype and head size.
pub fn attends(dt: DType, head_dim: usize) -> bool {
    enabled() && matches!(dt, DType::BF16 | DType::F16) && matches!(head_dim, 64 | 128)
}

struct FlashAttn {
    /// Keys visible to each query (a prefix: keys are sorted by position); None: all.
    vis: Option<Vec<u32>>,
}

/// flash_attn for this dtype name and head size, with its dynamic shared memory (two stages of
/// a K and a V tile) allowed past the default 48 KiB; its wgmma form when `wg` (which takes the
/// tensor maps of k and v as two more arguments). Loaded once per device through cudarc:
/// candle's loader does not expose the function to set that attribute on.
fn flash_function(
    dev: &CudaDevice,
    name: &str,
    d: usize,
    wg: bool,
) -> candle_core::Result<(CudaFunction, u32)> {
    type Loaded = HashMap<(DeviceId, String), CudaFunction>;
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    // stages x (K, V) x rows x row, 2 bytes; rows padded by 8 elements for mma.sync; for wgmma
    // 1 KiB more to align the tiles to 1024 bytes (the 128-byte swizzle's period)
    let smem = if wg {
        4 * BK * d * 2 + 1024
    } else {
        4 * BK * (d + 8) * 2
    } as u32;
    let kernel = if wg { "flash_attn_wg" } else { "flash_attn" };
    let key = (dev.id(), format!("{kernel}_{name}_d{d}"));
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    if let Some(f) = loaded.get(&key) {
        return Ok((f.clone(), smem));
    }
    let module = dev
        .cuda_stream()
        .context()
        .load_module(Ptx::from_src(flash_ptx(wg)?))
        .w()?;
    let func = module.load_function(&key.1).w()?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    loaded.insert(key, func.clone());
    Ok((func, smem))
}

/// A CUtensorMap as a kernel argument (passed by value, 128 bytes).
#[repr(transparent)]
struct TensorMap(sys::CUtensorMap);
// SAFETY: a plain-old-data struct the kernel takes by value (`TmaMap` in flash.cuh).
unsafe impl DeviceRepr for TensorMap {}

/// The TMA description of one head-major (heads, rows, d) K or V view at device address `ptr`
/// with head stride `hs` (elements): boxes of BK rows x 64 columns with the 128-byte swizzle
/// that the wgmma attention reads; rows past `rows` read as zeros.
fn tensor_map(
    ptr: u64,
    f16: bool,
    (heads, rows, d, hs): (usize, usize, usize, usize),
) -> candle_core::Result<TensorMap> {
    use sys::{
        CUtensorMapDataType as Ty, CUtensorMapFloatOOBfill as Fill, CUtensorMapInterleave as Il,
        CUtensorMapL2promotion as L2, CUtensorMapSwizzle as Sw,
    };
    let dims = [d as u64, rows as u64, heads as u64];
    let strides = [(d * 2) as u64, (hs * 2) as u64]; // bytes, of dimensions 1 and 2
    let boxed = [64u32, BK as u32, 1];
    let step = [1u32; 3];
    let ty = if f16 {
        Ty::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    } else {
        Ty::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    };
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // SAFETY: every array holds the rank's entries; the driver writes the map and reads no
    // device memory.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            ty,
            3,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxed.as_ptr(),
            step.as_ptr(),
            Il::CU_TENSOR_MAP_INTERLEAVE_NONE,
            Sw::CU_TENSOR_MAP_SWIZZLE_128B,
            L2::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            Fill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(candle_core::Error::Msg(format!(
            "cuTensorMapEncodeTiled failed ({r:?}) for a ({heads}, {rows}, {d}) view with head \
             stride {hs}"
        )));
    }
    // SAFETY: initialized by the successful call above.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// What one attention launch reads besides q.
struct Keys<'a, T> {
    /// (k, v) with their head strides; None in batched decode, where `seqs` has them.
    kv: Option<(CudaView<'a, T>, CudaView<'a, T>, i64, i64)>,
    /// Batched decode: per sequence [k address, v address, k head stride, v head stride,
    /// visible keys], uploaded as one table.
    seqs: Option<Vec<i64>>,
    /// Longest key range of any query.
    tk: usize,
    kv_heads: usize,
}

/// Runs flash_attn (and flash_combine when the keys are split) for q (heads, tq, d) with
/// head stride `q_hs`; returns (tq, heads * d).
fn launch_flash<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    q: &CudaView<'_, T>,
    (h, tq, d, q_hs): (usize, usize, usize, i64),
    keys: Keys<'_, T>,
    vis: Option<&[u32]>,
    name: &str,
) -> candle_core::Result<CudaStorage> {
    let (tk, hkv) = (keys.tk, keys.kv_heads);
    let group = h / hkv;
    let rows = tq * group;
    let batch = keys.seqs.is_some();
    // One block per sequence in batched decode, else per BQ packed rows.
    let q_blocks = if batch { tq } else { rows.div_ceil(BQ) };
    // Few blocks over many keys (decode, a short question over long documents): split the
    // keys so the GPU has enough blocks, then merge the splits.
    let mut nsplit = 1;
    let mut split_len = tk.max(1).div_ceil(BK) * BK;
    let blocks = q_blocks * hkv;
    if blocks < TARGET_BLOCKS && tk > 2 * BK {
        let want = TARGET_BLOCKS.div_ceil(blocks).min(tk.div_ceil(2 * BK));
        split_len = tk.div_ceil(want).div_ceil(BK) * BK;
        nsplit = tk.div_ceil(split_len);
    }
    let out = unsafe { dev.alloc::<T>(tq * h * d)? };
    let part = if nsplit > 1 {
        Some(unsafe { dev.alloc::<f32>(nsplit * hkv * rows * (d + 2))? })
    } else {
        None
    };
    let vis = vis.map(|v| dev.clone_htod(v)).transpose()?;
    let seqs = keys
        .seqs
        .as_ref()
        .map(|t| dev.clone_htod(t.as_slice()))
        .transpose()?;
    let scale_log2 = (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
    let (tq_i, tk_i, group_i, h_i, split_i) = (
        tq as i32,
        tk as i32,
        group as i32,
        h as i32,
        split_len as i32,
    );
    let (null, zero) = (0u64, 0i64);
    let stream = dev.cuda_stream();
    // wgmma (where on) reads K and V through tensor maps: 16-byte aligned rows and head
    // strides. Batched decode stays on mma.sync: its blocks hold a handful of rows, and
    // mma.sync skips the idle warps, wgmma not.
    let try_wg = !batch && wgmma(dev);
    let kv_at = keys
        .kv
        .as_ref()
        .filter(|_| try_wg)
        .map(|(k, v, k_hs, v_hs)| {
            let ((kp, kr), (vp, vr)) = (k.device_ptr(&stream), v.device_ptr(&stream));
            ((kp, *k_hs as usize), (vp, *v_hs as usize), [kr, vr])
        });
    // A view the TMA cannot take (misaligned) runs the mma.sync form, whose results are the
    // same; so does one whose map cannot be encoded, with a warning.
    let maps = kv_at.as_ref().and_then(|((kp, k_hs), (vp, v_hs), _)| {
        let fits = kp % 16 == 0 && vp % 16 == 0 && k_hs % 8 == 0 && v_hs % 8 == 0;
        let f16 = name == "f16";
        let both = || -> candle_core::Result<_> {
            Ok((
                tensor_map(*kp, f16, (hkv, tk, d, *k_hs))?,
                tensor_map(*vp, f16, (hkv, tk, d, *v_hs))?,
            ))
        };
        match fits.then(both).transpose() {
            Ok(maps) => maps,
            Err(e) => {
                tracing::warn!("wgmma attention skipped for this call: {e}");
                None
            }
        }
    });
    let (func, smem) = flash_function(dev, name, d, maps.is_some())?;
    let mut b = stream.launch_builder(&func);
    b.arg(q);
    match &keys.kv {
        Some((k, v, _, _)) => b.arg(k).arg(v),
        None => b.arg(&null).arg(&null),
    };
    b.arg(&out);
    match &part {
        Some(p) => b.arg(p),
        None => b.arg(&null),
    };
    match &vis {
        Some(p) => b.arg(p),
        None => b.arg(&null),
    };
    match &seqs {
        Some(p) => b.arg(p),
        None => b.arg(&null),
    };
    b.arg(&tq_i).arg(&tk_i).arg(&group_i).arg(&h_i).arg(&q_hs);
    match &keys.kv {
        Some((_, _, k_hs, v_hs)) => b.arg(k_hs).arg(v_hs),
        None => b.arg(&zero).arg(&zero),
    };
    b.arg(&scale_log2).arg(&split_i);
    if let Some((km, vm)) = &maps {
        b.arg(km).arg(vm);
    }
    let cfg = LaunchConfig {
        grid_dim: (q_blocks as u32, hkv as u32, nsplit as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    };
    unsafe { b.launch(cfg) }.w()?;
    drop(kv_at); // logs the maps' reads of k and v after the launch
    if let Some(p) = &part {
        let func =
            dev.get_or_load_custom_func(&format!("flash_combine_{name}_d{d}"), MODULE, PTX)?;
        let (ns, rows_i) = (nsplit as i32, rows as i32);
        let mut b = func.builder();
        b.arg(p)
            .arg(&out)
            .arg(&ns)
            .arg(&rows_i)
            .arg(&group_i)
            .arg(&h_i);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, hkv as u32, 1),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

impl FlashAttn {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        name: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (h, tq, d) = ql.shape().dims3()?;
        let (hkv, tk, _) = kl.shape().dims3()?;
        let keys = Keys {
            kv: Some((
                view::<T>(ks, kl)?,
                view::<T>(vs, vl)?,
                kl.stride()[0] as i64,
                vl.stride()[0] as i64,
            )),
            seqs: None,
            tk,
            kv_heads: hkv,
        };
        let q = view::<T>(qs, ql)?;
        let shape = (h, tq, d, ql.stride()[0] as i64);
        let out = launch_flash(dev, &q, shape, keys, self.vis.as_deref(), name)?;
        Ok((out, Shape::from((tq, h * d))))
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "samkv-flash-attn"
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
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = qs.device().clone();
        let args = ((qs, ql), (ks, kl), (vs, vl));
        match qs.dtype() {
            DType::BF16 => self.run::<bf16>(&dev, args.0, args.1, args.2, "bf16"),
            DType::F16 => self.run::<f16>(&dev, args.0, args.1, args.2, "f16"),
            dt => Err(candle_core::Error::Msg(format!(
                "samkv-flash-attn: {dt:?} is not supported"
            ))),
        }
    }
}

/// Attention of q (heads, Tq, d) at `qpos` over k, v (kv_heads, Tk, d) at sorted `kpos`, as
/// [`super::attention::attend`]; returns (Tq, heads * d). None unless the tensors are CUDA
/// bf16/f16 with d of 64 or 128.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    qpos: &[u32],
    kpos: &[u32],
) -> Result<Option<Tensor>> {
    let (h, tq, d) = q.dims3()?;
    let (hkv, tk, _) = k.dims3()?;
    if !q.device().is_cuda() || !attends(q.dtype(), d) {
        return Ok(None);
    }
    if hkv == 0 || h % hkv != 0 || tk == 0 || qpos.len() != tq {
        return Ok(None);
    }
    let (q, k, v) = (packed(q, d)?, packed(k, d)?, packed(v, d)?);
    // Only when some query cannot see every key does the kernel need per-query counts.
    let last = kpos[tk - 1];
    let vis = if qpos.iter().all(|&p| p >= last) {
        None
    } else {
        Some(
            qpos.iter()
                .map(|&p| kpos.partition_point(|&kp| kp <= p) as u32)
                .collect(),
        )
    };
    Ok(Some(q.apply_op3_no_bwd(&k, &v, &FlashAttn { vis })?))
}

/// Batched decode: query b of q (heads, B, d) over its own sequence's keys and values.
struct FlashAttnBatch {
    /// Per sequence: keys, values (kv_heads, T_b, d) and how many of them it sees.
    seqs: Vec<(Tensor, Tensor, u32)>,
}

impl FlashAttnBatch {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        qs: &CudaStorage,
        ql: &Layout,
        name: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (h, b, d) = ql.shape().dims3()?;
        let hkv = self.seqs.first().map_or(Ok(1), |s| s.0.dim(0))?;
        let stream = dev.cuda_stream();
        let guards: Vec<_> = self
            .seqs
            .iter()
            .map(|(k, v, _)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        let (kv, reads) = kv_table::<T, _>(&guards, &stream, "batched attention")?;
        // Per sequence: the K/V entry and how many keys it sees.
        let table: Vec<i64> = kv
            .iter()
            .zip(&self.seqs)
            .flat_map(|(e, s)| e.iter().copied().chain([s.2 as i64]))
            .collect();
        let tk = self.seqs.iter().map(|s| s.2 as usize).max().unwrap_or(0);
        let keys = Keys {
            kv: None,
            seqs: Some(table),
            tk,
            kv_heads: hkv,
        };
        let q = view::<T>(qs, ql)?;
        let out = launch_flash(dev, &q, (h, b, d, ql.stride()[0] as i64), keys, None, name)?;
        drop(reads);
        Ok((out, Shape::from((b, h * d))))
    }
}

impl CustomOp1 for FlashAttnBatch {
    fn name(&self) -> &'static str {
        "samkv-flash-attn-batch"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_only(self.name()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        match s.dtype() {
            DType::BF16 => self.run::<bf16>(&dev, s, l, "bf16"),
            DType::F16 => self.run::<f16>(&dev, s, l, "f16"),
            dt => Err(candle_core::Error::Msg(format!(
                "samkv-flash-attn-batch: {dt:?} is not supported"
            ))),
        }
    }
}

/// Batched decode attention: query b of q (heads, B, d), at `qpos[b]`, over sequence b's
/// keys and values `kv[b]` (kv_heads, T_b, d) at sorted positions `kpos[b]`, all in one
/// launch. Returns (B, heads * d); None where the kernel does not apply.
pub fn attend_batch(
    q: &Tensor,
    kv: &[(Tensor, Tensor, &[u32])],
    qpos: &[u32],
) -> Result<Option<Tensor>> {
    let (h, b, d) = q.dims3()?;
    if !q.device().is_cuda() || !attends(q.dtype(), d) || kv.len() != b || qpos.len() != b {
        return Ok(None);
    }
    let packed = |t: &Tensor| rows_packed(t, d) && t.dtype() == q.dtype();
    if !rows_packed(q, d)
        || kv.iter().any(|(k, v, pos)| {
            !packed(k) || !packed(v) || k.dim(1).ok() != Some(pos.len()) || pos.is_empty()
        })
        || kv
            .iter()
            .any(|(k, _, _)| k.dim(0).ok().is_none_or(|n| n == 0 || h % n != 0))
    {
        return Ok(None);
    }
    let seqs = kv
        .iter()
        .zip(qpos)
        .map(|((k, v, pos), &p)| {
            let vis = pos.partition_point(|&kp| kp <= p) as u32;
            (k.clone(), v.clone(), vis)
        })
        .collect();
    Ok(Some(q.apply_op1_no_bwd(&FlashAttnBatch { seqs })?))
}
