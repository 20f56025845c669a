//! The launcher of kernels.cu's `gather_kv`: stored per-document K/V rows laid out as one
//! request's cache, keys moved to their global positions, in one launch for every layer.
//! Built per (layer, segment) from candle's ops this was a RoPE and two copies each: 350
//! launches for ten documents on a 32-layer model, which made loading launch-bound.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::{cuda_only, enabled, kv_table, packed, rows_packed, MODULE, PTX};
use crate::Result;

/// Where every output row comes from; see [`gather_kv`].
pub struct GatherPlan<'a> {
    /// `sources[layer][segment]`: that segment's stored K and V, (kv_heads, T, head_dim).
    pub sources: &'a [Vec<(Tensor, Tensor)>],
    /// Per layer: (first entry, rows).
    pub ranges: &'a [u32],
    /// Per entry: (segment, row in the segment's stored cache), flattened.
    pub entries: &'a [u32],
    /// Per segment: cos then sin (head_dim / 2 each) of its position delta.
    pub rope: &'a [f32],
    /// RoPE pairs (0,1), (2,3), ... rather than (i, i + d/2).
    pub interleaved: bool,
    /// Rows of room per layer in the output.
    pub cap: usize,
}

struct GatherKv<'a> {
    plan: &'a GatherPlan<'a>,
    h: usize,
    d: usize,
}

impl GatherKv<'_> {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        dev: &CudaDevice,
        es: &CudaStorage,
        el: &Layout,
        name: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let p = self.plan;
        let (layers, nseg) = (p.sources.len(), p.sources[0].len());
        let stream = dev.cuda_stream();
        let guards: Vec<_> = p
            .sources
            .iter()
            .flatten()
            .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        let (table, reads) = kv_table::<T, _>(&guards, &stream, "gather_kv sources")?;
        let table: Vec<i64> = table.into_iter().flatten().collect();
        let table = dev.clone_htod(&table)?;
        let ranges = dev.clone_htod(p.ranges)?;
        let rope = dev.clone_htod(p.rope)?;
        let entries = es.as_cuda_slice::<u32>()?.slice(el.start_offset()..);
        let out = dev.alloc_zeros::<T>(layers * 2 * self.h * p.cap * self.d)?;
        let (nseg_i, h_i, cap_i, d_i) = (nseg as i32, self.h as i32, p.cap as i32, self.d as i32);
        let il = p.interleaved as i32;
        let func = dev.get_or_load_custom_func(&format!("gather_kv_{name}"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&table)
            .arg(&ranges)
            .arg(&entries)
            .arg(&rope)
            .arg(&out);
        b.arg(&nseg_i).arg(&h_i).arg(&cap_i).arg(&d_i).arg(&il);
        let rows = p.ranges.chunks(2).map(|r| r[1]).max().unwrap_or(0);
        let cfg = LaunchConfig {
            grid_dim: (rows.clamp(1, 65535), layers as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        drop(reads);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((layers, 2, self.h, p.cap, self.d)),
        ))
    }
}

impl CustomOp1 for GatherKv<'_> {
    fn name(&self) -> &'static str {
        "samkv-gather-kv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_only(self.name()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        match self.plan.sources[0][0].0.dtype() {
            DType::F32 => self.run::<f32>(&dev, s, l, "f32"),
            DType::BF16 => self.run::<bf16>(&dev, s, l, "bf16"),
            DType::F16 => self.run::<f16>(&dev, s, l, "f16"),
            dt => Err(candle_core::Error::Msg(format!(
                "samkv-gather-kv: {dt:?} is not supported"
            ))),
        }
    }
}

/// Every layer's rows gathered from the stored caches and rotated by their segment's delta:
/// (layers, 2, kv_heads, cap, head_dim), layer l's K in `[l][0]` and V in `[l][1]`, rows
/// `0..ranges[l].rows` valid and zeros after. None when the kernel does not take the inputs
/// (not CUDA, another dtype, sources not of one shape and dtype with packed rows).
pub fn gather_kv(plan: &GatherPlan) -> Result<Option<Tensor>> {
    let Some(first) = plan.sources.first().and_then(|s| s.first()) else {
        return Ok(None);
    };
    let dev = first.0.device();
    let dt = first.0.dtype();
    let (h, _, d) = first.0.dims3()?;
    let fits = |t: &Tensor| {
        t.device().same_device(dev)
            && t.dtype() == dt
            && t.rank() == 3
            && t.dim(0).ok() == Some(h)
            && t.dim(2).ok() == Some(d)
            && rows_packed(t, d)
    };
    let ok = enabled()
        && dev.is_cuda()
        && matches!(dt, DType::F32 | DType::BF16 | DType::F16)
        && d.is_multiple_of(2)
        && !plan.entries.is_empty()
        && plan.rope.len() == plan.sources[0].len() * d
        && plan.ranges.len() == 2 * plan.sources.len()
        && plan
            .sources
            .iter()
            .all(|l| l.len() == plan.sources[0].len())
        && plan
            .sources
            .iter()
            .flatten()
            .all(|(k, v)| fits(k) && fits(v));
    if !ok {
        return Ok(None);
    }
    let entries = Tensor::new(plan.entries, dev)?;
    Ok(Some(entries.apply_op1_no_bwd(&GatherKv { plan, h, d })?))
}

// ---------------------------------------------------------------------------------------
// Rows overwritten in place

struct ScatterRows;

impl ScatterRows {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        (ds, dl): (&mut CudaStorage, &Layout),
        (ss, sl): (&CudaStorage, &Layout),
        (rs, rl): (&CudaStorage, &Layout),
        kernel: &str,
    ) -> candle_core::Result<()> {
        let dev = ss.device().clone();
        let (h, n, d) = sl.shape().dims3()?;
        let src = ss.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
        let rows = rs.as_cuda_slice::<u32>()?.slice(rl.start_offset()..);
        let (src_hs, dst_hs) = (sl.stride()[0] as i64, dl.stride()[0] as i64);
        let dst = ds.as_cuda_slice_mut::<T>()?;
        let mut dst = dst.slice_mut(dl.start_offset()..);
        let (h_i, n_i, d_i) = (h as i32, n as i32, d as i32);
        let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&src).arg(&rows).arg(&mut dst);
        b.arg(&h_i).arg(&n_i).arg(&d_i).arg(&src_hs).arg(&dst_hs);
        unsafe { b.launch(super::launch_1d(h * n * d)) }.w()?;
        Ok(())
    }
}

impl candle_core::InplaceOp3 for ScatterRows {
    fn name(&self) -> &'static str {
        "samkv-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        Err(cuda_only(self.name()))
    }

    fn cuda_fwd(
        &self,
        ds: &mut CudaStorage,
        dl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<()> {
        let args = ((ss, sl), (rs, rl));
        match ds.dtype() {
            DType::BF16 => Self::run::<bf16>((ds, dl), args.0, args.1, "scatter_rows_b16"),
            DType::F16 => Self::run::<f16>((ds, dl), args.0, args.1, "scatter_rows_b16"),
            DType::F32 => Self::run::<f32>((ds, dl), args.0, args.1, "scatter_rows_b32"),
            dt => Err(candle_core::Error::Msg(format!(
                "samkv-scatter-rows: {dt:?} is not supported"
            ))),
        }
    }
}

/// `dst[:, rows[j], :] = src[:, j, :]` in place, for dst (heads, cap, d) with packed rows and
/// src (heads, n, d) of the same dtype (copied first if its rows are not packed), rows (n,) u32
/// on the device. Returns false (nothing done) where the kernel does not apply.
pub fn scatter_rows(dst: &Tensor, src: &Tensor, rows: &Tensor) -> Result<bool> {
    let ok = enabled()
        && dst.device().is_cuda()
        && src.device().same_device(dst.device())
        && rows.device().same_device(dst.device())
        && matches!(dst.dtype(), DType::BF16 | DType::F16 | DType::F32)
        && src.dtype() == dst.dtype()
        && rows.dtype() == DType::U32
        && rows.is_contiguous()
        && dst.rank() == 3
        && src.rank() == 3
        && rows_packed(dst, dst.dim(2)?)
        && dst.dim(0)? == src.dim(0)?
        && dst.dim(2)? == src.dim(2)?
        && rows.dims1()? == src.dim(1)?;
    if !ok {
        return Ok(false);
    }
    dst.inplace_op3(&packed(src, src.dim(2)?)?, rows, &ScatterRows)?;
    Ok(true)
}
